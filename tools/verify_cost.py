"""What verifying a Gram store costs, on a store of realistic size built without computing.

    python tools/verify_cost.py --n 20000 --tile 512 --dir /scratch/vc [--keep]

Builds an N x N symmetric store (one kernel, float64: N^2 x 8 bytes, 3.2 GB at N = 20,000)
through the store's own machinery (``GramStore``, ``StoreSink``, ``run_tiles`` with claims:
checksums, crc32c, markers, exactly as a real job writes), with a backend that returns random
readout sums at once instead of computing kernels (random float64 values barely compress: the
worst case for reading).  Then times :func:`cntk_engine.jobs.store.verify_store` twice: from
disk, after every chunk file was evicted from the page cache (``posix_fadvise(DONTNEED)`` on
each file: no privileges needed, other files untouched), and again with the files cached.
Prints one JSON record (machine, sizes, seconds, MB/s) and removes the store unless ``--keep``.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from contextlib import nullcontext
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from cntk_engine.arch import make_architecture  # noqa: E402
from cntk_engine.cli.common import machine  # noqa: E402
from cntk_engine.backends.base import Backend, Prepared  # noqa: E402
from cntk_engine.backends.numba_cpu import NumbaBackend  # noqa: E402
from cntk_engine.jobs import GramJob  # noqa: E402
from cntk_engine.jobs import store as st  # noqa: E402
from cntk_engine.jobs.local import Worker, run_tiles  # noqa: E402
from cntk_engine.jobs.tiles import TileLayout  # noqa: E402


class RandomSums(Backend):
    """Random positive readout sums at once (a diagonal tile symmetric, as a real one is)."""

    name = "numba"          # the job record names a real backend

    @classmethod
    def traits(cls):
        return NumbaBackend.traits()

    def prepare(self, x):
        return Prepared(x, ())

    def pair_sums(self, a, b, symmetric=False):
        rng = np.random.default_rng(len(a) * 7919 + len(b))
        s = rng.random((len(a), len(b), len(self.arch.depths), 2)) + 0.5
        if symmetric:
            s = (s + s.transpose(1, 0, 2, 3)) / 2
        return s


def evict(path: Path) -> int:
    """Drop every file under ``path`` from the page cache; returns the bytes on disk."""
    total = 0
    for root, _, files in os.walk(path):
        for name in files:
            f = os.path.join(root, name)
            fd = os.open(f, os.O_RDONLY)
            try:
                total += os.fstat(fd).st_size
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)
    return total


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=20000)
    ap.add_argument("--tile", type=int, default=512)
    ap.add_argument("--dir", required=True, help="folder for the store (needs N^2 x 8 bytes free)")
    ap.add_argument("--workers", type=int, default=None, help="verify threads (default: verify's)")
    ap.add_argument("--keep", action="store_true", help="keep the store")
    args = ap.parse_args(argv)
    if not Path(args.dir).is_dir():
        ap.error(f"--dir {args.dir}: not an existing folder; give the folder for the store")
    n, tile = args.n, args.tile
    out = Path(args.dir) / f"verify_cost_{n}.zarr"
    shutil.rmtree(out, ignore_errors=True)
    arch = make_architecture(depth=3)
    x = np.zeros((n, 1, 1, 1))
    params = arch.layer_params(1, 1, 1)
    job = GramJob(x1=x, x2=None, arch=arch, params=params, kernel="ntk",
                  dtype=np.dtype(np.float32), backend=RandomSums, tile=tile, out=str(out))
    t0 = time.perf_counter()
    store = st.GramStore.open_for_job(job, tile=tile, tile_given=True)
    tiles = TileLayout(n, n, tile, True).tiles()
    run_id = store.begin_run(len(tiles), "verify_cost")
    sink = store.sink(job, run_id)
    worker = Worker("w", nullcontext, lambda: RandomSums(arch, params, np.dtype(np.float32)))
    run_tiles([worker], x, None, tiles, sink, None, claim=sink.claim)
    write_s = time.perf_counter() - t0
    store.end_run(run_id, write_s, tiles_computed=len(tiles))
    on_disk = evict(out)
    t0 = time.perf_counter()
    cold = st.verify_store(out, workers=args.workers)
    cold_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    warm = st.verify_store(out, workers=args.workers)
    warm_s = time.perf_counter() - t0
    assert cold.ok and warm.ok and cold.tiles_finished == len(tiles)
    rec = {
        "machine": machine(),
        "n": n, "tile": tile, "tiles": len(tiles), "matrix_bytes": n * n * 8, "bytes_on_disk": on_disk,
        "write_seconds": round(write_s, 2),
        "write_mb_per_s": round(n * n * 8 / write_s / 1e6, 1),
        "verify_from_disk_seconds": round(cold_s, 2),
        "verify_from_disk_mb_per_s": round(cold.bytes_read / cold_s / 1e6, 1),
        "verify_cached_seconds": round(warm_s, 2),
        "verify_cached_mb_per_s": round(warm.bytes_read / warm_s / 1e6, 1),
        "bytes_verified": cold.bytes_read,
        "verify_threads": args.workers or min(8, os.cpu_count() or 1),
    }
    print(json.dumps(rec, indent=1))
    if not args.keep:
        shutil.rmtree(out, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
