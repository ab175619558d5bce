"""Training loop: steps, NaN guard, checkpoints, exact resume (SIGTERM in-process, SIGKILL in a subprocess),
many devices (8 forced CPU devices in a subprocess), mixed precision and bad input."""
from __future__ import annotations

import importlib.util
import json
import os
import pathlib
import signal
import subprocess
import sys
import textwrap
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import assert_trees_close, subprocess_env

from jaxseq import training
from jaxseq.training import (ArrayBatches, LossCurve, NonFiniteError, TrainConfig, fit, load_run_config,
                             restore_params)
from jaxseq.training.checkpoints import diff_dicts
from jaxseq.training.config import validate_config

ROOT = pathlib.Path(__file__).resolve().parents[1]
FEATURES = 4


def init_params(key):
    return {"w": jax.random.normal(key, (FEATURES, 1)) * 0.1, "b": jnp.zeros((1,))}


def loss_fn(params, batch, dropout_key):
    """Linear regression with input dropout, so the per-step keys matter for exact resume."""
    x = batch["x"]
    if dropout_key is not None:
        x = jnp.where(jax.random.bernoulli(dropout_key, 0.8, x.shape), x / 0.8, 0.0)
    pred = (x @ params["w"] + params["b"])[:, 0]
    err = pred - batch["y"]
    return jnp.mean(err ** 2), {"mae": jnp.mean(jnp.abs(err))}


def make_arrays(n=64, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, FEATURES)).astype(np.float32)
    y = (x @ np.array([1.0, -2.0, 0.5, 0.0], np.float32) + 0.3).astype(np.float32)
    return {"x": x, "y": y}


class Scripted:
    """A BatchSource wrapper that can poison batches with NaN or send this process a signal at a batch."""

    def __init__(self, inner, *, nan_from=None, signal_at=None):
        self.inner, self.nan_from, self.signal_at = inner, nan_from, signal_at

    def num_batches(self, epoch):
        return self.inner.num_batches(epoch)

    def batch(self, epoch, index):
        batch = self.inner.batch(epoch, index)
        if self.nan_from is not None and (epoch, index) >= self.nan_from:
            batch = {**batch, "x": np.full_like(batch["x"], np.nan)}
        if self.signal_at == (epoch, index):
            os.kill(os.getpid(), signal.SIGTERM)
        return batch


def config(tmp_path, name="run", **kw):
    defaults = dict(out_dir=str(tmp_path / name), epochs=2, batch_size=8, learning_rate=0.05, log_every=1,
                    progress=False)
    return TrainConfig(**{**defaults, **kw})


def train_losses(history):
    return [(r["step"], r["loss"]) for r in history if r["kind"] == "train"]


def test_array_batches_order_is_a_pure_function_of_seed_and_epoch():
    arrays = {"x": np.arange(10)[:, None], "y": np.arange(10)}
    a, b = ArrayBatches(arrays, 3, seed=1), ArrayBatches(arrays, 3, seed=1)
    assert a.num_batches(0) == 3  # the 10th example is dropped
    np.testing.assert_array_equal(a.batch(1, 2)["x"], b.batch(1, 2)["x"])
    assert not np.array_equal(a.order(0), a.order(1))  # reshuffled each epoch
    np.testing.assert_array_equal(a.batch(0, 1)["x"][:, 0], a.batch(0, 1)["y"])  # rows stay aligned
    assert ArrayBatches(arrays, 3, seed=1, drop_remainder=False).num_batches(0) == 4
    np.testing.assert_array_equal(ArrayBatches(arrays, 5, seed=1, shuffle=False).batch(0, 1)["y"], np.arange(5, 10))
    with pytest.raises(ValueError, match="same leading"):
        ArrayBatches({"x": np.zeros(3), "y": np.zeros(4)}, 2, seed=0)
    with pytest.raises(IndexError, match="out of range"):
        a.batch(0, 3)


def test_optimizer_schedules_and_clipping():
    _, schedule = training.make_optimizer(
        TrainConfig(out_dir="unused", schedule="warmup_cosine", warmup_steps=2, learning_rate=1.0), total_steps=10)
    np.testing.assert_allclose([schedule(0), schedule(1), schedule(2), schedule(10)], [0.0, 0.5, 1.0, 0.0],
                               atol=1e-6)
    tx, _ = training.make_optimizer(TrainConfig(out_dir="unused", optimizer="sgd", learning_rate=1.0,
                                                clip_norm=2.0), total_steps=10)
    grads = {"w": jnp.full((3,), 100.0)}
    updates, _ = tx.update(grads, tx.init(grads))
    np.testing.assert_allclose(float(jnp.linalg.norm(updates["w"])), 2.0, rtol=1e-6)  # clipped to clip_norm
    with pytest.raises(ValueError, match="weight_decay=0.1: expected 0 with optimizer='adam'"):
        validate_config(TrainConfig(out_dir="x", weight_decay=0.1))


