"""Correct wherever and however it is run: the suite tests the installed package, and every
process computes with the same kernel code whatever its working directory.

A clone of the repository holds a ``cntk_engine/`` source tree; Python puts the working
directory first on sys.path for ``python -c`` and ``python -m``, so a child process started
that way from the clone imports the source tree, not the package its parent imported.
"""
from __future__ import annotations

import importlib.metadata
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

import cntk_engine
from cntk_engine.backends import numba_cpu
from conftest import checkout_copy, run_script, written_markers

COMPILED_HERE = "compiled in this process"


def installed_copy() -> Path | None:
    """``cntk_engine/__init__.py`` of the installed distribution, or None (not installed, or an
    editable install, which has no copy of its own)."""
    try:
        dist = importlib.metadata.distribution("cntk-engine")
    except importlib.metadata.PackageNotFoundError:
        return None
    f = Path(dist.locate_file("cntk_engine/__init__.py"))
    return f.resolve() if f.is_file() else None


def test_the_tests_import_the_installed_package():
    imported = Path(cntk_engine.__file__).resolve()
    installed = installed_copy()
    if installed is None:
        pytest.skip("cntk-engine is not installed (or installed editable): the tests import "
                    f"{imported}")
    assert imported == installed, (
        f"the tests imported cntk_engine from {imported}, but it is installed at {installed}: "
        "something put the source tree ahead of site-packages (python -m pytest and PYTHONPATH "
        f"do; sys.path starts {sys.path[:3]}). Run `pytest` after `pip install \".[test]\"`")


# ------------------------------------------------------------------ kill -9 here, resume there
CLI = "import sys\nfrom cntk_engine.cli import main\nsys.exit(main())\n"


def _gram_cli(x_path, out, cwd, env, *extra, wait=True):
    return run_script(CLI, "gram", x_path, "--depth", "3", "--backend", "numba", "--tile", "8",
                      "--out", out, "--no-progress", *extra, cwd=cwd, env=env, wait=wait)


@pytest.mark.skipif(not numba_cpu._CACHING, reason="numba found no writable place for its cache here")
def test_kill_9_in_the_checkout_resume_elsewhere_is_bit_identical(tmp_path):
    """On an empty kernel cache: a store job started in a checkout (its cache-filling child
    could import the checkout's source tree), killed with kill -9, resumed from another folder,
    equals an uninterrupted run bit for bit, and no process compiled the kernel itself."""
    zarr = pytest.importorskip("zarr")
    checkout = checkout_copy(tmp_path / "clone")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    env = dict(os.environ, NUMBA_CACHE_DIR=str(tmp_path / "numba-cache"))   # empty
    env.pop(numba_cpu._CHILD, None)
    x = np.random.default_rng(7).standard_normal((64, 1, 16, 16))
    np.save(tmp_path / "x.npy", x)
    out = tmp_path / "killed.zarr"
    proc = _gram_cli(tmp_path / "x.npy", out, checkout, env, wait=False)
    deadline = time.time() + 900                 # the kernel is compiled first (a child process)
    try:
        while time.time() < deadline and proc.poll() is None:
            if len(written_markers(out)) >= 6:
                break
            time.sleep(0.005)
        assert proc.poll() is None, "the job ended before it could be killed: " + proc.stderr.read()[-800:]
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.wait(30)
    logs = [proc.stderr.read()]
    assert proc.returncode == -signal.SIGKILL
    done = zarr.open_group(str(out), mode="r")["tiles_done"][...]
    assert 0 < np.count_nonzero(done) < 36
    for args in ((out, elsewhere, env, "--resume"), (tmp_path / "clean.zarr", elsewhere, env)):
        r = _gram_cli(tmp_path / "x.npy", *args)
        assert r.returncode == 0, r.stderr[-800:]
        logs.append(r.stderr)
    resumed = zarr.open_group(str(out), mode="r")["ntk"][...]
    clean = zarr.open_group(str(tmp_path / "clean.zarr"), mode="r")["ntk"][...]
    assert not np.isnan(clean).any()
    differ = int(np.count_nonzero(resumed != clean))
    assert differ == 0, f"{differ} of {clean.size} entries differ"
    for log in logs:
        assert COMPILED_HERE not in log, log[-800:]


