"""Test accuracy of the kernel recipes on a CIFAR-10 subset: CNTK-GAP, + flip, + ZCA, LAP,
Myrtle (+ ZCA + flip), NTK and NNGP, with ``cntk-engine evaluate``; one table.

    python bench/accuracy_recipes.py --data ../shared/data/cifar10_jpeg_small.npz \
        --n-train 500 --n-test 500 [--only gap,myrtle5] [--out-dir bench/results] \
        [--store-dir runs/kernels]

Each configuration is one ``cntk-engine evaluate`` command (printed, and stored in its JSON):
the same training and test images for all (``--seed``), NTK and NNGP from one kernel pass,
the ridge chosen by leave-one-out.  A configuration whose JSON exists is not run again, so an
interrupted run resumes; ``<name>_table.md`` collects what exists.  With ``--store-dir DIR``
each configuration keeps its kernels in ``DIR/<name>_<configuration>`` (``evaluate --store
... --resume``), so a configuration that was interrupted (hours, on the CPU) continues from its
finished tiles instead of starting again.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

if __package__ in (None, ""):
    sys.path.append(str(Path(__file__).resolve().parents[1]))
from bench.common import RESULTS, choice_list, existing_file, int_at_least  # noqa: E402

CONFIGS = {   # name: (description, evaluate options)
    "gap": ("CNTK-GAP depth 3", ["--depth", "3"]),
    "gap_flip": ("CNTK-GAP depth 3 + flip", ["--depth", "3", "--flip"]),
    "gap_zca": ("CNTK-GAP depth 3 + ZCA", ["--depth", "3", "--zca"]),
    "gap_zca_flip": ("CNTK-GAP depth 3 + ZCA + flip", ["--depth", "3", "--zca", "--flip"]),
    "lap4": ("CNTK-LAP depth 3, c = 4", ["--depth", "3", "--pooling", "lap", "--lap-window", "4"]),
    "lap8": ("CNTK-LAP depth 3, c = 8", ["--depth", "3", "--pooling", "lap", "--lap-window", "8"]),
    "myrtle5": ("Myrtle-5", ["--architecture", "myrtle5"]),
    "myrtle5_zca_flip": ("Myrtle-5 + ZCA + flip", ["--architecture", "myrtle5", "--zca", "--flip"]),
}


def command(name, args) -> list[str]:
    out = Path(args.out_dir) / f"{args.name}_{name}.json"
    keep = [] if args.store_dir is None else [
        "--store", str(Path(args.store_dir) / f"{args.name}_{name}"), "--resume"]
    return ["evaluate", args.data, *CONFIGS[name][1], "--n-train", str(args.n_train), "--n-test",
            str(args.n_test), "--kernel", "both", "--seed", str(args.seed), "--backend", args.backend,
            "--no-progress", *keep, "--json", str(out)]


def table(args) -> str:
    rows = ["| configuration | NTK test accuracy | NNGP test accuracy | kernel seconds | machine | command |",
            "| --- | --- | --- | --- | --- | --- |"]
    for name in CONFIGS:
        f = Path(args.out_dir) / f"{args.name}_{name}.json"
        if not f.exists():
            continue
        rec = json.loads(f.read_text())
        acc = {r["kernel"]: r["accuracy"] for r in rec["results"]}
        secs = rec["seconds"]["train_gram"] + rec["seconds"]["test_kernel"]
        # a configuration resumed from its --store-dir kernels timed only its last run
        part = "" if rec.get("pairs_computed", rec["pairs"]) == rec["pairs"] else \
            f" (resumed: {rec['pairs_computed']} of {rec['pairs']} pairs in this run)"
        # rows run at different times may come from different machines: their seconds compare
        # only on the same one
        m = rec.get("machine", {})
        where = f"{m.get('cpu', '?')}, {m.get('cores', '?')} cores"
        rows.append(f"| {CONFIGS[name][0]} | {100 * acc['ntk']:.1f}% | {100 * acc['nngp']:.1f}% | "
                    f"{secs:.0f}{part} | {where} | `{rec['command']}` |")
    return "\n".join(rows) + "\n"


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=existing_file, required=True, help="CIFAR-10 subset .npz")
    ap.add_argument("--n-train", type=int_at_least(2), default=500)
    ap.add_argument("--n-test", type=int_at_least(1), default=500)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--backend", default="auto")
    ap.add_argument("--only", type=choice_list(CONFIGS), default=",".join(CONFIGS))
    ap.add_argument("--out-dir", default=str(RESULTS))
    ap.add_argument("--name", default="accuracy_recipes")
    ap.add_argument("--store-dir", default=None, metavar="DIR",
                    help="keep each configuration's kernels in DIR/<name>_<configuration> (resumable)")
    args = ap.parse_args(argv)
    Path(args.out_dir).mkdir(parents=True, exist_ok=True)
    if args.store_dir is not None:
        Path(args.store_dir).mkdir(parents=True, exist_ok=True)
    from cntk_engine.cli import main as cli_main
    for name in args.only:
        argv_ = command(name, args)
        if Path(argv_[-1]).exists():
            print(f"{name}: {argv_[-1]} exists, kept")
            continue
        print("cntk-engine " + " ".join(argv_), flush=True)
        rc = cli_main(argv_)
        if rc != 0:
            raise SystemExit(f"{name} failed (exit {rc})")
    md = Path(args.out_dir) / f"{args.name}_table.md"
    md.write_text(table(args))
    print(md.read_text())


if __name__ == "__main__":
    main()
