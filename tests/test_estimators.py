"""scikit-learn estimators: scikit-learn's estimator checks, tiny real MNIST images, input
layouts, agreement with the solver and with KernelRidge / SVC on precomputed Grams."""
import copy
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

sklearn = pytest.importorskip("sklearn", reason="scikit-learn is an optional dependency (extra 'sklearn')")
from sklearn.base import clone  # noqa: E402
from sklearn.utils.estimator_checks import parametrize_with_checks  # noqa: E402

from cntk_engine import preprocess as pre  # noqa: E402
from cntk_engine import solver  # noqa: E402
from cntk_engine.estimators import CNTKClassifier, CNTKRegressor  # noqa: E402

gram = pytest.importorskip("cntk_engine.api", reason="cntk_engine.gram is not there yet").gram

ROOT = Path(__file__).resolve().parents[1]
DATA = Path(os.environ.get("CNTK_ENGINE_DATA", ROOT.parent / "shared" / "data"))


@pytest.fixture(autouse=True)
def _single_thread_blas():
    """The matrices here are tiny: one BLAS thread is faster, and on a loaded 2-core machine
    OpenBLAS threads fighting numba's make a 300 x 300 eigh take a second instead of 10 ms."""
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:
        yield
        return
    with threadpool_limits(limits=1, user_api="blas"):
        yield


# ----------------------------------------------------------------------------- scikit-learn checks
# scikit-learn's checks pass 2-D tabular X: with image_shape="features" each row is a 1 x 1 image
# with one channel per feature (the CNTK is then the fully connected NTK), so every check applies.
# (Without image_shape a 2-D X is refused: test_flat_x_needs_image_shape.)  None is
# expected to fail; the pandas checks skip when pandas is absent and the array-API check without
# SCIPY_ARRAY_API (scikit-learn's own skips).
EXPECTED_FAILED_CHECKS: dict = {}


def _expected_failed(est):
    return EXPECTED_FAILED_CHECKS.get(type(est).__name__, {})


@parametrize_with_checks([CNTKClassifier(depth=3, backend="numba", image_shape="features"),
                          CNTKRegressor(depth=3, backend="numba", image_shape="features")],
                         expected_failed_checks=_expected_failed)
def test_sklearn_estimator_checks(estimator, check):
    check(estimator)


# ----------------------------------------------------------------------------- tiny real images
@pytest.fixture(scope="module")
def mnist10():
    """100 MNIST test digits (10 per class), centre 20 x 20 crop average-pooled to 10 x 10,
    scaled to [0, 1]: 60 for training, 40 for testing."""
    path = DATA / "mnist_test.npz"
    if not path.exists():
        pytest.skip(f"real data {path} not found (set CNTK_ENGINE_DATA to the folder holding it)")
    with np.load(path) as z:
        x, y = z["x"], z["y"].astype(np.int64)
    idx = np.concatenate([np.nonzero(y == c)[0][:10] for c in range(10)])
    idx = np.random.default_rng(0).permutation(idx)
    xs = x[idx, 4:24, 4:24].astype(np.float64).reshape(-1, 10, 2, 10, 2).mean(axis=(2, 4)) / 255.0
    xs = xs[:, None]                                   # (100, 1, 10, 10)
    return xs[:60], y[idx][:60], xs[60:], y[idx][60:]


ARCH = dict(depth=3, pooling="gap", backend="numba")


def test_classifier_on_mnist_matches_solver(mnist10):
    xtr, ytr, xte, yte = mnist10
    clf = CNTKClassifier(**ARCH, ridge=1e-4).fit(xtr, ytr)
    pred = clf.predict(xte)
    acc = float(np.mean(pred == yte))
    assert acc >= 0.5, acc                           # 10 classes: chance is 0.1
    assert clf.score(xte, yte) == pytest.approx(acc)
    # the same by hand: gram + solver
    K = gram(xtr, depth=3, backend="numba")
    Kt = gram(xte, xtr, depth=3, backend="numba")
    Y, classes = solver.paper_targets(ytr)
    F = solver.kernel_ridge(K, Y, Kt, 1e-4 * np.mean(np.diag(K)))
    np.testing.assert_array_equal(pred, classes[F.argmax(1)])
    np.testing.assert_allclose(clf.decision_function(xte), F, rtol=1e-6, atol=1e-9)
    assert clf.ridge_ == 1e-4 and clf.ridge_absolute_ == pytest.approx(1e-4 * np.mean(np.diag(K)))
    assert clf.image_shape_ == (1, 10, 10) and clf.n_features_in_ == 100


