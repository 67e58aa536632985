"""Replicated state staged once per node, split across its ranks (``coordination/nodesplit.py``).

Unit checks of the parts (the memory-manifest validator, the partial copy, the learning rule,
the safety of any mix of learned sets), then real two-rank jobs on one node (gloo,
``torch.multiprocessing``): the node holds one copy per slot, a snapshot whose chunks are
split between the ranks survives a SIGKILL of both and comes back bitwise, per-rank tensors
are never split, a part that is gone sends the restore to the older durable step, and a rank
whose persist thread is far behind still reads the other rank's part (pins).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import signal
import time
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.multiprocessing as mp
from hypothesis import given, settings
from hypothesis import strategies as st

import flashckpt
from flashckpt.coordination.nodesplit import NodeSplit, layout_key, manifest_key
from flashckpt.errors import CorruptCheckpointError
from flashckpt.format import (
    CODEC_RAW,
    ChunkEntry,
    Manifest,
    TensorEntry,
    check_memory_manifest,
    encode_manifest,
    memory_manifest,
    memory_manifest_key,
    part_holders,
    shard_name,
)
from flashckpt.staging.stager import copy_pairs, plan_layout
from flashckpt.staging.statewalk import flatten
from flashckpt.testing import parts

# -- the memory-manifest validator ---------------------------------------------------------------


def _manifest(
    rank: int, keys: list[str], *, world: int = 2, step: int = 5, sums: list[str] | None = None
) -> Manifest:
    n = 65536
    digests = [hashlib.md5(d.encode()).hexdigest() if d else "" for d in (sums or [""] * len(keys))]
    chunks = tuple(ChunkEntry(k, i * n, i * n, n, n, CODEC_RAW, digests[i]) for i, k in enumerate(keys))
    tensors = (TensorEntry(torch.float32, (len(keys) * n // 4,), 0, len(keys) * n),)
    tree = flatten({"w": torch.zeros(len(keys) * n // 4)}).tree
    return Manifest(
        step,
        rank,
        world,
        "n",
        0.0,
        len(keys) * n,
        tensors,
        chunks,
        tree,
        generation=1,
        run="0123456789abcdef",
    )


def test_a_memory_manifest_may_leave_chunks_to_other_ranks_of_its_job_only_where_parts_are_allowed() -> None:
    m = _manifest(0, ["slot-0.bin", "r00001-of-00002", "slot-0.bin"])
    assert check_memory_manifest(m, "x", parts=True) == "slot-0.bin"
    assert set(part_holders(m)) == {"r00001-of-00002"}
    with pytest.raises(CorruptCheckpointError, match="one slot file"):
        check_memory_manifest(m, "x")  # without parts: a snapshot held whole
    for bad in ("r00000-of-00002", "r00001-of-00003", "chunks/ab/cd", "slot-1.bin"):
        with pytest.raises(CorruptCheckpointError):
            check_memory_manifest(_manifest(0, ["slot-0.bin", bad]), "x", parts=True)
    # the memory tier keeps the holders; a copy said to be whole names the slot only
    assert [c.key for c in memory_manifest(m, "slot-1.bin", parts=True).chunks] == [
        "slot-1.bin",
        "r00001-of-00002",
        "slot-1.bin",
    ]
    assert {c.key for c in memory_manifest(m, "slot-1.bin").chunks} == {"slot-1.bin"}


# -- the partial copy ------------------------------------------------------------------------------


def test_the_copy_leaves_out_exactly_the_skipped_chunks_of_tensors_of_their_own() -> None:
    opts = flashckpt.Options(chunk_bytes=65536, small_tensor_bytes=65536)
    big = torch.arange(100_000, dtype=torch.float32)  # 400,000 bytes: 7 chunks, the last partial
    other = torch.arange(60_000, dtype=torch.float64)  # 480,000 bytes: 8 chunks
    small = torch.arange(10, dtype=torch.int64)
    strided = torch.arange(2 * 70_000, dtype=torch.float32).view(2, 70_000).t()  # not contiguous
    empty = torch.zeros(0)  # at offset 0, like the first big tensor
    tensors = [big, small, other, strided, empty]
    layout = plan_layout(tensors, opts)
    buf = torch.zeros(layout.total_bytes, dtype=torch.uint8)
    views = [
        buf[o : o + n].view(t.dtype).view(t.shape)
        for t, o, n in zip(tensors, layout.offsets, layout.nbytes, strict=True)
    ]
    in_big = [
        i for i, (o, n) in enumerate(layout.chunks) if layout.offsets[0] <= o < layout.offsets[0] + 400_000
    ]
    in_strided = [
        i for i, (o, _) in enumerate(layout.chunks) if layout.offsets[3] <= o < layout.offsets[3] + 560_000
    ]
    skip = {in_big[1], in_big[-1], in_strided[0]}
    for dst, src in copy_pairs(views, tensors, layout, skip):
        dst.copy_(src)
    assert torch.equal(views[1], small) and torch.equal(views[2], other)
    assert torch.equal(views[3], strided)  # cannot be sliced flat: copied whole
    skipped = [layout.chunks[i] for i in (in_big[1], in_big[-1])]
    for i, (o, n) in enumerate(layout.chunks):
        part = buf[o : o + n]
        if (o, n) in skipped:
            assert not part.any(), f"chunk {i} was copied"
    kept = torch.ones(100_000, dtype=torch.bool)
    for o, n in skipped:
        lo = (o - layout.offsets[0]) // 4
        kept[lo : lo + n // 4] = False
    assert torch.equal(views[0][kept], big[kept])


# -- what a rank learns ----------------------------------------------------------------------------


def _write_sibling(root: Path, m: Manifest) -> None:
    d = root / shard_name(m.rank, m.world_size)
    d.mkdir(mode=0o700, parents=True, exist_ok=True)
    path = d / memory_manifest_key(m.step)
    path.write_bytes(encode_manifest(m))
    path.chmod(0o600)


def _pair(
    root: Path, step: int, mine: list[str], theirs: list[str], their_keys: list[str] | None = None
) -> Manifest:
    keys = ["slot-0.bin"] * len(mine)
    _write_sibling(root, _manifest(1, their_keys or keys, step=step, sums=theirs))
    return _manifest(0, keys, step=step, sums=mine)


def test_a_chunk_is_learned_only_once_it_changed_the_same_way_on_every_rank(tmp_path: Path) -> None:
    split = NodeSplit(0, 2, ["n", "n"], tmp_path, 65536, True)
    # chunk 0: replicated and updated; 1: the same zeros on both, never changing (a per-rank
    # counter not yet touched); 2: differs once, then agrees; 3: changes, but differently
    split.learn(_pair(tmp_path, 1, ["a1", "z", "x1", "d1"], ["a1", "z", "y1", "e1"]))
    assert split._learned == {}  # nothing to compare with yet
    split.learn(_pair(tmp_path, 2, ["a2", "z", "x2", "d2"], ["a2", "z", "x2", "e2"]))
    (learned,) = split._learned.values()
    assert learned == {0}
    # chunk 2 has agreed twice while changing since, but it differed once: per-rank data
    # that happens to coincide for a while is never taken for replicated; chunk 1 never changed
    split.learn(_pair(tmp_path, 3, ["a3", "z", "x3", "d3"], ["a3", "z", "x3", "e3"]))
    split.learn(_pair(tmp_path, 4, ["a4", "z", "x4", "d4"], ["a4", "z", "x4", "e4"]))
    assert set(next(iter(split._learned.values()))) == {0}
    # a sibling that left a chunk to this rank is no evidence for it
    split2 = NodeSplit(0, 2, ["n", "n"], tmp_path / "b", 65536, True)
    mixed = ["slot-0.bin", "r00000-of-00002", "slot-0.bin", "slot-0.bin"]
    split2.learn(_pair(tmp_path / "b", 1, ["a1", "b1", "c", "d"], ["a1", "b1", "c", "d"], mixed))
    split2.learn(_pair(tmp_path / "b", 2, ["a2", "b2", "c", "d"], ["a2", "b2", "c", "d"], mixed))
    assert set(next(iter(split2._learned.values()))) == {0}
    # an unsealed or missing sibling teaches nothing
    split3 = NodeSplit(0, 2, ["n", "n"], tmp_path / "c", 65536, True)
    split3.learn(_manifest(0, ["slot-0.bin"] * 4, step=1, sums=["a", "b", "c", "d"]))
    assert split3._learned == {} and split3._agreed == {}


@settings(max_examples=200, deadline=None)
@given(
    sizes=st.lists(st.integers(1, 8), min_size=1, max_size=12),
    ranks=st.integers(2, 4),
    node_of=st.lists(st.integers(0, 1), min_size=4, max_size=4),
    learned=st.data(),
)
def test_whatever_each_rank_learned_every_chunk_left_to_another_rank_is_staged_by_it(
    sizes: list[int], ranks: int, node_of: list[int], learned: st.DataObject
) -> None:
    """Ranks of a node may have learned different sets (one restarted, one slower): every
    chunk a rank's save leaves to another (``NodeSplit.plan``) is one that rank's save of the
    same layout copies itself, and it is a rank of the same node."""
    opts = flashckpt.Options(chunk_bytes=65536, small_tensor_bytes=65536)
    layout = plan_layout([torch.zeros(n * 16384) for n in sizes], opts)  # n chunks of 64 KiB each
    nodes = [f"n{node_of[r]}" for r in range(ranks)]
    splits = [NodeSplit(r, ranks, nodes, Path("/nonexistent"), 65536, True) for r in range(ranks)]
    for sp in splits:
        sp._learned[layout_key(layout)] = frozenset(
            learned.draw(st.sets(st.integers(0, len(layout.chunks) - 1)))
        )
    plans = [sp.plan(layout) for sp in splits]
    for r in range(ranks):
        for i, holder in plans[r].items():
            owner = next(q for q in range(ranks) if shard_name(q, ranks) == holder)
            assert nodes[owner] == nodes[r] and owner != r
            assert i not in plans[owner], f"rank {r} leaves chunk {i} to rank {owner}, which leaves it too"


def test_the_learned_key_is_the_layout_a_save_stages() -> None:
    opts = flashckpt.Options(chunk_bytes=65536, small_tensor_bytes=65536)
    tensors = [torch.zeros(100_000), torch.zeros(3, dtype=torch.int64)]
    layout = plan_layout(tensors, opts)
    tensors_e = tuple(
        TensorEntry(t.dtype, tuple(t.shape), o, n)
        for t, o, n in zip(tensors, layout.offsets, layout.nbytes, strict=True)
    )
    m = Manifest(1, 0, 2, "n", 0.0, layout.total_bytes, tensors_e, (), flatten(tensors).tree, generation=1)
    assert layout_key(layout) == manifest_key(m)


# -- real two-rank jobs on one node ----------------------------------------------------------------

STEPS = 10
OPTS = {"dedup_replicated": True, "chunk_bytes": 65536, "small_tensor_bytes": 65536}


def _flat(obj: Any, path: str = "") -> dict[str, torch.Tensor]:
    if hasattr(obj, "state_dict") and not isinstance(obj, dict):
        return _flat(obj.state_dict(), path)
    if isinstance(obj, dict):
        out: dict[str, torch.Tensor] = {}
        for k, v in obj.items():
            out.update(_flat(v, f"{path}.{k}"))
        return out
    return {path: obj.clone()} if isinstance(obj, torch.Tensor) else {}


def _slot_bytes(memory: Path) -> int:
    return sum(p.stat().st_blocks * 512 for p in memory.rglob("slot-*.bin"))


def _state(rank: int) -> dict[str, Any]:
    """The crash campaign's state (a model, AdamW, per-rank buffers) and a 16 MiB replicated
    tensor, so that slot rounding does not hide what the node holds."""
    from tests.dist_worker import campaign_state

    state = campaign_state(rank)
    state["wide"] = torch.ones(4 << 20)
    return state


def _job(rank: int, world: int, init: str, storage: str, memory: str, out: str, phase: str) -> None:
    from tests.dist_worker import train_step

    torch.distributed.init_process_group(
        "gloo", init_method=init, rank=rank, world_size=world, timeout=timedelta(seconds=60)
    )
    res: dict[str, Any] = {}
    state = _state(rank)
    opts = flashckpt.Options(**OPTS)
    ckpt = flashckpt.Checkpointer(storage, memory_dir=memory, options=opts, persist_every=2, keep=1)
    if phase in ("save", "slow"):
        if phase == "slow" and rank == 1:  # its persist thread falls far behind rank 0's saves
            from flashckpt import _hooks as hooks

            hooks.on("persist.chunk", lambda **_: time.sleep(0.002))
        for step in range(STEPS):
            train_step(state, step, rank)
            state["wide"].mul_(0.5).add_(step)  # replicated, 16 MiB, updated every step
            ckpt.save(step, state)
            if step >= STEPS - 2:  # the steps a restore may come back to
                torch.save(_flat(state), f"{out}/want-{rank}-{step}.pt")
            if phase == "save":  # time between saves, as training takes: each job ends (and
                ckpt.wait()  # learns) before the next save, whatever the machine's load
                parts(ckpt).persister.join()
                torch.distributed.barrier()
        if phase == "slow":
            ckpt.wait()
            res["errors"] = ckpt.stats["errors"]
            ckpt.close()
        else:
            ckpt.wait()  # every step but the last one persisted, and sealed
            parts(ckpt).persister.join()  # each job's end too (a slot is trimmed last)
            res["slot_bytes"] = _slot_bytes(Path(memory))
            res["errors"] = ckpt.stats["errors"]
        torch.distributed.barrier()
        Path(f"{out}/{phase}-{rank}.json").write_text(json.dumps(res))
        torch.distributed.barrier()
        if phase == "save":
            os.kill(os.getpid(), signal.SIGKILL)  # both ranks: the node's memory stays
    else:
        step = ckpt.restore(state)
        got, want = _flat(state), torch.load(f"{out}/want-{rank}-{step}.pt")
        res = {"step": step, "differs": [k for k in want if not torch.equal(got[k], want[k])]}
        ckpt.close()
    Path(f"{out}/{phase}-{rank}.json").write_text(json.dumps(res))
    torch.distributed.destroy_process_group()
    os._exit(0)


def _run(tmp_path: Path, shm_dir: Path, phase: str, *, killed: bool = False) -> list[dict[str, Any]]:
    init = f"file://{tmp_path / ('rdv-' + phase)}"
    args = (2, init, str(tmp_path / "storage"), str(shm_dir), str(tmp_path), phase)
    try:
        mp.start_processes(_job, args=args, nprocs=2, join=True, start_method="spawn")
    except mp.ProcessExitedException:
        if not killed:
            raise
    return [json.loads((tmp_path / f"{phase}-{r}.json").read_text()) for r in range(2)]


def _state_bytes() -> int:
    return sum(t.numel() * t.element_size() for t in _flat(_state(0)).values())


@pytest.mark.distributed
@pytest.mark.subprocess
def test_a_node_stages_replicated_state_once_and_both_ranks_killed_resume_bitwise(
    tmp_path: Path, shm_dir: Path
) -> None:
    saved = _run(tmp_path, shm_dir, "save", killed=True)
    assert all(not s["errors"] for s in saved), saved
    # two slots per rank, but the node holds about one copy of the state per slot
    full = _state_bytes()
    assert saved[0]["slot_bytes"] < 2 * full * 1.35, (saved[0]["slot_bytes"], full)
    # the newest snapshot (memory only: persist_every=2) leaves chunks to the other rank
    from flashckpt.format import decode_manifest

    mems = sorted(p for p in shm_dir.rglob("r0000*-of-00002") if p.is_dir())
    assert len(mems) == 2, mems
    newest = [
        decode_manifest((d / memory_manifest_key(STEPS - 1)).read_bytes(), "m", allow_unsealed=True)
        for d in mems
    ]
    assert all(part_holders(m) for m in newest)
    restored = _run(tmp_path, shm_dir, "restore")
    assert [r["step"] for r in restored] == [STEPS - 1] * 2
    assert [r["differs"] for r in restored] == [[], []]
    assert not any(shm_dir.rglob("slot-*.bin"))  # the clean close after the restore: all durable


@pytest.mark.distributed
@pytest.mark.subprocess
def test_a_part_that_is_gone_sends_both_ranks_to_the_older_durable_step(
    tmp_path: Path, shm_dir: Path
) -> None:
    _run(tmp_path, shm_dir, "save", killed=True)
    holder = next(p for p in shm_dir.rglob("r00001-of-00002") if p.is_dir())
    (holder / memory_manifest_key(STEPS - 1)).unlink()  # rank 1's copy of the newest step
    restored = _run(tmp_path, shm_dir, "restore")
    # rank 0's newest snapshot needs rank 1's part: the newest step every rank can load is
    # the last durable one (persist_every=2), and it comes back bitwise
    assert [r["step"] for r in restored] == [STEPS - 2] * 2
    assert [r["differs"] for r in restored] == [[], []]


@pytest.mark.distributed
@pytest.mark.subprocess
def test_a_rank_far_behind_still_reads_the_part_of_every_step_it_persists(
    tmp_path: Path, shm_dir: Path
) -> None:
    done = _run(tmp_path, shm_dir, "slow")
    assert [d["errors"] for d in done] == [[], []]
    from flashckpt.catalog import Catalog

    cat = Catalog(str(tmp_path / "storage"))
    steps = [s.step for s in cat.steps()]
    assert steps and steps[-1] == STEPS - 1
    cat.verify(steps[-1])  # raises if a chunk of it is damaged or missing


# -- the pins that keep a part until it is read ----------------------------------------------------


def _tier(root: Path, rank: int) -> tuple[Any, Any]:
    from flashckpt._secure import private_dir
    from flashckpt.staging.memory_tier import MemoryTier, lock
    from flashckpt.staging.stager import Slot

    d = private_dir(root / shard_name(rank, 2), trusted_above=root.parent)
    slots = [Slot(d, 0, pin=False), Slot(d, 1, pin=False)]
    tier = MemoryTier(d, slots, parts=True)
    tier.lock_fd = lock(d, root.parent)  # a live process holds it
    return tier, slots


def test_a_rank_overwriting_its_slot_waits_for_the_other_rank_reading_its_part(tmp_path: Path) -> None:
    import threading

    from flashckpt.staging.memory_tier import PartsReader

    root = tmp_path / "mem"
    (a, a_slots), (b, b_slots) = _tier(root, 0), _tier(root, 1)
    data = bytes(range(256)) * 256  # one chunk of 64 KiB
    b_slots[0].ensure(len(data))
    b_slots[0].view(0, len(data))[:] = data
    b.record(b_slots[0], _manifest(1, ["slot-0.bin"], step=5))
    a_slots[0].ensure(len(data))
    mine = a.record(a_slots[0], _manifest(0, ["r00001-of-00002"], step=5))
    reader = PartsReader(mine, a_slots[0], root)  # pinned when handed to the persist thread
    done = threading.Event()

    def overwrite() -> None:
        b.reclaim(b_slots[0], timeout=30)
        b_slots[0].view(0, len(data))[:] = bytes(len(data))  # the next save's bytes
        done.set()

    t = threading.Thread(target=overwrite)
    t.start()
    time.sleep(0.3)
    assert not done.is_set(), "rank 1 overwrote a part rank 0 had pinned"
    with reader.open(wait_s=1):
        assert bytes(reader.view(0, len(data))) == data
    t.join(10)
    assert done.is_set() and b_slots[0].step is None
    # a reader arriving after the overwrite finds the part gone, never the new bytes
    with pytest.raises(CorruptCheckpointError):
        PartsReader(mine, a_slots[0], root).open(wait_s=0.2)
    for tier, slots in ((a, a_slots), (b, b_slots)):
        os.close(tier.lock_fd)
        for s in slots:
            s.release_mapping()


def test_a_part_whose_rank_is_dead_fails_at_once_instead_of_being_waited_for(tmp_path: Path) -> None:
    import os as _os

    from flashckpt.staging.memory_tier import PartsReader

    root = tmp_path / "mem"
    (a, a_slots), (b, _) = _tier(root, 0), _tier(root, 1)
    _os.close(b.lock_fd)  # rank 1's process is gone; its part of step 5 never came
    a_slots[0].ensure(65536)
    mine = a.record(a_slots[0], _manifest(0, ["r00001-of-00002"], step=5))
    t0 = time.monotonic()
    with pytest.raises(CorruptCheckpointError):
        PartsReader(mine, a_slots[0], root).open(wait_s=60)
    assert time.monotonic() - t0 < 10
    _os.close(a.lock_fd)
    a_slots[0].release_mapping()


def test_an_orphaned_directory_whose_snapshot_leaves_chunks_to_another_rank_is_served_whole(
    tmp_path: Path,
) -> None:
    """Ranks renumbered across nodes: rank 0's directory, left on this node, holds a snapshot
    whose second chunk rank 1 (also gone from here) staged.  The server claiming them sends
    rank 0's shard whole, its bytes read from both directories, each chunk as checksummed."""
    from flashckpt.format import checksum
    from flashckpt.replication.client import fetch
    from flashckpt.replication.server import MirrorServer

    root = tmp_path / "mem"
    root.mkdir(mode=0o700)
    n = 65536
    chunks = [bytes([i % 251]) * n for i in (1, 2)]
    sums = [checksum(c) for c in chunks]
    for rank, keys, data in (
        (0, ["slot-0.bin", "r00001-of-00002"], chunks[0] + bytes(n)),  # a hole where rank 1's part is
        (1, ["slot-0.bin", "slot-0.bin"], chunks[0] + chunks[1]),
    ):
        m = _manifest(rank, keys, step=7)
        m = m.with_chunks(dataclasses.replace(c, checksum=s) for c, s in zip(m.chunks, sums, strict=True))
        d = root / shard_name(rank, 2)
        d.mkdir(mode=0o700)
        for name, body in ((memory_manifest_key(7), encode_manifest(m)), ("slot-0.bin", data)):
            (d / name).write_bytes(body)
            (d / name).chmod(0o600)
    server = MirrorServer(root / "r00005-of-00002", b"s" * 32, flashckpt.Options(), "127.0.0.1")
    try:
        assert sorted(server.claim_orphans(root, 2)) == ["r00000-of-00002", "r00001-of-00002"]
        buf = bytearray(2 * n)
        got = fetch(
            ("127.0.0.1", server.port),
            b"s" * 32,
            "r00000-of-00002",
            7,
            lambda _m: lambda at, k: memoryview(buf)[at : at + k],
            flashckpt.Options(),
        )
        assert {c.key for c in got.chunks} == {"slot-0.bin"}  # whole: no other rank's key
        assert [c.checksum for c in got.chunks] == sums
        assert bytes(buf) == chunks[0] + chunks[1]
    finally:
        server.close()


