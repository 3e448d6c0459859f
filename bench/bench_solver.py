"""What kernel regression on an n x n Gram costs on the CPU (``cntk_engine.solver``, NumPy and
LAPACK): the time ``cntk-engine solve`` spends after reading the stores, by n.

    python bench/bench_solver.py [--ns 1000,2000,4000] [--classes 10] [--repeats 3]

Per n, ``solver.fit_classifier`` and its ``predict`` (of m = n / 5 test rows), as ``solve``
calls them (``overwrite_k``: the loaded K is given up and factorised in its own memory; each
call gets a fresh copy of K, made outside the timing): ``ridge="auto"`` (one eigendecomposition,
exact leave-one-out accuracy over ``RELATIVE_RIDGE_GRID``, the fit at the ridge chosen from the
same decomposition) and a given ridge (a Cholesky fit).  The Gram is the Gaussian kernel
exp(-|a - b|^2 / 32) of n random points in 16 dimensions (positive definite, as a CNTK Gram of
distinct images is), the labels random among ``--classes``.  Seconds: the median of
``--repeats``; peak memory beyond K in float64 copies of K: ``tracemalloc`` over one more call
(NumPy's arrays, LAPACK's workspace arrays included; the BLAS library's own buffers are not
seen), beside the figure ``solver.solve_workspace(..., overwrite_k=True)`` states and
``cntk-engine solve`` checks before reading (docs/solver.md); and the peak of the API's default,
K left as it is (``peak_copies_of_K_kept``, beside ``solve_workspace_kept``).  The seconds of
the largest n are extrapolated to CIFAR-10's 50,000 training images by the n^3 of the
factorisations (where it is at least ``EXTRAPOLATE_FROM``): an extrapolation on this machine,
said as one, not a measurement.  Writes <out-dir>/solver_<date>.json.
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
from bench.common import (RESULTS, check_out_dir, int_at_least, int_list, run_main,  # noqa: E402
                          save_result)

CIFAR_TRAIN = 50_000
GIVEN_RIDGE = 1e-3
#: The smallest largest-n extrapolated from: below it the n^2 passes and the per-call overheads
#: weigh, so the n^3 of the factorisations does not describe the time (extrapolations from a
#: few hundred images came out several times those from thousands).
EXTRAPOLATE_FROM = 2000


def gaussian_gram(rng, n: int, m: int) -> tuple[np.ndarray, np.ndarray]:
    """The (n, n) Gram and (m, n) test kernel of the Gaussian kernel of random points."""
    a = rng.standard_normal((n + m, 16))
    sq = (a * a).sum(axis=1)
    d = np.maximum(sq[:, None] + sq[None, :] - 2.0 * (a @ a.T), 0.0)
    k = np.exp(-d / 32.0)
    return np.ascontiguousarray(k[:n, :n]), np.ascontiguousarray(k[n:, :n])


def peak_copies(fn, k_bytes: int) -> float:
    """Peak bytes ``fn()`` allocates beyond what was allocated before it, in copies of K."""
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        tracemalloc.reset_peak()
        fn()
        return (tracemalloc.get_traced_memory()[1] - before) / k_bytes
    finally:
        tracemalloc.stop()


def given_up_times(fit, K, repeats: int) -> list[float]:
    """Seconds of ``fit(A)`` on ``repeats`` fresh copies ``A`` of K (each given up to it; the
    copy is made outside the timing)."""
    times = []
    for _ in range(repeats):
        A = K.copy()
        t = time.perf_counter()
        fit(A)
        times.append(time.perf_counter() - t)
        del A
    return times


def run(args):
    from cntk_engine import solver
    check_out_dir(args.out_dir, "--out-dir")
    rng = np.random.default_rng(0)
    rows = []
    for n in args.ns:
        K, K_test = gaussian_gram(rng, n, max(1, n // 5))
        y = rng.integers(0, args.classes, n)
        row = {"n": n, "m": len(K_test), "classes": int(len(np.unique(y)))}
        for name, ridge, factorisation in (("auto", "auto", "eigh"),
                                           ("given", GIVEN_RIDGE, "cholesky")):
            def call(A, overwrite_k=True):
                return solver.fit_classifier(A, y, ridge=ridge,
                                             overwrite_k=overwrite_k).predict(K_test)
            A = K.copy()                                        # the warm-up, outside the median
            t = time.perf_counter()
            fit = solver.fit_classifier(A, y, ridge=ridge, overwrite_k=True)
            fit.predict(K_test)
            first = time.perf_counter() - t
            del A
            times = given_up_times(call, K, args.repeats)
            seconds = float(np.median(times))
            row[name] = {"ridge": ridge, "seconds": seconds, "times_s": times, "first_s": first,
                         "ridge_relative_chosen": fit.info["ridge_relative"],
                         "peak_copies_of_K": peak_copies(lambda A=K.copy(): call(A), K.nbytes),
                         "solve_workspace": solver.solve_workspace(factorisation, "cpu",
                                                                   overwrite_k=True),
                         "peak_copies_of_K_kept": peak_copies(lambda: call(K, False), K.nbytes),
                         "solve_workspace_kept": solver.solve_workspace(factorisation, "cpu")}
            print(f"n = {n}: ridge {name}: {seconds:.2f} s (median of {args.repeats}), peak "
                  f"{row[name]['peak_copies_of_K']:.2f} copies of K beyond it, K given up "
                  f"(solve_workspace says {row[name]['solve_workspace']:g}); "
                  f"{row[name]['peak_copies_of_K_kept']:.2f} with K kept (it says "
                  f"{row[name]['solve_workspace_kept']:g})")
        rows.append(row)
    largest = max(rows, key=lambda r: r["n"])
    extrapolated = None
    if largest["n"] < EXTRAPOLATE_FROM:
        print(f"not extrapolated to {CIFAR_TRAIN:,}: the largest n, {largest['n']}, is below "
              f"{EXTRAPOLATE_FROM}, where the n^3 of the factorisations does not yet describe the time")
    else:
        scale = (CIFAR_TRAIN / largest["n"]) ** 3
        extrapolated = {"n": CIFAR_TRAIN, "from_n": largest["n"], "by": "n^3",
                        **{name: largest[name]["seconds"] * scale for name in ("auto", "given")}}
        print(f"extrapolated by n^3 from n = {largest['n']} to {CIFAR_TRAIN:,} training images on "
              f"this machine: ridge auto {extrapolated['auto'] / 3600:.1f} h, a given ridge "
              f"{extrapolated['given'] / 3600:.2f} h (not measured; {CIFAR_TRAIN:,}^2 float64 is "
              f"{CIFAR_TRAIN ** 2 * 8 / 2 ** 30:.1f} GiB a copy)")
    return save_result(args.out_dir, "solver", {
        "data": "Gaussian kernel exp(-|a-b|^2/32) of random points in 16 dimensions "
                "(numpy default_rng(0)); random labels", "device": "cpu",
        "given_ridge_relative": GIVEN_RIDGE, "repeats": args.repeats, "results": rows,
        "extrapolated_seconds": extrapolated})


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ns", type=int_list(20, "1000,2000,4000"), default=[1000, 2000, 4000],
                    help="comma list of training-set sizes, at least 20 (default 1000,2000,4000)")
    ap.add_argument("--classes", type=int_at_least(2), default=10, help="classes (default 10)")
    ap.add_argument("--repeats", type=int_at_least(1), default=3,
                    help="timed calls per size and ridge (default 3)")
    ap.add_argument("--out-dir", default=str(RESULTS))
    return run_main(ap, run, argv)


if __name__ == "__main__":
    main()
