"""``cntk-engine preprocess``: a training and a test set whitened (ZCA) or standardised for
``gram`` jobs, the transformation fitted on the training images only.

    cntk-engine preprocess cifar.npz --zca --out cifar_zca.npz
    cntk-engine gram cifar_zca.npz:x_train --architecture myrtle10 --flip --out train.zarr
    cntk-engine gram cifar_zca.npz:x_test --x2 cifar_zca.npz:x_train --architecture myrtle10 \\
        --flip --out test.zarr
    cntk-engine solve cifar_zca.npz --train train.zarr --test test.zarr

``evaluate --zca`` preprocesses the subsets it draws in memory; a Gram job at scale reads its
images from files, so the whitening is made once, here, and both of its kernels are computed
from the one file (their stores' fingerprints then tie the test kernel to the training Gram,
and both to the file's labels: ``cntk-engine solve``, :func:`cntk_engine.solver.load_train_test`).

DATA is an ``.npz`` archive holding ``x_train`` and ``x_test`` (the preprocessing is fitted on
``x_train`` and applied to both) or ``x`` alone (fitted on and applied to ``x``), or CIFAR-10's
python version as downloaded (``cifar-10-python.tar.gz``, or the folder ``cifar-10-batches-py``:
its 50,000 training and 10,000 test images and their labels, :mod:`cntk_engine.datasets`, which
runs no code from the pickles); images
(N, H, W), (N, C, H, W) or (N, H, W, C) read as ``gram`` reads them (``--data-format``).  The
transformations are :func:`cntk_engine.preprocess.preprocess`'s, as ``evaluate --preprocess``
applies them: ``--downsample F`` first, then ``standardize``, ``scale``, ``zca`` (``--zca-reg``)
or ``none``.

``--n-train N`` / ``--n-test M`` (``--seed S``, default 0) take the subsets that ``evaluate
--n-train N --n-test M --seed S`` takes of the same DATA (:mod:`.subsets`: the same images in
the same order; one of the two left out: all of that set, which ``evaluate`` draws given that
set's size, as the output and the record's ``subset.as`` say; a DATA of ``x, y`` is split as
``evaluate`` splits it, and needs both), and the preprocessing is fitted on that training
subset, as ``evaluate`` fits it: the Gram jobs on OUT and ``solve`` then give ``evaluate``'s
figures, and a recipe can be tried on a few thousand images before the whole set.  They need
DATA's labels (``y_train``, ``y_test``; or ``y``); OUT holds the subsets as ``x_train``,
``y_train``, ``x_test``, ``y_test`` and where each image is in DATA (``index_train``,
``index_test``: positions in ``x_train`` / ``x_test``, or both in ``x``), the drawn training
images' labels of DATA's ``groups_train`` where it holds one (``evaluate`` leaves each group
out together, as ``solve`` then does), and not DATA's other arrays (their rows, if they have one
per image, would no longer be the images').

``--augment-flips`` makes the training set ``evaluate --augment-flips`` trains on: ``x_train``
(after the preprocessing, fitted on the images themselves) followed by the horizontal flips of
its images, ``y_train`` and ``index_train`` repeated for them, and ``groups_train`` (image i
and its flip N + i in group i; DATA's own ``groups_train`` (the subset's), repeated, where it
holds one), with which ``solve``'s leave-one-out leaves each image out together with its
flip, as ``evaluate``'s does; DATA's other arrays are not copied.  ``gram --flip`` refuses that
training set (the record says what it is), and ``evaluate`` and the subsets here refuse it as
DATA: under the flip-symmetrised kernel a flip is the same point as its image, and a subset
would split images from their flips.

OUT is a new ``.npz`` archive: the images as float64 (N, C, H, W), DATA's other arrays (labels,
...) unchanged (but for a subset's or ``--augment-flips``, above), and ``preprocessing``, a
JSON text saying what was done (the method and its parameters, the set it was fitted on, the
subsets drawn, whether flips were added, DATA, the layout read, the package version).  It is
written to a temporary file beside OUT and moved into place whole; an existing OUT is refused.
"""
from __future__ import annotations

