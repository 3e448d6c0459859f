"""Zarr store: layout, resume, refusal of other jobs, nothing half-written, kill -9, memory.
(Checksums and verification: test_store_integrity.py; many writers: test_store_writers.py.)"""
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest

zarr = pytest.importorskip("zarr")

import cntk_engine as ce  # noqa: E402
from cntk_engine.jobs import store as store_mod  # noqa: E402
from cntk_engine.jobs.store import StoreError, StoreMismatch  # noqa: E402

from conftest import written_markers  # noqa: E402

if store_mod._version_tuple(zarr.__version__) < store_mod.ZARR_MIN:
    pytest.skip("the store needs zarr >= 3.1.3", allow_module_level=True)

def imgs(rng, n, c=2, h=6, w=6):
    return rng.standard_normal((n, c, h, w))


def snapshot(path: Path) -> dict:
    """{relative file: bytes} of a directory tree (to prove nothing was touched)."""
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


def done_map(path) -> np.ndarray:
    return zarr.open_group(str(path), mode="r")["tiles_done"][...]


# ------------------------------------------------------------------------------ layout
def test_single_depth_layout_values_and_spec(tmp_path, rng):
    x = imgs(rng, 11)
    out = tmp_path / "g.zarr"
    g, info = ce.gram(x, depth=3, kernel="both", backend="numba", tile=4, out=str(out), return_info=True)
    ntk, nngp = ce.gram(x, depth=3, kernel="both", backend="numba", tile=4)
    assert sorted(k for k, _ in g.arrays()) == ["nngp", "ntk", "tiles_checksum", "tiles_done"]
    assert sorted(k for k, _ in g.groups()) == ["claims", "runs"]
    assert store_mod.kernel_arrays(g) == ["nngp", "ntk"]
    assert g["tiles_checksum"].shape == (3, 3, 2, 2) and g["tiles_checksum"].chunks == (1, 1, 2, 2)
    assert g["ntk"][...].tobytes() == ntk.tobytes() and g["nngp"][...].tobytes() == nngp.tobytes()
    assert g["ntk"].chunks == (4, 4) and g["ntk"].dtype == np.float64
    k = g["ntk"][...]
    assert k.tobytes() == np.ascontiguousarray(k.T).tobytes()        # lower triangle mirrored
    spec = g.attrs["cntk_engine"]
    assert spec["architecture"]["depths"] == [3] and spec["architecture"]["convention"] == "arora"
    assert spec["dtype"] == "float32" and spec["kernels"] == ["ntk", "nngp"] and spec["tile"] == 4
    assert spec["symmetric"] and spec["n1"] == 11 and len(spec["fingerprint"]["x1"]) == 64
    assert spec["backend"] == "numba" and spec["version"] == ce.__version__
    assert spec["format_version"] == 2 and spec["integrity"]["arrays"] == ["nngp", "ntk"]
    assert [c.to_dict()["name"] for c in g["ntk"].compressors] == ["zstd", "crc32c"]
    d = done_map(out)
    assert d.shape == (3, 3) and (d[np.triu_indices(3)] == 1).all() and (np.tril(d, -1) == 0).all()
    runs = store_mod.list_runs(g)
    assert info["tiles_computed"] == 6 and len(runs) == 1 and runs[0]["tiles_to_compute"] == 6
    assert runs[0]["tiles_computed"] == 6 and runs[0]["outcome"] == "finished"
    assert list((out / "claims").iterdir()) == [p for p in (out / "claims").iterdir()
                                                if p.name == "zarr.json"]     # all released
    with pytest.raises(ValueError, match="read-only"):
        g["ntk"][0, 0] = 1.0                                           # returned read-only


def test_several_depths_rectangular_layout(tmp_path, rng):
    x, y = imgs(rng, 7), imgs(rng, 5)
    out = tmp_path / "r.zarr"
    g = ce.gram(x, y, depths=[2, 4], kernel="nngp", backend="numba", tile=3, out=out)
    ref = ce.gram(x, y, depths=[2, 4], kernel="nngp", backend="numba", tile=3)
    assert sorted(g.group_keys()) == ["claims", "depth_2", "depth_4", "runs"]
    assert store_mod.kernel_arrays(g) == ["depth_2/nngp", "depth_4/nngp"]
    for d in (2, 4):
        assert list(g[f"depth_{d}"].array_keys()) == ["nngp"]
        assert g[f"depth_{d}/nngp"].shape == (7, 5)
        assert g[f"depth_{d}/nngp"][...].tobytes() == ref[d].tobytes()
    assert (done_map(out) == 1).all() and done_map(out).shape == (3, 2)


# ------------------------------------------------------------------------------ resume
def test_resume_computes_only_missing_tiles(tmp_path, rng):
    x = imgs(rng, 10)
    out = tmp_path / "g.zarr"
    ce.gram(x, depth=3, backend="numba", tile=3, out=out)
    full = zarr.open_group(str(out))["ntk"][...]
    # forget three tiles (their markers), as if the job had stopped before them
    g = zarr.open_group(str(out), mode="r+")
    for i, j in [(0, 1), (2, 3), (3, 3)]:
        g["tiles_done"][i, j] = 0
    g2, info = ce.gram(x, depth=3, backend="numba", out=out, return_info=True)   # tile from the store
    assert info["tiles_computed"] == 3 and info["tile"] == 3 and info["compute"][0]["backend"] == "numba"
    d = done_map(out)
    assert d[0, 1] == d[2, 3] == d[3, 3] == 2 and (d[np.triu_indices(4)] > 0).all()
    assert g2["ntk"][...].tobytes() == full.tobytes()
    _, info = ce.gram(x, depth=3, backend="numba", out=out, return_info=True)
    runs = store_mod.list_runs(zarr.open_group(str(out)))
    assert info["tiles_computed"] == 0 and [r["run"] for r in runs] == [1, 2, 3]
    assert info["compute"] == []                      # this run computed nothing (as on Dask)
    assert [r["tiles_computed"] for r in runs] == [10, 3, 0]


