"""Forecasting: CSV validation, windows and splits, no leakage, baselines, metrics, models, CLI end to end."""
from __future__ import annotations

import io
import json
import logging
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxseq import metrics
from jaxseq.data import timeseries as ts
from jaxseq.models import forecasting as fc
from jaxseq.tasks import forecast

HEADER = "Date,Open,Close,Volume\n"


def write_csv(path: pathlib.Path, rows: list[str], header: str = HEADER) -> pathlib.Path:
    path.write_text(header + "\n".join(rows) + "\n")
    return path


def daily_rows(values, start="2020-01-01", volume=None) -> list[str]:
    dates = np.datetime64(start) + np.arange(len(values))
    volume = np.arange(1, len(values) + 1) if volume is None else volume
    return [f"{d},{v:.6f},{v:.6f},{w}" for d, v, w in zip(dates, values, volume)]


def series_of(values) -> ts.Series:
    values = np.asarray(values, np.float64)
    return ts.Series(dates=np.datetime64("2020-01-01") + np.arange(len(values)), values=values[:, None],
                     columns=("Close",), source="test")


# --- reading and validating CSVs ------------------------------------------------------------------------


def test_read_csv_target_first_then_features(tmp_path):
    path = write_csv(tmp_path / "ok.csv", daily_rows([1.0, 2.0, 3.0]))
    s = ts.read_csv(path, column="Close", features=("Volume",))
    assert s.columns == ("Close", "Volume")
    np.testing.assert_array_equal(s.values, [[1, 1], [2, 2], [3, 3]])
    assert str(s.dates[0]) == "2020-01-01" and s.dates.dtype == np.dtype("datetime64[D]")


@pytest.mark.parametrize("rows, match", [
    (["2020-01-01,1,1,1", "2020-01-02,2,,2", "2020-01-03,3,3,3"], r"line 3, column 'Close': missing value ''"),
    (["2020-01-01,1,1,1", "2020-01-02,2,null,2"], r"line 3, column 'Close': missing value 'null'"),
    (["2020-01-01,1,1,1", "2020-01-02,2,NaN,2"], r"line 3, column 'Close': missing value 'NaN'"),
    (["2020-01-01,1,1,1", "2020-01-02,2,12.3x,2"], r"line 3, column 'Close': '12.3x' is not a number"),
    (["2020-01-01,1,1,1", "2020-01-02,2,inf,2"], r"line 3, column 'Close': 'inf' is not finite"),
    (["2020-01-01,1,1,1", "2020-01-01,2,2,2"], r"line 3, column 'Date': duplicate date 2020-01-01 .*line 2"),
    (["2020-01-02,1,1,1", "2020-01-01,2,2,2"], r"line 3, column 'Date': date 2020-01-01 is not after"),
    (["2020-01-01,1,1,1", "01/02/2020,2,2,2"], r"line 3, column 'Date': cannot read date '01/02/2020'"),
    (["2020-01-01,1,1,1", ",2,2,2"], r"line 3, column 'Date': missing date"),
    (["2020-01-01,1,1,1", "2020-01-02,2,2"], r"line 3 has 3 cells but the header has 4"),
    ([], r"no data rows"),
])
def test_bad_csv_names_line_and_column(tmp_path, rows, match):
    path = write_csv(tmp_path / "bad.csv", rows)
    with pytest.raises(ValueError, match=match):
        ts.read_csv(path)


def test_bad_feature_cell_is_named_too(tmp_path):
    path = write_csv(tmp_path / "bad.csv", ["2020-01-01,1,1,1", "2020-01-02,2,2,oops"])
    with pytest.raises(ValueError, match=r"line 3, column 'Volume': 'oops' is not a number"):
        ts.read_csv(path, features=("Volume",))
    ts.read_csv(path)  # an unused column may hold anything


