"""Tiny, huge and subnormal pixels, deep networks on small images, W_std / b_std bounds: float32
is exact where the kernel allows (each image scaled by a power of two without biases), refused
with the bound and the remedy where it does not, and never returns zeros or NaN silently.

The oracle is the float64 reference on ordinary images, times the scale squared (the kernels
without biases are positively homogeneous: K(a x, a z) = a^2 K(x, z))."""
import re

import numpy as np
import pytest

import cntk_engine as ce
from cntk_engine import cli
from cntk_engine.inputs import small_limit

TOL = 1e-4             # float32 vs float64, relative to the largest |K| compared


def rel(a, b):
    return float(np.abs(a - b).max() / np.abs(b).max())


@pytest.fixture(scope="module")
def x():
    return np.random.default_rng(11).standard_normal((5, 3, 8, 8))


@pytest.fixture(scope="module")
def ref(x):
    return ce.gram(x, depth=6, kernel="both", backend="reference", dtype="float64")


@pytest.mark.parametrize("scale", [1e-21, 1e-23, 1e-40, 1e30])
def test_tiny_and_huge_pixels_are_exact_in_float32(x, scale):
    """Measured before the per-image scaling: 1e-21 -> 1.5e-4 relative error, 1e-23 -> all ~0,
    subnormal float32 pixels (1e-40) -> all NaN."""
    xs = x * scale
    if scale == 1e-40:
        xs = xs.astype(np.float32)                      # subnormal float32 pixels, as given
        assert np.all(np.abs(xs) < np.finfo(np.float32).tiny)
    # the oracle: the float64 reference on the same pixels brought to ordinary values
    ref = ce.gram(xs.astype(np.float64) / scale, depth=6, kernel="both", backend="reference",
                  dtype="float64")
    ntk, nngp = ce.gram(xs, depth=6, kernel="both", backend="numba", dtype="float32")
    for got, want in ((ntk, ref[0] * scale ** 2), (nngp, ref[1] * scale ** 2)):
        assert np.isfinite(got).all() and (np.diag(got) > 0).all()
        assert rel(got, want) < TOL


def test_scaling_by_powers_of_two_is_bit_exact(x):
    """For images in float32's normal range the scaled computation is the unscaled one, bit for
    bit (every intermediate scaled by a power of two), and K(2^a x, 2^b z) = 2^(a+b) K(x, z)."""
    k = ce.gram(x, x[:2], depth=4, backend="numba")
    assert (ce.gram(x * 2.0 ** -40, x[:2] * 2.0 ** 30, depth=4, backend="numba")
            == k * 2.0 ** -10).all()
    y = x.copy()
    y[1] *= 2.0 ** 70                                   # one image scaled: its row and column
    ky = ce.gram(y, depth=4, backend="numba")
    kx = ce.gram(x, depth=4, backend="numba")
    f = np.ones(len(x))
    f[1] = 2.0 ** 70
    assert (ky == kx * f[:, None] * f[None, :]).all()


def test_one_tiny_image_in_a_normal_batch(x, ref):
    """Measured before: NaN on its diagonal."""
    y = x.copy()
    y[2] *= 1e-40
    k = ce.gram(y, depth=6, backend="numba")
    want = ref[0].copy()
    want[2, :] *= 1e-40
    want[:, 2] *= 1e-40
    assert np.isfinite(k).all() and k[2, 2] > 0
    assert rel(k, want) < TOL                                  # the normal entries
    assert rel(k[2], want[2]) < TOL                            # the tiny image's own row


def test_pixels_far_below_their_image_are_not_nan(x):
    """A pixel 1e-45 of its image's largest (float32 subnormal after scaling): no NaN."""
    y = x[:2].copy()
    y[0, :, :4, :4] = 0.0
    y[0, 0, 1, 1] = 1e-45                                 # alone in a zero window
    k32 = ce.gram(y, depth=4, backend="numba")
    k64 = ce.gram(y, depth=4, backend="reference", dtype="float64")
    assert np.isfinite(k32).all() and rel(k32, k64) < TOL


@pytest.mark.parametrize("depth", [60, 120])
def test_deep_networks_on_1x1_images_refuse_float32_and_float64_is_right(depth):
    """Measured before: zeros at depth 60, NaN at depth 120 (q decays 9x per layer)."""
    x = np.random.default_rng(2).standard_normal((4, 3, 1, 1))
    with pytest.raises(ValueError, match=r"would underflow dtype='float32'.*reaches depth 15 at most "
                                         r"\(asked: \d+\); use dtype='float64'"):
        ce.gram(x, depth=depth, backend="numba")
    k = ce.gram(x, depth=depth, backend="numba", dtype="float64")
    r = ce.gram(x, depth=depth, backend="reference", dtype="float64")
    # measured 2.5e-15 (depth 60) and 1.2e-14 (depth 120): the README quotes them
    assert np.isfinite(k).all() and (np.diag(k) > 0).all() and rel(k, r) < 5e-14
    # the deepest float32 network it names is exact
    k32 = ce.gram(x, depth=15, backend="numba")
    assert rel(k32, ce.gram(x, depth=15, backend="reference", dtype="float64")) < TOL


