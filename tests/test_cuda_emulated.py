"""The CUDA kernels' source, run without a GPU in the host emulation (tests/cuda_sim.py,
csrc/host_simt.h), against the numba backend: the CNN kernel (gap, flatten, LAP, flips) and the
pooled-stack kernel (Myrtle-5 and Myrtle-10 on real CIFAR-10 images, stacks with odd pooled sizes, pools of 3,
flatten readouts, MNIST's zero-variance windows).  ``backend="cuda"`` runs whole jobs here:
the scheduler, the backend's array layouts and launch fields, and the kernels' algorithms with
their shuffles, barriers, rounds and readout order; what only a GPU runs (the binding's launch,
CuPy, the device's instructions) is tested in tests/test_cuda.py."""
from __future__ import annotations

import numpy as np
import pytest

import cntk_engine as ce
from cntk_engine.arch import AvgPool, ConvRelu, serial

from cuda_sim import SCHEDULES, build, emulate_cuda
from test_cuda import _use_installed_extension, cuda_backend, extension, real_cifar_and_mnist

TOL = {"float32": 1e-5, "float64": 1e-12}
C, POOL = ConvRelu(), AvgPool(2)


@pytest.fixture(scope="module")
def kernel_sim(tmp_path_factory):
    exe = build(tmp_path_factory.mktemp("kernel_sim"))
    if exe is None:
        pytest.skip("no host C++ compiler (g++) to build csrc/kernel_sim.cpp")
    return exe


@pytest.fixture
def emulated(monkeypatch, kernel_sim, request):
    extension()             # the backend's shape rules and variant table come from the extension
    _use_installed_extension(monkeypatch)   # also where cntk_engine is imported from a checkout
    emulate_cuda(monkeypatch, kernel_sim)
    monkeypatch.setenv("CNTK_ENGINE_CUDA_KERNEL", request.param)
    return request.param


def grams(x, y=None, **kw):
    """(emulated cuda, numba) Grams: NTK and NNGP (of every depth) stacked."""
    out = []
    for backend in ("cuda", "numba"):
        g = ce.gram(x, y, backend=backend, kernel="both", **kw)     # (ntk, nngp) or {depth: ...}
        out.append(np.stack([np.stack(g[d]) for d in sorted(g)]) if isinstance(g, dict) else np.stack(g))
    return out


def check(x, y=None, dtype="float32", tol=None, **kw):
    a, b = grams(x, y, dtype=dtype, **kw)
    assert np.all(np.isfinite(a))
    err = np.max(np.abs(a - b)) / np.max(np.abs(b))
    assert err < (tol or TOL[dtype]), (err, kw)


CNN_CASES = {
    "gap_fix": ((3, 2, 8, 8), dict(depth=3, fix=True)),
    "flatten_two_depths": ((3, 3, 8, 6), dict(depths=[2, 4], pooling="flatten")),
    "lap": ((3, 1, 10, 10), dict(depth=3, pooling="lap", lap_window=3)),
    "flip_bias": ((2, 3, 8, 8), dict(depth=3, flip=True, convention="neural_tangents", b_std=0.3)),
    "filter5": ((2, 2, 9, 7), dict(depth=3, filter_size=5)),
}


STACK_CASES = {
    "one_pool": ((3, 2, 8, 8), dict(architecture=serial(C, POOL, C))),
    "three_pools_trailing": ((3, 3, 8, 8), dict(architecture=serial(C, C, POOL, C, POOL, C, POOL))),
    "pool3_flatten": ((2, 1, 12, 12), dict(architecture=serial(C, AvgPool(3), C, POOL),
                                           pooling="flatten")),
    "odd_pooled_size_fix": ((3, 2, 6, 6), dict(architecture=serial(C, POOL, C, C), fix=True)),
    "lap_bias": ((2, 2, 8, 8), dict(architecture=serial(C, POOL, C), pooling="lap", lap_window=2,
                                    convention="neural_tangents", b_std=0.2)),
    "flip": ((2, 3, 8, 8), dict(architecture=serial(C, POOL, C), flip=True)),
}


