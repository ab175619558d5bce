"""One training loop for every task: jitted steps, Orbax checkpoints with exact resume, many devices, NaN guard.

The pieces, from the inside out:

- `TrainState` (params, optimizer state, step, RNG key) and `make_train_step`: one jitted
  `train_step(state, batch) -> (state, metrics)` with the state donated. A step whose loss or gradients are not
  finite is not applied (selected away inside the jitted step, so no host sync per step is needed).
- `make_optimizer`: optax adam | adamw | sgd, a constant | cosine | warmup_cosine schedule and
  `clip_by_global_norm`.
- `make_mesh`, `put_batch`: a `jax.sharding.Mesh` with one `data` axis; batches are split over it with a
  `NamedSharding`, params are replicated. The same call runs on 1 CPU, 8 GPUs or a TPU slice.
- `fit`: the loop. Progress bar (tqdm), metrics as JSON lines in `out_dir/metrics.jsonl` (and TensorBoard when
  tensorboardX is installed), periodic evaluation, Orbax checkpoints (last N + best by a metric) holding the
  state, the data position (epoch, batch index) and the configs, a save on SIGTERM/Ctrl-C, a loss-curve PNG and
  a summary line at the end. Re-running with the same `out_dir` resumes from the last checkpoint and gives the
  same losses, bit for bit on CPU, as a run never interrupted, because the data order is a pure function of
  (seed, epoch, index) and the dropout key of step s is `fold_in(key, s)`.
- `restore_params`, `load_run_config`: read a finished (or running) run folder back.

Example::

    config = TrainConfig(out_dir="runs/demo", epochs=3, batch_size=32)
    train = ArrayBatches({"x": x, "y": y}, config.batch_size, seed=config.seed)
    result = fit(config, init_params=init, loss_fn=loss, train=train, run_config={"hidden": 64})
    params = restore_params("runs/demo", init)
"""
from __future__ import annotations

import dataclasses
import functools
import json
import logging
import os
import pathlib
import platform
import shutil
import signal
import sys
import threading
import time
import warnings
from typing import Any, Callable, NamedTuple, Protocol

import jax
import jax.numpy as jnp
import numpy as np
import optax

Params = Any
LossFn = Callable[[Params, dict, Any], tuple[jax.Array, dict]]

OPTIMIZERS = ("adam", "adamw", "sgd")
SCHEDULES = ("constant", "cosine", "warmup_cosine")
# Fields that change the trajectory: resuming a checkpoint under different values would silently give a run
# that neither configuration describes, so a mismatch is an error (a new out_dir or restart=True fixes it).
_TRAJECTORY_FIELDS = ("seed", "batch_size", "learning_rate", "optimizer", "schedule", "warmup_steps",
                      "weight_decay", "clip_norm", "mixed_precision")


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """Everything the loop needs besides the model and data; the CLI maps its flags onto these fields."""

    out_dir: str  # run folder: checkpoints/, metrics.jsonl, loss.png; re-running with it resumes
    seed: int = 0  # seeds params init, the per-step dropout keys and (through the BatchSource) the data order
    epochs: int = 10  # passes over the training BatchSource; raising it on a finished run trains further
    batch_size: int = 32  # examples per step over all devices; must divide evenly over the devices used
    learning_rate: float = 1e-3  # peak learning rate (after warmup for warmup_cosine)
    optimizer: str = "adam"  # "adam" | "adamw" | "sgd" (plain SGD, no momentum)
    schedule: str = "constant"  # "constant" | "cosine" (decay to 0 over the run) | "warmup_cosine"
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


class BatchSource(Protocol):
    """Training data as random access: the batch order is a pure function of (seed, epoch, index).

    That purity is what makes resume exact: a restarted run asks for batch (epoch, index) and gets the bytes the
    killed run would have seen, with no iterator state to save.
    """

    def num_batches(self, epoch: int) -> int: ...

    def batch(self, epoch: int, index: int) -> dict[str, np.ndarray]: ...


