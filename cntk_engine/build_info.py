"""What the installed build did: whether the CUDA extension was compiled, for which GPUs and
CUDA version, or why not.

``pip install .`` shows no build output without ``-v``, so the build writes a small record
next to the package (``_build_info.json``, by the top-level CMakeLists.txt) and
``cntk-engine info`` states it in one plain line (:func:`cuda_extension_line`).  A package
imported from a source tree has no record, and says so.
"""
from __future__ import annotations

import json
import os
from importlib.resources import files

from .version import install_hint


def build_record() -> dict | None:
    """The build's record, or None when there is none (a source tree, not an installed build)."""
    try:
        record = json.loads((files("cntk_engine") / "_build_info.json").read_text())
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) else None


def cuda_major(record: dict | None = None) -> int | None:
    """The CUDA major version the extension was built with, or None."""
    record = build_record() if record is None else record
    try:
        return int(str(record["cuda_version"]).split(".")[0]) if record and record.get("cuda_extension") else None
    except (KeyError, ValueError):
        return None


def cupy_runtime_major() -> int | None:
    """The CUDA major version of the installed CuPy's runtime, or None (no CuPy)."""
    try:
        import cupy
        return int(cupy.cuda.runtime.runtimeGetVersion()) // 1000
    except Exception:  # noqa: BLE001 - no CuPy, no driver
        return None


def cuda_extension_line() -> str:
    """One plain line: built (for which GPUs, with which CUDA) and importable, or why not."""
    record = build_record()
    if record is None:
        return (f"CUDA extension: unknown: no build record in {os.path.dirname(__file__)} (imported "
                "from a source tree, not from an installed build?)")
    if not record.get("cuda_extension"):
        return (f"CUDA extension: not built: {record.get('reason', 'no reason recorded')} (to build "
                "it, install again with nvcc on PATH and without -DCNTK_ENGINE_NO_CUDA=ON; backend "
                f"'cuda' also needs CuPy: {install_hint('cuda')}; README, Install)")
    archs = ", ".join(f"sm_{a}" for a in str(record.get("cuda_architectures", "")).split(";") if a)
    line = f"CUDA extension: built for {archs} with CUDA {record.get('cuda_version', '?')}"
    try:
        from . import _cuda  # noqa: F401
    except ImportError as e:
        return line + f", but it cannot be imported: {e}"
    major, cupy_major = cuda_major(record), cupy_runtime_major()
    extra = {13: "cuda", 12: "cuda12"}.get(major)
    hint = install_hint(extra) if extra else f"the CuPy wheel for CUDA {major}"
    if cupy_major is None:
        return line + f"; CuPy is not installed, and backend 'cuda' needs it: {hint}"
    if cupy_major != major:
        return line + (f"; CuPy is built for CUDA {cupy_major}, not {major}: {hint} (one CuPy "
                       "wheel per CUDA major)")
    return line + f"; CuPy for CUDA {cupy_major} is installed"
