"""``cntk-engine preprocess``: ZCA (or another preprocessing) fitted on x_train, written for gram
jobs; the chain preprocess -> gram (train, test x train) -> solver.load_train_test on real
CIFAR-10 images."""
import json
import os

import numpy as np
import pytest

from cntk_engine import cli
from cntk_engine.preprocess import preprocess

from conftest import load_real, run_cli


def run(capsys, *argv):
    return run_cli(capsys, *argv)


@pytest.fixture(scope="module")
def cifar():
    d = load_real("cifar10_jpeg_small.npz")
    return {"x_train": d["x_train"][:24], "y_train": d["y_train"][:24],
            "x_test": d["x_test"][:6], "y_test": d["y_test"][:6]}


def test_the_zca_fit_is_announced(tmp_path, cifar, capsys, caplog):
    """The fit (seconds at CIFAR's 3,072 values, more on a loaded machine) was a silent wait
    in evaluate and preprocess."""
    from cntk_engine import cli
    np.savez(tmp_path / "c.npz", **cifar)
    caplog.set_level("INFO", logger="cntk_engine")
    said = ("fitting the ZCA whitening on 24 training images of 192 values each (an "
            "eigendecomposition of a 192 x 192 matrix)")
    assert cli.main(["preprocess", str(tmp_path / "c.npz"), "--zca", "--downsample", "4",
                     "--out", str(tmp_path / "z.npz")]) == 0
    assert said in caplog.text
    caplog.clear()
    assert cli.main(["evaluate", str(tmp_path / "c.npz"), "--zca", "--downsample", "4", "--depth", "3",
                     "--n-train", "24", "--n-test", "6", "--backend", "numba", "--no-progress"]) == 0
    assert said in caplog.text
    caplog.clear()
    assert cli.main(["preprocess", str(tmp_path / "c.npz"), "--preprocess", "standardize",
                     "--out", str(tmp_path / "s.npz")]) == 0
    assert "ZCA" not in caplog.text
    capsys.readouterr()


def test_zca_for_gram_jobs_end_to_end(tmp_path, cifar, capsys, caplog):
    pytest.importorskip("zarr")
    from cntk_engine import solver
    np.savez(tmp_path / "c.npz", **cifar)
    out = tmp_path / "cz.npz"
    rc, o, e = run(capsys, "preprocess", tmp_path / "c.npz", "--zca", "--zca-reg", "0.2",
                   "--downsample", "4", "--out", out)
    assert rc == 0, e
    assert "x_train (24, 3, 8, 8), x_test (6, 3, 8, 8) float64 NCHW, zca (reg 0.2) after 4x4 " \
           "downsampling, fitted on x_train; copied y_train, y_test" in o
    assert f"--out test.zarr; then cntk-engine solve {out} --train train.zarr --test test.zarr" in o
    z = np.load(out)
    assert sorted(z.files) == ["preprocessing", "x_test", "x_train", "y_test", "y_train"]
    # the library's whitening of the same images, bit for bit; labels unchanged
    a, b = preprocess(cifar["x_train"], cifar["x_test"], "zca", 4, zca_reg=0.2, data_format="NHWC")
    np.testing.assert_array_equal(z["x_train"], np.moveaxis(a, -1, 1))     # read NHWC, written NCHW
    np.testing.assert_array_equal(z["x_test"], np.moveaxis(b, -1, 1))
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
    raw = preprocess(cifar["x_train"], None, "none", 4, data_format="NHWC")[0]
    np.save(tmp_path / "raw.npy", np.moveaxis(raw, -1, 1))
    assert run(capsys, "gram", f"{out}:x_test", "--x2", tmp_path / "raw.npy", "--out",
               tmp_path / "raw.zarr", *kw)[0] == 0
    with pytest.raises(ValueError, match="was not computed against the training images"):
        solver.load_train_test(tmp_path / "train.zarr", tmp_path / "raw.zarr")
    # evaluate on the whitened file: its default --preprocess standardize would be applied
    # again, and says so; --preprocess none takes the images as they are
    ev = ["evaluate", out, "--depth", "2", "--n-train", "8", "--n-test", "4", "--backend", "numba",
          "--no-progress"]
    said = "was written by cntk-engine preprocess (zca); --preprocess standardize is applied to " \
           "its images again: pass --preprocess none"
    caplog.clear()
    assert run(capsys, *ev)[0] == 0 and said in caplog.text, caplog.text
    caplog.clear()
    assert run(capsys, *ev, "--preprocess", "none")[0] == 0 and "cntk-engine preprocess" not in caplog.text


