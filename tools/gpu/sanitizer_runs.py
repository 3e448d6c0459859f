"""Small Grams of every CUDA kernel variant, for compute-sanitizer (gpu_session.sh's sanitizer
phase runs this under memcheck, then ``--small`` under racecheck, synccheck and initcheck).

    compute-sanitizer --tool memcheck python tools/gpu/sanitizer_runs.py --kernels v3,v6 --part stack
    compute-sanitizer --tool racecheck python tools/gpu/sanitizer_runs.py --kernels v3 --small
    python tools/gpu/sanitizer_runs.py --backend numba      # the same calls on the CPU: a dry run

Why these runs: each launch path of the extension once per variant, at sizes the sanitizer's
slowdown allows.  CNN kernel: the general path (9 x 7), the 32 x 32 path, float64, filter 5,
two depths, flatten, the LAP readout (the listed-grid kernel) and flips.  Stack kernel (of the
variants that have one of their own; v7 and v8 launch their base's, which runs in their place,
once): Myrtle-5 in both dtypes
and with the two-block candidate, a flatten stack (the per-entry readout weights) and a stack
whose coarse levels are odd (28 -> 14 -> 7: a round that pools one grid).

CuPy's memory pool is switched off first (``cupy.cuda.set_allocator(None)``): the pool rounds
allocations up to 512 bytes and hands out parts of larger blocks, so an access past the end of
an array usually lands in memory that memcheck counts as valid.  With no pool, every array is its
own ``cudaMalloc`` and memcheck sees its exact bounds.

The diagonals are computed by NumPy on the host and copied to the GPU (every run): a pooled
stack's take thousands of small CuPy operations per image set, each of which is
an instrumented launch under the sanitizer (and, with the pool off, a cudaMalloc and a
synchronising cudaFree), seconds per set spent on CuPy's kernels, which are not what is checked
here.  ``--part stack`` (the kernel that has not run on a GPU: gpu_session.sh runs it first, in a
sanitizer call of its own) or ``cnn`` runs one kernel's Grams [both].

``--small`` keeps one 32 x 32 CNN Gram of two images (the path of v7's barrier per layer) and
Myrtle-5 on two images: racecheck and synccheck instrument every shared-memory access and barrier,
and what they look for (hazards between the threads of a block, barriers some threads miss) the
host emulation of the kernels (tests/cuda_sim.py) cannot see, since it runs a block's threads one
after another.
"""
from __future__ import annotations

import argparse
import os
import sys

import numpy as np


def cnn_runs(ce, backend: str, small: bool) -> None:
    r = np.random.default_rng(0)
    y = r.standard_normal((2, 3, 32, 32))
    if small:
        print("  32x32 gap", ce.gram(y, depth=2, backend=backend)[0])
        return
    x = r.standard_normal((3, 2, 9, 7))
    k = ce.gram(x, depths=[2, 4], backend=backend, kernel="both")
    k2 = ce.gram(x[:2], x, depth=3, backend=backend, pooling="flatten", dtype="float64")
    k3 = ce.gram(y, depth=3, backend=backend)
    k4 = ce.gram(y[:1], y, depth=3, backend=backend, dtype="float64", filter_size=5)
    print("  general / 32x32 / float64 / filter 5", k[4][0][0, :2], k2[0, :2], k3[0], k4[0])
    k5 = ce.gram(x, depth=3, backend=backend, pooling="lap", lap_window=3, flip=True)
    k6 = ce.gram(y[:1], y, depth=3, backend=backend, pooling="lap", lap_window=4, dtype="float64")
    k7 = ce.gram(x[:2], x, depth=3, backend=backend, pooling="flatten", flip=True)
    print("  lap / flip", k5[0, :2], k6[0], k7[0, :2])


