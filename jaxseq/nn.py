"""Thin Flax linen wrappers: parameters via ``self.param``, all maths in ``jaxseq.cells`` / ``jaxseq.scan``.

Each layer runs through ``jaxseq.scan.layer``: the fused LSTM layer (``jaxseq.layers.lstm``) for LSTM cells
(``cells.lstm``, any ``cells.make_lstm``), the plain scan for other cells (``impl="scan"`` forces it).

The cell's params live under one name (``"cell"``, ``"directions"`` = ``{"forward", "backward"}``, or ``"layers"``) in
exactly the pure layout, so a wrapped model's params can be passed to the pure functions unchanged.
"""
from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from jaxseq import scan
from jaxseq.cells import Cell, check_size


class RNN(nn.Module):
    """One recurrent layer: ``(carry, ys) = RNN(cell, hidden_size)(xs [batch, time, features], lengths=...)``."""

    cell: Cell  # e.g. jaxseq.cells.lstm
    hidden_size: int
    reverse: bool = False  # padding-aware when lengths are given
    unroll: int | None = None  # steps per loop iteration; None: the layer's default (16 on GPU for the LSTM)
    time_major: bool = False
    param_dtype: Any = jnp.float32
    impl: str = "auto"  # jaxseq.layers.lstm's impl for LSTM cells; "scan" for the plain loop

    @nn.compact
    def __call__(self, xs, *, lengths=None, initial_carry=None):
        check_size("hidden_size", self.hidden_size)  # custom cells' init may not check it
        params = self.param("cell", lambda key: self.cell.init(key, xs.shape[-1], self.hidden_size, self.param_dtype))
        if initial_carry is None:
            initial_carry = self.cell.init_carry(scan._batch_shape(xs, self.time_major), self.hidden_size,
                                                 self.param_dtype)
        return scan.layer(self.cell, params, initial_carry, xs, lengths=lengths, reverse=self.reverse,
                          unroll=self.unroll, time_major=self.time_major, impl=self.impl)


class Bidirectional(nn.Module):
    """Forward and padding-aware backward layers, outputs merged (concat, sum, mean, mul, or None for both)."""

    cell: Cell
    hidden_size: int
    merge: str | None = "concat"
    unroll: int | None = None
    param_dtype: Any = jnp.float32
    impl: str = "auto"

    @nn.compact
    def __call__(self, xs, *, lengths=None):
        check_size("hidden_size", self.hidden_size)
        params = self.param("directions", lambda key: scan.init_bidirectional(self.cell, key, xs.shape[-1],
                                                                          self.hidden_size, self.param_dtype))
        return scan.bidirectional_layer(self.cell, params, xs, lengths=lengths, merge=self.merge, unroll=self.unroll,
                                        impl=self.impl)


class StackedRNN(nn.Module):
    """``num_layers`` recurrent layers with dropout between them (PyTorch ``nn.LSTM(num_layers, dropout)``).

    Dropout draws from the ``"dropout"`` RNG stream when ``deterministic=False``.
    """

    cell: Cell
    hidden_size: int
    num_layers: int = 2
    bidirectional: bool = False
    merge: str = "concat"
    dropout_rate: float = 0.0
    param_dtype: Any = jnp.float32
    impl: str = "auto"

    @nn.compact
    def __call__(self, xs, *, lengths=None, deterministic: bool = True):
        check_size("hidden_size", self.hidden_size)
        check_size("num_layers", self.num_layers)
        params = self.param("layers", lambda key: scan.init_stacked(
            self.cell, key, xs.shape[-1], self.hidden_size, self.num_layers, bidirectional=self.bidirectional,
            merge=self.merge, dtype=self.param_dtype))
        key = None if deterministic or self.dropout_rate == 0.0 else self.make_rng("dropout")
        return scan.stacked(self.cell, params, xs, lengths=lengths, bidirectional=self.bidirectional,
                            merge=self.merge, dropout_rate=self.dropout_rate, key=key, impl=self.impl)
