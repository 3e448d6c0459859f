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
from bench.common import (BACKENDS, RESULTS, existing_file, int_at_least, int_list,  # noqa: E402
                          positive_float_list, run_main, save_result)

MNIST = Path(__file__).resolve().parents[2] / "shared" / "data" / "mnist_test.npz"


def digits(path: Path, n: int, crop: int) -> np.ndarray:
    """(n, 1, crop, crop) float64: the centre crop of the first n test digits, pixels 0-255."""
    if not Path(path).is_file():
        raise SystemExit(f"--mnist {path}: no such file (the MNIST test set, x of (N, 28, 28))")
    with np.load(path) as d:
        x = d["x"][:n].astype(np.float64)
    if len(x) < n or min(x.shape[1:]) < crop:
        raise SystemExit(f"--mnist {path} holds {len(x)} images of {x.shape[1:]}; --n {n} and "
                         f"--crop {crop} ask for more")
    top, left = (x.shape[1] - crop) // 2, (x.shape[2] - crop) // 2
    return x[:, None, top:top + crop, left:left + crop]


def error(x, backend, **arch) -> float:
    import cntk_engine as ce
    k32 = ce.gram(x, backend=backend, dtype="float32", **arch)
    k64 = ce.gram(x, backend=backend, dtype="float64", **arch)
    return float(np.abs(k32 - k64).max() / np.abs(k64).max())


def run(args):
    x = digits(args.mnist, args.n, args.crop)
    rng = np.random.default_rng(args.seed)
    rows = []
    for pooling in ("gap", "flatten"):
        for depth in args.depths:
            arch = dict(depth=depth, pooling=pooling)
            row = {"pooling": pooling, "depth": depth, "distinct": error(x, args.backend, **arch)}
            for sd in args.noise:
                pair = np.concatenate([x[:1], x[:1] + sd * rng.standard_normal(x[:1].shape)])
                row[f"noise_{sd:g}"] = error(pair, args.backend, **arch)
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
    ap.add_argument("--backend", default="numba", choices=BACKENDS)
    ap.add_argument("--seed", type=int_at_least(0), default=11)
    ap.add_argument("--out-dir", type=Path, default=RESULTS)
    return run_main(ap, run, argv)


if __name__ == "__main__":
    main()
