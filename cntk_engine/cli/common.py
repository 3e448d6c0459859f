"""What the commands share: one-line errors, reading image files, the architecture and run
options of ``gram`` and ``evaluate``, the preprocessing options of ``evaluate`` and
``preprocess``, the solve options of ``evaluate`` and ``solve`` (each declared once), result
files written atomically."""
from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import shlex
import signal
import tempfile
import threading
from contextlib import contextmanager
from pathlib import Path

import numpy as np

PROG = "cntk-engine"
#: Every JSON result of the command line begins with this key ("cntk-engine <version>"): an
#: existing --json file is replaced only where it is such a result (check_json_path)
WRITTEN_BY = "written_by"
JSON_HELP = "(an earlier result of cntk-engine there is replaced; any other file is refused)"
log = logging.getLogger("cntk_engine")


class CliError(Exception):
    """An error reported as one line (no traceback)."""


def plural(n: int, word: str) -> str:
    """'1 tile', '2 tiles'."""
    return f"{n} {word}" + ("" if n == 1 else "s")


def int_list(text: str, what: str, accepted: str) -> list[int]:
    """'3,4,6' -> [3, 4, 6]; otherwise a CliError "``what`` must be ``accepted``", an empty item
    ('3,,4', '3,4,') included."""
    try:
        return [int(v) for v in text.split(",")]
    except ValueError:
        raise CliError(f"{what} must be {accepted}; got {text!r}") from None


def positive_seconds(text: str) -> float:
    """argparse type: a positive finite number of seconds."""
    try:
        v = float(text)
    except ValueError:
        v = float("nan")
    if not 0 < v < float("inf"):
        raise argparse.ArgumentTypeError(f"must be a positive number of seconds; got {text!r}")
    return v


def nonnegative_int(text: str) -> int:
    """argparse type: an integer >= 0 (a seed)."""
    try:
        v = int(text)
    except ValueError:
        v = -1
    if v < 0:
        raise argparse.ArgumentTypeError(f"must be an integer >= 0; got {text!r}")
    return v


# ------------------------------------------------------------------------------ images
NPY_MAGIC = b"\x93NUMPY"                                 # np.save's header
ZIP_MAGIC = (b"PK\x03\x04", b"PK\x05\x06")              # np.savez is a zip (an empty one: no members)


def open_numpy(p: Path, what: str = "DATA"):
    """``np.load(p, allow_pickle=False)`` of an existing file: an array (.npy) or an open
    NpzFile (.npz).  A file that is neither (text, a pickle, an image) is refused by its first
    bytes, naming what was found and what is accepted; other reading failures say
    :func:`numpy_problem`."""
    head = _head(p, what)
    if not (head.startswith(NPY_MAGIC) or head.startswith(ZIP_MAGIC)):
        text = head and all(32 <= c < 127 or c in b"\t\r\n" for c in head)
        found = ("an empty file" if not head else
                 f"it starts with {head!r}" + (", text" if text else ""))
        raise CliError(f"{what} {str(p)!r} is not a NumPy .npy/.npz file ({found}); accepted: an "
                       ".npy array saved by np.save, or an .npz archive saved by np.savez"
                       + cifar10_hint(p))
    try:
        return np.load(p, allow_pickle=False)
    except Exception as e:  # noqa: BLE001 - any reading failure is the user's file
        raise CliError(f"{what} {str(p)!r} cannot be read as a NumPy .npy/.npz file: "
                       f"{numpy_problem(e)}") from None


class _Arrays(dict):
    """Arrays read whole (a dataset in its published format) with an NpzFile's ``files`` and
    context manager, so the readers of a labelled DATA take either."""

    @property
    def files(self) -> list[str]:
        return list(self)

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> bool:
        return False


def open_data(p: Path, data_format: str = "auto", what: str = "DATA"):
    """A labelled DATA: :func:`open_numpy` of a file, or CIFAR-10's python version (a folder,
    or the archive ``cifar-10-python.tar.gz``: :func:`cntk_engine.datasets.load_cifar10`, which
    runs no code from its pickles) as an archive of ``x_train``, ``y_train``, ``x_test``,
    ``y_test``, the images uint8 NCHW (a ``data_format`` other than auto or NCHW is refused:
    it would read them in another layout)."""
    from ..datasets import CIFAR10_ACCEPTED, is_cifar10, load_cifar10
    if not is_cifar10(p):
        return open_numpy(p, what)
    if data_format not in ("auto", "NCHW"):
        raise CliError(f"{what} {str(p)!r} is CIFAR-10's python version, whose images are read "
                       f"as (N, 3, 32, 32) NCHW; --data-format {data_format} would read them in "
                       "another layout: leave it out (auto) or give NCHW")
    try:
        d = load_cifar10(p)
    except ValueError as e:
        raise CliError(f"{what} {e}") from None
    except OSError as e:
        raise CliError(f"{what} {str(p)!r} cannot be read: {e.strerror or e}; accepted: "
                       f"{CIFAR10_ACCEPTED}") from None
    return _Arrays(x_train=d.x_train, y_train=d.y_train, x_test=d.x_test, y_test=d.y_test)


