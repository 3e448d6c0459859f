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

import logging
import math
import os
import subprocess
import sys
import threading

import numpy as np

from ..diag import diag_norms
from .base import Backend, Prepared, Traits, sqrt_and_inverse

try:
    import numba
    from numba import njit, prange
    _NUMBA_ERROR = None
except ImportError as e:  # pragma: no cover - numba is a hard dependency
    numba = None
    _NUMBA_ERROR = str(e)

_CACHING = False    # set where pair_kernel is defined: True when numba's on-disk cache is on

# fastmath without 'nnan'/'ninf': reassociation lets the float64 readout sums vectorise,
# while NaN and infinity keep their meaning.
_FASTMATH = {"reassoc", "contract", "arcp", "nsz"}
_AS = (1.5707963050, -0.2145988016, 0.0889789874, -0.0501743046,
       0.0308918810, -0.0170881256, 0.0066700901, -0.0012624911)


def constants(dtype) -> np.ndarray:
    """[pi, 1/(2 pi), 0, 1, A&S coefficients a0..a7] in the compute dtype.

    Passed to the kernel as an array so that one cached kernel, compiled once per dtype,
    reads its constants in that dtype (a float64 literal would promote float32 arithmetic).
    """
    return np.array([math.pi, 1.0 / (2.0 * math.pi), 0.0, 1.0, *_AS], dtype=dtype)


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
    def box(src, dst, rows, mask, h, W, k, scale, shift):
        """dst[i, j] = scale * (k x k box sum of src)[i, j] + shift on a packed row grid.

        src is padded by r = k // 2 rows and columns (padding holds zeros); mask[t, j] is 0 where
        column j + t - r lies across the seam between the two packed slices (or outside).
        """
        r = k // 2
        for i in range(h + 2 * r):
            for j in range(W):
                rows[i, j] = src[i, r + j]
            for t in range(k):
                if t != r:
                    for j in range(W):
                        rows[i, j] += src[i, j + t] * mask[t, j]
        for i in range(h):
            for j in range(W):
                dst[i, j] = rows[i, j]
            for t in range(1, k):
                for j in range(W):
                    dst[i, j] += rows[i + t, j]
            for j in range(W):
                dst[i, j] = dst[i, j] * scale + shift

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

    # The on-disk cache is used, and only its code is run (``_load_from_cache``): a process that
    # compiles the kernel itself computes results differing in the last bits (~1e-9) from a
    # process that loads the same kernel from numba's cache (the in-memory JIT code and the
    # cached object code make different FMA-contraction and reassociation choices; without the
    # 'contract' and 'reassoc' flags they agree, but run 2.2x slower), and a resumed or
    # distributed Gram must be bit-identical to an uninterrupted local run.
    @_njit_cached(parallel=True, fastmath=_FASTMATH)
    def pair_kernel(X1, S1, I1, X2, S2, I2, pi_idx, pj_idx, w_first, w, b2, fix, k,
                    gap, same_set, slot, n_out, out, KC, exact):
        """Readout sums of the pairs (X1[pi_idx[p]], X2[pj_idx[p]]) into out[p].

        Packing: the slices of offsets (dy, dx) and (dy, dx - W), 0 < dx < W, have widths
        W - dx and dx and share their rows, so they fill one W-wide row grid exactly: packed
        column j pairs x column j with z column (j + dx) mod W, and the seam between the two
        slices sits at column W - dx (the box sum must not cross it: ``mask``).  Full-width
        rows vectorise without remainders.  Offset dx = 0 is a slice of its own (no seam).
        """
        C, H, W = X1.shape[1], X1.shape[2], X1.shape[3]
        L = S1.shape[1]
        r = k // 2
        INV2PI, ZERO, ONE = KC[1], KC[2], KC[3]
        dmax_y = H - 1 if gap else 0
        dmax_x = W - 1 if gap else 0
        for p in prange(pi_idx.shape[0]):
            ia = pi_idx[p]
            ib = pj_idx[p]
            # z's rows written twice side by side, so a rotation by dx is a contiguous view
            zimg = np.empty((C, H, 2 * W), dtype=X1.dtype)
            zs = np.empty((L, H, 2 * W), dtype=X1.dtype)
            zi = np.empty((L, H, 2 * W), dtype=X1.dtype)
            for i in range(H):
                for j in range(W):
                    for c in range(C):
                        zimg[c, i, j] = X2[ib, c, i, j]
                        zimg[c, i, j + W] = X2[ib, c, i, j]
                    for l in range(L):
                        zs[l, i, j] = S2[ib, l, i, j]
                        zs[l, i, j + W] = S2[ib, l, i, j]
                        zi[l, i, j] = I2[ib, l, i, j]
                        zi[l, i, j + W] = I2[ib, l, i, j]
            kbuf = np.zeros((H + 2 * r, W + 2 * r), dtype=X1.dtype)   # padded K (and layer-0 x.z)
            gbuf = np.zeros((H + 2 * r, W + 2 * r), dtype=X1.dtype)   # padded G
            sig = np.empty((H, W), dtype=X1.dtype)
            th = np.empty((H, W), dtype=X1.dtype)
            rows = np.empty((H + 2 * r, W), dtype=X1.dtype)
            mask = np.empty((k, W), dtype=X1.dtype)
            acc = np.zeros((n_out, 2), dtype=np.float64)
            for dx in range(0, dmax_x + 1):
                seam = W - dx
                for t in range(k):
                    for j in range(W):
                        jo = j + t - r
                        ok = jo >= 0 and jo < W and ((j < seam) == (jo < seam))
                        mask[t, j] = ONE if ok else ZERO
                for dy in range(-dmax_y, dmax_y + 1):
                    h = H - abs(dy)
                    ix0 = max(0, -dy)
                    iz0 = ix0 + dy
                    self_diag = same_set and ia == ib and dy == 0 and dx == 0  # c = 1 exactly
                    for i in range(r):   # zero rows above and below the h rows in use
                        for j in range(W + 2 * r):
                            kbuf[i, j] = ZERO
                            gbuf[i, j] = ZERO
                            kbuf[r + h + i, j] = ZERO
                            gbuf[r + h + i, j] = ZERO
                    # layer 1 input: channel sum of x(p) z(p + offset)
                    for i in range(h):
                        kr = kbuf[r + i, r:r + W]
                        for j in range(W):
                            kr[j] = ZERO
                        for c in range(C):
                            xr = X1[ia, c, ix0 + i, :]
                            zr = zimg[c, iz0 + i, dx:dx + W]
                            for j in range(W):
                                kr[j] += xr[j] * zr[j]
                    box(kbuf, sig, rows, mask, h, W, k, w_first, b2)
                    for i in range(h):
                        for j in range(W):
                            th[i, j] = ZERO if fix else sig[i, j]
                    for l in range(L):
                        t_out = slot[l]
                        sk = 0.0
                        sg = 0.0
                        for i in range(h):
                            rk = ZERO   # row partial sums (<= W terms) in the compute dtype,
                            rg = ZERO   # added to the float64 readout sums once per row
                            # 1-D row views: unit stride and no aliasing, so LLVM vectorises
                            sxr = S1[ia, l, ix0 + i, :]
                            ixr = I1[ia, l, ix0 + i, :]
                            szr = zs[l, iz0 + i, dx:dx + W]
                            izr = zi[l, iz0 + i, dx:dx + W]
                            sr = sig[i, :]
                            tr = th[i, :]
                            kr = kbuf[r + i, r:r + W]
                            gr = gbuf[r + i, r:r + W]
                            for j in range(W):
                                s = sr[j]
                                c = s * ixr[j] * izr[j]
                                c = ONE if self_diag else min(max(c, -ONE), ONE)
                                pma = pi_minus_acos(c, exact, KC)
                                kk = (sxr[j] * szr[j] * np.sqrt(ONE - c * c) + pma * s) * INV2PI
                                g = tr[j] * (pma * INV2PI)
                                kr[j] = kk
                                gr[j] = g
                                rk += kk
                                rg += g
                            sk += rk
                            sg += rg
                        if t_out >= 0:
                            acc[t_out, 0] += sk
                            acc[t_out, 1] += sg
                        if l + 1 < L:
                            box(kbuf, sig, rows, mask, h, W, k, w, b2)
                            box(gbuf, th, rows, mask, h, W, k, w, ZERO)
                            for i in range(h):
                                for j in range(W):
                                    th[i, j] += sig[i, j]
            for t in range(n_out):
                out[p, t, 0] = acc[t, 0]
                out[p, t, 1] = acc[t, 1]



