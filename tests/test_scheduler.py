"""Gram jobs (cntk_engine.jobs): layout, tile-size independence, mirroring, workers, auto tile
size, devices."""
import logging
import subprocess
import sys
import threading
import time
from contextlib import nullcontext

import numpy as np
import pytest

import cntk_engine as ce
from cntk_engine.arch import make_architecture
from cntk_engine.backends.base import Backend, Traits
from cntk_engine.backends.numba_cpu import NumbaBackend
from cntk_engine.jobs import GramJob
from cntk_engine.jobs.local import Worker, check_devices, resolve_devices, run_tiles
from cntk_engine.jobs.sinks import MemorySink
from cntk_engine.jobs.tiles import (PAIR_OVERHEAD, Tile, TileLayout, auto_tile, bytes_per_pair,
                                    largest_first, pair_work)


def imgs(rng, n, c=2, h=6, w=6):
    return rng.standard_normal((n, c, h, w))


# ------------------------------------------------------------------------------ layout
@pytest.mark.parametrize("n1,n2,t,sym", [(10, 10, 3, True), (10, 10, 10, True), (10, 10, 1, True),
                                          (7, 5, 3, False), (5, 13, 4, False), (1, 1, 8, True)])
def test_layout_covers_each_pair_once(n1, n2, t, sym):
    lay = TileLayout(n1, n2, t, sym)
    count = np.zeros((n1, n2), int)
    for tl in lay.tiles():
        assert tl.r1 - tl.r0 <= t and tl.c1 - tl.c0 <= t
        if tl.diag:
            assert tl.rows == tl.cols
            block = np.triu(np.ones((tl.r1 - tl.r0,) * 2, int))
        else:
            block = 1
        count[tl.rows, tl.cols] += block
    if sym:
        assert (count[np.triu_indices(n1)] == 1).all() and (count[np.tril_indices(n1, -1)] == 0).all()
    else:
        assert (count == 1).all()
    assert sum(tl.pairs for tl in lay.tiles()) == lay.unique_pairs
    assert lay.grid == (-(-n1 // t), -(-n2 // t))


def test_largest_first_orders_by_pairs():
    order = largest_first(TileLayout(10, 10, 4, True).tiles())
    pairs = [t.pairs for t in order]
    assert pairs == sorted(pairs, reverse=True)
    assert order[-1].pairs < order[0].pairs        # the small edge/diagonal tiles come last


# ------------------------------------------------------------------------------ results
def test_tile_size_independence_bit_identical(rng):
    x = imgs(rng, 11)
    y = imgs(rng, 6)
    ref = ce.gram(x, depths=[2, 3], kernel="both", backend="numba", tile=11)
    for t in (1, 2, 4, 5, 7):
        r = ce.gram(x, depths=[2, 3], kernel="both", backend="numba", tile=t)
        for d in (2, 3):
            for a, b in zip(r[d], ref[d]):
                assert a.tobytes() == b.tobytes(), (t, d)
    rref = ce.gram(x, y, depth=3, backend="numba", tile=11)
    for t in (1, 3, 4):
        assert ce.gram(x, y, depth=3, backend="numba", tile=t).tobytes() == rref.tobytes()


def test_symmetric_is_mirrored_and_matches_direct_backend_calls(rng):
    x = imgs(rng, 9)
    k = ce.gram(x, depth=3, backend="numba", tile=4)
    assert k.tobytes() == np.ascontiguousarray(k.T).tobytes()     # exactly symmetric
    # every upper entry equals the backend's own answer for that pair (tile 1 x 1 calls)
    arch = make_architecture(depth=3)
    params = arch.layer_params(2, 6, 6)
    be = NumbaBackend(arch, params, np.float32)
    p = be.prepare(x)
    from cntk_engine.arch import finalize
    for i, j in [(0, 0), (0, 8), (3, 5), (7, 8)]:
        s = be.pair_sums(p[i:i + 1], p[j:j + 1], symmetric=(i == j))
        v = finalize(s, arch, params, "ntk")[3]["ntk"][0, 0]
        assert k[i, j] == v and k[j, i] == v


class CountingBackend(Backend):
    """Cheap deterministic 'kernel' (a function of the two image means) that counts calls."""

    name = "counting"
    calls = []
    fail_at = None
    lock = threading.Lock()

    def prepare(self, x):
        from cntk_engine.backends.base import Prepared
        return Prepared(np.asarray(x), ())

    def pair_sums(self, a, b, symmetric=False):
        ma = a.images.reshape(len(a), -1).mean(1)
        mb = b.images.reshape(len(b), -1).mean(1)
        with self.lock:
            self.calls.append((len(a), len(b), symmetric, threading.current_thread().name))
            if self.fail_at is not None and len(self.calls) == self.fail_at:
                raise RuntimeError("backend failed on purpose")
        time.sleep(0.002)                     # like a GPU call: releases the GIL
        v = np.add.outer(ma, mb) + np.multiply.outer(ma, mb)
        return np.repeat(v[..., None, None], 2, axis=3).repeat(len(self.arch.depths), axis=2)


@pytest.mark.parametrize("n_workers", [1, 3])
def test_workers_compute_each_tile_once_and_agree(rng, n_workers):
    x = imgs(rng, 23, c=1, h=2, w=2)
    arch = make_architecture(depth=3)
    params = arch.layer_params(1, 2, 2)
    CountingBackend.calls = []
    CountingBackend.fail_at = None
    workers = [Worker(f"w{i}", nullcontext, lambda: CountingBackend(arch, params, np.float64))
               for i in range(n_workers)]
    lay = TileLayout(23, 23, 4, True)
    job = GramJob(x1=x, x2=None, arch=arch, params=params, kernel="ntk", dtype=np.dtype(np.float64),
                  backend=CountingBackend)
    sink = MemorySink(job, lay)
    seen = []
    done = run_tiles(workers, x, None, lay.tiles(), lambda t, s: (seen.append((t.i, t.j)), sink(t, s)))
    assert sorted(seen) == sorted((t.i, t.j) for t in lay.tiles())      # each tile exactly once
    assert sum(done.values()) == len(lay.tiles())
    m = x.reshape(23, -1).mean(1)
    v = np.add.outer(m, m) + np.multiply.outer(m, m)
    c = params.out_scale / params.norm
    expect = v * c + (v * c + params.out_b2)         # finalize: ntk = G part + nngp
    k = sink.result[3]["ntk"]
    assert k.tobytes() == expect.tobytes()
    assert k.tobytes() == np.ascontiguousarray(k.T).tobytes()
    # a tile the sink did not take (False: a store claim taken over) is not counted as computed
    others = {(0, 1), (2, 3)}
    done = run_tiles(workers, x, None, lay.tiles(), lambda t, s: (t.i, t.j) not in others)
    assert sum(done.values()) == len(lay.tiles()) - 2
    if n_workers > 1:
        assert len({c[3] for c in CountingBackend.calls}) > 1            # really several threads


def test_worker_error_stops_the_job_and_is_raised(rng):
    x = imgs(rng, 30, c=1, h=2, w=2)
    arch = make_architecture(depth=3)
    params = arch.layer_params(1, 2, 2)
    CountingBackend.calls = []
    CountingBackend.fail_at = 3
    workers = [Worker(f"w{i}", nullcontext, lambda: CountingBackend(arch, params, np.float64))
               for i in range(2)]
    lay = TileLayout(30, 30, 2, True)
    with pytest.raises(RuntimeError, match="on purpose"):
        run_tiles(workers, x, None, lay.tiles(), lambda t, s: None)
    assert len(CountingBackend.calls) < len(lay.tiles())                   # stopped early
    CountingBackend.fail_at = None


def test_worker_threads_spell_arguments_as_the_caller_does(rng):
    """Each worker thread runs in a copy of the caller's context: an error a worker raises names
    the arguments as the command line writes them (a new thread starts in an empty context)."""
    from cntk_engine.spelling import arg, command_line
    x = imgs(rng, 8, c=1, h=2, w=2)
    arch = make_architecture(depth=3)
    params = arch.layer_params(1, 2, 2)

    class Refusing(CountingBackend):
        def pair_sums(self, a, b, symmetric=False):
            raise ValueError(f"{arg('tile', 4)} is too large here")

    workers = [Worker(f"w{i}", nullcontext, lambda: Refusing(arch, params, np.float64)) for i in range(2)]
    lay = TileLayout(8, 8, 4, True)
    with command_line({"tile": "--tile"}):
        with pytest.raises(ValueError, match="^--tile 4 is too large here$"):
            run_tiles(workers, x, None, lay.tiles(), lambda t, s: None)
    with pytest.raises(ValueError, match="^tile=4 is too large here$"):
        run_tiles(workers, x, None, lay.tiles(), lambda t, s: None)


# ------------------------------------------------------------------------------ decisions
def test_auto_tile_rules():
    numba = NumbaBackend.traits()
    gpu = Traits(device="gpu", default_tile=512, min_tile=64)
    t, why = auto_tile(gpu, 20000, 20000, True, 1, 1)
    assert t == 512 and "default" in why
    t, why = auto_tile(gpu, 1000, 1000, True, 4, 1)               # 4 GPUs: >= 16 tiles
    assert len(TileLayout(1000, 1000, t, True).tiles()) >= 16 and t >= 64 and "workers" in why
    per = bytes_per_pair(64)                                       # 2064 B per pair at 64 depths
    t, why = auto_tile(gpu, 20000, 20000, True, 1, 64, free_bytes=8 * 2**20)
    assert t == 64 and "memory" in why            # sqrt(0.25 * 8 MiB / 2064 B) = 31 -> floor 64
    t, why = auto_tile(gpu, 20000, 20000, True, 1, 64, free_bytes=4 * 200**2 * per)
    assert t == 200 and "memory" in why           # sqrt(0.25 * free / per) = 200
    t, _ = auto_tile(numba, 10, 10, True, 1, 1)
    assert t == 10                                                       # capped at N
    small = Traits(device="cpu", default_tile=64, min_tile=16)           # no time model
    t, why = auto_tile(small, 5000, 5000, True, 1, 1, for_store=True)
    assert t >= 256 and "store" in why
    # a time model sizes CPU tiles to about tile_seconds, store or not, between floor and default
    timed = Traits(device="cpu", default_tile=512, min_tile=8, entry_seconds={"float32": 1e-9},
                   tile_seconds=2.0)
    ps = timed.pair_seconds(pair_work(make_architecture(depth=6), (3, 32, 32)), np.float32)
    assert ps == pytest.approx((1024 ** 2 + PAIR_OVERHEAD * 1024) * 5 * 1e-9)
    for store in (False, True):
        t, why = auto_tile(timed, 5000, 5000, True, 1, 1, for_store=store, pair_seconds=ps)
        assert t == int((2.0 / ps) ** 0.5) == 19 and "2 s per tile" in why
    assert auto_tile(timed, 5000, 5000, True, 1, 1, pair_seconds=1e-9)[0] == 512       # cheap pairs
    assert auto_tile(timed, 5000, 5000, True, 1, 1, pair_seconds=100.0)[0] == 8        # the floor
    assert pair_work(make_architecture(depth=6, pooling="flatten"), (3, 32, 32)) == \
        (1 + PAIR_OVERHEAD) * 1024 * 5
    # LAP with a small window runs only the offsets it weighs; a stack its stages
    lap = pair_work(make_architecture(depth=6, pooling="lap", lap_window=2), (3, 32, 32))
    assert (1 + PAIR_OVERHEAD) * 1024 * 5 < lap < pair_work(make_architecture(depth=6), (3, 32, 32))
    myrtle = make_architecture(architecture="myrtle5")
    assert pair_work(myrtle, (3, 32, 32)) == (2 * 32 ** 4 + 16 ** 4 + 8 ** 4) + PAIR_OVERHEAD * 1024 * 4


def test_numba_cpu_tiles_take_seconds():
    """The numba backend's tile for 32x32x3 images at depth 6 and 11 (GAP, float32) is a few
    seconds of work by its own time model, on any number of cores."""
    tr = NumbaBackend.traits()
    for depth in (6, 11):
        ps = tr.pair_seconds(pair_work(make_architecture(depth=depth), (3, 32, 32)), np.float32)
        t, _ = auto_tile(tr, 400, 400, True, 1, 1, for_store=True, pair_seconds=ps)
        assert t * t * ps <= 2.5 * tr.tile_seconds and t >= tr.min_tile


class GpuTraitsBackend(Backend):
    name = "gpu-like"

    @classmethod
    def traits(cls):
        return Traits(device="gpu", default_tile=512, min_tile=64)


def test_free_memory_of_gpus_that_report_it_limits_the_tile(monkeypatch, rng):
    """One GPU that does not report its free memory must not lift the limit of the others."""
    from cntk_engine.jobs import job as job_mod
    from cntk_engine.jobs import local
    free = {0: None, 1: 16 * 2**30, 2: 8 * 2**30}
    monkeypatch.setattr(local, "free_device_memory", lambda d: free[d])
    assert local.smallest_free_memory([0, 1, 2]) == 8 * 2**30
    assert local.smallest_free_memory([0]) is None and local.smallest_free_memory(None) is None
    seen = {}

    class Stop(Exception):
        pass

    def spy(traits, n1, n2, symmetric, n_workers, n_depths, free_bytes=None, for_store=False,
            pair_seconds=None):
        seen["free"] = free_bytes
        raise Stop

    monkeypatch.setattr(job_mod, "auto_tile", spy)
    arch = make_architecture(depth=3)
    x = imgs(rng, 4)
    job = GramJob(x1=x, x2=None, arch=arch, params=arch.layer_params(2, 6, 6), kernel="ntk",
                  dtype=np.dtype(np.float32), backend=GpuTraitsBackend, devices=[0, 1, 2])
    with pytest.raises(Stop):
        job_mod.run_job(job)
    assert seen["free"] == 8 * 2**30                  # the least over GPUs 1 and 2, not "no limit"


def test_check_and_resolve_devices(monkeypatch):
    """devices as NumPy arrays (np.arange(n_gpus)) got NumPy's 'truth value of an array is
    ambiguous' and a 0-d array 'iteration over a 0-d array'; GPU ids that do not exist were
    named as a Python list whatever the caller typed, and with no GPU as 'ids 0..-1' (a helper's
    audit)."""
    assert check_devices(None) is None and check_devices("all") is None
    assert check_devices(np.arange(2)) == [0, 1] and check_devices(np.array(1)) == [1]
    assert check_devices(np.int64(3)) == [3] and check_devices((2, 0)) == [2, 0]
    for bad in ("0,1", "ALL", [], [-1], [0, 0], [1.5], True, np.array([True]), np.zeros((1, 1)), 2.0):
        with pytest.raises(ValueError, match="devices"):
            check_devices(bad)
    assert resolve_devices("cpu", None) is None
    with pytest.raises(ValueError, match="runs on the CPU"):
        resolve_devices("cpu", [0])
    from cntk_engine.jobs import local
    monkeypatch.setattr(local, "gpu_count", lambda: 2)
    assert resolve_devices("gpu", check_devices(np.arange(2))) == [0, 1]
    assert resolve_devices("gpu", None) == [0, 1]
    with pytest.raises(ValueError, match=r"^devices=\[1, 3\]: no GPU 3 here; 2 GPU\(s\) visible, ids 0 \.\. 1$"):
        resolve_devices("gpu", [1, 3])
    monkeypatch.setattr(local, "gpu_count", lambda: 0)
    with pytest.raises(RuntimeError, match="found no visible GPU"):
        resolve_devices("gpu", [0])
    with pytest.raises(ValueError, match="runs on the CPU"):     # through gram: checked, then resolved
        ce.gram(np.ones((2, 1, 3, 3)), depth=2, backend="numba", devices=np.arange(2))


def test_gram_devices_with_cpu_backend_is_refused(rng):
    with pytest.raises(ValueError, match="runs on the CPU"):
        ce.gram(imgs(rng, 3), depth=3, backend="numba", devices=[0, 1])


def test_progress_bar_and_logging(rng, caplog, capsys):
    x = imgs(rng, 10)
    with caplog.at_level(logging.INFO, logger="cntk_engine"):
        k, info = ce.gram(x, depth=3, backend="numba", tile=3, progress=True, return_info=True)
    err = capsys.readouterr().err
    assert "pair/s" in err and "55/55" in err                            # tqdm: pairs, rate
    msg = " ".join(r.getMessage() for r in caplog.records)
    assert "backend=numba" in msg and "tile 3 (given)" in msg and "10 tiles" in msg
    assert info["tiles_total"] == 10 and info["pairs_computed"] == 55
    # the worker's preparation of the images, timed (the harness's beyond-preparation rate)
    assert set(info["prepare_seconds"]) == {"cpu"}
    assert 0 < info["prepare_seconds"]["cpu"] < info["compute_seconds"]
    assert k.tobytes() == ce.gram(x, depth=3, backend="numba", tile=3).tobytes()
    with pytest.raises(ValueError, match="progress"):
        ce.gram(x, depth=3, backend="numba", progress="yes")


def test_import_does_not_pull_dask_or_zarr(tmp_path):
    code = ("import sys, numpy as np, cntk_engine as ce; "
            "ce.gram(np.ones((2, 1, 3, 3)), depth=2, backend='reference'); "
            "bad = [m for m in ('dask', 'distributed', 'zarr') if m in sys.modules]; "
            "assert not bad, bad")
    r = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr


def test_a_given_tile_beyond_what_one_call_takes_is_refused_before_any_store(monkeypatch, rng, tmp_path):
    """The CUDA kernels index a launch's pairs in 32 bits: a tile of 46,341 rows or more was
    refused by the binding only after its arrays were allocated on the GPU (helper-91).  Pairs
    are counted as a call lists them: a symmetric job's diagonal tiles, their upper triangle."""
    import dataclasses
    from cntk_engine.backends.cuda import MAX_LAUNCH_PAIRS, CudaBackend
    from cntk_engine.backends.numba_cpu import NumbaBackend
    assert CudaBackend.traits().max_tile_pairs == MAX_LAUNCH_PAIRS == 2**31 - 1
    x = imgs(rng, 20)
    kept = str(tmp_path / "kept.zarr")
    ce.gram(x, depth=3, backend="numba", tile=15, out=kept)          # no limit yet
    capped = dataclasses.replace(NumbaBackend.traits(), max_tile_pairs=100)
    monkeypatch.setattr(NumbaBackend, "traits", classmethod(lambda cls: capped))
    with pytest.raises(ValueError, match=r"^tile 14 \(given\): the largest tile of 20 x 20 images is "
                       r"105 pairs, more than one call of the numba backend takes \(100\); give "
                       r"tile <= 10, or leave it out"):
        ce.gram(x, depth=3, backend="numba", tile=14, out=str(tmp_path / "g.zarr"))
    assert not (tmp_path / "g.zarr").exists()
    # 13: tiles of 91 pairs (13 x 14 / 2 on the diagonal, 13 x 7 off it); 12 x 12 images in one
    # symmetric tile are 78 pairs, and 144 as a rectangular job
    np.testing.assert_array_equal(ce.gram(x, depth=3, backend="numba", tile=13),
                                  ce.gram(x, depth=3, backend="numba", tile=4))
    ce.gram(x[:12], depth=3, backend="numba", tile=12)
    with pytest.raises(ValueError, match=r"the largest tile of 12 x 12 images is 144 pairs"):
        ce.gram(x[:12], x[8:], depth=3, backend="numba", tile=12)
    with pytest.raises(ValueError, match=r"^tile 15 \(kept from the store '.*kept.zarr'\): the largest "
                       r"tile of 20 x 20 images is 120 pairs, .*; resume it with the backend that "
                       r"computed it, or compute into a new out"):
        ce.gram(x, depth=3, backend="numba", out=kept)          # an existing store is resumed


def test_tile_dataclass():
    t = Tile(0, 1, 0, 4, 4, 7, False)
    assert t.rows == slice(0, 4) and t.cols == slice(4, 7) and t.pairs == 12
    assert Tile(0, 0, 0, 4, 0, 4, True).pairs == 10


def test_progress_counts_the_tiles_other_writers_hold(rng, capsys):
    """With several writers on one store the bar is the job's: a tile another writer holds
    counts as it is met (the rate and ETA were this process's alone, ~2x too long with two
    writers, and the bar ended at about half), and the store's count sets it after a round."""
    from cntk_engine.jobs.local import Progress
    x = imgs(rng, 7, c=1, h=2, w=2)
    arch = make_architecture(depth=3)
    params = arch.layer_params(1, 2, 2)
    CountingBackend.calls = []
    CountingBackend.fail_at = None
    layout = TileLayout(7, 7, 2, True)
    bar = Progress(layout.unique_pairs, True)
    computed = []
    run_tiles([Worker("w", nullcontext, lambda: CountingBackend(arch, params, np.float64))], x,
              None, layout.tiles(), lambda t, s: computed.append(t), bar,
              claim=lambda t: t.i != 1)
    assert 0 < len(computed) < len(layout.tiles()) and bar.bar.n == layout.unique_pairs == 28
    bar.set_done(20)              # another writer died holding tiles: the store says 20
    assert bar.bar.n == 20
    bar.close()
    assert "20/28" in capsys.readouterr().err


def test_a_flip_symmetrised_pair_counts_twice_in_the_tile_sizing():
    """flip computes each pair against the other image and its mirror: tiles sized as for one
    ran about twice the ~2 s they were meant to."""
    for kw in (dict(depth=6), dict(depth=4, pooling="lap", lap_window=2),
               dict(architecture="myrtle5")):
        plain = pair_work(make_architecture(**kw), (3, 32, 32))
        assert pair_work(make_architecture(**kw, flip=True), (3, 32, 32)) == 2 * plain
