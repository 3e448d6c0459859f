"""CUDA backend: every kernel variant against the float64 reference and the Numba backend.

GPU tests are marked ``gpu`` and skip, with the reason, where the backend cannot run.  Without a
GPU (but with the extension, which any machine with nvcc builds) the host side runs: the
variants' per-entry ReLU step compiled as host code against NumPy, the diagonal layouts
``prepare`` builds for each variant, the launch parameters ``pairs`` builds and the extension's
checks of them (no CUDA call is made), and the variant selection.
"""
import re
import shutil
import subprocess
import types
from pathlib import Path

import numpy as np
import pytest

import cntk_engine as ce
from cntk_engine.arch import SNAP_ULPS, Architecture
from cntk_engine.backends import cuda as cuda_backend
from cntk_engine.backends import unavailable_reason
from cntk_engine.backends.base import sqrt_and_inverse
from cntk_engine.diag import diag_norms
from conftest import load_real, load_tool

ROOT = Path(__file__).resolve().parents[1]


# The installed extension, also when another test module made cntk_engine import from the
# checkout (tools/sass_mix.py, load_extension); the backend uses it in these tests.
EXT = load_tool("sass_mix").load_extension()


def _use_installed_extension(mp):
    if EXT is not None:
        mp.setattr(cuda_backend, "_extension", lambda: EXT)


@pytest.fixture(autouse=True)
def installed_extension(monkeypatch):
    _use_installed_extension(monkeypatch)


with pytest.MonkeyPatch.context() as _mp:
    _use_installed_extension(_mp)
    WHY = unavailable_reason("cuda")

# the kernel variants compiled into the extension (csrc/cntk_kernels.cu): a new variant must be
# added here, and to test_sass.py's budgets (test_the_compiled_variants_are_the_tested_ones)
VARIANTS = ("v3", "v5", "v6", "v7", "v8")


def gpu(f):
    return pytest.mark.gpu(pytest.mark.skipif(WHY is not None, reason=f"CUDA backend unavailable: {WHY}")(f))


def extension():
    if EXT is None:
        pytest.skip("the CUDA extension cntk_engine._cuda is not installed (built only when nvcc is "
                    "found at install time)")
    return EXT


def rel(a, b):
    a = a.get() if hasattr(a, "get") else a
    return float(np.abs(a - b).max() / max(np.abs(b).max(), 1e-300))


def test_unavailable_reason_is_a_sentence_or_none():
    assert WHY is None or (isinstance(WHY, str) and len(WHY) > 10)


# ------------------------------------------------------------------ variants and their selection
def test_the_compiled_variants_are_the_tested_ones():
    ext = extension()
    variants = ext.kernel_variants()
    assert tuple(v["name"] for v in variants) == VARIANTS
    # one default per dtype, the fastest measured on a GPU (H200, docs/cuda_kernels.md)
    assert ext.default_kernels == {"float32": "v3", "float64": "v5"}
    assert [v["default_for"] for v in variants] == [["float32"], ["float64"], [], [], []]
    assert all(v["gpu_measured"] for v in variants if v["default_for"])
    assert {v["name"]: v["gpu_measured"] for v in variants} == {"v3": True, "v5": True, "v6": False, "v7": False,
                                                                     "v8": False}
    assert {v["name"]: v["diag"] for v in variants} == {"v3": "q", "v5": "factors", "v6": "sqrt", "v7": "sqrt",
                                                              "v8": "q"}
    # kBaseVariant (csrc/pair_sums_kernel.cuh): v7 and v8 compile only their 32 x 32 pair kernels
    assert {v["name"]: v["base"] for v in variants} == {"v3": "v3", "v5": "v5", "v6": "v6", "v7": "v6",
                                                              "v8": "v3"}
    assert all(len(v["description"]) > 20 for v in variants)


def test_kernel_selection_by_argument_and_environment(monkeypatch):
    extension()
    from cntk_engine.backends.cuda import KERNEL_ENV, CudaBackend, resolve_kernel
    arch = Architecture(depths=(3,))
    params = arch.layer_params(1, 8, 8)
    monkeypatch.delenv(KERNEL_ENV, raising=False)
    assert resolve_kernel() == "v3" and CudaBackend(arch, params, "float32").kernel == "v3"
    assert resolve_kernel(None, "float64") == "v5" and CudaBackend(arch, params, "float64").kernel == "v5"
    assert CudaBackend(arch, params, np.float64, kernel="v3").kernel == "v3"
    monkeypatch.setenv(KERNEL_ENV, "v5")
    assert resolve_kernel() == "v5" and CudaBackend(arch, params, "float32").kernel == "v5"
    assert CudaBackend(arch, params, "float32", kernel="v3").kernel == "v3"   # the argument wins
    monkeypatch.setenv(KERNEL_ENV, " ")
    assert resolve_kernel() == "v3"
    monkeypatch.setenv(KERNEL_ENV, "v4")
    with pytest.raises(ValueError, match=r"environment variable CNTK_ENGINE_CUDA_KERNEL='v4' is not "
                                         r"a CUDA kernel variant.*accepted: v3 \(default for float32\), v5"):
        CudaBackend(arch, params, "float32").kernel
    with pytest.raises(ValueError, match=r"kernel='V5' is not a CUDA kernel variant.*accepted: v3"):
        resolve_kernel("V5")


def test_compute_record_names_the_variant_build_and_gpu(monkeypatch):
    """A store's run record of a CUDA job: the kernel variant, the extension's build and the
    GPU's name and compute capability (the machine code that ran); the GPU faked, so no GPU is
    needed."""
    extension()
    from cntk_engine.backends import cuda
    from cntk_engine.build_info import build_record
    monkeypatch.setattr(cuda, "gpu_properties", lambda d: {"name": f"GPU {d}", "major": 9,
                                                           "minor": d})
    monkeypatch.setattr(cuda, "current_device", lambda: 1)
    monkeypatch.delenv(cuda.KERNEL_ENV, raising=False)
    arch = Architecture(depths=(3,))
    be = cuda.CudaBackend(arch, arch.layer_params(1, 8, 8), "float32")
    b = build_record()
    built = f"CUDA {b['cuda_version']} for {b['cuda_architectures']}"
    assert be.compute_record(2) == {"backend": "cuda", "kernel": "v3", "gpu": "GPU 2 (sm_92)",
                                    "cuda_build": built}
    assert be.compute_record(None)["gpu"] == "GPU 1 (sm_91)"       # the current device


@gpu
def test_a_store_records_the_kernel_and_gpu_that_computed_it(tmp_path):
    pytest.importorskip("zarr")
    import zarr
    from cntk_engine.arrays import current_device, gpu_properties
    from cntk_engine.jobs.store import list_runs
    ce.gram(np.random.default_rng(0).standard_normal((4, 1, 8, 8)), depth=3, backend="cuda",
            devices=[current_device()], out=tmp_path / "g.zarr")
    [rec] = list_runs(zarr.open_group(str(tmp_path / "g.zarr")))[0]["compute"]
    p = gpu_properties(current_device())
    assert rec["kernel"] == cuda_backend.resolve_kernel(None, "float32")
    assert rec["gpu"] == f"{p['name']} (sm_{p['major']}{p['minor']})"


def test_constructing_the_backend_needs_no_extension(monkeypatch):
    # a Dask client without GPU or extension constructs the backend (scheduler.run's probe);
    # the variant is resolved where the kernel runs
    from cntk_engine.backends import cuda

    def missing():
        raise ImportError("no _cuda here")
    monkeypatch.setattr(cuda, "_extension", missing)
    arch = Architecture(depths=(3,))
    be = cuda.CudaBackend(arch, arch.layer_params(1, 8, 8), "float32", kernel="v5")
    assert be.name == "cuda"
    with pytest.raises(ImportError, match="no _cuda here"):
        be.kernel
    assert "none (the CUDA extension is not installed)" in cuda.describe_kernel_variants()