class ArrayBatches:
    """`BatchSource` over a dict of equal-length numpy arrays, reshuffled each epoch from (seed, epoch).

    Args:
      arrays: name -> array, all with the same leading (example) dimension, e.g. x `[examples, time, features]`.
      batch_size: examples per batch.
      seed: seeds the per-epoch permutation (`np.random.default_rng([seed, epoch])`).
      shuffle: False keeps the stored order (evaluation).
      drop_remainder: True drops the last partial batch, so every batch has the same shape (one compilation)
        and divides over the devices; False keeps it.
    """

    def __init__(self, arrays: dict[str, np.ndarray], batch_size: int, *, seed: int, shuffle: bool = True,
                 drop_remainder: bool = True):
        if not isinstance(arrays, dict) or not arrays:
            raise ValueError(f"arrays must be a non-empty dict of name -> array, got {type(arrays).__name__}")
        lengths = {name: np.shape(a)[0] if np.ndim(a) else None for name, a in arrays.items()}
        if None in lengths.values() or len(set(lengths.values())) != 1:
            raise ValueError(f"arrays must all have the same leading (example) dimension, got lengths {lengths}")
        if not isinstance(batch_size, (int, np.integer)) or batch_size < 1:
            raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
        self.arrays = {name: np.asarray(a) for name, a in arrays.items()}
        self.num_examples = next(iter(lengths.values()))
        self.batch_size = int(batch_size)
        self.seed = seed
        self.shuffle = shuffle
        self.drop_remainder = drop_remainder
        if self.num_batches(0) == 0:
            raise ValueError(f"{self.num_examples} examples make no full batch of batch_size={batch_size}; "
                             "lower batch_size or pass drop_remainder=False")

    def num_batches(self, epoch: int) -> int:
        del epoch  # the same count every epoch
        if self.drop_remainder:
            return self.num_examples // self.batch_size
        return -(-self.num_examples // self.batch_size)

    def order(self, epoch: int) -> np.ndarray:
        """Example indices of `epoch`, int64 `[examples]`."""
        if not self.shuffle:
            return np.arange(self.num_examples)
        return np.random.default_rng([self.seed, epoch]).permutation(self.num_examples)

    def batch(self, epoch: int, index: int) -> dict[str, np.ndarray]:
        n = self.num_batches(epoch)
        if not 0 <= index < n:
            raise IndexError(f"batch index {index} out of range: epoch {epoch} has {n} batches")
        rows = self.order(epoch)[index * self.batch_size:(index + 1) * self.batch_size]
        return {name: a[rows] for name, a in self.arrays.items()}


@functools.partial(jax.tree_util.register_dataclass, data_fields=["params", "opt_state", "step", "key"],
                   meta_fields=[])
@dataclasses.dataclass(frozen=True)
class TrainState:
    """Everything that changes during training, as one pytree (jit, donation, sharding and Orbax take it whole).

    params: the model params (float32 even under mixed precision).
    opt_state: the optax state.
    step: int32 scalar, the number of batches consumed (applied or skipped as non-finite).
    key: raw uint32 PRNG key; the dropout key of step s is `fold_in(key, s)`, so it never needs to advance.
    """

    params: Params
    opt_state: Any
    step: jax.Array
    key: jax.Array

    def replace(self, **changes) -> TrainState:
        return dataclasses.replace(self, **changes)


class FitResult(NamedTuple):
    params: Params  # final params (replicated jax arrays)
    step: int  # steps done in total, over all resumes
    history: list[dict]  # the records of metrics.jsonl (train, eval and non-finite records), oldest first
    already_finished: bool  # True when the run folder held a finished run and nothing was trained


class NonFiniteError(FloatingPointError):
    """Training stopped after `max_bad_steps` consecutive steps with a non-finite loss or gradients."""


def create_train_state(params: Params, tx: optax.GradientTransformation, key: jax.Array) -> TrainState:
    return TrainState(params=params, opt_state=tx.init(params), step=jnp.zeros((), jnp.int32),
                      key=jnp.asarray(key))


def make_optimizer(config: TrainConfig, total_steps: int) -> tuple[optax.GradientTransformation, optax.Schedule]:
    """The optax chain (clip, then the optimizer with its schedule) and the schedule (for logging the lr)."""
    lr = config.learning_rate
    if config.schedule == "constant":
        schedule = optax.constant_schedule(lr)
    elif config.schedule == "cosine":
        schedule = optax.cosine_decay_schedule(lr, decay_steps=max(total_steps, 1))
    else:
        schedule = optax.warmup_cosine_decay_schedule(0.0, lr, warmup_steps=config.warmup_steps,
                                                      decay_steps=max(total_steps, config.warmup_steps + 1))
    if config.optimizer == "adam":
        opt = optax.adam(schedule)
    elif config.optimizer == "adamw":
        opt = optax.adamw(schedule, weight_decay=config.weight_decay)
    else:
        opt = optax.sgd(schedule)
        if config.weight_decay:
            opt = optax.chain(optax.add_decayed_weights(config.weight_decay), opt)
    parts = [opt] if config.clip_norm is None else [optax.clip_by_global_norm(config.clip_norm), opt]
    return optax.chain(*parts), schedule


def _cast_floats(tree, dtype):
    return jax.tree.map(lambda x: x.astype(dtype) if jnp.issubdtype(jnp.result_type(x), jnp.floating) else x, tree)


def _compute_loss(loss_fn: LossFn, params, batch, key, mixed_precision: bool):
    """loss_fn under the precision policy: bf16 params and float inputs in, float32 loss and metrics out.

    The cast sits inside the differentiated function, so gradients come back float32 like the params.
    """
    if mixed_precision:
        params, batch = _cast_floats(params, jnp.bfloat16), _cast_floats(batch, jnp.bfloat16)
    loss, aux = loss_fn(params, batch, key)
    aux = {name: jnp.mean(jnp.asarray(value, jnp.float32)) for name, value in dict(aux or {}).items()}
    return jnp.asarray(loss, jnp.float32), aux


def make_train_step(loss_fn: LossFn, tx: optax.GradientTransformation, *, mixed_precision: bool = False,
                    donate: bool = True) -> Callable[[TrainState, dict], tuple[TrainState, dict]]:
    """Jitted `train_step(state, batch) -> (state, metrics)`; the input state is donated (its buffers reused).

    `loss_fn(params, batch, dropout_key) -> (scalar loss, dict of scalar metrics)`. The returned metrics hold
    `loss`, `grad_norm`, `finite` (bool) and the loss_fn's metrics. When the loss or any gradient is not
    finite the params and optimizer state are kept as they were (a select inside the step: the update is
    computed anyway for the good case, so this costs one elementwise select and no host round trip); the step
    counter still advances, since it counts consumed batches.
    """
    def step(state: TrainState, batch: dict):
        dropout_key = jax.random.fold_in(state.key, state.step)
        (loss, aux), grads = jax.value_and_grad(
            lambda p: _compute_loss(loss_fn, p, batch, dropout_key, mixed_precision), has_aux=True)(state.params)
        finite = jnp.isfinite(loss)
        for g in jax.tree.leaves(grads):
            finite &= jnp.all(jnp.isfinite(g))
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)

        def keep_if_finite(new, old):
            return jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, old)

        state = state.replace(params=keep_if_finite(params, state.params),
                              opt_state=keep_if_finite(opt_state, state.opt_state), step=state.step + 1)
        grad_norm = jnp.sqrt(sum(jnp.sum(jnp.square(g.astype(jnp.float32))) for g in jax.tree.leaves(grads)))
        metrics = {**aux, "loss": loss, "grad_norm": grad_norm, "finite": finite}
        return state, metrics

    return jax.jit(step, donate_argnums=(0,) if donate else ())


