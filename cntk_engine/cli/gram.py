"""``cntk-engine gram``: the Gram matrix of an image file into a Zarr store.

``cntk-engine gram DATA --depth 11 --pooling gap --out gram.zarr`` computes the Gram matrix of the
images in DATA into a Zarr store (layout: ``cntk_engine.jobs.store``; ``docs/scheduler.md``).

DATA is
  * a ``.npy`` file holding an (N, C, H, W) or (N, H, W, C) array (``--data-format auto``, the
    default, reads it as NHWC when its last axis is 1 or 3 and its second is not, as NCHW in the
    opposite case, else by the smallest of the three image axes, and asks for
    ``--data-format NCHW|NHWC`` when that does not decide; the layout taken is logged); a 3-D
    (N, H, W) array is taken as single-channel images; any integer or float dtype;
  * or a ``.npz`` archive: the array under the one of the keys ``x``, ``x_train``, ``images``,
    ``X`` that it holds (for ``--x2``: ``x``, ``x_test``, ``images``, ``X``; an archive holding
    several of them is refused, as the one meant cannot be told), or any key named explicitly as
    ``PATH.npz:KEY``.

Store semantics: a new ``--out`` path is created; an existing one is an error unless
``--resume`` or ``--join`` is given, also when another process creates it at the same moment.
With either, the job stored there is continued provided it is this very job (same images,
architecture, dtype, backend, kernels; and, where ``--tile`` is given, the store's tile size:
without it the store's is taken): its finished tiles are verified (read back against
their checksums), and the missing and failing ones are computed, claimed tile by tile, so
processes running on the same store at once (a SLURM job array, several nodes or shells)
split the work; otherwise the run is refused with the differences, and nothing is written.
``--resume`` says "continue a job that stopped", ``--join`` "work on it together with the
processes running on it": both do the same, and both simply start the job on a path that does
not exist yet (so a job script can always pass one; ``--resume`` notes on stderr that no store
was found).  A path that exists but is not a Gram store (a file, another folder) is refused
with or without them.  ``--claim-timeout S``: a claim of this run not renewed for S seconds (its
writer died on another host) is taken over by other hosts' writers (a claim's own recorded
timeout holds for it).
"""
from __future__ import annotations

import sys
import time
from pathlib import Path

import numpy as np

from .common import (PROG, CliError, add_architecture_options, add_run_options, gram_options,
                     int_list, load_images, plural, positive_seconds, shell_arg, to_nchw)

X1_KEYS = ("x", "x_train", "images", "X")
X2_KEYS = ("x", "x_test", "images", "X")


def add_parser(sub) -> None:
    p = sub.add_parser("gram", help="compute a CNTK / NNGP Gram matrix into a Zarr store",
                       description="Compute the kernel matrix of the images in DATA (against "
                       "themselves, or against --x2) into the Zarr store --out, tile by tile; "
                       "resumable with --resume.")
    p.add_argument("data", metavar="DATA", help=".npy (N,C,H,W) or (N,H,W,C) ((N,H,W): one channel), or .npz (keys x, "
                   "x_train, images, X; or PATH.npz:KEY)")
    p.add_argument("--x2", metavar="DATA2", help="second image set: the N1 x N2 matrix against DATA "
                   "(.npz keys x, x_test, images, X)")
    add_architecture_options(p)
    p.add_argument("--out", required=True, help="Zarr store to write (a directory, e.g. gram.zarr)")
    p.add_argument("--resume", action="store_true",
                   help="continue the job stored at --out (refused if it holds another job); its "
                   "finished tiles are verified and failing ones computed again")
    p.add_argument("--join", action="store_true",
                   help="create --out, or work on it together with the processes running on it "
                   "(a job array): tiles are claimed, so each is computed once")
    p.add_argument("--claim-timeout", type=positive_seconds, default=None, metavar="SECONDS",
                   help="how long a claim of this run may go without renewal before another "
                   "host's writer takes its tile over (default 600); a claim is taken over after "
                   "the timeout its own writer recorded, so a shorter value here does not hasten "
                   "the takeover of an earlier run's claims (a run stopped by Ctrl-C or SIGTERM "
                   "releases its claims)")
    p.add_argument("--devices", help="GPUs: 'all' (default) or ids, e.g. 0,1 (cuda backend)")
    p.add_argument("--scheduler", metavar="ADDRESS",
                   help="Dask scheduler address (tcp://host:8786): run tiles on that cluster")
    add_run_options(p, data_formats=("auto", "NCHW", "NHWC"), default_format="auto")
    p.set_defaults(func=run)


def _exists_message(out: str, race: bool = False) -> str:
    """The command line's words for a store at --out without --resume / --join (``race``:
    another process created it while this one was creating it)."""
    what = (f"--out {out!r} was created by another process while this one was creating it; "
            "nothing was written. To work on it together with that process pass --join (or "
            "--resume)" if race else
            f"--out {out!r} exists; pass --resume to continue the job stored there (refused if it "
            "holds another job), --join to work on it together with the processes running on it")
    return what + ", or choose another path"


