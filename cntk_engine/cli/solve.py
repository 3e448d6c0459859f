"""``cntk-engine solve``: kernel regression on a training Gram and a test kernel kept in stores,
the labels matched to the kernels through their images.

    cntk-engine preprocess cifar.npz --zca --out cifar_zca.npz
    cntk-engine gram cifar_zca.npz:x_train --architecture myrtle10 --flip --out train.zarr
    cntk-engine gram cifar_zca.npz:x_test --x2 cifar_zca.npz:x_train --architecture myrtle10 \\
        --flip --out test.zarr
    cntk-engine solve cifar_zca.npz --train train.zarr --test test.zarr --predictions pred.npy

DATA is the ``.npz`` the kernels were computed from, holding ``x_train``, ``y_train``,
``x_test`` and, to score the predictions, ``y_test``.  Its images are not computed on: they are
read as ``gram`` read them (``--data-format``) and checked against the stores' fingerprints, so
the labels are those of the kernels' rows and columns (another subset, order or file is
refused), and the stores are checked to belong together
(:func:`cntk_engine.solver.load_train_test`: the same network and readout, the test kernel
against these training images; both verified as they are read).  Then, as ``evaluate`` does:
kernel ridge regression on the paper's targets (0.9 / -0.1; ``--targets onehot``: 1 / 0) with
``--ridge`` relative to the mean diagonal of the training Gram, or ``auto`` (default: exact
leave-one-out accuracy over :data:`cntk_engine.solver.RELATIVE_RIDGE_GRID`);
:func:`cntk_engine.solver.fit_classifier`.  Prints the ridge and, with ``y_test``, the test
accuracy; ``--predictions OUT.npy`` writes the predicted label of each test image (replacing
an earlier predictions file, a 1-D ``.npy`` of one label per test image in the labels' dtype;
refusing any other file there),
``--json OUT`` every figure, the command and the machine.  Where DATA holds ``groups_train``
(one group label per training image; ``preprocess --augment-flips`` writes it, pairing each
image with its flip), ``--ridge auto``'s leave-one-out leaves each group out together
(:func:`cntk_engine.solver.loo`), as ``evaluate --augment-flips`` does: else the mirror of a
scored image stays in the training set (a DATA whose record says it holds flips but that lacks
them is refused with ``--ridge auto``).  Stores of the flip-symmetrised kernel on such a
training set are solved with a warning (every image is then in it twice, for nothing).
Memory: both matrices as float64 and, for ``auto``, an eigendecomposition of the training Gram,
given up to it (2.1 more copies of it on the CPU, 1.1 beyond 32,766 images, 3.1 on the GPU;
a number: 0.1, 1.1 on the GPU; :func:`cntk_engine.solver.solve_workspace` with
``overwrite_k`` and the Gram's n), refused
before anything is read where it does not fit: in the host's memory, or with ``--device cuda``
in the current GPU's (CuPy and cuSOLVER: the solver's GPU path, ``docs/solver.md``; the host
still holds the float64 matrix as it is read).
"""
from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import numpy as np

from .common import (GROUPS_TRAIN as GROUPS, JSON_HELP, PROG, CliError, add_solve_options,
                     check_json_path, check_parent_folder, check_path_name, command_of,
                     holds_flips, json_writer, label_vector, machine, open_numpy, parse_ridge,
                     read_member, to_nchw, write_files)

KEYS = ("x_train", "y_train", "x_test")