def test_a_store_that_cannot_be_written_is_refused_in_words(tmp_path, rng, monkeypatch):
    """A resumed job on a read-only store failed with the file system's bare "[Errno 30] ...
    runs/.new-..." (helper-93); the store itself is read as it is."""
    x = imgs(rng, 6)
    out = tmp_path / "g.zarr"
    want = ce.gram(x, depth=3, backend="numba", out=out)["ntk"][...]
    files = {p: p.stat().st_mtime_ns for p in out.rglob("*")}
    access = os.access
    monkeypatch.setattr(store_mod.os, "access",
                        lambda p, mode, **kw: Path(p).name != "runs" and access(p, mode, **kw))
    with pytest.raises(StoreError, match=r"^out='.*g\.zarr': '.*runs' is not writable \(a read-only "
                       r"folder or file system\), and a job continuing the store \(1 of 1 tiles "
                       r"done\) writes its run record"):
        ce.gram(x, depth=3, backend="numba", out=out)
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*")} == files
    np.testing.assert_array_equal(store_mod.load_gram(out, "ntk"), want)


def test_runs_record_what_computed_them_and_a_mix_is_told(tmp_path, rng, caplog, capsys):
    """Each run records the backend's compute record (numba: its version and settings, the
    CPU it compiles for and the C library, which decide the bits); a resume computing with
    other code warns, naming the run and the difference, and ``verify`` lists what computed
    the tiles (and says so in its JSON)."""
    import json
    import platform

    import numba

    from cntk_engine.backends.numba_cpu import NumbaBackend, numba_target
    from cntk_engine.cli import main
    x = imgs(rng, 6)
    out = tmp_path / "g.zarr"
    ce.gram(x, depth=3, backend="numba", tile=2, out=out)
    g = zarr.open_group(str(out), mode="r+")
    [rec] = store_mod.list_runs(g)[0]["compute"]
    assert rec == {"backend": "numba", "numba": numba.__version__, "cpu": numba_target()[0],
                   "cpu_features": numba_target()[1], "opt": int(numba.config.OPT),
                   "loop_vectorize": bool(numba.config.LOOP_VECTORIZE),
                   "slp_vectorize": bool(numba.config.SLP_VECTORIZE),
                   "svml": bool(numba.config.USING_SVML), "libc": " ".join(platform.libc_ver())}
    assert rec["cpu"] not in ("", "host") and "," in rec["cpu_features"]
    assert ce.gram(x, depth=3, backend="numba", return_info=True)[1]["compute"] == [rec]
    g["tiles_done"][0, 1] = 0              # the same code again: no warning
    with caplog.at_level("WARNING", logger="cntk_engine"):
        ce.gram(x, depth=3, backend="numba", out=out)
    assert "differs from that of" not in caplog.text
    g["tiles_done"][1, 2] = 0
    caplog.clear()
    feats = rec["cpu_features"].split(",")
    other = dict(rec, cpu="another-cpu", cpu_features=",".join(feats[1:] + ["+new-feature"]))
    with caplog.at_level("WARNING", logger="cntk_engine"):
        with pytest.MonkeyPatch.context() as m:
            m.setattr(NumbaBackend, "compute_record", lambda self, device: other)
            ce.gram(x, depth=3, backend="numba", out=out)
    want = (f"the code of this run differs from that of earlier runs (run 1 on {store_mod.HOST}: "
            f"cpu {rec['cpu']} there, another-cpu here, cpu_features {sorted(feats)[0]} there, "
            f"+new-feature here; run 2 on")
    assert want in caplog.text and "may not be bit-identical" in caplog.text, caplog.text
    caplog.clear()
    with caplog.at_level("WARNING", logger="cntk_engine"):
        _, info = ce.gram(x, depth=3, backend="numba", out=out, return_info=True)
    assert info["tiles_computed"] == 0 and "differs from that of" not in caplog.text   # none to do
    assert main(["verify", str(out), "--json", str(tmp_path / "v.json")]) == 0
    said = capsys.readouterr().out
    assert f"cpu {rec['cpu']}, cpu_features sha256:" in said and "(runs 1, 2)" in said, said
    assert "another-cpu" in said and "(run 3)" in said and "may not be bit-identical" in said
    assert "(run 4)" not in said and "not recorded" not in said       # run 4 computed no tile
    v = json.loads((tmp_path / "v.json").read_text())
    assert v["computed_with"] == [{"compute": rec, "runs": [1, 2]}, {"compute": other, "runs": [3]}]
    # numba's generic CPU records no features: said as none (it printed "cpu_features ," and
    # "(fewer items) here"), and a list within the other's as "no others"
    assert store_mod.record_diff(dict(rec, cpu_features=""), rec).startswith(
        f"cpu_features none there, {','.join(sorted(feats)[:6])}")
    assert store_mod.record_diff(other, dict(other, cpu_features=other["cpu_features"] + ",zz")) == \
        "cpu_features no others there, zz here"
    assert v["mixed_compute"] is True and v["compute_not_recorded"] == []