@pytest.mark.parametrize("emulated", ["v3", "v5", "v6"], indirect=True)
@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("case", list(CNN_CASES) + list(STACK_CASES))
def test_emulated_kernels_match_numba(emulated, dtype, case):
    """The CNN kernel (CNN_CASES) and the stack kernel (STACK_CASES) on random images."""
    shape, kw = {**CNN_CASES, **STACK_CASES}[case]
    check(np.random.default_rng(len(case)).standard_normal(shape), dtype=dtype, **kw)


@pytest.mark.parametrize("emulated", ["v3", "v5", "v6"], indirect=True)
@pytest.mark.parametrize("dtype, faint, convention", [("float64", 1e-160, "arora"),
                                                      ("float32", 2.0 ** -64, "arora"),
                                                      ("float32", 1e-19, "neural_tangents")])
def test_emulated_faint_windows_that_share_no_pixel(emulated, dtype, faint, convention):
    """v5 multiplied the two images' 1 / sqrt(q) of windows fainter than the dtype's smallest
    normal number to inf, and c = 0 * inf was NaN where the windows share no pixel: the job
    stopped on non-finite sums.  Such factors are 0 now (cuda._diag_factors)."""
    x = np.zeros((2, 1, 8, 8))
    x[:, 0, 0, 0] = 0.75                        # each image's largest pixel
    x[0, 0, 4, 3] = x[1, 0, 4, 5] = faint       # faint pixels at positions the other lacks
    check(x, dtype=dtype, depth=3, pooling="flatten", convention=convention)


@pytest.mark.parametrize("emulated", ["v3", "v5", "v6", "v7", "v8"], indirect=True)
def test_emulated_kernels_give_the_same_bits_in_every_thread_order(emulated, monkeypatch, kernel_sim):
    """The emulation ran a block's threads in index order, so a missing __syncthreads (the
    shared sums zeroed, then added to; a stack round's adds before the next round's; a stage's
    input zeroed before it is pooled into) could not show; run warp by warp, each as far as it
    goes, last warp first or first warp first, each of those three barriers removed by hand
    changed the result in one of the orders.  Every variant, the CNN kernel (gap and LAP over
    several warps; flatten, one warp, against numba only) and the stack kernel, in float64: the
    same bits in every order, and numba's values."""
    rng = np.random.default_rng(7)
    cases = [(rng.standard_normal((2, 2, 8, 8)), dict(depth=3)),
             (rng.standard_normal((2, 1, 7, 6)), dict(depth=3, pooling="flatten")),
             (rng.standard_normal((2, 1, 8, 8)), dict(depth=3, pooling="lap", lap_window=3)),
             (rng.standard_normal((2, 2, 8, 8)), dict(architecture=serial(C, C, POOL, C, POOL, C, POOL))),
             (rng.standard_normal((2, 1, 12, 12)), dict(architecture=serial(C, AvgPool(3), C, POOL),
                                                        pooling="flatten"))]
    for x, kw in cases:
        got = {}
        for schedule in SCHEDULES:
            emulate_cuda(monkeypatch, kernel_sim, schedule)
            got[schedule] = np.stack(ce.gram(x, backend="cuda", kernel="both", dtype="float64", **kw))
        want = np.stack(ce.gram(x, backend="numba", kernel="both", dtype="float64", **kw))
        for schedule in SCHEDULES[1:]:
            assert got[schedule].tobytes() == got["forward"].tobytes(), (schedule, kw)
        np.testing.assert_allclose(got["forward"], want, rtol=1e-12, atol=0, err_msg=str(kw))


@pytest.mark.parametrize("emulated", ["v5"], indirect=True)
def test_emulated_stack_kernel_cross_gram_and_duplicates(emulated):
    """gram(x, y) (no self pairs but the duplicated image's) through the stack kernel."""
    rng = np.random.default_rng(3)
    x = rng.standard_normal((3, 2, 8, 8))
    y = np.concatenate([rng.standard_normal((1, 2, 8, 8)), x[1:2]])
    check(x, y, architecture=serial(C, POOL, C, POOL))


