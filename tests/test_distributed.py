"""Several processes, really: two JAX processes on localhost train one model data-parallel with `fit`.

Each process is tests/distributed_worker.py with one CPU device; they meet through JAX's coordinator at
127.0.0.1:<free port> and all-reduce over gloo (JAX's default CPU collectives), exactly as two hosts would. The
one-process run of the same worker on the same global batches is the reference.
"""
import json
import os
import pathlib
import shutil
import signal
import socket
import subprocess
import sys

import numpy as np
import pytest
from helpers import assert_trees_close

from jaxseq.training import initialize_distributed

ROOT = pathlib.Path(__file__).resolve().parents[1]
WORKER = ROOT / "tests" / "distributed_worker.py"
STEPS = 12  # distributed_worker: 2 epochs of 6 batches, checkpoints every 4 steps and at epoch ends, 2 kept
TIMEOUT = 120


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch(out: pathlib.Path, tag: str, processes: int, kill_at: dict[int, str] | None = None) -> list:
    """Start the worker as `processes` processes (1: no distributed environment at all); stdout+stderr to logs."""
    port = _free_port()
    procs = []
    for i in range(processes):
        env = {k: v for k, v in os.environ.items()
               if k not in ("JAX_COORDINATOR_ADDRESS", "JAXSEQ_NUM_PROCESSES", "JAXSEQ_PROCESS_ID", "WORKER_KILL_AT")}
        env.update(JAX_PLATFORMS="cpu", PYTHONPATH=str(ROOT),
                   JAX_COMPILATION_CACHE_DIR=str(out.parent / "jax-cache"), JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0")
        if processes > 1:
            env.update(JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{port}", JAXSEQ_NUM_PROCESSES=str(processes),
                       JAXSEQ_PROCESS_ID=str(i))
        if kill_at and i in kill_at:
            env["WORKER_KILL_AT"] = kill_at[i]
        log = open(out.parent / f"{tag}-{i}.log", "w")
        procs.append(subprocess.Popen([sys.executable, str(WORKER), str(out), str(out.parent / f"{tag}-{i}.json")],
                                      env=env, stdout=log, stderr=subprocess.STDOUT))
        log.close()
    return procs


def _finish(procs: list, out: pathlib.Path, tag: str) -> list[dict]:
    """Wait for every process; fail with its log unless all exited 0; the result file of each."""
    for i, proc in enumerate(procs):
        try:
            code = proc.wait(timeout=TIMEOUT)
        except subprocess.TimeoutExpired:
            for p in procs:
                p.kill()
            code = "timeout"
        log = (out.parent / f"{tag}-{i}.log").read_text()
        assert code == 0, f"{tag} process {i} ended with {code}:\n{log[-3000:]}"
    return [json.loads((out.parent / f"{tag}-{i}.json").read_text()) for i in range(len(procs))]


def _steps(out: pathlib.Path) -> list[str]:
    return sorted(p.name for p in (out / "checkpoints").iterdir())


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """The one-process reference and an uninterrupted two-process run, side by side."""
    root = tmp_path_factory.mktemp("distributed")
    ref_out, pair_out = root / "ref" / "run", root / "pair" / "run"
    ref_out.parent.mkdir()
    pair_out.parent.mkdir()
    ref = _launch(ref_out, "ref", 1)
    pair = _launch(pair_out, "pair", 2)
    return {"ref": _finish(ref, ref_out, "ref")[0], "pair": _finish(pair, pair_out, "pair"), "ref_out": ref_out,
            "pair_out": pair_out, "root": root}


def _params(result: dict) -> dict:
    return {name: np.asarray(value) for name, value in result["params"].items()}


def test_two_processes_train_like_one_process_on_the_same_global_batches(runs):
    ref, pair = runs["ref"], runs["pair"]
    assert [r["process_index"] for r in pair] == [0, 1] and {r["process_count"] for r in pair} == {2}
    assert ref["process_count"] == 1
    assert len(ref["losses"]) == STEPS
    for result in pair:
        assert result["step"] == STEPS
        assert_trees_close(result["losses"], ref["losses"], rtol=0, atol=1e-5)
        assert_trees_close(result["evals"], ref["evals"], rtol=0, atol=1e-5)
        assert_trees_close(_params(result), _params(ref), rtol=0, atol=1e-5)
    # The trained model moved: equal losses are not equal because nothing happened.
    assert ref["losses"][str(STEPS)] < 0.7 * ref["losses"]["1"]


def test_two_processes_write_each_checkpoint_and_record_once(runs):
    out = runs["pair_out"]
    # The same kept checkpoints as the one-process run, and no half-written (tmp) folder from a second writer.
    assert _steps(out) == _steps(runs["ref_out"]) == ["12", "8"]
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if r["kind"] == "train"] == list(range(1, STEPS + 1))
    assert [r["step"] for r in records if r["kind"] == "eval"] == [6, 12]
    logs = [(runs["root"] / "pair" / f"pair-{i}.log").read_text() for i in range(2)]
    assert "done: 12 steps" in logs[0] and "done:" not in logs[1]  # only process 0 reports


