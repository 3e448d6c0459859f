"""The paper's own code (github.com/ruosongwang/CNTK, ``CNTK.py``), loaded from a local copy,
timed per pair on the GPU and compared value by value with this package's kernels: the
harness's method ``paper_code``.

    python -m bench --methods cuda,paper_code --paper-code /path/to/CNTK.py \\
        --depths 3,6,11,21 --sizes 32 --pooling gap,flatten --fix no,yes --n 16

No code of that repository is in this one: ``--paper-code`` names a copy fetched by whoever runs
the benchmark (tools/gpu/README.md says how it travels to a GPU machine).

What ``CNTK.py`` is (commit f340a69, the repository's latest): a Python 2.7 script that, when
run, parses ``--depth``, ``--gap`` and ``--fix`` into the globals ``d``, ``gap`` and ``fix``,
loads CIFAR-10 through its ``utils.py``, computes the whole N x N Gram in a double Python loop
(every ordered pair) and prints the test accuracy with a Python 2 ``print`` statement.  Its
computation is two CuPy RawKernels hard-wired to float32 (32, 32, 32, 32) tensors, ``conv3``
(the 3x3 convolution of a pixel-pair covariance tensor, one block per offset, in place) and
``trans`` (the ReLU step of Sigma and Theta at every entry, with c_sigma / (2 pi) and the 1/9
of the patch folded into one 1 / (9 pi)), and two functions: ``xx(x)`` for one image x given as
a (3, 1024) float32 array (channels, row-major pixels): the per-layer diagonals sqrt(Sigma(x,
x)) and their reciprocals; ``xz(x, z, Lx, Lz, iLx, iLz)``: the NTK of one pair, the mean of
Theta (``gap``) or its trace over pixel positions (CNTK-V), with ``fix`` starting Theta at 0
and subtracting the last Sigma (first and last layers not trained).  Zero-variance windows
divide by zero there (NaN), so the value check uses random images.

Loading.  The file cannot be imported (its Python 2 print is a syntax error in Python 3, and at
import it would parse this process's command line and read CIFAR-10), so :func:`load` parses
the longest prefix of it that is valid Python, keeps from it only the imports of cupy and
numpy, the assignments of the two kernels and their launch shapes (``conv3``, ``conv_blocks``,
``conv_threads``, ``trans``, ``trans_blocks``, ``trans_threads``) and the functions ``xx`` and
``xz``, and executes those statements as written in a fresh namespace; ``d``, ``gap`` and
``fix`` are set there before each run, as the script's argument parsing would.  A file that
lacks any of them is refused with what is missing.

Timing.  ``PaperCode.gram`` runs the paper's code on a symmetric Gram: ``xx`` for every image,
then ``xz`` once per unordered pair (j >= i, mirrored), as the other per-pair methods of the
harness do; the pair results stay on the device until one transfer at the end (the script
itself converts each value to the host inside its loop, which can only be slower).  The split
(diagonals, pairs) of the last call is in ``last_timing``.

``numpy_cupy()`` stands in for CuPy without a GPU: NumPy with the two RawKernels emulated from
their CUDA source (per name).  The harness uses it with ``--paper-emulate`` to run the loaded
functions on the CPU, for the value check only (a test of the loader and of the comparison
before a GPU run; its timings are not the paper's code and are not reported as such).
"""
from __future__ import annotations

import ast
import builtins
import time
import types
from pathlib import Path

import numpy as np

REPOSITORY = "github.com/ruosongwang/CNTK"
# the top-level names of CNTK.py that are kept (everything else in the file is left out)
KERNELS = ("conv3", "conv_blocks", "conv_threads", "trans", "trans_blocks", "trans_threads")
FUNCTIONS = ("xx", "xz")
MODULES = ("cupy", "numpy")
SIZE = 32          # the RawKernels' fixed image size
TOLERANCE = 1e-4   # float32 against a float64 kernel: the bound every float32 path of this package meets


class PaperCodeError(ValueError):
    """The file is not the paper's CNTK.py as this module reads it."""


