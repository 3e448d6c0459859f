"""``cntk-engine solve``: kernel regression on stored kernels, the labels tied to them through
the images (fingerprints), on real CIFAR-10 images; the same figures as the solver in memory."""
import json
import os
import re

import numpy as np
import pytest

pytest.importorskip("zarr")

from cntk_engine import gram, solver  # noqa: E402

from conftest import load_real, run_cli  # noqa: E402


def run(capsys, *argv):
    return run_cli(capsys, *argv)


@pytest.fixture(scope="module")
def kept(tmp_path_factory):
    """DATA (8 x 8 CIFAR-10 images, 40 / 16) and its two stores, as the README's commands make
    them (flips on, depth 3)."""
    d = load_real("cifar10_jpeg_small.npz")
    x_train = d["x_train"][:40, ::4, ::4].transpose(0, 3, 1, 2).astype(np.float64) / 255
    x_test = d["x_test"][:16, ::4, ::4].transpose(0, 3, 1, 2).astype(np.float64) / 255
    folder = tmp_path_factory.mktemp("solve")
    data = folder / "d.npz"
    np.savez(data, x_train=x_train, y_train=d["y_train"][:40], x_test=x_test, y_test=d["y_test"][:16])
    kw = dict(depth=3, flip=True, backend="numba")
    gram(x_train, out=str(folder / "train.zarr"), **kw)
    gram(x_test, x_train, out=str(folder / "test.zarr"), **kw)
    return folder, data, dict(np.load(data))


def test_solve_matches_the_solver_in_memory(kept, capsys):
    folder, data, d = kept
    out = [data, "--train", folder / "train.zarr", "--test", folder / "test.zarr"]
    rc, o, e = run(capsys, "solve", *out, "--predictions", folder / "p.npy", "--json", folder / "r.json")
    assert rc == 0, e
    K = solver.load_gram(folder / "train.zarr")
    K_test = solver.load_gram(folder / "test.zarr")
    ref = solver.evaluate_classifier(K, K_test, d["y_train"], d["y_test"])
    fit = solver.fit_classifier(K, d["y_train"])
    assert f"40 training and 16 test images, {len(np.unique(d['y_train']))} classes, kernel ntk; ridge " \
           f"{ref['ridge_relative']:g} x mean diag(K) (chosen by leave-one-out: accuracy " \
           f"{100 * ref['loo_accuracy']:.2f}%)" in o, o
    assert f"test accuracy: {100 * ref['accuracy']:.2f}%" in o
    np.testing.assert_array_equal(np.load(folder / "p.npy"), fit.predict(K_test))
    r = json.loads((folder / "r.json").read_text())
    assert r["accuracy"] == ref["accuracy"] and r["ridge_relative"] == ref["ridge_relative"]
    assert r["n_train"] == 40 and r["n_test"] == 16 and r["command"].startswith("cntk-engine -q solve ")
    assert r["keys"] == ["ntk", "ntk"] and r["predictions"] == str(folder / "p.npy")
    # a ridge given; no y_test: predictions only
    rc, o, e = run(capsys, "solve", *out, "--ridge", "0.01")
    assert rc == 0 and "x mean diag(K) (given)" in o, e
    ref = solver.evaluate_classifier(K, K_test, d["y_train"], d["y_test"], ridge=0.01)
    assert f"test accuracy: {100 * ref['accuracy']:.2f}%" in o
    # a test store computed train x test: the same predictions
    gram(d["x_train"], d["x_test"], depth=3, flip=True, backend="numba",
         out=str(folder / "test_t.zarr"))
    rc, o, e = run(capsys, "solve", data, "--train", folder / "train.zarr", "--test",
                   folder / "test_t.zarr", "--key", "ntk", "--predictions", folder / "pt.npy")
    assert rc == 0, e
    np.testing.assert_array_equal(np.load(folder / "pt.npy"), np.load(folder / "p.npy"))
    np.savez(folder / "unlabelled.npz", **{k: v for k, v in d.items() if k != "y_test"})
    rc, o, e = run(capsys, "solve", folder / "unlabelled.npz", *out[1:], "--predictions", folder / "u.npy")
    assert rc == 0 and "test accuracy" not in o, e
    np.testing.assert_array_equal(np.load(folder / "u.npy"), np.load(folder / "p.npy"))
    # labels kept as columns (N, 1) by the tool that wrote them (preprocess copies them so):
    # read as evaluate reads them
    np.savez(folder / "columns.npz", **dict(d, y_train=d["y_train"][:, None],
                                          y_test=d["y_test"][None, :]))
    rc, o, e = run(capsys, "solve", folder / "columns.npz", *out[1:], "--predictions",
                   folder / "c.npy")
    acc = np.mean(np.load(folder / "p.npy") == d["y_test"])
    assert rc == 0 and f"test accuracy: {100 * acc:.2f}%" in o, e
    np.testing.assert_array_equal(np.load(folder / "c.npy"), np.load(folder / "p.npy"))


