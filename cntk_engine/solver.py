r"""Kernel regression on CNTK / NNGP Gram matrices: ridge, leave-one-out, gradient flow, GP.

The solver knows matrices, not images: ``K`` is the (n, n) train Gram, ``K_test`` the (m, n)
test-vs-train kernel (``gram(x_test, x_train)``), ``Y`` the (n,) or (n, k) targets.  Every
function computes in float64 (the Gram may be float32) with NumPy/SciPy on the CPU, or with
CuPy (cuSOLVER) when ``K`` is a CuPy array or ``device="cuda"``; results follow the device.
A Gram stored in a Zarr store (``gram(..., out=...)``) can be passed as a ``zarr.Array``, or
loaded with :func:`load_gram`, which states the memory it needs and refuses what cannot fit.

The math
--------
*Kernel ridge regression* (``fit_ridge``, ``kernel_ridge``)::

    alpha = (K + lambda I)^-1 Y,        f(X_test) = K_test alpha.

``lambda = 0`` is the interpolating solution the CNTK paper uses (Arora et al. 2019: the
infinitely wide net trained to convergence by gradient flow on squared loss).  It is solved by
a Cholesky factorisation ``K + lambda I = L L^T``; when ``K`` is not numerically positive
definite (a float32 Gram of near-duplicate images) a jitter ``j I`` is added in growing steps
(1e-10, 1e-9, ... times the mean diagonal) and what was added is logged and returned.

*Leave-one-out* (``loo``): with ``A = K + lambda I`` and ``alpha = A^-1 Y``, the residual of the
model refitted without sample i, at sample i, is exactly::

    y_i - f_{-i}(x_i) = alpha_i / (A^-1)_ii .

From ONE eigendecomposition ``K = U diag(s) U^T``: ``alpha = U diag(1/(s+lambda)) U^T Y`` and
``(A^-1)_ii = sum_j U_ij^2 / (s_j + lambda)``, so every lambda of a grid costs O(n^2 k), no
refit.  ``kfold`` does k-fold cross-validation (one eigendecomposition per fold).
``select_ridge`` picks lambda on a grid by either.

*Gradient flow* (``gradient_flow``): training the linearised (infinitely wide) network by
gradient flow with learning rate eta on ``1/2 ||f(X) - Y||^2`` from f_0 = 0 gives at time t::

    f_t(X_test) = K_test K^-1 (I - exp(-eta K t)) Y
                = K_test U diag((1 - exp(-eta s t)) / s) U^T Y,
    f_t(X)      = U diag(1 - exp(-eta s t)) U^T Y,

and t = inf gives ``K_test K^-1 Y`` (the lambda = 0 ridge solution) when K is well
conditioned.  Computed: eigenvalues ``s <= rcond * s_max`` are dropped (never trained), so
t = inf is the truncated pseudo-inverse ``K_test U_+ diag(1/s_+) U_+^T Y`` (see
:func:`gradient_flow`).

*NNGP posterior* (``gp_posterior``): with prior f ~ GP(0, k) and Gaussian noise sigma^2::

    mean = K_test (K + sigma^2 I)^-1 Y,
    cov  = K_test_test - K_test (K + sigma^2 I)^-1 K_test^T

(one covariance, shared by every output column).  The mean is ridge regression with
lambda = sigma^2.

Classification helpers: :func:`one_hot` (``on``/``off`` values; :func:`paper_targets` is the
paper's 0.9 / -0.1 encoding), :func:`predict_classes` (argmax), :func:`accuracy`.
"""
from __future__ import annotations

import logging
import math
import numbers
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

log = logging.getLogger("cntk_engine")

#: default ridge grid for :func:`select_ridge`, as multiples of the mean diagonal of K
RELATIVE_RIDGE_GRID = (0.0, 1e-8, 1e-7, 1e-6, 1e-5, 1e-4, 1e-3, 1e-2, 1e-1, 1.0)
#: symmetry tolerance: max |K - K^T| <= SYM_RTOL * max |K| (float32 rounding is ~1e-7)
SYM_RTOL = 1e-5
DEVICES = (None, "cpu", "cuda")


class NotPositiveDefinite(np.linalg.LinAlgError):
    """K + lambda I stayed non positive definite after the largest jitter allowed."""


class GramTooLarge(MemoryError, ValueError):
    """A stored Gram would not fit in the memory allowed (``max_memory``)."""


# ----------------------------------------------------------------------------- devices
def _is_cupy(a) -> bool:
    return type(a).__module__.split(".")[0] == "cupy"


def _is_zarr(a) -> bool:
    return type(a).__module__.split(".")[0] == "zarr"


def _cupy():
    try:
        import cupy
    except ImportError as e:
        raise ImportError(f"device='cuda' needs CuPy (pip install cupy-cuda12x): {e}") from None
    return cupy


def _xp(device, *arrays):
    """NumPy or CuPy: CuPy when ``device == "cuda"`` or (device None) any input is CuPy."""
    if device not in DEVICES:
        raise ValueError(f"device must be one of {DEVICES}; got {device!r}")
    if device == "cuda" or (device is None and any(_is_cupy(a) for a in arrays)):
        return _cupy()
    return np


def _asarray(xp, a, dtype=np.float64, name: str = "input"):
    """``a`` as an ``xp`` float64 array (``a`` itself when it already is one)."""
    return _asarray_private(xp, a, dtype, name)[0]


def _asarray_private(xp, a, dtype=np.float64, name: str = "input", workspace: float = 1.0):
    """``(array, private)``: ``private`` is True only when the array is certainly a new buffer
    (a dtype conversion of an array, a host <-> GPU transfer, a Zarr load), which the solver
    may then overwrite; False when it may be (a view of) the caller's data.  Complex input is
    refused (casting it would silently drop the imaginary part)."""
    dt = getattr(a, "dtype", None)
    if dt is None and not _is_cupy(a):
        a = np.asarray(a)
        dt = a.dtype
    if dt is not None and np.dtype(dt).kind == "c":
        raise ValueError(f"{name} is complex ({np.dtype(dt)}); a kernel matrix and its targets must "
                         "be real (pass the real part explicitly if that is what is meant)")
    private = False
    if _is_zarr(a):
        a = load_gram(a, workspace=workspace, device="cuda" if xp is not np else None)
        private = True
    elif xp is np and _is_cupy(a):
        a = a.get()
        private = True
    elif xp is not np and not _is_cupy(a):
        private = True                       # host -> GPU copy
    if not private and isinstance(a, (np.ndarray,) + ((xp.ndarray,) if xp is not np else ())):
        private = np.dtype(a.dtype) != np.dtype(dtype)     # conversion: a new array
    return xp.asarray(a, dtype=dtype), private


