"""The run's records: `metrics.jsonl` (one JSON object a line), TensorBoard when installed, and the callbacks.

Records are `{"kind": "train" | "eval" | "nonfinite", "step": ..., ...}`. A train record averages the steps
since the previous one; reading the device metrics for it is the loop's one host sync every `log_every` steps.
"""
from __future__ import annotations

import json
import pathlib
import time
from typing import Callable, Sequence

import jax
import numpy as np

METRICS_FILE = "metrics.jsonl"


class Recorder:
    """Collects per-step device metrics and writes them as JSON lines every log_every steps (one host sync).

    Only the primary process writes files and calls the callbacks' `on_record`; every process keeps `history`.
    """

    def __init__(self, out: pathlib.Path, history: list[dict], primary: bool, progress,
                 callbacks: Sequence = ()):
        self.path = out / METRICS_FILE
        self.history = history
        self.primary = primary
        self.progress = progress
        self.callbacks = callbacks
        self.pending: list[tuple[int, int, int, dict]] = []  # (step, epoch, index, device metrics)
        self.bad_streak: list[tuple[int, int, int]] = []  # (step, epoch, index) of the current non-finite run
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
        for callback in self.callbacks:
            callback.on_record(record)

    def flush(self, lr: Callable[[], float | None]) -> None:
        """Write one train record for the pending steps (with `lr()` unless None); track the non-finite streak."""
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
        rate = lr()
        if rate is not None:
            record["lr"] = rate
        record.update(bad_steps=len(values) - len(good), steps_per_s=len(values) / max(now - self.last_time, 1e-9))
        self.write(record)
        if "loss" in record and self.progress is not None:
            self.progress.set_postfix(loss=f"{record['loss']:.4g}", refresh=False)
        self.pending = []
        self.last_time = now

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


def read_history(path: pathlib.Path, upto: int, primary: bool) -> list[dict]:
    """Records up to step `upto` (the checkpoint being resumed); later ones belong to lost work and go.

    The primary process rewrites the file without them (atomically), so the log matches the resumed run.
    """
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
