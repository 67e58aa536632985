"""Reproductions of the engine's trust defects (../shared/reviews/reliability-2026-11.md), each
on the lifecycle a user walks: every test failed on the engine before its fix.

States here have tensors of several chunks (``chunk_bytes`` of 1 MiB, tensors of 3 MiB and
more), so a defect that handles only a chunk's prefix, or only the first chunk, shows.
"""

from __future__ import annotations

import logging
import os
import shutil
import threading
import time
from pathlib import Path
from typing import Any

import pytest
import torch

import flashckpt
from flashckpt import _hooks as hooks
from flashckpt.backends import LocalBackend
from flashckpt.format import commit_key, decode_manifest, memory_manifest_key
from flashckpt.testing import parts

MiB = 1 << 20
OPTS = flashckpt.Options(chunk_bytes=MiB, retries=2, backoff_s=0.01)


def _state(step: int) -> dict[str, Any]:
    """Content that depends on ``step`` only: bf16 weights (they compress), fp32 moments
    spanning several chunks, small tensors packed together, plain values."""
    g = torch.Generator().manual_seed(step)
    return {
        "w": (torch.randn(3 * MiB // 2, generator=g) * 0.02).to(torch.bfloat16),  # 3 MiB
        "m": torch.randn(3 * MiB // 4 + 5, generator=g),  # 3 MiB and a bit: 4 chunks
        "small": [torch.full((7,), float(step)), torch.arange(step + 1)],
        "step": step,
    }


def _equal(a: dict[str, Any], b: dict[str, Any]) -> bool:
    return (
        torch.equal(a["w"], b["w"])
        and torch.equal(a["m"], b["m"])
        and all(torch.equal(x, y) for x, y in zip(a["small"], b["small"], strict=True))
        and a["step"] == b["step"]
    )


def _blank(step: int) -> dict[str, Any]:
    """A state to restore into: the shapes of ``_state(step)``, none of its values."""
    s = _state(step)
    return {
        "w": torch.zeros_like(s["w"]),
        "m": torch.zeros_like(s["m"]),
        "small": [torch.zeros_like(t) for t in s["small"]],
        "step": -1,
    }


def _ckpt(dirs: dict[str, Path], **kw: Any) -> flashckpt.Checkpointer:
    kw.setdefault("options", OPTS)
    return flashckpt.Checkpointer(dirs["storage"], memory_dir=dirs["memory"], **kw)


def _load_eq(url: Path, step: int) -> bool:
    return _equal(flashckpt.load(url, step=step, options=OPTS), _state(step))


_CHILD = """
import json, os, sys, time
cfg = json.loads(sys.argv[1])
if cfg["skew_ns"]:
    real = time.time_ns
    time.time_ns = lambda: real() + cfg["skew_ns"]
import flashckpt
from tests.test_trust import OPTS, _state
ckpt = flashckpt.Checkpointer(cfg["storage"], memory_dir=cfg["memory"], options=OPTS, **cfg["kw"])
for step, seed, *force in cfg["saves"]:
    ckpt.save(step, _state(seed), force=bool(force and force[0]))
ckpt.wait()
os._exit(0)  # a crash: no close, the memory tier stays
"""


def _crashed_run(
    storage: Path, memory: Path, saves: list[tuple[int, ...]], *, skew_ns: int = 0, **kw: Any
) -> None:
    """A training process that saves ``(step, content seed[, force])`` and dies (no close)."""
    import json
    import subprocess
    import sys

    cfg = {"storage": str(storage), "memory": str(memory), "saves": saves, "skew_ns": skew_ns, "kw": kw}
    root = Path(__file__).resolve().parents[1]
    out = subprocess.run(
        [sys.executable, "-c", _CHILD, json.dumps(cfg)], cwd=root, capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0, out.stderr


@pytest.fixture(autouse=True)
def _no_hooks() -> Any:
    yield
    hooks.clear()


# -- C1: the memory tier describes memory ---------------------------------------------------------


def test_restoring_from_a_compressed_tier_then_closing_keeps_every_tier_intact(dirs: dict[str, Path]) -> None:
    """C1: a restore from a zstd tier left a memory manifest with the storage tier's codec and
    stored sizes; close() then re-persisted a prefix of every chunk and committed it over the
    newest good step, on storage and on local."""
    with _ckpt(dirs, local_dir=dirs["local"], compression="zstd") as ckpt:
        for step in (1, 2):
            ckpt.save(step, _state(step))
    shutil.rmtree(dirs["local"])  # a new node: its disk lacks the step
    state = _state(9)
    with _ckpt(dirs, local_dir=dirs["local"], compression="zstd") as ckpt:
        assert ckpt.restore(state) == 2
        assert _equal(state, _state(2))
        # what the memory tier says of the restored step describes the slot's bytes
        (name,) = [p for p in ckpt.memory_path.iterdir() if p.name.endswith(".manifest")]
        m = decode_manifest(name.read_bytes())
        assert {(c.codec, c.stored_nbytes == c.nbytes, c.at == c.offset) for c in m.chunks} == {
            ("raw/1", True, True)
        }
        assert len(m.chunks) >= 8
    # close() persisted the restored step to the local tier: every tier verifies, bitwise
    assert _load_eq(dirs["storage"], 2) and _load_eq(dirs["storage"], 1)
    assert _load_eq(dirs["local"], 2)
    # and a restore from memory after a restore from storage (the slot holds decoded bytes)
    with _ckpt(dirs, compression="zstd") as ckpt:
        assert ckpt.restore(state) == 2
        ckpt.save(3, _state(3))
        assert ckpt.restore(state) == 3 and _equal(state, _state(3))
        assert ckpt.stats["restored"]["tier"] == "memory"
    assert _load_eq(dirs["storage"], 3)


def test_a_memory_manifest_that_lies_about_its_slot_is_never_persisted(dirs: dict[str, Path]) -> None:
    """One validator of memory manifests, used wherever they are read: a sealed manifest whose
    chunks claim a codec and stored sizes the slot does not hold was taken at its word by the
    salvage after a restore, which persisted a prefix of each chunk and committed it."""
    import json

    from flashckpt.cli import main as cli
    from flashckpt.format import encode_record

    # step 0 persisted, 1 and 2 in memory only (sealed); then a crash
    _crashed_run(dirs["storage"], dirs["memory"], [(0, 0), (1, 1), (2, 2)], persist_every=100)
    path = dirs["memory"] / "r00000-of-00001" / memory_manifest_key(1)
    raw = path.read_bytes()
    body = json.loads(raw[: raw.rindex(b"\n#xxh3_128:")])
    for c in body["chunks"]:  # what a restore from a zstd tier used to leave behind (C1)
        c[4], c[5] = max(1, c[3] // 4), "zstd/1"
    path.write_bytes(encode_record(body))
    state = _state(9)
    with _ckpt(dirs) as ckpt:
        assert ckpt.restore(state) == 2 and _equal(state, _state(2))
    # step 1 was not persisted from that manifest; what is committed verifies
    assert cli(["verify", str(dirs["storage"])]) == 0
    assert _load_eq(dirs["storage"], 2) and _load_eq(dirs["storage"], 0)


def test_a_memory_manifest_changed_after_it_was_read_is_validated_again(dirs: dict[str, Path]) -> None:
    """The memory tier keeps what a manifest's bytes decoded to, so that a restore does not
    decode each one twice; a record whose bytes changed since is decoded and validated again
    (here: refused, and the restore takes the storage tier's copy)."""
    import json

    from flashckpt.format import encode_record

    with _ckpt(dirs) as ckpt:
        ckpt.save(1, _state(1))
        ckpt.wait()
        state = _state(9)
        assert ckpt.restore(state) == 1 and ckpt.stats["restored"]["tier"] == "memory"
        path = dirs["memory"] / "r00000-of-00001" / memory_manifest_key(1)
        raw = path.read_bytes()
        body = json.loads(raw[: raw.rindex(b"\n#xxh3_128:")])
        for c in body["chunks"]:  # a lie about what the slot holds: the validator refuses it
            c[4], c[5] = max(1, c[3] // 4), "zstd/1"
        path.write_bytes(encode_record(body))
        state = _state(9)
        assert ckpt.restore(state) == 1 and ckpt.stats["restored"]["tier"] != "memory"
        assert _equal(state, _state(1))


# -- C2: one timeline ---------------------------------------------------------------------------


def test_a_rollback_makes_the_continued_run_the_newest(dirs: dict[str, Path]) -> None:
    """C2: after restore(step=S), "latest" picked the abandoned higher step numbers and
    retention kept them while it deleted the new steps and the rollback point."""
    with _ckpt(dirs, keep=3) as ckpt:
        for step in range(10):
            ckpt.save(step, _state(step))
    state = _state(0)
    alt = {s: _state(100 + s) for s in range(20)}  # the continued run's content
    with _ckpt(dirs, keep=3) as ckpt:
        assert ckpt.restore(state, step=7) == 7
        ckpt.save(8, alt[8])
        ckpt.wait()
    # a restart resumes the continued run, not the abandoned step 9
    with _ckpt(dirs, keep=3) as ckpt:
        assert ckpt.restore(state) == 8 and _equal(state, alt[8])
        for step in (9, 10):
            ckpt.save(step, alt[step])
        ckpt.wait()
        assert ckpt.latest_step() == 10
    got = _state(0)
    with _ckpt(dirs, keep=3) as ckpt:
        assert ckpt.restore(got) == 10 and _equal(got, alt[10])
    assert _equal(flashckpt.load(dirs["storage"], options=OPTS), alt[10])
    commits = sorted(p.name for p in (dirs["storage"] / "commits").iterdir())
    assert commits == [commit_key(s).split("/")[1] for s in (8, 9, 10)]


def test_a_rollback_far_below_the_newest_never_deletes_the_new_steps(dirs: dict[str, Path]) -> None:
    """The review's sequence: steps 100 and 200, restore(step=100), saves 101-103 on a new
    node.  Before: each save retired its predecessor and the restart resumed step 200."""
    with _ckpt(dirs, keep=2) as ckpt:
        ckpt.save(100, _state(100))
        ckpt.save(200, _state(200))
    shutil.rmtree(dirs["memory"], ignore_errors=True)
    with _ckpt(dirs, keep=2) as ckpt:
        assert ckpt.restore(_state(0), step=100) == 100
        for step in (101, 102, 103):
            ckpt.save(step, _state(step))
            ckpt.wait()
    shutil.rmtree(dirs["memory"], ignore_errors=True)  # a new node again
    got = _state(0)
    with _ckpt(dirs, keep=2) as ckpt:
        assert ckpt.restore(got) == 103 and _equal(got, _state(103))
        assert ckpt.restore(got, step=102) == 102 and _equal(got, _state(102))
    # the abandoned step 200 was retired with a warning; the kept steps are the run's newest
    assert sorted(p.name for p in (dirs["storage"] / "commits").iterdir()) == [
        "step-000000000102",
        "step-000000000103",
    ]


def test_an_abandoned_step_is_never_latest_but_can_be_asked_for(dirs: dict[str, Path]) -> None:
    """Until retention retires it, a step of the abandoned timeline is still there: "latest"
    never picks it (not even as a fallback past a corrupt newer step), an explicit restore
    does, and then its continuation is the newest."""
    with _ckpt(dirs, keep=None) as ckpt:
        for step in (5, 6, 7):
            ckpt.save(step, _state(step))
    with _ckpt(dirs, keep=None) as ckpt:
        assert ckpt.restore(_state(0), step=5) == 5
        ckpt.save(6, _state(106))  # the continued run; 7 (old) is abandoned
    got = _state(0)
    with _ckpt(dirs, keep=None) as ckpt:
        assert ckpt.restore(got) == 6 and _equal(got, _state(106))
        assert ckpt.restore(got, step=7) == 7 and _equal(got, _state(7))  # asked for
        ckpt.save(8, _state(8))  # continues the old timeline: now the newest
    with _ckpt(dirs, keep=None) as ckpt:
        assert ckpt.restore(got) == 8 and _equal(got, _state(8))


def test_a_fallback_after_two_branchings_stays_below_the_lowest_branch_step(dirs: dict[str, Path]) -> None:
    """Found by the lifecycle model: steps 0-2, a restore of 2 and step 3 (a generation that
    branched at 2), then a save of step 1 (a generation that continues from step 0).  The
    first run's steps 1 and 2 are above the lowest branch step: when the new step 1 is
    damaged, "latest" falls back to step 0, never to the abandoned step 2."""
    with _ckpt(dirs, keep=None) as ckpt:
        for step in (0, 1, 2):
            ckpt.save(step, _state(step))
    with _ckpt(dirs, keep=None) as ckpt:
        assert ckpt.restore(_state(9), step=2) == 2
        ckpt.save(3, _state(3))
        ckpt.save(1, _state(101))  # continues from step 0: the old 1, 2 and the 3 are left
        ckpt.wait()
    manifest = dirs["storage"] / "steps" / "000000000001" / "r00000-of-00001.manifest"
    raw = bytearray(manifest.read_bytes())
    raw[10] ^= 0xA5
    manifest.write_bytes(bytes(raw))
    shutil.rmtree(dirs["memory"], ignore_errors=True)  # a new node: storage only
    got = _state(9)
    with _ckpt(dirs, keep=None) as ckpt:
        assert ckpt.restore(got) == 0 and _equal(got, _state(0))


def test_saving_a_step_again_puts_the_newer_save_first_and_keeps_the_earlier_one(
    dirs: dict[str, Path],
) -> None:
    """A step saved twice (two callbacks at one step): after a crash the newer save, in memory
    only, is what "latest" resumes (K7); its record names the earlier save of the step as the
    point it continued from, so that save stays on the timeline (the fallback) instead of
    being counted as left behind."""
    from flashckpt.coordination.inventory import read_commits
    from flashckpt.coordination.retention import abandoned

    _crashed_run(dirs["storage"], dirs["memory"], [(1, 1, True), (1, 101)], persist_every=2, keep=None)
    got = _state(9)
    with _ckpt(dirs, keep=None, persist_every=2) as ckpt:
        assert ckpt.restore(got) == 1 and _equal(got, _state(101))  # the newer one, from memory
    with _ckpt(dirs, keep=None) as ckpt:
        ckpt.save(3, _state(3))
        ckpt.wait()
        first = read_commits(LocalBackend(dirs["storage"]), OPTS)[-1]
        ckpt.save(3, _state(103))
        ckpt.wait()
    second = read_commits(LocalBackend(dirs["storage"]), OPTS)[-1]
    assert second.step == 3 and second.order > first.order
    assert second.ancestors[0] == first.order
    assert not abandoned([(first.order, first.ancestors), (second.order, second.ancestors)])


def test_the_abandoned_rule() -> None:
    """The timeline rule of docs/format.md on hand-made ancestries."""
    from flashckpt.coordination.retention import abandoned

    g0, g1, g2 = 10, 20, 30
    # g0 saved 0..4; g1 restored (g0, 2) and saved 3, 4; g2 saved step 1 below it (from 0)
    snaps = [((g0, s), ()) for s in range(5)]
    snaps += [((g1, s), ((g0, 2),)) for s in (3, 4)]
    snaps += [((g2, 1), ((g1, 0), (g0, 2)))]
    assert abandoned(snaps) == {(g0, 1), (g0, 2), (g0, 3), (g0, 4), (g1, 3), (g1, 4)}
    # without g2, g1's timeline: g0 up to 2
    assert abandoned(snaps[:-1]) == {(g0, 3), (g0, 4)}
    # a step saved again: the earlier save stays
    assert abandoned([((g0, 5), ()), ((g1, 5), ((g0, 5),))]) == set()
    # no ancestry (a run that never restored): nothing is abandoned
    assert abandoned([((g0, 9), ()), ((g1, 1), ())]) == set()
    # ancestry cut short: generations older than every known one hold up to the lowest step
    assert abandoned([((g0, 3), ()), ((g0, 7), ()), ((g2, 6), ((g1, 5),))]) == {(g0, 7)}
    # a branch between the newest and its oldest known ancestor was left
    assert abandoned([((g0, 1), ()), ((g1, 2), ((g0, 1),)), ((g2, 2), ((g0, 1),))]) == {(g1, 2)}


def test_retention_keeps_the_restored_step_while_an_older_one_is_salvaged(dirs: dict[str, Path]) -> None:
    """A guard (it passed before the fixes too): retention never deletes the step just
    restored; with keep=1, restoring step 5 from memory while storage lacks it salvages it,
    and nothing older deletes it.  (The reproduction is the rollback test above.)"""
    # even steps persisted, odd ones in memory only; then a crash
    _crashed_run(dirs["storage"], dirs["memory"], [(s, s) for s in range(6)], keep=1, persist_every=2)
    state = _state(9)
    with _ckpt(dirs, keep=1) as ckpt:
        assert ckpt.restore(state) == 5 and _equal(state, _state(5))
        ckpt.wait()
    assert _load_eq(dirs["storage"], 5)


def test_close_after_restoring_an_older_step_never_retires_it(dirs: dict[str, Path]) -> None:
    """Found by the lifecycle model (30-minute run of 2026-12-01): memory held steps 1 and 2
    of a crashed run, the local disk neither; restore(step=1) copied step 1 to the local
    tier, then close persisted step 2 there too (a restore without a save leaves the newer
    steps alone) and local retention (keep=1) deleted step 1, the step the run continues
    from.  The restored step is kept while snapshots taken before the restore are committed."""
    _crashed_run(dirs["storage"], dirs["memory"], [(0, 0), (1, 1), (2, 2)], keep=None)
    with _ckpt(dirs, local_dir=dirs["local"], keep=1) as ckpt:
        state = _blank(1)
        assert ckpt.restore(state, step=1) == 1
        assert _equal(state, _state(1))
    local = sorted(p.name for p in (dirs["local"] / "commits").iterdir())
    assert "step-000000000001" in local, f"close retired the restored step from the local tier: {local}"
    assert _load_eq(dirs["local"], 1)


def test_restoring_a_step_the_run_had_left_never_retires_it(dirs: dict[str, Path]) -> None:
    """Found by the lifecycle model (30-minute run of 2026-12-01): step 5, held in memory
    only, was left behind when the run saved step 2 (a new timeline from step 1).  Then
    ``restore(step=5)``: the run continues from 5, which was persisted (only memory held it)
    and at once retired by retention as a step of the timeline the run had left (the switch
    back is recorded only by the next save), and close released the memory copy: the step
    the run continues from was gone everywhere.  A protected step (just restored, or just
    committed) is never retired, whichever timeline its record is on."""
    with _ckpt(dirs, keep=3, persist_every=2) as ckpt:
        ckpt.save(4, _state(4))  # persisted
        ckpt.save(5, _state(5))  # memory only
        ckpt.save(2, _state(2))  # below 5: a new timeline from step 1; step 4 is left behind
        ckpt.wait()
        state = _blank(5)
        assert ckpt.restore(state, step=5) == 5  # from memory
        assert _equal(state, _state(5))
        ckpt.wait()
    storage = sorted(int(p.name.split("-")[1]) for p in (dirs["storage"] / "commits").iterdir())
    assert 5 in storage, f"the restored step was retired: {storage}"
    assert _load_eq(dirs["storage"], 5)


def test_a_restored_step_off_the_timeline_is_kept_besides_the_newest_steps(dirs: dict[str, Path]) -> None:
    """The protected step of the test above is kept in addition to the newest ``keep`` steps
    of the timeline, never in place of one: counted among them, it made retention delete
    step 2, which step 5 itself continues from (CI's lifecycle sequences, the first version
    of that fix)."""
    with _ckpt(dirs, keep=2, persist_every=2) as ckpt:
        for s in (0, 2, 4):
            ckpt.save(s, _state(s))  # persisted
        ckpt.save(5, _state(5))  # memory only
        ckpt.save(3, _state(3), force=True)  # below 5: a new timeline from step 2; 4 is left
        ckpt.wait()
        state = _blank(5)
        assert ckpt.restore(state, step=5) == 5  # from memory; persisted, protected
        ckpt.wait()
    storage = sorted(int(p.name.split("-")[1]) for p in (dirs["storage"] / "commits").iterdir())
    assert storage == [2, 3, 5], storage
    assert all(_load_eq(dirs["storage"], s) for s in storage)


def test_a_restore_of_a_missing_step_leaves_the_timeline_as_it_was(dirs: dict[str, Path]) -> None:
    """``restore(step=N)`` for a step that is not there raises and writes nothing: the run goes
    on from where it was.  A save below the last one then branches off that run (the steps
    above are left behind), instead of starting a timeline of its own with no past, which made
    retention delete the step it continued from and keep the ones it left (lifecycle model,
    30-minute run of 2026-12-01)."""
    from flashckpt.errors import CheckpointNotFound

    with _ckpt(dirs, keep=2, persist_every=3) as ckpt:
        for s in range(6):
            ckpt.save(s, _state(s))  # 0 and 3 persisted
        ckpt.wait()
        with pytest.raises(CheckpointNotFound):
            ckpt.restore(_blank(9), step=9)
        ckpt.save(1, _state(101), force=True)  # below 5: a new timeline from step 0
        ckpt.wait()
    assert sorted(int(p.name.split("-")[1]) for p in (dirs["storage"] / "commits").iterdir()) == [0, 1]
    (dirs["storage"] / commit_key(1)).unlink()  # the newest step lost: fall back along the timeline
    got = _blank(0)
    with _ckpt(dirs, keep=2) as ckpt:
        assert ckpt.restore(got) == 0
    assert _equal(got, _state(0))


def test_saving_a_lower_step_without_restore_continues_from_there(dirs: dict[str, Path]) -> None:
    """A save below the last one (a loop restarted by hand) starts a new timeline too."""
    with _ckpt(dirs, keep=None) as ckpt:
        for step in (5, 6, 7):
            ckpt.save(step, _state(step))
        ckpt.save(3, _state(103))
        ckpt.wait()
        assert ckpt.latest_step() == 3
    got = _state(0)
    with _ckpt(dirs, keep=None) as ckpt:
        assert ckpt.restore(got) == 3 and _equal(got, _state(103))


# -- H1: background threads never die silently ----------------------------------------------------


def test_foreign_files_in_the_storage_tree_are_skipped_never_deleted(dirs: dict[str, Path]) -> None:
    """H1: an NFS silly-rename under chunks/ killed the persist thread (check_key raised in
    the chunk GC); the next saves hung forever.  Foreign names are neither flashckpt's nor
    deleted."""
    with _ckpt(dirs, keep=1) as ckpt:
        ckpt.save(0, _state(0))
        ckpt.wait()
        foreign = [
            dirs["storage"] / "chunks" / "db" / ".nfs000000000123abcd00000001",
            dirs["storage"] / "chunks" / ".DS_Store",
            dirs["storage"] / "chunks" / "ab" / "file copy 1",
            dirs["storage"] / "commits" / "README",
            dirs["storage"] / "steps" / "000000000000" / "notes.txt",
        ]
        for f in foreign:
            f.parent.mkdir(parents=True, exist_ok=True)
            f.write_bytes(b"not flashckpt's")
        for step in range(1, 5):
            h = ckpt.save(step, _state(step))
            assert h is not None
            h.wait(timeout=60)
        assert parts(ckpt).persister.alive
    assert all(f.read_bytes() == b"not flashckpt's" for f in foreign)
    assert _load_eq(dirs["storage"], 4)


def test_a_persist_thread_that_died_fails_save_wait_and_close_fast(dirs: dict[str, Path]) -> None:
    """H1: if the persist thread is gone anyway, nothing waits for it forever."""

    def die(**_: Any) -> None:
        raise SystemExit("the persist thread ends here")

    ckpt = _ckpt(dirs)
    hooks.on("persist.next", die)
    h = ckpt.save(0, _state(0))
    assert h is not None
    t0 = time.monotonic()
    with pytest.raises(SystemExit):
        h.wait(timeout=30)  # failed, not pending
    with pytest.raises(flashckpt.FlashCkptError, match="persist thread"):
        ckpt.save(1, _state(1))
    with pytest.raises(flashckpt.FlashCkptError, match="persist thread"):
        ckpt.wait(timeout=30)
    with pytest.raises(flashckpt.FlashCkptError, match="persist thread"):
        ckpt.close()
    assert time.monotonic() - t0 < 20
    assert not any(s.busy for s in parts(ckpt).stager.slots)


def test_a_failing_retention_is_reported_and_the_thread_goes_on(
    dirs: dict[str, Path], caplog: pytest.LogCaptureFixture
) -> None:
    """H1: any exception in retention (not only a FlashCkptError) is reported on the save's
    handle, in ``stats`` and the log; later saves still run."""
    calls = {"n": 0}

    def boom(**_: Any) -> None:
        calls["n"] += 1
        if calls["n"] == 1:
            raise OverflowError("a hostile record")

    hooks.on("retention.delete", boom)
    with _ckpt(dirs, keep=1) as ckpt:
        for step in range(3):
            h = ckpt.save(step, _state(step))
            assert h is not None
            h.wait(timeout=60)
            ckpt.wait()
            if step == 1:
                assert any("retention" in e and "OverflowError" in e for e in ckpt.stats["errors"])
                assert h.warnings and not h.failures
    assert any("retention" in r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING)
    assert _load_eq(dirs["storage"], 2)


# -- H2: a failed save gives its slot back ---------------------------------------------------------


def test_a_state_the_format_cannot_hold_is_refused_before_a_slot_is_taken(dirs: dict[str, Path]) -> None:
    """H2: a 5000-digit int passed the state walk and failed after the slot was taken; the
    third such save hung."""
    with _ckpt(dirs) as ckpt:
        for _ in range(3):
            with pytest.raises(flashckpt.UnsupportedStateError, match=r"extra\.seed"):
                ckpt.save(0, {**_state(0), "extra": {"seed": 10**5000}})
        for step in range(3):
            h = ckpt.save(step, _state(step))
            assert h is not None
            h.wait(timeout=60)


def test_any_failure_after_the_slot_is_taken_gives_it_back(dirs: dict[str, Path]) -> None:
    """H2: an exception between taking a slot and handing the job over (here a
    KeyboardInterrupt right after the copy) releases the slot and forgets its snapshot."""

    def interrupt(**_: Any) -> None:
        raise KeyboardInterrupt

    with _ckpt(dirs) as ckpt:
        off = hooks.on("stage.done", interrupt)
        for step in range(3):
            with pytest.raises(KeyboardInterrupt):
                ckpt.save(step, _state(step))
        off()
        assert not any(s.busy for s in parts(ckpt).stager.slots)
        assert not list(ckpt.memory_path.glob("*.manifest"))  # nothing half-saved survives
        for step in range(3):
            h = ckpt.save(step, _state(step))
            assert h is not None
            h.wait(timeout=60)
    assert _load_eq(dirs["storage"], 2)


def test_a_save_never_waits_for_a_slot_nobody_will_give_back(dirs: dict[str, Path]) -> None:
    """Both slots busy and nothing running that could free one (no persist job, no
    prefault): a leak, which a save must report at once instead of waiting forever.  (Planted,
    a slot kept by a save that raised was caught only by a test timing out.)"""
    with _ckpt(dirs) as ckpt:
        h = ckpt.save(0, _state(0))
        assert h is not None
        h.wait(timeout=60)
        parts(ckpt).stager.join_prefault()
        for s in parts(ckpt).stager.slots:  # what a leak leaves: busy, and no job holds them
            assert not s.busy
            s.busy = True
        try:
            with pytest.raises(flashckpt.FlashCkptError, match="no staging slot will be given back"):
                ckpt.save(1, _state(1))  # (before: it waited forever)
        finally:
            for s in parts(ckpt).stager.slots:
                s.busy = False


def test_a_persisted_save_gives_its_slot_back(dirs: dict[str, Path]) -> None:
    """Once a save's handle is done its slot is free, on every path a job ends by: committed,
    memory only, failed on a tier.  (Planted, a slot never released was caught only by a test
    timing out on the third save.)"""
    with _ckpt(dirs, persist_every=2, local_dir=dirs["storage"].parent / "local") as ckpt:
        for step in range(3):  # persisted, memory only, persisted
            h = ckpt.save(step, _state(step))
            assert h is not None
            h.wait(timeout=60)
            ckpt.wait(timeout=60)
            held = [s.name for s in parts(ckpt).stager.slots if s.busy]
            assert not held, f"after step {step}: {held} still held"
        shutil.rmtree(dirs["storage"].parent / "local")
        (dirs["storage"].parent / "local").write_text("a file where the local tier's directory was")
        h = ckpt.save(4, _state(4))
        assert h is not None
        with pytest.raises(flashckpt.FlashCkptError):
            h.wait(timeout=60)
        try:
            ckpt.wait(timeout=60)  # every job ended (raises the tier's failure again)
        except flashckpt.FlashCkptError:
            pass
        assert not [s.name for s in parts(ckpt).stager.slots if s.busy], "a failed save kept its slot"
        ckpt.close(_raise=False)


# -- M4: a memory tier belongs to one run -----------------------------------------------------------


def test_a_memory_tier_of_another_storage_is_never_restored_nor_deleted(
    tmp_path: Path, shm_dir: Path
) -> None:
    """M4 (b): two jobs configured with one memory_dir resumed each other's state (and the
    second one's clean close would have deleted the first one's memory-only step)."""
    a, b = tmp_path / "a", tmp_path / "b"
    _crashed_run(a, shm_dir, [(0, 0), (777, 777)], persist_every=10)  # job A: 777 in memory only
    state = _state(1)
    # job B refuses the memory tier: using it would overwrite job A's only copy of step 777
    with pytest.raises(flashckpt.ConfigError, match="another job"):
        flashckpt.Checkpointer(b, memory_dir=shm_dir, options=OPTS)
    # job A still finds its snapshot
    with flashckpt.Checkpointer(a, memory_dir=shm_dir, options=OPTS) as ckpt:
        assert ckpt.restore(state) == 777 and _equal(state, _state(777))


def test_a_wiped_storage_tier_does_not_disown_the_memory_tier(dirs: dict[str, Path]) -> None:
    """M4 (a), intended (a guard: the run record must not break it): the memory tier of a lost
    job comes back after the storage tier is gone, and the run continues (and its run record
    is written again)."""
    _crashed_run(dirs["storage"], dirs["memory"], [(0, 0), (5, 5)], persist_every=10)
    shutil.rmtree(dirs["storage"])
    state = _state(0)
    with _ckpt(dirs) as ckpt:
        assert ckpt.restore(state) == 5 and _equal(state, _state(5))
    assert _load_eq(dirs["storage"], 5)


def test_a_memory_tier_of_another_run_on_the_same_storage_is_never_restored(
    dirs: dict[str, Path], tmp_path: Path
) -> None:
    """M4: run A left a memory snapshot and a skewed clock (its generation is ahead); the
    storage tier was wiped and run B committed there since.  The run record tells them
    apart: B never resumes A's state."""
    other_memory = tmp_path / "other-memory"
    # run A's node has a clock far ahead; 500 lives in its memory only
    _crashed_run(dirs["storage"], dirs["memory"], [(0, 0), (500, 500)], skew_ns=10**15, persist_every=10)
    shutil.rmtree(dirs["storage"])
    with flashckpt.Checkpointer(dirs["storage"], memory_dir=other_memory, options=OPTS) as ckpt:
        assert ckpt.restore(_state(0)) is None  # run B: a fresh start, on another node
        ckpt.save(10, _state(10))
    shutil.rmtree(other_memory, ignore_errors=True)
    state = _state(0)
    with _ckpt(dirs) as ckpt:  # run B, restarted on run A's node
        assert ckpt.restore(state) == 10 and _equal(state, _state(10))


# -- M7: a refused restore leaves the state untouched ---------------------------------------------


class _Net(torch.nn.Module):
    def __init__(self, layers: int) -> None:
        super().__init__()
        self.body = torch.nn.Sequential(*[torch.nn.Linear(512, 512) for _ in range(layers)])


def test_a_restore_refused_by_load_state_dict_writes_nothing(dirs: dict[str, Path]) -> None:
    """M7: the model gained a layer; restore raised StateMismatchError after the memory-tier
    fill had already overwritten every matching tensor."""
    torch.manual_seed(0)
    with _ckpt(dirs) as ckpt:
        ckpt.save(0, {"model": _Net(2)})
    new = _Net(3)
    before = {k: v.clone() for k, v in new.state_dict().items()}
    for tier_memory in (True, False):
        with _ckpt(dirs) as ckpt:
            if tier_memory:  # restore from memory first: the fused fill is the risky path
                ckpt.save(1, {"model": _Net(2)})
                ckpt.wait()
            with pytest.raises(flashckpt.StateMismatchError, match="missing keys"):
                ckpt.restore({"model": new})
        after = new.state_dict()
        assert all(torch.equal(before[k], after[k]) for k in before)


def test_a_changed_shape_in_a_module_is_refused_before_any_write(dirs: dict[str, Path]) -> None:
    """M7: restoring from memory fills every matching tensor while it checksums; a module
    that then refused the step (a changed shape) left the others overwritten."""
    torch.manual_seed(0)
    model = torch.nn.Linear(512, 256)
    w = torch.zeros(3 * MiB // 4)
    before = model.weight.clone()
    with _ckpt(dirs) as ckpt:
        ckpt.save(0, {"model": torch.nn.Linear(512, 512), "w": torch.ones(3 * MiB // 4)})
        ckpt.wait()
        with pytest.raises(flashckpt.StateMismatchError, match="size mismatch"):
            ckpt.restore({"model": model, "w": w})  # from memory: the fused fill path
    assert torch.equal(model.weight, before) and not w.any()


def test_a_replaced_tensor_is_logged(dirs: dict[str, Path], caplog: pytest.LogCaptureFixture) -> None:
    with _ckpt(dirs) as ckpt:
        ckpt.save(0, {"w": torch.ones(4), "v": torch.ones(2)})
    w = torch.zeros(2)
    state: dict[str, Any] = {"w": w, "v": torch.zeros(2)}
    caplog.set_level(logging.WARNING, logger="flashckpt")
    with _ckpt(dirs) as ckpt:
        assert ckpt.restore(state) == 0
    assert state["w"] is not w and torch.equal(state["w"], torch.ones(4))
    assert any("replaced" in r.getMessage() and "w" in r.getMessage() for r in caplog.records)


# -- M8: steps beyond the format's range -----------------------------------------------------------


def test_a_step_beyond_the_format_is_refused_at_save_and_restore(dirs: dict[str, Path]) -> None:
    with _ckpt(dirs) as ckpt:
        with pytest.raises(flashckpt.ConfigError, match="step"):
            ckpt.save(10**12, _state(0))
        with pytest.raises(flashckpt.ConfigError, match="step"):
            ckpt.restore(_state(0), step=10**12)
        ckpt.save(10**12 - 1, _state(1))
        state = _state(0)
        assert ckpt.restore(state) == 10**12 - 1 and _equal(state, _state(1))


# -- L1, L7: what a Checkpointer takes, it gives back ---------------------------------------------


def test_a_failed_constructor_releases_the_lock(dirs: dict[str, Path]) -> None:
    """L1: an exception after the lock was taken left it held: the same process was refused
    ever after ("in use by another live process")."""
    rank_dir = dirs["memory"] / "r00000-of-00001"
    rank_dir.mkdir(parents=True, mode=0o700)
    (rank_dir / "slot-0.bin").mkdir()  # not a slot file: the constructor fails after the lock
    for _ in range(2):
        with pytest.raises((flashckpt.FlashCkptError, OSError)):
            _ckpt(dirs)
        assert not [t.name for t in threading.enumerate() if t.name.startswith("flashckpt-persist")]
    (rank_dir / "slot-0.bin").rmdir()
    with _ckpt(dirs) as ckpt:
        ckpt.save(0, _state(0))


def test_the_lock_file_is_never_shared_by_two_holders(
    dirs: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    """L7: close() unlinks the lock file while it holds it.  A Checkpointer B that opened the
    file just before got the lock of the unlinked file after A released it, and a third, C,
    then locked a new file: two live Checkpointers on one memory tier."""
    import fcntl

    a = _ckpt(dirs)
    a.save(0, _state(0))
    a.wait()
    lock = a.memory_path / "lock"
    real_flock = fcntl.flock
    raced = threading.Event()

    def flock(fd: int, op: int) -> None:  # B: A closes between B's open and B's flock
        if not raced.is_set() and op & fcntl.LOCK_EX and os.fstat(fd).st_ino == os.stat(lock).st_ino:
            raced.set()
            a.close()  # unlinks the file B opened, then releases it
        real_flock(fd, op)

    monkeypatch.setattr(fcntl, "flock", flock)
    with _ckpt(dirs) as b:
        assert raced.is_set()
        monkeypatch.setattr(fcntl, "flock", real_flock)
        with pytest.raises(flashckpt.ConfigError, match="in use"):
            _ckpt(dirs)  # C: refused, B really holds the lock at the path
        b.save(1, _state(1))


def test_a_backend_opened_by_the_checkpointer_is_closed(dirs: dict[str, Path]) -> None:
    """L5: close() closes the backends it opened (not one passed in)."""
    closed: list[str] = []

    class Recording(LocalBackend):
        def close(self) -> None:
            closed.append(self.url)

    mine = Recording(dirs["local"])
    with _ckpt(dirs, local_dir=mine) as ckpt:
        ckpt.save(0, _state(0))
        storage = parts(ckpt).tiers[-1].backend
        storage_close = storage.close
        storage.close = lambda: (closed.append("storage"), storage_close())  # type: ignore[method-assign]
    assert closed == ["storage"]


# -- H5: a failed deduplicated save -------------------------------------------------------------


def _dedup_worker(rank: int, init: str, storage: str, memory: str, out: str) -> None:
    """Two ranks holding the same state, deduplicated saves.  On rank 0 the first chunk write
    of step 1 is slow (it reads the slot 1.5 s late) and the second fails at once."""
    import json
    from datetime import timedelta

    from flashckpt.backends import Fault, FaultPlan, FaultyBackend
    from flashckpt.errors import StorageFullError

    torch.distributed.init_process_group(
        "gloo", init_method=init, rank=rank, world_size=2, timeout=timedelta(seconds=60)
    )
    be: Any = LocalBackend(storage)
    if rank == 0:
        plan = FaultPlan(
            [
                Fault(op="put", key_contains="chunks/", after=0, times=1, error=None, delay_s=1.5),
                Fault(op="put", key_contains="chunks/", after=0, times=1, error=StorageFullError),
            ]
        )
        be = FaultyBackend(be, plan)
    opts = flashckpt.Options(chunk_bytes=MiB, dedup_replicated=True, coord_timeout_s=60.0, retries=1)
    ckpt = flashckpt.Checkpointer(be, memory_dir=f"{memory}/rank{rank}", options=opts, keep=None)
    state = _state(1)  # the same on both ranks, and unchanged between steps
    took = {}
    for step in (1, 2, 3, 4):
        t0 = time.monotonic()
        h = ckpt.save(step, state)
        assert h is not None
        try:
            h.wait(timeout=120)
        except flashckpt.FlashCkptError:
            pass
        took[step] = (time.monotonic() - t0, sorted({f.tier for f in h.failures}))
    ckpt.close(_raise=False)
    Path(f"{out}/rank{rank}.json").write_text(json.dumps(took))
    torch.distributed.destroy_process_group()
    os._exit(0)  # skip finalization: torch's gloo teardown race (pytorch/pytorch#179291)


@pytest.mark.subprocess
def test_a_failed_deduplicated_save_waits_for_its_writes_and_tells_the_other_ranks(
    tmp_path: Path, shm_dir: Path
) -> None:
    """H5: a failed owned chunk made rank 0 release its slot while another of its writes still
    read it (a later save's bytes then landed under the old chunk's content address), and it
    never published its chunk entries: rank 1 waited out the whole coordination timeout."""
    import json

    import torch.multiprocessing as mp

    storage = tmp_path / "storage"
    args = (f"file://{tmp_path / 'rdzv'}", str(storage), str(shm_dir), str(tmp_path))
    mp.start_processes(_dedup_worker, args=args, nprocs=2, join=True, start_method="spawn")
    took = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    # step 1 failed on the storage tier of both ranks, and rank 1 learned it at once
    assert took[0]["1"][1] == ["storage"] and took[1]["1"][1] == ["storage"]
    assert took[1]["1"][0] < 30, took
    # the later steps are committed, and every chunk of every committed step is intact
    for step in (2, 3, 4):
        assert took[0][str(step)][1] == [] and took[1][str(step)][1] == []
        for rank in (0, 1):
            got = flashckpt.load(storage, step=step, rank=rank, options=OPTS)
            assert _equal(got, _state(1))
    from flashckpt.cli import main as cli

    assert cli(["verify", str(storage)]) == 0


# -- a chunk written again at another compression level ---------------------------------------------


def test_bytes_saved_again_at_another_compression_level_never_break_older_steps(
    dirs: dict[str, Path],
) -> None:
    """Found by the lifecycle model (K6): a chunk's content address named its codec but not its
    encoding; the same bytes saved later at another zstd level (another frame, of another
    length) replaced the object an older committed step reads with its own recorded length."""
    with _ckpt(dirs, compression="zstd:1", keep=None) as ckpt:
        ckpt.save(0, _state(0))
        ckpt.save(1, _state(1))  # the newest commit holds none of step 0's chunks
    with _ckpt(dirs, compression="zstd:19", keep=None) as ckpt:
        assert ckpt.restore(_state(9)) == 1
        ckpt.save(2, {**_state(0), "step": 2})  # step 0's tensors again, at level 19
    assert _load_eq(dirs["storage"], 0) and _load_eq(dirs["storage"], 1)
    got = flashckpt.load(dirs["storage"], step=2, options=OPTS)
    assert _equal(got, {**_state(0), "step": 2})


# -- found by the crash campaign ------------------------------------------------------------------


def test_a_commit_whose_chunks_are_gone_is_refused(tmp_path: Path, shm_dir: Path) -> None:
    """The committer of a shared tier checks that every chunk every manifest references is
    there: a chunk the GC deleted while a rank wrote it again (a restarted run replays its
    steps, rewriting what a killed attempt left unreferenced) fails the commit instead of
    committing a step that does not load."""
    from flashckpt._config import Options
    from flashckpt.coordination.worker import Persister
    from flashckpt.errors import CorruptCheckpointError
    from flashckpt.format import commit_key
    from flashckpt.staging.memory_tier import MemoryTier
    from flashckpt.staging.stager import Stager
    from flashckpt.transfer.tier import Tier

    storage = tmp_path / "storage"
    with _ckpt({"storage": storage, "memory": shm_dir}, keep=None) as ckpt:
        ckpt.save(3, _state(3))
    victim = next((storage / "chunks").rglob("*.raw-1"))
    (storage / commit_key(3)).unlink()  # uncommitted again: the shards and chunks are there
    victim.unlink()  # ... but the GC deleted one of them meanwhile
    opts = Options()
    stager = Stager(shm_dir / "p", opts)
    persister = Persister(opts, MemoryTier(shm_dir / "p", stager.slots), stager, None)
    try:
        tier = Tier("storage", LocalBackend(storage), shared=True)
        with pytest.raises(CorruptCheckpointError, match="gone"):
            persister.commits.commit_shared(tier, 3, 1)
        assert not (storage / commit_key(3)).exists()
    finally:
        persister.close()
        stager.close(unlink=True)


def test_a_manifest_its_commit_record_does_not_name_is_never_loaded(dirs: dict[str, Path]) -> None:
    """A commit record names the size and checksum of every shard's manifest.  A manifest that
    decodes and names the right step, shard and generation but is not the one committed (the
    step saved again, and an object store answering with the older version, or a copy put
    back from a backup) is refused, never loaded: its chunks, content addressed, are still
    there, so it would load, bitwise intact, the save the commit replaced."""
    from flashckpt.errors import CheckpointNotFound, CorruptCheckpointError
    from flashckpt.format import manifest_key

    key = dirs["storage"] / manifest_key(3, 0, 1)
    with _ckpt(dirs, keep=None) as ckpt:
        ckpt.save(3, _state(3))
        ckpt.wait()
        older = key.read_bytes()
        ckpt.save(3, _state(103))  # the same step again, in the same generation
        ckpt.wait()
    assert _equal(flashckpt.load(dirs["storage"], step=3, options=OPTS), _state(103))
    key.write_bytes(older)  # decodes, and its chunks are all there
    assert decode_manifest(older, "older").step == 3
    with pytest.raises(CheckpointNotFound, match="no intact committed step") as info:
        flashckpt.load(dirs["storage"], step=3, options=OPTS)
    cause = info.value.__cause__
    assert isinstance(cause, CorruptCheckpointError) and "does not match its commit record" in str(cause)
    got = _blank(3)
    with _ckpt(dirs, keep=None) as ckpt:
        assert ckpt.restore(got) is None  # step 3 is the only step, and it does not load
    assert got["step"] == -1


def test_an_object_larger_than_any_record_is_refused_by_its_size_unread(dirs: dict[str, Path]) -> None:
    """A commit record of more than ``MAX_RECORD_BYTES`` (a planted or damaged object) is
    refused from its size alone: not a byte of it is read (reading it whole would cost that
    much memory on every rank, for a record that cannot be valid), the step is skipped, and
    the object is left where it is."""
    from flashckpt.backends import Fault, FaultPlan, FaultyBackend
    from flashckpt.errors import StorageError
    from flashckpt.format import MAX_RECORD_BYTES

    with _ckpt(dirs, keep=None) as ckpt:
        ckpt.save(3, _state(3))
    huge = dirs["storage"] / commit_key(5)
    with open(huge, "wb") as f:
        f.truncate(MAX_RECORD_BYTES + 1)  # sparse: no disk
    plan = FaultPlan([Fault(op="get", key_contains=commit_key(5), times=None, error=StorageError)])
    storage = FaultyBackend(LocalBackend(dirs["storage"]), plan)
    got = _blank(3)
    with flashckpt.Checkpointer(storage, memory_dir=dirs["memory"], options=OPTS, keep=None) as ckpt:
        assert ckpt.restore(got) == 3
    assert _equal(got, _state(3))
    assert plan.fired == 0, "a byte of the oversized record was read"
    assert huge.stat().st_size == MAX_RECORD_BYTES + 1


def test_temporary_manifests_a_killed_writer_left_in_memory_are_swept(dirs: dict[str, Path]) -> None:
    """A process killed while it wrote a memory manifest leaves its temporary file; the next
    one (holding the lock) removes it, and a clean close leaves nothing behind."""
    rank_dir = dirs["memory"] / "r00000-of-00001"
    rank_dir.mkdir(parents=True, mode=0o700)
    leftover = rank_dir / "step-000000000006.manifest.tmp-vm-8080-236"
    leftover.write_bytes(b"{half a manifest")
    with _ckpt(dirs) as ckpt:
        assert not leftover.exists()
        ckpt.save(0, _state(0))
    assert not dirs["memory"].exists() or not any(dirs["memory"].rglob("*"))


def _close_worker(rank: int, phase: int, init: str, tmp: str, out: str) -> None:
    import json
    from datetime import timedelta

    torch.distributed.init_process_group(
        "gloo", init_method=f"{init}{phase}", rank=rank, world_size=2, timeout=timedelta(seconds=60)
    )
    opts = flashckpt.Options(chunk_bytes=MiB, coord_timeout_s=20.0)
    ckpt = flashckpt.Checkpointer(f"{tmp}/storage", memory_dir=f"{tmp}/m{rank}", options=opts, keep=None)
    if phase == 0:
        for step in range(3):
            ckpt.save(step, _state(step))
        ckpt.wait()
        torch.distributed.barrier()
        os._exit(0)  # a crash: the memory tiers stay
    got = ckpt.restore(_state(9))
    t0 = time.monotonic()
    error = None
    try:
        ckpt.close()
    except flashckpt.FlashCkptError as exc:
        error = repr(exc)
    Path(f"{out}/close{rank}.json").write_text(json.dumps([got, time.monotonic() - t0, error]))
    torch.distributed.destroy_process_group()
    os._exit(0)  # skip finalization: torch's gloo teardown race (pytorch/pytorch#179291)


@pytest.mark.subprocess
def test_close_after_a_restore_starts_no_commit_only_some_ranks_make(tmp_path: Path) -> None:
    """Found by the crash campaign: whether the restored step still had to be persisted at
    close depended on what each rank held.  With rank 1's shard of step 2 on storage and rank
    0's not (the commit never happened), the restore's salvage has rank 0 write its shard and
    commit; rank 1 then took its restored step for "not persisted" and started a storage
    commit alone at close, waiting the coordination timeout for the others."""
    import json

    import torch.multiprocessing as mp

    from flashckpt.format import commit_key, manifest_key

    init, tmp = f"file://{tmp_path / 'rdzv'}", str(tmp_path)
    mp.start_processes(_close_worker, args=(0, init, tmp, tmp), nprocs=2, start_method="spawn")
    (tmp_path / "storage" / commit_key(2)).unlink()
    (tmp_path / "storage" / manifest_key(2, 0, 2)).unlink()
    mp.start_processes(_close_worker, args=(1, init, tmp, tmp), nprocs=2, start_method="spawn")
    for rank in (0, 1):
        got, took, error = json.loads((tmp_path / f"close{rank}.json").read_text())
        assert got == 2 and error is None and took < 10, (rank, got, took, error)
    for rank in (0, 1):  # the salvage committed step 2
        assert _equal(flashckpt.load(tmp_path / "storage", step=2, rank=rank, options=OPTS), _state(2))


# -- a failed read leaves no reader behind ---------------------------------------------------------


def _two_chunk_keys(storage: Path, step: int) -> list[str]:
    """The chunk keys of ``step``'s shard on ``storage``, in shard order."""
    from flashckpt.format import manifest_key

    m = decode_manifest((storage / manifest_key(step, 0, 1)).read_bytes())
    return [c.key for c in sorted(m.chunks, key=lambda c: c.offset)]


def test_a_failed_chunk_read_returns_only_when_every_read_it_started_is_done(tmp_path: Path) -> None:
    """Found by the lifecycle model in CI: a restore from storage whose first chunk failed
    returned while another chunk's read was still in flight into the slot; the next save
    staged into that slot and the late read overwrote part of the new snapshot (which then
    verified: it was checksummed after).  Here the reads of ``fetch_chunks`` directly."""
    from concurrent.futures import ThreadPoolExecutor

    from flashckpt.backends.faults import Fault, FaultPlan, FaultyBackend
    from flashckpt.coordination.inventory import read_committed_manifest
    from flashckpt.transfer.reader import fetch_chunks

    storage = tmp_path / "storage"
    with flashckpt.Checkpointer(storage, memory_dir=tmp_path / "mem", options=OPTS) as ckpt:
        ckpt.save(0, _state(0))
    keys = _two_chunk_keys(storage, 0)
    plan = FaultPlan(
        [
            Fault(op="get", key_contains=keys[0], times=None, error=None, truncate_to=10),  # fails at once
            Fault(op="get", key_contains=keys[1], times=None, error=None, delay_s=0.5),  # still reading
        ]
    )
    be = FaultyBackend(LocalBackend(storage), plan)
    m = read_committed_manifest(be, 0, 0, 1, OPTS)
    buf = bytearray(m.total_bytes)
    with ThreadPoolExecutor(4) as pool:
        with pytest.raises(flashckpt.CorruptCheckpointError, match="truncated"):
            fetch_chunks(be, m, lambda off, n: memoryview(buf)[off : off + n], pool, OPTS)
        seen = bytes(buf)
        time.sleep(1.0)
        assert bytes(buf) == seen, "a chunk read went on writing after fetch_chunks raised"


def test_a_failed_memory_verify_returns_only_when_every_copy_it_started_is_done() -> None:
    """``verify_chunks`` copies out while it checksums (``fills``): when one chunk fails, no
    copy into the destination may still be running once it raises (the caller gives the
    destination back: a user's tensor, a slot about to be reused)."""
    from concurrent.futures import ThreadPoolExecutor

    from flashckpt.format import ChunkEntry
    from flashckpt.transfer.reader import verify_chunks

    n = 1 << 16
    src = bytearray(os.urandom(4 * n))
    dst = bytearray(4 * n)
    src_t = torch.frombuffer(src, dtype=torch.uint8)
    dst_t = torch.frombuffer(dst, dtype=torch.uint8)

    def view(at: int, nbytes: int) -> memoryview:
        if at >= 2 * n:  # the later chunks are slow to read
            time.sleep(0.5)
        return memoryview(src)[at : at + nbytes]

    from flashckpt.format import checksum

    chunks = [
        ChunkEntry(
            key="slot-0.bin",
            offset=i * n,
            nbytes=n,
            codec="raw/1",
            stored_nbytes=n,
            at=i * n,
            checksum=("0" * 32 if i == 0 else checksum(memoryview(src)[i * n : (i + 1) * n])),
        )
        for i in range(4)
    ]

    class _M:  # the two things verify_chunks asks of a manifest
        def __init__(self, cs: list[ChunkEntry]) -> None:
            self.chunks = cs

        def with_chunks(self, cs: list[ChunkEntry]) -> _M:
            return _M(cs)

    with ThreadPoolExecutor(4) as pool:
        with pytest.raises(flashckpt.CorruptCheckpointError, match="fails its checksum"):
            verify_chunks(
                _M(chunks),  # type: ignore[arg-type]
                view,
                pool,
                "test",
                base=src_t.data_ptr(),
                fills=[(0, 4 * n, dst_t.data_ptr())],
            )
        seen = bytes(dst)
        time.sleep(1.0)
        assert bytes(dst) == seen, "a copy went on writing after verify_chunks raised"


def test_a_save_after_a_failed_restore_holds_its_own_bytes(tmp_path: Path, shm_dir: Path) -> None:
    """The user's path of the defect above: the only committed step has a damaged chunk, so
    restore() starts from scratch; the save right after must come back bitwise."""
    from flashckpt.backends.faults import Fault, FaultPlan, FaultyBackend

    storage = tmp_path / "storage"
    with flashckpt.Checkpointer(storage, memory_dir=tmp_path / "mem0", options=OPTS) as ckpt:
        ckpt.save(0, _state(0))
    keys = _two_chunk_keys(storage, 0)
    plan = FaultPlan(
        [
            Fault(op="get", key_contains=keys[0], times=None, error=None, truncate_to=10),
            *[Fault(op="get", key_contains=k, times=None, error=None, delay_s=0.6) for k in keys[1:]],
        ]
    )
    be = FaultyBackend(LocalBackend(storage), plan)
    ckpt = flashckpt.Checkpointer(be, memory_dir=shm_dir, persist_every=100, options=OPTS)
    try:
        assert ckpt.restore(_blank(1)) is None  # nothing intact: a fresh start
        h = ckpt.save(1, _state(1), force=False)
        assert h is not None
        h.wait(timeout=60)
        time.sleep(1.5)  # any read still in flight has landed by now
        state = _blank(1)
        assert ckpt.restore(state) == 1
        assert _equal(state, _state(1)), "the save after a failed restore holds other bytes"
    finally:
        ckpt.close()


def test_restoring_older_steps_never_overwrites_the_newest_snapshot_living_in_memory_only(
    dirs: dict[str, Path],
) -> None:
    """Found by the 15-minute lifecycle run on the restructured engine (also on the engine
    before it): the newest save lived in memory only (``persist_every``), and two restores of
    older steps from storage each needed a slot.  The first took the other slot and made it
    the newest staged one, so the second took the slot of the newest save: it was gone from
    memory, its only copy, and close had nothing to persist.  A restore now never takes the
    slot of the newest snapshot while memory is its only copy."""
    with _ckpt(dirs, persist_every=3, keep=None) as ckpt:
        for step in range(5):  # 0 and 3 persisted; 4 (the newest) in memory only
            h = ckpt.save(step, _state(step))
            assert h is not None
            h.wait(timeout=60)
        ckpt.wait(timeout=60)
        for older in (0, 3):
            target = _state(99)
            assert ckpt.restore(target, step=older) == older
            assert _equal(target, _state(older))
        assert 4 in [s.step for s in parts(ckpt).stager.slots], "the newest snapshot left memory"
    # close persisted the newest snapshot (what a restart resumes): nothing was lost
    with _ckpt(dirs) as ckpt:
        target = _state(99)
        assert ckpt.restore(target) == 4
        assert _equal(target, _state(4))