def shell_arg(text) -> str:
    """``text`` (a path, or DATA:KEY) as a command line the report suggests takes it: quoted for
    the shell, and a relative path that begins with "-" as "./-..." (Path drops a given "./",
    and the command would read the name as an option)."""
    text = str(text)
    return shlex.quote("./" + text if text.startswith("-") else text)


def cifar10_hint(p: Path) -> str:
    """For a command that reads .npy/.npz only, given CIFAR-10's download: how to convert it."""
    from ..datasets import CIFAR10_FOLDER, is_cifar10
    if not is_cifar10(p) or (p.is_dir() and not ((p / "test_batch").exists()
                                                 or (p / CIFAR10_FOLDER).is_dir())):
        return ""
    return (f" (CIFAR-10's python version as downloaded? `{PROG} preprocess "
            f"{shell_arg(p)} --preprocess none --out cifar.npz` writes it as an .npz, "
            "x_train, y_train, x_test, y_test; --zca to whiten it)")


def _head(p: Path, what: str) -> bytes:
    """The first bytes of the file ``p`` (as many as NumPy's magic), or a CliError saying why it
    cannot be read."""
    try:
        with open(p, "rb") as f:
            return f.read(len(NPY_MAGIC))
    except OSError as e:
        raise CliError(f"{what} {str(p)!r} cannot be read: {e.strerror or e}") from None


def numpy_problem(e: Exception) -> str:
    """Why NumPy could not read an array, in the user's terms: an object array (which would
    need unpickling, never done here) is named as such; other errors as they are."""
    if "allow_pickle" in str(e) or "pickle" in str(e).lower():
        return ("it holds an object array (Python objects stored with pickle), which is never "
                "loaded; save the data as a plain numeric array")
    return f"{type(e).__name__}: {e}"


#: The member of an archive ``cntk-engine preprocess`` wrote that says what was done (JSON text).
PREPROCESSING_RECORD = "preprocessing"
#: DATA's leave-one-out groups of its training images, one label per image of ``x_train``
#: (images that must leave the training set together: ``preprocess --augment-flips`` writes each
#: image's with its flip); ``evaluate`` and ``solve`` leave each group out together, and a
#: subset keeps the drawn images' labels.
GROUPS_TRAIN = "groups_train"


def preprocessing_record(z) -> dict | None:
    """The record of the archive ``z`` (open) that ``cntk-engine preprocess`` wrote, or None
    where it holds none (or a member of that name that is not such a record)."""
    if PREPROCESSING_RECORD not in z.files:
        return None
    try:
        rec = json.loads(str(z[PREPROCESSING_RECORD]))
    except Exception:  # noqa: BLE001 - a member of that name not ours: not a record
        return None
    return rec if isinstance(rec, dict) else None


def holds_flips(z) -> bool:
    """Whether ``x_train`` of the archive ``z`` (open) holds its images' flips: its record says
    ``preprocess --augment-flips`` wrote it (whether or not its ``groups_train`` is still there)."""
    rec = preprocessing_record(z)
    return (rec is not None and rec.get("made_by") == "cntk-engine preprocess"
            and rec.get("augment_flips") is True)


def label_vector(y) -> np.ndarray:
    """DATA's labels as one per image: a column (N, 1) or a row (1, N), as tools that keep
    targets 2-D write them (and ``preprocess`` copies them), is read as (N,); any other shape
    is left to the labels' checks to refuse."""
    y = np.asarray(y)
    return y.ravel() if y.ndim == 2 and 1 in y.shape else y


def read_member(z, key: str, path, what: str = "DATA") -> np.ndarray:
    """``z[key]`` of an open .npz archive, every reading failure (a bad CRC, a truncated
    archive, an object array that needs pickle) as a one-line error naming the file and the
    key."""
    try:
        return z[key]
    except Exception as e:  # noqa: BLE001 - zipfile.BadZipFile, ValueError, OSError, ...
        raise CliError(f"{what} {str(path)!r}: array {key!r} cannot be read ({numpy_problem(e)}); "
                       "it must be a plain array of numbers or strings saved by np.savez, "
                       "without pickle") from None


