"""CUDA backend: exactness against the float64 reference and the Numba backend.

GPU tests are marked ``gpu`` and skip, with the reason, where the backend cannot run.  Two tests
run without a GPU: the clear error of an unavailable backend, and a host build of the kernels'
per-entry ReLU step (csrc/relu_step.cuh, compiled by nvcc as host code) against NumPy.
"""
import math
import os
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

import cntk_engine as ce
from cntk_engine.backends import unavailable_reason

ROOT = Path(__file__).resolve().parents[1]
WHY = unavailable_reason("cuda")
gpu = pytest.mark.skipif(WHY is not None, reason=f"CUDA backend unavailable: {WHY}")


def data_dir() -> Path:
    """../shared/data beside the checkout, or $CNTK_ENGINE_DATA."""
    return Path(os.environ.get("CNTK_ENGINE_DATA", ROOT.parent / "shared" / "data"))


def load(name):
    path = data_dir() / name
    if not path.exists():
        pytest.skip(f"real data {path} not found (set CNTK_ENGINE_DATA to the folder holding it)")
    return np.load(path)


def rel(a, b):
    a = a.get() if hasattr(a, "get") else a
    b = b.get() if hasattr(b, "get") else b
    return float(np.abs(a - b).max() / max(np.abs(b).max(), 1e-300))


def test_unavailable_reason_is_a_sentence_or_none():
    assert WHY is None or (isinstance(WHY, str) and len(WHY) > 10)


@pytest.mark.skipif(WHY is None, reason="the CUDA backend is available here")
def test_unavailable_cuda_backend_raises_a_clear_error():
    with pytest.raises(RuntimeError, match="backend 'cuda' is unavailable: .{10,}"):
        ce.gram(np.ones((2, 1, 4, 4)), depth=3, backend="cuda")


# ----------------------------------------------------------------- host build of the ReLU step
def relu_step_numpy(s, th, nx, ix, nz, iz, lo, c=None):
    """arch.py's ReLU step in float64, on the kernel's inputs (see csrc/relu_step.cuh)."""
    c = s * ix * iz if c is None else c
    a = np.maximum(np.minimum(np.abs(c), 1.0), lo)
    cs = np.where(c >= 0, a, -a)
    kdot = (np.pi - np.arccos(cs)) / (2 * np.pi)
    k = nx * nz * np.sqrt((1 - a) * (1 + a)) + kdot * s     # 1 - a^2 without cancellation
    return k, th * kdot


