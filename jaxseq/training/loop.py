"""`fit`: the training loop over a `BatchSource`, with checkpoints, exact resume, the NaN guard and signals.

Re-running fit with the same `out_dir` resumes from the newest intact checkpoint and gives the same losses, bit
for bit on CPU, as a run never interrupted, because the data order is a pure function of (seed, epoch, index)
and the dropout key of step s is `fold_in(key, s)`.
"""
from __future__ import annotations

import dataclasses
import logging
import os
import pathlib
import platform
import shutil
import signal
import sys
import threading
import time
from typing import Any, Callable, Sequence

import jax
import numpy as np
import optax

from jaxseq.training.callbacks import Callback, FitResult
from jaxseq.training.checkpoints import (DAMAGED_DIR, CheckpointUnreadable, Checkpoints, abstract_like, diff_dicts,
                                         diff_shapes, first_intact, shapes)
from jaxseq.training.config import (OPTIMIZER_FIELDS, TRAJECTORY_FIELDS, TrainConfig, json_roundtrip,
                                    validate_config)
from jaxseq.training.data import BatchSource
from jaxseq.training.distributed import barrier, initialize_distributed, make_mesh, put_batch, replicate
from jaxseq.training.lock import RunFolderLock
from jaxseq.training.records import METRICS_FILE, Recorder, read_history
from jaxseq.training.state import (LossFn, Params, TrainState, create_train_state, injected_learning_rate,
                                   optimizer_and_step)

logger = logging.getLogger("jaxseq.training")
# Its own child so that a caller quieting the loop's chatter (the tour) can still show why the first steps are slow.
compile_logger = logging.getLogger("jaxseq.training.compile")


class NonFiniteError(FloatingPointError):
    """Training stopped after `max_bad_steps` consecutive steps with a non-finite loss or gradients."""


