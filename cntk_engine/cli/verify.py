"""``cntk-engine verify STORE``: check a Gram store without computing anything.

Every chunk of every finished tile is read back and must decode (zarr's crc32c) and match the
checksum recorded for it when it was written (bound to its array and position): a truncated,
overwritten, missing or misplaced chunk is reported with its tile, array and chunk.  The report
also gives the tiles done, the runs recorded and the claims present (tiles being computed now,
and stale claims of writers that died).

Exit status: 0 when every finished tile verified (the store may be unfinished: it says so;
with ``--complete`` an unfinished store is 1, for a script that asks whether a job is done),
1 when some fail or the store cannot be verified (format 1, no checksums; a damaged store: its
job record or an array missing), 2 for errors (not a store, unreadable, a bad option).
``--add-checksums`` converts a format-1 store in place, recording checksums of its data as it
is now (only for data you accept), then verifies it.
"""
from __future__ import annotations

import hashlib

from ..arrays import format_bytes
from .common import JSON_HELP, CliError, plural, write_json


def add_parser(sub) -> None:
    p = sub.add_parser("verify", help="check a Gram store's finished tiles against their checksums",
                       description="Read every finished tile of a Gram store back and check it "
                       "against its checksum; report damaged tiles, runs and claims.")
    p.add_argument("store", metavar="STORE", help="the Zarr store (gram --out)")
    p.add_argument("--add-checksums", action="store_true",
                   help="format-1 store (no checksums): record checksums of its data AS IT IS "
                   "NOW, converting it to format 2 in place, then verify it")
    p.add_argument("--complete", action="store_true",
                   help="exit status 1 also when tiles are not computed yet (is the job done?)")
    p.add_argument("--workers", type=int, default=None,
                   help="reading threads (default: up to 8, one per core)")
    p.add_argument("--json", metavar="OUT", default=None,
                   help=f"also write the report as JSON {JSON_HELP}")
    p.set_defaults(func=run)


