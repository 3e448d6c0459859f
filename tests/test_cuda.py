"""CUDA backend: exactness against the float64 reference and the Numba backend.

GPU tests are marked ``gpu`` and skip, with the reason, where the backend cannot run.
"""
import numpy as np
import pytest

import cntk_engine as ce
from cntk_engine.backends import unavailable_reason
from conftest import load_real

WHY = unavailable_reason("cuda")
gpu = pytest.mark.skipif(WHY is not None, reason=f"CUDA backend unavailable: {WHY}")
pytestmark = pytest.mark.gpu


def rel(a, b):
    a = a.get() if hasattr(a, "get") else a
    return float(np.abs(a - b).max() / max(np.abs(b).max(), 1e-300))


def test_unavailable_reason_is_a_sentence_or_none():
    assert WHY is None or (isinstance(WHY, str) and len(WHY) > 10)


CASES = [
    ((3, 2, 6, 5), dict(convention="arora", pooling="gap")),
    ((2, 1, 7, 4), dict(convention="arora", pooling="gap", fix=True, filter_size=5)),
    ((2, 3, 5, 5), dict(convention="neural_tangents", pooling="flatten", b_std=0.2, filter_size=1)),
    ((3, 3, 9, 13), dict(convention="neural_tangents", pooling="gap", b_std=0.3, W_std=1.2)),
    ((2, 2, 17, 11), dict(convention="arora", pooling="flatten", fix=True, filter_size=7)),
    ((2, 1, 32, 32), dict(convention="arora", pooling="gap", filter_size=3)),
]


@gpu
@pytest.mark.parametrize("shape,case", CASES, ids=[str(c[0]) for c in CASES])
def test_cuda_matches_reference(shape, case):
    rng = np.random.default_rng(sum(shape))
    x = rng.standard_normal(shape)
    depths = [3, 4, 7] if case.get("fix") else [2, 3, 7]   # fix=True needs depth >= 3
    ref = ce.gram(x, depths=depths, kernel="both", backend="reference", **case)
    for dtype, tol in (("float32", 1e-4), ("float64", 1e-10)):
        got = ce.gram(x, depths=depths, kernel="both", backend="cuda", dtype=dtype, **case)
        for d in ref:
            for i in range(2):
                if np.abs(ref[d][i]).max() == 0:
                    assert np.abs(got[d][i]).max() == 0
                else:
                    assert rel(got[d][i], ref[d][i]) < tol, (dtype, d, i)


@gpu
def test_cuda_real_cifar_depth21_against_reference_and_numba():
    x = load_real("cifar10_jpeg_small.npz")["x_test"][:3].astype(np.float64).transpose(0, 3, 1, 2) / 255
    ref = ce.gram(x[:2], depths=[3, 21], kernel="both", backend="reference")
    for dtype, tol in (("float32", 1e-4), ("float64", 1e-10)):
        got = ce.gram(x[:2], depths=[3, 21], kernel="both", backend="cuda", dtype=dtype)
        for d in ref:
            for i in range(2):
                assert rel(got[d][i], ref[d][i]) < tol, (dtype, d, i)
    a = ce.gram(x, depths=[6, 11, 21], backend="cuda", dtype="float64")
    b = ce.gram(x, depths=[6, 11, 21], backend="numba", dtype="float64")
    for d in a:
        assert rel(a[d], b[d]) < 1e-10


@gpu
def test_cuda_real_mnist_zero_windows_and_zero_image():
    x = load_real("mnist_test.npz")["x"][:6].astype(np.float64)[:, None] / 255
    x = np.concatenate([x, np.zeros((1, 1, 28, 28))])
    for pooling in ("gap", "flatten"):
        for dtype, tol in (("float32", 1e-4), ("float64", 1e-10)):
            a = ce.gram(x, depths=[3, 11], pooling=pooling, kernel="both", backend="cuda", dtype=dtype)
            b = ce.gram(x, depths=[3, 11], pooling=pooling, kernel="both", backend="numba", dtype="float64")
            for d in a:
                for i in range(2):
                    assert np.isfinite(a[d][i]).all()
                    assert rel(a[d][i], b[d][i]) < tol
                    assert np.all(a[d][i][-1] == 0) and np.all(a[d][i][:, -1] == 0)


@gpu
def test_cuda_symmetric_equals_blocks_and_tiles():
    rng = np.random.default_rng(7)
    x = rng.standard_normal((9, 3, 12, 10))
    full = ce.gram(x, depth=5, backend="cuda", dtype="float64")
    np.testing.assert_array_equal(full, full.T)
    block = ce.gram(x[:4], x[4:], depth=5, backend="cuda", dtype="float64")
    np.testing.assert_allclose(block, full[:4, 4:], rtol=1e-12)
    tiled = ce.gram(x, depth=5, backend="cuda", dtype="float64", tile=2)
    np.testing.assert_allclose(tiled, full, rtol=1e-12)


@gpu
@pytest.mark.parametrize("dtype,tol", [("float32", 1e-4), ("float64", 1e-10)])
def test_cuda_identical_images_are_self_pairs(dtype, tol):
    # twins at other indices get their image's self-pair value (base.identical_pairs), on the
    # device too (CuPy fingerprints); without it float32 flatten depth 11 was off by ~3e-4
    import cupy
    rng = np.random.default_rng(11)
    x = rng.standard_normal((4, 3, 8, 8))
    x[3] = x[0]
    kw = dict(depth=11, pooling="flatten", backend="cuda", dtype=dtype)
    sym = ce.gram(x, **kw)
    assert sym[0, 3] == sym[0, 0] == sym[3, 3]
    rect = ce.gram(cupy.asarray(x), cupy.asarray(x[::-1].copy()), **kw).get()
    np.testing.assert_array_equal(np.diag(rect[:, ::-1]), np.diag(sym))
    ref = ce.gram(x, depth=11, pooling="flatten", backend="reference")
    assert rel(rect[:, ::-1], ref) < tol


@gpu
def test_cupy_in_cupy_out_no_host_roundtrip():
    import cupy
    rng = np.random.default_rng(3)
    x = rng.standard_normal((4, 3, 8, 8))
    xd = cupy.asarray(x)
    k = ce.gram(xd, depth=4, backend="cuda")
    assert isinstance(k, cupy.ndarray) and k.dtype == cupy.float64
    np.testing.assert_allclose(k.get(), ce.gram(x, depth=4, backend="numba"), rtol=1e-4)
    k2 = ce.gram(xd, depth=4, backend="numba")         # CPU backend on device input
    assert isinstance(k2, cupy.ndarray)


@gpu
def test_cuda_rejects_shapes_it_cannot_take():
    with pytest.raises(ValueError, match="at most 32 x 32"):
        ce.gram(np.ones((2, 1, 33, 8)), depth=3, backend="cuda")
    with pytest.raises(ValueError, match="odd filter sizes 1, 3, 5 or 7"):
        ce.gram(np.ones((2, 1, 8, 8)), depth=3, backend="cuda", filter_size=9)
