"""Resumable, out-of-core Gram matrices in a Zarr group (``gram(..., out="path.zarr")``).

This module alone knows the store's format: the layout below, the job record, the done
markers, the zarr version it needs; :func:`load_gram` and :func:`kernel_arrays` read stored
Grams for the solver and the command line.

Layout of the group (zarr >= 3.1.3, a directory on a local or shared POSIX file system)
----------------------------------------------------------------------------------
* One depth: ``group["ntk"]`` and/or ``group["nngp"]``, each an (N1, N2) float64 array.
* Several depths (``depths=[...]``): ``group["depth_<d>/ntk"]``, ``group["depth_<d>/nngp"]``.
* Only the kernels asked for are stored (``kernel="ntk"``: ntk only; ``"both"``: both).
* Chunks are the tiles: chunk (i, j) is tile (i, j), ``tile`` x ``tile`` entries.  A symmetric
  Gram is stored full: each off-diagonal tile is written at (i, j) and, transposed, at (j, i).
  Entries of tiles not computed yet read as NaN (the fill value).
* ``group["tiles_done"]``: int32 (grid rows, grid cols), one chunk per tile: 0 = not done, k =
  written completely by run k (runs are numbered from 1; for a symmetric job only tiles on or
  above the diagonal are computed, the others stay 0 and their chunks are the mirrors).
* ``group.attrs["cntk_engine"]``: the job: format, package version, backend, compute dtype,
  architecture (depths, pooling, fix, convention, W_std, b_std, filter_size), kernels, N1, N2,
  image shape, symmetric, sha256 fingerprints of the images (of their float64 NCHW values, so
  uint8 / float32 / NHWC copies of the same images match) and the tile layout.
* ``group.attrs["runs"]``: one record per run (started, where, tiles to compute, seconds).

Crash safety
------------
A tile is written completely or not at all: its data chunks are written first, then its entry
of ``tiles_done``.  Zarr's local store (zarr >= 3.1.3, zarr-python PR #3412; older versions are
refused) writes every chunk to a temporary file and renames it into place, so a killed process
leaves each chunk old or new, never half written, and a tile whose marker is missing is simply
computed again (same values, same bytes: writing a tile twice is idempotent, which is also what
makes retried Dask tasks safe).  The store itself is created in a temporary directory next to
``out`` and renamed into place once complete, so a store that exists always carries its job
record; when two processes create the same store at once, the one that loses the rename opens
the winner's store like any existing one (same job: resume; another job: StoreMismatch).

Damage done from outside (a file system that lost or truncated files) is handled when a job is
resumed: a ``tiles_done`` chunk that cannot be decoded counts as "not done" (a warning names the
store and the tile), and a finished tile whose data chunk file is missing or empty is computed
again (a warning names the store, the array and the chunk); both cost one ``stat`` per chunk
file, no data is read.  A data chunk damaged in a way ``stat`` cannot see (garbage bytes of
the right length) surfaces only when it is read.

Resuming
--------
Opening an existing store compares its job record with the job asked for; any difference
(images, architecture, dtype, backend, kernels, sizes, tile size when given explicitly, package
version) raises :class:`StoreMismatch` naming the differences, before anything is written.  The
depths are compared as a set (``depths=[4, 3]`` resumes a store made with ``[3, 4]``; new
records list them sorted).  When the records agree only the tiles whose marker is 0 are
computed.
"""
from __future__ import annotations

import datetime as _dt
import errno
import hashlib
import logging
import os
import re
import shutil
import socket
import threading
import uuid
from pathlib import Path

import numpy as np

from ..arrays import (DEVICES, available_gpu_memory, available_memory, cupy_module, format_bytes,
                      to_host)
from ..version import __version__
from .sinks import Sink
from .tiles import TileLayout

log = logging.getLogger("cntk_engine")

FORMAT = "cntk_engine.gram_store"
FORMAT_VERSION = 1
DONE = "tiles_done"
ZARR_MIN = (3, 1, 3)   # atomic chunk writes (temporary file + rename): zarr-python PR #3412


class StoreError(ValueError):
    """An ``out=`` store that cannot be used (not a store, exists without resume, ...)."""


