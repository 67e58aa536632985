"""Loading the newest snapshot every rank can load into a live state, in place.

For each snapshot of a :class:`~flashckpt.coordination.plan.RestorePlan`, newest first, each
rank tries its sources cheapest first (its memory, a peer's mirror of its shard, its local
tier, storage), and the ranks agree (a gather) whether every one of them loaded it; if some
rank could not, all go on to the next older one.  Nothing is written into the state before
the snapshot's structure is found compatible with it.  Training thread only; the methods
that gather say so.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable
from typing import Any

import torch

from flashckpt import _hooks as hooks
from flashckpt.coordination.inventory import Ancestors, Order, Source, plan_sources, read_committed_manifest
from flashckpt.coordination.parts import RankParts
from flashckpt.coordination.plan import Inventory, RestorePlan
from flashckpt.coordination.reshard import StepReader
from flashckpt.coordination.worker import PersisterDied
from flashckpt.errors import (
    CheckpointNotFound,
    CoordinationError,
    CorruptCheckpointError,
    FlashCkptError,
    StateMismatchError,
    StorageError,
)
from flashckpt.format import ChunkEntry, Manifest, carried, memory_manifest, part_holders, shard_name
from flashckpt.replication.client import fetch
from flashckpt.staging.apply import apply, fill_targets, part_fills, precheck
from flashckpt.staging.memory_tier import PartsReader
from flashckpt.staging.stager import Slot, check_fits
from flashckpt.staging.statewalk import flatten
from flashckpt.transfer.reader import fetch_chunks, verify_chunks
from flashckpt.transfer.tier import Tier

log = logging.getLogger(__name__)


@dataclasses.dataclass
class Loaded:
    """A step loaded into the state: from ``tier``, staged in ``slot`` (held busy) under
    ``manifest``; both ``None`` when it was resharded from storage."""

    order: Order
    tier: Tier
    manifest: Manifest | None
    slot: Slot | None
    nbytes: int
    run: str = ""  # the run it belongs to, as every rank agreed (rank 0's)

    @property
    def step(self) -> int:
        return self.order[1]

    def ancestry(self, inventory: Inventory) -> Ancestors:
        """The loaded snapshot's own ancestry (from its manifest, else the inventory)."""
        if self.manifest is not None:
            return self.manifest.ancestors
        for _, held in inventory:
            if self.order in held:
                return held[self.order]
        return ()


@dataclasses.dataclass
class Progress:
    """Across the steps a restore tries: whether the state was written to, the last error."""

    touched: bool = False
    last_error: BaseException | None = None

    def failed(self, exc: BaseException, *, touched: bool) -> None:
        self.last_error = exc
        self.touched = self.touched or touched


