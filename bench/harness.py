"""Benchmark harness: a matrix of configurations, timed, written to JSON, plotted.

    python -m bench --methods numba,per_layer_cpu,reference --depths 3,6,11,21 --sizes 32 \\
        --dtypes float32 --n 16 --n-for per_layer_cpu=2,reference=1
    python -m bench --methods cuda,per_layer_cuda,neural_tangents,paper_code --kernels v3,v5 \\
        --architectures cnn,myrtle5,myrtle10 --dtypes float64,float32 --n 256 \\
        --n-for cuda:float64=64,per_layer_cuda=16,neural_tangents=16,paper_code=16 \\
        --paper-code /path/to/CNTK.py

Configurations are the product  method x architecture x depth x image size x dtype x pooling x
fix x tile x N (x CUDA kernel variant for ``cuda``).  Methods:

  numba, cuda, reference     the project's backends, through ``cntk_engine.gram``
  per_layer_cpu              the paper's per-layer 4-D algorithm in NumPy (bench/per_layer_cpu.py)
  per_layer_cuda             the same algorithm in CuPy (bench/per_layer_baseline.py)
  neural_tangents            neural-tangents' stax kernel_fn, in a subprocess (--nt-python)
  paper_code                 the paper's own CNTK.py (a local copy: --paper-code; bench/paper_code.py)

Architectures (``--architectures``): ``cnn`` (the CNN of Arora et al., at every ``--depths``)
and the Myrtle presets ``myrtle5``, ``myrtle7``, ``myrtle10`` (32 x 32 images; the preset fixes
the depth, ``--depths`` does not apply to them).  ``--kernels v3,v5`` times the ``cuda`` method
once per CUDA kernel variant (``CNTK_ENGINE_CUDA_KERNEL`` set around its calls); without it the
variant is whatever the backend selects, and every cuda record names the variant that ran.
A configuration a method cannot compute is recorded, not run: ``unavailable`` (the method
cannot run here, or the backend says it cannot compute that configuration, e.g. the CUDA
backend and a pooled stack) or ``skipped`` (outside what the method implements), with the reason.

Every configuration computes the symmetric Gram of N random (C, size, size) images (NTK and
NNGP, ``kernel="both"``), after ``--warmup`` untimed calls, ``--repeats`` timed calls, median
reported; GPU work is synchronised (``cupy.cuda.Device().synchronize()``) before each clock
read.  Each configuration records ``unique_pairs_per_s`` = N(N+1)/2 / median seconds,
``pairs_evaluated_per_s`` (the pairs the method actually computed per second: N(N+1)/2 for a
method that uses the Gram's symmetry, N^2 for one that computes every ordered pair, as
neural-tangents' ``kernel_fn(x, None)`` does), the arithmetic per pair (bench/ceiling.py; the
CNN only) and the fraction of the device's measured FMA rate.  The project's backends also record
``preparation_s`` (the median over the timed calls of the seconds their preparation of the
images took: the per-image diagonals, a fixed cost beside N^2 pairs that weighs at small N, as a
pooled stack's CuPy diagonals do; ``gram``'s ``prepare_seconds``) and
``unique_pairs_per_s_beyond_preparation`` = N(N+1)/2 / (median seconds - preparation_s), the
rate of the pairs themselves that a Gram of many images approaches.
The JSON is rewritten after every configuration (progress is printed), so a long run that is
interrupted keeps what it measured; ``--resume`` keeps the configurations measured OK in the
file (failed or unavailable ones are run again, configurations outside this run's matrix are
kept), and refuses a file measured with other --seed/--warmup/--repeats/--devices/
--dask-scheduler.  Without --output, --resume continues the newest <out-dir>/<name>_<date>.json,
so a run resumed after midnight (UTC) continues yesterday's file; give long runs an explicit
``--output PATH`` all the same.  Several runs with other methods can fill one file this way
(tools/gpu/gpu_session.sh does).  When the file holds no measurement at all (every configuration
failed, unavailable or skipped, none kept by --resume) the run ends with one line saying so and
exit status 1; a --resume run that measured none of its own configurations says so in a note.
"""
from __future__ import annotations

import argparse
import glob
import itertools
import json
import os
import re
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from . import ceiling as ceil_mod
from tools import sass_mix
from . import paper_code as paper_mod
from . import per_layer_baseline
from .common import (RESULTS, ScriptError, check_out_dir, check_out_file, choice_list, comma_items,
                     devices, finish, gpu_info, gpu_sync, int_at_least, int_list,
                     is_default_variant, machine, median_time, new_stem, result_header, run_main,
                     utc_date, versions, write_json)

PROJECT_BACKENDS = ("numba", "cuda", "reference")
METHODS = PROJECT_BACKENDS + ("per_layer_cpu", "per_layer_cuda", "neural_tangents", "paper_code")
GPU_METHODS = ("cuda", "per_layer_cuda", "paper_code")
DTYPES = ("float32", "float64")
POOLINGS = ("gap", "flatten")
# the CNN of Arora et al. (at every --depths) and the Myrtle presets (their depth: conv layers + 1)
ARCHITECTURES = {"cnn": None, "myrtle5": 5, "myrtle7": 7, "myrtle10": 10}
CNN_ONLY = ("per_layer_cpu", "per_layer_cuda", "paper_code")   # methods that compute the CNN alone
FIX = {"no": False, "yes": True}
KERNEL_ENV = "CNTK_ENGINE_CUDA_KERNEL"    # cntk_engine.backends.cuda.KERNEL_ENV
# config fields added after the first result files: their value when a record lacks them (and
# config_key leaves them out at that value, so old files resume and plot as before)
CONFIG_DEFAULTS = {"architecture": "cnn", "fix": False, "cuda_kernel": None}
# the run settings a --resume must share with the file it continues
RESUME_SETTINGS = ("seed", "warmup", "repeats", "devices", "dask_scheduler")


