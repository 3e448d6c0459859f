"""The static SASS reader of tools/sass_mix.py, and every compiled kernel variant's instruction
budget.

The budget tests read the installed extension's code (built by ``pip install .`` when nvcc is
found): they run without a GPU and fail when a change makes a variant's 32x32 float32 layer loop
issue more instructions, use more registers than 16 warps per SM allow, or spill, or when a
variant's kernels are missing for sm_80 or sm_90.
"""
from __future__ import annotations

import json
import re

import pytest

from conftest import load_tool

sass_mix = load_tool("sass_mix")

# A two-row kernel: setup, a loop of 5 instructions with one MUFU (two rows -> 2.5 slots per
# entry-layer), an outer loop around it, exit.
SYNTHETIC = """
\t\tFunction : _ZN4cntk6detail16pair_sums_kernelILi5EfLi2ELi1ELb1ELb0EEEvv
        /*0000*/                   MOV R1, c[0x0][0x28] ;        /* 0x0 */
        /*0010*/                   S2R R0, SR_TID.X ;            /* 0x0 */
        /*0020*/                   FFMA R2, R0, R0, R1 ;         /* 0x0 */
        /*0030*/                   MUFU.RSQ R3, R2 ;             /* 0x0 */
        /*0040*/              @!P0 FMUL.FTZ R2, R3, R3 ;         /* 0x0 */
        /*0050*/                   SHFL.UP PT, R4, R2, 0x1, RZ ; /* 0x0 */
        /*0060*/               @P1 BRA 0x20 ;                    /* 0x0 */
        /*0070*/                   IADD3 R5, R5, 0x1, RZ ;       /* 0x0 */
        /*0080*/               @P2 BRA 0x10 ;                    /* 0x0 */
        /*0090*/                   EXIT ;                        /* 0x0 */
\t\tFunction : _Z5otherv
        /*0000*/                   EXIT ;                        /* 0x0 */
"""
KERNEL = "_ZN4cntk6detail16pair_sums_kernelILi5EfLi2ELi1ELb1ELb0EEEvv"


def test_reader_finds_the_innermost_mufu_loop_and_counts_it():
    funcs = sass_mix.functions(SYNTHETIC)
    assert set(funcs) == {KERNEL, "_Z5otherv"}
    ins = funcs[KERNEL]
    assert [sass_mix.opcode(t) for _, t in ins][3:5] == ["MUFU", "FMUL"]
    assert sass_mix.innermost_loop(ins) == (2, 6)          # 0x20 .. the BRA at 0x60, not 0x10 .. 0x80
    mix = sass_mix.loop_mix(ins, rows=2)
    assert mix["loop_instructions"] == 5 and mix["slots_per_entry_layer"] == 2.5
    assert mix["by_unit_per_entry_layer"] == {"fp32": 1.0, "mufu": 0.5, "shuffle": 0.5, "control": 0.5}
    assert not mix["local_memory_in_loop"]
    with pytest.raises(ValueError, match="no loop holding MUFU"):
        sass_mix.innermost_loop(funcs["_Z5otherv"])


def test_kernel_tag_names_one_variant_and_instantiation():
    assert sass_mix.kernel_tag("float32", 2, 1, True, "v5") in KERNEL
    assert sass_mix.kernel_tag("float32", 2, 1, True, "v3") not in KERNEL
    assert sass_mix.kernel_tag("float32", 2, 1, True) == "ILi3EfLi2ELi1ELb1ELb0EE"     # the default, v3
    assert sass_mix.kernel_tag("float64", 32, 3, False, "v12") == "ILi12EdLi32ELi3ELb0ELb0EE"
    assert sass_mix.kernel_tag("float32", 32, 1, False, "v5", listed=True) == "ILi5EfLi32ELi1ELb0ELb1EE"
    with pytest.raises(ValueError, match="v<number>"):
        sass_mix.kernel_tag("float32", 32, 1, True, "fast")


def test_issue_ceiling_formula():
    # F / (E L s): 32x32 GAP depth 21 has E L = 1024^2 * 20 entry-layers per pair
    assert sass_mix.issue_ceiling(1.0, 1024 ** 2 * 20 * 1000.0) == pytest.approx(1000.0)
    assert sass_mix.issue_ceiling(70.4375, 2.8158e13) == pytest.approx(19062, rel=1e-3)