@functools.lru_cache(maxsize=8)
def _cached_optimizer_and_step(loss_fn, config: TrainConfig, total_steps: int):
    tx, schedule = make_optimizer(config, total_steps)
    return tx, schedule, make_train_step(loss_fn, tx, mixed_precision=config.mixed_precision)


def _optimizer_and_step(loss_fn, config: TrainConfig, total_steps: int):
    """make_optimizer + make_train_step, reused across fit calls with the same loss_fn and trajectory settings.

    A new jitted function would compile again; reusing it makes re-running fit (resume, more epochs, a notebook
    cell run twice) start at once.
    """
    if config.schedule == "constant":
        total_steps = 0  # the step count only shapes decaying schedules
    key = TrainConfig(out_dir="", **{name: getattr(config, name) for name in _TRAJECTORY_FIELDS if name != "seed"})
    try:
        return _cached_optimizer_and_step(loss_fn, key, total_steps)
    except TypeError:  # an unhashable loss_fn (e.g. a callable object): build afresh
        return _cached_optimizer_and_step.__wrapped__(loss_fn, key, total_steps)


def make_eval_step(loss_fn: LossFn, *, mixed_precision: bool = False) -> Callable[[Params, dict], dict]:
    """Jitted `eval_step(params, batch) -> {"loss": ..., **metrics}`; loss_fn gets `dropout_key=None`.

    A key of None is the signal for deterministic evaluation: a loss_fn with dropout must skip it then.
    """
    def step(params, batch):
        loss, aux = _compute_loss(loss_fn, params, batch, None, mixed_precision)
        return {**aux, "loss": loss}

    return jax.jit(step)


def make_eval_fn(loss_fn: LossFn, source: BatchSource, *, mixed_precision: bool = False
                 ) -> Callable[[Params], dict[str, float]]:
    """An `evaluate(params) -> {name: float}` for `fit`: example-weighted means of eval_step over epoch 0.

    Build an `ArrayBatches` eval source with `drop_remainder=False`, or its last partial batch is left out.
    """
    eval_step = make_eval_step(loss_fn, mixed_precision=mixed_precision)
    if isinstance(source, ArrayBatches) and source.drop_remainder and source.num_examples % source.batch_size:
        warnings.warn(f"make_eval_fn: the eval source leaves out {source.num_examples % source.batch_size} of its "
                      f"{source.num_examples} examples (batch_size={source.batch_size}, drop_remainder=True); build "
                      "it with drop_remainder=False to evaluate all of them", stacklevel=2)

    def evaluate(params) -> dict[str, float]:
        totals: dict[str, float] = {}
        count = 0
        for index in range(source.num_batches(0)):
            batch = source.batch(0, index)
            n = len(next(iter(batch.values())))
            for name, value in jax.device_get(eval_step(params, batch)).items():
                totals[name] = totals.get(name, 0.0) + float(value) * n
            count += n
        return {name: total / count for name, total in totals.items()}

    return evaluate


# --- devices -------------------------------------------------------------------------------------------------

def initialize_distributed() -> None:
    """`jax.distributed.initialize()` once, for several hosts (or several processes on one).

    On a cluster that JAX detects (SLURM, Open MPI, Kubernetes, Cloud TPU) it reads everything from there.
    Elsewhere run the same command on every host with JAX_COORDINATOR_ADDRESS=host:port of process 0 (JAX reads
    it), JAXSEQ_NUM_PROCESSES and JAXSEQ_PROCESS_ID (0 .. N-1): JAX reads no variable for these two, so they are
    passed on from here. See docs/distributed.md.

    It must run before any other JAX call in the process: call it first thing, or set TrainConfig.distributed
    and make fit the first thing that touches JAX.
    """
    if jax.distributed.is_initialized():
        return
    given = {}
    for variable, argument in (("JAXSEQ_NUM_PROCESSES", "num_processes"), ("JAXSEQ_PROCESS_ID", "process_id")):
        value = os.environ.get(variable)
        if value is not None:
            try:
                given[argument] = int(value)
            except ValueError:
                raise ValueError(f"{variable}={value!r}: expected an int") from None
    jax.distributed.initialize(**given)


def make_mesh(num_devices: int | None = None) -> jax.sharding.Mesh:
    """A 1-D mesh with axis `data` over the first `num_devices` devices (all when None)."""
    devices = jax.devices()
    if num_devices is not None:
        if not 1 <= num_devices <= len(devices):
            raise ValueError(f"num_devices={num_devices} but {len(devices)} device(s) are available")
        devices = devices[:num_devices]
    return jax.sharding.Mesh(np.asarray(devices), ("data",))


