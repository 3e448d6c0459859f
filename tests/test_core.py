"""Exactness and properties of the CPU backends against the float64 4-D reference."""
import json
from pathlib import Path

import numpy as np
import pytest

import cntk_engine as ce
from conftest import load_real

FIXTURE = Path(__file__).with_name("fixtures") / "nt_values.npz"


def rel(a, b):
    return float(np.abs(np.asarray(a) - b).max() / max(np.abs(b).max(), 1e-300))


def both(x, x2=None, **kw):
    return ce.gram(x, x2, kernel="both", **kw)


def mnist_crops(n=3, size=8):
    """Real MNIST digits cropped near a corner: many all-black (zero-variance) windows."""
    x = load_real("mnist_test.npz")["x"][:n, 2:2 + size, 2:2 + size].astype(np.float64) / 255.0
    return x[:, None]


def cifar(n=2, crop=None):
    x = load_real("cifar10_jpeg_small.npz")["x_test"][:n].astype(np.float64) / 255.0
    x = x.transpose(0, 3, 1, 2)
    return x if crop is None else x[:, :, :crop, :crop]


CASES = [
    dict(convention="arora", pooling="gap", fix=False),
    dict(convention="arora", pooling="flatten", fix=True),
    dict(convention="arora", pooling="gap", fix=True, filter_size=5),
    dict(convention="neural_tangents", pooling="gap", b_std=0.3, W_std=1.2),
    dict(convention="neural_tangents", pooling="flatten", fix=False),
    dict(convention="neural_tangents", pooling="flatten", b_std=0.1, filter_size=1),
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: "-".join(f"{k}={v}" for k, v in c.items()))
def test_numba_matches_reference_random(case, rng):
    x = rng.standard_normal((3, 2, 6, 5))
    depths = [3, 4, 7] if case.get("fix") else [2, 3, 7]   # fix=True needs depth >= 3
    ref = both(x, depths=depths, backend="reference", **case)
    for dtype, tol in (("float32", 1e-4), ("float64", 1e-10)):
        got = both(x, depths=depths, backend="numba", dtype=dtype, **case)
        for d in ref:
            for i in range(2):
                assert rel(got[d][i], ref[d][i]) < tol, (dtype, d, i)


def test_numba_matches_reference_non_symmetric_and_depth21(rng):
    x1 = rng.standard_normal((2, 3, 5, 7))
    x2 = rng.standard_normal((3, 3, 5, 7))
    ref = both(x1, x2, depths=[4, 21], backend="reference")
    for dtype, tol in (("float32", 1e-4), ("float64", 1e-10)):
        got = both(x1, x2, depths=[4, 21], backend="numba", dtype=dtype)
        for d in ref:
            for i in range(2):
                assert got[d][i].shape == (2, 3)
                assert rel(got[d][i], ref[d][i]) < tol, (dtype, d, i)


def test_real_mnist_zero_variance_windows_and_zero_image():
    x = np.concatenate([mnist_crops(3), np.zeros((1, 1, 8, 8))])
    assert (x[:, 0, :3, :3] == 0).all(axis=(1, 2)).any(), "expected all-black windows"
    for pooling in ("gap", "flatten"):
        ref = both(x, depths=[3, 11], pooling=pooling, backend="reference")
        for dtype, tol in (("float32", 1e-4), ("float64", 1e-10)):
            got = both(x, depths=[3, 11], pooling=pooling, backend="numba", dtype=dtype)
            for d in ref:
                for i in range(2):
                    assert np.isfinite(got[d][i]).all()
                    assert rel(got[d][i], ref[d][i]) < tol
                    # the all-zero image: its whole row and column are exactly 0 (the limit)
                    assert np.all(got[d][i][3] == 0) and np.all(got[d][i][:, 3] == 0)


def test_real_cifar_32x32_depth21():
    """Full-size real images through 20 layers, against the 4-D reference (a few seconds)."""
    x = cifar(2)
    ref = both(x, depths=[3, 21], backend="reference")
    for dtype, tol in (("float32", 1e-4), ("float64", 1e-10)):
        got = both(x, depths=[3, 21], backend="numba", dtype=dtype)
        for d in ref:
            for i in range(2):
                assert rel(got[d][i], ref[d][i]) < tol, (dtype, d, i)


