"""Reproduce the protocol of Table 1 of Arora et al. 2019 (arXiv 1904.11955) on CIFAR-10.

    python bench/reproduce_table1.py --n-train 2000 --n-test 1000 --pooling flatten --backend numba
    python -m bench.reproduce_table1 --data /path/to/cifar-10-batches-py --pooling gap,flatten

Protocol (the paper's Section 5 and its reference code, github.com/ruosongwang/CNTK):
  * images scaled to [0, 1], then standardised per channel with the training set's mean / std;
  * CNTK-V = flatten readout with ``fix=False`` (their README: ``--gap no --fix no``),
    CNTK-GAP = global average pooling with ``fix=True`` (``--gap yes --fix yes``), i.e. first
    and last layers not trained, NTK read without the NNGP term (their ``T -= S``);
  * depths 3, 4, 6, 11, 21 (conv layers + 1), ``convention="arora"``;
  * kernel regression on one-hot targets 0.9 / -0.1 with no regularisation
    (``scipy.linalg.solve(K_train, Y)``), test accuracy = argmax agreement.
All depths come from ONE kernel pass per pooling (``gram(..., depths=[3, 4, 6, 11, 21])``).
Besides the paper's ridge-free solve we report a ridge chosen by leave-one-out accuracy on
the training set, and the NNGP (CNN-GP) kernel of the same pass, which costs nothing extra.

Input (``--data``): a directory with the official CIFAR-10 python files ``data_batch_1`` ..
``data_batch_5`` and ``test_batch`` (pickles of dicts with ``b"data"``: uint8 (10000, 3072),
each row the 32x32 R, G, B planes; ``b"labels"``: 10000 ints), the official archive
``cifar-10-python.tar.gz`` itself (read in place, nothing extracted; both by
:func:`cntk_engine.datasets.load_cifar10`, which runs no code from the pickles), or an ``.npz`` with
``x_train`` (N, 32, 32, 3) uint8, ``y_train``, ``x_test``, ``y_test`` (channels-last).  Default:
``cifar10_jpeg_small.npz`` (5000 train / 2000 test) in $CNTK_ENGINE_DATA or ../shared/data.
The first ``--n-train`` / ``--n-test`` images are used (deterministic).

Writes <out-dir>/table1_<tag>_<date>.json and .md (accuracy, time and throughput per depth,
the paper's published figure where we have it).
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import numpy as np

if __package__ in (None, ""):
    sys.path.append(str(Path(__file__).resolve().parents[1]))
from bench.common import (BACKENDS, RESULTS, ScriptError, check_out_dir, choice_list,  # noqa: E402
                          devices, existing_file, gpu_info, gpu_sync, int_at_least, int_list,
                          machine, new_stem, non_finite_images, positive_float, result_header,
                          run_main, versions, write_json)
import cntk_engine as ce  # noqa: E402
from cntk_engine import solver  # noqa: E402
from cntk_engine.jobs.store import StoreMismatch, array_names  # noqa: E402
from cntk_engine.arch import make_architecture  # noqa: E402
from cntk_engine.datasets import CIFAR10_FOLDER, is_cifar10, load_cifar10  # noqa: E402
from cntk_engine.preprocess import preprocess as engine_preprocess  # noqa: E402

DEPTHS = (3, 4, 6, 11, 21)
CLASSES = np.arange(10)             # CIFAR-10 labels, also the column of each class in the targets
LOO_GRID = (0.0,) + tuple(10.0 ** np.arange(-7, 1))   # ridges for the LOO choice, x mean(diag K)
# Published Table 1 accuracies (%, full CIFAR-10, 50k train / 10k test) checked against a source:
# only CNTK-GAP depth 11; the other cells are shown as "not recorded", not filled from memory.
PUBLISHED = {("gap", 11): 77.43}
COLUMN = {"flatten": "CNTK-V", "gap": "CNTK-GAP"}
PAPER_FIX = {"flatten": False, "gap": True}


def default_data_dir() -> Path:
    env = os.environ.get("CNTK_ENGINE_DATA")
    return Path(env) if env else Path(__file__).resolve().parents[2] / "shared" / "data"


# ---------------------------------------------------------------------------- data
ACCEPTED = ("a directory holding the official CIFAR-10 python files data_batch_1 .. data_batch_5 "
            "and test_batch (or their folder cifar-10-batches-py), the official archive "
            "cifar-10-python.tar.gz, or an .npz with x_train (N, 32, 32, 3) uint8, y_train, x_test, "
            "y_test")


def load_cifar(path=None):
    """(x_train, y_train, x_test, y_test, source), images uint8 NCHW, labels int.

    ``path``: see ``ACCEPTED``; None = the shipped subset ``cifar10_jpeg_small.npz`` in
    $CNTK_ENGINE_DATA or ../shared/data.  Raises ValueError naming what is missing or malformed."""
    p = Path(path) if path else default_data_dir() / "cifar10_jpeg_small.npz"
    if not p.exists():
        raise ValueError(f"CIFAR-10 data {p} does not exist; accepted: {ACCEPTED}")
    if (p.is_dir() and (p / "cifar10_jpeg_small.npz").is_file() and not (p / "test_batch").exists()
            and not (p / CIFAR10_FOLDER).is_dir()):
        p = p / "cifar10_jpeg_small.npz"
    elif is_cifar10(p):
        d = load_cifar10(p)       # the official files, unpickled safely (cntk_engine.datasets)
        return d.x_train, d.y_train, d.x_test, d.y_test, d.source
    if p.suffix != ".npz":
        raise ValueError(f"{p} is neither a directory, a .tar.gz nor an .npz; accepted: {ACCEPTED}")
    try:
        d = np.load(p, allow_pickle=False)
    except (OSError, ValueError, EOFError) as e:
        raise ValueError(f"{p} is not a readable .npz archive ({type(e).__name__}); accepted: {ACCEPTED}") from None
    if not isinstance(d, np.lib.npyio.NpzFile):
        raise ValueError(f"{p} is a single .npy array, not an .npz archive; accepted: {ACCEPTED}")
    with d:
        missing = [k for k in ("x_train", "y_train", "x_test", "y_test") if k not in d.files]
        if missing:
            raise ValueError(f"{p} has no {', '.join(missing)} (it holds {', '.join(d.files)}); "
                             f"accepted: {ACCEPTED}")
        xs = [d["x_train"], d["x_test"]]
        for k, x in zip(("x_train", "x_test"), xs):
            if x.ndim != 4 or x.shape[-1] != 3:
                raise ValueError(f"{p}: {k} has shape {x.shape}; expected (N, H, W, 3) channels-last images")
        tr = np.ascontiguousarray(xs[0].transpose(0, 3, 1, 2))
        te = np.ascontiguousarray(xs[1].transpose(0, 3, 1, 2))
        ys = [np.asarray(d["y_train"]).ravel(), np.asarray(d["y_test"]).ravel()]
        for k, x, y in zip(("y_train", "y_test"), xs, ys):
            if len(y) != len(x):
                raise ValueError(f"{p}: {k} holds {len(y)} labels for {len(x)} images; one label per image "
                                 f"is needed")
            if y.dtype.kind not in "iu" or (len(y) and (y.min() < 0 or y.max() > 9)):
                shown = f"{y.min()}..{y.max()}" if y.dtype.kind in "iuf" and len(y) else str(y.dtype)
                raise ValueError(f"{p}: {k} must hold the CIFAR-10 classes, integers 0..9; got {shown}")
        return tr, ys[0], te, ys[1], str(p)


def load_cifar_for_cli(path):
    """load_cifar for the command lines: bad data (or images with NaN or Inf pixels) is a
    ScriptError naming --data."""
    import zipfile
    import zlib
    try:
        x_tr, y_tr, x_te, y_te, src = load_cifar(path)
    except (ValueError, OSError, EOFError, KeyError, zipfile.BadZipFile, zlib.error) as e:
        from bench.common import describe_error
        why = describe_error(e) if isinstance(e, (ValueError, OSError)) else \
            f"{path or 'the default data'} cannot be read ({type(e).__name__}: {e})"
        raise ScriptError(f"--data: {why}" + ("" if "accepted:" in why else f"; accepted: {ACCEPTED}")) from None
    for k, x in (("x_train", x_tr), ("x_test", x_te)):
        bad = non_finite_images(x)          # before the standardisation spreads them to every image
        if bad:
            raise ScriptError(f"--data {src}: {k} has NaN or Inf pixels in image(s) {bad} (positions "
                              f"in {k}); all pixels must be finite")
    return x_tr, y_tr, x_te, y_te, src


def preprocess(x_train, x_test, downsample=1):
    """The paper's preprocessing, per-channel standardisation with the training statistics
    (``cntk_engine``'s), then optionally F x F average pooling (a CPU option, not the paper's);
    float32."""
    try:
        a, b = engine_preprocess(x_train, x_test, "standardize")
        if downsample > 1:
            a, b = engine_preprocess(a, b, "none", downsample)
    except ValueError as e:
        raise ScriptError(str(e)) from None
    return a.astype(np.float32), b.astype(np.float32)


# ---------------------------------------------------------------------------- regression
def solve_device(n: int):
    """"cuda" for the solves of an n x n Gram when n >= 1500 and a GPU is usable (a 5000^2
    eigendecomposition takes seconds there, minutes on the CPU), else None (NumPy)."""
    return "cuda" if n >= 1500 and gpu_info() else None


def regression_accuracy(k_train, k_test, y_train, y_test, loo=False):
    """Test accuracy of kernel regression on the paper's targets (0.9 / -0.1), CIFAR-10 labels.

    ``loo=False``: the paper's solve, no ridge.  ``loo=True``: the ridge of ``LOO_GRID`` (x mean
    diagonal) with the best leave-one-out training accuracy, the smallest of equally good ones.
    Returns (test accuracy, relative ridge, LOO training accuracy); the last two None without
    ``loo``."""
    Y, _ = solver.paper_targets(y_train, CLASSES)
    device = solve_device(len(k_train))
    ridge, rel, loo_acc = 0.0, None, None
    if loo:
        scale = solver.ridge_scale(k_train)
        acc = solver.loo(k_train, Y, np.asarray(LOO_GRID) * scale, labels=y_train, device=device).accuracy
        i = int(np.nanargmax(acc))                  # the first, i.e. smallest, of the best ridges
        ridge, rel, loo_acc = float(LOO_GRID[i] * scale), LOO_GRID[i], float(acc[i])
    pred = solver.kernel_ridge(k_train, Y, k_test, ridge, device=device)
    return solver.accuracy(pred, y_test), rel, loo_acc


# ---------------------------------------------------------------------------- kernels
def scheduler_kwargs(args):
    """gram()'s devices= and client= from --devices and --dask-scheduler."""
    kw = {}
    if args.devices:
        kw["devices"] = args.devices
    if args.dask_scheduler:
        from dask.distributed import Client
        kw["client"] = Client(args.dask_scheduler)
    return kw


