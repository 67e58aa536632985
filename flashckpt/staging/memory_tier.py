"""The memory tier of one rank: which slot holds which snapshot, and the manifests saying so.

A memory tier is a directory of two slot files (``slot-0.bin``, ``slot-1.bin``) and one
manifest per snapshot held (``step-<N>.manifest``).  A manifest here always describes the
slot's bytes: every chunk raw, in one slot file, at its own offset (``format.memory_manifest``),
whatever tier the bytes were read from, and it is checked by the one validator of such
manifests (``format.check_memory_manifest``) wherever it is read or written.

:class:`MemoryTier` is the only code that says which slot holds which step (``Slot.step``)
and reads or writes those manifests.  A step number is held by at most one slot: a snapshot
that takes a step number supersedes an older copy of the same number, even one still being
persisted (its late seal is then dropped rather than overwrite the newer manifest).

Threads: the training thread (``save``, ``restore``, ``close``) and the persist thread
(``seal``), each on a slot it holds busy; bookkeeping changes happen under one lock.
"""

from __future__ import annotations

import bisect
import contextlib
import fcntl
import logging
import os
import re
import threading
import time
from collections.abc import Iterable, Mapping
from pathlib import Path

from flashckpt._secure import open_private, private_dir
from flashckpt.backends import LocalBackend
from flashckpt.errors import ConfigError, CoordinationError, CorruptCheckpointError, StorageError
from flashckpt.format import (
    SHARD_PATTERN,
    ChunkEntry,
    Manifest,
    check_memory_manifest,
    decode_manifest,
    encode_manifest,
    memory_manifest,
    memory_manifest_key,
    parse_memory_manifest_key,
    part_holders,
)
from flashckpt.staging.stager import Slot
from flashckpt.storage import Backend

log = logging.getLogger(__name__)

_TEMP_MANIFEST = re.compile(r"step-\d{12}\.manifest\.tmp-[A-Za-z0-9._-]+")


def memory_steps(be: Backend) -> list[int]:
    """Steps with a manifest in a memory-tier directory, oldest first (names only)."""
    return sorted(s for n in be.children("") if (s := parse_memory_manifest_key(n)) is not None)


def read_memory_manifest(be: Backend, step: int, what: str = "") -> Manifest:
    """The manifest of ``step`` in a memory-tier directory, decoded (unsealed allowed) and
    checked to name that step.  Its slot is checked by :meth:`MemoryTier.read` (and by the
    mirror holdings for peers' copies)."""
    return _decode_memory_manifest(be, step, what, None)[1]


def _decode_memory_manifest(
    be: Backend, step: int, what: str, known: tuple[bytes, Manifest] | None
) -> tuple[bytes, Manifest]:
    """:func:`read_memory_manifest`, and the record's bytes.  ``known``: the bytes of a record
    decoded earlier and what they decoded to, returned as it is if the record still holds
    exactly those bytes (the same bytes decode, and validate, the same)."""
    key = memory_manifest_key(step)
    what = what or f"memory manifest {key}"
    raw = be.get(key)
    if known is not None and known[0] == raw:  # the same bytes decode (and validate) the same
        return known
    m = decode_manifest(raw, what, allow_unsealed=True)
    if m.step != step:
        raise CorruptCheckpointError(f"{what} describes step {m.step}")
    return raw, m


