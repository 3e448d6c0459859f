"""Image datasets in their published formats, read without running code from them.

CIFAR-10, python version (https://www.cs.toronto.edu/~kriz/cifar.html): the archive
``cifar-10-python.tar.gz`` as downloaded (read in place), or the folder ``cifar-10-batches-py``
it unpacks to (or a folder holding that one).  Its six files ``data_batch_1`` .. ``data_batch_5``
(the 50,000 training images, in this order) and ``test_batch`` (10,000) are pickled dicts:
``b"data"`` uint8 (n, 3072), each row the red, green and blue 32 x 32 planes of one image, row
major; ``b"labels"`` n integers 0..9.

A pickle runs whatever its author put in it when it is loaded with :mod:`pickle`: every
global it names is looked up and called, and even NumPy's own array and dtype constructors,
given crafted arguments and states, read memory they should not.  These files are read by
:class:`_ArraysOnly`, whose globals are stand-ins that call nothing: a pickled array becomes a
record of its dtype code, shape and bytes, checked (a numeric dtype, bytes exactly as many as
the shape needs) and only then turned into an array by ``np.frombuffer``; anything else a file
asks for is refused, naming it.  A batch file is read only up to :data:`MAX_BATCH_BYTES`, and a
gzip archive to its end, so its checksum is verified.
"""
from __future__ import annotations

import gzip
import io
import pickle
import tarfile
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np

CIFAR10_BATCHES = tuple(f"data_batch_{i}" for i in range(1, 6)) + ("test_batch",)
CIFAR10_FOLDER = "cifar-10-batches-py"
CIFAR10_ACCEPTED = (f"CIFAR-10's python version: the archive cifar-10-python.tar.gz as "
                    f"downloaded, or the folder {CIFAR10_FOLDER} it unpacks to (data_batch_1 .. "
                    "data_batch_5 and test_batch)")
TAR_SUFFIXES = (".tar.gz", ".tgz", ".tar")

#: A CIFAR-10 batch file is 31 MB; anything far larger is not one (and is not read).
MAX_BATCH_BYTES = 64 << 20
#: The dtypes an array in a data file may have (numeric; no objects, no structures).
_DTYPE_KINDS = "biuf"


class _Refused(pickle.UnpicklingError):
    pass


class _StandIn:
    """A stand-in for a global of a pickled array: called by REDUCE, it records its arguments
    and returns a record; it takes no state (BUILD on it is refused) and no attributes."""
    __slots__ = ("name",)

    def __init__(self, name):
        object.__setattr__(self, "name", name)

    def __setattr__(self, key, value):
        raise _Refused(f"it sets {key!r} on {self.name}")

    def __setstate__(self, state):
        raise _Refused(f"it gives {self.name} a state")

    def __reduce__(self):
        raise TypeError("not picklable")


class _Dtype(_StandIn):
    """``numpy.dtype(code, align, copy)``, then BUILD with (version, byte order, ...)."""

    def __call__(self, code, align=False, copy=True):
        return _DtypeRecord(code)


class _DtypeRecord:
    __slots__ = ("code", "order")

    def __init__(self, code):
        if not isinstance(code, (str, bytes)):
            raise _Refused(f"a dtype of code {code!r}")
        self.code = code.decode("ascii", "replace") if isinstance(code, bytes) else code
        self.order = "="

    def __setstate__(self, state):
        order = state[1] if isinstance(state, tuple) and len(state) > 1 else None
        if isinstance(order, bytes):
            order = order.decode("ascii", "replace")
        if order not in ("<", ">", "|", "="):
            raise _Refused(f"a dtype state {state!r}")
        self.order = order

    def dtype(self) -> np.dtype:
        try:
            dt = np.dtype(self.code)
        except TypeError:
            raise _Refused(f"a dtype {self.code!r}") from None
        if dt.kind not in _DTYPE_KINDS or dt.fields is not None or dt.subdtype is not None:
            raise _Refused(f"an array of dtype {dt} (only numbers are read)")
        return dt.newbyteorder(self.order) if self.order in "<>" else dt


class _Ndarray(_StandIn):
    """``numpy.ndarray``: only as the first argument of ``_reconstruct``, never called."""

    def __call__(self, *args):
        raise _Refused("it calls numpy.ndarray directly")