# ------------------------------------------------------------------------------ helpers
def _overrides(s):
    """argparse type: 'reference=2,cuda:float64=64' -> {'reference': 2, 'cuda:float64': 64}
    (METHOD=N, or METHOD:DTYPE=N for one dtype of a method)."""
    out = {}
    if not s.strip():
        return out
    for item in comma_items(s, "reference=2,cuda:float64=64"):
        k, eq, v = item.partition("=")
        k = k.strip()
        if not eq:
            raise argparse.ArgumentTypeError(f"{item!r}: expected METHOD=N or METHOD:DTYPE=N, e.g. "
                                             "reference=2,cuda:float64=64")
        m, colon, dt = k.partition(":")
        if m not in METHODS:
            raise argparse.ArgumentTypeError(f"unknown method {m!r}; methods are {', '.join(METHODS)}")
        if colon and dt not in DTYPES:
            raise argparse.ArgumentTypeError(f"{k!r}: unknown dtype {dt!r}; dtypes are {', '.join(DTYPES)}")
        out[k] = int_at_least(1)(v)
    return out


def _kernel_names(s):
    """argparse type of --kernels: CUDA kernel variant names, comma list ('v3,v5' -> ['v3', 'v5']);
    which exist is checked against the installed extension when the run starts."""
    vals = comma_items(s, "v3,v5")
    bad = [v for v in vals if not re.fullmatch(r"v\d+", v)]
    if bad:
        raise argparse.ArgumentTypeError(f"{s!r}: expected CUDA kernel variant names (v3, v5, ...), comma list")
    return list(dict.fromkeys(vals))


def _fix_list(s):
    """argparse type of --fix: 'no', 'yes' or 'no,yes' -> [False], [True], [False, True]."""
    return [FIX[v] for v in choice_list(FIX)(s)]


def _tiles(s):
    """argparse type: 'default' or tile sizes, comma list: 'default,64' -> [None, 64]."""
    out = []
    for t in comma_items(s, "default,64"):
        if t == "default":
            out.append(None)
            continue
        try:
            out.append(int_at_least(1)(t))
        except argparse.ArgumentTypeError:
            raise argparse.ArgumentTypeError(f"{t!r}: a tile is 'default' or a positive integer") from None
    if not out:
        raise argparse.ArgumentTypeError(f"{s!r}: expected 'default' or positive integers")
    return out


def pairs_evaluated(method: str, n: int, plc_module=None) -> int:
    """The pairs a method computes for the symmetric Gram of n images.

    n(n+1)/2 for those that compute each unordered pair once and mirror it (this package's
    backends, per_layer_cpu, and a CuPy per-layer module that says so with
    ``PAIRS_EVALUATED = "unique"``, as bench/per_layer_baseline.py does); n^2 for
    neural-tangents (``kernel_fn(x, None)`` builds the full n x n batch of covariances, each
    ordered pair computed) and for a CuPy per-layer module that does not declare it."""
    unique = n * (n + 1) // 2
    if method == "neural_tangents":
        return n * n
    if method == "per_layer_cuda":
        return unique if getattr(plc_module, "PAIRS_EVALUATED", "ordered") == "unique" else n * n
    return unique


def images(n, size, channels, seed=0):
    return np.random.default_rng(seed).standard_normal((n, channels, size, size)).astype(np.float32)


def cfg(c: dict, field: str):
    """A config field, with CONFIG_DEFAULTS for the fields that older result files lack."""
    return c.get(field, CONFIG_DEFAULTS.get(field))


def config_key(c: dict) -> str:
    """The configuration's identity: the original eight fields, then each later field that is
    not at its default (so a configuration of an older file keeps its key)."""
    key = "|".join(str(c[k]) for k in ("method", "depth", "size", "channels", "pooling", "dtype", "tile", "n"))
    for field, default in CONFIG_DEFAULTS.items():
        if cfg(c, field) != default:
            key += f"|{field}={cfg(c, field)}"
    return key


def check_group(c: dict) -> tuple:
    """Configurations checked against each other: same network, readout, fix and image size."""
    return (cfg(c, "architecture"), c["depth"], c["size"], c["pooling"], cfg(c, "fix"))


