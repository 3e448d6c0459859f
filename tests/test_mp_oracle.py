"""The float64 backends against a 40-digit arbiter (``mp_oracle``: the recursion written out
again in mpmath on the whole 4-D covariance, without slices, closed-form diagonals or the snap
of c to +-1), where float64 codes are hardest to check against each other: c = +-1 exactly
(an image and itself, its positive and negative multiples, constant images, receptive fields
that two images share), pools over a whole image, zero-variance windows, real MNIST and
CIFAR-10 pixels, flips and LAP.

The multiples are of integer images (MNIST and CIFAR-10 pixels, 0..255), so 3 x and -x are
exact and c = +-1 holds exactly where the math says it does: the arbiter's value there is the
kernel's exact value, while a ReLU step whose c lands a few ulps from +-1 without being snapped
is off by about sqrt(eps).  Each entry K(x, z) must be within TOL of sqrt(K(x, x) K(z, z)), the
natural scale of the pair (the entries of one Gram span six orders of magnitude here); an
entry whose scale is 0 (an all-zero image without biases) must be exact.  The backends' errors
are a few float64 ulps (the largest where c is within 1e-7 of 1 without being 1, which float64
resolves no better; README, Exactness), far below TOL; the two controls at the end show the
arbiter failing the reference by far more than TOL without its snap or its compensated pools.
"""
import numpy as np
import pytest

import cntk_engine as ce
from cntk_engine import AvgPool, ConvRelu, serial
from conftest import load_real

pytest.importorskip("mpmath", reason="mpmath (the test extra) is not installed")
import mp_oracle  # noqa: E402

TOL = 1e-13
BACKENDS = [dict(backend="reference"), dict(backend="numba", dtype="float64")]


def mnist_crop():
    """A 6 x 6 crop of an MNIST digit, 0..255: 14 of its pixels and three of its 3 x 3 windows
    blank (zero-variance windows)."""
    return load_real("mnist_test.npz")["x"][0, 6:12, 8:14].astype(np.float64)[None]


def cifar_crop(n, size):
    """size x size crops of n CIFAR-10 test images, NCHW, 0..255."""
    x = load_real("cifar10_jpeg_small.npz")["x_test"][:n, 10:10 + size, 12:12 + size]
    return x.astype(np.float64).transpose(0, 3, 1, 2)


def multiples(x):
    """x, 3 x, -x, two constant images and an all-zero one: c = +-1 wherever two of them
    (or an image and itself) meet."""
    const = np.ones_like(x)
    return np.stack([x, 3 * x, -x, 2 * const, 7 * const, 0 * x])


def pair_errors(got, exact, d1, d2):
    """|got - exact| / sqrt(K(x, x) K(z, z)) per entry (0 or inf where that scale is 0)."""
    scale = np.sqrt(np.outer(np.abs(d1), np.abs(d2)))
    safe = np.where(scale > 0, scale, 1.0)
    return np.where(scale > 0, np.abs(got - exact) / safe, np.where(got == exact, 0.0, np.inf))


def check(x1, x2=None, **kw):
    exact = mp_oracle.gram(x1, x2, **kw)
    if x2 is None:
        d1 = d2 = [np.diag(e) for e in exact]
    else:
        d1, d2 = mp_oracle.self_kernels(x1, **kw), mp_oracle.self_kernels(x2, **kw)
    for be in BACKENDS:
        got = ce.gram(x1, x2, kernel="both", **be, **kw)
        for name, g, e, a, b in zip(("ntk", "nngp"), got, exact, d1, d2):
            err = float(pair_errors(g, e, a, b).max())
            assert err <= TOL, (be, name, err)


@pytest.mark.parametrize("kw", [
    dict(depth=4, pooling="gap"),
    dict(depth=3, pooling="flatten", fix=True),
    # biases: blank windows have Sigma = q_x = q_z = b2 > 0 (c = 1 there, not c := 0)
    dict(depth=3, pooling="gap", convention="neural_tangents", W_std=1.3, b_std=0.4),
], ids=["arora-gap", "arora-flatten-fix", "nt-bias"])
def test_multiples_of_a_real_digit(kw):
    check(multiples(mnist_crop()[:, 1:5, 1:5]), **kw)


def test_images_that_share_a_region():
    """Entries whose receptive fields hold the same pixels in both images have c = 1 exactly
    up the net until the fields leave the shared region.  The fast backends take the diagonals
    from the closed-form recursion (``diag``), not from the pair's own sums, so their c there is
    not 1 by construction: only their snap makes it so."""
    x = mnist_crop()
    y = x.copy()
    y[:, 4:, 4:] = 255.0 - y[:, 4:, 4:]           # one corner differs
    check(np.stack([x, y]), depth=4, pooling="flatten", convention="neural_tangents", b_std=0.3)


@pytest.mark.parametrize("layers, kw", [
    (serial(ConvRelu(), AvgPool(6), ConvRelu()), dict(pooling="flatten")),
    (serial(ConvRelu(), ConvRelu(), AvgPool(2), ConvRelu(), AvgPool(3)),
     dict(pooling="gap", convention="neural_tangents", b_std=0.3)),
    (serial(ConvRelu(), AvgPool(3, 1), ConvRelu(), AvgPool(2), AvgPool(2, 1)), dict(pooling="flatten", fix=True)),
], ids=["whole-image-pool", "two-stages-bias", "overlapping-and-trailing"])
def test_stacks_on_multiples_of_a_real_digit(layers, kw):
    check(multiples(mnist_crop())[[0, 1, 2, 3, 5]], architecture=layers, **kw)


WHOLE_IMAGE_POOL = serial(ConvRelu(), AvgPool(6), ConvRelu())


