"""The benchmark harness and reproduction scripts on tiny sizes (no timings are asserted)."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import cntk_engine as ce  # noqa: E402
from bench import ceiling, per_layer_cpu  # noqa: E402


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
        assert set(c) == {"method", "depth", "size", "channels", "pooling", "dtype", "tile", "n"}
        assert r["unique_pairs"] == c["n"] * (c["n"] + 1) // 2
        assert r["unique_pairs_per_s"] == pytest.approx(r["unique_pairs"] / r["seconds"])
        assert r["work_per_pair"]["fp_instructions"] > 0
        if "check" in r:                               # every method agrees with the first
            assert r["check"]["max_rel_diff"] < 1e-5, r
    assert sum("check" in r for r in ok) >= 5
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
sys.path.insert(0, {root!r})
import cntk_engine as ce
n, depth, size = (int(a) for a in sys.argv[3:6])
x = np.random.default_rng(0).standard_normal((n, size, size, 3)).astype(np.float32)
ntk, nngp = ce.gram(x.astype(np.float64), depth=depth, kernel="both", convention="neural_tangents",
                    W_std=1.0, data_format="NHWC", dtype="float64")
np.savez(sys.argv[8], x=x, ntk=ntk * {scale}, nngp=nngp)
print(json.dumps({{"seconds": 0.5, "times": [0.5], "version": "fake", "jax_device": "cpu:0"}}))
"""


@pytest.mark.parametrize("scale", [1.0, 1.5])
def test_harness_checks_neural_tangents_values(tmp_path, scale):
    """The NT comparison carries an exactness check that a wrong kernel fails."""
    from bench import harness
    fake = tmp_path / "python"
    fake.write_text(FAKE_NT.format(python=sys.executable, root=str(ROOT), scale=scale))
    fake.chmod(0o755)
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
    from bench.reproduce_table1 import loo_ridge_predict, one_hot, ridge_free_predict
    Y = one_hot(np.array([2, 0]), 3)
    np.testing.assert_array_equal(Y, [[-0.1, -0.1, 0.9], [0.9, -0.1, -0.1]])
    rng = np.random.default_rng(0)
    centers = rng.standard_normal((10, 20)) * 3
    y = np.arange(200) % 10
    f = centers[y] + rng.standard_normal((200, 20))
    k = f @ f.T + 1e-3 * np.eye(200)
    ytr, yte = y[:150], y[150:]
    pred = ridge_free_predict(k[:150, :150], k[150:, :150], ytr)
    assert np.mean(pred.argmax(1) == yte) > 0.9
    pred, lam, loo = loo_ridge_predict(k[:150, :150], k[150:, :150], ytr)
    assert np.mean(pred.argmax(1) == yte) > 0.9 and loo > 0.9


def test_table1_and_small_data_tiny(tmp_path):
    from bench import reproduce_table1, small_data
    rng = np.random.default_rng(0)
    data = tmp_path / "d.npz"
    np.savez(data, x_train=rng.integers(0, 256, (40, 6, 6, 3), dtype=np.uint8), y_train=np.arange(40) % 10,
             x_test=rng.integers(0, 256, (12, 6, 6, 3), dtype=np.uint8), y_test=np.arange(12) % 10)
    p = reproduce_table1.main(["--data", str(data), "--n-train", "30", "--n-test", "12", "--pooling", "gap,flatten",
                               "--depths", "2,3", "--backend", "numba", "--per-depth-timing", "3",
                               "--out-dir", str(tmp_path), "--tag", "t", "--save-kernels", str(tmp_path / "k")])
    assert set(p["columns"]) == {"CNTK-GAP", "CNTK-V"}
    assert p["columns"]["CNTK-GAP"]["fix"] is True and p["columns"]["CNTK-V"]["fix"] is False
    for col in p["columns"].values():
        assert col["timing"]["unique_pairs"] == 30 * 31 // 2 + 30 * 12
        assert [r["depth"] for r in col["rows"]] == [2, 3]
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
    common = ["--data", str(data), "--n-train", "24", "--n-test", "9", "--pooling", "gap", "--depths", "2,3",
              "--backend", "numba", "--tile", "8", "--per-depth-timing", "0", "--out-dir", str(tmp_path)]
    mem = reproduce_table1.main(common + ["--tag", "mem", "--save-kernels", str(tmp_path / "mem")])
    st = reproduce_table1.main(common + ["--tag", "st", "--store", str(tmp_path / "s"),
                                         "--save-kernels", str(tmp_path / "st")])
    again = reproduce_table1.main(common + ["--tag", "again", "--store", str(tmp_path / "s")])
    a, b = np.load(tmp_path / "mem_gap.npz"), np.load(tmp_path / "st_gap.npz")
    for key in ("ntk_train_2", "nngp_train_3", "ntk_test_3", "nngp_test_2"):
        assert a[key].tobytes() == b[key].tobytes(), key
    rows = [p["columns"]["CNTK-GAP"]["rows"] for p in (mem, st, again)]
    assert rows[0] == rows[1] == rows[2]
    t = st["columns"]["CNTK-GAP"]["timing"]
    assert t["tiles_computed"] == t["tiles_total"] > 2 and t["unique_pairs_per_s"] > 0
    t2 = again["columns"]["CNTK-GAP"]["timing"]
    assert t2["tiles_computed"] == 0 and t2["unique_pairs_per_s"] is None and "resumed" in t2["note"]
    assert (tmp_path / "s" / "gap_train.zarr").is_dir() and (tmp_path / "s" / "gap_test.zarr").is_dir()


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


def _official_cifar(tmp_path, per_batch=3):
    """A miniature of the official CIFAR-10 python files: (folder, archive, expected arrays)."""
    import pickle
    import tarfile
    rng = np.random.default_rng(5)
    root = tmp_path / "cifar-10-batches-py"
    root.mkdir()
    xs, ys = [], []
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        data = rng.integers(0, 256, (per_batch, 3072), dtype=np.uint8)
        labels = [int(v) for v in rng.integers(0, 10, per_batch)]
        (root / name).write_bytes(pickle.dumps({b"data": data, b"labels": labels, b"batch_label": b"x"}))
        xs.append(data)
        ys.append(labels)
    archive = tmp_path / "cifar-10-python.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(root, arcname="cifar-10-batches-py")
    return root, archive, xs, ys


def test_load_cifar_official_files_folder_and_archive(tmp_path):
    from bench.reproduce_table1 import load_cifar
    root, archive, xs, ys = _official_cifar(tmp_path)
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
    root, _, _, _ = _official_cifar(tmp_path)
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
