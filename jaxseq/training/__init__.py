"""One training loop for every task: jitted steps, Orbax checkpoints with exact resume, many devices, NaN guard.

One concern a module, all re-exported here:

- `config`: `TrainConfig`, the loop's settings.
- `data`: `BatchSource` (random-access batches, a pure function of (seed, epoch, index)) and `ArrayBatches`.
- `state`: `TrainState`, `make_optimizer` (optax adam | adamw | sgd, constant | cosine | warmup_cosine, clipping),
  the jitted `make_train_step` (state donated, non-finite steps not applied) and `make_eval_step`/`make_eval_fn`.
- `distributed`: `make_mesh`, `put_batch`, `replicate`, `initialize_distributed` (one `data` axis).
- `checkpoints`: Orbax checkpoints; `restore_params`, `load_run_config`; damaged checkpoints are walked past.
- `records`: metrics.jsonl (and TensorBoard when installed).
- `callbacks`: `Callback` hooks, `LambdaCallback` (hooks from functions) and `LossCurve` (loss.png).
- `lock`: `RunFolderLock`, one training process per run folder (`RunFolderBusy` otherwise).
- `loop`: `fit`, `FitResult`, `NonFiniteError`.

Example::

    config = TrainConfig(out_dir="runs/demo", epochs=3, batch_size=32)
    train = ArrayBatches({"x": x, "y": y}, config.batch_size, seed=config.seed)
    result = fit(config, init_params=init, loss_fn=loss, train=train, run_config={"hidden": 64},
                 callbacks=[LossCurve()])
    params = restore_params("runs/demo", init)
"""
from jaxseq.training.callbacks import Callback, FitResult, LambdaCallback, LossCurve
from jaxseq.training.checkpoints import CheckpointUnreadable, load_run_config, restore_params
from jaxseq.training.config import OPTIMIZER_FIELDS, OPTIMIZERS, SCHEDULES, TRAJECTORY_FIELDS, TrainConfig
from jaxseq.training.data import ArrayBatches, BatchSource
from jaxseq.training.distributed import initialize_distributed, make_mesh, put_batch, replicate
from jaxseq.training.lock import RunFolderBusy, RunFolderLock
from jaxseq.training.loop import NonFiniteError, fit
from jaxseq.training.state import (LossFn, Params, TrainState, create_train_state, injected_learning_rate,
                                   make_eval_fn, make_eval_step, make_optimizer, make_train_step)

__all__ = [
    "ArrayBatches", "BatchSource", "Callback", "CheckpointUnreadable", "FitResult", "LambdaCallback", "LossCurve", "LossFn",
    "NonFiniteError", "OPTIMIZERS", "OPTIMIZER_FIELDS", "Params", "RunFolderBusy", "RunFolderLock", "SCHEDULES",
    "TRAJECTORY_FIELDS", "TrainConfig", "TrainState", "create_train_state", "fit", "initialize_distributed",
    "injected_learning_rate", "load_run_config", "make_eval_fn", "make_eval_step", "make_mesh", "make_optimizer",
    "make_train_step", "put_batch", "replicate", "restore_params",
]