class _ArrayRecord:
    """A pickled array: dtype, shape and bytes, made into an array by :meth:`array` only when
    the bytes are exactly what the shape and dtype need."""
    __slots__ = ("shape", "dtype", "fortran", "raw")

    def __init__(self):
        self.shape = None

    def __setstate__(self, state):
        if not (isinstance(state, tuple) and len(state) == 5):
            raise _Refused(f"an array state of {type(state).__name__}")
        _, shape, dtype, fortran, raw = state
        self.set(shape, dtype, raw, bool(fortran))

    def set(self, shape, dtype, raw, fortran=False):
        if self.shape is not None:
            raise _Refused("an array given a state twice")
        if not (isinstance(shape, tuple) and all(type(v) is int and v >= 0 for v in shape)):
            raise _Refused(f"an array of shape {shape!r}")
        if not isinstance(dtype, _DtypeRecord):
            raise _Refused(f"an array of dtype {type(dtype).__name__}")
        if isinstance(raw, (bytearray, memoryview, pickle.PickleBuffer)):
            raw = bytes(raw)
        if not isinstance(raw, bytes):
            raise _Refused(f"an array whose data is {type(raw).__name__}, not bytes (objects?)")
        self.shape, self.dtype, self.fortran, self.raw = shape, dtype, fortran, raw

    def array(self) -> np.ndarray:
        if self.shape is None:
            raise _Refused("an array without data")
        dt = self.dtype.dtype()
        n = 1
        for v in self.shape:
            n *= v
        if n * dt.itemsize != len(self.raw):
            raise _Refused(f"an array of shape {self.shape} and dtype {dt} from {len(self.raw)} "
                           f"bytes ({n * dt.itemsize} needed)")
        return np.frombuffer(self.raw, dtype=dt).reshape(self.shape, order="F" if self.fortran else "C")


class _Reconstruct(_StandIn):
    """``_reconstruct(ndarray, (0,), b"b")``, then BUILD with (version, shape, dtype, fortran,
    bytes)."""

    def __call__(self, cls, shape=None, code=None):
        if not isinstance(cls, _Ndarray):
            raise _Refused(f"_reconstruct of {type(cls).__name__}")
        return _ArrayRecord()


class _Frombuffer(_StandIn):
    """``_frombuffer(buffer, dtype, shape, order)`` (protocol 5)."""

    def __call__(self, buf, dtype, shape, order="C"):
        rec = _ArrayRecord()
        rec.set(shape, dtype, buf, order == "F")
        return rec


class _Encode(_StandIn):
    """``_codecs.encode(text, "latin1")``: how Python 3 writes bytes under protocols 0 to 2."""

    def __call__(self, text, encoding="utf-8"):
        if not isinstance(text, str) or encoding not in ("latin1", "latin-1", "iso-8859-1"):
            raise _Refused(f"_codecs.encode of {type(text).__name__} in {encoding!r}")
        return text.encode("latin1")


#: The globals a pickled NumPy array names (under NumPy 1 and 2, every protocol), each mapped to
#: its stand-in; a CIFAR-10 batch names nothing else.
_STAND_INS = {
    ("numpy.core.multiarray", "_reconstruct"): _Reconstruct("numpy _reconstruct"),
    ("numpy._core.multiarray", "_reconstruct"): _Reconstruct("numpy _reconstruct"),
    ("numpy.core.numeric", "_frombuffer"): _Frombuffer("numpy _frombuffer"),
    ("numpy._core.numeric", "_frombuffer"): _Frombuffer("numpy _frombuffer"),
    ("numpy", "ndarray"): _Ndarray("numpy.ndarray"),
    ("numpy", "dtype"): _Dtype("numpy.dtype"),
    ("_codecs", "encode"): _Encode("_codecs.encode"),
}


class _ArraysOnly(pickle.Unpickler):
    """An unpickler whose only globals are :data:`_STAND_INS`, which call nothing: it builds
    dicts, lists, tuples, strings, bytes, numbers and :class:`_ArrayRecord` objects."""

    def find_class(self, module, name):
        try:
            return _STAND_INS[(module, name)]
        except KeyError:
            raise _Refused(f"it asks for {module}.{name}, which a data file never needs (only "
                           "arrays, lists and numbers are read)") from None

    def persistent_load(self, pid):
        raise _Refused("it refers to an object outside the file (a persistent id)")


