"""Matplotlib figures of the harness and reproduction results (PNG, no display needed).

    python -m bench.plots bench/results/harness_cpu_20261123.json   # re-plot a result file
"""
from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def _label(c, rec=None):
    """'cuda v5 float32', 'paper_code fix float32', 'neural_tangents myrtle10 float32': the
    method, the CUDA kernel variant (the config's, else the one the record says ran), the
    architecture unless the CNN, fix, dtype, tile.  Result files written before these fields
    existed give the labels they always had."""
    variant = c.get("cuda_kernel") or (rec or {}).get("cuda_kernel")
    arch = c.get("architecture", "cnn")
    parts = [c["method"]] + ([variant] if variant else []) + ([arch] if arch != "cnn" else []) \
        + (["fix"] if c.get("fix") else []) + [c["dtype"]]
    return " ".join(parts) + (f" tile {c['tile']}" if c.get("tile") else "")


def _column(c):
    """Where a configuration sits on the depth axis: its depth for the CNN, the preset's name
    (e.g. 'myrtle10') for a Myrtle network."""
    arch = c.get("architecture", "cnn")
    return c["depth"] if arch == "cnn" else arch


def _column_order(v):
    return (isinstance(v, str), v if not isinstance(v, str) else 0, str(v))


def _ok(payload):
    return [r for r in payload["results"] if r.get("status") == "ok"]


PROJECT = ("cuda", "numba")   # the project's backends, fastest first


def _per_pair_rate(r) -> float:
    """An alternative's rate per pair it computed: ``pairs_evaluated_per_s`` when the record has
    it (a method that computes all N^2 ordered pairs is not charged for the duplicates), else
    unique pairs/s (result files without that field)."""
    return r.get("pairs_evaluated_per_s") or r["unique_pairs_per_s"]


def _primary_label(lab: str, r: dict) -> str:
    """A project backend's label without the architecture: one primary covers every network."""
    arch = r["config"].get("architecture", "cnn")
    return lab.replace(f" {arch} ", " ") if arch != "cnn" else lab


def _speedups(best: dict) -> dict:
    """(fast label, slow label, size, pooling) -> {column: our unique pairs/s / the other's
    pairs evaluated/s} (a per-pair comparison; ``_per_pair_rate``).  ``best`` is keyed
    (label, size, pooling, column), the column being the depth of a CNN configuration or the
    name of a Myrtle preset (``_column``).

    For each project backend and CUDA kernel variant, its float32 configuration without fix
    (else its first; its "primary" configuration) is compared with every configuration of the alternatives (per-layer
    baselines, reference, neural-tangents, the paper's code) that ran on the same kind of
    device with the same fix setting, and with the primary of each slower project backend
    (cuda over numba); never the other way round, so every bar reads "how many times faster is
    ours"."""
    primary = {}
    for (lab, size, pool, depth), r in best.items():
        c = r["config"]
        m = c["method"]
        if m in PROJECT:
            k = (m, c.get("cuda_kernel") or r.get("cuda_kernel"))
            preferred = c["dtype"] == "float32" and not c.get("fix")
            if k not in primary or (preferred and not primary[k][1]):
                primary[k] = (_primary_label(lab, r), preferred)
    primary = {k: lab for k, (lab, _) in primary.items()}
    bars = defaultdict(dict)
    for (m, _), plab in primary.items():
        slower = {lab for (s, _), lab in primary.items() if s in PROJECT[PROJECT.index(m) + 1:]}
        for (lab1, size, pool, depth), r in best.items():
            if _primary_label(lab1, r) != plab:
                continue
            for (lab2, size2, pool2, depth2), r2 in best.items():
                m2 = r2["config"]["method"]
                if (size2, pool2, depth2) != (size, pool, depth):
                    continue
                if bool(r2["config"].get("fix")) != bool(r["config"].get("fix")):
                    continue
                if m2 in PROJECT and _primary_label(lab2, r2) not in slower:
                    continue
                if m2 not in PROJECT and r.get("device") and r2.get("device") \
                        and r["device"] != r2["device"]:
                    continue   # a CPU backend over a GPU baseline says nothing about either
                bars[(plab, _primary_label(lab2, r2), size, pool)][depth] = \
                    r["unique_pairs_per_s"] / _per_pair_rate(r2)
    return bars