# ------------------------------------------------------------------ the compiled kernel variants
# Per variant, its 32x32 float32 k=3 kernel on sm_90 (nvcc 13.0): MUFU per entry-layer (exact:
# more means an IEEE path crept in) and the most issue slots per entry-layer allowed.  The
# H100 issue ceiling at depth 21 is F / (E L s) (tools/sass_mix.py; docs/cuda_kernels.md).
BUDGETS = {
    # one rsqrt and two sqrt.approx; 70.4 slots measured at 18,968 pairs/s on an H100 (99.5 % of
    # its issue ceiling), 69.5 since the float32 snap; 72 slots = 18,650 pairs/s
    "v3": {"mufu": 3.0, "slots": 72.0},
    # two sqrt.approx.ftz; 53.0 slots (54.0 before the float32 snap); 55 slots = 24,410 pairs/s
    # (it ran at 10,064 on an H200, stalled: issue-bound only up to depth ~6, docs/cuda_kernels.md)
    "v5": {"mufu": 2.0, "slots": 55.0},
    # one rcp.approx.ftz and two sqrt.approx.ftz, v3's footprint, the row seam as a mask bit
    # (kSeamBits); 48.8 slots (not run on a GPU); 51 slots = 26,330 pairs/s.  The mask costs ptxas
    # one register it takes back with 8 bytes of spills outside the layer loop (a load per grid)
    "v6": {"mufu": 3.0, "slots": 51.0, "stack": 8},
    # v6 and a barrier per layer (one BAR per 32 rows): 48.8 slots at v6's 128 registers
    "v7": {"mufu": 3.0, "slots": 51.0, "stack": 8},
    # v3's step with v6's row-seam mask: 61.8 slots; 64 slots = 20,980 pairs/s
    "v8": {"mufu": 3.0, "slots": 64.0, "stack": 8},
}
# Variants that compile only their guard-free 32 x 32 pair kernels and run their base variant's
# everywhere else (csrc/pair_sums_kernel.cuh, kBaseVariant)
BASE_VARIANT = {"v7": "v6", "v8": "v3"}
# The radii (filter_size // 2) whose 32x32 float32 kernels are spill-free on sm_80 and sm_90.
# v5's k=5 kernel on sm_90 keeps 128 registers with 24 bytes of spills (ptxas's choice, for 16
# warps per SM; docs/cuda_kernels.md; its k=1 kernels did so too until the float32 snap).
# Registers are budgeted on sm_90 only (above): on sm_80 v5's k=5 and 7 kernels take 160 and 157.
# v6, v7 and v8 (the row-seam mask) keep 128 registers at k = 3 and 7 on sm_90 with 8 and 16 bytes
# of spills at the kernel's start, a load per grid (none on sm_80).
SPILL_FREE_RADII = {"v3": (0, 1, 2, 3), "v5": (0, 1, 3), "v6": (0, 2), "v7": (0, 2), "v8": (0, 2)}
# The variants whose 32x32 float32 kernels may use local memory inside the layer loop (v5's k = 5
# on sm_90; its k = 1 kernels did too until the float32 snap); no other's may.
LAYER_LOOP_SPILLS = {"v5"}


def installed():
    so = sass_mix.find_extension()
    if so is None:
        pytest.skip("cntk_engine._cuda is not installed (built only when nvcc is found at install)")
    if sass_mix.find_tool("cuobjdump") is None or sass_mix.find_tool("nvdisasm") is None:
        pytest.skip(sass_mix.TOOLS_HELP)
    return so, sass_mix.load_extension()


def sass_or_skip(so, ext, arch):
    built = ext.cuda_architectures.split(",")
    if arch.removeprefix("sm_") not in built:
        pytest.skip(f"the extension was built for {', '.join('sm_' + a for a in built)} only (the "
                    "default build is 80;90)")


def test_the_compiled_variants_are_the_budgeted_ones():
    _, ext = installed()
    assert [v["name"] for v in ext.kernel_variants()] == list(BUDGETS) == list(SPILL_FREE_RADII)