def test_info_lists_the_kernel_variants(monkeypatch, capsys):
    extension()
    from cntk_engine import cli
    monkeypatch.setenv("CNTK_ENGINE_CUDA_KERNEL", "v5")
    assert cli.main(["info"]) == 0
    out = capsys.readouterr().out
    assert "CUDA kernel variants (select with CNTK_ENGINE_CUDA_KERNEL; selected: v5)" in out
    assert "  v3   [default for float32, measured on a GPU] reads the diagonals q" in out
    assert "  v5   [default for float64, measured on a GPU] reads per-image factors" in out
    assert "  v6   [not measured on a GPU] reads sqrt(q)" in out
    assert "  v7   [not measured on a GPU] v6 with a barrier" in out
    assert "  v8   [not measured on a GPU] v3 with the row seam" in out
    monkeypatch.delenv("CNTK_ENGINE_CUDA_KERNEL")
    assert cli.main(["info"]) == 0
    assert "selected: v3 for float32, v5 for float64)" in capsys.readouterr().out


# ------------------------------------------------------------- host build of the ReLU step
@pytest.fixture(scope="module")
def relu_step_exe(tmp_path_factory):
    cxx = shutil.which("g++") or shutil.which("c++")
    if cxx is None:
        pytest.skip("no host C++ compiler (g++) to build csrc/relu_step_check.cpp")
    exe = tmp_path_factory.mktemp("relu") / "relu_step_check"
    r = subprocess.run([cxx, "-std=c++17", "-O2", "-ffp-contract=off", "-Wall", "-I", str(ROOT / "csrc"),
                        str(ROOT / "csrc" / "relu_step_check.cpp"), "-o", str(exe)],
                       capture_output=True, text=True)
    assert r.returncode == 0 and "warning" not in r.stderr, r.stderr
    return exe


def relu_oracle(s, th, qx, qz, c):
    """arch.py's ReLU step in float64 at correlation c (clipped): K and G."""
    theta = np.arccos(np.clip(c, -1.0, 1.0))
    k = (np.sqrt(qx * qz) * np.sin(theta) + (np.pi - theta) * s) / (2 * np.pi)
    return k, th * (np.pi - theta) / (2 * np.pi)


def test_relu_step_host_build_matches_numpy(relu_step_exe):
    from cntk_engine.backends.cuda import DIAG_LAYOUTS
    rng = np.random.default_rng(0)
    n = 4000
    qx, qz = rng.uniform(0.1, 5, n), rng.uniform(0.1, 5, n)
    c = np.concatenate([rng.uniform(-1, 1, n - 1000), 1 - 10.0 ** rng.uniform(-8, -1, 250),
                        -1 + 10.0 ** rng.uniform(-8, -1, 250), rng.choice([-1.0, 1.0, 0.0], 250),
                        rng.uniform(1, 1.001, 125), rng.uniform(-1.001, -1, 125)])  # clamped
    s = c * np.sqrt(qx * qz)
    th = rng.uniform(-1, 3, n)
    self_ = np.zeros(n, dtype=int)
    self_[:50] = 1                                   # a self pair's offset-0 entries: c := 1,
    qz[:50] = qx[:50]                                # where Sigma = q_x = q_z
    s[:50] = qx[:50]
    qx[50:100] = 0.0                                 # zero-variance windows: c := 0, K = 0
    s[50:100] = 0.0
    factors, sqrt_q = DIAG_LAYOUTS["factors"][0], DIAG_LAYOUTS["sqrt"][0]
    # what v5 and v6 read (no q here is in (0, 1e-38), where the dtypes' layouts would differ)
    fx, fz = factors(qx, np, np.float32), factors(qz, np, np.float32)
    ux, uz = sqrt_q(qx, np, np.float32), sqrt_q(qz, np, np.float32)
    rows = np.column_stack([s, th, qx, qz, fx, fz, ux, uz, self_])
    text = "\n".join(" ".join(repr(float(v)) for v in row[:-1]) + f" {int(row[-1])}" for row in rows)
    r = subprocess.run([str(relu_step_exe)], input=text, capture_output=True, text=True, check=True)
    got = np.loadtxt(r.stdout.splitlines()).reshape(n, 12)
    scale_k, scale_g = np.sqrt(qx * qz), np.maximum(np.abs(th), 1e-30)
    f32 = lambda a: np.asarray(a, dtype=np.float32)  # noqa: E731
    zero = (qx * qz) == 0

    def c_of(rs, s_):       # the kernel's c: s * rs in its dtype, within SNAP_ULPS ulps of +-1
        prod = s_ * rs      # (and beyond) as +-1, then the self-pair rule
        c_ = np.asarray(prod, dtype=np.float64)
        c_ = np.where(np.abs(c_) >= 1 - SNAP_ULPS * np.finfo(prod.dtype).eps, np.sign(c_), c_)
        return np.where(self_ == 1, 1.0, c_)

    with np.errstate(divide="ignore"):
        rs3_32 = np.where(f32(qx) * f32(qz) > 0, f32(1) / np.sqrt(f32(qx) * f32(qz)), f32(0))
        rs3_64 = np.where(zero, 0.0, 1.0 / np.sqrt(qx * qz))
        p6_32, p6_64 = f32(ux) * f32(uz), ux * uz
        # as the kernel's test (relu_step.cuh, Entry<6>): a product below the smallest normal is 0
        rs6_32 = np.where(p6_32 >= np.finfo(np.float32).tiny, f32(1) / p6_32, f32(0))
        rs6_64 = np.where(p6_64 >= np.finfo(np.float64).tiny, 1.0 / p6_64, 0.0)
    # float: the oracle takes the float32-rounded inputs and the kernel's float32 c (theta(c) has
    # an infinite slope at |c| = 1, so the rounding of c itself is not what is checked here: the
    # arccos polynomial, the square roots and the formula are)
    cases = {
        "v3 float32": (0, c_of(rs3_32, f32(s)), 1e-6, f32),
        "v3 float64": (2, c_of(rs3_64, s), 1e-14, np.float64),
        "v5 float32": (4, c_of(f32(fx[:, 1]) * f32(fz[:, 1]), f32(s)), 1e-6, f32),
        "v5 float64": (6, c_of(fx[:, 1] * fz[:, 1], s), 1e-14, np.float64),
        "v6 float32": (8, c_of(rs6_32, f32(s)), 1e-6, f32),
        "v6 float64": (10, c_of(rs6_64, s), 1e-14, np.float64),
    }
    for what, (col, ck, tol, cast) in cases.items():
        r64 = lambda a: np.asarray(cast(a), dtype=np.float64)  # noqa: E731
        k, g = relu_oracle(r64(s), r64(th), r64(qx), r64(qz), ck)
        for name, err, sc in (("K", got[:, col] - k, scale_k), ("G", got[:, col + 1] - g, scale_g)):
            e = np.abs(err) / np.where(sc > 0, sc, 1.0)
            i = int(np.argmax(e))
            assert e[i] < tol, f"{what} {name}: error {e[i]:.2e} of its scale at c={c[i]!r}, row {i}"
        # exact where the rules say so
        np.testing.assert_array_equal(got[50:100, col], 0.0, err_msg=f"{what}: zero variance, K = 0")
        np.testing.assert_array_equal(got[:50, col], r64(s[:50]) / 2, err_msg=f"{what}: self pair")
        np.testing.assert_array_equal(got[:50, col + 1], r64(th[:50]) / 2, err_msg=f"{what}: self pair")


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_v5_factors_of_windows_below_the_smallest_normal_are_zero(dtype):
    """v5 multiplies two images' 1 / sqrt(q): for q below the compute dtype's smallest normal
    number the product overflowed (and 0 * inf gave NaN); those factors are 0 (c := 0), every
    product of two others is finite, and the rest are 1 / sqrt(q)."""
    from cntk_engine.backends.cuda import DIAG_LAYOUTS
    tiny = float(np.finfo(dtype).tiny)
    q = np.array([0.0, 1e-320, tiny / 2, 1e-200, tiny, 1e-30, 1.0, 3e5])
    f = DIAG_LAYOUTS["factors"][0](q, np, dtype).astype(dtype)
    kept = q >= tiny
    assert np.all(f[~kept, 1] == 0)
    np.testing.assert_allclose(f[kept, 1].astype(np.float64), 1 / np.sqrt(q[kept]), rtol=1e-6)
    np.testing.assert_allclose(f[:, 0].astype(np.float64) ** 2 * 2 * np.pi, q, rtol=1e-6,
                               atol=tiny)
    with np.errstate(over="raise"):
        products = np.multiply.outer(f[:, 1], f[:, 1])
    assert products.dtype == dtype and np.all(np.isfinite(products))


