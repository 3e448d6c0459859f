"""What the readouts and flips cost: CNTK-GAP against flatten, LAP windows and flip-symmetrised
kernels (and Myrtle-5 with and without flips), unique pairs per second, side by side in one run.

    python bench/bench_readouts.py [--n 16] [--depth 6] [--backend numba] [--repeats 3]

Workload: the symmetric Gram of N random 32x32x3 images, NTK + NNGP, float32.  Each row also
gives its throughput relative to CNTK-GAP of the same depth measured in the same run (machines
are noisy: the ratio is the figure to read).  Writes <out-dir>/readouts_<backend>_<date>.json;
when no configuration could be measured, nothing, and exits with status 1.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

if __package__ in (None, ""):
    sys.path.append(str(Path(__file__).resolve().parents[1]))
from bench.common import (BACKENDS, RESULTS, check_out_dir, finish, int_at_least,  # noqa: E402
                          median_time, run_main, save_result)

CONFIGS = [   # (name, gram keywords)
    ("gap", dict(pooling="gap")),
    ("gap + flip", dict(pooling="gap", flip=True)),
    ("flatten", dict(pooling="flatten")),
    ("lap c=4", dict(pooling="lap", lap_window=4)),
    ("lap c=8", dict(pooling="lap", lap_window=8)),
    ("lap c=16", dict(pooling="lap", lap_window=16)),
    ("lap c=32", dict(pooling="lap", lap_window=32)),
    ("lap c=8 + flip", dict(pooling="lap", lap_window=8, flip=True)),
    ("myrtle5", dict(architecture="myrtle5")),
    ("myrtle5 + flip", dict(architecture="myrtle5", flip=True)),
]


def run(args, prog="bench_readouts.py"):
    import cntk_engine as ce
    check_out_dir(args.out_dir, "--out-dir")
    x = np.random.default_rng(0).standard_normal((args.n, 3, 32, 32)).astype(np.float32)
    pairs = args.n * (args.n + 1) // 2
    rows = []
    for name, kw in CONFIGS:
        kw = dict(kw, kernel="both", backend=args.backend)
        if "architecture" not in kw:
            kw["depth"] = args.depth
        try:
            ce.gram(x[:2], **kw)                      # kernels loaded outside the timing
            sec, times = median_time(lambda: ce.gram(x, **kw), repeats=args.repeats, warmup=0)
        except (ValueError, RuntimeError) as e:
            rows.append({"config": name, "unavailable": str(e)})
            print(f"{name}: unavailable: {e}")
            continue
        rows.append({"config": name, "seconds": sec, "times": times, "pairs": pairs,
                     "unique_pairs_per_s": pairs / sec})
    if not any("seconds" in r for r in rows):
        reasons = list(dict.fromkeys(r["unavailable"] for r in rows))
        finish(prog, f"nothing was measured: all {len(rows)} configurations unavailable ("
               + ("; ".join(reasons[:2]) + ("; ..." if len(reasons) > 2 else "")) + "); nothing written")
    gap = next((r for r in rows if r["config"] == "gap" and "seconds" in r), None)
    for r in rows:
        if gap is not None and "seconds" in r and "architecture" not in dict(CONFIGS)[r["config"]]:
            r["relative_to_gap"] = r["unique_pairs_per_s"] / gap["unique_pairs_per_s"]
        if "seconds" in r:
            print(f"{r['config']:16s} {r['unique_pairs_per_s']:10.4g} pairs/s"
                  + (f"  {r['relative_to_gap']:.2f} x gap" if "relative_to_gap" in r else ""))
    return save_result(args.out_dir, f"readouts_{args.backend}", {
        "workload": f"symmetric Gram of {args.n} random 32x32x3 images, NTK+NNGP, float32, CNN "
                    f"depth {args.depth}", "backend": args.backend, "results": rows})


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int_at_least(2), default=16)
    ap.add_argument("--depth", type=int_at_least(2), default=6, help="of the CNN configurations")
    ap.add_argument("--backend", default="numba", choices=BACKENDS)
    ap.add_argument("--repeats", type=int_at_least(1), default=3)
    ap.add_argument("--out-dir", default=str(RESULTS))
    return run_main(ap, lambda args: run(args, ap.prog), argv)


if __name__ == "__main__":
    main()