def fit(config: TrainConfig, *, init_params: Callable[[jax.Array], Params], loss_fn: LossFn, train: BatchSource,
        evaluate: Callable[[Params], dict[str, float]] | None = None, run_config: dict | None = None,
        tx: optax.GradientTransformation | None = None, callbacks: Sequence[Callback] = ()) -> FitResult:
    """Train, checkpoint and log into `config.out_dir`; resume when it already holds a run.

    Messages (resuming, already finished, evaluations, the summary, damaged checkpoints) go to the
    `jaxseq.training` logger at INFO (WARNING for damage), and a line before each batch shape's compilation to
    `jaxseq.training.compile`; attach a handler to see them. The tqdm progress bar
    goes to stderr.

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
      tx: any optax transformation, replacing the one config's optimizer fields (`OPTIMIZER_FIELDS`) build; those
        fields are then neither used nor checked on resume. Wrap the optimizer in `optax.inject_hyperparams` to
        have its learning rate logged; put its hyperparameters in `run_config` to have them checked on resume.
      callbacks: `Callback` objects, called on the primary process (see `jaxseq.training.callbacks`).

    Returns:
      FitResult(params, step, history, already_finished).

    Raises:
      ValueError: bad config, an unwritable out_dir, a batch that does not divide over the devices, a
        checkpoint folder written by another model/config, or one with no intact checkpoint.
      RunFolderBusy (a ValueError): another process is training in `out_dir`.
      NonFiniteError: `max_bad_steps` consecutive non-finite steps, or training ending on non-finite steps;
        the last good checkpoint is kept.
      KeyboardInterrupt / SystemExit(143): after Ctrl-C / SIGTERM, once a checkpoint is saved.
    """
    validate_config(config, custom_tx=tx is not None)
    if tx is not None and not isinstance(tx, optax.GradientTransformation):
        raise ValueError(f"tx must be an optax.GradientTransformation, got {type(tx).__name__}")
    if config.best_metric and evaluate is None:
        raise ValueError(f"TrainConfig.best_metric={config.best_metric!r} needs an evaluate function; got None")
    if config.distributed:
        initialize_distributed()
    run_config = json_roundtrip(run_config or {}, "run_config")
    train_config = json_roundtrip(dataclasses.asdict(config), "config")
    out = _prepare_out_dir(config.out_dir)
    source_batch = getattr(train, "batch_size", None)
    if isinstance(source_batch, (int, np.integer)) and source_batch != config.batch_size:
        # config.batch_size is what resuming checks against; it must be what the steps actually see.
        raise ValueError(f"TrainConfig.batch_size={config.batch_size} but the training BatchSource makes batches "
                         f"of {source_batch} (train.batch_size); build it with the config's batch_size")
    primary = jax.process_index() == 0
    # One process per run folder; in a distributed run the processes share it and process 0 stands for all.
    lock = RunFolderLock(out).acquire() if primary else None
    try:
        epochs_batches = [train.num_batches(e) for e in range(config.epochs)]
        if sum(epochs_batches) == 0:
            raise ValueError(f"the training BatchSource has no batches in {config.epochs} epoch(s)")
        tx_kind = "TrainConfig" if tx is None else "custom"
        tx, schedule, train_step = optimizer_and_step(loss_fn, config, sum(epochs_batches), tx)
        mesh = make_mesh(config.num_devices)
        put_batch(train.batch(0, 0), mesh)  # a batch that does not divide over the devices fails here, not later
        if config.restart and primary:
            for name in ("checkpoints", DAMAGED_DIR):
                shutil.rmtree(out / name, ignore_errors=True)
            for name in (METRICS_FILE, "loss.png"):
                (out / name).unlink(missing_ok=True)
        barrier("jaxseq.training: run folder prepared")  # no process lists checkpoints that are being deleted
        ckpt = Checkpoints(out / "checkpoints", keep=config.keep_checkpoints, best_metric=config.best_metric,
                           best_mode=config.best_mode)
        try:
            run = _Run(config=config, out=out, primary=primary, train=train, evaluate=evaluate, ckpt=ckpt, tx=tx,
                       tx_kind=tx_kind, schedule=schedule, train_step=train_step, mesh=mesh,
                       epochs_batches=epochs_batches, run_config=run_config, train_config=train_config,
                       callbacks=tuple(callbacks) if primary else ())
            return run.fit(init_params)
        finally:
            ckpt.close()
    finally:
        if lock is not None:
            lock.release()


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


