"""Integrity of finished stores (issue #13): a chunk cut short, overwritten with random bytes
of the same length, a valid chunk copied over another (also its mirror, also across arrays and
in a rectangular store), a damaged checksum record.  ``--resume`` recomputes exactly the damaged
tiles and the matrix is bit-identical to an uninterrupted run; ``verify`` reports them;
``load_gram`` refuses them naming the tile.  Format-1 stores: a clear message and the upgrade."""
import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest

zarr = pytest.importorskip("zarr")

import cntk_engine as ce  # noqa: E402
from cntk_engine import cli, solver  # noqa: E402
from cntk_engine.jobs import store as store_mod  # noqa: E402
from cntk_engine.jobs.store import StoreCorrupt, StoreError  # noqa: E402

from conftest import load_real  # noqa: E402

if store_mod._version_tuple(zarr.__version__) < store_mod.ZARR_MIN:
    pytest.skip("the store needs zarr >= 3.1.3", allow_module_level=True)

TILE = 10
KW = dict(depth=3, kernel="both", backend="numba", tile=TILE)


@pytest.fixture(scope="module")
def cifar():
    """60 real CIFAR-10 images, 8 x 8 crops, NCHW in [0, 1]: a 6 x 6 grid of 10 x 10 tiles."""
    d = load_real("cifar10_jpeg_small.npz")
    return np.ascontiguousarray(d["x_train"][:60, :8, :8].transpose(0, 3, 1, 2)) / 255.0


@pytest.fixture(scope="module")
def finished(cifar, tmp_path_factory):
    """A finished symmetric store and a finished rectangular one, and the in-memory Grams of
    the same jobs (bit-identical to an uninterrupted store run)."""
    base = tmp_path_factory.mktemp("finished")
    ce.gram(cifar, out=base / "sym.zarr", **KW)
    ce.gram(cifar[:40], cifar[40:], out=base / "rect.zarr", **KW)
    ref = {"sym": dict(zip(("ntk", "nngp"), ce.gram(cifar, **KW))),
           "rect": dict(zip(("ntk", "nngp"), ce.gram(cifar[:40], cifar[40:], **KW)))}
    return base, ref


def copy_of(finished, tmp_path, which="sym") -> Path:
    base, _ = finished
    out = tmp_path / f"{which}.zarr"
    shutil.copytree(base / f"{which}.zarr", out)
    return out


def done_map(path) -> np.ndarray:
    return zarr.open_group(str(path), mode="r")["tiles_done"][...]


