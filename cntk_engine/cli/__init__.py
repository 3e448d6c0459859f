"""Command line: ``cntk-engine gram | verify | preprocess | solve | evaluate | info | demo``
(also ``python -m cntk_engine``).

One module per command (:mod:`.gram`, :mod:`.verify`, :mod:`.preprocess`, :mod:`.solve`,
:mod:`.evaluate`, :mod:`.info`, :mod:`.demo`), each with
``add_parser(subparsers)`` and ``run(args)``; the options several commands share are declared
once in :mod:`.common`.

Errors (bad paths, unreadable or wrongly shaped data, out-of-range numbers, a store of another
job, an unreachable scheduler, running out of memory) are reported as one line on stderr with
exit status 2 (``--debug`` shows the traceback), naming the options as typed (the library's own
checks too: :mod:`cntk_engine.spelling`); Ctrl-C exits with 130 and the store keeps every
finished tile.  ``verify`` exits with 1 when a store fails verification.  ``-v`` / ``-q`` /
``--debug`` go before or after the command.
"""
from __future__ import annotations

import argparse
import difflib
import errno
import logging
import sys
import warnings

from . import demo, evaluate, gram, info, preprocess, solve, verify
from ..spelling import command_line
from ..version import __version__
from .common import (PROG, CliError, Terminated, guarded_output, silence,
                     terminated_as_interrupted)

COMMANDS = (gram, verify, preprocess, solve, evaluate, info, demo)
#: Python parameters a command's option stands for besides the one of its own name
#: (``gram``'s DATA is ``gram(x1, ...)``; ``--scheduler`` picks the Dask ``client``; ``--zca-reg`` is
#: ``zca_whiten(reg=)``, ``--downsample`` ``downsample(x, factor)``, verify's STORE
#: ``verify_store(path)``, ``--preprocess`` ``preprocess(how=)``)
PYTHON_ALIASES = {"x1": "data", "client": "scheduler", "reg": "zca_reg", "factor": "downsample",
                  "path": "store", "how": "preprocess"}


def python_options(parser: argparse.ArgumentParser) -> dict:
    """Python parameter -> this command's option (``lap_window`` -> ``--lap-window``, ``x1`` ->
    ``DATA``), for the library's error messages (:mod:`cntk_engine.spelling`)."""
    options = {}
    for a in parser._actions:      # argparse lists a parser's options nowhere public
        if a.dest in options or a.dest == "help" or a.dest is argparse.SUPPRESS:
            continue               # the first option of a destination (--preprocess, not --zca)
        long = [s for s in a.option_strings if s.startswith("--")]
        options[a.dest] = (long or a.option_strings or [a.metavar or a.dest.upper()])[0]
    options.update({name: options[dest] for name, dest in PYTHON_ALIASES.items() if dest in options})
    return options


def add_global_options(parser: argparse.ArgumentParser, default=False) -> None:
    """-v / -q / --debug: before the command (``default`` False) and after it (``default``
    SUPPRESS, so that a command line without them keeps what was given before the command)."""
    parser.add_argument("-v", "--verbose", action="store_true", default=default, help="debug logging")
    parser.add_argument("-q", "--quiet", action="store_true", default=default, help="warnings only")
    parser.add_argument("--debug", action="store_true", default=default,
                        help="show tracebacks of errors")