def harness_plots(payload: dict, stem) -> list[Path]:
    """One PNG: throughput vs depth per method, speed-up of the project's backends over each
    alternative, and (when the run has several N) throughput vs N.  Returns the paths written."""
    rows = _ok(payload)
    if not rows:
        return []
    scal = defaultdict(list)
    for r in rows:
        c = r["config"]
        scal[(_label(c, r), c["size"], c["pooling"], c["depth"])].append((c["n"], r["unique_pairs_per_s"]))
    scal = {k: sorted(v) for k, v in scal.items() if len(v) >= 2}
    npanels = 3 if scal else 2
    fig, axes = plt.subplots(1, npanels, figsize=(6.2 * npanels, 6.5))
    dev = payload.get("gpu", {}) or {}
    title = f"{payload['machine']['cpu']} ({payload['machine']['cores']} cores)"
    if dev.get("name"):
        title += f" + {dev['name']}"
    commit = str(payload.get("commit") or "unknown").split()[0]
    fig.suptitle(f"cntk_engine harness, {title}, commit {commit}", fontsize=11)

    # (a) throughput vs depth, at each method's largest N, per (size, pooling)
    ax = axes[0]
    best = {}
    for r in rows:
        c = r["config"]
        k = (_label(c, r), c["size"], c["pooling"], _column(c))
        if k not in best or c["n"] > best[k]["config"]["n"]:
            best[k] = r
    series = defaultdict(list)
    for (lab, size, pool, _), r in best.items():
        series[(lab, size, pool)].append((r["config"]["depth"], r["unique_pairs_per_s"], r["config"]["n"]))
    for (lab, size, pool), pts in sorted(series.items()):
        pts.sort()
        ns = sorted({p[2] for p in pts})
        ax.plot([p[0] for p in pts], [p[1] for p in pts], "o-",
                label=f"{lab}, {size}x{size} {pool}, N={'/'.join(map(str, ns))}")
    ax.set_yscale("log")
    ax.set_xlabel("depth (conv layers + 1)")
    ax.set_ylabel("unique pairs / s")
    ax.set_title("throughput vs depth")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7)

    # (b) how many times faster the project's backends are than each alternative
    ax = axes[1]
    bars = _speedups(best)
    depths = sorted({d for v in bars.values() for d in v}, key=_column_order)
    width = 0.8 / max(1, len(bars))
    for i, ((lab, lab2, size, pool), v) in enumerate(sorted(bars.items())):
        cols = sorted(v, key=_column_order)
        xs = [depths.index(d) + i * width for d in cols]
        ys = [v[d] for d in cols]
        ax.bar(xs, ys, width, label=f"{lab} / {lab2} ({size}x{size} {pool})")
        for xx, yy in zip(xs, ys):
            ax.text(xx, yy, f"{yy:.3g}", ha="center", va="bottom", fontsize=6)
    if bars:
        ax.set_xticks([j + 0.4 - width / 2 for j in range(len(depths))])
        ax.set_xticklabels([str(d) for d in depths])
        ax.set_yscale("log")
        ax.legend(fontsize=6, loc="upper left", bbox_to_anchor=(0, -0.13), ncol=2)
    ax.axhline(1.0, color="k", lw=0.8)
    ax.set_xlabel("depth (CNN) or Myrtle network")
    ax.set_ylabel("speed-up: our unique pairs/s / the other's pairs evaluated/s (same run)")
    ax.set_title("speed-up over each alternative (same depth, size)"
                 + ("" if bars else ": no alternative in this run"))

    # (c) scaling with N
    if scal:
        ax = axes[2]
        for k, pts in sorted(scal.items()):
            ax.plot([p[0] for p in pts], [p[1] for p in pts], "o-",
                    label=f"{k[0]}, {k[1]}x{k[1]} {k[2]} d{k[3]}")
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("N images (symmetric Gram, N(N+1)/2 pairs)")
        ax.set_ylabel("unique pairs / s")
        ax.set_title("scaling with N")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    path = Path(str(stem) + ".png")
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return [path]


