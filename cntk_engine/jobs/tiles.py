"""How a Gram matrix is cut into tiles, and how large a tile is.

The (N1, N2) matrix is cut into square tiles of ``tile`` rows x ``tile`` columns (the last row
and column of tiles may be smaller).  Each tile is ONE ``Backend.pair_sums`` call.  For a
symmetric Gram only tiles on or above the diagonal are computed; each off-diagonal tile is also
written transposed by the sinks (the lower triangle is mirrored, the stored matrix is full).

Tile size (:func:`auto_tile`): the backend's default (its :class:`~cntk_engine.backends.Traits`),
lowered, for a backend that declares a time model (the CPU backend), until one tile takes about
``traits.tile_seconds`` (a tile is one uninterruptible call: Ctrl-C and the progress bar act
between tiles, so a tile must take seconds, not minutes); without a time model at least
:data:`STORE_MIN_TILE` with a store, so it has fewer, larger chunk files; lowered until one
tile's output fits in a quarter of the free device memory, and, with several workers, halved
until there are at least :data:`TILES_PER_WORKER` tiles per worker (down to the backend's
floor), so that no worker idles at the end.  ``tile=`` overrides all of this; a resumed store
keeps the tile of the job that created it.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterable

TILES_PER_WORKER = 4           # with several workers, aim for at least this many tiles each
DEVICE_MEMORY_FRACTION = 0.25  # share of free device memory one tile may use
STORE_MIN_TILE = 256           # with a store: fewer, larger chunk files (512 KiB per kernel)


@dataclass(frozen=True)
class Tile:
    """One backend call: rows r0:r1 of x1 against columns c0:c1 of x2.

    (i, j) is the tile's position in the tile grid; ``diag`` marks a tile on the diagonal of a
    symmetric Gram (rows == columns: each unordered pair once, the tile mirrored in itself).
    """

    i: int
    j: int
    r0: int
    r1: int
    c0: int
    c1: int
    diag: bool

    @property
    def rows(self) -> slice:
        return slice(self.r0, self.r1)

    @property
    def cols(self) -> slice:
        return slice(self.c0, self.c1)

    @property
    def pairs(self) -> int:
        """Pairs this tile computes (unordered pairs on a symmetric diagonal tile)."""
        n = self.r1 - self.r0
        return n * (n + 1) // 2 if self.diag else n * (self.c1 - self.c0)


@dataclass(frozen=True)
class TileLayout:
    """How an (n1, n2) matrix is cut: square tiles of ``tile``; upper triangle if symmetric."""

    n1: int
    n2: int
    tile: int
    symmetric: bool

    @property
    def grid(self) -> tuple[int, int]:
        return -(-self.n1 // self.tile), -(-self.n2 // self.tile)

    def tiles(self) -> list[Tile]:
        """Every tile to compute, in row-major order."""
        t = self.tile
        gr, gc = self.grid
        out = []
        for i in range(gr):
            for j in range(i if self.symmetric else 0, gc):
                out.append(Tile(i, j, i * t, min((i + 1) * t, self.n1), j * t,
                                min((j + 1) * t, self.n2), self.symmetric and i == j))
        return out

    @property
    def unique_pairs(self) -> int:
        return self.n1 * (self.n1 + 1) // 2 if self.symmetric else self.n1 * self.n2


def largest_first(todo: Iterable[Tile]) -> list[Tile]:
    """Tiles by decreasing pair count (stable: row-major among equals)."""
    return sorted(todo, key=lambda t: -t.pairs)


def bytes_per_pair(n_depths: int) -> int:
    """Device bytes one pair of a tile needs: its float64 sums (n_depths x 2), the scattered
    (n1, n2, n_depths, 2) tile they are mirrored into, and the two pair indices."""
    return 2 * (n_depths * 2 * 8) + 16


PAIR_OVERHEAD = 40    # per-pair work that does not depend on the offsets, in entries per pixel


def pair_work(arch, image_shape) -> int:
    """The work of one pair in offset-slice entries times layers, the unit of
    ``Traits.entry_seconds``: ``arch.pair_entries`` (the entries the layers update: (H W)^2 L
    for gap, H W L for flatten, ``cntk_engine.arch``), plus what a pair costs whatever its
    offsets (its images' rows and diagonals copied and set up, per layer), counted as
    :data:`PAIR_OVERHEAD` entries per pixel and layer (numba, measured: a flatten pair costs
    20-40 times its entries; an overestimate only makes tiles shorter).  A flip-symmetrised
    kernel computes each pair twice (against the other image and its mirror)."""
    _, h, w = image_shape
    return ((arch.pair_entries(h, w) + PAIR_OVERHEAD * h * w * arch.n_layers)
            * (2 if arch.flip else 1))


def auto_tile(traits, n1: int, n2: int, symmetric: bool, n_workers: int, n_depths: int,
              free_bytes: int | None = None, for_store: bool = False,
              pair_seconds: float | None = None) -> tuple[int, str]:
    """(tile, why) for this problem; see the module docstring.  ``traits``: the backend's
    :class:`~cntk_engine.backends.Traits`; ``pair_seconds``: its estimate of one pair's seconds
    for this job (:meth:`~cntk_engine.backends.Traits.pair_seconds`), None without a time model."""
    tile = traits.default_tile
    why = [f"backend default {tile}"]
    floor = traits.min_tile
    if pair_seconds and traits.tile_seconds:
        t_time = max(floor, int(math.sqrt(traits.tile_seconds / pair_seconds)))
        if t_time < tile:
            tile = t_time
            why.append(f"about {traits.tile_seconds:g} s per tile at an estimated "
                       f"{pair_seconds * 1e3:.3g} ms per pair -> {tile}")
    elif for_store and tile < STORE_MIN_TILE:
        tile = STORE_MIN_TILE
        why.append(f"store chunks of at least {STORE_MIN_TILE} x {STORE_MIN_TILE}")
    if free_bytes:
        per = bytes_per_pair(n_depths)
        t_mem = int(math.sqrt(DEVICE_MEMORY_FRACTION * free_bytes / per))
        if t_mem < tile:
            tile = max(floor, t_mem)
            why.append(f"memory: {per} B/pair, {free_bytes / 2**30:.1f} GiB free -> {tile}")
    if tile > max(n1, n2):
        tile = max(n1, n2)
        why.append(f"capped at N = {tile}")
    if n_workers > 1:
        while tile > floor and len(TileLayout(n1, n2, tile, symmetric).tiles()) < TILES_PER_WORKER * n_workers:
            tile = max(floor, tile // 2)
        why.append(f"{n_workers} workers: >= {TILES_PER_WORKER} tiles each where possible -> {tile}")
    return tile, "; ".join(why)


__all__ = ["Tile", "TileLayout", "largest_first", "auto_tile", "bytes_per_pair", "pair_work", "PAIR_OVERHEAD",
           "TILES_PER_WORKER", "STORE_MIN_TILE"]
