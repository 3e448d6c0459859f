"""CPU throughput: cntk_engine's Numba backend vs neural-tangents, side by side in one run;
and the neural-tangents runner the harness uses (``bench_nt``).

    python bench/bench_cpu.py [--n 16] [--depth 6] [--nt-python /path/to/python]

The workload is the symmetric Gram of N random 32x32x3 images, GAP, NTK + NNGP, float32.
neural-tangents (optional) is measured in a subprocess (``--nt-python``, default: this Python
if it can import neural_tangents), so that it can live in its own environment (JAX 0.4.x, or a
current JAX through ``nt_compat.py``); without it the bench says so and reports the engine
alone.  Reports entries/s (N*N matrix entries per second) and unique pairs/s (N(N+1)/2 per
second); writes <out-dir>/cpu_<date>.json.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

if __package__ in (None, ""):
    sys.path.append(str(Path(__file__).resolve().parents[1]))
from bench.common import (RESULTS, check_out_dir, int_at_least, machine, median_time,  # noqa: E402
                          new_stem, result_header, run_main, run_snippet, write_json)

NT_SNIPPET = r"""
import json, os, sys, time
import numpy as np
import jax
# exact float32 convolutions on GPUs too (JAX's default there may use TF32 tensor cores)
precision = os.environ.get("CNTK_BENCH_NT_PRECISION", "highest")
jax.config.update("jax_default_matmul_precision", precision)
sys.path.insert(0, sys.argv[5])
import nt_compat                      # neural-tangents 0.6.5 under JAX >= 0.7: see nt_compat.py
nt_compat.install()
from neural_tangents import stax
n, depth, size, reps = (int(a) for a in sys.argv[1:5])
layers = []
for _ in range(depth - 1):
    layers += [stax.Conv(1, (3, 3), padding="SAME"), stax.Relu()]
_, _, kernel_fn = stax.serial(*layers, stax.GlobalAvgPool(), stax.Dense(1))
kernel_fn = jax.jit(kernel_fn, static_argnames="get")
x = np.random.default_rng(0).standard_normal((n, size, size, 3)).astype(np.float32)
kernel_fn(x, None, get=("ntk", "nngp")).ntk.block_until_ready()   # compile + warm-up
times = []
for _ in range(reps):
    t = time.perf_counter()
    k = kernel_fn(x, None, get=("ntk", "nngp"))
    k.ntk.block_until_ready()
    times.append(time.perf_counter() - t)
if len(sys.argv) > 6:                 # keep the images and kernels for an exactness check
    np.savez(sys.argv[6], x=x, ntk=np.asarray(k.ntk), nngp=np.asarray(k.nngp))
import neural_tangents
print(json.dumps({"seconds": sorted(times)[len(times) // 2], "times": times,
                  "version": neural_tangents.__version__, "jax": jax.__version__,
                  "jax_device": str(jax.devices()[0]), "nt_compat": nt_compat.PATCHED,
                  "jax_default_matmul_precision": precision}))
"""


def bench_engine(n, depth, size, repeats):
    import cntk_engine as ce
    x = np.random.default_rng(0).standard_normal((n, 3, size, size)).astype(np.float32)
    ce.gram(x[:2], depth=depth, kernel="both")          # JIT compile outside the timing
    sec, times = median_time(lambda: ce.gram(x, depth=depth, kernel="both", backend="numba"),
                             repeats=repeats, warmup=0)
    from cntk_engine.backends.numba_cpu import num_threads
    return {"seconds": sec, "times": times, "threads": num_threads()}


def bench_nt(python, n, depth, size, repeats, save=None):
    """Time neural-tangents in ``python``; ``save``: an .npz path for its images and kernels."""
    return run_snippet(python, NT_SNIPPET, [n, depth, size, repeats, Path(__file__).resolve().parent]
                       + ([save] if save else []))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int_at_least(1), default=16, help="images (engine)")
    ap.add_argument("--nt-n", type=int_at_least(1), default=4,
                    help="images (neural-tangents; its memory grows as N^2 (HW)^2)")
    ap.add_argument("--depth", type=int_at_least(2), default=6)
    ap.add_argument("--size", type=int_at_least(1), default=32)
    ap.add_argument("--repeats", type=int_at_least(1), default=3)
    ap.add_argument("--nt-python", default=sys.executable)
    ap.add_argument("--out-dir", default=str(RESULTS))
    return run_main(ap, run, argv)


def run(args):
    check_out_dir(args.out_dir, "--out-dir")
    eng = bench_engine(args.n, args.depth, args.size, args.repeats)
    nt = bench_nt(args.nt_python, args.nt_n, args.depth, args.size, args.repeats)
    rows = []
    for name, n, res in (("cntk_engine numba float32", args.n, eng), ("neural-tangents", args.nt_n, nt)):
        if "seconds" not in res:
            rows.append({"method": name, "unavailable": res["unavailable"]})
            continue
        rows.append({"method": name, "n": n, "seconds": res["seconds"],
                     "entries_per_s": n * n / res["seconds"],
                     "unique_pairs_per_s": n * (n + 1) / 2 / res["seconds"],
                     **{k: v for k, v in res.items() if k not in ("seconds",)}})
    payload = {"workload": f"{args.size}x{args.size}x3 GAP depth {args.depth}, NTK+NNGP, float32, symmetric Gram",
               "machine": machine(), "results": rows}
    if all("entries_per_s" in r for r in rows):
        ours, theirs = rows
        # the project's metric: unique pairs/s (N(N+1)/2 per second); per pair each method
        # computes (neural-tangents evaluates all N^2 ordered pairs: its entries/s); and the
        # entries/s of the two Grams (which credits numba with the entries it mirrors)
        payload["speedup_unique_pairs_per_s"] = ours["unique_pairs_per_s"] / theirs["unique_pairs_per_s"]
        payload["speedup_per_pair_computed"] = ours["unique_pairs_per_s"] / theirs["entries_per_s"]
        payload["speedup_entries_per_s"] = ours["entries_per_s"] / theirs["entries_per_s"]
    path = write_json(Path(str(new_stem(args.out_dir, "cpu")) + ".json"), {**result_header(), **payload})
    print(f"machine: {payload['machine']['cpu']} ({payload['machine']['cores']} cores)")
    print(f"workload: {payload['workload']}")
    for r in rows:
        if "unavailable" in r:
            print(f"  {r['method']:28s} not measured: {r['unavailable']}")
        else:
            print(f"  {r['method']:28s} N={r['n']:4d}  {r['entries_per_s']:10.2f} entries/s  "
                  f"{r['unique_pairs_per_s']:10.2f} unique pairs/s")
    if "speedup_entries_per_s" in payload:
        print(f"  speed-up: {payload['speedup_unique_pairs_per_s']:.1f}x in unique pairs/s (the "
              f"project's metric); {payload['speedup_per_pair_computed']:.1f}x per pair each "
              f"computes; {payload['speedup_entries_per_s']:.1f}x in entries/s")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