def run(args) -> int:
    from ..api import gram
    from ..jobs.store import StoreExists, StorePath, is_store, kernel_arrays
    # every option error before the data is read
    opts, _ = gram_options(args)
    devices = None
    if args.devices is not None:
        if args.devices.strip().lower() == "all":
            devices = "all"
        else:
            devices = int_list(args.devices, "--devices", "'all' or comma-separated GPU ids such as 0,1")
    if not args.out:
        raise CliError("--out '' is empty; give the path of the Zarr store to write, e.g. gram.zarr")
    if args.scheduler is not None and not args.scheduler.strip():
        raise CliError(f"--scheduler {args.scheduler!r} is empty; give the Dask scheduler's address, e.g. "
                       "tcp://host:8786, or leave --scheduler out to run here")
    refused = None
    if args.flip:           # a training set holding its flips, under the flip kernel: twice over
        from ..estimators import FLIPS_TWICE
        refused = FLIPS_TWICE.format(augment="preprocess --augment-flips", flip="--flip")
    x1 = to_nchw(load_images(args.data, X1_KEYS, "DATA", flipped_refused=refused),
                 args.data_format, "DATA")
    x2 = None if args.x2 is None else to_nchw(
        load_images(args.x2, X2_KEYS, "--x2", flipped_refused=refused), args.data_format, "--x2")
    if x2 is not None and x2.shape == x1.shape and np.array_equal(x1, x2):
        # e.g. DATA.npz:x_test with --x2 DATA.npz, whose default keys find x_test again
        print(f"{PROG}: warning: DATA and --x2 hold the same images: this computes DATA's Gram as "
              "a rectangular job (every pair twice); for a test kernel against training images "
              "name their key (--x2 FILE.npz:x_train), for DATA's own Gram leave --x2 out",
              file=sys.stderr)
    out = Path(args.out)
    together = args.resume or args.join
    # before any work: a path that holds something else than a store is refused as such (no
    # --resume can continue it), a store only without --resume / --join
    if is_store(out, "--out "):
        if not together:
            raise CliError(_exists_message(args.out))
    elif args.resume:
        print(f"{PROG}: note: no store at --out {args.out!r}; starting a new one",
              file=sys.stderr)
    client = None
    if args.scheduler:
        try:
            from distributed import Client
        except ImportError as e:
            from ..version import install_hint
            raise CliError(f"--scheduler needs Dask ({install_hint('dask')}): {e}") from None
        try:
            client = Client(args.scheduler, timeout="10s")
        except Exception as e:  # noqa: BLE001 - unreachable address, wrong protocol, timeout
            raise CliError(f"cannot connect to the Dask scheduler at {args.scheduler!r}: {e}") from None
    t0 = time.perf_counter()
    try:
        target = StorePath(str(out), existing="resume" if together else "refuse",
                           claim_timeout=args.claim_timeout)
        group, info = gram(x1, x2, **opts, return_info=True, devices=devices, out=target,
                           client=client)
    except StoreExists as e:      # another process created it after the check above
        raise CliError(_exists_message(args.out, race=e.race)) from None
    finally:
        if client is not None:
            client.close()
    names = kernel_arrays(group)
    rate = info["pairs_per_second"]
    print(f"{out}: {info['unique_pairs']} unique pairs; computed {info['tiles_computed']} of "
          f"{plural(info['tiles_total'], 'tile')} ({info['pairs_computed']} pairs) in "
          f"{time.perf_counter() - t0:.1f} s on {info['backend']} ({info['where']}, tile {info['tile']})"
          + (f", {rate:.4g} pairs/s" if rate else ""))
    checks = []
    if info.get("tiles_verified"):
        checks.append(f"{plural(info['tiles_verified'], 'finished tile')} verified in "
                      f"{info['verify_seconds']:.1f} s")
    if info.get("tiles_failed_verification"):
        checks.append(f"{info['tiles_failed_verification']} failed and were computed again")
    if info.get("tiles_by_others"):
        checks.append(f"{info['tiles_by_others']} computed by other writers")
    if checks:
        print(f"store: {'; '.join(checks)} (run {info['run']})")
    print(f"arrays: {', '.join(names)}   read (verified): "
          f"cntk_engine.solver.load_gram({str(out)!r}, key={names[0]!r})")
    if x2 is not None:      # a test kernel: read with the training Gram it belongs to
        print("as a test kernel, with the store of its training Gram (checked to belong "
              f"together): cntk-engine solve DATA --train TRAIN_STORE --test {shell_arg(out)}, "
              f"or cntk_engine.solver.load_train_test(TRAIN_STORE, {str(out)!r})")
    return 0
