"""Mirror: copies of ranks' staged snapshots in peers' memory, over an authenticated TCP stream.

Each rank of a multi-node job runs a :class:`MirrorServer` (thread ``flashckpt-mirror-server``,
one handler thread per connection) on the address its peers are told (:func:`default_host`).
Its address and a per-job secret are exchanged through the job's own collectives at
construction.  Both ends of a connection prove that they know the secret before anything else
is sent, and every frame after that carries a MAC (protocol below).  Two requests:

* ``put``: a peer pushes its sealed snapshot (manifest + the slot's bytes).  It lands in this
  rank's memory tier, ``<rank dir>/mirrors/<owner shard>/``, in two slots of the same kind
  and format as the owner's own (the newest two pushes are kept: retention follows the
  owner's steps).  A push is always received into the slot that does *not* hold the newest
  copy, and its manifest (with the owner's checksums) is written only once every byte has
  arrived and every frame verified, so a push that fails midway, or is refused, never costs
  the newest copy.  The bytes are verified against the checksums when a restore loads them,
  not on arrival (a memory pass on the peer's cores per snapshot).
* ``get``: during ``restore``, a rank fetches its shard's snapshot from a mirror held here
  into its own slot.  The fetched snapshot is used only if every frame verified.

A server also serves **orphaned shard directories** of its node: when ranks are renumbered
across nodes between attempts, rank ``r``'s memory (and the mirrors it held) stays in
``<memory root>/r<r>-of-<world>/`` on the node it ran on, where no rank of the new attempt
uses that directory.  During ``restore`` one rank on that node claims it (the directory's
``flock``, which live ranks hold on their own) and serves its snapshots and mirrors like
mirrors; a clean close drops what it served once the owners are durable.

The sender is the owner's persist pipeline (``flashckpt-mirror`` thread), with a bandwidth cap
(``Options.mirror_bytes_per_s``), socket timeouts, and a :class:`MirrorAbort` that the persist
thread triggers when a save needs the slot being sent: it ends a blocked send at once, so a
slow, dead or wedged peer is reported on the ``SaveHandle`` and in ``stats`` and never blocks
the training thread.  A transport for NCCL/RDMA would replace :func:`push` / :func:`fetch`
and keep the rest.

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

At most ``max_preauth`` (16) connections that have not authenticated yet are served at once:
a new one beyond that evicts the oldest (so that a flood of idle connections cannot keep a
peer out), and the handshake has its own short timeout (5 s), independent of
``Options.mirror_timeout_s``.  Refused connections are counted (``MirrorServer.refused``) and
logged once per episode.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import hmac
import json
import logging
import os
import secrets
import shutil
import socket
import struct
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.poly1305 import Poly1305

from flashckpt import _hooks as hooks
from flashckpt._config import Options
from flashckpt._secure import check_private_dir, open_private, private_dir
from flashckpt.backends import LocalBackend
from flashckpt.errors import (
    ConfigError,
    CorruptCheckpointError,
    FlashCkptError,
    StorageError,
    TransientStorageError,
)
from flashckpt.format import (
    MAX_RECORD_BYTES,
    MAX_STEP,
    SHARD_PATTERN,
    SLOT_NAMES,
    Manifest,
    check_memory_manifest,
    encode_manifest,
    memory_manifest,
    memory_manifest_key,
)
from flashckpt.staging.memory_tier import memory_steps, read_memory_manifest
from flashckpt.staging.stager import Slot, check_fits
from flashckpt.transfer.reader import verify_chunks

log = logging.getLogger(__name__)

_MAGIC = b"flashckpt-mirror/2"
_NONCE = 32
_PROOF = 32  # HMAC-SHA256
_TAG = 16  # Poly1305
_OK, _REFUSED = b"auth-ok\n", b"refused\n"
_HEADER = struct.Struct("!I")
_MAX_HEADER = 1 << 20
_PIECE = 4 << 20  # send / receive granularity (also the bandwidth cap's tick), one tag each
_C2S, _S2C = b"\x01", b"\x02"  # frame directions: separate counters, separate one-time keys
#: Handshake bound of a server (seconds, whole handshake): a connection that has not proved
#: the secret by then is dropped, however slowly it trickles bytes.
HANDSHAKE_TIMEOUT_S = 5.0
#: Connections served at once that have not authenticated yet.
MAX_PREAUTH = 16


class MirrorAuthError(FlashCkptError, PermissionError):
    """A mirror peer did not prove it knows the job's secret (or refused our proof), or a
    frame failed authentication: altered in transit, or not sent by the authenticated peer."""


class MirrorError(TransientStorageError):
    """A mirror transfer failed: the peer is gone, slow beyond the timeout, or refused."""


class _FrameAuthError(MirrorAuthError):
    """A data piece failed its tag; ``unread`` bytes of the transfer are still on the way."""

    def __init__(self, message: str, unread: int) -> None:
        super().__init__(message)
        self.unread = unread


# -- placement ----------------------------------------------------------------------------------


def mirror_peers(nodes: list[str], rank: int, k: int) -> list[int]:
    """The ranks that hold ``rank``'s mirrors: one on each of the ``k`` nodes after its own
    (in sorted node order), at the same position among that node's ranks.  Stable across steps
    and attempts; never on the rank's own node, so one node's loss never takes a shard and all
    of its copies."""
    names = sorted(set(nodes))
    by_node = {n: [r for r, m in enumerate(nodes) if m == n] for n in names}
    mine = nodes[rank]
    pos = by_node[mine].index(rank)
    i = names.index(mine)
    out = []
    for j in range(1, min(k, len(names) - 1) + 1):
        ranks = by_node[names[(i + j) % len(names)]]
        out.append(ranks[pos % len(ranks)])
    return out


# -- wire ---------------------------------------------------------------------------------------


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
        n = sock.recv_into(view[got:], min(len(view) - got, _PIECE))
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


class _Channel:
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
        self.sock.sendall(_HEADER.pack(len(data)) + data + self._tag(b"H", data))

    def recv_header(self) -> dict[str, Any]:
        (n,) = _HEADER.unpack(_recv_bytes(self.sock, _HEADER.size))
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
            piece = self.sock.recv(min(n - len(buf), _PIECE))
            if not piece:
                raise MirrorError("the peer closed the connection")
            buf += piece
        tag = _recv_bytes(self.sock, _TAG)
        self._verify(b"M", tag, buf)
        return bytes(buf)

    # -- a snapshot's bytes: pieces of every chunk, sizes from the manifest -------------------
    def send_data(self, m: Manifest, view: View, throttle: _Throttle | None = None) -> int:
        """Send every chunk of ``m`` from ``view(at, n)``; returns the bytes sent."""
        sent = 0
        for c in m.chunks:
            for off in range(0, c.nbytes, _PIECE):
                n = min(_PIECE, c.nbytes - off)
                if throttle is not None:
                    throttle.wait(n)
                piece = view(c.at + off, n)
                tag = self._tag(b"D", piece)
                self.sock.sendall(piece)
                self.sock.sendall(tag)
                sent += n
                hooks.fire("mirror.piece", step=m.step, sent=sent)
        return sent

    def recv_data(self, m: Manifest, view: View) -> int:
        """Receive every chunk of ``m`` into ``view(at, n)``, verifying each piece's tag as it
        lands.  Raises :class:`_FrameAuthError` (with the bytes still on the way) on a bad tag."""
        total = sum(c.nbytes + _TAG * -(-c.nbytes // _PIECE) for c in m.chunks)
        got = 0
        for c in m.chunks:
            for off in range(0, c.nbytes, _PIECE):
                n = min(_PIECE, c.nbytes - off)
                dst = view(c.at + off, n)
                _recv_exact(self.sock, dst)
                tag = _recv_bytes(self.sock, _TAG)
                got += n + _TAG
                try:
                    self._verify(b"D", tag, dst)
                except MirrorAuthError as exc:
                    raise _FrameAuthError(str(exc), total - got) from None
        return sum(c.nbytes for c in m.chunks)


View = Callable[[int, int], memoryview]


def _client_handshake(sock: socket.socket, secret: bytes, deadline: float) -> _Channel:
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
    return _Channel(sock, _derive(secret, b"session key", nc, ns), client=True)


def _server_handshake(sock: socket.socket, secret: bytes, deadline: float) -> _Channel:
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
    return _Channel(sock, _derive(secret, b"session key", nc, ns), client=False)


class MirrorAbort(threading.Event):
    """Ends the :func:`push` calls given it, at once.  ``set()`` may be called from any
    thread (the persist thread, when a save waits for the slot being sent): it shuts down the
    sockets of the pushes in flight, so that a send blocked on a peer that stopped reading
    returns now, not after ``Options.mirror_timeout_s``; pushes that start later fail at
    once.  A fresh one per snapshot (it is never cleared while a push may still look at it)."""

    def __init__(self) -> None:
        super().__init__()
        self._guard = threading.Lock()
        self._socks: set[socket.socket] = set()

    def set(self) -> None:
        # Under the lock: a socket is removed before it is closed, so shutdown never reaches
        # a closed socket whose descriptor number was reused.
        with self._guard:
            super().set()
            for sock in self._socks:
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)

    @contextlib.contextmanager
    def watching(self, sock: socket.socket) -> Iterator[None]:
        with self._guard:
            if self.is_set():
                raise MirrorError(_ABANDONED)
            self._socks.add(sock)
        try:
            yield
        finally:
            with self._guard:
                self._socks.discard(sock)


_ABANDONED = "abandoned: a newer snapshot needed the slot (the mirror is behind)"


class _Throttle:
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
            raise MirrorError(_ABANDONED)


@contextlib.contextmanager
def _open(
    addr: tuple[str, int], secret: bytes, timeout: float, abort: threading.Event | None
) -> Iterator[_Channel]:
    """An authenticated channel to ``addr``; the socket is registered with ``abort`` (a
    :class:`MirrorAbort`) from before the connect until it is closed."""
    family, kind, proto, _, sockaddr = socket.getaddrinfo(addr[0], addr[1], type=socket.SOCK_STREAM)[0]
    sock = socket.socket(family, kind, proto)
    try:
        watch = abort.watching(sock) if isinstance(abort, MirrorAbort) else contextlib.nullcontext()
        with watch:
            if abort is not None and abort.is_set():
                raise MirrorError(_ABANDONED)
            sock.settimeout(timeout)
            sock.connect(sockaddr)
            if abort is not None and abort.is_set():  # set while connecting: no shutdown reached us
                raise MirrorError(_ABANDONED)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            ch = _client_handshake(sock, secret, time.monotonic() + timeout)
            sock.settimeout(timeout)
            yield ch
    finally:
        sock.close()


def _check_reply(reply: dict[str, Any], what: str) -> None:
    if reply.get("ok") is True:
        return
    error = str(reply.get("error"))[:500]
    if reply.get("auth") is True:  # the peer saw one of our frames fail its tag
        raise MirrorAuthError(f"{what}: the peer could not authenticate our frames: {error}")
    raise MirrorError(f"refused by the peer: {error}")  # (the caller adds what was refused)


# -- the client side ------------------------------------------------------------------------------


def push(
    addr: tuple[str, int],
    secret: bytes,
    owner: str,
    m: Manifest,
    view: Callable[[int, int], memoryview],
    opts: Options,
    abort: threading.Event | None = None,
) -> int:
    """Send the sealed snapshot ``m`` (a memory manifest; bytes through ``view(at, n)``) to
    the peer at ``addr``.  Any thread (the ``flashckpt-mirror`` thread).  Returns the bytes
    sent; raises :class:`MirrorError` (also when ``abort`` is set: a :class:`MirrorAbort`
    ends even a blocked send at once, a plain event between pieces) / :class:`MirrorAuthError`."""
    what = f"mirror push of step {m.step} to {addr[0]}:{addr[1]}"
    if not m.sealed:
        raise CorruptCheckpointError(f"{what}: only sealed snapshots are mirrored")
    check_memory_manifest(m, what)
    data = encode_manifest(m)
    try:
        with _open(addr, secret, opts.mirror_timeout_s, abort) as ch:
            ch.send_header({"op": "put", "shard": owner, "step": m.step, "manifest": len(data)})
            _check_reply(ch.recv_header(), what)
            ch.send_blob(data)
            _check_reply(ch.recv_header(), what)  # room made for it: send the bytes
            sent = ch.send_data(m, view, _Throttle(opts.mirror_bytes_per_s, abort))
            _check_reply(ch.recv_header(), what)
    except MirrorAuthError:
        raise
    except OSError as exc:
        if abort is not None and abort.is_set():
            raise MirrorError(f"{what} {_ABANDONED}") from exc
        raise MirrorError(f"{what} failed: {exc}") from exc
    return sent


def fetch(
    addr: tuple[str, int],
    secret: bytes,
    shard: str,
    step: int,
    into: Callable[[Manifest], Callable[[int, int], memoryview]],
    opts: Options,
) -> Manifest:
    """Fetch ``shard``'s snapshot of ``step`` from the peer at ``addr``.  ``into(manifest)``
    returns where its bytes go (``view(at, n)``, after mapping a slot big enough).  Returns
    only once every frame verified (else :class:`MirrorAuthError`; what landed in ``into``'s
    memory must then be treated as overwritten).  The caller verifies the bytes against the
    returned manifest's checksums.  Training thread (``restore``)."""
    what = f"fetching step {step} of {shard} from {addr[0]}:{addr[1]}"
    try:
        with _open(addr, secret, opts.mirror_timeout_s, None) as ch:
            ch.send_header({"op": "get", "shard": shard, "step": step})
            reply = ch.recv_header()
            if reply.get("ok") is not True and reply.get("auth") is not True:
                raise MirrorError(f"mirror peer {addr[0]}:{addr[1]} has no step {step} of {shard}")
            _check_reply(reply, what)
            n = reply.get("manifest")
            if type(n) is not int or not 0 < n <= MAX_RECORD_BYTES:
                raise MirrorError(f"{what}: bad reply")
            m = _decode(ch.recv_blob(n), f"{shard} step {step} from {addr[0]}:{addr[1]}")
            if m.step != step:  # (the caller checks the shard: rank and world size)
                raise CorruptCheckpointError(f"{what}: the peer sent step {m.step}")
            ch.recv_data(m, into(m))
    except _FrameAuthError as exc:  # (the bytes still on the way are of no use to us)
        raise MirrorAuthError(f"{what}: {exc}") from None
    except MirrorAuthError:
        raise
    except OSError as exc:
        raise MirrorError(f"{what} failed: {exc}") from exc
    return m