# ------------------------------------------------------------------------------ runners
class Runner:
    """Builds, per configuration, a zero-argument callable returning {depth: (ntk, nngp)}."""

    def __init__(self, args):
        self.args = args
        self.gram_kwargs = {}
        self._client = None
        self._paper = None
        self._available = {}
        self.prepare_log = []      # seconds of each project-backend call's preparation
        import cntk_engine as ce
        self.ce = ce
        if args.devices:
            self.gram_kwargs["devices"] = args.devices
        if args.dask_scheduler:
            from dask.distributed import Client
            self._client = Client(args.dask_scheduler)
            self.gram_kwargs["client"] = self._client

    def close(self):
        if self._client is not None:
            self._client.close()

    def available(self, method) -> str | None:
        if method not in self._available:
            self._available[method] = self._available_now(method)
        return self._available[method]

    def _available_now(self, method) -> str | None:
        if method in PROJECT_BACKENDS:
            return self.ce.available_backends().get(method)
        if method == "per_layer_cpu":
            return None
        if method == "per_layer_cuda":
            return None if gpu_info() else "bench/per_layer_baseline.py needs CuPy and a CUDA GPU"
        if method == "paper_code":
            return paper_mod.unavailable_reason(self.args.paper_code, emulate=self.args.paper_emulate)
        return None  # neural_tangents: known only after its subprocess ran

    def unsupported(self, c) -> str | None:
        """Why a project backend cannot compute configuration ``c`` (the backend's own answer:
        e.g. the CUDA backend and a pooled stack), or None."""
        if c["method"] not in PROJECT_BACKENDS:
            return None
        from cntk_engine.arch import make_architecture
        from cntk_engine.backends import capabilities
        arch = cfg(c, "architecture")
        try:
            a = make_architecture(depths=None if arch != "cnn" else [c["depth"]], architecture=arch,
                                  pooling=c["pooling"], fix=cfg(c, "fix"))
        except ValueError as e:
            return f"cntk_engine refuses the configuration: {e}"
        caps = capabilities(a, (c["channels"], c["size"], c["size"]), np.dtype(c["dtype"]))
        return caps[c["method"]]["unsupported"]

    def skip_reason(self, c) -> str | None:
        """Why configuration ``c`` is outside what its method implements, or None."""
        m, arch = c["method"], cfg(c, "architecture")
        if m in CNN_ONLY and arch != "cnn":
            return f"{m} computes the CNN of Arora et al. only, not {arch}"
        if m == "per_layer_cuda" and (c["pooling"] != "gap" or cfg(c, "fix") or c["dtype"] != "float32"):
            return "the CuPy per-layer baseline computes the paper's CNTK-GAP, fix=False, float32 only"
        if m == "neural_tangents":
            if cfg(c, "fix"):
                return "the neural-tangents snippets compute fix=False only (every layer trained)"
            if c["dtype"] != "float32" or c["channels"] != 3:
                return "the neural-tangents snippets measure float32, 3 channels only"
            if arch == "cnn" and c["pooling"] != "gap":
                return "the neural-tangents snippet of the CNN measures GAP only"
        if m == "paper_code":
            if c["size"] != paper_mod.SIZE:
                return f"the paper's RawKernels are written for {paper_mod.SIZE}x{paper_mod.SIZE} images"
            if c["dtype"] != "float32":
                return "the paper's RawKernels compute in float32 only"
        return None

    def paper(self):
        if self._paper is None:
            self._paper = paper_mod.PaperCode(self.args.paper_code,
                                              paper_mod.numpy_cupy() if self.args.paper_emulate else None)
        return self._paper

    def make(self, c, x):
        depth, pooling, dt, fix = c["depth"], c["pooling"], c["dtype"], cfg(c, "fix")
        m, arch = c["method"], cfg(c, "architecture")
        if m in PROJECT_BACKENDS:
            kw = dict(pooling=pooling, fix=fix, kernel="both", backend=m, dtype=dt, tile=c["tile"],
                      **self.gram_kwargs)
            if arch == "cnn":
                kw["depths"] = [depth]
            else:
                kw["architecture"] = arch
            variant = cfg(c, "cuda_kernel")

            def call():
                with cuda_kernel_selected(variant):
                    res, info = self.ce.gram(x, return_info=True, **kw)
                # the workers prepare in parallel: the slowest one is what the call waited for
                self.prepare_log.append(max(info.get("prepare_seconds", {}).values(), default=None))
                return res if arch == "cnn" else {depth: res}
            return call
        if m == "per_layer_cpu":
            from .per_layer_cpu import gram as plc
            return lambda: plc(x, depths=[depth], pooling=pooling, fix=fix, kernel="both", dtype=dt)
        if m == "per_layer_cuda":
            from .per_layer_baseline import gram as plg
            return lambda: plg(x, depths=[depth], pooling=pooling, fix=fix, kernel="both", dtype=dt)
        if m == "paper_code":
            paper = self.paper()
            return lambda: {depth: (paper.gram(x, depth, pooling, fix),)}
        raise ValueError(m)


class cuda_kernel_selected:
    """Context: $CNTK_ENGINE_CUDA_KERNEL = ``name`` (the CUDA backend reads it when a job builds
    its backend), restored afterwards; ``None`` leaves the environment as it is."""

    def __init__(self, name):
        self.name = name

    def __enter__(self):
        if self.name is not None:
            self.before = os.environ.get(KERNEL_ENV)
            os.environ[KERNEL_ENV] = self.name

    def __exit__(self, *exc):
        if self.name is not None:
            if self.before is None:
                os.environ.pop(KERNEL_ENV, None)
            else:
                os.environ[KERNEL_ENV] = self.before


def cuda_variants() -> list[dict] | None:
    """The kernel variants of the installed CUDA extension (default first), None without it."""
    try:
        from cntk_engine.backends.cuda import kernel_variants
        return kernel_variants()
    except Exception:  # noqa: BLE001 - ImportError without the extension
        return None


def resolved_variant(name: str | None, variants: list[dict] | None, dtype: str = "float32") -> str | None:
    """The variant a cuda configuration runs: ``name``, else $CNTK_ENGINE_CUDA_KERNEL, else the
    extension's default for ``dtype`` (None without the extension)."""
    if name is not None:
        return name
    if not variants:
        return None
    env = os.environ.get(KERNEL_ENV, "").strip()
    return env or next(v["name"] for v in variants if is_default_variant(v, dtype))