def test_missing_column_and_file(tmp_path):
    path = write_csv(tmp_path / "ok.csv", daily_rows([1.0, 2.0]))
    with pytest.raises(ValueError, match=r"no column 'Price'; the header has \['Date', 'Open', 'Close', 'Volume'\]"):
        ts.read_csv(path, column="Price")
    with pytest.raises(FileNotFoundError, match="nope.csv"):
        ts.read_csv(tmp_path / "nope.csv")
    with pytest.raises(ValueError, match="fill must be one of"):
        ts.read_csv(path, fill="zero")


def test_fill_policies_are_explicit(tmp_path):
    path = write_csv(tmp_path / "holes.csv", ["2020-01-01,1,1,1", "2020-01-02,2,null,2", "2020-01-04,4,4,4"])
    np.testing.assert_array_equal(ts.read_csv(path, fill="ffill").values[:, 0], [1, 1, 4])
    dropped = ts.read_csv(path, fill="drop")
    np.testing.assert_array_equal(dropped.values[:, 0], [1, 4])
    assert [str(d) for d in dropped.dates] == ["2020-01-01", "2020-01-04"]
    # Interpolation is in time: Jan 2 lies a third of the way from Jan 1 (1) to Jan 4 (4).
    np.testing.assert_allclose(ts.read_csv(path, fill="interpolate").values[:, 0], [1, 2, 4])

    leading = write_csv(tmp_path / "leading.csv", ["2020-01-01,1,,1", "2020-01-02,2,2,2"])
    with pytest.raises(ValueError, match=r"line 2, column 'Close': the first value is missing"):
        ts.read_csv(leading, fill="ffill")
    trailing = write_csv(tmp_path / "trailing.csv", ["2020-01-01,1,1,1", "2020-01-02,2,,2"])
    with pytest.raises(ValueError, match=r"line 3, column 'Close': the last value is missing"):
        ts.read_csv(trailing, fill="interpolate")


def test_sort_dates_is_opt_in_and_duplicates_still_fail(tmp_path):
    path = write_csv(tmp_path / "shuffled.csv", ["2020-01-03,3,3,3", "2020-01-01,1,1,1", "2020-01-02,2,2,2"])
    np.testing.assert_array_equal(ts.read_csv(path, sort_dates=True).values[:, 0], [1, 2, 3])
    dup = write_csv(tmp_path / "dup.csv", ["2020-01-02,2,2,2", "2020-01-01,1,1,1", "2020-01-02,5,5,5"])
    with pytest.raises(ValueError, match=r"line 4, column 'Date': duplicate date 2020-01-02 \(also on line 2\)"):
        ts.read_csv(dup, sort_dates=True)


def test_log_targets_need_positive_values(tmp_path):
    with pytest.raises(ValueError, match=r"row 1, column 'Close': value -1 is not positive"):
        ts.transform(np.array([[1.0], [-1.0]]), "log_return", ("Close",))
    # Read from a file, the message names the file line like every other CSV error (a blank line included).
    rows = daily_rows(np.linspace(1, 2, 40))
    rows[7] = rows[7].split(",")[0] + ",1,-5,8"  # Date,Open,Close,Volume
    path = write_csv(tmp_path / "neg.csv", rows[:3] + [""] + rows[3:])
    with pytest.raises(ValueError, match=rf"{path}: line 10, column 'Close': value -5 is not positive"):
        ts.prepare(ts.read_csv(path), target="log_return", lookback=3)


# --- windows, splits, leakage -----------------------------------------------------------------------------


def test_windows_and_splits_by_hand():
    # 20 days valued 0..19: train days 0-13, val 14-16, test 17-19 (15% of 20 rounds to 3).
    split = ts.chronological_split(20, 0.15, 0.15)
    assert (split.train_end, split.val_end) == (14, 17)
    lookback, horizon = 3, 2
    np.testing.assert_array_equal(ts.window_origins(split, "train", lookback, horizon), np.arange(2, 12))
    np.testing.assert_array_equal(ts.window_origins(split, "val", lookback, horizon), [13, 14])
    np.testing.assert_array_equal(ts.window_origins(split, "test", lookback, horizon), [16, 17])
    values = np.arange(20.0)
    x, y = ts.make_windows(values[:, None], values, np.array([16, 17]), lookback, horizon)
    np.testing.assert_array_equal(x[..., 0], [[14, 15, 16], [15, 16, 17]])
    np.testing.assert_array_equal(y, [[17, 18], [18, 19]])
    # Log returns have none on day 0, so the first training window starts a day later.
    np.testing.assert_array_equal(ts.window_origins(split, "train", lookback, horizon, first_valid=1)[:1], [3])