def test_memory_refusal_gives_the_command_line_s_ways_out(kept, capsys, monkeypatch):
    """The store's "does not fit" advice as the command can follow it: no max_memory (solve has
    no such option), and --ridge R's smaller need for --ridge auto; the figures are those of a
    K solved in its own memory (solve_workspace with overwrite_k: one copy less)."""
    from cntk_engine.jobs import store
    folder, data, _ = kept
    monkeypatch.setattr(store, "available_memory", lambda: 20_000)
    rc, o, e = run(capsys, "solve", data, "--train", folder / "train.zarr", "--test", folder / "test.zarr")
    assert rc == 2 and "with the solve's workspace (2.1 copies); available RAM" in e, e
    assert "max_memory" not in e and "(--ridge R, a number, needs 0.1 copies of K" in e, e
    # beyond EVD_MAX_N (32,766: syevr, U new, no 2 n^2 workspace) the figure for that n
    from cntk_engine.solver import linalg
    with monkeypatch.context() as m:
        m.setattr(linalg, "EVD_MAX_N", 3)
        rc, o, e = run(capsys, "solve", data, "--train", folder / "train.zarr", "--test",
                       folder / "test.zarr")
    assert rc == 2 and "with the solve's workspace (1.1 copies); available RAM" in e, e
    assert ("(--ridge R, a number, needs 0.1 copies of K for its solve instead of the 1.1 of "
            "--ridge auto's eigendecomposition)") in e, e
    # from Python the parameter is named
    with pytest.raises(solver.GramTooLarge, match=r"Free memory, raise max_memory, solve on"):
        solver.load_train_test(folder / "train.zarr", folder / "test.zarr", workspace=3)
    # --device cuda (refused before CuPy reads anything): the GPU too small gives --device cpu,
    # and --ridge R with the GPU's copies; the host too small to read them for the GPU neither
    from cntk_engine import arrays
    monkeypatch.setattr(arrays, "cuda_unavailable_reason", lambda: None)
    monkeypatch.setattr(store, "available_memory", lambda: 1 << 30)
    monkeypatch.setattr(store, "available_gpu_memory", lambda: 20_000)
    argv = ["solve", data, "--train", folder / "train.zarr", "--test", folder / "test.zarr",
            "--device", "cuda"]
    rc, o, e = run(capsys, *argv)
    assert rc == 2 and "with the solve's workspace (3.1 copies); free GPU memory" in e, e
    assert e.rstrip().endswith("(--device cpu solves in the host's memory; --ridge R, a number, "
                               "needs 1.1 copies of K for its solve instead of the 3.1 of --ridge "
                               "auto's eigendecomposition)"), e
    rc, o, e = run(capsys, *argv, "--ridge", "0")
    assert rc == 2 and "(1.1 copies)" in e and e.rstrip().endswith(
        "(--device cpu solves in the host's memory)"), e
    monkeypatch.setattr(store, "available_gpu_memory", lambda: 1 << 30)
    monkeypatch.setattr(store, "available_memory", lambda: 20_000)
    rc, o, e = run(capsys, *argv)
    assert rc == 2 and "on the host to read them for the GPU; available RAM" in e, e
    assert "--device cpu" not in e and "--ridge R" not in e, e


