"""Snapshots that live in memory only, made durable: after a restore, and at close.

After a restore (:meth:`Salvage.after_restore`, every rank, gathers), snapshots staged in
memory but not persisted (the crash came first) are written to the tiers that lack them.  At
close (:meth:`Salvage.at_close`, no collective), the snapshots newer than everything a
persistent tier holds are; :meth:`Salvage.memory_durable` then says whether the memory tier
may go.  Training thread only; the writes run on the persist thread.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from flashckpt.coordination.handle import SaveHandle
from flashckpt.coordination.inventory import Ancestors, Order, read_commits
from flashckpt.coordination.parts import RankParts
from flashckpt.coordination.plan import Inventory, memory_snapshots
from flashckpt.coordination.retention import abandoned
from flashckpt.coordination.worker import Job
from flashckpt.errors import CorruptCheckpointError, FlashCkptError, StorageError
from flashckpt.format import Manifest, decode_manifest, manifest_key
from flashckpt.staging.stager import Slot
from flashckpt.transfer.reader import read_record
from flashckpt.transfer.tier import Tier

log = logging.getLogger(__name__)


class Salvage:
    """One rank's memory snapshots, made durable where a tier lacks them."""

    def __init__(self, parts: RankParts, track: Callable[[SaveHandle], None]) -> None:
        self.parts = parts
        self.track = track  # the Checkpointer's: ``wait`` and ``close`` see every job's handle
        #: the last snapshot saved or restored: (step, slot, persisted or salvaged)
        self.last: tuple[int, Slot, bool] | None = None
        self._restores = 0  # restores so far: the same on every rank, names a salvage's jobs
        # outcome keys of shared commits another rank makes of snapshots this rank holds in
        # memory (a salvage where this rank's shard was there): close waits for them
        self._awaited: list[str] = []

    def after_restore(self, m: Manifest, slot: Slot, inventory: Inventory) -> None:
        """Salvage, then prefault the other slot.  Every rank calls this (it gathers).

        Snapshots staged in memory but not persisted (the crash came first) are written to the
        tiers that lack them, oldest first: the restored one, and an older snapshot of the same
        generation still in the other slot if it is newer than what a tier holds.  On the
        shared tier of a multi-rank job a step can only be committed with every rank's shard:
        the ranks whose shard is missing there write it and the last of them commits; if every
        shard is there already but the commit record is not (the committing rank died), rank 0
        commits it.  A snapshot restored from a persistent tier is written again only where the
        job needs it committed: the shared tier.
        """
        p = self.parts
        self._restores += 1
        order = m.order
        held = {t.name: set(s) for t, s in inventory}
        missing = [t for t in p.tiers if order not in held.get(t.name, set())]
        p.stager.mark_staged(slot, durable=bool(p.tiers) and not missing)
        # in memory now: the restored snapshot (whatever tier it came from), and older ones
        # of its generation (other generations are other timelines: never salvaged)
        in_memory = {o for o in held.get(p.memory.name, set()) if o[0] == order[0]} | {order}
        todo: dict[Order, list[Tier]] = {}
        for t in p.tiers:
            if t.shared and p.ctl.distributed:
                continue
            on_tier = held.get(t.name, set())
            newest = max(on_tier, default=(-1, -1))
            for o in sorted(in_memory):
                if o not in on_tier and (o == order or newest < o < order):
                    todo.setdefault(o, []).append(t)
        writers: dict[Order, int] = {}
        if p.ctl.distributed:  # the restored snapshot's bytes are in its slot, wherever they came from
            writers = self._shared(order, in_memory, held, todo)
        for o in sorted(todo):
            self._salvage(o, m if o == order else None, slot, todo[o], writers.get(o))
        # A restored snapshot counts as persisted: what a tier lacks was salvaged above (the
        # same decision on every rank: close must never start a shared commit only some do).
        self.last = (m.step, slot, True)
        if order not in todo:
            p.stager.release(slot)
        p.stager.prefault(m.total_bytes)

    def _shared(
        self,
        restored: Order,
        in_memory: set[Order],
        held: dict[str, set[Order]],
        todo: dict[Order, list[Tier]],
    ) -> dict[Order, int]:
        """Every rank (gathers): which uncommitted snapshots the ranks write to the shared
        tier (added to ``todo``); returns the number of writers per snapshot."""
        p = self.parts
        shared = next(t for t in p.tiers if t.shared)
        committed = held.get(shared.name, set())
        newest = max(committed, default=(-1, -1))
        mine = sorted(o for o in in_memory if o not in committed and (o == restored or newest < o < restored))
        gathered = p.ctl.all_gather([list(o) for o in mine])
        orders = sorted({(int(g), int(s)) for lst in gathered for g, s in lst})
        status = [self._shard_status(shared, o, in_memory) for o in orders]
        everyone = p.ctl.all_gather(status)
        writers: dict[Order, int] = {}
        for i, o in enumerate(orders):
            column = [st[i] for st in everyone]
            if "none" in column:
                continue  # some rank has neither the shard nor the snapshot: never complete
            writers[o] = column.count("write")
            # the key the committing rank publishes its outcome under (the persist thread's
            # for the writers' jobs, which share this seq on every rank)
            key = f"commit/{shared.name}/{o[1]}/restore{self._restores}"
            if status[i] == "write":
                todo.setdefault(o, []).append(shared)
            elif writers[o] == 0 and p.rank == 0:
                self._commit_present(shared, o, key)
            else:  # another rank commits it: close waits for that before it judges the memory tier
                self._awaited.append(key)
        return writers

    def _commit_present(self, shared: Tier, o: Order, key: str) -> None:
        """Rank 0: every shard of ``o`` is on the shared tier, its commit record is not (the
        committing rank died): commit it, and publish the outcome under ``key``."""
        p = self.parts
        log.info("flashckpt: every shard of step %d is on the storage tier; committing it", o[1])
        outcome = "ok"
        try:
            p.persister.commits.commit_shared(shared, o[1], p.world, o)
        except FlashCkptError as exc:
            log.error("flashckpt: committing step %d failed: %s", o[1], exc)
            outcome = f"failed: {exc}"
        p.ctl.publish(key, outcome)

    def _shard_status(self, tier: Tier, order: Order, in_memory: set[Order]) -> str:
        """``have``: this rank's manifest of that very snapshot is on ``tier``; ``write``: it
        is not, but the snapshot is in memory; ``none``: neither."""
        p = self.parts
        key = manifest_key(order[1], p.rank, p.world)
        try:
            there = decode_manifest(read_record(tier.backend, key, key, p.opts), key)
            if there.order == order:
                return "have"
        except (StorageError, CorruptCheckpointError):
            pass
        return "write" if order in in_memory else "none"

    def _salvage(
        self, order: Order, m: Manifest | None, slot: Slot | None, tiers: list[Tier], writers: int | None
    ) -> None:
        """Hand a memory snapshot to the persist thread (``m``/``slot``: the restored one,
        whose slot the caller holds; else the snapshot is looked up and its slot taken)."""
        step = order[1]
        if m is None:
            taken = self._take(step, lambda held, _slot: held.order == order, "another snapshot")
            if taken is None:
                return
            m, slot = taken
        assert slot is not None
        log.info(
            "flashckpt: step %d is missing on the %s tier; persisting it from memory",
            step,
            ", ".join(t.name for t in tiers),
        )
        seq = f"restore{self._restores}"
        self._submit(m, slot, tiers, seq, writers)

    def _take(
        self, step: int, expect: Callable[[Manifest, Slot], bool], otherwise: str
    ) -> tuple[Manifest, Slot] | None:
        """The memory snapshot of ``step`` and its slot, taken busy; None (logged) if the
        memory tier does not hold it validated, holds ``otherwise`` (``expect`` fails), or its
        slot is busy (a save took it meanwhile)."""
        p = self.parts
        try:
            m, slot = p.mem.read(step)
            if not expect(m, slot):
                raise CorruptCheckpointError(f"memory holds {otherwise} of step {step}")
        except (CorruptCheckpointError, StorageError) as exc:
            log.warning("flashckpt: cannot persist the memory snapshot of step %d: %s", step, exc)
            return None
        if not p.stager.try_acquire(slot):
            return None
        return m, slot

    def _submit(
        self, m: Manifest, slot: Slot, tiers: list[Tier], seq: str, writers: int | None = None
    ) -> None:
        """Hand the snapshot in ``slot`` (held busy; given back if this fails) to the persist
        thread for ``tiers``."""
        handle = SaveHandle(m.step, [t.name for t in tiers])
        job = Job(
            m, slot, tiers, handle, hashed=m.sealed, seq=seq, writers=writers, generation=slot.generation
        )
        try:
            self.parts.persister.submit(job)
        except BaseException:
            self.parts.stager.release(slot)
            raise
        self.track(handle)

    # -- close ---------------------------------------------------------------------------------
    def at_close(self, failed: set[int], *, shared: bool = True) -> None:
        """On close: persist the snapshots that live in memory only (``failed``: steps whose
        save failed already: reported, not retried here).

        A multi-rank job persists the last one saved (every rank makes the same saves, so
        every rank submits the same job: close runs no collective); one process persists
        every snapshot of its memory tier that a tier lacks (a look at an older step with
        ``restore(step=...)`` after memory-only saves leaves the newer one there).

        ``shared=False`` (a multi-rank job leaving on an exception: its peers may be dead, and
        a commit on the shared tier would wait ``coord_timeout_s`` for them, holding back the
        restart): only this rank's own tiers; the memory tier keeps the snapshot for the
        restart, which salvages it to the shared tier."""
        p = self.parts
        if not p.tiers:
            return
        if not p.ctl.distributed:
            try:
                for order, tiers in self.not_durable():
                    if order[1] not in failed:
                        self._persist(order[1], None, tiers)
                return
            except FlashCkptError as exc:  # a tier cannot be listed: persist the last one, at least
                log.warning("flashckpt: cannot tell which snapshots only live in memory: %s", exc)
        tiers = [t for t in p.tiers if shared or not (t.shared and p.ctl.distributed)]
        if self.last is not None and not self.last[2] and tiers:
            self._persist(self.last[0], self.last[1], tiers)

    def not_durable(self) -> list[tuple[Order, list[Tier]]]:
        """The memory tier's snapshots of this run (not of an abandoned timeline) that are
        newer than everything a persistent tier holds, oldest first, with those tiers.  (An
        older one that a tier lacks was retired there, or superseded while it lived in memory
        only: it is not lost.)  Raises ``StorageError`` if a tier cannot be listed."""
        p = self.parts
        memory = memory_snapshots(p)
        held: dict[str, dict[Order, Ancestors]] = {
            t.name: {r.order: r.ancestors for r in read_commits(t.backend, p.opts)} for t in p.tiers
        }
        seen = dict(memory)
        for h in held.values():
            seen.update(h)
        left = abandoned(list(seen.items()))

        def lacking(o: Order) -> list[Tier]:
            return [t for t in p.tiers if o > max(held[t.name], default=(-1, -1))]

        return [(o, ts) for o in sorted(memory) if o not in left and (ts := lacking(o))]

    def _persist(self, step: int, slot: Slot | None, tiers: list[Tier]) -> None:
        """Close: hand the memory snapshot of ``step`` (in ``slot`` when the caller knows it)
        to the persist thread for ``tiers``."""
        taken = self._take(step, lambda _m, held: slot is None or held is slot, "it in another slot")
        if taken is None:
            return
        m, holder = taken
        if self.last is not None and self.last[0] == step:
            self.last = (step, holder, True)
        self._submit(m, holder, tiers, "close")

    def await_shared_commits(self) -> None:
        """Close, every rank that salvaged: wait (bounded by ``coord_timeout_s``) for the shared
        commits other ranks make of snapshots this rank holds, so that the memory tier is judged
        after them, not while they are on their way."""
        for key in self._awaited:
            try:
                outcome = self.parts.ctl.await_outcome(key)
            except FlashCkptError as exc:
                log.warning("flashckpt: %s: %s", key, exc)
                continue
            if outcome != "ok":
                log.warning("flashckpt: %s: %s", key, outcome)
        self._awaited.clear()

    def memory_durable(self) -> bool:
        """Every snapshot the memory tier holds for this run is committed on every persistent
        tier (or lies on an abandoned timeline): the memory tier may go."""
        try:
            return not self.not_durable()
        except FlashCkptError:
            return False