class Restorer:
    """Loads snapshots of one rank into its state (see the module docstring)."""

    def __init__(self, parts: RankParts) -> None:
        self.parts = parts

    def newest(self, plan: RestorePlan, state: Any) -> tuple[Loaded | None, Progress]:
        """Every rank (gathers): load the newest snapshot of ``plan`` every rank loads."""
        progress = Progress()
        for key in plan.steps:
            loaded, fatal = self._load_step(key, state, plan, progress)
            if self._agree(key, loaded, fatal, progress):
                return loaded, progress
        return None, progress

    def nothing(self, want: int | None, state: Any, progress: Progress) -> None:
        """Every rank (gathers): no step could be restored.  Raise if that is not a clean
        fresh start, else prefault the slots for ``state``."""
        p = self.parts
        outcome = p.ctl.all_gather(progress.touched)
        if any(outcome):
            raise CorruptCheckpointError(
                "no step could be restored on every rank, and a state was already written to (a "
                "snapshot found corrupt while it was loaded, or a step another rank could not "
                "load): the state is partially overwritten; rebuild it"
            ) from progress.last_error
        if want is not None:
            raise CheckpointNotFound(f"step {want} is not available intact on every rank") from (
                progress.last_error
            )
        if progress.last_error is not None:
            log.warning("flashckpt: no usable checkpoint found; starting from scratch")
        p.stager.prefault(p.stager.layout(flatten(state).tensors).total_bytes)

    def _sources(self, key: Order, plan: RestorePlan) -> list[tuple[Source, int | None]]:
        """Where this rank's shard of ``key`` is, cheapest first: (source, peer rank holding
        a copy in its memory, or None)."""
        sources: list[tuple[Source, int | None]] = [(src, None) for src in plan_sources(plan.inventory, key)]
        at = 1 if sources and sources[0][0].tier is self.parts.memory else 0
        mirror = self.parts.mirror_tier
        sources[at:at] = [(Source(key[1], mirror, key[0]), q) for q in plan.mirrored.get(key, [])]
        return sources

    def _load_step(
        self, key: Order, state: Any, plan: RestorePlan, progress: Progress
    ) -> tuple[Loaded | None, BaseException | None]:
        """Load snapshot ``key`` into ``state`` from this rank's cheapest source that
        verifies.  Returns what was loaded (``None``: no source worked), and an error that
        ends the restore on every rank (the state does not fit the step).

        Anything that goes wrong while a source is read and verified (whatever its type: a
        hostile record can provoke any) makes that source unusable, and the next is tried."""
        step = key[1]
        for src, peer in self._sources(key, plan):
            filled: dict[int, torch.Tensor] = {}
            where = f"rank {peer}'s memory" if peer is not None else f"the {src.tier.name} tier"
            try:
                if peer is not None:  # a copy of this rank's shard in a peer's memory
                    m, slot = self._from_mirror(peer, key, state, plan.part_copies, filled)
                else:
                    m, slot = self._from_tier(src.tier, key, state, filled)
            except StateMismatchError as exc:
                if peer is not None or not src.tier.shared:
                    return None, exc
                try:
                    nbytes = self._reshard(src.tier, step, state, exc)
                except (CorruptCheckpointError, StorageError) as err:
                    progress.failed(err, touched=True)
                    log.warning("flashckpt: resharding step %d failed: %s", step, err)
                    continue
                except BaseException as err:  # returned: the caller tries the next source  # noqa: BLE001
                    return None, err
                return Loaded(key, src.tier, None, None, nbytes), None
            except (PersisterDied, KeyboardInterrupt):
                raise
            except Exception as exc:  # logged: the next source is tried  # noqa: BLE001
                progress.failed(exc, touched=bool(filled))
                log.warning(
                    "flashckpt: step %d on %s is unusable, trying the next source: %s", step, where, exc
                )
                continue
            try:
                hooks.fire("restore.loaded", step=step, tier=src.tier.name if peer is None else "mirror")
                apply(m, slot, state, filled)
            except BaseException as exc:  # the state does not fit the step: the user's to fix  # noqa: BLE001
                self.parts.stager.release(slot)
                return None, exc
            return Loaded(key, src.tier, m, slot, m.total_bytes), None
        return None, None

    def _agree(
        self, key: Order, loaded: Loaded | None, fatal: BaseException | None, progress: Progress
    ) -> bool:
        """Every rank (gathers): True if every rank loaded snapshot ``key`` (``loaded.run`` is
        then the run it belongs to, rank 0's).  Raises a rank's fatal error on every rank;
        else, if another rank failed, the state holds the step here and the next older
        snapshot will overwrite it."""
        run = loaded.manifest.run if loaded is not None and loaded.manifest is not None else ""
        outcomes = self.parts.ctl.all_gather(
            [loaded is not None, None if fatal is None else repr(fatal), run]
        )
        if fatal is not None:
            raise fatal
        failed = [(r, f) for r, (_, f, _) in enumerate(outcomes) if f is not None]
        if failed:
            raise CoordinationError(f"restore failed on rank {failed[0][0]}: {failed[0][1]}")
        if loaded is not None and all(ok for ok, _, _ in outcomes):
            loaded.run = str(outcomes[0][2])
            return True
        if loaded is not None:
            progress.touched = True
            if loaded.slot is not None:
                self.parts.stager.release(loaded.slot)
            log.warning("flashckpt: step %d is unusable on another rank; trying an older one", key[1])
        return False

    def _from_tier(
        self, tier: Tier, key: Order, state: Any, filled: dict[int, torch.Tensor]
    ) -> tuple[Manifest, Slot]:
        """Return the verified memory manifest of snapshot ``key`` and a busy slot holding
        its bytes, after checking ``state`` can take it (nothing is written to the state
        before that).

        From the memory tier, tensors of ``state`` that the step will be loaded into (CPU,
        contiguous, same dtype and shape) are filled while the slot is checksummed: one pass
        over memory instead of two.  They are recorded in ``filled``; if verification fails
        after that, the caller knows the state was written to.  From a persistent tier, the
        shard is read into a slot, which then holds it as a memory snapshot.
        """
        p = self.parts
        step = key[1]
        if tier is p.memory:
            m, slot = p.mem.read(step)
            if m.order != key:
                raise CorruptCheckpointError(f"the memory tier holds another snapshot of step {step}")
            precheck(state, m)
            if not p.stager.try_acquire(slot):
                raise CorruptCheckpointError(f"slot of step {step} is busy")
            try:
                fills = fill_targets(m, state, filled)
                if part_holders(m):  # chunks the node's other ranks hold: read from their slots
                    fills = part_fills(m, fills, slot)
                    with PartsReader(m, slot, p.memory_root).open() as src:
                        sealed = verify_chunks(
                            m, src.view, p.persister.pool, str(p.rank_dir), fills=fills, readv=src.readv
                        )
                else:
                    with slot.file_reader() as readv:
                        sealed = verify_chunks(
                            m, slot.view, p.persister.pool, str(p.rank_dir), base=slot.address, fills=fills,
                            readv=readv,
                        )  # fmt: skip
                if not m.sealed:  # the crash came before the persist thread checksummed it
                    p.mem.seal(slot, sealed)
            except BaseException:
                p.stager.release(slot)
                raise
            return sealed, slot
        m = read_committed_manifest(tier.backend, step, p.rank, p.world, p.opts)
        if m.order != key:
            raise CorruptCheckpointError(f"step {step} on the {tier.name} tier changed meanwhile")
        precheck(state, m)
        check_fits(m.total_bytes, p.rank_dir, f"step {step} on the {tier.name} tier")
        slot = self._take_slot(m.total_bytes, step)
        try:
            fetch_chunks(tier.backend, m, slot.view, p.persister.pool, p.opts)
            local = p.mem.record(slot, m)  # the slot holds decoded bytes: a raw manifest
        except BaseException:
            p.mem.forget(slot)
            p.stager.release(slot)
            raise
        return local, slot

    def _take_slot(self, nbytes: int, step: int) -> Slot:
        """A free slot, emptied and grown to ``nbytes``, for a copy of ``step`` (busy)."""
        p = self.parts
        # The newest snapshot, while memory is its only copy, is never overwritten by loading
        # another step: a restore of an older step leaves it to close (or the next save).
        newest = p.mem.newest_slot()
        keep = newest if newest is not None and not newest.durable and newest.step != step else None
        slot, _ = p.stager.acquire(
            nbytes, replacing=step, keep=keep, check=p.persister.check_alive, idle=p.persister.idle
        )
        try:
            p.mem.reclaim(slot, p.opts.coord_timeout_s)
            slot.ensure(nbytes, helpers=1)  # the restore waits for it: fault in on two threads
            slot.allocate([(0, nbytes)])  # pages given back to other ranks' parts: never a SIGBUS
        except BaseException:
            p.mem.forget(slot)
            p.stager.release(slot)
            raise
        return slot

    def _from_mirror(
        self,
        peer: int,
        key: Order,
        state: Any,
        part_copies: dict[str, dict[Order, list[int]]],
        filled: dict[int, torch.Tensor],
    ) -> tuple[Manifest, Slot]:
        """Fetch this rank's shard of snapshot ``key`` from the copy rank ``peer`` holds, into
        a free slot of this rank's memory tier, and verify every chunk.  The chunks that copy
        leaves to the copies of the shard's node-mates (replicated state sent once per node)
        are fetched from the peers holding those (``part_copies``).  Returns a busy slot.

        As from the memory tier, the tensors of ``state`` the step is loaded into are filled
        while the slot is verified (recorded in ``filled``: see ``_from_tier``)."""
        p = self.parts
        held: list[Slot] = []
        step = key[1]

        def into(m: Manifest) -> Callable[[int, int], memoryview]:
            check_fits(m.total_bytes, p.rank_dir, f"step {step} from rank {peer}'s mirror")
            held.append(self._take_slot(m.total_bytes, step))
            return held[-1].view

        try:
            me = shard_name(p.rank, p.world)
            m = fetch(p.addrs[peer], p.ctl.secret, me, step, into, p.opts)
            if (m.rank, m.world_size) != (p.rank, p.world) or m.order != key:
                raise CorruptCheckpointError(f"rank {peer}'s copy of step {step} is another snapshot")
            if not p.timeline.ours(m.storage, m.run, f"rank {peer}'s copies"):
                raise CorruptCheckpointError(f"rank {peer}'s copy of step {step} belongs to another run")
            precheck(state, m)
            slot = held[0]
            for shard, chunks in part_holders(m).items():
                fetch_part(p, m, shard, chunks, slot, part_copies.get(shard, {}).get(key, []))
            where = f"rank {peer}'s mirror"
            fills = fill_targets(m, state, filled)
            local = memory_manifest(m, slot.name)
            sealed = verify_chunks(local, slot.view, p.persister.pool, where, base=slot.address, fills=fills)
            sealed = p.mem.record(slot, sealed)
        except BaseException:
            for slot in held:
                p.mem.forget(slot)
                p.stager.release(slot)
            raise
        return sealed, slot

    def _reshard(self, tier: Tier, step: int, state: Any, mismatch: StateMismatchError) -> int:
        """Load ``step``, saved by another world size, from the shared tier: each DTensor's
        local shard is assembled from the saved shards that overlap it (see ``reshard``).
        Returns the bytes this rank read.  Re-raises ``mismatch`` when the step holds no
        DTensors: plain per-rank state cannot be redistributed."""
        p = self.parts
        reader = StepReader(tier.backend, step, p.opts, p.persister.pool)
        if reader.world == p.world or not reader.has_dtensors:
            raise mismatch
        log.info(
            "flashckpt: step %d was saved by %d ranks; resharding it for %d", step, reader.world, p.world
        )
        reader.restore_into(state, source_rank=p.rank % reader.world)
        return reader.bytes_read


