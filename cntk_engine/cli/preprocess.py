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
``x_train`` and applied to both) or ``x`` alone (fitted on and applied to ``x``); images
(N, H, W), (N, C, H, W) or (N, H, W, C) read as ``gram`` reads them (``--data-format``).  The
transformations are :func:`cntk_engine.preprocess.preprocess`'s, as ``evaluate --preprocess``
applies them: ``--downsample F`` first, then ``standardize``, ``scale``, ``zca`` (``--zca-reg``)
or ``none``.

OUT is a new ``.npz`` archive: the images as float64 (N, C, H, W), DATA's other arrays (labels,
...) unchanged, and ``preprocessing``, a JSON text saying what was done (the method and its
parameters, the set it was fitted on, DATA, the layout read, the package version).  It is
written to a temporary file beside OUT and moved into place whole; an existing OUT is refused.
"""
from __future__ import annotations

import json
import os
import shlex
import zipfile
from pathlib import Path

import numpy as np

from ..preprocess import ConstantImages, preprocess
from .common import (CliError, add_preprocessing_options, check_parent_folder, command_of,
                     guess_layout, open_numpy, preprocessing_options, read_member, to_nchw,
                     write_file)

#: The key of OUT's record of what was done.
RECORD = "preprocessing"


def add_parser(sub) -> None:
    p = sub.add_parser("preprocess", help="whiten (ZCA) or standardise images for gram jobs, "
                       "fitted on the training images",
                       description="Fit a preprocessing on x_train (or x) of DATA, apply it to "
                       "x_train and x_test, and write them as float64 NCHW images to the new "
                       ".npz --out, for cntk-engine gram.",
                       epilog="DATA keys: x_train and x_test (fitted on x_train), or x; other "
                       "arrays are copied unchanged.")
    p.add_argument("data", metavar="DATA", help=".npz with x_train and x_test, or x")
    add_preprocessing_options(p, default=None)
    p.add_argument("--data-format", choices=("auto", "NCHW", "NHWC"), default="auto",
                   help="layout of DATA's 4-D images (auto: as gram decides it)")
    p.add_argument("--out", required=True, metavar="NEW.npz",
                   help="the .npz archive to write (must not exist)")
    p.set_defaults(func=run)


def _check_out(out: str, data: Path) -> Path:
    if not out:
        raise CliError("--out '' is empty; give the path of the .npz archive to write, e.g. "
                       "cifar_zca.npz")
    p = Path(out)
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


def _read_sets(path: Path, data_format: str) -> tuple[dict, dict, dict, list[str], list[str]]:
    """({key: NCHW images}, {key: other arrays}, {key: the layout read}, the image keys (the
    one fitted on first), the members that are not arrays) of DATA."""
    z = open_numpy(path, "DATA")
    if not hasattr(z, "files"):
        raise CliError(f"DATA {str(path)!r} is a .npy array; preprocess needs an .npz archive with "
                       "x_train and x_test (fitted on x_train), or x")
    with z:
        names = list(z.files)
        if RECORD in names:
            raise CliError(f"DATA {str(path)!r} holds a {RECORD!r} record: it was written by "
                           "cntk-engine preprocess already; preprocess the original images")
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
            keys = ["x_train", "x_test"]
        elif "x" in names:
            keys = ["x"]
        else:
            raise CliError(f"DATA {str(path)!r} holds arrays {names}; preprocess needs x_train and "
                           "x_test, or x")
        arrays = {k: read_member(z, k, path) for k in names}
    # members that are not arrays (a text file zipped in) are not copied: np.load gives their bytes
    skipped = [k for k, v in arrays.items() if not isinstance(v, np.ndarray)]
    for k in skipped:
        del arrays[k]
    images, layouts = {}, {}
    for k in keys:
        x = arrays.pop(k)
        layouts[k] = ("(N, H, W): one channel" if x.ndim == 3 else
                      guess_layout(x.shape) if x.ndim == 4 and data_format == "auto" else data_format)
        images[k] = to_nchw(x, data_format, f"DATA {str(path)!r}: {k}")
    if len(keys) == 2 and images["x_train"].shape[1:] != images["x_test"].shape[1:]:
        raise CliError(f"DATA {str(path)!r}: x_train and x_test hold images of different shapes, "
                       f"{images['x_train'].shape[1:]} and {images['x_test'].shape[1:]} (C, H, W)")
    if len(keys) == 2 and len({images[k].dtype.kind in "biu" for k in keys}) > 1:
        # e.g. uint8 pixels 0..255 against floats 0..1: one set would be transformed in the
        # other's units, silently
        raise CliError(f"DATA {str(path)!r}: x_train is {images['x_train'].dtype} and x_test "
                       f"{images['x_test'].dtype}: give both as integers or both as floats, in "
                       "the same units (e.g. both 0..255 or both 0..1)")
    return images, arrays, layouts, keys, skipped


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
    if not data.is_file():
        raise CliError(f"DATA {args.data!r} is not a file")
    zca_reg = preprocessing_options(args)
    out = _check_out(args.out, data)
    images, others, layouts, keys, skipped = _read_sets(data, args.data_format)
    fit = keys[0]
    try:
        done = preprocess(images[fit], images.get("x_test"), args.preprocess, args.downsample,
                          zca_reg=zca_reg, data_format="NCHW")
    except ConstantImages as e:
        key = "x_test" if e.role == "x_test" else fit
        raise CliError(str(e.reworded(f"--zca: DATA's {key}", "drop them from DATA, or use "
                                      "--preprocess standardize (it takes constant images)",
                                      named=lambda i: f"{key}[{i}]"))) from None
    result = dict(zip(keys, done))
    fitted = args.preprocess in ("standardize", "zca")     # scale and none fit nothing
    record = {"made_by": "cntk-engine preprocess", "version": __version__,
              "command": command_of(args),
              "preprocess": args.preprocess,
              "zca_reg": zca_reg if args.preprocess == "zca" else None,
              "downsample": args.downsample, "fitted_on": fit if fitted else None,
              "data": str(data.resolve()), "read_as": layouts,
              "dtypes": {k: str(v.dtype) for k, v in images.items()},
              "images": {k: list(v.shape) for k, v in result.items()}}
    _write(out, {**others, **{k: np.ascontiguousarray(v, dtype=np.float64)
                              for k, v in result.items()},
                 RECORD: np.array(json.dumps(record))})
    shapes = ", ".join(f"{k} {tuple(v.shape)}" for k, v in result.items())
    print(f"{out}: {shapes} float64 NCHW, {args.preprocess}"
          + (f" (reg {zca_reg:g})" if args.preprocess == "zca" else "")
          + (f" after {args.downsample}x{args.downsample} downsampling" if args.downsample > 1 else "")
          + (f", fitted on {fit}" if fitted else "")
          + (f"; copied {', '.join(others)}" if others else "")
          + (f"; not copied (not arrays): {', '.join(skipped)}" if skipped else ""))
    q = shlex.quote
    if len(keys) == 2:
        then = (f"cntk-engine solve {q(str(out))} --train train.zarr --test test.zarr"
                if "y_train" in others else
                "cntk_engine.solver.load_train_test('train.zarr', 'test.zarr')")
        print(f"next, with the same architecture options for both: cntk-engine gram "
              f"{q(f'{out}:x_train')} ... --out train.zarr; cntk-engine gram {q(f'{out}:x_test')} "
              f"--x2 {q(f'{out}:x_train')} ... --out test.zarr; then {then}")
    else:
        print(f"next: cntk-engine gram {q(f'{out}:x')} ... --out gram.zarr")
    return 0
