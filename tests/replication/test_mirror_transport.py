"""The mirror transport under attack and failure: mutual authentication, a MAC on every frame,
the slot discipline of re-pushed and refused snapshots, bounded pre-auth, and aborting a push
to a wedged peer.  Real sockets on 127.0.0.1, real peer processes where a peer must freeze."""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch

import flashckpt
from flashckpt import _hooks as hooks
from flashckpt.format import CODEC_RAW, ChunkEntry, Manifest, TensorEntry, checksum
from flashckpt.replication import server as _server
from flashckpt.replication.client import MirrorAbort, fetch, push
from flashckpt.replication.server import MirrorServer
from flashckpt.replication.wire import MirrorAuthError, MirrorError
from flashckpt.testing import parts

ROOT = Path(__file__).resolve().parents[2]
SECRET = b"k" * 32
OWNER = "r00000-of-00002"
MAGIC = b"flashckpt-mirror/2"
OPTS = flashckpt.Options(mirror_timeout_s=10.0)


# -- helpers ----------------------------------------------------------------------------------------


class Snap:
    """A sealed memory-tier snapshot of rank 0 of 2 (one uint8 tensor), without a Checkpointer."""

    def __init__(self, step: int, nbytes: int = 1 << 20, seed: int = 0, generation: int = 0, **lineage: str):
        g = torch.Generator().manual_seed(seed * 1000 + step)
        self.data = torch.randint(0, 256, (nbytes,), dtype=torch.uint8, generator=g).numpy().tobytes()
        piece = 256 << 10
        chunks = tuple(
            ChunkEntry("slot-0.bin", o, o, min(piece, nbytes - o), min(piece, nbytes - o), CODEC_RAW, "")
            for o in range(0, nbytes, piece)
        )
        chunks = tuple(
            ChunkEntry(
                c.key,
                c.at,
                c.offset,
                c.nbytes,
                c.nbytes,
                c.codec,
                checksum(self.data[c.at : c.at + c.nbytes]),
            )
            for c in chunks
        )
        tensors = (TensorEntry(torch.uint8, (nbytes,), 0, nbytes),)
        self.m = Manifest(
            step, 0, 2, "node0", 1.0, nbytes, tensors, chunks, {"T": "tensor", "i": 0}, generation, **lineage
        )

    def view(self, at: int, n: int) -> memoryview:
        return memoryview(self.data)[at : at + n]


def _push(port: int, snap: Snap, secret: bytes = SECRET, abort: threading.Event | None = None) -> int:
    return push(("127.0.0.1", port), secret, OWNER, snap.m, snap.view, OPTS, abort)


def _fetch(port: int, step: int, secret: bytes = SECRET) -> tuple[Manifest, bytes]:
    buf = bytearray()

    def into(m: Manifest) -> Callable[[int, int], memoryview]:
        buf.extend(bytes(m.total_bytes))
        return lambda at, n: memoryview(buf)[at : at + n]

    m = fetch(("127.0.0.1", port), secret, OWNER, step, into, OPTS)
    return m, bytes(buf)


def _held(server: MirrorServer) -> list[int]:
    return server.holdings().get(OWNER, [])


def _recv_all(sock: socket.socket, n: int) -> bytes:
    out = b""
    while len(out) < n:
        got = sock.recv(n - len(out))
        if not got:
            break
        out += got
    return out


def _until(cond: Callable[[], bool], timeout: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.01)
    return True


@pytest.fixture
def server(shm_dir: Path) -> Iterator[MirrorServer]:
    s = MirrorServer(shm_dir / "peer" / "r00001-of-00002", SECRET, OPTS, "127.0.0.1")
    try:
        yield s
    finally:
        s.close()


def _conn_threads() -> int:
    return sum(t.name == "flashckpt-mirror-conn" for t in threading.enumerate())


# -- authentication ---------------------------------------------------------------------------------


