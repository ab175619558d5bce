"""ImageNet-1k class names, read offline from an installed package, for showing what a classifier sees.

No package in jaxseq's core ships the 1,000 names, and fetching them (as ``keras...decode_predictions``
does) needs the network. tensorflow-datasets (the optional ``tfds`` extra, Apache-2.0) carries them as
the list ``IMAGENET_LABELS_LIST`` in ``tensorflow_datasets/datasets/siscore/labels.py``; that file is
parsed, not imported or executed (``ast.literal_eval`` of one assignment).
"""
from __future__ import annotations

import ast
import functools
import importlib.util
import pathlib

import numpy as np

_LABELS_FILE = ("datasets", "siscore", "labels.py")
_LABELS_NAME = "IMAGENET_LABELS_LIST"


@functools.cache
def class_names() -> tuple[str, ...]:
    """The 1,000 ImageNet class names in the standard index order (0 = "tench, Tinca tinca").

    Raises:
        FileNotFoundError: tensorflow-datasets is not installed (or no longer ships the list).
    """
    spec = importlib.util.find_spec("tensorflow_datasets")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("ImageNet class names come from tensorflow-datasets' files: "
                                "`pip install 'jaxseq[tfds]'` (or tensorflow-datasets) to show them")
    path = pathlib.Path(list(spec.submodule_search_locations)[0]).joinpath(*_LABELS_FILE)
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: this tensorflow-datasets has no ImageNet class list")
    for node in ast.parse(path.read_text(encoding="utf-8")).body:
        if isinstance(node, ast.Assign) and any(getattr(t, "id", None) == _LABELS_NAME for t in node.targets):
            names = ast.literal_eval(node.value)
            if len(names) != 1000:
                raise ValueError(f"{path}: {_LABELS_NAME} has {len(names)} names, expected 1000")
            return tuple(names)
    raise FileNotFoundError(f"{path} has no {_LABELS_NAME}")


def top_k(logits: np.ndarray, k: int = 5) -> list[list[tuple[int, float]]]:
    """``[batch, 1000]`` logits -> per image the ``k`` best ``(class index, softmax probability)``."""
    logits = np.asarray(logits, np.float64)
    if logits.ndim != 2:
        raise ValueError(f"logits has shape {logits.shape}, expected [batch, classes]")
    probs = np.exp(logits - logits.max(axis=1, keepdims=True))
    probs /= probs.sum(axis=1, keepdims=True)
    best = np.argsort(-logits, axis=1, kind="stable")[:, :k]
    return [[(int(j), float(probs[i, j])) for j in row] for i, row in enumerate(best)]
