"""Command line: ``cntk-engine gram | info | demo [| evaluate]`` (also ``python -m cntk_engine``).

``cntk-engine gram DATA --depth 11 --pooling gap --out gram.zarr`` computes the Gram matrix of the
images in DATA into a Zarr store (layout: ``cntk_engine.store``; ``docs/scheduler.md``).

DATA is
  * a ``.npy`` file holding an (N, C, H, W) array ((N, H, W, C) with ``--data-format NHWC``;
    a 3-D (N, H, W) array is taken as single-channel images), any integer or float dtype;
  * or a ``.npz`` archive: the array under the first of the keys ``x``, ``x_train``,
    ``images``, ``X`` that it holds (for ``--x2``: ``x``, ``x_test``, ``images``, ``X``), or any
    key named explicitly as ``PATH.npz:KEY``.

Store semantics: a new ``--out`` path is created; an existing one is an error unless
``--resume`` is given, in which case the job stored there is continued (only missing tiles are
computed) provided it is this very job (same images, architecture, dtype, backend, kernels);
otherwise the run is refused with the differences, and nothing is written.  ``--resume`` on a
path that does not exist yet simply starts the job (so a job script can always pass it).

Errors (bad paths, unreadable or wrongly shaped data, a store of another job, an unreachable
scheduler) are reported as one line on stderr with exit status 2; Ctrl-C exits with 130 and the
store keeps every finished tile.
"""
from __future__ import annotations

import argparse
import logging
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np

PROG = "cntk-engine"
X1_KEYS = ("x", "x_train", "images", "X")
X2_KEYS = ("x", "x_test", "images", "X")


class CliError(Exception):
    """An error reported as one line (no traceback)."""


# ------------------------------------------------------------------------------ data
def load_images(spec: str, keys=X1_KEYS, data_format: str = "NCHW", what: str = "DATA") -> np.ndarray:
    """Images from ``spec`` (``.npy``, ``.npz`` or ``.npz:KEY``); 3-D arrays get a channel axis."""
    path, key = spec, None
    if ":" in spec and not os.path.exists(spec):
        head, tail = spec.rsplit(":", 1)
        if head.endswith(".npz"):
            path, key = head, tail
    p = Path(path)
    if not p.exists():
        raise CliError(f"{what} {path!r} does not exist")
    if not p.is_file():
        raise CliError(f"{what} {path!r} is not a file")
    try:
        if p.suffix == ".npz" or key is not None:
            with np.load(p, allow_pickle=False) as z:
                names = list(z.keys())
                if key is None:
                    key = next((k for k in keys if k in names), None)
                    if key is None:
                        raise CliError(f"{what} {path!r} holds arrays {names} but none of the keys "
                                       f"{list(keys)}; name one as {path}:KEY")
                elif key not in names:
                    raise CliError(f"{what} {path!r} has no array {key!r} (it holds {names})")
                x = z[key]
        else:
            x = np.load(p, allow_pickle=False)
    except CliError:
        raise
    except Exception as e:  # noqa: BLE001 - any reading failure is the user's file
        raise CliError(f"{what} {path!r} cannot be read as a NumPy .npy/.npz file: {e}") from None
    if not isinstance(x, np.ndarray):
        raise CliError(f"{what} {path!r} does not hold one array")
    if x.ndim == 3:
        x = x[:, None] if data_format == "NCHW" else x[..., None]
    if x.ndim != 4:
        raise CliError(f"{what} {path!r}: expected images (N, C, H, W) (or (N, H, W, C) with "
                       f"--data-format NHWC, or (N, H, W)); got an array of shape {x.shape}")
    return x


def _ints(text: str, what: str) -> list[int]:
    try:
        vals = [int(v) for v in text.split(",") if v.strip() != ""]
    except ValueError:
        raise CliError(f"{what} must be comma-separated integers; got {text!r}") from None
    if not vals:
        raise CliError(f"{what} must name at least one integer; got {text!r}")
    return vals


