"""Dask: tiles as tasks on a local multi-process cluster (numba backend), worker loss."""
import os
import signal
import threading
import time
from pathlib import Path

import numpy as np
import pytest

distributed = pytest.importorskip("distributed")
zarr = pytest.importorskip("zarr")

import cntk_engine as ce  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def client():
    env = {"NUMBA_NUM_THREADS": "1",
           "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    with distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True,
                                  dashboard_address=None, env=env) as cluster:
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
    markers = out / "tiles_done" / "c"
    killed = None
    deadline = time.time() + 120
    while time.time() < deadline and th.is_alive():
        n_done = sum(len(f) for _, _, f in os.walk(markers)) if markers.is_dir() else 0
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