def test_relu_step_host_build_matches_numpy(tmp_path):
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        pytest.skip("nvcc not found: the host build of csrc/relu_step.cuh needs it")
    exe = tmp_path / "host_check"
    r = subprocess.run([nvcc, "-x", "cu", "-std=c++17", "-I", str(ROOT / "csrc"),
                        str(ROOT / "csrc" / "host_check.cu"), "-o", str(exe)],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    rng = np.random.default_rng(0)
    n = 4000
    qx, qz = rng.uniform(0.1, 5, n), rng.uniform(0.1, 5, n)
    c = np.concatenate([rng.uniform(-1, 1, n - 1000), 1 - 10.0 ** rng.uniform(-8, -1, 250),
                        -1 + 10.0 ** rng.uniform(-8, -1, 250), rng.choice([-1.0, 1.0, 0.0], 250),
                        rng.uniform(1, 1.001, 125), rng.uniform(-1.001, -1, 125)])
    s = c * np.sqrt(qx * qz)
    th = rng.uniform(-1, 3, n)
    nx, nz = np.sqrt(qx / (2 * np.pi)), np.sqrt(qz / (2 * np.pi))
    ix, iz = 1 / np.sqrt(qx), 1 / np.sqrt(qz)
    lo = np.zeros(n)
    lo[:50] = 1.0                                      # self-pair diagonal: c := 1
    s[:50] = np.abs(s[:50])                            # (where Sigma = q >= 0)
    ix[50:100] = 0.0                                   # zero-variance windows: c := 0
    nx[50:100] = 0.0
    s[50:100] = 0.0
    cols = np.stack([s, th, nx, ix, nz, iz, lo], 1)
    out = subprocess.run([str(exe)], input="\n".join(" ".join(repr(float(v)) for v in row) for row in cols),
                         capture_output=True, text=True, check=True).stdout
    got = np.array([[float(v) for v in line.split()] for line in out.strip().splitlines()])
    k, g = relu_step_numpy(*cols.T, c=s * (ix * iz))           # c rounded as the kernel does
    # float32: the oracle takes the float32-rounded inputs and the kernel's float32 c (theta(c)
    # has an infinite slope at |c| = 1, so float32 rounding of c itself is not what is checked
    # here: the arccos polynomial, the square roots and the formula are)
    c32 = np.float32(cols[:, 0]) * (np.float32(cols[:, 3]) * np.float32(cols[:, 5]))
    k32, g32 = relu_step_numpy(*np.float32(cols).astype(np.float64).T, c=c32.astype(np.float64))
    scale_k = np.sqrt(qx * qz)
    scale_g = np.maximum(np.abs(th), 1e-30)

    def check(err, tol, what):
        i = int(np.argmax(err))
        assert err[i] < tol, f"{what}: error {err[i]:.2e} at c={c[i]!r}, lo={lo[i]}"

    # relative to the natural scale of each entry (sqrt(q_x q_z) for K, |Theta| for G)
    check(np.abs(got[:, 0] - k32) / scale_k, 1e-6, "float K")
    check(np.abs(got[:, 1] - g32) / scale_g, 1e-6, "float G")
    check(np.abs(got[:, 0] - k) / scale_k, 1e-3, "float K vs unrounded inputs")
    check(np.abs(got[:, 2] - k) / scale_k, 1e-14, "double K")
    check(np.abs(got[:, 3] - g) / scale_g, 1e-14, "double G")
    # exact values where the rules say so
    np.testing.assert_array_equal(got[50:100, 0], 0.0)       # zero variance: K = 0
    np.testing.assert_allclose(got[:50, 3], 0.5 * th[:50], rtol=1e-15)  # self pair: Kdot = 1/2


# ----------------------------------------------------------------------------- GPU: exactness
CASES = [
    ((3, 2, 6, 5), dict(convention="arora", pooling="gap")),
    ((2, 1, 7, 4), dict(convention="arora", pooling="gap", fix=True, filter_size=5)),
    ((2, 3, 5, 5), dict(convention="neural_tangents", pooling="flatten", b_std=0.2, filter_size=1)),
    ((3, 3, 9, 13), dict(convention="neural_tangents", pooling="gap", b_std=0.3, W_std=1.2)),
    ((2, 2, 17, 11), dict(convention="arora", pooling="flatten", fix=True, filter_size=7)),
    ((2, 1, 12, 32), dict(convention="arora", pooling="gap", filter_size=3)),
    ((2, 3, 20, 16), dict(convention="neural_tangents", pooling="gap", filter_size=5, b_std=0.1)),
    ((2, 1, 32, 32), dict(convention="arora", pooling="gap", filter_size=3)),
    ((2, 3, 32, 32), dict(convention="arora", pooling="gap", filter_size=5)),
    ((2, 3, 32, 32), dict(convention="neural_tangents", pooling="flatten", filter_size=3, b_std=0.5)),
]


@gpu
@pytest.mark.gpu
@pytest.mark.parametrize("shape,case", CASES, ids=[f"{c[0]}-{i}" for i, c in enumerate(CASES)])
def test_cuda_matches_reference(shape, case):
    rng = np.random.default_rng(sum(shape))
    x = rng.standard_normal(shape)
    oracle = "reference" if shape[2] * shape[3] <= 400 else "numba"
    ref = ce.gram(x, depths=[2, 3, 7], kernel="both", backend=oracle, dtype="float64", **case)
    for dtype, tol in (("float32", 1e-4), ("float64", 1e-10)):
        got = ce.gram(x, depths=[2, 3, 7], kernel="both", backend="cuda", dtype=dtype, **case)
        for d in ref:
            for i in range(2):
                if np.abs(ref[d][i]).max() == 0:
                    assert np.abs(got[d][i]).max() == 0
                else:
                    assert rel(got[d][i], ref[d][i]) < tol, (dtype, d, i)


@gpu
@pytest.mark.gpu
def test_cuda_real_cifar_depth21_against_reference_and_numba():
    x = load("cifar10_jpeg_small.npz")["x_train"][:3].astype(np.float64).transpose(0, 3, 1, 2) / 255
    ref = ce.gram(x[:2], depths=[3, 21], kernel="both", backend="reference")
    for dtype, tol in (("float32", 1e-4), ("float64", 1e-10)):
        got = ce.gram(x[:2], depths=[3, 21], kernel="both", backend="cuda", dtype=dtype)
        for d in ref:
            for i in range(2):
                assert rel(got[d][i], ref[d][i]) < tol, (dtype, d, i)
    for pooling in ("gap", "flatten"):
        b = ce.gram(x, depths=[6, 11, 21], pooling=pooling, backend="numba", dtype="float64")
        for dtype, tol in (("float32", 1e-4), ("float64", 1e-10)):
            a = ce.gram(x, depths=[6, 11, 21], pooling=pooling, backend="cuda", dtype=dtype)
            for d in a:
                assert rel(a[d], b[d]) < tol, (pooling, dtype, d)


@gpu
@pytest.mark.gpu
def test_cuda_real_mnist_zero_windows_and_zero_image():
    x = load("mnist_test.npz")["x"][:6].astype(np.float64)[:, None] / 255
    x = np.concatenate([x, np.zeros((1, 1, 28, 28))])
    for pooling in ("gap", "flatten"):
        b = ce.gram(x, depths=[3, 11, 21], pooling=pooling, kernel="both", backend="numba", dtype="float64")
        for dtype, tol in (("float32", 1e-4), ("float64", 1e-10)):
            a = ce.gram(x, depths=[3, 11, 21], pooling=pooling, kernel="both", backend="cuda", dtype=dtype)
            for d in a:
                for i in range(2):
                    assert np.isfinite(a[d][i]).all()
                    assert rel(a[d][i], b[d][i]) < tol, (pooling, dtype, d, i)
                    assert np.all(a[d][i][-1] == 0) and np.all(a[d][i][:, -1] == 0)


@gpu
@pytest.mark.gpu
def test_cuda_symmetric_equals_blocks_and_tiles():
    rng = np.random.default_rng(7)
    for shape in ((9, 3, 12, 10), (7, 3, 32, 32)):
        x = rng.standard_normal(shape)
        full = ce.gram(x, depth=5, backend="cuda", dtype="float64")
        np.testing.assert_array_equal(full, full.T)
        block = ce.gram(x[:4], x[4:], depth=5, backend="cuda", dtype="float64")
        np.testing.assert_allclose(block, full[:4, 4:], rtol=1e-12)
        tiled = ce.gram(x, depth=5, backend="cuda", dtype="float64", tile=2)
        np.testing.assert_allclose(tiled, full, rtol=1e-12)
        # non-symmetric call on the same images: the diagonal is the self pairs (c := 1 rule)
        both = ce.gram(x, x, depth=5, backend="cuda", dtype="float64")
        np.testing.assert_allclose(both, full, rtol=1e-12)


@gpu
@pytest.mark.gpu
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
    # a non-default stream: results identical
    with cupy.cuda.Stream(non_blocking=True):
        k3 = ce.gram(xd, depth=4, backend="cuda")
    cupy.cuda.Device().synchronize()
    np.testing.assert_array_equal(k3.get(), k.get())


@gpu
@pytest.mark.gpu
def test_cuda_rejects_shapes_it_cannot_take():
    with pytest.raises(ValueError, match="at most 32 x 32"):
        ce.gram(np.ones((2, 1, 33, 8)), depth=3, backend="cuda")
    with pytest.raises(ValueError, match="odd filter sizes 1, 3, 5 or 7"):
        ce.gram(np.ones((2, 1, 8, 8)), depth=3, backend="cuda", filter_size=9)
