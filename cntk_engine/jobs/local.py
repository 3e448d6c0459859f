"""Tiles on this machine: worker threads, devices, progress.

* CPU backends (numba, reference): one worker, in the calling thread; the backend itself uses
  every core inside one ``pair_sums`` call (numba: parallel over the pairs of the tile).
* GPU backends: one worker thread per GPU (all visible GPUs, or ``devices=[...]``), each inside
  ``cupy.cuda.Device(i)`` with its own non-blocking stream, its own backend instance and its own
  prepared copy of the images.  Tiles are pulled from one shared queue, largest first (the
  smaller diagonal and edge tiles last), which keeps the tail short.

Each worker prepares the images once (per-image diagonals computed once, shared by every
tile), then hands each tile's readout sums, where the backend produced them, to the sink.
"""
from __future__ import annotations

import contextvars
import logging
import threading
import time
from collections import deque
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np

from ..arrays import cupy_module, free_device_memory, gpu_count, to_device
from ..spelling import arg, as_written
from .tiles import Tile, largest_first

log = logging.getLogger("cntk_engine")


def check_devices(devices) -> list[int] | None:
    """``devices`` as ``gram`` takes it, checked: None for None or "all" (every visible GPU;
    every core for a CPU backend), else the list of distinct GPU ids (an integer, a NumPy
    integer or a 0-d integer array is one id; a list, tuple or NumPy array several).  A
    ValueError names what is accepted otherwise."""
    if devices is None or (isinstance(devices, str) and devices == "all"):
        return None
    given = devices
    if isinstance(devices, np.ndarray) and devices.ndim == 0:
        devices = devices.item()
    if isinstance(devices, (int, np.integer)) and not isinstance(devices, (bool, np.bool_)):
        devices = [devices]
    if isinstance(devices, (str, bytes)) or not hasattr(devices, "__iter__"):
        raise ValueError(f"{arg('devices')} must be None, 'all' or a list of GPU ids; got {given!r}")
    devices = list(devices)
    if not devices or any(isinstance(d, (bool, np.bool_)) or not isinstance(d, (int, np.integer)) or d < 0
                          for d in devices):
        raise ValueError(f"{arg('devices')} must be 'all' or a non-empty list of GPU ids (integers "
                         f">= 0); got {as_written('devices', given)}")
    devices = [int(d) for d in devices]
    if len(set(devices)) != len(devices):
        raise ValueError(f"{arg('devices')} must not repeat; got {as_written('devices', devices)}")
    return devices


def resolve_devices(device_kind: str, devices: list[int] | None) -> list[int] | None:
    """GPU ids to use (a GPU backend), or None for a CPU backend.  ``devices``: what
    :func:`check_devices` made of the argument (None: every visible GPU).  ``device_kind``: the
    backend's ``traits().device``, "cpu" or "gpu"."""
    if device_kind != "gpu":
        if devices is not None:
            raise ValueError(f"{arg('devices', devices)} selects GPUs, but this backend runs on the "
                             f"CPU (with every core); use {arg('backend', 'cuda')} or leave "
                             f"{arg('devices')} unset")
        return None
    n = gpu_count()
    if n == 0:
        raise RuntimeError("the GPU backend found no visible GPU")
    if devices is None:
        return list(range(n))
    bad = [d for d in devices if d >= n]
    if bad:
        raise ValueError(f"{arg('devices', devices)}: no GPU {', '.join(map(str, bad))} here; "
                         f"{n} GPU(s) visible, ids 0 .. {n - 1}")
    return devices


def smallest_free_memory(devices: list[int] | None) -> int | None:
    """The least free memory over the GPUs that report a figure (the tile must fit on each);
    None for the CPU or when no GPU reports one.  A GPU that does not report is skipped, not
    read as "no limit" for the others."""
    if devices is None:
        return None
    known = [f for f in (free_device_memory(d) for d in devices) if f is not None]
    return min(known) if known else None


@dataclass
class Worker:
    """Where tiles run: a context to enter (device, stream), the backend to build inside it, and
    how the images reach it (onto its device for a GPU worker)."""

    name: str
    context: Callable[[], object]
    make_backend: Callable[[], object]
    to_device: Callable = staticmethod(lambda x: x)
    # waits, inside ``context``, for the work queued there (a GPU's stream): what a clock read
    # after it measures is done
    synchronize: Callable[[], None] = staticmethod(lambda: None)


@contextmanager
def _gpu_context(device: int):
    cupy = cupy_module()
    with cupy.cuda.Device(device):
        stream = cupy.cuda.Stream(non_blocking=True)
        with stream:
            yield
        stream.synchronize()      # every tile's result is complete when the worker ends