@pytest.mark.parametrize("cls", [CNTKClassifier, CNTKRegressor])
def test_standardize_is_fitted_on_the_training_images_as_evaluate_does(cls, mnist10):
    """preprocess="standardize" (evaluate's default) was refused: the estimator and evaluate
    disagreed on the same images.  The test images take the training images' moments."""
    xtr, ytr, xte, _ = mnist10
    raw_tr, raw_te = xtr * 200 + 30, xte * 200 + 30                     # an offset: it matters
    est = cls(**ARCH, ridge=1e-3, dtype="float64", preprocess="standardize").fit(raw_tr, ytr)
    a, b = pre.preprocess(raw_tr, raw_te, "standardize")
    np.testing.assert_allclose(est.X_fit_, a, rtol=1e-12, atol=1e-12)
    K, Kt = gram(a, depth=3, backend="numba", dtype="float64"), gram(b, a, depth=3, backend="numba",
                                                                      dtype="float64")
    if cls is CNTKClassifier:
        Y, classes = solver.paper_targets(ytr)
    else:
        Y = ytr.astype(float)
    F = solver.kernel_ridge(K, Y, Kt, 1e-3 * np.mean(np.diag(K)))
    got = est.decision_function(raw_te) if cls is CNTKClassifier else est.predict(raw_te)
    np.testing.assert_allclose(got, F, rtol=1e-8, atol=1e-10)
    assert est.standardization_.mean.shape == (1, 1, 1, 1) and est.zca_ is None
    # the test images alone would standardise to other values: the training moments are kept
    assert not np.allclose(pre.standardize(raw_te)[0], b)
    # fitted on channels-last images, a standardisation reads and returns them so (helper-94)
    nhwc = np.random.default_rng(3).random((5, 3, 4, 2)) * np.array([1.0, 100.0])
    fitted = pre.fit_standardize(nhwc, data_format="NHWC")
    out = fitted.transform(nhwc)
    assert out.shape == nhwc.shape and fitted.data_format == "NHWC"
    np.testing.assert_allclose(out.std(axis=(0, 1, 2)), [1.0, 1.0], rtol=1e-12)
    np.testing.assert_allclose(out, pre.standardize(nhwc, data_format="NHWC")[0], rtol=1e-12)
    with pytest.raises(ValueError, match="preprocess must be None, 'standardize' .* or 'zca'"):
        cls(**ARCH, preprocess="whiten").fit(raw_tr, ytr)


def test_classifier_auto_ridge_and_layouts(mnist10):
    xtr, ytr, xte, yte = mnist10
    clf = CNTKClassifier(**ARCH).fit(xtr, ytr)              # ridge="auto": LOO accuracy
    assert clf.ridge_ in np.asarray(solver.RELATIVE_RIDGE_GRID)
    assert clf.loo_.accuracy is not None and clf.loo_.method == "loo"
    best = np.nanmax(clf.loo_.accuracy)
    assert clf.loo_.accuracy[list(clf.loo_.ridges / clf.ridge_absolute_ * clf.ridge_).index(clf.ridge_)] == best
    pred = clf.predict(xte)
    assert np.mean(pred == yte) >= 0.5
    # refitted with a number: no scores of the earlier "auto" fit left behind
    assert copy.deepcopy(clf).set_params(ridge=0.1).fit(xtr, ytr).loo_ is None
    # flattened rows + image_shape, 3-D (N, H, W) and NHWC give the same model
    flat = CNTKClassifier(**ARCH, image_shape=(1, 10, 10)).fit(xtr.reshape(60, -1), ytr)
    np.testing.assert_array_equal(flat.predict(xte.reshape(40, -1)), pred)
    np.testing.assert_array_equal(flat.predict(xte), pred)         # 4-D into a flat-fitted model
    np.testing.assert_array_equal(CNTKClassifier(**ARCH).fit(xtr[:, 0], ytr).predict(xte[:, 0]), pred)
    nhwc = CNTKClassifier(**ARCH, data_format="NHWC").fit(xtr.transpose(0, 2, 3, 1), ytr)
    np.testing.assert_array_equal(nhwc.predict(xte.transpose(0, 2, 3, 1)), pred)
    # string labels, one-hot targets
    names = np.array(list("abcdefghij"))
    s = CNTKClassifier(**ARCH, targets="onehot", ridge=1e-4).fit(xtr, names[ytr])
    assert set(s.predict(xte)) <= set(names) and np.mean(s.predict(xte) == names[yte]) >= 0.5


def test_regressor_multi_output_matches_solver(mnist10):
    xtr, ytr, xte, _ = mnist10
    Y = np.stack([ytr.astype(float), xtr.mean(axis=(1, 2, 3))], axis=1)
    reg = CNTKRegressor(**ARCH, ridge=1e-3).fit(xtr, Y)
    K, Kn = gram(xtr, depth=3, kernel="both", backend="numba")
    Kt, Ktn = gram(xte, xtr, depth=3, kernel="both", backend="numba")
    want = solver.kernel_ridge(K, Y, Kt, 1e-3 * np.mean(np.diag(K)))
    np.testing.assert_allclose(reg.predict(xte), want, rtol=1e-6, atol=1e-9)
    one = CNTKRegressor(**ARCH, ridge=1e-3).fit(xtr, Y[:, 1])
    assert one.predict(xte).shape == (40,)
    np.testing.assert_allclose(one.predict(xte), want[:, 1], rtol=1e-6, atol=1e-9)
    # the mean pixel is a smooth function of the image: well predicted
    auto = CNTKRegressor(**ARCH).fit(xtr, Y[:, 1])
    assert auto.score(xte, xte.mean(axis=(1, 2, 3))) > 0.8
    nngp = CNTKRegressor(**ARCH, kernel="nngp", ridge=1e-3).fit(xtr, Y[:, 1])
    np.testing.assert_allclose(nngp.predict(xte), solver.gp_posterior(Kn, Y[:, 1], Ktn, noise=1e-3 * np.mean(np.diag(Kn))).mean,
                               rtol=1e-6, atol=1e-9)