def damage(out: Path, how: str) -> tuple[tuple[int, int], str]:
    """Damage one chunk of the store at ``out`` as the issue's probes did; returns the tile
    that must fail and the chunk named."""
    c = out / "ntk" / "c"
    if how == "truncate":                      # truncate -s <half> ntk/c/2/3
        f = c / "2" / "3"
        os.truncate(f, f.stat().st_size // 2)
        return (2, 3), "ntk/c/2/3"
    if how == "garbage":                       # random bytes of the same length
        f = c / "2" / "3"
        f.write_bytes(os.urandom(f.stat().st_size))
        return (2, 3), "ntk/c/2/3"
    if how == "swap":                          # cp ntk/c/2/4 ntk/c/2/3: a valid chunk, wrong place
        shutil.copy(c / "2" / "4", c / "2" / "3")
        return (2, 3), "ntk/c/2/3"
    if how == "swap mirror":                   # the transposed copy of tile (2, 3)
        shutil.copy(c / "4" / "2", c / "3" / "2")
        return (2, 3), "ntk/c/3/2"
    if how == "other array":                   # nngp's chunk (2, 3) in ntk's place
        shutil.copy(out / "nngp" / "c" / "2" / "3", c / "2" / "3")
        return (2, 3), "ntk/c/2/3"
    if how == "checksum record":               # the tile's checksum chunk emptied
        (out / "tiles_checksum" / "c" / "2" / "3" / "0" / "0").write_bytes(b"")
        return (2, 3), "ntk/c/2/3"
    raise ValueError(how)


PROBES = ["truncate", "garbage", "swap", "swap mirror", "other array", "checksum record"]


@pytest.mark.parametrize("how", PROBES)
def test_damaged_chunk_is_verified_refused_and_recomputed_bit_identically(finished, tmp_path,
                                                                          cifar, how, caplog):
    out = copy_of(finished, tmp_path)
    tile, chunk = damage(out, how)
    # verify (Python): exactly that tile
    r = store_mod.verify_store(out)
    assert not r.ok and r.damaged_tiles == [tile] and r.tiles_finished == 21
    assert any(d.chunk == chunk for d in r.damage), [str(d) for d in r.damage]
    # load_gram refuses the store, naming it and the tile
    with pytest.raises(StoreCorrupt, match=rf"{out}.*tile \(2, 3\)"):
        store_mod.load_gram(out, "ntk")
    with pytest.raises(StoreCorrupt, match=r"tile \(2, 3\)"):
        solver.fit_ridge(zarr.open_group(str(out))["ntk"], np.ones(60))   # a zarr.Array too
    # resume: exactly the damaged tile is computed again, with a warning naming it
    with caplog.at_level("WARNING", logger="cntk_engine"):
        g, info = ce.gram(cifar, out=out, return_info=True, **KW)
    assert info["tiles_computed"] == 1 and info["tiles_failed_verification"] == 1
    d = done_map(out)
    assert d[tile] == 2 and np.count_nonzero(d == 1) == 20
    msg = " ".join(rec.getMessage() for rec in caplog.records if rec.levelname == "WARNING")
    assert str(out) in msg and "tile (2, 3)" in msg and "'ntk'" in msg and chunk in msg
    _, ref = finished
    for k in ("ntk", "nngp"):
        assert g[k][...].tobytes() == ref["sym"][k].tobytes()
    assert store_mod.verify_store(out).ok
    runs = store_mod.list_runs(g)
    assert runs[-1]["tiles_failed_verification"] == 1 and runs[-1]["tiles_computed"] == 1


@pytest.mark.parametrize("edit", ["runs record lost", "marker edited"])
def test_a_damaged_tile_whose_marker_is_the_next_run_number_is_repaired_once(finished, tmp_path, cifar,
                                                                              monkeypatch, edit):
    """The next run took the number after the recorded runs; where the damaged tile's marker was
    that number (its runs/<k> record lost, or the marker edited), the repaired tile carried its
    old marker again, read as not repaired, and was computed again without end."""
    out = copy_of(finished, tmp_path)
    if edit == "runs record lost":
        zarr.open_group(str(out), mode="r+")["tiles_done"][1, 4] = 2       # written by a run 2 ...
        shutil.rmtree(out / "runs" / "2", ignore_errors=True)                # ... whose record is gone
    else:
        zarr.open_group(str(out), mode="r+")["tiles_done"][1, 4] = 2       # no run 2 at all
    os.remove(out / "ntk" / "c" / "1" / "4")
    writes = []
    write = store_mod.StoreSink.__call__

    def counted(self, t, sums):
        writes.append((t.i, t.j))
        assert len(writes) < 5, "a tile was computed again and again"
        return write(self, t, sums)
    monkeypatch.setattr(store_mod.StoreSink, "__call__", counted)
    g, info = ce.gram(cifar, out=out, return_info=True, **KW)
    assert writes == [(1, 4)] and info["tiles_computed"] == 1
    assert done_map(out)[1, 4] == 3 and [r["run"] for r in store_mod.list_runs(g)] == [1, 3]
    _, ref = finished
    assert g["ntk"][...].tobytes() == ref["sym"]["ntk"].tobytes()
    assert store_mod.verify_store(out).ok


def test_an_array_reached_through_a_sub_group_or_inner_folder_is_verified(tmp_path, cifar):
    """load_gram(g["depth_3"], "ntk"), load_gram("s.zarr/depth_3", "ntk") and
    zarr.open("s.zarr/depth_3/ntk") read the array raw: a changed value, or an unfinished
    store's missing tiles (NaN) or unmarked ones, went straight into the solve."""
    x = cifar[:12]
    out = tmp_path / "s.zarr"
    kw = dict(depths=[2, 3], backend="numba", tile=4)
    ref = ce.gram(x, **kw)[3]
    ce.gram(x, out=out, **kw)
    g = zarr.open_group(str(out), mode="r")
    reached = {
        "sub-group": lambda: store_mod.load_gram(zarr.open_group(str(out), mode="r")["depth_3"], "ntk"),
        "inner path": lambda: store_mod.load_gram(str(out / "depth_3"), "ntk"),
        "array path": lambda: store_mod.load_gram(str(out / "depth_3" / "ntk")),
        "array opened": lambda: store_mod.load_gram(zarr.open(str(out / "depth_3" / "ntk"), mode="r")),
        "solver": lambda: solver.fit_ridge(zarr.open(str(out / "depth_3" / "ntk"), mode="r"), np.ones(12)).alpha,
    }
    for name, load in reached.items():
        if name != "solver":
            assert load().tobytes() == ref.tobytes(), name
    a = zarr.open_array(str(out / "depth_3" / "ntk"), mode="r+")
    a[5, 5] = a[5, 5] * 1.5
    for name, load in reached.items():
        with pytest.raises(StoreCorrupt, match=r"fails verification.*tile \(1, 1\)"):
            load()
    zarr.open_group(str(out), mode="r+")["tiles_done"][0, 2] = 0
    for name, load in reached.items():
        with pytest.raises(ValueError, match=r"is unfinished: 1 of 6 tiles are not computed yet"):
            load()
    with pytest.raises(ValueError, match=r"'tiles_done' of the Gram store at .* is not a kernel array"):
        store_mod.load_gram(g["tiles_done"])


def test_load_gram_reads_the_done_map_once(finished, tmp_path, monkeypatch):
    """The done map was read twice (the unfinished check, then the scan): a marker that went to 0
    between the two, with an undecodable chunk in its row, left that tile of K unwritten, and
    np.empty's leftover memory (6.9e-310) came back as kernel values."""
    out = copy_of(finished, tmp_path)
    reads = []
    real = store_mod.read_done

    def counted(*a, **k):
        reads.append(1)
        return real(*a, **k)
    monkeypatch.setattr(store_mod, "read_done", counted)
    _, ref = finished
    assert store_mod.load_gram(out, "ntk").tobytes() == ref["sym"]["ntk"].tobytes()
    assert len(reads) == 1


def test_load_gram_names_missing_bookkeeping(finished, tmp_path):
    """A store without its done map or its checksums gave a bare KeyError('tiles_done')."""
    for gone in ("tiles_done", "tiles_checksum"):
        out = copy_of(finished, tmp_path / gone)
        shutil.rmtree(out / gone)
        with pytest.raises(StoreCorrupt, match=rf"is damaged: \['{gone}'\] are missing"):
            store_mod.load_gram(out, "ntk")


def test_swapped_chunk_of_a_rectangular_store(finished, tmp_path, cifar):
    """A rectangular (--x2) store has no symmetry to betray a swap: the checksums do."""
    out = copy_of(finished, tmp_path, "rect")
    c = out / "nngp" / "c"
    shutil.copy(c / "1" / "0", c / "3" / "1")
    r = store_mod.verify_store(out)
    assert r.damaged_tiles == [(3, 1)] and r.damage[0].chunk == "nngp/c/3/1"
    g, info = ce.gram(cifar[:40], cifar[40:], out=out, return_info=True, **KW)
    assert info["tiles_computed"] == 1
    _, ref = finished
    assert g["nngp"][...].tobytes() == ref["rect"]["nngp"].tobytes()


def test_several_damaged_tiles_in_several_arrays(finished, tmp_path, cifar):
    out = copy_of(finished, tmp_path)
    (out / "ntk" / "c" / "0" / "0").write_bytes(b"")                      # emptied
    (out / "nngp" / "c" / "5" / "1").unlink()                             # gone: mirror of (1, 5)
    shutil.copy(out / "ntk" / "c" / "4" / "4", out / "ntk" / "c" / "5" / "5")
    r = store_mod.verify_store(out)
    assert r.damaged_tiles == [(0, 0), (1, 5), (5, 5)]
    why = {d.chunk: d.why for d in r.damage}
    assert "cannot be decoded: its crc32c does not match" in why["ntk/c/0/0"]
    assert "missing" in why["nngp/c/5/1"]
    assert "does not match" in why["ntk/c/5/5"]
    _, info = ce.gram(cifar, out=out, return_info=True, **KW)
    assert info["tiles_computed"] == 3 and store_mod.verify_store(out).ok


def test_a_done_marker_without_checksum_is_not_trusted(finished, tmp_path, cifar):
    out = copy_of(finished, tmp_path)
    zarr.open_group(str(out), mode="r+")["tiles_checksum"][1, 2] = 0
    r = store_mod.verify_store(out)
    assert r.damaged_tiles == [(1, 2)] and "no checksum recorded" in r.damage[0].why
    _, info = ce.gram(cifar, out=out, return_info=True, **KW)
    assert info["tiles_computed"] == 1


def test_checksum_is_bound_to_array_and_position():
    v = np.arange(12.0).reshape(3, 4)
    c = store_mod.chunk_checksum("ntk", (2, 3), v)
    assert c == store_mod.chunk_checksum("ntk", (2, 3), v.copy()) and c != 0
    assert c != store_mod.chunk_checksum("ntk", (2, 4), v)
    assert c != store_mod.chunk_checksum("nngp", (2, 3), v)
    assert c != store_mod.chunk_checksum("ntk", (2, 3), v.reshape(4, 3))
    w = v.copy()
    w[1, 1] = np.nextafter(w[1, 1], 10)                                   # one ulp
    assert c != store_mod.chunk_checksum("ntk", (2, 3), w)


# ------------------------------------------------------------------------------ CLI
def run(capsys, *argv):
    rc = cli.main(["-q", *map(str, argv)])
    out, err = capsys.readouterr()
    return rc, out, err


def test_cli_probe_resume_and_verify(finished, tmp_path, cifar, capsys):
    """The issue's probe: a finished store, a chunk cut short; verify reports it (exit 1),
    gram --resume computes 1 of 21 tiles and says so, verify is then clean (exit 0)."""
    np.save(tmp_path / "x.npy", cifar)
    out = copy_of(finished, tmp_path)
    damage(out, "truncate")
    rc, o, e = run(capsys, "verify", out, "--json", tmp_path / "v.json")
    assert rc == 1, (o, e)
    assert "21 of 21 tiles done" in o and "DAMAGED tile (2, 3) of array 'ntk': chunk ntk/c/2/3" in o
    assert "1 of 21 finished tiles fail verification" in o
    rec = json.loads((tmp_path / "v.json").read_text())
    assert rec["ok"] is False and rec["damage"][0]["tile"] == [2, 3]
    rc, o, e = run(capsys, "gram", tmp_path / "x.npy", "--depth", "3", "--kernel", "both",
                   "--backend", "numba", "--tile", str(TILE), "--out", out, "--resume", "--no-progress")
    assert rc == 0, e
    assert "computed 1 of 21 tiles" in o and "21 finished tiles verified" in o and "1 failed" in o
    rc, o, e = run(capsys, "verify", out)
    assert rc == 0 and "every finished tile is intact" in o and "runs: 2" in o


def test_verify_reports_an_unreadable_done_marker(finished, tmp_path, cifar, capsys):
    """A done marker of random bytes: its tile counts as not done, and verify says so (exit 1)
    instead of reporting the store intact; resuming computes that tile again."""
    np.save(tmp_path / "x.npy", cifar)
    out = copy_of(finished, tmp_path)
    (out / "tiles_done" / "c" / "3" / "4").write_bytes(os.urandom(30))
    r = store_mod.verify_store(out)
    assert not r.ok and r.tiles_finished == 20 and r.damaged_tiles == [(3, 4)]
    assert r.damage[0].array == "tiles_done" and r.damage[0].chunk == "tiles_done/c/3/4"
    rc, o, e = run(capsys, "verify", out)
    assert rc == 1 and "20 of 21 tiles done" in o and "DAMAGED tile (3, 4) of array 'tiles_done'" in o
    assert "the done marker of 1 tile cannot be read" in o and "intact" not in o
    rc, o, e = run(capsys, "gram", tmp_path / "x.npy", "--depth", "3", "--kernel", "both",
                   "--backend", "numba", "--tile", str(TILE), "--out", out, "--resume", "--no-progress")
    assert rc == 0 and "computed 1 of 21 tiles" in o, (o, e)
    assert run(capsys, "verify", out)[0] == 0


def test_damaged_array_metadata_is_named(finished, tmp_path, cifar, capsys):
    """An array's zarr.json of garbage: verify and --resume name the store and the file (it was
    "Expecting value: line 1 column 1 (char 0)"), and nothing is written."""
    np.save(tmp_path / "x.npy", cifar)
    out = copy_of(finished, tmp_path)
    (out / "nngp" / "zarr.json").write_text("garbage")
    snap = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    with pytest.raises(StoreCorrupt, match=r"is damaged: the metadata of 'nngp' \(nngp/zarr.json: "
                                           "JSONDecodeError"):
        store_mod.verify_store(out)
    rc, o, e = run(capsys, "verify", out, "--json", tmp_path / "v.json")
    # a damaged store is a failed check (1), not an error of the call (2)
    assert rc == 1 and f"DAMAGED {str(out)!r} is damaged: the metadata of 'nngp'" in o, (o, e)
    assert json.loads((tmp_path / "v.json").read_text())["ok"] is False
    rc, o, e = run(capsys, "gram", tmp_path / "x.npy", "--depth", "3", "--kernel", "both",
                   "--backend", "numba", "--tile", str(TILE), "--out", out, "--resume", "--no-progress")
    assert rc == 2 and f"--out {str(out)!r} is damaged: the metadata of 'nngp' (nngp/zarr.json" in e, e
    assert "move the store away" in e
    shutil.rmtree(out / "tiles_checksum")
    with pytest.raises(StoreCorrupt, match=r"\['tiles_checksum'\] are missing; the metadata of 'nngp'"):
        store_mod.verify_store(out)
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file() and "tiles_checksum" not in
            p.parts} == {p: b for p, b in snap.items() if "tiles_checksum" not in p.parts}


