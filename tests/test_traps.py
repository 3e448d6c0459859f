"""No silent traps: channels-last images under the default NCHW layout, absurd depths, and the
solver's wording for an all-zero Gram, an indefinite K and non-finite labels (issue #13)."""
import time

import numpy as np
import pytest

import cntk_engine as ce
from cntk_engine import cli, solver
from cntk_engine.arch import MAX_DEPTH, make_architecture

from conftest import load_real


def run(capsys, *argv):
    rc = cli.main(["-q", *map(str, argv)])
    out, err = capsys.readouterr()
    return rc, out, err


# ------------------------------------------------------------------------------ layout
@pytest.mark.parametrize("shape", [(2, 32, 32, 3), (2, 28, 28, 1), (2, 5, 6, 3)])
def test_channels_last_shape_is_refused_under_the_default_layout(shape):
    x = np.random.default_rng(0).random(shape)
    with pytest.raises(ValueError, match=r"looks like the channels of channels-last data.*"
                                         r"data_format='NHWC'.*data_format='NCHW' explicitly"):
        ce.gram(x, depth=2, backend="numba")
    with pytest.raises(ValueError, match=r"^x2 has shape"):          # the second set too
        ce.gram(np.zeros((2, 3, 6, 6)), x, depth=2, backend="numba")


def test_channels_last_refusal_boundaries_and_explicit_layouts(rng):
    # four channels or fewer, or a last axis that is not 1 or 3: not a channels-last look-alike
    for shape in [(2, 4, 6, 3), (2, 3, 6, 6), (2, 8, 6, 5)]:
        assert ce.gram(rng.random(shape), depth=2, backend="numba").shape == (2, 2)
    # explicit NCHW is taken as said (e.g. 16-channel 1-D signals as H x 1 images)
    sig = rng.random((3, 16, 20, 1))
    assert ce.gram(sig, depth=2, backend="numba", data_format="NCHW").shape == (3, 3)
    # NHWC: the same kernel as the transposed NCHW images
    nhwc = rng.random((3, 8, 8, 3))
    a = ce.gram(nhwc, depth=3, backend="numba", data_format="NHWC")
    b = ce.gram(np.ascontiguousarray(nhwc.transpose(0, 3, 1, 2)), depth=3, backend="numba")
    assert a.tobytes() == b.tobytes()


def test_cifar_channels_last_is_refused_in_python_and_read_right_by_the_cli(tmp_path, capsys):
    d = load_real("cifar10_jpeg_small.npz")
    x = d["x_train"][:5, :8, :8]                                         # (5, 8, 8, 3) uint8 NHWC
    assert x.shape == (5, 8, 8, 3)
    with pytest.raises(ValueError, match=r"\(5, 8, 8, 3\).*8 channels of 8 x 3 images"):
        ce.gram(x, depth=2, backend="numba")
    np.save(tmp_path / "cifar.npy", x)
    out = tmp_path / "c.zarr"
    rc, o, e = run(capsys, "gram", tmp_path / "cifar.npy", "--depth", "2", "--out", out,
                   "--backend", "numba", "--no-progress")                # --data-format auto
    assert rc == 0, e
    import zarr
    want = ce.gram(x, depth=2, backend="numba", data_format="NHWC")
    assert zarr.open_group(str(out))["ntk"][...].tobytes() == want.tobytes()


def test_cli_data_format_auto_decides_or_asks(tmp_path, capsys, rng):
    from cntk_engine.cli.common import guess_layout
    assert guess_layout((9, 32, 32, 3)) == "NHWC" and guess_layout((9, 3, 32, 32)) == "NCHW"
    assert guess_layout((9, 2, 6, 6)) == "NCHW" and guess_layout((9, 32, 32, 4)) == "NHWC"
    assert guess_layout((9, 3, 8, 3)) is None and guess_layout((9, 1, 1, 1)) is None
    np.save(tmp_path / "amb.npy", rng.random((4, 3, 8, 3)))
    rc, o, e = run(capsys, "gram", tmp_path / "amb.npy", "--depth", "2", "--out", tmp_path / "a.zarr")
    assert rc == 2 and "cannot tell the layout" in e and "--data-format" in e and e.count("\n") == 1
    assert not (tmp_path / "a.zarr").exists()
    rc, o, e = run(capsys, "gram", tmp_path / "amb.npy", "--depth", "2", "--out", tmp_path / "a.zarr",
                   "--data-format", "NCHW", "--backend", "numba", "--no-progress")
    assert rc == 0, e


