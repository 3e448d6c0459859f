"""What ZCA whitening costs, beside the kernel it feeds: the fit (the d x d second moment of the
training images and its float64 eigendecomposition, d = C x H x W) and the transform, measured
for several training-set sizes, with the training Gram's time of the same images in the same run.

    python bench/bench_zca.py [--data ../shared/data/cifar10_jpeg_small.npz] [--n-train 500,5000]
                              [--architecture myrtle5] [--backend numba] [--kernel-n 8]

Images: the training images of --data (an .npz with x_train, channels last or first), else
random 32x32x3 images.  Memory: the peak of NumPy's allocations during the fit (tracemalloc),
beside the d x d float64 matrix (d^2 x 8 bytes) it is made of.  The kernel: unique pairs/s of the
symmetric Gram of --kernel-n of the same images (NTK, float32), from which the training Gram's
time for each size is estimated (n(n+1)/2 pairs at that rate), so the fit's cost is read as a
share of the kernel's.  Writes <out-dir>/zca_<date>.json.
"""
from __future__ import annotations

import argparse
import sys
import time
import tracemalloc
from pathlib import Path

import numpy as np

if __package__ in (None, ""):
    sys.path.append(str(Path(__file__).resolve().parents[1]))
from bench.common import (BACKENDS, RESULTS, ScriptError, check_out_dir, existing_file,  # noqa: E402
                          int_at_least, int_list, load_npz, median_time, non_finite_images, npz_array,
                          run_main, save_result)

DATA_WHAT = "an x_train array of images, (N, H, W, C) or (N, C, H, W) with 1 or 3 channels"


def training_images(path, n: int) -> tuple[np.ndarray, str]:
    """(n, C, H, W) float64 images in [0, 1] and where they came from (ScriptError: --data
    holds no such images, too few, or some with NaN or Inf pixels)."""
    if path is None:
        rng = np.random.default_rng(0)
        return rng.random((n, 3, 32, 32)), "random 32x32x3 images"
    with load_npz(path, "--data", DATA_WHAT) as d:
        x = npz_array(d, "x_train", path, "--data", DATA_WHAT)
    if x.ndim != 4 or x.dtype.kind not in "biuf" or not (x.shape[-1] in (1, 3) or x.shape[1] in (1, 3)):
        raise ScriptError(f"--data {path}: x_train has shape {x.shape} ({x.dtype}); expected {DATA_WHAT}")
    if x.shape[-1] in (1, 3) and x.shape[1] not in (1, 3):
        x = x.transpose(0, 3, 1, 2)
    if len(x) < n:
        raise ScriptError(f"--data {path} holds {len(x)} training images; --n-train / --kernel-n "
                          f"ask for {n}")
    x = x[:n].astype(np.float64)
    bad = non_finite_images(x)
    if bad:
        raise ScriptError(f"--data {path}: x_train has NaN or Inf pixels in image(s) {bad}; all pixels "
                          "must be finite")
    return (x / 255.0 if x.max() > 1 else x), f"the first training images of {Path(path).name}"


def check_architecture(args) -> dict:
    """gram()'s architecture keywords of --architecture / --depth (ScriptError: cnn without a
    --depth, or a --depth the Myrtle preset does not take)."""
    if args.architecture == "cnn" and args.depth is None:
        raise ScriptError("--architecture cnn needs --depth (conv layers + 1, e.g. --depth 6)")
    if args.architecture != "cnn" and args.depth is not None:
        raise ScriptError(f"--depth {args.depth}: --architecture {args.architecture} fixes its depth; "
                          "--depth is for --architecture cnn (leave it out)")
    return dict(architecture=args.architecture, depth=args.depth)


def fit(x, what: str):
    """fit_zca(x), its constant images named as positions in --data's x_train."""
    from cntk_engine.preprocess import ConstantImages, fit_zca
    try:
        return fit_zca(x)
    except ConstantImages as e:
        raise ScriptError(str(e.reworded(f"{what}: x_train", "remove them, or give other images"))) from None


def run(args):
    import cntk_engine as ce
    check_out_dir(args.out_dir, "--out-dir")
    arch = check_architecture(args)
    x, source = training_images(args.data, max(*args.n_train, args.kernel_n))
    what = f"--data {args.data}" if args.data else "the random images"
    d = int(np.prod(x.shape[1:]))
    xk = fit(x[:args.kernel_n], what).transform(x[:args.kernel_n]).astype(np.float32)
    kw = dict(arch, kernel="ntk", backend=args.backend)
    ce.gram(xk[:2], **kw)                                  # kernels loaded outside the timing
    sec, _ = median_time(lambda: ce.gram(xk, **kw), repeats=args.repeats, warmup=0)
    rate = args.kernel_n * (args.kernel_n + 1) / 2 / sec
    print(f"kernel ({args.architecture}, {args.backend}): {rate:.4g} unique pairs/s")
    rows = []
    for n in args.n_train:
        tracemalloc.start()
        t0 = time.perf_counter()
        try:
            zca = fit(x[:n], what)
        finally:
            fit_s = time.perf_counter() - t0
            peak = tracemalloc.get_traced_memory()[1]
            tracemalloc.stop()
        transform_s, _ = median_time(lambda: zca.transform(x[:n]), repeats=args.repeats, warmup=0)
        gram_s = n * (n + 1) / 2 / rate
        rows.append({"n_train": n, "d": d, "fit_s": fit_s, "transform_s": transform_s,
                     "fit_peak_mib": peak / 2**20, "matrix_mib": d * d * 8 / 2**20,
                     "training_gram_s_estimated": gram_s, "fit_share_of_gram": fit_s / gram_s})
        print(f"n = {n}: fit {fit_s:.2f} s (peak {peak / 2**20:.0f} MiB), transform {transform_s:.2f} s; "
              f"the training Gram ~{gram_s:.3g} s, the fit {100 * fit_s / gram_s:.2g}% of it")
    return save_result(args.out_dir, "zca", {
        "images": f"{source}, (C, H, W) = {tuple(x.shape[1:])}, d = {d}",
        "kernel": {**arch, "backend": args.backend, "n": len(xk), "dtype": "float32",
                   "unique_pairs_per_s": rate},
        "results": rows})


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=existing_file, default=None)
    ap.add_argument("--n-train", type=int_list(2, "500,5000"), default=[500, 5000])
    ap.add_argument("--architecture", default="myrtle5", choices=("cnn", "myrtle5", "myrtle7", "myrtle10"),
                    help="of the kernel timed beside the fit")
    ap.add_argument("--depth", type=int_at_least(2), default=None, help="with --architecture cnn (needed there)")
    ap.add_argument("--backend", default="numba", choices=BACKENDS)
    ap.add_argument("--kernel-n", type=int_at_least(2), default=8)
    ap.add_argument("--repeats", type=int_at_least(1), default=1)
    ap.add_argument("--out-dir", default=str(RESULTS))
    return run_main(ap, run, argv)


if __name__ == "__main__":
    main()
