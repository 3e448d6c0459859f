"""Image preprocessing before the kernel, fitted on the training images only.

* :func:`standardize`: per-channel mean / std of the training images (Arora et al. 2019;
  :func:`fit_standardize` keeps them, as :class:`Standardization`, for later images).
* :func:`scale`: integer images (uint8 pixels) divided by 255.
* :func:`downsample`: F x F average pooling (a CPU-feasibility option for large images).
* :func:`zca_whiten`: regularised ZCA whitening (Lee et al. 2020; Shankar et al. 2020).
* :func:`preprocess`: the above as ``cntk-engine evaluate --preprocess`` applies them.
* :func:`with_flips`: a training set and its horizontal flips (``augment_flips``).

Images are (N, C, H, W), or (N, H, W, C) with ``data_format="NHWC"``, and every function
returns them in the layout it read them in (so the result goes to :func:`cntk_engine.gram` with
the same ``data_format``); results are float64.  The default layout, ``data_format=None``, reads
NCHW and refuses shapes that look channels-last (CIFAR's (N, 32, 32, 3)), as
:func:`cntk_engine.gram` does: pass ``data_format="NCHW"`` for images that really have that
shape.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .arch import as_integer, is_int
from .inputs import as_images, check_nonnegative, refuse_masked
from .spelling import arg

PREPROCESSING = ("standardize", "scale", "zca", "none")
ZCA_REG = 0.1       # relative to the mean eigenvalue: the value of Lee et al. 2020's code
# Training pixels whose largest |value| is beyond 2^+-MOMENT_EXPONENT_LIMIT are divided by a power
# of two (exact) before their per-channel moments are taken: the std's squares would overflow
# float64 above ~1e154 (a std of inf, every image standardised to 0) and lose digits to
# subnormals below ~1e-154.  Images within the limit, every common one, are not scaled at all.
MOMENT_EXPONENT_LIMIT = 400


def _images(x, name: str, data_format: str | None = None) -> np.ndarray:
    """``x`` as (N, C, H, W) float64 images, checked as :func:`cntk_engine.gram` checks them
    (:func:`cntk_engine.inputs.as_images`: real numbers, at least one image of at least one
    pixel, NaN and Inf pixels refused by image, as a NaN would spread to its whole channel in
    every image through the channel's mean): ``data_format`` None (NCHW, refusing channels-last
    shapes), "NCHW" or "NHWC" (transposed).  A masked array with masked pixels is refused."""
    refuse_masked(x, name)
    return as_images(np.asarray(x), data_format, name)


def _as_given(x: np.ndarray | None, data_format: str | None) -> np.ndarray | None:
    """NCHW images ``x`` back in the layout they were read in (``data_format``)."""
    return x if x is None or data_format != "NHWC" else np.moveaxis(x, 1, -1)


def _channel_moments(a: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(e, mean, std)`` of float64 training images ``a`` (N, C, H, W), each (1, C, 1, 1): per
    channel the mean and std (1 where it is 0: such a channel is only centred) of a / 2^e, with
    e = 0 unless the channel's largest |pixel| is beyond 2^+-:data:`MOMENT_EXPONENT_LIMIT`, then
    the exponent that brings it to [0.5, 1)."""
    peak = np.abs(a).max(axis=(0, 2, 3), keepdims=True)
    _, e = np.frexp(peak)
    e = np.where(np.abs(e) > MOMENT_EXPONENT_LIMIT, e, 0)
    s = _scaled(a, e)
    mean = s.mean(axis=(0, 2, 3), keepdims=True)
    std = s.std(axis=(0, 2, 3), keepdims=True)
    return e, mean, np.where(std > 0, std, 1.0)


def _scaled(x: np.ndarray, e) -> np.ndarray:
    """x / 2^e per channel (exact), or x itself where every e is 0.  An overflow (test images far
    beyond the training images' range) gives inf, which :func:`_standardised` refuses by name."""
    if not np.any(e):
        return x
    with np.errstate(over="ignore"):
        return np.ldexp(x, -e)


