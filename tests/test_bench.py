"""The benchmark harness and reproduction scripts on tiny sizes (no timings are asserted)."""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
# after site-packages: bench/ is found in the repository, cntk_engine where it is installed
if str(ROOT) not in sys.path:
    sys.path.append(str(ROOT))

import cntk_engine as ce  # noqa: E402
from bench import ceiling, per_layer_cpu  # noqa: E402
from bench.common import ScriptError  # noqa: E402
from conftest import official_cifar  # noqa: E402


@pytest.mark.parametrize("pooling,fix,convention", [("gap", False, "arora"), ("flatten", True, "arora"),
                                                    ("gap", True, "neural_tangents")])
def test_per_layer_cpu_equals_reference(pooling, fix, convention):
    rng = np.random.default_rng(1)
    x = rng.standard_normal((3, 2, 5, 4))
    z = rng.standard_normal((2, 2, 5, 4))
    x[0, :, :2] = 0.0                                  # zero-variance windows
    for x2 in (None, z):
        ref = ce.gram(x, x2, depths=[3, 5], pooling=pooling, fix=fix, kernel="both",
                      backend="reference", convention=convention)
        got = per_layer_cpu.gram(x, x2, depths=[3, 5], pooling=pooling, fix=fix, kernel="both",
                                 dtype="float64", convention=convention)
        for d in (3, 5):
            for a, b in zip(got[d], ref[d]):
                np.testing.assert_allclose(a, b, rtol=1e-10, atol=1e-12 * np.abs(b).max())


def test_work_count_matches_the_documented_formula():
    for pooling, e in (("gap", (6 * 5) ** 2), ("flatten", 6 * 5)):
        for d in (2, 3, 21):
            L = d - 1
            w = ceiling.work_per_pair(d, 6, 5, channels=3, pooling=pooling)
            assert w.fp_instructions == e * (L * 23 + (L - 1) * 11 + (3 + 3) + 2)
            assert w.flops == e * (L * 32 + (L - 1) * 17 + (2 * (3 + 3) + 2))
    w = ceiling.work_per_pair(21, 32, 32)
    f = ceiling.ceiling_figures(10.0, w, {"fma_per_s": 1e11})
    assert f["ceiling_pairs_per_s"] == pytest.approx(1e11 / w.fp_instructions)
    assert f["fraction_of_ceiling"] == pytest.approx(10.0 * w.fp_instructions / 1e11)
    assert f["fraction_of_peak_flops"] == pytest.approx(10.0 * w.flops / 2e11)
    assert ceiling.ceiling_figures(10.0, w, None) == {}


def test_harness_end_to_end(tmp_path):
    from bench import harness
    out = tmp_path / "h.json"
    harness.main(["--methods", "numba,per_layer_cpu,reference,per_layer_cuda", "--depths", "2,3",
                  "--sizes", "5", "--n", "2,3", "--n-for", "per_layer_cpu=2,reference=2",
                  "--repeats", "1", "--warmup", "0", "--no-ceiling", "--output", str(out)])
    p = json.loads(out.read_text())
    for key in ("date", "commit", "command", "machine", "versions", "timing", "results", "plots"):
        assert key in p
    ok = [r for r in p["results"] if r["status"] == "ok"]
    assert {r["config"]["method"] for r in ok} == {"numba", "per_layer_cpu", "reference"}
    assert len(ok) == 2 * 2 + 2 + 2                    # numba: 2 depths x 2 N
    for r in ok:
        c = r["config"]
        assert set(c) == {"method", "architecture", "depth", "size", "channels", "pooling", "fix", "dtype",
                          "tile", "n", "cuda_kernel"}
        assert (c["architecture"], c["fix"], c["cuda_kernel"]) == ("cnn", False, None)
        assert r["unique_pairs"] == c["n"] * (c["n"] + 1) // 2
        assert r["unique_pairs_per_s"] == pytest.approx(r["unique_pairs"] / r["seconds"])
        assert r["work_per_pair"]["fp_instructions"] > 0
        if c["method"] in ("numba", "reference"):      # the project's: its preparation timed
            assert 0 < r["preparation_s"] < r["seconds"]
            assert r["unique_pairs_per_s_beyond_preparation"] == pytest.approx(
                r["unique_pairs"] / (r["seconds"] - r["preparation_s"]))
        else:
            assert "preparation_s" not in r
        if "check" in r:                               # every method agrees with the float64 reference
            assert r["check"]["vs"] == "reference float64" and r["check"]["max_rel_diff"] < 1e-5, r
    assert sum("check" in r for r in ok) == 6          # numba x 4, per_layer_cpu x 2
    assert [r["config"]["method"] for r in p["results"][:2]] == ["reference"] * 2   # references first
    plc = [r for r in p["results"] if r["config"]["method"] == "per_layer_cuda"]
    assert plc and all(r["status"] in ("unavailable", "failed", "ok") for r in plc)
    assert all(Path(f).exists() for f in p["plots"])
    # --resume keeps what is there
    harness.main(["--methods", "numba", "--depths", "2", "--sizes", "5", "--n", "2", "--repeats", "1",
                  "--warmup", "0", "--no-ceiling", "--no-plots", "--output", str(out), "--resume"])
    again = json.loads(out.read_text())["results"]
    first = next(r for r in p["results"] if r["config"]["method"] == "numba" and r["config"]["n"] == 2
                 and r["config"]["depth"] == 2)
    assert again[0]["seconds"] == first["seconds"]


FAKE_NT = """#!{python}
# Stands in for a Python with neural-tangents: called as the harness calls it
# (python -c SNIPPET n depth size reps bench_dir [save.npz]); its kernels are this package's
# float64 values of the same network, times {scale}.
import json, sys
import numpy as np
sys.path.append({root!r})
import cntk_engine as ce
n, depth, size = (int(a) for a in sys.argv[3:6])
x = np.random.default_rng(0).standard_normal((n, size, size, 3)).astype(np.float32)
ntk, nngp = ce.gram(x.astype(np.float64), depth=depth, kernel="both", convention="neural_tangents",
                    W_std=1.0, data_format="NHWC", dtype="float64")
np.savez(sys.argv[8], x=x, ntk=ntk * {scale}, nngp=nngp)
print(json.dumps({{"seconds": 0.5, "times": [0.5], "version": "fake", "jax_device": "cpu:0"}}))
"""


def fake_nt_python(tmp_path, template, scale=1.0):
    """An executable standing in for neural-tangents' Python: ``template`` (FAKE_NT or
    FAKE_NT_STACK) answers with this package's float64 kernel, its NTK times ``scale``."""
    fake = tmp_path / "python"
    fake.write_text(template.format(python=sys.executable, root=str(ROOT), scale=scale))
    fake.chmod(0o755)
    return fake


@pytest.mark.parametrize("scale", [1.0, 1.5])
def test_harness_checks_neural_tangents_values(tmp_path, scale):
    """The NT comparison carries an exactness check that a wrong kernel fails."""
    from bench import harness
    fake = fake_nt_python(tmp_path, FAKE_NT, scale)
    out = tmp_path / "h.json"
    harness.main(["--methods", "neural_tangents", "--depths", "3", "--sizes", "5", "--n", "3",
                  "--repeats", "1", "--warmup", "0", "--no-ceiling", "--no-plots",
                  "--nt-python", str(fake), "--output", str(out)])
    (r,) = json.loads(out.read_text())["results"]
    assert r["status"] == "ok" and r["unique_pairs_per_s"] == pytest.approx(6 / 0.5)
    if scale == 1.0:
        assert r["check"]["max_rel_diff"] < 1e-6   # the fake's images are float32-rounded
    else:
        assert r["check"]["max_rel_diff"] > 0.2


def test_harness_records_a_failed_neural_tangents_configuration_and_goes_on(tmp_path):
    """An exception in one neural-tangents configuration (here: it wrote no kernels) is that
    configuration's failure, recorded with its reason; the later configurations still run."""
    from bench import harness
    fake = tmp_path / "python"
    fake.write_text(f"#!{sys.executable}\nimport json\n"
                    "print(json.dumps({'seconds': 0.5, 'times': [0.5], 'jax_device': 'cpu:0'}))\n")
    fake.chmod(0o755)
    out = tmp_path / "h.json"
    with pytest.raises(SystemExit) as e:        # nothing measured: exit 1, the file written all the same
        harness.main(["--methods", "neural_tangents", "--depths", "2,3", "--sizes", "5", "--n", "2",
                      "--repeats", "1", "--warmup", "0", "--no-ceiling", "--no-plots",
                      "--nt-python", str(fake), "--output", str(out)])
    assert e.value.code == 1 and "nothing was measured: 2 configuration(s), 2 failed" in str(e.value)
    rows = json.loads(out.read_text())["results"]
    assert [(r["config"]["depth"], r["status"]) for r in rows] == [(2, "failed"), (3, "failed")]
    assert all(r["reason"].startswith("FileNotFoundError") for r in rows)


def test_nt_fixture_check_detects_a_changed_value(tmp_path, monkeypatch):
    """``make_nt_fixtures.py --check`` fails on a fixture whose values were altered."""
    import runpy
    try:
        from bench import nt_compat
        nt_compat.install()
        import neural_tangents  # noqa: F401
    except ImportError as e:
        pytest.skip(f"neural-tangents cannot be imported ({e}); tests/fixtures/make_nt_fixtures.py says how")
    f = np.load(ROOT / "tests" / "fixtures" / "nt_values.npz")
    arrays = {k: f[k] for k in f.files}
    bad = tmp_path / "bad.npz"
    arrays["c0_d2_ntk"] = arrays["c0_d2_ntk"] * (1 + 1e-6)
    np.savez(bad, **arrays)
    for path, code in ((ROOT / "tests" / "fixtures" / "nt_values.npz", 0), (bad, 1)):
        monkeypatch.setattr(sys, "argv", ["make_nt_fixtures.py", "--check", "--out", str(path)])
        with pytest.raises(SystemExit) as e:
            runpy.run_path(str(ROOT / "tests" / "fixtures" / "make_nt_fixtures.py"), run_name="__main__")
        assert e.value.code == code


def test_harness_through_dask(tmp_path):
    """--dask-scheduler: the project's backend runs as Dask tile tasks, checked against per-layer."""
    distributed = pytest.importorskip("distributed")
    from bench import harness
    out = tmp_path / "h.json"
    with distributed.LocalCluster(n_workers=1, threads_per_worker=1, processes=False,
                                  dashboard_address=None) as cluster:
        harness.main(["--methods", "numba,per_layer_cpu", "--depths", "3", "--sizes", "5",
                      "--n", "6", "--n-for", "per_layer_cpu=3", "--tiles", "2", "--repeats", "1",
                      "--warmup", "0", "--no-ceiling", "--no-plots", "--dask-scheduler",
                      cluster.scheduler_address, "--output", str(out)])
    p = json.loads(out.read_text())
    assert "Client" in p["scheduler"]["client"]
    numba_run, plc = p["results"]
    assert numba_run["status"] == "ok" and numba_run["config"]["tile"] == 2
    assert plc["check"]["vs"].startswith("numba") and plc["check"]["max_rel_diff"] < 1e-5


def test_paper_targets_and_loo_solver():
    from bench.reproduce_table1 import LOO_GRID, regression_accuracy
    rng = np.random.default_rng(0)
    centers = rng.standard_normal((10, 20)) * 3
    y = np.arange(200) % 10
    f = centers[y] + rng.standard_normal((200, 20))
    k = f @ f.T + 1e-3 * np.eye(200)
    ktr, kte, ytr, yte = k[:150, :150], k[150:, :150], y[:150], y[150:]
    acc, ridge, loo = regression_accuracy(ktr, kte, ytr, yte)
    Y = np.where(ytr[:, None] == np.arange(10), 0.9, -0.1)             # the paper's targets
    assert acc == np.mean((kte @ np.linalg.solve(ktr, Y)).argmax(1) == yte) > 0.9
    assert ridge is None and loo is None
    acc, ridge, loo = regression_accuracy(ktr, kte, ytr, yte, loo=True)
    assert acc > 0.9 and loo > 0.9 and ridge in LOO_GRID


def test_table1_and_small_data_tiny(tmp_path):
    from bench import reproduce_table1, small_data
    rng = np.random.default_rng(0)
    data = tmp_path / "d.npz"
    np.savez(data, x_train=rng.integers(0, 256, (40, 6, 6, 3), dtype=np.uint8), y_train=np.arange(40) % 10,
             x_test=rng.integers(0, 256, (12, 6, 6, 3), dtype=np.uint8), y_test=np.arange(12) % 10)
    p = reproduce_table1.main(["--data", str(data), "--n-train", "30", "--n-test", "12", "--pooling", "gap,flatten",
                               "--depths", "3,4", "--backend", "numba", "--per-depth-timing", "3",
                               "--out-dir", str(tmp_path), "--tag", "t", "--save-kernels", str(tmp_path / "k")])
    assert set(p["columns"]) == {"CNTK-GAP", "CNTK-V"}
    assert p["columns"]["CNTK-GAP"]["fix"] is True and p["columns"]["CNTK-V"]["fix"] is False
    for col in p["columns"].values():
        assert col["timing"]["unique_pairs"] == 30 * 31 // 2 + 30 * 12
        assert [r["depth"] for r in col["rows"]] == [3, 4]
        for r in col["rows"]:
            assert 0.0 <= r["ntk_acc_paper_solve"] <= 1.0 and 0.0 <= r["nngp_acc_loo_ridge"] <= 1.0
    md = next(tmp_path.glob("table1_t_*.md")).read_text()
    assert "CNTK-GAP" in md and "CNTK-V" in md
    s = small_data.main(["--kernels", str(tmp_path / "k_gap.npz"), "--sizes", "10,20", "--draws", "2",
                         "--depths", "3", "--out-dir", str(tmp_path), "--tag", "t"])
    rows = s["accuracy"]["CNTK d3 paper solve"]
    assert [r["n_train"] for r in rows] == [10, 20] and all(r["draws"] == 2 for r in rows)
    assert next(tmp_path.glob("small_data_t_*.png")).stat().st_size > 0


def test_table1_store_matches_memory_and_resumes(tmp_path):
    """--store: kernels go to resumable Zarr stores; the table equals the in-memory one, and a
    second run of the same command computes no tile again."""
    pytest.importorskip("zarr")
    from bench import reproduce_table1
    rng = np.random.default_rng(1)
    data = tmp_path / "d.npz"
    np.savez(data, x_train=rng.integers(0, 256, (24, 5, 5, 3), dtype=np.uint8), y_train=np.arange(24) % 10,
             x_test=rng.integers(0, 256, (9, 5, 5, 3), dtype=np.uint8), y_test=np.arange(9) % 10)
    common = ["--data", str(data), "--n-train", "24", "--n-test", "9", "--pooling", "gap", "--depths", "3,4",
              "--backend", "numba", "--tile", "8", "--per-depth-timing", "0", "--out-dir", str(tmp_path)]
    mem = reproduce_table1.main(common + ["--tag", "mem", "--save-kernels", str(tmp_path / "mem")])
    st = reproduce_table1.main(common + ["--tag", "st", "--store", str(tmp_path / "s"),
                                         "--save-kernels", str(tmp_path / "st")])
    again = reproduce_table1.main(common + ["--tag", "again", "--store", str(tmp_path / "s")])
    a, b = np.load(tmp_path / "mem_gap.npz"), np.load(tmp_path / "st_gap.npz")
    for key in ("ntk_train_3", "nngp_train_4", "ntk_test_4", "nngp_test_3"):
        assert a[key].tobytes() == b[key].tobytes(), key
    rows = [p["columns"]["CNTK-GAP"]["rows"] for p in (mem, st, again)]
    assert rows[0] == rows[1] == rows[2]
    t = st["columns"]["CNTK-GAP"]["timing"]
    assert t["tiles_computed"] == t["tiles_total"] > 2 and t["unique_pairs_per_s"] > 0
    t2 = again["columns"]["CNTK-GAP"]["timing"]
    assert t2["tiles_computed"] == 0 and t2["unique_pairs_per_s"] is None and "resumed" in t2["note"]
    assert (tmp_path / "s" / "gap_train.zarr").is_dir() and (tmp_path / "s" / "gap_test.zarr").is_dir()
    # one depth: its store names the arrays ntk / nngp (it read depth_3/ntk and failed)
    one = reproduce_table1.main([*common[:9], "3", *common[10:], "--tag", "one", "--store",
                                 str(tmp_path / "s1")])
    assert one["columns"]["CNTK-GAP"]["rows"][0] == rows[0][0]
    # a store of another run: one line naming --store and what differs; nothing written
    snap = {p: p.read_bytes() for p in (tmp_path / "s1").rglob("*") if p.is_file()}
    with pytest.raises(SystemExit, match=r"--store .*s1: gap_train.zarr holds the kernels of another "
                                         r"run: --depths: store has \[3\], this job \[3, 4\]"):
        reproduce_table1.main(common + ["--tag", "other", "--store", str(tmp_path / "s1")])
    assert {p: p.read_bytes() for p in (tmp_path / "s1").rglob("*") if p.is_file()} == snap


