"""What one rank's mirror server holds: the mirrors peers pushed to it, and the orphaned
shard directories of its node it claimed.

Each owner's copies live in ``<rank dir>/mirrors/<owner shard>/``: two slots and a memory
tier of the same kind and format as the owner's own (:class:`Held`).  Which slot holds which
step, and the manifests saying so, are the :class:`~flashckpt.staging.memory_tier.MemoryTier`'s:
one set of rules for a rank's own memory, the mirrors it holds and the orphans it serves.

A server also serves **orphaned shard directories** of its node: when ranks are renumbered
across nodes between attempts, rank ``r``'s memory (and the mirrors it held) stays in
``<memory root>/r<r>-of-<world>/`` on the node it ran on, where no rank of the new attempt
uses that directory.  During ``restore`` one rank on that node claims it (the directory's
``flock``, which live ranks hold on their own) and serves its snapshots and mirrors like
mirrors; a clean close drops what it served once the owners are durable.

Any thread (the server's connection threads and the training thread) may call these; each
owner's ``Held.lock`` is held for a whole transfer, and the tables under ``Holdings._lock``.
"""

from __future__ import annotations

import fcntl
import logging
import os
import shutil
import threading
from pathlib import Path
from typing import Any

from flashckpt._secure import check_private_dir, open_private, private_dir
from flashckpt.format import SHARD_PATTERN, SLOT_NAMES, part_holders
from flashckpt.staging.memory_tier import MemoryTier
from flashckpt.staging.stager import Slot

log = logging.getLogger(__name__)


class Held:
    """The two slots and the memory tier of one owner's mirrored snapshots on this rank (or
    of an orphaned shard directory's own snapshots).  ``lock`` is held for a whole transfer;
    the slots' steps change only under it."""

    def __init__(self, directory: Path, *, parts: bool = False) -> None:
        """``parts``: a rank's own memory tier (an orphan's), whose snapshots may leave chunks
        to the other ranks of the node (read here); else a mirror, whose snapshots may leave
        chunks to the mirrors of the owner's node-mates (wherever they are held)."""
        # created 0700 (or checked: ours, not a link, private) below the rank's own directory
        directory = private_dir(directory, trusted_above=directory.parent.parent)
        self.directory = directory
        # a peer's snapshots never go to a GPU from here: never page-locked
        self.slots = [Slot(directory, i, pin=False) for i in range(len(SLOT_NAMES))]
        self.tier = MemoryTier(directory, self.slots, parts=parts, remote_parts=not parts)
        self.backend = self.tier.backend
        self.lock = threading.Lock()  # one transfer at a time per owner
        self.tier.adopt()  # what an earlier process left: unusable manifests are dropped

    def steps(self) -> list[int]:
        """The steps held here (oldest first)."""
        return sorted(s.step for s in self.slots if s.step is not None)

    def slot_for_put(self) -> Slot:
        """The slot to receive a push into: never the one holding the newest copy."""
        empty = next((s for s in self.slots if s.step is None), None)
        if empty is not None:
            return empty
        newest = self.tier.newest_slot()
        return next(s for s in self.slots if s is not newest)

    def close(self) -> None:
        for s in self.slots:
            s.release_mapping()


class Orphan:
    """A shard directory of this node that no rank of this attempt uses, claimed (locked) by
    this rank's server: the snapshots its rank left, and the mirrors it held for others."""

    def __init__(self, directory: Path, fd: int) -> None:
        self.directory = directory
        self.fd = fd
        self.own = Held(directory, parts=True)
        mirrors = directory / "mirrors"
        self.mirrors = {
            d.name: Held(d)
            for d in (sorted(mirrors.iterdir()) if mirrors.is_dir() else [])
            if d.is_dir() and SHARD_PATTERN.fullmatch(d.name)
        }

    def empty(self) -> bool:
        return not self.own.steps() and not self.mirrors

    def storages(self) -> set[str]:
        """The storage tiers the snapshots held here were saved for (non-empty ids)."""
        return {
            m.storage for ms in [self.own, *self.mirrors.values()] for m in ms.tier.holdings() if m.storage
        }

    def drop_own(self) -> None:
        """Delete the snapshots the shard's rank left here (the slots and their manifests)."""
        with self.own.lock:
            self.own.close()
            self.own.tier.clear()
            for s in self.own.slots:
                s.path.unlink(missing_ok=True)

    def close(self) -> None:
        self.own.close()
        for ms in self.mirrors.values():
            ms.close()
        os.close(self.fd)