class MemoryTier:
    """One memory-tier directory and its slots.  See the module docstring."""

    name = "memory"

    def __init__(
        self,
        directory: Path,
        slots: Iterable[Slot],
        backend: LocalBackend | None = None,
        *,
        parts: bool = False,
        remote_parts: bool = False,
    ) -> None:
        self.directory = directory
        #: a rank's own memory tier (or an orphaned one): a snapshot may leave chunks to the
        #: other ranks of the node (:class:`PartsReader`)
        self.parts = parts or remote_parts
        #: a mirror: a snapshot may leave chunks to the mirrors of the other ranks of its
        #: node, which other peers may hold; they are not looked for here (a fetch gets them
        #: from whichever peer holds them, see ``restore``)
        self.remote_parts = remote_parts
        self.slots = list(slots)
        self.backend = backend or LocalBackend(
            directory, fsync=False, direct_io=False, private=True, durable=False
        )
        self._lock = threading.Lock()
        #: slot name -> ``(generation, step)`` of the snapshot it holds
        self._order: dict[str, tuple[int, int]] = {}
        #: step -> the bytes of its manifest last decoded here and what they decoded to: a
        #: restore reads every manifest to plan and then the chosen one again; a record whose
        #: bytes have not changed is not decoded again
        self._decoded: dict[int, tuple[bytes, Manifest]] = {}
        self._decoded_lock = threading.Lock()

    def refuse_foreign(self, storage: str, url: str) -> None:
        """Raise :class:`ConfigError` if this memory tier holds snapshots saved for another
        storage tier than ``storage`` (``url``): another job's (two jobs given one
        ``memory_dir``).  Using it would overwrite them, and a clean close would delete them,
        though they may be that job's only copy of its newest step."""
        others = sorted({m.storage for m in self.holdings() if m.storage and m.storage != storage})
        if others:
            raise ConfigError(
                f"memory tier {self.directory} holds snapshots of another job (storage tier "
                f"{others[0]}, not {storage} = {url}): give this job its own memory_dir, or "
                "persist and delete those snapshots first"
            )

    # -- reading --------------------------------------------------------------------------------
    def steps(self) -> list[int]:
        """Step numbers with a manifest here, oldest first (not validated: :meth:`read` is)."""
        return memory_steps(self.backend)

    def read(self, step: int) -> tuple[Manifest, Slot]:
        """The validated manifest of ``step`` and the slot that holds it.  Raises
        :class:`CorruptCheckpointError` if the manifest is bad or no slot holds the step."""
        m = self._decode(step)
        slot = self._slot_named(m, step)
        if slot.step != step:
            raise CorruptCheckpointError(f"memory snapshot of step {step} in {self.directory} has no slot")
        check_memory_manifest(m, self._what(step), capacity=slot.capacity, parts=self.parts)
        if not self.remote_parts:
            for shard, chunks in part_holders(m).items():  # the other ranks' parts are there
                part_slot(self.directory.parent, shard, m, chunks)
        return m, slot

    def newest_slot(self) -> Slot | None:
        """The slot holding the newest snapshot here, in ``(generation, step)`` order (a run
        continued from an older step is newer than the steps it left); None if none."""
        with self._lock:
            held = [s for s in self.slots if s.step is not None and s.name in self._order]
            return max(held, key=lambda s: self._order[s.name], default=None)

    def holdings(self) -> list[Manifest]:
        """Every valid snapshot held here (manifests that fail validation are skipped)."""
        out = []
        for step in self.steps():
            try:
                out.append(self.read(step)[0])
            except (CorruptCheckpointError, StorageError) as exc:
                log.debug("flashckpt: memory snapshot of step %d unusable: %s", step, exc)
        return out

    # -- bookkeeping ----------------------------------------------------------------------------
    def adopt(self) -> None:
        """At construction, before any save: map the slot files an earlier process left and
        take over its manifests.  A manifest that fails validation, names a slot that is not
        mapped or too small, or loses to a newer snapshot naming the same slot is deleted."""
        for s in self.slots:
            s.adopt()
        self._sweep_temps()
        with self._lock:
            for step in self.steps():
                try:
                    m = self._decode(step)
                    slot = self._slot_named(m, step)
                    if not slot.mapped:
                        raise CorruptCheckpointError("its slot file is missing")
                    check_memory_manifest(m, self._what(step), capacity=slot.capacity, parts=self.parts)
                    if slot.step is not None:  # two manifests name one slot: the newer one wins
                        other = self._decode(slot.step)
                        if other.order > m.order:
                            raise CorruptCheckpointError(f"slot holds step {slot.step}, which is newer")
                        self.backend.delete(memory_manifest_key(slot.step))
                    slot.step = step
                    self._order[slot.name] = m.order
                except (CorruptCheckpointError, StorageError) as exc:
                    log.warning("flashckpt: dropping memory snapshot of step %d: %s", step, exc)
                    self.backend.delete(memory_manifest_key(step))

    def record(self, slot: Slot, m: Manifest) -> Manifest:
        """Training thread, ``slot`` held busy and just filled: ``slot`` now holds ``m``'s
        step (any tier's manifest; what is written describes the slot).  Supersedes another
        slot's copy of the same step number.  Returns the memory manifest written."""
        mm = memory_manifest(m, slot.name, parts=self.parts)
        check_memory_manifest(mm, self._what(m.step), capacity=slot.capacity, parts=self.parts)
        data = encode_manifest(mm)
        with self._lock:
            for s in self.slots:
                if s is not slot and s.step == m.step:
                    s.step = None  # superseded; the key is taken over below
                    self._order.pop(s.name, None)
            if slot.step is not None and slot.step != m.step:
                self.backend.delete(memory_manifest_key(slot.step))
            slot.step = None
            self._order.pop(slot.name, None)
            self.backend.put(memory_manifest_key(m.step), data)
            slot.step = m.step
            self._order[slot.name] = mm.order
        return mm

    def seal(self, slot: Slot, m: Manifest) -> bool:
        """Persist thread: write the checksummed manifest of the snapshot ``slot`` holds,
        unless ``slot`` no longer holds that step (a newer save took the step number).
        Returns True if written."""
        mm = memory_manifest(m, slot.name, parts=self.parts)
        check_memory_manifest(mm, self._what(m.step), capacity=slot.capacity, parts=self.parts)
        data = encode_manifest(mm)
        with self._lock:
            if slot.step != m.step:
                return False
            self.backend.put(memory_manifest_key(m.step), data)
            return True

    def forget(self, slot: Slot) -> None:
        """``slot``'s snapshot is gone (the slot is about to be overwritten): delete its
        manifest first, so a crash never finds a manifest describing other bytes."""
        with self._lock:
            if slot.step is not None:
                self.backend.delete(memory_manifest_key(slot.step))
            slot.step = None
            self._order.pop(slot.name, None)

    def reclaim(self, slot: Slot, timeout: float) -> None:
        """Training thread, ``slot`` held busy and about to be overwritten: :meth:`forget` its
        snapshot once no other rank of the node reads a part of it any more.

        Such a reader holds the step's pin (:class:`PartsReader`) from the moment its own
        snapshot, which leaves chunks to this rank, is handed to its persist thread.  Taking
        the pin exclusively waits for those readers (``CoordinationError`` after ``timeout``
        seconds: a reader that hangs; a dead one lets go with its last descriptor); the pin
        file is unlinked before it is let go, so a reader arriving later finds the manifest
        gone (see :func:`pin_step`)."""
        step = slot.step
        if step is None:
            self.forget(slot)
            return
        path = self.directory / pin_name(step)
        fd = open_private(path, write=True, create=True)
        try:
            _flock_within(
                fd, fcntl.LOCK_EX, timeout, f"the node's other ranks still read step {step} in {slot.path}"
            )
            self.forget(slot)
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
        finally:
            os.close(fd)  # the lock goes with it

    def forget_step(self, step: int) -> None:
        """Delete the snapshot of ``step`` wherever it is held (its slot is idle)."""
        with self._lock:
            for s in self.slots:
                if s.step == step:
                    s.step = None
                    self._order.pop(s.name, None)
            self.backend.delete(memory_manifest_key(step))

    def clear(self) -> None:
        """At a clean close, everything durable: delete every manifest (slots are unlinked by
        the stager)."""
        with self._lock:
            for name in self.backend.children(""):
                if not name.endswith("/") and parse_memory_manifest_key(name) is not None:
                    self.backend.delete(name)
            for s in self.slots:
                s.step = None
            self._order.clear()
        self._sweep_temps()

    def _sweep_temps(self) -> None:
        """Delete the temporary manifests a killed writer left (``<manifest>.tmp-...``).  Only
        while this process holds the memory tier's lock: no one else writes here then."""
        try:
            names = os.listdir(self.directory)
        except FileNotFoundError:
            return
        for name in names:
            if _TEMP_MANIFEST.fullmatch(name):
                try:
                    os.unlink(self.directory / name)
                except FileNotFoundError:
                    pass

    def release(self, lock_fd: int, parents: Iterable[Path] = ()) -> None:
        """Training thread, clean close, everything durable: delete the manifests and every
        other file here (the stager unlinks the slot files), then the lock (:func:`lock`)
        last, while it is still held, then the directory and ``parents`` once empty."""
        self.clear()
        be = self.backend
        for name in be.children(""):
            if not name.endswith("/") and name != "lock":
                be.delete(name)
        with contextlib.suppress(FileNotFoundError):
            (self.directory / "lock").unlink()
        os.close(lock_fd)
        for d in [self.directory, *parents]:
            try:
                d.rmdir()
            except OSError:
                break

    # -- helpers --------------------------------------------------------------------------------
    def _what(self, step: int) -> str:
        return f"memory manifest of step {step} in {self.directory}"

    def _decode(self, step: int) -> Manifest:
        """Any thread, with or without ``_lock`` held (the cache has a lock of its own)."""
        with self._decoded_lock:
            known = self._decoded.pop(step, None)
        decoded = _decode_memory_manifest(self.backend, step, self._what(step), known)
        live = {s.step for s in self.slots}  # only the steps slots hold are worth keeping
        with self._decoded_lock:
            self._decoded = {s: d for s, d in self._decoded.items() if s in live}
            self._decoded[step] = decoded
        return decoded[1]

    def _slot_named(self, m: Manifest, step: int) -> Slot:
        name = check_memory_manifest(m, self._what(step), parts=self.parts)
        return next(s for s in self.slots if s.name == name)


