"""Static instruction mix of the CUDA pair kernel's layer loop, read off the compiled SASS.

    python tools/sass_mix.py                      # the installed extension, sm_90, float32 32x32 k=3, v3
    python tools/sass_mix.py --kernel v5          # another kernel variant (docs/cuda_kernels.md)
    python tools/sass_mix.py --so path/_cuda.so --arch sm_80 --dtype float64 --out-dir bench/results

Why: on the GPU the fused kernel is issue-bound (docs/gpu_performance.md, docs/cuda_kernels.md), so the number of instructions
its layer loop issues per entry and layer predicts its speed, and that number can be read on
any machine that compiles the kernel, with no GPU.  One iteration of the innermost loop that
holds the arccos (the MUFU instructions) is one layer of one packed offset grid: every lane (a
column) runs it once for HMAX rows, so

    slots per entry-layer  s = instructions in the loop body / HMAX

(warp instructions per 32 entries).  The loop body also holds the readout block, which runs only
at readout layers, so s slightly overstates the per-layer cost.  On a GPU that issues one warp
instruction per clock per scheduler, the FP32 FMA rate F measured by bench/ceiling.py (FMA
lane-operations/s = SMs x 4 schedulers x 32 lanes x clock) gives the issue ceiling

    pairs/s <= F / (E * L * s),   E = H^2 W^2 entries per layer (gap), L = depth - 1 layers,

which a kernel that issues every cycle reaches.  Measured pairs/s divided by this bound is the
issue efficiency: near 1 means only fewer instructions help; well below 1 means latency, occupancy
or a unit (MUFU, shuffles, memory) is the limit.

Needs cuobjdump and nvdisasm (a CUDA toolkit, or ``pip install ".[sass]"`` on Linux x86-64).
Writes <out-dir>/sass_<name>.json with the counts by instruction and by unit, the registers and
local memory of the kernel, and the predicted ceiling.
"""
from __future__ import annotations

import argparse
import collections
import json
import os
import re
import shutil
import subprocess
import sys
from functools import lru_cache
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# Which unit executes an opcode (Hopper/Ampere): enough to see where the slots go.
UNITS = {
    "fp32": {"FFMA", "FMUL", "FADD", "FMNMX", "FSEL", "FSETP", "FSET", "FCHK", "HFMA2"},
    "fp64": {"DFMA", "DMUL", "DADD", "DSETP", "DMNMX"},
    "mufu": {"MUFU"},
    "shuffle": {"SHFL"},
    "memory": {"LDG", "STG", "LDS", "STS", "LDL", "STL", "LDC", "ULDC", "LD", "ST", "ATOMS", "RED"},
    "integer": {"IMAD", "IADD3", "ISETP", "LOP3", "LEA", "SHF", "SEL", "VIADD", "IABS", "IMNMX",
                "PLOP3", "P2R", "R2P", "MOV", "UMOV", "ULEA", "UIADD3", "S2R", "S2UR", "CS2R",
                "F2F", "I2F", "F2I", "PRMT"},
    "control": {"BRA", "BSSY", "BSYNC", "WARPSYNC", "BAR", "EXIT", "NOP", "CALL", "RET"},
}
TOOLS_HELP = ("cuobjdump and nvdisasm are needed: put a CUDA toolkit's bin/ on PATH (or set "
              "CUDA_HOME), or install them with pip install \".[sass]\" (Linux x86-64)")


def find_tool(name: str) -> str | None:
    """A CUDA binary tool: PATH, $CUDA_HOME/bin, then the nvidia-cuda-<tool> wheels."""
    hit = shutil.which(name)
    if hit:
        return hit
    for home in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"):
        if home and (Path(home) / "bin" / name).is_file():
            return str(Path(home) / "bin" / name)
    try:
        import nvidia  # the namespace package of NVIDIA's pip wheels
    except ImportError:
        return None
    for base in getattr(nvidia, "__path__", []):
        for cand in sorted(Path(base).glob(f"*/bin/{name}")):
            if os.access(cand, os.X_OK):
                return str(cand)
    return None


