"""Gram tiles as Dask tasks (``gram(..., client=dask.distributed.Client(...))``).

Imported only when a client is given: ``import cntk_engine`` and local jobs never import Dask
(the "dask" extra is optional).

* The backend is chosen on the WORKERS' terms (:func:`resolve_backend`, one ``client.run`` of
  ``backends.capabilities``): "cuda" must be usable (CuPy, a GPU, the compiled extension) and
  support the job (architecture, image size) on every worker that declares a GPU resource, else the error names each worker and
  its reason; "auto" becomes cuda when it is, numba otherwise (logged with the reason).  The
  client itself needs no GPU and no CUDA extension (a login node can start the job).
* Images reach the workers ONCE: ``client.scatter(..., broadcast=True)`` puts one copy on every
  worker, and every tile task takes that future as an argument (no per-tile transfer).  CPU
  backends: the client prepares the images (per-image diagonals computed once) and scatters the
  prepared arrays; tasks call ``pair_sums`` only.  cuda: the client may have no GPU, so it
  scatters the float64 images and each worker process prepares them once on its GPU (cached per
  job and device) before its first tile.  The cache holds a few jobs at most (least recently used
  first out), so concurrent jobs do not evict each other, and each job's entries are dropped
  from every worker when it ends (GPU memory returned to CuPy's pool and freed).
* One task per tile, largest tiles first (Dask priorities).  GPU tasks ask for
  ``resources={"GPU": 1}``: start each GPU worker with ``--resources GPU=1`` (dask-cuda:
  ``LocalCUDACluster(resources={"GPU": 1})`` or ``dask cuda worker --resources GPU=1``) so a
  GPU runs one tile at a time.
* With ``out=`` each task claims its tile in the shared Zarr store (the path must be the same
  on every worker: a shared file system), computes it, writes it and releases the claim, and
  returns only where it ran; a tile another writer holds (another job or process working on
  the same store) is skipped and reported as such, and the client waits for it like a local
  run does.  Without ``out=`` a task returns the tile's sums and the client assembles the
  matrix in memory.
* A task is idempotent: the same tile gives the same bytes, written to the same chunks, and the
  "done" marker last.  So when a worker dies, Dask re-runs its tiles elsewhere and the result is
  identical to a local run (the dead worker's claim is stale at once on the same host, else
  after the claim timeout).  Scattered images are replicated on every worker; if every worker
  holding them dies at once the job stops with an error and a rerun (same ``out=``) resumes.
  With ``out=`` the client re-reads the done markers at the end: a tile a worker reported but
  that is not marked in the client's store (a path not shared with that worker) is an error.
"""
from __future__ import annotations

import logging
import threading
import uuid
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np

from ..arrays import current_device, to_host
from ..backends import backend_class, capabilities, unavailable_reason
from ..backends.base import compute_record_of
from ..spelling import arg
from .tiles import largest_first

log = logging.getLogger("cntk_engine")

# per worker process: (job token, device) -> (backend, pa, pb), least recently used first
_CACHE: OrderedDict = OrderedDict()
_CACHE_LOCK = threading.Lock()
CACHE_JOBS = 4                 # jobs whose prepared images a worker keeps at most


def _client_workers(client) -> dict:
    info = client.scheduler_info(n_workers=-1) if _accepts_n_workers(client) else client.scheduler_info()
    return dict(info.get("workers", {}))


def _accepts_n_workers(client) -> bool:
    import inspect
    try:
        return "n_workers" in inspect.signature(client.scheduler_info).parameters
    except (TypeError, ValueError):
        return False


def _check_is_client(client) -> None:
    if not (hasattr(client, "submit") and hasattr(client, "scatter") and hasattr(client, "run")):
        raise ValueError(f"client must be a dask.distributed.Client; got {type(client).__name__}")


def _gpu_slots(info: dict) -> int:
    return int((info or {}).get("resources", {}).get("GPU", 0))


_GPU_RESOURCE_HELP = ("start them with --resources GPU=1 (dask-cuda: LocalCUDACluster(resources="
                      "{'GPU': 1}) or `dask cuda worker --resources GPU=1`)")


