"""Evaluation metrics, grouped by task (forecasting errors, BLEU, accuracy). Pure numpy on host arrays."""
from __future__ import annotations

# --- forecasting ---
import numpy as np  # noqa: E402  (sections are appended by topic; each imports what it uses)


def rmse(actual, predicted) -> float:
    """Root mean squared error over all entries (e.g. ``[windows, horizon]`` prices)."""
    err = np.asarray(predicted, np.float64) - np.asarray(actual, np.float64)
    return float(np.sqrt(np.mean(err ** 2)))


def mae(actual, predicted) -> float:
    """Mean absolute error over all entries."""
    return float(np.mean(np.abs(np.asarray(predicted, np.float64) - np.asarray(actual, np.float64))))


def mape(actual, predicted) -> float:
    """Mean absolute percentage error, in percent. Undefined (ValueError) where an actual value is 0."""
    actual = np.asarray(actual, np.float64)
    if np.any(actual == 0):
        raise ValueError("mape is undefined when an actual value is 0; use mae or mase for this series")
    return float(100.0 * np.mean(np.abs((np.asarray(predicted, np.float64) - actual) / actual)))


def mase(actual, predicted, naive) -> float:
    """Mean absolute scaled error against a naive forecast on the *same* windows: MAE(model) / MAE(naive).

    With ``naive`` the persistence forecast (tomorrow = today), below 1 beats persistence and above 1 loses
    to it. (Hyndman & Koehler 2006 scale by the in-sample naive MAE instead; on a trending series such as
    BTC that scale comes from a much cheaper price era, so here the test-period persistence MAE is used.)
    """
    scale = mae(actual, naive)
    if scale == 0:
        raise ValueError("mase is undefined: the naive forecast is exact on every window (MAE 0)")
    return mae(actual, predicted) / scale


def directional_accuracy(last, actual, predicted) -> float:
    """Fraction of windows whose forecast moves in the same direction as the truth, from the origin value.

    Args:
      last: value at each window's origin ``[N]`` (today's price).
      actual, predicted: ``[N]`` or ``[N, H]``; each step's direction is ``sign(value - last)``.

    Days where the truth does not move are left out; a forecast of "no change" counts as wrong (it makes no
    call), so persistence scores 0 and is better reported as "none".
    """
    last = np.asarray(last, np.float64)
    actual = np.asarray(actual, np.float64)
    predicted = np.asarray(predicted, np.float64)
    if actual.ndim == 2:
        last = last[:, None]
    true_sign = np.sign(actual - last)
    moved = true_sign != 0
    if not moved.any():
        return float("nan")
    return float(np.mean(np.sign(predicted - last)[moved] == true_sign[moved]))


def forecast_report(last, actual, predicted, naive, *, directional: bool = True) -> dict[str, float | None]:
    """All forecasting metrics of one forecaster on price windows ``[N, H]``, as a JSON-able dict.

    ``rel_rmse`` is RMSE / RMSE(naive); ``directional_accuracy`` is None when ``directional`` is False (for
    forecasts that never call a direction, like persistence).
    """
    return {
        "rmse": rmse(actual, predicted),
        "mae": mae(actual, predicted),
        "mape": mape(actual, predicted),
        "mase": mase(actual, predicted, naive),
        "rel_rmse": rmse(actual, predicted) / rmse(actual, naive),
        "directional_accuracy": directional_accuracy(last, actual, predicted) if directional else None,
    }
