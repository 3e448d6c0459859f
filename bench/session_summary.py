"""The last phase of tools/gpu/gpu_session.sh: what ran, and the measurements against the
targets of issue #16, from the harness's result file and the script's phase records.

    python -m bench.session_summary HARNESS.json [--phases PHASES.tsv] [--out SUMMARY.json]

Prints a table of the phases (status, seconds, reason), one line per harness result and one
per target; writes them as JSON with ``--out``.  A target is "met", "not met", "not
measured" (with the reason: no such result in the file, or the result not OK), "unchecked" (a
throughput whose float32 result has no passing check against float64, or a ratio to
neural-tangents whose kernel disagrees with ours: the figure of a kernel not shown to be right is
not a measurement of the target) or "incomplete" (the float32 target where some float32
configuration failed, went unchecked or is missing from the file, or where the bench or the tests
phase failed or was stopped at its limit); nothing is estimated.  A failed or stopped bench or
tests phase is named in every target's detail.  The targets (to be measured on an H100 / H200):

* the default CUDA kernel, CNTK-GAP depth 21, 32x32x3, float32: >= 20,000 unique pairs/s;
* the default CUDA kernel, Myrtle-10, float32: >= 40,000 unique pairs/s;
* against neural-tangents on the same GPU (our unique pairs/s over the pairs it evaluated per
  second, as the harness's speed-up plot compares them): >= 20x at CNTK-GAP depth 21 and
  >= 10x on Myrtle-10;
* float32 within 1e-4 of the float64 reference for every CUDA kernel variant (the harness's
  ``check`` of each float32 cuda result against the float64 reference configuration), every
  configuration that any variant ran present for every variant that runs that kernel (v7 and v8
  have no stack kernel of their own: their ``base``'s runs), and the per-layer baseline, an
  independent implementation checked against the same float64 reference, within 1e-4 of it.

The paper's code (method ``paper_code``) is reported beside them: its agreement with our
float64 kernels and our speed-up over it per pair; the issue sets no number for these.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from .common import is_default_variant

PAIRS_DEPTH21 = 20_000
PAIRS_MYRTLE10 = 40_000
NT_DEPTH21 = 20.0
NT_MYRTLE10 = 10.0
FLOAT32_TOL = 1e-4


def _cfg(c, field, default):
    return c.get(field, default)


def _variant(r):
    """The CUDA kernel variant of a result (in its config, or beside it in older files)."""
    return r["config"].get("cuda_kernel") or r.get("cuda_kernel")


def _matches(r, method, arch="cnn", depth=None, dtype="float32", variant=None, pooling="gap"):
    c = r["config"]
    return (c["method"] == method and _cfg(c, "architecture", "cnn") == arch
            and (depth is None or c["depth"] == depth) and c["dtype"] == dtype
            and c.get("pooling") == pooling and not _cfg(c, "fix", False) and c.get("size") == 32
            and (variant is None or _variant(r) == variant))


def _best(rows):
    """The OK record of the largest N (the harness's plots read the same one)."""
    ok = [r for r in rows if r.get("status") == "ok"]
    return max(ok, key=lambda r: r["config"]["n"]) if ok else None


def _why_not(rows, what):
    if not rows:
        return f"not measured: the file has no {what} result"
    r = rows[0]
    return f"not measured: {what} is {r.get('status')}: {r.get('reason')}"


def default_variant(payload, dtype: str = "float32") -> str | None:
    for v in payload.get("cuda_kernels") or []:
        if is_default_variant(v, dtype):
            return v["name"]
    return None


def _check_problem(r) -> str | None:
    """None where the float32 result ``r`` passed its check against a float64 result (within
    FLOAT32_TOL, every entry finite); else what is wrong with it."""
    chk = r.get("check") or {}
    if chk.get("non_finite_entries"):
        return f"has {chk['non_finite_entries']} non-finite entries"
    d = chk.get("max_rel_diff")
    if d is None or not str(chk.get("vs", "")).endswith("float64"):
        return "was not checked against a float64 result" + (f" ({chk['unavailable']})" if chk.get("unavailable") else "")
    if d > FLOAT32_TOL:
        return f"is {d:.1e} from the float64 result (> {FLOAT32_TOL:g})"
    return None


def _label(r) -> str:
    c = r["config"]
    return f"{_cfg(c, 'architecture', 'cnn')} d{c['depth']} N={c['n']}"


def _target(name, value, bound, unit, rows, what):
    if value is None:
        return {"target": name, "status": "not measured", "detail": _why_not(rows, what)}
    met = value >= bound
    return {"target": name, "status": "met" if met else "not met", "value": value, "bound": bound,
            "detail": f"{value:,.1f} {unit} (target >= {bound:,.0f})"}


def _missing_float32(payload, variants) -> list[str]:
    """The float32 cuda configurations the file holds for some variant but not for another that
    runs the same kernel (a bench process stopped at the phase's limit leaves its variant's out;
    pooled stacks run on the variants with a stack kernel of their own, ``base``)."""
    own = {k["name"] for k in payload.get("cuda_kernels") or [] if k.get("base", k["name"]) == k["name"]}
    ran = {}
    for r in payload.get("results", []):
        c = r["config"]
        if c["method"] == "cuda" and c["dtype"] == "float32":
            key = (_cfg(c, "architecture", "cnn"), c["depth"], c.get("pooling"), bool(_cfg(c, "fix", False)))
            ran.setdefault(key, set()).add(_variant(r))
    missing = []
    for (arch, depth, pooling, fix), have in ran.items():
        for v in variants:
            if v not in have and (arch == "cnn" or v in own):
                missing.append(f"{v} {arch} d{depth} {pooling}{' fix' if fix else ''} not in the file")
    return missing


def _independent_problems(payload) -> list[str]:
    """The per-layer baseline's results (an implementation that shares no code with the CUDA
    kernels) more than FLOAT32_TOL from the cuda float64 result they were checked against."""
    out = []
    for r in payload.get("results", []):
        c, chk = r["config"], r.get("check") or {}
        if not c["method"].startswith("per_layer") or r.get("status") != "ok" or not chk:
            continue
        d = chk.get("max_rel_diff")
        if chk.get("non_finite_entries") or (d is not None and d > FLOAT32_TOL):
            what = (f"{chk['non_finite_entries']} non-finite entries" if chk.get("non_finite_entries")
                    else f"{d:.1e} from it")
            out.append(f"the per-layer baseline ({c['method']} {_label(r)} {c['dtype']}) disagrees with "
                       f"{str(chk.get('vs', '?')).split(',')[0]}: {what}")
    return out


def _phase_caveats(phases) -> list[str]:
    """The bench and tests phases that failed or were stopped at their limit."""
    return [f"the {p['phase']} phase {p['status'].replace('_', ' ')}" for p in phases or []
            if p["phase"] in ("bench", "tests") and p["status"] in ("failed", "timed_out")]


def targets(payload, phases=None) -> list[dict]:
    """The issue's targets, each met / not met / not measured / unchecked / incomplete (the module
    docstring says when), from a harness payload and gpu_session.sh's phase records
    (``read_phases``).  For the float32 target a configuration that is not OK (failed,
    unavailable, timed out) counts as not checked: "incomplete"."""
    out = _targets(payload)
    caveats = _phase_caveats(phases)
    for t in out:
        if caveats:
            t["detail"] += f" [{'; '.join(caveats)}]"
    if caveats and out[-1]["status"] == "met":           # the float32 target
        out[-1]["status"] = "incomplete"
    # its checks compare each variant's float32 with its own float64: that the float64 kernels
    # agree with the CPU reference is what the tests phase checks (here or in an earlier call)
    if phases is not None and out[-1]["status"] == "met" and not any(
            p["phase"] == "tests" and p["status"] == "ok" for p in phases):
        out[-1]["detail"] += (" [the cuda float64 results these checks take as the reference were "
                              "not checked against the CPU's: the tests phase did not pass in this call]")
    return out


def _targets(payload) -> list[dict]:
    res = payload.get("results", [])
    dv = default_variant(payload)
    out = []
    if dv is None:
        why = "not measured: the run had no CUDA extension (no kernel variants recorded)"
        for name in ("cuda default kernel, CNTK-GAP depth 21 float32 >= 20,000 unique pairs/s",
                     "cuda default kernel, Myrtle-10 float32 >= 40,000 unique pairs/s",
                     "vs neural-tangents, CNTK-GAP depth 21 >= 20x", "vs neural-tangents, Myrtle-10 >= 10x"):
            out.append({"target": name, "status": "not measured", "detail": why})
    else:
        for arch, depth, bound, ntb in (("cnn", 21, PAIRS_DEPTH21, NT_DEPTH21), ("myrtle10", 10, PAIRS_MYRTLE10, NT_MYRTLE10)):
            where = "CNTK-GAP depth 21" if arch == "cnn" else "Myrtle-10"
            ours_rows = [r for r in res if _matches(r, "cuda", arch, depth, variant=dv)]
            ours = _best(ours_rows)
            t = _target(f"cuda default kernel ({dv}), {where} float32 >= {bound:,} unique pairs/s",
                        ours and ours["unique_pairs_per_s"], bound, "unique pairs/s", ours_rows,
                        f"cuda {dv} {where} float32")
            if ours is not None and "unique_pairs_per_s_beyond_preparation" in ours:
                # at a bench's N the images' preparation weighs; at a full Gram's it does not
                t["detail"] += (f"; {ours['unique_pairs_per_s_beyond_preparation']:,.1f} beyond the "
                                f"images' preparation ({ours['preparation_s']:.3g} s of "
                                f"{ours['seconds']:.3g} s at N = {ours['config']['n']})")
            ours_problem = _check_problem(ours) if ours is not None else None
            if ours_problem:
                t.update(status="unchecked", detail=f"{ours['unique_pairs_per_s']:,.1f} unique pairs/s, but the "
                                                    f"result {ours_problem}")
            # every variant's figure beside the default's: a candidate that meets the target is
            # what the next default could be (it becomes the default on its figures at every depth)
            rates = {}
            for v in (k["name"] for k in payload.get("cuda_kernels") or []):
                b = _best([r for r in res if _matches(r, "cuda", arch, depth, variant=v)])
                if b is not None and not _check_problem(b):      # a variant's figure counts once right
                    rates[v] = b["unique_pairs_per_s"]
            if rates:
                t["per_variant"] = rates
                fastest = max(rates, key=rates.get)
                if fastest != dv:
                    t["detail"] += (f"; fastest variant {fastest}: {rates[fastest]:,.1f} unique pairs/s "
                                    f"({'meets' if rates[fastest] >= bound else 'misses'} the target)")
            out.append(t)
            nt_rows = [r for r in res if _matches(r, "neural_tangents", arch, depth)]
            nt = _best(nt_rows)
            name = f"vs neural-tangents on the same GPU, {where} >= {ntb:.0f}x"
            if ours is None:
                out.append({"target": name, "status": "not measured",
                            "detail": _why_not(ours_rows, f"cuda {dv} {where} float32")})
            elif nt is None:
                out.append({"target": name, "status": "not measured",
                            "detail": _why_not(nt_rows, f"neural-tangents {where}")})
            elif nt.get("device") != ours.get("device"):
                out.append({"target": name, "status": "not measured",
                            "detail": f"neural-tangents ran on the {nt.get('device')}, not on the GPU"})
            else:
                ratio = ours["unique_pairs_per_s"] / nt["pairs_evaluated_per_s"]
                t = _target(name, ratio, ntb, "x", [nt], "neural-tangents")
                sizes = (f" (ours at N = {ours['config']['n']}, neural-tangents at N = "
                         f"{nt['config']['n']}, per pair each computes)")
                t["detail"] += sizes
                why = [f"ours {ours_problem}"] if ours_problem else []
                nchk = nt.get("check") or {}
                if nchk.get("non_finite_entries") or nchk.get("max_rel_diff") is None:
                    why.append("neural-tangents' kernel was not checked against ours"
                               + (f" ({nchk['non_finite_entries']} non-finite entries)"
                                  if nchk.get("non_finite_entries") else ""))
                elif nchk["max_rel_diff"] > FLOAT32_TOL:     # it computed another kernel
                    why.append(f"neural-tangents' kernel is {nchk['max_rel_diff']:.1e} from ours "
                               f"(> {FLOAT32_TOL:g})")
                if why:
                    t.update(status="unchecked", detail=f"{ratio:,.1f} x{sizes}, but " + "; ".join(why))
                out.append(t)
    # float32 vs the float64 reference, every variant
    variants = [v["name"] for v in payload.get("cuda_kernels") or []]
    f32 = [r for r in res if r["config"]["method"] == "cuda" and r["config"]["dtype"] == "float32"]
    name = f"float32 within {FLOAT32_TOL:g} of the float64 reference, every CUDA kernel variant"
    if not variants:
        out.append({"target": name, "status": "not measured",
                    "detail": "not measured: the run had no CUDA extension (no kernel variants recorded)"})
    else:
        worst, bad, unfinished = {}, [], []
        for v in variants:
            rows = [r for r in f32 if _variant(r) == v]
            for r in rows:
                problem = None if r.get("status") != "ok" else _check_problem(r)
                chk = r.get("check") or {}
                if r.get("status") != "ok":
                    unfinished.append(f"{v} {_label(r)} {r.get('status')}")
                elif problem is None:
                    worst[v] = max(worst.get(v, 0.0), chk["max_rel_diff"])
                elif chk.get("non_finite_entries") or (chk.get("max_rel_diff") or 0) > FLOAT32_TOL:
                    bad.append(f"{v} {_label(r)} {problem}")        # checked, and wrong
                else:
                    unfinished.append(f"{v} {_label(r)} {problem}")  # not checked
        unfinished += _missing_float32(payload, variants)
        bad += _independent_problems(payload)
        missing = [v for v in variants if v not in worst]
        checked = ", ".join(f"{v} {d:.1e}" for v, d in worst.items())
        if bad:
            out.append({"target": name, "status": "not met", "per_variant": worst,
                        "detail": "; ".join(bad) + (f" (checked within: {checked})" if checked else "")})
        elif missing:
            out.append({"target": name, "status": "not measured",
                        "detail": f"not measured: no float32 cuda result of {', '.join(missing)} passed a check "
                                  "against a float64 configuration"
                                  + (f" ({'; '.join(unfinished)})" if unfinished else "")})
        elif unfinished:
            out.append({"target": name, "status": "incomplete", "value": max(worst.values()), "bound": FLOAT32_TOL,
                        "per_variant": worst, "detail": f"{checked} (target <= {FLOAT32_TOL:g}); not every float32 "
                                                        f"configuration checked: {'; '.join(unfinished)}"})
        else:
            top = max(worst.values())
            out.append({"target": name, "status": "met", "value": top, "bound": FLOAT32_TOL, "per_variant": worst,
                        "detail": f"{checked} (target <= {FLOAT32_TOL:g}; every float32 configuration checked)"})
    return out


def paper_report(payload) -> list[dict]:
    """The paper's code: per configuration, the value check and our speed-up per pair (over the
    OK cuda float32 result of the default kernel variant, largest N, with the same depth, readout
    and fix), when measured."""
    res = payload.get("results", [])
    dv = default_variant(payload)
    out = []
    for r in res:
        c = r["config"]
        if c["method"] != "paper_code":
            continue
        row = {"depth": c["depth"], "pooling": c["pooling"], "fix": bool(c.get("fix")), "n": c["n"],
               "status": r.get("status")}
        chk = r.get("check", {})
        if "max_rel_diff_distinct_pairs" in chk:
            row.update({k: chk[k] for k in ("max_rel_diff_distinct_pairs", "max_rel_diff_self_pairs",
                                            "non_finite_entries", "agree_distinct_pairs", "agree_all_entries")})
        if r.get("status") == "ok":
            row["pairs_per_s"] = r["pairs_evaluated_per_s"]
            ours = _best([q for q in res if q["config"]["method"] == "cuda" and q["config"]["dtype"] == "float32"
                          and q["config"]["depth"] == c["depth"] and q["config"]["pooling"] == c["pooling"]
                          and bool(q["config"].get("fix")) == bool(c.get("fix"))
                          and q["config"].get("architecture", "cnn") == "cnn"
                          and _variant(q) == dv])
            if ours is not None:
                row["speedup"] = ours["unique_pairs_per_s"] / r["pairs_evaluated_per_s"]
                row["vs"] = f"cuda {dv} float32 N={ours['config']['n']}"
        else:
            row["reason"] = r.get("reason")
        out.append(row)
    return out


def read_phases(path) -> list[dict]:
    """gpu_session.sh's phase records: name, status, seconds, limit, reason (tab-separated)."""
    rows = []
    for line in Path(path).read_text().splitlines():
        if not line.strip():
            continue
        name, status, seconds, limit, reason = (line.split("\t") + [""] * 5)[:5]
        rows.append({"phase": name, "status": status, "seconds": int(seconds or 0),
                     "limit": int(limit) if limit else None, "reason": reason})
    return rows


METHOD_ORDER = ("cuda", "numba", "reference", "per_layer_cuda", "per_layer_cpu", "paper_code", "neural_tangents")


def _order(r):
    c = r["config"]
    m = c["method"]
    return (METHOD_ORDER.index(m) if m in METHOD_ORDER else len(METHOD_ORDER), m,
            str(_variant(r) or ""), c.get("architecture", "cnn") != "cnn",
            c["depth"], c["pooling"], bool(c.get("fix")), c["dtype"], c["n"])


def result_lines(payload) -> list[str]:
    """One line per harness result, grouped by method, variant, network, depth."""
    lines = []
    for r in sorted(payload.get("results", []), key=_order):
        c = r["config"]
        what = " ".join(str(p) for p in (c["method"], _variant(r) or "",
                                         c.get("architecture", "cnn"), f"d{c['depth']}", c["pooling"],
                                         "fix" if c.get("fix") else "", c["dtype"], f"N={c['n']}") if p != "")
        if r.get("status") == "ok":
            s = f"{r['unique_pairs_per_s']:12,.1f} unique pairs/s"
            if r.get("pairs_evaluated") not in (None, r.get("unique_pairs")):
                s += f" ({r['pairs_evaluated_per_s']:,.1f} pairs evaluated/s)"
        else:
            s = f"{r.get('status')}: {str(r.get('reason'))[:110]}"
        chk = r.get("check", {})
        if "max_rel_diff_distinct_pairs" in chk:
            s += f"  [vs ours float64: {chk['max_rel_diff_distinct_pairs']:.1e} distinct, " \
                 f"{chk['max_rel_diff_self_pairs']:.1e} self pairs]"
        elif chk.get("non_finite_entries"):
            s += f"  [vs {chk['vs'].split(',')[0]}: {chk['non_finite_entries']} NON-FINITE entries]"
        elif "max_rel_diff" in chk:
            s += f"  [vs {chk['vs'].split(',')[0]}: {chk['max_rel_diff']:.1e}]"
        lines.append(f"  {what:48s} {s}")
    return lines


def summarize(harness: Path | None, phases: Path | None) -> dict:
    out = {"harness": str(harness) if harness else None}
    if phases is not None and phases.exists():
        out["phases"] = read_phases(phases)
    payload = None
    if harness is not None and harness.exists():
        try:
            payload = json.loads(harness.read_text())
        except ValueError as e:
            out["harness_error"] = f"cannot read {harness}: {e}"
    elif harness is not None:
        out["harness_error"] = f"{harness}: no such file (no harness phase wrote it)"
    if payload is not None:
        out["commit"], out["date"] = payload.get("commit"), payload.get("date")
        out["gpu"] = payload.get("gpu")
        out["cuda_kernels"] = payload.get("cuda_kernels")
        out["targets"] = targets(payload, out.get("phases"))
        out["paper_code"] = paper_report(payload)
        out["result_lines"] = result_lines(payload)
    return out


def print_summary(s: dict) -> None:
    if "phases" in s:
        print("phases:")
        for p in s["phases"]:
            lim = f"/{p['limit']}s" if p.get("limit") else ""
            print(f"  {p['phase']:10s} {p['status']:12s} {p['seconds']:5d}s{lim:7s} {p['reason']}")
    if "harness_error" in s:
        print(s["harness_error"])
    if "result_lines" in s:
        g = s.get("gpu") or {}
        print(f"results ({s['harness']}; GPU: {g.get('name', 'none')}; commit {s.get('commit')}, "
              f"{s.get('date')}):")
        print("\n".join(s["result_lines"]))
    if s.get("paper_code"):
        print("the paper's code (github.com/ruosongwang/CNTK) vs ours:")
        for p in s["paper_code"]:
            line = f"  d{p['depth']} {p['pooling']}{' fix' if p['fix'] else ''} N={p['n']}: {p['status']}"
            if "max_rel_diff_distinct_pairs" in p:
                line += (f", values: distinct pairs {p['max_rel_diff_distinct_pairs']:.1e}, self pairs "
                         f"{p['max_rel_diff_self_pairs']:.1e}, non-finite {p['non_finite_entries']}")
            if "speedup" in p:
                line += f", ours {p['speedup']:,.0f}x faster per pair ({p['vs']})"
            if "reason" in p and "max_rel_diff_distinct_pairs" not in p:
                line += f" ({str(p['reason'])[:120]})"
            print(line)
    if "targets" in s:
        print("targets (issue #16):")
        for t in s["targets"]:
            print(f"  [{t['status']}] {t['target']}: {t['detail']}")


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("harness", type=Path, help="the harness result file of the session")
    ap.add_argument("--phases", type=Path, default=None, help="gpu_session.sh's phase records (TSV)")
    ap.add_argument("--out", type=Path, default=None, help="write the summary as JSON here")
    from .common import run_main
    return run_main(ap, run, argv)


def run(args) -> dict:
    from .common import ScriptError, check_out_file
    if args.out:
        check_out_file(args.out, "--out")
    try:
        s = summarize(args.harness, args.phases)
        print_summary(s)
    except (KeyError, TypeError, AttributeError, IndexError, ValueError) as e:
        raise ScriptError(f"HARNESS {args.harness}: not a harness result file it can summarise "
                          f"({type(e).__name__}: {e})") from None
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(s, indent=1))
        print(f"wrote {args.out}")
    return s


if __name__ == "__main__":
    main()
