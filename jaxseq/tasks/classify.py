"""Many-to-one classification where only the ORDER of events carries the class.

    result = classify.train_and_evaluate(ClassifyConfig(model="lstm"), TrainConfig(out_dir="runs/c/lstm"))
    accuracies = classify.compare("runs/c", models=("bag", "rnn", "lstm"))   # {"bag": 0.17, ...}
    labels = classify.predict(classify.load_run("runs/c/lstm"), xs, lengths)

The embedded data set (``make_order_dataset``) is built so that only order matters: every sequence holds the
same three event frames among noise frames, and the class is the order in which the events occur (3! = 6
classes). A bag of frames sees the same multiset for every class and stays at chance (1/6).
"""
from __future__ import annotations

import dataclasses
import itertools
import pathlib

import jax
import numpy as np

from jaxseq import tasks
from jaxseq.models import classifier

ORDERS = list(itertools.permutations(range(3)))  # class k = the k-th ordering of the three events
NUM_FEATURES = 8  # features per frame of the order data set


def make_order_dataset(num_examples: int, *, num_steps: int = 20, num_features: int = NUM_FEATURES,
                       noise: float = 0.3, seed: int = 0) -> dict[str, np.ndarray]:
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
    labels = rng.integers(0, len(ORDERS), size=num_examples).astype(np.int32)
    for n in range(num_examples):
        positions = np.sort(rng.choice(lengths[n], size=3, replace=False))
        for event, position in zip(ORDERS[labels[n]], positions):
            xs[n, position] += events[event]
        xs[n, lengths[n]:] = 0.0
    return {"xs": xs, "lengths": lengths, "labels": labels}


@dataclasses.dataclass(frozen=True)
class ClassifyConfig:
    """Which model and how much order data (the training hyper-parameters live in ``TrainConfig``)."""

    model: str = "lstm"  # "bag" (order-blind baseline), "rnn", "lstm", "gru" or "bilstm"
    hidden_size: int = 32
    num_steps: int = 20  # sequence length T; lengths vary in [T/2, T]
    num_train: int = 3000  # training sequences (seed = TrainConfig.seed)
    num_test: int = 1000  # test sequences (seed = TrainConfig.seed + 1)


@dataclasses.dataclass(frozen=True)
class ClassifyResult:
    accuracy: float  # test accuracy of the run's final params
    out_dir: pathlib.Path
    already_finished: bool  # the run folder held a finished run, which was evaluated again, not retrained


@dataclasses.dataclass(frozen=True)
class ClassifyRun:
    """A trained run: its model name, the Flax module and the params."""

    name: str
    model: object
    params: dict
    num_steps: int


def _init_fn(model, num_steps: int):
    xs, lengths = np.zeros((1, num_steps, NUM_FEATURES), np.float32), np.full((1,), num_steps, np.int32)
    return lambda key: model.init(key, xs, lengths)["params"]


def predict(run: ClassifyRun, xs: np.ndarray, lengths: np.ndarray, batch_size: int = 512) -> np.ndarray:
    """Class ``int[n]`` of each sequence ``xs`` ``[n, time, features]`` with ``lengths`` ``int[n]``."""
    apply = jax.jit(lambda p, x, n: run.model.apply({"params": p}, x, n).argmax(-1))
    return np.concatenate([np.asarray(apply(run.params, xs[i:i + batch_size], lengths[i:i + batch_size]))
                           for i in range(0, len(xs), batch_size)])


def evaluate(run: ClassifyRun, data: dict[str, np.ndarray]) -> float:
    """Fraction of ``data`` (``xs``, ``lengths``, ``labels``) classified correctly."""
    return float((predict(run, data["xs"], data["lengths"]) == data["labels"]).mean())


def train_and_evaluate(config: ClassifyConfig, train_config, *, callbacks=()) -> ClassifyResult:
    """Train ``config.model`` on the order data set with ``jaxseq.training.fit``; test accuracy.

    A finished run in ``train_config.out_dir`` is evaluated again, not retrained. Draws ``out_dir/loss.png``;
    ``callbacks`` (``jaxseq.training.Callback``) go to ``fit``.
    """
    from jaxseq import training

    seed = train_config.seed
    train = make_order_dataset(config.num_train, num_steps=config.num_steps, seed=seed)
    test = make_order_dataset(config.num_test, num_steps=config.num_steps, seed=seed + 1)
    model = classifier.build_model(config.model, config.hidden_size)
    init = _init_fn(model, config.num_steps)
    fitted = training.fit(train_config, init_params=init, loss_fn=classifier.classification_loss(model),
                          train=training.ArrayBatches(train, train_config.batch_size, seed=seed),
                          run_config={"task": "order-classification", "model": config.model,
                                      "hidden": config.hidden_size, "num_steps": config.num_steps},
                          callbacks=[training.LossCurve(title=f"order classification ({config.model}), run "
                                                                f"{pathlib.Path(train_config.out_dir).name}"),
                                     *callbacks])
    params = training.restore_params(train_config.out_dir, init) if fitted.already_finished else fitted.params
    run = ClassifyRun(config.model, model, params, config.num_steps)
    return ClassifyResult(evaluate(run, test), pathlib.Path(train_config.out_dir), fitted.already_finished)


def load_run(run_dir) -> ClassifyRun:
    """A run folder written by ``train_and_evaluate`` (its latest params)."""
    from jaxseq import training

    stored = tasks.run_config(run_dir, "classify")
    model = classifier.build_model(stored["model"], stored["hidden"])
    params = training.restore_params(str(pathlib.Path(run_dir).resolve()), _init_fn(model, stored["num_steps"]),
                                     which="latest")
    return ClassifyRun(stored["model"], model, params, stored["num_steps"])


def compare(out_dir, *, models=("bag", "rnn", "lstm"), num_train: int = 3000, num_test: int = 1000,
            num_steps: int = 20, hidden_size: int = 32, epochs: int = 15, seed: int = 0,
            progress: bool = True) -> dict[str, float]:
    """Train each of ``models`` in ``out_dir/<name>`` (a re-run resumes or re-evaluates); test accuracy each."""
    from jaxseq import training

    results = {}
    for name in models:
        train_config = training.TrainConfig(out_dir=str(pathlib.Path(out_dir) / name), seed=seed, epochs=epochs,
                                            batch_size=50, learning_rate=3e-3, progress=progress)
        config = ClassifyConfig(model=name, hidden_size=hidden_size, num_steps=num_steps, num_train=num_train,
                                num_test=num_test)
        results[name] = train_and_evaluate(config, train_config).accuracy
    return results
