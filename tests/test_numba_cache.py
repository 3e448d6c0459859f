"""The numba kernel runs from numba's on-disk cache in every process (numba_cpu._load_from_cache).

Why it matters: code numba compiles in-process and the same code loaded from its cache differ
in the last bits (~1e-9), and Gram tiles computed by different processes (a resumed job, Dask
workers, the CLI) must be bit-identical.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from cntk_engine.backends import numba_cpu

ROOT = Path(__file__).resolve().parents[1]

RUN = """
import json, sys, numpy as np, cntk_engine as ce
from cntk_engine.backends import numba_cpu
x = np.random.default_rng(7).standard_normal((3, 2, 6, 5))
x[0, :, :2] = 0.0
k = ce.gram(x, depths=[2, 4], kernel="both", backend="numba", dtype="float32", pooling="gap")
st = numba_cpu.pair_kernel.stats
print(json.dumps({"bytes": np.concatenate([np.ravel(a) for d in (2, 4) for a in k[d]]).tobytes().hex(),
                  "misses": sum(st.cache_misses.values()), "hits": sum(st.cache_hits.values())}))
"""


def _run(cache_dir):
    env = dict(os.environ, NUMBA_CACHE_DIR=str(cache_dir), PYTHONPATH=str(ROOT))
    env.pop(numba_cpu._CHILD, None)
    out = subprocess.run([sys.executable, "-c", RUN], env=env, capture_output=True, text=True,
                         timeout=1800, cwd=str(cache_dir))
    assert out.returncode == 0, out.stderr[-2000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(not numba_cpu._CACHING, reason="numba found no writable place for its cache here")
def test_first_and_later_processes_compute_bit_identical_grams(tmp_path):
    first = _run(tmp_path)       # empty cache: a child compiles, this process loads
    later = _run(tmp_path)       # the cache is there: loaded directly
    assert first["misses"] == 0 and first["hits"] == 1, first
    assert later["misses"] == 0 and later["hits"] == 1, later
    assert first["bytes"] == later["bytes"]
    assert any(tmp_path.rglob("*.nbi")), "numba wrote no cache index"


def test_read_only_arrays_use_the_same_kernel():
    """Read-only prepared arrays (as a Dask worker deserialises them) must not make numba
    compile a second kernel of its own."""
    from cntk_engine.arch import make_architecture
    from cntk_engine.backends import Prepared
    x = np.random.default_rng(3).standard_normal((2, 1, 4, 4))
    arch = make_architecture(depth=3)
    be = numba_cpu.NumbaBackend(arch, arch.layer_params(1, 4, 4), np.float32)
    p = be.prepare(x)
    k = be.pair_sums(p, p, symmetric=True)
    before = len(numba_cpu.pair_kernel.overloads)
    for arr in (p.images, *p.diag):
        arr.setflags(write=False)
    ro = Prepared(p.images, p.diag)
    np.testing.assert_array_equal(be.pair_sums(ro, ro, symmetric=True), k)
    assert len(numba_cpu.pair_kernel.overloads) == before
