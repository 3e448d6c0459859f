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

and t = inf gives ``K_test K^-1 Y`` (the lambda = 0 ridge solution).

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


def _asarray(xp, a, dtype=np.float64):
    if xp is np and _is_cupy(a):
        a = a.get()
    if _is_zarr(a):
        a = load_gram(a)
    return xp.asarray(a, dtype=dtype)


def _scalar(v) -> float:
    return float(v.item() if hasattr(v, "item") else v)


# ----------------------------------------------------------------------------- validation
def check_gram(K, name: str = "K", *, device=None, sym_rtol: float = SYM_RTOL):
    """``K`` as a float64 square symmetric finite matrix (symmetrised: (K + K^T) / 2).

    Raises ValueError for a non-square or non-2-D ``K``, NaN/Inf entries, or an asymmetry
    beyond ``sym_rtol * max|K|`` (rounding of a float32 Gram is ~1e-7 relative)."""
    xp = _xp(device, K)
    K = _asarray(xp, K)
    if K.ndim != 2 or K.shape[0] != K.shape[1]:
        raise ValueError(f"{name} must be a square (n, n) Gram matrix; got shape {tuple(K.shape)}")
    if K.shape[0] == 0:
        raise ValueError(f"{name} is empty (0 x 0); at least one training sample is needed")
    _check_finite(xp, K, name)
    # blockwise: no n x n temporaries for the check (the Gram may be tens of GB)
    n, step = K.shape[0], 2048
    scale = max(_scalar(xp.max(xp.abs(K[i:i + step]))) for i in range(0, n, step))
    asym = max(_scalar(xp.max(xp.abs(K[i:i + step] - K[:, i:i + step].T))) for i in range(0, n, step))
    if asym > sym_rtol * scale:
        raise ValueError(f"{name} is not symmetric: max |K - K^T| = {asym:.3g} is more than "
                         f"{sym_rtol:g} x max |K| = {scale:.3g}; pass the train-vs-train Gram "
                         "(the test-vs-train kernel goes to K_test)")
    S = K + K.T       # one new array: the caller's K is never modified
    S *= 0.5
    return S


def _check_finite(xp, a, name):
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
    try:
        Y = _asarray(xp, Y)
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
    K_test = _asarray(xp, K_test)
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

    ``classes``: the label of each column (default: the sorted unique labels of ``y``).
    Returns ``(Y, classes)``."""
    y = np.asarray(y)
    if y.ndim != 1:
        raise ValueError(f"labels must be 1-D; got shape {y.shape}")
    classes = np.unique(y) if classes is None else np.asarray(classes)
    idx = np.searchsorted(classes, y)
    idx = np.clip(idx, 0, len(classes) - 1)
    bad = classes[idx] != y
    if bool(np.any(bad)):
        raise ValueError(f"labels {np.unique(y[bad])[:10].tolist()} are not among the classes "
                         f"{classes[:20].tolist()}")
    Y = np.full((len(y), len(classes)), float(off))
    Y[np.arange(len(y)), idx] = on
    return Y, classes


def paper_targets(y, classes=None):
    """The CNTK paper's encoding: 0.9 for the class, -0.1 elsewhere.  Returns ``(Y, classes)``."""
    return one_hot(y, classes, on=0.9, off=-0.1)


def predict_classes(F, classes=None):
    """Argmax over the columns of scores ``F`` (m, c); mapped through ``classes`` if given."""
    xp = _xp(None, F)
    idx = xp.argmax(F, axis=1)
    idx = idx.get() if _is_cupy(idx) else idx
    return idx if classes is None else np.asarray(classes)[idx]


def accuracy(pred, y) -> float:
    """Fraction of correct labels; ``pred`` is labels (m,) or scores (m, c) (then argmax)."""
    pred = pred.get() if _is_cupy(pred) else np.asarray(pred)
    y = y.get() if _is_cupy(y) else np.asarray(y)
    if pred.ndim == 2:
        pred = pred.argmax(axis=1)
    if pred.shape != y.shape:
        raise ValueError(f"predictions {pred.shape} and labels {y.shape} differ in shape")
    return float(np.mean(pred == y))


# ----------------------------------------------------------------------------- Cholesky
def _plus_diag(xp, K, v):
    """A new array K + v I (no n x n identity)."""
    A = K.copy()
    idx = xp.arange(K.shape[0])
    A[idx, idx] += v
    return A


def _cholesky_once(xp, A):
    """Lower Cholesky factor of A (overwritten), or None if A is not positive definite."""
    if xp is np:
        import scipy.linalg
        try:
            return scipy.linalg.cholesky(A, lower=True, check_finite=False, overwrite_a=True)
        except np.linalg.LinAlgError:
            return None
    try:
        L = xp.linalg.cholesky(A)
    except Exception:  # noqa: BLE001 - cupy raises LinAlgError (or returns NaN) when not PD
        return None
    return L if bool(xp.isfinite(L).all()) else None


