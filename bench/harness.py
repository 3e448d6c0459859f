"""Benchmark harness: a matrix of configurations, timed, written to JSON, plotted.

    python -m bench --methods numba,per_layer_cpu,reference --depths 3,6,11,21 --sizes 32 \\
        --dtypes float32 --n 16 --n-for per_layer_cpu=2,reference=1

Configurations are the product  method x depth x image size x dtype x tile x N.  Methods:

  numba, cuda, reference     the project's backends, through ``cntk_engine.gram``
  per_layer_cpu              the paper's per-layer 4-D algorithm in NumPy (bench/per_layer_cpu.py)
  per_layer_cuda             the same algorithm in CuPy (bench/per_layer_baseline.py)
  neural_tangents            neural-tangents' stax kernel_fn, in a subprocess (--nt-python)

Every configuration computes the symmetric Gram of N random (C, size, size) images (NTK and
NNGP, ``kernel="both"``), after ``--warmup`` untimed calls, ``--repeats`` timed calls, median
reported; GPU work is synchronised (``cupy.cuda.Device().synchronize()``) before each clock
read.  Each configuration records ``unique_pairs_per_s`` = N(N+1)/2 / median seconds,
``pairs_evaluated_per_s`` (the pairs the method actually computed per second: N(N+1)/2 for a
method that uses the Gram's symmetry, N^2 for one that computes every ordered pair, as
neural-tangents' ``kernel_fn(x, None)`` does), the arithmetic per pair (bench/ceiling.py) and
the fraction of the device's measured FMA rate.
The JSON is rewritten after every configuration (progress is printed), so a long run that is
interrupted keeps what it measured; ``--resume`` keeps the configurations measured OK in the
file (failed or unavailable ones are run again, configurations outside this run's matrix are
kept), and refuses a file measured with other --seed/--warmup/--repeats/--devices/
--dask-scheduler.  Without --output, --resume continues the newest <out-dir>/<name>_<date>.json,
so a run resumed after midnight (UTC) continues yesterday's file; give long runs an explicit
``--output PATH`` all the same.
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
from . import per_layer_baseline
from . import sass_mix
from .common import (RESULTS, choice_list, devices, gpu_info, gpu_sync, int_at_least, int_list, machine,
                     median_time, result_header, utc_date, versions, write_json)

PROJECT_BACKENDS = ("numba", "cuda", "reference")
METHODS = PROJECT_BACKENDS + ("per_layer_cpu", "per_layer_cuda", "neural_tangents")
GPU_METHODS = ("cuda", "per_layer_cuda")
DTYPES = ("float32", "float64")
POOLINGS = ("gap", "flatten")
# the run settings a --resume must share with the file it continues
RESUME_SETTINGS = ("seed", "warmup", "repeats", "devices", "dask_scheduler")


# ------------------------------------------------------------------------------ helpers
def _overrides(s):
    """argparse type: 'reference=2,per_layer_cpu=4' -> {'reference': 2, 'per_layer_cpu': 4}."""
    out = {}
    for item in (v.strip() for v in s.split(",") if v.strip()):
        k, eq, v = item.partition("=")
        k = k.strip()
        if not eq:
            raise argparse.ArgumentTypeError(f"{item!r}: expected METHOD=N, e.g. reference=2,per_layer_cpu=4")
        if k not in METHODS:
            raise argparse.ArgumentTypeError(f"unknown method {k!r}; methods are {', '.join(METHODS)}")
        out[k] = int_at_least(1)(v)
    return out


def _tiles(s):
    """argparse type: 'default' or tile sizes, comma list: 'default,64' -> [None, 64]."""
    out = []
    for t in (v.strip() for v in s.split(",") if v.strip()):
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


def config_key(c: dict) -> str:
    return "|".join(str(c[k]) for k in ("method", "depth", "size", "channels", "pooling", "dtype", "tile", "n"))


# ------------------------------------------------------------------------------ runners
class Runner:
    """Builds, per configuration, a zero-argument callable returning {depth: (ntk, nngp)}."""

    def __init__(self, args):
        self.args = args
        self.gram_kwargs = {}
        self._client = None
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
        if method in PROJECT_BACKENDS:
            return self.ce.available_backends().get(method)
        if method == "per_layer_cpu":
            return None
        if method == "per_layer_cuda":
            return None if gpu_info() else "bench/per_layer_baseline.py needs CuPy and a CUDA GPU"
        return None  # neural_tangents: known only after its subprocess ran

    def make(self, c, x):
        depth, pooling, dt = c["depth"], c["pooling"], c["dtype"]
        m = c["method"]
        if m in PROJECT_BACKENDS:
            kw = dict(depths=[depth], pooling=pooling, fix=False, kernel="both", backend=m, dtype=dt,
                      tile=c["tile"], **self.gram_kwargs)
            return lambda: self.ce.gram(x, **kw)
        if m == "per_layer_cpu":
            from .per_layer_cpu import gram as plc
            return lambda: plc(x, depths=[depth], pooling=pooling, fix=False, kernel="both", dtype=dt)
        if m == "per_layer_cuda":
            from .per_layer_baseline import gram as plg
            return lambda: plg(x, depths=[depth], pooling=pooling, fix=False, kernel="both", dtype=dt)
        raise ValueError(m)


def run_nt(args, c):
    """neural-tangents in a subprocess (GAP, float32, 3x3 only: bench_cpu.NT_SNIPPET).

    Its last kernels are checked against this package's float64 kernels of the same images
    (``convention="neural_tangents"`` with stax's default ``W_std=1``, no bias), so a comparison
    with a neural-tangents that computes something else (a broken install, ``nt_compat``) shows.
    """
    if c["pooling"] != "gap" or c["dtype"] != "float32" or c["channels"] != 3:
        return {"status": "skipped", "reason": "the neural-tangents snippet measures GAP, float32, 3 channels only"}
    from .bench_cpu import bench_nt
    with tempfile.TemporaryDirectory() as tmp:
        saved = Path(tmp) / "nt_kernels.npz"
        res = bench_nt(args.nt_python, c["n"], c["depth"], c["size"], args.repeats, save=saved)
        if "seconds" not in res:
            return {"status": "unavailable", "reason": res.get("unavailable", "failed")}
        with np.load(saved) as f:
            x, nt_kernels = f["x"], (f["ntk"], f["nngp"])
    extra = {k: v for k, v in res.items() if k not in ("seconds", "times")}
    seconds = statistics.median(res["times"]) if res.get("times") else res["seconds"]
    dev = "gpu" if "cuda" in str(res.get("jax_device", "")).lower() or "gpu" in str(res.get("jax_device", "")).lower() else "cpu"
    import cntk_engine as ce
    ours = ce.gram(x.astype(np.float64), depth=c["depth"], pooling="gap", kernel="both", fix=False,
                   convention="neural_tangents", W_std=1.0, data_format="NHWC", dtype="float64")
    check = {"vs": "cntk_engine float64, convention='neural_tangents', W_std=1, same images",
             "block": c["n"], "max_rel_diff": _max_rel_diff(nt_kernels, ours, c["n"])}
    return {"status": "ok", "seconds": seconds, "times": res["times"], "device": dev,
            "info": extra, "check": check}


def _max_rel_diff(res, ref, m):
    """Largest |a - b| / max|b| over NTK and NNGP on the first m x m block."""
    worst = 0.0
    for a, b in zip(res, ref):
        a = np.asarray(a.get() if hasattr(a, "get") else a)[:m, :m]
        b = np.asarray(b.get() if hasattr(b, "get") else b)[:m, :m]
        scale = np.abs(b).max()
        worst = max(worst, float(np.abs(a - b).max() / scale) if scale > 0 else float(np.abs(a - b).max()))
    return worst


# ------------------------------------------------------------------------------ the run
def build_matrix(args):
    tiles, nfor = args.tiles, args.n_for
    out = []
    for m, d, s, dt, p in itertools.product(args.methods, args.depths, args.sizes, args.dtypes, args.pooling):
        ns = [nfor[m]] if m in nfor else args.n
        ts = tiles if m in PROJECT_BACKENDS else [None]
        # the reference is float64 whatever dtype= says; the NT snippet is float32
        dts = {"neural_tangents": ["float32"], "reference": ["float64"]}.get(m, [dt])
        for t, n, dt2 in itertools.product(ts, ns, dts):
            c = {"method": m, "depth": d, "size": s, "channels": args.channels, "pooling": p,
                 "dtype": dt2, "tile": t, "n": n}
            if config_key(c) not in {config_key(o) for o in out}:
                out.append(c)
    return out


def run_settings(args) -> dict:
    """The settings every measurement of a file shares (compared by --resume)."""
    return json.loads(json.dumps({"seed": args.seed, "warmup": args.warmup, "repeats": args.repeats,
                                  "devices": args.devices, "dask_scheduler": args.dask_scheduler}))


def output_path(args) -> Path:
    """--output; else <out-dir>/<name>_<UTC date>.json, or with --resume the newest existing
    <out-dir>/<name>_<8 digits>.json (a run resumed after midnight continues its file)."""
    if args.output:
        return Path(args.output)
    today = Path(args.out_dir) / f"{args.name}_{utc_date()}.json"
    if args.resume and not today.exists():
        pat = re.compile(re.escape(args.name) + r"_(\d{8})\.json")
        found = sorted((p for p in Path(args.out_dir).glob(f"{glob.escape(args.name)}_*.json")
                        if pat.fullmatch(p.name)), key=lambda p: p.name)
        if found:
            return found[-1]
    return today


def resume_records(out_path: Path, args) -> list:
    """The records of the file a --resume continues; refuses one measured with other settings."""
    if not (args.resume and out_path.exists()):
        return []
    try:
        old = json.loads(out_path.read_text())
    except (OSError, ValueError) as e:
        raise SystemExit(f"--resume: cannot read {out_path} ({type(e).__name__}: {e})") from None
    if old.get("kind") != "harness":
        raise SystemExit(f"--resume: {out_path} is not a harness result file")
    mine = run_settings(args)
    theirs = old.get("settings")
    if theirs is None:
        raise SystemExit(f"--resume: {out_path} does not record its settings ({', '.join(RESUME_SETTINGS)}; "
                         "written by an older harness), so its results cannot be known to match this run's; "
                         "start a new file (--output NEW.json)")
    differ = [f"--{k.replace('_', '-')} {theirs.get(k)!r} in the file, {mine[k]!r} now"
              for k in RESUME_SETTINGS if theirs.get(k) != mine[k]]
    if differ:
        raise SystemExit(f"--resume: {out_path} was measured with other settings: {'; '.join(differ)}. "
                         "Run with the file's settings, or start a new file (--output NEW.json)")
    return old.get("results", [])


def run(args) -> dict:
    out_path = output_path(args)
    matrix = build_matrix(args)
    old_records = resume_records(out_path, args)
    keys = {config_key(c) for c in matrix}
    done = {config_key(r["config"]): r for r in old_records if r.get("status") == "ok"}
    # configurations of the file that this run's matrix does not have: kept as they are
    outside = [r for r in old_records if config_key(r["config"]) not in keys]
    if args.resume and old_records:
        print(f"--resume: continuing {out_path} ({len(done)} OK configurations kept; failed or unavailable "
              f"ones run again; {len(outside)} outside this matrix kept)", flush=True)
    runner = Runner(args)
    methods = {c["method"] for c in matrix}
    payload = {**result_header(), "kind": "harness", "machine": machine(), "gpu": gpu_info(),
               "versions": versions(), "cntk_engine_path": str(Path(runner.ce.__file__).parent),
               "available_backends": runner.ce.available_backends(),
               "workload": "symmetric Gram of N random standard-normal images, NTK + NNGP (kernel='both'), "
                           "fix=False, arora convention, 3x3 filters",
               "settings": run_settings(args),
               "timing": {"warmup": args.warmup, "repeats": args.repeats, "statistic": "median",
                          "gpu_sync": "cupy.cuda.Device().synchronize() before each clock read"},
               "scheduler": {k: str(v) for k, v in runner.gram_kwargs.items()},
               "results": []}
    # --- the ceiling: measured once per device used, for the dtypes its configurations use
    rates = {}
    if not args.no_ceiling:
        cpu_dts = {c["dtype"] for c in matrix if c["method"] not in GPU_METHODS}
        gpu_dts = {c["dtype"] for c in matrix if c["method"] in GPU_METHODS}
        if gpu_dts or "neural_tangents" in methods:   # JAX may run on the GPU; issue figures use float32
            gpu_dts |= {"float32"}
        if cpu_dts:
            rates["cpu"] = ceil_mod.measure("cpu", tuple(sorted(cpu_dts)))
        if gpu_dts and payload["gpu"]:
            rates["gpu"] = ceil_mod.measure("gpu", tuple(sorted(gpu_dts)))
    payload["ceiling"] = {"rates": rates, "count": "docs/gpu_performance.md (counted from cntk_engine/backends/numba_cpu.py)"}
    # the cuda kernel's own instruction count (bench/sass_mix.py): issue ceiling and efficiency
    mixes = {}
    if "cuda" in methods and payload["gpu"]:
        mixes = sass_mix.harness_mixes(matrix)
        payload["sass"] = mixes

    def save():
        write_json(out_path, {**payload, "results": payload["results"] + outside})

    # (depth, size, pooling) -> the first project backend / per_layer_cpu configuration: the
    # reference the others are checked against ({"res": its kernels, computed when first needed
    # for a configuration kept by --resume, "n", "vs"})
    refs = {}
    total = len(matrix)
    t_start = time.perf_counter()
    for i, c in enumerate(matrix, 1):
        key = config_key(c)
        rk = (c["depth"], c["size"], c["pooling"])
        can_ref = c["method"] in PROJECT_BACKENDS + ("per_layer_cpu",)
        if key in done:
            payload["results"].append(done[key])
            if rk not in refs and can_ref:
                refs[rk] = {"res": None, "n": c["n"], "vs": f"{c['method']} {c['dtype']}", "config": c}
            print(f"[{i}/{total}] {key}: kept from {out_path.name} (--resume)", flush=True)
            continue
        rec = {"config": c}
        why = runner.available(c["method"])
        if why is not None:
            rec.update(status="unavailable", reason=why)
        elif c["method"] == "neural_tangents":
            rec.update(run_nt(args, c))
        else:
            x = images(c["n"], c["size"], c["channels"], args.seed)
            try:
                fn = runner.make(c, x)
                box = {}

                def call():
                    box["r"] = fn()
                    gpu_sync()

                sec, times = median_time(call, repeats=args.repeats, warmup=args.warmup)
                rec.update(status="ok", seconds=sec, times=times,
                           device="gpu" if c["method"] in GPU_METHODS else "cpu")
                res = box["r"][c["depth"]]
                if rk in refs:
                    rec["check"] = _check(res, c["n"], refs[rk], runner, args)
                elif can_ref:
                    refs[rk] = {"res": res, "n": c["n"], "vs": f"{c['method']} {c['dtype']}"}
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
            w = ceil_mod.work_per_pair(c["depth"], c["size"], c["size"], c["channels"], c["pooling"])
            rec["work_per_pair"] = {"fp_instructions": w.fp_instructions, "flops": w.flops}
            rate = rates.get(rec["device"], {}).get(c["dtype"])
            rec.update(ceil_mod.ceiling_figures(rec["unique_pairs_per_s"], w, rate))
            if mixes:
                f32 = rates.get("gpu", {}).get("float32", {}).get("fma_per_s")
                rec.update(sass_mix.issue_figures(c, rec["unique_pairs_per_s"], mixes, f32))
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
    return {"vs": ref["vs"], "block": m, "max_rel_diff": _max_rel_diff(res, ref["res"], m)}


def _summary(rec):
    if rec.get("status") != "ok":
        return f"{rec.get('status')}: {rec.get('reason')}"
    s = f"{rec['unique_pairs_per_s']:.4g} unique pairs/s ({rec['seconds']:.3g} s median)"
    if "fraction_of_ceiling" in rec:
        s += f", {100 * rec['fraction_of_ceiling']:.1f}% of ceiling"
    if "issue_efficiency" in rec:
        s += f", issues {100 * rec['issue_efficiency']:.1f}% of cycles (SASS count)"
    if "max_rel_diff" in rec.get("check", {}):
        s += f", max rel diff vs {rec['check']['vs']}: {rec['check']['max_rel_diff']:.1e}"
    elif "check" in rec:
        s += f", no check: {rec['check'].get('unavailable')}"
    return s


def parser():
    ap = argparse.ArgumentParser(prog="python -m bench", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--methods", type=choice_list(METHODS), default="numba,per_layer_cpu",
                    help=f"comma list from {', '.join(METHODS)} (default: numba,per_layer_cpu)")
    ap.add_argument("--depths", type=int_list(2), default="3,6,11,21", help="comma list (conv layers + 1, >= 2)")
    ap.add_argument("--sizes", type=int_list(1), default="32", help="image sizes (H = W), comma list")
    ap.add_argument("--channels", type=int_at_least(1), default=3)
    ap.add_argument("--pooling", type=choice_list(POOLINGS), default="gap", help="gap, flatten or both: gap,flatten")
    ap.add_argument("--dtypes", type=choice_list(DTYPES), default="float32", help="float32,float64")
    ap.add_argument("--tiles", type=_tiles, default="default",
                    help="tile sizes for the project's backends: default or positive ints, comma list")
    ap.add_argument("--n", type=int_list(1), default="16", help="images per configuration (comma list: scaling with N)")
    ap.add_argument("--n-for", type=_overrides, default="", help="per-method N, e.g. reference=2,per_layer_cpu=4")
    ap.add_argument("--repeats", type=int_at_least(1), default=3, help="timed calls per configuration (>= 1)")
    ap.add_argument("--warmup", type=int_at_least(0), default=1, help="untimed calls before them (>= 0)")
    ap.add_argument("--seed", type=int, default=0, help="seed of the random images (recorded in the JSON)")
    ap.add_argument("--nt-python", default=os.environ.get("CNTK_ENGINE_NT_PYTHON", sys.executable),
                    help="python with neural_tangents (subprocess); default: this one")
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
    ap.add_argument("--no-ceiling", action="store_true", help="skip the FMA-rate measurement")
    ap.add_argument("--no-plots", action="store_true")
    return ap


def main(argv=None):
    return run(parser().parse_args(argv))