def load_images(spec: str, keys, what: str = "DATA", *,
                flipped_refused: str | None = None) -> np.ndarray:
    """The array in ``spec`` (``.npy``, ``.npz`` or ``.npz:KEY``; in an .npz without a key the
    one of ``keys`` it holds: an archive holding several of them must name one), as stored.
    ``flipped_refused``: the message refusing an ``x_train`` that holds its own flips
    (:func:`holds_flips`), before it is read."""
    path, key = spec, None
    if ":" in spec and not os.path.exists(spec):
        head, tail = spec.rsplit(":", 1)
        if head.endswith(".npz") or os.path.isfile(head):   # a .npy given a key: said below
            path, key = head, tail
    p = Path(path)
    if not p.exists():
        raise CliError(f"{what} {path!r} does not exist")
    if not p.is_file():
        raise CliError(f"{what} {path!r} is not a file" + cifar10_hint(p))
    if key is not None and _head(p, what) == NPY_MAGIC:       # refused before it is read whole
        raise CliError(f"{what} {path!r} is a .npy array, not an .npz archive: name no key "
                       f"(give {path!r} alone)")
    loaded = open_numpy(p, what)
    try:
        if hasattr(loaded, "files"):
            with loaded as z:
                names = list(z.keys())
                if key is None:
                    found = [k for k in keys if k in names]
                    if not found:
                        raise CliError(f"{what} {path!r} holds arrays {names} but none of the keys "
                                       f"{list(keys)}; name one as {path}:KEY")
                    if len(found) > 1:    # e.g. x and x_test in the file given as --x2
                        raise CliError(f"{what} {path!r} holds several image arrays, {found}: name "
                                       f"the one to use as {path}:KEY")
                    key = found[0]
                    log.info("%s: array %r of %s", what, key, path)
                elif key not in names:
                    raise CliError(f"{what} {path!r} has no array {key!r} (it holds {names})")
                if flipped_refused and key == "x_train" and holds_flips(z):
                    raise CliError(f"{what} {path + ':x_train'!r} holds its images' flips: "
                                   f"{flipped_refused}")
                x = z[key]
        else:
            x = loaded
    except CliError:
        raise
    except Exception as e:  # noqa: BLE001 - any reading failure is the user's file
        raise CliError(f"{what} {path!r} cannot be read as a NumPy .npy/.npz file: "
                       f"{numpy_problem(e)}") from None
    if not isinstance(x, np.ndarray):
        raise CliError(f"{what} {path!r} does not hold one array")
    return x


def guess_layout(shape) -> str | None:
    """"NCHW", "NHWC" or None (undecided) for a 4-D image array of ``shape``: channels last
    when the last axis is 1 or 3 and the second is not, first in the opposite case; otherwise
    the channel axis is the second or last axis if it is strictly the smallest of the three
    image axes ((N, 2, 6, 6): NCHW; (N, 32, 32, 4): NHWC)."""
    _, a, b, c = shape
    last, second = c in (1, 3), a in (1, 3)
    if last != second:
        return "NHWC" if last else "NCHW"
    if a < b and a < c:
        return "NCHW"
    if c < a and c < b:
        return "NHWC"
    return None


def to_nchw(x: np.ndarray, data_format: str = "auto", what: str = "DATA") -> np.ndarray:
    """Images as (N, C, H, W): a 3-D (N, H, W) array gets a channel axis; a 4-D one is read per
    ``data_format``; "auto" decides by :func:`guess_layout` (logged) and asks for
    ``--data-format`` when that does not decide."""
    if x.ndim == 3:
        from ..inputs import looks_channels_last
        n, h, w = x.shape
        if looks_channels_last(n, w) and h > 4:
            # the mirror of refuse_channels_last: one (H, W, C) image read as N 1-channel images
            raise CliError(f"{what}: a 3-D array of shape {x.shape} is read as {n} one-channel "
                           f"{h} x {w} images, but its last axis ({w}) looks like the channels of "
                           f"one (H, W, C) image: save it with a batch axis (x[None], shape "
                           f"(1, {n}, {h}, {w})), or, if these are {n} images of {h} x {w} pixels, as "
                           f"(N, 1, H, W) (x[:, None])")
        log.info("%s: images of shape %s read as (N, H, W), one channel%s", what, x.shape,
                 "" if data_format == "auto" else f" (--data-format {data_format} is for 4-D arrays)")
        return x[:, None]
    if x.ndim != 4:
        raise CliError(f"{what}: expected images (N, C, H, W), (N, H, W, C) or (N, H, W); got an "
                       f"array of shape {x.shape}")
    if data_format == "auto":
        data_format = guess_layout(x.shape)
        if data_format is None:
            raise CliError(f"{what}: cannot tell the layout of images of shape {x.shape[1:]} "
                           "(C, H, W or H, W, C); pass --data-format NCHW or NHWC")
        log.info("%s: images of shape %s read as %s (--data-format auto)", what, x.shape, data_format)
    elif guess_layout(x.shape) not in (None, data_format):
        # said, not refused: the layout was given explicitly (preprocess writes NCHW)
        log.warning("%s: images of shape %s read as %s (--data-format %s), though they look %s",
                    what, x.shape, data_format, data_format,
                    "NHWC" if data_format == "NCHW" else "NCHW")
    return np.ascontiguousarray(x.transpose(0, 3, 1, 2)) if data_format == "NHWC" else x


