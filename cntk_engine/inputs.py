"""Validation and conversion of image batches: every bad input gets a ValueError that says what
is wrong and what is accepted, before any work starts.

Magnitudes (:func:`prepare_magnitudes`): without biases the kernels are positively homogeneous
in each image, K(a x, b z) = a b K(x, z) for a, b > 0 (every Sigma and Theta of the layer
recursion in ``arch`` scales by a b, c and Kdot do not change, and nothing is added).  So each
image is computed divided by a power of two s_i that brings its largest |pixel| into [0.5, 1),
and each kernel entry is multiplied back by s_i s_j (``jobs.sinks``).  Both steps are exact in
binary floating point, and for images whose values stay in the normal range of the compute
dtype the backends' results are bit for bit those of the unscaled images (scaling every input
of a computation by a power of two scales every rounded intermediate exactly).  Tiny, huge and
subnormal pixels are then alike: what the compute dtype must hold is the architecture's own
range.  With biases nothing is scaled, and images whose kernel would leave the compute dtype's
range are refused with the bound and the remedy.

The architecture's range is read off the per-image diagonals q(l, p) (``diag``): without biases
they decay or grow geometrically with depth (by about W_std^2 / 2 per layer on large images,
(W_std^2 / 2) / k^2 on 1 x 1 images), so deep networks on small images leave float32's range
whatever the pixels; :func:`check_small` refuses that before any work, where the kernel would
otherwise come out as zeros or NaN.
"""
from __future__ import annotations

import math

import numpy as np

from .arch import as_integer, is_int
from .arrays import get_array_module, is_cupy, to_host
from .diag import chunk_images, diag_norms
from .memo import Memo, images_key
from .spelling import arg, image, images

DATA_FORMATS = ("NCHW", "NHWC")
DTYPES = ("float32", "float64")


def check_dtype(dtype) -> np.dtype:
    """The compute dtype: "float32" / "float64" (or np.float32 / np.float64 / their np.dtype)."""
    name = None
    if isinstance(dtype, str):
        name = dtype
    elif dtype is not None:          # np.dtype(None) would silently be float64
        try:
            name = np.dtype(dtype).name
        except (TypeError, ValueError):
            pass
    if name not in DTYPES:
        raise ValueError(f"{arg('dtype')} must be one of {DTYPES} (the compute precision); got {dtype!r}")
    return np.dtype(name)


def check_nonnegative(value, name: str, meaning: str = "") -> float:
    """``value`` as a finite float >= 0 (NumPy scalars too), or a ValueError naming ``name``
    and, in parentheses, ``meaning`` (e.g. "0 = interpolation")."""
    hint = f" ({meaning})" if meaning else ""
    # float("0.1") would pass, and float(np.complex128(2 + 1j)) drops the imaginary part
    if isinstance(value, (str, bytes, bool, np.bool_, complex, np.complexfloating)):
        raise ValueError(f"{arg(name)} must be a number >= 0{hint}; got {value!r}")
    try:
        v = float(value)
    except OverflowError:       # an int beyond float64: 10**400
        raise ValueError(f"{arg(name)} must be a finite number >= 0{hint}; got {value!r}") from None
    except (TypeError, ValueError):
        raise ValueError(f"{arg(name)} must be a number >= 0{hint}; got {value!r}") from None
    if not np.isfinite(v) or v < 0:
        raise ValueError(f"{arg(name)} must be a finite number >= 0{hint}; got {value!r}")
    return v


def check_tile(tile):
    """``tile``: None (automatic), or a positive integer (NumPy integers too) as a Python int."""
    if tile is None:
        return None
    t = as_integer(tile)          # integer-like (not bool) -> int, as depth and filter_size
    if is_int(t) and t >= 1:
        return t
    raise ValueError(f"{arg('tile')} must be a positive integer (rows/columns per tile) or None (automatic); "
                     f"got {tile!r}")


