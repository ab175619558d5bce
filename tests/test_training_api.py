"""fit's extension points: a custom optax `tx`, `Callback` hooks, `LossCurve`, and messages through logging."""
from __future__ import annotations

import logging

import numpy as np
import optax
import pytest
from test_training import config, init_params, loss_fn, make_arrays, train_losses

from jaxseq.training import ArrayBatches, Callback, LossCurve, fit


class Recording(Callback):
    def __init__(self):
        self.calls = []

    def on_train_begin(self, out_dir, step):
        self.calls.append(("begin", out_dir, step))

    def on_record(self, record):
        self.calls.append(("record", record))

    def on_train_end(self, result, out_dir):
        self.calls.append(("end", result, out_dir))


def test_custom_tx_replaces_the_config_optimizer_and_logs_an_injected_learning_rate(tmp_path):
    train = ArrayBatches(make_arrays(), 8, seed=0)
    # The config's own optimizer (sgd, no clipping) and the same optimizer given as tx: the same trajectory.
    built = fit(config(tmp_path, "built", optimizer="sgd", clip_norm=None), init_params=init_params,
                loss_fn=loss_fn, train=train)
    injected = fit(config(tmp_path, "injected", learning_rate=7.0, clip_norm=-1.0), init_params=init_params,
                   loss_fn=loss_fn, train=train, tx=optax.inject_hyperparams(optax.sgd)(learning_rate=0.05))
    np.testing.assert_allclose([loss for _, loss in train_losses(injected.history)],
                               [loss for _, loss in train_losses(built.history)], rtol=1e-6)
    # The config's learning_rate (7.0) is not used, and not logged: the tx's own is.
    assert {r["lr"] for r in injected.history if r["kind"] == "train"} == {np.float32(0.05).item()}
    plain = fit(config(tmp_path, "plain"), init_params=init_params, loss_fn=loss_fn, train=train,
                tx=optax.sgd(0.05))
    assert not any("lr" in r for r in plain.history)  # unknown, so not made up

    # Resuming checks which optimizer wrote the checkpoint, but not the config's unused optimizer fields.
    with pytest.raises(ValueError, match=r"written with the optimizer from custom, but this fit uses TrainConfig"):
        fit(config(tmp_path, "plain", epochs=3), init_params=init_params, loss_fn=loss_fn, train=train)
    more = fit(config(tmp_path, "plain", epochs=3, learning_rate=1.0), init_params=init_params, loss_fn=loss_fn,
               train=train, tx=optax.sgd(0.05))
    assert more.step == 24
    with pytest.raises(ValueError, match="tx must be an optax.GradientTransformation, got function"):
        fit(config(tmp_path, "bad"), init_params=init_params, loss_fn=loss_fn, train=train, tx=optax.sgd)


def test_callbacks_see_begin_every_record_and_end_and_loss_curve_draws(tmp_path, caplog):
    train = ArrayBatches(make_arrays(), 8, seed=0)
    recording = Recording()
    with caplog.at_level(logging.INFO, logger="jaxseq.training"):
        result = fit(config(tmp_path, epochs=1), init_params=init_params, loss_fn=loss_fn, train=train,
                     callbacks=[recording, LossCurve("curve.png", title="demo")])
    out = tmp_path / "run"
    assert recording.calls[0] == ("begin", out, 0)
    assert [r for kind, *r in recording.calls if kind == "record"] == [[r] for r in result.history]
    assert recording.calls[-1] == ("end", result, out)
    assert (out / "curve.png").stat().st_size > 0
    assert not (out / "loss.png").exists()  # fit draws nothing itself
    assert any(m.startswith("done: 8 steps") for m in caplog.messages)

    recording.calls.clear()
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="jaxseq.training"):
        resumed = fit(config(tmp_path, epochs=2), init_params=init_params, loss_fn=loss_fn, train=train,
                      callbacks=[recording])
        assert recording.calls[0] == ("begin", out, 8) and recording.calls[-1] == ("end", resumed, out)
        assert f"resuming {out} from step 8 (epoch 1, batch 0)" in caplog.messages
        recording.calls.clear()
        fit(config(tmp_path, epochs=2), init_params=init_params, loss_fn=loss_fn, train=train, callbacks=[recording])
    assert recording.calls == []  # an already finished run trains nothing and calls no hook
    assert any("already finished at step 16" in m for m in caplog.messages)