def test_a_run_with_other_code_that_began_meanwhile_is_told_at_the_end(tmp_path, rng, caplog):
    """Writers started at the same moment (a cluster's job array on unlike nodes) each list the
    runs before the other's record exists, so neither warns at its beginning: a run that
    computed tiles compares its code again at its end with the runs that began while it ran.
    Here another writer's record (other CPU) appears just after this run's own."""
    x = imgs(rng, 6)
    real_begin = store_mod.GramStore.begin_run

    def meanwhile(record, takes_the_tile=False):
        def begin_run(self, n_todo, where, computes=None):
            k = real_begin(self, n_todo, where, computes)
            b = store_mod._new_run(self.path, {"id": "b", "host": "node-b", "pid": 1, "where": "numba",
                                               "tiles_to_compute": 1, "compute": [record]}, after=k)
            if takes_the_tile:          # the other writer finishes the tile before this run claims it
                zarr.open_group(str(self.path), mode="r+")["tiles_done"][0, 1] = b
            return k
        return begin_run

    def run(name, begin_run):
        """A finished store with one tile to compute again, resumed with ``begin_run``."""
        out = tmp_path / name
        ce.gram(x, depth=3, backend="numba", tile=2, out=out)
        zarr.open_group(str(out), mode="r+")["tiles_done"][0, 1] = 0
        caplog.clear()
        with caplog.at_level("WARNING", logger="cntk_engine"), pytest.MonkeyPatch.context() as m:
            m.setattr(store_mod.GramStore, "begin_run", begin_run)
            return ce.gram(x, depth=3, backend="numba", out=out, return_info=True)[1]

    rec = ce.gram(x, depth=3, backend="numba", return_info=True)[1]["compute"][0]
    other = dict(rec, cpu="another-cpu")
    info = run("same.zarr", meanwhile(dict(rec)))       # the same code: nothing to say
    assert info["tiles_computed"] == 1 and "differs from that of" not in caplog.text
    info = run("other.zarr", meanwhile(other))
    want = (f"the code of run {info['run']} differs from that of runs that began while it ran "
            f"(run {info['run'] + 1} on node-b: cpu another-cpu there, {rec['cpu']} here)")
    assert want in caplog.text and caplog.text.count("differs from that of") == 1, caplog.text
    # a run with a tile to compute that the other writer took computed nothing: no mix of its own
    info = run("taken.zarr", meanwhile(other, takes_the_tile=True))
    assert info["tiles_computed"] == 0 and "differs from that of" not in caplog.text, caplog.text

    # where the comparison at the beginning failed, the end compares with every other run
    real_list = store_mod.list_runs
    calls = []

    def list_fails_once(group):
        calls.append(1)
        if len(calls) == 1:
            raise OSError("runs/ unreadable for a moment")
        return real_list(group)

    def begin_with_list_failing_once(self, n_todo, where, computes=None):
        with pytest.MonkeyPatch.context() as m:
            m.setattr(store_mod, "list_runs", list_fails_once)
            return meanwhile(other)(self, n_todo, where, computes)
    info = run("failed.zarr", begin_with_list_failing_once)
    assert "could not be compared with the other runs': runs/ unreadable" in caplog.text
    want = (f"the code of run {info['run']} differs from that of other runs (run "
            f"{info['run'] + 1} on node-b")
    assert want in caplog.text and caplog.text.count("differs from that of") == 1, caplog.text


def test_a_backend_that_cannot_describe_its_code_still_runs(tmp_path, rng, monkeypatch):
    """The record is provenance: where the backend cannot tell (no CuPy to name the GPU, an
    emulated GPU), the run says so and computes."""
    from cntk_engine.backends.numba_cpu import NumbaBackend

    def cannot(self, device):
        raise RuntimeError("no way to tell")
    monkeypatch.setattr(NumbaBackend, "compute_record", cannot)
    x = imgs(rng, 3)
    g, info = ce.gram(x, depth=2, backend="numba", out=tmp_path / "u.zarr", return_info=True)
    unknown = [{"backend": "numba", "unknown": "RuntimeError: no way to tell"}]
    assert info["compute"] == unknown == store_mod.list_runs(g)[0]["compute"]
    assert g["ntk"][...].tobytes() == ce.gram(x, depth=2, backend="numba").tobytes()


def test_a_reference_run_records_numpy_and_its_cpu_dispatch(tmp_path, rng):
    import platform
    ce.gram(imgs(rng, 3), depth=2, backend="reference", out=tmp_path / "r.zarr")
    [rec] = store_mod.list_runs(zarr.open_group(str(tmp_path / "r.zarr")))[0]["compute"]
    assert rec["backend"] == "reference" and rec["numpy"] == np.__version__
    assert rec["libc"] == " ".join(platform.libc_ver()) and isinstance(rec["numpy_cpu_features"], str)
    if platform.machine() in ("x86_64", "AMD64"):
        assert "SSE2" in rec["numpy_cpu_features"].split(",")