def test_evaluate_refuses_a_set_whitened_with_its_test_images(tmp_path, cifar, capsys):
    """An x, y archive preprocessed as one set (fitted on all of x) and then given to evaluate,
    which splits x: the test images it draws were in the fit.  Refused, naming both ways out;
    preprocess --n-train / --n-test (evaluate's split, fitted on its training part) is taken."""
    x = np.concatenate([cifar["x_train"], cifar["x_test"]])
    y = np.concatenate([cifar["y_train"], cifar["y_test"]])
    np.savez(tmp_path / "xy.npz", x=x, y=y)
    ev = ["--depth", "2", "--n-train", "8", "--n-test", "4", "--backend", "numba", "--no-progress",
          "--preprocess", "none"]
    for how in ("--zca", "--preprocess=standardize"):
        out = tmp_path / f"whole{how[-3:]}.npz"
        assert run(capsys, "preprocess", tmp_path / "xy.npz", how, "--out", out)[0] == 0
        rc, _, e = run(capsys, "evaluate", out, *ev)
        assert rc == 2 and len(e.strip().splitlines()) == 1, e
        assert "fitted on all of its x, so the test images evaluate would draw from x were part " \
               "of the fit" in e and "--n-train and --n-test" in e, e
    split = tmp_path / "split.npz"
    assert run(capsys, "preprocess", tmp_path / "xy.npz", "--zca", "--n-train", "8", "--n-test",
               "4", "--out", split)[0] == 0
    assert run(capsys, "evaluate", split, *ev)[0] == 0
    # scale fits nothing: its x may be split
    scaled = tmp_path / "scaled.npz"
    assert run(capsys, "preprocess", tmp_path / "xy.npz", "--preprocess=scale", "--out", scaled)[0] == 0
    assert run(capsys, "evaluate", scaled, *ev)[0] == 0


def test_integer_and_float_pixels_are_not_mixed(tmp_path, cifar, capsys):
    """uint8 training pixels (0..255) against float test pixels (0..1): every method refuses
    them (the transforming ones would apply one set's numbers to the other's units, none would
    compute kernels across the units), in the library and in evaluate, as preprocess refused
    them already; bool pixels count with the floats."""
    u8, f = cifar["x_train"], cifar["x_test"] / 255.0
    for how in ("scale", "standardize", "zca", "none"):
        with pytest.raises(ValueError, match=f"how='{how}' .*x_train is uint8 and x_test float64"):
            preprocess(u8, f, how, data_format="NHWC")
    preprocess(u8, u8, "none", data_format="NHWC")
    preprocess(f > 0.5, f, "zca", data_format="NHWC")         # bool 0/1 with floats 0..1
    np.savez(tmp_path / "mixed.npz", x_train=u8, y_train=cifar["y_train"], x_test=f,
             y_test=cifar["y_test"])
    for how, named in (("--zca", "--preprocess 'zca'"), ("--preprocess=none", "--preprocess 'none'")):
        rc, _, e = run(capsys, "evaluate", tmp_path / "mixed.npz", "--depth", "2", "--n-train", "8",
                       "--n-test", "4", "--backend", "numba", "--no-progress", how)
        assert rc == 2 and "mixed.npz" in e and "x_train is uint8 and x_test float64" in e, e
        assert named in e and "how=" not in e, e          # the option, as the user types it
    np.savez(tmp_path / "bools.npz", x_train=u8 > 128, x_test=f.astype(np.uint8))
    rc, _, e = run(capsys, "preprocess", tmp_path / "bools.npz", "--zca", "--out", tmp_path / "o.npz")
    assert rc == 2 and "x_train is bool and x_test uint8" in e, e


def test_a_constant_image_of_a_split_x_is_named_as_in_x(tmp_path, cifar, capsys):
    """x, y split as evaluate splits it (--n-train / --n-test): a constant test image is named
    where DATA holds it, x[i], as a test image (DATA has no x_test)."""
    x = np.concatenate([cifar["x_train"], cifar["x_test"]]).astype(np.float64)
    y = np.arange(len(x)) % 3
    np.savez(tmp_path / "xy.npz", x=x, y=y)
    from cntk_engine.cli.subsets import draw
    drawn = draw(str(tmp_path / "xy.npz"), 10, 10, 0)
    i = int(drawn.test_at[0])
    x[i] = x[drawn.train_at].mean(axis=(0, 1, 2))    # its channels' training means: constant after
    np.savez(tmp_path / "xy.npz", x=x, y=y)
    rc, _, e = run(capsys, "preprocess", tmp_path / "xy.npz", "--zca", "--n-train", "10", "--n-test",
                   "10", "--out", tmp_path / "o.npz")
    assert rc == 2 and f"--zca: DATA's test image(s) x[{i}] are constant" in e, e


