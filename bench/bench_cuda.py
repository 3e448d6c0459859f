"""GPU throughput of the CUDA backend vs the paper's per-layer method, in one run.

    python bench/bench_cuda.py [--n 256] [--depths 3,6,11,21] [--out DIR]

Workload: symmetric Gram of N random 32x32x3 images, GAP, arora convention.  For each depth,
unique pairs/s of ``gram(backend="cuda")`` in float32 and float64 (timed after a warm-up,
synchronised, median of repeats), the multi-depth pass, and the per-layer baseline
(bench/per_layer_baseline.py) on a few pairs.  Writes cuda_<GPU>_<date>.json and .png into
--out.

Every row's ``unique_pairs_per_s`` is N(N+1)/2 / seconds and ``pairs_evaluated_per_s`` the pairs
the method computed per second (the same, since every method here uses the Gram's symmetry).
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

if __package__ in (None, ""):
    sys.path.append(str(Path(__file__).resolve().parents[1]))
from bench.common import (RESULTS, ScriptError, check_out_dir, gpu_info, gpu_sync,  # noqa: E402
                          int_at_least, int_list, machine, median_time, new_stem, result_header,
                          run_main, write_json)


def timed(fn, repeats):
    """Median seconds of fn() (synchronised) over ``repeats`` calls after one warm-up call."""
    def call():
        fn()
        gpu_sync()
    return median_time(call, repeats=repeats, warmup=1)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int_at_least(1), default=256)
    ap.add_argument("--n64", type=int_at_least(1), default=96, help="images for float64")
    ap.add_argument("--depths", type=int_list(2), default="3,6,11,21")
    ap.add_argument("--baseline-pairs", type=int_at_least(1), default=4,
                    help="images for the per-layer baseline (N(N+1)/2 pairs: it uses the symmetry)")
    ap.add_argument("--repeats", type=int_at_least(1), default=3)
    ap.add_argument("--size", type=int_at_least(1), default=32)
    ap.add_argument("--out", default=str(RESULTS))
    return run_main(ap, run, argv)


def run(args):
    import cntk_engine as ce
    from bench.per_layer_baseline import PerLayerGPU
    check_out_dir(args.out, "--out")
    try:
        import cupy
    except ImportError as e:
        raise ScriptError(f"bench_cuda.py times the CUDA backend against the per-layer method on a "
                          f"GPU, with CuPy; CuPy is not importable here ({e})") from None
    depths = args.depths
    rng = np.random.default_rng(0)
    x = rng.standard_normal((args.n, 3, args.size, args.size)).astype(np.float32)
    xd = cupy.asarray(x)
    rows = []
    for dtype, n in (("float32", args.n), ("float64", args.n64)):
        pairs = n * (n + 1) // 2
        for d in depths:
            sec, ts = timed(lambda: ce.gram(xd[:n], depth=d, backend="cuda", dtype=dtype), args.repeats)
            entry_layers = pairs * (args.size ** 4) * (d - 1)
            rows.append({"method": "cntk_engine cuda", "dtype": dtype, "depth": d, "n": n,
                         "seconds": sec, "times": ts, "unique_pairs_per_s": pairs / sec,
                         "pairs_evaluated_per_s": pairs / sec, "entry_layers_per_s": entry_layers / sec})
            print(f"cuda {dtype} depth {d:2d} N={n}: {pairs / sec:12.1f} unique pairs/s", flush=True)
        sec, ts = timed(lambda: ce.gram(xd[:n], depths=depths, backend="cuda", dtype=dtype, kernel="both"),
                        args.repeats)
        rows.append({"method": "cntk_engine cuda, all depths one pass", "dtype": dtype,
                     "depth": max(depths), "depths": depths, "n": n, "seconds": sec, "times": ts,
                     "unique_pairs_per_s": pairs / sec, "pairs_evaluated_per_s": pairs / sec})
        print(f"cuda {dtype} depths {depths} one pass: {pairs / sec:12.1f} unique pairs/s", flush=True)
    xb = x[:args.baseline_pairs]
    for d in depths:
        base = PerLayerGPU(d, args.size, args.size)
        base.gram(xb[:1])                                     # compile + warm-up
        gpu_sync()
        t = time.perf_counter()
        kb = base.gram(xb)
        gpu_sync()
        sec = time.perf_counter() - t
        npairs = len(xb) * (len(xb) + 1) // 2       # PerLayerGPU.gram: each unordered pair once
        ours = ce.gram(xb, depth=d, backend="cuda", dtype="float64")
        err = float(np.abs(kb - ours).max() / np.abs(ours).max())
        rows.append({"method": "per-layer baseline (paper's method)", "dtype": "float32", "depth": d,
                     "n": len(xb), "seconds": sec, "unique_pairs_per_s": npairs / sec,
                     "pairs_evaluated_per_s": npairs / sec,
                     "note": "one pair at a time, each unordered pair once (j >= i, mirrored), "
                             "the per-image diagonal recursions included",
                     "max_rel_diff_vs_cuda_float64": err})
        print(f"per-layer depth {d:2d}: {npairs / sec:10.1f} unique pairs/s  (rel diff vs ours {err:.1e})",
              flush=True)
    for d in depths:
        ours = next(r for r in rows if r["method"] == "cntk_engine cuda" and r["dtype"] == "float32" and r["depth"] == d)
        base = next(r for r in rows if r["method"].startswith("per-layer") and r["depth"] == d)
        ours["speedup_vs_per_layer"] = ours["unique_pairs_per_s"] / base["unique_pairs_per_s"]
        print(f"depth {d:2d}: speed-up over per-layer {ours['speedup_vs_per_layer']:.1f}x")
    info = gpu_info() or {"name": "unknown GPU"}
    payload = {**result_header(), "machine": machine(), "gpu": info,
               "workload": f"symmetric Gram, {args.size}x{args.size}x3 random images, GAP, arora, NTK",
               "results": rows}
    name = info["name"].replace(" ", "_").replace("/", "_")
    path = write_json(Path(str(new_stem(args.out, f"cuda_{name}")) + ".json"), payload)
    print(f"wrote {path}")
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        fig, ax = plt.subplots(figsize=(6, 4))
        for method, dtype, style in (("cntk_engine cuda", "float32", "o-"), ("cntk_engine cuda", "float64", "s-"),
                                     ("per-layer baseline (paper's method)", "float32", "x--")):
            pts = [(r["depth"], r["unique_pairs_per_s"]) for r in rows if r["method"] == method and r["dtype"] == dtype]
            if pts:
                ax.plot(*zip(*pts), style, label=f"{method} {dtype}")
        ax.set_yscale("log"); ax.set_xlabel("depth"); ax.set_ylabel("unique pairs / s")
        ax.set_title(f"CNTK-GAP 32x32x3 on {info['name']}"); ax.legend(fontsize=7); ax.grid(alpha=.3)
        fig.tight_layout(); fig.savefig(path.with_suffix(".png"), dpi=120)
        print(f"wrote {path.with_suffix('.png')}")
    except ImportError:
        pass


if __name__ == "__main__":
    main()
