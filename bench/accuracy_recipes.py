"""Test accuracy of the kernel recipes on a CIFAR-10 subset: CNTK-GAP, + flip, + ZCA, LAP,
Myrtle (+ ZCA + flip), NTK and NNGP, with ``cntk-engine evaluate``; one table.

    python bench/accuracy_recipes.py --data ../shared/data/cifar10_jpeg_small.npz \
        --n-train 500 --n-test 500 [--only gap,myrtle5] [--out-dir bench/results] \
        [--store-dir runs/kernels]

Each configuration is one ``cntk-engine evaluate`` command (printed, and stored in its JSON):
the same training and test images for all (``--seed``), NTK and NNGP from one kernel pass,
the ridge chosen by leave-one-out.  A configuration whose JSON exists is not run again, so an
interrupted run resumes; ``<name>_table.md`` collects what exists.  An existing JSON computed
with other settings (its recorded command: --data, --n-train, --n-test, --seed, --backend or the
configuration's options) is refused before anything runs: give another --name or --out-dir, or
remove the file.  With ``--store-dir DIR``
each configuration keeps its kernels in ``DIR/<name>_<configuration>`` (``evaluate --store
... --resume``), so a configuration that was interrupted (hours, on the CPU) continues from its
finished tiles instead of starting again.
"""
from __future__ import annotations

import argparse
import json
import shlex
import sys
from pathlib import Path

if __package__ in (None, ""):
    sys.path.append(str(Path(__file__).resolve().parents[1]))
from bench.common import (BACKENDS, RESULTS, ScriptError, check_out_dir, choice_list,  # noqa: E402
                          existing_file, int_at_least, made_folders, run_main)

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


#: evaluate options that say where results go, not what they are: left out of the comparison
OUTPUT_OPTIONS = {"--json": 1, "--store": 1, "--resume": 0, "--no-progress": 0}


def settings(argv) -> dict:
    """{option: value} of an evaluate command line (a list of words after ``cntk-engine``),
    without the OUTPUT_OPTIONS; DATA as its resolved path under ``--data``."""
    words = list(argv)[1:]
    out = {"--data": str(Path(words[0]).resolve())} if words else {}
    i = 1
    while i < len(words):
        w = words[i]
        if w in OUTPUT_OPTIONS:
            i += 1 + OUTPUT_OPTIONS[w]
            continue
        has_value = i + 1 < len(words) and not words[i + 1].startswith("--")
        out[w] = words[i + 1] if has_value else True
        i += 2 if has_value else 1
    return out


def check_existing(name, args) -> bool:
    """Whether the configuration's JSON exists and holds results of this run's settings (to be
    kept); ScriptError when it holds another run's (it would be shown as this run's)."""
    out = Path(command(name, args)[-1])
    if not out.exists():
        return False
    fix = f"give another --name or --out-dir, or remove {out} to compute it again"
    try:
        rec = json.loads(out.read_text())
        recorded = shlex.split(rec["command"])
        if recorded[:2] != ["cntk-engine", "evaluate"]:
            raise ValueError(rec["command"])
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ScriptError(f"--out-dir {args.out_dir}: {out.name} exists and is not a result of cntk-engine "
                          f"evaluate ({type(e).__name__}); {fix}") from None
    theirs, mine = settings(recorded[1:]), settings(command(name, args))
    differ = [f"{k} {theirs.get(k, 'left out') if theirs.get(k) is not True else 'given'} there, "
              f"{mine.get(k, 'left out') if mine.get(k) is not True else 'given'} now"
              for k in dict.fromkeys([*mine, *theirs]) if theirs.get(k) != mine.get(k)]
    if differ:
        raise ScriptError(f"--out-dir {args.out_dir}: {out.name} holds results computed with other "
                          f"settings ({'; '.join(differ)}); {fix}")
    return True


def evaluate(name, argv_) -> None:
    """``cntk-engine evaluate`` with ``argv_``; its refusal is a ScriptError naming this
    script's options (DATA is --data; the stores are in --store-dir)."""
    from cntk_engine.cli import build_parser
    from cntk_engine.cli.common import CliError
    from cntk_engine.spelling import command_line
    ns = build_parser().parse_args(argv_)       # the script's own checks made it valid
    ns.argv = list(argv_)                       # the command its JSON records
    try:
        with command_line(ns.python_options):
            rc = ns.func(ns)
    except (CliError, ValueError) as e:
        text = str(e).replace("DATA ", "--data ").replace("--store ", "--store-dir's folder ")
        raise ScriptError(f"configuration {name}: {text}") from None
    if rc:
        raise ScriptError(f"configuration {name}: cntk-engine evaluate ended with exit status {rc}")


def run(args):
    check_out_dir(args.out_dir, "--out-dir")
    if args.store_dir is not None:
        check_out_dir(args.store_dir, "--store-dir")
    kept = {name: check_existing(name, args) for name in args.only}     # before anything runs
    with made_folders(args.out_dir, args.store_dir):
        for name in args.only:
            argv_ = command(name, args)
            if kept[name]:
                print(f"{name}: {argv_[-1]} exists (same settings), kept")
                continue
            print("cntk-engine " + " ".join(argv_), flush=True)
            evaluate(name, argv_)
    md = Path(args.out_dir) / f"{args.name}_table.md"
    md.write_text(table(args))
    print(md.read_text())


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=existing_file, required=True, help="CIFAR-10 subset .npz")
    ap.add_argument("--n-train", type=int_at_least(2), default=500)
    ap.add_argument("--n-test", type=int_at_least(1), default=500)
    ap.add_argument("--seed", type=int_at_least(0), default=0)
    ap.add_argument("--backend", default="auto", choices=BACKENDS)
    ap.add_argument("--only", type=choice_list(CONFIGS), default=",".join(CONFIGS))
    ap.add_argument("--out-dir", default=str(RESULTS))
    ap.add_argument("--name", default="accuracy_recipes")
    ap.add_argument("--store-dir", default=None, metavar="DIR",
                    help="keep each configuration's kernels in DIR/<name>_<configuration> (resumable)")
    return run_main(ap, run, argv)


if __name__ == "__main__":
    main()
