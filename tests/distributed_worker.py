"""One process of tests/test_distributed.py: a small data-parallel `fit` over the processes the environment names.

Usage: python tests/distributed_worker.py OUT_DIR RESULT_JSON

With JAX_COORDINATOR_ADDRESS, JAXSEQ_NUM_PROCESSES and JAXSEQ_PROCESS_ID set, the run is distributed (one CPU
device per process); without them it is the one-process reference. WORKER_KILL_AT="epoch,index" makes the
process SIGKILL itself when the loop asks for that batch, i.e. mid-run, after the checkpoints before it.
The result file holds the train losses and the final params as lists.
"""
import json
import logging
import os
import signal
import sys

import numpy as np

from jaxseq.training import ArrayBatches, TrainConfig, fit, make_eval_fn

# fit reports through the "jaxseq.training" logger; the test reads its lines from this process's output.
logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stdout)

EPOCHS, BATCH, EXAMPLES, FEATURES, HIDDEN = 2, 8, 48, 3, 5  # 6 steps per epoch, 12 in all


def data(seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(EXAMPLES, FEATURES)).astype(np.float32)
    return {"x": x, "y": np.sin(x.sum(axis=1, keepdims=True)).astype(np.float32)}


def init_params(key):
    import jax

    k1, k2 = jax.random.split(key)
    return {"w": 0.5 * jax.random.normal(k1, (FEATURES, HIDDEN)), "v": 0.5 * jax.random.normal(k2, (HIDDEN, 1))}


def loss_fn(params, batch, dropout_key):
    import jax.numpy as jnp

    del dropout_key
    pred = jnp.tanh(batch["x"] @ params["w"]) @ params["v"]
    return jnp.mean((pred - batch["y"]) ** 2), {}


class KillAt:
    """The training BatchSource, but the process SIGKILLs itself when asked for one batch."""

    def __init__(self, source: ArrayBatches, at: tuple[int, int] | None):
        self.source, self.at, self.batch_size = source, at, source.batch_size

    def num_batches(self, epoch):
        return self.source.num_batches(epoch)

    def batch(self, epoch, index):
        if (epoch, index) == self.at:
            os.kill(os.getpid(), signal.SIGKILL)
        return self.source.batch(epoch, index)


def main(out_dir: str, result_path: str) -> None:
    kill = os.environ.get("WORKER_KILL_AT")
    at = tuple(int(v) for v in kill.split(",")) if kill else None
    config = TrainConfig(out_dir=out_dir, epochs=EPOCHS, batch_size=BATCH, learning_rate=0.05, checkpoint_every=4,
                         keep_checkpoints=2, log_every=1, progress=False,
                         distributed="JAX_COORDINATOR_ADDRESS" in os.environ)
    train = KillAt(ArrayBatches(data(0), BATCH, seed=config.seed), at)
    evaluate = make_eval_fn(loss_fn, ArrayBatches(data(1), BATCH, seed=0, shuffle=False))
    result = fit(config, init_params=init_params, loss_fn=loss_fn, train=train, evaluate=evaluate)
    import jax

    losses = {r["step"]: r["loss"] for r in result.history if r["kind"] == "train"}
    evals = {r["step"]: r["loss"] for r in result.history if r["kind"] == "eval"}
    params = {name: np.asarray(value).tolist() for name, value in result.params.items()}
    with open(result_path, "w") as f:
        json.dump({"process_index": jax.process_index(), "process_count": jax.process_count(),
                   "step": result.step, "losses": losses, "evals": evals, "params": params}, f)


if __name__ == "__main__":
    main(*sys.argv[1:])