class StoreMismatch(StoreError):
    """The store at ``out=`` belongs to another job."""


class GramTooLarge(MemoryError, ValueError):
    """A stored Gram would not fit in the memory allowed (``max_memory``)."""


class _LostRace(Exception):
    """Another process renamed its new store into place first (see ``GramStore._create``)."""


def _version_tuple(v: str) -> tuple[int, ...]:
    m = re.match(r"(\d+)(?:\.(\d+))?(?:\.(\d+))?", v)
    return tuple(int(g or 0) for g in m.groups()) if m else (0, 0, 0)


def require_zarr():
    """The zarr module, or an ImportError naming the version the store needs."""
    need = ".".join(map(str, ZARR_MIN))
    try:
        import zarr
    except ImportError as e:
        raise ImportError(f"out= needs zarr >= {need} (pip install 'cntk-engine[zarr]'): {e}") from None
    if _version_tuple(zarr.__version__) < ZARR_MIN:
        raise ImportError(f"out= needs zarr >= {need} (its local store writes each chunk to a "
                          f"temporary file and renames it, which the store's crash safety relies "
                          f"on); zarr {zarr.__version__} is installed (pip install -U 'zarr>={need}')")
    return zarr


def fingerprint(x: np.ndarray) -> str:
    """sha256 of an image array's shape and float64 C-order values."""
    x = np.ascontiguousarray(x, dtype=np.float64)
    h = hashlib.sha256(f"float64{tuple(x.shape)}".encode())
    flat = x.reshape(-1).view(np.uint8)
    step = 1 << 26
    for i in range(0, flat.size, step):
        h.update(flat[i:i + step].data)
    return h.hexdigest()


def array_names(depths, kernel: str) -> dict[tuple[int, str], str]:
    """{(depth, kernel name): array path in the group} for a job."""
    kernels = ("ntk", "nngp") if kernel == "both" else (kernel,)
    single = len(depths) == 1
    return {(d, k): (k if single else f"depth_{d}/{k}") for d in depths for k in kernels}


def job_spec(job) -> dict:
    """The job record (JSON) of a :class:`~cntk_engine.jobs.GramJob`, without the tile layout
    (added when the store is created)."""
    arch_d = job.arch.to_dict()
    arch_d["depths"] = sorted(arch_d["depths"])   # the order of depths=[...] is not part of the job
    return {
        "format": FORMAT, "format_version": FORMAT_VERSION, "version": __version__,
        "backend": job.backend.name, "dtype": job.dtype.name,
        "architecture": arch_d, "kernel": job.kernel, "kernels": list(job.kernel_names),
        "n1": job.n1, "n2": job.n2, "image_shape": list(job.image_shape),
        "symmetric": job.symmetric,
        "fingerprint": {"x1": fingerprint(job.x1),
                        "x2": None if job.symmetric else fingerprint(job.x2)},
    }


def _flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def _short(v) -> str:
    s = repr(v)
    return s[:14] + "..." + s[-4:] if isinstance(v, str) and len(v) > 24 else s


def spec_differences(stored: dict, wanted: dict) -> list[str]:
    """Human-readable differences between two job records (layout keys excluded)."""
    a, b = _flat(stored), _flat(wanted)
    diffs = []
    for k in b:
        if k in ("tile", "grid"):
            continue
        if k == "architecture.depths" and isinstance(a.get(k), list) and isinstance(b[k], list):
            # a set of readouts: stores written before records were sorted may list them unsorted
            if sorted(a[k]) != sorted(b[k]):
                diffs.append(f"architecture.depths: store has {sorted(a[k])}, this job {sorted(b[k])}")
            continue
        if a.get(k, "<missing>") != b[k]:
            name = {"fingerprint.x1": "images x1 (sha256)", "fingerprint.x2": "images x2 (sha256)"}.get(k, k)
            diffs.append(f"{name}: store has {_short(a.get(k, '<missing>'))}, this job {_short(b[k])}")
    return diffs


