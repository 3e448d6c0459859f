"""Resumable, verifiable, out-of-core Gram matrices in a Zarr group (``gram(..., out="path.zarr")``).

This module alone knows the store's format: the layout below, the job record, the done markers
and checksums, the run records and tile claims, the zarr version it needs; :func:`load_gram`,
:func:`load_train_test`, :func:`kernel_arrays`, :func:`verify_store` and :func:`add_checksums`
read and check stored Grams for the solver and the command line.

Layout of the group (format 2; zarr >= 3.1.3, a directory on a local or shared POSIX file system)
------------------------------------------------------------------------------------------------
* One depth: ``group["ntk"]`` and/or ``group["nngp"]``, each an (N1, N2) float64 array.
* Several depths (``depths=[...]``): ``group["depth_<d>/ntk"]``, ``group["depth_<d>/nngp"]``.
* Only the kernels asked for are stored (``kernel="ntk"``: ntk only; ``"both"``: both).
* Chunks are the tiles: chunk (i, j) is tile (i, j), ``tile`` x ``tile`` entries, encoded
  bytes -> zstd -> crc32c (zarr's codecs: a chunk whose bytes changed fails to decode).  A
  symmetric Gram is stored full: each off-diagonal tile is written at (i, j) and, transposed,
  at (j, i) (its mirror).  Entries of tiles not computed yet read as NaN (the fill value).
* ``group["tiles_done"]``: int32 (grid rows, grid cols), one chunk per tile: 0 = not done, k =
  written completely by run k (for a symmetric job only tiles on or above the diagonal are
  computed; the others stay 0 and their chunks are the mirrors).
* ``group["tiles_checksum"]``: uint64 (grid rows, grid cols, arrays, 2), one chunk per tile:
  ``[i, j, a, 0]`` is the checksum of chunk (i, j) of array a, ``[i, j, a, 1]`` that of its
  mirror chunk (j, i) (0 where there is none); arrays in the order of the job record's
  ``integrity.arrays``.  A checksum is the first 8 bytes (little-endian) of the sha256 of
  ``"cntk_engine chunk\0<array>\0<row>,<col>\0<rows>,<cols>\0"`` followed by the chunk's
  float64 values (C order, little-endian, only the entries inside the matrix): it is bound to
  the array and the position, so a valid chunk copied to another place, or another array,
  fails too.  (0 means "none"; a digest that is 0 is stored as 1.)
* ``group.attrs["cntk_engine"]``: the job: format, format_version (2), package version,
  backend, compute dtype, architecture (depths, pooling, fix, convention, W_std, b_std,
  filter_size; LAP's window, flip, a stack's layers), kernel(s), ``n1``, ``n2``, image shape,
  symmetric, ``fingerprint`` (the sha256 of each image set's float64 NCHW values, so uint8 /
  float32 / NHWC copies of the same images match), the tile layout and ``integrity`` (checksum
  kind, arrays, chunk codec).
* ``group["runs"]``: one subgroup ``runs/<k>`` per run k, its attributes the run's record
  (id, host, pid, where, started, tiles to compute, tiles verified and failed, ``compute``:
  the backends' ``compute_record`` of each distinct device, what decides the tiles' bits; at
  the end finished, seconds, tiles computed, outcome, and a Dask run's ``compute``: the
  records its workers returned with their tiles).  Each run writes only its own record,
  so concurrent runs never overwrite each other's.
* ``group["claims"]``: while a tile is being computed, a plain JSON file ``claims/<i>.<j>``
  names its owner (host, pid, run, claim id); see "Many writers".  (zarr's deep listings
  warn about these files: they are not zarr nodes.)

Crash safety
------------
A tile is written completely or not at all: its data chunks (and mirrors) are written first,
then its checksums, then its entry of ``tiles_done``.  Zarr's local store (zarr >= 3.1.3,
zarr-python PR #3412; older versions are refused) writes every chunk to a temporary file and
renames it into place, so a killed process leaves each chunk old or new, never half written,
and a tile whose marker is missing is simply computed again (same values, same bytes: writing
a tile twice is idempotent, which also makes retried Dask tasks and the rare duplicate of a
claim takeover safe).  The store itself is created in a temporary directory next to ``out``
and renamed into place once complete, so a store that exists always carries its job record.

Integrity and verification
--------------------------
Damage done from outside (a file system that lost, truncated or overwrote files; a chunk
copied over another) is found by reading the finished tiles back: every chunk of a finished
tile must decode (crc32c) and match its recorded checksum.  :meth:`GramStore.missing` does this
whenever an existing store is opened to compute (``--resume``; every tile that fails is
computed again, with a warning naming the store, the array, the tile and the chunk),
:func:`verify_store` (``cntk-engine verify``) reports it without computing, and
:func:`load_gram` checks every chunk it loads and refuses a store that fails, naming the tile.
A ``tiles_done`` chunk that cannot be decoded counts as "not done" (a warning names the store
and the tile).

Many writers
------------
Several processes may work on one store at once (a SLURM job array, nodes sharing a file
system, two shells): before computing a tile a writer claims it by creating
``claims/<i>.<j>`` atomically (``os.link`` of a complete temporary file: exactly one creator
wins, also on NFS), then re-reads the tile's marker (another writer may have finished it), and
removes the claim after the marker is written.  A background thread touches the claims a
process holds every ``claim_timeout / 4`` seconds.  A claim is stale when its owner's process
is gone (on the owner's host, boot and pid namespace, where a running owner's claim is never
stale), or, seen from another host, it was not touched for the owner's ``claim_timeout``
seconds (recorded in the claim: a writer given a shorter timeout does not take over the live
claims of writers renewing at a longer one; the hosts' clocks and the file system's must agree
to well within it); a stale claim is
taken over atomically (one winner per stale claim, via a takeover file named after the stale
claim's id) with a warning; a stale claim of a finished tile (its writer died between the
marker and the release) is removed by the next writer that opens the store.  A claim is
removed (released, or removed as stale) only under that same takeover file, so a removal and a
takeover of one claim never interleave (the removal would unlink the taker's new claim).  A writer whose
claim was taken over all the same (its process stalled beyond its timeout) finds that out before
it writes the tile's data and again before its checksums and marker, and leaves the tile to the
writer that took it over (a warning says so; data it wrote before the second check is the same
bytes where the two compute alike, else a tile whose data and checksums disagree, which verify
names and a resume repairs).  A writer that
runs out of tiles to claim waits, polling, until
the tiles claimed by others are done (or their claims go stale and it takes them over), so
every writer returns a complete store.

Resuming
--------
Opening an existing store compares its job record with the job asked for; any difference
(images, architecture, dtype, backend, kernels, sizes, tile size when given explicitly, package
version) raises :class:`StoreMismatch` naming the differences, before anything is written.  The
depths are compared as a set (``depths=[4, 3]`` resumes a store made with ``[3, 4]``; new
records list them sorted).  When the records agree, the finished tiles are verified and the
tiles whose marker is 0, or that failed, are computed.  ``out=`` may be a :class:`StorePath`
that refuses an existing store (the command line without ``--resume`` / ``--join``).

Format 1 (no checksums)
-----------------------
Stores written before checksums (format_version 1: no ``tiles_checksum``, no crc32c codec, run
records in ``attrs["runs"]``) are still read (:func:`load_gram` warns that they cannot be
verified) but not resumed: :func:`add_checksums` (``cntk-engine verify STORE --add-checksums``)
records checksums of the data as it is now and converts the store to format 2 in place.
"""
from __future__ import annotations

import datetime as _dt
import errno
import functools
import glob
import hashlib
import json
import logging
import math
import os
import re
import shutil
import socket
import stat
import sys
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..arch import KERNELS, kernel_names
from ..arrays import (DEVICES, available_gpu_memory, available_memory, cupy_module, format_bytes,
                      to_host)
from ..inputs import as_images
from ..spelling import arg, arg_prefix, option, settable
from ..version import __version__
from .sinks import Sink
from .tiles import TileLayout

log = logging.getLogger("cntk_engine")

FORMAT = "cntk_engine.gram_store"
FORMAT_VERSION = 2
DONE = "tiles_done"
CHECKSUMS = "tiles_checksum"
RUNS = "runs"
CLAIMS = "claims"
BOOKKEEPING = (DONE, CHECKSUMS, RUNS, CLAIMS)     # members of the group that are not kernels
CHECKSUM_KIND = "sha256-64 of the chunk's float64 values, bound to array and chunk position"
CLAIM_TIMEOUT = 600.0  # seconds without a heartbeat after which a claim is stale (default)
ZARR_MIN = (3, 1, 3)   # atomic chunk writes (temporary file + rename): zarr-python PR #3412
HOST = socket.gethostname()


class StoreError(ValueError):
    """An ``out=`` store that cannot be used (not a store, exists without resume, ...)."""


class StoreMismatch(StoreError):
    """The store at ``out=`` belongs to another job; ``differences``: what differs, one line
    per field ("architecture.depths: store has [3], this job [4]")."""

    def __init__(self, message: str, differences=()):
        super().__init__(message)
        self.differences = list(differences)


class StoreExists(StoreError):
    """``out=StorePath(..., existing="refuse")`` found a store of this job (``race``: another
    process created it at the same moment).  The message names the Python way to continue it;
    the command line words its own (``--resume`` / ``--join``) from ``path`` and ``race``."""

    def __init__(self, path, *, race: bool = False, done: str = ""):
        self.path, self.race = str(path), race
        if race:
            what = (f"out={self.path!r} was created by another process while this one was "
                    "creating it; nothing was written")
        else:
            what = (f"out={self.path!r} exists ({done}) and StorePath(..., existing='refuse') "
                    "refuses an existing store")
        super().__init__(f"{what}. To continue it (together with any process working on it) "
                         f"pass out={self.path!r} as a plain path or StorePath(..., "
                         "existing='resume'); or choose another path")


class StoreCorrupt(StoreError):
    """A finished tile of a store fails verification (see :func:`verify_store`)."""


class GramTooLarge(MemoryError, ValueError):
    """A stored Gram would not fit in the memory allowed (``max_memory``).  ``limit``: the
    memory it does not fit in ("the limit", "available RAM" or "free GPU memory");
    ``staging``: the host's memory to read it for the GPU, which the solve's workspace does not
    change; ``n``: the side of the (training) Gram."""

    def __init__(self, msg: str, limit: str = "available RAM", staging: bool = False,
                 n: int | None = None):
        super().__init__(msg)
        self.limit, self.staging, self.n = limit, staging, n


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
        from ..version import install_hint
        raise ImportError(f"{arg('out')} needs zarr >= {need} ({install_hint('zarr')}): {e}") from None
    if _version_tuple(zarr.__version__) < ZARR_MIN:
        raise ImportError(f"{arg('out')} needs zarr >= {need} (its local store writes each chunk to a "
                          f"temporary file and renames it, which the store's crash safety relies "
                          f"on); zarr {zarr.__version__} is installed (pip install -U 'zarr>={need}')")
    if sys.flags.optimize and not _reads_groups_when_optimized():
        raise RuntimeError(f"zarr {zarr.__version__} cannot read a group's metadata under python -O "
                           "(PYTHONOPTIMIZE): it removes a field with an assert, which -O skips "
                           "(zarr/core/group.py); run Python without -O to use Gram stores")
    return zarr


@functools.lru_cache(maxsize=None)
def _reads_groups_when_optimized() -> bool:
    """Whether zarr parses a group's metadata in this (optimised) interpreter: zarr 3.1.6's
    ``GroupMetadata.from_dict`` drops ``node_type`` inside an assert, and every store operation
    then fails with a TypeError."""
    try:
        from zarr.core.group import GroupMetadata
        GroupMetadata.from_dict({"zarr_format": 3, "node_type": "group", "attributes": {}})
    except TypeError:
        return False
    except Exception:  # noqa: BLE001 - another zarr's internals: not known to fail, not refused
        return True
    return True


class StorePath(os.PathLike):
    """``out=`` with a policy for a store that already exists.

    ``existing="resume"`` (what a plain path means): a store of this same job is continued,
    together with any other process working on it.  ``existing="refuse"``: an existing store
    is an error, also one that another process creates at the same moment (the command line
    without ``--resume`` / ``--join``).  ``claim_timeout``: seconds without a heartbeat after
    which another writer's claim on a tile is stale and taken over (default
    :data:`CLAIM_TIMEOUT`)."""

    def __init__(self, path, *, existing: str = "resume", claim_timeout: float | None = None):
        if existing not in ("resume", "refuse"):
            raise ValueError(f"existing must be 'resume' or 'refuse'; got {existing!r}")
        if claim_timeout is not None:
            given = claim_timeout
            try:
                claim_timeout = float(claim_timeout)
            except (TypeError, ValueError):
                claim_timeout = float("nan")
            if not (0 < claim_timeout < float("inf")):
                raise ValueError("claim_timeout must be a positive number of seconds; got "
                                 f"{given!r}")
        self.path = os.fspath(path)
        self.existing, self.claim_timeout = existing, claim_timeout

    def __fspath__(self) -> str:
        return self.path

    def __repr__(self) -> str:
        return f"StorePath({self.path!r}, existing={self.existing!r}, claim_timeout={self.claim_timeout!r})"


def fingerprint(x: np.ndarray) -> str:
    """sha256 of an image array's shape and float64 C-order values."""
    x = np.ascontiguousarray(x, dtype=np.float64)
    h = hashlib.sha256(f"float64{tuple(x.shape)}".encode())
    flat = x.reshape(-1).view(np.uint8)
    step = 1 << 26
    for i in range(0, flat.size, step):
        h.update(flat[i:i + step].data)
    return h.hexdigest()


def chunk_checksum(name: str, chunk: tuple[int, int], values: np.ndarray) -> int:
    """The checksum of chunk ``chunk`` = (row, col) of array ``name`` holding ``values`` (the
    entries inside the matrix): see the module docstring.  Never 0 (0 means "none")."""
    v = np.ascontiguousarray(values, dtype="<f8")
    h = hashlib.sha256(b"cntk_engine chunk\0%s\0%d,%d\0%d,%d\0" % (
        name.encode(), chunk[0], chunk[1], v.shape[0], v.shape[1]))
    h.update(v.reshape(-1).view(np.uint8).data)
    return int.from_bytes(h.digest()[:8], "little") or 1