def test_mixed_compute_counts_runs_that_may_have_computed_tiles():
    mine = {"backend": "numba", "cpu": "a"}
    runs = [{"run": 1, "host": "h", "compute": [mine], "tiles_computed": 4},
            {"run": 2, "host": "h", "compute": [{"backend": "numba", "cpu": "b"}], "tiles_computed": 0},
            {"run": 3, "host": "h"},                              # before compute records
            {"run": 4, "host": "k", "compute": [{"backend": "cuda", "kernel": "v3"}]}]   # killed
    assert store_mod.mixed_compute(runs, [mine]) == [
        "run 4 on k: backend cuda there, numba here, cpu - there, a here, kernel v3 there, - here"]
    two = [mine, {"backend": "numba", "cpu": "b"}]                 # e.g. two GPU models at once
    assert store_mod.mixed_compute(runs[:1], two) == [
        "run 1 on h: cpu a there, b here", "its devices: cpu a on one, b on another"]
    assert store_mod.mixed_compute([], [mine, dict(mine)]) == []
    # a run that ended with no tile, but whose marker a finished tile carries (a Dask worker
    # writing its tile after the failed run's end was recorded), counts
    assert store_mod.mixed_compute(runs[1:2], [mine], markers={2}) == [
        "run 2 on h: cpu b there, a here"]
    failed = {"run": 5, "host": "h", "tiles_computed": 0, "outcome": "failed: RuntimeError"}
    assert store_mod.computed_with(runs[:1] + [failed]) == ([{"compute": mine, "runs": [1]}], [])
    assert store_mod.computed_with(runs[:1] + [failed], {1, 5}) == ([{"compute": mine, "runs": [1]}], [5])


def test_a_damaged_run_record_stops_neither_a_resume_nor_verify(tmp_path, rng, capsys):
    """runs/ only records who computed what: a truncated record is listed as unreadable, the
    job resumes (its compute records are compared with the readable ones) and verify says so."""
    from cntk_engine.cli import main
    x = imgs(rng, 4)
    out = tmp_path / "g.zarr"
    ce.gram(x, depth=3, backend="numba", tile=2, out=out)
    (out / "runs" / "1" / "zarr.json").write_text('{"zarr_format": 3, "node_type": "gro')
    zarr.open_group(str(out), mode="r+")["tiles_done"][0, 1] = 0
    g, info = ce.gram(x, depth=3, backend="numba", tile=2, out=out, return_info=True)
    assert info["tiles_computed"] == 1
    assert g["ntk"][...].tobytes() == ce.gram(x, depth=3, backend="numba", tile=2).tobytes()
    runs = store_mod.list_runs(g)
    assert [r["run"] for r in runs] == [1, 2] and "JSONDecodeError" in runs[0]["unreadable"]
    assert main(["verify", str(out)]) == 0
    said = capsys.readouterr().out
    assert "run 1: the record cannot be read (JSONDecodeError" in said
    assert "run 1: what computed the tiles is not recorded" in said and "(run 2)" in said


def test_undecodable_done_marker_counts_as_not_done(tmp_path, rng, caplog):
    x = imgs(rng, 8, h=8, w=8)
    out = tmp_path / "g.zarr"
    ce.gram(x, depth=3, backend="numba", tile=4, out=out)
    full = zarr.open_group(str(out))["ntk"][...]
    (out / "tiles_done" / "c" / "0" / "1").write_bytes(b"")            # an emptied marker chunk
    with caplog.at_level("WARNING", logger="cntk_engine"):
        g, info = ce.gram(x, depth=3, backend="numba", out=out, return_info=True)
    assert info["tiles_computed"] == 1                                 # that tile only, no crash
    assert done_map(out)[0, 1] == 2 and g["ntk"][...].tobytes() == full.tobytes()
    msg = " ".join(r.getMessage() for r in caplog.records)
    assert str(out) in msg and "(0, 1)" in msg and "tiles_done/c/0/1" in msg


