"""The server side of a mirror: one :class:`MirrorServer` per rank of a multi-node job.

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

What it holds (the mirrors peers pushed here, and the orphaned shard directories of this
node it serves) is :class:`~flashckpt.replication.holdings.Holdings`'s; the wire is
:mod:`flashckpt.replication.wire`'s.

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
import logging
import socket
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from flashckpt._config import Options
from flashckpt.errors import ConfigError, CorruptCheckpointError, FlashCkptError, StorageError
from flashckpt.format import (
    MAX_RECORD_BYTES,
    MAX_STEP,
    SHARD_PATTERN,
    carried,
    encode_manifest,
    memory_manifest,
    memory_manifest_key,
    part_holders,
)
from flashckpt.replication.holdings import Holdings
from flashckpt.replication.placement import default_host
from flashckpt.replication.wire import (
    Channel,
    FrameAuthError,
    MirrorAuthError,
    decode_pushed,
    drain,
    refusal,
    send_quietly,
    server_handshake,
    wanted,
)
from flashckpt.staging.memory_tier import PartsReader
from flashckpt.staging.stager import check_fits
from flashckpt.transfer.reader import verify_chunks

log = logging.getLogger(__name__)

#: Handshake bound of a server (seconds, whole handshake): a connection that has not proved
#: the secret by then is dropped, however slowly it trickles bytes.
HANDSHAKE_TIMEOUT_S = 5.0
#: Connections served at once that have not authenticated yet.
MAX_PREAUTH = 16


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
        self.held = Holdings(rank_dir)
        self.secret = secret
        self.opts = opts
        self.host = default_host() if host is None else host
        self._handshake_timeout_s = (
            HANDSHAKE_TIMEOUT_S if handshake_timeout_s is None else handshake_timeout_s
        )
        self._gate = _Gate(max(1, MAX_PREAUTH if max_preauth is None else max_preauth))
        self._lock = threading.Lock()
        self._hash_pool: ThreadPoolExecutor | None = None
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

    @property
    def refused(self) -> int:
        """Connections that did not authenticate (bad proof, timeout, evicted, no thread)."""
        return self._gate.refused

    @property
    def serving(self) -> bool:
        """The accept thread is running (nothing a peer does ends it; only :meth:`close`)."""
        return self._thread.is_alive()

    @property
    def connections(self) -> int:
        """Connections being served now (each has a ``flashckpt-mirror-conn`` thread)."""
        return self._gate.live()

    # -- inventory (what :class:`Holdings` holds) ---------------------------------------------------
    def holdings(self) -> dict[str, list[int]]:
        """Shard -> steps of it held here (see :meth:`Holdings.holdings`)."""
        return self.held.holdings()

    def snapshots(self) -> dict[str, list[list[Any]]]:
        """Shard -> ``[generation, step, storage id, run id, ancestors]`` of each valid
        snapshot held here (see :meth:`Holdings.snapshots`).  Training thread."""
        return self.held.snapshots()

    def claim_orphans(self, memory_root: Path, world: int, storage: str = "") -> list[str]:
        """Training thread, in ``restore``: serve the orphaned shard directories of this node
        (see :meth:`Holdings.claim_orphans`)."""
        return self.held.claim_orphans(memory_root, world, storage)

    def drop(self, owner: str | None = None) -> None:
        """Delete the snapshots of ``owner`` (default: all) held here: their owner is durable."""
        self.held.drop(owner)

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

        def thread() -> threading.Thread:
            return threading.Thread(
                target=self._serve, args=(conn, peer), name="flashckpt-mirror-conn", daemon=True
            )

        why = self._gate.admit(conn, thread, self._stop)
        if why is not None:
            self._gate.refuse(peer, why)
            conn.close()

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
            self._gate.forget(conn)
            with contextlib.suppress(OSError):
                conn.close()

    def _authenticate(self, conn: socket.socket, peer: Any) -> Channel | None:
        """The handshake, within ``handshake_timeout_s``; the channel, or None (refused)."""
        ch: Channel | None = None
        why: object = "evicted to make room for a newer connection"
        try:
            ch = server_handshake(conn, self.secret, time.monotonic() + self._handshake_timeout_s)
        except (OSError, FlashCkptError) as exc:
            why = exc
        finally:
            evicted = self._gate.out_of_preauth(conn)  # either way
        if ch is None or evicted:
            self._gate.refuse(peer, why)
            return None
        self._gate.authenticated()
        return ch

    def _request(self, ch: Channel) -> None:
        try:
            req = ch.recv_header()
        except MirrorAuthError as exc:
            send_quietly(ch, {"ok": False, "auth": True, "error": str(exc)})
            raise
        op = req.get("op")
        if op == "put":
            self._put(ch, req)
        elif op == "get":
            self._get(ch, req)
        else:
            ch.send_header(refusal("unknown request"))

    def _put(self, ch: Channel, req: dict[str, Any]) -> None:
        owner, step, n = req.get("shard"), req.get("step"), req.get("manifest")
        if not (isinstance(owner, str) and SHARD_PATTERN.fullmatch(owner)):
            ch.send_header(refusal("bad put request"))
            return
        if (
            type(step) is not int
            or not 0 <= step <= MAX_STEP
            or type(n) is not int
            or not 0 < n <= MAX_RECORD_BYTES
        ):
            ch.send_header(refusal("bad put request"))
            return
        what = f"mirror of {owner} step {step}"
        ch.send_header({"ok": True})  # send the manifest
        try:
            m = decode_pushed(ch.recv_blob(n), what)
            if m.step != step:
                raise CorruptCheckpointError(f"{what}: the manifest is of step {m.step}")
        except MirrorAuthError as exc:
            send_quietly(ch, {"ok": False, "auth": True, "error": str(exc)})
            raise
        except CorruptCheckpointError as exc:
            ch.send_header(refusal(str(exc)))
            return
        ms = self.held.slots(owner)
        with ms.lock:
            # Never the slot with the newest copy: a push that fails from here on costs at
            # most the older copy, whose slot it overwrites.
            slot = ms.slot_for_put()
            try:
                check_fits(m.total_bytes, ms.directory, what)
            except OSError as exc:  # refused before anything held here is touched
                ch.send_header(refusal(str(exc)))
                return
            try:  # growing a slot keeps its bytes: the older copy is intact if this fails
                slot.ensure(m.total_bytes)
            except OSError as exc:
                ch.send_header(refusal(f"{what}: cannot map {m.total_bytes} bytes: {exc}"))
                return
            ms.tier.forget(slot)  # its bytes are overwritten from here on
            held = carried(m)  # a chunk the owner's node-mate holds, that rank's mirror holds
            try:
                slot.allocate([(c.offset, c.nbytes) for c in held])  # pages trimmed before
            except OSError as exc:
                ch.send_header(refusal(f"{what}: cannot allocate {m.total_bytes} bytes: {exc}"))
                return
            slot.trim([(c.offset, c.nbytes) for chunks in part_holders(m).values() for c in chunks])
            ch.send_header({"ok": True, "ready": True})
            try:
                got = ch.recv_data(m, slot.view, held)
            except FrameAuthError as exc:
                # Tell the client why, after taking in what it still sends (bounded), so that
                # it reads the answer instead of a reset connection.
                send_quietly(ch, {"ok": False, "auth": True, "error": str(exc)})
                drain(ch.sock, exc.unread, time.monotonic() + self._handshake_timeout_s)
                raise
            # Not checksummed here (a memory pass per snapshot, on the peer's cores): the
            # manifest carries the checksums and every restore verifies every byte it loads.
            # Lineage fields (generation, storage, run) pass through unchanged.
            ms.tier.record(slot, m)
        with self._lock:
            self.received_bytes += got
        ch.send_header({"ok": True})

    def _get(self, ch: Channel, req: dict[str, Any]) -> None:
        shard, step, want = req.get("shard"), req.get("step"), req.get("want")
        if not (isinstance(shard, str) and SHARD_PATTERN.fullmatch(shard)) or type(step) is not int:
            ch.send_header(refusal("bad get request"))
            return
        if want is not None and not (
            isinstance(want, list)
            and all(
                isinstance(w, list) and len(w) == 2 and all(type(x) is int and x >= 0 for x in w)
                for w in want
            )
        ):
            ch.send_header(refusal("bad get request"))
            return
        for ms in self.held.sources(shard):
            with ms.lock:
                if step not in ms.steps():
                    continue
                what = f"{ms.directory}/{memory_manifest_key(step)}"
                reader: PartsReader | None = None
                try:
                    m, slot = ms.tier.read(step)  # validated: the manifest names the slot holding it
                    if not slot.mapped:
                        continue
                    # an orphan's snapshot may leave chunks to the other ranks of this node:
                    # sent whole; a mirror's, to the mirrors of its owner's node-mates: kept
                    local = part_holders(m) and not ms.tier.remote_parts
                    reader = PartsReader(m, slot, ms.directory.parent).open() if local else None
                    src = reader or slot
                    if not m.sealed:  # an orphan's snapshot whose rank died before checksumming it
                        m = verify_chunks(m, src.view, self._pool(), str(ms.directory))
                        ms.tier.seal(slot, m)
                    m = memory_manifest(m, slot.name, parts=ms.tier.remote_parts)
                    chunks = wanted(m, want)
                except (CorruptCheckpointError, StorageError) as exc:
                    if reader is not None:
                        reader.close()
                    log.warning("flashckpt: not serving %s: %s", what, exc)
                    continue
                try:
                    data = encode_manifest(m)
                    ch.send_header({"ok": True, "manifest": len(data)})
                    ch.send_blob(data)
                    ch.send_data(m, src.view, chunks)
                finally:
                    if reader is not None:
                        reader.close()
                return
        ch.send_header(refusal("not here"))

    def _pool(self) -> ThreadPoolExecutor:
        with self._lock:
            if self._hash_pool is None:
                n = max(1, self.opts.hash_threads)
                self._hash_pool = ThreadPoolExecutor(n, thread_name_prefix="flashckpt-mirror-hash")
            return self._hash_pool

    # -- lifetime ---------------------------------------------------------------------------------
    def close(self) -> None:
        """Training thread: stop serving, end the connections in flight and join their
        threads (bounded); orphan directories still held are unlocked and kept for the next
        attempt."""
        self._stop.set()
        self._sock.close()
        self._thread.join(timeout=5)
        conns = self._gate.shut_all()
        deadline = time.monotonic() + 5
        for thread in conns.values():
            if thread.ident is not None:
                thread.join(timeout=max(0.0, deadline - time.monotonic()))
        self.held.close()
        with self._lock:
            pool, self._hash_pool = self._hash_pool, None
        if pool is not None:
            pool.shutdown(wait=True)


class _Gate:
    """The connections of one server and their threads.  At most ``max_preauth`` are served
    at once before they authenticate: a new one beyond that evicts the oldest (so that a
    flood of idle connections cannot keep a peer that answers at once out).  Refusals are
    counted and logged once per episode.  A connection leaves these tables (under the
    lock) before its socket is closed, so a shutdown from another thread never reaches a
    reused descriptor.  Any thread."""

    def __init__(self, max_preauth: int) -> None:
        self.max_preauth = max_preauth
        self._cond = threading.Condition(threading.Lock())
        self._conns: dict[socket.socket, threading.Thread] = {}
        self._preauth: dict[socket.socket, float] = {}  # not authenticated yet: accepted when
        self._evicted: set[socket.socket] = set()  # of those, shut down to make room
        self._lock = threading.Lock()
        self._refusing = False  # in a refusal episode (logged once, at its start)
        self.refused = 0

    def admit(
        self, conn: socket.socket, thread: Callable[[], threading.Thread], stop: threading.Event
    ) -> str | None:
        """Accept thread: start ``conn``'s thread (made by ``thread()``) within the bound;
        None, or why it was not (the caller refuses it)."""
        with self._cond:
            if len(self._preauth) >= self.max_preauth:
                # Make room: shut the oldest unauthenticated connection down (its thread
                # counts it as refused and exits), rather than refusing the newcomer.
                waiting = [c for c in self._preauth if c not in self._evicted]
                if waiting:
                    oldest = min(waiting, key=self._preauth.__getitem__)
                    self._evicted.add(oldest)
                    with contextlib.suppress(OSError):
                        oldest.shutdown(socket.SHUT_RDWR)
                self._cond.wait_for(lambda: len(self._preauth) < self.max_preauth, timeout=1.0)
            if len(self._preauth) >= self.max_preauth or stop.is_set():
                return "too many connections awaiting authentication"
            t = self._conns[conn] = thread()
            self._preauth[conn] = time.monotonic()
        try:
            t.start()
        except RuntimeError as exc:  # no thread to be had: the server goes on accepting
            self.forget(conn)
            return f"no thread to serve it: {exc}"
        return None

    def out_of_preauth(self, conn: socket.socket) -> bool:
        """``conn``'s handshake is over (either way); True if it was evicted meanwhile."""
        with self._cond:
            evicted = conn in self._evicted
            self._preauth.pop(conn, None)
            self._evicted.discard(conn)
            self._cond.notify_all()
        return evicted

    def forget(self, conn: socket.socket) -> None:
        """``conn`` leaves the server (before its socket is closed)."""
        with self._cond:
            self._preauth.pop(conn, None)
            self._evicted.discard(conn)
            self._conns.pop(conn, None)
            self._cond.notify_all()

    def refuse(self, peer: Any, why: object) -> None:
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

    def authenticated(self) -> None:
        """A peer authenticated: a refusal episode, if any, is over."""
        with self._lock:
            ended, self._refusing = self._refusing, False
            refused = self.refused
        if ended:
            log.info("flashckpt: a mirror peer authenticated (%d connection(s) refused so far)", refused)

    def live(self) -> int:
        with self._cond:
            return len(self._conns)

    def shut_all(self) -> dict[socket.socket, threading.Thread]:
        """Close: shut every live connection down; returns them with their threads."""
        with self._cond:
            conns = dict(self._conns)
            for conn in conns:  # under the lock: a connection leaves it before it is closed
                with contextlib.suppress(OSError):
                    conn.shutdown(socket.SHUT_RDWR)
        return conns
