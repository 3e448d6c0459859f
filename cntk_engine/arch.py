"""Architecture of the CNN whose infinite-width kernels (CNTK and NNGP) we compute.

The math, written once here for every backend
=============================================

Network: ``depth - 1`` layers of (conv k x k, stride 1, SAME zero padding) + ReLU, then a
readout (global average pooling, or flatten) and a dense output layer (Arora et al. 2019,
arXiv 1904.11955, Section 4; "depth" counts the conv layers + 1, as in the paper's Table 1).

For two images x, z of shape (C, H, W) write p = (i, j), p' = (i', j') for pixel positions.
Every backend computes the same layer recursion, parametrised by the six numbers of
:class:`LayerParams`: ``w_first``, ``w``, ``b2`` in the layers, ``out_scale``, ``out_b2``,
``norm`` at the readout:

  Sigma_1(p, p') = w_first * box( sum_c x_c(.) z_c(.) )(p, p') + b2
  Theta_1(p, p') = 0 if fix else Sigma_1(p, p')

and for layers l = 1 .. L (L = max depth - 1), with the per-image diagonals
``q_x(l, p) = Sigma_l^{xx}(p, p)`` and ``q_z(l, p') = Sigma_l^{zz}(p', p')``:

  c      = Sigma_l(p, p') / sqrt(q_x(l, p) q_z(l, p'))     (c := 0 where q_x q_z == 0)
  theta  = arccos(clip(c, -1, 1))
  K_l    = ( sqrt(q_x q_z) sin(theta) + (pi - theta) Sigma_l ) / (2 pi)   = E[relu(u) relu(v)]
  Kdot_l = (pi - theta) / (2 pi)                                          = E[relu'(u) relu'(v)]
  G_l    = Theta_l * Kdot_l                                   (the NTK through the ReLU)

  if l < L:
    Sigma_{l+1} = w * box(K_l) + b2
    Theta_{l+1} = Sigma_{l+1} + w * box(G_l)

where box(A)(p, p') = sum_{|a|,|b| <= k//2} A(p + (a, b), p' + (a, b)), with A = 0 wherever p or
p' + shift falls outside the image (zero padding).  Readout of depth d happens after ReLU layer
l = d - 1, through the pooling P:

  gap:     P(A) = sum over all p, p' of A(p, p')  / norm,   norm = (H W)^2 (arora, nt)
  flatten: P(A) = sum over p of A(p, p)           / norm,   norm = 1 (arora), H W (nt)

  nngp_d = out_scale * P(K_l) + out_b2
  ntk_d  = out_scale * P(G_l) + (0 if fix else nngp_d)

Zero-variance windows (q = 0, e.g. all-black MNIST patches, or an all-zero image) have
Sigma = Theta = 0 at every such entry (Cauchy-Schwarz, then induction), so K = G = 0 there
whatever value Kdot takes; we set c := 0 (theta = pi/2, Kdot = 1/4, as neural-tangents'
``fill_zero=pi/2`` does), which yields exactly that limit instead of 0 * inf = NaN.

Self pairs.  When x and z are the same image, the offset-(0, 0) entries are diagonal
entries: Sigma_l(p, p) = q(l, p) and c = 1 exactly.  theta(c) has an infinite slope at c = 1
(theta ~ sqrt(2 (1 - c))), so a rounding error of eps in c would become an error of sqrt(eps)
in Kdot (3e-4 in float32): every backend sets c := 1 exactly on those entries, for every pair
of identical images, wherever they sit: the self pairs of a symmetric Gram, and images that
occur twice (``gram(x, x)``, a training image in the test set, a duplicate in a data set; the
fast backends find them by exact comparison, ``backends.base.identical_pairs``, and give them
their image's self-pair value, so K(x, x') == K(x, x) bit for bit when x' == x).

The diagonal recursion is closed (``K_l(p, p) = q(l, p) / 2``), so the per-image diagonals
cost one small (H, W) box filter per layer: see :func:`cntk_engine.diag.diag_norms`.

Offset slices.  ``box`` maps entry (p, p') only from entries with the same offset
p' - p, and the ReLU step at an entry reads only that entry and two diagonals.  So the 4-D
tensor splits into (2H-1)(2W-1) independent 2-D slices, each of which runs through all layers
on its own: for offset (dy, dx), slice entry (i, j) is (p, p') = ((i0 + i, j0 + j),
(i0 + dy + i, j0 + dx + j)) with i0 = max(0, -dy), j0 = max(0, -dx), on a
(H - |dy|) x (W - |dx|) grid, and ``box`` is a plain zero-padded k x k box sum on that grid.
The flatten readout needs only the offset-(0, 0) slice.

Conventions
-----------
``arora``: the paper's reference code: first layer a plain channel sum over the patch
(w_first = 1), later layers c_sigma / k^2 = 2 / k^2, no bias; the readout carries the same
2 / k^2 and takes the mean (gap) or trace (flatten).

``neural_tangents``: ``stax.serial([Conv(n, (k, k), padding='SAME', W_std, b_std), Relu()]
* (depth - 1), GlobalAvgPool() or Flatten(), Dense(n, W_std, b_std))`` in the NTK
parametrisation: w_first = W_std^2 / (k^2 C), w = W_std^2 / k^2, b2 = b_std^2, out_scale =
W_std^2, out_b2 = b_std^2.

Without biases and with W_std^2 = 2, neural_tangents = (2 / C) * arora for gap and
(2 / (C H W)) * arora for flatten (both kernels, any depth).
"""
from __future__ import annotations

