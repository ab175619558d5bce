"""Daily time series for forecasting: a strict CSV reader, target transforms, train-only scaling, windows.

The pipeline, each step a pure function of its inputs:

1. ``read_csv`` reads a date column and a numeric target column (plus optional feature columns). Missing,
   NaN or non-numeric cells, duplicate or non-increasing dates raise a ``ValueError`` naming the line and
   column, unless an explicit ``fill`` policy (missing cells) or ``sort_dates`` (order) says otherwise.
2. ``prepare`` turns the series into a target (price, log price or log return), splits the time axis
   chronologically into train / validation / test, fits the scaler on the training part only and cuts
   windows of ``lookback`` inputs -> ``horizon`` targets. Every window's targets lie inside one split (its
   inputs may look back into the previous split: that is the past, known at forecast time).
3. ``ForecastData.to_price`` maps forecasts in the (scaled) target space back to prices, so models and
   baselines are scored on the same price windows.

Time index conventions: the series has ``n`` days ``0 .. n-1``. A window has an *origin* ``t`` (the last day
whose value is known): inputs are days ``t-lookback+1 .. t``, targets days ``t+1 .. t+horizon``.
"""
from __future__ import annotations

import csv
import dataclasses
import pathlib
from typing import Sequence

import numpy as np

TARGETS = ("price", "log_price", "log_return")
FILL_POLICIES = ("error", "ffill", "drop", "interpolate")
# Spellings of "no value" met in real exports (Yahoo writes `null` on days without a quote).
MISSING_MARKERS = frozenset({"", "null", "none", "nan", "na", "n/a", "-", "#n/a"})

DATASETS_DIR = pathlib.Path(__file__).resolve().parent.parent / "datasets"
BITCOIN_CSV = DATASETS_DIR / "bitcoin" / "BTC-USD_2014-09-17_2024-03-31.csv"


@dataclasses.dataclass(frozen=True)
class Series:
    """A validated daily series.

    Attributes:
      dates: ``datetime64[D]`` ``[time]``, strictly increasing.
      values: float64 ``[time, columns]``; column 0 is the target column, the rest are features.
      columns: the column names, target first.
      source: where the data came from (a path), for run records.
      lines: the file line of each row ``[time]`` (for messages), or None when the series was not read from a file.
    """

    dates: np.ndarray
    values: np.ndarray
    columns: tuple[str, ...]
    source: str
    lines: np.ndarray | None = None

    def __len__(self) -> int:
        return len(self.dates)


def _parse_date(text: str, line: int, column: str) -> np.datetime64:
    # ISO dates (what Yahoo, FRED and most exports write); a time part, if any, is dropped: the series is daily.
    stripped = text.strip()
    try:
        return np.datetime64(stripped[:10], "D")
    except ValueError:
        raise ValueError(f"line {line}, column {column!r}: cannot read date {text!r}; expected YYYY-MM-DD") from None


