"""What the first step of the scale workflow costs on all of CIFAR-10: reading the python
version as downloaded (``cntk_engine.datasets.load_cifar10``) and ``cntk-engine preprocess`` of
it (``--zca`` on the 60,000 images; ``--zca --n-train 5000 --n-test 2000``, a subset first;
``--zca --augment-flips``, the 50,000 training images followed by their flips).

    python bench/bench_cifar_download.py [--archive cifar-10-python.tar.gz] [--per-batch 10000]
                                         [--subset 5000,2000]

Without ``--archive`` it writes an archive of CIFAR-10's format and size (six pickled batches of
``--per-batch`` images each, random pixels in 0..63 so that gzip leaves it about the official
163 MB, written at gzip level 1) into a temporary folder first, and says so in the result: the
costs depend on the sizes, not on the pixels.  Each step runs in a process of its own (as a
user runs it); its wall time and peak resident memory (``os.wait4``) are recorded.  Writes
<out-dir>/cifar_download_<date>.json.
"""
from __future__ import annotations

import argparse
import os
import pickle
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

import numpy as np

if __package__ in (None, ""):
    sys.path.append(str(Path(__file__).resolve().parents[1]))
from bench.common import (RESULTS, ScriptError, check_out_dir, existing_file, int_at_least,  # noqa: E402
                          int_list, run_main, save_result)

BATCHES = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]
LOAD = ("import sys, time; t = time.perf_counter(); from cntk_engine.datasets import load_cifar10; "
        "d = load_cifar10(sys.argv[1]); print(d.x_train.shape, d.x_test.shape, "
        "f'{time.perf_counter() - t:.3f}')")


def write_archive(folder: Path, per_batch: int) -> Path:
    """An archive of CIFAR-10's format (``cifar-10-batches-py/``, six batches) of random images."""
    rng = np.random.default_rng(0)
    root = folder / "cifar-10-batches-py"
    root.mkdir()
    for name in BATCHES:
        batch = {b"batch_label": name.encode(), b"labels": [int(v) for v in rng.integers(0, 10, per_batch)],
                 b"data": rng.integers(0, 64, (per_batch, 3072)).astype(np.uint8),
                 b"filenames": [f"{i}.png".encode() for i in range(per_batch)]}
        (root / name).write_bytes(pickle.dumps(batch, protocol=2))
    archive = folder / "cifar-10-python.tar.gz"
    with tarfile.open(archive, "w:gz", compresslevel=1) as tar:
        tar.add(root, arcname="cifar-10-batches-py")
    return archive


def timed(argv: list[str], cwd: Path) -> dict:
    """Run ``argv``: its wall seconds, peak resident MiB and last lines of output (ScriptError if
    it fails)."""
    t0 = time.perf_counter()
    p = subprocess.Popen(argv, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    out = p.stdout.read()
    _, status, usage = os.wait4(p.pid, 0)
    p.returncode = os.waitstatus_to_exitcode(status)
    wall = time.perf_counter() - t0
    if p.returncode != 0:
        raise ScriptError(f"{' '.join(argv)} failed (exit status {p.returncode}): {out.strip()[-500:]}")
    return {"command": argv, "wall_s": wall, "peak_rss_mib": usage.ru_maxrss / 1024,
            "output": out.strip().splitlines()[-3:]}


def run(args):
    check_out_dir(args.out_dir, "--out-dir")
    if len(args.subset) != 2:
        raise ScriptError(f"--subset takes two numbers, --n-train,--n-test (e.g. 5000,2000); got "
                          f"{len(args.subset)}")
    python = sys.executable
    with tempfile.TemporaryDirectory(dir=args.tmp) as tmp:
        tmp = Path(tmp)
        if args.archive:
            archive, source = Path(args.archive).resolve(), f"{args.archive} (as given)"
        else:
            t0 = time.perf_counter()
            archive = write_archive(tmp, args.per_batch)
            source = (f"an archive of CIFAR-10's format written here: 6 batches of {args.per_batch} "
                      f"random images (pixels 0..63), gzip level 1, {archive.stat().st_size / 1e6:.1f} MB, "
                      f"made in {time.perf_counter() - t0:.1f} s")
        print(f"data: {source}")
        steps = {}
        steps["load_cifar10"] = timed([python, "-c", LOAD, str(archive)], tmp)
        cli = [python, "-m", "cntk_engine", "-q", "preprocess", str(archive), "--zca"]
        n_train, n_test = args.subset
        steps["preprocess_zca_subset"] = timed(cli + ["--n-train", str(n_train), "--n-test", str(n_test),
                                                      "--out", str(tmp / "s.npz")], tmp)
        steps["preprocess_zca_all"] = timed(cli + ["--out", str(tmp / "z.npz")], tmp)
        steps["preprocess_zca_all"]["out_mb"] = (tmp / "z.npz").stat().st_size / 1e6
        (tmp / "z.npz").unlink()                 # 1.5 GB: the next one is 2.7 GB
        steps["preprocess_zca_all_augment_flips"] = timed(cli + ["--augment-flips", "--out",
                                                                 str(tmp / "f.npz")], tmp)
        steps["preprocess_zca_all_augment_flips"]["out_mb"] = (tmp / "f.npz").stat().st_size / 1e6
        for name, st in steps.items():
            print(f"{name}: {st['wall_s']:.1f} s, peak {st['peak_rss_mib']:.0f} MiB")
        size_mb = archive.stat().st_size / 1e6
    return save_result(args.out_dir, "cifar_download", {
        "data": source, "archive_mb": size_mb, "subset": {"n_train": n_train, "n_test": n_test},
        "blas_threads": os.environ.get("OPENBLAS_NUM_THREADS"), "steps": steps})


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--archive", type=existing_file, default=None,
                    help="cifar-10-python.tar.gz as downloaded (default: write one of its format)")
    ap.add_argument("--per-batch", type=int_at_least(2), default=10000,
                    help="images per batch of the archive written (default 10000: CIFAR-10's size)")
    ap.add_argument("--subset", type=int_list(1, "5000,2000"), default=[5000, 2000],
                    help="--n-train,--n-test of the subset step (default 5000,2000)")
    ap.add_argument("--tmp", default=None, help="folder for the temporary files (default: the system's)")
    ap.add_argument("--out-dir", default=str(RESULTS))
    return run_main(ap, run, argv)


if __name__ == "__main__":
    main()