class _Parser(argparse.ArgumentParser):
    """argparse's parser whose usage errors are one line, as every other error of the command
    line is (argparse prints the whole usage block first): the message, and where the options
    are listed."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


class _CommandLine(_Parser):
    """The top-level parser: options it does not know are said by the command they were given
    to (argparse says them at the top, pointing at ``cntk-engine --help``), with the nearest of
    its options for each misspelt one."""

    commands: dict = {}

    def parse_args(self, args=None, namespace=None):
        ns, extras = self.parse_known_args(args, namespace)
        if extras:
            argv = list(sys.argv[1:] if args is None else args)
            command = getattr(ns, "command", None)
            given = [w for w in argv if w in extras]
            before = command in argv and any(argv.index(w) < argv.index(command) for w in given)
            parser = self if before else self.commands.get(command, self)
            known = [s for a in parser._actions for s in a.option_strings if s.startswith("--")]
            near = [(w, difflib.get_close_matches(w.split("=")[0], known, n=1, cutoff=0.7))
                    for w in extras if w.startswith("--")]
            hint = "; ".join(f"{w.split('=')[0]}: did you mean {m[0]}?" for w, m in near if m)
            parser.error(f"unrecognized arguments: {' '.join(extras)}" + (f" ({hint})" if hint else ""))
        return ns


def build_parser() -> argparse.ArgumentParser:
    ap = _CommandLine(prog=PROG, description="Exact CNTK / NNGP kernels of image sets.")
    ap.add_argument("--version", action="version", version=f"{PROG} {__version__}",
                    help="print the version and exit (cntk-engine info: the build and backends)")
    add_global_options(ap)
    sub = ap.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    sub.required = True
    for command in COMMANDS:
        command.add_parser(sub)
    for parser in sub.choices.values():
        parser.set_defaults(python_options=python_options(parser))
        add_global_options(parser, default=argparse.SUPPRESS)
    ap.commands = dict(sub.choices)
    return ap


def _holds_a_store(out) -> bool:
    """Whether --out holds a Gram store now (what an interrupted gram can be resumed from)."""
    from ..jobs.store import is_store
    try:
        return bool(out) and is_store(out)
    except Exception:  # noqa: BLE001 - a file or a foreign folder: nothing of ours to resume
        return False


def _quiet_exit() -> None:
    """After an interrupt: zarr's reads still pending in its event loop are destroyed when the
    process exits, each logged with its traceback by asyncio or reported as unraisable
    (thousands of lines for a large store, after the one line that says what matters), and
    those not started yet are warned of as never awaited."""
    logging.getLogger("asyncio").setLevel(logging.CRITICAL)
    sys.unraisablehook = lambda unraisable: None
    warnings.filterwarnings("ignore", message="coroutine .* was never awaited", category=RuntimeWarning)


def _lost_output(error: OSError) -> int:
    """The exit status of a command that did its work but whose report could not be written
    to standard output: a reader that left (`cntk-engine info | head`) quietly 141 (128 +
    SIGPIPE, as a shell reports it); another failure (a full disk) said on standard error,
    status 1."""
    if error.errno == errno.EPIPE:
        return 141
    try:
        print(f"{PROG}: its report could not be written to standard output ({error}); its work "
              "is done", file=sys.stderr)
    except (OSError, ValueError, AttributeError):     # standard error fails too
        pass
    return 1


def main(argv=None) -> int:
    ap = build_parser()
    args = ap.parse_args(argv)
    if args.verbose and args.quiet:
        ap.error("-v/--verbose (debug logging) and -q/--quiet (warnings only) contradict each "
                 "other; give one of them")
    logging.basicConfig(format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    logging.getLogger("cntk_engine").setLevel(
        logging.DEBUG if args.verbose else logging.WARNING if args.quiet else logging.INFO)
    args.argv = list(sys.argv[1:] if argv is None else argv)   # the command, for records
    try:
        # SIGTERM (a batch system's time limit) stops a command that claims tiles as Ctrl-C
        # does: claims released; standard output that fails (`| head`, a full disk) ends the
        # report, not the work
        claims = args.command == "gram" or (args.command == "evaluate" and bool(args.store))
        with command_line(args.python_options), terminated_as_interrupted(claims), \
                guarded_output() as (out, _):
            rc = int(args.func(args) or 0)
        # a command's own failure (verify of a damaged store: 1) is not hidden by a lost report
        return rc if rc or out.error is None else _lost_output(out.error)
    except BrokenPipeError:             # `cntk-engine info | head`: the reader left; say nothing
        silence(sys.stdout)
        return 141
    except KeyboardInterrupt as e:
        if argv is None:        # the process is the command (not a caller's) and ends now
            _quiet_exit()
        stopped = getattr(e, "outcome", "interrupted")
        if args.command == "gram" and _holds_a_store(args.out):
            print(f"{PROG}: {stopped}; finished tiles are kept in --out, rerun with --resume to "
                  "continue", file=sys.stderr)
        elif args.command == "gram":                # before the store was created (reading DATA)
            print(f"{PROG}: {stopped} before --out was created; nothing was stored",
                  file=sys.stderr)
        elif args.command == "evaluate" and getattr(args, "store", None):
            print(f"{PROG}: {stopped}; the kernels' finished tiles are kept in --store, rerun "
                  "the same command with --resume to continue", file=sys.stderr)
        else:
            print(f"{PROG}: {stopped}", file=sys.stderr)
        return 143 if isinstance(e, Terminated) else 130      # 128 + the signal, as a shell says
    except (CliError, ValueError, RuntimeError, OSError, ImportError, ArithmeticError,
            MemoryError) as e:
        if args.debug:
            raise
        print(f"{PROG}: error: {e or type(e).__name__}".replace("\n", " "), file=sys.stderr)
        return 2


__all__ = ["main", "build_parser", "python_options", "CliError", "PROG"]