def find_extension() -> Path | None:
    """The installed cntk_engine._cuda shared object, also when a source checkout (which has no
    compiled extension) shadows the installed package on sys.path."""
    try:
        import cntk_engine._cuda as ext
        return Path(ext.__file__)
    except ImportError:
        pass
    try:
        from importlib import metadata
        files = metadata.distribution("cntk-engine").files or []
    except Exception:
        return None
    for f in files:
        if re.fullmatch(r"cntk_engine/_cuda[^/]*\.(so|pyd)", str(f).replace("\\", "/")):
            p = Path(f.locate())
            if p.is_file():
                return p
    return None


def load_extension():
    """The installed cntk_engine._cuda module, or None when it is not installed.  When a source
    checkout shadows the installed package (its cntk_engine has no compiled extension; a test
    module that puts the checkout first on sys.path does that for the whole pytest session), the
    installed file is loaded under a private module name: cntk_engine itself still has no _cuda,
    as the rest of such a session expects."""
    try:
        import cntk_engine._cuda as ext
        return ext
    except ImportError:
        pass
    key = "_cntk_engine_installed_cuda"
    if key not in sys.modules:
        so = find_extension()
        if so is None:
            return None
        import importlib.util
        spec = importlib.util.spec_from_file_location("cntk_engine._cuda", so)
        ext = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(ext)
        sys.modules[key] = ext
    return sys.modules[key]


def _run(args: list[str]) -> subprocess.CompletedProcess:
    """cuobjdump with nvdisasm on its PATH (cuobjdump -sass calls it)."""
    cuobjdump, nvdisasm = find_tool("cuobjdump"), find_tool("nvdisasm")
    if cuobjdump is None or nvdisasm is None:
        raise RuntimeError(f"{TOOLS_HELP} (cuobjdump: {cuobjdump}, nvdisasm: {nvdisasm})")
    env = dict(os.environ, PATH=str(Path(nvdisasm).parent) + os.pathsep + os.environ.get("PATH", ""))
    return subprocess.run([cuobjdump, *args], capture_output=True, text=True, env=env)


@lru_cache(maxsize=8)
def resource_usage(so: Path, arch: str) -> dict:
    """Function name -> {"REG": registers per thread, "LOCAL": local memory bytes, ...}, for
    every kernel of one architecture's cubins in a binary: the list of its kernels, read in a
    fraction of a second (no disassembly)."""
    r = _run(["-res-usage", "-arch", arch, str(so)])
    out, name = {}, None
    for line in r.stdout.splitlines():
        m = re.match(r"\s*Function (\S+):", line)
        if m:
            name = m.group(1)
        elif name and "REG:" in line:
            out[name] = {k: int(v) for k, v in re.findall(r"(\w+):(\d+)", line)}
            name = None
    if not out:
        raise RuntimeError(f"cuobjdump -res-usage -arch {arch} {so} lists no kernel (exit "
                           f"{r.returncode}): {(r.stderr or r.stdout)[-400:].strip()}")
    return out


def kernel_names(so: Path, arch: str, contains: str) -> list[str]:
    """The (mangled) names of the kernels in ``so``'s ``arch`` cubins that hold ``contains``."""
    return [n for n in resource_usage(so, arch) if contains in n]


# Disassembling the whole binary takes about 50 s per architecture on the 2-core development VM
# (~850 MB of SASS, most of it the unrolled 32x32 kernels); one kernel takes under a second, so
# only the kernels asked for are disassembled (cuobjdump -fun), each once per process.
_SASS: dict[tuple[Path, str, str], list[tuple[int, str]]] = {}


