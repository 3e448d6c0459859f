"""The solver's linear algebra: device choice, input checks, Cholesky with jitter, eigh.

Every function computes in float64 (the Gram may be float32) with NumPy/SciPy on the CPU, or
with CuPy (cuSOLVER) when an input is a CuPy array or ``device="cuda"``; results follow the
device.  ``K`` may also be a ``zarr.Array`` (loaded by ``jobs.store.load_gram``).
"""
from __future__ import annotations

import logging
import math
import numbers
import os
import time
from contextlib import contextmanager
from dataclasses import dataclass, fields
from typing import Any

import numpy as np

from ..arrays import DEVICES, cupy_module, is_cupy, to_host
from ..inputs import check_nonnegative
from ..jobs.store import kernel_arrays, load_gram

log = logging.getLogger("cntk_engine")

#: symmetry tolerance: max |K - K^T| <= SYM_RTOL * max |K| (float32 rounding is ~1e-7)
SYM_RTOL = 1e-5


class NotPositiveDefinite(np.linalg.LinAlgError):
    """K + lambda I stayed non positive definite after the largest jitter allowed.  ``retry``:
    the part of the message that says how to retry with the caller's own K (given up with
    ``overwrite_k``), which a caller whose K is private leaves out (``bare``: the rest)."""

    def __init__(self, message="", retry: str = ""):
        super().__init__(f"{message}{retry}" if retry else message)
        self.bare, self.retry = message, retry


def is_zarr(a) -> bool:
    return type(a).__module__.split(".")[0] == "zarr"


def xp_for(device, *arrays):
    """NumPy or CuPy: CuPy when ``device == "cuda"`` or (device None) any input is CuPy."""
    if device not in DEVICES:
        raise ValueError(f"device must be one of {DEVICES}; got {device!r}")
    if device == "cuda" or (device is None and any(is_cupy(a) for a in arrays)):
        return cupy_module()
    return np


def as_float64(xp, a, dtype=np.float64, name: str = "input"):
    """``a`` as an ``xp`` float64 array (``a`` itself when it already is one)."""
    return as_float64_private(xp, a, dtype, name)[0]


def as_float64_private(xp, a, dtype=np.float64, name: str = "input", workspace: float = 1.0):
    """``(array, private)``: ``private`` is True only when the array is certainly a new buffer
    (a dtype conversion of an array, a host <-> GPU transfer, a Zarr load), which the solver
    may then overwrite; False when it may be (a view of) the caller's data.  Complex input is
    refused (casting it would silently drop the imaginary part)."""
    if isinstance(a, (str, bytes, os.PathLike)):
        raise ValueError(f"{name} is a path ({os.fsdecode(a)!r}); pass the matrix: "
                         f"solver.load_gram(path) reads a Gram store's kernel (key='nngp', "
                         "'depth_11/ntk', ... when it holds several)")
    if is_zarr(a) and not hasattr(a, "dtype"):          # a zarr.Group: which array is meant?
        raise ValueError(f"{name} is a zarr.Group (arrays {kernel_arrays(a)}); pass one of "
                         "its arrays, e.g. group['ntk'], or solver.load_gram(group, key=...)")
    dt = getattr(a, "dtype", None)
    if dt is None and not is_cupy(a):
        try:
            a = np.asarray(a)
        except Exception as e:  # noqa: BLE001 - ragged lists, objects, ...
            raise ValueError(f"{name} must be an array of numbers; converting it failed: {e}") from None
        dt = a.dtype
    if np.dtype(dt).kind not in "biufc":
        raise ValueError(f"{name} must hold numbers (a NumPy or CuPy array, or a zarr.Array); got "
                         f"dtype {np.dtype(dt)}")
    if dt is not None and np.dtype(dt).kind == "c":
        raise ValueError(f"{name} is complex ({np.dtype(dt)}); a kernel matrix and its targets must "
                         "be real (pass the real part explicitly if that is what is meant)")
    private = False
    if is_zarr(a):
        a = load_gram(a, workspace=workspace, device="cuda" if xp is not np else None)
        private = True
    elif xp is np and is_cupy(a):
        a = to_host(a)
        private = True
    elif xp is not np and not is_cupy(a):
        private = True                       # host -> GPU copy
    if not private and isinstance(a, (np.ndarray,) + ((xp.ndarray,) if xp is not np else ())):
        private = np.dtype(a.dtype) != np.dtype(dtype)     # conversion: a new array
    return xp.asarray(a, dtype=dtype), private