def test_a_damaged_job_record_is_named(finished, tmp_path, cifar, capsys):
    """A job record that lost its tile layout (n1, n2, tile, symmetric), its kernels' names
    (architecture, kernel) or its images' fingerprints, or whose n1 no longer lays out its
    arrays: verify, --resume, load_gram and solve name the damage in one line (each was a
    KeyError, TypeError or IndexError traceback; verify said the store was intact)."""
    np.save(tmp_path / "x.npy", cifar)
    base, _ = finished
    spec = json.loads((base / "sym.zarr" / "zarr.json").read_text())["attributes"]["cntk_engine"]
    damages = {"tile": ("tile", None), "n1": ("n1", None), "symmetric": ("symmetric", None),
               "architecture": ("architecture.depths", None), "kernel": ("kernel", "sum"),
               "fingerprint": ("fingerprint", {"x1": None, "x2": None})}
    for key, (named, value) in damages.items():
        out = copy_of(finished, tmp_path / key)
        meta = json.loads((out / "zarr.json").read_text())
        if value is None:
            del meta["attributes"]["cntk_engine"][key]
        else:
            meta["attributes"]["cntk_engine"][key] = value
        (out / "zarr.json").write_text(json.dumps(meta))
        rc, o, e = run(capsys, "verify", out)
        assert rc == 1 and f"its job record (zarr.json's attributes.cntk_engine) lacks a valid {named}" in o
        rc, o, e = run(capsys, "gram", tmp_path / "x.npy", "--depth", "3", "--kernel", "both",
                       "--backend", "numba", "--tile", str(TILE), "--out", out, "--resume",
                       "--no-progress")
        assert rc == 2 and f"lacks a valid {named}" in e and e.count("\n") == 1, e
        with pytest.raises(StoreCorrupt, match=f"lacks a valid {named}"):
            store_mod.load_gram(out, key="ntk")
        with pytest.raises(StoreCorrupt, match=f"lacks a valid {named}"):
            store_mod.load_train_test(out, base / "rect.zarr", key="ntk")
    # a count that no longer lays out the arrays: named with the shapes, before any read
    out = copy_of(finished, tmp_path / "grown")
    meta = json.loads((out / "zarr.json").read_text())
    meta["attributes"]["cntk_engine"]["n1"] = meta["attributes"]["cntk_engine"]["n2"] = spec["n1"] + 1
    (out / "zarr.json").write_text(json.dumps(meta))
    n = spec["n1"]
    rc, o, e = run(capsys, "verify", out)
    assert rc == 1 and "the job record's n1, n2 and tile do not lay out its arrays: 'nngp' is " \
        f"({n}, {n}), not ({n + 1}, {n + 1})" in o, (o, e)
    with pytest.raises(StoreCorrupt, match=r"do not lay out its arrays: 'ntk' is"):
        store_mod.load_gram(out, key="ntk")


