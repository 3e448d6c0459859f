"""Argument validation of ``gram`` and the architecture: fix=True at depth 2, NumPy scalars as
arguments, dtype, the NHWC hint, images too large for float32.  Tiny inputs, reference backend."""
import json
import warnings

import numpy as np
import pytest

import cntk_engine as ce
from cntk_engine import cli
from cntk_engine.arch import make_architecture
from cntk_engine.inputs import as_images, check_dtype, check_magnitude, check_tile

REF = dict(backend="reference")


@pytest.fixture
def x():
    return np.random.default_rng(0).standard_normal((3, 1, 4, 4))


# ----------------------------------------------------------------------------- fix=True, depth 2
@pytest.mark.parametrize("kw", [dict(depth=2), dict(depths=[2, 3]), dict(depths=[4, 2]),
                                dict(depth=2, kernel="nngp"), dict(depth=2, kernel="both")])
def test_fix_needs_depth_3(x, kw):
    """At depth 2 the only conv layer is the first: fix=True trained nothing (an all-zero NTK)."""
    with pytest.raises(ValueError, match=r"fix=True needs depth >= 3.*NTK would be identically 0.*"
                                         r"kernel='nngp' does not depend on fix"):
        ce.gram(x, fix=True, **REF, **kw)


def test_fix_at_depth_3_and_nngp_independent_of_fix(x):
    ntk = ce.gram(x, depth=3, fix=True, **REF)
    assert np.abs(ntk).max() > 0
    a = ce.gram(x, depth=3, fix=True, kernel="nngp", **REF)
    np.testing.assert_array_equal(a, ce.gram(x, depth=3, fix=False, kernel="nngp", **REF))
    assert make_architecture(depths=[3, 5], fix=True).fix is True


# ----------------------------------------------------------------------------- NumPy scalars
def test_depth_as_numpy_array(x):
    """Used to compute everything, then fail with TypeError: unhashable type at kernels[depth]."""
    ref = ce.gram(x, depth=3, **REF)
    np.testing.assert_array_equal(ce.gram(x, depth=np.array(3), **REF), ref)
    np.testing.assert_array_equal(ce.gram(x, depth=np.int64(3), **REF), ref)


def test_numpy_scalars_are_accepted_as_python_numbers(x):
    """np.arange / np.array grids (GridSearchCV) give NumPy scalars: same results, same record."""
    kw = dict(depth=3, convention="neural_tangents", W_std=1.5, b_std=0.25, filter_size=3,
              fix=False, tile=2)
    nkw = dict(depth=np.int32(3), convention="neural_tangents", W_std=np.float32(1.5),
               b_std=np.float64(0.25), filter_size=np.int64(3), fix=np.bool_(False),
               tile=np.int64(2))
    ref, info = ce.gram(x, return_info=True, **kw, **REF)
    with warnings.catch_warnings():     # np.float32 against the bound: no overflow in a cast
        warnings.simplefilter("error")
        got, ninfo = ce.gram(x, return_info=np.True_, progress=np.False_, **nkw, **REF)
    np.testing.assert_array_equal(got, ref)
    assert ninfo["tile"] == info["tile"] == 2
    arch = make_architecture(depth=nkw["depth"], fix=np.bool_(True),
                             **{k: nkw[k] for k in ("convention", "W_std", "b_std", "filter_size")})
    d = arch.to_dict()
    assert d == {"depths": [3], "pooling": "gap", "fix": True, "convention": "neural_tangents",
                 "W_std": 1.5, "b_std": 0.25, "filter_size": 3}
    assert [type(v) for v in (arch.depths[0], arch.filter_size, arch.fix, arch.W_std, arch.b_std)] == \
        [int, int, bool, float, float]
    json.dumps(d)                                   # plain Python types, as a job record needs