def test_one_set_and_the_other_methods(tmp_path, cifar, capsys):
    np.savez(tmp_path / "x.npz", x=cifar["x_train"], note=np.arange(3))
    rc, o, e = run(capsys, "preprocess", tmp_path / "x.npz", "--preprocess", "standardize",
                   "--out", tmp_path / "s.npz")
    assert rc == 0, e
    assert "fitted on x; copied note" in o and "next: cntk-engine gram" in o and ":x " in o
    z = np.load(tmp_path / "s.npz")
    a, _ = preprocess(cifar["x_train"], None, "standardize", data_format="NHWC")
    np.testing.assert_array_equal(z["x"], np.moveaxis(a, -1, 1))
    np.testing.assert_array_equal(z["note"], np.arange(3))
    # (N, H, W) single-channel images; scale
    np.savez(tmp_path / "m.npz", x_train=np.full((3, 5, 5), 255, np.uint8), x_test=np.zeros((2, 5, 5), np.uint8))
    assert run(capsys, "preprocess", tmp_path / "m.npz", "--preprocess", "scale", "--out",
               tmp_path / "m1.npz")[0] == 0
    z = np.load(tmp_path / "m1.npz")
    assert z["x_train"].shape == (3, 1, 5, 5) and (z["x_train"] == 1).all() and (z["x_test"] == 0).all()
    rec = json.loads(str(z["preprocessing"]))
    assert rec["read_as"] == {"x_train": "(N, H, W): one channel", "x_test": "(N, H, W): one channel"}
    assert rec["fitted_on"] is None and rec["dtypes"] == {"x_train": "uint8", "x_test": "uint8"}
    assert rec["command"].startswith("cntk-engine -q preprocess ")


def test_every_other_member_is_copied_as_it_is(tmp_path, cifar, capsys):
    """Names np.savez would take as its own arguments (file, allow_pickle) included; a member
    that is not an array (a text file zipped in) is said and not copied."""
    import zipfile
    np.savez(tmp_path / "c.npz", x=cifar["x_test"], y=cifar["y_test"])
    with zipfile.ZipFile(tmp_path / "c.npz", "a") as z:
        for name, v in (("file", np.arange(2)), ("allow_pickle", np.ones(3))):
            with z.open(f"{name}.npy", "w") as m:
                np.lib.format.write_array(m, v)
        z.writestr("README.txt", b"notes")
    rc, o, e = run(capsys, "preprocess", tmp_path / "c.npz", "--preprocess", "none", "--out",
                   tmp_path / "o.npz")
    assert rc == 0, e
    assert "copied y, file, allow_pickle; not copied (not arrays): README.txt" in o
    z = np.load(tmp_path / "o.npz")
    assert sorted(z.files) == ["allow_pickle", "file", "preprocessing", "x", "y"]
    np.testing.assert_array_equal(z["file"], np.arange(2))
    np.testing.assert_array_equal(z["allow_pickle"], np.ones(3))
    np.testing.assert_array_equal(z["x"], cifar["x_test"].transpose(0, 3, 1, 2))


def test_sigterm_during_the_write_leaves_nothing(tmp_path, cifar, capsys, monkeypatch):
    import signal
    np.savez(tmp_path / "c.npz", **cifar)
    write = np.lib.format.write_array

    def killed(*a, **k):
        write(*a, **k)
        os.kill(os.getpid(), signal.SIGTERM)
    monkeypatch.setattr(np.lib.format, "write_array", killed)
    before = signal.getsignal(signal.SIGTERM)
    if before is not signal.SIG_DFL:
        pytest.skip("SIGTERM is handled here already: the command leaves it to that handler")
    # said as the command says a SIGTERM (it raised SystemExit out of main: helper-95)
    assert cli.main(["-q", "preprocess", str(tmp_path / "c.npz"), "--zca", "--out",
                     str(tmp_path / "o.npz")]) == 128 + signal.SIGTERM
    assert capsys.readouterr().err == "cntk-engine: terminated (SIGTERM)\n"
    assert sorted(os.listdir(tmp_path)) == ["c.npz"]
    assert signal.getsignal(signal.SIGTERM) is before


