"""Forecasting a daily series: train a recurrent forecaster, score it against baselines, forecast ahead.

    result = forecast.train_and_evaluate(ForecastConfig(model="lstm"), TrainConfig(out_dir="runs/f"))
    run = forecast.load_run("runs/f")
    dates, values = forecast.predict(run, steps=5)

Baselines, computed on exactly the same test windows and scored in price space:

* persistence: tomorrow = today (``ŷ_{t+h} = y_t``), the random-walk forecast;
* drift: the training period's mean daily step in the target space, extended ``h`` steps;
* linear AR: a direct linear autoregression on the ``lookback`` scaled target lags, fitted by least squares
  on the training windows.

Beyond one model's horizon, ``recursive_forecast`` rolls it forward, feeding its own forecasts back into the
window (the *recursive* multi-step forecast).
"""
from __future__ import annotations

import dataclasses
import json
import pathlib
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from jaxseq import tasks
from jaxseq.data import timeseries
from jaxseq.data.timeseries import ForecastData, to_price
from jaxseq.models.forecasting import MODELS, Forecaster, check_sizes, forecast_loss, make_model


@dataclasses.dataclass(frozen=True)
class ForecastConfig:
    """What to forecast and with which model (the training hyper-parameters live in ``TrainConfig``)."""

    csv: str | None = None  # a daily CSV; None = the embedded BTC-USD file
    column: str = "Close"  # the column to forecast
    date_column: str = "Date"
    features: tuple[str, ...] = ()  # extra input columns (same transform as the target)
    fill: str = "error"  # missing cells: error | ffill | drop | interpolate (never silent)
    sort_dates: bool = False  # sort rows by date instead of raising on dates out of order
    # log_return by default: the one target whose training scale still holds in the test period (BTC's test
    # prices climb past the training maximum, which a tanh network fitted on prices cannot reach).
    target: str = "log_return"
    lookback: int = 60  # days of history per window
    horizon: int = 1  # days ahead
    multi_step: str = "direct"  # direct: one head of `horizon` outputs; recursive: a 1-day model rolled forward
    val_fraction: float = 0.15  # chronological: train | val | test, test last
    test_fraction: float = 0.15
    model: str = "lstm"  # rnn | lstm | gru | bilstm
    hidden_size: int = 32  # small: ~2,400 training windows of one noisy series
    num_layers: int = 1
    dropout: float = 0.0  # between stacked layers
    residual: bool = False  # forecast the change from the last value (see Forecaster.residual)

    def __post_init__(self):
        if self.multi_step not in ("direct", "recursive"):
            raise ValueError(f"multi_step must be 'direct' or 'recursive', got {self.multi_step!r}")
        if self.multi_step == "recursive" and self.features:
            raise ValueError(f"multi_step='recursive' feeds forecasts back as inputs, so it cannot use extra "
                             f"features {list(self.features)} (their future values are unknown)")
        if self.model not in MODELS:
            raise ValueError(f"model must be one of {sorted(MODELS)}, got {self.model!r}")
        check_sizes(lookback=self.lookback, horizon=self.horizon, hidden_size=self.hidden_size,
                    num_layers=self.num_layers)
        if not 0 <= self.dropout < 1:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")

    @property
    def model_horizon(self) -> int:
        return self.horizon if self.multi_step == "direct" else 1


@dataclasses.dataclass(frozen=True)
class ForecastResult:
    """What ``train_and_evaluate`` measured (``metrics`` is also ``out_dir/metrics.json``)."""

    metrics: dict  # config, series, rows, split dates and the test scores of the model and every baseline
    out_dir: pathlib.Path  # the run folder: checkpoints, metrics.json, forecast.png
    already_finished: bool  # the run folder held a finished run, which was scored again, not retrained

    @property
    def figure(self) -> pathlib.Path:
        return self.out_dir / "forecast.png"


@dataclasses.dataclass(frozen=True)
class ForecastRun:
    """A trained run: its config, the scaler fitted on its training days, the model and its best params."""

    config: ForecastConfig
    scaler: timeseries.Scaler
    model: Forecaster
    params: dict
    run_dir: pathlib.Path


