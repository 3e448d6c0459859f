"""Kernel ridge regression and the NNGP posterior (one Cholesky factorisation each; or, at a
ridge chosen by leave-one-out, from that eigendecomposition)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from ..arrays import cupy_module
from .linalg import (KernelEigh, NotPositiveDefinite, apart_from, as_float64, brief_repr,
                     check_finite, check_gram, check_max_jitter, check_ridge, check_targets,
                     check_test_kernel, cho_solve, cholesky, loaded_workspace, ridge_scale, scalar,
                     rounding_for, spectrum_problem, spectrum_tol, tri_solve, xp_for)


@dataclass(repr=False)
class RidgeSolution:
    """``alpha = (K + (ridge + jitter) I)^-1 Y``; predict with ``K_test @ alpha``."""
    alpha: Any                 # (n, k) dual coefficients (NumPy or CuPy)
    ridge: float               # lambda asked for
    jitter: float = 0.0        # extra diagonal that was needed to factorise (0 = none)
    one_d: bool = False        # Y was 1-D: predictions are returned 1-D
    device: str = "cpu"
    __repr__ = brief_repr

    def predict(self, K_test):
        """Predictions ``K_test @ alpha``: (m,) or (m, k)."""
        xp = cupy_module() if self.device == "cuda" else np
        K_test = check_test_kernel(K_test, self.alpha.shape[0], xp=xp)
        F = K_test @ self.alpha
        return F[:, 0] if self.one_d else F


def fit_ridge(K, Y, ridge: float = 0.0, *, jitter: bool = True, max_jitter: float = 1e-3,
              device=None, overwrite_k: bool = False, rounding=None) -> RidgeSolution:
    """Kernel ridge regression: ``alpha = (K + ridge I)^-1 Y`` by Cholesky in float64.

    All columns of ``Y`` (n, k) share one factorisation.  ``ridge`` is absolute (multiply by
    :func:`ridge_scale` for a relative one); 0 is the interpolating solution.  See
    :func:`cholesky` for the jitter and ``rounding`` (K's relative rounding: float32's epsilon
    for a Gram computed in float32).  ``overwrite_k``: a C-contiguous, writeable float64 K is
    checked and factorised in its own memory (no copy of it; K is given up, see
    :func:`check_gram`; a ``Y`` that is a view of K is copied first)."""
    return fit_ridge_cholesky(K, Y, ridge, jitter=jitter, max_jitter=max_jitter, device=device,
                              overwrite_k=overwrite_k, rounding=rounding)


def fit_ridge_cholesky(K, Y, ridge: float, *, relative: bool = False, jitter: bool = True,
                       max_jitter: float = 1e-3, device=None,
                       overwrite_k: bool = False, rounding=None) -> RidgeSolution:
    """:func:`fit_ridge`; with ``relative``, ``ridge`` times mean(diag K) of the K checked
    (:func:`~.linalg.ridge_scale`; ``fit_relative_ridge``'s number, K read once)."""
    ridge, max_jitter = check_ridge(ridge), check_max_jitter(max_jitter)
    rounding = rounding_for(K, rounding)
    xp = xp_for(device, K, Y)
    dev = "cuda" if xp is not np else "cpu"
    Y = apart_from(K, Y, overwrite_k)
    K, (Y, one_d) = check_gram(K, device=dev, overwrite=overwrite_k,
                               before_write=lambda n: check_targets(Y, n, xp=xp),
                               _workspace=loaded_workspace("cholesky", dev))
    if relative:
        ridge *= ridge_scale(K)
    L, j = cholesky(K, ridge, jitter=jitter, max_jitter=max_jitter, overwrite_k=True, device=dev,
                    rounding=rounding)
    alpha = cho_solve(xp, L, Y)
    return RidgeSolution(alpha=alpha, ridge=ridge, jitter=j, one_d=one_d, device=dev)


def fit_ridge_eigh(E: KernelEigh, Y, ridge: float) -> RidgeSolution:
    """``alpha = U diag(1 / (s + ridge)) U^T Y`` from K's eigendecomposition ``E`` (:func:`eigh`):
    the fit at a ridge that leave-one-out chose from the same decomposition, with no second
    factorisation and no copy of K, and consistent with the scores that chose it.  Its error is
    O(cond(K + ridge I) eps), as a Cholesky solve's is, with a larger constant: where K + ridge
    I is near singular (ridge 0 on a condition number of 1e8 to 1e13) about ten to twenty times
    the Cholesky's (docs/solver.md).  Raises :class:`NotPositiveDefinite` where K + ridge I has an
    eigenvalue at or below :func:`spectrum_tol` (the rule by which :func:`loo` skips a ridge;
    stricter than a Cholesky's, which fails only where a pivot is within K's rounding of its
    diagonal entry (:func:`cholesky`), and so may pass such a matrix without jitter)."""
    ridge = check_ridge(ridge)
    xp, tol = E.xp, spectrum_tol(E)
    Y, one_d = check_targets(Y, E.n, xp=xp)
    s_min = scalar(E.s[0])
    if s_min + ridge <= tol:
        raise NotPositiveDefinite(
            f"K + {ridge:g} I ({E.n} x {E.n}) is {spectrum_problem(s_min, ridge, tol)}: its "
            f"smallest eigenvalue, {s_min + ridge:.3g}"
            + (f" (K's {s_min:.3g})" if ridge else "") + ", is not above the rounding of K's "
            f"spectrum, {tol:.3g} (spectrum_tol: the larger of n eps64 max|s| and 8 x K's "
            f"rounding {E.rounding:.3g} x its largest diagonal entry); use a larger ridge")
    alpha = E.U @ ((E.U.T @ Y) / (E.s + ridge)[:, None])
    return RidgeSolution(alpha=alpha, ridge=ridge, one_d=one_d, device=E.device)


def kernel_ridge(K, Y, K_test, ridge: float = 0.0, **kw):
    """Predictions ``K_test (K + ridge I)^-1 Y``: (m,) or (m, k).  ``kw``: :func:`fit_ridge`
    (with ``overwrite_k``, a ``K_test`` that is K or a view of it is copied first)."""
    K_test = apart_from(K, K_test, kw.get("overwrite_k", False), "K_test")
    return fit_ridge(K, Y, ridge, **kw).predict(K_test)


@dataclass(repr=False)
class GPPosterior:
    """Posterior of the test outputs: ``mean`` (m,) or (m, k); ``cov`` (m, m) when the full
    test-test kernel was given, ``var`` (m,) when only its diagonal (shared by every output)."""
    mean: Any
    cov: Any = None
    var: Any = None
    jitter: float = 0.0
    __repr__ = brief_repr


def gp_posterior(K, Y, K_test, K_test_test=None, *, noise: float = 0.0, jitter: bool = True,
                 device=None, rounding=None) -> GPPosterior:
    """NNGP posterior: ``mean = K_test (K + noise I)^-1 Y``,
    ``cov = K_test_test - K_test (K + noise I)^-1 K_test^T``.

    ``noise``: the observation noise variance sigma^2 >= 0.  ``K_test_test``: the (m, m) NNGP
    kernel of the test points (full covariance), its (m,) diagonal (variances; clipped at 0
    against rounding; a scalar for one test point), or None (mean only).  Computed as ``L = chol(K + noise I)``,
    ``V = L^-1 K_test^T``, ``cov = K_test_test - V^T V``.  ``rounding``: the relative rounding
    of K's entries, the epsilon of the dtype it was computed in (:func:`cholesky`)."""
    noise = check_ridge(noise, "noise")
    rounding = rounding_for(K, rounding)
    xp = xp_for(device, K, Y, K_test)
    dev = "cpu" if xp is np else "cuda"
    K = check_gram(K, device=dev, _workspace=loaded_workspace("cholesky", dev))
    n = K.shape[0]
    Y, one_d = check_targets(Y, n, xp=xp)
    Kt = check_test_kernel(K_test, n, xp=xp)
    m = Kt.shape[0]
    L, j = cholesky(K, noise, jitter=jitter, device=dev, overwrite_k=True, ridge_name="noise",
                    rounding=rounding)
    alpha = cho_solve(xp, L, Y)
    mean = Kt @ alpha
    mean = mean[:, 0] if one_d else mean
    if K_test_test is None:
        return GPPosterior(mean=mean, jitter=j)
    Ktt = as_float64(xp, K_test_test, name="K_test_test")
    if Ktt.ndim == 0 and m == 1:        # one test point: its variance
        Ktt = Ktt.reshape(1)
    V = tri_solve(xp, L, Kt.T)
    if Ktt.ndim == 1:
        if Ktt.shape != (m,):
            raise ValueError(f"K_test_test as a diagonal must have shape ({m},); got {tuple(Ktt.shape)}")
        check_finite(xp, Ktt, "K_test_test")
        var = xp.maximum(Ktt - xp.sum(V * V, axis=0), 0.0)
        return GPPosterior(mean=mean, var=var, jitter=j)
    if Ktt.shape != (m, m):
        raise ValueError(f"K_test_test must be the ({m}, {m}) test-test kernel or its ({m},) "
                         f"diagonal; got shape {tuple(Ktt.shape)}")
    check_finite(xp, Ktt, "K_test_test")
    cov = Ktt - V.T @ V
    cov = (cov + cov.T) * 0.5
    return GPPosterior(mean=mean, cov=cov, var=xp.maximum(xp.diagonal(cov), 0.0), jitter=j)

