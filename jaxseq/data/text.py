"""Caption text: the chapter's cleaning, ``startseq``/``endseq`` wrapping, and a count-thresholded vocabulary.

The chapter (section 18.4.2) cleans each caption by lower-casing, stripping ASCII punctuation from every
token, dropping tokens of one character (the hanging "a" and "s") and tokens that contain a non-letter (digits),
then wraps it as ``startseq ... endseq``. The vocabulary keeps words seen at least ``min_count`` times in the
training captions and reserves index 0 for padding, so ``len(vocab)`` = kept words + 1 (1,651 + 1 = 1,652 on
Flickr8k at ``min_count=10``).
"""
from __future__ import annotations

import collections
import dataclasses
import string
from typing import Iterable, Sequence

import numpy as np

START = "startseq"
END = "endseq"
PAD_INDEX = 0

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


class UnknownWordError(KeyError, ValueError):
    """A word or index the vocabulary does not have. A KeyError for lookups, a ValueError for bad input (so the
    command line reports it in one line); its message is shown as written, not quoted."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else ""


@dataclasses.dataclass(frozen=True)
class Vocab:
    """Word <-> index map with padding at index 0 and an optional unknown-word index.

    Attributes:
      words: index -> word; ``words[0]`` is the padding entry ``""``.
      counts: training count of each kept word (0 for padding and the unknown token).
      unknown: the unknown-word token, or None. With None (the chapter's policy) out-of-vocabulary words are
        dropped by ``encode``; otherwise they map to ``index(unknown)``.
    """

    words: tuple[str, ...]
    counts: tuple[int, ...]
    unknown: str | None = None

    def __post_init__(self):
        if not self.words or self.words[0] != "":
            raise ValueError(f"words[0] must be the padding entry '', got {self.words[:1]!r}")
        if len(set(self.words)) != len(self.words):
            raise ValueError("words must be distinct")
        if self.unknown is not None and self.unknown not in self.words:
            raise ValueError(f"unknown token {self.unknown!r} is not in words")
        object.__setattr__(self, "_index", {w: i for i, w in enumerate(self.words)})

    @classmethod
    def build(cls, texts: Iterable[str], *, min_count: int = 1, unknown: str | None = None) -> "Vocab":
        """Count the space-separated words of ``texts`` and keep those seen ``>= min_count`` times.

        Kept words are ordered by decreasing count, ties by first appearance (deterministic). ``unknown``, if
        given, takes index 1 and counts in ``len(vocab)``.
        """
        if min_count < 1:
            raise ValueError(f"min_count must be >= 1, got {min_count}")
        counter = collections.Counter(w for text in texts for w in text.split())
        if unknown is not None:
            counter.pop(unknown, None)
        # Counter keeps first-appearance order, and sorted() is stable, so ties stay in that order.
        kept = sorted((w for w, c in counter.items() if c >= min_count), key=lambda w: -counter[w])
        head = [""] + ([unknown] if unknown is not None else [])
        return cls(tuple(head + kept), tuple([0] * len(head) + [counter[w] for w in kept]), unknown)

    def __len__(self) -> int:
        return len(self.words)

    def __contains__(self, word: str) -> bool:
        return word in self._index and word != ""

    def index(self, word: str) -> int:
        """Index of ``word``; ``UnknownWordError`` (a KeyError) if absent."""
        try:
            return self._index[word]
        except KeyError:
            raise UnknownWordError(f"word {word!r} is not in the vocabulary of {len(self)} entries") from None

    @property
    def start_index(self) -> int:
        return self._special(START)

    @property
    def end_index(self) -> int:
        return self._special(END)

    def _special(self, word: str) -> int:
        if word not in self._index:
            raise UnknownWordError(f"the vocabulary has no {word!r}: build it from captions wrapped by wrap() "
                                   f"('{START} ... {END}'), with min_count at most the number of captions")
        return self._index[word]

    def encode(self, text: str) -> list[int]:
        """Word indices of ``text``; unknown words are dropped (``unknown=None``) or mapped to ``unknown``."""
        unk = None if self.unknown is None else self._index[self.unknown]
        out = []
        for word in text.split():
            i = self._index.get(word, unk)
            if i is not None and i != PAD_INDEX:
                out.append(i)
        return out

    def decode(self, indices: Sequence[int], *, strip: bool = True) -> str:
        """Words of ``indices``, stopping at the first ``endseq``; ``strip`` drops padding/start/end words."""
        indices = np.asarray(indices)
        if indices.ndim != 1:
            raise ValueError(f"decode takes one sequence of indices [time], got shape {indices.shape}")
        words = []
        for i in indices.tolist():
            if not isinstance(i, int) or not 0 <= i < len(self.words):
                raise UnknownWordError(f"index {i!r} is not in the vocabulary: valid indices are 0..{len(self) - 1}")
            word = self.words[i]
            if word == END:
                if not strip:
                    words.append(word)
                break
            if strip and word in ("", START):
                continue
            words.append(word)
        return " ".join(words)

    def encode_batch(self, texts: Sequence[str], max_len: int | None = None) -> np.ndarray:
        """Right-padded ``int32[len(texts), max_len]``; ``max_len`` defaults to the longest, longer ones raise."""
        encoded = [self.encode(t) for t in texts]
        longest = max((len(e) for e in encoded), default=0)
        if max_len is None:
            max_len = longest
        elif longest > max_len:
            raise ValueError(f"max_len={max_len} but a text encodes to {longest} tokens")
        out = np.zeros((len(encoded), max_len), np.int32)
        for row, e in zip(out, encoded):
            row[:len(e)] = e
        return out

    def to_json(self) -> dict:
        return {"words": list(self.words), "counts": list(self.counts), "unknown": self.unknown}

    @classmethod
    def from_json(cls, data: dict) -> "Vocab":
        return cls(tuple(data["words"]), tuple(data["counts"]), data.get("unknown"))
