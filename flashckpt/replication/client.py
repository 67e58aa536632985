"""The client side of a mirror: :func:`push` a sealed snapshot to a peer, :func:`fetch` this
rank's shard back from one.

The sender is the owner's persist pipeline (``flashckpt-mirror`` thread), with a bandwidth cap
(``Options.mirror_bytes_per_s``), socket timeouts, and a :class:`MirrorAbort` that the persist
thread triggers when a save needs the slot being sent: it ends a blocked send at once, so a
slow, dead or wedged peer is reported on the ``SaveHandle`` and in ``stats`` and never blocks
the training thread.  A transport for NCCL/RDMA would replace :func:`push` / :func:`fetch`
and keep the rest.
"""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any

from flashckpt._config import Options
from flashckpt.errors import CorruptCheckpointError
from flashckpt.format import MAX_RECORD_BYTES, Manifest, carried, check_memory_manifest, encode_manifest
from flashckpt.replication.wire import (
    ABANDONED,
    Channel,
    FrameAuthError,
    MirrorAuthError,
    MirrorError,
    Throttle,
    client_handshake,
    decode_pushed,
    wanted,
)


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
                raise MirrorError(ABANDONED)
            self._socks.add(sock)
        try:
            yield
        finally:
            with self._guard:
                self._socks.discard(sock)


@contextlib.contextmanager
def _open(
    addr: tuple[str, int], secret: bytes, timeout: float, abort: threading.Event | None
) -> Iterator[Channel]:
    """An authenticated channel to ``addr``; the socket is registered with ``abort`` (a
    :class:`MirrorAbort`) from before the connect until it is closed."""
    family, kind, proto, _, sockaddr = socket.getaddrinfo(addr[0], addr[1], type=socket.SOCK_STREAM)[0]
    sock = socket.socket(family, kind, proto)
    try:
        watch = abort.watching(sock) if isinstance(abort, MirrorAbort) else contextlib.nullcontext()
        with watch:
            if abort is not None and abort.is_set():
                raise MirrorError(ABANDONED)
            sock.settimeout(timeout)
            sock.connect(sockaddr)
            if abort is not None and abort.is_set():  # set while connecting: no shutdown reached us
                raise MirrorError(ABANDONED)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            ch = client_handshake(sock, secret, time.monotonic() + timeout)
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
    the peer at ``addr``: the chunks its slot holds (``carried``; a chunk it leaves to a rank
    of its node is that rank's to send).  Any thread (the ``flashckpt-mirror`` thread).  Returns the bytes
    sent; raises :class:`MirrorError` (also when ``abort`` is set: a :class:`MirrorAbort`
    ends even a blocked send at once, a plain event between pieces) / :class:`MirrorAuthError`."""
    what = f"mirror push of step {m.step} to {addr[0]}:{addr[1]}"
    if not m.sealed:
        raise CorruptCheckpointError(f"{what}: only sealed snapshots are mirrored")
    check_memory_manifest(m, what, parts=True)
    data = encode_manifest(m)
    try:
        with _open(addr, secret, opts.mirror_timeout_s, abort) as ch:
            ch.send_header({"op": "put", "shard": owner, "step": m.step, "manifest": len(data)})
            _check_reply(ch.recv_header(), what)
            ch.send_blob(data)
            _check_reply(ch.recv_header(), what)  # room made for it: send the bytes
            sent = ch.send_data(m, view, carried(m), Throttle(opts.mirror_bytes_per_s, abort))
            _check_reply(ch.recv_header(), what)
    except MirrorAuthError:
        raise
    except OSError as exc:
        if abort is not None and abort.is_set():
            raise MirrorError(f"{what} {ABANDONED}") from exc
        raise MirrorError(f"{what} failed: {exc}") from exc
    return sent


def fetch(
    addr: tuple[str, int],
    secret: bytes,
    shard: str,
    step: int,
    into: Callable[[Manifest], Callable[[int, int], memoryview]],
    opts: Options,
    want: Sequence[tuple[int, int]] | None = None,
) -> Manifest:
    """Fetch ``shard``'s snapshot of ``step`` from the peer at ``addr``: its manifest, and
    the bytes of the chunks the copy there holds (``carried``: a copy may leave chunks to
    the mirrors of its rank's node-mates), only those at ``want`` (``(offset, size)`` pairs,
    which the peer refuses unless it holds each) if given.  ``into(manifest)`` returns where
    the bytes go (``view(at, n)``, after mapping a slot big enough).  Returns only once every
    frame verified (else :class:`MirrorAuthError`; what landed in ``into``'s memory must then
    be treated as overwritten).  The caller verifies the bytes against the checksums of the
    manifest it trusts.  Training thread (``restore``)."""
    what = f"fetching step {step} of {shard} from {addr[0]}:{addr[1]}"
    req: dict[str, Any] = {"op": "get", "shard": shard, "step": step}
    if want is not None:
        req["want"] = [[int(o), int(n)] for o, n in want]
    try:
        with _open(addr, secret, opts.mirror_timeout_s, None) as ch:
            ch.send_header(req)
            reply = ch.recv_header()
            if reply.get("ok") is not True and reply.get("auth") is not True:
                raise MirrorError(f"mirror peer {addr[0]}:{addr[1]} has no step {step} of {shard}")
            _check_reply(reply, what)
            n = reply.get("manifest")
            if type(n) is not int or not 0 < n <= MAX_RECORD_BYTES:
                raise MirrorError(f"{what}: bad reply")
            m = decode_pushed(ch.recv_blob(n), f"{shard} step {step} from {addr[0]}:{addr[1]}")
            if m.step != step:  # (the caller checks the shard: rank and world size)
                raise CorruptCheckpointError(f"{what}: the peer sent step {m.step}")
            ch.recv_data(m, into(m), wanted(m, want))
    except FrameAuthError as exc:  # (the bytes still on the way are of no use to us)
        raise MirrorAuthError(f"{what}: {exc}") from None
    except MirrorAuthError:
        raise
    except OSError as exc:
        raise MirrorError(f"{what} failed: {exc}") from exc
    return m
