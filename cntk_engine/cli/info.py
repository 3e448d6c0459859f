"""``cntk-engine info``: versions, where the package is, whether its CUDA extension was built, CPU,
GPUs, the numba kernel cache, and which backends can run."""
from __future__ import annotations

import os
import platform


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
    sub.add_parser("info", help="backends, GPUs and versions").set_defaults(func=run)


def run(args) -> int:
    from ..arrays import gpu_count
    from ..backends import available_backends, resolve
    from ..backends.numba_cpu import cache_status
    from ..build_info import cuda_extension_line
    from ..version import __version__
    print(f"cntk_engine {__version__} (Python {platform.python_version()}, {platform.platform()})")
    print(f"  imported from {os.path.dirname(os.path.dirname(os.path.abspath(__file__)))}")
    print(cuda_extension_line())
    for mod in ("numpy", "numba", "tqdm", "zarr", "dask", "distributed", "cupy"):
        print(f"  {mod:12s} {_version(mod)}")
    print(f"CPU: {platform.processor() or platform.machine()}, {os.cpu_count()} logical cores"
          + _numba_threads())
    n = gpu_count()
    print(f"GPUs visible to CuPy: {n}")
    if n:
        import cupy
        for i in range(n):
            props = cupy.cuda.runtime.getDeviceProperties(i)
            name = props["name"].decode() if isinstance(props["name"], bytes) else props["name"]
            print(f"  {i}: {name}, {props['totalGlobalMem'] / 2**30:.1f} GiB, "
                  f"compute capability {props['major']}.{props['minor']}")
    print(f"numba kernel cache: {cache_status()}")
    print("backends:")
    for name, why in available_backends().items():
        print(f"  {name:10s} {'available' if why is None else 'unavailable: ' + why}")
    print(f"backend='auto' picks: {resolve('auto').name}")
    return 0


def _numba_threads() -> str:
    try:
        import numba
        return f"; numba threads: {numba.get_num_threads()}"
    except Exception:  # noqa: BLE001
        return ""