@dataclasses.dataclass
class _Run:
    """One fit call: its fixed context (the fields up to `callbacks`) and its moving parts (state, step, records)."""

    config: TrainConfig
    out: pathlib.Path
    primary: bool
    train: BatchSource
    evaluate: Callable[[Params], dict[str, float]] | None
    ckpt: Checkpoints
    tx: optax.GradientTransformation
    tx_kind: str  # "TrainConfig" (built from its fields) or "custom"; stored with checkpoints, checked on resume
    schedule: Callable[[int], Any] | None  # the learning rate by step; None for a custom tx
    train_step: Callable
    mesh: jax.sharding.Mesh
    epochs_batches: list[int]
    run_config: dict
    train_config: dict
    callbacks: tuple[Callback, ...]
    state: TrainState | None = None
    step: int = 0
    recorder: Recorder | None = None
    progress: Any = None

    def fit(self, init_params) -> FitResult:
        resumed, epoch, index = self.restore(init_params)
        history = read_history(self.out / METRICS_FILE, self.step, self.primary)
        if epoch >= self.config.epochs:
            self.say(f"run in {self.out} already finished at step {self.step} (epoch {epoch}/{self.config.epochs}); "
                     "nothing to do (restart=True starts over, more epochs trains further)")
            return FitResult(self.state.params, self.step, history, True)
        if resumed:
            self.say(f"resuming {self.out} from step {self.step} (epoch {epoch}, batch {index})")
        self.state = replicate(self.state, self.mesh)
        from tqdm import tqdm  # the text bar: tqdm.auto wants ipywidgets in notebooks and warns without them

        self.progress = tqdm(total=sum(self.epochs_batches), initial=self.step, unit="step", dynamic_ncols=True,
                             disable=not (self.config.progress and self.primary), file=sys.stderr)
        self.recorder = Recorder(self.out, history, self.primary, self.progress, self.callbacks)
        start_time, start_step = time.perf_counter(), self.step
        for callback in self.callbacks:
            callback.on_train_begin(self.out, self.step)
        self.loop(epoch, index)
        self.say(self.summary(start_step, time.perf_counter() - start_time))
        result = FitResult(self.state.params, self.step, self.recorder.history, False)
        for callback in self.callbacks:
            callback.on_train_end(result, self.out)
        return result

    def say(self, message: str, *args, to: logging.Logger = logger) -> None:
        """An INFO line from the primary process, above the progress bar rather than into it."""
        if not self.primary:
            return
        progress = getattr(self, "progress", None)  # messages before training starts have no bar
        if progress is not None:
            progress.clear()
        to.info(message, *args)
        if progress is not None:
            progress.refresh()

    def restore(self, init_params) -> tuple[bool, int, int]:
        """Set `state` and `step` from the newest intact checkpoint (fresh when none); (resumed, epoch, index).

        Damaged checkpoints newer than it are moved aside with a warning. A checkpoint that reads but does not
        fit this run (another run_config, model or trajectory setting) is an error, not damage.
        """
        init_key, train_key = jax.random.split(jax.random.PRNGKey(self.config.seed))
        steps = self.ckpt.steps()
        if not steps:
            self.state = create_train_state(init_params(init_key), self.tx, train_key)
            return False, 0, 0
        abstract = jax.eval_shape(lambda k: create_train_state(init_params(k), self.tx, train_key), init_key)
        replicated = jax.sharding.NamedSharding(self.mesh, jax.sharding.PartitionSpec())
        target = abstract_like({"params": abstract.params, "opt_state": abstract.opt_state, "step": abstract.step,
                                "key": abstract.key}, replicated)

        def read(step):
            meta = self.ckpt.meta(step)
            if not {"epoch", "batch_index"} <= meta.keys():
                raise CheckpointUnreadable(step, self.ckpt.directory / str(step) / "meta",
                                           "no data position in its meta item")
            self.check_resumable(step, meta)
            problems = diff_shapes(shapes(self.ckpt.state_shapes(step)["params"]), shapes(abstract.params))
            if problems:
                raise ValueError(f"checkpoint {self.ckpt.directory} (step {step}) was written by another model: "
                                 + "; ".join(problems) + ". Use a new out_dir, or restart=True to overwrite it.")
            return meta, self.ckpt.restore_state(step, target)

        try:
            step, (meta, restored), damaged = first_intact(steps, read)
        except CheckpointUnreadable as err:
            raise ValueError(f"{self.ckpt.directory} holds no checkpoint this run can resume ({err}): damaged, not "
                             "written by jaxseq.training, or for another optimizer. Use a new out_dir, or "
                             "restart=True.") from None
        # Several processes read the same checkpoints: all of them read before process 0 moves any aside, and
        # all of them list the checkpoints again after, so every manager agrees on the latest step (a process that
        # still listed a moved step would skip its part of the collective save at that step).
        barrier("jaxseq.training: checkpoints read")
        for err in damaged:
            where = f"moved it to {self.ckpt.move_aside(err.step)}" if self.primary else "left it"
            logger.warning("checkpoint step %d in %s is damaged (%s: %s); %s and resumed from step %d", err.step,
                           self.ckpt.directory, err.path, err.detail, where, step)
        barrier("jaxseq.training: damaged checkpoints moved aside")
        if damaged and not self.primary:
            self.ckpt.reload()
        self.state = TrainState(**restored)
        self.step = step
        return True, meta["epoch"], meta["batch_index"]

    def check_resumable(self, step: int, meta: dict) -> None:
        ckpt = self.ckpt.directory
        problems = diff_dicts(meta.get("run_config", {}), self.run_config)
        if problems:
            raise ValueError(f"checkpoint {ckpt} (step {step}) was written with a different run_config: "
                             + "; ".join(problems) + ". Use a new out_dir, or restart=True to overwrite it.")
        stored_tx = meta.get("tx", "TrainConfig")  # checkpoints older than fit(tx=...) used the config's
        if stored_tx != self.tx_kind:
            raise ValueError(f"checkpoint {ckpt} (step {step}) was written with the optimizer from {stored_tx}, "
                             f"but this fit uses {self.tx_kind} (tx=). Use a new out_dir, or restart=True.")
        fields = TRAJECTORY_FIELDS
        if self.tx_kind == "TrainConfig" and self.config.schedule != "constant":
            fields += ("epochs",)  # a decaying schedule is stretched over all epochs
        if self.tx_kind == "custom":
            fields = tuple(f for f in fields if f not in OPTIMIZER_FIELDS)
        stored = {k: v for k, v in meta.get("train_config", {}).items() if k in fields}
        problems = diff_dicts(stored, {k: self.train_config[k] for k in fields})
        if problems:
            raise ValueError(f"checkpoint {ckpt} (step {step}) was written with different TrainConfig fields: "
                             + "; ".join(problems) + ". Use a new out_dir, or restart=True to overwrite it.")

    def learning_rate(self) -> float | None:
        if self.schedule is not None:
            return float(self.schedule(self.step))
        return injected_learning_rate(self.state.opt_state)

    def flush(self) -> None:
        self.recorder.flush(self.learning_rate)
        self.check_streak()

    def position(self, epoch: int, index: int) -> tuple[int, int]:
        """(epoch, next batch index), normalised so that an epoch's end reads as the next epoch's start."""
        return (epoch + 1, 0) if index >= self.epochs_batches[epoch] else (epoch, index)

    def save(self, epoch: int, index: int, metrics: dict | None = None) -> bool:
        self.flush()
        if self.recorder.bad_streak:
            # Only save right after a good step: then "the last checkpoint" is a known-good point to go back to,
            # not the middle of a run of bad batches (the next save after a good step catches up).
            return False
        e, i = self.position(epoch, index)
        meta = {"step": self.step, "epoch": e, "batch_index": i, "run_config": self.run_config,
                "train_config": self.train_config, "tx": self.tx_kind}
        self.ckpt.save(self.step, self.state, meta, metrics)
        return True

    def check_streak(self, at_end: bool = False) -> None:
        """Raise after `max_bad_steps` non-finite steps in a row, or at the end of training after any."""
        streak, limit = self.recorder.bad_streak, self.config.max_bad_steps
        if not streak or not (at_end or len(streak) >= limit):
            return
        (s0, e0, i0), (s1, e1, i1) = streak[0], streak[-1]
        why = "training ended after" if at_end and len(streak) < limit else "stopped:"
        last_good = self.ckpt.latest_step()
        raise NonFiniteError(
            f"{why} {len(streak)} consecutive steps with a non-finite loss or gradients (max_bad_steps={limit}), "
            f"from step {s0} (epoch {e0}, batch {i0}) to step {s1} (epoch {e1}, batch {i1}); those updates were "
            "not applied. "
            + (f"Last good checkpoint: step {last_good} in {self.ckpt.directory}" if last_good is not None else
               f"No checkpoint was saved before them, so {self.ckpt.directory} holds none: check the data and the "
               "learning rate"))

    def run_eval(self, epoch: int, index: int) -> None:
        self.flush()
        best_metric = self.config.best_metric
        try:
            results = {str(name): float(v) for name, v in self.evaluate(self.state.params).items()}
        except (TypeError, ValueError, AttributeError) as err:
            raise ValueError(f"evaluate(params) must return a dict of name -> float: {err}") from None
        if best_metric and best_metric not in results:
            raise ValueError(f"TrainConfig.best_metric={best_metric!r} is not among the evaluate() results "
                             f"{sorted(results)}")
        self.recorder.write({"kind": "eval", "step": self.step, "epoch": epoch, **results})
        if best_metric:
            self.save(epoch, index, {best_metric: results[best_metric]})
        self.say(f"step {self.step} eval: " + ", ".join(f"{k}={v:.4g}" for k, v in results.items()))

    def loop(self, epoch: int, index: int) -> None:
        """Train from batch `index` of `epoch` to the end, evaluating, logging and saving on the way."""
        config = self.config
        compiled: set = set()
        with _StopSignal() as stop:
            try:
                while epoch < config.epochs:
                    for index in range(index, self.epochs_batches[epoch]):
                        host_batch = self.train.batch(epoch, index)
                        self.say_compiling(host_batch, compiled)
                        batch = put_batch(host_batch, self.mesh)
                        self.state, metrics = self.train_step(self.state, batch)
                        self.step += 1
                        self.recorder.add(self.step, epoch, index, metrics)
                        self.progress.update(1)
                        if self.step % config.log_every == 0:
                            self.flush()
                        if self.evaluate is not None and config.eval_every and self.step % config.eval_every == 0:
                            self.run_eval(epoch, index + 1)
                        if config.checkpoint_every and self.step % config.checkpoint_every == 0:
                            self.save(epoch, index + 1)
                        if stop.signum is not None:
                            self.stop(stop.signum, epoch, index + 1)
                    if self.evaluate is not None and not config.eval_every:
                        self.run_eval(epoch, self.epochs_batches[epoch])
                    self.save(epoch, self.epochs_batches[epoch])
                    epoch, index = epoch + 1, 0
                # The last steps were non-finite (fewer than max_bad_steps, or the final save would have raised):
                # no later batch can recover, and the final checkpoint was not written, so do not report success.
                self.check_streak(at_end=True)
            finally:
                self.progress.close()
                self.recorder.close()

    def say_compiling(self, batch: dict, compiled: set) -> None:
        """A line before the step that compiles a batch shape not seen yet: XLA compiles the step once per shape
        (seconds each), so without it a run looks stuck, or its progress bar's first estimate is far too long."""
        shapes = tuple((name, np.shape(value)) for name, value in batch.items())
        if shapes in compiled or not self.primary:
            return
        compiled.add(shapes)
        known = getattr(self.train, "shapes", None)  # sources with length buckets say how many shapes they have
        count = f" {len(compiled)} of {len(known())}" if callable(known) else ""
        described = ", ".join(f"{name} {list(shape)}" for name, shape in shapes if len(shape) > 1) or str(shapes)
        self.say("compiling the training step for batch shape%s (%s); XLA compiles each shape once", count,
                 described, to=compile_logger)

    def stop(self, signum: int, epoch: int, index: int) -> None:
        """Save (after a good step) and leave as the signal asks: KeyboardInterrupt or SystemExit(128 + signum)."""
        saved = self.save(epoch, index)
        self.progress.close()
        self.say(f"{signal.Signals(signum).name}: "
                 + (f"saved a checkpoint at step {self.step}" if saved else
                    f"no checkpoint at step {self.step} (non-finite steps)")
                 + f" in {self.ckpt.directory}; run the same command again to resume")
        if signum == signal.SIGINT:
            raise KeyboardInterrupt
        raise SystemExit(128 + signum)

    def summary(self, start_step: int, elapsed: float) -> str:
        trained = self.step - start_step
        history = self.recorder.history
        last = next((r for r in reversed(history) if r["kind"] == "train" and "loss" in r), {})
        summary = (f"done: {self.step} steps ({trained} in this run, {elapsed:.1f} s with compilation and evals, "
                   f"{trained / max(elapsed, 1e-9):.1f} steps/s); last train loss {last.get('loss', float('nan')):.4g}")
        best_metric = self.config.best_metric
        evals = [r for r in history if r["kind"] == "eval" and best_metric in r]
        if evals:
            pick = min if self.config.best_mode == "min" else max
            best = pick(evals, key=lambda r: r[best_metric])
            summary += f"; best {best_metric} {best[best_metric]:.4g} at step {best['step']}"
        return summary + f"; run folder {self.out}"


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