def read_part_manifest(root: Path, shard: str, m: Manifest) -> Manifest:
    """Rank ``shard``'s manifest (its memory tier under ``root``, this node) of the snapshot
    ``m`` describes: same step, generation, run and storage tier, validated.  Raises
    :class:`CorruptCheckpointError` if there is none."""
    if not SHARD_PATTERN.fullmatch(shard):
        raise CorruptCheckpointError(
            f"memory snapshot of step {m.step}: {shard[:40]!r} is not a rank's shard"
        )
    be = LocalBackend(root / shard, fsync=False, direct_io=False, private=True, durable=False)
    what = f"memory manifest of step {m.step} in {root / shard}"
    try:
        other = read_memory_manifest(be, m.step, what)
    except StorageError as exc:
        raise CorruptCheckpointError(f"rank {shard}'s part of step {m.step} is gone: {exc}") from exc
    check_memory_manifest(other, what, parts=True)
    if (other.order, other.run, other.storage, other.world_size) != (m.order, m.run, m.storage, m.world_size):
        raise CorruptCheckpointError(f"{what} describes another snapshot")
    return other


def part_slot(root: Path, shard: str, m: Manifest, chunks: Iterable[ChunkEntry]) -> Path:
    """The slot file in which rank ``shard`` of this node (its memory tier under ``root``)
    holds ``chunks`` of snapshot ``m``: its own manifest of the same snapshot (same step,
    generation, run and storage tier) says they are there, with the same offsets and sizes,
    and the same checksums where both know them.  Raises :class:`CorruptCheckpointError`
    (the part is gone: that rank saved a newer step, failed, or its memory tier went)."""
    other = read_part_manifest(root, shard, m)
    name = check_memory_manifest(other, "", parts=True)
    what = f"memory manifest of step {m.step} in {root / shard}"
    held = {c.offset: c for c in other.chunks if c.key == name}
    for c in chunks:
        h = held.get(c.offset)
        if h is None or h.nbytes != c.nbytes or (c.checksum and h.checksum and c.checksum != h.checksum):
            raise CorruptCheckpointError(f"{what} does not hold the chunk at {c.offset}")
    return root / shard / name


