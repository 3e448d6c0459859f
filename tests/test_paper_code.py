"""bench/paper_code.py: loading the paper's CNTK.py, the value comparison, the unavailable paths,
and the harness's paper_code method; on the CPU, through a stand-in file with CNTK.py's shape
(tests/fixtures/paper_code_standin.txt) and the NumPy emulation of its two RawKernels.

The published CNTK.py itself is not in this repository: with CNTK_ENGINE_PAPER_CODE set to a
local copy, test_the_published_file_through_the_emulation loads and checks it too.
"""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
# after site-packages: bench/ is found in the repository, cntk_engine where it is installed
if str(ROOT) not in sys.path:
    sys.path.append(str(ROOT))

from bench import paper_code as pc  # noqa: E402

STANDIN = ROOT / "tests" / "fixtures" / "paper_code_standin.txt"


def _images(n, seed=0):
    return np.random.default_rng(seed).standard_normal((n, 3, 32, 32)).astype(np.float32)


def test_loader_keeps_only_the_kernels_and_the_two_functions():
    """The file parses arguments, imports utils and loads data at import and ends with a
    Python 2 print: none of that runs; the kernels, launch shapes, xx and xz are kept."""
    p = pc.PaperCode(STANDIN, pc.numpy_cupy())
    kept = {k for k in p.ns if not k.startswith("__")}
    assert kept == {"cp", "np", "xx", "xz", "conv3", "conv_blocks", "conv_threads", "trans", "trans_blocks",
                    "trans_threads"}
    assert p.emulated and p.ns["conv_blocks"] == (63, 63)


@pytest.mark.parametrize("pooling,fix", [("gap", False), ("gap", True), ("flatten", False), ("flatten", True)])
def test_emulated_standin_agrees_with_ours(pooling, fix):
    x = _images(2)
    p = pc.PaperCode(STANDIN, pc.numpy_cupy())
    got = p.gram(x, 3, pooling, fix)
    chk = pc.compare_values(got, pc.ours(x, 3, pooling, fix, backend="numba"))
    assert chk["agree_distinct_pairs"] and chk["non_finite_entries"] == 0
    assert chk["max_rel_diff_distinct_pairs"] < 1e-6
    # self pairs: the float32 code computes c = 1 entries as ordinary pairs (sqrt(eps))
    assert chk["max_rel_diff_self_pairs"] < 1e-3
    assert p.last_timing["pairs"] == 3 and p.last_timing["images"] == 2
    assert np.array_equal(got, got.T)


def test_a_wrong_readout_fails_the_check(tmp_path):
    wrong = tmp_path / "CNTK.py"
    wrong.write_text(STANDIN.read_text().replace("cp.mean(theta) if gap", "cp.sum(theta) if gap"))
    x = _images(2)
    chk = pc.compare_values(pc.PaperCode(wrong, pc.numpy_cupy()).gram(x, 3, "gap"), pc.ours(x, 3, "gap", False))
    assert not chk["agree_distinct_pairs"] and chk["max_rel_diff_distinct_pairs"] > 100


def test_compare_values_on_synthetic_outputs():
    ours = np.array([[4.0, 1.0, 2.0], [1.0, 5.0, 0.5], [2.0, 0.5, 6.0]])
    same = pc.compare_values(ours.copy(), ours)
    assert same["agree_distinct_pairs"] and same["agree_all_entries"] and same["max_rel_diff"] == 0.0
    off = ours.copy()
    off[0, 2] = off[2, 0] = 2.0 + 6.0 * 2e-4                     # distinct pair 2e-4 of max |ours| off
    chk = pc.compare_values(off, ours)
    assert not chk["agree_distinct_pairs"] and not chk["agree_all_entries"]
    assert chk["max_rel_diff_distinct_pairs"] == pytest.approx(2e-4) and chk["max_rel_diff_self_pairs"] == 0
    assert chk["worst_entry"] in ([0, 2], [2, 0])
    diag = ours.copy()
    diag[1, 1] += 6.0 * 3e-4                                     # a self pair only
    chk = pc.compare_values(diag, ours)
    assert chk["agree_distinct_pairs"] and not chk["agree_all_entries"]
    assert chk["max_rel_diff_self_pairs"] == pytest.approx(3e-4)
    nan = ours.copy()
    nan[2, 2] = np.nan                                           # a zero-variance image's self pair
    chk = pc.compare_values(nan, ours)
    assert chk["non_finite_entries"] == 1 and chk["non_finite_distinct_pairs"] == 0
    assert chk["agree_distinct_pairs"] and not chk["agree_all_entries"]
    nan[0, 1] = np.nan
    assert not pc.compare_values(nan, ours)["agree_distinct_pairs"]
    with pytest.raises(ValueError, match="square matrices"):
        pc.compare_values(ours[:2], ours)


