"""Matplotlib figures: one function per figure, each writing a PNG and returning its path.

Sections are owned by topic (training, gradients, forecasting, captioning, translation); each function takes
plain arrays so the figures can be redrawn from the JSON results files.
"""
from __future__ import annotations

import pathlib
import re

from matplotlib.figure import Figure


def _subplots(*args, figsize, **kwargs):
    """A figure outside pyplot, with ``Figure.subplots(*args, **kwargs)``: (figure, axes).

    Not through pyplot, so drawing needs no display and leaves the caller's backend alone (a notebook's inline
    figures keep working), and nothing is kept alive after the PNG is written.
    """
    fig = Figure(figsize=figsize)
    return fig, fig.subplots(*args, **kwargs)


def save_figure(fig, path) -> pathlib.Path:
    """Write ``fig`` to ``path`` (parents created)."""
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120, bbox_inches="tight")
    return path


# --- forecasting ---
import matplotlib.dates as mdates  # noqa: E402
import numpy as np  # noqa: E402  (each section imports what it uses)


def plot_forecast(dates, actual, forecasts: dict, path, *, title: str = "", ylabel: str = "price",
                  zoom_days: int = 60) -> pathlib.Path:
    """Test period: actual vs each forecast, full period on the left and the last ``zoom_days`` on the right.

    Args:
      dates: ``datetime64`` ``[N]`` of the forecast targets.
      actual: true values ``[N]``.
      forecasts: name -> ``[N]`` forecasts for the same dates; a name starting with "persistence" is drawn
        dashed grey, so a model that merely lags the truth by a day is visible against it.
    """
    dates = np.asarray(dates, "datetime64[D]").astype("datetime64[ms]").astype(object)
    fig, axes = _subplots(1, 2, figsize=(13, 4.2), gridspec_kw={"width_ratios": [2, 1]})
    for ax, start in zip(axes, (0, max(0, len(dates) - zoom_days))):
        ax.plot(dates[start:], np.asarray(actual)[start:], color="black", linewidth=1.4, label="actual")
        for name, values in forecasts.items():
            style = (dict(color="0.55", linestyle="--", linewidth=1.0) if name.startswith("persistence")
                     else dict(linewidth=1.0))
            ax.plot(dates[start:], np.asarray(values)[start:], label=name, **style)
        ax.grid(alpha=0.3)
        locator = mdates.AutoDateLocator(maxticks=7)
        ax.xaxis.set_major_locator(locator)
        ax.xaxis.set_major_formatter(mdates.ConciseDateFormatter(locator))
    axes[0].set_ylabel(ylabel)
    axes[0].set_title(title or "test period")
    axes[1].set_title(f"last {min(zoom_days, len(dates))} days")
    axes[0].legend(loc="best", fontsize=8)
    return save_figure(fig, path)


# --- training ---

def loss_curve(train_steps, train_loss, path, *, eval_steps=None, eval_values=None, eval_label: str = "eval loss",
               title: str | None = None) -> pathlib.Path:
    """Training loss against step, and an eval metric at its steps.

    An eval metric that is a loss (its label names a loss or an MSE) shares the loss axis; any other metric (BLEU,
    accuracy) gets its own linear axis on the right, with its own label. The loss axis is log-scaled only when its
    values are positive and span more than a factor of ``LOG_SPAN``.

    Args:
      train_steps, train_loss: `[records]` step and mean training loss of each metrics.jsonl train record.
      path: the PNG to write.
      eval_steps, eval_values: `[evals]` optional eval metric.
      eval_label: legend text of the eval line, e.g. "eval dev_loss" or "eval dev_bleu4".
      title: the figure title; None titles it with the run folder's name (``path``'s parent folder).
    """
    train_steps, train_loss = list(train_steps), list(train_loss)
    if len(train_steps) != len(train_loss):
        raise ValueError(f"train_steps has {len(train_steps)} entries but train_loss has {len(train_loss)}")
    path = pathlib.Path(path)
    fig, ax = _subplots(figsize=(6, 3.5))
    lines = ax.plot(train_steps, train_loss, _marker(train_steps), label="train loss", lw=1.2, ms=3)
    values = list(train_loss)
    if eval_steps is not None and eval_values is not None:
        eval_steps, eval_values = list(eval_steps), list(eval_values)
        if re.search(r"loss|mse", eval_label, re.IGNORECASE):
            lines += ax.plot(eval_steps, eval_values, "o-", label=eval_label, ms=3, lw=1.2)
            values += eval_values
        else:
            twin = ax.twinx()
            lines += twin.plot(eval_steps, eval_values, "o-", color="C1", label=eval_label, ms=3, lw=1.2)
            twin.set_ylabel(eval_label.removeprefix("eval "))  # a score (BLEU, accuracy): linear
    _scale(ax, values)
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_title(title or f"training run {path.resolve().parent.name}")
    ax.grid(alpha=0.3)
    ax.legend(lines, [line.get_label() for line in lines], loc="best", fontsize=8)
    return save_figure(fig, path)