# ------------------------------------------------------------------------------ depth
def test_absurd_depth_is_refused_at_once_saying_why(tmp_path, capsys):
    t0 = time.perf_counter()
    for kw in (dict(depth=10**9), dict(depths=[3, MAX_DEPTH + 1])):
        with pytest.raises(ValueError, match=rf"at most {MAX_DEPTH}.*linearly.*saturates by depth ~20"):
            ce.gram(np.zeros((2, 1, 4, 4)), backend="numba", out=tmp_path / "g.zarr", **kw)
    assert time.perf_counter() - t0 < 5 and not (tmp_path / "g.zarr").exists()
    assert make_architecture(depth=MAX_DEPTH).n_layers == MAX_DEPTH - 1
    np.save(tmp_path / "x.npy", np.zeros((2, 1, 4, 4)))
    rc, o, e = run(capsys, "gram", tmp_path / "x.npy", "--depth", "1000000000", "--out",
                   tmp_path / "g.zarr")
    assert rc == 2 and "at most 1000" in e and e.count("\n") == 1 and not (tmp_path / "g.zarr").exists()
    # a depth table is named as the option that gave it (it was blamed on --depth)
    rc, o, e = run(capsys, "gram", tmp_path / "x.npy", "--depths", "3,1001", "--out", tmp_path / "g.zarr")
    assert rc == 2 and "every depth of --depths 3,1001 must be at most 1000; got 1001" in e, e
    with pytest.raises(ValueError, match=r"^every depth of depths=\[3, 1001\] must be at most 1000"):
        make_architecture(depths=[3, 1001])


# ------------------------------------------------------------------------------ solver wording
def test_all_zero_gram_jitter_message_does_not_claim_a_mean_diagonal(caplog):
    with caplog.at_level("WARNING", logger="cntk_engine"):
        sol = solver.fit_ridge(np.zeros((4, 4)), np.ones(4))
    assert sol.jitter == 1e-10
    msg = caplog.text
    assert "x mean diagonal" not in msg
    assert "mean diagonal is 0, not positive" in msg and "K is all zero" in msg


def test_jitter_message_of_an_ordinary_gram_keeps_the_mean_diagonal(rng, caplog):
    A = rng.standard_normal((12, 3))
    K = A @ A.T                                                          # rank 3: needs jitter
    with caplog.at_level("WARNING", logger="cntk_engine"):
        sol = solver.fit_ridge(K, np.ones(12))
    assert sol.jitter > 0 and "x mean diagonal) to factorise" in caplog.text


def test_indefinite_gram_is_called_indefinite_not_singular(rng, caplog):
    A = rng.standard_normal((8, 8))
    K = A + A.T                                                          # eigenvalues of both signs
    with pytest.raises(solver.NotPositiveDefinite) as e:
        solver.select_ridge(K, rng.standard_normal(8))
    msg = str(e.value)
    smin = np.linalg.eigvalsh(K)[0]
    assert "indefinite" in msg and "singular" not in msg and f"{smin:.3g}" in msg
    with caplog.at_level("INFO", logger="cntk_engine"):
        solver.loo(K, rng.standard_normal(8), [0.0])
    assert "is indefinite" in caplog.text and "singular" not in caplog.text


def test_singular_psd_gram_is_still_called_singular(rng):
    A = rng.standard_normal((8, 2))
    with pytest.raises(solver.NotPositiveDefinite, match="leaves K \\+ ridge I singular"):
        solver.select_ridge(A @ A.T, rng.standard_normal(8), ridges=[0.0])


@pytest.mark.parametrize("y, where", [([0, 1, np.nan], "[2]"), ([np.inf, 1.0, 0.0], "[0]")])
def test_non_finite_labels_are_named_as_such(y, where):
    for f in (solver.paper_targets, solver.one_hot):
        with pytest.raises(ValueError, match=r"labels must be finite.*index " + where.replace("[", r"\[")):
            f(np.array(y))
    with pytest.raises(ValueError, match=r"classes must be finite"):
        solver.one_hot(np.array([0.0, 1.0]), classes=np.array([0.0, 1.0, np.nan]))
