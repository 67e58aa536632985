"""Mirror: copies of ranks' staged snapshots in peers' memory, over an authenticated TCP stream.

Each rank of a multi-node job runs a :class:`MirrorServer` (thread ``flashckpt-mirror-server``,
one handler thread per connection).  Its address and a per-job secret are exchanged through
the job's own collectives at construction; a connection must answer an HMAC challenge with
that secret before anything else, else it is dropped.  Two requests:

* ``put``: a peer pushes its sealed snapshot (manifest + the slot's bytes).  It lands in this
  rank's memory tier, ``<rank dir>/mirrors/<owner shard>/``, in two slots of the same kind
  and format as the owner's own (the newest two pushes are kept: retention follows the
  owner's steps).  Its manifest (with the owner's checksums) is written once every byte has
  arrived; the bytes are verified when a restore loads them, not on arrival (a memory pass
  on the peer's cores per snapshot).
* ``get``: during ``restore``, a rank fetches its shard's snapshot from a mirror held here
  into its own slot.

A server also serves **orphaned shard directories** of its node: when ranks are renumbered
across nodes between attempts, rank ``r``'s memory (and the mirrors it held) stays in
``<memory root>/r<r>-of-<world>/`` on the node it ran on, where no rank of the new attempt
uses that directory.  During ``restore`` one rank on that node claims it (the directory's
``flock``, which live ranks hold on their own) and serves its snapshots and mirrors like
mirrors; a clean close drops what it served once the owners are durable.

The sender is the owner's persist pipeline (``flashckpt-mirror`` thread), with a bandwidth cap
(``Options.mirror_bytes_per_s``) and socket timeouts, so a slow or dead peer is reported on
the ``SaveHandle`` and in ``stats`` and never blocks the training thread.  The wire format is
length-prefixed JSON headers followed by raw bytes; a transport for NCCL/RDMA would replace
:func:`push` / :func:`fetch` and keep the rest.
"""

from __future__ import annotations

import dataclasses
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
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from flashckpt import _hooks as hooks
from flashckpt._config import Options
from flashckpt._coordinator import memory_steps, read_memory_manifest, verify_chunks
from flashckpt._staging import Slot, check_fits
from flashckpt.backends import LocalBackend
from flashckpt.errors import CorruptCheckpointError, FlashCkptError, StorageError, TransientStorageError
from flashckpt.format import (
    MAX_RECORD_BYTES,
    SHARD_PATTERN,
    Manifest,
    check_memory_manifest,
    encode_manifest,
    memory_manifest_key,
)

log = logging.getLogger(__name__)

_MAGIC = b"flashckpt-mirror/1"
_HEADER = struct.Struct("!I")
_PIECE = 4 << 20  # send / receive granularity (also the bandwidth cap's tick)


class MirrorAuthError(FlashCkptError, PermissionError):
    """A mirror connection did not prove it knows the job's secret (or the peer refused ours)."""


class MirrorError(TransientStorageError):
    """A mirror transfer failed: the peer is gone, slow beyond the timeout, or refused."""


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


def _send_header(sock: socket.socket, obj: dict[str, Any]) -> None:
    data = json.dumps(obj).encode()
    sock.sendall(_HEADER.pack(len(data)) + data)


def _recv_exact(sock: socket.socket, view: memoryview) -> None:
    got = 0
    while got < len(view):
        n = sock.recv_into(view[got:], min(len(view) - got, _PIECE))
        if n == 0:
            raise MirrorError("the peer closed the connection")
        got += n


def _recv_bytes(sock: socket.socket, n: int) -> bytes:
    buf = bytearray(n)
    _recv_exact(sock, memoryview(buf))
    return bytes(buf)


def _recv_header(sock: socket.socket) -> dict[str, Any]:
    (n,) = _HEADER.unpack(_recv_bytes(sock, _HEADER.size))
    if n > 1 << 20:
        raise MirrorError("mirror header too large")
    obj = json.loads(_recv_bytes(sock, n))
    if not isinstance(obj, dict):
        raise MirrorError("bad mirror header")
    return obj