def test_deep_network_on_8x8_images():
    """Measured before: NaN at depth 2500; the check names the deepest float32 depth."""
    x = np.random.default_rng(3).standard_normal((2, 1, 8, 8))
    with pytest.raises(ValueError, match=r"reaches depth (\d+) at most") as e:
        ce.gram(x, depth=500, backend="numba")
    deepest = int(e.value.args[0].split("reaches depth ")[1].split()[0])
    assert 300 < deepest < 500
    k32 = ce.gram(x, depth=deepest, backend="numba")
    k64 = ce.gram(x, depth=deepest, backend="numba", dtype="float64")
    assert np.isfinite(k32).all() and rel(k32, k64) < TOL
    k = ce.gram(x, depth=500, backend="numba", dtype="float64")
    assert np.isfinite(k).all() and (np.diag(k) > 0).all()


def test_limits_follow_the_compute_dtype():
    assert small_limit(np.float32) == pytest.approx(1.137e-13, rel=1e-3)
    assert small_limit(np.float64) < 1e-147


# ----------------------------------------------------------------------------- biases
NT = dict(convention="neural_tangents", backend="numba")


def test_biases_tiny_pixels_dominated_by_the_bias_are_computed(x):
    xs = x[:3] * 1e-21
    k32 = ce.gram(xs, depth=4, b_std=0.1, **NT)
    k64 = ce.gram(xs, depth=4, b_std=0.1, dtype="float64", **NT)
    assert rel(k32, k64) < TOL


def test_biases_underflow_is_refused_with_bound_and_remedy(x):
    xs = x[:3] * 1e-21
    with pytest.raises(ValueError, match=r"underflow dtype='float32'.* needs q >= 1\.1e-13.*"
                                         r"use dtype='float64'.*rescale the images and b_std by "
                                         r"the same factor"):
        ce.gram(xs, depth=4, b_std=1e-10, **NT)
    # both remedies work: float64, and rescaling images and b_std together (K scales by a^2)
    k64 = ce.gram(xs, depth=4, b_std=1e-10, dtype="float64", **NT)
    a = 1e6
    k = ce.gram(xs * a, depth=4, b_std=1e-10 * a, **NT) / a ** 2
    assert np.isfinite(k64).all() and rel(k, k64) < TOL


def test_the_underflow_refusal_names_the_conv_layer_and_the_factor_that_works(x):
    """The refusal names the conv layer whose q is too small out of the stack's (it named "the
    readout of depth 2" when depth 4 was asked) and the factor a for images and b_std: that factor
    is accepted and exact, a third less is refused."""
    xs = x[:3] * 1e-30
    with pytest.raises(ValueError, match=r"variance q of conv layer 1 of 3 is .*cannot compute this "
                                         r"kernel at any depth.*by the same factor a, of about "
                                         r"([0-9.e+-]+) or more") as e:
        ce.gram(xs, depth=4, b_std=1e-30, **NT)
    a = float(re.search(r"of about ([0-9.e+-]+) or more", str(e.value)).group(1))
    k64 = ce.gram(xs, depth=4, b_std=1e-30, dtype="float64", **NT)
    assert rel(ce.gram(xs * a, depth=4, b_std=1e-30 * a, **NT) / a ** 2, k64) < TOL
    with pytest.raises(ValueError, match="would underflow"):
        ce.gram(xs * a / 1.3, depth=4, b_std=1e-30 * a / 1.3, **NT)


def test_the_underflow_refusal_offers_no_rescaling_that_would_overflow(x):
    """Where the diagonals span more than the dtype holds (W_std 0.01 over 29 layers: q from
    1e-4 down to 1e-60), the factor that lifts the smallest q lifts the largest beyond what the
    size check accepts: the refusal offers float64 or fewer layers, and float64 computes it."""
    with pytest.raises(ValueError, match=r"use dtype='float64' .*, or use fewer layers \(rescaling the "
                                         r"images cannot help: their q spans .* more than float32 "
                                         r"holds\)$") as e:
        ce.gram(x[:2], depth=30, W_std=0.01, b_std=1e-30, **NT)
    assert "factor" not in str(e.value)
    assert np.isfinite(ce.gram(x[:2], depth=30, W_std=0.01, b_std=1e-30, dtype="float64", **NT)).all()


