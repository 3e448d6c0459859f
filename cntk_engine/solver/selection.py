"""Choosing the ridge: exact leave-one-out from one eigendecomposition (also leaving out groups
of samples together), k-fold; a classifier's test accuracy with the ridge it chose
(:func:`evaluate_classifier`).

Groups.  ``groups`` (an (n,) array: one group label per training sample, as scikit-learn's
``LeaveOneGroupOut``) makes the samples of a group leave the training set together: the
flipped copy of an image (``augment_flips``) must not stay in the training set while its
original is scored, or leave-one-out scores a near-duplicate of a training sample and picks a
too small ridge.  :func:`loo` then computes leave-one-group-out in closed form, :func:`kfold`
keeps each group in one fold.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field

import numpy as np

from ..arrays import to_host
from .linalg import (EPS64, KernelEigh, NotPositiveDefinite, apart_from, as_eigh, block_rows,
                     brief_repr, check_gram, check_ridge, check_rounding, check_targets,
                     check_test_kernel, eigh, loaded_workspace, ridge_scale, scalar,
                     rounding_for, spectrum_problem, spectrum_tol, xp_for)
from .ridge import fit_ridge, fit_ridge_cholesky, fit_ridge_eigh
from .targets import (accuracy, check_labels, class_indices, one_hot, paper_targets,
                      predict_classes)

log = logging.getLogger("cntk_engine")

#: default ridge grid for :func:`select_ridge`, as multiples of the mean diagonal of K
RELATIVE_RIDGE_GRID = (0.0, 1e-8, 1e-7, 1e-6, 1e-5, 1e-4, 1e-3, 1e-2, 1e-1, 1.0)


@dataclass(repr=False)
class CVResult:
    """Scores of a ridge grid: ``mse[i]``, ``accuracy[i]`` (or None) for ``ridges[i]``; NaN where
    ``K + ridge I`` is singular or indefinite (``s_min``: K's smallest eigenvalue, LOO only)."""
    ridges: np.ndarray
    mse: np.ndarray
    accuracy: np.ndarray | None
    method: str
    predictions: list | None = None   # LOO predictions per ridge when asked (return_predictions):
                                      # (n,) or (n, k) as Y; None for a skipped ridge
    s_min: float | None = None        # smallest eigenvalue of K (LOO)
    s_max: float | None = None        # largest eigenvalue of K (LOO)
    tol: float | None = None          # eigenvalues within tol of 0 count as 0 (LOO)
    n_groups: int | None = None       # groups left out together (None: every sample alone)
    __repr__ = brief_repr


def _labels_vector(labels, n: int, k: int, one_d: bool = False):
    """``labels`` as an (n,) integer array of class columns of Y (0 <= label < k), or None."""
    if labels is None:
        return None
    if one_d or k < 2:
        got = "1-D Y" if one_d else f"Y with k = {k} column"
        raise ValueError(f"labels (for accuracy) need one-hot targets Y of shape (n, k >= 2), one "
                         f"column per class; got {got}. Encode the classes with paper_targets(y) "
                         "/ one_hot(y)")
    lab = to_host(labels)
    if lab.shape != (n,):
        raise ValueError(f"labels must be (n,) = ({n},) column indices of Y; got shape {lab.shape}")
    return class_indices(lab, k, "labels")


def _ridges(ridges) -> np.ndarray:
    what = ("ridges must be a non-empty 1-D list of numbers >= 0 (absolute: "
            "select_ridge(ridges=None) chooses from RELATIVE_RIDGE_GRID x mean(diag K))")
    if ridges is None or isinstance(ridges, (str, bytes)):
        raise ValueError(f"{what}; got {ridges!r}")
    try:
        r = np.atleast_1d(np.asarray(ridges, dtype=np.float64))
    except (TypeError, ValueError):
        raise ValueError(f"{what}; got {ridges!r}") from None
    if r.ndim != 1 or r.size == 0:
        raise ValueError(f"{what}; got {ridges!r}")
    for v in r:
        check_ridge(v, "every ridge")
    return r


@dataclass(frozen=True)
class Groups:
    """Checked ``groups`` (:func:`check_groups`): ``index`` (n,) the group number 0 <= g <
    ``n_groups`` of each sample; ``blocks``: for every group size s >= 2 present, an (m, s)
    array whose rows are the sample indices of one group of that size (ascending)."""
    index: np.ndarray
    n_groups: int
    blocks: tuple


def check_groups(groups, n: int) -> Groups | None:
    """``groups`` (None, or an (n,) array of one group label per training sample: any integers
    or strings, equal labels = one group; or :class:`Groups` of n samples) as :class:`Groups`;
    None for None.  Refused: another length, NaN or object labels, and a single group (leaving
    it out leaves nothing to fit)."""
    if groups is None:
        return None
    if isinstance(groups, Groups):           # checked already
        g = groups.index
        if g.shape == (n,):
            return groups
    else:
        g = to_host(groups)
    if isinstance(g, np.ndarray) and g.ndim == 2 and 1 in g.shape:
        g = g.ravel()
    g = np.asarray(g)
    if g.shape != (n,):
        raise ValueError(f"groups must be one group label per training sample, shape ({n},); got "
                         f"shape {g.shape}")
    if g.dtype.kind == "O":      # pandas' .to_numpy(): the kind its elements are all of
        from .targets import label_kind
        kind = label_kind(g)
        if kind in ("strings", "bytes"):
            g = g.astype("U" if kind == "strings" else "S")
        elif kind == "numbers":
            g = g.astype(np.float64)
    if g.dtype.kind == "f" and np.isnan(g).any():
        raise ValueError("groups must not hold NaN (one group label per training sample)")
    if g.dtype.kind not in "biufUS":
        raise ValueError(f"groups must hold integers or strings (group labels); got dtype {g.dtype}")
    _, index, sizes = np.unique(g, return_inverse=True, return_counts=True)
    index = index.reshape(n)
    if len(sizes) < 2:
        raise ValueError(f"groups puts all {n} samples in one group: leaving it out leaves nothing "
                         "to fit; give at least 2 groups")
    order = np.argsort(index, kind="stable")          # the samples of each group, group by group
    starts = np.concatenate([[0], np.cumsum(sizes)])
    blocks = []
    for size in np.unique(sizes[sizes >= 2]):
        which = np.nonzero(sizes == size)[0]
        blocks.append(np.stack([order[starts[k]:starts[k] + size] for k in which]))
    return Groups(index=index, n_groups=len(sizes), blocks=tuple(blocks))


def _inverse_diagonals(xp, U, W):
    """``(A_r^-1)_ii = sum_j U_ij^2 W_jr`` for every sample i and column r of ``W`` (``W_jr =
    1 / (s_j + lambda_r)``), by blocks of rows: no n x n temporary beside U."""
    out = xp.empty((U.shape[0], W.shape[1]), dtype=np.float64)
    step = block_rows(U.shape[0])
    for i in range(0, U.shape[0], step):
        a = U[i:i + step] * U[i:i + step]
        out[i:i + step] = a @ W
    return out


def _inverse_entries(xp, U, w, rows, cols):
    """``(A^-1)_{rows[t], cols[t]} = sum_j U_{rows[t], j} w_j U_{cols[t], j}`` for every t
    (``w = 1 / (s + lambda)``), by blocks of rows: temporaries stay small."""
    out = xp.empty(len(rows), dtype=np.float64)
    step = block_rows(U.shape[0])
    for i in range(0, len(rows), step):
        a = U[rows[i:i + step]]
        a *= w
        a *= U[cols[i:i + step]]
        out[i:i + step] = a.sum(axis=1)
    return out


def loo(K, Y, ridges, *, labels=None, groups=None, device=None,
        return_predictions: bool = False, rounding=None) -> CVResult:
    """Exact leave-one-out (or leave-one-group-out) errors for every ridge of ``ridges`` from
    ONE eigendecomposition.

    ``K``: the Gram or its :class:`KernelEigh`.  For ``A = K + lambda I``, ``alpha = A^-1 Y``:
    ``y_i - f_{-i}(x_i) = alpha_i / (A^-1)_ii`` (the model refitted without sample i).
    ``mse``: mean over samples of the squared LOO residual summed over outputs.  ``accuracy``
    (with ``labels``, the column index of each sample's class): argmax of the LOO predictions.
    A ridge with ``s_min + lambda <= tol``, :func:`~.linalg.spectrum_tol` (A singular to the
    rounding of K, or indefinite when below ``-tol``) scores NaN.  ``rounding``: the relative
    rounding of K's entries (float32's epsilon for a Gram computed in float32; None:
    float64's); a :class:`KernelEigh` carries its own.
    ``labels`` must be integers 0 <= label < k = Y.shape[1] (``np.searchsorted(classes, y)``
    with the ``classes`` of :func:`paper_targets`); raw class labels are refused.

    ``groups`` (:func:`check_groups`: one label per sample): the samples of a group G are left
    out together, and each is scored by the model refitted without all of G::

        Y_G - f_{-G}(X_G) = [(A^-1)_GG]^-1 alpha_G

    (a |G| x |G| solve per group; a group of one is the formula above).  Why: let beta be the
    dual coefficients of the fit without G, padded with zeros on G.  Then ``A beta`` is Y with
    ``Y_G`` replaced by ``f_{-G}(X_G)`` (rows outside G: ``(K_RR + lambda I) beta_R = Y_R``;
    rows in G: ``K_GR beta_R``), so ``alpha - beta = A^-1 (0; Y_G - f_{-G}(X_G))``, whose G rows
    are ``alpha_G = (A^-1)_GG (Y_G - f_{-G}(X_G))`` (``beta_G = 0``).  ``(A^-1)_GG`` is a
    principal block of a positive definite matrix, so invertible; its entries come from the
    same eigendecomposition, ``(A^-1)_ij = sum_k U_ik U_jk / (s_k + lambda)``.  ``mse`` and
    ``accuracy`` still average over all n samples."""
    if isinstance(K, KernelEigh):
        E, n, xp = as_eigh(K, None, rounding), K.n, K.xp
    else:
        rounding = check_rounding(rounding_for(K, rounding))
        xp = xp_for(device, K)
        dev = "cpu" if xp is np else "cuda"
        K = check_gram(K, device=dev, _workspace=loaded_workspace("eigh", dev))
        E, n = None, K.shape[0]
    if n < 2:           # every ridge would score the same: the fit without the sample is empty
        raise ValueError("leave-one-out (ridge selection) needs at least 2 training samples; got "
                         f"n_samples = {n}: give a fixed ridge instead")
    Y, one_d = check_targets(Y, n, xp=xp)
    lab = _labels_vector(labels, n, Y.shape[1], one_d)
    r = _ridges(ridges)
    grp = check_groups(groups, n)
    if E is None:      # inputs checked before the O(n^3) step
        E = eigh(K, device="cpu" if xp is np else "cuda", rounding=rounding, _overwrite=True)
        del K
    s, U = E.s, E.U
    blocks = [] if grp is None else [xp.asarray(b) for b in grp.blocks]
    UtY = U.T @ Y
    tol, s_min = spectrum_tol(E), scalar(s[0])       # s ascending
    solvable = [s_min + lam > tol for lam in r]
    W = xp.stack([1.0 / (s + lam) if ok else xp.zeros_like(s) for lam, ok in zip(r, solvable)],
                 axis=1)
    ainv_diags = _inverse_diagonals(xp, U, W)
    mse = np.full(len(r), np.nan)
    acc = None if lab is None else np.full(len(r), np.nan)
    preds = [] if return_predictions else None
    for i, lam in enumerate(r):
        if not solvable[i]:
            log.info("LOO: K + %g I is %s (smallest eigenvalue %.3g): skipped", lam,
                     spectrum_problem(s_min, lam, tol), s_min + lam)
            if preds is not None:
                preds.append(None)
            continue
        w = W[:, i]
        alpha = U @ (UtY / (s + lam)[:, None])
        ainv_diag = ainv_diags[:, i]
        resid = alpha / ainv_diag[:, None]
        for B in blocks:        # groups of |G| = size >= 2: resid_G = [(A^-1)_GG]^-1 alpha_G
            m, size = B.shape
            C = xp.empty((m, size, size), dtype=np.float64)
            for a in range(size):
                C[:, a, a] = ainv_diag[B[:, a]]
                for b in range(a + 1, size):
                    C[:, a, b] = C[:, b, a] = _inverse_entries(xp, U, w, B[:, a], B[:, b])
            resid[B] = xp.linalg.solve(C, alpha[B])
        mse[i] = scalar(xp.mean(xp.sum(resid * resid, axis=1)))
        pred = Y - resid
        if lab is not None:
            acc[i] = accuracy(pred, lab)
        if preds is not None:
            preds.append(pred[:, 0] if one_d else pred)
    return CVResult(ridges=r, mse=mse, accuracy=acc, method="loo", predictions=preds,
                    s_min=scalar(s[0]), s_max=scalar(s[-1]), tol=tol,
                    n_groups=None if grp is None else grp.n_groups)


def kfold(K, Y, ridges, n_folds: int = 5, *, labels=None, groups=None, seed=0,
          device=None, rounding=None) -> CVResult:
    """k-fold cross-validation of ridge regression for every ridge (one eigendecomposition of
    the training block per fold).  Folds: a seeded permutation split into ``n_folds`` parts.
    ``mse`` and ``accuracy`` are averaged over all held-out samples.  ``labels``: as for
    :func:`loo` (column indices of Y: ``np.searchsorted(classes, y)``).  ``groups``: as for
    :func:`loo`; the seeded permutation is of the groups, so a group is held out whole.
    ``rounding``: as for :func:`loo` (a fold's ridge is skipped by the same rule)."""
    rounding = check_rounding(rounding_for(K, rounding))
    xp = xp_for(device, K, Y)
    dev = "cpu" if xp is np else "cuda"
    K = check_gram(K, device=dev, _workspace=loaded_workspace("eigh", dev, by_n=False))
    n = K.shape[0]
    Y, one_d = check_targets(Y, n, xp=xp)
    lab = _labels_vector(labels, n, Y.shape[1], one_d)
    r = _ridges(ridges)
    grp = check_groups(groups, n)
    _check_folds(n_folds, n, grp)
    return _kfold(xp, K, Y, lab, r, n_folds, seed, grp, rounding)


def _check_folds(n_folds, n, grp=None):
    top, what = (n, "n") if grp is None else (grp.n_groups, "the number of groups")
    if isinstance(n_folds, bool) or not isinstance(n_folds, (int, np.integer)) or not 2 <= n_folds <= top:
        raise ValueError(f"n_folds must be an integer between 2 and {what} = {top}; got {n_folds!r}")


def _kfold(xp, K, Y, lab, r, n_folds, seed, grp=None, rounding=EPS64) -> CVResult:
    """k-fold on checked inputs (``K``: the checked symmetrised Gram, only read)."""
    n = K.shape[0]
    dev = "cpu" if xp is np else "cuda"
    perm = np.random.default_rng(seed).permutation(n if grp is None else grp.n_groups)
    sq = np.zeros(len(r))
    hits = np.zeros(len(r))
    singular = np.zeros(len(r), dtype=bool)
    for f in range(n_folds):
        val = np.sort(perm[f::n_folds]) if grp is None else \
            np.nonzero(np.isin(grp.index, perm[f::n_folds]))[0]
        tr = np.setdiff1d(np.arange(n), val)
        vi, ti = xp.asarray(val), xp.asarray(tr)
        # K[ix_(ti, ti)] is a new C-contiguous block (no K[ti] intermediate): decomposed in place
        E = eigh(K[xp.ix_(ti, ti)], device=dev, rounding=rounding, _overwrite=True)
        P = K[xp.ix_(vi, ti)] @ E.U
        UtY = E.U.T @ Y[ti]
        s, tol = E.s, spectrum_tol(E)
        del E      # U freed before the next fold's block is decomposed
        for i, lam in enumerate(r):
            d = s + lam
            if scalar(xp.min(d)) <= tol:
                singular[i] = True
                continue
            pred = P @ (UtY / d[:, None])
            sq[i] += scalar(xp.sum((pred - Y[vi]) ** 2))
            if lab is not None:
                hits[i] += accuracy(pred, lab[val]) * len(val)
    mse = np.where(singular, np.nan, sq / n)
    acc = None if lab is None else np.where(singular, np.nan, hits / n)
    return CVResult(ridges=r, mse=mse, accuracy=acc, method=f"{n_folds}-fold",
                    n_groups=None if grp is None else grp.n_groups)


@dataclass(repr=False)
class RidgeSelection:
    """The ridge chosen on a grid, with the scores of the whole grid."""
    ridge: float               # absolute lambda chosen
    relative: float            # ridge / mean(diag K)
    scores: CVResult
    score: str                 # "accuracy" or "mse"
    eigh: KernelEigh | None = field(default=None, repr=False)   # reusable (method "loo")
    unit: float = 1.0          # what ``relative`` is relative to: mean(diag K) (1 if not > 0)
    __repr__ = brief_repr

    def grid(self) -> dict:
        """The scores of the whole grid as plain numbers (a JSON record): ``ridge_relative``,
        ``mse`` and ``accuracy`` per ridge (None where the ridge was skipped: K + ridge I
        singular to K's rounding, or indefinite), and with leave-one-out K's extreme
        eigenvalues ``s_min``, ``s_max`` and the tolerance ``tol`` below which an eigenvalue of
        K + ridge I counts as rounding, all in units of ``unit``."""
        sc, u = self.scores, self.unit

        def numbers(a):
            return None if a is None else [float(v) if np.isfinite(v) else None for v in a]
        out = dict(ridge_relative=[float(r) / u for r in sc.ridges], mse=numbers(sc.mse),
                   accuracy=numbers(sc.accuracy))
        if sc.s_min is not None:
            out.update(s_min=sc.s_min / u, s_max=sc.s_max / u, tol=sc.tol / u)
        return out


def select_ridge(K, Y, ridges=None, *, method: str = "loo", score: str = "auto", labels=None,
                 groups=None, n_folds: int = 5, seed=0, device=None,
                 overwrite_k: bool = False, rounding=None) -> RidgeSelection:
    """Choose lambda on a grid by LOO (default; one eigendecomposition) or k-fold.

    ``ridges``: absolute values; default ``RELATIVE_RIDGE_GRID x mean(diag K)``.  ``score``:
    "accuracy" (needs ``labels``; ties broken by lower MSE, then by the larger ridge),
    "mse" (ties: larger ridge), or "auto" (accuracy when labels are given).  ``labels``: the
    column of Y of each sample's class, integers 0 <= label < k, i.e.
    ``np.searchsorted(classes, y)`` with ``Y, classes = paper_targets(y)`` (raw labels such
    as {1, 3, 7} or strings are refused: they would score every ridge wrongly).  ``groups``:
    one group label per sample; the samples of a group are left out together (leave-one-group-
    out, or whole groups per fold; see :func:`loo`), e.g. an image and its flipped copy.
    ``overwrite_k``: a C-contiguous, writeable float64 K is checked and decomposed in its own
    memory (on the CPU its eigenvectors are written over it; CuPy's eigh decomposes a copy of
    it: one copy of K less either way, :func:`solve_workspace`; K is given up, see
    :func:`~.linalg.check_gram`; a ``Y`` that is a view of K is copied first).
    ``rounding``: the relative rounding of K's entries (float32's epsilon for a Gram computed
    in float32; None: float64's): a ridge whose K + ridge I is singular to it is skipped
    (:func:`loo`); a :class:`KernelEigh` carries its own."""
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
        rounding = check_rounding(rounding_for(K, rounding))
    else:
        as_eigh(E, None, rounding)             # the rounding given is the one it carries
    xp = xp_for(device, K, Y) if E is None else E.xp
    dev = "cpu" if xp is np else "cuda"

    def the_rest(n):          # every input is checked before K is written and the O(n^3) step
        Yc, one_d = check_targets(Y, n, xp=xp)
        grp = check_groups(groups, n)
        if method == "kfold":
            _check_folds(n_folds, n, grp)
        return (Yc, _labels_vector(labels, n, Yc.shape[1], one_d),
                None if ridges is None else _ridges(ridges), grp)

    if E is None:
        Y = apart_from(K, Y, overwrite_k)
        K, (Y, lab, r, grp) = check_gram(
            K, device=dev, overwrite=overwrite_k, before_write=the_rest,
            _workspace=loaded_workspace("eigh", dev, by_n=method == "loo"))
        scale = ridge_scale(K)
    else:   # mean(diag K) = trace(K) / n = sum(s) / n
        Y, lab, r, grp = the_rest(E.n)
        scale = scalar(E.xp.sum(E.s)) / E.n
        scale = scale if scale > 0 else 1.0
    if r is None:
        r = _ridges(np.asarray(RELATIVE_RIDGE_GRID) * scale)
    from_gram = E is None              # (not from an eigendecomposition given)
    if method == "loo":
        if E is None:
            E = eigh(K, device=dev, rounding=rounding, _overwrite=True)  # K's copy becomes U
            del K
        res = loo(E, Y, r, labels=lab, groups=grp)
    else:
        res = _kfold(xp, K, Y, lab, r, n_folds, seed, grp, rounding)
    mse = np.where(np.isnan(res.mse), np.inf, res.mse)
    if not np.isfinite(mse).any():
        # a retry, as the messages suggest, needs the Gram again: the decomposition wrote over it
        retry = (" (K was given up, overwrite_k: the eigendecomposition may have written over "
                 "it; retry with the Gram as computed)"
                 if overwrite_k and from_gram and method == "loo" else "")
        if res.s_min is not None and res.s_min + max(res.ridges) < -res.tol:
            raise NotPositiveDefinite(
                f"K is indefinite: its smallest eigenvalue is {res.s_min:.3g} (largest "
                f"{res.s_max:.3g}), far below what rounding gives a positive semi-definite Gram, "
                f"so K + ridge I is indefinite for every ridge of the grid "
                f"[{', '.join(f'{v:.3g}' for v in res.ridges)}]; check that K is the "
                f"train-vs-train Gram matrix (a "
                f"kernel), or use ridges above {-res.s_min:.3g}", retry)
        what = ("singular or indefinite" if res.s_min is None else "indefinite or singular"
                if res.s_min + min(res.ridges) < -res.tol else "singular")
        raise NotPositiveDefinite(f"every ridge of the grid {res.ridges.tolist()} leaves K + "
                                  f"ridge I {what}"
                                  + (f" to the rounding of K: K's smallest eigenvalue is "
                                     f"{res.s_min:.3g}, and an eigenvalue of K + ridge I at or "
                                     f"below {res.tol:.3g} (spectrum_tol, for K's rounding "
                                     f"{E.rounding:.3g}) is taken as rounding"
                                     if res.s_min is not None else "")
                                  + "; use larger ridges", retry)
    r = res.ridges
    if score == "accuracy":
        acc = np.where(np.isnan(res.accuracy), -np.inf, res.accuracy)
        key = [(-acc[i], mse[i], -r[i]) for i in range(len(r))]
    else:
        key = [(mse[i], -r[i]) for i in range(len(r))]
    best = min(range(len(r)), key=lambda i: key[i])
    lam = float(r[best])
    log.info("%s ridge selection%s: ridge %.3g (%.3g x mean diagonal), %s", res.method,
             "" if res.n_groups is None else f" ({res.n_groups} groups left out whole)", lam,
             lam / scale,
             f"accuracy {res.accuracy[best]:.4f}" if score == "accuracy" else f"MSE {res.mse[best]:.4g}")
    return RidgeSelection(ridge=lam, relative=lam / scale, scores=res, score=score, unit=scale,
                          eigh=E if method == "loo" else None)


def fit_relative_ridge(K, Y, ridge, *, labels=None, groups=None, overwrite_k: bool = False,
                       rounding=None):
    """``(solution, selection)``: kernel ridge regression at ``ridge`` relative to mean(diag K)
    (a number >= 0; ``selection`` None), or, for ``"auto"``, at the ridge that exact
    leave-one-out chose (:func:`select_ridge` with ``labels``, ``groups``) on
    :data:`RELATIVE_RIDGE_GRID`, fitted from the eigendecomposition that chose it
    (:func:`~.ridge.fit_ridge_eigh`: no second factorisation, no jitter).  Memory beyond K:
    :func:`solve_workspace` of "eigh" for "auto", of "cholesky" for a number;
    ``overwrite_k``: K is given up (checked and factorised in its own memory), one copy less.
    ``rounding``: K's relative rounding (float32's epsilon for a float32 Gram): for the
    Cholesky of a given ridge (:func:`cholesky`), and the ridges "auto" skips (:func:`loo`)."""
    Y = apart_from(K, Y, overwrite_k)      # the fit reads Y after the eigendecomposition
    if isinstance(ridge, str):
        if ridge != "auto":
            raise ValueError(f"ridge must be 'auto' or a number >= 0 (relative to mean(diag K)); "
                             f"got {ridge!r}")
        sel = select_ridge(K, Y, labels=labels, groups=groups, method="loo",
                           overwrite_k=overwrite_k, rounding=rounding)
        return fit_ridge_eigh(sel.eigh, Y, sel.ridge), sel
    return fit_ridge_cholesky(K, Y, ridge, relative=True, overwrite_k=overwrite_k,
                              rounding=rounding), None


def _shape(a) -> tuple:
    return tuple(a.shape) if hasattr(a, "shape") else np.shape(a)


@dataclass(repr=False)
class ClassifierFit:
    """Kernel regression fitted as a classifier (:func:`fit_classifier`): the solution, the
    classes (the sorted training labels, one column of the targets each) and how the ridge was
    chosen (``info``: ridge_relative, ridge_absolute, jitter; with "auto" also loo_accuracy,
    loo_mse, ridge_selected_by, loo_groups and loo_grid, the scores of every ridge of the grid:
    :meth:`RidgeSelection.grid`)."""
    solution: object
    classes: np.ndarray
    info: dict
    Y: object = field(default=None, repr=False)          # the encoded training targets
    __repr__ = brief_repr

    def predict(self, K_test):
        """The predicted class of each test sample (a label of ``classes``), from the (m, n)
        test-vs-train kernel."""
        return predict_classes(self.solution.predict(K_test), self.classes)


def _check_classifier_options(ridge, targets: str):
    if targets not in ("paper", "onehot"):
        raise ValueError(f"targets must be 'paper' (0.9 / -0.1) or 'onehot' (1 / 0); got {targets!r}")
    if not (isinstance(ridge, str) and ridge == "auto"):
        ridge = check_ridge(ridge)
    return ridge


def _square_gram(K) -> int:
    shape = _shape(K)
    if len(shape) != 2 or shape[0] != shape[1]:
        raise ValueError(f"K must be the square (n, n) training Gram; got shape {shape}")
    return shape[0]


def fit_classifier(K, y_train, *, ridge="auto", targets: str = "paper", groups=None,
                   overwrite_k: bool = False, rounding=None) -> ClassifierFit:
    """Kernel regression on the training Gram ``K`` as a classifier of the labels ``y_train``
    (numbers, strings or bytes; at least 2 classes): targets "paper" (0.9 / -0.1,
    :func:`~.targets.paper_targets`) or "onehot"; ``ridge`` "auto" (chosen by exact
    leave-one-out accuracy over :data:`RELATIVE_RIDGE_GRID`, leaving ``groups`` out together)
    or a number >= 0 relative to mean(diag K) (:func:`fit_relative_ridge`).  ``overwrite_k``:
    K is given up, checked and factorised in its own memory (one copy of it less).
    ``rounding``: K's relative rounding (float32's epsilon for a float32 Gram; :func:`cholesky`).
    Predict with :meth:`ClassifierFit.predict`."""
    ridge = _check_classifier_options(ridge, targets)
    n_train = _square_gram(K)
    y_train = check_labels(y_train, n_train, "y_train")
    check_rounding(rounding)
    return _fit_classifier(K, y_train, ridge, targets, groups, overwrite_k, rounding)


def _targets(y_train, targets: str):
    """``(Y, classes)`` of the labels, at least 2 classes (ValueError otherwise)."""
    Y, classes = (paper_targets if targets == "paper" else one_hot)(y_train)
    if len(classes) < 2:
        raise ValueError(f"y_train holds one class only ({classes[:1].tolist()[0]!r}, {len(y_train)} "
                         "samples): a classifier needs at least 2")
    return Y, classes


def check_classifier_labels(y_train, y_test=None, *, targets: str = "paper"):
    """Labels for :func:`fit_classifier` checked before any kernel work: ``y_train`` one label
    per training sample, of one kind, at least 2 classes; ``y_test`` (optional) of its kind,
    warned of where it holds classes ``y_train`` lacks (no prediction can match them: the
    accuracy has that ceiling).  Returns ``(y_train, y_test, classes)``."""
    y_train = check_labels(y_train, len(y_train), "y_train")
    classes = _targets(y_train, targets)[1]
    if y_test is not None:
        y_test = check_labels(y_test, len(y_test), "y_test", like=y_train)
        unseen = ~np.isin(y_test, classes)
        if bool(unseen.any()):
            log.warning("%d of the %d test labels are of classes the training labels do not hold "
                        "(%s): no prediction can match them", int(unseen.sum()), len(y_test),
                        ", ".join(repr(v) for v in np.unique(y_test[unseen])[:10].tolist()))
    return y_train, y_test, classes


def _fit_classifier(K, y_train, ridge, targets: str, groups,
                    overwrite_k: bool = False, rounding=None) -> ClassifierFit:
    Y, classes = _targets(y_train, targets)
    groups = check_groups(groups, len(Y))        # checked with every ridge, used by "auto"
    labels = np.searchsorted(classes, y_train)
    sol, sel = fit_relative_ridge(K, Y, ridge, labels=labels, groups=groups,
                                  overwrite_k=overwrite_k, rounding=rounding)
    if sel is not None:
        i = int(np.nonzero(sel.scores.ridges == sel.ridge)[0][0])
        info = dict(ridge_relative=sel.relative, loo_accuracy=float(sel.scores.accuracy[i]),
                    loo_mse=float(sel.scores.mse[i]), ridge_selected_by="loo",
                    loo_groups=sel.scores.n_groups, loo_grid=sel.grid())
    else:
        info = dict(ridge_relative=ridge)
    info.update(ridge_absolute=sol.ridge, jitter=sol.jitter)
    return ClassifierFit(sol, classes, info, Y)


def evaluate_classifier(K, K_test, y_train, y_test, *, ridge="auto", targets: str = "paper",
                        groups=None, warn_unseen: bool = True, rounding=None) -> dict:
    """Test accuracy of kernel regression as a classifier, with its ridge.

    ``K``: the train Gram, ``K_test``: test-vs-train, ``y_train`` / ``y_test``: labels of one
    kind (numbers, strings or bytes; object arrays of one such kind too), ``y_test`` of the kind
    of ``y_train``, at least 2 classes in ``y_train`` (ValueError otherwise).  Targets: "paper"
    (0.9 / -0.1, :func:`~.targets.paper_targets`) or "onehot".
    ``ridge``: "auto" (chosen by exact leave-one-out accuracy over
    :data:`RELATIVE_RIDGE_GRID`) or a number >= 0 relative to mean(diag K).  ``groups``: one
    group label per training sample, left out together by "auto" (:func:`loo`); a training set
    with flipped copies must pass them, e.g. ``np.tile(np.arange(n), 2)`` for
    ``concatenate([x, hflip(x)])``, or LOO scores each image with its mirror still in the
    training set.  Returns a dict: accuracy, ridge_relative, ridge_absolute, jitter; with
    "auto" also loo_accuracy, loo_mse, loo_groups (the number of groups, None without) and
    loo_grid (every ridge's scores and K's spectrum: :meth:`RidgeSelection.grid`); unless
    ``ridge`` is the number 0, accuracy_ridge0 and jitter_ridge0 of the paper's
    interpolating solve beside it (where "auto" chose 0, the chosen fit's figures: it is that
    solve, from the eigendecomposition), or, where K is too far from positive definite for
    that solve even with jitter (the ridge chosen still solves), accuracy_ridge0 None and the
    reason in ridge0_error.  ``warn_unseen=False``: test labels of classes ``y_train`` lacks
    are not warned about (a caller that evaluates several kernels of the same labels warns
    once, with :func:`check_classifier_labels`).  ``rounding``: K's relative rounding
    (float32's epsilon for a float32 Gram; :func:`cholesky`).  (:func:`fit_classifier` is the
    fit alone, for predictions.)"""
    ridge = _check_classifier_options(ridge, targets)
    n_train = _square_gram(K)
    shape_test = _shape(K_test)
    y_train = check_labels(y_train, n_train, "y_train")
    if len(shape_test) != 2 or shape_test[1] != n_train:
        raise ValueError(f"K_test must be (m, n) = (test samples, {n_train} training samples); "
                         f"got shape {shape_test}")
    y_test = check_labels(y_test, shape_test[0], "y_test", like=y_train)
    xp = xp_for(None, K, K_test)
    K_test = check_test_kernel(K_test, n_train, xp=xp)      # before the O(n^3) work
    check_rounding(rounding)
    if warn_unseen:
        check_classifier_labels(y_train, y_test, targets=targets)
    fit = _fit_classifier(K, y_train, ridge, targets, groups, rounding=rounding)
    out = {k: v for k, v in fit.info.items() if k not in ("ridge_absolute", "jitter")}
    out.update(accuracy=accuracy(fit.predict(K_test), y_test),
               ridge_absolute=fit.info["ridge_absolute"], jitter=fit.info["jitter"])
    if ridge == "auto" and fit.info["ridge_absolute"] == 0:     # the chosen fit is that solve
        out.update(accuracy_ridge0=out["accuracy"], jitter_ridge0=0.0)
    elif ridge == "auto" or ridge != 0:
        try:
            sol0 = fit_ridge(K, fit.Y, 0.0, rounding=rounding)
        except NotPositiveDefinite as e:       # the side figure only: the chosen ridge solved
            out.update(accuracy_ridge0=None, jitter_ridge0=None, ridge0_error=str(e))
        else:
            out.update(accuracy_ridge0=accuracy(predict_classes(sol0.predict(K_test), fit.classes),
                                                y_test),
                       jitter_ridge0=sol0.jitter)
    return out
