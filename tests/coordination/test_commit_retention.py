"""The coordination part on its own: the commit protocol of two ranks and retention, on an
in-memory store (fsspec ``memory://``) and an in-process c10d store, without a Checkpointer
or a process group."""

from __future__ import annotations

import threading
import uuid
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest
import torch
from torch.distributed import HashStore

from flashckpt import Options
from flashckpt._dist import Control
from flashckpt.backends import FsspecBackend
from flashckpt.coordination.commit import CommitProtocol
from flashckpt.coordination.inventory import read_commits, read_committed_manifest
from flashckpt.coordination.retention import abandoned, apply_retention
from flashckpt.errors import CoordinationError, CorruptCheckpointError, WaitTimeout
from flashckpt.format import (
    CODEC_RAW,
    ChunkEntry,
    Manifest,
    TensorEntry,
    checksum,
    chunk_key,
    encode_tree,
    now,
)
from flashckpt.storage import Backend
from flashckpt.transfer.tier import Tier

OPTS = Options(retries=1, backoff_s=0.001, coord_timeout_s=0.3)


@pytest.fixture
def store_tier() -> Tier:
    return Tier("storage", FsspecBackend(f"memory://flashckpt-{uuid.uuid4().hex[:8]}/root"), shared=True)


def shard(be: Backend, step: int, rank: int, world: int, gen: int = 1, ancestors: Any = ()) -> Manifest:
    """Shard ``rank`` of ``step`` with one chunk of its own, the chunk put on ``be``."""
    data = f"step {step} rank {rank} generation {gen}".encode().ljust(64, b".")
    digest = checksum(data)
    key = chunk_key(digest, CODEC_RAW)
    be.put(key, data)
    return Manifest(
        step,
        rank,
        world,
        "node",
        now(),
        len(data),
        (TensorEntry(torch.uint8, (len(data),), 0, len(data)),),
        (ChunkEntry(key, 0, 0, len(data), len(data), CODEC_RAW, digest),),
        encode_tree({"t": _ref()}),
        generation=gen,
        run="00112233aabbccdd",
        ancestors=ancestors,
    )


def _ref() -> Any:
    from flashckpt.format import TensorRef

    return TensorRef(0)


def control(store: Any, rank: int, world: int) -> Control:
    return Control.on_store(store, rank, world, OPTS.coord_timeout_s)


def test_a_tier_of_its_own_is_committed_by_its_rank_right_after_the_manifest(store_tier: Tier) -> None:
    own = Tier("local", store_tier.backend)  # not shared: this rank's own
    with ThreadPoolExecutor(2) as pool:
        commits = CommitProtocol(OPTS, Control(None, 1.0), pool)
        m = shard(own.backend, 5, 0, 1)
        entry = commits.write_manifest(own, m)
        assert read_commits(own.backend, OPTS) == []  # a manifest alone is not a commit
        commits.commit_own(own, m, entry)
    [record] = read_commits(own.backend, OPTS)
    assert (record.step, record.generation) == (5, 1)
    assert read_committed_manifest(own.backend, 5, 0, 1, OPTS).chunks == m.chunks


def test_the_last_rank_commits_every_shard_of_one_save_and_nothing_else(store_tier: Tier) -> None:
    be = store_tier.backend
    store = HashStore()
    with ThreadPoolExecutor(2) as pool:
        ranks = [CommitProtocol(OPTS, control(store, r, 2), pool) for r in range(2)]
        shards = [shard(be, 7, r, 2) for r in range(2)]
        for r in range(2):
            ranks[r].write_manifest(store_tier, shards[r])
            ranks[r].commit_own(store_tier, shards[r], ("unused", 0, ""))  # shared tier: a no-op
        assert read_commits(be, OPTS) == []
        ranks[1].commit_shared(store_tier, 7, 2, shards[1].order)
    [record] = read_commits(be, OPTS)
    assert [m[0] for m in record.manifests] == [
        "steps/000000000007/r00000-of-00002.manifest",
        "steps/000000000007/r00001-of-00002.manifest",
    ]
    for r in range(2):
        assert read_committed_manifest(be, 7, r, 2, OPTS).chunks == shards[r].chunks


