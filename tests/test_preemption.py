"""Preemption: a signal makes the next save the final one, persisted; handlers chain and go back.

In-process tests send the signal to this process (pytest runs tests on the main thread);
subprocess tests send real SIGTERMs to training loops (tests/preempt_worker.py), one and two
ranks, and check what the next run resumes from.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

import flashckpt
from flashckpt.errors import ConfigError

ROOT = Path(__file__).resolve().parent.parent


def _state(step: int) -> dict[str, torch.Tensor]:
    return {"w": torch.full((4096,), float(step))}


@pytest.fixture
def usr2() -> Iterator[list[int]]:
    """A user handler on SIGUSR2 (recording what it got), put back afterwards."""
    got: list[int] = []
    before = signal.signal(signal.SIGUSR2, lambda s, f: got.append(s))
    yield got
    signal.signal(signal.SIGUSR2, before)


def _deliver(sig: signal.Signals) -> None:
    """Send ``sig`` to this process and let the main thread run its handler."""
    os.kill(os.getpid(), sig)
    time.sleep(0.05)  # the handler runs at the next bytecode boundary of the main thread


def test_a_signal_makes_the_next_save_a_forced_persisted_final_one(
    dirs: dict[str, Path], usr2: list[int]
) -> None:
    mine = signal.getsignal(signal.SIGUSR2)
    with flashckpt.Checkpointer(
        dirs["storage"], memory_dir=dirs["memory"], every=10, persist_every=100, preempt_signals=["USR2"]
    ) as ckpt:
        assert signal.getsignal(signal.SIGUSR2) != mine  # installed
        ckpt.save(0, _state(0))
        for step in (1, 2):  # not a multiple of every: skipped
            assert ckpt.save(step, _state(step)) is None
        assert not ckpt.preempted
        _deliver(signal.SIGUSR2)
        assert ckpt.preempted and usr2 == [signal.SIGUSR2]  # set, and chained to the user's
        handle = ckpt.save(3, _state(3))  # not a multiple of every, yet taken
        assert handle is not None and ckpt.stats["persisted"]
        handle.wait(60)
        assert ckpt.save(4, _state(4)) is None  # one final snapshot: later saves are as usual
    assert signal.getsignal(signal.SIGUSR2) == mine  # put back by close
    assert torch.equal(flashckpt.load(dirs["storage"])["w"], _state(3)["w"])


def test_handlers_are_installed_only_from_the_main_thread(dirs: dict[str, Path], usr2: list[int]) -> None:
    mine = signal.getsignal(signal.SIGUSR2)
    seen: list[Any] = []

    def build() -> None:
        with flashckpt.Checkpointer(
            dirs["storage"], memory_dir=dirs["memory"], preempt_signals=["SIGUSR2"]
        ) as ckpt:
            seen.append(signal.getsignal(signal.SIGUSR2))
            ckpt.save(0, _state(0))

    t = threading.Thread(target=build)
    t.start()
    t.join(60)
    assert seen == [mine]


def test_a_handler_installed_after_ours_stays_and_ours_still_chains(
    dirs: dict[str, Path], usr2: list[int]
) -> None:
    ckpt = flashckpt.Checkpointer(dirs["storage"], memory_dir=dirs["memory"], preempt_signals=["SIGUSR2"])
    ours = signal.getsignal(signal.SIGUSR2)
    later: list[int] = []

    def after(s: int, f: Any) -> None:  # a library that chains to the handler it found (Lightning does)
        later.append(s)
        assert callable(ours)
        ours(s, f)

    signal.signal(signal.SIGUSR2, after)
    ckpt.close()
    assert signal.getsignal(signal.SIGUSR2) is after  # not ripped out from under the later one
    _deliver(signal.SIGUSR2)
    assert later == [signal.SIGUSR2] and usr2 == [signal.SIGUSR2]  # ours, closed, only chains


def test_no_signals_installs_nothing_and_bad_signals_are_refused(dirs: dict[str, Path]) -> None:
    before = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGUSR1)}
    with flashckpt.Checkpointer(dirs["storage"], memory_dir=dirs["memory"], preempt_signals=None) as ckpt:
        assert {s: signal.getsignal(s) for s in before} == before
        assert not ckpt.preempted
    for bad in (["SIGNOPE"], ["SIGKILL"], "SIGTERM", [True], [0]):
        with pytest.raises(ConfigError, match="preempt_signals"):
            flashckpt.Checkpointer(dirs["storage"], memory_dir=dirs["memory"], preempt_signals=bad)  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="preempt_grace_s"):
        flashckpt.Options(preempt_grace_s=0)


def test_the_grace_period_persists_the_newest_snapshot_when_the_loop_does_not_save(
    dirs: dict[str, Path], usr2: list[int]
) -> None:
    opts = flashckpt.Options(preempt_grace_s=0.5)
    with flashckpt.Checkpointer(
        dirs["storage"], memory_dir=dirs["memory"], persist_every=100, preempt_signals=["USR2"], options=opts
    ) as ckpt:
        for step in range(3):  # 0 persisted, 1 and 2 in memory only
            ckpt.save(step, _state(step))
        ckpt.wait(60)
        _deliver(signal.SIGUSR2)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:  # the loop does not save: the watcher persists step 2
            if _newest(dirs["storage"]) == 2:
                break
            time.sleep(0.1)
        assert _newest(dirs["storage"]) == 2
        assert usr2 == [signal.SIGUSR2]  # the previous handler was the user's: no exit


def _newest(storage: Path) -> int | None:
    from flashckpt.catalog import Catalog

    if not storage.is_dir():
        return None
    with Catalog(storage) as cat:
        return max(cat.step_numbers(), default=None)


# -- real signals to training processes ------------------------------------------------------------
def _spawn(
    out: Path, storage: Path, memory: Path, *extra: str, rank: int = 0, world: int = 1, port: int = 0
) -> subprocess.Popen[str]:
    cmd = [
        sys.executable, "-m", "tests.preempt_worker", "--out", str(out), "--storage", str(storage),
        "--memory", str(memory), "--rank", str(rank), "--world", str(world), "--port", str(port), *extra,
    ]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    return subprocess.Popen(
        cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )


def _steps(out: Path, rank: int = 0) -> list[int]:
    f = out / f"steps-rank{rank}"
    return [int(x) for x in f.read_text().split()] if f.exists() else []


def _wait_for_step(out: Path, step: int, procs: list[subprocess.Popen[str]], rank: int = 0) -> None:
    deadline = time.monotonic() + 120
    while not _steps(out, rank) or _steps(out, rank)[-1] < step:
        for p in procs:
            if p.poll() is not None:
                raise AssertionError(
                    f"worker ended early ({p.returncode}):\n{p.stdout.read() if p.stdout else ''}"
                )
        assert time.monotonic() < deadline, "the worker did not get there in 120 s"
        time.sleep(0.05)


def _finish(p: subprocess.Popen[str], timeout: float = 120) -> tuple[int, str]:
    try:
        out, _ = p.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        p.kill()
        out, _ = p.communicate()
        raise AssertionError(f"worker did not end:\n{out}") from None
    return p.returncode, out


def _end(out: Path, rank: int = 0) -> dict[str, Any]:
    return dict(json.loads((out / f"end-rank{rank}.json").read_text()))


@pytest.mark.subprocess
def test_sigterm_to_a_training_loop_commits_its_final_step_exits_0_and_the_next_run_resumes_there(
    tmp_path: Path, shm_dir: Path
) -> None:
    storage = tmp_path / "storage"
    out1, out2 = tmp_path / "run1", tmp_path / "run2"
    out1.mkdir()
    out2.mkdir()
    p = _spawn(out1, storage, shm_dir, "--every", "4", "--persist-every", "5")
    _wait_for_step(out1, 9, [p])
    p.send_signal(signal.SIGTERM)
    rc, log = _finish(p)
    assert rc == 0, log
    end = _end(out1)
    final = end["last"]
    assert end["preempted"] and final == _steps(out1)[-1]
    assert _newest(storage) == final  # forced and persisted although neither every nor persist_every said so
    q = _spawn(out2, storage, shm_dir, "--steps", str(final + 3))
    rc, log = _finish(q)
    assert rc == 0, log
    assert _end(out2)["restored"] == final
    # the model the second run started from is the one the first ended with
    first = torch.load(out1 / "state-rank0.pt")["model"]
    loaded = flashckpt.load(storage, step=final)
    for k, v in first.items():
        assert torch.equal(loaded["model"][k], v), k


@pytest.mark.subprocess
def test_a_loop_that_never_saves_again_gets_its_newest_snapshot_persisted_then_ends_as_sigterm_would(
    tmp_path: Path, shm_dir: Path
) -> None:
    storage, out = tmp_path / "storage", tmp_path / "run"
    out.mkdir()
    p = _spawn(out, storage, shm_dir, "--persist-every", "1000", "--hang-after", "6", "--grace", "1")
    _wait_for_step(out, 6, [p])
    t0 = time.monotonic()
    p.send_signal(signal.SIGTERM)
    rc, log = _finish(p)
    assert rc == -signal.SIGTERM, log  # the default disposition, after the grace period
    assert time.monotonic() - t0 >= 1.0
    assert _newest(storage) == 6, log  # step 6 lived in memory only; the watcher persisted it


@pytest.mark.subprocess
@pytest.mark.distributed
def test_sigterm_to_one_rank_of_two_ends_both_at_the_same_committed_step(
    tmp_path: Path, shm_dir: Path
) -> None:
    storage, out = tmp_path / "storage", tmp_path / "run"
    out.mkdir()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    procs = [
        _spawn(out, storage, shm_dir, "--persist-every", "7", rank=r, world=2, port=port) for r in range(2)
    ]
    _wait_for_step(out, 5, procs, rank=1)
    procs[1].send_signal(signal.SIGTERM)  # the other rank learns it through the store
    results = [_finish(p) for p in procs]
    for rc, log in results:
        assert rc == 0, log
    ends = [_end(out, r) for r in range(2)]
    assert ends[0]["last"] == ends[1]["last"] and ends[0]["preempted"] and ends[1]["preempted"]
    assert _steps(out, 0) == _steps(out, 1)
    assert _newest(storage) == ends[0]["last"]


def _pair(tmp_path: Path, shm_dir: Path, peer: str) -> tuple[Path, list[subprocess.Popen[str]]]:
    """Two coupled ranks (grace 1 s); rank 1 does ``peer`` (``--hang-after 5``: stops in
    Python, alive; ``--die-after 5``: SIGKILLed) after step 5.  Returns once rank 0 has
    saved step 5: it is then in, or about to enter, step 6's all_reduce."""
    storage, out = tmp_path / "storage", tmp_path / "run"
    out.mkdir()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    common = ["--persist-every", "100", "--grace", "1"]
    procs = [
        _spawn(out, storage, shm_dir, *common, rank=0, world=2, port=port),
        _spawn(out, storage, shm_dir, *common, peer, "5", rank=1, world=2, port=port),
    ]
    _wait_for_step(out, 5, procs[:1], rank=0)
    return storage, procs