def test_harness_checks_its_result_folder_before_running(tmp_path, monkeypatch):
    from bench import harness
    monkeypatch.setattr(harness, "build_matrix", lambda args: pytest.fail("configurations built"))
    (tmp_path / "file").write_text("x")
    with pytest.raises(SystemExit, match="file is a file, not a folder") as e:
        harness.main(["--methods", "reference", "--depths", "2", "--sizes", "3", "--n", "1", "--no-ceiling",
                      "--no-plots", "--output", str(tmp_path / "file" / "sub" / "h.json")])
    assert e.value.code == 2


def test_bench_scripts_end_engine_errors_with_one_line(tmp_path, capsys):
    """An engine error (here --devices on a CPU backend) is one line naming the script's options,
    and --n-train beyond the data is a note, not silence."""
    from bench import reproduce_table1
    data = _tiny_cifar(tmp_path / "d.npz")
    with pytest.raises(SystemExit) as e:
        reproduce_table1.main(["--data", str(data), "--n-train", "10", "--depths", "3", "--backend", "numba",
                               "--devices", "0", "--per-depth-timing", "0", "--no-loo", "--out-dir", str(tmp_path)])
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.count("\n") == 1 and "Traceback" not in err
    assert err.startswith("reproduce_table1.py: error: --devices 0 selects GPUs") or \
        "error: --devices 0 selects GPUs" in err, err
    reproduce_table1.main(["--data", str(data), "--n-train", "1000", "--n-test", "3", "--depths", "3",
                           "--backend", "numba", "--per-depth-timing", "0", "--no-loo", "--out-dir",
                           str(tmp_path)])
    assert "note: --n-train 1000:" in capsys.readouterr().out


def _harness_row(method, dtype, depth, pairs_per_s, device, n=8):
    return {"status": "ok", "device": device, "unique_pairs_per_s": pairs_per_s,
            "config": {"method": method, "dtype": dtype, "depth": depth, "n": n, "size": 32,
                       "pooling": "gap", "tile": None}}


def test_speedup_bars_read_ours_over_same_device_alternatives(tmp_path):
    from bench import plots
    rows = [_harness_row("cuda", "float32", 3, 1000.0, "gpu"),
            _harness_row("cuda", "float64", 3, 100.0, "gpu"),
            _harness_row("numba", "float32", 3, 10.0, "cpu"),
            _harness_row("per_layer_cuda", "float32", 3, 20.0, "gpu"),
            _harness_row("per_layer_cpu", "float32", 3, 2.0, "cpu"),
            _harness_row("neural_tangents", "float32", 3, 0.5, "cpu", n=2)]
    best = {(plots._label(r["config"]), 32, "gap", 3): r for r in rows}
    bars = {(a, b): v[3] for (a, b, _, _), v in plots._speedups(best).items()}
    assert bars == {("cuda float32", "numba float32"): 100.0,
                    ("cuda float32", "per_layer_cuda float32"): 50.0,
                    ("numba float32", "per_layer_cpu float32"): 5.0,
                    ("numba float32", "neural_tangents float32"): 20.0}
    payload = {"machine": {"cpu": "test", "cores": 2}, "commit": "abc1234 (note)", "results": rows}
    (png,) = plots.harness_plots(payload, tmp_path / "h")
    assert png.stat().st_size > 0


def test_small_data_plot_one_panel_per_solve(tmp_path):
    from bench import plots
    acc = {f"{k} d{d} {s}": [{"n_train": n, "mean": 0.1 + n / 1000, "std": 0.01} for n in (10, 20)]
           for k in ("CNTK", "CNN-GP") for d in (3, 11) for s in ("paper solve", "loo ridge")}
    assert plots._small_data_key("CNN-GP d11 loo ridge") == ("CNN-GP", 11, "loo ridge")
    out = plots.small_data_plot({"accuracy": acc, "n_test": 5, "title": "t"}, tmp_path / "s.png")
    assert out.stat().st_size > 0


def test_load_cifar_official_files_folder_and_archive(tmp_path):
    from bench.reproduce_table1 import load_cifar
    root, archive, xs, ys = official_cifar(tmp_path)
    for src in (root, tmp_path, archive):
        x_tr, y_tr, x_te, y_te, _ = load_cifar(src)
        assert x_tr.shape == (15, 3, 32, 32) and x_te.shape == (3, 3, 32, 32) and x_tr.dtype == np.uint8
        # row layout: the red 32x32 plane, then green, then blue, each row-major
        assert x_tr[4, 1, 2, 7] == xs[1][1, 1024 + 2 * 32 + 7]
        assert x_te[2, 2, 31, 0] == xs[5][2, 2048 + 31 * 32]
        np.testing.assert_array_equal(y_tr, np.concatenate(ys[:5]))
        np.testing.assert_array_equal(y_te, ys[5])


def test_load_cifar_refuses_what_it_cannot_read(tmp_path):
    import pickle
    from bench.reproduce_table1 import load_cifar
    root, _, _, _ = official_cifar(tmp_path)
    with pytest.raises(ValueError, match="does not exist"):
        load_cifar(tmp_path / "nowhere")
    (root / "test_batch").unlink()
    with pytest.raises(ValueError, match="lacks the CIFAR-10 file.*test_batch"):
        load_cifar(root)
    (root / "test_batch").write_bytes(pickle.dumps({b"data": np.zeros((2, 100), np.uint8), b"labels": [0, 1]}))
    with pytest.raises(ValueError, match=r"test_batch has data of shape \(2, 100\)"):
        load_cifar(root)
    np.savez(tmp_path / "x.npz", x_train=np.zeros((2, 32, 32, 3), np.uint8), y_train=[0, 1])
    with pytest.raises(ValueError, match="has no x_test, y_test"):
        load_cifar(tmp_path / "x.npz")
    (tmp_path / "x.txt").write_text("hello")
    with pytest.raises(ValueError, match="neither a directory"):
        load_cifar(tmp_path / "x.txt")


# ---------------------------------------------------------------------------- review fixes
def _tiny_cifar(path, n_train=12, n_test=4, size=4, seed=0):
    rng = np.random.default_rng(seed)
    np.savez(path, x_train=rng.integers(0, 256, (n_train, size, size, 3), dtype=np.uint8),
             y_train=np.arange(n_train) % 10, x_test=rng.integers(0, 256, (n_test, size, size, 3), dtype=np.uint8),
             y_test=np.arange(n_test) % 10)
    return path


def test_per_layer_baseline_computes_each_unordered_pair_once():
    """The CuPy per-layer baseline uses the symmetry (N(N+1)/2 pair calls, mirrored), as the
    harness's unique pairs/s assumes; checked with NumPy standing in for CuPy."""
    from bench import harness, per_layer_baseline
    from bench.per_layer_baseline import PerLayerGPU
    g = PerLayerGPU.__new__(PerLayerGPU)
    g.cp = np
    g._diag_roots = lambda x: float(x.sum())
    calls = []

    def pair(x, z, rx, rz):
        calls.append((rx, rz))
        return rx + 2 * rz, rx * rz

    g.pair = pair
    x = np.random.default_rng(0).standard_normal((4, 2, 3, 3))
    ntk, nngp = g.gram(x, both=True)
    assert len(calls) == 4 * 5 // 2
    r = np.array([np.float32(xi).sum() for xi in x], dtype=np.float64)
    for i in range(4):
        for j in range(4):
            a, b = min(i, j), max(i, j)                 # computed once, as (a, b), and mirrored
            assert ntk[i, j] == pytest.approx(r[a] + 2 * r[b]) and nngp[i, j] == pytest.approx(r[a] * r[b])
    assert per_layer_baseline.PAIRS_EVALUATED == "unique"
    assert harness.pairs_evaluated("per_layer_cuda", 16, per_layer_baseline) == 136
    assert harness.pairs_evaluated("per_layer_cuda", 16, object()) == 256   # undeclared: all ordered pairs
    assert harness.pairs_evaluated("neural_tangents", 4) == 16
    assert harness.pairs_evaluated("numba", 4) == harness.pairs_evaluated("per_layer_cpu", 4) == 10


def test_bench_cuda_counts_unique_pairs_for_every_method(tmp_path, monkeypatch):
    """bench_cuda.py: unique_pairs_per_s is N(N+1)/2 / s for the baseline too (a fake CuPy and
    fake kernels stand in for the GPU)."""
    import types
    fake_cp = types.ModuleType("cupy")
    dev = types.SimpleNamespace(synchronize=lambda: None, id=0)
    fake_cp.cuda = types.SimpleNamespace(Device=lambda *a: dev, runtime=types.SimpleNamespace(
        getDeviceProperties=lambda i: {"name": b"Fake GPU", "multiProcessorCount": 1, "clockRate": 1},
        driverGetVersion=lambda: 0, runtimeGetVersion=lambda: 0))
    fake_cp.asarray = np.asarray
    fake_cp.__version__ = "fake"
    monkeypatch.setitem(sys.modules, "cupy", fake_cp)
    from bench import per_layer_baseline

    class FakePerLayer:
        def __init__(self, depth, h, w):
            pass

        def gram(self, x, both=False):
            return np.ones((len(x), len(x)))

    monkeypatch.setattr(per_layer_baseline, "PerLayerGPU", FakePerLayer)

    def fake_gram(x, depth=None, depths=None, kernel="ntk", **kw):
        k = np.ones((len(x), len(x)))
        return {d: (k, k) for d in depths} if depths else k

    monkeypatch.setattr(ce, "gram", fake_gram)
    from bench import bench_cuda
    monkeypatch.setattr(sys, "argv", ["bench_cuda.py", "--n", "5", "--n64", "3", "--depths", "3", "--repeats", "1",
                                      "--baseline-pairs", "4", "--out", str(tmp_path)])
    bench_cuda.main()
    (f,) = tmp_path.glob("cuda_*.json")
    rows = json.loads(f.read_text())["results"]
    assert any(r["method"].startswith("per-layer") for r in rows)
    for r in rows:
        n = r["n"]
        assert r["unique_pairs_per_s"] * r["seconds"] == pytest.approx(n * (n + 1) / 2), r["method"]
        assert r["pairs_evaluated_per_s"] == r["unique_pairs_per_s"]


def test_speedup_bars_divide_by_the_pairs_the_alternative_evaluated():
    """An alternative that computes every ordered pair is compared per pair it computed."""
    from bench import plots
    rows = [_harness_row("cuda", "float32", 3, 1000.0, "gpu"),
            dict(_harness_row("per_layer_cuda", "float32", 3, 20.0, "gpu"), pairs_evaluated_per_s=40.0)]
    best = {(plots._label(r["config"]), 32, "gap", 3): r for r in rows}
    bars = {(a, b): v[3] for (a, b, _, _), v in plots._speedups(best).items()}
    assert bars == {("cuda float32", "per_layer_cuda float32"): 25.0}


def test_harness_records_pairs_evaluated(tmp_path):
    """neural-tangents evaluates all N^2 ordered pairs: pairs_evaluated_per_s says so."""
    from bench import harness
    fake = fake_nt_python(tmp_path, FAKE_NT)
    out = tmp_path / "h.json"
    harness.main(["--methods", "per_layer_cpu,neural_tangents", "--depths", "3", "--sizes", "4", "--n", "3",
                  "--repeats", "1", "--warmup", "0", "--no-ceiling", "--no-plots",
                  "--nt-python", str(fake), "--output", str(out)])
    plc, nt = json.loads(out.read_text())["results"]
    assert plc["pairs_evaluated"] == 6 and plc["pairs_evaluated_per_s"] == pytest.approx(plc["unique_pairs_per_s"])
    assert nt["pairs_evaluated"] == 9 and nt["pairs_evaluated_per_s"] == pytest.approx(9 / 0.5)


def test_harness_resume(tmp_path, capsys):
    """--resume: refuses other settings; keeps OK results (also as the check's reference), runs
    failed ones again, keeps configurations outside the matrix; without --output it continues
    the newest <name>_<date>.json."""
    from bench import harness
    base = ["--sizes", "4", "--repeats", "1", "--warmup", "0", "--no-ceiling", "--no-plots"]
    out = tmp_path / "h.json"
    harness.main(["--methods", "numba", "--depths", "2,3", "--n", "2", "--output", str(out)] + base)
    p = json.loads(out.read_text())
    assert p["settings"] == {"seed": 0, "warmup": 0, "repeats": 1, "devices": None, "dask_scheduler": None}
    numba2 = p["results"][0]
    for extra, name in ((["--seed", "1"], "--seed"), (["--repeats", "2"], "--repeats"),
                        (["--warmup", "1"], "--warmup")):
        with pytest.raises(SystemExit, match=f"other settings: {name} "):
            harness.main(["--methods", "numba", "--depths", "2", "--n", "2", "--output", str(out), "--resume"]
                         + base + extra)
    # --devices with CPU methods only: refused before the file is read (it selects cuda's GPUs)
    with pytest.raises(SystemExit, match="--devices 0: selects the GPUs of the cuda method, which "
                       "--methods numba leaves out"):
        harness.main(["--methods", "numba", "--depths", "2", "--n", "2", "--output", str(out), "--resume"]
                     + base + ["--devices", "0"])
    p["results"][1].update(status="failed", reason="interrupted")     # numba depth 3
    out.write_text(json.dumps(p))
    harness.main(["--methods", "numba,per_layer_cpu", "--depths", "2,3", "--n", "2", "--output", str(out),
                  "--resume"] + base)
    res = {(r["config"]["method"], r["config"]["depth"]): r for r in json.loads(out.read_text())["results"]}
    assert res[("numba", 2)] == numba2                               # kept
    assert res[("numba", 3)]["status"] == "ok"                       # failed: run again
    for d in (2, 3):                                                 # checked against numba, kept or not
        chk = res[("per_layer_cpu", d)]["check"]
        assert chk["vs"] == "numba float32" and chk["max_rel_diff"] < 1e-5
    harness.main(["--methods", "numba", "--depths", "2", "--n", "2", "--output", str(out), "--resume"] + base)
    again = json.loads(out.read_text())["results"]
    assert len(again) == 4 and again[0] == numba2                    # the rest kept, not dropped
    # a file written before the settings were recorded is not continued
    p = json.loads(out.read_text())
    del p["settings"]
    old = tmp_path / "old.json"
    old.write_text(json.dumps(p))
    with pytest.raises(SystemExit, match="does not record its settings"):
        harness.main(["--methods", "numba", "--depths", "2", "--n", "2", "--output", str(old), "--resume"] + base)
    # a file measured on another GPU model is not continued (its figures would be compared as one run's)
    p = json.loads(out.read_text())
    p["gpu"] = {"name": "NVIDIA H200"}
    other = tmp_path / "other_gpu.json"
    other.write_text(json.dumps(p))
    with pytest.MonkeyPatch.context() as m:
        m.setattr(harness, "gpu_info", lambda: {"name": "NVIDIA H100 80GB HBM3"})
        with pytest.raises(SystemExit, match="was measured on NVIDIA H200, and this machine's GPU is NVIDIA H100"):
            harness.main(["--methods", "numba", "--depths", "2", "--n", "2", "--output", str(other), "--resume"]
                         + base)
    # no --output: the newest <name>_<8 digits>.json (here yesterday's), not another name's
    runs = tmp_path / "runs"
    runs.mkdir()
    (runs / "h_20000101.json").write_text(out.read_text())
    (runs / "h_x_20000102.json").write_text("not json")
    capsys.readouterr()
    harness.main(["--methods", "numba", "--depths", "2", "--n", "2", "--out-dir", str(runs), "--name", "h",
                  "--resume"] + base)
    assert "kept from h_20000101.json" in capsys.readouterr().out
    assert sorted(f.name for f in runs.iterdir()) == ["h_20000101.json", "h_x_20000102.json"]