def _loads(raw: bytes):
    """The object pickled in ``raw``, its top-level arrays (a dict's values, or the object
    itself) made into NumPy arrays; a record nested deeper stays a record (and fails the
    checks of its reader)."""
    obj = _ArraysOnly(io.BytesIO(raw), encoding="bytes").load()
    if isinstance(obj, _ArrayRecord):
        return obj.array()
    if isinstance(obj, dict):
        return {k: v.array() if isinstance(v, _ArrayRecord) else v for k, v in obj.items()}
    return obj


@dataclass(frozen=True)
class LabelledImages:
    """A training and a test set: images uint8 (N, C, H, W), labels int64 (N,); ``source``: the
    path read."""

    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    source: str


def is_cifar10(path) -> bool:
    """Whether ``path`` is meant as CIFAR-10's python version: a folder, or a file named as a
    tar archive (``.tar.gz``, ``.tgz``, ``.tar``) whose content is not a NumPy file (an ``.npz``
    so named is read as one).  Whether it holds the batches is :func:`load_cifar10`'s to say."""
    p = Path(path)
    if p.is_dir():
        return True
    if not (p.is_file() and p.name.endswith(TAR_SUFFIXES)):
        return False
    try:
        with open(p, "rb") as f:
            head = f.read(6)
    except OSError:
        return True             # load_cifar10 says why it cannot be read
    return not (head.startswith(b"\x93NUMPY") or head.startswith(b"PK"))


def load_cifar10(path) -> LabelledImages:
    """CIFAR-10 from its python version at ``path`` (the module docstring): 50,000 training and
    10,000 test images, uint8 NCHW, and their labels.  Raises ValueError naming what is missing
    or malformed (and what is accepted); OSError where a file cannot be read."""
    p = Path(path)
    if not p.exists():
        raise ValueError(f"{str(p)!r} does not exist; accepted: {CIFAR10_ACCEPTED}")
    if p.is_dir():
        if not (p / "test_batch").exists() and (p / CIFAR10_FOLDER).is_dir():
            p = p / CIFAR10_FOLDER
        missing = [n for n in CIFAR10_BATCHES if not (p / n).is_file()]
        if missing:
            raise ValueError(f"{str(p)!r} lacks the CIFAR-10 file(s) {', '.join(missing)}; "
                             f"accepted: {CIFAR10_ACCEPTED}")
        raw = {}
        for name in CIFAR10_BATCHES:
            f = p / name
            _check_size(f.stat().st_size, name, str(p))
            raw[name] = f.read_bytes()
        return _batches(raw, str(p))
    if not p.name.endswith(TAR_SUFFIXES):
        raise ValueError(f"{str(p)!r} is neither a folder nor a .tar.gz archive; accepted: "
                         f"{CIFAR10_ACCEPTED}")
    try:
        raw = _read_archive(p)
    except (tarfile.TarError, EOFError, zlib.error, gzip.BadGzipFile) as e:   # not a tar, truncated, bad CRC
        raise ValueError(f"{str(p)!r} cannot be read as a tar archive ({type(e).__name__}: {e}); "
                         f"accepted: {CIFAR10_ACCEPTED}") from None
    return _batches(raw, str(p))