def test_unavailable_reasons(tmp_path, monkeypatch):
    assert "no --paper-code PATH given" in pc.unavailable_reason(None)
    assert pc.unavailable_reason(tmp_path / "none.py").endswith("no such file")
    assert pc.unavailable_reason(tmp_path).endswith("a directory, not a file")
    monkeypatch.setitem(sys.modules, "cupy", None)               # import cupy -> ImportError
    assert "needs CuPy, which cannot be imported here" in pc.unavailable_reason(STANDIN)
    assert pc.unavailable_reason(STANDIN, emulate=True) is None
    partial = tmp_path / "partial.py"
    partial.write_text(STANDIN.read_text().replace("def xz(", "def not_xz("))
    assert "does not define xz at its top level" in pc.unavailable_reason(partial, emulate=True)
    broken = tmp_path / "broken.py"
    broken.write_text("print 'python 2 from the first line'\n")
    assert "no line of" in pc.unavailable_reason(broken, emulate=True)
    with pytest.raises(pc.PaperCodeError, match="does not define"):
        pc.PaperCode(partial, pc.numpy_cupy())


def test_emulated_kernels_check_their_arguments():
    cp = pc.numpy_cupy()
    with pytest.raises(NotImplementedError, match="no CPU emulation of a RawKernel named 'relu'"):
        cp.RawKernel("", "relu")
    conv3 = cp.RawKernel("", "conv3")
    s = np.zeros((32, 32, 32, 32), dtype=np.float64)
    with pytest.raises(TypeError, match="C-contiguous float32"):
        conv3((63, 63), (32, 32), (s, s))
    with pytest.raises(TypeError, match="takes 2 arrays"):
        conv3((63, 63), (32, 32), (s,))


def test_gram_refuses_what_the_kernels_cannot_take():
    p = pc.PaperCode(STANDIN, pc.numpy_cupy())
    with pytest.raises(ValueError, match=r"take \(N, C, 32, 32\) images"):
        p.gram(np.zeros((2, 3, 16, 16), np.float32), 3)
    with pytest.raises(ValueError, match="gap or flatten"):
        p.gram(_images(2), 3, "lap")


@pytest.mark.skipif(not os.environ.get("CNTK_ENGINE_PAPER_CODE"),
                    reason="CNTK_ENGINE_PAPER_CODE (a local copy of CNTK.py of github.com/ruosongwang/CNTK) is not set")
@pytest.mark.parametrize("pooling,fix", [("gap", False), ("flatten", True)])
def test_the_published_file_through_the_emulation(pooling, fix):
    path = os.environ["CNTK_ENGINE_PAPER_CODE"]
    x = _images(2, seed=3)
    chk = pc.compare_values(pc.PaperCode(path, pc.numpy_cupy()).gram(x, 4, pooling, fix), pc.ours(x, 4, pooling, fix))
    assert chk["agree_distinct_pairs"] and chk["non_finite_entries"] == 0, chk


def test_harness_paper_code_method(tmp_path, monkeypatch):
    """Emulated: values checked (status "emulated", no timing); float64 and 16x16 are skipped
    with the reason; without --paper-code, or without CuPy, every configuration is recorded as
    unavailable with the reason, and a run that measured nothing ends with exit status 1."""
    from bench import harness
    monkeypatch.setitem(sys.modules, "cupy", None)
    base = ["--methods", "paper_code", "--depths", "3", "--n", "2", "--repeats", "1", "--warmup", "0",
            "--no-ceiling", "--no-plots"]
    out = tmp_path / "h.json"
    harness.main(base + ["--sizes", "32,16", "--dtypes", "float32,float64", "--fix", "no,yes",
                         "--paper-code", str(STANDIN), "--paper-emulate", "--output", str(out)])
    rows = {(r["config"]["size"], r["config"]["dtype"], r["config"]["fix"]): r
            for r in json.loads(out.read_text())["results"]}
    for fix in (False, True):
        r = rows[(32, "float32", fix)]
        assert r["status"] == "emulated" and "seconds" not in r and r["device"] == "cpu"
        assert r["check"]["agree_distinct_pairs"] and r["check"]["vs"].startswith(f"cntk_engine float64, arora, fix={fix}")
        assert r["paper_timing"]["pairs"] == 3
        assert rows[(32, "float64", fix)]["status"] == "skipped"
        assert "32x32" in rows[(16, "float32", fix)]["reason"]
    for extra, why in (([], "no --paper-code PATH given"),
                       (["--paper-code", str(STANDIN)], "needs CuPy, which cannot be imported here")):
        out2 = tmp_path / f"u{len(extra)}.json"
        with pytest.raises(SystemExit) as e:
            harness.main(base + ["--sizes", "32", "--output", str(out2)] + extra)
        assert e.value.code == 1
        (r,) = json.loads(out2.read_text())["results"]
        assert r["status"] == "unavailable" and why in r["reason"]
