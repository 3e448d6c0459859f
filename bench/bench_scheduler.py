"""Cost of the tile machinery itself, against the cost of a realistic GPU tile.

    python bench/bench_scheduler.py [--n 20000] [--tiles 24] [--pair-cost 5e-5] [--out-dir DIR]

What is measured (one process, this machine's CPU; no GPU needed):

1. Per-tile overhead of the scheduler with a *trivial* backend whose ``pair_sums`` returns zeros
   at once (so everything measured is machinery: queue, slicing of the prepared images, the
   host float64 tile, ``finalize``, writing into the result, the mirror, progress, the "done"
   marker), at the default GPU tile size (512) for N = 20,000 CIFAR-sized images (3 x 32 x 32),
   kernel="both", in memory and into a Zarr store.  Only a subset of the 820 tiles is run
   (``--tiles``, off-diagonal ones: they are the most expensive to write because of the mirror);
   the job-wide overhead is extrapolated as per-tile overhead x number of tiles, plus the one-off
   costs measured separately (sha256 fingerprint of the images; store creation; in memory, the
   first touch of the N x N result pages, paid once per job whatever the tiling).
2. The overhead as a share of a realistic GPU tile: ``--pair-cost`` seconds per pair (default
   1/20000 s: about the depth-21 GAP rate of the CUDA backend on an H100)
   x 262,144 pairs per 512 x 512 tile.
3. Multi-GPU efficiency that tiles allow: the largest-first queue is replayed exactly (a
   discrete-event simulation over the real tile list with tile time = pairs x pair cost) for
   G = 1..8 GPUs, N = 20,000 and 60,000; and a real threaded run with G worker threads whose
   backend *sleeps* for its scaled-down tile time (releasing the GIL as a GPU wait does) checks
   that the thread machinery reaches that bound.
4. The host I/O the store needs per GPU at that tile time, against the write rate measured in 1.

Writes <out-dir>/scheduler_<cpu model>_<cores>cpu_<date>.json.
"""
from __future__ import annotations

import argparse
import dataclasses
import heapq
import re
import shutil
import sys
import tempfile
import time
from contextlib import nullcontext
from pathlib import Path

import numpy as np

if __package__ in (None, ""):
    sys.path.append(str(Path(__file__).resolve().parents[1]))
from bench.common import (RESULTS, check_out_dir, int_at_least, machine, new_stem,  # noqa: E402
                          positive_float, run_main, write_json)
from cntk_engine.arch import make_architecture  # noqa: E402
from cntk_engine.backends.base import Backend, Prepared  # noqa: E402
from cntk_engine.backends.cuda import CudaBackend  # noqa: E402
from cntk_engine.jobs import GramJob  # noqa: E402
from cntk_engine.jobs.local import Progress, Worker, run_tiles  # noqa: E402
from cntk_engine.jobs.sinks import MemorySink  # noqa: E402
from cntk_engine.jobs.tiles import TileLayout, largest_first  # noqa: E402


class TrivialBackend(Backend):
    """Returns zero sums at once: every second measured is scheduler machinery."""

    name = "trivial"

    @classmethod
    def traits(cls):
        return CudaBackend.traits()

    def prepare(self, x):
        return Prepared(x, ())

    def pair_sums(self, a, b, symmetric=False):
        return np.zeros((len(a), len(b), len(self.arch.depths), 2))


class SleepingBackend(TrivialBackend):
    """Waits pairs x cost seconds (GIL released, like a thread waiting on its GPU)."""

    cost = 0.0

    def pair_sums(self, a, b, symmetric=False):
        n = len(a)
        pairs = n * (n + 1) // 2 if symmetric else n * len(b)
        time.sleep(pairs * self.cost)
        return super().pair_sums(a, b, symmetric)


