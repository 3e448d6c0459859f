"""CUDA backend: the fused per-offset kernels of ``csrc/`` behind the backend contract.  A thin
layer: device arrays are CuPy arrays, passed to the extension as raw pointers together with
CuPy's current device and stream; nothing goes through the host when the images are already on
the device.

Kernel variants.  The extension holds every kernel variant kept in the tree
(``kernel_variants()``; docs/cuda_kernels.md): one default per dtype, the fastest measured on a
GPU (``v3`` for float32, ``v5`` for float64), and candidates not measured yet (``v6``, ``v7``, ``v8``).  A
backend runs one: ``CudaBackend(..., kernel="v6")``, else the environment variable
``CNTK_ENGINE_CUDA_KERNEL``, else the dtype's default.  Variants give the same
kernels to within float rounding; they differ in speed and in the per-image diagonal data
``prepare`` stores for them.
"""
from __future__ import annotations

import math
import os

import numpy as np

from ..arch import grid_weights, readout_weights
from ..arrays import cuda_unavailable_reason, current_device, gpu_properties
from ..build_info import build_record
from ..diag import diag_norms
from ..spelling import arg
from .base import Backend, Prepared, Traits

KERNEL_ENV = "CNTK_ENGINE_CUDA_KERNEL"
#: The stack kernel's register budget for 32 x 32 float32 stacks (Myrtle): unset or 1 = the
#: default (no spills, one 8-warp block per multiprocessor), 2 = the candidate compiled for two
#: blocks (spills); the same bits either way.  For timing the two on a GPU
#: (tools/gpu/gpu_session.sh, phase stack_blocks; docs/cuda_kernels.md).
STACK_BLOCKS_ENV = "CNTK_ENGINE_CUDA_STACK_BLOCKS"


def stack_blocks_per_sm() -> int:
    """The stack kernel's blocks per multiprocessor from $CNTK_ENGINE_CUDA_STACK_BLOCKS: 0 (unset:
    the default), 1 or 2; ValueError naming the accepted values otherwise."""
    v = os.environ.get(STACK_BLOCKS_ENV, "").strip()
    if v in ("", "1", "2"):
        return int(v or 0)
    raise ValueError(f"environment variable {STACK_BLOCKS_ENV}={v!r}: accepted 1 (the default) or 2 "
                     "(the two-block candidate of the 32 x 32 float32 stack kernel)")

