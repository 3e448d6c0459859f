"""Image datasets in their published formats, read without running code from them.

CIFAR-10, python version (https://www.cs.toronto.edu/~kriz/cifar.html): the archive
``cifar-10-python.tar.gz`` as downloaded (read in place), or the folder ``cifar-10-batches-py``
it unpacks to (or a folder holding that one).  Its six files ``data_batch_1`` .. ``data_batch_5``
(the 50,000 training images, in this order) and ``test_batch`` (10,000) are pickled dicts:
``b"data"`` uint8 (n, 3072), each row the red, green and blue 32 x 32 planes of one image, row
major; ``b"labels"`` n integers 0..9.

A pickle runs whatever code its author put in it when it is loaded with :mod:`pickle`.  These
are read by :class:`_ArraysOnly`, an unpickler that builds only dicts, lists, strings, bytes,
numbers and NumPy arrays: a file that asks for anything else (a function to call) is refused,
naming it, so a doctored download cannot run code here.
"""
from __future__ import annotations

import io
import pickle
import tarfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

CIFAR10_BATCHES = tuple(f"data_batch_{i}" for i in range(1, 6)) + ("test_batch",)
CIFAR10_FOLDER = "cifar-10-batches-py"
CIFAR10_ACCEPTED = (f"CIFAR-10's python version: the archive cifar-10-python.tar.gz as "
                    f"downloaded, or the folder {CIFAR10_FOLDER} it unpacks to (data_batch_1 .. "
                    "data_batch_5 and test_batch)")
TAR_SUFFIXES = (".tar.gz", ".tgz", ".tar")

#: The only globals a pickled NumPy array needs (``ndarray.__reduce__`` under NumPy 1 and 2,
#: every protocol; ``_codecs.encode`` turns text into bytes, how Python 3's protocols 0 and 1
#: write bytes); a CIFAR-10 batch needs nothing else.
_NUMPY_GLOBALS = {
    ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
    ("numpy.core.numeric", "_frombuffer"), ("numpy._core.numeric", "_frombuffer"),
    ("numpy", "ndarray"), ("numpy", "dtype"), ("_codecs", "encode"),
}


class _ArraysOnly(pickle.Unpickler):
    """An unpickler that resolves no global but those of :data:`_NUMPY_GLOBALS`."""

    def find_class(self, module, name):
        if (module, name) in _NUMPY_GLOBALS:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"it asks for {module}.{name}, which a data file never "
                                     "needs (only arrays, lists and numbers are read)")


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
    """Whether ``path`` is meant as CIFAR-10's python version: a folder, or a tar archive (what
    :func:`load_cifar10` reads; whether it holds the batches is its to say)."""
    p = Path(path)
    return p.is_dir() or p.name.endswith(TAR_SUFFIXES)


def load_cifar10(path) -> LabelledImages:
    """CIFAR-10 from its python version at ``path`` (the module docstring): 50,000 training and
    10,000 test images, uint8 NCHW, and their labels.  Raises ValueError naming what is missing
    or malformed (and what is accepted); OSError where a file cannot be read."""
    p = Path(path)
    if not p.exists():
        raise ValueError(f"{p} does not exist; accepted: {CIFAR10_ACCEPTED}")
    if p.is_dir():
        if not (p / "test_batch").exists() and (p / CIFAR10_FOLDER).is_dir():
            p = p / CIFAR10_FOLDER
        missing = [n for n in CIFAR10_BATCHES if not (p / n).is_file()]
        if missing:
            raise ValueError(f"{p} lacks the CIFAR-10 file(s) {', '.join(missing)}; accepted: "
                             f"{CIFAR10_ACCEPTED}")
        return _batches(lambda name: (p / name).read_bytes(), str(p))
    if not p.name.endswith(TAR_SUFFIXES):
        raise ValueError(f"{p} is neither a folder nor a .tar.gz archive; accepted: "
                         f"{CIFAR10_ACCEPTED}")
    try:
        with tarfile.open(p) as tar:
            members = {Path(m.name).name: m for m in tar.getmembers() if m.isfile()}
            missing = [n for n in CIFAR10_BATCHES if n not in members]
            if missing:
                raise ValueError(f"{p} holds no {', '.join(missing)}; accepted: {CIFAR10_ACCEPTED}")
            return _batches(lambda name: tar.extractfile(members[name]).read(), str(p))
    except (tarfile.TarError, EOFError) as e:       # not a tar, truncated, corrupt gzip
        raise ValueError(f"{p} cannot be read as a tar archive ({type(e).__name__}: {e}); "
                         f"accepted: {CIFAR10_ACCEPTED}") from None


def _batches(read, src: str) -> LabelledImages:
    parts = [_batch(read(name), name, src) for name in CIFAR10_BATCHES]
    return LabelledImages(np.concatenate([x for x, _ in parts[:5]]),
                          np.concatenate([y for _, y in parts[:5]]), parts[5][0], parts[5][1], src)


def _batch(raw: bytes, name: str, src: str) -> tuple[np.ndarray, np.ndarray]:
    """(images uint8 (n, 3, 32, 32), labels int64 (n,)) of one batch file, checked."""
    try:
        d = _ArraysOnly(io.BytesIO(raw), encoding="bytes").load()
    except Exception as e:  # noqa: BLE001 - UnpicklingError, EOFError, ValueError, ...
        raise ValueError(f"{src}: {name} is not a CIFAR-10 python batch ({type(e).__name__}: "
                         f"{e}); accepted: {CIFAR10_ACCEPTED}") from None
    if not isinstance(d, dict) or b"data" not in d or b"labels" not in d:
        raise ValueError(f"{src}: {name} is not a CIFAR-10 python batch (a pickled dict with "
                         f"b'data' and b'labels'); accepted: {CIFAR10_ACCEPTED}")
    data = np.asarray(d[b"data"])
    try:
        labels = np.asarray(d[b"labels"], dtype=np.int64)
    except (TypeError, ValueError):
        labels = np.asarray([], dtype=np.int64).reshape(0, 0)       # reported below
    if data.ndim != 2 or data.shape[1] != 3072 or labels.ndim != 1 or len(labels) != len(data):
        raise ValueError(f"{src}: {name} has data of shape {data.shape} and labels of shape "
                         f"{labels.shape}; a CIFAR-10 batch has (n, 3072) uint8 rows (the R, G, B "
                         "32x32 planes) and n labels")
    if data.dtype != np.uint8:
        raise ValueError(f"{src}: {name} has data of dtype {data.dtype}; a CIFAR-10 batch holds "
                         "uint8 pixels")
    if labels.size and (labels.min() < 0 or labels.max() > 9):
        raise ValueError(f"{src}: {name} has labels outside 0..9 ({labels.min()}..{labels.max()})")
    return data.reshape(-1, 3, 32, 32), labels


__all__ = ["LabelledImages", "load_cifar10", "is_cifar10", "CIFAR10_ACCEPTED", "CIFAR10_BATCHES"]