def test_labels_of_other_images_and_bad_options_are_refused(kept, tmp_path, capsys):
    folder, data, d = kept
    stores = ["--train", folder / "train.zarr", "--test", folder / "test.zarr"]
    np.savez(tmp_path / "order.npz", **dict(d, x_train=d["x_train"][::-1], y_train=d["y_train"][::-1]))
    np.savez(tmp_path / "scaled.npz", **dict(d, x_test=d["x_test"] * 255))
    np.savez(tmp_path / "nox.npz", y_train=d["y_train"], y_test=d["y_test"])
    np.savez(tmp_path / "xy.npz", x=d["x_train"], y=d["y_train"])        # evaluate's DATA
    np.savez(tmp_path / "ragged.npz", **dict(d, y_train=d["y_train"][:5]))
    np.savez(tmp_path / "one.npz", **dict(d, y_train=np.full(40, 3, np.uint8)))
    bad = d["x_test"].copy()
    bad[2, 0, 0, 0] = np.nan
    np.savez(tmp_path / "nan.npz", **dict(d, x_test=bad))
    np.save(tmp_path / "images.npy", d["x_test"])
    cases = [
        ((tmp_path / "order.npz", *stores), r"x_train \(40 images\) are not the images the train "
         r"store at .* was computed from \(40 images there; their sha256 differ"),
        ((tmp_path / "scaled.npz", *stores), r"x_test \(16 images\) are not the images the test store"),
        ((tmp_path / "nox.npz", *stores), r"holds \['y_train', 'y_test'\] but not x_train, x_test: "
         r"solve needs x_train, y_train and x_test.*kernels$"),
        ((tmp_path / "xy.npz", *stores), r"holds \['x', 'y'\] but not x_train, y_train, x_test: .*; "
         r"for stores of evaluate --store, cntk-engine preprocess DATA --preprocess P --n-train N "
         r"--n-test M --seed S \[--downsample F\] \(evaluate's options\) --out FILE writes"),
        ((tmp_path / "ragged.npz", *stores), r"DATA .*: y_train must be 1-D, one label per sample "
         r"\(40,\); got shape \(5,\)"),
        ((data, "--train", folder / "test.zarr", "--test", folder / "train.zarr"),
         r"given the other way round\?"),
        ((data, *stores, "--ridge", "-1"), r"--ridge must be 'auto' or a number >= 0; got '-1'"),
        ((data, *stores, "--predictions", tmp_path / "p.txt"), r"must end in \.npy"),
        ((data, *stores, "--predictions", folder / "train.zarr" / "p.npy"), r"is in --train"),
        ((data, *stores, "--predictions", tmp_path / "no" / "p.npy"), r"does not exist"),
        ((data, *stores, "--predictions", tmp_path / ("n" * 300 + ".npy")),
         r"--predictions '.*n\.npy': File name too long"),
        ((data, *stores, "--key", "nngp"), r"has no kernel array 'nngp'; it holds \['ntk'\]"),
        ((data, "--train", folder / "train.zarr", "--test", ""), r"--test '' is empty; give the "
         r"path of a Zarr store \(a folder\)"),
        ((data, "--train", tmp_path / "images.npy", "--test", folder / "test.zarr"),
         r"--train '.*images.npy' is a file; a Zarr store is a folder, as gram writes it"),
        ((data, "--train", folder / "train.zarr"), r"the following arguments are required: --test"),
        ((data, *stores, "--predictions", tmp_path / "same.npy", "--json", tmp_path / "same.npy"),
         r"--json '.*same.npy' is --predictions"),
        ((data, *stores, "--predictions", tmp_path / "images.npy"),
         r"exists and does not hold predictions \(a 1-D .npy array\); refusing to overwrite it"),
        ((tmp_path / "one.npz", *stores), r"DATA .*: y_train holds one class only \(3, 40 samples\): a classifier needs at least 2"),
        ((tmp_path / "nan.npz", *stores), r"DATA .*: NaN or Inf pixels in x_test image\(s\) at index \[2\]"),
    ]
    for argv, msg in cases:
        rc, o, e = run(capsys, "solve", *argv, "--predictions", tmp_path / "out.npy") \
            if "--predictions" not in map(str, argv) else run(capsys, "solve", *argv)
        assert rc == 2, (argv, o, e)
        assert len(e.strip().splitlines()) == 1 and __import__("re").search(msg, e), (argv, e)
    assert not (tmp_path / "out.npy").exists()
    assert sorted(os.listdir(tmp_path)) == ["images.npy", "nan.npz", "nox.npz", "one.npz",
                                            "order.npz", "ragged.npz", "scaled.npz", "xy.npz"]
    np.testing.assert_array_equal(np.load(tmp_path / "images.npy"), d["x_test"])
    # earlier predictions (one entry per test image) are overwritten, and it is said; a 1-D
    # file of another length (labels given by mistake) is not: it was replaced silently
    np.save(tmp_path / "labels.npy", np.arange(1000.0))
    rc, o, e = run(capsys, "solve", data, *stores, "--predictions", tmp_path / "labels.npy")
    assert rc == 2 and re.search(r"--predictions '.*labels.npy' exists and holds 1000 entries, not one "
                                 r"per test image of DATA \(16\): .*refusing to overwrite it", e), e
    assert np.array_equal(np.load(tmp_path / "labels.npy"), np.arange(1000.0))
    np.save(tmp_path / "scores.npy", np.zeros(16))          # the right length, not labels
    rc, o, e = run(capsys, "solve", data, *stores, "--predictions", tmp_path / "scores.npy")
    assert rc == 2 and "exists and holds float64 values, not labels of DATA's dtype (uint8)" in e, e
    np.save(tmp_path / "old.npy", np.zeros(16, np.uint8))
    rc, o, e = run(capsys, "solve", data, *stores, "--predictions", tmp_path / "old.npy")
    assert rc == 0 and "old.npy (replacing the earlier predictions there)" in o, (o, e)
    assert np.load(tmp_path / "old.npy").shape == (16,) and np.load(tmp_path / "old.npy").any()


