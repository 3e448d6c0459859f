"""``cntk-engine evaluate``: data layouts, agreement with gram + solver, JSON, one-line errors,
python -m, real MNIST / CIFAR subsets."""
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

gram = pytest.importorskip("cntk_engine.api", reason="cntk_engine.gram is not there yet").gram
from cntk_engine import cli, solver  # noqa: E402
from cntk_engine import preprocess as pre  # noqa: E402
from cntk_engine.cli import common  # noqa: E402
from cntk_engine.cli import evaluate as ev  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
DATA = Path(os.environ.get("CNTK_ENGINE_DATA", ROOT.parent / "shared" / "data"))


def stripes(n, rng, size=8):
    """Two classes: horizontal (0) or vertical (1) stripes at a random phase, plus noise."""
    y = rng.integers(0, 2, size=n)
    x = np.zeros((n, size, size))
    for i in range(n):
        line = (np.arange(size) + rng.integers(0, 2)) % 2
        x[i] = line[:, None] if y[i] == 0 else line[None, :]
    x += 0.3 * rng.normal(size=x.shape)
    return (x * 100 + 100).clip(0, 255).astype(np.uint8), y


@pytest.fixture
def xy_npz(tmp_path):
    rng = np.random.default_rng(1)
    x, y = stripes(40, rng)
    p = tmp_path / "xy.npz"
    np.savez(p, x=x, y=y)                     # 3-D (N, H, W) uint8
    return p, x, y


def main(capsys, *args):
    rc = cli.main(["evaluate", *map(str, args)])
    out, err = capsys.readouterr()
    return rc, out, err


BASE = ("--backend", "numba", "--no-progress")


def test_evaluate_matches_gram_and_solver(xy_npz, capsys, tmp_path):
    p, x, y = xy_npz
    js = tmp_path / "r.json"
    rc, out, err = main(capsys, p, "--depths", "2,3", "--n-train", 24, "--n-test", 12, "--seed", 5,
                        "--kernel", "both", "--json", js, *BASE)
    assert rc == 0, err
    assert "24 train / 12 test images, (C, H, W) = (1, 8, 8), 2 classes" in out
    assert out.count("test accuracy") == 4 and "LOO-selected" in out and "ridge 0 (paper solve)" in out
    rec = json.loads(js.read_text())
    assert rec["n_train"] == 24 and rec["depths"] == [2, 3] and rec["machine"]["cores"] >= 1
    # the same split and preprocessing by hand, then gram + solver
    perm = np.random.default_rng(5).permutation(40)
    i, j = np.sort(perm[:24]), np.sort(perm[24:36])
    a, b = x[i][:, None].astype(float), x[j][:, None].astype(float)
    m, s = a.mean(), a.std()
    a, b = (a - m) / s, (b - m) / s
    for r in rec["results"]:
        K = gram(a, depth=r["depth"], kernel=r["kernel"], backend="numba")
        Kt = gram(b, a, depth=r["depth"], kernel=r["kernel"], backend="numba")
        Y, classes = solver.paper_targets(y[i])
        sel = solver.select_ridge(K, Y, labels=np.searchsorted(classes, y[i]))
        assert r["ridge_relative"] == pytest.approx(sel.relative)
        pred = classes[solver.kernel_ridge(K, Y, Kt, sel.ridge).argmax(1)]
        assert r["accuracy"] == pytest.approx(np.mean(pred == y[j]))
        pred0 = classes[solver.kernel_ridge(K, Y, Kt, 0.0).argmax(1)]
        assert r["accuracy_ridge0"] == pytest.approx(np.mean(pred0 == y[j]))
    assert max(r["accuracy"] for r in rec["results"]) >= 0.75      # stripes are easy


def test_train_test_keys_nhwc_and_fixed_ridge(tmp_path, capsys):
    rng = np.random.default_rng(2)
    xa, ya = stripes(30, rng)
    xb, yb = stripes(20, rng)
    rgb = lambda v: np.repeat(v[..., None], 3, axis=3)            # noqa: E731  (N, H, W, 3)
    p = tmp_path / "tt.npz"
    np.savez(p, x_train=rgb(xa), y_train=ya, x_test=rgb(xb), y_test=yb[:, None])
    rc, out, err = main(capsys, p, "--depth", 3, "--n-train", 20, "--n-test", 10, "--ridge", "1e-3",
                        "--pooling", "flatten", *BASE)
    assert rc == 0, err
    assert "(x_train/x_test)" in out and "(C, H, W) = (3, 8, 8)" in out
    assert "ridge 0.001 x mean diag" in out and "LOO" not in out and out.count("test accuracy") == 1
    # the explicit layout gives the same figures; the wrong one is refused as a shape error
    rc2, out2, _ = main(capsys, p, "--depth", 3, "--n-train", 20, "--n-test", 10, "--ridge", "1e-3",
                        "--pooling", "flatten", "--data-format", "NHWC", *BASE)
    assert rc2 == 0 and out2.splitlines()[2] == out.splitlines()[2]
    rc3, _, err3 = main(capsys, p, "--depth", 3, "--n-train", 20, "--n-test", 10, "--ridge", "0",
                        "--downsample", 2, *BASE)
    assert rc3 == 0, err3


def test_downsampling_says_what_it_drops(xy_npz, capsys, tmp_path):
    """8 x 8 images downsampled 3x are the average of the first 6 x 6 pixels: said so."""
    p, _, _ = xy_npz
    rc, out, err = main(capsys, p, "--depth", 3, "--n-train", 20, "--n-test", 10, "--downsample", 3,
                        *BASE)
    assert rc == 0 and ("(C, H, W) = (1, 2, 2) (from (1, 8, 8), downsampled 3x, the last 2 rows "
                        "and 2 columns dropped)") in out, out + err
    rc, out, err = main(capsys, p, "--depth", 3, "--n-train", 20, "--n-test", 10, "--downsample", 2,
                        *BASE)
    assert rc == 0 and "(C, H, W) = (1, 4, 4) (from (1, 8, 8), downsampled 2x)," in out, out + err
    rc = cli.main(["preprocess", str(p), "--preprocess", "standardize", "--n-train", "20", "--n-test", "10",
                   "--downsample", "3",
                   "--out", str(tmp_path / "d.npz")])
    out = capsys.readouterr().out
    assert rc == 0 and ("standardize after 3x3 downsampling (the last 2 rows and 2 columns "
                        "dropped), fitted on x_train") in out, out


