"""Command line: gram into a store, resume, one-line errors without half-written stores, info,
demo, evaluate registration, python -m."""
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

zarr = pytest.importorskip("zarr")

import cntk_engine as ce  # noqa: E402
from conftest import run_script  # noqa: E402
from cntk_engine import cli  # noqa: E402
from cntk_engine.jobs.store import StoreError  # noqa: E402


def run(capsys, *argv):
    rc = cli.main(["-q", *map(str, argv)])
    out, err = capsys.readouterr()
    return rc, out, err


@pytest.fixture
def data(tmp_path, rng):
    x = rng.standard_normal((9, 2, 6, 6)).astype(np.float32)
    np.save(tmp_path / "x.npy", x)
    np.savez(tmp_path / "d.npz", x_train=x, x_test=x[:4], other=np.zeros(3))
    return x


def test_gram_store_resume_and_mismatch(tmp_path, data, capsys):
    out = tmp_path / "g.zarr"
    rc, o, e = run(capsys, "gram", tmp_path / "x.npy", "--depth", "3", "--out", out, "--tile", "4",
                   "--backend", "numba", "--no-progress")
    assert rc == 0, e
    assert "computed 6 of 6 tiles" in o and "numba" in o and "pairs/s" in o
    ref = ce.gram(data, depth=3, backend="numba", tile=4)
    assert zarr.open_group(str(out))["ntk"][...].tobytes() == ref.tobytes()
    snap = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    # exists without --resume: refused, untouched
    rc, o, e = run(capsys, "gram", tmp_path / "x.npy", "--depth", "3", "--out", out, "--backend", "numba")
    assert rc == 2 and "exists; pass --resume" in e and e.count("\n") == 1 and "Traceback" not in e
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == snap
    # --resume: nothing left to do
    rc, o, e = run(capsys, "gram", tmp_path / "x.npy", "--depth", "3", "--out", out, "--resume",
                   "--backend", "numba", "--no-progress")
    assert rc == 0 and "computed 0 of 6 tiles" in o
    # --resume with another job: refused naming the difference, untouched
    snap = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    rc, o, e = run(capsys, "gram", tmp_path / "x.npy", "--depths", "3,4", "--out", out, "--resume",
                   "--backend", "numba", "--pooling", "flatten", "--tile", "2")
    assert rc == 2 and "holds another job" in e and e.count("\n") == 1
    # each difference named by the option that sets it (the record's keys are Python's names)
    assert ("--depths: store has [3], this job [3, 4]; --pooling: store has 'gap', this job "
            "'flatten'; --tile: store has 4, this job 2." in e and "architecture." not in e), e
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == snap
    # one depth as --depth; the kernels once, as --kernel; the dtype a reference job implies not
    # as if it were given
    rc, o, e = run(capsys, "gram", tmp_path / "x.npy", "--depth", "4", "--out", out, "--resume",
                   "--backend", "reference", "--kernel", "both")
    assert rc == 2 and ("holds another job: --backend: store has 'numba', this job 'reference'; "
                        "--depth: store has 3, this job 4; --kernel: store has 'ntk', this job "
                        "'both'. Nothing" in e), e


def test_npz_keys_x2_3d_and_nhwc(tmp_path, data, capsys):
    out = tmp_path / "r.zarr"
    rc, o, e = run(capsys, "gram", tmp_path / "d.npz", "--x2", tmp_path / "d.npz", "--depths", "2,3",
                   "--kernel", "both", "--out", out, "--backend", "numba", "--no-progress")
    assert rc == 0, e
    assert "as a test kernel, with the store of its training Gram (checked to belong together): " \
           f"cntk-engine solve DATA --train TRAIN_STORE --test {out}, or " \
           f"cntk_engine.solver.load_train_test(TRAIN_STORE, {str(out)!r})" in o, o
    ref = ce.gram(data, data[:4], depths=[2, 3], kernel="both", backend="numba")   # x_train vs x_test
    g = zarr.open_group(str(out))
    assert g["depth_3/nngp"][...].tobytes() == ref[3][1].tobytes()
    # (N, H, W) gets a channel axis; NHWC is transposed
    gray = data[:, 0]
    np.save(tmp_path / "gray.npy", gray)
    rc, o, e = run(capsys, "gram", tmp_path / "gray.npy", "--depth", "2", "--out", tmp_path / "gray.zarr",
                   "--backend", "numba", "--no-progress")
    assert rc == 0 and "load_train_test" not in o, e
    assert zarr.open_group(str(tmp_path / "gray.zarr"))["ntk"][...].tobytes() == \
        ce.gram(gray[:, None], depth=2, backend="numba").tobytes()
    np.save(tmp_path / "nhwc.npy", data.transpose(0, 2, 3, 1))
    rc, o, e = run(capsys, "gram", f"{tmp_path / 'd.npz'}:x_test", "--depth", "2", "--out",
                   tmp_path / "k.zarr", "--backend", "numba", "--no-progress")
    assert rc == 0, e
    rc, o, e = run(capsys, "gram", tmp_path / "nhwc.npy", "--data-format", "NHWC", "--depth", "2",
                   "--out", tmp_path / "n.zarr", "--backend", "numba", "--no-progress", "--dtype", "float64")
    assert rc == 0, e
    assert zarr.open_group(str(tmp_path / "n.zarr"))["ntk"][...].tobytes() == \
        ce.gram(data, depth=2, backend="numba", dtype="float64").tobytes()


