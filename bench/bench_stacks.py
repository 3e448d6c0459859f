"""Pooling stacks (the Myrtle networks) on the CPU: cntk_engine's numba backend vs
neural-tangents, side by side in one run, with the memory the engine needs.

    python bench/bench_stacks.py [--architectures myrtle5,myrtle10] [--n 16] [--nt-n 4] \
        [--nt-python /path/to/python-with-neural-tangents]

Workload: the symmetric Gram of N random 32x32x3 images, NTK + NNGP, float32, each Myrtle
network as neural-tangents' notebook builds it.  Reported per architecture: the engine's unique
pairs per second (it computes each of the N(N+1)/2 pairs once), neural-tangents' pairs evaluated
per second (``kernel_fn(x, None)`` computes all N^2 ordered pairs) and their ratio, in wall
time and in process CPU time (every thread counted: a ratio that other load on the machine does
not move), the pairs each method computes; an exactness check (our float64 kernel of neural-tangents' own images
against its values); the engine's memory: the per-pair working set of the numba kernel (its
per-thread buffers, counted) and the peak resident memory of a process computing one tile
(measured, VmHWM).  Writes <out-dir>/stacks_cpu_<date>.json and .png.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

if __package__ in (None, ""):
    sys.path.append(str(Path(__file__).resolve().parents[1]))
from bench.common import (RESULTS, check_out_dir, choice_list, int_at_least, machine,  # noqa: E402
                          median_time, new_stem, result_header, run_main, run_snippet, versions,
                          write_json)

ARCHITECTURES = ("myrtle5", "myrtle7", "myrtle10")

NT_SNIPPET = r"""
import json, os, sys, time
import numpy as np
import jax
# exact float32 convolutions on GPUs too (JAX's default there may use TF32 tensor cores)
precision = os.environ.get("CNTK_BENCH_NT_PRECISION", "highest")
jax.config.update("jax_default_matmul_precision", precision)
sys.path.insert(0, sys.argv[4])
import nt_compat
nt_compat.install()
from neural_tangents import stax
n, depth, reps = (int(a) for a in sys.argv[1:4])
f = {5: (2, 1, 1), 7: (2, 2, 2), 10: (3, 3, 3)}[depth]
conv = lambda: stax.Conv(1, (3, 3), padding="SAME")
pool = lambda: stax.AvgPool((2, 2), strides=(2, 2))
layers = [conv(), stax.Relu()] * f[0] + [pool()] + [conv(), stax.Relu()] * f[1] + [pool()]
layers += [conv(), stax.Relu()] * f[2] + [pool()] * 3 + [stax.Flatten(), stax.Dense(1)]
_, _, kernel_fn = stax.serial(*layers)
kernel_fn = jax.jit(kernel_fn, static_argnames="get")
x = np.random.default_rng(0).standard_normal((n, 32, 32, 3)).astype(np.float32)
kernel_fn(x, None, get=("ntk", "nngp")).ntk.block_until_ready()   # compile + warm-up
times, cpu = [], []
for _ in range(reps):
    t, c = time.perf_counter(), time.process_time()
    k = kernel_fn(x, None, get=("ntk", "nngp"))
    k.ntk.block_until_ready()
    times.append(time.perf_counter() - t)
    cpu.append(time.process_time() - c)
