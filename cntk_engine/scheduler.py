"""Tiles of the Gram matrix: the scheduler knows tiles, not kernels.

The (N1, N2) matrix is cut into tiles of rows x cols; each tile is one ``Backend.pair_sums``
call on images prepared once (per-image diagonals computed once, shared by every tile).  For a
symmetric Gram only tiles on or above the diagonal are computed; the lower triangle is mirrored.
"""
from __future__ import annotations

import logging

import numpy as np

from .backends.base import Backend, Prepared
from .diag import array_module

log = logging.getLogger("cntk_engine")


def tiles(n1: int, n2: int, tile: int, symmetric: bool):
    """(row slice, col slice, on_diagonal) for every tile to compute."""
    for r0 in range(0, n1, tile):
        for c0 in range(r0 if symmetric else 0, n2, tile):
            yield slice(r0, min(r0 + tile, n1)), slice(c0, min(c0 + tile, n2)), symmetric and r0 == c0


def compute_sums(backend: Backend, a: Prepared, b: Prepared, symmetric: bool, tile: int):
    """Readout sums (N1, N2, n_depths, 2) of every pair, tile by tile."""
    xp = array_module(a.images)
    n1, n2 = len(a), len(b)
    out = None
    for rs, cs, diag in tiles(n1, n2, tile, symmetric):
        s = backend.pair_sums(a[rs], b[cs], symmetric=diag)
        if out is None:
            out = xp.zeros((n1, n2) + tuple(s.shape[2:]), dtype=np.float64)
        out[rs, cs] = s
        if symmetric and not diag:
            out[cs, rs] = s.transpose(1, 0, 2, 3)
    return out
