"""Tiles of the Gram matrix: the scheduler knows tiles, not kernels.

The (N1, N2) matrix is cut into square tiles of ``tile`` rows x ``tile`` columns (the last row
and column of tiles may be smaller).  Each tile is ONE ``Backend.pair_sums`` call on images
prepared once per device (per-image diagonals computed once, shared by every tile); its readout
sums are finalized into kernels right away (``arch.finalize`` is elementwise, so a tile gives
bit for bit the values the whole matrix would) and handed to a *sink*: the in-memory result
arrays, or a Zarr store (``cntk_engine.store``).  For a symmetric Gram only tiles on or above the
diagonal are computed; each off-diagonal tile is also written transposed (the lower triangle is
mirrored, the stored matrix is full).

Workers
-------
* CPU backends (numba, reference): one worker, in the calling thread; the backend itself uses
  every core inside one ``pair_sums`` call (numba: parallel over the pairs of the tile).
* cuda: one worker thread per GPU (all visible GPUs, or ``devices=[...]``), each inside
  ``cupy.cuda.Device(i)`` with its own non-blocking stream, its own backend instance and its own
  prepared copy of the images.  Tiles are pulled from one shared queue, largest first (the
  smaller diagonal and edge tiles last), which keeps the tail short.
* Dask: ``cntk_engine.distributed`` (imported only when a client is given).

Tile size
---------
``auto_tile`` starts from the backend's default (cuda 512, numba 64 or more with many cores,
reference 8; with ``out=`` at least 256, so the store has fewer, larger chunk files), lowers it until one tile's working set fits in a quarter of the free device memory
(a backend may say how many bytes one pair needs through an optional ``bytes_per_pair()``
method), and, with several workers, halves it until there are at least 4 tiles per worker (down
to a floor), so that no worker idles at the end.  ``tile=`` overrides all of this; a resumed store
keeps the tile of the job that created it.
"""
from __future__ import annotations

import logging
import math
import threading
import time
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from typing import Callable, Iterable, Sequence

import numpy as np

from .arch import Architecture, LayerParams, finalize
from .backends.base import Backend
from .diag import array_module

log = logging.getLogger("cntk_engine")

DEFAULT_TILE = {"reference": 8, "numba": 64, "cuda": 512}
MIN_TILE = {"reference": 2, "numba": 16, "cuda": 64}
TILES_PER_WORKER = 4          # with several workers, aim for at least this many tiles each
DEVICE_MEMORY_FRACTION = 0.25  # share of free device memory one tile may use
STORE_MIN_TILE = 256           # with out=: fewer, larger chunk files (512 KiB per kernel)


# ----------------------------------------------------------------------------------- tiles
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

    def to_dict(self) -> dict:
        return {"n1": self.n1, "n2": self.n2, "tile": self.tile, "symmetric": self.symmetric,
                "grid": list(self.grid), "tiles": len(self.tiles())}


def largest_first(todo: Iterable[Tile]) -> list[Tile]:
    """Tiles by decreasing pair count (stable: row-major among equals)."""
    return sorted(todo, key=lambda t: -t.pairs)


# -------------------------------------------------------------------------------- devices
def gpu_count() -> int:
    """Number of CUDA devices CuPy sees (0 without CuPy or a driver)."""
    try:
        import cupy
        return int(cupy.cuda.runtime.getDeviceCount())
    except Exception:
        return 0


def resolve_devices(backend_name: str, devices) -> list[int] | None:
    """GPU ids to use (cuda), or None for a CPU backend.  ``devices``: None or "all" (every
    visible GPU; every core for a CPU backend), or a list of GPU ids."""
    if devices is not None and devices != "all":
        if isinstance(devices, (int, np.integer)) and not isinstance(devices, bool):
            devices = [int(devices)]
        if isinstance(devices, (str, bytes)) or not hasattr(devices, "__iter__"):
            raise ValueError(f"devices must be None, 'all' or a list of GPU ids; got {devices!r}")
        devices = list(devices)
        if not devices or any(isinstance(d, bool) or not isinstance(d, (int, np.integer)) or d < 0
                              for d in devices):
            raise ValueError(f"devices must be a non-empty list of GPU ids (integers >= 0); got {devices!r}")
        devices = [int(d) for d in devices]
        if len(set(devices)) != len(devices):
            raise ValueError(f"devices must not repeat; got {devices}")
    if backend_name != "cuda":
        if devices not in (None, "all"):
            raise ValueError(f"devices={devices} selects GPUs, but backend {backend_name!r} runs on "
                             "the CPU (with every core); use backend='cuda' or leave devices unset")
        return None
    n = gpu_count()
    if devices in (None, "all"):
        if n == 0:
            raise RuntimeError("backend 'cuda' found no visible GPU")
        return list(range(n))
    bad = [d for d in devices if d >= n]
    if bad:
        raise ValueError(f"devices {bad} do not exist: {n} GPU(s) visible (ids 0..{n - 1})")
    return devices


