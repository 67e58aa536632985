"""The mirror wire: an authenticated TCP stream between two ranks of one job.

Wire protocol ``flashckpt-mirror/2`` (``||`` is concatenation, integers big-endian)::

    client -> server   MAGIC || Nc                  Nc, Ns: 32 fresh random bytes per connection
    server -> client   MAGIC || Ns || Ps            Ps = HMAC(secret, MAGIC || "server proof" || Nc || Ns)
    client -> server   Pc                           Pc = HMAC(secret, MAGIC || "client proof" || Nc || Ns)
    server -> client   "auth-ok\\n" | "refused\\n"  (informational: nothing depends on it)

The client checks ``Ps`` before it sends anything else, the server checks ``Pc`` before it
reads a request; the role labels differ, so neither proof can be reflected back.  Both derive
the session key ``K = HMAC(secret, MAGIC || "session key" || Nc || Ns)``.  Every later frame,
in either direction, is followed by a 16-byte Poly1305 tag over ``kind || len64 || payload``
under a one-time key ``HMAC(K, direction || counter64)`` (direction 1: client to server, 2:
back; each direction counts its own frames from 0, so no key is ever used twice).  Frames:
a header (``u32 length || JSON``, at most 1 MiB), a manifest (its length announced in the
header before it) and data pieces (at most 4 MiB each; their sizes follow from the manifest).
A tag that fails raises :class:`MirrorAuthError` and the connection is dropped.  HMAC is
HMAC-SHA256; Poly1305 (``cryptography``) runs ~4x faster than HMAC-SHA256 over the data.
There is no encryption: the job network sees the bytes, but can neither alter nor inject them.

A put is a conversation, so that a refusal always reaches the client as an answer, never as a
reset connection: ``put`` header -> ``{"ok"}`` -> manifest -> ``{"ok", "ready"}`` (or a
refusal: too large, bad manifest) -> data -> ``{"ok"}``.  A get: ``get`` header -> ``{"ok",
"manifest": n}`` -> manifest -> data.
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import json
import secrets
import socket
import struct
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.poly1305 import Poly1305

from flashckpt import _hooks as hooks
from flashckpt.errors import CorruptCheckpointError, FlashCkptError, TransientStorageError
from flashckpt.format import ChunkEntry, Manifest, carried, check_memory_manifest

_MAGIC = b"flashckpt-mirror/2"
_NONCE = 32
_PROOF = 32  # HMAC-SHA256
_TAG = 16  # Poly1305
_OK, _REFUSED = b"auth-ok\n", b"refused\n"
HEADER = struct.Struct("!I")
_MAX_HEADER = 1 << 20
PIECE = 4 << 20  # send / receive granularity (also the bandwidth cap's tick), one tag each
_C2S, _S2C = b"\x01", b"\x02"  # frame directions: separate counters, separate one-time keys


class MirrorAuthError(FlashCkptError, PermissionError):
    """A mirror peer did not prove it knows the job's secret (or refused our proof), or a
    frame failed authentication: altered in transit, or not sent by the authenticated peer."""


class MirrorError(TransientStorageError):
    """A mirror transfer failed: the peer is gone, slow beyond the timeout, or refused."""


class FrameAuthError(MirrorAuthError):
    """A data piece failed its tag; ``unread`` bytes of the transfer are still on the way."""

    def __init__(self, message: str, unread: int) -> None:
        super().__init__(message)
        self.unread = unread


ABANDONED = "abandoned: a newer snapshot needed the slot (the mirror is behind)"


class Throttle:
    """A bandwidth cap: ``wait(n)`` before sending ``n`` bytes.  ``abort`` (set by a save
    that needs the slot being sent) ends the transfer."""

    def __init__(self, bytes_per_s: float, abort: threading.Event | None) -> None:
        self.rate = bytes_per_s
        self.abort = abort
        self.t0 = time.monotonic()
        self.sent = 0

    def wait(self, n: int) -> None:
        self._check()
        if self.rate <= 0:
            return
        self.sent += n
        ahead = self.sent / self.rate - (time.monotonic() - self.t0)
        while ahead > 0:
            time.sleep(min(ahead, 0.01))
            self._check()
            ahead = self.sent / self.rate - (time.monotonic() - self.t0)

    def _check(self) -> None:
        if self.abort is not None and self.abort.is_set():
            raise MirrorError(ABANDONED)


def _recv_exact(sock: socket.socket, view: memoryview, deadline: float | None = None) -> None:
    """Fill ``view`` from ``sock``.  With ``deadline`` (``time.monotonic()``), the whole read
    must finish by then, however the bytes trickle in (the socket's timeout is changed)."""
    got = 0
    while got < len(view):
        if deadline is not None:
            left = deadline - time.monotonic()
            if left <= 0:
                raise MirrorError("the mirror handshake timed out")
            sock.settimeout(left)
        n = sock.recv_into(view[got:], min(len(view) - got, PIECE))
        if n == 0:
            raise MirrorError("the peer closed the connection")
        got += n


def _recv_bytes(sock: socket.socket, n: int, deadline: float | None = None) -> bytes:
    buf = bytearray(n)
    _recv_exact(sock, memoryview(buf), deadline)
    return bytes(buf)


def _derive(secret: bytes, label: bytes, nc: bytes, ns: bytes) -> bytes:
    """HMAC-SHA256 of the job secret over a role label and both nonces (fixed lengths, so the
    concatenation is unambiguous)."""
    return hmac.new(secret, _MAGIC + b"|" + label + b"|" + nc + ns, hashlib.sha256).digest()


def _reject_constant(name: str) -> None:
    raise ValueError(f"non-finite constant {name}")


class Channel:
    """One authenticated connection after the handshake: frames with Poly1305 tags.  Used by
    one thread at a time (the thread serving or making the connection)."""

    def __init__(self, sock: socket.socket, session_key: bytes, *, client: bool) -> None:
        self.sock = sock
        self._kdf = hmac.new(session_key, digestmod=hashlib.sha256)
        self._out_dir, self._in_dir = (_C2S, _S2C) if client else (_S2C, _C2S)
        self._out = 0  # frames sent
        self._in = 0  # frames received

    def _mac(self, direction: bytes, counter: int, kind: bytes, parts: Sequence[Any]) -> Poly1305:
        kdf = self._kdf.copy()
        kdf.update(direction + counter.to_bytes(8, "big"))
        mac = Poly1305(kdf.digest())  # a one-time key: never the same (direction, counter) twice
        mac.update(kind + sum(memoryview(p).nbytes for p in parts).to_bytes(8, "big"))
        for p in parts:
            mac.update(p)
        return mac

    def _tag(self, kind: bytes, *parts: Any) -> bytes:
        mac = self._mac(self._out_dir, self._out, kind, parts)
        self._out += 1
        return mac.finalize()

    def _verify(self, kind: bytes, tag: bytes, *parts: Any) -> None:
        mac = self._mac(self._in_dir, self._in, kind, parts)
        self._in += 1
        try:
            mac.verify(tag)
        except InvalidSignature:
            raise MirrorAuthError(
                "a mirror frame failed authentication (altered in transit, or not sent by the peer)"
            ) from None

    # -- headers: small JSON objects ------------------------------------------------------------
    def send_header(self, obj: dict[str, Any]) -> None:
        data = json.dumps(obj, separators=(",", ":"), allow_nan=False).encode()
        if len(data) > _MAX_HEADER:
            raise MirrorError(f"mirror header of {len(data)} bytes is over the limit")
        self.sock.sendall(HEADER.pack(len(data)) + data + self._tag(b"H", data))

    def recv_header(self) -> dict[str, Any]:
        (n,) = HEADER.unpack(_recv_bytes(self.sock, HEADER.size))
        if n > _MAX_HEADER:  # no flashckpt peer sends one: the length was altered
            raise MirrorAuthError(f"mirror header of {n} bytes is over the limit")
        frame = _recv_bytes(self.sock, n + _TAG)
        self._verify(b"H", frame[n:], frame[:n])
        try:
            obj = json.loads(frame[:n], parse_constant=_reject_constant)
        except (ValueError, RecursionError) as exc:
            raise MirrorError("bad mirror header") from exc
        if not isinstance(obj, dict):
            raise MirrorError("bad mirror header")
        return obj

    # -- a manifest: its length was announced in a header -----------------------------------
    def send_blob(self, data: bytes) -> None:
        tag = self._tag(b"M", data)
        self.sock.sendall(data)
        self.sock.sendall(tag)

    def recv_blob(self, n: int) -> bytes:
        # Grown as bytes arrive, not allocated up front: an announced size costs nothing
        # until the bytes are really sent.
        buf = bytearray()
        while len(buf) < n:
            piece = self.sock.recv(min(n - len(buf), PIECE))
            if not piece:
                raise MirrorError("the peer closed the connection")
            buf += piece
        tag = _recv_bytes(self.sock, _TAG)
        self._verify(b"M", tag, buf)
        return bytes(buf)

    # -- a snapshot's bytes: pieces of every chunk, sizes from the manifest -------------------
    def send_data(
        self, m: Manifest, view: View, chunks: Sequence[ChunkEntry], throttle: Throttle | None = None
    ) -> int:
        """Send ``chunks`` of ``m`` (both sides agree which: see ``carried``) from
        ``view(at, n)``; returns the bytes sent."""
        sent = 0
        for c in chunks:
            for off in range(0, c.nbytes, PIECE):
                n = min(PIECE, c.nbytes - off)
                if throttle is not None:
                    throttle.wait(n)
                piece = view(c.at + off, n)
                tag = self._tag(b"D", piece)
                self.sock.sendall(piece)
                self.sock.sendall(tag)
                sent += n
                hooks.fire("mirror.piece", step=m.step, sent=sent)
        return sent

    def recv_data(self, m: Manifest, view: View, chunks: Sequence[ChunkEntry]) -> int:
        """Receive ``chunks`` of ``m`` into ``view(at, n)``, verifying each piece's tag as it
        lands.  Raises :class:`FrameAuthError` (with the bytes still on the way) on a bad tag."""
        total = sum(c.nbytes + _TAG * -(-c.nbytes // PIECE) for c in chunks)
        got = 0
        for c in chunks:
            for off in range(0, c.nbytes, PIECE):
                n = min(PIECE, c.nbytes - off)
                dst = view(c.at + off, n)
                _recv_exact(self.sock, dst)
                tag = _recv_bytes(self.sock, _TAG)
                got += n + _TAG
                try:
                    self._verify(b"D", tag, dst)
                except MirrorAuthError as exc:
                    raise FrameAuthError(str(exc), total - got) from None
        return sum(c.nbytes for c in chunks)


View = Callable[[int, int], memoryview]


def client_handshake(sock: socket.socket, secret: bytes, deadline: float) -> Channel:
    """Authenticate the server, then ourselves; nothing but our nonce is sent before the
    server proved the secret."""
    nc = secrets.token_bytes(_NONCE)
    sock.sendall(_MAGIC + nc)
    if _recv_bytes(sock, len(_MAGIC), deadline) != _MAGIC:
        raise MirrorAuthError("the mirror peer does not speak flashckpt-mirror/2")
    ns = _recv_bytes(sock, _NONCE, deadline)
    proof = _recv_bytes(sock, _PROOF, deadline)
    if not hmac.compare_digest(proof, _derive(secret, b"server proof", nc, ns)):
        raise MirrorAuthError("the mirror peer did not prove the job's secret")
    sock.sendall(_derive(secret, b"client proof", nc, ns))
    verdict = _recv_bytes(sock, len(_OK), deadline)
    if verdict != _OK:
        raise MirrorAuthError("the mirror peer refused the job's secret")
    return Channel(sock, _derive(secret, b"session key", nc, ns), client=True)


def server_handshake(sock: socket.socket, secret: bytes, deadline: float) -> Channel:
    """Prove the secret to the client (bound to its nonce and ours), then check its proof."""
    hello = _recv_bytes(sock, len(_MAGIC) + _NONCE, deadline)
    if not hmac.compare_digest(hello[: len(_MAGIC)], _MAGIC):
        raise MirrorAuthError("not a flashckpt-mirror/2 client")
    nc, ns = hello[len(_MAGIC) :], secrets.token_bytes(_NONCE)
    sock.sendall(_MAGIC + ns + _derive(secret, b"server proof", nc, ns))
    proof = _recv_bytes(sock, _PROOF, deadline)
    if not hmac.compare_digest(proof, _derive(secret, b"client proof", nc, ns)):
        with contextlib.suppress(OSError):
            sock.sendall(_REFUSED)
        raise MirrorAuthError("wrong secret")
    sock.sendall(_OK)
    return Channel(sock, _derive(secret, b"session key", nc, ns), client=False)


def decode_pushed(data: bytes, what: str) -> Manifest:
    from flashckpt.format import decode_manifest

    m = decode_manifest(data, f"mirrored manifest of {what}")
    if not m.sealed:
        raise CorruptCheckpointError(f"mirrored manifest of {what} carries no checksums")
    check_memory_manifest(m, f"mirrored manifest of {what}", parts=True)
    return m


def wanted(m: Manifest, want: Sequence[tuple[int, int]] | None) -> list[ChunkEntry]:
    """The chunks of ``m`` a fetch (``want``) gets: both sides of a ``get`` compute them so.
    Raises :class:`CorruptCheckpointError` if a wanted one is not carried."""
    held = carried(m)
    if want is None:
        return held
    by = {(c.offset, c.nbytes): c for c in held}
    missing = [w for w in want if (w[0], w[1]) not in by]
    if missing:
        at, n = missing[0]
        raise CorruptCheckpointError(f"step {m.step} of rank {m.rank}: no chunk of {n} bytes at {at} here")
    return [by[(o, n)] for o, n in sorted({(int(o), int(n)) for o, n in want})]


def refusal(error: str) -> dict[str, Any]:
    return {"ok": False, "error": error[:500]}


def send_quietly(ch: Channel, obj: dict[str, Any]) -> None:
    """Best effort: tell the peer why its connection is about to be dropped."""
    with contextlib.suppress(OSError, FlashCkptError):
        ch.send_header(obj)


def drain(sock: socket.socket, n: int, deadline: float) -> None:
    """Read and discard up to ``n`` bytes until ``deadline``: a socket closed with unread
    bytes resets the connection, and the peer would never read our last answer."""
    buf = bytearray(min(max(n, 1), PIECE))
    with contextlib.suppress(OSError):
        while n > 0:
            left = deadline - time.monotonic()
            if left <= 0:
                return
            sock.settimeout(left)
            k = sock.recv_into(buf, min(n, len(buf)))
            if k == 0:
                return
            n -= k
