"""``cntk-engine evaluate``: CNTK kernel regression on a labelled image set, test accuracy per depth.

    cntk-engine evaluate DATA --depth 11 --pooling gap --n-train 1000 --n-test 1000 [--ridge auto]
    cntk-engine evaluate DATA --depths 3,4,6,11 ...      # every depth from ONE kernel pass
    python -m cntk_engine evaluate DATA ...              # the same without the CLI entry point

DATA is a ``.npz`` archive holding either ``x_train, y_train, x_test, y_test`` (a random subset
of ``--n-train`` / ``--n-test`` of each is used, drawn with ``--seed``) or ``x, y`` (shuffled
with ``--seed`` and split: the first ``--n-train`` for training, the next ``--n-test`` for
testing; ``preprocess --n-train --n-test --seed`` writes the same subsets into a file for Gram
jobs), or CIFAR-10's python version as downloaded (``cifar-10-python.tar.gz`` or its folder
``cifar-10-batches-py``, :mod:`cntk_engine.datasets`).  Images: (N, H, W) (one channel),
(N, C, H, W) or (N, H, W, C), any integer or float dtype; ``--data-format auto`` (default)
reads a 4-D array as NHWC when its last axis is 1 or 3 and its second is not, as NCHW in the
opposite case, and otherwise by the axis that is strictly
the smallest of the three image axes ((N, 2, 6, 6): NCHW; (N, 32, 32, 4): NHWC); where none is,
it asks for ``--data-format``.  Labels: integers (whole-number floats such as 3.0 too), strings
or bytes (classes are the sorted labels of the training subset); fractional numbers (regression
targets) and test labels of another kind than the training labels (strings against bytes or
numbers) are refused.  Test labels of classes the training subset lacks are warned about.

Steps: preprocessing (:mod:`cntk_engine.preprocess`: ``--preprocess standardize``, the
paper's per-channel mean / std of the training images; ``--downsample F`` average-pools F x F
first, a CPU-feasibility option), the test-vs-train kernel and the train Gram with ONE ``gram``
call each (``depths=[...]``; the test kernel first: its checks cover both image sets, so images
the kernels cannot take are refused before either is computed), then for every depth and kernel
:func:`cntk_engine.solver.evaluate_classifier`: kernel regression on the paper's targets
(0.9 / -0.1) with ``--ridge`` (a number relative to the mean diagonal of the train Gram, or
``auto``: exact leave-one-out accuracy over :data:`cntk_engine.solver.RELATIVE_RIDGE_GRID`,
leaving out together the training images DATA's ``groups_train`` puts in one group, where
it holds one (one label per image of ``x_train``; the drawn images keep theirs), and with
``--augment-flips`` each training image with its flipped copy (in its image's group, or in a
group of its own with its image), groups for :func:`cntk_engine.solver.loo`; the ridge-0
"paper solve" is reported next to it).  ``--json OUT`` writes every figure, the command and
the machine.  Errors are one line on stderr with exit status 2; ``--zca`` and ``--preprocess``
together are an error.

``--store DIR`` keeps the two kernels in DIR as resumable Zarr stores (``train.zarr``: the train
Gram, ``test.zarr``: the test-vs-train kernel; layout: :mod:`cntk_engine.jobs.store`), tile by
tile as they are computed.  A run that stopped (killed, out of time on a GPU visit, a machine
shut down) continues with the same command plus ``--resume``: only the missing tiles are
computed, the finished ones are verified against their checksums, and the solve reads the
kernels back from the stores.  Stores of another job (other images, seed, preprocessing,
architecture, backend or dtype) are refused with the differences; without ``--resume`` a DIR
that already holds either store is refused.
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import shlex
import sys
import time
from pathlib import Path

import numpy as np

from .. import solver
from ..arch import kernel_names
from ..datasets import is_cifar10
from ..preprocess import ConstantImages, preprocess, with_flips
from ..spelling import images_as, renamed
from .common import (GROUPS_TRAIN, JSON_HELP, PROG, CliError, add_architecture_options,
                     add_preprocessing_options, add_run_options, add_solve_options, check_json_path,
                     check_parent_folder, check_path_name, dropped_by_downsampling, gram_options,
                     log, log_zca_fit, machine, nonnegative_int, parse_ridge, plural,
                     preprocessing_options, preprocessing_record, to_nchw, write_json)
from .subsets import EVALUATE_N, Drawn, draw


# ----------------------------------------------------------------------------- parser
def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "evaluate", help="kernel regression on labelled images: test accuracy per depth",
        description="Compute the CNTK train Gram and test-vs-train kernel of a labelled image "
        "set (all --depths from one pass), solve kernel regression, print the test accuracy "
        "(and the LOO-selected ridge) per depth.",
        epilog="DATA keys: x_train, y_train, x_test, y_test (random subsets of --n-train / "
        "--n-test), or x, y (shuffled and split); groups_train (a label per image of x_train), "
        "where given, the leave-one-out groups left out together.")
    p.add_argument("data", metavar="DATA", help=".npz with x_train, y_train, x_test, y_test, or x, y; "
                   "or CIFAR-10's cifar-10-python.tar.gz (or its folder cifar-10-batches-py)")
    add_architecture_options(p)
    p.add_argument("--n-train", type=int, default=EVALUATE_N,
                   help=f"training images (default {EVALUATE_N})")
    p.add_argument("--n-test", type=int, default=EVALUATE_N, help=f"test images (default {EVALUATE_N})")
    add_solve_options(p)
    add_preprocessing_options(p, default="standardize")
    p.add_argument("--augment-flips", action="store_true",
                   help="train on the training images and their horizontal flips (twice the "
                   "training set; leave-one-out leaves each image out with its flip; --flip "
                   "symmetrises the kernel instead)")
    p.add_argument("--seed", type=nonnegative_int, default=0, help="subset / split seed (default 0)")
    add_run_options(p, data_formats=("auto", "NCHW", "NHWC"), default_format="auto")
    p.add_argument("--json", metavar="OUT", default=None,
                   help=f"write the results as JSON to OUT {JSON_HELP}")
    p.add_argument("--store", metavar="DIR", default=None,
                   help="keep the kernels in DIR as resumable Zarr stores (train.zarr, test.zarr), "
                   "tile by tile; a run that stopped continues with --resume")
    p.add_argument("--resume", action="store_true",
                   help="continue the kernels kept in --store DIR (only missing tiles are "
                   "computed; stores of another job are refused); starts them if DIR has none")
    p.set_defaults(func=run)
    return p


# ----------------------------------------------------------------------------- data
def load_data(path: str, n_train: int, n_test: int, seed: int, data_format: str = "auto") -> Drawn:
    """The subsets (or split) of a .npz (or of CIFAR-10's python version) that evaluate uses, as
    documented, with the method of an archive that ``cntk-engine preprocess`` wrote."""
    drawn = draw(path, n_train, n_test, seed, data_format=data_format, default_n=EVALUATE_N)
    if is_cifar10(path):
        return drawn
    with np.load(path, allow_pickle=False) as z:
        rec = preprocessing_record(z)
    if rec is None or "preprocess" not in rec:
        return drawn
    if rec.get("fitted_on") == "x" and drawn.train_key == "x":
        # x was preprocessed as one set: the test images evaluate draws from it are in the fit
        raise CliError(f"DATA {path!r} was written by cntk-engine preprocess with --preprocess "
                       f"{rec['preprocess']} fitted on all of its x, so the test images evaluate "
                       "would draw from x were part of the fit (their statistics are in it): give "
                       "evaluate the DATA preprocess read (it fits on the training images it "
                       "draws), or preprocess with --n-train and --n-test (evaluate's split, "
                       "fitted on its training images)")
    return dataclasses.replace(drawn, preprocessed=str(rec["preprocess"]))


def _command_line(args) -> str:
    """The command that ran: as given to ``cli.main`` (the shell's words, or ``cli.main([...])``'s
    list), or, for ``run(args)`` called from Python, the equivalent command with every option."""
    argv = getattr(args, "argv", None)
    if argv is None:
        argv = ["evaluate", str(args.data)]
        parser = add_parser(argparse.ArgumentParser().add_subparsers())
        given = set()        # one option per destination (--preprocess zca, not also --zca)
        for a in parser._actions:
            v = getattr(args, a.dest, None)
            if (not a.option_strings or a.dest == "help" or v is None or v is False
                    or a.dest in given):
                continue
            given.add(a.dest)
            if a.nargs == 0:        # a flag: given when the value is the one it stores
                if v == a.const:
                    argv.append(a.option_strings[0])
                continue
            argv += [a.option_strings[0], str(v)]
    return "cntk-engine " + shlex.join(str(v) for v in argv)


# ----------------------------------------------------------------------------- kernel stores
KERNEL_STORES = {"train": "train.zarr", "test": "test.zarr"}


def check_store(args) -> tuple[Path | None, set[str]]:
    """The --store folder, checked before any data is read or kernel computed (None without
    --store), and which of its kernel stores it holds ("train", "test"): its parent must exist,
    it must be a folder if it exists, and the stores it holds are continued only with --resume."""
    if args.store is None:
        if args.resume:
            raise CliError("--resume continues the kernels kept in a --store DIR; give --store DIR "
                           "(the folder of the run to continue)")
        return None, set()
    if not args.store:
        raise CliError("--store '' is empty; give the folder to keep the kernels in, e.g. 'kernels/'")
    d = Path(args.store)
    check_path_name(d, "--store")
    if (d.exists() or d.is_symlink()) and not d.is_dir():
        raise CliError(f"--store {args.store!r} exists and is not a folder; give a folder path, "
                       "e.g. 'kernels/'")
    check_parent_folder(d, "--store")
    writable = d if d.is_dir() else d.parent
    if not os.access(writable, os.W_OK | os.X_OK):
        raise CliError(f"--store {args.store!r}: the folder {str(writable)!r} is not writable")
    from ..jobs.store import is_store, require_zarr
    try:
        require_zarr()
    except ImportError as e:
        raise CliError(f"--store {e}") from None
    # something that is not a store where a kernel store goes: refused as such (--resume cannot
    # continue it); stores are continued only with --resume
    takes = (f"--store DIR keeps the kernels in DIR/{KERNEL_STORES['train']} and "
             f"DIR/{KERNEL_STORES['test']}: move that path away or choose another folder")
    kept = {which for which, name in KERNEL_STORES.items() if is_store(d / name, "--store ", takes)}
    if kept and not args.resume:
        held = " and ".join(KERNEL_STORES[which] for which in KERNEL_STORES if which in kept)
        raise CliError(f"--store {args.store!r} already holds {held}; pass --resume "
                       "to continue the kernels kept there (refused if they are another job's), "
                       "or choose another folder")
    if args.resume and not kept:
        print(f"{PROG}: note: --resume: no kernel stores in --store {args.store!r}; starting new ones",
              file=sys.stderr)
    return d, kept


def kernels(gram, x1, x2, opts: dict, depths: list[int], store: Path | None, which: str, names):
    """({depth: {kernel name: loader}}, info) of ``gram(x1, x2)`` over ``depths``, a loader
    being a call that returns that kernel matrix: computed in memory without ``store``; with
    it, into the Zarr store ``store / KERNEL_STORES[which]`` (continued if it holds this job,
    refused if it holds another), each matrix read back from it when its loader is called (one
    Gram in memory at a time: at 50,000 training images one is 18.6 GiB), every chunk checked
    against its checksum.  ``names``: how errors name image i of x1 and x2
    (:func:`cntk_engine.spelling.images_as`)."""
    from ..jobs.store import StoreMismatch, StorePath, array_names, load_gram
    picked = kernel_names(opts["kernel"])
    if store is None:
        with images_as(names):
            result, info = gram(x1, x2, **opts, return_info=True)
        result = result if isinstance(result, dict) else {depths[0]: result}
        return {d: {k: (lambda a=a: a) for k, a in zip(picked, r if opts["kernel"] == "both" else (r,))}
                for d, r in result.items()}, info
    created = not store.exists()
    store.mkdir(exist_ok=True)
    try:
        # the store's differences name the images this command drew, not DATA's file
        with renamed({"x1": {"train": "the training images", "test": "the test images"}[which],
                      "x2": "the training images"}), images_as(names):
            group, info = gram(x1, x2, **opts, return_info=True,
                               out=StorePath(store / KERNEL_STORES[which], existing="resume"))
    except StoreMismatch as e:
        images = any("images" in d for d in e.differences)
        raise CliError(
            f"--store {str(store)!r}: {KERNEL_STORES[which]} holds the kernels of another run: "
            + "; ".join(e.differences) + ". Nothing was written"
            + ("; the images differ when DATA, --n-train, --n-test, --seed, --preprocess / --zca "
               "(and --zca-reg), --downsample or --augment-flips do" if images else "")
            + ". Give another --store folder for this run") from None
    except BaseException:
        if created:         # refused before anything was written there: no empty --store left
            try:
                store.rmdir()
            except OSError:
                pass
        raise
    names = array_names(depths, opts["kernel"])
    return {d: {k: (lambda name=names[(d, k)]: load_gram(group, name)) for k in picked}
            for d in depths}, info


def _tiles(info) -> str:
    return f"{info['tiles_computed']} of {plural(info['tiles_total'], 'tile')} computed"


# ----------------------------------------------------------------------------- report
def _rel(v) -> str:
    return "0" if v == 0 else f"{v:.3g}"


def _fmt_line(depth, name, r, with_flips: bool = False, own_groups: bool = False) -> str:
    s = f"  depth {depth:>2} {name:4s}: test accuracy {100 * r['accuracy']:6.2f}%  ridge {_rel(r['ridge_relative'])} x mean diag"
    if r.get("ridge_selected_by") == "loo":
        left_out = ("each of DATA's groups_train left out together" if own_groups else
                    "each image left out with its flip" if with_flips else None)
        s += (" (LOO-selected" + (f", {left_out}" if left_out else "")
              + (", each flip in its image's group" if own_groups and with_flips else "")
              + f"; LOO accuracy {100 * r['loo_accuracy']:.2f}%)")
    if r.get("jitter"):
        s += f" [jitter {r['jitter']:.2g} added]"
    if r.get("ridge0_error"):
        s += "; ridge 0 (paper solve): none, K is not positive definite enough for it"
    elif "accuracy_ridge0" in r:
        s += f"; ridge 0 (paper solve): {100 * r['accuracy_ridge0']:.2f}%"
        if r.get("jitter_ridge0"):
            s += f" [jitter {r['jitter_ridge0']:.2g}]"
    return s


# ----------------------------------------------------------------------------- run
def run(args) -> int:
    from ..api import gram
    ridge = parse_ridge(args.ridge)
    # every option error before the data is read and the kernels computed
    if args.augment_flips and args.flip:
        from ..estimators import FLIPS_TWICE
        raise CliError(FLIPS_TWICE.format(augment="--augment-flips", flip="--flip"))
    zca_reg = preprocessing_options(args)
    opts, arch = gram_options(args)
    if args.backend != "auto":          # evaluate computes here: an unusable backend, said now
        from ..backends import unavailable_reason
        why = unavailable_reason(args.backend)
        if why is not None:
            raise CliError(f"--backend {args.backend!r} is unavailable: {why}")
    depths = list(arch.depths)
    if arch.layers is None:
        opts.update(depth=None, depths=depths)      # {depth: result} even for one depth
    if args.json is not None:
        check_json_path(args.json, inputs={"DATA": args.data, "--store": args.store})
    store, kept = check_store(args)
    drawn = load_data(args.data, args.n_train, args.n_test, args.seed, args.data_format)
    if drawn.preprocessed not in (None, "none") and args.preprocess != "none":
        log.warning("DATA %r was written by cntk-engine preprocess (%s); --preprocess %s is "
                    "applied to its images again: pass --preprocess none to use them as they are",
                    args.data, drawn.preprocessed, args.preprocess)
    xtr, ytr, xte, yte, how = drawn.x_train, drawn.y_train, drawn.x_test, drawn.y_test, drawn.layout
    xtr = to_nchw(xtr, args.data_format, f"DATA {args.data!r}")
    xte = to_nchw(xte, args.data_format, f"DATA {args.data!r}")
    if xtr.shape[1:] != xte.shape[1:]:
        raise CliError(f"train and test images differ in shape: {xtr.shape[1:]} and {xte.shape[1:]}")
    raw_shape = tuple(int(v) for v in xtr.shape[1:])
    log_zca_fit(args.preprocess, xtr, args.downsample)
    try:
        xtr, xte = preprocess(xtr, xte, args.preprocess, args.downsample, zca_reg=zca_reg,
                              data_format="NCHW")
    except ConstantImages as e:
        test = e.role == "x_test"
        n_all = len(xte if test else xtr)
        if len(e.indices) < n_all and drawn.undrawn[1 if test else 0]:
            remedy = "use another --seed, or --preprocess standardize"
        else:         # another --seed draws the same images, or likely constant ones again
            every = (f"all {n_all} are" if len(e.indices) == n_all else
                     f"every one of DATA's {'test' if test else 'training'} images is drawn")
            remedy = (f"{every}, so no --seed helps: use --preprocess standardize (it takes "
                      "constant images), or check DATA")
        raise CliError(str(e.reworded(f"--zca: the {'test' if test else 'training'}", remedy,
                                      named=drawn.test_image if test else drawn.training_image))) from None
    except ValueError as e:     # e.g. integer training pixels against float test pixels
        raise CliError(f"DATA {args.data!r}: {e}") from None
    groups = drawn.groups_train                  # DATA's own, where it holds them
    if args.augment_flips:
        xtr, ytr, pairs = with_flips(xtr, ytr, data_format="NCHW")
        groups = pairs if groups is None else np.concatenate([groups, groups])
    shape = tuple(int(v) for v in xtr.shape[1:])
    classes = np.unique(ytr)
    if len(classes) < 2:
        raise CliError(f"the {len(ytr)} training images hold one class only ({classes[0]}); "
                       "use a larger --n-train or another --seed")
    solver.check_classifier_labels(ytr, yte, targets=args.targets)   # warned once, before work
    if not np.any(xtr):          # K = 0: every prediction 0, the "accuracy" that of one class
        raise CliError(f"every training image is 0 after --preprocess {args.preprocess}"
                       + (" (each channel is constant over the training images, and is only centred)"
                          if args.preprocess == "standardize" else "")
                       + ": the kernel would be 0 and predict nothing; use other data or another --seed")
    source = ""
    if args.downsample > 1:
        cut = dropped_by_downsampling(raw_shape, args.downsample)
        source = (f" (from {raw_shape}, downsampled {args.downsample}x"
                  + (f", {cut})" if cut else ")"))
    print(f"evaluate: {args.data} ({how}), {len(xtr)} train"
          + (" (with their flips)" if args.augment_flips else "") + f" / {len(xte)} test images, "
          f"(C, H, W) = {shape}{source}"
          + f", {len(classes)} classes, preprocess {args.preprocess}, seed {args.seed}")
    kernel = args.kernel

    def training(i):
        return drawn.training_image(i, flipped=args.augment_flips)
    jobs = {"test": (xte, xtr, {"x1": drawn.test_image, "x2": training}),
            "train": (xtr, None, {"x1": training})}
    # The test kernel first: its checks cover both image sets (and its store record both), so a
    # set the kernels cannot take, or a kept test.zarr of another run, is refused before either
    # kernel is computed.  Only a kept train.zarr without a test.zarr (a run stopped between
    # them) goes first: a train.zarr of another run is refused when it is opened, before work.
    done, seconds = {}, {}
    for which in ("train", "test") if kept == {"train"} else ("test", "train"):
        t = time.perf_counter()
        done[which] = kernels(gram, *jobs[which][:2], opts, depths, store, which, jobs[which][2])
        seconds[which] = time.perf_counter() - t
    (ktr, info_tr), (kte, info_te) = done["train"], done["test"]
    t2 = time.perf_counter()
    pairs = info_tr["unique_pairs"] + info_te["unique_pairs"]
    computed = info_tr["pairs_computed"] + info_te["pairs_computed"]
    pooling = args.pooling + (f" (window {args.lap_window})" if args.pooling == "lap" else "")
    print(f"kernels: {args.architecture}, depths {depths}, pooling {pooling}, flip {args.flip}, "
          f"fix {args.fix}, {kernel}, backend "
          f"{info_tr['backend']} ({info_tr.get('where', '')}, {info_tr['dtype']}): train Gram "
          f"{seconds['train']:.1f} s, test kernel {seconds['test']:.1f} s, {pairs} pairs"
          + (f" ({computed} computed in this run)" if computed != pairs else "")
          + (f", {computed / sum(seconds.values()):.4g} pairs/s" if computed else ""))
    if store is not None:
        print(f"store: {store}: train Gram {_tiles(info_tr)}, test kernel {_tiles(info_te)}")
    results = []
    rounding = solver.rounding_of(info_tr["dtype"])     # of the dtype the Grams were computed in
    for d in depths:
        for name in kernel_names(kernel):
            # one (train Gram, test kernel) in memory at a time: read from --store here
            K, Kt = ktr[d][name](), kte[d][name]()
            r = solver.evaluate_classifier(K, Kt, ytr, yte, ridge=ridge, targets=args.targets,
                                           groups=groups, warn_unseen=False, rounding=rounding)
            del K, Kt
            r.update(depth=d, kernel=name)
            results.append(r)
            print(_fmt_line(d, name, r, with_flips=args.augment_flips,
                            own_groups=drawn.groups_train is not None))
    print(f"solve: {time.perf_counter() - t2:.1f} s")
    if args.json is not None:
        rec = dict(command=_command_line(args),
                   data=str(args.data), n_train=len(drawn.y_train), n_test=len(xte),
                   train_kernel_images=len(xtr),        # with --augment-flips: and their flips
                   image_shape=shape,
                   raw_image_shape=raw_shape, data_format=args.data_format,
                   downsample=args.downsample, preprocess=args.preprocess,
                   seed=args.seed, architecture=args.architecture, depths=depths, kernel=kernel,
                   pooling=args.pooling, lap_window=args.lap_window, flip=args.flip,
                   zca_reg=zca_reg if args.preprocess == "zca" else None,
                   augment_flips=args.augment_flips,
                   # DATA's groups, where its leave-one-out used them (as solve's record says)
                   groups=GROUPS_TRAIN if drawn.groups_train is not None and ridge == "auto"
                   else None, fix=args.fix,
                   convention=args.convention, W_std=args.W_std, b_std=args.b_std,
                   filter_size=args.filter_size, targets=args.targets, ridge=ridge,
                   backend=info_tr["backend"], dtype=info_tr["dtype"], tile=args.tile,
                   tile_used=info_tr.get("tile"),
                   seconds=dict(train_gram=seconds["train"], test_kernel=seconds["test"],
                                solve=time.perf_counter() - t2),
                   pairs=pairs, pairs_computed=computed, store=None if store is None else str(store),
                   tiles=None if store is None else {
                       which: dict(computed=info["tiles_computed"], total=info["tiles_total"])
                       for which, info in (("train", info_tr), ("test", info_te))},
                   machine=machine(), results=results)
        write_json(args.json, rec, what=f"--json {args.json!r}")
        print(f"results written to {args.json}")
    return 0