LOG_SPAN = 10.0  # a log axis only for values spanning more than this factor: over 1.78-1.80 it shows no ticks


def _scale(ax, values) -> None:
    """Log scale when ``values`` are positive and span more than ``LOG_SPAN``, else linear."""
    if values and min(values) > 0 and max(values) / min(values) > LOG_SPAN:
        ax.set_yscale("log")


def _marker(steps) -> str:
    """Markers on a line of few points: a single record would otherwise draw nothing."""
    return "o-" if len(steps) <= 20 else "-"


# --- gradients ---

def plot_gradnorms(timesteps, measured, theory, path, *, theory_label: str = "theory",
                   measured_label: str = "measured", extra: dict | None = None, title: str | None = None):
    """Log-scale ``‖∂s_T/∂s_t‖`` against ``t`` with the theory overlaid (``extra``: more labelled curves)."""
    fig, ax = _subplots(figsize=(6, 4))
    ax.semilogy(timesteps, measured, "o-", ms=3, label=measured_label)
    ax.semilogy(timesteps, theory, "k--", label=theory_label)
    for label, values in (extra or {}).items():
        ax.semilogy(timesteps, values, ":", label=label)
    ax.set_xlabel("time step t")
    ax.set_ylabel("Jacobian norm (log scale)")
    ax.set_title(title or "gradient norm across time steps")
    ax.grid(alpha=0.3, which="both")
    ax.legend(loc="best", fontsize=8)
    return save_figure(fig, path)


def plot_profile(result: dict, path):
    """The figure of one ``jaxseq.gradients.profile`` result: measured norms, the theory of its kind, and
    ``ρ(W)^(T-t)`` where the cell has one; the title gives the settings."""
    kind, cell, settings = result["theory_kind"], result["cell"], result["settings"]
    gate = "f" if cell == "lstm" else "z"
    theory_label = {"exact": r"theory $\|W^{T-t}\|_2$ (exact)",
                    "upper_bound": r"bound $(\gamma\,\sigma_{\max})^{T-t}$",
                    "direct_path": rf"direct path $\Pi_{{j>t}}\, {gate}_j$ (largest unit)"}[kind]
    extra = {}
    if result["spectral_radius_line"] is not None:
        extra[r"$\rho(W)^{T-t}$"] = result["spectral_radius_line"]
    title = (f"{cell}{' ' + settings['activation'] if cell == 'rnn' else ''}, T={settings['steps']}, "
             rf"H={settings['hidden']}, $\sigma_{{\max}}$={settings['sigma_max']:g}, seed {settings['seed']}")
    return plot_gradnorms(result["timesteps"], result["measured"], result["theory"], path,
                          theory_label=theory_label, measured_label="measured " + mathtext(result["measured_quantity"]),
                          extra=extra, title=title)


def mathtext(quantity: str) -> str:
    """``||dc_T/dc_t||_2`` (the ASCII form ``jaxseq.gradients`` records) as matplotlib mathtext; other text as is."""
    match = re.fullmatch(r"\|\|d(\w)_T/d(\w)_t\|\|_2", quantity)
    if match is None:
        return quantity
    return rf"$\|\partial {match[1]}_T/\partial {match[2]}_t\|_2$"