def test_the_bookkeeping_of_a_large_grid_reads_only_its_finished_tiles(tmp_path, monkeypatch):
    """The done map and the checksums of a store with few finished tiles are read from the
    chunk files that exist: a whole read makes zarr look for every chunk (a large grid's start
    took tens of seconds, twice, and again at an interrupted job's end).  Counted here as the
    chunk keys zarr asks the store for; the values equal a whole read's, a damaged marker is
    still found, and where a third of the tiles or more are finished the whole map is read."""
    from zarr.storage import LocalStore
    g = zarr.open_group(str(tmp_path / "s.zarr"), mode="w")
    store_mod._create_bookkeeping(g, (120, 120), 2)
    finished = [(0, 5), (3, 3), (7, 110), (119, 0)]
    for k, (i, j) in enumerate(finished, 1):
        g[store_mod.DONE][i, j] = k
        g[store_mod.CHECKSUMS][i, j] = [[k, 2 * k], [3 * k, 4 * k]]
    (tmp_path / "s.zarr" / store_mod.DONE / "c" / "7" / "110.1a2b.partial").write_bytes(b"x")
    (tmp_path / "s.zarr" / store_mod.DONE / "c" / "7" / "\u00b2").write_bytes(b"x")   # a digit, not a number
    asked = []
    real_get = LocalStore.get

    async def counting_get(self, key, *a, **kw):
        asked.append(key)
        return await real_get(self, key, *a, **kw)
    monkeypatch.setattr(LocalStore, "get", counting_get)
    g = zarr.open_group(str(tmp_path / "s.zarr"), mode="r")
    done = store_mod.read_done(tmp_path, g[store_mod.DONE])
    sums, ok = store_mod._read_checksums(g[store_mod.CHECKSUMS], done)
    assert sorted(k for k in asked if "/c/" in k) == sorted(
        [f"{store_mod.DONE}/c/{i}/{j}" for i, j in finished] +
        [f"{store_mod.CHECKSUMS}/c/{i}/{j}/0/0" for i, j in finished])
    assert [tuple(t) for t in np.argwhere(done)] == sorted(finished) and done[7, 110] == 3
    assert sums[7, 110].tolist() == [[3, 6], [9, 12]] and ok.all() and not sums[done == 0].any()
    monkeypatch.undo()
    whole = zarr.open_group(str(tmp_path / "s.zarr"), mode="r")
    assert np.array_equal(done, whole[store_mod.DONE][...])

    (tmp_path / "s.zarr" / store_mod.DONE / "c" / "3" / "3").write_bytes(b"")      # damaged
    done, unreadable = store_mod._read_done_markers(whole[store_mod.DONE])
    assert done[3, 3] == 0 and done[0, 5] == 1 and [d.tile for d in unreadable] == [(3, 3)]

    # listed only from a local store's own folder, else read whole through zarr
    assert store_mod._marker_files(zarr.open_group(store=zarr.storage.MemoryStore())
                                   .create_array("d", shape=(4, 4), chunks=(1, 1), dtype="int32")) is None
    sharded = zarr.open_group(str(tmp_path / "sh.zarr"), mode="w").create_array(
        "d", shape=(8, 8), chunks=(1, 1), shards=(4, 4), dtype="int32", fill_value=0)
    sharded[5, 6] = 1
    assert store_mod._marker_files(sharded) is None and store_mod.read_done(tmp_path, sharded)[5, 6] == 1

    small = zarr.open_group(str(tmp_path / "t.zarr"), mode="w")      # a third finished: whole
    store_mod._create_bookkeeping(small, (3, 3), 1)
    for i, j in [(0, 0), (1, 2), (2, 2)]:
        small[store_mod.DONE][i, j] = 1
    asked.clear()
    monkeypatch.setattr(LocalStore, "get", counting_get)
    assert store_mod.read_done(tmp_path, small[store_mod.DONE]).sum() == 3
    assert len([k for k in asked if "/c/" in k]) == 9


@pytest.mark.parametrize("damage", ["empty", "missing", "empty mirror"])
def test_damaged_data_chunk_of_finished_tile_is_recomputed(tmp_path, rng, caplog, damage):
    x = imgs(rng, 8, h=8, w=8)
    out = tmp_path / "g.zarr"
    ce.gram(x, depth=3, kernel="both", backend="numba", tile=4, out=out)
    ref = {k: zarr.open_group(str(out))[k][...] for k in ("ntk", "nngp")}
    f = out / "nngp" / "c" / ("1/0" if damage == "empty mirror" else "0/1")
    f.unlink() if damage == "missing" else f.write_bytes(b"")
    with caplog.at_level("WARNING", logger="cntk_engine"):
        g, info = ce.gram(x, depth=3, kernel="both", backend="numba", out=out, return_info=True)
    assert info["tiles_computed"] == 1 and done_map(out)[0, 1] == 2
    for k in ("ntk", "nngp"):
        assert g[k][...].tobytes() == ref[k].tobytes()                 # readable and identical
    msg = " ".join(r.getMessage() for r in caplog.records)
    assert str(out) in msg and "(0, 1)" in msg and ("nngp/c/1/0" if "mirror" in damage else "nngp/c/0/1") in msg


def test_depth_order_is_not_part_of_the_job(tmp_path, rng):
    x = imgs(rng, 8, h=8, w=8)
    out = tmp_path / "d.zarr"
    ce.gram(x, depths=[3, 2], backend="numba", tile=4, out=out)
    assert zarr.open_group(str(out)).attrs["cntk_engine"]["architecture"]["depths"] == [2, 3]
    g = zarr.open_group(str(out), mode="r+")
    g["tiles_done"][0, 1] = 0
    g2, info = ce.gram(x, depths=[2, 3], backend="numba", out=out, return_info=True)
    assert info["tiles_computed"] == 1
    ref = ce.gram(x, depths=[2, 3], backend="numba", tile=4)
    for d in (2, 3):
        assert g2[f"depth_{d}/ntk"][...].tobytes() == ref[d].tobytes()
    # a store written before records were sorted (depths listed as given) still resumes
    spec = dict(g.attrs["cntk_engine"])
    spec["architecture"] = dict(spec["architecture"], depths=[3, 2])
    g.attrs["cntk_engine"] = spec
    _, info = ce.gram(x, depths=[2, 3], backend="numba", out=out, return_info=True)
    assert info["tiles_computed"] == 0
    with pytest.raises(StoreMismatch, match="depths"):
        ce.gram(x, depths=[2, 4], backend="numba", out=out)