def test_train_step_skips_non_finite_and_donates_state(key):
    cfg = TrainConfig(out_dir="unused", learning_rate=0.1)
    tx, _ = training.make_optimizer(cfg, total_steps=10)
    step = training.make_train_step(loss_fn, tx)
    state = training.create_train_state(init_params(key), tx, key)
    batch = {k: v[:8] for k, v in make_arrays().items()}
    good_state, metrics = step(state, batch)
    assert state.params["w"].is_deleted()  # donated
    assert bool(metrics["finite"]) and int(good_state.step) == 1
    before = jax.device_get((good_state.params, good_state.opt_state))
    bad_state, metrics = step(good_state, {**batch, "x": np.full_like(batch["x"], np.nan)})
    assert not bool(metrics["finite"]) and int(bad_state.step) == 2
    after = jax.device_get((bad_state.params, bad_state.opt_state))
    assert_trees_close(after, before, rtol=0, atol=0)  # bitwise: the NaN update was not applied
    next_state, metrics = step(bad_state, batch)
    assert bool(metrics["finite"])
    assert not np.array_equal(next_state.params["w"], before[0]["w"])


def test_mixed_precision_keeps_float32_params_and_close_loss(key):
    cfg = TrainConfig(out_dir="unused")
    tx, _ = training.make_optimizer(cfg, total_steps=10)
    batch = {k: v[:8] for k, v in make_arrays().items()}
    params = init_params(key)
    state = training.create_train_state(params, tx, key)
    _, m_full = training.make_train_step(loss_fn, tx, donate=False)(state, batch)
    half, m = training.make_train_step(loss_fn, tx, mixed_precision=True, donate=False)(state, batch)
    assert half.params["w"].dtype == jnp.float32 and m["loss"].dtype == jnp.float32
    # bfloat16 has 8 mantissa bits: the loss agrees to ~1e-2 relative, not to float32 precision.
    np.testing.assert_allclose(float(m["loss"]), float(m_full["loss"]), rtol=3e-2)
    assert float(m["loss"]) != float(m_full["loss"])  # the compute really ran in bfloat16
    assert not np.array_equal(half.params["w"], params["w"])


