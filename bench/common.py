"""Shared helpers for the benchmarks: machine description, timing, JSON results."""
from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"


def cpu_model() -> str:
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine() -> dict:
    return {"cpu": cpu_model(), "cores": os.cpu_count(), "platform": platform.platform(),
            "python": sys.version.split()[0]}


def commit() -> str:
    try:
        return subprocess.check_output(["git", "rev-parse", "--short", "HEAD"], cwd=RESULTS.parent,
                                       text=True, stderr=subprocess.DEVNULL).strip()
    except Exception:
        return "unknown"


def median_time(fn, repeats: int = 3, warmup: int = 1) -> tuple[float, list[float]]:
    """Median wall time of fn() over ``repeats`` runs after ``warmup`` untimed runs."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return sorted(times)[len(times) // 2], times


def write_result(name: str, payload: dict) -> Path:
    RESULTS.mkdir(parents=True, exist_ok=True)
    stamp = datetime.now(timezone.utc).strftime("%Y%m%d")
    payload = {"date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
               "commit": commit(), "command": " ".join([Path(sys.executable).name] + sys.argv),
               **payload}
    path = RESULTS / f"{name}_{stamp}.json"
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(payload, indent=2))
    tmp.replace(path)
    return path


# --------------------------------------------------------------------------- added for the
# harness and the reproduction scripts (bench/harness.py, reproduce_table1.py, small_data.py)
def result_header() -> dict:
    """The fields every result file starts with (date, commit, command), as write_result."""
    return {"date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "commit": commit(), "command": " ".join([Path(sys.executable).name] + sys.argv)}


def write_json(path, payload: dict) -> Path:
    """Write ``payload`` to ``path`` atomically (a .tmp file renamed into place)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(payload, indent=2, default=_json_default))
    tmp.replace(path)
    return path


def _json_default(o):
    try:
        import numpy as np
        if isinstance(o, np.generic):
            return o.item()
        if isinstance(o, np.ndarray):
            return o.tolist()
    except ImportError:  # pragma: no cover
        pass
    return str(o)


def versions() -> dict:
    """Versions of the packages a result depends on (those importable here)."""
    out = {"python": sys.version.split()[0]}
    for mod in ("numpy", "scipy", "numba", "cupy", "matplotlib", "cntk_engine"):
        try:
            m = __import__(mod)
            out[mod] = getattr(m, "__version__", "unknown")
        except Exception:
            pass
    return out


def gpu_info() -> dict | None:
    """Name, memory, driver and CUDA versions of GPU 0 via CuPy (None when no usable GPU)."""
    try:
        import cupy
        rt = cupy.cuda.runtime
        n = rt.getDeviceCount()
        props = rt.getDeviceProperties(0)
        name = props["name"]
        info = {"name": name.decode() if isinstance(name, bytes) else str(name), "count": n,
                "memory_gib": round(props["totalGlobalMem"] / 2 ** 30, 1),
                "sms": props["multiProcessorCount"],
                "compute_capability": f"{props['major']}.{props['minor']}",
                "cuda_driver_api": rt.driverGetVersion(), "cuda_runtime": rt.runtimeGetVersion()}
    except Exception:
        return None
    try:
        smi = subprocess.check_output(["nvidia-smi", "--query-gpu=name,driver_version,clocks.max.sm",
                                       "--format=csv,noheader"], text=True, timeout=20)
        first = smi.strip().splitlines()[0].split(", ")
        info["driver"] = first[1]
        info["max_sm_clock"] = first[2]
    except Exception:
        pass
    return info


def gpu_sync() -> None:
    """Wait for the current CUDA device (no-op without CuPy or a GPU): call before reading a clock."""
    try:
        import cupy
        cupy.cuda.Device().synchronize()
    except Exception:
        pass
