"""The straightforward per-layer GPU algorithm (the paper's method), as a baseline.

For ONE pair at a time it materialises the full (H, W, H, W) covariance tensors Sigma and Theta
in device memory and, per layer, launches one ReLU-kernel ("trans") kernel and two 3x3
convolution kernels over the whole 4-D tensors, as the paper's reference code does (arora
convention, GAP readout).  Written here with CuPy RawKernels.  The per-image diagonals come
from the same 4-D recursion of each image with itself, as in the paper's code, so the baseline
times the paper's method whole.

A symmetric Gram computes each unordered pair once (j >= i) and mirrors it, as every method
the harness compares does when it can (``per_layer_cpu``, this package's backends), so that
its unique pairs/s is a per-pair rate.
"""
from __future__ import annotations

import numpy as np

# read by bench/harness.py (pairs_evaluated): a symmetric Gram of N images computes N(N+1)/2 pairs
PAIRS_EVALUATED = "unique"

_SRC = r"""
extern "C" __global__
void conv3(const float* s, float* t, int H, int W) {
  // t[i, j, k, l] = sum_{a, b in -1..1} s[i+a, j+b, k+a, l+b], zero outside
  long n = (long)H * W * H * W;
  for (long e = blockIdx.x * (long)blockDim.x + threadIdx.x; e < n; e += (long)gridDim.x * blockDim.x) {
    int l = e % W, k = (e / W) % H, j = (e / W / H) % W, i = e / W / H / W;
    float acc = 0.f;
    for (int a = -1; a <= 1; ++a)
      for (int b = -1; b <= 1; ++b) {
        int i2 = i + a, j2 = j + b, k2 = k + a, l2 = l + b;
        if (i2 >= 0 && i2 < H && j2 >= 0 && j2 < W && k2 >= 0 && k2 < H && l2 >= 0 && l2 < W)
          acc += s[(((long)i2 * W + j2) * H + k2) * W + l2];
      }
    t[e] = acc;
  }
}
extern "C" __global__
void trans(float* s, float* t, const float* lx, const float* lz, int HW) {
  // s <- 2/9 E[relu relu], t <- t * 2/9 E[relu' relu'] + s  (the paper's per-layer step)
  long n = (long)HW * HW;
  for (long e = blockIdx.x * (long)blockDim.x + threadIdx.x; e < n; e += (long)gridDim.x * blockDim.x) {
    int p = e / HW, q = e % HW;
    float L = lx[p], R = lz[q];
    float prod = L * R;
    float c = prod > 0.f ? s[e] / prod : 0.f;
    c = fminf(fmaxf(c, -1.f), 1.f);
    float th = acosf(c);
    float bs = (c * (3.14159265f - th) + sqrtf(1.f - c * c)) * prod / 28.274333882308138f;
    t[e] = t[e] * (3.14159265f - th) / 28.274333882308138f + bs;
    s[e] = bs;
  }
}
"""


class PerLayerGPU:
    """CNTK-GAP (arora) of single pairs by the per-layer 4-D method."""

    def __init__(self, depth: int, h: int, w: int):
        import cupy
        self.cp = cupy
        self.depth, self.h, self.w = depth, h, w
        mod = cupy.RawModule(code=_SRC)
        self.conv3 = mod.get_function("conv3")
        self.trans = mod.get_function("trans")
        n = (h * w) ** 2
        self.S = cupy.empty(n, dtype=cupy.float32)
        self.T = cupy.empty(n, dtype=cupy.float32)
        self.tmp = cupy.empty(n, dtype=cupy.float32)
        self.grid = (min(65535, (n + 255) // 256),)

    def _conv(self, a):
        self.conv3(self.grid, (256,), (a, self.tmp, np.int32(self.h), np.int32(self.w)))
        a[...] = self.tmp

    def _diag_roots(self, x):
        """sqrt of the per-layer diagonals of image x (from its own 4-D self recursion)."""
        cp = self.cp
        hw = self.h * self.w
        roots = []
        S = (x.T @ x).ravel()
        self._conv(S)
        T = S.copy()
        for _ in range(self.depth - 1):
            L = cp.sqrt(cp.maximum(S.reshape(hw, hw).diagonal(), 0)).copy()
            roots.append(L)
            self.trans(self.grid, (256,), (S, T, L, L, np.int32(hw)))
            self._conv(S)
            self._conv(T)
        return roots

    def pair(self, x, z, rx, rz):
        """x, z: (C, H*W) float32 device arrays; rx, rz from _diag_roots.  Returns (NTK, NNGP)."""
        cp = self.cp
        hw = self.h * self.w
        self.S[...] = (x.T @ z).ravel()
        self._conv(self.S)
        self.T[...] = self.S
        for layer in range(self.depth - 1):
            self.trans(self.grid, (256,), (self.S, self.T, rx[layer], rz[layer], np.int32(hw)))
            if layer + 1 < self.depth - 1:
                self._conv(self.S)
                self._conv(self.T)
        return float(cp.mean(self.T)), float(cp.mean(self.S))

    def gram(self, x, both=False):
        """Full N x N NTK (and NNGP) of images x (N, C, H, W), one pair at a time: each
        unordered pair once (j >= i), mirrored into both triangles."""
        cp = self.cp
        xs = [cp.asarray(xi.reshape(xi.shape[0], -1), dtype=cp.float32) for xi in x]
        roots = [self._diag_roots(xi) for xi in xs]
        out = np.empty((2, len(xs), len(xs)))
        for i in range(len(xs)):
            for j in range(i, len(xs)):
                out[:, i, j] = out[:, j, i] = self.pair(xs[i], xs[j], roots[i], roots[j])
        return (out[0], out[1]) if both else out[0]


def gram(x, depths, pooling="gap", fix=False, kernel="both", dtype="float32"):
    """The harness's interface: {depth: (ntk, nngp)} (kernel="both") or {depth: ntk}, arora
    convention.  Only what the paper's code does: GAP, fix=False, float32, 3x3 filters."""
    if pooling != "gap" or fix or dtype != "float32":
        raise ValueError("the per-layer baseline computes the paper's CNTK-GAP in float32 only "
                         f"(pooling='gap', fix=False); got pooling={pooling!r}, fix={fix}, dtype={dtype!r}")
    x = np.asarray(x)
    res = {}
    for d in depths:
        k = PerLayerGPU(d, x.shape[2], x.shape[3]).gram(x, both=True)
        res[d] = k if kernel == "both" else k[0 if kernel == "ntk" else 1]
    return res

