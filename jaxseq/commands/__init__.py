"""Sub-commands of the ``jaxseq`` console script, one module each (discovered by ``jaxseq.cli``).

The helpers here are shared by the sub-commands (this file is not itself a sub-command): argparse types
that reject bad numbers with a message naming the flag, and the rewording of library messages into flags.
"""
from __future__ import annotations

import argparse
import math
import re


def positive_int(text: str) -> int:
    """argparse type: an integer >= 1 (sizes, counts, epochs). argparse adds the flag to the message."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer (>= 1), got {value}")
    return value


def finite_float(text: str) -> float:
    """argparse type: a float that is not NaN or infinite."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"must be a finite number, got {text!r}")
    return value


# Library messages name Python arguments; the command line's user typed flags.
_FLAG_WORDS = ((re.compile(r"\brestart=True\b"), "--restart"),
               (re.compile(r"\ba new out_dir\b"), "a new --out folder"),
               (re.compile(r"\bTrainConfig\.out_dir="), "--out "),
               (re.compile(r"; lower batch_size or pass drop_remainder=False"), "; lower --batch-size"),
               (re.compile(r"(?<![.\w])batch_size=(?=\d)"), "--batch-size "),
               (re.compile(r"\bsmaller batch_size\b"), "smaller --batch-size"),
               (re.compile(r"\blower min_count\b"), "lower --min-count"),
               (re.compile(r"\bvariant 'attention'"), "--variant attention"))
# Task config fields that are also flags, written `name=value` in library messages.
_FIELD_FLAGS = re.compile(r"(?<![.\w])(min_count|synthetic_images|features|data|glove|beam)=")


def reword(error: Exception) -> ValueError:
    """A ValueError with the library's argument names replaced by the command line's flags."""
    message = str(error)
    for pattern, flag in _FLAG_WORDS:
        message = pattern.sub(flag, message)
    message = _FIELD_FLAGS.sub(lambda m: f"--{m.group(1).replace('_', '-')} ", message)
    return ValueError(message)