np.savez(sys.argv[5], x=x, ntk=np.asarray(k.ntk), nngp=np.asarray(k.nngp))
import neural_tangents
print(json.dumps({"seconds": sorted(times)[len(times) // 2], "times": times,
                  "cpu_seconds": sorted(cpu)[len(cpu) // 2],
                  "version": neural_tangents.__version__, "jax": jax.__version__,
                  "jax_device": str(jax.devices()[0]), "nt_compat": nt_compat.PATCHED,
                  "jax_default_matmul_precision": precision}))
"""

PEAK_SNIPPET = r"""
import json, sys
import numpy as np
import cntk_engine as ce
def hwm():
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
name, n = sys.argv[1], int(sys.argv[2])
x = np.random.default_rng(1).standard_normal((n, 3, 32, 32)).astype(np.float32)
ce.gram(x[:1], architecture=name, backend="numba")       # kernel loaded, buffers of one pair
before = hwm()
ce.gram(x, architecture=name, backend="numba", kernel="both", tile=n)
print(json.dumps({"before": before, "after": hwm()}))
"""


def pair_working_set(name: str, dtype=np.float32) -> dict:
    """Bytes the numba kernel allocates per pair of a stack (each thread holds one pair's at a time)."""
    from cntk_engine.arch import make_architecture
    arch = make_architecture(architecture=name)
    stages, _, _ = arch.plan(32, 32)
    item = np.dtype(dtype).itemsize
    h, w, c, L, r = 32, 32, 3, arch.n_layers, arch.filter_size // 2
    acc = max((st.height * st.width) ** 2 for st in stages[1:]) if len(stages) > 1 else 1
    k = arch.filter_size
    # the pooled stages' inputs are float64 in both kernels, and the float64 kernel keeps their
    # compensation (2 more), backends/numba_cpu.py
    pooled = (6 if np.dtype(dtype) == np.float64 else 4) * acc * 8
    parts = {"pooled K and G of two stages (float64; with the float64 kernel's compensation)": pooled,
             "x diagonals packed, z image and diagonals rotated": (c + 4 * L) * h * w * item,
             "flat grid buffers (K, G, Sigma, Theta, box rows, tiled seam mask, pooled rows)":
                 (2 * ((h + 2 * r) * w + 2 * r) + 2 * h * w + (h + 2 * r) * w + k * w
                  + k * (h + 2 * r) * w + 3 * w) * item}
    return {"bytes": sum(parts.values()), "parts": parts}


def bench_engine(name, n, repeats, dtype="float32"):
    """Median wall and process CPU seconds of the symmetric Gram (CPU seconds count every
    thread of this process, so the ratio to neural-tangents' is not moved by other load)."""
    import time

    import cntk_engine as ce
    x = np.random.default_rng(0).standard_normal((n, 3, 32, 32)).astype(np.float32)
    ce.gram(x[:2], architecture=name, backend="numba", dtype=dtype)     # kernel loaded
    cpu = []

    def run():
        c = time.process_time()
        ce.gram(x, architecture=name, kernel="both", backend="numba", dtype=dtype)
        cpu.append(time.process_time() - c)

    sec, times = median_time(run, repeats=repeats, warmup=0)
    from cntk_engine.backends.numba_cpu import num_threads
    return {"seconds": sec, "times": times, "cpu_seconds": sorted(cpu)[len(cpu) // 2],
            "threads": num_threads()}


def bench_nt(python, n, depth, repeats, save):
    """Time neural-tangents' Myrtle network in ``python``; its images and kernels go to ``save``."""
    return run_snippet(python, NT_SNIPPET, [n, depth, repeats, Path(__file__).resolve().parent, save])


def peak_memory(name, n) -> dict:
    out = subprocess.run([sys.executable, "-c", PEAK_SNIPPET, name, str(n)], capture_output=True,
                         text=True, timeout=3600, cwd=tempfile.gettempdir())
    if out.returncode != 0:
        return {"unavailable": out.stderr.strip()[-300:]}
    m = json.loads(out.stdout.strip().splitlines()[-1])
    return {"tile": n, "tile_pairs": n * (n + 1) // 2, "peak_rss_growth_bytes": m["after"] - m["before"],
            "peak_rss_bytes": m["after"]}


def check_against_nt(name, saved) -> float:
    """Largest relative difference of our float64 kernels of NT's images from NT's values."""
    import cntk_engine as ce
    with np.load(saved) as f:
        x = f["x"].transpose(0, 3, 1, 2).astype(np.float64)
        ours = ce.gram(x, architecture=name, kernel="both", backend="numba", dtype="float64",
                       convention="neural_tangents", W_std=1.0)     # stax's default W_std
        return max(float(np.abs(a - f[k]).max() / np.abs(f[k]).max()) for a, k in zip(ours, ("ntk", "nngp")))


def plot(payload, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    rows = [r for r in payload["results"] if "speedup" in r]
    if not rows:
        return None
    fig, ax = plt.subplots(figsize=(6, 3.6))
    xs = np.arange(len(rows))
    ax.bar(xs - 0.2, [r["engine"]["unique_pairs_per_s"] for r in rows], 0.4, label="cntk_engine numba (unique pairs/s)")
    ax.bar(xs + 0.2, [r["neural_tangents"]["pairs_evaluated_per_s"] for r in rows], 0.4,
           label="neural-tangents (pairs evaluated/s)")
    for i, r in enumerate(rows):
        ax.text(i, r["engine"]["unique_pairs_per_s"] * 1.1, f"{r['speedup']:.0f}x", ha="center")
    ax.set_yscale("log")
    ax.set_xticks(xs, [r["architecture"] for r in rows])
    ax.set_ylabel("pairs per second (float32, 32x32x3)")
    ax.set_title(f"CPU: {payload['machine']['cpu']} ({payload['machine']['cores']} cores), {payload['commit']}",
                 fontsize=8)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--architectures", type=choice_list(ARCHITECTURES), default="myrtle5,myrtle10")
    ap.add_argument("--n", type=int_at_least(2), default=16, help="images (engine)")
    ap.add_argument("--nt-n", type=int_at_least(1), default=4,
                    help="images (neural-tangents: its memory grows as N^2 (HW)^2)")
    ap.add_argument("--repeats", type=int_at_least(1), default=3)
    ap.add_argument("--nt-python", default=sys.executable)
    ap.add_argument("--out-dir", default=str(RESULTS))
    ap.add_argument("--name", default="stacks_cpu")
    return run_main(ap, run, argv)


def run(args):
    out_dir = check_out_dir(args.out_dir, "--out-dir")
    rows = []
    for name in args.architectures:
        depth = int(name[len("myrtle"):])
        eng = bench_engine(name, args.n, args.repeats)
        eng.update(n=args.n, pairs=args.n * (args.n + 1) // 2,
                   unique_pairs_per_s=args.n * (args.n + 1) / 2 / eng["seconds"],
                   unique_pairs_per_cpu_s=args.n * (args.n + 1) / 2 / eng["cpu_seconds"])
        with tempfile.TemporaryDirectory() as tmp:
            saved = Path(tmp) / "nt.npz"
            nt = bench_nt(args.nt_python, args.nt_n, depth, args.repeats, saved)
            if "seconds" in nt:
                nt.update(n=args.nt_n, pairs=args.nt_n ** 2,
                          pairs_evaluated_per_s=args.nt_n ** 2 / nt["seconds"],
                          pairs_evaluated_per_cpu_s=args.nt_n ** 2 / nt["cpu_seconds"],
                          max_rel_diff_vs_our_float64=check_against_nt(name, saved))
        row = {"architecture": name, "engine": eng, "neural_tangents": nt,
               "memory": {"per_pair": pair_working_set(name), "per_tile": peak_memory(name, args.n)}}
        if "seconds" in nt:
            row["speedup"] = eng["unique_pairs_per_s"] / nt["pairs_evaluated_per_s"]
            row["speedup_cpu_time"] = eng["unique_pairs_per_cpu_s"] / nt["pairs_evaluated_per_cpu_s"]
        rows.append(row)
        print(f"{name}: engine {eng['unique_pairs_per_s']:.4g} pairs/s"
              + (f", neural-tangents {nt['pairs_evaluated_per_s']:.4g} pairs/s, {row['speedup']:.0f}x "
                 f"(per CPU second {row['speedup_cpu_time']:.0f}x) "
                 f"(their kernel vs our float64: {nt['max_rel_diff_vs_our_float64']:.1e})"
                 if "seconds" in nt else f", neural-tangents unavailable: {nt['unavailable']}")
              + f"; {row['memory']['per_pair']['bytes'] / 2**20:.2f} MiB per pair in flight")
    payload = {**result_header(), "workload": "symmetric Gram of N random 32x32x3 images, NTK+NNGP, float32",
               "machine": machine(), "versions": versions(), "results": rows}
    stem = new_stem(out_dir, args.name)
    write_json(Path(f"{stem}.json"), payload)
    png = plot(payload, Path(f"{stem}.png"))
    print(f"wrote {stem}.json" + (f" and {png}" if png else ""))
    return payload


if __name__ == "__main__":
    main()