# ------------------------------------------------------------------ GPU installs
def test_build_record_says_plainly_what_was_built(monkeypatch):
    from cntk_engine import build_info
    record = build_info.build_record()
    if installed_copy() is not None:
        assert record is not None and isinstance(record["cuda_extension"], bool)   # installed builds have one
    monkeypatch.setattr(build_info, "build_record",
                        lambda: {"cuda_extension": False, "reason": "no CUDA compiler (nvcc) was found"})
    assert build_info.cuda_extension_line() == (
        "CUDA extension: not built: no CUDA compiler (nvcc) was found (to build it, install again with "
        "nvcc on PATH and without -DCNTK_ENGINE_NO_CUDA=ON; backend 'cuda' also needs CuPy: "
        "pip install \".[cuda]\" in the cntk_engine source folder; README, Install)")
    built = {"cuda_extension": True, "cuda_version": "13.0.88", "cuda_architectures": "80;90"}
    monkeypatch.setattr(build_info, "build_record", lambda: built)
    line = build_info.cuda_extension_line()
    assert line.startswith("CUDA extension: built for sm_80, sm_90 with CUDA 13.0.88")
    try:
        from cntk_engine import _cuda  # noqa: F401
    except ImportError:
        assert "cannot be imported" in line
        return
    monkeypatch.setattr(build_info, "cupy_runtime_major", lambda: None)
    assert build_info.cuda_extension_line().endswith(
        "CuPy is not installed, and backend 'cuda' needs it: pip install \".[cuda]\" in the cntk_engine "
        "source folder")
    monkeypatch.setattr(build_info, "cupy_runtime_major", lambda: 12)
    assert "CuPy is built for CUDA 12, not 13" in build_info.cuda_extension_line()


def test_auto_says_why_a_present_gpu_goes_unused(monkeypatch, caplog):
    from cntk_engine import backends
    if backends.unavailable_reason("cuda") is None:
        pytest.skip("cuda can run here")
    monkeypatch.setattr(backends, "nvidia_gpu_present", lambda: True)
    monkeypatch.setattr(backends, "_gpu_unused_said", False)
    with caplog.at_level("WARNING", logger="cntk_engine"):
        cntk_engine.gram(np.ones((2, 1, 3, 3)), depth=2, backend="reference", dtype="float64")
        assert not caplog.records                          # a backend asked for by name: no warning
        cntk_engine.gram(np.ones((2, 1, 3, 3)), depth=2, dtype="float64")
        cntk_engine.gram(np.ones((2, 1, 3, 3)), depth=2, dtype="float64")
    msgs = [r.getMessage() for r in caplog.records]
    assert len(msgs) == 1 and "has an NVIDIA GPU" in msgs[0] and backends.unavailable_reason("cuda") in msgs[0]