def test_neural_tangents_fixture():
    """Values computed by neural-tangents 0.6.5 (tests/fixtures/make_nt_fixtures.py)."""
    f = np.load(FIXTURE)
    meta = json.loads(str(f["meta"]))
    assert {"random", "mnist", "cifar"} <= {c["set"] for c in meta["configs"]}
    for i, cfg in enumerate(meta["configs"]):
        x = f["images_" + cfg["set"]]
        kw = dict(depths=cfg["depths"], pooling=cfg["pooling"], convention="neural_tangents",
                  W_std=cfg["W_std"], b_std=cfg["b_std"], filter_size=cfg["k"],
                  data_format="NHWC")
        for backend, dtype, tol in (("reference", "float64", 1e-8), ("numba", "float64", 1e-8),
                                    ("numba", "float32", 1e-4)):
            got = both(x, backend=backend, dtype=dtype, **kw)
            for d in cfg["depths"]:
                assert rel(got[d][0], f[f"c{i}_d{d}_ntk"]) < tol, (cfg, d, backend, dtype)
                assert rel(got[d][1], f[f"c{i}_d{d}_nngp"]) < tol, (cfg, d, backend, dtype)


@pytest.mark.parametrize("pooling", ["gap", "flatten"])
@pytest.mark.parametrize("fix", [False, True])
def test_conventions_differ_by_known_factor(pooling, fix, rng):
    x = rng.standard_normal((3, 3, 5, 6))
    c, h, w = x.shape[1:]
    depths = [3, 5] if fix else [2, 5]      # fix=True needs depth >= 3
    a = both(x, depths=depths, pooling=pooling, fix=fix, convention="arora", dtype="float64")
    n = both(x, depths=depths, pooling=pooling, fix=fix, convention="neural_tangents", dtype="float64")
    factor = 2.0 / c if pooling == "gap" else 2.0 / (c * h * w)
    for d in a:
        for i in range(2):
            np.testing.assert_allclose(n[d][i], factor * a[d][i], rtol=1e-12, atol=1e-300)


def test_properties_on_real_images():
    x = np.concatenate([mnist_crops(4, 10), np.zeros((1, 1, 10, 10))])
    for kernel in ("ntk", "nngp"):
        k = ce.gram(x, depth=5, kernel=kernel, dtype="float64")
        np.testing.assert_array_equal(k, k.T)                                  # symmetry
        assert np.linalg.eigvalsh(k).min() > -1e-10 * np.abs(k).max()          # PSD
        kf = ce.gram(x[:, :, :, ::-1], depth=5, kernel=kernel, dtype="float64")
        np.testing.assert_allclose(kf, k, rtol=1e-10)                          # flip invariance
        kv = ce.gram(x[:, :, ::-1, :], depth=5, kernel=kernel, dtype="float64")
        np.testing.assert_allclose(kv, k, rtol=1e-10)
        # homogeneity; (3.5 x_i, x_i) is not a self pair, but its c = +-1 entries are taken as
        # +-1 (arch, "self pairs"), so it holds to rounding
        k2 = ce.gram(3.5 * x, x, depth=5, kernel=kernel, dtype="float64")
        np.testing.assert_allclose(k2, 3.5 * k, rtol=1e-12)


@pytest.mark.parametrize("backend", ["reference", "numba"])
@pytest.mark.parametrize("pooling", ["gap", "flatten"])
def test_an_image_and_a_multiple_of_it(backend, pooling, rng):
    """c = 1 exactly at every entry of (x, a x), but past the first layer Sigma and q carry their
    own rounding: without the snap of c to +-1, arccos turned a few ulps into 1e-8 (the
    reference, the oracle, was the one off)."""
    b = rng.standard_normal((2, 6, 6))
    x = np.stack([b, 3.0 * b, np.full((2, 6, 6), 0.5), np.full((2, 6, 6), 2.0)])
    k = ce.gram(x, depth=8, pooling=pooling, backend=backend, dtype="float64")
    np.testing.assert_allclose(k[0, 1], 3.0 * k[0, 0], rtol=1e-13)
    np.testing.assert_allclose(k[2, 3], 4.0 * k[2, 2], rtol=1e-13)       # constant images
    # float32: its rounding of the pair's values (without the snap, arccos of c a few ulps
    # below 1 costs sqrt(eps), ~3e-4)
    k32 = ce.gram(x, depth=8, pooling=pooling, backend=backend, dtype="float32")
    np.testing.assert_allclose(k32[0, 1], 3.0 * k32[0, 0], rtol=1e-6)
    np.testing.assert_allclose(k32[2, 3], 4.0 * k32[2, 2], rtol=1e-6)
    # one channel, one pixel: K = x1 x2 / 27 at depth 3 (arora) for same-sign pixels
    p = np.array([1.0461432923049026, 0.7415884212884828]).reshape(2, 1, 1, 1)
    k = ce.gram(p, depth=3, backend=backend, dtype="float64")
    np.testing.assert_allclose(k[0, 1], p[0, 0, 0, 0] * p[1, 0, 0, 0] / 27, rtol=1e-14)