class StoreSink(Sink):
    """Writes finalized tiles into a store and marks them done; picklable (path + numbers), so
    Dask workers open the same store themselves.  Each process opens the arrays once."""

    def __init__(self, path: str, arch, params, kernel: str, symmetric: bool, run_id: int,
                 scales=(None, None)):
        self.path, self.arch, self.params = str(path), arch, params
        self.kernel, self.symmetric, self.run_id = kernel, symmetric, run_id
        self.row_scale, self.col_scale = scales
        self._arrays = None
        self._lock = threading.Lock()

    def __getstate__(self):
        d = self.__dict__.copy()
        d["_arrays"] = None
        d["_lock"] = None
        return d

    def __setstate__(self, d):
        self.__dict__.update(d)
        self._lock = threading.Lock()

    def _open(self):
        with self._lock:
            if self._arrays is None:
                zarr = require_zarr()
                g = zarr.open_group(self.path, mode="r+")
                arrays = {key: g[name] for key, name in array_names(self.arch.depths, self.kernel).items()}
                self._done = g[DONE]
                self._arrays = arrays
        return self._arrays

    def __call__(self, t, sums) -> None:
        arrays = self._open()
        for d, res in self.kernels(t, to_host(sums)).items():
            for k, v in res.items():
                a = arrays[(d, k)]
                a[t.rows, t.cols] = v
                if self.symmetric and not t.diag:
                    a[t.cols, t.rows] = np.ascontiguousarray(v.T)
        self._done[t.i, t.j] = self.run_id   # only after every chunk of the tile is in place


def read_done(path, arr, *, warn: bool = True) -> np.ndarray:
    """The ``tiles_done`` map of the store at ``path``.  A marker chunk that cannot be read or
    decoded (a truncated or emptied file) counts as 0, "not done", so its tile is computed again;
    with ``warn`` a warning names the store and each such tile."""
    try:
        return np.asarray(arr[...])
    except Exception:  # noqa: BLE001 - one damaged chunk: find it, chunk by chunk (a rare path)
        pass
    done = np.zeros(arr.shape, dtype=np.int32)
    for i in range(arr.shape[0]):
        for j in range(arr.shape[1]):
            try:
                done[i, j] = int(arr[i, j])
            except Exception as e:  # noqa: BLE001
                if warn:
                    log.warning("store %s: the done marker of tile (%d, %d) (%s/%s) cannot be read "
                                "(%s: %s); the tile counts as not done and will be computed again",
                                path, i, j, DONE, arr.metadata.encode_chunk_key((i, j)),
                                type(e).__name__, e)
    return done


