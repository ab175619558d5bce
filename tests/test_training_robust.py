"""Run folders that go wrong: damaged checkpoints (resume and restore walk back), two processes in one folder (the
lock), and folders that are not jaxseq runs."""
from __future__ import annotations

import logging
import os
import pathlib
import re
import shutil
import signal
import subprocess
import sys
import types

import numpy as np
import pytest
from helpers import assert_trees_close, subprocess_env
from test_training import config, init_params, loss_fn, make_arrays, train_losses

from jaxseq.training import (ArrayBatches, Callback, RunFolderBusy, RunFolderLock, fit, load_run_config,
                             restore_params)
from jaxseq.training.checkpoints import Checkpoints


def steps_in(folder: pathlib.Path) -> list[int]:
    return sorted(int(p.name) for p in folder.iterdir() if p.name.isdigit())


def truncate_largest(step_dir: pathlib.Path) -> pathlib.Path:
    path = max((p for p in step_dir.rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)
    path.write_bytes(path.read_bytes()[:path.stat().st_size // 2])
    return path


def empty_meta(step_dir: pathlib.Path) -> pathlib.Path:
    path = step_dir / "meta" / "metadata"
    path.write_bytes(b"")
    return path


def delete_state_metadata(step_dir: pathlib.Path) -> pathlib.Path:
    path = step_dir / "state" / "_METADATA"
    path.unlink()
    return path


def run(tmp_path, name="run", callbacks=(), **kw):
    return fit(config(tmp_path, name, checkpoint_every=3, **kw), init_params=init_params, loss_fn=loss_fn,
               train=ArrayBatches(make_arrays(), 8, seed=0), run_config={"model": "linear"}, callbacks=callbacks)


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """A finished 16-step run (checkpoints 12, 15, 16) to copy and damage."""
    tmp = tmp_path_factory.mktemp("finished")
    return tmp / "run", run(tmp)


@pytest.mark.parametrize("damage", [truncate_largest, empty_meta, delete_state_metadata])
def test_resume_walks_back_past_a_damaged_newest_checkpoint(finished, tmp_path, caplog, damage):
    source, ref = finished
    shutil.copytree(source, tmp_path / "run")
    checkpoints = tmp_path / "run" / "checkpoints"
    damaged = damage(checkpoints / "16")
    # epochs=3 trains on from the newest intact checkpoint (15), through the damaged step again.
    with caplog.at_level(logging.WARNING, logger="jaxseq.training"):
        more = run(tmp_path, epochs=3)
    moved = tmp_path / "run" / "damaged-checkpoints" / "16"
    [message] = [r.getMessage() for r in caplog.records if r.name == "jaxseq.training"]
    assert message.startswith(f"checkpoint step 16 in {checkpoints} is damaged ({damaged}: ")
    assert message.endswith(f"; moved it to {moved} and resumed from step 15")
    assert moved.is_dir()  # kept for inspection, out of the manager's way
    assert more.step == 24 and train_losses(more.history)[:16] == train_losses(ref.history)
    # The same with the original epochs: step 16 is trained again, exactly as before.
    shutil.rmtree(checkpoints)
    shutil.copytree(source / "checkpoints", checkpoints)
    shutil.copy(source / "metrics.jsonl", tmp_path / "run" / "metrics.jsonl")
    damage(checkpoints / "16")
    again = run(tmp_path)
    assert not again.already_finished and train_losses(again.history) == train_losses(ref.history)
    assert steps_in(checkpoints) == [12, 15, 16]  # step 16 saved anew
    assert (tmp_path / "run" / "damaged-checkpoints" / "16.1").is_dir()  # the earlier one is not overwritten
    assert_trees_close(again.params, ref.params, rtol=0, atol=0)


def test_restore_params_walks_back_and_names_the_file_when_nothing_is_left(finished, tmp_path, caplog):
    source, ref = finished
    out = tmp_path / "run"
    shutil.copytree(source, out)
    checkpoints = out / "checkpoints"
    truncate_largest(checkpoints / "16")
    with caplog.at_level(logging.WARNING, logger="jaxseq.training"):
        params = restore_params(str(out), init_params, which="latest")
    assert "checkpoint step 16 is damaged" in caplog.text and "restored step 15" in caplog.text
    expected = restore_params(str(source), init_params, which="latest")
    assert not np.array_equal(np.asarray(params["w"]), np.asarray(expected["w"]))  # step 15's, not 16's
    assert steps_in(checkpoints) == [12, 15, 16]  # a reader moves nothing
    truncate_largest(checkpoints / "15")
    delete_state_metadata(checkpoints / "12")
    with pytest.raises(ValueError) as info:
        restore_params(str(out), init_params)
    message = str(info.value)
    assert "\n" not in message and f"no intact checkpoint in {checkpoints}" in message
    assert "step 16 is damaged" in message and str(checkpoints / "16" / "state") in message
    assert "(and 2 older damaged one(s))" in message
    with pytest.raises(ValueError, match=r"no checkpoint this run can resume \(checkpoint step 16 is damaged"):
        run(tmp_path)
    assert steps_in(checkpoints) == [12, 15, 16]  # nothing intact to resume from: nothing moved either


HOLDER = "import sys, time; from jaxseq.training import RunFolderLock; RunFolderLock(sys.argv[1]).acquire(); " \
         "print('locked', flush=True); time.sleep(300)"


def test_a_run_folder_in_use_is_refused_until_its_holder_dies(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(out)], env=subprocess_env(), stdout=subprocess.PIPE,
                              text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        busy = rf"run folder {re.escape(str(out))} is in use by another training process \(pid {holder.pid} on host "
        with pytest.raises(RunFolderBusy, match=busy + r".* since .*\); wait for it"):
            run(tmp_path)
        assert not (out / "metrics.jsonl").exists() and not (out / "checkpoints").exists()
        holder.send_signal(signal.SIGKILL)  # the OS drops a dead process's lock: no stale lock is left
        holder.wait()
        assert run(tmp_path).step == 16
        # The lock is held while fit trains, and released when it returns: the same process can go on.
        refused = []

        class TryTheLock(Callback):
            def on_train_begin(self, out_dir, step):
                with pytest.raises(RunFolderBusy, match=rf"\(pid {os.getpid()} on host") as info:
                    RunFolderLock(out_dir).acquire()
                refused.append(info.value)

        assert run(tmp_path, restart=True, callbacks=[TryTheLock()]).step == 16 and len(refused) == 1
        assert run(tmp_path).already_finished
    finally:
        holder.kill()
        holder.wait()
    assert f'"pid": {os.getpid()}' in (out / "run.lock").read_text()


def test_load_run_config_tells_a_jaxseq_run(finished, tmp_path):
    source, _ = finished
    assert load_run_config(str(source)) == {"model": "linear"}
    # An Orbax checkpoint written by something else: readable, but no run_config.
    other = Checkpoints(tmp_path / "other" / "checkpoints")
    other.save(1, types.SimpleNamespace(params={"w": np.zeros(2)}, opt_state={}, step=np.asarray(1, np.int32),
                                        key=np.zeros(2, np.uint32)), {"hello": 1}, None)
    other.close()
    with pytest.raises(ValueError, match=r"other is not a jaxseq training run folder: its checkpoint \(step 1\)"):
        load_run_config(str(tmp_path / "other"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no checkpoints"):
        load_run_config(str(tmp_path / "empty"))
