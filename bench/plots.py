"""Matplotlib figures of the harness and reproduction results (PNG, no display needed).

    python -m bench.plots bench/results/harness_cpu_20261123.json   # re-plot a result file
"""
from __future__ import annotations

import json
import sys
from collections import defaultdict
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def _label(c):
    return f"{c['method']} {c['dtype']}" + (f" tile {c['tile']}" if c.get("tile") else "")


def _ok(payload):
    return [r for r in payload["results"] if r.get("status") == "ok"]


def harness_plots(payload: dict, stem) -> list[Path]:
    """One PNG, three panels: throughput vs depth per method, speed-up of the project's
    backends over each alternative, throughput vs N.  Returns the paths written."""
    rows = _ok(payload)
    if not rows:
        return []
    fig, axes = plt.subplots(1, 3, figsize=(18, 6.5))
    dev = payload.get("gpu", {}) or {}
    title = f"{payload['machine']['cpu']} ({payload['machine']['cores']} cores)"
    if dev.get("name"):
        title += f" + {dev['name']}"
    fig.suptitle(f"cntk_engine harness, {title}, commit {payload.get('commit')}", fontsize=11)

    # (a) throughput vs depth, at each method's largest N, per (size, pooling)
    ax = axes[0]
    best = {}
    for r in rows:
        c = r["config"]
        k = (_label(c), c["size"], c["pooling"], c["depth"])
        if k not in best or c["n"] > best[k]["config"]["n"]:
            best[k] = r
    series = defaultdict(list)
    for (lab, size, pool, depth), r in best.items():
        series[(lab, size, pool)].append((depth, r["unique_pairs_per_s"]))
    for (lab, size, pool), pts in sorted(series.items()):
        pts.sort()
        ax.plot([p[0] for p in pts], [p[1] for p in pts], "o-", label=f"{lab}, {size}x{size} {pool}")
    ax.set_yscale("log")
    ax.set_xlabel("depth (conv layers + 1)")
    ax.set_ylabel("unique pairs / s")
    ax.set_title("throughput vs depth")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7)

    # (b) speed-up of each project backend (its first dtype in the run) over every other method
    ax = axes[1]
    project = {"numba", "cuda"}
    primary = {}
    for r in rows:
        c = r["config"]
        if c["method"] in project:
            primary.setdefault(c["method"], _label(c))
    bars = defaultdict(dict)   # (fast label, alt label, size, pool) -> {depth: ratio}
    for (lab, size, pool, depth), r in best.items():
        if lab not in primary.values():
            continue
        for (lab2, size2, pool2, depth2), r2 in best.items():
            if (size2, pool2, depth2) != (size, pool, depth) or \
                    r2["config"]["method"] == r["config"]["method"]:
                continue
            bars[(lab, lab2, size, pool)][depth] = r["unique_pairs_per_s"] / r2["unique_pairs_per_s"]
    depths = sorted({d for v in bars.values() for d in v})
    width = 0.8 / max(1, len(bars))
    for i, ((lab, lab2, size, pool), v) in enumerate(sorted(bars.items())):
        xs = [depths.index(d) + i * width for d in sorted(v)]
        ys = [v[d] for d in sorted(v)]
        ax.bar(xs, ys, width, label=f"{lab} / {lab2} ({size}x{size} {pool})")
        for xx, yy in zip(xs, ys):
            ax.text(xx, yy, f"{yy:.3g}", ha="center", va="bottom", fontsize=6)
    ax.set_xticks([j + 0.4 - width / 2 for j in range(len(depths))])
    ax.set_xticklabels([str(d) for d in depths])
    ax.set_yscale("log")
    ax.axhline(1.0, color="k", lw=0.8)
    ax.set_xlabel("depth")
    ax.set_ylabel("speed-up (unique pairs/s ratio)")
    ax.set_title("speed-up over each alternative (same depth, size)")
    ax.legend(fontsize=6, loc="upper left", bbox_to_anchor=(0, -0.13), ncol=2)

    # (c) scaling with N
    ax = axes[2]
    scal = defaultdict(list)
    for r in rows:
        c = r["config"]
        scal[(_label(c), c["size"], c["pooling"], c["depth"])].append((c["n"], r["unique_pairs_per_s"]))
    drawn = 0
    for k, pts in sorted(scal.items()):
        if len(pts) < 2:
            continue
        pts.sort()
        ax.plot([p[0] for p in pts], [p[1] for p in pts], "o-", label=f"{k[0]}, {k[1]}x{k[1]} {k[2]} d{k[3]}")
        drawn += 1
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("N images (symmetric Gram, N(N+1)/2 pairs)")
    ax.set_ylabel("unique pairs / s")
    ax.set_title("scaling with N" + ("" if drawn else " (run with --n a,b,c)"))
    ax.grid(True, which="both", alpha=0.3)
    if drawn:
        ax.legend(fontsize=7)
    fig.tight_layout()
    path = Path(str(stem) + ".png")
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return [path]


def small_data_plot(payload: dict, path) -> Path:
    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    for kname, rows in payload["accuracy"].items():
        ns = [r["n_train"] for r in rows]
        ax.errorbar(ns, [100 * r["mean"] for r in rows], yerr=[100 * r["std"] for r in rows],
                    marker="o", capsize=3, label=kname)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("training images")
    ax.set_ylabel(f"test accuracy (%), mean +- std over draws (n_test={payload['n_test']})")
    ax.set_title(payload.get("title", "small-data CIFAR-10"), fontsize=9)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return Path(path)


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    for f in argv:
        payload = json.loads(Path(f).read_text())
        if payload.get("kind") == "harness":
            for p in harness_plots(payload, Path(f).with_suffix("")):
                print(f"wrote {p}")
        elif payload.get("kind") == "small_data":
            print(f"wrote {small_data_plot(payload, Path(f).with_suffix('.png'))}")


if __name__ == "__main__":
    main()
