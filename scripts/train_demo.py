"""Drive `jaxseq.training.fit` with a tiny LSTM regressor on synthetic sequences (seconds on a laptop CPU).

Task: x `[examples, 12, 3]` standard normal; y = 0.3 * sum_t x[:, t, 0] - 0.1 * x[:, -1, 1]. An LSTM (hidden 16)
reads x and a linear layer maps the last hidden state to y; loss is the mean squared error.

Run:
    python scripts/train_demo.py --out runs/demo --epochs 5
    python scripts/train_demo.py --out runs/demo --epochs 5        # again: "already finished", does nothing
    python scripts/train_demo.py --out runs/demo --epochs 8        # trains epochs 5..7 more
    python scripts/train_demo.py --out runs/demo --epochs 5 --restart
Expected: eval mse falls from ~2 to below 0.2 within 5 epochs; runs/demo holds metrics.jsonl, loss.png and
checkpoints/. Kill it at any point (Ctrl-C, SIGTERM or SIGKILL) and re-run the same command: it resumes from the
last checkpoint and writes the same losses as an uninterrupted run.

`--slow-data S` sleeps S seconds in every batch read (a slow input pipeline); the kill/resume test uses it to
get a window in which to kill the process. `--nan-batch E,I` poisons batch I of epoch E with NaN.
"""
from __future__ import annotations

import argparse
import logging
import sys
import time

import numpy as np

HIDDEN = 16
FEATURES = 3
TIME = 12


def make_data(seed: int, n: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, TIME, FEATURES)).astype(np.float32)
    y = (0.3 * x[:, :, 0].sum(1) - 0.1 * x[:, -1, 1]).astype(np.float32)
    return {"x": x, "y": y}


def init_params(key):
    import jax
    import jax.numpy as jnp

    from jaxseq import cells

    k_cell, k_out = jax.random.split(key)
    return {"lstm": cells.lstm.init(k_cell, FEATURES, HIDDEN, jnp.float32),
            "out": {"w": jax.random.normal(k_out, (HIDDEN, 1)) / np.sqrt(HIDDEN), "b": jnp.zeros((1,))}}


def loss_fn(params, batch, dropout_key):
    """MSE of the last-hidden-state readout; batch x `[batch, time, features]`, y `[batch]`."""
    del dropout_key  # no dropout in this model
    from jaxseq import cells, unroll

    x = batch["x"]
    carry = cells.lstm.init_carry(x.shape[:1], HIDDEN, x.dtype)
    (h, _), _ = unroll(cells.lstm.apply, params["lstm"], carry, x)
    pred = (h @ params["out"]["w"] + params["out"]["b"])[:, 0]
    err = pred.astype("float32") - batch["y"].astype("float32")
    mse = (err ** 2).mean()
    return mse, {"mae": abs(err).mean()}


class Batches:
    """ArrayBatches, optionally slowed down or with one batch poisoned with NaN (for the tests)."""

    def __init__(self, arrays, batch_size, *, seed, slow=0.0, nan_batch=None):
        from jaxseq.training import ArrayBatches

        self.inner = ArrayBatches(arrays, batch_size, seed=seed)
        self.slow = slow
        self.nan_batch = nan_batch

    def num_batches(self, epoch):
        return self.inner.num_batches(epoch)

    def batch(self, epoch, index):
        if self.slow:
            time.sleep(self.slow)
        batch = self.inner.batch(epoch, index)
        if self.nan_batch == (epoch, index):
            batch = {**batch, "x": np.full_like(batch["x"], np.nan)}
        return batch


def problem(seed: int, batch_size: int, *, examples: int = 256, slow: float = 0.0, nan_batch=None):
    """(train BatchSource, evaluate) for the demo task."""
    from jaxseq.training import ArrayBatches, make_eval_fn

    train = Batches(make_data(seed, examples), batch_size, seed=seed, slow=slow, nan_batch=nan_batch)
    valid = ArrayBatches(make_data(seed + 1, 128), 64, seed=seed, shuffle=False)
    return train, make_eval_fn(loss_fn, valid)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True, help="run folder (re-running with it resumes)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--epochs", type=int, default=5)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--examples", type=int, default=256)
    p.add_argument("--lr", type=float, default=1e-2)
    p.add_argument("--log-every", type=int, default=4)
    p.add_argument("--checkpoint-every", type=int, default=None)
    p.add_argument("--best-metric", default="loss")
    p.add_argument("--restart", action="store_true")
    p.add_argument("--mixed-precision", action="store_true")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--slow-data", type=float, default=0.0, metavar="S")
    p.add_argument("--nan-batch", default=None, metavar="E,I")
    args = p.parse_args(argv)
    nan_batch = tuple(int(v) for v in args.nan_batch.split(",")) if args.nan_batch else None

    from jaxseq.training import LossCurve, TrainConfig, fit

    log = logging.getLogger("jaxseq.training")  # fit's messages: resuming, evals, the summary
    log.addHandler(logging.StreamHandler())
    log.setLevel(logging.INFO)
    log.propagate = False  # importing Orbax gives the root logger a handler, which would print each line twice
    config = TrainConfig(out_dir=args.out, seed=args.seed, epochs=args.epochs, batch_size=args.batch_size,
                         learning_rate=args.lr, log_every=args.log_every, checkpoint_every=args.checkpoint_every,
                         best_metric=args.best_metric or None, restart=args.restart,
                         mixed_precision=args.mixed_precision, progress=not args.no_progress)
    train, evaluate = problem(args.seed, args.batch_size, examples=args.examples, slow=args.slow_data,
                              nan_batch=nan_batch)
    result = fit(config, init_params=init_params, loss_fn=loss_fn, train=train, evaluate=evaluate,
                 run_config={"model": "lstm-regressor", "hidden": HIDDEN, "examples": args.examples},
                 callbacks=[LossCurve(eval_metric=args.best_metric or None)])
    evals = [r for r in result.history if r["kind"] == "eval"]
    if evals:
        print(f"last eval loss {evals[-1]['loss']:.4f} at step {evals[-1]['step']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
