"""Peer mirrors: the authenticated TCP transport, and (in test_distributed) whole jobs."""

from __future__ import annotations

import dataclasses
import fcntl
import os
import shutil
import socket
import time
from collections.abc import Callable
from pathlib import Path

import pytest

import flashckpt
from flashckpt.format import UNSEALED, encode_manifest, memory_manifest_key
from flashckpt.replication.client import fetch, push
from flashckpt.replication.placement import mirror_peers
from flashckpt.replication.server import MirrorServer
from flashckpt.replication.wire import MirrorAuthError
from flashckpt.staging.memory_tier import read_memory_manifest
from flashckpt.testing import parts
from tests.conftest import make_state

SECRET = b"s" * 32


def _recv_all(sock: socket.socket, n: int) -> bytes:
    out = b""
    while len(out) < n:
        got = sock.recv(n - len(out))
        assert got, "closed early"
        out += got
    return out


def _until(cond: Callable[[], bool], timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond() and time.monotonic() < deadline:
        time.sleep(0.01)


def _snapshot(dirs: dict[str, Path]) -> tuple[flashckpt.Checkpointer, bytes]:
    ckpt = flashckpt.Checkpointer(dirs["storage"], memory_dir=dirs["memory"] / "owner")
    ckpt.save(3, make_state())
    ckpt.wait()
    return ckpt, (ckpt.memory_path / "slot-0.bin").read_bytes()


def test_push_then_fetch_round_trips_a_sealed_snapshot(dirs: dict[str, Path]) -> None:
    ckpt, slot_bytes = _snapshot(dirs)
    server = MirrorServer(
        dirs["memory"] / "peer" / "r00001-of-00002", SECRET, flashckpt.Options(), "127.0.0.1"
    )
    try:
        m = read_memory_manifest(parts(ckpt).memory.backend, 3)
        slot = parts(ckpt).stager.slots[0]
        sent = push(("127.0.0.1", server.port), SECRET, "r00000-of-00002", m, slot.view, flashckpt.Options())
        assert sent == sum(c.nbytes for c in m.chunks) == server.received_bytes
        assert server.holdings() == {"r00000-of-00002": [3]}
        # the mirror lives in the peer's memory tier, private, in the owner's slot format
        held = dirs["memory"] / "peer" / "r00001-of-00002" / "mirrors" / "r00000-of-00002"
        assert (held / "step-000000000003.manifest").stat().st_mode & 0o777 == 0o600
        buf = bytearray(len(slot_bytes))
        got = fetch(
            ("127.0.0.1", server.port),
            SECRET,
            "r00000-of-00002",
            3,
            lambda _m: lambda at, n: memoryview(buf)[at : at + n],
            flashckpt.Options(),
        )
        assert got.step == 3 and [c.checksum for c in got.chunks] == [c.checksum for c in m.chunks]
        for c in m.chunks:
            assert buf[c.at : c.at + c.nbytes] == slot_bytes[c.at : c.at + c.nbytes]
        # the newest two pushes are kept, like the owner's own two slots
        for step in (4, 5):
            ckpt.save(step, make_state(seed=step))
            ckpt.wait()
            m = read_memory_manifest(parts(ckpt).memory.backend, step)
            slot = next(s for s in parts(ckpt).stager.slots if s.step == step)
            push(("127.0.0.1", server.port), SECRET, "r00000-of-00002", m, slot.view, flashckpt.Options())
        assert server.holdings() == {"r00000-of-00002": [4, 5]}
        server.drop()
        assert not held.exists()
    finally:
        server.close()
        ckpt.close()


def test_a_connection_without_the_jobs_secret_is_refused(dirs: dict[str, Path]) -> None:
    ckpt, _ = _snapshot(dirs)
    server = MirrorServer(
        dirs["memory"] / "peer" / "r00001-of-00002", SECRET, flashckpt.Options(), "127.0.0.1"
    )
    try:
        m = read_memory_manifest(parts(ckpt).memory.backend, 3)
        with pytest.raises(MirrorAuthError):
            push(
                ("127.0.0.1", server.port),
                b"x" * 32,
                "r00000-of-00002",
                m,
                parts(ckpt).stager.slots[0].view,
                flashckpt.Options(),
            )
        # a raw client that sends a request instead of proving the secret gets nothing
        with socket.create_connection(("127.0.0.1", server.port), timeout=5) as sock:
            sock.sendall(b"flashckpt-mirror/2" + os.urandom(32))
            _recv_all(sock, len(b"flashckpt-mirror/2") + 64)  # the server's nonce and proof
            sock.sendall(b'{"op": "get", "shard": "r00000-of-00002", "step": 3}'[:32])
            reply = sock.recv(1 << 16)
            assert b"refused" in reply and b"ok" not in reply.replace(b"refused", b"")
        _until(lambda: server.refused == 2)  # counted by the connections' threads
        assert server.refused == 2
        assert server.holdings() == {}
    finally:
        server.close()
        ckpt.close()


def test_an_orphaned_shard_directory_is_claimed_once_served_sealed_and_dropped(dirs: dict[str, Path]) -> None:
    """Rank 0 of a 2-rank job ran on this node and now runs elsewhere: its directory (an
    unsealed snapshot: it died before checksumming) is claimed by one server, not by a live
    rank's directory, and served with checksums."""
    root = dirs["memory"] / "job"
    owner = flashckpt.Checkpointer(dirs["storage"], memory_dir=root / "owner")
    owner.save(7, make_state())
    owner.wait()
    m = read_memory_manifest(parts(owner).memory.backend, 7)
    slot_bytes = (owner.memory_path / "slot-0.bin").read_bytes()
    orphan = root / "r00000-of-00002"  # what the crashed rank left: its slots and manifests
    shutil.copytree(owner.memory_path, orphan, ignore=shutil.ignore_patterns("lock"))
    owner.close()
    unsealed = m.with_chunks(dataclasses.replace(c, checksum=UNSEALED) for c in m.chunks)
    (orphan / memory_manifest_key(7)).write_bytes(encode_manifest(unsealed))
    live = root / "r00003-of-00002"  # a live rank's own directory: locked, never claimed
    live.mkdir()
    fd = os.open(live / "lock", os.O_RDWR | os.O_CREAT)
    fcntl.flock(fd, fcntl.LOCK_EX)
    servers = [
        MirrorServer(root / f"r0000{r}-of-00002", SECRET, flashckpt.Options(), "127.0.0.1") for r in (1, 2)
    ]
    try:
        assert servers[0].claim_orphans(root, 2) == ["r00000-of-00002"]
        assert servers[1].claim_orphans(root, 2) == []  # one claimer per directory
        assert servers[0].claim_orphans(root, 3) == []  # another world size is not ours
        assert servers[0].holdings() == {"r00000-of-00002": [7]}
        buf = bytearray(len(slot_bytes))
        got = fetch(
            ("127.0.0.1", servers[0].port),
            SECRET,
            "r00000-of-00002",
            7,
            lambda _m: lambda at, n: memoryview(buf)[at : at + n],
            flashckpt.Options(),
        )
        assert [c.checksum for c in got.chunks] == [c.checksum for c in m.chunks]
        assert all(buf[c.at : c.at + c.nbytes] == slot_bytes[c.at : c.at + c.nbytes] for c in m.chunks)
        servers[0].drop("r00000-of-00002")
        assert not orphan.exists() and servers[0].holdings() == {}
        assert live.exists()
    finally:
        os.close(fd)
        for server in servers:
            server.close()


def test_an_unreadable_orphan_directory_is_skipped_not_fatal(
    dirs: dict[str, Path], caplog: pytest.LogCaptureFixture
) -> None:
    """A leftover the server cannot open (here a slot that is a directory) is logged and
    skipped: an error there would fail this rank's restore while the others wait for it."""
    root = dirs["memory"] / "job"
    (root / "r00000-of-00002" / "slot-0.bin").mkdir(parents=True)
    server = MirrorServer(root / "r00001-of-00002", SECRET, flashckpt.Options(), "127.0.0.1")
    try:
        assert server.claim_orphans(root, 2) == []
        assert server.holdings() == {}
        assert any("not serving" in r.getMessage() for r in caplog.records)
    finally:
        server.close()


def test_mirror_placement_is_on_other_nodes_and_spread() -> None:
    nodes = ["a", "a", "b", "b", "c", "c"]
    assert [mirror_peers(nodes, r, 1) for r in range(6)] == [[2], [3], [4], [5], [0], [1]]
    assert mirror_peers(nodes, 0, 2) == [2, 4]
    assert mirror_peers(nodes, 0, 5) == [2, 4]  # at most one copy per other node
    assert mirror_peers(["a", "a"], 1, 1) == []  # one node: nowhere to mirror
    # uneven nodes: every rank still gets a peer on another node
    uneven = ["a", "a", "a", "b"]
    assert all(uneven[p] != uneven[r] for r in range(4) for p in mirror_peers(uneven, r, 1))


def _victim_worker(rank: int, init: str, storage: str, memory: str, result: str) -> None:
    """Two ranks on two simulated nodes, each mirroring to the other.  Rank 1 is SIGKILLed
    while it receives rank 0's snapshot of step 2, or of the first step after it that rank 0
    pushes (rank 0 saves steps 2-4 back to back: a push a newer save overtakes is abandoned
    before it starts); rank 0 trains on."""
    import json
    import signal
    import time
    from datetime import timedelta

    import torch

    from flashckpt.replication import server as _server
    from tests.conftest import train_step

    os.environ["FLASHCKPT_NODE_ID"] = f"node{rank}"
    os.environ["FLASHCKPT_MIRROR_HOST"] = "127.0.0.1"
    torch.distributed.init_process_group(
        "gloo", init_method=init, rank=rank, world_size=2, timeout=timedelta(seconds=30)
    )
    if rank == 1:
        orig = _server.MirrorServer._put

        def put(self: _server.MirrorServer, conn: socket.socket, req: dict[str, object]) -> None:
            step = req.get("step")
            if isinstance(step, int) and step >= 2:
                os.kill(os.getpid(), signal.SIGKILL)
            orig(self, conn, req)

        _server.MirrorServer._put = put  # type: ignore[method-assign]
    opts = flashckpt.Options(coord_timeout_s=3.0, mirror_timeout_s=3.0)
    ckpt = flashckpt.Checkpointer(storage, memory_dir=f"{memory}/node{rank}", options=opts)
    state = make_state(seed=rank)
    assert ckpt.restore(state) is None
    out: dict[str, object] = {"saved": [], "errors": {}, "warnings": {}}
    handles = {}
    for step in range(5):
        train_step(state, step)
        handles[step] = ckpt.save(step, state)
        out["saved"].append(step)  # type: ignore[attr-defined]
        if step < 2:
            handles[step].wait()  # type: ignore[union-attr]
    if rank == 1:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:  # until rank 0 pushes step 2 or later
            time.sleep(0.1)
        os._exit(3)  # it never came
    for step, h in handles.items():
        assert h is not None
        try:
            h.wait(timeout=60)
        except flashckpt.FlashCkptError:
            pass
        out["errors"][str(step)] = sorted({f.tier for f in h.failures})  # type: ignore[index]
        out["warnings"][str(step)] = sorted({f.tier for f in h.warnings})  # type: ignore[index]
    out["stats_errors"] = ckpt.stats["errors"]
    out["memory"] = sorted(p.name for p in ckpt.memory_path.glob("step-*.manifest"))
    ckpt.close(_raise=False)
    Path(result).write_text(json.dumps(out))
    os._exit(0)  # skip finalization: torch's gloo teardown race (pytorch/pytorch#179291)


@pytest.mark.subprocess
def test_a_peer_killed_during_a_mirror_transfer_does_not_stop_training(tmp_path: Path, shm_dir: Path) -> None:
    import json
    import multiprocessing

    ctx = multiprocessing.get_context("spawn")
    result = tmp_path / "rank0.json"
    init = f"file://{tmp_path / 'rendezvous'}"
    procs = [
        ctx.Process(
            target=_victim_worker, args=(r, init, str(tmp_path / "storage"), str(shm_dir), str(result))
        )
        for r in (0, 1)
    ]
    try:
        for p in procs:
            p.start()
        for p in procs:
            p.join(timeout=120)
    finally:
        for p in procs:  # nothing outlives the test (a later test would wait for it)
            if p.is_alive():
                p.kill()
                p.join(10)
    assert [p.exitcode for p in procs] == [0, -9]
    got = json.loads(result.read_text())
    assert got["saved"] == [0, 1, 2, 3, 4]  # every save returned
    assert got["errors"]["0"] == got["errors"]["1"] == []  # mirrored and committed
    # from step 2 on the mirror is gone, reported per step as a warning, never as a failure of
    # the save (the storage commits of these steps succeed or time out depending on how far
    # rank 1 got before it died)
    for step in ("2", "3", "4"):
        assert "mirror" in got["warnings"][step], got["warnings"]
        assert "mirror" not in got["errors"][step], got["errors"]
    assert any(e.startswith("mirror:") for e in got["stats_errors"])
    # the snapshots themselves are safe in rank 0's memory tier, kept for the next attempt
    assert got["memory"] == ["step-000000000003.manifest", "step-000000000004.manifest"]
