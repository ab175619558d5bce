"""Matplotlib figures (headless Agg backend): one function per figure, each writing a PNG and returning its path.

Sections are owned by topic (training, gradients, forecasting, captioning, translation); each function takes
plain arrays so the figures can be redrawn from the JSON results files.
"""
from __future__ import annotations

import pathlib

import matplotlib

matplotlib.use("Agg")  # no display on servers and CI; must precede pyplot
import matplotlib.pyplot as plt  # noqa: E402


def save_figure(fig, path) -> pathlib.Path:
    """Write ``fig`` to ``path`` (parents created) and close it, so long runs do not leak figures."""
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)
    return path