def array_names(depths, kernel: str) -> dict[tuple[int, str], str]:
    """{(depth, kernel name): array path in the group} for a job."""
    kernels = kernel_names(kernel)
    single = len(depths) == 1
    return {(d, k): (k if single else f"depth_{d}/{k}") for d in depths for k in kernels}


def _spec_arrays(spec: dict) -> list[str]:
    """The kernel arrays of a job record, in the order of the checksum record."""
    integ = spec.get("integrity") or {}
    if integ.get("arrays"):
        return list(integ["arrays"])
    return sorted(array_names(tuple(spec["architecture"]["depths"]), spec["kernel"]).values())


def job_spec(job) -> dict:
    """The job record (JSON) of a :class:`~cntk_engine.jobs.GramJob`, without the tile layout
    and integrity record (added when the store is created)."""
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


def _field_name(key: str) -> str:
    """A record field as the caller knows it: the option that sets it on the command line
    (``architecture.depths`` -> ``--depths``, ``architecture.name`` -> ``--architecture``), the
    images by their argument (``DATA (sha256)``, ``--x2 (count)``; ``images x1 (sha256)`` in
    Python), else the record's own key."""
    def of(param):                     # "images x1" in Python, "DATA" / "--x2" as options
        return option(param) or f"images {param}"
    images = {"fingerprint.x1": f"{of('x1')} (sha256)", "fingerprint.x2": f"{of('x2')} (sha256)",
              "n1": f"{of('x1')} (count)", "n2": f"{of('x2')} (count)",
              "symmetric": "symmetric (one set of images)"}
    if key in images:
        return images[key]
    param = key.removeprefix("architecture.")
    return option("architecture" if param == "name" else param) or key


_ARCH_DEFAULTS = {"architecture.flip": False, "architecture.lap_window": None,
                  "architecture.name": None,           # a preset's name; None: cnn or serial(...)
                  "architecture.layers": None}         # None: the cnn (depth - 1 conv layers)


def _network(r: dict) -> str:
    """The network of a flattened record as the caller chose it: 'cnn', a preset's name, or
    ``serial(...)`` with its layers."""
    layers = r.get("architecture.layers")
    if layers is None:
        return "'cnn'"
    name = r.get("architecture.name")
    return repr(name) if name else f"serial(...) of layers {layers}"


def spec_differences(stored: dict, wanted: dict,
                     sides: tuple[str, str] = ("store has", "this job")) -> list[str]:
    """Human-readable differences between two job records (layout and integrity keys excluded),
    each named as the caller sets it (:func:`_field_name`), with the words ``sides`` before
    the values of ``stored`` and ``wanted``."""
    # a key a record leaves out has its default (to_dict writes flip and lap_window only where
    # they are set); the second image set of a symmetric job is the first
    a, b = ({**_ARCH_DEFAULTS, **_flat(r)} for r in (stored, wanted))
    if a.get("symmetric") and b.get("symmetric"):
        for r in (a, b):
            r.pop("n2", None)
            r.pop("fingerprint.x2", None)
    diffs = []
    # every key of either record: a stack's record has keys (its layers) that a CNN's has not;
    # the tile layout and the integrity record are not part of the job
    for k in list(b) + [k for k in a if k not in b]:
        if k in ("tile", "grid") or k.startswith(("integrity.", "upgraded_from.")):
            continue
        if k == "dtype" and "reference" in (a.get("backend"), b.get("backend")):
            # the reference computes in float64 whatever dtype says (stores that 0.x versions
            # of it wrote record the dtype asked for, float32): with it on either side the
            # dtype follows the backend, whose difference is said
            continue
        if k == "kernels" and a.get("kernel") != b.get("kernel"):
            continue                          # derived from "kernel", whose difference is said
        if k in ("architecture.name", "architecture.layers"):
            # the layers decide (a preset and its serial(...) spelling are one network); a
            # difference is said once, by the preset names where both have one
            if k == "architecture.layers" and a.get(k) != b.get(k):
                diffs.append(f"{option('architecture') or 'architecture'}: {sides[0]} "
                             f"{_network(a)}, {sides[1]} {_network(b)}")
            continue
        if k == "architecture.depths" and isinstance(a.get(k), list) and isinstance(b.get(k), list):
            # a set of readouts: stores written before records were sorted may list them unsorted
            da, db = sorted(a[k]), sorted(b[k])
            if da != db and len(da) == len(db) == 1:     # one depth each: as depth= / --depth
                diffs.append(f"{option('depth') or 'depth'}: {sides[0]} {da[0]}, {sides[1]} {db[0]}")
            elif da != db:
                diffs.append(f"{_field_name(k)}: {sides[0]} {da}, {sides[1]} {db}")
            continue
        if a.get(k, "<missing>") != b.get(k, "<missing>"):
            diffs.append(f"{_field_name(k)}: {sides[0]} {_short(a.get(k, '<missing>'))}, {sides[1]} "
                         f"{_short(b.get(k, '<missing>'))}"
                         + (" (the pixel values or their order differ: e.g. uint8 pixels against "
                            "the same images divided by 255, or another subset or order)"
                            if k.startswith("fingerprint.") and isinstance(a.get(k), str)
                            and isinstance(b.get(k), str) else ""))
    return diffs


def _format_error(path, stored: dict) -> str | None:
    """Why a store's format version cannot be resumed by this package, or None."""
    v = stored.get("format_version")
    if v == FORMAT_VERSION:
        return None
    if v == 1:
        return (f"{str(path)!r} is a Gram store of format 1, which records no per-tile checksums, "
                "so its finished tiles cannot be verified. If its data is what you want, add "
                f"checksums of the data as it is now with `cntk-engine verify {path} "
                "--add-checksums` (Python: cntk_engine.jobs.store.add_checksums(path)); it can "
                "then be resumed and verified")
    return (f"{str(path)!r} is a Gram store of format {v!r}; this cntk_engine "
            f"({__version__}) reads formats 1 and {FORMAT_VERSION}: use the version that wrote it")


#: A store is created under a temporary name in milliseconds: one older than this was left by
#: a creator killed meanwhile, and is removed by the next job that creates or opens that store.
PARTIAL_MAX_AGE = 600.0


def _partial_prefix(path: Path) -> str:
    """The name prefix of the temporary folders creations of the store at ``path`` make beside
    it: ".NAME.partial-", NAME cut to its first 200 bytes plus a hash of the whole name where it
    is longer (a store name of up to 255 bytes, the file system's limit, keeps a legal
    temporary name; the hash keeps two long names sharing 200 bytes apart)."""
    raw = os.fsencode(path.name)
    if len(raw) > 200:
        raw = raw[:200] + b"~" + hashlib.sha256(raw).hexdigest()[:8].encode()
    return f".{os.fsdecode(raw)}.partial-"


def _sweep_partials(path: Path) -> None:
    """Remove what writers killed in the middle of an atomic step left (older than
    :data:`PARTIAL_MAX_AGE`; each step takes milliseconds): the temporary folders of earlier
    creations of the store at ``path``, and in the store the temporary run groups
    (``runs/.new-*``), claim files (``claims/.<i>.<j>.<id>.tmp``) and the markers of a claim's
    takeover or removal (``claims/.<i>.<j>.over.<id>``: the next takeover of that claim removes
    one left; a claim gone since leaves it for this).  Every listing of the store skips them;
    this keeps them from piling up."""
    now = time.time()
    left = [(p, "a creation of the store")
            for p in path.parent.glob(glob.escape(_partial_prefix(path)) + "*")]
    left += [(p, "a new run's record") for p in (path / RUNS).glob(".new-*")]
    left += [(p, "a claim") for p in (path / CLAIMS).glob(".*.tmp")]
    left += [(p, "a claim's takeover or removal") for p in (path / CLAIMS).glob(".*.over.*")]
    for p, what in left:
        try:
            if p.is_symlink() or now - p.stat().st_mtime <= PARTIAL_MAX_AGE:
                continue
            if p.is_dir():
                shutil.rmtree(p, ignore_errors=True)
            else:
                p.unlink()
            log.info("removed %s, left by %s that was killed midway", p, what)
        except OSError:
            pass


# ----------------------------------------------------------------------------- claims
def _pid_namespace() -> str | None:
    try:
        return os.readlink("/proc/self/ns/pid")
    except OSError:
        return None


PID_NAMESPACE = _pid_namespace()


def _boot_id() -> str | None:
    """This boot of this machine's kernel: two machines of one hostname (cloned VMs, containers
    given the same name) share the initial pid namespace's id, never their boot id."""
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            return f.read().strip() or None
    except OSError:
        return None


BOOT_ID = _boot_id()


def _boot_time() -> float | None:
    """When this machine booted (seconds since the epoch; /proc/stat's btime), or None."""
    try:
        with open("/proc/stat") as f:
            for line in f:
                if line.startswith("btime "):
                    return float(line.split()[1])
    except (OSError, ValueError, IndexError):
        pass
    return None


BOOT_TIME = _boot_time()


def _proc_start(pid: int) -> int | None:
    """The start time of process ``pid`` (clock ticks since boot, /proc/<pid>/stat field 22),
    or None where /proc does not say."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            return int(f.read().rsplit(b")", 1)[1].split()[19])
    except (OSError, IndexError, ValueError):
        return None


def _pid_alive(pid: int, start: int | None = None) -> bool:
    """Whether process ``pid`` of this host (and pid namespace) is running: not a zombie, and,
    when ``start`` is given and /proc tells, the process that started then (not a later
    process that reuses the pid)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:          # PermissionError: another user's process, alive
        return True
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            fields = f.read().rsplit(b")", 1)[1].split()
    except OSError:
        return True
    if fields and fields[0] == b"Z":
        return False
    return start is None or len(fields) < 20 or int(fields[19]) == start


class _Heartbeat:
    """One daemon thread per process that touches (``os.utime``) every claim file the process
    holds, each at its own interval."""

    def __init__(self):
        self.lock = threading.Lock()
        self.paths: dict[str, float] = {}     # claim file -> interval (s)
        self.thread = None

    def add(self, path: str, interval: float) -> None:
        with self.lock:
            self.paths[path] = interval
            if self.thread is None or not self.thread.is_alive():
                self.thread = threading.Thread(target=self._run, name="cntk-claims", daemon=True)
                self.thread.start()

    def remove(self, path: str) -> None:
        with self.lock:
            self.paths.pop(path, None)

    def _run(self) -> None:
        last: dict[str, float] = {}
        while True:
            with self.lock:
                items = list(self.paths.items())
            now = time.monotonic()
            for p, interval in items:
                if now - last.get(p, now) >= interval:
                    try:
                        os.utime(p)
                    except OSError:
                        pass
                    last[p] = now
                last.setdefault(p, now)
            for p in [p for p in last if p not in self.paths]:
                del last[p]
            step = min((i for _, i in items), default=1.0)
            time.sleep(max(0.02, min(step / 4, 1.0)))


_HEARTBEAT = _Heartbeat()
#: How long a release or a stale claim's removal waits for a claim's marker that another
#: writer holds (each holds one for milliseconds), before it leaves the claim to that writer.
MARK_WAIT = 1.0


def _identity(timeout: float) -> dict:
    """This process as its claims and markers record it, for :meth:`Claims.staleness`: its
    host, boot, pid namespace, pid and start time, and the claim timeout it renews at."""
    pid = os.getpid()
    return {"host": HOST, "pid": pid, "pstart": _proc_start(pid), "pidns": PID_NAMESPACE,
            "boot": BOOT_ID, "timeout": timeout}


def _unlink_quietly(p: Path) -> None:
    try:
        os.unlink(p)
    except OSError:
        pass
_CLAIM_NAME = re.compile(r"^(\d+)\.(\d+)$")
_HELD: set[str] = set()        # ids of the claims this process holds (any store, any thread)
_HELD_LOCK = threading.Lock()


@dataclass
class Claim:
    """A claim file as found on disk: tile, owner record (None if unreadable), age, and whether
    (and why) it is stale."""
    tile: tuple[int, int]
    owner: dict | None
    age: float
    stale: str | None

    def who(self) -> str:
        o = self.owner or {}
        return f"{o.get('host', '?')}:{o.get('pid', '?')} (run {o.get('run', '?')})"