# ------------------------------------------------------------------------------ options
def add_architecture_options(p) -> None:
    """The network and kernels: --architecture, --depth/--depths, --pooling, --fix, --kernel,
    --convention, --W-std, --b-std, --filter-size."""
    from ..arch import PRESETS
    p.add_argument("--architecture", choices=("cnn", *sorted(PRESETS)), default="cnn",
                   help="cnn (the CNN of Arora et al., needs --depth or --depths; default) or a "
                   "Myrtle pooling network (32 x 32 images; its depth is fixed)")
    d = p.add_mutually_exclusive_group()
    d.add_argument("--depth", type=int, help="depth (conv layers + 1) of the cnn")
    d.add_argument("--depths", help="several depths of the cnn from one kernel pass, e.g. 3,4,6,11")
    p.add_argument("--pooling", choices=("gap", "flatten", "lap"), default="gap",
                   help="the readout: gap, flatten, or lap (local average pooling, --lap-window)")
    p.add_argument("--lap-window", type=int, default=None, metavar="C",
                   help="c of the LAP readout (--pooling lap): a c x c circular average pool")
    p.add_argument("--flip", action="store_true",
                   help="flip-symmetrised kernel (K(x, z) + K(x, hflip z)) / 2")
    p.add_argument("--fix", action="store_true", help="first and last layers not trained")
    p.add_argument("--kernel", choices=("ntk", "nngp", "both"), default="ntk",
                   help="kernel(s): ntk, nngp, or both from the same pass")
    p.add_argument("--convention", choices=("arora", "neural_tangents"), default="arora")
    p.add_argument("--W-std", type=float, default=None, dest="W_std", help="neural_tangents convention only")
    p.add_argument("--b-std", type=float, default=None, dest="b_std", help="neural_tangents convention only")
    p.add_argument("--filter-size", type=int, default=3)


def add_preprocessing_options(p, *, default: str | None) -> None:
    """--preprocess / --zca (one of them; ``default`` None: one is required), --zca-reg and
    --downsample: :func:`cntk_engine.preprocess.preprocess`'s choices, as ``evaluate`` and
    ``preprocess`` take them (checked by :func:`preprocessing_options`)."""
    from ..preprocess import PREPROCESSING, ZCA_REG
    pre = p.add_mutually_exclusive_group(required=default is None)  # --zca with --preprocess: an error, not "last wins"
    pre.add_argument("--preprocess", choices=PREPROCESSING, default=default,
                     help="standardize: per-channel mean/std of the training images (the paper's"
                     + ("; default" if default == "standardize" else "") + "); scale: integer "
                     "images / 255; zca: regularised ZCA whitening fitted on the training images "
                     "(Lee et al. 2020); none: as stored")
    pre.add_argument("--zca", action="store_const", const="zca", dest="preprocess",
                     help="the same as --preprocess zca (not together with --preprocess)")
    p.add_argument("--zca-reg", type=float, default=None, metavar="R",
                   help=f"ZCA regulariser, relative to the mean eigenvalue (with --zca; default "
                   f"{ZCA_REG})")
    p.add_argument("--downsample", type=int, default=1, metavar="F",
                   help="average-pool F x F first (a CPU-feasibility option; rows and columns "
                   "beyond the last full window are dropped; default 1: none)")


def dropped_by_downsampling(shape, factor: int) -> str:
    """What --downsample F drops of images of ``shape`` (..., H, W), for the report: "the last
    1 row and 2 columns dropped" (beyond the last full F x F window), or ""."""
    h, w = (int(v) for v in shape[-2:])
    dropped = [plural(r, what) for r, what in ((h % factor, "row"), (w % factor, "column")) if r]
    return f"the last {' and '.join(dropped)} dropped" if dropped else ""


