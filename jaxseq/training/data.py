"""Training data as random access: `BatchSource` (the protocol fit reads) and `ArrayBatches` (arrays in memory)."""
from __future__ import annotations

from typing import Protocol

import numpy as np


class BatchSource(Protocol):
    """Training data as random access: the batch order is a pure function of (seed, epoch, index).

    That purity is what makes resume exact: a restarted run asks for batch (epoch, index) and gets the bytes the
    killed run would have seen, with no iterator state to save.
    """

    def num_batches(self, epoch: int) -> int: ...

    def batch(self, epoch: int, index: int) -> dict[str, np.ndarray]: ...


class ArrayBatches:
    """`BatchSource` over a dict of equal-length numpy arrays, reshuffled each epoch from (seed, epoch).

    Args:
      arrays: name -> array, all with the same leading (example) dimension, e.g. x `[examples, time, features]`.
      batch_size: examples per batch.
      seed: seeds the per-epoch permutation (`np.random.default_rng([seed, epoch])`).
      shuffle: False keeps the stored order (evaluation).
      drop_remainder: True drops the last partial batch, so every batch has the same shape (one compilation)
        and divides over the devices; False keeps it.
    """

    def __init__(self, arrays: dict[str, np.ndarray], batch_size: int, *, seed: int, shuffle: bool = True,
                 drop_remainder: bool = True):
        if not isinstance(arrays, dict) or not arrays:
            raise ValueError(f"arrays must be a non-empty dict of name -> array, got {type(arrays).__name__}")
        lengths = {name: np.shape(a)[0] if np.ndim(a) else None for name, a in arrays.items()}
        if None in lengths.values() or len(set(lengths.values())) != 1:
            raise ValueError(f"arrays must all have the same leading (example) dimension, got lengths {lengths}")
        if not isinstance(batch_size, (int, np.integer)) or batch_size < 1:
            raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
        self.arrays = {name: np.asarray(a) for name, a in arrays.items()}
        self.num_examples = next(iter(lengths.values()))
        self.batch_size = int(batch_size)
        self.seed = seed
        self.shuffle = shuffle
        self.drop_remainder = drop_remainder
        if self.num_batches(0) == 0:
            raise ValueError(f"{self.num_examples} examples make no full batch of batch_size={batch_size}; "
                             "lower batch_size or pass drop_remainder=False")

    def num_batches(self, epoch: int) -> int:
        del epoch  # the same count every epoch
        if self.drop_remainder:
            return self.num_examples // self.batch_size
        return -(-self.num_examples // self.batch_size)

    def order(self, epoch: int) -> np.ndarray:
        """Example indices of `epoch`, int64 `[examples]`."""
        if not self.shuffle:
            return np.arange(self.num_examples)
        return np.random.default_rng([self.seed, epoch]).permutation(self.num_examples)

    def batch(self, epoch: int, index: int) -> dict[str, np.ndarray]:
        n = self.num_batches(epoch)
        if not 0 <= index < n:
            raise IndexError(f"batch index {index} out of range: epoch {epoch} has {n} batches")
        rows = self.order(epoch)[index * self.batch_size:(index + 1) * self.batch_size]
        return {name: a[rows] for name, a in self.arrays.items()}