@pytest.mark.parametrize("make, args, msg", [
    (None, ("--depth", 3), "does not exist"),
    (lambda p: np.savez(p, images=np.zeros((4, 8, 8))), ("--depth", 3), "holds arrays ['images']; evaluate needs the keys"),
    (lambda p: np.savez(p, x=np.zeros((4, 8)), y=np.zeros(4)), ("--depth", 3), "x must be images"),
    (lambda p: np.savez(p, x=np.zeros((4, 8, 8)), y=np.zeros(3)), ("--depth", 3), "y must be one label per image (4,)"),
    (lambda p: np.savez(p, x=np.zeros((10, 8, 8)), y=np.arange(10) % 2), ("--depth", 3, "--n-train", 8, "--n-test", 5),
     "--n-train 8 + --n-test 5 is more than the 10 images"),
    # sizes never typed: the refusal says they are the defaults, and what fits
    (lambda p: np.savez(p, x=np.zeros((10, 8, 8)), y=np.arange(10) % 2), ("--depth", 3),
     "--n-train 1000 + --n-test 1 (1000: evaluate's default where not given) is more than the 10 images"),
    (lambda p: np.savez(p, x=np.zeros((10, 8, 8)), y=np.arange(10) % 2), ("--depth", 3, "--n-train", 10),
     "d.npz': give smaller ones"),
    (lambda p: np.savez(p, x_train=np.ones((10, 8, 8)), y_train=np.arange(10) % 2, x_test=np.ones((4, 8, 8)),
                        y_test=np.arange(4) % 2), ("--depth", 3, "--n-test", 4),
     "--n-train 1000 (evaluate's default where not given) is more than the 10 images"),
    (lambda p: np.savez(p, x_train=np.ones((10, 8, 8)), y_train=np.arange(10) % 2, x_test=np.ones((4, 8, 8)),
                        y_test=np.arange(4) % 2), ("--depth", 3, "--n-train", 12, "--n-test", 4),
     "--n-train 12 is more than the 10 images in DATA"),
    (lambda p: np.savez(p, x_train=np.ones((10, 8, 8)), y_train=np.arange(10) % 2, x_test=np.ones((4, 8, 8)),
                        y_test=np.arange(4) % 2), ("--depth", 3, "--n-train", 12, "--n-test", 4),
     "d.npz': give --n-train 10 or fewer"),
    (lambda p: np.savez(p, x=np.zeros((10, 3, 8, 3)), y=np.arange(10) % 2), ("--depth", 3, "--n-train", 5, "--n-test", 5),
     "cannot tell the layout of images of shape (3, 8, 3) (C, H, W or H, W, C); pass --data-format"),
    (lambda p: np.savez(p, x=np.zeros((10, 0, 0)), y=np.arange(10) % 2), ("--depth", 3, "--n-train", 5, "--n-test", 5),
     "x holds images of shape (0, 0), with no pixels"),
    # a given split that lacks a key is not quietly replaced by the x / y split beside it
    (lambda p: np.savez(p, x_train=np.ones((10, 8, 8)), y_train=np.arange(10) % 2, x=np.ones((10, 8, 8)),
                        y=np.arange(10) % 2), ("--depth", 3, "--n-train", 5, "--n-test", 5),
     "holds x_train, y_train but not x_test, y_test; evaluate needs all four keys"),
    # regression targets are not classes (each value would be one); checked before the kernels
    (lambda p: np.savez(p, x=np.ones((10, 8, 8)), y=np.arange(10) / 4), ("--depth", 3, "--n-train", 5, "--n-test", 5),
     "y must be class labels (integers, strings, bytes, or whole-number floats such as 3.0); got "
     "fractional numbers (0.25 the first) at index [1, 2, 3, 5, 6, 7, 9]: these look like regression targets"),
    (lambda p: np.savez(p, x_train=np.ones((10, 8, 8)), y_train=np.arange(10) % 2 + 0j, x_test=np.ones((4, 8, 8)),
                        y_test=np.arange(4) % 2), ("--depth", 3, "--n-train", 5, "--n-test", 4),
     "y_train must be class labels: integers, strings or bytes; got dtype complex128"),
    (lambda p: np.savez(p, x=np.ones((10, 8, 8)), y=np.arange(10) % 2),
     ("--depth", 3, "--n-train", 5, "--n-test", 5, "--convention", "neural_tangents", "--W-std", "0"),
     "--W-std 0 makes the kernel the same for every pair of images"),
    (lambda p: np.savez(p, x=np.zeros((10, 8, 8)), y=np.arange(10) % 2), ("--depth", 3, "--n-train", 5, "--n-test", 5, "--ridge", "-1"),
     "--ridge must be 'auto' or a number >= 0; got '-1'"),
    (lambda p: np.savez(p, x=np.zeros((10, 8, 8)), y=np.zeros(10)), ("--depth", 3, "--n-train", 5, "--n-test", 5),
     "hold one class only"),
    (lambda p: np.savez(p, x=np.zeros((10, 8, 8)), y=np.arange(10) % 2), ("--depth", 1, "--n-train", 5, "--n-test", 5), "depth"),
    (lambda p: np.save(p, np.zeros((4, 8, 8))), ("--depth", 3), "is a .npy array; evaluate needs a .npz archive"),
    (lambda p: p.write_text("not numpy"), ("--depth", 3),
     "is not a NumPy .npy/.npz file (it starts with b'not nu', text); accepted: an .npy array"),
])
def test_errors_are_one_line(tmp_path, capsys, make, args, msg):
    p = tmp_path / "d.npz"
    if make is not None:
        make(p)
        if not p.exists() and Path(str(p) + ".npy").exists():
            Path(str(p) + ".npy").rename(p)
    rc, out, err = main(capsys, p, *args, "--n-test" if "--n-test" not in args else "--seed",
                        1 if "--n-test" not in args else 0, *BASE)
    assert rc == 2
    assert msg in err, err
    assert err.count("\n") == 1 and "Traceback" not in err and err.startswith("cntk-engine: error:")