def test_a_server_without_the_secret_gets_nothing_but_the_clients_nonce() -> None:
    """A server impersonator (it speaks the protocol, but cannot prove the secret): the client
    refuses it before sending any request, manifest or byte of the snapshot."""
    got = bytearray()
    with socket.create_server(("127.0.0.1", 0)) as ls:
        port = ls.getsockname()[1]

        def impostor() -> None:
            conn, _ = ls.accept()
            with conn:
                got.extend(_recv_all(conn, len(MAGIC) + 32))
                conn.sendall(MAGIC + os.urandom(32) + os.urandom(32))  # a nonce and a guessed proof
                conn.settimeout(5)
                while chunk := conn.recv(1 << 16):
                    got.extend(chunk)

        t = threading.Thread(target=impostor)
        t.start()
        with pytest.raises(MirrorAuthError, match="did not prove"):
            _push(port, Snap(1))
        t.join(10)
    assert len(got) == len(MAGIC) + 32 and got.startswith(MAGIC)


def test_a_client_without_the_secret_is_refused_and_a_proof_cannot_be_reflected(server: MirrorServer) -> None:
    with pytest.raises(MirrorAuthError):
        _push(server.port, Snap(1), secret=b"x" * 32)
    with pytest.raises(MirrorAuthError):
        _fetch(server.port, 1, secret=b"x" * 32)
    # a client that sends the server's own proof back as its proof
    with socket.create_connection(("127.0.0.1", server.port), timeout=5) as sock:
        sock.sendall(MAGIC + os.urandom(32))
        reply = _recv_all(sock, len(MAGIC) + 64)
        sock.sendall(reply[-32:])
        assert _recv_all(sock, 8) == b"refused\n"
    assert _until(lambda: server.refused == 3)
    assert server.holdings() == {}