def test_errors_are_one_line_and_leave_no_store(tmp_path, data, capsys):
    np.save(tmp_path / "flat.npy", np.zeros((3, 4)))
    (tmp_path / "junk.npy").write_text("hello")
    np.save(tmp_path / "nan.npy", np.full((2, 1, 3, 3), np.nan))
    np.savez(tmp_path / "d2.npz", x=data, x_test=data[:2])
    out = tmp_path / "o.zarr"
    cases = [
        (["gram", tmp_path / "missing.npy", "--depth", "3"], "does not exist"),
        (["gram", tmp_path / "flat.npy", "--depth", "3"], "shape (3, 4)"),
        (["gram", tmp_path / "junk.npy", "--depth", "3"], "is not a NumPy .npy/.npz file"),
        (["gram", tmp_path / "nan.npy", "--depth", "3"], "NaN"),
        (["gram", tmp_path / "d.npz:nokey", "--depth", "3"], "no array 'nokey'"),
        (["gram", f"{tmp_path / 'x.npy'}:x", "--depth", "3"], "is a .npy array, not an .npz archive"),
        (["gram", tmp_path / "x.npy", "--depth", "1"], "depth"),
        (["gram", tmp_path / "x.npy", "--depths", "3,a"], "--depths"),
        (["gram", tmp_path / "x.npy", "--depth", "3", "--devices", "0", "--backend", "numba"], "CPU"),
        (["gram", tmp_path / "x.npy", "--depth", "3", "--tile", "0"], "--tile"),
        (["gram", tmp_path / "x.npy", "--x2", tmp_path / "flat.npy", "--depth", "3"], "--x2"),
        # --x2 d2.npz holding x and x_test: which one is meant cannot be told
        (["gram", tmp_path / "x.npy", "--x2", tmp_path / "d2.npz", "--depth", "3"],
         "holds several image arrays, ['x', 'x_test']: name the one to use as"),
    ]
    for argv, word in cases:
        rc, o, e = run(capsys, *argv, "--out", out)
        assert rc == 2 and word in e, (argv, e)
        assert e.startswith("cntk-engine: error:") and e.count("\n") == 1 and "Traceback" not in e
        assert not out.exists()
    rc, o, e = run(capsys, "gram", tmp_path / "x.npy", "--depth", "3", "--out", tmp_path / "no" / "o.zarr")
    assert rc == 2 and "does not exist" in e
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d.npz", "d2.npz", "flat.npy", "junk.npy", "nan.npy",
                                                          "x.npy"]


def test_not_numpy_files_say_so_and_never_suggest_pickle(tmp_path, data, capsys):
    """A text file is "not a NumPy .npy/.npz file" (what was found, what is accepted), not
    NumPy's "pickled data ... allow_pickle=" advice; an object array is named as such."""
    (tmp_path / "bad.txt").write_text("1 2 3\n4 5 6\n")
    (tmp_path / "empty.npy").write_bytes(b"")
    np.save(tmp_path / "obj.npy", np.array([None, 1], dtype=object), allow_pickle=True)
    np.savez(tmp_path / "obj.npz", x=np.array([None, 1], dtype=object))
    for name, words in (("bad.txt", ("is not a NumPy .npy/.npz file (it starts with b'1 2 3",
                                     "text); accepted: an .npy array saved by np.save, or an .npz archive")),
                        ("empty.npy", ("is not a NumPy .npy/.npz file (an empty file)",)),
                        ("obj.npy", ("cannot be read as a NumPy .npy/.npz file: it holds an object array",)),
                        ("obj.npz", ("cannot be read as a NumPy .npy/.npz file: it holds an object array",))):
        rc, o, e = run(capsys, "gram", tmp_path / name, "--depth", "3", "--out", tmp_path / "s.zarr")
        assert rc == 2 and all(w in e for w in words), (name, e)
        assert "allow_pickle" not in e and "pickle.load" not in e and e.count("\n") == 1
    assert not (tmp_path / "s.zarr").exists()


