"""Storage failures during saves: retried, reported, never fatal, never damaging older steps."""

from __future__ import annotations

import contextlib
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

import flashckpt
from flashckpt.backends import Fault, FaultPlan, FaultyBackend, LocalBackend
from flashckpt.errors import StorageError, StorageFullError, TransientStorageError
from flashckpt.testing import parts
from tests.conftest import make_state, train_step

FAST_RETRY = flashckpt.Options(retries=4, backoff_s=0.01, backoff_max_s=0.05)


def _committed(root: Path) -> list[int]:
    d = root / "commits"
    return sorted(int(p.name.split("-")[1]) for p in d.iterdir()) if d.is_dir() else []


def test_transient_errors_are_retried_until_the_step_commits(tmp_path: Path, shm_dir: Path) -> None:
    plan = FaultPlan([Fault(op="put", key_contains="steps/", times=3, error=TransientStorageError)])
    be = FaultyBackend(LocalBackend(tmp_path / "s"), plan)
    state = make_state()
    with flashckpt.Checkpointer(be, memory_dir=shm_dir, options=FAST_RETRY) as ckpt:
        h = ckpt.save(0, state)
        assert h is not None
        h.wait()
        assert ckpt.stats["errors"] == []
    assert plan.fired == 3
    assert _committed(tmp_path / "s") == [0]


def test_a_failing_tier_is_reported_and_the_others_go_on(tmp_path: Path, shm_dir: Path) -> None:
    plan = FaultPlan([Fault(op="put", times=None, error=StorageError)])
    local = FaultyBackend(LocalBackend(tmp_path / "l"), plan)
    state = make_state()
    with flashckpt.Checkpointer(
        tmp_path / "s", local_dir=local, memory_dir=shm_dir, options=FAST_RETRY
    ) as ckpt:
        h = ckpt.save(0, state)
        assert h is not None
        with pytest.raises(StorageError, match="injected"):
            h.wait()
        assert h.durable_on() == ("memory", "storage")
        assert len(ckpt.stats["errors"]) == 1 and ckpt.stats["errors"][0].startswith("local:")
        assert not (tmp_path / "l" / "steps").exists() or not any((tmp_path / "l" / "steps").rglob("*"))
        ckpt.close(_raise=False)
    assert _committed(tmp_path / "s") == [0]


def test_a_step_a_tier_failed_to_take_keeps_its_warm_slot(tmp_path: Path, shm_dir: Path) -> None:
    """A save whose storage write failed lives only in memory: the next save faults the cold
    slot in rather than write over it, so a crash or failure during that copy never leaves the
    job without the step.  (After a restore the restored slot is warm and the other cold:
    without a prefault, a warm slot is taken over a cold one only when its step is durable
    elsewhere.)"""
    plan = FaultPlan([Fault(op="put", key_contains="steps/000000000001/", times=None, error=StorageError)])
    storage = FaultyBackend(LocalBackend(tmp_path / "s"), plan)
    opts = flashckpt.Options(retries=1, backoff_s=0.01, backoff_max_s=0.05, prefault=False)
    state = make_state()
    with flashckpt.Checkpointer(storage, memory_dir=shm_dir, options=opts) as ckpt:
        ckpt.save(0, state)
        ckpt.wait()
        assert ckpt.restore(make_state()) == 0  # the restored slot is warm, the other cold
        train_step(state, 0)
        h = ckpt.save(1, state)
        assert h is not None
        with pytest.raises(StorageError, match="injected"):
            h.wait()
        assert plan.fired and h.durable_on() == ("memory",)
        assert ckpt.stats["cold"] is False
        train_step(state, 1)
        ckpt.save(2, state)
        # the only warm slot holds step 1, which lives nowhere else: it is kept
        assert ckpt.stats["cold"] is True
        ckpt.wait()
        memory = sorted(p.name for p in ckpt.memory_path.iterdir() if p.name.endswith(".manifest"))
        assert memory == ["step-000000000001.manifest", "step-000000000002.manifest"]
        ckpt.close(_raise=False)
    assert _committed(tmp_path / "s") == [0, 2]


def test_truncated_read_on_one_tier_falls_back_to_the_next(tmp_path: Path, shm_dir: Path) -> None:
    state = make_state()
    train_step(state, 0)
    with flashckpt.Checkpointer(tmp_path / "s", local_dir=tmp_path / "l", memory_dir=shm_dir) as ckpt:
        ckpt.save(0, state)
    plan = FaultPlan([Fault(op="get", key_contains="steps/", times=None, error=None, truncate_to=100)])
    local = FaultyBackend(LocalBackend(tmp_path / "l"), plan)
    fresh = make_state(seed=1)
    with flashckpt.Checkpointer(tmp_path / "s", local_dir=local, memory_dir=shm_dir) as ckpt:
        assert ckpt.restore(fresh) == 0
    assert plan.fired > 0
    for k, v in state["model"].state_dict().items():  # type: ignore[attr-defined]
        assert torch.equal(v, fresh["model"].state_dict()[k])  # type: ignore[attr-defined]