def test_precomputed_kernel_ridge_and_svc(mnist10):
    """The engine's Gram matrices plug into scikit-learn's precomputed-kernel estimators."""
    from sklearn.kernel_ridge import KernelRidge
    from sklearn.svm import SVC
    xtr, ytr, xte, yte = mnist10
    K = gram(xtr, depth=3, backend="numba")
    Kt = gram(xte, xtr, depth=3, backend="numba")
    Y, classes = solver.paper_targets(ytr)
    lam = 1e-3 * np.mean(np.diag(K))
    kr = KernelRidge(kernel="precomputed", alpha=lam).fit(K, Y)
    np.testing.assert_allclose(kr.predict(Kt), solver.kernel_ridge(K, Y, Kt, lam), rtol=1e-6, atol=1e-8)
    scale = np.mean(np.diag(K))              # SVC's C is not scale-free: use K / mean(diag K)
    svc = SVC(kernel="precomputed", C=1e3).fit(K / scale, ytr)   # entries ~1: a hard margin
    acc = svc.score(Kt / scale, yte)
    assert acc >= 0.5, acc
    # and the classifier estimator with the same ridge gives the KernelRidge argmax
    clf = CNTKClassifier(**ARCH, ridge=1e-3).fit(xtr, ytr)
    np.testing.assert_array_equal(clf.predict(xte), classes[kr.predict(Kt).argmax(1)])


# ----------------------------------------------------------------------------- params and errors
def test_params_clone_and_errors(mnist10):
    xtr, ytr, xte, _ = mnist10
    clf = CNTKClassifier(depth=4, pooling="flatten", ridge=0.5, backend="numba")
    p = clf.get_params()
    assert p["depth"] == 4 and p["pooling"] == "flatten" and p["ridge"] == 0.5 and p["targets"] == "paper"
    assert clone(clf).set_params(depth=5).get_params()["depth"] == 5
    assert set(CNTKRegressor().get_params()) == set(p) - {"targets"}
    with pytest.raises(ValueError, match="ridge must be 'auto'"):
        CNTKClassifier(ridge=-1, **{k: v for k, v in ARCH.items()}).fit(xtr, ytr)
    with pytest.raises(ValueError, match="ridge must be 'auto'"):
        CNTKRegressor(ridge="loo", **ARCH).fit(xtr, ytr)
    with pytest.raises(ValueError, match="targets must be"):
        CNTKClassifier(targets="pm1", **ARCH).fit(xtr, ytr)
    with pytest.raises(ValueError, match="kernel must be one of"):
        CNTKClassifier(kernel="both", **ARCH).fit(xtr, ytr)
    with pytest.raises(ValueError, match="image_shape must be None, three positive integers"):
        CNTKClassifier(image_shape=(10, 10), **ARCH).fit(xtr.reshape(60, -1), ytr)
    with pytest.raises(ValueError, match="100 features per row but image_shape"):
        CNTKClassifier(image_shape=(1, 9, 9), **ARCH).fit(xtr.reshape(60, -1), ytr)
    with pytest.raises(ValueError, match=r"images of shape \(C, H, W\) = \(1, 10, 10\) but image_shape"):
        CNTKClassifier(image_shape=(2, 5, 10), **ARCH).fit(xtr, ytr)
    with pytest.raises(ValueError, match="at least 2 classes"):
        CNTKClassifier(**ARCH).fit(xtr, np.zeros(60, dtype=int))
    with pytest.raises(ValueError, match="depth"):
        CNTKClassifier(depth=0, pooling="gap", backend="numba").fit(xtr, ytr)
    fitted = CNTKClassifier(**ARCH, ridge=1e-3).fit(xtr[:12], ytr[:12])
    with pytest.raises(ValueError, match=r"fitted on \(1, 10, 10\)"):
        # same number of pixels, another image shape
        fitted.predict(xte[:, :, :, :].reshape(40, 1, 10, 10).reshape(40, 2, 5, 10))
    with pytest.raises(ValueError, match=r"X holds images of shape \(C, H, W\) = \(1, 8, 8\); this "
                                         r"estimator was fitted on \(1, 10, 10\) \(it reads X as "
                                         r"\(N, C, H, W\): data_format=None\)"):
        fitted.predict(xte[:, :, :8, :8])          # another pixel count: not scikit-learn's words
    with pytest.raises(ValueError, match=r"fitted on \(1, 10, 10\) \(it reads a 3-D X as \(N, H, W\), one channel\)"):
        fitted.predict(xte[:, 0, :8, :8])
    with pytest.raises(ValueError, match=r"Found array with 0 sample"):
        fitted.predict(xte[:0])
    for X in (xtr[:12, None], xte[:3, None]):
        with pytest.raises(ValueError, match=r"X must be images \(N, C, H, W\).*got a 5-D array"):
            (CNTKClassifier(**ARCH).fit(X, ytr[:12]) if len(X) == 12 else fitted.predict(X))


