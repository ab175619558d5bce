"""`TrainConfig`: every setting of the loop besides the model and the data, and its validation."""
from __future__ import annotations

import dataclasses
import json
import os

import numpy as np

OPTIMIZERS = ("adam", "adamw", "sgd")
SCHEDULES = ("constant", "cosine", "warmup_cosine")
# The fields that build the optimizer from the config; a custom `tx` given to fit replaces all of them.
OPTIMIZER_FIELDS = ("learning_rate", "optimizer", "schedule", "warmup_steps", "weight_decay", "clip_norm")
# Fields that change the trajectory: resuming a checkpoint under different values would silently give a run
# that neither configuration describes, so a mismatch is an error (a new out_dir or restart=True fixes it).
TRAJECTORY_FIELDS = ("seed", "batch_size", *OPTIMIZER_FIELDS, "mixed_precision")


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """Everything the loop needs besides the model and data; the CLI maps its flags onto these fields."""

    out_dir: str  # run folder: checkpoints/, metrics.jsonl, run.lock; re-running with it resumes
    seed: int = 0  # seeds params init, the per-step dropout keys and (through the BatchSource) the data order
    epochs: int = 10  # passes over the training BatchSource; raising it on a finished run trains further
    batch_size: int = 32  # examples per step over all devices; must divide evenly over the devices used
    learning_rate: float = 1e-3  # peak learning rate (after warmup for warmup_cosine); unused with fit(tx=...)
    optimizer: str = "adam"  # "adam" | "adamw" | "sgd" (plain SGD, no momentum); unused with fit(tx=...)
    schedule: str = "constant"  # "constant" | "cosine" (decay to 0 over the run) | "warmup_cosine"; ditto
    warmup_steps: int = 0  # linear warmup steps for warmup_cosine
    weight_decay: float = 0.0  # decoupled decay for adamw, L2-style decayed weights for sgd; adam rejects it
    clip_norm: float | None = 1.0  # optax.clip_by_global_norm; RNNs explode without it. None disables
    eval_every: int | None = None  # steps; None = once per epoch
    checkpoint_every: int | None = None  # steps; None = once per epoch (always at least once per epoch)
    keep_checkpoints: int = 3  # the last N checkpoints are kept (plus the best one when best_metric is set)
    best_metric: str | None = None  # an eval metric name; keeps the best checkpoint too
    best_mode: str = "min"  # "min" | "max": which direction of best_metric is better
    max_bad_steps: int = 5  # consecutive non-finite steps before stopping
    restart: bool = False  # delete this run folder's checkpoints and metrics and start over
    mixed_precision: bool = False  # bfloat16 compute, float32 params (and float32 optimizer state)
    log_every: int = 50  # steps between metric records; each record costs one host sync
    progress: bool = True  # show a tqdm progress bar
    num_devices: int | None = None  # use the first N devices on the data axis; None = all
    distributed: bool = False  # call jax.distributed.initialize() first (several hosts; reads the cluster env)


def validate_config(config: TrainConfig, *, custom_tx: bool = False) -> None:
    """Raise a one-line ValueError naming the first bad field of `config`.

    With `custom_tx` the optimizer fields (`OPTIMIZER_FIELDS`) are not used, so they are not checked either.
    """
    def bad(field, expected):
        return ValueError(f"TrainConfig.{field}={getattr(config, field)!r}: expected {expected}")

    if not isinstance(config, TrainConfig):
        raise ValueError(f"config must be a TrainConfig, got {type(config).__name__}")
    if not isinstance(config.out_dir, (str, os.PathLike)) or not str(config.out_dir):
        raise bad("out_dir", "a folder path")
    for field in ("epochs", "batch_size", "keep_checkpoints", "max_bad_steps", "log_every"):
        value = getattr(config, field)
        if not isinstance(value, (int, np.integer)) or value < 1:
            raise bad(field, "a positive int")
    for field in ("eval_every", "checkpoint_every", "num_devices"):
        value = getattr(config, field)
        if value is not None and (not isinstance(value, (int, np.integer)) or value < 1):
            raise bad(field, "None or a positive int")
    if config.best_mode not in ("min", "max"):
        raise bad("best_mode", "'min' or 'max'")
    if config.best_metric is not None and not isinstance(config.best_metric, str):
        raise bad("best_metric", "None or the name of an evaluate() result")
    if custom_tx:
        return
    if not config.learning_rate > 0:
        raise bad("learning_rate", "> 0")
    if config.optimizer not in OPTIMIZERS:
        raise bad("optimizer", f"one of {OPTIMIZERS}")
    if config.schedule not in SCHEDULES:
        raise bad("schedule", f"one of {SCHEDULES}")
    if config.warmup_steps < 0:
        raise bad("warmup_steps", ">= 0")
    if config.weight_decay < 0:
        raise bad("weight_decay", ">= 0")
    if config.weight_decay and config.optimizer == "adam":
        raise bad("weight_decay", "0 with optimizer='adam' (use optimizer='adamw' for decoupled weight decay)")
    if config.clip_norm is not None and not config.clip_norm > 0:
        raise bad("clip_norm", "None or > 0")


def json_roundtrip(value, name: str):
    """Normalise to what JSON gives back (tuples become lists), so stored and current configs compare equal."""
    try:
        return json.loads(json.dumps(value))
    except TypeError as err:
        raise ValueError(f"{name} must be JSON-serialisable: {err}") from None
