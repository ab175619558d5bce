"""Many-to-one sequence classification, the chapter's first example (action recognition from per-frame features).

A sequence of frame feature vectors ``[batch, time, features]`` with ``lengths`` → one class. The recurrent
classifier reads the last valid state (or mean / max over valid outputs, optionally bidirectional) into a
softmax layer; the order-blind baseline averages the frames first, so it cannot use their order.

The data set and the workflow (train, evaluate, compare) are ``jaxseq.tasks.classify``.
"""
from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxseq import nn as jnn
from jaxseq.cells import Cell
from jaxseq.cells import hidden_state

POOLINGS = ("last", "mean", "max")
NUM_ORDERS = 6  # classes of the order data set (jaxseq.tasks.classify): the 3! orders of three events


def _masked_pool(ys, lengths, pooling: str):
    """Mean or max of ``ys [batch, time, H]`` over each sequence's valid steps."""
    valid = (jnp.arange(ys.shape[-2]) < lengths[..., None])[..., None]
    if pooling == "mean":
        return jnp.where(valid, ys, 0).sum(-2) / jnp.maximum(lengths, 1)[..., None].astype(ys.dtype)
    return jnp.where(valid, ys, -jnp.inf).max(-2)


class SequenceClassifier(nn.Module):
    """Recurrent many-to-one classifier: ``logits [batch, classes] = model(xs [batch, time, F], lengths)``."""

    cell: Cell
    hidden_size: int
    num_classes: int
    pooling: str = "last"  # "last" valid state (the chapter's ŷ = softmax(V s_T)), or "mean" / "max" of outputs
    bidirectional: bool = False
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, xs, lengths):
        if self.pooling not in POOLINGS:
            raise ValueError(f"pooling must be one of {POOLINGS}, got {self.pooling!r}")
        if self.bidirectional:
            (c_f, c_b), ys = jnn.Bidirectional(self.cell, self.hidden_size, param_dtype=self.param_dtype)(
                xs, seq_lengths=lengths, return_carry=True)
            last = jnp.concatenate([hidden_state(c_f), hidden_state(c_b)], axis=-1)
        else:
            carry, ys = jnn.RNN(self.cell, self.hidden_size, param_dtype=self.param_dtype)(
                xs, seq_lengths=lengths, return_carry=True)
            last = hidden_state(carry)
        features = last if self.pooling == "last" else _masked_pool(ys, lengths, self.pooling)
        return nn.Dense(self.num_classes, param_dtype=self.param_dtype, name="output")(features)


class BagOfFrames(nn.Module):
    """Order-blind baseline: mean of the valid frames, then a two-layer MLP."""

    hidden_size: int
    num_classes: int

    @nn.compact
    def __call__(self, xs, lengths):
        pooled = _masked_pool(xs, lengths, "mean")
        return nn.Dense(self.num_classes)(nn.relu(nn.Dense(self.hidden_size)(pooled)))


def classification_loss(model: nn.Module):
    """``loss_fn(params, batch, key) -> (cross-entropy, {"accuracy"})`` for ``jaxseq.training.fit``."""

    def loss_fn(params, batch, key):
        del key  # no dropout in these models
        logits = model.apply({"params": params}, batch["xs"], batch["lengths"])
        log_p = jax.nn.log_softmax(logits)
        loss = -jnp.take_along_axis(log_p, batch["labels"][:, None], axis=-1).mean()
        return loss, {"accuracy": (logits.argmax(-1) == batch["labels"]).mean()}

    return loss_fn


def build_model(name: str, hidden_size: int = 32, num_classes: int = NUM_ORDERS) -> nn.Module:
    """``"bag"`` (order-blind), ``"rnn"``, ``"lstm"``, ``"gru"`` or ``"bilstm"`` classifier."""
    from jaxseq import cells

    if name == "bag":
        return BagOfFrames(hidden_size, num_classes)
    recurrent = {"rnn": (cells.rnn, False), "lstm": (cells.lstm, False), "gru": (cells.gru, False),
                 "bilstm": (cells.lstm, True)}
    if name not in recurrent:
        raise ValueError(f"model must be one of {['bag', *recurrent]}, got {name!r}")
    cell, bidirectional = recurrent[name]
    return SequenceClassifier(cell, hidden_size, num_classes, bidirectional=bidirectional)