# ----------------------------------------------------- prepare's layouts, pairs' launch parameters
@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_prepare_builds_the_layout_the_variant_reads(variant, dtype):
    extension()
    from cntk_engine.backends.cuda import CudaBackend
    rng = np.random.default_rng(1)
    x = rng.standard_normal((3, 2, 6, 5))
    x[2] = 0.0                                       # an all-zero image: q = 0 everywhere
    arch = Architecture(depths=(3, 5), filter_size=3)
    params = arch.layer_params(2, 6, 5)
    be = CudaBackend(arch, params, dtype, kernel=variant)
    p = be.prepare_arrays(x, np)
    q = diag_norms(x, arch, params)                  # (3, 4, 6, 5)
    (d,) = p.diag
    assert p.images.dtype == d.dtype == np.dtype(dtype) and p.images.flags.c_contiguous
    np.testing.assert_array_equal(p.images, x.astype(dtype))
    assert d.flags.c_contiguous
    np.testing.assert_array_equal(d[:, :, 6:], d[:, :, :6])     # rows stored twice
    if variant in ("v3", "v8"):                    # v8 reads what v3 reads
        assert d.shape == (3, 4, 12, 5)
        np.testing.assert_array_equal(d[:, :, :6], q.astype(dtype))
    elif variant in ("v6", "v7"):                  # v7 reads what v6 reads
        assert d.shape == (3, 4, 12, 5)
        np.testing.assert_array_equal(d[:, :, :6], np.sqrt(q).astype(dtype))
    else:
        assert d.shape == (3, 4, 12, 5, 2)
        _, inv = sqrt_and_inverse(q)                 # the numba backend's factors
        np.testing.assert_array_equal(d[:, :, :6, :, 1], inv.astype(dtype))
        tol = 1e-6 if dtype == "float32" else 1e-15
        np.testing.assert_allclose(d[:, :, :6, :, 0].astype(np.float64) ** 2 * 2 * np.pi, q, rtol=tol)
    assert np.all(d[2] == 0)                         # zero variance: q = 0, or both factors 0


class FakeDeviceArray:
    """A stand-in for a CuPy array: shape, dtype and a device address (never dereferenced);
    with ``device`` (a GPU id) or ``strides`` given, also CuPy's ``device.id``, ``strides`` and
    ``flags.c_contiguous``."""

    def __init__(self, shape, dtype, ptr, device=None, strides=None):
        self.shape, self.dtype = tuple(shape), np.dtype(dtype)
        self.data = types.SimpleNamespace(ptr=ptr)
        if device is not None:
            self.device = types.SimpleNamespace(id=device)
        if strides is not None:
            self.strides = tuple(strides)
            row_major = np.empty(self.shape, self.dtype).strides
            self.flags = types.SimpleNamespace(c_contiguous=self.strides == row_major)


def fake_launch(be, pa, pb, n_pairs, base=1 << 20, misalign=None):
    """launch_params of a backend for prepared NumPy sets, on fake device addresses (misalign:
    (array name, bytes added to its address))."""
    arrays = {"xa": pa.images, "da": pa.diag[0], "xb": pb.images, "db": pb.diag[0],
              "ia": np.zeros(n_pairs, np.int32), "ib": np.zeros(n_pairs, np.int32),
              "slot": be.readout_slots(),
              "out": np.zeros((n_pairs, len(be.arch.depths), 2))}
    off = dict([misalign]) if misalign else {}
    fakes = {k: FakeDeviceArray(a.shape, a.dtype, base * (i + 1) + off.get(k, 0))
             for i, (k, a) in enumerate(arrays.items())}
    return be.launch_params(*fakes.values(), same_set=True, device=0, stream=0)


def test_a_launch_refuses_strided_arrays_and_arrays_on_another_gpu():
    """pairs() makes its arrays contiguous on the current GPU; a direct caller of launch_params
    with a strided view read other elements, and with an array on another GPU an address the
    launch's GPU cannot read (helper-91)."""
    extension()
    from cntk_engine.backends.cuda import CudaBackend
    x = np.random.default_rng(2).standard_normal((2, 1, 6, 6))
    arch = Architecture(depths=(3,))
    be = CudaBackend(arch, arch.layer_params(1, 6, 6), "float32", kernel="v3")
    pa = be.prepare_arrays(x, np)
    arrays = {"xa": pa.images, "da": pa.diag[0], "xb": pa.images, "db": pa.diag[0],
              "ia": np.zeros(3, np.int32), "ib": np.zeros(3, np.int32), "slot": be.readout_slots(),
              "out": np.zeros((3, 1, 2))}

    def launch(name, **kw):
        fakes = [FakeDeviceArray(a.shape, a.dtype, (1 << 20) * (i + 1), **(kw if k == name else {}))
                 for i, (k, a) in enumerate(arrays.items())]
        return be.launch_params(*fakes, same_set=True, device=1, stream=0)
    reversed_rows = np.empty(pa.images.shape, pa.images.dtype).strides
    reversed_rows = (reversed_rows[0],) + reversed_rows[1:3] + (-reversed_rows[3],)
    with pytest.raises(ValueError, match=r"CUDA kernel v3: xb must be C-contiguous .* got strides"):
        launch("xb", strides=reversed_rows)
    with pytest.raises(ValueError, match=r"CUDA kernel v3: out is on GPU 0 and the launch on GPU 1"):
        launch("out", device=0)
    launch("da", device=1, strides=np.empty(pa.diag[0].shape, pa.diag[0].dtype).strides)   # fine


@pytest.mark.parametrize("variant", VARIANTS)
def test_pairs_launch_parameters_are_built_once_and_checked(variant):
    extension()
    from cntk_engine.backends.cuda import CudaBackend
    x = np.random.default_rng(2).standard_normal((4, 3, 32, 32))
    arch = Architecture(depths=(3, 21), pooling="flatten", convention="neural_tangents", b_std=0.5)
    params = arch.layer_params(3, 32, 32)
    be = CudaBackend(arch, params, "float32", kernel=variant)
    pa = be.prepare_arrays(x, np)
    np.testing.assert_array_equal(be.readout_slots(), [-1, 0] + [-1] * 17 + [1])
    p = fake_launch(be, pa, pa, 10)
    assert (p.kernel, p.dtype, p.n_pairs, p.C, p.H, p.W, p.L, p.filter_size, p.n_out) == \
        (variant, "float32", 10, 3, 32, 32, 20, 3, 2)
    assert (p.gap, p.fix, p.same_set, p.device) == (False, False, True, 0)
    assert (p.w_first, p.w, p.b2) == (params.w_first, params.w, params.b2)
    assert repr(p).startswith(f"PairSumsParams(kernel='{variant}', dtype='float32', n_pairs=10")
    # the diagonals a variant of another diagonal shape prepared: refused, naming the layout
    # (layouts of the same shape are told apart by Prepared.layout: the test below)
    other = CudaBackend(arch, params, "float32", kernel="v3" if variant == "v5" else "v5")
    with pytest.raises(ValueError, match=rf"CUDA kernel {variant}: da must be float32 of shape"):
        fake_launch(be, other.prepare_arrays(x, np), pa, 10)
    with pytest.raises(ValueError, match=r"xb must be float32 of shape \(4, 3, 32, 32\).*got float64"):
        fake_launch(be, pa, CudaBackend(arch, params, "float64", kernel=variant).prepare_arrays(x, np), 10)
    with pytest.raises(ValueError, match=r"da must be float32 of shape \(4, 20, 64, 32.*\) \(diagonal "
                                         r"layout '(q|factors|sqrt)'\); got float32 \(4, 20, 32, 32"):
        fake_launch(be, type(pa)(pa.images, (pa.diag[0][:, :, :32],)), pa, 10)
    # pointers are the extension's to check: a diagonal value off its alignment (v5 reads
    # 2-vectors: 8 bytes in float32)
    align, off = {"v3": (4, 2), "v5": (8, 4), "v6": (4, 2), "v7": (4, 2), "v8": (4, 2)}[variant]
    with pytest.raises(ValueError, match=rf"da = {hex(0x200000 + off)} is not aligned to the {align} "
                                         rf"bytes of its elements \(kernel {variant}, float32\)"):
        fake_launch(be, pa, pa, 10, misalign=("da", off))