def test_sigkill_of_one_process_then_restarting_both_resumes_exactly(runs):
    out = runs["root"] / "killed" / "run"
    out.parent.mkdir()
    # Process 1 SIGKILLs itself when it asks for epoch 1, batch 2 (step 9): after the step-8 checkpoint.
    procs = _launch(out, "killed", 2, kill_at={1: "1,2"})
    assert procs[1].wait(timeout=TIMEOUT) == -signal.SIGKILL, (out.parent / "killed-1.log").read_text()[-3000:]
    # Process 0 is left waiting for its peer in the next collective, as on a cluster, where the scheduler then
    # kills the whole job. The grace period lets it finish renaming the step-8 checkpoint into place.
    try:
        procs[0].wait(timeout=3)
    except subprocess.TimeoutExpired:
        procs[0].send_signal(signal.SIGKILL)
        procs[0].wait(timeout=TIMEOUT)
    assert "done:" not in (out.parent / "killed-0.log").read_text()
    last = max(int(name) for name in _steps(out) if name.isdigit())
    assert last in (6, 8)  # 8 unless process 0 was killed before it finished that checkpoint

    resumed = _finish(_launch(out, "resumed", 2), out, "resumed")
    assert f"resuming {out} from step {last}" in (out.parent / "resumed-0.log").read_text()
    uninterrupted = runs["pair"][0]
    for result in resumed:
        assert result["step"] == STEPS
        assert_trees_close(_params(result), _params(uninterrupted), rtol=0, atol=1e-5)
        # All the losses: those read back from metrics.jsonl up to the checkpoint and those trained after it.
        assert_trees_close(result["losses"], uninterrupted["losses"], rtol=0, atol=1e-5)
    assert _steps(out) == ["12", "8"]


def test_two_processes_walk_back_past_a_damaged_newest_checkpoint(runs):
    """Both processes resume from the newest intact checkpoint and agree on it: process 0 moves the damaged one
    aside, and the other process, which read it too, must not still list it when the run saves that step again
    (its manager would skip its part of the collective save and leave process 0 waiting)."""
    out = runs["root"] / "damaged" / "run"
    shutil.copytree(runs["pair_out"], out)
    newest = out / "checkpoints" / "12"
    largest = max((p for p in newest.rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)
    largest.write_bytes(largest.read_bytes()[: largest.stat().st_size // 2])
    resumed = _finish(_launch(out, "damaged", 2), out, "damaged")
    log = (out.parent / "damaged-0.log").read_text()
    assert "checkpoint step 12" in log and "resumed from step 8" in log, log[-3000:]
    for result in resumed:
        assert result["step"] == STEPS
        assert_trees_close(_params(result), _params(runs["pair"][0]), rtol=0, atol=1e-5)
    assert _steps(out) == ["12", "8"] and (out / "damaged-checkpoints" / "12").is_dir()


@pytest.mark.parametrize("variable", ["JAXSEQ_NUM_PROCESSES", "JAXSEQ_PROCESS_ID"])
def test_initialize_distributed_names_a_bad_variable(monkeypatch, variable):
    monkeypatch.setenv(variable, "two")
    with pytest.raises(ValueError, match=f"{variable}='two': expected an int"):
        initialize_distributed()