def test_bad_input_is_refused_before_anything_is_written(tmp_path, cifar, capsys):
    np.savez(tmp_path / "c.npz", **cifar)
    c = tmp_path / "c.npz"
    x = cifar["x_train"].astype(np.float64)
    x[3] = np.delete(x, 3, axis=0).mean(axis=(0, 1, 2))      # its channels' means: constant
    np.savez(tmp_path / "const.npz", x_train=x, x_test=cifar["x_test"].astype(np.float64))
    np.savez(tmp_path / "half.npz", x_train=cifar["x_train"])
    np.savez(tmp_path / "shapes.npz", x_train=cifar["x_train"], x_test=cifar["x_test"][:, :16])
    np.save(tmp_path / "a.npy", cifar["x_train"])
    np.savez(tmp_path / "three.npz", x=cifar["x_train"], x_train=cifar["x_train"], x_test=cifar["x_test"])
    np.savez(tmp_path / "mixed.npz", x_train=cifar["x_train"], x_test=cifar["x_test"] / 255)
    np.savez(tmp_path / "empty.npz")
    (tmp_path / "exists.npz").write_bytes(b"mine")
    cases = [
        ((c, "--out", tmp_path / "o.npz"), "one of the arguments --preprocess --zca is required"),
        ((c, "--zca", "--preprocess", "scale", "--out", tmp_path / "o.npz"), "not allowed with"),
        ((c, "--preprocess", "scale", "--zca-reg", "1", "--out", tmp_path / "o.npz"),
         "--zca-reg belongs to --zca"),
        ((c, "--zca", "--zca-reg", "-1", "--out", tmp_path / "o.npz"),
         r"--zca-reg must be a finite number >= 0"),
        ((c, "--zca", "--downsample", "0", "--out", tmp_path / "o.npz"), r"the downsampling factor \(--downsample\) must be an integer >= 1; got 0"),
        ((c, "--zca", "--out", tmp_path / "o.np"), "must end in .npz"),
        ((c, "--zca", "--out", tmp_path / "exists.npz"), "exists; refusing to overwrite it"),
        ((c, "--zca", "--out", c), "is DATA itself"),
        ((c, "--zca", "--out", tmp_path / "no" / "o.npz"), "the folder .* does not exist"),
        ((c, "--zca", "--out", tmp_path / ("n" * 300 + ".npz")), r"--out '.*n\.npz': File name too long"),
        ((tmp_path / "a.npy", "--zca", "--out", tmp_path / "o.npz"), "is a .npy array; preprocess needs an .npz"),
        ((tmp_path / "half.npz", "--zca", "--out", tmp_path / "o.npz"), "holds x_train but not x_test"),
        ((tmp_path / "shapes.npz", "--zca", "--out", tmp_path / "o.npz"),
         r"x_train and x_test hold images of different shapes, \(3, 32, 32\) and \(3, 16, 32\)"),
        ((tmp_path / "const.npz", "--zca", "--out", tmp_path / "o.npz"),
         r"--zca: DATA's training image\(s\) x_train\[3\] are constant.*use --preprocess standardize"),
        ((tmp_path / "none.npz", "--zca", "--out", tmp_path / "o.npz"), "does not exist"),
        ((tmp_path / "three.npz", "--zca", "--out", tmp_path / "o.npz"),
         "holds x besides x_train, x_test: which images are meant cannot be told"),
        ((tmp_path / "mixed.npz", "--zca", "--out", tmp_path / "o.npz"),
         "x_train is uint8 and x_test float64: give both as integers .* or both as floats"),
        ((tmp_path / "empty.npz", "--zca", "--out", tmp_path / "o.npz"),
         r"holds arrays \[\]; preprocess needs x_train and x_test, or x"),
    ]
    for argv, msg in cases:
        rc, o, e = run(capsys, "preprocess", *argv)
        assert rc == 2, (argv, o, e)
        assert len(e.strip().splitlines()) == 1 and __import__("re").search(msg, e), (argv, e)
    assert sorted(os.listdir(tmp_path)) == ["a.npy", "c.npz", "const.npz", "empty.npz",
                                            "exists.npz", "half.npz", "mixed.npz", "shapes.npz",
                                            "three.npz"]
    assert (tmp_path / "exists.npz").read_bytes() == b"mine"
    # its own output is not preprocessed again
    assert run(capsys, "preprocess", c, "--zca", "--out", tmp_path / "z.npz")[0] == 0
    rc, o, e = run(capsys, "preprocess", tmp_path / "z.npz", "--zca", "--out", tmp_path / "zz.npz")
    assert rc == 2 and "written by cntk-engine preprocess already" in e
    # a member of that name that is not its record: the clash named, not "written already"
    np.savez(tmp_path / "own.npz", **cifar, preprocessing=np.array("my notes"))
    rc, o, e = run(capsys, "preprocess", tmp_path / "own.npz", "--zca", "--out", tmp_path / "zz.npz")
    assert rc == 2 and "holds a member named 'preprocessing', the name of the record" in e, e


def test_an_interrupted_write_leaves_nothing(tmp_path, cifar, capsys, monkeypatch):
    np.savez(tmp_path / "c.npz", **cifar)

    def interrupted(*a, **k):
        raise KeyboardInterrupt
    monkeypatch.setattr(np.lib.format, "write_array", interrupted)
    rc, o, e = run(capsys, "preprocess", tmp_path / "c.npz", "--zca", "--out", tmp_path / "o.npz")
    assert rc == 130
    assert sorted(os.listdir(tmp_path)) == ["c.npz"]


def _gram_jobs_and_solve(capsys, tmp_path, out, kw):
    """The scale workflow after preprocess: the train Gram and test kernel of ``out`` into
    stores (gram options ``kw``), then solve; its output and --json record."""
    assert run(capsys, "gram", f"{out}:x_train", "--out", tmp_path / "train.zarr", *kw)[0] == 0
    assert run(capsys, "gram", f"{out}:x_test", "--x2", f"{out}:x_train", "--out",
               tmp_path / "test.zarr", *kw)[0] == 0
    rc, o, e = run(capsys, "solve", out, "--train", tmp_path / "train.zarr", "--test",
                   tmp_path / "test.zarr", "--json", tmp_path / "s.json")
    assert rc == 0, e
    return o, json.loads((tmp_path / "s.json").read_text())