def fetch_part(
    p: RankParts, m: Manifest, shard: str, chunks: list[ChunkEntry], slot: Slot, peers: list[int]
) -> None:
    """Fetch ``chunks`` of this rank's copy ``m``, which it leaves to node-mate
    ``shard``'s copy of the same snapshot, from the first of ``peers`` (holding one) that
    has them, into ``slot`` at their offsets.  The caller verifies every byte against
    ``m``'s checksums.  Training thread (``restore``).  Raises
    :class:`CorruptCheckpointError` if no peer could."""
    want = [(c.offset, c.nbytes) for c in chunks]

    def into(other: Manifest) -> Callable[[int, int], memoryview]:
        """The node-mate's copy must describe the same snapshot and hold the same chunks:
        nothing lands in the slot before that is checked."""
        same = (shard_name(other.rank, other.world_size), other.order, other.run, other.storage)
        if same != (shard, m.order, m.run, m.storage):
            raise CorruptCheckpointError(f"{shard}'s copy of step {m.step} is another snapshot")
        have = {c.offset: c for c in carried(other)}
        for c in chunks:
            h = have.get(c.offset)
            if h is None or (h.nbytes, h.checksum) != (c.nbytes, c.checksum):
                raise CorruptCheckpointError(f"{shard}'s copy of step {m.step}: no chunk at {c.offset}")
        return slot.view

    error: BaseException | None = None
    for q in peers:
        try:
            fetch(p.addrs[q], p.ctl.secret, shard, m.step, into, p.opts, want=want)
            return
        except FlashCkptError as exc:  # the next peer holding a copy is tried
            log.info("flashckpt: %s's part of step %d from rank %d: %s", shard, m.step, q, exc)
            error = exc
    raise CorruptCheckpointError(
        f"the chunks step {m.step} of {shard_name(p.rank, p.world)} leaves to {shard} are in no "
        f"peer's memory ({len(peers)} tried)"
    ) from error
