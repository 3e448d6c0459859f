"""Gradient flow of the linearised (infinitely wide) network: predictions at any time t."""
from __future__ import annotations

import math
import numbers

import numpy as np

from ..inputs import check_nonnegative
from .linalg import as_eigh, check_targets, check_test_kernel, scalar

def gradient_flow(K, Y, t, *, K_test=None, eta: float = 1.0, rcond: float = 1e-10,
                  neg_tol: float = 1e-6, device=None):
    """Predictions of the linearised network trained by gradient flow for time ``t``.

    With ``K = U diag(s) U^T`` and ``+`` the eigenpairs kept (``s > rcond * s_max``;
    ``s_max`` the largest |eigenvalue|), what is computed is::

        f_t(X_test) = K_test U_+ diag((1 - exp(-eta s_+ t)) / s_+) U_+^T Y   (K_test given)
        f_t(X)      = U_+ diag(1 - exp(-eta s_+ t)) U_+^T Y                  (training points)

    and at ``t = inf`` (``np.inf``) ``K_test U_+ diag(1 / s_+) U_+^T Y = K_test K_r^+ Y``, with
    ``K_r^+`` the pseudo-inverse of K's positive part truncated at ``rcond`` (which is
    ``np.linalg.pinv(K, rcond)`` except for eigenvalues between ``-neg_tol * s_max`` and
    ``-rcond * s_max``, a float32 Gram's rounding: pinv inverts them, here they are dropped),
    and ``U_+ U_+^T Y`` on the training points.  Eigenvalues ``s <= rcond * s_max`` are taken as
    exact zeros: those directions are never trained (for a true Gram ``Phi Phi^T`` their
    K_test component is 0 in exact arithmetic) and contribute nothing.  So t = inf equals
    ``K_test K^-1 Y``, the ridge-0 :func:`kernel_ridge`, only when every eigenvalue is above
    ``rcond * s_max``; for a (numerically) singular K it is the minimum-norm interpolant of
    the kept eigenspace, while ``kernel_ridge(..., ridge=0)`` solves ``K + j I`` with the
    Cholesky jitter ``j`` (different on the near-null directions).
    ``K`` may be a :class:`KernelEigh` (one decomposition for many t).
    ``t``: a number (returns (m,) or (m, k)) or a sequence (returns (len(t), m[, k])).
    ``eta``: any real number > 0 (Python or NumPy scalar).  ``rcond``: 0 <= rcond < 1.
    Eigenvalues below ``-neg_tol * s_max`` (``neg_tol`` >= 0) mean K is not PSD: ValueError
    (the flow diverges)."""
    if isinstance(eta, (bool, np.bool_)) or not isinstance(eta, numbers.Real) \
            or not math.isfinite(float(eta)) or not float(eta) > 0:
        raise ValueError(f"eta (learning rate) must be a finite number > 0; got {eta!r}")
    eta = float(eta)
    rcond = check_nonnegative(rcond, "rcond", "eigenvalues below rcond x the largest are dropped")
    if rcond >= 1:
        raise ValueError(f"rcond must be below 1 (a fraction of the largest eigenvalue); got {rcond!r}")
    neg_tol = check_nonnegative(neg_tol, "neg_tol", "negative eigenvalues down to -neg_tol x "
                                "the largest are rounding")
    E = as_eigh(K, device)
    xp = E.xp
    ts = np.atleast_1d(np.asarray(t, dtype=np.float64))
    if ts.ndim != 1 or ts.size == 0 or np.isnan(ts).any() or (ts < 0).any():
        raise ValueError(f"t must be a time >= 0 (np.inf allowed) or a non-empty 1-D sequence of them; "
                         f"got {t!r}")
    Y, one_d = check_targets(Y, E.n, xp=xp)
    s, U = E.s, E.U
    smax = max(abs(scalar(s[-1])), abs(scalar(s[0])))
    if scalar(s[0]) < -neg_tol * smax:
        raise ValueError(f"K has eigenvalue {scalar(s[0]):.3g} < 0 (largest {smax:.3g}): it is "
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