def stack_runs(ce, backend: str, small: bool, stack_blocks_env: str) -> None:
    from cntk_engine.arch import AvgPool, ConvRelu, serial
    r = np.random.default_rng(1)
    y = r.standard_normal((2, 3, 32, 32))
    print("  myrtle5 float32", ce.gram(y, architecture="myrtle5", backend=backend)[0])
    if small:
        return
    print("  myrtle5 float64", ce.gram(y, architecture="myrtle5", backend=backend, dtype="float64")[0])
    c, pool = ConvRelu(), AvgPool(2)
    flat = ce.gram(y[:1], y, architecture=serial(c, pool, c, pool, c), pooling="flatten", backend=backend)
    m = r.standard_normal((2, 1, 28, 28))
    odd = ce.gram(m, architecture=serial(c, pool, c, pool, c), backend=backend)
    print("  flatten stack / odd coarse levels", flat[0], odd[0])
    if backend == "cuda":
        os.environ[stack_blocks_env] = "2"
        try:
            print("  myrtle5, two blocks per SM", ce.gram(y, architecture="myrtle5", backend=backend)[0])
        finally:
            del os.environ[stack_blocks_env]


def diagonals_on_the_host() -> None:
    """The CUDA backend's diagonals by NumPy, copied to the GPU (the module docstring says why)."""
    import cupy
    from cntk_engine import diag
    from cntk_engine.backends import cuda
    cuda.diag_norms = lambda x, arch, params: cupy.asarray(
        diag.diag_norms(cupy.asnumpy(x), arch, params, keep=False))


def switch_off_cupy_pool() -> None:
    """Every CuPy array its own cudaMalloc, so that memcheck sees its exact bounds (above)."""
    import cupy
    cupy.cuda.set_allocator(None)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--kernels", default="", help="comma list of CUDA kernel variants [every compiled one]")
    ap.add_argument("--small", action="store_true", help="the racecheck / synccheck runs only")
    ap.add_argument("--part", default="both", choices=("cnn", "stack", "both"),
                    help="the CNN kernel's Grams, the stack kernel's, or both [both]")
    ap.add_argument("--backend", default="cuda", choices=("cuda", "numba"),
                    help="numba: the same calls on the CPU, a dry run of this script [cuda]")
    args = ap.parse_args(argv)
    import cntk_engine as ce
    kernel_env = stack_blocks_env = None
    if args.backend == "cuda":
        switch_off_cupy_pool()
        diagonals_on_the_host()
        from cntk_engine.backends.cuda import KERNEL_ENV as kernel_env, STACK_BLOCKS_ENV as stack_blocks_env
        from cntk_engine.backends.cuda import kernel_variants
        variants = kernel_variants()
        compiled = [v["name"] for v in variants]
        base = {v["name"]: v["base"] for v in variants}
        names = [k for k in args.kernels.split(",") if k] or compiled
        unknown = [k for k in names if k not in compiled]
        if unknown:
            ap.error(f"--kernels {','.join(unknown)}: not compiled; compiled: {','.join(compiled)}")
    else:       # numba has one kernel; --kernels names CUDA variants
        names, base = ["numba"], {"numba": "numba"}
    cnn = names if args.part != "stack" else []
    # the stack kernels the variants launch (v7's and v8's are their bases'), each once
    stacks = list(dict.fromkeys(base[v] for v in names)) if args.part != "cnn" else []
    if not cnn and not stacks:
        ap.error(f"--kernels {args.kernels!r} --part {args.part}: nothing to run")
    for v in cnn:
        if kernel_env:
            os.environ[kernel_env] = v
        print(v, "CNN kernel:")
        cnn_runs(ce, args.backend, args.small)
    # the stack kernel last, after every variant's CNN kernel (an error it makes ends the process)
    for v in stacks:
        if kernel_env:
            os.environ[kernel_env] = v
        print(v, "stack kernel:")
        stack_runs(ce, args.backend, args.small, stack_blocks_env)
    print("sanitizer runs done")
    return 0


if __name__ == "__main__":
    sys.exit(main())