import json
import os
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..datasets import is_cifar10
from ..preprocess import ConstantImages, preprocess, with_flips
from .common import (GROUPS_TRAIN, PREPROCESSING_RECORD, CliError, add_preprocessing_options,
                     check_parent_folder, check_path_name, command_of, dropped_by_downsampling,
                     guess_layout, log_zca_fit, nonnegative_int, open_data, preprocessing_options,
                     preprocessing_record, read_member, shell_arg, to_nchw, write_file)
from .subsets import check_sizes, draw_from

#: The key of OUT's record of what was done.
RECORD = PREPROCESSING_RECORD


def add_parser(sub) -> None:
    p = sub.add_parser("preprocess", help="whiten (ZCA) or standardise images for gram jobs, "
                       "fitted on the training images",
                       description="Fit a preprocessing on x_train (or x) of DATA, apply it to "
                       "x_train and x_test, and write them as float64 NCHW images to the new "
                       ".npz --out, for cntk-engine gram.",
                       epilog="DATA keys: x_train and x_test (fitted on x_train), or x; other "
                       "arrays are copied unchanged. With --n-train / --n-test: x_train, y_train, "
                       "x_test, y_test or x, y (split as evaluate splits it), and only the "
                       "subsets, their labels and positions in DATA (and DATA's groups_train of "
                       "x_train, the drawn images') are written. With --augment-flips: the "
                       "training labels (and DATA's groups_train) repeated for the flips, "
                       "groups_train pairing each image with its flip where DATA has none, other "
                       "arrays not copied.")
    p.add_argument("data", metavar="DATA", help=".npz with x_train and x_test, or x; or "
                   "CIFAR-10's cifar-10-python.tar.gz (or its folder cifar-10-batches-py)")
    add_preprocessing_options(p, default=None)
    p.add_argument("--data-format", choices=("auto", "NCHW", "NHWC"), default="auto",
                   help="layout of DATA's 4-D images (auto: as gram decides it)")
    p.add_argument("--n-train", type=int, default=None, metavar="N",
                   help="only N training images, drawn as evaluate --n-train draws them (needs "
                   "DATA's labels; default: all)")
    p.add_argument("--n-test", type=int, default=None, metavar="M",
                   help="only M test images, drawn as evaluate --n-test draws them (default: all)")
    p.add_argument("--seed", type=nonnegative_int, default=None,
                   help="the seed of the subsets' draw, as evaluate's (default 0)")
    p.add_argument("--augment-flips", action="store_true",
                   help="x_train followed by the horizontal flips of its images, as evaluate "
                   "--augment-flips trains (twice the training Gram's rows); groups_train keeps "
                   "each image with its flip for solve's leave-one-out")
    p.add_argument("--out", required=True, metavar="NEW.npz",
                   help="the .npz archive to write (must not exist)")
    p.set_defaults(func=run)


def _check_out(out: str, data: Path) -> Path:
    if not out:
        raise CliError("--out '' is empty; give the path of the .npz archive to write, e.g. "
                       "cifar_zca.npz")
    p = Path(out)
    check_path_name(p, "--out")
    if p.suffix != ".npz":
        raise CliError(f"--out {out!r} must end in .npz: an archive, whose arrays gram reads as "
                       f"OUT.npz:x_train; e.g. {str(p.with_suffix('.npz'))!r}")
    if p.exists() or p.is_symlink():
        what = "is DATA itself" if p.resolve() == data.resolve() else "exists"
        raise CliError(f"--out {out!r} {what}; refusing to overwrite it: give a new path")
    check_parent_folder(p, "--out")
    if not os.access(p.parent, os.W_OK | os.X_OK):
        raise CliError(f"--out {out!r}: the folder {str(p.parent)!r} is not writable")
    return p


@dataclass(frozen=True)
class Sets:
    """What ``preprocess`` read from DATA: ``images`` {OUT's key: NCHW images}, the set fitted
    on first; ``others`` the arrays written unchanged beside them; ``layouts`` {key: the layout
    read}; ``named`` {key: image i -> its name in DATA}; ``not_arrays`` DATA's members that are
    not arrays and ``left_out`` the arrays not written (a subset's), both said, not copied;
    ``subset`` the record of the draw (None: every image)."""

    images: dict
    others: dict
    layouts: dict
    named: dict
    not_arrays: list
    left_out: list
    subset: dict | None


