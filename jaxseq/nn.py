"""Thin Flax linen wrappers: parameters via ``self.param``, all maths in ``jaxseq.layers``.

Each module runs ``jaxseq.layers.layer`` / ``bidirectional`` / ``stacked`` (the one entry: a cell's fused layer
when it declares one, e.g. every ``cells.make_lstm`` cell, the reference loop otherwise; ``impl="scan"`` forces
the reference loop).

``RNN`` takes a jaxseq ``Cell`` and a ``hidden_size`` where ``flax.linen.RNN`` takes a Flax cell module; the rest
of its contract is Flax's: the attributes ``time_major``, ``return_carry``, ``reverse``, ``keep_order`` and
``unroll``, and the call ``(inputs, *, initial_carry=None, seq_lengths=None, return_carry=None, time_major=None,
reverse=None, keep_order=None)`` whose keywords override the attributes. It returns the outputs, or
``(carry, outputs)`` with ``return_carry``; with ``reverse`` and not ``keep_order`` the outputs come in reversed
order (inside each sequence's length), as Flax's do. ``Bidirectional`` and ``StackedRNN`` take ``seq_lengths`` and
``return_carry`` the same way.

The cell's params live under one name (``"cell"``, ``"directions"`` = ``{"forward", "backward"}``, or ``"layers"``)
in exactly the pure layout, so a wrapped model's params can be passed to the pure functions unchanged.
"""
from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from jaxseq import layers
from jaxseq.cells import Cell, check_size
from jaxseq.sequences import as_lengths, batch_shape, clip_lengths, reverse_within_lengths


def _pick(override, default):
    return default if override is None else override


def _flip(ys, seq_lengths, time_major: bool):
    """``ys`` reversed in time inside each length (the padding stays at the end), as Flax's ``flip_sequences``."""
    if seq_lengths is None:
        return jnp.flip(ys, axis=0 if time_major else -2)
    ys_t = ys if time_major else jnp.moveaxis(ys, -2, 0)
    ys_t = reverse_within_lengths(ys_t, clip_lengths(seq_lengths, ys_t.shape[0]))
    return ys_t if time_major else jnp.moveaxis(ys_t, 0, -2)


class RNN(nn.Module):
    """One recurrent layer with ``flax.linen.RNN``'s contract over a jaxseq ``Cell``.

    ``RNN(cell, hidden_size)(inputs [batch, time, features], seq_lengths=...)`` returns the outputs
    ``[batch, time, hidden]``; ``return_carry=True`` returns ``(final_carry, outputs)``.
    """

    cell: Cell  # e.g. jaxseq.cells.lstm
    hidden_size: int
    time_major: bool = False
    return_carry: bool = False
    reverse: bool = False  # padding-aware when seq_lengths are given
    keep_order: bool = False  # with reverse: outputs aligned with the inputs (True) or in reversed order (Flax's)
    unroll: int | None = None  # steps per loop iteration; None: the layer's default (16 on GPU)
    param_dtype: Any = jnp.float32
    impl: str = "auto"  # jaxseq.layers.layer's impl

    @nn.compact
    def __call__(self, inputs, *, initial_carry=None, seq_lengths=None, return_carry: bool | None = None,
                 time_major: bool | None = None, reverse: bool | None = None, keep_order: bool | None = None):
        check_size("hidden_size", self.hidden_size)  # custom cells' init may not check it
        time_major, reverse = _pick(time_major, self.time_major), _pick(reverse, self.reverse)
        params = self.param("cell", lambda key: self.cell.init(key, inputs.shape[-1], self.hidden_size,
                                                               self.param_dtype))
        seq_lengths = as_lengths(seq_lengths)
        if initial_carry is None:
            # The module knows the hidden size, so a custom cell's params need not say it (no "W" needed).
            initial_carry = self.cell.init_carry(batch_shape(inputs, time_major), self.hidden_size,
                                                 self.param_dtype)
        carry, ys = layers.layer(self.cell, params, inputs, carry=initial_carry, lengths=seq_lengths,
                                 reverse=reverse, impl=self.impl, unroll=self.unroll, time_major=time_major)
        if reverse and not _pick(keep_order, self.keep_order):
            ys = _flip(ys, seq_lengths, time_major)
        return (carry, ys) if _pick(return_carry, self.return_carry) else ys


class Bidirectional(nn.Module):
    """Forward and padding-aware backward layers, outputs merged (concat, sum, mean, mul, or None for both).

    Returns the merged outputs, or ``((forward_carry, backward_carry), outputs)`` with ``return_carry``; both
    directions' outputs are aligned with the inputs.
    """

    cell: Cell
    hidden_size: int
    merge: str | None = "concat"
    time_major: bool = False
    return_carry: bool = False
    unroll: int | None = None
    param_dtype: Any = jnp.float32
    impl: str = "auto"

    @nn.compact
    def __call__(self, inputs, *, initial_carry=None, seq_lengths=None, return_carry: bool | None = None):
        check_size("hidden_size", self.hidden_size)
        params = self.param("directions", lambda key: layers.init_bidirectional(
            self.cell, key, inputs.shape[-1], self.hidden_size, self.param_dtype))
        carry, ys = layers.bidirectional(self.cell, params, inputs, carry=initial_carry, lengths=seq_lengths,
                                         merge=self.merge, impl=self.impl, unroll=self.unroll,
                                         time_major=self.time_major)
        return (carry, ys) if _pick(return_carry, self.return_carry) else ys


class StackedRNN(nn.Module):
    """``num_layers`` recurrent layers with dropout between them (PyTorch ``nn.LSTM(num_layers, dropout)``).

    Dropout draws from the ``"dropout"`` RNG stream when ``deterministic=False``. Returns the last layer's
    outputs, or ``([final carry per layer], outputs)`` with ``return_carry``.
    """

    cell: Cell
    hidden_size: int
    num_layers: int = 2
    bidirectional: bool = False
    merge: str = "concat"
    dropout_rate: float = 0.0
    time_major: bool = False
    return_carry: bool = False
    unroll: int | None = None
    param_dtype: Any = jnp.float32
    impl: str = "auto"

    @nn.compact
    def __call__(self, inputs, *, seq_lengths=None, deterministic: bool = True, return_carry: bool | None = None):
        check_size("hidden_size", self.hidden_size)
        check_size("num_layers", self.num_layers)
        params = self.param("layers", lambda key: layers.init_stacked(
            self.cell, key, inputs.shape[-1], self.hidden_size, self.num_layers, bidirectional=self.bidirectional,
            merge=self.merge, dtype=self.param_dtype))
        key = None if deterministic or self.dropout_rate == 0.0 else self.make_rng("dropout")
        carries, ys = layers.stacked(self.cell, params, inputs, lengths=seq_lengths, bidirectional=self.bidirectional,
                                     merge=self.merge, dropout_rate=self.dropout_rate, key=key, impl=self.impl,
                                     unroll=self.unroll, time_major=self.time_major)
        return (carries, ys) if _pick(return_carry, self.return_carry) else ys
