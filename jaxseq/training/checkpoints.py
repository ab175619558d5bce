"""Orbax checkpoints of a run folder: saving, reading back, and walking past damaged ones.

A checkpoint is `out_dir/checkpoints/<step>/` with two items: `state` (params, optimizer state, step, RNG key)
and `meta` (JSON: the data position, the run_config and the TrainConfig). A checkpoint that cannot be read (a
file truncated or emptied by a full disk or a killed copy, a deleted metadata file) is *damaged*: readers walk
back to the newest intact one and log a warning naming the damaged step and file.
"""
from __future__ import annotations

import json
import logging
import pathlib
import re
import shutil
from typing import Any, Callable, Iterable

import jax
import jax.numpy as jnp

logger = logging.getLogger("jaxseq.training")

Params = Any
DAMAGED_DIR = "damaged-checkpoints"  # beside checkpoints/: where fit moves damaged checkpoints aside
# The files every checkpoint has; a missing one is named as the damage.
_REQUIRED = ("meta/metadata", "state/_METADATA", "state/manifest.ocdbt")


class CheckpointUnreadable(ValueError):
    """One checkpoint could not be read: `step`, the damaged `path` (a file when known) and a one-line `detail`."""

    def __init__(self, step: int, path: pathlib.Path, detail: str):
        super().__init__(f"checkpoint step {step} is damaged: {path}: {detail}")
        self.step, self.path, self.detail = step, path, detail


def _one_line(err: BaseException) -> str:
    # Tensorstore appends its whole JSON spec to each message; the part before it says what went wrong.
    text = str(err).split(" [tensorstore_spec")[0].strip()
    lines = text.splitlines()
    return f"{type(err).__name__}: {lines[0] if lines else ''}"[:300]


def _damaged_file(step_dir: pathlib.Path, err: BaseException) -> pathlib.Path:
    """The file inside `step_dir` that `err` (raised reading it) points at; `step_dir` when none can be told.

    Orbax names the file in some errors (tensorstore, a missing file) but not in JSON decoding errors, so the
    folder is also checked: a required file missing, an empty file, a JSON file that does not parse.
    """
    named = [pathlib.Path(quoted or bare) for quoted, bare in re.findall(r'"(/[^"]+)"|File (/\S+) not found', str(err))]
    named = [p for p in named if step_dir in p.parents and not str(p).endswith("/")]
    if getattr(err, "filename", None):
        named.append(pathlib.Path(err.filename))
    if named:
        return named[-1]
    for rel in _REQUIRED:
        if not (step_dir / rel).is_file():
            return step_dir / rel
    for path in sorted(p for p in step_dir.rglob("*") if p.is_file()):
        if path.stat().st_size == 0:
            return path
        if path.stat().st_size < 10_000_000 and path.read_bytes()[:1] == b"{":
            try:
                json.loads(path.read_text())
            except (UnicodeDecodeError, ValueError):
                return path
    return step_dir


