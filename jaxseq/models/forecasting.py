"""Forecasting models (RNN, LSTM, GRU, bidirectional, stacked) and their loss.

The recurrent models are one Flax linen module, ``Forecaster``, that calls the pure core
(``jaxseq.stacked`` over ``jaxseq.cells``) and reads the final hidden state(s) into a dense head of
``horizon`` outputs (the *direct* multi-step forecast). The workflow around it (data, baselines, recursive
forecasts, scoring, runs) is ``jaxseq.tasks.forecast``.
"""
from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxseq import cells
from jaxseq.cells import hidden_state
from jaxseq.layers import init_stacked, stacked

CELLS = {"rnn": cells.rnn, "lstm": cells.lstm, "gru": cells.gru}
# Model names of the command line: the chapter's three cells and the bidirectional LSTM of its exercise.
MODELS = {"rnn": ("rnn", False), "lstm": ("lstm", False), "gru": ("gru", False), "bilstm": ("lstm", True)}


class Forecaster(nn.Module):
    """Recurrent encoder over a window, dense head to ``horizon`` forecasts.

    Input ``[batch, lookback, features]`` (scaled; feature 0 is the target), output ``[batch, horizon]`` in
    the scaled target space.

    Attributes:
      cell: ``"rnn" | "lstm" | "gru"``.
      hidden_size: units per direction and layer.
      num_layers: stacked recurrent layers (``jaxseq.stacked``).
      bidirectional: run each layer both ways; the head reads both directions' final states.
      horizon: forecasts per window (direct multi-step head).
      dropout_rate: dropout between stacked layers (training only).
      residual: forecast the change from the window's last target value instead of the value itself. Makes
        "no change" the zero-weight default, which matters for price targets whose test range lies outside
        the training range.
    """

    cell: str = "lstm"
    hidden_size: int = 32
    num_layers: int = 1
    bidirectional: bool = False
    horizon: int = 1
    dropout_rate: float = 0.0
    residual: bool = False

    @nn.compact
    def __call__(self, x: jax.Array, *, deterministic: bool = True) -> jax.Array:
        if self.cell not in CELLS:
            raise ValueError(f"cell must be one of {sorted(CELLS)}, got {self.cell!r}")
        if x.ndim != 3:
            raise ValueError(f"x must be [batch, lookback, features], got shape {x.shape}")
        check_sizes(hidden_size=self.hidden_size, num_layers=self.num_layers, horizon=self.horizon)
        cell = CELLS[self.cell]
        input_size = x.shape[-1]

        def init(key):
            layers = init_stacked(cell, key, input_size, self.hidden_size, self.num_layers,
                                  bidirectional=self.bidirectional, dtype=x.dtype)
            return {f"layer_{i}": p for i, p in enumerate(layers)}  # a dict: stable names in checkpoints

        params = self.param("recurrent", init)
        layer_params = [params[f"layer_{i}"] for i in range(self.num_layers)]
        key = None if deterministic or self.dropout_rate == 0 else self.make_rng("dropout")
        carries, _ = stacked(cell, layer_params, x, bidirectional=self.bidirectional,
                             dropout_rate=self.dropout_rate, key=key)
        last = carries[-1]
        # The backward direction's final carry has read the whole window (last day first), which its output at
        # the last step has not; so both directions contribute their final states.
        summary = (jnp.concatenate([hidden_state(last[0]), hidden_state(last[1])], axis=-1) if self.bidirectional
                   else hidden_state(last))
        y = nn.Dense(self.horizon, name="head")(summary)
        return y + x[:, -1:, 0] if self.residual else y


def check_sizes(**sizes: int) -> None:
    """Raise a ValueError naming the first size that is not a positive integer."""
    for name, value in sizes.items():
        cells.check_size(name, value)


def make_model(name: str, *, hidden_size: int = 32, num_layers: int = 1, horizon: int = 1,
               dropout_rate: float = 0.0, residual: bool = False) -> Forecaster:
    """A ``Forecaster`` by command-line name: ``rnn``, ``lstm``, ``gru`` or ``bilstm``."""
    if name not in MODELS:
        raise ValueError(f"model must be one of {sorted(MODELS)}, got {name!r}")
    check_sizes(hidden_size=hidden_size, num_layers=num_layers, horizon=horizon)
    cell, bidirectional = MODELS[name]
    return Forecaster(cell=cell, hidden_size=hidden_size, num_layers=num_layers, bidirectional=bidirectional,
                      horizon=horizon, dropout_rate=dropout_rate, residual=residual)


def forecast_loss(model: Forecaster):
    """``loss_fn(params, batch, dropout_key) -> (mse, {"mse"})`` on scaled windows, for ``jaxseq.training.fit``.

    ``batch``: ``x`` ``[batch, lookback, features]`` and ``y`` ``[batch, horizon]``.
    """
    def loss_fn(params, batch, dropout_key):
        pred = model.apply({"params": params}, batch["x"], deterministic=False, rngs={"dropout": dropout_key})
        mse = jnp.mean((pred - batch["y"]) ** 2)
        return mse, {"mse": mse}

    return loss_fn
