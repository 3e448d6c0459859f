"""Backends: ``reference`` (float64 NumPy, slow, the oracle), ``numba`` (CPU), ``cuda`` (GPU).

Each backend implements :class:`cntk_engine.backends.base.Backend`; this module names them,
says which can run here (:func:`available_backends`) and picks the one a job runs on
(:func:`choose`, where ``backend="auto"`` is decided for a job run here and a backend's limits
are checked against it; on a Dask cluster, :func:`cntk_engine.jobs.dask.choose_backend` decides
from each worker's :func:`capabilities`: the same availability and limits, checked there).
"""
from __future__ import annotations

import importlib
import logging

from ..arrays import nvidia_gpu_present
from ..spelling import arg
from .base import Backend, Prepared, Traits  # noqa: F401

log = logging.getLogger("cntk_engine")
_gpu_unused_said = False       # the warnings of resolve() are given once per process
_unverified_said: set = set()  # (and once per reason)

_MODULES = {
    "reference": ("cntk_engine.backends.reference", "ReferenceBackend"),
    "numba": ("cntk_engine.backends.numba_cpu", "NumbaBackend"),
    "cuda": ("cntk_engine.backends.cuda", "CudaBackend"),
}
BACKENDS = tuple(_MODULES) + ("auto",)
AUTO_ORDER = ("cuda", "numba")      # backend="auto": the first that can run the job


def check_name(name) -> str:
    if not isinstance(name, str) or name not in BACKENDS:      # a 0-d array compares equal too
        raise ValueError(f"backend must be one of {BACKENDS}; got {name!r}")
    return name


def backend_class(name: str) -> type[Backend]:
    if name not in _MODULES:
        raise ValueError(f"backend must be one of {tuple(_MODULES)}; got {name!r}")
    mod, cls = _MODULES[name]
    return getattr(importlib.import_module(mod), cls)


def unavailable_reason(name: str) -> str | None:
    """None if backend ``name`` can run here, else why not."""
    try:
        cls = backend_class(name)
    except ImportError as e:  # a backend module whose dependency is missing
        return f"importing the {name} backend failed: {e}"
    return cls.unavailable_reason()


def available_backends() -> dict[str, str | None]:
    """{name: None if usable else the reason it is not}."""
    return {name: unavailable_reason(name) for name in _MODULES}


def capabilities(arch, image_shape, dtype) -> dict[str, dict]:
    """For every backend: {"unavailable": why it cannot run here or None, "unsupported": why it
    cannot compute this job (architecture, image size, dtype) or None, "unverified": why its
    code for this job is not verified yet (:meth:`Backend.unverified`: ``auto`` does not choose
    it) or None}.  Asked in this process for a local job, and on every Dask worker for a
    distributed one."""
    out = {}
    for name in _MODULES:
        why = unavailable_reason(name)
        unsupported = unverified = None
        if why is None:
            cls = backend_class(name)
            try:
                unsupported = cls.unsupported(arch, tuple(image_shape), dtype)
            except Exception as e:  # noqa: BLE001 - reported with the backend's name
                unsupported = f"its check of this job failed: {type(e).__name__}: {e}"
            if unsupported is None:
                try:
                    unverified = cls.unverified(arch, tuple(image_shape), dtype)
                except Exception as e:  # noqa: BLE001 - not known to be verified, then
                    unverified = f"its check of this job failed: {type(e).__name__}: {e}"
        out[name] = {"unavailable": why, "unsupported": unsupported, "unverified": unverified}
    return out


def choose(name: str, caps: dict[str, dict]) -> tuple[str, str]:
    """(backend name, why) for ``backend=name`` given :func:`capabilities` ``caps``.

    ``auto``: the first of :data:`AUTO_ORDER` that is available, supports the job and whose code
    for it is verified (``caps[...]["unverified"]`` None or absent).  A named backend that is
    unavailable raises RuntimeError; one that cannot compute the job raises ValueError naming
    the limit and the backend that can; one whose code for the job is not verified runs it, and
    the reason says so."""
    check_name(name)
    if name == "auto":
        skipped = []
        for cand in AUTO_ORDER:
            c = caps[cand]
            why = c["unavailable"] or c["unsupported"] or c.get("unverified")
            if why is None:
                return cand, ("; ".join(skipped) + "; " if skipped else "") + f"{cand} can run it"
            skipped.append(f"{cand}: {why}")
        raise RuntimeError("no backend can run this job: " + "; ".join(skipped))
    c = caps[name]
    if c["unavailable"] is not None:
        raise RuntimeError(f"{arg('backend', name)} is unavailable: {c['unavailable']}")
    if c["unsupported"] is not None:
        raise ValueError(f"{arg('backend', name)} cannot take this input: {c['unsupported']}. "
                         f"Use {arg('backend', 'numba')}.")
    if c.get("unverified"):
        return name, f"asked for, although {c['unverified']}"
    return name, "asked for"


def resolve(name: str, arch=None, image_shape=None, dtype=None) -> type[Backend]:
    """The backend class that runs a job here (see :func:`choose`).  Without a job
    (``arch=None``), the backend ``auto`` would pick for a job every backend supports."""
    global _gpu_unused_said
    if arch is None:
        caps = {n: {"unavailable": unavailable_reason(n), "unsupported": None} for n in _MODULES}
    else:
        caps = capabilities(arch, image_shape, dtype)
    chosen, chosen_why = choose(name, caps)
    if caps[chosen].get("unverified"):     # asked for by name: it runs, with a warning
        log.warning("backend %r: %s", chosen, chosen_why)
    why = caps["cuda"]["unavailable"]
    if name == "auto" and chosen != "cuda" and why is not None and not _gpu_unused_said \
            and nvidia_gpu_present():
        _gpu_unused_said = True            # the GPU is there, but cuda cannot run: say why
        log.warning("backend 'auto' runs on the CPU (%s) although this machine has an NVIDIA GPU: "
                    "%s (`cntk-engine info` shows what was built; README, Install)", chosen, why)
    unverified = caps["cuda"].get("unverified")
    if name == "auto" and chosen != "cuda" and why is None and caps["cuda"]["unsupported"] is None \
            and unverified and unverified not in _unverified_said:
        # cuda can run this job but its kernels for it have not run on a GPU: a job that would
        # take minutes there takes hours on the CPU, so the choice is said, with the way out
        _unverified_said.add(unverified)
        log.warning("backend 'auto' runs this job on the CPU (%s) although the cuda backend can "
                    "run it: %s", chosen, unverified)
    return backend_class(chosen)