def _read_sets(path: Path, data_format: str, subset: tuple | None) -> Sets:
    """DATA's images (all, or ``subset`` = (n_train, n_test, seed) drawn as ``evaluate`` draws
    them) and the arrays to write beside them."""
    z = open_data(path, data_format, "DATA")
    if not hasattr(z, "files"):
        raise CliError(f"DATA {str(path)!r} is a .npy array; preprocess needs an .npz archive with "
                       "x_train and x_test (fitted on x_train), or x, or CIFAR-10's python version")
    with z:
        names = list(z.files)
        if RECORD in names:
            if preprocessing_record(z) is None:     # a member of the user's own, not a record
                raise CliError(f"DATA {str(path)!r} holds a member named {RECORD!r}, the name of "
                               "the record preprocess writes: rename it")
            raise CliError(f"DATA {str(path)!r} holds a {RECORD!r} record: it was written by "
                           "cntk-engine preprocess already; preprocess the original images")
        if subset is None:
            keys = _image_keys(path, names)
            arrays = {k: read_member(z, k, path) for k in names}
        else:
            n_train, n_test, seed = subset
            drawn = draw_from(z, str(path), n_train, n_test, seed,
                              needs="preprocess --n-train / --n-test needs")
    del z           # with a subset, of CIFAR-10's arrays read whole only the drawn are kept
    if subset is None:
        # members that are not arrays (a text file zipped in) are not copied: np.load gives
        # their bytes
        not_arrays = [k for k, v in arrays.items() if not isinstance(v, np.ndarray)]
        raw = {k: arrays.pop(k) for k in keys}
        others = {k: v for k, v in arrays.items() if k not in not_arrays}
        source = {k: k for k in keys}
        named = {k: (lambda i, k=k: f"{k}[{i}]") for k in keys}
        left_out, record = [], None
    else:
        keys = ["x_train", "x_test"]
        raw = {"x_train": drawn.x_train, "x_test": drawn.x_test}
        others = {"y_train": drawn.y_train, "y_test": drawn.y_test,
                  "index_train": drawn.train_at, "index_test": drawn.test_at}
        if drawn.groups_train is not None:       # the drawn images' labels of DATA's groups
            others[GROUPS_TRAIN] = drawn.groups_train
        source = {"x_train": drawn.train_key, "x_test": drawn.test_key}
        named = {"x_train": drawn.training_image, "x_test": drawn.test_image}
        used = ({"x", "y"} if drawn.train_key == "x" else
                {"x_train", "y_train", "x_test", "y_test", GROUPS_TRAIN})
        not_arrays, left_out = [], [k for k in names if k not in used]
        record = {"n_train": len(drawn.train_at), "n_test": len(drawn.test_at), "seed": seed,
                  "drawn_from": drawn.layout,
                  "as": f"evaluate --n-train {len(drawn.train_at)} --n-test {len(drawn.test_at)} "
                        f"--seed {seed}"}
    images, layouts = {}, {}
    for k in keys:
        x = raw[k]
        layouts[k] = ("(N, H, W): one channel" if x.ndim == 3 else
                      guess_layout(x.shape) if x.ndim == 4 and data_format == "auto" else data_format)
        images[k] = to_nchw(x, data_format, f"DATA {str(path)!r}: {source[k]}")
    if len(keys) == 2 and images["x_train"].shape[1:] != images["x_test"].shape[1:]:
        raise CliError(f"DATA {str(path)!r}: x_train and x_test hold images of different shapes, "
                       f"{images['x_train'].shape[1:]} and {images['x_test'].shape[1:]} (C, H, W)")
    return Sets(images, others, layouts, named, not_arrays, left_out, record)


