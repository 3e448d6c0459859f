"""``cntk-engine demo``: a CNTK Gram of MNIST digits that ship with the package."""
from __future__ import annotations

import time

import numpy as np

from .common import CliError, plural


def add_parser(sub) -> None:
    dp = sub.add_parser("demo", help="a CNTK Gram of MNIST digits shipped with the package",
                        description="Compute the CNTK-GAP NTK and NNGP Gram matrices of MNIST test "
                        "digits shipped with the package, report the throughput, and classify a "
                        "third of the digits by kernel regression on the others: a check that "
                        "the installation works.")
    dp.add_argument("--n", type=int, default=None,
                    help="digits, 20 to 200 (default 200 on a GPU, 60 on the CPU)")
    dp.add_argument("--depth", type=int, default=None, help="depth (default 6 on a GPU, 3 on the CPU)")
    dp.add_argument("--backend", choices=("auto", "cuda", "numba", "reference"), default="auto")
    dp.add_argument("--no-progress", action="store_true")
    dp.set_defaults(func=run)


def demo_data():
    from importlib.resources import files
    with (files("cntk_engine") / "data" / "digits.npz").open("rb") as f:
        with np.load(f) as z:
            return z["x"], z["y"]


def run(args) -> int:
    from ..api import gram
    from ..arch import MAX_DEPTH
    from ..backends import resolve
    x, y = demo_data()
    be = resolve(args.backend).name
    n = args.n if args.n is not None else (200 if be == "cuda" else 60)
    depth = args.depth if args.depth is not None else (6 if be == "cuda" else 3)
    if not 20 <= n <= len(x):
        raise CliError(f"--n must be between 20 (two digits of each class: one to train on, one to "
                       f"classify) and {len(x)}; got {n}")
    if not 2 <= depth <= MAX_DEPTH:
        raise CliError(f"--depth must be an integer from 2 (conv layers + 1) to {MAX_DEPTH}; "
                       f"got {depth}")
    idx = np.concatenate([np.nonzero(y == c)[0][: -(-n // 10)] for c in range(10)])[:n]
    idx.sort()
    xs, ys = x[idx][:, None], y[idx]
    print(f"demo: {n} MNIST test digits (28 x 28, shipped with the package), CNTK-GAP depth {depth}, "
          f"NTK and NNGP, backend {args.backend!r}")
    t0 = time.perf_counter()
    (ntk, nngp), info = gram(xs.astype(np.float32) / 255.0, depth=depth, pooling="gap",
                             kernel="both", backend=args.backend, return_info=True,
                             progress=not args.no_progress)
    dt = time.perf_counter() - t0
    pairs = info["unique_pairs"]
    comp = info["compute_seconds"]
    print(f"computed the {n} x {n} NTK and NNGP Gram matrices ({pairs} unique pairs, "
          f"{plural(info['tiles_total'], 'tile')} of {info['tile']} x {info['tile']}) on backend "
          f"{info['backend']} "
          f"({info['where']}, {info['dtype']}) in {dt:.2f} s: {pairs / comp:.4g} pairs/s "
          f"(tile computation {comp:.2f} s"
          + ("; it includes loading the numba kernel from numba's cache, or compiling it into "
             "the cache the first time on this machine)"
             if info["backend"] == "numba" else ")"))
    # a small check that the kernel means something: kernel regression (the paper's targets, a
    # ridge of 1e-6 mean(diag K)) trained on 2/3 of each class's digits, tested on the others
    # (the split within each class: a class with no training digit is never predicted)
    from ..solver import accuracy, kernel_ridge, paper_targets, rounding_of
    rank = np.array([np.count_nonzero(ys[:i] == ys[i]) for i in range(n)])
    te = rank % 3 == 1
    tr = ~te
    Y, classes = paper_targets(ys[tr], classes=np.arange(10))
    for name, k in (("ntk", ntk), ("nngp", nngp)):
        ktr = k[np.ix_(tr, tr)]
        scores = kernel_ridge(ktr, Y, k[np.ix_(te, tr)], ridge=1e-6 * np.trace(ktr) / len(ktr),
                              rounding=rounding_of(info["dtype"]))    # gram returns float64 arrays
        acc = accuracy(scores, ys[te])
        print(f"  {name}: diag mean {np.diag(k).mean():.4g}, off-diag mean "
              f"{(k.sum() - np.trace(k)) / (n * n - n):.4g}; kernel regression on {tr.sum()} digits "
              f"classifies the other {te.sum()} with accuracy {acc:.0%}")
    return 0