def read_csv(path, *, column: str = "Close", date_column: str = "Date", features: Sequence[str] = (),
             fill: str = "error", sort_dates: bool = False) -> Series:
    """Read a daily CSV with a header: a date column, the target ``column`` and optional ``features``.

    Args:
      path: CSV file with a header row.
      column: the numeric column to forecast.
      date_column: the column with ISO dates (``YYYY-MM-DD``).
      features: extra numeric columns given to the model as inputs beside the target.
      fill: what to do with missing cells (empty, ``null``, ``NaN``, ``NA``...) in the used columns:
        ``"error"`` (default) raises naming the line and column; ``"ffill"`` carries the last value forward;
        ``"drop"`` drops the row; ``"interpolate"`` interpolates linearly in time. A missing first (or, for
        interpolate, last) value cannot be filled and raises. Text that is not a number is always an error.
      sort_dates: sort rows by date instead of raising on dates out of order. Duplicate dates always raise.

    Returns:
      a ``Series`` (target first, then the features, in the given order).
    """
    path = pathlib.Path(path)
    if fill not in FILL_POLICIES:
        raise ValueError(f"fill must be one of {FILL_POLICIES}, got {fill!r}")
    if not path.is_file():
        raise FileNotFoundError(f"CSV file not found: {path}")
    wanted = [column, *features]
    if len(set(wanted)) != len(wanted) or date_column in wanted:
        raise ValueError(f"columns must be distinct: date {date_column!r}, target {column!r}, "
                         f"features {list(features)}")

    with path.open(newline="", encoding="utf-8-sig") as handle:
        reader = csv.reader(handle)
        header = next(reader, None)
        if header is None:
            raise ValueError(f"{path}: empty file, expected a header row with {date_column!r} and {column!r}")
        header = [name.strip() for name in header]
        for name in [date_column, *wanted]:
            if name not in header:
                raise ValueError(f"{path}: no column {name!r}; the header has {header}")
        date_index = header.index(date_column)
        indices = [header.index(name) for name in wanted]

        dates, rows, lines, missing = [], [], [], []
        for line, record in enumerate(reader, start=2):  # line 1 is the header
            if not record or all(not cell.strip() for cell in record):
                continue  # blank lines (e.g. a trailing newline) carry no data
            if len(record) != len(header):
                raise ValueError(f"{path}: line {line} has {len(record)} cells but the header has {len(header)}")
            if not record[date_index].strip():
                raise ValueError(f"{path}: line {line}, column {date_column!r}: missing date")
            dates.append(_parse_date(record[date_index], line, date_column))
            row = []
            for name, index in zip(wanted, indices):
                cell = record[index].strip()
                if cell.lower() in MISSING_MARKERS:
                    row.append(np.nan)
                    missing.append((line, name, record[index]))
                    continue
                try:
                    value = float(cell)
                except ValueError:
                    raise ValueError(f"{path}: line {line}, column {name!r}: {record[index]!r} is not a number"
                                     ) from None
                if not np.isfinite(value):
                    raise ValueError(f"{path}: line {line}, column {name!r}: {record[index]!r} is not finite")
                row.append(value)
            rows.append(row)
            lines.append(line)

    if not rows:
        raise ValueError(f"{path}: no data rows after the header")
    dates = np.array(dates, dtype="datetime64[D]")
    values = np.array(rows, dtype=np.float64)
    lines = np.array(lines)

    if missing and fill == "error":
        line, name, text = missing[0]
        raise ValueError(f"{path}: line {line}, column {name!r}: missing value {text!r} ({len(missing)} missing "
                         f"cell(s) in all); fix the file or choose a fill policy (ffill, drop, interpolate)")

    order = np.argsort(dates, kind="stable")
    if sort_dates:
        dates, values, lines = dates[order], values[order], lines[order]
    steps = np.diff(dates).astype(np.int64)
    if np.any(steps == 0):
        i = int(np.flatnonzero(steps == 0)[0])
        raise ValueError(f"{path}: line {lines[i + 1]}, column {date_column!r}: duplicate date {dates[i + 1]} "
                         f"(also on line {lines[i]})")
    if np.any(steps < 0):
        i = int(np.flatnonzero(steps < 0)[0])
        raise ValueError(f"{path}: line {lines[i + 1]}, column {date_column!r}: date {dates[i + 1]} is not after "
                         f"{dates[i]} on line {lines[i]}; dates must increase (or pass sort_dates / --sort-dates)")

    if missing:
        dates, values, lines = _fill(dates, values, lines, wanted, fill, path)
    return Series(dates=dates, values=values, columns=tuple(wanted), source=str(path), lines=lines)