def _decode(data: bytes, what: str) -> Manifest:
    from flashckpt.format import decode_manifest

    m = decode_manifest(data, f"mirrored manifest of {what}")
    if not m.sealed:
        raise CorruptCheckpointError(f"mirrored manifest of {what} carries no checksums")
    check_memory_manifest(m, f"mirrored manifest of {what}")
    return m


def _refusal(error: str) -> dict[str, Any]:
    return {"ok": False, "error": error[:500]}


# -- the server side ------------------------------------------------------------------------------


class _MirrorSlots:
    """The two slots and the manifests of one owner's mirrored snapshots on this rank (or of
    an orphaned shard directory's own snapshots).  ``lock`` is held for a whole transfer;
    ``steps()`` and the slots' ``step`` change only under it.

    Invariants: the steps the slots hold differ, and a slot's ``step`` has a manifest (one
    per step, ``step-<n>.manifest``) that names that slot."""

    def __init__(self, directory: Path) -> None:
        # created 0700 (or checked: ours, not a link, private) below the rank's own directory
        directory = private_dir(directory, trusted_above=directory.parent.parent)
        self.directory = directory
        self.backend = LocalBackend(directory, fsync=False, direct_io=False, private=True, durable=False)
        # a peer's snapshots never go to a GPU from here: never page-locked
        self.slots = [Slot(directory, i, pin=False) for i in range(len(SLOT_NAMES))]
        self.lock = threading.Lock()  # one transfer at a time per owner
        #: (generation, step) of the snapshot each held slot has, by slot index: the newest is
        #: the largest (a run continued from an older step is newer than the steps it left).
        self.order: dict[int, tuple[int, int]] = {}
        for s in self.slots:
            s.adopt()
        for step in memory_steps(self.backend):
            key = memory_manifest_key(step)
            try:
                m = read_memory_manifest(self.backend, step)
                slot = self.slots[SLOT_NAMES.index(check_memory_manifest(m, f"{directory}/{key}"))]
                check_memory_manifest(m, f"{directory}/{key}", capacity=slot.capacity)
            except (CorruptCheckpointError, StorageError) as exc:
                log.warning("flashckpt: dropping the unusable mirror manifest %s/%s: %s", directory, key, exc)
                self.backend.delete(key)
                continue
            # Two manifests naming one slot: only one can describe its bytes.  flashckpt never
            # leaves that behind; keep the newer one held and the other file as it is.
            if slot.step is not None and self.order[slot.index] >= m.order:
                continue
            slot.step, self.order[slot.index] = step, m.order

    def steps(self) -> list[int]:
        """The steps held here (oldest first)."""
        return sorted(s.step for s in self.slots if s.step is not None)

    def slot_for_put(self) -> Slot:
        """The slot to receive a push into: never the one holding the newest copy."""
        held = [s for s in self.slots if s.step is not None]
        if len(held) < len(self.slots):
            return next(s for s in self.slots if s.step is None)
        newest = max(held, key=lambda s: self.order[s.index])
        return next(s for s in self.slots if s is not newest)

    def forget(self, slot: Slot) -> None:
        """``slot``'s snapshot is about to be overwritten: delete its manifest first."""
        if slot.step is not None:
            self.backend.delete(memory_manifest_key(slot.step))
        slot.step = None
        self.order.pop(slot.index, None)

    def hold(self, slot: Slot, m: Manifest) -> None:
        """The manifest of ``m``, naming ``slot``, is written: ``slot`` holds it.  Another
        slot that held the same step number (a re-push) held it under the manifest just
        replaced: it holds nothing now."""
        for s in self.slots:
            if s is not slot and s.step == m.step:
                s.step = None
                self.order.pop(s.index, None)
        slot.step, self.order[slot.index] = m.step, m.order

    def close(self) -> None:
        for s in self.slots:
            s.release_mapping()