def kernels(xtr, xte, depths, pooling, fix, args, extra=None):
    """One pass for all depths: (get, timing), ``get(d)`` -> (ntk_tr, nngp_tr, ntk_te, nngp_te).

    In memory, or with ``--store DIR`` into two resumable Zarr stores per pooling
    (``DIR/<pooling>_train.zarr``, ``DIR/<pooling>_test.zarr``): an interrupted run started
    again computes only the missing tiles, and ``get(d)`` reads one depth at a time, so the
    full 50k CIFAR-10 needs the memory of one depth's matrices, not of all five.
    """
    kw = dict(depths=list(depths), pooling=pooling, fix=fix, kernel="both", backend=args.backend,
              dtype=args.dtype, tile=args.tile, **(extra or {}))
    ce.gram(xtr[:2], **kw)                         # warm-up: JIT compilation, CUDA module load
    gpu_sync()
    store = getattr(args, "store", None)
    paths = {}
    if store:
        Path(store).mkdir(parents=True, exist_ok=True)
        paths = {part: str(Path(store) / f"{pooling}_{part}.zarr") for part in ("train", "test")}
    def gram_into(part, *x):
        if not store:
            return ce.gram(*x, return_info=True, **kw)
        try:
            return ce.gram(*x, return_info=True, **kw, out=paths[part], progress=True)
        except StoreMismatch as e:
            raise ScriptError(f"--store {store}: {Path(paths[part]).name} holds the kernels of "
                             f"another run: {'; '.join(e.differences)}. Nothing was written; give "
                             "another --store folder for this run (the images differ when --data, "
                             "--n-train, --n-test or --downsample do)") from None

    t0 = time.perf_counter()
    ktr, info = gram_into("train", xtr)
    gpu_sync()
    t1 = time.perf_counter()
    kte, info_te = gram_into("test", xte, xtr)
    gpu_sync()
    t2 = time.perf_counter()
    n1, n2 = len(xtr), len(xte)
    pairs = n1 * (n1 + 1) // 2 + n1 * n2
    timing = {"backend": info["backend"], "seconds_train_train": t1 - t0, "seconds_test_train": t2 - t1,
              "seconds": t2 - t0, "unique_pairs": pairs, "unique_pairs_per_s": pairs / (t2 - t0)}
    if store:
        timing["store"] = paths
        done = info["tiles_computed"] + info_te["tiles_computed"]
        total = info["tiles_total"] + info_te["tiles_total"]
        timing["tiles_computed"], timing["tiles_total"] = done, total
        if done < total:   # a resumed pass: this run's seconds cover only part of the pairs
            timing["unique_pairs_per_s"] = None
            timing["note"] = (f"resumed: {total - done} of {total} tiles were already in the store, "
                              "so this run's time is not the pass's; see an uninterrupted run for pairs/s")

        names = array_names(list(depths), "both")        # depth_<d>/ntk, or ntk for one depth

        def get(d):
            return tuple(solver.load_gram(paths[part], names[(d, name)])
                         for part in ("train", "test") for name in ("ntk", "nngp"))
        return get, timing
    ks = {d: tuple(np.asarray(a.get() if hasattr(a, "get") else a) for a in (*ktr[d], *kte[d])) for d in depths}
    return ks.__getitem__, timing