def test_cli_verify_errors_are_one_line(tmp_path, capsys):
    rc, o, e = run(capsys, "verify", tmp_path / "none.zarr")
    assert rc == 2 and "STORE " in e and "does not exist" in e and e.count("\n") == 1
    (tmp_path / "f.zarr").write_text("x")
    rc, o, e = run(capsys, "verify", tmp_path / "f.zarr")
    assert rc == 2 and "STORE " in e and "not a Zarr" in e and e.count("\n") == 1
    assert "STORE takes the folder of a Gram store written by cntk-engine gram --out" in e



def test_cli_verify_json_never_replaces_the_store_or_a_special_file(finished, tmp_path, capsys):
    out = copy_of(finished, tmp_path)
    before = (out / "zarr.json").read_bytes()
    for path, msg in ((out / "zarr.json", "is in STORE"), ("/dev/null", "not a regular file")):
        rc, o, e = run(capsys, "verify", out, "--json", path)
        assert rc == 2 and msg in e and e.count("\n") == 1, e
    # the store itself, or a folder in it: "in STORE" (the folder's message suggested a file in it)
    for path in (out, out / "ntk"):
        rc, o, e = run(capsys, "verify", out, "--json", path)
        assert rc == 2 and (" is STORE" if path == out else " is in STORE") in e and "e.g." not in e, e
    assert (out / "zarr.json").read_bytes() == before
    rc, o, e = run(capsys, "verify", out, "--json", tmp_path / "v.json")
    assert rc == 0 and json.loads((tmp_path / "v.json").read_text())
    # a link is written through: the file it points to gets the record, the link stays a link
    (tmp_path / "real.json").write_text('{"store": "s.zarr", "ok": true}')     # a report from before written_by
    (tmp_path / "link.json").symlink_to(tmp_path / "real.json")
    rc, o, e = run(capsys, "verify", out, "--json", tmp_path / "link.json")
    assert rc == 0 and (tmp_path / "link.json").is_symlink()
    written = json.loads((tmp_path / "real.json").read_text())
    assert written.keys() == json.loads((tmp_path / "v.json").read_text()).keys() and written["store"]


