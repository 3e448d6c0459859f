"""GPU throughput of the CUDA backend vs the paper's per-layer method, in one run.

    python bench/bench_cuda.py [--n 256] [--depths 3,6,11,21] [--out DIR]

Workload: symmetric Gram of N random 32x32x3 images, GAP, arora convention.  For each depth,
unique pairs/s of ``gram(backend="cuda")`` in float32 and float64 (timed after a warm-up,
synchronised, median of repeats), the multi-depth pass, and the per-layer baseline
(bench/per_layer_baseline.py) on a few pairs.  Also an estimate of achieved FP32 instruction
throughput (see bench/NOTES.md for the count).  Writes JSON (+ PNG) into bench/results or --out.

Every row's ``unique_pairs_per_s`` is N(N+1)/2 / seconds and ``pairs_evaluated_per_s`` the pairs
the method computed per second (the same, since every method here uses the Gram's symmetry).
Before 2026-11-23 the baseline computed all N^2 ordered pairs and its ``unique_pairs_per_s``
was N^2 / seconds, i.e. pairs evaluated per second (the ``correction`` in
bench/results/cuda_NVIDIA_H100_80GB_HBM3_20261123.json).
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import commit, machine  # noqa: E402


def gpu_info():
    import cupy
    props = cupy.cuda.runtime.getDeviceProperties(cupy.cuda.Device().id)
    return {"gpu": props["name"].decode() if isinstance(props["name"], bytes) else props["name"],
            "sm_count": props["multiProcessorCount"], "clock_khz": props.get("clockRate"),
            "driver": cupy.cuda.runtime.driverGetVersion(), "runtime": cupy.cuda.runtime.runtimeGetVersion(),
            "cupy": cupy.__version__}


def timed(fn, repeats):
    import cupy
    fn()
    cupy.cuda.Device().synchronize()
    ts = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        cupy.cuda.Device().synchronize()
        ts.append(time.perf_counter() - t)
    return float(np.median(ts)), ts


def main():
    import cntk_engine as ce
    from per_layer_baseline import PerLayerGPU
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=256)
    ap.add_argument("--n64", type=int, default=96, help="images for float64")
    ap.add_argument("--depths", default="3,6,11,21")
    ap.add_argument("--baseline-pairs", type=int, default=4,
                    help="images for the per-layer baseline (N(N+1)/2 pairs: it uses the symmetry)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--size", type=int, default=32)
    ap.add_argument("--out", default=str(Path(__file__).resolve().parent / "results"))
    args = ap.parse_args()
    import cupy
    depths = [int(d) for d in args.depths.split(",")]
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
    base = PerLayerGPU(2, args.size, args.size)
    xb = x[:args.baseline_pairs]
    for d in depths:
        base = PerLayerGPU(d, args.size, args.size)
        base.gram(xb[:1])                                     # compile + warm-up
        cupy.cuda.Device().synchronize()
        t = time.perf_counter()
        kb = base.gram(xb)
        cupy.cuda.Device().synchronize()
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
    info = gpu_info()
    payload = {"date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "commit": commit(),
               "command": " ".join(["python"] + sys.argv), "machine": machine(), "gpu": info,
               "workload": f"symmetric Gram, {args.size}x{args.size}x3 random images, GAP, arora, NTK",
               "results": rows}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    name = info["gpu"].replace(" ", "_").replace("/", "_")
    path = out / f"cuda_{name}_{time.strftime('%Y%m%d')}.json"
    path.write_text(json.dumps(payload, indent=2))
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
        ax.set_title(f"CNTK-GAP 32x32x3 on {info['gpu']}"); ax.legend(fontsize=7); ax.grid(alpha=.3)
        fig.tight_layout(); fig.savefig(path.with_suffix(".png"), dpi=120)
        print(f"wrote {path.with_suffix('.png')}")
    except ImportError:
        pass


if __name__ == "__main__":
    main()
