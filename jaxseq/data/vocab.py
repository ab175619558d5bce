"""One vocabulary for every text task: token <-> index, padding at index 0, and explicit policies for unknown
tokens and for the tokens that start and end a sequence.

Two conventions meet here, each a few keyword arguments of ``Vocab.build``:

* captions (chapter 18, ``jaxseq.data.text.caption_vocab``): padding is ``""``, ``startseq``/``endseq`` are
  ordinary words of the wrapped captions (counted like any other), and unknown words are dropped;
* translation (chapter 19, ``jaxseq.data.translation.build_vocab``): ``<pad> <unk> <s> </s>`` are reserved at
  indices 0..3 and unknown tokens map to ``<unk>``.

Saved as JSON (``to_json``; caption runs) or one token a line (``save``; translation runs and the Stanford
IWSLT vocabulary files, read by ``jaxseq.data.translation.load_vocab``).
"""
from __future__ import annotations

import collections
import dataclasses
import pathlib
from typing import Iterable, Sequence

import numpy as np

PAD_INDEX = 0
# Caption vocabularies saved before this module existed ({"words", "counts", "unknown"}) relied on these words.
_LEGACY_CAPTION_START_END = ("startseq", "endseq")


class UnknownWordError(KeyError, ValueError):
    """A token or index the vocabulary does not have. A KeyError for lookups, a ValueError for bad input (so the
    command line reports it in one line); its message is shown as written, not quoted."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else ""


@dataclasses.dataclass(frozen=True)
class Vocab:
    """Token <-> index map with padding at index 0.

    Attributes:
      tokens: index -> token; ``tokens[0]`` is the padding token.
      counts: training count of each token (0 for padding and reserved tokens), or None when loaded from a
        plain token list.
      unknown: the token out-of-vocabulary input maps to, or None to drop such input (the chapter-18 policy).
      start: the token that starts a sequence (``decode`` skips it; ``encode(add_start=True)`` prepends it).
      end: the token that ends a sequence (``decode`` stops there; ``encode(add_end=True)`` appends it).
    """

    tokens: tuple[str, ...]
    counts: tuple[int, ...] | None = None
    unknown: str | None = None
    start: str | None = None
    end: str | None = None

    def __post_init__(self):
        object.__setattr__(self, "tokens", tuple(self.tokens))
        if self.counts is not None:
            object.__setattr__(self, "counts", tuple(self.counts))
            if len(self.counts) != len(self.tokens):
                raise ValueError(f"counts has {len(self.counts)} entries for {len(self.tokens)} tokens")
        if not self.tokens:
            raise ValueError("a vocabulary needs at least the padding token at index 0")
        if len(set(self.tokens)) != len(self.tokens):
            raise ValueError("vocabulary tokens must be distinct")
        if self.unknown is not None and self.unknown not in self.tokens:
            raise ValueError(f"unknown token {self.unknown!r} is not in the vocabulary")
        object.__setattr__(self, "_index", {t: i for i, t in enumerate(self.tokens)})

    @classmethod
    def build(cls, texts: Iterable[str | Sequence[str]], *, min_count: int = 1, max_size: int | None = None,
              pad: str = "", reserved: Sequence[str] = (), unknown: str | None = None, start: str | None = None,
              end: str | None = None) -> "Vocab":
        """Count the tokens of ``texts`` (strings are split on whitespace) and keep those seen ``>= min_count``
        times, after ``pad`` at index 0 and the ``reserved`` tokens.

        Kept tokens are ordered by decreasing count, ties by first appearance (deterministic). ``max_size``
        bounds the whole vocabulary, padding and reserved tokens included.
        """
        if min_count < 1:
            raise ValueError(f"min_count must be >= 1, got {min_count}")
        head = [pad, *reserved]
        if max_size is not None and max_size < len(head):
            raise ValueError(f"max_size must be >= {len(head)} (padding and reserved tokens), got {max_size}")
        counter = collections.Counter(t for text in texts for t in (text.split() if isinstance(text, str) else text))
        for token in head:
            counter.pop(token, None)
        # Counter keeps first-appearance order, and sorted() is stable, so ties stay in that order.
        kept = sorted((t for t, c in counter.items() if c >= min_count), key=lambda t: -counter[t])
        if max_size is not None:
            kept = kept[:max_size - len(head)]
        return cls(tuple(head + kept), tuple([0] * len(head) + [counter[t] for t in kept]), unknown, start, end)

    def __len__(self) -> int:
        return len(self.tokens)

    def __contains__(self, token: str) -> bool:
        return token in self._index and self._index[token] != PAD_INDEX

    def index(self, token: str) -> int:
        """Index of ``token``; ``UnknownWordError`` (a KeyError) if absent."""
        try:
            return self._index[token]
        except KeyError:
            raise UnknownWordError(f"word {token!r} is not in the vocabulary of {len(self)} entries") from None

    @property
    def unknown_index(self) -> int | None:
        return None if self.unknown is None else self._index[self.unknown]

    @property
    def start_index(self) -> int:
        return self._marker(self.start, "start")

    @property
    def end_index(self) -> int:
        return self._marker(self.end, "end")

    def _marker(self, token: str | None, which: str) -> int:
        if token is None:
            raise UnknownWordError(f"the vocabulary has no {which} token (build it with {which}=...)")
        if token not in self._index:
            raise UnknownWordError(f"the vocabulary has no {token!r}: build it from texts that contain it, with "
                                   "min_count at most the number of texts")
        return self._index[token]

    def encode(self, text: str | Sequence[str], *, add_start: bool = False, add_end: bool = False) -> list[int]:
        """Indices of ``text`` (a string is split on whitespace); unknown tokens map to ``unknown`` or, without
        one, are dropped, as is padding."""
        unk = self.unknown_index
        ids = []
        for token in text.split() if isinstance(text, str) else text:
            i = self._index.get(token, unk)
            if i is not None and i != PAD_INDEX:
                ids.append(i)
        return ([self.start_index] if add_start else []) + ids + ([self.end_index] if add_end else [])

    def decode(self, indices: Sequence[int], *, strip: bool = True) -> list[str]:
        """Tokens of ``indices`` up to the first ``end`` token; ``strip`` drops padding, ``start`` and ``end``
        (without it, they are kept and decoding still stops after ``end``)."""
        indices = np.asarray(indices)
        if indices.ndim != 1:
            raise ValueError(f"decode takes one sequence of indices [time], got shape {indices.shape}")
        end = self._index.get(self.end) if self.end is not None else None
        start = self._index.get(self.start) if self.start is not None else None
        out = []
        for i in indices.tolist():
            if not isinstance(i, int) or not 0 <= i < len(self.tokens):
                raise UnknownWordError(f"index {i!r} is not in the vocabulary: valid indices are 0..{len(self) - 1}")
            if i == end:
                if not strip:
                    out.append(self.tokens[i])
                break
            if strip and i in (PAD_INDEX, start):
                continue
            out.append(self.tokens[i])
        return out

    def encode_batch(self, texts: Sequence[str | Sequence[str]], max_len: int | None = None) -> np.ndarray:
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
        return {"tokens": list(self.tokens), "counts": None if self.counts is None else list(self.counts),
                "unknown": self.unknown, "start": self.start, "end": self.end}

    @classmethod
    def from_json(cls, data: dict) -> "Vocab":
        """The inverse of ``to_json``; also reads caption vocabularies saved before (``{"words", ...}``)."""
        if not isinstance(data, dict) or not ({"tokens", "words"} & set(data)):
            raise ValueError(f"not a saved vocabulary: expected a JSON object with 'tokens', got "
                             f"{type(data).__name__}")
        if "words" in data:
            start, end = _LEGACY_CAPTION_START_END
            return cls(tuple(data["words"]), data.get("counts"), data.get("unknown"), start, end)
        return cls(tuple(data["tokens"]), data.get("counts"), data.get("unknown"), data.get("start"),
                   data.get("end"))

    def save(self, path) -> None:
        """One token a line (the format of Stanford's IWSLT vocabulary files)."""
        pathlib.Path(path).write_text("\n".join(self.tokens) + "\n", encoding="utf-8")