def test_every_window_targets_stay_inside_their_split():
    data = ts.prepare(series_of(np.linspace(1, 2, 200)), target="price", lookback=7, horizon=3)
    for part in ("train", "val", "test"):
        start, end = data.split.bounds(part)
        targets = data.origins(part)[:, None] + np.arange(1, 4)
        assert targets.min() >= start and targets.max() == end - 1


def test_scaler_and_train_windows_ignore_the_test_period():
    rng = np.random.default_rng(0)
    prices = np.exp(np.cumsum(rng.normal(0, 0.02, 300))) * 100
    shocked = prices.copy()
    base = ts.prepare(series_of(prices), target="log_return", lookback=10, horizon=2)
    shocked[base.split.val_end:] *= 50  # a crash or a bubble in the test period only
    leaked = ts.prepare(series_of(shocked), target="log_return", lookback=10, horizon=2)
    np.testing.assert_array_equal(base.scaler.mean, leaked.scaler.mean)
    np.testing.assert_array_equal(base.scaler.std, leaked.scaler.std)
    for part in ("train", "val"):
        for a, b in zip(base.windows(part), leaked.windows(part)):
            np.testing.assert_array_equal(a, b)
    assert not np.array_equal(base.windows("test")[1], leaked.windows("test")[1])
    # The scaler is the training days' own statistics.
    returns = np.diff(np.log(prices))[:base.split.train_end - 1]
    np.testing.assert_allclose(base.scaler.mean[0], returns.mean())
    np.testing.assert_allclose(base.scaler.std[0], returns.std())


@pytest.mark.parametrize("target", ts.TARGETS)
def test_true_targets_map_back_to_true_prices(target):
    prices = 100 + 10 * np.sin(np.arange(120) / 5)
    data = ts.prepare(series_of(prices), target=target, lookback=5, horizon=4)
    origins = data.origins("test")
    _, y = data.windows_at(origins)
    np.testing.assert_allclose(data.forecast_prices(y, origins), data.actual_prices(origins), rtol=1e-5)


def test_features_get_the_target_transform_and_their_own_scale(tmp_path):
    prices = 100 * np.exp(np.linspace(0, 1, 60))
    path = write_csv(tmp_path / "f.csv", daily_rows(prices, volume=np.arange(1000, 1060)))
    data = ts.prepare(ts.read_csv(path, features=("Volume",)), target="log_return", lookback=5, horizon=1)
    x, y = data.windows("train")
    assert x.shape[1:] == (5, 2) and y.shape[1:] == (1,)
    volume_returns = np.diff(np.log(np.arange(1000.0, 1060.0)))[:data.split.train_end - 1]
    np.testing.assert_allclose(data.scaler.mean[1], volume_returns.mean())
    np.testing.assert_allclose(x[0, :, 1], (volume_returns[:5] - volume_returns.mean()) / volume_returns.std(),
                               rtol=1e-5)


def test_too_short_split_says_so():
    with pytest.raises(ValueError, match=r"the val part .* too short for one window of lookback 10"):
        ts.prepare(series_of(np.arange(1.0, 41.0)), target="price", lookback=10, horizon=7)


def test_next_dates_follow_the_calendar():
    crypto = np.datetime64("2024-03-20") + np.arange(12)
    assert [str(d) for d in ts.next_dates(crypto, 2)] == ["2024-04-01", "2024-04-02"]
    weekdays = np.busday_offset("2024-03-01", np.arange(15))  # Fri 2024-03-01 .. Thu 2024-03-21
    assert [str(d) for d in ts.next_dates(weekdays, 2)] == ["2024-03-22", "2024-03-25"]