def test_psd_on_cifar_and_x2_equals_gram_blocks(rng):
    x = cifar(5, crop=12)
    k = ce.gram(x, depth=4)
    assert np.linalg.eigvalsh(k).min() > -1e-5 * np.abs(k).max()
    k12 = ce.gram(x[:2], x[2:], depth=4)
    np.testing.assert_allclose(k12, k[:2, 2:], rtol=1e-6)


def test_depths_equal_single_runs_and_tiles(rng):
    x = rng.standard_normal((5, 1, 6, 6))
    multi = ce.gram(x, depths=[2, 4, 6], dtype="float64")
    for d in (2, 4, 6):
        single = ce.gram(x, depth=d, dtype="float64")
        np.testing.assert_allclose(multi[d], single, rtol=1e-13)
    np.testing.assert_array_equal(ce.gram(x, depth=4, tile=2), ce.gram(x, depth=4, tile=64))


def test_layouts_dtypes_and_info(rng):
    x = (rng.random((3, 4, 5, 2)) * 255).astype(np.uint8)       # NHWC uint8
    a = ce.gram(x, depth=3, data_format="NHWC")
    b = ce.gram(x.transpose(0, 3, 1, 2).astype(np.float32), depth=3)
    np.testing.assert_array_equal(a, b)
    assert a.dtype == np.float64
    k, info = ce.gram(x, depth=3, data_format="NHWC", return_info=True, backend="auto")
    assert info["backend"] in ("numba", "cuda") and info["unique_pairs"] == 6


@pytest.mark.parametrize("kw,msg", [
    (dict(depth=1), "depth must be an integer >= 2"),
    (dict(depth=3, pooling="max"), "pooling must be one of"),
    (dict(depth=3, backend="tpu"), "backend must be one of"),
    (dict(depth=3, convention="paper"), "convention must be one of"),
    (dict(depth=3, kernel="gp"), "kernel must be one of"),
    (dict(depth=3, dtype="float16"), "dtype must be one of"),
    (dict(depth=3, filter_size=4), "filter_size must be a positive odd integer"),
    (dict(depth=3, filter_size=0), "filter_size must be a positive odd integer"),
    (dict(depth=3, data_format="CHWN"), "data_format must be None (NCHW, refusing shapes that look channels-last) or one of"),
    (dict(depth=3, W_std=2.0), "W_std and b_std belong to convention='neural_tangents'"),
    (dict(depth=3, convention="neural_tangents", b_std=-1.0), "b_std must be a finite number"),
    (dict(), "give exactly one of depth (an int"),
    (dict(depth=3, depths=[3]), "give exactly one of depth (an int"),
    (dict(depth=3, tile=0), "tile must be a positive integer"),
    (dict(depth=3, return_info="no"), "return_info must be True or False"),
    # 0-d string arrays compare equal to the names: refused, not a TypeError ("unhashable") later
    (dict(depth=3, pooling=np.array("gap")), "pooling must be one of"),
    (dict(depth=3, convention=np.array("arora")), "convention must be one of"),
    (dict(depth=3, backend=np.array("numba")), "backend must be one of"),
    # an int beyond floats: the bound named, not an OverflowError
    (dict(depth=3, convention="neural_tangents", b_std=10 ** 400), "b_std must be at most 1.341e.154"),
])
def test_bad_arguments(kw, msg):
    with pytest.raises(ValueError, match=msg.replace("(", r"\(").replace(")", r"\)")):
        ce.gram(np.ones((2, 1, 4, 4)), **kw)