def test_python_m_and_parser(tmp_path):
    """``python -m cntk_engine evaluate`` is the CLI's evaluate (a full run through cli.main is
    tested above; here no kernel is computed, so the child process compiles nothing)."""
    r = subprocess.run([sys.executable, "-m", "cntk_engine", "evaluate", "--help"], cwd=tmp_path,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and r.stdout.startswith("usage: cntk-engine evaluate") and "--depths" in r.stdout
    r = subprocess.run([sys.executable, "-m", "cntk_engine", "evaluate", "/nonexistent.npz", "--depth", "2"],
                       cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert r.returncode == 2 and r.stderr.strip() == "cntk-engine: error: DATA '/nonexistent.npz' does not exist"
    assert "evaluate" in cli.build_parser().format_help()


def test_to_nchw_and_preprocess():
    x = np.arange(2 * 4 * 5 * 3).reshape(2, 4, 5, 3)
    assert common.to_nchw(x).shape == (2, 3, 4, 5)
    np.testing.assert_array_equal(common.to_nchw(x)[1, 2], x[1, :, :, 2])
    assert common.to_nchw(x.transpose(0, 3, 1, 2)).shape == (2, 3, 4, 5)
    assert common.to_nchw(np.zeros((2, 6, 7))).shape == (2, 1, 6, 7)
    a, b = pre.preprocess(np.full((3, 1, 4, 4), 255, np.uint8), np.zeros((1, 1, 4, 4), np.uint8), "scale")
    assert a.max() == 1.0 and b.max() == 0.0
    a, b = pre.preprocess(np.arange(2 * 2 * 4 * 4.0).reshape(2, 2, 4, 4), np.ones((1, 2, 4, 4)), "standardize", 2)
    assert a.shape == (2, 2, 2, 2)
    np.testing.assert_allclose(a.mean(axis=(0, 2, 3)), 0, atol=1e-12)
    np.testing.assert_allclose(a.std(axis=(0, 2, 3)), 1)


# ----------------------------------------------------------------------------- real data
def _real(name):
    p = DATA / name
    if not p.exists():
        pytest.skip(f"real data {p} not found (set CNTK_ENGINE_DATA to the folder holding it)")
    return p


def test_real_mnist_small(capsys, tmp_path):
    p = _real("mnist_test.npz")
    js = tmp_path / "m.json"
    rc, out, err = main(capsys, p, "--depth", 3, "--n-train", 100, "--n-test", 50, "--downsample", 4,
                        "--json", js, *BASE)
    assert rc == 0, err
    acc = json.loads(js.read_text())["results"][0]["accuracy"]
    assert acc >= 0.6, out                     # 7 x 7 digits, 100 training images; chance is 0.1


def test_real_cifar_small_flatten(capsys, tmp_path):
    p = _real("cifar10_jpeg_small.npz")
    js = tmp_path / "c.json"
    rc, out, err = main(capsys, p, "--depths", "3,6", "--pooling", "flatten", "--n-train", 100,
                        "--n-test", 50, "--downsample", 4, "--json", js, *BASE)
    assert rc == 0, err
    rec = json.loads(js.read_text())
    assert rec["image_shape"] == [3, 8, 8] and rec["raw_image_shape"] == [3, 32, 32]
    assert [r["depth"] for r in rec["results"]] == [3, 6]
    # above chance (10 classes): leave-one-out over the 100 training images measured 27% / 24%,
    # the 50 test images 16% / 18% (8 x 8 images, flatten); a broken kernel or split gives ~10%
    assert all(r["loo_accuracy"] >= 0.2 and r["accuracy"] >= 0.12 for r in rec["results"]), rec["results"]
    # the JSON holds every ridge's LOO score: the one chosen is the best of them
    for r in rec["results"]:
        g = r["loo_grid"]
        i = g["ridge_relative"].index(r["ridge_relative"])
        assert g["accuracy"][i] == r["loo_accuracy"] == max(a for a in g["accuracy"] if a is not None)
        assert 0 < g["s_max"] and g["tol"] < g["s_max"]


# ----------------------------------------------------------------------------- review fixes
REF = ("--backend", "reference", "--no-progress")


def test_one_nan_pixel_names_that_image_only(tmp_path, capsys):
    """Standardisation used to spread one NaN over every image, and all were reported."""
    x = np.random.default_rng(0).standard_normal((12, 8, 8))
    x[7, 3, 3] = np.nan
    x[9, 0, 0] = np.inf
    p = tmp_path / "nan.npz"
    np.savez(p, x=x, y=np.arange(12) % 2)
    rc, out, err = main(capsys, p, "--depth", 3, "--n-train", 4, "--n-test", 2, *REF)
    assert rc == 2 and err.count("\n") == 1 and err.startswith("cntk-engine: error:")
    assert f"DATA {str(p)!r}: x has NaN or Inf pixels in image(s) at index [7, 9] (positions in x)" in err, err


def test_a_store_refused_before_any_kernel_leaves_no_folder(tmp_path, capsys, xy_npz):
    """--lap-window larger than the 8 x 8 images is known only when the kernels are asked for,
    after --store's folder is made: the folder is removed again (it was left empty)."""
    p, _, _ = xy_npz
    rc, out, err = main(capsys, p, "--depth", 3, "--pooling", "lap", "--lap-window", 9,
                        "--n-train", 6, "--n-test", 4, "--store", tmp_path / "k", *REF)
    assert rc == 2 and "--lap-window 9 is larger than the images" in err, err
    assert not (tmp_path / "k").exists()


def test_images_the_kernels_cannot_take_are_named_where_they_are_in_data(tmp_path, capsys, monkeypatch):
    """A training or test image out of the kernels' range is named by its key and position in
    DATA (it was the position among the drawn images, as 'DATA[5]'), and either set is refused
    before any kernel is computed: the train Gram was computed (and stored) before the test
    images were checked, and the stored train.zarr then blocked the rerun."""
    rng = np.random.default_rng(0)
    x, y = rng.random((20, 1, 8, 8)), np.arange(20) % 2
    xt = rng.random((20, 1, 8, 8))
    tiny, huge = x.copy(), xt.copy()
    tiny[7] *= 1e-150
    huge[7] *= 1e150
    computed, real = [], ev.kernels
    monkeypatch.setattr(ev, "kernels", lambda *a, **k: computed.append(a[-2]) or real(*a, **k))
    for name, arrays, want in (("tiny.npz", dict(x_train=tiny, x_test=xt), "x_train[7] (max |pixel| about 2^-498)"),
                               ("huge.npz", dict(x_train=x, x_test=huge), "x_test[7] (max |pixel| about 2^499)")):
        p = tmp_path / name
        np.savez(p, y_train=y, y_test=y, **arrays)
        for flips in ([], ["--augment-flips"]):
            # 12 of 20 drawn with --seed 2: image 7 is drawn 6th (x_train) and 5th (x_test)
            rc, out, err = main(capsys, p, "--depth", 3, "--n-train", 12, "--n-test", 12, "--seed", 2,
                                "--preprocess", "none", "--store", tmp_path / "k", *flips, *REF)
            assert rc == 2 and err.startswith(f"cntk-engine: error: {want}"), err
            assert computed[-1] == "test" and "train" not in computed and not (tmp_path / "k").exists()


def test_a_kept_train_store_of_another_run_is_refused_before_any_work(xy_npz, capsys, tmp_path, monkeypatch):
    """A run stopped between the kernels keeps train.zarr alone: it is continued first, so that a
    train.zarr of another run is refused when opened, before the test kernel is computed (that
    kernel was computed and stored, then the refusal said 'Nothing was written')."""
    p, _, _ = xy_npz
    st = tmp_path / "k"
    args = (p, "--depth", 2, "--n-train", 8, "--n-test", 4, "--store", st, *REF)
    assert main(capsys, *args)[0] == 0
    import shutil
    shutil.rmtree(st / "test.zarr")
    computed, real = [], ev.kernels
    monkeypatch.setattr(ev, "kernels", lambda *a, **k: computed.append(a[-2]) or real(*a, **k))
    rc, out, err = main(capsys, *args, "--resume", "--seed", 1)
    assert rc == 2 and "train.zarr holds the kernels of another run" in err, err
    assert computed == ["train"] and sorted(f.name for f in st.iterdir()) == ["train.zarr"]
    rc, out, err = main(capsys, *args, "--resume")              # the same run: continued
    assert rc == 0 and computed[1:] == ["train", "test"], err
    rc, out, err = main(capsys, p, "--depth", 2, "--store", "", *REF)
    assert rc == 2 and "--store '' is empty" in err, err


def test_nan_labels_and_one_class_are_named_before_the_kernels(tmp_path, capsys, monkeypatch):
    import cntk_engine.api
    monkeypatch.setattr(cntk_engine.api, "gram", lambda *a, **k: pytest.fail("gram was called"))
    x = np.random.default_rng(2).random((12, 1, 6, 6))
    y = (np.arange(12) % 2).astype(float)
    y[[3, 9]] = np.nan
    np.savez(tmp_path / "nan.npz", x=x, y=y)
    rc, out, err = main(capsys, tmp_path / "nan.npz", "--depth", 3, "--n-train", 8, "--n-test", 4, *REF)
    assert rc == 2 and err.count("\n") == 1 and "y must be finite; got nan at index [3, 9] (labels are class names" in err
    np.savez(tmp_path / "one.npz", x=x, y=np.zeros(12, dtype=np.int64))
    rc, out, err = main(capsys, tmp_path / "one.npz", "--depth", 3, "--n-train", 8, "--n-test", 4, *REF)
    assert rc == 2 and "hold one class only (0)" in err and "np.int64" not in err, err


def test_labels_of_two_kinds_are_refused_before_the_kernels(tmp_path, capsys, monkeypatch):
    """y_train strings and y_test bytes printed "test accuracy 0.00%" with exit 0 ('a' != b'a')."""
    import cntk_engine.api
    monkeypatch.setattr(cntk_engine.api, "gram", lambda *a, **k: pytest.fail("gram was called"))
    x = np.random.default_rng(2).random((12, 1, 6, 6))
    y = np.array(list("ab" * 6))
    for yte, msg in ((y.astype(bytes), r"y_test holds bytes \(\|S1\) but the training labels strings"),
                     (np.arange(12) % 2, r"y_test holds numbers \(int64\) but the training labels strings")):
        np.savez(tmp_path / "mixed.npz", x_train=x, y_train=y, x_test=x, y_test=yte)
        rc, out, err = main(capsys, tmp_path / "mixed.npz", "--depth", 3, "--n-train", 8, "--n-test", 4, *REF)
        assert rc == 2 and err.count("\n") == 1 and re.search(msg, err), err


def test_unseen_test_classes_are_warned_about_once_before_the_kernels(tmp_path, capsys, caplog):
    """The warning came once per depth and kernel, after each kernel's work."""
    x = np.random.default_rng(2).random((12, 1, 6, 6))
    np.savez(tmp_path / "d.npz", x_train=x, y_train=np.arange(12) % 2, x_test=x[:4],
             y_test=np.array([0, 1, 7, 7]))
    caplog.set_level("WARNING", logger="cntk_engine")
    rc, out, err = main(capsys, tmp_path / "d.npz", "--depths", "2,3", "--kernel", "both",
                        "--n-train", 12, "--n-test", 4, *REF)
    assert rc == 0, err
    warned = [r for r in caplog.records if "classes the training labels do not hold" in r.getMessage()]
    assert len(warned) == 1 and "2 of the 4 test labels" in warned[0].getMessage()
    assert out.count("test accuracy") == 4


def test_corrupt_and_object_npz_name_file_and_key(tmp_path, capsys):
    x, y = np.zeros((12, 8, 8)), np.arange(12) % 2
    p = tmp_path / "crc.npz"
    np.savez(p, x=x, y=y)                     # stored uncompressed: flip one data byte -> bad CRC
    raw = bytearray(p.read_bytes())
    i = raw.index(b"\x00" * 64, 200)
    raw[i + 10] ^= 0xFF
    p.write_bytes(bytes(raw))
    rc, out, err = main(capsys, p, "--depth", 3, "--n-train", 4, "--n-test", 2, *REF)
    assert rc == 2 and "Traceback" not in err and err.count("\n") == 1, err
    assert f"DATA {str(p)!r}: array 'x' cannot be read (BadZipFile" in err, err
    q = tmp_path / "obj.npz"
    np.savez(q, x=x, y=np.array([None] * 12, dtype=object))
    rc, out, err = main(capsys, q, "--depth", 3, "--n-train", 4, "--n-test", 2, *REF)
    assert rc == 2 and f"DATA {str(q)!r}: array 'y' cannot be read" in err and "object array" in err, err
    assert "allow_pickle" not in err and "pickle.load" not in err


@pytest.mark.parametrize("args, msg", [
    (("--depth", 2, "--fix"), "--fix needs depth >= 3"),
    (("--depths", "3,2", "--fix", "--kernel", "nngp"), "--fix needs depth >= 3"),
    (("--depth", 3, "--json", "missing/r.json"), "the folder 'missing' does not exist"),
    (("--depth", 3, "--json", "."), "is a folder"),
    # the data file itself, a file in --store, a file that is not JSON, a device, '', a file's
    # "folder": refused, not overwritten (write_json replaces what is there)
    (("--depth", 3, "--json", "xy.npz"), "--json 'xy.npz' is DATA; give another path"),
    (("--depth", 3, "--store", "k", "--json", "k/r.json"), "--json 'k/r.json' is in --store"),
    (("--depth", 3, "--json", "notes.txt"), "exists and is not a result of cntk-engine (a JSON object "
     "with 'written_by'); refusing to overwrite it"),
    (("--depth", 3, "--json", "config.json"), "--json 'config.json' exists and is not a result of cntk-engine"),
    (("--depth", 3, "--json", "/dev/null"), "exists and is not a regular file"),
    (("--depth", 3, "--json", ""), "--json '' is empty"),
    (("--depth", 3, "--json", "-"), "--json '-': the JSON is written to a file, not to standard output"),
    (("--depth", 3, "--json", "notes.txt/r.json"), "'notes.txt' is a file, not a folder"),
    (("--depth", 3, "--resume"), "--resume continues the kernels kept in a --store DIR"),
    (("--depth", 3, "--store", "missing/k"), "the folder 'missing' does not exist"),
    (("--depth", 3, "--store", "xy.npz"), "exists and is not a folder"),
    (("--depth", 3, "--store", "xy.npz/k"), "'xy.npz' is a file, not a folder"),
    (("--depth", 3, "--store", "n" * 300), "--store '" + "n" * 300 + "': File name too long"),
    (("--depth", 3, "--json", "n" * 300 + "/r.json"), "File name too long"),
    (("--depth", 3, "--zca-reg", "0.5"), "--zca-reg belongs to --zca (--preprocess zca); got "
     "--preprocess standardize"),
])
def test_option_errors_before_any_work(tmp_path, capsys, monkeypatch, xy_npz, args, msg):
    """Checked first: a --json path in a missing folder used to fail after all the kernels."""
    import cntk_engine.api
    monkeypatch.setattr(cntk_engine.api, "gram", lambda *a, **k: pytest.fail("gram was called"))
    monkeypatch.setattr(ev, "load_data", lambda *a, **k: pytest.fail("data was loaded"))
    monkeypatch.chdir(tmp_path)
    p, _, _ = xy_npz
    (tmp_path / "notes.txt").write_text("my notes")
    (tmp_path / "config.json").write_text('{"my": "config"}')      # another tool's JSON
    rc, out, err = main(capsys, "xy.npz", *args, "--n-train", 4, "--n-test", 2, *REF)
    assert rc == 2 and msg in err and err.count("\n") == 1 and err.startswith("cntk-engine: error:"), err
    assert (tmp_path / "notes.txt").read_text() == "my notes" and not (tmp_path / "k").exists()
    assert (tmp_path / "config.json").read_text() == '{"my": "config"}'


def test_an_unusable_backend_is_refused_before_the_data_is_read(tmp_path, capsys, monkeypatch,
                                                                xy_npz):
    """--backend cuda where it cannot run failed after DATA was read and preprocessed (a minute
    on CIFAR-10 with --zca)."""
    from cntk_engine.backends import backend_class
    monkeypatch.setattr(backend_class("numba"), "unavailable_reason",
                        classmethod(lambda cls: "numba is switched off (test)"))
    monkeypatch.setattr(ev, "load_data", lambda *a, **k: pytest.fail("data was loaded"))
    p, _, _ = xy_npz
    rc, out, err = main(capsys, p, "--depth", 3, "--n-train", 4, "--n-test", 2,
                        "--backend", "numba", "--no-progress")
    assert rc == 2 and err.strip() == ("cntk-engine: error: --backend 'numba' is unavailable: numba "
                                       "is switched off (test)"), err


def test_json_record_is_complete_and_written_atomically(tmp_path, capsys, xy_npz, monkeypatch):
    p, _, _ = xy_npz
    js = tmp_path / "r.json"
    js.write_text('{"written_by": "cntk-engine 0.1.0", "old": 1}')     # an earlier result: overwritten
    argv = [str(p), "--depth", "3", "--n-train", "6", "--n-test", "4", "--kernel", "nngp",
            "--filter-size", "1", "--convention", "neural_tangents", "--W-std", "1.5", "--b-std",
            "0.1", "--tile", "4", "--data-format", "NCHW", "--json", str(js), *REF]
    rc, out, err = main(capsys, *argv)
    assert rc == 0, err
    rec = json.loads(js.read_text())
    assert {k: rec[k] for k in ("kernel", "filter_size", "W_std", "b_std", "data_format", "tile",
                                "convention", "fix", "depths")} == \
        dict(kernel="nngp", filter_size=1, W_std=1.5, b_std=0.1, data_format="NCHW", tile=4,
             convention="neural_tangents", fix=False, depths=[3])
    assert rec["command"] == "cntk-engine evaluate " + " ".join(argv)     # called from Python
    assert next(iter(rec)) == "written_by" and rec["written_by"] == f"cntk-engine {cli.__version__}"
    assert "old" not in rec
    assert sorted(f.name for f in tmp_path.iterdir()) == ["r.json", "xy.npz"]    # no temp file left
    # a failing write leaves the previous file whole and no temporary file behind
    monkeypatch.setattr(common.os, "replace", lambda *a: (_ for _ in ()).throw(OSError("disk full")))
    with pytest.raises(cli.CliError, match="cannot be written: disk full"):
        common.write_json(js, {"a": 1})
    assert json.loads(js.read_text()) == rec
    assert sorted(f.name for f in tmp_path.iterdir()) == ["r.json", "xy.npz"]
    # results from before written_by: evaluate's and solve's by their command (None from
    # Python), verify's by its keys; another tool's JSON is not one
    for text, ok in (('{"command": "cntk-engine solve d.npz", "version": "0.1.0"}', True),
                     ('{"command": null, "version": "0.1.0"}', True),
                     ('{"store": "g.zarr", "ok": false, "damaged": "x"}', True),
                     ('{"command": "make all", "version": "1"}', False), ('[1, 2]', False),
                     ('{"written_by": "another-tool 1.0"}', False)):
        js.write_text(text)
        assert common.is_result(js) is ok, text


def test_command_of_a_direct_run_call_is_equivalent():
    """``run(args)`` with a parsed Namespace (no argv): the equivalent command with every option."""
    argv = ["evaluate", "d.npz", "--depths", "3,4", "--fix", "--W-std", "2.0", "--json", "o.json"]
    args = cli.build_parser().parse_args(argv)
    cmd = ev._command_line(args)
    assert cmd.startswith("cntk-engine evaluate d.npz ") and "--fix" in cmd and "--depths 3,4" in cmd
    again = cli.build_parser().parse_args(cmd.split()[1:])
    assert vars(again) == vars(args)


def test_augment_flips_loo_leaves_each_image_out_with_its_flip(xy_npz, capsys, tmp_path, monkeypatch):
    """--augment-flips: the solver gets one group per training image (the image and its flipped
    copy), so leave-one-out never scores an image with its mirror still in the training set;
    the summary line names flip and the LAP window."""
    p, _, _ = xy_npz
    seen = []
    real = solver.evaluate_classifier

    def spy(K, Kt, ytr, yte, **kw):
        seen.append(kw.get("groups"))
        return real(K, Kt, ytr, yte, **kw)

    monkeypatch.setattr(solver, "evaluate_classifier", spy)
    js = tmp_path / "r.json"
    rc, out, err = main(capsys, p, "--depth", 3, "--n-train", 10, "--n-test", 4, "--augment-flips",
                        "--pooling", "lap", "--lap-window", 2, "--json", js, *BASE)
    assert rc == 0, err
    assert len(seen) == 1
    np.testing.assert_array_equal(seen[0], np.tile(np.arange(10), 2))
    assert "20 train (with their flips)" in out and "each image left out with its flip" in out
    assert "pooling lap (window 2), flip False, fix False" in out     # --flip with it is refused
    assert json.loads(js.read_text())["results"][0]["loo_groups"] == 10
    rc, out, err = main(capsys, p, "--depth", 3, "--n-train", 10, "--n-test", 4, *BASE)
    assert rc == 0 and seen[1] is None and "pooling gap, flip False" in out and "its flip" not in out
    rc, out, err = main(capsys, p, "--depth", 3, "--n-train", 10, "--n-test", 4, "--flip", *BASE)
    assert rc == 0 and seen[2] is None and "pooling gap, flip True" in out and "its flip" not in out


def test_zca_refuses_constant_images_in_one_line(tmp_path, capsys):
    rng = np.random.default_rng(3)
    x = rng.random((12, 1, 6, 6))
    x[[2, 7]] = 0.25                              # two blank training images
    p = tmp_path / "blank.npz"
    np.savez(p, x_train=x, y_train=np.arange(12) % 2, x_test=rng.random((4, 1, 6, 6)),
             y_test=np.arange(4) % 2)
    rc, out, err = main(capsys, p, "--depth", 3, "--zca", "--n-train", 12, "--n-test", 4, *BASE)
    assert rc == 2 and err.count("\n") == 1, err
    assert ("--zca: the training image(s) x_train[2], x_train[7] are constant" in err
            and "every one of DATA's training images is drawn, so no --seed helps" in err
            and "layer_norm" not in err), err
    rc, out, err = main(capsys, p, "--depth", 3, "--zca", "--n-train", 11, "--n-test", 4, *BASE)
    assert rc == 2 and "use another --seed, or --preprocess standardize" in err, err
    # named by their place in DATA, not among the images drawn (here the 2nd and 5th of 6)
    rc, out, err = main(capsys, p, "--depth", 3, "--zca", "--n-train", 6, "--n-test", 4, "--seed", 3, *BASE)
    drawn = np.sort(np.random.default_rng(3).choice(12, 6, replace=False))
    assert set(drawn) & {2, 7}, drawn
    assert rc == 2 and "--zca: the training image(s) " + ", ".join(
        f"x_train[{i}]" for i in drawn if i in (2, 7)) + " are constant" in err, err
    # every image constant: another --seed cannot help, and the message does not say it would
    np.savez(p, x_train=np.arange(12.0)[:, None, None, None] * np.ones((12, 1, 6, 6)),
             y_train=np.arange(12) % 2, x_test=rng.random((4, 1, 6, 6)), y_test=np.arange(4) % 2)
    rc, out, err = main(capsys, p, "--depth", 3, "--zca", "--n-train", 5, "--n-test", 4, *BASE)
    assert rc == 2 and err.count("\n") == 1 and "are constant" in err and (
        "all 5 are, so no --seed helps: use --preprocess standardize (it takes constant images), or "
        "check DATA") in err and "another --seed" not in err, err


def test_zca_and_preprocess_are_exclusive(capsys):
    """--zca is --preprocess zca: given with --preprocess the last one used to win silently."""
    for args in (("--zca", "--preprocess", "scale"), ("--preprocess", "none", "--zca")):
        with pytest.raises(SystemExit) as e:
            cli.main(["evaluate", "d.npz", "--depth", "3", *args])
        assert e.value.code == 2
        assert "not allowed with argument" in capsys.readouterr().err
    args = cli.build_parser().parse_args(["evaluate", "d.npz", "--depth", "3", "--zca"])
    cmd = ev._command_line(args)            # one of the two, so the command parses again
    assert "--preprocess zca" in cmd and "--zca " not in cmd + " "
    assert vars(cli.build_parser().parse_args(cmd.split()[1:])) == vars(args)


# ----------------------------------------------------------------------------- --store / --resume
RESULT_KEYS = ("depth", "kernel", "accuracy", "ridge_relative", "loo_accuracy", "accuracy_ridge0")


def _results(js):
    return [{k: r[k] for k in RESULT_KEYS} for r in json.loads(Path(js).read_text())["results"]]


def test_store_keeps_the_kernels_and_a_stopped_run_resumes(xy_npz, capsys, tmp_path):
    zarr = pytest.importorskip("zarr", reason="--store needs zarr (Python >= 3.11)")
    p, _, _ = xy_npz
    args = (p, "--depths", "2,3", "--n-train", 24, "--n-test", 12, "--seed", 5, "--kernel", "both",
            "--tile", 8, *BASE)
    rc, out, err = main(capsys, *args, "--json", tmp_path / "plain.json")
    assert rc == 0, err
    st = tmp_path / "kernels"
    rc, out, err = main(capsys, *args, "--store", st, "--json", tmp_path / "first.json")
    assert rc == 0, err
    # 24 x 24 in tiles of 8: 6 tiles on and above the diagonal; 12 x 24: 2 x 3 tiles
    assert f"store: {st}: train Gram 6 of 6 tiles computed, test kernel 6 of 6 tiles computed" in out
    assert _results(tmp_path / "first.json") == _results(tmp_path / "plain.json")   # bitwise kernels
    assert sorted(f.name for f in st.iterdir()) == ["test.zarr", "train.zarr"]
    assert sorted(zarr.open_group(str(st / "train.zarr")).array_keys()) == ["tiles_checksum", "tiles_done"]
    assert sorted(zarr.open_group(str(st / "train.zarr"))["depth_3"].array_keys()) == ["nngp", "ntk"]
    # forget three tiles, as if the run had been stopped before them
    for name, tiles in (("train.zarr", [(0, 1), (2, 2)]), ("test.zarr", [(1, 0)])):
        g = zarr.open_group(str(st / name), mode="r+")
        for i, j in tiles:
            g["tiles_done"][i, j] = 0
    rc, out, err = main(capsys, *args, "--store", st)       # without --resume: refused, untouched
    assert rc == 2 and "already holds train.zarr and test.zarr; pass --resume" in err, err
    assert err.count("\n") == 1
    assert zarr.open_group(str(st / "train.zarr"))["tiles_done"][0, 1] == 0
    js = tmp_path / "resumed.json"
    rc, out, err = main(capsys, *args, "--store", st, "--resume", "--json", js)
    assert rc == 0, err
    assert "train Gram 2 of 6 tiles computed, test kernel 1 of 6 tiles computed" in out
    assert "computed in this run" in out
    assert _results(js) == _results(tmp_path / "plain.json")
    rec = json.loads(js.read_text())
    assert rec["store"] == str(st) and rec["tiles"] == {"train": {"computed": 2, "total": 6},
                                                         "test": {"computed": 1, "total": 6}}
    assert rec["pairs"] == 24 * 25 // 2 + 12 * 24 and 0 < rec["pairs_computed"] < rec["pairs"]
    assert "--store" in rec["command"] and "--resume" in rec["command"]
    # the stores of another job (another seed: other images) are refused, naming the store
    other = [("6" if a == 5 else a) for a in args]
    rc, out, err = main(capsys, *other, "--store", st, "--resume")
    assert rc == 2 and "test.zarr holds the kernels of another run" in err, err   # computed first
    assert "the test images (sha256)" in err and "the training images (sha256)" in err and err.count("\n") == 1, err


def test_store_kernels_are_read_back_one_at_a_time(xy_npz, capsys, tmp_path, monkeypatch):
    """With --store, each (train Gram, test kernel) pair is read back just before its solve and
    dropped after it: every depth's and kernel's Gram was loaded before the first solve (8 Grams
    of 18.6 GiB at 50,000 training images with --kernel both and four depths)."""
    pytest.importorskip("zarr", reason="--store needs zarr (Python >= 3.11)")
    import cntk_engine.jobs.store as store_mod
    p, _, _ = xy_npz
    events, real_load, real_solve = [], store_mod.load_gram, solver.evaluate_classifier

    def load(group, name, *a, **k):
        events.append(("load", name))
        return real_load(group, name, *a, **k)

    def solve(K, Kt, *a, **k):
        events.append(("solve", K.shape, Kt.shape))
        return real_solve(K, Kt, *a, **k)

    monkeypatch.setattr(store_mod, "load_gram", load)
    monkeypatch.setattr(solver, "evaluate_classifier", solve)
    rc, out, err = main(capsys, p, "--depths", "2,3", "--n-train", 16, "--n-test", 8, "--kernel", "both",
                        "--store", tmp_path / "k", "--json", tmp_path / "r.json", *BASE)
    assert rc == 0, err
    assert [e[0] for e in events] == ["load", "load", "solve"] * 4, events
    assert [e[1] for e in events if e[0] == "load"] == [
        "depth_2/ntk", "depth_2/ntk", "depth_2/nngp", "depth_2/nngp",
        "depth_3/ntk", "depth_3/ntk", "depth_3/nngp", "depth_3/nngp"], events
    assert all(e[1:] == ((16, 16), (8, 16)) for e in events if e[0] == "solve")
    assert _results(tmp_path / "r.json") == _results_without_store(p, capsys, tmp_path)


def _results_without_store(p, capsys, tmp_path):
    rc, out, err = main(capsys, p, "--depths", "2,3", "--n-train", 16, "--n-test", 8, "--kernel", "both",
                        "--json", tmp_path / "plain.json", *BASE)
    assert rc == 0, err
    return _results(tmp_path / "plain.json")


def test_store_dir_holding_a_non_store_and_resume_of_nothing(xy_npz, capsys, tmp_path, monkeypatch):
    """--store DIR whose train.zarr is a file: refused as not a store, with or without --resume
    (which could not continue it), before any work; --resume on a DIR without stores notes that
    it starts them."""
    import cntk_engine.api
    p, _, _ = xy_npz
    d = tmp_path / "k"
    d.mkdir()
    (d / "train.zarr").write_text("x")
    real = cntk_engine.api.gram
    monkeypatch.setattr(cntk_engine.api, "gram", lambda *a, **k: pytest.fail("gram was called"))
    for extra in ((), ("--resume",)):
        rc, out, err = main(capsys, p, "--depth", 3, "--n-train", 4, "--n-test", 2, "--store", d, *extra, *REF)
        assert rc == 2 and err.count("\n") == 1, err
        assert f"{str(d / 'train.zarr')!r} exists and is not a Zarr (v3) store (a file)" in err
        assert "pass --resume" not in err and "choose another folder" in err
    monkeypatch.setattr(cntk_engine.api, "gram", real)
    rc, out, err = main(capsys, p, "--depth", 3, "--n-train", 4, "--n-test", 2, "--store",
                        tmp_path / "new", "--resume", *REF)
    assert rc == 0 and "note: --resume: no kernel stores in --store" in err, err
    assert "train Gram 1 of 1 tile computed" in out, out


def test_store_of_a_pooling_stack(tmp_path, capsys):
    """Myrtle-5 (a stack: one depth, its arrays at the top of the store), NTK only."""
    pytest.importorskip("zarr", reason="--store needs zarr (Python >= 3.11)")
    x, y = stripes(7, np.random.default_rng(3), size=32)
    p = tmp_path / "s.npz"
    np.savez(p, x=x, y=y)
    args = (p, "--architecture", "myrtle5", "--n-train", 4, "--n-test", 3, "--kernel", "ntk", *BASE)
    rc, out, err = main(capsys, *args, "--json", tmp_path / "plain.json")
    assert rc == 0, err
    rc, out, err = main(capsys, *args, "--store", tmp_path / "k", "--resume", "--json", tmp_path / "s.json")
    assert rc == 0, err                  # --resume on a folder that does not exist: starts it
    assert _results(tmp_path / "s.json") == _results(tmp_path / "plain.json")
    import zarr
    assert "ntk" in zarr.open_group(str(tmp_path / "k" / "test.zarr")).array_keys()


@pytest.mark.parametrize("factor, msg", [
    (0, "the downsampling factor (--downsample) must be an integer >= 1; got 0"),
    (99, "the downsampling factor (--downsample 99) is larger than the images"),
])
def test_downsample_errors_name_the_option(capsys, xy_npz, factor, msg):
    p, _, _ = xy_npz
    rc, out, err = main(capsys, p, "--depth", 2, "--n-train", 4, "--n-test", 2, "--downsample",
                        factor, *REF)
    assert rc == 2 and msg in err and err.count("\n") == 1, err


def test_a_store_of_another_run_is_refused_naming_store_and_why(tmp_path, capsys, xy_npz):
    p, _, _ = xy_npz
    st = tmp_path / "k"
    rc, out, err = main(capsys, p, "--depth", 2, "--n-train", 8, "--n-test", 4, "--store", st, *REF)
    assert rc == 0, err
    rc, out, err = main(capsys, p, "--depth", 2, "--n-train", 8, "--n-test", 4, "--store", st,
                        "--resume", "--seed", 1, *REF)
    assert rc == 2 and f"--store {str(st)!r}: test.zarr holds the kernels of another run: the test images (sha256)" in err
    assert "--seed" in err and "out=" not in err and err.count("\n") == 1, err
    rc, out, err = main(capsys, p, "--depth", 3, "--n-train", 8, "--n-test", 4, "--store", st,
                        "--resume", *REF)
    assert rc == 2 and "--depth: store has 2, this job 3" in err and "--seed" not in err


def test_a_negative_seed_is_an_argument_error(capsys, xy_npz):
    p, _, _ = xy_npz
    with pytest.raises(SystemExit) as e:
        main(capsys, p, "--depth", 2, "--seed", -1, *REF)
    assert e.value.code == 2 and "argument --seed: must be an integer >= 0; got '-1'" in capsys.readouterr().err


def test_ctrl_c_with_a_store_says_how_to_continue(tmp_path, capsys, xy_npz, monkeypatch):
    p, _, _ = xy_npz

    def interrupted(*a, **k):
        raise KeyboardInterrupt
    monkeypatch.setattr(ev, "kernels", interrupted)
    for store, hint in ((["--store", tmp_path / "k"], "kept in --store, rerun the same command with "
                         "--resume"), ([], None)):
        rc, out, err = main(capsys, p, "--depth", 3, "--n-train", 6, "--n-test", 4, *store, *REF)
        assert rc == 130 and err.startswith("cntk-engine: interrupted") and err.count("\n") == 1, err
        assert (hint in err) if hint else ("--resume" not in err), err


def test_the_report_line_says_when_the_ridge_0_solve_failed():
    from cntk_engine.cli.evaluate import _fmt_line
    r = dict(accuracy=0.5, ridge_relative=0.25, ridge_selected_by="loo", loo_accuracy=0.5,
             accuracy_ridge0=None, jitter_ridge0=None, ridge0_error="K + 0 I is not positive definite")
    line = _fmt_line(3, "ntk", r)
    assert "ridge 0.25 x mean diag" in line and "ridge 0 (paper solve): none, K is not positive" in line


def test_training_images_that_standardise_to_zero_are_refused_before_the_kernels(tmp_path, capsys,
                                                                                   monkeypatch):
    """Constant images standardise to 0: K = 0 printed a chance "accuracy" with exit 0."""
    import cntk_engine.api
    monkeypatch.setattr(cntk_engine.api, "gram", lambda *a, **k: pytest.fail("gram was called"))
    np.savez(tmp_path / "c.npz", x=np.full((30, 1, 6, 6), 0.5), y=np.arange(30) % 3)
    rc, out, err = main(capsys, tmp_path / "c.npz", "--depth", 3, "--n-train", 20, "--n-test", 10, *REF)
    assert rc == 2 and err.count("\n") == 1 and "every training image is 0 after --preprocess standardize" in err, err
