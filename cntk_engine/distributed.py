"""Gram tiles as Dask tasks (``gram(..., client=dask.distributed.Client(...))``).

Imported only when a client is given: ``import cntk_engine`` and the local scheduler never import
Dask (the "dask" extra is optional).

* Images reach the workers ONCE: ``client.scatter(..., broadcast=True)`` puts one copy on every
  worker, and every tile task takes that future as an argument (no per-tile transfer).  CPU
  backends: the client prepares the images (per-image diagonals computed once) and scatters the
  prepared arrays; tasks call ``pair_sums`` only.  cuda: the client may have no GPU, so it
  scatters the float64 images and each worker process prepares them once on its GPU (cached per
  job and device) before its first tile.
* One task per tile, largest tiles first (Dask priorities).  GPU tasks ask for
  ``resources={"GPU": 1}``: start each GPU worker with ``--resources GPU=1`` (dask-cuda:
  ``LocalCUDACluster(resources={"GPU": 1})`` or ``dask cuda worker --resources GPU=1``) so a
  GPU runs one tile at a time.
* With ``out=`` each task writes its tile into the shared Zarr store itself (the path must be
  the same on every worker: a shared file system) and returns only (i, j, pairs); without
  ``out=`` it returns the tile's sums and the client assembles the matrix in memory.
* A task is idempotent: the same tile gives the same bytes, written to the same chunks, and the
  "done" marker last.  So when a worker dies, Dask re-runs its tiles elsewhere and the result is
  identical to a local run.  Scattered images are replicated on every worker; if every worker
  holding them dies at once the job stops with an error and a rerun (same ``out=``) resumes.
"""
from __future__ import annotations

import logging
import threading
import uuid
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np

log = logging.getLogger("cntk_engine")

_CACHE: dict = {}              # per worker process: (job token, device) -> (backend, pa, pb)
_CACHE_LOCK = threading.Lock()


def _client_workers(client) -> dict:
    info = client.scheduler_info(n_workers=-1) if _accepts_n_workers(client) else client.scheduler_info()
    return dict(info.get("workers", {}))


def _accepts_n_workers(client) -> bool:
    import inspect
    try:
        return "n_workers" in inspect.signature(client.scheduler_info).parameters
    except (TypeError, ValueError):
        return False


def check_client(client, *, gpu: bool, devices=None) -> int:
    """Check the client before anything is created; return its worker slots (threads, or GPUs)."""
    if not (hasattr(client, "submit") and hasattr(client, "scatter")):
        raise ValueError(f"client must be a dask.distributed.Client; got {type(client).__name__}")
    if devices not in (None, "all"):
        raise ValueError("devices= selects local GPUs; with client= the Dask workers decide (one "
                         "GPU per worker with resources={'GPU': 1}); leave devices unset")
    workers = _client_workers(client)
    if not workers:
        raise RuntimeError("the Dask cluster has no workers (start some, or wait for them with "
                           "client.wait_for_workers(n))")
    if gpu:
        slots = sum(int(w.get("resources", {}).get("GPU", 0)) for w in workers.values())
        if slots == 0:
            raise RuntimeError("backend 'cuda' on Dask needs workers with a GPU resource: start them "
                               "with --resources GPU=1 (dask-cuda: LocalCUDACluster(resources="
                               "{'GPU': 1}) or `dask cuda worker --resources GPU=1`)")
        return slots
    return int(sum(int(w.get("nthreads", 1)) for w in workers.values()))


@dataclass
class _Job:
    token: str
    backend_cls: type
    arch: Any
    params: Any
    dtype: str
    prepared: bool          # the scattered objects are Prepared (CPU) or raw images (cuda)
    symmetric: bool         # x1 against itself (xb is xa)
    writer: Callable | None  # a store.TileWriter, or None: return the sums


def _state(job: _Job, xa, xb):
    """(backend, prepared a, prepared b) in this worker process, built once per job (and GPU)."""
    dev = None
    if not job.prepared:
        import cupy
        dev = cupy.cuda.Device().id
    key = (job.token, dev)
    with _CACHE_LOCK:
        st = _CACHE.get(key)
        if st is None:
            for k in [k for k in _CACHE if k[0] != job.token]:   # drop earlier jobs' images
                del _CACHE[k]
            be = job.backend_cls(job.arch, job.params, np.dtype(job.dtype))
            if job.prepared:
                pa, pb = xa, (xa if job.symmetric else xb)
            else:
                pa = be.prepare(xa)
                pb = pa if job.symmetric else be.prepare(xb)
            st = _CACHE[key] = (be, pa, pb)
    return st


def _to_host(s):
    if type(s).__module__.startswith("cupy"):
        return s.get()
    return np.asarray(s)


def tile_task(job: _Job, tile, xa, xb):
    """One tile on a worker: pair sums, then (with a store) finalize + write + mark done."""
    be, pa, pb = _state(job, xa, xb)
    s = _to_host(be.pair_sums(pa[tile.rows], pb[tile.cols], symmetric=tile.diag))
    try:
        from distributed import get_worker
        who = get_worker().address
    except Exception:  # pragma: no cover - run outside a worker
        who = "?"
    if job.writer is not None:
        job.writer(tile, s)
        return tile.i, tile.j, who, None
    return tile.i, tile.j, who, s


def run_dask(client, backend_cls, arch, params, dtype, x1, x2, todo, *, kernel, store, sink,
             run_id, progress, gpu: bool) -> dict:
    """Run the ``todo`` tiles on the cluster; returns {worker address: tiles done}."""
    from distributed import as_completed

    from .scheduler import largest_first
    if not todo:
        return {}
    token = uuid.uuid4().hex
    order = largest_first(todo)
    if gpu:
        xa, xb = x1, x2                      # each GPU worker prepares once on its own device
    else:
        be = backend_cls(arch, params, np.dtype(dtype))
        xa = be.prepare(x1)                  # diagonals once, on the client
        xb = None if x2 is None else be.prepare(x2)
    fa = client.scatter(xa, broadcast=True, hash=False)
    fb = fa if xb is None else client.scatter(xb, broadcast=True, hash=False)
    job = _Job(token, backend_cls, arch, params, np.dtype(dtype).name, not gpu, x2 is None,
               sink if store is not None else None)
    by_ij = {(t.i, t.j): t for t in order}
    futures = [client.submit(tile_task, job, t, fa, fb, key=f"cntk-tile-{token}-{t.i}-{t.j}",
                             resources={"GPU": 1} if gpu else None, priority=len(order) - k,
                             pure=False)
               for k, t in enumerate(order)]
    log.info("dask: %d tile tasks submitted (images scattered once to every worker)", len(futures))
    per_worker: dict = {}
    try:
        for fut in as_completed(futures):
            if fut.status == "error":
                fut.result()                 # raises the task's exception here
            i, j, who, s = fut.result()
            t = by_ij[(i, j)]
            if s is not None:
                sink(t, s)
            per_worker[who] = per_worker.get(who, 0) + 1
            progress.update(t.pairs)
            fut.release()
    except BaseException:
        client.cancel(futures)
        raise
    finally:
        client.cancel([fa] if fb is fa else [fa, fb])
    return per_worker