def run_nt(args, c):
    """neural-tangents in a subprocess: the CNN (GAP, 3x3: bench_cpu.NT_SNIPPET) or a Myrtle
    network (bench_stacks.NT_SNIPPET), float32, 3 channels.

    Its last kernels are checked against this package's float64 kernels of the same images
    (``convention="neural_tangents"`` with stax's default ``W_std=1``, no bias), so a comparison
    with a neural-tangents that computes something else (a broken install, ``nt_compat``) shows.
    """
    arch = cfg(c, "architecture")
    import cntk_engine as ce
    with tempfile.TemporaryDirectory() as tmp:
        saved = Path(tmp) / "nt_kernels.npz"
        if arch == "cnn":
            from .bench_cpu import bench_nt
            res = bench_nt(args.nt_python, c["n"], c["depth"], c["size"], args.repeats, save=saved)
        else:
            from .bench_stacks import bench_nt as bench_nt_stack
            res = bench_nt_stack(args.nt_python, c["n"], c["depth"], args.repeats, save=saved)
        if "seconds" not in res:
            return {"status": "unavailable", "reason": res.get("unavailable", "failed")}
        with np.load(saved) as f:
            x, nt_kernels = f["x"], (f["ntk"], f["nngp"])
    extra = {k: v for k, v in res.items() if k not in ("seconds", "times")}
    seconds = statistics.median(res["times"]) if res.get("times") else res["seconds"]
    dev = "gpu" if "cuda" in str(res.get("jax_device", "")).lower() or "gpu" in str(res.get("jax_device", "")).lower() else "cpu"
    net = dict(depth=c["depth"]) if arch == "cnn" else dict(architecture=arch)
    ours = ce.gram(x.astype(np.float64), **net, pooling=c["pooling"], kernel="both", fix=False,
                   convention="neural_tangents", W_std=1.0, data_format="NHWC", dtype="float64")
    check = {"vs": "cntk_engine float64, convention='neural_tangents', W_std=1, same images",
             "block": c["n"], **_diff_check(nt_kernels, ours, c["n"])}
    return {"status": "ok", "seconds": seconds, "times": res["times"], "device": dev,
            "info": extra, "check": check}


def paper_check(runner, c, x, paper_ntk) -> dict:
    """The paper's values against this package's float64 NTK of the same images (arora
    convention, the configuration's fix and readout): bench/paper_code.compare_values."""
    try:
        ours = paper_mod.ours(x, c["depth"], c["pooling"], cfg(c, "fix"))
    except Exception as e:  # noqa: BLE001 - recorded, the run goes on
        return {"vs": "cntk_engine float64, arora", "unavailable": f"{type(e).__name__}: {e}"}
    return {"vs": f"cntk_engine float64, arora, fix={cfg(c, 'fix')}, {c['pooling']}, same images "
                  "(random: the paper's code gives NaN on zero-variance windows)",
            **paper_mod.compare_values(paper_ntk, ours)}


def _diff_check(res, ref, m) -> dict:
    """``max_rel_diff``: the largest |a - b| / max|b| over NTK and NNGP on the first m x m
    block, and ``non_finite_entries`` of either there; with any, ``max_rel_diff`` is None (a NaN
    must not read as agreement: Python's max(0.0, nan) is 0.0)."""
    worst, non_finite = 0.0, 0
    for a, b in zip(res, ref):
        a = np.asarray(a.get() if hasattr(a, "get") else a)[:m, :m]
        b = np.asarray(b.get() if hasattr(b, "get") else b)[:m, :m]
        bad = int(np.count_nonzero(~np.isfinite(a)) + np.count_nonzero(~np.isfinite(b)))
        if bad:
            non_finite += bad
            continue
        scale = np.abs(b).max()
        worst = max(worst, float(np.abs(a - b).max() / scale) if scale > 0 else float(np.abs(a - b).max()))
    return {"max_rel_diff": None if non_finite else worst, "non_finite_entries": non_finite}


# ------------------------------------------------------------------------------ the run
def build_matrix(args):
    """The configurations of a run, in the product order of the arguments (``run`` moves each
    check group's reference, ``designated_references``, to the front)."""
    tiles, nfor = args.tiles, args.n_for
    out, seen = [], set()
    for m, arch in itertools.product(args.methods, args.architectures):
        depths = args.depths if arch == "cnn" else [ARCHITECTURES[arch]]
        sizes = args.sizes if arch == "cnn" else [32]
        variants = args.kernels if (m == "cuda" and args.kernels) else [None]
        for d, s, dt, p, fx, kv in itertools.product(depths, sizes, args.dtypes, args.pooling, args.fix, variants):
            ts = tiles if m in PROJECT_BACKENDS else [None]
            # the reference is float64 whatever dtype= says; the NT snippets are float32
            dts = {"neural_tangents": ["float32"], "reference": ["float64"]}.get(m, [dt])
            for t, dt2 in itertools.product(ts, dts):
                ns = [nfor[f"{m}:{dt2}"]] if f"{m}:{dt2}" in nfor else [nfor[m]] if m in nfor else args.n
                for n in ns:
                    c = {"method": m, "architecture": arch, "depth": d, "size": s, "channels": args.channels,
                         "pooling": p, "fix": fx, "dtype": dt2, "tile": t, "n": n,
                         "cuda_kernel": kv}
                    if config_key(c) not in seen:
                        seen.add(config_key(c))
                        out.append(c)
    return out


def designated_references(matrix, runner) -> dict:
    """check group -> the key of the configuration the others of the group are checked against:
    a float64 configuration of a project backend if the group has one that can run, else its
    first project-backend or per_layer_cpu configuration that can run."""
    best = {}
    for c in matrix:
        if c["method"] not in PROJECT_BACKENDS + ("per_layer_cpu",):
            continue
        if runner.available(c["method"]) is not None or runner.unsupported(c) is not None:
            continue
        rank = 0 if (c["method"] in PROJECT_BACKENDS and c["dtype"] == "float64") else 1
        g = check_group(c)
        if g not in best or rank < best[g][0]:
            best[g] = (rank, config_key(c))
    return {g: k for g, (_, k) in best.items()}


def run_settings(args) -> dict:
    """The settings every measurement of a file shares (compared by --resume)."""
    return json.loads(json.dumps({"seed": args.seed, "warmup": args.warmup, "repeats": args.repeats,
                                  "devices": args.devices, "dask_scheduler": args.dask_scheduler}))


