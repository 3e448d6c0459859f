"""Float64 NumPy reference: the paper's 4-D recursion written out directly, pooling layers
included (``pool4``: the 4-D average over both windows, literally).

Slow (it holds the whole (H, W, H, W) covariance of every pair, as the paper's reference code
does) and deliberately independent of the fast backends: no offset slices, no shared layer
loop, and its own per-image diagonals taken from the 4-D recursion of (x, x).  The oracle of
the test suite.  See ``cntk_engine.arch`` for the formulas.
"""
from __future__ import annotations

import math
import platform

import numpy as np

from ..arch import SNAP_ULPS, ConvRelu
from .base import Backend, Prepared, Traits


def box4(a: np.ndarray, k: int) -> np.ndarray:
    """box(A)(p, p') = sum_{a, b} A(p + (a, b), p' + (a, b)), zero outside the image."""
    r = k // 2
    h, w = a.shape[:2]
    pad = np.zeros((h + 2 * r, w + 2 * r, h + 2 * r, w + 2 * r))
    pad[r:r + h, r:r + w, r:r + h, r:r + w] = a
    out = np.zeros_like(a)
    for da in range(-r, r + 1):
        for db in range(-r, r + 1):
            out += pad[r + da:r + da + h, r + db:r + db + w, r + da:r + da + h, r + db:r + db + w]
    return out


def relu_step(sigma, q_x, q_z):
    """K = E[relu(u) relu(v)], Kdot = E[relu'(u) relu'(v)] for (u, v) ~ N(0, [[q_x, s], [s, q_z]]).

    norm = sqrt(q_x q_z) as one square root: for a diagonal entry of a self pair
    sqrt(fl(q * q)) == q exactly, so c = 1 there with no rounding.  Elsewhere c = +-1 exactly
    (matching receptive fields, an image and a multiple of it) comes out a few ulps off, and
    arccos would turn that into sqrt(eps): c within SNAP_ULPS ulps of +-1 is +-1 (``arch``,
    self pairs).
    """
    norm = np.sqrt(q_x[:, :, None, None] * q_z[None, None, :, :])
    with np.errstate(divide="ignore", invalid="ignore"):
        c = np.where(norm > 0, sigma / norm, 0.0)   # zero-variance windows: c := 0
    snap = 1.0 - SNAP_ULPS * np.finfo(np.float64).eps
    c = np.where(np.abs(c) >= snap, np.sign(c), c)
    theta = np.arccos(c)
    k = (norm * np.sin(theta) + (math.pi - theta) * sigma) / (2 * math.pi)
    kdot = (math.pi - theta) / (2 * math.pi)
    return k, kdot


def pool4(a: np.ndarray, pool) -> np.ndarray:
    """(pool A)(P, P') = w^-4 sum_{u, v in [0, w)^2} A(s P + u, s P' + v) (VALID windows).

    The w^4 terms are summed with Neumaier's compensation, as the fast backends sum their pools:
    for constant images (and receptive fields that are multiples of each other) the pooled
    entries are +-sqrt(q q') in exact arithmetic, and a plain sum of w^4 terms (1,296 for a pool
    of 6) rounds the cross entries and the diagonals differently by tens of ulps, beyond the
    SNAP_ULPS snap of c to +-1, where arccos turns the error into its square root.  Written out
    here rather than taken from ``diag``: the oracle shares no code with the fast backends."""
    s, k = pool.stride, pool.window
    ho, wo = pool.out_size(a.shape[0]), pool.out_size(a.shape[1])
    total = np.zeros((ho, wo, ho, wo))
    lost = np.zeros_like(total)        # what each add rounded away, summed
    for a0 in range(k):
        for b0 in range(k):
            for c0 in range(k):
                for d0 in range(k):
                    term = a[a0:a0 + s * ho:s, b0:b0 + s * wo:s, c0:c0 + s * ho:s, d0:d0 + s * wo:s]
                    t = total + term
                    lost += np.where(np.abs(total) >= np.abs(term), (total - t) + term, (term - t) + total)
                    total = t
    return (total + lost) / k ** 4


