"""The small-data protocol of Arora et al. 2020 ("Harnessing the Power of Infinitely Wide Deep
Nets on Small-data Tasks", arXiv 1910.01663) on CIFAR-10, from ONE kernel.

    python bench/small_data.py --pool 1280 --n-test 1000 --pooling flatten --depths 11
    python bench/small_data.py --kernels /tmp/k_flatten.npz      # reuse a kernel of reproduce_table1.py

Training sets of 10, 20, 40, ..., 1280 images are drawn (class-balanced: n/10 per class) from
a pool of the first ``--pool`` training images, ``--draws`` times each; each draw is fitted by
kernel regression on the one-hot targets (0.9 / -0.1) and scored on the first ``--n-test``
test images; the table and plot give the mean and standard deviation over draws.  The
kernel (pool x pool and test x pool, every depth in ``--depths``) is computed once; every
draw indexes into it.  What is ours rather than the 2020 paper's: the classifier is kernel
regression (the paper's NTK results used an SVM), the architecture is this package's
(``--depths``, ``--pooling``, ``fix``), and the draws are class-balanced.

``--kernels FILE`` loads kernels saved by ``reproduce_table1.py --save-kernels`` instead of
computing them (its training images are the pool).

Writes <out-dir>/small_data_<tag>_<date>.json and .png.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

if __package__ in (None, ""):
    sys.path.append(str(Path(__file__).resolve().parents[1]))
from bench.common import (BACKENDS, RESULTS, ScriptError, check_out_dir, devices,  # noqa: E402
                          existing_file, gpu_info, int_at_least, int_list, load_npz, machine,
                          new_stem, npz_array, result_header, run_main, versions, write_json)
from bench.reproduce_table1 import (check_architecture, kernels, load_cifar_for_cli,  # noqa: E402
                                    preprocess, regression_accuracy, scheduler_kwargs)

SIZES = (10, 20, 40, 80, 160, 320, 640, 1280)


def balanced_draw(y, n, rng, n_classes=10):
    """n indices into y with n // n_classes per class (the remainder at random)."""
    per = n // n_classes
    idx = []
    for c in range(n_classes):
        pool = np.flatnonzero(y == c)
        if len(pool) < per:
            raise ValueError(f"class {c} has {len(pool)} images in the pool; {per} needed for n={n}")
        idx.extend(rng.choice(pool, per, replace=False))
    rest = np.setdiff1d(np.arange(len(y)), idx)
    idx.extend(rng.choice(rest, n - len(idx), replace=False))
    return np.array(idx)


#: the depths computed when neither --depths nor a --kernels file names any
DEFAULT_DEPTHS = [11]
#: options that choose how kernels are computed: a --kernels file was computed already
COMPUTE_OPTIONS = ("data", "pool", "n_test", "downsample", "backend", "dtype", "tile", "devices",
                   "dask_scheduler")


def check_kernel_file_options(args, z) -> None:
    """With --kernels: --pooling / --fix that contradict the file are an error; the options that
    only choose how kernels are computed, when given, are named as ignored."""
    defaults = parser()
    for name, stored in (("pooling", str(z["pooling"]) if "pooling" in z else None),
                         ("fix", bool(z["fix"]) if "fix" in z else None)):
        given = getattr(args, name)
        if stored is None or given == defaults.get_default(name):
            continue
        asked = {"true": True, "false": False}[given] if name == "fix" else given    # not "paper"
        if asked != stored:
            raise ScriptError(f"--{name} {given}: {args.kernels} holds kernels of "
                              f"{name} {stored}; leave --{name} out with --kernels")
    ignored = [f"--{n.replace('_', '-')}" for n in COMPUTE_OPTIONS
               if getattr(args, n) != defaults.get_default(n)]
    if ignored:
        print(f"note: {', '.join(ignored)} ignored: the kernels come from {args.kernels}", flush=True)


KERNELS_WHAT = ("the kernels saved by reproduce_table1.py --save-kernels (depths, y_train, y_test, "
                "ntk_train_<depth>, ...)")


def kernel_file(path):
    """(archive, its depths) of a --kernels file (ScriptError: not such a file)."""
    z = load_npz(path, "--kernels", KERNELS_WHAT)
    depths = npz_array(z, "depths", path, "--kernels", KERNELS_WHAT)
    if depths.ndim != 1 or depths.dtype.kind not in "iu" or not len(depths):
        raise ScriptError(f"--kernels {path}: its depths array is {depths!s} ({depths.dtype}); expected "
                          f"a list of depths, as in {KERNELS_WHAT}")
    return z, [int(d) for d in depths]


