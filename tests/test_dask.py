"""Dask: tiles as tasks on a local multi-process cluster (numba backend), worker loss."""
import os
import signal
import threading
import time
import types

import numpy as np
import pytest

distributed = pytest.importorskip("distributed")
zarr = pytest.importorskip("zarr")

import cntk_engine as ce  # noqa: E402

from conftest import written_markers  # noqa: E402

@pytest.fixture(scope="module")
def client():
    env = {"NUMBA_NUM_THREADS": "1"}    # the workers import the package these tests import
    with distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True,
                                  dashboard_address=":0", env=env) as cluster:
        with distributed.Client(cluster) as c:
            yield c


def imgs(rng, n, c=2, h=6, w=6):
    return rng.standard_normal((n, c, h, w))


def test_in_memory_results_identical_to_local(client, rng):
    x, y = imgs(rng, 13), imgs(rng, 5)
    local = ce.gram(x, depths=[2, 3], kernel="both", backend="numba", tile=4)
    remote, info = ce.gram(x, depths=[2, 3], kernel="both", backend="numba", tile=4, client=client,
                           return_info=True)
    for d in (2, 3):
        for a, b in zip(local[d], remote[d]):
            assert a.tobytes() == b.tobytes()
    assert info["where"].startswith("dask") and sum(info["per_worker"].values()) == 10
    assert len(info["per_worker"]) == 2                                   # both workers took tiles
    r = ce.gram(x, y, depth=3, backend="numba", tile=4, client=client)
    assert r.tobytes() == ce.gram(x, y, depth=3, backend="numba", tile=4).tobytes()


def test_store_written_by_workers(client, rng, tmp_path):
    x = imgs(rng, 12)
    out = tmp_path / "g.zarr"
    g, info = ce.gram(x, depth=3, kernel="both", backend="numba", tile=5, client=client, out=out,
                      return_info=True)
    ntk, nngp = ce.gram(x, depth=3, kernel="both", backend="numba", tile=5)
    assert g["ntk"][...].tobytes() == ntk.tobytes() and g["nngp"][...].tobytes() == nngp.tobytes()
    assert info["tiles_computed"] == 6
    _, info = ce.gram(x, depth=3, kernel="both", backend="numba", client=client, out=out,
                      return_info=True)
    assert info["tiles_computed"] == 0                                    # resumed: nothing left
    assert info["compute"] == []                       # as a local resume says: nothing computed
    # tiny images are computed scaled per image: the scales reach the workers that write tiles
    tiny = x * 1e-30
    g = ce.gram(tiny, depth=3, backend="numba", tile=5, client=client, out=tmp_path / "t.zarr")
    local = ce.gram(tiny, depth=3, backend="numba", tile=5)
    assert g["ntk"][...].tobytes() == local.tobytes()
    np.testing.assert_allclose(local, ce.gram(x, depth=3, backend="numba", tile=5) * 1e-60, rtol=1e-6)