# --- metrics and baselines --------------------------------------------------------------------------------


def test_metrics_by_hand():
    actual, pred, naive = np.array([100.0, 110.0]), np.array([90.0, 110.0]), np.array([100.0, 100.0])
    assert metrics.rmse(actual, pred) == pytest.approx(np.sqrt(50))
    assert metrics.mae(actual, pred) == pytest.approx(5)
    assert metrics.mape(actual, pred) == pytest.approx(5)
    assert metrics.mase(actual, pred, naive) == pytest.approx(1.0)
    last = np.array([100.0, 100.0])
    assert metrics.directional_accuracy(last, np.array([101.0, 99.0]), np.array([102.0, 101.0])) == 0.5
    # A forecast of "no change" makes no call and counts as wrong; flat true days are left out.
    assert metrics.directional_accuracy(last, np.array([101.0, 100.0]), last) == 0.0
    with pytest.raises(ValueError, match="mape is undefined"):
        metrics.mape([0.0], [1.0])
    report = metrics.forecast_report(last, np.array([0.0, 101.0]), pred, naive)  # a series through zero
    assert report["mape"] is None and report["mae"] == pytest.approx(49.5)


def test_baselines_on_known_series():
    # On a straight line the drift forecast is exact and persistence is off by h steps.
    data = ts.prepare(series_of(10 + 0.5 * np.arange(100)), target="price", lookback=4, horizon=3)
    origins = data.origins("test")
    b = forecast.baseline_forecasts(data, origins)
    actual = data.actual_prices(origins)
    np.testing.assert_allclose(b["drift"], actual)
    np.testing.assert_allclose(b["linear_ar"], actual, rtol=1e-6)
    np.testing.assert_allclose(b["persistence"] - actual, np.broadcast_to(-0.5 * np.arange(1, 4), actual.shape))
    # A noiseless AR(2) is recovered exactly by the least-squares AR.
    z = [1.0, 0.5]
    for _ in range(200):
        z.append(1.2 * z[-1] - 0.5 * z[-2])
    data = ts.prepare(series_of(np.array(z) + 5), target="price", lookback=2, horizon=1)
    origins = data.origins("test")
    np.testing.assert_allclose(forecast.baseline_forecasts(data, origins)["linear_ar"], data.actual_prices(origins),
                               atol=1e-8)


# --- models -----------------------------------------------------------------------------------------------

# Small shared configurations: initialising and compiling the scans is the slow part of these tests on a busy
# 2-core machine, so the tests share params. The bidirectional LSTM is the stacked one (2 layers, dropout
# between them); the others have one layer.
HIDDEN, HORIZON = 8, 3
LAYERS = {"rnn": 1, "lstm": 1, "gru": 1, "bilstm": 2}


@pytest.fixture(scope="module")
def initialised():
    key = jax.random.PRNGKey(0)
    x = jax.random.normal(key, (5, 7, 2))
    models = {name: fc.make_model(name, hidden_size=HIDDEN, num_layers=LAYERS[name], horizon=HORIZON,
                                  dropout_rate=0.1) for name in sorted(fc.MODELS)}
    # One jitted init for all four: one compilation instead of many (half the CPU time of separate ones).
    params = jax.jit(lambda key, x: {name: m.init(key, x)["params"] for name, m in models.items()})(key, x)
    return {name: (model, params[name], x) for name, model in models.items()}


