"""The ``flashckpt`` command line, run as a real console script."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import torch

import flashckpt
from tests.conftest import chunk_paths


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    exe = shutil.which("flashckpt", path=str(Path(sys.executable).parent))
    cmd = [exe] if exe else [sys.executable, "-m", "flashckpt.cli"]
    return subprocess.run([*cmd, *args], capture_output=True, text=True, timeout=120)


def test_ls_and_verify_raw_and_compressed(tmp_path: Path, shm_dir: Path) -> None:
    state = {"w": (torch.randn(1 << 20) * 0.02).to(torch.bfloat16), "step": 0}
    for comp in ("none", "zstd"):
        root = tmp_path / comp
        with flashckpt.Checkpointer(root, memory_dir=shm_dir, compression=comp, keep=None) as ckpt:
            for step in (3, 4):
                state["w"] = state["w"] + 1  # a new chunk for each step (unchanged ones are shared)
                ckpt.save(step, state)
        out = _cli("ls", str(root), "--json")
        assert out.returncode == 0, out.stderr
        rows = json.loads(out.stdout)
        assert [r["step"] for r in rows] == [3, 4] and all(r["world_size"] == 1 for r in rows)
        ok = _cli("verify", str(root))
        assert ok.returncode == 0 and "step 3: ok" in ok.stdout and "step 4: ok" in ok.stdout, (
            ok.stdout + ok.stderr
        )
        chunk = chunk_paths(root, 4)[0]
        data = bytearray(chunk.read_bytes())
        data[len(data) // 2] ^= 0x10
        chunk.write_bytes(bytes(data))
        bad = _cli("verify", str(root))
        assert bad.returncode == 1 and "step 4: CORRUPT" in bad.stdout and "step 3: ok" in bad.stdout
        assert _cli("verify", str(root), "--step", "9").returncode == 2
