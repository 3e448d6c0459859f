"""What an estimator's ``predict`` of one image costs, with the diagonals of a pooled stack's
training set computed at each call (``diag.MEMO_BYTES = 0``) and kept between calls (the
default, ``cntk_engine.diag``): interleaved in one process, so the ratio is of one machine state.

    python bench/bench_predict.py [--architectures myrtle5,myrtle10] [--n-train 100]
                                  [--repeats 3] [--rounds 2]

Random 32x32x3 images, numba backend, ``CNTKClassifier(architecture=...)`` fitted on
``--n-train`` of them; per setting and round: ``fit`` once (its wall seconds), one untimed
``predict``, then the median of ``--repeats`` one-image predicts of new images; the best round
is reported.  Writes <out-dir>/predict_<date>.json.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

if __package__ in (None, ""):
    sys.path.append(str(Path(__file__).resolve().parents[1]))
from bench.common import (RESULTS, check_out_dir, choice_list, int_at_least, median_time,  # noqa: E402
                          run_main, save_result)

ARCHITECTURES = ("myrtle5", "myrtle7", "myrtle10")


def run(args):
    from cntk_engine import diag, inputs
    from cntk_engine.estimators import CNTKClassifier
    check_out_dir(args.out_dir, "--out-dir")
    rng = np.random.default_rng(0)
    n = args.n_train
    x = rng.standard_normal((n + 1 + args.repeats, 3, 32, 32))
    y = np.arange(n) % 10
    kept_bytes = diag.MEMO_BYTES
    rows = []
    try:
        for arch in args.architectures:
            best = {}
            for _ in range(args.rounds):
                for kept in (False, True):          # interleaved: the machine's drift shared
                    diag.MEMO_BYTES = kept_bytes if kept else 0
                    diag.clear_memo()
                    inputs._extremes_cache.clear()
                    t = time.perf_counter()
                    clf = CNTKClassifier(architecture=arch, backend="numba").fit(x[:n], y)
                    fit = time.perf_counter() - t
                    new = iter(range(n + 1, len(x)))      # images not predicted before
                    clf.predict(x[n:n + 1])          # untimed: the first call's compilation
                    one, times = median_time(lambda: clf.predict(x[next(new):][:1]),
                                             repeats=args.repeats, warmup=0)
                    b = best.get(kept)
                    if b is None or one < b["predict_one_s"]:
                        best[kept] = {"fit_s": fit, "predict_one_s": one, "predict_times_s": times}
            off, on = best[False], best[True]
            rows.append({"architecture": arch, "n_train": n, "computed_each_call": off, "kept": on,
                         "predict_speedup": off["predict_one_s"] / on["predict_one_s"]})
            print(f"{arch}, {n} training images: predict of one image {off['predict_one_s']:.3f} s "
                  f"computing the training set's diagonals at each call, {on['predict_one_s']:.3f} s "
                  f"keeping them ({rows[-1]['predict_speedup']:.2f}x); fit {off['fit_s']:.1f} s and "
                  f"{on['fit_s']:.1f} s")
    finally:
        diag.MEMO_BYTES = kept_bytes
    return save_result(args.out_dir, "predict", {
        "data": "random 32x32x3 images (numpy default_rng(0))", "backend": "numba",
        "repeats": args.repeats, "rounds": args.rounds, "memo_bytes": kept_bytes, "results": rows})


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--architectures", type=choice_list(ARCHITECTURES), default=["myrtle5", "myrtle10"],
                    help="comma list of pooled stacks (default myrtle5,myrtle10)")
    ap.add_argument("--n-train", type=int_at_least(10), default=100,
                    help="training images (default 100; at least 10: one per class)")
    ap.add_argument("--repeats", type=int_at_least(1), default=3,
                    help="one-image predicts timed per setting and round (default 3)")
    ap.add_argument("--rounds", type=int_at_least(1), default=2,
                    help="rounds of both settings, interleaved; the best is kept (default 2)")
    ap.add_argument("--out-dir", default=str(RESULTS))
    return run_main(ap, run, argv)


if __name__ == "__main__":
    main()