# ------------------------------------------------------------------ backend, on the workers' terms
def worker_backends(arch, image_shape, dtype) -> dict:
    """Runs on each worker (``client.run``): ``backends.capabilities`` there, i.e. for every
    backend whether it can run on that worker and whether it supports this job."""
    return capabilities(arch, image_shape, dtype)


def _why_not(report, name: str) -> str | None:
    """Why backend ``name`` cannot run this job on a worker, from its :func:`worker_backends`
    report (or the exception its check raised); None if it can."""
    if isinstance(report, BaseException):
        return (f"checking its backends failed ({type(report).__name__}: {report}; is cntk_engine "
                "installed on the worker?)")
    c = report.get(name, {"unavailable": f"unknown backend {name!r}", "unsupported": None})
    if c["unavailable"] is not None:
        return c["unavailable"]
    return None if c["unsupported"] is None else f"this input is not supported: {c['unsupported']}"


def _unverified(reports: dict, workers, name: str) -> str | None:
    """Why backend ``name``'s code for this job is not verified (``Backend.unverified``), as
    the first of ``workers`` that says so reports it; None if none does (or reports predate it)."""
    for a in workers:
        r = reports[a]
        if isinstance(r, dict) and r.get(name, {}).get("unverified"):
            return r[name]["unverified"]
    return None


def _input_only(report, name: str) -> bool:
    """Whether the backend is available on the worker and only this job's input is refused."""
    return isinstance(report, dict) and report[name]["unavailable"] is None


def _name_workers(bad: dict) -> str:
    return "; ".join(f"{w}: {why}" for w, why in sorted(bad.items()))


def choose_backend(name: str, reports: dict, workers: dict) -> tuple[str, str]:
    """(backend name, why) for ``backend=name`` on a cluster.

    ``reports``: {worker address: :func:`worker_backends` result, or the exception it raised};
    ``workers``: {address: scheduler info (its "resources")}.  cuda tasks run on the workers that
    declare a GPU resource, CPU tasks on any worker, so those are the workers that must be able
    to run the backend.  Raises when they cannot, naming each worker and its reason."""
    gpu_workers = sorted(a for a in reports if _gpu_slots(workers.get(a, {})) > 0)
    if name in ("cuda", "auto"):
        bad = {a: w for a in gpu_workers if (w := _why_not(reports[a], "cuda")) is not None}
        if name == "cuda":
            if not gpu_workers:
                able = [a for a in reports if _why_not(reports[a], "cuda") is None]
                raise RuntimeError(f"{arg('backend', 'cuda')} on Dask needs workers with a GPU "
                                   "resource: " + _GPU_RESOURCE_HELP
                                   + (f"; workers that could run cuda: {', '.join(sorted(able))}"
                                      if able else ""))
            if bad:
                shape_only = all(_input_only(reports[a], "cuda") for a in bad)
                msg = (f"{arg('backend', 'cuda')} cannot run on {len(bad)} of the "
                       f"{len(gpu_workers)} Dask workers with a GPU resource: {_name_workers(bad)}")
                if shape_only:
                    raise ValueError(msg + f". Use {arg('backend', 'numba')}.")
                raise RuntimeError(msg + f". Fix those workers (or stop them), or use "
                                   f"{arg('backend', 'numba')}")
            if unverified := _unverified(reports, gpu_workers, "cuda"):
                log.warning("backend 'cuda': asked for, although %s", unverified)
            return "cuda", f"usable on all {len(gpu_workers)} workers with a GPU resource"
        if not gpu_workers:
            why = ("no worker declares a GPU resource (GPU workers need --resources GPU=1 for "
                   "cuda)")
        elif bad:
            why = (f"cuda is not usable on {len(bad)} of the {len(gpu_workers)} workers with a "
                   f"GPU resource ({_name_workers(bad)})")
        elif unverified := _unverified(reports, gpu_workers, "cuda"):
            why = f"cuda: {unverified}"       # auto does not choose unverified code, and says so:
            # the GPU workers could run it, in minutes where the CPU takes hours
            log.warning("backend 'auto' runs this job on the CPU (numba) although %d worker%s with a "
                        "GPU resource could run it with cuda: %s", len(gpu_workers),
                        "" if len(gpu_workers) == 1 else "s", unverified)
        else:
            return "cuda", f"usable on all {len(gpu_workers)} workers with a GPU resource"
        name, auto_why = "numba", why
    else:
        auto_why = None
    bad = {a: w for a in reports if (w := _why_not(reports[a], name)) is not None}
    if bad:
        raise RuntimeError(f"{arg('backend', name)} cannot run on {len(bad)} of the {len(reports)} "
                           f"Dask workers: {_name_workers(bad)}")
    return name, auto_why or f"usable on all {len(reports)} workers"