def test_a_kernel_that_does_not_tell_the_images_apart_is_refused(kept, tmp_path, capsys):
    """A training Gram whose entries are all equal (--W-std 0 with a bias: a constant; all-zero
    images: 0) predicts one class for every image: refused, as evaluate refuses both, instead
    of a "ridge 1 x mean diag(K)" (of 0) and the accuracy of the first class."""
    _, _, d = kept
    zero = dict(d, x_train=np.zeros_like(d["x_train"]))
    for name, data, kw, value in (
            ("w0", d, dict(convention="neural_tangents", W_std=0.0, b_std=1.0), r"1\b"),
            ("zero", zero, {}, "0")):
        np.savez(tmp_path / f"{name}.npz", **data)
        gram(data["x_train"], depth=3, backend="numba", out=str(tmp_path / f"{name}_tr.zarr"), **kw)
        gram(data["x_test"], data["x_train"], depth=3, backend="numba",
             out=str(tmp_path / f"{name}_te.zarr"), **kw)
        rc, o, e = run(capsys, "solve", tmp_path / f"{name}.npz", "--train",
                       tmp_path / f"{name}_tr.zarr", "--test", tmp_path / f"{name}_te.zarr",
                       "--predictions", tmp_path / "p.npy")
        assert rc == 2 and __import__("re").search(
            rf"--train '.*{name}_tr.zarr': every entry of the training Gram is {value} .*predict "
            "one class for every image", e) and e.count("\n") == 1, e
        assert not (tmp_path / "p.npy").exists()


def test_predictions_are_not_left_without_their_results(kept, tmp_path, capsys, monkeypatch):
    """--json failing to be written (a full disk) leaves --predictions as it was: both files
    are written before either is moved into place, and no temporary file is left."""
    import errno
    from cntk_engine.cli import solve as solve_cli
    folder, data, _ = kept

    def full(rec):
        def write(f):
            raise OSError(errno.ENOSPC, "No space left on device")
        return write
    monkeypatch.setattr(solve_cli, "json_writer", full)
    np.save(tmp_path / "p.npy", np.full(16, 7, np.uint8))   # an earlier run's predictions
    rc, o, e = run(capsys, "solve", data, "--train", folder / "train.zarr", "--test",
                   folder / "test.zarr", "--predictions", tmp_path / "p.npy", "--json",
                   tmp_path / "r.json")
    assert rc == 2 and "--json" in e and "No space left on device" in e and "written" not in o, (o, e)
    assert os.listdir(tmp_path) == ["p.npy"] and np.array_equal(np.load(tmp_path / "p.npy"), np.full(16, 7, np.uint8))


