"""The static SASS reader of tools/sass_mix.py, and the compiled kernel's instruction budget.

The budget test reads the installed extension's sm_90 code (built by ``pip install .`` when nvcc
is found): it runs without a GPU and fails when a change makes the 32x32 float32 layer loop
issue more instructions, use more registers than 16 warps per SM allow, or spill.
"""
from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _load_sass_mix():
    # loaded from its file: putting the checkout ahead of site-packages on sys.path would make
    # cntk_engine import from the source tree (which has no compiled extension)
    spec = importlib.util.spec_from_file_location("sass_mix", ROOT / "tools" / "sass_mix.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


sass_mix = _load_sass_mix()

# A two-row kernel: setup, a loop of 5 instructions with one MUFU (two rows -> 2.5 slots per
# entry-layer), an outer loop around it, exit.
SYNTHETIC = """
\t\tFunction : _Z16pair_sums_kernelIfLi2ELi1ELb1EEvv
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


def test_reader_finds_the_innermost_mufu_loop_and_counts_it():
    funcs = sass_mix.functions(SYNTHETIC)
    assert set(funcs) == {"_Z16pair_sums_kernelIfLi2ELi1ELb1EEvv", "_Z5otherv"}
    ins = funcs["_Z16pair_sums_kernelIfLi2ELi1ELb1EEvv"]
    assert [sass_mix.opcode(t) for _, t in ins][3:5] == ["MUFU", "FMUL"]
    assert sass_mix.innermost_loop(ins) == (2, 6)          # 0x20 .. the BRA at 0x60, not 0x10 .. 0x80
    mix = sass_mix.loop_mix(ins, rows=2)
    assert mix["loop_instructions"] == 5 and mix["slots_per_entry_layer"] == 2.5
    assert mix["by_unit_per_entry_layer"] == {"fp32": 1.0, "mufu": 0.5, "shuffle": 0.5, "control": 0.5}
    assert not mix["local_memory_in_loop"]
    assert sass_mix.kernel_tag("float32", 2, 1, True) in "_Z16pair_sums_kernelIfLi2ELi1ELb1EEvv"
    with pytest.raises(ValueError, match="no loop holding MUFU"):
        sass_mix.innermost_loop(funcs["_Z5otherv"])


def test_issue_ceiling_formula():
    # F / (E L s): 32x32 GAP depth 21 has E L = 1024^2 * 20 entry-layers per pair
    assert sass_mix.issue_ceiling(1.0, 1024 ** 2 * 20 * 1000.0) == pytest.approx(1000.0)
    assert sass_mix.issue_ceiling(70.4375, 2.8158e13) == pytest.approx(19062, rel=1e-3)


def test_installed_kernel_stays_within_its_instruction_budget():
    so = sass_mix.find_extension()
    if so is None:
        pytest.skip("cntk_engine._cuda is not installed (built only when nvcc is found at install)")
    if sass_mix.find_tool("cuobjdump") is None or sass_mix.find_tool("nvdisasm") is None:
        pytest.skip(sass_mix.TOOLS_HELP)
    try:
        mix = sass_mix.analyse(so, "sm_90", "float32", 32, 1, True)
    except RuntimeError as e:
        if "gave no SASS" in str(e):
            pytest.skip(f"the extension has no sm_90 code (built for other architectures): {e}")
        raise
    why = (f"kernel v3 measured 70.4 slots per entry-layer, 3 MUFU, 128 registers, no spills "
           f"(nvcc 13.0); this build: {mix}")
    # 3 MUFU per entry-layer: one rsqrt and two sqrt.approx; more means an IEEE path crept in
    assert mix["by_opcode_per_entry_layer"].get("MUFU") == 3.0, why
    # at 256-thread blocks, 128 registers per thread keep 2 blocks = 16 warps on an SM
    assert mix["registers"] is not None and mix["registers"] <= 128, why
    assert mix["local_bytes"] == 0 and not mix["local_memory_in_loop"], why
    # the H100 issue ceiling is F / (E L s): 72 slots = 18,650 pairs/s at depth 21
    assert mix["slots_per_entry_layer"] <= 72.0, why


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