def test_workers_record_what_computed_their_tiles(client, rng, tmp_path, caplog, monkeypatch):
    """A Dask run's record holds, at its end, the compute records its workers returned with
    their tiles (the client cannot tell them); a worker with other code than an earlier run
    (faked: the workers here are this machine) is warned of; a run that fails midway keeps the
    records of the tiles it wrote."""
    from cntk_engine.backends.numba_cpu import NumbaBackend
    from cntk_engine.jobs import dask as dist
    from cntk_engine.jobs.store import list_runs
    x = imgs(rng, 8)
    out = tmp_path / "g.zarr"
    with caplog.at_level("WARNING", logger="cntk_engine"):
        _, info = ce.gram(x, depth=3, backend="numba", tile=4, client=client, out=out,
                          return_info=True)
    here = NumbaBackend(None, None, "float32").compute_record(None)
    run = list_runs(zarr.open_group(str(out)))[0]
    assert run["compute"] == [here] == info["compute"]
    assert "differs from that of" not in caplog.text
    zarr.open_group(str(out), mode="r+")["tiles_done"][0, 1] = 0
    real_state = dist._state

    def other_code(*a):       # the worker's cached state, its record changed (in-process only)
        be, pa, pb, rec = real_state(*a)
        return be, pa, pb, dict(rec, cpu="another-cpu")
    with distributed.LocalCluster(n_workers=1, threads_per_worker=1, processes=False,
                                  dashboard_address=":0") as cluster, distributed.Client(cluster) as c:
        monkeypatch.setattr(dist, "_state", other_code)
        with caplog.at_level("WARNING", logger="cntk_engine"):
            ce.gram(x, depth=3, backend="numba", client=c, out=out)
        assert ("the code of run 2's Dask workers differs from that of other runs (run 1 on "
                f"{run['host']}: cpu {here['cpu']} there, another-cpu here)") in caplog.text, caplog.text
        assert list_runs(zarr.open_group(str(out)))[1]["compute"] == [dict(here, cpu="another-cpu")]
        # a run that fails after writing tiles: their workers' records are kept
        zarr.open_group(str(out), mode="r+")["tiles_done"][0, 0] = 0
        zarr.open_group(str(out), mode="r+")["tiles_done"][1, 1] = 0
        from cntk_engine.jobs import local

        def fails_after_one(self, n):
            raise RuntimeError("interrupted after a tile")
        monkeypatch.setattr(local.Progress, "update", fails_after_one)
        with pytest.raises(RuntimeError, match="interrupted after a tile"):
            ce.gram(x, depth=3, backend="numba", client=c, out=out)
    failed = list_runs(zarr.open_group(str(out)))[2]
    assert failed["outcome"].startswith("failed") and failed["tiles_computed"] >= 1
    assert failed["compute"] == [dict(here, cpu="another-cpu")]


def test_a_worker_that_does_not_record_its_code_is_said_so(rng, tmp_path, monkeypatch):
    """A worker of a cntk_engine before compute records returns its tiles without one: the run
    records an 'unknown' record for it, not nothing."""
    from cntk_engine.jobs import dask as dist
    from cntk_engine.jobs.store import computed_with, list_runs
    real = dist.tile_task
    monkeypatch.setattr(dist, "tile_task", lambda *a, **k: real(*a, **k)[:5])
    with distributed.LocalCluster(n_workers=1, threads_per_worker=1, processes=False,
                                  dashboard_address=":0") as cluster, distributed.Client(cluster) as c:
        ce.gram(imgs(rng, 4), depth=3, backend="numba", tile=2, client=c, out=tmp_path / "o.zarr")
    runs = list_runs(zarr.open_group(str(tmp_path / "o.zarr")))
    unknown = {"backend": "numba", "unknown": "a worker of a cntk_engine that does not record its code"}
    assert runs[0]["compute"] == [unknown]
    assert computed_with(runs) == ([{"compute": unknown, "runs": [1]}], [])


def test_tasks_carry_no_per_image_data(client, rng, tmp_path, monkeypatch):
    """The images, their scales (in the store sink) and the rest of the job go to the workers
    once (scattered): a task's arguments are futures and its tile, whatever N (the sink's
    scales, O(N), went with every task: 481 KB per task at N = 60,000)."""
    import pickle
    args_seen, submit = [], client.submit

    def recording(fn, *args, **kw):
        args_seen.append(args)
        return submit(fn, *args, **kw)

    monkeypatch.setattr(client, "submit", recording)
    x = imgs(rng, 12) * 1e-30                       # computed scaled: the sink holds the scales
    g = ce.gram(x, depth=3, backend="numba", tile=5, client=client, out=tmp_path / "s.zarr")
    assert g["ntk"][...].tobytes() == ce.gram(x, depth=3, backend="numba", tile=5).tobytes()
    assert len(args_seen) == 6
    for spec, tile, fa, fb in args_seen:
        assert all(isinstance(f, distributed.Future) for f in (spec, fa, fb))
        assert len(pickle.dumps(tile)) < 1000