# ------------------------------------------------------------------------------ format 1
def make_v1_store(path: Path, x, **kw):
    """A store laid out as format 1 wrote it: data arrays with zarr's default codecs (no
    crc32c), tiles_done, the job record with format_version 1, runs in attrs."""
    from cntk_engine.arch import make_architecture
    from cntk_engine.backends.numba_cpu import NumbaBackend
    from cntk_engine.jobs import GramJob
    from cntk_engine.jobs.tiles import TileLayout
    arch = make_architecture(depth=kw["depth"])
    job = GramJob(x1=x, x2=None, arch=arch, params=arch.layer_params(*x.shape[1:]), kernel=kw["kernel"],
                  dtype=np.dtype(np.float32), backend=NumbaBackend)
    t = kw["tile"]
    layout = TileLayout(len(x), len(x), t, True)
    spec = dict(store_mod.job_spec(job), format_version=1, tile=t, grid=list(layout.grid))
    g = zarr.open_group(str(path), mode="w-")
    for name, v in zip(("ntk", "nngp"), ce.gram(x, **kw)):
        a = g.create_array(name, shape=v.shape, chunks=(t, t), dtype="float64", fill_value=np.nan)
        a[...] = v
    done = g.create_array("tiles_done", shape=layout.grid, chunks=(1, 1), dtype="int32", fill_value=0)
    done[...] = np.triu(np.ones(layout.grid, dtype=np.int32))
    g.attrs.update({"cntk_engine": spec, "runs": [{"run": 1, "host": "old", "tiles_to_compute": 21}]})
    return g