def test_the_server_listens_on_the_advertised_host_only(
    shm_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("FLASHCKPT_MIRROR_HOST", "127.0.0.1")
    s = MirrorServer(shm_dir / "r00001-of-00002", SECRET, OPTS)  # as the Checkpointer makes it
    try:
        assert s._sock.getsockname()[0] == "127.0.0.1"
        with pytest.raises(ConnectionRefusedError):  # another address of this host
            socket.create_connection(("127.0.0.2", s.port), timeout=5).close()
    finally:
        s.close()


# -- a MAC on every frame -----------------------------------------------------------------------


class FlipProxy:
    """A TCP proxy between a client and a server that flips one byte of one direction's
    stream (``c2s`` or ``s2c``) at ``offset`` (negative: from the stream's middle on, see
    ``middle``)."""

    def __init__(self, port: int, direction: str, offset: int) -> None:
        self.target = port
        self.direction, self.offset = direction, offset
        self.flipped = False
        self.ls = socket.create_server(("127.0.0.1", 0))
        self.port = self.ls.getsockname()[1]
        self.threads: list[threading.Thread] = []
        t = threading.Thread(target=self._accept, daemon=True)
        t.start()
        self.threads.append(t)

    def _accept(self) -> None:
        with contextlib.suppress(OSError):
            client, _ = self.ls.accept()
            upstream = socket.create_connection(("127.0.0.1", self.target))
            for src, dst, name in ((client, upstream, "c2s"), (upstream, client, "s2c")):
                t = threading.Thread(target=self._pump, args=(src, dst, name), daemon=True)
                t.start()
                self.threads.append(t)

    def _pump(self, src: socket.socket, dst: socket.socket, name: str) -> None:
        seen = 0
        with contextlib.suppress(OSError):
            while data := src.recv(1 << 16):
                if name == self.direction and seen <= self.offset < seen + len(data):
                    buf = bytearray(data)
                    buf[self.offset - seen] ^= 0x20
                    data = bytes(buf)
                    self.flipped = True
                seen += len(data)
                dst.sendall(data)
        with contextlib.suppress(OSError):
            dst.shutdown(socket.SHUT_WR)

    def close(self) -> None:
        self.ls.close()


C2S_HANDSHAKE = len(MAGIC) + 32 + 32  # hello, proof
S2C_HANDSHAKE = len(MAGIC) + 32 + 32 + 8  # nonce, proof, verdict


@pytest.mark.parametrize(
    ("direction", "offset", "what"),
    [
        ("c2s", C2S_HANDSHAKE + 4 + 3, "the put request header"),
        ("c2s", 600 << 10, "a data piece"),
        ("s2c", S2C_HANDSHAKE + 4 + 3, "the server's first answer"),
    ],
)
def test_a_byte_flipped_in_a_push_fails_it_with_an_auth_error_and_stores_nothing(
    server: MirrorServer, direction: str, offset: int, what: str
) -> None:
    old = Snap(1)
    _push(server.port, old)
    proxy = FlipProxy(server.port, direction, offset)
    try:
        with pytest.raises(MirrorAuthError):
            _push(proxy.port, Snap(2))
        assert proxy.flipped, what
    finally:
        proxy.close()
    assert _held(server) == [1]  # nothing of step 2 was stored; the older copy is intact
    m, data = _fetch(server.port, 1)
    assert data == old.data and m.chunks == old.m.chunks


@pytest.mark.parametrize(
    ("offset", "what"), [(S2C_HANDSHAKE + 4 + 3, "the reply header"), (600 << 10, "a data piece")]
)
def test_a_byte_flipped_in_a_fetch_fails_it_with_an_auth_error(
    server: MirrorServer, offset: int, what: str
) -> None:
    _push(server.port, Snap(1))
    proxy = FlipProxy(server.port, "s2c", offset)
    loaded: list[Manifest] = []
    try:
        with pytest.raises(MirrorAuthError):
            loaded.append(_fetch(proxy.port, 1)[0])
        assert proxy.flipped, what
    finally:
        proxy.close()
    assert loaded == []
    assert _fetch(server.port, 1)[1] == Snap(1).data  # the real copy is fine


# -- which slot a push lands in ---------------------------------------------------------------------


def test_re_pushing_a_held_step_then_newer_ones_keeps_the_right_steps(
    server: MirrorServer, caplog: pytest.LogCaptureFixture
) -> None:
    """H4: a step pushed again (a forced final save, a loop restarting at the restored step)
    replaces the copy of that step; every later push still works."""
    caplog.set_level(logging.WARNING, logger="flashckpt")
    expect: dict[int, Snap] = {}
    for step, seed, held in [
        (5, 0, [5]),
        (6, 0, [5, 6]),
        (6, 1, [6]),
        (6, 2, [6]),
        (7, 0, [6, 7]),
        (8, 0, [7, 8]),
    ]:
        expect[step] = Snap(step, seed=seed)
        assert _push(server.port, expect[step]) == 1 << 20
        assert _held(server) == held, (step, seed)
        for s in held:
            assert _fetch(server.port, s)[1] == expect[s].data, (step, seed, s)
    assert not [r for r in caplog.records if r.name.startswith("flashckpt")]


def test_a_rollback_run_replaces_the_abandoned_steps_not_its_own(server: MirrorServer) -> None:
    """The newest copy is the one of the newest (generation, step), not the largest step
    number; lineage fields pass through unchanged."""
    for step in (5, 6):
        _push(server.port, Snap(step))
    for step in (4, 5):  # the run continued from step 3: generation 1
        _push(server.port, Snap(step, seed=9, generation=1, storage="ab12", run="cd34"))
    assert _held(server) == [4, 5]
    for step in (4, 5):
        m, data = _fetch(server.port, step)
        assert (m.generation, m.storage, m.run) == (1, "ab12", "cd34")
        assert data == Snap(step, seed=9).data


def test_a_push_that_is_too_large_keeps_every_copy(server: MirrorServer) -> None:
    """L8: refused before anything held is touched."""
    for step in (1, 2):
        _push(server.port, Snap(step))
    huge = Snap(3, nbytes=1)
    n = 1 << 46  # 64 TiB: no memory tier holds that
    huge.m = Manifest(
        3, 0, 2, "node0", 1.0, n, (TensorEntry(torch.uint8, (n,), 0, n),),
        (ChunkEntry("slot-0.bin", 0, 0, n, n, CODEC_RAW, "0" * 32),), {"T": "tensor", "i": 0},
    )  # fmt: skip
    with pytest.raises(MirrorError, match="bytes of memory"):
        _push(server.port, huge)
    assert _held(server) == [1, 2]
    for step in (1, 2):
        assert _fetch(server.port, step)[1] == Snap(step).data


def test_a_push_cut_off_midway_keeps_the_newest_copy(server: MirrorServer) -> None:
    for step in (1, 2):
        _push(server.port, Snap(step))
    abort = MirrorAbort()
    off = hooks.on("mirror.piece", lambda **_: abort.set())
    try:
        with pytest.raises(MirrorError, match="abandoned"):
            _push(server.port, Snap(2, seed=5), abort=abort)
    finally:
        off()
    assert _until(lambda: _held(server) == [2])  # the older copy's slot took the bytes
    assert _fetch(server.port, 2)[1] == Snap(2).data


# -- connections that never authenticate ------------------------------------------------------------


def test_idle_unauthenticated_connections_get_bounded_threads_and_a_peer_is_still_served(
    server: MirrorServer, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="flashckpt")
    socks = []
    peak = 0
    try:
        for _ in range(300):
            socks.append(socket.create_connection(("127.0.0.1", server.port), timeout=10))
            peak = max(peak, _conn_threads())
        assert _until(lambda: server.refused >= 300 - _server.MAX_PREAUTH)
        peak = max(peak, _conn_threads())
        assert peak <= _server.MAX_PREAUTH + 2, peak
        refusals = [r for r in caplog.records if "refused a mirror connection" in r.getMessage()]
        assert len(refusals) == 1  # once per episode, not per connection
        # while they are all still open, a peer pushes and fetches
        _push(server.port, Snap(1))
        assert _fetch(server.port, 1)[1] == Snap(1).data
        assert server.serving
    finally:
        for s in socks:
            s.close()


def test_a_handshake_trickled_byte_by_byte_is_dropped_after_the_handshake_timeout(
    shm_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(_server, "HANDSHAKE_TIMEOUT_S", 1.0)
    s = MirrorServer(shm_dir / "r00001-of-00002", SECRET, OPTS, "127.0.0.1")
    try:
        with socket.create_connection(("127.0.0.1", s.port), timeout=10) as sock:
            t0 = time.monotonic()
            hello = MAGIC + os.urandom(32)
            with contextlib.suppress(OSError):
                for b in hello:
                    sock.sendall(bytes([b]))
                    time.sleep(0.1)
                sock.recv(1 << 16)  # (every byte sent in time: the server answers)
            closed_after = time.monotonic() - t0
        assert 0.9 <= closed_after <= 3.0, closed_after
        assert _until(lambda: s.refused == 1)
    finally:
        s.close()


def test_a_thread_that_cannot_start_does_not_stop_the_server(
    server: MirrorServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The real failure is the process's thread limit; it cannot be provoked safely here, so
    ``Thread.start`` fails once for the server's connection threads."""
    start = threading.Thread.start
    failed = []

    def flaky(self: threading.Thread) -> None:
        if self.name == "flashckpt-mirror-conn" and not failed:
            failed.append(self)
            raise RuntimeError("can't start new thread")
        start(self)

    monkeypatch.setattr(threading.Thread, "start", flaky)
    with pytest.raises(MirrorError):
        _push(server.port, Snap(1))
    assert failed and server.refused == 1
    _push(server.port, Snap(1))
    assert _held(server) == [1]


# -- a peer that authenticates and then stops reading ------------------------------------------------


@contextlib.contextmanager
def _peer_process(rank_dir: Path) -> Iterator[tuple[subprocess.Popen[str], int]]:
    """A real MirrorServer in a process of its own (so that it can be frozen with SIGSTOP)."""
    code = (
        "import sys; from pathlib import Path; import flashckpt\n"
        "from flashckpt.replication.server import MirrorServer\n"
        "s = MirrorServer(Path(sys.argv[1]), bytes.fromhex(sys.argv[2]), flashckpt.Options(), '127.0.0.1')\n"
        "print(s.port, flush=True); sys.stdin.read(); s.close()\n"
    )
    proc = subprocess.Popen(
        [sys.executable, "-c", code, str(rank_dir), SECRET.hex()],
        cwd=ROOT,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None
        yield proc, int(proc.stdout.readline())
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(proc.pid, signal.SIGCONT)
        proc.kill()
        proc.wait(30)


@pytest.mark.subprocess
def test_the_abort_ends_a_push_blocked_on_a_peer_that_stopped_reading(shm_dir: Path) -> None:
    """M1: the peer authenticated, took the first pieces, then froze; the send blocks once
    the socket buffers are full.  Setting the abort ends it at once, not after the timeout."""
    snap = Snap(1, nbytes=64 << 20)
    with _peer_process(shm_dir / "peer" / "r00001-of-00002") as (proc, port):
        frozen = threading.Event()

        def freeze(**_: object) -> None:
            if not frozen.is_set():
                os.kill(proc.pid, signal.SIGSTOP)
                frozen.set()

        abort = MirrorAbort()
        errors: list[BaseException] = []
        pushing = threading.Thread(
            target=lambda: errors.append(_catch(lambda: _push(port, snap, abort=abort)))
        )
        off = hooks.on("mirror.piece", freeze)
        try:
            pushing.start()
            assert frozen.wait(10)
            time.sleep(0.5)  # the buffers fill; the push blocks in sendall
            assert pushing.is_alive()
            t0 = time.monotonic()
            abort.set()
            pushing.join(OPTS.mirror_timeout_s + 5)
            took = time.monotonic() - t0
        finally:
            off()
        assert took < 1.0, took
        assert isinstance(errors[0], MirrorError) and "abandoned" in str(errors[0])


def _catch(fn: Callable[[], object]) -> BaseException | None:
    try:
        fn()
    except BaseException as exc:
        return exc
    return None


@pytest.mark.subprocess
def test_a_wedged_peer_costs_a_save_no_training_time(tmp_path: Path, shm_dir: Path) -> None:
    """M1 end to end: saves keep coming while the only peer is frozen mid-push; the save that
    needs the pushing snapshot's slot abandons that mirror instead of waiting for the timeout."""
    opts = flashckpt.Options(mirror_timeout_s=20.0, fsync=False, direct_io=False)
    with _peer_process(shm_dir / "peer" / "r00001-of-00002") as (proc, port):
        ckpt = flashckpt.Checkpointer(tmp_path / "storage", memory_dir=shm_dir / "owner", options=opts)
        frozen = threading.Event()

        def freeze(**_: object) -> None:
            if not frozen.is_set():
                os.kill(proc.pid, signal.SIGSTOP)
                frozen.set()

        off = hooks.on("mirror.piece", freeze)
        try:
            parts(ckpt).persister.mirrors.peers = [(1, ("127.0.0.1", port))]
            parts(ckpt).persister.mirrors.owner = OWNER
            parts(ckpt).persister.control.secret = SECRET
            state = {"w": torch.zeros(16 << 20)}  # 64 MiB
            h1 = ckpt.save(1, state)
            assert frozen.wait(20)
            ckpt.save(2, state)
            t0 = time.monotonic()
            ckpt.save(3, state)  # needs step 1's slot, held by its push to the frozen peer
            blocked = time.monotonic() - t0
            assert h1 is not None
            h1.wait(30)  # a mirror is best effort: its failure is a warning, never raised
            assert not h1.failures and [f.tier for f in h1.warnings] == ["mirror"]
            assert "abandoned" in str(h1.warnings[0].error)
        finally:
            off()
            proc.kill()  # the later pushes fail at once
            ckpt.close(_raise=False)
    assert blocked < opts.mirror_timeout_s / 4, blocked