def _proof(secret: bytes, challenge: bytes) -> bytes:
    return hmac.new(secret, _MAGIC + challenge, hashlib.sha256).digest()


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
            raise MirrorError("abandoned: a newer snapshot needed the slot (the mirror is behind)")


View = Callable[[int, int], memoryview]


def _send_snapshot(
    sock: socket.socket, m: Manifest, view: View, rate: float, abort: threading.Event | None = None
) -> int:
    throttle = _Throttle(rate, abort)
    sent = 0
    for c in m.chunks:
        for off in range(0, c.nbytes, _PIECE):
            n = min(_PIECE, c.nbytes - off)
            throttle.wait(n)
            sock.sendall(view(c.at + off, n))
            sent += n
            hooks.fire("mirror.piece", step=m.step, sent=sent)
    return sent


def _connect(addr: tuple[str, int], secret: bytes, timeout: float) -> socket.socket:
    sock = socket.create_connection(addr, timeout=timeout)
    try:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        challenge = _recv_bytes(sock, 32)
        sock.sendall(_proof(secret, challenge))
        reply = _recv_header(sock)
        if reply.get("auth") != "ok":
            raise MirrorAuthError(f"mirror peer {addr[0]}:{addr[1]} refused the job's secret")
    except BaseException:
        sock.close()
        raise
    return sock


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
    """Send the sealed snapshot ``m`` (bytes through ``view(at, n)``) to the peer at ``addr``.
    Any thread (the ``flashckpt-mirror`` thread).  Returns the bytes sent; raises
    :class:`MirrorError` (also when ``abort`` is set midway) / :class:`MirrorAuthError`."""
    if not m.sealed:
        raise ValueError("only sealed snapshots are mirrored")
    data = encode_manifest(m)
    try:
        with _connect(addr, secret, opts.mirror_timeout_s) as sock:
            _send_header(sock, {"op": "put", "shard": owner, "step": m.step, "manifest": len(data)})
            sock.sendall(data)
            sent = _send_snapshot(sock, m, view, opts.mirror_bytes_per_s, abort)
            reply = _recv_header(sock)
    except MirrorAuthError:
        raise
    except OSError as exc:
        raise MirrorError(f"mirror push of step {m.step} to {addr[0]}:{addr[1]} failed: {exc}") from exc
    if reply.get("ok") is not True:
        raise MirrorError(f"mirror peer {addr[0]}:{addr[1]} rejected step {m.step}: {reply.get('error')}")
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
    returns where its bytes go (``view(at, n)``, after mapping a slot big enough).  The
    caller verifies the bytes against the returned manifest.  Training thread (``restore``)."""
    try:
        with _connect(addr, secret, opts.mirror_timeout_s) as sock:
            _send_header(sock, {"op": "get", "shard": shard, "step": step})
            reply = _recv_header(sock)
            if reply.get("ok") is not True:
                raise MirrorError(f"mirror peer {addr[0]}:{addr[1]} has no step {step} of {shard}")
            n = reply.get("manifest")
            if type(n) is not int or not 0 < n <= MAX_RECORD_BYTES:
                raise MirrorError("bad mirror reply")
            m = _decode(_recv_bytes(sock, n), f"{shard} step {step} from {addr[0]}:{addr[1]}")
            if m.step != step:
                raise CorruptCheckpointError(f"mirror peer sent step {m.step} for {step}")
            view = into(m)
            for c in m.chunks:
                _recv_exact(sock, view(c.at, c.nbytes))
    except MirrorAuthError:
        raise
    except OSError as exc:
        raise MirrorError(f"fetching step {step} of {shard} from {addr[0]}:{addr[1]} failed: {exc}") from exc
    return m


def _decode(data: bytes, what: str) -> Manifest:
    from flashckpt.backends._base import check_key
    from flashckpt.format import decode_manifest

    m = decode_manifest(data, f"mirrored manifest of {what}", check_key=check_key)
    if not m.sealed:
        raise CorruptCheckpointError(f"mirrored manifest of {what} carries no checksums")
    keys = {c.key for c in m.chunks}
    if not keys <= {"slot-0.bin", "slot-1.bin"}:
        raise CorruptCheckpointError(f"mirrored manifest of {what} names unknown slots")
    return m


# -- the server side ------------------------------------------------------------------------------


class _MirrorSlots:
    """The two slots and the manifests of one owner's mirrored snapshots on this rank."""

    def __init__(self, directory: Path) -> None:
        directory.mkdir(parents=True, exist_ok=True, mode=0o700)
        self.directory = directory
        self.backend = LocalBackend(directory, fsync=False, direct_io=False, private=True, durable=False)
        self.slots = [Slot(directory, 0), Slot(directory, 1)]
        self.lock = threading.Lock()  # one transfer at a time per owner
        for s in self.slots:
            s.adopt()
        for step in memory_steps(self.backend):
            try:
                m = read_memory_manifest(self.backend, step)
                for s in self.slots:
                    if {c.key for c in m.chunks} <= {s.name}:
                        s.step = step
            except (CorruptCheckpointError, StorageError):
                self.backend.delete(memory_manifest_key(step))

    def steps(self) -> list[int]:
        return memory_steps(self.backend)

    def slot_for_put(self) -> Slot:
        """The slot not holding the newest mirrored step (the newest stays intact)."""
        newest = max((s.step for s in self.slots if s.step is not None), default=None)
        free = [s for s in self.slots if s.step is None or s.step != newest]
        return free[0]

    def close(self) -> None:
        for s in self.slots:
            s.release_mapping()


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

    def drop_own(self) -> None:
        """Delete the snapshots the shard's rank left here (the slots and their manifests)."""
        with self.own.lock:
            self.own.close()
            for step in self.own.steps():
                self.own.backend.delete(memory_manifest_key(step))
            for s in self.own.slots:
                s.path.unlink(missing_ok=True)
                s.step = None

    def close(self) -> None:
        self.own.close()
        for ms in self.mirrors.values():
            ms.close()
        os.close(self.fd)