def _send_quietly(ch: _Channel, obj: dict[str, Any]) -> None:
    """Best effort: tell the peer why its connection is about to be dropped."""
    with contextlib.suppress(OSError, FlashCkptError):
        ch.send_header(obj)


def _drain(sock: socket.socket, n: int, deadline: float) -> None:
    """Read and discard up to ``n`` bytes until ``deadline``: a socket closed with unread
    bytes resets the connection, and the peer would never read our last answer."""
    buf = bytearray(min(max(n, 1), _PIECE))
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


class _Orphan:
    """A shard directory of this node that no rank of this attempt uses, claimed (locked) by
    this rank's server: the snapshots its rank left, and the mirrors it held for others."""

    def __init__(self, directory: Path, fd: int) -> None:
        self.directory = directory
        self.fd = fd
        self.own = _MirrorSlots(directory)
        mirrors = directory / "mirrors"
        self.mirrors = {
            d.name: _MirrorSlots(d)
            for d in (sorted(mirrors.iterdir()) if mirrors.is_dir() else [])
            if d.is_dir() and SHARD_PATTERN.fullmatch(d.name)
        }

    def empty(self) -> bool:
        return not self.own.steps() and not self.mirrors

    def storages(self) -> set[str]:
        """The storage tiers the snapshots held here were saved for (non-empty ids)."""
        out = set()
        for ms in [self.own, *self.mirrors.values()]:
            for step in ms.steps():
                try:
                    m = read_memory_manifest(ms.backend, step)
                except (CorruptCheckpointError, StorageError):
                    continue
                if m.storage:
                    out.add(m.storage)
        return out

    def drop_own(self) -> None:
        """Delete the snapshots the shard's rank left here (the slots and their manifests)."""
        with self.own.lock:
            self.own.close()
            for s in self.own.slots:
                self.own.forget(s)
                s.path.unlink(missing_ok=True)
            for step in memory_steps(self.own.backend):  # manifests no slot held (none expected)
                self.own.backend.delete(memory_manifest_key(step))

    def close(self) -> None:
        self.own.close()
        for ms in self.mirrors.values():
            ms.close()
        os.close(self.fd)