def test_worker_killed_mid_job_completes_identically(client, tmp_path):
    rng = np.random.default_rng(3)
    x = rng.standard_normal((64, 1, 16, 16))
    out = tmp_path / "k.zarr"
    result = {}

    def job():
        try:
            result["info"] = ce.gram(x, depth=3, backend="numba", tile=8, client=client, out=out,
                                     return_info=True)[1]
        except BaseException as e:  # noqa: BLE001
            result["error"] = e

    th = threading.Thread(target=job)
    th.start()
    killed = None
    deadline = time.time() + 120
    while time.time() < deadline and th.is_alive():
        n_done = len(written_markers(out))
        busy = {w: ts for w, ts in client.processing().items() if ts}
        if n_done >= 4 and busy:
            victim = next(iter(busy))
            pids = client.run(os.getpid, workers=[victim])
            killed = (victim, n_done)
            os.kill(pids[victim], signal.SIGKILL)                         # a running tile is lost
            break
        time.sleep(0.01)
    th.join(300)
    assert killed is not None, "the job ended before a worker could be killed"
    assert "error" not in result, result.get("error")
    assert killed[1] < 36
    g = zarr.open_group(str(out), mode="r")
    done = g["tiles_done"][...]
    assert (done[np.triu_indices(8)] == 1).all()                          # nothing lost
    local = ce.gram(x, depth=3, backend="numba", tile=8)
    assert g["ntk"][...].tobytes() == local.tobytes()                     # identical to local
    client.wait_for_workers(2, timeout=60)                                # the nanny restarted it


def test_client_argument_errors(client, rng):
    x = imgs(rng, 4)
    with pytest.raises(ValueError, match="devices"):
        ce.gram(x, depth=3, backend="numba", client=client, devices=[0])
    with pytest.raises(ValueError, match="dask.distributed.Client"):
        ce.gram(x, depth=3, backend="numba", client=object())


# ------------------------------------------------------------------ backend on the workers' terms
@pytest.fixture
def inproc_gpu_client():
    """One in-process worker that declares a GPU resource (but, here, cannot run cuda)."""
    with distributed.LocalCluster(n_workers=1, threads_per_worker=1, processes=False,
                                  dashboard_address=":0", resources={"GPU": 1}) as cluster:
        with distributed.Client(cluster) as c:
            yield c


@pytest.fixture
def client_without_gpu(monkeypatch):
    """This process's own availability check says "no GPU" (as on a login node); the workers'
    check (``available_backends`` run on them) is left alone."""
    from cntk_engine import backends
    real = backends.resolve

    def local_resolve(name, *job):
        if name == "cuda":
            raise RuntimeError("backend 'cuda' is unavailable: CLIENT-SIDE CHECK: no GPU here")
        return real("numba" if name == "auto" else name, *job)

    monkeypatch.setattr(backends, "resolve", local_resolve)


def test_auto_resolves_on_the_workers_and_logs_it(inproc_gpu_client, client_without_gpu, rng,
                                                  caplog):
    x = rng.standard_normal((6, 1, 8, 8))
    worker = next(iter(inproc_gpu_client.scheduler_info()["workers"]))
    with caplog.at_level("INFO", logger="cntk_engine"):
        k, info = ce.gram(x, depth=3, backend="auto", tile=4, client=inproc_gpu_client,
                          return_info=True)
    assert info["backend"] == "numba"
    assert k.tobytes() == ce.gram(x, depth=3, backend="numba", tile=4).tobytes()
    msg = " ".join(r.getMessage() for r in caplog.records)
    assert "resolved on the workers to 'numba'" in msg
    assert worker in msg and ce.available_backends()["cuda"] in msg        # the workers' reason


