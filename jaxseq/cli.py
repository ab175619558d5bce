"""The ``jaxseq`` console script.

Each sub-command lives in its own module under ``jaxseq/commands/`` and exposes
``register(subparsers)``, which adds its parser and sets ``run`` (a function of the parsed args returning
an exit code). Modules import their heavy dependencies inside ``run`` so that ``jaxseq --help`` stays fast.
"""
from __future__ import annotations

import argparse
import importlib
import pkgutil
import sys

from jaxseq import commands


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="jaxseq", description="Recurrent sequence models in JAX.")
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for info in sorted(pkgutil.iter_modules(commands.__path__), key=lambda m: m.name):
        importlib.import_module(f"jaxseq.commands.{info.name}").register(subparsers)
    return parser


def _describe(error: Exception) -> str:
    """The message, with the path first for operating-system errors (``[Errno 17] File exists: 'x'``)."""
    if isinstance(error, OSError) and error.filename is not None and error.strerror:
        where = f"{error.filename} -> {error.filename2}" if error.filename2 is not None else str(error.filename)
        return f"{where}: {error.strerror.lower()}"
    return str(error)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.run(args) or 0)
    except KeyboardInterrupt:
        # Ctrl-C: training has already said where its checkpoint is; a traceback would only bury that.
        print(f"jaxseq {args.command}: interrupted", file=sys.stderr)
        return 130
    except (ValueError, OSError) as error:
        # Bad input gets one line naming what was wrong, not a traceback.
        print(f"jaxseq {args.command}: error: {_describe(error)}", file=sys.stderr)
        return 2
    except FloatingPointError as error:
        # training.NonFiniteError: the message names the bad steps; the last good checkpoint is kept.
        print(f"jaxseq {args.command}: stopped: {error}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