def test_harness_measures_the_ceiling_for_the_dtypes_it_runs(tmp_path, monkeypatch):
    """The reference runs in float64 whatever --dtypes says: its FMA rate is measured too."""
    from bench import harness
    calls = []

    def fake_measure(device, dtypes):
        calls.append((device, tuple(dtypes)))
        return {dt: {"fma_per_s": 1e12} for dt in dtypes}

    monkeypatch.setattr(harness.ceil_mod, "measure", fake_measure)
    out = tmp_path / "h.json"
    harness.main(["--methods", "per_layer_cpu,reference", "--dtypes", "float32", "--depths", "2", "--sizes", "4",
                  "--n", "2", "--repeats", "1", "--warmup", "0", "--no-plots", "--output", str(out)])
    assert calls == [("cpu", ("float32", "float64"))]
    rows = json.loads(out.read_text())["results"]
    assert {r["config"]["dtype"] for r in rows} == {"float32", "float64"}
    assert all(r["status"] == "ok" and r["fraction_of_ceiling"] > 0 for r in rows)


def test_median_time_is_the_true_median(monkeypatch):
    from bench import common
    clock = iter([0.0, 1.0, 10.0, 12.0, 20.0, 23.0, 30.0, 34.0])
    monkeypatch.setattr(common.time, "perf_counter", lambda: next(clock))
    sec, times = common.median_time(lambda: None, repeats=4, warmup=0)
    assert times == [1.0, 2.0, 3.0, 4.0] and sec == 2.5


def test_fit_sizes_records_the_images_there_are():
    from bench.reproduce_table1 import fit_sizes
    assert fit_sizes(1e-9, 1.0, 8, 4)[0] == 8          # fewer than 10 images: all of them, not 10
    n, nt = fit_sizes(1e-9, 1.0, 100, 50)
    assert n == 10 and nt == 5                         # the smallest set still 10 when there are more


def test_table1_save_kernels_folder_checked_before_the_pass(tmp_path, monkeypatch):
    from bench import reproduce_table1
    data = _tiny_cifar(tmp_path / "d.npz")
    args = ["--data", str(data), "--n-train", "12", "--n-test", "4", "--pooling", "gap", "--depths", "3",
            "--backend", "numba", "--per-depth-timing", "0", "--no-loo", "--out-dir", str(tmp_path), "--tag", "t"]
    blocker = tmp_path / "a_file"
    blocker.write_text("x")

    def no_kernels(*a, **k):
        raise AssertionError("the kernels were computed before the --save-kernels path was checked")

    monkeypatch.setattr(reproduce_table1, "kernels", no_kernels)
    with pytest.raises(SystemExit, match="--save-kernels .*: cannot write into .*a_file: is a file, not a folder"):
        reproduce_table1.main(args + ["--save-kernels", str(blocker / "k")])
    monkeypatch.undo()
    reproduce_table1.main(args + ["--save-kernels", str(tmp_path / "new" / "sub" / "k")])
    with np.load(tmp_path / "new" / "sub" / "k_gap.npz") as z:
        assert z["ntk_train_3"].shape == (12, 12)


@pytest.mark.parametrize("script,argv,flag", [
    ("harness", ["--depths", "3,x"], "--depths"),
    ("harness", ["--n-for", "numba"], "--n-for"),
    ("harness", ["--tiles", "auto"], "--tiles"),
    ("harness", ["--repeats", "0"], "--repeats"),
    ("table1", ["--pooling", "GAP"], "--pooling"),
    ("table1", ["--depths", "3,x"], "--depths"),
    ("table1", ["--merge", "/nonexistent/t.json"], "--merge"),
    ("small", ["--kernels", "/nonexistent/k.npz"], "--kernels"),
    ("table1", ["--devices", "0,x"], "--devices"),
    ("small", ["--devices", "gpu0"], "--devices"),
    ("table1", ["--backend", "gpu"], "--backend"),
    ("small", ["--seed", "-1"], "--seed"),
    ("harness", ["--seed", "-1"], "--seed"),
])
def test_bad_arguments_end_with_a_one_line_error(tmp_path, capsys, script, argv, flag):
    from bench import harness, reproduce_table1, small_data
    if script == "harness":
        main, rest = harness.main, ["--methods", "per_layer_cpu", "--depths", "2", "--sizes", "3", "--n", "1",
                                    "--no-ceiling", "--no-plots", "--output", str(tmp_path / "h.json")]
    elif script == "table1":
        main, rest = reproduce_table1.main, ["--data", str(_tiny_cifar(tmp_path / "d.npz")), "--n-train", "10",
                                             "--depths", "3", "--per-depth-timing", "0", "--no-loo"]
    else:
        main, rest = small_data.main, []
    with pytest.raises(SystemExit) as e:
        main(rest + argv + ["--out-dir", str(tmp_path)])
    assert e.value.code == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert "error: argument " + flag in last and "Traceback" not in last


def _kernel_npz(path, y_train, depths=(3,), n_test=4):
    rng = np.random.default_rng(0)
    f = rng.standard_normal((len(y_train), 6))
    t = rng.standard_normal((n_test, 6))
    k, kt = f @ f.T + 1e-3 * np.eye(len(f)), t @ f.T
    arrays = {f"{name}_{d}": a for d in depths for name, a in
              (("ntk_train", k), ("nngp_train", k), ("ntk_test", kt), ("nngp_test", kt))}
    np.savez(path, y_train=np.asarray(y_train), y_test=np.arange(n_test) % 10, depths=np.array(depths),
             pooling="gap", fix=True, image_shape=np.array([3, 4, 4]), **arrays)
    return str(path)


def test_small_data_kernel_file_decides_what_it_holds(tmp_path, capsys):
    """With --kernels: the file's depths by default; --pooling / --fix against the file are an
    error; options that only choose how kernels are computed are named as ignored."""
    from bench import small_data
    k = _kernel_npz(tmp_path / "k.npz", np.arange(20) % 10, depths=(3, 4))
    base = ["--kernels", k, "--sizes", "10", "--draws", "1", "--no-loo", "--out-dir", str(tmp_path)]
    out = small_data.main(base)
    assert out["depths"] == [3, 4], out["depths"]
    for extra, msg in ((["--pooling", "flatten"], "--pooling flatten: .* holds kernels of pooling gap"),
                       (["--fix", "false"], "--fix false: .* holds kernels of fix True")):
        with pytest.raises(SystemExit, match=msg):
            small_data.main(base + extra)
    small_data.main(base + ["--pool", "50", "--backend", "numba", "--n-test", "5"])
    assert "note: --pool, --n-test, --backend ignored: the kernels come from" in capsys.readouterr().out


def test_small_data_says_what_it_drops(tmp_path, capsys):
    from bench import small_data
    common = ["--draws", "1", "--no-loo", "--out-dir", str(tmp_path), "--tag", "t"]
    k = _kernel_npz(tmp_path / "k.npz", np.arange(20) % 10)
    s = small_data.main(["--kernels", k, "--sizes", "10,40", "--depths", "3,5"] + common)
    out = capsys.readouterr().out
    assert "size(s) 40 dropped: larger than the pool of 20" in out
    assert "--depths 5 not in" in out
    assert [r["n_train"] for r in s["accuracy"]["CNTK d3 paper solve"]] == [10]
    with pytest.raises(SystemExit, match="holds the kernels of depths 3 only"):
        small_data.main(["--kernels", k, "--sizes", "10", "--depths", "7"] + common)
    k5 = _kernel_npz(tmp_path / "k5.npz", np.arange(20) % 5)      # classes 5-9 absent: no balanced draw
    with pytest.raises(SystemExit, match="no training size could be drawn"):
        small_data.main(["--kernels", k5, "--sizes", "10,20", "--depths", "3", "--tag", "u"] + common[:-2])
    assert not list(tmp_path.glob("small_data_u_*"))


def test_table1_refuses_an_impossible_column_before_loading_data(tmp_path, monkeypatch):
    from bench import reproduce_table1

    def no_data(path):
        raise AssertionError("data loaded before the architecture was checked")

    monkeypatch.setattr(reproduce_table1, "load_cifar_for_cli", no_data)
    # CNTK-GAP is run with fix (the paper's Table 1), which needs depth >= 3
    with pytest.raises(SystemExit, match="CNTK-GAP"):
        reproduce_table1.main(["--pooling", "gap", "--depths", "2", "--out-dir", str(tmp_path)])


# ------------------------------------------------- kernel variants, architectures, fix (issue #16)
def test_harness_variants_architectures_and_fix(tmp_path):
    """cuda is timed once per --kernels variant (here: recorded unavailable, with the variant in
    the config); a Myrtle preset runs at its own depth and 32x32 whatever --depths/--sizes say;
    fix is a dimension; float64 configurations are the check references and run first; the
    keys of configurations at the defaults are those of older result files."""
    from bench import harness
    out = tmp_path / "h.json"
    harness.main(["--methods", "cuda,numba,per_layer_cpu", "--kernels", "v3,v5", "--architectures", "cnn,myrtle5",
                  "--depths", "3", "--sizes", "6", "--dtypes", "float32,float64", "--fix", "no,yes", "--n", "2",
                  "--repeats", "1", "--warmup", "0", "--no-ceiling", "--output", str(out)])
    p = json.loads(out.read_text())
    rows = p["results"]
    assert [r["config"]["dtype"] for r in rows[:4]] == ["float64"] * 4      # the references first
    cuda = [r for r in rows if r["config"]["method"] == "cuda"]
    assert sorted({r["config"]["cuda_kernel"] for r in cuda}) == ["v3", "v5"] and len(cuda) == 2 * 2 * 2 * 2
    assert all(r["cuda_kernel"] == r["config"]["cuda_kernel"] for r in cuda)
    if ce.available_backends()["cuda"] is not None:
        assert all(r["status"] == "unavailable" and r["reason"] == ce.available_backends()["cuda"] for r in cuda)
    numba = {(r["config"]["architecture"], r["config"]["fix"], r["config"]["dtype"]): r
             for r in rows if r["config"]["method"] == "numba"}
    assert len(numba) == 8 and all(r["status"] == "ok" for r in numba.values())
    m5 = numba[("myrtle5", False, "float32")]
    assert (m5["config"]["depth"], m5["config"]["size"]) == (5, 32) and "work_per_pair" not in m5
    assert m5["check"]["vs"] == "numba float64" and m5["check"]["max_rel_diff"] < 1e-5
    fixed = numba[("cnn", True, "float32")]
    assert fixed["check"]["max_rel_diff"] < 1e-5 and fixed["work_per_pair"]["fp_instructions"] > 0
    plc = [r for r in rows if r["config"]["method"] == "per_layer_cpu"]
    assert {r["status"] for r in plc if r["config"]["architecture"] == "myrtle5"} == {"skipped"}
    assert all(r["check"]["max_rel_diff"] < 1e-5 for r in plc if r["config"]["architecture"] == "cnn")
    assert harness.config_key(numba[("cnn", False, "float32")]["config"]) == "numba|3|6|3|gap|float32|None|2"
    assert harness.config_key(m5["config"]) == "numba|5|32|3|gap|float32|None|2|architecture=myrtle5"
    assert all(Path(f).exists() for f in p["plots"])


def test_harness_records_what_a_backend_cannot_compute_as_unavailable(tmp_path, monkeypatch):
    """A configuration the backend refuses (the CUDA backend and a pooled stack, today) is
    recorded as unavailable with the backend's reason: the rest of the matrix still runs."""
    import cntk_engine.backends as be
    from bench import harness
    real = be.capabilities

    def caps(arch, shape, dtype):
        out = real(arch, shape, dtype)
        if arch.has_pooling:
            out["numba"] = {"unavailable": None, "unsupported": "no pooled stacks on this backend"}
        return out

    monkeypatch.setattr(be, "capabilities", caps)
    out = tmp_path / "h.json"
    harness.main(["--methods", "numba", "--architectures", "myrtle5,cnn", "--depths", "2", "--sizes", "4",
                  "--n", "2", "--repeats", "1", "--warmup", "0", "--no-ceiling", "--no-plots", "--output", str(out)])
    rows = {r["config"]["architecture"]: r for r in json.loads(out.read_text())["results"]}
    assert rows["myrtle5"]["status"] == "unavailable" and rows["myrtle5"]["reason"] == "no pooled stacks on this backend"
    assert rows["cnn"]["status"] == "ok"


def test_cuda_kernel_selected_sets_and_restores_the_environment(monkeypatch):
    from bench.harness import KERNEL_ENV, cuda_kernel_selected, resolved_variant
    monkeypatch.delenv(KERNEL_ENV, raising=False)
    with cuda_kernel_selected("v5"):
        assert os.environ[KERNEL_ENV] == "v5"
    assert KERNEL_ENV not in os.environ
    monkeypatch.setenv(KERNEL_ENV, "v3")
    with cuda_kernel_selected("v5"):
        assert os.environ[KERNEL_ENV] == "v5"
    assert os.environ[KERNEL_ENV] == "v3"
    with cuda_kernel_selected(None):
        assert os.environ[KERNEL_ENV] == "v3"
    variants = [{"name": "v3", "default": True}, {"name": "v5", "default": False}]
    assert resolved_variant(None, variants) == "v3" and resolved_variant("v5", variants) == "v5"
    monkeypatch.delenv(KERNEL_ENV)
    assert resolved_variant(None, variants) == "v3" and resolved_variant(None, None) is None
    # the extension's records name the dtypes each variant is the default for; files written
    # before that have one "default" for both
    per_dtype = [{"name": "v3", "default_for": ["float32"]}, {"name": "v5", "default_for": ["float64"]}]
    assert resolved_variant(None, per_dtype) == "v3" and resolved_variant(None, per_dtype, "float64") == "v5"
    assert resolved_variant(None, variants, "float64") == "v3"


def test_harness_n_per_method_and_dtype():
    from bench import harness
    args = harness.parser().parse_args(["--methods", "cuda,numba", "--dtypes", "float64,float32", "--n", "8",
                                        "--n-for", "cuda:float64=2,cuda=4,numba:float32=3", "--depths", "3"])
    ns = {(c["method"], c["dtype"]): c["n"] for c in harness.build_matrix(args)}
    assert ns == {("cuda", "float64"): 2, ("cuda", "float32"): 4, ("numba", "float64"): 8, ("numba", "float32"): 3}