def test_auto_says_when_it_leaves_an_unverified_cuda_kernel_for_the_cpu(monkeypatch, caplog):
    """On a GPU machine, auto picks numba for a job whose CUDA kernels have not run on a GPU
    (pooled stacks, LAP, flips): said once per reason, with backend='cuda' as the way to use the
    GPU; nothing is said where cuda is unavailable or asked for by name."""
    from cntk_engine import backends
    from cntk_engine.arch import make_architecture
    arch = make_architecture(architecture="myrtle5")

    def caps(cuda):
        return lambda *a: {"reference": dict(unavailable=None, unsupported=None),
                           "numba": dict(unavailable=None, unsupported=None), "cuda": cuda}
    why = "the CUDA kernels for pooled stacks have not run on a GPU yet (backend='cuda' runs them)"
    monkeypatch.setattr(backends, "_unverified_said", set())
    monkeypatch.setattr(backends, "nvidia_gpu_present", lambda: False)
    with caplog.at_level("WARNING", logger="cntk_engine"):
        monkeypatch.setattr(backends, "capabilities", caps(dict(unavailable="no GPU", unsupported=None,
                                                                unverified=why)))
        assert backends.resolve("auto", arch, (3, 32, 32), "float32").name == "numba"
        assert not caplog.records
        monkeypatch.setattr(backends, "capabilities", caps(dict(unavailable=None, unsupported=None,
                                                                unverified=why)))
        for _ in range(2):
            assert backends.resolve("auto", arch, (3, 32, 32), "float32").name == "numba"
        assert backends.resolve("numba", arch, (3, 32, 32), "float32").name == "numba"
    msgs = [r.getMessage() for r in caplog.records]
    assert msgs == ["backend 'auto' runs this job on the CPU (numba) although the cuda backend can "
                    "run it: " + why]


