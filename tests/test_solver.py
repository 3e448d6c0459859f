"""Solver: ridge vs numpy/scipy, LOO vs refits, k-fold, gradient flow, GP posterior, jitter,
bad input, Zarr loading, CuPy."""
import logging
import re

import numpy as np
import pytest
import scipy.linalg

from cntk_engine import solver as S


def psd(rng, n, p=None, scale=1.0):
    """A PD Gram from a random feature map Phi (n x p), p >= n by default."""
    phi = rng.normal(size=(n, p or n + 5))
    return scale * phi @ phi.T, phi


@pytest.fixture
def rng():
    return np.random.default_rng(0)


# ----------------------------------------------------------------------------- ridge
@pytest.mark.parametrize("ridge", [0.0, 1e-3, 2.5])
def test_ridge_matches_numpy_solve(rng, ridge):
    K, phi = psd(rng, 30)
    Kt = rng.normal(size=(7, phi.shape[1])) @ phi.T
    Y = rng.normal(size=(30, 4))
    sol = S.fit_ridge(K, Y, ridge)
    alpha = np.linalg.solve(K + ridge * np.eye(30), Y)
    np.testing.assert_allclose(sol.alpha, alpha, rtol=1e-8, atol=1e-10)
    np.testing.assert_allclose(sol.predict(Kt), Kt @ alpha, rtol=1e-8, atol=1e-10)
    np.testing.assert_allclose(S.kernel_ridge(K, Y, Kt, ridge), Kt @ alpha, rtol=1e-8, atol=1e-10)
    assert sol.jitter == 0.0 and sol.ridge == ridge
    # 1-D targets in, 1-D predictions out; same as column 0 of the multi-output solve
    p1 = S.kernel_ridge(K, Y[:, 0], Kt, ridge)
    assert p1.shape == (7,)
    np.testing.assert_allclose(p1, Kt @ alpha[:, 0], rtol=1e-8, atol=1e-10)


def test_float32_gram_solved_in_float64(rng):
    K, _ = psd(rng, 20)
    K32 = K.astype(np.float32)
    Y = rng.normal(size=(20, 2))
    sol = S.fit_ridge(K32, Y, 0.0)
    assert sol.alpha.dtype == np.float64
    np.testing.assert_allclose(sol.alpha, np.linalg.solve(K32.astype(np.float64), Y), rtol=1e-8)
    # asymmetry at float32 rounding level is accepted (and symmetrised)
    Kp = K32.copy()
    Kp[0, 1] *= 1 + 1e-7
    S.fit_ridge(Kp, Y, 0.0)


def test_known_feature_map_interpolant(rng):
    """K = Phi Phi^T (PD, p > n) and y = Phi w with w in the row space of Phi: the interpolant
    (minimum-norm solution in feature space) is exactly f(x) = phi(x) . w."""
    n, p = 25, 40
    phi = rng.normal(size=(n, p))
    w = phi.T @ rng.normal(size=n)
    phi_test = rng.normal(size=(9, p))
    pred = S.kernel_ridge(phi @ phi.T, phi @ w, phi_test @ phi.T, 0.0)
    np.testing.assert_allclose(pred, phi_test @ w, rtol=1e-7, atol=1e-8)
    # and with a polynomial feature map of scalars: phi(x) = (1, x, x^2, x^3), n = 4 points,
    # any cubic is interpolated exactly and reproduced everywhere
    x = np.array([-1.0, -0.3, 0.4, 1.2])
    feats = lambda v: np.stack([np.ones_like(v), v, v ** 2, v ** 3], axis=1)  # noqa: E731
    cubic = lambda v: 2 - v + 0.5 * v ** 2 - 3 * v ** 3  # noqa: E731
    xt = np.linspace(-2, 2, 11)
    F = feats(x)
    pred = S.kernel_ridge(F @ F.T, cubic(x), feats(xt) @ F.T, 0.0)
    np.testing.assert_allclose(pred, cubic(xt), rtol=1e-7, atol=1e-7)


# ----------------------------------------------------------------------------- jitter
def test_a_float32_gram_is_held_to_float32_rounding_whatever_rounding_says():
    """K given as float32 holds float32's rounding: rounding=None (float64's) or a smaller one
    is raised to it (it was solved as float64: one image twice got 1e-10 of jitter, predictions
    194 away from float64's); a KernelEigh keeps its own; a float64 K keeps what was given."""
    from cntk_engine.solver import linalg
    eps32 = float(np.finfo(np.float32).eps)
    K32 = np.ones((2, 2), np.float32)
    assert linalg.rounding_for(K32, None) == eps32 and linalg.rounding_for(K32, 1e-10) == eps32
    assert linalg.rounding_for(K32, 1e-3) == 1e-3 and linalg.rounding_for(K32.astype(np.float64), None) is None
    assert linalg.rounding_for(np.ones((2, 2), np.float16), None) == float(np.finfo(np.float16).eps)
    assert linalg.rounding_for([[1.0]], None) is None
    assert S.fit_ridge(K32, np.array([1.0, -1.0]), 0.0).jitter == pytest.approx(1e-6)
    assert S.fit_ridge(K32.astype(np.float64), np.array([1.0, -1.0]), 0.0).jitter == pytest.approx(1e-10)
    assert S.eigh(K32).rounding == eps32 and S.eigh(K32.astype(np.float64)).rounding == linalg.EPS64
    E = S.eigh(K32.astype(np.float64))
    assert S.loo(E, np.array([1.0, -1.0]), [1e-3]).mse.shape == (1,)    # carries its own


def test_entries_near_float64s_largest_are_symmetrised_without_overflow():
    """(a + b) / 2 overflowed to inf inside an accepted, finite K (then 'Eigenvalues did not
    converge'); halves first, and the finiteness check's overflowing sum says nothing."""
    import warnings
    from cntk_engine.solver import linalg
    K = np.array([[1.5e308, 1e308, 0], [1e308, 1.5e308, 0], [0, 0, 1.7e308]])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        C = linalg.check_gram(K)
    assert np.array_equal(C, K)


def test_jitter_path_rank_deficient(rng, caplog):
    K, _ = psd(rng, 20, p=5)             # rank 5 < 20: singular
    Y = rng.normal(size=(20, 3))
    with caplog.at_level(logging.WARNING, logger="cntk_engine"):
        sol = S.fit_ridge(K, Y, 0.0)
    assert sol.jitter > 0
    assert "added jitter" in caplog.text
    # the reported jitter is what was solved with: small backward error for K + jitter I
    A = K + sol.jitter * np.eye(20)
    resid = np.linalg.norm(A @ sol.alpha - Y)
    assert resid <= 1e-10 * np.linalg.norm(A, 2) * np.linalg.norm(sol.alpha)
    assert np.linalg.norm((K + 1.1 * sol.jitter * np.eye(20)) @ sol.alpha - Y) > 100 * resid
    rel = sol.jitter / S.ridge_scale(K)
    assert 1e-11 * K.diagonal().min() / S.ridge_scale(K) <= rel <= 1e-3 * 1.01    # from 1e-10 of it
    with pytest.raises(S.NotPositiveDefinite, match="jitter=False"):
        S.fit_ridge(K, Y, 0.0, jitter=False)


def test_jitter_fails_on_indefinite_matrix():
    K = np.diag([1.0, 2.0, -1.0])
    with pytest.raises(S.NotPositiveDefinite, match="not positive definite even with jitter.*smallest eigenvalue is -1"):
        S.fit_ridge(K, np.ones(3), 0.0)
    with pytest.raises(S.NotPositiveDefinite, match=r"K's smallest eigenvalue is -2 \(largest 2\), so "
                                                    r"K \+ 0.5 I's is -1.5"):
        S.fit_ridge(np.diag([1.0, 2.0, -2.0]), np.ones(3), 0.5)
    # a ridge large enough makes it PD
    sol = S.fit_ridge(K, np.ones(3), 2.0)
    np.testing.assert_allclose(sol.alpha[:, 0], 1 / np.array([3.0, 4.0, 1.0]))


# ----------------------------------------------------------------------------- bad input
def test_bad_inputs(rng):
    K, _ = psd(rng, 6)
    Y = rng.normal(size=(6, 2))
    with pytest.raises(ValueError, match=r"square \(n, n\).*\(6, 5\)"):
        S.fit_ridge(K[:, :5], Y)
    with pytest.raises(ValueError, match="5 rows but K is 6 x 6"):
        S.fit_ridge(K, Y[:5])
    with pytest.raises(ValueError, match="Y must be"):
        S.fit_ridge(K, np.zeros((6, 2, 2)))
    Kn = K.copy()
    Kn[2, 3] = np.nan
    with pytest.raises(ValueError, match=r"K has 1 NaN or Inf entry \(first at index \(2, 3\)\)"):
        S.fit_ridge(Kn, Y)
    Yn = Y.copy()
    Yn[4, 1] = np.inf
    with pytest.raises(ValueError, match="Y has 1 NaN or Inf"):
        S.fit_ridge(K, Yn)
    Ka = K.copy()
    Ka[0, 1] += 0.1 * np.abs(K).max()
    with pytest.raises(ValueError, match="not symmetric"):
        S.fit_ridge(Ka, Y)
    with pytest.raises(ValueError, match="ridge must be a finite number >= 0"):
        S.fit_ridge(K, Y, -1e-3)
    with pytest.raises(ValueError, match="ridge must be a number"):
        S.fit_ridge(K, Y, "big")
    with pytest.raises(ValueError, match=r"ridge must be a number >= 0 \(0 = interpolation\); got np.complex128"):
        S.fit_ridge(K, Y, np.complex128(0.1 + 2j))       # float() would drop the 2j
    with pytest.raises(ValueError, match=r"ridge must be a finite number >= 0 \(0 = interpolation\); got 1000000"):
        S.fit_ridge(K, Y, 10 ** 400)                      # float() raises OverflowError
    sol = S.fit_ridge(K, Y, 0.1)
    with pytest.raises(ValueError, match="n = 6 columns"):
        sol.predict(np.zeros((3, 5)))
    with pytest.raises(ValueError, match="every ridge must be"):
        S.loo(K, Y, [0.1, -1.0])
    with pytest.raises(ValueError, match="t must be a time >= 0"):
        S.gradient_flow(K, Y, -1.0)
    with pytest.raises(ValueError, match="eta"):
        S.gradient_flow(K, Y, 1.0, eta=0)
    with pytest.raises(ValueError, match="not a positive semi-definite kernel"):
        S.gradient_flow(np.diag([1.0, -0.5]), np.ones(2), 1.0)
    with pytest.raises(ValueError, match="noise must be a finite number >= 0"):
        S.gp_posterior(K, Y, K[:2], noise=-1)
    with pytest.raises(ValueError, match=r"\(2, 2\) test-test kernel"):
        S.gp_posterior(K, Y, K[:2], np.eye(3))
    with pytest.raises(ValueError, match="device must be one of"):
        S.fit_ridge(K, Y, device="tpu")
    with pytest.raises(ValueError, match="n_folds"):
        S.kfold(K, Y, [0.1], n_folds=1)
    with pytest.raises(ValueError, match="needs labels"):
        S.select_ridge(K, Y, score="accuracy")


# ----------------------------------------------------------------------------- classification helpers
def test_targets_and_accuracy():
    y = np.array([3, 1, 3, 7])
    Y, classes = S.paper_targets(y)
    assert classes.tolist() == [1, 3, 7]
    np.testing.assert_allclose(Y, [[-0.1, 0.9, -0.1], [0.9, -0.1, -0.1], [-0.1, 0.9, -0.1], [-0.1, -0.1, 0.9]])
    Y1, _ = S.one_hot(y)
    np.testing.assert_array_equal(Y1, Y + 0.1 > 0.5)
    assert S.predict_classes(Y, classes).tolist() == y.tolist()
    assert S.accuracy(Y, np.array([1, 0, 1, 0])) == 0.75   # argmax columns [1, 0, 1, 2]
    assert S.accuracy(np.array([3, 1, 0, 7]), y) == 0.75
    with pytest.raises(ValueError, match=r"the predictions hold strings \(<U1\) but the labels bytes "
                                         r"\(\|S1\): no label could match \(decode the bytes"):
        S.accuracy(np.array(["a", "b"]), np.array([b"a", b"b"]))      # 'a' != b'a': not 0.0
    with pytest.raises(ValueError, match="the predictions hold numbers .* but the labels strings"):
        S.accuracy(np.array([1, 2]), np.array(["1", "2"]))
    with pytest.raises(ValueError, match=r"labels \[5\] are not among the classes \[1, 3, 7\]"):
        S.one_hot(np.array([1, 5]), classes)
    strings, cl = S.one_hot(np.array(["b", "a", "b"]))
    assert cl.tolist() == ["a", "b"] and strings.argmax(1).tolist() == [1, 0, 1]


# ----------------------------------------------------------------------------- LOO / k-fold
def brute_loo(K, Y, lam):
    n = len(K)
    res = np.zeros_like(Y)
    for i in range(n):
        m = np.arange(n) != i
        a = np.linalg.solve(K[np.ix_(m, m)] + lam * np.eye(n - 1), Y[m])
        res[i] = Y[i] - K[i, m] @ a
    return res


