"""Protocol fuzzing of the mirror transport, against live endpoints on 127.0.0.1.

* A fuzzing client against a live :class:`MirrorServer`: random bytes, mutated handshakes,
  and, after a real handshake (an authenticated but broken or hostile peer), frames with bad
  lengths, huge lengths, bad JSON, bad tags, hostile requests and manifests, truncated
  streams.  After every example: the server still accepts and serves a good client, no
  connection thread outlives its connection or exceeds the pre-auth bound, and nothing was
  written outside the server's directory or under names it does not use.
* A fuzzing server against the real :func:`push` / :func:`fetch`: whatever it sends, only
  :class:`FlashCkptError` / :class:`OSError` subclasses come back to the caller.

Quick by default (a few seconds); ``FLASHCKPT_FUZZ_SECONDS=600`` fuzzes for ten minutes and
prints what it tried and saw (``pytest -s``).
"""

from __future__ import annotations

import collections
import contextlib
import json
import logging
import os
import re
import socket
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import flashckpt
from flashckpt.errors import CorruptCheckpointError, FlashCkptError
from flashckpt.format import encode_manifest
from flashckpt.replication import server as _server
from flashckpt.replication import wire as _wire
from flashckpt.replication.client import fetch, push
from flashckpt.replication.server import MirrorServer
from tests.replication.test_mirror_transport import Snap

SECRET = b"f" * 32
OWNER = "r00000-of-00002"
GOOD = "r00001-of-00002"  # the good client's shard (the fuzzer may write there too)
MAGIC = b"flashckpt-mirror/2"
OPTS = flashckpt.Options(mirror_timeout_s=3.0)
FUZZ_SECONDS = float(os.environ.get("FLASHCKPT_FUZZ_SECONDS", "0") or 0)
SETTINGS = settings(
    max_examples=400 if FUZZ_SECONDS else 40,
    deadline=None,
    database=None,
    suppress_health_check=list(HealthCheck),
)
NAMES = re.compile(r"(slot-[01]\.bin|step-\d{12}\.manifest)")
SHARD = re.compile(r"r\d{5}-of-\d{5}")

#: What the fuzzers tried and saw, for the long run's summary.
TALLY: collections.Counter[str] = collections.Counter()

# -- strategies -------------------------------------------------------------------------------------

json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**70), 2**70)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=16),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=10,
)
shards = st.sampled_from(
    [OWNER, GOOD, "../r00000-of-00002", "r00000-of-00002/../../x", "/tmp/x", "", ".", "r0-of-2"]
) | st.text(max_size=24)
ints = st.integers(-3, 12) | st.sampled_from([10**12, 2**31, 2**63, 2**64, -(2**63), 1 << 30, (1 << 30) + 1])
requests = st.fixed_dictionaries(
    {
        "op": st.sampled_from(["put", "get", "PUT", "del", ""]) | json_values,
        "shard": shards | json_values,
        "step": ints | json_values,
        "manifest": ints | json_values,
    }
) | st.dictionaries(st.sampled_from(["op", "shard", "step", "manifest", "x"]), json_values, max_size=4)


@st.composite
def manifests(draw: st.DrawFn) -> bytes:
    """A manifest for step 3 of ``OWNER``, whole or mutated (JSON edits, byte flips, cuts)."""
    snap = Snap(3, nbytes=draw(st.sampled_from([0, 1, 4096, 300 << 10])))
    data = encode_manifest(snap.m)
    how = draw(st.sampled_from(["whole", "flip", "cut", "edit", "random"]))
    if how == "flip" and data:
        i = draw(st.integers(0, len(data) - 1))
        data = data[:i] + bytes([data[i] ^ draw(st.integers(1, 255))]) + data[i + 1 :]
    elif how == "cut":
        data = data[: draw(st.integers(0, len(data)))]
    elif how == "edit":
        body = json.loads(data.split(b"\n#xxh3_128:")[0])
        body[draw(st.sampled_from(sorted(body)))] = draw(json_values)
        from flashckpt.format import encode_record

        data = encode_record(body)  # a valid trailer over a hostile body
    elif how == "random":
        data = draw(st.binary(max_size=2000))
    TALLY[f"manifest:{how}"] += 1
    return data