def test_a_reference_store_that_recorded_float32_resumes(tmp_path, rng):
    """The reference computes in float64 whatever dtype says; stores it wrote before its record
    said so record float32 and were refused on resume ("dtype: store has 'float32'")."""
    x = imgs(rng, 6, h=4, w=4)
    out = tmp_path / "g.zarr"
    ce.gram(x, depth=3, backend="reference", tile=3, out=out)
    g = zarr.open_group(str(out), mode="r+")
    assert g.attrs["cntk_engine"]["dtype"] == "float64"
    g.attrs["cntk_engine"] = dict(g.attrs["cntk_engine"], dtype="float32")
    g["tiles_done"][0, 1] = 0
    k, info = ce.gram(x, depth=3, backend="reference", out=out, return_info=True)
    assert info["tiles_computed"] == 1
    assert np.array_equal(k["ntk"][...], ce.gram(x, depth=3, backend="reference"))
    # another backend is another job, said once: the dtype follows the reference's backend
    with pytest.raises(StoreMismatch, match=r"holds another job: backend: store has 'reference', "
                       r"this job 'numba'\. Nothing"):
        ce.gram(x, depth=3, backend="numba", dtype="float64", out=out)


@pytest.mark.parametrize("case", ["same job", "other job", "same job, resume=False"])
def test_store_created_concurrently_by_another_process(tmp_path, rng, monkeypatch, case):
    """Both pass the existence check; the other one renames its store into place first."""
    x = imgs(rng, 8, h=8, w=8)
    winner = tmp_path / "w" / "g.zarr"
    winner.parent.mkdir()
    ce.gram(x, depth=4 if case == "other job" else 3, backend="numba", tile=4, out=winner)
    out = tmp_path / "g.zarr"
    real_rename = os.rename

    def racing_rename(src, dst):
        if Path(dst) == out and not out.exists():
            real_rename(winner, out)                                   # the other process wins
        return real_rename(src, dst)

    monkeypatch.setattr(store_mod.os, "rename", racing_rename)
    if case == "same job":
        _, info = ce.gram(x, depth=3, backend="numba", tile=4, out=out, return_info=True)
        assert info["tiles_computed"] == 0                             # resumed the winner's store
    elif case == "other job":
        with pytest.raises(StoreMismatch, match="depth: store has 4, this job 3"):
            ce.gram(x, depth=3, backend="numba", tile=4, out=out)
    else:
        from cntk_engine.arch import make_architecture
        from cntk_engine.backends.numba_cpu import NumbaBackend
        from cntk_engine.jobs import GramJob
        arch = make_architecture(depth=3)
        job = GramJob(x1=x, x2=None, arch=arch, params=arch.layer_params(*x.shape[1:]), kernel="ntk",
                      dtype=np.dtype(np.float32), backend=NumbaBackend,
                      out=store_mod.StorePath(str(out), existing="refuse"))
        with pytest.raises(store_mod.StoreExists, match="created by another process.*existing='resume'") as e:
            store_mod.GramStore.open_for_job(job, tile=4, tile_given=False)
        assert "--join" not in str(e.value) and "--resume" not in str(e.value) and e.value.race
    assert [p.name for p in tmp_path.iterdir() if ".partial-" in p.name] == []   # temp dir removed


def test_zarr_older_than_atomic_chunk_writes_is_refused(monkeypatch):
    monkeypatch.setattr(zarr, "__version__", "3.1.2")
    with pytest.raises(ImportError, match=r"zarr >= 3\.1\.3"):
        store_mod.require_zarr()
    monkeypatch.setattr(zarr, "__version__", "3.1.3.dev4")
    assert store_mod.require_zarr() is zarr


# ------------------------------------------------------------------------------ refusal
def test_other_job_is_refused_and_nothing_touched(tmp_path, rng):
    x = imgs(rng, 8)
    out = tmp_path / "g.zarr"
    ce.gram(x, depth=3, backend="numba", tile=4, out=out)
    before = snapshot(out)
    x2 = x.copy()
    x2[3, 0, 2, 2] += 1e-3
    cases = [
        (dict(x1=x2, depth=3), r"images x1 \(sha256\): .* \(the pixel values or their order differ: "
                               "e.g. uint8 pixels against the same images divided by 255"),
        (dict(x1=x, depth=4), "depth: store has 3, this job 4"),
        (dict(x1=x, depth=3, dtype="float64"), "dtype"),
        (dict(x1=x, depth=3, kernel="both"), "kernel"),
        (dict(x1=x, depth=3, pooling="flatten"), "pooling"),
        (dict(x1=x, depth=3, tile=2), "tile"),
        (dict(x1=x[:5], depth=3), r"images x1 \(count\)"),
        (dict(x1=x, x2=x[:3], depth=3), "symmetric"),
        (dict(x1=x, depth=3, backend="reference"), "backend"),
    ]
    for kw, word in cases:
        kw = dict(kw)
        kw.setdefault("backend", "numba")
        x1 = kw.pop("x1")
        with pytest.raises(StoreMismatch, match=word) as e:
            ce.gram(x1, out=out, **kw)
        assert "holds another job" in str(e.value)
        # the pixels' hint only where both jobs have the image set (not symmetric against not)
        assert ("pixel values" in str(e.value)) == ("images x1" in word), str(e.value)
    assert snapshot(out) == before
    # the same images as uint8-free float32 NHWC copy are the same job (fingerprint of values)
    _, info = ce.gram(np.ascontiguousarray(x.transpose(0, 2, 3, 1)).astype(np.float64), depth=3,
                      data_format="NHWC", backend="numba", out=out, return_info=True)
    assert info["tiles_computed"] == 0