@pytest.mark.parametrize("emulated", ["v3"], indirect=True)
def test_emulated_myrtle5_real_cifar(emulated):
    """Myrtle-5 (32 x 32 -> 16 -> 8, the guard-free 32 x 32 stage) on two CIFAR-10 images."""
    cifar, _ = real_cifar_and_mnist()
    check(cifar[:2], architecture="myrtle5")


@pytest.mark.parametrize("emulated", ["v6"], indirect=True)
def test_emulated_myrtle10_real_cifar(emulated):
    """Myrtle-10, the architecture of the issue's 40,000 pairs/s target (three conv layers at
    each of 32 x 32, 16 x 16 and 8 x 8), on two CIFAR-10 images with v6, the float32 candidate."""
    cifar, _ = real_cifar_and_mnist()
    check(cifar[:2], architecture="myrtle10")


@pytest.mark.parametrize("emulated", ["v3", "v5", "v6"], indirect=True)
def test_emulated_stack_real_mnist_zero_windows(emulated):
    """28 x 28 MNIST digits (blank margins: zero-variance windows) and an all-zero image through
    28 -> 14 -> 7 (an odd pooled size: one grid per round along each axis at the second pool).
    float64 within 1e-13: the margins give entries at c = 1 to rounding, where sqrt(1 - c^2)
    turned a last-bit difference in c into ~1e-8 of that entry (v3 and v6, which round c
    otherwise than numba, were 1.07e-12 off); with c within 8 ulps of 1 taken as 1 every
    variant agrees with numba to 2e-16."""
    _, mnist = real_cifar_and_mnist()
    x = np.concatenate([mnist[:1], np.zeros_like(mnist[:1])])
    check(x, architecture=serial(C, POOL, C, POOL, C), dtype="float64", tol=1e-13)


@pytest.mark.parametrize("emulated", ["v3", "v5", "v6"], indirect=True)
@pytest.mark.parametrize("arch", [dict(depth=6), dict(architecture=serial(C, POOL, C, C))],
                         ids=["cnn", "stack"])
def test_emulated_float64_an_image_and_a_multiple_of_it(emulated, arch):
    """c = 1 exactly at every entry of (x, 3 x) and of two constant images, a few ulps off past
    the first layer: float64 takes c within 8 ulps of +-1 as +-1 (relu_step.cuh), as numba does,
    so the two agree to rounding (unsnapped, arccos made it 1e-8)."""
    b = np.random.default_rng(5).standard_normal((2, 8, 8))
    x = np.stack([b, 3.0 * b, np.full((2, 8, 8), 0.5), np.full((2, 8, 8), 2.0)])
    check(x, dtype="float64", tol=1e-13, **arch)


@pytest.mark.parametrize("emulated", ["v3", "v5"], indirect=True)
def test_emulated_constant_images_through_a_whole_image_pool(emulated):
    """K(a 1, b 1) = a b K(1, 1) (no biases), checked on the stack kernel alone: AvgPool(6) on
    6 x 6 constant images, where the pooled entries are sums of 1,296 terms equal in exact
    arithmetic (the case where the float64 reference's plain pool sum was 2.1e-8 off;
    helper-53's sweep found the CUDA source exact here)."""
    vals = np.array([0.5, 1.3, 0.7])
    x = vals[:, None, None, None] * np.ones((3, 1, 6, 6))
    for dtype, tol in (("float64", 1e-13), ("float32", 1e-6)):
        for k in ce.gram(x, architecture=serial(C, AvgPool(6), C), backend="cuda", dtype=dtype, kernel="both"):
            unit = k / np.outer(vals, vals)
            assert np.abs(unit - unit[0, 0]).max() / abs(unit[0, 0]) < tol, dtype