def test_sets_prepared_for_another_layout_of_the_same_shape_are_refused():
    # v3 reads q and v6 sqrt(q): arrays of the same shape and dtype, so the launch's shape check
    # cannot tell them apart; the layout each Prepared carries (kept by slicing) does
    extension()
    from cntk_engine.backends.cuda import CudaBackend
    x = np.random.default_rng(3).standard_normal((3, 2, 6, 5))
    arch = Architecture(depths=(3,))
    params = arch.layer_params(2, 6, 5)
    v3, v6 = (CudaBackend(arch, params, "float32", kernel=k) for k in ("v3", "v6"))
    p3, p6 = v3.prepare_arrays(x, np), v6.prepare_arrays(x, np)
    assert (p3.layout, p6.layout, p6[1:].layout) == ("q", "sqrt", "sqrt")
    assert p3.diag[0].shape == p6.diag[0].shape and p3.diag[0].dtype == p6.diag[0].dtype
    ia = ib = np.zeros(2, np.int32)
    assert v6.launch_arrays(p6, p6[1:], ia, ib, np)[1].shape == p6.diag[0].shape
    with pytest.raises(ValueError, match=r"CUDA kernel v6 reads diagonals in layout 'sqrt'; set b "
                                         r"was prepared in layout 'q' \(by a backend running another "
                                         r"kernel variant\): prepare it with this backend"):
        v6.launch_arrays(p6, p3[:2], ia, ib, np)
    with pytest.raises(ValueError, match=r"CUDA kernel v3 .* set a was prepared in layout 'sqrt'"):
        v3.launch_arrays(p6, p3, ia, ib, np)


GOOD = dict(device=0, stream=0, kernel="v3", dtype="float32", xa=256, da=512, xb=768, db=1024,
            pair_a=1280, pair_b=1536, slot=1792, out=2048, n_pairs=10, C=3, H=32, W=32, L=20,
            filter_size=3, n_out=2, w_first=1.0, w=2 / 9, b2=0.0, gap=True, fix=False,
            same_set=True)


@pytest.mark.parametrize("change,message", [
    (dict(kernel="v4"), r"unknown CUDA kernel variant 'v4'; compiled variants: v3, v5, v6, v7, v8"),
    (dict(dtype="float16"), r"dtype must be 'float32' or 'float64'; got 'float16'"),
    (dict(H=33), r"at most 32 x 32 pixels.*got H x W = 33 x 32"),
    (dict(W=0), r"height and width must be >= 1"),
    (dict(filter_size=9), r"odd filter sizes 1, 3, 5 or 7.*filter_size = 9"),
    (dict(filter_size=4), r"odd filter sizes 1, 3, 5 or 7"),
    (dict(n_out=65, L=80), r"1 to 64 depths per pass.*n_out = 65"),
    (dict(C=0), r"C \(channels\) must be >= 1; got 0"),
    (dict(L=1), r"L \(ReLU layers\) must be >= 1 and >= n_out.*L = 1, n_out = 2"),
    (dict(n_pairs=-1), r"n_pairs must be in \[0, 2\^31 - 1\].*got -1"),
    (dict(n_pairs=2 ** 31), r"n_pairs must be in \[0, 2\^31 - 1\].*got 2147483648"),
    (dict(device=-1), r"device must be a CUDA device ordinal >= 0; got -1"),
    (dict(pair_b=0), r"pair_b is a null pointer \(a device pointer is needed for 10 pairs\)"),
    (dict(out=0), r"out is a null pointer"),
    (dict(xa=258), r"xa = 0x102 is not aligned to the 4 bytes of its elements \(kernel v3, float32\)"),
    (dict(dtype="float64", xb=772), r"xb = 0x304 is not aligned to the 8 bytes .*float64"),
    (dict(kernel="v5", dtype="float64", db=1032), r"db = 0x408 is not aligned to the 16 bytes .*v5, float64"),
    (dict(slot=1794), r"slot = 0x702 is not aligned to the 4 bytes"),
], ids=lambda v: str(v)[:40])
def test_the_extension_checks_launch_parameters_once_before_any_cuda_call(change, message):
    ext = extension()
    with pytest.raises(ValueError, match=message):
        ext.PairSumsParams(**dict(GOOD, **change))


MYRTLE5_STAGES = [(32, 32, 2, 2), (16, 16, 1, 2), (8, 8, 1, 0)]
GOOD_STACK = dict(GOOD, L=4, n_out=1, stages=MYRTLE5_STAGES, grids=2304, n_grids=64,
                  readout_scale=1 / 4096)


@pytest.mark.parametrize("change,message", [
    (dict(stages=[(16, 16, 2, 2), (8, 8, 2, 0)]), r"first stage is the images' size H x W = 32 x 32; got 16 x 16"),
    (dict(L=5), r"stages hold L = 5 conv layers in all; got 4"),
    (dict(n_out=2, L=4), r"a stack reads out one depth \(n_out = 1\); got 2"),
    (dict(stages=[(32, 32, 2, 3), (16, 16, 2, 0)]), r"window \(= stride\) >= 1 that divides the stage's height"),
    (dict(stages=[(32, 32, 2, 2), (15, 16, 2, 0)]), r"the size of the stage before divided by that stage's pool"),
    (dict(stages=[(32, 32, 4, 2), (16, 16, 0, 0)]), r"every stage of a stack has at least one conv layer"),
    (dict(stages=[(32, 32, 1, 1)] * 8 + [(32, 32, 1, 0)], L=9), r"a stack of 9 stages; the CUDA stack kernel takes 1 to 8"),
    (dict(n_grids=65), r"1 to 64 listed packed grids of its last stage; got n_grids = 65"),
    (dict(n_grids=0), r"1 to 64 listed packed grids"),
    (dict(grids=0), r"grids is a null pointer"),
    (dict(readout_w=2052), r"readout_w = 0x804 is not aligned to the 8 bytes"),
    (dict(filter_size=5), r"the CUDA stack kernel takes filter size 3"),
    (dict(stack_blocks_per_sm=3), r"stack_blocks_per_sm must be 0 \(the default\), 1 or 2; got 3"),
    (dict(stack_blocks_per_sm=2, dtype="float64"), r"compiled for 32 x 32 images in float32 only; got 32 x 32 in float64"),
], ids=lambda v: str(v)[:40])
def test_the_extension_checks_stack_launch_parameters(change, message):
    ext = extension()
    p = ext.PairSumsParams(**GOOD_STACK)
    assert (p.n_stages, p.L, p.n_out, p.n_grids, p.readout_scale) == (3, 4, 1, 64, 1 / 4096)
    assert "n_stages=3" in repr(p)
    assert ext.PairSumsParams(**dict(GOOD_STACK, readout_w=4096)).n_stages == 3   # grid_w unused
    assert ext.PairSumsParams(**dict(GOOD_STACK, stack_blocks_per_sm=2)).stack_blocks_per_sm == 2
    assert ext.unsupported_stack(MYRTLE5_STAGES, 3) is None
    assert "1 to 32 pixels" in ext.unsupported_stack([(64, 64, 1, 0)], 3)
    assert "filter size 3" in ext.unsupported_stack(MYRTLE5_STAGES, 5)
    with pytest.raises(ValueError, match=message):
        ext.PairSumsParams(**dict(GOOD_STACK, **change))