def test_fit_resume_finish_restart_and_sigterm(tmp_path):
    arrays = make_arrays()
    evaluate = training.make_eval_fn(loss_fn, ArrayBatches(make_arrays(16, seed=1), 8, seed=0, shuffle=False))
    run_config = {"model": "linear", "features": FEATURES}
    ref = fit(config(tmp_path, "ref", checkpoint_every=3), init_params=init_params, loss_fn=loss_fn,
              train=ArrayBatches(arrays, 8, seed=0), evaluate=evaluate, run_config=run_config,
              callbacks=[LossCurve()])
    assert ref.step == 16 and not ref.already_finished
    assert len(train_losses(ref.history)) == 16
    assert [r["step"] for r in ref.history if r["kind"] == "eval"] == [8, 16]
    out = tmp_path / "ref"
    assert (out / "loss.png").stat().st_size > 0
    assert [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()] == ref.history
    assert sorted(int(p.name) for p in (out / "checkpoints").iterdir() if p.name.isdigit()) == [12, 15, 16]
    assert load_run_config(str(out)) == run_config
    assert_trees_close(restore_params(str(out), init_params, which="latest"), ref.params, rtol=0, atol=0)

    again = fit(config(tmp_path, "ref", checkpoint_every=3), init_params=init_params, loss_fn=loss_fn,
                train=ArrayBatches(arrays, 8, seed=0), evaluate=evaluate, run_config=run_config)
    assert again.already_finished and again.step == 16 and again.history == ref.history

    # SIGTERM at epoch 1 batch 2 (step 11): a checkpoint is saved there, then the same call resumes exactly.
    interrupted = config(tmp_path, "term", checkpoint_every=3)
    with pytest.raises(SystemExit) as exit_info:
        fit(interrupted, init_params=init_params, loss_fn=loss_fn,
            train=Scripted(ArrayBatches(arrays, 8, seed=0), signal_at=(1, 2)), evaluate=evaluate,
            run_config=run_config)
    assert exit_info.value.code == 128 + signal.SIGTERM
    assert 11 in [int(p.name) for p in (tmp_path / "term" / "checkpoints").iterdir() if p.name.isdigit()]
    resumed = fit(interrupted, init_params=init_params, loss_fn=loss_fn, train=ArrayBatches(arrays, 8, seed=0),
                  evaluate=evaluate, run_config=run_config)
    assert train_losses(resumed.history) == train_losses(ref.history)  # exact, float for float
    assert_trees_close(resumed.params, ref.params, rtol=0, atol=0)

    # restart=True throws the folder's run away and trains from scratch: the same run again.
    fresh = fit(config(tmp_path, "term", checkpoint_every=3, restart=True), init_params=init_params,
                loss_fn=loss_fn, train=ArrayBatches(arrays, 8, seed=0), evaluate=evaluate, run_config=run_config)
    assert not fresh.already_finished and train_losses(fresh.history) == train_losses(ref.history)

    # A finished run given more epochs trains further from where it stopped.
    more = fit(config(tmp_path, "ref", checkpoint_every=3, epochs=3), init_params=init_params, loss_fn=loss_fn,
               train=ArrayBatches(arrays, 8, seed=0), evaluate=evaluate, run_config=run_config)
    assert more.step == 24 and train_losses(more.history)[:16] == train_losses(ref.history)

    # Bad input against that folder: another run_config, another model, another optimizer.
    with pytest.raises(ValueError, match=r"different run_config: features: 4 in the checkpoint vs 5 now"):
        fit(config(tmp_path, "ref", epochs=4), init_params=init_params, loss_fn=loss_fn,
            train=ArrayBatches(arrays, 8, seed=0), run_config={**run_config, "features": 5})

    def wider(key):
        return {"w": jnp.zeros((FEATURES, 2)), "b": jnp.zeros((2,))}

    with pytest.raises(ValueError, match=r"another model: 'b' has shape \(1,\) in the checkpoint but \(2,\)"):
        fit(config(tmp_path, "ref", epochs=4), init_params=wider, loss_fn=loss_fn,
            train=ArrayBatches(arrays, 8, seed=0), run_config=run_config)
    with pytest.raises(ValueError, match=r"fit this model: .*'w' has shape \(4, 1\) in the checkpoint but \(4, 2\)"):
        restore_params(str(out), wider)
    with pytest.raises(ValueError, match=r"optimizer: 'adam' in the checkpoint vs 'sgd' now"):
        fit(config(tmp_path, "ref", epochs=4, optimizer="sgd"), init_params=init_params, loss_fn=loss_fn,
            train=ArrayBatches(arrays, 8, seed=0), run_config=run_config)


def test_run_config_differences_name_nested_keys():
    # The CLI commands nest their settings ({"forecast": {...}, "scaler": {...}}): name the differing leaves.
    stored = {"forecast": {"hidden_size": 32, "features": ["Volume"], "model": "lstm"}, "scaler": {"mean": [1.0]}}
    current = {"forecast": {"hidden_size": 16, "features": ["Volume"], "model": "lstm", "new": 1},
               "scaler": {"mean": [1.0]}}
    assert diff_dicts(stored, current) == ["forecast.hidden_size: 32 in the checkpoint vs 16 now",
                                                     "forecast.new: '<absent>' in the checkpoint vs 1 now"]

def test_best_checkpoint_is_kept_and_restored(tmp_path):
    scores = iter([3.0, 1.0, 2.0, 4.0, 5.0])  # best at the second eval (step 4)
    seen = {}

    def evaluate(params):
        value = next(scores)
        seen[value] = jax.device_get(params)
        return {"score": value}

    cfg = config(tmp_path, epochs=5, batch_size=16, eval_every=2, keep_checkpoints=1, best_metric="score",
                 log_every=2)
    arrays = make_arrays(32)
    fit(cfg, init_params=init_params, loss_fn=loss_fn, train=ArrayBatches(arrays, 16, seed=0), evaluate=evaluate)
    kept = sorted(int(p.name) for p in (tmp_path / "run" / "checkpoints").iterdir() if p.name.isdigit())
    assert kept == [4, 10]  # the best (step 4) and the last one
    assert_trees_close(restore_params(str(tmp_path / "run")), seen[1.0], rtol=0, atol=0)
    assert_trees_close(restore_params(str(tmp_path / "run"), which="latest"), seen[5.0], rtol=0, atol=0)
    if importlib.util.find_spec("tensorboardX"):  # the optional `tb` extra mirrors metrics.jsonl
        assert list((tmp_path / "run" / "tensorboard").glob("events.out.tfevents*"))


