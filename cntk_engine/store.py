"""Resumable, out-of-core Gram matrices in a Zarr group (``gram(..., out="path.zarr")``).

Layout of the group (zarr >= 3, a directory on a local or shared POSIX file system)
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
of ``tiles_done``.  Zarr's local store writes every chunk to a temporary file and renames it into
place, so a killed process leaves each chunk old or new, never half written, and a tile whose
marker is missing is simply computed again (same values, same bytes: writing a tile twice is
idempotent, which is also what makes retried Dask tasks safe).  The store itself is created in a
temporary directory next to ``out`` and renamed into place once complete, so a store that exists
always carries its job record.

Resuming
--------
Opening an existing store compares its job record with the job asked for; any difference
(images, architecture, dtype, backend, kernels, sizes, tile size when given explicitly, package
version) raises :class:`StoreMismatch` naming the differences, before anything is written.  When
the records agree only the tiles whose marker is 0 are computed.
"""
from __future__ import annotations

import datetime as _dt
import hashlib
import logging
import os
import shutil
import socket
import threading
import uuid
from pathlib import Path

import numpy as np

from .arch import Architecture, LayerParams, finalize

log = logging.getLogger("cntk_engine")

FORMAT = "cntk_engine.gram_store"
FORMAT_VERSION = 1
DONE = "tiles_done"


class StoreError(ValueError):
    """An ``out=`` store that cannot be used (not a store, exists without resume, ...)."""


class StoreMismatch(StoreError):
    """The store at ``out=`` belongs to another job."""


def _zarr():
    try:
        import zarr
    except ImportError as e:
        raise ImportError("out= needs zarr >= 3 (pip install 'cntk-engine[zarr]'): " + str(e)) from None
    if int(zarr.__version__.split(".")[0]) < 3:
        raise ImportError(f"out= needs zarr >= 3; zarr {zarr.__version__} is installed "
                          "(pip install -U 'zarr>=3')")
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


def job_spec(arch: Architecture, backend: str, dtype, kernel: str, x1: np.ndarray,
             x2: np.ndarray | None, image_shape) -> dict:
    """The job record (JSON) without the tile layout (added when the store is created)."""
    from . import __version__
    return {
        "format": FORMAT, "format_version": FORMAT_VERSION, "version": __version__,
        "backend": backend, "dtype": np.dtype(dtype).name,
        "architecture": arch.to_dict(), "kernel": kernel,
        "kernels": ["ntk", "nngp"] if kernel == "both" else [kernel],
        "n1": int(len(x1)), "n2": int(len(x1) if x2 is None else len(x2)),
        "image_shape": [int(v) for v in image_shape], "symmetric": x2 is None,
        "fingerprint": {"x1": fingerprint(x1), "x2": None if x2 is None else fingerprint(x2)},
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
        if a.get(k, "<missing>") != b[k]:
            name = {"fingerprint.x1": "images x1 (sha256)", "fingerprint.x2": "images x2 (sha256)"}.get(k, k)
            diffs.append(f"{name}: store has {_short(a.get(k, '<missing>'))}, this job {_short(b[k])}")
    return diffs


class TileWriter:
    """Writes finalized tiles into a store and marks them done; picklable (path + numbers), so
    Dask workers open the same store themselves.  Each process opens the arrays once."""

    def __init__(self, path: str, arch: Architecture, params: LayerParams, kernel: str,
                 symmetric: bool, run_id: int):
        self.path, self.arch, self.params = str(path), arch, params
        self.kernel, self.symmetric, self.run_id = kernel, symmetric, run_id
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
                zarr = _zarr()
                g = zarr.open_group(self.path, mode="r+")
                arrays = {key: g[name] for key, name in array_names(self.arch.depths, self.kernel).items()}
                self._done = g[DONE]
                self._arrays = arrays
        return self._arrays

    def __call__(self, t, sums: np.ndarray) -> None:
        arrays = self._open()
        for d, res in finalize(np.asarray(sums), self.arch, self.params, self.kernel).items():
            for k, v in res.items():
                a = arrays[(d, k)]
                a[t.rows, t.cols] = v
                if self.symmetric and not t.diag:
                    a[t.cols, t.rows] = np.ascontiguousarray(v.T)
        self._done[t.i, t.j] = self.run_id   # only after every chunk of the tile is in place


class GramStore:
    """An open store of one job (see the module docstring)."""

    def __init__(self, path: Path, group, spec: dict):
        self.path, self.group, self.spec = path, group, spec
        self.tile = int(spec["tile"])

    # ------------------------------------------------------------------ open / create
    @classmethod
    def open_for_job(cls, out, spec: dict, *, tile: int, tile_given: bool, resume: bool = True) -> "GramStore":
        """Create the store for ``spec`` or, if ``out`` holds this very job, reopen it.

        ``resume=False``: an existing ``out`` is an error (the CLI without --resume).
        """
        zarr = _zarr()
        try:
            path = Path(os.fspath(out)).expanduser().absolute()
        except TypeError:
            raise StoreError(f"out must be a path (str or os.PathLike) to a Zarr directory; got {out!r}") from None
        if path.exists() or path.is_symlink():
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
            if not resume:
                raise StoreError(f"out={str(path)!r} exists (this same job, "
                                 f"{cls._done_count(g)} of {len(cls._expected_tiles(stored))} tiles done); "
                                 "pass --resume to continue it")
            missing = [n for n in list(array_names(tuple(spec["architecture"]["depths"]), spec["kernel"]).values())
                       + [DONE] if n not in g]
            if missing:
                raise StoreError(f"out={str(path)!r} is damaged: arrays {missing} are missing")
            log.info("resuming store %s (%d of %d tiles done)", path, cls._done_count(g),
                     len(cls._expected_tiles(stored)))
            return cls(path, zarr.open_group(str(path), mode="r+"), stored)
        if not path.parent.is_dir():
            raise StoreError(f"out={str(path)!r}: the folder {str(path.parent)!r} does not exist")
        if not os.access(path.parent, os.W_OK):
            raise StoreError(f"out={str(path)!r}: the folder {str(path.parent)!r} is not writable")
        return cls._create(path, dict(spec, tile=int(tile)))

    @staticmethod
    def _expected_tiles(spec: dict):
        from .scheduler import TileLayout
        return TileLayout(spec["n1"], spec["n2"], int(spec["tile"]), spec["symmetric"]).tiles()

    @staticmethod
    def _done_count(g) -> int:
        return int(np.count_nonzero(g[DONE][...]))

    @classmethod
    def _create(cls, path: Path, spec: dict) -> "GramStore":
        from .scheduler import TileLayout
        zarr = _zarr()
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
            os.rename(tmp, path)   # atomic: a store that exists always has its job record
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        log.info("created store %s: %d x %d, tile %d, grid %s", path, *shape, t, layout.grid)
        return cls(path, zarr.open_group(str(path), mode="r+"), spec)

    # ------------------------------------------------------------------ tiles and runs
    def done_map(self) -> np.ndarray:
        return np.asarray(self.group[DONE][...])

    def missing(self, tiles) -> list:
        done = self.done_map()
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

    def sink(self, arch: Architecture, params: LayerParams, kernel: str, run_id: int) -> TileWriter:
        return TileWriter(str(self.path), arch, params, kernel, bool(self.spec["symmetric"]), run_id)

    @property
    def read_only_group(self):
        return _zarr().open_group(str(self.path), mode="r")