def test_default_layout_refuses_channels_last_as_gram_does(monkeypatch):
    """data_format=None (the default) reads NCHW and refuses CIFAR's (N, 32, 32, 3) with gram's
    own message (not 32 channels of 32 x 3 images), before any kernel; "NCHW" explicitly takes
    it, "NHWC" reads it as channels-last."""
    import cntk_engine.api
    x = np.random.default_rng(0).random((6, 32, 32, 3))
    y = np.arange(6) % 2
    assert CNTKClassifier().get_params()["data_format"] is None
    assert CNTKRegressor().get_params()["data_format"] is None
    with pytest.raises(ValueError) as gram_err:
        gram(x, depth=3)
    real = cntk_engine.api.gram
    monkeypatch.setattr(cntk_engine.api, "gram", lambda *a, **k: pytest.fail("gram was called"))
    for est in (CNTKClassifier(depth=3), CNTKRegressor(depth=3)):
        with pytest.raises(ValueError, match="looks like the channels of channels-last data") as e:
            est.fit(x, y)
        assert str(e.value) == str(gram_err.value).replace("x1 has", "X has")
    with pytest.raises(ValueError, match="data_format must be None"):
        CNTKClassifier(depth=3, data_format="CHW").fit(x, y)
    monkeypatch.setattr(cntk_engine.api, "gram", real)
    small = x[:, :4, :4]
    assert CNTKClassifier(depth=3, data_format="NCHW", ridge=0.1).fit(small, y).image_shape_ == (4, 4, 3)
    assert CNTKClassifier(depth=3, data_format="NHWC", ridge=0.1).fit(small, y).image_shape_ == (3, 4, 4)


def test_flat_x_needs_image_shape():
    """A 2-D X without image_shape is refused (flattened images would silently be 1 x 1 images
    with C*H*W channels), naming the ways to say what it is; image_shape="features" takes it as
    tabular data, the same model as image_shape=(F, 1, 1)."""
    rng = np.random.default_rng(0)
    X, y = rng.random((8, 12)), np.arange(8) % 2
    with pytest.raises(ValueError, match=r"X is 2-D with 12 features per row and image_shape is None.*"
                       r"image_shape=\(3, 2, 2\).*image_shape='features'"):
        CNTKClassifier(depth=3).fit(X, y)
    with pytest.raises(ValueError, match=r"e\.g\. image_shape=\(1, 28, 28\)"):
        CNTKRegressor(depth=3).fit(rng.random((4, 784)), rng.random(4))
    tab = CNTKClassifier(depth=3, ridge=0.1, image_shape="features").fit(X, y)
    assert tab.image_shape_ == (12, 1, 1)
    same = CNTKClassifier(depth=3, ridge=0.1, image_shape=(12, 1, 1)).fit(X, y)
    np.testing.assert_array_equal(tab.decision_function(X), same.decision_function(X))
    with pytest.raises(ValueError, match="image_shape='features' is for 2-D tabular X"):
        CNTKClassifier(depth=3, image_shape="features").fit(X.reshape(8, 3, 2, 2), y)
    with pytest.raises(ValueError, match="image_shape must be None, three positive integers"):
        CNTKClassifier(depth=3, image_shape="tabular").fit(X, y)


def test_the_model_keeps_its_own_copy_of_x_and_refuses_what_it_cannot_read():
    """X_fit_ is never the caller's array: X changed in place after fit leaves the predictions
    as they were; a masked X with masked pixels, a record dtype, dates and durations are refused
    by name."""
    rng = np.random.default_rng(1)
    X, y = rng.random((6, 1, 4, 4)), rng.random(6)
    model = CNTKRegressor(depth=3, ridge=0.1, backend="numba").fit(X, y)
    assert not np.may_share_memory(model.X_fit_, X)
    before = model.predict(X[:2].copy())
    X *= 2.0
    np.testing.assert_array_equal(model.predict(X[:2] / 2.0), before)
    with pytest.raises(ValueError, match=r"X is a masked array with \d+ masked pixel\(s\)"):
        CNTKRegressor(depth=3).fit(np.ma.masked_greater(X, 1.0), y)
    rec = np.zeros((6, 2), dtype=[("a", "f8"), ("b", "f8")])
    with pytest.raises(ValueError, match=r"X must hold real numbers .*got dtype"):
        CNTKRegressor(depth=3, image_shape=(1, 1, 2)).fit(rec, y)
    for when in ("datetime64[s]", "timedelta64[ms]"):      # scikit-learn would cast them
        with pytest.raises(ValueError, match=r"X must hold real numbers .*got dtype " + re.escape(when)):
            CNTKRegressor(depth=3).fit(X.astype(np.int64).astype(when), y)


def test_augment_flips_loo_leaves_each_image_out_with_its_flip(monkeypatch):
    """With augment_flips, ridge="auto" scores each image with the model refitted without it AND
    its flipped copy: the estimators hand the solve (fit_relative_ridge: select_ridge) one group
    per original."""
    seen = []
    real = solver.fit_relative_ridge

    def spy(*a, **k):
        seen.append(k.get("groups"))
        return real(*a, **k)

    monkeypatch.setattr(solver, "fit_relative_ridge", spy)
    rng = np.random.default_rng(1)
    X, y = rng.random((6, 1, 4, 4)), np.array([0, 1, 0, 1, 0, 1])
    clf = CNTKClassifier(depth=3, augment_flips=True).fit(X, y)
    CNTKRegressor(depth=3, augment_flips=True).fit(X, y.astype(float))
    CNTKClassifier(depth=3).fit(X, y)
    for g in seen[:2]:
        np.testing.assert_array_equal(g, np.tile(np.arange(6), 2))
    assert seen[2] is None
    assert clf.loo_.n_groups == 6 and clf.X_fit_.shape[0] == 12


