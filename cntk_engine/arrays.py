"""Host and device arrays: the one place that knows NumPy from CuPy, and how much memory there is.

Every module asks here whether an array lives on a GPU (:func:`get_array_module`,
:func:`is_cupy`), moves arrays (:func:`to_host`, :func:`to_device`) and asks for free memory
(:func:`gpu_count`, :func:`free_device_memory`, :func:`available_memory`).  CuPy is imported
only when a CuPy array is seen or a device is asked for, so CPU-only installs never need it.
"""
from __future__ import annotations

import os
from contextlib import nullcontext

import numpy as np

DEVICES = (None, "cpu", "cuda")   # where a matrix computation runs: None = where its input lives


def is_cupy(a) -> bool:
    """Whether ``a`` is a CuPy array (without importing CuPy)."""
    return type(a).__module__.split(".")[0] == "cupy"


def cupy_module():
    """CuPy, or an ImportError that says how to install it."""
    try:
        import cupy
    except ImportError as e:
        from .version import install_hint
        raise ImportError(f"this needs CuPy ({install_hint('cuda')}, or the CuPy wheel for "
                          f"your CUDA version): {e}") from None
    return cupy


def get_array_module(*arrays):
    """CuPy if any of ``arrays`` is a CuPy array, else NumPy (the same code serves both)."""
    return cupy_module() if any(is_cupy(a) for a in arrays) else np


def to_host(a) -> np.ndarray:
    """``a`` as a NumPy array (a device -> host copy for CuPy; no copy for NumPy)."""
    return a.get() if is_cupy(a) else np.asarray(a)


def to_device(a, device: int | None = None):
    """``a`` as a CuPy array on ``device`` (default: the current device).  No copy when it is
    already there; from another GPU it goes through the host (the kernels read only the current
    device's memory, and a tile is small)."""
    cupy = cupy_module()
    with cupy.cuda.Device(device) if device is not None else nullcontext():
        if is_cupy(a) and a.device.id != cupy.cuda.Device().id:
            a = a.get()
        return cupy.asarray(a)


def nvidia_gpu_present() -> bool:
    """Whether this machine shows an NVIDIA GPU to its driver (Linux device files), asked without
    CuPy or the CUDA extension: to tell a user whose GPU goes unused why."""
    import glob
    return bool(glob.glob("/proc/driver/nvidia/gpus/*") or glob.glob("/dev/nvidia[0-9]*"))


def current_device() -> int:
    """The id of CuPy's current device."""
    return int(cupy_module().cuda.Device().id)


def gpu_properties(device: int) -> dict:
    """CuPy's properties of GPU ``device`` (``getDeviceProperties``), its name as a str."""
    props = dict(cupy_module().cuda.runtime.getDeviceProperties(device))
    if isinstance(props["name"], bytes):
        props["name"] = props["name"].decode()
    return props


def cuda_unavailable_reason() -> str | None:
    """Why CuPy cannot compute on a GPU here (not installed, no driver, no device), or None."""
    try:
        import cupy
    except ImportError as e:
        return f"CuPy is needed to hold device arrays and cannot be imported: {e}"
    try:
        n = cupy.cuda.runtime.getDeviceCount()
    except Exception as e:  # noqa: BLE001 - CuPy raises CUDARuntimeError with the CUDA error text
        return f"no usable CUDA device: {e}"
    return "no CUDA device is visible" if n == 0 else None


def gpu_count() -> int:
    """Number of CUDA devices CuPy sees (0 without CuPy or a driver)."""
    try:
        import cupy
        return int(cupy.cuda.runtime.getDeviceCount())
    except Exception:  # noqa: BLE001 - no CuPy, no driver, no device: no GPU
        return 0


def free_device_memory(device: int | None) -> int | None:
    """Free bytes on GPU ``device``, memory CuPy's pool holds unused included (it is reused);
    None for the CPU (``device=None``) or when the GPU does not report it."""
    if device is None:
        return None
    try:
        import cupy
        with cupy.cuda.Device(device):
            free = int(cupy.cuda.runtime.memGetInfo()[0])
            pool = cupy.get_default_memory_pool()
            return free + int(pool.total_bytes()) - int(pool.used_bytes())
    except Exception:  # noqa: BLE001 - no figure: the caller decides without one
        return None


def available_gpu_memory() -> int:
    """Bytes free now on CuPy's current device, memory CuPy's pool holds unused included (an
    ImportError without CuPy)."""
    return free_device_memory(current_device()) or 0


def available_memory() -> int:
    """Bytes of RAM available now: MemAvailable of /proc/meminfo (counts reclaimable page
    cache), else ``os.sysconf`` free pages x page size."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return int(os.sysconf("SC_AVPHYS_PAGES")) * int(os.sysconf("SC_PAGE_SIZE"))
    except (ValueError, OSError, AttributeError):
        return 1 << 62  # unknown: do not refuse


def format_bytes(b: float) -> str:
    """``b`` bytes as B, KiB, MiB, GiB or TiB."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if b < 1024 or unit == "TiB":
            return f"{b:.1f} {unit}" if unit != "B" else f"{int(b)} B"
        b /= 1024
    return f"{b:.1f} TiB"


__all__ = ["DEVICES", "is_cupy", "cupy_module", "get_array_module", "to_host", "to_device", "current_device",
           "gpu_count", "free_device_memory", "available_gpu_memory", "available_memory", "format_bytes"]