@pytest.mark.parametrize("emulated", ["v3", "v5", "v6"], indirect=True)
def test_emulated_float32_where_c_is_one_exactly(emulated):
    """float32 takes c within 8 ulps of +-1 as +-1 too (it clamped only): with filter size 1 on
    one-channel images every entry of every pair has c = +-1 (7e-5 of the kernel off at depth 4,
    all variants), and so do an image and a multiple of it, and constant images (v5's factors put
    c = 1 - 1 ulp on the Gram diagonal of a constant image of 0.5: K(x, x) 1.5e-4 off)."""
    rng = np.random.default_rng(1)
    check(rng.standard_normal((2, 1, 2, 5)), rng.standard_normal((2, 1, 2, 5)), depth=4,
          filter_size=1, pooling="flatten", tol=1e-6)
    b = rng.standard_normal((2, 6, 6))
    x = np.stack([b, 3.0 * b, np.full((2, 6, 6), 0.5), np.full((2, 6, 6), 2.0)])
    check(x, depth=4, tol=1e-6)
    check(np.full((1, 2, 5, 3), 0.5), depth=4, filter_size=1, tol=1e-6)


def test_sanitizer_runs_cuda_path(monkeypatch, capsys):
    """tools/gpu/sanitizer_runs.py's CUDA path, which the GPU visit runs under compute-sanitizer:
    the variants' names and bases from the extension, its environment variables, --kernels,
    --part, the stack kernels the variants launch (v7's and v8's are their bases'), each once.
    Its Grams are recorded with the variant they would run, not computed (their calls are the
    other tests' and 7 to 20 s each here); what only a GPU runs is CuPy's allocator switch and
    the diagonals on the host (counted here)."""
    import os
    from conftest import load_tool
    extension()                         # the variant table comes from the extension
    _use_installed_extension(monkeypatch)
    runs = load_tool("gpu/sanitizer_runs")
    switched, calls = [], []
    monkeypatch.setattr(runs, "switch_off_cupy_pool", lambda: switched.append(True))
    monkeypatch.setattr(runs, "diagonals_on_the_host", lambda: switched.append("host"))
    monkeypatch.setattr(runs, "cnn_runs", lambda ce, backend, small: calls.append(
        ("cnn", os.environ[cuda_backend.KERNEL_ENV], backend, small)))
    monkeypatch.setattr(runs, "stack_runs", lambda ce, backend, small, env: calls.append(
        ("stack", os.environ[cuda_backend.KERNEL_ENV], backend, small, env)))
    assert runs.main(["--kernels", "v3,v8", "--small"]) == 0
    assert switched == [True, "host"]
    assert calls == [("cnn", "v3", "cuda", True), ("cnn", "v8", "cuda", True),
                     ("stack", "v3", "cuda", True, cuda_backend.STACK_BLOCKS_ENV)]
    out = capsys.readouterr().out
    assert "v8 stack kernel:" not in out and "sanitizer runs done" in out
    calls.clear()
    assert runs.main([]) == 0           # every compiled variant; stacks of v3, v5, v6
    assert [c[1] for c in calls if c[0] == "stack"] == [v["name"] for v in cuda_backend.kernel_variants()
                                                        if v["base"] == v["name"]]
    assert all(c[3] is False for c in calls)
    with pytest.raises(SystemExit):
        runs.main(["--kernels", "v3,v99"])
    assert "--kernels v99: not compiled" in capsys.readouterr().err
    # --part: one kernel's Grams; v8 alone still runs the stack kernel it launches, v3's
    calls.clear()
    assert runs.main(["--kernels", "v8", "--part", "stack", "--small"]) == 0
    assert calls == [("stack", "v3", "cuda", True, cuda_backend.STACK_BLOCKS_ENV)]
    calls.clear()
    assert runs.main(["--kernels", "v3,v8,v6,v7,v5", "--part", "stack"]) == 0
    assert [c[1] for c in calls] == ["v3", "v6", "v5"]
    calls.clear()
    assert runs.main(["--kernels", "v7", "--part", "cnn"]) == 0
    assert calls == [("cnn", "v7", "cuda", False)]