def log_zca_fit(how: str, images, factor: int) -> None:
    """Say before a ZCA fit what it costs (an eigendecomposition of d x d, d the pixels of one
    image after --downsample; seconds at CIFAR's 3,072, more on a loaded machine), so that a
    silent wait is explained."""
    if how == "zca":
        n, c, h, w = images.shape
        d = c * (h // factor) * (w // factor)
        log.info("fitting the ZCA whitening on %d training images of %d values each (an "
                 "eigendecomposition of a %d x %d matrix)", n, d, d, d)


def preprocessing_options(args) -> float:
    """The ZCA regulariser of :func:`add_preprocessing_options`' options, each checked before
    any data is read: --zca-reg only with --zca, a number >= 0; --downsample >= 1."""
    from ..inputs import check_nonnegative
    from ..preprocess import ZCA_REG
    if args.zca_reg is not None and args.preprocess != "zca":
        raise CliError(f"--zca-reg belongs to --zca (--preprocess zca); got --preprocess "
                       f"{args.preprocess}")
    if args.downsample < 1:
        raise CliError(f"the downsampling factor (--downsample) must be an integer >= 1; got "
                       f"{args.downsample}")
    return check_nonnegative(ZCA_REG if args.zca_reg is None else args.zca_reg, "reg",
                             "the ZCA regulariser")


def add_solve_options(p) -> None:
    """--ridge and --targets: the kernel regression of ``evaluate`` and ``solve``."""
    p.add_argument("--ridge", default="auto",
                   help="'auto' (leave-one-out selection, default) or a number >= 0 relative to "
                   "the mean diagonal of the train Gram (0 = the paper's interpolating solve)")
    p.add_argument("--targets", choices=("paper", "onehot"), default="paper",
                   help="paper: 0.9 / -0.1 (default); onehot: 1 / 0")


def parse_ridge(text) -> str | float:
    """--ridge: "auto" or a number >= 0."""
    if str(text).strip().lower() == "auto":
        return "auto"
    try:
        r = float(text)
    except ValueError:
        raise CliError(f"--ridge must be 'auto' or a number >= 0; got {text!r}") from None
    if not np.isfinite(r) or r < 0:
        raise CliError(f"--ridge must be 'auto' or a number >= 0; got {text!r}")
    return r


def add_run_options(p, data_formats=("NCHW", "NHWC"), default_format="NCHW") -> None:
    """How the kernels are computed: --backend, --dtype, --tile, --data-format, --no-progress."""
    p.add_argument("--backend", choices=("auto", "cuda", "numba", "reference"), default="auto")
    p.add_argument("--dtype", choices=("float32", "float64"), default="float32",
                   help="compute precision (default float32; --backend reference always computes "
                   "in float64); results are float64")
    p.add_argument("--tile", type=int, default=None, help="rows/columns per tile (default: automatic)")
    p.add_argument("--data-format", choices=data_formats, default=default_format,
                   help="layout of 4-D images" + (": auto (default) decides from the shape, "
                                                   "and asks when it cannot" if "auto" in data_formats else ""))
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def depths_of(args) -> list[int] | None:
    """The depths asked for: [depth], the --depths list, or None (a preset fixes its depth)."""
    if args.depth is not None:
        return [args.depth]
    return None if args.depths is None else int_list(args.depths, "--depths",
                                                      "comma-separated integers, e.g. 3,4,6,11")


def gram_options(args) -> tuple[dict, "Architecture"]:
    """The ``gram`` keyword arguments of the architecture and run options, checked before any
    data is read (the architecture's own errors included)."""
    from ..arch import make_architecture
    from ..inputs import check_dtype
    if args.tile is not None and args.tile < 1:
        raise CliError(f"--tile must be a positive integer; got {args.tile}")
    if args.convention == "neural_tangents" and args.W_std == 0:
        # every layer's covariance is then b_std^2 whatever the images: the kernel is a constant
        raise CliError("--W-std 0 makes the kernel the same for every pair of images (0 without "
                       "--b-std, a constant with it): it tells no images apart, and a regression "
                       "on it predicts one class for every image (solve refuses such a Gram); use "
                       "--W-std > 0")
    depths = depths_of(args)
    if args.architecture == "cnn" and depths is None:
        raise CliError("--architecture cnn needs --depth D or --depths D1,D2,... (conv layers + 1)")
    arch = make_architecture(depth=args.depth, depths=None if args.depth is not None else depths,
                             architecture=args.architecture, pooling=args.pooling,
                             lap_window=args.lap_window, flip=args.flip, fix=args.fix,
                             convention=args.convention, W_std=args.W_std, b_std=args.b_std,
                             filter_size=args.filter_size)
    check_dtype(args.dtype)
    # the commands convert their images to NCHW themselves (to_nchw: the layout is decided)
    return dict(depth=args.depth, depths=None if args.depth is not None else depths,
                architecture=args.architecture, pooling=args.pooling, lap_window=args.lap_window,
                flip=args.flip, fix=args.fix, kernel=args.kernel, convention=args.convention, W_std=args.W_std,
                b_std=args.b_std, filter_size=args.filter_size, backend=args.backend,
                dtype=args.dtype, tile=args.tile, data_format="NCHW",
                progress=not args.no_progress), arch


# ------------------------------------------------------------------------------ records
def check_json_path(path, option: str = "--json", inputs: dict | None = None) -> Path:
    """Refuse, before any work, a result path that cannot or must not be written: empty, a
    folder, in a missing or read-only folder, not a regular file (a FIFO, a device: write_json
    would replace it), one of the command's ``inputs`` ({what: path}: its DATA file, or a file
    in its store), or an existing file that is not a result of this command line (a data file
    or another tool's JSON given by mistake; :func:`is_result`).  An earlier result is
    overwritten, as the option says."""
    if not str(path):
        raise CliError(f"{option} '' is empty; give the path of the JSON file to write")
    if str(path) == "-":       # not standard output, which holds the report
        raise CliError(f"{option} '-': the JSON is written to a file, not to standard output "
                       "(which holds the command's report); give a file path, e.g. results.json")
    p = Path(path)
    check_path_name(p, option)
    folder = p.parent
    for what, other in (inputs or {}).items():      # first: a folder in a store is "in STORE"
        if other is None:
            continue
        other = Path(other).resolve()
        mine = p.resolve()
        if mine == other or other in mine.parents:
            raise CliError(f"{option} {str(path)!r} is {'in ' if mine != other else ''}{what}; "
                           "give another path for the results")
    if p.is_dir():
        raise CliError(f"{option} {str(path)!r} is a folder; give a file path, e.g. "
                       f"{str(p / 'results.json')!r}")
    check_parent_folder(p, option)
    if p.exists() or p.is_symlink():
        if not p.is_file():
            raise CliError(f"{option} {str(path)!r} exists and is not a regular file (a FIFO, a "
                           "device or a broken link); give the path of a file to write")
        if p.stat().st_size and not is_result(p):
            raise CliError(f"{option} {str(path)!r} exists and is not a result of {PROG} (a JSON "
                           f"object with {WRITTEN_BY!r}); refusing to overwrite it: remove it or "
                           "give another path")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise CliError(f"{option} {str(path)!r}: the folder {str(folder)!r} is not writable")
    return p


def check_path_name(p: Path, option: str) -> None:
    """``p`` must be a name the file system takes: not too long, in folders this user may
    search (the OS's reason, named with ``option``). Missing folders are left to the caller."""
    try:
        os.lstat(p)
    except (FileNotFoundError, NotADirectoryError):
        pass
    except OSError as e:
        raise CliError(f"{option} {str(p)!r}: {e.strerror or e}") from None


def check_parent_folder(p: Path, option: str) -> None:
    """The folder that will hold ``p`` must exist (and be a folder); ``p``'s name is checked
    before (:func:`check_path_name`, which its callers run first of all)."""
    folder = p.parent
    if folder.is_dir():
        return
    if folder.exists():
        raise CliError(f"{option} {str(p)!r}: {str(folder)!r} is a file, not a folder")
    up = next((q for q in folder.parents if q.exists()), None)
    if up is not None and not up.is_dir():
        raise CliError(f"{option} {str(p)!r}: {str(up)!r} is a file, not a folder")
    raise CliError(f"{option} {str(p)!r}: the folder {str(folder)!r} does not exist; create it "
                   "first or give a path in an existing folder")


def is_result(p: Path) -> bool:
    """Whether the file ``p`` holds a JSON result of this command line: an object whose
    :data:`WRITTEN_BY` names it, or one written before that key: evaluate's or solve's record
    (a ``command`` that names it, or None where the command ran from Python) or verify's report
    (``store`` and ``ok``)."""
    try:
        with open(p, "rb") as f:
            rec = json.loads(f.read(64 << 20))
    except (OSError, ValueError):
        return False
    if not isinstance(rec, dict):
        return False
    if WRITTEN_BY in rec:
        return isinstance(rec[WRITTEN_BY], str) and rec[WRITTEN_BY].startswith(f"{PROG} ")
    if "command" in rec and "version" in rec:
        return rec["command"] is None or str(rec["command"]).startswith(f"{PROG} ")
    return {"store", "ok"} <= rec.keys()


def command_of(args) -> str | None:
    """The command that ran, as the shell would show it (``cntk-engine ...``), from the words
    ``main`` was given; None for ``run(args)`` called from Python."""
    argv = getattr(args, "argv", None)
    return None if argv is None else f"{PROG} " + shlex.join(str(a) for a in argv)


def write_json(path, rec: dict, what: str | None = None) -> None:
    """``rec`` as JSON, written as :func:`write_file` writes (``what``: how errors name it)."""
    write_file(path, json_writer(rec), what)


def json_writer(rec: dict):
    """What writes ``rec`` as JSON into a binary file, for :func:`write_file` / :func:`write_files`."""
    from ..version import __version__
    text = json.dumps({WRITTEN_BY: f"{PROG} {__version__}", **rec}, indent=1, default=_json_default)
    return lambda f: f.write(text.encode())


def write_file(path, write, what: str | None = None, *, overwrite: bool = True) -> None:
    """``write(f)`` into ``path`` atomically: a binary temporary file in the same folder, then
    ``os.replace``; through a symbolic link, the file it points to (replacing the link would
    leave that file as it was).  ``overwrite=False``: linked into place instead, never over a
    file created meanwhile.  The temporary file is removed whatever happens, SIGTERM (a batch
    system's time limit) included.  ``what``: how errors name the path (default: the path)."""
    write_files([(path, write, what)], overwrite=overwrite)


class Terminated(KeyboardInterrupt):
    """SIGTERM (a batch system's time limit or preemption: SLURM, Kubernetes) in a command that
    claims tiles of a store, raised as Ctrl-C is, so that the job stops as an interrupted one
    does: its claims released and its finished tiles kept, with the same message
    (:func:`terminated_as_interrupted`); ``outcome``: what a job's run record says of it."""

    outcome = "terminated (SIGTERM)"


@contextmanager
def terminated_as_interrupted(enabled: bool = True):
    """Within: SIGTERM raises :class:`Terminated` in the main thread, once (a second SIGTERM
    during the cleanup it starts is ignored; SIGKILL is the hard stop).  Left as it is where
    not ``enabled`` (a command that holds no claims: Python's handler would wait for a long
    LAPACK call to return), off the main thread, and where SIGTERM is ignored or handled by
    other code than Python's."""
    if (not enabled or threading.current_thread() is not threading.main_thread()
            or signal.getsignal(signal.SIGTERM) is not signal.SIG_DFL):
        yield
        return

    def raise_terminated(signum, frame):
        signal.signal(signal.SIGTERM, signal.SIG_IGN)     # the claims' release runs to its end
        raise Terminated()
    signal.signal(signal.SIGTERM, raise_terminated)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)


