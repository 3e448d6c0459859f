"""Many writers on one store (issue #13): processes started together split the tiles (each
computed once, every run recorded, bit-identical result); without --join the second is
refused; a writer killed with a claim held is taken over; claims of other hosts are waited
for while their heartbeat runs and taken over after the timeout; kill -9 twice, then resume."""
import json
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import numpy as np
import pytest

zarr = pytest.importorskip("zarr")

import cntk_engine as ce  # noqa: E402
from cntk_engine.jobs import store as store_mod  # noqa: E402
from cntk_engine.jobs.store import StorePath  # noqa: E402

from conftest import written_markers  # noqa: E402

if store_mod._version_tuple(zarr.__version__) < store_mod.ZARR_MIN:
    pytest.skip("the store needs zarr >= 3.1.3", allow_module_level=True)

ROOT = Path(__file__).resolve().parents[1]
ENV = dict(os.environ, NUMBA_NUM_THREADS="1",
           PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))

# A writer process: warms up (imports, numba cache), optionally slows every tile down by SLEEP
# seconds and poses as host HOST (two "nodes" sharing a file system), says it is ready, waits
# for the "go" file, then runs the command line or a Python job.
WRITER = textwrap.dedent("""
    import os, sys, time
    from pathlib import Path
    import numpy as np
    import cntk_engine as ce
    from cntk_engine import cli
    from cntk_engine.backends.numba_cpu import NumbaBackend
    from cntk_engine.jobs import store
    base, name, sleep, host = Path(sys.argv[1]), sys.argv[2], float(sys.argv[3]), sys.argv[4]
    argv = sys.argv[5:]
    ce.gram(np.ones((2, 1, 4, 4)), depth=2, backend="numba")
    if host != "-":
        store.HOST = host
    orig = NumbaBackend.pair_sums
    def slow(self, *a, **kw):
        time.sleep(sleep)
        return orig(self, *a, **kw)
    NumbaBackend.pair_sums = slow
    (base / f"ready.{name}").touch()
    while not (base / "go").exists():
        time.sleep(0.002)
    sys.exit(cli.main(argv))
""")


def start_writers(base: Path, argvs, sleep=0.0, hosts=None):
    """Start one writer per argv list, release them together; returns the processes."""
    procs = []
    for k, argv in enumerate(argvs):
        host = hosts[k] if hosts else "-"
        procs.append(subprocess.Popen([sys.executable, "-c", WRITER, str(base), str(k), str(sleep),
                                       host, *map(str, argv)], env=ENV, stdout=subprocess.PIPE,
                                      stderr=subprocess.PIPE, text=True))
    deadline = time.time() + 120
    while time.time() < deadline and not all((base / f"ready.{k}").exists() for k in range(len(procs))):
        if any(p.poll() is not None for p in procs):
            break
        time.sleep(0.01)
    (base / "go").touch()
    results = []
    for p in procs:
        o, e = p.communicate(timeout=300)
        results.append((p.returncode, o, e))
    return results


def claim_files(out: Path) -> list[str]:
    d = out / "claims"
    return sorted(p.name for p in d.iterdir() if p.name[0].isdigit()) if d.is_dir() else []


def unfinished_claims(out: Path) -> list[str]:
    """Claims whose tile has no marker yet: tiles being computed at this instant."""
    done = set(written_markers(out))
    return [c for c in claim_files(out) if tuple(map(int, c.split("."))) not in done]


def gram_argv(base, *extra, tile=4, kernel="ntk"):
    return ["gram", base / "x.npy", "--depth", "3", "--kernel", kernel, "--backend", "numba",
            "--tile", str(tile), "--out", base / "g.zarr", "--no-progress", *extra]


@pytest.mark.parametrize("n", [2, 3])
def test_writers_started_together_split_the_tiles(tmp_path, n):
    rng = np.random.default_rng(n)
    x = rng.standard_normal((40, 1, 12, 12))
    np.save(tmp_path / "x.npy", x)
    res = start_writers(tmp_path, [gram_argv(tmp_path, "--join")] * n, sleep=0.03)
    for rc, o, e in res:
        assert rc == 0 and "Traceback" not in e, e[-2000:]
    out = tmp_path / "g.zarr"
    g = zarr.open_group(str(out), mode="r")
    runs = store_mod.list_runs(g)
    done = g["tiles_done"][...]
    total = 55                                                       # 10 x 10 grid, upper triangle
    assert len(runs) == n and all(r["outcome"] == "finished" for r in runs)   # every run recorded
    computed = [r["tiles_computed"] for r in runs]
    assert sum(computed) == total                                    # each tile computed once
    assert all(c >= 1 for c in computed), computed                   # the work was split
    for r in runs:                                                   # ... as the markers say
        assert np.count_nonzero(done == r["run"]) == r["tiles_computed"]
    assert g["ntk"][...].tobytes() == ce.gram(x, depth=3, backend="numba", tile=4).tobytes()
    assert claim_files(out) == [] and store_mod.verify_store(out).ok
    said = [e for _, _, e in res]
    assert sum("created store" in e for e in said) == 1
    assert not any("resuming" in e for e in said)