def test_bad_images():
    x = np.ones((4, 1, 4, 4))
    x[1, 0, 2, 2] = np.nan
    x[3, 0, 0, 0] = np.inf
    with pytest.raises(ValueError, match=r"NaN or Inf pixels in x1 image\(s\) at index \[1, 3\]; all"):
        ce.gram(x, depth=3)
    with pytest.raises(ValueError, match=r"NaN or Inf pixels in x2 image\(s\) at index \[1, 3\]; all"):
        ce.gram(np.ones((2, 1, 4, 4)), x, depth=3)
    with pytest.raises(ValueError, match=r"must be 4-D.*add a channel axis"):
        ce.gram(np.ones((2, 4, 4)), depth=3)
    wide = np.ones((3, 1, 4, 4), dtype=np.longdouble)
    if np.finfo(np.longdouble).max > np.finfo(np.float64).max:     # x86: 80-bit long double
        wide[2, 0, 1, 1] = np.longdouble(np.finfo(np.float64).max) * 4
        with pytest.raises(ValueError, match=r"beyond float64's range .* in x1 image\(s\) at index \[2\]"):
            ce.gram(wide, depth=3)
    if np.finfo(np.longdouble).tiny < np.finfo(np.float64).smallest_subnormal:
        # an image whose every pixel is below float64's range would be all zeros: refused
        wide[2] = np.longdouble("1e-400")
        wide[2, 0, 0, 0] = 0
        with pytest.raises(ValueError, match=r"every pixel of x2 image\(s\) at index \[2\] is below "
                                             r"float64's range"):
            ce.gram(np.ones((2, 1, 4, 4)), wide, depth=3)
        wide[2, 0, 0, 0] = 1e-100             # one pixel in range: the image is read (tiny ones are 0)
        ce.gram(wide, depth=3, backend="reference")
    # a masked array with masked pixels: the kernel has no missing pixels (asarray drops the mask)
    masked = np.ma.masked_greater(np.arange(32.0).reshape(2, 1, 4, 4), 30)
    with pytest.raises(ValueError, match=r"x1 is a masked array with 1 masked pixel\(s\).*x1.filled\(0\)"):
        ce.gram(masked, depth=3)
    np.testing.assert_array_equal(ce.gram(np.ma.masked_array(masked.data), depth=3, backend="reference"),
                                  ce.gram(masked.data, depth=3, backend="reference"))
    wide[2, 0, 1, 1] = np.inf                  # a true Inf is named as such in any dtype
    with pytest.raises(ValueError, match=r"NaN or Inf pixels in x1 image\(s\) at index \[2\]"):
        ce.gram(wide, depth=3)
    with pytest.raises(ValueError, match=r"same \(C, H, W\)"):
        ce.gram(np.ones((2, 1, 4, 4)), np.ones((2, 3, 4, 4)), depth=3)
    with pytest.raises(ValueError, match=r"same \(C, H, W\)"):
        ce.gram(np.ones((2, 1, 4, 4)), np.ones((2, 1, 5, 4)), depth=3)
    with pytest.raises(ValueError, match="real numbers"):
        ce.gram(np.ones((2, 1, 4, 4), dtype=complex), depth=3)
    with pytest.raises(ValueError, match="at least one image"):
        ce.gram(np.ones((0, 1, 4, 4)), depth=3)


def test_unavailable_cuda_is_a_clear_runtime_error():
    why = ce.available_backends()["cuda"]
    if why is None:
        pytest.skip("the CUDA backend is usable here")
    with pytest.raises(RuntimeError, match="backend='cuda' is unavailable: "):
        ce.gram(np.ones((2, 1, 4, 4)), depth=3, backend="cuda")


def test_float32_where_the_network_drives_c_to_one():
    """Between different images c can approach +-1 by the network alone (here a bias large
    against the weights on 1 x 1 one-channel images): within 8 ulps of +-1 c is taken as +-1,
    and float32 then costs sqrt(eps), 4.0e-4 of the largest entry in this example from a
    randomized comparison with the reference (README, Exactness); float64 stays exact."""
    x1 = np.array([0.02591174]).reshape(1, 1, 1, 1)
    x2 = np.array([0.69032575, 0.35009399]).reshape(2, 1, 1, 1)
    kw = dict(kernel="ntk", filter_size=7, convention="neural_tangents", W_std=1.544, b_std=1.361,
              pooling="lap", lap_window=1, depth=4, fix=True)
    ref = ce.gram(x1, x2, backend="reference", **kw)
    err = lambda dt: np.abs(ce.gram(x1, x2, backend="numba", dtype=dt, **kw) - ref).max() / np.abs(ref).max()  # noqa: E731
    assert err("float64") < 1e-10
    assert 1e-5 < err("float32") < 1e-3