def per_depth_throughput(x, depths, pooling, fix, args, m, extra=None):
    """Each depth on its own (one depth per pass) on the first m images: pairs/s per depth."""
    out = {}
    for d in depths:
        kw = dict(depth=d, pooling=pooling, fix=fix, kernel="both", backend=args.backend,
                  dtype=args.dtype, tile=args.tile, **(extra or {}))
        ce.gram(x[:2], **kw)
        gpu_sync()
        t = time.perf_counter()
        ce.gram(x[:m], **kw)
        gpu_sync()
        sec = time.perf_counter() - t
        out[d] = {"n": m, "seconds": sec, "unique_pairs_per_s": m * (m + 1) / 2 / sec}
    return out


def probe_rate(xtr, xte, depths, pooling, fix, args, extra=None, min_seconds=1.5, max_m=512):
    """Test x train pairs/s at the deepest depth: m x 2m blocks, m doubling from 8 until one
    call takes ``min_seconds`` (so a GPU is measured on blocks big enough to fill it)."""
    kw = dict(depths=[max(depths)], pooling=pooling, fix=fix, kernel="both", backend=args.backend,
              dtype=args.dtype, tile=args.tile, **(extra or {}))
    ce.gram(xte[:2], xtr[:2], **kw)
    gpu_sync()
    m = 8
    while True:
        a, b = xte[:m], xtr[:2 * m]
        t = time.perf_counter()
        ce.gram(a, b, **kw)
        gpu_sync()
        sec = time.perf_counter() - t
        if sec >= min_seconds or m >= max_m or 2 * m > min(len(xtr), len(xte) * 2):
            return {"m": m, "pairs": len(a) * len(b), "seconds": sec, "unique_pairs_per_s": len(a) * len(b) / sec}
        m *= 2


