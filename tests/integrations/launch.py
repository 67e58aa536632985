"""How the integration tests (and bench/bench_resume.py) run a worker: one process, or
``torchrun`` with ``world`` ranks on a free port (the default 29500 may still be held by the
previous job's agent); and what they read back from it."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[2]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def command(module: str, args: list[str], world: int = 1) -> list[str]:
    """``python -m module args`` (``world`` 1), else the same under ``torchrun``."""
    if world == 1:
        return [sys.executable, "-m", module, *args]
    launcher = [
        f"--nproc-per-node={world}",
        "--max-restarts=0",
        "--monitor-interval=0.2",
        f"--master-port={free_port()}",
    ]
    return [sys.executable, "-m", "torch.distributed.run", *launcher, "-m", module, *args]


def env(out: Path, **extra: str) -> dict[str, str]:
    """The worker's environment: this checkout importable, one thread per rank, torchrun's
    log directories under ``out``."""
    return {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "TMPDIR": str(out), **extra}


def run_worker(
    module: str, out: Path, args: list[str], *, world: int = 1, expect: int | None = 0, **extra_env: str
) -> str:
    """Run a worker (``out`` its output directory) and check its exit status (``None``: any)."""
    out.mkdir(parents=True, exist_ok=True)
    cmd = command(module, ["--out", str(out), *args], world)
    p = subprocess.run(cmd, cwd=ROOT, env=env(out, **extra_env), capture_output=True, text=True, timeout=300)
    if expect is not None:
        assert p.returncode == expect, p.stdout + p.stderr
    return p.stdout + p.stderr


def ended(out: Path, rank: int = 0) -> dict[str, Any]:
    """What a worker's rank wrote at its end (``end-rank{R}.json``)."""
    return dict(json.loads((out / f"end-rank{rank}.json").read_text()))


def max_difference(ref: Path, run_dir: Path, rank: int = 0) -> float:
    """The largest absolute difference between two runs' final weights of ``rank`` (0: bitwise
    equal, checked with ``torch.equal``); different keys fail."""
    a = torch.load(ref / f"weights-rank{rank}.pt")
    b = torch.load(run_dir / f"weights-rank{rank}.pt")
    assert a.keys() == b.keys()
    if all(torch.equal(a[k], b[k]) for k in a):
        return 0.0
    return max(float((a[k].float() - b[k].float()).abs().max()) for k in a) or float("nan")
