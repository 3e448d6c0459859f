"""CUDA backend: the fused per-offset kernels of ``csrc/cntk_kernels.cu`` behind the backend
contract.  A thin layer: device arrays are CuPy arrays, passed to the extension as raw
pointers together with CuPy's current device and stream; nothing goes through the host when the
images are already on the device.
"""
from __future__ import annotations

import numpy as np

from ..diag import diag_norms
from .base import Backend, Prepared, Traits


def _extension():
    from .. import _cuda  # built by CMake when a CUDA compiler was found at install time
    return _cuda


class CudaBackend(Backend):
    name = "cuda"

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
        if arch.pooling == "lap" or arch.flip:
            return ("the CUDA kernels do not compute the LAP readout or flip-symmetrised kernels "
                    "yet; the numba backend does")
        _, h, w = image_shape
        why = _extension().unsupported_shape(h, w, arch.filter_size, len(arch.depths))
        return None if why is None else f"{why}; got H x W = {h} x {w}, filter_size = {arch.filter_size}"

    def prepare(self, x) -> Prepared:
        import cupy
        xd = cupy.asarray(x, dtype=cupy.float64)          # no copy when already on the device
        q = diag_norms(xd, self.arch, self.params)        # computed on the device, in float64
        cast = lambda a: cupy.ascontiguousarray(a, dtype=self.dtype)  # noqa: E731
        # rows stored twice, (N, L, 2H, W): the kernel reads z's rotated rows without a wrap
        return Prepared(cast(xd), (cast(cupy.concatenate([q, q], axis=2)),))

    def pairs(self, a: Prepared, b: Prepared, ia, ib, same_set: bool):
        import cupy
        ia = cupy.ascontiguousarray(ia, dtype=cupy.int32)
        ib = cupy.ascontiguousarray(ib, dtype=cupy.int32)
        slot = np.full(self.arch.n_layers, -1, dtype=np.int32)
        for t, layer in enumerate(self.arch.readout_layers):
            slot[layer] = t
        slot_d = cupy.asarray(slot)
        n_out = len(self.arch.depths)
        flat = cupy.empty((int(ia.size), n_out, 2), dtype=cupy.float64)
        xa, qa = cupy.ascontiguousarray(a.images), cupy.ascontiguousarray(a.diag[0])
        xb, qb = cupy.ascontiguousarray(b.images), cupy.ascontiguousarray(b.diag[0])
        _, c, h, w = xa.shape
        p = self.params
        _extension().pair_sums(
            cupy.cuda.Device().id, xa.data.ptr, qa.data.ptr, xb.data.ptr, qb.data.ptr,
            ia.data.ptr, ib.data.ptr, int(ia.size), c, h, w, self.arch.n_layers,
            self.arch.filter_size, p.w_first, p.w, p.b2, slot_d.data.ptr, n_out,
            self.arch.pooling == "gap", bool(self.arch.fix), bool(same_set),
            self.dtype == np.float64, flat.data.ptr, cupy.cuda.get_current_stream().ptr)
        return flat