def add_parser(sub) -> None:
    p = sub.add_parser("solve", help="kernel regression on a train Gram and a test kernel kept in "
                       "stores: predictions and test accuracy",
                       description="Solve kernel regression on the training Gram --train and the "
                       "test kernel --test (stores of cntk-engine gram), with the labels of DATA, "
                       "the file the kernels were computed from.",
                       epilog="DATA keys: x_train, y_train, x_test, and y_test to score; "
                       "groups_train (preprocess --augment-flips): leave-one-out leaves each "
                       "group out together.")
    p.add_argument("data", metavar="DATA", help=".npz the kernels were computed from: x_train, "
                   "y_train, x_test (y_test to score)")
    p.add_argument("--train", required=True, metavar="STORE",
                   help="store of the training Gram (cntk-engine gram DATA:x_train ...)")
    p.add_argument("--test", required=True, metavar="STORE",
                   help="store of the test kernel (cntk-engine gram DATA:x_test --x2 DATA:x_train ...)")
    p.add_argument("--key", default=None,
                   help="the kernel, as the train store names it (ntk, nngp, depth_11/ntk); "
                   "needed where the stores hold several (gram --kernel both, --depths); "
                   "default: the one kernel they hold")
    add_solve_options(p)
    p.add_argument("--data-format", choices=("auto", "NCHW", "NHWC"), default="auto",
                   help="layout of DATA's images, as given to gram (auto: as gram decides it)")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu",
                   help="where the solve runs: cpu (NumPy / LAPACK, default) or cuda (CuPy / "
                   "cuSOLVER on the current GPU, whose free memory must hold the matrices and "
                   "the solve's workspace)")
    p.add_argument("--predictions", metavar="OUT.npy", default=None,
                   help="write the predicted label of each test image to OUT.npy (an earlier "
                   "predictions file there, a 1-D array of one label per test image in the "
                   "labels' dtype, is replaced; any other file is refused)")
    p.add_argument("--json", metavar="OUT", default=None,
                   help=f"write the results as JSON to OUT {JSON_HELP}")
    p.set_defaults(func=run)


def _check_npy_path(path: str, inputs: dict) -> Path:
    """--predictions: a .npy path in an existing, writable folder, not one of the inputs nor
    in them; an existing file only where it holds a 1-D array (a .npy of images given by
    mistake is not overwritten; :func:`_check_predictions_file` checks its length and dtype
    once DATA is read)."""
    if not path:
        raise CliError("--predictions '' is empty; give the path of the .npy file to write")
    p = Path(path)
    check_path_name(p, "--predictions")
    if p.suffix != ".npy":
        raise CliError(f"--predictions {path!r} must end in .npy (np.save's format); e.g. "
                       f"{str(p.with_suffix('.npy'))!r}")
    for what, other in inputs.items():
        if other is None:
            continue
        other = Path(other).resolve()
        if p.resolve() == other or other in p.resolve().parents:
            raise CliError(f"--predictions {path!r} is {'in ' if p.resolve() != other else ''}"
                           f"{what}; give another path")
    if p.is_dir():
        raise CliError(f"--predictions {path!r} is a folder; give a file path")
    check_parent_folder(p, "--predictions")
    if p.exists() or p.is_symlink():
        if not p.is_file():
            raise CliError(f"--predictions {path!r} exists and is not a regular file (a FIFO, a "
                           "device or a broken link); give the path of a file to write")
        if _predictions_header(p) is None:
            raise CliError(f"--predictions {path!r} exists and does not hold predictions (a 1-D "
                           ".npy array); refusing to overwrite it: remove it or give another path")
    if not os.access(p.parent, os.W_OK | os.X_OK):
        raise CliError(f"--predictions {path!r}: the folder {str(p.parent)!r} is not writable")
    return p


def _predictions_header(p: Path) -> tuple[int, np.dtype] | None:
    """(length, dtype) of the 1-D array the .npy file ``p`` holds (from its header); None where
    it holds another shape or is not a .npy file."""
    try:
        with open(p, "rb") as f:
            version = np.lib.format.read_magic(f)
            read = (np.lib.format.read_array_header_1_0 if version == (1, 0) else
                    np.lib.format.read_array_header_2_0)
            shape, _, dtype = read(f)
        return (int(shape[0]), np.dtype(dtype)) if len(shape) == 1 else None
    except (OSError, ValueError, TypeError):
        return None


def _check_predictions_file(p: Path, path: str, n_test: int, labels: np.dtype) -> bool:
    """Whether --predictions replaces a file: an existing one must look like this run's
    predictions, one label per test image of DATA in its labels' dtype (an earlier run's), else
    it is refused (a 1-D file of another length or dtype, such as scores, is not overwritten;
    a file of DATA's test labels would pass: they look the same)."""
    if not p.exists():
        return False
    n, dtype = _predictions_header(p)
    if n != n_test or dtype != labels:
        got = (f"{n} entries, not one per test image of DATA ({n_test})" if n != n_test else
               f"{dtype} values, not labels of DATA's dtype ({labels})")
        raise CliError(f"--predictions {path!r} exists and holds {got}: not earlier predictions "
                       "for this DATA; refusing to overwrite it: remove it or give another path")
    return True