@pytest.mark.parametrize("variant", VARIANTS)
def test_stack_launch_fields_and_diagonal_layout(variant):
    """Myrtle-5's launch: three stages, the 64 grids of the 8 x 8 stage with the one weight
    1 / 64^2; each layer's diagonals at its stage's width, rows twice; a flatten readout lists
    per-entry weights."""
    extension()
    from cntk_engine.arch import AvgPool, ConvRelu, make_architecture, readout_weights, serial
    from cntk_engine.backends.cuda import CudaBackend, DIAG_LAYOUTS
    from cntk_engine.diag import diag_norms
    x = np.random.default_rng(4).standard_normal((2, 3, 32, 32))
    arch = make_architecture(architecture="myrtle5")
    params = arch.layer_params(3, 32, 32)
    be = CudaBackend(arch, params, "float64", kernel=variant)
    pa = be.prepare_arrays(x, np)
    xa, da, xb, db, ia, ib, slot, out, grids, rw = be.launch_arrays(pa, pa, np.array([0, 1]),
                                                                    np.array([1, 1]), np)
    f = be.launch_fields(xa, da, xb, db, ia, ib, slot, out, True, grids, rw)
    assert f["stages"] == MYRTLE5_STAGES and rw is None and "readout_w" not in f
    assert f["stack_blocks_per_sm"] == 0
    assert f["readout_scale"] == 1 / 4096 and f["n_grids"] == 64 and f["n_out"] == 1
    np.testing.assert_array_equal(f["grids"], np.arange(64))
    q = diag_norms(x, arch, params)
    d = DIAG_LAYOUTS[be.variant["diag"]][0](q, np, be.dtype)
    flat = da.reshape(2, 4, 2 * 32 * 32, -1)
    for layer, (h, w) in enumerate([(32, 32), (32, 32), (16, 16), (8, 8)]):
        rows = d[:, layer, :h, :w].reshape(2, h * w, -1)
        np.testing.assert_array_equal(flat[:, layer, :h * w], rows)
        np.testing.assert_array_equal(flat[:, layer, h * w:2 * h * w], rows)
        assert np.all(flat[:, layer, 2 * h * w:] == 0)
    # a readout with unequal weights: per-entry weights of the listed grids, R(p, p + offset)
    flat_arch = make_architecture(architecture=serial(ConvRelu(), AvgPool(2), ConvRelu()),
                                  pooling="flatten")
    be = CudaBackend(flat_arch, flat_arch.layer_params(1, 8, 8), "float32", kernel=variant)
    g, w, scale = be.stack_readout(8, 8)
    r = readout_weights(flat_arch, 8, 8)
    assert scale == 1.0 and list(g) == [0] and w.shape == (1, 4, 4)
    np.testing.assert_array_equal(w[0], np.einsum("ijij->ij", r))
    with pytest.raises(ValueError, match="a stack's launch needs the listed grids"):
        be.launch_fields(*be.launch_arrays(be.prepare_arrays(np.ones((1, 1, 8, 8)), np),
                                           be.prepare_arrays(np.ones((1, 1, 8, 8)), np),
                                           np.array([0]), np.array([0]), np)[:8], True, None, None)


def test_the_extension_uses_no_iostreams():
    """On the H200 machine's torch image every message the binding built with std::ostringstream
    (the parameter check's, __repr__'s) crashed the process, while the same code ran elsewhere;
    the extension's sources (csrc/, less the host test program) build strings without iostreams."""
    root = Path(__file__).resolve().parents[1] / "csrc"
    code = re.compile(r"#include\s*<(sstream|iostream|ostream|fstream)>|\bstd::\w*stream\b")
    offenders = []
    for f in sorted(root.iterdir()):
        if f.suffix not in (".cpp", ".cu", ".cuh") or f.name == "relu_step_check.cpp":
            continue
        for n, line in enumerate(f.read_text().splitlines(), 1):
            if code.search(line.split("//")[0]):
                offenders.append(f"{f.name}:{n}: {line.strip()}")
    assert not offenders, "iostreams in the extension's sources:\n" + "\n".join(offenders)


def test_valid_launch_parameters_and_the_shape_rule():
    ext = extension()
    for kernel in VARIANTS:
        for dtype in ("float32", "float64"):
            p = ext.PairSumsParams(**dict(GOOD, kernel=kernel, dtype=dtype))
            assert (p.kernel, p.dtype) == (kernel, dtype)
    # no pairs: nothing is read, so no pointer is needed
    ext.PairSumsParams(**dict(GOOD, n_pairs=0, xa=0, da=0, xb=0, db=0, pair_a=0, pair_b=0, slot=0, out=0))
    # the shape rule, written once in csrc/cntk_kernels.cu, as the backend sees it
    from cntk_engine.backends.cuda import CudaBackend
    arch = Architecture(depths=(3,), filter_size=5)
    assert CudaBackend.unsupported(arch, (1, 32, 32), "float32") is None
    assert "at most 32 x 32" in CudaBackend.unsupported(arch, (1, 32, 33), "float32")
    assert "odd filter sizes" in CudaBackend.unsupported(Architecture(depths=(3,), filter_size=9), (1, 8, 8),
                                                         "float32")
    # checked once, where the job's backend is chosen (backends.choose), with the limit named
    from cntk_engine.backends import choose
    caps = {"cuda": {"unavailable": None,
                     "unsupported": CudaBackend.unsupported(arch, (1, 33, 8), "float32")}}
    with pytest.raises(ValueError, match="backend='cuda' cannot take this input: .*33 x 8"):
        choose("cuda", caps)


@pytest.mark.parametrize("h,w,c", [(4, 4, 2), (6, 5, 3), (8, 8, 8), (7, 4, 1), (32, 32, 4)])
def test_lap_listed_grids_are_the_readout_weights_packed(h, w, c):
    # the kernel's packed grid g = dy * W + dx holds R((i, j), ((i + dy) mod H, (j + dx) mod W))
    # at (i, j): LAP's readout weights (arch.readout_weights) are one number per packed grid
    from cntk_engine.arch import readout_weights
    from cntk_engine.backends.cuda import CudaBackend
    arch = Architecture(depths=(3,), pooling="lap", lap_window=c)
    be = CudaBackend(arch, arch.layer_params(1, h, w), "float32")
    grids, wts = be.listed_grids(h, w)
    assert grids.dtype == np.int32 and wts.dtype == np.float64 and np.all(np.diff(grids) > 0)
    r = readout_weights(arch, h, w)
    i, j = np.arange(h)[:, None], np.arange(w)[None, :]
    packed = np.stack([r[i, j, (i + dy) % h, (j + dx) % w] for dy in range(h) for dx in range(w)])
    assert np.all(packed == packed[:, :1, :1])                    # one weight per grid
    np.testing.assert_array_equal(grids, np.flatnonzero(packed[:, 0, 0]))
    np.testing.assert_allclose(wts, packed[grids, 0, 0], rtol=1e-15)
    # the readout of all entries, grid by grid, is the readout weights' sum
    assert np.isclose((wts * h * w).sum(), r.sum(), rtol=1e-13)
    for pooling in ("gap", "flatten"):
        assert CudaBackend(Architecture(depths=(3,), pooling=pooling), None, "float32").listed_grids(h, w) is None