def constant_images():
    """Constant 6 x 6 images of values that are not integers: c = 1 between any two of them in
    exact arithmetic, and the whole-image pool sums w^4 = 1,296 terms (equal but for the zero
    padding's border) that round."""
    return np.array([0.5, 1.3, 0.7])[:, None, None, None] * np.ones((3, 1, 6, 6))


def test_constant_images_through_a_whole_image_pool():
    check(constant_images(), architecture=WHOLE_IMAGE_POOL)


def test_real_cifar_with_flips_and_lap_across_two_sets():
    """A cross Gram in which x2 holds a copy of x1[0] (the fast backends give it x1[0]'s
    self-pair value) and a flip of x1[1] (c = 1 in the flipped term)."""
    x = cifar_crop(3, 4)
    x2 = np.stack([x[0], x[1, :, :, ::-1], 2 * x[2]])
    check(x, x2, depth=3, pooling="lap", lap_window=2, flip=True, convention="neural_tangents",
          b_std=0.2)


def test_random_images_symmetric_and_cross(rng):
    x = rng.standard_normal((3, 2, 4, 4))
    x[2, :, :2] = 0.0
    check(x, depth=4, pooling="gap", convention="neural_tangents", W_std=1.5, b_std=0.1)
    check(x, rng.standard_normal((2, 2, 4, 4)), depth=3, pooling="flatten")


def control_error(monkeypatch_target, replacement, x, **kw):
    """The largest per-pair error of the reference with one of its functions replaced."""
    import cntk_engine.backends.reference as reference
    exact = mp_oracle.gram(x, **kw)[0]
    with pytest.MonkeyPatch.context() as m:
        m.setattr(reference, monkeypatch_target, replacement)
        got = ce.gram(x, backend="reference", **kw)
    return float(pair_errors(got, exact, np.diag(exact), np.diag(exact)).max())


def test_the_arbiter_sees_an_unsnapped_c():
    """The reference's ReLU step without the snap of c to +-1 (c = Sigma / sqrt(q_x q_z) as it
    comes out in float64) fails on the multiples, where the snap makes it exact."""
    def unsnapped(sigma, q_x, q_z):
        norm = np.sqrt(np.multiply.outer(q_x, q_z))
        with np.errstate(divide="ignore", invalid="ignore"):
            c = np.where(norm > 0, sigma / np.where(norm > 0, norm, 1.0), 0.0)
        theta = np.arccos(np.clip(c, -1.0, 1.0))
        return (norm * np.sin(theta) + (np.pi - theta) * sigma) / (2 * np.pi), (np.pi - theta) / (2 * np.pi)

    err = control_error("relu_step", unsnapped, multiples(mnist_crop()[:, 1:5, 1:5]), depth=4, pooling="gap")
    assert err > 100 * TOL, err


def test_the_arbiter_sees_a_plain_pool_sum():
    """The reference with its pools summed plainly (as it summed them before the compensation)
    fails on constant images through the whole-image pool."""
    def plain_pool4(a, pool):
        s, k = pool.stride, pool.window
        ho, wo = pool.out_size(a.shape[0]), pool.out_size(a.shape[1])
        total = np.zeros((ho, wo, ho, wo))
        for a0, b0, c0, d0 in np.ndindex(k, k, k, k):
            total = total + a[a0:a0 + s * ho:s, b0:b0 + s * wo:s, c0:c0 + s * ho:s, d0:d0 + s * wo:s]
        return total / k ** 4

    err = control_error("pool4", plain_pool4, constant_images(), architecture=WHOLE_IMAGE_POOL)
    assert err > 100 * TOL, err


@pytest.mark.parametrize("depth", [3, 11])
@pytest.mark.parametrize("seed, n", [(5, 12), (0, 20)])
def test_nearly_parallel_inputs_lose_what_readme_says(seed, n, depth):
    """1 x 1 "images" of 2 features around 100 (tabular features far from 0): pairs whose c is
    within ~1e-5 of 1 without being 1, where sqrt(1 - c^2) turns c's rounding into about
    eps / sqrt(1 - c) in every backend, more with depth (README, Exactness, "Nearly parallel
    inputs", whose figures these are: float32 3.3e-4 / 4.3e-4 of the largest entry at depth 3,
    1.6e-3 / 1.8e-3 at depth 11; float64 2.9e-10 / 3.4e-12 and 2.7e-9 / 6.1e-12, numba)."""
    x = np.random.default_rng(seed).normal(loc=100, size=(n, 2, 1, 1))
    exact = mp_oracle.gram(x, depth=depth)[0]
    scale = np.abs(exact).max()
    for be, bound in ((dict(backend="reference"), 1e-8), (dict(backend="numba", dtype="float64"), 1e-8),
                      (dict(backend="numba", dtype="float32"), 5e-3)):
        err = float(np.abs(ce.gram(x, depth=depth, **be) - exact).max() / scale)
        assert err <= bound, (be, err)


@pytest.mark.parametrize("depth", [3, 11])
def test_images_near_a_constant_lose_far_less(depth):
    """8 x 8 images of uniform pixels offset by 100 (nearly constant, nearly parallel): float32
    against the float64 reference, 4.7e-7 at depth 3 and 2.4e-6 at depth 11 of the largest
    entry (README, Exactness)."""
    x = np.random.default_rng(1).random((12, 3, 8, 8)) + 100
    ref = ce.gram(x, depth=depth, backend="reference")
    err = float(np.abs(ce.gram(x, depth=depth, backend="numba", dtype="float32") - ref).max()
                / np.abs(ref).max())
    assert err <= 1e-5, err
