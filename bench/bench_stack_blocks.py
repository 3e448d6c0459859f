"""The CUDA stack kernel's two register budgets, timed side by side on one GPU (Myrtle, float32).

    python bench/bench_stack_blocks.py [--n 128] [--architectures myrtle5,myrtle10] [--out DIR]

The 32 x 32 float32 stack kernel compiles without spills at ~230 registers (one 8-warp block
per multiprocessor); a candidate compiled for two blocks (128 registers, with spills) is
selected by CNTK_ENGINE_CUDA_STACK_BLOCKS=2 (docs/cuda_kernels.md).  For every kernel variant
and architecture: unique pairs/s of a symmetric Gram of N random 32x32x3 images with each
budget (median of repeats after a warm-up, synchronised), and whether the two Grams are equal
bit for bit (the same PTX; ptxas may still contract a plain mul and add into an FMA differently
in the two compilations, so the largest relative difference is reported beside it, not an
error).  Writes
stack_blocks_<GPU>_<date>.json into --out.  Without a usable CUDA backend it says why and
writes nothing; ``--cpu-dry-run`` runs the same loop with the numba backend standing in (tiny N:
a test of this script, not a measurement).
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import numpy as np

if __package__ in (None, ""):
    sys.path.append(str(Path(__file__).resolve().parents[1]))
from bench.common import (RESULTS, check_out_dir, choice_list, gpu_info, gpu_sync,  # noqa: E402
                          int_at_least, machine, median_time, new_stem, own_stack_kernel_variants,
                          result_header, run_main, write_json)

ENV = "CNTK_ENGINE_CUDA_STACK_BLOCKS"


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int_at_least(2), default=128)
    ap.add_argument("--architectures", type=choice_list(["myrtle5", "myrtle7", "myrtle10"]),
                    default="myrtle5,myrtle10")
    ap.add_argument("--repeats", type=int_at_least(1), default=3)
    ap.add_argument("--out", default=str(RESULTS))
    ap.add_argument("--cpu-dry-run", action="store_true",
                    help="numba stands in for cuda (both budgets give the same run): tests the script")
    return run_main(ap, run, argv)


def run(args):
    import cntk_engine as ce
    from cntk_engine.backends.cuda import KERNEL_ENV
    check_out_dir(args.out, "--out")
    backend = "numba" if args.cpu_dry_run else "cuda"
    if not args.cpu_dry_run:
        why = ce.available_backends()["cuda"]
        if why is not None:
            print(f"bench_stack_blocks: the cuda backend cannot run here: {why}")
            return 0
        import cupy as xp
    else:
        xp = np
    x = xp.asarray(np.random.default_rng(0).standard_normal((args.n, 3, 32, 32)))
    pairs = args.n * (args.n + 1) // 2
    rows = []
    info = gpu_info() or {"name": "cpu_dry_run" if args.cpu_dry_run else "unknown GPU"}
    path = Path(str(new_stem(args.out, f"stack_blocks_{info['name'].replace(' ', '_').replace('/', '_')}"))
                + ".json")
    payload = {**result_header(), "machine": machine(), "gpu": info, "backend": backend,
               "workload": f"symmetric Gram of {args.n} random 32x32x3 images, float32, NTK",
               "results": rows}
    try:
        variants = own_stack_kernel_variants()
    except ImportError:
        if not args.cpu_dry_run:
            raise
        variants = ["numba"]        # no CUDA extension: numba ignores the variant, one pass
        print("bench_stack_blocks: no CUDA extension here: one pass of numba for the dry run")
    for variant in variants:
        os.environ[KERNEL_ENV] = variant
        for arch in args.architectures:
            grams = {}
            for blocks in ("1", "2"):
                os.environ[ENV] = blocks

                def run():
                    grams[blocks] = ce.gram(x, architecture=arch, backend=backend, dtype="float32")
                    gpu_sync()
                sec, times = median_time(run, repeats=args.repeats, warmup=1)
                rows.append({"kernel": variant, "architecture": arch, "blocks_per_sm": int(blocks),
                             "n": args.n, "seconds": sec, "times": times,
                             "unique_pairs_per_s": pairs / sec})
                print(f"{variant} {arch} blocks/SM {blocks}: {pairs / sec:10.1f} unique pairs/s", flush=True)
            host = [np.asarray(g.get() if hasattr(g, "get") else g) for g in (grams["1"], grams["2"])]
            same = host[0].tobytes() == host[1].tobytes()
            diff = float(np.abs(host[1] - host[0]).max() / np.abs(host[0]).max())
            rows[-1].update(bit_identical_to_blocks_1=same, max_rel_diff_to_blocks_1=diff)
            print(f"{variant} {arch}: the two Grams are {'' if same else 'NOT '}bit-identical "
                  f"(max relative difference {diff:.1e})", flush=True)
            write_json(path, payload)    # after every architecture: a run stopped early keeps its rows
    os.environ.pop(ENV, None)
    write_json(path, payload)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