class Claims:
    """The claims of one store (``<store>/claims``) as seen by one process.

    ``owner``: the record this process writes into its claims (run, host, pid, ...).  Thread
    safe; a process holds at most one claim per tile."""

    def __init__(self, store_path, timeout: float, owner: dict):
        self.dir = Path(store_path) / CLAIMS
        self.timeout = float(timeout)
        self.owner = dict(owner)
        self.held: dict[tuple[int, int], str] = {}     # tile -> claim id
        self.lock = threading.Lock()

    def _file(self, i: int, j: int) -> Path:
        return self.dir / f"{i}.{j}"

    def _read(self, f: Path):
        """(owner record or None, mtime) of a claim file; FileNotFoundError if it is gone.  A
        symbolic link (never a claim's: damaged, or put there) is judged by its own age."""
        st = os.lstat(f)
        if stat.S_ISLNK(st.st_mode):
            return None, st.st_mtime
        try:
            owner = json.loads(f.read_text())
            if not isinstance(owner, dict):
                owner = None
        except FileNotFoundError:
            raise
        except (OSError, ValueError):
            owner = None           # being written, or damaged: judged by its age alone
        return owner, st.st_mtime

    def staleness(self, owner: dict | None, mtime: float) -> str | None:
        """Why a claim with this owner record and modification time is stale, or None.  On the
        owner's own host (boot and pid namespace) the owner's process decides: gone (or its pid
        reused) = stale, running = live whatever the claim's age; elsewhere the age does,
        against the owner's timeout (it renews at a quarter of it; this observer's own for a
        record that does not say it)."""
        now = time.time()
        age = now - mtime
        timeout = (owner or {}).get("timeout")
        if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or not \
                0 < timeout < float("inf"):
            timeout = self.timeout
        boot = (owner or {}).get("boot")
        this_host = owner is not None and owner.get("host") == HOST and \
            owner.get("pidns") == PID_NAMESPACE
        if this_host and boot is not None and BOOT_ID is not None and boot != BOOT_ID:
            # this machine before a reboot, or another of this name (a clone): the latter's
            # claims are renewed every timeout / 4, so one not renewed since this boot, half a
            # timeout after it, is the former's, whose process is gone
            if BOOT_TIME is not None and mtime < BOOT_TIME and now - BOOT_TIME > timeout / 2:
                return "it was left before this machine's last boot"
        elif this_host:
            pid = owner.get("pid")
            if pid == os.getpid():
                with _HELD_LOCK:
                    mine = owner.get("claim") in _HELD
                return None if mine else "it was left by this process"
            if isinstance(pid, int):
                start = owner.get("pstart")
                if _pid_alive(pid, start if isinstance(start, int) else None):
                    return None
                return f"its process {HOST}:{pid} is gone"
        if age > timeout:
            return f"it was not renewed for {age:.0f} s (claim timeout {timeout:g} s)"
        return None

    def _tmp(self, i: int, j: int, claim_id: str) -> Path:
        """A complete file of this process's record for claim (or marker) ``claim_id`` of tile
        (i, j), to be linked into place: who it is (:func:`_identity`, so that every record,
        an observer's markers too, is judged by its process), then ``owner``."""
        rec = dict(_identity(self.timeout), **self.owner, tile=[i, j], claim=claim_id,
                   since=_dt.datetime.now().isoformat(timespec="seconds"))
        tmp = self.dir / f".{i}.{j}.{claim_id}.tmp"
        tmp.write_text(json.dumps(rec))
        return tmp

    @staticmethod
    def _key(owner: dict | None, mtime: float) -> str:
        """What names one claim: its id, or its file's mtime where the record cannot be read."""
        return (owner or {}).get("claim") or f"mtime-{mtime!r}"

    def _over(self, i: int, j: int, key: str) -> Path:
        return self.dir / f".{i}.{j}.over.{key}"

    def _mark(self, i: int, j: int, key: str, tmp: Path) -> bool | None:
        """Take the marker of claim ``key`` of tile (i, j) (``os.link`` of ``tmp``, this process's
        record): True if taken; False if a live writer holds it (taking that claim over or
        removing it), or is breaking a dead writer's; None if a dead writer's was broken (try
        again).  Only the holder of a claim's marker replaces or removes that claim, so a claim
        read under it stays as read."""
        over = self._over(i, j, key)
        try:
            os.link(tmp, over)
            return True
        except FileExistsError:
            pass
        try:
            holder = self._read(over)
        except FileNotFoundError:
            return None                           # given back meanwhile
        if self.staleness(*holder) is None:
            return False
        # its holder died under it.  It is unlinked only under a lock named after that holder's
        # record, and only while it still is that record: two writers that both judged it dead
        # would otherwise each unlink by name, the second the marker the first took since.
        dead = self._key(*holder)
        lock = over.with_name(f"{over.name}.break.{dead}")
        try:
            os.link(tmp, lock)
        except FileExistsError:
            # another writer breaks it, or died doing so: its lock (its record) is judged as a
            # marker is, and one left by a dead writer is removed (else the tile waited for the
            # sweep, silently)
            try:
                if self.staleness(*self._read(lock)) is None:
                    return False
                os.unlink(lock)
            except FileNotFoundError:
                pass
            return None
        try:
            try:
                if self._key(*self._read(over)) == dead:
                    os.unlink(over)
            except FileNotFoundError:
                pass
        finally:
            _unlink_quietly(lock)
        return None

    def acquire(self, i: int, j: int) -> bool:
        """Claim tile (i, j): True if this process now holds it, False if a live claim of
        another writer holds it.  A stale claim is taken over (warning)."""
        f = self._file(i, j)
        claim_id = uuid.uuid4().hex
        tmp = self._tmp(i, j, claim_id)
        # held before the claim is made: an exception (Ctrl-C, SIGTERM) between the link and
        # _hold must not leave a claim release_all does not know (release unlinks only a claim
        # file of this id)
        with self.lock:
            self.held[(i, j)] = claim_id
        with _HELD_LOCK:
            _HELD.add(claim_id)              # its takeover marker is live while it runs
        got = False
        try:
            for _ in range(3):
                try:
                    os.link(tmp, f)                       # atomic: fails if a claim exists
                    got = self._hold(i, j, claim_id, f)
                    return got
                except FileExistsError:
                    pass
                try:
                    owner, mtime = self._read(f)
                except FileNotFoundError:
                    continue                              # released meanwhile: try again
                why = self.staleness(owner, mtime)
                if why is None:
                    return False
                old = self._key(owner, mtime)
                marked = None
                try:
                    marked = self._mark(i, j, old, tmp)   # one winner per stale claim
                    if marked is None:
                        continue
                    if not marked:
                        return False
                    try:
                        now = self._key(*self._read(f))
                    except FileNotFoundError:
                        # removed meanwhile: claimed afresh by the link above, never replaced
                        # (a fresh claim linked since would be overwritten)
                        continue
                    if now != old:
                        return False                      # claimed afresh meanwhile
                    os.replace(tmp, f)                    # our claim in place of the stale one
                finally:
                    if marked:
                        _unlink_quietly(self._over(i, j, old))
                log.warning("store %s: took over tile (%d, %d) from %s: %s", self.dir.parent, i, j,
                            Claim((i, j), owner, time.time() - mtime, why).who(), why)
                got = self._hold(i, j, claim_id, f)
                return got
            return False
        finally:
            if not got:            # not claimed, or interrupted: nothing of this id is left
                self.release(i, j)
            _unlink_quietly(tmp)

    def _unlink(self, i: int, j: int, key: str, stale_only: bool) -> bool:
        """Unlink tile (i, j)'s claim file if it still holds claim ``key`` (and, with
        ``stale_only``, that claim is still stale); True if unlinked.  The claim's marker is held
        meanwhile (:meth:`_mark`), so no writer takes the claim over between the read and the
        unlink, which would then remove the taker's claim.  A marker another writer holds is
        waited for (:data:`MARK_WAIT`: it holds one for milliseconds), then the claim is left."""
        marker_id = uuid.uuid4().hex
        tmp = self._tmp(i, j, marker_id)
        with _HELD_LOCK:
            _HELD.add(marker_id)            # this process's marker, live while it runs
        marked = None
        try:
            deadline, pause = time.monotonic() + MARK_WAIT, 0.005
            while True:
                marked = self._mark(i, j, key, tmp)
                if marked:
                    break
                if time.monotonic() > deadline:
                    return False
                if marked is False:
                    time.sleep(pause)
                    pause = min(2 * pause, 0.1)
            try:
                owner, mtime = self._read(self._file(i, j))
            except FileNotFoundError:
                return False
            if self._key(owner, mtime) != key or (
                    stale_only and self.staleness(owner, mtime) is None):
                return False
            os.unlink(self._file(i, j))
            return True
        finally:
            if marked:
                _unlink_quietly(self._over(i, j, key))
            with _HELD_LOCK:
                _HELD.discard(marker_id)
            _unlink_quietly(tmp)

    def _hold(self, i, j, claim_id, f) -> bool:
        """The claim made (``acquire`` recorded it before making it): renewed from now on."""
        _HEARTBEAT.add(str(f), max(0.05, self.timeout / 4))
        return True

    def holds(self, i: int, j: int) -> bool:
        """Whether the claim of tile (i, j) on disk is still the one this process holds (not
        taken over by another writer while this process stalled beyond its timeout)."""
        with self.lock:
            claim_id = self.held.get((i, j))
        if claim_id is None:
            return False
        try:
            owner, _ = self._read(self._file(i, j))
        except FileNotFoundError:
            return False
        return owner is not None and owner.get("claim") == claim_id

    def release(self, i: int, j: int) -> None:
        """Remove this process's claim of tile (i, j), if it still is this process's.  The file
        goes before the record of it, so that an interrupt between the two (Ctrl-C, SIGTERM)
        leaves the record for release_all, never a claim file without one; a file system that
        refuses the removal drops the record all the same (a retry would be refused too, and a
        record kept would renew the claim while this process lives)."""
        with self.lock:
            claim_id = self.held.get((i, j))
        if claim_id is None:
            return
        f = self._file(i, j)
        try:
            self._unlink_own(i, j, claim_id)
        except OSError:
            self._forget(i, j, claim_id, f)
            raise
        self._forget(i, j, claim_id, f)

    def _unlink_own(self, i: int, j: int, claim_id: str) -> None:
        f = self._file(i, j)
        try:
            # a claim file of another id never becomes this one's: only this one is unlinked,
            # under its marker (a failed acquire, polled for, costs one read)
            if self._key(*self._read(f)) != claim_id:
                return
        except FileNotFoundError:
            return
        try:
            self._unlink(i, j, claim_id, stale_only=False)
        except OSError:
            # no room for the marker's record (a full disk, a quota): unlinked unguarded, as it
            # was before markers guarded it (an unlink needs no room)
            try:
                if self._key(*self._read(f)) == claim_id:
                    os.unlink(f)
            except FileNotFoundError:
                pass

    def _forget(self, i: int, j: int, claim_id: str, f: Path) -> None:
        _HEARTBEAT.remove(str(f))
        with _HELD_LOCK:
            _HELD.discard(claim_id)
        with self.lock:
            if self.held.get((i, j)) == claim_id:
                del self.held[(i, j)]

    def release_all(self) -> None:
        with self.lock:
            tiles = list(self.held)
        for i, j in tiles:
            self.release(i, j)

    def remove_stale(self, i: int, j: int) -> bool:
        """Remove the claim of tile (i, j) if it is stale now (judged again under its marker);
        True if removed.  False also where the file system refuses the marker or the removal
        (a stale claim of a finished tile is harmless: a later opener removes it)."""
        try:
            owner, mtime = self._read(self._file(i, j))
            if self.staleness(owner, mtime) is None:
                return False
            return self._unlink(i, j, self._key(owner, mtime), stale_only=True)
        except OSError:              # FileNotFoundError: removed meanwhile
            return False

    def scan(self) -> dict[tuple[int, int], Claim]:
        """Every claim file now in the store, by tile."""
        out = {}
        try:
            names = os.listdir(self.dir)
        except FileNotFoundError:
            return out
        for name in names:
            m = _CLAIM_NAME.match(name)
            if not m:
                continue
            try:
                owner, mtime = self._read(self.dir / name)
            except FileNotFoundError:
                continue
            t = (int(m.group(1)), int(m.group(2)))
            out[t] = Claim(t, owner, time.time() - mtime, self.staleness(owner, mtime))
        return out


# ----------------------------------------------------------------------------- the sink
class StoreSink(Sink):
    """Claims tiles and writes finished ones into a store (data, checksums, marker, release);
    picklable (path + numbers), so Dask workers open the same store themselves.  Each process
    opens the arrays once and keeps its own claims.

    ``repair``: {(i, j): marker seen} for finished tiles that failed verification: such a tile
    is computed again unless its marker changed since (another writer repaired it)."""

    def __init__(self, path: str, arch, params, kernel: str, symmetric: bool, run_id: int, *,
                 run_uuid: str, repair: dict, claim_timeout: float, names: list[str], scales):
        self.path, self.arch, self.params = str(path), arch, params
        self.kernel, self.symmetric, self.run_id = kernel, symmetric, run_id
        self.row_scale, self.col_scale = scales
        self.run_uuid, self.claim_timeout = run_uuid, float(claim_timeout)
        self.repair = dict(repair)
        self.names = list(names)
        self._arrays = None
        self._claims = None
        self._lock = threading.Lock()

    def __getstate__(self):
        d = self.__dict__.copy()
        d["_arrays"] = None
        d["_claims"] = None
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
                by_key = array_names(self.arch.depths, self.kernel)
                self._index = {name: self.names.index(name) for name in by_key.values()}
                self._by_key = by_key
                self._done = g[DONE]
                self._sums = g[CHECKSUMS]
                self._arrays = {name: g[name] for name in by_key.values()}
        return self._arrays

    def claims(self) -> Claims:
        with self._lock:
            if self._claims is None:
                self._claims = Claims(self.path, self.claim_timeout,
                                      {"run": self.run_id, "run_id": self.run_uuid})
        return self._claims

    def claim(self, t) -> bool:
        """Claim tile ``t`` for this process: False if another writer holds it or has finished
        it (re-read under the claim); True: compute it and call the sink, which releases it."""
        claims = self.claims()
        if not claims.acquire(t.i, t.j):
            return False
        try:
            self._open()
            try:
                marker = int(self._done[t.i, t.j])
            except Exception:  # noqa: BLE001 - an undecodable marker: not done
                marker = 0
        except BaseException:      # (a file system error opening the store): not left held
            claims.release(t.i, t.j)
            raise
        seen = self.repair.get((t.i, t.j))
        if marker == 0 or (seen is not None and marker == seen):
            return True
        claims.release(t.i, t.j)
        return False

    def release(self, t) -> None:
        self.claims().release(t.i, t.j)

    def release_all(self) -> None:
        if self._claims is not None:
            self._claims.release_all()

    def _still_held(self, t, before: str) -> bool:
        """Whether this process still holds tile ``t``'s claim; if not (taken over while it
        stalled beyond its timeout), the tile is left to the writer that holds it now."""
        claims = self.claims()
        if claims.holds(t.i, t.j):
            return True
        log.warning("store %s: tile (%d, %d) was taken over by another writer while this one "
                    "computed it (its claim not renewed within its timeout of %g s): left to "
                    "that writer, not written %s", self.path, t.i, t.j, self.claim_timeout, before)
        claims.release(t.i, t.j)
        return False

    def __call__(self, t, sums) -> bool:
        """Write tile ``t`` (data, checksums, marker) and release its claim; False where the
        claim was taken over meanwhile and the tile is left to the writer that holds it."""
        arrays = self._open()
        if not self._still_held(t, "at all"):
            return False
        record = np.zeros((len(self.names), 2), dtype=np.uint64)
        for d, res in self.kernels(t, to_host(sums)).items():
            for k, v in res.items():
                name = self._by_key[(d, k)]
                a, ai = arrays[name], self._index[name]
                v = np.ascontiguousarray(v, dtype=np.float64)
                a[t.rows, t.cols] = v
                record[ai, 0] = chunk_checksum(name, (t.i, t.j), v)
                if self.symmetric and not t.diag:
                    vt = np.ascontiguousarray(v.T)
                    a[t.cols, t.rows] = vt
                    record[ai, 1] = chunk_checksum(name, (t.j, t.i), vt)
        if not self._still_held(t, "beyond its data (written already: where the two writers "
                                   "compute alike it is the same bytes; else verify names the "
                                   "tile and a resume repairs it)"):
            return False
        self._sums[t.i, t.j] = record         # after every data chunk of the tile
        self._done[t.i, t.j] = self.run_id    # last: the tile is done
        self.release(t)
        return True