def replicate(tree, mesh: jax.sharding.Mesh):
    """Copy every leaf to every device of the mesh (params and optimizer state are small next to activations)."""
    return jax.device_put(tree, jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec()))


def put_batch(batch: dict, mesh: jax.sharding.Mesh) -> dict:
    """Split a host batch `{name: [batch, ...]}` over the mesh's `data` axis.

    The batch dimension must divide evenly over the devices: a ragged batch is an error rather than padded,
    because padding would need a mask in every loss_fn to keep the loss unchanged.
    """
    sizes = {name: np.shape(v)[0] if np.ndim(v) else None for name, v in batch.items()}
    if None in sizes.values() or len(set(sizes.values())) != 1:
        raise ValueError(f"batch arrays must share a leading batch dimension, got {sizes}")
    size = next(iter(sizes.values()))
    devices = mesh.devices.size
    if size % devices:
        raise ValueError(f"batch of {size} examples does not divide over {devices} devices on the 'data' axis; "
                         f"use a batch_size that is a multiple of {devices} (or drop_remainder=True), or set "
                         "num_devices")
    sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data"))
    if jax.process_count() == 1:
        return jax.device_put(batch, sharding)
    # Several hosts: every host builds the same global batch; each contributes its own contiguous slice.
    per_host = size // jax.process_count()
    lo = jax.process_index() * per_host
    return {name: jax.make_array_from_process_local_data(sharding, np.asarray(v)[lo:lo + per_host], np.shape(v))
            for name, v in batch.items()}


# --- run folder and checkpoints ------------------------------------------------------------------------------

def _validate_config(config: TrainConfig) -> None:
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
    if config.best_mode not in ("min", "max"):
        raise bad("best_mode", "'min' or 'max'")
    if config.best_metric is not None and not isinstance(config.best_metric, str):
        raise bad("best_metric", "None or the name of an evaluate() result")


def _prepare_out_dir(out_dir) -> pathlib.Path:
    """Create the run folder and prove it is writable before any compute is spent.

    Returns the absolute path: Orbax refuses relative checkpoint paths.
    """
    path = pathlib.Path(out_dir).absolute()
    try:
        path.mkdir(parents=True, exist_ok=True)
        # One probe file per process: processes sharing the folder (several hosts on one file system) would
        # otherwise delete each other's probe and report a writable folder as unwritable.
        probe = path / f".write_test-{platform.node()}-{os.getpid()}"
        probe.write_text("ok")
        probe.unlink()
    except OSError as err:
        raise ValueError(f"TrainConfig.out_dir={str(out_dir)!r} is not a writable folder: {err}") from None
    return path


def _json_roundtrip(value, name: str):
    """Normalise to what JSON gives back (tuples become lists), so stored and current configs compare equal."""
    try:
        return json.loads(json.dumps(value))
    except TypeError as err:
        raise ValueError(f"{name} must be JSON-serialisable: {err}") from None


def _path_str(path) -> str:
    parts = []
    for k in path:
        for attr in ("key", "idx", "name"):
            if hasattr(k, attr):
                parts.append(str(getattr(k, attr)))
                break
        else:
            parts.append(str(k))
    return "/".join(parts)


def _shapes(tree) -> list[tuple[str, tuple]]:
    leaves = jax.tree_util.tree_flatten_with_path(tree, is_leaf=lambda x: hasattr(x, "shape"))[0]
    return [(_path_str(p), tuple(x.shape)) for p, x in leaves if hasattr(x, "shape")]


def _diff_dicts(stored, current, prefix: str = "") -> list[str]:
    """``["key.sub: <stored> in the checkpoint vs <current> now", ...]``: the leaves where nested dicts differ."""
    if isinstance(stored, dict) and isinstance(current, dict):
        problems = []
        for key in sorted(set(stored) | set(current), key=str):
            name = f"{prefix}.{key}" if prefix else str(key)
            if key not in stored or key not in current:
                problems.append(f"{name}: {stored.get(key, '<absent>')!r} in the checkpoint vs "
                                f"{current.get(key, '<absent>')!r} now")
            else:
                problems += _diff_dicts(stored[key], current[key], name)
        return problems
    return [] if stored == current else [f"{prefix}: {stored!r} in the checkpoint vs {current!r} now"]


def _diff_shapes(stored: list, current: list) -> list[str]:
    # Container types can differ (Orbax stores a tuple as a list), so compare the leaf shapes in order first.
    if [s for _, s in stored] == [s for _, s in current]:
        return []
    stored_map, current_map = dict(stored), dict(current)
    problems = [f"'{p}' has shape {stored_map[p]} in the checkpoint but {current_map[p]} in the model"
                for p in stored_map if p in current_map and stored_map[p] != current_map[p]]
    missing = [p for p in current_map if p not in stored_map]
    extra = [p for p in stored_map if p not in current_map]
    if missing:
        problems.append(f"in the model but not the checkpoint: {missing[:8]}")
    if extra:
        problems.append(f"in the checkpoint but not the model: {extra[:8]}")
    return problems or ["the parameter trees differ in structure"]