def test_subsets_are_evaluates_and_so_are_the_figures(tmp_path, cifar, capsys):
    """--n-train / --n-test / --seed write the images evaluate draws with the same options, and
    the Gram jobs on them with solve give evaluate's figures."""
    pytest.importorskip("zarr")
    np.savez(tmp_path / "c.npz", **cifar, names=np.array(["a", "b"]))
    out = tmp_path / "s.npz"
    rc, o, e = run(capsys, "preprocess", tmp_path / "c.npz", "--zca", "--downsample", "4",
                   "--n-train", "10", "--n-test", "5", "--seed", "3", "--out", out)
    assert rc == 0, e
    assert ("x_train (10, 3, 8, 8), x_test (5, 3, 8, 8) float64 NCHW, zca (reg 0.1) after 4x4 "
            "downsampling, fitted on x_train; the images evaluate --n-train 10 --n-test 5 --seed 3 "
            "draws from DATA's x_train/x_test; copied y_train, y_test, index_train, index_test; "
            "not copied (their rows would not be the images'): names") in o, o
    rng = np.random.default_rng(3)
    i = np.sort(rng.choice(24, 10, replace=False))
    j = np.sort(rng.choice(6, 5, replace=False))
    z = np.load(out)
    assert sorted(z.files) == ["index_test", "index_train", "preprocessing", "x_test", "x_train",
                               "y_test", "y_train"]
    np.testing.assert_array_equal(z["index_train"], i)
    np.testing.assert_array_equal(z["index_test"], j)
    np.testing.assert_array_equal(z["y_train"], cifar["y_train"][i])
    np.testing.assert_array_equal(z["y_test"], cifar["y_test"][j])
    # fitted on the training subset, as evaluate fits it
    a, b = preprocess(cifar["x_train"][i], cifar["x_test"][j], "zca", 4, data_format="NHWC")
    np.testing.assert_array_equal(z["x_train"], np.moveaxis(a, -1, 1))
    np.testing.assert_array_equal(z["x_test"], np.moveaxis(b, -1, 1))
    rec = json.loads(str(z["preprocessing"]))
    assert rec["subset"] == {"n_train": 10, "n_test": 5, "seed": 3, "drawn_from": "x_train/x_test",
                             "as": "evaluate --n-train 10 --n-test 5 --seed 3"}
    kw = ["--depth", "3", "--backend", "numba", "--no-progress"]
    _, s = _gram_jobs_and_solve(capsys, tmp_path, out, kw)
    rc, o, e = run(capsys, "evaluate", tmp_path / "c.npz", "--zca", "--downsample", "4",
                   "--n-train", "10", "--n-test", "5", "--seed", "3", *kw, "--json",
                   tmp_path / "e.json")
    assert rc == 0, e
    ev = json.loads((tmp_path / "e.json").read_text())["results"][0]
    for k in ("accuracy", "ridge_relative", "loo_accuracy"):
        assert s[k] == ev[k], (k, s[k], ev[k])


def test_a_subset_of_one_set_and_of_a_split(tmp_path, cifar, capsys):
    """One of --n-train / --n-test left out: all of that set, in DATA's order; x, y is split as
    evaluate splits it, which needs both."""
    np.savez(tmp_path / "c.npz", **cifar)
    rc, o, e = run(capsys, "preprocess", tmp_path / "c.npz", "--preprocess", "none", "--n-train",
                   "7", "--out", tmp_path / "a.npz")
    assert rc == 0, e
    z = np.load(tmp_path / "a.npz")
    np.testing.assert_array_equal(z["index_test"], np.arange(6))
    np.testing.assert_array_equal(z["x_test"], cifar["x_test"].transpose(0, 3, 1, 2))
    assert len(z["index_train"]) == 7 and "--n-train 7 --n-test 6 --seed 0" in o
    np.savez(tmp_path / "xy.npz", x=cifar["x_train"], y=cifar["y_train"])
    rc, o, e = run(capsys, "preprocess", tmp_path / "xy.npz", "--preprocess", "none", "--n-train",
                   "9", "--n-test", "4", "--seed", "2", "--out", tmp_path / "b.npz")
    assert rc == 0, e
    assert "draws from DATA's x/y split" in o
    z = np.load(tmp_path / "b.npz")
    perm = np.random.default_rng(2).permutation(24)
    np.testing.assert_array_equal(z["index_train"], np.sort(perm[:9]))
    np.testing.assert_array_equal(z["index_test"], np.sort(perm[9:13]))
    np.testing.assert_array_equal(z["y_test"], cifar["y_train"][np.sort(perm[9:13])])
    np.testing.assert_array_equal(z["x_test"],
                                  cifar["x_train"][np.sort(perm[9:13])].transpose(0, 3, 1, 2))