def _standardised(x: np.ndarray, e, mean, std, name: str) -> np.ndarray:
    """``(x / 2^e - mean) / std`` (:func:`_channel_moments`), refused where a value leaves
    float64's range: images far larger than the training images' spread (never the training
    images themselves: each value is at most sqrt(N H W) there)."""
    if x.shape[1] != mean.shape[1]:
        raise ValueError(f"{name} has {x.shape[1]} channel(s) and the training images "
                         f"{mean.shape[1]}; both must be (N, C, H, W) with the same C")
    with np.errstate(over="ignore"):
        out = (_scaled(x, e) - mean) / std
    if not np.isfinite(out).all():
        raise ValueError(f"{name}: standardised with the training images' per-channel mean and "
                         "std, some pixels leave float64's range (these images are larger than "
                         "the training images' spread by more than 1e308); rescale them")
    return out


@dataclass(frozen=True)
class Standardization:
    """Per-channel standardisation fitted on training images (:func:`fit_standardize`):
    ``transform`` gives ``(x - mean) / std`` per channel of any images with as many channels
    (the training images, test images, new images), read and returned in the layout it was
    fitted in (``data_format``, as :class:`ZCAWhitening`)."""

    mean: np.ndarray          # (1, C, 1, 1) per-channel mean of the training images / 2^exponent
    std: np.ndarray           # (1, C, 1, 1) their per-channel std (1 where it is 0), / 2^exponent
    data_format: str = "NCHW"
    exponent: np.ndarray | int = 0   # as ZCAWhitening's: 0 unless a channel's pixels are beyond
    #                                  2^+-MOMENT_EXPONENT_LIMIT (_channel_moments)

    def transform(self, x, *, name: str = "x") -> np.ndarray:
        """The standardised images ``x`` (in ``data_format``); ``name``: how errors name them."""
        out = _standardised(_images(x, name, self.data_format), self.exponent, self.mean, self.std,
                            name)
        return _as_given(out, self.data_format)


def fit_standardize(x_train, *, data_format: str | None = None) -> Standardization:
    """The per-channel mean and std of the training images ``x_train`` (a channel with std 0 is
    only centred), taken without overflow or subnormals for any finite pixels
    (:data:`MOMENT_EXPONENT_LIMIT`)."""
    e, mean, std = _channel_moments(_images(x_train, "x_train", data_format))
    return Standardization(mean=mean, std=std, data_format=data_format or "NCHW", exponent=e)


def standardize(x_train, x_test=None, *, data_format: str | None = None):
    """``(x - mean) / std`` per channel, mean and std over the training images
    (:func:`fit_standardize`).  Returns ``(x_train, x_test)`` (``x_test`` None if not given),
    float64, in ``data_format`` (None: NCHW, refusing shapes that look channels-last; "NCHW";
    "NHWC")."""
    a = _images(x_train, "x_train", data_format)
    e, mean, std = _channel_moments(a)      # fit_standardize's, without checking a again
    b = None if x_test is None else _standardised(_images(x_test, "x_test", data_format),
                                                  e, mean, std, "x_test")
    return _as_given(_standardised(a, e, mean, std, "x_train"), data_format), _as_given(b, data_format)


def scale(x):
    """Integer images divided by 255 (float and boolean images are returned as float64,
    unchanged: a boolean image is 0 / 1 already)."""
    refuse_masked(x, "x")
    x = np.asarray(x)
    return x / 255.0 if x.dtype.kind in "iu" else x.astype(np.float64)


def downsample(x, factor: int, *, data_format: str | None = None, name: str = "x"):
    """F x F average pooling (stride F) over H and W; rows and columns beyond the last full
    window are dropped.  Returns float64 images in ``data_format`` (as :func:`standardize`);
    ``name``: how errors name the images."""
    return _as_given(_downsampled(_images(x, name, data_format), factor), data_format)


