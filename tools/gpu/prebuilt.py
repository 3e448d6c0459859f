"""The package with its CUDA extension, built here and carried to the GPU machine as a wheel
(``.prebuilt``), so a visit does not spend its device time compiling it (the build is the
install phase's `pip install .`, its longest step).

    python tools/gpu/prebuilt.py build .prebuilt [--python PY312]   # here (prepare_carry calls it)
    python tools/gpu/prebuilt.py check .prebuilt                    # does it match this tree?
    python tools/gpu/prebuilt.py install .prebuilt                  # there (gpu_session.sh's install)
    python tools/gpu/prebuilt.py mixes .prebuilt                    # here: its SASS counts (build does it)

Why a stamp, and what it holds.  The device tool carries the working tree, not a commit, so the
wheel is used only where it was built from exactly the build inputs the GPU machine holds
(BUILD_INPUTS: every file's SHA-256 is in ``stamp.json`` beside the wheel, and a mismatch names
the files).  It is built from a clean ``git archive`` of HEAD, with the CMake arguments of the
install phase (sm_90, ``-lineinfo``), by a Python of the GPU machine's minor version (3.12: a
``cp312`` wheel), and it is refused where the working tree's build inputs differ from HEAD's
(commit first).  The GPU machine's image is not this one, so a binary built here may not load
there (other system libraries): ``install`` imports the extension and, where a GPU is usable,
compares a tiny Gram with the float64 reference; any failure (exit status 1) sends the install
phase back to building from source, as before.

Beside the wheel, ``sass_mixes.json`` holds the instruction mixes of its kernels
(tools/sass_mix.py ``count_mixes``), bound to the extension by its SHA-256: the harness takes
them (``--sass-mixes``) instead of disassembling the binary in each of the bench phase's
processes on the GPU machine.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
BUILD_INPUTS = ("pyproject.toml", "CMakeLists.txt", "csrc", "cntk_engine")
NOT_INPUTS = ("__pycache__",)                     # written by imports, never built from
NOT_INPUT_SUFFIXES = (".pyc", ".so")              # bytecode; an extension built in place
DEVICE_PYTHON = (3, 12)                           # the GPU machine's python3 (device KINDS.md)
CMAKE_ARGS = "-DCMAKE_CUDA_ARCHITECTURES=90 -DCMAKE_CUDA_FLAGS=-lineinfo"   # = gpu_session.sh's build
STAMP = "stamp.json"
SASS_MIXES = "sass_mixes.json"
EXTENSION_PREFIX = "cntk_engine/_cuda."

# Run by the installed package after `install`: the extension loads.  A failure here means the
# wheel does not run on this machine (another image's system libraries): the source build
# follows.
SMOKE = """
import cntk_engine._cuda
from cntk_engine.backends.cuda import describe_kernel_variants
print(describe_kernel_variants().splitlines()[0])
"""

# Then, in a process of its own, where a GPU is usable: its float64 Gram of two tiny images
# matches the float64 reference.  A failure here is the kernels' own (a wrong value, a CUDA
# error), which a build here would compile again with the same compiler: it is said, the wheel
# is kept, and the tests phase names what fails.
SMOKE_GPU = """
import numpy as np, cntk_engine as ce
why = ce.available_backends()["cuda"]
if why is None:
    x = np.random.default_rng(0).standard_normal((2, 3, 8, 8))
    a = ce.gram(x, depth=3, backend="cuda", dtype="float64")
    b = ce.gram(x, depth=3, backend="reference")
    err = float(np.max(np.abs(a - b)) / np.max(np.abs(b)))
    assert err < 1e-10, f"cuda float64 differs from the reference by {err:.3g}"
    print(f"cuda matches the reference on a tiny Gram: {err:.2g}")
else:
    print(f"the cuda backend cannot run here ({why})")
"""

# Then, in a process of its own, the binding's own strings, a repr and a ValueError's message
# (on the H200's image of 2026-12-04 every string the binding built with iostreams crashed the
# process); no launch.  A failure here is said, not acted on: a build here would compile the
# same code, so the wheel is kept (the tests phase then names what fails).
SMOKE_STRINGS = """
import cntk_engine._cuda
kw = dict(device=0, stream=0, kernel="v3", dtype="float32", xa=0, da=0, xb=0, db=0, pair_a=0,
          pair_b=0, slot=0, out=0, n_pairs=0, C=3, H=8, W=8, L=3, filter_size=3, n_out=1,
          w_first=1.0, w=1.0, b2=0.0, gap=True, fix=False, same_set=True)