@pytest.mark.parametrize("dtype, pixels", [("float64", 1e160), ("float32", 4e18)])
def test_the_overflow_refusal_with_a_bias_gives_a_finite_bound_and_a_pixel_that_works(x, dtype, pixels):
    """With a bias nothing is scaled: 1e160 pixels overflow float64's bound itself, which the
    refusal gave as "about inf" without a target; it now gives both from the log domain, and the
    target (images and b_std scaled together) is accepted and exact, 1.3 times it refused."""
    xs = np.sign(x[:3]) * pixels * (0.5 + np.abs(x[:3]) / np.abs(x[:3]).max() / 2)
    kw = dict(depth=3, convention="neural_tangents", b_std=0.5, backend="numba", dtype=dtype)
    with pytest.raises(ValueError, match=r"intermediates up to about [0-9.]+e\+[0-9]+ in this architecture"
                                         r".*max \|pixel\| <= about ([0-9.e+-]+) and b_std by the same") as e:
        ce.gram(xs, **kw)
    assert "about inf" not in str(e.value)
    a = float(re.search(r"max \|pixel\| <= about ([0-9.e+-]+)", str(e.value)).group(1)) / np.abs(xs).max()
    k = ce.gram(xs * a, **{**kw, "b_std": 0.5 * a})
    k64 = ce.gram(xs * a, **{**kw, "b_std": 0.5 * a, "backend": "reference", "dtype": "float64"})
    assert np.isfinite(k).all() and rel(k, k64) < TOL
    with pytest.raises(ValueError, match="too large"):
        ce.gram(xs * a * 1.3, **{**kw, "b_std": 0.5 * a * 1.3})


def test_results_outside_float64_are_refused(x):
    for s, side in ((1e-150, "below"), (1e160, "above")):
        with pytest.raises(ValueError, match=rf"x1\[\d\] .*kernel values \(K\(x, x\), its own\) of about "
                                             rf"2\^-?\d+, {side} the range of float64 results cntk_engine accepts"):
            ce.gram(x[:2] * s, depth=3, backend="numba")


def test_a_cross_gram_holds_each_set_to_its_own_range(x):
    """x1 of 1e-150 against ordinary x2: the cross entries (about 1e-150) would fit float64,
    but the set's own Gram (1e-300) would not, and comes with it in every use (evaluate
    computes the test kernel first so that its checks refuse either set before any work)."""
    with pytest.raises(ValueError, match=r"^x1\[\d\] \(max .*\) would have kernel values \(K\(x, x\), its "
                                         r"own\) of about 2\^-\d+, below"):
        ce.gram(x[:2] * 1e-150, x[2:4], depth=3, backend="numba")
    with pytest.raises(ValueError, match=r"^x2\[\d\] .* above"):
        ce.gram(x[:2], x[2:4] * 1e160, depth=3, backend="numba")


def test_a_network_deeper_than_its_dtype_names_the_depth_not_the_pixels():
    """Diagonals that decay to 0 with depth: the refusal said 'kernel values of about 2^-inf
    ... rescale the images', which cannot help; it names the deepest depth the dtype takes."""
    x = np.random.default_rng(0).random((3, 3, 1, 1))
    for dtype, deepest in (("float32", 15), ("float64", 156)):
        with pytest.raises(ValueError, match=rf"would underflow dtype='{dtype}'.*reaches depth "
                                             rf"{deepest} at most \(asked: 1000\)"):
            ce.gram(x, depth=1000, backend="numba", dtype=dtype)


# ----------------------------------------------------------------------------- b_std
def test_b_std_overflowing_float32_names_b_std(x):
    with pytest.raises(ValueError, match=r"b_std=1e\+100 gives kernel intermediates.*use dtype='float64'"):
        ce.gram(x[:2], depth=3, b_std=1e100, **NT)


# ----------------------------------------------------------------------------- command line
def run(capsys, *argv):
    rc = cli.main(["-q", *map(str, argv)])
    out, err = capsys.readouterr()
    return rc, out, err


def test_cli_subnormal_images_give_the_exact_store(tmp_path, capsys, x):
    """Measured before: exit 0 with an all-NaN store that every --resume recomputed to NaN."""
    zarr = pytest.importorskip("zarr")
    xs = (x[:3] * 1e-40).astype(np.float32)
    np.save(tmp_path / "x.npy", xs)
    out = tmp_path / "g.zarr"
    rc, o, e = run(capsys, "gram", tmp_path / "x.npy", "--depth", "3", "--backend", "numba",
                   "--out", out, "--no-progress")
    assert rc == 0, e
    k = zarr.open_group(str(out), mode="r")["ntk"][...]
    want = ce.gram(xs.astype(np.float64) * 1e40, depth=3, backend="reference", dtype="float64") * 1e-80
    assert np.isfinite(k).all() and rel(k, want) < TOL


