"""The public entry point: ``gram``."""
from __future__ import annotations

import logging
import time

import numpy as np

from . import backends, diag, inputs
from .arch import KERNELS, make_architecture
from .arrays import current_device, is_cupy, to_host
from .inputs import as_images, check_dtype, check_pair, check_tile, prepare_magnitudes
from .jobs import GramJob, run_job
from .jobs.local import check_devices, resolve_devices
from .spelling import arg, option

log = logging.getLogger("cntk_engine")


def gram(x1, x2=None, *, depth=None, depths=None, architecture="cnn", pooling="gap",
         lap_window=None, flip=False, fix=False, kernel="ntk",
         convention="arora", W_std=None, b_std=None, filter_size=3, backend="auto",
         dtype="float32", data_format=None, tile=None, return_info=False, devices=None,
         out=None, client=None, progress=False):
    """Exact CNTK / NNGP kernel matrix between two batches of images.

    Parameters
    ----------
    x1, x2 : arrays (N1, C, H, W) and (N2, C, H, W) (or NHWC with ``data_format="NHWC"``; the
        default ``data_format=None`` reads NCHW but refuses shapes that look channels-last:
        last axis 1 or 3 and more than 4 "channels", e.g. CIFAR's (N, 32, 32, 3); pass
        ``data_format="NCHW"`` explicitly to accept such a shape as NCHW), any
        real dtype (uint8 images are used as they are, as float).  ``x2=None`` (or ``x2`` the
        same array object as ``x1``) computes the symmetric Gram of ``x1``, each unordered pair
        once.  A pair of identical images anywhere in ``x1`` and ``x2`` gets exactly the
        image's self-pair value (``cntk_engine.arch``, self pairs); a duplicate's other entries
        are the same pairs as the original's, equal to rounding.  With ``x2`` an equal array
        but another object (a copy), both orders of each pair are computed, and K[i, j] and
        K[j, i] may differ by rounding (about 1e-9 relative in float32).  CuPy arrays in give
        CuPy arrays out.
    depth : int >= 2, conv layers + 1 (the paper's depth).  Or ``depths=[...]``: every depth
        is read out of ONE pass over the deepest network and a dict {depth: result} returned.
    architecture : "cnn" (the CNN of Arora et al.: depth - 1 conv + ReLU layers, the default),
        "myrtle5" / "myrtle7" / "myrtle10" (the Myrtle pooling networks of Shankar et al. 2020,
        32 x 32 images), or a stack of ``cntk_engine.ConvRelu()`` and ``cntk_engine.AvgPool(w,
        s)`` layers from ``cntk_engine.serial(...)``.  A preset or stack fixes its depth (conv
        layers + 1): leave depth and depths out.
    pooling : the readout: "gap" (global average pooling, CNTK-GAP), "flatten" (the paper's
        CNTK-V) or "lap" (local average pooling of Li et al. 2019: a ``lap_window`` x
        ``lap_window`` circular average pool, then flatten); in a stack, after its last layer.
    lap_window : c of the LAP readout (1 = flatten; c = H on H x H images = gap up to a
        constant), with ``pooling="lap"`` only.
    flip : the flip-symmetrised kernel (K(x, z) + K(x, hflip z)) / 2: the network made
        invariant to horizontal flips; twice the cost per pair.
    fix : the first and last layers are not trained (paper Section 4.2).
    kernel : "ntk", "nngp" or "both" (a tuple (ntk, nngp)).
    convention : "arora" (the paper's reference code values) or "neural_tangents" (the values
        of neural-tangents' stax with ``W_std`` (default sqrt 2) and ``b_std`` (default no bias)).
    filter_size : odd conv filter size k (k x k, SAME zero padding).
    backend : "numba" (CPU), "cuda" (GPU), "reference" (float64 NumPy, slow) or "auto" (cuda if
        usable, else numba).
    dtype : "float32" (default) or "float64" compute precision; results are always float64.
        The reference computes in float64 whatever ``dtype`` says (and its info says so).
    tile : rows/columns per tile (one backend call each); default depends on the backend.
    return_info : also return a dict saying what ran (backend, tiles, seconds, pairs; ``compute``:
        what computed this run's tiles, per device, as a store's run records hold it; empty
        where it computed none, as when a finished store is resumed; ``prepare_seconds``: per
        local worker, the seconds its preparation of the images took, the per-image diagonals
        that a Gram of few images spends beside its pairs).
    devices : GPUs for backend "cuda": None or "all" (every visible GPU, one worker thread each)
        or a list of ids; CPU backends always use every core.
    out : path of a Zarr store (a directory, e.g. "gram.zarr") to write the matrix to instead of
        RAM, tile by tile; running the same job again resumes it (only missing tiles are
        computed), another job's store is refused.  Layout: ``cntk_engine.jobs.store``.
    client : a ``dask.distributed.Client``: tiles run as Dask tasks on its workers (needs the
        "dask" extra; GPU workers must declare ``resources={"GPU": 1}``).  Without ``out`` the
        tiles are gathered into memory; with ``out`` (a path every worker can reach) workers
        write them into the store.
    progress : show a progress bar (tqdm: pairs/s, ETA).

    Returns
    -------
    (N1, N2) float64 array, a tuple (ntk, nngp) for ``kernel="both"``, or a dict over depths;
    with ``out`` the (read-only) ``zarr.Group`` of the store instead; followed by the info dict
    when ``return_info=True``.
    """
    t0 = time.perf_counter()
    if not isinstance(kernel, str) or kernel not in KERNELS:     # a 0-d array compares equal too
        hint = (f" (did you mean {kernel.lower()!r}?)" if isinstance(kernel, str)
                and kernel.lower() in KERNELS else "")
        raise ValueError(f"kernel must be one of {KERNELS}; got {kernel!r}{hint}")
    kernel = str(kernel)
    cdtype = check_dtype(dtype)
    arch = make_architecture(depth=depth, depths=depths, architecture=architecture,
                             pooling=pooling, lap_window=lap_window, flip=flip, fix=fix,
                             convention=convention, W_std=W_std, b_std=b_std,
                             filter_size=filter_size)
    backends.check_name(backend)
    a = as_images(x1, data_format, "x1")
    symmetric = x2 is None or x2 is x1      # gram(x, x): each unordered pair once
    b = a if symmetric else as_images(x2, data_format, "x2")
    if not symmetric:
        check_pair(a, b)
    tile = check_tile(tile)         # None, or a positive Python int (NumPy integers too)
    if not isinstance(return_info, (bool, np.bool_)):       # NumPy booleans too, as flip and fix
        raise ValueError(f"return_info must be True or False; got {return_info!r}")
    if not isinstance(progress, (bool, np.bool_)):
        raise ValueError(f"progress must be True or False; got {progress!r}")
    return_info, progress = bool(return_info), bool(progress)
    image_shape = tuple(int(v) for v in a.shape[1:])
    arch.check_image_shape(*image_shape)
    if arch.flip and image_shape[2] == 1:
        log.warning("flip=True on images 1 pixel wide: a horizontal flip leaves each as it is, "
                    "so the kernel is the plain one at twice its cost; leave flip out")

    devices = check_devices(devices)
    if client is not None:      # the workers' GPUs and CUDA extension decide, not this process's
        if devices is not None:
            raise ValueError(f"{arg('devices')} selects local GPUs; with {arg('client')} the Dask "
                             "workers decide (one GPU per worker with resources={'GPU': 1}); "
                             f"leave {arg('devices')} unset")
        from .jobs.dask import resolve_backend
        cls = resolve_backend(client, backend, arch, image_shape, cdtype)
        device_ids = None
        _check_working_memory(cls, arch, image_shape, cdtype, here=False)
    else:
        cls = backends.resolve(backend, arch, image_shape, cdtype)
        device_ids = resolve_devices(cls.traits().device, devices)
        _check_working_memory(cls, arch, image_shape, cdtype)
    cdtype = np.dtype(cls.traits().compute_dtype or cdtype)        # the reference: float64
    result_device = current_device() if is_cupy(a) else None      # CuPy in -> CuPy out
    # Device images stay on the device for a local GPU job (each GPU worker takes them as they
    # are on its own device).  CPU backends, a Zarr store (whose job record hashes the images)
    # and Dask (which scatters them) take one host copy.
    if result_device is not None and (device_ids is None or out is not None):
        a = to_host(a)
        b = a if symmetric else to_host(b)
    params = arch.layer_params(*image_shape)
    # no silent inf, zeros or NaN: images scaled per image where that is exact (no biases),
    # refused where the compute dtype cannot hold the kernel
    c1, c2, s1, s2 = prepare_magnitudes(a, None if symmetric else b, arch, params, cdtype)
    job = GramJob(x1=a, x2=None if symmetric else b, arch=arch, params=params, kernel=kernel,
                  dtype=cdtype, backend=cls, tile=tile, devices=device_ids,
                  result_device=None if out is not None else result_device, out=out,
                  client=client, progress=progress, scale1=s1, scale2=s2,
                  inputs=None if s1 is None else (c1, c2))
    result, info = run_job(job)
    if out is None:
        def pick(res):
            return (res["ntk"], res["nngp"]) if kernel == "both" else res[kernel]

        result = pick(result[arch.depths[0]]) if depths is None else {d: pick(r) for d, r in result.items()}
    if not return_info:
        return result
    return result, dict(info, seconds=time.perf_counter() - t0)


