"""Validation and conversion of image batches: every bad input gets a ValueError that says what
is wrong and what is accepted, before any work starts."""
from __future__ import annotations

import numpy as np

from .arch import as_integer, is_int
from .arrays import get_array_module

DATA_FORMATS = ("NCHW", "NHWC")
DTYPES = ("float32", "float64")


def check_dtype(dtype) -> np.dtype:
    """The compute dtype: "float32" / "float64" (or np.float32 / np.float64 / their np.dtype)."""
    name = None
    if isinstance(dtype, str):
        name = dtype
    elif dtype is not None:          # np.dtype(None) would silently be float64
        try:
            name = np.dtype(dtype).name
        except (TypeError, ValueError):
            pass
    if name not in DTYPES:
        raise ValueError(f"dtype must be one of {DTYPES} (the compute precision); got {dtype!r}")
    return np.dtype(name)


def check_tile(tile):
    """``tile``: None (automatic), or a positive integer (NumPy integers too) as a Python int."""
    if tile is None:
        return None
    t = as_integer(tile)          # integer-like (not bool) -> int, as depth and filter_size
    if is_int(t) and t >= 1:
        return t
    raise ValueError(f"tile must be a positive integer (rows/columns per tile) or None (automatic); "
                     f"got {tile!r}")


def check_magnitude(x1, x2, arch, params, dtype) -> None:
    """Refuse images whose kernel values would overflow the compute dtype (to inf, then NaN).

    A bound on the intermediates a backend holds in ``dtype``, from m = max |pixel| of both
    sets: the first layer's unscaled box sum of x . z is at most C k^2 m^2; with |K_l| <= q / 2
    and 0 <= Kdot <= 1/2, each later layer's unscaled box sums are at most k^2 / 2 times the
    previous Sigma and Theta.  The backends also form products q_x q_z of two diagonals (CUDA)
    and row sums of up to max(H, W) entries, so B * max(B, H, W), for the bound B of all of
    these, must stay 100 times below the largest finite value of ``dtype``.
    """
    dtype = np.dtype(dtype)
    xp = get_array_module(x1)
    m = float(xp.abs(x1).max())
    if x2 is not None and x2 is not x1:
        m = max(m, float(xp.abs(x2).max()))
    _, c, h, w = x1.shape
    k2 = float(arch.filter_size) ** 2
    with np.errstate(over="ignore", invalid="ignore"):
        unscaled = c * k2 * m * m
        sig = params.w_first * unscaled + params.b2
        th = 0.0 if arch.fix else sig
        bound = max(unscaled, sig)
        for _ in range(arch.n_layers - 1):
            box_k, box_g = k2 * sig / 2, k2 * th / 2
            sig = params.w * box_k + params.b2
            th = sig + params.w * box_g
            bound = max(bound, box_k, box_g, sig, th)
        worst = bound * max(bound, h, w)
    limit = float(np.finfo(dtype).max) / 100
    if not worst <= limit:           # also catches inf / NaN
        safe = m * (limit / worst) ** 0.25 if 0 < worst < float("inf") else None   # bound ~ m^2
        rescale = ("rescale the images" + (f" to max |pixel| <= about {safe:.2g}" if safe else "")
                   + " (without biases, scaling all images by s scales the kernel by s^2)")
        raise ValueError(
            f"the images are too large for dtype={dtype.name!r}: max |pixel| {m:.3g} gives kernel "
            f"intermediates up to about {bound:.3g} in this architecture, whose products overflow "
            f"{dtype.name} (the output could be inf or NaN); "
            + (f"use dtype='float64', or {rescale}" if dtype == np.float32 else rescale))


def as_images(x, data_format: str = "NCHW", name: str = "x1"):
    """Return ``x`` as an (N, C, H, W) float64 array (NumPy, or CuPy for CuPy input)."""
    if data_format not in DATA_FORMATS:
        raise ValueError(f"data_format must be one of {DATA_FORMATS}; got {data_format!r}")
    xp = get_array_module(x)
    try:
        arr = xp.asarray(x)
    except Exception as e:  # ragged lists, objects, ...
        raise ValueError(f"{name} must be an array of images; converting it failed: {e}") from None
    if arr.dtype.kind not in "biuf":
        raise ValueError(f"{name} must hold real numbers (any integer or float dtype); got dtype {arr.dtype}")
    if arr.ndim != 4:
        hint = ""
        if arr.ndim == 3:
            hint = (" (for single-channel images of shape (N, H, W) add a channel axis: "
                    + ("x[:, None] for NCHW)" if data_format == "NCHW" else "x[..., None] for NHWC)"))
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
    if get_array_module(x1) is not get_array_module(x2):
        raise ValueError("x1 and x2 must both be NumPy or both be CuPy arrays")