def _block_rows(n: int) -> int:
    """Rows per block for the blockwise passes over an n x n matrix: temporaries stay ~2%."""
    return int(min(1024, max(32, n // 64)))


def _scalar(v) -> float:
    return float(v.item() if hasattr(v, "item") else v)


# ----------------------------------------------------------------------------- validation
def check_gram(K, name: str = "K", *, device=None, sym_rtol: float = SYM_RTOL,
               _workspace: float = 1.0):
    """``K`` as a float64 square symmetric finite matrix (symmetrised: (K + K^T) / 2).

    The result is always a new C-contiguous array that the solver owns (and may overwrite):
    the caller's ``K`` is never modified.  It costs one float64 copy of K and no other n x n
    temporary (the check and the symmetrisation go by blocks of rows; a float32, CuPy<->NumPy
    or Zarr input, converted anyway, is symmetrised in that converted copy).
    Raises ValueError for a non-square or non-2-D ``K``, NaN/Inf or complex entries, or an
    asymmetry beyond ``sym_rtol * max|K|`` (rounding of a float32 Gram is ~1e-7 relative)."""
    xp = _xp(device, K)
    K, private = _asarray_private(xp, K, name=name, workspace=_workspace)
    if K.ndim != 2 or K.shape[0] != K.shape[1]:
        raise ValueError(f"{name} must be a square (n, n) Gram matrix; got shape {tuple(K.shape)}")
    if K.shape[0] == 0:
        raise ValueError(f"{name} is empty (0 x 0); at least one training sample is needed")
    _check_finite(xp, K, name)
    n, step = K.shape[0], _block_rows(K.shape[0])
    scale = max(_scalar(xp.max(xp.abs(K[i:i + step]))) for i in range(0, n, step))
    S = K if private and K.flags.c_contiguous else xp.empty((n, n), dtype=np.float64)
    asym = 0.0
    for i in range(0, n, step):       # the diagonal block and the blocks right of / below it
        j = min(i + step, n)
        D = K[i:j, i:j]
        asym = max(asym, _scalar(xp.max(xp.abs(D - D.T))))
        S[i:j, i:j] = (D + D.T) * 0.5
        if j < n:
            up, low = K[i:j, j:], K[j:, i:j].T
            diff = up - low
            asym = max(asym, _scalar(xp.max(xp.abs(diff, out=diff))))
            del diff
            avg = up + low
            avg *= 0.5
            S[i:j, j:] = avg
            S[j:, i:j] = avg.T
    if asym > sym_rtol * scale:
        raise ValueError(f"{name} is not symmetric: max |K - K^T| = {asym:.3g} is more than "
                         f"{sym_rtol:g} x max |K| = {scale:.3g}; pass the train-vs-train Gram "
                         "(the test-vs-train kernel goes to K_test)")
    return S


def _check_finite(xp, a, name):
    if math.isfinite(_scalar(xp.sum(a))):   # NaN / Inf propagate into the sum: no bool n x n
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
    xp = xp or _xp(device, Y)
    if (getattr(Y, "dtype", None) is not None and np.dtype(Y.dtype).kind == "c") or (
            getattr(Y, "dtype", None) is None and np.iscomplexobj(Y)):
        raise ValueError(f"{name} is complex; targets must be real")
    try:
        Y = _asarray(xp, Y, name=name)
    except (TypeError, ValueError) as e:
        raise ValueError(f"{name} must be numeric targets, (n,) or (n, k); converting failed: {e}") from None
    if Y.ndim not in (1, 2):
        raise ValueError(f"{name} must be (n,) or (n, k) targets; got shape {tuple(Y.shape)}")
    if Y.shape[0] != n:
        raise ValueError(f"{name} has {Y.shape[0]} rows but K is {n} x {n}: one target row per "
                         "training sample is needed")
    _check_finite(xp, Y, name)
    one_d = Y.ndim == 1
    return (Y[:, None] if one_d else Y), one_d


def check_test_kernel(K_test, n: int, name: str = "K_test", *, xp=np):
    """``K_test`` as float64 (m, n): one row per test point, one column per training sample."""
    K_test = _asarray(xp, K_test, name=name)
    if K_test.ndim == 1:
        K_test = K_test[None, :]
    if K_test.ndim != 2 or K_test.shape[1] != n:
        raise ValueError(f"{name} must be the (m, n) test-vs-train kernel with n = {n} columns "
                         f"(one per training sample); got shape {tuple(K_test.shape)}")
    _check_finite(xp, K_test, name)
    return K_test


def check_ridge(ridge, name: str = "ridge") -> float:
    try:
        r = float(ridge)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a number >= 0; got {ridge!r}") from None
    if not math.isfinite(r) or r < 0:
        raise ValueError(f"{name} must be a finite number >= 0 (0 = interpolation); got {ridge!r}")
    return r


def ridge_scale(K) -> float:
    """mean(diag K): the unit of relative ridges (CNTK values scale with depth and pixel size).
    1.0 when the diagonal is not positive."""
    xp = _xp(None, K)
    s = _scalar(xp.mean(xp.diagonal(K)))
    return s if s > 0 and math.isfinite(s) else 1.0


# ----------------------------------------------------------------------------- classification
def one_hot(y, classes=None, *, on: float = 1.0, off: float = 0.0):
    """Targets (n, c) with ``on`` in the column of each label and ``off`` elsewhere.

    ``classes``: the label of each column, in any order, each once (default: the sorted
    unique labels of ``y``).  Returns ``(Y, classes)``; the column index of each sample's class
    (the ``labels`` of :func:`loo` / :func:`select_ridge`) is ``np.searchsorted(classes, y)``
    for sorted ``classes`` (the default).  ValueError for empty or repeated ``classes`` or a
    label that is not among them."""
    y = np.asarray(y.get() if _is_cupy(y) else y)
    if y.ndim != 1:
        raise ValueError(f"labels must be 1-D; got shape {y.shape}")
    classes = np.unique(y) if classes is None else np.asarray(classes)
    if classes.ndim != 1 or classes.size == 0:
        raise ValueError(f"classes must be a non-empty 1-D list of the labels (one per column); "
                         f"got {classes.tolist()!r}")
    order = np.argsort(classes, kind="stable")
    ordered = classes[order]
    dup = ordered[1:] == ordered[:-1]
    if bool(np.any(dup)):
        raise ValueError(f"classes must be distinct; {np.unique(ordered[1:][dup])[:10].tolist()} "
                         "repeated")
    try:
        pos = np.clip(np.searchsorted(ordered, y), 0, len(classes) - 1)
        bad = np.asarray(ordered[pos] != y, dtype=bool)
    except TypeError:          # labels not comparable with the classes (e.g. str vs int)
        pos, bad = None, np.ones(len(y), dtype=bool)
    if bool(np.any(bad)):
        raise ValueError(f"labels {np.unique(y[bad])[:10].tolist()} are not among the classes "
                         f"{classes[:20].tolist()}")
    idx = order[pos]
    Y = np.full((len(y), len(classes)), float(off))
    Y[np.arange(len(y)), idx] = on
    return Y, classes


def paper_targets(y, classes=None):
    """The CNTK paper's encoding: 0.9 for the class, -0.1 elsewhere.  Returns ``(Y, classes)``."""
    return one_hot(y, classes, on=0.9, off=-0.1)


def predict_classes(F, classes=None):
    """Argmax over the columns of scores ``F`` (m, c); mapped through ``classes`` if given."""
    xp = _xp(None, F)
    F = F if _is_cupy(F) else np.asarray(F)
    if F.ndim != 2:
        raise ValueError(f"scores must be (m, c), one column per class; got shape {tuple(F.shape)}"
                         ". For 1-D +-1 targets the predicted class is the sign: np.sign(scores)")
    idx = xp.argmax(F, axis=1)
    idx = idx.get() if _is_cupy(idx) else idx
    return idx if classes is None else np.asarray(classes)[idx]


def accuracy(pred, y) -> float:
    """Fraction of correct labels.  ``pred``: predicted labels (m,), compared with labels ``y``
    of any type; or scores (m, c), whose argmax column is compared with ``y``, which must then
    be column indices 0 <= y < c (``np.searchsorted(classes, y)``), not the labels."""
    pred = pred.get() if _is_cupy(pred) else np.asarray(pred)
    y = y.get() if _is_cupy(y) else np.asarray(y)
    if pred.ndim == 2:
        _class_indices(y, pred.shape[1], "y (with scores (m, c))")
        pred = pred.argmax(axis=1)
    if pred.shape != y.shape:
        raise ValueError(f"predictions {pred.shape} and labels {y.shape} differ in shape")
    return float(np.mean(pred == y))


# ----------------------------------------------------------------------------- Cholesky
def _cholesky_inplace(xp, A):
    """Lower Cholesky factor of the C-contiguous symmetric ``A``, or None if A is not positive
    definite.  NumPy: factorised in place (LAPACK potrf on ``A.T``, the same symmetric matrix
    in Fortran order, so no copy); the factor L is a view of A's memory.  Only A's lower
    triangle and diagonal are written, even when the factorisation fails: the strict upper
    triangle keeps the matrix (see :func:`_restore_from_upper`).  CuPy: cuSOLVER on a copy
    (A is left as it is)."""
    if xp is np:
        from scipy.linalg import lapack
        potrf, = lapack.get_lapack_funcs(("potrf",), (A,))
        U, info = potrf(A.T, lower=0, clean=0, overwrite_a=1)
        if info > 0:
            return None
        if info < 0:
            raise ValueError(f"LAPACK potrf: illegal argument {-info}")
        L = U.T                    # C-contiguous; above its diagonal: the matrix, not zeros
        n, step = L.shape[0], _block_rows(L.shape[0])
        for i in range(0, n, step):
            j = min(i + step, n)
            L[i:j, j:] = 0.0
            L[i:j, i:j] = np.tril(L[i:j, i:j])
        return L
    try:
        L = xp.linalg.cholesky(A)
    except Exception:  # noqa: BLE001 - cupy raises LinAlgError (or returns NaN) when not PD
        return None
    return L if bool(xp.isfinite(L).all()) else None


def _restore_from_upper(xp, A, diag):
    """Rewrite A's lower triangle from its strict upper triangle and its diagonal from
    ``diag``: the symmetric matrix again after a failed in-place factorisation (by blocks)."""
    n, step = A.shape[0], _block_rows(A.shape[0])
    for i in range(0, n, step):
        j = min(i + step, n)
        if i:
            A[i:j, :i] = A[:i, i:j].T
        D = A[i:j, i:j]
        A[i:j, i:j] = xp.triu(D, 1) + xp.triu(D, 1).T
    idx = xp.arange(n)
    A[idx, idx] = diag


def cholesky(K, ridge: float = 0.0, *, jitter: bool = True, max_jitter: float = 1e-3,
             device=None, overwrite_k: bool = False):
    """Lower Cholesky factor of ``K + (ridge + j) I`` and the jitter ``j`` that was needed.

    ``K`` must already be checked (float64, symmetric; :func:`check_gram`).  With ``jitter``
    and a failing factorisation, ``j`` grows 1e-10, 1e-9, ... up to ``max_jitter`` times
    mean(diag K); the jitter used is logged (warning).  Raises :class:`NotPositiveDefinite`
    if none works.  ``overwrite_k``: K (C-contiguous NumPy) may be destroyed: it is factorised
    in place and the factor returned is a view of it, no n x n copy at all (a failed attempt
    is undone from K's untouched upper triangle before the next jitter).  Otherwise one copy
    of K is made and K is left as it is."""
    xp = _xp(device, K)
    n = K.shape[0]
    private = overwrite_k and getattr(K, "flags", None) is not None and K.flags.c_contiguous \
        and K.dtype == np.float64
    A = K if private else xp.array(K, dtype=np.float64, order="C", copy=True)
    diag = xp.diagonal(A).copy()
    idx = xp.arange(n)

    def attempt(v):
        A[idx, idx] = diag + v
        L = _cholesky_inplace(xp, A)
        if L is None:
            _restore_from_upper(xp, A, diag)   # A = K again
        return L

    L = attempt(ridge)
    if L is not None:
        return L, 0.0
    if not jitter:
        raise NotPositiveDefinite(
            f"K + {ridge:g} I ({n} x {n}) is not positive definite and jitter=False; use a "
            "ridge > 0 or allow jitter")
    scale = ridge_scale(A)
    rel = 1e-10
    while rel <= max_jitter * (1 + 1e-9):
        j = rel * scale
        L = attempt(ridge + j)
        if L is not None:
            log.warning("K + %g I (%d x %d) is not numerically positive definite: added jitter "
                        "%.3g (= %g x mean diagonal) to factorise it", ridge, n, n, j, rel)
            return L, j
        rel *= 10
    smin = ""
    if n <= 5000:
        s = xp.linalg.eigvalsh(A)
        smin = f"; its smallest eigenvalue is {_scalar(s[0]):.3g} (largest {_scalar(s[-1]):.3g})"
    raise NotPositiveDefinite(
        f"K + {ridge:g} I ({n} x {n}) is not positive definite even with jitter up to "
        f"{max_jitter:g} x mean diagonal = {max_jitter * scale:.3g}{smin}; check that K is a "
        "Gram matrix (symmetric PSD) or use a larger ridge")


def _cho_solve(xp, L, B):
    if xp is np:
        import scipy.linalg   # L.T: the upper factor in Fortran order, passed without a copy
        return scipy.linalg.cho_solve((L.T, False), B, check_finite=False)
    from cupyx.scipy.linalg import solve_triangular
    Z = solve_triangular(L, B, lower=True)
    return solve_triangular(L, Z, lower=True, trans="T")


def _tri_solve(xp, L, B):
    if xp is np:
        import scipy.linalg   # L x = B as (L^T)^T x = B: L^T is Fortran-ordered, no copy
        return scipy.linalg.solve_triangular(L.T, B, lower=False, trans="T", check_finite=False)
    from cupyx.scipy.linalg import solve_triangular
    return solve_triangular(L, B, lower=True)


# ----------------------------------------------------------------------------- ridge
@dataclass
class RidgeSolution:
    """``alpha = (K + (ridge + jitter) I)^-1 Y``; predict with ``K_test @ alpha``."""
    alpha: Any                 # (n, k) dual coefficients (NumPy or CuPy)
    ridge: float               # lambda asked for
    jitter: float = 0.0        # extra diagonal that was needed to factorise (0 = none)
    one_d: bool = False        # Y was 1-D: predictions are returned 1-D
    device: str = "cpu"

    def predict(self, K_test):
        """Predictions ``K_test @ alpha``: (m,) or (m, k)."""
        xp = _cupy() if self.device == "cuda" else np
        K_test = check_test_kernel(K_test, self.alpha.shape[0], xp=xp)
        F = K_test @ self.alpha
        return F[:, 0] if self.one_d else F


def fit_ridge(K, Y, ridge: float = 0.0, *, jitter: bool = True, max_jitter: float = 1e-3,
              device=None) -> RidgeSolution:
    """Kernel ridge regression: ``alpha = (K + ridge I)^-1 Y`` by Cholesky in float64.

    All columns of ``Y`` (n, k) share one factorisation.  ``ridge`` is absolute (multiply by
    :func:`ridge_scale` for a relative one); 0 is the interpolating solution.  See
    :func:`cholesky` for the jitter."""
    ridge = check_ridge(ridge)
    xp = _xp(device, K, Y)
    K = check_gram(K, device="cuda" if xp is not np else "cpu", _workspace=0.1)
    Y, one_d = check_targets(Y, K.shape[0], xp=xp)
    L, j = cholesky(K, ridge, jitter=jitter, max_jitter=max_jitter, overwrite_k=True,
                    device="cuda" if xp is not np else "cpu")
    alpha = _cho_solve(xp, L, Y)
    return RidgeSolution(alpha=alpha, ridge=ridge, jitter=j, one_d=one_d,
                         device="cpu" if xp is np else "cuda")


def kernel_ridge(K, Y, K_test, ridge: float = 0.0, **kw):
    """Predictions ``K_test (K + ridge I)^-1 Y``: (m,) or (m, k).  ``kw``: :func:`fit_ridge`."""
    return fit_ridge(K, Y, ridge, **kw).predict(K_test)


# ----------------------------------------------------------------------------- eigendecomposition
@dataclass
class KernelEigh:
    """``K = U diag(s) U^T`` (s ascending), reused by :func:`loo`, :func:`gradient_flow`."""
    s: Any
    U: Any
    device: str = "cpu"

    @property
    def n(self) -> int:
        return int(self.s.shape[0])

    @property
    def xp(self):
        return _cupy() if self.device == "cuda" else np


def eigh(K, *, device=None, _overwrite: bool = False) -> KernelEigh:
    """Symmetric eigendecomposition ``K = U diag(s) U^T`` in float64 (LAPACK syevd / cuSOLVER).

    Memory (NumPy): the checked private copy of K (:func:`check_gram`) is decomposed in place
    (U is written over it), plus syevd's workspace of 2 n^2 floats: 3 x K in all beyond K.
    ``_overwrite`` (internal): K is already such a private, checked, C-contiguous float64
    copy and may be destroyed."""
    xp = _xp(device, K)
    if not _overwrite:
        K = check_gram(K, device="cuda" if xp is not np else "cpu", _workspace=2.1)
    if xp is np:
        import scipy.linalg   # K.T: the same symmetric matrix in Fortran order, so no copy
        s, U = scipy.linalg.eigh(K.T, check_finite=False, overwrite_a=True, driver="evd")
    else:
        s, U = xp.linalg.eigh(K)
    return KernelEigh(s=s, U=U, device="cpu" if xp is np else "cuda")


def _as_eigh(K, device) -> KernelEigh:
    return K if isinstance(K, KernelEigh) else eigh(K, device=device)


@dataclass
class CVResult:
    """Scores of a ridge grid: ``mse[i]``, ``accuracy[i]`` (or None) for ``ridges[i]``; NaN where
    ``K + ridge I`` is singular."""
    ridges: np.ndarray
    mse: np.ndarray
    accuracy: np.ndarray | None
    method: str
    predictions: list | None = None   # LOO predictions per ridge when asked (return_predictions)


_LABELS_HINT = ("pass labels=np.searchsorted(classes, y), with the classes returned by "
                "paper_targets(y) / one_hot(y)")


def _class_indices(lab, k: int, what: str):
    """Check that ``lab`` holds integer column indices 0 <= label < k (ValueError if not)."""
    if lab.dtype == np.bool_ or not np.issubdtype(lab.dtype, np.integer):
        raise ValueError(f"{what} must be integer column indices of the class of each sample "
                         f"(0 .. {k - 1}), not the labels themselves; got dtype {lab.dtype}; "
                         + _LABELS_HINT)
    if lab.size and (int(lab.min()) < 0 or int(lab.max()) >= k):
        raise ValueError(f"{what} must be column indices 0 <= label < {k} (one column per class); "
                         f"got values {int(lab.min())} .. {int(lab.max())}; " + _LABELS_HINT)
    return lab


def _labels_vector(labels, n: int, k: int, one_d: bool = False):
    """``labels`` as an (n,) integer array of class columns of Y (0 <= label < k), or None."""
    if labels is None:
        return None
    if one_d or k < 2:
        got = "1-D Y" if one_d else f"Y with k = {k} column"
        raise ValueError(f"labels (for accuracy) need one-hot targets Y of shape (n, k >= 2), one "
                         f"column per class; got {got}. Encode the classes with paper_targets(y) "
                         "/ one_hot(y)")
    lab = np.asarray(labels.get() if _is_cupy(labels) else labels)
    if lab.shape != (n,):
        raise ValueError(f"labels must be (n,) = ({n},) column indices of Y; got shape {lab.shape}")
    return _class_indices(lab, k, "labels")


def _ridges(ridges) -> np.ndarray:
    r = np.atleast_1d(np.asarray(ridges, dtype=np.float64))
    if r.ndim != 1 or r.size == 0:
        raise ValueError(f"ridges must be a non-empty 1-D list of numbers >= 0; got {ridges!r}")
    for v in r:
        check_ridge(v, "every ridge")
    return r


def loo(K, Y, ridges, *, labels=None, device=None, return_predictions: bool = False) -> CVResult:
    """Exact leave-one-out errors for every ridge of ``ridges`` from ONE eigendecomposition.

    ``K``: the Gram or its :class:`KernelEigh`.  For ``A = K + lambda I``:
    ``y_i - f_{-i}(x_i) = alpha_i / (A^-1)_ii`` (the model refitted without sample i).
    ``mse``: mean over samples of the squared LOO residual summed over outputs.  ``accuracy``
    (with ``labels``, the column index of each sample's class): argmax of the LOO predictions.
    A ridge with ``s_min + lambda <= n eps s_max`` (singular A) scores NaN.
    ``labels`` must be integers 0 <= label < k = Y.shape[1] (``np.searchsorted(classes, y)``
    with the ``classes`` of :func:`paper_targets`); raw class labels are refused."""
    if isinstance(K, KernelEigh):
        E, n, xp = K, K.n, K.xp
    else:
        xp = _xp(device, K)
        K = check_gram(K, device="cpu" if xp is np else "cuda", _workspace=2.1)
        E, n = None, K.shape[0]
    Y, one_d = check_targets(Y, n, xp=xp)
    lab = _labels_vector(labels, n, Y.shape[1], one_d)
    r = _ridges(ridges)
    if E is None:      # inputs checked before the O(n^3) step
        E = eigh(K, device="cpu" if xp is np else "cuda", _overwrite=True)
        del K
    s, U = E.s, E.U
    UtY = U.T @ Y
    U2 = U * U
    smax = max(abs(_scalar(s[-1])), abs(_scalar(s[0])), 1e-300)
    tol = E.n * np.finfo(np.float64).eps * smax
    mse = np.full(len(r), np.nan)
    acc = None if lab is None else np.full(len(r), np.nan)
    preds = [] if return_predictions else None
    for i, lam in enumerate(r):
        d = s + lam
        if _scalar(xp.min(d)) <= tol:
            log.info("LOO: K + %g I is singular (smallest eigenvalue %.3g): skipped", lam,
                     _scalar(xp.min(d)))
            if preds is not None:
                preds.append(None)
            continue
        alpha = U @ (UtY / d[:, None])
        ainv_diag = U2 @ (1.0 / d)
        resid = alpha / ainv_diag[:, None]
        mse[i] = _scalar(xp.mean(xp.sum(resid * resid, axis=1)))
        pred = Y - resid
        if lab is not None:
            acc[i] = accuracy(pred, lab)
        if preds is not None:
            preds.append(pred)
    return CVResult(ridges=r, mse=mse, accuracy=acc, method="loo", predictions=preds)


def kfold(K, Y, ridges, n_folds: int = 5, *, labels=None, seed=0, device=None) -> CVResult:
    """k-fold cross-validation of ridge regression for every ridge (one eigendecomposition of
    the training block per fold).  Folds: a seeded permutation split into ``n_folds`` parts.
    ``mse`` and ``accuracy`` are averaged over all held-out samples.  ``labels``: as for
    :func:`loo` (column indices of Y: ``np.searchsorted(classes, y)``)."""
    xp = _xp(device, K, Y)
    K = check_gram(K, device="cpu" if xp is np else "cuda", _workspace=2.1)
    n = K.shape[0]
    Y, one_d = check_targets(Y, n, xp=xp)
    lab = _labels_vector(labels, n, Y.shape[1], one_d)
    r = _ridges(ridges)
    _check_folds(n_folds, n)
    return _kfold(xp, K, Y, lab, r, n_folds, seed)


def _check_folds(n_folds, n):
    if isinstance(n_folds, bool) or not isinstance(n_folds, (int, np.integer)) or not 2 <= n_folds <= n:
        raise ValueError(f"n_folds must be an integer between 2 and n = {n}; got {n_folds!r}")


def _kfold(xp, K, Y, lab, r, n_folds, seed) -> CVResult:
    """k-fold on checked inputs (``K``: the checked symmetrised Gram, only read)."""
    n = K.shape[0]
    dev = "cpu" if xp is np else "cuda"
    perm = np.random.default_rng(seed).permutation(n)
    sq = np.zeros(len(r))
    hits = np.zeros(len(r))
    singular = np.zeros(len(r), dtype=bool)
    for f in range(n_folds):
        val = np.sort(perm[f::n_folds])
        tr = np.setdiff1d(np.arange(n), val)
        vi, ti = xp.asarray(val), xp.asarray(tr)
        # K[ix_(ti, ti)] is a new C-contiguous block (no K[ti] intermediate): decomposed in place
        E = eigh(K[xp.ix_(ti, ti)], device=dev, _overwrite=True)
        P = K[xp.ix_(vi, ti)] @ E.U
        UtY = E.U.T @ Y[ti]
        s = E.s
        del E      # U freed before the next fold's block is decomposed
        smax = max(abs(_scalar(s[-1])), abs(_scalar(s[0])), 1e-300)
        tol = len(tr) * np.finfo(np.float64).eps * smax
        for i, lam in enumerate(r):
            d = s + lam
            if _scalar(xp.min(d)) <= tol:
                singular[i] = True
                continue
            pred = P @ (UtY / d[:, None])
            sq[i] += _scalar(xp.sum((pred - Y[vi]) ** 2))
            if lab is not None:
                hits[i] += accuracy(pred, lab[val]) * len(val)
    mse = np.where(singular, np.nan, sq / n)
    acc = None if lab is None else np.where(singular, np.nan, hits / n)
    return CVResult(ridges=r, mse=mse, accuracy=acc, method=f"{n_folds}-fold")


@dataclass
class RidgeSelection:
    """The ridge chosen on a grid, with the scores of the whole grid."""
    ridge: float               # absolute lambda chosen
    relative: float            # ridge / mean(diag K)
    scores: CVResult
    score: str                 # "accuracy" or "mse"
    eigh: KernelEigh | None = field(default=None, repr=False)   # reusable (method "loo")


def select_ridge(K, Y, ridges=None, *, method: str = "loo", score: str = "auto", labels=None,
                 n_folds: int = 5, seed=0, device=None) -> RidgeSelection:
    """Choose lambda on a grid by LOO (default; one eigendecomposition) or k-fold.

    ``ridges``: absolute values; default ``RELATIVE_RIDGE_GRID x mean(diag K)``.  ``score``:
    "accuracy" (needs ``labels``; ties broken by lower MSE, then by the larger ridge),
    "mse" (ties: larger ridge), or "auto" (accuracy when labels are given).  ``labels``: the
    column of Y of each sample's class, integers 0 <= label < k, i.e.
    ``np.searchsorted(classes, y)`` with ``Y, classes = paper_targets(y)`` (raw labels such
    as {1, 3, 7} or strings are refused: they would score every ridge wrongly)."""
    if method not in ("loo", "kfold"):
        raise ValueError(f"method must be 'loo' or 'kfold'; got {method!r}")
    if score == "auto":
        score = "accuracy" if labels is not None else "mse"
    if score not in ("accuracy", "mse"):
        raise ValueError(f"score must be 'auto', 'accuracy' or 'mse'; got {score!r}")
    if score == "accuracy" and labels is None:
        raise ValueError("score='accuracy' needs labels (the class column of each sample: "
                         "np.searchsorted(classes, y))")
    E = K if isinstance(K, KernelEigh) else None
    if E is not None and method == "kfold":
        raise ValueError("method='kfold' needs the Gram K, not its eigendecomposition")
    if E is None:
        xp = _xp(device, K, Y)
        K = check_gram(K, device="cpu" if xp is np else "cuda", _workspace=2.1)
        n = K.shape[0]
        scale = ridge_scale(K)
    else:   # mean(diag K) = trace(K) / n = sum(s) / n
        xp, n = E.xp, E.n
        scale = _scalar(E.xp.sum(E.s)) / E.n
        scale = scale if scale > 0 else 1.0
    dev = "cpu" if xp is np else "cuda"
    # every input is checked before the O(n^3) step
    Y, one_d = check_targets(Y, n, xp=xp)
    lab = _labels_vector(labels, n, Y.shape[1], one_d)
    r = _ridges(np.asarray(RELATIVE_RIDGE_GRID) * scale if ridges is None else ridges)
    if method == "loo":
        if E is None:
            E = eigh(K, device=dev, _overwrite=True)     # K's private copy becomes U
            del K
        res = loo(E, Y, r, labels=lab)
    else:
        _check_folds(n_folds, n)
        res = _kfold(xp, K, Y, lab, r, n_folds, seed)
    mse = np.where(np.isnan(res.mse), np.inf, res.mse)
    if not np.isfinite(mse).any():
        raise NotPositiveDefinite(f"every ridge of the grid {res.ridges.tolist()} leaves K + "
                                  "ridge I singular; use larger ridges")
    r = res.ridges
    if score == "accuracy":
        acc = np.where(np.isnan(res.accuracy), -np.inf, res.accuracy)
        key = [(-acc[i], mse[i], -r[i]) for i in range(len(r))]
    else:
        key = [(mse[i], -r[i]) for i in range(len(r))]
    best = min(range(len(r)), key=lambda i: key[i])
    lam = float(r[best])
    log.info("%s ridge selection: ridge %.3g (%.3g x mean diagonal), %s", res.method, lam,
             lam / scale,
             f"accuracy {res.accuracy[best]:.4f}" if score == "accuracy" else f"MSE {res.mse[best]:.4g}")
    return RidgeSelection(ridge=lam, relative=lam / scale, scores=res, score=score,
                          eigh=E if method == "loo" else None)


# ----------------------------------------------------------------------------- gradient flow
def gradient_flow(K, Y, t, *, K_test=None, eta: float = 1.0, rcond: float = 1e-10,
                  neg_tol: float = 1e-6, device=None):
    """Predictions of the linearised network trained by gradient flow for time ``t``.

    With ``K = U diag(s) U^T`` and ``+`` the eigenpairs kept (``s > rcond * s_max``;
    ``s_max`` the largest |eigenvalue|), what is computed is::

        f_t(X_test) = K_test U_+ diag((1 - exp(-eta s_+ t)) / s_+) U_+^T Y   (K_test given)
        f_t(X)      = U_+ diag(1 - exp(-eta s_+ t)) U_+^T Y                  (training points)

    and at ``t = inf`` (``np.inf``) ``K_test U_+ diag(1 / s_+) U_+^T Y = K_test K_r^+ Y``, with
    ``K_r^+`` the pseudo-inverse truncated at ``rcond`` (``np.linalg.pinv(K, rcond)``), and
    ``U_+ U_+^T Y`` on the training points.  Eigenvalues ``s <= rcond * s_max`` are taken as
    exact zeros: those directions are never trained (for a true Gram ``Phi Phi^T`` their
    K_test component is 0 in exact arithmetic) and contribute nothing.  So t = inf equals
    ``K_test K^-1 Y``, the ridge-0 :func:`kernel_ridge`, only when every eigenvalue is above
    ``rcond * s_max``; for a (numerically) singular K it is the minimum-norm interpolant of
    the kept eigenspace, while ``kernel_ridge(..., ridge=0)`` solves ``K + j I`` with the
    Cholesky jitter ``j`` (different on the near-null directions).
    ``K`` may be a :class:`KernelEigh` (one decomposition for many t).
    ``t``: a number (returns (m,) or (m, k)) or a sequence (returns (len(t), m[, k])).
    ``eta``: any real number > 0 (Python or NumPy scalar).
    Eigenvalues below ``-neg_tol * s_max`` mean K is not PSD: ValueError (the flow diverges)."""
    if isinstance(eta, (bool, np.bool_)) or not isinstance(eta, numbers.Real) \
            or not math.isfinite(float(eta)) or not float(eta) > 0:
        raise ValueError(f"eta (learning rate) must be a finite number > 0; got {eta!r}")
    eta = float(eta)
    E = _as_eigh(K, device)
    xp = E.xp
    ts = np.atleast_1d(np.asarray(t, dtype=np.float64))
    if ts.ndim != 1 or np.isnan(ts).any() or (ts < 0).any():
        raise ValueError(f"t must be a time >= 0 (np.inf allowed) or a 1-D sequence of them; got {t!r}")
    Y, one_d = check_targets(Y, E.n, xp=xp)
    s, U = E.s, E.U
    smax = max(abs(_scalar(s[-1])), abs(_scalar(s[0])))
    if _scalar(s[0]) < -neg_tol * smax:
        raise ValueError(f"K has eigenvalue {_scalar(s[0]):.3g} < 0 (largest {smax:.3g}): it is "
                         "not a positive semi-definite kernel, gradient flow would diverge")
    keep = s > rcond * smax
    s_safe = xp.where(keep, s, 1.0)
    UtY = U.T @ Y
    left = U if K_test is None else check_test_kernel(K_test, E.n, xp=xp) @ U
    outs = []
    for tt in ts:
        if math.isinf(tt):
            w = 1.0 / s_safe if K_test is not None else xp.ones_like(s)
        elif K_test is not None:
            w = -xp.expm1(-eta * tt * s_safe) / s_safe
        else:
            w = -xp.expm1(-eta * tt * s_safe)
        w = xp.where(keep, w, 0.0)
        F = left @ (UtY * w[:, None])
        outs.append(F[:, 0] if one_d else F)
    return outs[0] if np.ndim(t) == 0 else xp.stack(outs)


# ----------------------------------------------------------------------------- NNGP posterior
@dataclass
class GPPosterior:
    """Posterior of the test outputs: ``mean`` (m,) or (m, k); ``cov`` (m, m) when the full
    test-test kernel was given, ``var`` (m,) when only its diagonal (shared by every output)."""
    mean: Any
    cov: Any = None
    var: Any = None
    jitter: float = 0.0


def gp_posterior(K, Y, K_test, K_test_test=None, *, noise: float = 0.0, jitter: bool = True,
                 device=None) -> GPPosterior:
    """NNGP posterior: ``mean = K_test (K + noise I)^-1 Y``,
    ``cov = K_test_test - K_test (K + noise I)^-1 K_test^T``.

    ``noise``: the observation noise variance sigma^2 >= 0.  ``K_test_test``: the (m, m) NNGP
    kernel of the test points (full covariance), its (m,) diagonal (variances; clipped at 0
    against rounding), or None (mean only).  Computed as ``L = chol(K + noise I)``,
    ``V = L^-1 K_test^T``, ``cov = K_test_test - V^T V``."""
    noise = check_ridge(noise, "noise")
    xp = _xp(device, K, Y, K_test)
    dev = "cpu" if xp is np else "cuda"
    K = check_gram(K, device=dev, _workspace=0.1)
    n = K.shape[0]
    Y, one_d = check_targets(Y, n, xp=xp)
    Kt = check_test_kernel(K_test, n, xp=xp)
    m = Kt.shape[0]
    L, j = cholesky(K, noise, jitter=jitter, device=dev, overwrite_k=True)
    alpha = _cho_solve(xp, L, Y)
    mean = Kt @ alpha
    mean = mean[:, 0] if one_d else mean
    if K_test_test is None:
        return GPPosterior(mean=mean, jitter=j)
    Ktt = _asarray(xp, K_test_test, name="K_test_test")
    V = _tri_solve(xp, L, Kt.T)
    if Ktt.ndim == 1:
        if Ktt.shape != (m,):
            raise ValueError(f"K_test_test as a diagonal must have shape ({m},); got {tuple(Ktt.shape)}")
        _check_finite(xp, Ktt, "K_test_test")
        var = xp.maximum(Ktt - xp.sum(V * V, axis=0), 0.0)
        return GPPosterior(mean=mean, var=var, jitter=j)
    if Ktt.shape != (m, m):
        raise ValueError(f"K_test_test must be the ({m}, {m}) test-test kernel or its ({m},) "
                         f"diagonal; got shape {tuple(Ktt.shape)}")
    _check_finite(xp, Ktt, "K_test_test")
    cov = Ktt - V.T @ V
    cov = (cov + cov.T) * 0.5
    return GPPosterior(mean=mean, cov=cov, var=xp.maximum(xp.diagonal(cov), 0.0), jitter=j)


# ----------------------------------------------------------------------------- Zarr
def available_memory() -> int:
    """Bytes of RAM available now: MemAvailable of /proc/meminfo (counts reclaimable page
    cache), else ``os.sysconf`` free pages x page size."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return int(os.sysconf("SC_AVPHYS_PAGES")) * int(os.sysconf("SC_PAGE_SIZE"))
    except (ValueError, OSError, AttributeError):
        return 1 << 62  # unknown: do not refuse


def available_gpu_memory() -> int:
    """Bytes free now on the current CUDA device (CuPy's ``Device().mem_info[0]``); memory
    held by CuPy's pool but unused counts as free (it is reused)."""
    cupy = _cupy()
    free = int(cupy.cuda.Device().mem_info[0])
    try:
        pool = cupy.get_default_memory_pool()
        free += int(pool.total_bytes()) - int(pool.used_bytes())
    except Exception:  # noqa: BLE001 - pool API absent: the driver's figure alone
        pass
    return free


def _memory_limits(device, max_memory):
    """``[(where, bytes)]`` the load must fit in: host RAM, plus the GPU for device="cuda"."""
    if max_memory is not None:
        return [("the limit", int(max_memory))]
    if device == "cuda":
        return [("free GPU memory", available_gpu_memory()), ("available RAM", available_memory())]
    return [("available RAM", available_memory())]


def _fmt_bytes(b: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if b < 1024 or unit == "TiB":
            return f"{b:.1f} {unit}" if unit != "B" else f"{int(b)} B"
        b /= 1024
    return f"{b:.1f} TiB"


def load_gram(source, key: str | None = None, *, max_memory: int | None = None,
              workspace: float = 1.0, device=None):
    """Load a Gram matrix from Zarr into memory as float64 (NumPy, or CuPy with device="cuda").

    ``source``: a ``zarr.Array``, a ``zarr.Group`` or the path of a store written by
    ``gram(..., out=path)``, with ``key`` naming the array (``"ntk"``, ``"nngp"``,
    ``"depth_11/ntk"``; default: the only kernel array).  The memory needed is the float64
    matrix plus ``workspace`` copies of it for the solve; it is logged, and if it exceeds
    ``max_memory`` (bytes; default: :func:`available_memory`, or with ``device="cuda"`` the
    free GPU memory, :func:`available_gpu_memory`, where the matrix and the solve go; the host
    must then still hold the float64 matrix while it is read) :class:`GramTooLarge` is raised
    before anything is read.  ``workspace``: copies of K the solver called on the loaded K
    needs beyond it (NumPy, peaks measured with tracemalloc at n = 2000): 1 for
    :func:`fit_ridge`, :func:`kernel_ridge`, :func:`gp_posterior` (measured 1.05-1.1: the
    private symmetrised copy, factorised in place; the default); 3 for :func:`eigh`,
    :func:`loo`, :func:`select_ridge` and :func:`gradient_flow` (measured 3.0: that copy
    decomposed in place plus LAPACK syevd's 2 n^2 workspace) and for :func:`kfold` /
    ``select_ridge(method="kfold")`` (measured 3.1 with 5 folds).  (A ``zarr.Array`` given to
    the solver directly is loaded into that private copy itself: 1 less.)  Reading
    a non-float64 store also holds the raw array while converting it.  A store whose job is
    unfinished is refused (its missing tiles read as NaN)."""
    try:
        import zarr
    except ImportError as e:
        raise ImportError(f"loading a Gram from Zarr needs zarr >= 3 (pip install 'cntk-engine[zarr]'): {e}") from None
    where = repr(str(source)) if isinstance(source, (str, Path)) else type(source).__name__
    if isinstance(source, (str, Path)):
        if not Path(source).exists():
            raise FileNotFoundError(f"Zarr store {str(source)!r} does not exist")
        try:
            source = zarr.open(str(source), mode="r")
        except Exception as e:  # noqa: BLE001 - not a store
            raise ValueError(f"{where} is not a readable Zarr store: {e}") from None
    group = None
    if isinstance(source, zarr.Group):
        group = source
        names = sorted(k for k, _ in group.arrays() if k != "tiles_done") + sorted(
            f"{g}/{k}" for g, sub in group.groups() for k, _ in sub.arrays())
        if key is None:
            if len(names) != 1:
                raise ValueError(f"the store at {where} holds arrays {names}: name one as key=")
            key = names[0]
        if key not in names:
            raise ValueError(f"the store at {where} has no array {key!r}; it holds {names}")
        _check_store_complete(group, where)
        arr = group[key]
    elif isinstance(source, zarr.Array):
        arr = source
        if key is not None:
            raise ValueError("key= applies to a Zarr group or store path, not to a zarr.Array")
    else:
        raise ValueError(f"source must be a zarr.Array, a zarr.Group or a store path; got {type(source).__name__}")
    shape = tuple(arr.shape)
    if len(shape) != 2:
        raise ValueError(f"the Zarr array {key or ''} has shape {shape}; a kernel matrix is 2-D")
    if device not in DEVICES:
        raise ValueError(f"device must be one of {DEVICES}; got {device!r}")
    if np.dtype(arr.dtype).kind == "c":
        raise ValueError(f"the Zarr array {key or ''} is complex ({arr.dtype}); a Gram matrix is real")
    nbytes = shape[0] * shape[1] * 8
    raw = 0 if np.dtype(arr.dtype) == np.float64 else shape[0] * shape[1] * np.dtype(arr.dtype).itemsize
    need = nbytes + max(workspace * nbytes, raw)     # the solve, or the read + conversion
    for place, limit in _memory_limits(device, max_memory):
        # the host holds the float64 matrix (and the raw array) while reading for the GPU
        staging = place == "available RAM" and device == "cuda"
        want = nbytes + raw if staging else need
        what = (f"{_fmt_bytes(want)} on the host to read it for the GPU" if staging else
                f"{_fmt_bytes(need)} with the solve's workspace ({workspace:g} copies)")
        msg = (f"Gram {key or ''} {shape[0]} x {shape[1]} from {where}: {_fmt_bytes(nbytes)} as "
               f"float64, {what}; {place} {_fmt_bytes(limit)}")
        if want > limit:
            raise GramTooLarge(msg + ": does not fit. Free memory, raise max_memory, solve on a "
                               "larger machine, or use fewer training samples")
    log.info("loading " + msg)
    K = np.asarray(arr[...], dtype=np.float64)
    if device == "cuda":
        return _cupy().asarray(K)
    return K


def _check_store_complete(group, where):
    spec = group.attrs.get("cntk_engine")
    if spec is None or "tiles_done" not in [k for k, _ in group.arrays()]:
        return
    done = np.asarray(group["tiles_done"][...])
    todo = done == 0
    if spec.get("symmetric"):
        todo = np.triu(todo)
    if todo.any():
        raise ValueError(f"the Gram store at {where} is unfinished: {int(todo.sum())} of "
                         f"{int(np.triu(np.ones_like(done)).sum() if spec.get('symmetric') else done.size)} "
                         "tiles are not computed yet; rerun the gram job with --resume / the same out=")


__all__ = [
    "RELATIVE_RIDGE_GRID", "NotPositiveDefinite", "GramTooLarge", "check_gram", "check_targets",
    "check_test_kernel", "check_ridge", "ridge_scale", "one_hot", "paper_targets",
    "predict_classes", "accuracy", "cholesky", "RidgeSolution", "fit_ridge", "kernel_ridge",
    "KernelEigh", "eigh", "CVResult", "loo", "kfold", "RidgeSelection", "select_ridge",
    "gradient_flow", "GPPosterior", "gp_posterior", "available_memory", "available_gpu_memory",
    "load_gram",
]