def _check_working_memory(cls, arch, image_shape, dtype, *, here: bool = True) -> None:
    """A job whose calls would hold more than the RAM available is refused before any work,
    instead of ending with the OOM killer: the backend's ``working_memory`` (a pooled stack's
    4-D covariances on large images, or the float64 oracle's) and, for a backend that prepares
    the images on the host, one image's diagonals (``diag.working_bytes``: a filter far wider
    than the images pads them far beyond their size).  ``here=False`` (Dask): the workers'
    memory is theirs; only the diagonals, which the client prepares for a CPU backend."""
    from .arrays import available_memory, format_bytes
    from .diag import working_bytes
    _, h, w = image_shape
    own = cls.working_memory(arch, tuple(image_shape), dtype) if here else None
    need, parts = (0, []) if own is None else (own[0], [own[1]])
    if cls.traits().device == "cpu":
        one = working_bytes(arch, h, w)
        need += one
        if one > 64 << 20:
            k = arch.filter_size
            parts.append(f"{format_bytes(one)} to prepare each image's diagonals, its "
                         f"{h} x {w} pixels padded by {k // 2} on each side for "
                         f"{arg('filter_size', k)}")
    free = available_memory()
    if need > free:
        parts = [p for p in parts if p] or ["its working arrays"]
        ways = ["smaller images (" + ("cntk-engine preprocess --downsample" if option("backend")
                                      else "cntk_engine.preprocess.downsample") + ")"]
        if arch.filter_size > 2 * max(h, w):
            ways.append(f"a smaller {arg('filter_size')}")
        if cls.name == "reference":
            ways.append(arg("backend", "numba"))
        raise MemoryError(
            f"{arg('backend', cls.name)} would hold about {format_bytes(need)} while it computes "
            f"this job on {h} x {w} images ({'; '.join(parts)}), more than the "
            f"{format_bytes(free)} of RAM available {'now' if here else 'on this client'}: use "
            + (f"{', '.join(ways[:-1])} or {ways[-1]}" if len(ways) > 1 else ways[0]))


def clear_memos() -> None:
    """Forget every set's kept per-image results (``diag.MEMO_BYTES`` of diagonals,
    ``inputs.EXTREMES_CACHE_BYTES`` of their extremes): they outlive the estimator or call that
    made them, for as long as the process lives."""
    diag.clear_memo()
    inputs.clear_memo()
