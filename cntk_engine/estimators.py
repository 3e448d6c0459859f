"""scikit-learn estimators: CNTK kernel regression on images (``CNTKClassifier``, ``CNTKRegressor``).

``fit(X, y)`` computes the CNTK (or NNGP) Gram matrix of the training images with
:func:`cntk_engine.gram` and solves kernel ridge regression (:mod:`cntk_engine.solver`);
``predict(X)`` computes the test-vs-train kernel and applies the dual coefficients.  This is the
infinitely wide CNN trained to convergence on squared loss (ridge 0), or its regularised form.

Input X
-------
* 4-D ``(N, C, H, W)`` images (``(N, H, W, C)`` with ``data_format="NHWC"``), or 3-D
  ``(N, H, W)`` single-channel images.  The default ``data_format=None`` reads NCHW but
  refuses a shape that looks channels-last, as :func:`cntk_engine.gram` does (CIFAR's
  (N, 32, 32, 3) would be 32 channels of 32 x 3 images); ``data_format="NCHW"`` explicitly
  takes such a shape as NCHW.
* 2-D ``(N, C*H*W)`` flattened images with ``image_shape=(C, H, W)`` (``(H, W, C)`` for
  ``data_format="NHWC"``): each row is reshaped to an image (row-major, as ``x.reshape(N, -1)``
  flattens it).
* 2-D ``(N, F)`` tabular data with ``image_shape="features"`` (as scikit-learn's own checks
  pass): each row is a 1 x 1 image with F channels.  The convolutions then see only their
  centre tap and the CNTK becomes the NTK of a fully connected ReLU network of the same depth.
  A 2-D X without ``image_shape`` is refused: flattened images (e.g. OpenML's (N, 784) MNIST)
  would otherwise silently become 1 x 1 images.

``n_features_in_`` counts C*H*W (images are flattened before scikit-learn's validation), so a
model fitted on 4-D images accepts the same images flattened (with ``image_shape``) and the
reverse.  scikit-learn is an optional dependency: ``pip install ".[sklearn]"`` (README, Install).

The ridge is relative: ``ridge * mean(diag K_train)`` is added to the diagonal (CNTK values
scale with the depth and the pixel scale); 0 is the paper's interpolating solution, "auto"
chooses it by exact leave-one-out over :data:`cntk_engine.solver.RELATIVE_RIDGE_GRID`
(accuracy for the classifier, mean squared error for the regressor).
"""
from __future__ import annotations

import logging
import numbers
from contextlib import contextmanager

import numpy as np

try:
    from sklearn.base import BaseEstimator, ClassifierMixin, RegressorMixin
    from sklearn.utils.multiclass import check_classification_targets
    from sklearn.utils.validation import check_is_fitted
except ImportError as e:  # pragma: no cover - exercised only without scikit-learn
    from .version import install_hint
    raise ImportError("CNTKClassifier / CNTKRegressor need scikit-learn "
                      f"({install_hint('sklearn')}): {e}") from None
try:
    from sklearn.utils.validation import validate_data as _validate_data   # scikit-learn >= 1.6
except ImportError:  # pragma: no cover - older scikit-learn
    def _validate_data(est, X="no_validation", y="no_validation", **kw):
        return est._validate_data(X, y, **kw)


def _validated(est, X, y, *, with_y: bool, **kw):
    """scikit-learn's validation of X (and y); the cast error of X whose dtype holds no real
    numbers (a record dtype) is a ValueError naming what is accepted, as gram's is. Dates and
    durations are refused first: scikit-learn would cast them to their counts of time units."""
    kind = getattr(getattr(X, "dtype", None), "kind", None)
    if kind in ("m", "M"):
        raise ValueError(f"X must hold real numbers (any integer or float dtype); got dtype "
                         f"{X.dtype}")
    try:
        return _validate_data(est, X, y, **kw) if with_y else _validate_data(est, X, **kw)
    except TypeError as e:
        if "cast" not in str(e):
            raise
        raise ValueError(f"X must hold real numbers (any integer or float dtype); got dtype "
                         f"{getattr(X, 'dtype', type(X).__name__)}: {e}") from None