def plot_gradnorm_bands(distance, curves: dict, path, *, theory: dict | None = None, xlabel: str = "T - t",
                        ylabel: str = r"$\|\partial h_T/\partial h_t\|_2$ (log scale)", title: str | None = None):
    """Median curves with a shaded band: ``curves[label] = (median, low, high)`` over seeds, each ``[n]``.

    ``theory[label] = values`` are drawn dashed, in the colour of the curve whose label starts the theory's
    label (so "tanh 0.9 bound" sits beside "tanh 0.9").
    """
    fig, ax = _subplots(figsize=(6.5, 4.2))
    colours = {}
    for label, (median, low, high) in curves.items():
        (line,) = ax.semilogy(distance, median, label=label)
        ax.fill_between(distance, low, high, color=line.get_color(), alpha=0.2, linewidth=0)
        colours[label] = line.get_color()
    for label, values in (theory or {}).items():
        owners = [name for name in colours if label.startswith(name)]
        ax.semilogy(distance, values, "--", color=colours[max(owners, key=len)] if owners else "k",
                    linewidth=1, label=label)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title or "gradient norms: median and 10-90% band over seeds")
    ax.grid(alpha=0.3, which="both")
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=7)  # many curves: keep them visible
    return save_figure(fig, path)


def plot_training_runs(runs: dict, path, *, metric: str = "loss", baseline: float | None = None,
                       log_y: bool = True, xlabel: str = "training step", ylabel: str | None = None,
                       title: str | None = None, styles: dict | None = None):
    """One line per run: ``runs[label] = (steps, values)``; an optional dotted ``baseline`` level.

    ``styles[label]`` (optional) holds matplotlib line keywords, e.g. ``{"color": "C0", "linestyle": "--"}``.
    """
    fig, ax = _subplots(figsize=(6, 4))
    for label, (steps, values) in runs.items():
        ax.plot(steps, values, label=label, **(styles or {}).get(label, {}))
    if baseline is not None:
        ax.axhline(baseline, color="k", linestyle=":", linewidth=1, label=f"baseline {baseline:.3g}")
    if log_y:
        ax.set_yscale("log")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel or metric)
    ax.set_title(title or metric)
    ax.grid(alpha=0.3, which="both")
    ax.legend(loc="best", fontsize=8)
    return save_figure(fig, path)


# --- translation ---

def attention_map(weights, source_tokens, target_tokens, path, *, title: str | None = None):
    """The chapter's attention grid: ``weights [target, source]`` (row t = where target word t looked).

    Source words label the columns, generated target words the rows; each row sums to 1.
    """
    weights = np.asarray(weights)
    if weights.shape != (len(target_tokens), len(source_tokens)):
        raise ValueError(f"weights must be [target={len(target_tokens)}, source={len(source_tokens)}], "
                         f"got {weights.shape}")
    fig, ax = _subplots(figsize=(1.0 + 0.55 * len(source_tokens), 1.0 + 0.45 * len(target_tokens)))
    image = ax.imshow(weights, cmap="viridis", vmin=0.0, vmax=1.0, aspect="auto")
    ax.set_xticks(range(len(source_tokens)), source_tokens, rotation=60, ha="right")
    ax.set_yticks(range(len(target_tokens)), target_tokens)
    ax.set_xlabel("source")
    ax.set_ylabel("output")
    fig.colorbar(image, ax=ax, fraction=0.04, label="attention weight")
    if title:
        ax.set_title(title)
    return save_figure(fig, path)


def bleu_vs_length(curves: dict, path, *, title: str = "BLEU against source length"):
    """One line per model: ``curves[label] = rows`` from ``metrics.bleu_by_length``."""
    fig, ax = _subplots(figsize=(6.5, 4))
    for label, rows in curves.items():
        ax.plot(range(len(rows)), [r["bleu"] for r in rows], marker="o", label=label)
        ticks = [f"{r['bin']}\n(n={r['sentences']})" for r in rows]
    ax.set_xticks(range(len(ticks)), ticks, fontsize=7)
    ax.set_xlabel("source length (tokens)")
    ax.set_ylabel("sacreBLEU")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return save_figure(fig, path)