def _fill(dates, values, lines, names, fill, path):
    """Apply a fill policy to the NaN cells of ``values`` ``[time, columns]`` (dates already increasing)."""
    bad = np.isnan(values)
    if fill == "drop":
        keep = ~bad.any(axis=1)
        if keep.sum() == 0:
            raise ValueError(f"{path}: every row has a missing value; nothing left after fill='drop'")
        return dates[keep], values[keep], lines[keep]
    values = values.copy()
    days = dates.astype(np.int64).astype(np.float64)
    for j, name in enumerate(names):
        holes = bad[:, j]
        if not holes.any():
            continue
        if holes[0]:
            raise ValueError(f"{path}: line {lines[0]}, column {name!r}: the first value is missing and fill="
                             f"{fill!r} has nothing before it to fill from")
        known = np.flatnonzero(~holes)
        if fill == "ffill":
            last_known = known[np.searchsorted(known, np.arange(len(values)), side="right") - 1]
            values[:, j] = values[last_known, j]
        else:  # interpolate
            if holes[-1]:
                raise ValueError(f"{path}: line {lines[-1]}, column {name!r}: the last value is missing and "
                                 f"fill='interpolate' has nothing after it; use ffill or drop")
            values[holes, j] = np.interp(days[holes], days[known], values[known, j])
    return dates, values, lines


def load_bitcoin(**kwargs) -> Series:
    """The embedded BTC-USD daily series (Yahoo Finance export, 2014-09-17 .. 2024-03-31; see PROVENANCE.md)."""
    return read_csv(BITCOIN_CSV, **kwargs)


# --- transforms and scaling ---------------------------------------------------------------------------


def transform(values: np.ndarray, target: str, names: Sequence[str] = (), *, lines: np.ndarray | None = None,
              source: str | None = None) -> np.ndarray:
    """Map raw values ``[time, columns]`` to the model's space: price (as is), log price, or log return.

    Features get the same transform as the target, so a price feature (Open, High) stays on the target's
    scale. Log returns are ``log v_t - log v_{t-1}``; row 0 has no return and is NaN.

    ``lines`` (each row's file line) and ``source`` (the file) only make error messages point into the file.
    """
    if target not in TARGETS:
        raise ValueError(f"target must be one of {TARGETS}, got {target!r}")
    if target == "price":
        return values.astype(np.float64)
    nonpositive = values <= 0
    if nonpositive.any():
        row, col = (int(i) for i in np.argwhere(nonpositive)[0])
        name = names[col] if col < len(names) else f"column {col}"
        where = f"line {int(lines[row])}" if lines is not None else f"row {row}"
        prefix = f"{source}: " if source else ""
        raise ValueError(f"{prefix}{where}, column {name!r}: value {values[row, col]:g} is not positive, but target "
                         f"{target!r} takes logs; use target='price' (--target price) for series that are not "
                         "positive")
    logs = np.log(values)
    if target == "log_price":
        return logs
    returns = np.full_like(logs, np.nan)
    returns[1:] = np.diff(logs, axis=0)
    return returns


@dataclasses.dataclass(frozen=True)
class Scaler:
    """Per-column standardisation ``(z - mean) / std``, fitted on the training part only."""

    mean: np.ndarray  # [columns]
    std: np.ndarray  # [columns]

    @classmethod
    def fit(cls, z: np.ndarray) -> "Scaler":
        """Fit on ``z`` ``[time, columns]`` (the training part, already transformed)."""
        mean = z.mean(axis=0)
        std = z.std(axis=0)
        # A constant column (e.g. a flat feature) would divide by zero; leave it unscaled instead.
        return cls(mean=mean, std=np.where(std > 0, std, 1.0))

    def apply(self, z: np.ndarray) -> np.ndarray:
        return (z - self.mean) / self.std

    def invert_target(self, z_scaled: np.ndarray) -> np.ndarray:
        """Undo the scaling of the target column (column 0) on any-shaped forecasts."""
        return z_scaled * self.std[0] + self.mean[0]

    def to_dict(self) -> dict:
        return {"mean": self.mean.tolist(), "std": self.std.tolist()}

    @classmethod
    def from_dict(cls, d: dict) -> "Scaler":
        return cls(mean=np.asarray(d["mean"], np.float64), std=np.asarray(d["std"], np.float64))