def fit_sizes(rate, budget_s, n_train_max, n_test_max):
    """Largest n_train (n_test = n_train * n_test_max / n_train_max, capped) whose
    n(n+1)/2 + n * n_test pairs fit ``budget_s`` at ``rate`` pairs/s."""
    ratio = n_test_max / n_train_max

    def pairs(n):
        nt = min(n_test_max, max(1, int(round(n * ratio))))
        return n * (n + 1) // 2 + n * nt, nt

    lo, hi = min(10, n_train_max), n_train_max
    if pairs(hi)[0] / rate <= budget_s:
        return hi, pairs(hi)[1]
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if pairs(mid)[0] / rate <= budget_s:
            lo = mid
        else:
            hi = mid - 1
    return lo, pairs(lo)[1]


# ---------------------------------------------------------------------------- main
def save_kernels_path(base, pooling) -> Path:
    """Where --save-kernels BASE puts the kernels of one pooling: BASE_<pooling>.npz."""
    return Path(Path(base).with_suffix("").as_posix() + f"_{pooling}.npz")


def check_writable_dir(folder, what, given=None) -> None:
    """End with the reason, before any kernel is computed, when nothing can be written into
    ``folder`` (so a bad path does not cost the whole pass); creates nothing.  ``given``: the
    option's value, when ``folder`` is derived from it (--save-kernels BASE: BASE's folder)."""
    if given is None:
        check_out_dir(folder, what)
        return
    try:
        check_out_dir(folder, what)
    except ScriptError as e:
        raise ScriptError(f"{what} {given}: cannot write into {folder}: "
                          f"{str(e).split(f'{what} {folder}: ', 1)[-1]}") from None


