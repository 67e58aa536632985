"""The ``flashckpt`` command line: inspect and verify checkpoints on a storage tier."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Callable, Sequence

from flashckpt._config import Options
from flashckpt._coordinator import committed_steps, fetch_chunks, read_committed_manifest
from flashckpt.backends import open_backend
from flashckpt.backends._base import check_key
from flashckpt.errors import FlashCkptError
from flashckpt.format import commit_key, decode_commit


def _ls(args: argparse.Namespace) -> int:
    be = open_backend(args.url)
    opts = Options()
    rows = []
    for step in committed_steps(be, opts):
        rec = decode_commit(be.get(commit_key(step)), check_key=check_key)
        total = 0
        for rank in range(rec.world_size):
            total += read_committed_manifest(be, step, rank, rec.world_size, opts).total_bytes
        rows.append(
            {"step": step, "world_size": rec.world_size, "bytes": total, "created_unix": rec.created_unix}
        )
    if args.json:
        print(json.dumps(rows))
    else:
        print(f"{'step':>12}  {'ranks':>5}  {'bytes':>14}")
        for r in rows:
            print(f"{r['step']:>12}  {r['world_size']:>5}  {r['bytes']:>14,}")
    return 0


def _verify(args: argparse.Namespace) -> int:
    from concurrent.futures import ThreadPoolExecutor

    be = open_backend(args.url)
    opts = Options()
    steps = committed_steps(be, opts)
    if args.step is not None:
        steps = [s for s in steps if s == args.step]
        if not steps:
            print(f"step {args.step} is not committed at {be.url}", file=sys.stderr)
            return 2
    bad = 0
    with ThreadPoolExecutor(opts.io_threads) as pool:
        for step in steps:
            try:
                rec = decode_commit(be.get(commit_key(step)), check_key=check_key)
                for rank in range(rec.world_size):
                    m = read_committed_manifest(be, step, rank, rec.world_size, opts)
                    size = max((c.nbytes for c in m.chunks), default=0)
                    buf = bytearray(size)  # one chunk at a time: bounded memory
                    for c in m.chunks:
                        fetch_chunks(be, m.with_chunks([c]), _scratch(buf), pool, opts)
                print(f"step {step}: ok")
            except FlashCkptError as exc:
                bad += 1
                print(f"step {step}: CORRUPT: {exc}")
    return 1 if bad else 0


def _scratch(buf: bytearray) -> Callable[[int, int], memoryview]:
    return lambda _offset, n: memoryview(buf)[:n]


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="flashckpt", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true")
    sub = parser.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("ls", help="list committed steps")
    p.add_argument("url")
    p.add_argument("--json", action="store_true")
    p.set_defaults(fn=_ls)
    p = sub.add_parser("verify", help="check every checksum of committed steps")
    p.add_argument("url")
    p.add_argument("--step", type=int)
    p.set_defaults(fn=_verify)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING)
    try:
        return int(args.fn(args))
    except FlashCkptError as exc:
        print(f"flashckpt: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
