"""Small pieces every model shares: the hidden state of a final carry, and inverted dropout."""
from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxseq.cells import LSTMState


def hidden_state(carry) -> jax.Array:
    """The hidden state ``[batch, hidden]`` of a final carry: the LSTM's ``h``, the RNN/GRU carry itself."""
    return carry.h if isinstance(carry, LSTMState) else carry


def dropout(x: jax.Array, rate: float, key) -> jax.Array:
    """Inverted dropout: zero each entry with probability ``rate``, scale the rest by ``1 / (1 - rate)``.

    ``key=None`` (evaluation) or ``rate == 0`` returns ``x`` unchanged.
    """
    if key is None or rate == 0.0:
        return x
    keep = jax.random.bernoulli(key, 1.0 - rate, x.shape)
    return jnp.where(keep, x / (1.0 - rate), jnp.zeros((), x.dtype))
