"""One ``--ridge auto`` solve at a size where LAPACK syevd cannot run with SciPy's 32-bit
integers (n > ``EVD_MAX_N`` = 32,766: ``solver.eigh`` then decomposes by syevr), as
``cntk-engine solve`` calls it, checked by its residual.

    python bench/bench_solver_large.py [--n 32768] [--classes 4]

The Gram is the Gaussian kernel exp(-|a - b|^2 / 32) of n random points in 16 dimensions
(``bench_solver.py``'s), built by blocks of rows; the labels are the quadrant of the first two
coordinates with every tenth one random (some are learnable, not all).
``solver.fit_classifier(K, y, overwrite_k=True)`` (K given up: decomposed in its own memory,
U new) is timed once; the peak resident memory of the process beyond the Gram is read from
the kernel (``ru_maxrss``), in copies of K, beside ``solve_workspace``'s figure for this n.
Then K, destroyed by the solve, is rebuilt by blocks of rows and the fit's relative residual
``|(K + lambda I) alpha - Y| / |Y|`` computed: a wrong decomposition shows there (the fit is
``U diag(1 / (s + lambda)) U^T Y``), at no n x n cost.  Writes <out-dir>/solver_large_<date>.json.
An hour or so on a 2-core machine at the default n, and 2.1 copies of K of memory (16 GiB).
"""
from __future__ import annotations

import argparse
import resource
import sys
import time
from pathlib import Path

import numpy as np

if __package__ in (None, ""):
    sys.path.append(str(Path(__file__).resolve().parents[1]))
from bench.common import (RESULTS, check_out_dir, int_at_least, run_main,  # noqa: E402
                          save_result)

ROWS = 1024


def points(n: int) -> np.ndarray:
    return np.random.default_rng(0).standard_normal((n, 16))


def gram_rows(a: np.ndarray, i: int, j: int) -> np.ndarray:
    """Rows i:j of the Gaussian kernel exp(-|a_r - a_c|^2 / 32) of the points ``a``."""
    sq = (a * a).sum(axis=1)
    d = np.maximum(sq[i:j, None] + sq[None, :] - 2.0 * (a[i:j] @ a.T), 0.0)
    return np.exp(-d / 32.0)


def labels(a: np.ndarray, classes: int) -> np.ndarray:
    y = ((a[:, 0] > 0).astype(int) * 2 + (a[:, 1] > 0)) % classes
    noisy = np.arange(len(a)) % 10 == 0
    y[noisy] = np.random.default_rng(1).integers(0, classes, int(noisy.sum()))
    return y


def peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024   # Linux: KiB


def run(args):
    from cntk_engine import solver
    from cntk_engine.solver import linalg
    check_out_dir(args.out_dir, "--out-dir")
    n = args.n
    a = points(n)
    y = labels(a, args.classes)
    K = np.empty((n, n))
    for i in range(0, n, ROWS):
        K[i:i + ROWS] = gram_rows(a, i, min(i + ROWS, n))
    nb = K.nbytes
    before = peak_rss_bytes()          # the process with K built (its peak so far)
    t = time.perf_counter()
    fit = solver.fit_classifier(K, y, overwrite_k=True)
    seconds = time.perf_counter() - t
    peak = (peak_rss_bytes() - before) / nb
    del K
    lam, Y, alpha = fit.info["ridge_absolute"], fit.Y, fit.solution.alpha
    resid = np.empty_like(Y)
    for i in range(0, n, ROWS):
        j = min(i + ROWS, n)
        resid[i:j] = gram_rows(a, i, j) @ alpha + lam * alpha[i:j] - Y[i:j]
    rel = float(np.linalg.norm(resid) / np.linalg.norm(Y))
    driver = "syevd" if n <= linalg.EVD_MAX_N else "syevr"
    ws = solver.solve_workspace("eigh", "cpu", overwrite_k=True, n=n)
    print(f"n = {n}: ridge auto by {driver} in {seconds:.0f} s; ridge {fit.info['ridge_relative']:g} "
          f"x mean diag, leave-one-out accuracy {fit.info['loo_accuracy']:.4f}; relative residual "
          f"{rel:.2e}; peak resident memory {peak:.2f} copies of K beyond it (solve_workspace "
          f"says {ws:g})")
    return save_result(args.out_dir, "solver_large", {
        "data": "Gaussian kernel exp(-|a-b|^2/32) of random points in 16 dimensions (numpy "
                "default_rng(0)); labels: quadrant of the first two coordinates, every tenth random",
        "device": "cpu", "n": n, "classes": args.classes, "eigh_driver": driver,
        "evd_max_n": linalg.EVD_MAX_N, "seconds": seconds,
        "ridge_relative": fit.info["ridge_relative"], "loo_accuracy": fit.info["loo_accuracy"],
        "relative_residual": rel, "peak_rss_copies_of_K": peak, "solve_workspace": ws})


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int_at_least(20), default=32_768,
                    help="training-set size, at least 20 (default 32768: the first beyond syevd)")
    ap.add_argument("--classes", type=int_at_least(2), default=4, help="classes (default 4)")
    ap.add_argument("--out-dir", default=str(RESULTS))
    return run_main(ap, run, argv)


if __name__ == "__main__":
    main()