def _longest_valid_prefix(source: str, path) -> ast.Module:
    """The AST of the longest prefix of ``source`` (whole lines) that parses as Python."""
    lines = source.splitlines(keepends=True)
    end = len(lines)
    first_error = None
    while end > 0:
        try:
            return ast.parse("".join(lines[:end]), filename=str(path))
        except SyntaxError as e:
            first_error = first_error or e
            end = min(end - 1, (e.lineno or end) - 1)
    raise PaperCodeError(f"no line of {path} parses as Python ({first_error})")


def _kept_statements(tree: ast.Module, path) -> list[ast.stmt]:
    kept, found = [], set()
    for node in tree.body:
        if isinstance(node, ast.Import) and all(a.name in MODULES for a in node.names):
            kept.append(node)
        elif isinstance(node, ast.Assign) and node.targets and all(
                isinstance(t, ast.Name) and t.id in KERNELS for t in node.targets):
            kept.append(node)
            found.update(t.id for t in node.targets)
        elif isinstance(node, ast.FunctionDef) and node.name in FUNCTIONS:
            kept.append(node)
            found.add(node.name)
    missing = [n for n in KERNELS + FUNCTIONS if n not in found]
    if missing:
        raise PaperCodeError(f"{path} does not define {', '.join(missing)} at its top level (as "
                             f"CNTK.py of {REPOSITORY} does)")
    return kept


def _importer(cupy_module):
    """An ``__import__`` that hands ``cupy_module`` to ``import cupy`` (None: the real CuPy)."""
    real = builtins.__import__

    def imp(name, globals=None, locals=None, fromlist=(), level=0):
        if name == "cupy" and cupy_module is not None:
            return cupy_module
        return real(name, globals, locals, fromlist, level)
    return imp


class PaperCode:
    """The kernels and functions of a local CNTK.py, executed in their own namespace.

    ``cupy_module``: what the file's ``import cupy as cp`` gets (None: CuPy itself;
    :func:`numpy_cupy` for the CPU emulation)."""

    def __init__(self, path, cupy_module=None):
        self.path = Path(path)
        try:
            source = self.path.read_text()
        except (OSError, UnicodeDecodeError) as e:
            raise PaperCodeError(f"cannot read {path}: {e}") from None
        tree = _longest_valid_prefix(source, self.path)
        module = ast.Module(body=_kept_statements(tree, self.path), type_ignores=[])
        self.ns = {"__name__": "paper_CNTK", "__file__": str(self.path),
                   "__builtins__": {**vars(builtins), "__import__": _importer(cupy_module)}}
        exec(compile(module, str(self.path), "exec"), self.ns)
        self.cp = self.ns.get("cp")
        if self.cp is None:
            raise PaperCodeError(f"{path} does not import cupy as cp (as CNTK.py of {REPOSITORY} does)")
        self.emulated = bool(getattr(self.cp, "EMULATED", False))
        self.last_timing: dict = {}

    def _sync(self):
        cuda = getattr(self.cp, "cuda", None)
        if cuda is not None:
            cuda.Device().synchronize()

    def gram(self, x, depth: int, pooling: str = "gap", fix: bool = False) -> np.ndarray:
        """The (N, N) NTK of images x (N, C, 32, 32) by the paper's code (float64 copy of its
        float32 values): ``xx`` per image, ``xz`` per unordered pair."""
        x = np.asarray(x)
        if x.ndim != 4 or x.shape[2:] != (SIZE, SIZE):
            raise ValueError(f"the paper's RawKernels take (N, C, {SIZE}, {SIZE}) images; got shape {x.shape}")
        if pooling not in ("gap", "flatten"):
            raise ValueError(f"the paper's code reads out by gap or flatten; got {pooling!r}")
        if depth < 2:
            raise ValueError(f"depth is conv layers + 1 (>= 2); got {depth}")
        cp, ns = self.cp, self.ns
        ns["d"], ns["gap"], ns["fix"] = int(depth), pooling == "gap", bool(fix)
        n = len(x)
        X = cp.asarray(np.ascontiguousarray(x, dtype=np.float32)).reshape(n, x.shape[1], SIZE * SIZE)
        self._sync()
        t0 = time.perf_counter()
        diag = [ns["xx"](X[i]) for i in range(n)]
        self._sync()
        t1 = time.perf_counter()
        idx = [(i, j) for i in range(n) for j in range(i, n)]
        vals = [ns["xz"](X[i], X[j], diag[i][0], diag[j][0], diag[i][1], diag[j][1]) for i, j in idx]
        v = cp.stack(vals)
        v = v.get() if hasattr(v, "get") else np.asarray(v)
        t2 = time.perf_counter()
        out = np.empty((n, n))
        for (i, j), val in zip(idx, v):
            out[i, j] = out[j, i] = float(val)
        self.last_timing = {"diag_seconds": t1 - t0, "pair_seconds": t2 - t1, "images": n,
                            "pairs": len(idx), "seconds_per_pair": (t2 - t1) / len(idx)}
        return out