# ----------------------------------------------------------------------------- reading state
def read_done(path, arr, *, warn: bool = True) -> np.ndarray:
    """The ``tiles_done`` map of the store at ``path``.  A marker chunk that cannot be read or
    decoded (a truncated or emptied file) counts as 0, "not done", so its tile is computed again;
    with ``warn`` a warning names the store and each such tile."""
    done, unreadable = _read_done_markers(arr)
    if warn:
        for d in unreadable:
            log.warning("store %s: the done marker of tile %s (%s) %s", path, d.tile, d.chunk, d.why)
    return done


def _read_done_markers(arr) -> tuple[np.ndarray, list]:
    """(the ``tiles_done`` map, a :class:`Damage` for each marker chunk that cannot be read: its
    tile counts as not done).  Only the marker chunks that exist are read where they are few
    (:func:`_marker_files`, :func:`_read_whole`; a missing one is 0, the fill value)."""
    written = _marker_files(arr)
    if written is not None and _read_whole(len(written[0]), arr.shape[0] * arr.shape[1]):
        written = None
    done = np.zeros(arr.shape, dtype=np.int32)
    try:
        if written is None:
            return np.asarray(arr[...]), []
        if len(written[0]):
            done[written] = arr.get_coordinate_selection(written)
        return done, []
    except Exception:  # noqa: BLE001 - one damaged chunk: find it, chunk by chunk (a rare path)
        pass
    unreadable = []
    for i, j in (np.ndindex(*arr.shape) if written is None else zip(*written)):
        try:
            done[i, j] = int(arr[i, j])
        except Exception as e:  # noqa: BLE001
            unreadable.append(Damage(
                (int(i), int(j)), DONE, f"{DONE}/{arr.metadata.encode_chunk_key((i, j))}",
                f"cannot be read ({type(e).__name__}: {e}); the tile counts as not done and "
                "will be computed again"))
    return done, unreadable


def _read_whole(present: int, total: int) -> bool:
    """Whether an array of ``total`` one-per-tile chunks, ``present`` of them written, is read
    whole rather than chunk by chunk: a whole read makes zarr look for every chunk, found or not,
    and a read of listed chunks costs about twice as much per chunk, so whole from a third on."""
    return 3 * present >= total


def _marker_files(arr) -> tuple[np.ndarray, np.ndarray] | None:
    """(rows, cols) of the chunk files of the ``tiles_done`` array ``arr`` (one chunk per tile,
    ``c/<i>/<j>``) in a local store, listed from its folder; None where they cannot be listed
    (a store of another kind, another chunk layout): then the whole map is read."""
    from zarr.storage import LocalStore
    if (not isinstance(arr.store, LocalStore) or getattr(arr, "shards", None) is not None
            or tuple(arr.chunks) != (1, 1) or arr.metadata.encode_chunk_key((2, 3)) != "c/2/3"):
        return None
    folder = Path(str(arr.store.root)) / arr.path
    if not (folder / "zarr.json").is_file():     # not where it is listed: zarr reads it
        return None

    def index(name: str, bound: int) -> int | None:      # temporary files are not numbers
        return int(name) if name.isascii() and name.isdigit() and int(name) < bound else None
    rows, cols = [], []
    try:
        with os.scandir(folder / "c") as found:
            folders = [(i, entry.path) for entry in found
                       if (i := index(entry.name, arr.shape[0])) is not None and entry.is_dir()]
    except FileNotFoundError:
        folders = []                             # no marker written yet
    except OSError:
        return None
    for i, path in folders:
        try:
            with os.scandir(path) as files:
                js = [j for f in files if (j := index(f.name, arr.shape[1])) is not None]
        except FileNotFoundError:
            continue                             # removed meanwhile (zarr removes none)
        except OSError:
            return None
        rows += [i] * len(js)
        cols += js
    return np.array(rows, dtype=np.intp), np.array(cols, dtype=np.intp)