def _log2_bound(log2_m: float, c: int, arch, params) -> float:
    """log2 of the bound B of :func:`check_magnitude` for max |pixel| 2^log2_m (its docstring
    gives the recursion), computed in the log domain, so that it stays finite where B overflows
    float64."""
    def log2(v: float) -> float:
        return math.log2(v) if v > 0 else -math.inf

    def plus(a: float, b: float) -> float:                  # log2(2^a + 2^b)
        hi, lo = max(a, b), min(a, b)
        return hi if lo == -math.inf else hi + math.log2(1.0 + 2.0 ** (lo - hi))

    half_box, w, b2 = log2(float(arch.filter_size) ** 2 / 2), log2(params.w), log2(params.b2)
    unscaled = log2(c * float(arch.filter_size) ** 2) + 2 * log2_m
    sig = plus(log2(params.w_first) + unscaled, b2)
    th = -math.inf if arch.fix else sig
    bound = max(unscaled, sig)
    for _ in range(arch.n_layers - 1):
        box_k, box_g = half_box + sig, half_box + th
        sig = plus(w + box_k, b2)
        th = plus(sig, w + box_g)
        bound = max(bound, box_k, box_g, sig, th)
    return bound


def _power_of_two(log2_v: float, digits: int = 3) -> str:
    """2^log2_v written as a decimal number, also beyond float64's range (1e400 is not a float)."""
    ten = log2_v * math.log10(2.0)
    e = math.floor(ten)
    return f"{10.0 ** (ten - e):.{digits}g}e{e:+03d}"


def check_magnitude(x1, x2, arch, params, dtype, *, normalised: bool = False) -> None:
    """Refuse images whose kernel values would overflow the compute dtype (to inf, then NaN).

    A bound on the intermediates a backend holds in ``dtype``, from m = max |pixel| of both
    sets: the first layer's unscaled box sum of x . z is at most C k^2 m^2; with |K_l| <= q / 2
    and 0 <= Kdot <= 1/2, each later layer's unscaled box sums are at most k^2 / 2 times the
    previous Sigma and Theta.  The backends also form products q_x q_z of two diagonals (CUDA)
    and row sums of up to max(H, W) entries, so B * max(B, H, W), for the bound B of all of
    these, must stay 100 times below the largest finite value of ``dtype``.

    ``normalised``: the images were scaled to max |pixel| < 1 (:func:`prepare_magnitudes`), so
    only the architecture (W_std, depth) can overflow and the message says so.
    """
    dtype = np.dtype(dtype)
    xp = get_array_module(x1)
    m = float(xp.abs(x1).max())
    if x2 is not None and x2 is not x1:
        m = max(m, float(xp.abs(x2).max()))
    _, c, h, w = x1.shape
    # in the log domain: B and the largest safe pixel stay finite there where B overflows
    # float64 (1e160 pixels in float64 with a bias), so the message can give both
    log2_m = math.log2(m) if m > 0 else -math.inf
    log2_bound = _log2_bound(log2_m, c, arch, params)
    log2_limit = math.log2(float(np.finfo(dtype).max) / 100)
    if math.isfinite(m) and log2_bound + max(log2_bound, math.log2(max(h, w))) <= log2_limit:
        return
    given = [arg(name, v) for name, v in (("W_std", arch.W_std), ("b_std", arch.b_std)) if v is not None]
    weights = f" with {', '.join(given)}" if arch.convention == "neural_tangents" and given else ""
    what = (f"max |pixel| {m:.3g}{weights} gives kernel intermediates up to about "
            f"{_power_of_two(log2_bound)} in this architecture (depth {arch.max_depth}), whose products "
            f"overflow {dtype.name} (the output could be inf or NaN)")
    if normalised:
        raise ValueError(
            f"this architecture is too large for {arg('dtype', dtype.name)}, whatever the images: each image "
            f"is computed scaled to max |pixel| < 1 (exact without biases), and {what}; "
            + (f"use {arg('dtype', 'float64')}, or " if dtype == np.float32 else "")
            + (f"use a smaller {arg('W_std')} or fewer layers"
               if arch.convention == "neural_tangents" else
               f"use fewer layers or a smaller {arg('filter_size')}"))
    # Scaling the pixels (and b_std) by a scales B by a^2; B * max(B, H, W) <= limit needs
    # B <= sqrt(limit) (which is far above any H, W), so log2 a = (log2 sqrt(limit) - log2 B) / 2;
    # the figure is shown 10 % lower (2^-0.15), so that its two rounded digits are safe too.
    log2_safe = log2_m + (log2_limit / 2 - log2_bound) / 2
    rescale = ("rescale the images" + (f" to max |pixel| <= about {_power_of_two(log2_safe - 0.15, 2)}"
                                       if math.isfinite(log2_safe) else "")
               + (f" and {arg('b_std')} by the same factor a (the kernel scales by a^2)" if params.b2 or params.out_b2
                  else " (without biases, scaling all images by s scales the kernel by s^2)"))
    raise ValueError(f"the images are too large for {arg('dtype', dtype.name)}: {what}; "
                     + (f"use {arg('dtype', 'float64')}, or {rescale}" if dtype == np.float32 else rescale))


