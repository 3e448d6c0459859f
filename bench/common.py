"""Shared helpers of the benchmark scripts: machine description, timing, result files and
command-line argument types (a bad value ends the program with argparse's one-line error)."""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"


def machine() -> dict:
    """CPU model, core count, OS and Python version of this machine (every result records it):
    the record ``cntk-engine evaluate --json`` writes."""
    from cntk_engine.cli.common import machine as described
    return described()


def commit() -> str:
    """The commit of the tree that ran, with "-dirty" where its files differ from it."""
    try:
        return subprocess.check_output(["git", "describe", "--always", "--dirty"], cwd=ROOT,
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


RESULT_SUFFIXES = (".json", ".png", ".md", ".log")


def new_stem(folder, name: str) -> Path:
    """``<folder>/<name>_<UTC date>`` (the result files add .json, .png, .md, .log), or that with
    ``_2``, ``_3``, ... where a result of that stem exists already: a run never overwrites an
    earlier one's files, those committed in bench/results included (two runs on one day, or a
    README command run again on the day its figures were measured)."""
    base = Path(folder) / f"{name}_{utc_date()}"
    stem, k = base, 1
    while any(Path(str(stem) + s).exists() for s in RESULT_SUFFIXES):
        k += 1
        stem = base.with_name(f"{base.name}_{k}")
    return stem


def result_header() -> dict:
    """The fields every result file starts with: date, commit, command."""
    return {"date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "commit": commit(), "command": " ".join([Path(sys.executable).name] + sys.argv)}


#: --backend of the scripts: the engine's backends
BACKENDS = ("auto", "cuda", "numba", "reference")


class ScriptError(Exception):
    """A refusal of the script's own (a bad input, an output that cannot be written, settings
    that contradict a file), said in the words of its options: :func:`run_main` ends the script
    with it as one line, ``<script>: error: ...``, exit status 2."""


class ScriptExit(SystemExit):
    """The end of a script whose one line :func:`run_main` (or :func:`finish`) has printed:
    exit status ``code``; ``str()`` is that line's message (what a caller, a test, reads)."""

    def __init__(self, message: str, code: int = 2):
        super().__init__(code)
        self.message = message

    def __str__(self):
        return self.message


def finish(prog: str, message: str, code: int = 1, error: bool = False):
    """Print ``<prog>: message`` (``<prog>: error: message`` with ``error``) on stderr as one
    line and end the script with ``code``."""
    message = " ".join(str(message).split("\n"))
    print(f"{prog}: {'error: ' if error else ''}{message}", file=sys.stderr)
    raise ScriptExit(message, code)


def describe_error(e: BaseException) -> str:
    """One line for an exception: its message; an OSError as 'PATH: reason' (not '[Errno 20]')."""
    if isinstance(e, OSError) and e.strerror:
        where = " -> ".join(str(f) for f in (e.filename, e.filename2) if f is not None)
        return f"{where}: {e.strerror}" if where else e.strerror
    return str(e) or type(e).__name__


def run_main(parser: argparse.ArgumentParser, run, argv=None, aliases=None):
    """Parse ``argv`` and ``run(args)`` the way ``cntk-engine`` runs a command: the engine's
    own checks name this script's options (``--devices 0 selects GPUs ...``; its parameters
    that the script names alike, and ``aliases``, {engine parameter: option}, for those it names
    otherwise), and a :class:`ScriptError`, an error of the engine's, or of reading and writing
    files, ends the script with one line, ``<script>: error: ...`` (exit status 2), not a
    traceback; Ctrl-C with ``<script>: interrupted`` (status 130)."""
    from cntk_engine.cli import python_options
    from cntk_engine.spelling import command_line
    args = parser.parse_args(argv)
    options = python_options(parser)
    for name, option in (aliases or {}).items():
        options.setdefault(name, option)
    try:
        with command_line(options):
            return run(args)
    except KeyboardInterrupt:           # Ctrl-C: one line, the shell's status for SIGINT
        finish(parser.prog, "interrupted", code=130)
    except (ScriptError, ValueError, RuntimeError, OSError, ImportError, MemoryError) as e:
        finish(parser.prog, describe_error(e), code=2, error=True)


# --------------------------------------------------------------------------- outputs
def _writable(folder: Path) -> str | None:
    """Why nothing can be written into the existing folder ``folder`` (None: it can): probed
    with a temporary file, removed at once."""
    import tempfile
    if not os.access(folder, os.W_OK | os.X_OK):
        return f"{folder} is not writable"
    try:
        with tempfile.NamedTemporaryFile(dir=folder, prefix=".write_test_"):
            pass
    except OSError as e:
        return f"{folder} is not writable ({e.strerror or e})"
    return None


def check_out_dir(path, option: str) -> Path:
    """Refuse, before any work, a folder ``option`` names that results cannot be written into:
    a file, a path under a file, a read-only place.  Creates nothing (the writers create the
    folder when they write), so a run refused later leaves no empty folder behind."""
    p = Path(path)
    if not str(path):
        raise ScriptError(f"{option} is empty; give a folder")
    if p.exists() or p.is_symlink():
        if not p.is_dir():
            raise ScriptError(f"{option} {path}: {'is a file,' if p.is_file() else 'exists and is'} not a "
                              "folder; give a folder")
        why = _writable(p)
    else:
        up = next((q for q in p.parents if q.exists() or q.is_symlink()), Path("."))
        if not up.is_dir():
            raise ScriptError(f"{option} {path}: {up} is {'a file, ' if up.is_file() else ''}not a folder")
        why = _writable(up)
        why = why and f"cannot create it: {why}"
    if why:
        raise ScriptError(f"{option} {path}: {why}")
    return p


def check_out_file(path, option: str) -> Path:
    """Refuse, before any work, a file path ``option`` names that cannot be written: a folder,
    not a regular file, in a folder that cannot be created or written.  Creates nothing."""
    p = Path(path)
    if not str(path):
        raise ScriptError(f"{option} is empty; give the path of a file")
    if p.is_dir():
        raise ScriptError(f"{option} {path}: is a folder; give the path of a file, e.g. {p / 'results.json'}")
    if (p.exists() or p.is_symlink()) and not p.is_file():
        raise ScriptError(f"{option} {path}: exists and is not a regular file; give the path of a file")
    up = next((q for q in (p.parent, *p.parent.parents) if q.exists() or q.is_symlink()), Path("."))
    if not up.is_dir():
        raise ScriptError(f"{option} {path}: {up} is {'a file, ' if up.is_file() else ''}not a folder")
    why = _writable(up)
    if why:
        raise ScriptError(f"{option} {path}: {why}")
    return p


class made_folders:
    """Context: create ``folders`` (parents too); when the block ends with an exception, remove
    again those this created that are still empty (a refused run leaves no empty folder)."""

    def __init__(self, *folders):
        self.folders = [Path(f) for f in folders if f is not None]
        self.created: list[Path] = []

    def __enter__(self):
        for f in self.folders:
            missing = [q for q in (f, *f.parents) if not q.exists()]
            f.mkdir(parents=True, exist_ok=True)
            self.created += missing            # deepest first
        return self

    def __exit__(self, exc_type, *exc):
        if exc_type is not None:
            for f in self.created:
                try:
                    f.rmdir()                  # only an empty one
                except OSError:
                    pass
        return False


def save_result(out_dir, stem: str, fields: dict) -> dict:
    """Write a result file ``<out_dir>/<stem>_<date>.json``: :func:`result_header`, ``fields``,
    the machine and the versions; say where; return the payload."""
    payload = {**result_header(), **fields, "machine": machine(), "versions": versions()}
    out = write_json(Path(str(new_stem(out_dir, stem)) + ".json"), payload)
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
        why = out.stderr.strip().splitlines()[-1] if out.stderr.strip() else "failed"
        if "No module named 'jax'" in why or "No module named 'neural_tangents'" in why:
            why += (f" (in {python}: give the Python of an environment with neural-tangents as "
                    "--nt-python)")
        return {"unavailable": why}
    return json.loads(out.stdout.strip().splitlines()[-1])


def write_json(path, payload: dict) -> Path:
    """Write ``payload`` to ``path`` atomically (a .tmp file renamed into place)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    try:
        tmp.write_text(json.dumps(payload, indent=2, default=_json_default))
        tmp.replace(path)
    except BaseException:
        try:
            tmp.unlink(missing_ok=True)        # no half-written .tmp left behind
        except OSError:
            pass
        raise
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


def comma_items(text, example: str) -> list[str]:
    """The items of a comma list, stripped; an empty item ('3,,4', '3,') or an empty list is an
    argparse error (the option is named by argparse), with an ``example`` of the list."""
    items = [v.strip() for v in str(text).split(",")]
    if not any(items):
        raise argparse.ArgumentTypeError(f"{text!r}: expected a comma list, e.g. {example}")
    if not all(items):
        raise argparse.ArgumentTypeError(f"{text!r} has an empty item; expected a comma list without "
                                         f"empty items, e.g. {example}")
    return items


def int_list(minimum: int = 1, example: str | None = None):
    """argparse type: a comma list of integers >= ``minimum`` ('3,6,11' -> [3, 6, 11]); an
    error shows ``example``."""
    one = int_at_least(minimum)
    example = example or ("0,1" if minimum < 1 else "3,6,11" if minimum <= 3 else f"{minimum},{2 * minimum}")

    def parse(text):
        return [one(v) for v in comma_items(text, example)]
    parse.__name__ = "comma list of integers"
    return parse


def choice_list(choices):
    """argparse type: a comma list of values from ``choices`` ('gap,flatten' -> ['gap', 'flatten'])."""
    choices = tuple(choices)

    def parse(text):
        vals = comma_items(text, ",".join(choices[:2]))
        bad = [v for v in vals if v not in choices]
        if bad:
            raise argparse.ArgumentTypeError(
                f"{', '.join(map(repr, bad))}: expected a comma list from {', '.join(choices)}")
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
    """argparse type: a finite number > 0."""
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not 0 < v < float("inf"):
        raise argparse.ArgumentTypeError(f"{text!r}: expected a finite number > 0")
    return v


def positive_float_list(text):
    """argparse type: a comma list of finite numbers > 0 ('0.1,1' -> [0.1, 1.0])."""
    return [positive_float(v) for v in comma_items(text, "0.1,1")]


def devices(text):
    """argparse type of --devices: 'all' or a comma list of GPU ids ('0,1' -> [0, 1])."""
    return "all" if str(text).strip() == "all" else int_list(minimum=0, example="all or 0,1")(text)


def load_npz(path, option: str, what: str):
    """``np.load(path)`` of an .npz archive (no pickles), or a :class:`ScriptError` naming
    ``option`` and saying that it expects an .npz archive holding ``what``."""
    import zipfile

    import numpy as np
    expected = f"expected an .npz archive holding {what}"
    try:
        with open(path, "rb") as f:
            magic = f.read(6)
    except OSError as e:
        raise ScriptError(f"{option} {path}: cannot be read ({describe_error(e)}); {expected}") from None
    if magic == b"\x93NUMPY":
        raise ScriptError(f"{option} {path}: a single .npy array, not an .npz archive; {expected}")
    if not magic.startswith(b"PK"):
        raise ScriptError(f"{option} {path}: not an .npz archive (nor any zip file); {expected}")
    try:
        z = np.load(path, allow_pickle=False)
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as e:
        raise ScriptError(f"{option} {path}: not a readable .npz archive ({describe_error(e)}); "
                          f"{expected}") from None
    if not isinstance(z, np.lib.npyio.NpzFile):     # pragma: no cover - the magic said zip
        raise ScriptError(f"{option} {path}: not an .npz archive; {expected}")
    return z


def npz_array(z, key: str, path, option: str, what: str):
    """The array ``key`` of an archive :func:`load_npz` opened, or a :class:`ScriptError`: the
    archive lacks it (saying what it holds), or it cannot be read (pickled objects)."""
    if key not in z.files:
        raise ScriptError(f"{option} {path} has no {key} array (it holds {', '.join(z.files) or 'nothing'}); "
                          f"expected an .npz archive holding {what}")
    import zipfile
    import zlib
    try:
        return z[key]
    except (OSError, ValueError, EOFError, zipfile.BadZipFile, zlib.error) as e:
        why = "pickled objects" if "pickle" in str(e) else describe_error(e)
        raise ScriptError(f"{option} {path}: its {key} array cannot be read ({why}); expected an .npz "
                          f"archive holding {what}") from None


def non_finite_images(x) -> str | None:
    """'at index [2, 7]' (the first ten, and how many more) of the images of ``x`` (first axis)
    with a NaN or Inf pixel; None when every pixel is finite."""
    import numpy as np
    x = np.asarray(x)
    if x.dtype.kind not in "fc" or not len(x):
        return None
    bad = np.flatnonzero(~np.isfinite(x).reshape(len(x), -1).all(axis=1))
    if not len(bad):
        return None
    more = len(bad) - 10
    return f"at index {[int(i) for i in bad[:10]]}" + (f" and {more} more" if more > 0 else "")


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
