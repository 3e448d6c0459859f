"""Per-image diagonals q(l, p) = Sigma_l^{xx}(p, p) of every layer (see ``arch``).

The diagonal recursion is closed: on the diagonal the ReLU kernel is K(p, p) = q(l, p) / 2
(theta = 0), so

  q(1, p)     = w_first * box(sum_c x_c^2)(p) + b2
  q(l + 1, p) = w * box(q(l, .) / 2)(p) + b2

with box the zero-padded k x k box sum on the (H, W) grid.  Computed once per image in
float64 (cheap: L small box filters per image) and shared by every tile that uses the image.

In a pooled stack the recursion is not closed (``arch``, Pooling stacks): the diagonals come
from the image's self kernel on the offset slices |d| <= m_t of each stage (:func:`_stack_diag`),
still once per image, vectorised over the images.
"""
from __future__ import annotations

import math

import numpy as np

from .arch import Architecture, LayerParams
from .arrays import get_array_module
from .memo import Memo, images_key

# The images whose diagonals are computed together (a chunk) hold at most about this much
# float64 working memory (:func:`working_bytes`), so that a set's diagonals cost the memory of
# the result, not a multiple of it (Myrtle-10's first stage holds its self kernel on 49 offset
# slices of each 32 x 32 image).
CHUNK_BYTES = 1 << 27


def working_bytes(arch: Architecture, height: int, width: int) -> int:
    """Upper estimate of the float64 bytes one image needs while its diagonals are computed
    and a backend lays them out (``Backend.prepare``): q itself (L h w), five arrays of its size
    for the backends' copies (sqrt(q), 1/sqrt(q), a layout with rows twice, casts), a few
    (h, w) temporaries of the recursion and, in a pooled stack, the self kernel on the
    (2 m_t + 1)^2 offset slices of each stage t (Sigma, K and their temporaries: four of each;
    :func:`_stack_diag`), and :func:`box2d`'s zero-padded copy, its row sums and its result
    (a filter far wider than the images pads them far beyond their size)."""
    q = arch.n_layers * height * width * 8
    grids = 8 * height * width
    if arch.has_pooling:
        stages = arch.plan(height, width)[0]
        grids = max(4 * (2 * m + 1) ** 2 * st.height * st.width
                    for m, st in zip(_offset_reach(stages), stages))
    r = arch.filter_size // 2
    padded = 3 * (height + 2 * r) * (width + 2 * r) * 8
    return 6 * q + 8 * grids + padded


