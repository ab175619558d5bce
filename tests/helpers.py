"""Shared test helpers: the one tolerance helper of the suite (DESIGN.md), and the environment of subprocesses."""
from __future__ import annotations

import os
import pathlib

import jax
import numpy as np

ROOT = pathlib.Path(__file__).resolve().parents[1]


def assert_trees_close(actual, expected, *, rtol: float = 1e-5, atol: float = 1e-6) -> None:
    """Assert two pytrees have the same structure and allclose leaves; the message names the leaf path."""
    actual_leaves, actual_def = jax.tree_util.tree_flatten_with_path(actual)
    expected_leaves, expected_def = jax.tree_util.tree_flatten_with_path(expected)
    assert actual_def == expected_def, f"tree structures differ:\n{actual_def}\n{expected_def}"
    for (path, a), (_, e) in zip(actual_leaves, expected_leaves):
        np.testing.assert_allclose(np.asarray(a, np.float64), np.asarray(e, np.float64), rtol=rtol, atol=atol,
                                   err_msg=f"at {jax.tree_util.keystr(path)}")


def subprocess_env(**extra) -> dict[str, str]:
    """The environment for a Python subprocess of a test: this checkout on the path, the CPU, the suite's XLA flags.

    The suite's XLA flags (conftest) plus the test's own: the same compiler settings in every process, which the
    bitwise comparisons across processes rely on.
    """
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": str(ROOT), **extra}
    env["XLA_FLAGS"] = " ".join(f for f in (os.environ.get("XLA_FLAGS"), extra.get("XLA_FLAGS")) if f)
    return env
