"""Classification targets and scores: one-hot encodings (the paper's 0.9 / -0.1), argmax
predictions, accuracy."""
from __future__ import annotations

import math
import numbers

import numpy as np

from ..arrays import get_array_module, is_cupy, to_host

def one_hot(y, classes=None, *, on: float = 1.0, off: float = 0.0):
    """Targets (n, c) with ``on`` in the column of each label and ``off`` elsewhere.

    ``classes``: the label of each column, in any order, each once (default: the sorted
    unique labels of ``y``).  Returns ``(Y, classes)``; the column index of each sample's class
    (the ``labels`` of :func:`loo` / :func:`select_ridge`) is ``np.searchsorted(classes, y)``
    for sorted ``classes`` (the default).  ValueError for empty or repeated ``classes`` or a
    label that is not among them, or a label (or class) that is NaN or infinite."""
    y = to_host(y)
    if y.ndim != 1:
        raise ValueError(f"labels must be 1-D; got shape {y.shape}")
    _check_finite_labels(y, "labels")
    if classes is not None:
        _check_finite_labels(np.asarray(classes), "classes")
    if classes is None:
        try:
            classes = np.unique(y)
        except TypeError:          # an object array whose labels do not sort: str beside int
            raise _mixed_kinds(y, "labels") from None
    else:
        classes = np.asarray(classes)
    if classes.ndim != 1 or classes.size == 0:
        raise ValueError(f"classes must be a non-empty 1-D list of the labels (one per column); "
                         f"got {classes.tolist()!r}")
    order = np.argsort(classes, kind="stable")
    ordered = classes[order]
    dup = ordered[1:] == ordered[:-1]
    if bool(np.any(dup)):
        raise ValueError(f"classes must be distinct; {np.unique(ordered[1:][dup])[:10].tolist()} "
                         "repeated")
    try:
        pos = np.clip(np.searchsorted(ordered, y), 0, len(classes) - 1)
        bad = np.asarray(ordered[pos] != y, dtype=bool)
    except TypeError:          # labels not comparable with the classes (e.g. str vs int)
        pos, bad = None, np.ones(len(y), dtype=bool)
    if bool(np.any(bad)):
        raise ValueError(f"labels {np.unique(y[bad])[:10].tolist()} are not among the classes "
                         f"{classes[:20].tolist()}")
    idx = order[pos]
    Y = np.full((len(y), len(classes)), float(off))
    Y[np.arange(len(y)), idx] = on
    return Y, classes


def label_kind(y) -> str:
    """"numbers", "strings", "bytes" or "mixed": labels of different kinds never compare equal
    ('a' != b'a', 1 != '1').  An object array (pandas' ``.to_numpy()`` of a column) is of the
    kind its elements are all of, "mixed" where they are not all of one kind."""
    y = np.asarray(y)
    kind = y.dtype.kind
    if kind != "O":                    # complex numbers, datetimes and the like: their dtype's name
        return ("numbers" if kind in "biuf" else "strings" if kind == "U" else "bytes" if kind == "S"
                else y.dtype.name)
    kinds = {"numbers" if isinstance(v, (numbers.Real, np.bool_)) else "strings" if isinstance(v, str)
             else "bytes" if isinstance(v, bytes) else "mixed" for v in y.ravel().tolist()}
    return kinds.pop() if len(kinds) == 1 else "mixed" if kinds else "numbers"


def check_labels(y, n: int, what: str, like=None) -> np.ndarray:
    """``y`` as a 1-D host array of ``n`` class labels of one kind (:func:`label_kind`): finite
    whole numbers (integers, bools, floats such as 3.0), strings or bytes; with ``like`` (other
    labels, e.g. the training labels), of the same kind as those: a ValueError naming ``what``
    otherwise.  Fractional numbers are refused: they are regression targets, not classes (each
    distinct value would be a class of its own)."""
    y = to_host(y)
    if y.ndim != 1 or len(y) != n:
        raise ValueError(f"{what} must be 1-D, one label per sample ({n},); got shape {y.shape}")
    _check_finite_labels(y, what)
    kind = label_kind(y)
    if kind == "mixed":
        raise _mixed_kinds(y, what)
    if kind not in ("numbers", "strings", "bytes"):
        raise ValueError(f"{what} must be class labels: integers, strings or bytes; got dtype {y.dtype}")
    if kind == "numbers" and y.dtype.kind in "fO":
        values = y.tolist()
        frac = [i for i, v in enumerate(values) if not isinstance(v, (numbers.Integral, np.bool_))
                and not float(v).is_integer()]
        if frac:
            raise ValueError(f"{what} must be class labels (integers, strings, bytes, or whole-number "
                             f"floats such as 3.0); got fractional numbers ({values[frac[0]]!r} the first) at "
                             f"index {frac[:10]}" + (f" and {len(frac) - 10} more" if len(frac) > 10 else "")
                             + ": these look like regression targets, which fit_ridge or "
                             "CNTKRegressor take")
    other = None if like is None else label_kind(like)
    if other is not None and kind != other:
        hint = " (decode the bytes: y.astype(str))" if {kind, other} == {"bytes", "strings"} else ""
        raise ValueError(f"{what} holds {kind} ({y.dtype}) but the training labels "
                         f"{other} ({np.asarray(like).dtype}): no label could match{hint}")
    return y