def test_lap_launch_parameters_carry_the_listed_grids():
    ext = extension()
    from cntk_engine.backends.cuda import CudaBackend
    x = np.random.default_rng(2).standard_normal((4, 3, 32, 32))
    arch = Architecture(depths=(3, 5), pooling="lap", lap_window=4)
    params = arch.layer_params(3, 32, 32)
    be = CudaBackend(arch, params, "float32", kernel="v3")
    pa = be.prepare_arrays(x, np)
    grids, wts = be.listed_grids(32, 32)
    assert grids.size == 7 * 7                   # offsets -3 .. 3 per axis, circularly
    g = FakeDeviceArray(grids.shape, np.int32, 1 << 30)
    gw = FakeDeviceArray(wts.shape, np.float64, 1 << 31)
    arrays = {"xa": pa.images, "da": pa.diag[0], "xb": pa.images, "db": pa.diag[0],
              "ia": np.zeros(5, np.int32), "ib": np.zeros(5, np.int32),
              "slot": be.readout_slots(), "out": np.zeros((5, 2, 2))}
    fakes = [FakeDeviceArray(a.shape, a.dtype, (1 << 20) * (k + 1)) for k, a in enumerate(arrays.values())]
    p = be.launch_params(*fakes, same_set=True, device=0, stream=0, grids=g, grid_w=gw)
    assert p.n_grids == 49 and "n_grids=49" in repr(p)
    with pytest.raises(ValueError, match="grids and grid_w are needed for the LAP readout"):
        be.launch_params(*fakes, same_set=True, device=0, stream=0)
    with pytest.raises(ValueError, match=r"grids must be int32 of shape \(49,\)"):
        be.launch_params(*fakes, same_set=True, device=0, stream=0,
                         grids=FakeDeviceArray((48,), np.int32, 1 << 30), grid_w=gw)
    # the extension's checks of the list: its size, and its pointers when it is read
    with pytest.raises(ValueError, match=r"n_grids .* must be in \[0, H \* W = 1024\]; got 1025"):
        ext.PairSumsParams(**dict(GOOD, grids=4096, grid_w=8192, n_grids=1025))
    with pytest.raises(ValueError, match="grid_w is a null pointer"):
        ext.PairSumsParams(**dict(GOOD, grids=4096, n_grids=3))
    with pytest.raises(ValueError, match=r"grid_w = 0x1004 is not aligned to the 8 bytes"):
        ext.PairSumsParams(**dict(GOOD, grids=4096, grid_w=4100, n_grids=3))
    assert ext.PairSumsParams(**dict(GOOD, grids=4096, grid_w=8192, n_grids=3)).n_grids == 3
    assert ext.PairSumsParams(**GOOD).n_grids == 0          # gap / flatten: no list, none read


# --------------------------------------------------- backend="auto" and code not run on a GPU
def test_auto_does_not_choose_cuda_for_code_not_run_on_a_gpu(monkeypatch, caplog):
    from cntk_engine import backends
    from cntk_engine.arch import make_architecture
    from cntk_engine.backends.cuda import NOT_GPU_VERIFIED, CudaBackend
    cnn = Architecture(depths=(3,))
    flip = Architecture(depths=(3,), flip=True)
    lap = Architecture(depths=(3,), pooling="lap", lap_window=3)
    both = Architecture(depths=(3,), pooling="lap", lap_window=2, flip=True)
    myrtle = make_architecture(architecture="myrtle5")
    assert CudaBackend.unverified(cnn, (3, 32, 32), "float32") is None
    assert CudaBackend.unverified(flip, (3, 32, 32), "float32") == (
        "the CUDA kernels for flip-symmetrised kernels have not run on a GPU yet (backend='cuda' "
        "runs them; docs/cuda_kernels.md)")
    if "lap" in NOT_GPU_VERIFIED:
        assert "for the LAP readout and flip-symmetrised kernels have not run on a GPU" in \
            CudaBackend.unverified(both, (1, 8, 8), "float32")
    if "stack" in NOT_GPU_VERIFIED:
        assert "pooled stacks" in CudaBackend.unverified(myrtle, (3, 32, 32), "float32")
    # the rule lives in backends.choose: auto skips an unverified backend, a named one runs it
    caps = {"cuda": {"unavailable": None, "unsupported": None, "unverified": "not run on a GPU"},
            "numba": {"unavailable": None, "unsupported": None, "unverified": None}}
    name, why = backends.choose("auto", caps)
    assert name == "numba" and why == "cuda: not run on a GPU; numba can run it"
    assert backends.choose("cuda", caps) == ("cuda", "asked for, although not run on a GPU")
    caps["cuda"]["unverified"] = None
    assert backends.choose("auto", caps)[0] == "cuda"
    del caps["cuda"]["unverified"]                    # reports without the key
    assert backends.choose("auto", caps)[0] == "cuda"
    # capabilities asks the backend; resolve picks numba for auto, cuda by name (with a warning)
    extension()
    monkeypatch.setattr(CudaBackend, "unavailable_reason", classmethod(lambda cls: None))
    caps = backends.capabilities(flip, (3, 8, 8), "float32")
    assert caps["cuda"]["unavailable"] is None and caps["cuda"]["unsupported"] is None
    assert "flip" in caps["cuda"]["unverified"] and caps["numba"]["unverified"] is None
    assert backends.capabilities(cnn, (3, 8, 8), "float32")["cuda"]["unverified"] is None
    assert backends.resolve("auto", flip, (3, 8, 8), "float32").name == "numba"
    assert backends.resolve("auto", cnn, (3, 8, 8), "float32").name == "cuda"
    with caplog.at_level("WARNING", logger="cntk_engine"):
        assert backends.resolve("cuda", flip, (3, 8, 8), "float32").name == "cuda"
    assert "backend 'cuda': asked for, although the CUDA kernels for flip-symmetrised" in caplog.text
    # what is not computed is refused, not unverified
    for arch in ([myrtle] if "stack" not in NOT_GPU_VERIFIED else []) + \
            ([lap] if "lap" not in NOT_GPU_VERIFIED else []):
        caps = backends.capabilities(arch, (3, 32, 32), "float32")
        assert caps["cuda"]["unsupported"] and caps["cuda"]["unverified"] is None
        assert backends.resolve("auto", arch, (3, 32, 32), "float32").name == "numba"


# ----------------------------------------------------------------------------- GPU: exactness
CASES = [
    ((3, 2, 6, 5), dict(convention="arora", pooling="gap")),
    ((2, 1, 7, 4), dict(convention="arora", pooling="gap", fix=True, filter_size=5)),
    ((2, 3, 5, 5), dict(convention="neural_tangents", pooling="flatten", b_std=0.2, filter_size=1)),
    ((3, 3, 9, 13), dict(convention="neural_tangents", pooling="gap", b_std=0.3, W_std=1.2)),
    ((2, 2, 17, 11), dict(convention="arora", pooling="flatten", fix=True, filter_size=7)),
    ((2, 1, 32, 32), dict(convention="arora", pooling="gap", filter_size=3)),
    # the other guard-free 32 x 32 kernels (one per filter size and readout; helper-91)
    ((2, 1, 32, 32), dict(convention="arora", pooling="flatten", filter_size=1)),
    ((2, 3, 32, 32), dict(convention="neural_tangents", pooling="gap", filter_size=5, b_std=0.1)),
    ((2, 1, 32, 32), dict(convention="arora", pooling="flatten", filter_size=7)),
]


@pytest.fixture(params=VARIANTS)
def variant(request, monkeypatch):
    """Runs the test once per kernel variant, selected as a user would (the environment)."""
    monkeypatch.setenv("CNTK_ENGINE_CUDA_KERNEL", request.param)
    return request.param


def runs_its_own(variant, what):
    """Skips a test of ``what`` (the LAP readout, pooled stacks) under a variant that compiles
    no kernel of its own for it (kBaseVariant: v7 and v8 launch v6's and v3's there), whose run
    would repeat its base's test in the device time of a short GPU visit."""
    base = {v["name"]: v["base"] for v in cuda_backend.kernel_variants()}[variant]
    if base != variant:
        pytest.skip(f"{variant} launches {base}'s kernels for {what} (kBaseVariant): tested under {base}")


