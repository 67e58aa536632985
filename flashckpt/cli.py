"""The ``flashckpt`` command line: list and verify checkpoints on a storage tier.

Exit codes (as DESIGN.md has them): 0 ok; 1 verification failed (``verify`` found a corrupt
step, ``ls`` a step whose records do not validate); 2 usage or access error (bad arguments
or URL, a tier or step that cannot be read, an unexpected error).  When a run finds both,
2 wins: some steps were not checked.  The tree may hold anything (torn or hostile records):
a bad step is reported and the others are still listed or verified, and no error ever
prints a traceback, only one line on stderr.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from collections.abc import Callable, Sequence
from typing import Any

from flashckpt._config import Options
from flashckpt.backends import LocalBackend
from flashckpt.coordination.inventory import committed_steps, read_committed_manifest
from flashckpt.coordination.reshard import StepReader
from flashckpt.errors import CheckpointNotFound, CorruptCheckpointError, FlashCkptError, ObjectNotFound
from flashckpt.format import CommitRecord, commit_key, decode_commit
from flashckpt.staging.stager import check_fits
from flashckpt.storage import Backend, open_backend
from flashckpt.transfer.reader import fetch_chunks, read_record

OK, FAILED, USAGE = 0, 1, 2


def _line(text: object) -> str:
    """One printable line: newlines and control characters (which a hostile record can put
    in an error message) are shown escaped, never passed to the terminal."""
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in str(text))


def _warn(text: object) -> None:
    print(f"flashckpt: {_line(text)}", file=sys.stderr)


def _verdict(exc: BaseException) -> tuple[int, str]:
    """What a failure while reading one step means: (exit code, label).  A record or chunk
    that fails validation, or is missing from a committed step, is corruption; anything
    else (an unreadable tier, an unexpected error) means the step could not be checked."""
    if isinstance(exc, (CorruptCheckpointError, ObjectNotFound)):
        return FAILED, "CORRUPT"
    if isinstance(exc, FlashCkptError):
        return USAGE, "UNREADABLE"
    return USAGE, f"ERROR ({type(exc).__name__})"


def _open(url: str) -> Backend:
    be = open_backend(url)
    if isinstance(be, LocalBackend) and not be.root.is_dir():  # a typo must not look like an empty run
        raise CheckpointNotFound(f"no such directory: {be.root}")
    return be


def _commit(be: Backend, step: int, opts: Options) -> CommitRecord:
    what = f"commit record of step {step}"
    rec = decode_commit(read_record(be, commit_key(step), what, opts), what)
    if rec.step != step:
        raise CorruptCheckpointError(f"{what} names step {rec.step}")
    return rec


def _ls(args: argparse.Namespace) -> int:
    be = _open(args.url)
    opts = Options()
    rows: list[dict[str, Any]] = []
    code = OK
    for step in committed_steps(be, opts):
        row: dict[str, Any] = {"step": step, "world_size": None, "bytes": None, "created_unix": None}
        try:
            rec = _commit(be, step, opts)
            total = 0
            for rank in range(rec.world_size):
                total += read_committed_manifest(be, step, rank, rec.world_size, opts).total_bytes
            row.update(world_size=rec.world_size, bytes=total, created_unix=rec.created_unix, error=None)
        except Exception as exc:  # report this step, list the others  # noqa: BLE001
            step_code, label = _verdict(exc)
            code = max(code, step_code)
            row["error"] = f"{label}: {_line(exc)}"
            _warn(f"step {step}: {row['error']}")
        rows.append(row)
    if args.json:
        print(json.dumps(rows))
    else:
        print(f"{'step':>12}  {'ranks':>5}  {'bytes':>14}")
        for r in rows:
            if r["error"] is None:
                print(f"{r['step']:>12}  {r['world_size']:>5}  {r['bytes']:>14,}")
            else:
                print(f"{r['step']:>12}  {'?':>5}  {'?':>14}  {r['error'].split(':')[0]}")
    return code


def _verify(args: argparse.Namespace) -> int:
    from concurrent.futures import ThreadPoolExecutor

    be = _open(args.url)
    opts = Options()
    steps = committed_steps(be, opts)
    if args.step is not None:
        steps = [s for s in steps if s == args.step]
        if not steps:
            _warn(f"step {args.step} is not committed at {be.url}")
            return USAGE
    if not steps:
        _warn(f"no committed step at {be.url}: nothing to verify")
    code = OK
    with ThreadPoolExecutor(opts.io_threads, thread_name_prefix="flashckpt-io") as pool:
        for step in steps:
            try:
                # every rank's records, and the shards checked against each other
                reader = StepReader(be, step, opts, pool)
                for m in reader.manifests:
                    size = max((c.nbytes for c in m.chunks), default=0)
                    check_fits(size, None, f"a chunk of step {step}")  # a hostile size fails cleanly
                    buf = bytearray(size)  # one chunk at a time: bounded memory
                    for c in m.chunks:
                        fetch_chunks(be, m.with_chunks([c]), _scratch(buf), pool, opts)
                print(f"step {step}: ok")
            except Exception as exc:  # report this step, verify the others  # noqa: BLE001
                step_code, label = _verdict(exc)
                code = max(code, step_code)
                print(f"step {step}: {label}: {_line(exc)}")
    return code


def _scratch(buf: bytearray) -> Callable[[int, int], memoryview]:
    return lambda _offset, n: memoryview(buf)[:n]


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="flashckpt",
        description=__doc__.split("\n\n")[0] if __doc__ else None,
        epilog="exit codes: 0 ok, 1 verification failed, 2 usage or access error",
    )
    parser.add_argument("-v", "--verbose", action="store_true")
    sub = parser.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("ls", help="list committed steps (exit 1 if a step's records do not validate)")
    p.add_argument("url")
    p.add_argument("--json", action="store_true")
    p.set_defaults(fn=_ls)
    p = sub.add_parser("verify", help="check every checksum of committed steps (exit 1 if one is corrupt)")
    p.add_argument("url")
    p.add_argument("--step", type=int)
    p.set_defaults(fn=_verify)
    args = parser.parse_args(argv)  # usage errors: a usage line and exit 2, from argparse
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING)
    try:
        return int(args.fn(args))
    except KeyboardInterrupt:
        _warn("interrupted")
        return 130
    except BrokenPipeError:  # the reader of stdout went away (`flashckpt ls ... | head`)
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no error at exit's flush
        return FAILED
    except FlashCkptError as exc:
        _warn(exc)
        return USAGE
    except Exception as exc:  # no traceback, whatever happened  # noqa: BLE001
        _warn(f"{type(exc).__name__}: {exc}")
        return USAGE


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