def _read_checksums(arr, done: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(checksums (gr, gc, arrays, 2) uint64, readable (gr, gc) bool) of the finished tiles
    (``done`` != 0) of a store; the others are not read (zeros): only the finished tiles' chunks
    where they are few (:func:`_read_whole`)."""
    finished = np.nonzero(done)
    sums = np.zeros(arr.shape, dtype=np.uint64)
    ok = np.ones(arr.shape[:2], dtype=bool)
    try:
        if _read_whole(len(finished[0]), done.size):
            return np.asarray(arr[...]), ok
        if len(finished[0]):
            sums[finished] = arr.get_coordinate_selection(_per_tile(finished, arr.shape[2:]))
        return sums, ok
    except Exception:  # noqa: BLE001 - a damaged chunk: find it (a rare path)
        pass
    for i, j in zip(*finished):
        try:
            sums[i, j] = arr[i, j]
        except Exception:  # noqa: BLE001
            ok[i, j] = False
    return sums, ok


def _per_tile(tiles, trailing: tuple) -> tuple:
    """The coordinate selection of every element of the tiles ``tiles`` = (rows, cols) of an
    array (gr, gc, *trailing): index arrays of shape (len(rows), *trailing)."""
    n = len(tiles[0])
    grids = np.meshgrid(*[np.arange(t) for t in trailing], indexing="ij") if trailing else []
    full = (n,) + tuple(trailing)
    expand = (slice(None),) + (None,) * len(trailing)
    return (np.broadcast_to(tiles[0][expand], full), np.broadcast_to(tiles[1][expand], full),
            *(np.broadcast_to(g[None], full) for g in grids))


@dataclass
class Damage:
    """One chunk of a finished tile that fails verification."""
    tile: tuple[int, int]
    array: str
    chunk: str        # its path in the store, e.g. "ntk/c/2/3"
    why: str

    def __str__(self) -> str:
        return f"tile {self.tile} of array {self.array!r}: chunk {self.chunk} {self.why}"


def _owner(ci: int, cj: int, symmetric: bool) -> tuple[int, int, int]:
    """(tile row, tile col, slot) of chunk (ci, cj): slot 0 = the tile itself, 1 = its mirror."""
    if symmetric and cj < ci:
        return cj, ci, 1
    return ci, cj, 0


def _decode_failure(e: Exception) -> str:
    """What a chunk that does not decode has, in words (zarr's crc32c error named as such)."""
    if "checksum do not match" in str(e):
        return ("cannot be decoded: its crc32c does not match its bytes (the file was cut short "
                "or changed)")
    return f"cannot be decoded ({type(e).__name__}: {e})"


@dataclass
class _Scan:
    damage: list = field(default_factory=list)
    bytes: int = 0
    chunks: int = 0


def _scan(path: Path, g, spec: dict, done: np.ndarray, *, names=None, into=None,
          workers: int | None = None) -> _Scan:
    """Read every chunk of the finished tiles of arrays ``names`` (default: all) and check it
    decodes and matches its recorded checksum.  ``into``: an (n1, n2) float64 array the one
    array named is read into (load_gram).  Row blocks of chunks are read in parallel threads."""
    t = int(spec["tile"])
    n1, n2, symmetric = int(spec["n1"]), int(spec["n2"]), bool(spec["symmetric"])
    order = _spec_arrays(spec)
    names = order if names is None else list(names)
    res = _Scan()
    if not done.any():
        return res                     # nothing finished: nothing to read (a new store)
    sums, sums_ok = _read_checksums(g[CHECKSUMS], done)
    gr, gc = done.shape
    lock = threading.Lock()
    arrays = {name: g[name] for name in names}

    def row(name: str, ci: int) -> None:
        arr = arrays[name]
        ai = order.index(name)
        r0, r1 = ci * t, min((ci + 1) * t, n1)
        wanted = []
        for cj in range(gc):
            ti, tj, slot = _owner(ci, cj, symmetric)
            if done[ti, tj] != 0:
                wanted.append((cj, ti, tj, slot))
        if not wanted:
            return
        damage = []
        block = None
        if _read_whole(len(wanted), gc):        # else its finished tiles one by one
            try:
                block = arr[r0:r1, :]
            except Exception:  # noqa: BLE001 - a chunk that does not decode: found chunk by chunk
                block = None
        nbytes = 0
        for cj, ti, tj, slot in wanted:
            c0, c1 = cj * t, min((cj + 1) * t, n2)
            key = f"{name}/{arr.metadata.encode_chunk_key((ci, cj))}"
            if block is None:
                try:
                    vals = arr[r0:r1, c0:c1]
                except Exception as e:  # noqa: BLE001
                    damage.append(Damage((ti, tj), name, key, _decode_failure(e)))
                    continue
                if into is not None:
                    into[r0:r1, c0:c1] = vals
            else:
                vals = block[:, c0:c1]
            nbytes += vals.nbytes
            if not sums_ok[ti, tj]:
                damage.append(Damage((ti, tj), name, key, "has no readable checksum (the "
                                     f"checksum chunk {CHECKSUMS}/c/{ti}/{tj}/0/0 cannot be decoded)"))
                continue
            want = int(sums[ti, tj, ai, slot])
            if want == 0:
                damage.append(Damage((ti, tj), name, key, "has no checksum recorded"))
            elif chunk_checksum(name, (ci, cj), vals) != want:
                if not (path / key).exists():
                    why = "is missing (its file is gone; it reads as NaN)"
                else:
                    why = ("does not match the checksum recorded for it: its values changed, or "
                           "it holds another chunk's data")
                damage.append(Damage((ti, tj), name, key, why))
        if block is not None and into is not None:
            into[r0:r1, :] = block
        with lock:
            res.damage.extend(damage)
            res.bytes += nbytes
            res.chunks += len(wanted)

    jobs = [(name, ci) for name in names for ci in range(gr)]
    n = workers or min(8, os.cpu_count() or 1)
    if n <= 1 or len(jobs) <= 1:
        for job in jobs:
            row(*job)
    else:
        with ThreadPoolExecutor(n, thread_name_prefix="cntk-verify") as ex:
            list(ex.map(lambda job: row(*job), jobs))
    res.damage.sort(key=lambda d: (d.tile, d.array, d.chunk))
    return res


# ----------------------------------------------------------------------------- the store
class GramStore:
    """An open store of one job (see the module docstring)."""

    def __init__(self, path: Path, group, spec: dict, claim_timeout: float = CLAIM_TIMEOUT):
        self.path, self.group, self.spec = path, group, spec
        self.tile = int(spec["tile"])
        self.claim_timeout = float(claim_timeout)
        self.repair: dict[tuple[int, int], int] = {}
        self.verified = {"tiles": 0, "failed": 0, "bytes": 0, "seconds": 0.0}
        self.last_marker = 0         # the largest done marker :meth:`missing` read
        self.tile_runs: set[int] = set()    # the runs whose marker a finished tile carries, as read
        # this run's compute records where begin_run compared them, and the runs it compared
        # with (None: that comparison failed)
        self.run_computes: list | None = None
        self.runs_seen: set | None = None
        self.run_uuid = ""

    # ------------------------------------------------------------------ open / create
    @classmethod
    def open_for_job(cls, job, *, tile: int, tile_given: bool) -> "GramStore":
        """Create the store of ``job`` (a :class:`~cntk_engine.jobs.GramJob`) at ``job.out`` or,
        if it holds this very job, reopen it.  An existing store is an error with
        ``out=StorePath(..., existing="refuse")`` (the CLI without --resume / --join), also when
        another process creates it at the same moment."""
        require_zarr()
        out, spec = job.out, job_spec(job)
        resume = getattr(out, "existing", "resume") == "resume"
        timeout = getattr(out, "claim_timeout", None) or CLAIM_TIMEOUT
        try:
            given = os.fspath(out)
            path = Path(given).expanduser().absolute()
        except TypeError:
            raise StoreError(f"{arg('out')} must be a path (str or os.PathLike) to a Zarr directory; got {out!r}") from None
        if not given:       # Path('') is the current folder
            raise StoreError(f"{arg('out', given)} is empty; give the path of the Zarr store to write, e.g. "
                             "'gram.zarr'")
        if _present(path, arg_prefix("out")):
            return cls._open_existing(path, spec, tile=tile, tile_given=tile_given, resume=resume,
                                      claim_timeout=timeout)
        if not path.parent.is_dir():
            up = next((q for q in path.parents if q.exists()), None)
            if up is not None and not up.is_dir():
                raise StoreError(f"{arg('out', str(path))}: {str(up)!r} is a file, not a folder")
            raise StoreError(f"{arg('out', str(path))}: the folder {str(path.parent)!r} does not exist")
        if not os.access(path.parent, os.W_OK):
            raise StoreError(f"{arg('out', str(path))}: the folder {str(path.parent)!r} is not writable")
        try:
            return cls._create(path, dict(spec, tile=int(tile)), claim_timeout=timeout)
        except _LostRace:
            if not resume:
                raise StoreExists(path, race=True) from None
            log.info("store %s was created by another process at the same time; working on it "
                     "together", path)
            return cls._open_existing(path, spec, tile=tile, tile_given=tile_given, resume=resume,
                                      claim_timeout=timeout)

    @classmethod
    def _open_existing(cls, path: Path, spec: dict, *, tile: int, tile_given: bool,
                       resume: bool, claim_timeout: float = CLAIM_TIMEOUT) -> "GramStore":
        zarr = require_zarr()
        stored = _read_record(path, arg_prefix("out"), for_out=True)
        why = _format_error(path, stored)
        if why is not None:
            raise StoreError(arg_prefix("out") + why)
        diffs = spec_differences(stored, spec)
        if tile_given and int(stored.get("tile", -1)) != tile:
            diffs.append(f"{arg('tile')}: store has {stored.get('tile')}, this job {tile}")
        if diffs:
            raise StoreMismatch(f"{arg('out', str(path))} holds another job: " + "; ".join(diffs)
                                + f". Nothing was written; use another {arg('out')} path for this "
                                "job", diffs)
        g = zarr.open_group(str(path), mode="r")
        # runs/ only records who computed what (verify reads none of it): recreated, as claims/
        _check_arrays(path, g, _spec_arrays(stored) + [DONE, CHECKSUMS], arg("out", str(path)), stored)
        n_done = int(np.count_nonzero(read_done(path, g[DONE], warn=False)))
        n_all = len(cls._expected_tiles(stored))
        if not resume:
            raise StoreExists(path, done=f"this same job, {n_done} of {n_all} tiles done")
        unwritable = [p for p in (path, path / RUNS, path / CLAIMS, path / DONE)
                      if p.exists() and not os.access(p, os.W_OK | os.X_OK)]
        if unwritable:         # a read-only folder or file system: the run record would fail
            raise StoreError(f"{arg('out', str(path))}: {str(unwritable[0])!r} is not writable (a "
                             f"read-only folder or file system), and a job continuing the store "
                             f"({n_done} of {n_all} tiles done) writes its run record, claims and "
                             "tiles there; a finished store is read as it is (verify, solve, "
                             "load_gram)")
        _sweep_partials(path)         # a killed creation's, where a later one made the store
        store = cls(path, zarr.open_group(str(path), mode="r+"), stored, claim_timeout)
        for folder in (CLAIMS, RUNS):
            if folder not in store.group:
                store.group.require_group(folder)
        live = [c for c in store.claims().scan().values() if c.stale is None]
        log.info("opening existing store %s: %d of %d tiles done%s", path, n_done, n_all,
                 f"; {len(live)} tiles are being computed by other writers now "
                 f"({', '.join(sorted({c.who() for c in live})[:4])}): working together"
                 if live else "")
        return store

    @staticmethod
    def _expected_tiles(spec: dict):
        return TileLayout(spec["n1"], spec["n2"], int(spec["tile"]), spec["symmetric"]).tiles()

    @classmethod
    def _create(cls, path: Path, spec: dict, claim_timeout: float = CLAIM_TIMEOUT) -> "GramStore":
        zarr = require_zarr()
        from zarr.codecs import Crc32cCodec, ZstdCodec
        t = spec["tile"]
        layout = TileLayout(spec["n1"], spec["n2"], t, spec["symmetric"])
        spec["grid"] = list(layout.grid)
        names = array_names(tuple(spec["architecture"]["depths"]), spec["kernel"])
        order = sorted(names.values())
        spec["integrity"] = {"checksum": CHECKSUM_KIND, "arrays": order, "chunk_codec": "crc32c"}
        _sweep_partials(path)
        tmp = path.parent / f"{_partial_prefix(path)}{uuid.uuid4().hex[:12]}"
        try:
            g = zarr.open_group(str(tmp), mode="w-")
            shape = (spec["n1"], spec["n2"])
            for (d, k), name in names.items():
                parent = g
                if "/" in name:
                    grp, name = name.split("/")
                    parent = g.require_group(grp)
                    parent.attrs["depth"] = d
                parent.create_array(name, shape=shape, chunks=(min(t, shape[0]), min(t, shape[1])),
                                    dtype="float64", fill_value=float("nan"),
                                    compressors=[ZstdCodec(level=0, checksum=False), Crc32cCodec()],
                                    attributes={"kernel": k, "depth": d})
            _create_bookkeeping(g, layout.grid, len(order))
            g.attrs.put({"cntk_engine": spec})
            try:
                os.rename(tmp, path)   # atomic: a store that exists always has its job record
            except OSError as e:
                # another process created the store since the existence check (rename(2) onto a
                # non-empty directory: ENOTEMPTY, or EEXIST on some systems)
                if e.errno in (errno.ENOTEMPTY, errno.EEXIST) and path.is_dir():
                    raise _LostRace() from e
                raise
        except BaseException as e:
            shutil.rmtree(tmp, ignore_errors=True)
            if isinstance(e, OSError):        # not _LostRace: the caller opens the store that won
                # the folder passed the checks above but refuses the store (a read-only or
                # special file system, a quota): the temporary name is not the caller's
                raise StoreError(f"{arg('out', str(path))} cannot be created in "
                                 f"{str(path.parent)!r}: {e.strerror or e}") from None
            raise
        log.info("created store %s: %d x %d, tile %d, grid %s", path, *shape, t, layout.grid)
        return cls(path, zarr.open_group(str(path), mode="r+"), spec, claim_timeout)

    # ------------------------------------------------------------------ tiles
    def done_map(self, warn: bool = True) -> np.ndarray:
        """``tiles_done`` (an undecodable marker reads as 0: see :func:`read_done`)."""
        return read_done(self.path, self.group[DONE], warn=warn)

    def missing(self, tiles) -> list:
        """The tiles to compute: marker 0 (or unreadable), or finished but failing verification
        (every chunk of every finished tile is read back and checked; a warning names the store,
        the array, the tile and the chunk).  The failing tiles are kept in :attr:`repair`."""
        done = self.done_map()
        self.clear_stale_claims(done)
        n_done = int(sum(1 for t in tiles if done[t.i, t.j] != 0))
        t0 = time.perf_counter()
        scan = _scan(self.path, self.group, self.spec, done)
        dt = time.perf_counter() - t0
        bad: dict[tuple[int, int], list[Damage]] = {}
        for d in scan.damage:
            bad.setdefault(d.tile, []).append(d)
        for tile, ds in sorted(bad.items()):
            log.warning("store %s: tile %s fails verification and will be computed again: %s",
                        self.path, tile, "; ".join(f"array {d.array!r}: chunk {d.chunk} {d.why}"
                                                   for d in ds))
        self.repair = {tile: int(done[tile]) for tile in bad}
        self.last_marker = int(done.max(initial=0))
        self.tile_runs = tile_markers(done)
        self.verified = {"tiles": n_done, "failed": len(bad), "bytes": scan.bytes, "seconds": dt}
        if n_done:
            log.info("store %s: verified %d finished tile%s (%s read) in %.3g s (%s/s): %s",
                     self.path, n_done, "" if n_done == 1 else "s", format_bytes(scan.bytes), dt,
                     format_bytes(scan.bytes / dt) if dt > 0 else "-",
                     f"{len(bad)} failed" if bad else "all intact")
        return [t for t in tiles if done[t.i, t.j] == 0 or (t.i, t.j) in bad]

    def markers(self, tiles) -> dict:
        """{(i, j): marker} of ``tiles`` read now (0 when unreadable); chunk by chunk when they
        are few, else the whole map."""
        arr = self.group[DONE]
        if len(tiles) * 4 >= arr.shape[0] * arr.shape[1]:
            done = self.done_map(warn=False)
            return {(t.i, t.j): int(done[t.i, t.j]) for t in tiles}
        out = {}
        for t in tiles:
            try:
                out[(t.i, t.j)] = int(arr[t.i, t.j])
            except Exception:  # noqa: BLE001 - undecodable: not done
                out[(t.i, t.j)] = 0
        return out

    def not_done(self, tiles) -> list:
        """The tiles not done now (re-read from the store): marker 0 or unreadable, or a tile
        that failed verification and was not rewritten since."""
        m = self.markers(tiles)
        return [t for t in tiles if m[(t.i, t.j)] == 0 or self.repair.get((t.i, t.j)) == m[(t.i, t.j)]]

    def claims(self) -> Claims:
        """The claims of this store, as an observer (this process holds none through it)."""
        return Claims(self.path, self.claim_timeout, {})

    def clear_stale_claims(self, done: np.ndarray) -> int:
        """Remove the stale claims of finished tiles: left by a writer that died after writing
        a tile's marker and before releasing its claim (a stale claim of an unfinished tile is
        taken over when the tile is claimed).  Returns how many were removed."""
        claims = self.claims()
        n = 0
        for (i, j), c in claims.scan().items():
            if (c.stale and i < done.shape[0] and j < done.shape[1] and done[i, j] != 0
                    and claims.remove_stale(i, j)):
                n += 1
        if n:
            log.info("store %s: removed %d stale claims of finished tiles", self.path, n)
        return n

    @property
    def poll_seconds(self) -> float:
        """How often a waiting writer looks at the others' tiles."""
        return min(5.0, max(0.05, self.claim_timeout / 20))

    def wait_for_others(self, tiles) -> None:
        """Wait until one of ``tiles`` (not done) can be claimed (its claim is gone or stale) or
        all are done: the tiles other writers hold.  Logs once what it waits for."""
        poll = self.poll_seconds
        told = False
        while True:
            left = self.not_done(tiles)
            if not left:
                return
            held = self.claims().scan()
            if any((t.i, t.j) not in held or held[(t.i, t.j)].stale for t in left):
                return
            if not told:
                who = sorted({held[(t.i, t.j)].who() for t in left})
                log.info("store %s: waiting for %d tiles being computed by other writers (%s)",
                         self.path, len(left), ", ".join(who[:4]) + (" ..." if len(who) > 4 else ""))
                told = True
            time.sleep(poll)

    # ------------------------------------------------------------------ runs
    def begin_run(self, n_todo: int, where: str, computes: list | None = None) -> int:
        """Record a new run (its own ``runs/<k>`` group, k unique among concurrent writers)
        and return k.  ``computes``: the compute records of what computes this run's tiles
        (one per distinct device: ``Backend.compute_record``), or None where this process
        cannot tell (Dask: its workers say, :meth:`end_run`).  A run that has tiles to compute
        warns where its records differ from an earlier run's or from each other, and again at
        its end for the runs that began while it ran (:meth:`end_run`)."""
        rec = {"id": uuid.uuid4().hex, "started": _dt.datetime.now().isoformat(timespec="seconds"),
               "host": HOST, "pid": os.getpid(), "where": where, "tiles_to_compute": n_todo,
               "tiles_verified": self.verified["tiles"],
               "tiles_failed_verification": self.verified["failed"],
               "verify_seconds": round(self.verified["seconds"], 3),
               "claim_timeout": self.claim_timeout}
        self.run_computes, self.runs_seen = None, None
        if computes:
            rec["compute"] = [dict(c) for c in computes]
            if n_todo:
                self.run_computes = rec["compute"]
                self.runs_seen = self._compare_computes(None, computes, "this run")
        # above every marker read, as well as every run recorded: a tile this run writes must
        # not carry a marker that was there before, or a damaged tile whose marker equals it (a
        # runs/<k> record lost) would read as not repaired after its repair, again and again
        k = _new_run(self.path, rec, after=self.last_marker)
        self.run_uuid = rec["id"]
        return k

    def end_run(self, run_id: int, seconds: float, *, tiles_computed: int | None = None,
                outcome: str = "finished", computes: list | None = None) -> None:
        """Record the end of run ``run_id``.  ``computes``: the compute records the Dask
        workers returned with their tiles (also of a run that failed after some), stored as
        the run's ``compute`` after the rest of the record, then compared as at
        :meth:`begin_run`.  A run whose records were compared at its beginning and that computed
        tiles compares them again with the runs that began since: writers started at the same
        moment (a cluster's job array on unlike nodes) list the runs before any of them is
        recorded, so none would warn at its beginning."""
        zarr = require_zarr()
        upd = {"finished": _dt.datetime.now().isoformat(timespec="seconds"),
               "seconds": round(seconds, 3), "outcome": outcome}
        if tiles_computed is not None:
            upd["tiles_computed"] = int(tiles_computed)
        if computes:
            upd["compute"] = [dict(c) for c in computes]
        zarr.open_group(str(self.path / RUNS / str(run_id)), mode="r+").attrs.update(upd)
        if computes:
            self._compare_computes(run_id, computes, f"run {run_id}'s Dask workers",
                                   others="other runs")
        elif self.run_computes and tiles_computed:
            # its devices among themselves were compared at its beginning
            seen = self.runs_seen
            self._compare_computes(run_id, self.run_computes, f"run {run_id}", skip=seen or (),
                                   others="other runs" if seen is None else
                                   "runs that began while it ran", among_themselves=False)

    def _compare_computes(self, run_id: int | None, computes: list, who: str, *,
                          skip=(), others: str = "earlier runs",
                          among_themselves: bool = True) -> set | None:
        """Warn where ``computes`` differ from the records of the other runs that may have
        computed tiles (and from each other), leaving out the run numbers in ``skip``; return
        the numbers of the runs compared with (None where that failed).  runs/ only records
        who computed what: a record that cannot be read there is said, and the job goes on."""
        try:
            runs = [r for r in list_runs(self.read_only_group)
                    if r.get("run") != run_id and r.get("run") not in skip]
            if run_id is None:
                markers = self.tile_runs
            elif any(r.get("tiles_computed") == 0 or r.get("tiles_to_compute") == 0 for r in runs):
                markers = tile_markers(self.done_map(warn=False))   # one read, where it decides
            else:
                markers = ()
            self._warn_mixed(runs, computes, who, markers, others, among_themselves)
            return {r.get("run") for r in runs if "unreadable" not in r}
        except Exception as e:  # noqa: BLE001 - a warning must not fail the job
            log.warning("store %s: the compute records of %s could not be compared with the "
                        "other runs': %s", self.path, who, e)
            return None

    def _warn_mixed(self, runs: list, computes: list, who: str, markers,
                    others: str = "earlier runs", among_themselves: bool = True) -> None:
        mixed = mixed_compute(runs, computes, markers, among_themselves)
        if mixed:
            log.warning("store %s: the code of %s differs from that of %s (%s%s): their tiles "
                        "agree to rounding but may differ in the last bits, so the matrix may not "
                        "be bit-identical to one computed by any single one of them", self.path,
                        who, others if all(m.startswith("run ") for m in mixed) else
                        f"{others} or of its other devices", "; ".join(mixed[:3]),
                        " ..." if len(mixed) > 3 else "")

    def sink(self, job, run_id: int) -> StoreSink:
        return StoreSink(str(self.path), job.arch, job.params, job.kernel, job.symmetric, run_id,
                         run_uuid=self.run_uuid, repair=self.repair,
                         claim_timeout=self.claim_timeout, names=_spec_arrays(self.spec),
                         scales=job.scales)

    @property
    def read_only_group(self):
        return require_zarr().open_group(str(self.path), mode="r")


def _create_bookkeeping(g, grid, n_arrays: int) -> None:
    """The markers, checksums, runs and claims of a store (group ``g``, opened for writing)."""
    from zarr.codecs import Crc32cCodec, ZstdCodec
    codecs = [ZstdCodec(level=0, checksum=False), Crc32cCodec()]
    g.create_array(DONE, shape=tuple(grid), chunks=(1, 1), dtype="int32", fill_value=0,
                   compressors=codecs, overwrite=True)
    g.create_array(CHECKSUMS, shape=tuple(grid) + (n_arrays, 2), chunks=(1, 1, n_arrays, 2),
                   dtype="uint64", fill_value=0, compressors=codecs, overwrite=True)
    g.require_group(RUNS)
    g.require_group(CLAIMS)


def _new_run(path: Path, rec: dict, after: int = 0) -> int:
    """Create ``runs/<k>`` holding ``rec`` (plus run = k) for the first free k above every
    recorded run and ``after``, atomically: the group is made in a temporary directory and
    renamed into place, which fails when another writer took k first (the target then exists
    and is not empty)."""
    zarr = require_zarr()
    runs = path / RUNS
    while True:
        taken = [int(n) for n in os.listdir(runs) if n.isdigit()]
        k = max(max(taken, default=0), after) + 1
        tmp = runs / f".new-{uuid.uuid4().hex}"
        try:
            zarr.open_group(str(tmp), mode="w-", attributes=dict(rec, run=k))
            try:
                os.rename(tmp, runs / str(k))
                return k
            except OSError as e:
                if e.errno not in (errno.ENOTEMPTY, errno.EEXIST):
                    raise
        finally:
            shutil.rmtree(tmp, ignore_errors=True)


def is_store(path, what: str = "out=", takes: str | None = None) -> bool:
    """Whether the ``out=`` path ``path`` holds a cntk_engine Gram store: False where nothing
    is there (a new store would be created), True for a store (its job is compared when it is
    opened), a StoreError for anything else (a file, a folder that is not a store), naming it
    and what ``what`` (e.g. "out=", "--out ") takes (or ``takes``)."""
    path = Path(os.fspath(path)).expanduser().absolute()
    if not _present(path, what):
        return False
    _read_record(path, what, for_out=True, takes=takes)
    return True


def _present(path: Path, what: str) -> bool:
    """Whether anything (a broken link too) is at ``path``; an error of the file system's
    (a name too long for it, a folder this user may not search) a StoreError naming ``what``."""
    try:
        os.lstat(path)
    except (FileNotFoundError, NotADirectoryError):
        return False
    except OSError as e:
        raise StoreError(f"{what}{str(path)!r}: {e.strerror or e}") from None
    return True


def _read_record(path: Path, what: str = "", *, for_out: bool = False,
                 takes: str | None = None) -> dict:
    """The job record of the store at ``path``; StoreError (its message starting with
    ``what``, e.g. "out=") if it is not a cntk_engine store, saying what is there instead and,
    ``for_out``, what an output path takes (``takes``: other words for it)."""
    zarr = require_zarr()
    if for_out and takes is None:
        takes = (f"{what.strip()} takes a path that does not exist yet (a new store is created "
                 "there) or a store of this same job")
    takes = f"; {takes}" if for_out else ""
    if not path.is_dir() or not (path / "zarr.json").is_file():
        found = ("a broken symbolic link" if not path.exists() else
                 "a folder without zarr.json" if path.is_dir() else
                 "a file" if path.is_file() else "not a file or folder")
        raise StoreError(f"{what}{str(path)!r} exists and is not a Zarr (v3) store ({found}); "
                         f"refusing to touch it{takes}")
    try:
        g = zarr.open_group(str(path), mode="r")
        stored = dict(g.attrs.get("cntk_engine") or {})
    except Exception as e:
        raise StoreError(f"{what}{str(path)!r} cannot be read as a Zarr group: {e}") from None
    if stored.get("format") != FORMAT:
        raise StoreError(f"{what}{str(path)!r} is a Zarr group but not a cntk_engine Gram store "
                         f"(no job record); refusing to touch it{takes}")
    return _checked_layout(stored, f"{what}{str(path)!r}")


def _checked_layout(stored: dict, where: str) -> dict:
    """The job record ``stored``, refused (StoreCorrupt naming ``where``) where it lacks what
    every reader and writer derives the store from: the tile layout, the kernels' names (the
    architecture's depths and the kernel) and the images' fingerprints."""
    def count(v):
        return isinstance(v, int) and not isinstance(v, bool) and v >= 1
    bad = [k for k in ("n1", "n2", "tile") if not count(stored.get(k))]
    bad += [] if isinstance(stored.get("symmetric"), bool) else ["symmetric"]
    arch = stored.get("architecture")
    depths = arch.get("depths") if isinstance(arch, dict) else None
    if not (isinstance(depths, list) and depths and all(count(d) for d in depths)):
        bad.append("architecture.depths")
    bad += [] if stored.get("kernel") in KERNELS else ["kernel"]
    fp = stored.get("fingerprint")
    if not (isinstance(fp, dict) and isinstance(fp.get("x1"), str)
            and (isinstance(fp.get("x2"), str) or fp.get("x2") is None and stored.get("symmetric"))):
        bad.append("fingerprint")
    if bad:
        raise StoreCorrupt(f"{where} is damaged: its job record (zarr.json's "
                           f"attributes.cntk_engine) lacks a valid {', '.join(bad)}, from which "
                           "its tiles are laid out and its kernels named and tied to their "
                           "images: move the store away and compute the job again")
    return stored


def tile_markers(done) -> set[int]:
    """The run numbers that the finished tiles of a ``tiles_done`` array carry."""
    return {int(v) for v in np.unique(done)} - {0}


def may_have_computed(run: dict, markers) -> bool:
    """Whether a run may have computed tiles: all but those that ended having computed none,
    or began with none to compute, and whose marker no finished tile carries (``markers``,
    :func:`tile_markers`: a Dask worker may still write a tile after its failed run's end was
    recorded).  A run killed before its end was recorded counts, unless it had nothing to do."""
    nothing = run.get("tiles_computed") == 0 or run.get("tiles_to_compute") == 0
    return not nothing or run.get("run") in markers


def mixed_compute(runs: list[dict], computes: list[dict], markers=(),
                  among_themselves: bool = True) -> list[str]:
    """How the compute records ``computes`` (of one run) differ from those of each run in
    ``runs`` that may have computed tiles (:func:`may_have_computed`) and (``among_themselves``)
    from each other, one line each."""
    out = []
    for k, mine in enumerate(computes):
        for r in runs:
            if not may_have_computed(r, markers):
                continue
            for theirs in (c for c in run_computes(r) if c != mine):
                line = f"run {r.get('run')} on {r.get('host')}: {record_diff(theirs, mine)}"
                if line not in out:
                    out.append(line)
        for theirs in computes[:k] if among_themselves else ():
            if theirs != mine:
                out.append(f"its devices: {record_diff(theirs, mine, ('on one', 'on another'))}")
    return out


def record_diff(theirs: dict, mine: dict, sides=("there", "here")) -> str:
    """The fields in which two compute records differ, in words; of a list of features (a
    CPU's, NumPy's dispatch), the items in one and not the other."""
    words = []
    for k in sorted(set(theirs) | set(mine), key=lambda k: (k != "backend", k)):
        a, b = theirs.get(k, "-"), mine.get(k, "-")
        if a == b:
            continue
        if k.endswith("features") and isinstance(a, str) and isinstance(b, str):
            ia, ib = {f for f in a.split(",") if f}, {f for f in b.split(",") if f}
            a, b = _features_apart(ia, ib), _features_apart(ib, ia)
        words.append(f"{k} {a} {sides[0]}, {b} {sides[1]}")
    return ", ".join(words)


def _features_apart(mine: set, other: set) -> str:
    """The features of one side the other lacks, up to 6 and a count of the rest; "none" for an
    empty list (numba's generic CPU), "no others" where it is within the other's."""
    extra = sorted(mine - other)
    if not extra:
        return "no others" if mine else "none"
    return ",".join(extra[:6]) + (f" and {len(extra) - 6} more" if len(extra) > 6 else "")


def run_computes(run: dict) -> list[dict]:
    """The compute records of a run record (none for runs of cntk_engine before it recorded
    them, or of a Dask run whose client died before the run's end)."""
    recs = run.get("compute")
    return [c for c in recs if isinstance(c, dict)] if isinstance(recs, list) else []


def computed_with(runs: list[dict], markers=()) -> tuple[list[dict], list]:
    """What computed a store's tiles: [{"compute": record, "runs": [run numbers]}] over the runs
    that may have computed tiles (:func:`may_have_computed`), and the numbers of those whose
    record holds none."""
    setups: list[dict] = []
    unrecorded = []
    for run in runs:
        if not may_have_computed(run, markers):
            continue
        recs = run_computes(run)
        if not recs:
            unrecorded.append(run.get("run"))
        for rec in recs:
            s = next((s for s in setups if s["compute"] == rec), None)
            if s is None:
                setups.append({"compute": rec, "runs": [run.get("run")]})
            elif run.get("run") not in s["runs"]:
                s["runs"].append(run.get("run"))
    return setups, unrecorded


def list_runs(group) -> list[dict]:
    """The run records of a store's group, by run number (format 1: ``attrs["runs"]``).  A
    record that cannot be read is listed as ``{"run": k, "unreadable": why}``: runs/ only
    records who computed what, so its damage stops neither a job nor a verify (zarr reads every
    member of runs/ to list them, so a local store's runs/ is listed as folders)."""
    runs = [dict(r) for r in group.attrs.get("runs", [])]
    if RUNS in group:
        sub = group[RUNS]
        try:
            names = sorted(p.name for p in (_group_path(group) / RUNS).iterdir() if p.is_dir())
        except OSError:
            names = [name for name, _ in sub.groups()]
        for name in (n for n in names if n.isdigit()):
            try:
                runs.append(dict(sub[name].attrs))
            except Exception as e:  # noqa: BLE001 - a damaged record (a truncated zarr.json)
                runs.append({"run": int(name), "unreadable": f"{type(e).__name__}: {e}"})
    return sorted(runs, key=lambda r: r.get("run", 0))


# ----------------------------------------------------------------------------- verify, upgrade
@dataclass
class VerifyReport:
    """What :func:`verify_store` found.  ``ok``: every finished tile verified (an unfinished
    store can be ok: its missing tiles are listed as not done, not as damage)."""
    path: str
    format_version: int
    tiles_total: int
    tiles_finished: int
    checksums: bool                 # False: format 1, nothing could be verified
    damage: list                    # [Damage], one per failing chunk
    bytes_read: int = 0
    seconds: float = 0.0
    claims: list = field(default_factory=list)   # [Claim] present now
    runs: list = field(default_factory=list)
    markers: set = field(default_factory=set)   # runs whose marker a finished tile carries

    @property
    def damaged_tiles(self) -> list[tuple[int, int]]:
        return sorted({d.tile for d in self.damage})

    @property
    def ok(self) -> bool:
        return self.checksums and not self.damage


def _open_store_group(path):
    """(path, group, job record) of an existing store; ``path`` is named as the command line
    names it (``STORE``) where a command runs, else as a Zarr store."""
    zarr = require_zarr()
    path = Path(os.fspath(path)).expanduser().absolute()
    name = option("path")
    takes = f"{name} takes the folder of a Gram store written by cntk-engine gram --out"
    if not path.exists():
        raise FileNotFoundError(f"{name or 'Zarr store'} {str(path)!r} does not exist"
                                + (f"; {takes}" if name else ""))
    stored = _read_record(path, f"{name} " if name else "", for_out=bool(name), takes=takes)
    return path, zarr.open_group(str(path), mode="r"), stored


def _check_arrays(path, g, names, what: str, spec: dict) -> None:
    """StoreCorrupt naming each of the arrays ``names`` of the store's group ``g`` that is
    missing, whose metadata cannot be read, or whose shape is not the one the job record
    ``spec`` lays out (``what``: how the message names the store)."""
    grid = TileLayout(spec["n1"], spec["n2"], int(spec["tile"]), spec["symmetric"]).grid
    kernels = _spec_arrays(spec)
    shapes = {DONE: grid, CHECKSUMS: grid + (len(kernels), 2)}
    missing, unreadable, reshaped = [], [], []
    for name in names:
        try:
            shape = tuple(g[name].shape)
        except KeyError:
            missing.append(name)
            continue
        except Exception as e:  # noqa: BLE001 - a damaged zarr.json: name it
            unreadable.append(f"{name!r} ({name}/zarr.json: {type(e).__name__}: {e})")
            continue
        want = shapes.get(name, (spec["n1"], spec["n2"]) if name in kernels else None)
        if want is not None and shape != tuple(want):
            reshaped.append(f"{name!r} is {shape}, not {tuple(want)}")
    why = ([f"{missing} are missing"] if missing else []) + (
        [f"the metadata of {', '.join(unreadable)} cannot be read"] if unreadable else []) + (
        [f"the job record's n1, n2 and tile do not lay out its arrays: {', '.join(reshaped)}"]
        if reshaped else [])
    if why:
        raise StoreCorrupt(f"{what} is damaged: {'; '.join(why)}. Without them its tiles cannot "
                           "be read or verified: move the store away and compute the job again")


def verify_store(path, *, workers: int | None = None) -> VerifyReport:
    """Check a Gram store without computing anything: every chunk of every finished tile must
    decode and match its recorded checksum.  Returns a :class:`VerifyReport`; raises
    FileNotFoundError / :class:`StoreError` for a path that is not a cntk_engine store.
    ``workers``: reading threads (default: up to 8, one per core)."""
    path, g, spec = _open_store_group(path)
    version = spec.get("format_version")
    if version not in (1, FORMAT_VERSION):
        raise StoreError(_format_error(path, spec))
    _check_arrays(path, g, _spec_arrays(spec) + [DONE] + ([CHECKSUMS] if version == FORMAT_VERSION
                                                           else []), repr(str(path)), spec)
    tiles = GramStore._expected_tiles(spec)
    done, unreadable = _read_done_markers(g[DONE])
    n_done = sum(1 for t in tiles if done[t.i, t.j] != 0)
    report = VerifyReport(str(path), version, len(tiles), n_done, version == FORMAT_VERSION, [],
                          runs=list_runs(g), markers=tile_markers(done))
    if version == FORMAT_VERSION:
        t0 = time.perf_counter()
        scan = _scan(path, g, spec, done, workers=workers)
        report.seconds = time.perf_counter() - t0
        report.damage, report.bytes_read = unreadable + scan.damage, scan.bytes
        report.claims = sorted(Claims(path, CLAIM_TIMEOUT, {}).scan().values(), key=lambda c: c.tile)
    return report


def add_checksums(path, *, workers: int | None = None) -> dict:
    """Convert a format-1 store (no checksums) to format 2 in place, recording checksums of
    its data AS IT IS NOW: only use it on data you accept.  Every finished tile is read; one
    whose chunks cannot be decoded, hold NaN, or (symmetric) whose mirror is not its transpose
    is marked not done instead (a warning names it), so resuming computes it again.  The job
    record is rewritten last: an interrupted conversion leaves a format-1 store, and running it
    again starts over.  Returns {"tiles": checksummed, "reset": [tiles marked not done],
    "runs": run records moved}."""
    zarr = require_zarr()
    path, g, spec = _open_store_group(path)
    version = spec.get("format_version")
    if version == FORMAT_VERSION:
        raise StoreError(f"{str(path)!r} already has per-tile checksums (format "
                         f"{FORMAT_VERSION}); use `cntk-engine verify {path}` to check it")
    if version != 1:
        raise StoreError(_format_error(path, spec))
    g = zarr.open_group(str(path), mode="r+")
    names = _spec_arrays(spec)
    _check_arrays(path, g, names + [DONE], repr(str(path)), spec)
    t = int(spec["tile"])
    symmetric = bool(spec["symmetric"])
    layout = TileLayout(spec["n1"], spec["n2"], t, symmetric)
    done = read_done(path, g[DONE])
    sums = np.zeros(tuple(layout.grid) + (len(names), 2), dtype=np.uint64)
    reset = []

    def one(tile):
        rec = np.zeros((len(names), 2), dtype=np.uint64)
        for ai, name in enumerate(names):
            a = g[name]
            try:
                v = np.asarray(a[tile.rows, tile.cols])
                m = None if not symmetric or tile.diag else np.asarray(a[tile.cols, tile.rows])
            except Exception as e:  # noqa: BLE001
                return tile, None, f"array {name!r}: {_decode_failure(e)}"
            if not np.isfinite(v).all() or (m is not None and not np.isfinite(m).all()):
                return tile, None, f"array {name!r}: holds NaN or Inf (a chunk is missing or damaged)"
            if m is not None and m.tobytes() != np.ascontiguousarray(v.T).tobytes():
                return tile, None, f"array {name!r}: its mirror chunk is not its transpose"
            rec[ai, 0] = chunk_checksum(name, (tile.i, tile.j), v)
            if m is not None:
                rec[ai, 1] = chunk_checksum(name, (tile.j, tile.i), m)
        return tile, rec, None

    finished = [tl for tl in layout.tiles() if done[tl.i, tl.j] != 0]
    with ThreadPoolExecutor(workers or min(8, os.cpu_count() or 1)) as ex:
        for tile, rec, why in ex.map(one, finished):
            if rec is None:
                log.warning("store %s: tile (%d, %d) %s; it is marked not done and will be "
                            "computed when the job is resumed", path, tile.i, tile.j, why)
                reset.append((tile.i, tile.j))
            else:
                sums[tile.i, tile.j] = rec
    _create_bookkeeping_upgrade(g, layout.grid, len(names), sums)
    for i, j in reset:
        g[DONE][i, j] = 0
    old_runs = [dict(r) for r in g.attrs.get("runs", [])]
    for r in old_runs:
        k = int(r.get("run", 0))
        if k >= 1:
            zarr.open_group(str(path / RUNS / str(k)), mode="w", attributes=r)
    attrs = dict(g.attrs.asdict())
    attrs.pop("runs", None)
    attrs["cntk_engine"] = dict(spec, format_version=FORMAT_VERSION,
                                integrity={"checksum": CHECKSUM_KIND, "arrays": names,
                                           "chunk_codec": None},
                                upgraded_from={"format_version": 1, "by": __version__,
                                               "at": _dt.datetime.now().isoformat(timespec="seconds")})
    g.attrs.put(attrs)
    log.info("store %s: checksums recorded for %d finished tiles (%d marked not done); now "
             "format %d", path, len(finished) - len(reset), len(reset), FORMAT_VERSION)
    return {"tiles": len(finished) - len(reset), "reset": reset, "runs": len(old_runs)}


def _create_bookkeeping_upgrade(g, grid, n_arrays, sums) -> None:
    """The checksum array (written whole), runs and claims groups of a store being upgraded
    from format 1 (its markers are kept)."""
    from zarr.codecs import Crc32cCodec, ZstdCodec
    arr = g.create_array(CHECKSUMS, shape=tuple(grid) + (n_arrays, 2), chunks=(1, 1, n_arrays, 2),
                         dtype="uint64", fill_value=0,
                         compressors=[ZstdCodec(level=0, checksum=False), Crc32cCodec()],
                         overwrite=True)
    arr[...] = sums
    g.require_group(RUNS)
    g.require_group(CLAIMS)


# ----------------------------------------------------------------------------- reading Grams
def kernel_arrays(group) -> list[str]:
    """The kernel arrays of a store's group ("ntk", "nngp", "depth_11/ntk", ...), sorted; the
    markers, checksums, runs and claims are not among them."""
    return sorted(k for k, _ in group.arrays() if k not in BOOKKEEPING) + sorted(
        f"{g}/{k}" for g, sub in group.groups() if g not in BOOKKEEPING for k, _ in sub.arrays())


def _memory_limits(device, max_memory):
    """``[(where, bytes)]`` the load must fit in: host RAM, plus the GPU for device="cuda"."""
    if max_memory is not None:
        return [("the limit", int(max_memory))]
    if device == "cuda":
        return [("free GPU memory", available_gpu_memory()),
                ("available RAM", available_memory())]
    return [("available RAM", available_memory())]


def _is_store(g) -> bool:
    spec = g.attrs.get("cntk_engine")
    return isinstance(spec, dict) and spec.get("format") == FORMAT


def _enclosing_store(arr):
    """(root group, path of the array ``arr`` in it) where ``arr`` lies in a cntk_engine store
    (one or two levels down: ``ntk``, ``depth_11/ntk``), else (None, None).  Found within
    ``arr``'s own Zarr store, or, for an array opened at its folder inside the store's folder
    (``zarr.open("s.zarr/depth_11/ntk")``, whose own store then starts there), on the file
    system: such an array must be checked as the store's own arrays are."""
    zarr = require_zarr()
    parts = [p for p in str(getattr(arr, "path", "") or "").split("/") if p]
    for up in range(1, min(2, len(parts)) + 1):
        try:
            g = zarr.open_group(arr.store, path="/".join(parts[:-up]), mode="r")
        except Exception:  # noqa: BLE001 - not inside a group
            continue
        if _is_store(g):
            return g, "/".join(parts[-up:])
    try:
        here = _group_path(arr)
    except Exception:  # noqa: BLE001 - not a local store
        return None, None
    for folder in list(here.parents)[:2]:
        if not (folder / "zarr.json").is_file():
            continue
        try:
            g = zarr.open_group(str(folder), mode="r")
        except Exception:  # noqa: BLE001
            continue
        if _is_store(g):
            return g, here.relative_to(folder).as_posix()
    return None, None


def _verified_read(spec: dict | None) -> bool:
    """Whether :func:`load_gram` reads through the store's checksums (:func:`_scan`), tile row
    by tile row, rather than as a plain array (a format-1 store, an array of no store)."""
    return spec is not None and spec.get("format_version") == FORMAT_VERSION


def _read_buffers(arr, spec: dict | None) -> int:
    """Bytes the reading itself holds beside the result: a store's verified read takes up to
    min(8, cores) row blocks of tiles at once (tile x n2 values each, about 3 times over while
    zarr decodes them: _scan); a plain array's read decodes up to 10 chunks at once (2 times
    each).  Measured with tracemalloc (n = 400): the verified read held 3.2 x K at tile 200."""
    if _verified_read(spec):
        t, n1, n2 = int(spec["tile"]), int(spec["n1"]), int(spec["n2"])
        blocks = min(8, os.cpu_count() or 1, -(-n1 // t))
        return blocks * 3 * t * n2 * 8
    chunk = int(np.prod(getattr(arr, "chunks", arr.shape))) * max(8, np.dtype(arr.dtype).itemsize)
    n_chunks = int(np.prod([-(-s // c) for s, c in zip(arr.shape, getattr(arr, "chunks", arr.shape))]))
    return min(10, n_chunks) * 2 * chunk


def _check_load_options(max_memory, workspace) -> None:
    if max_memory is not None and (isinstance(max_memory, bool) or not isinstance(
            max_memory, (int, np.integer)) or max_memory <= 0):
        raise ValueError("max_memory must be a positive number of bytes (an int, e.g. 8 * 2**30) "
                         f"or None (the available memory); got {max_memory!r}")
    if not callable(workspace):
        _check_workspace(workspace)


def _check_workspace(workspace) -> float:
    if isinstance(workspace, bool) or not isinstance(workspace, (int, float, np.number)) or \
            not math.isfinite(workspace) or workspace < 0:
        raise ValueError("workspace must be a number >= 0 (copies of K the solve needs beyond it), "
                         f"or a function of K's side n returning one; got {workspace!r}")
    return float(workspace)


@dataclass
class _Stored:
    """A kernel array found for loading (:func:`_locate`): the array, its name in messages
    (``where``) and in its store (``key``), and, inside a cntk_engine store, the store's root
    group, folder, job record and done map (None outside one)."""
    arr: object
    key: str | None
    where: str
    root: object = None
    store_path: Path | None = None
    spec: dict | None = None
    done: np.ndarray | None = None

    @property
    def shape(self) -> tuple:
        return tuple(self.arr.shape)

    @property
    def nbytes(self) -> int:
        return self.shape[0] * self.shape[1] * 8

    def reading(self) -> int:
        """Bytes held beside the float64 result while it is read: the raw array where it is
        not float64, and the reading's buffers."""
        raw = 0 if np.dtype(self.arr.dtype) == np.float64 else \
            self.shape[0] * self.shape[1] * np.dtype(self.arr.dtype).itemsize
        return raw + _read_buffers(self.arr, self.spec)


def _open_path(path, role: str | None = None, *, group: bool = False):
    """The Zarr node (``group``: the group) at ``path``, opened read-only; ``role``: the
    argument it was given as, for the messages (None: load_gram's single source)."""
    zarr = require_zarr()
    named = arg(role, str(path)) if role else repr(str(path))
    if not os.fspath(path):            # Path('') is the current folder
        raise ValueError(f"{named} is empty; give the path of a Zarr store (a folder)")
    if not Path(path).exists():
        raise FileNotFoundError(f"{arg(role) + ': ' if role else ''}Zarr store {str(path)!r} does not exist")
    if Path(path).is_file():           # zarr's own words would be "No group found in store"
        raise ValueError(f"{named} is a file; a Zarr store is a folder, as gram writes it")
    try:
        return (zarr.open_group if group else zarr.open)(os.fspath(path), mode="r")
    except Exception as e:  # noqa: BLE001 - not a store
        raise ValueError(f"{named} is not a readable Zarr {'group' if group else 'store'}: {e}") from None


def _where(source, role: str | None = None) -> str:
    """How messages name ``source``: a path as given; a Zarr group or array of a local store
    by its folder (:func:`_group_path`); another (an in-memory store) as "the zarr.Group given
    (as ``role``)"."""
    if isinstance(source, (str, os.PathLike)):
        return repr(str(source))
    if getattr(getattr(source, "store", None), "root", None) is not None:
        return repr(str(_group_path(source)))
    return f"the zarr.{type(source).__name__} given" + (f" as {arg(role)}" if role else "")


def _the_store(where: str) -> str:
    """"the store at '<folder>'", or what :func:`_where` said of a store without one."""
    return f"the store at {where}" if where.startswith(("'", '"')) else where


def _locate(source, key: str | None, device) -> _Stored:
    """The kernel array ``key`` of ``source`` (a store path, group or array), checked: in a
    cntk_engine store, a kernel array of a finished job; 2-D, real."""
    zarr = require_zarr()
    where = _where(source)
    if isinstance(source, (str, os.PathLike)):
        source = _open_path(source)
    if isinstance(source, zarr.Group):
        names = kernel_arrays(source)
        if key is None:
            if len(names) != 1:
                raise ValueError(f"{_the_store(where)} holds arrays {names}: name one as key=")
            key = names[0]
        if key not in names:
            raise ValueError(f"{_the_store(where)} has no array {key!r}; it holds {names}")
        arr = source[key]
    elif isinstance(source, zarr.Array):
        arr = source
        if key is not None:
            raise ValueError("key= applies to a Zarr group or store path, not to a zarr.Array")
    else:
        raise ValueError(f"source must be a zarr.Array, a zarr.Group or a store path; got {type(source).__name__}")
    found = _Stored(arr, key, where)
    # the store the array belongs to, however it was reached (its root, a sub-group, a folder
    # inside it): its job must be finished and its chunks verified
    root, path_in_root = _enclosing_store(arr)
    if root is not None:
        found.root, found.key = root, path_in_root
        found.store_path = store_path = _group_path(root)
        found.spec = spec = _checked_layout(dict(root.attrs["cntk_engine"]), repr(str(store_path)))
        if found.key not in _spec_arrays(spec):
            raise ValueError(f"{found.key!r} of the Gram store at {str(store_path)!r} is not a kernel "
                             f"array; its kernels are {_spec_arrays(spec)}")
        _check_arrays(store_path, root, [found.key, DONE] + ([CHECKSUMS] if _verified_read(spec) else []),
                      repr(str(store_path)), spec)
        found.done = done = read_done(store_path, root[DONE], warn=False)   # once: the scan reads the same
        tiles = GramStore._expected_tiles(spec)
        left = sum(1 for t in tiles if done[t.i, t.j] == 0)
        if left:
            raise ValueError(f"the Gram store at {str(store_path)!r} ({found.key!r} from {where}) is "
                             f"unfinished: {left} of {len(tiles)} tiles are not computed yet; rerun the "
                             "gram job with --resume / the same out=")
    key = found.key
    if len(found.shape) != 2:
        raise ValueError(f"the Zarr array {key or ''} has shape {found.shape}; a kernel matrix is 2-D")
    if device not in DEVICES:
        raise ValueError(f"device must be one of {DEVICES}; got {device!r}")
    if np.dtype(arr.dtype).kind == "c":
        raise ValueError(f"the Zarr array {key or ''} is complex ({arr.dtype}); a Gram matrix is real")
    return found


def _check_memory(kernels: list[tuple[str, _Stored]], workspace, device, max_memory) -> None:
    """Refuse (:class:`GramTooLarge`), before anything is read, to load the ``(label, kernel)``
    pairs where they do not fit: the float64 matrices, ``workspace`` copies of the first (the
    matrix the solve factorises) and the reading's buffers (one matrix is read at a time); log
    what they take where they fit."""
    n = kernels[0][1].shape[0]
    if callable(workspace):          # the solve's figure for this n (solver.solve_workspace)
        workspace = _check_workspace(workspace(n))
    sizes = [k.nbytes for _, k in kernels]
    readings = [k.reading() for _, k in kernels]
    total, work = sum(sizes), workspace * sizes[0]
    # where the solve runs: its workspace, or (on the host) the reading's, whichever is larger
    need = total + (work if device == "cuda" else max([work] + readings))
    # read for the GPU, the host holds one float64 matrix and its reading's buffers at a time
    staged = max(s + r for s, r in zip(sizes, readings))
    it = "it" if len(kernels) == 1 else "them"
    matrices = " and ".join(f"{label} {k.shape[0]} x {k.shape[1]} from {k.where}"
                            for label, k in kernels)
    for place, limit in _memory_limits(device, max_memory):
        staging = place == "available RAM" and device == "cuda"
        want = staged if staging else need
        what = (f"{format_bytes(want)} on the host to read {it} for the GPU" if staging else
                f"{format_bytes(need)} with the solve's workspace ({workspace:g} "
                f"cop{'y' if workspace == 1 else 'ies'})")
        msg = (f"{matrices}: {format_bytes(total)} as float64, {what}; {place} "
               f"{format_bytes(limit)}")
        if want > limit:
            limit_option = settable("max_memory")
            raise GramTooLarge(msg + ": does not fit. Free memory, "
                               + (f"raise {limit_option}, " if limit_option else "")
                               + "solve on a larger machine, or use fewer training samples",
                               limit=place, staging=staging, n=n)
    log.info("loading " + msg)


def _read(found: _Stored, device):
    """The float64 matrix of a located kernel array, read through its store's checksums where
    it has them (:class:`StoreCorrupt` names the first failing tile)."""
    if _verified_read(found.spec):
        # NaN, not np.empty: a tile the scan did not write can never pass for kernel values
        K = np.full(found.shape, np.nan)
        scan = _scan(found.store_path, found.root, found.spec, found.done, names=[found.key], into=K)
        if scan.damage:
            first = scan.damage[0]
            more = len({d.tile for d in scan.damage}) - 1
            raise StoreCorrupt(
                f"the Gram store at {str(found.store_path)!r} fails verification: {first}"
                + (f" (and {more} more tiles)" if more > 0 else "")
                + f"; `cntk-engine verify {found.store_path}` lists every damaged tile, and resuming "
                "the gram job (--resume / the same out=) computes them again")
    else:
        if found.spec is not None:
            log.warning("the Gram store at %s has no per-tile checksums (format %s): its values "
                        "cannot be verified; `cntk-engine verify %s --add-checksums` records "
                        "checksums of its data as it is now", found.where,
                        found.spec.get("format_version"), found.store_path)
        K = np.asarray(found.arr[...], dtype=np.float64)
    return cupy_module().asarray(K) if device == "cuda" else K


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
    ``workspace``: copies of K the solver needs beyond it: about 1 for ``fit_ridge``,
    ``kernel_ridge``, ``gp_posterior`` (the default: 1); about 3 for ``eigh``, ``loo``,
    ``select_ridge``, ``kfold`` and ``gradient_flow``; one less where the solve is given K
    (``overwrite_k``); ``solver.solve_workspace(factorisation, device, overwrite_k=..., n=...)``
    gives the figures measured, with a margin, and the GPU's (``docs/solver.md``).  Or a
    function of K's side n returning that number (read from the store before anything else).
    Reading a non-float64 array also holds the raw array while converting it.  A store whose job is
    unfinished is refused (its missing tiles read as NaN).  An array of a cntk_engine store is
    verified as it is read (every chunk decodes and matches its checksum) and
    :class:`StoreCorrupt` names the first failing tile; a format-1 store (no checksums) is
    read with a warning that it cannot be verified.  A training Gram and its test kernel from
    two stores: :func:`load_train_test`, which also checks that they belong together."""
    _check_load_options(max_memory, workspace)
    found = _locate(source, key, device)
    _check_memory([(f"Gram {found.key or ''}", found)], workspace, device, max_memory)
    return _read(found, device)


@dataclass(frozen=True)
class TrainTestKernels:
    """What :func:`load_train_test` returns, unpacked as ``K, K_test``: the (n, n) training
    Gram and the (m, n) test kernel; ``keys``: the arrays read (the train store's, the test
    store's); ``transposed``: the test store held train x test; ``architecture``: the network
    both were computed with (their job record's, ``Architecture.to_dict``)."""
    K: object
    K_test: object
    keys: tuple[str, str]
    transposed: bool = False
    architecture: dict | None = None
    dtype: str | None = None          # the training Gram's compute dtype, as its store records it

    def __iter__(self):
        return iter((self.K, self.K_test))


#: Record fields two stores of one model may differ in: what computed them (backend, dtype,
#: package version, format) and their image sets (compared by fingerprint, not field by field)
#: and kernels and depths (compared through the array asked for).
_NOT_THE_MODEL = ("backend", "dtype", "version", "format", "format_version", "n1", "n2",
                  "symmetric", "fingerprint", "image_shape", "kernel", "kernels")


def _readouts(spec: dict) -> dict[str, tuple[int, str]]:
    """{array name: (depth, kernel)} of a store's job record."""
    return {name: dk for dk, name in array_names(tuple(spec["architecture"]["depths"]),
                                                  spec["kernel"]).items()}


def _train_test_pair(a: dict, b: dict, wheres: tuple[str, str]) -> bool:
    """Check that the store of job record ``b`` (``gram(x_test, x_train)``) holds the test
    kernel of the model whose training Gram the store of record ``a`` (``gram(x_train)``, or
    ``gram(x_train, x_train.copy())``) holds: the same network and readout, computed against the very training images (their
    fingerprints), else ValueError naming the difference.  Returns whether ``b``'s job was
    computed the other way round, ``gram(x_train, x_test)`` (its transpose is the test
    kernel)."""
    t_where, s_where = wheres
    fp = a["fingerprint"]["x1"]
    if not a.get("symmetric") and a["fingerprint"]["x2"] != fp:
        swapped = " (train and test given the other way round?)" if b.get("symmetric") else ""
        raise ValueError(f"the train store at {t_where} holds a {a['n1']} x {a['n2']} kernel of "
                         "two image sets; the training Gram is the symmetric gram(x_train) "
                         f"(cntk-engine gram TRAIN, no --x2){swapped}")
    if b.get("symmetric"):
        same = " (the training images themselves)" if b["fingerprint"]["x1"] == fp else ""
        raise ValueError(f"the test store at {s_where} holds the symmetric Gram of one image "
                         f"set{same}; the test kernel is gram(x_test, x_train) (cntk-engine gram "
                         "TEST --x2 TRAIN)")
    def model(r):                      # depths: compared through the kernel asked for
        m = {k: v for k, v in r.items() if k not in _NOT_THE_MODEL}
        m["architecture"] = {k: v for k, v in r["architecture"].items() if k != "depths"}
        return m
    diffs = spec_differences(model(a), model(b), sides=("the train store has", "the test store"))
    if a.get("image_shape") != b.get("image_shape"):
        diffs.insert(0, f"image shape (C, H, W): the train store has {tuple(a['image_shape'])}, "
                        f"the test store {tuple(b['image_shape'])}")
    if diffs:
        raise ValueError(f"the stores at {t_where} (train) and {s_where} (test) are not kernels of "
                         f"one model: {'; '.join(diffs)}")
    if b["fingerprint"]["x2"] == fp:
        return False
    if b["fingerprint"]["x1"] == fp:
        return True
    raise ValueError(
        f"the test store at {s_where} was not computed against the training images of the train "
        f"store at {t_where}: neither of its image sets ({b['n1']} and {b['n2']} images) is the "
        f"train store's {a['n1']} images (sha256 {fp[:12]}...): the images differ in their subset, "
        "order or pixel values (e.g. uint8 against the same images divided by 255); compute the "
        "test kernel against the training store's images")


def _store_record(source, role: str) -> tuple[object, str, dict]:
    """(group, its name in messages, job record) of the store ``source`` (a path or a store's
    root ``zarr.Group``) given as ``role``."""
    zarr = require_zarr()
    where = _where(source, role)
    if isinstance(source, (str, os.PathLike)):
        source = _open_path(source, role, group=True)
    elif not isinstance(source, zarr.Group):
        raise ValueError(f"{arg(role)} must be the path or the zarr.Group of a Gram store written by "
                         f"gram(..., out=...); got {type(source).__name__}")
    if not _is_store(source):
        raise ValueError(f"{arg_prefix(role)}{where} is not the root of a cntk_engine Gram store "
                         "(gram(..., out=...)): load_train_test checks two stores' job records; "
                         "load a plain array with load_gram")
    return source, where, _checked_layout(dict(source.attrs["cntk_engine"]),
                                          f"{arg_prefix(role)}{where}")


def _pair_keys(a: dict, b: dict, key, wheres) -> tuple[str, str]:
    """The array names, in the train store (record ``a``) and the test store (``b``), of the
    kernel ``key`` names in the train store (None: the one kernel both hold)."""
    train_r, test_r = _readouts(a), _readouts(b)
    test_names = {dk: name for name, dk in test_r.items()}
    both = [name for name, dk in train_r.items() if dk in test_names]
    if not both:
        raise ValueError(f"the stores at {wheres[0]} (train) and {wheres[1]} (test) hold no kernel "
                         f"of the same depth and kind: the train store holds {_held(train_r)}; the "
                         f"test store {_held(test_r)}")
    if key is None:
        if len(both) != 1:
            raise ValueError(f"both stores hold the kernels {sorted(both)} (as the train store "
                             "names them): name one " + (f"with {option('key')}" if option('key')
                                                         else "as key="))
        key = both[0]
    if not isinstance(key, str) or key not in train_r:
        raise ValueError(f"the train store at {wheres[0]} has no kernel array {key!r}; it holds "
                         f"{sorted(train_r)}")
    if train_r[key] not in test_names:
        d, k = train_r[key]
        raise ValueError(f"the test store at {wheres[1]} holds no {k} kernel at depth {d} (the "
                         f"train store's {key!r}); it holds {_held(test_r)}")
    return key, test_names[train_r[key]]


def _held(readouts: dict) -> str:
    """A store's kernels (:func:`_readouts`) with their depths, which a single-depth store's
    array names leave out."""
    return ", ".join(f"{name!r} (depth {d} {k})" for name, (d, k) in sorted(readouts.items()))


def load_train_test(train, test, key: str | None = None, *, max_memory: int | None = None,
                    workspace: float = 1.0, device=None, x_train=None, x_test=None,
                    data_format: str | None = None) -> TrainTestKernels:
    """Load a model's training Gram and test kernel from two stores, checked to belong together.

    ``train``: the store (path or root ``zarr.Group``) of ``gram(x_train, out=...)``;
    ``test``: that of ``gram(x_test, x_train, out=...)`` (``cntk-engine gram TEST --x2
    TRAIN``), or of ``gram(x_train, x_test, out=...)``, whose transpose is then returned.
    Returns ``(K, K_test)``, float64 (n, n) and (m, n) (NumPy, or CuPy with
    ``device="cuda"``), for :func:`~cntk_engine.solver.fit_ridge` and the rest of the solver.
    ``key``: the kernel as the train store names it (``"ntk"``, ``"depth_11/nngp"``); the test
    store's array of the same depth and kernel is taken however it is named there (a store of
    several depths names it ``depth_<d>/<kernel>``, one of a single depth ``<kernel>``);
    default: the one kernel both stores hold.

    Refused before anything is read, naming the difference: stores of different networks or
    readouts (architecture, pooling, LAP window, flips, fix, convention, weights, filter size,
    image shape), a test kernel computed against other training images (another subset, order
    or pixel scaling: the stores' sha256 fingerprints of the images differ), a train store of
    two different image sets, a symmetric test store.  The backend, compute dtype and package
    version may differ (the same kernel, to rounding).  The records are compared as resuming a
    store compares them: a preset and its ``serial(...)`` spelling are one network (their
    layers decide), ``W_std`` left out and given as its default are not.  Each matrix is then
    loaded as :func:`load_gram` loads it (finished jobs only, every chunk verified), after the
    memory of both matrices,
    the reading's buffers and ``workspace`` copies of K is checked (``max_memory``,
    ``workspace``, ``device``: as for :func:`load_gram`).

    ``x_train`` / ``x_test``: the images the stores must have been computed from, as they were
    given to ``gram`` (``data_format`` as there), checked by their fingerprints before anything
    is read: labels kept beside these images are then the kernels' (row i of ``K_test`` is
    ``x_test[i]``)."""
    _check_load_options(max_memory, workspace)
    if device not in DEVICES:
        raise ValueError(f"device must be one of {DEVICES}; got {device!r}")
    g_train, w_train, a = _store_record(train, "train")
    g_test, w_test, b = _store_record(test, "test")
    transposed = _train_test_pair(a, b, (w_train, w_test))
    for name, x, role, where, fp in (
            ("x_train", x_train, "train", w_train, a["fingerprint"]["x1"]),
            ("x_test", x_test, "test", w_test, b["fingerprint"]["x2" if transposed else "x1"])):
        if x is not None and fingerprint(to_host(as_images(x, data_format, name))) != fp:
            n = a["n1"] if role == "train" else (b["n2"] if transposed else b["n1"])
            raise ValueError(f"{name} ({len(x)} images) are not the images the {role} store at "
                             f"{where} was computed from ({n} images there; their sha256 differ: "
                             f"another subset, order or pixel scaling, or another {arg('data_format')}): "
                             "labels kept with them would not be the kernel's")
    train_key, test_key = _pair_keys(a, b, key, (w_train, w_test))
    k_train, k_test = _locate(train, train_key, device), _locate(test, test_key, device)
    k_train.where, k_test.where = w_train, w_test
    _check_memory([(f"train Gram {train_key}", k_train),
                   (f"test kernel {test_key}" + (" (stored transposed)" if transposed else ""), k_test)],
                  workspace, device, max_memory)
    K = _read(k_train, device)
    K_test = _read(k_test, device)
    if transposed:
        log.info("the test store at %s holds gram(x_train, x_test): its transpose is the test "
                 "kernel", w_test)
        K_test = K_test.T
    # the dtype the training Gram was computed in: the reference backend computes in float64
    # whatever its record says (records of 0.x said the dtype asked for)
    dtype = "float64" if a.get("backend") == "reference" else a.get("dtype")
    return TrainTestKernels(K, K_test, (train_key, test_key), transposed, a.get("architecture"),
                            dtype)


def _group_path(group) -> Path:
    """The directory of a (local) store's group."""
    root = getattr(group.store, "root", None)
    base = Path(str(root)) if root is not None else Path(str(group.store).replace("file://", ""))
    return base / group.path if group.path else base