def resolve_backend(client, name: str, arch, image_shape, dtype) -> type:
    """The backend class for ``gram(..., backend=name, client=client)``, chosen on the workers'
    terms (one ``client.run`` of :func:`worker_backends`), not by this process's GPU or
    extension: see :func:`choose_backend`.  The choice and why are logged."""
    _check_is_client(client)
    workers = _client_workers(client)
    if not workers:
        raise RuntimeError("the Dask cluster has no workers (start some, or wait for them with "
                           "client.wait_for_workers(n))")
    reports = client.run(worker_backends, arch, tuple(image_shape), np.dtype(dtype).name,
                         on_error="return")
    chosen, why = choose_backend(name, dict(reports), workers)
    if name == "auto":
        log.info("dask: backend 'auto' resolved on the workers to %r: %s", chosen, why)
    else:
        log.info("dask: backend %r checked on the workers: %s", chosen, why)
    cls = backend_class(chosen)
    if cls.traits().device != "gpu":      # CPU backends: the client prepares the images too
        why = unavailable_reason(chosen)
        if why is not None:
            raise RuntimeError(f"{arg('backend', chosen)} is unavailable on this client: {why}")
    return cls                            # a GPU backend needs neither a GPU nor its extension here


def check_client(client, *, gpu: bool) -> int:
    """Check the client before anything is created; return its worker slots (threads, or GPUs)."""
    _check_is_client(client)
    workers = _client_workers(client)
    if not workers:
        raise RuntimeError("the Dask cluster has no workers (start some, or wait for them with "
                           "client.wait_for_workers(n))")
    if gpu:
        slots = sum(_gpu_slots(w) for w in workers.values())
        if slots == 0:
            raise RuntimeError(f"{arg('backend', 'cuda')} on Dask needs workers with a GPU "
                               "resource: " + _GPU_RESOURCE_HELP)
        return slots
    return int(sum(int(w.get("nthreads", 1)) for w in workers.values()))


def worker_traits(client, backend, local):
    """``backend``'s traits as the workers see them, for sizing tiles: the numba backend's time
    model divides by the threads of the process that asks, and a login node's cores are not the
    workers'.  The slowest worker's (its tiles take longest); ``local`` (the client's) where no
    worker can say."""
    from ..backends.base import Traits
    try:
        said = client.run(_traits_of, backend, on_error="return")
    except Exception as e:  # noqa: BLE001 - a sizing hint: the client's own estimate will do
        log.warning("dask: the workers could not say how fast %s is on them (%s); tiles are "
                    "sized by this process's estimate", backend.name, e)
        return local
    known = [t for t in said.values() if isinstance(t, Traits)]
    if not known:
        return local

    def slowness(t):
        return max((t.entry_seconds or {}).values(), default=0.0)
    return max(known, key=slowness)


def _traits_of(backend):
    """On a worker: ``backend``'s traits there (the class travels by name: the worker's own)."""
    return backend.traits()


def _cluster_failure(e: BaseException, tile, writes_store: bool) -> RuntimeError | None:
    """A tile task that failed because of the cluster, not its computation (its workers died,
    the scheduler was lost or dropped it) as one error that says so, naming the tile; None for
    the task's own errors, which are raised as they are."""
    from concurrent.futures import CancelledError

    from distributed.scheduler import KilledWorker
    at = f"tile ({tile.i}, {tile.j})" if tile is not None else "a tile"
    if isinstance(e, KilledWorker):
        # Dask counts a worker's death against every task it held, so the tile named is lost
        # with its workers, not necessarily the one that killed them
        why = (f"{at} was lost: the workers that held it died (it, or a tile beside it on those "
               f"workers, may kill a worker: its memory, or a crash in the backend; see the "
               f"workers' logs): {e}")
    elif isinstance(e, CancelledError):
        reason = str(getattr(e, "reason", "") or "unknown")
        why = ("the connection to the Dask scheduler was lost" if "connection-lost" in reason
               else f"the Dask cluster dropped {at} ({reason}): its workers or the scheduler may "
               "have died or restarted")
    else:
        return None
    kept = ("; the tiles finished so far are kept in the store, and running the same job on it "
            "again computes the rest") if writes_store else ""
    return RuntimeError(f"dask: {why}{kept}")