def local_workers(make_backend: Callable[[], object], devices: list[int] | None) -> list[Worker]:
    if devices is None:
        return [Worker("cpu", nullcontext, make_backend)]
    return [Worker(f"gpu{d}", (lambda d=d: _gpu_context(d)), make_backend, to_device,
                   lambda: cupy_module().cuda.get_current_stream().synchronize())
            for d in devices]


class Progress:
    """tqdm bar over the job's pairs (pairs/s, ETA), or nothing; updated from any thread.  With
    several writers on one store it counts the tiles the others hold as they are met (so the
    rate and ETA are the job's) and is set from the store's markers after each round."""

    def __init__(self, total_pairs: int, enabled: bool, desc: str = "gram"):
        self.bar = None
        self.lock = threading.Lock()
        if enabled and total_pairs > 0:
            from tqdm.auto import tqdm
            self._drawing(lambda: setattr(self, "bar", tqdm(
                total=total_pairs, unit="pair", unit_scale=total_pairs >= 10000, desc=desc,
                dynamic_ncols=True, smoothing=0.05)))

    def _drawing(self, draw) -> None:
        """``draw()``, the bar dropped where it cannot be drawn (standard error closed, full or
        a pipe whose reader left): a job is not stopped by its progress display."""
        try:
            draw()
        except (OSError, ValueError, AttributeError):
            self.bar = None

    def update(self, pairs: int) -> None:
        if self.bar is not None:
            with self.lock:
                if self.bar is not None:
                    self._drawing(lambda: self.bar.update(pairs))

    def set_done(self, pairs: int) -> None:
        """The pairs done so far, as the store says (another writer may have died holding
        tiles this bar counted)."""
        def draw():
            if self.bar.n != pairs:
                self.bar.n = pairs
                self.bar.refresh()
        if self.bar is not None:
            with self.lock:
                if self.bar is not None:
                    self._drawing(draw)

    def close(self) -> None:
        if self.bar is not None:
            self._drawing(self.bar.close)


def run_tiles(workers: Sequence[Worker], x1, x2, todo: Sequence[Tile],
              sink: Callable[[Tile, object], bool | None], progress: Progress | None = None,
              claim: Callable[[Tile], bool] | None = None,
              prepare_seconds: dict | None = None) -> dict:
    """Compute every tile of ``todo`` and hand (tile, float64 sums) to ``sink``, the sums where
    the backend produced them (NumPy, or CuPy on the worker's GPU).

    ``x2=None``: symmetric (x1 against itself).  ``sink`` returns False for a tile it did not
    take (its claim was taken over: not counted).  Each worker prepares the images once, then pulls
    tiles from a shared queue (largest first).  One worker runs in the calling thread; several
    run one thread each.  The first error stops every worker and is raised here.  ``claim``:
    called with each tile before it is computed; a tile it returns False for is skipped
    (another process computes it: the store's claims).  Returns {worker name: tiles computed};
    ``prepare_seconds``, a dict, gets {worker name: seconds its preparation of the images took}
    (the per-image diagonals: what a Gram of few images spends beside its pairs).
    """
    queue = deque(largest_first(todo))     # popleft: list.pop(0) is O(tiles), O(tiles^2) in all
    lock = threading.Lock()
    done = {w.name: 0 for w in workers}
    stop = threading.Event()
    errors: list[BaseException] = []

    def next_tile():
        with lock:
            return queue.popleft() if queue and not stop.is_set() else None

    def work(w: Worker):
        try:
            with w.context():
                be = w.make_backend()
                t0 = time.perf_counter()
                pa = be.prepare_set(w.to_device(x1))
                pb = pa if x2 is None else be.prepare_set(w.to_device(x2))
                w.synchronize()
                seconds = time.perf_counter() - t0
                if prepare_seconds is not None:
                    prepare_seconds[w.name] = seconds
                log.debug("%s: prepared %d + %d images in %.3f s", w.name, len(pa),
                          0 if x2 is None else len(pb), seconds)
                while True:
                    t = next_tile()
                    if t is None:
                        return
                    if claim is not None and not claim(t):
                        if progress is not None:     # another writer's: the job's progress
                            progress.update(t.pairs)
                        continue
                    if sink(t, be.pair_sums(pa[t.rows], pb[t.cols], symmetric=t.diag)) is False:
                        continue            # its claim was taken over: the other writer's tile
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
        # each thread runs in a copy of the caller's context: an error raised there names the
        # caller's arguments as the caller wrote them (``spelling``: --tile on the command line)
        threads = [threading.Thread(target=contextvars.copy_context().run, args=(work, w),
                                    name=f"cntk-{w.name}", daemon=True) for w in workers]
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


__all__ = ["Worker", "local_workers", "run_tiles", "Progress", "check_devices", "resolve_devices",
           "smallest_free_memory"]