@pytest.mark.parametrize("kernel", list(BUDGETS))
def test_variant_stays_within_its_instruction_budget(kernel):
    so, ext = installed()
    sass_or_skip(so, ext, "sm_90")
    mix = sass_mix.analyse(so, "sm_90", "float32", 32, 1, True, kernel)
    budget = BUDGETS[kernel]
    why = f"kernel {kernel}, budget {budget}; this build: {mix}"
    assert mix["by_opcode_per_entry_layer"].get("MUFU") == budget["mufu"], why
    # at 256-thread blocks, 128 registers per thread keep 2 blocks = 16 warps on an SM
    assert mix["registers"] is not None and mix["registers"] <= 128, why
    assert mix["local_bytes"] == 0 and mix["stack_bytes"] <= budget.get("stack", 0), why
    assert not mix["local_memory_in_loop"], why
    assert mix["slots_per_entry_layer"] <= budget["slots"], why


@pytest.mark.parametrize("kernel", [k for k in BUDGETS if k not in BASE_VARIANT])
def test_lap_kernel_runs_the_variants_step_without_spills(kernel):
    # the listed-grid (LAP) instantiation, float32 k=3 on sm_90: the variant's per-entry step
    # (same MUFU per entry-layer), no local memory; it is the guarded HMAX = 32 kernel, with
    # about the registers of the gap one of that shape (180-194 on nvcc 13.0: one 8-warp block
    # per SM; docs/cuda_kernels.md)
    so, ext = installed()
    sass_or_skip(so, ext, "sm_90")
    mix = sass_mix.analyse(so, "sm_90", "float32", 32, 1, False, kernel, listed=True)
    gap = sass_mix.analyse(so, "sm_90", "float32", 32, 1, False, kernel)
    why = f"kernel {kernel}; LAP: {mix}; gap: {gap}"
    assert mix["by_opcode_per_entry_layer"].get("MUFU") == BUDGETS[kernel]["mufu"], why
    assert mix["local_bytes"] == 0 and mix["stack_bytes"] == 0 and not mix["local_memory_in_loop"], why
    assert mix["registers"] <= max(gap["registers"], 200), why
    assert mix["slots_per_entry_layer"] <= gap["slots_per_entry_layer"] + 1.0, why


@pytest.mark.parametrize("arch", ["sm_80", "sm_90"])
def test_every_variant_is_compiled_for_the_architecture(arch):
    so, ext = installed()
    sass_or_skip(so, ext, arch)
    usage = sass_mix.resource_usage(so, arch)
    names = sass_mix.kernel_names(so, arch, "pair_sums_kernel")
    # the 32x32 float32 kernels' layer loops, disassembled in one call (the others are only listed)
    funcs = sass_mix.kernel_sass(so, arch, [n for n in names if re.search(r"EfLi32ELi\dELb1E", n)])
    for kernel in BUDGETS:
        for dtype in ("float32", "float64"):
            # the instantiations launch_variant dispatches to: HMAX 8, 16, 32 x R 0..3, the
            # guard-free 32x32 kernel per R, and the listed-grid (LAP) kernels: HMAX 32 x R 0..3
            wanted = [(h, r, False, False) for h in (8, 16, 32) for r in range(4)] + \
                [(32, r, True, False) for r in range(4)] + [(32, r, False, True) for r in range(4)]
            if kernel in BASE_VARIANT:
                wanted = [(32, r, True, False) for r in range(4)]
            for h, r, full, listed in wanted:
                tag = "pair_sums_kernel" + sass_mix.kernel_tag(dtype, h, r, full, kernel, listed)
                hits = [n for n in names if tag in n]
                assert len(hits) == 1, f"{arch}: {kernel} {dtype} HMAX={h} R={r} FULL={full} LISTED={listed}: {hits}"
                if dtype == "float32" and full:
                    res = usage[hits[0]]
                    loop = sass_mix.loop_mix(funcs[hits[0]], 32)
                    assert loop["by_opcode_per_entry_layer"].get("MUFU") == BUDGETS[kernel]["mufu"], (arch, kernel, r)
                    if r in SPILL_FREE_RADII[kernel]:
                        assert res["STACK"] == 0 and res["LOCAL"] == 0 and not loop["local_memory_in_loop"], \
                            (arch, kernel, r, res)
                    if kernel not in LAYER_LOOP_SPILLS:
                        assert not loop["local_memory_in_loop"], (arch, kernel, r, res)
    own = len(BUDGETS) - len(BASE_VARIANT)
    assert len(names) == own * 2 * 20 + len(BASE_VARIANT) * 2 * 4, sorted(names)