def _image_keys(path: Path, names: list) -> list[str]:
    """The image sets of DATA's members ``names``, the one fitted on first."""
    if "x" in names and ("x_train" in names or "x_test" in names):
        sets = ", ".join(k for k in ("x_train", "x_test") if k in names)
        raise CliError(f"DATA {str(path)!r} holds x besides {sets}: which images are meant "
                       "cannot be told; give an archive with x_train and x_test (fitted on "
                       "x_train) or with x alone")
    if "x_train" in names or "x_test" in names:
        if not ("x_train" in names and "x_test" in names):
            have, lack = (("x_train", "x_test") if "x_train" in names else ("x_test", "x_train"))
            raise CliError(f"DATA {str(path)!r} holds {have} but not {lack}; preprocess needs "
                           "both (fitted on x_train), or x alone")
        return ["x_train", "x_test"]
    if "x" in names:
        return ["x"]
    raise CliError(f"DATA {str(path)!r} holds arrays {names}; preprocess needs x_train and "
                   "x_test, or x")


def _subset_of(args) -> tuple | None:
    """(n_train, n_test, seed) of --n-train / --n-test / --seed, or None: every image."""
    if args.n_train is None and args.n_test is None:
        if args.seed is not None:
            raise CliError(f"--seed {args.seed} draws the subsets of --n-train / --n-test; give "
                           "them too, or leave --seed out (every image is written)")
        return None
    check_sizes(args.n_train, args.n_test)
    return args.n_train, args.n_test, 0 if args.seed is None else args.seed


#: The arrays of OUT that stay beside a training set doubled by its flips: the labels,
#: positions in DATA and leave-one-out groups of its images (repeated for the flips: a flip is
#: in its image's group) and the test set's.
_KEPT_WITH_FLIPS = ("y_train", "index_train", GROUPS_TRAIN, "y_test", "index_test")


def _beside_flips(others: dict, left_out: list, n: int, data: str) -> dict:
    """The arrays to write beside a training set of ``n`` images followed by their flips:
    ``y_train``, ``index_train`` and DATA's own ``groups_train`` repeated for the flips, the
    test set's unchanged; DATA's other arrays are added to ``left_out`` (a row per training
    image would not be the doubled set's).  Checked before the preprocessing, which may take
    minutes."""
    kept = {}
    for k in _KEPT_WITH_FLIPS:
        if k not in others:
            continue
        v = others.pop(k)
        if k.endswith("_train"):
            if v.ndim < 1 or len(v) != n:
                raise CliError(f"DATA {data!r}: {k} of shape {v.shape} is not one value per "
                               f"training image ({n}); --augment-flips repeats it for their flips")
            v = np.concatenate([v, v])
        kept[k] = v
    left_out.extend(others)
    return kept


def _write(out: Path, arrays: dict) -> None:
    """``arrays`` into the new archive ``out`` (``np.savez``'s format, with the members written
    one by one: np.savez takes some names, ``file`` and ``allow_pickle``, as its own arguments),
    never over a file created meanwhile (:func:`~.common.write_file`)."""
    def members(f):
        with zipfile.ZipFile(f, mode="w", compression=zipfile.ZIP_STORED, allowZip64=True) as z:
            for name, value in arrays.items():
                with z.open(f"{name}.npy", "w", force_zip64=True) as member:
                    np.lib.format.write_array(member, np.asanyarray(value), allow_pickle=False)
    write_file(out, members, f"--out {str(out)!r}", overwrite=False)