@pytest.mark.parametrize("kw, msg", [
    (dict(filter_size=True), "filter_size must be a positive odd integer"),
    (dict(filter_size=np.float64(3.0)), "filter_size must be a positive odd integer"),
    (dict(filter_size=np.int64(4)), "filter_size must be a positive odd integer"),
    (dict(fix=1), "fix must be True or False"),
    (dict(depth=np.True_), "depth must be an integer >= 2"),
    (dict(depth=np.float64(3)), "depth must be an integer >= 2"),
    (dict(convention="neural_tangents", W_std=True), "W_std must be a finite number >= 0"),
    (dict(convention="neural_tangents", b_std=np.float32("nan")), "b_std must be a finite number >= 0"),
    (dict(tile=True), "tile must be a positive integer"),
    (dict(depth=None, architecture="Myrtle-5"), r"architecture must be 'cnn', one of \['myrtle10', "
     r"'myrtle5', 'myrtle7'\] or a stack from cntk_engine.serial\(...\); got 'Myrtle-5' \(did you mean 'myrtle5'\?\)$"),
    (dict(architecture="ResNet"), r"got 'ResNet'$"),
    (dict(depth=None, architecture="myrtl5"), r"got 'myrtl5' \(did you mean 'myrtle5'\?\)$"),     # one letter off
    (dict(kernel="NTK"), r"got 'NTK' \(did you mean 'ntk'\?\)$"),
    (dict(tile=np.True_), "tile must be a positive integer"),
    (dict(tile=np.int64(0)), "tile must be a positive integer"),
    (dict(tile=2.0), "tile must be a positive integer"),
    (dict(depth=None, depths=np.array(3)), r"depths must be a list of integers >= 2; got array\(3\) \(depth=3 for one depth\)"),
    (dict(depth=None, depths=3), r"depths must be a list of integers >= 2; got 3 \(depth=3 for one depth\)$"),
    (dict(depth=None, depths=1), r"depths must be a list of integers >= 2; got 1$"),
    (dict(kernel=np.array("ntk")), r"kernel must be one of \('ntk', 'nngp', 'both'\); got array\('ntk'"),
    (dict(return_info=1), "return_info must be True or False"),
])
def test_bad_scalars_are_still_refused(x, kw, msg):
    kw = {"depth": 3, **kw}
    with pytest.raises(ValueError, match=msg):
        ce.gram(x, **REF, **kw)


def test_check_tile():
    assert check_tile(None) is None
    assert check_tile(np.uint8(5)) == 5 and type(check_tile(np.uint8(5))) is int


# ----------------------------------------------------------------------------- dtype, NHWC hint
@pytest.mark.parametrize("bad", [None, [1], "float16", np.int32, "f4", 32, True])
def test_check_dtype_refuses_clearly(bad):
    with pytest.raises(ValueError, match=r"dtype must be one of \('float32', 'float64'\)"):
        check_dtype(bad)


def test_check_dtype_accepts():
    for ok, want in (("float32", np.float32), ("float64", np.float64), (np.float32, np.float32),
                     (np.dtype("float64"), np.float64), (float, np.float64)):
        assert check_dtype(ok) == np.dtype(want)
    with pytest.raises(ValueError, match="dtype must be one of"):
        ce.gram(np.ones((1, 1, 3, 3)), depth=2, dtype=None, **REF)


def test_three_d_hint_follows_data_format():
    with pytest.raises(ValueError, match=r"x\[:, None\] for NCHW"):
        as_images(np.ones((2, 4, 4)), "NCHW")
    with pytest.raises(ValueError, match=r"x\[\.\.\., None\] for NHWC") as e:
        as_images(np.ones((2, 4, 4)), "NHWC")
    assert "x[:, None]" not in str(e.value)


# ----------------------------------------------------------------------------- float32 overflow
def _arch(**kw):
    arch = make_architecture(**{"depth": 3, **kw})
    return arch, arch.layer_params(3, 8, 8)


def test_check_magnitude():
    """|pixel| ~ 4e18 gave NaN on numba float32 (the first layer's C k^2 x^2 overflows)."""
    big = np.full((2, 3, 8, 8), 4e18)
    arch, params = _arch()
    with pytest.raises(ValueError, match=r"too large for dtype='float32'.*max \|pixel\| 4e\+18"
                                         r".*use dtype='float64', or rescale the images"):
        check_magnitude(big, None, arch, params, np.float32)
    check_magnitude(big, None, arch, params, np.float64)
    small = np.full((2, 3, 8, 8), 255.0)
    check_magnitude(small, None, arch, params, np.float32)
    check_magnitude(small, small * 1e5, arch, params, np.float32)         # 2.55e7: still fine
    with pytest.raises(ValueError, match="too large"):
        check_magnitude(small, small * 1e8, arch, params, np.float32)     # x2 counts too
    with pytest.raises(ValueError, match=r"too large for dtype='float64'.*rescale the images"):
        check_magnitude(np.full((1, 3, 8, 8), 1e160), None, arch, params, np.float64)
    # the weights count: a large W_std overflows at pixels that are fine by default
    arch, params = _arch(depth=21, convention="neural_tangents", W_std=100.0)
    with pytest.raises(ValueError, match="too large"):
        check_magnitude(small, None, arch, params, np.float32)