def check_architecture(depths, poolings, fix_arg) -> None:
    """The engine's own checks of each column's architecture, before any data is loaded: an
    impossible combination (e.g. a depth the engine refuses with fix=True) ends with the reason."""
    shown = ",".join(map(str, depths))
    for pooling in poolings:
        fix = PAPER_FIX[pooling] if fix_arg == "paper" else fix_arg == "true"
        how = (f"{COLUMN.get(pooling, pooling)} (--pooling {pooling}"
               + (f", whose --fix paper fixes the first and last layers" if fix_arg == "paper" and fix
                  else f", --fix {fix_arg}") + ")")
        if fix and min(depths) < 3:
            raise ScriptError(
                f"--depths {shown}: {how} needs every depth >= 3 (at depth 2 the only conv layer is the "
                "first, so nothing is trained and the NTK is 0); give depths >= 3"
                + (", or --fix false" if fix_arg != "false" else ""))
        try:
            make_architecture(depths=list(depths), pooling=pooling, fix=fix)
        except ValueError as e:
            raise ScriptError(f"--depths {shown}: {how}: {e}") from None


def run(args):
    depths, poolings = tuple(args.depths), args.pooling
    check_architecture(depths, poolings, args.fix)
    if args.dtype is None:
        args.dtype = "float64" if args.backend == "reference" else "float32"
    if args.backend == "reference" and args.dtype != "float64":
        raise ScriptError(f"--backend reference computes in float64 only; --dtype {args.dtype} would "
                          "label its results falsely: pass --dtype float64")
    if args.save_kernels:
        check_writable_dir(save_kernels_path(args.save_kernels, poolings[0]).parent, "--save-kernels",
                           args.save_kernels)
    check_writable_dir(args.out_dir, "--out-dir")
    if args.store:
        check_out_dir(args.store, "--store")
    x_tr, y_tr, x_te, y_te, src = load_cifar_for_cli(args.data)
    n_tr = min(args.n_train, len(x_tr))
    n_te = min(args.n_test, len(x_te))
    for asked, used, what in ((args.n_train, n_tr, "--n-train"), (args.n_test, n_te, "--n-test")):
        if used < asked:
            print(f"note: {what} {asked}: {src} holds {used} such images; using {used}", flush=True)
    xtr, xte = preprocess(x_tr, x_te, args.downsample)
    xtr_all, ytr_all, xte_all, yte_all = xtr[:n_tr], y_tr[:n_tr], xte[:n_te], y_te[:n_te]
    extra = scheduler_kwargs(args)
    stem = new_stem(args.out_dir, f"table1_{args.tag}")
    payload = {**result_header(), "kind": "table1", "machine": machine(), "gpu": gpu_info(),
               "versions": versions(), "data": src, "n_train": n_tr, "n_test": n_te,
               "image_shape": list(xtr.shape[1:]), "downsample": args.downsample,
               "backend": args.backend, "dtype": args.dtype, "depths": list(depths),
               "protocol": "Arora et al. 2019 Table 1: CNTK-V = flatten, fix=False; CNTK-GAP = gap, "
                           "fix=True; arora convention; targets 0.9/-0.1; ridge-free solve (paper) and "
                           "LOO-selected ridge (ours)",
               "solver": "cntk_engine.solver: kernel_ridge (Cholesky, float64), LOO ridge by solver.loo",
               "published": {f"{COLUMN[p]} depth {d}": v for (p, d), v in PUBLISHED.items()},
               "published_note": "full CIFAR-10 (50k train / 10k test); a subset scores lower",
               "columns": {}}
    for pooling in poolings:
        fix = PAPER_FIX[pooling] if args.fix == "paper" else args.fix == "true"
        probe = None
        c_tr, c_te = n_tr, n_te
        if args.time_budget:
            probe = probe_rate(xtr_all, xte_all, depths, pooling, fix, args, extra)
            c_tr, c_te = fit_sizes(probe["unique_pairs_per_s"], args.time_budget, n_tr, n_te)
            print(f"{COLUMN[pooling]}: probe {probe['unique_pairs_per_s']:.4g} pairs/s at depth {max(depths)}; "
                  f"--time-budget {args.time_budget:g} s -> {c_tr} train x {c_te} test", flush=True)
        xtr, ytr, xte, yte = xtr_all[:c_tr], ytr_all[:c_tr], xte_all[:c_te], yte_all[:c_te]
        c_tr, c_te = len(xtr), len(xte)            # the numbers of images actually used
        print(f"{COLUMN[pooling]}: {pooling}, fix={fix}, {c_tr} train x {c_te} test, "
              f"{xtr.shape[1:]} images, depths {list(depths)}, backend {args.backend}", flush=True)
        get_kernels, timing = kernels(xtr, xte, depths, pooling, fix, args, extra)
        rate = timing["unique_pairs_per_s"]
        print(f"  kernel pass: {timing['seconds']:.1f} s, "
              + (f"{rate:.4g} unique pairs/s" if rate else timing["note"]) + f" ({timing['backend']})", flush=True)
        rows = []
        for d in depths:
            ntk_tr, nngp_tr, ntk_te, nngp_te = get_kernels(d)
            row = {"depth": d}
            for name, ktr, kte in (("ntk", ntk_tr, ntk_te), ("nngp", nngp_tr, nngp_te)):
                row[f"{name}_acc_paper_solve"] = regression_accuracy(ktr, kte, ytr, yte)[0]
                if not args.no_loo:
                    (row[f"{name}_acc_loo_ridge"], row[f"{name}_ridge"],
                     row[f"{name}_loo_train_acc"]) = regression_accuracy(ktr, kte, ytr, yte, loo=True)
            row["published_ntk_acc"] = PUBLISHED.get((pooling, d))
            rows.append(row)
            print(f"  depth {d:2d}: NTK {100 * row['ntk_acc_paper_solve']:.2f}%"
                  + (f" (LOO ridge {100 * row['ntk_acc_loo_ridge']:.2f}%)" if not args.no_loo else "")
                  + f", NNGP {100 * row['nngp_acc_paper_solve']:.2f}%"
                  + (f", paper {row['published_ntk_acc']}%" if row["published_ntk_acc"] else ""), flush=True)
        col = {"pooling": pooling, "fix": fix, "n_train": c_tr, "n_test": c_te, "timing": timing,
               "rows": rows}
        if probe:
            col["probe"] = probe
        if args.per_depth_timing > 0:
            col["per_depth_throughput"] = per_depth_throughput(xtr, depths, pooling, fix, args,
                                                               min(args.per_depth_timing, c_tr), extra)
        payload["columns"][COLUMN[pooling]] = col
        write_json(Path(f"{stem}.json"), payload)
        if args.save_kernels:
            save_kernels_path(args.save_kernels, pooling).parent.mkdir(parents=True, exist_ok=True)
            np.savez_compressed(save_kernels_path(args.save_kernels, pooling),
                                y_train=ytr, y_test=yte, depths=np.array(depths),
                                pooling=pooling, fix=fix, image_shape=np.array(xtr.shape[1:]),
                                **{f"{k}_{d}": v for d in depths for k, v in
                                   zip(("ntk_train", "nngp_train", "ntk_test", "nngp_test"), get_kernels(d))})
    md = markdown(payload)
    Path(f"{stem}.md").write_text(md)
    print(md)
    print(f"wrote {stem}.json and {stem}.md")
    return payload


