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
  lap:     P(A) = sum over p, p' of n_H(dy) n_W(dx) A(p, p') / c^4 / norm,   norm as flatten

  nngp_d = out_scale * P(K_l) + out_b2
  ntk_d  = out_scale * P(G_l) + (0 if fix else nngp_d)

LAP (local average pooling, Li et al. 2019) is AvgPool((c, c), stride 1, CIRCULAR padding) then
Flatten: (pool A)(P, P') = c^-4 sum_{u, v in window} A(P + u, P' + v) (indices mod H, W), whose
trace is the sum above with (dy, dx) = p' - p taken mod (H, W) and n_H(d) = #{(u, v) in
[0, c)^2 : v - u = d mod H}, the number of window pairs at that circular offset (where the
window sits does not matter).  So LAP is a weight per offset at the readout, and the two
slices of a packed grid (offsets dx and dx - W) share it.  c = 1 is flatten; c = H on H x H
images makes n constant (n = H per axis), i.e. the gap readout times H^2 (arora) or exactly
gap (neural_tangents, whose flatten normaliser is H W).

Flip symmetrisation (``flip=True``): K_flip(x, z) = (K(x, z) + K(x, F z)) / 2 with F the
horizontal flip (the width axis reversed): the kernel of the network made invariant to
horizontal flips.  Every network here is flip-equivariant (symmetric filters' box sums, pools
whose windows tile the map, LAP's symmetric n), so K(x, F z) = K(F x, z) = K(z, F x): the
flip-symmetrised Gram is symmetric, and a symmetric job still computes each unordered pair
once (both terms), at twice the per-pair cost.

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
The same infinite slope bites wherever Sigma = +-sqrt(q_x q_z) holds exactly for other
reasons: entries whose receptive fields match in both images (with biases, two all-zero
windows give Sigma = q_x = q_z = b2 at the first layer, and so on up), which real images have
in their blank margins, and two images of which one is a positive (or negative) multiple of
the other (c = +-1 at every entry), such as constant images of different values.  Past the
first layer Sigma and q_x, q_z carry rounding of their own, so c lands a few ulps from +-1
there in any form of the quotient (computed as it comes, K(x, 3 x) is about 1e-8 off): the
reference and numba backends take c within SNAP_ULPS = 8 ulps of +-1 as +-1: at most the
error the rounding of c already carries anywhere else, and exact where c = +-1 is exact.  The
CUDA kernels do the same in both dtypes (relu_step.cuh; a clamp of c to [-1, 1] alone leaves
float32 7e-5 of the kernel off where every entry has c = +-1: one-channel images with filter
size 1).  Near-duplicate images, whose c is a few ulps from 1 without being 1, are off by about
sqrt(eps) there in every float32 backend.  All are exact on self pairs' diagonals, where they
set c := 1.

The diagonal recursion is closed (``K_l(p, p) = q(l, p) / 2``), so the per-image diagonals
cost one small (H, W) box filter per layer: see :func:`cntk_engine.diag.diag_norms`.

Offset slices.  ``box`` maps entry (p, p') only from entries with the same offset
p' - p, and the ReLU step at an entry reads only that entry and two diagonals.  So the 4-D
tensor splits into (2H-1)(2W-1) independent 2-D slices, each of which runs through all layers
on its own: for offset (dy, dx), slice entry (i, j) is (p, p') = ((i0 + i, j0 + j),
(i0 + dy + i, j0 + dx + j)) with i0 = max(0, -dy), j0 = max(0, -dx), on a
(H - |dy|) x (W - |dx|) grid, and ``box`` is a plain zero-padded k x k box sum on that grid.
The flatten readout needs only the offset-(0, 0) slice.

Pooling stacks
--------------
A stack (:func:`serial`, the Myrtle presets) interleaves the conv + ReLU layers with average
pooling layers ``AvgPool(w, stride s)`` (VALID: windows inside the image, which must tile it:
(H - w) % s == 0).  Pooling is linear and has no parameters, so it maps both kernels alike:

  (pool A)(P, P') = w^-4 sum_{u, v in [0, w)^2} A(s P + u, s P' + v)      for A = K_l and G_l,

and the next conv reads them as it reads a ReLU's output (Sigma = w box(pool K) + b2,
Theta = Sigma + w box(pool G)).  In offset slices, with A_d(p) = A(p, p + d):

  (pool A)_D(P) = w^-4 sum_{u, v} A_{s D + v - u}(s P + u),

so output slice D reads the (2w - 1)^2 input slices s D + e, |e| <= w - 1 (per axis): offsets
mix at a pooling layer and only there; between pools every slice still runs through its conv
layers on its own.  The fast path therefore keeps the per-offset fused loop within each stage
(the conv layers between two pools) and forms the pooled (H' W')^2 covariance of the next stage
entry by entry from the finer one: each fine entry (p, p') adds A(p, p') / w^4 to every coarse
entry (P, P') whose windows hold p and p'.  Nothing larger than the pooled covariance of the
next stage (16^4 entries for Myrtle's 32 -> 16) is held per pair.

Per-image diagonals in a stack are no longer closed: q after a pool is the pooled self kernel
at offset 0, which reads the self kernel's slices |e| <= w - 1 of the finer stage, and those
need slices |e| <= s (w - 1) + (w - 1) one stage further up.  So the diagonals come from the
self kernel restricted to offsets |d| <= m_t per stage t (m_last = 0, m_t = s_t m_{t+1} +
w_t - 1; Myrtle: 3, 1, 0): :func:`cntk_engine.diag.diag_norms`.

Readout of a stack: the pooling layers after the last conv layer and the gap / flatten readout
are one linear map of the last stage's K and G, sum_{p, p'} R(p, p') A(p, p') with
R = (the adjoint of those pools applied to) 1 (gap) or the identity (flatten) at the readout
resolution: :func:`readout_weights`.  Myrtle's three final 2x2 pools to 1 x 1 then Flatten give
R = 1 / 64^2: the mean over the 8 x 8 stage, i.e. its GAP.

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

Stacks take the same constants per conv layer (``arora``: w_first = 1, w = out_scale = 2 / k^2;
``neural_tangents``: the stax values above), their pooling layers average (as stax.AvgPool),
and the readout normaliser is that of the readout resolution H_r x W_r (1 x 1 for Myrtle):
(H_r W_r)^2 for gap, and 1 (arora) or H_r W_r (neural_tangents) for flatten.  So without biases
neural_tangents = (2 / C) * arora for gap and (2 / (C H_r W_r)) * arora for flatten here too.
"""
from __future__ import annotations

import difflib
import math
import numbers
import operator
from dataclasses import dataclass
from typing import Sequence

import numpy as np

from .spelling import arg, unset

POOLINGS = ("gap", "flatten", "lap")
CONVENTIONS = ("arora", "neural_tangents")
KERNELS = ("ntk", "nngp", "both")


def kernel_names(kernel: str) -> tuple[str, ...]:
    """The kernels a ``kernel`` argument asks for, in result order: "both" is ntk then nngp."""
    return ("ntk", "nngp") if kernel == "both" else (kernel,)

MAX_STD = math.sqrt(np.finfo(np.float64).max)     # largest W_std / b_std whose square is finite
#: largest depth accepted: the cost is linear in depth and accuracy saturates by ~20 (the
#: paper's depths are 3 to 21); 1000 leaves room for studies of very deep kernels
MAX_DEPTH = 1000
SNAP_ULPS = 8      # c within this many units of the dtype's epsilon of +-1 is +-1 (self pairs)


@dataclass(frozen=True)
class ConvRelu:
    """A k x k convolution (SAME zero padding, stride 1, k = the architecture's filter_size)
    followed by a ReLU."""

    def __init__(self, *args, **kwargs):
        if args or kwargs:      # ConvRelu(5) meaning a 5 x 5 filter: say where k is set
            raise TypeError("ConvRelu() takes no arguments: every conv layer's filter size is "
                            "gram's filter_size= (one k for the whole stack)")

    def to_list(self) -> list:
        return ["conv"]


@dataclass(frozen=True)
class AvgPool:
    """Average pooling over w x w windows with stride s (default s = w), VALID padding: the
    windows must tile the feature map exactly ((H - w) % s == 0)."""

    window: int = 2
    stride: int | None = None

    def __post_init__(self):
        w = as_integer(self.window)
        st = w if self.stride is None else as_integer(self.stride)
        for name, v in (("window", w), ("stride", st)):
            if not is_int(v) or v < 1:
                raise ValueError(f"AvgPool {name} must be a positive integer; got {v!r}")
        if st > w:
            raise ValueError(f"AvgPool stride {st} is larger than its window {w}: pixels between "
                             "the windows would be dropped; use stride <= window")
        object.__setattr__(self, "window", w)
        object.__setattr__(self, "stride", st)

    def out_size(self, n: int) -> int | None:
        """The pooled size of an axis of n pixels, or None when the windows do not tile it."""
        if n < self.window or (n - self.window) % self.stride:
            return None
        return (n - self.window) // self.stride + 1

    def to_list(self) -> list:
        return ["avgpool", self.window, self.stride]


def serial(*layers) -> tuple:
    """A stack of layers, in the spirit of ``stax.serial``: ``ConvRelu()`` and ``AvgPool(w, s)``
    records (lists of them are flattened: ``[ConvRelu()] * 3``), for ``gram(x, architecture=...)``.

    Rules: it starts with a conv layer (pool the images instead of a first pooling layer); two
    pooling layers follow each other only after the last conv layer (before the readout)."""
    flat = []
    for item in layers:
        flat.extend(item if isinstance(item, (list, tuple)) else [item])
    for i, layer in enumerate(flat):
        if not isinstance(layer, (ConvRelu, AvgPool)):
            raise ValueError(f"layer {i + 1} of {len(flat)} of the stack is {layer!r}; a stack "
                             "holds ConvRelu() and AvgPool(window, stride) layers")
    if not flat or not isinstance(flat[0], ConvRelu):
        raise ValueError("a stack must start with a ConvRelu() layer (pool the images themselves "
                         "for a pooling first layer)")
    last_conv = max(i for i, layer in enumerate(flat) if isinstance(layer, ConvRelu))
    for i in range(1, last_conv):
        if isinstance(flat[i], AvgPool) and isinstance(flat[i + 1], AvgPool):
            raise ValueError(f"layers {i + 1} and {i + 2} of {len(flat)} of the stack are both "
                             "pooling layers between conv layers; use one AvgPool there (repeated pools are accepted "
                             "only after the last conv layer, before the readout)")
    return tuple(flat)


def myrtle(depth: int) -> tuple:
    """The Myrtle network of Shankar et al. 2020 as neural-tangents' notebook builds it:
    [conv, relu] x f0, pool, [conv, relu] x f1, pool, [conv, relu] x f2, pool x 3 (then the
    Flatten + Dense readout), f = (2, 1, 1), (2, 2, 2), (3, 3, 3) for depth 5, 7, 10; 2 x 2
    pools of stride 2, so 32 x 32 images end at 1 x 1."""
    f0, f1, f2 = MYRTLE_FACTORS[depth]
    conv, pool = ConvRelu(), AvgPool(2, 2)
    return serial([conv] * f0, pool, [conv] * f1, pool, [conv] * f2, [pool] * 3)


MYRTLE_FACTORS = {5: (2, 1, 1), 7: (2, 2, 2), 10: (3, 3, 3)}
PRESETS = {f"myrtle{d}": d for d in MYRTLE_FACTORS}
PRESET_IMAGE_SIZE = (32, 32)     # the presets are defined for CIFAR-sized images


@dataclass(frozen=True)
class Stage:
    """Conv layers that run at one resolution: layers first_layer .. first_layer + n_layers - 1
    (0-based over the conv layers) on height x width maps, then ``pool`` (None after the last
    stage) to the next stage's resolution."""

    height: int
    width: int
    first_layer: int
    n_layers: int
    pool: AvgPool | None


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
    """A CNN architecture and the kernels asked of it: the one description every backend reads.

    The CNN of Arora et al. (``layers=None``): ``max(depths) - 1`` conv + ReLU layers; ``depths``
    holds every depth whose readout is wanted, and one pass over the deepest network produces
    all of them.  A stack (``layers``: :func:`serial` or a preset's): its conv and pooling layers
    in order; its depth is fixed (conv layers + 1, as Myrtle-5 has 4 conv layers) and
    ``depths`` holds only that.  ``pooling`` is the readout (gap, flatten or lap) at the end, after
    any trailing pooling layers.  ``name``: the preset ("myrtle5", ...) or None.
    """

    depths: tuple[int, ...]
    pooling: str = "gap"
    fix: bool = False
    convention: str = "arora"
    W_std: float | None = None
    b_std: float | None = None
    filter_size: int = 3
    layers: tuple | None = None
    name: str | None = None
    lap_window: int | None = None
    flip: bool = False

    def __post_init__(self):
        # NumPy scalars (np.int64(3), np.bool_(True), np.float32(1.5), e.g. from np.arange grids
        # in a GridSearchCV) are accepted like the Python numbers and stored as those
        if not isinstance(self.depths, tuple) or not self.depths:
            raise ValueError(f"{arg('depths')} must be a non-empty tuple of integers >= 2")
        depths = tuple(as_integer(d) for d in self.depths)
        # the argument as the caller gave it: one depth, or a depth table
        what = arg("depth") if len(depths) == 1 else f"every depth of {arg('depths', list(depths))}"
        for d in depths:
            if not is_int(d) or d < 2:
                raise ValueError(
                    f"{what} must be an integer >= 2 (conv layers + 1, as in the paper); got {d!r}")
            if d > MAX_DEPTH:
                raise ValueError(
                    f"{what} must be at most {MAX_DEPTH}; got {d}: the cost grows linearly with "
                    f"depth (depth {d} costs about {d / 21:.3g} times depth 21), while the "
                    "accuracy of CNTKs saturates by depth ~20 (the paper's deepest is 21) and the "
                    "kernel tends to a constant as depth grows")
        object.__setattr__(self, "depths", depths)
        if len(set(self.depths)) != len(self.depths):
            raise ValueError(f"{arg('depths')} must not repeat; got {list(self.depths)}")
        if not isinstance(self.pooling, str) or self.pooling not in POOLINGS:  # a 0-d array
            raise ValueError(f"{arg('pooling')} must be one of {POOLINGS}; got {self.pooling!r}")
        if self.pooling == "lap":
            c = as_integer(self.lap_window)
            if not is_int(c) or c < 1:
                raise ValueError(f"{arg('pooling', 'lap')} needs {arg('lap_window')} = c, a positive "
                                 "integer (the c x c circular average pool before the readout)"
                                 + ("" if self.lap_window is None else f"; got {self.lap_window!r}"))
            object.__setattr__(self, "lap_window", c)
        elif self.lap_window is not None:
            raise ValueError(f"{arg('lap_window', self.lap_window)} belongs to {arg('pooling', 'lap')}; "
                             f"got {arg('pooling', self.pooling)}")
        if not isinstance(self.flip, (bool, np.bool_)):
            raise ValueError(f"{arg('flip')} must be True or False; got {self.flip!r}")
        object.__setattr__(self, "flip", bool(self.flip))
        if not isinstance(self.convention, str) or self.convention not in CONVENTIONS:
            raise ValueError(f"{arg('convention')} must be one of {CONVENTIONS}; got {self.convention!r}")
        fs = as_integer(self.filter_size)
        if not is_int(fs) or fs < 1 or fs % 2 == 0:
            raise ValueError(f"{arg('filter_size')} must be a positive odd integer (1, 3, 5, ...); got {fs!r}")
        object.__setattr__(self, "filter_size", fs)
        if not isinstance(self.fix, (bool, np.bool_)):
            raise ValueError(f"{arg('fix')} must be True or False; got {self.fix!r}")
        object.__setattr__(self, "fix", bool(self.fix))
        if self.layers is not None:
            layers = serial(*self.layers)
            object.__setattr__(self, "layers", layers)
            d = sum(isinstance(layer, ConvRelu) for layer in layers) + 1
            if self.depths != (d,):
                convs = f"{d - 1} conv layer{'s' if d != 2 else ''}"
                raise ValueError(f"a stack's depth is fixed by its layers ({d} = {convs} + the "
                                 f"dense readout); got depths {list(self.depths)}")
        if self.fix and min(self.depths) < 3:
            if self.layers is not None:        # the caller gave layers, not a depth
                got = (f"{'the stack ' + arg('architecture', self.name) if self.name else 'a stack'} "
                       "with one conv layer (depth 2)")
            elif len(self.depths) == 1:
                got = arg("depth", self.depths[0])
            else:
                got = arg("depths", list(self.depths))
            raise ValueError(
                f"{arg('fix', True)} needs depth >= 3 (two or more conv layers); got {got}: at depth 2 "
                "the only conv layer is the first layer, so with the first and the last layer "
                "fixed nothing is trained and the NTK would be identically 0; "
                f"{arg('kernel', 'nngp')} does not depend on {arg('fix')}, so leaving it out gives "
                "the same NNGP")
        if self.convention == "arora":
            if self.W_std is not None or self.b_std is not None:
                raise ValueError(
                    f"{arg('W_std')} and {arg('b_std')} belong to "
                    f"{arg('convention', 'neural_tangents')}; the 'arora' convention has fixed "
                    "constants (c_sigma = 2, no bias)")
        else:
            for name in ("W_std", "b_std"):
                v = getattr(self, name)
                if v is None:
                    continue
                if (isinstance(v, (bool, np.bool_)) or not isinstance(v, numbers.Real)
                        or v < 0 or not isinstance(v, numbers.Integral) and not math.isfinite(v)):
                    raise ValueError(f"{arg(name)} must be a finite number >= 0 or {unset()}; got {v!r}")
                # an int beyond floats compares as an int (float() would overflow); a NumPy
                # float32 as a float (compared as itself, the bound would overflow to inf)
                if (v if isinstance(v, numbers.Integral) else float(v)) > MAX_STD:
                    raise ValueError(f"{arg(name)} must be at most {MAX_STD:.4g} (its square, the "
                                     f"{'weight' if name == 'W_std' else 'bias'} variance, must be a "
                                     f"finite float64) or {unset()}; got {v!r}")
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

    @property
    def has_pooling(self) -> bool:
        """Whether pooling layers sit between or after the conv layers (a pooled stack)."""
        return self.layers is not None and any(isinstance(la, AvgPool) for la in self.layers)

    def plan(self, height: int, width: int) -> tuple[list[Stage], list[AvgPool], tuple[int, int]]:
        """(stages, trailing pools, readout resolution) on height x width images; a ValueError
        naming the layer when a pooling layer's windows do not tile its input."""
        if self.layers is None:
            return [Stage(height, width, 0, self.n_layers, None)], [], (height, width)
        stages, trailing = [], []
        h, w, first, n = height, width, 0, 0
        for i, layer in enumerate(self.layers):
            if isinstance(layer, ConvRelu):
                n += 1
                continue
            oh, ow = layer.out_size(h), layer.out_size(w)
            if oh is None or ow is None:
                raise ValueError(
                    f"layer {i + 1} of {len(self.layers)} (AvgPool window {layer.window}, stride "
                    f"{layer.stride}) does not tile "
                    f"its {h} x {w} input: an axis of n pixels needs n >= window and (n - window) "
                    f"divisible by the stride" + self._size_hint(height, width))
            if n or not stages:
                stages.append(Stage(h, w, first, n, layer))
                first, n = first + n, 0
            else:
                trailing.append(layer)
            h, w = oh, ow
        if n:
            stages.append(Stage(h, w, first, n, None))
        else:       # the stack ends with pooling layers: the last conv stage's pool is trailing
            last = stages.pop()
            trailing.insert(0, last.pool)
            stages.append(Stage(last.height, last.width, last.first_layer, last.n_layers, None))
        return stages, trailing, (h, w)

    def _size_hint(self, height, width) -> str:
        if self.name is not None:
            return f"; {self.name} takes {PRESET_IMAGE_SIZE[0]} x {PRESET_IMAGE_SIZE[1]} images, got {height} x {width}"
        return f" (images {height} x {width})"

    def check_image_shape(self, channels: int, height: int, width: int) -> None:
        """A ValueError when this architecture cannot take (C, H, W) images."""
        if self.name is not None and (height, width) != PRESET_IMAGE_SIZE:
            raise ValueError(f"{arg('architecture', self.name)} is defined for {PRESET_IMAGE_SIZE[0]} x "
                             f"{PRESET_IMAGE_SIZE[1]} images (five 2 x 2 pools to 1 x 1); got "
                             f"{height} x {width}")
        hr, wr = self.plan(height, width)[2]
        if self.pooling == "lap" and self.lap_window > min(hr, wr):
            where = "the images" if self.layers is None else "the readout (after the last pool)"
            raise ValueError(f"{arg('lap_window', self.lap_window)} is larger than {where}: "
                             f"{hr} x {wr}; "
                             f"accepted: 1 .. {min(hr, wr)}" + (
                                 " (a Myrtle network reads out at 1 x 1; for LAP, build the stack "
                                 "without its final pools in Python with cntk_engine.serial(...))"
                                 if self.name else ""))

    def pair_entries(self, height: int, width: int) -> int:
        """Offset-slice entries times conv layers one pair updates (the cost of a pair): every
        offset at each stage, (H_s W_s)^2 per layer; at the readout of the CNN only the offsets
        its readout weighs (flatten: H W; LAP: the slices within c - 1 of 0 circularly)."""
        stages, _, _ = self.plan(height, width)
        if self.layers is None and self.pooling != "gap":
            gw = grid_weights(self, height, width)         # (2H - 1, W): packed grids of H - |dy| rows
            rows = height - np.abs(np.arange(-(height - 1), height))
            return int((rows[:, None] * width * (gw != 0)).sum()) * self.n_layers
        return sum((st.height * st.width) ** 2 * st.n_layers for st in stages)

    def layer_params(self, channels: int, height: int, width: int) -> LayerParams:
        k2 = float(self.filter_size ** 2)
        hw = float(np.prod(self.plan(height, width)[2]))     # the readout resolution
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
        """The architecture as JSON (a store's job record): LAP adds its window, flip=True its
        flag, a stack its name and layers (the CNN's record is as it has always been)."""
        d = {"depths": list(self.depths), "pooling": self.pooling, "fix": self.fix,
             "convention": self.convention, "W_std": self.W_std, "b_std": self.b_std,
             "filter_size": self.filter_size}
        if self.pooling == "lap":
            d["lap_window"] = self.lap_window
        if self.flip:
            d["flip"] = True
        if self.layers is not None:
            d.update(name=self.name, layers=[la.to_list() for la in self.layers])
        return d


def make_architecture(depth=None, depths: Sequence[int] | None = None, architecture="cnn",
                      **kw) -> Architecture:
    """Build an :class:`Architecture` from the ``depth=`` / ``depths=`` / ``architecture=`` of the
    public API.  ``architecture``: "cnn" (the CNN of Arora et al., with depth or depths), a
    preset ("myrtle5", "myrtle7", "myrtle10") or a stack from :func:`serial` (their depth is
    fixed: depth/depths must be left out)."""
    if isinstance(architecture, str):
        if architecture == "cnn":
            layers = name = None
        elif architecture in PRESETS:
            name, layers = architecture, myrtle(PRESETS[architecture])
        else:
            # "Myrtle5", "myrtle-5", "CNN": the name meant, where its letters and digits say it;
            # "myrtl5": the nearest name (one letter off)
            meant = "".join(ch for ch in architecture.lower() if ch.isalnum())
            near = difflib.get_close_matches(meant, ("cnn", *PRESETS), n=3, cutoff=0.8)
            if meant in ("cnn", *PRESETS):
                near = [meant]
            hint = (f" (did you mean {near[0]!r}?)" if len(near) == 1 else
                    f" (did you mean one of {', '.join(map(repr, sorted(near)))}?)" if near else "")
            raise ValueError(f"{arg('architecture')} must be 'cnn', one of {sorted(PRESETS)} or a "
                             f"stack from cntk_engine.serial(...); got {architecture!r}{hint}")
    elif isinstance(architecture, (tuple, list)):
        name, layers = None, serial(*architecture)
    else:
        raise ValueError(f"architecture must be 'cnn', one of {sorted(PRESETS)} or a stack from "
                         f"cntk_engine.serial(...); got {architecture!r}")
    if layers is not None:
        what = arg("architecture", name) if name else "a stack"
        n_conv = sum(isinstance(la, ConvRelu) for la in layers)
        if depth is not None or depths is not None:
            raise ValueError(f"{what} fixes its depth ({n_conv + 1} = {n_conv} conv "
                             f"layers + the dense readout): leave {arg('depth')} and "
                             f"{arg('depths')} out")
        if n_conv + 1 > MAX_DEPTH:
            raise ValueError(f"{what} has {n_conv} conv layers; at most {MAX_DEPTH - 1} are "
                             f"accepted (depth {MAX_DEPTH}: {arg('depth')}'s bound)")
        if name is not None and kw.get("filter_size", 3) != 3:
            raise ValueError(f"{arg('architecture', name)} uses 3 x 3 convolutions; got "
                             f"{arg('filter_size', kw['filter_size'])} (build another stack in "
                             "Python with cntk_engine.serial(...))")
        return Architecture(depths=(n_conv + 1,), layers=layers, name=name, **kw)
    if (depth is None) == (depths is None):
        raise ValueError(f"give exactly one of {arg('depth')} (an int >= 2) or {arg('depths')} (a "
                         "list of ints >= 2)")
    if depth is not None:
        ds = (depth,)
    else:
        if isinstance(depths, (str, bytes)) or not hasattr(depths, "__iter__") or np.ndim(depths) == 0:
            one = (f" ({arg('depth', int(as_integer(depths)))} for one depth)"
                   if is_int(as_integer(depths)) and as_integer(depths) >= 2 else "")
            raise ValueError(f"{arg('depths')} must be a list of integers >= 2; got {depths!r}{one}")
        ds = tuple(depths)
        bad = [d for d in ds if not is_int(as_integer(d)) or as_integer(d) < 2]
        if bad:
            raise ValueError(f"{arg('depths')} must be a list of integers >= 2 (conv layers + 1, as "
                             f"in the paper); got {list(ds)}")
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


def readout_weights(arch: Architecture, height: int, width: int) -> np.ndarray:
    """R(p, p') at the last conv stage's resolution (see the module docstring, Pooling stacks):
    the readout sum of a stack is sum R(p, p') A(p, p') (before ``finalize``'s scale and
    normaliser).  (h, w, h, w) float64."""
    stages, trailing, (hr, wr) = arch.plan(height, width)
    if arch.pooling == "gap":
        r = np.ones((hr, wr, hr, wr))
    elif arch.pooling == "flatten":
        r = np.eye(hr * wr).reshape(hr, wr, hr, wr)
    else:       # lap: n_H((P'y - Py) mod H) n_W((P'x - Px) mod W) / c^4
        ny, nx = lap_counts(arch.lap_window, hr), lap_counts(arch.lap_window, wr)
        iy, ix = np.arange(hr), np.arange(wr)
        wy = ny[(iy[None, :] - iy[:, None]) % hr]                  # (P_y, P'_y)
        wx = nx[(ix[None, :] - ix[:, None]) % wr]
        r = np.einsum("ac,bd->abcd", wy, wx) / float(arch.lap_window) ** 4
    sizes = [(stages[-1].height, stages[-1].width)]
    for pool in trailing[:-1]:
        sizes.append((pool.out_size(sizes[-1][0]), pool.out_size(sizes[-1][1])))
    for pool, (h, w) in zip(reversed(trailing), reversed(sizes)):
        r = _pool_adjoint(r, pool, h, w)
    return r


def lap_counts(c: int, n: int) -> np.ndarray:
    """n(d) for d = 0 .. n - 1: the pairs (u, v) in [0, c)^2 with v - u = d mod n."""
    counts = np.zeros(n)
    for k in range(-(c - 1), c):
        counts[k % n] += c - abs(k)
    return counts


def grid_weights(arch: Architecture, height: int, width: int) -> np.ndarray:
    """The readout weight of every packed offset grid (dy, dx) of the CNN, (2H - 1, W) float64,
    index [dy + H - 1, dx]: gap 1 everywhere, flatten 1 at the offset-(0, 0) grid only, LAP
    n_H(dy mod H) n_W(dx) / c^4 (both slices of a grid share it; module docstring)."""
    w = np.zeros((2 * height - 1, width))
    if arch.pooling == "gap":
        w[:] = 1.0
    elif arch.pooling == "flatten":
        w[height - 1, 0] = 1.0
    else:
        ny, nx = lap_counts(arch.lap_window, height), lap_counts(arch.lap_window, width)
        dys = np.arange(-(height - 1), height)
        w[:] = np.outer(ny[dys % height], nx) / float(arch.lap_window) ** 4
    return w


def hflip(x):
    """The images x (..., H, W) with their width axis reversed (NumPy or CuPy), C-contiguous."""
    return x[..., ::-1].copy()


def _pool_adjoint(r: np.ndarray, pool: AvgPool, h: int, w: int) -> np.ndarray:
    """The adjoint of ``pool`` on (h, w, h, w) kernels, applied to the coarse weights ``r``."""
    out = np.zeros((h, w, h, w))
    s, k = pool.stride, pool.window
    ho, wo = r.shape[:2]
    scale = 1.0 / k ** 4
    for a in range(k):
        for b in range(k):
            for c in range(k):
                for d in range(k):
                    out[a:a + s * ho:s, b:b + s * wo:s, c:c + s * ho:s, d:d + s * wo:s] += r * scale
    return out


__all__ = ["Architecture", "LayerParams", "ConvRelu", "AvgPool", "Stage", "serial", "myrtle",
           "make_architecture", "readout_weights", "grid_weights", "lap_counts", "hflip",
           "finalize", "POOLINGS", "CONVENTIONS",
           "KERNELS", "PRESETS"]