# ----------------------------------------------------------------------------- small magnitudes
# Per-image diagonals q at each image's largest entry must stay at least this far inside the
# compute dtype: the CUDA kernel forms products q_x q_z, which must stay 2^40 above the
# smallest normal number, or they flush to zero and the kernel loses its significant entries
# (float32: 1.1e-13, float64: 1.6e-148).
def small_limit(dtype) -> float:
    return math.sqrt(float(np.finfo(dtype).tiny)) * 2.0 ** 20


# Any positive q must keep 1/sqrt(q) (which the numba kernel holds in the compute dtype) 2^10
# below the largest finite value, or 0 * inf gives NaN (float32: 9e-72; float64: no limit).
def _positive_limit(dtype) -> float:
    return (2.0 ** 10 / float(np.finfo(dtype).max)) ** 2


# Results are float64: every image's kernel values must lie where float64 holds them with full
# precision (at least 2^52 times its smallest normal number) and 2^40 below overflow.
RESULT_RANGE = (float(np.finfo(np.float64).tiny) * 2.0 ** 52, float(np.finfo(np.float64).max) / 2.0 ** 40)
FLUSH = {"float32": 2.0 ** -64}      # scaled pixels below this count as 0 (see prepare_magnitudes)


def homogeneous(params) -> bool:
    """Whether K(a x, b z) = a b K(x, z) holds exactly: no bias in any layer or the readout."""
    return params.b2 == 0 and params.out_b2 == 0


def image_exponents(x) -> np.ndarray:
    """Per image the integer e with max |x_i| = f 2^e, f in [0.5, 1) (0 for an all-zero image),
    as a host int64 array: x_i / 2^e has max |pixel| in [0.5, 1)."""
    xp = get_array_module(x)
    m = to_host(xp.abs(x.reshape(x.shape[0], -1)).max(axis=1))
    return np.frexp(m)[1].astype(np.int64)


def diagonal_extremes(x, arch, params, chunk_bytes: int | None = None):
    """(qmax, qpos) of images ``x`` (NumPy or CuPy): qmax[i, l] = max over positions of
    q_i(l, p) (an (N, L) array) and qpos[i] = the least positive q_i(l, p) over layers and
    positions (inf where none is positive), both host float64, computed in float64 as every
    backend computes the diagonals (``diag.diag_norms``), a chunk of images at a time
    (``diag.chunk_images``)."""
    xp = get_array_module(x)
    n, _, h, w = x.shape
    step = chunk_images(arch, h, w, chunk_bytes)
    qmax = np.empty((n, arch.n_layers))
    qpos = np.empty(n)
    for i in range(0, n, step):
        # not kept: the backends' own preparation keeps what it reuses (a GPU's is on its device)
        q = diag_norms(x[i:i + step], arch, params, keep=False)
        qmax[i:i + step] = to_host(q.max(axis=(2, 3)))
        qpos[i:i + step] = to_host(xp.where(q > 0, q, xp.inf).min(axis=(1, 2, 3)))
    return qmax, qpos