def markdown(p) -> str:
    g = p.get("gpu") or {}
    dev = g.get("name") or f"{p['machine']['cpu']} ({p['machine']['cores']} cores)"
    shape = "x".join(str(v) for v in p["image_shape"])
    lines = [f"Table 1 protocol, CIFAR-10 (at most {p['n_train']} train / {p['n_test']} test) "
             f"({shape} images{', downsampled x' + str(p['downsample']) if p['downsample'] > 1 else ''}), "
             f"backend {p['backend']} {p['dtype']} on {dev}, commit {p['commit']}.", "",
             f"Command: `{p['command']}`", ""]
    for colname, col in p["columns"].items():
        t = col["timing"]
        loo = "ntk_acc_loo_ridge" in col["rows"][0]
        lines.append(f"**{colname}** ({col['pooling']}, fix={col['fix']}, {col.get('n_train', p['n_train'])} train / "
                     f"{col.get('n_test', p['n_test'])} test): one pass for all depths, "
                     f"{t['seconds']:.1f} s, {t['unique_pairs']} unique pairs, "
                     + (f"{t['unique_pairs_per_s']:.4g} pairs/s" if t.get("unique_pairs_per_s") else t.get("note", "")))
        lines.append("")
        hdr = "| depth | CNTK acc (paper solve) |" + (" CNTK acc (LOO ridge) |" if loo else "") + \
              " NNGP acc (paper solve) | paper, full CIFAR-10 |"
        pdt = col.get("per_depth_throughput")
        if pdt:
            hdr += " pairs/s, this depth alone |"
        lines.append(hdr)
        lines.append("|" + "---|" * (hdr.count("|") - 1))
        for r in col["rows"]:
            pub = r.get("published_ntk_acc")
            s = f"| {r['depth']} | {100 * r['ntk_acc_paper_solve']:.2f}% |"
            if loo:
                s += f" {100 * r['ntk_acc_loo_ridge']:.2f}% |"
            s += f" {100 * r['nngp_acc_paper_solve']:.2f}% | {str(pub) + '%' if pub else 'not recorded'} |"
            if pdt:
                s += f" {pdt[r['depth']]['unique_pairs_per_s'] if r['depth'] in pdt else pdt[str(r['depth'])]['unique_pairs_per_s']:.4g} |"
            lines.append(s)
        lines.append("")
    lines.append("Paper figures are on the full 50k/10k CIFAR-10; a subset (and downsampled images) "
                 "scores lower. Only published cells we could verify are shown.")
    return "\n".join(lines) + "\n"