def pin_name(step: int) -> str:
    """The pin file of ``step`` in a memory tier (see :meth:`MemoryTier.reclaim`)."""
    return f"step-{step:012d}.pin"


def pin_step(directory: Path, step: int) -> int:
    """Hold the pin of ``step`` in the memory tier ``directory`` (another rank's, on this
    node), shared; returns its descriptor (closing it lets go).  While held, that rank does
    not overwrite a slot holding ``step``.  A pin file its owner unlinked meanwhile is made
    again.  Raises :class:`CorruptCheckpointError` if the memory tier is gone."""
    path = directory / pin_name(step)
    for _ in range(100):
        try:
            fd = open_private(path, write=True, create=True)
        except FileNotFoundError as exc:
            raise CorruptCheckpointError(f"memory tier {directory} is gone") from exc
        try:
            fcntl.flock(fd, fcntl.LOCK_SH)  # its owner holds it exclusively for an instant only
            if os.fstat(fd).st_ino == os.stat(path, follow_symlinks=False).st_ino:
                return fd
        except FileNotFoundError:
            pass
        except BaseException:
            os.close(fd)
            raise
        os.close(fd)
    raise CorruptCheckpointError(f"cannot pin step {step} in {directory}")


def _alive(directory: Path) -> bool:
    """A live process holds the memory tier ``directory`` (its lock, see :func:`lock`): a part
    not there yet may still come.  False if nobody does (the rank died: it never will)."""
    try:
        fd = open_private(directory / "lock")
    except (FileNotFoundError, ConfigError):
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)  # (a lock taken here goes with it)
    return False


