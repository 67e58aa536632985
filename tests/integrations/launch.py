"""How the integration tests (and bench/bench_resume.py) start a worker: one process, or
``torchrun`` with ``world`` ranks on a free port (the default 29500 may still be held by the
previous job's agent)."""

from __future__ import annotations

import os
import socket
import sys
from pathlib import Path

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
