"""Real crashes: a training process is SIGKILLed; the next process restores and goes on."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

import flashckpt
from tests.conftest import assert_state_equal, make_state, train_step

pytestmark = pytest.mark.subprocess
ROOT = Path(__file__).resolve().parent.parent


def _spawn(*args: str) -> subprocess.Popen[str]:
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    return subprocess.Popen(
        [sys.executable, "-m", "tests.crash_worker", *args],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def _wait_for(proc: subprocess.Popen[str], line: str, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    assert proc.stdout is not None
    while time.monotonic() < deadline:
        out = proc.stdout.readline()
        if out.strip() == line:
            return
        if not out and proc.poll() is not None:
            raise AssertionError(f"worker exited ({proc.returncode}) before {line!r}: {proc.stderr.read()}")  # type: ignore[union-attr]
    raise AssertionError(f"timed out waiting for {line!r}")


def _kill(proc: subprocess.Popen[str]) -> None:
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL
    for f in (proc.stdout, proc.stderr):
        if f is not None:
            f.close()


def _reference(steps: int) -> dict[str, object]:
    state = make_state()
    for s in range(steps):
        train_step(state, s)
    return state


def _committed(root: Path) -> list[int]:
    d = root / "commits"
    return sorted(int(p.name.split("-")[1]) for p in d.iterdir()) if d.is_dir() else []


def test_sigkill_mid_persist_restores_from_memory_and_salvages(tmp_path: Path, shm_dir: Path) -> None:
    storage = tmp_path / "storage"
    proc = _spawn(
        "--storage",
        str(storage),
        "--memory",
        str(shm_dir),
        "--steps",
        "3",
        "--slow-put",
        "30",
        "--slow-from-step",
        "2",
        "--hang",
    )
    try:
        _wait_for(proc, "STAGED 2")
        deadline = time.monotonic() + 30
        while _committed(storage) != [0, 1]:  # step 1 done: the persist thread is on step 2
            assert time.monotonic() < deadline
            time.sleep(0.02)
        time.sleep(0.3)  # step 2 is now stuck in its (slow) chunk puts
        assert _committed(storage) == [0, 1]
        rank_dir = shm_dir / "r00000-of-00001"
    finally:
        _kill(proc)

    # the crash left the memory tier in place
    assert (rank_dir / "step-000000000002.manifest").exists()
    assert sorted(p.name for p in rank_dir.glob("slot-*.bin")) == ["slot-0.bin", "slot-1.bin"]

    state = make_state(seed=99)
    with flashckpt.Checkpointer(storage, memory_dir=shm_dir) as ckpt:
        assert ckpt.restore(state) == 2
        ckpt.wait()  # the salvage of step 2 to storage
        assert _committed(storage) == [0, 1, 2]
    assert_state_equal(state, _reference(3))
    assert not shm_dir.exists()  # a clean close released it
    out = flashckpt.load(storage)
    assert out["extra"] == {"epoch": 0, "seen": [0, 1, 2]}


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_sigkill_at_a_random_moment_then_resume_is_bitwise_equal(
    tmp_path: Path, shm_dir: Path, seed: int
) -> None:
    """Kill a worker that saves every step at a random time; the next attempt restores a
    consistent step (whichever is newest and intact) and finishes the run bitwise equal."""
    storage, local = tmp_path / "storage", tmp_path / "local"
    steps = 12
    proc = _spawn(
        "--storage",
        str(storage),
        "--local",
        str(local),
        "--memory",
        str(shm_dir),
        "--steps",
        str(steps),
        "--hang",
    )
    try:
        _wait_for(proc, "START 0")
        time.sleep(random.Random(seed).uniform(0.05, 1.5))
    finally:
        _kill(proc)

    proc = _spawn(
        "--storage", str(storage), "--local", str(local), "--memory", str(shm_dir), "--steps", str(steps)
    )
    try:
        assert proc.stdout is not None
        out, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, err
    lines = out.split()
    assert lines[0] == "START" and "DONE" in lines
    resumed = make_state(seed=7)
    with flashckpt.Checkpointer(storage, local_dir=local, memory_dir=shm_dir) as ckpt:
        assert ckpt.restore(resumed) == steps - 1
    assert_state_equal(resumed, _reference(steps))


def test_killed_during_the_staging_copy_falls_back(tmp_path: Path, shm_dir: Path) -> None:
    """A slot whose manifest was never written (crash during staging / before checksums) is
    not a snapshot: restore uses the previous step."""
    storage = tmp_path / "storage"
    proc = _spawn("--storage", str(storage), "--memory", str(shm_dir), "--steps", "2", "--hang")
    try:
        _wait_for(proc, "DURABLE 1")
    finally:
        _kill(proc)
    rank_dir = shm_dir / "r00000-of-00001"
    # Simulate the torn state of a crash mid-copy: step 1's manifest is gone, its slot half new.
    (rank_dir / "step-000000000001.manifest").unlink()
    state = make_state(seed=3)
    with flashckpt.Checkpointer(storage, memory_dir=shm_dir) as ckpt:
        assert ckpt.restore(state) == 1  # from storage: memory no longer has step 1
        state2 = make_state(seed=4)
        assert ckpt.restore(state2, step=0) == 0
    assert_state_equal(state, _reference(2))
    assert_state_equal(state2, _reference(1))