frames = st.one_of(
    st.tuples(st.just("header"), requests),
    st.tuples(st.just("any-json"), json_values),
    st.tuples(st.just("not-json"), st.binary(max_size=300)),
    st.tuples(st.just("bad-tag"), requests),
    st.tuples(st.just("bad-length"), st.integers(0, 2**32 - 1), st.binary(max_size=64)),
    st.tuples(st.just("blob"), manifests()),
    st.tuples(st.just("data"), st.binary(max_size=5000)),
    st.tuples(st.just("garbage"), st.binary(max_size=200)),
    st.tuples(st.just("truncate"), st.binary(max_size=20)),
    st.tuples(st.just("pieces"), st.sampled_from([4096, 4095, 4097, 0])),
)


@st.composite
def conversations(draw: st.DrawFn) -> tuple[str, bytes, list[Any]]:
    """How a connection starts, the bytes of a broken start, and the frames after it."""
    start = draw(st.sampled_from(["raw", "hello", "hello+proof", "wrong-secret", "authed", "authed", "put"]))
    junk = draw(manifests()) if start == "put" else draw(st.binary(max_size=120))
    return start, junk, draw(st.lists(frames, max_size=6))


# -- the fuzzing client ---------------------------------------------------------------------------


def _send_frame(ch: _wire.Channel, frame: tuple[Any, ...]) -> bool:
    """Send one fuzzed frame; False once the stream is cut."""
    kind, sock = frame[0], ch.sock
    TALLY[f"frame:{kind}"] += 1
    if kind == "header":
        ch.send_header(frame[1])
    elif kind in ("any-json", "not-json"):
        payload = json.dumps(frame[1]).encode() if kind == "any-json" else frame[1]
        sock.sendall(_wire.HEADER.pack(len(payload)) + payload + ch._tag(b"H", payload))
    elif kind == "bad-tag":
        payload = json.dumps(frame[1]).encode()
        sock.sendall(_wire.HEADER.pack(len(payload)) + payload + os.urandom(16))
    elif kind == "bad-length":
        sock.sendall(_wire.HEADER.pack(frame[1]) + frame[2])
    elif kind == "blob":
        ch.send_blob(frame[1])
    elif kind == "data":
        sock.sendall(frame[1] + ch._tag(b"D", frame[1]))
    elif kind == "garbage":
        sock.sendall(frame[1])
    elif kind == "truncate":
        sock.sendall(frame[1])
        return False
    elif kind == "pieces":  # random bytes, sized and tagged as the 4096-byte snapshot's
        for off in range(0, frame[1], _wire.PIECE):
            piece = os.urandom(min(_wire.PIECE, frame[1] - off))
            sock.sendall(piece + ch._tag(b"D", piece))
    return True


def _talk(port: int, conversation: tuple[str, bytes, list[Any]]) -> None:
    """One fuzzed connection; only FlashCkptError / OSError may come out of our own parsing."""
    start, junk, fuzzed = conversation
    TALLY[f"start:{start}"] += 1
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        try:
            if start == "raw":
                sock.sendall(junk)
            elif start in ("hello", "hello+proof"):
                sock.sendall(MAGIC + os.urandom(32))
                sock.recv(1 << 10)
                sock.sendall(junk[:32] if start == "hello+proof" else junk)
            elif start == "wrong-secret":
                with pytest.raises(_wire.MirrorAuthError):
                    _wire.client_handshake(sock, b"w" * 32, time.monotonic() + 5)
            else:
                ch = _wire.client_handshake(sock, SECRET, time.monotonic() + 5)
                if start == "put":  # a well-formed start, so that fuzzed frames reach deeper
                    ch.send_header({"op": "put", "shard": OWNER, "step": 3, "manifest": len(junk)})
                    ch.send_blob(junk)
                for frame in fuzzed:
                    if not _send_frame(ch, frame):
                        break
                sock.shutdown(socket.SHUT_WR)
                while True:  # the server's answers, through our own frame parser
                    reply = ch.recv_header()
                    TALLY[f"reply:{sorted(reply)}:{reply.get('ok')}"] += 1
            sock.shutdown(socket.SHUT_WR)
            while sock.recv(1 << 16):
                pass
        except (FlashCkptError, OSError) as exc:
            TALLY[f"client-saw:{type(exc).__name__}"] += 1