# --- recursive forecasts and baselines -----------------------------------------------------------------------


def recursive_forecast(predict: Callable[[np.ndarray], np.ndarray], x: np.ndarray, steps: int) -> np.ndarray:
    """Roll a forecaster forward ``steps`` days, appending its own forecasts to the window.

    Args:
      predict: maps windows ``[N, lookback, 1]`` to forecasts ``[N, h]`` (scaled target space, h >= 1).
      x: the last known windows ``[N, lookback, 1]``; only the target may be an input, since future values of
        extra features are unknown.
      steps: days to forecast.

    Returns:
      ``[N, steps]`` forecasts in the scaled target space.
    """
    x = np.asarray(x, np.float32)
    if x.ndim != 3 or x.shape[-1] != 1:
        raise ValueError(f"recursive forecasts need windows [N, lookback, 1] (the target alone; future feature "
                         f"values are unknown), got shape {x.shape}")
    out = []
    while sum(o.shape[1] for o in out) < steps:
        y = np.asarray(predict(x), np.float32)
        out.append(y)
        x = np.concatenate([x, y[:, :, None]], axis=1)[:, -x.shape[1]:]
    return np.concatenate(out, axis=1)[:, :steps]


@dataclasses.dataclass(frozen=True)
class LinearAR:
    """Direct linear autoregression: ``y[:, h] = b_h + sum_k a_{h,k} x_{t-k}`` on the scaled target lags."""

    coef: np.ndarray  # [lookback + 1, horizon]; row 0 is the intercept

    @classmethod
    def fit(cls, x: np.ndarray, y: np.ndarray) -> "LinearAR":
        """Least squares on training windows ``x`` ``[N, lookback, features]`` (target lags only) and ``y``
        ``[N, horizon]``."""
        design = _design(x)
        coef, *_ = np.linalg.lstsq(design, np.asarray(y, np.float64), rcond=None)
        return cls(coef=coef)

    def predict(self, x: np.ndarray) -> np.ndarray:
        return _design(x) @ self.coef

    def to_dict(self) -> dict:
        return {"coef": self.coef.tolist()}


def _design(x: np.ndarray) -> np.ndarray:
    lags = np.asarray(x, np.float64)[:, :, 0]
    return np.concatenate([np.ones((len(lags), 1)), lags], axis=1)


def drift_step(data: ForecastData) -> float:
    """Mean daily step over the training days in the unscaled target space (mean return for log returns)."""
    z = data.scaler.invert_target(data.scaled[data.first_valid:data.split.train_end, 0])
    return float(np.mean(z) if data.target == "log_return" else np.mean(np.diff(z)))


def baseline_forecasts(data: ForecastData, origins: np.ndarray) -> dict[str, np.ndarray]:
    """Price forecasts ``[N, horizon]`` of persistence, drift and linear AR at ``origins``."""
    origins = np.asarray(origins)
    last = data.prices[origins]
    steps = np.arange(1, data.horizon + 1)[None, :]
    step = drift_step(data)
    if data.target == "log_return":
        drift_z = np.full((len(origins), data.horizon), step)
    else:
        drift_z = data.scaler.invert_target(data.scaled[origins, 0])[:, None] + step * steps
    ar = LinearAR.fit(*data.windows("train"))
    x, _ = data.windows_at(origins)
    return {
        "persistence": np.repeat(last[:, None], data.horizon, axis=1),
        "drift": to_price(drift_z, last, data.target),
        "linear_ar": data.forecast_prices(ar.predict(x), origins),
    }


# --- the workflow --------------------------------------------------------------------------------------------


def load_series(config: ForecastConfig, csv: str | None = None):
    """Read the configured CSV (``csv`` overrides it; neither = the embedded BTC-USD file)."""
    path = csv or config.csv or timeseries.BITCOIN_CSV
    return timeseries.read_csv(path, column=config.column, date_column=config.date_column,
                               features=config.features, fill=config.fill, sort_dates=config.sort_dates)


def prepare_data(config: ForecastConfig, series, horizon: int | None = None) -> ForecastData:
    """Windows of ``horizon`` days (default ``config.horizon``) with the config's target and split."""
    return timeseries.prepare(series, target=config.target, lookback=config.lookback,
                              horizon=config.horizon if horizon is None else horizon,
                              val_fraction=config.val_fraction, test_fraction=config.test_fraction)