# ------------------------------------------------------------------------------ gram
def add_gram_parser(sub) -> None:
    p = sub.add_parser("gram", help="compute a CNTK / NNGP Gram matrix into a Zarr store",
                       description="Compute the kernel matrix of the images in DATA (against "
                       "themselves, or against --x2) into the Zarr store --out, tile by tile; "
                       "resumable with --resume.")
    p.add_argument("data", metavar="DATA", help=".npy (N,C,H,W) or .npz (keys x, x_train, images, X; "
                   "or PATH.npz:KEY)")
    p.add_argument("--x2", metavar="DATA2", help="second image set: the N1 x N2 matrix against DATA "
                   "(.npz keys x, x_test, images, X)")
    d = p.add_mutually_exclusive_group(required=True)
    d.add_argument("--depth", type=int, help="depth (conv layers + 1)")
    d.add_argument("--depths", help="several depths from one pass, e.g. 3,4,6")
    p.add_argument("--pooling", choices=("gap", "flatten"), default="gap")
    p.add_argument("--fix", action="store_true", help="first and last layers not trained")
    p.add_argument("--kernel", choices=("ntk", "nngp", "both"), default="ntk")
    p.add_argument("--convention", choices=("arora", "neural_tangents"), default="arora")
    p.add_argument("--W-std", type=float, default=None, dest="W_std", help="neural_tangents convention only")
    p.add_argument("--b-std", type=float, default=None, dest="b_std", help="neural_tangents convention only")
    p.add_argument("--filter-size", type=int, default=3)
    p.add_argument("--out", required=True, help="Zarr store to write (a directory, e.g. gram.zarr)")
    p.add_argument("--resume", action="store_true",
                   help="continue the job stored at --out (refused if it holds another job)")
    p.add_argument("--devices", help="GPUs: 'all' (default) or ids, e.g. 0,1 (cuda backend)")
    p.add_argument("--scheduler", metavar="ADDRESS",
                   help="Dask scheduler address (tcp://host:8786): run tiles on that cluster")
    p.add_argument("--tile", type=int, help="rows/columns per tile (default: automatic)")
    p.add_argument("--dtype", choices=("float32", "float64"), default="float32")
    p.add_argument("--backend", choices=("auto", "cuda", "numba", "reference"), default="auto")
    p.add_argument("--data-format", choices=("NCHW", "NHWC"), default="NCHW")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=run_gram)


def run_gram(args) -> int:
    from .api import gram
    x1 = load_images(args.data, X1_KEYS, args.data_format, "DATA")
    x2 = None if args.x2 is None else load_images(args.x2, X2_KEYS, args.data_format, "--x2")
    depth = args.depth
    depths = None if args.depths is None else _ints(args.depths, "--depths")
    devices = None
    if args.devices is not None:
        devices = "all" if args.devices == "all" else _ints(args.devices, "--devices")
    if args.tile is not None and args.tile < 1:
        raise CliError(f"--tile must be a positive integer; got {args.tile}")
    out = Path(args.out)
    if (out.exists() or out.is_symlink()) and not args.resume:
        raise CliError(f"--out {args.out!r} exists; pass --resume to continue the job stored there "
                       "(refused if it holds another job), or choose another path")
    client = None
    if args.scheduler:
        try:
            from distributed import Client
        except ImportError as e:
            raise CliError(f"--scheduler needs Dask (pip install 'cntk-engine[dask]'): {e}") from None
        try:
            client = Client(args.scheduler, timeout="10s")
        except Exception as e:  # noqa: BLE001 - unreachable address, wrong protocol, timeout
            raise CliError(f"cannot connect to the Dask scheduler at {args.scheduler!r}: {e}") from None
    t0 = time.perf_counter()
    try:
        group, info = gram(x1, x2, depth=depth, depths=depths, pooling=args.pooling, fix=args.fix,
                           kernel=args.kernel, convention=args.convention, W_std=args.W_std,
                           b_std=args.b_std, filter_size=args.filter_size, backend=args.backend,
                           dtype=args.dtype, data_format=args.data_format, tile=args.tile,
                           return_info=True, devices=devices, out=str(out), client=client,
                           progress=not args.no_progress)
    finally:
        if client is not None:
            client.close()
    names = sorted(k for k, _ in group.arrays() if k != "tiles_done") + \
        sorted(f"{g}/{k}" for g, sub in group.groups() for k, _ in sub.arrays())
    rate = info["pairs_per_second"]
    print(f"{out}: {info['unique_pairs']} unique pairs; computed {info['tiles_computed']} of "
          f"{info['tiles_total']} tiles ({info['pairs_computed']} pairs) in "
          f"{time.perf_counter() - t0:.1f} s on {info['backend']} ({info['where']}, tile {info['tile']})"
          + (f", {rate:.4g} pairs/s" if rate else ""))
    print(f"arrays: {', '.join(names)}   read: zarr.open_group({str(out)!r})[{names[0]!r}][...]")
    return 0


# ------------------------------------------------------------------------------ info
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


def run_info(args) -> int:
    from . import __version__
    from .backends import available_backends
    from .scheduler import gpu_count
    print(f"cntk_engine {__version__} (Python {platform.python_version()}, {platform.platform()})")
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
    from .backends.numba_cpu import cache_status
    print(f"numba kernel cache: {cache_status()}")
    print("backends:")
    for name, why in available_backends().items():
        print(f"  {name:10s} {'available' if why is None else 'unavailable: ' + why}")
    # the CUDA kernel variants compiled into the extension (docs/cuda_kernels.md)
    from .backends.cuda import describe_kernel_variants
    print(describe_kernel_variants())
    from .backends import resolve
    print(f"backend='auto' picks: {resolve('auto').name}")
    return 0


def _numba_threads() -> str:
    try:
        import numba
        return f"; numba threads: {numba.get_num_threads()}"
    except Exception:  # noqa: BLE001
        return ""


# ------------------------------------------------------------------------------ demo
def demo_data():
    from importlib.resources import files
    with (files("cntk_engine") / "data" / "digits.npz").open("rb") as f:
        with np.load(f) as z:
            return z["x"], z["y"]


