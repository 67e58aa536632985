"""What the examples share, apart from what they show: a scratch directory and a memory
directory (on /dev/shm) removed at the end, and the closing check of each story: the
resumed run's weights against an uninterrupted run's, bit for bit (the last line is JSON,
which tests/test_examples.py reads)."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import NoReturn

import torch


@contextlib.contextmanager
def workspace(name: str) -> Iterator[tuple[Path, Path]]:
    """``(scratch directory, memory directory)``, both removed on the way out."""
    base = Path(tempfile.mkdtemp(prefix=f"flashckpt-{name}-"))
    shm = Path(
        tempfile.mkdtemp(prefix=f"flashckpt-{name}-", dir="/dev/shm" if os.path.isdir("/dev/shm") else None)
    )
    try:
        yield base, shm
    finally:
        shutil.rmtree(base, ignore_errors=True)
        shutil.rmtree(shm, ignore_errors=True)


def attempts(script: str, plan: list[tuple[str, str, str]], base: Path, shm: Path, **env: str) -> None:
    """Run ``script --attempt A --workdir base/RUN --memory shm/RUN`` for each ``(RUN, A, what)``
    of ``plan``, each in a process of its own; an attempt named ``crash`` must die of SIGKILL,
    any other must succeed."""
    for run, attempt, what in plan:
        print(what, flush=True)
        w = base / run
        w.mkdir(exist_ok=True)
        argv = [sys.executable, script, "--attempt", attempt, "--workdir", str(w), "--memory", str(shm / run)]
        r = subprocess.run(argv, env={**os.environ, **env})
        if attempt == "crash":
            if r.returncode != -signal.SIGKILL:
                sys.exit(f"the crash attempt ended with status {r.returncode}, not SIGKILL")
            print(f"  -> died with {signal.Signals(-r.returncode).name}")
        elif r.returncode:
            sys.exit(r.returncode)


def verdict(resumed: dict[str, torch.Tensor], reference: dict[str, torch.Tensor]) -> NoReturn:
    """Print whether the two state dicts are equal bit for bit, and exit 0 if they are."""
    same = resumed.keys() == reference.keys() and all(
        torch.equal(v, reference[k]) for k, v in resumed.items()
    )
    print(f"resumed run == uninterrupted run, bit for bit: {same}")
    print(json.dumps({"bitwise_equal": same}))
    sys.exit(0 if same else 1)