def test_cli_deep_1x1_is_a_one_line_refusal_without_store(tmp_path, capsys):
    np.save(tmp_path / "x.npy", np.random.default_rng(0).standard_normal((3, 3, 1, 1)))
    out = tmp_path / "g.zarr"
    rc, o, e = run(capsys, "gram", tmp_path / "x.npy", "--depth", "120", "--backend", "numba",
                   "--out", out, "--no-progress", "--data-format", "NCHW")
    assert rc == 2 and e.count("\n") == 1 and "Traceback" not in e, e
    assert "underflow --dtype 'float32'" in e and "use --dtype 'float64'" in e and not out.exists()


# ----------------------------------------------------------------------------- the last guard
def test_non_finite_tile_is_never_stored(tmp_path, monkeypatch):
    """Should a backend return NaN anyway, the tile is refused: an error, nothing stored or marked."""
    zarr = pytest.importorskip("zarr")
    from cntk_engine.backends.reference import ReferenceBackend
    monkeypatch.setattr(ReferenceBackend, "pair_sums",
                        lambda self, a, b, symmetric=False: np.full((len(a), len(b), 1, 2), np.nan))
    x = np.ones((2, 1, 3, 3))
    with pytest.raises(RuntimeError, match=r"tile \(0, 0\).*non-finite.*not stored"):
        ce.gram(x, depth=2, backend="reference")
    out = tmp_path / "g.zarr"
    with pytest.raises(RuntimeError, match="non-finite"):
        ce.gram(x, depth=2, backend="reference", out=out)
    assert (zarr.open_group(str(out), mode="r")["tiles_done"][...] == 0).all()


def test_the_diagonal_extremes_of_a_set_seen_again_come_from_the_cache(monkeypatch):
    """A set met again (a training set against batch after batch) is not run through the
    host's diagonal recursion again; changed in place, or under another architecture, it is;
    the cache stays within its bytes."""
    from cntk_engine import inputs, memo
    calls = []
    real = inputs.diagonal_extremes
    monkeypatch.setattr(inputs, "diagonal_extremes", lambda x, *a: calls.append(len(x)) or real(x, *a))
    monkeypatch.setattr(inputs, "_extremes_cache", type(inputs._extremes_cache)())
    rng = np.random.default_rng(5)
    train, test = rng.random((5, 1, 8, 8)), rng.random((3, 1, 8, 8))
    full = ce.gram(test, train, depth=3, backend="numba")
    assert calls == [3, 5]
    for i in range(3):                                      # batch after batch: only the batch
        assert ce.gram(test[i:i + 1], train, depth=3, backend="numba").tobytes() == full[i:i + 1].tobytes()
    assert calls == [3, 5, 1, 1, 1]
    train[4, 0, 2, 2] += 0.5                                # changed in place: computed again
    ce.gram(test[:1], train, depth=3, backend="numba")
    ce.gram(test[:1], train, depth=4, backend="numba")      # another architecture: again
    assert calls == [3, 5, 1, 1, 1, 5, 1, 5]               # (the batch, new at depth 4)
    b = ce.gram(test, train, depth=3, b_std=0.5, convention="neural_tangents", backend="numba")
    assert calls[-2:] == [3, 5]                             # with biases: the raw images, cached too
    ce.gram(test, train, depth=3, b_std=0.5, convention="neural_tangents", backend="numba")
    assert len(calls) == 10 and np.isfinite(b).all()
    # within its bytes: the least recently used sets go; a set beyond the bound alone is not kept
    monkeypatch.setattr(inputs, "_extremes_cache", type(inputs._extremes_cache)())
    monkeypatch.setattr(memo, "ENTRY_BYTES", 0)            # the arrays' bytes alone, here
    ce.gram(train, depth=3, backend="numba")
    (q, p), = inputs._extremes_cache.values()
    per_image = (q.nbytes + p.nbytes) // 5
    monkeypatch.setattr(inputs, "EXTREMES_CACHE_BYTES", 11 * per_image)
    big = rng.random((12, 1, 8, 8))
    ce.gram(big, depth=3, backend="numba")                  # 12 images: computed, not kept
    ce.gram(test, train, depth=3, backend="numba")          # the test set kept, train a hit
    ce.gram(big[:5], depth=3, backend="numba")              # kept: the test set, least recent, goes
    assert calls[-4:] == [5, 12, 3, 5]
    assert sorted(len(p) for _, p in inputs._extremes_cache.values()) == [5, 5]
    ce.gram(train, depth=3, backend="numba")
    assert len(calls) == 14