from . import solver
from .backends import check_name
from .preprocess import ZCA_REG

KERNELS = ("ntk", "nngp")
DEFAULT_DEPTH = 11      # of the cnn, when depth is None


def _flat_x_message(n_features: int, data_format) -> str:
    """The error for a 2-D X without ``image_shape``: what it would be taken as, the ways to
    say what it is, and a guess of the image shape when F is C * H * H for C in (1, 3)."""
    guess = ""
    for c in (1, 3):
        h = int(round((n_features / c) ** 0.5))
        if h > 1 and c * h * h == n_features:
            shape = (h, h, c) if data_format == "NHWC" else (c, h, h)
            guess = f" (for {n_features} features: e.g. image_shape={shape})"
            break
    return (f"X is 2-D with {n_features} features per row and image_shape is None: pass images "
            "as 4-D (N, C, H, W) / 3-D (N, H, W) arrays, or give image_shape=(C, H, W) for "
            f"flattened images{guess}, or image_shape='features' to take each row as "
            f"{n_features} features (a 1 x 1 image with {n_features} channels: the NTK of a fully "
            "connected network)")


def _is_fitted_attribute(name: str) -> bool:
    """What ``fit`` sets: scikit-learn's ``name_`` attributes and the two private ones."""
    return (name.endswith("_") and not name.startswith("__")) or name in ("_fitted_with_flips", "_y_1d")


log = logging.getLogger("cntk_engine")

#: A relative ridge of this or more stands above a float32 Gram's rounding: a duplicated row's
#: pivot is then about twice it, far beyond the solver's floor of 8 epsilons of its entry.
FLOAT32_RIDGE = 1e-5
#: What the estimators say where the training Gram is (numerically) singular.
_AUTO_ADVICE = "ridge='auto' chooses a ridge that leaves it positive definite, "
_GRAM_PRECISION = ("a relative ridge of 1e-5 or more stands above a float32 Gram's rounding, and "
                   "dtype='float64' computes the Gram to float64's, on which any jitter is "
                   "float64's rounding (float32 "
                   "loses about 4e-4 of the kernel at depth 3 and 2e-3 at depth 11 where two "
                   "inputs are nearly parallel, as tabular features far from 0 often are)")
_GRAM_SINGULAR = "give a larger ridge"