def test_harness_refuses_kernel_options_it_cannot_honour():
    from bench import harness
    variants = [{"name": "v3", "default": True}, {"name": "v5", "default": False}]
    ok = harness.parser().parse_args(["--methods", "cuda", "--kernels", "v3,v5"])
    harness.check_args(ok, variants)
    harness.check_args(ok, None)                 # no extension: the configurations say why
    bad = harness.parser().parse_args(["--methods", "cuda", "--kernels", "v3,v4"])
    with pytest.raises(ScriptError, match=r"--kernels v4: not a CUDA kernel variant of the installed extension \(it has v3, v5\)"):
        harness.check_args(bad, variants)
    dask = harness.parser().parse_args(["--methods", "cuda", "--kernels", "v5", "--dask-scheduler", "tcp://x:1"])
    with pytest.raises(ScriptError, match="on Dask workers"):
        harness.check_args(dask, variants)
    # --kernels without the cuda method would be ignored: refused
    numba = harness.parser().parse_args(["--methods", "numba", "--kernels", "v3"])
    with pytest.raises(ScriptError, match="--kernels v3: chooses the CUDA kernel variants of the cuda method, "
                                          "which --methods numba leaves out"):
        harness.check_args(numba, variants)


@pytest.mark.parametrize("argv,flag", [(["--kernels", "v3,x"], "--kernels"), (["--fix", "maybe"], "--fix"),
                                       (["--architectures", "resnet"], "--architectures"),
                                       (["--n-for", "cuda:float16=4"], "--n-for")])
def test_new_harness_arguments_end_with_a_one_line_error(tmp_path, capsys, argv, flag):
    from bench import harness
    with pytest.raises(SystemExit) as e:
        harness.main(["--methods", "per_layer_cpu", "--no-ceiling", "--no-plots", "--output", str(tmp_path / "h.json")]
                     + argv)
    assert e.value.code == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert "error: argument " + flag in last and "Traceback" not in last


FAKE_NT_STACK = """#!{python}
# Stands in for a Python with neural-tangents, called as the harness calls it for a Myrtle
# network (python -c SNIPPET n depth reps bench_dir save.npz); its kernels are this package's
# float64 values of that network (stax's default W_std = 1), times {scale}.
import json, sys
import numpy as np
sys.path.append({root!r})
import cntk_engine as ce
n, depth = int(sys.argv[3]), int(sys.argv[4])
x = np.random.default_rng(0).standard_normal((n, 32, 32, 3)).astype(np.float32)
ntk, nngp = ce.gram(x.astype(np.float64), architecture=f"myrtle{{depth}}", kernel="both",
                    convention="neural_tangents", W_std=1.0, data_format="NHWC", dtype="float64")
np.savez(sys.argv[7], x=x, ntk=ntk * {scale}, nngp=nngp)
print(json.dumps({{"seconds": 0.5, "times": [0.5], "version": "fake", "jax_device": "cuda:0"}}))
"""


@pytest.mark.parametrize("scale", [1.0, 1.5])
def test_harness_checks_neural_tangents_myrtle_values(tmp_path, scale):
    from bench import harness
    fake = fake_nt_python(tmp_path, FAKE_NT_STACK, scale)
    out = tmp_path / "h.json"
    harness.main(["--methods", "neural_tangents", "--architectures", "myrtle5", "--n", "2", "--repeats", "1",
                  "--warmup", "0", "--no-ceiling", "--no-plots", "--nt-python", str(fake), "--output", str(out)])
    (r,) = json.loads(out.read_text())["results"]
    assert r["status"] == "ok" and r["device"] == "gpu" and r["pairs_evaluated"] == 4
    assert (r["check"]["max_rel_diff"] < 1e-6) == (scale == 1.0)


def test_speedup_bars_per_variant_with_myrtle_columns_and_matching_fix():
    from bench import plots

    def row(method, dtype, depth, rate, arch="cnn", variant=None, fix=False, evaluated=None):
        r = _harness_row(method, dtype, depth, rate, "gpu")
        r["config"].update(architecture=arch, fix=fix, cuda_kernel=variant)
        if evaluated:
            r["pairs_evaluated_per_s"] = evaluated
        return r

    rows = [row("cuda", "float64", 21, 2000.0, variant="v3"), row("cuda", "float32", 21, 20000.0, variant="v3"),
            row("cuda", "float32", 21, 25000.0, variant="v5"), row("cuda", "float32", 10, 40000.0, "myrtle10", "v3"),
            row("neural_tangents", "float32", 21, 500.0, evaluated=1000.0),
            row("neural_tangents", "float32", 10, 1000.0, "myrtle10", evaluated=2000.0),
            row("paper_code", "float32", 21, 400.0), row("paper_code", "float32", 21, 100.0, fix=True)]
    best = {(plots._label(r["config"], r), 32, "gap", plots._column(r["config"])): r for r in rows}
    assert plots._label(rows[3]["config"]) == "cuda v3 myrtle10 float32"
    assert plots._label(rows[7]["config"]) == "paper_code fix float32"
    bars = {(a, b): v for (a, b, _, _), v in plots._speedups(best).items()}
    assert bars == {("cuda v3 float32", "neural_tangents float32"): {21: 20.0, "myrtle10": 20.0},
                    ("cuda v5 float32", "neural_tangents float32"): {21: 25.0},
                    ("cuda v3 float32", "paper_code float32"): {21: 50.0},
                    ("cuda v5 float32", "paper_code float32"): {21: 62.5}}


def test_an_old_result_file_still_plots(tmp_path):
    """Result files written before the architecture / fix / cuda_kernel fields still plot."""
    from bench import plots
    old = ROOT / "bench" / "results" / "harness_gpu_h100_20261123.json"
    copy = tmp_path / old.name
    copy.write_text(old.read_text())
    assert "architecture" not in json.loads(copy.read_text())["results"][0]["config"]
    plots.main([str(copy)])
    assert copy.with_suffix(".png").stat().st_size > 0



def test_harness_resume_keeps_what_earlier_runs_recorded(tmp_path, monkeypatch):
    """Runs that fill one file one after another (gpu_session.sh's phases) keep the header fields
    of the earlier ones: their commands, ceiling rates, kernel variants and SASS counts."""
    from bench import harness
    monkeypatch.setattr(harness.ceil_mod, "measure", lambda device, dtypes: {dt: {"fma_per_s": 1e12} for dt in dtypes})
    out = tmp_path / "h.json"
    base = ["--depths", "2", "--sizes", "4", "--n", "2", "--repeats", "1", "--warmup", "0", "--no-plots",
            "--output", str(out), "--resume"]
    harness.main(["--methods", "numba"] + base)
    p = json.loads(out.read_text())
    p["sass_by_kernel"] = {"v3": {"float32 k3": {"slots_per_entry_layer": 70.4}}}
    p["cuda_kernels"] = [{"name": "v3", "default": True}]
    out.write_text(json.dumps(p))
    harness.main(["--methods", "per_layer_cpu", "--no-ceiling"] + base)
    q = json.loads(out.read_text())
    assert len(q["earlier_commands"]) == 1 and q["ceiling"]["rates"] == {"cpu": {"float32": {"fma_per_s": 1e12}}}
    assert q["sass_by_kernel"] == p["sass_by_kernel"] and q["sass"] == p["sass_by_kernel"]["v3"]
    assert q["cuda_kernels"] == p["cuda_kernels"] or harness.cuda_variants() is not None
    assert [r["config"]["method"] for r in q["results"]] == ["per_layer_cpu", "numba"]


def test_harness_takes_counted_sass_mixes_instead_of_disassembling(tmp_path, monkeypatch):
    """--sass-mixes (the prebuilt wheel's counts, gpu_session.sh passes them): the issue figures'
    mixes come from the file when it counted the installed binary, with no disassembly."""
    from bench import harness
    variants = harness.cuda_variants()
    so = harness.sass_mix.find_extension()
    if variants is None or so is None:
        pytest.skip("the CUDA extension is not installed (built only when nvcc is found at install)")
    counted = {v["name"]: {k: {"slots_per_entry_layer": 50.0 + i, "variant": v["name"]}
                           for i, k in enumerate(("float32 k3", "float64 k3"))} for v in variants}
    mixes = tmp_path / "sass_mixes.json"
    mixes.write_text(json.dumps({"format": harness.sass_mix.COUNTED_FORMAT, "arch": "sm_90",
                                 "so_sha256": harness.sass_mix.file_sha256(so), "by_kernel": counted}))

    def no_disassembly(*_):
        raise AssertionError("disassembled although counted")
    monkeypatch.setattr(harness.sass_mix, "disassemble", no_disassembly)
    monkeypatch.setattr(harness.sass_mix, "resource_usage", no_disassembly)
    monkeypatch.setattr(harness, "gpu_info", lambda: {"name": "a stand-in GPU"})   # the mixes need one
    out = tmp_path / "h.json"
    try:            # without a GPU every configuration is unavailable: recorded, then exit 1
        harness.main(["--methods", "cuda", "--kernels", ",".join(counted), "--depths", "2", "--sizes",
                      "32", "--dtypes", "float32,float64", "--n", "2", "--repeats", "1", "--warmup", "0",
                      "--no-ceiling", "--no-plots", "--output", str(out), "--sass-mixes", str(mixes)])
        measured = True
    except SystemExit as e:
        assert e.code == 1, e
        measured = False
    p = json.loads(out.read_text())
    assert p["sass_by_kernel"] == counted
    statuses = {r["status"] for r in p["results"]}
    assert statuses <= {"ok", "unavailable"} and ("ok" in statuses) == measured


# ------------------------------------------------------------ the GPU session script and summary
def _rec(method, depth, rate, *, arch="cnn", dtype="float32", variant=None, n=256, status="ok", device="gpu",
         evaluated=None, check=None, fix=False, pooling="gap", reason=None):
    r = {"config": {"method": method, "architecture": arch, "depth": depth, "size": 32, "channels": 3,
                    "pooling": pooling, "fix": fix, "dtype": dtype, "tile": None, "n": n, "cuda_kernel": variant},
         "status": status}
    if variant:
        r["cuda_kernel"] = variant
    if status == "ok":
        r.update(device=device, unique_pairs_per_s=rate, pairs_evaluated_per_s=evaluated or rate)
    else:
        r["reason"] = reason
    if check:
        r["check"] = check
    return r


def test_session_summary_targets():
    """Each target is met / not met / not measured (with why), from the results alone."""
    from bench import session_summary as ss
    f64 = {"vs": "cuda v3 float64", "max_rel_diff": 2e-7}
    payload = {"cuda_kernels": [{"name": "v3", "default": True}, {"name": "v5", "default": False}], "results": [
        _rec("cuda", 21, 21000.0, variant="v3", check=f64), _rec("cuda", 21, 9000.0, variant="v3", n=16),
        _rec("cuda", 21, 26000.0, variant="v5", check={"vs": "cuda v3 float64", "max_rel_diff": 3e-5}),
        _rec("cuda", 3, 90000.0, variant="v5", check={"vs": "cuda v3 float64", "max_rel_diff": 3e-4}),
        _rec("cuda", 10, None, arch="myrtle10", variant="v3", status="unavailable", reason="no stacks on cuda"),
        _rec("neural_tangents", 21, 700.0, n=16, evaluated=1400.0,
             check={"vs": "cntk_engine float64", "max_rel_diff": 1e-9, "non_finite_entries": 0}),
        _rec("paper_code", 21, 300.0, n=16, check={"vs": "cntk_engine float64, arora", "max_rel_diff": 1e-7,
                                                     "max_rel_diff_distinct_pairs": 5e-8, "max_rel_diff_self_pairs": 1e-7,
                                                     "non_finite_entries": 0, "agree_distinct_pairs": True,
                                                     "agree_all_entries": True})]}
    assert [x["status"] for x in ss.targets(payload)] == ["met", "not met", "not measured", "not measured", "not met"]
    d21, nt21, m10, ntm10, f32 = ss.targets(payload)
    assert d21["value"] == 21000.0                                    # the largest N of the default variant
    assert d21["per_variant"] == {"v3": 21000.0, "v5": 26000.0}       # and every variant's, beside it
    assert "fastest variant v5: 26,000.0 unique pairs/s (meets the target)" in d21["detail"]
    assert "per_variant" not in m10 and "fastest" not in m10["detail"]
    assert nt21["value"] == pytest.approx(21000.0 / 1400.0)           # per pair neural-tangents evaluated
    assert "no stacks on cuda" in m10["detail"] and "no stacks on cuda" in ntm10["detail"]
    assert f32["per_variant"] == {"v3": 2e-7, "v5": 3e-5}                    # the checks that passed
    assert "v5 cnn d3 N=256 is 3.0e-04 from the float64 result" in f32["detail"]
    (paper,) = ss.paper_report(payload)
    assert paper["speedup"] == pytest.approx(21000.0 / 300.0) and paper["agree_distinct_pairs"]
    # a figure beyond the images' preparation is said beside the call's (which the status reads)
    prepped = _rec("cuda", 10, 30000.0, arch="myrtle10", variant="v3", n=128, check=f64)
    prepped.update(seconds=0.2752, preparation_s=0.0688, unique_pairs_per_s_beyond_preparation=40000.0)
    m10 = ss.targets(dict(payload, results=[prepped]))[2]
    assert m10["status"] == "not met" and m10["value"] == 30000.0
    assert "40,000.0 beyond the images' preparation (0.0688 s of 0.275 s at N = 128)" in m10["detail"]
    nocuda = ss.targets({"results": [_rec("numba", 21, 50.0, device="cpu")]})
    assert {x["status"] for x in nocuda} == {"not measured"}
    assert all("no CUDA extension" in x["detail"] for x in nocuda)


def test_session_summary_counts_no_figure_whose_result_was_not_shown_right():
    """A throughput target passed on a float32 result without a float64 check, and the float32
    target on the configurations that happened to be checked (a failed or unchecked one was
    left out); a NaN read as agreement (max(0.0, nan) is 0.0)."""
    from bench import harness
    from bench import session_summary as ss
    a = np.eye(3)
    nan = a.copy()
    nan[1, 2] = np.nan
    assert harness._diff_check((nan, a), (a, a), 3) == {"max_rel_diff": None, "non_finite_entries": 1}
    assert harness._diff_check((a, a), (nan, a), 3)["max_rel_diff"] is None
    assert harness._diff_check((a * (1 + 1e-6), a), (a, a), 3) == {"max_rel_diff": pytest.approx(1e-6),
                                                                   "non_finite_entries": 0}
    ok = {"vs": "cuda v3 float64", "max_rel_diff": 2e-7}
    kernels = [{"name": "v3", "default": True}]
    unchecked = {"cuda_kernels": kernels, "results": [
        _rec("cuda", 3, 90000.0, variant="v3", check=ok),
        _rec("cuda", 21, 25000.0, variant="v3", check={"vs": "cuda v3 float64", "unavailable": "float64 failed"}),
        _rec("cuda", 21, None, variant="v3", dtype="float64", status="failed", reason="boom")]}
    d21, _, _, _, f32 = ss.targets(unchecked)
    assert d21["status"] == "unchecked" and "was not checked against a float64 result (float64 failed)" in d21["detail"]
    assert f32["status"] == "incomplete" and "v3 cnn d21 N=256 was not checked" in f32["detail"]
    failed = {"cuda_kernels": kernels, "results": [
        _rec("cuda", 3, 90000.0, variant="v3", check=ok),
        _rec("cuda", 21, None, variant="v3", status="failed", reason="illegal address")]}
    assert ss.targets(failed)[-1]["status"] == "incomplete"
    nan_row = {"cuda_kernels": kernels, "results": [
        _rec("cuda", 21, 25000.0, variant="v3", check={"vs": "cuda v3 float64", "max_rel_diff": None,
                                                       "non_finite_entries": 4})]}
    d21, _, _, _, f32 = ss.targets(nan_row)
    assert d21["status"] == "unchecked" and f32["status"] == "not met" and "4 non-finite entries" in f32["detail"]
    good = {"cuda_kernels": kernels, "results": [_rec("cuda", 21, 25000.0, variant="v3", check=ok)]}
    assert [t["status"] for t in ss.targets(good)][::4] == ["met", "met"]