def test_cuda_error_names_the_workers_and_their_reason(inproc_gpu_client, client_without_gpu, rng):
    x = rng.standard_normal((6, 1, 8, 8))
    worker = next(iter(inproc_gpu_client.scheduler_info()["workers"]))
    with pytest.raises(RuntimeError) as e:
        ce.gram(x, depth=3, backend="cuda", client=inproc_gpu_client)
    msg = str(e.value)
    assert "CLIENT-SIDE" not in msg                                           # not the client's
    assert worker in msg and ce.available_backends()["cuda"] in msg


def _report(cuda=None, shape=None, numba=None):
    def cap(unavailable, unsupported=None):
        return {"unavailable": unavailable, "unsupported": unsupported}
    return {"reference": cap(None), "numba": cap(numba), "cuda": cap(cuda, shape)}


def test_choose_backend_rules():
    from cntk_engine.jobs.dask import choose_backend
    gpu = {"resources": {"GPU": 1}}
    ws = {"tcp://a:1": gpu, "tcp://b:2": gpu, "tcp://cpu:3": {}}
    ok = {"tcp://a:1": _report(), "tcp://b:2": _report(), "tcp://cpu:3": _report("no CUDA device")}
    # only the workers with a GPU resource run cuda tasks: the CPU-only worker does not matter
    assert choose_backend("auto", ok, ws)[0] == "cuda"
    assert choose_backend("cuda", ok, ws)[0] == "cuda"
    assert choose_backend("numba", ok, ws)[0] == "numba"
    one_bad = dict(ok, **{"tcp://b:2": _report("no usable CUDA device: driver too old")})
    name, why = choose_backend("auto", one_bad, ws)
    assert name == "numba" and "tcp://b:2" in why and "driver too old" in why
    with pytest.raises(RuntimeError, match=r"1 of the 2 .*tcp://b:2: no usable CUDA device: driver too old"):
        choose_backend("cuda", one_bad, ws)
    shape = {a: _report(shape="H x W too large for the fused kernels") for a in ok}
    assert choose_backend("auto", shape, ws)[0] == "numba"
    with pytest.raises(ValueError, match="too large.*Use backend='numba'"):
        choose_backend("cuda", shape, ws)
    failed = dict(ok, **{"tcp://a:1": ImportError("No module named 'cntk_engine'")})
    with pytest.raises(RuntimeError, match=r"tcp://a:1: checking its backends failed.*cntk_engine"):
        choose_backend("cuda", failed, ws)
    no_gpu = {a: {} for a in ws}
    name, why = choose_backend("auto", ok, no_gpu)
    assert name == "numba" and "GPU resource" in why
    with pytest.raises(RuntimeError, match="GPU resource"):
        choose_backend("cuda", ok, no_gpu)
    with pytest.raises(RuntimeError, match="tcp://cpu:3: numba broken"):
        choose_backend("numba", dict(ok, **{"tcp://cpu:3": _report(numba="numba broken")}), ws)


def test_choose_backend_auto_skips_cuda_code_not_run_on_a_gpu(caplog):
    # Backend.unverified, as the workers report it: auto runs numba, cuda by name runs (warned)
    from cntk_engine.jobs.dask import choose_backend
    gpu = {"resources": {"GPU": 1}}
    ws = {"tcp://a:1": gpu, "tcp://cpu:3": {}}
    rep = _report()
    rep["cuda"]["unverified"] = "the CUDA kernels for flip-symmetrised kernels have not run on a GPU yet"
    reports = {"tcp://a:1": rep, "tcp://cpu:3": _report("no CUDA device")}
    with caplog.at_level("WARNING", logger="cntk_engine"):
        name, why = choose_backend("auto", reports, ws)
    assert name == "numba" and why == f"cuda: {rep['cuda']['unverified']}"
    assert caplog.messages == ["backend 'auto' runs this job on the CPU (numba) although 1 worker with a "
                               "GPU resource could run it with cuda: " + rep["cuda"]["unverified"]]
    caplog.clear()
    with caplog.at_level("WARNING", logger="cntk_engine"):
        assert choose_backend("cuda", reports, ws)[0] == "cuda"
    assert "asked for, although the CUDA kernels for flip" in caplog.text