@pytest.mark.parametrize("arch", ["sm_80", "sm_90"])
def test_stack_kernel_is_compiled_per_variant_and_dtype(arch):
    # stack_sums_kernel<V, T, R = 1, SQUARE32> (csrc/stack_sums_kernel.cuh): one per variant,
    # dtype and image kind (32 x 32, Myrtle's, or any other size); Myrtle's float32 kernel on
    # sm_90 without spills (nvcc 13.0: 229 (v3, v6) and 244 (v5) registers, so one 8-warp block per SM;
    # docs/cuda_kernels.md)
    so, ext = installed()
    sass_or_skip(so, ext, arch)
    usage = sass_mix.resource_usage(so, arch)
    names = [n for n in usage if "stack_sums_kernel" in n]
    for kernel in (k for k in BUDGETS if k not in BASE_VARIANT):   # v7, v8 run their base's
        for dtype, t in (("float32", "f"), ("float64", "d")):
            for square in (0, 1):
                tag = f"stack_sums_kernelILi{kernel.removeprefix('v')}E{t}Li1ELb{square}ELi1EE"
                hits = [n for n in names if tag in n]
                assert len(hits) == 1, f"{arch}: {kernel} {dtype} SQUARE32={square}: {hits}"
                res = usage[hits[0]]
                assert res["REG"] <= 255 and res["LOCAL"] == 0, (arch, kernel, dtype, square, res)
                if arch == "sm_90" and dtype == "float32" and square:
                    assert res["STACK"] == 0, (arch, kernel, res)
        # the two-block candidate (stack_blocks_per_sm = 2): 32 x 32 float32, <= 128 registers
        tag = f"stack_sums_kernelILi{kernel.removeprefix('v')}EfLi1ELb1ELi2EE"
        hits = [n for n in names if tag in n]
        assert len(hits) == 1 and usage[hits[0]]["REG"] <= 128, (arch, kernel, hits)
    assert len(names) == (len(BUDGETS) - len(BASE_VARIANT)) * 5, sorted(names)


def test_harness_issue_figures_from_a_kernel_mix():
    mix = {"float32 k3": {"slots_per_entry_layer": 70.4375}}
    cfg = {"method": "cuda", "dtype": "float32", "size": 32, "depth": 21, "pooling": "gap"}
    f = sass_mix.issue_figures(cfg, 18968.0, mix, 2.8158e13)
    assert f["issue_ceiling_pairs_per_s"] == pytest.approx(19062, rel=1e-3)
    assert f["issue_efficiency"] == pytest.approx(0.995, abs=1e-3)
    flat = sass_mix.issue_figures(dict(cfg, pooling="flatten", depth=3), 1e6, mix, 2.8158e13)
    assert flat["issue_ceiling_pairs_per_s"] == pytest.approx(2.8158e13 / (1024 * 2 * 70.4375))
    # nothing for other methods, sizes the mix does not describe, failed analyses, no rate
    assert sass_mix.issue_figures(dict(cfg, method="numba"), 1.0, mix, 2.8e13) == {}
    assert sass_mix.issue_figures(dict(cfg, size=16), 1.0, mix, 2.8e13) == {}
    assert sass_mix.issue_figures(cfg, 1.0, {"float32 k3": {"error": "no tools"}}, 2.8e13) == {}
    assert sass_mix.issue_figures(cfg, 1.0, mix, None) == {}


def test_harness_mixes_records_why_it_could_not_read_the_kernel(tmp_path):
    cfgs = [{"method": "cuda", "dtype": "float32", "size": 32}, {"method": "numba", "dtype": "float64", "size": 32},
            {"method": "cuda", "dtype": "float64", "size": 16}]
    assert sass_mix.harness_mixes(cfgs[1:]) == {}
    fake = tmp_path / "_cuda.so"
    fake.write_bytes(b"not a CUDA binary")
    out = sass_mix.harness_mixes(cfgs, so=fake)
    assert list(out) == ["float32 k3"] and "error" in out["float32 k3"]