def lap4(a: np.ndarray, c: int) -> np.ndarray:
    """AvgPool((c, c), stride 1, CIRCULAR) of a 4-D kernel on both of its positions:
    (pool A)(P, P') = c^-4 sum_{u, v in window} A(P + u, P' + v), indices mod (H, W), the window
    u in [-(c - 1) // 2, c // 2] per axis (SAME placement); one axis at a time."""
    out = a
    for axis in range(4):
        out = sum(np.roll(out, -u, axis=axis) for u in range(-((c - 1) // 2), c // 2 + 1)) / c
    return out


def _layers(arch):
    """The network as ("conv", None) / ("pool", AvgPool) steps (the CNN: conv layers only)."""
    if arch.layers is None:
        return [("conv", None)] * arch.n_layers
    return [("conv", None) if isinstance(la, ConvRelu) else ("pool", la) for la in arch.layers]


def layers_4d(x: np.ndarray, z: np.ndarray, arch, params, q_x=None, q_z=None):
    """Run the recursion for one pair; yields (layer, K, G, Sigma) after each ReLU layer (layer:
    0-based over the conv layers), and, in a stack, ("pool", K, G, None) after each pooling
    layer (the pooled K and G: the trailing pools before the readout included).

    q_x, q_z: (L, H, W) per-image diagonals (layer l's at its own resolution, top-left).  With
    q_x = q_z = None the pair must be (x, x): the diagonals are read off the 4-D covariance
    itself (this is how the reference gets its own diagonals).
    """
    k = arch.filter_size
    kk = g = None
    layer = -1
    for kind, pool in _layers(arch):
        if kind == "pool":
            kk, g = pool4(kk, pool), pool4(g, pool)
            yield "pool", kk, g, None
            continue
        layer += 1
        if layer == 0:
            sigma = params.w_first * box4(np.einsum("cij,ckl->ijkl", x, z), k) + params.b2
            theta_ntk = np.zeros_like(sigma) if arch.fix else sigma.copy()
        else:
            sigma = params.w * box4(kk, k) + params.b2
            theta_ntk = sigma + params.w * box4(g, k)
        h, w = sigma.shape[:2]
        if q_x is None:
            qx_l = qz_l = np.einsum("ijij->ij", sigma).copy()
        else:
            qx_l, qz_l = q_x[layer, :h, :w], q_z[layer, :h, :w]
        kk, kdot = relu_step(sigma, qx_l, qz_l)
        g = theta_ntk * kdot
        yield layer, kk, g, sigma


class ReferenceBackend(Backend):
    name = "reference"

    @classmethod
    def traits(cls) -> Traits:
        return Traits(device="cpu", default_tile=8, min_tile=2, compute_dtype="float64")

    @classmethod
    def working_memory(cls, arch, image_shape, dtype):
        # layers_4d holds every offset: the padded input of box4, its output, Sigma, Theta,
        # K, G and relu_step's temporaries, (H + 2r)^2 (W + 2r)^2 float64 entries at most each
        _, h, w = image_shape
        r = arch.filter_size // 2
        entries = ((h + 2 * r) * (w + 2 * r)) ** 2
        return 10 * entries * 8, (f"about 10 float64 covariances over every offset, "
                                  f"({h + 2 * r} x {w + 2 * r})^2 = {entries:,} entries each (the "
                                  "float64 oracle; the numba backend holds far less)")

    def compute_record(self, device):
        """NumPy's version and the CPU features its SIMD loops dispatch on (its arccos, exp and
        sums differ in the last bits between them) and the C library."""
        try:
            from numpy._core._multiarray_umath import __cpu_features__ as features
        except ImportError:             # NumPy < 2
            from numpy.core._multiarray_umath import __cpu_features__ as features
        return {"backend": self.name, "numpy": np.__version__,
                "numpy_cpu_features": ",".join(sorted(k for k, v in features.items() if v)),
                "libc": " ".join(platform.libc_ver()) or "unknown"}

    def prepare(self, x: np.ndarray) -> Prepared:
        x = np.asarray(x, dtype=np.float64)
        h, w = x.shape[2:]
        q = np.zeros((x.shape[0], self.arch.n_layers, h, w))
        for n in range(x.shape[0]):
            for layer, _, _, sigma in layers_4d(x[n], x[n], self.arch, self.params):
                if sigma is not None:
                    q[n, layer, :sigma.shape[0], :sigma.shape[1]] = np.einsum("ijij->ij", sigma)
        return Prepared(x, (q,))

    def pair_sums(self, a: Prepared, b: Prepared, symmetric: bool = False) -> np.ndarray:
        out = self._sums(a, b, symmetric)
        if self.arch.flip:      # (K(x, z) + K(x, F z)) / 2, every pair of the flipped set computed
            mirrored = self._sums(a, b.flipped, False)
            if symmetric:       # K(x_i, F x_j) = K(x_j, F x_i) but for rounding: one value for both
                mirrored = (mirrored + mirrored.transpose(1, 0, 2, 3)) * 0.5
            out = (out + mirrored) * 0.5
        return out

    def _sums(self, a: Prepared, b: Prepared, symmetric: bool) -> np.ndarray:
        # the CNN reads out after the ReLU of each depth's last layer; a stack once, at the end
        # (after its trailing pooling layers)
        slot = {l: t for t, l in enumerate(self.arch.readout_layers)}
        out = np.zeros((len(a), len(b), len(slot), 2))
        if self.arch.pooling == "gap":
            reduce = np.sum
        elif self.arch.pooling == "flatten":
            reduce = lambda t: np.einsum("ijij->", t)  # noqa: E731
        else:
            reduce = lambda t: np.einsum("ijij->", lap4(t, self.arch.lap_window))  # noqa: E731
        for i in range(len(a)):
            for j in range(i if symmetric else 0, len(b)):
                last = None
                for layer, kk, g, _ in layers_4d(a.images[i], b.images[j], self.arch, self.params,
                                                 a.diag[0][i], b.diag[0][j]):
                    if self.arch.layers is None and layer in slot:
                        out[i, j, slot[layer]] = reduce(kk), reduce(g)
                    last = kk, g
                if self.arch.layers is not None:
                    out[i, j, 0] = reduce(last[0]), reduce(last[1])
                if symmetric:
                    out[j, i] = out[i, j]
        return out