# ------------------------------------------------------------------ worker cache
def _cache_size():
    from cntk_engine.jobs import dask as dist
    return len(dist._CACHE)


def test_workers_drop_the_jobs_images_when_it_ends(client, rng):
    x = imgs(rng, 9)
    ce.gram(x, depth=3, backend="numba", tile=4, client=client)
    assert set(client.run(_cache_size).values()) == {0}


def test_worker_cache_is_bounded_and_keeps_concurrent_jobs():
    from cntk_engine.jobs import dask as dist
    made = []

    class Counting:
        def __init__(self, *a):
            made.append(1)

        def compute_record(self, devices):
            return {"backend": "counting"}

    def job(token):
        return dist.TaskSpec(token, Counting, None, None, "float32", True, True, None)

    with dist._CACHE_LOCK:
        dist._CACHE.clear()
    try:
        a, b = job("job-a"), job("job-b")
        for _ in range(3):                                   # two jobs interleaved on one worker
            dist._state(a, "xa", None)
            dist._state(b, "xb", None)
        assert len(made) == 2                                # each built once, no mutual eviction
        for k in range(dist.CACHE_JOBS + 2):
            dist._state(job(f"more-{k}"), "x", None)
        assert len(dist.cached_jobs()) == dist.CACHE_JOBS    # bounded, oldest jobs gone first
        assert "job-a" not in dist.cached_jobs()
        newest = f"more-{dist.CACHE_JOBS + 1}"
        assert dist.evict(newest) == 1 and newest not in dist.cached_jobs()
    finally:
        with dist._CACHE_LOCK:
            dist._CACHE.clear()


# ------------------------------------------------------------------ store not shared
def test_tiles_written_elsewhere_are_an_error(inproc_gpu_client, rng, tmp_path, monkeypatch):
    """A worker that sees another file at the out= path (not a shared file system)."""
    import shutil
    from cntk_engine.jobs import store as store_mod
    real_sink = store_mod.GramStore.sink

    def sink_elsewhere(self, *a, **kw):
        w = real_sink(self, *a, **kw)
        elsewhere = tmp_path / "worker-local.zarr"
        shutil.copytree(self.path, elsewhere)
        w.path = str(elsewhere)
        return w

    monkeypatch.setattr(store_mod.GramStore, "sink", sink_elsewhere)
    x = rng.standard_normal((6, 1, 8, 8))
    out = tmp_path / "g.zarr"
    with pytest.raises(RuntimeError, match=r"not marked done in the store .*g\.zarr.*shared"):
        ce.gram(x, depth=3, backend="numba", tile=4, client=inproc_gpu_client, out=out)


def test_tiles_are_sized_by_the_workers_cores_not_the_clients(client, rng, monkeypatch):
    """numba's time model divides by the threads of the process that asks: a client with 32
    threads sized the tiles of single-thread workers 6x too large (157 rows for ~2 s)."""
    from cntk_engine.arch import make_architecture
    from cntk_engine.backends.numba_cpu import ENTRY_CORE_SECONDS, NumbaBackend
    from cntk_engine.jobs import dask as jdask
    from cntk_engine.jobs.tiles import auto_tile, pair_work
    theirs = jdask.worker_traits(client, NumbaBackend, None)      # one thread each
    assert theirs.entry_seconds == ENTRY_CORE_SECONDS and theirs.min_tile == 8
    real = NumbaBackend.traits()      # this process's estimate made 100x too slow
    slow = type(real)(**{**vars(real), "entry_seconds": {k: v * 100 for k, v in
                                                         real.entry_seconds.items()}})
    monkeypatch.setattr(NumbaBackend, "traits", classmethod(lambda cls: slow))
    assert jdask.worker_traits(client, NumbaBackend, slow) == theirs      # the workers' own
    x = imgs(rng, 40, c=3, h=16, w=16)
    _, info = ce.gram(x, depth=6, backend="numba", client=client, return_info=True)
    arch = make_architecture(depth=6)
    want, _ = auto_tile(theirs, 40, 40, True, 2, 1, None, for_store=False,
                        pair_seconds=theirs.pair_seconds(pair_work(arch, x.shape[1:]), np.float32))
    mine, _ = auto_tile(slow, 40, 40, True, 2, 1, None, for_store=False,
                        pair_seconds=slow.pair_seconds(pair_work(arch, x.shape[1:]), np.float32))
    assert info["tile"] == want != mine, (info["tile"], want, mine)