def test_format_1_store_clear_message_and_upgrade(tmp_path, cifar, capsys, caplog):
    out = tmp_path / "v1.zarr"
    make_v1_store(out, cifar, **KW)
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    with pytest.raises(StoreError, match=r"format 1.*no per-tile checksums.*--add-checksums"):
        ce.gram(cifar, out=out, **KW)
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before   # untouched
    with caplog.at_level("WARNING", logger="cntk_engine"):
        K = store_mod.load_gram(out, "ntk")                            # readable, with a warning
    assert "cannot be verified" in caplog.text and "--add-checksums" in caplog.text
    rc, o, e = run(capsys, "verify", out)
    assert rc == 1 and "no per-tile checksums" in o and "--add-checksums" in o
    # a chunk damaged before the upgrade: its tile is reset, not checksummed as it is
    (out / "nngp" / "c" / "1" / "2").write_bytes(b"garbage")
    rc, o, e = run(capsys, "verify", out, "--add-checksums")
    assert rc == 0, (o, e)
    assert "checksums recorded for 20 finished tiles" in o and "(1, 2)" in o
    spec = zarr.open_group(str(out)).attrs["cntk_engine"]
    assert spec["format_version"] == 2 and spec["upgraded_from"]["format_version"] == 1
    runs = store_mod.list_runs(zarr.open_group(str(out)))
    assert [r["host"] for r in runs] == ["old"] and "runs" not in zarr.open_group(str(out)).attrs
    g, info = ce.gram(cifar, out=out, return_info=True, **KW)
    assert info["tiles_computed"] == 1 and done_map(out)[1, 2] == 2
    assert g["ntk"][...].tobytes() == K.tobytes()
    assert g["nngp"][...].tobytes() == ce.gram(cifar, **KW)[1].tobytes()
    assert store_mod.verify_store(out).ok
    rc, o, e = run(capsys, "verify", out, "--add-checksums")
    assert rc == 2 and "already has per-tile checksums" in e
