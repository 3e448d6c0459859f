"""``cntk-engine preprocess``: ZCA (or another preprocessing) fitted on x_train, written for gram
jobs; the chain preprocess -> gram (train, test x train) -> solver.load_train_test on real
CIFAR-10 images."""
import json
import os

import numpy as np
import pytest

from cntk_engine import cli
from cntk_engine.preprocess import preprocess

from conftest import load_real


def run(capsys, *argv):
    try:
        rc = cli.main(["-q", *map(str, argv)])
    except SystemExit as e:          # argparse's usage errors
        rc = e.code
    out, err = capsys.readouterr()
    return rc, out, err


@pytest.fixture(scope="module")
def cifar():
    d = load_real("cifar10_jpeg_small.npz")
    return {"x_train": d["x_train"][:24], "y_train": d["y_train"][:24],
            "x_test": d["x_test"][:6], "y_test": d["y_test"][:6]}


def test_zca_for_gram_jobs_end_to_end(tmp_path, cifar, capsys):
    pytest.importorskip("zarr")
    from cntk_engine import solver
    np.savez(tmp_path / "c.npz", **cifar)
    out = tmp_path / "cz.npz"
    rc, o, e = run(capsys, "preprocess", tmp_path / "c.npz", "--zca", "--zca-reg", "0.2",
                   "--downsample", "4", "--out", out)
    assert rc == 0, e
    assert "x_train (24, 3, 8, 8), x_test (6, 3, 8, 8) float64 NCHW, zca (reg 0.2) after 4x4 " \
           "downsampling, fitted on x_train; copied y_train, y_test" in o
    z = np.load(out)
    assert sorted(z.files) == ["preprocessing", "x_test", "x_train", "y_test", "y_train"]
    # the library's whitening of the same images, bit for bit; labels unchanged
    a, b = preprocess(cifar["x_train"], cifar["x_test"], "zca", 4, zca_reg=0.2, data_format="NHWC")
    np.testing.assert_array_equal(z["x_train"], a)
    np.testing.assert_array_equal(z["x_test"], b)
    np.testing.assert_array_equal(z["y_test"], cifar["y_test"])
    rec = json.loads(str(z["preprocessing"]))
    assert rec["preprocess"] == "zca" and rec["zca_reg"] == 0.2 and rec["downsample"] == 4
    assert rec["fitted_on"] == "x_train" and rec["read_as"] == {"x_train": "NHWC", "x_test": "NHWC"}
    # both kernels from the one file; the solver takes them as one model's
    kw = ["--depth", "3", "--backend", "numba", "--no-progress"]
    assert run(capsys, "gram", f"{out}:x_train", "--out", tmp_path / "train.zarr", *kw)[0] == 0
    assert run(capsys, "gram", f"{out}:x_test", "--x2", f"{out}:x_train", "--out",
               tmp_path / "test.zarr", *kw)[0] == 0
    K, K_test = solver.load_train_test(tmp_path / "train.zarr", tmp_path / "test.zarr")
    assert K.shape == (24, 24) and K_test.shape == (6, 24)
    # a test kernel against training images not whitened so (another fit: here, none) is refused
    np.save(tmp_path / "raw.npy", preprocess(cifar["x_train"], None, "none", 4, data_format="NHWC")[0])
    assert run(capsys, "gram", f"{out}:x_test", "--x2", tmp_path / "raw.npy", "--out",
               tmp_path / "raw.zarr", *kw)[0] == 0
    with pytest.raises(ValueError, match="was not computed against the training images"):
        solver.load_train_test(tmp_path / "train.zarr", tmp_path / "raw.zarr")


def test_one_set_and_the_other_methods(tmp_path, cifar, capsys):
    np.savez(tmp_path / "x.npz", x=cifar["x_train"], note=np.arange(3))
    rc, o, e = run(capsys, "preprocess", tmp_path / "x.npz", "--preprocess", "standardize",
                   "--out", tmp_path / "s.npz")
    assert rc == 0, e
    assert "fitted on x; copied note" in o and "next:" not in o
    z = np.load(tmp_path / "s.npz")
    a, _ = preprocess(cifar["x_train"], None, "standardize", data_format="NHWC")
    np.testing.assert_array_equal(z["x"], a)
    np.testing.assert_array_equal(z["note"], np.arange(3))
    # (N, H, W) single-channel images; scale
    np.savez(tmp_path / "m.npz", x_train=np.full((3, 5, 5), 255, np.uint8), x_test=np.zeros((2, 5, 5), np.uint8))
    assert run(capsys, "preprocess", tmp_path / "m.npz", "--preprocess", "scale", "--out",
               tmp_path / "m1.npz")[0] == 0
    z = np.load(tmp_path / "m1.npz")
    assert z["x_train"].shape == (3, 1, 5, 5) and (z["x_train"] == 1).all() and (z["x_test"] == 0).all()
    assert json.loads(str(z["preprocessing"]))["read_as"] == {"x_train": "(N, H, W): one channel",
                                                             "x_test": "(N, H, W): one channel"}


