"""The arithmetic ceiling: operations per pair (counted from the kernel code) and the device's
measured FP32 / FP64 rate (an FMA loop).  The count, line by line: docs/gpu_performance.md.

    python -m bench.ceiling              # measure this machine's CPU FMA rate (numba)
    python -m bench.ceiling --gpu        # and the GPU's (CuPy RawKernel), if CuPy works

Two ceilings are reported for a run that computes ``pairs_per_s`` unique pairs per second:

* ``fraction_of_ceiling``: FP instructions issued per second by the algorithm (every FMA, mul,
  add and sqrt counted as one instruction, at the FMA loop's rate) over the measured FMA rate.
  1.0 means every FP issue slot of the device did useful work of the fused per-offset algorithm.
* ``fraction_of_peak_flops``: useful flops (an FMA = 2) over the measured peak flop rate.
  Since only 15 of the 34 instructions per entry and layer are FMAs, this one cannot exceed
  49 / 68 = 0.72.

Both count the *useful* work of the fused algorithm for the same output (H^2 W^2 entries per
layer for gap, H W for flatten), whatever method produced it, so methods compare on one scale.
"""
from __future__ import annotations

import argparse
import json
import time
from dataclasses import dataclass

import numpy as np

# ---------------------------------------------------------------------------- the count
# Per entry and layer, float32 path of cntk_engine/backends/numba_cpu.py (pair_kernel's layer
# loop: relu_row, and the box sums hbox_flat + vbox_flat), k = filter size; derived line by
# line in docs/gpu_performance.md.
RELU_STEP = {"fma": 9, "mul": 8, "add": 4, "sqrt": 2, "other": 5}


def box_ops(k: int) -> dict:
    """One k x k box sum per entry: (k-1) masked FMAs (row pass), (k-1) adds + 1 FMA (column
    pass with scale and shift)."""
    return {"fma": k, "add": k - 1}


def layer_update_ops(k: int) -> dict:
    """Between layers: box(K) and box(G), then Theta += Sigma (one add)."""
    b = box_ops(k)
    return {"fma": 2 * b["fma"], "add": 2 * b["add"] + 1}


def first_layer_ops(channels: int, k: int) -> dict:
    """Layer-1 input: C channel products (FMA) and one box."""
    b = box_ops(k)
    return {"fma": channels + b["fma"], "add": b["add"]}


def _add(*ds, scale=None):
    out = {}
    for d, s in zip(ds, scale or [1] * len(ds)):
        for key, v in d.items():
            out[key] = out.get(key, 0) + s * v
    return out


@dataclass(frozen=True)
class Work:
    entries: int          # entries per layer per pair
    layers: int           # ReLU layers L = max depth - 1
    ops: dict             # per pair, by kind

    @property
    def fp_instructions(self) -> int:
        return self.ops.get("fma", 0) + self.ops.get("mul", 0) + self.ops.get("add", 0) + self.ops.get("sqrt", 0)

    @property
    def flops(self) -> int:
        return 2 * self.ops.get("fma", 0) + self.ops.get("mul", 0) + self.ops.get("add", 0) + self.ops.get("sqrt", 0)


def work_per_pair(max_depth: int, height: int, width: int, channels: int = 3, pooling: str = "gap",
                  filter_size: int = 3) -> Work:
    """Operations of one pair through ``max_depth - 1`` layers (the fused algorithm's count)."""
    L = max_depth - 1
    entries = (height * width) ** 2 if pooling == "gap" else height * width
    per_entry = _add(first_layer_ops(channels, filter_size), RELU_STEP, layer_update_ops(filter_size),
                     scale=[1, L, L - 1])
    return Work(entries, L, {k: v * entries for k, v in per_entry.items()})


def ceiling_figures(pairs_per_s: float, work: Work, rate: dict | None) -> dict:
    """Fractions of the measured ceiling for a run (empty dict when no rate was measured)."""
    if not rate or not rate.get("fma_per_s"):
        return {}
    fma_rate = rate["fma_per_s"]
    ceiling = fma_rate / work.fp_instructions
    return {"ceiling_pairs_per_s": ceiling,
            "fraction_of_ceiling": pairs_per_s / ceiling,
            "fraction_of_peak_flops": pairs_per_s * work.flops / (2.0 * fma_rate)}


# ------------------------------------------------------------------------- CPU FMA rate
_CPU_KERNELS = {}


def _cpu_kernel():
    if "k" not in _CPU_KERNELS:
        from numba import njit, prange

        @njit(parallel=True, fastmath=True)
        def fma_loop(n_iter, out, a, b, width):
            nt = out.shape[0]
            for t in prange(nt):
                acc = np.empty(width, dtype=out.dtype)
                for j in range(width):
                    acc[j] = out[t] + j
                for _ in range(n_iter):
                    for j in range(width):   # `width` independent chains, vectorised; 16
                        x = acc[j]           # dependent FMAs per load/store keep them in registers
                        x = x * a + b; x = x * a + b; x = x * a + b; x = x * a + b  # noqa: E702
                        x = x * a + b; x = x * a + b; x = x * a + b; x = x * a + b  # noqa: E702
                        x = x * a + b; x = x * a + b; x = x * a + b; x = x * a + b  # noqa: E702
                        x = x * a + b; x = x * a + b; x = x * a + b; x = x * a + b  # noqa: E702
                        acc[j] = x
                s = out.dtype.type(0)
                for j in range(width):
                    s += acc[j]
                out[t] = s

        _CPU_KERNELS["k"] = fma_loop
    return _CPU_KERNELS["k"]