def _downsampled(x: np.ndarray, factor) -> np.ndarray:
    """:func:`downsample` of checked NCHW float64 images ``x``."""
    f = as_integer(factor)
    if not is_int(f) or f < 1:
        raise ValueError(f"the downsampling factor ({arg('factor')}) must be an integer >= 1; got "
                         f"{factor!r}")
    n, c, h, w = x.shape
    if h < f or w < f:
        raise ValueError(f"the downsampling factor ({arg('factor', f)}) is larger than the images "
                         f"({h} x {w})")
    if f == 1:
        return x
    return x[:, :, :h - h % f, :w - w % f].reshape(n, c, h // f, f, w // f, f).mean(axis=(3, 5))


@dataclass(frozen=True)
class ZCAWhitening:
    """A ZCA whitening fitted on training images (:func:`fit_zca`): ``transform`` applies it to
    any images of the same shape (the training images, test images, new images)."""

    mean: np.ndarray          # (1, C, 1, 1) per-channel mean of the training images / 2^exponent
    std: np.ndarray           # (1, C, 1, 1) their per-channel std (1 where it is 0), / 2^exponent
    matrix: np.ndarray        # (d, d) U diag(f) U^T
    layer_norm: bool
    data_format: str
    reg_amount: float         # lambda added to the eigenvalues
    image_shape: tuple        # (C, H, W) of the training images
    exponent: np.ndarray | int = 0   # (1, C, 1, 1) powers of two: 0 unless a channel's pixels are
    #                                  beyond 2^+-MOMENT_EXPONENT_LIMIT (_channel_moments)

    def transform(self, x, *, name: str = "x") -> np.ndarray:
        """The whitened images ``x`` (in ``data_format``); ``name``: how errors name them."""
        x = _images(x, name, self.data_format)
        if x.shape[1:] != self.image_shape:
            raise ValueError(f"{name}: images of shape (C, H, W) = {x.shape[1:]}, read as "
                             f"{self.data_format}; this whitening was fitted on {self.image_shape} "
                             f"and reads images as it was fitted, {self.data_format}")
        f = _standardised_rows(x, self.exponent, self.mean, self.std, self.layer_norm, name)
        out = (f @ self.matrix).reshape(x.shape)
        return _as_given(out, self.data_format)


def fit_zca(x_train, *, reg: float = ZCA_REG, reg_absolute: bool = False, layer_norm: bool = True,
            data_format: str | None = None) -> "ZCAWhitening":
    """Fit the regularised ZCA whitening of :func:`zca_whiten` on ``x_train``."""
    reg = check_nonnegative(reg, "reg", "the ZCA regulariser")
    a = _images(x_train, "x_train", data_format)
    e, mean, std = _channel_moments(a)
    n, d = a.shape[0], a[0].size
    f = _standardised_rows(a, e, mean, std, layer_norm, "x_train")
    moment = f.T @ f / n
    s, u = np.linalg.eigh(moment)
    if not s.max() > 0:
        raise ValueError("the training images are constant (every one, after per-channel "
                         "standardisation, has the same value everywhere): there is nothing to whiten")
    lam = reg if reg_absolute else reg * float(np.trace(moment)) / d
    spanned = s > d * np.finfo(np.float64).eps * s.max()
    scale = np.ones_like(s)
    np.divide(1.0, np.sqrt(np.maximum(s, 0.0) + lam), out=scale, where=spanned)
    return ZCAWhitening(mean=mean, std=std, matrix=(u * scale) @ u.T, layer_norm=layer_norm,
                        data_format=data_format or "NCHW", reg_amount=lam,
                        image_shape=tuple(a.shape[1:]), exponent=e)


def zca_whiten(x_train, x_test=None, *, reg: float = ZCA_REG, reg_absolute: bool = False,
               layer_norm: bool = True, data_format: str | None = None):
    """Regularised ZCA whitening, fitted on the training images only.  Returns the whitened
    ``(x_train, x_test)`` (``x_test`` None if not given), float64, in ``data_format`` (None:
    NCHW, refusing shapes that look channels-last; "NCHW"; "NHWC").

    The recipe (Lee et al. 2020, "Finite versus infinite neural networks", the preprocessing of
    their code; ``reg_absolute`` takes the absolute regulariser of Shankar et al. 2020, whose
    code also leaves out step 1 and scales the directions outside the training images' span as
    the others, where this keeps them as they are):

    1. per-channel standardisation with the training images' mean and std (:func:`standardize`);
    2. with ``layer_norm`` each image, as a vector of its d = C H W values, loses its mean and is
       scaled to unit L2 norm (an all-constant image is an error: it has no direction);
    3. S = X^T X / n, the d x d second moment of the n training vectors, and its float64 eigh
       S = U diag(s) U^T;
    4. lambda = reg * trace(S) / d (``reg`` relative to the mean eigenvalue; Lee et al. use
       0.1, the default) or lambda = reg (``reg_absolute=True``, Shankar et al.'s form);
    5. every image x -> U diag(f) U^T x with f = 1 / sqrt(s + lambda) on the directions the
       training images span (s > d eps s_max, at most n of them) and f = 1 on the others, so
       that a test image's part outside the training span is left as it is rather than blown
       up by 1 / sqrt(lambda).

    With reg -> 0 the training images' second moment becomes the identity on their span.
    :func:`fit_zca` returns the fitted transform for images that come later.
    """
    z = fit_zca(x_train, reg=reg, reg_absolute=reg_absolute, layer_norm=layer_norm,
                data_format=data_format)
    if x_test is None:
        return z.transform(x_train, name="x_train"), None
    return z.transform(x_train, name="x_train"), z.transform(x_test, name="x_test")


class ConstantImages(ValueError):
    """Images that are constant after per-channel standardisation, which the layer normalisation
    of the ZCA recipe cannot scale to unit norm (they have no direction).  ``role``: the images
    as the caller named them, ``indices``: their positions there; ``remedy``: what the caller
    can do.  Callers with other options (the estimators, the command line) re-raise it with
    :meth:`reworded`."""

    def __init__(self, role: str, indices, remedy: str = "drop them, or use layer_norm=False",
                 named=None):
        self.role, self.indices, self.remedy = role, [int(i) for i in indices], remedy
        which = (f"at index {self.indices[:10]}" if named is None else
                 ", ".join(named(i) for i in self.indices[:10]))
        super().__init__(f"{role} image(s) {which}{' ...' if len(self.indices) > 10 else ''} are "
                         "constant (every value the same after per-channel standardisation): the "
                         f"layer normalisation of ZCA whitening cannot scale them to unit norm; {remedy}")

    def reworded(self, role: str, remedy: str, named=None) -> "ConstantImages":
        """The same images for a caller that names them otherwise (``named``: image i -> its
        name, e.g. ``x_train[7]``)."""
        return ConstantImages(role, self.indices, remedy, named)


def _standardised_rows(a: np.ndarray, e, mean, std, layer_norm: bool, name: str) -> np.ndarray:
    """Steps 1-2 of :func:`zca_whiten`: the (N, C H W) rows of (a / 2^e - mean) / std
    (:func:`_standardised`), with ``layer_norm`` each minus its mean and scaled to unit L2 norm;
    a constant row is an error.

    A row is constant when what is left after its mean is rounding: below 1e-12 of the norm of
    (|a / 2^e| + |mean|) / std, the size the standardisation's rounding scales with (an image at
    its channels' means standardises to rounding noise, which the norm of the row itself would
    not tell from a direction)."""
    n = len(a)
    scaled = _scaled(a, e)
    f = _standardised(scaled, 0, mean, std, name).reshape(n, -1)
    if not layer_norm:
        return f
    centred = f - f.mean(axis=1, keepdims=True)
    norms = np.linalg.norm(centred, axis=1)
    size = np.linalg.norm(((np.abs(scaled) + np.abs(mean)) / std).reshape(n, -1), axis=1)
    bad = np.nonzero(norms <= 1e-12 * size)[0]
    if bad.size:
        raise ConstantImages(name, bad)
    return centred / norms[:, None]


def preprocess(x_train, x_test=None, how: str = "standardize", factor: int = 1, *,
               zca_reg: float = ZCA_REG, data_format: str | None = None):
    """Downsample by ``factor`` (1: none), then ``how``: "standardize" (:func:`standardize`),
    "scale" (integer images / 255), "zca" (:func:`zca_whiten` with ``zca_reg``) or "none", each
    fitted on ``x_train``.  Returns float64 ``(x_train, x_test)`` in ``data_format`` (as
    :func:`standardize`; ``x_test`` None when not given: the training images alone)."""
    if how not in PREPROCESSING:
        raise ValueError(f"preprocessing must be one of {PREPROCESSING}; got {how!r}")
    sets = {"x_train": x_train} if x_test is None else {"x_train": x_train, "x_test": x_test}
    kinds = {name: np.asarray(x).dtype.kind for name, x in sets.items()}
    if len({k in "iu" for k in kinds.values()}) > 1:
        # integer pixels (0..255) against floats (0..1, or bool 0/1): one set would be divided
        # by 255 and the other not, or transformed with statistics in the other's units, or
        # (none) their kernels computed across the two units
        what = {"scale": "divides integer images by 255 and keeps float images",
                "standardize": "standardises x_test with x_train's per-channel mean and std",
                "zca": "whitens x_test with x_train's statistics",
                "none": "keeps both as they are, for kernels between them"}[how]
        raise ValueError(f"{arg('how', how)} {what}; x_train is {np.asarray(x_train).dtype} and x_test "
                         f"{np.asarray(x_test).dtype}: give both as integers (0..255) or both as "
                         "floats, in the same units")
    a = _downsampled(_images(x_train, "x_train", data_format), factor)
    b = None if x_test is None else _downsampled(_images(x_test, "x_test", data_format), factor)
    if how == "scale" and kinds["x_train"] in "iu":
        a, b = a / 255.0, None if b is None else b / 255.0
    elif how == "standardize":
        a, b = standardize(a, b, data_format="NCHW")
    elif how == "zca":
        a, b = zca_whiten(a, b, reg=zca_reg, data_format="NCHW")
    else:   # new arrays, as from the other ways: float64 input with factor 1 came through as is
        a, b = (None if v is None else np.array(v) if np.may_share_memory(v, np.asarray(x)) else v
                for v, x in ((a, x_train), (b, x_test)))
    return _as_given(a, data_format), _as_given(b, data_format)


def with_flips(x, y, *, data_format: str | None = None, name: str = "x"):
    """The training images followed by their horizontal flips (:func:`cntk_engine.arch.hflip`),
    as float64 (2N, C, H, W) (or (2N, H, W, C): in ``data_format``, as :func:`standardize`),
    the labels ``y`` (one per image; None: no labels, None
    returned) repeated for the flipped copies, and the leave-one-out groups (2N,) that keep each
    image with its flip (``groups`` of :func:`cntk_engine.solver.loo`: the mirror of a scored
    image must not stay in the training set).  ``data_format`` as for :func:`standardize` (the
    default refuses shapes that look channels-last, whose "flip" would reverse the colour
    channels); ``name``: what the caller calls ``x``.  Images 1 pixel wide are refused (each
    is its own flip)."""
    from .arch import hflip
    x = _images(x, name, data_format)
    if x.shape[3] == 1:
        raise ValueError(f"{name} holds images 1 pixel wide (shape {tuple(x.shape)}, NCHW): a "
                         "horizontal flip leaves each as it is, so with their flips the training "
                         "set would hold every image twice (a singular Gram, at 4 times the cost); "
                         "leave the flips out (augment_flips, --augment-flips)")
    if y is not None:
        y = np.asarray(y)
        if y.ndim < 1 or len(y) != len(x):
            raise ValueError(f"y must hold one label (or target row) per image: {len(x)} images; "
                             f"got y of shape {y.shape}")
        y = np.concatenate([y, y])
    return _as_given(np.concatenate([x, hflip(x)]), data_format), y, np.tile(np.arange(len(x)), 2)


__all__ = ["PREPROCESSING", "ZCA_REG", "ZCAWhitening", "Standardization", "ConstantImages",
           "standardize", "fit_standardize", "scale", "downsample", "fit_zca", "zca_whiten",
           "preprocess", "with_flips"]