@pytest.mark.parametrize("name", sorted(fc.MODELS))
def test_models_shapes_dropout_and_every_layer_matters(name, initialised, key):
    model, params, x = initialised[name]

    @jax.jit  # one compilation for the three checks
    def run(params, x):
        y = model.apply({"params": params}, x)
        y_train = model.apply({"params": params}, x, deterministic=False, rngs={"dropout": key})
        grads = jax.grad(lambda p: model.apply({"params": p}, x).sum())(params)
        return y, y_train, grads

    y, y_train, grads = run(params, x)
    assert y.shape == (5, HORIZON) and y.dtype == jnp.float32
    # Dropout acts between stacked layers only, and only in training.
    assert np.allclose(y, y_train) == (LAYERS[name] == 1)
    assert set(grads["recurrent"]) == {f"layer_{i}" for i in range(LAYERS[name])}
    for layer in grads["recurrent"].values():
        for leaf in jax.tree_util.tree_leaves(layer):
            assert np.abs(np.asarray(leaf)).sum() > 0  # every direction of every layer feeds the forecast


def test_bidirectional_reads_the_whole_window_backwards(initialised):
    # With the forward direction silenced, the first input day must still reach the head: the backward
    # direction's final state has read the window from the last day back to the first.
    model, params, x = initialised["bilstm"]
    params = jax.tree_util.tree_map(lambda a: a, params)
    for layer in params["recurrent"].values():
        layer["forward"] = jax.tree_util.tree_map(jnp.zeros_like, layer["forward"])
    x = x.at[1].set(x[0]).at[1, 0, 0].add(1.0)  # row 1 differs from row 0 on day 0 only
    y = jax.jit(model.apply)({"params": params}, x)
    assert not np.allclose(y[0], y[1])


def test_residual_head_starts_from_the_last_value(initialised):
    model, params, x = initialised["gru"]
    params = dict(params, head=jax.tree_util.tree_map(jnp.zeros_like, params["head"]))
    y = jax.jit(model.clone(residual=True).apply)({"params": params}, x)
    np.testing.assert_allclose(y, jnp.repeat(x[:, -1:, 0], HORIZON, axis=1))


def test_recursive_forecast_feeds_forecasts_back():
    # "tomorrow = sum of the window": windows [1, 2] -> 3, then [2, 3] -> 5, then [3, 5] -> 8.
    out = forecast.recursive_forecast(lambda w: w.sum(axis=1), np.array([[[1.0], [2.0]]]), 3)
    np.testing.assert_array_equal(out, [[3, 5, 8]])
    # A multi-step head is rolled a whole horizon at a time: [1, 2] -> (3, 4), then [3, 4] -> (5, 6).
    out = forecast.recursive_forecast(lambda w: w[:, :, 0] + 2, np.array([[[1.0], [2.0]]]), 3)
    np.testing.assert_array_equal(out, [[3, 4, 5]])
    with pytest.raises(ValueError, match=r"recursive forecasts need windows \[N, lookback, 1\]"):
        forecast.recursive_forecast(lambda w: w[:, -1], np.zeros((1, 2, 2)), 2)
    with pytest.raises(ValueError, match="cannot use extra features"):
        forecast.ForecastConfig(multi_step="recursive", features=("Volume",))


# --- real data --------------------------------------------------------------------------------------------


def test_embedded_bitcoin_is_the_shared_file(shared_data):
    shipped = ts.BITCOIN_CSV.read_bytes()
    assert shipped == (shared_data / "bitcoin" / "BTC-USD_2014-09-17_2024-03-31.csv").read_bytes()
    s = ts.load_bitcoin()
    assert len(s) == 3484 and str(s.dates[0]) == "2014-09-17" and str(s.dates[-1]) == "2024-03-31"
    assert np.all(np.diff(s.dates).astype(int) == 1)  # no missing days


# --- command line, end to end ---------------------------------------------------------------------------


def noisy_sine_csv(path: pathlib.Path, n: int = 300) -> pathlib.Path:
    """A stock-like file (business days only, no weekends): a 20-day sine around 100 plus noise."""
    rng = np.random.default_rng(0)
    values = 100 + 10 * np.sin(2 * np.pi * np.arange(n) / 20) + rng.normal(0, 0.5, n)
    dates = np.busday_offset("2020-01-01", np.arange(n), roll="forward")
    rows = [f"{d},{v:.4f},{v:.4f},{1000 + i}" for i, (d, v) in enumerate(zip(dates, values))]
    return write_csv(path, rows)