def test_bad_input_is_refused_before_anything_is_written(tmp_path, cifar, capsys):
    np.savez(tmp_path / "c.npz", **cifar)
    c = tmp_path / "c.npz"
    x = cifar["x_train"].astype(np.float64)
    x[3] = np.delete(x, 3, axis=0).mean(axis=(0, 1, 2))      # its channels' means: constant
    np.savez(tmp_path / "const.npz", x_train=x, x_test=cifar["x_test"])
    np.savez(tmp_path / "half.npz", x_train=cifar["x_train"])
    np.savez(tmp_path / "shapes.npz", x_train=cifar["x_train"], x_test=cifar["x_test"][:, :16])
    np.save(tmp_path / "a.npy", cifar["x_train"])
    (tmp_path / "exists.npz").write_bytes(b"mine")
    cases = [
        ((c, "--out", tmp_path / "o.npz"), "one of the arguments --preprocess --zca is required"),
        ((c, "--zca", "--preprocess", "scale", "--out", tmp_path / "o.npz"), "not allowed with"),
        ((c, "--preprocess", "scale", "--zca-reg", "1", "--out", tmp_path / "o.npz"),
         "--zca-reg belongs to --zca"),
        ((c, "--zca", "--zca-reg", "-1", "--out", tmp_path / "o.npz"),
         r"--zca-reg must be a finite number >= 0"),
        ((c, "--zca", "--downsample", "0", "--out", tmp_path / "o.npz"), "--downsample must be an integer >= 1"),
        ((c, "--zca", "--out", tmp_path / "o.np"), "must end in .npz"),
        ((c, "--zca", "--out", tmp_path / "exists.npz"), "exists; refusing to overwrite it"),
        ((c, "--zca", "--out", c), "is DATA itself"),
        ((c, "--zca", "--out", tmp_path / "no" / "o.npz"), "the folder .* does not exist"),
        ((tmp_path / "a.npy", "--zca", "--out", tmp_path / "o.npz"), "is a .npy array; preprocess needs an .npz"),
        ((tmp_path / "half.npz", "--zca", "--out", tmp_path / "o.npz"), "holds x_train but not x_test"),
        ((tmp_path / "shapes.npz", "--zca", "--out", tmp_path / "o.npz"),
         r"x_train and x_test hold images of different shapes, \(3, 32, 32\) and \(3, 16, 32\)"),
        ((tmp_path / "const.npz", "--zca", "--out", tmp_path / "o.npz"),
         r"--zca: DATA's x_train image\(s\) x_train\[3\] are constant.*use --preprocess standardize"),
        ((tmp_path / "none.npz", "--zca", "--out", tmp_path / "o.npz"), "does not exist"),
    ]
    for argv, msg in cases:
        rc, o, e = run(capsys, "preprocess", *argv)
        assert rc == 2, (argv, o, e)
        assert len(e.strip().splitlines()) == 1 and __import__("re").search(msg, e), (argv, e)
    assert sorted(os.listdir(tmp_path)) == ["a.npy", "c.npz", "const.npz", "exists.npz",
                                            "half.npz", "shapes.npz"]
    assert (tmp_path / "exists.npz").read_bytes() == b"mine"
    # its own output is not preprocessed again
    assert run(capsys, "preprocess", c, "--zca", "--out", tmp_path / "z.npz")[0] == 0
    rc, o, e = run(capsys, "preprocess", tmp_path / "z.npz", "--zca", "--out", tmp_path / "zz.npz")
    assert rc == 2 and "written by cntk-engine preprocess already" in e


def test_an_interrupted_write_leaves_nothing(tmp_path, cifar, capsys, monkeypatch):
    np.savez(tmp_path / "c.npz", **cifar)

    def interrupted(*a, **k):
        raise KeyboardInterrupt
    monkeypatch.setattr(np, "savez", interrupted)
    rc, o, e = run(capsys, "preprocess", tmp_path / "c.npz", "--zca", "--out", tmp_path / "o.npz")
    assert rc == 130
    assert sorted(os.listdir(tmp_path)) == ["c.npz"]
