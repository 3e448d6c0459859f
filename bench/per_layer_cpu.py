"""The paper's straightforward per-layer algorithm on the CPU (NumPy): the baseline.

Arora et al. 2019 (Section 4.3 and their reference code) compute each pair (x, z) as a full
4-D (H W) x (H W) covariance tensor, layer by layer: one 3x3 "conv" of the tensor (entry
(p, p') summed over the k x k shifts applied to both p and p') and one elementwise ReLU-kernel
step per layer, every layer reading and writing the whole tensor in memory.  This module is
that algorithm in NumPy, in the compute dtype asked for (float32 like the paper, or float64),
one pair at a time, with preallocated buffers.  It is NOT the project's reference backend
(``cntk_engine.backends.reference`` is the float64 test oracle); it is the "what you would
write from the paper" alternative the benchmark harness measures the engine against, so it
stays an implementation of its own rather than a call into the engine.

The per-image diagonals are the engine's (``cntk_engine.diag.diag_norms``, a few box filters
per image), so the timing is the pair work, as for the engine.  Self pairs get c = 1 exactly
on their diagonal (as every backend of the project does; it costs nothing).

    from bench.per_layer_cpu import gram
    res = gram(x, depths=[3, 6], pooling="gap", fix=False, dtype="float32")  # {depth: (ntk, nngp)}
"""
from __future__ import annotations

import math

import numpy as np

from cntk_engine.arch import finalize, make_architecture
from cntk_engine.diag import diag_norms


class _Conv4:
    """box of a 4-D (H, W, H, W) tensor: out(p, p') = sum_{a,b} in(p + (a,b), p' + (a,b))."""

    def __init__(self, h, w, k, dtype):
        self.r = k // 2
        r = self.r
        self.k = k
        self.h, self.w = h, w
        self.pad = np.zeros((h + 2 * r, w + 2 * r, h + 2 * r, w + 2 * r), dtype=dtype)

    def __call__(self, a, out):
        r, h, w, p = self.r, self.h, self.w, self.pad
        p[r:r + h, r:r + w, r:r + h, r:r + w] = a
        out[...] = 0
        for da in range(self.k):
            for db in range(self.k):
                out += p[da:da + h, db:db + w, da:da + h, db:db + w]
        return out


def pair_sums_one(x, z, sx, isx, sz, isz, arch, params, self_pair, dtype, slot, conv):
    """Readout sums (n_depths, 2) of one pair, the 4-D way.  sx/isx: sqrt(q) and 1/sqrt(q)."""
    c_, h, w = x.shape
    hw = h * w
    f = dtype.type
    one = f(1.0)
    inv2pi = f(1.0 / (2.0 * math.pi))
    pi = f(math.pi)
    sig = np.empty((h, w, h, w), dtype=dtype)
    conv((x.reshape(c_, hw).T @ z.reshape(c_, hw)).reshape(h, w, h, w), sig)
    sig *= f(params.w_first)
    sig += f(params.b2)
    theta = np.zeros_like(sig) if arch.fix else sig.copy()
    tmp = np.empty_like(sig)
    cbuf = np.empty_like(sig)
    out = np.zeros((len(arch.depths), 2))
    diag = np.arange(hw)
    for l in range(arch.n_layers):
        norm = np.multiply.outer(sx[l], sz[l]).astype(dtype, copy=False)
        inv = np.multiply.outer(isx[l], isz[l]).astype(dtype, copy=False)
        np.multiply(sig, inv, out=cbuf)
        np.clip(cbuf, -one, one, out=cbuf)
        if self_pair:
            cbuf.reshape(hw, hw)[diag, diag] = one
        # K = (norm sqrt(1 - c^2) + (pi - acos c) sig) / (2 pi);  Kdot = (pi - acos c) / (2 pi)
        pma = pi - np.arccos(cbuf)
        np.multiply(cbuf, cbuf, out=tmp)
        np.subtract(one, tmp, out=tmp)
        np.sqrt(tmp, out=tmp)
        tmp *= norm
        sig *= pma
        sig += tmp
        sig *= inv2pi                       # sig now holds K
        pma *= inv2pi                       # Kdot
        theta *= pma                        # theta now holds G
        t = slot[l]
        if t >= 0:
            out[t, 0] = sig.sum(dtype=np.float64) if arch.pooling == "gap" else \
                np.trace(sig.reshape(hw, hw), dtype=np.float64)
            out[t, 1] = theta.sum(dtype=np.float64) if arch.pooling == "gap" else \
                np.trace(theta.reshape(hw, hw), dtype=np.float64)
        if l + 1 < arch.n_layers:
            conv(sig, tmp)
            np.multiply(tmp, f(params.w), out=sig)
            sig += f(params.b2)
            conv(theta, tmp)
            np.multiply(tmp, f(params.w), out=theta)
            theta += sig
    return out


def gram(x1, x2=None, *, depth=None, depths=None, pooling="gap", fix=False, kernel="both",
         convention="arora", filter_size=3, dtype="float32"):
    """Per-layer 4-D CNTK/NNGP, same meaning and result layout as ``cntk_engine.gram``.

    x1, x2: (N, C, H, W).  Returns {depth: (ntk, nngp)} for kernel="both" with depths=,
    a single result with depth=.
    """
    arch = make_architecture(depth=depth, depths=depths, pooling=pooling, fix=fix,
                             convention=convention, filter_size=filter_size)
    dtype = np.dtype(dtype)
    a = np.asarray(x1, dtype=np.float64)
    symmetric = x2 is None
    b = a if symmetric else np.asarray(x2, dtype=np.float64)
    _, c, h, w = a.shape
    params = arch.layer_params(c, h, w)
    qa = diag_norms(a, arch, params)
    qb = qa if symmetric else diag_norms(b, arch, params)

    def split(q):
        s = np.sqrt(np.maximum(q, 0.0))
        inv = np.zeros_like(s)
        np.divide(1.0, s, out=inv, where=s > 0)
        return s, inv

    sa, ia = split(qa)
    sb, ib = (sa, ia) if symmetric else split(qb)
    slot = np.full(arch.n_layers, -1)
    for t, layer in enumerate(arch.readout_layers):
        slot[layer] = t
    conv = _Conv4(h, w, arch.filter_size, dtype)
    ac, bc = a.astype(dtype), b.astype(dtype)
    sums = np.zeros((len(a), len(b), len(arch.depths), 2))
    for i in range(len(a)):
        for j in range(i if symmetric else 0, len(b)):
            s = pair_sums_one(ac[i], bc[j], sa[i], ia[i], sb[j], ib[j], arch, params,
                              symmetric and i == j, dtype, slot, conv)
            sums[i, j] = s
            if symmetric:
                sums[j, i] = s
    kernels = finalize(sums, arch, params, kernel)

    def pick(res):
        return (res["ntk"], res["nngp"]) if kernel == "both" else res[kernel]

    if depth is not None:
        return pick(kernels[depth])
    return {d: pick(r) for d, r in kernels.items()}