def _files_ok(root: Path, rank_dir: Path) -> None:
    for p in root.rglob("*"):
        rel = p.relative_to(root)
        assert p == rank_dir or rank_dir in p.parents or p == rank_dir.parent, f"written outside: {rel}"
        if rank_dir in p.parents:
            parts = p.relative_to(rank_dir).parts
            assert parts[0] == "mirrors", rel
            if len(parts) >= 2:
                assert SHARD.fullmatch(parts[1]), rel
            if len(parts) == 3:
                assert NAMES.fullmatch(parts[2]) or ".tmp" in parts[2], rel
            assert len(parts) <= 3, rel


def _conn_threads() -> int:
    return sum(t.name == "flashckpt-mirror-conn" for t in threading.enumerate())


@contextlib.contextmanager
def _fuzz_budget() -> Iterator[Callable[[], bool]]:
    deadline = time.monotonic() + FUZZ_SECONDS
    yield lambda: time.monotonic() < deadline


class _Unexpected(logging.Handler):
    """Collects what the server logs as a bug (an exception outside FlashCkptError/OSError)."""

    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


def test_a_fuzzing_client_never_breaks_the_server(shm_dir: Path) -> None:
    TALLY.clear()
    unexpected = _Unexpected()
    logging.getLogger("flashckpt").addHandler(unexpected)
    rank_dir = shm_dir / "peer" / "r00002-of-00004"
    server = MirrorServer(rank_dir, SECRET, OPTS, "127.0.0.1", handshake_timeout_s=1.0)
    good_step = [0]
    try:

        @SETTINGS
        @given(conversations())
        def one(conversation: tuple[str, bytes, list[Any]]) -> None:
            _talk(server.port, conversation)
            assert server.serving
            deadline = time.monotonic() + 10
            while server.connections and time.monotonic() < deadline:
                time.sleep(0.005)
            assert server.connections == 0, "a connection thread outlived its connection"
            assert _conn_threads() <= _server.MAX_PREAUTH
            _files_ok(shm_dir, rank_dir)
            # a good client is still served
            good_step[0] += 1
            snap = Snap(good_step[0], nbytes=64 << 10)
            push(("127.0.0.1", server.port), SECRET, GOOD, snap.m, snap.view, OPTS)
            buf = bytearray(snap.m.total_bytes)
            fetch(
                ("127.0.0.1", server.port), SECRET, GOOD, good_step[0],
                lambda _m: lambda at, n: memoryview(buf)[at : at + n], OPTS,
            )  # fmt: skip
            assert bytes(buf) == snap.data
            assert not unexpected.records, unexpected.format(unexpected.records[0])

        one()
        with _fuzz_budget() as more:
            while more():
                one()
    finally:
        server.close()
        logging.getLogger("flashckpt").removeHandler(unexpected)
    _report("server")


# -- the fuzzing server ---------------------------------------------------------------------------

replies = st.one_of(
    st.tuples(st.just("header"), st.fixed_dictionaries({"ok": json_values, "manifest": ints | json_values})),
    st.tuples(st.just("header"), st.fixed_dictionaries({"ok": st.just(True), "ready": json_values})),
    st.tuples(
        st.just("header"),
        st.fixed_dictionaries({"ok": st.just(False), "auth": json_values, "error": json_values}),
    ),
    st.tuples(st.just("any-json"), json_values),
    st.tuples(st.just("not-json"), st.binary(max_size=300)),
    st.tuples(st.just("bad-tag"), requests),
    st.tuples(st.just("bad-length"), st.integers(0, 2**32 - 1), st.binary(max_size=64)),
    st.tuples(st.just("blob"), manifests()),
    st.tuples(st.just("data"), st.binary(max_size=5000)),
    st.tuples(st.just("garbage"), st.binary(max_size=200)),
    st.tuples(st.just("truncate"), st.binary(max_size=20)),
    st.tuples(st.just("pieces"), st.sampled_from([4096, 4095, 0])),
)


