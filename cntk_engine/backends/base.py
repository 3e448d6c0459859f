"""The contract between the job engine and a backend.

A backend turns images into *readout sums*; ``arch.finalize`` turns sums into kernels.  The
job engine (``cntk_engine.jobs``) knows tiles, not kernels: it calls ``prepare`` once per image
set (per-image diagonals computed once) and ``pair_sums`` once per tile.  What a backend can
run is declared, not tested by name: :meth:`Backend.traits` (where it computes, its tile sizes)
and :meth:`Backend.unsupported` (the architectures, image sizes and dtypes it cannot take).

``pair_sums(a, b, symmetric)`` returns an array of shape (len(a), len(b), n_depths, 2) in
float64 where ``[..., t, 0]`` is the sum of K and ``[..., t, 1]`` the sum of G = Theta * Kdot
at the readout of ``arch.depths[t]`` (sum over all entries for gap, over the offset-0 slice for
flatten; see ``cntk_engine.arch``).  With ``symmetric=True`` ``a`` and ``b`` are the same
images: each unordered pair is computed once and the result mirrored.

Backends with pair-list kernels (numba, cuda) implement only ``pairs(a, b, ia, ib, same_set)``:
the readout sums of the listed pairs; :meth:`Backend.pair_sums` lists the pairs of a tile,
scatters the sums and handles identical images (:func:`identical_pairs`).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from ..arch import Architecture, LayerParams, hflip
from ..arrays import get_array_module, to_host
from ..diag import chunk_images


@dataclass(frozen=True)
class Traits:
    """What the job engine needs to know of a backend to plan tiles and workers.

    device: "cpu" (one worker; the backend uses every core inside a call) or "gpu" (one worker
    thread per GPU, each with its own stream and prepared images).  default_tile / min_tile:
    rows per tile to start from and the floor when tiles are made smaller.  entry_seconds /
    tile_seconds: an optional time model: the wall seconds one call spends per pair, offset-slice
    entry and layer (``jobs.tiles.pair_work``), per compute dtype, and the seconds a tile should
    take (``jobs.tiles.auto_tile`` sizes tiles by them).  compute_dtype: the dtype a backend
    computes in whatever ``dtype`` the job asks ("float64" for the reference), or None: the
    job's; the job's magnitude checks, record and info then name that dtype.  max_tile_pairs:
    the most pairs one call takes (None: no limit), which a tile given by the caller must not
    exceed (the CUDA kernels index a launch's pairs in 32 bits)."""

    device: str
    default_tile: int
    min_tile: int
    entry_seconds: dict | None = None
    tile_seconds: float | None = None
    compute_dtype: str | None = None
    max_tile_pairs: int | None = None

    def pair_seconds(self, work: int, dtype) -> float | None:
        """Estimated seconds of one pair of ``work`` entry-layers in ``dtype``, or None."""
        if not self.entry_seconds:
            return None
        return work * self.entry_seconds[np.dtype(dtype).name]


@dataclass
class Prepared:
    """Images of one set in the backend's compute dtype, with their per-layer diagonals.

    images: (N, C, H, W); diag: a tuple of arrays with N first, holding whatever per-image
    diagonal data the backend's kernel reads (e.g. sqrt(q) and 1/sqrt(q), each (N, L, H, W)).
    flipped: the same set with every image flipped horizontally, prepared alike (for
    ``arch.flip``), or None.  layout: the name of the diagonal layout, where a backend has
    several whose arrays have the same shapes (the CUDA kernel variants), else "".  Arrays live
    where the backend computes (NumPy or CuPy).  Slicing takes images, diagonals and flipped
    images of the same rows.
    """

    images: Any
    diag: tuple = ()
    flipped: "Prepared | None" = None
    layout: str = ""

    def __len__(self) -> int:
        return int(self.images.shape[0])

    def __getitem__(self, sl: slice) -> "Prepared":
        return Prepared(self.images[sl], tuple(d[sl] for d in self.diag),
                        None if self.flipped is None else self.flipped[sl], self.layout)


def sqrt_and_inverse(q: np.ndarray):
    """sqrt(q) and 1/sqrt(q), with 0 for q <= 0 (zero-variance windows), in float64."""
    s = np.sqrt(np.maximum(q, 0.0))
    inv = np.zeros_like(s)
    np.divide(1.0, s, out=inv, where=s > 0)
    return s, inv


def _fingerprints(x):
    """Two 64-bit fingerprints per image of its bits: sum_k bits_k m_k (mod 2^64) for two fixed
    random multiplier sequences m.  Integer arithmetic is exact, so equal images get equal
    fingerprints whatever order the sum is taken in (a floating-point projection would not).
    ``x + 0`` first: -0.0 and +0.0, equal pixels of other bits, become one (+0.0)."""
    xp = get_array_module(x)
    n = x.shape[0]
    x = x + x.dtype.type(0)
    bits = xp.ascontiguousarray(x).reshape(n, -1).view(f"u{x.dtype.itemsize}").astype(xp.uint64)
    m = np.random.default_rng(20261123).integers(1, 2**63, size=(2, bits.shape[1]), dtype=np.uint64)
    m = xp.asarray(m | np.uint64(1))
    keys = xp.stack([(bits * m[0]).sum(axis=1), (bits * m[1]).sum(axis=1)], axis=1)
    return to_host(keys)


def identical_pairs(xa, xb, symmetric: bool):
    """Index arrays (i, j) of the pairs whose images ``xa[i]`` and ``xb[j]`` are identical, as
    NumPy int64 arrays; with ``symmetric`` (``xb`` is ``xa``) only i < j (the kernels handle
    i == j themselves).

    Why: the offset-(0, 0) entries of a pair of identical images have c = 1 exactly, and the
    kernels set it so for their self pairs (``cntk_engine.arch``, self pairs); a twin at another
    index (a training image in the test set, ``gram(x, x_copy)``, a duplicate in a data set)
    would otherwise get c = 1 - O(eps) and an error of sqrt(eps) in Kdot.  Candidates come from
    :func:`_fingerprints`, and each is confirmed by comparing the images' values."""
    ka = _fingerprints(xa)
    kb = ka if symmetric else _fingerprints(xb)
    rows: dict[tuple[int, int], list[int]] = {}
    for i, k in enumerate(map(tuple, ka.tolist())):
        rows.setdefault(k, []).append(i)
    ci, cj = [], []
    for j, k in enumerate(map(tuple, kb.tolist())):
        for i in rows.get(k, ()):
            if not symmetric or i < j:
                ci.append(i)
                cj.append(j)
    ci, cj = np.asarray(ci, dtype=np.int64), np.asarray(cj, dtype=np.int64)
    if ci.size:
        xp = get_array_module(xa)
        fa = xa.reshape(xa.shape[0], -1)
        fb = xb.reshape(xb.shape[0], -1)
        # candidates compared a batch of pairs at a time: a tile of blank images has a candidate
        # per pair, and gathering all their pixels at once takes memory of pairs x pixels
        step = max(1, (1 << 24) // (fa.shape[1] * fa.itemsize))
        same = np.concatenate([to_host((fa[xp.asarray(ci[k:k + step])] == fb[xp.asarray(cj[k:k + step])])
                                       .all(axis=1)) for k in range(0, ci.size, step)])
        ci, cj = ci[same], cj[same]
    return ci, cj


def compute_record_of(backend, device: int | None) -> dict:
    """``backend.compute_record(device)``, or ``{"backend": name, "unknown": why}`` where it
    cannot tell (no CuPy to ask the GPU's name, an emulated GPU): describing the code never
    stops a job."""
    try:
        return backend.compute_record(device)
    except Exception as e:  # noqa: BLE001 - a record is provenance, not a condition of the job
        return {"backend": backend.name, "unknown": f"{type(e).__name__}: {e}"}


class Backend:
    """Base class: subclasses set ``name`` and implement ``prepare`` and either ``pairs`` (a
    pair-list kernel) or ``pair_sums`` (the reference)."""

    name = "base"

    def __init__(self, arch: Architecture, params: LayerParams, dtype: np.dtype):
        self.arch = arch
        self.params = params
        self.dtype = np.dtype(dtype)

    @classmethod
    def traits(cls) -> Traits:
        raise NotImplementedError

    @classmethod
    def unavailable_reason(cls) -> str | None:
        """None when the backend can run here, else a sentence saying why it cannot."""
        return None

    @classmethod
    def unsupported(cls, arch: Architecture, image_shape, dtype) -> str | None:
        """None when this backend computes ``arch`` on images of ``image_shape`` (C, H, W) in
        ``dtype``, else why not (a sentence naming the limit).  Asked once per job, before any
        work; only for a backend that is available here (:meth:`unavailable_reason`)."""
        return None

    @classmethod
    def working_memory(cls, arch: Architecture, image_shape, dtype) -> tuple[int, str] | None:
        """(bytes, what holds them): the host memory this backend's calls hold for the job
        beyond its images, diagonals and result, where that can outgrow the machine (the 4-D
        covariances of pooled stacks on large images); None where it stays small.  ``gram``
        refuses a job that needs more than the RAM available, before any work."""
        return None

    @classmethod
    def unverified(cls, arch: Architecture, image_shape, dtype) -> str | None:
        """None when this backend's code for the job has been verified where it runs (for the
        CUDA backend: run on a GPU and checked there against the reference), else why not.
        ``backend="auto"`` does not choose a backend for a job it says is unverified; asked for
        by name, the backend runs it with a logged warning.  Asked after :meth:`unsupported`,
        for a backend that supports the job."""
        return None

    def compute_record(self, device: int | None) -> dict:
        """What decides this backend's bits in this process on GPU ``device`` (None: the CPU),
        as far as it can tell, for a store's run record (JSON strings, numbers, booleans): the
        backend and, in subclasses, the code that runs (numba's version, settings and the CPU
        it compiles for; the CUDA kernel variant, build and GPU).  Runs with equal records are
        expected to compute bit-identical tiles; runs with different ones agree to rounding and
        may differ in the last bits (``jobs.store``, runs)."""
        return {"backend": self.name}

    def prepare(self, x: np.ndarray) -> Prepared:  # x: float64 (N, C, H, W), validated
        raise NotImplementedError

    def prepare_set(self, x) -> Prepared:
        """``prepare(x)``, with the horizontally flipped images prepared too for ``arch.flip``:
        what the job engine calls once per image set."""
        p = self._prepare_in_chunks(x)
        if self.arch.flip:
            p.flipped = self._prepare_in_chunks(hflip(x))
        return p

    def _prepare_in_chunks(self, x) -> Prepared:
        """``prepare`` a chunk of images at a time (``diag.chunk_images``), each written into
        arrays of the whole set: the float64 working memory of the diagonals is then bounded by
        ``diag.CHUNK_BYTES`` instead of growing with the set (where it is several times the
        prepared set itself).  The diagonals of an image do not depend on the other images, so
        the result is the same bits as one call's."""
        n = x.shape[0]
        step = chunk_images(self.arch, x.shape[2], x.shape[3])
        if n <= step:
            return self.prepare(x)
        first = self.prepare(x[:step])
        xp = get_array_module(first.images)

        def whole(a):
            out = xp.empty((n,) + a.shape[1:], dtype=a.dtype)
            out[:step] = a
            return out

        images, diag = whole(first.images), tuple(whole(d) for d in first.diag)
        layout = first.layout
        del first
        for i in range(step, n, step):
            part = self.prepare(x[i:i + step])
            images[i:i + step] = part.images
            for d, pd in zip(diag, part.diag):
                d[i:i + step] = pd
        return Prepared(images, diag, layout=layout)

    def pairs(self, a: Prepared, b: Prepared, ia, ib, same_set: bool):
        """Readout sums (P, n_depths, 2), float64, of the pairs (a[ia[p]], b[ib[p]]); ``ia``,
        ``ib`` int arrays where the images live.  ``same_set``: a and b are the same images, and
        a pair with ia[p] == ib[p] is a self pair (c := 1 on its offset-(0, 0) entries)."""
        raise NotImplementedError

    def pair_sums(self, a: Prepared, b: Prepared, symmetric: bool = False):
        """The tile's readout sums (see the module docstring); with ``arch.flip`` the mean of
        the pairs (a_i, b_j) and (a_i, F b_j) (``arch``, flip symmetrisation), each unordered
        pair of a symmetric tile once for both terms (K(x, F z) = K(z, F x))."""
        out = self._listed_sums(a, b, symmetric, same_set=symmetric)
        if self.arch.flip:
            out = (out + self._listed_sums(a, b.flipped, symmetric, same_set=False)) * 0.5
        return out

    def _listed_sums(self, a: Prepared, b: Prepared, triangle: bool, same_set: bool):
        """Sums of every pair (the upper triangle, mirrored, with ``triangle``) through the
        backend's pair-list kernel; identical images get their image's self-pair sums."""
        xp = get_array_module(a.images)
        n1, n2 = len(a), len(b)
        if triangle:
            ia, ib = xp.triu_indices(n1)
        else:
            ia, ib = (g.ravel() for g in xp.meshgrid(xp.arange(n1), xp.arange(n2), indexing="ij"))
        flat = self.pairs(a, b, ia, ib, same_set)
        out = xp.zeros((n1, n2) + flat.shape[1:], dtype=xp.float64)
        out[ia, ib] = flat
        if triangle:
            out[ib, ia] = flat
        # identical images at different indices (or an image and a flipped one equal to it):
        # their self-pair sums (computed once per image)
        ti, tj = identical_pairs(a.images, b.images, same_set)
        if triangle and not same_set:
            keep = ti <= tj
            ti, tj = ti[keep], tj[keep]
        if ti.size:
            uniq, inv = np.unique(ti, return_inverse=True)
            u = xp.asarray(uniq)
            own = self.pairs(a, a, u, u, True)[xp.asarray(inv)]
            out[xp.asarray(ti), xp.asarray(tj)] = own
            if triangle:
                out[xp.asarray(tj), xp.asarray(ti)] = own
        return out