def claim_directory(directory: Path) -> Orphan | None:
    """Lock the shard directory ``directory`` (its ``flock``, which a live rank holds on its
    own) and open its snapshots and the mirrors it holds; None if a live process holds it.
    Raises :class:`ConfigError` if it is not private (ours, not a link, no access for
    others) and ``OSError``/``ConfigError`` for what cannot be read.  The caller closes the
    result (which unlocks it).  Any thread."""
    check_private_dir(directory)
    fd = open_private(directory / "lock", write=True, create=True)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return None
    except BaseException:
        os.close(fd)
        raise
    try:
        return Orphan(directory, fd)
    except BaseException:
        os.close(fd)
        raise


class Holdings:
    """Everything one rank's mirror server holds (see the module docstring)."""

    def __init__(self, rank_dir: Path) -> None:
        self.rank_dir = rank_dir
        self.root = rank_dir / "mirrors"
        self._owners: dict[str, Held] = {}
        self._orphans: dict[str, Orphan] = {}
        self._lock = threading.Lock()

    def holdings(self) -> dict[str, list[int]]:
        """Shard -> steps of it held here: mirrors pushed to this rank (adopting what an
        earlier process left), and the snapshots and mirrors of claimed orphan directories."""
        out: dict[str, set[int]] = {}
        if self.root.is_dir():
            for d in sorted(self.root.iterdir()):
                if d.is_dir() and SHARD_PATTERN.fullmatch(d.name):
                    out.setdefault(d.name, set()).update(self.slots(d.name).steps())
        with self._lock:
            orphans = list(self._orphans.items())
        for shard, o in orphans:
            out.setdefault(shard, set()).update(o.own.steps())
            for owner, ms in o.mirrors.items():
                out.setdefault(owner, set()).update(ms.steps())
        return {k: sorted(v) for k, v in sorted(out.items())}

    def snapshots(self) -> dict[str, list[list[Any]]]:
        """Shard -> ``[generation, step, storage id, run id, ancestors, holders]`` of each valid
        snapshot held here (the restore inventory: a restoring rank filters by run and orders
        by ``(generation, step)``).  ``holders``: the shards whose mirrors of the same snapshot
        hold the chunks this copy leaves to them (replicated state sent once per node).
        Training thread."""
        out: dict[str, list[list[Any]]] = {}
        for shard in self.holdings():
            for ms in self.sources(shard):
                for m in ms.tier.holdings():  # the valid ones (the others are logged, skipped)
                    holders = sorted(part_holders(m)) if ms.tier.remote_parts else []  # (else served whole)
                    ancestors = [list(a) for a in m.ancestors]
                    entry = [m.generation, m.step, m.storage, m.run, ancestors, holders]
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
                orphan = claim_directory(d)
            except Exception as exc:  # one unreadable leftover must not fail the restore  # noqa: BLE001
                log.warning("flashckpt: not serving %s: %s", d, exc)
                continue
            if orphan is None:  # a live rank's own directory, or another rank claimed it
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

    def slots(self, owner: str) -> Held:
        """The mirrors of ``owner`` pushed to this rank (created on first use)."""
        with self._lock:
            ms = self._owners.get(owner)
            if ms is None:
                ms = self._owners[owner] = Held(self.root / owner)
            return ms

    def sources(self, shard: str) -> list[Held]:
        """Where snapshots of ``shard`` may be held here."""
        out = [self.slots(shard)] if (self.root / shard).is_dir() else []
        with self._lock:
            for name, o in self._orphans.items():
                if name == shard:
                    out.append(o.own)
                if shard in o.mirrors:
                    out.append(o.mirrors[shard])
        return out

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
        """Unmap everything; orphan directories still held are unlocked and kept."""
        with self._lock:
            for ms in self._owners.values():
                ms.close()
            for o in self._orphans.values():
                o.close()
            self._orphans.clear()