def test_cli_trains_beats_persistence_predicts_and_resumes(tmp_path, capsys, monkeypatch):
    from jaxseq.cli import main

    monkeypatch.chdir(tmp_path)  # a relative --out, as people type it
    csv = noisy_sine_csv(tmp_path / "sine.csv")
    out = pathlib.Path("run")
    argv = ["forecast", "train", "--csv", str(csv), "--column", "Close", "--model", "gru", "--target", "price",
            "--lookback", "20", "--horizon", "1", "--hidden", "16", "--lr", "0.01", "--batch-size", "16",
            "--epochs", "8", "--seed", "0", "--out", "run", "--no-progress"]
    assert main(argv) == 0
    results = json.loads((out / "metrics.json").read_text())
    assert (out / "forecast.png").stat().st_size > 0 and (out / "checkpoints").is_dir()
    assert (out / "loss.png").stat().st_size > 0  # drawn by the task's LossCurve callback
    assert results["split"]["test"] == ["2020-12-23", "2021-02-23"]
    assert set(results["test"]["metrics"]) == {"gru", "persistence", "drift", "linear_ar"}
    gru = results["test"]["metrics"]["gru"]
    assert set(gru) == {"rmse", "mae", "mape", "mase", "rel_rmse", "directional_accuracy"}
    # The sine is predictable a day ahead and persistence is not: the model must be clearly better.
    assert gru["mase"] < 0.5 and gru["directional_accuracy"] > 0.8
    assert results["test"]["metrics"]["persistence"]["mase"] == 1.0

    capsys.readouterr()
    assert main(["forecast", "predict", "--run", str(out), "--steps", "5"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    # The file ends on Tuesday 2021-02-23 and has no weekend dates, so the forecasts skip the weekend. Five
    # steps from a 1-day model: the model is rolled forward on its own forecasts.
    assert lines[0] == "date,forecast"
    assert [line.split(",")[0] for line in lines[1:]] == ["2021-02-24", "2021-02-25", "2021-02-26", "2021-03-01",
                                                          "2021-03-02"]
    assert all(80 < float(line.split(",")[1]) < 120 for line in lines[1:])

    # A CSV given to predict is read with the run's own scaler; its last date sets the calendar.
    short = write_csv(tmp_path / "short.csv", csv.read_text().splitlines()[1:251])
    assert main(["forecast", "predict", "--run", str(out), "--csv", str(short), "--steps", "1"]) == 0
    assert capsys.readouterr().out.splitlines()[1].split(",")[0] == str(
        ts.next_dates(ts.read_csv(short).dates, 1)[0])

    # Running the same command again finds the finished run, says so (the training loop's log, shown by the
    # command line) and rewrites identical results. Once: a handler on the root logger (as a library imported
    # on the way may install) must not print the line a second time.
    root_lines = io.StringIO()
    root_handler = logging.StreamHandler(root_lines)
    logging.getLogger().addHandler(root_handler)
    try:
        assert main(argv) == 0
    finally:
        logging.getLogger().removeHandler(root_handler)
    assert capsys.readouterr().out.count("already finished") == 1 and "already finished" not in root_lines.getvalue()
    assert json.loads((out / "metrics.json").read_text()) == results


def test_cli_bad_csv_is_one_line_and_exit_2(tmp_path, capsys):
    from jaxseq.cli import main

    csv = write_csv(tmp_path / "bad.csv", daily_rows(np.linspace(1, 2, 50))[:-1] + ["2020-02-19,1,null,1"])
    assert main(["forecast", "train", "--csv", str(csv), "--out", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    assert "line 51, column 'Close': missing value 'null'" in err and "Traceback" not in err
    assert main(["forecast", "predict", "--run", str(tmp_path / "none"), "--steps", "2"]) == 2