def test_derived_variants_skip_the_tests_of_their_bases_kernels():
    extension()
    for v in VARIANTS:
        try:
            runs_its_own(v, "pooled stacks")
            skipped = None
        except pytest.skip.Exception as e:
            skipped = str(e)
        assert (skipped is not None) == (v in ("v7", "v8")), (v, skipped)
    with pytest.raises(pytest.skip.Exception, match="v7 launches v6's kernels for pooled stacks"):
        runs_its_own("v7", "pooled stacks")


@gpu
@pytest.mark.parametrize("shape,case", CASES,
                         ids=[f"{c[0]}-k{c[1].get('filter_size', 3)}-{c[1]['pooling']}" for c in CASES])
def test_cuda_matches_reference(variant, shape, case):
    rng = np.random.default_rng(sum(shape))
    x = rng.standard_normal(shape)
    depths = [3, 4, 7] if case.get("fix") else [2, 3, 7]   # fix=True needs depth >= 3
    ref = reference_gram(x, None, depths, case)             # once for all the variants
    for dtype, tol in (("float32", 1e-4), ("float64", 1e-10)):
        got = ce.gram(x, depths=depths, kernel="both", backend="cuda", dtype=dtype, **case)
        for d in ref:
            for i in range(2):
                if np.abs(ref[d][i]).max() == 0:
                    assert np.abs(got[d][i]).max() == 0
                else:
                    assert rel(got[d][i], ref[d][i]) < tol, (variant, dtype, d, i)


_REFERENCE = {}


def reference_gram(x, b, depths, case):
    """The float64 reference Gram of (x, b), computed once per test session and arguments (the
    GPU tests below compare every kernel variant and dtype against it)."""
    key = (x.tobytes(), None if b is None else b.tobytes(), tuple(depths), repr(sorted(case.items())))
    if key not in _REFERENCE:
        _REFERENCE[key] = ce.gram(x, b, depths=depths, kernel="both", backend="reference", **case)
    return _REFERENCE[key]


def case_depths(shape, case):
    """Depths of a flip / LAP case: fix=True needs depth >= 3; 32 x 32 images fewer layers (the
    reference's cost)."""
    if shape[-1] == 32:
        return [3, 4] if case.get("fix") else [2, 4]
    return [3, 4, 7] if case.get("fix") else [2, 3, 7]


# Flip-symmetrised kernels: no kernel of their own; the pairs with the flipped images run
# through the CNN kernel (Backend.prepare_set / pair_sums in backends/base.py, on CuPy images).
FLIP_CASES = [
    ((3, 2, 6, 5), dict(pooling="gap", flip=True)),
    ((2, 3, 9, 13), dict(pooling="flatten", flip=True, convention="neural_tangents", b_std=0.2)),
    ((2, 1, 7, 4), dict(pooling="gap", flip=True, fix=True, filter_size=5)),
    ((2, 3, 32, 32), dict(pooling="flatten", flip=True, filter_size=3)),
]


@gpu
@pytest.mark.parametrize("shape,case", FLIP_CASES, ids=[str(c[0]) for c in FLIP_CASES])
def test_cuda_flip_matches_reference(variant, shape, case):
    rng = np.random.default_rng(sum(shape) + 7)
    x, y = rng.standard_normal(shape), rng.standard_normal((2,) + shape[1:])
    x[-1] = x[0][..., ::-1]               # an image whose flip is in the set: K(x, F x) a self pair
    check_cuda_against_reference(x, y, case_depths(shape, case), case, variant)


def check_cuda_against_reference(x, y, depths, case, variant):
    """cuda in float32 and float64 against the float64 reference, symmetric and x against y."""
    for b in (None, y):
        ref = reference_gram(x, b, depths, case)
        for dtype, tol in (("float32", 1e-4), ("float64", 1e-10)):
            got = ce.gram(x, b, depths=depths, kernel="both", backend="cuda", dtype=dtype, **case)
            for d in ref:
                for i in range(2):
                    assert rel(got[d][i], ref[d][i]) < tol, (variant, dtype, d, i, b is None)


def real_cifar_and_mnist():
    """3 CIFAR images; 4 MNIST digits and an all-zero image (zero-variance windows)."""
    cifar = load_real("cifar10_jpeg_small.npz")["x_test"][:3].astype(np.float64).transpose(0, 3, 1, 2) / 255
    mnist = load_real("mnist_test.npz")["x"][:4].astype(np.float64)[:, None] / 255
    return cifar, np.concatenate([mnist, np.zeros((1, 1, 28, 28))])


def check_cuda_against_numba(x, variant, **arch):
    """cuda in float32 and float64 against numba's float64 Gram of x, depths 3 and 11."""
    b = ce.gram(x, depths=[3, 11], kernel="both", backend="numba", dtype="float64", **arch)
    for dtype, tol in (("float32", 1e-4), ("float64", 1e-10)):
        a = ce.gram(x, depths=[3, 11], kernel="both", backend="cuda", dtype=dtype, **arch)
        for d in a:
            for i in range(2):
                assert np.isfinite(a[d][i]).all()
                assert rel(a[d][i], b[d][i]) < tol, (variant, arch, dtype, d, i)


@gpu
def test_cuda_flip_real_images_against_numba(variant):
    cifar, mnist = real_cifar_and_mnist()
    for x, pooling in ((cifar, "gap"), (mnist, "flatten"), (mnist, "gap")):
        check_cuda_against_numba(x, variant, pooling=pooling, flip=True)


# The LAP readout: the CNN kernel's listed-grid instantiation (one weight per packed grid)
LAP_CASES = [
    ((3, 2, 6, 5), dict(pooling="lap", lap_window=2)),
    ((2, 1, 7, 4), dict(pooling="lap", lap_window=4, fix=True, filter_size=5)),     # c = W
    ((3, 3, 8, 8), dict(pooling="lap", lap_window=3, convention="neural_tangents", b_std=0.3)),
    ((3, 2, 8, 8), dict(pooling="lap", lap_window=3, flip=True, filter_size=1)),
    ((2, 2, 17, 11), dict(pooling="lap", lap_window=1, filter_size=7)),              # = flatten
    ((2, 1, 32, 32), dict(pooling="lap", lap_window=5, flip=True)),
]


@gpu
@pytest.mark.parametrize("shape,case", LAP_CASES, ids=[str(c[0]) for c in LAP_CASES])
def test_cuda_lap_matches_reference(variant, shape, case):
    runs_its_own(variant, "the LAP readout")
    rng = np.random.default_rng(sum(shape) + 3)
    x, y = rng.standard_normal(shape), rng.standard_normal((2,) + shape[1:])
    check_cuda_against_reference(x, y, case_depths(shape, case), case, variant)


@gpu
def test_cuda_lap_real_images_against_numba(variant):
    runs_its_own(variant, "the LAP readout")
    cifar, mnist = real_cifar_and_mnist()       # CIFAR at the paper's windows
    for x, c in ((cifar, 4), (cifar, 12), (mnist, 6)):
        check_cuda_against_numba(x, variant, pooling="lap", lap_window=c)


@gpu
def test_cuda_real_cifar_depth21_against_reference_and_numba(variant):
    x = load_real("cifar10_jpeg_small.npz")["x_test"][:3].astype(np.float64).transpose(0, 3, 1, 2) / 255
    ref = ce.gram(x[:2], depths=[3, 21], kernel="both", backend="reference")
    for dtype, tol in (("float32", 1e-4), ("float64", 1e-10)):
        got = ce.gram(x[:2], depths=[3, 21], kernel="both", backend="cuda", dtype=dtype)
        for d in ref:
            for i in range(2):
                assert rel(got[d][i], ref[d][i]) < tol, (variant, dtype, d, i)
    a = ce.gram(x, depths=[6, 11, 21], backend="cuda", dtype="float64")
    b = ce.gram(x, depths=[6, 11, 21], backend="numba", dtype="float64")
    for d in a:
        assert rel(a[d], b[d]) < 1e-10