def disassemble(so: Path, arch: str, names) -> dict[str, list[tuple[int, str]]]:
    """Kernel name -> [(address, instruction text)] of the named kernels of ``so``'s ``arch``
    cubins, in one cuobjdump call (names from :func:`kernel_names`)."""
    names = list(names)
    if not names:
        return {}
    r = _run(["-sass", "-arch", arch, "-fun", ",".join(names), str(so)])
    got = functions(r.stdout)
    missing = [n for n in names if n not in got]
    if r.returncode != 0 or missing:
        raise RuntimeError(f"cuobjdump -sass -arch {arch} -fun ... {so} gave no SASS for "
                           f"{missing or names} (exit {r.returncode}): "
                           f"{(r.stderr or r.stdout)[-400:].strip()}")
    return {n: got[n] for n in names}


def kernel_sass(so: Path, arch: str, names) -> dict[str, list[tuple[int, str]]]:
    """:func:`disassemble`, each kernel read once per process (the tests and the harness ask for
    the same kernels again): one cuobjdump call for those not read yet."""
    names = list(names)
    fresh = [n for n in dict.fromkeys(names) if (so, arch, n) not in _SASS]
    for n, ins in disassemble(so, arch, fresh).items():
        _SASS[(so, arch, n)] = ins
    return {n: _SASS[(so, arch, n)] for n in names}


# the variant the backend runs by default in float32 (cntk_engine._cuda.default_kernels); the harness's
# runs use CNTK_ENGINE_CUDA_KERNEL when it is set, as the backend does
DEFAULT_KERNEL = "v3"
KERNEL_ENV = "CNTK_ENGINE_CUDA_KERNEL"


def kernel_tag(dtype: str, hmax: int, radius: int, full: bool, kernel: str = DEFAULT_KERNEL,
               listed: bool = False) -> str:
    """Itanium-mangled template arguments of pair_sums_kernel<V, T, HMAX, R, FULL, LISTED>
    (csrc/pair_sums_kernel.cuh) for kernel variant "v<V>"; LISTED: the listed-grid readout (LAP)."""
    m = re.fullmatch(r"v(\d+)", kernel)
    if m is None:
        raise ValueError(f"kernel variant names are v<number> (v3, v5, ...); got {kernel!r}")
    t = {"float32": "f", "float64": "d"}[dtype]
    return f"ILi{m.group(1)}E{t}Li{hmax}ELi{radius}ELb{int(full)}ELb{int(listed)}EE"


def functions(sass: str, contains: str = "") -> dict[str, list[tuple[int, str]]]:
    """Function name -> [(address, instruction text)], for the functions of a cuobjdump -sass
    listing whose name holds ``contains``."""
    out = {}
    for block in re.split(r"\n\s*Function : ", sass)[1:]:
        name, _, body = block.partition("\n")
        if contains not in name:
            continue
        out[name.strip()] = [(int(a, 16), text.strip())
                             for a, text in re.findall(r"/\*([0-9a-f]{4,})\*/\s+([^;]+);", body)]
    return out


def opcode(text: str) -> str:
    """'@!P0 FFMA.FTZ R1, ...' -> 'FFMA'."""
    words = text.split()
    op = words[1] if words[0].startswith("@") else words[0]
    return op.split(".")[0]


def innermost_loop(ins: list[tuple[int, str]], must_hold: str = "MUFU") -> tuple[int, int]:
    """(first, last) index of the shortest backward-branch loop whose body holds `must_hold`."""
    index = {a: k for k, (a, _) in enumerate(ins)}
    best = None
    for k, (_, text) in enumerate(ins):
        m = re.search(r"\bBRA\s+(?:\S+\s+)?(0x[0-9a-f]+)", text)
        if not m:
            continue
        t = index.get(int(m.group(1), 16))
        if t is None or t >= k:
            continue
        if any(opcode(x) == must_hold for _, x in ins[t:k]) and (best is None or k - t < best[1] - best[0]):
            best = (t, k)
    if best is None:
        raise ValueError(f"no loop holding {must_hold} found")
    return best


