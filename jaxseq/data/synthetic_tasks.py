"""Synthetic long-range memory tasks: the adding problem and the copy task (experiments E4, E5).

Both have a memoryless baseline loss, so a run shows whether a recurrent layer learned the long dependency
(scripts/gradnorm_adding.py trains on them; ``jaxseq.gradients`` measures the gradient norms beside them).

References:
  Le, Jaitly & Hinton 2015, "A simple way to initialize recurrent networks of rectified linear units".
  Arjovsky, Shah & Bengio 2016, "Unitary evolution recurrent neural networks" (ICML).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

#: MSE of always predicting the mean 1 on ``adding_problem``: Var(a + b) = 2/12 for a, b ~ U(0, 1).
ADDING_BASELINE_MSE = 1.0 / 6.0


def adding_problem(key, batch: int, steps: int, dtype=jnp.float32):
    """The adding problem (Le et al. 2015; Arjovsky et al. 2016 form) with long-range dependence.

    Each step reads ``(value, marker)``: values ~ U(0, 1); exactly two markers are 1, one in the first half
    and one in the second half of the sequence. The target is the sum of the two marked values.

    Returns:
      ``(xs [batch, steps, 2], targets [batch])``. Predicting 1 always gives MSE ``ADDING_BASELINE_MSE``.
    """
    if steps < 2:
        raise ValueError(f"steps must be at least 2 (one marker per half), got {steps}")
    k_v, k_1, k_2 = jax.random.split(key, 3)
    values = jax.random.uniform(k_v, (batch, steps), dtype)
    first = jax.random.randint(k_1, (batch,), 0, steps // 2)
    second = jax.random.randint(k_2, (batch,), steps // 2, steps)
    markers = jax.nn.one_hot(first, steps, dtype=dtype) + jax.nn.one_hot(second, steps, dtype=dtype)
    return jnp.stack([values, markers], axis=-1), jnp.sum(values * markers, axis=-1)


COPY_SYMBOLS, COPY_LENGTH = 8, 10  # Arjovsky et al. 2016: 10 symbols drawn from 8 categories


def copy_task(key, batch: int, delay: int, dtype=jnp.float32, *, length: int = COPY_LENGTH,
              symbols: int = COPY_SYMBOLS):
    """The copy task (Arjovsky et al. 2016): remember ``length`` symbols for ``delay`` steps, then write them out.

    Tokens: 0 blank, 1..``symbols`` symbols, ``symbols + 1`` delimiter. Input: ``length`` symbols,
    ``delay − 1`` blanks, the delimiter, ``length`` blanks (``delay + 2·length`` steps); target:
    ``delay + length`` blanks, then the symbols. The defaults (10 symbols from 8 categories) are Arjovsky's;
    a shorter ``length`` is the same task with less to hold.

    Returns:
      ``(xs [batch, delay + 2·length, symbols + 2] one-hot, labels int32[batch, delay + 2·length])``; the
      memoryless baseline (blanks, then uniform over the symbols) has mean cross-entropy
      ``copy_baseline(delay, length=length, symbols=symbols)``.
    """
    if delay < 1:
        raise ValueError(f"delay must be >= 1, got {delay}")
    if length < 1 or symbols < 1:
        raise ValueError(f"length and symbols must be >= 1, got {length} and {symbols}")
    recalled = jax.random.randint(key, (batch, length), 1, symbols + 1)
    blanks = jnp.zeros((batch, delay - 1), jnp.int32)
    tail = jnp.zeros((batch, length), jnp.int32)
    delimiter = jnp.full((batch, 1), symbols + 1, jnp.int32)
    inputs = jnp.concatenate([recalled, blanks, delimiter, tail], axis=1)
    labels = jnp.concatenate([jnp.zeros((batch, delay + length), jnp.int32), recalled], axis=1)
    return jax.nn.one_hot(inputs, symbols + 2, dtype=dtype), labels


def copy_baseline(delay: int, *, length: int = COPY_LENGTH, symbols: int = COPY_SYMBOLS) -> float:
    """Mean cross-entropy per step of the memoryless strategy on ``copy_task``:
    ``length · log(symbols) / (delay + 2·length)`` (``10 log 8 / (delay + 20)`` by default)."""
    return length * float(np.log(symbols)) / (delay + 2 * length)