class _Checkpoints:
    """Orbax CheckpointManager over out_dir/checkpoints: items `state` (arrays) and `meta` (JSON)."""

    def __init__(self, directory: pathlib.Path, *, keep: int = 3, best_metric: str | None = None,
                 best_mode: str = "min", read_only: bool = False):
        import orbax.checkpoint as ocp
        from orbax.checkpoint import checkpoint_managers as cm

        self.ocp = ocp
        self.directory = directory
        self.best_metric = best_metric
        policies = [cm.LatestN(n=keep)]
        best = {}
        if best_metric:
            worst = float("inf") if best_mode == "min" else float("-inf")

            def metric(m):
                return m.get(best_metric, worst)  # checkpoints of an earlier run that tracked another metric
            policies.append(cm.BestN(get_metric_fn=metric, reverse=best_mode == "min", n=1,
                                     keep_checkpoints_without_metrics=False))
            best = dict(best_fn=metric, best_mode=best_mode)
        # A read-only manager (restoring for eval/predict) makes Orbax warn, from both the options and the manager,
        # that the folder is read only and saving is off: both intended here, so those warnings are silenced.
        absl_logger = logging.getLogger("absl")
        level = absl_logger.level
        if read_only:
            absl_logger.setLevel(logging.ERROR)
        try:
            options = ocp.CheckpointManagerOptions(
                preservation_policy=cm.AnyPreservationPolicy(policies),
                # Synchronous saves: the next train_step donates (reuses) the state buffers, and a save that has
                # returned is on disk, which is what the SIGTERM handler and the kill test rely on.
                enable_async_checkpointing=False,
                cleanup_tmp_directories=not read_only,  # leftovers of a save cut short by SIGKILL
                create=not read_only, read_only=read_only, **best)
            self.manager = ocp.CheckpointManager(
                directory, options=options,
                item_handlers={"state": ocp.StandardCheckpointHandler(), "meta": ocp.JsonCheckpointHandler()})
        finally:
            absl_logger.setLevel(level)

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def best_step(self) -> int | None:
        return self.manager.best_step()

    def meta(self, step: int) -> dict:
        args = self.ocp.args.Composite(meta=self.ocp.args.JsonRestore())
        return self.manager.restore(step, args=args)["meta"]

    def state_shapes(self, step: int) -> dict:
        return self.manager.item_metadata(step)["state"].tree

    def restore_state(self, step: int, abstract_state: dict) -> dict:
        args = self.ocp.args.Composite(state=self.ocp.args.StandardRestore(abstract_state))
        return self.manager.restore(step, args=args)["state"]

    def save(self, step: int, state: TrainState, meta: dict, metrics: dict | None) -> None:
        if self.latest_step() == step:
            return  # e.g. an epoch end that is also a checkpoint_every step
        items = {"params": state.params, "opt_state": state.opt_state, "step": state.step, "key": state.key}
        args = self.ocp.args.Composite(state=self.ocp.args.StandardSave(items), meta=self.ocp.args.JsonSave(meta))
        self.manager.save(step, args=args, metrics=metrics, force=True)

    def close(self) -> None:
        self.manager.close()


def _open_existing(out_dir) -> tuple[_Checkpoints, int, dict]:
    directory = pathlib.Path(out_dir).absolute() / "checkpoints"
    if not directory.is_dir():
        raise FileNotFoundError(f"no checkpoints in {str(out_dir)!r}: {directory} does not exist")
    probe = _Checkpoints(directory, read_only=True)
    latest = probe.latest_step()
    if latest is None:
        raise FileNotFoundError(f"no checkpoints in {str(directory)!r}")
    meta = probe.meta(latest)
    probe.close()
    train_config = meta.get("train_config", {})
    ckpt = _Checkpoints(directory, best_metric=train_config.get("best_metric"),
                        best_mode=train_config.get("best_mode", "min"), read_only=True)
    return ckpt, latest, meta


def _abstract(tree, sharding):
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding), tree)


def load_run_config(out_dir: str) -> dict:
    """The `run_config` stored with the latest checkpoint of a run folder."""
    ckpt, _, meta = _open_existing(out_dir)
    ckpt.close()
    return meta["run_config"]


def restore_params(out_dir: str, init_params: Callable[[jax.Array], Params] | None = None, *,
                   which: str = "best") -> Params:
    """Params from a run folder's checkpoint.

    Args:
      out_dir: the run folder given to `fit`.
      init_params: the model's init (key -> params). When given, the checkpoint's parameter shapes are checked
        against it first (a clear error names any mismatch) and the result has its exact tree type.
      which: "best" (by the run's best_metric; the latest when it had none) or "latest".

    Returns: the params on the default device.
    """
    if which not in ("best", "latest"):
        raise ValueError(f"which={which!r}: expected 'best' or 'latest'")
    ckpt, latest, _ = _open_existing(out_dir)
    try:
        step = (ckpt.best_step() if which == "best" else None) or latest
        device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
        stored = ckpt.state_shapes(step)
        abstract = _abstract(stored, device)
        if init_params is not None:
            current = jax.eval_shape(init_params, jax.ShapeDtypeStruct((2,), jnp.uint32))
            problems = _diff_shapes(_shapes(stored["params"]), _shapes(current))
            if problems:
                raise ValueError(f"checkpoint {ckpt.directory} (step {step}) does not fit this model: "
                                 + "; ".join(problems))
            abstract["params"] = _abstract(current, device)
        return ckpt.restore_state(step, abstract)["params"]
    finally:
        ckpt.close()


# --- the loop --------------------------------------------------------------------------------------------------