def loop_mix(ins: list[tuple[int, str]], rows: int) -> dict:
    t, k = innermost_loop(ins)
    ops = collections.Counter(opcode(text) for _, text in ins[t:k + 1])
    n = k - t + 1
    units = {u: sum(c for o, c in ops.items() if o in members) / rows for u, members in UNITS.items()}
    units["other"] = sum(c for o, c in ops.items() if not any(o in m for m in UNITS.values())) / rows
    return {"loop_instructions": n, "rows_per_iteration": rows,
            "slots_per_entry_layer": n / rows,
            "by_unit_per_entry_layer": {u: round(v, 3) for u, v in units.items() if v},
            "by_opcode_per_entry_layer": {o: round(c / rows, 3) for o, c in ops.most_common()},
            "local_memory_in_loop": bool(ops.get("LDL") or ops.get("STL"))}


def issue_ceiling(slots: float, fma_rate: float, height=32, width=32, depth=21, pooling="gap") -> float:
    """pairs/s at which a kernel issuing `slots` per entry-layer fills every issue cycle.

    fma_rate: the device's FP32 FMA lane-operations/s (one warp instruction per scheduler and
    clock = 32 lanes), the issue rate whatever the dtype of the kernel."""
    entries = (height * width) ** 2 if pooling == "gap" else height * width
    return fma_rate / (entries * (depth - 1) * slots)