#: What the CUDA backend computes that has not run on a GPU yet, by feature of a job
#: (docs/cuda_kernels.md, "Not run on a GPU yet", lists what a GPU run must check):
#: ``backend="auto"`` does not choose cuda for a job that uses one (:meth:`CudaBackend.unverified`),
#: ``backend="cuda"`` runs it with a logged warning.  A feature leaves this table once its GPU
#: tests (tests/test_cuda.py) have passed on a GPU.
NOT_GPU_VERIFIED = {
    "stack": "pooled stacks (Myrtle, AvgPool layers)",
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


def stack_table(arch, height: int, width: int) -> list[tuple[int, int, int, int]]:
    """The stages of a pooled stack on height x width images as the stack kernel takes them:
    (height, width, conv layers, pool window) each, pool 0 after the last (its trailing pools
    are in the readout weights)."""
    return [(st.height, st.width, st.n_layers, st.pool.window if st.pool else 0)
            for st in arch.plan(height, width)[0]]


def _extension():
    from .. import _cuda  # built by CMake when a CUDA compiler was found at install time
    return _cuda


def kernel_variants() -> list[dict]:
    """The kernel variants compiled into the extension: dicts with ``name``, ``description``
    (one line), ``diag`` (the per-image diagonal layout it reads), ``gpu_measured``,
    ``default_for`` (the dtypes, "float32" / "float64", it is the default for: the fastest
    variant measured on a GPU for each) and ``base`` (the variant whose kernels it launches where
    it compiled none of its own, e.g. its pooled-stack kernel: itself for most).  ImportError when
    the extension is not installed."""
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


#: The most pairs one launch takes (csrc/binding.cpp refuses more: the kernels index a launch's
#: pairs in 32 bits); a tile given by the caller is held to it before any work (Traits).
MAX_LAUNCH_PAIRS = 2**31 - 1


# The per-image diagonal layouts the variants read (csrc/relu_step.cuh, Entry<V, T>::Diag), made
# from the float64 diagonals q (N, L, H, W) with xp = NumPy or CuPy, for the compute dtype:
#   "q":       q itself, (N, L, H, W)
#   "factors": (sqrt(q / 2 pi), 1 / sqrt(q)) with 1 / sqrt(q) := 0 where q is below the compute
#              dtype's smallest normal number (zero-variance windows, where c := 0, and windows
#              so faint that the kernel's product 1 / sqrt(q_x) * 1 / sqrt(q_z) of two of them
#              would overflow to inf, and c = 0 * inf be NaN where they share no pixel; such a
#              window's terms are below sqrt(q_x q_z) < 1e-19 (float32), 1e-154 (float64) of
#              the pair's), (N, L, H, W, 2); the ReLU step of a pair needs sqrt(q_x q_z) / (2 pi)
#              and 1 / sqrt(q_x q_z), which factor over the two images
#   "sqrt":    sqrt(q), (N, L, H, W): the product of the two images' values is sqrt(q_x q_z)
#              (v6 sets 1 / P := 0 below the smallest normal P itself)
def _diag_q(q, xp, dtype):
    return q


def _diag_sqrt(q, xp, dtype):
    return xp.sqrt(xp.maximum(q, 0.0))


def _diag_factors(q, xp, dtype):
    s = _diag_sqrt(q, xp, dtype)
    kept = q >= float(np.finfo(dtype).tiny)
    inv = xp.where(kept, 1.0 / xp.where(kept, s, 1.0), 0.0)
    return xp.stack([s * math.sqrt(1.0 / (2.0 * math.pi)), inv], axis=-1)


# layout -> (its builder, the trailing shape it adds to (N, L, H, W))
DIAG_LAYOUTS = {"q": (_diag_q, ()), "factors": (_diag_factors, (2,)), "sqrt": (_diag_sqrt, ())}


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
        return Traits(device="gpu", default_tile=512, min_tile=64, max_tile_pairs=MAX_LAUNCH_PAIRS)

    @classmethod
    def unavailable_reason(cls):
        try:
            ext = _extension()
        except ImportError as e:
            return ("the CUDA extension cntk_engine._cuda is not installed (it is built only when "
                    f"a CUDA compiler is found at install time; reinstall with nvcc on PATH): {e}")
        del ext
        return cuda_unavailable_reason()

    @classmethod
    def unsupported(cls, arch, image_shape, dtype):
        _, h, w = image_shape
        why = _extension().unsupported_shape(h, w, arch.filter_size, len(arch.depths))
        if why is not None:
            return f"{why}; got H x W = {h} x {w}, filter_size = {arch.filter_size}"
        if arch.has_pooling:
            stages = arch.plan(h, w)[0]
            for st in stages[:-1]:
                if st.pool.stride != st.pool.window:
                    return ("the CUDA stack kernel takes pools between conv layers whose stride "
                            f"equals their window (non-overlapping); got AvgPool({st.pool.window}, "
                            f"stride {st.pool.stride}) after the {st.height} x {st.width} stage; "
                            "the numba backend takes it")
            table = stack_table(arch, h, w)
            why = _extension().unsupported_stack(table, arch.filter_size)
            if why is not None:
                return (f"{why}; got stages {table}, filter_size = {arch.filter_size}; the numba "
                        "backend takes it")
            # the binding refuses it too, but only at the first launch, after the images are
            # prepared (the host emulation skips that check and ran the float kernel on doubles)
            if stack_blocks_per_sm() == 2 and (np.dtype(dtype) != np.float32 or (h, w) != (32, 32)):
                return (f"environment variable {STACK_BLOCKS_ENV}=2 asks for the two-block candidate, "
                        "compiled for 32 x 32 images in float32 only; got H x W = "
                        f"{h} x {w}, {np.dtype(dtype).name}: unset it for this job")
        return None

    @classmethod
    def unverified(cls, arch, image_shape, dtype):
        used = [what for key, what in NOT_GPU_VERIFIED.items() if key in job_features(arch)]
        if not used:
            return None
        return (f"the CUDA kernels for {' and '.join(used)} have not run on a GPU yet "
                f"({arg('backend', 'cuda')} runs them; docs/cuda_kernels.md)")

    def compute_record(self, device):
        """The kernel variant, the extension's build (CUDA version and the architectures nvcc
        compiled machine code for: a GPU outside them runs the driver's compilation of the
        PTX) and the GPU (name, compute capability); ``device`` None: the current GPU."""
        p = gpu_properties(current_device() if device is None else device)
        build = build_record() or {}
        return {"backend": self.name, "kernel": self.kernel,
                "gpu": f"{p['name']} (sm_{p['major']}{p['minor']})",
                "cuda_build": f"CUDA {build.get('cuda_version', '?')} for "
                              f"{build.get('cuda_architectures', '?')}"}

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
        layout = self.variant["diag"]
        d = DIAG_LAYOUTS[layout][0](q, xp, self.dtype)
        cast = lambda a: xp.ascontiguousarray(a, dtype=self.dtype)  # noqa: E731
        if not self.arch.has_pooling:
            return Prepared(cast(xd), (cast(xp.concatenate([d, d], axis=2)),), layout=layout)
        # a stack: layer l's rows at its stage's width h_s x w_s, twice, at the start of the
        # flattened (2H, W) (csrc/cntk_kernels.cuh, PairSumsParams)
        n, layers, h, w = q.shape
        tail = d.shape[4:]
        flat = xp.zeros((n, layers, 2 * h * w) + tail, dtype=xp.float64)
        first = 0
        for hs, ws, nl, _ in stack_table(self.arch, h, w):
            for l in range(first, first + nl):
                blk = d[:, l, :hs, :ws]
                flat[:, l, :2 * hs * ws] = xp.concatenate([blk, blk], axis=1).reshape((n, -1) + tail)
            first += nl
        return Prepared(cast(xd), (cast(flat.reshape((n, layers, 2 * h, w) + tail)),), layout=layout)

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

    def stack_readout(self, height: int, width: int):
        """The readout of a pooled stack on height x width images: (grids, readout_w,
        readout_scale): the last stage's packed grids g = dy * W_l + dx with a nonzero weight
        (int32, ascending), their per-entry weights R(p, p + (dy, dx) mod (H_l, W_l)) (float64,
        (n_grids, H_l, W_l); ``arch.readout_weights``), or None and the one weight when all
        weights are equal (Myrtle's readout: the mean over the 8 x 8 stage).  Cached per size:
        every launch of a job asks."""
        if getattr(self, "_readout_key", None) != (height, width):
            r = readout_weights(self.arch, height, width)
            hl, wl = r.shape[:2]
            if np.all(r == r.flat[0]):
                readout = np.arange(hl * wl, dtype=np.int32), None, float(r.flat[0])
            else:
                i = np.arange(hl)[None, None, :, None]
                j = np.arange(wl)[None, None, None, :]
                dy = np.arange(hl)[:, None, None, None]
                dx = np.arange(wl)[None, :, None, None]
                packed = r[i, j, (i + dy) % hl, (j + dx) % wl].reshape(hl * wl, hl, wl)
                grids = np.flatnonzero(np.any(packed != 0, axis=(1, 2))).astype(np.int32)
                readout = grids, np.ascontiguousarray(packed[grids]), 1.0
            self._readout_key, self._readout = (height, width), readout
        return self._readout

    def launch_params(self, xa, da, xb, db, ia, ib, slot, out, same_set: bool, device: int,
                      stream: int, grids=None, grid_w=None):
        """The extension's ``PairSumsParams`` for one launch.  The arrays are device arrays
        (anything with ``shape``, ``dtype`` and ``data.ptr``, C-contiguous, on GPU ``device``);
        their shapes, dtypes, contiguity and GPU are checked here against this backend's layout
        (:meth:`launch_fields`), the pointers and scalars by the extension (ValueError naming
        what is wrong either way)."""
        fields = self.launch_fields(xa, da, xb, db, ia, ib, slot, out, same_set, grids, grid_w)
        for name, v in fields.items():
            on = getattr(getattr(v, "device", None), "id", None)       # a CuPy array's GPU
            if on is not None and on != device:
                raise ValueError(f"CUDA kernel {self.kernel}: {name} is on GPU {on} and the launch "
                                 f"on GPU {device}: every array of a launch must be on its GPU")
        return _extension().PairSumsParams(
            device=device, stream=stream,
            **{k: (v.data.ptr if hasattr(v, "shape") else v) for k, v in fields.items()})

    def launch_fields(self, xa, da, xb, db, ia, ib, slot, out, same_set: bool, grids=None,
                      grid_w=None) -> dict:
        """The fields of the extension's ``PairSumsParams`` for one launch, named as it names
        them: the arrays themselves (checked here: shape and dtype, ValueError naming what is
        wrong) and the scalars.  Also what the host emulation of the kernels runs
        (tests/cuda_sim.py)."""
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
        p = self.params
        fields = dict(
            kernel=self.kernel, dtype=self.dtype.name, xa=xa, da=da, xb=xb, db=db, pair_a=ia,
            pair_b=ib, slot=slot, out=out, n_pairs=n_pairs, C=c, H=h, W=w, L=layers,
            filter_size=self.arch.filter_size, n_out=n_out, w_first=p.w_first, w=p.w, b2=p.b2,
            gap=self.arch.pooling == "gap", fix=bool(self.arch.fix), same_set=bool(same_set))
        if self.arch.has_pooling:       # grid_w: the stack's per-entry readout weights or None
            want_grids, want_w, scale = self.stack_readout(h, w)
            if grids is None or (grid_w is None) != (want_w is None):
                raise ValueError(f"CUDA kernel {self.kernel}: a stack's launch needs the listed "
                                 "grids of its last stage, and per-entry readout weights exactly "
                                 "when they are not all equal (CudaBackend.stack_readout)")
            expected["grids"] = (grids, want_grids.shape, np.int32)
            fields.update(grids=grids, n_grids=int(grids.shape[0]), stages=stack_table(self.arch, h, w),
                          readout_scale=scale, stack_blocks_per_sm=stack_blocks_per_sm())
            if want_w is not None:
                expected["readout_w"] = (grid_w, want_w.shape, np.float64)
                fields["readout_w"] = grid_w
            self._check_arrays(expected, f"diagonal layout {layout!r}, a stack")
            return fields
        listed = self.listed_grids(h, w)
        if (grids is None) != (listed is None) or (grids is None) != (grid_w is None):
            raise ValueError(f"CUDA kernel {self.kernel}: grids and grid_w are needed for the "
                             f"LAP readout and only for it (pooling={self.arch.pooling!r})")
        if listed is not None:
            n_grids = listed[0].size
            expected["grids"] = (grids, (n_grids,), np.int32)
            expected["grid_w"] = (grid_w, (n_grids,), np.float64)
            fields.update(grids=grids, grid_w=grid_w, n_grids=int(n_grids))
        self._check_arrays(expected, f"diagonal layout {layout!r}")
        return fields

    def _check_arrays(self, expected: dict, context: str) -> None:
        """ValueError naming the first array of ``expected`` ({name: (array, shape, dtype)})
        whose shape or dtype is not the one given, or that is not C-contiguous (the kernels
        read every array by row-major offsets from its address: a strided view's would be
        other elements)."""
        for name, (a, shape, dtype) in expected.items():
            if tuple(a.shape) != shape or np.dtype(a.dtype) != np.dtype(dtype):
                raise ValueError(
                    f"CUDA kernel {self.kernel}: {name} must be {np.dtype(dtype).name} of shape "
                    f"{shape} ({context}); got {np.dtype(a.dtype).name} {tuple(a.shape)}")
            flags = getattr(a, "flags", None)
            if flags is not None and not flags.c_contiguous:
                raise ValueError(
                    f"CUDA kernel {self.kernel}: {name} must be C-contiguous (the kernel reads it "
                    f"by row-major offsets; ascontiguousarray makes it so); got strides "
                    f"{tuple(getattr(a, 'strides', ()))} for shape {tuple(a.shape)}")

    def launch_arrays(self, a: Prepared, b: Prepared, ia, ib, xp) -> tuple:
        """(xa, da, xb, db, ia, ib, slot, out, grids, grid_w): the arrays of a launch for the
        pairs (a[ia], b[ib]), contiguous, where ``xp`` (CuPy; NumPy for the host emulation)
        keeps them; ``out`` uninitialised; grids and grid_w None but for the LAP readout."""
        layout = self.variant["diag"]
        for name, p in (("a", a), ("b", b)):
            if p.layout != layout:    # "q" and "sqrt" have the same shapes: checked here
                raise ValueError(f"CUDA kernel {self.kernel} reads diagonals in layout {layout!r}; "
                                 f"set {name} was prepared in layout {p.layout!r} (by a backend "
                                 "running another kernel variant): prepare it with this backend")
        xa, da = xp.ascontiguousarray(a.images), xp.ascontiguousarray(a.diag[0])
        xb, db = xp.ascontiguousarray(b.images), xp.ascontiguousarray(b.diag[0])
        ia = xp.ascontiguousarray(ia, dtype=xp.int32)
        ib = xp.ascontiguousarray(ib, dtype=xp.int32)
        slot = xp.asarray(self.readout_slots())
        if self.arch.has_pooling:     # grid_w: the stack's per-entry readout weights, or None
            g, rw, _ = self.stack_readout(*xa.shape[2:])
            grids, grid_w = xp.asarray(g), (None if rw is None else xp.asarray(rw))
        else:
            listed = self.listed_grids(*xa.shape[2:])
            grids, grid_w = (None, None) if listed is None else (xp.asarray(v) for v in listed)
        out = xp.empty((int(ia.size), len(self.arch.depths), 2), dtype=xp.float64)
        return xa, da, xb, db, ia, ib, slot, out, grids, grid_w

    def pairs(self, a: Prepared, b: Prepared, ia, ib, same_set: bool):
        import cupy
        # named, so that every array outlives the (asynchronous) launch's enqueueing
        xa, da, xb, db, ia, ib, slot, out, grids, grid_w = self.launch_arrays(a, b, ia, ib, cupy)
        params = self.launch_params(xa, da, xb, db, ia, ib, slot, out, same_set,
                                    device=cupy.cuda.Device().id,
                                    stream=cupy.cuda.get_current_stream().ptr,
                                    grids=grids, grid_w=grid_w)
        _extension().pair_sums(params)
        return out