class _StopSignal:
    """Turns SIGTERM/SIGINT into a flag checked between steps, so the loop can save before it exits.

    A second Ctrl-C falls through to Python's default handler (KeyboardInterrupt at once).
    """

    def __init__(self):
        self.signum: int | None = None
        self.previous: dict = {}

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for signum in (signal.SIGTERM, signal.SIGINT):
                self.previous[signum] = signal.signal(signum, self._handle)
        return self

    def _handle(self, signum, frame):
        del frame
        self.signum = signum
        signal.signal(signal.SIGINT, signal.default_int_handler)

    def __exit__(self, *exc):
        for signum, handler in self.previous.items():
            signal.signal(signum, handler)


class _Recorder:
    """Collects per-step device metrics and writes them as JSON lines every log_every steps (one host sync)."""

    def __init__(self, out: pathlib.Path, history: list[dict], primary: bool, progress):
        self.path = out / "metrics.jsonl"
        self.history = history
        self.primary = primary
        self.progress = progress
        self.pending: list[tuple[int, int, int, dict]] = []  # (step, epoch, index, device metrics)
        self.bad_streak: list[tuple[int, int, int]] = []
        self.last_time = time.perf_counter()
        self.writer = None
        if primary:
            try:
                import tensorboardX
                self.writer = tensorboardX.SummaryWriter(str(out / "tensorboard"))
            except ImportError:
                pass  # TensorBoard is an optional extra (`pip install jaxseq[tb]`)

    def add(self, step: int, epoch: int, index: int, metrics: dict) -> None:
        self.pending.append((step, epoch, index, metrics))

    def write(self, record: dict) -> None:
        self.history.append(record)
        if not self.primary:
            return
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")
        if self.writer is not None:
            for name, value in record.items():
                if name not in ("kind", "step") and isinstance(value, (int, float)):
                    self.writer.add_scalar(f"{record['kind']}/{name}", value, record["step"])

    def flush(self, lr: float) -> None:
        """Write one train record for the pending steps; track the non-finite streak."""
        if not self.pending:
            return
        values = jax.device_get([m for *_, m in self.pending])
        now = time.perf_counter()
        good = []
        for (step, epoch, index, _), m in zip(self.pending, values):
            if bool(m["finite"]):
                self.bad_streak = []
                good.append(m)
            else:
                self.bad_streak.append((step, epoch, index))
                self.write({"kind": "nonfinite", "step": step, "epoch": epoch, "batch": index,
                            "loss": float(m["loss"]), "grad_norm": float(m["grad_norm"])})
        step, epoch = self.pending[-1][0], self.pending[-1][1]
        record = {"kind": "train", "step": step, "epoch": epoch}
        if good:
            for name in good[0]:
                if name != "finite":
                    record[name] = float(np.mean([g[name] for g in good]))
        record.update(lr=float(lr), bad_steps=len(values) - len(good),
                      steps_per_s=len(values) / max(now - self.last_time, 1e-9))
        self.write(record)
        if "loss" in record and self.progress is not None:
            self.progress.set_postfix(loss=f"{record['loss']:.4g}", refresh=False)
        self.pending = []
        self.last_time = now

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


def _read_history(path: pathlib.Path, upto: int, primary: bool) -> list[dict]:
    """Records up to step `upto` (the checkpoint being resumed); later ones belong to lost work and go."""
    if not path.exists():
        return []
    records = []
    for line in path.read_text().splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue  # a line cut short by SIGKILL
        if record.get("step", 0) <= upto:
            records.append(record)
    if primary:
        tmp = path.with_suffix(".jsonl.tmp")
        tmp.write_text("".join(json.dumps(r) + "\n" for r in records))
        tmp.replace(path)
    return records


def _plot_history(history: list[dict], path: pathlib.Path, best_metric: str | None) -> None:
    from jaxseq.plots import loss_curve

    train = [r for r in history if r["kind"] == "train" and "loss" in r]
    if not train:
        return
    evals = [r for r in history if r["kind"] == "eval"]
    name = "loss" if any("loss" in r for r in evals) else best_metric
    evals = [r for r in evals if name and name in r]
    loss_curve([r["step"] for r in train], [r["loss"] for r in train], path,
               eval_steps=[r["step"] for r in evals] or None, eval_values=[r[name] for r in evals] or None,
               eval_label=f"eval {name}")