def parser():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default=None, help="CIFAR-10 python directory or .npz (default: the subset)")
    ap.add_argument("--n-train", type=int_at_least(1), default=2000)
    ap.add_argument("--n-test", type=int_at_least(1), default=1000)
    ap.add_argument("--pooling", type=choice_list(COLUMN), default="flatten",
                    help="flatten (CNTK-V), gap (CNTK-GAP) or gap,flatten")
    ap.add_argument("--depths", type=int_list(2), default=",".join(map(str, DEPTHS)),
                    help="comma list of depths (conv layers + 1, >= 2)")
    ap.add_argument("--fix", default="paper", choices=["paper", "true", "false"],
                    help="paper: fix=False for CNTK-V, True for CNTK-GAP (their README)")
    ap.add_argument("--backend", default="auto", choices=BACKENDS)
    ap.add_argument("--dtype", default=None, choices=["float32", "float64"],
                    help="compute dtype [float32; float64 for the reference, its only one]")
    ap.add_argument("--tile", type=int_at_least(1), default=None)
    ap.add_argument("--downsample", type=int_at_least(1), default=1,
                    help="average-pool images by this factor (CPU option)")
    ap.add_argument("--no-loo", action="store_true", help="skip the LOO ridge selection")
    ap.add_argument("--time-budget", type=positive_float, default=None,
                    help="seconds per kernel pass: measure pairs/s first, then shrink --n-train/--n-test "
                         "(same ratio) to fit")
    ap.add_argument("--per-depth-timing", type=int_at_least(0), default=16,
                    help="also time each depth alone on this many images (0: off)")
    ap.add_argument("--store", default=None, metavar="DIR",
                    help="compute the kernels into resumable Zarr stores in DIR (needs the zarr extra); "
                         "run the same command again to resume; solves read one depth at a time")
    ap.add_argument("--save-kernels", default=None, help="save the kernels (npz per pooling) for small_data.py")
    ap.add_argument("--devices", type=devices, default=None, help="gram(devices=...) (scheduler), e.g. all or 0,1")
    ap.add_argument("--dask-scheduler", default=None, help="gram(client=Client(address))")
    ap.add_argument("--out-dir", default=str(RESULTS))
    ap.add_argument("--tag", default="cpu", help="file tag: table1_<tag>_<date>.json")
    ap.add_argument("--merge", nargs="+", type=existing_file, default=None, metavar="JSON",
                    help="merge these result files (one column each) into table1_<tag>_<date>.json/.md")
    return ap