def free_device_memory(device: int | None) -> int | None:
    """Free bytes on GPU ``device`` (None for the CPU or when unknown)."""
    if device is None:
        return None
    try:
        import cupy
        with cupy.cuda.Device(device):
            return int(cupy.cuda.runtime.memGetInfo()[0])
    except Exception:
        return None


def smallest_free_memory(devices: list[int] | None) -> int | None:
    """The least free memory over the GPUs that report a figure (the tile must fit on each);
    None for the CPU or when no GPU reports one.  A GPU that does not report is skipped, not
    read as "no limit" for the others."""
    if devices is None:
        return None
    known = [f for f in (free_device_memory(d) for d in devices) if f is not None]
    return min(known) if known else None


def bytes_per_pair(backend: Backend, image_shape: Sequence[int]) -> int:
    """Device bytes one pair of a ``pair_sums`` call needs: the backend's own figure when it has
    a ``bytes_per_pair()`` method, else the output it returns (sums + pair indices + the mirrored
    (n1, n2, n_depths, 2) tile)."""
    own = getattr(backend, "bytes_per_pair", None)
    if callable(own):
        return max(1, int(own()))
    n_out = len(backend.arch.depths)
    return 2 * (n_out * 2 * 8) + 16


def auto_tile(backend: Backend, n1: int, n2: int, symmetric: bool, n_workers: int,
              image_shape: Sequence[int], free_bytes: int | None = None,
              for_store: bool = False) -> tuple[int, str]:
    """(tile, why) for this problem; see the module docstring."""
    name = backend.name
    base = DEFAULT_TILE.get(name, 64)
    why = [f"{name} default {base}"]
    if name == "numba":
        from .backends.numba_cpu import num_threads
        # >= 256 pairs per thread per call keeps every core busy on the diagonal tiles too
        want = 16 * math.ceil(math.sqrt(512 * num_threads()) / 16)
        if want > base:
            base = want
            why = [f"numba: {num_threads()} threads -> {base}"]
    if for_store and base < STORE_MIN_TILE:
        base = STORE_MIN_TILE
        why.append(f"store chunks of at least {STORE_MIN_TILE} x {STORE_MIN_TILE}")
    tile = base
    floor = MIN_TILE.get(name, 2)
    if free_bytes:
        per = bytes_per_pair(backend, image_shape)
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


# -------------------------------------------------------------------------------- workers
@dataclass
class Worker:
    """Where tiles run: a context to enter (device, stream), the backend to build inside it, and
    how arrays travel (host -> device for ``prepare``, device -> host for the sums)."""

    name: str
    context: Callable[[], object]
    make_backend: Callable[[], Backend]
    to_device: Callable = staticmethod(lambda x: x)
    to_host: Callable = staticmethod(np.asarray)


@contextmanager
def _cuda_context(device: int):
    import cupy
    with cupy.cuda.Device(device):
        stream = cupy.cuda.Stream(non_blocking=True)
        with stream:
            yield


def _cupy_asarray(x):
    """Images onto the current worker's device: no copy when they already live there; from
    another GPU through the host (the kernels read only the current device's memory)."""
    import cupy
    if isinstance(x, cupy.ndarray) and x.device.id != cupy.cuda.Device().id:
        return cupy.asarray(cupy.asnumpy(x))
    return cupy.asarray(x)


def _cupy_asnumpy(x):
    import cupy
    return cupy.asnumpy(x) if array_module(x) is cupy else np.asarray(x)


def local_workers(backend_cls: type[Backend], arch: Architecture, params: LayerParams, dtype,
                  devices: list[int] | None) -> list[Worker]:
    make = lambda: backend_cls(arch, params, dtype)  # noqa: E731
    if devices is None:
        return [Worker("cpu", nullcontext, make)]
    return [Worker(f"gpu{d}", (lambda d=d: _cuda_context(d)), make, _cupy_asarray, _cupy_asnumpy)
            for d in devices]