def unavailable_reason(path, emulate: bool = False) -> str | None:
    """None if the paper's code at ``path`` can run here, else why not (a sentence)."""
    if not path:
        return (f"no --paper-code PATH given (a local copy of CNTK.py from {REPOSITORY}; it is not "
                "part of this repository)")
    p = Path(path)
    if not p.is_file():
        return f"--paper-code {path}: {'a directory, not a file' if p.is_dir() else 'no such file'}"
    if not emulate:
        try:
            import cupy
        except Exception as e:  # noqa: BLE001 - ImportError, or CuPy failing to find CUDA
            return f"the paper's code needs CuPy, which cannot be imported here: {type(e).__name__}: {e}"
        try:
            if cupy.cuda.runtime.getDeviceCount() < 1:
                return "the paper's code needs a CUDA GPU; none is visible"
        except Exception as e:  # noqa: BLE001 - CUDARuntimeError with the driver's text
            return f"the paper's code needs a CUDA GPU: {type(e).__name__}: {e}"
    try:
        PaperCode(p, numpy_cupy() if emulate else None)
    except Exception as e:  # noqa: BLE001 - PaperCodeError, or the file's own statements failing
        return f"loading {path} failed: {type(e).__name__}: {e}"
    return None


def compare_values(paper, ours, tol: float = TOLERANCE) -> dict:
    """The paper's symmetric (N, N) values against ours, entry by entry.

    Differences are |paper - ours| relative to max |ours|, over the entries where the paper's
    are finite (non-finite ones are counted, and fail).  Distinct pairs (i != j) and self pairs
    (the diagonal) are reported apart: the paper's float32 code computes an image with itself
    as an ordinary pair, where the normalised covariance is 1 at every position and
    sqrt(1 - c^2) loses sqrt(eps) of accuracy (~1e-4 of a flatten readout, which reads only
    such entries), while this package gives self pairs their exact value (README, self
    pairs).  ``agree_distinct_pairs``: every distinct pair finite and within ``tol``;
    ``agree_all_entries``: the diagonal too."""
    paper = np.asarray(paper, dtype=np.float64)
    ours = np.asarray(ours, dtype=np.float64)
    if paper.shape != ours.shape or paper.ndim != 2 or paper.shape[0] != paper.shape[1]:
        raise ValueError(f"expected two square matrices of one shape; got the paper's {paper.shape}, "
                         f"ours {ours.shape}")
    n = paper.shape[0]
    finite = np.isfinite(paper)
    scale = float(np.abs(ours).max()) if ours.size else 0.0
    diff = np.where(finite, np.abs(paper - ours), 0.0)
    rel = diff / scale if scale > 0 else diff
    self_mask = np.eye(n, dtype=bool)

    def worst(mask):
        return float(rel[mask].max()) if mask.any() else 0.0

    out = {"max_rel_diff": worst(np.ones_like(self_mask)), "max_rel_diff_distinct_pairs": worst(~self_mask),
           "max_rel_diff_self_pairs": worst(self_mask), "max_abs_diff": float(diff.max()) if n else 0.0,
           "scale": scale, "entries": int(paper.size), "non_finite_entries": int((~finite).sum()),
           "non_finite_distinct_pairs": int((~finite & ~self_mask).sum()), "tolerance": tol}
    if n:
        out["worst_entry"] = [int(i) for i in np.unravel_index(int(np.argmax(diff)), diff.shape)]
    out["agree_distinct_pairs"] = out["non_finite_distinct_pairs"] == 0 and out["max_rel_diff_distinct_pairs"] <= tol
    out["agree_all_entries"] = out["non_finite_entries"] == 0 and out["max_rel_diff"] <= tol
    return out