def to_price(z: np.ndarray, last_price: np.ndarray, target: str) -> np.ndarray:
    """Turn unscaled target-space forecasts ``[N, H]`` into prices ``[N, H]``.

    ``last_price`` ``[N]`` is the price at each window's origin; log returns accumulate from it.
    """
    z = np.asarray(z, np.float64)
    if target == "price":
        return z
    if target == "log_price":
        return np.exp(z)
    if target == "log_return":
        return np.asarray(last_price, np.float64)[:, None] * np.exp(np.cumsum(z, axis=-1))
    raise ValueError(f"target must be one of {TARGETS}, got {target!r}")


# --- splits and windows -----------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Split:
    """Chronological split of days ``0 .. n-1``: train ``[0, train_end)``, val ``[train_end, val_end)``,
    test ``[val_end, n)``."""

    n: int
    train_end: int
    val_end: int

    def bounds(self, part: str) -> tuple[int, int]:
        return {"train": (0, self.train_end), "val": (self.train_end, self.val_end),
                "test": (self.val_end, self.n)}[part]


def chronological_split(n: int, val_fraction: float = 0.15, test_fraction: float = 0.15) -> Split:
    """Split ``n`` days into train / val / test by time, the last ``test_fraction`` being the test period."""
    if not (0 <= val_fraction < 1 and 0 < test_fraction < 1 and val_fraction + test_fraction < 1):
        raise ValueError(f"val_fraction {val_fraction} and test_fraction {test_fraction} must be fractions in "
                         f"[0, 1) (test > 0) that leave a training part")
    test_days = int(round(n * test_fraction))
    val_days = int(round(n * val_fraction))
    return Split(n=n, train_end=n - test_days - val_days, val_end=n - test_days)


def window_origins(split: Split, part: str, lookback: int, horizon: int, first_valid: int = 0) -> np.ndarray:
    """Origins ``t`` of the windows whose targets ``t+1 .. t+horizon`` all lie inside ``part``.

    Inputs ``t-lookback+1 .. t`` must start at or after ``first_valid`` (1 for log returns: day 0 has none).
    """
    start, end = split.bounds(part)
    lo = max(start - 1, first_valid + lookback - 1)
    hi = end - horizon - 1  # last origin whose final target is day end-1
    return np.arange(lo, hi + 1) if hi >= lo else np.zeros((0,), np.int64)


def make_windows(inputs: np.ndarray, targets: np.ndarray, origins: np.ndarray, lookback: int,
                 horizon: int) -> tuple[np.ndarray, np.ndarray]:
    """Cut windows: ``x[i] = inputs[o-lookback+1 : o+1]`` ``[N, lookback, features]`` and
    ``y[i] = targets[o+1 : o+horizon+1]`` ``[N, horizon]`` for each origin ``o``."""
    origins = np.asarray(origins, np.int64)
    x_index = origins[:, None] + np.arange(-lookback + 1, 1)[None, :]
    y_index = origins[:, None] + np.arange(1, horizon + 1)[None, :]
    return inputs[x_index], targets[y_index]