def build_model(config: ForecastConfig) -> Forecaster:
    return make_model(config.model, hidden_size=config.hidden_size, num_layers=config.num_layers,
                      horizon=config.model_horizon, dropout_rate=config.dropout, residual=config.residual)


def _init_fn(model: Forecaster, num_features: int, lookback: int):
    def init_params(key):
        return model.init(key, jnp.zeros((1, lookback, num_features), jnp.float32))["params"]
    return init_params


def make_predict(model: Forecaster, params, horizon: int, multi_step: str, batch: int = 1024):
    """Host function: scaled windows ``[N, lookback, features]`` -> scaled forecasts ``[N, horizon]``."""
    apply = jax.jit(lambda p, x: model.apply({"params": p}, x))

    def one_pass(x):
        return np.concatenate([np.asarray(apply(params, jnp.asarray(x[i:i + batch])))
                               for i in range(0, len(x), batch)])

    if multi_step == "direct":
        return one_pass
    return lambda x: recursive_forecast(one_pass, x, horizon)


def score(data: ForecastData, origins: np.ndarray, forecasts: dict[str, np.ndarray]) -> dict:
    """Every metric for every forecaster on the same price windows, pooled over steps and (H > 1) per step."""
    from jaxseq import metrics

    last = data.prices[origins]
    actual = data.actual_prices(origins)
    naive = forecasts["persistence"]
    # Persistence never calls a direction: report none rather than a misleading 0.
    pooled = {name: metrics.forecast_report(last, actual, f, naive, directional=name != "persistence")
              for name, f in forecasts.items()}
    out = {"windows": int(len(origins)), "horizon": data.horizon, "metrics": pooled}
    if data.horizon > 1:
        out["by_step"] = {
            name: [metrics.forecast_report(last, actual[:, h], f[:, h], naive[:, h],
                                           directional=name != "persistence") for h in range(data.horizon)]
            for name, f in forecasts.items()}
    return out


def train_and_evaluate(config: ForecastConfig, train_config, *, callbacks=()) -> ForecastResult:
    """Train ``config.model`` with ``jaxseq.training.fit``, score it and the baselines on the test windows.

    Writes ``out_dir/metrics.json`` (results only, no timings: identical runs give identical files),
    ``out_dir/forecast.png`` and ``out_dir/loss.png``; ``fit`` writes checkpoints and ``metrics.jsonl`` there and
    resumes a run found in ``out_dir``. ``callbacks`` (``jaxseq.training.Callback``) go to ``fit``.
    """
    from jaxseq import plots, training

    series = load_series(config)
    data = prepare_data(config, series)  # the evaluation windows: `horizon` days ahead
    train_data = data if config.model_horizon == config.horizon else prepare_data(config, series, 1)
    x_train, y_train = train_data.windows("train")
    x_val, y_val = train_data.windows("val")
    model = build_model(config)
    init_params = _init_fn(model, x_train.shape[-1], config.lookback)

    run_config = {"forecast": {**dataclasses.asdict(config), "features": list(config.features)},
                  "scaler": data.scaler.to_dict(), "last_train_date": str(series.dates[data.split.train_end - 1])}
    evaluate = None
    if len(x_val):  # with --val-fraction 0 there is no validation and "best" falls back to the latest checkpoint
        val_apply = jax.jit(lambda p, x: model.apply({"params": p}, x))

        def evaluate(params):
            return {"val_mse": float(np.mean((np.asarray(val_apply(params, x_val)) - y_val) ** 2))}

        if train_config.best_metric is None:
            train_config = dataclasses.replace(train_config, best_metric="val_mse", best_mode="min")
    if train_config.batch_size > len(x_train):
        raise ValueError(f"batch_size={train_config.batch_size} is larger than the {len(x_train)} training windows "
                         f"({len(series)} rows, lookback {config.lookback}); use a smaller batch_size")
    title = f"forecast ({config.model}, target {config.target}), run {pathlib.Path(train_config.out_dir).name}"
    fitted = training.fit(train_config, init_params=init_params, loss_fn=forecast_loss(model),
                          train=training.ArrayBatches({"x": x_train, "y": y_train}, train_config.batch_size,
                                                      seed=train_config.seed),
                          evaluate=evaluate, run_config=run_config,
                          callbacks=[training.LossCurve(title=title), *callbacks])
    params = training.restore_params(train_config.out_dir, init_params, which="best")

    origins = data.origins("test")
    x_test, _ = data.windows_at(origins)
    predict_scaled = make_predict(model, params, config.horizon, config.multi_step)
    forecasts = {config.model: data.forecast_prices(predict_scaled(x_test), origins),
                 **baseline_forecasts(data, origins)}
    results = {"config": run_config["forecast"], "series": series.source if config.csv else "embedded BTC-USD",
               "rows": len(series), "split": timeseries.split_dates(data),
               "test": score(data, origins, forecasts)}
    out_dir = pathlib.Path(train_config.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "metrics.json").write_text(json.dumps(results, indent=2, sort_keys=True) + "\n")
    step = config.horizon - 1  # the figure shows the last (hardest) step, `horizon` days ahead
    plots.plot_forecast(data.target_dates(origins)[:, step], data.actual_prices(origins)[:, step],
                        {config.model: forecasts[config.model][:, step],
                         "persistence": forecasts["persistence"][:, step]},
                        out_dir / "forecast.png", ylabel=config.column,
                        title=f"{config.model}, {config.horizon}-day-ahead {config.column}, test period "
                              f"(target {config.target})")
    return ForecastResult(results, out_dir, fitted.already_finished)