def measure_overhead(n: int, tile: int, n_tiles: int, store_dir: Path | None, workers: int = 1):
    """Seconds per tile of the machinery for ``n_tiles`` off-diagonal tiles."""
    arch = make_architecture(depth=21)
    params = arch.layer_params(3, 32, 32)
    x = np.zeros((n, 3, 32, 32))
    layout = TileLayout(n, n, tile, True)
    todo = [t for t in layout.tiles() if not t.diag][:n_tiles]
    job = GramJob(x1=x, x2=None, arch=arch, params=params, kernel="both",
                  dtype=np.dtype(np.float32), backend=TrivialBackend, tile=tile)
    extra = {}
    if store_dir is None:
        sink = MemorySink(job, layout)
        # The result arrays' pages are touched for the first time by the tiles: a one-off cost of
        # the whole job (every page once; 2 x N^2 x 8 bytes), not a per-tile one.  A subset of
        # tiles would charge it to too few tiles (each first tile of a row band faults that band
        # in), so it is paid here, timed, and reported as one-off.
        t0 = time.perf_counter()
        for res in sink.result.values():
            for a in res.values():
                a.fill(0.0)
        extra["result_first_touch_seconds"] = time.perf_counter() - t0
        extra["result_bytes"] = sum(a.nbytes for r in sink.result.values() for a in r.values())
    else:
        from cntk_engine.jobs import store as st
        out = store_dir / "bench.zarr"
        shutil.rmtree(out, ignore_errors=True)
        job = dataclasses.replace(job, out=str(out))
        t0 = time.perf_counter()
        st.job_spec(job)
        extra["fingerprint_seconds"] = time.perf_counter() - t0
        extra["fingerprint_bytes"] = x.nbytes
        t0 = time.perf_counter()
        gs = st.GramStore.open_for_job(job, tile=tile, tile_given=True)
        extra["store_create_seconds"] = time.perf_counter() - t0 - extra["fingerprint_seconds"]
        run_id = gs.begin_run(len(todo), "bench")
        sink = gs.sink(job, run_id)
    ws = [Worker(f"w{i}", nullcontext, lambda: TrivialBackend(arch, params, np.float32))
          for i in range(workers)]
    bar = Progress(sum(t.pairs for t in todo), False)
    run_tiles(ws, x, None, todo[:1], sink, bar)              # warm (page faults, zarr pools)
    t0 = time.perf_counter()
    run_tiles(ws, x, None, todo[1:], sink, bar)
    dt = time.perf_counter() - t0
    per_tile = dt / (len(todo) - 1)
    bytes_per_tile = 2 * 2 * tile * tile * 8                   # 2 kernels, tile + mirror
    return per_tile, bytes_per_tile, extra, len(layout.tiles())


def simulate(n: int, tile: int, gpus: int, pair_cost: float) -> dict:
    """Exact replay of the largest-first queue: G workers each take the next tile when free."""
    tiles = largest_first(TileLayout(n, n, tile, True).tiles())
    free = [(0.0, g) for g in range(gpus)]
    heapq.heapify(free)
    total = 0.0
    for t in tiles:
        at, g = heapq.heappop(free)
        dur = t.pairs * pair_cost
        total += dur
        heapq.heappush(free, (at + dur, g))
    makespan = max(a for a, _ in free)
    return {"n": n, "tile": tile, "gpus": gpus, "tiles": len(tiles), "gpu_seconds": total,
            "makespan_seconds": makespan, "efficiency": total / (gpus * makespan),
            "bound_efficiency": 1.0 / (1.0 + gpus * max(t.pairs for t in tiles) * pair_cost / total)}


def threaded(n: int, tile: int, gpus: int, seconds_per_pair: float) -> dict:
    arch = make_architecture(depth=3)
    params = arch.layer_params(1, 1, 1)
    SleepingBackend.cost = seconds_per_pair
    x = np.zeros((n, 1, 1, 1))
    layout = TileLayout(n, n, tile, True)
    ws = [Worker(f"g{i}", nullcontext, lambda: SleepingBackend(arch, params, np.float32))
          for i in range(gpus)]
    sink = MemorySink(GramJob(x1=x, x2=None, arch=arch, params=params, kernel="ntk",
                              dtype=np.dtype(np.float32), backend=SleepingBackend), layout)
    t0 = time.perf_counter()
    run_tiles(ws, x, None, layout.tiles(), sink, None)
    wall = time.perf_counter() - t0
    total = layout.unique_pairs * seconds_per_pair
    sim = simulate(n, tile, gpus, seconds_per_pair)
    return {"n": n, "tile": tile, "gpus": gpus, "wall_seconds": wall, "sleep_seconds": total,
            "efficiency": total / (gpus * wall), "simulated_efficiency": sim["efficiency"]}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int_at_least(2), default=20000)
    ap.add_argument("--tile", type=int_at_least(1), default=CudaBackend.traits().default_tile)
    ap.add_argument("--tiles", type=int_at_least(2), default=24, help="off-diagonal tiles measured")
    ap.add_argument("--pair-cost", type=positive_float, default=1 / 20000,
                    help="GPU seconds per pair (default 1/20000: depth 21 GAP on an H100)")
    ap.add_argument("--out-dir", default=str(RESULTS))
    ap.add_argument("--tmp", default=None, help="folder for the temporary store")
    return run_main(ap, run, argv)


