"""Per-image diagonals q(l, p) = Sigma_l^{xx}(p, p) of every layer (see ``arch``).

The diagonal recursion is closed: on the diagonal the ReLU kernel is K(p, p) = q(l, p) / 2
(theta = 0), so

  q(1, p)     = w_first * box(sum_c x_c^2)(p) + b2
  q(l + 1, p) = w * box(q(l, .) / 2)(p) + b2

with box the zero-padded k x k box sum on the (H, W) grid.  Computed once per image in
float64 (cheap: L small box filters per image) and shared by every tile that uses the image.
"""
from __future__ import annotations


from .arch import Architecture, LayerParams
from .arrays import get_array_module


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


def diag_norms(x, arch: Architecture, params: LayerParams):
    """q(l, p) for images ``x`` (N, C, H, W): an (N, L, H, W) float64 array, l = 1..L.

    NumPy in, NumPy out; CuPy in, CuPy out (computed on the device).
    """
    xp = get_array_module(x)
    x = xp.asarray(x, dtype=xp.float64)
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