def merge(files, out_dir, tag):
    """Merge result files of separate runs (e.g. one per pooling) into one JSON + markdown."""
    import json
    parts = []
    for f in files:
        try:
            q = json.loads(Path(f).read_text())
            q["columns"], q["command"], q["n_train"], q["n_test"]
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise ScriptError(f"--merge: {f} is not a reproduce_table1 result file "
                              f"({type(e).__name__}: {e})") from None
        parts.append(q)
    if not parts:
        raise ScriptError("--merge: no files")
    out = dict(parts[0])
    out["columns"] = {}
    out["merged_from"] = [{"file": Path(f).name, "command": q["command"]} for f, q in zip(files, parts)]
    for q in parts:
        out["columns"].update(q["columns"])
    out["n_train"] = max(q["n_train"] for q in parts)
    out["n_test"] = max(q["n_test"] for q in parts)
    out["command"] = " ; ".join(q["command"] for q in parts)
    stem = new_stem(check_out_dir(out_dir, "--out-dir"), f"table1_{tag}")
    write_json(Path(f"{stem}.json"), out)
    md = markdown(out)
    Path(f"{stem}.md").write_text(md)
    print(md)
    print(f"wrote {stem}.json and {stem}.md")
    return out


def main(argv=None):
    return run_main(parser(), lambda args: merge(args.merge, args.out_dir, args.tag) if args.merge
                    else run(args), argv)


if __name__ == "__main__":
    main()
