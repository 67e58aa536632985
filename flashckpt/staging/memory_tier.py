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

import logging
import os
import re
import threading
from collections.abc import Iterable
from pathlib import Path

from flashckpt.backends import LocalBackend
from flashckpt.errors import CorruptCheckpointError, StorageError
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

log = logging.getLogger(__name__)

_TEMP_MANIFEST = re.compile(r"step-\d{12}\.manifest\.tmp-[A-Za-z0-9._-]+")


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

    # -- reading --------------------------------------------------------------------------------
    def steps(self) -> list[int]:
        """Step numbers with a manifest here, oldest first (not validated: :meth:`read` is)."""
        names = self.backend.children("")
        return sorted(s for n in names if (s := parse_memory_manifest_key(n)) is not None)

    def read(self, step: int) -> tuple[Manifest, Slot]:
        """The validated manifest of ``step`` and the slot that holds it.  Raises
        :class:`CorruptCheckpointError` if the manifest is bad or no slot holds the step."""
        m = self._decode(step)
        slot = self._slot_named(m, step)
        if slot.step != step:
            raise CorruptCheckpointError(f"memory snapshot of step {step} in {self.directory} has no slot")
        check_memory_manifest(m, self._what(step), capacity=slot.capacity)
        return m, slot

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
            if slot.step is not None and slot.step != m.step:
                self.backend.delete(memory_manifest_key(slot.step))
            slot.step = None
            self.backend.put(memory_manifest_key(m.step), data)
            slot.step = m.step
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

    def forget_step(self, step: int) -> None:
        """Delete the snapshot of ``step`` wherever it is held (its slot is idle)."""
        with self._lock:
            for s in self.slots:
                if s.step == step:
                    s.step = None
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

    # -- helpers --------------------------------------------------------------------------------
    def _what(self, step: int) -> str:
        return f"memory manifest of step {step} in {self.directory}"

    def _decode(self, step: int) -> Manifest:
        key = memory_manifest_key(step)
        m = decode_manifest(self.backend.get(key), self._what(step), allow_unsealed=True)
        if m.step != step:
            raise CorruptCheckpointError(f"{self._what(step)} describes step {m.step}")
        return m

    def _slot_named(self, m: Manifest, step: int) -> Slot:
        name = check_memory_manifest(m, self._what(step))
        return next(s for s in self.slots if s.name == name)