#: The diagonal extremes of the image sets seen last, at most this many bytes of them: a set met
#: again (a training set in ``gram(x_batch, x_train)`` called batch after batch, an estimator's
#: ``predict``) is not run through the diagonal recursion on the host again: hashing a set costs
#: far less than its diagonals (README, Exactness; :mod:`cntk_engine.memo`).
EXTREMES_CACHE_BYTES = 64 << 20
_extremes_cache = Memo()


def clear_memo() -> None:
    """Forget the kept diagonal extremes (:data:`EXTREMES_CACHE_BYTES`)."""
    _extremes_cache.clear()


def known_diagonal_extremes(x, arch, params):
    """:func:`diagonal_extremes` of ``x``, from the cache when the same images (by SHA-256 of
    their bytes, so an array changed in place is computed again), architecture and layer
    numbers were seen recently; CuPy images are computed on their device each time, and a set
    whose extremes alone exceed ``EXTREMES_CACHE_BYTES`` (about 400,000 images at depth 21) is
    not kept."""
    if is_cupy(x):
        return diagonal_extremes(x, arch, params)
    x = np.ascontiguousarray(x)
    key = images_key(x, arch, params)
    hit = _extremes_cache.get(key)
    if hit is not None:
        return hit
    qmax, qpos = diagonal_extremes(x, arch, params)
    kept = (qmax.copy(), qpos.copy())       # shared by every later caller of these images
    for a in kept:
        a.setflags(write=False)
    _extremes_cache.put(key, kept, qmax.nbytes + qpos.nbytes, EXTREMES_CACHE_BYTES)
    return qmax, qpos


def check_small(qmax, qpos, arch, dtype, *, normalised: bool, names=("x1",)) -> None:
    """Refuse a job whose per-image diagonals (:func:`diagonal_extremes` of the images as the
    backends get them; a list of (qmax, qpos), one per image set named in ``names``) leave the
    range the compute dtype holds: the kernel would come out as zeros or NaN.  ``normalised``:
    the images were scaled to max |pixel| in [0.5, 1) (no biases), so rescaling cannot help."""
    dtype = np.dtype(dtype)
    low, pos_low = small_limit(dtype), _positive_limit(dtype)
    f64 = (f"use {arg('dtype', 'float64')} (it holds q >= {small_limit(np.float64):.2g})" if dtype == np.float32
           else "")
    for (qm, qp), name in zip(zip(qmax, qpos), names):
        live = qm[:, 0] > 0                       # an all-zero image has q = 0 exactly: exact zeros
        bad = live[:, None] & ~(qm >= low)
        if bad.any():
            first = np.where(bad.any(axis=1), bad.argmax(axis=1), arch.n_layers)   # first low layer
            i = int(first.argmin())
            layer = int(first[i])
            reached = int(first.min()) + 1           # depth = conv layers + 1; layers 0..first-1 fine
            scaled = (" (each image computed scaled to max |pixel| in [0.5, 1), which is exact "
                      f"without biases, so the depth, {arg('W_std')} and image size set it, not the pixels)"
                      if normalised else "")
            if normalised:
                remedy = (f"{f64}, or use fewer layers" if f64 else f"use fewer layers or a larger {arg('W_std')}")
            else:
                # q scales by a^2 when the images and b_std do; 10 % more, so the rounded figure is safe
                factor = 1.1 * math.sqrt(low / float(qm[live].min()))
                # the largest q, scaled alike, must stay below check_magnitude's bound on the
                # intermediates (q is one of them), or the rescaled images are refused for size
                ceiling = math.sqrt(float(np.finfo(dtype).max) / 100)
                if factor ** 2 * float(qm[live].max()) > ceiling:
                    remedy = ((f"{f64}, or use fewer layers" if f64 else
                               f"use fewer layers or a larger {arg('W_std')}")
                              + f" (rescaling the images cannot help: their q spans "
                                f"{float(qm[live].min()):.2g} to {float(qm[live].max()):.2g} over "
                                f"the layers, more than {dtype.name} holds)")
                else:
                    remedy = ((f64 + ", or " if f64 else "")
                              + f"rescale the images and {arg('b_std')} by the same factor a, of about "
                                f"{factor:.2g} or more (the kernel scales by a^2)")
            reach = (f"{dtype.name} reaches depth {reached} at most (asked: {arch.max_depth})"
                     if reached >= 2 else f"{dtype.name} cannot compute this kernel at any depth")
            raise ValueError(
                f"the kernel would underflow {arg('dtype', dtype.name)}: the largest per-image variance q of "
                f"conv layer {layer + 1} of {arch.n_layers} is {qm[i, layer]:.3g} for "
                f"{image(name, i)}{scaled}, and {dtype.name} needs q >= {low:.2g} there, or the kernel "
                f"comes out as zeros or NaN; with these images and this architecture {reach}; "
                f"{remedy}")
        tiny = live & (qp < pos_low)
        if tiny.any():
            i = int(np.argmax(tiny))
            raise ValueError(
                f"{image(name, i)} has pixel windows whose variance q falls to {qp[i]:.3g} in this "
                f"architecture (depth {arch.max_depth}), where 1/sqrt(q) overflows {dtype.name} and "
                f"the kernel would be NaN; {f64 or 'rescale the images'}")