def load_kernels(z, path, depths):
    """y_train, y_test and {depth: (ntk_train, nngp_train, ntk_test, nngp_test)} of a --kernels
    file, their shapes checked against each other."""
    get = lambda key: npz_array(z, key, path, "--kernels", KERNELS_WHAT)    # noqa: E731
    ytr, yte = get("y_train").ravel(), get("y_test").ravel()
    ks = {}
    for d in depths:
        ks[d] = tuple(get(f"{k}_{d}") for k in ("ntk_train", "nngp_train", "ntk_test", "nngp_test"))
        want = [(len(ytr), len(ytr))] * 2 + [(len(yte), len(ytr))] * 2
        if [a.shape for a in ks[d]] != want:
            raise ScriptError(f"--kernels {path}: the kernels of depth {d} have shapes "
                              f"{', '.join(str(a.shape) for a in ks[d])} for {len(ytr)} training and "
                              f"{len(yte)} test labels; the file is not one reproduce_table1.py wrote")
    return ytr, yte, ks


def run(args):
    sizes, want = args.sizes, args.depths
    t0 = time.perf_counter()
    check_out_dir(args.out_dir, "--out-dir")
    if args.kernels:
        z, saved = kernel_file(args.kernels)
        want = saved if want is None else want
        check_kernel_file_options(args, z)
        depths = [d for d in saved if d in want]
        if not depths:
            raise ScriptError(f"--depths {','.join(map(str, want))}: {args.kernels} holds the kernels of "
                              f"depths {','.join(map(str, saved))} only")
        if len(depths) < len(want):
            print(f"note: --depths {','.join(str(d) for d in want if d not in saved)} not in {args.kernels} "
                  f"(it holds {','.join(map(str, saved))}); using {','.join(map(str, depths))}", flush=True)
        ytr, yte, ks = load_kernels(z, args.kernels, depths)
        timing = {"loaded_from": str(args.kernels)}
        src = str(args.kernels)
        pooling = str(z["pooling"]) if "pooling" in z else args.pooling
        fix = bool(z["fix"]) if "fix" in z else None
        shape = [int(v) for v in z["image_shape"]] if "image_shape" in z else None
    else:
        if args.dtype is None:       # the reference computes in float64 only
            args.dtype = "float64" if args.backend == "reference" else "float32"
        elif args.backend == "reference" and args.dtype != "float64":
            raise ScriptError(f"--backend reference computes in float64 only; --dtype {args.dtype} "
                              "would label its results falsely: pass --dtype float64")
        depths = DEFAULT_DEPTHS if want is None else want
        pooling = args.pooling
        fix = {"paper": pooling == "gap", "true": True, "false": False}[args.fix]
        check_architecture(depths, [pooling], args.fix)
        x_tr, y_tr, x_te, y_te, src = load_cifar_for_cli(args.data)
        xtr, xte = preprocess(x_tr, x_te, args.downsample)
        xtr, ytr = xtr[:args.pool], y_tr[:args.pool]
        xte, yte = xte[:args.n_test], y_te[:args.n_test]
        if not any(n <= len(ytr) for n in sizes):
            raise ScriptError(f"every --sizes value ({','.join(map(str, sizes))}) is larger than the pool "
                             f"of {len(ytr)} images; nothing computed")
        print(f"kernel: {len(xtr)} pool x {len(xte)} test, {xtr.shape[1:]} images, {pooling}, fix={fix}, "
              f"depths {depths}, backend {args.backend}", flush=True)
        get_kernels, timing = kernels(xtr, xte, depths, pooling, fix, args, scheduler_kwargs(args))
        ks = {d: get_kernels(d) for d in depths}
        print(f"  kernel pass: {timing['seconds']:.1f} s, {timing['unique_pairs_per_s']:.4g} unique pairs/s",
              flush=True)
        shape = list(xtr.shape[1:])
    too_big = [s for s in sizes if s > len(ytr)]
    if too_big:
        print(f"note: training size(s) {','.join(map(str, too_big))} dropped: larger than the pool of "
              f"{len(ytr)} images", flush=True)
    sizes = [s for s in sizes if s <= len(ytr)]
    sizes_all = list(sizes)
    rng = np.random.default_rng(args.seed)
    acc = {}
    table = []
    for n in sizes_all:
        try:
            draws = [balanced_draw(ytr, n, rng) for _ in range(args.draws)]
        except ValueError as e:
            print(f"  n={n:5d}: skipped ({e})", flush=True)
            sizes = [s for s in sizes if s != n]
            continue
        for d in depths:
            for ki, kname in ((0, "ntk"), (1, "nngp")):
                ktr_full, kte_full = ks[d][ki], ks[d][ki + 2]
                for solve in ("paper_solve", "loo_ridge"):
                    if solve == "loo_ridge" and args.no_loo:
                        continue
                    accs = [regression_accuracy(ktr_full[np.ix_(idx, idx)], kte_full[:, idx], ytr[idx], yte,
                                                loo=solve == "loo_ridge")[0] for idx in draws]
                    label = f"{'CNTK' if kname == 'ntk' else 'CNN-GP'} d{d} {solve.replace('_', ' ')}"
                    row = {"n_train": n, "mean": float(np.mean(accs)), "std": float(np.std(accs)),
                           "draws": len(accs), "accs": accs}
                    acc.setdefault(label, []).append(row)
                    table.append({"label": label, **row})
        best = max((r for r in table if r["n_train"] == n), key=lambda r: r["mean"])
        print(f"  n={n:5d}: best {best['label']}: {100 * best['mean']:.2f} +- {100 * best['std']:.2f}%", flush=True)
    if not sizes:
        raise ScriptError(f"no training size could be drawn from the pool of {len(ytr)} images "
                         f"(--sizes {','.join(map(str, args.sizes))}: each is larger than "
                         "the pool or needs more images of a class than it has); nothing written")
    stem = new_stem(args.out_dir, f"small_data_{args.tag}")
    payload = {**result_header(), "kind": "small_data", "machine": machine(), "gpu": gpu_info(),
               "versions": versions(), "data": src, "pool": int(len(ytr)), "n_test": int(len(yte)),
               "image_shape": shape, "pooling": pooling, "fix": fix, "depths": depths,
               "backend": getattr(args, "backend", None), "dtype": args.dtype, "draws": args.draws,
               "seed": args.seed, "kernel_timing": timing, "seconds_total": time.perf_counter() - t0,
               "title": f"CIFAR-10 small data, {pooling}, {shape and 'x'.join(map(str, shape))} images, "
                        f"pool {len(ytr)}, {args.draws} class-balanced draws",
               "accuracy": acc}
    write_json(Path(f"{stem}.json"), payload)
    from bench.plots import small_data_plot
    small_data_plot(payload, Path(f"{stem}.png"))
    md = ["| n train | " + " | ".join(acc) + " |", "|---|" + "---|" * len(acc)]
    for i, n in enumerate(sizes):
        md.append(f"| {n} | " + " | ".join(f"{100 * rows[i]['mean']:.2f} +- {100 * rows[i]['std']:.2f}"
                                           for rows in acc.values()) + " |")
    print("\n".join(md))
    print(f"wrote {stem}.json and {stem}.png")
    return payload