def run(args):
    check_out_dir(args.out_dir, "--out-dir")
    if args.tmp is not None and not Path(args.tmp).is_dir():
        raise ValueError(f"--tmp {args.tmp}: not an existing folder; give a folder for the temporary store")
    m = machine()
    tag = re.sub(r"[^a-z0-9]+", "_", m["cpu"].lower()).strip("_") + f"_{m['cores']}cpu"
    tile_pairs = args.tile * args.tile
    gpu_tile_s = tile_pairs * args.pair_cost
    res = {"machine": m["cpu"], "cpus": m["cores"], "python": m["python"],
           "n": args.n, "tile": args.tile, "pair_cost_seconds": args.pair_cost,
           "gpu_seconds_per_offdiag_tile": gpu_tile_s, "modes": {}}
    tmp = Path(tempfile.mkdtemp(dir=args.tmp))
    try:
        for mode in ("memory", "store"):
            per, nbytes, extra, n_tiles = measure_overhead(args.n, args.tile, args.tiles,
                                                           tmp if mode == "store" else None)
            one_off = (extra.get("fingerprint_seconds", 0.0) + extra.get("store_create_seconds", 0.0)
                       + extra.get("result_first_touch_seconds", 0.0))
            job_gpu = TileLayout(args.n, args.n, args.tile, True).unique_pairs * args.pair_cost
            res["modes"][mode] = dict(
                extra, per_tile_seconds=per, tiles_in_job=n_tiles,
                overhead_share_of_gpu_tile=per / gpu_tile_s,
                job_overhead_seconds=per * n_tiles + one_off, job_gpu_seconds=job_gpu,
                job_overhead_share=(per * n_tiles + one_off) / job_gpu,
                host_write_MBps=nbytes / per / 1e6 if mode == "store" else None,
                bytes_per_tile=nbytes)
            print(f"{mode:6s}: {per * 1e3:8.2f} ms machinery per {args.tile}x{args.tile} tile = "
                  f"{100 * per / gpu_tile_s:.3f}% of a {gpu_tile_s:.1f} s GPU tile; whole job "
                  f"{100 * res['modes'][mode]['job_overhead_share']:.3f}% (one-off {one_off:.2f} s)")
        w = res["modes"]["store"]["host_write_MBps"]
        need = res["modes"]["store"]["bytes_per_tile"] / gpu_tile_s / 1e6
        res["store_io"] = {"needed_MBps_per_gpu": need, "measured_write_MBps": w,
                           "gpus_one_host_writer_can_feed": w / need}
        print(f"store I/O: {need:.2f} MB/s per GPU needed, {w:.0f} MB/s written here "
              f"-> one host keeps up with {w / need:.0f} GPUs")
        res["simulated_multi_gpu"] = [simulate(n, args.tile, g, args.pair_cost)
                                      for n in (20000, 60000) for g in (1, 2, 4, 8)]
        for s in res["simulated_multi_gpu"]:
            print(f"simulated: N={s['n']} G={s['gpus']}: efficiency {100 * s['efficiency']:.2f}% "
                  f"(bound {100 * s['bound_efficiency']:.2f}%), makespan {s['makespan_seconds'] / 3600:.2f} h")
        # real threads, scaled down: 2000 images, tile 128 (120 tiles), 1.2 s of sleep in total
        res["threaded_check"] = [threaded(2000, 128, g, 1.2 / (2000 * 2001 / 2)) for g in (1, 2, 4, 8)]
        for s in res["threaded_check"]:
            print(f"threads: G={s['gpus']}: measured efficiency {100 * s['efficiency']:.1f}% "
                  f"(queue bound {100 * s['simulated_efficiency']:.1f}%)")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    path = write_json(Path(str(new_stem(args.out_dir, f"scheduler_{tag}")) + ".json"), res)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