class GramStore:
    """An open store of one job (see the module docstring)."""

    def __init__(self, path: Path, group, spec: dict):
        self.path, self.group, self.spec = path, group, spec
        self.tile = int(spec["tile"])

    # ------------------------------------------------------------------ open / create
    @classmethod
    def open_for_job(cls, job, *, tile: int, tile_given: bool) -> "GramStore":
        """Create the store of ``job`` (a :class:`~cntk_engine.jobs.GramJob`) at ``job.out`` or,
        if it holds this very job, reopen it.  ``job.resume=False``: an existing store is an
        error (the CLI without --resume)."""
        require_zarr()
        out, spec, resume = job.out, job_spec(job), job.resume
        try:
            path = Path(os.fspath(out)).expanduser().absolute()
        except TypeError:
            raise StoreError(f"out must be a path (str or os.PathLike) to a Zarr directory; got {out!r}") from None
        if path.exists() or path.is_symlink():
            return cls._open_existing(path, spec, tile=tile, tile_given=tile_given, resume=resume)
        if not path.parent.is_dir():
            raise StoreError(f"out={str(path)!r}: the folder {str(path.parent)!r} does not exist")
        if not os.access(path.parent, os.W_OK):
            raise StoreError(f"out={str(path)!r}: the folder {str(path.parent)!r} is not writable")
        try:
            return cls._create(path, dict(spec, tile=int(tile)))
        except _LostRace:
            log.info("store %s was created by another process at the same time; opening it as an "
                     "existing store", path)
            return cls._open_existing(path, spec, tile=tile, tile_given=tile_given, resume=resume)

    @classmethod
    def _open_existing(cls, path: Path, spec: dict, *, tile: int, tile_given: bool,
                       resume: bool) -> "GramStore":
        zarr = require_zarr()
        if not path.is_dir() or not (path / "zarr.json").is_file():
            raise StoreError(f"out={str(path)!r} exists and is not a Zarr (v3) store; refusing to touch it")
        try:
            g = zarr.open_group(str(path), mode="r")
            stored = dict(g.attrs.get("cntk_engine") or {})
        except Exception as e:
            raise StoreError(f"out={str(path)!r} cannot be read as a Zarr group: {e}") from None
        if stored.get("format") != FORMAT:
            raise StoreError(f"out={str(path)!r} is a Zarr group but not a cntk_engine Gram store "
                             "(no job record); refusing to touch it")
        diffs = spec_differences(stored, spec)
        if tile_given and int(stored.get("tile", -1)) != tile:
            diffs.append(f"tile: store has {stored.get('tile')}, this job {tile}")
        if diffs:
            raise StoreMismatch(f"out={str(path)!r} holds another job: " + "; ".join(diffs)
                                + ". Nothing was written; use another out= path for this job")
        missing = [n for n in list(array_names(tuple(spec["architecture"]["depths"]), spec["kernel"]).values())
                   + [DONE] if n not in g]
        if missing:
            raise StoreError(f"out={str(path)!r} is damaged: arrays {missing} are missing")
        n_done = int(np.count_nonzero(read_done(path, g[DONE], warn=False)))
        if not resume:
            raise StoreError(f"out={str(path)!r} exists (this same job, "
                             f"{n_done} of {len(cls._expected_tiles(stored))} tiles done); "
                             "pass --resume to continue it")
        log.info("resuming store %s (%d of %d tiles done)", path, n_done,
                 len(cls._expected_tiles(stored)))
        return cls(path, zarr.open_group(str(path), mode="r+"), stored)

    @staticmethod
    def _expected_tiles(spec: dict):
        return TileLayout(spec["n1"], spec["n2"], int(spec["tile"]), spec["symmetric"]).tiles()

    @classmethod
    def _create(cls, path: Path, spec: dict) -> "GramStore":
        zarr = require_zarr()
        t = spec["tile"]
        layout = TileLayout(spec["n1"], spec["n2"], t, spec["symmetric"])
        spec["grid"] = list(layout.grid)
        tmp = path.parent / f".{path.name}.partial-{uuid.uuid4().hex[:12]}"
        try:
            g = zarr.open_group(str(tmp), mode="w-")
            shape = (spec["n1"], spec["n2"])
            for (d, k), name in array_names(tuple(spec["architecture"]["depths"]), spec["kernel"]).items():
                parent = g
                if "/" in name:
                    grp, name = name.split("/")
                    parent = g.require_group(grp)
                    parent.attrs["depth"] = d
                parent.create_array(name, shape=shape, chunks=(min(t, shape[0]), min(t, shape[1])),
                                    dtype="float64", fill_value=float("nan"),
                                    attributes={"kernel": k, "depth": d})
            g.create_array(DONE, shape=layout.grid, chunks=(1, 1), dtype="int32", fill_value=0)
            g.attrs.update({"cntk_engine": spec, "runs": []})
            try:
                os.rename(tmp, path)   # atomic: a store that exists always has its job record
            except OSError as e:
                # another process created the store since the existence check (rename(2) onto a
                # non-empty directory: ENOTEMPTY, or EEXIST on some systems)
                if e.errno in (errno.ENOTEMPTY, errno.EEXIST) and path.is_dir():
                    raise _LostRace() from e
                raise
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        log.info("created store %s: %d x %d, tile %d, grid %s", path, *shape, t, layout.grid)
        return cls(path, zarr.open_group(str(path), mode="r+"), spec)

    # ------------------------------------------------------------------ tiles and runs
    def done_map(self, warn: bool = True) -> np.ndarray:
        """``tiles_done`` (an undecodable marker reads as 0: see :func:`read_done`)."""
        return read_done(self.path, self.group[DONE], warn=warn)

    def _chunk_files(self, i: int, j: int):
        """(array name, chunk key, file) of every data chunk tile (i, j) writes."""
        names = array_names(tuple(self.spec["architecture"]["depths"]), self.spec["kernel"]).values()
        keys = [(i, j)] + ([(j, i)] if self.spec["symmetric"] and i != j else [])
        for name in names:
            meta = self.group[name].metadata
            for ij in keys:
                key = meta.encode_chunk_key(ij)
                yield name, key, self.path / name / key

    def _damaged_data(self, t) -> str | None:
        """Why a finished tile's data cannot be trusted (a chunk file missing or empty), or None.
        One ``stat`` per chunk file; no data is read."""
        for name, key, f in self._chunk_files(t.i, t.j):
            try:
                size = f.stat().st_size
            except FileNotFoundError:
                return f"{name}/{key} is missing"
            if size == 0:
                return f"{name}/{key} is empty"
        return None

    def missing(self, tiles) -> list:
        """The tiles to compute: marker 0 (or unreadable), or marked done but with a data chunk
        file missing or empty (a warning names the store, array and chunk)."""
        done = self.done_map()
        todo = []
        for t in tiles:
            if done[t.i, t.j] == 0:
                todo.append(t)
                continue
            why = self._damaged_data(t)
            if why is not None:
                log.warning("store %s: tile (%d, %d) is marked done but its chunk %s; computing "
                            "it again", self.path, t.i, t.j, why)
                todo.append(t)
        return todo

    def not_done(self, tiles) -> list:
        """The tiles whose marker is 0 (or unreadable) now: re-read from the store."""
        done = self.done_map(warn=False)
        return [t for t in tiles if done[t.i, t.j] == 0]

    def begin_run(self, n_todo: int, where: str) -> int:
        runs = list(self.group.attrs.get("runs", []))
        run_id = len(runs) + 1
        runs.append({"run": run_id, "started": _dt.datetime.now().isoformat(timespec="seconds"),
                     "host": socket.gethostname(), "pid": os.getpid(), "where": where,
                     "tiles_to_compute": n_todo})
        self.group.attrs["runs"] = runs
        return run_id

    def end_run(self, run_id: int, seconds: float) -> None:
        runs = list(self.group.attrs.get("runs", []))
        for r in runs:
            if r.get("run") == run_id:
                r["finished"] = _dt.datetime.now().isoformat(timespec="seconds")
                r["seconds"] = round(seconds, 3)
        self.group.attrs["runs"] = runs

    def sink(self, job, run_id: int) -> StoreSink:
        return StoreSink(str(self.path), job.arch, job.params, job.kernel, job.symmetric, run_id,
                         job.scales)

    @property
    def read_only_group(self):
        return require_zarr().open_group(str(self.path), mode="r")