class Progress:
    """tqdm bar over pairs (pairs/s, ETA), or nothing; updated from any thread."""

    def __init__(self, total_pairs: int, enabled: bool, desc: str = "gram"):
        self.bar = None
        self.lock = threading.Lock()
        if enabled and total_pairs > 0:
            from tqdm.auto import tqdm
            self.bar = tqdm(total=total_pairs, unit="pair", unit_scale=total_pairs >= 10000, desc=desc,
                            dynamic_ncols=True, smoothing=0.05)

    def update(self, pairs: int) -> None:
        if self.bar is not None:
            with self.lock:
                self.bar.update(pairs)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def run_tiles(workers: Sequence[Worker], x1: np.ndarray, x2: np.ndarray | None,
              todo: Sequence[Tile], sink: Callable[[Tile, np.ndarray], None],
              progress: Progress | None = None) -> dict:
    """Compute every tile of ``todo`` and hand (tile, host float64 sums) to ``sink``.

    ``x2=None``: symmetric (x1 against itself).  Each worker prepares the images once, then pulls
    tiles from a shared queue (largest first).  One worker runs in the calling thread; several
    run one thread each.  The first error stops every worker and is raised here.  Returns
    {worker name: tiles done}.
    """
    queue = largest_first(todo)
    lock = threading.Lock()
    done = {w.name: 0 for w in workers}
    stop = threading.Event()
    errors: list[BaseException] = []

    def next_tile():
        with lock:
            return queue.pop(0) if queue and not stop.is_set() else None

    def work(w: Worker):
        try:
            with w.context():
                be = w.make_backend()
                t0 = time.perf_counter()
                pa = be.prepare(w.to_device(x1))
                pb = pa if x2 is None else be.prepare(w.to_device(x2))
                log.debug("%s: prepared %d + %d images in %.3f s", w.name, len(pa),
                          0 if x2 is None else len(pb), time.perf_counter() - t0)
                while True:
                    t = next_tile()
                    if t is None:
                        return
                    s = w.to_host(be.pair_sums(pa[t.rows], pb[t.cols], symmetric=t.diag))
                    sink(t, s)
                    done[w.name] += 1
                    if progress is not None:
                        progress.update(t.pairs)
        except BaseException as e:  # noqa: BLE001 - re-raised in the calling thread
            with lock:
                errors.append(e)
            stop.set()

    if not queue:
        return done
    if len(workers) == 1:
        work(workers[0])
    else:
        threads = [threading.Thread(target=work, args=(w,), name=f"cntk-{w.name}", daemon=True)
                   for w in workers]
        for th in threads:
            th.start()
        try:
            for th in threads:
                while th.is_alive():
                    th.join(0.2)
        except BaseException:  # Ctrl-C: let running tiles finish, start no new ones
            stop.set()
            for th in threads:
                th.join()
            raise
    if errors:
        raise errors[0]
    return done


# ---------------------------------------------------------------------------------- sinks
class MemorySink:
    """Finalized kernels of every tile into (n1, n2) float64 host arrays {depth: {kernel: a}}."""

    def __init__(self, layout: TileLayout, arch: Architecture, params: LayerParams, kernel: str):
        self.layout, self.arch, self.params, self.kernel = layout, arch, params, kernel
        names = ("ntk", "nngp") if kernel == "both" else (kernel,)
        self.result = {d: {k: np.empty((layout.n1, layout.n2)) for k in names} for d in arch.depths}

    def __call__(self, t: Tile, sums: np.ndarray) -> None:
        for d, res in finalize(sums, self.arch, self.params, self.kernel).items():
            for k, v in res.items():
                a = self.result[d][k]
                a[t.rows, t.cols] = v
                if self.layout.symmetric and not t.diag:
                    a[t.cols, t.rows] = v.T


