"""CUDA backend: the fused per-offset kernels of ``csrc/`` behind the backend contract.  A thin
layer: device arrays are CuPy arrays, passed to the extension as raw pointers together with
CuPy's current device and stream; nothing goes through the host when the images are already on
the device.

Kernel variants.  The extension holds every kernel variant kept in the tree
(``kernel_variants()``; docs/cuda_kernels.md): ``v3``, the default and the one measured on a
GPU, and candidates such as ``v5``.  A backend runs one: ``CudaBackend(..., kernel="v5")``, else
the environment variable ``CNTK_ENGINE_CUDA_KERNEL``, else the default.  Variants give the same
kernels to within float rounding; they differ in speed and in the per-image diagonal data
``prepare`` stores for them.
"""
from __future__ import annotations

import math
import os

import numpy as np

from ..arch import grid_weights
from ..diag import diag_norms
from .base import Backend, Prepared, Traits

KERNEL_ENV = "CNTK_ENGINE_CUDA_KERNEL"

#: What the CUDA backend computes that has not run on a GPU yet, by feature of a job
#: (docs/cuda_kernels.md, "Not run on a GPU yet", lists what a GPU run must check):
#: ``backend="auto"`` does not choose cuda for a job that uses one (:meth:`CudaBackend.unverified`),
#: ``backend="cuda"`` runs it with a logged warning.  A feature leaves this table once its GPU
#: tests (tests/test_cuda.py) have passed on a GPU.
NOT_GPU_VERIFIED = {
    "lap": "the LAP readout",
    "flip": "flip-symmetrised kernels",
}


def job_features(arch) -> set[str]:
    """The features of :data:`NOT_GPU_VERIFIED` (and "stack") that a job with ``arch`` uses."""
    used = set()
    if arch.has_pooling:
        used.add("stack")
    if arch.pooling == "lap":
        used.add("lap")
    if arch.flip:
        used.add("flip")
    return used


def _extension():
    from .. import _cuda  # built by CMake when a CUDA compiler was found at install time
    return _cuda


def kernel_variants() -> list[dict]:
    """The kernel variants compiled into the extension: dicts with ``name``, ``description``
    (one line), ``diag`` (the per-image diagonal layout it reads), ``gpu_measured`` and
    ``default_for`` (the dtypes, "float32" / "float64", it is the default for: the fastest
    variant measured on a GPU for each).  ImportError when the extension is not installed."""
    return list(_extension().kernel_variants())


def default_kernel(dtype="float32") -> str:
    """The variant run for ``dtype`` when none is asked for."""
    dtype = np.dtype(dtype).name
    return next(v["name"] for v in kernel_variants() if dtype in v["default_for"])


def resolve_kernel(kernel: str | None = None, dtype="float32") -> str:
    """The variant to run: ``kernel`` if given, else $CNTK_ENGINE_CUDA_KERNEL if set, else the
    extension's default for ``dtype``; ValueError naming the accepted values for any other name."""
    names = [v["name"] for v in kernel_variants()]
    default = default_kernel(dtype)
    if kernel is None:
        env = os.environ.get(KERNEL_ENV, "").strip()
        if not env:
            return default
        kernel, source = env, f"environment variable {KERNEL_ENV}"
    else:
        source = "kernel"
    if kernel not in names:
        accepted = ", ".join(f"{n} (default for {np.dtype(dtype).name})" if n == default else n
                             for n in names)
        raise ValueError(f"{source}={kernel!r} is not a CUDA kernel variant of this build; "
                         f"accepted: {accepted}")
    return kernel


def describe_kernel_variants() -> str:
    """Lines for ``cntk-engine info``: the compiled variants and the one a backend would run."""
    try:
        variants = kernel_variants()
    except ImportError:
        return "CUDA kernel variants: none (the CUDA extension is not installed)"
    try:
        per_dtype = {t: resolve_kernel(None, t) for t in ("float32", "float64")}
        selected = (per_dtype["float32"] if len(set(per_dtype.values())) == 1
                    else ", ".join(f"{k} for {t}" for t, k in per_dtype.items()))
    except ValueError as e:
        selected = f"none: {e}"
    lines = [f"CUDA kernel variants (select with {KERNEL_ENV}; selected: {selected}):"]
    for v in variants:
        tags = [f"default for {t}" for t in v["default_for"]] + [
            "measured on a GPU" if v["gpu_measured"] else "not measured on a GPU"]
        lines.append(f"  {v['name']:4s} [{', '.join(tags)}] {v['description']}")
    return "\n".join(lines)


# The per-image diagonal layouts the variants read (csrc/relu_step.cuh, Entry<V, T>::Diag), made
# from the float64 diagonals q (N, L, H, W) with xp = NumPy or CuPy:
#   "q":       q itself, (N, L, H, W)
#   "factors": (sqrt(q / 2 pi), 1 / sqrt(q)) with 1 / sqrt(q) := 0 where q <= 0 (zero-variance
#              windows, where c := 0), (N, L, H, W, 2); the ReLU step of a pair needs
#              sqrt(q_x q_z) / (2 pi) and 1 / sqrt(q_x q_z), which factor over the two images
def _diag_q(q, xp):
    return q