def test_loo_equals_brute_force_refits(rng):
    n = 24
    K, _ = psd(rng, n)
    labels = rng.integers(0, 3, size=n)
    Y, _ = S.paper_targets(labels)
    ridges = [0.0, 1e-2, 0.5, 10.0]
    res = S.loo(K, Y, ridges, labels=labels, return_predictions=True)
    for i, lam in enumerate(ridges):
        r = brute_loo(K, Y, lam)
        np.testing.assert_allclose(Y - res.predictions[i], r, rtol=1e-6, atol=1e-8)
        np.testing.assert_allclose(res.mse[i], np.mean(np.sum(r ** 2, axis=1)), rtol=1e-6)
        assert res.accuracy[i] == np.mean((Y - r).argmax(1) == labels)
    # the eigendecomposition can be reused: same numbers
    E = S.eigh(K)
    np.testing.assert_allclose(S.loo(E, Y, ridges).mse, res.mse, rtol=1e-12)


def test_loo_skips_singular_ridge(rng):
    K, _ = psd(rng, 12, p=4)
    res = S.loo(K, rng.normal(size=12), [0.0, 1.0])
    assert np.isnan(res.mse[0]) and np.isfinite(res.mse[1])


def test_kfold_equals_brute_force(rng):
    n = 20
    K, _ = psd(rng, n)
    labels = rng.integers(0, 2, size=n)
    Y, _ = S.one_hot(labels)
    ridges = [0.0, 0.3]
    res = S.kfold(K, Y, ridges, n_folds=4, labels=labels, seed=3)
    perm = np.random.default_rng(3).permutation(n)
    for i, lam in enumerate(ridges):
        sq, hits = 0.0, 0
        for f in range(4):
            val = np.sort(perm[f::4])
            tr = np.setdiff1d(np.arange(n), val)
            a = np.linalg.solve(K[np.ix_(tr, tr)] + lam * np.eye(len(tr)), Y[tr])
            pred = K[np.ix_(val, tr)] @ a
            sq += np.sum((pred - Y[val]) ** 2)
            hits += np.sum(pred.argmax(1) == labels[val])
        np.testing.assert_allclose(res.mse[i], sq / n, rtol=1e-8)
        np.testing.assert_allclose(res.accuracy[i], hits / n)


def brute_lgo(K, Y, lam, groups):
    """Y_G - f_{-G}(X_G) for every group G: refitted without all of G."""
    res = np.zeros_like(Y)
    for g in np.unique(groups):
        G = groups == g
        a = np.linalg.solve(K[np.ix_(~G, ~G)] + lam * np.eye(int((~G).sum())), Y[~G])
        res[G] = Y[G] - K[np.ix_(G, ~G)] @ a
    return res


def test_leave_one_group_out_equals_brute_force_refits(rng):
    """loo(groups=...) is exact leave-one-group-out: each group's residuals are those of the
    model refitted without the whole group, to 1e-10 (groups of 1, 2, 3 and 4 samples, labels
    in any order; ridge 0 included), the same through select_ridge; singletons are plain LOO."""
    n = 21
    K, _ = psd(rng, n)
    labels = rng.integers(0, 3, size=n)
    Y, _ = S.paper_targets(labels)
    groups = np.array([7, 7, 3, 3, 3, 0, 5, 5, 9, 9, 9, 9, 1, 2, 2, 4, 6, 6, 8, 8, 10])
    rng.shuffle(groups)
    ridges = [0.0, 1e-2, 0.5, 10.0]
    res = S.loo(K, Y, ridges, labels=labels, groups=groups, return_predictions=True)
    assert res.n_groups == 11
    for i, lam in enumerate(ridges):
        r = brute_lgo(K, Y, lam, groups)
        np.testing.assert_allclose(Y - res.predictions[i], r, rtol=0, atol=1e-10 * np.abs(r).max())
        np.testing.assert_allclose(res.mse[i], np.mean(np.sum(r ** 2, axis=1)), rtol=1e-10)
        assert res.accuracy[i] == np.mean((Y - r).argmax(1) == labels)
    # 1-D targets, an eigendecomposition passed in, string labels: the same
    E = S.eigh(K)
    one = S.loo(E, Y[:, 0], ridges, groups=groups.astype(str), return_predictions=True)
    assert one.predictions[2].shape == (n,)        # as Y: 1-D
    np.testing.assert_allclose(one.predictions[2], Y[:, 0] - brute_lgo(K, Y, 0.5, groups)[:, 0],
                               rtol=0, atol=1e-10)
    # object arrays (pandas' .to_numpy()) of strings or of integers: the same groups
    for obj in (groups.astype(str).astype(object), groups.astype(object)):
        np.testing.assert_array_equal(S.loo(E, Y[:, 0], ridges, groups=obj).mse, one.mse)
    # every group of one: exactly the leave-one-out
    np.testing.assert_allclose(S.loo(K, Y, ridges, groups=np.arange(n)).mse, S.loo(K, Y, ridges).mse,
                               rtol=1e-12)
    sel = S.select_ridge(K, Y, ridges, labels=labels, groups=groups)
    np.testing.assert_array_equal(sel.scores.mse, res.mse)


def test_leave_group_out_with_flipped_copies(rng):
    """The case it is for: a training set of images and their mirror copies, K of the doubled
    set.  Plain LOO scores each image with its near-twin still in the training set, so it is
    optimistic and prefers a too small ridge; grouping each image with its copy gives the
    refits without both."""
    n = 12
    phi = rng.normal(size=(n, 30))
    twin = phi + 0.05 * rng.normal(size=phi.shape)       # the "flipped" copies: near-duplicates
    F = np.concatenate([phi, twin])
    K = F @ F.T
    y = rng.normal(size=n)
    Y = np.concatenate([y, y])
    groups = np.tile(np.arange(n), 2)
    lam = 1e-3
    plain = S.loo(K, Y, [lam]).mse[0]
    grouped = S.loo(K, Y, [lam], groups=groups).mse[0]
    np.testing.assert_allclose(grouped, np.mean(brute_lgo(K, Y[:, None], lam, groups) ** 2), rtol=1e-10)
    assert plain < 0.1 * grouped                 # the twin answers for its original


def test_groups_kfold_and_bad_groups(rng):
    """kfold keeps every group in one fold (the permutation is of the groups); bad groups are
    refused naming what is accepted."""
    n = 16
    K, _ = psd(rng, n)
    Y = rng.normal(size=(n, 2))
    groups = np.repeat(np.arange(8), 2)
    res = S.kfold(K, Y, [0.1], n_folds=4, groups=groups, seed=2)
    perm = np.random.default_rng(2).permutation(8)
    sq = 0.0
    for f in range(4):
        val = np.nonzero(np.isin(groups, perm[f::4]))[0]
        tr = np.setdiff1d(np.arange(n), val)
        a = np.linalg.solve(K[np.ix_(tr, tr)] + 0.1 * np.eye(len(tr)), Y[tr])
        sq += np.sum((K[np.ix_(val, tr)] @ a - Y[val]) ** 2)
    np.testing.assert_allclose(res.mse[0], sq / n, rtol=1e-10)
    assert res.n_groups == 8
    with pytest.raises(ValueError, match=r"n_folds must be an integer between 2 and the number of groups = 8"):
        S.kfold(K, Y, [0.1], n_folds=9, groups=groups)
    with pytest.raises(ValueError, match=r"groups must be one group label per training sample, shape \(16,\)"):
        S.loo(K, Y, [0.1], groups=groups[:8])
    with pytest.raises(ValueError, match="all 16 samples in one group"):
        S.select_ridge(K, Y, groups=np.zeros(n))
    with pytest.raises(ValueError, match="must not hold NaN"):
        S.loo(K, Y, [0.1], groups=np.full(n, np.nan))
    with pytest.raises(ValueError, match="integers or strings"):
        S.loo(K, Y, [0.1], groups=np.array([object()] * n))
    with pytest.raises(ValueError, match="all 16 samples in one group"):    # checked with a fixed ridge too
        S.evaluate_classifier(K, K[:3], np.arange(n) % 2, np.arange(3) % 2, ridge=0.1,
                              groups=np.zeros(n))


def test_evaluate_classifier_passes_groups(rng):
    n = 14
    K, _ = psd(rng, n)
    y = np.arange(n) % 3
    groups = np.repeat(np.arange(7), 2)
    Y, classes = S.paper_targets(y)
    r = S.evaluate_classifier(K, K[:4], y, y[:4], groups=groups)
    sel = S.select_ridge(K, Y, labels=np.searchsorted(classes, y), groups=groups)
    assert r["loo_groups"] == 7 and r["ridge_absolute"] == sel.ridge
    assert r["loo_accuracy"] == sel.scores.accuracy[list(sel.scores.ridges).index(sel.ridge)]
    assert S.evaluate_classifier(K, K[:4], y, y[:4])["loo_groups"] is None
    # the whole grid's scores, in units of the mean diagonal, None where a ridge was skipped
    g = r["loo_grid"]
    scale = np.trace(K) / n
    np.testing.assert_allclose(g["ridge_relative"], S.RELATIVE_RIDGE_GRID, rtol=1e-12)
    np.testing.assert_allclose(np.array(g["accuracy"], dtype=float), sel.scores.accuracy)
    np.testing.assert_allclose(g["s_min"] * scale, np.linalg.eigvalsh(K)[0], atol=1e-9 * scale)
    assert g["tol"] * scale == pytest.approx(sel.scores.tol)
    Ks, _ = psd(rng, n, p=4)                            # rank 4: ridge 0 skipped
    gs = S.evaluate_classifier(Ks, Ks[:4], y, y[:4])["loo_grid"]
    assert gs["mse"][0] is None and gs["accuracy"][0] is None and gs["mse"][-1] > 0
    import json
    assert json.loads(json.dumps(gs, allow_nan=False)) == gs     # plain JSON, no NaN


def test_select_ridge(rng):
    n = 40
    x = rng.uniform(-2, 2, size=(n, 1))
    K = np.exp(-(x - x.T) ** 2)                 # smooth kernel, noisy targets: a ridge helps
    y = np.sin(2 * x[:, 0]) + 0.3 * rng.normal(size=n)
    sel = S.select_ridge(K, y)
    grid = np.asarray(S.RELATIVE_RIDGE_GRID) * np.mean(np.diag(K))
    mse = [np.mean(brute_loo(K, y[:, None], lam) ** 2) if lam > 0 else np.inf for lam in grid]
    assert sel.ridge == pytest.approx(grid[int(np.argmin(mse))])
    assert sel.ridge > 0 and sel.score == "mse" and sel.relative == pytest.approx(sel.ridge)
    assert sel.eigh is not None
    kf = S.select_ridge(K, y, method="kfold", n_folds=5)
    assert kf.scores.method == "5-fold" and kf.ridge > 0
    labels = (y > 0).astype(int)
    acc = S.select_ridge(K, S.one_hot(labels)[0], labels=labels)
    assert acc.score == "accuracy" and np.nanmax(acc.scores.accuracy) == acc.scores.accuracy[
        list(acc.scores.ridges).index(acc.ridge)]


# ----------------------------------------------------------------------------- gradient flow
def test_gradient_flow(rng):
    n = 15
    K, phi = psd(rng, n)
    Kt = rng.normal(size=(6, phi.shape[1])) @ phi.T
    Y = rng.normal(size=(n, 2))
    ridge0 = np.linalg.solve(K, Y)
    smin = np.linalg.eigvalsh(K)[0]
    # t = inf and large t: the ridge-0 (interpolating) solution
    np.testing.assert_allclose(S.gradient_flow(K, Y, np.inf, K_test=Kt), Kt @ ridge0, rtol=1e-7, atol=1e-9)
    big = 60.0 / smin
    np.testing.assert_allclose(S.gradient_flow(K, Y, big, K_test=Kt), Kt @ ridge0, rtol=1e-7, atol=1e-9)
    np.testing.assert_allclose(S.gradient_flow(K, Y, big), Y, rtol=1e-7, atol=1e-9)
    # finite t against the matrix exponential
    eta, t = 0.3, 2.0 / np.linalg.eigvalsh(K)[-1] * 5
    expm = scipy.linalg.expm(-eta * t * K)
    want_test = Kt @ np.linalg.solve(K, (np.eye(n) - expm) @ Y)
    want_train = (np.eye(n) - expm) @ Y
    np.testing.assert_allclose(S.gradient_flow(K, Y, t, K_test=Kt, eta=eta), want_test, rtol=1e-7, atol=1e-9)
    np.testing.assert_allclose(S.gradient_flow(K, Y, t, eta=eta), want_train, rtol=1e-7, atol=1e-9)
    # t = 0: nothing learned; several times from one decomposition; 1-D targets
    E = S.eigh(K)
    out = S.gradient_flow(E, Y[:, 0], [0.0, t, np.inf], K_test=Kt, eta=eta)
    assert out.shape == (3, 6)
    np.testing.assert_allclose(out[0], 0.0, atol=1e-12)
    np.testing.assert_allclose(out[1], want_test[:, 0], rtol=1e-7, atol=1e-9)
    np.testing.assert_allclose(out[2], Kt @ ridge0[:, 0], rtol=1e-7, atol=1e-9)


