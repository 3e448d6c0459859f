"""Identical images at different indices (``gram(x, x)``, training images in the test set,
duplicates in a data set) are self pairs: c = 1 exactly on their offset-(0, 0) entries.

Without it, the fast backends' float32 values of such pairs were off by sqrt(eps): 2.7e-4 of
max |K| at depth 11 (flatten), beyond the documented 1e-4 tolerance (and 8.5e-9 in float64)."""
import numpy as np
import pytest

import cntk_engine as ce
from cntk_engine.backends.base import identical_pairs


def _images(n, seed=0, shape=(3, 8, 8)):
    return np.random.default_rng(seed).standard_normal((n,) + shape)


def test_identical_pairs_finds_exact_twins_only():
    x = _images(6)
    x[4] = x[1]
    x[5] = x[1]
    y = x.copy()
    y[0, 0, 0, 0] = np.nextafter(y[0, 0, 0, 0], np.inf)   # one ulp off: not identical
    i, j = identical_pairs(x, x, symmetric=True)
    assert sorted(zip(i.tolist(), j.tolist())) == [(1, 4), (1, 5), (4, 5)]
    i, j = identical_pairs(x, y, symmetric=False)
    pairs = set(zip(i.tolist(), j.tolist()))
    assert (0, 0) not in pairs
    assert pairs == {(k, k) for k in range(1, 6)} | {(1, 4), (1, 5), (4, 1), (5, 1), (4, 5), (5, 4)}
    i, j = identical_pairs(x[:3], _images(2, seed=1), symmetric=False)
    assert i.size == 0 and j.size == 0
    # -0.0 and +0.0 are equal pixels of other bits (np.round of small negatives gives -0.0)
    z = _images(2)
    z[:, :, :2] = -0.0
    for dt in (np.float64, np.float32):
        i, j = identical_pairs(z.astype(dt), (z + 0.0).astype(dt), symmetric=False)
        assert sorted(zip(i.tolist(), j.tolist())) == [(0, 0), (1, 1)], dt


def test_identical_pairs_of_a_tile_of_blank_images_in_bounded_memory():
    """Every candidate pair is confirmed by comparing pixels, a batch of pairs at a time: a tile
    of 256 blank images (32,640 pairs of 768 pixels) gathered 400 MB at once (a 512 tile of
    32 x 32 x 3 images six of each seven of them blank: 4.9 GB, measured)."""
    import tracemalloc
    x = np.zeros((256, 3, 16, 16))
    x[5] = 1.0                                        # one image differs
    tracemalloc.start()
    try:
        ci, cj = identical_pairs(x, x, True)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    others = np.delete(np.arange(256), 5)
    want = [(i, j) for a, i in enumerate(others) for j in others[a + 1:]]
    assert sorted(zip(ci.tolist(), cj.tolist())) == want
    assert peak < 64 << 20, peak


def test_identical_pairs_float32_and_order():
    x = _images(5).astype(np.float32)
    z = x[::-1].copy()
    i, j = identical_pairs(x, z, symmetric=False)
    assert sorted(zip(i.tolist(), j.tolist())) == [(k, 4 - k) for k in range(5)]


@pytest.mark.parametrize("dtype,tol", [("float32", 1e-4), ("float64", 1e-10)])
def test_gram_of_x_with_a_copy_of_x_is_exact(dtype, tol):
    x = _images(4, seed=2)
    kw = dict(depth=11, pooling="flatten", kernel="both")
    ntk_sym, nngp_sym = ce.gram(x, backend="numba", dtype=dtype, **kw)
    ntk, nngp = ce.gram(x, x.copy(), backend="numba", dtype=dtype, **kw)
    ntk_ref, nngp_ref = ce.gram(x, backend="reference", **kw)
    for got, sym, ref in ((ntk, ntk_sym, ntk_ref), (nngp, nngp_sym, nngp_ref)):
        # bit for bit the symmetric run where it computes the same ordered pairs (i <= j)
        assert np.array_equal(np.triu(got), np.triu(sym))
        assert np.abs(got - ref).max() / np.abs(ref).max() < tol


def test_duplicates_inside_a_data_set_and_across_sets():
    x = _images(5, seed=3)
    x[3] = x[0]
    K = ce.gram(x, depth=6, backend="numba", tile=2)    # the twins sit in different tiles
    assert K[0, 3] == K[0, 0] == K[3, 3] and K[3, 0] == K[0, 0]
    assert np.array_equal(K, ce.gram(x, depth=6, backend="numba"))   # tiling changes nothing
    test = np.stack([_images(1, seed=9)[0], x[1], x[0]])
    Kt = ce.gram(test, x, depth=6, backend="numba")
    assert Kt[1, 1] == K[1, 1] and Kt[2, 0] == K[0, 0] and Kt[2, 3] == K[0, 0]
    ref = ce.gram(test, x, depth=6, backend="reference")
    assert np.abs(Kt - ref).max() / np.abs(ref).max() < 1e-5


def test_same_object_is_the_symmetric_gram():
    x = _images(3, seed=4)
    K, info = ce.gram(x, x, depth=3, backend="numba", return_info=True)
    assert info["unique_pairs"] == 6
    assert np.array_equal(K, ce.gram(x, depth=3, backend="numba"))


@pytest.mark.parametrize("dtype,tol", [("float32", 1e-4), ("float64", 1e-10)])
def test_twins_on_real_images_with_zero_windows(dtype, tol):
    # MNIST crops near a corner (many all-black, zero-variance windows) and a CIFAR crop; the
    # test set holds the training images in reverse order plus an all-zero image
    from conftest import load_real
    mnist = load_real("mnist_test.npz")["x"][:3, 2:12, 2:12].astype(np.float64)[:, None] / 255.0
    cifar = load_real("cifar10_jpeg_small.npz")["x_test"][:1, :10, :10].astype(np.float64) / 255.0
    x = np.concatenate([mnist.repeat(3, axis=1), cifar.transpose(0, 3, 1, 2)])
    test = np.concatenate([x[::-1], np.zeros((1,) + x.shape[1:])])
    kw = dict(depth=11, pooling="flatten", kernel="both")
    got = ce.gram(test, x, backend="numba", dtype=dtype, **kw)
    sym = ce.gram(x, backend="numba", dtype=dtype, **kw)
    ref = ce.gram(test, x, backend="reference", **kw)
    for g, s, r in zip(got, sym, ref):
        assert np.isfinite(g).all() and np.all(g[-1] == 0)           # the all-zero image
        np.testing.assert_array_equal(np.diag(g[:-1][::-1]), np.diag(s))   # twins: self pairs
        assert np.abs(g - r).max() / np.abs(r).max() < tol