def check_results(exps, qmax, names=("x1",)) -> None:
    """Refuse images whose own kernel values, v_i = s_i^2 q_i (s_i = 2^e_i, ``exps`` from
    :func:`image_exponents`, q_i the scaled image's), fall outside the float64 range results are
    returned in (``RESULT_RANGE``).  A cross job holds each set to it too, though its entries
    are sqrt(v_i v_j) at most: its sets' own Grams come with it in every use (a test kernel and
    its training Gram), and so a cross job is refused before its work where either Gram would
    be (evaluate computes the test kernel first, and relies on it)."""
    lo, hi = RESULT_RANGE
    for e, qm, name in zip(exps, qmax, names):
        live = qm[:, 0] > 0
        if not live.any():
            continue
        with np.errstate(divide="ignore"):
            l2 = 2.0 * e[live, None] + np.log2(qm[live])      # log2 of s_i^2 q_i(l)
        for worst, bad, side in ((l2.min(axis=1), lambda v: v < math.log2(lo), "below"),
                                 (l2.max(axis=1), lambda v: v > math.log2(hi), "above")):
            if bad(worst).any():
                j = int(np.argmin(worst) if side == "below" else np.argmax(worst))
                i = int(np.nonzero(live)[0][j])
                raise ValueError(
                    f"{image(name, i)} (max |pixel| about 2^{int(e[i])}) would have kernel values "
                    f"(K(x, x), its own) of about 2^{worst[j]:.0f}, {side} the range of float64 "
                    f"results cntk_engine accepts ({lo:.2g} to {hi:.2g}: 2^52 above the smallest "
                    "normal number, so that entries far smaller than the diagonal keep full "
                    "precision, and 2^40 below overflow); rescale the images (without biases, "
                    "scaling every image by a scales the kernel by a^2)")