def test_non_finite_steps_stop_with_step_and_batch_and_keep_last_good_checkpoint(tmp_path):
    arrays = make_arrays()
    cfg = config(tmp_path, epochs=3, checkpoint_every=4, max_bad_steps=3)
    train = Scripted(ArrayBatches(arrays, 8, seed=0), nan_from=(1, 2))  # step 11 onwards is NaN
    with pytest.raises(NonFiniteError, match=r"3 consecutive .* from step 11 \(epoch 1, batch 2\) to step 13 "
                                             r"\(epoch 1, batch 4\).* Last good checkpoint: step 8"):
        fit(cfg, init_params=init_params, loss_fn=loss_fn, train=train)
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [(r["step"], r["batch"]) for r in records if r["kind"] == "nonfinite"] == [(11, 2), (12, 3), (13, 4)]
    params = restore_params(str(tmp_path / "run"), init_params)
    assert all(np.isfinite(np.asarray(leaf)).all() for leaf in jax.tree.leaves(params))
    # Two bad steps then good data: training goes on, skipping them.
    train = Scripted(ArrayBatches(arrays, 8, seed=0), nan_from=(1, 2))
    train.batch = lambda e, i, inner=train.batch: inner(e, i) if (e, i) < (1, 4) else train.inner.batch(e, i)
    done = fit(config(tmp_path, "skip", max_bad_steps=3), init_params=init_params, loss_fn=loss_fn, train=train)
    assert done.step == 16 and sum(r["kind"] == "nonfinite" for r in done.history) == 2


def test_make_eval_fn_warns_when_the_source_drops_examples():
    with pytest.warns(UserWarning, match=r"leaves out 4 of its 20 examples .* drop_remainder=False"):
        training.make_eval_fn(loss_fn, ArrayBatches(make_arrays(20), 8, seed=0, shuffle=False))
    evaluate = training.make_eval_fn(loss_fn, ArrayBatches(make_arrays(20), 8, seed=0, shuffle=False,
                                                           drop_remainder=False))
    assert set(evaluate(init_params(jax.random.PRNGKey(0)))) >= {"loss"}

def test_non_finite_steps_at_the_end_are_not_reported_as_success(tmp_path):
    arrays = make_arrays(32)  # 4 batches of 8 per epoch
    # Every step NaN, fewer steps (4) than max_bad_steps: no good step, so no checkpoint, and fit says so.
    all_bad = Scripted(ArrayBatches(arrays, 8, seed=0), nan_from=(0, 0))
    with pytest.raises(NonFiniteError, match=r"training ended after 4 consecutive .* from step 1 .* to step 4 .*"
                                             r"No checkpoint was saved before them, so .* holds none"):
        fit(config(tmp_path, "all-bad", epochs=1), init_params=init_params, loss_fn=loss_fn, train=all_bad)
    # Good steps, then the last two NaN: the error names them and the last good checkpoint (end of epoch 1).
    tail_bad = Scripted(ArrayBatches(arrays, 8, seed=0), nan_from=(1, 2))
    with pytest.raises(NonFiniteError, match=r"training ended after 2 consecutive .* from step 7 \(epoch 1, "
                                             r"batch 2\) to step 8 .* Last good checkpoint: step 4"):
        fit(config(tmp_path, "tail-bad"), init_params=init_params, loss_fn=loss_fn, train=tail_bad)