@dataclass
class TaskSpec:
    """What every tile task of a job needs on a worker (the part of a GramJob sent with each
    task: no images, no client)."""

    token: str
    backend_cls: type
    arch: Any
    params: Any
    dtype: str
    prepared: bool          # the scattered objects are Prepared (CPU) or raw images (GPU)
    symmetric: bool         # x1 against itself (xb is xa)
    writer: Callable | None  # a store.StoreSink, or None: return the sums


def _state(job: TaskSpec, xa, xb):
    """(backend, prepared a, prepared b, compute record) in this worker process, built once per
    job (and GPU); the record (``Backend.compute_record``) goes back with each tile.

    A small cache: the entries of at most ``CACHE_JOBS`` jobs, the least recently used job's
    dropped first (two concurrent jobs keep theirs); :func:`evict` drops a finished job's."""
    dev = None if job.prepared else current_device()
    key = (job.token, dev)
    with _CACHE_LOCK:
        st = _CACHE.get(key)
        if st is not None:
            _CACHE.move_to_end(key)
            return st
        be = job.backend_cls(job.arch, job.params, np.dtype(job.dtype))
        if job.prepared:
            pa, pb = xa, (xa if job.symmetric else xb)
        else:
            pa = be.prepare_set(xa)
            pb = pa if job.symmetric else be.prepare_set(xb)
        st = _CACHE[key] = (be, pa, pb, compute_record_of(be, dev))
        tokens = list(dict.fromkeys(k[0] for k in _CACHE))     # least recently used first
        for old in tokens[:max(0, len(tokens) - CACHE_JOBS)]:
            for k in [k for k in _CACHE if k[0] == old]:
                del _CACHE[k]
    return st


def evict(token: str) -> int:
    """Drop job ``token``'s prepared images from this worker process (run on every worker by
    ``client.run`` when the job ends); on a GPU worker CuPy's pool then frees the memory.
    Returns how many entries were dropped."""
    with _CACHE_LOCK:
        keys = [k for k in _CACHE if k[0] == token]
        for k in keys:
            del _CACHE[k]
    if keys and any(k[1] is not None for k in keys):
        try:
            import cupy
            cupy.get_default_memory_pool().free_all_blocks()
        except Exception:  # pragma: no cover - no CuPy: nothing to free
            pass
    return len(keys)


def cached_jobs() -> list:
    """Job tokens whose prepared images this worker process holds (for tests and debugging)."""
    with _CACHE_LOCK:
        return list(dict.fromkeys(k[0] for k in _CACHE))


def tile_task(job: TaskSpec, tile, xa, xb):
    """One tile on a worker: pair sums, then (with a store) finalize + write + mark done.
    Returns (i, j, worker, sums or None, status, compute record or None): status "returned"
    (the sums, no store), "written" (into the store) or "skipped" (another writer holds or
    finished the tile; no record)."""
    try:
        from distributed import get_worker
        who = get_worker().address
    except Exception:  # pragma: no cover - run outside a worker
        who = "?"
    if job.writer is not None:
        if not job.writer.claim(tile):
            return tile.i, tile.j, who, None, "skipped", None
        try:
            be, pa, pb, record = _state(job, xa, xb)
            written = job.writer(tile, to_host(be.pair_sums(pa[tile.rows], pb[tile.cols],
                                                            symmetric=tile.diag)))
        except BaseException:
            job.writer.release(tile)
            raise
        if not written:       # taken over by another writer meanwhile: its tile, not ours
            return tile.i, tile.j, who, None, "skipped", None
        return tile.i, tile.j, who, None, "written", record
    be, pa, pb, record = _state(job, xa, xb)
    s = to_host(be.pair_sums(pa[tile.rows], pb[tile.cols], symmetric=tile.diag))
    return tile.i, tile.j, who, s, "returned", record