def prepare_magnitudes(x1, x2, arch, params, dtype):
    """The images the backends compute on, and their scales: (c1, c2, scale1, scale2).

    Without biases (:func:`homogeneous`) c_i = x_i / s_i with s_i = 2^e_i (max |c_i| in
    [0.5, 1); see the module docstring) and scale = the float64 s_i; in float32, scaled pixels
    below 2^-64 of their image's largest are computed as 0 (their share of the kernel is below
    1e-19, and 1/sqrt of their windows' variance would overflow float32).  With biases c = x
    and scale = None.  ``x2=None`` (symmetric): c2 = scale2 = None.  Every magnitude check runs
    here (:func:`check_magnitude`, :func:`check_small`, :func:`check_results`), before any work.
    """
    dtype = np.dtype(dtype)
    sets = [x1] if x2 is None else [x1, x2]
    names = ("x1",) if x2 is None else ("x1", "x2")
    if not homogeneous(params):
        check_magnitude(x1, x2, arch, params, dtype)
        ext = [known_diagonal_extremes(x, arch, params) for x in sets]
        check_small([q for q, _ in ext], [p for _, p in ext], arch, dtype, normalised=False,
                    names=names)
        return x1, x2, None, None
    exps = [image_exponents(x) for x in sets]
    scaled = []
    for x, e in zip(sets, exps):
        xp = get_array_module(x)
        c = xp.ldexp(x, xp.asarray(-e).reshape(-1, 1, 1, 1))      # exact: a power of two
        if dtype.name in FLUSH:
            c[xp.abs(c) < FLUSH[dtype.name]] = 0.0
        scaled.append(c)
    check_magnitude(scaled[0], scaled[-1], arch, params, dtype, normalised=True)
    ext = [known_diagonal_extremes(c, arch, params) for c in scaled]
    # the network's own range first: where the diagonals decay to 0 with depth, rescaling the
    # images cannot help (check_results would ask for it, with kernel values of 2^-inf)
    check_small([q for q, _ in ext], [p for _, p in ext], arch, dtype, normalised=True, names=names)
    check_results(exps, [q for q, _ in ext], names)
    scales = [np.ldexp(1.0, e) for e in exps]
    if x2 is None:
        return scaled[0], None, scales[0], None
    return scaled[0], scaled[1], scales[0], scales[1]


def as_images(x, data_format: str | None = "NCHW", name: str = "x1"):
    """Return ``x`` as an (N, C, H, W) float64 array (NumPy, or CuPy for CuPy input).
    ``data_format``: "NCHW", "NHWC" (transposed), or None: NCHW, refusing shapes that look
    channels-last (:func:`refuse_channels_last`)."""
    if data_format is not None and data_format not in DATA_FORMATS:
        raise ValueError(f"{arg('data_format')} must be None (NCHW, refusing shapes that look "
                         f"channels-last) or one of {DATA_FORMATS}; got {data_format!r}")
    refuse_masked(x, name)
    xp = get_array_module(x)
    try:
        arr = xp.asarray(x)
    except Exception as e:  # ragged lists, objects, ...
        raise ValueError(f"{arg(name)} must be an array of images; converting it failed: {e}") from None
    if arr.dtype.kind not in "biuf":
        raise ValueError(f"{arg(name)} must hold real numbers (any integer or float dtype); got dtype {arr.dtype}")
    if arr.ndim != 4:
        hint = ""
        if arr.ndim == 3:
            hint = (" (for single-channel images of shape (N, H, W) add a channel axis: "
                    + ("x[..., None] for NHWC" if data_format == "NHWC" else "x[:, None] for NCHW")
                    + "; for one image add the batch axis: x[None])")
        raise ValueError(f"{arg(name)} must be 4-D, (N, C, H, W) for {arg('data_format', 'NCHW')} or (N, H, W, C) "
                         f"for 'NHWC'; got shape {tuple(arr.shape)}{hint}")
    if data_format == "NHWC":
        arr = arr.transpose(0, 3, 1, 2)
    elif data_format is None:
        refuse_channels_last(arr.shape, name)
    if min(arr.shape) == 0:
        raise ValueError(f"{arg(name)} must hold at least one image with C, H, W >= 1; got (N, C, H, W) = "
                         f"{tuple(arr.shape)}")
    with np.errstate(over="ignore"):
        out = xp.ascontiguousarray(arr, dtype=xp.float64)
    if arr.dtype.kind == "f" and arr.dtype.itemsize > 8:      # longdouble: may leave float64
        _refuse_beyond_float64(arr, out, name)
    return check_finite(out, name)