@pytest.mark.subprocess
@pytest.mark.distributed
def test_sigterm_to_a_rank_blocked_in_native_code_ends_it_after_the_grace_period(
    tmp_path: Path, shm_dir: Path
) -> None:
    """A rank blocked in a collective whose peer hangs never runs a Python signal handler; the
    watcher learns of the signal through the wakeup fd and ends the process after the grace
    period, instead of holding a restart back until torchrun's SIGKILL (30 s later) or the
    collective's timeout (30 min here).  Its snapshots stay in memory for the restart."""
    storage, procs = _pair(tmp_path, shm_dir, "--hang-after")
    try:
        time.sleep(0.5)  # rank 0 waits in step 6's all_reduce for rank 1, which sleeps
        procs[0].send_signal(signal.SIGTERM)
        rc, log = _finish(procs[0], timeout=60)
        assert rc == 128 + signal.SIGTERM, log
        assert "blocked in native code since SIGTERM" in log
        rows = {r["step"]: r for r in _ls_memory(storage, shm_dir / "node0")}
        assert rows[5]["tiers"] == {"memory": [0]}  # rank 0's newest snapshot waits in memory
    finally:
        procs[1].kill()
        procs[1].communicate()


@pytest.mark.subprocess
@pytest.mark.distributed
def test_a_rank_whose_collective_fails_on_a_dead_peer_leaves_at_once_keeping_its_memory(
    tmp_path: Path, shm_dir: Path
) -> None:
    """Leaving the ``with`` block on that exception does not wait ``coord_timeout_s`` (60 s
    here) for a shared commit the dead rank can never join: own tiers only, memory kept."""
    storage, procs = _pair(tmp_path, shm_dir, "--die-after")
    assert procs[1].wait(timeout=60) == -signal.SIGKILL
    rc, log = _finish(procs[0], timeout=40)
    assert rc == 1 and "Connection closed by peer" in log, log
    assert "within 60 s" not in log
    rows = {r["step"]: r for r in _ls_memory(storage, shm_dir / "node0")}
    assert rows[5]["tiers"] == {"memory": [0]}