def load_run(run_dir) -> ForecastRun:
    """A run folder written by ``train_and_evaluate``: config, scaler, model and its best params.

    Raises:
      FileNotFoundError: no such folder or no checkpoint in it. ValueError: another task's run.
    """
    from jaxseq import training

    stored = tasks.run_config(run_dir, "forecast")
    config = ForecastConfig(**dict(stored["forecast"], features=tuple(stored["forecast"]["features"])))
    scaler = timeseries.Scaler.from_dict(stored["scaler"])
    model = build_model(config)
    num_features = 1 + len(config.features)
    run_dir = pathlib.Path(run_dir).resolve()
    params = training.restore_params(str(run_dir), _init_fn(model, num_features, config.lookback), which="best")
    return ForecastRun(config, scaler, model, params, run_dir)


def predict(run: ForecastRun, steps: int, csv: str | None = None) -> tuple[np.ndarray, np.ndarray]:
    """The next ``steps`` values after the end of the series (the run's own CSV, or ``csv``).

    Uses the run's stored scaler (fitted on its training days), so a longer CSV with new days is read with
    the model's own scale. Beyond the model's horizon, forecasts are fed back (recursive), which needs a
    model without extra features.

    Returns:
      ``(dates datetime64[D] [steps], values float64 [steps])``.
    """
    if steps < 1:
        raise ValueError(f"steps must be at least 1, got {steps}")
    config, scaler = run.config, run.scaler
    series = load_series(config, csv)
    z = scaler.apply(timeseries.transform(series.values, config.target, series.columns, lines=series.lines,
                                          source=series.source))
    if len(z) - (1 if config.target == "log_return" else 0) < config.lookback:
        raise ValueError(f"the series has {len(series)} rows; the model needs a window of {config.lookback} days"
                         f"{' (plus one for the first return)' if config.target == 'log_return' else ''}")
    window = z[None, -config.lookback:].astype(np.float32)
    one_pass = make_predict(run.model, run.params, config.model_horizon, "direct")
    if steps <= config.model_horizon:
        y = one_pass(window)[:, :steps]
    else:
        if window.shape[-1] != 1:
            raise ValueError(f"{steps} steps exceed the model's horizon {config.model_horizon} and the model reads "
                             f"extra features {list(config.features)} whose future is unknown; ask for at most "
                             f"{config.model_horizon} steps")
        y = recursive_forecast(one_pass, window, steps)
    values = to_price(scaler.invert_target(y.astype(np.float64)), series.values[-1:, 0], config.target)[0]
    return timeseries.next_dates(series.dates, steps), values
