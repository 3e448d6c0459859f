"""Shared helpers of the benchmark scripts: machine description, timing, result files and
command-line argument types (a bad value ends the program with argparse's one-line error)."""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"


def cpu_model() -> str:
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine() -> dict:
    """CPU model, core count, OS and Python version of this machine (every result records it)."""
    return {"cpu": cpu_model(), "cores": os.cpu_count(), "platform": platform.platform(),
            "python": sys.version.split()[0]}


def commit() -> str:
    try:
        return subprocess.check_output(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT,
                                       text=True, stderr=subprocess.DEVNULL).strip()
    except Exception:
        return "unknown"


def median_time(fn, repeats: int = 3, warmup: int = 1) -> tuple[float, list[float]]:
    """Median wall time of fn() over ``repeats`` runs after ``warmup`` untimed runs (the true
    median: the mean of the two middle times when ``repeats`` is even)."""
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times), times


def utc_date() -> str:
    """Today's UTC date as YYYYMMDD: the date suffix of result file names."""
    return datetime.now(timezone.utc).strftime("%Y%m%d")


def result_header() -> dict:
    """The fields every result file starts with: date, commit, command."""
    return {"date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "commit": commit(), "command": " ".join([Path(sys.executable).name] + sys.argv)}


#: --backend of the scripts: the engine's backends
BACKENDS = ("auto", "cuda", "numba", "reference")


def run_main(parser: argparse.ArgumentParser, run, argv=None):
    """Parse ``argv`` and ``run(args)`` the way ``cntk-engine`` runs a command: the engine's
    own checks name this script's options (``--devices 0 selects GPUs ...``; its parameters
    that the script names alike), and an error of the engine's, or of reading and writing
    files, ends the script with one line, ``<script>: error: ...`` (exit status 2), not a
    traceback."""
    from cntk_engine.cli import python_options
    from cntk_engine.spelling import command_line
    args = parser.parse_args(argv)
    try:
        with command_line(python_options(parser)):
            return run(args)
    except (ValueError, RuntimeError, OSError, ImportError, MemoryError) as e:
        print(f"{parser.prog}: error: {e or type(e).__name__}".replace("\n", " "), file=sys.stderr)
        raise SystemExit(2) from None


def save_result(out_dir, stem: str, fields: dict) -> dict:
    """Write a result file ``<out_dir>/<stem>_<date>.json``: :func:`result_header`, ``fields``,
    the machine and the versions; say where; return the payload."""
    payload = {**result_header(), **fields, "machine": machine(), "versions": versions()}
    out = write_json(Path(out_dir) / f"{stem}_{utc_date()}.json", payload)
    print(f"wrote {out}")
    return payload


def run_snippet(python, snippet: str, args, timeout: float = 3600) -> dict:
    """Run ``snippet`` with ``python -c`` and ``args``; its last stdout line is the JSON result.

    An alternative (neural-tangents, in another interpreter) that cannot run gives
    ``{"unavailable": why}`` instead of an exception: a comparison reports it and goes on.
    """
    try:
        out = subprocess.run([str(python), "-c", snippet] + [str(a) for a in args],
                             capture_output=True, text=True, timeout=timeout)
    except (OSError, subprocess.TimeoutExpired) as e:
        return {"unavailable": str(e)}
    if out.returncode != 0:
        return {"unavailable": out.stderr.strip().splitlines()[-1] if out.stderr.strip() else "failed"}
    return json.loads(out.stdout.strip().splitlines()[-1])


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


# --------------------------------------------------------------------------- argparse types
def int_at_least(minimum: int):
    """argparse type: an integer >= ``minimum``."""
    def parse(text):
        try:
            v = int(str(text).strip())
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
        if v < minimum:
            raise argparse.ArgumentTypeError(f"{v} is below the minimum {minimum}")
        return v
    parse.__name__ = f"integer >= {minimum}"
    return parse


def int_list(minimum: int = 1):
    """argparse type: a comma list of integers >= ``minimum`` ('3,6,11' -> [3, 6, 11])."""
    one = int_at_least(minimum)

    def parse(text):
        vals = [one(v) for v in str(text).split(",") if v.strip()]
        if not vals:
            raise argparse.ArgumentTypeError(f"{text!r}: expected a comma list of integers, e.g. 3,6,11")
        return vals
    parse.__name__ = "comma list of integers"
    return parse


def choice_list(choices):
    """argparse type: a comma list of values from ``choices`` ('gap,flatten' -> ['gap', 'flatten'])."""
    choices = tuple(choices)

    def parse(text):
        vals = [v.strip() for v in str(text).split(",") if v.strip()]
        bad = [v for v in vals if v not in choices]
        if bad or not vals:
            raise argparse.ArgumentTypeError(
                f"{', '.join(map(repr, bad)) if bad else repr(text)}: expected a comma list from "
                f"{', '.join(choices)}")
        return list(dict.fromkeys(vals))
    parse.__name__ = "comma list"
    return parse


def existing_file(text):
    """argparse type: the path of an existing file."""
    p = Path(text)
    if not p.is_file():
        raise argparse.ArgumentTypeError(f"{text}: {'is a directory, not a file' if p.is_dir() else 'no such file'}")
    return str(p)


def positive_float(text):
    """argparse type: a number > 0."""
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not v > 0:
        raise argparse.ArgumentTypeError(f"{text!r}: expected a number > 0")
    return v


def positive_float_list(text):
    """argparse type: a comma list of numbers > 0 ('0.1,1' -> [0.1, 1.0])."""
    vals = [positive_float(v) for v in str(text).split(",") if v.strip()]
    if not vals:
        raise argparse.ArgumentTypeError(f"{text!r}: expected a comma list of numbers > 0, e.g. 0.1,1")
    return vals


def devices(text):
    """argparse type of --devices: 'all' or a comma list of GPU ids ('0,1' -> [0, 1])."""
    return "all" if str(text).strip() == "all" else int_list(minimum=0)(text)


def is_default_variant(variant: dict, dtype: str = "float32") -> bool:
    """Whether a CUDA kernel variant record (``cntk_engine.backends.cuda.kernel_variants()``, or
    a result file's ``cuda_kernels``) is the default for ``dtype``.  Records list the dtypes in
    ``default_for``; files written before the defaults were per dtype have ``default``, one
    variant for both."""
    if "default_for" in variant:
        return dtype in variant["default_for"]
    return bool(variant.get("default"))


def own_stack_kernel_variants() -> list[str]:
    """The compiled CUDA kernel variants with a pooled-stack kernel of their own, in the table's
    order (v7 and v8 launch their ``base`` variant's: timing them again would time the same
    kernel).  ImportError without the CUDA extension."""
    from cntk_engine.backends.cuda import kernel_variants
    return [v["name"] for v in kernel_variants() if v["base"] == v["name"]]
