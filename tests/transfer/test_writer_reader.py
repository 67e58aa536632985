"""The transfer part on its own: the chunk writer and the reader against a real POSIX tier
wrapped in ``FaultyBackend``, a slot filled by the stager, and no Checkpointer."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch

from flashckpt import Options
from flashckpt.backends import Fault, FaultPlan, FaultyBackend, LocalBackend
from flashckpt.errors import CorruptCheckpointError, StorageFullError
from flashckpt.format import (
    CODEC_RAW,
    MAX_RECORD_BYTES,
    ChunkEntry,
    Manifest,
    TensorEntry,
    chunk_key,
    now,
)
from flashckpt.staging.stager import Slot, Stager
from flashckpt.transfer.codec import Compression
from flashckpt.transfer.reader import fetch_chunks, read_record, verify_chunks
from flashckpt.transfer.tier import Tier
from flashckpt.transfer.writer import ChunkWriter

OPTS = Options(prefault=False, chunk_bytes=1 << 20, retries=2, backoff_s=0.001, io_threads=2, hash_threads=2)


class Staged:
    """A state staged in a slot by the stager, with its unsealed manifest."""

    def __init__(self, directory: Path, seed: int = 0) -> None:
        g = torch.Generator().manual_seed(seed)
        self.tensors = [torch.randn(1_500_000, generator=g), torch.randn(3, 5, generator=g), torch.arange(10)]
        directory.mkdir(mode=0o700, exist_ok=True)
        self.stager = Stager(directory, OPTS)
        layout = self.stager.layout(self.tensors)
        self.slot, _ = self.stager.acquire(layout.total_bytes)
        self.stager.stage(self.slot, self.tensors, layout)
        entries = tuple(
            TensorEntry(t.dtype, tuple(t.shape), off, n)
            for t, off, n in zip(self.tensors, layout.offsets, layout.nbytes, strict=True)
        )
        chunks = tuple(ChunkEntry(self.slot.name, o, o, n, n, CODEC_RAW, "") for o, n in layout.chunks)
        self.manifest = Manifest(
            0, 0, 1, "node", now(), layout.total_bytes, entries, chunks, {}, generation=1
        )

    def close(self) -> None:
        self.stager.release(self.slot)
        self.stager.close(unlink=True)


@pytest.fixture
def staged(shm_dir: Path) -> Iterator[Staged]:
    s = Staged(shm_dir)
    yield s
    s.close()


@pytest.fixture
def pools() -> Iterator[tuple[ThreadPoolExecutor, ThreadPoolExecutor]]:
    io, hashing = ThreadPoolExecutor(2), ThreadPoolExecutor(2)
    yield io, hashing
    io.shutdown(wait=True)
    hashing.shutdown(wait=True)


def counting(root: Path, *faults: Fault, delay_s: float = 0.0) -> tuple[FaultyBackend, FaultPlan]:
    """A POSIX tier whose puts are counted (the last rule matches every put, injects nothing
    but ``delay_s``)."""
    plan = FaultPlan([*faults, Fault(op="put", times=None, error=None, delay_s=delay_s)])
    return FaultyBackend(LocalBackend(root, fsync=False), plan), plan


def puts(plan: FaultPlan) -> int:
    return plan.seen.get(len(plan.faults) - 1, 0)


@pytest.mark.parametrize("compression", [Compression(None), Compression(1)], ids=["raw", "zstd"])
def test_a_shard_written_unsealed_reads_back_bitwise(
    staged: Staged,
    pools: tuple[ThreadPoolExecutor, ThreadPoolExecutor],
    tmp_path: Path,
    compression: Compression,
) -> None:
    be, plan = counting(tmp_path / "tier")
    tier = Tier("local", be, compression)
    seen: list[Manifest] = []
    out, written = ChunkWriter(OPTS, *pools).write_unsealed(
        tier, staged.manifest, staged.slot, {}, seen.append
    )
    assert len(seen) == 1 and seen[0].sealed  # every checksum known, once
    assert [c.checksum for c in out.chunks] == [c.checksum for c in seen[0].chunks]
    assert puts(plan) == len(out.chunks) and written == sum(c.stored_nbytes for c in out.chunks)
    if compression.level is not None:
        assert written < staged.manifest.total_bytes  # arange and small tensors compress
    back = bytearray(out.total_bytes)
    fetch_chunks(be, out, lambda o, n: memoryview(back)[o : o + n], pools[0], OPTS)
    assert bytes(back) == bytes(staged.slot.view(0, out.total_bytes))


def test_chunks_the_tier_holds_already_are_referenced_not_written(
    staged: Staged, pools: tuple[ThreadPoolExecutor, ThreadPoolExecutor], tmp_path: Path
) -> None:
    be, plan = counting(tmp_path / "tier")
    writer = ChunkWriter(OPTS, *pools)
    sealed = writer.hash(staged.manifest, staged.slot)
    first, _ = writer.write(Tier("local", be), sealed, staged.slot, {})
    n = puts(plan)
    known = {c.checksum: c for c in first.chunks}
    again, written = writer.write(Tier("local", be), sealed, staged.slot, known)
    assert written == 0 and puts(plan) == n
    assert [c.key for c in again.chunks] == [c.key for c in first.chunks]


def test_a_failed_tier_raises_and_no_write_reads_the_slot_afterwards(
    staged: Staged, pools: tuple[ThreadPoolExecutor, ThreadPoolExecutor], tmp_path: Path
) -> None:
    """The slot goes back to the stager once the writer raises: a straggling write would
    store the next snapshot's bytes under this chunk's content address."""
    full = Fault(op="put", key_contains="chunks/", error=StorageFullError)
    be, plan = counting(tmp_path / "tier", full, delay_s=0.1)  # the other writes queue up
    assert len(staged.manifest.chunks) > 4
    with pytest.raises(StorageFullError):
        ChunkWriter(OPTS, *pools).write_unsealed(
            Tier("local", be), staged.manifest, staged.slot, {}, lambda m: None
        )
    settled = dict(plan.seen)
    time.sleep(0.3)
    assert plan.seen == settled, "a chunk write went on after the writer had raised"


def test_damaged_bytes_are_never_stored_under_a_good_chunks_address(
    staged: Staged, pools: tuple[ThreadPoolExecutor, ThreadPoolExecutor], tmp_path: Path
) -> None:
    writer = ChunkWriter(OPTS, *pools)
    sealed = writer.hash(staged.manifest, staged.slot)
    c = sealed.chunks[0]
    staged.slot.view(c.offset, 1)[0] ^= 0xFF  # the memory copy rots after it was checksummed
    be, _ = counting(tmp_path / "tier")
    with pytest.raises(CorruptCheckpointError, match="fails its checksum"):
        writer.write(Tier("local", be), sealed, staged.slot, {}, verify=True)
    assert not LocalBackend(tmp_path / "tier").list(chunk_key(c.checksum, CODEC_RAW))


class _Peer:
    """An :class:`~flashckpt.transfer.writer.Exchange` where rank 1 owns the odd chunks and
    publishes the entries in ``theirs`` (None: it published nothing)."""

    def __init__(self, n: int, theirs: dict[int, ChunkEntry] | None) -> None:
        self.owners = [i % 2 for i in range(n)]
        self.rank = 0
        self.theirs = theirs
        self.published: list[Mapping[int, ChunkEntry]] = []

    def publish(self, mine: Mapping[int, ChunkEntry]) -> None:
        self.published.append(dict(mine))

    def entry(self, owner: int, i: int, src: ChunkEntry) -> ChunkEntry | None:
        got = (self.theirs or {}).get(i)
        return got if got is not None and got.checksum == src.checksum else None


def test_a_replicated_shard_is_split_between_ranks_and_falls_back_to_own_writes(
    staged: Staged, pools: tuple[ThreadPoolExecutor, ThreadPoolExecutor], tmp_path: Path
) -> None:
    writer = ChunkWriter(OPTS, *pools)
    sealed = writer.hash(staged.manifest, staged.slot)
    n = len(sealed.chunks)
    assert n >= 3
    reference, _ = writer.write(Tier("storage", LocalBackend(tmp_path / "ref")), sealed, staged.slot, {})
    theirs = {i: reference.chunks[i] for i in range(n) if i % 2}
    be, plan = counting(tmp_path / "tier")
    peer = _Peer(n, theirs)
    out, _ = writer.write(Tier("storage", be), sealed, staged.slot, {}, exchange=peer)
    assert puts(plan) == len([i for i in range(n) if i % 2 == 0])  # only the chunks it owns
    assert [c.key for c in out.chunks] == [c.key for c in reference.chunks]
    assert len(peer.published) == 1 and set(peer.published[0]) == {i for i in range(n) if i % 2 == 0}
    be2, plan2 = counting(tmp_path / "tier2")
    silent = _Peer(n, None)  # the owner never published: every chunk is written here
    writer.write(Tier("storage", be2), sealed, staged.slot, {}, exchange=silent)
    assert puts(plan2) == n


def test_a_truncated_or_flipped_chunk_is_refused_on_read(
    staged: Staged, pools: tuple[ThreadPoolExecutor, ThreadPoolExecutor], tmp_path: Path
) -> None:
    writer = ChunkWriter(OPTS, *pools)
    sealed = writer.hash(staged.manifest, staged.slot)
    local = LocalBackend(tmp_path / "tier", fsync=False)
    out, _ = writer.write(Tier("local", local), sealed, staged.slot, {})
    buf = bytearray(out.total_bytes)

    def dest(o: int, k: int) -> memoryview:
        return memoryview(buf)[o : o + k]

    short = FaultyBackend(local, FaultPlan([Fault(op="get", times=None, error=None, truncate_to=100)]))
    with pytest.raises(CorruptCheckpointError, match="truncated"):
        fetch_chunks(short, out, dest, pools[0], OPTS)
    path = local.path_of(out.chunks[-1].key)
    raw = bytearray(path.read_bytes())
    raw[len(raw) // 2] ^= 1
    path.write_bytes(bytes(raw))
    with pytest.raises(CorruptCheckpointError, match="fails its checksum"):
        fetch_chunks(local, out, dest, pools[0], OPTS)


def test_a_record_larger_than_any_record_is_refused_before_it_is_read(tmp_path: Path) -> None:
    be, plan = counting(tmp_path / "tier", Fault(op="get", times=None, error=None))
    be.put("commits/step-000000000001", b"x" * (MAX_RECORD_BYTES + 1))
    with pytest.raises(CorruptCheckpointError, match="larger than any record"):
        read_record(be, "commits/step-000000000001", "a record", OPTS)
    assert plan.seen.get(0, 0) == 0  # the size alone decided: nothing was read


def test_chunks_in_memory_are_verified_and_copied_out_in_one_pass(
    staged: Staged, pools: tuple[ThreadPoolExecutor, ThreadPoolExecutor]
) -> None:
    writer = ChunkWriter(OPTS, *pools)
    sealed = writer.hash(staged.manifest, staged.slot)
    first = sealed.tensors[0]
    target = torch.empty(first.nbytes, dtype=torch.uint8)
    fills = [(first.offset, first.offset + first.nbytes, target.data_ptr())]
    verify_chunks(sealed, staged.slot.view, pools[0], "memory", base=staged.slot.address, fills=fills)
    assert torch.equal(target.view(torch.float32), staged.tensors[0])
    staged.slot.view(sealed.chunks[0].offset, 1)[0] ^= 1
    with pytest.raises(CorruptCheckpointError):
        verify_chunks(sealed, staged.slot.view, pools[0], "memory")


def test_the_writer_holds_no_thread_of_its_own(staged: Staged, tmp_path: Path) -> None:
    """Its pools are the caller's: a writer leaves nothing running once they are shut down."""
    before = set(threading.enumerate())
    io, hashing = ThreadPoolExecutor(2), ThreadPoolExecutor(2)
    ChunkWriter(OPTS, io, hashing).write_unsealed(
        Tier("local", LocalBackend(tmp_path / "t", fsync=False)),
        staged.manifest,
        staged.slot,
        {},
        lambda m: None,
    )
    io.shutdown(wait=True)
    hashing.shutdown(wait=True)
    assert not [t for t in threading.enumerate() if t not in before and t.is_alive()]


_ = Slot  # (the slot type the writer reads from: filled by the stager above)
