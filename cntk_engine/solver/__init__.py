r"""Kernel regression on CNTK / NNGP Gram matrices: ridge, leave-one-out, gradient flow, GP.

The solver knows matrices, not images: ``K`` is the (n, n) train Gram, ``K_test`` the (m, n)
test-vs-train kernel (``gram(x_test, x_train)``), ``Y`` the (n,) or (n, k) targets.  Every
function computes in float64 (the Gram may be float32) with NumPy/SciPy on the CPU, or with
CuPy (cuSOLVER) when ``K`` is a CuPy array or ``device="cuda"``; results follow the device.
A Gram stored in a Zarr store (``gram(..., out=...)``) can be passed as a ``zarr.Array``, or
loaded with :func:`load_gram`, which states the memory it needs and refuses what cannot fit;
:func:`load_train_test` loads a training Gram and its test kernel from two stores and refuses
them when they are not one model's (other network, other training images).

Modules: :mod:`.linalg` (checks, Cholesky with jitter, eigh), :mod:`.targets` (one-hot,
argmax, accuracy), :mod:`.ridge` (ridge regression, NNGP posterior), :mod:`.selection`
(leave-one-out, k-fold, ridge selection), :mod:`.flow` (gradient flow).

The math
--------
*Kernel ridge regression* (``fit_ridge``, ``kernel_ridge``)::

    alpha = (K + lambda I)^-1 Y,        f(X_test) = K_test alpha.

``lambda = 0`` is the interpolating solution the CNTK paper uses (Arora et al. 2019: the
infinitely wide net trained to convergence by gradient flow on squared loss).  It is solved by
a Cholesky factorisation ``K + lambda I = L L^T``; when ``K`` is not numerically positive
definite (a float32 Gram of near-duplicate images) a jitter ``j I`` is added in tenfold steps
(from 1e-10 or more, times the mean diagonal: the pivot floor of K's smallest positive diagonal
entry) and what was added is logged and returned.

*Leave-one-out* (``loo``): with ``A = K + lambda I`` and ``alpha = A^-1 Y``, the residual of the
model refitted without sample i, at sample i, is exactly::

    y_i - f_{-i}(x_i) = alpha_i / (A^-1)_ii .

From ONE eigendecomposition ``K = U diag(s) U^T``: ``alpha = U diag(1/(s+lambda)) U^T Y`` and
``(A^-1)_ii = sum_j U_ij^2 / (s_j + lambda)``, so every lambda of a grid costs O(n^2 k), no
refit.  With ``groups`` (one label per sample, e.g. an image and its flipped copy in one
group) each group G is left out whole: ``Y_G - f_{-G}(X_G) = [(A^-1)_GG]^-1 alpha_G``, one
|G| x |G| solve per group from the same eigendecomposition (derivation in :func:`loo`).  ``kfold`` does k-fold cross-validation (one eigendecomposition per fold).
``select_ridge`` picks lambda on a grid by either; ``fit_relative_ridge`` (and
``fit_classifier``, which uses it) then fits at the lambda leave-one-out chose from the same
eigendecomposition (``fit_ridge_eigh``), with no second factorisation.

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
from ..arrays import available_gpu_memory, available_memory
from ..jobs.store import GramTooLarge, TrainTestKernels, load_gram, load_train_test
from .flow import gradient_flow
from .linalg import (KernelEigh, NotPositiveDefinite, check_gram, check_ridge, check_targets,
                     check_test_kernel, cholesky, constant_entries, eigh, ridge_scale,
                     rounding_of, solve_workspace)
from .ridge import (GPPosterior, RidgeSolution, fit_ridge, fit_ridge_eigh, gp_posterior,
                    kernel_ridge)
from .selection import (RELATIVE_RIDGE_GRID, ClassifierFit, CVResult, Groups, RidgeSelection,
                        check_classifier_labels, check_groups, evaluate_classifier, fit_classifier,
                        fit_relative_ridge, kfold, loo, select_ridge)
from .targets import accuracy, one_hot, paper_targets, predict_classes


__all__ = [
    "RELATIVE_RIDGE_GRID", "NotPositiveDefinite", "GramTooLarge", "check_gram", "check_targets",
    "check_test_kernel", "check_ridge", "ridge_scale", "one_hot", "paper_targets",
    "predict_classes", "accuracy", "cholesky", "RidgeSolution", "fit_ridge", "kernel_ridge",
    "KernelEigh", "eigh", "CVResult", "loo", "kfold", "RidgeSelection", "select_ridge",
    "gradient_flow", "GPPosterior", "gp_posterior", "available_memory", "available_gpu_memory",
    "evaluate_classifier", "fit_classifier", "ClassifierFit", "check_classifier_labels", "Groups", "check_groups",
    "load_gram", "load_train_test", "TrainTestKernels", "solve_workspace", "fit_ridge_eigh",
    "fit_relative_ridge", "constant_entries", "rounding_of",
]