@dataclasses.dataclass(frozen=True)
class ForecastData:
    """Everything a model and the baselines need, cut from one series.

    Attributes:
      series: the raw ``Series``.
      target: ``"price" | "log_price" | "log_return"``.
      lookback, horizon: window sizes in days.
      split: the chronological ``Split``.
      scaler: fitted on the training days only.
      scaled: the transformed, scaled inputs ``[time, columns]`` (target column 0; NaN on day 0 for returns).
      first_valid: first day with a defined transformed value (1 for log returns, else 0).
    """

    series: Series
    target: str
    lookback: int
    horizon: int
    split: Split
    scaler: Scaler
    scaled: np.ndarray
    first_valid: int

    @property
    def prices(self) -> np.ndarray:
        """The raw target column ``[time]``."""
        return self.series.values[:, 0]

    def origins(self, part: str) -> np.ndarray:
        return window_origins(self.split, part, self.lookback, self.horizon, self.first_valid)

    def windows(self, part: str) -> tuple[np.ndarray, np.ndarray]:
        """Scaled windows of a split: ``x`` float32 ``[N, lookback, columns]``, ``y`` float32 ``[N, horizon]``."""
        return self.windows_at(self.origins(part))

    def windows_at(self, origins: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Scaled windows at given origins (targets past the last day are NaN)."""
        padded = np.concatenate([self.scaled, np.full((self.horizon, self.scaled.shape[1]), np.nan)])
        x, y = make_windows(padded, padded[:, 0], origins, self.lookback, self.horizon)
        return x.astype(np.float32), y.astype(np.float32)

    def actual_prices(self, origins: np.ndarray) -> np.ndarray:
        """True prices ``[N, horizon]`` at the windows' target days."""
        return self.prices[np.asarray(origins)[:, None] + np.arange(1, self.horizon + 1)[None, :]]

    def forecast_prices(self, y_scaled: np.ndarray, origins: np.ndarray) -> np.ndarray:
        """Prices ``[N, H]`` from scaled target-space forecasts ``[N, H]`` made at ``origins``."""
        return to_price(self.scaler.invert_target(np.asarray(y_scaled, np.float64)),
                        self.prices[np.asarray(origins)], self.target)

    def target_dates(self, origins: np.ndarray) -> np.ndarray:
        """Dates ``[N, horizon]`` of the windows' targets."""
        return self.series.dates[np.asarray(origins)[:, None] + np.arange(1, self.horizon + 1)[None, :]]


def prepare(series: Series, *, target: str = "log_return", lookback: int = 60, horizon: int = 1,
            val_fraction: float = 0.15, test_fraction: float = 0.15) -> ForecastData:
    """Transform, split chronologically, fit the scaler on the training days only, ready to cut windows.

    Raises a ``ValueError`` when a split is too short to hold a single window.
    """
    if lookback < 1 or horizon < 1:
        raise ValueError(f"lookback ({lookback}) and horizon ({horizon}) must be at least 1")
    z = transform(series.values, target, series.columns, lines=series.lines, source=series.source)
    first_valid = 1 if target == "log_return" else 0
    split = chronological_split(len(series), val_fraction, test_fraction)
    train = z[first_valid:split.train_end]
    if len(train) == 0:
        raise ValueError(f"the training part of {len(series)} days is empty")
    scaler = Scaler.fit(train)
    data = ForecastData(series=series, target=target, lookback=lookback, horizon=horizon, split=split,
                        scaler=scaler, scaled=scaler.apply(z), first_valid=first_valid)
    for part in ("train", "val", "test") if val_fraction > 0 else ("train", "test"):
        if len(data.origins(part)) == 0:
            start, end = split.bounds(part)
            raise ValueError(f"the {part} part (days {start}..{end - 1} of {len(series)}) is too short for one "
                             f"window of lookback {lookback} and horizon {horizon}; use a longer series or "
                             f"smaller lookback/horizon")
    return data


def split_dates(data: ForecastData) -> dict:
    """First and last date of each split, as ISO strings (for the run record)."""
    out = {}
    for part in ("train", "val", "test"):
        start, end = data.split.bounds(part)
        if end > start:
            out[part] = [str(data.series.dates[start]), str(data.series.dates[end - 1])]
    return out


def next_dates(dates: np.ndarray, steps: int) -> np.ndarray:
    """The ``steps`` dates after a series' last date, following its calendar.

    Series without weekend dates (stock and index files) continue on business days; others (crypto, trading
    every day) continue at their most common spacing.
    """
    dates = np.asarray(dates, "datetime64[D]")
    last = dates[-1]
    weekdays = (dates.astype(np.int64) + 3) % 7  # 1970-01-01 was a Thursday: Monday = 0
    gaps = np.diff(dates).astype(np.int64)
    if len(dates) >= 10 and not np.any(weekdays >= 5) and np.any(gaps > 1):
        return np.busday_offset(last, np.arange(1, steps + 1), roll="forward")
    step = int(np.bincount(gaps).argmax()) if len(gaps) else 1
    return last + np.arange(1, steps + 1) * step