def harness_mixes(configs, so=None, arch="sm_90", kernel=None, counted=None) -> dict:
    """The layer-loop mix of the 32x32 kernels that the harness's cuda configurations ran
    ("float32 k3" -> mix, or {"error": why}); {} when no cuda configuration is 32x32.  kernel:
    the variant [$CNTK_ENGINE_CUDA_KERNEL, else the default]; counted: mixes of this binary
    counted before (``read_counted``), used instead of disassembling it where they hold one."""
    wanted = sorted({(c["dtype"], c.get("filter_size", 3)) for c in configs
                     if c["method"] == "cuda" and c["size"] == 32})
    if not wanted:
        return {}
    so = so or find_extension()
    kernel = kernel or os.environ.get(KERNEL_ENV, "").strip() or DEFAULT_KERNEL
    out = {}
    for dtype, k in wanted:
        key = f"{dtype} k{k}"
        if key in (counted or {}).get(kernel, {}):
            out[key] = counted[kernel][key]
            continue
        try:
            if so is None:
                raise RuntimeError("cntk_engine._cuda is not installed")
            mix = analyse(so, arch, dtype, 32, k // 2, True, kernel)
            out[key] = {f: mix[f] for f in ("kernel", "variant", "arch", "registers", "local_bytes",
                                            "slots_per_entry_layer", "by_unit_per_entry_layer",
                                            "local_memory_in_loop")}
        except Exception as e:   # no tools, no sm_90 code: recorded, the run goes on
            out[key] = {"error": f"{type(e).__name__}: {e}"}
    return out


# Counted mixes: a GPU visit's bench runs one harness process per kernel variant, and each
# would disassemble its kernels again (about a second each) with device time running.  For a
# binary built on the CPU side (tools/gpu/prebuilt.py) the counts are made there, once, and
# carried; they are bound to the binary by its SHA-256, so they stand in only for the very file
# they counted.
COUNTED_FORMAT = 1


def file_sha256(path: Path) -> str:
    import hashlib
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def compiled_variants(so: Path, arch="sm_90") -> list[str]:
    """The kernel variants ("v3", ...) whose pair kernel is in the binary's ``arch`` SASS."""
    numbers = {int(m.group(1)) for n in kernel_names(so, arch, "pair_sums_kernel")
               if (m := re.search(r"pair_sums_kernelILi(\d+)E", n))}
    return [f"v{n}" for n in sorted(numbers)]


def count_mixes(so: Path, arch="sm_90", kernels=None, dtypes=("float32", "float64"),
                filter_sizes=(3,)) -> dict:
    """The harness mixes of every variant (``kernels``, default: all compiled in), dtype and
    filter size of ``so``'s 32x32 kernels, with the binary's SHA-256 (``read_counted``)."""
    so = Path(so)
    configs = [{"method": "cuda", "size": 32, "dtype": d, "filter_size": k}
               for d in dtypes for k in filter_sizes]
    kernels = list(kernels) if kernels else compiled_variants(so, arch)
    by_kernel = {}
    for v in kernels:      # a mix that could not be read here is left for the GPU side to try
        mixes = harness_mixes(configs, so, arch, v)
        by_kernel[v] = {key: mix for key, mix in mixes.items() if "error" not in mix}
    return {"format": COUNTED_FORMAT, "so_sha256": file_sha256(so), "arch": arch, "by_kernel": by_kernel}


def read_counted(path: Path, so: Path | None = None, arch="sm_90") -> dict | None:
    """``count_mixes``'s record in ``path`` as {variant: {"float32 k3": mix, ...}}, or None (and
    a line saying why) when it counted another binary than ``so`` [the installed extension]."""
    so = so or find_extension()
    try:
        record = json.loads(Path(path).read_text())
        digest, rec_arch, by_kernel = record["so_sha256"], record["arch"], record["by_kernel"]
        if record.get("format") != COUNTED_FORMAT:
            raise ValueError(f"format {record.get('format')!r}, not {COUNTED_FORMAT}")
    except (OSError, ValueError, KeyError, TypeError) as e:
        print(f"sass mixes {path}: not readable ({e!r}); counting from the binary")
        return None
    if so is None or rec_arch != arch or digest != file_sha256(so):
        print(f"sass mixes {path}: counted for another binary ({rec_arch}, sha256 {digest[:12]}) than "
              f"{so}; counting from the binary")
        return None
    return by_kernel


def issue_figures(config: dict, pairs_per_s: float, mixes: dict, fp32_fma_rate: float | None) -> dict:
    """A cuda run's issue ceiling and efficiency from its kernel's static mix (harness field)."""
    mix = mixes.get(f"{config['dtype']} k{config.get('filter_size', 3)}")
    if config["method"] != "cuda" or config["size"] != 32 or not mix or "error" in mix \
            or not fp32_fma_rate:
        return {}
    ceiling = issue_ceiling(mix["slots_per_entry_layer"], fp32_fma_rate, 32, 32, config["depth"],
                            config["pooling"])
    return {"issue_ceiling_pairs_per_s": ceiling, "issue_efficiency": pairs_per_s / ceiling}


def analyse(so: Path, arch="sm_90", dtype="float32", hmax=32, radius=1, full=True,
            kernel=DEFAULT_KERNEL, listed=False) -> dict:
    tag = kernel_tag(dtype, hmax, radius, full, kernel, listed)
    hits = kernel_names(so, arch, "pair_sums_kernel" + tag)
    if len(hits) != 1:
        raise ValueError(f"pair_sums_kernel of variant {kernel} <{dtype}, {hmax}, {radius}, {full}, "
                         f"{listed}> ({tag}) is not once in the {arch} kernels of {so}: "
                         f"{len(hits)} match")
    name, = hits
    ins = kernel_sass(so, arch, hits)[name]
    res = resource_usage(so, arch)[name]
    return {"kernel": name, "variant": kernel, "arch": arch, "dtype": dtype, "hmax": hmax,
            "radius": radius, "full": full, "listed": listed, "registers": res.get("REG"),
            "local_bytes": res.get("LOCAL"), "stack_bytes": res.get("STACK"),
            "instructions_in_kernel": len(ins), **loop_mix(ins, hmax)}


def main(argv=None) -> dict | list[dict]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--so", type=Path, default=None, help="the compiled extension [the installed one]")
    ap.add_argument("--arch", default="sm_90")
    ap.add_argument("--dtype", default="float32", choices=["float32", "float64"])
    ap.add_argument("--hmax", type=int, default=32)
    ap.add_argument("--radius", type=int, default=1, help="filter_size // 2 [1]")
    ap.add_argument("--generic", action="store_true", help="the guarded kernel, not the 32x32 one")
    ap.add_argument("--listed", action="store_true",
                    help="the listed-grid (LAP) kernel; it has no 32x32 one: implies --generic")
    ap.add_argument("--kernel", default=DEFAULT_KERNEL,
                    help=f"kernel variant (v3, v5, ...; cntk-engine info lists them), or a comma list "
                         f"of them, counted in one process [{DEFAULT_KERNEL}]")
    ap.add_argument("--fma-rate", type=float, default=None,
                    help="FP32 FMA lane-ops/s of the GPU for the ceiling [the H100's, measured by "
                         "bench/ceiling.py in bench/results/harness_gpu_h100_20261123.json]")
    ap.add_argument("--measured", type=float, default=None,
                    help="measured depth-21 pairs/s of this kernel, to report the issue efficiency")
    ap.add_argument("--name", default=None, help="write <out-dir>/sass_<name>.json; with several "
                    "variants the name holds {kernel} (e.g. {kernel}_sm90)")
    ap.add_argument("--out-dir", type=Path, default=ROOT / "bench" / "results")
    args = ap.parse_args(argv)
    kernels = [k.strip() for k in args.kernel.split(",") if k.strip()]
    if not kernels:
        ap.error(f"--kernel {args.kernel!r}: no variant named")
    if len(kernels) > 1 and args.name and "{kernel}" not in args.name:
        ap.error(f"--name {args.name!r}: with several variants (--kernel {args.kernel}) it must hold "
                 "{kernel}, e.g. --name {kernel}_sm90")
    if args.so is not None and not args.so.is_file():
        ap.error(f"--so {str(args.so)!r} is not a file; give the compiled extension (_cuda*.so: "
                 "the installed one is found without --so)")
    so = args.so or find_extension()
    if so is None:
        sys.exit("cntk_engine._cuda is not installed (it is built by pip install . when nvcc is "
                 "found); pass --so PATH")
    try:
        outs = [report(args, so, k) for k in kernels]
    except (RuntimeError, ValueError) as e:     # no such variant or arch, tools missing
        if argv is not None:                    # a caller's call: its exception
            raise
        sys.exit(f"sass_mix.py: error: {e}".replace("\n", " "))
    return outs[0] if len(outs) == 1 else outs


def report(args, so: Path, kernel: str) -> dict:
    """One variant's mix and ceiling, printed and (--name) written."""
    out = analyse(so, args.arch, args.dtype, args.hmax, args.radius,
                  not (args.generic or args.listed), kernel, args.listed)
    rate, src = args.fma_rate, "--fma-rate"
    if rate is None:
        ref = ROOT / "bench" / "results" / "harness_gpu_h100_20261123.json"
        if ref.exists():
            rate = json.loads(ref.read_text())["ceiling"]["rates"]["gpu"]["float32"]["fma_per_s"]
            src = f"{ref.relative_to(ROOT)} (NVIDIA H100 80GB HBM3)"
    if rate and args.dtype == "float32" and args.hmax == 32:
        ceiling = issue_ceiling(out["slots_per_entry_layer"], rate)
        out["issue_ceiling_depth21_pairs_per_s"] = round(ceiling, 1)
        out["fma_rate"] = {"fma_per_s": rate, "from": src}
        if args.measured:
            out["measured_depth21_pairs_per_s"] = args.measured
            out["issue_efficiency"] = round(args.measured / ceiling, 4)
    out["so"] = str(so)
    print(json.dumps({k: v for k, v in out.items() if k != "by_opcode_per_entry_layer"}, indent=1))
    if args.name:
        args.out_dir.mkdir(parents=True, exist_ok=True)
        path = args.out_dir / f"sass_{args.name.replace('{kernel}', kernel)}.json"
        path.write_text(json.dumps(out, indent=1))
        print(f"wrote {path}")
    return out


if __name__ == "__main__":
    main()
