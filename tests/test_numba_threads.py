"""The numba backend in processes forked after a call and in several threads at once.

numba's GNU OpenMP layer kills a child forked after a parallel call ("fork() called from a
process already using GNU OpenMP"; a multiprocessing Pool of them hangs), and its workqueue
layer aborts the process when two threads launch at once.  cntk_engine loads pip's TBB where
the ``tbb`` dependency is installed (numba's first choice, safe for both), and runs kernels one
at a time under workqueue (numba_cpu._launch).  Each case runs in a child process: an abort
must not take the test session with it.
"""
from __future__ import annotations

import json
import os

import pytest

from cntk_engine.backends import numba_cpu
from conftest import run_script

IMAGES = "np.random.default_rng(0).standard_normal((6, 1, 5, 5))"

FORK = f"""
import json, multiprocessing as mp, numpy as np, numba, cntk_engine as ce
x = {IMAGES}

def row(i):
    return ce.gram(x[i:i + 1], x, depth=3, backend="numba").tolist()

if __name__ == "__main__":
    here = [row(i) for i in range(len(x))]          # the parent runs the parallel kernel first
    with mp.get_context("fork").Pool(2) as pool:
        rows = pool.map(row, range(len(x)))
    print(json.dumps({{"layer": numba.threading_layer(), "here": here, "rows": rows}}))
"""

THREADS = """
import json, threading, numpy as np, numba, cntk_engine as ce
x = np.random.default_rng(0).standard_normal((16, 2, 8, 8))     # calls long enough to overlap
K = ce.gram(x, depth=4, backend="numba")
out = [None] * 6

def work(i):
    for _ in range(3):
        out[i] = ce.gram(x, depth=4, backend="numba").tolist()

ts = [threading.Thread(target=work, args=(i,)) for i in range(6)]
for t in ts:
    t.start()
for t in ts:
    t.join()
print(json.dumps({"layer": numba.threading_layer(), "K": K.tolist(), "out": out}))
"""


def _child(code, tmp_path, **env):
    environ = {k: v for k, v in os.environ.items() if k != numba_cpu._CHILD}
    out = run_script(code, cwd=tmp_path, env={**environ, **env}, timeout=300)
    assert out.returncode == 0, f"rc {out.returncode}: {out.stderr[-2000:]}"
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(numba_cpu.TBB_LIBRARY is None,
                    reason="pip's tbb is not installed here (a dependency on Linux x86-64 only): "
                           "numba's layer here may not be fork-safe")
def test_a_child_forked_after_a_call_computes(tmp_path):
    """Under GNU OpenMP each child printed "Terminating: fork() called from a process already
    using GNU OpenMP" and was killed, and Pool.map hung."""
    res = _child(FORK, tmp_path)
    assert res["layer"] == "tbb"
    assert res["rows"] == res["here"]                # bit for bit


def test_calls_from_several_threads_at_once_under_workqueue(tmp_path):
    """workqueue aborted the process ("Concurrent access has been detected") when two threads
    launched at once: a Dask worker's threads, or a caller's thread pool."""
    res = _child(THREADS, tmp_path, NUMBA_THREADING_LAYER="workqueue")
    assert res["layer"] == "workqueue"
    assert all(o == res["K"] for o in res["out"])