def test_session_summary_meets_no_target_on_missing_or_contradicted_evidence():
    """From a review of the summary: the float32 target was "met" when a variant's bench process
    never ran (its configurations are simply absent) or the bench phase was stopped at its limit;
    a neural-tangents ratio was "met" with its kernel 0.5 from ours; the per-layer baseline's
    disagreement with the CUDA float64 reference, and a failed tests phase, went unmentioned."""
    from bench import session_summary as ss
    ok = {"vs": "cuda v3 float64", "max_rel_diff": 2e-7}
    kernels = [{"name": "v3", "default_for": ["float32"], "base": "v3"},
               {"name": "v8", "default_for": [], "base": "v3"}, {"name": "v5", "default_for": [], "base": "v5"}]
    rows = [_rec("cuda", d, 25000.0, variant=v, check=ok) for v in ("v3", "v8", "v5") for d in (3, 21)]
    rows += [_rec("cuda", 10, 50000.0, arch="myrtle10", variant=v, check=ok) for v in ("v3", "v5")]
    full = {"cuda_kernels": kernels, "results": rows}
    assert ss.targets(full)[-1]["status"] == "met"          # v8 runs v3's stack kernel: not missing
    cut = {"cuda_kernels": kernels, "results": [r for r in rows if not (
        r["cuda_kernel"] == "v5" and (r["config"]["architecture"] == "myrtle10" or r["config"]["depth"] == 21))]}
    f32 = ss.targets(cut)[-1]
    assert f32["status"] == "incomplete", f32
    assert "v5 cnn d21 gap not in the file" in f32["detail"] and "v5 myrtle10 d10 gap not in the file" in f32["detail"]
    # a phase stopped at its limit or failed: named in every target, the float32 target incomplete
    phases = [{"phase": "bench", "status": "timed_out", "seconds": 210, "limit": 210, "reason": ""},
              {"phase": "tests", "status": "failed", "seconds": 40, "limit": 150, "reason": "exit status 1"}]
    got = ss.targets(full, phases)
    assert got[0]["status"] == "met" and got[-1]["status"] == "incomplete"
    assert all("[the bench phase timed out; the tests phase failed]" in t["detail"] for t in got)
    assert ss.targets(full, [dict(phases[0], status="ok")])[-1]["status"] == "met"
    # the independent per-layer baseline against the same float64 reference
    wrong = {"cuda_kernels": kernels, "results": rows + [
        _rec("per_layer_cuda", 21, 700.0, n=16, check={"vs": "cuda v3 float64", "max_rel_diff": 0.1})]}
    f32 = ss.targets(wrong)[-1]
    assert f32["status"] == "not met" and "the per-layer baseline (per_layer_cuda cnn d21 N=16 float32) " \
        "disagrees with cuda v3 float64: 1.0e-01 from it" in f32["detail"]
    # neural-tangents computing another kernel gives no speed-up figure
    nt = _rec("neural_tangents", 21, 500.0, n=16, evaluated=1000.0,
              check={"vs": "cntk_engine float64", "max_rel_diff": 0.5, "non_finite_entries": 0})
    _, nt21, _, _, _ = ss.targets({"cuda_kernels": kernels, "results": rows + [nt]})
    assert nt21["status"] == "unchecked" and "neural-tangents' kernel is 5.0e-01 from ours" in nt21["detail"]
    assert "ours at N = 256, neural-tangents at N = 16" in nt21["detail"]
    nt["check"]["max_rel_diff"] = 1e-6
    assert ss.targets({"cuda_kernels": kernels, "results": rows + [nt]})[1]["status"] == "met"


def test_harness_exits_1_when_a_configuration_failed(tmp_path, monkeypatch):
    """gpu_session.sh records a phase by the harness's exit status: a bench process whose
    configurations crashed, beside one that ran, was recorded "ok"."""
    from bench import harness
    real = harness.Runner.make

    def flaky(self, c, x):
        if c["depth"] == 3:
            raise RuntimeError("an illegal memory access was encountered")
        return real(self, c, x)
    monkeypatch.setattr(harness.Runner, "make", flaky)
    out = tmp_path / "h.json"
    with pytest.raises(SystemExit) as e:
        harness.main(["--output", str(out), "--methods", "numba", "--depths", "2,3", "--sizes", "4", "--n", "2",
                      "--dtypes", "float32", "--repeats", "1", "--warmup", "0", "--no-plots", "--no-ceiling"])
    assert e.value.code == 1 and "1 of 2 configuration(s) failed or timed out, first numba|3|" in str(e.value)
    assert "an illegal memory access" in str(e.value)
    assert sorted(r["status"] for r in json.loads(out.read_text())["results"]) == ["failed", "ok"]


def test_a_resumed_harness_keeps_the_records_it_has_not_reached_on_disk(tmp_path, monkeypatch):
    """save() wrote this run's records and those outside its matrix: kept records later in the
    order vanished from the file until the loop reached them, so a run stopped at its time limit
    there lost them."""
    from bench import harness
    out = tmp_path / "h.json"
    args = ["--output", str(out), "--methods", "numba", "--depths", "2,3", "--sizes", "4", "--n", "3",
            "--dtypes", "float64,float32", "--repeats", "1", "--warmup", "0", "--no-plots", "--no-ceiling"]
    harness.main(args)
    payload = json.loads(out.read_text())
    everything = sorted((r["config"]["depth"], r["config"]["dtype"]) for r in payload["results"])
    assert len(everything) == 4
    for r in payload["results"]:          # the depth-3 float64 reference failed: run again first
        if (r["config"]["depth"], r["config"]["dtype"]) == (3, "float64"):
            r["status"], r["reason"] = "failed", "for the test"
    out.write_text(json.dumps(payload))
    seen = []
    real = harness.write_json

    def spy(path, p):
        seen.append(sorted((r["config"]["depth"], r["config"]["dtype"]) for r in p["results"]))
        return real(path, p)
    monkeypatch.setattr(harness, "write_json", spy)
    harness.main(args + ["--resume"])
    assert seen and all(s == everything for s in seen), seen


@pytest.mark.slow       # ~20 s with numba's cache warm; compiling the kernels first adds minutes on 2 cores
def test_gpu_session_cpu_dry_run(tmp_path):
    """tools/gpu/gpu_session.sh end to end on the CPU (--cpu-dry-run): every phase runs or is
    recorded as skipped with its reason, the harness file holds every method of the GPU run
    (cuda recorded unavailable, the paper's code through the stand-in and the emulation,
    neural-tangents unavailable in a Python without it), at most 8 files come back; a second
    call on the same host (--state) continues the first call's harness file and phase records."""
    import subprocess
    out = tmp_path / "out"
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    prebuilt = _stamped_prebuilt(tmp_path / "prebuilt", ROOT)
    common = ["bash", str(ROOT / "tools" / "gpu" / "gpu_session.sh"), "--cpu-dry-run",
              "--python", sys.executable, "--nt-python", sys.executable,
              "--paper-code", str(ROOT / "tests" / "fixtures" / "paper_code_standin.txt"),
              "--prebuilt", str(prebuilt), "--state", str(tmp_path / "state")]
    proc = subprocess.run(common, cwd=ROOT, env={**env, "OUT": str(out)}, capture_output=True, text=True,
                          timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-2000:]
    assert "the prebuilt wheel matches this tree" in proc.stdout     # the install phase's check
    summary = json.loads((out / "gpu_session_cpu_dry_run_summary.json").read_text())
    phases = {p["phase"]: p for p in summary["phases"]}
    assert set(phases) >= {"install", "tests", "sanitizer", "sass", "bench", "paper", "nt", "summary"}
    for p in phases.values():
        assert p["status"] in ("ok", "skipped"), p
        assert p["status"] == "ok" or p["reason"], p
    for name in ("tests", "bench", "paper", "nt", "summary"):
        assert phases[name]["status"] == "ok", phases[name]
    rows = json.loads((out / "harness_cpu_dry_run.json").read_text())["results"]
    by = {}
    for r in rows:
        by.setdefault(r["config"]["method"], []).append(r)
    assert {r["config"]["cuda_kernel"] for r in by["cuda"]} == {"v3", "v5", "v6", "v7", "v8"}
    assert {r["config"]["architecture"] for r in by["cuda"]} == {"cnn", "myrtle5", "myrtle10"}
    assert all(r["status"] == "unavailable" and r["reason"] for r in by["cuda"])
    assert all(r["status"] == "ok" for r in by["numba"])
    assert len(by["paper_code"]) == 4 and all(r["status"] == "emulated" and r["check"]["agree_distinct_pairs"]
                                              for r in by["paper_code"])
    assert all(r["status"] == "unavailable" for r in by["neural_tangents"])
    assert [t["status"] for t in summary["targets"]] == ["not measured"] * 5
    files = sorted(f.name for f in out.iterdir())
    # the sass phase counts the installed extension's instructions when it was built (CI
    # builds it: nvcc is there), one file for every kernel variant, and is skipped otherwise
    sass = [f for f in files if f.startswith("sass_")]
    assert (phases["sass"]["status"] == "ok") == (sass == ["sass_sm90.json"])
    if sass:
        mixes = json.loads((out / "sass_sm90.json").read_text())
        assert sorted(mixes) == ["v3", "v5", "v6", "v7", "v8"]
        assert all(m["variant"] == v and m["slots_per_entry_layer"] > 0 for v, m in mixes.items())
    # the stack_blocks phase (numba standing in) needs the extension's variant names
    blocks = [f for f in files if f.startswith("stack_blocks_")]
    assert (phases["stack_blocks"]["status"] == "ok") == bool(blocks) == _installed_extension()
    assert [f for f in files if f not in sass + blocks] == [
        "gpu_session_cpu_dry_run.log", "gpu_session_cpu_dry_run_summary.json",
        "harness_cpu_dry_run.json", "harness_cpu_dry_run.png"]
    assert len(files) <= 8, files         # what the device tool brings back
    assert "ALL PHASES OK OR SKIPPED" in proc.stdout
    # each bench process under its own limit, its seconds logged: the default's CNN and stack
    # kernels in processes of their own, then the candidates' in one process each (v7 and v8:
    # no stack kernel of their own)
    for what in ("v3 cnn", "v3 myrtle", "v8,v6,v7,v5 cnn"):
        assert f"--- bench process: {what} took " in proc.stdout, what
    # which variants have a stack kernel of their own, the extension says; without it (no nvcc
    # at install) every candidate's stack kernel is asked for, each row "unavailable"
    stacks = "v6,v5" if _installed_extension() else "v8,v6,v7,v5"
    assert f"--- bench process: {stacks} myrtle took " in proc.stdout
    # the next call on this host: its nt phase continues the file; the first call's phases stand
    out2 = tmp_path / "out2"
    again = subprocess.run(common + ["--phases", "nt,summary"], cwd=ROOT, env={**env, "OUT": str(out2)},
                           capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-2000:]
    assert "continuing the harness file and phase records of an earlier call on this host" in again.stdout
    rows2 = json.loads((out2 / "harness_cpu_dry_run.json").read_text())["results"]
    assert [r for r in rows2 if r["config"]["method"] != "neural_tangents"] == \
        [r for r in rows if r["config"]["method"] != "neural_tangents"]
    phases2 = json.loads((out2 / "gpu_session_cpu_dry_run_summary.json").read_text())["phases"]
    assert [(p["phase"], p["status"]) for p in phases2 if p["phase"] in ("bench", "tests", "nt")] == [
        ("bench", "ok"), ("tests", "ok"), ("nt", "ok")]
    assert [p["reason"].startswith("earlier call") for p in phases2 if p["phase"] in ("bench", "nt")] == \
        [True, False]


def _installed_extension() -> bool:
    """Whether the INSTALLED package has the CUDA extension, as the scripts' ``python -P``
    processes import it (in this process a checkout on sys.path, as ``python -m pytest`` puts it
    there, would hide it)."""
    import subprocess
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    r = subprocess.run([sys.executable, "-P", "-c", "import importlib.util as u, sys; "
                        "sys.exit(u.find_spec('cntk_engine._cuda') is None)"], env=env, cwd="/",
                       capture_output=True, timeout=120)
    return r.returncode == 0