@contextlib.contextmanager
def _tmpfs(mnt: Path, size: str, mode: str = "1777") -> Iterator[Path]:
    """A real, small file system (tmpfs) at ``mnt``, so that writes fail with a real ENOSPC."""
    mnt.mkdir()
    opts = f"size={size},mode={mode}"
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", opts, "tmpfs", str(mnt)], capture_output=True)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {r.stderr.decode().strip()}")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", str(mnt)], check=True)


@pytest.fixture
def tiny_fs(tmp_path: Path) -> Iterator[Path]:
    with _tmpfs(tmp_path / "tiny", "1m") as mnt:
        yield mnt


def test_enospc_on_the_local_tier(tiny_fs: Path, tmp_path: Path, shm_dir: Path) -> None:
    state = make_state()
    train_step(state, 0)
    with flashckpt.Checkpointer(
        tmp_path / "s", local_dir=tiny_fs, memory_dir=shm_dir, options=FAST_RETRY, keep=None
    ) as ckpt:
        ckpt.save(0, state).wait()  # type: ignore[union-attr]
        state["extra"]["big"] = torch.ones(1 << 19)  # type: ignore[index]  # 2 MiB: cannot fit
        h = ckpt.save(1, state)
        assert h is not None
        train_step(state, 1)  # training goes on while the save fails in the background
        with pytest.raises(StorageFullError):
            h.wait()
        assert "StorageFullError" in ckpt.stats["errors"][0]
        assert h.durable_on() == ("memory", "storage")
        del state["extra"]["big"]  # type: ignore[attr-defined]
        ckpt.save(2, state).wait()  # type: ignore[union-attr]  # the failed step's partial files were removed
        ckpt.close(_raise=False)
    assert _committed(tiny_fs) == [0, 2]
    assert _committed(tmp_path / "s") == [0, 1, 2]
    out0 = flashckpt.load(tiny_fs, step=0)
    assert out0["extra"]["seen"] == [0]


def test_memory_tier_full_fails_the_save_not_the_training(tmp_path: Path) -> None:
    """A real 8 MiB tmpfs as the memory tier: a state that outgrows it cannot be staged; the
    save reports StorageFullError (never SIGBUS), and saves work again once it fits."""
    with _tmpfs(tmp_path / "shm", "8m", mode="0700") as mnt:  # a memory tier is private
        state = make_state()
        with flashckpt.Checkpointer(tmp_path / "s", memory_dir=mnt, keep=None) as ckpt:
            ckpt.save(0, state).wait()  # type: ignore[union-attr]
            state["extra"]["big"] = torch.ones(4 << 20)  # type: ignore[index]  # 16 MiB
            h = ckpt.save(1, state)
            assert h is not None and h.done()
            with pytest.raises(StorageFullError):
                h.wait()
            assert "StorageFullError" in ckpt.stats["errors"][0]
            del state["extra"]["big"]  # type: ignore[attr-defined]
            train_step(state, 0)
            ckpt.save(2, state).wait()  # type: ignore[union-attr]
        assert _committed(tmp_path / "s") == [0, 2]
        assert list(mnt.iterdir()) == []


def test_an_unreachable_storage_tier_is_not_taken_for_an_empty_one(dirs: dict[str, Path]) -> None:
    from flashckpt.backends import Fault, FaultPlan, FaultyBackend, LocalBackend

    state = make_state()
    with flashckpt.Checkpointer(dirs["storage"], memory_dir=dirs["memory"]) as ckpt:
        ckpt.save(0, state)
    down = FaultyBackend(
        LocalBackend(dirs["storage"]),
        FaultPlan([Fault(op="list", key_contains="commits", times=None)]),
    )
    opts = flashckpt.Options(retries=2, backoff_s=0.01)
    with flashckpt.Checkpointer(down, memory_dir=dirs["memory"], options=opts) as ckpt:
        # nothing in memory, storage unreachable: an error to retry, never a fresh start
        with pytest.raises(flashckpt.TransientStorageError, match="refusing to start from scratch"):
            ckpt.restore(make_state())
        with pytest.raises(ValueError, match=r"Fault\.op"):
            Fault(op="children")  # type: ignore[arg-type]
        # A snapshot in memory is not restored as "latest" either: the unreachable tier may
        # hold newer steps, and continuing from an older one would retire them.  An explicit
        # step is the user's call and is restored.
        ckpt.save(1, state, force=True)
        with pytest.raises(flashckpt.TransientStorageError, match="could not be listed"):
            ckpt.restore(make_state())
        assert ckpt.restore(make_state(), step=1) == 1