def parser():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default=None, help="CIFAR-10 python directory or .npz (default: the subset)")
    ap.add_argument("--kernels", type=existing_file, default=None,
                    help="npz saved by reproduce_table1.py --save-kernels")
    ap.add_argument("--pool", type=int_at_least(1), default=1280, help="training images the draws come from")
    ap.add_argument("--n-test", type=int_at_least(1), default=1000)
    ap.add_argument("--sizes", type=int_list(1, "10,20,40"), default=",".join(map(str, SIZES)),
                    help="training-set sizes, comma list")
    ap.add_argument("--draws", type=int_at_least(1), default=10)
    ap.add_argument("--seed", type=int_at_least(0), default=0)
    ap.add_argument("--pooling", default="gap", choices=["gap", "flatten"])
    ap.add_argument("--fix", default="paper", choices=["paper", "true", "false"])
    ap.add_argument("--depths", type=int_list(2), default=None,
                    help="comma list (default 11; with --kernels: those of the file to use, default all)")
    ap.add_argument("--backend", default="auto", choices=BACKENDS)
    ap.add_argument("--dtype", default=None, choices=["float32", "float64"],
                    help="compute dtype [float32; float64 for the reference, its only one]")
    ap.add_argument("--tile", type=int_at_least(1), default=None)
    ap.add_argument("--downsample", type=int_at_least(1), default=1)
    ap.add_argument("--no-loo", action="store_true")
    ap.add_argument("--devices", type=devices, default=None)
    ap.add_argument("--dask-scheduler", default=None)
    ap.add_argument("--out-dir", default=str(RESULTS))
    ap.add_argument("--tag", default="cpu")
    return ap


def main(argv=None):
    return run_main(parser(), run, argv)


if __name__ == "__main__":
    main()