def cholesky(K, ridge: float = 0.0, *, jitter: bool = True, max_jitter: float = 1e-3,
             device=None):
    """Lower Cholesky factor of ``K + (ridge + j) I`` and the jitter ``j`` that was needed.

    ``K`` must already be checked (float64, symmetric).  With ``jitter`` and a failing
    factorisation, ``j`` grows 1e-10, 1e-9, ... up to ``max_jitter`` times mean(diag K); the
    jitter used is logged (warning).  Raises :class:`NotPositiveDefinite` if none works."""
    xp = _xp(device, K)
    n = K.shape[0]
    L = _cholesky_once(xp, _plus_diag(xp, K, ridge))
    if L is not None:
        return L, 0.0
    if not jitter:
        raise NotPositiveDefinite(
            f"K + {ridge:g} I ({n} x {n}) is not positive definite and jitter=False; use a "
            "ridge > 0 or allow jitter")
    scale = ridge_scale(K)
    rel = 1e-10
    while rel <= max_jitter * (1 + 1e-9):
        j = rel * scale
        L = _cholesky_once(xp, _plus_diag(xp, K, ridge + j))
        if L is not None:
            log.warning("K + %g I (%d x %d) is not numerically positive definite: added jitter "
                        "%.3g (= %g x mean diagonal) to factorise it", ridge, n, n, j, rel)
            return L, j
        rel *= 10
    smin = ""
    if n <= 5000:
        s = xp.linalg.eigvalsh(K)
        smin = f"; its smallest eigenvalue is {_scalar(s[0]):.3g} (largest {_scalar(s[-1]):.3g})"
    raise NotPositiveDefinite(
        f"K + {ridge:g} I ({n} x {n}) is not positive definite even with jitter up to "
        f"{max_jitter:g} x mean diagonal = {max_jitter * scale:.3g}{smin}; check that K is a "
        "Gram matrix (symmetric PSD) or use a larger ridge")


def _cho_solve(xp, L, B):
    if xp is np:
        import scipy.linalg
        return scipy.linalg.cho_solve((L, True), B, check_finite=False)
    from cupyx.scipy.linalg import solve_triangular
    Z = solve_triangular(L, B, lower=True)
    return solve_triangular(L, Z, lower=True, trans="T")


