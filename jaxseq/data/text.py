"""Caption text: the chapter's cleaning, ``startseq``/``endseq`` wrapping, and its vocabulary convention.

The chapter (section 18.4.2) cleans each caption by lower-casing, stripping ASCII punctuation from every
token, dropping tokens of one character (the hanging "a" and "s") and tokens that contain a non-letter (digits),
then wraps it as ``startseq ... endseq``. The vocabulary (``caption_vocab``, a ``jaxseq.data.vocab.Vocab``)
keeps words seen at least ``min_count`` times in the training captions and reserves index 0 for padding, so
``len(vocab)`` = kept words + 1 (1,651 + 1 = 1,652 on Flickr8k at ``min_count=10``).
"""
from __future__ import annotations

import string
from typing import Iterable

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