def test_out_that_is_not_a_store_is_refused_as_such(tmp_path, data, capsys):
    """An existing --out that is not a store (a file, a folder) is refused with or without
    --resume, with the same words, and --resume is not suggested (it could not continue it)."""
    f = tmp_path / "afile"
    f.write_text("hi")
    (tmp_path / "adir").mkdir()
    for target, found in ((f, "(a file)"), (tmp_path / "adir", "(a folder without zarr.json)")):
        errs = []
        for extra in ((), ("--resume",), ("--join",)):
            rc, o, e = run(capsys, "gram", tmp_path / "x.npy", "--depth", "3", "--out", target,
                           "--backend", "numba", *extra)
            assert rc == 2 and e.count("\n") == 1, e
            errs.append(e)
        assert errs[0] == errs[1] == errs[2]
        assert f"--out {str(target)!r} exists and is not a Zarr (v3) store {found}; refusing to touch it" in e
        assert "--out takes a path that does not exist yet" in e and "--resume" not in e
    assert f.read_text() == "hi" and list((tmp_path / "adir").iterdir()) == []


def test_resume_of_a_missing_store_notes_that_it_starts_one(tmp_path, data, capsys):
    out = tmp_path / "new.zarr"
    rc, o, e = run(capsys, "gram", tmp_path / "x.npy", "--depth", "3", "--out", out, "--resume",
                   "--backend", "numba", "--no-progress")
    assert rc == 0 and f"note: no store at --out {str(out)!r}; starting a new one" in e, e
    rc, o, e = run(capsys, "gram", tmp_path / "x.npy", "--depth", "3", "--out", out, "--resume",
                   "--backend", "numba", "--no-progress")
    assert rc == 0 and "note" not in e and "computed 0 of" in o
    out2 = tmp_path / "join.zarr"       # --join: creating it is what it is for, no note
    rc, o, e = run(capsys, "gram", tmp_path / "x.npy", "--depth", "3", "--out", out2, "--join",
                   "--backend", "numba", "--no-progress", "--tile", "9")
    assert rc == 0 and "note" not in e and "computed 1 of 1 tile (" in o, o
    # verify of a tiny store: a rate in units that fit, "1 finished tile"
    rc, o, e = run(capsys, "verify", out2)
    assert rc == 0 and "verified 1 finished tile: " in o and " 0 MB/s" not in o and "1 of 1 tile done" in o, o
    assert "B read in" in o and "B/s)" in o
    # --complete: is the job done?  A finished store 0, an unfinished one 1, saying what is left
    assert run(capsys, "verify", out2, "--complete")[0] == 0
    zarr.open_group(str(out2), mode="r+")["tiles_done"][0, 0] = 0
    rc, o, e = run(capsys, "verify", out2)
    assert rc == 0 and "0 of 1 tile done (unfinished)" in o, o
    rc, o, e = run(capsys, "verify", out2, "--complete")
    assert rc == 1 and "--complete: 1 tile not computed yet; resuming the gram job" in o, o


def test_info_and_demo(capsys):
    rc, o, e = run(capsys, "info")
    assert rc == 0 and "numba" in o and "backends:" in o and "GPUs visible" in o
    assert "cntk-engine[" not in o
    m = cli.common.machine()
    assert f"CPU: {m['cpu']} (" in o        # the model, not an empty processor()
    assert f"numba compiles for {m['numba_cpu']}" in o and m["numba_cpu"] not in ("", "host")
    rc, o, e = run(capsys, "demo", "--n", "60", "--depth", "2", "--backend", "numba", "--no-progress")
    assert rc == 0, e
    assert "60 x 60" in o and "on backend numba" in o and "pairs/s" in o
    assert " 1 tiles" not in o and ("1 tile of 60 x 60" in o or "tiles of" in o), o
    # 4 of each class's 6 digits trained on, the other 2 classified (a split by position alone
    # left classes without a training digit: 0% with --n 20): well above chance (10%) for both
    accs = [float(v) for v in re.findall(r"kernel regression on 40 digits classifies the other 20 "
                                         r"with accuracy (\d+)%", o)]
    assert len(accs) == 2 and min(accs) >= 35, o
    x, y = cli.demo.demo_data()
    assert x.shape == (200, 28, 28) and x.dtype == np.uint8 and sorted(set(y.tolist())) == list(range(10))


def test_info_warns_of_fork_under_gnu_openmp(capsys, monkeypatch):
    """Under NUMBA_THREADING_LAYER=omp a Pool forked after a call hangs (helper-93): said."""
    from cntk_engine.backends import numba_cpu
    rc, o, _ = run(capsys, "info")
    assert rc == 0 and ("Pool hangs" in o) == ("threading layer: omp" in o)     # tbb here
    monkeypatch.setattr(numba_cpu, "threading_layer", lambda: "omp (in use)")
    rc, o, _ = run(capsys, "info")
    assert rc == 0 and ("threading layer: omp (in use) (under GNU OpenMP a process forked after a "
                        "kernel call is killed and a multiprocessing Pool hangs: use tbb, or the "
                        "'spawn' start method)") in o