# ------------------------------------------------------------------------------------ job
def execute(backend_cls: type[Backend], arch: Architecture, params: LayerParams, dtype: np.dtype,
            x1: np.ndarray, x2: np.ndarray | None, *, kernel: str, tile: int | None = None,
            devices=None, out=None, client=None, progress: bool = False,
            resume: bool = True) -> tuple[object, dict]:
    """Run one Gram job; the engine behind ``gram``.

    ``x1``, ``x2``: validated float64 NCHW arrays (``x2=None``: symmetric), on the host, or CuPy
    arrays for the local CUDA path (no store, no Dask).  Returns
    (result, info): result is {depth: {kernel: (n1, n2) ndarray}}, or the Zarr group when ``out``
    is given.  Everything is checked before a store is created or opened for writing.
    With ``client`` the caller resolves ``backend_cls`` on the workers
    (``distributed.resolve_backend``, which also checks cuda's image shape there).
    """
    t_start = time.perf_counter()
    symmetric = x2 is None
    n1 = len(x1)
    n2 = n1 if symmetric else len(x2)
    image_shape = tuple(x1.shape[1:])
    probe = backend_cls(arch, params, dtype)   # no device work: only its name, tile rules
    check = getattr(probe, "check_shape", None)
    if callable(check) and not (client is not None and probe.name == "cuda"):
        # with a client, cuda's shape rules (its compiled extension's) are checked on the
        # workers by distributed.resolve_backend: the client may have neither GPU nor extension
        check(*image_shape[1:])

    # ---- where tiles run
    if client is not None:
        from . import distributed as dist
        gpu = probe.name == "cuda"
        n_workers = dist.check_client(client, gpu=gpu, devices=devices)
        where = f"dask ({n_workers} worker slots{', GPU resource' if gpu else ''})"
        free = None
        dev_ids = None
    else:
        dev_ids = resolve_devices(probe.name, devices)
        n_workers = 1 if dev_ids is None else len(dev_ids)
        where = "cpu" if dev_ids is None else "gpus " + ",".join(map(str, dev_ids))
        free = smallest_free_memory(dev_ids)

    if tile is not None:
        why = "given"
    else:
        tile, why = auto_tile(probe, n1, n2, symmetric, n_workers, image_shape, free,
                              for_store=out is not None)

    # ---- where results go
    store = None
    if out is not None:
        from . import store as st
        spec = st.job_spec(arch, probe.name, dtype, kernel, x1, x2, image_shape)
        store = st.GramStore.open_for_job(out, spec, tile=tile, tile_given=(why == "given"),
                                          resume=resume)
        if store.tile != tile:
            why = f"kept from the store ({store.tile})"
            tile = store.tile
    layout = TileLayout(n1, n2, tile, symmetric)
    all_tiles = layout.tiles()
    todo = all_tiles if store is None else store.missing(all_tiles)
    todo_pairs = sum(t.pairs for t in todo)
    log.info("gram job: backend=%s dtype=%s on %s; %d x %d images %s, %s; tile %d (%s): "
             "%d tiles (%d to compute, %d pairs)", probe.name, np.dtype(dtype).name, where, n1, n2,
             image_shape, "symmetric" if symmetric else "rectangular", tile, why, len(all_tiles),
             len(todo), todo_pairs)

    if store is not None:
        run_id = store.begin_run(len(todo), where)
        sink = store.sink(arch, params, kernel, run_id)
    else:
        run_id = None
        sink = MemorySink(layout, arch, params, kernel)

    bar = Progress(todo_pairs, progress)
    t0 = time.perf_counter()
    try:
        if client is not None:
            per_worker = dist.run_dask(client, backend_cls, arch, params, dtype, x1, x2, todo,
                                       kernel=kernel, store=store, sink=sink, run_id=run_id,
                                       progress=bar, gpu=(probe.name == "cuda"))
        else:
            workers = local_workers(backend_cls, arch, params, dtype, dev_ids)
            per_worker = run_tiles(workers, x1, x2, todo, sink, bar)
    finally:
        bar.close()
    seconds = time.perf_counter() - t0
    if store is not None:
        store.end_run(run_id, seconds)
    info = {"backend": probe.name, "dtype": np.dtype(dtype).name, "tile": tile, "tile_reason": why,
            "where": where, "tiles_total": len(all_tiles), "tiles_computed": len(todo),
            "pairs_computed": todo_pairs, "unique_pairs": layout.unique_pairs,
            "per_worker": per_worker, "compute_seconds": seconds,
            "pairs_per_second": todo_pairs / seconds if seconds > 0 and todo_pairs else None,
            "seconds": time.perf_counter() - t_start, "arch": arch.to_dict()}
    if store is not None:
        info.update(store=str(store.path), run=run_id)
    log.info("gram job done: %d tiles, %d pairs in %.2f s (%s pairs/s)", len(todo), todo_pairs,
             seconds, f"{todo_pairs / seconds:.4g}" if seconds > 0 else "-")
    return (store.read_only_group if store is not None else sink.result), info


__all__ = ["Tile", "TileLayout", "auto_tile", "resolve_devices", "run_tiles", "execute",
           "MemorySink", "Worker", "DEFAULT_TILE"]