def test_fix_at_depth_2_refused_before_any_kernel(monkeypatch):
    """fix=True at depth 2 trains nothing (an all-zero NTK): the estimators refuse it in fit,
    before the Gram, with gram's message."""
    import cntk_engine.api
    monkeypatch.setattr(cntk_engine.api, "gram", lambda *a, **k: pytest.fail("gram was called"))
    X, y = np.random.default_rng(0).standard_normal((6, 1, 4, 4)), np.arange(6) % 2
    for est in (CNTKClassifier(depth=2, fix=True), CNTKRegressor(depth=2, fix=True, kernel="nngp")):
        with pytest.raises(ValueError, match=r"fix=True needs depth >= 3.*identically 0"):
            est.fit(X, y)
    with pytest.raises(ValueError, match="dtype must be one of"):
        CNTKRegressor(depth=3, dtype="float16").fit(X, y)
    # a NumPy type is its name to the checks (dtype=np.float32 lost the float32 jitter warning)
    assert CNTKRegressor(depth=3, dtype=np.float32)._compute_dtype((4, 4)) == "float32"


def test_errors_name_the_images_as_the_caller_passed_them(monkeypatch):
    """An image the kernel cannot take is named as X[i] (it was x1[i], x2[i] in the engine's
    words, with predict's training set as x2 and the flipped copies counted on)."""
    rng = np.random.default_rng(0)
    X, y = rng.random((4, 1, 4, 4)), np.array([0, 1, 0, 1])
    tiny = X.copy()
    tiny[2] *= 1e-150
    with pytest.raises(ValueError, match=r"^X\[2\] \(max \|pixel\| about 2\^-498\)"):
        CNTKClassifier(depth=3).fit(tiny, y)
    clf = CNTKClassifier(depth=3, augment_flips=True).fit(X, y)
    huge = X[:3].copy()
    huge[1] *= 1e150
    with pytest.raises(ValueError, match=r"^X\[1\] \(max \|pixel\| about 2\^499\)"):
        clf.predict(huge)
    # one training sample: leave-one-out has nothing to fit (it chose the largest ridge); refused
    # before the Gram, with flips too (it spoke of groups, which the caller never gave)
    with monkeypatch.context() as m:
        m.setattr(CNTKRegressor, "_gram", lambda *a: pytest.fail("the Gram ran before the check"))
        for flips in (False, True):
            with pytest.raises(ValueError, match="ridge='auto' chooses the ridge by leave-one-out, which "
                                                 "needs at least 2 training images; got n_samples = 1"):
                CNTKRegressor(depth=3, augment_flips=flips).fit(X[:1], [1.0])
    assert CNTKRegressor(depth=3, ridge=0.1).fit(X[:1], [1.0]).predict(X).shape == (4,)


def test_the_flips_of_a_training_set_are_named_as_such():
    from cntk_engine.spelling import image, images_as
    clf = CNTKClassifier(depth=3, augment_flips=True)
    seen = {}

    def record(a, b=None, **kw):
        seen.update({k: [image(k, i) for i in (0, 3, 4, 7)] for k in ("x1", "x2")})
        return np.zeros((len(a), len(a) if b is None else len(b)))
    import cntk_engine.api as api
    with pytest.MonkeyPatch.context() as m:
        m.setattr(api, "gram", record)
        clf._gram(np.zeros((8, 1, 4, 4)))
        assert seen["x1"] == ["X[0]", "X[3]", "the flip of X[0]", "the flip of X[3]"]
        clf._fitted_with_flips = True                 # as fit sets it
        clf.set_params(augment_flips=False)            # a later set_params does not rename X_fit_
        clf._gram(np.zeros((8, 1, 4, 4)), np.zeros((8, 1, 4, 4)))
        assert seen["x1"] == ["X[0]", "X[3]", "X[4]", "X[7]"]
        assert seen["x2"][1:3] == ["X[3] of the training set", "the flip of X[0] of the training set"]
    with images_as({}):
        assert image("x1", 5) == "x1[5]"


def test_numpy_scalar_grids():
    """GridSearchCV over np.arange / np.array grids hands NumPy scalars to the parameters."""
    from sklearn.model_selection import GridSearchCV
    rng = np.random.default_rng(0)
    X, y = rng.standard_normal((8, 2)), rng.standard_normal(8)   # 1 x 1 images, 2 channels
    grid = {"filter_size": np.arange(1, 4, 2), "depth": np.array([3]), "fix": np.array([False, True]),
            "W_std": np.array([1.0, 2.0], dtype=np.float32)}
    gs = GridSearchCV(CNTKRegressor(ridge=0.1, convention="neural_tangents", backend="reference",
                                    image_shape="features"),
                      grid, cv=2, error_score="raise").fit(X, y)
    assert len(gs.cv_results_["params"]) == 8 and np.isfinite(gs.cv_results_["mean_test_score"]).all()
    best = gs.best_estimator_
    ref = CNTKRegressor(ridge=0.1, convention="neural_tangents", backend="reference",
                        image_shape="features", **{k: v.item() for k, v in gs.best_params_.items()}).fit(X, y)
    np.testing.assert_array_equal(best.predict(X), ref.predict(X))