class GuardedStream:
    """A command's standard output or error whose failures end that stream's output, not the
    command: a reader that left (``| head``), a full device, a closed stream (None), or a
    character the stream cannot encode (a file name in an ASCII locale: written as a
    backslash escape).  The command's work and its files are finished then; ``error`` holds
    what stopped the output."""

    def __init__(self, stream):
        self._stream = stream
        self.error: OSError | None = None

    def write(self, text: str) -> int:
        if self.error is None and self._stream is not None:
            try:
                try:
                    self._stream.write(text)
                except UnicodeEncodeError:
                    enc = getattr(self._stream, "encoding", None) or "ascii"
                    self._stream.write(text.encode(enc, "backslashreplace").decode(enc))
            except OSError as e:
                self.error = e
        return len(text)

    def flush(self) -> None:
        if self.error is None and self._stream is not None:
            try:
                self._stream.flush()
            except OSError as e:
                self.error = e

    def __getattr__(self, name):          # isatty, fileno, encoding: the stream's own
        return getattr(self._stream, name)


@contextmanager
def guarded_output():
    """Within: ``sys.stdout`` and ``sys.stderr`` are :class:`GuardedStream` s (yielded).  On
    the way out both are flushed through their guards (a block-buffered stream, a pipe or a
    file, fails only when flushed, which would otherwise be at the interpreter's exit: status
    120 and "Exception ignored"), and a stream that failed is pointed at /dev/null, so that
    what its buffer still holds goes nowhere at exit instead of failing again."""
    import sys
    saved = sys.stdout, sys.stderr
    sys.stdout, sys.stderr = guarded = GuardedStream(saved[0]), GuardedStream(saved[1])
    try:
        yield guarded
    finally:
        for g in guarded:
            g.flush()
        sys.stdout, sys.stderr = saved
        for g, stream in zip(guarded, saved):
            if g.error is not None:
                silence(stream)


