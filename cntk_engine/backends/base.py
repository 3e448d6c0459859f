"""The contract between the scheduler and a backend.

A backend turns images into *readout sums*; ``arch.finalize`` turns sums into kernels.  The
scheduler knows tiles, not kernels: it calls ``prepare`` once per image set (per-image
diagonals computed once) and ``pair_sums`` once per tile.

``pair_sums(a, b, symmetric)`` returns an array of shape (len(a), len(b), n_depths, 2) in
float64 where ``[..., t, 0]`` is the sum of K and ``[..., t, 1]`` the sum of G = Theta * Kdot
at the readout of ``arch.depths[t]`` (sum over all entries for gap, over the offset-0 slice for
flatten; see ``cntk_engine.arch``).  With ``symmetric=True`` ``a`` and ``b`` are the same
images: each unordered pair is computed once and the result mirrored.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from ..arch import Architecture, LayerParams


@dataclass
class Prepared:
    """Images of one set in the backend's compute dtype, with their per-layer diagonals.

    images: (N, C, H, W); diag: a tuple of arrays with N first, holding whatever per-image
    diagonal data the backend's kernel reads (e.g. sqrt(q) and 1/sqrt(q), each (N, L, H, W)).
    Arrays live where the backend computes (NumPy or CuPy).  Slicing takes images and
    diagonals of the same rows.
    """

    images: Any
    diag: tuple = ()

    def __len__(self) -> int:
        return int(self.images.shape[0])

    def __getitem__(self, sl: slice) -> "Prepared":
        return Prepared(self.images[sl], tuple(d[sl] for d in self.diag))


def sqrt_and_inverse(q: np.ndarray):
    """sqrt(q) and 1/sqrt(q), with 0 for q <= 0 (zero-variance windows), in float64."""
    s = np.sqrt(np.maximum(q, 0.0))
    inv = np.zeros_like(s)
    np.divide(1.0, s, out=inv, where=s > 0)
    return s, inv


class Backend:
    """Base class: subclasses set ``name`` and implement ``prepare`` and ``pair_sums``."""

    name = "base"

    def __init__(self, arch: Architecture, params: LayerParams, dtype: np.dtype):
        self.arch = arch
        self.params = params
        self.dtype = np.dtype(dtype)

    @classmethod
    def unavailable_reason(cls) -> str | None:
        """None when the backend can run here, else a sentence saying why it cannot."""
        return None

    @classmethod
    def shape_unsupported(cls, arch: Architecture, height: int, width: int) -> str | None:
        """None when this backend takes images of this size for ``arch``, else why not."""
        return None

    def prepare(self, x: np.ndarray) -> Prepared:  # x: float64 (N, C, H, W), validated
        raise NotImplementedError

    def pair_sums(self, a: Prepared, b: Prepared, symmetric: bool = False):
        raise NotImplementedError
