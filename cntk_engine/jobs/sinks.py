"""Where finished tiles go: one interface for memory and the Zarr store.

A sink is called once per tile with the tile's readout sums (``Backend.pair_sums``: float64,
(rows, cols, n_depths, 2), NumPy or CuPy), from any worker thread.  It multiplies them by the
job's per-image scales when the images were computed scaled (``inputs.prepare_magnitudes``:
powers of two, so exactly), refuses non-finite sums, finalizes them into kernels
(``arch.finalize`` is elementwise, so a tile gives bit for bit the values the whole matrix
would) and stores them, mirroring off-diagonal tiles of a symmetric Gram.
:class:`MemorySink` keeps the matrices in memory on the host, or on the caller's GPU when the
images came as CuPy arrays (the matrix never round-trips through the host);
``jobs.store.StoreSink`` writes them into a Zarr store.
"""
from __future__ import annotations

from contextlib import nullcontext

import numpy as np

from ..arch import finalize
from ..arrays import available_memory, cupy_module, format_bytes, get_array_module, to_device, to_host
from ..spelling import arg
from .tiles import Tile, TileLayout


class Sink:
    """Receives each finished tile: ``sink(tile, sums)``."""

    def __call__(self, tile: Tile, sums) -> None:
        raise NotImplementedError

    arch = params = kernel = None      # set by each sink: what finalizing a tile needs
    row_scale = col_scale = None       # per-image scales of rows and columns (host float64), or None

    def kernels(self, t: Tile, sums) -> dict:
        """Tile ``t``'s finalized kernels {depth: {kernel: (rows, cols) array}}, where ``sums``
        lives.  Raises RuntimeError when a sum is not finite: no NaN or inf is ever stored."""
        xp = get_array_module(sums)
        if self.row_scale is not None:
            r = xp.asarray(self.row_scale[t.rows])[:, None, None, None]
            c = xp.asarray(self.col_scale[t.cols])[None, :, None, None]
            sums = sums * r * c            # powers of two: exact
        if not bool(xp.isfinite(sums).all()):
            raise RuntimeError(
                f"tile ({t.i}, {t.j}) (rows {t.r0}:{t.r1}, columns {t.c0}:{t.c1}) has non-finite "
                "kernel sums (NaN or inf) and was not stored; the input checks should have refused "
                "this job: please report it with the images' shape and architecture, and use "
                f"{arg('dtype', 'float64')} meanwhile")
        return finalize(sums, self.arch, self.params, self.kernel)


class MemorySink(Sink):
    """Finalized kernels of every tile into (n1, n2) float64 arrays {depth: {kernel: array}}:
    NumPy, or CuPy on GPU ``device`` (the caller's current device when the job's images are
    CuPy arrays)."""

    def __init__(self, job, layout: TileLayout, device: int | None = None):
        self.arch, self.params, self.kernel = job.arch, job.params, job.kernel
        self.row_scale, self.col_scale = job.scales
        self.layout, self.device = layout, device
        xp = np if device is None else cupy_module()
        if device is None:
            # np.empty commits its pages only as tiles are written: a result larger than the RAM
            # would be found out by the OOM killer after hours of work, not here
            n_arrays = len(job.arch.depths) * len(job.kernel_names)
            need, free = n_arrays * layout.n1 * layout.n2 * 8, available_memory()
            if need > free:
                raise ValueError(
                    f"the result, {n_arrays} float64 array{'s' if n_arrays > 1 else ''} of {layout.n1} x "
                    f"{layout.n2} ({format_bytes(need)}), is larger than the RAM available now "
                    f"({format_bytes(free)}); write it to disk instead: with {arg('out')} set to a path, "
                    "the kernels go tile by tile into a Zarr store (cntk_engine.solver reads it back); or "
                    "compute fewer images, depths or kernels at a time")
        with self._on_device():
            self.result = {d: {k: xp.empty((layout.n1, layout.n2)) for k in job.kernel_names}
                           for d in job.arch.depths}

    def _on_device(self):
        return nullcontext() if self.device is None else cupy_module().cuda.Device(self.device)

    def __call__(self, t: Tile, sums) -> None:
        with self._on_device():
            sums = to_host(sums) if self.device is None else to_device(sums, self.device)
            for d, res in self.kernels(t, sums).items():
                for k, v in res.items():
                    a = self.result[d][k]
                    a[t.rows, t.cols] = v
                    if self.layout.symmetric and not t.diag:
                        a[t.cols, t.rows] = v.T


__all__ = ["Sink", "MemorySink"]
