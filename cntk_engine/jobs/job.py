"""A Gram job: the record built once at the boundary (``gram``), and how it runs.

:class:`GramJob` holds everything a job is: the validated images, the architecture and its
layer numbers, the kernels asked for, the compute dtype, the backend that computes it, and how
it is run (tile, GPUs, store, Dask client, progress).  It is passed whole from ``gram`` to the
tiles, workers, sinks, the store and Dask; nothing downstream re-validates what it holds.

:func:`run_job` plans the tiles (size from the backend's traits, the devices' free memory and
the number of workers), opens the store when there is one (its finished tiles are verified;
only missing or failing tiles are computed), and runs the tiles locally (:mod:`.local`) or on
a Dask cluster (:mod:`.dask`) into a sink (:mod:`.sinks`, :mod:`.store`).  With a store, each
tile is claimed before it is computed, so several processes can work on one store: a tile
another writer holds is skipped, and when none is left to claim the run waits for the others'
tiles (taking over the claims of writers that died), so it returns a complete store.
"""
from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..arch import Architecture, LayerParams, kernel_names
from ..backends.base import compute_record_of
from ..spelling import arg
from .local import Progress, local_workers, run_tiles, smallest_free_memory
from .sinks import MemorySink
from .tiles import TileLayout, auto_tile, pair_work

log = logging.getLogger("cntk_engine")


@dataclass(frozen=True)
class GramJob:
    """One Gram job, validated.

    x1, x2: float64 (N, C, H, W) images as given, NumPy (or CuPy for the local GPU path): what
    the job is (a store fingerprints them); ``x2=None``: the symmetric Gram of x1.  scale1,
    scale2: float64 per-image powers of two, or None (``inputs.prepare_magnitudes``): the
    backends then compute on ``inputs`` = (x1 / scale1, x2 / scale2) and the sinks multiply
    entry (i, j) by scale1[i] scale2[j] (scale2 None for a symmetric job: scale1 on both sides).
    backend: the class that computes it (already chosen and checked against this job).
    devices: the GPU ids of a local GPU job (None on the CPU and with a client).  result_device: the GPU the result matrices go to (the images came as CuPy
    arrays), or None for NumPy results.  tile: rows per tile, None for automatic.
    """

    x1: Any
    x2: Any
    arch: Architecture
    params: LayerParams
    kernel: str
    dtype: np.dtype
    backend: type
    tile: int | None = None
    devices: list[int] | None = None
    result_device: int | None = None
    out: Any = None             # a path, or a jobs.store.StorePath
    client: Any = None
    progress: bool = False
    scale1: Any = None
    scale2: Any = None
    inputs: tuple | None = None     # (x1 / scale1, x2 / scale2 or None); None: (x1, x2) as given

    @property
    def compute_images(self) -> tuple:
        """(a, b) the backends compute on (b None for a symmetric job)."""
        return (self.x1, self.x2) if self.inputs is None else self.inputs

    @property
    def scales(self) -> tuple:
        """(row scales, column scales) the sinks multiply the tiles by, or (None, None)."""
        if self.scale1 is None:
            return None, None
        return self.scale1, (self.scale1 if self.scale2 is None else self.scale2)

    @property
    def symmetric(self) -> bool:
        return self.x2 is None

    @property
    def n1(self) -> int:
        return int(self.x1.shape[0])

    @property
    def n2(self) -> int:
        return self.n1 if self.x2 is None else int(self.x2.shape[0])

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return tuple(int(v) for v in self.x1.shape[1:])

    @property
    def kernel_names(self) -> tuple[str, ...]:
        return kernel_names(self.kernel)

    @property
    def traits(self):
        return self.backend.traits()

    def make_backend(self):
        return self.backend(self.arch, self.params, self.dtype)


