"""The Checkpointer end to end in one process: save, persist, restore, retention, cleanup."""

from __future__ import annotations

import logging
import os
import stat
from pathlib import Path
from typing import Any

import pytest
import torch

import flashckpt
from flashckpt.format import commit_key
from flashckpt.testing import parts
from tests.conftest import assert_state_equal, chunk_paths, make_state, train_step


def _ckpt(dirs: dict[str, Path], **kw: object) -> flashckpt.Checkpointer:
    kw.setdefault("local_dir", dirs["local"])
    kw.setdefault("memory_dir", dirs["memory"])
    return flashckpt.Checkpointer(dirs["storage"], **kw)  # type: ignore[arg-type]


def _train_and_save(
    ckpt: flashckpt.Checkpointer, state: dict[str, object], steps: int
) -> dict[int, dict[str, torch.Tensor]]:
    """Train and save ``steps`` steps; return a copy of the model weights at each step."""
    saved = {}
    for step in range(steps):
        train_step(state, step)
        ckpt.save(step, state)
        saved[step] = {k: v.clone() for k, v in state["model"].state_dict().items()}  # type: ignore[attr-defined]
    return saved


def _committed(root: Path) -> list[int]:
    d = root / "commits"
    return sorted(int(p.name.split("-")[1]) for p in d.iterdir()) if d.is_dir() else []


def test_restore_with_nothing_saved_returns_none(dirs: dict[str, Path]) -> None:
    state = make_state()
    with _ckpt(dirs) as ckpt:
        assert ckpt.restore(state) is None
        assert ckpt.latest_step() is None


def test_save_restore_continue_is_bitwise_equal_to_uninterrupted(dirs: dict[str, Path]) -> None:
    reference = make_state()
    for step in range(10):
        train_step(reference, step)

    state = make_state()
    with _ckpt(dirs) as ckpt:
        for step in range(6):
            train_step(state, step)
            ckpt.save(step, state)
        ckpt.wait()
    assert _committed(dirs["storage"]) == [3, 4, 5]
    assert _committed(dirs["local"]) == [3, 4, 5]

    resumed = make_state(seed=123)  # different initial weights: everything must come from the checkpoint
    with _ckpt(dirs) as ckpt:
        start = ckpt.restore(resumed)
        assert start == 5
        for step in range(start + 1, 10):
            train_step(resumed, step)
            ckpt.save(step, resumed)
    assert_state_equal(resumed, reference)


def test_clean_close_frees_memory_tier_and_files_are_private(dirs: dict[str, Path]) -> None:
    state = make_state()
    ckpt = _ckpt(dirs)
    ckpt.save(0, state)
    rank_dir = ckpt.memory_path
    ckpt.wait()
    for p in rank_dir.iterdir():
        mode = stat.S_IMODE(p.stat().st_mode)
        assert mode & 0o077 == 0, f"{p} is readable by others: {oct(mode)}"
    assert stat.S_IMODE(rank_dir.stat().st_mode) & 0o077 == 0
    ckpt.close()
    assert not dirs["memory"].exists(), list(dirs["memory"].rglob("*"))


def test_default_memory_dir_is_under_dev_shm_and_released(tmp_path: Path) -> None:
    state = make_state()
    with flashckpt.Checkpointer(tmp_path / "s") as ckpt:
        ckpt.save(0, state)
        path = ckpt.memory_path
        assert str(path).startswith("/dev/shm/") or not os.path.isdir("/dev/shm")
        assert any(path.glob("slot-*.bin"))
    assert not path.exists()


def test_every_and_persist_every(dirs: dict[str, Path]) -> None:
    state = make_state()
    with _ckpt(dirs, every=2, persist_every=2, keep=None) as ckpt:
        handles = {s: ckpt.save(s, state) for s in range(9)}
        assert [s for s, h in handles.items() if h is None] == [1, 3, 5, 7]
        ckpt.wait()
        # staged snapshots are steps 0,2,4,6,8 (k = 0..4); k % 2 == 0 are persisted
        assert _committed(dirs["storage"]) == [0, 4, 8]
        h = handles[6]
        assert h is not None and h.tiers == ("memory",)
        forced = ckpt.save(7, state, force=True)
        assert forced is not None
        forced.wait()
        assert 7 in _committed(dirs["storage"])