def test_gradient_flow_singular_gram_min_norm(rng):
    """A rank-deficient K (p < n): the null directions are never trained; t = inf gives the
    minimum-norm least-squares fit in feature space, i.e. K_test K^+ Y."""
    K, phi = psd(rng, 12, p=4)
    Kt = rng.normal(size=(3, 4)) @ phi.T
    Y = rng.normal(size=12)
    np.testing.assert_allclose(S.gradient_flow(K, Y, np.inf, K_test=Kt), Kt @ np.linalg.pinv(K) @ Y,
                               rtol=1e-6, atol=1e-8)


# ----------------------------------------------------------------------------- GP
@pytest.mark.parametrize("noise", [0.0, 0.05])
def test_gp_posterior(rng, noise):
    n, m = 18, 5
    feats = rng.normal(size=(n + m, n + m + 3))
    Kall = feats @ feats.T
    K, Kt, Ktt = Kall[:n, :n], Kall[n:, :n], Kall[n:, n:]
    Y = rng.normal(size=(n, 3))
    post = S.gp_posterior(K, Y, Kt, Ktt, noise=noise)
    A = K + noise * np.eye(n)
    np.testing.assert_allclose(post.mean, Kt @ np.linalg.solve(A, Y), rtol=1e-7, atol=1e-9)
    np.testing.assert_allclose(post.mean, S.kernel_ridge(K, Y, Kt, noise), rtol=1e-10)   # = ridge with lambda = sigma^2
    cov = Ktt - Kt @ np.linalg.inv(A) @ Kt.T
    np.testing.assert_allclose(post.cov, cov, rtol=1e-6, atol=1e-7 * np.abs(Ktt).max())
    assert np.all(np.linalg.eigvalsh(post.cov) > -1e-6 * np.abs(Ktt).max())
    diag = S.gp_posterior(K, Y[:, 0], Kt, np.diag(Ktt), noise=noise)
    assert diag.mean.shape == (m,) and diag.cov is None
    np.testing.assert_allclose(diag.var, np.maximum(np.diag(cov), 0), rtol=1e-6, atol=1e-7 * np.abs(Ktt).max())
    assert S.gp_posterior(K, Y, Kt, noise=noise).cov is None
    # one test point: its row 1-D, its variance a scalar
    one = S.gp_posterior(K, Y[:, 0], Kt[0], Ktt[0, 0], noise=noise)
    assert one.mean.shape == (1,) and one.cov is None
    np.testing.assert_allclose(one.var, diag.var[:1], rtol=1e-12)
    with pytest.raises(ValueError, match=r"got shape \(5,\) \(a 1-D K_test is one test point's row"):
        S.gp_posterior(K, Y, Kt[:, 0], noise=noise)
    with pytest.raises(ValueError, match=r"K_test_test must be .* got shape \(\)"):
        S.gp_posterior(K, Y, Kt, Ktt[0, 0], noise=noise)


def test_gp_posterior_at_training_points_noise_free(rng):
    K, _ = psd(rng, 10)
    post = S.gp_posterior(K, np.arange(10.0), K, K)
    np.testing.assert_allclose(post.mean, np.arange(10.0), atol=1e-6)
    np.testing.assert_allclose(post.cov, 0, atol=1e-6 * np.abs(K).max())


# ----------------------------------------------------------------------------- Zarr
def test_the_records_print_their_arrays_as_shapes(rng):
    """print(fit_classifier(...)) printed the whole (n, k) alpha: hundreds of lines."""
    K, _ = psd(rng, 300)
    fit = S.fit_classifier(K, np.arange(300) % 10, ridge=0.1)
    text = repr(fit)
    assert len(text.splitlines()) == 1 and len(text) < 600, text
    assert "alpha=<NumPy array (300, 10) float64>" in text and "'ridge_relative': 0.1" in text
    assert "classes=array([0, 1, 2, 3, 4, 5, 6, 7, 8, 9])" in text       # small: whole
    assert repr(S.eigh(K)) == ("KernelEigh(s=<NumPy array (300,) float64>, U=<NumPy array (300, "
                               f"300) float64>, device='cpu', rounding={2.0 ** -52!r}, "
                               f"diag_max={float(K.diagonal().max())!r})")
    Y, _ = S.one_hot(np.arange(300) % 10)
    res = S.loo(K, Y, [0.1, 1.0], return_predictions=True)
    assert "predictions=[<NumPy array (300, 10) float64>, <NumPy array (300, 10) float64>]" in repr(res)
    assert "ridges=array([0.1, 1. ])" in repr(res)
    sel = S.select_ridge(K, Y)
    assert repr(sel).startswith("RidgeSelection(ridge=") and len(repr(sel).splitlines()) == 1
    assert "np.float64" not in repr(sel) and len(repr(sel)) < 2500, repr(sel)


def test_load_gram_from_zarr(tmp_path, rng):
    zarr = pytest.importorskip("zarr")
    K, _ = psd(rng, 16)
    Y = rng.normal(size=16)
    g = zarr.open_group(str(tmp_path / "k.zarr"), mode="w")
    a = g.create_array("ntk", shape=K.shape, dtype="float32", chunks=(8, 8))
    a[...] = K.astype(np.float32)
    K32 = K.astype(np.float32).astype(np.float64)
    np.testing.assert_array_equal(S.load_gram(a), K32)
    np.testing.assert_array_equal(S.load_gram(str(tmp_path / "k.zarr")), K32)      # only array
    np.testing.assert_array_equal(S.load_gram(tmp_path / "k.zarr", "ntk"), K32)
    # a zarr.Array goes straight into the solver
    np.testing.assert_allclose(S.fit_ridge(a, Y, 0.1).alpha[:, 0], np.linalg.solve(K32 + 0.1 * np.eye(16), Y))
    # 2 KiB of float64, and beside it the float32 array (1 KiB) and the read's buffers (4 chunks
    # decoded at once, 2 x 512 B of float64 each: 4 KiB), more than the solve's 1 copy
    with pytest.raises(S.GramTooLarge, match=r"16 x 16 .*2\.0 KiB as float64, 7\.0 KiB with the solve.*limit 1\.0 KiB: does not fit"):
        S.load_gram(a, max_memory=1024)
    with pytest.raises(ValueError, match="has no array 'nngp'; it holds \\['ntk'\\]"):
        S.load_gram(g, "nngp")
    # a group or array is named by its folder (it was "Group", "Array")
    with pytest.raises(ValueError, match=r"the store at '.*k\.zarr' has no array 'nngp'"):
        S.load_gram(g, "nngp")
    with pytest.raises(S.GramTooLarge, match=r"16 x 16 from '.*k\.zarr/ntk'"):
        S.load_gram(a, max_memory=1024)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        S.load_gram(tmp_path / "missing.zarr")
    assert S.available_memory() > 1 << 20


def test_load_gram_from_engine_store(tmp_path, rng):
    pytest.importorskip("zarr")
    gram = pytest.importorskip("cntk_engine.api").gram
    import zarr
    x = rng.normal(size=(9, 2, 1, 1))
    out = str(tmp_path / "g.zarr")
    gram(x, depths=[2, 3], kernel="both", backend="numba", tile=4, out=out)
    K = gram(x, depth=3, kernel="ntk", backend="numba")
    np.testing.assert_allclose(S.load_gram(out, "depth_3/ntk"), K, rtol=1e-6)
    with pytest.raises(ValueError, match="name one as key="):
        S.load_gram(out)
    g = zarr.open_group(out, mode="r+")          # pretend a tile was never computed
    g["tiles_done"][0, 1] = 0
    with pytest.raises(ValueError, match="unfinished: 1 of 6 tiles"):
        S.load_gram(out, "depth_3/ntk")


# ----------------------------------------------------------------------------- CuPy
def _cupy_or_skip():
    try:
        import cupy
        if cupy.cuda.runtime.getDeviceCount() < 1:
            pytest.skip("no CUDA GPU visible to CuPy")
    except ImportError:
        pytest.skip("CuPy is not installed (the cuSOLVER path needs it)")
    except Exception as e:  # noqa: BLE001 - CUDA driver / runtime errors
        pytest.skip(f"CuPy cannot use a GPU here: {e}")
    return cupy


