"""Numba CPU backend: per-offset slices fused across all layers, parallel over pairs.

For each pair (x, z) and each offset (dy, dx) the slice of the 4-D covariance with that
offset runs through every layer in two small padded buffers (K and G) that stay in cache, so
no 4-D tensor is ever formed (see ``cntk_engine.arch`` for the slice indexing).  Work is
H^2 W^2 entries x L layers per pair for gap, H W x L for flatten.

float32 mode: float32 arithmetic, arccos through the Abramowitz-Stegun 4.4.46 polynomial
(|error| <= 2e-8, below float32 rounding, and it vectorises where libm's acosf does not),
readout sums accumulated in float64.  float64 mode: float64 throughout with libm's acos.
"""
from __future__ import annotations

import contextlib
import logging
import math
import os
import platform
import subprocess
import sys
import threading
import time

import numpy as np

from ..arch import SNAP_ULPS, grid_weights, readout_weights
from ..diag import diag_norms
from ..spelling import arg
from .base import Backend, Prepared, Traits, sqrt_and_inverse


def _load_tbb() -> str | None:
    """Load pip's TBB (the ``tbb`` dependency on Linux x86-64) so that numba's ``tbb`` threading
    layer, its first choice, is there: the one layer safe both across fork and across threads.
    Without it numba takes GNU OpenMP on Linux, which kills a child that a process forks after a
    parallel call (multiprocessing's default start method before Python 3.14: a Pool of such
    children hangs), or ``workqueue``, which aborts on calls from two threads at once.  The tbb
    wheel puts libtbb.so.12 in <prefix>/lib, where the loader does not look in a virtual
    environment, and numba's layer needs it by that name: loaded here by its path first, the
    loader then finds it already there.  Returns the library loaded, or None."""
    if not sys.platform.startswith("linux"):
        return None
    import ctypes
    import site
    for prefix in dict.fromkeys((sys.prefix, sys.exec_prefix, sys.base_prefix, site.getuserbase())):
        lib = os.path.join(prefix, "lib", "libtbb.so.12")
        if os.path.exists(lib):
            try:
                ctypes.CDLL(lib, mode=ctypes.RTLD_GLOBAL)
                return lib
            except OSError:
                continue
    return None


TBB_LIBRARY = _load_tbb()       # before numba chooses its threading layer (at the first call)

try:
    import numba
    from numba import njit, prange
    _NUMBA_ERROR = None
except ImportError as e:  # pragma: no cover - numba is a hard dependency
    numba = None
    _NUMBA_ERROR = str(e)

_CACHING = False    # set where the kernels are defined: True when numba's on-disk cache is on

# fastmath without 'nnan'/'ninf': reassociation lets the float64 readout sums vectorise,
# while NaN and infinity keep their meaning.
_FASTMATH = {"reassoc", "contract", "arcp", "nsz"}
_AS = (1.5707963050, -0.2145988016, 0.0889789874, -0.0501743046,
       0.0308918810, -0.0170881256, 0.0066700901, -0.0012624911)


# the kernel's ReLU loops over a flat grid in runs of at most this many entries, each
# passed as views of the run (passed the whole-grid arrays instead, the same loop ran 3x slower
# in the kernel, measured; the cause was not established)
RELU_CHUNK = 1024


def constants(dtype) -> np.ndarray:
    """[pi, 1/(2 pi), 0, 1, A&S coefficients a0..a7, 1 - SNAP_ULPS eps] in the compute dtype.

    Passed to the kernel as an array so that one cached kernel, compiled once per dtype,
    reads its constants in that dtype (a float64 literal would promote float32 arithmetic).
    """
    snap = 1.0 - SNAP_ULPS * float(np.finfo(dtype).eps)
    return np.array([math.pi, 1.0 / (2.0 * math.pi), 0.0, 1.0, *_AS, snap], dtype=dtype)