def run(args) -> int:
    from ..version import __version__
    data = Path(args.data)
    if not data.exists():
        raise CliError(f"DATA {args.data!r} does not exist")
    if not (data.is_file() or is_cifar10(data)):
        raise CliError(f"DATA {args.data!r} is neither a file nor a folder")
    zca_reg = preprocessing_options(args)
    subset = _subset_of(args)
    out = _check_out(args.out, data)
    sets = _read_sets(data, args.data_format, subset)
    images = sets.images
    keys = list(images)
    others, left_out = dict(sets.others), list(sets.left_out)
    if args.augment_flips:
        if keys == ["x"]:
            raise CliError(f"--augment-flips doubles a training set, x_train; DATA {args.data!r} "
                           "holds x alone (one set, for one Gram): give x_train and x_test, or "
                           "--n-train and --n-test to split x, y as evaluate splits it")
        others = _beside_flips(others, left_out, len(images["x_train"]), str(data))
    fit = keys[0]
    log_zca_fit(args.preprocess, images[fit], args.downsample)
    try:
        done = preprocess(images[fit], images.get("x_test"), args.preprocess, args.downsample,
                          zca_reg=zca_reg, data_format="NCHW")
    except ConstantImages as e:
        key = "x_test" if e.role == "x_test" else fit
        # named as DATA holds them (x[14] where x was split as evaluate splits it)
        role = "x" if keys == ["x"] else "test" if key == "x_test" else "training"
        raise CliError(str(e.reworded(f"--zca: DATA's {role}", "drop them from DATA, or use "
                                      "--preprocess standardize (it takes constant images)",
                                      named=sets.named[key]))) from None
    except ValueError as e:     # e.g. integer training pixels against float test pixels
        raise CliError(f"DATA {str(data)!r}: {e}") from None
    result = dict(zip(keys, done))
    own_groups = GROUPS_TRAIN in others
    if args.augment_flips:        # after the preprocessing, fitted on the images, as evaluate's
        result["x_train"], _, pairs = with_flips(result["x_train"], None, data_format="NCHW")
        others.setdefault(GROUPS_TRAIN, pairs)        # DATA's own groups, else the pairs
    fitted = args.preprocess in ("standardize", "zca")     # scale and none fit nothing
    record = {"made_by": "cntk-engine preprocess", "version": __version__,
              "command": command_of(args),
              "preprocess": args.preprocess,
              "zca_reg": zca_reg if args.preprocess == "zca" else None,
              "downsample": args.downsample, "fitted_on": fit if fitted else None,
              "augment_flips": args.augment_flips,
              "data": str(data.resolve()), "subset": sets.subset, "read_as": sets.layouts,
              "dtypes": {k: str(v.dtype) for k, v in images.items()},
              "images": {k: list(v.shape) for k, v in result.items()}}
    _write(out, {**others, **{k: np.ascontiguousarray(v, dtype=np.float64)
                              for k, v in result.items()},
                 RECORD: np.array(json.dumps(record))})
    shapes = ", ".join(f"{k} {tuple(v.shape)}" for k, v in result.items())
    drawn = sets.subset
    written = [k for k in others if k != GROUPS_TRAIN or own_groups]    # not made here
    repeated = [k for k in written if args.augment_flips and k.endswith("_train")]
    copied = [k for k in written if k not in repeated]
    cut = dropped_by_downsampling(images[fit].shape, args.downsample)
    cut = f" ({cut})" if cut else ""
    print(f"{out}: {shapes} float64 NCHW"
          + (f" (x_train: {len(result['x_train']) // 2} images, then their horizontal flips; "
             + ("DATA's groups_train, each flip in its image's group" if own_groups else
                "groups_train pairs each with its flip") + ")" if args.augment_flips else "")
          + f", {args.preprocess}"
          + (f" (reg {zca_reg:g})" if args.preprocess == "zca" else "")
          + (f" after {args.downsample}x{args.downsample} downsampling{cut}"
             if args.downsample > 1 else "")
          + (f", fitted on {fit}" if fitted else "")
          + (f"; the images {drawn['as']} draws from DATA's {drawn['drawn_from']}" if drawn else "")
          + (f"; repeated for the flips {', '.join(repeated)}" if repeated else "")
          + (f"; copied {', '.join(copied)}" if copied else "")
          + (f"; not copied (not arrays): {', '.join(sets.not_arrays)}" if sets.not_arrays else "")
          + (f"; not copied (their rows would not be the images'): {', '.join(left_out)}"
             if left_out else ""))
    q = shell_arg
    if len(keys) == 2:
        then = (f"cntk-engine solve {q(out)} --train train.zarr --test test.zarr"
                if "y_train" in others else
                "cntk_engine.solver.load_train_test('train.zarr', 'test.zarr')")
        print("next, with the same architecture options for both"
              + (" (not --flip: the training set holds the flips)" if args.augment_flips else "")
              + ": cntk-engine gram "
              f"{q(f'{out}:x_train')} ... --out train.zarr; cntk-engine gram {q(f'{out}:x_test')} "
              f"--x2 {q(f'{out}:x_train')} ... --out test.zarr; then {then}")
    else:
        print(f"next: cntk-engine gram {q(f'{out}:x')} ... --out gram.zarr")
    return 0