@st.composite
def server_scripts(draw: st.DrawFn) -> tuple[str, str, bytes, list[Any]]:
    op = draw(st.sampled_from(["fetch", "push"]))
    start = draw(st.sampled_from(["raw", "bad-magic", "wrong-secret", "authed", "authed", "authed"]))
    junk = draw(st.binary(max_size=120))
    if op == "fetch" and start == "authed" and draw(st.booleans()):  # a valid start, then fuzz
        data = draw(manifests())
        script = [("header", {"ok": True, "manifest": len(data)}), ("blob", data)]
        return op, start, junk, script + draw(st.lists(replies, max_size=4))
    return op, start, junk, draw(st.lists(replies, max_size=6))


def _fuzz_server(ls: socket.socket, script: tuple[str, str, bytes, list[Any]]) -> None:
    """Thread: one connection of the fuzzing server."""
    _, start, junk, frames_ = script
    TALLY[f"server-start:{start}"] += 1
    try:
        conn, _ = ls.accept()
    except OSError:
        return
    with conn:
        conn.settimeout(5)
        with contextlib.suppress(OSError, FlashCkptError):
            if start == "raw":
                conn.sendall(junk)
                return
            if start == "bad-magic":
                conn.recv(len(MAGIC) + 32)
                conn.sendall(junk[:18].ljust(18, b"x") + os.urandom(64))
                return
            secret = SECRET if start == "authed" else b"w" * 32
            ch = _wire.server_handshake(conn, secret, time.monotonic() + 5)
            for frame in frames_:
                if frame[0] == "header" and not isinstance(frame[1], dict):
                    continue
                if not _send_frame(ch, frame):
                    break
                with contextlib.suppress(OSError):  # take in what the client sends meanwhile
                    conn.settimeout(0.01)
                    conn.recv(1 << 20)
                conn.settimeout(5)


def test_a_fuzzing_server_gets_only_flashckpt_or_os_errors_out_of_a_client() -> None:
    TALLY.clear()
    opts = flashckpt.Options(mirror_timeout_s=2.0)

    def into(m: Any) -> Callable[[int, int], memoryview]:
        if m.total_bytes > 8 << 20:  # as the restore's check_fits would
            raise CorruptCheckpointError("too large for this test")
        buf = bytearray(m.total_bytes)
        return lambda at, n: memoryview(buf)[at : at + n]

    @SETTINGS
    @given(server_scripts())
    def one(script: tuple[str, str, bytes, list[Any]]) -> None:
        with socket.create_server(("127.0.0.1", 0)) as ls:
            ls.settimeout(10)
            t = threading.Thread(target=_fuzz_server, args=(ls, script))
            t.start()
            addr = ("127.0.0.1", ls.getsockname()[1])
            try:
                if script[0] == "fetch":
                    fetch(addr, SECRET, OWNER, 3, into, opts)
                else:
                    snap = Snap(3, nbytes=64 << 10)
                    push(addr, SECRET, OWNER, snap.m, snap.view, opts)
                TALLY[f"{script[0]}:succeeded"] += 1
            except (FlashCkptError, OSError) as exc:
                TALLY[f"{script[0]}:{type(exc).__name__}"] += 1
            t.join(30)
            assert not t.is_alive()

    one()
    with _fuzz_budget() as more:
        while more():
            one()
    _report("client")


def _report(which: str) -> None:
    if FUZZ_SECONDS:
        print(f"\n-- mirror fuzzing ({which}), {FUZZ_SECONDS:.0f} s: what was tried and seen --")
        for k, v in sorted(TALLY.items()):
            print(f"{v:9d}  {k}")