def test_foreign_paths_are_refused(tmp_path, rng):
    x = imgs(rng, 4)
    f = tmp_path / "file.zarr"
    f.write_text("not a store")
    with pytest.raises(StoreError, match="not a Zarr"):
        ce.gram(x, depth=3, backend="numba", out=f)
    assert f.read_text() == "not a store"
    other = zarr.open_group(str(tmp_path / "other.zarr"), mode="w")
    other.attrs["hello"] = 1
    before = snapshot(tmp_path / "other.zarr")
    with pytest.raises(StoreError, match="not a cntk_engine Gram store"):
        ce.gram(x, depth=3, backend="numba", out=tmp_path / "other.zarr")
    assert snapshot(tmp_path / "other.zarr") == before
    with pytest.raises(StoreError, match="does not exist"):
        ce.gram(x, depth=3, backend="numba", out=tmp_path / "no" / "g.zarr")


def test_refused_existing_store_names_the_python_way(tmp_path, rng):
    """From Python, StorePath(existing="refuse") on a store of the same job says how to continue
    it in Python (existing='resume' / a plain path), not with the command line's flags; a file
    at out= says what out= takes."""
    from cntk_engine.jobs.store import StorePath
    x = imgs(rng, 4)
    out = tmp_path / "g.zarr"
    ce.gram(x, depth=3, backend="numba", out=out)
    before = snapshot(out)
    with pytest.raises(store_mod.StoreExists) as e:
        ce.gram(x, depth=3, backend="numba", out=StorePath(out, existing="refuse"))
    msg = str(e.value)
    assert "exists (this same job, 1 of 1 tiles done)" in msg and "existing='resume'" in msg
    assert "--resume" not in msg and "--join" not in msg and not e.value.race
    assert snapshot(out) == before
    f = tmp_path / "afile"
    f.write_text("hi")
    with pytest.raises(StoreError, match=r"not a Zarr \(v3\) store \(a file\); refusing to touch it; "
                       "out= takes a path that does not exist yet"):
        ce.gram(x, depth=3, backend="numba", out=StorePath(f, existing="resume"))


def test_bad_input_creates_no_store(tmp_path, rng):
    x = imgs(rng, 4)
    out = tmp_path / "g.zarr"
    nan = x.copy()
    nan[1, 0, 0, 0] = np.nan
    for kw in (dict(x1=x, depth=1), dict(x1=nan, depth=3), dict(x1=x[:, :, :, :, None], depth=3),
               dict(x1=x, depth=3, kernel="ntks"), dict(x1=x, depth=3, devices=[0]),
               dict(x1=x, depth=3, tile=0), dict(x1=x, depth=3, dtype="float16")):
        x1 = kw.pop("x1")
        with pytest.raises(ValueError):
            ce.gram(x1, backend="numba", out=out, **kw)
        assert os.listdir(tmp_path) == []                             # no store, no leftovers


# ------------------------------------------------------------------------------ kill -9
JOB = textwrap.dedent("""
    import sys, numpy as np, cntk_engine as ce
    x = np.load(sys.argv[1])
    ce.gram(x, depth=3, backend="numba", tile=8, out=sys.argv[2])
""")