def measure_cpu(dtype="float32", seconds: float = 1.0, width: int = 64) -> dict:
    """FMA/s of all numba threads on independent vectorised FMA chains."""
    import numba
    dt = np.dtype(dtype)
    fn = _cpu_kernel()
    nt = numba.get_num_threads()
    out = np.zeros(nt, dtype=dt)
    a, b = dt.type(0.999999), dt.type(1e-7)
    fn(10, out, a, b, width)                         # compile
    n = 64
    while True:
        t = time.perf_counter()
        fn(n, out, a, b, width)
        el = time.perf_counter() - t
        if el > seconds / 4 or n > 1 << 30:
            break
        n *= 4
    best = el
    for _ in range(2):
        t = time.perf_counter()
        fn(n, out, a, b, width)
        best = min(best, time.perf_counter() - t)
    fma = n * width * 16 * nt
    return {"device": "cpu", "dtype": dt.name, "threads": nt, "fma_per_s": fma / best,
            "flops_per_s": 2 * fma / best, "method": f"numba prange FMA loop, {width} chains x 16 FMAs/thread"}


# ------------------------------------------------------------------------- GPU FMA rate
_GPU_SRC = r"""
extern "C" __global__ void fma_loop(T* out, long n_iter, T a, T b) {
    T x0 = threadIdx.x, x1 = x0 + 1, x2 = x0 + 2, x3 = x0 + 3,
      x4 = x0 + 4, x5 = x0 + 5, x6 = x0 + 6, x7 = x0 + 7;
    for (long i = 0; i < n_iter; ++i) {
        x0 = x0 * a + b; x1 = x1 * a + b; x2 = x2 * a + b; x3 = x3 * a + b;
        x4 = x4 * a + b; x5 = x5 * a + b; x6 = x6 * a + b; x7 = x7 * a + b;
    }
    out[blockIdx.x * blockDim.x + threadIdx.x] = x0 + x1 + x2 + x3 + x4 + x5 + x6 + x7;
}
"""


def measure_gpu(dtype="float32", seconds: float = 0.5) -> dict:
    """FMA/s of the current CUDA device: 8 independent FMA chains per thread, many blocks."""
    import cupy
    dt = np.dtype(dtype)
    ctype = "float" if dt == np.float32 else "double"
    kern = cupy.RawKernel("#define T " + ctype + "\n" + _GPU_SRC, "fma_loop")
    dev = cupy.cuda.Device()
    sms = dev.attributes["MultiProcessorCount"]
    threads, blocks = 256, sms * 16
    out = cupy.zeros(threads * blocks, dtype=dt)
    a, b = dt.type(0.999999), dt.type(1e-7)
    kern((blocks,), (threads,), (out, np.int64(16), a, b))
    dev.synchronize()
    n = 1 << 12
    start, stop = cupy.cuda.Event(), cupy.cuda.Event()
    while True:
        start.record()
        kern((blocks,), (threads,), (out, np.int64(n), a, b))
        stop.record()
        stop.synchronize()
        el = cupy.cuda.get_elapsed_time(start, stop) / 1e3
        if el > seconds / 4 or n > 1 << 30:
            break
        n *= 4
    best = el
    for _ in range(2):
        start.record()
        kern((blocks,), (threads,), (out, np.int64(n), a, b))
        stop.record()
        stop.synchronize()
        best = min(best, cupy.cuda.get_elapsed_time(start, stop) / 1e3)
    fma = n * 8 * threads * blocks
    return {"device": "gpu", "dtype": dt.name, "sms": sms, "fma_per_s": fma / best,
            "flops_per_s": 2 * fma / best, "method": "CuPy RawKernel, 8 FMA chains/thread, "
            f"{blocks} blocks x {threads} threads"}


def measure(device: str, dtypes=("float32", "float64")) -> dict:
    """{dtype: rate dict} for 'cpu' or 'gpu'; a dtype that fails is recorded with the reason."""
    out = {}
    for dt in dtypes:
        try:
            out[dt] = measure_cpu(dt) if device == "cpu" else measure_gpu(dt)
        except Exception as e:  # report, never invent
            out[dt] = {"unavailable": f"{type(e).__name__}: {e}"}
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--gpu", action="store_true", help="also measure the GPU (CuPy)")
    from .common import run_main
    return run_main(ap, run, argv)


def run(args):
    res = {"cpu": measure("cpu")}
    if args.gpu:
        res["gpu"] = measure("gpu")
    w = work_per_pair(21, 32, 32)
    res["work_gap_d21_32x32"] = {"fp_instructions": w.fp_instructions, "flops": w.flops, "ops": w.ops}
    print(json.dumps(res, indent=2))


if __name__ == "__main__":
    main()