def output_path(args) -> Path:
    """--output; else <out-dir>/<name>_<UTC date>.json (``_2``, ... where that exists: a new run
    never overwrites an earlier result), or with --resume the newest existing
    <out-dir>/<name>_<8 digits>[_<k>].json (the last run's file, also one resumed after
    midnight)."""
    if args.output:
        return Path(args.output)
    if not args.resume:
        return Path(str(new_stem(args.out_dir, args.name)) + ".json")
    pat = re.compile(re.escape(args.name) + r"_(\d{8})(?:_(\d+))?\.json")
    found = [(m.group(1), int(m.group(2) or 1), p)
             for p in Path(args.out_dir).glob(f"{glob.escape(args.name)}_*.json")
             if (m := pat.fullmatch(p.name))]
    if found:
        return max(found, key=lambda f: f[:2])[2]
    return Path(args.out_dir) / f"{args.name}_{utc_date()}.json"


def resume_payload(out_path: Path, args) -> dict:
    """The file a --resume continues ({} without one); refuses one measured with other settings."""
    if not (args.resume and out_path.exists()):
        return {}
    try:
        old = json.loads(out_path.read_text())
    except (OSError, ValueError) as e:
        raise ScriptError(f"--resume: cannot read {out_path} ({type(e).__name__}: {e})") from None
    if not isinstance(old, dict) or old.get("kind") != "harness":
        raise ScriptError(f"--resume: {out_path} is not a harness result file")
    mine = run_settings(args)
    theirs = old.get("settings")
    if theirs is None:
        raise ScriptError(f"--resume: {out_path} does not record its settings ({', '.join(RESUME_SETTINGS)}; "
                         "written by an older harness), so its results cannot be known to match this run's; "
                         "start a new file (--output NEW.json)")
    differ = [f"--{k.replace('_', '-')} {theirs.get(k)!r} in the file, {mine[k]!r} now"
              for k in RESUME_SETTINGS if theirs.get(k) != mine[k]]
    if differ:
        raise ScriptError(f"--resume: {out_path} was measured with other settings: {'; '.join(differ)}. "
                         "Run with the file's settings, or start a new file (--output NEW.json)")
    # its figures and this run's are compared as one run's: on the same GPU model only
    was, now = (old.get("gpu") or {}).get("name"), (gpu_info() or {}).get("name")
    if was and now and was != now:
        raise ScriptError(f"--resume: {out_path} was measured on {was}, and this machine's GPU is {now}; "
                         "start a new file (--output NEW.json)")
    return old


def _merge_rates(old: dict, new: dict) -> dict:
    """Ceiling rates {device: {dtype: ...}} of a resumed file and of this run (this run's win)."""
    out = {d: dict(v) for d, v in old.items()}
    for d, v in new.items():
        out.setdefault(d, {}).update(v)
    return out


def device_of(c, args) -> str:
    """Where a configuration's method computes ("gpu" or "cpu")."""
    if c["method"] == "paper_code" and args.paper_emulate:
        return "cpu"
    return "gpu" if c["method"] in GPU_METHODS else "cpu"


def method_label(c, variant=None) -> str:
    """'cuda v5 float64', 'numba float32': how a check names the configuration it compares with."""
    return " ".join([c["method"]] + ([variant] if variant else []) + [c["dtype"]])


def check_args(args, variants):
    """One-line errors for option combinations that cannot run (before anything runs)."""
    if args.devices and "cuda" not in args.methods:
        given = args.devices if isinstance(args.devices, str) else ",".join(map(str, args.devices))
        raise ScriptError(f"--devices {given}: selects the GPUs of the cuda method, which --methods "
                          f"{','.join(args.methods)} leaves out (the CPU methods use every core); add "
                          "cuda to --methods or leave --devices out")
    if args.kernels and "cuda" not in args.methods:
        raise ScriptError(f"--kernels {','.join(args.kernels)}: chooses the CUDA kernel variants of the cuda "
                          f"method, which --methods {','.join(args.methods)} leaves out; add cuda to --methods "
                          "or leave --kernels out")
    if args.kernels and "cuda" in args.methods:
        if args.dask_scheduler:
            raise ScriptError("--kernels cannot choose the CUDA kernel variant on Dask workers (their "
                             f"{KERNEL_ENV} does); leave --kernels out with --dask-scheduler")
        if variants is not None:
            names = [v["name"] for v in variants]
            bad = [k for k in args.kernels if k not in names]
            if bad:
                raise ScriptError(f"--kernels {','.join(bad)}: not a CUDA kernel variant of the installed "
                                 f"extension (it has {', '.join(names)})")


def check_output(args, out_path: Path) -> None:
    """Refuse, before any configuration runs (and creating nothing), a result file that cannot be
    written: --output a folder, in a file, in a read-only place; --out-dir likewise."""
    if args.output:
        check_out_file(args.output, "--output")
        return
    check_out_dir(args.out_dir, "--out-dir")
    if out_path.is_dir() or ((out_path.exists() or out_path.is_symlink()) and not out_path.is_file()):
        raise ScriptError(f"--out-dir {args.out_dir}, --name {args.name}: {out_path} exists and is not a "
                          "file; give another --name, or --output PATH")


def measured(records) -> int:
    """How many records hold a measurement (timed, or the paper's code's values checked)."""
    return sum(r.get("status") in ("ok", "emulated") for r in records)