if numba is not None:
    @njit(inline="always", fastmath=_FASTMATH)
    def pi_minus_acos(c, exact, K):
        """pi - arccos(c) for c in [-1, 1]: libm (exact) or Abramowitz-Stegun 4.4.46."""
        if exact:
            return K[0] - np.arccos(c)
        a = abs(c)
        t = np.sqrt(K[3] - a) * (K[4] + a * (K[5] + a * (K[6] + a * (K[7] + a * (K[8] + a * (
            K[9] + a * (K[10] + a * K[11])))))))
        # t = acos(|c|);  pi - acos(c) = pi - t for c >= 0 and t for c < 0
        return K[0] - t if c >= K[2] else t

    @njit(inline="always", fastmath=_FASTMATH)
    def relu_row(sr, tr, sxr, ixr, szr, izr, kr, gr, W, self_diag, exact, KC):
        """The ReLU step (``arch``) on one row of an offset grid: from Sigma (sr) and Theta
        (tr), with the rows' sqrt(q) and 1/sqrt(q) of x (sxr, ixr) and z (szr, izr), write K
        (kr) and G = Theta Kdot (gr); returns the row's sums of K and G in the compute dtype.
        1-D row views with unit stride and no aliasing, so LLVM vectorises the loop."""
        INV2PI, ZERO, ONE, SNAP = KC[1], KC[2], KC[3], KC[12]
        rk = ZERO
        rg = ZERO
        for j in range(W):
            s = sr[j]
            c = s * ixr[j] * izr[j]
            # c = +-1 exactly where Sigma = +-sqrt(q_x q_z) (self pairs' diagonal, receptive fields
            # that match, e.g. both all-zero with biases): theta(c) has an infinite slope there,
            # and the few ulps of rounding in c would cost sqrt(eps) in Kdot (``arch``, self pairs)
            c = ONE if self_diag or c >= SNAP else (-ONE if c <= -SNAP else c)
            pma = pi_minus_acos(c, exact, KC)
            kk = (sxr[j] * szr[j] * np.sqrt(ONE - c * c) + pma * s) * INV2PI
            g = tr[j] * (pma * INV2PI)
            kr[j] = kk
            gr[j] = g
            rk += kk
            rg += g
        return rk, rg

    @njit(inline="always", fastmath=_FASTMATH)
    def seam_mask(mask, k, W, dx, KC):
        """mask[t, j] = 1 where the box tap t of packed column j stays on j's side of the seam
        at column W - dx and inside the W columns, else 0."""
        r = k // 2
        seam = W - dx
        for t in range(k):
            for j in range(W):
                jo = j + t - r
                ok = jo >= 0 and jo < W and ((j < seam) == (jo < seam))
                mask[t, j] = KC[3] if ok else KC[2]

    # A pooled entry sums w^4 terms.  Where it is +-sqrt(q q') in exact arithmetic (windows of
    # equal entries: constant images), its c must come out within the snap of +-1 (``relu_row``),
    # and a plain sum in the compute dtype drifts by up to ~w^4 ulps from the image's diagonal
    # (``diag``, whose sums are compensated), which arccos turns into its square root.  So the
    # float32 kernel sums the pools in float64 (its rounding is far below a float32 ulp; inlined,
    # as the plain sum was), and the float64 kernel sums them compensated (Neumaier) with the
    # helpers below.  They are compiled with fastmath=False, set
    # explicitly: a callee inherits its caller's fastmath where it sets none (numba's inherited
    # options), and the kernel's reassociation cancels the compensation.
    @njit(inline="always", fastmath=_FASTMATH)
    def pool2_row_wide(out, t, base, Wo, W, dx, scale):
        """``pool2_row`` for the float32 kernel: into float64 ``out``, not compensated."""
        blk = Wo
        if dx % 2 == 0:
            o = base + (dx >> 1) * blk
            for m in range(Wo):
                out[o + m] += (t[2 * m] + t[2 * m + 1]) * scale
        else:
            oa = base + (dx >> 1) * blk
            db = (dx + 1) >> 1
            ob = base + (db if db < Wo else db - Wo) * blk
            for m in range(Wo):
                out[oa + m] += t[2 * m] * scale
            for m in range(Wo):
                out[ob + m] += t[2 * m + 1] * scale

    @njit(fastmath=False)
    def add_compensated(acc, comp, e, v):
        """acc[e] += v, the rounding error of the addition added to comp[e] (acc + comp is the
        sum to about one rounding)."""
        s = acc[e]
        t = s + v
        if abs(s) >= abs(v):
            comp[e] += (s - t) + v
        else:
            comp[e] += (v - t) + s
        acc[e] = t

    @njit(fastmath=False)
    def add_row_compensated(out, comp, o, v, n):
        """out[o + m] += v[m], m < n, as ``add_compensated`` does (one loop over the row: no
        entry is added twice)."""
        for m in range(n):
            s = out[o + m]
            t = s + v[m]
            comp[o + m] += ((s - t) + v[m]) if abs(s) >= abs(v[m]) else ((v[m] - t) + s)
            out[o + m] = t

    @njit(fastmath=False)
    def pool2_row(out, comp, t, base, Wo, W, dx, scale, v):
        """Add row t of a packed offset grid (offset dx), times ``scale``, into the next stage's
        covariance rows at ``base`` (the pooled rows' block, laid out (pooled offset, column):
        ``pair_kernel``) for 2 x 2 pools of stride 2, compensated (``add_row_compensated``; v: a
        row of Wo scratch): x column j goes to pooled column j // 2 and z column (j + dx) mod W
        to ((j + dx) mod W) // 2, a pooled offset (mod Wo) of dx // 2 for even j and
        (dx + 1) // 2 for odd j on both sides of the seam, so each is one contiguous row of Wo
        entries; with dx even the two coincide, and columns 2m, 2m + 1 are added first (their
        sum's rounding is at most half an ulp of a partial sum)."""
        blk = Wo
        if dx % 2 == 0:
            for m in range(Wo):
                v[m] = (t[2 * m] + t[2 * m + 1]) * scale
            add_row_compensated(out, comp, base + (dx >> 1) * blk, v, Wo)
        else:
            for m in range(Wo):
                v[m] = t[2 * m] * scale
            add_row_compensated(out, comp, base + (dx >> 1) * blk, v, Wo)
            db = (dx + 1) >> 1
            for m in range(Wo):
                v[m] = t[2 * m + 1] * scale
            add_row_compensated(out, comp, base + (db if db < Wo else db - Wo) * blk, v, Wo)

    @njit(fastmath=False)
    def fold_compensation(acc, comp, n):
        """acc[e] += comp[e] (the pooled sums), comp[e] = 0 for the next pool, e < n."""
        for e in range(n):
            acc[e] += comp[e]
            comp[e] = 0.0

    def _njit_cached(**options):
        """``njit(cache=True)``, or without the on-disk cache where numba finds no writable place
        for it (it raises at decoration time then)."""
        def decorate(fn):
            global _CACHING
            try:
                _CACHING = True
                return njit(cache=True, **options)(fn)
            except RuntimeError:
                _CACHING = False
                return njit(cache=False, **options)(fn)
        return decorate

    @njit(inline="always", fastmath=_FASTMATH)
    def hbox_flat(src, rows, mflat, m, k):
        """The k x k box sum's first pass (along rows) on a flat grid (rows of width W one after
        the other, r = k // 2 guard entries before the first): rows[e] = src[e + r] + sum over
        taps t != r of src[e + t] mflat[t, e], e < m (mflat: the seam mask, ``seam_mask``,
        repeated on every row); one loop over the grid for k = 3."""
        r = k // 2
        # views at the taps' offsets, indexed by the loop variable alone: an index plus an offset
        # of unknown sign gets numba's negative-index wraparound, and the loop no vectors
        if k == 3:
            s0 = src[0:m]
            s1 = src[1:m + 1]
            s2 = src[2:m + 2]
            m0 = mflat[0]
            m2 = mflat[2]
            for e in range(m):
                rows[e] = s1[e] + s0[e] * m0[e] + s2[e] * m2[e]
        else:
            sr = src[r:m + r]
            for e in range(m):
                rows[e] = sr[e]
            for t in range(k):
                if t != r:
                    st = src[t:m + t]
                    mt = mflat[t]
                    for e in range(m):
                        rows[e] += st[e] * mt[e]

    @njit(inline="always", fastmath=_FASTMATH)
    def vbox_flat(rows, dst, n, W, k, scale, shift):
        """The box sum's second pass (across rows) on a flat grid: dst[e] = (sum of
        rows[e + t W], t < k) scale + shift, e < n."""
        if k == 3:
            r0 = rows[0:n]
            r1 = rows[W:W + n]
            r2 = rows[2 * W:2 * W + n]
            for e in range(n):
                dst[e] = (r0[e] + r1[e] + r2[e]) * scale + shift
        else:
            for e in range(n):
                dst[e] = rows[e]
            for t in range(1, k):
                rt = rows[t * W:t * W + n]
                for e in range(n):
                    dst[e] += rt[e]
            for e in range(n):
                dst[e] = dst[e] * scale + shift

    # The on-disk cache is used, and only its code is run (``_load_from_cache``): a process that
    # compiles the kernel itself computes results differing in the last bits (~1e-9) from a
    # process that loads the same kernel from numba's cache (the in-memory JIT code and the
    # cached object code make different FMA-contraction and reassociation choices; without the
    # 'contract' and 'reassoc' flags they agree, but run 2.2x slower), and a resumed or
    # distributed Gram must be bit-identical to an uninterrupted local run.
    @_njit_cached(parallel=True, fastmath=_FASTMATH)
    def pair_kernel(X1, S1, I1, X2, S2, I2, pi_idx, pj_idx, w_first, w, b2, fix, k, same_set,
                    stages, inv_pool, grid_w, R, slot, out, KC, exact):
        """Readout sums of the pairs (X1[pi_idx[p]], X2[pj_idx[p]]) into out[p, t]: every
        architecture, the CNN being a stack of one stage (``arch``, Pooling stacks).

        Packing: the slices of offsets (dy, dx) and (dy, dx - W), 0 < dx < W, have widths
        W - dx and dx and share their rows, so they fill one W-wide grid exactly: packed
        column j pairs x column j with z column (j + dx) mod W, and the seam between the two
        slices sits at column W - dx (the box sum must not cross it: ``seam_mask``).  Offset
        dx = 0 is a slice of its own (no seam).

        stages[s] = (H, W, first layer, layers, pool window, pool stride) per stage (pool 0 0
        after the last).  Each stage runs its packed offset grids through its conv layers; the
        first stage starts from x . z, a later one from the pooled K and G
        of the stage before (kin, gin: its (H W)^2 entries, flat, ordered (py, p'y, dx, px) with
        dx = (p'x - px) mod W, so that a packed grid row is one contiguous run of W entries, read
        and, for 2 x 2 pools, written as such).  A stage followed by a pool adds each entry
        (p, p') of its last layer, / w^4, to every entry (P, P') of the next stage (kout, gout)
        whose windows hold p and p', in a fixed order.  inv_pool[s] = 1 / w^4 of stage s's
        pool, in the compute dtype.

        Readout: layer l of the last stage is read out into out[p, slot[l]] (slot[l] = -1: not
        read out; a depth table reads several layers from one pass), sum R(p, p') K(p, p') and
        likewise G.  Where R is constant on each packed grid (every CNN readout: gap, flatten,
        LAP; Myrtle's mean) R is empty and grid_w[dy + H - 1, dx] is that constant: each grid's
        sum, row sums (<= W terms) in the compute dtype added in float64, is weighted once.
        Otherwise (a stack's trailing pools) R holds the weight of every entry and grid_w is 1
        on the grids that hold a nonzero one.  Grids and offsets dx with grid_w 0 are not run
        (flatten runs one grid, a small LAP window few).

        Flat grids: a packed grid of h rows is held as h W consecutive entries (K and G: with
        r zero rows above and below, and r guard entries before), x's diagonals are packed at
        each stage's width and z's image and diagonals are rotated by dx (z column (j + dx) mod
        W at column j), so the box passes, the channel sum and the ReLU step of a layer
        that is not read out each run as one loop over the whole grid (rows of W = 32 entries
        are 4 vectors: per-row loops spent as much on their set-up as on the arithmetic).
        """
        C, H0, W0 = X1.shape[1], X1.shape[2], X1.shape[3]
        L = S1.shape[1]
        r = k // 2
        ZERO = KC[2]
        n_st = stages.shape[0]
        acc_size = 1
        for st in range(1, n_st):
            acc_size = max(acc_size, (stages[st, 0] * stages[st, 1]) ** 2)
        HW = H0 * W0
        npad = (H0 + 2 * r) * W0       # a grid with its r zero rows above and below
        per_entry = R.shape[0] > 0
        n_out = out.shape[1]
        for p in prange(pi_idx.shape[0]):
            ia = pi_idx[p]
            ib = pj_idx[p]
            # x's diagonals, rows packed at the stage's width
            xs = np.empty((L, HW), dtype=X1.dtype)
            xi = np.empty((L, HW), dtype=X1.dtype)
            for st in range(n_st):
                Hs, Ws = stages[st, 0], stages[st, 1]
                for l in range(stages[st, 2], stages[st, 2] + stages[st, 3]):
                    for y in range(Hs):
                        for j in range(Ws):
                            xs[l, y * Ws + j] = S1[ia, l, y, j]
                            xi[l, y * Ws + j] = I1[ia, l, y, j]
            zimg = np.empty((C, HW), dtype=X1.dtype)      # z rotated by the current dx
            zs = np.empty((L, HW), dtype=X1.dtype)
            zi = np.empty((L, HW), dtype=X1.dtype)
            kf = np.zeros(npad + 2 * r, dtype=X1.dtype)   # K, G: r guards, r zero rows, grid,
            gf = np.zeros(npad + 2 * r, dtype=X1.dtype)   # r zero rows, r guards
            sig = np.empty(HW, dtype=X1.dtype)
            th = np.empty(HW, dtype=X1.dtype)
            rows = np.empty(npad, dtype=X1.dtype)
            mask = np.empty((k, W0), dtype=X1.dtype)
            mflat = np.empty((k, npad), dtype=X1.dtype)
            # the pooled stages' inputs: float64 (the float32 kernel's pools sum in float64),
            # and the float64 kernel's compensation (above the helpers)
            kin = np.zeros(acc_size, dtype=np.float64)
            gin = np.zeros(acc_size, dtype=np.float64)
            kout = np.zeros(acc_size, dtype=np.float64)
            gout = np.zeros(acc_size, dtype=np.float64)
            kcomp = np.zeros(acc_size if exact else 1, dtype=np.float64)
            gcomp = np.zeros(acc_size if exact else 1, dtype=np.float64)
            tk = np.empty(W0, dtype=X1.dtype)     # a row (or two rows' sum) to be pooled
            tg = np.empty(W0, dtype=X1.dtype)
            vrow = np.empty(W0, dtype=X1.dtype)   # a pooled row's terms
            acc = np.zeros((n_out, 2), dtype=np.float64)
            for st in range(n_st):
                Hs, Ws, l0, nl = stages[st, 0], stages[st, 1], stages[st, 2], stages[st, 3]
                pw, ps = stages[st, 4], stages[st, 5]
                last = st == n_st - 1
                Ho = 0
                Wo = 0
                if not last:
                    Ho = (Hs - pw) // ps + 1
                    Wo = (Ws - pw) // ps + 1
                    for e in range(Ho * Wo * Ho * Wo):
                        kout[e] = ZERO
                        gout[e] = ZERO
                inv_w4 = inv_pool[st]
                # the pooled rows (columns) whose windows hold row (column) n: lo[n] .. hi[n]
                lo_y = np.zeros(Hs, dtype=np.int64)
                hi_y = np.zeros(Hs, dtype=np.int64)
                lo_x = np.zeros(Ws, dtype=np.int64)
                hi_x = np.zeros(Ws, dtype=np.int64)
                if not last:
                    for n in range(Hs):
                        lo_y[n] = max(0, (n - pw + ps) // ps)
                        hi_y[n] = min(Ho - 1, n // ps)
                    for n in range(Ws):
                        lo_x[n] = max(0, (n - pw + ps) // ps)
                        hi_x[n] = min(Wo - 1, n // ps)
                o = r + r * Ws      # kf / gf index of grid row 0, column 0
                for dx in range(Ws):
                    if last:        # an offset dx none of whose grids is read out
                        run = False
                        for g in range(2 * Hs - 1):
                            run = run or grid_w[g, dx] != 0.0
                        if not run:
                            continue
                    seam_mask(mask, k, Ws, dx, KC)
                    for t in range(k):
                        for ip in range(Hs + 2 * r):
                            for j in range(Ws):
                                mflat[t, ip * Ws + j] = mask[t, j]
                    # z's image (stage 0) and diagonals rotated by dx, at the stage's width
                    for y in range(Hs):
                        for j in range(Ws):
                            jz = j + dx if j + dx < Ws else j + dx - Ws
                            if st == 0:
                                for c in range(C):
                                    zimg[c, y * Ws + j] = X2[ib, c, y, jz]
                            for l in range(l0, l0 + nl):
                                zs[l, y * Ws + j] = S2[ib, l, y, jz]
                                zi[l, y * Ws + j] = I2[ib, l, y, jz]
                    for dy in range(-(Hs - 1), Hs):
                        if last and grid_w[dy + Hs - 1, dx] == 0.0:
                            continue
                        h = Hs - abs(dy)
                        ix0 = max(0, -dy)
                        iz0 = ix0 + dy
                        n = h * Ws
                        xo = ix0 * Ws
                        zo = iz0 * Ws
                        self_diag = same_set and ia == ib and dy == 0 and dx == 0
                        # the zero rows around the grid (and the guards after them)
                        kz = kf[r:o]
                        gz = gf[r:o]
                        for e in range(o - r):
                            kz[e] = ZERO
                            gz[e] = ZERO
                        kz = kf[o + n:o + n + r * Ws + r]
                        gz = gf[o + n:o + n + r * Ws + r]
                        for e in range(r * Ws + r):
                            kz[e] = ZERO
                            gz[e] = ZERO
                        kg = kf[o:o + n]
                        gg = gf[o:o + n]
                        if st == 0:      # layer 1 input: channel sum of x(p) z(p + offset)
                            xa = X1[ia, 0].reshape(HW)[xo:xo + n]
                            za = zimg[0, zo:zo + n]
                            for e in range(n):
                                kg[e] = xa[e] * za[e]
                            for c in range(1, C):
                                xa = X1[ia, c].reshape(HW)[xo:xo + n]
                                za = zimg[c, zo:zo + n]
                                for e in range(n):
                                    kg[e] += xa[e] * za[e]
                        else:            # the pooled K and G of the stage before
                            for i in range(h):
                                base = (((ix0 + i) * Hs + iz0 + i) * Ws + dx) * Ws
                                kr = kg[i * Ws:(i + 1) * Ws]
                                gr = gg[i * Ws:(i + 1) * Ws]
                                ki = kin[base:base + Ws]
                                gi = gin[base:base + Ws]
                                for j in range(Ws):
                                    kr[j] = ki[j]
                                    gr[j] = gi[j]
                        m = n + 2 * r * Ws
                        for li in range(nl):
                            l = l0 + li
                            # Sigma, Theta of layer l from the stage's input (li = 0) or from
                            # layer l - 1's K and G; Theta = Sigma (or 0 with fix) at layer 1
                            first = st == 0 and li == 0
                            hbox_flat(kf, rows, mflat, m, k)
                            vbox_flat(rows, sig, n, Ws, k, w_first if first else w, b2)
                            if first:
                                for e in range(n):
                                    th[e] = ZERO if fix else sig[e]
                            else:
                                hbox_flat(gf, rows, mflat, m, k)
                                vbox_flat(rows, th, n, Ws, k, w, ZERO)
                                for e in range(n):
                                    th[e] += sig[e]
                            t_out = slot[l] if last else -1
                            # the ReLU step in runs: a grid read out with one weight sums
                            # row by row (<= W terms in the compute dtype, then float64), any
                            # other over the whole grid (its sums are not used); one call site,
                            # as each inlined copy of the step costs numba seconds of compilation
                            by_row = t_out >= 0 and not per_entry
                            seg = Ws if by_row else RELU_CHUNK
                            gk = 0.0
                            gs = 0.0
                            for a in range(0, n, seg):
                                b = min(n, a + seg)
                                rk, rg = relu_row(sig[a:b], th[a:b], xs[l, xo + a:xo + b],
                                                  xi[l, xo + a:xo + b], zs[l, zo + a:zo + b],
                                                  zi[l, zo + a:zo + b], kg[a:b], gg[a:b],
                                                  b - a, self_diag, exact, KC)
                                gk += rk
                                gs += rg
                            if by_row:
                                wgt = grid_w[dy + Hs - 1, dx]
                                acc[t_out, 0] += wgt * gk
                                acc[t_out, 1] += wgt * gs
                            elif t_out >= 0:    # per-entry weights
                                for i in range(h):
                                    py = ix0 + i
                                    qy = iz0 + i
                                    for j in range(Ws):
                                        qx = j + dx if j + dx < Ws else j + dx - Ws
                                        wt = R[py, j, qy, qx]
                                        acc[t_out, 0] += wt * kg[i * Ws + j]
                                        acc[t_out, 1] += wt * gg[i * Ws + j]
                        if last:
                            continue
                        if ps == 2 and pw == 2:   # Myrtle's pools: rows, columns paired first
                            i = 0
                            while i < h:    # with dy even, rows py, py + 1 (py even) share (P, P')
                                py = ix0 + i
                                base = ((py >> 1) * Ho + ((iz0 + i) >> 1)) * Wo * Wo
                                k0 = kg[i * Ws:(i + 1) * Ws]
                                g0 = gg[i * Ws:(i + 1) * Ws]
                                if dy % 2 == 0 and py % 2 == 0 and i + 1 < h:
                                    k1 = kg[(i + 1) * Ws:(i + 2) * Ws]
                                    g1 = gg[(i + 1) * Ws:(i + 2) * Ws]
                                    for j in range(Ws):
                                        tk[j] = k0[j] + k1[j]
                                        tg[j] = g0[j] + g1[j]
                                    i += 2
                                else:
                                    for j in range(Ws):
                                        tk[j] = k0[j]
                                        tg[j] = g0[j]
                                    i += 1
                                if exact:
                                    pool2_row(kout, kcomp, tk, base, Wo, Ws, dx, inv_w4, vrow)
                                    pool2_row(gout, gcomp, tg, base, Wo, Ws, dx, inv_w4, vrow)
                                else:
                                    pool2_row_wide(kout, tk, base, Wo, Ws, dx, inv_w4)
                                    pool2_row_wide(gout, tg, base, Wo, Ws, dx, inv_w4)
                        elif ps == pw:   # pool, windows side by side: one (P, P') per entry
                            for i in range(h):
                                base = (lo_y[ix0 + i] * Ho + lo_y[iz0 + i]) * Wo * Wo
                                for j in range(Ws):
                                    qx = j + dx if j + dx < Ws else j + dx - Ws
                                    dq = lo_x[qx] - lo_x[j]
                                    e = base + (dq if dq >= 0 else dq + Wo) * Wo + lo_x[j]
                                    if exact:
                                        add_compensated(kout, kcomp, e, kg[i * Ws + j] * inv_w4)
                                        add_compensated(gout, gcomp, e, gg[i * Ws + j] * inv_w4)
                                    else:
                                        kout[e] += kg[i * Ws + j] * inv_w4
                                        gout[e] += gg[i * Ws + j] * inv_w4
                        else:            # pool: every (P, P') whose windows hold (p, p')
                            for i in range(h):
                                py = ix0 + i
                                qy = iz0 + i
                                for j in range(Ws):
                                    qx = j + dx if j + dx < Ws else j + dx - Ws
                                    vk = kg[i * Ws + j] * inv_w4
                                    vg = gg[i * Ws + j] * inv_w4
                                    for a in range(lo_y[py], hi_y[py] + 1):
                                        for c2 in range(lo_y[qy], hi_y[qy] + 1):
                                            for b in range(lo_x[j], hi_x[j] + 1):
                                                e0 = (a * Ho + c2) * Wo * Wo + b
                                                for d in range(lo_x[qx], hi_x[qx] + 1):
                                                    dq = d - b if d >= b else d - b + Wo
                                                    if exact:
                                                        add_compensated(kout, kcomp, e0 + dq * Wo, vk)
                                                        add_compensated(gout, gcomp, e0 + dq * Wo, vg)
                                                    else:
                                                        kout[e0 + dq * Wo] += vk
                                                        gout[e0 + dq * Wo] += vg
                if not last:
                    if exact:
                        fold_compensation(kout, kcomp, Ho * Wo * Ho * Wo)
                        fold_compensation(gout, gcomp, Ho * Wo * Ho * Wo)
                    kin, kout = kout, kin
                    gin, gout = gout, gin
            for t in range(n_out):
                out[p, t, 0] = acc[t, 0]
                out[p, t, 1] = acc[t, 1]


# Core-seconds per pair, entry and layer (the work unit of jobs.tiles.pair_work): the time model
# of the tile size, measured on the 2-core development machine (AMD EPYC, AVX2), idle (32x32x3
# images, GAP, depth 6, 2 threads: 265 pairs/s in float32, 38 in float64, i.e. 1.4e-9 and
# 9.9e-9), with about a third more for a machine shared with other work.  A faster or idle
# machine gets shorter tiles, which costs nothing: pairs/s was no lower at tiles of 8 rows than
# at one of 40.
ENTRY_CORE_SECONDS = {"float32": 2e-9, "float64": 1.3e-8}
TILE_SECONDS = 2.0

log = logging.getLogger("cntk_engine")
_CHILD = "CNTK_ENGINE_NUMBA_CACHE_CHILD"
_loaded: set[str] = set()          # the dtypes whose kernel this process has
_miss_logged: set[str] = set()     # the dtypes whose in-process compilation was logged
_no_cache_logged = False            # that the on-disk cache is off was logged
_load_lock = threading.Lock()
# a tiny job that makes a child process compile the kernel into the cache
_COMPILE_JOB = "ce.gram(np.ones((1, 1, 3, 3)), depth=2, backend='numba', dtype={dtype!r})"


_workqueue_lock = threading.Lock()


def _launch(kernel, args) -> None:
    """Run a parallel kernel; one at a time in this process under numba's ``workqueue`` layer,
    which aborts the process when two threads launch at once (a Dask worker's threads, a
    caller's thread pool), and on the first call, while numba is still choosing its layer."""
    try:
        layer = numba.threading_layer()
    except ValueError:              # not chosen yet: this launch chooses it
        layer = None
    if layer in (None, "workqueue"):
        with _workqueue_lock:
            kernel(*args)
    else:
        kernel(*args)


def threading_layer() -> str:
    """numba's threading layer, for ``cntk-engine info``: the one in use, else the one it would
    choose (its first importable one, in its order of priority)."""
    if numba is None:
        return "numba not importable"
    try:
        return f"{numba.threading_layer()} (in use)"
    except ValueError:
        pass
    import importlib
    modules = {"tbb": "tbbpool", "omp": "omppool", "workqueue": "workqueue"}
    wanted = numba.config.THREADING_LAYER
    if wanted != "default" and wanted not in modules:          # "safe", "forksafe", ...
        return f"chosen at the first call, as NUMBA_THREADING_LAYER={wanted} asks"
    for name in (numba.config.THREADING_LAYER_PRIORITY if wanted == "default" else [wanted]):
        try:
            importlib.import_module(f"numba.np.ufunc.{modules[name]}")
            return name + (" (NUMBA_THREADING_LAYER)" if wanted != "default" else "")
        except Exception:  # noqa: BLE001 - missing library, incompatible runtime
            continue
    return "none importable"


def _in_cache(args) -> bool:
    """Whether numba's cache holds the kernel for these arguments' types (numba internals, so
    any failure answers False and the caller takes the slower, always-correct way)."""
    try:
        cache = pair_kernel._cache
        key = cache._index_key(tuple(numba.typeof(a) for a in args), pair_kernel.targetctx.codegen())
        cache_file = cache._cache_file
        name = cache_file._load_index().get(key)
        # numba saves the index before the data file (written whole, then renamed): a key whose
        # data file is not there yet is being saved, not cached
        return name is not None and os.path.exists(cache_file._data_path(name))
    except Exception:  # noqa: BLE001
        return False


#: How long a process waits for another that compiles a kernel into the cache (the child's own
#: limit) before it compiles for itself.
COMPILE_WAIT = 1800.0


@contextlib.contextmanager
def _compiling_lock(dtype_name: str):
    """Hold the cache folder's lock for compiling the kernel (for ``dtype_name``), across
    processes (``fcntl.flock``): processes that start together on a cold cache (joblib's
    workers, a SLURM array, Dask workers on one node) then compile it once, the others waiting
    and loading it, instead of each compiling the same kernel at once (a minute of every core
    each).  One lock for every dtype: two compiles of different dtypes save one cache index,
    and saved at once it can lose an entry.  Where no lock can be had (no fcntl, a folder that
    cannot be written), no lock is held."""
    try:
        import fcntl
        folder = pair_kernel._cache._cache_path          # numba internals: any failure, no lock
        os.makedirs(folder, exist_ok=True)
        fd = os.open(os.path.join(folder, ".cntk_engine_compile.lock"),
                     os.O_RDWR | os.O_CREAT, 0o666)
    except Exception:  # noqa: BLE001
        yield
        return
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            log.info("numba: another process is compiling the %s kernel into numba's cache; "
                     "waiting for it, to load it from there", dtype_name)
            deadline = time.monotonic() + COMPILE_WAIT
            while True:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    if time.monotonic() > deadline:
                        break                          # compile without it (slower, correct)
                    time.sleep(0.2)
        except OSError:
            pass                                       # a file system without locks
        yield
    finally:
        os.close(fd)                                   # (releases the lock)


def _load_from_cache(dtype: np.dtype, args) -> None:
    """Make this process run the kernel for ``dtype`` from numba's on-disk cache.

    When the cache does not hold it yet, a child process compiles it into the cache (the ~20 s
    of JIT then happen once per machine and dtype instead of once per process); this process
    then loads that object code at its first call. So every process computes with identical
    code, whichever process compiled it. Where the cache cannot be written (or the child
    fails), this process compiles for itself, as every process then does, and says so in the
    log.

    The child must compile THIS file: numba keys its cache by the source file's path, so a
    child that imported another copy of the package (a source checkout in the working
    directory, which ``python -c`` puts first on sys.path) would fill another cache entry, and
    this process would miss its own and compile for itself.  So the child starts in the folder
    this package was imported from, puts that folder first on its sys.path itself (``-P`` needs
    Python 3.11), and checks that it imported this very file before it compiles.
    """
    global _no_cache_logged
    name = np.dtype(dtype).name
    if not _CACHING and not _no_cache_logged and not os.environ.get(_CHILD):
        _no_cache_logged = True
        log.warning("numba: its on-disk cache is off here (no writable place for it; "
                    "NUMBA_CACHE_DIR names one): every process compiles the kernels itself, and "
                    "results of different processes can differ in the last bits (~1e-9)")
    if name in _loaded or not _CACHING or os.environ.get(_CHILD) or not hasattr(pair_kernel, "stats"):
        return
    with _load_lock:
        if name in _loaded or _in_cache(args):
            _loaded.add(name)
            return
        _compile_into_cache(name, args)


def _compile_into_cache(name: str, args) -> None:
    """:func:`_load_from_cache`'s compile, under the cross-process lock (the cache checked again
    under it: another process may have compiled the kernel meanwhile)."""
    with _compiling_lock(name):
        if _in_cache(args):
            _loaded.add(name)
            return
        this_file = os.path.abspath(__file__)          # as imported: numba's cache key
        root = os.path.dirname(os.path.dirname(os.path.dirname(this_file)))
        env = dict(os.environ, **{_CHILD: "1"})
        if numba.config.CACHE_DIR:      # the child runs in another folder: a relative one must not move
            env["NUMBA_CACHE_DIR"] = os.path.abspath(numba.config.CACHE_DIR)
        code = (f"import os, sys; sys.path.insert(0, {root!r})\n"
                "from cntk_engine.backends import numba_cpu\n"
                f"if os.path.abspath(numba_cpu.__file__) != {this_file!r}:\n"
                f"    sys.exit('imported ' + numba_cpu.__file__ + ' instead of ' + {this_file!r})\n"
                "import numpy as np, cntk_engine as ce\n" + _COMPILE_JOB.format(dtype=name) + "\n")
        # the first job on a machine sits at 0 % for this long: say why
        log.info("numba: compiling the %s kernel into numba's on-disk cache (once per machine, "
                 "dtype and version of the package; about a minute on 2 cores, and later "
                 "processes load it)", name)
        try:
            child = subprocess.run([sys.executable, "-c", code], cwd=root, env=env,
                                   capture_output=True, text=True, timeout=COMPILE_WAIT)
            if child.returncode != 0:
                why = child.stderr.strip()[-500:] or (
                    f"killed by signal {-child.returncode}" if child.returncode < 0 else f"exit status {child.returncode}")
                log.warning("numba: the child compiling the %s kernel into the cache failed "
                            "(%s); compiling in this process", name, why)
        except (OSError, subprocess.TimeoutExpired) as e:
            log.warning("numba: could not run a child to compile the %s kernel (%s); compiling "
                        "in this process", name, e)
        _loaded.add(name)


def _check_cache_hit(dtype: np.dtype) -> None:
    """Log (once per dtype) when this process ran a kernel it compiled itself."""
    misses = getattr(getattr(pair_kernel, "stats", None), "cache_misses", {})
    name = np.dtype(dtype).name
    if (_CACHING and not os.environ.get(_CHILD) and name not in _miss_logged
            and any(str(sig[0].dtype) == name for sig in misses)):
        _miss_logged.add(name)
        log.warning("numba: the %s kernel was compiled in this process, not loaded from numba's "
                    "cache: its results can differ in the last bits (~1e-9) from those of "
                    "processes that loaded the cache", name)



def cache_status() -> str:
    """Where numba's cache of the kernel lives and which dtypes it holds (for ``cntk-engine info``)."""
    if numba is None:
        return "numba not importable"
    if not _CACHING:
        return "off (numba found no writable place for it): every process compiles the kernel"
    try:
        cache = pair_kernel._cache
        cache_file = cache._cache_file        # an entry counts with its data file (_in_cache)
        dtypes = sorted({str(key[0][0].dtype) for key, name in cache_file._load_index().items()
                         if os.path.exists(cache_file._data_path(name))})
        return f"{cache._cache_path} (holds {', '.join(dtypes) if dtypes else 'nothing yet'})"
    except Exception as e:  # noqa: BLE001 - numba internals
        return f"on (details unavailable: {e})"


def numba_target() -> tuple[str, str]:
    """(CPU name, feature string) numba compiles for in this process: the host's (e.g.
    'znver4'), or ``NUMBA_CPU_NAME`` / ``NUMBA_CPU_FEATURES`` where set; with the code, the key
    of numba's on-disk cache (``codegen().magic_tuple()``)."""
    cpu, features = numba.config.CPU_NAME or "", numba.config.CPU_FEATURES or ""
    try:
        from numba.core.registry import cpu_target
        _, cpu, features = cpu_target.target_context.codegen().magic_tuple()
    except Exception:  # noqa: BLE001 - numba internals; the settings above are the fallback
        pass
    return str(cpu or "host"), str(features or "")


class NumbaBackend(Backend):
    name = "numba"

    @classmethod
    def traits(cls) -> Traits:
        # Tiles are sized by time (jobs.tiles.auto_tile): one call is not interruptible, so a tile
        # of about TILE_SECONDS keeps Ctrl-C and the progress bar within seconds; pairs are
        # spread over the threads (prange), so small tiles cost no throughput (32x32x3, depth 6:
        # 45 pairs/s at tiles of 8 rows, 35 at one of 40, same run).  Floor: 8 pairs per thread
        # on a diagonal tile; cap: 512 rows (cheap pairs, e.g. flatten on small images).
        threads = num_threads()
        return Traits(device="cpu", default_tile=512, min_tile=max(8, math.ceil(4 * math.sqrt(threads))),
                      entry_seconds={k: v / threads for k, v in ENTRY_CORE_SECONDS.items()},
                      tile_seconds=TILE_SECONDS)

    @classmethod
    def unavailable_reason(cls):
        return None if _NUMBA_ERROR is None else f"numba cannot be imported ({_NUMBA_ERROR})"

    @classmethod
    def working_memory(cls, arch, image_shape, dtype):
        # pair_kernel, per thread: the row masks of the box sums, k rows of a grid padded by
        # k // 2 rows above and below (mflat); in a stack, the pooled stages' inputs and outputs
        # of K and G (and the float64 kernel's two compensations), (H_s W_s)^2 float64 entries
        # each; _plan_args: the readout's weights over the last conv stage where pools follow
        # it (readout_weights holds R and the adjoint of a pool at once, packed_readout a third)
        _, h, w = image_shape
        k, threads = arch.filter_size, num_threads()
        masks = k * (h + 2 * (k // 2)) * w * np.dtype(dtype).itemsize
        what = []
        if masks > 16 << 20:
            what.append(f"{threads} thread(s) x the box sums' row masks, {k} rows of "
                        f"{h + 2 * (k // 2)} x {w} padded grids for {arg('filter_size', k)}")
        entries = readout = 0
        arrays = 6 if np.dtype(dtype) == np.float64 else 4
        if arch.has_pooling:
            stages, trailing, _ = arch.plan(h, w)
            entries = max([(st.height * st.width) ** 2 for st in stages[1:]], default=0)
            hl, wl = stages[-1].height, stages[-1].width
            readout = 3 * (hl * wl) ** 2 * 8 if trailing else 0
            if entries:
                what.append(f"{threads} thread(s) x {arrays} float64 arrays of the pooled "
                            f"stages' (H W)^2 = {entries:,} entries (fewer threads: "
                            "NUMBA_NUM_THREADS)")
            if readout:
                what.append(f"the readout's weights over the last conv stage, ({hl} x {wl})^2 "
                            "entries three times while they are built")
        return threads * (masks + arrays * entries * 8) + readout, "; ".join(what)

    def compute_record(self, device):
        """numba's version, its code generation settings, the CPU it compiles for (with the
        code, the key of its on-disk cache: two machines that differ there run different
        machine code, whose float32 results differ in the last bit) and the C library, whose
        acos the float64 kernel calls.

        The settings are this process's.  The kernel runs from numba's cache, whose key holds
        the signature, the CPU and the source but not the settings, so it was compiled under
        the settings of the process that filled the cache: the same on a machine whose numba
        settings (``NUMBA_OPT``, ...) do not change between runs.  Where they do, a resume
        warns of a difference that its cached code does not have."""
        cpu, features = numba_target()
        c = numba.config
        return {"backend": self.name, "numba": numba.__version__, "cpu": cpu,
                "cpu_features": features, "opt": int(c.OPT),
                "loop_vectorize": bool(c.LOOP_VECTORIZE), "slp_vectorize": bool(c.SLP_VECTORIZE),
                "svml": bool(c.USING_SVML), "libc": " ".join(platform.libc_ver()) or "unknown"}

    def prepare(self, x: np.ndarray) -> Prepared:
        x = np.asarray(x)
        s, inv = sqrt_and_inverse(diag_norms(x, self.arch, self.params))
        cast = lambda a: np.ascontiguousarray(a, dtype=self.dtype)  # noqa: E731
        return Prepared(cast(x), (cast(s), cast(inv)))

    def _plan_args(self, height: int, width: int):
        """(stages, inv_pool, grid_w, R, slot) of ``pair_kernel`` for h x w images (cached)."""
        key = (height, width)
        if getattr(self, "_plan_key", None) != key:
            stages, trailing, _ = self.arch.plan(height, width)
            table = np.array([[st.height, st.width, st.first_layer, st.n_layers,
                               st.pool.window if st.pool else 0, st.pool.stride if st.pool else 0]
                              for st in stages], dtype=np.int64)
            inv_pool = np.array([1.0 / st.pool.window ** 4 if st.pool else 1.0 for st in stages],
                                dtype=self.dtype)
            hl, wl = stages[-1].height, stages[-1].width
            if trailing:
                grid_w, R = packed_readout(readout_weights(self.arch, height, width))
            else:       # the readout acts on the last stage itself: one weight per packed grid
                grid_w, R = grid_weights(self.arch, hl, wl), np.zeros((0, 0, 0, 0))
            slot = np.full(self.arch.n_layers, -1, dtype=np.int64)
            for t, layer in enumerate(self.arch.readout_layers):
                slot[layer] = t
            self._plan_key = key
            self._plan_cached = (table, inv_pool, np.ascontiguousarray(grid_w),
                                 np.ascontiguousarray(R), slot)
        return self._plan_cached

    def pairs(self, a: Prepared, b: Prepared, ia, ib, same_set: bool) -> np.ndarray:
        table, inv_pool, grid_w, R, slot = self._plan_args(*a.images.shape[2:])
        flat = np.zeros((len(ia), len(self.arch.depths), 2), dtype=np.float64)
        f = self.dtype.type
        p = self.params
        # writable arrays: a read-only one (a Dask worker's deserialised images, a memory map)
        # would be another numba signature, compiled in this process instead of loaded (above)
        w = lambda arr: np.require(arr, requirements=("C", "W", "A"))  # noqa: E731
        args = (w(a.images), *map(w, a.diag), w(b.images), *map(w, b.diag),
                w(np.asarray(ia, dtype=np.int64)), w(np.asarray(ib, dtype=np.int64)),
                f(p.w_first), f(p.w), f(p.b2), bool(self.arch.fix), int(self.arch.filter_size),
                bool(same_set), table, inv_pool, grid_w, R, slot, flat, constants(self.dtype),
                self.dtype == np.float64)
        _load_from_cache(self.dtype, args)
        _launch(pair_kernel, args)
        _check_cache_hit(self.dtype)
        return flat


def packed_readout(R: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``pair_kernel``'s readout from the per-entry weights R (h, w, h, w) of the last stage:
    (grid_w, R) with grid_w[dy + h - 1, dx] the one weight of packed grid (dy, dx) and R empty
    where every grid's entries share one weight (Myrtle's trailing pools average the whole
    8 x 8 stage), else (1 on the grids holding a nonzero weight, R)."""
    h, w = R.shape[:2]
    grid_w = np.zeros((2 * h - 1, w))
    needed = np.zeros((2 * h - 1, w))
    shared = True
    j = np.arange(w)
    for dy in range(-(h - 1), h):
        ys = np.arange(max(0, -dy), h - max(0, dy))[:, None, None]
        # [row, dx, column]: x entry (y, j) against z entry (y + dy, (j + dx) mod w)
        vals = R[ys, j[None, None, :], ys + dy, (j[None, None, :] + j[None, :, None]) % w]
        first = vals[:1, :, :1]
        shared = shared and bool(np.all(vals == first))
        grid_w[dy + h - 1] = first[0, :, 0]
        needed[dy + h - 1] = np.any(vals != 0, axis=(0, 2))
    return (grid_w, np.zeros((0, 0, 0, 0))) if shared else (needed, R)


def num_threads() -> int:
    return numba.get_num_threads() if numba is not None else os.cpu_count() or 1
