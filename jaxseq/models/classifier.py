"""Many-to-one sequence classification, the chapter's first example (action recognition from per-frame features).

A sequence of frame feature vectors ``[batch, time, features]`` with ``lengths`` → one class. The recurrent
classifier reads the last valid state (or mean / max over valid outputs, optionally bidirectional) into a
softmax layer; the order-blind baseline averages the frames first, so it cannot use their order.

The embedded data set (``make_order_dataset``) is built so that only order matters: every sequence holds the
same three event frames among noise frames, and the class is the order in which the events occur (3! = 6
classes). A bag of frames sees the same multiset for every class and stays at chance (1/6).

Run the comparison (RNN vs LSTM vs order-blind baseline) with ``python scripts/classify_order.py``.
"""
from __future__ import annotations

import itertools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jaxseq import nn as jnn
from jaxseq.cells import Cell
from jaxseq.models.common import hidden_state

POOLINGS = ("last", "mean", "max")
_ORDERS = list(itertools.permutations(range(3)))  # class k = the k-th ordering of the three events


def make_order_dataset(num_examples: int, *, num_steps: int = 20, num_features: int = 8, noise: float = 0.3,
                       seed: int = 0) -> dict[str, np.ndarray]:
    """Sequences whose class is the order of three event frames (6 classes); lengths vary in [T/2, T].

    Returns:
      ``{"xs": float32 [n, T, F], "lengths": int32 [n], "labels": int32 [n]}``; padded frames are zero.
    """
    if num_steps < 6:
        raise ValueError(f"num_steps must be at least 6 (3 events in at least T/2 frames), got {num_steps}")
    rng = np.random.default_rng(seed)
    events = np.random.default_rng(12345).standard_normal((3, num_features)).astype(np.float32)  # same every set
    xs = noise * rng.standard_normal((num_examples, num_steps, num_features)).astype(np.float32)
    lengths = rng.integers(num_steps // 2, num_steps + 1, size=num_examples).astype(np.int32)
    labels = rng.integers(0, len(_ORDERS), size=num_examples).astype(np.int32)
    for n in range(num_examples):
        positions = np.sort(rng.choice(lengths[n], size=3, replace=False))
        for event, position in zip(_ORDERS[labels[n]], positions):
            xs[n, position] += events[event]
        xs[n, lengths[n]:] = 0.0
    return {"xs": xs, "lengths": lengths, "labels": labels}


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
                xs, lengths=lengths)
            last = jnp.concatenate([hidden_state(c_f), hidden_state(c_b)], axis=-1)
        else:
            carry, ys = jnn.RNN(self.cell, self.hidden_size, param_dtype=self.param_dtype)(xs, lengths=lengths)
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


def accuracy(model: nn.Module, params, data: dict[str, np.ndarray], batch_size: int = 512) -> float:
    """Fraction of ``data`` classified correctly."""
    apply = jax.jit(lambda p, xs, n: model.apply({"params": p}, xs, n).argmax(-1))
    correct = 0
    for start in range(0, len(data["labels"]), batch_size):
        rows = slice(start, start + batch_size)
        correct += int((np.asarray(apply(params, data["xs"][rows], data["lengths"][rows])) == data["labels"][rows]).sum())
    return correct / len(data["labels"])


def build_model(name: str, hidden_size: int = 32, num_classes: int = len(_ORDERS)) -> nn.Module:
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


def run_order_comparison(out_dir, *, models=("bag", "rnn", "lstm"), num_train: int = 3000, num_test: int = 1000,
                         num_steps: int = 20, hidden_size: int = 32, epochs: int = 15, seed: int = 0,
                         progress: bool = True) -> dict[str, float]:
    """Train each model on the order data set with ``jaxseq.training.fit``; return test accuracy per model.

    Each model trains in ``out_dir/<name>`` (so a re-run resumes or reports it finished).
    """
    import pathlib

    from jaxseq import training

    train = make_order_dataset(num_train, num_steps=num_steps, seed=seed)
    test = make_order_dataset(num_test, num_steps=num_steps, seed=seed + 1)
    results = {}
    for name in models:
        model = build_model(name, hidden_size)
        config = training.TrainConfig(out_dir=str(pathlib.Path(out_dir) / name), seed=seed, epochs=epochs,
                                      batch_size=50, learning_rate=3e-3, progress=progress)
        init = lambda key, m=model: m.init(key, train["xs"][:1], train["lengths"][:1])["params"]
        fitted = training.fit(config, init_params=init, loss_fn=classification_loss(model),
                              train=training.ArrayBatches(train, config.batch_size, seed=seed),
                              run_config={"task": "order-classification", "model": name, "hidden": hidden_size,
                                          "num_steps": num_steps})
        params = fitted.params if not fitted.already_finished else training.restore_params(config.out_dir, init)
        results[name] = accuracy(model, params, test)
    return results