def test_close_persists_newest_memory_only_snapshot(dirs: dict[str, Path]) -> None:
    state = make_state()
    with _ckpt(dirs, persist_every=100) as ckpt:
        ckpt.save(0, state)
        train_step(state, 0)
        h = ckpt.save(1, state)
        assert h is not None and h.tiers == ("memory",)
        ckpt.wait()
        assert _committed(dirs["storage"]) == [0]
    assert _committed(dirs["storage"]) == [0, 1]
    assert _committed(dirs["local"]) == [0, 1]
    assert not dirs["memory"].exists()


def test_keep_retention_on_every_tier(dirs: dict[str, Path]) -> None:
    state = make_state()
    with _ckpt(dirs, keep=2) as ckpt:
        for step in range(5):
            ckpt.save(step, state)
        ckpt.wait()
        for root in (dirs["storage"], dirs["local"]):
            assert _committed(root) == [3, 4]
            assert sorted(p.name for p in (root / "steps").iterdir()) == ["000000000003", "000000000004"]
            # chunks no kept step references are gone; the kept ones are all there
            kept = {p for s in (3, 4) for p in chunk_paths(root, s)}
            assert {p for p in (root / "chunks").rglob("*") if p.is_file()} == kept
        # the memory tier holds at most two snapshots (the two slots)
        assert len(list(ckpt.memory_path.glob("step-*.manifest"))) <= 2


def test_restore_explicit_step_and_missing_step(dirs: dict[str, Path]) -> None:
    state = make_state()
    with _ckpt(dirs, keep=None) as ckpt:
        saved = _train_and_save(ckpt, state, 3)
    fresh = make_state(seed=5)
    with _ckpt(dirs) as ckpt:
        assert ckpt.restore(fresh, step=1) == 1
        for k, v in fresh["model"].state_dict().items():  # type: ignore[attr-defined]
            assert torch.equal(v, saved[1][k])
        with pytest.raises(flashckpt.CheckpointNotFound):
            ckpt.restore(fresh, step=7)


def test_restore_prefers_memory_then_local_then_storage(
    dirs: dict[str, Path], caplog: pytest.LogCaptureFixture
) -> None:
    state = make_state()
    ckpt = _ckpt(dirs)
    ckpt.save(0, state)
    ckpt.wait()
    caplog.set_level(logging.INFO, logger="flashckpt")
    assert ckpt.restore(make_state()) == 0
    assert "from the memory tier" in caplog.text
    ckpt.close()
    caplog.clear()
    with _ckpt(dirs) as ckpt:
        assert ckpt.restore(make_state()) == 0
        assert "from the local tier" in caplog.text
    caplog.clear()
    with _ckpt(dirs, local_dir=None) as ckpt:
        assert ckpt.restore(make_state()) == 0
        assert "from the storage tier" in caplog.text


def test_slot_wait_is_recorded_not_dropped(dirs: dict[str, Path]) -> None:
    from flashckpt.backends import Fault, FaultPlan, FaultyBackend, LocalBackend

    slow = FaultyBackend(
        LocalBackend(dirs["storage"]),
        FaultPlan([Fault(op="put", key_contains="commits/", times=None, error=None, delay_s=0.3)]),
    )
    state = make_state()
    with flashckpt.Checkpointer(slow, memory_dir=dirs["memory"], keep=None) as ckpt:
        handles = [ckpt.save(s, state) for s in range(4)]
        waits = ckpt.stats["slot_wait_s"]
        assert all(h is not None for h in handles)
        ckpt.wait()
    # both slots busy at the third and fourth save: they waited instead of being dropped
    assert waits > 0.05
    assert _committed(dirs["storage"]) == [0, 1, 2, 3]


def test_stats_of_last_save(dirs: dict[str, Path]) -> None:
    state = make_state()
    with _ckpt(dirs) as ckpt:
        h = ckpt.save(0, state)
        assert h is not None
        h.wait()
        s = ckpt.stats
        assert s["step"] == 0 and s["bytes"] > 0 and s["blocking_s"] > 0
        assert set(s["persist_s"]) == {"memory", "local", "storage"}
        assert s["errors"] == [] and s["persisted"] is True
        assert h.durable_on() == ("memory", "local", "storage")


def test_second_checkpointer_on_same_memory_tier_is_refused(dirs: dict[str, Path]) -> None:
    with _ckpt(dirs), pytest.raises(flashckpt.ConfigError, match="in use"):
        _ckpt(dirs)