def test_constant_entries_tells_a_constant_kernel_from_a_varying_one():
    K = np.full((70, 70), 2.5)
    assert solver.constant_entries(K) == 2.5 and solver.constant_entries(np.zeros((1, 1))) == 0.0
    K[40, 41] = K[41, 40] = 2.5000001          # the first row and the diagonal are constant
    assert solver.constant_entries(K) is None
    assert solver.constant_entries(np.eye(3)) is None


def test_device_cuda_without_a_gpu_is_refused_before_anything_is_read(kept, tmp_path, capsys,
                                                                      monkeypatch):
    """--device cuda where CuPy cannot compute on a GPU: one line naming the reason and the way
    out, before DATA or the stores are read; nothing written."""
    from cntk_engine import arrays
    folder, data, _ = kept
    why = arrays.cuda_unavailable_reason()
    if why is None:                      # a GPU is here: the test below runs instead
        why = "no CUDA device is visible"
        monkeypatch.setattr(arrays, "cuda_unavailable_reason", lambda: why)
    rc, o, e = run(capsys, "solve", tmp_path / "missing.npz", "--train", folder / "train.zarr",
                   "--test", folder / "test.zarr", "--device", "cuda", "--predictions",
                   tmp_path / "p.npy", "--json", tmp_path / "r.json")
    assert rc == 2 and e.strip() == f"cntk-engine: error: --device cuda: {why}; --device cpu " \
                                     "solves without a GPU", e
    assert os.listdir(tmp_path) == []
    rc, o, e = run(capsys, "solve", data, "--train", folder / "train.zarr", "--test",
                   folder / "test.zarr", "--device", "tpu")
    assert rc == 2 and "argument --device: invalid choice: 'tpu' (choose from " in e, e


@pytest.mark.gpu
def test_device_cuda_gives_the_cpus_figures(kept, tmp_path, capsys):
    """The solve on the GPU (CuPy, cuSOLVER): the CPU's ridge, leave-one-out accuracy, test
    accuracy and predictions, with --ridge auto and a given ridge."""
    from cntk_engine.arrays import cuda_unavailable_reason
    why = cuda_unavailable_reason()
    if why is not None:
        pytest.skip(f"the solver's GPU path cannot run here: {why}")
    folder, data, _ = kept
    stores = ["--train", folder / "train.zarr", "--test", folder / "test.zarr"]
    for ridge in ("auto", "0.01"):
        r = {}
        for device in ("cpu", "cuda"):
            rc, o, e = run(capsys, "solve", data, *stores, "--ridge", ridge, "--device", device,
                           "--predictions", tmp_path / f"{device}.npy", "--json",
                           tmp_path / f"{device}.json")
            assert rc == 0, e
            assert ("on the GPU (" in o) == (device == "cuda"), o
            r[device] = json.loads((tmp_path / f"{device}.json").read_text())
        assert r["cuda"]["device"] == "cuda" and r["cuda"]["gpu"] and r["cpu"]["gpu"] is None
        for k in ("accuracy", "loo_accuracy"):
            assert r["cuda"].get(k) == r["cpu"].get(k), (ridge, k, r["cuda"].get(k), r["cpu"].get(k))
        # the ridge chosen on the same grid; (g x scale) / scale with mean(diag K) summed in
        # another order on each device: equal within rounding
        for k in ("ridge_relative", "ridge_absolute"):
            assert r["cuda"][k] == pytest.approx(r["cpu"][k], rel=1e-12), (ridge, k)
        np.testing.assert_array_equal(np.load(tmp_path / "cuda.npy"), np.load(tmp_path / "cpu.npy"))