import math
import numbers
import operator
from dataclasses import dataclass
from typing import Sequence

import numpy as np

POOLINGS = ("gap", "flatten")
CONVENTIONS = ("arora", "neural_tangents")
KERNELS = ("ntk", "nngp", "both")
MAX_STD = math.sqrt(np.finfo(np.float64).max)     # largest W_std / b_std whose square is finite


@dataclass(frozen=True)
class LayerParams:
    """The numbers every backend needs for the recursion (see the module docstring)."""

    w_first: float   # multiplies box(x . z) in the first layer
    w: float         # multiplies box(.) in layers 2..L
    b2: float        # added to every Sigma (bias variance)
    out_scale: float  # readout weight variance
    out_b2: float    # readout bias variance
    norm: float      # readout normaliser of the summed entries


@dataclass(frozen=True)
class Architecture:
    """A CNN architecture and the kernels asked of it.

    ``depths`` holds every depth whose readout is wanted; one pass over ``max(depths)``
    layers produces all of them.
    """

    depths: tuple[int, ...]
    pooling: str = "gap"
    fix: bool = False
    convention: str = "arora"
    W_std: float | None = None
    b_std: float | None = None
    filter_size: int = 3

    def __post_init__(self):
        # NumPy scalars (np.int64(3), np.bool_(True), np.float32(1.5), e.g. from np.arange grids
        # in a GridSearchCV) are accepted like the Python numbers and stored as those
        if not isinstance(self.depths, tuple) or not self.depths:
            raise ValueError("depths must be a non-empty tuple of integers >= 2")
        depths = tuple(as_integer(d) for d in self.depths)
        for d in depths:
            if not is_int(d) or d < 2:
                raise ValueError(
                    f"depth must be an integer >= 2 (conv layers + 1, as in the paper); got {d!r}")
        object.__setattr__(self, "depths", depths)
        if len(set(self.depths)) != len(self.depths):
            raise ValueError(f"depths must not repeat; got {list(self.depths)}")
        if self.pooling not in POOLINGS:
            raise ValueError(f"pooling must be one of {POOLINGS}; got {self.pooling!r}")
        if self.convention not in CONVENTIONS:
            raise ValueError(f"convention must be one of {CONVENTIONS}; got {self.convention!r}")
        fs = as_integer(self.filter_size)
        if not is_int(fs) or fs < 1 or fs % 2 == 0:
            raise ValueError(f"filter_size must be a positive odd integer (1, 3, 5, ...); got {fs!r}")
        object.__setattr__(self, "filter_size", fs)
        if not isinstance(self.fix, (bool, np.bool_)):
            raise ValueError(f"fix must be True or False; got {self.fix!r}")
        object.__setattr__(self, "fix", bool(self.fix))
        if self.fix and min(self.depths) < 3:
            raise ValueError(
                f"fix=True needs depth >= 3; got depths {list(self.depths)}: at depth 2 the only "
                "conv layer is the first layer, so with the first and the last layer fixed nothing "
                "is trained and the NTK would be identically 0; kernel='nngp' does not depend on "
                "fix, so fix=False gives the same NNGP")
        if self.convention == "arora":
            if self.W_std is not None or self.b_std is not None:
                raise ValueError(
                    "W_std and b_std belong to convention='neural_tangents'; the 'arora' "
                    "convention has fixed constants (c_sigma = 2, no bias)")
        else:
            for name in ("W_std", "b_std"):
                v = getattr(self, name)
                if v is None:
                    continue
                if (isinstance(v, (bool, np.bool_)) or not isinstance(v, numbers.Real)
                        or not math.isfinite(v) or v < 0):
                    raise ValueError(f"{name} must be a finite number >= 0 or None; got {v!r}")
                if float(v) > MAX_STD:      # its square (a variance) must be a finite float64
                    raise ValueError(f"{name} must be at most {MAX_STD:.4g} (its square, the "
                                     f"{'weight' if name == 'W_std' else 'bias'} variance, must be a "
                                     f"finite float64) or None; got {v!r}")
                if type(v) not in (int, float):
                    object.__setattr__(self, name, float(v))

    # ----------------------------------------------------------------- derived numbers
    @property
    def max_depth(self) -> int:
        return max(self.depths)

    @property
    def n_layers(self) -> int:
        """Number of conv + ReLU layers L run in one pass (max depth - 1)."""
        return self.max_depth - 1

    @property
    def readout_layers(self) -> tuple[int, ...]:
        """0-based ReLU layer index at which each depth in ``depths`` is read out."""
        return tuple(d - 2 for d in self.depths)

    def layer_params(self, channels: int, height: int, width: int) -> LayerParams:
        k2 = float(self.filter_size ** 2)
        hw = float(height * width)
        if self.convention == "arora":
            w = 2.0 / k2
            norm = hw * hw if self.pooling == "gap" else 1.0
            return LayerParams(w_first=1.0, w=w, b2=0.0, out_scale=w, out_b2=0.0, norm=norm)
        W2 = 2.0 if self.W_std is None else float(self.W_std) ** 2
        b2 = 0.0 if self.b_std is None else float(self.b_std) ** 2
        norm = hw * hw if self.pooling == "gap" else hw
        return LayerParams(w_first=W2 / (k2 * channels), w=W2 / k2, b2=b2,
                           out_scale=W2, out_b2=b2, norm=norm)

    def to_dict(self) -> dict:
        return {"depths": list(self.depths), "pooling": self.pooling, "fix": self.fix,
                "convention": self.convention, "W_std": self.W_std, "b_std": self.b_std,
                "filter_size": self.filter_size}