def chunk_images(arch: Architecture, height: int, width: int, chunk_bytes: int | None = None) -> int:
    """How many images' diagonals to compute together: ``chunk_bytes`` (default
    :data:`CHUNK_BYTES`) of working memory (:func:`working_bytes`), at least one image."""
    return max(1, (CHUNK_BYTES if chunk_bytes is None else chunk_bytes) // working_bytes(arch, height, width))


def box2d(a, k: int):
    """Zero-padded k x k box sum over the last two axes of ``a`` (NumPy or CuPy)."""
    r = k // 2
    if r == 0:
        return a.copy()
    h, w = a.shape[-2:]
    pad = get_array_module(a).zeros(a.shape[:-2] + (h + 2 * r, w + 2 * r), dtype=a.dtype)
    pad[..., r:r + h, r:r + w] = a
    rows = sum(pad[..., :, s:s + w] for s in range(k))        # sum along columns
    return sum(rows[..., s:s + h, :] for s in range(k))       # then along rows


#: A pooled stack's diagonals cost about what a pair costs (the self kernel on every offset
#: slice: some 4 ms an image for Myrtle-5, 5 ms for Myrtle-10, on a CPU core), and an
#: estimator's ``predict`` asks for its training set's at every call (half of a one-image
#: predict).  So a backend's preparation on the host keeps the last ones it computed, at most
#: this many bytes (:mod:`cntk_engine.memo`; a repeat gets a copy of the same values): some
#: 2,000 Myrtle-5 or 900 Myrtle-10 images at 32 x 32.  A set beyond that gains nothing (its
#: chunks, met in order, each drop out before their next use).
MEMO_BYTES = 64 << 20
_memo = Memo()


def clear_memo() -> None:
    """Forget the kept diagonals (:data:`MEMO_BYTES`)."""
    _memo.clear()


def diag_norms(x, arch: Architecture, params: LayerParams, *, keep: bool = True):
    """q(l, p) for images ``x`` (N, C, H, W): an (N, L, H, W) float64 array, l = 1..L; in a
    pooled stack layer l's q fills [:h_l, :w_l] at its stage's resolution (zeros beyond).

    NumPy in, NumPy out; CuPy in, CuPy out (computed on the device).  A pooled stack's are
    taken from, and with ``keep`` kept for, a repeat (:data:`MEMO_BYTES`; NumPy only).
    """
    xp = get_array_module(x)
    x = xp.asarray(x, dtype=xp.float64)
    if arch.has_pooling:
        if xp is not np:
            return _stack_diag(x, arch, params)
        x = np.ascontiguousarray(x)
        # what the recursion reads: not the readout (its LAP window, normaliser, weights) or the
        # flips, under which the same set's diagonals are the same
        key = images_key(x, arch.layers, arch.filter_size, arch.n_layers,
                         params.w_first, params.w, params.b2)
        q = _memo.get(key)
        if q is None:
            q = _stack_diag(x, arch, params)
            if not (keep and _memo.put(key, q, q.nbytes, MEMO_BYTES)):
                return q
        return q.copy()                 # the caller's to change; the kept one stays as computed
    n, _, h, w = x.shape
    q = xp.empty((n, arch.n_layers, h, w), dtype=xp.float64)
    # sum over channels in a fixed order, element by element: a reduction (einsum, sum) may
    # vectorise differently with the arrays' alignment, and the diagonals must be bit-identical
    # in every process (resumed and distributed jobs are compared bit for bit)
    sq = x[:, 0] * x[:, 0]
    for c in range(1, x.shape[1]):
        sq = sq + x[:, c] * x[:, c]
    cur = params.w_first * box2d(sq, arch.filter_size) + params.b2
    for l in range(arch.n_layers):
        q[:, l] = cur
        if l + 1 < arch.n_layers:
            cur = params.w * box2d(cur * 0.5, arch.filter_size) + params.b2
    return q


def _offset_masks(xp, h: int, w: int, m: int) -> dict:
    """{(dy, dx): (h, w) 0/1 mask of the positions p with p + d inside}, |dy|, |dx| <= m."""
    iy, ix = xp.arange(h)[:, None], xp.arange(w)[None, :]
    return {(dy, dx): ((iy + dy >= 0) & (iy + dy < h) & (ix + dx >= 0) & (ix + dx < w)).astype(xp.float64)
            for dy in range(-m, m + 1) for dx in range(-m, m + 1)}


def _shift(a, dy: int, dx: int):
    """b[..., i, j] = a[..., i + dy, j + dx], zero where that lies outside."""
    xp = get_array_module(a)
    h, w = a.shape[-2:]
    out = xp.zeros_like(a)
    out[..., max(0, -dy):h - max(0, dy), max(0, -dx):w - max(0, dx)] = \
        a[..., max(0, dy):h - max(0, -dy), max(0, dx):w - max(0, -dx)]
    return out


def _relu_nngp(sigma, q, d):
    """K = E[relu(u) relu(v)] of the self kernel's offset-d slice: q(p) and q(p + d) the
    variances (the arch.py ReLU step; c := 1 on the offset-0 slice, c := 0 where q q == 0)."""
    xp = get_array_module(sigma)
    if d == (0, 0):
        return sigma * 0.5
    norm = xp.sqrt(q * _shift(q, *d))
    c = xp.where(norm > 0, sigma / xp.where(norm > 0, norm, 1.0), 0.0)
    theta = xp.arccos(xp.clip(c, -1.0, 1.0))
    return (norm * xp.sin(theta) + (math.pi - theta) * sigma) / (2 * math.pi)


def _offset_reach(stages) -> list[int]:
    """m_t per stage: the largest |offset| of stage t's self kernel that the diagonals of the
    stages after it read (0 for the last; m_t = s m_{t+1} + w - 1 for a w x w pool of stride s)."""
    need = [0] * len(stages)
    for t in range(len(stages) - 2, -1, -1):
        pool = stages[t].pool
        need[t] = pool.stride * need[t + 1] + pool.window - 1
    return need


def _stack_diag(x, arch: Architecture, params: LayerParams):
    """Diagonals of a pooled stack from the self kernel on the offsets each stage needs."""
    xp = get_array_module(x)
    n, _, h0, w0 = x.shape
    stages, _, _ = arch.plan(h0, w0)
    need = _offset_reach(stages)
    k = arch.filter_size
    q = xp.zeros((n, arch.n_layers, h0, w0), dtype=xp.float64)
    kernel = None                                    # {offset: (n, h, w)} pooled K of the stage
    for t, st in enumerate(stages):
        m, h, w = need[t], st.height, st.width
        masks = _offset_masks(xp, h, w, m)
        if t == 0:      # first layer: box of the channel products x(p) . x(p + d)
            sig = {}
            for d, mask in masks.items():
                prod = x[:, 0] * _shift(x[:, 0], *d)
                for c in range(1, x.shape[1]):
                    prod = prod + x[:, c] * _shift(x[:, c], *d)
                sig[d] = (params.w_first * box2d(prod, k) + params.b2) * mask
        else:
            # the pooled entries whose p + d lies outside hold sums of valid fine entries: zeroed
            sig = {d: (params.w * box2d(kernel[d] * mask, k) + params.b2) * mask
                   for d, mask in masks.items()}
        for i in range(st.n_layers):
            layer = st.first_layer + i
            qd = sig[(0, 0)]
            q[:, layer, :h, :w] = qd
            kk = {d: _relu_nngp(s, qd, d) * masks[d] for d, s in sig.items()}
            if i + 1 < st.n_layers:
                sig = {d: (params.w * box2d(kk[d], k) + params.b2) * masks[d] for d in masks}
        if st.pool is not None:        # pool into the next stage's offsets |D| <= m_{t+1}
            pool, nxt = st.pool, need[t + 1]
            ho, wo = stages[t + 1].height, stages[t + 1].width
            s_, wn = pool.stride, pool.window
            inv = 1.0 / wn ** 4
            kernel = {}
            for dy in range(-nxt, nxt + 1):
                for dx in range(-nxt, nxt + 1):
                    acc = xp.zeros((n, ho, wo), dtype=xp.float64)
                    comp = xp.zeros_like(acc)
                    for uy in range(wn):
                        for ux in range(wn):
                            for vy in range(wn):
                                for vx in range(wn):
                                    src = kk[(s_ * dy + vy - uy, s_ * dx + vx - ux)]
                                    acc = _add_compensated(
                                        xp, acc, comp, src[:, uy:uy + s_ * ho:s_, ux:ux + s_ * wo:s_] * inv)
                    kernel[(dy, dx)] = acc + comp
    return q


def _add_compensated(xp, acc, comp, v):
    """acc + v, its rounding error added to ``comp`` in place (Neumaier): the pools' sums are
    compensated, as the kernels' are (``backends.numba_cpu``: a pooled entry that is
    +-sqrt(q q') in exact arithmetic must give c within the snap of +-1, and a plain sum of its
    w^4 terms drifts by up to ~w^4 ulps)."""
    t = acc + v
    comp += xp.where(xp.abs(acc) >= xp.abs(v), (acc - t) + v, (v - t) + acc)
    return t
