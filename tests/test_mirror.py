"""Peer mirrors: the authenticated TCP transport, and (in test_distributed) whole jobs."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest

import flashckpt
from flashckpt._coordinator import read_memory_manifest
from flashckpt._mirror import MirrorAuthError, MirrorServer, fetch, mirror_peers, push
from tests.conftest import make_state

SECRET = b"s" * 32


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
        m = read_memory_manifest(ckpt._memory.backend, 3)
        slot = ckpt._stager.slots[0]
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
            m = read_memory_manifest(ckpt._memory.backend, step)
            slot = next(s for s in ckpt._stager.slots if s.step == step)
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
        m = read_memory_manifest(ckpt._memory.backend, 3)
        with pytest.raises(MirrorAuthError):
            push(
                ("127.0.0.1", server.port),
                b"x" * 32,
                "r00000-of-00002",
                m,
                ckpt._stager.slots[0].view,
                flashckpt.Options(),
            )
        # a raw client that sends a request instead of answering the challenge gets nothing
        with socket.create_connection(("127.0.0.1", server.port), timeout=5) as sock:
            sock.recv(32)
            sock.sendall(b'{"op": "get", "shard": "r00000-of-00002", "step": 3}'.ljust(32))
            reply = sock.recv(1 << 16)
            assert b"refused" in reply and b"ok" not in reply.replace(b"refused", b"")
        assert server.refused == 2
        assert server.holdings() == {}
    finally:
        server.close()
        ckpt.close()


def test_mirror_placement_is_on_other_nodes_and_spread() -> None:
    nodes = ["a", "a", "b", "b", "c", "c"]
    assert [mirror_peers(nodes, r, 1) for r in range(6)] == [[2], [3], [4], [5], [0], [1]]
    assert mirror_peers(nodes, 0, 2) == [2, 4]
    assert mirror_peers(nodes, 0, 5) == [2, 4]  # at most one copy per other node
    assert mirror_peers(["a", "a"], 1, 1) == []  # one node: nowhere to mirror
    # uneven nodes: every rank still gets a peer on another node
    uneven = ["a", "a", "a", "b"]
    assert all(uneven[p] != uneven[r] for r in range(4) for p in mirror_peers(uneven, r, 1))