def test_second_writer_without_join_is_refused(tmp_path):
    x = np.random.default_rng(5).standard_normal((24, 1, 8, 8))
    np.save(tmp_path / "x.npy", x)
    res = start_writers(tmp_path, [["-q", *gram_argv(tmp_path)]] * 2)   # no --resume, no --join
    assert sorted(rc for rc, _, _ in res) == [0, 2], res
    rc, o, e = next(r for r in res if r[0] == 2)
    assert e.count("\n") == 1 and e.startswith("cntk-engine: error:")
    # refused before, while or after the first one creates the store: each says what to pass
    assert "--join" in e and ("created by another process" in e or "exists" in e), e
    g = zarr.open_group(str(tmp_path / "g.zarr"), mode="r")
    assert len(store_mod.list_runs(g)) == 1
    assert [p.name for p in tmp_path.iterdir() if ".partial-" in p.name] == []
    assert g["ntk"][...].tobytes() == ce.gram(x, depth=3, backend="numba", tile=4).tobytes()


def test_writer_killed_with_a_claim_held_is_taken_over(tmp_path, caplog):
    x = np.random.default_rng(11).standard_normal((24, 1, 8, 8))
    np.save(tmp_path / "x.npy", x)
    out = tmp_path / "g.zarr"
    proc = subprocess.Popen([sys.executable, "-c", WRITER, str(tmp_path), "0", "0.4", "-",
                             *map(str, gram_argv(tmp_path))], env=ENV,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.time() + 120
    while time.time() < deadline and not (tmp_path / "ready.0").exists() and proc.poll() is None:
        time.sleep(0.01)
    (tmp_path / "go").touch()
    # Kill while a claim of an unfinished tile is held, after two tiles are done.  Every tile
    # sleeps 0.4 s before computing, so such a claim is held for at least 0.4 s at a time
    # (a claim whose marker is already written belongs to a tile that has just finished: it is
    # removed by the next opener, not taken over; see below).
    try:
        while time.time() < deadline and proc.poll() is None:
            if len(written_markers(out)) >= 2 and unfinished_claims(out):
                os.kill(proc.pid, signal.SIGKILL)
                break
            time.sleep(0.005)
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(30)
    assert proc.returncode == -signal.SIGKILL, proc.stderr.read().decode()[-1000:]
    before = zarr.open_group(str(out), mode="r")["tiles_done"][...]
    held = [c for c in claim_files(out) if before[tuple(map(int, c.split(".")))] == 0]
    assert held, "no claim of an unfinished tile was held when the writer was killed"
    i, j = map(int, held[0].split("."))
    with caplog.at_level("WARNING", logger="cntk_engine"):
        g, info = ce.gram(x, depth=3, backend="numba", tile=4, out=out, return_info=True)
    assert f"took over tile ({i}, {j})" in caplog.text and f"{proc.pid} is gone" in caplog.text
    assert info["tiles_computed"] == 21 - np.count_nonzero(before)
    assert g["ntk"][...].tobytes() == ce.gram(x, depth=3, backend="numba", tile=4).tobytes()
    assert claim_files(out) == []
    runs = store_mod.list_runs(g)
    assert "outcome" not in runs[-2] and runs[-1]["outcome"] == "finished"   # the killed run


def test_stale_claim_of_a_finished_tile_is_removed(tmp_path, caplog):
    """A writer killed after a tile's marker and before releasing its claim: nobody needs to
    take the claim over, so the next opener removes it."""
    x, out = unfinished_store(tmp_path, [(1, 2)])
    f = plant_claim(out, (0, 1), age=100)                        # tile (0, 1) is finished
    live = plant_claim(out, (0, 0))                              # another host's fresh claim
    with caplog.at_level("INFO", logger="cntk_engine"):
        _, info = ce.gram(x, depth=3, backend="numba", out=StorePath(out, claim_timeout=5),
                          return_info=True)
    assert info["tiles_computed"] == 1 and not f.exists() and live.exists()
    assert "removed 1 stale claims of finished tiles" in caplog.text


def plant_claim(out: Path, tile, host="node-b", pid=4242, age=0.0) -> Path:
    f = out / "claims" / f"{tile[0]}.{tile[1]}"
    f.write_text('{"host": "%s", "pid": %d, "run": 9, "claim": "c0ffee", "pidns": "x"}' % (host, pid))
    if age:
        t = time.time() - age
        os.utime(f, (t, t))
    return f


def unfinished_store(tmp_path, tiles):
    x = np.random.default_rng(3).standard_normal((12, 1, 6, 6))
    out = tmp_path / "g.zarr"
    ce.gram(x, depth=3, backend="numba", tile=4, out=out)
    g = zarr.open_group(str(out), mode="r+")
    for t in tiles:
        g["tiles_done"][t] = 0
    return x, out


def test_stale_claim_of_another_host_is_taken_over_after_the_timeout(tmp_path, caplog):
    x, out = unfinished_store(tmp_path, [(0, 1), (1, 2)])
    plant_claim(out, (0, 1), age=100)
    with caplog.at_level("WARNING", logger="cntk_engine"):
        _, info = ce.gram(x, depth=3, backend="numba", out=StorePath(out, claim_timeout=5),
                          return_info=True)
    assert info["tiles_computed"] == 2
    assert "took over tile (0, 1) from node-b:4242 (run 9): it was not renewed for 100 s" in caplog.text


def test_live_claim_of_another_host_is_waited_for_until_its_heartbeat_stops(tmp_path, caplog):
    x, out = unfinished_store(tmp_path, [(0, 1), (1, 2)])
    f = plant_claim(out, (0, 1))
    stop = time.time() + 2.0

    def heartbeat():                                     # the other host's writer, then it dies
        while time.time() < stop:
            os.utime(f)
            time.sleep(0.05)

    th = threading.Thread(target=heartbeat)
    th.start()
    t0 = time.perf_counter()
    with caplog.at_level("INFO", logger="cntk_engine"):
        g, info = ce.gram(x, depth=3, backend="numba", out=StorePath(out, claim_timeout=1.0),
                          return_info=True)
    waited = time.perf_counter() - t0
    th.join()
    assert waited >= 2.5                                 # 2 s of heartbeats + the 1 s timeout
    assert "waiting for 1 tiles being computed by other writers (node-b:4242 (run 9))" in caplog.text
    assert "took over tile (0, 1) from node-b:4242" in caplog.text and "not renewed" in caplog.text
    assert info["tiles_computed"] == 2
    assert g["ntk"][...].tobytes() == ce.gram(x, depth=3, backend="numba", tile=4).tobytes()


def test_a_claim_is_judged_by_its_owners_timeout(tmp_path, caplog):
    """A claim records its owner's timeout (it renews at a quarter of it): a writer given a
    shorter one does not take it over while it is younger than the owner's (it waits); one given
    a longer one takes over a dead owner's claim at the owner's, not its own."""
    x, out = unfinished_store(tmp_path, [(0, 1)])
    f = plant_claim(out, (0, 1), age=3.0)
    rec = json.loads(f.read_text())
    f.write_text(json.dumps(dict(rec, timeout=600.0)))
    t = time.time() - 3.0
    os.utime(f, (t, t))
    claims = store_mod.Claims(out, 1.0, {})
    assert claims.staleness(*claims._read(f)) is None               # 3 s old, owner's 600 s
    f.write_text(json.dumps(dict(rec, timeout=2.0)))
    os.utime(f, (t, t))
    patient = store_mod.Claims(out, 600.0, {})
    assert patient.staleness(*patient._read(f)) == "it was not renewed for 3 s (claim timeout 2 s)"
    with caplog.at_level("WARNING", logger="cntk_engine"):
        _, info = ce.gram(x, depth=3, backend="numba", out=StorePath(out, claim_timeout=600),
                          return_info=True)
    assert info["tiles_computed"] == 1 and "took over tile (0, 1)" in caplog.text


def test_a_claim_of_another_boot_is_judged_by_its_age(tmp_path):
    """The same hostname and pid namespace on another machine (cloned VMs, containers of one
    name share the initial pid namespace's id): its boot id differs, so its owner's pid is not
    looked up here, where it would read as gone (or as some other live process)."""
    _, out = unfinished_store(tmp_path, [(0, 1)])
    f = out / "claims" / "0.1"
    owner = {"host": store_mod.HOST, "pidns": store_mod.PID_NAMESPACE, "pid": 2 ** 22 + 7,
             "claim": "c0ffee", "run": 9, "timeout": 60.0}
    f.write_text(json.dumps(dict(owner, boot="another-boot")))
    claims = store_mod.Claims(out, 60.0, {})
    if store_mod.BOOT_ID is not None:
        assert claims.staleness(*claims._read(f)) is None            # fresh: live
    f.write_text(json.dumps(dict(owner, boot=store_mod.BOOT_ID)))
    assert "is gone" in claims.staleness(*claims._read(f))           # this boot: the pid decides


def test_a_writer_whose_claim_was_taken_over_leaves_the_tile(tmp_path, caplog):
    """A writer that stalled beyond its timeout finds, before writing the tile and again before
    its checksums and marker, that another writer took the claim over: it writes no marker and
    keeps no claim, and the tile is the other writer's."""
    _, out = unfinished_store(tmp_path, [(0, 1)])
    g, sink, t, _ = _sink_and_tile(out)
    assert sink.claim(t)
    f = out / "claims" / "0.1"
    f.write_text(json.dumps({"host": "node-b", "pid": 1, "claim": "theirs", "run": 9}))   # taken over
    with caplog.at_level("WARNING", logger="cntk_engine"):
        assert sink(t, np.zeros((4, 4, 1, 1))) is False
    assert "tile (0, 1) was taken over by another writer while this one computed it" in caplog.text
    assert int(g["tiles_done"][0, 1]) == 0 and f.exists()          # no marker; their claim stays
    assert not sink.claims().held


def _read_then(claims, f, action, nth=1):
    """Make ``claims`` run ``action`` right after its ``nth`` read of claim file ``f``: another
    writer acting between a read and the unlink that follows it."""
    orig, fired, reads = claims._read, [], []

    def read(path):
        got = orig(path)
        if Path(path) == f:
            reads.append(path)
            if len(reads) == nth:
                fired.append(action())
        return got
    claims._read = read
    return fired


@pytest.mark.parametrize("nth", [1, 2])
def test_a_release_never_unlinks_the_claim_of_a_writer_that_took_it_over(tmp_path, nth):
    """A writer whose claim another writer judges stale (it stalled beyond its timeout) releases
    it while the other takes it over: the release must not unlink the taker's new claim, or a
    third writer computes the tile again beside it.  The takeover comes after the release's
    first read of the claim, or after its read under the claim's marker (the taker then finds
    the marker held and leaves the claim)."""
    (tmp_path / "claims").mkdir()
    f = tmp_path / "claims" / "0.1"
    mine = store_mod.Claims(tmp_path, 60.0, {"host": "node-a", "run": 1})
    assert mine.acquire(0, 1)
    stalled = mine.held[(0, 1)]
    taker = store_mod.Claims(tmp_path, 60.0, {"host": "node-b", "run": 2})
    taker.staleness = lambda owner, mtime: "stalled" if (owner or {}).get("claim") == stalled else None
    fired = _read_then(mine, f, lambda: taker.acquire(0, 1), nth)
    mine.release(0, 1)
    # after the first read the takeover succeeds and its claim stays; under the marker the
    # taker is refused and the release unlinks the stalled claim
    assert fired == [nth == 1] and taker.holds(0, 1) == f.exists() == (nth == 1)
    taker.release_all()
    assert not f.exists() and not [p.name for p in (tmp_path / "claims").iterdir()]


def test_removing_a_stale_claim_never_unlinks_the_claim_that_took_its_place(tmp_path):
    """A stale claim of a finished tile is removed while another writer takes it over: the
    removal must not unlink the new claim."""
    _, out = unfinished_store(tmp_path, [])
    f = plant_claim(out, (0, 1), age=100)
    remover = store_mod.Claims(out, 5.0, {"host": "node-a", "run": 1})
    taker = store_mod.Claims(out, 5.0, {"host": "node-c", "run": 2, "timeout": 60.0})
    fired = _read_then(remover, f, lambda: taker.acquire(0, 1))
    removed = remover.remove_stale(0, 1)
    assert fired == [True] and taker.holds(0, 1) and f.exists() and not removed
    taker.release_all()
    assert [p.name for p in (out / "claims").iterdir()] == ["zarr.json"]     # nothing left


def _claims_dir(tmp_path):
    (tmp_path / "claims").mkdir()
    return tmp_path / "claims" / "0.1"


def test_a_takeover_never_overwrites_a_claim_made_after_the_stale_one_went(tmp_path):
    """A taker finds the stale claim gone under its marker (released meanwhile), and a third
    writer claims the tile in that moment: the taker must claim afresh (and fail), not replace
    the third writer's claim."""
    f = _claims_dir(tmp_path)
    stalled = store_mod.Claims(tmp_path, 60.0, {"host": "node-a", "run": 1})
    taker = store_mod.Claims(tmp_path, 60.0, {"host": "node-b", "run": 2})
    third = store_mod.Claims(tmp_path, 60.0, {"host": "node-e", "run": 3})
    assert stalled.acquire(0, 1)
    old = stalled.held[(0, 1)]
    taker.staleness = lambda owner, mtime: "stalled" if (owner or {}).get("claim") == old else None
    orig, reads, third_got = taker._read, [], []

    def read(path):
        if Path(path) != f:
            return orig(path)
        reads.append(path)
        if len(reads) == 1:                  # the taker has judged it stale: it is released
            got = orig(path)
            stalled.release(0, 1)
            return got
        try:                                 # the taker's read under its marker finds it gone,
            return orig(path)
        except FileNotFoundError:            # and the third writer claims the tile just then
            if not third_got:
                third_got.append(third.acquire(0, 1))
            raise
    taker._read = read
    assert taker.acquire(0, 1) is False and third_got == [True] and third.holds(0, 1)
    third.release_all()


def test_a_dead_writers_marker_is_broken_only_while_it_is_the_dead_ones(tmp_path):
    """Two writers judge a dead writer's takeover marker stale; the first breaks it and takes
    the marker: the second must not then unlink the first's live marker by its name."""
    _claims_dir(tmp_path)
    over = tmp_path / "claims" / ".0.1.over.C"
    dead = {"host": store_mod.HOST, "pidns": store_mod.PID_NAMESPACE, "boot": store_mod.BOOT_ID,
            "pid": 2 ** 22 + 7, "claim": "m-dead"}
    over.write_text(json.dumps(dead))
    first = store_mod.Claims(tmp_path, 600.0, {"host": "node-t", "run": 2})
    second = store_mod.Claims(tmp_path, 600.0, {"host": "node-d", "run": 3})
    first_tmp, second_tmp = first._tmp(0, 1, "m-first"), second._tmp(0, 1, "m-second")
    orig, took = second._read, []

    def read(path):                       # the second has read the dead marker; the first acts
        got = orig(path)
        if Path(path) == over and not took:
            took.append(first._mark(0, 1, "C", first_tmp))        # breaks it: try again
            took.append(first._mark(0, 1, "C", first_tmp))        # takes it
        return got
    second._read = read
    assert second._mark(0, 1, "C", second_tmp) is None and took == [None, True]
    assert json.loads(over.read_text())["claim"] == "m-first"     # the first's, kept
    assert second._mark(0, 1, "C", second_tmp) is False           # live: not broken


def test_a_lock_left_by_a_writer_that_died_breaking_a_marker_is_removed(tmp_path):
    """A writer killed between taking the lock that breaks a dead marker and removing it: its
    lock (its record) is judged as a marker is, so the next writer removes it and takes the tile
    over, instead of every writer finding the marker "being broken" until a sweep."""
    f = _claims_dir(tmp_path)
    dead = {"host": store_mod.HOST, "pidns": store_mod.PID_NAMESPACE, "boot": store_mod.BOOT_ID,
            "pid": 2 ** 22 + 7}
    f.write_text(json.dumps(dict(dead, claim="C")))
    (tmp_path / "claims" / ".0.1.over.C").write_text(json.dumps(dict(dead, claim="M")))
    (tmp_path / "claims" / ".0.1.over.C.break.M").write_text(json.dumps(dict(dead, claim="B")))
    writer = store_mod.Claims(tmp_path, 600.0, {"run": 1})
    assert writer.acquire(0, 1) and writer.holds(0, 1)
    writer.release_all()
    assert [p.name for p in (tmp_path / "claims").iterdir()] == []


def test_an_observers_markers_say_which_process_holds_them(tmp_path):
    """A store opened to clear stale claims (an observer, no run of its own) records its
    process in the markers it takes, so a marker left by its death is judged by that process,
    at once, not by its age."""
    _claims_dir(tmp_path)
    observer = store_mod.Claims(tmp_path, 600.0, {})
    rec = json.loads(observer._tmp(0, 1, "m").read_text())
    assert (rec["host"], rec["pid"], rec["timeout"]) == (store_mod.HOST, os.getpid(), 600.0)
    gone = dict(rec, pid=2 ** 22 + 7, pstart=None)
    assert "is gone" in observer.staleness(gone, time.time())


def test_a_release_waits_for_a_marker_held_for_a_moment(tmp_path):
    """A release that finds its claim's marker held (a writer about to remove it as stale,
    which then finds it renewed) waits for it and removes the claim, rather than leave a claim
    file that nobody holds."""
    f = _claims_dir(tmp_path)
    mine = store_mod.Claims(tmp_path, 60.0, {"host": "node-a", "run": 1})
    assert mine.acquire(0, 1)
    remover = store_mod.Claims(tmp_path, 60.0, {"host": "node-d"})
    key = mine.held[(0, 1)]
    tmp = remover._tmp(0, 1, "m-remover")
    assert remover._mark(0, 1, key, tmp)
    timer = threading.Timer(0.3, lambda: os.unlink(remover._over(0, 1, key)))
    timer.start()
    t0 = time.perf_counter()
    mine.release(0, 1)
    timer.join()
    assert 0.25 < time.perf_counter() - t0 < store_mod.MARK_WAIT and not f.exists()


def test_a_release_the_disk_has_no_room_for_still_removes_the_claim(tmp_path, monkeypatch):
    """A full disk or an exceeded quota refuses the marker's record: the release removes its
    claim all the same (an unlink needs no room) and forgets it, so that it is not renewed for
    the rest of the process (a notebook, a Dask worker) with no writer able to take it."""
    import errno
    f = _claims_dir(tmp_path)
    mine = store_mod.Claims(tmp_path, 60.0, {"host": "node-a", "run": 1})
    assert mine.acquire(0, 1)
    key = mine.held[(0, 1)]

    def full(*a):
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(mine, "_tmp", full)
    mine.release(0, 1)
    assert not f.exists() and not mine.held and key not in store_mod._HELD
    assert str(f) not in store_mod._HEARTBEAT.paths


def test_a_dangling_link_in_place_of_a_claim_is_judged_by_its_age(tmp_path, caplog):
    """A symbolic link at a claim's name (never a claim's own) reads as a damaged claim, judged
    by its age: taken over once that is beyond the timeout, not taken for a claim released (the
    job then waited for it forever, saying nothing)."""
    f = _claims_dir(tmp_path)
    os.symlink(tmp_path / "nowhere", f)
    t = time.time() - 100
    os.utime(f, (t, t), follow_symlinks=False)
    claims = store_mod.Claims(tmp_path, 5.0, {"host": "node-a"})
    assert claims.staleness(*claims._read(f)).startswith("it was not renewed for")
    with caplog.at_level("WARNING", logger="cntk_engine"):
        assert claims.acquire(0, 1) and not f.is_symlink() and claims.holds(0, 1)
    assert "took over tile (0, 1)" in caplog.text
    claims.release_all()


def _sink_and_tile(out, tile=(0, 1)):
    """A StoreSink of unfinished_store's job (run 5), its group and tile ``tile``, and the
    numba backend that computes its sums."""
    g = zarr.open_group(str(out), mode="r+")
    spec = g.attrs["cntk_engine"]
    from cntk_engine.arch import make_architecture
    from cntk_engine.backends.numba_cpu import NumbaBackend
    arch = make_architecture(depth=3)
    params = arch.layer_params(1, 6, 6)
    sink = store_mod.StoreSink(str(out), arch, params, "ntk", True, 5,
                               run_uuid="u", repair={}, claim_timeout=60.0,
                               names=spec["integrity"]["arrays"], scales=(None, None))
    t = next(t for t in store_mod.GramStore._expected_tiles(spec) if (t.i, t.j) == tile)
    return g, sink, t, NumbaBackend(arch, params, np.float32)


def test_a_claim_taken_over_while_the_data_was_written_gets_no_marker(tmp_path, monkeypatch, caplog):
    """The second check, after the tile's data and before its checksums and marker: a takeover
    that happened while the data was written leaves the marker and the checksums to the writer
    that holds the claim now."""
    x, out = unfinished_store(tmp_path, [(0, 1)])
    g, sink, t, be = _sink_and_tile(out)
    sums_before = g["tiles_checksum"][0, 1]
    assert sink.claim(t)
    f = out / "claims" / "0.1"
    real = store_mod.chunk_checksum

    def taken_over_meanwhile(*a):       # called as the data chunks are written
        f.write_text(json.dumps({"host": "node-b", "pid": 1, "claim": "theirs", "run": 9}))
        return real(*a)
    monkeypatch.setattr(store_mod, "chunk_checksum", taken_over_meanwhile)
    p = be.prepare_set(np.ascontiguousarray(x))
    with caplog.at_level("WARNING", logger="cntk_engine"):
        assert sink(t, be.pair_sums(p[t.rows], p[t.cols])) is False
    assert "not written beyond its data" in caplog.text
    assert int(g["tiles_done"][0, 1]) == 0 and f.exists()
    assert np.array_equal(g["tiles_checksum"][0, 1], sums_before)


def test_a_dask_task_whose_claim_was_taken_over_reports_the_tile_skipped(monkeypatch):
    """tile_task: a tile the writer did not take (False: its claim was taken over) is reported
    "skipped", not "written" (the client would look for its marker and blame the file system)."""
    from cntk_engine.jobs import dask as jdask
    from cntk_engine.jobs.tiles import TileLayout

    class Writer:
        def claim(self, t):
            return True

        def __call__(self, t, sums):
            return False

        def release(self, t):
            raise AssertionError("released by the sink itself")

    class Backend:
        def pair_sums(self, a, b, symmetric):
            return np.zeros((len(a), len(b), 1, 2))

    tile = next(iter(TileLayout(4, 4, 2, True).tiles()))
    monkeypatch.setattr(jdask, "_state", lambda job, xa, xb: (Backend(), np.zeros(4), np.zeros(4), {"r": 1}))
    job = jdask.TaskSpec("tok", object, None, None, "float32", True, True, Writer())
    assert jdask.tile_task(job, tile, None, None)[4:] == ("skipped", None)
    Writer.__call__ = lambda self, t, sums: True
    assert jdask.tile_task(job, tile, None, None)[4:] == ("written", {"r": 1})


def test_a_claim_of_this_hosts_earlier_boot_is_stale_once_this_boot_outlived_its_renewals(
        tmp_path, monkeypatch):
    """Same hostname and pid namespace, another boot id: this machine before a reboot (the
    claim not renewed since this boot began: stale once the boot is half a timeout old) or
    another machine of this name (renewing its claim: live)."""
    _, out = unfinished_store(tmp_path, [(0, 1)])
    f = out / "claims" / "0.1"
    f.write_text(json.dumps({"host": store_mod.HOST, "pidns": store_mod.PID_NAMESPACE, "pid": 12,
                             "claim": "c0ffee", "run": 9, "timeout": 60.0, "boot": "before"}))
    monkeypatch.setattr(store_mod, "BOOT_ID", "now")
    claims = store_mod.Claims(out, 60.0, {})
    now = time.time()
    t = now - 50                                                 # within its 60 s timeout
    os.utime(f, (t, t))
    monkeypatch.setattr(store_mod, "BOOT_TIME", now - 40)        # renewed before this boot
    assert claims.staleness(*claims._read(f)) == "it was left before this machine's last boot"
    monkeypatch.setattr(store_mod, "BOOT_TIME", now - 20)        # booted < half a timeout ago
    assert claims.staleness(*claims._read(f)) is None
    os.utime(f, (now - 5, now - 5))                              # renewed since: a namesake's
    monkeypatch.setattr(store_mod, "BOOT_TIME", now - 40)
    assert claims.staleness(*claims._read(f)) is None


def test_a_claim_whose_store_cannot_be_opened_is_not_kept(tmp_path, monkeypatch):
    """StoreSink.claim releases the claim it acquired when opening the store then fails (a file
    system error): a claim left held would be renewed by the process's heartbeat for its whole
    life (a Dask worker's), and every other writer would wait for that tile forever."""
    _, out = unfinished_store(tmp_path, [(0, 1)])
    _, sink, t, _ = _sink_and_tile(out)

    def broken():
        raise OSError(5, "Input/output error")
    monkeypatch.setattr(sink, "_open", broken)
    with pytest.raises(OSError, match="Input/output error"):
        sink.claim(t)
    assert not (out / "claims" / "0.1").exists() and not sink.claims().held


def test_a_killed_creations_temporary_folder_is_swept(tmp_path):
    """A creation killed before its rename leaves .<name>.partial-<hex> (a run record or a
    claim killed midway, their temporary files in the store); the next job that creates or
    opens that store removes them once older than any such step takes (PARTIAL_MAX_AGE)."""
    old = tmp_path / ".g.zarr.partial-0123456789ab"
    young = tmp_path / ".g.zarr.partial-ba9876543210"
    other = tmp_path / ".h.zarr.partial-0123456789ab"
    for d in (old, young, other):
        d.mkdir()
        (d / "zarr.json").write_text("{}")
    t = time.time() - store_mod.PARTIAL_MAX_AGE - 60
    for d in (old, other):
        os.utime(d, (t, t))
    ce.gram(np.ones((2, 1, 4, 4)), depth=2, backend="numba", out=tmp_path / "g.zarr")
    assert not old.exists() and young.exists() and other.exists()
    # a creation rerun within those minutes made the store: the next job that opens it sweeps
    # that folder once it is old, and in the store a run record and a claim file of writers
    # killed in the middle of them (not a claim file being written now)
    store = tmp_path / "g.zarr"
    run_tmp = store / "runs" / ".new-0123456789abcdef0123456789abcdef"
    run_tmp.mkdir()
    claim_tmp = store / "claims" / ".0.0.0123456789abcdef0123456789abcdef.tmp"
    claim_tmp.write_text("{}")
    fresh_tmp = store / "claims" / ".0.0.fedcba9876543210fedcba9876543210.tmp"
    fresh_tmp.write_text("{}")
    marker = store / "claims" / ".0.0.over.0123456789abcdef0123456789abcdef"
    marker.write_text("{}")
    for p in (young, run_tmp, claim_tmp, marker):
        os.utime(p, (t, t))
    ce.gram(np.ones((2, 1, 4, 4)), depth=2, backend="numba", out=store)
    assert not young.exists() and other.exists()
    assert not run_tmp.exists() and not claim_tmp.exists() and fresh_tmp.exists()
    assert not marker.exists()


def test_heartbeat_keeps_slow_tiles_of_another_host_claimed(tmp_path):
    """Two writers posing as two hosts, tiles that take longer than the claim timeout: the
    heartbeat keeps each claim fresh, so no tile is taken over or computed twice."""
    x = np.random.default_rng(8).standard_normal((12, 1, 6, 6))
    np.save(tmp_path / "x.npy", x)
    argv = gram_argv(tmp_path, "--join", "--claim-timeout", "1")
    res = start_writers(tmp_path, [argv, argv], sleep=1.6, hosts=["node-a", "node-b"])
    for rc, o, e in res:
        assert rc == 0, e[-2000:]
        assert "took over" not in e
    g = zarr.open_group(str(tmp_path / "g.zarr"), mode="r")
    runs = store_mod.list_runs(g)
    assert sorted(r["host"] for r in runs) == ["node-a", "node-b"]
    assert sum(r["tiles_computed"] for r in runs) == 6 and all(r["tiles_computed"] for r in runs)
    assert g["ntk"][...].tobytes() == ce.gram(x, depth=3, backend="numba", tile=4).tobytes()


def test_dask_run_waits_for_another_writers_tile(tmp_path, caplog):
    distributed = pytest.importorskip("distributed")
    x, out = unfinished_store(tmp_path, [(0, 0), (0, 2), (2, 2)])
    plant_claim(out, (0, 2), age=100)
    with distributed.LocalCluster(n_workers=1, threads_per_worker=1, processes=False,
                                  dashboard_address=":0") as cluster, distributed.Client(cluster) as c:
        with caplog.at_level("WARNING", logger="cntk_engine"):
            g, info = ce.gram(x, depth=3, backend="numba", client=c,
                              out=StorePath(out, claim_timeout=5), return_info=True)
    assert info["tiles_computed"] == 3 and "took over tile (0, 2)" in caplog.text
    assert g["ntk"][...].tobytes() == ce.gram(x, depth=3, backend="numba", tile=4).tobytes()


# ------------------------------------------------------------------------------ kill -9 twice
JOB = textwrap.dedent("""
    import sys, numpy as np, cntk_engine as ce
    x = np.load(sys.argv[1])
    ce.gram(x, depths=[2, 3], kernel="both", backend="numba", tile=8, out=sys.argv[2])
""")


def kill_after(out: Path, x_path: Path, n_markers: int) -> None:
    proc = subprocess.Popen([sys.executable, "-c", JOB, str(x_path), str(out)], env=ENV,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.time() + 120
    try:
        while time.time() < deadline and proc.poll() is None:
            if len(written_markers(out)) >= n_markers:
                break
            time.sleep(0.005)
        assert proc.poll() is None, "ended before the kill: " + proc.stderr.read().decode()[-500:]
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.wait(30)


def test_kill_9_twice_then_resume_is_bit_identical(tmp_path):
    x = np.random.default_rng(9).standard_normal((64, 1, 12, 12))
    np.save(tmp_path / "x.npy", x)
    out = tmp_path / "k.zarr"
    kill_after(out, tmp_path / "x.npy", 5)
    first = zarr.open_group(str(out), mode="r")["tiles_done"][...]
    kill_after(out, tmp_path / "x.npy", int(np.count_nonzero(first)) + 5)
    second = zarr.open_group(str(out), mode="r")["tiles_done"][...]
    assert 0 < np.count_nonzero(first) < np.count_nonzero(second) < 36
    g, info = ce.gram(x, depths=[2, 3], kernel="both", backend="numba", tile=8, out=out,
                      return_info=True)
    final = g["tiles_done"][...]
    assert ((final == 1) == (first == 1)).all() and ((final == 2) == (second == 2)).all()
    assert info["tiles_computed"] == 36 - np.count_nonzero(second)
    ref = ce.gram(x, depths=[2, 3], kernel="both", backend="numba", tile=8)
    for d in (2, 3):
        for k, v in zip(("ntk", "nngp"), ref[d]):
            assert g[f"depth_{d}/{k}"][...].tobytes() == v.tobytes()
    assert store_mod.verify_store(out).ok and claim_files(out) == []


def test_a_round_that_claimed_nothing_waits_before_the_next(tmp_path, monkeypatch):
    """run_tiles returns {worker: 0} when every tile was claimed by another writer: that dict is
    truthy, so the pause between rounds never ran and the loop went round again at once,
    preparing the images each time (a helper's audit)."""
    real_claim = store_mod.StoreSink.claim
    real_sleep = time.sleep
    refused = {"n": 0}

    def claim(self, t):
        if refused["n"] < 1:            # the first round: another writer holds every tile
            refused["n"] += 1
            return False
        return real_claim(self, t)
    sleeps = []
    monkeypatch.setattr(store_mod.StoreSink, "claim", claim)
    monkeypatch.setattr(store_mod.GramStore, "wait_for_others", lambda self, tiles: None)
    monkeypatch.setattr(store_mod.GramStore, "poll_seconds", property(lambda self: 0.0123))
    # time.sleep is the one module's function: the claims' heartbeat sleeps through it as well
    monkeypatch.setattr(time, "sleep", lambda s: sleeps.append(s) if s == 0.0123 else real_sleep(s))
    x = np.random.default_rng(0).standard_normal((3, 1, 4, 4))
    k = ce.gram(x, depth=2, backend="numba", tile=8, out=tmp_path / "g.zarr")
    assert refused["n"] == 1 and len(sleeps) == 1
    np.testing.assert_array_equal(k["ntk"][:], ce.gram(x, depth=2, backend="numba"))


def test_a_claim_timeout_that_is_no_number_is_named_as_given():
    with pytest.raises(ValueError, match=r"claim_timeout must be a positive number of seconds; got 'abc'$"):
        StorePath("g.zarr", claim_timeout="abc")
