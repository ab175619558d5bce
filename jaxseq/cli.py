"""The ``jaxseq`` console script.

Each sub-command lives in its own module under ``jaxseq/commands/`` and exposes
``register(subparsers)``, which adds its parser and sets ``run`` (a function of the parsed args returning
an exit code). Modules import their heavy dependencies inside ``run`` so that ``jaxseq --help`` stays fast.

Errors a user can cause (bad input, missing files, a run folder of the wrong kind, a missing optional package)
end as one line ``jaxseq COMMAND: error: ...`` and exit code 2; anything else is a bug and keeps its traceback.
``--debug`` (or ``JAXSEQ_DEBUG=1``) shows the traceback of every error.
"""
from __future__ import annotations

import argparse
import contextlib
import importlib
import logging
import os
import pkgutil
import sys

from jaxseq import commands


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="jaxseq", description="Recurrent sequence models in JAX.")
    parser.add_argument("--debug", action="store_true",
                        help="on an error, show its traceback instead of one line (also JAXSEQ_DEBUG=1)")
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for info in sorted(pkgutil.iter_modules(commands.__path__), key=lambda m: m.name):
        importlib.import_module(f"jaxseq.commands.{info.name}").register(subparsers)
    for each in parsers(parser):
        _plain_help(each)
    return parser


def parsers(parser: argparse.ArgumentParser):
    """``parser`` and every sub-command parser below it, depth first."""
    yield parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                yield from parsers(sub)


def _plain_help(parser: argparse.ArgumentParser) -> None:
    """One help style for every command: plain text (the descriptions are module docstrings, in reST) and every
    option's default shown. Done here, once, so a new sub-command cannot forget it."""
    parser.formatter_class = commands.HelpFormatter
    parser.description = commands.plain(parser.description)
    for action in parser._actions:
        action.help = commands.plain(action.help)
        for choice in getattr(action, "_choices_actions", ()):  # the one-line help of each sub-command
            choice.help = commands.plain(choice.help)


def _describe(error: Exception) -> str:
    """The message, with the path first for operating-system errors (``[Errno 17] File exists: 'x'``)."""
    if isinstance(error, OSError) and error.filename is not None and error.strerror:
        where = f"{error.filename} -> {error.filename2}" if error.filename2 is not None else str(error.filename)
        return f"{where}: {error.strerror.lower()}"
    return " ".join(str(error).split())  # one line, even when a library message spans several


class _Below(logging.Filter):
    def __init__(self, level: int):
        super().__init__()
        self.level = level

    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno < self.level


@contextlib.contextmanager
def _console_logging():
    """The library's messages (``logging.getLogger("jaxseq")``) as plain lines: INFO on stdout, warnings and
    worse on stderr. Handlers are bound to the streams of this call and removed after it."""
    logger = logging.getLogger("jaxseq")
    out, err = logging.StreamHandler(sys.stdout), logging.StreamHandler(sys.stderr)
    out.setLevel(logging.INFO)
    out.addFilter(_Below(logging.WARNING))
    err.setLevel(logging.WARNING)
    for handler in (out, err):
        handler.setFormatter(logging.Formatter("%(message)s"))
        logger.addHandler(handler)
    level, propagate = logger.level, logger.propagate
    logger.setLevel(logging.INFO)
    # Not on to the root logger as well: a library imported on the way (orbax, via absl) may have given it a
    # handler, which would print every line a second time with a "WARNING:jaxseq...:" prefix.
    logger.propagate = False
    try:
        yield
    finally:
        logger.setLevel(level)
        logger.propagate = propagate
        for handler in (out, err):
            logger.removeHandler(handler)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    debug = args.debug or os.environ.get("JAXSEQ_DEBUG", "") not in ("", "0")
    try:
        with _console_logging():
            return int(args.run(args) or 0)
    except KeyboardInterrupt:
        if debug:
            raise
        # Ctrl-C: training has already said where its checkpoint is; a traceback would only bury that.
        print(f"jaxseq {args.command}: interrupted", file=sys.stderr)
        return 130
    except (ValueError, OSError, ImportError) as error:
        if debug:
            raise
        # Bad input, missing files or a missing optional package get one line naming what was wrong.
        print(f"jaxseq {args.command}: error: {_describe(error)}", file=sys.stderr)
        return 2
    except FloatingPointError as error:
        if debug:
            raise
        # training.NonFiniteError: the message names the bad steps; the last good checkpoint is kept.
        print(f"jaxseq {args.command}: stopped: {error}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
