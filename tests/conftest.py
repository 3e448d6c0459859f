import importlib.util
import os
import signal
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

# The suite tests the INSTALLED package (`pip install ".[test]" && pytest`).  It is imported
# here, before any test module, so a test module that later puts a folder on sys.path (to
# import bench tooling, say) cannot switch it to the checkout's source tree, which has no
# compiled CUDA extension.  test_anywhere.py fails when it came from the checkout anyway.
import cntk_engine  # noqa: E402,F401

ROOT = Path(__file__).resolve().parents[1]
DATA = Path(os.environ.get("CNTK_ENGINE_DATA", ROOT.parent / "shared" / "data"))


def load_real(name):
    """Real images from ../shared/data as NCHW float arrays (skips the test if absent)."""
    path = DATA / name
    if not path.exists():
        pytest.skip(f"real data {path} not found (set CNTK_ENGINE_DATA to the folder holding it)")
    return np.load(path)


def run_cli(capsys, *argv):
    """``cntk-engine -q ARGV...`` in this process: (exit status, stdout, stderr); argparse's
    usage errors (SystemExit) give their status too."""
    from cntk_engine import cli
    try:
        rc = cli.main(["-q", *map(str, argv)])
    except SystemExit as e:
        rc = e.code
    out, err = capsys.readouterr()
    return rc, out, err


def official_cifar(tmp_path, per_batch=3):
    """A miniature of the official CIFAR-10 python files: (folder, archive, expected arrays)."""
    import pickle
    import tarfile
    rng = np.random.default_rng(5)
    root = tmp_path / "cifar-10-batches-py"
    root.mkdir()
    xs, ys = [], []
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        data = rng.integers(0, 256, (per_batch, 3072), dtype=np.uint8)
        labels = [int(v) for v in rng.integers(0, 10, per_batch)]
        (root / name).write_bytes(pickle.dumps({b"data": data, b"labels": labels, b"batch_label": b"x"}))
        xs.append(data)
        ys.append(labels)
    archive = tmp_path / "cifar-10-python.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(root, arcname="cifar-10-batches-py")
    return root, archive, xs, ys


def load_tool(name: str):
    """The module ``tools/<name>.py`` (``name`` may hold a folder: ``gpu/prepare_carry``),
    loaded from its file: putting the checkout ahead of site-packages on sys.path would make
    cntk_engine import from the source tree (which has no compiled extension)."""
    spec = importlib.util.spec_from_file_location(Path(name).name, ROOT / "tools" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture
def rng(request):
    return np.random.default_rng(abs(hash(request.node.name)) % 2**32)


@pytest.fixture(autouse=True)
def _fresh_diagonals():
    """Each test computes its diagonals and their extremes afresh: the kept ones
    (``diag.MEMO_BYTES``, ``inputs.EXTREMES_CACHE_BYTES``) of another test's images would hide
    what a test measures."""
    from cntk_engine import clear_memos
    clear_memos()



# --------------------------------------------------------------------- a store being written
def written_markers(store: Path) -> list[tuple[int, int]]:
    """The tiles whose ``tiles_done`` chunk file (``c/<i>/<j>``) is in place in ``store``.

    Tests that stop a running job after some tiles watch these.  zarr writes a chunk to a
    temporary ``<j>.<uuid>.partial`` and renames it into place, so names that are not plain
    numbers are chunks still being written: counted, they made a test read a marker that was
    not there yet (and ``int()`` one, which failed a CI run)."""
    d = Path(store) / "tiles_done" / "c"
    if not d.is_dir():
        return []
    return [(int(r.name), int(f.name)) for r in d.iterdir() if r.is_dir() and r.name.isdigit()
            for f in r.iterdir() if f.name.isdigit()]

# --------------------------------------------------------------------- child Python processes
def checkout_copy(dest: Path) -> Path:
    """A folder holding a ``cntk_engine/`` source tree, as a clone of the repository does: the
    checkout's package if the tests run from one, else a copy of the imported package (either
    way no compiled extension and no caches).  ``python -c`` or ``python -m`` started in it
    import this tree instead of the installed package."""
    src = ROOT / "cntk_engine"
    if not (src / "__init__.py").is_file():
        src = Path(cntk_engine.__file__).parent
    shutil.copytree(src, dest / "cntk_engine",
                    ignore=shutil.ignore_patterns("__pycache__", "*.so", "*.pyd"))
    return dest


def run_script(code: str, *args, cwd, env=None, timeout=1800, wait=True):
    """Run ``code`` as a script file (``python FILE ARGS``) with working directory ``cwd``.

    A script's own folder, not the working directory, goes first on its sys.path, so the child
    imports the package these tests import wherever it runs: the way a user's script or the
    ``cntk-engine`` command runs from a checkout.  ``wait=False`` returns the Popen."""
    folder = Path(cwd).parent / f".scripts-{os.getpid()}"
    folder.mkdir(exist_ok=True)
    script = folder / f"script_{abs(hash(code)) % 10**12}.py"
    script.write_text(code)
    cmd = [sys.executable, str(script), *map(str, args)]
    if not wait:
        # SIGINT restored to its default: a test suite started in the background (``cmd &`` in a
        # non-interactive shell) ignores it, the child would inherit that, and Python installs
        # its Ctrl-C handler only where SIGINT is not ignored
        return subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True,
                                preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
