"""Image preprocessing before the kernel, fitted on the training images only.

* :func:`standardize`: per-channel mean / std of the training images (Arora et al. 2019).
* :func:`scale`: integer images (uint8 pixels) divided by 255.
* :func:`downsample`: F x F average pooling (a CPU-feasibility option for large images).
* :func:`preprocess`: the three above as ``cntk-engine evaluate --preprocess`` applies them.

Images are (N, C, H, W); results are float64.
"""
from __future__ import annotations

import numpy as np

PREPROCESSING = ("standardize", "scale", "none")


def _images(x, name: str) -> np.ndarray:
    x = np.asarray(x)
    if x.ndim != 4:
        raise ValueError(f"{name} must be images (N, C, H, W); got shape {x.shape}")
    return x


def standardize(x_train, x_test=None):
    """``(x - mean) / std`` per channel, mean and std over the training images (a channel with
    std 0 is only centred).  Returns ``(x_train, x_test)`` (``x_test`` None if not given)."""
    a = _images(x_train, "x_train").astype(np.float64)
    mean = a.mean(axis=(0, 2, 3), keepdims=True)
    std = a.std(axis=(0, 2, 3), keepdims=True)
    std = np.where(std > 0, std, 1.0)
    b = None if x_test is None else (_images(x_test, "x_test").astype(np.float64) - mean) / std
    return (a - mean) / std, b


def scale(x):
    """Integer images divided by 255 (float images are returned as float64, unchanged)."""
    x = np.asarray(x)
    return x / 255.0 if x.dtype.kind in "biu" else x.astype(np.float64)


def downsample(x, factor: int):
    """F x F average pooling (stride F) over H and W; rows and columns beyond the last full
    window are dropped."""
    x = _images(x, "x").astype(np.float64)
    f = int(factor)
    if f < 1:
        raise ValueError(f"the downsampling factor must be >= 1; got {factor}")
    n, c, h, w = x.shape
    if h < f or w < f:
        raise ValueError(f"the downsampling factor {f} is larger than the images ({h} x {w})")
    if f == 1:
        return x
    return x[:, :, :h - h % f, :w - w % f].reshape(n, c, h // f, f, w // f, f).mean(axis=(3, 5))


def preprocess(x_train, x_test, how: str = "standardize", factor: int = 1):
    """Downsample by ``factor`` (1: none), then ``how``: "standardize" (:func:`standardize`),
    "scale" (integer images / 255) or "none".  Returns float64 ``(x_train, x_test)``."""
    if how not in PREPROCESSING:
        raise ValueError(f"preprocessing must be one of {PREPROCESSING}; got {how!r}")
    integer = np.asarray(x_train).dtype.kind in "biu"
    a, b = downsample(x_train, factor), downsample(x_test, factor)
    if how == "scale" and integer:
        return a / 255.0, b / 255.0
    if how == "standardize":
        return standardize(a, b)
    return a, b


__all__ = ["PREPROCESSING", "standardize", "scale", "downsample", "preprocess"]