def _check_tile_pairs(traits, job: GramJob, tile: int, how: str) -> None:
    """ValueError where a tile of ``tile`` rows holds more pairs than one call of the backend
    takes (``Traits.max_tile_pairs``): counted as the call counts them (a symmetric job's
    diagonal tiles list their upper triangle), the largest tile's."""
    limit = traits.max_tile_pairs
    if limit is None or min(tile, job.n1) * min(tile, job.n2) <= limit:
        return
    largest = max(t.pairs for t in TileLayout(job.n1, job.n2, tile, job.symmetric).tiles())
    if largest <= limit:
        return
    side = math.isqrt(limit)
    remedy = (f"give {arg('tile')} <= {side:,}, or leave it out (sized to the GPU's memory)"
              if how == "given" else
              f"resume it with the backend that computed it, or compute into a new "
              f"{arg('out')} (its tiles sized for this backend)")
    raise ValueError(f"tile {tile} ({how}): the largest tile of {job.n1} x {job.n2} images is "
                     f"{largest:,} pairs, more than one call of the {job.backend.name} backend "
                     f"takes ({limit:,}); {remedy}")


def run_job(job: GramJob) -> tuple[object, dict]:
    """Run ``job``.  Returns (result, info): result is {depth: {kernel: (n1, n2) array}}, or the
    read-only Zarr group when the job has a store.  Everything is checked before a store is
    created or opened for writing."""
    t_start = time.perf_counter()
    traits = job.traits
    gpu = traits.device == "gpu"

    # ---- where tiles run
    if job.client is not None:
        from . import dask as jdask
        n_workers = jdask.check_client(job.client, gpu=gpu)
        where = f"dask ({n_workers} worker slots{', GPU resource' if gpu else ''})"
        free = None
    else:
        n_workers = 1 if job.devices is None else len(job.devices)
        where = "cpu" if job.devices is None else "gpus " + ",".join(map(str, job.devices))
        free = smallest_free_memory(job.devices)

    if job.tile is not None:
        tile, why = job.tile, "given"
        _check_tile_pairs(traits, job, tile, "given")     # before a store is made for it
    else:
        work = pair_work(job.arch, job.image_shape)
        sizing = (traits if job.client is None else
                  jdask.worker_traits(job.client, job.backend, traits))    # their cores, not ours
        tile, why = auto_tile(sizing, job.n1, job.n2, job.symmetric, n_workers,
                              len(job.arch.depths), free, for_store=job.out is not None,
                              pair_seconds=sizing.pair_seconds(work, job.dtype))

    # ---- where results go
    store = None
    if job.out is not None:
        from .store import GramStore
        store = GramStore.open_for_job(job, tile=tile, tile_given=(why == "given"))
        if store.tile != tile:
            why = f"kept from the store ({store.tile})"
            tile = store.tile
            _check_tile_pairs(traits, job, tile, f"kept from the store {str(job.out)!r}")
    layout = TileLayout(job.n1, job.n2, tile, job.symmetric)
    all_tiles = layout.tiles()
    todo = all_tiles if store is None else store.missing(all_tiles)
    todo_pairs = sum(t.pairs for t in todo)
    log.info("gram job: backend=%s dtype=%s on %s; %d x %d images %s, %s; tile %d (%s): "
             "%d tile%s (%d to compute, %d pairs)", job.backend.name, job.dtype.name, where, job.n1,
             job.n2, job.image_shape, "symmetric" if job.symmetric else "rectangular", tile, why,
             len(all_tiles), "" if len(all_tiles) == 1 else "s", len(todo), todo_pairs)

    # what computes the tiles, per distinct device (Dask: the workers say, with their tiles)
    computes = None
    if job.client is None:
        be = job.make_backend()
        computes = []
        for d in (job.devices or [None]):
            rec = compute_record_of(be, d)
            if rec not in computes:
                computes.append(rec)
    if store is not None:
        run_id = store.begin_run(len(todo), where, computes)
        sink = store.sink(job, run_id)
    else:
        run_id = None
        sink = MemorySink(job, layout, job.result_device)

    def run_once(tiles) -> tuple[dict, list]:
        """Compute what this process can claim of ``tiles``: ({worker: tiles}, tiles written);
        Dask workers' compute records are added to ``worker_computes`` as their tiles come."""
        if job.client is not None:
            return jdask.run_dask(job, tiles, sink, bar, writes_store=store is not None,
                                  computes=worker_computes)
        workers = local_workers(job.make_backend, job.devices)
        per = run_tiles(workers, *job.compute_images, tiles, sink, bar,
                        claim=sink.claim if store is not None else None,
                        prepare_seconds=prepare_seconds)
        return per, []

    bar = Progress(todo_pairs, job.progress)
    t0 = time.perf_counter()
    outcome = "failed"
    per_worker: dict = {}
    prepare_seconds: dict = {}         # local workers: the last round's preparation, per worker
    worker_computes: list = []         # Dask: what computed the tiles, as the workers said
    try:
        remaining = todo
        while remaining:
            per, written = run_once(remaining)
            for w, n in per.items():
                per_worker[w] = per_worker.get(w, 0) + n
            if store is None:
                break
            if job.client is not None:
                jdask.check_all_marked(store, written, per)
            remaining = store.not_done(remaining)      # held by other writers
            bar.set_done(todo_pairs - sum(t.pairs for t in remaining))
            if remaining:
                if not sum(per.values()):              # nothing claimed this round: no spinning
                    time.sleep(store.poll_seconds)
                store.wait_for_others(remaining)
                remaining = store.not_done(remaining)
                bar.set_done(todo_pairs - sum(t.pairs for t in remaining))
        outcome = "finished"
    except KeyboardInterrupt as e:     # Ctrl-C, or a signal raised as one (saying its outcome)
        outcome = getattr(e, "outcome", "interrupted")
        raise
    except BaseException as e:
        outcome = f"failed: {type(e).__name__}: {e}"
        raise
    finally:
        bar.close()
        seconds = time.perf_counter() - t0
        computed = todo
        if store is not None:
            sink.release_all()
            mine = store.markers(todo) if todo else {}
            computed = [t for t in todo if mine[(t.i, t.j)] == run_id]
            try:
                store.end_run(run_id, seconds, tiles_computed=len(computed), outcome=outcome,
                              computes=worker_computes or None)
            except Exception as e:  # noqa: BLE001 - the record must not hide the job's outcome
                log.warning("store %s: the end of run %d could not be recorded: %s", store.path,
                            run_id, e)
    pairs = sum(t.pairs for t in computed)
    info = {"backend": job.backend.name, "dtype": job.dtype.name, "tile": tile, "tile_reason": why,
            "where": where, "tiles_total": len(all_tiles), "tiles_computed": len(computed),
            "pairs_computed": pairs, "unique_pairs": layout.unique_pairs,
            "per_worker": per_worker, "compute_seconds": seconds,
            "prepare_seconds": prepare_seconds,
            "pairs_per_second": pairs / seconds if seconds > 0 and pairs else None,
            "seconds": time.perf_counter() - t_start, "arch": job.arch.to_dict(),
            # what computed this run's tiles: none where it computed none (a finished store
            # resumed), locally as on Dask, whose workers say it only with the tiles they compute
            "compute": (computes if computes is not None else worker_computes) if computed else []}
    if store is not None:
        info.update(store=str(store.path), run=run_id, tiles_verified=store.verified["tiles"],
                    tiles_failed_verification=store.verified["failed"],
                    verify_seconds=store.verified["seconds"],
                    tiles_by_others=len(todo) - len(computed))
    log.info("gram job done: %d tile%s, %d pairs in %.2f s (%s pairs/s)", len(computed),
             "" if len(computed) == 1 else "s", pairs, seconds,
             f"{pairs / seconds:.4g}" if seconds > 0 else "-")
    return (store.read_only_group if store is not None else sink.result), info


__all__ = ["GramJob", "run_job"]