def _small_data_key(name: str):
    """'CNTK d11 loo ridge' -> ('CNTK', 11, 'loo ridge')."""
    kernel, depth, solve = name.split(" ", 2)
    return kernel, int(depth.lstrip("d")), solve


def small_data_plot(payload: dict, path) -> Path:
    """One panel per solve (paper solve, LOO ridge): colour = depth, solid = CNTK (NTK),
    dashed = CNN-GP (NNGP); mean +- std over draws against the training-set size."""
    acc = payload["accuracy"]
    keys = {name: _small_data_key(name) for name in acc}
    solves = sorted({k[2] for k in keys.values()}, key=lambda s: (s != "paper solve", s))
    depths = sorted({k[1] for k in keys.values()})
    colours = plt.get_cmap("viridis")([i / max(1, len(depths) - 1) * 0.85 for i in range(len(depths))])
    fig, axes = plt.subplots(1, len(solves), figsize=(6 * len(solves), 4.8), sharey=True, squeeze=False)
    ns_all = sorted({r["n_train"] for rows in acc.values() for r in rows})
    for ax, solve in zip(axes[0], solves):
        for name, (kernel, depth, s) in sorted(keys.items(), key=lambda kv: (kv[1][0], kv[1][1])):
            if s != solve:
                continue
            rows = acc[name]
            # CNTK and CNN-GP of one depth share an x: nudge them apart to keep both error bars visible
            nudge = 1.03 if kernel == "CNTK" else 1 / 1.03
            ax.errorbar([r["n_train"] * nudge for r in rows], [100 * r["mean"] for r in rows],
                        yerr=[100 * r["std"] for r in rows], marker="o", ms=4, capsize=2,
                        color=colours[depths.index(depth)], ls="-" if kernel == "CNTK" else "--",
                        label=f"{kernel} depth {depth}")
        ax.set_xscale("log", base=2)
        ax.set_xticks(ns_all)
        ax.set_xticklabels([str(n) for n in ns_all])
        ax.minorticks_off()
        ax.set_xlabel("training images (class-balanced draws)")
        ax.set_title(solve)
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=7)
    axes[0][0].set_ylabel(f"test accuracy (%), mean +- std over draws (n_test={payload['n_test']})")
    fig.suptitle(payload.get("title", "small-data CIFAR-10"), fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return Path(path)


def main(argv=None):
    import argparse
    ap = argparse.ArgumentParser(prog="python -m bench.plots",
                                 description="Re-draw the figures of result files (the harness's, "
                                 "small_data.py's), next to each file.")
    ap.add_argument("files", nargs="+", metavar="FILE.json")
    from .common import ScriptError, run_main

    def run(args):
        for f in args.files:
            try:
                payload = json.loads(Path(f).read_text())
            except (OSError, ValueError) as e:
                raise ScriptError(f"FILE.json {f}: not a readable result file ({type(e).__name__}: {e})") from None
            kind = payload.get("kind") if isinstance(payload, dict) else None
            try:
                if kind == "harness":
                    for p in harness_plots(payload, Path(f).with_suffix("")):
                        print(f"wrote {p}")
                elif kind == "small_data":
                    print(f"wrote {small_data_plot(payload, Path(f).with_suffix('.png'))}")
                else:
                    print(f"{f}: kind {kind!r} has no figures here (harness, small_data)")
            except (KeyError, TypeError, AttributeError, IndexError) as e:
                raise ScriptError(f"FILE.json {f}: a {kind} result file lacking what its figures need "
                                  f"({type(e).__name__}: {e})") from None
    return run_main(ap, run, argv)


if __name__ == "__main__":
    main()