@gpu
def test_cuda_real_mnist_zero_windows_and_zero_image(variant):
    x = load_real("mnist_test.npz")["x"][:6].astype(np.float64)[:, None] / 255
    x = np.concatenate([x, np.zeros((1, 1, 28, 28))])
    for pooling in ("gap", "flatten"):
        for dtype, tol in (("float32", 1e-4), ("float64", 1e-10)):
            a = ce.gram(x, depths=[3, 11], pooling=pooling, kernel="both", backend="cuda", dtype=dtype)
            b = ce.gram(x, depths=[3, 11], pooling=pooling, kernel="both", backend="numba", dtype="float64")
            for d in a:
                for i in range(2):
                    assert np.isfinite(a[d][i]).all()
                    assert rel(a[d][i], b[d][i]) < tol, (variant, pooling, dtype, d, i)
                    assert np.all(a[d][i][-1] == 0) and np.all(a[d][i][:, -1] == 0)


@gpu
def test_cuda_symmetric_equals_blocks_and_tiles(variant):
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
def test_cuda_identical_images_are_self_pairs(variant, dtype, tol):
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
def test_cuda_variants_agree_on_the_device():
    import cupy
    from cntk_engine.backends.cuda import CudaBackend
    x = np.random.default_rng(5).standard_normal((3, 3, 32, 32))
    arch = Architecture(depths=(3, 11))
    params = arch.layer_params(3, 32, 32)
    sums = {}
    for v in VARIANTS:
        be = CudaBackend(arch, params, "float64", kernel=v)
        p = be.prepare(cupy.asarray(x))
        sums[v] = be.pair_sums(p, p, symmetric=True).get()
    for v in VARIANTS[1:]:
        assert rel(sums[v], sums[VARIANTS[0]]) < 1e-10, v


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



# ------------------------------------------------------------------ GPU: pooled stacks (Myrtle)
# The stack kernel (csrc/stack_sums_kernel.cuh), against numba's float64 Gram; its source is
# also run without a GPU in tests/test_cuda_emulated.py.
@gpu
@pytest.mark.parametrize("arch_name", ["myrtle5", "myrtle10"])
def test_cuda_myrtle_real_cifar_against_numba(variant, arch_name):
    runs_its_own(variant, "pooled stacks")
    cifar, _ = real_cifar_and_mnist()
    ref = ce.gram(cifar, architecture=arch_name, kernel="both", backend="numba", dtype="float64")
    for dtype, tol in (("float32", 1e-4), ("float64", 1e-10)):
        got = ce.gram(cifar, architecture=arch_name, kernel="both", backend="cuda", dtype=dtype)
        for k in range(2):        # NTK, NNGP
            assert rel(got[k], ref[k]) < tol, (variant, arch_name, dtype, k)


@gpu
def test_cuda_stacks_against_numba(variant):
    runs_its_own(variant, "pooled stacks")
    from cntk_engine.arch import AvgPool, ConvRelu, serial
    c, pool = ConvRelu(), AvgPool(2)
    rng = np.random.default_rng(5)
    cases = [
        (rng.standard_normal((3, 2, 8, 8)), dict(architecture=serial(c, c, pool, c, pool, c, pool))),
        (rng.standard_normal((2, 1, 12, 12)), dict(architecture=serial(c, AvgPool(3), c, pool),
                                                   pooling="flatten")),
        (rng.standard_normal((3, 2, 6, 6)), dict(architecture=serial(c, pool, c, c), fix=True)),
        (rng.standard_normal((2, 2, 8, 8)), dict(architecture=serial(c, pool, c), pooling="lap",
                                                 lap_window=2, convention="neural_tangents", b_std=0.2)),
        (rng.standard_normal((2, 3, 8, 8)), dict(architecture=serial(c, pool, c), flip=True)),
    ]
    for x, kw in cases:
        check_stack_against_numba(x, variant, **kw)


@gpu
def test_cuda_stack_on_mnist_against_numba(variant):
    """Real digits and an all-zero image (zero-variance windows), 28 -> 14 -> 7 (a test of its
    own: the random cases above do not wait for the data sets)."""
    runs_its_own(variant, "pooled stacks")
    from cntk_engine.arch import AvgPool, ConvRelu, serial
    c, pool = ConvRelu(), AvgPool(2)
    _, mnist = real_cifar_and_mnist()
    check_stack_against_numba(mnist, variant, architecture=serial(c, pool, c, pool, c))


def check_stack_against_numba(x, variant, **kw):
    ref = ce.gram(x, kernel="both", backend="numba", dtype="float64", **kw)
    for dtype, tol in (("float32", 1e-4), ("float64", 1e-10)):
        got = ce.gram(x, kernel="both", backend="cuda", dtype=dtype, **kw)
        for k in range(2):    # NTK, NNGP
            assert rel(got[k], ref[k]) < tol, (variant, kw, dtype, k)


@gpu
def test_cuda_stack_kernel_is_deterministic(variant, monkeypatch):
    """The pooling adds are atomic but ordered by the rounds: the same bits every run.  The
    two-block candidate is another ptxas compilation of the same PTX (other registers), where
    ptxas may contract a plain mul and add into an FMA differently (the PTX ISA allows it for
    instructions without a rounding modifier), so it is compared to float32 rounding.  Random
    images: the order of the adds does not depend on the pixels."""
    runs_its_own(variant, "pooled stacks")
    x = np.random.default_rng(6).random((3, 3, 32, 32))
    a = ce.gram(x, architecture="myrtle5", backend="cuda", dtype="float32")
    b = ce.gram(x, architecture="myrtle5", backend="cuda", dtype="float32")
    assert a.tobytes() == b.tobytes()
    monkeypatch.setenv("CNTK_ENGINE_CUDA_STACK_BLOCKS", "2")
    c = ce.gram(x, architecture="myrtle5", backend="cuda", dtype="float32")
    assert rel(c, a) < 1e-6, "the two-block candidate differs beyond float32 rounding"


@pytest.mark.skipif(EXT is None, reason="the CUDA extension is not built (no nvcc at install)")
def test_two_stack_blocks_are_refused_up_front_where_not_compiled(monkeypatch):
    """=2 outside 32 x 32 float32 was refused by the binding only at the first launch, after the
    images were prepared (the host emulation, which skips that check, gave NaN sums)."""
    from cntk_engine.arch import AvgPool, ConvRelu, make_architecture, serial
    monkeypatch.setenv(cuda_backend.STACK_BLOCKS_ENV, "2")
    small = make_architecture(architecture=serial(ConvRelu(), AvgPool(2), ConvRelu()))
    myrtle = make_architecture(architecture="myrtle5")
    unsupported = cuda_backend.CudaBackend.unsupported
    assert "compiled for 32 x 32 images in float32 only; got H x W = 8 x 8, float32" in \
        unsupported(small, (1, 8, 8), np.float32)
    assert "got H x W = 32 x 32, float64: unset it" in unsupported(myrtle, (3, 32, 32), np.float64)
    assert unsupported(myrtle, (3, 32, 32), np.float32) is None


def test_stack_blocks_environment_variable(monkeypatch):
    from cntk_engine.backends.cuda import STACK_BLOCKS_ENV, stack_blocks_per_sm
    monkeypatch.delenv(STACK_BLOCKS_ENV, raising=False)
    assert stack_blocks_per_sm() == 0
    for v, want in (("1", 1), (" 2 ", 2), ("", 0)):
        monkeypatch.setenv(STACK_BLOCKS_ENV, v)
        assert stack_blocks_per_sm() == want
    monkeypatch.setenv(STACK_BLOCKS_ENV, "4")
    with pytest.raises(ValueError, match=r"CNTK_ENGINE_CUDA_STACK_BLOCKS='4': accepted 1 \(the default\) or 2"):
        stack_blocks_per_sm()