@pytest.mark.gpu
def test_cupy_matches_numpy(rng):
    cp = _cupy_or_skip()
    n = 40
    K, phi = psd(rng, n)
    Kt = rng.normal(size=(5, phi.shape[1])) @ phi.T
    labels = rng.integers(0, 3, size=n)
    Y, _ = S.paper_targets(labels)
    Kg, Yg, Ktg = cp.asarray(K), cp.asarray(Y), cp.asarray(Kt)
    sol = S.fit_ridge(Kg, Yg, 0.01)
    assert isinstance(sol.alpha, cp.ndarray) and sol.device == "cuda"
    np.testing.assert_allclose(sol.predict(Ktg).get(), S.kernel_ridge(K, Y, Kt, 0.01), rtol=1e-8)
    # device="cuda" with NumPy input
    np.testing.assert_allclose(S.fit_ridge(K, Y, 0.01, device="cuda").alpha.get(), sol.alpha.get(), rtol=1e-10)
    r_gpu, r_cpu = S.loo(Kg, Yg, [0.0, 0.1], labels=labels), S.loo(K, Y, [0.0, 0.1], labels=labels)
    np.testing.assert_allclose(r_gpu.mse, r_cpu.mse, rtol=1e-6)
    np.testing.assert_array_equal(r_gpu.accuracy, r_cpu.accuracy)
    groups = np.repeat(np.arange(n // 2), 2)          # leave-one-group-out on the GPU (cupy groups)
    g_gpu = S.loo(Kg, Yg, [0.0, 0.1], groups=cp.asarray(groups), return_predictions=True)
    g_cpu = S.loo(K, Y, [0.0, 0.1], groups=groups, return_predictions=True)
    np.testing.assert_allclose(g_gpu.predictions[1].get(), g_cpu.predictions[1], rtol=1e-8, atol=1e-10)
    np.testing.assert_allclose(S.kfold(Kg, Yg, [0.1], groups=groups).mse,
                               S.kfold(K, Y, [0.1], groups=groups).mse, rtol=1e-8)
    np.testing.assert_allclose(S.gradient_flow(Kg, Yg, 3.0, K_test=Ktg, eta=1e-3).get(),
                               S.gradient_flow(K, Y, 3.0, K_test=Kt, eta=1e-3), rtol=1e-6, atol=1e-9)
    pg = S.gp_posterior(Kg, Yg, Ktg, cp.asarray(Kt @ np.linalg.pinv(K) @ Kt.T + np.eye(5)), noise=0.1)
    pc = S.gp_posterior(K, Y, Kt, Kt @ np.linalg.pinv(K) @ Kt.T + np.eye(5), noise=0.1)
    np.testing.assert_allclose(pg.mean.get(), pc.mean, rtol=1e-7)
    np.testing.assert_allclose(pg.cov.get(), pc.cov, rtol=1e-6, atol=1e-8)
    # jitter on the GPU path
    Ks, _ = psd(rng, 20, p=5)
    assert S.fit_ridge(cp.asarray(Ks), cp.ones(20), 0.0).jitter > 0
    assert S.select_ridge(Kg, Yg, labels=labels).eigh.device == "cuda"
    # K given up on the GPU (overwrite_k): the CPU's fits; the auto fit from the eigendecomposition
    for ridge in ("auto", 0.01):
        A = Kg.copy()
        fit = S.fit_classifier(A, labels, ridge=ridge, overwrite_k=True)
        ref = S.fit_classifier(K, labels, ridge=ridge)
        assert fit.solution.device == "cuda" and fit.info["ridge_absolute"] == pytest.approx(
            ref.info["ridge_absolute"], rel=1e-12)
        np.testing.assert_allclose(fit.solution.alpha.get(), ref.solution.alpha, rtol=1e-7, atol=1e-10)
    E = S.eigh(Kg)
    np.testing.assert_allclose(S.fit_ridge_eigh(E, Yg, 0.01).alpha.get(), sol.alpha.get(), rtol=1e-7)
    A = Kg.copy()                                     # a test kernel that is K: copied first
    np.testing.assert_allclose(S.kernel_ridge(A, Yg, A, 0.01, overwrite_k=True).get(),
                               S.kernel_ridge(K, Y, K, 0.01), rtol=1e-7)
    # indefinite: cuSOLVER's failure flag is read (CuPy's default ignores it and may return a
    # finite "factor"), so it is refused as on the CPU, never solved with jitter 0
    bad = np.eye(6)
    bad[0, 0] = -1.0
    with pytest.raises(S.NotPositiveDefinite, match="K's smallest eigenvalue is -1"):
        S.fit_ridge(cp.asarray(bad), cp.ones(6), 0.0)


@pytest.mark.gpu
@pytest.mark.parametrize("ridge,factorisation", [("auto", "eigh"), (0.01, "cholesky")])
def test_gpu_solve_workspace_holds(rng, ridge, factorisation):
    """solve_workspace's GPU figures (read from CuPy's code: a Cholesky and an eigh each work on
    a copy of their own, syevd's workspace taken as 2 n^2) measured: CuPy's memory pool, emptied
    before, holds after fit_classifier (K given up, as `solve --device cuda` gives it) the blocks
    of its peak use, which must be within the figure; then the same under a pool limit of K plus
    that figure, which must not run out.  The measured copies are printed (the GPU session's
    log holds them)."""
    cp = _cupy_or_skip()
    n = 4000
    K, _ = psd(rng, n, p=256)                        # cheap on the CPU side
    K += 1e-3 * np.trace(K) / n * np.eye(n)          # full rank: every ridge of the grid solves
    labels = rng.integers(0, 10, size=n)
    ws = S.solve_workspace(factorisation, "cuda", overwrite_k=True)
    pool = cp.get_default_memory_pool()
    S.fit_classifier(cp.asarray(K[:64, :64]), labels[:64], ridge=ridge)   # cuSOLVER handle, kernels
    Kg = cp.asarray(K)
    nb = Kg.nbytes
    pool.free_all_blocks()
    before = pool.total_bytes()
    assert before >= nb                               # K is in the pool: the pool is CuPy's allocator
    fit = S.fit_classifier(Kg, labels, ridge=ridge, overwrite_k=True)
    cp.cuda.Device().synchronize()
    peak = (pool.total_bytes() - before) / nb
    del fit
    print(f"GPU solve workspace, {factorisation}, n = {n}: {peak:.3f} copies of K beyond it "
          f"(solve_workspace says {ws:g})")    # in the GPU session's log (its pytest's -rP)
    assert peak <= ws, (peak, ws)
    Kg = cp.asarray(K)
    pool.free_all_blocks()
    limit = pool.get_limit()
    try:
        pool.set_limit(size=pool.total_bytes() + int(ws * nb))
        S.fit_classifier(Kg, labels, ridge=ridge, overwrite_k=True)
    finally:
        pool.set_limit(size=limit)


# ----------------------------------------------------------------------------- labels = class columns
HINT = r"np\.searchsorted\(classes, y\)"


def test_labels_must_be_class_column_indices(rng, monkeypatch):
    """Raw labels ({1, 3, 7}, strings, bools) used to score every ridge silently wrong; now
    they are refused, before any O(n^3) work, with the np.searchsorted hint."""
    n = 24
    K, _ = psd(rng, n)
    y = rng.choice([1, 3, 7], size=n)
    Y, classes = S.paper_targets(y)
    good = np.searchsorted(classes, y)
    for bad in (y, y.astype(str), good.astype(float), good == 1, good - 1):
        for call in (lambda lab: S.loo(K, Y, [0.1], labels=lab),
                     lambda lab: S.kfold(K, Y, [0.1], labels=lab),
                     lambda lab: S.select_ridge(K, Y, labels=lab),
                     lambda lab: S.select_ridge(K, Y, labels=lab, method="kfold")):
            with pytest.raises(ValueError, match=HINT):
                call(bad)
    # checked before the eigendecomposition
    monkeypatch.setattr(S, "eigh", lambda *a, **k: pytest.fail("eigh ran before the labels check"))
    with pytest.raises(ValueError, match=HINT):
        S.select_ridge(K, Y, labels=y)
    with pytest.raises(ValueError, match=HINT):
        S.loo(K, Y, [0.1], labels=y)
    monkeypatch.undo()
    # accuracy needs one-hot Y with k >= 2 columns
    with pytest.raises(ValueError, match="1-D Y"):
        S.loo(K, Y[:, 0], [0.1], labels=good)
    with pytest.raises(ValueError, match="k = 1 column"):
        S.loo(K, Y[:, :1], [0.1], labels=np.zeros(n, dtype=int))
    # the right labels work and match the raw-label accuracy computed by hand
    sel = S.select_ridge(K, Y, labels=good)
    res = S.loo(K, Y, sel.scores.ridges, labels=good, return_predictions=True)
    for i, p in enumerate(res.predictions):
        if p is not None:
            assert res.accuracy[i] == np.mean(classes[p.argmax(1)] == y)
    assert np.nanmax(res.accuracy) > 0


def test_accuracy_scores_need_column_indices():
    scores = np.array([[0.9, 0.1, 0.0], [0.0, 0.2, 0.8]])
    assert S.accuracy(scores, np.array([0, 2])) == 1.0
    for bad in (np.array([1, 7]), np.array(["a", "b"]), np.array([0.0, 2.0]), np.array([True, False]),
                np.array([-1, 0]), np.array([0, 3])):
        with pytest.raises(ValueError, match=HINT):
            S.accuracy(scores, bad)
    # 1-D predicted labels against labels of any type stay allowed
    assert S.accuracy(np.array(["cat", "dog"]), np.array(["cat", "cat"])) == 0.5
    assert S.accuracy(np.array([7, 3]), np.array([7, 1])) == 0.5


def test_readme_solver_snippet_on_synthetic_gram(rng):
    """The README's solver snippet, with raw non-contiguous labels, on a synthetic Gram."""
    n, m = 30, 10
    phi = rng.normal(size=(n + m, 8))
    y_all = np.where(phi[:, 0] > 0, 7, 3)
    phi[:, 0] *= 3
    Kall = phi @ phi.T
    K, K_test, y_train, y_test = Kall[:n, :n], Kall[n:, :n], y_all[:n], y_all[n:]
    Y, classes = S.paper_targets(y_train)
    labels = np.searchsorted(classes, y_train)
    sel = S.select_ridge(K, Y, labels=labels)
    pred = S.predict_classes(S.kernel_ridge(K, Y, K_test, ridge=sel.ridge), classes)
    assert sel.score == "accuracy" and np.nanmax(sel.scores.accuracy) >= 0.8
    assert S.accuracy(pred, y_test) >= 0.8


# ----------------------------------------------------------------------------- memory
def _peak(f):
    import tracemalloc
    tracemalloc.start()
    try:
        out = f()
        return tracemalloc.get_traced_memory()[1], out
    finally:
        tracemalloc.stop()


def test_solver_memory_in_place(rng, caplog):
    """Peak extra memory, in copies of K: Cholesky ~1 (the private symmetrised copy, factored
    in place; was 3), eigh / LOO ~3 (that copy + syevd's 2 n^2 workspace; was 4), k-fold
    selection ~3.1 (was 4.7)."""
    n = 600
    K, _ = psd(rng, n)
    labels = rng.integers(0, 3, size=n)
    Y, _ = S.paper_targets(labels)
    S.fit_ridge(K[:50, :50], Y[:50])       # warm imports
    S.eigh(K[:50, :50])
    nb = K.nbytes
    K0 = K.copy()
    peak, sol = _peak(lambda: S.fit_ridge(K, Y, 1e-3))
    assert peak < 1.3 * nb
    np.testing.assert_allclose(sol.alpha, np.linalg.solve(K + 1e-3 * np.eye(n), Y), rtol=1e-7, atol=1e-9)
    np.testing.assert_array_equal(K, K0)                 # the caller's K is never modified
    assert _peak(lambda: S.gp_posterior(K, Y, K[:5], K[:5, :5], noise=0.1))[0] < 1.3 * nb
    assert _peak(lambda: S.eigh(K))[0] < 3.2 * nb
    assert _peak(lambda: S.loo(K, Y, [0.0, 1.0], labels=labels))[0] < 3.2 * nb
    assert _peak(lambda: S.select_ridge(K, Y, labels=labels))[0] < 3.2 * nb
    assert _peak(lambda: S.select_ridge(K, Y, labels=labels, method="kfold"))[0] < 3.3 * nb
    np.testing.assert_array_equal(K, K0)
    # the jitter retries (the factorisation fails in place, K is restored from its upper
    # triangle) stay within one copy too, and give the factor of K + j I
    Ks, _ = psd(rng, n, p=20)
    with caplog.at_level(logging.WARNING, logger="cntk_engine"):
        peak, sol = _peak(lambda: S.fit_ridge(Ks, Y, 0.0))
    assert sol.jitter > 0 and peak < 1.3 * nb
    resid = (Ks + sol.jitter * np.eye(n)) @ sol.alpha - Y           # ill-conditioned: residual
    assert np.linalg.norm(resid) < 1e-3 * np.linalg.norm(Y)   # ~5e-5 (cond ~1e10); garbage: ~1


def test_overwrite_k_solves_in_ks_own_memory(rng):
    """overwrite_k: K (C-contiguous float64) is checked and factorised in its own memory, one
    copy of it less than solve_workspace says without; the fits are those of a copy.  An input
    that cannot be written (read-only, float32, a strided view) is copied and left as it is.
    (n = 1000: the figures are the bench's, from n = 1000 up; the blockwise passes' temporaries
    are a few row blocks of at least 32 rows, so a larger share of a smaller K.)"""
    n = 1000
    K, _ = psd(rng, n)
    K[0, 1] += 1e-9                        # a rounding asymmetry, symmetrised in place
    labels = rng.integers(0, 3, size=n)
    Y, _ = S.paper_targets(labels)
    S.fit_classifier(K[:50, :50].copy(), labels[:50], overwrite_k=True)      # warm imports
    nb = K.nbytes
    auto = S.fit_classifier(K, labels)
    given = S.fit_classifier(K, labels, ridge=1e-3)
    for ridge, ref, factorisation in (("auto", auto, "eigh"), (1e-3, given, "cholesky")):
        A = K.copy()
        peak, fit = _peak(lambda: S.fit_classifier(A, labels, ridge=ridge, overwrite_k=True))
        kept, _ = _peak(lambda: S.fit_classifier(K, labels, ridge=ridge))
        assert peak < S.solve_workspace(factorisation, overwrite_k=True) * nb, (ridge, peak / nb)
        assert kept < S.solve_workspace(factorisation) * nb, (ridge, kept / nb)
        assert kept - peak > 0.95 * nb, (ridge, peak / nb, kept / nb)      # a copy less
        assert not np.array_equal(A, K)                     # given up: no longer the Gram
        assert fit.info == ref.info
        np.testing.assert_allclose(fit.solution.alpha, ref.solution.alpha, rtol=1e-9, atol=1e-12)
    assert S.solve_workspace("eigh", "cuda", overwrite_k=True) == 3.1
    assert S.solve_workspace("cholesky", overwrite_k=True) == 0.1
    A = K.copy()
    sol = S.fit_ridge(A, Y, 0.5, overwrite_k=True)
    np.testing.assert_allclose(sol.alpha, np.linalg.solve((K + K.T) / 2 + 0.5 * np.eye(n), Y),
                               rtol=1e-9, atol=1e-12)
    read_only = K.copy()
    read_only.flags.writeable = False
    for keep in (K.astype(np.float32), np.asfortranarray(K), read_only):
        before = keep.copy()
        S.select_ridge(keep, Y, labels=labels, overwrite_k=True)
        np.testing.assert_array_equal(keep, before)


def test_overwrite_k_never_reads_what_it_wrote_nor_writes_what_it_refuses(rng):
    """Targets or a test kernel that are views of the K given up are copied before K is
    factorised (they read the factor: predictions off by 20 on outputs of 1.5); a K refused
    (asymmetric: a test kernel passed as K) is left as it was, since it is checked before it
    is written."""
    K, _ = psd(rng, 60)
    Y = K[:, 3] * 0.1
    ref = S.fit_ridge(K, Y, 0.1)
    np.testing.assert_allclose(S.kernel_ridge(K.copy(), Y, K, 0.1),
                               K @ ref.alpha[:, 0], rtol=1e-10)
    A = K.copy()
    np.testing.assert_allclose(S.kernel_ridge(A, Y, A, 0.1, overwrite_k=True), K @ ref.alpha[:, 0],
                               rtol=1e-9)
    A = K.copy()
    np.testing.assert_allclose(S.fit_ridge(A, A[:, 3], 0.1, overwrite_k=True).alpha,
                               S.fit_ridge(K, K[:, 3], 0.1).alpha, rtol=1e-9)
    A = K.copy()
    sel = S.select_ridge(A, A[:, :2], overwrite_k=True)
    np.testing.assert_allclose(sel.scores.mse, S.select_ridge(K, K[:, :2]).scores.mse, rtol=1e-9)
    from cntk_engine.solver.selection import fit_relative_ridge
    for ridge in ("auto", 0.01):       # the fit after the eigendecomposition reads Y too
        A = K.copy()
        sol, _ = fit_relative_ridge(A, A[:, :2], ridge, overwrite_k=True)
        np.testing.assert_allclose(sol.alpha, fit_relative_ridge(K, K[:, :2], ridge)[0].alpha,
                                   rtol=1e-8, atol=1e-12)
    # what is not an array in memory is never converted to be compared (a zarr.Array would be
    # read whole): returned as it is
    class Unreadable:
        shape = (60, 60)

        def __array__(self, *a, **k):
            raise AssertionError("read")
    from cntk_engine.solver.linalg import apart_from
    odd = Unreadable()
    assert apart_from(K, odd, True) is odd and apart_from(odd, Y, True) is Y
    assert apart_from(K, [1.0] * 60, True) == [1.0] * 60
    T = K.copy()
    T[5, 40] += 1.0                        # not symmetric
    before = T.copy()
    for call in (lambda: S.fit_ridge(T, Y, 0.1, overwrite_k=True),
                 lambda: S.select_ridge(T, Y, overwrite_k=True),
                 lambda: S.fit_classifier(T, np.arange(60) % 3, overwrite_k=True)):
        with pytest.raises(ValueError, match="K is not symmetric"):
            call()
        np.testing.assert_array_equal(T, before)


def test_a_k_given_up_is_written_only_once_every_input_is_checked(rng):
    """With overwrite_k, a call refused for its other inputs (targets, labels, groups, ridges,
    folds, max_jitter) leaves K as it was, even where K was asymmetric within the tolerance
    (its symmetrisation would be a write): each input is checked before K is written."""
    K, _ = psd(rng, 40)
    T = K.copy()
    T[3, 5] += 1e-9 * np.abs(K).max()           # within SYM_RTOL: symmetrised when solved
    Y = K[:, :2].copy()
    from cntk_engine.solver.selection import fit_relative_ridge
    refused = [
        lambda A: S.fit_ridge(A, Y[:-1], 0.1, overwrite_k=True),
        lambda A: S.fit_ridge(A, Y, 0.1, max_jitter=-1.0, overwrite_k=True),
        lambda A: S.select_ridge(A, Y[:-1], overwrite_k=True),
        lambda A: S.select_ridge(A, Y, labels=np.full(40, 7), overwrite_k=True),
        lambda A: S.select_ridge(A, Y, ridges=[-1.0], overwrite_k=True),
        lambda A: S.select_ridge(A, Y, groups=np.arange(39), overwrite_k=True),
        lambda A: S.select_ridge(A, Y, method="kfold", n_folds=41, overwrite_k=True),
        lambda A: fit_relative_ridge(A, Y[:-1], 0.01, overwrite_k=True),
        lambda A: fit_relative_ridge(A, Y[:-1], "auto", overwrite_k=True),
        lambda A: S.fit_classifier(A, np.arange(39) % 3, overwrite_k=True),
    ]
    for call in refused:
        A = T.copy()
        with pytest.raises(ValueError):
            call(A)
        np.testing.assert_array_equal(A, T)
    A = T.copy()                                # accepted: then K is symmetrised in place
    S.fit_ridge(A, Y, 0.1, overwrite_k=True)
    assert not np.array_equal(A, T)
    # refused after the eigendecomposition wrote over it: the message says so (a retry, as it
    # suggests, needs the Gram again)
    for overwrite in (False, True):
        with pytest.raises(S.NotPositiveDefinite, match="indefinite") as e:
            S.select_ridge(-np.eye(5) * 3.0, np.ones(5), overwrite_k=overwrite)
        assert ("retry with the Gram as computed" in str(e.value)) == overwrite


def test_a_relative_ridge_is_scaled_by_the_checked_k(rng, tmp_path):
    """fit_relative_ridge with a number scales it by mean(diag K) of the K it checked: a
    zarr.Array K is read once, by load_gram (memory checked), a float32 K's scale is its
    float64 mean, and what is not a matrix gets the solver's message, as with "auto"."""
    zarr = pytest.importorskip("zarr")
    from cntk_engine.solver.selection import fit_relative_ridge
    K, _ = psd(rng, 50)
    K32 = K.astype(np.float32)
    Y = K[:, :2]
    sol, _ = fit_relative_ridge(K32, Y, 0.01)
    K64 = K32.astype(np.float64)
    assert sol.ridge == 0.01 * float(np.mean(np.diagonal(K64)))
    z = zarr.open_array(tmp_path / "k.zarr", mode="w", shape=K32.shape, dtype="float32")
    z[...] = K32
    np.testing.assert_array_equal(fit_relative_ridge(z, Y, 0.01)[0].alpha, sol.alpha)
    for ridge in (0.01, "auto"):
        with pytest.raises(ValueError, match="is a path"):
            fit_relative_ridge(str(tmp_path / "k.zarr"), Y, ridge)
        with pytest.raises(ValueError, match="square"):
            fit_relative_ridge(np.ones(50), Y, ridge)


def test_a_converted_fortran_k_costs_one_copy(rng):
    """A float32 K in Fortran order, converted to float64 (one copy), is solved in that copy:
    the conversion's Fortran order is taken as its transpose (the same symmetric matrix in C
    order), not copied once more."""
    import tracemalloc
    n = 600
    K, _ = psd(rng, n)
    KF = np.asfortranarray(K.astype(np.float32))
    Y = K[:, :1].copy()
    ref = S.fit_ridge(np.ascontiguousarray(KF), Y, 0.1)
    tracemalloc.start()
    sol = S.fit_ridge(KF, Y, 0.1)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    np.testing.assert_array_equal(sol.alpha, ref.alpha)
    assert peak < 1.3 * n * n * 8, peak / (n * n * 8)


def test_the_chosen_ridge_is_fitted_from_the_eigendecomposition(rng, monkeypatch):
    """ridge="auto" fits at the ridge leave-one-out chose from that eigendecomposition
    (fit_ridge_eigh): the solution of (K + lambda I) alpha = Y, no jitter; a ridge that leaves
    K + lambda I singular or indefinite is refused there, as the LOO scores skip it."""
    K, phi = psd(rng, 80, p=120)
    y = (phi[:, 0] > 0).astype(int) + (phi[:, 1] > 0)
    from cntk_engine.solver import linalg, selection
    calls = []
    real = linalg._cholesky_inplace
    monkeypatch.setattr(linalg, "_cholesky_inplace", lambda *a: calls.append(1) or real(*a))
    fit = S.fit_classifier(K, y)
    assert calls == []                               # no second factorisation
    lam = fit.info["ridge_absolute"]
    np.testing.assert_allclose(fit.solution.alpha, np.linalg.solve(K + lam * np.eye(80), fit.Y),
                               rtol=1e-8, atol=1e-10)
    assert fit.info["jitter"] == 0.0
    S.fit_classifier(K, y, ridge=0.01)
    assert calls == [1]                              # the spy sees a factorisation
    with pytest.raises(ValueError, match=r"ridge must be 'auto' or a number >= 0 \(relative to "
                                         r"mean\(diag K\)\); got 'Auto'"):
        selection.fit_relative_ridge(K, fit.Y, "Auto")
    # where "auto" chose 0, evaluate's ridge-0 figures (the paper's solve) are the chosen fit's:
    # the same solve, not a second one that could differ in its last digits
    monkeypatch.setattr(selection, "RELATIVE_RIDGE_GRID", (0.0,))
    r = S.evaluate_classifier(K[:60, :60], K[60:, :60], y[:60], y[60:])
    assert r["ridge_absolute"] == 0 and calls == [1]
    assert r["accuracy_ridge0"] == r["accuracy"] and r["jitter_ridge0"] == 0.0
    E = S.eigh(K)
    Y = rng.normal(size=80)
    sol = S.fit_ridge_eigh(E, Y, 0.3)
    assert sol.one_d and sol.predict(K[:3]).shape == (3,)
    np.testing.assert_allclose(sol.alpha[:, 0], S.fit_ridge(K, Y, 0.3).alpha[:, 0], rtol=1e-9)
    Ks, _ = psd(rng, 30, p=10)                     # rank 10: singular
    Es = S.eigh(Ks)
    with pytest.raises(S.NotPositiveDefinite, match=r"K \+ 0 I \(30 x 30\) is singular: its "
                                                    r"smallest eigenvalue, \S+, is not above the "
                                                    r"rounding of K's spectrum, \S+ "
                                                    r"\(spectrum_tol: the larger of n eps64 "
                                                    r"max\|s\| and 8 x K's rounding \S+ x its "
                                                    r"largest diagonal entry\); use a larger ridge"):
        S.fit_ridge_eigh(Es, np.ones(30), 0.0)
    with pytest.raises(S.NotPositiveDefinite, match=r"K \+ 0\.5 I \(30 x 30\) is indefinite: its "
                                                    r"smallest eigenvalue, -0\.5 \(K's -1\), is not"):
        S.fit_ridge_eigh(S.KernelEigh(s=Es.s - 1.0, U=Es.U), np.ones(30), 0.5)
    with pytest.raises(ValueError, match="ridge must be"):
        S.fit_ridge_eigh(Es, np.ones(30), -1.0)
    assert S.fit_ridge_eigh(Es, np.ones(30), 1e-3).alpha.shape == (30, 1)


FIT_ACCURACY_CASES = [(50, 1e8), (50, 1e10), (50, 1e13)]


def fit_forward_errors(n, cond, seed=5):
    """Forward errors of fit_ridge_eigh and fit_ridge at ridge 0 on a symmetric K of condition
    number ``cond`` (eigenvalues log-spaced 1 .. 1/cond), against a 60-digit mpmath solve."""
    import mpmath
    rng = np.random.default_rng(seed)
    Q, _ = np.linalg.qr(rng.normal(size=(n, n)))
    K = (Q * np.logspace(0, -np.log10(cond), n)) @ Q.T
    K = (K + K.T) / 2
    Y = rng.normal(size=n)
    with mpmath.workdps(60):
        exact = np.array([float(v) for v in mpmath.lu_solve(mpmath.matrix(K.tolist()),
                                                            mpmath.matrix(Y.tolist()))])
    err = lambda a: np.linalg.norm(a[:, 0] - exact) / np.linalg.norm(exact)   # noqa: E731
    return err(S.fit_ridge_eigh(S.eigh(K), Y, 0.0).alpha), err(S.fit_ridge(K, Y, 0.0).alpha)


@pytest.mark.parametrize("n,cond", FIT_ACCURACY_CASES)
def test_the_eigh_fit_is_exact_to_the_condition_number(n, cond):
    """The fit at a chosen ridge from the eigendecomposition (fit_ridge_eigh) and the Cholesky
    fit both stay within cond(K) eps of the exact solution at ridge 0 (docs/solver.md has the
    figures: the eigh fit's is ten to twenty times the Cholesky's near singular K)."""
    eigh_err, chol_err = fit_forward_errors(n, cond)
    bound = cond * np.finfo(np.float64).eps
    assert eigh_err < bound and chol_err < bound, (eigh_err, chol_err, bound)


def test_a_gram_singular_to_rounding_gets_jitter_not_a_factor_of_its_rounding():
    """K = [[1, 1 - 2^-53], [1 - 2^-53, 1]]: singular but for the rounding of one entry, as a
    Gram holding one image twice is (computed in float32, K(a, b) and K(b, a) differ in the last
    bits).  potrf factorises it (a pivot of 2^-52), and the interpolating fit of two different
    targets was 9e15; a pivot at or below max(n, 8) eps of its diagonal entry now counts as a
    failed factorisation, so jitter is added (and said).  A Gram computed in float32 says so
    (``rounding``): its pivots must stand 8 float32 roundings above its entries' (an image and
    1e-4 times it under two labels left 1e-8, and a fit of 1e16)."""
    d = 2.0 ** -53
    K = np.array([[1.0, 1.0 - d], [1.0 - d, 1.0]])
    sol = S.fit_ridge(K, np.array([1.0, -1.0]), 0.0)
    assert sol.jitter == 1e-10 and np.abs(sol.alpha).max() < 1.1e10
    # above the floor the factorisation is taken as it is
    K = np.array([[1.0, 1.0 - 1e-14], [1.0 - 1e-14, 1.0]])
    assert S.fit_ridge(K, np.array([1.0, -1.0]), 0.0).jitter == 0.0
    # 8 eps at n = 2: a pivot of 3 eps is rounding
    K = np.array([[1.0, 1.0 - 1.5 * 2.0 ** -52], [1.0 - 1.5 * 2.0 ** -52, 1.0]])
    assert S.fit_ridge(K, np.array([1.0, -1.0]), 0.0).jitter > 0
    # a pivot of 1e-8 of its entry: above float64's rounding, below float32's
    K = np.array([[1.0, 1.0 - 5e-9], [1.0 - 5e-9, 1.0]])
    assert S.fit_ridge(K, np.array([1.0, -1.0]), 0.0).jitter == 0.0
    eps32 = float(np.finfo(np.float32).eps)
    sol = S.fit_ridge(K, np.array([1.0, -1.0]), 0.0, rounding=eps32)
    assert 0 < sol.jitter <= 1e-5
    fit = S.fit_classifier(K, np.array([0, 1]), ridge=0, rounding=eps32)
    assert fit.info["jitter"] == sol.jitter
    with pytest.raises(ValueError, match="rounding must be the relative rounding of K's entries"):
        S.fit_ridge(K, np.array([1.0, -1.0]), 0.0, rounding=0.0)
    # at 1/8 even I would fail (its pivots are 8 roundings of their entries): bfloat16's is the most
    assert S.fit_ridge(np.eye(2), np.array([1.0, -1.0]), 0.0, rounding=2.0 ** -7).jitter == 0.0
    with pytest.raises(ValueError, match=r"a number in \[2.22e-16, 0.0078125\]"):
        S.fit_ridge(np.eye(2), np.array([1.0, -1.0]), 0.0, rounding=0.125)
    # a decomposition made by hand is checked as it is made
    assert S.KernelEigh(s=np.ones(2), U=np.eye(2), rounding=None).rounding == 2.0 ** -52
    with pytest.raises(ValueError, match="rounding must be"):
        S.KernelEigh(s=np.ones(2), U=np.eye(2), rounding=0.5)


def spectrum(rng, s):
    """U diag(s) U^T with U a random orthogonal matrix: a Gram of the given spectrum."""
    U, _ = np.linalg.qr(rng.normal(size=(len(s), len(s))))
    return (U * np.asarray(s)) @ U.T


def test_ridge_selection_skips_ridges_within_the_rounding_of_the_gram(rng, monkeypatch):
    """A Gram computed in float32 (``rounding`` its epsilon) is singular where K + ridge I has
    an eigenvalue within 8 roundings of K's largest diagonal entry (the eigenvalue form of the
    Cholesky's pivot floor): leave-one-out and k-fold skip those ridges (with float64's n eps64
    max|s| they were scored, and chosen: a review saw 1e-8 chosen where the float64 Gram chose
    1e-4).  The eigendecomposition carries the rounding it was made for, and a different one
    given beside it is refused."""
    n = 30
    # 12 eigenvalues of 1e-8 of the largest (float32's rounding): so many that every k-fold
    # training block of 20 has one as well (interlacing)
    K = spectrum(rng, np.r_[np.full(12, 1e-8), np.geomspace(1e-4, 1.0, n - 12)])
    Y = rng.normal(size=(n, 2))
    eps32 = float(np.finfo(np.float32).eps)
    ridges = [0.0, 1e-8, 1e-5, 1e-3]
    tol32 = 8 * eps32 * K.diagonal().max()
    assert 1e-8 + 1e-8 < tol32 < 1e-5
    assert np.isfinite(S.loo(K, Y, ridges).mse).all()           # float64: all solvable
    res = S.loo(K, Y, ridges, rounding=eps32)
    assert np.isnan(res.mse[:2]).all() and np.isfinite(res.mse[2:]).all()
    assert res.tol == pytest.approx(tol32)
    E = S.eigh(K, rounding=eps32)
    assert E.rounding == eps32
    np.testing.assert_array_equal(S.loo(E, Y, ridges).mse, res.mse)
    np.testing.assert_array_equal(S.loo(E, Y, ridges, rounding=eps32).mse, res.mse)
    with pytest.raises(ValueError, match="not the rounding the eigendecomposition was made for"):
        S.loo(E, Y, ridges, rounding=2.0 ** -52)
    kf = S.kfold(K, Y, ridges, n_folds=3, rounding=eps32)
    assert np.isnan(kf.mse[:2]).all() and np.isfinite(kf.mse[2:]).all()
    assert np.isfinite(S.kfold(K, Y, ridges, n_folds=3).mse).all()
    sel = S.select_ridge(K, Y, ridges, rounding=eps32)
    assert sel.ridge >= 1e-5 and sel.eigh.rounding == eps32
    with pytest.raises(S.NotPositiveDefinite, match=r"8 x K's rounding 1.19e-07 x its largest "
                                                    r"diagonal entry"):
        S.fit_ridge_eigh(E, Y, 1e-8)
    with pytest.raises(S.NotPositiveDefinite, match=r"every ridge of the grid \[0.0, 1e-08\] "
                                                    r"leaves K \+ ridge I singular to the rounding "
                                                    r"of K: .* at or below \S+ \(spectrum_tol, "
                                                    r"for K's rounding 1.19e-07\)"):
        S.select_ridge(K, Y, [0.0, 1e-8], rounding=eps32)
    # -I: indefinite at the smaller ridges, singular at the largest: not "singular" alone
    with pytest.raises(S.NotPositiveDefinite, match=r"leaves K \+ ridge I indefinite or singular"):
        S.select_ridge(-np.eye(4), np.arange(4.0), [0.0, 0.5, 1.0])
    # a decomposition made elsewhere: K's diagonal read from U and s
    from cntk_engine.solver.linalg import spectrum_tol
    assert spectrum_tol(S.KernelEigh(s=E.s, U=E.U, rounding=eps32)) == pytest.approx(tol32)
    # "auto" (fit_relative_ridge, fit_classifier) hands its rounding to the selection
    sol, sel = S.fit_relative_ridge(K, Y, "auto", rounding=eps32)
    assert sel.eigh.rounding == eps32 and np.isnan(sel.scores.mse[:3]).all()
    assert S.fit_relative_ridge(K, Y, "auto")[1].eigh.rounding == 2.0 ** -52
    from cntk_engine.solver import selection
    seen, real = [], selection.select_ridge
    monkeypatch.setattr(selection, "select_ridge",
                        lambda *a, **kw: seen.append(kw["rounding"]) or real(*a, **kw))
    S.fit_classifier(K, np.arange(n) % 3, ridge="auto", rounding=eps32)
    S.evaluate_classifier(K, K[:5], np.arange(n) % 3, np.arange(5) % 3, rounding=eps32)
    assert seen == [eps32, eps32]


def test_ridge_zero_of_a_gram_of_similar_images_is_not_taken_for_rounding(rng):
    """A Gram of similar images (CNTK-GAP) has one eigenvalue near n x its diagonal: 8 float32
    epsilons of THAT (the first version of the float32 rule) skipped ridge 0 of CNTK-GAP on 500
    MNIST digits (s_min 2.6e-4, diagonal 0.6), which the Cholesky factorises without jitter and
    which generalises.  Held against the largest diagonal entry, as the Cholesky's pivots are,
    it is kept."""
    n = 400
    X = rng.normal(size=(n, 800)) / 20 + 1.0       # rows nearly parallel: s_max ~ n diag
    K = X @ X.T / 800
    s = np.linalg.eigvalsh(K)
    eps32 = float(np.finfo(np.float32).eps)
    assert s[-1] > 300 * K.diagonal().max() and s[0] < 8 * eps32 * s[-1]
    assert s[0] > 100 * 8 * eps32 * K.diagonal().max()
    Y = rng.normal(size=(n, 2))
    assert np.isfinite(S.loo(K, Y, [0.0], rounding=eps32).mse[0])
    assert S.fit_ridge(K, Y, 0.0, rounding=eps32).jitter == 0.0


def test_jitter_starts_at_the_decade_of_the_pivot_floor(monkeypatch):
    """A jitter j raises every pivot L_kk^2 by at least j, so jitter far below the pivot floor
    is a wasted factorisation: on a float32 Gram (floor 8 eps32 = 9.5e-7) the jitter starts at
    1e-7, not 1e-10.  One image twice: the second pivot of K + j I is about 2 j, so 1e-7 fails,
    1e-6 is the first that passes: three factorisations (ridge, 1e-7, 1e-6), not six.  A
    ``max_jitter`` below the first jitter is tried once."""
    from cntk_engine.solver import linalg
    calls = []
    real = linalg._cholesky_inplace

    def counted(*a):
        calls.append(a[3])
        return real(*a)
    monkeypatch.setattr(linalg, "_cholesky_inplace", counted)
    K = np.ones((2, 2))
    eps32 = float(np.finfo(np.float32).eps)
    L, j = S.cholesky(K, rounding=eps32)
    assert len(calls) == 3 and j == pytest.approx(1e-6)
    calls.clear()
    assert S.cholesky(K)[1] == pytest.approx(1e-10) and len(calls) == 2   # float64: from 1e-10
    assert linalg.first_jitter(8 * eps32, 1.0) == 1e-7 and linalg.first_jitter(1e-15, 1.0) == 1e-10
    # a row of tiny norm has a tiny floor: one such image twice needs jitter 1e-9, not 1e-7
    c = 1e-4
    Kt = np.array([[1.0, 0, 0], [0, c, c], [0, c, c]])
    calls.clear()
    assert S.cholesky(Kt, rounding=eps32)[1] == pytest.approx(1e-9 * np.trace(Kt) / 3)
    assert len(calls) == 3                       # the ridge, 1e-10, 1e-9
    assert linalg.first_jitter(8 * eps32, 0.0) == 1e-10      # an all-zero row
    # one image of far larger norm raises the mean, not the start: a float64 Gram of an image
    # twice (diagonal 1) beside one of diagonal 1e8 starts at 1e-10 of the pair's entry (3e-8
    # of the mean: 3e-18, so the least, 1e-16), not 1e-10 of the mean (3.3e-3, a third of a
    # percent of its diagonal)
    Ko = np.array([[1.0, 1, 0], [1, 1, 0], [0, 0, 1e8]])
    calls.clear()
    assert S.cholesky(Ko)[1] == pytest.approx(1e-16 * np.trace(Ko) / 3) and len(calls) == 2
    assert linalg.first_jitter(1e-15, 3e-5) == 1e-15
    # ... and at least 1e-16 of the mean: an image of tiny norm beside a duplicated pair would
    # have the ladder climb a decade a step from 1e-310 (300 factorisations); 14 at most now
    assert linalg.first_jitter(1e-15, 3e-8) == 1e-16 and linalg.first_jitter(8e-7, 1e-300) == 1e-16
    Kt = np.array([[1e-300, 0, 0], [0, 1, 1], [0, 1, 1]])
    calls.clear()
    assert 0 < S.cholesky(Kt)[1] <= 1e-9 and len(calls) <= 8
    # an all-zero image (any jitter lifts its row) does not set the floor: the duplicated
    # image's does (entries 1.5 x the mean diagonal: floor 1.4e-6): the ridge, then 1e-6
    Kz = np.array([[0.0, 0, 0], [0, 1, 1], [0, 1, 1]])
    calls.clear()
    assert S.cholesky(Kz, rounding=eps32)[1] == pytest.approx(1e-6 * 2 / 3)
    assert len(calls) == 2
    # a multiple s of an earlier image is lifted by about (1 + s^2) j: the floor is the
    # smaller row's, not the failing row's (which asked for 1e-6 where 1e-9 passes, at s = 100)
    for sc, want in ((10, 1e-7), (100, 1e-9)):
        Ks = np.array([[1.0, sc, 0], [sc, sc * sc, 0], [0, 0, 1]])
        assert S.cholesky(Ks, rounding=eps32)[1] == pytest.approx(want * np.trace(Ks) / 3)
    # a max_jitter between two powers of ten is tried itself before giving up
    calls.clear()
    assert S.cholesky(K, max_jitter=5e-7, rounding=eps32)[1] == pytest.approx(5e-7)
    assert len(calls) == 3
    # the messages where the mean diagonal cannot be the unit, and where no jitter is allowed
    with pytest.raises(S.NotPositiveDefinite, match=r"even with jitter up to 0.001 x 1 = 0.001 "
                                                    r"\(the unit is 1: K's mean diagonal is -0.5, "
                                                    r"not positive\); K's smallest eigenvalue"):
        S.cholesky(np.diag([0.0, -1.0]))
    with pytest.raises(S.NotPositiveDefinite, match=r"and max_jitter=0 allows no jitter \(the unit "
                                                    r"is 1: K's mean diagonal is 0, not positive; "
                                                    r"K is all zero"):
        S.cholesky(np.zeros((2, 2)), max_jitter=0)
    # refused by the rounding floor alone (K + the last jitter is positive definite): said so,
    # not "check that K is a Gram matrix (symmetric PSD)"
    for Kr, kw in ((K, dict(max_jitter=1e-7, rounding=eps32)),
                   (np.array([[1, 0.99], [0.99, 1]]), dict(rounding=2.0 ** -7))):
        with pytest.raises(S.NotPositiveDefinite, match=r"is singular to the rounding of its entries "
                                                        r"even with jitter up to .*: each factorisation "
                                                        r"left a pivot within [0-9.e-]+ of its diagonal") as e:
            S.cholesky(Kr, **kw)
        assert "symmetric PSD" not in str(e.value)
    # an entry beyond the unit's range: the one jitter allowed, then the error (not OverflowError)
    with pytest.raises(S.NotPositiveDefinite, match="even with jitter up to 0.001"):
        S.fit_ridge(np.array([[1e-300, 1e10], [1e10, 1e-300]]), np.array([1.0, -1.0]), 1e9)
    calls.clear()
    with pytest.raises(S.NotPositiveDefinite, match="jitter up to 1e-08"):
        S.cholesky(K, max_jitter=1e-8, rounding=eps32)
    assert len(calls) == 2                      # the ridge, then max_jitter once


def test_a_row_of_tiny_norm_is_not_singular_to_the_cholesky(rng):
    """D K D with K well conditioned and D scaling one row by 1e-7 (an image of tiny pixels
    under a homogeneous kernel): each pivot is held against its own diagonal entry, not the
    largest, so the fit needs no jitter and interpolates that row too (against n eps max(diag),
    it was jittered, and that row's residual was 0.8)."""
    n = 60
    X = rng.normal(size=(n, 5))
    d = np.ones(n)
    d[0] = 1e-7
    K = (X @ X.T / 5 + np.eye(n)) * np.outer(d, d)
    y = rng.normal(size=n)
    sol = S.fit_ridge(K, y, 0.0)
    assert sol.jitter == 0.0
    assert np.abs(K @ sol.alpha[:, 0] - y).max() < 1e-8


def test_cholesky_and_eigh_in_place(rng):
    K, _ = psd(rng, 40)
    A = np.ascontiguousarray(S.check_gram(K))
    from cntk_engine.solver import linalg
    L = linalg._cholesky_inplace(np, A, np.diagonal(A).copy(), 0.0)
    assert np.shares_memory(L, A)
    np.testing.assert_allclose(L, np.linalg.cholesky(K), rtol=1e-8, atol=1e-10)
    assert np.all(np.triu(L, 1) == 0)
    # overwrite_k: the factor is K's own memory; without it K is left as it is
    A = S.check_gram(K)
    L, j = S.cholesky(A, 0.5, overwrite_k=True)
    assert j == 0 and np.shares_memory(L, A)
    np.testing.assert_allclose(L @ L.T, K + 0.5 * np.eye(40), rtol=1e-10, atol=1e-10)
    K0 = K.copy()
    L, _ = S.cholesky(K, 0.5)
    np.testing.assert_array_equal(K, K0)
    # a failed in-place attempt is undone exactly: jitter on an indefinite-then-fixed matrix
    Ks, _ = psd(rng, 30, p=3)
    A = S.check_gram(Ks)
    L, j = S.cholesky(A, 0.0, overwrite_k=True)
    assert j > 0
    np.testing.assert_allclose(L @ L.T, Ks + j * np.eye(30), rtol=1e-9, atol=1e-9 * np.abs(Ks).max())
    with pytest.raises(S.NotPositiveDefinite, match="smallest eigenvalue is -1 "):
        S.cholesky(np.diag([1.0, -1.0, 2.0]), overwrite_k=True)
    # eigh decomposes the private copy in place
    A = S.check_gram(K)
    E = S.eigh(A, _overwrite=True)
    assert np.shares_memory(E.U, A)
    np.testing.assert_allclose(E.U @ np.diag(E.s) @ E.U.T, K, rtol=1e-9, atol=1e-9 * np.abs(K).max())


def test_check_gram_private_copy(rng):
    K, _ = psd(rng, 70)
    Ka = K.copy()
    Ka[3, 50] *= 1 + 1e-9
    S0 = S.check_gram(Ka)
    assert not np.shares_memory(S0, Ka) and S0.flags.c_contiguous
    np.testing.assert_array_equal(S0, (Ka + Ka.T) / 2)
    S32 = S.check_gram(Ka.astype(np.float32))                 # symmetrised in its own copy
    np.testing.assert_array_equal(S32, S32.T)
    F = np.asfortranarray(Ka)
    np.testing.assert_array_equal(S.check_gram(F), S0)
    assert S.check_gram(F.astype(np.float32)).flags.c_contiguous


# ----------------------------------------------------------------------------- classes, eta, scores
def test_one_hot_unsorted_empty_duplicate_classes():
    y = np.array(["cat", "dog", "dog"])
    Y, cl = S.one_hot(y, classes=["dog", "cat"])
    assert cl.tolist() == ["dog", "cat"]
    np.testing.assert_array_equal(Y, [[0, 1], [1, 0], [1, 0]])
    Yp, _ = S.paper_targets(np.array([7, 1, 3]), classes=[3, 7, 1])
    np.testing.assert_allclose(Yp, [[-0.1, 0.9, -0.1], [-0.1, -0.1, 0.9], [0.9, -0.1, -0.1]])
    with pytest.raises(ValueError, match=r"labels \['bird'\] are not among the classes \['dog', 'cat'\]"):
        S.one_hot(np.array(["cat", "bird"]), classes=["dog", "cat"])
    with pytest.raises(ValueError, match="non-empty"):
        S.one_hot(np.array([1]), classes=[])
    with pytest.raises(ValueError, match=r"distinct; \[3\] repeated"):
        S.one_hot(np.array([1, 3]), classes=[3, 1, 3])
    with pytest.raises(ValueError, match="not among the classes"):
        S.one_hot(np.array([1, 2]), classes=["a", "b"])


def test_gradient_flow_eta_numpy_scalar_and_docstring(rng):
    K, phi = psd(rng, 12)
    Y = rng.normal(size=(12, 2))
    want = S.gradient_flow(K, Y, 2.0, eta=0.5)
    for eta in (np.float32(0.5), np.float64(0.5), 0.5):
        np.testing.assert_allclose(S.gradient_flow(K, Y, 2.0, eta=eta), want, rtol=1e-7)
    np.testing.assert_allclose(S.gradient_flow(K, Y, 2.0, eta=np.int64(1)), S.gradient_flow(K, Y, 2.0),
                               rtol=1e-12)
    for bad in (True, np.bool_(True), np.float32(-1), np.inf, "1", 1j):
        with pytest.raises(ValueError, match="eta"):
            S.gradient_flow(K, Y, 1.0, eta=bad)
    for kw, msg in ((dict(rcond=np.nan), "rcond must be a finite number >= 0"),
                    (dict(rcond=-1), "rcond must be a finite number >= 0"),   # inverted rounding
                    (dict(rcond=1.0), "rcond must be below 1"),
                    (dict(neg_tol=-1), "neg_tol must be a finite number >= 0")):
        with pytest.raises(ValueError, match=msg):
            S.gradient_flow(K, Y, 1.0, **kw)
    with pytest.raises(ValueError, match="non-empty 1-D sequence"):
        S.gradient_flow(K, Y, [])
    # t = inf is the pseudo-inverse truncated at rcond, as documented, not K^-1
    doc = S.gradient_flow.__doc__
    assert "pseudo-inverse of K's positive part truncated at ``rcond``" in doc and "kernel_ridge" in doc
    U, _ = np.linalg.qr(rng.normal(size=(6, 6)))
    s = np.array([1e-13, 1e-3, 0.5, 1.0, 2.0, 3.0])
    Kn = (U * s) @ U.T
    Kt = rng.normal(size=(2, 6))
    y = rng.normal(size=6)
    got = S.gradient_flow(Kn, y, np.inf, K_test=Kt)
    keep = s > 1e-10 * 3.0
    np.testing.assert_allclose(got, Kt @ (U[:, keep] / s[keep]) @ U[:, keep].T @ y, rtol=1e-6)
    assert not np.allclose(got, Kt @ np.linalg.solve(Kn, y))


def test_predict_classes_needs_2d_scores():
    with pytest.raises(ValueError, match=r"scores must be \(m, c\).*sign"):
        S.predict_classes(np.array([0.3, -0.2]))
    assert S.predict_classes([[0.1, 0.9]], ["a", "b"]).tolist() == ["b"]
    for F, classes in ((np.zeros((5, 3)), np.arange(9)), (np.eye(5), np.arange(3))):
        with pytest.raises(ValueError, match=rf"label of each of the {F.shape[1]} columns"):
            S.predict_classes(F, classes)


def test_evaluate_classifier_checks_the_labels_before_solving(rng):
    """A y_test of the wrong shape or kind used to give a wrong accuracy without an error
    ((20, 1) broadcast against (20,); strings never equal integers)."""
    K, phi = psd(rng, 30)
    y = (phi[:, 0] > 0).astype(int)
    Kt, ytr, yte = K[20:, :20], y[:20], y[20:]
    K = K[:20, :20]
    good = S.evaluate_classifier(K, Kt, ytr, yte, ridge=0.1)["accuracy"]
    assert good == S.evaluate_classifier(K, Kt, ytr.astype(float), yte, ridge=0.1)["accuracy"]
    for args, msg in [
        ((K, Kt, ytr, yte[:, None]), r"y_test must be 1-D, one label per sample \(10,\); got shape \(10, 1\)"),
        ((K, Kt, ytr, yte[:1]), r"y_test must be 1-D.*got shape \(1,\)"),
        ((K, Kt, ytr, yte.astype(str)), r"y_test holds strings \(<U21\) but the training labels numbers"),
        ((K, Kt, ytr, np.where(yte, np.nan, 1.0)), "y_test must be finite"),
        ((K, Kt, np.r_[ytr[:-1], np.nan], yte), "y_train must be finite"),
        ((K, Kt, ytr[:15], yte), r"y_train must be 1-D, one label per sample \(20,\)"),
        ((K, Kt[:, :19], ytr, yte), r"K_test must be \(m, n\) = \(test samples, 20 training"),
        ((K[:, :19], Kt, ytr, yte), r"K must be the square \(n, n\) training Gram"),
    ]:
        with pytest.raises(ValueError, match=msg):
            S.evaluate_classifier(*args, ridge=0.1)


def test_labels_are_compared_by_the_kind_of_their_elements(rng):
    """bytes test labels against string training labels scored 0 % (b'a' != 'a') without an
    error; object arrays (pandas' .to_numpy()) of strings or ints were refused against <U / int
    labels they match; mixed objects gave a bare TypeError from the sort."""
    K, phi = psd(rng, 30)
    y = np.array(["ab"[i] for i in (phi[:, 0] > 0).astype(int)])
    Kt, ytr, yte, K = K[20:, :20], y[:20], y[20:], K[:20, :20]
    good = S.evaluate_classifier(K, Kt, ytr, yte, ridge=0.1)["accuracy"]
    assert good > 0.5
    ints = (ytr == "b").astype(int), (yte == "b").astype(int)
    for a, b in [(ytr.astype(object), yte), (ytr, yte.astype(object)), (ints[0].astype(object), ints[1]),
                 (ints[0], ints[1].astype(object))]:
        assert S.evaluate_classifier(K, Kt, a, b, ridge=0.1)["accuracy"] == good
    for args, msg in [
        ((ytr, yte.astype(bytes)), r"y_test holds bytes \(\|S1\) but the training labels strings \(<U1\).*"
                                   r"decode the bytes"),
        ((ytr, np.array([1, "a"] * 5, dtype=object)), r"y_test must be class names of one kind.*got int, str"),
        ((np.array([1, "a"] * 10, dtype=object), yte), r"y_train must be class names of one kind.*got int, str"),
        ((np.r_[ints[0][:-1], np.nan].astype(object), ints[1]), "y_train must be finite"),
        ((np.zeros(20, int), ints[1]), r"y_train holds one class only \(0, 20 samples\)"),
        ((np.array(["a"] * 20, dtype=object), yte), r"y_train holds one class only \('a', 20 samples\)"),
    ]:
        with pytest.raises(ValueError, match=msg):
            S.evaluate_classifier(K, Kt, *args, ridge=0.1)
    with pytest.raises(ValueError, match="labels must be class names of one kind"):
        S.one_hot(np.array([1, "a"], dtype=object))


def test_evaluate_classifier_keeps_the_chosen_ridge_where_the_ridge_0_solve_fails(rng):
    """K indefinite beyond the jitter: LOO picks a ridge that solves, and the ridge-0 side figure
    (the paper solve) failed the whole call; it is now None, with the reason."""
    X = rng.standard_normal((25, 10))
    G = X @ X.T
    K = G - 0.01 * np.mean(np.diag(G)) * np.eye(25)
    y = (X[:, 0] > 0).astype(int)
    r = S.evaluate_classifier(K[:20, :20], K[20:, :20], y[:20], y[20:], ridge="auto")
    assert r["ridge_relative"] > 0 and 0 <= r["accuracy"] <= 1
    assert r["accuracy_ridge0"] is None and "not positive definite" in r["ridge0_error"]
    with pytest.raises(S.NotPositiveDefinite):
        S.evaluate_classifier(K[:20, :20], K[20:, :20], y[:20], y[20:], ridge=0)


def test_a_non_finite_test_kernel_is_refused_before_the_solve(rng, monkeypatch):
    K, phi = psd(rng, 30)
    y = (phi[:, 0] > 0).astype(int)
    Kt = K[20:, :20].copy()
    Kt[2, 3] = np.nan
    monkeypatch.setattr(S.selection, "select_ridge", lambda *a, **k: pytest.fail("LOO ran"))
    with pytest.raises(ValueError, match="K_test"):
        S.evaluate_classifier(K[:20, :20], Kt, y[:20], y[20:])


def test_paths_groups_and_text_are_refused_as_matrices(tmp_path, rng):
    zarr = pytest.importorskip("zarr")
    K, _ = psd(rng, 6)
    g = zarr.open_group(str(tmp_path / "k.zarr"), mode="w")
    g.create_array("ntk", shape=K.shape, dtype="f8")[...] = K
    Y = np.eye(6)[:, :2]
    assert S.select_ridge(g["ntk"], Y).ridge == S.select_ridge(K, Y).ridge
    for bad, msg in [(str(tmp_path / "k.zarr"), r"K is a path \('.*k.zarr'\); pass the matrix: "
                      "solver.load_gram"),
                     (tmp_path / "k.zarr", "K is a path"),
                     (g, r"K is a zarr.Group \(arrays \['ntk'\]\); pass one of its arrays"),
                     (np.full((6, 6), "a"), "K must hold numbers"),
                     ([[1.0, 2.0], [3.0]], "K must be an array of numbers")]:
        with pytest.raises(ValueError, match=msg):
            S.select_ridge(bad, Y)
    for ridges in ("auto", None, [[1.0, 2.0]], []):
        with pytest.raises(ValueError, match=r"ridges must be a non-empty 1-D list.*select_ridge\(ridges=None\)"):
            S.loo(K, Y, ridges)


# ----------------------------------------------------------------------------- complex input
def test_complex_input_refused(rng):
    K, _ = psd(rng, 6)
    Y = rng.normal(size=(6, 2))
    with pytest.raises(ValueError, match="K is complex"):
        S.fit_ridge(K.astype(complex), Y)
    with pytest.raises(ValueError, match="K is complex"):
        S.eigh(K + 0j)
    with pytest.raises(ValueError, match="Y is complex"):
        S.fit_ridge(K, Y + 1j)
    with pytest.raises(ValueError, match="Y is complex"):
        S.loo(K, [1j] * 6, [0.1])
    with pytest.raises(ValueError, match="K_test is complex"):
        S.kernel_ridge(K, Y, K[:2] + 0j, 0.1)
    with pytest.raises(ValueError, match="K_test is complex"):
        S.gradient_flow(K, Y, 1.0, K_test=K[:2].astype(np.complex64))
    with pytest.raises(ValueError, match="K_test_test is complex"):
        S.gp_posterior(K, Y, K[:2], np.eye(2) + 0j)


# ----------------------------------------------------------------------------- load_gram memory
def test_load_gram_memory_decision(tmp_path, rng, monkeypatch):
    zarr = pytest.importorskip("zarr")
    from cntk_engine.jobs import store
    K, _ = psd(rng, 16)
    g = zarr.open_group(str(tmp_path / "k.zarr"), mode="w")
    a = g.create_array("ntk", shape=K.shape, dtype="float64", chunks=(8, 8))
    a[...] = K
    nb = K.nbytes                                    # 2 KiB
    # device="cuda": the GPU's free memory decides (the solve runs there), the host must hold
    # the float64 matrix while reading
    monkeypatch.setattr(store, "available_memory", lambda: 100 * nb)
    monkeypatch.setattr(store, "available_gpu_memory", lambda: nb)
    with pytest.raises(S.GramTooLarge, match=r"4\.0 KiB with the solve.*free GPU memory 2\.0 KiB"):
        S.load_gram(a, device="cuda")
    monkeypatch.setattr(store, "available_gpu_memory", lambda: 100 * nb)
    monkeypatch.setattr(store, "available_memory", lambda: nb // 2)
    with pytest.raises(S.GramTooLarge, match=r"6\.0 KiB on the host to read it for the GPU; available RAM"):
        S.load_gram(a, device="cuda")
    # the CPU path ignores the GPU figure
    monkeypatch.setattr(store, "available_gpu_memory", lambda: pytest.fail("GPU memory asked for a CPU load"))
    # K, and the read's buffers (4 chunks decoded at once, 2 copies each: 2 K) beside it
    assert store._read_buffers(a, None) == 2 * nb
    monkeypatch.setattr(store, "available_memory", lambda: 3 * nb)
    np.testing.assert_array_equal(S.load_gram(a), K)
    with pytest.raises(S.GramTooLarge, match=r"available RAM"):
        S.load_gram(a, workspace=3)
    with pytest.raises(ValueError, match="device must be one of"):
        S.load_gram(a, device="tpu")
    for bad in (-5, 0, "1GB", 2.5e9, True):
        with pytest.raises(ValueError, match=r"max_memory must be a positive number of bytes"):
            S.load_gram(a, max_memory=bad)
    for bad in (-1, float("nan"), "3", None):
        with pytest.raises(ValueError, match=r"workspace must be a number >= 0"):
            S.load_gram(a, workspace=bad)
    np.testing.assert_array_equal(S.load_gram(a, max_memory=np.int64(10 * nb), workspace=0), K)
    # a zarr.Array given to the solver is loaded with the workspace of that solver: a Cholesky
    # needs ~1.1 K (here the read's 3 K decides), an eigendecomposition (LOO) ~3.1 K
    monkeypatch.setattr(store, "available_memory", lambda: 3 * nb)
    Y = rng.normal(size=16)
    np.testing.assert_allclose(S.fit_ridge(a, Y, 0.1).alpha[:, 0], np.linalg.solve(K + 0.1 * np.eye(16), Y),
                               rtol=1e-8)
    with pytest.raises(S.GramTooLarge, match=r"2\.1 copies") as e:
        S.loo(a, Y, [0.1])
    assert e.value.n == 16
    # a workspace as a function of n (solve_workspace's figure for the Gram's size)
    seen = []
    with pytest.raises(S.GramTooLarge, match=r"\(2\.5 copies\)"):
        S.load_gram(a, workspace=lambda n: seen.append(n) or 2.5)
    assert seen == [16]
    with pytest.raises(ValueError, match=r"workspace must be a number >= 0 \(copies of K the solve "
                                         r"needs beyond it\), or a function of K's side n "
                                         r"returning one; got -1"):
        S.load_gram(a, workspace=lambda n: -1)
    c = g.create_array("cplx", shape=K.shape, dtype="complex128", chunks=(8, 8))
    with pytest.raises(ValueError, match="complex"):
        S.load_gram(c)


@pytest.mark.parametrize("bad", [-1e-3, float("nan"), "1e-3"])
def test_max_jitter_is_checked(rng, bad):
    """A negative max_jitter tried no jitter at all, NaN said "jitter up to nan x ..."."""
    K, _ = psd(rng, 5)
    with pytest.raises(ValueError, match="max_jitter must be a"):
        S.fit_ridge(K, np.ones(5), max_jitter=bad)


def test_labels_are_classes_and_unseen_test_classes_are_warned_about(rng, caplog):
    """Fractional labels (regression targets) made every distinct value a class of its own,
    complex labels lost nothing but meant nothing, datetimes were classes: all are refused.  Test
    labels of a class the training labels lack cannot be predicted: a warning says how many."""
    K, phi = psd(rng, 30)
    y = (phi[:, 0] > 0).astype(int)
    Kt, ytr, yte, K = K[20:, :20], y[:20], y[20:], K[:20, :20]
    good = S.evaluate_classifier(K, Kt, ytr, yte, ridge=0.1)["accuracy"]
    whole = (ytr.astype(float) * 3, yte.astype(float) * 3)         # 0.0 / 3.0: classes
    assert S.evaluate_classifier(K, Kt, *whole, ridge=0.1)["accuracy"] == good
    assert S.evaluate_classifier(K, Kt, whole[0].astype(object), whole[1], ridge=0.1)["accuracy"] == good
    for args, msg in [
        ((ytr + 0.5, yte + 0.5), r"y_train must be class labels \(integers, strings, bytes, or whole-number "
                                 r"floats such as 3\.0\); got fractional numbers \([01]\.5 the first\) at index \[0, 1, "),
        ((ytr, (yte + 0.5).astype(object)), r"y_test must be class labels.*fractional numbers \([01]\.5 the first\).*regression"),
        ((ytr + 0j, yte), r"y_train must be class labels: integers, strings or bytes; got dtype complex128"),
        ((ytr, np.array([1j] * 10, dtype=object)), r"y_test must be class names of one kind.*got complex"),
        ((ytr.astype("datetime64[D]"), yte), r"y_train must be class labels.*got dtype datetime64\[D\]"),
    ]:
        with pytest.raises(ValueError, match=msg):
            S.evaluate_classifier(K, Kt, *args, ridge=0.1)
    caplog.clear()
    with caplog.at_level("WARNING", logger="cntk_engine"):
        r = S.evaluate_classifier(K, Kt, ytr, np.where(np.arange(10) < 3, 7, yte), ridge=0.1)
    assert ("3 of the 10 test labels are of classes the training labels do not hold (7): no "
            "prediction can match them") in caplog.text
    assert r["accuracy"] <= 0.7
    caplog.clear()
    with caplog.at_level("WARNING", logger="cntk_engine"):
        S.evaluate_classifier(K, Kt, ytr, yte, ridge=0.1)
    assert "test labels are of classes" not in caplog.text


def test_solve_workspace_names_the_copies_and_refuses_what_it_does_not_know():
    """load_gram's workspace for each factorisation and device (docs/solver.md); the CPU's
    figures are the measured ones the memory tests above hold."""
    assert S.solve_workspace("cholesky") == 1.1 and S.solve_workspace("eigh", "cpu") == 3.1
    assert S.solve_workspace("cholesky", None) == 1.1
    assert S.solve_workspace("cholesky", "cuda") == 2.1 and S.solve_workspace("eigh", "cuda") == 4.1
    # beyond EVD_MAX_N the CPU's eigendecomposition is syevr's: no 2 n^2 workspace, U new
    from cntk_engine.solver.linalg import EVD_MAX_N
    assert S.solve_workspace("eigh", n=EVD_MAX_N) == 3.1
    assert S.solve_workspace("eigh", n=EVD_MAX_N + 1) == 2.1
    assert S.solve_workspace("eigh", n=50_000, overwrite_k=True) == 1.1
    assert S.solve_workspace("eigh", "cuda", n=50_000) == 4.1
    assert S.solve_workspace("cholesky", n=50_000) == 1.1
    with pytest.raises(ValueError, match=r"a factorisation of \['cholesky', 'eigh'\] and a device "
                                         r"of \['cpu', 'cuda'\]; got 'lu', 'cpu'"):
        S.solve_workspace("lu")


def test_long_factorisations_say_that_they_run(rng, caplog, monkeypatch):
    """From ANNOUNCE_FROM (20,000: minutes to hours on a CPU) a factorisation says as it starts
    that nothing more is said until it ends, and then its seconds; below it, nothing."""
    from cntk_engine.solver import linalg
    K, _ = psd(rng, 30)
    with caplog.at_level(logging.INFO, logger="cntk_engine"):
        S.fit_ridge(K, np.ones(30), 0.1)
        S.eigh(K)
    assert "factorisation" not in caplog.text and "eigendecomposition" not in caplog.text
    monkeypatch.setattr(linalg, "ANNOUNCE_FROM", 30)
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="cntk_engine"):
        S.fit_ridge(K, np.ones(30), 0.1)
        S.select_ridge(K, np.ones(30))
    assert ("Cholesky factorisation of the 30 x 30 training Gram (float64, on the CPU): O(n^3), "
            "nothing is said until it ends") in caplog.text
    assert "eigendecomposition of the 30 x 30 training Gram (float64, on the CPU)" in caplog.text
    assert re.search(r"Cholesky factorisation done in \d+ s", caplog.text)
    assert re.search(r"eigendecomposition done in \d+ s", caplog.text)


def test_syevd_beyond_32bit_integers_is_replaced_by_syevr():
    """SciPy's LAPACK counts syevd's workspace (1 + 6 n + 2 n^2 doubles) in a 32-bit integer: at
    n = 32,767 the count overflows and its workspace query answers a size far too small
    (numpy#25564), so eigh at CIFAR-10's 50,000 would fail, or worse.  EVD_MAX_N is the last n
    whose count fits, and the query says so on both sides of it."""
    from scipy.linalg import get_lapack_funcs
    from scipy.linalg.lapack import _compute_lwork
    from cntk_engine.solver import linalg
    n = linalg.EVD_MAX_N
    assert 1 + 6 * n + 2 * n * n <= 2 ** 31 - 1 < 1 + 6 * (n + 1) + 2 * (n + 1) ** 2
    query, = get_lapack_funcs(("syevd_lwork",), (np.zeros((2, 2)),))
    lwork = lambda m: _compute_lwork(query, n=m, compute_v=1, lower=1)[0]   # noqa: E731
    assert lwork(n) >= 1 + 6 * n + 2 * n * n
    if lwork(n + 1) >= 2 * (n + 1) ** 2:
        pytest.skip("this SciPy's LAPACK counts syevd's workspace in 64 bits: EVD_MAX_N could "
                    "be raised for it")
    assert lwork(50_000) < 2 * 50_000 ** 2                # the overflow, as CIFAR-10 would meet it


def test_eigh_by_syevr_beyond_evd_max_n(rng, caplog, monkeypatch):
    """Beyond EVD_MAX_N, eigh uses syevr (O(n) workspace; U a new array, the private copy
    destroyed): the same decomposition to ~1e-12 (orthogonality) and the same leave-one-out
    scores, ridge and fit; one copy of K less than syevd (checked at n = 1000 with the limit
    lowered)."""
    from cntk_engine.solver import linalg
    n = 1000
    K, phi = psd(rng, n, p=300)
    K += 1e-4 * np.trace(K) / n * np.eye(n)
    y = (phi[:, 0] > 0).astype(int) + (phi[:, 1] > 0.5)
    S.fit_classifier(K[:50, :50].copy(), y[:50], overwrite_k=True)      # warm imports
    ref = S.fit_classifier(K, y)
    E_ref = S.eigh(K)
    evd_peak, _ = _peak(lambda: S.fit_classifier(K, y))
    monkeypatch.setattr(linalg, "EVD_MAX_N", n - 1)
    with caplog.at_level(logging.INFO, logger="cntk_engine"):
        E = S.eigh(K)
    assert (f"eigendecomposition by LAPACK syevr (MRRR), not syevd: at n = {n} syevd's workspace "
            f"(2 n^2 + 6 n + 1) is beyond a 32-bit LAPACK integer (n <= {n - 1})") in caplog.text
    assert np.abs(E.U.T @ E.U - np.eye(n)).max() < 1e-10
    np.testing.assert_allclose(E.s, E_ref.s, rtol=1e-10, atol=1e-12 * E_ref.s[-1])
    assert np.abs(K @ E.U - E.U * E.s).max() < 1e-12 * E.s[-1]
    fit = S.fit_classifier(K, y)
    assert fit.info["ridge_relative"] == ref.info["ridge_relative"]
    np.testing.assert_allclose(fit.info["loo_mse"], ref.info["loo_mse"], rtol=1e-9)
    np.testing.assert_allclose(fit.solution.alpha, ref.solution.alpha, rtol=1e-8, atol=1e-10)
    evr_peak, _ = _peak(lambda: S.fit_classifier(K, y))
    A = K.copy()
    given_up, _ = _peak(lambda: S.fit_classifier(A, y, overwrite_k=True))
    nb = K.nbytes
    assert evd_peak - evr_peak > 0.9 * nb and given_up < 1.2 * nb, (evd_peak / nb, evr_peak / nb,
                                                                   given_up / nb)
