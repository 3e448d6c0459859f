"""The tests' arbiter: the kernel recursion of ``cntk_engine.arch`` (its module docstring is the
specification) written out a second time, in 40-digit arithmetic (mpmath), on the whole 4-D
covariance of each pair of images: no offset slices, no closed-form diagonals, no snapping of
c to +-1, nothing rounded to float64 between the pixels and the result.

It settles what float64 codes cannot settle between themselves.  Where c = Sigma / sqrt(q_x q_z)
is exactly +-1 (identical images, positive or negative multiples, constant images, blank windows
with biases), arccos turns a rounding error of eps in c into about sqrt(eps) in the kernel, and
long sums (a pool over a whole image) round differently in a diagonal than in a cross entry.
neural-tangents is no arbiter there: its ReLU step takes the angle as
arctan2(sqrt(q_x q_z - Sigma^2), Sigma), which leaves about sqrt(eps) where c = +-1.

Pure Python on object arrays of ``mpmath.mpf``: about 0.3 s per pair of 6 x 6 images; meant
for images of a few pixels a side.
"""
from __future__ import annotations

import mpmath as mp
import numpy as np

from cntk_engine.arch import AvgPool, ConvRelu

DIGITS = 40


def _mp(a) -> np.ndarray:
    """``a`` as an object array of mpf (exact: a float64 is a 53-bit binary fraction)."""
    a = np.asarray(a, dtype=np.float64)
    out = np.empty(a.shape, dtype=object)
    out.flat[:] = [mp.mpf(float(v)) for v in a.flat]
    return out


def _zeros(shape) -> np.ndarray:
    out = np.empty(shape, dtype=object)
    out.fill(mp.mpf(0))
    return out


def _box(A: np.ndarray, k: int) -> np.ndarray:
    """box(A)(p, p') = sum over |a|, |b| <= k // 2 of A(p + (a, b), p' + (a, b)), zero outside."""
    r = k // 2
    h, w = A.shape[:2]
    padded = _zeros((h + 2 * r, w + 2 * r) * 2)
    padded[r:r + h, r:r + w, r:r + h, r:r + w] = A
    out = _zeros(A.shape)
    for a in range(-r, r + 1):
        for b in range(-r, r + 1):
            rows, cols = slice(r + a, r + a + h), slice(r + b, r + b + w)
            out = out + padded[rows, cols, rows, cols]
    return out


def _pool(A: np.ndarray, w: int, s: int) -> np.ndarray:
    """(pool A)(P, P') = w^-4 sum over u, v in [0, w)^2 of A(s P + u, s P' + v) (VALID)."""
    h, wd = (A.shape[0] - w) // s + 1, (A.shape[1] - w) // s + 1
    out = _zeros((h, wd, h, wd))
    for u0 in range(w):
        for u1 in range(w):
            for v0 in range(w):
                for v1 in range(w):
                    out = out + A[u0:u0 + s * (h - 1) + 1:s, u1:u1 + s * (wd - 1) + 1:s,
                                  v0:v0 + s * (h - 1) + 1:s, v1:v1 + s * (wd - 1) + 1:s]
    return out / mp.mpf(w) ** 4


def _relu(sigma, q_x, q_z):
    """(K, Kdot) of the ReLU from the covariance and the two images' diagonals, c := 0 where
    q_x q_z = 0; c clipped to [-1, 1] only against the 40th digit (Cauchy-Schwarz holds)."""
    norm = np.multiply.outer(q_x, q_z)
    K, Kdot = _zeros(sigma.shape), _zeros(sigma.shape)
    for idx in np.ndindex(sigma.shape):
        n = mp.sqrt(norm[idx]) if norm[idx] > 0 else mp.mpf(0)
        c = sigma[idx] / n if n > 0 else mp.mpf(0)
        theta = mp.acos(min(max(c, mp.mpf(-1)), mp.mpf(1)))
        K[idx] = (n * mp.sin(theta) + (mp.pi - theta) * sigma[idx]) / (2 * mp.pi)
        Kdot[idx] = (mp.pi - theta) / (2 * mp.pi)
    return K, Kdot


def _diagonal(A: np.ndarray) -> np.ndarray:
    h, w = A.shape[:2]
    out = np.empty((h, w), dtype=object)
    for i in range(h):
        for j in range(w):
            out[i, j] = A[i, j, i, j]
    return out


def _constants(convention, filter_size, channels, W_std, b_std):
    """(w_first, w, b2, out_scale, out_b2) of the convention, as ``cntk_engine.arch`` defines them:
    arora the paper's code (a plain channel sum, then 2 / k^2 in the layers and the readout),
    neural_tangents stax's NTK parametrisation (W_std^2 / fan-in, b_std^2)."""
    k2 = mp.mpf(filter_size) ** 2
    if convention == "arora":
        return mp.mpf(1), 2 / k2, mp.mpf(0), 2 / k2, mp.mpf(0)
    W2 = mp.mpf(2) if W_std is None else mp.mpf(float(W_std)) ** 2
    b2 = mp.mpf(0) if b_std is None else mp.mpf(float(b_std)) ** 2
    return W2 / (k2 * channels), W2 / k2, b2, W2, b2