def _diag_factors(q, xp):
    s = xp.sqrt(xp.maximum(q, 0.0))
    inv = xp.where(s > 0, 1.0 / xp.where(s > 0, s, 1.0), 0.0)
    return xp.stack([s * math.sqrt(1.0 / (2.0 * math.pi)), inv], axis=-1)


# layout -> (its builder, the trailing shape it adds to (N, L, H, W))
DIAG_LAYOUTS = {"q": (_diag_q, ()), "factors": (_diag_factors, (2,))}


class CudaBackend(Backend):
    name = "cuda"

    def __init__(self, arch, params, dtype, kernel: str | None = None):
        super().__init__(arch, params, dtype)
        self._kernel_arg = kernel
        self._variant: dict | None = None

    @property
    def variant(self) -> dict:
        """The kernel variant this backend runs (an entry of :func:`kernel_variants`), resolved
        by :func:`resolve_kernel` when first needed: constructing a backend needs neither the
        extension nor a GPU (a Dask client constructs one), and under Dask each worker's
        environment decides."""
        if self._variant is None:
            name = resolve_kernel(self._kernel_arg, self.dtype)
            v = next(v for v in kernel_variants() if v["name"] == name)
            if v["diag"] not in DIAG_LAYOUTS:
                raise RuntimeError(f"CUDA kernel {name} reads diagonals in layout {v['diag']!r}, "
                                   f"which this cntk_engine cannot prepare (known: "
                                   f"{sorted(DIAG_LAYOUTS)}): the extension and the Python "
                                   "package come from different versions; reinstall")
            self._variant = v
        return self._variant

    @property
    def kernel(self) -> str:
        return self.variant["name"]

    @classmethod
    def traits(cls) -> Traits:
        return Traits(device="gpu", default_tile=512, min_tile=64)

    @classmethod
    def unavailable_reason(cls):
        try:
            ext = _extension()
        except ImportError as e:
            return ("the CUDA extension cntk_engine._cuda is not installed (it is built only when "
                    f"a CUDA compiler is found at install time; reinstall with nvcc on PATH): {e}")
        try:
            import cupy
        except ImportError as e:
            return f"CuPy is needed to hold device arrays and cannot be imported: {e}"
        try:
            n = cupy.cuda.runtime.getDeviceCount()
        except Exception as e:  # cupy raises CUDARuntimeError with the CUDA error text
            return f"no usable CUDA device: {e}"
        if n == 0:
            return "no CUDA device is visible"
        del ext
        return None

    @classmethod
    def unsupported(cls, arch, image_shape, dtype):
        if arch.has_pooling:
            return ("the CUDA kernels do not compute pooled stacks (Myrtle, AvgPool layers) yet; "
                    "the numba backend does")
        _, h, w = image_shape
        why = _extension().unsupported_shape(h, w, arch.filter_size, len(arch.depths))
        return None if why is None else f"{why}; got H x W = {h} x {w}, filter_size = {arch.filter_size}"

    @classmethod
    def unverified(cls, arch, image_shape, dtype):
        used = [what for key, what in NOT_GPU_VERIFIED.items() if key in job_features(arch)]
        if not used:
            return None
        return (f"the CUDA kernels for {' and '.join(used)} have not run on a GPU yet "
                "(backend='cuda' runs them; docs/cuda_kernels.md)")

    def prepare(self, x) -> Prepared:
        import cupy
        return self.prepare_arrays(x, cupy)

    def prepare_arrays(self, x, xp) -> Prepared:
        """``prepare`` with the array module ``xp`` (CuPy here; NumPy lets the layout be checked
        without a GPU): images in the compute dtype and the diagonals in the layout the kernel
        variant reads, each image's rows stored twice, (N, L, 2H, W[, 2]), so that the kernel
        reads z's rotated rows without a wrap."""
        xd = xp.asarray(x, dtype=xp.float64)           # no copy when already on the device
        q = diag_norms(xd, self.arch, self.params)     # (N, L, H, W) float64, where xd lives
        d = DIAG_LAYOUTS[self.variant["diag"]][0](q, xp)
        cast = lambda a: xp.ascontiguousarray(a, dtype=self.dtype)  # noqa: E731
        return Prepared(cast(xd), (cast(xp.concatenate([d, d], axis=2)),))

    def readout_slots(self) -> np.ndarray:
        """(L,) int32: the readout index t of each ReLU layer, -1 where none is read out."""
        slot = np.full(self.arch.n_layers, -1, dtype=np.int32)
        for t, layer in enumerate(self.arch.readout_layers):
            slot[layer] = t
        return slot

    def listed_grids(self, height: int, width: int):
        """The listed-grid readout of the LAP: (grids, weights), the packed grids g = dy * W + dx
        (0 <= dy < H, 0 <= dx < W; csrc/pair_sums_kernel.cuh) with a nonzero readout weight,
        int32 ascending, and their weights n_H(dy) n_W(dx) / c^4, float64 (``arch.grid_weights``:
        the packed grid's entries all have the circular offset (dy, dx)).  None for gap and
        flatten, which the kernel reads out without a list."""
        if self.arch.pooling != "lap":
            return None
        w = grid_weights(self.arch, height, width)[height - 1:].reshape(-1)   # dy = 0 .. H - 1
        grids = np.flatnonzero(w).astype(np.int32)
        return grids, np.ascontiguousarray(w[grids])

    def launch_params(self, xa, da, xb, db, ia, ib, slot, out, same_set: bool, device: int,
                      stream: int, grids=None, grid_w=None):
        """The extension's ``PairSumsParams`` for one launch.  The arrays are device arrays
        (anything with ``shape``, ``dtype`` and ``data.ptr``, C-contiguous); their shapes and
        dtypes are checked here against this backend's layout, the pointers and scalars by the
        extension (ValueError naming what is wrong either way)."""
        n_a, c, h, w = xa.shape
        n_b = xb.shape[0]
        n_pairs = ia.shape[0]
        n_out = len(self.arch.depths)
        layers = self.arch.n_layers
        layout = self.variant["diag"]
        tail = DIAG_LAYOUTS[layout][1]
        expected = {
            "xa": (xa, (n_a, c, h, w), self.dtype), "xb": (xb, (n_b, c, h, w), self.dtype),
            "da": (da, (n_a, layers, 2 * h, w) + tail, self.dtype),
            "db": (db, (n_b, layers, 2 * h, w) + tail, self.dtype),
            "ia": (ia, (n_pairs,), np.int32), "ib": (ib, (n_pairs,), np.int32),
            "slot": (slot, (layers,), np.int32), "out": (out, (n_pairs, n_out, 2), np.float64),
        }
        listed = self.listed_grids(h, w)
        if (grids is None) != (listed is None) or (grids is None) != (grid_w is None):
            raise ValueError(f"CUDA kernel {self.kernel}: grids and grid_w are needed for the "
                             f"LAP readout and only for it (pooling={self.arch.pooling!r})")
        if listed is not None:
            n_grids = listed[0].size
            expected["grids"] = (grids, (n_grids,), np.int32)
            expected["grid_w"] = (grid_w, (n_grids,), np.float64)
        for name, (a, shape, dtype) in expected.items():
            if tuple(a.shape) != shape or np.dtype(a.dtype) != np.dtype(dtype):
                raise ValueError(
                    f"CUDA kernel {self.kernel}: {name} must be {np.dtype(dtype).name} of shape "
                    f"{shape} (diagonal layout {layout!r}); got {np.dtype(a.dtype).name} "
                    f"{tuple(a.shape)}")
        p = self.params
        return _extension().PairSumsParams(
            device=device, stream=stream, kernel=self.kernel, dtype=self.dtype.name,
            xa=xa.data.ptr, da=da.data.ptr, xb=xb.data.ptr, db=db.data.ptr,
            pair_a=ia.data.ptr, pair_b=ib.data.ptr, slot=slot.data.ptr, out=out.data.ptr,
            n_pairs=n_pairs, C=c, H=h, W=w, L=layers, filter_size=self.arch.filter_size,
            n_out=n_out, w_first=p.w_first, w=p.w, b2=p.b2, gap=self.arch.pooling == "gap",
            fix=bool(self.arch.fix), same_set=bool(same_set),
            **({} if grids is None else dict(grids=grids.data.ptr, grid_w=grid_w.data.ptr,
                                             n_grids=int(grids.shape[0]))))

    def pairs(self, a: Prepared, b: Prepared, ia, ib, same_set: bool):
        import cupy
        # named, so that every array outlives the (asynchronous) launch's enqueueing
        xa, da = cupy.ascontiguousarray(a.images), cupy.ascontiguousarray(a.diag[0])
        xb, db = cupy.ascontiguousarray(b.images), cupy.ascontiguousarray(b.diag[0])
        ia = cupy.ascontiguousarray(ia, dtype=cupy.int32)
        ib = cupy.ascontiguousarray(ib, dtype=cupy.int32)
        slot = cupy.asarray(self.readout_slots())
        listed = self.listed_grids(*xa.shape[2:])
        grids, grid_w = (None, None) if listed is None else (cupy.asarray(v) for v in listed)
        out = cupy.empty((int(ia.size), len(self.arch.depths), 2), dtype=cupy.float64)
        params = self.launch_params(xa, da, xb, db, ia, ib, slot, out, same_set,
                                    device=cupy.cuda.Device().id,
                                    stream=cupy.cuda.get_current_stream().ptr,
                                    grids=grids, grid_w=grid_w)
        _extension().pair_sums(params)
        return out