def two_32x32_images():
    """Two CIFAR-10 images where the real data is found, else two random images in [0, 1) of
    their shape (3, 32, 32): the guard-free 32 x 32 kernels' tests never skip."""
    try:
        cifar, _ = real_cifar_and_mnist()
    except pytest.skip.Exception:
        return np.random.default_rng(32).random((2, 3, 32, 32))
    return cifar[:2]


@pytest.mark.parametrize("emulated", ["v5"], indirect=True)
def test_emulated_32x32_kernels_of_other_filter_sizes(emulated, monkeypatch):
    """The guard-free 32 x 32 kernels of filter sizes 1, 5 and 7 (instantiated per variant; the
    other 32 x 32 tests run filter size 3, and v8's 5 and 7), one conv layer each, on v5, whose
    32 x 32 kernels no other emulated test runs."""
    x = two_32x32_images()
    check(x[:1], x[1:], depth=2, filter_size=1, pooling="flatten")
    check(x[:1], x[1:], depth=2, filter_size=5)                      # 1,024 grids
    check(x[:1], x[1:], depth=2, filter_size=7, pooling="flatten", dtype="float64")


@pytest.mark.parametrize("emulated", ["v7"], indirect=True)
def test_emulated_layer_barrier_32x32(emulated, monkeypatch, kernel_sim):
    """v7's own kernels, the guard-free 32 x 32 ones with a barrier among the block's warps after
    every layer (8 warps over 1,024 grids for gap, one warp for flatten), on two CIFAR-10 images
    (two_32x32_images): against numba, and the same bits as v6 (the barrier changes no arithmetic)."""
    cifar = two_32x32_images()
    check(cifar, depths=[2, 3])
    # the barrier keeps warps together for the caches and orders nothing the sums depend on:
    # gap (8 warps) in either thread order, the same bits, and no deadlock (a warp that skipped
    # it would hang the block); flatten (one warp) the same bits as v6
    gap = {}
    for schedule in SCHEDULES:
        emulate_cuda(monkeypatch, kernel_sim, schedule)
        gap[schedule] = np.stack(ce.gram(cifar[:1], cifar[1:], depth=3, backend="cuda", kernel="both"))
    assert gap["forward"].tobytes() == gap["warps_reversed"].tobytes()
    a, _ = grams(cifar, depth=3, pooling="flatten", dtype="float64")
    monkeypatch.setenv("CNTK_ENGINE_CUDA_KERNEL", "v6")
    b, _ = grams(cifar, depth=3, pooling="flatten", dtype="float64")
    assert a.tobytes() == b.tobytes()


@pytest.mark.parametrize("emulated", ["v8"], indirect=True)
def test_emulated_row_seam_mask_32x32(emulated, monkeypatch):
    """v8's own kernels, the guard-free 32 x 32 ones testing the row seam of the box sums as one
    bit of a mask (csrc/pair_sums_kernel.cuh, kSeamBits), on two CIFAR-10 images
    (two_32x32_images): against numba
    at filter sizes 3, 5 and 7 (every seam of 1,024 packed grids, 1 to 3 rows of taps), and, at
    filter size 3, the same bits as v3 (each row sums (centre + above) + below either way)."""
    cifar = two_32x32_images()
    x, y = cifar[:1], cifar[1:2]                     # one pair: 1,024 grids per layer
    for k in (5, 7):
        check(x, y, depth=2, filter_size=k)          # one conv layer: its box sums
    a, b = grams(x, y, depths=[2, 3])
    assert np.max(np.abs(a - b)) / np.max(np.abs(b)) < TOL["float32"]
    monkeypatch.setenv("CNTK_ENGINE_CUDA_KERNEL", "v3")
    b, _ = grams(x, y, depths=[2, 3])
    assert a.tobytes() == b.tobytes()