def _ls_memory(storage: Path, memory: Path) -> list[dict[str, Any]]:
    cmd = [sys.executable, "-m", "flashckpt.cli", "ls", str(storage), "--memory-dir", str(memory), "--json"]
    proc = subprocess.run(
        cmd, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)}, capture_output=True, text=True
    )
    assert proc.returncode == 0, proc.stderr
    return list(json.loads(proc.stdout))


def test_closed_from_another_thread_the_wakeup_fd_is_never_left_pointing_at_a_closed_file(
    dirs: dict[str, Path],
) -> None:
    """The interpreter writes signal numbers to the wakeup fd; only the main thread can put
    it back, so a Checkpointer closed from another thread keeps its pipe open (a closed fd
    number may be reused by another file, which would then receive those bytes)."""
    import threading

    ckpt = flashckpt.Checkpointer(dirs["storage"], memory_dir=dirs["memory"])
    closer = threading.Thread(target=ckpt.close)
    closer.start()
    closer.join()
    fd = signal.set_wakeup_fd(-1)
    try:
        if fd != -1:
            os.fstat(fd)  # still open: not a number another file may have taken
    finally:
        if fd != -1:
            signal.set_wakeup_fd(fd)
    ckpt2 = flashckpt.Checkpointer(dirs["storage"], memory_dir=dirs["memory"])
    ckpt2.close()  # on the main thread: put back (ours was not the process's any more? then left)
    assert signal.set_wakeup_fd(-1) in (-1, fd)