def run(args, prog: str = "python -m bench") -> dict:
    out_path = output_path(args)
    check_output(args, out_path)          # before any configuration runs, not after the first
    variants = cuda_variants()
    check_args(args, variants)
    old = resume_payload(out_path, args)
    old_records = old.get("results", [])
    runner = Runner(args)
    matrix = build_matrix(args)
    designated = designated_references(matrix, runner)
    first = set(designated.values())
    matrix.sort(key=lambda c: config_key(c) not in first)      # stable: the references first
    keys = {config_key(c) for c in matrix}
    done = {config_key(r["config"]): r for r in old_records if r.get("status") == "ok"}
    # configurations of the file that this run's matrix does not have: kept as they are
    outside = [r for r in old_records if config_key(r["config"]) not in keys]
    if args.resume and old_records:
        print(f"--resume: continuing {out_path} ({len(done)} OK configurations kept; failed or unavailable "
              f"ones run again; {len(outside)} outside this matrix kept)", flush=True)
    elif args.resume:
        print(f"--resume: no results in {out_path} to continue; starting it", flush=True)
    methods = {c["method"] for c in matrix}
    payload = {**result_header(), "kind": "harness", "machine": machine(), "gpu": gpu_info(),
               "versions": versions(), "cntk_engine_path": str(Path(runner.ce.__file__).parent),
               "available_backends": runner.ce.available_backends(),
               "workload": "symmetric Gram of N random standard-normal images, NTK + NNGP (kernel='both'), "
                           "arora convention, 3x3 filters; fix=False unless the config says fix: true; "
                           "the config's architecture (the CNN at its depth, or a Myrtle preset)",
               "settings": run_settings(args),
               "timing": {"warmup": args.warmup, "repeats": args.repeats, "statistic": "median",
                          "gpu_sync": "cupy.cuda.Device().synchronize() before each clock read"},
               "scheduler": {k: str(v) for k, v in runner.gram_kwargs.items()},
               "results": []}
    if old.get("command"):           # a file filled by several runs (--resume) keeps their commands
        payload["earlier_commands"] = old.get("earlier_commands", []) + [old["command"]]
    if variants is not None or old.get("cuda_kernels"):
        payload["cuda_kernels"] = variants if variants is not None else old["cuda_kernels"]
    # --- the ceiling: measured once per device used, for the dtypes its configurations use
    rates = {}
    if not args.no_ceiling:
        cpu_dts = {c["dtype"] for c in matrix if device_of(c, args) == "cpu"}
        gpu_dts = {c["dtype"] for c in matrix if device_of(c, args) == "gpu"}
        if gpu_dts or "neural_tangents" in methods:   # JAX may run on the GPU; issue figures use float32
            gpu_dts |= {"float32"}
        if cpu_dts:
            rates["cpu"] = ceil_mod.measure("cpu", tuple(sorted(cpu_dts)))
        if gpu_dts and payload["gpu"]:
            rates["gpu"] = ceil_mod.measure("gpu", tuple(sorted(gpu_dts)))
    payload["ceiling"] = {"rates": _merge_rates(old.get("ceiling", {}).get("rates", {}), rates),
                          "count": "docs/gpu_performance.md (counted from cntk_engine/backends/numba_cpu.py)"}
    # each cuda kernel variant's own instruction count (tools/sass_mix.py): issue ceiling and
    # efficiency; "sass" holds the default variant's (the field of files before --kernels), else
    # the first's; a resumed file keeps the variants it counted before
    mixes = {}
    if "cuda" in methods and payload["gpu"] and variants is not None:
        counted = sass_mix.read_counted(args.sass_mixes) if args.sass_mixes else None
        for v in dict.fromkeys(resolved_variant(cfg(c, "cuda_kernel"), variants, c["dtype"]) for c in matrix
                               if c["method"] == "cuda"):
            mixes[v] = sass_mix.harness_mixes([c for c in matrix if c["method"] == "cuda"], kernel=v,
                                              counted=counted)
    counted = {**old.get("sass_by_kernel", {}), **mixes}
    if counted:
        payload["sass_by_kernel"] = counted
        default = next((v["name"] for v in payload.get("cuda_kernels") or [] if is_default_variant(v)), None)
        payload["sass"] = counted.get(default) or next(iter(counted.values()))
    elif old.get("sass"):
        payload["sass"] = old["sass"]

    def save():
        # the kept records this run has not reached yet too: a run stopped at its time limit
        # before reaching them must not lose them from the file
        reached = {config_key(r["config"]) for r in payload["results"]}
        pending = [r for k, r in done.items() if k not in reached]
        write_json(out_path, {**payload, "results": payload["results"] + pending + outside})

    # check group -> the reference the group's other configurations are checked against
    # ({"res": its kernels, computed when first needed for a configuration kept by --resume,
    # "n", "vs"}): the designated one, or when that one failed, the next that can be
    refs = {}
    total = len(matrix)
    t_start = time.perf_counter()
    for i, c in enumerate(matrix, 1):
        key = config_key(c)
        rk = check_group(c)
        can_ref = c["method"] in PROJECT_BACKENDS + ("per_layer_cpu",)
        variant = resolved_variant(cfg(c, "cuda_kernel"), variants, c["dtype"]) if c["method"] == "cuda" else None
        if key in done:
            payload["results"].append(done[key])
            if rk not in refs and can_ref:
                refs[rk] = {"res": None, "n": c["n"], "vs": method_label(c, variant), "config": c}
            print(f"[{i}/{total}] {key}: kept from {out_path.name} (--resume)", flush=True)
            continue
        rec = {"config": c}
        if c["method"] == "cuda":
            rec["cuda_kernel"] = variant
        why_skip = runner.skip_reason(c)
        why = None if why_skip else (runner.available(c["method"]) or runner.unsupported(c))
        if why_skip is not None:
            rec.update(status="skipped", reason=why_skip)
        elif why is not None:
            rec.update(status="unavailable", reason=why)
        elif c["method"] == "neural_tangents":
            try:        # a failure is this configuration's: the other ones still run
                rec.update(run_nt(args, c))
            except Exception as e:  # noqa: BLE001 - recorded, the run goes on
                rec.update(status="failed", reason=f"{type(e).__name__}: {e}")
        else:
            x = images(c["n"], c["size"], c["channels"], args.seed)
            try:
                fn = runner.make(c, x)
                box = {}

                def call():
                    box["r"] = fn()
                    gpu_sync()

                if c["method"] == "paper_code" and args.paper_emulate:
                    call()      # values only: a NumPy emulation's time is not the paper's code's
                    rec.update(status="emulated", device="cpu",
                               reason="the paper's RawKernels emulated in NumPy (--paper-emulate): its "
                                      "loaded functions and values checked, no timing")
                else:
                    runner.prepare_log = []
                    sec, times = median_time(call, repeats=args.repeats, warmup=args.warmup)
                    rec.update(status="ok", seconds=sec, times=times, device=device_of(c, args))
                    prep = runner.prepare_log[args.warmup:]
                    if prep and None not in prep:
                        rec["preparation_s"] = statistics.median(prep)
                res = box["r"][c["depth"]]
                if c["method"] == "paper_code":
                    rec["check"] = paper_check(runner, c, x, res[0])
                    rec["paper_timing"] = runner.paper().last_timing
                elif rk in refs:
                    rec["check"] = _check(res, c["n"], refs[rk], runner, args)
                elif can_ref:
                    refs[rk] = {"res": res, "n": c["n"], "vs": method_label(c, variant)}
            except Exception as e:
                rec.update(status="failed", reason=f"{type(e).__name__}: {e}")
        if rec.get("status") == "ok":
            n = c["n"]
            pairs = n * (n + 1) // 2
            rec["unique_pairs"] = pairs
            rec["unique_pairs_per_s"] = pairs / rec["seconds"]
            rec["entries_per_s"] = n * n / rec["seconds"]
            rec["pairs_evaluated"] = pairs_evaluated(c["method"], n, per_layer_baseline)
            rec["pairs_evaluated_per_s"] = rec["pairs_evaluated"] / rec["seconds"]
            if rec.get("preparation_s") is not None and rec["seconds"] > rec["preparation_s"]:
                rec["unique_pairs_per_s_beyond_preparation"] = pairs / (rec["seconds"] - rec["preparation_s"])
            if cfg(c, "architecture") == "cnn":     # the count is the CNN's (bench/ceiling.py)
                w = ceil_mod.work_per_pair(c["depth"], c["size"], c["size"], c["channels"], c["pooling"])
                rec["work_per_pair"] = {"fp_instructions": w.fp_instructions, "flops": w.flops}
                rate = rates.get(rec["device"], {}).get(c["dtype"])
                rec.update(ceil_mod.ceiling_figures(rec["unique_pairs_per_s"], w, rate))
                if variant in mixes:
                    f32 = rates.get("gpu", {}).get("float32", {}).get("fma_per_s")
                    rec.update(sass_mix.issue_figures(c, rec["unique_pairs_per_s"], mixes[variant], f32))
        payload["results"].append(rec)
        payload["elapsed_s"] = time.perf_counter() - t_start
        save()
        print(f"[{i}/{total}] {key}: {_summary(rec)}", flush=True)
    runner.close()
    payload["results"] += outside
    outside = []
    write_json(out_path, payload)
    if not args.no_plots:
        from .plots import harness_plots
        payload["plots"] = [str(p) for p in harness_plots(payload, out_path.with_suffix(""))]
        write_json(out_path, payload)
    print(f"wrote {out_path}")
    for p in payload.get("plots", []):
        print(f"wrote {p}")
    mine = [r for r in payload["results"] if config_key(r["config"]) in keys]
    if not measured(mine):
        counts = {}
        for r in mine:
            counts[r.get("status")] = counts.get(r.get("status"), 0) + 1
        what = ", ".join(f"{n} {status}" for status, n in counts.items())
        if not measured(payload["results"]):
            finish(prog, f"nothing was measured: {len(mine)} configuration(s), {what}; the reasons are in "
                         f"{out_path}", code=1)
        print(f"note: this run measured none of its {len(mine)} configuration(s) ({what}); {out_path} "
              f"holds {measured(payload['results'])} measured by earlier runs", file=sys.stderr)
    # a configuration that broke is a failed run (gpu_session.sh records the phase so), after the
    # others ran and the file was written; "unavailable" (a method not installed) is not
    broke = [r for r in mine if r.get("status") in ("failed", "timed_out")]
    if broke:
        finish(prog, f"{len(broke)} of {len(mine)} configuration(s) failed or timed out, first "
                     f"{config_key(broke[0]['config'])}: {broke[0].get('reason')}; every result is in "
                     f"{out_path}", code=1)
    return payload


