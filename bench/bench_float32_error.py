"""How far the float32 kernel is from float64: on distinct real images, and on near-duplicates
(an image and a copy of it with faint noise), where float32 loses accuracy.

    python bench/bench_float32_error.py [--mnist ../shared/data/mnist_test.npz] [--noise 0.1,1,10]
                                        [--depths 11,21] [--crop 12] [--backend numba]

Why near-duplicates: theta = arccos(c) has an infinite slope at c = 1 (``cntk_engine.arch``,
self pairs), and a near-duplicate pair has c within a few float32 ulps of 1 at many entries,
so the rounding of c alone costs about sqrt(eps_float32).  Exact duplicates are found and given
their self-pair value (c = 1 exactly); near ones cannot be.  Images: --n MNIST test digits
(the centre --crop x --crop, pixels 0-255), and for each noise level the pair (digit 0, digit 0
plus Gaussian noise of that standard deviation).  The error: max |K32 - K64| / max |K64| over
the Gram of those images, per pooling and depth.  Writes <out-dir>/float32_error_<date>.json.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

if __package__ in (None, ""):
    sys.path.append(str(Path(__file__).resolve().parents[1]))
from bench.common import (BACKENDS, RESULTS, ScriptError, check_out_dir, existing_file,  # noqa: E402
                          int_at_least, int_list, load_npz, non_finite_images, npz_array,
                          positive_float_list, run_main, save_result)

MNIST = Path(__file__).resolve().parents[2] / "shared" / "data" / "mnist_test.npz"


MNIST_WHAT = "the MNIST test digits as an x array of (N, 28, 28) or (N, 1, 28, 28) pixels 0-255"


def digits(path: Path, n: int, crop: int) -> np.ndarray:
    """(n, 1, crop, crop) float64: the centre crop of the first n test digits, pixels 0-255
    (x of (N, H, W) or (N, 1, H, W) in the --mnist archive)."""
    if not Path(path).is_file():
        raise ScriptError(f"--mnist {path}: no such file; expected {MNIST_WHAT}")
    with load_npz(path, "--mnist", MNIST_WHAT) as d:
        x = npz_array(d, "x", path, "--mnist", MNIST_WHAT)
    if x.ndim == 4 and x.shape[1] == 1:
        x = x[:, 0]
    if x.ndim != 3 or x.dtype.kind not in "biuf":
        raise ScriptError(f"--mnist {path}: x has shape {x.shape} ({x.dtype}); expected {MNIST_WHAT}")
    if len(x) < n or min(x.shape[1:]) < crop:
        raise ScriptError(f"--mnist {path} holds {len(x)} images of {x.shape[1]} x {x.shape[2]}; --n {n} "
                          f"and --crop {crop} ask for {n} images of at least {crop} x {crop}")
    x = x[:n].astype(np.float64)
    bad = non_finite_images(x)
    if bad:
        raise ScriptError(f"--mnist {path}: x has NaN or Inf pixels in image(s) {bad}; all pixels must be finite")
    top, left = (x.shape[1] - crop) // 2, (x.shape[2] - crop) // 2
    return x[:, None, top:top + crop, left:left + crop]


def error(x, backend, **arch) -> float:
    import cntk_engine as ce
    k32 = ce.gram(x, backend=backend, dtype="float32", **arch)
    k64 = ce.gram(x, backend=backend, dtype="float64", **arch)
    return float(np.abs(k32 - k64).max() / np.abs(k64).max())


def noisy_error(pair, sd, backend, **arch) -> float:
    """error() of digit 0 and its copy with noise ``sd``; a copy out of the kernel's range is
    refused naming --noise."""
    try:
        return error(pair, backend, **arch)
    except ValueError as e:
        if "NaN or Inf" not in str(e) and "would have kernel values" not in str(e):
            raise
        raise ScriptError(f"--noise {sd:g}: digit 0 plus noise of this standard deviation (pixels up to "
                          f"about {np.abs(pair).max():.2g}) is beyond what the kernel computes in float64; "
                          "give a smaller --noise (the pixels are 0-255: the noise is meant to be faint)") from None


def run(args):
    check_out_dir(args.out_dir, "--out-dir")
    x = digits(args.mnist, args.n, args.crop)
    rng = np.random.default_rng(args.seed)
    rows = []
    for pooling in ("gap", "flatten"):
        for depth in args.depths:
            arch = dict(depth=depth, pooling=pooling)
            row = {"pooling": pooling, "depth": depth, "distinct": error(x, args.backend, **arch)}
            for sd in args.noise:
                pair = np.concatenate([x[:1], x[:1] + sd * rng.standard_normal(x[:1].shape)])
                row[f"noise_{sd:g}"] = noisy_error(pair, sd, args.backend, **arch)
            rows.append(row)
            print(f"{pooling:7s} depth {depth:3d}: distinct {row['distinct']:.2g}; near-duplicates "
                  + ", ".join(f"noise {sd:g}: {row[f'noise_{sd:g}']:.2g}" for sd in args.noise))
    return save_result(args.out_dir, "float32_error", {
        "what": "max |K_float32 - K_float64| / max |K_float64|, NTK, arora convention",
        "images": f"{args.n} MNIST test digits, centre {args.crop} x {args.crop}, pixels 0-255; "
                  "near-duplicates: digit 0 and digit 0 + N(0, noise^2) per pixel",
        "backend": args.backend, "seed": args.seed, "rows": rows})


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--mnist", type=existing_file, default=MNIST)
    ap.add_argument("--n", type=int_at_least(2), default=8, help="distinct digits")
    ap.add_argument("--crop", type=int_at_least(1), default=12)
    ap.add_argument("--noise", type=positive_float_list, default=[0.1, 1.0, 10.0],
                    help="standard deviations of the copies' noise (pixels 0-255)")
    ap.add_argument("--depths", type=int_list(2), default=[11, 21])
    ap.add_argument("--backend", default="numba", choices=[b for b in BACKENDS if b != "reference"],
                    help="the float32 backend measured (the reference computes in float64 only)")
    ap.add_argument("--seed", type=int_at_least(0), default=11)
    ap.add_argument("--out-dir", type=Path, default=RESULTS)
    return run_main(ap, run, argv)


if __name__ == "__main__":
    main()