def _network(x, z, layers, filter_size, consts, fix, q_x=None, q_z=None):
    """The last layer's (K, G) of the pair (x, z) (object arrays (C, H, W)) and the diagonals
    of its conv layers; q_x, q_z the images' own diagonals (None: the pair is an image with
    itself, whose diagonals are its own)."""
    w_first, w, b2 = consts[:3]
    K = G = None
    diagonals = []
    for layer in layers:
        if isinstance(layer, AvgPool):
            K, G = _pool(K, layer.window, layer.stride), _pool(G, layer.window, layer.stride)
            continue
        if K is None:
            xz = sum(np.multiply.outer(x[c], z[c]) for c in range(x.shape[0]))
            sigma = w_first * _box(xz, filter_size) + b2
            theta = _zeros(sigma.shape) if fix else sigma
        else:
            sigma = w * _box(K, filter_size) + b2
            theta = sigma + w * _box(G, filter_size)
        layer_index = len(diagonals)
        diagonals.append(_diagonal(sigma))
        own = diagonals[-1]
        K, Kdot = _relu(sigma, own if q_x is None else q_x[layer_index],
                        own if q_z is None else q_z[layer_index])
        G = theta * Kdot
    return K, G, diagonals


def _readout(A, pooling, lap_window, convention):
    """P(A): the sum gap / flatten / LAP reads, over its norm."""
    h, w = A.shape[:2]
    if pooling == "gap":
        return sum(A.flat) / mp.mpf(h * w) ** 2
    norm = mp.mpf(1) if convention == "arora" else mp.mpf(h * w)
    if pooling == "flatten":
        return sum(_diagonal(A).flat) / norm
    c = lap_window            # AvgPool((c, c), stride 1, circular padding), then the trace
    total = mp.mpf(0)
    for i in range(h):
        for j in range(w):
            for u0 in range(c):
                for u1 in range(c):
                    for v0 in range(c):
                        for v1 in range(c):
                            total += A[(i + u0) % h, (j + u1) % w, (i + v0) % h, (j + v1) % w]
    return total / mp.mpf(c) ** 4 / norm


def self_kernels(x, **kw):
    """(ntk, nngp) float64 vectors of K(x_i, x_i), with :func:`gram`'s keywords."""
    pairs = [gram(x[i:i + 1], **kw) for i in range(len(x))]
    return tuple(np.array([p[t][0, 0] for p in pairs]) for t in range(2))


def gram(x1, x2=None, *, depth=None, architecture=None, pooling="gap", lap_window=None,
         flip=False, fix=False, convention="arora", W_std=None, b_std=None, filter_size=3):
    """(ntk, nngp) float64 (N1, N2) matrices of images x1 against x2 (NCHW; x2 None: x1 against
    itself), with ``cntk_engine.gram``'s keywords: the CNN of ``depth`` or a stack of
    ``ConvRelu`` / ``AvgPool`` layers as ``architecture``.  Each entry is computed in 40 digits
    and rounded once to float64."""
    if (depth is None) == (architecture is None):
        raise ValueError("give depth (the CNN) or architecture (a stack), not both")
    layers = [ConvRelu()] * (depth - 1) if depth is not None else list(architecture)
    x1 = np.asarray(x1, dtype=np.float64)
    symmetric = x2 is None
    x2 = x1 if symmetric else np.asarray(x2, dtype=np.float64)
    ntk, nngp = np.zeros((len(x1), len(x2))), np.zeros((len(x1), len(x2)))
    with mp.workdps(DIGITS):
        consts = _constants(convention, filter_size, x1.shape[1], W_std, b_std)
        out_scale, out_b2 = consts[3:]
        a = [_mp(x) for x in x1]
        # every image the pairs read against x1: x2, then its horizontal flips
        b = [_mp(x) for x in x2] + ([_mp(x[:, :, ::-1]) for x in x2] if flip else [])
        q_a = [_network(x, x, layers, filter_size, consts, fix)[2] for x in a]
        q_b = q_a if symmetric and not flip else \
            [_network(x, x, layers, filter_size, consts, fix)[2] for x in b]
        for i in range(len(x1)):
            for j in range(i if symmetric else 0, len(x2)):
                terms = [j] + ([len(x2) + j] if flip else [])
                t_ntk = t_nngp = mp.mpf(0)
                for t in terms:
                    K, G, _ = _network(a[i], b[t], layers, filter_size, consts, fix, q_a[i], q_b[t])
                    ng = out_scale * _readout(K, pooling, lap_window, convention) + out_b2
                    nt = out_scale * _readout(G, pooling, lap_window, convention) + (0 if fix else ng)
                    t_ntk, t_nngp = t_ntk + nt / len(terms), t_nngp + ng / len(terms)
                ntk[i, j], nngp[i, j] = float(t_ntk), float(t_nngp)
                if symmetric:
                    ntk[j, i], nngp[j, i] = ntk[i, j], nngp[i, j]
    return ntk, nngp