@pytest.mark.parametrize("two_tiers", [True, False])
def test_a_first_tier_failing_before_any_checksum_still_seals_the_snapshot(
    tmp_path: Path, shm_dir: Path, two_tiers: bool
) -> None:
    """Checksums are computed by the first tier's chunk tasks; if that tier fails before
    starting them (here: it cannot even un-commit the step), the snapshot is checksummed
    anyway: the memory tier's manifest is sealed and the next tier is written."""
    from flashckpt.staging.memory_tier import read_memory_manifest

    plan = FaultPlan([Fault(op="delete", key_contains="commits/", times=None, error=StorageError)])
    failing = FaultyBackend(LocalBackend(tmp_path / "bad"), plan)
    state = make_state()
    tiers: dict[str, object] = (
        {"storage": tmp_path / "s", "local_dir": failing} if two_tiers else {"storage": failing}
    )
    with flashckpt.Checkpointer(memory_dir=shm_dir, options=FAST_RETRY, **tiers) as ckpt:  # type: ignore[arg-type]
        h = ckpt.save(0, state)
        assert h is not None
        with pytest.raises(StorageError, match="injected"):
            h.wait(timeout=60)
        assert h.durable_on() == (("memory", "storage") if two_tiers else ("memory",))
        assert read_memory_manifest(parts(ckpt).memory.backend, 0).sealed
        ckpt.close(_raise=False)
    assert plan.fired > 0
    if two_tiers:
        assert _committed(tmp_path / "s") == [0]


def test_a_chunk_write_that_cannot_even_be_scheduled_fails_the_save_without_hanging(
    tmp_path: Path, shm_dir: Path
) -> None:
    """As after interpreter shutdown began: the I/O pool refuses new work.  The checksum
    task that hands the write over must still settle, or every wait would hang."""
    state = make_state()
    with flashckpt.Checkpointer(tmp_path / "s", memory_dir=shm_dir, options=FAST_RETRY) as ckpt:
        pool = parts(ckpt).persister.pool
        submit = pool.submit

        def refuse(*args: object, **kwargs: object) -> object:
            raise RuntimeError("cannot schedule new futures after interpreter shutdown")

        pool.submit = refuse  # type: ignore[method-assign]
        h = ckpt.save(0, state)
        assert h is not None
        with pytest.raises(RuntimeError, match="cannot schedule"):
            h.wait(timeout=60)
        assert h.durable_on() == ("memory",)
        pool.submit = submit  # type: ignore[method-assign]
        train_step(state, 0)
        ckpt.save(1, state).wait(timeout=60)  # type: ignore[union-attr]
    assert _committed(tmp_path / "s") == [1]


@pytest.mark.parametrize("manifest_fails", [True, False], ids=["manifest-put-fails", "control"])
def test_a_manifest_write_that_fails_leaves_no_commit(
    tmp_path: Path, shm_dir: Path, manifest_fails: bool
) -> None:
    """The manifest goes before the commit record: when its put fails (every retry), the step
    is not committed on that tier, and the step before it is still the newest there.  (The
    control run shows the fault is the only difference.)"""
    faults = (
        [Fault(op="put", key_contains=".manifest", times=None, error=StorageError)] if manifest_fails else []
    )
    plan = FaultPlan(faults)
    state = make_state()
    with flashckpt.Checkpointer(tmp_path / "s", memory_dir=shm_dir, options=FAST_RETRY) as ckpt:
        h = ckpt.save(0, state)
        assert h is not None
        h.wait()
    be = FaultyBackend(LocalBackend(tmp_path / "s"), plan)
    train_step(state, 1)
    with flashckpt.Checkpointer(be, memory_dir=shm_dir, options=FAST_RETRY) as ckpt:
        ckpt.restore(make_state())
        h = ckpt.save(1, state)
        assert h is not None
        if manifest_fails:
            with pytest.raises(StorageError, match="injected"):
                h.wait()
        else:
            h.wait()
        ckpt.close(_raise=False)
    assert _committed(tmp_path / "s") == ([0] if manifest_fails else [0, 1])
    assert (plan.fired >= 1) == manifest_fails
