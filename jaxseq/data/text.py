"""Caption text: the chapter's cleaning, ``startseq``/``endseq`` wrapping, its vocabulary convention, and the
length-grouped caption batches training reads (``CaptionBatches``).

The chapter (section 18.4.2) cleans each caption by lower-casing, stripping ASCII punctuation from every
token, dropping tokens of one character (the hanging "a" and "s") and tokens that contain a non-letter (digits),
then wraps it as ``startseq ... endseq``. The vocabulary (``caption_vocab``, a ``jaxseq.data.vocab.Vocab``)
keeps words seen at least ``min_count`` times in the training captions and reserves index 0 for padding, so
``len(vocab)`` = kept words + 1 (1,651 + 1 = 1,652 on Flickr8k at ``min_count=10``).
"""
from __future__ import annotations

import string
from typing import Iterable

import numpy as np

from jaxseq.data.vocab import Vocab

START = "startseq"
END = "endseq"

_PUNCTUATION = str.maketrans("", "", string.punctuation)


def clean_caption(text: str) -> str:
    """The chapter's cleaning: lower-case, strip punctuation, drop 1-letter and non-alphabetic tokens.

    >>> clean_caption("A child in a pink dress is climbing up 2 stairs .")
    'child in pink dress is climbing up stairs'
    """
    words = (word.lower().translate(_PUNCTUATION) for word in text.split())
    return " ".join(word for word in words if len(word) > 1 and word.isalpha())


def wrap(caption: str) -> str:
    """``startseq <caption> endseq`` (the model's start and stop words)."""
    return f"{START} {caption} {END}" if caption else f"{START} {END}"


def caption_vocab(texts: Iterable[str], *, min_count: int = 1, unknown: str | None = None) -> Vocab:
    """The chapter's caption vocabulary: words of the wrapped captions seen ``>= min_count`` times.

    Padding is ``""`` at index 0; ``startseq``/``endseq`` are counted like any other word; out-of-vocabulary words
    are dropped by ``encode`` (the chapter's policy), or map to ``unknown`` (index 1) when it is given.
    """
    return Vocab.build(texts, min_count=min_count, pad="", reserved=(unknown,) if unknown is not None else (),
                       unknown=unknown, start=START, end=END)


class CaptionBatches:
    """``BatchSource`` for ``jaxseq.training.fit``: one example per caption, batched by similar length.

    Each epoch the captions are shuffled (from ``(seed, epoch)``), cut into pools of ``pool`` batches, sorted
    by length inside each pool and cut into batches, whose order is shuffled again. A batch is padded to its
    longest caption rounded up to ``multiple`` tokens, so the time loop runs over little padding while only a
    handful of shapes get compiled (Flickr8k: 5). Features are gathered per batch from the per-image table,
    so Flickr8k's 30,000 captions do not copy 2,048-d features five times.

    Args:
      features: ``[images, ...]`` per-image features.
      image_index: ``int[captions]`` row of ``features`` for each caption.
      tokens: ``int32[captions, T]`` right-padded ``startseq .. endseq``.
    """

    def __init__(self, features, image_index, tokens, batch_size: int, *, seed: int, pool: int = 16,
                 multiple: int = 8):
        tokens, image_index = np.asarray(tokens), np.asarray(image_index)
        if len(tokens) != len(image_index):
            raise ValueError(f"tokens has {len(tokens)} captions but image_index {len(image_index)}")
        if not 1 <= batch_size <= len(tokens):
            raise ValueError(f"batch_size must be in [1, {len(tokens)}] (the number of captions), got {batch_size}")
        self.features, self.image_index, self.tokens = features, image_index, tokens
        self.lengths = (tokens != 0).sum(axis=1)
        self.batch_size, self.seed, self.pool, self.multiple = batch_size, seed, pool, multiple
        self._plan = (None, None)

    def num_batches(self, epoch: int) -> int:
        del epoch  # the same count every epoch; the last partial batch is dropped
        return len(self.tokens) // self.batch_size

    def _batches(self, epoch: int) -> list:
        if self._plan[0] != epoch:
            rng = np.random.default_rng([self.seed, epoch])
            order = rng.permutation(len(self.tokens))[:self.num_batches(epoch) * self.batch_size]
            span = self.pool * self.batch_size
            batches = []
            for lo in range(0, len(order), span):
                chunk = order[lo:lo + span]
                chunk = chunk[np.argsort(self.lengths[chunk], kind="stable")]
                batches.extend(np.split(chunk, len(chunk) // self.batch_size))
            self._plan = (epoch, [batches[i] for i in rng.permutation(len(batches))])
        return self._plan[1]

    def batch(self, epoch: int, index: int) -> dict:
        rows = self._batches(epoch)[index]
        width = -(-int(self.lengths[rows].max()) // self.multiple) * self.multiple
        return {"features": self.features[self.image_index[rows]],
                "tokens": self.tokens[rows, :min(width, self.tokens.shape[1])]}