# -- mirrors: one copy per node --------------------------------------------------------------------


def _split_pair(step: int = 7) -> tuple[list[Manifest], list[bytes]]:
    """Two ranks of a node whose snapshot of ``step`` is split: rank 0 holds the first
    chunk, rank 1 the second (each manifest names the other for the chunk it left)."""
    from flashckpt.format import checksum

    n = 65536
    chunks = [bytes([i % 251]) * n for i in (3, 4)]
    sums = [checksum(c) for c in chunks]
    out = []
    for rank, keys in ((0, ["slot-0.bin", "r00001-of-00002"]), (1, ["r00000-of-00002", "slot-0.bin"])):
        m = _manifest(rank, keys, step=step)
        out.append(
            m.with_chunks(dataclasses.replace(c, checksum=s) for c, s in zip(m.chunks, sums, strict=True))
        )
    return out, chunks


def test_a_mirror_receives_only_the_chunks_its_owner_holds_and_serves_the_others_on_request(
    tmp_path: Path,
) -> None:
    """Each rank pushes the chunks it holds; the copy keeps the node-mate's name for the
    rest (node memory and network: one copy per node).  A fetch gets the manifest and the
    carried chunks, or only those asked for; a chunk the copy does not hold is refused."""
    from flashckpt.replication.client import fetch, push
    from flashckpt.replication.server import MirrorServer
    from flashckpt.replication.wire import MirrorError

    (m0, m1), chunks = _split_pair()
    n = len(chunks[0])
    secret, opts = b"s" * 32, flashckpt.Options()
    root = tmp_path / "peer"
    root.mkdir(mode=0o700)
    server = MirrorServer(root / "r00000-of-00002", secret, opts, "127.0.0.1")
    addr = ("127.0.0.1", server.port)
    try:
        for m, own in ((m0, 0), (m1, 1)):
            data = bytes(2 * n)
            data = data[: own * n] + chunks[own] + data[(own + 1) * n :]
            sent = push(
                addr, secret, shard_name(m.rank, 2), m, lambda at, k, d=data: memoryview(d)[at : at + k], opts
            )
            assert sent == n  # only its own chunk crossed
        assert server.received_bytes == 2 * n
        snaps = server.snapshots()
        assert [s[5] for s in snaps["r00000-of-00002"]] == [["r00001-of-00002"]]
        assert [s[5] for s in snaps["r00001-of-00002"]] == [["r00000-of-00002"]]
        # the copy of rank 0: its chunk, and the name of the copy holding the other
        buf = bytearray(2 * n)
        into = lambda _m: lambda at, k: memoryview(buf)[at : at + k]  # noqa: E731
        got = fetch(addr, secret, "r00000-of-00002", 7, into, opts)
        assert part_holders(got) == {"r00001-of-00002": [got.chunks[1]]}
        assert bytes(buf) == chunks[0] + bytes(n)
        # the part rank 1's copy holds, asked for alone
        fetch(addr, secret, "r00001-of-00002", 7, into, opts, want=[(n, n)])
        assert bytes(buf) == chunks[0] + chunks[1]
        for want in ([(0, n)], [(n, n - 1)]):  # not a chunk that copy holds
            with pytest.raises(MirrorError, match="has no step"):
                fetch(addr, secret, "r00001-of-00002", 7, into, opts, want=want)
    finally:
        server.close()