class Checkpoints:
    """Orbax CheckpointManager over out_dir/checkpoints: items `state` (arrays) and `meta` (JSON).

    The read methods raise `CheckpointUnreadable` for any failure to read a checkpoint, so that callers can tell
    damage (walk back to an older checkpoint) from a checkpoint that reads fine but does not fit (an error).
    """

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

    def steps(self) -> list[int]:
        """The checkpointed steps, newest first."""
        return sorted(self.manager.all_steps(), reverse=True)

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def best_step(self) -> int | None:
        return self.manager.best_step()

    def _read(self, step: int, read: Callable[[], Any]):
        try:
            value = read()
        except Exception as err:  # noqa: BLE001 - Orbax and tensorstore raise many types for one cause: damage
            path = _damaged_file(self.directory / str(step), err)
            raise CheckpointUnreadable(step, path, _one_line(err)) from err
        return value

    def meta(self, step: int) -> dict:
        args = self.ocp.args.Composite(meta=self.ocp.args.JsonRestore())
        meta = self._read(step, lambda: self.manager.restore(step, args=args)["meta"])
        if not isinstance(meta, dict):
            raise CheckpointUnreadable(step, self.directory / str(step) / "meta" / "metadata",
                                       f"expected a JSON object, got {type(meta).__name__}")
        return meta

    def state_shapes(self, step: int) -> dict:
        """The stored state tree with a shape and dtype at each leaf (read from the metadata, no arrays)."""
        def read():
            metadata = self.manager.item_metadata(step)["state"]
            if metadata is None:  # Orbax answers None when state/_METADATA is missing
                raise FileNotFoundError(f"File {self.directory / str(step) / 'state' / '_METADATA'} not found.")
            return metadata.tree
        return self._read(step, read)

    def restore_state(self, step: int, abstract_state: dict) -> dict:
        args = self.ocp.args.Composite(state=self.ocp.args.StandardRestore(abstract_state))
        return self._read(step, lambda: self.manager.restore(step, args=args)["state"])

    def save(self, step: int, state, meta: dict, metrics: dict | None) -> None:
        if self.latest_step() == step:
            return  # e.g. an epoch end that is also a checkpoint_every step
        items = {"params": state.params, "opt_state": state.opt_state, "step": state.step, "key": state.key}
        args = self.ocp.args.Composite(state=self.ocp.args.StandardSave(items), meta=self.ocp.args.JsonSave(meta))
        self.manager.save(step, args=args, metrics=metrics, force=True)

    def move_aside(self, step: int) -> pathlib.Path:
        """Move a damaged checkpoint to `<out_dir>/damaged-checkpoints/<step>[.N]` (kept for inspection).

        Left in place, it would stay the manager's latest step: the next save at that step would be skipped and
        every later resume would trip on it again.
        """
        root = self.directory.parent / DAMAGED_DIR
        root.mkdir(exist_ok=True)
        target, n = root / str(step), 1
        while target.exists():
            target, n = root / f"{step}.{n}", n + 1
        shutil.move(str(self.directory / str(step)), str(target))
        self.reload()
        return target

    def reload(self) -> None:
        """List the checkpoints on disk again (after another process moved one aside)."""
        self.manager.reload()

    def close(self) -> None:
        self.manager.close()


def first_intact(steps: Iterable[int], read: Callable[[int], Any]) -> tuple[int, Any, list[CheckpointUnreadable]]:
    """`(step, read(step), damaged)` for the first of `steps` that `read` reads without `CheckpointUnreadable`.

    `damaged` lists the errors of the steps tried before it. Any other error of `read` (a checkpoint that reads
    but does not fit) propagates. Raises the first step's `CheckpointUnreadable` when none reads (ValueError).
    """
    damaged = []
    for step in steps:
        try:
            return step, read(step), damaged
        except CheckpointUnreadable as err:
            damaged.append(err)
    if not damaged:
        raise ValueError("no checkpoint steps to read")
    first = damaged[0]
    more = f" (and {len(damaged) - 1} older damaged one(s))" if len(damaged) > 1 else ""
    raise CheckpointUnreadable(first.step, first.path, first.detail + more)


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


def shapes(tree) -> list[tuple[str, tuple]]:
    """`[(leaf path "a/b/0", shape), ...]` of the array leaves of `tree` (arrays or shape structs)."""
    leaves = jax.tree_util.tree_flatten_with_path(tree, is_leaf=lambda x: hasattr(x, "shape"))[0]
    return [(_path_str(p), tuple(x.shape)) for p, x in leaves if hasattr(x, "shape")]


def diff_dicts(stored, current, prefix: str = "") -> list[str]:
    """``["key.sub: <stored> in the checkpoint vs <current> now", ...]``: the leaves where nested dicts differ."""
    if isinstance(stored, dict) and isinstance(current, dict):
        problems = []
        for key in sorted(set(stored) | set(current), key=str):
            name = f"{prefix}.{key}" if prefix else str(key)
            if key not in stored or key not in current:
                problems.append(f"{name}: {stored.get(key, '<absent>')!r} in the checkpoint vs "
                                f"{current.get(key, '<absent>')!r} now")
            else:
                problems += diff_dicts(stored[key], current[key], name)
        return problems
    return [] if stored == current else [f"{prefix}: {stored!r} in the checkpoint vs {current!r} now"]


def diff_shapes(stored: list, current: list) -> list[str]:
    """The differences between two `shapes` lists, each a phrase naming the parameter path; [] when equal."""
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


