"""The public entry point: ``gram``."""
from __future__ import annotations

import logging
import time

import numpy as np

from . import backends as _backends
from .arch import KERNELS, make_architecture
from .diag import array_module
from .inputs import as_images, check_dtype, check_magnitude, check_pair, check_tile
from .scheduler import execute

log = logging.getLogger("cntk_engine")


def gram(x1, x2=None, *, depth=None, depths=None, pooling="gap", fix=False, kernel="ntk",
         convention="arora", W_std=None, b_std=None, filter_size=3, backend="auto",
         dtype="float32", data_format="NCHW", tile=None, return_info=False, devices=None,
         out=None, client=None, progress=False):
    """Exact CNTK / NNGP kernel matrix between two batches of images.

    Parameters
    ----------
    x1, x2 : arrays (N1, C, H, W) and (N2, C, H, W) (or NHWC with ``data_format="NHWC"``), any
        real dtype (uint8 images are used as they are, as float).  ``x2=None`` (or ``x2`` the
        same array object as ``x1``) computes the symmetric Gram of ``x1``, each unordered pair
        once.  Identical images anywhere in ``x1`` and ``x2`` get exactly equal kernel values
        (``cntk_engine.arch``, self pairs).  CuPy arrays in give CuPy arrays out.
    depth : int >= 2, conv layers + 1 (the paper's depth).  Or ``depths=[...]``: every depth
        is read out of ONE pass over the deepest network and a dict {depth: result} returned.
    pooling : "gap" (global average pooling, CNTK-GAP) or "flatten" (the paper's CNTK-V).
    fix : the first and last layers are not trained (paper Section 4.2).
    kernel : "ntk", "nngp" or "both" (a tuple (ntk, nngp)).
    convention : "arora" (the paper's reference code values) or "neural_tangents" (the values
        of neural-tangents' stax with ``W_std`` (default sqrt 2) and ``b_std`` (default no bias)).
    filter_size : odd conv filter size k (k x k, SAME zero padding).
    backend : "numba" (CPU), "cuda" (GPU), "reference" (float64 NumPy, slow) or "auto" (cuda if
        usable, else numba).
    dtype : "float32" (default) or "float64" compute precision; results are always float64.
    tile : rows/columns per tile (one backend call each); default depends on the backend.
    return_info : also return a dict saying what ran (backend, tiles, seconds, pairs).
    devices : GPUs for backend "cuda": None or "all" (every visible GPU, one worker thread each)
        or a list of ids; CPU backends always use every core.
    out : path of a Zarr store (a directory, e.g. "gram.zarr") to write the matrix to instead of
        RAM, tile by tile; running the same job again resumes it (only missing tiles are
        computed), another job's store is refused.  Layout: ``cntk_engine.store``.
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
    if kernel not in KERNELS:
        raise ValueError(f"kernel must be one of {KERNELS}; got {kernel!r}")
    cdtype = check_dtype(dtype)
    arch = make_architecture(depth=depth, depths=depths, pooling=pooling, fix=fix,
                             convention=convention, W_std=W_std, b_std=b_std,
                             filter_size=filter_size)
    if backend not in _backends.BACKENDS:
        raise ValueError(f"backend must be one of {_backends.BACKENDS}; got {backend!r}")
    a = as_images(x1, data_format, "x1")
    symmetric = x2 is None or x2 is x1      # gram(x, x): each unordered pair once
    b = a if symmetric else as_images(x2, data_format, "x2")
    if not symmetric:
        check_pair(a, b)
    tile = check_tile(tile)         # None, or a positive Python int (NumPy integers too)
    if not isinstance(progress, bool):
        raise ValueError(f"progress must be True or False; got {progress!r}")

    if client is not None:      # the workers' GPUs and CUDA extension decide, not this process's
        from .distributed import resolve_backend
        cls = resolve_backend(client, backend, arch, a.shape[2], a.shape[3])
    else:
        cls = _backends.resolve(backend)
        if backend == "auto" and cls.shape_unsupported(arch, a.shape[2], a.shape[3]) is not None:
            cls = _backends.backend_class("numba")  # e.g. images larger than the GPU kernels take
    on_device = array_module(a) is not np          # CuPy in -> CuPy out
    # Device images stay on the device for the local CUDA path (each GPU worker takes them as they
    # are on its own device).  CPU backends, a Zarr store (whose job record hashes the images)
    # and Dask (which scatters them) take one host copy.
    if on_device and (cls.name != "cuda" or out is not None or client is not None):
        a = a.get()
        b = a if symmetric else b.get()
    _, c, h, w = a.shape
    params = arch.layer_params(c, h, w)
    check_magnitude(a, None if symmetric else b, arch, params, cdtype)   # no silent inf/NaN
    result, sched = execute(cls, arch, params, cdtype, a, None if symmetric else b, kernel=kernel,
                            tile=tile, devices=devices, out=out, client=client, progress=progress)
    if out is not None:
        return (result, dict(sched, seconds=time.perf_counter() - t0)) if return_info else result
    kernels = result

    def follow_input(arr):
        if on_device:
            import cupy
            return cupy.asarray(arr)
        return arr.get() if array_module(arr) is not np else arr

    def pick(res):
        res = {k: follow_input(v) for k, v in res.items()}
        return (res["ntk"], res["nngp"]) if kernel == "both" else res[kernel]

    result = pick(kernels[arch.depths[0]]) if depth is not None else {d: pick(r) for d, r in kernels.items()}
    if not return_info:
        return result
    n1, n2 = a.shape[0], b.shape[0]
    info = dict(sched, unique_pairs=n1 * (n1 + 1) // 2 if symmetric else n1 * n2,
                seconds=time.perf_counter() - t0)
    return result, info
