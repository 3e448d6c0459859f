"""Prepare the folders a GPU visit carries (tools/gpu/README.md), on this side, without device
time: the wheels the GPU machine lacks (``.whl``: neural-tangents, zarr), the paper's
``CNTK.py`` (``.paper``), the real images the GPU tests read (``.devdata``) and this package's
wheel with its CUDA extension, built
from HEAD for the GPU machine's Python (``.prebuilt``, tools/gpu/prebuilt.py: about 4 minutes on
two cores, which the visit then does not spend compiling; kept where its stamp already matches
the tree's build inputs).  All four are ignored by git.

    python tools/gpu/prepare_carry.py --paper-git /work/.mirror/ruosongwang+CNTK/repo/.git

``--paper-git`` is the git directory of a snapshot of github.com/ruosongwang/CNTK (the search
tool's ``fetch github:ruosongwang/CNTK`` answers with it); its ``CNTK.py`` is checked by
loading it as the harness does (``bench/paper_code.py``, with its RawKernels emulated), so a
wrong file is refused here rather than found out on the GPU.  Everything is checked before
anything is written; each folder is built under a temporary name and renamed into place, so
an interrupted run leaves the previous folder or none, never half of one.  At the end it prints
the folders' sizes against the device tool's carry limit and the call that uses them.
"""
from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
#: The wheels the GPU machine lacks (it has JAX, CuPy, NumPy, PyYAML, pytest, no network):
#: neural-tangents for the nt phase (pure Python), and zarr with the dependencies it lacks for
#: the tests that keep kernels in stores (the solve on the GPU, tests/test_cli_solve.py), all
#: installed --no-deps, each as (requirement, the start of its wheel's file name).
#: Pinned: the versions checked (numcodecs 0.17 needs numpy >= 2, which the machine has).
WHEELS = (("neural-tangents==0.6.5", "neural_tangents-0.6.5-"), ("frozendict", "frozendict-"),
          ("zarr==3.1.6", "zarr-3.1.6-"), ("numcodecs==0.17.1", "numcodecs-0.17.1-"),
          ("donfig==0.8.1.post1", "donfig-0.8.1.post1-"),
          ("google-crc32c==1.9.0", "google_crc32c-1.9.0-"),
          ("typing-extensions==4.16.0", "typing_extensions-4.16.0-"))
DATA_FILES = ("cifar10_jpeg_small.npz", "mnist_test.npz")
CARRY_LIMIT = 64 * 2**20                               # the device tool's limit: tree + carried
FOLDERS = (".whl", ".paper", ".devdata", ".prebuilt")
CALL = ('run(command="bash tools/gpu/gpu_session.sh", carry=[' + ", ".join(f'"{f}"' for f in FOLDERS)
        + '], timeout_s=600)')


class PrepareError(Exception):
    """An input that cannot make a carry folder; the message names it and what is accepted."""


def from_repo(module: str):
    """``module`` of this checkout (bench/, tools/), imported with the checkout on sys.path."""
    import importlib
    sys.path.insert(0, str(REPO))
    try:
        return importlib.import_module(module)
    finally:
        sys.path.remove(str(REPO))


PREBUILT = from_repo("tools.gpu.prebuilt")
WHEEL_PYTHON = ".".join(map(str, PREBUILT.DEVICE_PYTHON))   # the GPU machine's Python


def paper_source(git_dir: Path) -> str:
    """``CNTK.py`` at HEAD of the snapshot ``git_dir``, checked by loading it as the harness does."""
    if not git_dir.is_dir():
        raise PrepareError(f"--paper-git {git_dir}: no such folder; give the git directory of a "
                           "snapshot of github.com/ruosongwang/CNTK (fetch github:ruosongwang/CNTK)")
    out = subprocess.run(["git", "--git-dir", str(git_dir), "show", "HEAD:CNTK.py"],
                         capture_output=True, text=True)
    if out.returncode != 0:
        raise PrepareError(f"--paper-git {git_dir}: HEAD has no CNTK.py ({out.stderr.strip()}); "
                           "give the snapshot of github.com/ruosongwang/CNTK")
    unavailable_reason = from_repo("bench.paper_code").unavailable_reason
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "CNTK.py"
        path.write_text(out.stdout)
        why = unavailable_reason(path, emulate=True)
    if why is not None:     # named as the snapshot names it, not by the temporary copy
        why = why.replace(str(path), "HEAD:CNTK.py")
        raise PrepareError(f"--paper-git {git_dir}: its CNTK.py is not the paper's code as "
                           f"bench/paper_code.py reads it: {why}")
    return out.stdout


def data_paths(data: Path) -> list[Path]:
    """The DATA_FILES in ``data``, all of them or a PrepareError naming the missing ones."""
    paths = [data / name for name in DATA_FILES]
    missing = [p.name for p in paths if not p.is_file()]
    if missing:
        raise PrepareError(f"--data {data}: {', '.join(missing)} not found; give the folder holding "
                           f"{' and '.join(DATA_FILES)} (the shared data folder)")
    return paths


def download_wheels(dest: Path) -> None:
    """``pip download`` of WHEELS for the GPU machine's Python into ``dest``."""
    out = subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
                          "--python-version", WHEEL_PYTHON, "--implementation", "cp",
                          "--platform", "manylinux2014_x86_64", "--platform", "any",
                          "-d", str(dest), *(r for r, _ in WHEELS)], capture_output=True, text=True)
    if out.returncode != 0:
        tail = "\n".join(out.stderr.strip().splitlines()[-3:])
        raise PrepareError(f"pip download {' '.join(r for r, _ in WHEELS)} failed (no "
                           f"network?):\n{tail}")
    names = sorted(p.name for p in dest.glob("*.whl"))
    for _, want in WHEELS:
        if not any(n.startswith(want) for n in names):
            raise PrepareError(f"pip download wrote {names}, without a {want}*.whl")


