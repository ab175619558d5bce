"""GloVe text vectors (``glove.6B.<d>d.txt``: ``word v1 v2 ... vd`` a line) into a frozen embedding matrix.

As in the chapter (section 18.5), row ``i`` of the matrix is the GloVe vector of ``vocab.tokens[i]``; words
GloVe does not know, and the padding row 0, stay zero. The model keeps the matrix frozen (no gradient).
"""
from __future__ import annotations

import pathlib

import numpy as np


def load_vectors(path, *, words=None) -> dict[str, np.ndarray]:
    """Read a GloVe text file into ``{word: float32[d]}``, keeping only ``words`` when given.

    Lines whose field count differs from the first line's (e.g. a truncated last line) raise a ValueError
    naming the line, except a final line with no newline, which is skipped as cut off. So do kept vectors
    with a field that is not a finite number (``nan``, ``inf``, text).
    """
    path = pathlib.Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"GloVe file {str(path)!r} does not exist")
    wanted = None if words is None else set(words)
    vectors: dict[str, np.ndarray] = {}
    dim = None
    # Streamed, not read whole: glove.6B.200d.txt is 700 MB. A few tokens in the 6B files are not valid UTF-8
    # (stray cp1252 bytes); they cannot match a cleaned caption word, so replacing them is harmless.
    with open(path, encoding="utf-8", errors="replace") as f:
        for number, line in enumerate(f, start=1):
            fields = line.rstrip("\n").rstrip(" ").split(" ")
            if len(fields) < 2:
                continue
            if dim is None:
                dim = len(fields) - 1
            if len(fields) - 1 != dim:
                if not line.endswith("\n"):
                    break  # a truncated copy without a final newline: the last line may be cut off
                raise ValueError(f"{path.name} line {number}: {len(fields) - 1} numbers, expected {dim}")
            if wanted is None or fields[0] in wanted:
                try:
                    vector = np.asarray(fields[1:], np.float32)
                except ValueError:
                    raise ValueError(f"{path} line {number}: the vector of {fields[0]!r} holds a field that is "
                                     "not a number") from None
                if not np.isfinite(vector).all():
                    raise ValueError(f"{path} line {number}: the vector of {fields[0]!r} holds a non-finite value "
                                     "(nan or inf); expected finite numbers")
                vectors[fields[0]] = vector
    if dim is None:
        raise ValueError(f"GloVe file {str(path)!r} has no vectors")
    return vectors


def embedding_matrix(path, vocab) -> tuple[np.ndarray, int]:
    """``(float32[len(vocab), d], found)``: GloVe rows in vocabulary order, zeros for unknown words.

    Args:
      vocab: a ``jaxseq.data.vocab.Vocab`` (or any sequence of words, index 0 being padding).
    Returns:
      The matrix and how many vocabulary words GloVe knew.
    """
    words = list(getattr(vocab, "tokens", vocab))
    vectors = load_vectors(path, words=words)
    if vectors:
        dim = len(next(iter(vectors.values())))
    else:  # no vocabulary word is in GloVe: the width comes from the file's first line
        with open(path, encoding="utf-8", errors="replace") as f:
            dim = len(f.readline().rstrip("\n").rstrip(" ").split(" ")) - 1
    matrix = np.zeros((len(words), dim), np.float32)
    found = 0
    for i, word in enumerate(words):
        if i == 0 or word not in vectors:
            continue
        matrix[i] = vectors[word]
        found += 1
    return matrix, found