# ----------------------------------------------------------------------------- reading Grams
def kernel_arrays(group) -> list[str]:
    """The kernel arrays of a store's group ("ntk", "nngp", "depth_11/ntk", ...), sorted; the
    done markers are not among them."""
    return sorted(k for k, _ in group.arrays() if k != DONE) + sorted(
        f"{g}/{k}" for g, sub in group.groups() for k, _ in sub.arrays())


def unfinished_tiles(group) -> tuple[int, int]:
    """(tiles not computed yet, tiles in all) of a store's group; (0, 0) for a group without a
    job record."""
    spec = group.attrs.get("cntk_engine")
    if spec is None or DONE not in [k for k, _ in group.arrays()]:
        return 0, 0
    done = read_done("<group>", group[DONE], warn=False)
    todo = done == 0
    total = done.size
    if spec.get("symmetric"):
        todo = np.triu(todo)
        total = int(np.triu(np.ones_like(done)).sum())
    return int(todo.sum()), total


def _memory_limits(device, max_memory):
    """``[(where, bytes)]`` the load must fit in: host RAM, plus the GPU for device="cuda"."""
    if max_memory is not None:
        return [("the limit", int(max_memory))]
    if device == "cuda":
        return [("free GPU memory", available_gpu_memory()),
                ("available RAM", available_memory())]
    return [("available RAM", available_memory())]


