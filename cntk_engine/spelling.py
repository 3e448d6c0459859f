"""How an error message names the caller's arguments: as the caller wrote them.

A check at the library's boundary says which argument is wrong; from Python that is
``lap_window=9``, from the command line ``--lap-window 9``.  The library writes each such name
with :func:`arg`; the command line runs a command under :func:`command_line`, with the table from
each Python parameter to the command's option (``cntk_engine.cli`` reads it off the command's
parser), so one check serves both callers and the command line does not repeat the library's
checks to reword them.  The table is a context variable: set for the command's thread while it
runs, absent (Python spelling) everywhere else.
"""
from __future__ import annotations

import contextvars
from contextlib import contextmanager
from typing import Callable, Iterator, Mapping, Sequence

_UNSET = object()
_OPTIONS: contextvars.ContextVar[Mapping[str, str] | None] = contextvars.ContextVar(
    "cntk_engine_options", default=None)
_IMAGES: contextvars.ContextVar[Mapping[str, Callable[[int], str]] | None] = contextvars.ContextVar(
    "cntk_engine_images", default=None)


def arg(name: str, value=_UNSET) -> str:
    """The argument ``name`` (set to ``value``, when given) as the caller writes it.

    Python: ``name`` / ``name=value!r``.  Command line, where the command has an option for
    ``name``: the option (``--lap-window``, ``DATA`` for a positional) / ``--lap-window 9``; a
    list as the option takes it (``--depths 3,4``), a flag set to True as the flag alone.
    """
    options = _OPTIONS.get()
    option = None if options is None else options.get(name)
    if option is None:
        return name if value is _UNSET else f"{name}={value!r}"
    if value is _UNSET or value is True:
        return option
    if isinstance(value, (list, tuple)):
        return f"{option} {','.join(str(v) for v in value)}"
    return f"{option} {value!r}" if isinstance(value, str) else f"{option} {value}"


def as_written(name: str, value) -> str:
    """``value`` of ``name`` as the caller wrote it: its repr in Python, as the option takes it
    on the command line (``[3, 4]`` -> ``3,4``)."""
    return arg(name, value)[len(arg_prefix(name)):]


def arg_prefix(name: str) -> str:
    """What comes before a value of ``name`` in :func:`arg`'s spelling: ``name=`` in Python,
    ``--option `` on the command line (for messages that append a repr themselves)."""
    options = _OPTIONS.get()
    option = None if options is None else options.get(name)
    return f"{name}=" if option is None else f"{option} "


def option(name: str) -> str | None:
    """The command-line option of ``name`` when a command runs and has one, else None (for
    messages whose Python wording is not ``name=...``)."""
    options = _OPTIONS.get()
    return None if options is None else options.get(name)


def settable(name: str) -> str | None:
    """How the caller sets ``name``: the option of the running command, ``name`` in Python, or
    None where the command has no such option (advice to set it would not help there)."""
    options = _OPTIONS.get()
    return name if options is None else options.get(name)


def unset() -> str:
    """How the caller leaves an optional argument at its default: ``None`` in Python, left out
    on the command line (for messages that offer that choice)."""
    return "None" if _OPTIONS.get() is None else "left out"


@contextmanager
def command_line(options: Mapping[str, str]) -> Iterator[None]:
    """Within the block, :func:`arg` spells the parameters in ``options`` (Python name ->
    option, e.g. ``{"lap_window": "--lap-window", "x1": "DATA"}``) as that option."""
    token = _OPTIONS.set(dict(options))
    try:
        yield
    finally:
        _OPTIONS.reset(token)


@contextmanager
def renamed(names: Mapping[str, str]) -> Iterator[None]:
    """On the command line, within the block, also spell the parameters in ``names`` so (a
    command that passes the engine something other than an option's value, e.g. the training
    images it drew from DATA as ``x1``); Python spelling stays as it is."""
    options = _OPTIONS.get()
    if options is None:
        yield
        return
    with command_line({**options, **names}):
        yield


def image(name: str, i: int) -> str:
    """Image ``i`` of the image argument ``name`` (``x1``, ``x2``) as the caller knows it:
    ``x1[3]`` (``DATA[3]`` on the command line), unless :func:`images_as` names it otherwise."""
    table = _IMAGES.get()
    if table is not None and name in table:
        return table[name](int(i))
    return f"{arg(name)}[{int(i)}]"


def images(name: str, indices: Sequence[int], more: int = 0) -> str:
    """Several images of ``name`` (the first of them, ``more`` left unnamed), for a message
    that lists them: ``x1 image(s) at index [0, 3]``, or as :func:`images_as` names them."""
    table = _IMAGES.get()
    if table is not None and name in table:
        listed = ", ".join(table[name](int(i)) for i in indices)
    else:
        listed = f"{arg(name)} image(s) at index {[int(i) for i in indices]}"
    return listed + (f" and {more} more" if more > 0 else "")


@contextmanager
def images_as(names: Mapping[str, Callable[[int], str]]) -> Iterator[None]:
    """Within the block, :func:`image` and :func:`images` write image ``i`` of the image
    arguments in ``names`` as ``names[name](i)``, in Python and on the command line alike: a
    caller that hands the engine images it assembled (a subset drawn from a file, a training set
    followed by its flips, an estimator's ``X``) names each as its own caller knows it."""
    token = _IMAGES.set(dict(names))
    try:
        yield
    finally:
        _IMAGES.reset(token)