def silence(stream) -> None:
    """Point ``stream``'s file descriptor at /dev/null (nothing where it has none)."""
    try:
        fd = stream.fileno()
    except (OSError, ValueError, AttributeError):     # None, or an in-memory stream
        return
    null = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(null, fd)
    finally:
        os.close(null)


def _temporary_prefix(name: str) -> str:
    """The prefix of a temporary file beside ``name``: ".NAME." with NAME cut to its first 200
    bytes (mkstemp makes it unique), so that a legal name of up to 255 bytes keeps a legal
    temporary name (".", "." and mkstemp's 8 characters and ".tmp" add 14)."""
    return "." + os.fsdecode(os.fsencode(name)[:200]) + "."


def write_files(items, *, overwrite: bool = True) -> None:
    """Each ``(path, write, what)`` of ``items`` written as :func:`write_file` writes one: every
    file is written to its temporary file before any is moved into place, so a failure to
    write one (a full disk, a folder that refuses files) leaves every path as it was (a
    command's predictions are not left without the results that say what they are).  The
    moves are renames within each file's own folder, checked before by the caller's path
    checks; one that fails after another moved (a folder put in a path's place meanwhile)
    leaves the earlier files in place."""
    staged = []                     # [temporary file (None once in place), real path, what]
    # SIGTERM's default (an exit) would leave the temporary files: raised as a command raises it
    with terminated_as_interrupted():
        try:
            for path, write, what in items:
                what = what or repr(str(path))
                p = Path(os.path.realpath(path))
                try:
                    fd, tmp = tempfile.mkstemp(dir=p.parent, prefix=_temporary_prefix(p.name),
                                               suffix=".tmp")
                    staged.append([tmp, p, what])
                    with os.fdopen(fd, "wb") as f:
                        write(f)
                    umask = os.umask(0)
                    os.umask(umask)
                    os.chmod(tmp, 0o666 & ~umask)        # mkstemp's 0600 -> what open() gives
                except OSError as e:
                    raise CliError(f"{what} cannot be written: {e}") from None
            for entry in staged:
                if _into_place(*entry, overwrite=overwrite):
                    entry[0] = None
        finally:
            for tmp, _, _ in staged:
                if tmp is not None:
                    try:
                        os.unlink(tmp)
                    except OSError:
                        pass


