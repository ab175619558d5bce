"""Hooks into `fit`: `Callback` (override what you need) and `LossCurve` (draws loss.png at the end)."""
from __future__ import annotations

import pathlib
from typing import Any, Callable, NamedTuple


class FitResult(NamedTuple):
    """What `fit` returns, and what `Callback.on_train_end` receives."""

    params: Any  # final params (replicated jax arrays)
    step: int  # steps done in total, over all resumes
    history: list[dict]  # the records of metrics.jsonl (train, eval and non-finite records), oldest first
    already_finished: bool  # True when the run folder held a finished run and nothing was trained


class Callback:
    """Hooks that fit() calls on the primary process (process_index 0). Override any; the defaults do nothing.

    A run folder that already holds a finished run trains nothing and calls no hook. A run that stops early (a
    signal, `NonFiniteError`, an exception) calls `on_train_begin` and `on_record` but not `on_train_end`.
    """

    def on_train_begin(self, out_dir: pathlib.Path, step: int) -> None:
        """Before the first step; `step` is 0 for a new run, the checkpoint's step on resume."""

    def on_record(self, record: dict) -> None:
        """Every record appended to metrics.jsonl: `{"kind": "train" | "eval" | "nonfinite", "step": ..., ...}`."""

    def on_train_end(self, result: FitResult, out_dir: pathlib.Path) -> None:
        """After the last step and the final checkpoint, with what fit is about to return."""


class LambdaCallback(Callback):
    """A callback from plain functions (Keras' `LambdaCallback`): each argument, when given, is that hook.

    `on_train_begin` is the place for files that a task keeps beside its checkpoints (vocabularies, the model's
    description): it runs once fit holds the run folder's lock and has accepted the folder (resume checks
    passed), so a refused or busy run never overwrites them.
    """

    def __init__(self, on_train_begin: Callable[[pathlib.Path, int], None] | None = None,
                 on_record: Callable[[dict], None] | None = None,
                 on_train_end: Callable[[FitResult, pathlib.Path], None] | None = None):
        for name, hook in (("on_train_begin", on_train_begin), ("on_record", on_record),
                           ("on_train_end", on_train_end)):
            if hook is not None:
                setattr(self, name, hook)


class LossCurve(Callback):
    """Draws `out_dir/filename` at the end: the train loss, and an eval metric, against step.

    Args:
      filename: the PNG's name inside the run folder.
      title: the figure title; None for `jaxseq.plots.loss_curve`'s default.
      eval_metric: the eval metric to draw; None draws the eval loss, or when the evaluations report no loss,
        their first metric (pass fit's `best_metric` to draw that one instead).
    """

    def __init__(self, filename: str = "loss.png", title: str | None = None, *, eval_metric: str | None = None):
        self.filename = filename
        self.title = title
        self.eval_metric = eval_metric

    def on_train_end(self, result: FitResult, out_dir: pathlib.Path) -> None:
        from jaxseq.plots import loss_curve

        train = [r for r in result.history if r["kind"] == "train" and "loss" in r]
        if not train:
            return
        evals = [r for r in result.history if r["kind"] == "eval"]
        name = self.eval_metric
        if name is None and evals:
            names = [k for k in evals[0] if k not in ("kind", "step", "epoch")]
            name = "loss" if "loss" in names else next(iter(names), None)
        evals = [r for r in evals if name and name in r]
        loss_curve([r["step"] for r in train], [r["loss"] for r in train], pathlib.Path(out_dir) / self.filename,
                   eval_steps=[r["step"] for r in evals] or None, eval_values=[r[name] for r in evals] or None,
                   eval_label=f"eval {name}", title=self.title)