def test_every_command_is_registered_and_gram_evaluate_share_their_options(capsys):
    helps = {}
    for command in ("gram", "evaluate", "info", "demo"):
        with pytest.raises(SystemExit) as e:
            cli.main([command, "--help"])
        assert e.value.code == 0
        helps[command] = capsys.readouterr().out
    for opt in ("--depth", "--depths", "--pooling", "--fix", "--kernel", "--convention", "--W-std",
                "--b-std", "--filter-size", "--backend", "--dtype", "--tile", "--data-format",
                "--no-progress"):
        assert opt in helps["gram"] and opt in helps["evaluate"], opt


def test_names_of_up_to_255_bytes_are_written(tmp_path, data, capsys):
    """The temporary names beside them added 14 (result files) and 23 bytes (a store's
    creation): names the file system takes were refused, evaluate's --json after all the work
    (helper-93).  Two long store names sharing their first 200 bytes keep apart."""
    np.savez(tmp_path / "xy.npz", x=np.concatenate([data, data]), y=np.arange(18) % 2)
    for name in ("g" * 250 + ".zarr", "g" * 249 + "h.zarr"):
        rc, o, e = run(capsys, "gram", tmp_path / "x.npy", "--depth", "2", "--out", tmp_path / name,
                       "--backend", "numba", "--no-progress")
        assert rc == 0 and (tmp_path / name / "zarr.json").exists(), e
    rc, o, e = run(capsys, "evaluate", tmp_path / "xy.npz", "--depth", "2", "--n-train", "12",
                   "--n-test", "6", "--backend", "numba", "--no-progress", "--json",
                   tmp_path / ("r" * 250 + ".json"))
    assert rc == 0 and (tmp_path / ("r" * 250 + ".json")).exists(), e
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]     # no temporary left


def test_suggested_commands_keep_names_that_begin_with_a_dash(tmp_path, data, capsys, monkeypatch):
    """`preprocess ./-x.npz --out ./-pp.npz` suggested `gram -pp.npz:x_train`, which the
    command reads as an option (helper-93)."""
    from cntk_engine.cli.common import shell_arg
    assert shell_arg("-pp.npz:x_train") == "./-pp.npz:x_train"
    assert shell_arg(Path("a b.npz")) == "'a b.npz'" and shell_arg("/d/-x.npz") == "/d/-x.npz"
    monkeypatch.chdir(tmp_path)
    np.savez("-x.npz", x_train=data, x_test=data[:3])
    rc, o, e = run(capsys, "preprocess", "./-x.npz", "--preprocess", "none", "--out", "./-pp.npz")
    assert rc == 0 and "cntk-engine gram ./-pp.npz:x_train ... --out train.zarr" in o, o + e