def _into_place(tmp: str, p: Path, what: str, *, overwrite: bool) -> bool:
    """The written temporary file ``tmp`` moved (True) or linked (False: ``tmp`` is left for
    the caller to remove) to ``p`` (:func:`write_files`)."""
    try:
        if overwrite:
            os.replace(tmp, p)
            return True
        created = f"{what} was created by another process meanwhile; nothing was written: give a new path"
        try:
            os.link(tmp, p)
        except FileExistsError:
            raise CliError(created) from None
        except OSError:                      # a file system without hard links
            if p.exists():
                raise CliError(created) from None
            os.rename(tmp, p)
            return True
        return False
    except OSError as e:
        raise CliError(f"{what} cannot be written: {e}") from None


def _json_default(o):
    if isinstance(o, np.generic):
        return o.item()
    if isinstance(o, np.ndarray):
        return o.tolist()
    return str(o)


def machine() -> dict:
    """The CPU model, cores, Python and platform of this machine, its widest x86 vector
    instructions (a VM's model name may say only "AMD EPYC") and the CPU numba compiles for."""
    model, flags = None, set()
    try:
        with open("/proc/cpuinfo") as f:         # the first processor's lines
            for line in f:
                if line.startswith("model name") and model is None:
                    model = line.split(":", 1)[1].strip()
                elif line.startswith("flags"):
                    flags = set(line.split(":", 1)[1].split())
                    break
    except OSError:
        pass
    rec = dict(cpu=model or platform.processor() or platform.machine(), cores=os.cpu_count(),
               python=platform.python_version(), platform=platform.platform())
    if flags:
        rec["vector_isa"] = "AVX-512" if "avx512f" in flags else "AVX2" if "avx2" in flags else \
            "AVX" if "avx" in flags else "SSE"
    try:
        from ..backends.numba_cpu import numba_target
        rec["numba_cpu"] = numba_target()[0]
    except Exception:  # noqa: BLE001 - numba missing or failing: the rest of the record stands
        pass
    return rec