def test_use_after_close_and_bad_arguments(dirs: dict[str, Path]) -> None:
    ckpt = _ckpt(dirs)
    ckpt.close()
    ckpt.close()  # idempotent
    with pytest.raises(flashckpt.ClosedError):
        ckpt.save(0, make_state())
    for kw in (
        {"every": 0},
        {"persist_every": -1},
        {"keep": 0},
        {"mirror": -1},
        {"mirror": "1"},
        {"compression": "lz4"},
    ):
        with pytest.raises(flashckpt.ConfigError):
            _ckpt(dirs, **kw)
    with _ckpt(dirs) as ckpt, pytest.raises(flashckpt.ConfigError):
        ckpt.save(-1, make_state())
    with pytest.raises(flashckpt.ConfigError, match="no fsspec file system"):
        flashckpt.Checkpointer("gopher://x/y")


def test_resaving_a_step_replaces_it(dirs: dict[str, Path]) -> None:
    state = make_state()
    with _ckpt(dirs) as ckpt:
        ckpt.save(3, state)
        ckpt.wait()
        with torch.no_grad():
            state["model"].lin.weight.fill_(7.0)  # type: ignore[attr-defined]
        ckpt.save(3, state)
    out = flashckpt.load(dirs["storage"], step=3)
    assert torch.all(out["model"]["lin.weight"] == 7.0)


def test_load_offline_returns_state_dicts(dirs: dict[str, Path]) -> None:
    state = make_state()
    train_step(state, 0)
    with _ckpt(dirs) as ckpt:
        ckpt.save(0, state)
    out = flashckpt.load(f"file://{dirs['storage']}")
    assert set(out) == {"model", "optim", "sched", "extra"}
    sd = state["model"].state_dict()  # type: ignore[attr-defined]
    assert out["model"].keys() == sd.keys()
    for k in sd:
        assert torch.equal(out["model"][k], sd[k])
    assert out["optim"]["param_groups"] == state["optim"].state_dict()["param_groups"]  # type: ignore[attr-defined]
    assert out["sched"] == state["sched"].state_dict()  # type: ignore[attr-defined]
    assert out["extra"] == {"epoch": 0, "seen": [0]}
    # tied weights come back as one tensor, as they were saved
    assert out["model"]["emb.weight"] is out["model"]["head.weight"]
    with pytest.raises(flashckpt.CheckpointNotFound):
        flashckpt.load(dirs["local"] / "nothing-here")


def test_commit_record_is_the_last_thing_written(dirs: dict[str, Path]) -> None:
    from flashckpt.backends import Fault, FaultPlan, FaultyBackend, LocalBackend
    from flashckpt.errors import StorageError

    plan = FaultPlan([Fault(op="put", key_contains="commits/", after=1, times=None, error=StorageError)])
    be = FaultyBackend(LocalBackend(dirs["storage"]), plan)
    state = make_state()
    with flashckpt.Checkpointer(be, memory_dir=dirs["memory"], options=flashckpt.Options(retries=1)) as ckpt:
        ckpt.save(0, state).wait()  # type: ignore[union-attr]
        h = ckpt.save(1, state)
        assert h is not None
        with pytest.raises(StorageError):
            h.wait()
        h.wait()  # raised once only
        assert ckpt.stats["errors"] and "storage" in ckpt.stats["errors"][0]
        # step 1 failed at its commit record: it does not exist, and its partial files are gone
        assert not (dirs["storage"] / commit_key(1)).exists()
        assert not (dirs["storage"] / "steps" / "000000000001").exists()
        puts = [k for k in plan.seen]  # the commit rule saw both steps' commit puts
        assert plan.seen[0] == 2 and puts == [0]
        assert ckpt.latest_step() == 1  # memory tier has it
        ckpt.close(_raise=False)
    assert flashckpt.load(dirs["storage"])["extra"] == {"epoch": 0, "seen": []}


def _flip(path: Path, offset: int) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        b = f.read(1)
        f.seek(offset)
        f.write(bytes([b[0] ^ 0x01]))


