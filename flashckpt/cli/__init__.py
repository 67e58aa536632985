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
from collections.abc import Sequence
from typing import Any

from flashckpt.catalog import Catalog
from flashckpt.errors import CorruptCheckpointError, FlashCkptError, ObjectNotFound

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


def _ls(args: argparse.Namespace) -> int:
    rows: list[dict[str, Any]] = []
    code = OK
    with Catalog(args.url) as cat:
        for info in cat.steps():
            row: dict[str, Any] = {
                "step": info.step,
                "world_size": info.world_size,
                "bytes": info.bytes,
                "created_unix": info.created_unix,
                "error": None,
            }
            if info.error is not None:
                step_code, label = _verdict(info.error)
                code = max(code, step_code)
                row["error"] = f"{label}: {_line(info.error)}"
                _warn(f"step {info.step}: {row['error']}")
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
    code = OK
    with Catalog(args.url) as cat:
        steps = cat.step_numbers()
        if args.step is not None:
            steps = [s for s in steps if s == args.step]
            if not steps:
                _warn(f"step {args.step} is not committed at {cat.url}")
                return USAGE
        if not steps:
            _warn(f"no committed step at {cat.url}: nothing to verify")
        for step in steps:
            try:
                cat.verify(step)  # every rank's records, the shards against each other, every chunk
                print(f"step {step}: ok")
            except Exception as exc:  # report this step, verify the others  # noqa: BLE001
                step_code, label = _verdict(exc)
                code = max(code, step_code)
                print(f"step {step}: {label}: {_line(exc)}")
    return code


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