def test_bad_out_dir_and_missing_run_folder(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    with pytest.raises(ValueError, match="out_dir=.*is not a writable folder"):
        fit(TrainConfig(out_dir=str(blocker / "run"), progress=False), init_params=init_params, loss_fn=loss_fn,
            train=ArrayBatches(make_arrays(), 8, seed=0))
    with pytest.raises(ValueError, match="TrainConfig.optimizer='lion'"):
        fit(TrainConfig(out_dir=str(tmp_path), optimizer="lion"), init_params=init_params, loss_fn=loss_fn,
            train=ArrayBatches(make_arrays(), 8, seed=0))
    with pytest.raises(ValueError, match=r"TrainConfig.batch_size=32 but the training BatchSource makes batches of "
                                         r"8 \(train.batch_size\)"):
        fit(TrainConfig(out_dir=str(tmp_path / "mismatch")), init_params=init_params, loss_fn=loss_fn,
            train=ArrayBatches(make_arrays(), 8, seed=0))
    with pytest.raises(FileNotFoundError, match="no checkpoints"):
        restore_params(str(tmp_path / "nothing"))
    with pytest.raises(FileNotFoundError, match="no checkpoints"):
        load_run_config(str(tmp_path / "nothing"))


KILLABLE = textwrap.dedent("""
    import logging, sys, time
    logging.getLogger("jaxseq.training").addHandler(logging.StreamHandler(sys.stdout))
    logging.getLogger("jaxseq.training").setLevel(logging.INFO)
    sys.path.insert(0, {tests!r})
    from test_training import Scripted, init_params, loss_fn, make_arrays
    from jaxseq.training import ArrayBatches, TrainConfig, fit

    class Slow(Scripted):  # a slow input pipeline: a window in which to kill the process
        def batch(self, epoch, index):
            time.sleep(0.2)
            return super().batch(epoch, index)

    cfg = TrainConfig(out_dir=sys.argv[1], epochs=3, batch_size=8, learning_rate=0.05, log_every=1,
                      checkpoint_every=4, progress=False)
    fit(cfg, init_params=init_params, loss_fn=loss_fn, train=Slow(ArrayBatches(make_arrays(), 8, seed=0)),
        run_config={{"model": "linear"}})
""")


def test_sigkill_mid_run_then_same_command_resumes_exactly(tmp_path):
    """A real process killed with SIGKILL after its step-12 checkpoint; the same command finishes the run."""
    out = tmp_path / "run"
    cmd = [sys.executable, "-c", KILLABLE.format(tests=str(ROOT / "tests")), str(out)]
    # Both processes compile the same step: the second one reads it from the persistent compilation cache.
    env = subprocess_env(JAX_COMPILATION_CACHE_DIR=str(tmp_path / "jax-cache"), JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0")
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    metrics = out / "metrics.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        if metrics.exists() and '"step": 13,' in metrics.read_text():
            break
        time.sleep(0.05)
    assert proc.poll() is None, "the slowed run ended before it could be killed: " + proc.stderr.read().decode()[-2000:]
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert b"done:" not in proc.stdout.read()
    # Normally killed between the step-12 and step-16 checkpoints; a very busy machine may let it run further.
    last = max(int(p.name) for p in (out / "checkpoints").iterdir() if p.name.isdigit())
    assert 12 <= last < 24
    resumed = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"resuming {out} from step {last} (epoch {last // 8}, batch {last % 8})" in resumed.stdout, resumed.stdout

    ref = fit(config(tmp_path, "ref", epochs=3, checkpoint_every=4), init_params=init_params, loss_fn=loss_fn,
              train=ArrayBatches(make_arrays(), 8, seed=0), run_config={"model": "linear"})
    history = [json.loads(line) for line in metrics.read_text().splitlines()]
    assert len(train_losses(history)) == 24
    assert train_losses(history) == train_losses(ref.history)  # bitwise on CPU, across processes


MULTI_DEVICE = textwrap.dedent("""
    import json, sys
    import jax
    sys.path.insert(0, {tests!r})
    from test_training import init_params, loss_fn, make_arrays
    from jaxseq.training import ArrayBatches, TrainConfig, fit
    assert jax.device_count() == 8, jax.devices()
    cfg = TrainConfig(out_dir={out!r} + "/d8", epochs=2, batch_size=8, learning_rate=0.05, log_every=1,
                      progress=False)
    result = fit(cfg, init_params=init_params, loss_fn=loss_fn, train=ArrayBatches(make_arrays(), 8, seed=0))
    sharding = result.params["w"].sharding
    assert len(sharding.device_set) == 8 and sharding.is_fully_replicated, sharding
    try:
        fit(TrainConfig(out_dir={out!r} + "/bad", batch_size=12, progress=False), init_params=init_params,
            loss_fn=loss_fn, train=ArrayBatches(make_arrays(), 12, seed=0))
        error = None
    except ValueError as err:
        error = str(err)
    print(json.dumps({{"losses": [r["loss"] for r in result.history if r["kind"] == "train"], "error": error}}))
""")


def test_eight_cpu_devices_match_one_device_and_reject_ragged_batches(tmp_path):
    code = MULTI_DEVICE.format(tests=str(ROOT / "tests"), out=str(tmp_path))
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                          env=subprocess_env(XLA_FLAGS="--xla_force_host_platform_device_count=8"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    one = fit(config(tmp_path, "one"), init_params=init_params, loss_fn=loss_fn,
              train=ArrayBatches(make_arrays(), 8, seed=0))
    assert jax.device_count() == 1 and len(result["losses"]) == 16
    # The data-parallel gradient is summed over devices in another order: equal to float32 rounding, not bitwise.
    np.testing.assert_allclose(result["losses"], [loss for _, loss in train_losses(one.history)], rtol=1e-5,
                               atol=1e-6)
    assert "batch of 12 examples does not divide over 8 devices" in result["error"]
    # A checkpoint written by the 8-device run restores on this 1-device process.
    assert_trees_close(restore_params(str(tmp_path / "d8"), init_params), one.params)