def test_bad_subsets_are_refused_before_anything_is_written(tmp_path, cifar, capsys):
    np.savez(tmp_path / "c.npz", **cifar)
    c = tmp_path / "c.npz"
    np.savez(tmp_path / "unlabelled.npz", x_train=cifar["x_train"], x_test=cifar["x_test"])
    np.savez(tmp_path / "xy.npz", x=cifar["x_train"], y=cifar["y_train"])
    x = cifar["x_train"].astype(np.float64)
    drawn = np.sort(np.random.default_rng(0).choice(24, 20, replace=False))   # --n-train 20
    assert list(drawn[:5]) == [0, 2, 3, 4, 6]
    x[6] = x[drawn[drawn != 6]].mean(axis=(0, 1, 2))      # the subset's channel means: constant
    np.savez(tmp_path / "const.npz", x_train=x, y_train=cifar["y_train"],
             x_test=cifar["x_test"].astype(np.float64), y_test=cifar["y_test"])
    o = tmp_path / "o.npz"
    cases = [
        ((c, "--zca", "--seed", "1", "--out", o), "--seed 1 draws the subsets of --n-train / --n-test"),
        ((c, "--zca", "--n-train", "1", "--out", o), "--n-train must be at least 2; got 1"),
        ((c, "--zca", "--n-test", "0", "--out", o), "--n-test must be at least 1; got 0"),
        ((c, "--zca", "--n-train", "25", "--out", o), "--n-train 25 is more than the 24 images"),
        ((tmp_path / "unlabelled.npz", "--zca", "--n-train", "5", "--out", o),
         "holds x_train, x_test but not y_train, y_test; preprocess --n-train / --n-test needs all"),
        ((tmp_path / "xy.npz", "--zca", "--n-train", "5", "--out", o),
         "holds x, y: --n-train and --n-test split it into a training and a test set; give both"),
        # the constant image named where DATA holds it (x_train[6]), not by its place in the
        # subset (4: the draw leaves out 1 and 5)
        ((tmp_path / "const.npz", "--zca", "--n-train", "20", "--seed", "0", "--out", o),
         r"--zca: DATA's training image\(s\) x_train\[6\] are constant"),
    ]
    for argv, msg in cases:
        rc, out, e = run(capsys, "preprocess", *argv)
        assert rc == 2, (argv, out, e)
        assert len(e.strip().splitlines()) == 1 and __import__("re").search(msg, e), (argv, e)
    assert sorted(os.listdir(tmp_path)) == ["c.npz", "const.npz", "unlabelled.npz", "xy.npz"]


def test_augment_flips_is_evaluates_and_so_are_the_figures(tmp_path, cifar, capsys):
    """--augment-flips writes evaluate --augment-flips's training set (the images, then their
    flips, fitted on the images) with groups_train; solve's leave-one-out then leaves each image
    out with its flip, as evaluate's does, and gives its figures; gram --flip refuses the set."""
    pytest.importorskip("zarr")
    from cntk_engine.arch import hflip
    np.savez(tmp_path / "c.npz", **cifar, names=np.array(["a", "b"]))
    out = tmp_path / "f.npz"
    opts = ["--zca", "--downsample", "4", "--n-train", "10", "--n-test", "5", "--seed", "3"]
    rc, o, e = run(capsys, "preprocess", tmp_path / "c.npz", *opts, "--augment-flips", "--out", out)
    assert rc == 0, e
    assert ("x_train (20, 3, 8, 8), x_test (5, 3, 8, 8) float64 NCHW (x_train: 10 images, then "
            "their horizontal flips; groups_train pairs each with its flip), zca") in o, o
    assert ("repeated for the flips y_train, index_train; copied y_test, index_test;" in o
            and "(not --flip: " in o), o
    z = np.load(out)
    i = np.sort(np.random.default_rng(3).choice(24, 10, replace=False))
    a, b = preprocess(cifar["x_train"][i], cifar["x_test"][z["index_test"]], "zca", 4,
                      data_format="NHWC")
    a, b = np.moveaxis(a, -1, 1), np.moveaxis(b, -1, 1)       # read NHWC, written NCHW
    np.testing.assert_array_equal(z["x_train"], np.concatenate([a, hflip(a)]))
    np.testing.assert_array_equal(z["x_test"], b)
    np.testing.assert_array_equal(z["y_train"], np.tile(cifar["y_train"][i], 2))
    np.testing.assert_array_equal(z["index_train"], np.tile(i, 2))
    np.testing.assert_array_equal(z["groups_train"], np.tile(np.arange(10), 2))
    assert json.loads(str(z["preprocessing"]))["augment_flips"] is True
    kw = ["--depth", "3", "--backend", "numba", "--no-progress"]
    # the flip kernel on a set holding its flips: refused, as evaluate refuses both flags
    for argv in ([f"{out}:x_train"], [f"{out}:x_test", "--x2", f"{out}:x_train"]):
        rc, o, e = run(capsys, "gram", *argv, "--flip", "--out", tmp_path / "no.zarr", *kw)
        assert rc == 2 and ":x_train' holds its images' flips" in e and "--flip alone gives" in e, e
    assert not (tmp_path / "no.zarr").exists()
    o, s = _gram_jobs_and_solve(capsys, tmp_path, out, kw)
    assert "leaving out each of DATA's 10 groups_train together" in o, o
    rc, o, e = run(capsys, "evaluate", tmp_path / "c.npz", *opts, "--augment-flips", *kw, "--json",
                   tmp_path / "e.json")
    assert rc == 0, e
    ev = json.loads((tmp_path / "e.json").read_text())["results"][0]
    assert s["groups"] == "groups_train" and s["loo_groups"] == ev["loo_groups"] == 10
    for k in ("accuracy", "ridge_relative", "loo_accuracy"):
        assert s[k] == ev[k], (k, s[k], ev[k])
    # evaluate draws subsets of its own: not of a set holding its flips (mirrors split apart)
    rc, o, e = run(capsys, "evaluate", out, "--n-train", "4", "--n-test", "2", *kw)
    assert rc == 2 and "its x_train holds its images' flips (preprocess --augment-flips" in e, e
    # the flip kernel of a copy of that x_train (gram cannot tell): solve says so
    np.save(tmp_path / "xtr.npy", z["x_train"])
    assert run(capsys, "gram", tmp_path / "xtr.npy", "--flip", "--out", tmp_path / "ftr.zarr", *kw)[0] == 0
    assert run(capsys, "gram", f"{out}:x_test", "--x2", tmp_path / "xtr.npy", "--flip", "--out",
               tmp_path / "fte.zarr", *kw)[0] == 0
    rc, o, e = run(capsys, "solve", out, "--train", tmp_path / "ftr.zarr", "--test", tmp_path / "fte.zarr")
    assert rc == 0 and "warning: the kernels are flip-symmetrised and DATA's x_train holds" in e, e
    # its groups_train dropped: still a set holding its flips (the record says so), so gram
    # --flip and evaluate refuse it, and solve's leave-one-out, which would leave images out
    # alone (mirrors kept: a ridge near 0), too; a ridge given solves
    nogroups = tmp_path / "nogroups.npz"
    np.savez(nogroups, **{k: z[k] for k in z.files if k != "groups_train"})
    for argv, msg in [(["gram", f"{nogroups}:x_train", "--flip", "--out", tmp_path / "no.zarr", *kw],
                       ":x_train' holds its images' flips"),
                      (["evaluate", nogroups, "--n-train", "4", "--n-test", "2", *kw],
                       "its x_train holds its images' flips"),
                      (["solve", nogroups, "--train", tmp_path / "train.zarr", "--test",
                        tmp_path / "test.zarr"], "holds its images' flips (preprocess "
                       "--augment-flips) but not their groups_train: --ridge auto's")]:
        rc, o, e = run(capsys, *argv)
        assert rc == 2 and msg in e, (argv, e)
    rc, o, e = run(capsys, "solve", nogroups, "--train", tmp_path / "train.zarr", "--test",
                   tmp_path / "test.zarr", "--ridge", "0.1", "--json", tmp_path / "n.json")
    assert rc == 0, e
    assert json.loads((tmp_path / "n.json").read_text())["groups"] is None
    # groups_train of another length: named
    np.savez(tmp_path / "bad.npz", **{k: z[k] for k in z.files if k != "groups_train"},
             groups_train=np.arange(10))
    rc, o, e = run(capsys, "solve", tmp_path / "bad.npz", "--train", tmp_path / "train.zarr",
                   "--test", tmp_path / "test.zarr")
    assert rc == 2 and "groups_train, the leave-one-out groups of x_train: groups must be one " \
        "group label per training sample, shape (20,); got shape (10,)" in e, e


