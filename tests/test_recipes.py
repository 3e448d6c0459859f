"""The LAP readout, flip-symmetrised kernels and ZCA whitening: the numba fast path against the
float64 reference and neural-tangents, the identities that tie them to the plain readouts, and
every place a user meets them."""
import json
from pathlib import Path

import numpy as np
import pytest

import cntk_engine as ce
from cntk_engine import solver
from cntk_engine.arch import hflip
from cntk_engine.preprocess import downsample, fit_zca, standardize, zca_whiten
from conftest import load_real

FIXTURE = Path(__file__).with_name("fixtures") / "nt_recipes.npz"


def rel(a, b):
    return float(np.abs(np.asarray(a) - b).max() / max(np.abs(b).max(), 1e-300))


def cifar_crops(n=3, size=8):
    x = load_real("cifar10_jpeg_small.npz")["x_test"][:n, 4:4 + size, 4:4 + size]
    x = x.astype(np.float64).transpose(0, 3, 1, 2) / 255.0
    x[0, :, : size // 2] = 0.0                              # an all-black window
    return x


CASES = [
    dict(pooling="lap", lap_window=1),
    dict(pooling="lap", lap_window=2, fix=True),
    dict(pooling="lap", lap_window=3, convention="neural_tangents", W_std=1.3, b_std=0.4),
    dict(pooling="lap", lap_window=6),
    dict(pooling="gap", flip=True),
    dict(pooling="flatten", flip=True, convention="neural_tangents", b_std=0.2),
    dict(pooling="lap", lap_window=4, flip=True, fix=True),
]


@pytest.mark.parametrize("case", range(len(CASES)))
def test_numba_matches_reference_random(case, rng):
    kw = CASES[case]
    x = rng.standard_normal((4, 2, 6, 6))
    x[3, :, :3] = 0.0
    ref = ce.gram(x, depths=[3, 4], kernel="both", backend="reference", **kw)
    for dtype, tol in (("float64", 1e-10), ("float32", 1e-4)):
        got = ce.gram(x, depths=[3, 4], kernel="both", backend="numba", dtype=dtype, **kw)
        for d in (3, 4):
            for g, r in zip(got[d], ref[d]):
                assert rel(g, r) <= tol, (kw, dtype, d, rel(g, r))
    y = rng.standard_normal((2, 2, 6, 6))
    assert rel(ce.gram(x, y, depth=3, backend="numba", dtype="float64", **kw),
               ce.gram(x, y, depth=3, backend="reference", **kw)) <= 1e-10


@pytest.mark.parametrize("kw", [dict(pooling="lap", lap_window=3, flip=True),
                                dict(pooling="lap", lap_window=8, convention="neural_tangents", b_std=0.3)])
def test_numba_matches_reference_real(kw):
    x = cifar_crops()
    ref = ce.gram(x, depth=4, kernel="both", backend="reference", **kw)
    for dtype, tol in (("float64", 1e-10), ("float32", 1e-4)):
        for g, r in zip(ce.gram(x, depth=4, kernel="both", backend="numba", dtype=dtype, **kw), ref):
            assert rel(g, r) <= tol


def test_stack_with_lap_and_flip_matches_reference(rng):
    net = ce.serial(ce.ConvRelu(), ce.AvgPool(2), ce.ConvRelu(), ce.ConvRelu())
    x = rng.standard_normal((3, 2, 8, 8))
    for kw in (dict(pooling="lap", lap_window=3), dict(pooling="gap", flip=True),
               dict(pooling="lap", lap_window=2, flip=True, convention="neural_tangents", b_std=0.5)):
        ref = ce.gram(x, architecture=net, kernel="both", backend="reference", **kw)
        for g, r in zip(ce.gram(x, architecture=net, kernel="both", backend="numba", dtype="float64", **kw), ref):
            assert rel(g, r) <= 1e-10


def test_neural_tangents_fixture():
    """LAP through stax.AvgPool(CIRCULAR) + Flatten, flips from stax's kernel of [x, hflip x]
    (tests/fixtures/make_nt_fixtures.py --recipes)."""
    f = np.load(FIXTURE)
    meta = json.loads(str(f["meta"]))
    assert len(meta["configs"]) >= 15
    for i, cfg in enumerate(meta["configs"]):
        x = f[f"images_{cfg['set']}"].transpose(0, 3, 1, 2)
        readout = cfg["readout"]
        kw = dict(pooling=readout if isinstance(readout, str) else "lap",
                  lap_window=None if isinstance(readout, str) else readout[1], flip=cfg["flip"],
                  convention="neural_tangents", W_std=cfg["W_std"], b_std=cfg["b_std"], kernel="both")
        if cfg.get("name"):
            kw["architecture"] = cfg["name"]
        else:
            kw["depth"] = cfg["depth"]
        want = f[f"c{i}_ntk"], f[f"c{i}_nngp"]
        for be in (("numba",) if cfg.get("name") else ("numba", "reference")):
            for g, w in zip(ce.gram(x, backend=be, dtype="float64", **kw), want):
                assert rel(g, w) <= 1e-8, (i, be, cfg, rel(g, w))
        for g, w in zip(ce.gram(x, backend="numba", dtype="float32", **kw), want):
            assert rel(g, w) <= 1e-4, (i, cfg)


# ----------------------------------------------------------------------------- identities
def test_lap_window_1_is_flatten_and_window_h_is_gap(rng):
    x = rng.standard_normal((4, 2, 6, 6))
    for fix in (False, True):
        kw = dict(depth=3, fix=fix, kernel="both", backend="numba", dtype="float64")
        flat = ce.gram(x, pooling="flatten", **kw)
        for a, b in zip(ce.gram(x, pooling="lap", lap_window=1, **kw), flat):
            assert np.array_equal(a, b)
        gap = ce.gram(x, pooling="gap", **kw)
        for a, b in zip(ce.gram(x, pooling="lap", lap_window=6, **kw), gap):
            assert rel(a, 36 * b) <= 1e-13                  # arora: c = H is H^2 x gap
        nt = dict(kw, convention="neural_tangents")
        for a, b in zip(ce.gram(x, pooling="lap", lap_window=6, **nt), ce.gram(x, pooling="gap", **nt)):
            assert rel(a, b) <= 1e-13                       # neural_tangents: exactly gap


def test_flip_kernel_of_flip_symmetric_images_is_the_plain_kernel(rng):
    x = rng.standard_normal((4, 2, 6, 6))
    sym = (x + hflip(x)) / 2
    for kw in (dict(depth=4), dict(depth=3, pooling="lap", lap_window=3),
               dict(architecture=ce.serial(ce.ConvRelu(), ce.AvgPool(2), ce.ConvRelu()))):
        a = ce.gram(sym, flip=True, backend="numba", dtype="float64", **kw)
        assert np.array_equal(a, ce.gram(sym, backend="numba", dtype="float64", **kw))


def test_flip_grams_symmetric_psd_and_consistent_blocks():
    x = cifar_crops(4)
    for kw in (dict(flip=True), dict(pooling="lap", lap_window=3, flip=True), dict(pooling="lap", lap_window=5)):
        k = ce.gram(x, depth=4, backend="numba", dtype="float64", **kw)
        assert k.tobytes() == np.ascontiguousarray(k.T).tobytes()
        # the reference too (its flip term was computed for both orders of a pair: 3e-16 apart)
        r = ce.gram(x[:3, :, :6, :6], depth=3, backend="reference", **kw)
        assert r.tobytes() == np.ascontiguousarray(r.T).tobytes()
        assert np.linalg.eigvalsh(k).min() >= -1e-12 * np.abs(k).max()
        assert rel(ce.gram(x[:2], x, depth=4, backend="numba", dtype="float64", **kw), k[:2]) <= 1e-12
    # an image against its own flip is a self pair of the flip term
    k = ce.gram(x, depth=4, flip=True, backend="numba")
    kf = ce.gram(x, hflip(x), depth=4, flip=True, backend="numba")
    assert np.array_equal(np.diag(kf), np.diag(k)) and rel(kf, k) <= 1e-6


def test_flip_costs_twice_the_pairs(monkeypatch, rng):
    from cntk_engine.backends import numba_cpu
    seen = []
    real = numba_cpu.NumbaBackend.pairs

    def count(self, a, b, ia, ib, same_set):
        seen.append(len(ia))
        return real(self, a, b, ia, ib, same_set)

    monkeypatch.setattr(numba_cpu.NumbaBackend, "pairs", count)
    x = rng.standard_normal((5, 1, 4, 4))
    ce.gram(x, depth=3, backend="numba", tile=5)
    plain = sum(seen)
    seen.clear()
    ce.gram(x, depth=3, flip=True, backend="numba", tile=5)
    assert plain == 15 and sum(seen) == 30


def test_augmented_training_set_predicts_as_the_flip_kernel_with_half_the_ridge(rng):
    """Kernel ridge regression on [x, hflip x] with labels twice and ridge lambda equals the
    flip-symmetrised kernel's with lambda / 2 (the two recipes of the README)."""
    x, t = rng.standard_normal((6, 1, 5, 5)), rng.standard_normal((3, 1, 5, 5))
    y = rng.standard_normal((6, 2))
    xa = np.concatenate([x, hflip(x)])
    kw = dict(depth=3, backend="numba", dtype="float64")
    pred_aug = solver.kernel_ridge(ce.gram(xa, **kw), np.concatenate([y, y]), ce.gram(t, xa, **kw), ridge=0.3)
    pred_flip = solver.kernel_ridge(ce.gram(x, flip=True, **kw), y, ce.gram(t, x, flip=True, **kw), ridge=0.15)
    assert rel(pred_aug, pred_flip) <= 1e-9


# ----------------------------------------------------------------------------- ZCA
def test_zca_whitens_the_training_set_on_its_span(rng):
    x = rng.standard_normal((400, 2, 3, 3)) * np.arange(1, 19).reshape(1, 2, 3, 3) + 5.0
    a, _ = zca_whiten(x, reg=0.0)
    f = a.reshape(400, -1)
    s, u = np.linalg.eigh(f.T @ f / 400)
    kept = s > 1e-8
    assert kept.sum() == 17                        # the per-image mean direction is gone
    assert np.allclose(s[kept], 1.0, atol=1e-10)
    # reg > 0 shrinks: eigenvalues s / (s + lambda) < 1, the same directions
    a, _ = zca_whiten(x, reg=0.1)
    s2 = np.linalg.eigvalsh(a.reshape(400, -1).T @ a.reshape(400, -1) / 400)
    assert np.all(s2[s2 > 1e-8] < 1.0) and (s2 > 1e-8).sum() == 17


@pytest.mark.parametrize("reg, absolute", [(0.1, False), (1e-3, True)])
def test_zca_is_the_documented_formula(rng, reg, absolute):
    """zca_whiten against its docstring's five steps written out here with NumPy: per-channel
    standardisation, layer normalisation, S = X^T X / n, lambda = reg trace(S) / d (or reg), and
    x -> U diag(1 / sqrt(s + lambda)) U^T x on the span (1 off it); the whitened training set's
    second moment then has the eigenvalues s / (s + lambda) exactly."""
    x = rng.standard_normal((40, 1, 3, 3)) * np.arange(1, 10).reshape(1, 1, 3, 3) + 2.0
    t = rng.standard_normal((5, 1, 3, 3))
    mean, std = x.mean(axis=(0, 2, 3), keepdims=True), x.std(axis=(0, 2, 3), keepdims=True)

    def rows(a):
        f = ((a - mean) / std).reshape(len(a), -1)
        f = f - f.mean(axis=1, keepdims=True)
        return f / np.linalg.norm(f, axis=1, keepdims=True)

    fx = rows(x)
    S = fx.T @ fx / len(x)
    s, u = np.linalg.eigh(S)
    lam = reg if absolute else reg * np.trace(S) / 9
    on_span = s > 9 * np.finfo(float).eps * s.max()
    f = np.where(on_span, 1.0 / np.sqrt(np.maximum(s, 0) + lam), 1.0)
    M = (u * f) @ u.T
    a, b = zca_whiten(x, t, reg=reg, reg_absolute=absolute)
    assert np.abs(a.reshape(40, -1) - fx @ M).max() < 1e-12
    assert np.abs(b.reshape(5, -1) - rows(t) @ M).max() < 1e-12
    assert fit_zca(x, reg=reg, reg_absolute=absolute).reg_amount == pytest.approx(lam, rel=1e-12)
    got = np.linalg.eigvalsh(a.reshape(40, -1).T @ a.reshape(40, -1) / 40)
    assert np.abs(np.sort(got[-on_span.sum():]) - np.sort(s[on_span] / (s[on_span] + lam))).max() < 1e-12


def test_zca_fits_on_train_only_and_keeps_layouts(rng):
    x, t = rng.standard_normal((50, 3, 4, 4)), rng.standard_normal((7, 3, 4, 4))
    a, b = zca_whiten(x, t, reg=0.05)
    z = fit_zca(x, reg=0.05)
    assert np.array_equal(z.transform(t), b) and np.array_equal(z.transform(x), a)
    an, bn = zca_whiten(x.transpose(0, 2, 3, 1), t.transpose(0, 2, 3, 1), reg=0.05, data_format="NHWC")
    assert np.allclose(an.transpose(0, 3, 1, 2), a) and np.allclose(bn.transpose(0, 3, 1, 2), b)
    # a whitening reads images as it was fitted: NCHW images given to an NHWC fit are named so
    zn = fit_zca(x.transpose(0, 2, 3, 1), reg=0.05, data_format="NHWC")
    with pytest.raises(ValueError, match=r"read as NHWC; this whitening was fitted on \(3, 4, 4\) "
                                         "and reads images as it was fitted, NHWC"):
        zn.transform(rng.standard_normal((2, 3, 4, 5)))
    # channels-last images are refused by the default layout, as gram refuses them (they were
    # read as C = H channels of W x C images, a wrong whitening), and taken with NCHW explicitly
    cl, tl = rng.standard_normal((20, 8, 8, 3)), rng.standard_normal((2, 8, 8, 3))
    for f in (lambda: zca_whiten(cl, tl), lambda: fit_zca(cl), lambda: standardize(cl, tl),
              lambda: downsample(cl, 2)):
        with pytest.raises(ValueError, match=r"has shape \(20, 8, 8, 3\).*data_format='NHWC'"):
            f()
    assert zca_whiten(cl, tl, data_format="NCHW")[0].shape == (20, 8, 8, 3)
    assert standardize(cl, data_format="NHWC")[0].shape == (20, 8, 8, 3)      # returned as read
    # a test image outside the training span keeps that part (f = 1 there)
    few = fit_zca(x[:3], reg=0.1)
    out = few.transform(t)
    assert np.all(np.isfinite(out)) and np.abs(out).max() < 10
    # absolute vs relative regulariser
    za, zr = fit_zca(x, reg=1e-3, reg_absolute=True), fit_zca(x, reg=1e-3)
    assert za.reg_amount == 1e-3 and zr.reg_amount == pytest.approx(1e-3 / 48, rel=1e-9)


def test_every_preprocessing_returns_the_layout_it_read(rng):
    """standardize, downsample, preprocess and with_flips read NHWC with data_format="NHWC"
    and return NHWC, as fit_standardize and zca_whiten do (they returned NCHW, which gram with
    the same data_format read as H channels of C x W images: a kernel 154 % off, no error)."""
    import cntk_engine.preprocess as P
    x, t = rng.standard_normal((6, 3, 8, 8)), rng.standard_normal((2, 3, 8, 8))
    cl = lambda v: None if v is None else v.transpose(0, 2, 3, 1)
    calls = {"standardize": lambda d, a, b: P.standardize(a, b, data_format=d),
             "downsample": lambda d, a, b: (P.downsample(a, 2, data_format=d), None),
             "with_flips": lambda d, a, b: (P.with_flips(a, None, data_format=d)[0], None),
             "zca_whiten": lambda d, a, b: P.zca_whiten(a, b, data_format=d)}
    calls.update({f"preprocess {how}": (lambda how: lambda d, a, b: P.preprocess(a, b, how, 2, data_format=d))(how)
                  for how in P.PREPROCESSING})
    for name, f in calls.items():
        want, got = f("NCHW", x, t), f("NHWC", cl(x), cl(t))
        for w, g in zip(want, got):
            assert (w is None) == (g is None), name
            if w is not None:
                assert g.shape == cl(w).shape and np.array_equal(g, cl(w)), name
    a, b = P.standardize(cl(x), cl(t), data_format="NHWC")
    kw = dict(depth=2, backend="numba", dtype="float64")
    np.testing.assert_allclose(ce.gram(b, a, data_format="NHWC", **kw),
                               ce.gram(*P.standardize(x, t)[::-1], **kw), rtol=1e-12)


@pytest.mark.parametrize("args, kw, msg", [
    ((np.zeros((0, 1, 2, 2)),), {}, "at least one image"),
    ((np.ones((3, 1, 2, 2)),), {}, "constant"),
    ((np.ones((3, 2, 2)),), {}, r"x_train must be 4-D, \(N, C, H, W\)"),
    ((np.ones((3, 1, 0, 2)),), {}, r"at least one image with C, H, W >= 1; got \(N, C, H, W\) = \(3, 1, 0, 2\)"),
    # an empty test set (N = 0) was a bare reshape error; complex pixels lost their imaginary part
    ((np.random.default_rng(0).standard_normal((3, 1, 2, 2)), np.zeros((0, 1, 2, 2))), {},
     r"x_test must hold at least one image"),
    ((np.random.default_rng(0).standard_normal((3, 1, 2, 2)) + 1j,), {},
     r"x_train must hold real numbers \(any integer or float dtype\); got dtype complex128"),
    ((np.full((2, 1, 2, 2), np.nan),), {}, "NaN"),
    ((np.random.default_rng(0).standard_normal((3, 1, 2, 2)),), dict(reg=-1), "reg must be"),
    ((np.random.default_rng(0).standard_normal((3, 1, 2, 2)),), dict(reg="0.1"), "reg must be a number"),
    ((np.random.default_rng(0).standard_normal((3, 1, 2, 2)),), dict(data_format="CHW"), "data_format"),
])
def test_zca_bad_input(args, kw, msg):
    with pytest.raises(ValueError, match=msg):
        zca_whiten(*args, **kw)
    z = fit_zca(np.random.default_rng(1).standard_normal((4, 1, 2, 2)))
    with pytest.raises(ValueError, match=r"^x_test: images of shape .* fitted on"):
        z.transform(np.ones((1, 1, 3, 3)), name="x_test")


def test_with_flips_and_scale_check_what_they_are_given(rng):
    """with_flips pairs each label with its image and refuses channels-last shapes by default
    (their "flip" would reverse the colour channels); scale divides a set by 255 only with the
    other, and booleans are 0 / 1 already."""
    from cntk_engine import preprocess as P
    x = rng.standard_normal((2, 3, 4, 5))
    xx, yy, groups = P.with_flips(x, [7, 8])
    assert xx.tobytes() == np.concatenate([x, hflip(x)]).tobytes() and yy.tolist() == [7, 8, 7, 8]
    assert groups.tolist() == [0, 1, 0, 1] and "with_flips" in P.__all__
    for y in ([0], [0, 1, 2], 5):
        with pytest.raises(ValueError, match=r"y must hold one label \(or target row\) per image: 2 images"):
            P.with_flips(x, y)
    nhwc = rng.standard_normal((2, 8, 8, 3))
    with pytest.raises(ValueError, match="looks like the channels of channels-last data"):
        P.with_flips(nhwc, [0, 1])
    flipped = P.with_flips(nhwc, [0, 1], data_format="NHWC")[0]
    assert flipped.shape == (4, 8, 8, 3)                                              # returned as read
    assert np.array_equal(flipped[2:], hflip(nhwc.transpose(0, 3, 1, 2)).transpose(0, 2, 3, 1))   # mirrored
    u8, f32 = np.full((2, 1, 2, 2), 255, np.uint8), np.ones((2, 1, 2, 2), np.float32)
    for a, b in ((u8, f32), (f32, u8)):
        with pytest.raises(ValueError, match="give both as integers .* or both as floats"):
            P.preprocess(a, b, "scale")
    assert (P.preprocess(u8, u8, "scale")[1] == 1.0).all() and (P.preprocess(f32, f32, "scale")[1] == 1.0).all()
    assert P.scale(np.array([True, False])).tolist() == [1.0, 0.0]
    # new arrays, never the caller's (which the caller may change), from every way
    for how in ("none", "scale", "standardize"):
        a, b = P.preprocess(x, x, how)
        assert not np.may_share_memory(a, x) and not np.may_share_memory(b, x), how
    masked = np.ma.masked_greater(x, 1.0)
    for call in (lambda: P.preprocess(masked, x, "none"), lambda: P.with_flips(masked, [0, 1]),
                 lambda: P.scale(masked)):
        with pytest.raises(ValueError, match=r"is a masked array with \d+ masked pixel\(s\)"):
            call()


def test_zca_names_the_constant_images_and_where_they_are(rng):
    from cntk_engine.preprocess import ConstantImages
    x, t = rng.standard_normal((6, 1, 3, 3)), rng.standard_normal((4, 1, 3, 3))
    x[2], t[1], t[3] = 0.0, 5.0, -1.0
    with pytest.raises(ConstantImages, match=r"^x_train image\(s\) at index \[2\] are constant.*"
                       "layer_norm=False") as e:
        zca_whiten(x, t)
    assert e.value.indices == [2]
    with pytest.raises(ConstantImages, match=r"^x_test image\(s\) at index \[1, 3\]") as e:
        zca_whiten(x[3:], t)                    # the training images are fine, two test ones not
    assert e.value.role == "x_test" and e.value.indices == [1, 3]
    assert zca_whiten(x[3:], t, layer_norm=False)[1].shape == t.shape


@pytest.mark.parametrize("scale", [1e155, 1e300, 1e-160, 1e-170, 1e-300])
def test_standardize_and_zca_take_pixels_of_any_finite_size(rng, scale):
    """The per-channel std squares the pixels: above ~1e154 it overflowed (every image became 0,
    and evaluate printed an accuracy of all-zero kernels with exit 0; ZCA called the images
    constant), below ~1e-154 it lost digits to subnormals (1.4e-3 at 1e-160).  Standardised
    images do not depend on the pixels' scale: the same to rounding at any size."""
    x, t = rng.random((5, 3, 4, 4)), rng.random((2, 3, 4, 4))
    a0, b0 = standardize(x, t)
    # images within 2^+-400 are not rescaled: their results are what they always were
    mean, std = x.mean(axis=(0, 2, 3), keepdims=True), x.std(axis=(0, 2, 3), keepdims=True)
    assert np.array_equal(a0, (x - mean) / std) and np.array_equal(b0, (t - mean) / std)
    a, b = standardize(x * scale, t * scale)
    assert np.abs(a - a0).max() < 1e-13 and np.abs(b - b0).max() < 1e-13
    z0, z = zca_whiten(x, t), zca_whiten(x * scale, t * scale)
    assert np.abs(z[0] - z0[0]).max() < 1e-12 and np.abs(z[1] - z0[1]).max() < 1e-12
    later = fit_zca(x * scale)
    assert np.all(later.exponent != 0) and np.abs(later.transform(t * scale) - z0[1]).max() < 1e-12
    # each channel at its own size: one at 1e-200 beside two near 1 (its std underflowed to 0
    # with one power of two for all channels, and it was only centred)
    one = np.array([1.0, scale, 1.0])[None, :, None, None]
    a, b = standardize(x * one, t * one)
    assert np.abs(a - a0).max() < 1e-13 and np.abs(b - b0).max() < 1e-13


def test_standardize_refuses_what_it_cannot_standardise(rng):
    x = rng.random((4, 3, 4, 4))
    with pytest.raises(ValueError, match=r"x_test must hold at least one image"):
        standardize(x, x[:0])
    with pytest.raises(ValueError, match=r"x_train must hold real numbers"):
        standardize(x + 0j)
    with pytest.raises(ValueError, match=r"x_test has 1 channel\(s\) and the training images 3"):
        standardize(x, rng.random((2, 1, 4, 4)))       # it broadcast to 3 channels
    bad = x.copy()
    bad[2, 1, 0, 0] = np.nan           # it spread to channel 1 of every image
    with pytest.raises(ValueError, match=r"NaN or Inf pixels in x_train image\(s\) at index \[2\]"):
        standardize(bad)
    with pytest.raises(ValueError, match=r"NaN or Inf pixels in x_test image\(s\) at index \[2\]"):
        standardize(x, bad)
    with pytest.raises(ValueError, match=r"x_test: standardised with the training images'.*leave "
                                         r"float64's range"):
        standardize(x * 1e-300, x * 1e300)
    with pytest.raises(ValueError, match=r"^x_test: standardised"):
        zca_whiten(x * 1e-300, x * 1e10)
    with pytest.raises(ValueError, match=r"^x: standardised"):
        fit_zca(x * 1e-300).transform(x * 1e10)
    for factor in (2.7, True, "2", 0):
        with pytest.raises(ValueError, match=r"downsampling factor \(factor\) must be an integer >= 1"):
            downsample(x, factor)
    assert downsample(x, np.array(2)).shape == (4, 3, 2, 2)


# ----------------------------------------------------------------------------- where users meet it
@pytest.mark.parametrize("kw, msg", [
    (dict(depth=3, pooling="lap"), "needs lap_window"),
    (dict(depth=3, pooling="lap", lap_window=0), "needs lap_window"),
    (dict(depth=3, pooling="lap", lap_window=7), "larger than the images"),
    (dict(depth=3, lap_window=2), "belongs to pooling='lap'"),
    (dict(depth=3, flip="yes"), "flip must be True or False"),
])
def test_bad_combinations(kw, msg):
    with pytest.raises(ValueError, match=msg):
        ce.gram(np.ones((2, 1, 6, 6)), backend="numba", **kw)
    with pytest.raises(ValueError, match="readout"):
        ce.gram(np.ones((2, 3, 32, 32)), architecture="myrtle5", pooling="lap", lap_window=2, backend="numba")


def test_store_records_lap_and_flip(tmp_path, rng):
    zarr = pytest.importorskip("zarr")
    x = rng.standard_normal((4, 1, 6, 6))
    out = tmp_path / "g.zarr"
    ce.gram(x, depth=3, pooling="lap", lap_window=2, flip=True, backend="numba", out=out)
    rec = zarr.open_group(str(out)).attrs["cntk_engine"]["architecture"]
    assert rec["lap_window"] == 2 and rec["flip"] is True
    from cntk_engine.jobs.store import StoreMismatch
    with pytest.raises(StoreMismatch, match="flip"):
        ce.gram(x, depth=3, pooling="lap", lap_window=2, backend="numba", out=out)


def test_cli_gram_and_evaluate(tmp_path, capsys):
    zarr = pytest.importorskip("zarr")
    from cntk_engine import cli
    d = load_real("cifar10_jpeg_small.npz")
    np.savez(tmp_path / "c.npz", x_train=d["x_train"][:40, :8, :8], y_train=d["y_train"][:40],
             x_test=d["x_test"][:10, :8, :8], y_test=d["y_test"][:10])
    x = d["x_test"][:4, :8, :8].transpose(0, 3, 1, 2)
    np.save(tmp_path / "x.npy", x)
    rc = cli.main(["-q", "gram", str(tmp_path / "x.npy"), "--depth", "3", "--pooling", "lap",
                   "--lap-window", "4", "--flip", "--out", str(tmp_path / "g.zarr"), "--backend",
                   "numba", "--no-progress"])
    out, err = capsys.readouterr()
    assert rc == 0, err
    want = ce.gram(x, depth=3, pooling="lap", lap_window=4, flip=True, backend="numba")
    assert zarr.open_group(str(tmp_path / "g.zarr"))["ntk"][...].tobytes() == want.tobytes()
    for extra in (["--pooling", "lap", "--lap-window", "4", "--flip", "--zca"], ["--augment-flips", "--zca-reg", "0.5", "--zca"]):
        js = tmp_path / "r.json"
        rc = cli.main(["-q", "evaluate", str(tmp_path / "c.npz"), "--depth", "3", "--n-train", "40",
                       "--n-test", "10", "--backend", "numba", "--no-progress", "--json", str(js), *extra])
        out, err = capsys.readouterr()
        assert rc == 0, err
        rec = json.loads(js.read_text())
        assert rec["preprocess"] == "zca" and len(rec["results"]) == 1
        if "--augment-flips" in extra:
            assert rec["augment_flips"] and rec["zca_reg"] == 0.5
            # the images drawn, and the training kernel's images: they and their flips
            assert rec["n_train"] == 40 and rec["train_kernel_images"] == 80
        else:
            assert rec["flip"] and rec["lap_window"] == 4
    rc = cli.main(["-q", "gram", str(tmp_path / "x.npy"), "--depth", "3", "--pooling", "lap", "--out",
                   str(tmp_path / "o.zarr")])
    out, err = capsys.readouterr()
    assert rc == 2 and "needs --lap-window" in err and err.count("\n") == 1
    rc = cli.main(["-q", "evaluate", str(tmp_path / "c.npz"), "--depth", "3", "--flip", "--augment-flips"])
    out, err = capsys.readouterr()
    assert rc == 2 and err.startswith("cntk-engine: error: --augment-flips with --flip: ") and err.count("\n") == 1, err


def test_estimators_flip_zca_augment():
    pytest.importorskip("sklearn")
    from sklearn.base import clone
    from cntk_engine import CNTKClassifier
    d = load_real("cifar10_jpeg_small.npz")
    x, y = d["x_train"][:30, :8, :8].astype(np.float64), d["y_train"][:30]
    base = dict(depth=3, backend="numba", data_format="NHWC", ridge=0.1)
    plain = CNTKClassifier(**base).fit(x[:24], y[:24])
    for kw in (dict(flip=True), dict(preprocess="zca"), dict(augment_flips=True),
               dict(pooling="lap", lap_window=3, flip=True, preprocess="zca", zca_reg=0.2)):
        clf = CNTKClassifier(**base, **kw).fit(x[:24], y[:24])
        assert clf.predict(x[24:]).shape == (6,)
        assert clone(clf).get_params() == clf.get_params()
        if kw.get("preprocess") == "zca":
            assert clf.zca_ is not None and clf.X_fit_.shape == (24, 3, 8, 8)
        if kw.get("augment_flips"):
            assert clf.X_fit_.shape[0] == 48
        assert not np.array_equal(clf.dual_coef_, plain.dual_coef_)
    with pytest.raises(ValueError, match="preprocess must be"):
        CNTKClassifier(**base, preprocess="pca").fit(x[:24], y[:24])
    # both flip recipes: the doubled set would hold every image twice under the flip kernel
    with pytest.raises(ValueError, match=r"^augment_flips=True with flip=True: .* same point"):
        CNTKClassifier(**base, flip=np.True_, augment_flips=True).fit(x[:24], y[:24])
    # a constant image: named with what the estimator's caller can do (it has no layer_norm)
    # (constant after per-channel standardisation: every pixel at its channel's mean)
    blank = x[:24].copy()
    blank[5] = np.delete(blank, 5, axis=0).mean(axis=(0, 1, 2))     # the mean stays that mean
    zca = CNTKClassifier(**base, preprocess="zca")
    with pytest.raises(ValueError, match=r"^X image\(s\) at index \[5\] are constant.*"
                       r"preprocess=None") as e:
        zca.fit(blank, y[:24])
    assert "layer_norm" not in str(e.value)
    zca.fit(x[:24], y[:24])
    test = x[24:27].copy()
    test[0] = zca.zca_.mean.reshape(-1)                              # NHWC: channels last
    with pytest.raises(ValueError, match=r"^X image\(s\) at index \[0\] are constant"):
        zca.predict(test)