def _mixed_kinds(y, what: str) -> ValueError:
    types = sorted({type(v).__name__ for v in y.ravel().tolist()})
    return ValueError(f"{what} must be class names of one kind: all numbers, all strings or all "
                      f"bytes; got {', '.join(types)} ({y.dtype})")


def _check_finite_labels(y, what: str) -> None:
    if y.dtype.kind in "fcO":
        if y.dtype.kind == "O":        # only its real numbers can be NaN or infinite
            bad = np.array([isinstance(v, numbers.Real) and not math.isfinite(v) for v in y.ravel().tolist()],
                           dtype=bool).reshape(y.shape)
        else:
            bad = ~np.isfinite(y)
        if bool(np.any(bad)):
            idx = np.nonzero(bad)[0]
            raise ValueError(f"{what} must be finite; got {y[idx[0]]} at index "
                             f"{idx[:10].tolist()}" + (f" and {len(idx) - 10} more" if len(idx) > 10
                                                      else "")
                             + " (labels are class names: integers, strings, bytes or whole-number floats)")


def paper_targets(y, classes=None):
    """The CNTK paper's encoding: 0.9 for the class, -0.1 elsewhere.  Returns ``(Y, classes)``."""
    return one_hot(y, classes, on=0.9, off=-0.1)


def predict_classes(F, classes=None):
    """Argmax over the columns of scores ``F`` (m, c); mapped through ``classes`` (c labels, one
    per column) if given."""
    xp = get_array_module(F)
    F = F if is_cupy(F) else np.asarray(F)
    if F.ndim != 2:
        raise ValueError(f"scores must be (m, c), one column per class; got shape {tuple(F.shape)}"
                         ". For 1-D +-1 targets the predicted class is the sign: np.sign(scores)")
    if classes is not None and np.shape(classes) != (F.shape[1],):
        raise ValueError(f"classes must be the label of each of the {F.shape[1]} columns of the "
                         f"scores; got shape {np.shape(classes)}")
    idx = xp.argmax(F, axis=1)
    idx = to_host(idx)
    return idx if classes is None else np.asarray(classes)[idx]


def accuracy(pred, y) -> float:
    """Fraction of correct labels.  ``pred``: predicted labels (m,), compared with labels ``y``
    of any type; or scores (m, c), whose argmax column is compared with ``y``, which must then
    be column indices 0 <= y < c (``np.searchsorted(classes, y)``), not the labels."""
    pred = to_host(pred)
    y = to_host(y)
    if pred.ndim == 2:
        class_indices(y, pred.shape[1], "y (with scores (m, c))")
        pred = pred.argmax(axis=1)
    if pred.shape != y.shape:
        raise ValueError(f"predictions {pred.shape} and labels {y.shape} differ in shape")
    kinds = label_kind(pred), label_kind(y)
    if kinds[0] != kinds[1]:           # 'a' != b'a', 1 != '1': an accuracy of 0 that means nothing
        hint = " (decode the bytes: y.astype(str))" if set(kinds) == {"bytes", "strings"} else ""
        raise ValueError(f"the predictions hold {kinds[0]} ({pred.dtype}) but the labels {kinds[1]} "
                         f"({y.dtype}): no label could match{hint}")
    return float(np.mean(pred == y))


LABELS_HINT = ("pass labels=np.searchsorted(classes, y), with the classes returned by "
                "paper_targets(y) / one_hot(y)")


def class_indices(lab, k: int, what: str):
    """Check that ``lab`` holds integer column indices 0 <= label < k (ValueError if not)."""
    if lab.dtype == np.bool_ or not np.issubdtype(lab.dtype, np.integer):
        raise ValueError(f"{what} must be integer column indices of the class of each sample "
                         f"(0 .. {k - 1}), not the labels themselves; got dtype {lab.dtype}; "
                         + LABELS_HINT)
    if lab.size and (int(lab.min()) < 0 or int(lab.max()) >= k):
        raise ValueError(f"{what} must be column indices 0 <= label < {k} (one column per class); "
                         f"got values {int(lab.min())} .. {int(lab.max())}; " + LABELS_HINT)
    return lab

