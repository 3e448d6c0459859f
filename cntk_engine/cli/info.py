"""``cntk-engine info``: versions, where the package is, whether its CUDA extension was built, CPU,
GPUs, the numba kernel cache, which backends and kernel variants can run, the architectures."""
from __future__ import annotations

import os
import platform

from ..arch import PRESETS, ConvRelu, make_architecture, myrtle

def _version(mod: str) -> str:
    try:
        from importlib.metadata import version
        return version(mod)
    except Exception:  # noqa: BLE001
        try:
            m = __import__(mod)
            return getattr(m, "__version__", "installed")
        except Exception:  # noqa: BLE001
            return "not installed"


def add_parser(sub) -> None:
    sub.add_parser("info", help="backends, GPUs and versions",
                   description="Say which backends can run here and why not, the GPUs, the CUDA "
                   "extension's build, numba's kernel cache, and the versions of the package and "
                   "its dependencies.").set_defaults(func=run)


def run(args) -> int:
    from ..arrays import gpu_count, gpu_properties
    from ..backends import available_backends, resolve
    from ..backends.numba_cpu import cache_status
    from ..build_info import cuda_extension_line
    from ..version import __version__
    from .common import machine
    print(f"cntk_engine {__version__} (Python {platform.python_version()}, {platform.platform()})")
    print(f"  imported from {os.path.dirname(os.path.dirname(os.path.abspath(__file__)))}")
    print(cuda_extension_line())
    for mod in ("numpy", "numba", "tqdm", "zarr", "dask", "distributed", "cupy"):
        print(f"  {mod:12s} {_version(mod)}")
    # the model name (/proc/cpuinfo): platform.processor() is empty on most Linux machines
    m = machine()
    isa = f", {m['vector_isa']}" if "vector_isa" in m else ""
    target = f"; numba compiles for {m['numba_cpu']}" if "numba_cpu" in m else ""
    print(f"CPU: {m['cpu']} ({platform.machine()}{isa}), {os.cpu_count()} logical cores"
          + _numba_threads() + target)
    n = gpu_count()
    print(f"GPUs visible to CuPy: {n}")
    if n:
        for i in range(n):
            props = gpu_properties(i)
            print(f"  {i}: {props['name']}, {props['totalGlobalMem'] / 2**30:.1f} GiB, "
                  f"compute capability {props['major']}.{props['minor']}")
    print(f"numba kernel cache: {cache_status()}")
    print("backends:")
    for name, why in available_backends().items():
        print(f"  {name:10s} {'available' if why is None else 'unavailable: ' + why}")
    print(f"backend='auto' picks: {resolve('auto').name}")
    from ..backends.cuda import describe_kernel_variants
    print(describe_kernel_variants())
    print("architectures (gram(..., architecture=...), --architecture):")
    print("  cnn        the CNN of Arora et al. 2019: depth - 1 conv + ReLU layers, gap, flatten "
          "or lap readout (every backend)")
    for name, depth in sorted(PRESETS.items(), key=lambda kv: kv[1]):
        layers = " ".join("conv" if isinstance(la, ConvRelu) else f"pool{la.window}"
                          for la in myrtle(depth))
        print(f"  {name:10s} Myrtle-{depth} (Shankar et al. 2020), 32 x 32 images: {layers} | "
              f"{_stack_backends(name)}")
    print("  stacks     any ConvRelu / AvgPool stack: cntk_engine.serial(...)")
    return 0


def _stack_backends(name: str) -> str:
    """Which backends can run a preset here (on 32 x 32 x 3 float32 images)."""
    from ..backends import capabilities
    caps = capabilities(make_architecture(architecture=name), (3, 32, 32), "float32")
    ok = [b + (" (by name only: its code for this is unverified)" if c.get("unverified") else "")
          for b, c in caps.items() if c["unavailable"] is None and c["unsupported"] is None]
    return "backends: " + ", ".join(ok)


def _numba_threads() -> str:
    try:
        import numba
        from ..backends.numba_cpu import threading_layer
        layer = threading_layer()
        # GNU OpenMP kills a child forked after a kernel call (a multiprocessing Pool hangs)
        fork = (" (under GNU OpenMP a process forked after a kernel call is killed and a "
                "multiprocessing Pool hangs: use tbb, or the 'spawn' start method)"
                if layer.startswith("omp") else "")
        return f"; numba threads: {numba.get_num_threads()}, threading layer: {layer}{fork}"
    except Exception:  # noqa: BLE001
        return ""