def run_dask(job, todo, sink, progress, *, writes_store: bool,
             computes: list | None = None) -> tuple[dict, list]:
    """Run the ``todo`` tiles of ``job`` (a :class:`~cntk_engine.jobs.GramJob`) on its client's
    cluster into ``sink`` (with ``writes_store`` the workers claim the tiles and call the store
    sink themselves); returns ({worker address: tiles computed}, tiles written into the store).
    Tiles skipped because another writer holds them are in neither.  ``computes``: a list the
    distinct compute records of the workers are added to as their tiles come in (so a run that
    fails midway still has those of the tiles it wrote)."""
    from distributed import as_completed
    computes = [] if computes is None else computes
    if not todo:
        return {}, []
    client = job.client
    gpu = job.traits.device == "gpu"
    token = uuid.uuid4().hex
    order = largest_first(todo)
    x1, x2 = job.compute_images          # scaled images (their scales go with the sinks)
    if gpu:
        xa, xb = x1, x2                      # each GPU worker prepares once on its own device
    else:
        be = job.make_backend()
        xa = be.prepare_set(x1)              # diagonals once, on the client
        xb = None if job.symmetric else be.prepare_set(x2)
    fa = client.scatter(xa, broadcast=True, hash=False)
    fb = fa if xb is None else client.scatter(xb, broadcast=True, hash=False)
    # the spec is scattered once too: a store sink holds the per-image scales (O(N)), which as
    # an argument of each task would be pickled into every task and kept on the scheduler
    spec = client.scatter(TaskSpec(token, job.backend, job.arch, job.params, job.dtype.name, not gpu,
                                   job.symmetric, sink if writes_store else None),
                          broadcast=True, hash=False)
    by_ij = {(t.i, t.j): t for t in order}
    futures = [client.submit(tile_task, spec, t, fa, fb, key=f"cntk-tile-{token}-{t.i}-{t.j}",
                             resources={"GPU": 1} if gpu else None, priority=len(order) - k,
                             pure=False)
               for k, t in enumerate(order)]
    log.info("dask: %d tile tasks submitted (images scattered once to every worker)", len(futures))
    per_worker: dict = {}
    written = []
    tile_of = {f.key: t for f, t in zip(futures, order)}
    try:
        for fut in as_completed(futures):
            try:        # a task's exception is raised here
                # a worker of a cntk_engine before compute records returns 5 fields
                i, j, who, s, status, *record = fut.result()
            except Exception as e:
                lost = _cluster_failure(e, tile_of.get(fut.key), writes_store)
                if lost is None:
                    raise
                raise lost from e
            record = record[0] if record else {
                "backend": job.backend.name,
                "unknown": "a worker of a cntk_engine that does not record its code"}
            t = by_ij[(i, j)]
            fut.release()
            if status == "skipped":          # held by another writer: the job's progress
                progress.update(t.pairs)
                continue
            if s is not None:
                sink(t, s)
            if status == "written":
                written.append(t)
            if record is not None and record not in computes:
                computes.append(record)
            per_worker[who] = per_worker.get(who, 0) + 1
            progress.update(t.pairs)
    except BaseException:
        client.cancel(futures)
        raise
    finally:
        client.cancel([fa] if fb is fa else [fa, fb])
        try:                                  # this job's prepared images (GPU memory) go now
            client.run(evict, token, on_error="ignore")
        except Exception as e:  # noqa: BLE001 - cleanup must not hide the job's own outcome
            log.warning("dask: could not drop job %s's cached images on the workers: %s", token, e)
    return per_worker, written


def check_all_marked(store, tiles, per_worker: dict) -> None:
    """After a Dask run with ``out=``: every tile the workers reported must be marked done in
    the store as the CLIENT sees it; else a worker wrote somewhere else (an ``out=`` path that is
    not on a file system shared by the client and every worker)."""
    left = store.not_done(tiles)
    if left:
        shown = ", ".join(f"({t.i}, {t.j})" for t in left[:8]) + (" ..." if len(left) > 8 else "")
        raise RuntimeError(
            f"Dask workers {sorted(per_worker)} reported {len(tiles)} tiles written, but "
            f"{len(left)} of them are not marked done in the store {store.path} as this client "
            f"sees it: {shown}. {arg('out')} must be a path on a file system shared by the client and "
            "every worker (the workers wrote elsewhere); rerun the same call to compute them")