def test_prebuilt_smoke_runs_with_the_installed_extension(tmp_path):
    """The smoke check the GPU visit runs after installing the prebuilt wheel, here with the
    extension CI builds: the binding's repr and ValueError (the strings that crashed on the
    H200's image) and, where no GPU is, the backend's reason."""
    import subprocess
    if not _installed_extension():
        pytest.skip("the CUDA extension is not built (no nvcc at install)")
    from conftest import load_tool
    prebuilt = load_tool("gpu/prebuilt")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    r = subprocess.run([sys.executable, "-P", "-c", prebuilt.SMOKE], capture_output=True, text=True,
                       cwd=tmp_path, env=env, timeout=300)
    assert r.returncode == 0 and "kernel variant" in r.stdout.lower(), r.stdout + r.stderr
    # the Gram on the GPU in a process of its own: its failure keeps the wheel (a build would
    # compile the same code), where a failure to load it builds from source
    r = subprocess.run([sys.executable, "-P", "-c", prebuilt.SMOKE_GPU], capture_output=True,
                       text=True, cwd=tmp_path, env=env, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    assert ("cuda matches the reference" in r.stdout) != ("the cuda backend cannot run here" in r.stdout)
    # the strings in a process of their own (a crash there keeps the wheel: said, not acted on)
    r = subprocess.run([sys.executable, "-P", "-c", prebuilt.SMOKE_STRINGS], capture_output=True,
                       text=True, cwd=tmp_path, env=env, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "PairSumsParams(kernel='v3'" in r.stdout, r.stdout
    assert "the binding refuses C = 0: cntk_engine pair_sums: C (channels) must be >= 1" in r.stdout, r.stdout


def test_prebuilt_install_exits_3_where_the_wheel_loads_but_a_smoke_check_fails(tmp_path,
                                                                                monkeypatch):
    """A smoke check after the import (the tiny GPU Gram, the binding's messages) that fails or
    hangs keeps the wheel (a build would compile the same code): install exits with
    SMOKE_FAILED, which gpu_session.sh records as installed, with a note; a wheel that does
    not load exits 1 (the build follows)."""
    import subprocess
    from conftest import load_tool
    prebuilt = load_tool("gpu/prebuilt")
    wheel = tmp_path / "w.whl"
    monkeypatch.setattr(prebuilt, "check", lambda folder, repo: wheel)
    calls = []

    def run(cmd, **kw):
        calls.append(cmd[-1])
        if "pip" in cmd:
            return subprocess.CompletedProcess(cmd, 0, "", "")
        if cmd[-1] == prebuilt.SMOKE_GPU:
            raise subprocess.TimeoutExpired(cmd, kw["timeout"])
        return subprocess.CompletedProcess(cmd, 0, "loads", "")
    monkeypatch.setattr(prebuilt.subprocess, "run", run)
    assert prebuilt.main(["install", str(tmp_path)]) == prebuilt.SMOKE_FAILED
    assert calls[1:] == [prebuilt.SMOKE, prebuilt.SMOKE_GPU, prebuilt.SMOKE_STRINGS]
    monkeypatch.setattr(prebuilt.subprocess, "run", lambda cmd, **kw: subprocess.CompletedProcess(
        cmd, 0 if "pip" in cmd else 1, "", "ImportError"))
    assert prebuilt.main(["install", str(tmp_path)]) == 1
    script = (ROOT / "tools" / "gpu" / "gpu_session.sh").read_text()
    assert "3) echo \"the prebuilt wheel, no build; its smoke check failed" in script


def test_sanitizer_runs_dry_run(capsys):
    """tools/gpu/sanitizer_runs.py, which the GPU visit runs under compute-sanitizer, makes the
    same calls on the CPU (--backend numba): what only a GPU runs is its CuPy allocator switch and
    the kernel variants' environment."""
    from conftest import load_tool
    runs = load_tool("gpu/sanitizer_runs")
    assert runs.main(["--backend", "numba"]) == 0
    out = capsys.readouterr().out
    for what in ("general / 32x32 / float64 / filter 5", "lap / flip", "myrtle5 float32", "myrtle5 float64",
                 "flatten stack / odd coarse levels", "sanitizer runs done"):
        assert what in out, out
    assert runs.main(["--backend", "numba", "--small"]) == 0
    small = capsys.readouterr().out
    assert "32x32 gap" in small and "myrtle5 float32" in small and "lap / flip" not in small
    # --part: one kernel's Grams (gpu_session.sh's memcheck runs the stack kernel's on their own)
    assert runs.main(["--backend", "numba", "--part", "stack"]) == 0
    stack = capsys.readouterr().out
    assert "myrtle5 float32" in stack and "CNN kernel" not in stack and "32x32" not in stack
    assert runs.main(["--backend", "numba", "--part", "cnn", "--small"]) == 0
    cnn = capsys.readouterr().out
    assert "32x32 gap" in cnn and "stack kernel" not in cnn and "myrtle5" not in cnn


def _stamped_prebuilt(folder: Path, repo: Path, **stamp) -> Path:
    """A .prebuilt folder whose stamp describes ``repo``'s build inputs for this Python (the wheel
    is a stand-in file: only `install` opens it)."""
    from conftest import load_tool
    prebuilt = load_tool("gpu/prebuilt")
    folder.mkdir()
    (folder / "cntk_engine-0.1.0-standin.whl").write_bytes(b"not a wheel")
    record = {"wheel": "cntk_engine-0.1.0-standin.whl", "commit": "0" * 40,
              "python": prebuilt.python_tag(sys.version_info), "files": prebuilt.source_files(repo)}
    (folder / prebuilt.STAMP).write_text(json.dumps({**record, **stamp}))
    return folder


def test_prebuilt_wheel_is_used_only_for_the_tree_it_was_built_from(tmp_path, monkeypatch, capsys):
    """tools/gpu/prebuilt.py: `check` accepts the stamp of this tree and names what differs
    otherwise (a changed or added build input, another Python, a missing wheel or stamp); files
    that imports and in-place builds write are not build inputs; `build` refuses a working tree
    whose build inputs differ from HEAD's, and a Python of another version, before building."""
    import subprocess
    from conftest import load_tool
    prebuilt = load_tool("gpu/prebuilt")
    repo = tmp_path / "repo"
    (repo / "csrc").mkdir(parents=True)
    (repo / "cntk_engine" / "__pycache__").mkdir(parents=True)
    for name, text in (("pyproject.toml", "[project]\n"), ("CMakeLists.txt", "project(x)\n"),
                       ("csrc/k.cu", "// kernel\n"), ("cntk_engine/__init__.py", ""), ("README.md", "r\n")):
        (repo / name).write_text(text)
    files = prebuilt.source_files(repo)
    assert sorted(files) == ["CMakeLists.txt", "cntk_engine/__init__.py", "csrc/k.cu", "pyproject.toml"]
    good = _stamped_prebuilt(tmp_path / "good", repo)
    assert prebuilt.check(good, repo) == good / "cntk_engine-0.1.0-standin.whl"
    # bytecode, an in-place extension and the README do not count
    (repo / "cntk_engine" / "__pycache__" / "a.cpython-312.pyc").write_bytes(b"x")
    (repo / "cntk_engine" / "_cuda.so").write_bytes(b"x")
    (repo / "README.md").write_text("changed\n")
    assert prebuilt.check(good, repo).is_file()
    (repo / "csrc" / "k.cu").write_text("// changed\n")
    (repo / "csrc" / "new.cuh").write_text("")
    with pytest.raises(prebuilt.PrebuiltError, match=r"differ from this tree's in csrc/k\.cu, csrc/new\.cuh"):
        prebuilt.check(good, repo)
    other = _stamped_prebuilt(tmp_path / "other", repo, python="cp27")
    with pytest.raises(prebuilt.PrebuiltError, match="is for cp27; this Python is cp3"):
        prebuilt.check(other, repo)
    (other / "cntk_engine-0.1.0-standin.whl").unlink()
    with pytest.raises(prebuilt.PrebuiltError, match="standin.whl .named by stamp.json. is missing"):
        prebuilt.check(other, repo)
    with pytest.raises(prebuilt.PrebuiltError, match="no readable stamp.json"):
        prebuilt.check(tmp_path, repo)
    assert prebuilt.main(["check", str(tmp_path), "--repo", str(repo)]) == 1

    # install: pip, then the import in a fresh process; either failing is an error (the
    # install phase then builds from source); then the tiny GPU Gram and the binding's strings,
    # each in another, whose failure is said and keeps the wheel (a build would compile the same
    # code): SmokeFailed, install's exit status 3
    (repo / "csrc" / "k.cu").write_text("// kernel\n")
    (repo / "csrc" / "new.cuh").unlink()
    calls = []

    def fake_run(outcomes):
        def run(cmd, **kw):
            calls.append(cmd)
            rc, err = outcomes.pop(0)
            return subprocess.CompletedProcess(cmd, rc, stdout="", stderr=err)
        return run
    monkeypatch.setattr(prebuilt.subprocess, "run", fake_run([(0, ""), (0, ""), (0, ""), (0, "")]))
    prebuilt.install(good, repo)
    assert calls[0][1:4] == ["-m", "pip", "install"] and calls[0][-1].endswith("standin.whl")
    assert calls[1][1:3] == ["-P", "-c"] and "import cntk_engine._cuda" in calls[1][3]
    assert calls[2][1:3] == ["-P", "-c"] and "backend=\"reference\"" in calls[2][3]
    assert calls[3][1:3] == ["-P", "-c"] and "PairSumsParams" in calls[3][3]
    monkeypatch.setattr(prebuilt.subprocess, "run",
                        fake_run([(0, ""), (0, ""), (0, ""), (-11, "Segmentation fault")]))
    with pytest.raises(prebuilt.SmokeFailed, match="standin.whl; failed here: the binding's messages"):
        prebuilt.install(good, repo)
    assert "WARNING: the binding's messages failed here (exit status -11: Segmentation fault)" in \
        capsys.readouterr().out
    monkeypatch.setattr(prebuilt.subprocess, "run", fake_run([(1, "no matching distribution")]))
    with pytest.raises(prebuilt.PrebuiltError, match="pip install .* failed: no matching distribution"):
        prebuilt.install(good, repo)
    monkeypatch.setattr(prebuilt.subprocess, "run", fake_run([(0, ""), (1, "ImportError: GLIBCXX_3.4.32")]))
    with pytest.raises(prebuilt.PrebuiltError, match="does not load here: ImportError: GLIBCXX_3.4.32"):
        prebuilt.install(good, repo)
    monkeypatch.undo()

    # mixes: the SASS counts of the wheel's own extension file, written whole or not at all
    import zipfile
    with pytest.raises(prebuilt.PrebuiltError, match="no wheel with a CUDA extension to count"):
        prebuilt.count_mixes(good)
    so_name = prebuilt.EXTENSION_PREFIX + "cpython-312-x86_64-linux-gnu.so"
    with zipfile.ZipFile(good / "cntk_engine-0.1.0-standin.whl", "w") as z:
        z.writestr(so_name, b"not a CUDA binary")
    with pytest.raises(prebuilt.PrebuiltError, match="could not be counted here"):
        prebuilt.count_mixes(good)
    assert not (good / prebuilt.SASS_MIXES).exists()
    sys.path.insert(0, str(ROOT))
    try:
        import tools.sass_mix as sass_mix_module          # the module prebuilt imports
    finally:
        sys.path.remove(str(ROOT))
    seen = []
    monkeypatch.setattr(sass_mix_module, "count_mixes",
                        lambda so: seen.append(so.read_bytes()) or {"by_kernel": {"v3": {"float32 k3": {}}}})
    assert prebuilt.main(["mixes", str(good)]) == 0
    assert seen == [b"not a CUDA binary"]
    assert json.loads((good / prebuilt.SASS_MIXES).read_text())["by_kernel"] == {"v3": {"float32 k3": {}}}
    (good / prebuilt.SASS_MIXES).unlink()
    (good / "cntk_engine-0.1.0-standin.whl").write_bytes(b"not a wheel")
    monkeypatch.undo()

    # build: the tree must be HEAD's, and the Python the GPU machine's version
    git = ["git", "-C", str(repo), "-c", "user.name=t", "-c", "user.email=t@t"]
    for cmd in (["init", "-q"], ["add", "."], ["commit", "-qm", "c"]):
        subprocess.run(git + cmd, check=True, capture_output=True)
    monkeypatch.setattr(prebuilt.shutil, "which", lambda name: "/usr/bin/" + name)   # nvcc or not
    with pytest.raises(prebuilt.PrebuiltError, match=r"is not a Python 2\.7"):
        monkeypatch.setattr(prebuilt, "DEVICE_PYTHON", (2, 7))
        prebuilt.build(tmp_path / "w", repo, sys.executable)
    monkeypatch.setattr(prebuilt, "DEVICE_PYTHON", tuple(sys.version_info[:2]))
    (repo / "csrc" / "k.cu").write_text("// not committed\n")
    with pytest.raises(prebuilt.PrebuiltError, match=r"differ from HEAD's .*: csrc/k\.cu; commit them first"):
        prebuilt.build(tmp_path / "w", repo, sys.executable)


def _paper_snapshot(tmp_path, source: str) -> Path:
    """A git repository whose HEAD holds ``source`` as CNTK.py (a snapshot as fetch makes it)."""
    import subprocess
    repo = tmp_path / "CNTK"
    repo.mkdir()
    (repo / "CNTK.py").write_text(source)
    git = ["git", "-C", str(repo), "-c", "user.name=t", "-c", "user.email=t@t"]
    for cmd in (["init", "-q"], ["add", "CNTK.py"], ["commit", "-qm", "snapshot"]):
        subprocess.run(git + cmd, check=True, capture_output=True)
    return repo / ".git"


def test_prepare_carry_builds_the_folders_and_refuses_bad_inputs(tmp_path, capsys):
    """tools/gpu/prepare_carry.py: .paper and .devdata built (a stale file replaced, no
    temporary folder left), the call printed; a CNTK.py the harness cannot load, or missing
    data, refused before anything is written."""
    from conftest import load_tool
    prepare = load_tool("gpu/prepare_carry")
    standin = (ROOT / "tests" / "fixtures" / "paper_code_standin.txt").read_text()
    data = tmp_path / "data"
    data.mkdir()
    for name in prepare.DATA_FILES:
        np.savez(data / name, x=np.arange(3))
    dest = tmp_path / "checkout"
    (dest / ".devdata").mkdir(parents=True)
    (dest / ".devdata" / "stale.npz").write_text("old")
    argv = ["--data", str(data), "--no-wheels", "--no-prebuilt", "--dest", str(dest)]

    snapshot = _paper_snapshot(tmp_path, standin)
    assert prepare.main(["--paper-git", str(snapshot)] + argv) == 0
    out = capsys.readouterr().out
    assert (dest / ".paper" / "CNTK.py").read_text() == standin
    assert sorted(p.name for p in (dest / ".devdata").iterdir()) == sorted(prepare.DATA_FILES)
    assert sorted(p.name for p in dest.iterdir()) == [".devdata", ".paper"]
    assert prepare.CALL in out and "MiB of the device tool's 64 MiB" in out
    # a .prebuilt whose stamp matches the tree's build inputs is kept (no 4-minute build); one
    # that does not is built again, which this checkout (no git, maybe no Python 3.12) refuses
    prebuilt = load_tool("gpu/prebuilt")
    device_tag = prebuilt.python_tag(prebuilt.DEVICE_PYTHON)
    _stamped_prebuilt(dest / ".prebuilt", dest, python=device_tag)
    with_prebuilt = [a for a in argv if a != "--no-prebuilt"]
    assert prepare.main(["--paper-git", str(snapshot)] + with_prebuilt) == 0
    out = capsys.readouterr().out
    assert "matches this tree's build inputs; kept" in out
    # one from before the SASS counts gets them; a stand-in wheel has no extension to count
    assert "no sass_mixes.json" in out and "the GPU side counts them" in out
    stale = json.loads((dest / ".prebuilt" / "stamp.json").read_text())
    (dest / ".prebuilt" / "stamp.json").write_text(json.dumps({**stale, "python": "cp27"}))
    assert prepare.main(["--paper-git", str(snapshot)] + with_prebuilt) == 2
    assert "prepare_carry: .prebuilt: " in capsys.readouterr().err
    assert json.loads((dest / ".prebuilt" / "stamp.json").read_text())["python"] == "cp27"   # untouched
    import shutil
    shutil.rmtree(dest / ".prebuilt")

    # a CNTK.py without xz: refused, nothing written
    empty = tmp_path / "empty"
    empty.mkdir()
    broken = tmp_path / "broken"
    broken.mkdir()
    bad = _paper_snapshot(broken, standin.replace("def xz(", "def not_xz("))
    assert prepare.main(["--paper-git", str(bad), "--data", str(data), "--no-wheels", "--no-prebuilt",
                         "--dest", str(empty)]) == 2
    assert "xz" in capsys.readouterr().err and not list(empty.iterdir())
    # data missing: refused before the folders of the first run are touched
    (data / prepare.DATA_FILES[1]).unlink()
    assert prepare.main(["--paper-git", str(snapshot)] + argv) == 2
    assert f"{prepare.DATA_FILES[1]} not found" in capsys.readouterr().err
    assert sorted(p.name for p in (dest / ".devdata").iterdir()) == sorted(prepare.DATA_FILES)
    assert sorted(p.name for p in dest.iterdir()) == [".devdata", ".paper"]


def test_bench_stack_blocks_dry_run(tmp_path):
    """bench/bench_stack_blocks.py end to end with numba standing in for cuda (the GPU session's
    stack_blocks phase): both budgets' rows, their bits compared, the JSON written."""
    import json
    from bench import bench_stack_blocks
    pytest.importorskip("cntk_engine._cuda", reason="the kernel variants are read from the CUDA extension")
    assert bench_stack_blocks.main(["--out", str(tmp_path), "--n", "2", "--architectures", "myrtle5",
                                    "--repeats", "1", "--cpu-dry-run"]) == 0
    (f,) = tmp_path.glob("stack_blocks_*.json")
    rec = json.loads(f.read_text())
    rows = rec["results"]
    assert rec["backend"] == "numba" and len(rows) == 2 * len({r["kernel"] for r in rows})
    # the variants with a stack kernel of their own: v7 and v8 run v6's and v3's
    assert {r["kernel"] for r in rows} == {"v3", "v5", "v6"}
    assert {r["blocks_per_sm"] for r in rows} == {1, 2} and all(r["unique_pairs_per_s"] > 0 for r in rows)
    assert all(r["bit_identical_to_blocks_1"] and r["max_rel_diff_to_blocks_1"] == 0.0
               for r in rows if r["blocks_per_sm"] == 2)


def test_accuracy_recipes_table_and_resumable_kernels(tmp_path, capsys):
    """Two configurations on a tiny 32 x 32 x 3 set; with --store-dir a configuration whose JSON
    is gone (as if it had been interrupted after its kernels) reads its kernels back."""
    pytest.importorskip("zarr", reason="--store-dir needs zarr (Python >= 3.11)")
    from bench import accuracy_recipes
    rng = np.random.default_rng(0)
    data = tmp_path / "c.npz"
    np.savez(data, x_train=rng.integers(0, 256, (8, 32, 32, 3), dtype=np.uint8),
             y_train=np.arange(8) % 2, x_test=rng.integers(0, 256, (4, 32, 32, 3), dtype=np.uint8),
             y_test=np.arange(4) % 2)
    argv = ["--data", str(data), "--n-train", "6", "--n-test", "3", "--backend", "numba",
            "--only", "gap,gap_flip", "--out-dir", str(tmp_path / "res"),
            "--store-dir", str(tmp_path / "kernels")]
    accuracy_recipes.main(argv)
    table = (tmp_path / "res" / "accuracy_recipes_table.md").read_text()
    assert "| CNTK-GAP depth 3 |" in table and "| CNTK-GAP depth 3 + flip |" in table
    assert sorted(p.name for p in (tmp_path / "kernels").iterdir()) == [
        "accuracy_recipes_gap", "accuracy_recipes_gap_flip"]
    js = tmp_path / "res" / "accuracy_recipes_gap_flip.json"
    first = json.loads(js.read_text())
    assert first["tiles"]["train"]["computed"] == first["tiles"]["train"]["total"] > 0
    js.unlink()
    accuracy_recipes.main(argv)
    again = json.loads(js.read_text())
    assert again["tiles"] == {w: dict(t, computed=0) for w, t in first["tiles"].items()}
    assert again["results"] == first["results"]
    assert "accuracy_recipes_gap.json exists (same settings), kept" in capsys.readouterr().out
    # the table says that the resumed configuration's seconds are of its last run only
    table = (tmp_path / "res" / "accuracy_recipes_table.md").read_text()
    assert f"(resumed: 0 of {first['pairs']} pairs in this run)" in table
    assert table.count("resumed") == 1
    # each row names the machine its seconds were measured on
    m = first["machine"]
    assert table.count(f"| {m['cpu']}, {m['cores']} cores |") == 2


def test_bench_zca_records_the_fit_beside_the_kernel(tmp_path):
    """bench/bench_zca.py on random images: one row per training size with the fit, the
    transform, the memory and the fit's share of the training Gram's estimated time."""
    from bench import bench_zca
    rec = bench_zca.main(["--n-train", "6,12", "--architecture", "cnn", "--depth", "2",
                          "--kernel-n", "3", "--out-dir", str(tmp_path)])
    (f,) = tmp_path.glob("zca_*.json")
    assert json.loads(f.read_text())["results"] == json.loads(json.dumps(rec["results"]))
    assert [r["n_train"] for r in rec["results"]] == [6, 12] and rec["kernel"]["n"] == 3
    for r in rec["results"]:
        assert r["d"] == 3 * 32 * 32 and r["matrix_mib"] == 3072 ** 2 * 8 / 2 ** 20
        assert r["fit_s"] > 0 and r["fit_peak_mib"] >= r["matrix_mib"]
        pairs = r["n_train"] * (r["n_train"] + 1) / 2
        assert r["training_gram_s_estimated"] == pytest.approx(pairs / rec["kernel"]["unique_pairs_per_s"])
        assert r["fit_share_of_gram"] == pytest.approx(r["fit_s"] / r["training_gram_s_estimated"])
    # the kernel is timed on --kernel-n images also when the training sets are smaller
    rec = bench_zca.main(["--n-train", "2", "--architecture", "cnn", "--depth", "2", "--kernel-n", "4",
                          "--out-dir", str(tmp_path)])
    assert rec["kernel"]["n"] == 4


def test_bench_cifar_download_times_each_step_in_its_own_process(tmp_path, capsys):
    """bench/bench_cifar_download.py on an archive of CIFAR-10's format, small: the reading and
    the three preprocess steps ran (their outputs say what they wrote), each with its own peak memory;
    --archive takes a given download."""
    from bench import bench_cifar_download
    rec = bench_cifar_download.main(["--per-batch", "6", "--subset", "10,3", "--tmp", str(tmp_path),
                                     "--out-dir", str(tmp_path)])
    (f,) = tmp_path.glob("cifar_download_*.json")
    assert json.loads(f.read_text())["steps"].keys() == rec["steps"].keys()
    st = rec["steps"]
    assert st["load_cifar10"]["output"] == ["(30, 3, 32, 32) (6, 3, 32, 32) " + st["load_cifar10"]["output"][0].split()[-1]]
    assert any("x_train (10, 3, 32, 32), x_test (3, 3, 32, 32)" in line for line in st["preprocess_zca_subset"]["output"])
    assert any("x_train (30, 3, 32, 32), x_test (6, 3, 32, 32)" in line for line in st["preprocess_zca_all"]["output"])
    assert any("x_train (60, 3, 32, 32), x_test (6, 3, 32, 32) float64 NCHW (x_train: 30 images, then "
               "their horizontal flips" in line for line in st["preprocess_zca_all_augment_flips"]["output"])
    assert all(s["wall_s"] > 0 and s["peak_rss_mib"] > 10 for s in st.values())
    assert "6 batches of 6 random images" in rec["data"]
    assert sorted(p.name for p in tmp_path.iterdir()) == [f.name]          # the temporary folder removed
    given = tmp_path / "given"
    given.mkdir()
    _, archive, _, _ = official_cifar(given)
    rec = bench_cifar_download.main(["--archive", str(archive), "--subset", "4,2", "--out-dir", str(tmp_path)])
    assert rec["data"].endswith("(as given)") and "x_train (15, 3, 32, 32)" in " ".join(rec["steps"]["preprocess_zca_all"]["output"])
    with pytest.raises(SystemExit):
        bench_cifar_download.main(["--subset", "4", "--out-dir", str(tmp_path)])
    assert "--subset takes two numbers" in capsys.readouterr().err


def test_bench_float32_error_separates_near_duplicates(tmp_path, capsys):
    """bench/bench_float32_error.py on real digits: float32 is near float64 on distinct digits,
    and far (about sqrt(eps)) on a digit and its copy with faint noise."""
    from conftest import DATA
    from bench import bench_float32_error
    mnist = DATA / "mnist_test.npz"
    if not mnist.is_file():
        pytest.skip(f"real data {mnist} not found")
    rec = bench_float32_error.main(["--mnist", str(mnist), "--n", "3", "--crop", "8", "--depths",
                                    "6", "--noise", "0.1,10", "--out-dir", str(tmp_path)])
    (f,) = tmp_path.glob("float32_error_*.json")
    assert json.loads(f.read_text())["rows"] == rec["rows"]
    assert [(r["pooling"], r["depth"]) for r in rec["rows"]] == [("gap", 6), ("flatten", 6)]
    flat = rec["rows"][1]
    assert flat["distinct"] < 1e-6 and flat["noise_10"] < 1e-5 and flat["noise_0.1"] > 1e-4
    with pytest.raises(SystemExit) as e:
        bench_float32_error.main(["--noise", "0", "--out-dir", str(tmp_path)])
    assert e.value.code == 2 and "--noise: '0': expected a finite number > 0" in capsys.readouterr().err


# ------------------------------------------ command-line errors of the bench scripts (review)
def _one_error_line(capsys, code_seen, code=2):
    """The stderr of a refused run: one line '<prog>: error: ...' (after argparse's usage, for
    an argument argparse refused), no traceback; returns what follows 'error: '."""
    err = capsys.readouterr().err
    assert code_seen == code, err
    lines = err.strip().splitlines()
    if lines and lines[0].startswith("usage: "):
        lines = [x for x in lines if not (x.startswith("usage: ") or x.startswith(" "))]
    assert len(lines) == 1 and ": error: " in lines[0] and "Traceback" not in err, err
    return lines[0].split(": error: ", 1)[1]


def test_run_main_formats_script_errors(capsys):
    import argparse
    from bench.common import run_main
    ap = argparse.ArgumentParser(prog="tool.py")

    def raising(exc):
        def run(args):
            raise exc
        return run

    for exc, msg in ((ScriptError("--x 1: bad"), "--x 1: bad"),
                     (NotADirectoryError(20, "Not a directory", "a.txt/b"), "a.txt/b: Not a directory")):
        with pytest.raises(SystemExit) as e:
            run_main(ap, raising(exc), [])
        assert str(e.value) == msg
        assert _one_error_line(capsys, e.value.code) == msg
        assert "[Errno" not in msg
    with pytest.raises(SystemExit) as e:                       # Ctrl-C: one line, status 130
        run_main(ap, raising(KeyboardInterrupt()), [])
    assert e.value.code == 130 and capsys.readouterr().err == "tool.py: interrupted\n"


def test_list_options_refuse_empty_items_and_non_finite_numbers():
    import argparse
    from bench import harness
    from bench.common import choice_list, devices, int_list, positive_float, positive_float_list
    for parse, text in ((int_list(2), "3,,4"), (int_list(1), "2,4,"), (positive_float_list, "1,,2"),
                        (choice_list(["gap", "lap4"]), "gap,,lap4"), (devices, "0,,1"),
                        (harness._tiles, "default,,64"), (harness._kernel_names, "v3,,v5"),
                        (harness._overrides, "reference=2,,cuda=4")):
        with pytest.raises(argparse.ArgumentTypeError, match="has an empty item; expected a comma list "
                                                             "without empty items, e.g. "):
            parse(text)
    for text in ("inf", "nan", "-inf", "1e999"):
        with pytest.raises(argparse.ArgumentTypeError, match="expected a finite number > 0"):
            positive_float(text)
    assert int_list(2)("3, 4") == [3, 4] and harness._overrides("") == {}


@pytest.mark.parametrize("script,argv,flag", [
    ("reproduce_table1", ["--depths", "3,,4"], "--depths"),
    ("small_data", ["--sizes", "2,,4"], "--sizes"),
    ("bench_zca", ["--n-train", "4,,6"], "--n-train"),
    ("bench_float32_error", ["--noise", "1,,2"], "--noise"),
    ("bench_float32_error", ["--noise", "inf"], "--noise"),
    ("accuracy_recipes", ["--only", "gap,,lap4"], "--only"),
    ("accuracy_recipes", ["--backend", "gpu"], "--backend"),
    ("accuracy_recipes", ["--seed", "-1"], "--seed"),
    ("harness", ["--sizes", "2,,4"], "--sizes"),
])
def test_bench_list_and_number_options_name_themselves(tmp_path, capsys, script, argv, flag):
    import importlib
    mod = importlib.import_module(f"bench.{script}")
    rest = ["--data", str(_tiny_cifar(tmp_path / "d.npz"))] if script == "accuracy_recipes" else []
    with pytest.raises(SystemExit) as e:
        mod.main(rest + argv + ["--out-dir", str(tmp_path / "out")])
    assert _one_error_line(capsys, e.value.code).startswith(f"argument {flag}: ")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("script", ["bench_zca", "bench_readouts", "bench_stacks", "accuracy_recipes",
                                    "small_data", "bench_float32_error", "reproduce_table1", "bench_cpu",
                                    "harness"])
def test_bench_scripts_refuse_an_out_dir_under_a_file_first(tmp_path, capsys, monkeypatch, script):
    """--out-dir text.txt/x: one line naming --out-dir, before any image is read or kernel computed."""
    import importlib
    import cntk_engine
    mod = importlib.import_module(f"bench.{script}")
    monkeypatch.setattr(cntk_engine, "gram", lambda *a, **k: pytest.fail("a kernel was computed"))
    (tmp_path / "text.txt").write_text("hi\n")
    data = str(_tiny_cifar(tmp_path / "d.npz"))
    rest = {"accuracy_recipes": ["--data", data], "reproduce_table1": ["--data", data],
            "small_data": ["--data", data], "bench_zca": ["--architecture", "cnn", "--depth", "2"],
            "harness": ["--methods", "numba"]}.get(script, [])
    with pytest.raises(SystemExit) as e:
        mod.main(rest + ["--out-dir", str(tmp_path / "text.txt" / "x")])
    msg = _one_error_line(capsys, e.value.code)
    assert msg.startswith("--out-dir ") and "text.txt is a file, not a folder" in msg, msg
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d.npz", "text.txt"]


def test_harness_refuses_a_folder_as_output_before_running(tmp_path, capsys, monkeypatch):
    from bench import harness
    monkeypatch.setattr(harness, "build_matrix", lambda args: pytest.fail("configurations built"))
    (tmp_path / "somedir").mkdir()
    with pytest.raises(SystemExit) as e:
        harness.main(["--methods", "numba", "--output", str(tmp_path / "somedir")])
    assert "--output " in _one_error_line(capsys, e.value.code)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["somedir"]       # no somedir.tmp


def test_harness_exits_1_when_nothing_is_measured_and_spells_backend_as_methods(tmp_path, capsys,
                                                                               monkeypatch):
    import cntk_engine as ce
    from bench import harness
    from cntk_engine.spelling import arg
    out = tmp_path / "h.json"
    argv = ["--methods", "numba", "--depths", "2", "--sizes", "3", "--n", "1", "--repeats", "1",
            "--warmup", "0", "--no-ceiling", "--no-plots", "--output", str(out)]
    # --devices with CPU methods only: refused before anything runs
    with pytest.raises(SystemExit) as e:
        harness.main(argv + ["--devices", "0"])
    assert e.value.code == 2 and not out.exists()
    assert "--devices 0: selects the GPUs of the cuda method" in capsys.readouterr().err

    def refusing(*a, **k):          # an engine refusal that names gram's backend=
        raise ValueError(f"this input needs the GPU; use {arg('backend', 'cuda')}")
    monkeypatch.setattr(ce, "gram", refusing)
    with pytest.raises(SystemExit) as e:
        harness.main(argv)
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 1 and err == [f"python -m bench: nothing was measured: 1 configuration(s), 1 failed; "
                                         f"the reasons are in {out}"]
    (rec,) = json.loads(out.read_text())["results"]
    assert "--methods 'cuda'" in rec["reason"] and "backend=" not in rec["reason"], rec["reason"]


def test_bench_readouts_exits_1_when_nothing_is_measured(tmp_path, capsys, monkeypatch):
    from bench import bench_readouts
    monkeypatch.setattr(bench_readouts, "CONFIGS", [("bad", dict(pooling="nope"))])
    with pytest.raises(SystemExit) as e:
        bench_readouts.main(["--n", "2", "--repeats", "1", "--out-dir", str(tmp_path / "out")])
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 1 and len(err) == 1
    assert ": nothing was measured: all 1 configurations unavailable (pooling must be" in err[0], err
    assert not (tmp_path / "out").exists()


def test_bench_zca_refuses_what_it_cannot_time(tmp_path, capsys):
    from bench import bench_zca
    rng = np.random.default_rng(0)
    files = {"flat.npz": rng.random((6, 8, 8)), "small.npz": rng.random((6, 8, 8, 3)),
             "nan.npz": rng.random((6, 8, 8, 3)), "const.npz": rng.random((6, 8, 8, 1))}
    files["nan.npz"][2, 0, 0, 0] = np.nan
    files["const.npz"][1] = 0.5
    for name, x in files.items():
        np.savez(tmp_path / name, x_train=x)
    out = ["--out-dir", str(tmp_path / "out"), "--n-train", "2,3", "--kernel-n", "2"]
    cnn = ["--architecture", "cnn", "--depth", "2"]
    for argv, want in (
            (["--architecture", "cnn"], "--architecture cnn needs --depth"),
            (["--data", str(tmp_path / "flat.npz")] + cnn, "x_train has shape (6, 8, 8)"),
            (["--data", str(tmp_path / "small.npz")], "--architecture 'myrtle5' is defined for 32 x 32 images"),
            (["--data", str(tmp_path / "nan.npz")] + cnn, "x_train has NaN or Inf pixels in image(s) at index [2]"),
            (["--data", str(tmp_path / "const.npz")] + cnn, "x_train image(s) at index [1] are constant")):
        with pytest.raises(SystemExit) as e:
            bench_zca.main(out + argv)
        msg = _one_error_line(capsys, e.value.code)
        assert want in msg and "=" not in msg.replace("(", "").split(";")[0], msg
    assert not (tmp_path / "out").exists()


def test_npz_inputs_say_what_they_expect(tmp_path, capsys):
    """small_data --kernels and bench_float32_error --mnist: an .npy, a text file or an archive
    without the array is one line saying what is expected, not numpy's pickle advice."""
    from bench import bench_float32_error, small_data
    np.save(tmp_path / "x.npy", np.zeros(3))
    (tmp_path / "text.txt").write_text("hi\n")
    np.savez(tmp_path / "nox.npz", y=np.arange(3))
    for main, option in ((small_data.main, "--kernels"), (bench_float32_error.main, "--mnist")):
        for f, want in (("x.npy", "a single .npy array, not an .npz archive"),
                        ("text.txt", "not an .npz archive (nor any zip file)"),
                        ("nox.npz", "has no ")):
            with pytest.raises(SystemExit) as e:
                main([option, str(tmp_path / f), "--out-dir", str(tmp_path / "out")])
            msg = _one_error_line(capsys, e.value.code)
            assert msg.startswith(f"{option} {tmp_path / f}") and want in msg and "expected an .npz" in msg, msg
            assert "pickle" not in msg
    assert not (tmp_path / "out").exists()


def test_bench_float32_error_digit_shapes_and_noise_out_of_range(tmp_path, capsys):
    from bench import bench_float32_error
    rng = np.random.default_rng(0)
    np.savez(tmp_path / "m.npz", x=rng.integers(0, 256, (4, 1, 28, 28), dtype=np.uint8))
    base = ["--mnist", str(tmp_path / "m.npz"), "--crop", "4", "--depths", "2", "--out-dir", str(tmp_path / "o")]
    rec = bench_float32_error.main(base + ["--n", "2", "--noise", "1"])       # (N, 1, 28, 28) accepted
    assert len(rec["rows"]) == 2
    with pytest.raises(SystemExit) as e:
        bench_float32_error.main(base + ["--n", "5"])
    assert "holds 4 images of 28 x 28; --n 5 and --crop 4 ask for 5 images" in _one_error_line(capsys, e.value.code)
    with pytest.raises(SystemExit) as e:
        bench_float32_error.main(base + ["--n", "2", "--noise", "1e300"])
    msg = _one_error_line(capsys, e.value.code)
    assert msg.startswith("--noise 1e+300: ") and "x1" not in msg, msg


def _nan_cifar(path):
    _tiny_cifar(path)
    with np.load(path) as z:
        d = dict(z)
    d["x_train"] = d["x_train"].astype(np.float32)
    d["x_train"][2, 0, 0, 0] = np.nan
    np.savez(path, **d)
    return path


def test_table1_and_small_data_refusals_name_the_image_and_leave_no_folder(tmp_path, capsys):
    from bench import reproduce_table1, small_data
    data = str(_tiny_cifar(tmp_path / "d.npz"))
    bad = tmp_path / "labels.npz"
    np.savez(bad, **{**dict(np.load(data)), "y_train": np.arange(12) % 10 + 5})
    (tmp_path / "text.txt").write_text("hi\n")
    out = tmp_path / "out"
    common = ["--n-train", "10", "--n-test", "4", "--depths", "3", "--per-depth-timing", "0", "--no-loo",
              "--backend", "numba", "--out-dir", str(out)]
    for argv, want in (
            (["--data", str(_nan_cifar(tmp_path / "nan.npz"))], "x_train has NaN or Inf pixels in image(s) at index [2]"),
            (["--data", str(bad)], "y_train must hold the CIFAR-10 classes, integers 0..9; got 5..14"),
            (["--data", str(tmp_path / "text.txt")], "--data: "),
            (["--data", data, "--downsample", "16"], "--downsample 16"),
            (["--data", data, "--store", str(tmp_path / "text.txt")], "--store "),
            (["--data", data, "--devices", "0"], "--devices 0 selects GPUs"),
            (["--data", data, "--depths", "2", "--pooling", "gap"], "--depths 2: CNTK-GAP (--pooling gap")):
        with pytest.raises(SystemExit) as e:
            reproduce_table1.main(common + argv)
        msg = _one_error_line(capsys, e.value.code)
        assert want in msg and "fix=" not in msg and "kernel=" not in msg, msg
        assert not out.exists(), argv
    with pytest.raises(SystemExit) as e:
        small_data.main(["--data", str(tmp_path / "nan.npz"), "--pool", "10", "--n-test", "4", "--depths", "3",
                         "--sizes", "10", "--out-dir", str(out)])
    assert "at index [2]" in _one_error_line(capsys, e.value.code)
    assert not out.exists()


def test_accuracy_recipes_refuses_results_of_other_settings(tmp_path, capsys, monkeypatch):
    """An existing configuration JSON is kept only when its recorded command has this run's
    settings; otherwise the run is refused before anything runs.  Refusals leave no folder."""
    import shlex
    from bench import accuracy_recipes
    data = str(_tiny_cifar(tmp_path / "d.npz"))
    res = tmp_path / "res"
    argv = ["--data", data, "--n-train", "6", "--n-test", "3", "--backend", "numba", "--only", "gap",
            "--out-dir", str(res)]
    res.mkdir()
    ns = type("A", (), dict(out_dir=str(res), name="accuracy_recipes", store_dir=None, data=data, n_train=6,
                            n_test=3, seed=0, backend="numba"))
    cmd = accuracy_recipes.command("gap", ns)
    (res / "accuracy_recipes_gap.json").write_text(json.dumps({
        "command": "cntk-engine " + shlex.join(cmd), "results": [{"kernel": "ntk", "accuracy": 0.5},
                                                                   {"kernel": "nngp", "accuracy": 0.25}],
        "seconds": {"train_gram": 1.0, "test_kernel": 1.0}, "pairs": 39, "machine": {"cpu": "c", "cores": 2}}))
    monkeypatch.setattr(accuracy_recipes, "evaluate", lambda *a: pytest.fail("a configuration ran"))
    accuracy_recipes.main(argv)                                    # same settings: kept
    assert "exists (same settings), kept" in capsys.readouterr().out
    for extra, want in ((["--seed", "1"], "--seed 0 there, 1 now"), (["--n-train", "7"], "--n-train 6 there, 7 now"),
                        (["--backend", "reference"], "--backend numba there, reference now")):
        with pytest.raises(SystemExit) as e:
            accuracy_recipes.main(argv + extra)
        msg = _one_error_line(capsys, e.value.code)
        assert "accuracy_recipes_gap.json holds results computed with other settings" in msg and want in msg, msg
    monkeypatch.undo()
    (tmp_path / "text.txt").write_text("hi\n")
    for extra in (["--data", str(tmp_path / "text.txt")], ["--store-dir", str(tmp_path / "text.txt")]):
        with pytest.raises(SystemExit) as e:
            accuracy_recipes.main(argv[2:] + ["--out-dir", str(tmp_path / "new"), "--data", data] + extra)
        assert ("--data " if "--data" in extra else "--store-dir ") in _one_error_line(capsys, e.value.code)
        assert not (tmp_path / "new").exists()


def test_verify_cost_times_a_store_and_refuses_a_missing_folder(tmp_path, capsys, monkeypatch):
    """tools/verify_cost.py: one JSON record for a small store; a --dir that does not exist is a
    usage error (exit 2, one line), not a traceback from the store."""
    import importlib.util
    monkeypatch.setattr(sys, "path", list(sys.path))     # the script puts the clone first
    spec = importlib.util.spec_from_file_location("verify_cost", ROOT / "tools" / "verify_cost.py")
    vc = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(vc)
    with pytest.raises(SystemExit) as e:
        vc.main(["--n", "8", "--dir", str(tmp_path / "missing")])
    assert e.value.code == 2
    assert "--dir " + str(tmp_path / "missing") + ": not an existing folder" in capsys.readouterr().err
    assert vc.main(["--n", "40", "--tile", "16", "--dir", str(tmp_path)]) == 0
    rec = json.loads(capsys.readouterr().out)
    assert rec["n"] == 40 and rec["tiles"] == 6 and rec["bytes_verified"] > 0
    assert not (tmp_path / "verify_cost_40.zarr").exists()


def test_a_new_result_never_overwrites_an_earlier_one(tmp_path):
    """bench.common.new_stem: <name>_<date>, then _2, _3, ... where any result file (.json, .png,
    .md, .log) of that stem exists: the committed results in bench/results are never replaced
    by a README command run again on the day they were measured."""
    from bench.common import new_stem, utc_date
    first = new_stem(tmp_path, "cpu")
    assert first == tmp_path / f"cpu_{utc_date()}"
    Path(str(first) + ".png").write_text("")
    second = new_stem(tmp_path, "cpu")
    assert second == tmp_path / f"cpu_{utc_date()}_2"
    Path(str(second) + ".json").write_text("{}")
    assert new_stem(tmp_path, "cpu") == tmp_path / f"cpu_{utc_date()}_3"
    assert new_stem(tmp_path, "cpu_x") == tmp_path / f"cpu_x_{utc_date()}"


def test_harness_resume_continues_the_newest_file_of_its_name(tmp_path):
    """A second run on one day writes <name>_<date>_2.json; --resume continues that one (the
    newest: date, then number), not the finished first file."""
    from argparse import Namespace

    from bench import harness
    from bench.common import utc_date
    args = Namespace(output=None, resume=False, out_dir=str(tmp_path), name="h")
    first = harness.output_path(args)
    assert first.name == f"h_{utc_date()}.json"
    first.write_text("{}")
    second = harness.output_path(args)
    assert second.name == f"h_{utc_date()}_2.json"
    second.write_text("{}")
    (tmp_path / "h_20200101_7.json").write_text("{}")
    (tmp_path / "h_other.json").write_text("{}")
    assert harness.output_path(Namespace(output=None, resume=True, out_dir=str(tmp_path), name="h")) == second


def test_bench_predict_times_both_settings_and_restores_the_bound(tmp_path):
    """bench/bench_predict.py, tiny: one-image predicts with the training set's diagonals
    computed at each call and kept, both recorded; diag.MEMO_BYTES as it was afterwards."""
    from bench import bench_predict
    from cntk_engine import diag
    before = diag.MEMO_BYTES
    rec = bench_predict.main(["--architectures", "myrtle5", "--n-train", "10", "--repeats", "1",
                              "--rounds", "1", "--out-dir", str(tmp_path)])
    (f,) = tmp_path.glob("predict_*.json")
    assert json.loads(f.read_text())["results"] == json.loads(json.dumps(rec["results"]))
    (row,) = rec["results"]
    assert row["architecture"] == "myrtle5" and row["n_train"] == 10
    for setting in ("computed_each_call", "kept"):
        assert row[setting]["fit_s"] > 0 and row[setting]["predict_one_s"] > 0
    assert diag.MEMO_BYTES == before == rec["memo_bytes"]


def test_bench_solver_times_both_ridges_and_measures_the_workspace(tmp_path, monkeypatch, capsys):
    """bench/bench_solver.py, tiny: per n the leave-one-out selection and a given ridge, timed,
    with their peak memory in copies of K beside solve_workspace's figures: K given up as solve
    gives it (above 1 for the eigendecomposition's workspace), and K kept (a private copy more);
    the largest n's seconds extrapolated to 50,000 by n^3."""
    from bench import bench_solver
    monkeypatch.setattr(bench_solver, "EXTRAPOLATE_FROM", 300)
    rec = bench_solver.main(["--ns", "300,100", "--repeats", "1", "--classes", "3",
                             "--out-dir", str(tmp_path)])
    (f,) = tmp_path.glob("solver_*.json")
    assert json.loads(f.read_text())["results"] == json.loads(json.dumps(rec["results"]))
    assert [r["n"] for r in rec["results"]] == [300, 100] and rec["results"][1]["m"] == 20
    for row in rec["results"]:
        assert row["classes"] == 3
        auto, given = row["auto"], row["given"]
        assert auto["solve_workspace"] == 2.1 and given["solve_workspace"] == 0.1
        assert auto["solve_workspace_kept"] == 3.1 and given["solve_workspace_kept"] == 1.1
        assert auto["peak_copies_of_K"] > 1 and given["peak_copies_of_K"] > 0
        for r in (auto, given):          # kept: the private copy more (tiny n: blocks weigh)
            assert r["peak_copies_of_K_kept"] - r["peak_copies_of_K"] == pytest.approx(1, abs=0.05)
        assert auto["seconds"] > 0 and given["seconds"] > 0 and len(auto["times_s"]) == 1
        assert given["ridge_relative_chosen"] == 1e-3
    ext = rec["extrapolated_seconds"]
    assert ext["from_n"] == 300 and ext["n"] == 50_000
    assert ext["auto"] == pytest.approx(rec["results"][0]["auto"]["seconds"] * (50_000 / 300) ** 3)
    # below EXTRAPOLATE_FROM: said, not extrapolated
    monkeypatch.setattr(bench_solver, "EXTRAPOLATE_FROM", 301)
    capsys.readouterr()
    rec = bench_solver.main(["--ns", "300", "--repeats", "1", "--out-dir", str(tmp_path)])
    assert rec["extrapolated_seconds"] is None
    assert "not extrapolated to 50,000: the largest n, 300, is below 301" in capsys.readouterr().out
    with pytest.raises(SystemExit) as e:
        bench_solver.main(["--ns", "10", "--out-dir", str(tmp_path)])
    assert e.value.code == 2


def test_bench_solver_large_solves_by_syevr_and_checks_the_residual(tmp_path, monkeypatch):
    """bench/bench_solver_large.py, tiny (the syevd limit lowered below its n): the solve by
    syevr with K given up, its residual from K rebuilt by blocks small, the JSON written."""
    from bench import bench_solver_large
    from cntk_engine.solver import linalg
    monkeypatch.setattr(linalg, "EVD_MAX_N", 100)
    rec = bench_solver_large.main(["--n", "300", "--out-dir", str(tmp_path)])
    (f,) = tmp_path.glob("solver_large_*.json")
    assert json.loads(f.read_text())["relative_residual"] == rec["relative_residual"]
    assert rec["eigh_driver"] == "syevr" and rec["n"] == 300 and rec["evd_max_n"] == 100
    assert rec["relative_residual"] < 1e-10 and rec["solve_workspace"] == 1.1
    assert 0.25 < rec["loo_accuracy"] <= 1
    monkeypatch.setattr(linalg, "EVD_MAX_N", 32766)
    assert bench_solver_large.main(["--n", "300", "--out-dir", str(tmp_path)])["eigh_driver"] == "syevd"