def test_import_without_sklearn(tmp_path):
    """Importing cntk_engine does not import scikit-learn; the estimators say what is missing."""
    code = ("import sys; import cntk_engine; assert 'sklearn' not in sys.modules, 'sklearn imported'; "
            "sys.modules['sklearn'] = None\n"
            "try:\n    import cntk_engine.estimators\nexcept ImportError as e:\n    print(e)")
    r = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert 'pip install ".[sklearn]" in the cntk_engine source folder' in r.stdout


@pytest.mark.parametrize("cls", [CNTKClassifier, CNTKRegressor])
def test_a_failed_fit_leaves_the_last_model_as_it_was(cls, monkeypatch):
    """A re-fit that failed after the whitening was refitted (a bad backend, Ctrl-C in the Gram)
    left the new zca_ beside the old X_fit_ and dual_coef_: predictions changed silently.  A
    failed single-class fit left classes_ = [0] and predict raised IndexError."""
    rng = np.random.default_rng(5)
    X, X2 = rng.standard_normal((12, 1, 6, 6)), rng.standard_normal((12, 1, 6, 6)) * 3 + 1
    y = np.arange(12) % 3
    est = cls(depth=3, ridge=0.1, preprocess="zca", backend="numba").fit(X, y)
    before = {k: v for k, v in vars(est).items() if k.endswith("_")}
    want = est.predict(X)

    def interrupted(*a, **k):
        raise KeyboardInterrupt
    with monkeypatch.context() as m:
        m.setattr(cls, "_gram", interrupted)
        with pytest.raises(KeyboardInterrupt):
            est.fit(X2, y)
    with pytest.raises(ValueError, match="backend must be one of"):      # before any work
        est.set_params(backend="bogus").fit(X2[:, :, :5], y)
    est.set_params(backend="numba")
    if cls is CNTKClassifier:
        with pytest.raises(ValueError, match=r"at least 2 classes; got 1 class \(0\)"):
            est.fit(X2, np.zeros(12, int))
    assert {k: v for k, v in vars(est).items() if k.endswith("_")}.keys() == before.keys()
    assert all(vars(est)[k] is v for k, v in before.items())
    np.testing.assert_array_equal(est.predict(X), want)
    fresh = cls(depth=3, ridge=0.1, backend="numba")
    with monkeypatch.context() as m:
        m.setattr(cls, "_gram", interrupted)
        with pytest.raises(KeyboardInterrupt):
            fresh.fit(X, y)
    assert not [k for k in vars(fresh) if k.endswith("_") or k in ("_fitted_with_flips", "_y_1d")]
    with pytest.raises(sklearn.exceptions.NotFittedError):
        fresh.predict(X)


@pytest.mark.parametrize("cls", [CNTKClassifier, CNTKRegressor])
def test_predict_uses_the_network_of_the_fit(cls, monkeypatch):
    """The kernel of predict is the fit's: parameters changed after it, by set_params alone or
    by a later fit interrupted in its Gram (whose dual coefficients never came), do not mix
    another network with the fitted dual coefficients."""
    import cntk_engine.api
    rng = np.random.default_rng(7)
    X, Xt = rng.standard_normal((10, 1, 6, 6)), rng.standard_normal((3, 1, 6, 6))
    y = np.arange(10) % 2
    est = cls(depth=3, ridge=0.01, backend="numba").fit(X, y)
    want = est.predict(Xt)
    F = est.decision_function(Xt) if cls is CNTKClassifier else want
    real = cntk_engine.api.gram

    def interrupted(*a, **k):
        raise KeyboardInterrupt
    monkeypatch.setattr(cntk_engine.api, "gram", interrupted)
    with pytest.raises(KeyboardInterrupt):
        est.set_params(depth=6).fit(X * 2, y)
    monkeypatch.setattr(cntk_engine.api, "gram", real)
    np.testing.assert_array_equal(est.predict(Xt), want)
    est.set_params(kernel="nngp", pooling="flatten", convention="neural_tangents", W_std=1.3,
                   dtype="float64")
    got = est.decision_function(Xt) if cls is CNTKClassifier else est.predict(Xt)
    np.testing.assert_array_equal(got, F)
    assert est.fit(X, y)._network_["kernel"] == "nngp"                     # a refit takes them