def run_demo(args) -> int:
    from .api import gram
    from .backends import resolve
    x, y = demo_data()
    be = resolve(args.backend).name
    n = args.n if args.n is not None else (200 if be == "cuda" else 60)
    depth = args.depth if args.depth is not None else (6 if be == "cuda" else 3)
    if not 3 <= n <= len(x):
        raise CliError(f"--n must be between 3 and {len(x)}; got {n}")
    if depth < 2:
        raise CliError(f"--depth must be an integer >= 2 (conv layers + 1); got {depth}")
    idx = np.concatenate([np.nonzero(y == c)[0][: -(-n // 10)] for c in range(10)])[:n]
    idx.sort()
    xs, ys = x[idx][:, None], y[idx]
    print(f"demo: {n} MNIST test digits (28 x 28, shipped with the package), CNTK-GAP depth {depth}, "
          f"NTK and NNGP, backend {args.backend!r}")
    t0 = time.perf_counter()
    (ntk, nngp), info = gram(xs.astype(np.float32) / 255.0, depth=depth, pooling="gap",
                             kernel="both", backend=args.backend, return_info=True,
                             progress=not args.no_progress)
    dt = time.perf_counter() - t0
    pairs = info["unique_pairs"]
    comp = info["compute_seconds"]
    print(f"computed the {n} x {n} NTK and NNGP Gram matrices ({pairs} unique pairs, "
          f"{info['tiles_total']} tiles of {info['tile']}) on backend {info['backend']} "
          f"({info['where']}, {info['dtype']}) in {dt:.2f} s: {pairs / comp:.4g} pairs/s "
          f"(tile computation {comp:.2f} s"
          + ("; it includes loading the numba kernel from numba's cache, or compiling it into "
             "the cache the first time on this machine)"
             if info["backend"] == "numba" else ")"))
    # a small check that the kernel means something: kernel regression, 2/3 train, 1/3 test
    tr = np.arange(n) % 3 != 2
    te = ~tr
    for name, k in (("ntk", ntk), ("nngp", nngp)):
        ktr = k[np.ix_(tr, tr)]
        onehot = np.eye(10)[ys[tr]] - 0.1
        alpha = np.linalg.solve(ktr + 1e-6 * np.trace(ktr) / len(ktr) * np.eye(len(ktr)), onehot)
        acc = float(np.mean((k[np.ix_(te, tr)] @ alpha).argmax(1) == ys[te]))
        print(f"  {name}: diag mean {np.diag(k).mean():.4g}, off-diag mean "
              f"{(k.sum() - np.trace(k)) / (n * n - n):.4g}; kernel regression on {tr.sum()} digits "
              f"classifies the other {te.sum()} with accuracy {acc:.0%}")
    return 0


# ------------------------------------------------------------------------------ main
def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog=PROG, description="Exact CNTK / NNGP kernels of image sets.")
    ap.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    ap.add_argument("-q", "--quiet", action="store_true", help="warnings only")
    ap.add_argument("--debug", action="store_true", help="show tracebacks of errors")
    sub = ap.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    add_gram_parser(sub)
    sub.add_parser("info", help="backends, GPUs and versions").set_defaults(func=run_info)
    dp = sub.add_parser("demo", help="a CNTK Gram of MNIST digits shipped with the package")
    dp.add_argument("--n", type=int, default=None, help="digits (default 200 on a GPU, 60 on the CPU)")
    dp.add_argument("--depth", type=int, default=None, help="depth (default 6 on a GPU, 3 on the CPU)")
    dp.add_argument("--backend", choices=("auto", "cuda", "numba", "reference"), default="auto")
    dp.add_argument("--no-progress", action="store_true")
    dp.set_defaults(func=run_demo)
    try:
        from . import evaluate as _evaluate
    except ImportError:
        _evaluate = None
    if _evaluate is not None and hasattr(_evaluate, "add_parser") and hasattr(_evaluate, "run"):
        _evaluate.add_parser(sub)
    return ap


def main(argv=None) -> int:
    ap = build_parser()
    args = ap.parse_args(argv)
    logging.basicConfig(format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    logging.getLogger("cntk_engine").setLevel(
        logging.DEBUG if args.verbose else logging.WARNING if args.quiet else logging.INFO)
    func = getattr(args, "func", None)
    if func is None:  # evaluate's parser may set its own default under another name
        from . import evaluate as _evaluate
        func = _evaluate.run
    args.argv = list(sys.argv[1:] if argv is None else argv)   # the command, for records
    try:
        return int(func(args) or 0)
    except KeyboardInterrupt:
        if args.command == "gram":      # the only command with a store to resume
            print(f"{PROG}: interrupted; finished tiles are kept in --out, rerun with --resume to "
                  "continue", file=sys.stderr)
        else:
            print(f"{PROG}: interrupted", file=sys.stderr)
        return 130
    except (CliError, ValueError, RuntimeError, OSError, ImportError) as e:
        if args.debug:
            raise
        print(f"{PROG}: error: {e}".replace("\n", " "), file=sys.stderr)
        return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