def test_kill_9_then_resume_is_bit_identical_and_keeps_finished_tiles(tmp_path):
    rng = np.random.default_rng(7)
    x = rng.standard_normal((64, 1, 16, 16))
    np.save(tmp_path / "x.npy", x)
    out = tmp_path / "killed.zarr"
    n_tiles = 36                                            # 8 x 8 grid, upper triangle
    # the child imports the package these tests import: it runs outside the checkout
    proc = subprocess.Popen([sys.executable, "-c", JOB, str(tmp_path / "x.npy"), str(out)], cwd=tmp_path,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.time() + 120
    try:
        while time.time() < deadline and proc.poll() is None:
            if len(written_markers(out)) >= 6:
                break
            time.sleep(0.005)
        assert proc.poll() is None, "the job ended before it could be killed: " + proc.stderr.read().decode()[-500:]
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.wait(30)
    assert proc.returncode == -signal.SIGKILL
    before = done_map(out)
    k = int(np.count_nonzero(before))
    assert 0 < k < n_tiles and set(np.unique(before)) <= {0, 1}
    g, info = ce.gram(x, depth=3, backend="numba", tile=8, out=out, return_info=True)
    assert info["tiles_computed"] == n_tiles - k                         # only the missing ones
    after = done_map(out)
    assert ((after == 1) == (before == 1)).all()                         # finished tiles not redone
    assert np.count_nonzero(after == 2) == n_tiles - k
    clean = ce.gram(x, depth=3, backend="numba", tile=8, out=tmp_path / "clean.zarr")
    assert g["ntk"][...].tobytes() == clean["ntk"][...].tobytes()        # bit for bit
    assert not np.isnan(g["ntk"][...]).any()


# ------------------------------------------------------------------------------ memory
MEM = textwrap.dedent("""
    import resource, shutil, sys, numpy as np, cntk_engine as ce
    rng = np.random.default_rng(0)
    kw = dict(depths=[2, 3], kernel="both", backend="numba")
    ce.gram(rng.standard_normal((8, 1, 1, 1)), tile=4, out=sys.argv[1] + ".warm", **kw)  # JIT, zarr
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    g = ce.gram(rng.standard_normal((int(sys.argv[2]), 1, 1, 1)), tile=200, out=sys.argv[1], **kw)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(base * 1024, peak * 1024, sum(a.nbytes for _, a in g.arrays()) +
          sum(a.nbytes for _, sub in g.groups() for _, a in sub.arrays()))
""")


@pytest.mark.skipif(sys.platform != "linux", reason="ru_maxrss in KiB is Linux's convention")
def test_store_larger_than_memory_budget(tmp_path):
    """The stored matrices (4 x 2400^2 float64 = 184 MB) are far larger than what the job's
    peak resident memory grows by: the matrix never sits in RAM."""
    r = subprocess.run([sys.executable, "-c", MEM, str(tmp_path / "big.zarr"), "2400"], cwd=tmp_path,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    base, peak, logical = map(int, r.stdout.split())
    assert logical >= 4 * 2400 * 2400 * 8
    budget = logical // 4
    assert peak - base < budget, (peak - base, budget)
    g = zarr.open_group(str(tmp_path / "big.zarr"), mode="r")
    assert (g["tiles_done"][...][np.triu_indices(12)] == 1).all()
    k = g["depth_3/ntk"][2000:2400, 0:400]
    assert not np.isnan(k).any()


def test_a_store_without_its_runs_folder_resumes(tmp_path, rng):
    """runs/ records who computed what, and verify reads none of it; resume refused such a store
    as damaged ("move the store away and compute the job again"). It is recreated, as claims/."""
    x = imgs(rng, 7, h=4, w=4)
    out = tmp_path / "g.zarr"
    ce.gram(x, depth=2, backend="numba", tile=3, out=out)
    shutil.rmtree(out / "runs")
    g, info = ce.gram(x, depth=2, backend="numba", out=out, return_info=True)
    assert info["tiles_computed"] == 0 and (out / "runs").is_dir()
    assert np.array_equal(g["ntk"][...], ce.gram(x, depth=2, backend="numba"))
    assert [r["run"] for r in store_mod.list_runs(g)] == [2]   # above the markers of run 1


def test_mismatch_messages_name_defaults_not_missing_keys(tmp_path, rng):
    """A record leaves flip and lap_window out where they are not set: the mismatch said
    "flip: store has '<missing>'"; and a symmetric job named --x2, which the caller never gave."""
    x = imgs(rng, 7, h=4, w=4)
    out = tmp_path / "g.zarr"
    ce.gram(x, depth=2, backend="numba", tile=3, out=out)
    with pytest.raises(StoreMismatch, match=r"flip: store has False, this job True\. Nothing was written"):
        ce.gram(x, depth=2, backend="numba", out=out, flip=True)
    with pytest.raises(StoreMismatch, match=r"lap_window: store has None, this job 2") as e:
        ce.gram(x, depth=2, backend="numba", out=out, pooling="lap", lap_window=2)
    assert "<missing>" not in str(e.value)
    with pytest.raises(StoreMismatch) as e:
        ce.gram(x[:5], depth=2, backend="numba", out=out)
    assert "x1 (count): store has 7, this job 5" in str(e.value) and "x2" not in str(e.value)


def test_an_empty_out_is_refused_not_read_as_the_current_folder(tmp_path, monkeypatch):
    """Path('') is the current folder: out='' was refused as 'out=<cwd> exists and is not a Zarr
    store' (a helper's audit; the CLI refused an empty --out already)."""
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ValueError, match=r"^out='' is empty; give the path of the Zarr store"):
        ce.gram(np.ones((2, 1, 3, 3)), depth=2, backend="numba", out="")
    assert list(tmp_path.iterdir()) == []


def test_a_preset_and_its_serial_spelling_are_one_job(tmp_path, rng):
    """A stack's record is compared by its layers: myrtle5 resumes as the serial(...) of its
    layers; other networks are refused once, by the names the caller chose them by."""
    x = rng.random((3, 3, 32, 32))
    out = tmp_path / "m.zarr"
    ce.gram(x, architecture="myrtle5", backend="numba", out=out)
    layers = ce.serial(ce.ConvRelu(), ce.ConvRelu(), ce.AvgPool(2), ce.ConvRelu(), ce.AvgPool(2),
                       ce.ConvRelu(), ce.AvgPool(2), ce.AvgPool(2), ce.AvgPool(2))
    _, info = ce.gram(x, architecture=layers, backend="numba", out=out, return_info=True)
    assert info["tiles_computed"] == 0
    with pytest.raises(StoreMismatch, match=r"holds another job: architecture: store has 'myrtle5', "
                       r"this job 'cnn'\. Nothing"):
        ce.gram(x, depth=5, backend="numba", out=out)
    with pytest.raises(StoreMismatch, match=r"architecture: store has 'myrtle5', this job 'myrtle10'; "
                       r"depth: store has 5, this job 10\. Nothing"):
        ce.gram(x, architecture="myrtle10", backend="numba", out=out)
    with pytest.raises(StoreMismatch, match=r"architecture: store has 'myrtle5', this job serial\(\.\.\.\) "
                       r"of layers \[\['conv'\], \['avgpool', 32, 32\]\]; depth: store has 5, this job 2"):
        ce.gram(x, architecture=ce.serial(ce.ConvRelu(), ce.AvgPool(32)), backend="numba", out=out)