def test_a_copy_is_a_restore_source_only_while_the_copies_holding_its_parts_are_held() -> None:
    """The restore plan: a copy that leaves chunks to node-mates' copies counts for a rank
    only if a copy of each of those, of the same snapshot and run, is held somewhere."""
    from types import SimpleNamespace

    from flashckpt.coordination.plan import _Job

    ctx = SimpleNamespace(world=2, timeline=SimpleNamespace(ours=lambda storage, run, what: run == "r"))

    def row(step: int, holders: list[str], run: str = "r") -> list[Any]:
        return [1, step, "s", run, [], holders]

    held_by_2 = {
        "r00000-of-00002": [row(5, ["r00001-of-00002"]), row(6, ["r00001-of-00002"]), row(7, [])],
        "r00001-of-00002": [row(5, ["r00000-of-00002"]), row(6, ["r00000-of-00002"], run="other")],
    }
    job = _Job(ctx, [[[], {}, []], [[], {}, []], [[], held_by_2, []]])  # type: ignore[arg-type]
    # step 5: both halves held; 6: rank 1's copy belongs to another run; 7: held whole
    assert job.copies(0) == {(1, 5): [2], (1, 7): [2]}
    assert job.copies(1) == {(1, 5): [2]}
    assert job.holders(0) == {"r00001-of-00002"}
    assert job.held("r00001-of-00002") == {(1, 5): [2]}
