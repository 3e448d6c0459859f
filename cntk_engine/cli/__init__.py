"""Command line: ``cntk-engine gram | verify | evaluate | info | demo`` (also ``python -m
cntk_engine``).

One module per command (:mod:`.gram`, :mod:`.verify`, :mod:`.evaluate`, :mod:`.info`,
:mod:`.demo`), each with
``add_parser(subparsers)`` and ``run(args)``; the options ``gram`` and ``evaluate`` share are
declared once in :mod:`.common`.

Errors (bad paths, unreadable or wrongly shaped data, out-of-range numbers, a store of another
job, an unreachable scheduler, running out of memory) are reported as one line on stderr with
exit status 2 (``--debug`` shows the traceback); Ctrl-C exits with 130 and the store keeps every
finished tile.  ``verify`` exits with 1 when a store fails verification.
"""
from __future__ import annotations

import argparse
import logging
import sys

from . import demo, evaluate, gram, info, verify
from .common import PROG, CliError

COMMANDS = (gram, verify, evaluate, info, demo)


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog=PROG, description="Exact CNTK / NNGP kernels of image sets.")
    ap.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    ap.add_argument("-q", "--quiet", action="store_true", help="warnings only")
    ap.add_argument("--debug", action="store_true", help="show tracebacks of errors")
    sub = ap.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for command in COMMANDS:
        command.add_parser(sub)
    return ap


def main(argv=None) -> int:
    ap = build_parser()
    args = ap.parse_args(argv)
    logging.basicConfig(format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    logging.getLogger("cntk_engine").setLevel(
        logging.DEBUG if args.verbose else logging.WARNING if args.quiet else logging.INFO)
    args.argv = list(sys.argv[1:] if argv is None else argv)   # the command, for records
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        if args.command == "gram":      # the only command with a store to resume
            print(f"{PROG}: interrupted; finished tiles are kept in --out, rerun with --resume to "
                  "continue", file=sys.stderr)
        else:
            print(f"{PROG}: interrupted", file=sys.stderr)
        return 130
    except (CliError, ValueError, RuntimeError, OSError, ImportError, ArithmeticError,
            MemoryError) as e:
        if args.debug:
            raise
        print(f"{PROG}: error: {e or type(e).__name__}".replace("\n", " "), file=sys.stderr)
        return 2


__all__ = ["main", "build_parser", "CliError", "PROG"]