def fit(config: TrainConfig, *, init_params: Callable[[jax.Array], Params], loss_fn: LossFn, train: BatchSource,
        evaluate: Callable[[Params], dict[str, float]] | None = None, run_config: dict | None = None) -> FitResult:
    """Train, checkpoint and log into `config.out_dir`; resume when it already holds a run.

    Args:
      config: the loop settings (see `TrainConfig`).
      init_params: key -> params pytree (float32).
      loss_fn: `(params, batch, dropout_key) -> (scalar loss, {name: scalar})`, traced inside the jitted step;
        batch is the `BatchSource` dict, split over the devices along its leading `[batch, ...]` dimension.
      train: the training data (`BatchSource`; `ArrayBatches` for arrays in memory).
      evaluate: host-side `params -> {name: float}`, called every `eval_every` steps (or each epoch end);
        `make_eval_fn` builds one from a loss_fn and a BatchSource.
      run_config: JSON-able description of the model/task, stored with every checkpoint; resuming under a
        different one is an error naming the differing keys.

    Returns:
      FitResult(params, step, history, already_finished).

    Raises:
      ValueError: bad config, an unwritable out_dir, a batch that does not divide over the devices, or a
        checkpoint folder written by another model/config.
      NonFiniteError: `max_bad_steps` consecutive non-finite steps, or training ending on non-finite steps;
        the last good checkpoint is kept.
      KeyboardInterrupt / SystemExit(143): after Ctrl-C / SIGTERM, once a checkpoint is saved.
    """
    _validate_config(config)
    if config.best_metric and evaluate is None:
        raise ValueError(f"TrainConfig.best_metric={config.best_metric!r} needs an evaluate function; got None")
    if config.distributed:
        initialize_distributed()
    run_config = _json_roundtrip(run_config or {}, "run_config")
    train_config = _json_roundtrip(dataclasses.asdict(config), "config")
    out = _prepare_out_dir(config.out_dir)
    source_batch = getattr(train, "batch_size", None)
    if isinstance(source_batch, (int, np.integer)) and source_batch != config.batch_size:
        # config.batch_size is what resuming checks against; it must be what the steps actually see.
        raise ValueError(f"TrainConfig.batch_size={config.batch_size} but the training BatchSource makes batches "
                         f"of {source_batch} (train.batch_size); build it with the config's batch_size")
    primary = jax.process_index() == 0
    epochs_batches = [train.num_batches(e) for e in range(config.epochs)]
    total_steps = sum(epochs_batches)
    if total_steps == 0:
        raise ValueError(f"the training BatchSource has no batches in {config.epochs} epoch(s)")
    tx, schedule, train_step = _optimizer_and_step(loss_fn, config, total_steps)
    mesh = make_mesh(config.num_devices)
    replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    put_batch(train.batch(0, 0), mesh)  # a batch that does not divide over the devices fails here, not later

    if config.restart and primary:
        shutil.rmtree(out / "checkpoints", ignore_errors=True)
        for name in ("metrics.jsonl", "loss.png"):
            (out / name).unlink(missing_ok=True)
    ckpt = _Checkpoints(out / "checkpoints", keep=config.keep_checkpoints, best_metric=config.best_metric,
                        best_mode=config.best_mode)
    try:
        return _fit(config, ckpt, out, primary, init_params, train, evaluate, run_config, train_config, tx,
                    schedule, train_step, mesh, replicated, epochs_batches)
    finally:
        ckpt.close()