# ------------------------------------------------------------------ CuPy stand-in on the CPU
def _conv3(s, t):
    """The RawKernel conv3 (in place when s is t): t[x1, y1, x2, y2] = sum over a, b in -1..1 of
    s[x1 + a, y1 + b, x2 + a, y2 + b], zero outside the image."""
    h1, w1, h2, w2 = s.shape
    pad = np.zeros((h1 + 2, w1 + 2, h2 + 2, w2 + 2), dtype=s.dtype)
    pad[1:-1, 1:-1, 1:-1, 1:-1] = s
    acc = np.zeros_like(s)
    for a in range(3):
        for b in range(3):
            acc += pad[a:a + h1, b:b + w1, a:a + h2, b:b + w2]
    t[...] = acc


def _trans(s, t, l, r, il, ir):
    """The RawKernel trans: the ReLU step of Sigma (s) and Theta (t) per entry, in float32 as
    the kernel computes it (acos of the clipped normalised entry; 28.27... = 9 pi)."""
    f = np.float32
    S = s * il[:, :, None, None] * ir[None, None, :, :]
    c = np.clip(S, f(-1), f(1))
    th = f(3.141592654) - np.arccos(c)
    bs = (S * th + np.sqrt(f(1) - np.minimum(S * S, f(1)))) * l[:, :, None, None] * r[None, None, :, :]
    bs = (bs / f(28.274333882308138)).astype(np.float32)
    t[...] = t * (th / f(28.274333882308138)) + bs
    s[...] = bs


class _EmulatedKernel:
    IMPLEMENTATIONS = {"conv3": (_conv3, 2), "trans": (_trans, 6)}

    def __init__(self, code, name, *args, **kw):
        if name not in self.IMPLEMENTATIONS:
            raise NotImplementedError(f"no CPU emulation of a RawKernel named {name!r} "
                                      f"(emulated: {', '.join(self.IMPLEMENTATIONS)})")
        self.name = name
        self.fn, self.nargs = self.IMPLEMENTATIONS[name]

    def __call__(self, grid, block, args, **kw):
        if len(args) != self.nargs:
            raise TypeError(f"RawKernel {self.name} takes {self.nargs} arrays; got {len(args)}")
        for a in args:
            if not (isinstance(a, np.ndarray) and a.dtype == np.float32 and a.flags.c_contiguous):
                raise TypeError(f"RawKernel {self.name}: arguments must be C-contiguous float32 "
                                f"arrays (the kernel reads raw pointers); got {type(a).__name__} "
                                f"{getattr(a, 'dtype', '')}")
        self.fn(*args)


def numpy_cupy() -> types.ModuleType:
    """A module that stands in for ``cupy`` on the CPU: NumPy, with ``RawKernel`` emulating the
    paper's two kernels by name."""
    mod = types.ModuleType("cupy_numpy_emulation", "NumPy standing in for CuPy; RawKernels conv3 "
                           "and trans of CNTK.py emulated (bench/paper_code.py)")
    mod.RawKernel = _EmulatedKernel
    mod.EMULATED = True
    mod.__getattr__ = lambda name: getattr(np, name)
    return mod


def ours(x, depth: int, pooling: str, fix: bool, backend: str = "auto") -> np.ndarray:
    """This package's float64 NTK of the same images in the paper's (arora) convention."""
    import cntk_engine as ce
    return ce.gram(np.asarray(x, dtype=np.float64), depth=depth, pooling=pooling, fix=fix,
                   kernel="ntk", convention="arora", dtype="float64", backend=backend)


__all__ = ["PaperCode", "PaperCodeError", "compare_values", "numpy_cupy", "ours", "unavailable_reason"]