def make_architecture(depth=None, depths: Sequence[int] | None = None, **kw) -> Architecture:
    """Build an :class:`Architecture` from the ``depth=`` / ``depths=`` of the public API."""
    if (depth is None) == (depths is None):
        raise ValueError("give exactly one of depth= (an int >= 2) or depths= (a list of ints >= 2)")
    if depth is not None:
        ds = (depth,)
    else:
        if isinstance(depths, (str, bytes)) or not hasattr(depths, "__iter__"):
            raise ValueError(f"depths must be a list of integers >= 2; got {depths!r}")
        ds = tuple(depths)
    return Architecture(depths=ds, **kw)


def is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def as_integer(v):
    """``v`` as a Python int if it is integer-like (int, NumPy integer, 0-d integer array) and
    not a bool; otherwise ``v`` unchanged (for the caller's error message)."""
    if isinstance(v, (bool, np.bool_)) or (isinstance(v, np.ndarray) and v.dtype == bool):
        return v
    try:
        return operator.index(v)
    except TypeError:
        return v


def finalize(sums, arch: Architecture, params: LayerParams, kernel: str):
    """Turn readout sums into kernels.

    ``sums[..., t, 0]`` = sum of K at the readout of ``arch.depths[t]`` and
    ``sums[..., t, 1]`` = sum of G (Theta * Kdot) there.  Returns a dict
    {depth: {"ntk": array, "nngp": array}} with only the kernels asked for.
    Works on NumPy and CuPy arrays alike.
    """
    out = {}
    for t, d in enumerate(arch.depths):
        nngp = sums[..., t, 0] * (params.out_scale / params.norm) + params.out_b2
        res = {}
        if kernel in ("ntk", "both"):
            g = sums[..., t, 1] * (params.out_scale / params.norm)
            res["ntk"] = g if arch.fix else g + nngp
        if kernel in ("nngp", "both"):
            res["nngp"] = nngp
        out[d] = res
    return out


__all__ = ["Architecture", "LayerParams", "make_architecture", "finalize",
           "POOLINGS", "CONVENTIONS", "KERNELS"]
