"""``cntk-engine evaluate``: CNTK kernel regression on a labelled image set, test accuracy per depth.

    cntk-engine evaluate DATA --depth 11 --pooling gap --n-train 1000 --n-test 1000 [--ridge auto]
    cntk-engine evaluate DATA --depths 3,4,6,11 ...      # every depth from ONE kernel pass
    python -m cntk_engine.evaluate DATA ...              # the same without the CLI entry point

DATA is a ``.npz`` archive holding either ``x_train, y_train, x_test, y_test`` (a random subset
of ``--n-train`` / ``--n-test`` of each is used, drawn with ``--seed``) or ``x, y`` (shuffled
with ``--seed`` and split: the first ``--n-train`` for training, the next ``--n-test`` for
testing).  Images: (N, H, W) (one channel), (N, C, H, W) or (N, H, W, C), any integer or float
dtype; ``--data-format auto`` (default) reads a 4-D array as NHWC when its last axis is 1 or 3
and its second is not, as NCHW in the opposite case, and asks for ``--data-format`` otherwise.
Labels: integers (or any values; classes are the sorted labels of the training subset).

Steps: preprocessing (``--preprocess standardize``, the paper's: per-channel mean / std of the
training images; ``--downsample F`` average-pools F x F first, a CPU-feasibility option), the
train Gram and the test-vs-train kernel with ONE ``gram`` call each (``depths=[...]``), then
for every depth kernel regression on the paper's targets (0.9 / -0.1) with ``--ridge`` (a
number relative to the mean diagonal of the train Gram, or ``auto``: exact leave-one-out
accuracy over :data:`cntk_engine.solver.RELATIVE_RIDGE_GRID`; the ridge-0 "paper solve" is
reported next to it).  ``--json OUT`` writes every figure, the command and the machine.
Errors are one line on stderr with exit status 2.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from . import solver
from .cli import CliError, _ints

PAIR_KEYS = ("x_train", "y_train", "x_test", "y_test")


# ----------------------------------------------------------------------------- parser
def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "evaluate", help="kernel regression on labelled images: test accuracy per depth",
        description="Compute the CNTK train Gram and test-vs-train kernel of a labelled image "
        "set (all --depths from one pass), solve kernel regression, print the test accuracy "
        "(and the LOO-selected ridge) per depth.",
        epilog="DATA keys: x_train, y_train, x_test, y_test (random subsets of --n-train / "
        "--n-test), or x, y (shuffled and split).")
    p.add_argument("data", metavar="DATA", help=".npz with x_train, y_train, x_test, y_test, or x, y")
    d = p.add_mutually_exclusive_group(required=True)
    d.add_argument("--depth", type=int, help="depth (conv layers + 1)")
    d.add_argument("--depths", help="several depths from one kernel pass, e.g. 3,4,6,11")
    p.add_argument("--pooling", choices=("gap", "flatten"), default="gap")
    p.add_argument("--fix", action="store_true", help="first and last layers not trained")
    p.add_argument("--kernel", choices=("ntk", "nngp", "both"), default="ntk",
                   help="kernel(s) to evaluate (both: NTK and NNGP from the same pass)")
    p.add_argument("--convention", choices=("arora", "neural_tangents"), default="arora")
    p.add_argument("--W-std", type=float, default=None, dest="W_std")
    p.add_argument("--b-std", type=float, default=None, dest="b_std")
    p.add_argument("--filter-size", type=int, default=3)
    p.add_argument("--n-train", type=int, default=1000, help="training images (default 1000)")
    p.add_argument("--n-test", type=int, default=1000, help="test images (default 1000)")
    p.add_argument("--ridge", default="auto",
                   help="'auto' (leave-one-out selection, default) or a number >= 0 relative to "
                   "the mean diagonal of the train Gram (0 = the paper's interpolating solve)")
    p.add_argument("--targets", choices=("paper", "onehot"), default="paper",
                   help="paper: 0.9 / -0.1 (default); onehot: 1 / 0")
    p.add_argument("--preprocess", choices=("standardize", "scale", "none"), default="standardize",
                   help="standardize: per-channel mean/std of the training images (the paper's; "
                   "default); scale: integer images / 255; none: as stored")
    p.add_argument("--downsample", type=int, default=1,
                   help="average-pool F x F before the kernel (a CPU-feasibility option)")
    p.add_argument("--seed", type=int, default=0, help="subset / split seed (default 0)")
    p.add_argument("--data-format", choices=("auto", "NCHW", "NHWC"), default="auto")
    p.add_argument("--backend", choices=("auto", "cuda", "numba", "reference"), default="auto")
    p.add_argument("--dtype", choices=("float32", "float64"), default="float32")
    p.add_argument("--tile", type=int, default=None, help="rows/columns per tile (default: automatic)")
    p.add_argument("--json", metavar="OUT", default=None, help="write the results as JSON to OUT")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=run)
    return p


# ----------------------------------------------------------------------------- data
def load_data(path: str, n_train: int, n_test: int, seed: int):
    """(x_train, y_train, x_test, y_test, layout) from a .npz, subset / split as documented."""
    p = Path(path)
    if not p.exists():
        raise CliError(f"DATA {path!r} does not exist")
    if not p.is_file():
        raise CliError(f"DATA {path!r} is not a file")
    if n_train < 2:
        raise CliError(f"--n-train must be at least 2; got {n_train}")
    if n_test < 1:
        raise CliError(f"--n-test must be at least 1; got {n_test}")
    try:
        z = np.load(p, allow_pickle=False)
    except Exception as e:  # noqa: BLE001 - unreadable file
        raise CliError(f"DATA {path!r} cannot be read as a NumPy .npz archive: {e}") from None
    if not hasattr(z, "files"):
        raise CliError(f"DATA {path!r} is a .npy array; evaluate needs a .npz archive with keys "
                       "x_train, y_train, x_test, y_test or x, y")
    rng = np.random.default_rng(seed)
    with z:
        names = list(z.files)
        if all(k in names for k in PAIR_KEYS):
            xtr, ytr = _pair(z, "x_train", "y_train", path)
            xte, yte = _pair(z, "x_test", "y_test", path)
            for n, avail, what in ((n_train, len(xtr), "--n-train"), (n_test, len(xte), "--n-test")):
                if n > avail:
                    raise CliError(f"{what} {n} is more than the {avail} images in DATA {path!r}")
            i = np.sort(rng.choice(len(xtr), n_train, replace=False))
            j = np.sort(rng.choice(len(xte), n_test, replace=False))
            return xtr[i], ytr[i], xte[j], yte[j], "x_train/x_test"
        if "x" in names and "y" in names:
            x, y = _pair(z, "x", "y", path)
            if n_train + n_test > len(x):
                raise CliError(f"--n-train {n_train} + --n-test {n_test} is more than the {len(x)} "
                               f"images in DATA {path!r}")
            perm = rng.permutation(len(x))
            i, j = np.sort(perm[:n_train]), np.sort(perm[n_train:n_train + n_test])
            return x[i], y[i], x[j], y[j], "x/y split"
        raise CliError(f"DATA {path!r} holds arrays {names}; evaluate needs the keys x_train, "
                       "y_train, x_test, y_test or x, y")


def _read(z, key, path):
    """``z[key]``, every reading failure (a bad CRC, a truncated archive, an object array that
    needs pickle) as a one-line error naming the file and the key."""
    try:
        return z[key]
    except Exception as e:  # noqa: BLE001 - zipfile.BadZipFile, ValueError, OSError, ...
        raise CliError(f"DATA {path!r}: array {key!r} cannot be read ({type(e).__name__}: {e}); "
                       "it must be a plain numeric array saved by np.savez") from None


def _pair(z, kx, ky, path):
    x, y = _read(z, kx, path), _read(z, ky, path)
    if x.ndim not in (3, 4):
        raise CliError(f"DATA {path!r}: {kx} must be images (N, H, W), (N, C, H, W) or (N, H, W, C); "
                       f"got shape {x.shape}")
    if x.dtype.kind not in "biuf":
        raise CliError(f"DATA {path!r}: {kx} must hold numbers; got dtype {x.dtype}")
    if x.dtype.kind == "f":      # here, on the raw array: standardisation would spread a NaN
        bad = ~np.isfinite(x).all(axis=tuple(range(1, x.ndim)))
        if bad.any():
            idx = np.nonzero(bad)[0]
            more = len(idx) - 10
            raise CliError(f"DATA {path!r}: {kx} has NaN or Inf pixels in image(s) at index "
                           f"{idx[:10].tolist()}" + (f" and {more} more" if more > 0 else "")
                           + f" (positions in {kx}); all pixels must be finite")
    y = np.asarray(y)
    if y.ndim == 2 and 1 in y.shape:
        y = y.ravel()
    if y.ndim != 1 or len(y) != len(x):
        raise CliError(f"DATA {path!r}: {ky} must be one label per image ({len(x)},); got shape {y.shape}")
    return x, y


def to_nchw(x: np.ndarray, data_format: str = "auto") -> np.ndarray:
    """3-D (N, H, W) -> (N, 1, H, W); 4-D per ``data_format`` (auto: see the module doc)."""
    if x.ndim == 3:
        return x[:, None]
    if data_format == "auto":
        last, second = x.shape[3] in (1, 3), x.shape[1] in (1, 3)
        if last and not second:
            data_format = "NHWC"
        elif second and not last:
            data_format = "NCHW"
        else:
            raise CliError(f"cannot tell the layout of images of shape {x.shape}; pass "
                           "--data-format NCHW or NHWC")
    return np.ascontiguousarray(x.transpose(0, 3, 1, 2)) if data_format == "NHWC" else x


def preprocess(xtr, xte, how: str, downsample: int = 1):
    """float64 images; optional F x F average pooling; 'standardize' / 'scale' / 'none'."""
    integer = xtr.dtype.kind in "biu"
    a, b = xtr.astype(np.float64), xte.astype(np.float64)
    if downsample < 1:
        raise CliError(f"--downsample must be >= 1; got {downsample}")
    if downsample > 1:
        f = downsample
        if a.shape[2] < f or a.shape[3] < f:
            raise CliError(f"--downsample {f} is larger than the images ({a.shape[2]} x {a.shape[3]})")

        def pool(x):
            n, c, h, w = x.shape
            return x[:, :, :h - h % f, :w - w % f].reshape(n, c, h // f, f, w // f, f).mean(axis=(3, 5))
        a, b = pool(a), pool(b)
    if how == "scale" and integer:
        a, b = a / 255.0, b / 255.0
    elif how == "standardize":
        mean = a.mean(axis=(0, 2, 3), keepdims=True)
        std = a.std(axis=(0, 2, 3), keepdims=True)
        std = np.where(std > 0, std, 1.0)
        a, b = (a - mean) / std, (b - mean) / std
    return a, b


def parse_ridge(text) -> str | float:
    if str(text).strip().lower() == "auto":
        return "auto"
    try:
        r = float(text)
    except ValueError:
        raise CliError(f"--ridge must be 'auto' or a number >= 0; got {text!r}") from None
    if not np.isfinite(r) or r < 0:
        raise CliError(f"--ridge must be 'auto' or a number >= 0; got {text!r}")
    return r


def _command_line(args) -> str:
    """The command that ran: as given to ``cli.main`` (the shell's words, or ``cli.main([...])``'s
    list), or, for ``run(args)`` called from Python, the equivalent command with every option."""
    argv = getattr(args, "argv", None)
    if argv is None:
        argv = ["evaluate", str(args.data)]
        parser = add_parser(argparse.ArgumentParser().add_subparsers())
        for a in parser._actions:
            v = getattr(args, a.dest, None)
            if not a.option_strings or a.dest == "help" or v is None or v is False:
                continue
            argv += [a.option_strings[0]] if a.nargs == 0 else [a.option_strings[0], str(v)]
    return "cntk-engine " + shlex.join(str(v) for v in argv)


def check_json_path(path) -> Path:
    """``--json OUT``: refuse before any work an OUT whose folder is missing or not writable."""
    p = Path(path)
    folder = p.parent
    if p.is_dir():
        raise CliError(f"--json {str(path)!r} is a folder; give a file path, e.g. "
                       f"{str(p / 'results.json')!r}")
    if not folder.is_dir():
        raise CliError(f"--json {str(path)!r}: the folder {str(folder)!r} does not exist; create it "
                       "first or give a path in an existing folder")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise CliError(f"--json {str(path)!r}: the folder {str(folder)!r} is not writable")
    return p


def write_json(path, rec: dict) -> None:
    """Write atomically: a temporary file in the same folder, then ``os.replace``."""
    p = Path(path)
    text = json.dumps(rec, indent=1, default=str)
    tmp = None
    try:
        fd, tmp = tempfile.mkstemp(dir=p.parent, prefix=f".{p.name}.", suffix=".tmp")
        with os.fdopen(fd, "w") as f:
            f.write(text)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)        # mkstemp's 0600 -> what open() would have given
        os.replace(tmp, p)
        tmp = None
    except OSError as e:
        raise CliError(f"--json {str(path)!r} cannot be written: {e}") from None
    finally:
        if tmp is not None:
            try:
                os.unlink(tmp)
            except OSError:
                pass


def machine() -> dict:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return dict(cpu=cpu, cores=os.cpu_count(), python=platform.python_version(),
                platform=platform.platform())


# ----------------------------------------------------------------------------- solve
def evaluate_kernel(K, Kt, ytr, yte, ridge, targets="paper") -> dict:
    """Test accuracy of kernel regression with train Gram ``K`` and test kernel ``Kt``."""
    enc = solver.paper_targets if targets == "paper" else solver.one_hot
    Y, classes = enc(ytr)
    labels = np.searchsorted(classes, ytr)
    scale = solver.ridge_scale(K)
    out = {}
    if ridge == "auto":
        sel = solver.select_ridge(K, Y, labels=labels, method="loo")
        i = int(np.nonzero(sel.scores.ridges == sel.ridge)[0][0])
        out.update(ridge_relative=sel.relative, loo_accuracy=float(sel.scores.accuracy[i]),
                   loo_mse=float(sel.scores.mse[i]), ridge_selected_by="loo")
        lam = sel.ridge
    else:
        lam = ridge * scale
        out.update(ridge_relative=ridge)
    sol = solver.fit_ridge(K, Y, lam)
    pred = classes[np.argmax(sol.predict(Kt), axis=1)]
    out.update(accuracy=float(np.mean(pred == yte)), ridge_absolute=lam, jitter=sol.jitter)
    if ridge == "auto" or ridge != 0:
        sol0 = solver.fit_ridge(K, Y, 0.0)
        out.update(accuracy_ridge0=float(np.mean(classes[np.argmax(sol0.predict(Kt), axis=1)] == yte)),
                   jitter_ridge0=sol0.jitter)
    return out


def _rel(v) -> str:
    return "0" if v == 0 else f"{v:.0e}"


def _fmt_line(depth, name, r) -> str:
    s = f"  depth {depth:>2} {name:4s}: test accuracy {100 * r['accuracy']:6.2f}%  ridge {_rel(r['ridge_relative'])} x mean diag"
    if r.get("ridge_selected_by") == "loo":
        s += f" (LOO-selected; LOO accuracy {100 * r['loo_accuracy']:.2f}%)"
    if r.get("jitter"):
        s += f" [jitter {r['jitter']:.2g} added]"
    if "accuracy_ridge0" in r:
        s += f"; ridge 0 (paper solve): {100 * r['accuracy_ridge0']:.2f}%"
        if r.get("jitter_ridge0"):
            s += f" [jitter {r['jitter_ridge0']:.2g}]"
    return s


# ----------------------------------------------------------------------------- run
def run(args) -> int:
    from .api import gram
    from .arch import make_architecture
    from .inputs import check_dtype
    depths = [args.depth] if args.depth is not None else _ints(args.depths, "--depths")
    ridge = parse_ridge(args.ridge)
    if args.tile is not None and args.tile < 1:
        raise CliError(f"--tile must be a positive integer; got {args.tile}")
    # every option error before the data is read and the kernels computed
    make_architecture(depths=depths, pooling=args.pooling, fix=args.fix, convention=args.convention,
                      W_std=args.W_std, b_std=args.b_std, filter_size=args.filter_size)
    check_dtype(args.dtype)
    if args.json:
        check_json_path(args.json)
    xtr, ytr, xte, yte, how = load_data(args.data, args.n_train, args.n_test, args.seed)
    xtr, xte = to_nchw(xtr, args.data_format), to_nchw(xte, args.data_format)
    if xtr.shape[1:] != xte.shape[1:]:
        raise CliError(f"train and test images differ in shape: {xtr.shape[1:]} and {xte.shape[1:]}")
    raw_shape = tuple(int(v) for v in xtr.shape[1:])
    xtr, xte = preprocess(xtr, xte, args.preprocess, args.downsample)
    shape = tuple(int(v) for v in xtr.shape[1:])
    classes = np.unique(ytr)
    if len(classes) < 2:
        raise CliError(f"the {len(ytr)} training images hold one class only ({classes[0]!r}); "
                       "use a larger --n-train or another --seed")
    print(f"evaluate: {args.data} ({how}), {len(xtr)} train / {len(xte)} test images, "
          f"(C, H, W) = {shape}" + (f" (from {raw_shape}, downsampled {args.downsample}x)"
                                     if args.downsample > 1 else "")
          + f", {len(classes)} classes, preprocess {args.preprocess}, seed {args.seed}")
    kernel = args.kernel
    kw = dict(depths=depths, pooling=args.pooling, fix=args.fix, kernel=kernel,
              convention=args.convention, W_std=args.W_std, b_std=args.b_std,
              filter_size=args.filter_size, backend=args.backend, dtype=args.dtype, tile=args.tile,
              return_info=True, progress=not args.no_progress)
    t0 = time.perf_counter()
    ktr, info_tr = gram(xtr, **kw)
    t1 = time.perf_counter()
    kte, info_te = gram(xte, xtr, **kw)
    t2 = time.perf_counter()
    pairs = info_tr["unique_pairs"] + info_te["unique_pairs"]
    print(f"kernels: depths {depths}, pooling {args.pooling}, fix {args.fix}, {kernel}, backend "
          f"{info_tr['backend']} ({info_tr.get('where', '')}, {args.dtype}): train Gram "
          f"{t1 - t0:.1f} s, test kernel {t2 - t1:.1f} s, {pairs} pairs, {pairs / (t2 - t0):.4g} pairs/s")
    names = ("ntk", "nngp") if kernel == "both" else (kernel,)
    results = []
    for d in depths:
        a, b = ktr[d], kte[d]
        a, b = (a, b) if kernel == "both" else ((a,), (b,))
        for name, K, Kt in zip(names, a, b):
            r = evaluate_kernel(K, Kt, ytr, yte, ridge, args.targets)
            r.update(depth=d, kernel=name)
            results.append(r)
            print(_fmt_line(d, name, r))
    print(f"solve: {time.perf_counter() - t2:.1f} s")
    if args.json:
        rec = dict(command=_command_line(args),
                   data=str(args.data), n_train=len(xtr), n_test=len(xte), image_shape=shape,
                   raw_image_shape=raw_shape, data_format=args.data_format,
                   downsample=args.downsample, preprocess=args.preprocess,
                   seed=args.seed, depths=depths, kernel=kernel, pooling=args.pooling, fix=args.fix,
                   convention=args.convention, W_std=args.W_std, b_std=args.b_std,
                   filter_size=args.filter_size, targets=args.targets, ridge=ridge,
                   backend=info_tr["backend"], dtype=args.dtype, tile=args.tile,
                   tile_used=info_tr.get("tile"),
                   seconds=dict(train_gram=t1 - t0, test_kernel=t2 - t1, solve=time.perf_counter() - t2),
                   pairs=pairs, machine=machine(), results=results)
        write_json(args.json, rec)
        print(f"results written to {args.json}")
    return 0


def main(argv=None) -> int:
    """``python -m cntk_engine.evaluate ARGS`` = ``cntk-engine evaluate ARGS``."""
    from .cli import main as cli_main
    return cli_main(["evaluate", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    sys.exit(main())