def _flock_within(fd: int, how: int, timeout: float, what: str) -> None:
    """``flock(fd, how)``, waiting up to ``timeout`` seconds (``CoordinationError``)."""
    deadline = time.monotonic() + timeout
    delay = 0.0005
    while True:
        try:
            fcntl.flock(fd, how | fcntl.LOCK_NB)
            return
        except BlockingIOError:
            if time.monotonic() > deadline:
                raise CoordinationError(f"{what} after {timeout:.0f} s (a process that hangs?)") from None
            time.sleep(delay)
            delay = min(delay * 2, 0.05)


class PartsReader:
    """The bytes of a memory snapshot whose chunks are partly held by other ranks of the node
    (replicated state staged once per node): its own slot, and each such rank's slot file.

    Made (training thread) when the snapshot is handed on: it pins the step in each such
    rank's memory tier at once (:func:`pin_step`), so that they cannot overwrite their part
    before it is read, however far behind this rank's persist thread is.  :meth:`open`
    (the thread that reads) then finds each part, waiting up to ``wait_s`` for a rank still
    copying it.  ``name`` and ``view`` read like the slot's (another rank's chunk is read
    into a buffer of its own); ``readv`` is a ``preadv`` of whichever file holds the bytes.
    :meth:`close` lets everything go (idempotent).

    ``dirs`` (offline salvage of a mirror, whose owner's node-mates' mirrors may be held by
    other ranks of this node): where each part is, instead of ``root / shard``; those
    directories are claimed by the caller, so nothing is pinned or waited for."""

    def __init__(
        self, m: Manifest, slot: Slot, root: Path, *, dirs: Mapping[str, Path] | None = None
    ) -> None:
        self.name = slot.name
        self.slot = slot
        self.m = m
        self.root = root
        self.dirs = dirs
        self._fds: list[int] = []
        self._spans: list[tuple[int, int, int]] = []  # (offset, end, fd), other ranks' chunks
        self._starts: list[int] = []
        self._own: int | None = None
        self._holders = part_holders(m)
        try:
            for shard in self._holders if dirs is None else ():
                self._fds.append(pin_step(root / shard, m.step))
        except BaseException:
            self.close()
            raise

    def open(self, wait_s: float = 0.0) -> PartsReader:
        """Find and open each other rank's part (see the class docstring).  Raises
        :class:`CorruptCheckpointError` if one is not there within ``wait_s`` seconds."""
        spans = []
        for shard, chunks in self._holders.items():
            fd = self._open_part(shard, chunks, wait_s)
            spans += [(c.offset, c.offset + c.nbytes, fd) for c in chunks]
        self._spans = sorted(spans)
        self._starts = [sp[0] for sp in self._spans]
        return self

    def _open_part(self, shard: str, chunks: list[ChunkEntry], wait_s: float) -> int:
        deadline = time.monotonic() + wait_s
        delay = 0.0005
        root = self.root if self.dirs is None else self.dirs[shard].parent
        while True:
            try:
                path = part_slot(root, shard, self.m, chunks)
                fd = open_private(path)
                self._fds.append(fd)
                if any(c.offset + c.nbytes > os.fstat(fd).st_size for c in chunks):
                    raise CorruptCheckpointError(f"rank {shard}'s slot file {path} is truncated")
                return fd
            except (CorruptCheckpointError, FileNotFoundError) as exc:
                if time.monotonic() + delay > deadline or self.dirs is not None or not _alive(root / shard):
                    if isinstance(exc, FileNotFoundError):
                        raise CorruptCheckpointError(
                            f"rank {shard}'s part of step {self.m.step} is gone"
                        ) from exc
                    raise
                time.sleep(delay)
                delay = min(delay * 2, 0.02)

    def _fd_at(self, offset: int) -> int | None:
        i = bisect.bisect_right(self._starts, offset) - 1
        if i >= 0 and offset < self._spans[i][1]:
            return self._spans[i][2]
        return None

    def view(self, offset: int, nbytes: int) -> memoryview:
        """The bytes ``[offset, offset + nbytes)`` (within one chunk)."""
        fd = self._fd_at(offset)
        if fd is None:
            return self.slot.view(offset, nbytes)
        buf = memoryview(bytearray(nbytes))
        if os.preadv(fd, [buf], offset) != nbytes:
            raise CorruptCheckpointError(f"a part of the snapshot is truncated at byte {offset}")
        return buf

    def readv(self, offset: int, bufs: list[memoryview]) -> int:
        """``preadv`` of the bytes at ``offset`` (within one chunk) into ``bufs``."""
        fd = self._fd_at(offset)
        if fd is not None:
            return os.preadv(fd, bufs, offset)
        if self._own is None:
            self._own = open_private(self.slot.path)
            self._fds.append(self._own)
        return os.preadv(self._own, bufs, offset)

    def close(self) -> None:
        fds, self._fds = self._fds, []
        for fd in fds:
            os.close(fd)  # a pin goes with its descriptor
        self._spans, self._starts, self._own = [], [], None

    def __enter__(self) -> PartsReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def lock(directory: Path, trusted_above: Path) -> int:
    """The memory tier's ``flock`` (its file descriptor): refuses a second live Checkpointer
    on ``directory`` (:class:`ConfigError`).

    The holder unlinks the file at a clean close while it still holds it (and removes the
    directory once empty), so a process that opened the old file meanwhile gets the lock
    of an unlinked inode: every taker checks that the file it locked is still the one at
    the path, else it makes the directory again if needed and tries again."""
    path = directory / "lock"
    for _ in range(100):
        try:
            fd = open_private(path, write=True, create=True)
        except FileNotFoundError:  # the directory went with a clean close meanwhile
            private_dir(directory, trusted_above=trusted_above)
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise ConfigError(
                f"memory tier {directory} is in use by another live process "
                "(two Checkpointers for the same storage and rank?)"
            ) from None
        try:
            same = os.fstat(fd).st_ino == os.stat(path, follow_symlinks=False).st_ino
        except FileNotFoundError:
            same = False
        if same:
            return fd
        os.close(fd)  # the old holder unlinked it after we opened it: take the new file
    raise ConfigError(f"cannot take the lock of memory tier {directory}")