print(repr(cntk_engine._cuda.PairSumsParams(**kw))[:40], "...")
try:
    cntk_engine._cuda.PairSumsParams(**{**kw, "C": 0})
    raise SystemExit("the binding took C = 0 channels")
except ValueError as e:
    print("the binding refuses C = 0:", e)
"""


class PrebuiltError(Exception):
    """The prebuilt wheel cannot be built or used; the message names why and what to do."""


class SmokeFailed(Exception):
    """The wheel is installed and loads, but a later smoke check failed (kept: a build would
    compile the same code); ``install`` exits with :data:`SMOKE_FAILED` for it."""

    def __init__(self, wheel: Path, what: list[str]):
        super().__init__(f"installed {wheel.name}; failed here: {', '.join(what)}")
        self.wheel = wheel


#: ``install``'s exit status where the wheel is installed but a smoke check after the import
#: failed (gpu_session.sh keeps it and says so in the install phase's record).
SMOKE_FAILED = 3
#: Seconds each smoke check after the import may take (a hung launch must not use up the phase).
SMOKE_TIMEOUT = 120


def source_files(root: Path) -> dict[str, str]:
    """{path relative to ``root``: SHA-256} of every build input under ``root``."""
    files = {}
    for name in BUILD_INPUTS:
        top = root / name
        paths = [top] if top.is_file() else sorted(p for p in top.rglob("*") if p.is_file())
        for p in paths:
            rel = p.relative_to(root)
            if any(part in NOT_INPUTS for part in rel.parts) or p.suffix in NOT_INPUT_SUFFIXES:
                continue
            files[rel.as_posix()] = hashlib.sha256(p.read_bytes()).hexdigest()
    return files


def differing(a: dict[str, str], b: dict[str, str]) -> list[str]:
    return sorted(k for k in a.keys() | b.keys() if a.get(k) != b.get(k))


def python_tag(version) -> str:
    return f"cp{version[0]}{version[1]}"


def python_version(python: str) -> tuple[int, int] | None:
    out = subprocess.run([python, "-c", "import sys; print(*sys.version_info[:2])"],
                         capture_output=True, text=True)
    return tuple(map(int, out.stdout.split())) if out.returncode == 0 else None


def find_device_python() -> str | None:
    """A Python of DEVICE_PYTHON's minor version on this machine (PATH, then pyenv's versions)."""
    major, minor = DEVICE_PYTHON
    candidates = [shutil.which(f"python{major}.{minor}")]
    candidates += sorted(map(str, Path.home().glob(f".pyenv/versions/{major}.{minor}*/bin/python{major}.{minor}")))
    for c in candidates:
        if c and python_version(c) == DEVICE_PYTHON:
            return c
    return None


def build(dest: Path, repo: Path = REPO, python: str | None = None) -> dict:
    """Build the wheel of HEAD of ``repo`` into the (empty) folder ``dest`` and write its stamp."""
    python = python or find_device_python()
    want = ".".join(map(str, DEVICE_PYTHON))
    if python is None:
        raise PrebuiltError(f"no Python {want} found (PATH, ~/.pyenv/versions); the wheel must match the "
                            f"GPU machine's Python {want}: name one with --python")
    if python_version(python) != DEVICE_PYTHON:
        raise PrebuiltError(f"--python {python} is not a Python {want} (the GPU machine's)")
    if shutil.which("nvcc") is None:
        raise PrebuiltError("no nvcc on PATH: the wheel would have no CUDA extension")
    commit = subprocess.run(["git", "-C", str(repo), "rev-parse", "HEAD"], capture_output=True, text=True)
    if commit.returncode != 0:
        raise PrebuiltError(f"{repo} is not a git checkout ({commit.stderr.strip()})")
    with tempfile.TemporaryDirectory() as tmp:
        src, tar = Path(tmp) / "src", Path(tmp) / "src.tar"
        archive = subprocess.run(["git", "-C", str(repo), "archive", "-o", str(tar), "HEAD"],
                                 capture_output=True, text=True)
        if archive.returncode != 0:
            raise PrebuiltError(f"git archive HEAD failed: {archive.stderr.strip()}")
        with tarfile.open(tar) as t:
            t.extractall(src, filter="data")
        files = source_files(src)
        changed = differing(files, source_files(repo))
        if changed:
            raise PrebuiltError("the working tree's build inputs differ from HEAD's (the GPU machine gets "
                                f"the working tree, so it would not use the wheel): {', '.join(changed[:8])}"
                                f"{' ...' if len(changed) > 8 else ''}; commit them first")
        env = dict(os.environ, CMAKE_ARGS=CMAKE_ARGS,
                   CMAKE_BUILD_PARALLEL_LEVEL=str(os.cpu_count() or 2))
        out = subprocess.run([python, "-m", "pip", "wheel", "--no-deps", "-w", str(dest), str(src)],
                             capture_output=True, text=True, env=env)
        if out.returncode != 0:
            tail = "\n".join((out.stdout + out.stderr).strip().splitlines()[-15:])
            raise PrebuiltError(f"pip wheel failed:\n{tail}")
    (wheel,) = dest.glob("cntk_engine-*.whl")
    if not any(n.startswith(EXTENSION_PREFIX) for n in zipfile.ZipFile(wheel).namelist()):
        raise PrebuiltError(f"{wheel.name} holds no CUDA extension ({EXTENSION_PREFIX}*): the build "
                            "found no CUDA compiler")
    stamp = {"wheel": wheel.name, "commit": commit.stdout.strip(), "python": python_tag(DEVICE_PYTHON),
             "cmake_args": CMAKE_ARGS, "nvcc": nvcc_release(), "files": files}
    (dest / STAMP).write_text(json.dumps(stamp, indent=1) + "\n")
    try:
        count_mixes(dest)
    except PrebuiltError as e:          # the GPU side then counts them itself, as before
        print(f"prebuilt: no {SASS_MIXES} ({e})", file=sys.stderr)
    return stamp


def count_mixes(folder: Path) -> dict:
    """Write ``folder``/SASS_MIXES: the harness mixes of every kernel variant in the wheel's
    extension (read from the wheel, so bound to the very file pip installs there)."""
    sys.path.insert(0, str(REPO))
    try:
        from tools import sass_mix
    finally:
        sys.path.remove(str(REPO))
    try:
        wheel = folder / json.loads((folder / STAMP).read_text())["wheel"]
        members = [n for n in zipfile.ZipFile(wheel).namelist() if n.startswith(EXTENSION_PREFIX)]
    except (OSError, ValueError, KeyError, zipfile.BadZipFile) as e:
        raise PrebuiltError(f"{folder}: no wheel with a CUDA extension to count ({e!r})") from None
    if len(members) != 1:
        raise PrebuiltError(f"{wheel.name}: {len(members)} files {EXTENSION_PREFIX}*, expected one")
    with tempfile.TemporaryDirectory() as tmp:
        so = Path(zipfile.ZipFile(wheel).extract(members[0], tmp))
        try:
            record = sass_mix.count_mixes(so)
        except (OSError, RuntimeError, ValueError) as e:    # no cuobjdump here, no sm_90 code
            raise PrebuiltError(f"the SASS of {wheel.name} could not be counted here: {e}") from None
    part = folder / (SASS_MIXES + ".part")
    part.write_text(json.dumps(record, indent=1) + "\n")
    part.replace(folder / SASS_MIXES)
    return record


def nvcc_release() -> str:
    out = subprocess.run(["nvcc", "--version"], capture_output=True, text=True)
    return out.stdout.strip().splitlines()[-1] if out.returncode == 0 and out.stdout.strip() else "unknown"


def check(folder: Path, repo: Path = REPO, python=None) -> Path:
    """The wheel in ``folder`` if its stamp matches ``repo``'s build inputs and the Python
    ``python`` ((major, minor); this one by default)."""
    try:
        stamp = json.loads((folder / STAMP).read_text())
        wheel = folder / stamp["wheel"]
        files, tag = stamp["files"], stamp["python"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise PrebuiltError(f"{folder}: no readable {STAMP} naming a wheel ({e!r}); "
                            "make it with tools/gpu/prepare_carry.py") from None
    if not wheel.is_file():
        raise PrebuiltError(f"{folder}: {wheel.name} (named by {STAMP}) is missing")
    want = python_tag(python or sys.version_info)
    if tag != want:
        raise PrebuiltError(f"{wheel.name} is for {tag}; this Python is {want}")
    changed = differing(files, source_files(repo))
    if changed:
        raise PrebuiltError(f"{wheel.name} was built from commit {stamp.get('commit', '?')[:10]}, whose "
                            f"build inputs differ from this tree's in {', '.join(changed[:8])}"
                            f"{' ...' if len(changed) > 8 else ''}")
    return wheel


def install(folder: Path, repo: Path = REPO) -> Path:
    """``check``, then pip install the wheel into this Python and run SMOKE with it; returns the
    wheel."""
    wheel = check(folder, repo)
    out = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps",
                          "--force-reinstall", str(wheel)], capture_output=True, text=True)
    if out.returncode != 0:
        raise PrebuiltError(f"pip install {wheel.name} failed: {(out.stdout + out.stderr).strip()[-800:]}")
    smoke = subprocess.run([sys.executable, "-P", "-c", SMOKE], capture_output=True, text=True,
                           cwd=tempfile.gettempdir())
    print(smoke.stdout.strip())
    if smoke.returncode != 0:
        raise PrebuiltError(f"{wheel.name} installed but does not load here: {smoke.stderr.strip()[-800:]}")
    failed = []
    for code, what in ((SMOKE_GPU, "its tiny Gram on the GPU"), (SMOKE_STRINGS, "the binding's messages")):
        try:
            run = subprocess.run([sys.executable, "-P", "-c", code], capture_output=True,
                                 text=True, cwd=tempfile.gettempdir(), timeout=SMOKE_TIMEOUT)
            out, err, rc = run.stdout, run.stderr, run.returncode
        except subprocess.TimeoutExpired as e:
            out, err, rc = e.stdout or "", f"no answer in {SMOKE_TIMEOUT} s (a hung launch?)", "none"
            out = out.decode() if isinstance(out, bytes) else out
        print(out.strip())
        if rc != 0:
            failed.append(what)
            print(f"WARNING: {what} failed here (exit status {rc}: {err.strip()[-400:]}); the "
                  "wheel is kept, a build here would compile the same code", flush=True)
    if failed:
        raise SmokeFailed(wheel, failed)
    return wheel


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("action", choices=("build", "check", "install", "mixes"))
    ap.add_argument("folder", type=Path, help="the wheel's folder (.prebuilt)")
    ap.add_argument("--repo", type=Path, default=REPO, help="the checkout [this one]")
    ap.add_argument("--python", help=f"build: a Python {'.'.join(map(str, DEVICE_PYTHON))} [found on PATH or in pyenv]")
    args = ap.parse_args(argv)
    try:
        if args.action == "build":
            args.folder.mkdir(parents=True, exist_ok=True)
            if any(args.folder.iterdir()):
                raise PrebuiltError(f"{args.folder} is not empty (prepare_carry.py replaces .prebuilt whole)")
            stamp = build(args.folder, args.repo, args.python)
            print(f"built {stamp['wheel']} of {stamp['commit'][:10]} ({len(stamp['files'])} build inputs)")
        elif args.action == "check":
            print(check(args.folder, args.repo))
        elif args.action == "mixes":
            record = count_mixes(args.folder)
            print(f"wrote {args.folder / SASS_MIXES}: " + ", ".join(
                f"{v} ({', '.join(m) or 'none'})" for v, m in record["by_kernel"].items()))
        else:
            print(f"installed the prebuilt {install(args.folder, args.repo).name}")
    except PrebuiltError as e:
        print(f"prebuilt: {e}", file=sys.stderr)
        return 1
    except SmokeFailed as e:
        print(f"prebuilt: {e}", file=sys.stderr)
        return SMOKE_FAILED
    return 0


if __name__ == "__main__":
    sys.exit(main())