def test_a_tile_lost_with_the_cluster_is_named_as_such():
    """Workers that died on a tile, or a scheduler lost mid-job: one error saying so (the CLI
    prints it in one line), naming the tile and, with a store, what is kept; a task's own
    error is left as it is."""
    from distributed.client import FutureCancelledError
    from distributed.scheduler import KilledWorker
    from cntk_engine.jobs import dask as jdask
    from cntk_engine.jobs.tiles import Tile
    t = Tile(14, 14, 56, 59, 56, 59, True)
    worker = types.SimpleNamespace(address="tcp://10.0.0.2:4000")
    e = jdask._cluster_failure(KilledWorker("cntk-tile-x-14-14", worker, 3), t, True)
    assert isinstance(e, RuntimeError) and str(e).startswith(
        "dask: tile (14, 14) was lost: the workers that held it died") and \
        "the tiles finished so far are kept in the store" in str(e), e
    e = jdask._cluster_failure(FutureCancelledError("k", "scheduler-connection-lost"), t, False)
    assert str(e) == "dask: the connection to the Dask scheduler was lost", e
    e = jdask._cluster_failure(FutureCancelledError("k", "already forgotten"), t, False)
    assert "the Dask cluster dropped tile (14, 14) (already forgotten)" in str(e), e
    assert jdask._cluster_failure(ValueError("the task's own"), t, True) is None


def test_a_job_on_a_cluster_that_loses_a_tile_ends_with_one_error(rng, tmp_path, monkeypatch):
    """run_dask turns a tile lost with its workers (KilledWorker) into the error that says so,
    naming the tile and what the store keeps (an in-process cluster, its task patched)."""
    from distributed.scheduler import KilledWorker
    from cntk_engine.jobs import dask as jdask
    real = jdask.tile_task

    def dying(spec, tile, *a):
        if (tile.i, tile.j) == (1, 1):
            raise KilledWorker(f"cntk-tile-x-{tile.i}-{tile.j}",
                               types.SimpleNamespace(address="tcp://w:1"), 3)
        return real(spec, tile, *a)
    monkeypatch.setattr(jdask, "tile_task", dying)
    with distributed.LocalCluster(n_workers=1, threads_per_worker=1, processes=False,
                                  dashboard_address=":0") as cluster, \
            distributed.Client(cluster) as c:
        with pytest.raises(RuntimeError, match=r"^dask: tile \(1, 1\) was lost: the workers that "
                           r"held it died .*the tiles finished so far are kept in the store"):
            ce.gram(imgs(rng, 6), depth=3, backend="numba", tile=2, client=c,
                    out=tmp_path / "k.zarr")
        # the client prepares a CPU backend's diagonals: their memory is checked here
        import cntk_engine.arrays
        monkeypatch.setattr(cntk_engine.arrays, "available_memory", lambda: 1 << 20)
        with pytest.raises(MemoryError, match=r"more than the 1.0 MiB of RAM available on this "
                           r"client: use smaller images"):
            ce.gram(np.ones((2, 3, 32, 32)), architecture="myrtle5", backend="numba", client=c)