def _refuse_beyond_float64(arr, out, name: str) -> None:
    """Long-double images ``arr`` read as float64 ``out``: refused when a finite pixel overflowed,
    or when an image that is not all zeros became one (every pixel below float64's smallest
    subnormal; the kernel of an all-zero image is exactly 0, so it would pass unnoticed)."""
    xp = get_array_module(arr)
    flat, flat64 = arr.reshape(arr.shape[0], -1), out.reshape(out.shape[0], -1)
    beyond = (xp.isfinite(flat) & ~xp.isfinite(flat64)).any(axis=1)
    if bool(beyond.any()):
        idx = [int(i) for i in xp.nonzero(beyond)[0][:10].tolist()]
        raise ValueError(f"pixels beyond float64's range (|x| > {np.finfo(np.float64).max:.4g}) "
                         f"in {images(name, idx, int(beyond.sum()) - len(idx))}: the images "
                         "are read as float64; rescale them into its range first")
    vanished = (flat != 0).any(axis=1) & ~(flat64 != 0).any(axis=1)
    if bool(vanished.any()):
        idx = [int(i) for i in xp.nonzero(vanished)[0][:10].tolist()]
        raise ValueError(f"every pixel of {images(name, idx, int(vanished.sum()) - len(idx))} is "
                         f"below float64's range (|x| < {np.finfo(np.float64).smallest_subnormal:.4g}): "
                         "the images are read as float64, where they would be all zeros; rescale "
                         "them into its range first")


def refuse_masked(x, name: str) -> None:
    """A NumPy masked array with masked entries is refused: the pixels under its mask would be
    used as they are (NumPy's asarray drops the mask)."""
    if isinstance(x, np.ma.MaskedArray) and bool(np.ma.getmaskarray(x).any()):
        raise ValueError(f"{arg(name)} is a masked array with {int(np.ma.getmaskarray(x).sum())} masked "
                         f"pixel(s); the kernel has no notion of a missing pixel: fill them first, "
                         f"e.g. {name}.filled(0)")


def check_finite(arr, name: str):
    """``arr`` (N, ...), refused with the images that hold NaN or Inf pixels (named as
    :func:`cntk_engine.spelling.images` names them)."""
    xp = get_array_module(arr)
    bad = ~xp.isfinite(arr).reshape(arr.shape[0], -1).all(axis=1)
    if bool(bad.any()):
        idx = [int(i) for i in xp.nonzero(bad)[0][:10].tolist()]
        more = int(bad.sum()) - len(idx)
        raise ValueError(f"NaN or Inf pixels in {images(name, idx, more)}; all pixels must be finite")
    return arr


def looks_channels_last(c: int, w: int) -> bool:
    """Whether (C, H, W) read as NCHW looks like channels-last data: its last axis 1 or 3 while C
    is more than 4 (CIFAR's (32, 32, 3))."""
    return w in (1, 3) and c > 4


def refuse_channels_last(shape, name: str) -> None:
    """The default layout (``data_format=None``: NCHW, of ``gram`` and the estimators) refuses
    (N, C, H, W) shapes whose last axis is 1 or 3 while C is more than 4: channels-last images
    read as NCHW (CIFAR's (N, 32, 32, 3) would be 32 channels of 32 x 3 "images", and the
    kernel would be meaningless)."""
    _, c, h, w = (int(v) for v in shape)
    if looks_channels_last(c, w):
        raise ValueError(
            f"{arg(name)} has shape {tuple(int(v) for v in shape)}: read as NCHW (the default) that is "
            f"{c} channels of {h} x {w} images, but its last axis ({w}) looks like the channels of "
            "channels-last data. Pass data_format='NHWC' for (N, H, W, C) images, or "
            f"data_format='NCHW' explicitly if these really are {c}-channel {h} x {w} images")


def check_pair(x1, x2) -> None:
    if x1.shape[1:] != x2.shape[1:]:
        raise ValueError(f"{arg('x1')} and {arg('x2')} must have the same (C, H, W); got "
                         f"{tuple(x1.shape[1:])} and {tuple(x2.shape[1:])}")
    if get_array_module(x1) is not get_array_module(x2):
        raise ValueError(f"{arg('x1')} and {arg('x2')} must both be NumPy or both be CuPy arrays")