def block_rows(n: int) -> int:
    """Rows per block for the blockwise passes over an n x n matrix: temporaries stay ~2%."""
    return int(min(1024, max(32, n // 64)))


def scalar(v) -> float:
    return float(v.item() if hasattr(v, "item") else v)


def check_gram(K, name: str = "K", *, device=None, sym_rtol: float = SYM_RTOL,
               overwrite: bool = False, before_write=None, _workspace=1.0):
    """``K`` as a float64 square symmetric finite matrix (symmetrised: (K + K^T) / 2).

    The result is a C-contiguous array that the solver owns (and may overwrite).  By default
    it is a new one and the caller's ``K`` is never modified: one float64 copy of K and no
    other n x n temporary (the check and the symmetrisation go by blocks of rows; a float32,
    CuPy<->NumPy or Zarr input, converted anyway, is symmetrised in that converted copy).
    ``overwrite``: a C-contiguous, writeable float64 ``K`` on the solve's device is
    symmetrised in its own memory and returned (no copy; the caller gives K up: a view's base
    and a memmap's file opened ``r+`` are written too); it is checked before it is written,
    so a K refused is left as it was.  ``before_write``: a function of n, the caller's checks of
    its other inputs, run once K is checked and before it is written (a call refused for them
    leaves a K given up as it was); then ``(K, before_write(n))`` is returned.
    Raises ValueError for a non-square or non-2-D ``K``, NaN/Inf or complex entries, or an
    asymmetry beyond ``sym_rtol * max|K|`` (rounding of a float32 Gram is ~1e-7 relative)."""
    xp = xp_for(device, K)
    K, owned = as_float64_private(xp, K, name=name, workspace=_workspace)
    given = not owned and overwrite and getattr(K.flags, "writeable", True)
    if K.ndim != 2 or K.shape[0] != K.shape[1]:
        raise ValueError(f"{name} must be a square (n, n) Gram matrix; got shape {tuple(K.shape)}")
    if K.shape[0] == 0:
        raise ValueError(f"{name} is empty (0 x 0); at least one training sample is needed")
    check_finite(xp, K, name)
    n, step = K.shape[0], block_rows(K.shape[0])
    scale = max(scalar(xp.max(xp.abs(K[i:i + step]))) for i in range(0, n, step))
    if owned and K.flags.f_contiguous and not K.flags.c_contiguous:
        K = K.T      # a conversion that kept Fortran order: the same matrix to symmetrise, C order
    in_place = (owned or given) and K.flags.c_contiguous
    # the caller's K given up is written only once the whole asymmetry is measured (one more
    # read of K), so that a K refused is left as it was; a conversion of our own (float32,
    # Zarr, another device) is symmetrised as it is checked
    S = None if given and in_place else K if in_place else xp.empty((n, n), dtype=np.float64)
    asym = 0.0
    for i, j, D, up, low in _triangle_blocks(K, step):
        asym = max(asym, scalar(xp.max(xp.abs(D - D.T))))
        if up is not None:
            diff = up - low
            asym = max(asym, scalar(xp.max(xp.abs(diff, out=diff))))
            del diff
        if S is not None:
            _write_symmetric_block(S, i, j, D, up, low)
    if asym > sym_rtol * scale:
        raise ValueError(f"{name} is not symmetric: max |K - K^T| = {asym:.3g} is more than "
                         f"{sym_rtol:g} x max |K| = {scale:.3g}; pass the train-vs-train Gram "
                         "(the test-vs-train kernel goes to K_test)")
    rest = None if before_write is None else before_write(n)
    if S is None:
        S = K
        for i, j, D, up, low in _triangle_blocks(K, step):
            _write_symmetric_block(S, i, j, D, up, low)
    return S if before_write is None else (S, rest)


def _triangle_blocks(K, step):
    """``(i, j, D, up, low)`` per block of rows i:j: the diagonal block D and the blocks right
    of it (``up``) and below it, transposed (``low``); None at the last rows.  A block's
    writes (:func:`_write_symmetric_block`) touch no later block's reads."""
    n = K.shape[0]
    for i in range(0, n, step):
        j = min(i + step, n)
        yield (i, j, K[i:j, i:j]) + ((K[i:j, j:], K[j:, i:j].T) if j < n else (None, None))


def _write_symmetric_block(S, i, j, D, up, low):
    # halves first: (a + b) / 2 overflows for entries above ~9e307, which check_finite accepted
    S[i:j, i:j] = D * 0.5 + D.T * 0.5
    if up is not None:
        avg = up * 0.5
        avg += low * 0.5
        S[i:j, j:] = avg
        S[j:, i:j] = avg.T


def apart_from(K, a, overwrite: bool, name: str = "Y"):
    """``a``, or a copy of it where K is to be overwritten and ``a`` may share K's memory (the
    targets or a test kernel given as a view of K: they would read the factor)."""
    # only arrays in memory (a zarr.Array, or a list, shares nothing; may_share_memory would
    # read it whole), on one device
    if not overwrite or is_cupy(K) != is_cupy(a) or not (
            is_cupy(K) or (isinstance(K, np.ndarray) and isinstance(a, np.ndarray))):
        return a
    xp = cupy_module() if is_cupy(K) else np
    if not xp.may_share_memory(K, a):
        return a
    log.debug("%s shares K's memory, which overwrite_k gives up: copied", name)
    return a.copy()


def check_finite(xp, a, name):
    with np.errstate(over="ignore"):       # entries near float64's max: the sum overflows
        if math.isfinite(scalar(xp.sum(a))):   # NaN / Inf propagate into the sum: no bool n x n
            return
    ok = xp.isfinite(a)
    if not bool(ok.all()):
        bad = int((~ok).sum())
        first = [int(i) for i in xp.argwhere(~ok)[0].tolist()]
        raise ValueError(f"{name} has {bad} NaN or Inf entr{'y' if bad == 1 else 'ies'} "
                         f"(first at index {tuple(first)}); every entry must be finite"
                         + (" (a Zarr store with unfinished tiles reads as NaN there)"
                            if "K" in name else ""))


def check_targets(Y, n: int, name: str = "Y", *, device=None, xp=None):
    """``Y`` as float64 (n, k), plus whether it was 1-D.  ValueError on a wrong length or NaN."""
    xp = xp or xp_for(device, Y)
    if (getattr(Y, "dtype", None) is not None and np.dtype(Y.dtype).kind == "c") or (
            getattr(Y, "dtype", None) is None and np.iscomplexobj(Y)):
        raise ValueError(f"{name} is complex; targets must be real")
    try:
        Y = as_float64(xp, Y, name=name)
    except (TypeError, ValueError) as e:
        raise ValueError(f"{name} must be numeric targets, (n,) or (n, k); converting failed: {e}") from None
    if Y.ndim not in (1, 2):
        raise ValueError(f"{name} must be (n,) or (n, k) targets; got shape {tuple(Y.shape)}")
    if Y.shape[0] != n:
        raise ValueError(f"{name} has {Y.shape[0]} rows but K is {n} x {n}: one target row per "
                         "training sample is needed")
    check_finite(xp, Y, name)
    one_d = Y.ndim == 1
    return (Y[:, None] if one_d else Y), one_d


def check_test_kernel(K_test, n: int, name: str = "K_test", *, xp=np):
    """``K_test`` as float64 (m, n): one row per test point, one column per training sample; a
    1-D ``K_test`` is one test point's row (n,)."""
    K_test = as_float64(xp, K_test, name=name)
    given = tuple(K_test.shape)
    if K_test.ndim == 1:
        K_test = K_test[None, :]
    if K_test.ndim != 2 or K_test.shape[1] != n:
        one = (f" (a 1-D {name} is one test point's row of n values; for m test points against "
               f"{'the one training sample' if n == 1 else 'n training samples'} pass (m, {n}))"
               if len(given) == 1 else "")
        raise ValueError(f"{name} must be the (m, n) test-vs-train kernel with n = {n} columns "
                         f"(one per training sample); got shape {given}{one}")
    check_finite(xp, K_test, name)
    return K_test


def check_ridge(ridge, name: str = "ridge") -> float:
    return check_nonnegative(ridge, name, "0 = interpolation")


def spectrum_problem(s_min: float, lam: float, tol: float) -> str:
    """Why ``K + lam I`` with smallest eigenvalue ``s_min`` of K cannot be solved: "indefinite"
    (an eigenvalue of K + lam I below -tol: K is not positive semi-definite beyond rounding) or
    "singular" (within tol of 0)."""
    return "indefinite" if s_min + lam < -tol else "singular"


def ridge_scale(K) -> float:
    """mean(diag K): the unit of relative ridges (CNTK values scale with depth and pixel size).
    1.0 when the diagonal is not positive."""
    xp = xp_for(None, K)
    s = scalar(xp.mean(xp.diagonal(K)))
    return s if s > 0 and math.isfinite(s) else 1.0


def constant_entries(K) -> float | None:
    """The value of every entry of the square ``K`` where they are all equal, else None: a
    kernel that does not tell its samples apart (0 for all-zero images, a constant for a
    network whose weights are 0 and whose biases are not), under which a classifier predicts
    one class for every sample.  The first row and the diagonal are read first, so a kernel
    that varies costs O(n); a constant one is then read whole, by blocks of rows."""
    xp = xp_for(None, K)
    c = scalar(K[0, 0])
    if bool(xp.any(K[0] != c)) or bool(xp.any(xp.diagonal(K) != c)):
        return None
    step = block_rows(K.shape[0])
    for i in range(0, K.shape[0], step):
        if bool(xp.any(K[i:i + step] != c)):
            return None
    return c


def _cholesky_inplace(xp, A, diag, rel_floor: float):
    """Lower Cholesky factor of the C-contiguous symmetric ``A``, or None if A is not positive
    definite, or numerically singular: a pivot L_kk^2 at or below ``rel_floor`` times its own
    diagonal entry A_kk (``diag``, A's diagonal before the factorisation), the share of row k
    that the rows before it leave unexplained: a factor that exists there only by the rounding
    of A, whose solve would be that rounding divided by the share.  Relative to A_kk, the test
    is the same for D A D with D diagonal (a row of tiny norm is not singular for that).  NumPy: factorised
    in place (LAPACK potrf on ``A.T``, the same symmetric matrix in Fortran order, so no copy);
    the factor L is a view of A's memory.  Only A's lower triangle and diagonal are written,
    even when the factorisation fails: the strict upper triangle keeps the matrix (see
    :func:`_restore_from_upper`).  CuPy: cuSOLVER on a copy (A is left as it is)."""
    if xp is np:
        from scipy.linalg import lapack
        potrf, = lapack.get_lapack_funcs(("potrf",), (A,))
        U, info = potrf(A.T, lower=0, clean=0, overwrite_a=1)
        if info > 0:
            return None
        if info < 0:
            raise ValueError(f"LAPACK potrf: illegal argument {-info}")
        if _singular(np, np.diagonal(U), diag, rel_floor):
            return None            # (before the zeros below: A's upper triangle still holds A)
        L = U.T                    # C-contiguous; above its diagonal: the matrix, not zeros
        n, step = L.shape[0], block_rows(L.shape[0])
        for i in range(0, n, step):
            j = min(i + step, n)
            L[i:j, j:] = 0.0
            L[i:j, i:j] = np.tril(L[i:j, i:j])
        return L
    import cupyx
    try:
        # CuPy reads cuSOLVER's failure flag only under linalg="raise" (its default, "ignore",
        # returns whatever the factorisation left, which can be finite for an indefinite A)
        with cupyx.errstate(linalg="raise"):
            L = xp.linalg.cholesky(A)
    except Exception:  # noqa: BLE001 - LinAlgError when not positive definite
        return None
    if not math.isfinite(scalar(xp.sum(L))):                    # no n x n bool temporary
        return None
    return None if _singular(xp, xp.diagonal(L), diag, rel_floor) else L


def _singular(xp, pivots, diag, rel_floor: float) -> bool:
    """Whether a pivot's square is at or below ``rel_floor`` times its diagonal entry."""
    return bool(xp.any(pivots * pivots <= rel_floor * diag))


def _restore_from_upper(xp, A, diag):
    """Rewrite A's lower triangle from its strict upper triangle and its diagonal from
    ``diag``: the symmetric matrix again after a failed in-place factorisation (by blocks)."""
    n, step = A.shape[0], block_rows(A.shape[0])
    for i in range(0, n, step):
        j = min(i + step, n)
        if i:
            A[i:j, :i] = A[:i, i:j].T
        D = A[i:j, i:j]
        A[i:j, i:j] = xp.triu(D, 1) + xp.triu(D, 1).T
    idx = xp.arange(n)
    A[idx, idx] = diag


def check_max_jitter(max_jitter) -> float:
    return check_nonnegative(max_jitter, "max_jitter", "the largest jitter, times mean(diag K)")


def check_rounding(rounding) -> float:
    """``rounding``, the relative rounding of K's entries (the machine epsilon of the dtype K
    was computed in: float32's for a float32 Gram), checked; None: float64's."""
    if rounding is None:
        return EPS64
    if isinstance(rounding, bool) or not isinstance(rounding, numbers.Real) or not (
            EPS64 <= rounding <= MAX_ROUNDING):
        raise ValueError(f"rounding must be the relative rounding of K's entries, a number in "
                         f"[{EPS64:.3g}, {MAX_ROUNDING:g}] (np.finfo(np.float32).eps for a "
                         f"float32 Gram), or None (float64's); got {rounding!r}")
    return float(rounding)


def rounding_for(K, rounding):
    """``rounding`` as given for ``K``, raised to the epsilon of K's own dtype where that is
    coarser than float64's: a float32 K holds at least float32's rounding whatever the caller
    said (taken as float64's, a duplicated image's pivot would pass on rounding and its fit be
    set by it).  Applied by each entry point that converts K to float64.  ``K``: as the
    caller gave it (a NumPy, CuPy or Zarr array; anything else, such as a
    :class:`KernelEigh`, which carries its own, keeps ``rounding`` as it is); ``rounding``
    checked (:func:`check_rounding`) where it is raised."""
    dtype = getattr(K, "dtype", None)
    try:
        floating = dtype is not None and np.dtype(dtype).kind == "f"
        own = float(np.finfo(dtype).eps) if floating else 0.0
    except (TypeError, ValueError):
        own = 0.0
    if own <= EPS64:
        return rounding
    return max(check_rounding(rounding), min(own, MAX_ROUNDING))


def rounding_of(dtype) -> float | None:
    """The ``rounding`` of a Gram computed in ``dtype`` (a name or NumPy dtype, as a store's or
    a run's record gives it): its machine epsilon; None (float64's) for None or a name NumPy
    does not know."""
    try:
        return None if dtype is None else float(np.finfo(dtype).eps)
    except (TypeError, ValueError):
        return None


EPS64 = float(np.finfo(np.float64).eps)
#: The largest ``rounding`` taken (bfloat16's epsilon): 8 roundings of a diagonal entry must
#: leave room for a pivot (at 1/8 every factorisation, even of I, fails).
MAX_ROUNDING = 2.0 ** -7
#: A pivot L_kk^2 at or below this many roundings of K (times A_kk) is taken as rounding: K + v I
#: is singular to the precision it was computed in (at least n float64 epsilons).
PIVOT_ROUNDINGS = 8


def cholesky(K, ridge: float = 0.0, *, jitter: bool = True, max_jitter: float = 1e-3,
             device=None, overwrite_k: bool = False, ridge_name: str = "ridge", rounding=None):
    """Lower Cholesky factor of ``K + (ridge + j) I`` and the jitter ``j`` that was needed.

    ``K`` must already be checked (float64, symmetric; :func:`check_gram`).  A factorisation
    fails where K + ridge I is not positive definite or is numerically singular (a pivot at or
    below max(max(n, 8) eps64, 8 ``rounding``) of its diagonal entry: :func:`_cholesky_inplace`;
    ``rounding``: the relative rounding of K's entries, float32's epsilon for a Gram computed
    in float32, whose rounding a pivot must stand above; None: float64's).  With ``jitter``
    and a failing factorisation, ``j`` grows tenfold from :func:`first_jitter` (the power of ten
    at or below 1e-10 of K's smallest positive diagonal entry at least; 1e-7 for a float32 Gram
    of rows of similar norms) up to ``max_jitter`` times mean(diag K) (tried itself last); the
    jitter used is logged (warning).  Raises :class:`NotPositiveDefinite` if none works.
    ``overwrite_k``: K (C-contiguous NumPy) may be destroyed: it is factorised in place and the
    factor returned is a view of it, no n x n copy at all (a failed attempt is undone from K's
    untouched upper triangle before the next jitter).  Otherwise one copy of K is made and K is
    left as it is.  ``ridge_name``: what the caller calls ``ridge`` (in the messages)."""
    max_jitter = check_max_jitter(max_jitter)
    xp = xp_for(device, K)
    n = K.shape[0]
    private = overwrite_k and getattr(K, "flags", None) is not None and K.flags.c_contiguous \
        and K.dtype == np.float64
    A = K if private else xp.array(K, dtype=np.float64, order="C", copy=True)
    diag = xp.diagonal(A).copy()
    idx = xp.arange(n)

    # a pivot at or below this share of its diagonal entry: singular to K's rounding
    rel_floor = max(max(n, PIVOT_ROUNDINGS) * EPS64, PIVOT_ROUNDINGS * check_rounding(rounding))

    def attempt(v):
        d = diag + v
        A[idx, idx] = d
        L = _cholesky_inplace(xp, A, d, rel_floor)
        if L is None:
            _restore_from_upper(xp, A, diag)   # A = K again
        return L

    with announced("Cholesky factorisation", n, xp):      # once, whatever jitter it needs
        return _factorise_with_jitter(xp, A, diag, attempt, ridge, jitter, max_jitter,
                                      ridge_name, rel_floor)


#: The least first jitter, in units of mean(diag K) (:func:`first_jitter`).
LEAST_JITTER = 1e-16


def first_jitter(rel_floor: float, smallest_entry: float) -> float:
    """The first jitter tried, in units of mean(diag K): the power of ten at or below
    max(``rel_floor``, 1e-10) (:func:`cholesky`'s pivot floor, and a margin where it is less)
    times ``smallest_entry`` (K's smallest positive diagonal entry + the ridge, in the same
    units), and at least :data:`LEAST_JITTER` (1e-16, float64's rounding of an entry of the
    mean's size: the ladder then takes at most 14 steps to 1e-3, where an image of tiny norm,
    1e-300 of the others, would have had it climb 300 decades); 1e-10 where no entry is
    positive.  Relative to that entry, not to the mean: one image of far larger norm raises the
    mean, and a start of 1e-10 x the mean would give a duplicated pair of ordinary images a
    jitter that is a large share of their diagonal.  A jitter j
    raises every pivot L_kk^2 by at least j (the Schur complements of K + j I are those of K
    plus at least j), and a row fails only where its pivot is at or below ``rel_floor`` times
    its own entry, at least that of the smallest (an all-zero row passes with any jitter): a
    jitter a tenth of that least floor or less lifts only a pivot within a tenth of it.  Not
    the floor of the row that failed: a row that is a multiple s of an earlier one is lifted
    by about (1 + s^2) j, so its own floor, s^2 times the earlier row's, asked for up to s^2
    times the jitter it needs.  A float32
    Gram of rows of similar norms (floor 9.5e-7) starts at 1e-7, not 1e-10."""
    floor = max(rel_floor, 1e-10) * smallest_entry
    if not floor > 0:                        # no positive entry (or NaN)
        return 1e-10
    if math.isinf(floor):                    # an entry beyond the unit's range: the most allowed
        return math.inf
    return 10.0 ** math.floor(math.log10(max(floor, LEAST_JITTER)))


def _factorise_with_jitter(xp, A, diag, attempt, ridge, jitter, max_jitter, ridge_name,
                           rel_floor: float):
    """:func:`cholesky`'s attempts: ``ridge``, then jitter from :func:`first_jitter` x the unit
    up, tenfold, and ``max_jitter`` itself last (A is K between them)."""
    n = A.shape[0]
    L = attempt(ridge)
    if L is not None:
        return L, 0.0
    if not jitter:
        raise NotPositiveDefinite(
            f"K + {ridge:g} I ({n} x {n}) is not numerically positive definite (indefinite, or "
            f"singular to the rounding of its entries) and jitter=False; use a "
            f"{ridge_name} > 0 or allow jitter")
    scale = ridge_scale(A)
    mean_diag = scalar(xp.mean(diag))
    unit = "mean diagonal" if scale == mean_diag else "1"
    why = "" if scale == mean_diag else (
        f" (the unit is 1: K's mean diagonal is {mean_diag:.3g}, not positive"
        + ("; K is all zero, and predicts 0 everywhere" if not bool(xp.any(A)) else "") + ")")
    positive = diag[diag > 0]               # (an all-zero row passes with any jitter)
    smallest = scalar(xp.min(positive)) if positive.size else 0.0
    rel = first_jitter(rel_floor, (smallest + ridge) / scale)
    top = max_jitter * (1 + 1e-9)
    if 0 < max_jitter < rel:
        rel = max_jitter                   # the one jitter allowed
    while 0 < max_jitter and rel <= top:
        j = rel * scale
        L = attempt(ridge + j)
        if L is not None:
            log.warning("K + %g I (%d x %d) is not numerically positive definite: added jitter "
                        "%.3g (= %g x %s%s) to factorise it", ridge, n, n, j, rel, unit, why)
            return L, j
        grown = rel * 10                    # and max_jitter itself once before giving up
        rel = max_jitter if grown > top and rel * (1 + 1e-9) < max_jitter else grown
    smin, positive = "", None
    if n <= 5000:
        s = xp.linalg.eigvalsh(A)          # A is K again (each failed attempt restored it)
        positive = scalar(s[0]) + ridge + max_jitter * scale > 0
        smin = (f"; K's smallest eigenvalue is {scalar(s[0]):.3g} (largest {scalar(s[-1]):.3g}), "
                f"so K + {ridge:g} I's is {scalar(s[0]) + ridge:.3g}")
    tried = (f"even with jitter up to {max_jitter:g} x {unit} = {max_jitter * scale:.3g}"
             if max_jitter > 0 else "and max_jitter=0 allows no jitter")
    if positive:        # positive definite with the last jitter: the rounding floor refused it
        raise NotPositiveDefinite(
            f"K + {ridge:g} I ({n} x {n}) is singular to the rounding of its entries {tried}{why}"
            f"{smin}: each factorisation left a pivot within {rel_floor:.3g} of its diagonal "
            f"entry (the pivot floor: 8 roundings of K's entries, at least max(n, 8) float64 "
            f"epsilons); use a larger {ridge_name} or max_jitter (or a Gram computed in float64, "
            f"where it was computed in float32)")
    raise NotPositiveDefinite(
        f"K + {ridge:g} I ({n} x {n}) is not positive definite {tried}{why}{smin}; check that K "
        f"is a Gram matrix (symmetric PSD) or use a larger {ridge_name}")


def cho_solve(xp, L, B):
    if xp is np:
        import scipy.linalg   # L.T: the upper factor in Fortran order, passed without a copy
        return scipy.linalg.cho_solve((L.T, False), B, check_finite=False)
    from cupyx.scipy.linalg import solve_triangular
    # L.T: the upper factor, Fortran-contiguous, which solve_triangular takes without a copy
    # (it converts its matrix to Fortran order: L itself, C-contiguous, would be copied)
    Z = solve_triangular(L.T, B, lower=False, trans="T")
    return solve_triangular(L.T, Z, lower=False)


def tri_solve(xp, L, B):
    if xp is np:
        import scipy.linalg   # L x = B as (L^T)^T x = B: L^T is Fortran-ordered, no copy
        return scipy.linalg.solve_triangular(L.T, B, lower=False, trans="T", check_finite=False)
    from cupyx.scipy.linalg import solve_triangular
    return solve_triangular(L.T, B, lower=False, trans="T")      # L.T: no copy (cho_solve)


#: Arrays up to this many elements are printed whole in the solver's records (a ridge grid's
#: scores, the classes); larger ones as their kind, shape and dtype.
BRIEF_ELEMENTS = 32


def _brief(v) -> str:
    if getattr(v, "ndim", 0) and hasattr(v, "dtype"):
        if v.size <= BRIEF_ELEMENTS:            # on one line, as NumPy's repr wraps at 75
            return "array(" + np.array2string(to_host(v), separator=", ",
                                              max_line_width=1 << 30, threshold=BRIEF_ELEMENTS) + ")"
        return f"<{'CuPy' if is_cupy(v) else 'NumPy'} array {tuple(v.shape)} {v.dtype}>"
    if isinstance(v, np.generic):               # np.float64(4.3e-12): as the number it is
        return repr(v.item())
    if isinstance(v, (list, tuple)) and any(getattr(a, "ndim", 0) for a in v):
        return ("[" if isinstance(v, list) else "(") + ", ".join(map(_brief, v)) + (
            "]" if isinstance(v, list) else ")")
    return repr(v)


def brief_repr(self) -> str:
    """The solver's records printed with each large array as its kind, shape and dtype: an
    (n, k) ``alpha`` or (n, n) ``U`` printed whole was hundreds of lines."""
    return f"{type(self).__name__}(" + ", ".join(
        f"{f.name}={_brief(getattr(self, f.name))}" for f in fields(self) if f.repr) + ")"


@dataclass(repr=False)
class KernelEigh:
    """``K = U diag(s) U^T`` (s ascending), reused by :func:`loo`, :func:`gradient_flow`.
    ``rounding``: the relative rounding of K's entries (:func:`check_rounding`) and
    ``diag_max``: K's largest diagonal entry (None: read from U and s when needed), which set
    the eigenvalues taken as rounding (:func:`spectrum_tol`)."""
    s: Any
    U: Any
    device: str = "cpu"
    rounding: float = EPS64
    diag_max: float | None = None

    def __post_init__(self):
        self.rounding = check_rounding(self.rounding)      # None: float64's
    __repr__ = brief_repr

    @property
    def n(self) -> int:
        return int(self.s.shape[0])

    @property
    def xp(self):
        return cupy_module() if self.device == "cuda" else np


def eigh(K, *, device=None, rounding=None, _overwrite: bool = False) -> KernelEigh:
    """Symmetric eigendecomposition ``K = U diag(s) U^T`` in float64 (LAPACK syevd, syevr beyond
    :data:`EVD_MAX_N` / cuSOLVER).  ``rounding``: the relative rounding of K's entries
    (float32's epsilon for a Gram computed in float32; None: float64's), kept in the record
    for :func:`spectrum_tol`.

    Memory (NumPy): the checked private copy of K (:func:`check_gram`) is decomposed in place
    (U is written over it), plus syevd's workspace of 2 n^2 floats: 3 x K in all beyond K
    (beyond :data:`EVD_MAX_N`: that copy, destroyed, and U, new: 2 x K).
    ``_overwrite`` (internal): K is already such a private, checked, C-contiguous float64
    copy and may be destroyed."""
    rounding = check_rounding(rounding_for(K, rounding))
    xp = xp_for(device, K)
    if not _overwrite:
        dev = "cuda" if xp is not np else "cpu"
        K = check_gram(K, device=dev, _workspace=loaded_workspace("eigh", dev))
    n = K.shape[0]
    diag_max = scalar(xp.max(xp.diagonal(K))) if n else 0.0     # before U is written over K
    if xp is np:
        import scipy.linalg   # K.T: the same symmetric matrix in Fortran order, so no copy
        driver = "evd" if n <= EVD_MAX_N else "evr"
        if driver == "evr":
            log.info("eigendecomposition by LAPACK syevr (MRRR), not syevd: at n = %d syevd's "
                     "workspace (2 n^2 + 6 n + 1) is beyond a 32-bit LAPACK integer (n <= %d)",
                     n, EVD_MAX_N)
        with announced("eigendecomposition", n, xp):
            s, U = scipy.linalg.eigh(K.T, check_finite=False, overwrite_a=True, driver=driver)
    else:
        with announced("eigendecomposition", n, xp):
            try:
                s, U = xp.linalg.eigh(K)
            except Exception as e:  # noqa: BLE001 - cuSOLVER's errors: said with the size
                if n < 20_000:      # not the size limit below: CuPy's own error, as it is
                    raise
                raise RuntimeError(
                    f"cuSOLVER's eigendecomposition (CuPy's eigh) of the {n} x {n} Gram failed: "
                    f"{type(e).__name__}: {e}; its workspace query is known to fail beyond "
                    "n of about 25,000 (NVIDIA/CUDALibrarySamples#246): solve on the CPU "
                    "(device='cpu', cntk-engine solve --device cpu), or give a ridge (a "
                    "Cholesky)") from e
    return KernelEigh(s=s, U=U, device="cpu" if xp is np else "cuda", rounding=rounding,
                      diag_max=diag_max)


#: The largest n that LAPACK syevd (divide and conquer, eigenvectors) decomposes with 32-bit
#: integers: its workspace, 1 + 6 n + 2 n^2 doubles, is counted in one (SciPy's LAPACK; at
#: 32,767 the count overflows, and LAPACK then works in a workspace too small: numpy#25564).
#: Beyond it :func:`eigh` uses syevr (MRRR: O(n) workspace, the eigenvectors in a new n x n
#: array; about as fast, its eigenvectors orthogonal to ~1e-12 rather than ~1e-15: docs/solver.md).
EVD_MAX_N = 32766


#: The n from which a factorisation is logged as it starts and ends: one LAPACK call of minutes
#: to hours with nothing else said (at 20,000 an eigendecomposition takes some 10 minutes on a
#: 2-core machine: bench/bench_solver.py's figures by n^3).
ANNOUNCE_FROM = 20_000


@contextmanager
def announced(what: str, n: int, xp):
    """Log (INFO) the start and the seconds of a factorisation of an n x n matrix where
    n >= :data:`ANNOUNCE_FROM`."""
    if n < ANNOUNCE_FROM:
        yield
        return
    where = "the CPU" if xp is np else "the GPU"
    log.info("%s of the %d x %d training Gram (float64, on %s): O(n^3), nothing is said until "
             "it ends", what, n, n, where)
    t = time.perf_counter()
    yield
    if xp is not np:          # CuPy may return before the GPU is done (its eigh under "ignore")
        xp.cuda.get_current_stream().synchronize()
    log.info("%s done in %.0f s", what, time.perf_counter() - t)


#: Copies of a loaded float64 K that a solve needs beyond K, by factorisation and device: the
#: ``workspace`` of :func:`~cntk_engine.solver.load_gram` (docs/solver.md).  NumPy: a
#: Cholesky factorises the private copy in place, syevd decomposes it in place with 2 n^2 of
#: workspace; the targets and blockwise passes add a little: the figures are the peaks that
#: ``bench/bench_solver.py`` measures for ``fit_classifier`` and its predict, with a margin.
#: CuPy, from its code (not yet measured on a GPU): cuSOLVER factorises a copy of the private
#: copy (2.1), and CuPy's eigh decomposes a copy of its own with syevd's workspace, taken as
#: LAPACK's 2 n^2 (4.1).  Where the caller gives K up (``overwrite_k``), the private copy is K
#: itself: one copy less (:func:`solve_workspace`).
SOLVE_WORKSPACE = {("cholesky", "cpu"): 1.1, ("eigh", "cpu"): 3.1,
                   ("cholesky", "cuda"): 2.1, ("eigh", "cuda"): 4.1}


def solve_workspace(factorisation: str, device: str = "cpu", *, overwrite_k: bool = False,
                    n: int | None = None) -> float:
    """:data:`SOLVE_WORKSPACE` of ``factorisation`` ("cholesky": fit_ridge, kernel_ridge,
    gp_posterior; "eigh": eigh, loo, select_ridge, gradient_flow) on ``device``; with
    ``overwrite_k`` (fit_ridge's, select_ridge's, fit_classifier's: K checked and factorised
    in its own memory) one copy less; an eigendecomposition on the CPU of an ``n`` beyond
    :data:`EVD_MAX_N` (syevr: U new, no n^2 workspace) one copy less again."""
    key = (factorisation, "cpu" if device is None else device)
    if key not in SOLVE_WORKSPACE:
        raise ValueError(f"solve_workspace takes a factorisation of "
                         f"{sorted({f for f, _ in SOLVE_WORKSPACE})} and a device of "
                         f"{sorted({d for _, d in SOLVE_WORKSPACE})}; got {factorisation!r}, "
                         f"{device!r}")
    by_syevr = key == ("eigh", "cpu") and n is not None and n > EVD_MAX_N
    return round(SOLVE_WORKSPACE[key] - (1.0 if overwrite_k else 0.0)
                 - (1.0 if by_syevr else 0.0), 6)


def loaded_workspace(factorisation: str, device: str, *, by_n: bool = True):
    """``load_gram``'s ``workspace`` for a K the solver reads itself (a ``zarr.Array``): the
    copy loaded is its own, so given up (:func:`solve_workspace` with ``overwrite_k``), for the
    n read (``by_n`` False: not lowered for syevr, as for k-fold, whose folds' blocks may be
    within :data:`EVD_MAX_N` where K is not)."""
    return lambda n: solve_workspace(factorisation, device, overwrite_k=True,
                                     n=n if by_n else None)


def spectrum_tol(E: "KernelEigh") -> float:
    """``max(n eps64 max|s|, 8 rounding max_k K_kk)``: the eigenvalues of K + lambda I at or
    below it are rounding, so that matrix is taken as singular (or, below ``-tol``, indefinite).

    ``n eps64 max|s|``: the float64 eigendecomposition's own backward error.  ``8 rounding
    max_k K_kk`` (:data:`PIVOT_ROUNDINGS`; ``rounding`` the relative rounding of K's entries,
    float32's epsilon for a Gram computed in float32): the eigenvalue form of :func:`cholesky`'s
    pivot floor.  Every pivot L_kk^2 of K + lambda I is at least its smallest eigenvalue, so
    for a positive semi-definite K a matrix kept here passes the Cholesky's test (a pivot above
    8 rounding of its diagonal entry), and one skipped here is one whose solve may rest on the
    rounding of K.  Sufficient, not necessary: held against the LARGEST diagonal entry (the
    Cholesky holds each pivot to its own), one image of far larger norm than the rest raises
    it for all.  Kept is not the same as accurate: where inputs are nearly parallel a float32
    Gram's entries are off by far more than its epsilon (README, "Nearly parallel inputs"),
    which leave-one-out then scores as it is.  Not a share of max|s|: a Gram of similar images
    has max|s| near n max_k K_kk (CNTK-GAP on 500 MNIST digits: 8 float32 epsilons of it
    skipped ridge 0, which the Cholesky factorises and which generalises)."""
    smax = max(abs(scalar(E.s[-1])), abs(scalar(E.s[0])), 1e-300)
    return max(E.n * EPS64 * smax, PIVOT_ROUNDINGS * E.rounding * _diag_max(E))


def _diag_max(E: "KernelEigh") -> float:
    """K's largest diagonal entry: recorded by :func:`eigh`, or read from ``sum_j U_ij^2 s_j``
    (by blocks of rows: no n x n temporary) for a decomposition made elsewhere."""
    if E.diag_max is not None:
        return E.diag_max
    xp, top = E.xp, 0.0
    step = block_rows(E.n)
    for i in range(0, E.n, step):
        B = E.U[i:i + step]
        top = max(top, scalar(xp.max((B * B) @ E.s)))
    return top


def as_eigh(K, device, rounding=None) -> KernelEigh:
    """K's eigendecomposition made for ``rounding``, or K itself if it is one (a ``rounding``
    given beside it must then be the one it carries)."""
    if not isinstance(K, KernelEigh):
        return eigh(K, device=device, rounding=rounding)
    if rounding is not None and check_rounding(rounding) != K.rounding:
        raise ValueError(
            f"rounding={rounding!r} is not the rounding the eigendecomposition was made for "
            f"({K.rounding:.3g}): pass it to eigh(K, rounding=...) instead, or leave it out here")
    return K