def test_array_likes_are_copied_and_channels_last_image_shapes_refused():
    """X_fit_ is the model's own also where X is an array-like whose __array__ hands NumPy its
    buffer (a CPU torch tensor, a DataFrame); a flattened X with a channels-last image_shape
    under the default data_format is refused as 4-D channels-last X is; messages quote
    image_shape as given."""
    rng = np.random.default_rng(2)
    buf = rng.random((6, 48))

    class Tensor:
        shape, ndim, dtype = buf.shape, 2, buf.dtype

        def __array__(self, dtype=None, copy=None):
            return buf

        def __len__(self):
            return len(buf)
    est = CNTKRegressor(depth=3, ridge=0.1, backend="numba", image_shape=(3, 4, 4))
    est.fit(Tensor(), rng.random(6))
    assert not np.may_share_memory(est.X_fit_, buf)
    with pytest.raises(ValueError, match=r"image_shape \(8, 4, 3\) read as \(C, H, W\) .* is 8 "
                                         "channels of 4 x 3 images, but its last value"):
        CNTKRegressor(depth=3, image_shape=(8, 4, 3)).fit(rng.random((6, 96)), rng.random(6))
    CNTKRegressor(depth=3, ridge=0.1, image_shape=(8, 4, 3), data_format="NCHW",
                  backend="numba").fit(rng.random((6, 96)), rng.random(6))
    CNTKRegressor(depth=3, ridge=0.1, image_shape=(12, 1, 1), backend="numba").fit(
        rng.random((6, 12)), rng.random(6))                             # tabular as 1 x 1 images
    with pytest.raises(ValueError, match=r"X holds images of shape \(C, H, W\) = \(2, 8, 8\) but "
                                         r"image_shape \(8, 8, 3\) says \(C, H, W\) = \(3, 8, 8\)"):
        CNTKRegressor(depth=3, image_shape=(8, 8, 3), data_format="NHWC").fit(
            rng.random((4, 8, 8, 2)), rng.random(4))
    with pytest.raises(ValueError, match="y mixes labels that cannot be ordered"):
        CNTKClassifier(depth=3).fit(rng.random((4, 1, 4, 4)), np.array(["a", 1, "b", 2], dtype=object))


def test_zca_is_refused_for_tabular_features():
    """Its layer normalisation centres each row: two features became one of two points (0.64
    accuracy where 0.94 without), one feature a "constant image" error."""
    X = np.random.default_rng(0).standard_normal((20, 2))
    with pytest.raises(ValueError, match=r"preprocess='zca' whitens images .* collapses rows of "
                                         r"tabular features \(image_shape='features'\); "
                                         r"preprocess='standardize' scales each feature"):
        CNTKClassifier(depth=3, image_shape="features", preprocess="zca").fit(X, np.arange(20) % 2)
    # which it does, as StandardScaler (its std with ddof 0)
    X[:, 1] = 50 * X[:, 1] + 7
    est = CNTKRegressor(depth=3, image_shape="features", preprocess="standardize", ridge=0.1)
    est.fit(X, X[:, 0])
    scaled = (X - X.mean(axis=0)) / X.std(axis=0)
    np.testing.assert_allclose(est.X_fit_.reshape(20, 2), scaled, rtol=1e-12, atol=1e-12)


def test_a_gram_that_tells_no_training_image_apart_is_refused():
    """Images constant in each channel standardise to 0 and their Gram is 0: the fit
    "succeeded" and predicted one class for everything (helper-94), where evaluate refuses."""
    X = np.full((6, 1, 6, 6), 3.0)
    X[3:] = 5.0
    y = np.arange(6) % 2
    for cls in (CNTKClassifier, CNTKRegressor):
        est = cls(depth=3, preprocess="standardize", ridge=0.1, backend="numba")
        with pytest.raises(ValueError, match=r"^every entry of the training Gram is 0: the kernel "
                                             r"does not tell the training images apart"):
            est.fit(X[:3], y[:3])
        assert not hasattr(est, "dual_coef_")
        est.fit(X, y)           # two values per channel: standardised, they differ
    with pytest.raises(ValueError, match="every entry of the training Gram is 0"):
        CNTKClassifier(depth=3, ridge=0.1, backend="numba").fit(np.zeros((4, 1, 5, 5)), np.arange(4) % 2)


@pytest.mark.parametrize("cls", [CNTKClassifier, CNTKRegressor])
def test_dtype_none_is_float64_on_features_and_float32_on_images(cls, monkeypatch):
    """The default dtype=None computes 1 x 1 images (tabular features, cheap) in float64, where
    float32 loses up to ~4e-4 of the kernel on nearly parallel rows, and larger images in
    float32; a dtype given is used as given, and predict computes in the fit's."""
    import cntk_engine.api
    rng = np.random.default_rng(5)
    F, y = rng.normal(loc=100, size=(12, 2)), np.arange(12) % 2
    seen = []
    real = cntk_engine.api.gram

    def spy(*a, **k):
        seen.append(k["dtype"])
        return real(*a, **k)
    monkeypatch.setattr(cntk_engine.api, "gram", spy)
    est = cls(depth=3, backend="numba", ridge=0.01, image_shape="features").fit(F, y)
    assert est.get_params()["dtype"] is None and est._dtype_ == "float64"
    K = gram(F[:, :, None, None], depth=3, backend="numba", dtype="float64")
    want = K @ solver.fit_ridge(K, (solver.paper_targets(y)[0] if cls is CNTKClassifier
                                    else y.astype(float)), 0.01 * np.mean(np.diag(K))).alpha
    want = want[:, 1] - want[:, 0] if cls is CNTKClassifier else want[:, 0]
    got = est.decision_function(F) if cls is CNTKClassifier else est.predict(F)
    # (float64 itself loses ~3e-10 of such a kernel: K(a, b) and K(b, a) differ by that much)
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-7)
    cls(depth=3, backend="numba", ridge=0.01).fit(rng.standard_normal((6, 1, 4, 4)), y[:6])
    cls(depth=3, backend="numba", ridge=0.01, image_shape="features", dtype="float32").fit(F, y)
    assert seen[-2:] == ["float32", "float32"] and set(seen[:2]) == {"float64"}


