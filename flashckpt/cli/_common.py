"""What every command shares: exit codes, one-line messages on stderr, progress bars."""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
from collections.abc import Callable, Iterator
from typing import Any

OK, FAILED, USAGE = 0, 1, 2


def line(text: object) -> str:
    """One printable line: newlines and control characters (which a hostile record can put
    in an error message) are shown escaped, never passed to the terminal."""
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in str(text))


def warn(text: object) -> None:
    print(f"flashckpt: {line(text)}", file=sys.stderr)


@contextlib.contextmanager
def progress(label: str) -> Iterator[Callable[[int, int], None] | None]:
    """A progress bar on stderr (tqdm) while it is a terminal; nothing otherwise."""
    if not sys.stderr.isatty():
        yield None
        return
    try:
        from tqdm import tqdm
    except ImportError:
        yield None
        return
    bar = tqdm(desc=label, unit="B", unit_scale=True, leave=False, file=sys.stderr)
    try:

        def update(done: int, total: int) -> None:
            bar.total = total
            bar.n = done
            bar.refresh()

        yield update
    finally:
        bar.close()


def add_url(p: argparse.ArgumentParser, *names: str) -> None:
    """The storage URL argument(s) of a command (default one, ``url``) and
    ``--storage-options``."""
    for name in names or ("url",):
        p.add_argument(name) if name == "url" else p.add_argument(name, metavar="URL[@STEP]")
    p.add_argument(
        "--storage-options",
        metavar="JSON",
        help='fsspec/s3fs options, e.g. \'{"endpoint_url": "http://127.0.0.1:9000"}\' (also: the '
        "FSSPEC_S3_* and AWS_* environment variables)",
    )


def storage_options(args: argparse.Namespace) -> dict[str, Any] | None:
    """``--storage-options`` as a dict (``ValueError``, exit 2, if it is not a JSON object)."""
    text = getattr(args, "storage_options", None)
    if text is None:
        return None
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ValueError(f"--storage-options: not JSON: {exc}") from None
    if not isinstance(value, dict):
        raise ValueError("--storage-options: expected a JSON object")
    return value