def test_shards_of_two_saves_or_with_a_missing_chunk_are_never_committed(store_tier: Tier) -> None:
    be = store_tier.backend
    with ThreadPoolExecutor(2) as pool:
        commits = CommitProtocol(OPTS, control(HashStore(), 1, 2), pool)
        commits.write_manifest(store_tier, shard(be, 8, 0, 2, gen=1))
        commits.write_manifest(store_tier, shard(be, 8, 1, 2, gen=2))  # a later save's shard
        with pytest.raises(CorruptCheckpointError, match="different saves"):
            commits.commit_shared(store_tier, 8, 2)
        late = shard(be, 9, 0, 2)
        commits.write_manifest(store_tier, late)
        commits.write_manifest(store_tier, shard(be, 9, 1, 2))
        be.delete(late.chunks[0].key)  # the chunk GC took it meanwhile
        with pytest.raises(CorruptCheckpointError, match="gone from the storage tier"):
            commits.commit_shared(store_tier, 9, 2)
    assert read_commits(be, OPTS) == []


def test_a_rank_that_gave_up_waiting_writes_nothing_until_the_commit_resolves(store_tier: Tier) -> None:
    store = HashStore()
    with ThreadPoolExecutor(2) as pool:
        waiting = CommitProtocol(OPTS, control(store, 1, 2), pool)
        committer = CommitProtocol(OPTS, control(store, 0, 2), pool)
        m = shard(store_tier.backend, 3, 1, 2)
        key = waiting.key(store_tier, 3, "save1")
        assert key is not None
        with pytest.raises(WaitTimeout):
            waiting.await_outcome(key, m)  # the committer is slow (or dead)
        with pytest.raises(CoordinationError, match="still waiting"):
            waiting.check_stalled(store_tier)  # the next save skips the shared tier at once
        committer.publish(key, "ok")  # it caught up
        waiting.check_stalled(store_tier)  # resolved: the tier is written again
        waiting.check_stalled(store_tier)


def test_an_outcome_that_is_not_ok_fails_the_waiting_rank(store_tier: Tier) -> None:
    store = HashStore()
    with ThreadPoolExecutor(1) as pool:
        waiting = CommitProtocol(OPTS, control(store, 1, 2), pool)
        key = waiting.key(store_tier, 4, "save2")
        assert key is not None
        threading.Timer(0.05, lambda: control(store, 0, 2).publish(key, "rank 0 failed: boom")).start()
        with pytest.raises(CoordinationError, match="boom"):
            waiting.await_outcome(key, shard(store_tier.backend, 4, 1, 2))
        waiting.check_stalled(store_tier)  # an outcome, even a failure, is no stall


def commit_steps(tier: Tier, steps: list[tuple[int, int]], ancestors: Any = ()) -> None:
    with ThreadPoolExecutor(1) as pool:
        own = Tier("local", tier.backend)
        commits = CommitProtocol(OPTS, Control(None, 1.0), pool)
        for gen, step in steps:
            m = shard(own.backend, step, 0, 1, gen=gen, ancestors=ancestors if gen > 1 else ())
            commits.commit_own(own, m, commits.write_manifest(own, m))


def test_retention_keeps_the_newest_and_the_protected_and_deletes_what_only_the_others_held(
    store_tier: Tier,
) -> None:
    be = store_tier.backend
    commit_steps(store_tier, [(1, s) for s in range(1, 6)])
    be.put("steps/notes.txt", b"mine")  # a user's file in the key space: never touched
    be.put("chunks/ab/not-a-chunk", b"mine")
    removed = apply_retention(be, 2, OPTS, protect=[2])
    assert sorted(removed) == [1, 3]
    assert [r.step for r in read_commits(be, OPTS)] == [2, 4, 5]
    for s in (2, 4, 5):
        read_committed_manifest(be, s, 0, 1, OPTS)  # intact, chunks included
    chunks = set(be.list("chunks/"))
    assert chunks == {c.key for s in (2, 4, 5) for c in read_committed_manifest(be, s, 0, 1, OPTS).chunks} | {
        "chunks/ab/not-a-chunk"
    }
    assert be.get("steps/notes.txt") == b"mine"


def test_a_rollback_retires_the_steps_the_run_left_once_it_has_passed_them(store_tier: Tier) -> None:
    be = store_tier.backend
    commit_steps(store_tier, [(1, s) for s in range(1, 6)])
    # restored step 2 of generation 1 and went on: steps 3, 4 of generation 2 (their commit
    # records replace those of generation 1's steps 3 and 4: one record per step number)
    commit_steps(store_tier, [(2, 3), (2, 4)], ancestors=((1, 2),))
    snaps = [(r.order, r.ancestors) for r in read_commits(be, OPTS)]
    assert [o for o, _ in snaps] == [(1, 1), (1, 2), (1, 5), (2, 3), (2, 4)]
    assert abandoned(snaps) == {(1, 5)}  # newer by number, older on the timeline
    apply_retention(be, 3, OPTS)
    assert [r.order for r in read_commits(be, OPTS)] == [(1, 2), (2, 3), (2, 4)]
