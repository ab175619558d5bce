"""One workflow per task: train and evaluate, load a run, predict, evaluate — functions returning results.

``classify``, ``forecast``, ``caption`` and ``translate`` each wire the data readers, a model from
``jaxseq.models`` and ``jaxseq.training.fit`` together. A task owns its run folder: ``fit`` writes the
checkpoints and ``metrics.jsonl`` there, the task adds the results it promises (``metrics.json`` and its
figures or hypotheses), so a run folder is complete whoever started it. Everything else a caller wants
(printing, files named on a command line, reports) is the caller's: the ``jaxseq`` command line and the tour
both call these functions. Progress goes to ``logging.getLogger("jaxseq.tasks")``; nothing here prints.

Every run records which task wrote it; ``run_config(run_dir, expected)`` checks that before a task reads a run
folder, so handing a caption run to the forecaster fails with one line instead of a ``KeyError``.
"""
from __future__ import annotations

import pathlib

# What each task's stored run config is recognised by, and the command that writes such a run. Runs record no
# explicit kind (adding one would make every existing run refuse to resume), so each is known by its shape.
KINDS = {"forecast": "jaxseq forecast train", "caption": "jaxseq caption train",
         "translate": "jaxseq translate train", "classify": "jaxseq.tasks.classify"}


def run_kind(config: dict) -> str | None:
    """The task that wrote a stored run config (``"forecast"``, ``"caption"``, ...), or None if unknown."""
    if not isinstance(config, dict):
        return None
    task = config.get("task")
    if task == "caption":
        return "caption"
    if task == "order-classification":
        return "classify"
    if "forecast" in config and "scaler" in config:
        return "forecast"
    if "tokenizer" in config and "model" in config:
        return "translate"
    return None


def run_config(run_dir, expected: str) -> dict:
    """The run config stored in ``run_dir``'s checkpoints, after checking that task ``expected`` wrote it.

    Raises:
      FileNotFoundError: ``run_dir`` is not a folder or holds no checkpoint.
      ValueError: another task (or something unknown) wrote the run; the message names both.
    """
    from jaxseq import training

    path = pathlib.Path(run_dir)
    if not path.is_dir():
        raise FileNotFoundError(f"run folder {str(path)!r} does not exist; expected a folder written by "
                                f"'{KINDS[expected]}'")
    config = training.load_run_config(str(path.resolve()))
    kind = run_kind(config)
    if kind != expected:
        got = f"a {kind} run (written by '{KINDS[kind]}')" if kind else "a run of an unknown kind"
        raise ValueError(f"run folder {str(path)!r} holds {got}; expected a {expected} run written by "
                         f"'{KINDS[expected]}'")
    return config