class _CNTKBase(BaseEstimator):
    """Shared parameters and machinery (see the module docstring)."""

    _estimator_type_name = "CNTK estimator"

    def __init__(self, depth=None, architecture="cnn", pooling="gap", lap_window=None, flip=False,
                 fix=False, kernel="ntk", convention="arora", W_std=None, b_std=None,
                 filter_size=3, ridge="auto", preprocess=None, zca_reg=ZCA_REG,
                 augment_flips=False, image_shape=None, backend="auto", dtype=None,
                 data_format=None):
        self.depth = depth
        self.architecture = architecture
        self.pooling = pooling
        self.lap_window = lap_window
        self.flip = flip
        self.preprocess = preprocess
        self.zca_reg = zca_reg
        self.augment_flips = augment_flips
        self.fix = fix
        self.kernel = kernel
        self.convention = convention
        self.W_std = W_std
        self.b_std = b_std
        self.filter_size = filter_size
        self.ridge = ridge
        self.image_shape = image_shape
        self.backend = backend
        self.dtype = dtype
        self.data_format = data_format

    # ------------------------------------------------------------------ parameters
    def _check_params(self):
        from .arch import make_architecture
        from .inputs import check_dtype
        if not isinstance(self.kernel, str) or self.kernel not in KERNELS:
            raise ValueError(f"kernel must be one of {KERNELS}; got {self.kernel!r}")
        # the architecture's errors (e.g. fix=True at depth 2) before any kernel is computed
        make_architecture(**self._network())
        if self.dtype is not None:
            check_dtype(self.dtype)
        check_name(self.backend)
        if self.preprocess not in (None, "standardize", "zca"):
            raise ValueError(f"preprocess must be None, 'standardize' (per-channel mean and std of "
                             f"the training images, as cntk-engine evaluate's default) or 'zca' "
                             f"(regularised ZCA whitening fitted on the training images); got "
                             f"{self.preprocess!r}")
        if self.preprocess == "zca" and self._tabular():
            # its layer normalisation centres each row: 2 features become one of two points
            raise ValueError("preprocess='zca' whitens images (each one centred and scaled to unit "
                             "norm first), which collapses rows of tabular features "
                             "(image_shape='features'); preprocess='standardize' scales each "
                             "feature (as sklearn.preprocessing.StandardScaler does)")
        z = self.zca_reg
        if isinstance(z, bool) or not isinstance(z, numbers.Real) or not np.isfinite(z) or z < 0:
            raise ValueError(f"zca_reg must be a number >= 0 (relative to the mean eigenvalue); got {z!r}")
        if not isinstance(self.augment_flips, (bool, np.bool_)):
            raise ValueError(f"augment_flips must be True or False; got {self.augment_flips!r}")
        if self.augment_flips and bool(self.flip):      # both checked above
            raise ValueError(FLIPS_TWICE.format(augment="augment_flips=True", flip="flip=True"))
        r = self.ridge
        if not (isinstance(r, str) and r == "auto"):
            if isinstance(r, bool) or not isinstance(r, numbers.Real) or not np.isfinite(r) or r < 0:
                raise ValueError(f"ridge must be 'auto' (leave-one-out selection) or a number >= 0 "
                                 f"(relative to the mean diagonal of the Gram); got {r!r}")
        if self.data_format not in (None, "NCHW", "NHWC"):
            raise ValueError("data_format must be None (NCHW, refusing shapes that look "
                             f"channels-last), 'NCHW' or 'NHWC'; got {self.data_format!r}")
        if self.image_shape is not None and not self._tabular():
            s = self.image_shape
            if (not isinstance(s, (tuple, list)) or len(s) != 3
                    or not all(isinstance(v, numbers.Integral) and not isinstance(v, bool) and v >= 1 for v in s)):
                raise ValueError("image_shape must be None, three positive integers (C, H, W) "
                                 "((H, W, C) for data_format='NHWC') or 'features' (2-D X is "
                                 f"tabular: 1 x 1 images with one channel per feature); got {s!r}")
            from .inputs import looks_channels_last
            c, h, w = (int(v) for v in s)
            if self.data_format is None and (h, w) != (1, 1) and looks_channels_last(c, w):
                # as 4-D X of that shape is refused: flattened CIFAR with (32, 32, 3) read as
                # 32 channels of 32 x 3 images
                raise ValueError(
                    f"image_shape {tuple(s)} read as (C, H, W) (data_format=None: NCHW) is {c} "
                    f"channels of {h} x {w} images, but its last value ({w}) looks like the "
                    "channels of channels-last data: pass data_format='NHWC' with image_shape "
                    f"(H, W, C), or data_format='NCHW' explicitly if these really are {c}-channel "
                    f"{h} x {w} images")

    def _compute_dtype(self, height_width) -> str:
        """The Gram's compute dtype for images of (H, W) ``height_width``: ``dtype``, or for
        None float64 on 1 x 1 images (tabular features: they cost little, and float32 loses about
        4e-4 of the kernel at depth 3 and 2e-3 at depth 11 where two rows are nearly parallel,
        as features far from 0 often are: README, Exactness) and float32 on larger images."""
        if isinstance(self.backend, str) and self.backend == "reference":
            return "float64"                  # whatever dtype says (gram's reference backend)
        if self.dtype is None:
            return "float64" if tuple(height_width) == (1, 1) else "float32"
        return np.dtype(self.dtype).name      # np.float32 as "float32", as the checks compare it

    def _tabular(self) -> bool:
        return isinstance(self.image_shape, str) and self.image_shape == "features"

    def _depth(self):
        """The depth passed to ``gram``: 11 for the cnn when none is given (a preset or stack
        fixes its own depth, and a depth given with one is refused by ``gram``)."""
        if self.depth is None and isinstance(self.architecture, str) and self.architecture == "cnn":
            return DEFAULT_DEPTH
        return self.depth

    def _network(self) -> dict:
        """The parameters that define the network (``make_architecture``'s and ``gram``'s
        options).  ``fit`` records them with the kernel (``_network_``), which ``predict``
        computes with, so that parameters changed after it (by a later fit that failed, or
        ``set_params`` alone) do not mix another kernel with its dual coefficients."""
        return dict(depth=self._depth(), architecture=self.architecture, pooling=self.pooling,
                    lap_window=self.lap_window, flip=self.flip, fix=self.fix,
                    convention=self.convention, W_std=self.W_std, b_std=self.b_std,
                    filter_size=self.filter_size)

    def _gram(self, a, b=None):
        """``gram(a, b)`` of the training set ``a`` (``b`` None: in ``fit``, with the network
        of the parameters, recorded) or of the images ``a`` against the training set ``b``
        (with the network of the fit), with the images named in errors as the caller passed
        them: ``X[i]``, and ``the flip of X[i]`` for a training set's flipped copies."""
        from .api import gram
        from .spelling import images_as
        if b is None:
            self._network_ = dict(self._network(), kernel=self.kernel)
            self._dtype_ = self._compute_dtype(a.shape[2:])
        # an estimator pickled before the network was recorded: its parameters, as then
        network = getattr(self, "_network_", None) or dict(self._network(), kernel=self.kernel)

        flipped = self.augment_flips if b is None else self._fitted_with_flips    # as fit made b

        def training(i, n=(len(a) if b is None else len(b)) // (2 if flipped else 1)):
            return f"the flip of X[{i - n}]" if i >= n else f"X[{i}]"
        names = ({"x1": training} if b is None else
                 {"x1": "X[{}]".format, "x2": lambda i: f"{training(i)} of the training set"})
        with images_as(names):
            return gram(a, b, **network, backend=self.backend,
                        dtype=getattr(self, "_dtype_", None) or self._compute_dtype(a.shape[2:]),
                        data_format="NCHW")

    @contextmanager
    def _fitting(self):
        """A fit that fails or is interrupted (Ctrl-C during the Gram) leaves the estimator as it
        was: the model of the last fit that finished, or unfitted.  Without it, the attributes
        set before the failure (``zca_`` refitted on the new images, ``classes_``,
        ``image_shape_``) were mixed with the earlier fit's ``X_fit_`` and ``dual_coef_``, and
        predictions were silently wrong."""
        before = {k: v for k, v in vars(self).items() if _is_fitted_attribute(k)}
        try:
            yield
        except BaseException:
            for k in [k for k in vars(self) if _is_fitted_attribute(k)]:
                delattr(self, k)
            vars(self).update(before)
            raise

    # ------------------------------------------------------------------ input
    def _images(self, X, y=None, *, reset: bool, y_kw=None):
        """Validate X (and y) and return NCHW float64 images (and y); in ``fit`` (``reset``) never
        the caller's array itself, which the model keeps (``X_fit_``) and the caller may change."""
        from .inputs import refuse_masked
        refuse_masked(X, "X")
        nd = getattr(X, "ndim", None)
        if nd is None and not hasattr(X, "toarray"):
            try:
                nd = np.asarray(X).ndim
            except ValueError:          # ragged: let scikit-learn word the error
                nd = 2
        with_y = y is not None or reset
        kw = dict(dtype=[np.float64, np.float32], **(y_kw or {}))
        if nd is not None and nd > 4:          # 0-D and 1-D: scikit-learn words it ("Reshape your data")
            raise ValueError(f"X must be images (N, C, H, W) (or (N, H, W, C) with "
                             f"data_format='NHWC'), single-channel images (N, H, W), or flattened "
                             f"images (N, C*H*W) with image_shape; got a {nd}-D array of shape "
                             f"{tuple(np.shape(X))}")
        if nd in (3, 4):
            if self._tabular():
                raise ValueError(f"image_shape='features' is for 2-D tabular X (N, F); got a "
                                 f"{nd}-D X of images: leave image_shape None")
            arr = np.asarray(X)
            if nd == 3:
                arr = arr[:, None]
            elif self.data_format == "NHWC":
                arr = arr.transpose(0, 3, 1, 2)
            elif self.data_format is None:
                from .inputs import refuse_channels_last
                refuse_channels_last(arr.shape, "X")
            shape = tuple(int(v) for v in arr.shape[1:])
            if self.image_shape is not None and shape != self._param_shape():
                raise ValueError(f"X holds images of shape (C, H, W) = {shape} but image_shape "
                                 f"{tuple(self.image_shape)} says (C, H, W) = {self._param_shape()}")
            if not reset and shape != self.image_shape_:     # before scikit-learn's feature count
                layout = ("a 3-D X as (N, H, W), one channel" if nd == 3 else
                          f"X as {'(N, H, W, C)' if self.data_format == 'NHWC' else '(N, C, H, W)'}: "
                          f"data_format={self.data_format!r}")
                raise ValueError(f"X holds images of shape (C, H, W) = {shape}; this estimator was "
                                 f"fitted on {self.image_shape_} (it reads {layout})")
            flat = arr.reshape(arr.shape[0], int(np.prod(shape)))
            out = _validated(self, flat, y, with_y=with_y, reset=reset, **kw)
        else:
            out = _validated(self, X, y, with_y=with_y, reset=reset, **kw)
            Xv = out[0] if with_y else out
            if self._tabular():
                shape = (Xv.shape[1], 1, 1)
            elif self.image_shape is not None:
                shape = self._param_shape()
                if int(np.prod(shape)) != Xv.shape[1]:
                    raise ValueError(f"X has {Xv.shape[1]} features per row but image_shape "
                                     f"{tuple(self.image_shape)} has {int(np.prod(shape))} pixels")
            else:
                raise ValueError(_flat_x_message(Xv.shape[1], self.data_format))
        Xv, yv = (out if with_y else (out, None))
        if reset:
            self.image_shape_ = shape
        elif shape != self.image_shape_:
            raise ValueError(f"X holds images of shape (C, H, W) = {shape}; this estimator was "
                             f"fitted on {self.image_shape_}")
        if (self.image_shape is not None and not self._tabular() and nd not in (3, 4)
                and self.data_format == "NHWC"):
            h, w, c = self.image_shape
            imgs = Xv.reshape(len(Xv), h, w, c).transpose(0, 3, 1, 2)
        else:
            imgs = Xv.reshape((len(Xv),) + shape)
        imgs = np.ascontiguousarray(imgs, dtype=np.float64)
        # an array-like other than an ndarray (a CPU torch tensor, a DataFrame) may hand NumPy
        # its own buffer: copied too, as it cannot be compared without converting it
        if reset and (not isinstance(X, np.ndarray) or np.may_share_memory(imgs, X)):
            imgs = imgs.copy()
        return imgs, yv

    def _param_shape(self):
        s = tuple(int(v) for v in self.image_shape)
        return (s[2], s[0], s[1]) if self.data_format == "NHWC" else s

    # ------------------------------------------------------------------ solve
    def _solve(self, K, Y, labels, groups):
        """The fit on the training Gram ``K``, which is the estimator's own and is given up
        (factorised in its own memory).  A Gram of 2 or more samples whose entries are all equal
        is refused, as ``cntk-engine evaluate`` and ``solve`` refuse it."""
        same = solver.constant_entries(K) if len(K) >= 2 else None
        if same is not None:
            raise ValueError(f"every entry of the training Gram is {same:g}: the kernel does not "
                             "tell the training images apart (all-zero images, images constant in "
                             "each channel under preprocess='standardize', or W_std=0), so the "
                             "regression would predict the same for every image")
        scale = solver.ridge_scale(K)          # (read before the fit gives K up)
        try:
            sol, sel = solver.fit_relative_ridge(
                K, Y, self.ridge, labels=labels, groups=groups, overwrite_k=True,
                rounding=solver.rounding_of(self._dtype_))
        except solver.NotPositiveDefinite as e:
            # e.bare: the Gram is the estimator's own, not the caller's to retry with; "auto"
            # is not advised where it is what failed
            auto = isinstance(self.ridge, str)
            raise solver.NotPositiveDefinite(
                f"{e.bare}.  The training Gram was computed in {self._dtype_}: "
                + ("" if auto else _AUTO_ADVICE + ("" if self._dtype_ == "float32" else "or "))
                + (_GRAM_PRECISION if self._dtype_ == "float32" else _GRAM_SINGULAR)) from None
        if self._dtype_ == "float32" and 0 < sol.jitter and sol.ridge < FLOAT32_RIDGE * scale:
            log.warning("the training Gram, computed in float32, is singular to its rounding "
                        "(about 1e-7 of its entries; jitter %.3g was added to factorise it): the "
                        "fit is set by that rounding and the jitter (with one image under two "
                        "labels, its predictions are arbitrary): "
                        + _AUTO_ADVICE + _GRAM_PRECISION, sol.jitter)
        self.ridge_ = float(self.ridge) if sel is None else sel.relative
        self.loo_ = None if sel is None else sel.scores   # not the scores of an earlier fit
        self.ridge_absolute_ = sol.ridge
        self.jitter_ = sol.jitter
        self.dual_coef_ = sol.alpha

    def _training_set(self, imgs, y):
        """The training images, targets and LOO groups the kernel and the solve see:
        standardised or ZCA-whitened with what is fitted here (``preprocess``), then with their
        flipped copies (``augment_flips``), each in one group with its original so that
        ``ridge="auto"`` leaves them out together (:func:`cntk_engine.solver.loo`); groups
        None without flips."""
        if isinstance(self.ridge, str) and len(imgs) < 2:      # before the Gram, not after
            raise ValueError(f"ridge='auto' chooses the ridge by leave-one-out, which needs at least 2 "
                             f"training images; got n_samples = {len(imgs)}: give ridge a number >= 0 (relative to "
                             "the mean diagonal of the training Gram)")
        self.zca_ = self.standardization_ = None
        self._fitted_with_flips = bool(self.augment_flips)
        if self.preprocess == "standardize":
            from .preprocess import fit_standardize
            self.standardization_ = fit_standardize(imgs, data_format="NCHW")
            imgs = self.standardization_.transform(imgs, name="X")
        elif self.preprocess == "zca":
            from .preprocess import fit_zca
            with _zca_errors():
                self.zca_ = fit_zca(imgs, reg=self.zca_reg, data_format="NCHW")
                imgs = self.zca_.transform(imgs, name="X")
        if self.augment_flips:
            from .preprocess import with_flips
            return with_flips(imgs, y, data_format="NCHW", name="X")
        return imgs, y, None

    def _scores(self, X):
        check_is_fitted(self, "dual_coef_")
        imgs, _ = self._images(X, reset=False)
        if getattr(self, "standardization_", None) is not None:     # (None in a pickle from before)
            imgs = self.standardization_.transform(imgs, name="X")
        if self.zca_ is not None:
            with _zca_errors():
                imgs = self.zca_.transform(imgs, name="X")
        return self._gram(imgs, self.X_fit_) @ self.dual_coef_


#: Both flip recipes at once: under the flip kernel an image's flipped copy is the same point
#: (K_flip(x, hflip z) = K_flip(x, z)), so the doubled training set holds each image twice.
FLIPS_TWICE = ("{augment} with {flip}: under the flip-symmetrised kernel a flipped copy is the "
               "same point as its image (K_flip(x, hflip z) = K_flip(x, z)), so the doubled "
               "training set holds every image twice, at 4 times the training Gram's cost for "
               "nothing; use one of them ({flip} alone gives {augment}'s predictions, at half its "
               "absolute ridge, for about half the cost)")


@contextmanager
def _zca_errors():
    """The whitening's refusal of constant images, as the estimator's caller can act on it (the
    estimators have no layer_norm parameter)."""
    from .preprocess import ConstantImages
    try:
        yield
    except ConstantImages as e:
        raise e.reworded("X", 'drop them, or use preprocess=None (no ZCA)') from None


class CNTKClassifier(ClassifierMixin, _CNTKBase):
    """Classification by CNTK kernel regression on one-hot targets, argmax prediction.

    Parameters
    ----------
    depth, architecture, pooling, lap_window, flip, fix, kernel ("ntk" or "nngp"), convention,
    W_std, b_std, filter_size, backend, dtype : passed to :func:`cntk_engine.gram`
        (``kernel="nngp"`` gives the NNGP posterior mean).  ``depth=None``: 11 for
        ``architecture="cnn"``; a Myrtle preset ("myrtle5", "myrtle7", "myrtle10") or a stack
        fixes its own depth.  ``flip=True``: the flip-symmetrised kernel.  ``dtype=None`` (the
        default): "float32" on images, "float64" on 1 x 1 images (``image_shape="features"``:
        they cost little, and float32 loses about 4e-4 of the kernel at depth 3 and 2e-3 at
        depth 11 where two rows are nearly parallel, as features far from 0 often are; images
        of pixels far less: README, Exactness).
    preprocess : None (the images as given), "standardize": each channel's mean and std over the
        training images (:func:`cntk_engine.preprocess.fit_standardize`; attribute
        ``standardization_``; ``cntk-engine evaluate``'s default), or "zca": regularised ZCA
        whitening (``zca_reg``, relative to the mean eigenvalue;
        :func:`cntk_engine.preprocess.fit_zca`; attribute ``zca_``); fitted on the training
        images in ``fit`` and applied to every X after.
    augment_flips : train on the images and their horizontal flips (twice the training set);
        with kernel ridge regression this predicts what ``flip=True`` predicts with half the
        absolute ridge (``ridge_absolute_``; the relative ridges are not halves: each is relative
        to its own Gram's mean diagonal), at about twice the kernel cost and 8 times the solve.  ``ridge="auto"`` then
        leaves each image out together with its flipped copy (leave-one-group-out).
    ridge : "auto" (leave-one-out accuracy over a grid) or a number >= 0, relative to the mean
        diagonal of the training Gram; 0 = the paper's interpolating solution.  Where the Gram
        is singular to the rounding of its dtype (an image twice, or an image and a multiple of
        it; a pivot within 8 roundings of its entry) the solve adds the jitter needed, up to
        1e-3 x the mean diagonal (``jitter_``; a warning says so, and for a float32 Gram that
        the fit is set by that rounding), and refuses the Gram beyond that; ``ridge="auto"`` or
        a ridge of 1e-5 or more avoid it, and ``dtype="float64"`` leaves it to float64's
        rounding.
    targets : "paper" (0.9 for the class, -0.1 elsewhere, as the CNTK paper) or "onehot" (1/0).
    image_shape : (C, H, W) of flattened 2-D X ((H, W, C) for NHWC); "features": 2-D X is
        (N, F) tabular data, 1 x 1 images with F channels (the fully connected NTK); None (the
        default): X must be 4-D / 3-D images, and a 2-D X is refused.
    data_format : None (the default: NCHW, refusing a shape that looks channels-last, as
        :func:`cntk_engine.gram`), "NCHW" or "NHWC": the layout of 4-D X (and of image_shape).

    Attributes
    ----------
    classes_, n_features_in_, image_shape_ (C, H, W), X_fit_ (the training images as the kernel
    saw them, NCHW float64: standardised or ZCA-whitened with preprocess, then with their flips with
    augment_flips),
    dual_coef_ (n, n_classes), ridge_ (relative ridge used), ridge_absolute_, jitter_ (diagonal
    added to factorise, 0 if none), loo_ (:class:`cntk_engine.solver.CVResult` with
    ridge="auto", None with a number).
    """

    def __init__(self, depth=None, architecture="cnn", pooling="gap", lap_window=None, flip=False,
                 fix=False, kernel="ntk", convention="arora", W_std=None, b_std=None,
                 filter_size=3, ridge="auto", preprocess=None, zca_reg=ZCA_REG,
                 augment_flips=False, targets="paper", image_shape=None, backend="auto",
                 dtype=None, data_format=None):
        super().__init__(depth=depth, architecture=architecture, pooling=pooling,
                         lap_window=lap_window, flip=flip, fix=fix, kernel=kernel,
                         convention=convention, W_std=W_std, b_std=b_std,
                         filter_size=filter_size, ridge=ridge, preprocess=preprocess,
                         zca_reg=zca_reg, augment_flips=augment_flips, image_shape=image_shape,
                         backend=backend, dtype=dtype, data_format=data_format)
        self.targets = targets

    def fit(self, X, y):
        """Compute the training Gram and solve for the dual coefficients.  Returns self."""
        self._check_params()
        if self.targets not in ("paper", "onehot"):
            raise ValueError(f"targets must be 'paper' (0.9 / -0.1) or 'onehot' (1 / 0); got {self.targets!r}")
        with self._fitting():
            imgs, y = self._images(X, y, reset=True)
            try:            # both sort the labels
                check_classification_targets(y)
                classes = np.unique(y)      # before the whitening and the flips: they keep the labels
            except TypeError:
                raise ValueError("y mixes labels that cannot be ordered (e.g. strings with numbers, "
                                 "or None): give labels of one kind") from None
            if len(classes) < 2:
                raise ValueError(f"{type(self).__name__} needs samples of at least 2 classes; got 1 "
                                 f"class ({classes.tolist()[0]!r})")
            imgs, y, groups = self._training_set(imgs, y)
            self.classes_ = classes
            enc = solver.paper_targets if self.targets == "paper" else solver.one_hot
            Y, _ = enc(y, self.classes_)
            labels = np.searchsorted(self.classes_, y)
            K = self._gram(imgs)
            self._solve(K, Y, labels, groups)
            self.X_fit_ = imgs
        return self

    def decision_function(self, X):
        """Kernel regression outputs (m, n_classes); for two classes the (m,) difference
        ``f_1 - f_0`` (positive: ``classes_[1]``)."""
        F = self._scores(X)
        return F[:, 1] - F[:, 0] if F.shape[1] == 2 else F

    def predict(self, X):
        """The class with the largest kernel regression output."""
        F = self._scores(X)
        return self.classes_[np.argmax(F, axis=1)]

    def __sklearn_tags__(self):
        tags = super().__sklearn_tags__()
        tags.classifier_tags.multi_label = False
        return tags


class CNTKRegressor(RegressorMixin, _CNTKBase):
    """Regression by CNTK kernel ridge regression (single or multiple outputs).

    Parameters as :class:`CNTKClassifier` (without ``targets``); ``ridge="auto"`` minimises the
    leave-one-out mean squared error.  ``predict`` returns (m,) for 1-D y, (m, k) for 2-D y.
    """

    def fit(self, X, y):
        """Compute the training Gram and solve for the dual coefficients.  Returns self."""
        self._check_params()
        with self._fitting():
            imgs, y = self._images(X, y, reset=True, y_kw=dict(multi_output=True, y_numeric=True))
            y = np.asarray(y, dtype=np.float64)
            imgs, y, groups = self._training_set(imgs, y)
            self._y_1d = y.ndim == 1
            K = self._gram(imgs)
            self._solve(K, y, None, groups)
            self.X_fit_ = imgs
        return self

    def predict(self, X):
        """Kernel regression predictions."""
        F = self._scores(X)
        return F[:, 0] if self._y_1d else F

    def __sklearn_tags__(self):
        tags = super().__sklearn_tags__()
        tags.target_tags.multi_output = True
        tags.target_tags.single_output = True
        return tags


__all__ = ["CNTKClassifier", "CNTKRegressor"]