def test_augment_flips_of_every_image_and_what_it_refuses(tmp_path, cifar, capsys):
    """Without a subset: every training image and its flip; arrays that are not the labels are
    not copied (a row per training image would not be the doubled set's); x alone refused."""
    np.savez(tmp_path / "c.npz", **cifar, names=np.array(["a", "b"]))
    rc, o, e = run(capsys, "preprocess", tmp_path / "c.npz", "--preprocess", "none",
                   "--augment-flips", "--out", tmp_path / "a.npz")
    assert rc == 0, e
    assert "not copied (their rows would not be the images'): names" in o, o
    z = np.load(tmp_path / "a.npz")
    assert sorted(z.files) == ["groups_train", "preprocessing", "x_test", "x_train", "y_test", "y_train"]
    x = cifar["x_train"].transpose(0, 3, 1, 2)
    np.testing.assert_array_equal(z["x_train"], np.concatenate([x, x[..., ::-1]]))
    np.testing.assert_array_equal(z["y_test"], cifar["y_test"])
    # DATA's own groups: repeated, each flip in its image's group; and an archive holding
    # groups_train of its own is no flipped set (evaluate and gram --flip take it)
    groups = np.arange(24) // 4
    np.savez(tmp_path / "g.npz", **cifar, groups_train=groups)
    rc, o, e = run(capsys, "preprocess", tmp_path / "g.npz", "--preprocess", "none",
                   "--augment-flips", "--out", tmp_path / "ga.npz")
    assert rc == 0 and "DATA's groups_train, each flip in its image's group" in o, o
    assert "repeated for the flips y_train, groups_train; copied y_test" in o, o
    np.testing.assert_array_equal(np.load(tmp_path / "ga.npz")["groups_train"], np.tile(groups, 2))
    rc, o, e = run(capsys, "preprocess", tmp_path / "g.npz", "--preprocess", "none",
                   "--out", tmp_path / "gp.npz")
    assert rc == 0 and "copied y_train, y_test, groups_train" in o, o
    rc, o, e = run(capsys, "gram", f"{tmp_path / 'gp.npz'}:x_train", "--flip", "--depth", "3",
                   "--backend", "numba", "--no-progress", "--out", tmp_path / "g.zarr")
    assert rc == 0, e
    np.savez(tmp_path / "x.npz", x=cifar["x_train"])
    np.savez(tmp_path / "short.npz", **dict(cifar, y_train=cifar["y_train"][:5]))
    for data, msg in [("x.npz", "--augment-flips doubles a training set, x_train; DATA"),
                      ("short.npz", "y_train of shape (5,) is not one value per training image (24)")]:
        rc, o, e = run(capsys, "preprocess", tmp_path / data, "--preprocess", "none",
                       "--augment-flips", "--out", tmp_path / "o.npz")
        assert rc == 2 and msg in e, e
    assert not (tmp_path / "o.npz").exists()


