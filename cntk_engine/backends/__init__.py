"""Backends: ``reference`` (float64 NumPy, slow, the oracle), ``numba`` (CPU), ``cuda`` (GPU).

Each backend implements :class:`cntk_engine.backends.base.Backend`; this module names them and
picks one for ``backend="auto"``.
"""
from __future__ import annotations

import importlib

from .base import Backend, Prepared  # noqa: F401

_MODULES = {
    "reference": ("cntk_engine.backends.reference", "ReferenceBackend"),
    "numba": ("cntk_engine.backends.numba_cpu", "NumbaBackend"),
    "cuda": ("cntk_engine.backends.cuda", "CudaBackend"),
}
BACKENDS = tuple(_MODULES) + ("auto",)


def backend_class(name: str) -> type[Backend]:
    if name not in _MODULES:
        raise ValueError(f"backend must be one of {BACKENDS}; got {name!r}")
    mod, cls = _MODULES[name]
    return getattr(importlib.import_module(mod), cls)


def unavailable_reason(name: str) -> str | None:
    """None if backend ``name`` can run here, else why not."""
    try:
        cls = backend_class(name)
    except ImportError as e:  # a backend module whose dependency is missing
        return f"importing the {name} backend failed: {e}"
    return cls.unavailable_reason()


def resolve(name: str) -> type[Backend]:
    """The backend class for ``name``; ``auto`` means cuda if usable, else numba."""
    if name == "auto":
        return backend_class("cuda") if unavailable_reason("cuda") is None else backend_class("numba")
    if name not in _MODULES:
        raise ValueError(f"backend must be one of {BACKENDS}; got {name!r}")
    why = unavailable_reason(name)
    if why is not None:
        raise RuntimeError(f"backend {name!r} is unavailable: {why}")
    return backend_class(name)


def available_backends() -> dict[str, str | None]:
    """{name: None if usable else the reason it is not}."""
    return {name: unavailable_reason(name) for name in _MODULES}
