"""The numba kernel runs from numba's on-disk cache in every process (numba_cpu._load_from_cache).

Why it matters: code numba compiles in-process and the same code loaded from its cache differ
in the last bits (~1e-9), and Gram tiles computed by different processes (a resumed job, Dask
workers, the CLI) must be bit-identical.
"""
from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import numpy as np
import pytest

import cntk_engine
from cntk_engine.backends import numba_cpu
from conftest import checkout_copy, run_script

RUN = """
import json, logging, sys, numpy as np, cntk_engine as ce
logging.basicConfig(level=logging.INFO)
from cntk_engine.backends import numba_cpu
x = np.random.default_rng(7).standard_normal((3, 2, 6, 5))
x[0, :, :2] = 0.0
k = ce.gram(x, depths=[2, 4], kernel="both", backend="numba", dtype="float32", pooling="gap")
st = numba_cpu.pair_kernel.stats
print(json.dumps({"bytes": np.concatenate([np.ravel(a) for d in (2, 4) for a in k[d]]).tobytes().hex(),
                  "misses": sum(st.cache_misses.values()), "hits": sum(st.cache_hits.values()),
                  "package": ce.__file__, "status": numba_cpu.cache_status()}))
"""


def _start(cache_dir, cwd):
    env = dict(os.environ, NUMBA_CACHE_DIR=str(cache_dir))
    env.pop(numba_cpu._CHILD, None)
    return run_script(RUN, cwd=cwd, env=env, wait=False)


def _run(cache_dir, cwd=None, proc=None):
    proc = proc or _start(cache_dir, cwd)
    stdout, stderr = proc.communicate(timeout=1800)
    out = subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "compiled in this process" not in out.stderr, out.stderr[-2000:]
    res = json.loads(out.stdout.strip().splitlines()[-1])
    assert Path(res["package"]).resolve() == Path(cntk_engine.__file__).resolve()
    res["compiling_said"] = "compiling the float32 kernel into numba's on-disk cache" in out.stderr
    res["waited"] = "another process is compiling the float32 kernel" in out.stderr
    return res


@pytest.mark.skipif(not numba_cpu._CACHING, reason="numba found no writable place for its cache here")
def test_first_and_later_processes_compute_bit_identical_grams(tmp_path):
    """The first process runs in a checkout (a folder holding a cntk_engine/ source tree) on an
    empty cache: the child that compiles the kernel must import the package its parent imported,
    not the checkout's tree, or the parent misses the cache and compiles for itself."""
    cache = tmp_path / "numba-cache"
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    clone = checkout_copy(tmp_path / "clone")
    # NUMBA_CACHE_DIR relative to the first process's folder: the child, which runs in another
    # folder, wrote the cache there, and the first process compiled for itself.  A second
    # process started with it (joblib's workers, a job array) waits for that compile and loads
    # it, rather than compile the same kernel at once (each compiled: 77 s for two workers where
    # one took 29 s on 2 cores)
    together = [_start(os.path.relpath(cache, clone), clone), _start(cache, elsewhere)]
    first, second = (_run(cache, proc=p) for p in together)
    later = _run(cache, elsewhere)                            # the cache is there: loaded directly
    for r in (first, second, later):
        assert r["misses"] == 0 and r["hits"] == 1, r
    # the first job's minute at 0 % is explained in its log; a later one has nothing to say
    assert first["compiling_said"] + second["compiling_said"] == 1, (first, second)
    assert (first["waited"] or second["waited"]) and not later["compiling_said"]
    assert first["bytes"] == second["bytes"] == later["bytes"]
    assert any(cache.rglob("*.nbi")), "numba wrote no cache index"
    # cntk-engine info's line follows NUMBA_CACHE_DIR: the installed package's cache, with float32
    assert later["status"].startswith(str(cache)) and "holds float32" in later["status"], later


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


def test_a_cache_that_is_off_is_said_once(monkeypatch, caplog):
    """Where numba finds no writable place for its cache, every process compiles for itself;
    the docstring said the log says so, but nothing did (only cntk-engine info)."""
    monkeypatch.setattr(numba_cpu, "_CACHING", False)
    monkeypatch.setattr(numba_cpu, "_no_cache_logged", False)
    x = np.random.default_rng(3).standard_normal((2, 1, 4, 4))
    with caplog.at_level("WARNING", logger="cntk_engine"):
        for _ in range(2):
            cntk_engine.gram(x, depth=2, backend="numba")
    said = [r.getMessage() for r in caplog.records if "on-disk cache is off" in r.getMessage()]
    assert len(said) == 1 and "every process compiles the kernels itself" in said[0]


@pytest.mark.skipif(not numba_cpu._CACHING, reason="numba found no writable place for its cache here")
def test_a_kernel_in_the_cache_is_loaded_without_the_compile_lock(monkeypatch):
    """The cross-process compile lock is taken only where the cache lacks the kernel: a process
    whose kernel is cached does not wait for another's compile (of the other dtype, or a hung
    one: it waited up to 30 min)."""
    x = np.random.default_rng(0).standard_normal((2, 1, 4, 4))
    cntk_engine.gram(x, depth=2, backend="numba", dtype="float32")      # in the cache now

    def locked(name):
        raise AssertionError("the compile lock was taken for a cached kernel")
    monkeypatch.setattr(numba_cpu, "_compiling_lock", locked)
    monkeypatch.setattr(numba_cpu, "_loaded", set())
    cntk_engine.gram(x, depth=2, backend="numba", dtype="float32")
    assert "float32" in numba_cpu._loaded


@pytest.mark.skipif(not numba_cpu._CACHING, reason="numba found no writable place for its cache here")
def test_an_index_entry_whose_data_file_is_not_written_yet_is_not_in_the_cache(monkeypatch):
    """numba writes a new entry's index before its data file: a process that looked between the
    two took the kernel for cached, skipped the compile lock and compiled for itself
    An entry counts only with its data file."""
    x = np.random.default_rng(0).standard_normal((2, 1, 4, 4))
    cntk_engine.gram(x, depth=2, backend="numba", dtype="float32")
    cache_file = numba_cpu.pair_kernel._cache._cache_file
    index = cache_file._load_index()
    assert index
    real_exists = os.path.exists
    data = {cache_file._data_path(name) for name in index.values()}
    seen = []

    def in_cache(*a):
        seen.append(a)
        return real_in_cache(*a)
    real_in_cache = numba_cpu._in_cache
    monkeypatch.setattr(numba_cpu, "_in_cache", in_cache)
    monkeypatch.setattr(numba_cpu, "_loaded", set())
    monkeypatch.setattr(numba_cpu, "_compile_into_cache", lambda name, args: seen.append("compile"))
    monkeypatch.setattr(numba_cpu.os.path, "exists", lambda p: p not in data and real_exists(p))
    cntk_engine.gram(x, depth=2, backend="numba", dtype="float32")
    assert seen[-1] == "compile"        # not taken for cached: the compile path (under its lock)