EMULATOR_PROBE = r"""
#include <cstdio>
#include "host_simt.h"
int main(int argc, char**) {
  int sums[64];
  simt::launch(dim3(2), dim3(64), 0, [&] {
    int v = threadIdx.x + 100 * blockIdx.x;
    if (argc > 1 && threadIdx.x % 32 < 16) v = __shfl_xor_sync(0xffffffffu, v, 1);  // divergent
    v += __shfl_down_sync(0xffffffffu, v, 16);  // lanes 16..31 keep their own value twice
    __syncthreads();
    if (blockIdx.x == 1) sums[threadIdx.x] = v;
  });
  for (int t = 0; t < 64; ++t) std::printf("%d ", sums[t]);
  return 0;
}
"""


def build_probe(folder, name: str, source: str):
    """A small program of host_simt.h's own, built with the host compiler (skips without one)."""
    import shutil
    import subprocess
    from cuda_sim import ROOT
    cxx = shutil.which("g++") or shutil.which("c++")
    if cxx is None:
        pytest.skip("no host C++ compiler")
    (folder / f"{name}.cpp").write_text(source)
    subprocess.run([cxx, "-std=c++17", "-O1", "-I", str(ROOT / "csrc"), str(folder / f"{name}.cpp"),
                    "-o", str(folder / name)], check=True)
    return folder / name


ORDER_PROBE = r"""
#include <cstdio>
#include <cstring>
#include <vector>
#include "host_simt.h"
// argv[1]: the schedule.  Prints, per phase between barriers, the warps in the order they
// entered it, then the sum a missing barrier spoils: each warp adds 10 to a slot that
// warp 0 reads, with no barrier between the writes and the read.
int main(int, char** argv) {
  if (std::strcmp(argv[1], "warps_reversed") == 0) simt::machine().schedule = simt::Schedule::warps_reversed;
  if (std::strcmp(argv[1], "warps_in_order") == 0) simt::machine().schedule = simt::Schedule::warps_in_order;
  std::vector<int> order;
  int slot[3] = {0, 0, 0}, seen = -1;
  simt::launch(dim3(1), dim3(96), 0, [&] {
    const int warp = threadIdx.x / 32;
    for (int phase = 0; phase < 3; ++phase) {
      if (threadIdx.x % 32 == 0) order.push_back(warp);
      __syncthreads();
    }
    if (threadIdx.x % 32 == 0) slot[warp] = 10;
    if (threadIdx.x == 0) seen = slot[0] + slot[1] + slot[2];   // needs a barrier before it
  });
  for (int w : order) std::printf("%d ", w);
  std::printf("| %d\n", seen);
  return 0;
}
"""


def test_the_emulators_warp_orders_hold_in_every_phase(tmp_path):
    """warps_reversed ran the last warp first only up to the first barrier: the warp that
    released a barrier ran on into the next phase first (helper-94), so a barrier missing
    after the first one could go unseen.  Each phase now starts from the last warp
    (warps_reversed) or the first (warps_in_order), and a read that lacks its barrier gives
    different results in two of the orders."""
    import subprocess
    exe = build_probe(tmp_path, "order", ORDER_PROBE)
    out = {s: subprocess.run([str(exe), s], capture_output=True, text=True,
                             check=True).stdout.split() for s in SCHEDULES}
    assert out["forward"] == "0 1 2 0 1 2 0 1 2 | 10".split()
    assert out["warps_reversed"] == "2 1 0 2 1 0 2 1 0 | 30".split()
    assert out["warps_in_order"] == "0 1 2 0 1 2 0 1 2 | 10".split()


def test_the_emulator_shuffles_and_reports_divergence(tmp_path):
    """host_simt.h itself: shuffle semantics, blocks, and a divergent shuffle reported (a
    deadlock), not computed."""
    import subprocess
    exe = build_probe(tmp_path, "probe", EMULATOR_PROBE)
    ok = subprocess.run([str(exe)], capture_output=True, text=True, check=True)
    t = np.arange(64)
    lane = t % 32
    v = t + 100
    want = np.where(lane < 16, v + v + 16, 2 * v)
    assert [int(s) for s in ok.stdout.split()] == want.tolist()
    bad = subprocess.run([str(exe), "divergent"], capture_output=True, text=True)
    assert bad.returncode != 0 and "deadlock" in bad.stderr, (bad.returncode, bad.stderr)