def replace_folder(dest: Path, fill) -> None:
    """Build ``dest`` under a temporary name with ``fill(folder)``, then rename it into place."""
    tmp = Path(tempfile.mkdtemp(prefix=f"{dest.name}.", dir=dest.parent))
    try:
        fill(tmp)
        old = dest.with_name(dest.name + ".old")
        if dest.exists():
            shutil.rmtree(old, ignore_errors=True)
            dest.rename(old)
        tmp.rename(dest)
        shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def copy_files(paths):
    """A ``fill`` for :func:`replace_folder`: copies ``paths`` into the folder."""
    def fill(folder: Path) -> None:
        for p in paths:
            shutil.copyfile(p, folder / p.name)
    return fill


def tree_bytes(checkout: Path) -> int | None:
    """Bytes of the files the device tool sends from ``checkout`` beside the carried folders; None
    where it is not a git checkout."""
    out = subprocess.run(["git", "-C", str(checkout), "ls-files", "-z", "--cached", "--others",
                          "--exclude-standard"], capture_output=True)
    if out.returncode != 0:
        return None
    paths = (checkout / name for name in out.stdout.decode().split("\0") if name)
    return sum(p.stat().st_size for p in paths if p.is_file())


def folder_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--paper-git", type=Path, required=True,
                    help="git directory of a snapshot of github.com/ruosongwang/CNTK")
    ap.add_argument("--data", type=Path,
                    default=Path(os.environ.get("CNTK_ENGINE_DATA", REPO.parent / "shared" / "data")),
                    help="folder holding " + " and ".join(DATA_FILES)
                    + " [$CNTK_ENGINE_DATA, else ../shared/data next to the checkout]")
    ap.add_argument("--no-wheels", action="store_true",
                    help="keep .whl as it is (no download; the nt and tests phases need its "
                    "neural-tangents and zarr on the GPU machine)")
    ap.add_argument("--no-prebuilt", action="store_true",
                    help="keep .prebuilt as it is (no build; the GPU machine then builds the package)")
    ap.add_argument("--prebuilt-python",
                    help="the Python 3.12 that builds .prebuilt [python3.12 on PATH, else pyenv's]")
    ap.add_argument("--dest", type=Path, default=REPO,
                    help="the checkout whose folders are written; .prebuilt is built from its HEAD [this one]")
    args = ap.parse_args(argv)
    try:
        if not args.dest.is_dir():
            raise PrepareError(f"--dest {args.dest}: no such folder; give the repository checkout")
        # every input checked before anything is written
        source = paper_source(args.paper_git)
        paths = data_paths(args.data)
        if not args.no_prebuilt:      # first: the longest step, with checks of its own
            try:
                wheel = PREBUILT.check(args.dest / ".prebuilt", args.dest, PREBUILT.DEVICE_PYTHON)
                print(f".prebuilt: {wheel.name} matches this tree's build inputs; kept")
                if not (args.dest / ".prebuilt" / PREBUILT.SASS_MIXES).is_file():
                    try:         # a .prebuilt from before the counts (build writes them)
                        PREBUILT.count_mixes(args.dest / ".prebuilt")
                        print(f".prebuilt: its kernels' SASS counted into {PREBUILT.SASS_MIXES}")
                    except PREBUILT.PrebuiltError as e:
                        print(f".prebuilt: no {PREBUILT.SASS_MIXES} ({e}); the GPU side counts them")
            except PREBUILT.PrebuiltError:
                try:
                    replace_folder(args.dest / ".prebuilt",
                                   lambda d: PREBUILT.build(d, args.dest, args.prebuilt_python))
                except PREBUILT.PrebuiltError as e:
                    raise PrepareError(f".prebuilt: {e} (--no-prebuilt skips it)") from None
        if not args.no_wheels:
            replace_folder(args.dest / ".whl", download_wheels)
        replace_folder(args.dest / ".paper", lambda d: (d / "CNTK.py").write_text(source))
        replace_folder(args.dest / ".devdata", copy_files(paths))
    except PrepareError as e:
        print(f"prepare_carry: {e}", file=sys.stderr)
        return 2
    tree = tree_bytes(args.dest)
    total = tree or 0
    print(f"{'tree':9s} {total / 2**20:6.1f} MiB  "
          + ("the files the device tool sends (tracked, and untracked ones git does not ignore)"
             if tree is not None else "(not a git checkout: not counted)"))
    for name in FOLDERS:
        folder = args.dest / name
        size = folder_bytes(folder) if folder.is_dir() else 0
        total += size
        files = sorted(p.name for p in folder.iterdir()) if folder.is_dir() else ["(absent)"]
        print(f"{name:9s} {size / 2**20:6.1f} MiB  {', '.join(files)}")
    print(f"sent in all: {total / 2**20:.1f} MiB of the device tool's {CARRY_LIMIT // 2**20} MiB")
    if total > CARRY_LIMIT:
        print("prepare_carry: more than the device tool carries; the call would fail", file=sys.stderr)
        return 2
    print(f"the call (device tool): {CALL}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
