"""``flashckpt ls URL --memory-dir D --local-dir D``: every snapshot on every tier after a
crash, and which one a restore would pick (and why newer ones are passed over)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.multiprocessing as mp

import flashckpt
from flashckpt.cli import main

ROOT = Path(__file__).resolve().parent.parent

CRASHED_JOB = """
import os, sys, torch, flashckpt
storage, local, memory = sys.argv[1:4]
ckpt = flashckpt.Checkpointer(
    storage, local_dir=local, memory_dir=memory, persist_every=3, preempt_signals=None
)
for step in range(5):
    ckpt.save(step, {"w": torch.full((64,), float(step))})
ckpt.wait()
os._exit(0)  # dies without close: the memory tier stays, as after a crash
"""


def _ls(capsys: pytest.CaptureFixture[str], *argv: str) -> list[dict[str, Any]]:
    assert main(["ls", *argv, "--json"]) == 0
    return list(json.loads(capsys.readouterr().out))


@pytest.mark.subprocess
def test_after_a_crash_every_tier_is_listed_and_the_memory_only_step_is_the_one_restore_picks(
    tmp_path: Path, shm_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    storage, local = tmp_path / "storage", tmp_path / "local"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    subprocess.run(
        [sys.executable, "-c", CRASHED_JOB, str(storage), str(local), str(shm_dir)], env=env, check=True
    )
    rows = {
        r["step"]: r
        for r in _ls(capsys, str(storage), "--memory-dir", str(shm_dir), "--local-dir", str(local))
    }
    assert sorted(rows) == [0, 3, 4]  # 0 and 3 persisted; 3 and 4 in the two slots
    assert rows[0]["tiers"] == {"local": [0], "storage": [0]}
    assert rows[3]["tiers"] == {"memory": [0], "local": [0], "storage": [0]}
    assert rows[4]["tiers"] == {"memory": [0]} and rows[4]["restore"]
    assert not rows[3]["restore"] and not rows[0]["restore"]
    assert all(r["bytes"] == 64 * 4 and r["created_unix"] is not None for r in rows.values())
    # ... and it is what a restore does pick
    with flashckpt.Checkpointer(storage, local_dir=local, memory_dir=shm_dir, persist_every=3) as ckpt:
        assert ckpt.restore({"w": torch.zeros(64)}) == 4
    assert main(["ls", str(storage), "--memory-dir", str(shm_dir)]) == 0
    assert "restore picks this" in capsys.readouterr().out


def _two_ranks(rank: int, init: str, storage: str, memory: str) -> None:
    torch.distributed.init_process_group(
        "gloo", init_method=init, rank=rank, world_size=2, timeout=timedelta(seconds=30)
    )
    ckpt = flashckpt.Checkpointer(storage, memory_dir=memory, persist_every=100, preempt_signals=None)
    for step in range(3):  # 0 persisted, 1 and 2 in memory only
        ckpt.save(step, {"w": torch.full((8,), float(rank * 10 + step))})
    ckpt.wait()
    os._exit(0)  # a crash of the whole job: both memory tiers stay


@pytest.mark.subprocess
def test_a_snapshot_a_rank_has_no_copy_of_is_passed_over_with_the_reason(
    tmp_path: Path, shm_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    storage = tmp_path / "storage"
    mp.spawn(_two_ranks, args=(f"file://{tmp_path / 'rdzv'}", str(storage), str(shm_dir)), nprocs=2)
    (shm_dir / "r00001-of-00002" / "step-000000000002.manifest").unlink()  # rank 1's copy of step 2 gone
    rows = {r["step"]: r for r in _ls(capsys, str(storage), "--memory-dir", str(shm_dir))}
    assert rows[2]["tiers"] == {"memory": [0]} and not rows[2]["restore"]
    assert rows[2]["note"] == "passed over: no copy of rank(s) 1"
    assert rows[1]["tiers"] == {"memory": [0, 1]} and rows[1]["restore"]
    assert rows[0]["tiers"] == {"storage": [0, 1]}


def test_without_tier_options_ls_lists_the_storage_tier_as_before(
    dirs: dict[str, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    with flashckpt.Checkpointer(dirs["storage"], memory_dir=dirs["memory"], preempt_signals=None) as ckpt:
        ckpt.save(1, {"w": torch.ones(4)})
    rows = _ls(capsys, str(dirs["storage"]))
    assert [r["step"] for r in rows] == [1] and "tiers" not in rows[0]
    # an empty or missing memory directory lists the storage tier's steps only
    rows = _ls(capsys, str(dirs["storage"]), "--memory-dir", str(dirs["memory"] / "nothing-here"))
    assert [(r["step"], r["tiers"], r["restore"]) for r in rows] == [(1, {"storage": [0]}, True)]
