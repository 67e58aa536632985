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

import contextlib
import fcntl
import logging
import os
import re
import threading
from collections.abc import Iterable
from pathlib import Path

from flashckpt._secure import open_private, private_dir
from flashckpt.backends import LocalBackend
from flashckpt.errors import ConfigError, CorruptCheckpointError, StorageError
from flashckpt.format import (
    Manifest,
    check_memory_manifest,
    decode_manifest,
    encode_manifest,
    memory_manifest,
    memory_manifest_key,
    parse_memory_manifest_key,
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
    key = memory_manifest_key(step)
    what = what or f"memory manifest {key}"
    m = decode_manifest(be.get(key), what, allow_unsealed=True)
    if m.step != step:
        raise CorruptCheckpointError(f"{what} describes step {m.step}")
    return m


class MemoryTier:
    """One memory-tier directory and its slots.  See the module docstring."""

    name = "memory"

    def __init__(self, directory: Path, slots: Iterable[Slot], backend: LocalBackend | None = None) -> None:
        self.directory = directory
        self.slots = list(slots)
        self.backend = backend or LocalBackend(
            directory, fsync=False, direct_io=False, private=True, durable=False
        )
        self._lock = threading.Lock()
        #: slot name -> ``(generation, step)`` of the snapshot it holds
        self._order: dict[str, tuple[int, int]] = {}

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
        check_memory_manifest(m, self._what(step), capacity=slot.capacity)
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
                    check_memory_manifest(m, self._what(step), capacity=slot.capacity)
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
        mm = memory_manifest(m, slot.name)
        check_memory_manifest(mm, self._what(m.step), capacity=slot.capacity)
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
        mm = memory_manifest(m, slot.name)
        check_memory_manifest(mm, self._what(m.step), capacity=slot.capacity)
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
        return read_memory_manifest(self.backend, step, self._what(step))

    def _slot_named(self, m: Manifest, step: int) -> Slot:
        name = check_memory_manifest(m, self._what(step))
        return next(s for s in self.slots if s.name == name)


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
