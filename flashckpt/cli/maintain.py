"""``flashckpt salvage`` and ``flashckpt gc``: the commands that write (through
:mod:`flashckpt.maintenance`)."""

from __future__ import annotations

import argparse
import json
from dataclasses import asdict
from typing import Any

from flashckpt.cli._common import FAILED, OK, add_url, progress, storage_options, warn


def _ranks(rs: list[int]) -> str:
    return ",".join(map(str, rs)) if rs else "none"


def salvage_cmd(args: argparse.Namespace) -> int:
    from flashckpt.maintenance import salvage

    with progress("salvage") as bar:
        report = salvage(
            args.url,
            None if args.memory_dir == "default" else args.memory_dir,
            storage_options=storage_options(args),
            compression=args.compression,
            progress=bar,
        )
    failed = any(s.error for s in report.steps)
    if args.json:
        print(json.dumps(asdict(report)))
        return FAILED if failed else OK
    for note in report.notes:
        warn(note)
    if not report.steps:
        print(f"nothing to salvage: {report.memory_dir} holds no step that {report.storage} lacks")
    for s in report.steps:
        head = f"step {s.step} ({s.world_size} rank(s)):"
        if s.error:
            print(f"{head} FAILED: {s.error}")
            continue
        did = (
            f"wrote rank(s) {_ranks(s.written)} ({s.bytes_written:,} bytes)" if s.written else "wrote nothing"
        )
        there = f", present: {_ranks(s.present)}" if s.present else ""
        if s.committed:
            print(f"{head} {did}{there}: committed")
        else:
            print(
                f"{head} {did}{there}; waiting for rank(s) {_ranks(s.missing)}: run `flashckpt salvage` on "
                "the node that holds them (theirs, or a peer's holding their mirror); the last one commits"
            )
    return FAILED if failed else OK


def gc_cmd(args: argparse.Namespace) -> int:
    from flashckpt.maintenance import gc

    r = gc(
        args.url, args.keep, dry_run=args.dry_run, grace_s=args.grace, storage_options=storage_options(args)
    )
    if args.json:
        print(json.dumps(asdict(r)))
        return OK
    for note in r.notes:
        warn(note)
    verb = "would retire" if r.dry_run else "retired"
    retired = ", ".join(map(str, r.retired)) if r.retired else "none"
    left = f" ({len(r.left)} on a timeline the run left: {', '.join(map(str, r.left))})" if r.left else ""
    print(f"kept step(s) {', '.join(map(str, r.kept)) or 'none'}; {verb} {retired}{left}")
    dirs = f"{len(r.dirs)} step director{'y' if len(r.dirs) == 1 else 'ies'}"
    tail = " (dry run: nothing deleted)" if r.dry_run else ""
    verb = "would delete" if r.dry_run else "deleted"
    print(f"{verb} {dirs} and {r.chunks} chunk(s): {r.bytes:,} bytes{tail}")
    return OK


def add_commands(sub: Any) -> None:
    p = sub.add_parser(
        "salvage",
        help="after a failure: persist and commit the steps only this node's memory holds",
        description="On a node whose memory tier survived a job's death: write to storage every "
        "snapshot this node's memory holds (the job's own shards and the mirrors its ranks held) that "
        "is newer than the newest step committed there, and commit each step once every rank's shard "
        "is there.  Run it on every surviving node: the last one commits.  Nothing committed is "
        "overwritten, the memory tier is left as it is, and running it again is safe.",
    )
    add_url(p)
    p.add_argument(
        "--memory-dir", metavar="D", default="default",
        help="the memory_dir the job used (default: its default one for this storage)",
    )  # fmt: skip
    p.add_argument("--compression", help="store chunks compressed, as the job did: zstd or zstd:LEVEL")
    p.add_argument("--json", action="store_true")
    p.set_defaults(fn=salvage_cmd)
    p = sub.add_parser(
        "gc",
        help="retention by hand: keep the newest N steps, delete what nothing needs",
        description="Keep the newest --keep committed steps of the run's timeline, retire the others "
        "(and steps on timelines the run has left), and delete step directories and chunks nothing "
        "references.  Never deleted: the newest committed step, a save in flight (manifests newer "
        "than the newest commit, chunks younger than --grace), records that fail validation and "
        "what they reference, files that are not flashckpt's.",
    )
    add_url(p)
    p.add_argument("--keep", type=int, required=True, help="committed steps to keep (at least 1)")
    p.add_argument("--dry-run", action="store_true", help="delete nothing; report what would go")
    p.add_argument(
        "--grace", type=float, metavar="SECONDS",
        help="leave unreferenced chunks younger than this (a live job's next step; default 600)",
    )  # fmt: skip
    p.add_argument("--json", action="store_true")
    p.set_defaults(fn=gc_cmd)
