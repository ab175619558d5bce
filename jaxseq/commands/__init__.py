"""Sub-commands of the ``jaxseq`` console script, one module each (discovered by ``jaxseq.cli``).

The helpers here are shared by the sub-commands (this file is not itself a sub-command): argparse types
that reject bad numbers with a message naming the flag, the rewording of library messages into flags, and the
help formatting (``plain`` turns the reST of docstrings used as descriptions into plain text, ``HelpFormatter``
shows every default).
"""
from __future__ import annotations

import argparse
import math
import re
import textwrap


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



_LITERAL = re.compile(r"``(.+?)``|`([^`]+)`")


def plain(text: str | None) -> str | None:
    """reST as a terminal shows it: ``x`` and `x` without the quotes, "Examples::" as "Examples:"."""
    if text is None:
        return None
    text = _LITERAL.sub(lambda m: m.group(1) or m.group(2), text)
    return re.sub(r"\s*::$", ":", text, flags=re.MULTILINE)


def worth_showing(default) -> bool:
    """Whether help should show this default: not for None, False (flags), "" or argparse.SUPPRESS."""
    return not (default is None or default is False or default == "" or default == argparse.SUPPRESS)


class HelpFormatter(argparse.HelpFormatter):
    """Descriptions wrapped by paragraph with indented example lines kept as written; every option's default.

    An option shows "(default: X)" unless its help already names a default or it has none worth showing
    (None, False, the empty string).
    """

    def _fill_text(self, text, width, indent):
        paragraphs = []
        for block in re.split(r"\n\s*\n", textwrap.dedent(text).strip()):
            lines = block.splitlines()
            if all(line.startswith(" ") for line in lines):  # an example block: keep its lines and indentation
                paragraphs.append("\n".join(indent + line for line in lines))
            else:
                paragraphs.append(textwrap.fill(" ".join(block.split()), width, initial_indent=indent,
                                                subsequent_indent=indent))
        return "\n\n".join(paragraphs)

    def _get_help_string(self, action):
        help_text = action.help or ""
        if "default" in help_text or not action.option_strings or not worth_showing(action.default):
            return help_text
        return f"{help_text} (default: %(default)s)" if help_text else "default: %(default)s"