def abstract_like(tree, sharding):
    """Shape-dtype structs of `tree`'s leaves placed with `sharding`: the restore target Orbax needs."""
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding), tree)


def _warn_damaged(damaged: list[CheckpointUnreadable], used: int, what: str) -> None:
    for err in damaged:
        logger.warning("checkpoint step %d is damaged (%s: %s); %s step %d", err.step, err.path, err.detail, what,
                       used)


def _open_existing(out_dir) -> tuple[Checkpoints, int, dict]:
    directory = pathlib.Path(out_dir).absolute() / "checkpoints"
    if not directory.is_dir():
        raise FileNotFoundError(f"no checkpoints in {str(out_dir)!r}: {directory} does not exist")
    probe = Checkpoints(directory, read_only=True)
    try:
        steps = probe.steps()
        if not steps:
            raise FileNotFoundError(f"no checkpoints in {str(directory)!r}")
        try:
            step, meta, damaged = first_intact(steps, probe.meta)
        except CheckpointUnreadable as err:
            raise ValueError(f"{out_dir} holds no readable checkpoint: {err}") from None
        _warn_damaged(damaged, step, "read the run's settings from")
    finally:
        probe.close()
    train_config = meta.get("train_config", {})
    ckpt = Checkpoints(directory, best_metric=train_config.get("best_metric"),
                       best_mode=train_config.get("best_mode", "min"), read_only=True)
    return ckpt, step, meta


def load_run_config(out_dir: str) -> dict:
    """The `run_config` stored with the newest readable checkpoint of a run folder.

    Args:
      out_dir: the run folder given to `fit`.

    Raises:
      FileNotFoundError: the folder holds no checkpoints.
      ValueError: one line: no checkpoint can be read, or the folder is not a jaxseq training run (which task
        wrote it is the task's own check: `jaxseq.tasks.run_config`).
    """
    ckpt, step, meta = _open_existing(out_dir)
    ckpt.close()
    run_config = meta.get("run_config")
    if not isinstance(run_config, dict) or not isinstance(meta.get("train_config"), dict):
        raise ValueError(f"{out_dir} is not a jaxseq training run folder: its checkpoint (step {step}) holds no "
                         "run_config and train_config")
    return run_config


def restore_params(out_dir: str, init_params: Callable[[jax.Array], Params] | None = None, *,
                   which: str = "best") -> Params:
    """Params from a run folder's checkpoint, walking back past damaged ones.

    Args:
      out_dir: the run folder given to `fit`.
      init_params: the model's init (key -> params). When given, the checkpoint's parameter shapes are checked
        against it first (a clear error names any mismatch) and the result has its exact tree type.
      which: "best" (by the run's best_metric; the latest when it had none) or "latest". When that checkpoint
        is damaged, the newest intact one is restored instead, with a logged warning.

    Returns: the params on the default device.

    Raises:
      FileNotFoundError: no checkpoints in `out_dir`.
      ValueError: one line: parameter shapes that do not fit `init_params`, or no intact checkpoint left
        (naming the damaged file).
    """
    if which not in ("best", "latest"):
        raise ValueError(f"which={which!r}: expected 'best' or 'latest'")
    ckpt, _, _ = _open_existing(out_dir)
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    current = None
    if init_params is not None:
        current = jax.eval_shape(init_params, jax.ShapeDtypeStruct((2,), jnp.uint32))

    def read(step):
        stored = ckpt.state_shapes(step)
        abstract = abstract_like(stored, device)
        if current is not None:
            problems = diff_shapes(shapes(stored["params"]), shapes(current))
            if problems:
                raise ValueError(f"checkpoint {ckpt.directory} (step {step}) does not fit this model: "
                                 + "; ".join(problems))
            abstract["params"] = abstract_like(current, device)
        return ckpt.restore_state(step, abstract)["params"]

    try:
        steps = ckpt.steps()
        best = ckpt.best_step() if which == "best" else None
        if best is not None:
            steps = [best] + [s for s in steps if s != best]
        try:
            step, params, damaged = first_intact(steps, read)
        except CheckpointUnreadable as err:
            raise ValueError(f"no intact checkpoint in {ckpt.directory}: {err}") from None
        _warn_damaged(damaged, step, "restored")
        return params
    finally:
        ckpt.close()