# Core-seconds per pair, entry and layer (the work unit of jobs.tiles.pair_work): the time model
# of the tile size, measured on the 2-core development machine (AMD EPYC, AVX2) while it was
# shared (32x32x3 images, GAP, depth 6: 47 pairs/s in float32, 9.3 in float64).  A faster or
# idle machine gets shorter tiles, which costs nothing: pairs/s was no lower at tiles of 8 rows
# than at one of 40.
ENTRY_CORE_SECONDS = {"float32": 8e-9, "float64": 3.8e-8}
TILE_SECONDS = 2.0

log = logging.getLogger("cntk_engine")
_CHILD = "CNTK_ENGINE_NUMBA_CACHE_CHILD"
_loaded: set[str] = set()        # dtypes whose kernel this process has
_miss_logged: set[str] = set()   # dtypes whose in-process compilation was logged
_load_lock = threading.Lock()


def _in_cache(args) -> bool:
    """Whether numba's cache holds the kernel for these arguments' types (numba internals, so
    any failure answers False and the caller takes the slower, always-correct way)."""
    try:
        cache = pair_kernel._cache
        key = cache._index_key(tuple(numba.typeof(a) for a in args), pair_kernel.targetctx.codegen())
        return key in cache._cache_file._load_index()
    except Exception:  # noqa: BLE001
        return False


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
    name = np.dtype(dtype).name
    if name in _loaded or not _CACHING or os.environ.get(_CHILD) or not hasattr(pair_kernel, "stats"):
        return
    with _load_lock:
        if name in _loaded or _in_cache(args):
            _loaded.add(name)
            return
        this_file = os.path.abspath(__file__)          # as imported: numba's cache key
        root = os.path.dirname(os.path.dirname(os.path.dirname(this_file)))
        env = dict(os.environ, **{_CHILD: "1"})
        code = (f"import os, sys; sys.path.insert(0, {root!r})\n"
                "from cntk_engine.backends import numba_cpu\n"
                f"if os.path.abspath(numba_cpu.__file__) != {this_file!r}:\n"
                f"    sys.exit('imported ' + numba_cpu.__file__ + ' instead of ' + {this_file!r})\n"
                "import numpy as np, cntk_engine as ce\n"
                f"ce.gram(np.ones((1, 1, 3, 3)), depth=2, backend='numba', dtype='{name}')\n")
        try:
            child = subprocess.run([sys.executable, "-c", code], cwd=root, env=env,
                                   capture_output=True, text=True, timeout=1800)
            if child.returncode != 0:
                log.warning("numba: the child compiling the %s kernel into the cache failed "
                            "(%s); compiling in this process", name, child.stderr.strip()[-500:])
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
        held = sorted({str(key[0][0].dtype) for key in cache._cache_file._load_index()})
        return f"{cache._cache_path} (holds: {', '.join(held) if held else 'nothing yet'})"
    except Exception as e:  # noqa: BLE001 - numba internals
        return f"on (details unavailable: {e})"


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

    def prepare(self, x: np.ndarray) -> Prepared:
        x = np.asarray(x)
        s, inv = sqrt_and_inverse(diag_norms(x, self.arch, self.params))
        cast = lambda a: np.ascontiguousarray(a, dtype=self.dtype)  # noqa: E731
        return Prepared(cast(x), (cast(s), cast(inv)))

    def pairs(self, a: Prepared, b: Prepared, ia, ib, same_set: bool) -> np.ndarray:
        slot = np.full(self.arch.n_layers, -1, dtype=np.int64)
        for t, layer in enumerate(self.arch.readout_layers):
            slot[layer] = t
        n_out = len(self.arch.depths)
        flat = np.zeros((len(ia), n_out, 2), dtype=np.float64)
        f = self.dtype.type
        p = self.params
        # writable arrays: a read-only one (a Dask worker's deserialised images, a memory map)
        # would be another numba signature, compiled in this process instead of loaded (above)
        w = lambda arr: np.require(arr, requirements=("C", "W", "A"))  # noqa: E731
        args = (w(a.images), *map(w, a.diag), w(b.images), *map(w, b.diag),
                w(np.asarray(ia, dtype=np.int64)), w(np.asarray(ib, dtype=np.int64)),
                f(p.w_first), f(p.w), f(p.b2), bool(self.arch.fix), int(self.arch.filter_size),
                self.arch.pooling == "gap", bool(same_set), slot, n_out, flat,
                constants(self.dtype), self.dtype == np.float64)
        _load_from_cache(self.dtype, args)
        pair_kernel(*args)
        _check_cache_hit(self.dtype)
        return flat


def num_threads() -> int:
    return numba.get_num_threads() if numba is not None else os.cpu_count() or 1