def test_a_ridge_0_fit_on_a_float32_gram_that_needed_jitter_says_the_rounding_sets_it(caplog):
    """One image twice under two labels: the Gram is singular, and in float32 K(a, b) and
    K(b, a) differ in their last bits, so the jitter that factorises it is below the Gram's
    rounding and the fit is set by that rounding: a warning says so and what to use instead;
    in float64 (exactly singular: the same jitter, no rounding above it) it does not."""
    rng = np.random.default_rng(3)
    X = rng.random((6, 1, 6, 6))
    X = np.concatenate([X, X[:1]])
    y = np.array([0, 1, 0, 1, 0, 1, 1])
    with caplog.at_level("WARNING", logger="cntk_engine"):
        est = CNTKClassifier(depth=3, backend="numba", ridge=0, dtype="float32").fit(X, y)
    assert est.jitter_ > 0
    assert "the fit is set by that rounding" in caplog.text and "dtype='float64'" in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING", logger="cntk_engine"):
        CNTKClassifier(depth=3, backend="numba", ridge=0, dtype="float64").fit(X, y)
    assert "set by that rounding" not in caplog.text


@pytest.mark.parametrize("kw, eps", [(dict(dtype="float32"), np.float32), (dict(dtype="float64"), np.float64),
                                     (dict(dtype="float32", backend="reference"), np.float64),
                                     (dict(image_shape="features"), np.float64)])
def test_the_solver_is_told_the_rounding_of_the_gram_it_solves(kw, eps, monkeypatch):
    """The estimator passes the epsilon of the dtype its Gram was computed in (the reference
    backend computes in float64 whatever dtype says), so that a pivot within float32's rounding
    counts as singular: an image and 1e-4 times it under two labels left a float32 pivot of
    ~1e-8 of its entry, a fit of 1e16 and no warning (tests/test_solver.py builds
    such a pivot)."""
    seen = []
    real = solver.fit_relative_ridge

    def spy(*a, **k):
        seen.append(k["rounding"])
        return real(*a, **k)
    monkeypatch.setattr(solver, "fit_relative_ridge", spy)
    rng = np.random.default_rng(3)
    features = kw.get("image_shape") == "features"
    X = rng.random((6, 3)) if features else rng.random((6, 1, 5, 5))
    est = CNTKClassifier(**dict(dict(depth=3, backend="numba", ridge=0.01), **kw))
    est.fit(X, np.arange(6) % 2)
    assert seen == [float(np.finfo(eps).eps)]


def test_a_gram_refused_as_not_positive_definite_says_what_the_estimator_can_do(monkeypatch):
    rng = np.random.default_rng(3)
    X, y = rng.random((6, 1, 6, 6)), np.arange(6) % 2

    def refuse(*a, **k):
        raise solver.NotPositiveDefinite("K + 0 I (6 x 6) is not positive definite even with jitter")
    monkeypatch.setattr(solver, "fit_relative_ridge", refuse)
    with pytest.raises(solver.NotPositiveDefinite,
                       match=r"computed in float32: ridge='auto' .* dtype='float64'"):
        CNTKClassifier(depth=3, backend="numba", ridge=0).fit(X, y)
    with pytest.raises(solver.NotPositiveDefinite,
                       match=r"computed in float64: ridge='auto' .* or give a larger ridge$"):
        CNTKClassifier(depth=3, backend="numba", ridge=0, dtype="float64").fit(X, y)

    # ridge='auto' failing: neither 'auto' advised nor the solver's retry with a K the caller
    # gave up (the Gram is the estimator's own)
    def all_skipped(*a, **k):
        raise solver.NotPositiveDefinite("every ridge of the grid leaves K + ridge I singular",
                                         " (K was given up, overwrite_k: retry with the Gram)")
    monkeypatch.setattr(solver, "fit_relative_ridge", all_skipped)
    with pytest.raises(solver.NotPositiveDefinite) as e:
        CNTKClassifier(depth=3, backend="numba").fit(X, y)
    assert "overwrite_k" not in str(e.value) and "ridge='auto' chooses" not in str(e.value)
    assert str(e.value).startswith("every ridge of the grid leaves K + ridge I singular.  The "
                                   "training Gram was computed in float32: a relative ridge of 1e-5")


def test_flips_of_images_1_pixel_wide_are_refused_or_said(caplog):
    """Tabular features are 1 x 1 images, each its own flip: augment_flips would hold every row
    twice (a singular Gram at 4 times the cost) and is refused; flip=True computes the plain
    kernel at twice its cost, which a warning says."""
    X, y = np.random.default_rng(0).random((8, 3)), np.arange(8) % 2
    with pytest.raises(ValueError, match=r"X holds images 1 pixel wide .* every image twice"):
        CNTKClassifier(depth=3, backend="numba", image_shape="features", augment_flips=True).fit(X, y)
    with caplog.at_level("WARNING", logger="cntk_engine"):
        flipped = CNTKClassifier(depth=3, backend="numba", ridge=0.1, image_shape="features",
                                 flip=True).fit(X, y)
    assert "flip=True on images 1 pixel wide" in caplog.text
    plain = CNTKClassifier(depth=3, backend="numba", ridge=0.1, image_shape="features").fit(X, y)
    np.testing.assert_allclose(flipped.decision_function(X), plain.decision_function(X), rtol=1e-12)