def _tri_solve(xp, L, B):
    if xp is np:
        import scipy.linalg
        return scipy.linalg.solve_triangular(L, B, lower=True, check_finite=False)
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
    K = check_gram(K, device="cuda" if xp is not np else "cpu")
    Y, one_d = check_targets(Y, K.shape[0], xp=xp)
    L, j = cholesky(K, ridge, jitter=jitter, max_jitter=max_jitter,
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


def eigh(K, *, device=None, _checked: bool = False) -> KernelEigh:
    """Symmetric eigendecomposition ``K = U diag(s) U^T`` in float64 (LAPACK syevd / cuSOLVER)."""
    xp = _xp(device, K)
    if not _checked:
        K = check_gram(K, device="cuda" if xp is not np else "cpu")
    if xp is np:
        import scipy.linalg
        s, U = scipy.linalg.eigh(K, check_finite=False, overwrite_a=True, driver="evd")
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


def _labels_vector(labels, n):
    if labels is None:
        return None
    lab = np.asarray(labels.get() if _is_cupy(labels) else labels)
    if lab.shape != (n,):
        raise ValueError(f"labels must be (n,) = ({n},) column indices of Y; got shape {lab.shape}")
    return lab


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
    A ridge with ``s_min + lambda <= n eps s_max`` (singular A) scores NaN."""
    E = _as_eigh(K, device)
    xp = E.xp
    Y, _ = check_targets(Y, E.n, xp=xp)
    lab = _labels_vector(labels, E.n)
    r = _ridges(ridges)
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
    ``mse`` and ``accuracy`` are averaged over all held-out samples."""
    xp = _xp(device, K, Y)
    dev = "cpu" if xp is np else "cuda"
    K = check_gram(K, device=dev)
    n = K.shape[0]
    Y, _ = check_targets(Y, n, xp=xp)
    lab = _labels_vector(labels, n)
    r = _ridges(ridges)
    if isinstance(n_folds, bool) or not isinstance(n_folds, (int, np.integer)) or not 2 <= n_folds <= n:
        raise ValueError(f"n_folds must be an integer between 2 and n = {n}; got {n_folds!r}")
    perm = np.random.default_rng(seed).permutation(n)
    sq = np.zeros(len(r))
    hits = np.zeros(len(r))
    singular = np.zeros(len(r), dtype=bool)
    for f in range(n_folds):
        val = np.sort(perm[f::n_folds])
        tr = np.setdiff1d(np.arange(n), val)
        vi, ti = xp.asarray(val), xp.asarray(tr)
        E = eigh(K[ti][:, ti], device=dev, _checked=True)
        P = K[vi][:, ti] @ E.U
        UtY = E.U.T @ Y[ti]
        smax = max(abs(_scalar(E.s[-1])), abs(_scalar(E.s[0])), 1e-300)
        tol = len(tr) * np.finfo(np.float64).eps * smax
        for i, lam in enumerate(r):
            d = E.s + lam
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
    "mse" (ties: larger ridge), or "auto" (accuracy when labels are given)."""
    if method not in ("loo", "kfold"):
        raise ValueError(f"method must be 'loo' or 'kfold'; got {method!r}")
    if score == "auto":
        score = "accuracy" if labels is not None else "mse"
    if score not in ("accuracy", "mse"):
        raise ValueError(f"score must be 'auto', 'accuracy' or 'mse'; got {score!r}")
    if score == "accuracy" and labels is None:
        raise ValueError("score='accuracy' needs labels (the class column of each sample)")
    xp = _xp(device, K, Y)
    dev = "cpu" if xp is np else "cuda"
    E = K if isinstance(K, KernelEigh) else None
    if E is None:
        K = check_gram(K, device=dev)
        scale = ridge_scale(K)
    else:   # mean(diag K) = trace(K) / n = sum(s) / n
        scale = _scalar(E.xp.sum(E.s)) / E.n
        scale = scale if scale > 0 else 1.0
    if ridges is None:
        ridges = np.asarray(RELATIVE_RIDGE_GRID) * scale
    if method == "loo":
        E = E or eigh(K, device=dev, _checked=True)
        res = loo(E, Y, ridges, labels=labels)
    else:
        if E is not None:
            raise ValueError("method='kfold' needs the Gram K, not its eigendecomposition")
        res = kfold(K, Y, ridges, n_folds, labels=labels, seed=seed, device=dev)
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

    ``f_t(X_test) = K_test U diag((1 - exp(-eta s t)) / s) U^T Y`` (``K_test`` given) or, on the
    training points, ``f_t(X) = U diag(1 - exp(-eta s t)) U^T Y``; ``t = inf`` (``np.inf``) is
    ``K_test K^-1 Y``.  ``K`` may be a :class:`KernelEigh` (one decomposition for many t).
    ``t``: a number (returns (m,) or (m, k)) or a sequence (returns (len(t), m[, k])).
    Eigenvalues ``|s| <= rcond * s_max`` are taken as exact zeros: those directions are never
    trained (their K_test component is 0 in exact arithmetic) and contribute nothing.
    Eigenvalues below ``-neg_tol * s_max`` mean K is not PSD: ValueError (the flow diverges)."""
    E = _as_eigh(K, device)
    xp = E.xp
    if isinstance(eta, bool) or not isinstance(eta, (int, float)) or not eta > 0 or not math.isfinite(eta):
        raise ValueError(f"eta (learning rate) must be a finite number > 0; got {eta!r}")
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
    K = check_gram(K, device=dev)
    n = K.shape[0]
    Y, one_d = check_targets(Y, n, xp=xp)
    Kt = check_test_kernel(K_test, n, xp=xp)
    m = Kt.shape[0]
    L, j = cholesky(K, noise, jitter=jitter, device=dev)
    alpha = _cho_solve(xp, L, Y)
    mean = Kt @ alpha
    mean = mean[:, 0] if one_d else mean
    if K_test_test is None:
        return GPPosterior(mean=mean, jitter=j)
    Ktt = _asarray(xp, K_test_test)
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
    matrix plus ``workspace`` copies of it for the solve (1 for a Cholesky; use 2 for LOO's
    eigendecomposition); it is logged, and if it exceeds ``max_memory`` (bytes; default
    :func:`available_memory`) :class:`GramTooLarge` is raised before anything is read.
    A store whose job is unfinished is refused (its missing tiles read as NaN)."""
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
    nbytes = shape[0] * shape[1] * 8
    need = nbytes * (1 + workspace)
    limit = available_memory() if max_memory is None else int(max_memory)
    msg = (f"Gram {key or ''} {shape[0]} x {shape[1]} from {where}: {_fmt_bytes(nbytes)} as "
           f"float64, {_fmt_bytes(need)} with the solve's workspace ({workspace:g} copies); "
           f"limit {_fmt_bytes(limit)}")
    if need > limit:
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
    "gradient_flow", "GPPosterior", "gp_posterior", "available_memory", "load_gram",
]