def load_gram(source, key: str | None = None, *, max_memory: int | None = None,
              workspace: float = 1.0, device=None):
    """Load a Gram matrix from Zarr into memory as float64 (NumPy, or CuPy with device="cuda").

    ``source``: a ``zarr.Array``, a ``zarr.Group`` or the path of a store written by
    ``gram(..., out=path)``, with ``key`` naming the array (``"ntk"``, ``"nngp"``,
    ``"depth_11/ntk"``; default: the only kernel array).  The memory needed is the float64
    matrix plus ``workspace`` copies of it for the solve; it is logged, and if it exceeds
    ``max_memory`` (bytes; default: the available RAM, or with ``device="cuda"`` the free GPU
    memory, where the matrix and the solve go, while the host still holds the float64 matrix as
    it is read) :class:`~cntk_engine.solver.GramTooLarge` is raised before anything is read.
    ``workspace``: copies of K the solver needs beyond it: 1 for ``fit_ridge``,
    ``kernel_ridge``, ``gp_posterior`` (the default); 3 for ``eigh``, ``loo``, ``select_ridge``,
    ``kfold`` and ``gradient_flow`` (the figures behind them: ``docs/solver.md``).  Reading a
    non-float64 array also holds the raw array while converting it.  A store whose job is
    unfinished is refused (its missing tiles read as NaN)."""
    zarr = require_zarr()
    where = repr(str(source)) if isinstance(source, (str, os.PathLike)) else type(source).__name__
    if isinstance(source, (str, os.PathLike)):
        if not Path(source).exists():
            raise FileNotFoundError(f"Zarr store {str(source)!r} does not exist")
        try:
            source = zarr.open(str(source), mode="r")
        except Exception as e:  # noqa: BLE001 - not a store
            raise ValueError(f"{where} is not a readable Zarr store: {e}") from None
    if isinstance(source, zarr.Group):
        names = kernel_arrays(source)
        if key is None:
            if len(names) != 1:
                raise ValueError(f"the store at {where} holds arrays {names}: name one as key=")
            key = names[0]
        if key not in names:
            raise ValueError(f"the store at {where} has no array {key!r}; it holds {names}")
        left, total = unfinished_tiles(source)
        if left:
            raise ValueError(f"the Gram store at {where} is unfinished: {left} of {total} tiles are "
                             "not computed yet; rerun the gram job with --resume / the same out=")
        arr = source[key]
    elif isinstance(source, zarr.Array):
        arr = source
        if key is not None:
            raise ValueError("key= applies to a Zarr group or store path, not to a zarr.Array")
    else:
        raise ValueError(f"source must be a zarr.Array, a zarr.Group or a store path; got {type(source).__name__}")
    shape = tuple(arr.shape)
    if len(shape) != 2:
        raise ValueError(f"the Zarr array {key or ''} has shape {shape}; a kernel matrix is 2-D")
    if device not in DEVICES:
        raise ValueError(f"device must be one of {DEVICES}; got {device!r}")
    if np.dtype(arr.dtype).kind == "c":
        raise ValueError(f"the Zarr array {key or ''} is complex ({arr.dtype}); a Gram matrix is real")
    nbytes = shape[0] * shape[1] * 8
    raw = 0 if np.dtype(arr.dtype) == np.float64 else shape[0] * shape[1] * np.dtype(arr.dtype).itemsize
    need = nbytes + max(workspace * nbytes, raw)     # the solve, or the read + conversion
    for place, limit in _memory_limits(device, max_memory):
        # the host holds the float64 matrix (and the raw array) while reading for the GPU
        staging = place == "available RAM" and device == "cuda"
        want = nbytes + raw if staging else need
        what = (f"{format_bytes(want)} on the host to read it for the GPU" if staging else
                f"{format_bytes(need)} with the solve's workspace ({workspace:g} copies)")
        msg = (f"Gram {key or ''} {shape[0]} x {shape[1]} from {where}: {format_bytes(nbytes)} as "
               f"float64, {what}; {place} {format_bytes(limit)}")
        if want > limit:
            raise GramTooLarge(msg + ": does not fit. Free memory, raise max_memory, solve on a "
                               "larger machine, or use fewer training samples")
    log.info("loading " + msg)
    K = np.asarray(arr[...], dtype=np.float64)
    return cupy_module().asarray(K) if device == "cuda" else K
