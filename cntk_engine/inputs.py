"""Validation and conversion of image batches: every bad input gets a ValueError that says what
is wrong and what is accepted, before any work starts."""
from __future__ import annotations

import numpy as np

from .diag import array_module

DATA_FORMATS = ("NCHW", "NHWC")
DTYPES = ("float32", "float64")


def check_dtype(dtype) -> np.dtype:
    name = np.dtype(dtype).name if not isinstance(dtype, str) else dtype
    if name not in DTYPES:
        raise ValueError(f"dtype must be one of {DTYPES} (the compute precision); got {dtype!r}")
    return np.dtype(name)


def as_images(x, data_format: str = "NCHW", name: str = "x1"):
    """Return ``x`` as an (N, C, H, W) float64 array (NumPy, or CuPy for CuPy input)."""
    if data_format not in DATA_FORMATS:
        raise ValueError(f"data_format must be one of {DATA_FORMATS}; got {data_format!r}")
    xp = array_module(x)
    try:
        arr = xp.asarray(x)
    except Exception as e:  # ragged lists, objects, ...
        raise ValueError(f"{name} must be an array of images; converting it failed: {e}") from None
    if arr.dtype.kind not in "biuf":
        raise ValueError(f"{name} must hold real numbers (any integer or float dtype); got dtype {arr.dtype}")
    if arr.ndim != 4:
        hint = ""
        if arr.ndim == 3:
            hint = (" (for single-channel images of shape (N, H, W) add a channel axis, "
                    "e.g. x[:, None] for NCHW)")
        raise ValueError(f"{name} must be 4-D, (N, C, H, W) for data_format='NCHW' or (N, H, W, C) "
                         f"for 'NHWC'; got shape {tuple(arr.shape)}{hint}")
    if data_format == "NHWC":
        arr = arr.transpose(0, 3, 1, 2)
    if min(arr.shape) == 0:
        raise ValueError(f"{name} must hold at least one image with C, H, W >= 1; got (N, C, H, W) = "
                         f"{tuple(arr.shape)}")
    arr = xp.ascontiguousarray(arr, dtype=xp.float64)
    bad = ~xp.isfinite(arr).reshape(arr.shape[0], -1).all(axis=1)
    if bool(bad.any()):
        idx = [int(i) for i in xp.nonzero(bad)[0][:10].tolist()]
        more = int(bad.sum()) - len(idx)
        raise ValueError(f"{name} has NaN or Inf pixels in image(s) at index {idx}"
                         + (f" and {more} more" if more > 0 else "") + "; all pixels must be finite")
    return arr


def check_pair(x1, x2) -> None:
    if x1.shape[1:] != x2.shape[1:]:
        raise ValueError("x1 and x2 must have the same (C, H, W); got "
                         f"{tuple(x1.shape[1:])} and {tuple(x2.shape[1:])}")
    if array_module(x1) is not array_module(x2):
        raise ValueError("x1 and x2 must both be NumPy or both be CuPy arrays")