def test_datas_groups_are_kept_by_subsets_and_left_out_together(tmp_path, cifar, capsys):
    """DATA's own groups_train: a subset keeps its drawn images' labels (repeated for their
    flips with --augment-flips), and evaluate leaves each group out together as solve does on
    the subset written, with and without --augment-flips; a draw within one group, or groups of
    another length, refused before anything is computed or written."""
    pytest.importorskip("zarr")
    groups = np.array([f"g{k // 3}" for k in range(24)])          # any labels: here strings
    np.savez(tmp_path / "c.npz", **cifar, groups_train=groups)
    opts = ["--preprocess", "none", "--downsample", "4", "--n-train", "12", "--n-test", "5",
            "--seed", "3"]
    kw = ["--depth", "3", "--backend", "numba", "--no-progress"]
    i = np.sort(np.random.default_rng(3).choice(24, 12, replace=False))
    n_groups = len(np.unique(groups[i]))
    assert 2 <= n_groups < 12                     # some drawn images share a group
    for flips in ([], ["--augment-flips"]):
        out = tmp_path / f"s{len(flips)}.npz"
        rc, o, e = run(capsys, "preprocess", tmp_path / "c.npz", *opts, *flips, "--out", out)
        assert rc == 0, e
        np.testing.assert_array_equal(np.load(out)["groups_train"],
                                      np.tile(groups[i], 2 if flips else 1))
        work = tmp_path / f"w{len(flips)}"
        work.mkdir()
        o, s = _gram_jobs_and_solve(capsys, work, out, kw)
        assert f"leaving out each of DATA's {n_groups} groups_train together" in o, o
        rc, o, e = run(capsys, "evaluate", tmp_path / "c.npz", *opts, *flips, *kw, "--json",
                       work / "e.json")
        assert rc == 0, e
        assert "each of DATA's groups_train left out together" in o, o
        assert (", each flip in its image's group;" in o) == bool(flips), o
        rec = json.loads((work / "e.json").read_text())
        ev = rec["results"][0]
        assert rec["groups"] == s["groups"] == "groups_train"
        assert s["loo_groups"] == ev["loo_groups"] == n_groups
        for k in ("accuracy", "ridge_relative", "loo_accuracy"):
            assert s[k] == ev[k], (k, s[k], ev[k])
    # without its groups, evaluate's leave-one-out is another: each image alone
    np.savez(tmp_path / "n.npz", **cifar)
    rc, o, e = run(capsys, "evaluate", tmp_path / "n.npz", *opts, *kw, "--json", tmp_path / "n.json")
    assert rc == 0 and "groups_train" not in o, o
    rec = json.loads((tmp_path / "n.json").read_text())
    assert rec["groups"] is None and rec["results"][0]["loo_groups"] in (None, 12)
    # a draw within one group; groups of another length
    one = np.where(np.arange(24) == 23, 1, 0)
    seed = next(s for s in range(100) if 23 not in np.random.default_rng(s).choice(24, 3, replace=False))
    np.savez(tmp_path / "one.npz", **cifar, groups_train=one)
    np.savez(tmp_path / "bad.npz", **cifar, groups_train=np.arange(10))
    np.savez(tmp_path / "xy.npz", x=cifar["x_train"], y=cifar["y_train"], groups_train=groups)
    for data, n, msg in [("one.npz", "3", "the 3 training images drawn from DATA "),
                         ("xy.npz", "12", "holds x, y and groups_train: groups_train labels the "
                                          "images of x_train"),
                         ("bad.npz", "12", "groups_train, the leave-one-out groups of x_train: "
                                           "groups must be one group label per training sample")]:
        for argv in (["preprocess", tmp_path / data, "--out", tmp_path / "o.npz"],
                     ["evaluate", tmp_path / data, *kw, "--store", tmp_path / "st"]):
            rc, o, e = run(capsys, *argv, "--preprocess", "none", "--n-train", n, "--n-test", "2",
                           "--seed", str(seed))
            assert rc == 2 and msg in e, e
    assert not (tmp_path / "o.npz").exists() and not (tmp_path / "st").exists()