def test_version(capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(["--version"])
    assert e.value.code == 0 and capsys.readouterr().out == f"cntk-engine {ce.__version__}\n"


def test_python_m_entry_point(tmp_path):
    # run outside the checkout: `python -m` puts the working directory first on sys.path
    r = subprocess.run([sys.executable, "-m", "cntk_engine", "info"], cwd=tmp_path, capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 0 and "backends:" in r.stdout
    # info says where the package is and, plainly, whether its CUDA extension was built
    assert f"imported from {Path(ce.__file__).parent}" in r.stdout
    line = next(x for x in r.stdout.splitlines() if x.startswith("CUDA extension: "))
    try:
        from cntk_engine import _cuda  # noqa: F401
        assert line.startswith("CUDA extension: built for sm_"), line
    except ImportError:
        assert line.startswith(("CUDA extension: not built: ", "CUDA extension: unknown")), line
    r = subprocess.run([sys.executable, "-m", "cntk_engine", "gram", "nothing.npy", "--depth", "3",
                        "--out", "x.zarr"], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and r.stderr.strip().endswith("does not exist") and "Traceback" not in r.stderr


# ----------------------------------------------------------------------------- review fixes
@pytest.mark.parametrize("argv, msg", [
    (["--n", "0"], "--n must be between 20 (two digits of each class: one to train on, one to classify) and 200; got 0"),
    (["--n", "19"], "and 200; got 19"),
    (["--depth", "0"], "--depth must be an integer from 2 (conv layers + 1) to 1000; got 0"),
    (["--depth", "1"], "--depth must be an integer from 2"),
    (["--depth", "5000"], "to 1000; got 5000"),                  # before the header is printed
])
def test_demo_zero_is_refused_not_a_default(capsys, argv, msg):
    """``--n 0`` / ``--depth 0`` used to run the demo silently with the defaults."""
    rc, o, e = run(capsys, "demo", *argv, "--backend", "reference", "--no-progress")
    assert rc == 2 and msg in e, e
    assert e.startswith("cntk-engine: error:") and e.count("\n") == 1 and o == ""


def test_gram_w_std_0_is_refused_before_the_data_is_read(tmp_path, capsys):
    """A Gram of --W-std 0 is the same number for every pair (solve refuses it, evaluate
    refused its options): gram computed it, hours at scale, without a word."""
    out = tmp_path / "w0.zarr"
    rc, o, e = run(capsys, "gram", tmp_path / "missing.npy", "--depth", "3", "--convention",
                   "neural_tangents", "--W-std", "0", "--b-std", "1", "--out", out, "--no-progress")
    assert rc == 2 and e.startswith("cntk-engine: error: --W-std 0 makes the kernel the same for "
                                    "every pair of images") and e.count("\n") == 1, e
    assert not out.exists()


def test_gram_fix_at_depth_2_is_a_one_line_error(tmp_path, data, capsys):
    out = tmp_path / "f.zarr"
    for d in (["--depth", "2"], ["--depths", "2,3"]):
        rc, o, e = run(capsys, "gram", tmp_path / "x.npy", *d, "--fix", "--out", out,
                       "--backend", "reference", "--no-progress")
        assert rc == 2 and e.startswith("cntk-engine: error: --fix needs depth >= 3") and \
            e.count("\n") == 1 and "identically 0" in e, e
        assert f"got {' '.join(d)}:" in e, e            # as typed, not "depths [2]"
        assert not out.exists()


@pytest.mark.parametrize("argv, says, not_says", [
    (["--x2", "{tmp}/small.npy", "--depth", "2"], "DATA and --x2 must have the same (C, H, W)", "x1"),
    (["--pooling", "lap", "--lap-window", "9", "--depth", "2"], "--lap-window 9 is larger than the "
     "images: 6 x 6", "lap_window="),
    (["--lap-window", "2", "--depth", "2"], "--lap-window 2 belongs to --pooling 'lap'; got --pooling "
     "'gap'", "pooling="),
    (["--devices", "0", "--backend", "numba", "--depth", "2"], "--devices 0 selects GPUs, but this "
     "backend runs on the CPU (with every core); use --backend 'cuda' or leave --devices unset",
     "devices="),
    (["--depths", "3,3"], "--depths must not repeat", ": depths must"),
    (["--depth", "3", "--W-std", "2"], "--W-std and --b-std belong to --convention 'neural_tangents'",
     "W_std"),
    (["--architecture", "myrtle5", "--depth", "5"], "leave --depth and --depths out", "leave depth"),
    (["--depth", "3", "--filter-size", "4"], "--filter-size must be a positive odd integer",
     "filter_size"),
])
def test_library_errors_name_the_options_of_the_command_line(tmp_path, data, capsys, argv, says,
                                                            not_says):
    """The checks of the library (one place each) name the argument as the caller wrote it: on
    the command line its option, in Python its parameter, also after a command failed."""
    np.save(tmp_path / "small.npy", data[:, :, :4, :4])
    out = tmp_path / "o.zarr"
    rc, o, e = run(capsys, "gram", tmp_path / "x.npy", *[a.format(tmp=tmp_path) for a in argv],
                   "--out", out, "--no-progress")
    assert rc == 2 and says in e and not_says not in e, e
    assert not out.exists()
    # the spelling was the command's only: Python's own after it, in this thread
    with pytest.raises(ValueError, match=r"devices=\[0\] selects GPUs.*backend='cuda'"):
        ce.gram(data, depth=2, backend="numba", devices=[0])


def test_a_store_of_another_job_is_refused_naming_out(tmp_path, data, capsys):
    out = tmp_path / "g.zarr"
    rc, _, e = run(capsys, "gram", tmp_path / "x.npy", "--depth", "2", "--out", out,
                   "--backend", "numba", "--no-progress")
    assert rc == 0, e
    rc, _, e = run(capsys, "gram", tmp_path / "x.npy", "--depth", "3", "--out", out, "--resume",
                   "--backend", "numba", "--no-progress")
    assert rc == 2 and f"--out {str(out)!r} holds another job" in e and "another --out path" in e, e
    assert "out=" not in e


@pytest.mark.parametrize("argv", [["-v", "-q", "info"], ["-v", "info", "-q"], ["info", "--quiet", "--verbose"]])
def test_verbose_and_quiet_together_are_refused(capsys, argv):
    """Given both, -v won silently; before or after the command, either order."""
    with pytest.raises(SystemExit) as ex:
        cli.main(argv)
    o, e = capsys.readouterr()
    assert ex.value.code == 2 and o == "" and e.count("\n") == 1, e
    assert e.startswith("cntk-engine: error: -v/--verbose (debug logging) and -q/--quiet (warnings "
                        "only) contradict each other"), e


def test_an_interrupted_command_says_one_line_not_zarrs_pending_reads(tmp_path):
    """Ctrl-C while zarr has reads pending in its event loop (a large store's bookkeeping): at
    exit asyncio logged each destroyed task with its traceback, thousands of lines after the one
    that matters.  The command (main() of the process, argv from sys.argv) says only that line; a
    caller's main(argv) leaves the process's logging and hooks alone."""
    code = textwrap.dedent("""
        import asyncio, logging, sys
        from zarr.core.sync import _get_loop
        import cntk_engine.cli.info as info
        from cntk_engine.cli import main

        async def forever():
            await asyncio.sleep(3600)

        def interrupted(args):
            for _ in range(50):
                asyncio.run_coroutine_threadsafe(forever(), _get_loop())
            # the loop runs its callbacks in order: once this one is done, the 50 have started
            asyncio.run_coroutine_threadsafe(asyncio.sleep(0), _get_loop()).result()
            raise KeyboardInterrupt

        info.run = interrupted
        if sys.argv[1] == "caller":
            hook = sys.unraisablehook
            assert main(["info"]) == 130
            assert sys.unraisablehook is hook and logging.getLogger("asyncio").level == logging.NOTSET
            sys.exit(0)
        sys.argv = ["cntk-engine", "info"]
        sys.exit(main())
    """)
    done = run_script(code, "command", cwd=tmp_path, timeout=120)
    assert done.returncode == 130 and done.stderr == "cntk-engine: interrupted\n", done.stderr[-2000:]
    done = run_script(code, "caller", cwd=tmp_path, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "Task was destroyed but it is pending" in done.stderr       # what the command hides


@pytest.mark.parametrize("command, resume", [("gram", True), ("demo", False), ("evaluate", False)])
def test_interrupt_message_mentions_resume_only_for_gram(monkeypatch, capsys, tmp_path, command, resume):
    def interrupted(args):
        raise KeyboardInterrupt

    monkeypatch.setattr(cli.gram, "run", interrupted)
    monkeypatch.setattr(cli.demo, "run", interrupted)
    monkeypatch.setattr(cli.evaluate, "run", interrupted)
    argv = {"gram": ["gram", "x.npy", "--depth", "3", "--out", str(tmp_path / "o.zarr")],
            "demo": ["demo"], "evaluate": ["evaluate", "d.npz", "--depth", "3"]}[command]
    if command == "gram":       # interrupted before the store existed: nothing to resume
        rc, o, e = run(capsys, *argv)
        assert rc == 130 and e == "cntk-engine: interrupted before --out was created; nothing was stored\n", e
        ce.gram(np.ones((2, 1, 3, 3)), depth=2, backend="numba", out=tmp_path / "o.zarr")
    rc, o, e = run(capsys, *argv)
    assert rc == 130 and e.startswith("cntk-engine: interrupted") and e.count("\n") == 1
    assert ("--resume" in e) == resume, e


def test_spelling_of_arguments_in_python_and_on_the_command_line():
    from cntk_engine.spelling import arg, arg_prefix, command_line
    assert (arg("lap_window"), arg("lap_window", 9), arg("pooling", "lap"), arg_prefix("out")) == \
        ("lap_window", "lap_window=9", "pooling='lap'", "out=")
    parser = cli.build_parser()
    gram = next(a for a in parser._actions if a.dest == "command").choices["gram"]
    options = gram.get_default("python_options")
    assert options["x1"] == "DATA" and options["lap_window"] == "--lap-window" and \
        options["client"] == "--scheduler" and options["W_std"] == "--W-std"
    with command_line(options):
        assert (arg("lap_window", 9), arg("pooling", "lap"), arg("depths", [3, 4]), arg("fix", True),
                arg("x1"), arg_prefix("out"), arg("ridge", 1.0)) == \
            ("--lap-window 9", "--pooling 'lap'", "--depths 3,4", "--fix", "DATA", "--out ",
             "ridge=1.0")                           # gram has no --ridge: Python's spelling
        with pytest.raises(ValueError):
            with command_line({}):
                assert arg("lap_window", 9) == "lap_window=9"
                raise ValueError
        assert arg("tile", 0) == "--tile 0"
    assert arg("tile", 0) == "tile=0"


def test_global_options_also_after_the_command(tmp_path, data, capsys):
    """--debug, -q, -v work before and after the command (a traceback with --debug)."""
    for argv in (["--debug", "gram"], ["gram", "--debug"]):
        with pytest.raises(ValueError, match="--depths must be a list of integers >= 2"):
            cli.main([*argv, str(tmp_path / "x.npy"), "--depths", "0,3", "--out", str(tmp_path / "o.zarr")])
    rc = cli.main(["gram", str(tmp_path / "x.npy"), "--depth", "2", "--out", str(tmp_path / "o.zarr"),
                   "--backend", "numba", "-q", "--no-progress"])
    _, err = capsys.readouterr()
    assert rc == 0 and "INFO" not in err, err
    args = cli.build_parser().parse_args(["-q", "verify", "s.zarr"])
    assert args.quiet and not args.debug and not args.verbose


@pytest.mark.parametrize("depths, msg", [
    ("3,,4", "--depths must be comma-separated integers, e.g. 3,4,6,11; got '3,,4'"),
    ("3,4,", "got '3,4,'"),
    ("0", "--depths must be a list of integers >= 2 (conv layers + 1, as in the paper); got [0]"),
])
def test_depth_lists_with_empty_or_small_items_are_refused(tmp_path, data, capsys, depths, msg):
    rc, o, e = run(capsys, "gram", tmp_path / "x.npy", "--depths", depths, "--out", tmp_path / "o.zarr")
    assert rc == 2 and msg in e, e
    rc, o, e = run(capsys, "gram", tmp_path / "x.npy", "--depth", "2", "--devices", "0,,1", "--out",
                   tmp_path / "o.zarr")
    assert rc == 2 and "--devices must be 'all' or comma-separated GPU ids such as 0,1; got '0,,1'" in e, e
    rc, o, e = run(capsys, "gram", tmp_path / "x.npy", "--depth", "2", "--devices", "ALL", "--backend", "numba",
                   "--out", tmp_path / "all.zarr")
    assert rc == 0, e                 # 'all' in any case: every core on the CPU
    rc, o, e = run(capsys, "gram", tmp_path / "x.npy", "--depth", "2", "--pooling", "lap", "--out",
                   tmp_path / "o.zarr")
    assert rc == 2 and "--pooling 'lap' needs --lap-window" in e and "None" not in e, e


def test_a_reader_that_leaves_early_is_not_an_error(tmp_path):
    """`cntk-engine info | head -1`: the broken pipe ends the command quietly (exit 141, as a
    shell reports SIGPIPE), not with "error: [Errno 32] Broken pipe"."""
    code = ("import sys\nfrom cntk_engine import cli\nfrom cntk_engine.cli import info\n"
            "info.run = lambda args: [print('x' * 100) for _ in range(100000)] and 0\n"
            "sys.exit(cli.main(['info']))\n")
    p = subprocess.Popen([sys.executable, "-c", code], cwd=tmp_path, stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE)
    assert p.stdout.readline().strip() == b"x" * 100
    p.stdout.close()
    err = p.stderr.read()
    assert p.wait(timeout=60) == 141 and err == b"", err


def test_gram_out_and_scheduler_refusals_name_the_option(tmp_path, data, capsys):
    """A file where --out's folder should be, a folder the store cannot be made in (its
    temporary name is not the caller's), an empty --scheduler (it ran locally, exit 0)."""
    (tmp_path / "notes.txt").write_text("x")
    base = ["gram", tmp_path / "x.npy", "--depth", "3", "--backend", "numba", "--no-progress"]
    rc, o, e = run(capsys, *base, "--out", tmp_path / "notes.txt" / "g.zarr")
    assert rc == 2 and f"--out {str(tmp_path / 'notes.txt' / 'g.zarr')!r}: " \
        f"{str(tmp_path / 'notes.txt')!r} is a file, not a folder" in e, e
    long = tmp_path / ("n" * 300) / "g.zarr"          # a name longer than the file system takes
    rc, o, e = run(capsys, *base, "--out", long)
    assert rc == 2 and e.startswith(f"cntk-engine: error: --out {str(long)!r}: File name too long"), e
    with pytest.raises(StoreError, match=r"^out='.*n\.zarr': File name too long"):
        ce.gram(np.ones((2, 1, 4, 4)), depth=2, out=tmp_path / ("n" * 300 + ".zarr"))
    rc, o, e = run(capsys, *base, "--out", tmp_path / "g.zarr", "--scheduler", "")
    assert rc == 2 and "--scheduler '' is empty" in e and not (tmp_path / "g.zarr").exists(), e
    if Path("/proc").is_dir():         # not writable, or (root) refusing the store's folder
        rc, o, e = run(capsys, *base, "--out", "/proc/g.zarr")
        assert rc == 2 and e.startswith("cntk-engine: error: --out '/proc/g.zarr'") and \
            ("cannot be created in '/proc'" in e or "is not writable" in e) and ".partial" not in e, e


def test_empty_paths_and_bad_options_are_refused_before_the_data_is_read(tmp_path, capsys, monkeypatch):
    """--out '' and verify '' read as the current folder ("... exists and is not a Zarr store");
    gram read DATA before it checked its options (a bad --depth was reported after the data's
    layout problem, or after loading a large file)."""
    from cntk_engine.cli import gram as gram_cli
    monkeypatch.chdir(tmp_path)
    read = []
    monkeypatch.setattr(gram_cli, "load_images", lambda *a, **k: read.append(a) or np.ones((2, 1, 4, 4)))
    for argv, msg in ((["gram", "x.npy", "--depth", "3", "--out", ""], "--out '' is empty; give the path"),
                      (["gram", "x.npy", "--depth", "1", "--out", "g.zarr"], "--depth must be an integer >= 2"),
                      (["gram", "x.npy", "--depth", "3", "--out", "g.zarr", "--scheduler", " "],
                       "--scheduler ' ' is empty"),
                      (["verify", ""], "STORE '' is empty; give the path of a Gram store")):
        rc, o, e = run(capsys, *argv)
        assert rc == 2 and e.startswith(f"cntk-engine: error: {msg}") and e.count("\n") == 1, e
    assert read == [] and list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("argv, msg", [
    (["gram", "x.npy", "--depth", "3.5", "--out", "a.zarr"],
     "cntk-engine gram: error: argument --depth: invalid int value: '3.5' (see cntk-engine gram --help)"),
    (["gram", "x.npy", "--depth", "3"], "the following arguments are required: --out"),
    # said by the command they were given to, with the nearest of its options (helper-59)
    (["info", "extra"], "cntk-engine info: error: unrecognized arguments: extra (see cntk-engine info --help)"),
    (["--frob", "info"], "cntk-engine: error: unrecognized arguments: --frob (see cntk-engine --help)"),
    (["gram", "x.npy", "--depht", "3", "--out", "a.zarr"],
     "cntk-engine gram: error: unrecognized arguments: --depht 3 (--depht: did you mean --depth?) "
     "(see cntk-engine gram --help)"),
    (["evaluate", "d.npz", "--n-trian=4", "--zzz"],
     "cntk-engine evaluate: error: unrecognized arguments: --n-trian=4 --zzz (--n-trian: did you "
     "mean --n-train?) (see cntk-engine evaluate --help)"),
])
def test_usage_errors_are_one_line(capsys, argv, msg):
    """argparse printed its whole usage block (15 lines for gram) before the error."""
    with pytest.raises(SystemExit) as e:
        cli.main(argv)
    err = capsys.readouterr().err
    assert e.value.code == 2 and msg in err and err.count("\n") == 1 and "usage:" not in err, err


def test_a_backend_that_cannot_run_is_named_as_the_option(tmp_path, data, capsys):
    """'backend 'cuda' is unavailable' from the command line, where the option is --backend (a
    helper's audit); Python names the argument as it is written there."""
    from cntk_engine.backends import available_backends
    if available_backends()["cuda"] is None:
        pytest.skip("the cuda backend can run here")
    rc, o, e = run(capsys, "gram", tmp_path / "x.npy", "--depth", "2", "--backend", "cuda", "--out",
                   tmp_path / "o.zarr")
    assert rc == 2 and "error: --backend 'cuda' is unavailable: " in e, e
    assert not (tmp_path / "o.zarr").exists()


def test_three_d_arrays_and_layouts_given_against_their_look(tmp_path, capsys, caplog, rng):
    """A 3-D array is (N, H, W), one channel (logged; --data-format, for 4-D arrays, says so),
    except one that looks like a single (H, W, C) image, refused with the batch axis to add; an
    explicit --data-format against what a shape looks like is warned of; DATA and --x2 of the
    same images (the default keys finding x_test again) are warned of."""
    kw = ["--depth", "2", "--backend", "numba", "--no-progress"]
    np.save(tmp_path / "one.npy", rng.random((8, 8, 3)))
    rc, _, e = run(capsys, "gram", tmp_path / "one.npy", "--out", tmp_path / "o.zarr", *kw)
    assert rc == 2 and "looks like the channels of one (H, W, C) image" in e and "x[None]" in e, e
    assert not (tmp_path / "o.zarr").exists()
    np.save(tmp_path / "digits.npy", rng.random((5, 6, 6)))
    with caplog.at_level("INFO", logger="cntk_engine"):      # without -q: its INFO lines
        rc = cli.main(["gram", str(tmp_path / "digits.npy"), "--data-format", "NHWC",
                       "--out", str(tmp_path / "d.zarr"), *kw])
    assert rc == 0
    assert "read as (N, H, W), one channel (--data-format NHWC is for 4-D arrays)" in caplog.text
    np.save(tmp_path / "nchw.npy", rng.random((4, 3, 8, 8)))
    caplog.clear()
    with caplog.at_level("WARNING", logger="cntk_engine"):
        rc, _, e = run(capsys, "gram", tmp_path / "nchw.npy", "--data-format", "NHWC",
                       "--out", tmp_path / "n.zarr", *kw)
    assert rc == 0 and "read as NHWC (--data-format NHWC), though they look NCHW" in caplog.text
    np.savez(tmp_path / "tt.npz", x_train=rng.random((4, 1, 6, 6)), x_test=rng.random((3, 1, 6, 6)))
    rc, _, e = run(capsys, "gram", f"{tmp_path / 'tt.npz'}:x_test", "--x2", tmp_path / "tt.npz",
                   "--out", tmp_path / "t.zarr", *kw)
    assert rc == 0 and "DATA and --x2 hold the same images" in e, e
    rc, _, e = run(capsys, "gram", f"{tmp_path / 'tt.npz'}:x_test", "--x2",
                   f"{tmp_path / 'tt.npz'}:x_train", "--out", tmp_path / "t2.zarr", *kw)
    assert rc == 0 and "same images" not in e, e