def _fit(config, ckpt, out, primary, init_params, train, evaluate, run_config, train_config, tx, schedule, train_step,
         mesh, replicated, epochs_batches) -> FitResult:
    init_key, train_key = jax.random.split(jax.random.PRNGKey(config.seed))
    latest = ckpt.latest_step()
    if latest is None:
        state = create_train_state(init_params(init_key), tx, train_key)
        step, epoch, index = 0, 0, 0
    else:
        try:
            meta = ckpt.meta(latest)
        except Exception as err:  # noqa: BLE001 - any read failure means the same thing to the user
            raise ValueError(f"{ckpt.directory} holds a checkpoint (step {latest}) that jaxseq.training did not "
                             f"write ({type(err).__name__}: {err}). Use a new out_dir, or restart=True.") from None
        _check_resumable(ckpt, latest, meta, config, run_config, train_config)
        abstract = jax.eval_shape(lambda k: create_train_state(init_params(k), tx, train_key), init_key)
        problems = _diff_shapes(_shapes(ckpt.state_shapes(latest)["params"]), _shapes(abstract.params))
        if problems:
            raise ValueError(f"checkpoint {ckpt.directory} (step {latest}) was written by another model: "
                             + "; ".join(problems) + ". Use a new out_dir, or restart=True to overwrite it.")
        target = _abstract({"params": abstract.params, "opt_state": abstract.opt_state, "step": abstract.step,
                            "key": abstract.key}, replicated)
        try:
            restored = ckpt.restore_state(latest, target)
        except (ValueError, KeyError, TypeError) as err:
            raise ValueError(f"checkpoint {ckpt.directory} (step {latest}) does not match this model and "
                             f"optimizer: {err}") from None
        state = TrainState(**restored)
        step, epoch, index = latest, meta["epoch"], meta["batch_index"]
    history = _read_history(out / "metrics.jsonl", step, primary)
    if epoch >= config.epochs:
        _say(primary, f"run in {out} already finished at step {step} (epoch {epoch}/{config.epochs}); nothing "
                      "to do (restart=True starts over, more epochs trains further)")
        return FitResult(state.params, step, history, True)
    if latest is not None:
        _say(primary, f"resuming {out} from step {step} (epoch {epoch}, batch {index})")

    state = replicate(state, mesh)
    from tqdm.auto import tqdm

    progress = tqdm(total=sum(epochs_batches), initial=step, unit="step", disable=not (config.progress and primary),
                    dynamic_ncols=True, file=sys.stderr)
    recorder = _Recorder(out, history, primary, progress)
    start_time, start_step = time.perf_counter(), step

    def position(epoch, index):
        """(epoch, next batch index), normalised so that an epoch's end reads as the next epoch's start."""
        return (epoch + 1, 0) if index >= epochs_batches[epoch] else (epoch, index)

    def save(epoch, index, metrics=None):
        recorder.flush(schedule(step))
        check_streak()
        if recorder.bad_streak:
            # Only save right after a good step: then "the last checkpoint" is a known-good point to go back to,
            # not the middle of a run of bad batches (the next save after a good step catches up).
            return False
        e, i = position(epoch, index)
        meta = {"step": step, "epoch": e, "batch_index": i, "run_config": run_config, "train_config": train_config}
        ckpt.save(step, state, meta, metrics)
        return True

    def check_streak(at_end=False):
        """Raise after `max_bad_steps` non-finite steps in a row, or at the end of training after any."""
        streak = recorder.bad_streak
        if streak and (at_end or len(streak) >= config.max_bad_steps):
            (s0, e0, i0), (s1, e1, i1) = streak[0], streak[-1]
            why = ("training ended after" if at_end and len(streak) < config.max_bad_steps else "stopped:")
            last_good = ckpt.latest_step()
            raise NonFiniteError(
                f"{why} {len(streak)} consecutive steps with a non-finite loss or gradients (max_bad_steps="
                f"{config.max_bad_steps}), from step {s0} (epoch {e0}, batch {i0}) to step {s1} (epoch {e1}, "
                f"batch {i1}); those updates were not applied. "
                + (f"Last good checkpoint: step {last_good} in {ckpt.directory}" if last_good is not None else
                   f"No checkpoint was saved before them, so {ckpt.directory} holds none: check the data and the "
                   "learning rate"))

    def run_eval(epoch, index):
        recorder.flush(schedule(step))
        check_streak()
        try:
            results = {str(name): float(v) for name, v in evaluate(state.params).items()}
        except (TypeError, ValueError, AttributeError) as err:
            raise ValueError(f"evaluate(params) must return a dict of name -> float: {err}") from None
        if config.best_metric and config.best_metric not in results:
            raise ValueError(f"TrainConfig.best_metric={config.best_metric!r} is not among the evaluate() "
                             f"results {sorted(results)}")
        recorder.write({"kind": "eval", "step": step, "epoch": epoch, **results})
        if config.best_metric:
            save(epoch, index, {config.best_metric: results[config.best_metric]})
        if primary:
            progress.write(f"step {step} eval: " + ", ".join(f"{k}={v:.4g}" for k, v in results.items()))

    with _StopSignal() as stop:
        try:
            while epoch < config.epochs:
                for index in range(index, epochs_batches[epoch]):
                    batch = put_batch(train.batch(epoch, index), mesh)
                    state, metrics = train_step(state, batch)
                    step += 1
                    recorder.add(step, epoch, index, metrics)
                    progress.update(1)
                    if step % config.log_every == 0:
                        recorder.flush(schedule(step))
                        check_streak()
                    if evaluate is not None and config.eval_every and step % config.eval_every == 0:
                        run_eval(epoch, index + 1)
                    if config.checkpoint_every and step % config.checkpoint_every == 0:
                        save(epoch, index + 1)
                    if stop.signum is not None:
                        saved = save(epoch, index + 1)
                        name = signal.Signals(stop.signum).name
                        progress.close()
                        _say(primary, f"{name}: " + (f"saved a checkpoint at step {step}" if saved else
                                                     f"no checkpoint at step {step} (non-finite steps)")
                             + f" in {ckpt.directory}; run the same command again to resume")
                        if stop.signum == signal.SIGINT:
                            raise KeyboardInterrupt
                        raise SystemExit(128 + stop.signum)
                if evaluate is not None and not config.eval_every:
                    run_eval(epoch, epochs_batches[epoch])
                save(epoch, epochs_batches[epoch])
                epoch, index = epoch + 1, 0
            # The last steps were non-finite (fewer than max_bad_steps, or the final save would have raised):
            # no later batch can recover, and the final checkpoint was not written, so do not report success.
            check_streak(at_end=True)
        finally:
            progress.close()
            recorder.close()

    if primary:
        _plot_history(recorder.history, out / "loss.png", config.best_metric)
    elapsed = time.perf_counter() - start_time
    trained = step - start_step
    last = next((r for r in reversed(recorder.history) if r["kind"] == "train" and "loss" in r), {})
    summary = (f"done: {step} steps ({trained} in this run, {elapsed:.1f} s with compilation and evals, "
               f"{trained / max(elapsed, 1e-9):.1f} steps/s); last train loss {last.get('loss', float('nan')):.4g}")
    evals = [r for r in recorder.history if r["kind"] == "eval" and config.best_metric in r]
    if evals:
        pick = min if config.best_mode == "min" else max
        best = pick(evals, key=lambda r: r[config.best_metric])
        summary += f"; best {config.best_metric} {best[config.best_metric]:.4g} at step {best['step']}"
    _say(primary, summary + f"; run folder {out}")
    return FitResult(state.params, step, recorder.history, False)


def _check_resumable(ckpt, step, meta, config, run_config, train_config) -> None:
    problems = _diff_dicts(meta.get("run_config", {}), run_config)
    if problems:
        raise ValueError(f"checkpoint {ckpt.directory} (step {step}) was written with a different run_config: "
                         + "; ".join(problems) + ". Use a new out_dir, or restart=True to overwrite it.")
    fields = _TRAJECTORY_FIELDS + (("epochs",) if config.schedule != "constant" else ())
    stored = {k: v for k, v in meta.get("train_config", {}).items() if k in fields}
    problems = _diff_dicts(stored, {k: train_config[k] for k in fields})
    if problems:
        raise ValueError(f"checkpoint {ckpt.directory} (step {step}) was written with different TrainConfig "
                         "fields: " + "; ".join(problems) + ". Use a new out_dir, or restart=True to overwrite it.")


def _say(primary: bool, message: str) -> None:
    if primary:
        print(message, flush=True)