def _check(res, n, ref, runner, args):
    """The check of a result against its reference (computing the reference's kernels, untimed,
    when it is a configuration kept by --resume)."""
    if ref["res"] is None:
        c = ref["config"]
        try:
            ref["res"] = runner.make(c, images(c["n"], c["size"], c["channels"], args.seed))()[c["depth"]]
        except Exception as e:
            return {"vs": ref["vs"], "unavailable": f"recomputing the reference failed ({type(e).__name__}: {e})"}
    m = min(ref["n"], n)
    return {"vs": ref["vs"], "block": m, **_diff_check(res, ref["res"], m)}


def _summary(rec):
    chk = rec.get("check", {})
    if "max_rel_diff_distinct_pairs" in chk:        # the paper's code (bench/paper_code.py)
        tail = (f"vs {chk['vs'].split(',')[0]}: distinct pairs {chk['max_rel_diff_distinct_pairs']:.1e}, "
                f"self pairs {chk['max_rel_diff_self_pairs']:.1e}, non-finite {chk['non_finite_entries']}")
    elif chk.get("non_finite_entries"):
        tail = f"vs {chk['vs']}: {chk['non_finite_entries']} NON-FINITE entries"
    elif "max_rel_diff" in chk:
        tail = f"max rel diff vs {chk['vs']}: {chk['max_rel_diff']:.1e}"
    elif chk:
        tail = f"no check: {chk.get('unavailable')}"
    else:
        tail = ""
    if rec.get("status") != "ok":
        return f"{rec.get('status')}: {rec.get('reason')}" + (f"; {tail}" if tail else "")
    s = f"{rec['unique_pairs_per_s']:.4g} unique pairs/s ({rec['seconds']:.3g} s median)"
    if "unique_pairs_per_s_beyond_preparation" in rec:
        s += (f", {rec['unique_pairs_per_s_beyond_preparation']:.4g} beyond the images' preparation "
              f"({rec['preparation_s']:.3g} s)")
    if rec.get("cuda_kernel"):
        s += f", kernel {rec['cuda_kernel']}"
    if "fraction_of_ceiling" in rec:
        s += f", {100 * rec['fraction_of_ceiling']:.1f}% of ceiling"
    if "issue_efficiency" in rec:
        s += f", issues {100 * rec['issue_efficiency']:.1f}% of cycles (SASS count)"
    return s + (f", {tail}" if tail else "")