class MirrorServer:
    """Serves ``put`` and ``get`` for one rank, on ``host`` (default :func:`default_host`, the
    address peers are told; not every interface).  Created on the training thread; its
    threads are daemons, and :meth:`close` ends their connections and joins them.

    ``handshake_timeout_s`` (default :data:`HANDSHAKE_TIMEOUT_S`) bounds a connection's whole
    handshake; ``max_preauth`` (default :data:`MAX_PREAUTH`) bounds the connections served at
    once that have not authenticated (each has a thread)."""

    def __init__(
        self,
        rank_dir: Path,
        secret: bytes,
        opts: Options,
        host: str | None = None,
        *,
        handshake_timeout_s: float | None = None,
        max_preauth: int | None = None,
    ) -> None:
        self.rank_dir = rank_dir
        self.root = rank_dir / "mirrors"
        self.secret = secret
        self.opts = opts
        self.host = default_host() if host is None else host
        self._handshake_timeout_s = (
            HANDSHAKE_TIMEOUT_S if handshake_timeout_s is None else handshake_timeout_s
        )
        self._max_preauth = max(1, MAX_PREAUTH if max_preauth is None else max_preauth)
        self._owners: dict[str, _MirrorSlots] = {}
        self._orphans: dict[str, _Orphan] = {}
        self._lock = threading.Lock()
        self._hash_pool: ThreadPoolExecutor | None = None
        # Live connections and their threads; those still in their handshake, with the time
        # they were accepted, and those of them already shut down to make room.  A connection
        # leaves these (under ``_conns_cond``) before its socket is closed, so a shutdown
        # from another thread never reaches a reused descriptor.
        self._conns_cond = threading.Condition(threading.Lock())
        self._conns: dict[socket.socket, threading.Thread] = {}
        self._preauth: dict[socket.socket, float] = {}
        self._evicted: set[socket.socket] = set()
        self._refusing = False  # in a refusal episode (logged once, at its start)
        #: Connections that did not authenticate (bad proof, timeout, evicted, no thread).
        self.refused = 0
        self.received_bytes = 0
        try:
            family, _, _, _, sockaddr = socket.getaddrinfo(
                self.host or None, 0, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
            )[0]
            self._sock = socket.create_server(sockaddr, family=family)
        except OSError as exc:
            raise ConfigError(
                f"the mirror server cannot listen on {self.host!r} (FLASHCKPT_MIRROR_HOST, else the "
                f"host name's address): {exc}"
            ) from exc
        self._sock.settimeout(0.2)
        self.port = int(self._sock.getsockname()[1])
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._accept_loop, name="flashckpt-mirror-server", daemon=True)
        self._thread.start()

    # -- inventory --------------------------------------------------------------------------------
    def holdings(self) -> dict[str, list[int]]:
        """Shard -> steps of it held here: mirrors pushed to this rank (adopting what an
        earlier process left), and the snapshots and mirrors of claimed orphan directories."""
        out: dict[str, set[int]] = {}
        if self.root.is_dir():
            for d in sorted(self.root.iterdir()):
                if d.is_dir() and SHARD_PATTERN.fullmatch(d.name):
                    out.setdefault(d.name, set()).update(self._slots(d.name).steps())
        with self._lock:
            orphans = list(self._orphans.items())
        for shard, o in orphans:
            out.setdefault(shard, set()).update(o.own.steps())
            for owner, ms in o.mirrors.items():
                out.setdefault(owner, set()).update(ms.steps())
        return {k: sorted(v) for k, v in sorted(out.items())}

    def snapshots(self) -> dict[str, list[list[Any]]]:
        """Shard -> ``[generation, step, storage id, run id, ancestors]`` of each valid snapshot held
        here (the restore inventory: a restoring rank filters by run and orders by
        ``(generation, step)``).  Training thread."""
        out: dict[str, list[list[Any]]] = {}
        for shard in self.holdings():
            for ms in self._sources(shard):
                for step in ms.steps():
                    try:
                        m = read_memory_manifest(ms.backend, step)
                        check_memory_manifest(m, f"mirror of {shard} step {step}")
                    except (CorruptCheckpointError, StorageError) as exc:
                        log.debug("flashckpt: mirror of %s step %d unusable: %s", shard, step, exc)
                        continue
                    entry = [m.generation, m.step, m.storage, m.run, [list(a) for a in m.ancestors]]
                    if entry not in out.setdefault(shard, []):
                        out[shard].append(entry)
        return out

    def claim_orphans(self, memory_root: Path, world: int, storage: str = "") -> list[str]:
        """Training thread, in ``restore`` (every live rank has locked its own directory by
        then): lock the shard directories of ``world``-rank jobs under ``memory_root`` that no
        process holds, and serve them.  Returns the shards newly claimed.

        A directory that is not private (ours, not a link, no access for others) or that holds
        snapshots saved for another storage tier than ``storage`` (another job given the same
        ``memory_dir``) is never claimed: a clean close drops what it claimed."""
        claimed = []
        suffix = f"-of-{world:05d}"
        for d in sorted(memory_root.iterdir()) if memory_root.is_dir() else []:
            name = d.name
            if not (SHARD_PATTERN.fullmatch(name) and name.endswith(suffix)) or d == self.rank_dir:
                continue
            with self._lock:
                if name in self._orphans:
                    continue
            try:
                check_private_dir(d)
                fd = open_private(d / "lock", write=True, create=True)
            except (OSError, ConfigError) as exc:
                log.warning("flashckpt: not serving %s: %s", d, exc)
                continue
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:  # a live rank's own directory, or another rank claimed it
                os.close(fd)
                continue
            except OSError as exc:
                os.close(fd)
                log.warning("flashckpt: cannot lock %s: %s", d, exc)
                continue
            try:  # one unreadable leftover must not fail the restore (every rank waits on it)
                orphan = _Orphan(d, fd)
            except Exception as exc:  # logged: the other directories are served  # noqa: BLE001
                os.close(fd)
                log.warning("flashckpt: not serving %s: %s", d, exc)
                continue
            foreign = orphan.storages() - {storage} if storage else set()
            if foreign:
                orphan.close()
                log.warning(
                    "flashckpt: not serving %s: it holds another job's snapshots (%s)", d, sorted(foreign)
                )
                continue
            with self._lock:
                self._orphans[name] = orphan
            claimed.append(name)
            log.info(
                "flashckpt: serving %s, left on this node by a rank that runs elsewhere now: steps %s",
                name,
                orphan.own.steps(),
            )
        return claimed

    def _slots(self, owner: str) -> _MirrorSlots:
        with self._lock:
            ms = self._owners.get(owner)
            if ms is None:
                ms = self._owners[owner] = _MirrorSlots(self.root / owner)
            return ms

    def _sources(self, shard: str) -> list[_MirrorSlots]:
        """Where snapshots of ``shard`` may be held here."""
        out = [self._slots(shard)] if (self.root / shard).is_dir() else []
        with self._lock:
            for name, o in self._orphans.items():
                if name == shard:
                    out.append(o.own)
                if shard in o.mirrors:
                    out.append(o.mirrors[shard])
        return out

    # -- connections ------------------------------------------------------------------------------
    def _accept_loop(self) -> None:
        """Thread ``flashckpt-mirror-server``.  Nothing a peer does ends it; only :meth:`close`."""
        failing = False  # accept() failing (e.g. out of descriptors): logged once per episode
        while not self._stop.is_set():
            try:
                conn, peer = self._sock.accept()
            except TimeoutError:
                continue
            except OSError as exc:
                if self._stop.is_set():
                    return
                if not failing:
                    log.warning("flashckpt: the mirror server cannot accept connections: %s", exc)
                failing = True
                time.sleep(0.1)
                continue
            failing = False
            try:
                self._admit(conn, peer)
            except Exception:  # never let one connection end the server
                log.exception("flashckpt: mirror connection from %s dropped unexpectedly", peer)
                with contextlib.suppress(OSError):
                    conn.close()

    def _admit(self, conn: socket.socket, peer: Any) -> None:
        """Accept thread: serve ``conn`` on its own thread, within the pre-auth bound."""
        with self._conns_cond:
            if len(self._preauth) >= self._max_preauth:
                # Make room: shut the oldest unauthenticated connection down (its thread
                # counts it as refused and exits), rather than refusing the newcomer: a flood
                # of idle connections must not keep a peer that answers at once out.
                waiting = [c for c in self._preauth if c not in self._evicted]
                if waiting:
                    oldest = min(waiting, key=self._preauth.__getitem__)
                    self._evicted.add(oldest)
                    with contextlib.suppress(OSError):
                        oldest.shutdown(socket.SHUT_RDWR)
                self._conns_cond.wait_for(lambda: len(self._preauth) < self._max_preauth, timeout=1.0)
            full = len(self._preauth) >= self._max_preauth or self._stop.is_set()
            if not full:
                thread = threading.Thread(
                    target=self._serve, args=(conn, peer), name="flashckpt-mirror-conn", daemon=True
                )
                self._preauth[conn] = time.monotonic()
                self._conns[conn] = thread
        if full:
            self._refuse(peer, "too many connections awaiting authentication")
            conn.close()
            return
        try:
            thread.start()
        except RuntimeError as exc:  # no thread to be had: the server goes on accepting
            self._forget_conn(conn)
            self._refuse(peer, f"no thread to serve it: {exc}")
            conn.close()

    def _forget_conn(self, conn: socket.socket) -> None:
        """``conn`` leaves the server (before its socket is closed)."""
        with self._conns_cond:
            self._preauth.pop(conn, None)
            self._evicted.discard(conn)
            self._conns.pop(conn, None)
            self._conns_cond.notify_all()

    def _refuse(self, peer: Any, why: object) -> None:
        with self._lock:
            self.refused += 1
            first, self._refusing = not self._refusing, True
        if first:
            log.warning(
                "flashckpt: refused a mirror connection from %s: %s (further refusals are counted "
                "in MirrorServer.refused and not logged until a peer authenticates)",
                peer,
                why,
            )

    def _serve(self, conn: socket.socket, peer: Any) -> None:
        """Thread ``flashckpt-mirror-conn``, one per connection.  Catches everything: a
        handler thread never dies with a traceback, and the server goes on."""
        try:
            ch = self._authenticate(conn, peer)
            if ch is not None:
                conn.settimeout(self.opts.mirror_timeout_s)
                self._request(ch)
        except (OSError, FlashCkptError) as exc:
            log.warning("flashckpt: mirror connection from %s failed: %s", peer, exc)
        except Exception:  # a bug: its traceback goes to the log, and the server goes on
            log.exception("flashckpt: mirror connection from %s failed unexpectedly", peer)
        finally:
            self._forget_conn(conn)
            with contextlib.suppress(OSError):
                conn.close()

    def _authenticate(self, conn: socket.socket, peer: Any) -> _Channel | None:
        """The handshake, within ``handshake_timeout_s``; the channel, or None (refused)."""
        ch: _Channel | None = None
        why: object = "evicted to make room for a newer connection"
        try:
            ch = _server_handshake(conn, self.secret, time.monotonic() + self._handshake_timeout_s)
        except (OSError, FlashCkptError) as exc:
            why = exc
        finally:
            with self._conns_cond:  # out of the pre-auth bound either way
                evicted = conn in self._evicted
                self._preauth.pop(conn, None)
                self._evicted.discard(conn)
                self._conns_cond.notify_all()
        if ch is None or evicted:
            self._refuse(peer, why)
            return None
        with self._lock:
            ended, self._refusing = self._refusing, False
            refused = self.refused
        if ended:
            log.info("flashckpt: a mirror peer authenticated (%d connection(s) refused so far)", refused)
        return ch

    def _request(self, ch: _Channel) -> None:
        try:
            req = ch.recv_header()
        except MirrorAuthError as exc:
            _send_quietly(ch, {"ok": False, "auth": True, "error": str(exc)})
            raise
        op = req.get("op")
        if op == "put":
            self._put(ch, req)
        elif op == "get":
            self._get(ch, req)
        else:
            ch.send_header(_refusal("unknown request"))

    def _put(self, ch: _Channel, req: dict[str, Any]) -> None:
        owner, step, n = req.get("shard"), req.get("step"), req.get("manifest")
        if not (isinstance(owner, str) and SHARD_PATTERN.fullmatch(owner)):
            ch.send_header(_refusal("bad put request"))
            return
        if (
            type(step) is not int
            or not 0 <= step <= MAX_STEP
            or type(n) is not int
            or not 0 < n <= MAX_RECORD_BYTES
        ):
            ch.send_header(_refusal("bad put request"))
            return
        what = f"mirror of {owner} step {step}"
        ch.send_header({"ok": True})  # send the manifest
        try:
            m = _decode(ch.recv_blob(n), what)
            if m.step != step:
                raise CorruptCheckpointError(f"{what}: the manifest is of step {m.step}")
        except MirrorAuthError as exc:
            _send_quietly(ch, {"ok": False, "auth": True, "error": str(exc)})
            raise
        except CorruptCheckpointError as exc:
            ch.send_header(_refusal(str(exc)))
            return
        ms = self._slots(owner)
        with ms.lock:
            # Never the slot with the newest copy: a push that fails from here on costs at
            # most the older copy, whose slot it overwrites.
            slot = ms.slot_for_put()
            try:
                check_fits(m.total_bytes, ms.directory, what)
            except OSError as exc:  # refused before anything held here is touched
                ch.send_header(_refusal(str(exc)))
                return
            try:  # growing a slot keeps its bytes: the older copy is intact if this fails
                slot.ensure(m.total_bytes)
            except OSError as exc:
                ch.send_header(_refusal(f"{what}: cannot map {m.total_bytes} bytes: {exc}"))
                return
            ms.forget(slot)  # its bytes are overwritten from here on
            ch.send_header({"ok": True, "ready": True})
            try:
                got = ch.recv_data(m, slot.view)
            except _FrameAuthError as exc:
                # Tell the client why, after taking in what it still sends (bounded), so that
                # it reads the answer instead of a reset connection.
                _send_quietly(ch, {"ok": False, "auth": True, "error": str(exc)})
                _drain(ch.sock, exc.unread, time.monotonic() + self._handshake_timeout_s)
                raise
            # Not checksummed here (a memory pass per snapshot, on the peer's cores): the
            # manifest carries the checksums and every restore verifies every byte it loads.
            # Lineage fields (generation, storage, run) pass through unchanged.
            local = memory_manifest(m, slot.name)
            check_memory_manifest(local, what, capacity=slot.capacity)
            ms.backend.put(memory_manifest_key(step), encode_manifest(local))
            ms.hold(slot, local)
        with self._lock:
            self.received_bytes += got
        ch.send_header({"ok": True})

    def _get(self, ch: _Channel, req: dict[str, Any]) -> None:
        shard, step = req.get("shard"), req.get("step")
        if not (isinstance(shard, str) and SHARD_PATTERN.fullmatch(shard)) or type(step) is not int:
            ch.send_header(_refusal("bad get request"))
            return
        for ms in self._sources(shard):
            with ms.lock:
                slot = next((s for s in ms.slots if s.step == step), None)
                if slot is None or not slot.mapped:
                    continue
                what = f"{ms.directory}/{memory_manifest_key(step)}"
                try:
                    m = read_memory_manifest(ms.backend, step)
                    if check_memory_manifest(m, what, capacity=slot.capacity) != slot.name:
                        raise CorruptCheckpointError(f"{what} does not name {slot.name}")
                    if not m.sealed:  # an orphan's snapshot whose rank died before checksumming it
                        m = verify_chunks(m, slot.view, self._pool(), str(ms.directory))
                        ms.backend.put(memory_manifest_key(step), encode_manifest(m))
                except (CorruptCheckpointError, StorageError) as exc:
                    log.warning("flashckpt: not serving %s: %s", what, exc)
                    continue
                data = encode_manifest(m)
                ch.send_header({"ok": True, "manifest": len(data)})
                ch.send_blob(data)
                ch.send_data(m, slot.view)
                return
        ch.send_header(_refusal("not here"))

    def _pool(self) -> ThreadPoolExecutor:
        with self._lock:
            if self._hash_pool is None:
                n = max(1, self.opts.hash_threads)
                self._hash_pool = ThreadPoolExecutor(n, thread_name_prefix="flashckpt-mirror-hash")
            return self._hash_pool

    # -- lifetime ---------------------------------------------------------------------------------
    def drop(self, owner: str | None = None) -> None:
        """Delete the snapshots of ``owner`` (default: all) held here, mirrors and orphaned
        ones: their owner is durable.  An orphan directory left empty is removed."""
        with self._lock:
            for name in [owner] if owner is not None else list(self._owners):
                ms = self._owners.pop(name, None)
                if ms is not None:
                    ms.close()
            orphans = list(self._orphans.items())
        shutil.rmtree(self.root if owner is None else self.root / owner, ignore_errors=True)
        try:
            self.root.rmdir()
        except OSError:
            pass
        for name, o in orphans:
            if owner is None or name == owner:
                o.drop_own()
            with self._lock:  # the serving threads look these up
                held = [owner] if owner is not None else list(o.mirrors)
                gone = [o.mirrors.pop(h) for h in held if h in o.mirrors]
            for ms in gone:
                with ms.lock:
                    ms.close()
                shutil.rmtree(ms.directory, ignore_errors=True)
            if o.empty():
                with self._lock:
                    self._orphans.pop(name, None)
                shutil.rmtree(o.directory, ignore_errors=True)
                o.close()

    def close(self) -> None:
        """Training thread: stop serving, end the connections in flight and join their
        threads (bounded); orphan directories still held are unlocked and kept for the next
        attempt."""
        self._stop.set()
        self._sock.close()
        self._thread.join(timeout=5)
        with self._conns_cond:
            conns = dict(self._conns)
            for conn in conns:  # under the lock: a connection leaves it before it is closed
                with contextlib.suppress(OSError):
                    conn.shutdown(socket.SHUT_RDWR)
        deadline = time.monotonic() + 5
        for thread in conns.values():
            if thread.ident is not None:
                thread.join(timeout=max(0.0, deadline - time.monotonic()))
        with self._lock:
            for ms in self._owners.values():
                ms.close()
            for o in self._orphans.values():
                o.close()
            self._orphans.clear()
            pool, self._hash_pool = self._hash_pool, None
        if pool is not None:
            pool.shutdown(wait=True)


def default_host() -> str:
    """The address peers reach this rank's mirror server at: ``FLASHCKPT_MIRROR_HOST``, else
    the address the host name resolves to."""
    host = os.environ.get("FLASHCKPT_MIRROR_HOST")
    if host:
        return host
    try:
        return socket.gethostbyname(socket.gethostname())
    except OSError:
        return "127.0.0.1"