def test_huge_pixels_are_scaled_without_biases_and_refused_with_biases():
    """Without biases each image is computed scaled by a power of two (``prepare_magnitudes``),
    so 4e18 pixels, which overflowed float32 before, are exact; with biases nothing is scaled
    and ``check_magnitude`` refuses them, naming b_std in the remedy."""
    x = np.full((2, 1, 4, 4), 4e18)
    x[1, 0, 0, 0] = -1e18
    k32 = ce.gram(x, depth=2, dtype="float32", backend="numba")
    k64 = ce.gram(x, depth=2, dtype="float64", **REF)
    assert np.isfinite(k32).all() and np.abs(k32 - k64).max() <= 1e-4 * np.abs(k64).max()
    nt = dict(convention="neural_tangents", b_std=0.5)
    with pytest.raises(ValueError, match=r"too large for dtype='float32'.*b_std=0\.5.*rescale the "
                                         r"images.* and b_std by the same factor"):
        ce.gram(x, depth=2, dtype="float32", backend="numba", **nt)
    assert np.isfinite(ce.gram(x, depth=2, dtype="float64", **nt, **REF)).all()


def test_the_reference_is_checked_and_reported_in_the_float64_it_computes_in():
    """The reference computes in float64 whatever dtype says: its checks and info say float64
    (a float32 check refused 1e-30 images with a 1e-30 bias it computes exactly)."""
    x = np.random.default_rng(0).random((3, 1, 4, 4)) * 1e-30
    nt = dict(depth=3, convention="neural_tangents", b_std=1e-30)
    with pytest.raises(ValueError, match=r"underflow dtype='float32'"):
        ce.gram(x, dtype="float32", backend="numba", **nt)
    k, info = ce.gram(x, dtype="float32", return_info=True, **nt, **REF)
    assert info["dtype"] == "float64"
    assert np.array_equal(k, ce.gram(x, dtype="float64", **nt, **REF)) and np.all(k > 0)


# ----------------------------------------------------------------------------- W_std / b_std bounds
NT = dict(convention="neural_tangents", backend="reference")


@pytest.mark.parametrize("kw", [dict(b_std=1e200), dict(W_std=1e200), dict(b_std=1e155)])
def test_huge_W_std_b_std_is_a_value_error(x, kw):
    """b_std=1e200 raised a raw OverflowError (the CLI printed a traceback)."""
    name = next(iter(kw))
    with pytest.raises(ValueError, match=rf"{name} must be at most 1\.341e\+154"):
        ce.gram(x[:2], depth=3, **NT, **kw)


def run(capsys, *argv):
    rc = cli.main(["-q", *map(str, argv)])
    out, err = capsys.readouterr()
    return rc, out, err


@pytest.mark.parametrize("opt", ["--b-std", "--W-std"])
def test_cli_huge_std_is_one_line(tmp_path, capsys, opt):
    np.save(tmp_path / "x.npy", np.ones((2, 1, 4, 4)))
    rc, o, e = run(capsys, "gram", tmp_path / "x.npy", "--depth", "3", "--convention",
                   "neural_tangents", opt, "1e200", "--out", tmp_path / "g.zarr", "--no-progress")
    assert rc == 2 and e.startswith("cntk-engine: error:") and e.count("\n") == 1, e
    assert "must be at most" in e and not (tmp_path / "g.zarr").exists()


def test_cli_arithmetic_errors_are_one_line(monkeypatch, capsys, tmp_path):
    def overflow(args):
        raise OverflowError(34, "Numerical result out of range")

    monkeypatch.setattr(cli.gram, "run", overflow)
    rc, o, e = run(capsys, "gram", tmp_path / "x.npy", "--depth", "3", "--out", tmp_path / "g.zarr")
    assert rc == 2 and e.startswith("cntk-engine: error:") and e.count("\n") == 1, e


def test_a_result_larger_than_the_ram_is_refused_before_any_work(x, monkeypatch):
    """np.empty commits pages only as tiles are written: 10 arrays of 22,000^2 (36 GiB) on a
    23 GiB machine started and grew toward the OOM killer."""
    from cntk_engine.backends import numba_cpu
    from cntk_engine.jobs import sinks
    monkeypatch.setattr(sinks, "available_memory", lambda: 3 * 3 * 8 * 2 - 1)     # < 2 arrays of 3 x 3
    monkeypatch.setattr(numba_cpu.NumbaBackend, "pairs", lambda *a, **k: pytest.fail("computed"))
    with pytest.raises(ValueError, match=r"the result, 2 float64 arrays of 3 x 3 \(144 B\), is larger than "
                                         r"the RAM available now \(143 B\); write it to disk instead: with out "
                                         r"set to a path"):
        ce.gram(x, depth=3, kernel="both", backend="numba")
    monkeypatch.setattr(sinks, "available_memory", lambda: 3 * 3 * 8 * 2)
    ce.gram(x, depth=3, kernel="both", backend="reference")