class MirrorServer:
    """Serves ``put`` and ``get`` for one rank.  Created on the training thread; its threads
    are daemons and :meth:`close` stops them."""

    def __init__(
        self,
        rank_dir: Path,
        secret: bytes,
        opts: Options,
        host: str = "",
    ) -> None:
        self.rank_dir = rank_dir
        self.root = rank_dir / "mirrors"
        self.secret = secret
        self.opts = opts
        self._owners: dict[str, _MirrorSlots] = {}
        self._orphans: dict[str, _Orphan] = {}
        self._lock = threading.Lock()
        self._hash_pool: ThreadPoolExecutor | None = None
        self._sock = socket.create_server((host, 0))
        self._sock.settimeout(0.2)
        self.port = int(self._sock.getsockname()[1])
        self._stop = threading.Event()
        self.refused = 0
        self.received_bytes = 0
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
        """Shard -> ``[generation, step, storage id, run id]`` of each valid snapshot of it held
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
                    entry = [m.generation, m.step, m.storage, m.run]
                    if entry not in out.setdefault(shard, []):
                        out[shard].append(entry)
        return out

    def claim_orphans(self, memory_root: Path, world: int) -> list[str]:
        """Training thread, in ``restore`` (every live rank has locked its own directory by
        then): lock the shard directories of ``world``-rank jobs under ``memory_root`` that no
        process holds, and serve them.  Returns the shards newly claimed."""
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
                fd = os.open(d / "lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
            except OSError as exc:
                log.warning("flashckpt: cannot open %s: %s", d, exc)
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
            except Exception as exc:
                os.close(fd)
                log.warning("flashckpt: not serving %s: %s", d, exc)
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
        while not self._stop.is_set():
            try:
                conn, peer = self._sock.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            threading.Thread(
                target=self._serve, args=(conn, peer), name="flashckpt-mirror-conn", daemon=True
            ).start()

    def _serve(self, conn: socket.socket, peer: Any) -> None:
        with conn:
            conn.settimeout(self.opts.mirror_timeout_s)
            try:
                challenge = secrets.token_bytes(32)
                conn.sendall(challenge)
                if not hmac.compare_digest(_recv_bytes(conn, 32), _proof(self.secret, challenge)):
                    self.refused += 1
                    log.warning("flashckpt: refused a mirror connection from %s: wrong secret", peer)
                    _send_header(conn, {"auth": "refused"})
                    return
                _send_header(conn, {"auth": "ok"})
                req = _recv_header(conn)
                if req.get("op") == "put":
                    self._put(conn, req)
                elif req.get("op") == "get":
                    self._get(conn, req)
                else:
                    _send_header(conn, {"ok": False, "error": "unknown request"})
            except (OSError, FlashCkptError, ValueError, RuntimeError) as exc:  # (a pool shut down)
                log.warning("flashckpt: mirror connection from %s failed: %s", peer, exc)

    def _put(self, conn: socket.socket, req: dict[str, Any]) -> None:
        owner, step, n = req.get("shard"), req.get("step"), req.get("manifest")
        if not (isinstance(owner, str) and SHARD_PATTERN.fullmatch(owner)) or type(step) is not int:
            raise MirrorError("bad put request")
        if type(n) is not int or not 0 < n <= MAX_RECORD_BYTES:
            raise MirrorError("bad put request")
        m = _decode(_recv_bytes(conn, n), f"{owner} step {step}")
        if m.step != step:
            raise MirrorError("put: manifest of another step")
        ms = self._slots(owner)
        with ms.lock:
            slot = ms.slot_for_put()
            if slot.step is not None:
                ms.backend.delete(memory_manifest_key(slot.step))
                slot.step = None
            check_fits(m.total_bytes, ms.directory, f"mirror of {owner} step {step}")
            slot.ensure(m.total_bytes)
            for c in m.chunks:
                _recv_exact(conn, slot.view(c.at, c.nbytes))
            self.received_bytes += sum(c.nbytes for c in m.chunks)
            # Not checksummed here (a memory pass per snapshot, on the peer's cores): the
            # manifest carries the checksums and every restore verifies every byte it loads.
            m = m.with_chunks(dataclasses.replace(c, key=slot.name) for c in m.chunks)
            ms.backend.put(memory_manifest_key(step), encode_manifest(m))
            slot.step = step
        _send_header(conn, {"ok": True})

    def _get(self, conn: socket.socket, req: dict[str, Any]) -> None:
        shard, step = req.get("shard"), req.get("step")
        if not (isinstance(shard, str) and SHARD_PATTERN.fullmatch(shard)) or type(step) is not int:
            raise MirrorError("bad get request")
        for ms in self._sources(shard):
            if step not in ms.steps():
                continue
            with ms.lock:
                m = read_memory_manifest(ms.backend, step)
                slot = next((s for s in ms.slots if s.step == step), None)
                if slot is None or not slot.mapped:
                    continue
                if not m.sealed:  # an orphan's snapshot whose rank died before checksumming it
                    m = verify_chunks(m, slot.view, self._pool(), str(ms.directory))
                    ms.backend.put(memory_manifest_key(step), encode_manifest(m))
                self._send(conn, m, slot)
                return
        _send_header(conn, {"ok": False, "error": "not here"})

    def _pool(self) -> ThreadPoolExecutor:
        with self._lock:
            if self._hash_pool is None:
                n = max(1, self.opts.hash_threads)
                self._hash_pool = ThreadPoolExecutor(n, thread_name_prefix="flashckpt-mirror-hash")
            return self._hash_pool

    def _send(self, conn: socket.socket, m: Manifest, slot: Slot) -> None:
        data = encode_manifest(m)
        _send_header(conn, {"ok": True, "manifest": len(data)})
        conn.sendall(data)
        _send_snapshot(conn, m, slot.view, 0)

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
        """Stop serving; orphan directories still held are unlocked and kept for the next
        attempt."""
        self._stop.set()
        self._sock.close()
        self._thread.join(timeout=5)
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
