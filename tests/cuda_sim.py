"""The CUDA backend with its kernels run from their CUDA source in the host emulation of
csrc/host_simt.h (csrc/kernel_sim.cpp), for tests without a GPU.

:func:`build` compiles the driver with the host C++ compiler; :func:`emulate_cuda` (a
monkeypatch) makes ``backend="cuda"`` prepare its arrays with NumPy and run each launch through
the driver: the scheduler, the backend's array layout and launch fields, and the kernel's
algorithm as written in CUDA (shuffles, barriers, the readout order) are what runs; the binding,
CuPy and the GPU are not.  Results agree with a GPU's to float rounding (host_simt.h).
"""
from __future__ import annotations

import shutil
import subprocess
import tempfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
INT32_FIELDS = ("pair_a", "pair_b", "slot", "grids")


def build(directory: Path) -> Path | None:
    """The driver built into ``directory``, or None without a host C++ compiler."""
    cxx = shutil.which("g++") or shutil.which("c++")
    if cxx is None:
        return None
    exe = Path(directory) / "kernel_sim"
    r = subprocess.run([cxx, "-std=c++17", "-O2", "-DCNTK_HOST_SIM", "-ffp-contract=off", "-Wall",
                        "-Wno-unknown-pragmas", "-I", str(ROOT / "csrc"),
                        str(ROOT / "csrc" / "kernel_sim.cpp"), "-o", str(exe)],
                       capture_output=True, text=True)
    if r.returncode != 0:
        raise RuntimeError(f"building csrc/kernel_sim.cpp failed:\n{r.stderr[-4000:]}")
    # -Wall sees the device code as plain C++: a read before a write is found here, not by nvcc
    if "warning" in r.stderr:
        raise RuntimeError(f"building csrc/kernel_sim.cpp gave warnings:\n{r.stderr[-4000:]}")
    return exe


#: The emulation's thread orders (csrc/host_simt.h, simt::Schedule): "forward" (each ready
#: thread in index order to its next shuffle or barrier), "warps_reversed" and "warps_in_order"
#: (in every phase between barriers, each warp as far as it goes, the last or the first warp
#: first), under one of which a missing __syncthreads changes the result.
SCHEDULES = ("forward", "warps_reversed", "warps_in_order")


def run_launch(exe: Path, fields: dict, schedule: str = "forward") -> None:
    """Run one launch described by the backend's ``launch_fields`` (NumPy arrays) with the
    emulation's thread order ``schedule`` (:data:`SCHEDULES`); fills ``fields["out"]``."""
    with tempfile.TemporaryDirectory(prefix="kernel_sim-") as d:
        lines = [f"schedule {schedule}"]
        for name, v in fields.items():
            if isinstance(v, np.ndarray):
                path = Path(d) / f"{name}.bin"
                if name != "out":
                    np.ascontiguousarray(v).tofile(path)
                lines.append(f"array {name} {path}")
            elif name == "stages":
                lines.append("stages " + ";".join(",".join(map(str, st)) for st in v))
            else:
                lines.append(f"{name} {int(v) if isinstance(v, bool) else v}")
        params = Path(d) / "params.txt"
        params.write_text("\n".join(lines) + "\n")
        r = subprocess.run([str(exe), str(params)], capture_output=True, text=True)
        if r.returncode != 0:
            raise RuntimeError(f"kernel_sim failed ({r.returncode}): {r.stderr[-2000:]}")
        out = np.fromfile(Path(d) / "out.bin", dtype=np.float64)
        fields["out"][...] = out.reshape(fields["out"].shape)


def emulate_cuda(monkeypatch, exe: Path, schedule: str = "forward") -> None:
    """Make ``backend="cuda"`` run here, through the emulated kernels, their threads in the
    order ``schedule`` (:data:`SCHEDULES`)."""
    if schedule not in SCHEDULES:
        raise ValueError(f"schedule must be one of {SCHEDULES}; got {schedule!r}")
    from cntk_engine.backends.base import Traits
    from cntk_engine.backends.cuda import CudaBackend

    def prepare(self, x):
        return self.prepare_arrays(x, np)

    def pairs(self, a, b, ia, ib, same_set):
        xa, da, xb, db, ia, ib, slot, out, grids, grid_w = self.launch_arrays(a, b, ia, ib, np)
        if ia.size == 0:
            return out
        fields = self.launch_fields(xa, da, xb, db, ia, ib, slot, out, same_set, grids, grid_w)
        run_launch(exe, fields, schedule)
        return out

    def traits(cls):      # host arrays, the tiles of a CPU backend
        return Traits(device="cpu", default_tile=64, min_tile=8)

    monkeypatch.setattr(CudaBackend, "traits", classmethod(traits))
    monkeypatch.setattr(CudaBackend, "unavailable_reason", classmethod(lambda cls: None))
    monkeypatch.setattr(CudaBackend, "prepare", prepare)
    monkeypatch.setattr(CudaBackend, "pairs", pairs)