def test_harness_mixes_read_the_variant_the_runs_use(monkeypatch):
    so, ext = installed()
    sass_or_skip(so, ext, "sm_90")
    cfgs = [{"method": "cuda", "dtype": "float32", "size": 32}]
    monkeypatch.setenv(sass_mix.KERNEL_ENV, "v5")
    out = sass_mix.harness_mixes(cfgs, so=so)["float32 k3"]
    assert out["variant"] == "v5" and re.search(r"pair_sums_kernelILi5Ef", out["kernel"])
    monkeypatch.delenv(sass_mix.KERNEL_ENV)
    assert sass_mix.harness_mixes(cfgs, so=so)["float32 k3"]["variant"] == ext.default_kernels["float32"]


def test_cli_counts_several_variants_from_one_disassembly(tmp_path, capsys):
    # the GPU session's sass phase: one process, one file per variant
    so, ext = installed()
    sass_or_skip(so, ext, "sm_90")
    with pytest.raises(SystemExit):
        sass_mix.main(["--kernel", "v3,v6", "--name", "sm90", "--out-dir", str(tmp_path)])
    assert "it must hold {kernel}" in capsys.readouterr().err
    outs = sass_mix.main(["--kernel", "v3,v6", "--name", "{kernel}_sm90", "--out-dir", str(tmp_path)])
    assert [o["variant"] for o in outs] == ["v3", "v6"]
    assert sorted(f.name for f in tmp_path.iterdir()) == ["sass_v3_sm90.json", "sass_v6_sm90.json"]
    assert json.loads((tmp_path / "sass_v6_sm90.json").read_text())["slots_per_entry_layer"] <= BUDGETS["v6"]["slots"]


def test_counted_mixes_stand_in_for_the_disassembly_of_that_binary_only(tmp_path, monkeypatch, capsys):
    # tools/gpu/prebuilt.py counts the wheel's kernels on the CPU side; the harness on the GPU
    # machine takes them (--sass-mixes) for that very binary instead of disassembling it
    so, ext = installed()
    sass_or_skip(so, ext, "sm_90")
    record = sass_mix.count_mixes(so)
    variants = [v["name"] for v in ext.kernel_variants()]
    assert list(record["by_kernel"]) == sass_mix.compiled_variants(so) == variants
    cfgs = [{"method": "cuda", "dtype": d, "size": 32} for d in ("float32", "float64")]
    path = tmp_path / "sass_mixes.json"
    path.write_text(json.dumps(record))
    counted = sass_mix.read_counted(path, so)
    want = {v: sass_mix.harness_mixes(cfgs, so=so, kernel=v) for v in variants}

    def no_disassembly(*_):
        raise RuntimeError("disassembled although counted")
    monkeypatch.setattr(sass_mix, "disassemble", no_disassembly)
    monkeypatch.setattr(sass_mix, "resource_usage", no_disassembly)
    for v in variants:
        assert sass_mix.harness_mixes(cfgs, so=so, kernel=v, counted=counted) == want[v] == record["by_kernel"][v]
    # what the record lacks is read from the binary (here: the error of the stubbed reader)
    k5 = sass_mix.harness_mixes([dict(cfgs[0], filter_size=5)], so=so, kernel="v3", counted=counted)
    assert "disassembled although counted" in k5["float32 k5"]["error"]
    # another binary, another architecture, another format or no file: counted again, saying why
    other = tmp_path / "_cuda.so"
    data = so.read_bytes()
    other.write_bytes(data[:-1] + bytes([data[-1] ^ 1]))
    assert sass_mix.read_counted(path, other) is None
    assert "counted for another binary" in capsys.readouterr().out
    assert sass_mix.read_counted(path, so, arch="sm_80") is None
    path.write_text(json.dumps({**record, "format": 0}))
    assert sass_mix.read_counted(path, so) is None and "not readable" in capsys.readouterr().out
    assert sass_mix.read_counted(tmp_path / "none.json", so) is None