def run(args) -> int:
    from ..jobs.store import DONE, StoreCorrupt, add_checksums, computed_with, verify_store
    from .common import check_json_path
    if args.workers is not None and args.workers < 1:
        raise CliError(f"--workers must be a positive integer; got {args.workers}")
    if not args.store:
        raise CliError("STORE '' is empty; give the path of a Gram store (a folder such as gram.zarr)")
    if args.json is not None:
        check_json_path(args.json, inputs={"STORE": args.store})
    if args.add_checksums:
        done = add_checksums(args.store, workers=args.workers)
        print(f"{args.store}: checksums recorded for {done['tiles']} finished tiles (the data as "
              f"it was); {len(done['reset'])} tiles could not be read or were inconsistent and are "
              f"marked not done{': ' + ', '.join(map(str, done['reset'][:8])) if done['reset'] else ''}; "
              f"{done['runs']} run records moved to runs/")
    try:
        r = verify_store(args.store, workers=args.workers)
    except StoreCorrupt as e:       # a store, damaged beyond reading its tiles: a failed check
        print(f"DAMAGED {e}")
        if args.json is not None:
            write_json(args.json, {"store": str(args.store), "ok": False, "damaged": str(e)},
                       what=f"--json {args.json!r}")
        return 1
    print(f"{r.path}: Gram store format {r.format_version}; {r.tiles_finished} of "
          f"{plural(r.tiles_total, 'tile')} done"
          + ("" if r.tiles_finished == r.tiles_total else " (unfinished)"))
    if not r.checksums:
        print(f"no per-tile checksums (format {r.format_version}): nothing can be verified. If its "
              f"data is what you want, `cntk-engine verify {r.path} --add-checksums` records "
              "checksums of the data as it is now")
        status = 1
    else:
        # units that fit the amount: a small store reads kilobytes in milliseconds
        rate = f" ({format_bytes(r.bytes_read / r.seconds)}/s)" if r.seconds > 0 else ""
        print(f"verified {plural(r.tiles_finished, 'finished tile')}: "
              f"{format_bytes(r.bytes_read)} read in {r.seconds:.3g} s{rate}")
        for d in r.damage:
            print(f"DAMAGED {d}")
        markers = {d.tile for d in r.damage if d.array == DONE}
        data = {d.tile for d in r.damage if d.array != DONE}
        if data:
            print(f"{len(data)} of {r.tiles_finished} finished tiles fail verification; "
                  "resuming the gram job (--resume) computes exactly these again")
        if markers:
            print(f"the done marker of {plural(len(markers), 'tile')} cannot be read: counted as not "
                  "done, resuming the gram job (--resume) computes them again")
        if not r.damage:
            print("every finished tile is intact")
        status = 1 if r.damage else 0
    last = r.runs[-1] if r.runs else None
    print(f"runs: {len(r.runs)}" + (f" (last: run {last.get('run')} on {last.get('host')} pid "
                                    f"{last.get('pid')}, started {last.get('started')}, "
                                    f"{last.get('outcome', 'not finished')})" if last else ""))
    setups, unrecorded = computed_with(r.runs, r.markers)
    for s in setups:
        print(f"computed with {_words(s['compute'])} ({_runs(s['runs'])})")
    unreadable = [x for x in r.runs if "unreadable" in x]
    if unreadable:
        print(f"{_runs([x['run'] for x in unreadable])}: the record cannot be read "
              f"({unreadable[0]['unreadable'][:120]})")
    if unrecorded:
        print(f"{_runs(unrecorded)}: what computed the tiles is not recorded (a cntk_engine from "
              "before run records held it, a Dask run that ended before its workers' records "
              "were written, or a record that cannot be read)")
    if len(setups) > 1:
        print("the tiles were computed with different code: they agree to rounding but may differ "
              "in the last bits, so the matrix may not be bit-identical to one computed by any "
              "single one of them")
    live = [c for c in r.claims if c.stale is None]
    stale = [c for c in r.claims if c.stale is not None]
    if r.claims:
        print(f"claims: {len(live)} tiles being computed now"
              + (f" ({', '.join(sorted({c.who() for c in live})[:4])})" if live else "")
              + (f"; {len(stale)} stale ({stale[0].stale}): the next writer takes them over "
                 "(or removes them, for tiles already done)" if stale else ""))
    left = r.tiles_total - r.tiles_finished
    if args.complete and left:
        print(f"--complete: {plural(left, 'tile')} not computed yet; resuming the gram job "
              "(--resume) computes them")
        status = max(status, 1)
    if args.json is not None:
        write_json(args.json, what=f"--json {args.json!r}", rec={
            "store": r.path, "format_version": r.format_version, "tiles_total": r.tiles_total,
            "tiles_finished": r.tiles_finished, "checksums": r.checksums, "ok": r.ok,
            "damage": [dict(tile=list(d.tile), array=d.array, chunk=d.chunk, why=d.why)
                       for d in r.damage],
            "bytes_read": r.bytes_read, "seconds": r.seconds, "runs": r.runs,
            "computed_with": setups, "compute_not_recorded": unrecorded,
            "mixed_compute": len(setups) > 1,
            "claims": [dict(tile=list(c.tile), owner=c.owner, age=c.age, stale=c.stale)
                       for c in r.claims]})
    return status


def _words(rec: dict) -> str:
    """A compute record in one line; a long list (a CPU's features) by its SHA-256 prefix, other
    values (the reason a record is "unknown") as they are."""
    return ", ".join(f"{k} " + (f"sha256:{hashlib.sha256(v.encode()).hexdigest()[:12]}"
                                if isinstance(v, str) and len(v) > 60 and v.count(",") > 4 else
                                "none" if v == "" else str(v))      # numba's generic CPU: no features
                     for k, v in rec.items())


def _runs(numbers: list) -> str:
    return f"run{'s' if len(numbers) > 1 else ''} {', '.join(map(str, numbers))}"