def _read_data(path: str, data_format: str, targets: str) -> dict:
    """DATA's images (NCHW float64, as gram read them), labels and leave-one-out groups
    (checked); y_test and groups_train None without."""
    from ..inputs import as_images
    from ..solver import check_classifier_labels, check_groups
    from ..solver.targets import check_labels
    p = Path(path)
    if not p.exists():
        raise CliError(f"DATA {path!r} does not exist")
    if not p.is_file():
        raise CliError(f"DATA {path!r} is not a file")
    z = open_numpy(p, "DATA")
    if not hasattr(z, "files"):
        raise CliError(f"DATA {path!r} is a .npy array; solve needs the .npz archive the kernels "
                       "were computed from, with x_train, y_train, x_test (and y_test to score)")
    with z:
        missing = [k for k in KEYS if k not in z.files]
        if missing:
            raise CliError(f"DATA {path!r} holds {list(z.files)} but not {', '.join(missing)}: solve "
                           "needs x_train, y_train and x_test (and y_test to score); the images "
                           "tie the labels to the stores' kernels"
                           + ("; for stores of evaluate --store, cntk-engine preprocess DATA "
                              "--preprocess P --n-train N --n-test M --seed S [--downsample F] "
                              "(evaluate's options) --out FILE writes the images and labels "
                              "evaluate drew"
                              if "x" in z.files else ""))
        got = {k: read_member(z, k, path) for k in KEYS + ("y_test", GROUPS) if k in z.files}
        for y in ("y_train", "y_test"):     # (N, 1) columns, as evaluate reads them
            if y in got:
                got[y] = label_vector(got[y])
        flips = holds_flips(z)
    out = {k: to_nchw(got[k], data_format, f"DATA {path!r}: {k}") for k in ("x_train", "x_test")}
    try:
        for k in ("x_train", "x_test"):       # as gram checked them (NaN pixels, no images, ...)
            out[k] = as_images(out[k], "NCHW", k)
        # one label per image, then the classifier's own checks, before the kernels are read
        for y, x in (("y_train", "x_train"), ("y_test", "x_test")):
            if y in got:
                check_labels(got[y], len(out[x]), y)
        out["y_train"], out["y_test"], _ = check_classifier_labels(
            got["y_train"], got.get("y_test"), targets=targets)
    except ValueError as e:
        raise CliError(f"DATA {path!r}: {e}") from None
    try:
        out[GROUPS] = None if GROUPS not in got else check_groups(got[GROUPS], len(out["x_train"]))
    except ValueError as e:       # its message names "groups"
        raise CliError(f"DATA {path!r}: {GROUPS}, the leave-one-out groups of x_train: {e}") from None
    out["holds_flips"] = flips
    return out