def _read_archive(p: Path) -> dict:
    """The six batch files of the tar archive ``p``, read in one pass in the archive's order
    (a gzip stream cannot seek back without decompressing again from its start), all from one
    folder, each once; then the stream to its end, so that gzip verifies its checksum."""
    raw, where = {}, {}
    with tarfile.open(p, mode="r:*") as tar:
        for m in tar:
            name = Path(m.name).name
            if name not in CIFAR10_BATCHES:
                continue
            if name in where:
                raise ValueError(f"{str(p)!r} holds {name} twice ({where[name]} and {m.name}); "
                                 f"accepted: {CIFAR10_ACCEPTED}")
            if not m.isfile():
                raise ValueError(f"{str(p)!r}: {m.name} is not a file (a link?); accepted: "
                                 f"{CIFAR10_ACCEPTED}")
            _check_size(m.size, name, str(p))
            where[name] = m.name
            raw[name] = tar.extractfile(m).read()
        while tar.fileobj.read(1 << 20):       # to the end: gzip checks its CRC there
            pass
    missing = [n for n in CIFAR10_BATCHES if n not in raw]
    if missing:
        raise ValueError(f"{str(p)!r} holds no {', '.join(missing)}; accepted: {CIFAR10_ACCEPTED}")
    folders = {str(Path(v).parent) for v in where.values()}
    if len(folders) > 1:
        raise ValueError(f"{str(p)!r} holds the batch files in several folders "
                         f"({', '.join(sorted(folders))}); accepted: {CIFAR10_ACCEPTED}")
    return raw


def _check_size(size: int, name: str, src: str) -> None:
    if size > MAX_BATCH_BYTES:
        raise ValueError(f"{src!r}: {name} is {size} bytes; a CIFAR-10 batch is about 31 MB "
                         f"(at most {MAX_BATCH_BYTES} bytes are read)")


def _batches(raw: dict, src: str) -> LabelledImages:
    parts = [_batch(raw.pop(name), name, src) for name in CIFAR10_BATCHES]
    return LabelledImages(np.concatenate([x for x, _ in parts[:5]]),
                          np.concatenate([y for _, y in parts[:5]]), parts[5][0], parts[5][1], src)


def _batch(raw: bytes, name: str, src: str) -> tuple[np.ndarray, np.ndarray]:
    """(images uint8 (n, 3, 32, 32), labels int64 (n,)) of one batch file, checked."""
    what = f"{src!r}: {name} is not a CIFAR-10 python batch"
    try:
        d = _loads(raw)
    except _Refused as e:
        raise ValueError(f"{what}: {e}; accepted: {CIFAR10_ACCEPTED}") from None
    except Exception as e:  # noqa: BLE001 - UnpicklingError, EOFError, ValueError, ...
        raise ValueError(f"{what} ({type(e).__name__}: {e}); accepted: {CIFAR10_ACCEPTED}") from None
    if not isinstance(d, dict) or b"data" not in d or b"labels" not in d:
        raise ValueError(f"{what} (a pickled dict with b'data' and b'labels'); accepted: "
                         f"{CIFAR10_ACCEPTED}")
    data, labels = d[b"data"], d[b"labels"]
    if not isinstance(data, np.ndarray):
        raise ValueError(f"{what}: its b'data' is a {type(data).__name__}, not an array")
    if isinstance(labels, np.ndarray) and labels.ndim == 1 and labels.dtype.kind in "iu":
        labels = labels.astype(np.int64)
    elif isinstance(labels, (list, tuple)) and all(type(v) is int for v in labels):
        labels = np.array(labels, dtype=np.int64)
    else:
        raise ValueError(f"{what}: its b'labels' must be a list of integers (0..9); got "
                         + (f"a list holding {type(next(v for v in labels if type(v) is not int)).__name__}"
                            if isinstance(labels, (list, tuple)) else f"a {type(labels).__name__}"
                            + (f" of dtype {labels.dtype} and shape {labels.shape}"
                               if isinstance(labels, np.ndarray) else "")))
    if data.ndim != 2 or data.shape[1] != 3072 or len(labels) != len(data):
        raise ValueError(f"{src!r}: {name} has data of shape {data.shape} and {len(labels)} "
                         "labels; a CIFAR-10 batch has (n, 3072) uint8 rows (the R, G, B 32x32 "
                         "planes) and n labels")
    if data.dtype != np.uint8:
        raise ValueError(f"{src!r}: {name} has data of dtype {data.dtype}; a CIFAR-10 batch "
                         "holds uint8 pixels")
    if labels.size and (labels.min() < 0 or labels.max() > 9):
        raise ValueError(f"{src!r}: {name} has labels outside 0..9 ({labels.min()}..{labels.max()})")
    return data.reshape(-1, 3, 32, 32), labels


__all__ = ["LabelledImages", "load_cifar10", "is_cifar10", "CIFAR10_ACCEPTED", "CIFAR10_BATCHES"]