def test_a_flipped_byte_on_each_tier_falls_back_tier_by_tier_then_step_by_step(
    dirs: dict[str, Path], caplog: pytest.LogCaptureFixture
) -> None:
    from flashckpt.staging.memory_tier import read_memory_manifest

    state = make_state()
    with _ckpt(dirs, keep=None) as ckpt:
        snapshots = _train_and_save(ckpt, state, 2)
        ckpt.wait()
        m = read_memory_manifest(parts(ckpt).memory.backend, 1)
        big = max(m.chunks, key=lambda c: c.nbytes)
        _flip(ckpt.memory_path / big.key, big.at + big.nbytes // 2)  # the slot holding step 1
        caplog.set_level(logging.INFO, logger="flashckpt")

        def restored() -> tuple[int | None, dict[str, object]]:
            fresh = make_state(seed=42)
            return ckpt.restore(fresh), fresh

        step, fresh = restored()
        assert step == 1 and "from the local tier" in caplog.text
        assert "step 1 on the memory tier is unusable" in caplog.text
        # the corrupt memory copy was partly copied into the state before the checksum failed;
        # the intact copy from the local tier then overwrote all of it
        for k, v in fresh["model"].state_dict().items():  # type: ignore[attr-defined]
            assert torch.equal(v, snapshots[1][k]), k
        for d in ("local", "storage"):
            chunk = chunk_paths(dirs[d], 1)[0]
            _flip(chunk, chunk.stat().st_size // 2)
        # restoring from local put step 1 back into a slot; corrupt that copy too
        m = read_memory_manifest(parts(ckpt).memory.backend, 1)
        big = max(m.chunks, key=lambda c: c.nbytes)
        _flip(ckpt.memory_path / big.key, big.at + 7)
        caplog.clear()
        step, fresh = restored()
        assert step == 0 and "from the memory tier" in caplog.text
        for k, v in fresh["model"].state_dict().items():  # type: ignore[attr-defined]
            assert torch.equal(v, snapshots[0][k])
        with pytest.raises(flashckpt.CheckpointNotFound):
            ckpt.restore(make_state(), step=1)


def test_a_corrupt_memory_only_snapshot_that_was_partly_loaded_is_an_error(dirs: dict[str, Path]) -> None:
    """Restore from memory fills the state while it checksums; if the only copy then proves
    corrupt, restore must not return None as if the state were untouched."""
    from flashckpt.staging.memory_tier import read_memory_manifest

    state = {"w": torch.arange(1 << 20, dtype=torch.float32), "b": torch.ones(3)}
    with _ckpt(dirs, local_dir=None, persist_every=1000) as ckpt:
        ckpt.save(0, state, force=True)  # step 0 is on storage
        state["w"] += 1
        ckpt.save(1, state)  # step 1 lives in memory only
        ckpt.wait()
        m = read_memory_manifest(parts(ckpt).memory.backend, 1)
        last = max(m.chunks, key=lambda c: c.at)  # corrupt the end: most bytes are copied first
        _flip(ckpt.memory_path / last.key, last.at + last.nbytes - 1)
        target = {"w": torch.zeros(1 << 20), "b": torch.zeros(3)}
        # step 0 on storage is intact: it is used, and it overwrites what step 1 left behind
        assert ckpt.restore(target) == 0
        assert torch.equal(target["w"], torch.arange(1 << 20, dtype=torch.float32))
        with pytest.raises(flashckpt.CorruptCheckpointError, match="partially overwritten"):
            ckpt.restore({"w": torch.zeros(1 << 20), "b": torch.zeros(3)}, step=1)
        assert ckpt.restore({}, step=0) == 0  # nothing to fill: nothing touched
        ckpt.close(_raise=False)


def test_unchanged_chunks_are_not_written_again(dirs: dict[str, Path]) -> None:
    """A LoRA-like fine-tuning state: frozen base weights, small trainable adapters.  The
    second save writes only what changed; retention keeps every chunk a kept step needs."""
    g = torch.Generator().manual_seed(0)
    base = {f"layer{i}.weight": torch.randn(512, 1024, generator=g) for i in range(4)}  # 2 MiB each
    lora = {f"layer{i}.lora_{ab}": torch.zeros(8, 1024) for i in range(4) for ab in "AB"}
    state = {"base": base, "lora": lora, "step": 0}
    with _ckpt(dirs, keep=1) as ckpt:
        ckpt.save(0, state).wait()  # type: ignore[union-attr]
        first = ckpt.stats["written_bytes"]
        for step in (1, 2):
            for t in lora.values():
                t.add_(0.01)
            state["step"] = step
            ckpt.save(step, state).wait()  # type: ignore[union-attr]
            again = ckpt.stats["written_bytes"]
            for tier in ("local", "storage"):
                assert 0 < again[tier] <= 0.1 * first[tier], (tier, again, first)
        ckpt.wait()
    for root in (dirs["storage"], dirs["local"]):
        assert sorted(p.name for p in (root / "commits").iterdir()) == ["step-000000000002"]
        assert {p for p in (root / "chunks").rglob("*") if p.is_file()} == set(chunk_paths(root, 2))
    out = flashckpt.load(dirs["storage"])
    assert all(torch.equal(out["base"][k], v) for k, v in base.items())
    assert all(torch.equal(out["lora"][k], v) for k, v in lora.items()) and out["step"] == 2


def test_a_save_reuses_a_warm_slot_whose_step_is_durable_instead_of_faulting_a_cold_one(
    dirs: dict[str, Path],
) -> None:
    # Without a prefault the second slot stays cold; the first save after a restore (the
    # restored slot is mapped, its step committed everywhere) must not fault fresh memory.
    state = make_state()
    opts = flashckpt.Options(prefault=False)
    with _ckpt(dirs, options=opts, persist_every=100) as ckpt:
        ckpt.save(0, state)
        ckpt.wait()
        assert ckpt.restore(make_state()) == 0
        train_step(state, 0)
        ckpt.save(1, state)  # memory only: step 1 is not durable
        assert ckpt.stats["cold"] is False
        ckpt.wait()
        train_step(state, 1)
        ckpt.save(2, state)
        # the only warm slot holds step 1, which lives nowhere else: it is kept
        assert ckpt.stats["cold"] is True
        ckpt.wait()
        memory = sorted(p.name for p in ckpt.memory_path.iterdir() if p.name.endswith(".manifest"))
        assert memory == ["step-000000000001.manifest", "step-000000000002.manifest"]
        restored = make_state()
        assert ckpt.restore(restored, step=1) == 1  # from memory: it was kept, and is salvaged
        ckpt.wait()
        assert _committed(dirs["storage"]) == [0, 1]


def test_memory_left_by_a_job_of_another_world_size_is_named_not_read_or_deleted(
    dirs: dict[str, Path], caplog: pytest.LogCaptureFixture
) -> None:
    old = dirs["memory"] / "r00001-of-00004"  # a shard of the same job when it ran on 4 ranks
    old.mkdir(parents=True)
    (old / "slot-0.bin").write_bytes(b"x" * 4096)
    with _ckpt(dirs) as ckpt, caplog.at_level(logging.WARNING, logger="flashckpt"):
        assert ckpt.restore(make_state()) is None
    said = [r.getMessage() for r in caplog.records]
    assert any("r00001-of-00004" in m and "another world size" in m for m in said), said
    assert (old / "slot-0.bin").read_bytes() == b"x" * 4096


def test_a_state_given_as_a_function_is_built_only_when_the_save_stages(dirs: dict[str, Path]) -> None:
    built: list[int] = []

    def state_of(step: int) -> Any:
        def build() -> dict[str, torch.Tensor]:
            built.append(step)
            return {"w": torch.full((16,), float(step))}

        return build

    with flashckpt.Checkpointer(dirs["storage"], memory_dir=dirs["memory"], every=2) as ckpt:
        for step in range(5):
            ckpt.save(step, state_of(step))
        ckpt.save(5, state_of(5), force=True)
    assert built == [0, 2, 4, 5]
    assert torch.equal(flashckpt.load(dirs["storage"])["w"], torch.full((16,), 5.0))


def test_a_fresh_start_never_hides_an_older_runs_intact_step(tmp_path: Path, shm_dir: Path) -> None:
    """A run that found nothing to restore (here: storage wiped, its local tier not given)
    starts afresh with no ancestry, so it abandons nothing: once every copy of the fresh run
    is gone too, "latest" resumes the older run's newest intact step (on the local tier it
    left) instead of starting from scratch (docs/reliability.md, "a fresh start")."""
    import shutil

    storage, local = tmp_path / "storage", tmp_path / "local"

    def state(v: float) -> dict[str, torch.Tensor]:
        return {"w": torch.full((16,), v)}

    with flashckpt.Checkpointer(storage, local_dir=local, memory_dir=shm_dir / "a", keep=None) as ckpt:
        for step in range(3):
            ckpt.save(step, state(float(step)))
    shutil.rmtree(storage)
    with flashckpt.Checkpointer(storage, memory_dir=shm_dir / "b", keep=1) as ckpt:
        assert ckpt.restore(state(-1.0)) is None  # nothing visible: a fresh start
        for step in range(2):
            ckpt.save(step, state(100.0 + step))
    assert sorted(p.name for p in (local / "commits").iterdir())[-1].endswith("2")  # never retired
    shutil.rmtree(storage)  # the fresh run's copies are gone as well
    got = state(-1.0)
    with flashckpt.Checkpointer(storage, local_dir=local, memory_dir=shm_dir / "c") as ckpt:
        assert ckpt.restore(got) == 2
        assert ckpt.stats["restored"]["tier"] == "local"
    assert torch.equal(got["w"], state(2.0)["w"])


RESTART_JOB = """
import os, sys, torch, flashckpt
storage, memory = sys.argv[1:3]
g = torch.Generator().manual_seed(3)
state = {"w": torch.randn(1 << 20, generator=g), "t": torch.randn(64, 32, generator=g).t(),
         "b": torch.randn(7, generator=g)}  # t: not contiguous, loaded apart (a gap for the fills)
ckpt = flashckpt.Checkpointer(storage, memory_dir=memory, persist_every=100, preempt_signals=None)
for step in range(3):
    state["w"] += 1
    ckpt.save(step, state)
ckpt.wait()
os._exit(0)  # dies: step 2 lives in memory only
"""


@pytest.mark.subprocess
@pytest.mark.parametrize("damage", [False, True])
def test_a_restarted_job_maps_only_what_it_restores_and_verifies_every_byte(
    tmp_path: Path, shm_dir: Path, damage: bool
) -> None:
    """The constructor maps the slots an earlier process left without faulting them in (no
    work in proportion to the state); restore reads the slot holding the snapshot straight
    into the state (no page faults) and checks every byte; the slots are faulted in behind
    it, and ``prepare(wait=True)`` waits for that.  A flipped bit in the slot is caught."""
    import subprocess
    import sys

    from flashckpt.format import decode_manifest

    storage = tmp_path / "storage"
    root = Path(__file__).resolve().parent.parent
    env = {**os.environ, "PYTHONPATH": str(root)}
    subprocess.run([sys.executable, "-c", RESTART_JOB, str(storage), str(shm_dir)], env=env, check=True)
    if damage:
        (shard,) = list(shm_dir.iterdir())
        m = decode_manifest((shard / "step-000000000002.manifest").read_bytes(), allow_unsealed=True)
        c = m.chunks[0]
        with open(shard / c.key, "r+b") as f:
            f.seek(c.at + 1000)
            b = f.read(1)
            f.seek(c.at + 1000)
            f.write(bytes([b[0] ^ 0x20]))
    g = torch.Generator().manual_seed(3)
    want = {
        "w": torch.randn(1 << 20, generator=g),
        "t": torch.randn(64, 32, generator=g).t(),
        "b": torch.randn(7, generator=g),
    }
    for _ in range(2 if damage else 3):  # the job's steps, as it made them
        want["w"] += 1
    state = {"w": torch.zeros(1 << 20), "t": torch.zeros(64, 32).t(), "b": torch.zeros(7)}
    with flashckpt.Checkpointer(storage, memory_dir=shm_dir, persist_every=100) as ckpt:
        slots = parts(ckpt).stager.slots
        adopted = [s for s in slots if s.mapped]
        assert len(adopted) == 2 and all(s.lazy and not s.warm(1) for s in adopted)  # mapped, not faulted in
        got = ckpt.restore(state)
        if damage:  # the damaged copy of step 2 is skipped: step 1, in the other slot, comes back
            assert got == 1 and ckpt.stats["restored"]["tier"] == "memory"
            assert all(torch.equal(state[k], want[k]) for k in want)
            ckpt.save(2, state)  # the run goes on from step 1: its step 2 replaces the damaged one
            return
        assert got == 2 and ckpt.stats["restored"]["tier"] == "memory"
        assert all(torch.equal(state[k], want[k]) for k in want)
        ckpt.prepare(state, wait=True, timeout=60)
        assert not ckpt.stats["prefaulting"]
        assert all(s.warm(4 << 20) for s in slots)  # both slots faulted in, behind the restore
        state["w"] += 1
        ckpt.save(3, state)  # into the other slot: the restored snapshot stays intact
    assert torch.equal(flashckpt.load(storage, step=3)["w"], want["w"] + 1)