def run(args) -> int:
    from .. import solver
    ridge = parse_ridge(args.ridge)
    inputs = {"DATA": args.data, "--train": args.train, "--test": args.test}
    predictions = None if args.predictions is None else _check_npy_path(args.predictions, inputs)
    if args.json is not None:
        check_json_path(args.json, inputs=dict(inputs, **{"--predictions": args.predictions}))
    if args.device == "cuda":
        from ..arrays import cuda_unavailable_reason
        why = cuda_unavailable_reason()
        if why is not None:
            raise CliError(f"--device cuda: {why}; --device cpu solves without a GPU")
    t0 = time.perf_counter()
    d = _read_data(args.data, args.data_format, args.targets)
    replaces = predictions is not None and _check_predictions_file(
        predictions, args.predictions, len(d["x_test"]), np.asarray(d["y_train"]).dtype)
    if ridge == "auto" and d["holds_flips"] and d[GROUPS] is None:
        raise CliError(f"DATA {args.data!r}: its x_train holds its images' flips (preprocess "
                       f"--augment-flips) but not their {GROUPS}: --ridge auto's leave-one-out "
                       "would score each image with its mirror in the training set (and choose "
                       "a ridge near 0); give the file preprocess wrote, or --ridge R")
    # the labels belong to the kernels: the images are the stores' (fingerprints), the stores
    # one model's; an eigendecomposition for "auto", a Cholesky else, in the loaded K's own
    # memory (solver.solve_workspace, overwrite_k: the K read is the solve's alone)
    try:
        loaded = solver.load_train_test(args.train, args.test, args.key,
                                        workspace=lambda n: solver.solve_workspace(
                                            "eigh" if ridge == "auto" else "cholesky", args.device,
                                            overwrite_k=True, n=n),
                                        device=args.device, x_train=d["x_train"],
                                        x_test=d["x_test"], data_format="NCHW")
    except solver.GramTooLarge as e:
        hints = []
        if e.limit == "free GPU memory":
            hints.append("--device cpu solves in the host's memory")
        if ridge == "auto" and not e.staging:        # the workspace, not the host's reading
            ws = {f: solver.solve_workspace(f, args.device, overwrite_k=True, n=e.n)
                  for f in ("cholesky", "eigh")}
            hints.append(f"--ridge R, a number, needs {ws['cholesky']:g} cop"
                         f"{'y' if ws['cholesky'] == 1 else 'ies'} of K for its solve instead of "
                         f"the {ws['eigh']:g} of --ridge auto's eigendecomposition")
        raise CliError(f"{e}" + (f" ({'; '.join(hints)})" if hints else "")) from None
    K, K_test = loaded
    t_load = time.perf_counter() - t0
    if d["holds_flips"] and (loaded.architecture or {}).get("flip"):
        # computed already (gram --flip refuses DATA:x_train, not a copy of it): said, not refused
        print(f"{PROG}: warning: the kernels are flip-symmetrised and DATA's x_train holds its "
              "images' flips (preprocess --augment-flips): under that kernel a flip is its "
              "image's point, so every image is in the training set twice, for nothing over "
              "--flip alone at 4 times its training Gram's cost", file=sys.stderr)
    same = solver.constant_entries(K)
    if same is not None:          # as evaluate refuses --W-std 0 and all-zero training images
        raise CliError(f"--train {args.train!r}: every entry of the training Gram is {same:g} "
                       "(all-zero images, or --W-std 0): the kernel does not tell the images "
                       "apart, so the regression would predict one class for every image")
    n_train = len(K)              # K is factorised in its own memory: no longer the Gram after
    fit = solver.fit_classifier(K, d["y_train"], ridge=ridge, targets=args.targets,
                                groups=d[GROUPS], overwrite_k=True,
                                rounding=solver.rounding_of(loaded.dtype))
    pred = fit.predict(K_test)
    t_solve = time.perf_counter() - t0 - t_load
    info = fit.info
    grouped = "" if d[GROUPS] is None else (
        f", leaving out each of DATA's {d[GROUPS].n_groups} {GROUPS} together")
    how = (f"chosen by leave-one-out{grouped}: accuracy {100 * info['loo_accuracy']:.2f}%"
           if ridge == "auto" else "given")
    print(f"{n_train} training and {len(K_test)} test images, {len(fit.classes)} classes, kernel "
          f"{loaded.keys[0]}; ridge {info['ridge_relative']:g} x mean diag(K) ({how})"
          + (f", jitter {info['jitter']:.3g} (absolute)" if info["jitter"] else "")
          + f"; loaded in {t_load:.1f} s, solved in {t_solve:.1f} s"
          + (f" on the GPU ({_gpu_name()})" if args.device == "cuda" else ""))
    acc = None
    if d["y_test"] is not None:
        acc = solver.accuracy(pred, d["y_test"])
        print(f"test accuracy: {100 * acc:.2f}% ({int(round(acc * len(pred)))} of {len(pred)})")
    files = []              # written together: predictions never without their results
    if predictions is not None:
        files.append((predictions, lambda f: np.save(f, np.asarray(pred), allow_pickle=False),
                      f"--predictions {str(predictions)!r}"))
    if args.json is not None:
        from ..version import __version__
        files.append((args.json, json_writer(dict(
            command=command_of(args),
            version=__version__, data=str(args.data), data_format=args.data_format,
            train=str(args.train), test=str(args.test), keys=list(loaded.keys),
            test_store_transposed=loaded.transposed, targets=args.targets, ridge=ridge,
            device=args.device, gpu=_gpu_name() if args.device == "cuda" else None,
            n_train=n_train, n_test=len(K_test),
            groups=GROUPS if d[GROUPS] is not None and ridge == "auto" else None,
            classes=[c.decode() if isinstance(c, bytes) else c for c in fit.classes.tolist()],
            accuracy=acc, **info, predictions=None if predictions is None else str(predictions),
            seconds=dict(load=t_load, solve=t_solve), machine=machine())),
            f"--json {args.json!r}"))
    write_files(files)
    if predictions is not None:
        print(f"predictions written to {predictions}"
              + (" (replacing the earlier predictions there)" if replaces else ""))
    if args.json is not None:
        print(f"results written to {args.json}")
    return 0


def _gpu_name() -> str:
    """The current GPU's name (the one CuPy solved on)."""
    from ..arrays import current_device, gpu_properties
    return gpu_properties(current_device())["name"]