def parser():
    ap = argparse.ArgumentParser(prog="python -m bench", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--methods", type=choice_list(METHODS), default="numba,per_layer_cpu",
                    help=f"comma list from {', '.join(METHODS)} (default: numba,per_layer_cpu)")
    ap.add_argument("--architectures", type=choice_list(ARCHITECTURES), default="cnn",
                    help="comma list from cnn, myrtle5, myrtle7, myrtle10; a Myrtle preset fixes its depth "
                         "(--depths is for the CNN) and takes 32x32 images (--sizes is for the CNN) [cnn]")
    ap.add_argument("--depths", type=int_list(2), default="3,6,11,21", help="comma list (conv layers + 1, >= 2)")
    ap.add_argument("--sizes", type=int_list(1, "8,16,32"), default="32", help="image sizes (H = W), comma list")
    ap.add_argument("--channels", type=int_at_least(1), default=3)
    ap.add_argument("--pooling", type=choice_list(POOLINGS), default="gap", help="gap, flatten or both: gap,flatten")
    ap.add_argument("--dtypes", type=choice_list(DTYPES), default="float32",
                    help="float32,float64, of the methods that take a dtype: the reference runs in "
                    "float64 and neural_tangents in float32 (JAX's default) whatever this says")
    ap.add_argument("--fix", type=_fix_list, default="no",
                    help="no, yes or no,yes: first and last layers not trained (paper, Section 4.2) [no]")
    ap.add_argument("--kernels", type=_kernel_names, default=None,
                    help="CUDA kernel variants to time the cuda method with, comma list (e.g. v3,v5; "
                         "cntk-engine info lists them) [the variant the backend selects]")
    ap.add_argument("--tiles", type=_tiles, default="default",
                    help="tile sizes for the project's backends: default or positive ints, comma list")
    ap.add_argument("--n", type=int_list(1, "16,64"), default="16", help="images per configuration (comma list: scaling with N)")
    ap.add_argument("--n-for", type=_overrides, default="",
                    help="per-method N, or per method and dtype: e.g. reference=2,per_layer_cpu=4,cuda:float64=64")
    ap.add_argument("--repeats", type=int_at_least(1), default=3, help="timed calls per configuration (>= 1)")
    ap.add_argument("--warmup", type=int_at_least(0), default=1, help="untimed calls before them (>= 0)")
    ap.add_argument("--seed", type=int_at_least(0), default=0,
                    help="seed of the random images (recorded in the JSON)")
    ap.add_argument("--nt-python", default=os.environ.get("CNTK_ENGINE_NT_PYTHON", sys.executable),
                    help="python with neural_tangents (subprocess); default: this one")
    ap.add_argument("--paper-code", default=None, metavar="PATH",
                    help="a local copy of CNTK.py of github.com/ruosongwang/CNTK for the paper_code method "
                         "(needs CuPy and a GPU; bench/paper_code.py)")
    ap.add_argument("--paper-emulate", action="store_true",
                    help="run paper_code's loaded functions with its RawKernels emulated in NumPy on the CPU: "
                         "values checked, no timing (a test before a GPU run)")
    ap.add_argument("--devices", type=devices, default=None, help="passed to gram(devices=...): 'all' or 0,1,2,3")
    ap.add_argument("--dask-scheduler", default=None, help="address of a Dask scheduler: gram(client=Client(addr))")
    ap.add_argument("--out-dir", default=str(RESULTS))
    ap.add_argument("--name", default="harness", help="result file stem: <out-dir>/<name>_<UTC date>.json")
    ap.add_argument("--output", default=None,
                    help="explicit JSON path (overrides --out-dir/--name); use it for long runs that may be "
                         "resumed")
    ap.add_argument("--resume", action="store_true",
                    help="continue the output file: keep its OK configurations, run the failed, unavailable and "
                         "missing ones, keep configurations outside this matrix; refused when the file was "
                         "measured with another --seed/--warmup/--repeats/--devices/--dask-scheduler.  Without "
                         "--output: the newest <out-dir>/<name>_<date>.json")
    ap.add_argument("--sass-mixes", default=None, metavar="PATH",
                    help="the cuda kernels' instruction mixes counted where the installed extension was built "
                         "(tools/gpu/prebuilt.py writes them beside its wheel), used for the issue figures when "
                         "they counted this very binary (its SHA-256): no disassembly here; else, as without "
                         "it, the kernels are disassembled (about a second each)")
    ap.add_argument("--no-ceiling", action="store_true", help="skip the FMA-rate measurement")
    ap.add_argument("--no-plots", action="store_true")
    return ap


def main(argv=None):
    ap = parser()
    # the engine's backend= is a method here (its "use backend='cuda'" reads --methods 'cuda')
    return run_main(ap, lambda args: run(args, ap.prog), argv, aliases={"backend": "--methods"})