# ------------------------------------------------------------------ Ctrl-C
def test_python_O_gets_a_clear_refusal_or_a_working_store(tmp_path):
    """Under python -O zarr 3.1.6 cannot read a group's metadata (an assert removes a field):
    every store operation failed with a TypeError traceback (helper-93).  Either the store
    works, or the refusal says why, in one line."""
    pytest.importorskip("zarr")
    code = ("import sys, numpy as np, cntk_engine as ce\n"
            "try:\n"
            "    ce.gram(np.ones((2, 1, 3, 3)), depth=2, backend='numba', out='g.zarr')\n"
            "except RuntimeError as e:\n"
            "    print('refused:', e)\n")
    (tmp_path / "o.py").write_text(code)
    r = subprocess.run([sys.executable, "-O", str(tmp_path / "o.py")], cwd=tmp_path,
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0 and "Traceback" not in r.stderr, r.stderr[-2000:]
    if r.stdout.startswith("refused:"):
        assert "cannot read a group's metadata under python -O" in r.stdout
        assert not (tmp_path / "g.zarr").exists()
    else:
        assert (tmp_path / "g.zarr" / "zarr.json").exists(), r.stdout


def test_output_that_fails_ends_the_report_not_the_work(tmp_path):
    """A progress bar on a closed standard error stopped the job (tqdm's AttributeError), a
    reader that left (`| head`) lost evaluate's --json, a full device read as a full disk
    (`gram >/dev/full`: "No space left on device", exit 2, though the store was complete), and
    an --out name an ASCII locale cannot print failed the command after its work (helper-93)."""
    zarr = pytest.importorskip("zarr")
    import shlex
    work, scripts = tmp_path / "work", tmp_path / "scripts"
    work.mkdir()
    scripts.mkdir()
    (scripts / "cli.py").write_text(CLI)
    rng = np.random.default_rng(3)
    np.save(work / "x.npy", rng.random((12, 1, 6, 6)))
    np.savez(work / "d.npz", x=rng.random((30, 1, 6, 6)), y=np.arange(30) % 2)
    cli = f"{shlex.quote(sys.executable)} {shlex.quote(str(scripts / 'cli.py'))}"
    # buffered, as in a user's shell: a report to a pipe or a file fails when flushed, at the
    # end (PYTHONUNBUFFERED, set on some machines, made each print fail where it was made)
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONIOENCODING", "PYTHONUNBUFFERED")}

    def sh(command, **extra):
        r = subprocess.run(["bash", "-o", "pipefail", "-c", command], cwd=work, env={**env, **extra},
                           capture_output=True, text=True, timeout=600)
        assert "Exception ignored" not in r.stderr and "Traceback" not in r.stderr, r.stderr
        return r

    def complete(store):
        return not np.isnan(zarr.open_group(str(work / store), mode="r")["ntk"][...]).any()
    gram = f"{cli} gram x.npy --depth 3 --backend numba --tile 4"
    r = sh(f"{gram} --out closed.zarr 2>&-")
    assert r.returncode == 0 and complete("closed.zarr"), r.stdout
    r = sh(f"{gram} --out errfull.zarr 2>/dev/full")                  # a batch log's full quota
    assert r.returncode == 0 and complete("errfull.zarr"), r.stdout
    # a reader that leaves: 141, or 0 where all was in the pipe before it left (a race)
    r = sh(f"{gram} --out piped.zarr 2>&1 | head -c 1")               # the bar's reader leaves
    assert r.returncode in (0, 141) and complete("piped.zarr"), r.stderr
    r = sh(f"{cli} evaluate d.npz --depth 3 --n-train 20 --n-test 10 --backend numba "
           "--no-progress --json e.json | head -c 10")
    assert r.returncode in (0, 141) and json.loads((work / "e.json").read_text())["n_train"] == 20
    r = sh(f"{gram} --out full.zarr --no-progress >/dev/full")
    assert r.returncode == 1 and complete("full.zarr"), r.stderr
    assert r.stderr.strip().endswith("its report could not be written to standard output ([Errno 28] "
                                     "No space left on device); its work is done")
    r = sh(f"{gram} --out full.zarr --no-progress >/dev/full")        # an error after a report
    assert r.returncode == 2 and "exists; pass --resume" in r.stderr, r.stderr
    name = "d\u00e9j\u00e0.zarr"                      # déjà.zarr
    r = sh(f"{gram} --out {name} --no-progress", PYTHONIOENCODING="ascii")
    assert r.returncode == 0 and complete(name), r.stderr
    assert "d\\xe9j\\xe0.zarr" in r.stdout, r.stdout


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_ctrl_c_stops_a_cpu_store_job_within_seconds(tmp_path, sig):
    """CPU tiles are sized to about 2 s of work (NumbaBackend.traits), and Ctrl-C takes effect
    when the running tile returns: the job stops within seconds, keeps its finished tiles, and
    --resume completes it.  SIGTERM (a batch system's time limit or preemption) stops it the
    same way: it ended the process at once, and its claim was left for a requeued run on
    another node to wait for (helper-93)."""
    zarr = pytest.importorskip("zarr")
    x = np.random.default_rng(5).random((100, 1, 16, 16)).astype(np.float32)
    np.save(tmp_path / "x.npy", x)
    out = tmp_path / "g.zarr"
    args = ("gram", tmp_path / "x.npy", "--depth", "6", "--backend", "numba", "--out", out,
            "--no-progress")
    proc = run_script(CLI, *args, cwd=tmp_path, wait=False)
    deadline = time.time() + 600
    try:
        while time.time() < deadline and proc.poll() is None:
            if len(written_markers(out)) >= 1:
                break
            time.sleep(0.01)
        assert proc.poll() is None, "the job ended before Ctrl-C: " + proc.stderr.read()[-800:]
        t0 = time.time()
        proc.send_signal(sig)
        proc.wait(120)
        stopped_after = time.time() - t0
    finally:
        if proc.poll() is None:
            proc.kill()
    err = proc.stderr.read()
    said = "interrupted" if sig == signal.SIGINT else "terminated (SIGTERM)"
    assert proc.returncode == 128 + sig and said in err and "--resume" in err, err[-800:]
    assert "Traceback" not in err
    assert [p.name for p in (out / "claims").iterdir()] == ["zarr.json"], "a claim was left behind"
    from cntk_engine.jobs.store import list_runs
    assert list_runs(zarr.open_group(str(out), mode="r"))[-1]["outcome"] == said
    assert stopped_after < 15, f"Ctrl-C took {stopped_after:.1f} s"
    done = zarr.open_group(str(out), mode="r")["tiles_done"][...]
    assert 0 < np.count_nonzero(done) < np.triu(np.ones_like(done)).sum()
    r = run_script(CLI, *args, "--resume", cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-800:]
    assert not np.isnan(zarr.open_group(str(out), mode="r")["ntk"][...]).any()
