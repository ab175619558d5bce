"""The reference time loop: ``unroll`` over ``lax.scan`` with lengths and padding-aware reverse.

This is the loop every cell runs on and the oracle every faster path is tested against; the one public way to
run a recurrent layer (fast by default, this loop with ``impl="scan"``) is ``jaxseq.layers.layer``.

Public tensors are batch-major ``[*batch, time, features]`` (``time_major=True`` takes
``[time, *batch, features]``); the scan itself always runs time-major.

Variable length: ``lengths`` ``int[*batch]`` marks each sequence's valid prefix. Padded steps keep the carry
and emit zeros, so the final carry is each sequence's last valid one and a length-0 sequence returns its
initial carry. ``reverse=True`` runs each sequence backwards *inside its own length*: the padding stays at the
end and outputs stay aligned with their inputs (unlike a plain ``lax.scan(reverse=True)``).
"""
from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
from jax import lax

from jaxseq.sequences import (as_lengths, check_sequence_inputs, clip_lengths, mask_like, reverse_within_lengths,
                              vary_like)

__all__ = ["reverse_within_lengths", "unroll"]


def unroll(apply: Callable, params, carry, xs, *, lengths=None, reverse: bool = False, unroll: int = 1,
           time_major: bool = False):
    """Run ``apply(params, carry, x_t) -> (carry, y_t)`` over the time axis of ``xs`` with ``lax.scan``.

    Args:
      apply: a cell's step function (``Cell.apply``) or any function of that shape.
      params: the cell's parameter pytree.
      carry: initial carry, leaves ``[*batch, hidden]`` (e.g. ``cell.init_carry(batch_shape, hidden)``).
      xs: inputs ``[*batch, time, features]`` (``[time, *batch, features]`` if ``time_major``).
      lengths: optional ``int[*batch]`` valid lengths in ``[0, time]`` (an array, or a list of ints); padded steps
        keep the carry and emit zeros. Checked when concrete; under ``jit`` a traced length outside the range is
        clipped into it.
      reverse: run backwards in time (inside each sequence's length when ``lengths`` is given); outputs stay
        aligned with their inputs.
      unroll: steps per scan iteration, passed to ``lax.scan``.
      time_major: whether ``xs`` and the returned ``ys`` put time first.

    Returns:
      ``(final_carry, ys)``: the carry after each sequence's last valid step and the outputs
      ``[*batch, time, out]`` (time-major if ``time_major``).
    """
    xs, lengths = jnp.asarray(xs), as_lengths(lengths)
    check_sequence_inputs(params, carry, xs, lengths, time_major=time_major)
    xs_t = xs if time_major else jnp.moveaxis(xs, -2, 0)
    carry = vary_like(carry, params, xs, lengths)

    if lengths is None:
        carry, ys = lax.scan(lambda c, x: apply(params, c, x), carry, xs_t, reverse=reverse, unroll=unroll)
    else:
        num_steps = xs_t.shape[0]
        lengths = clip_lengths(lengths, num_steps)
        if reverse:
            xs_t = reverse_within_lengths(xs_t, lengths)

        def step(c, inputs):
            x, t = inputs
            valid = t < lengths
            new_c, y = apply(params, c, x)
            new_c = jax.tree_util.tree_map(lambda n, o: jnp.where(mask_like(valid, n), n, o), new_c, c)
            return new_c, jnp.where(mask_like(valid, y), y, jnp.zeros((), y.dtype))

        carry, ys = lax.scan(step, carry, (xs_t, jnp.arange(num_steps)), unroll=unroll)
        if reverse:
            ys = reverse_within_lengths(ys, lengths)
    return carry, (ys if time_major else jnp.moveaxis(ys, 0, -2))
