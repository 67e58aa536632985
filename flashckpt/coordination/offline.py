"""Salvage and retention by hand, with no job running: what ``flashckpt salvage`` and
``flashckpt gc`` do (through :mod:`flashckpt.maintenance`).

**Salvage** (:func:`salvage_memory`).  A job died; the memory tier of a node survived (its
processes were killed, the node was not rebooted).  It may hold steps that never reached the
storage tier: the job's own shards (two slots per rank) and the mirrors its ranks held for
peers.  Every snapshot there that belongs to the storage tier's run, is newer than the newest
step committed there and not on a timeline the run has left, is written to storage (the chunks
storage lacks, checked against their checksums first; then the shard's manifest), and a step
is committed as soon as every rank's shard is there: run on every surviving node, the last one
commits.  Both slots are written, newest first: one node cannot know which step the other
nodes hold whole, and a step one of them misses can still be completed from the other slot.

Nothing here deletes or overwrites a committed step: a snapshot whose step number is
committed on storage by another generation is passed over (said in the report); the memory
tier is left as it was (a restart that finds it restores from it, and its clean close drops
it).  Every shard directory is locked first (the ``flock`` a live rank holds on its own):
one in use by a live process is not read.  Running it again is safe: shards already there
are not written again.

**Retention by hand** (:func:`collect_by_hand`).  The rules of the job's own retention
(:func:`~flashckpt.coordination.retention.plan_retention`), then the chunks that no manifest
on the tier references and that are older than a grace period (a live job writes a step's
chunks before its manifest).  The newest committed step is always kept; manifests newer than
the newest commit (a save in flight) and records that fail validation are never deleted, nor
are the chunks such records reference.

Any one thread; the writes run on pools of their own.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from flashckpt._config import Options
from flashckpt._dist import Control
from flashckpt.coordination.commit import CommitProtocol
from flashckpt.coordination.dedup import Reuse
from flashckpt.coordination.inventory import Order, read_commit, read_commits, read_run
from flashckpt.coordination.retention import abandoned, delete_manifests, plan_retention, unreferenced_chunks
from flashckpt.errors import (
    CheckpointNotFound,
    ConfigError,
    CorruptCheckpointError,
    FlashCkptError,
    ObjectNotFound,
)
from flashckpt.format import SHARD_PATTERN, Manifest, commit_key, decode_manifest, manifest_key, part_holders
from flashckpt.replication.holdings import Held as MemoryHeld
from flashckpt.replication.holdings import Orphan, claim_directory
from flashckpt.staging.memory_tier import PartsReader
from flashckpt.staging.stager import Slot
from flashckpt.storage import Backend
from flashckpt.transfer.reader import read_record
from flashckpt.transfer.store import retrying
from flashckpt.transfer.tier import Tier
from flashckpt.transfer.writer import ChunkWriter

log = logging.getLogger(__name__)


@dataclass
class SalvagedStep:
    """One snapshot found in memory that storage lacked, and what salvage did with it.

    ``written``: ranks whose shard this run wrote; ``present``: already on storage (another
    node's salvage, or the job before it died); ``missing``: in neither place: run salvage on
    the node that holds them (their own node, or the node of a peer that held their mirror).
    """

    step: int
    generation: int
    world_size: int
    written: list[int] = field(default_factory=list)
    present: list[int] = field(default_factory=list)
    missing: list[int] = field(default_factory=list)
    bytes_written: int = 0
    committed: bool = False
    error: str | None = None


@dataclass
class SalvageReport:
    storage: str
    memory_dir: str
    steps: list[SalvagedStep]  # newest first
    notes: list[str]  # directories not read and snapshots passed over, with why


@dataclass
class GcReport:
    dry_run: bool
    kept: list[int]  # committed steps kept, in timeline order
    retired: list[int]  # commit records deleted (or that would be)
    left: list[int]  # of those, steps on a timeline the run has left
    dirs: list[int]  # step directories deleted
    chunks: int  # chunk objects deleted
    bytes: int  # their bytes
    young: int  # unreferenced chunks younger than the grace period: left for now
    notes: list[str]


Held = dict[Order, dict[int, tuple[Manifest, Slot]]]


def salvage_memory(
    tier: Tier,
    root: Path,
    storage_id: str,
    opts: Options,
    progress: Callable[[int, int], None] | None = None,
) -> SalvageReport:
    """Persist the snapshots of the memory tier under ``root`` (the shard directories of
    one node) that the shared tier ``tier`` lacks, and commit each step once every rank's
    shard is there (see the module docstring).  ``progress(done, total)``: bytes of shards
    handled so far.  Raises ``CheckpointNotFound`` if ``root`` is no directory and
    ``StorageError`` if the tier cannot be read."""
    if not root.is_dir():
        raise CheckpointNotFound(f"no memory tier at {root}")
    notes: list[str] = []
    claimed: list[Orphan] = []
    try:
        for d in sorted(root.iterdir()):
            if not (d.is_dir() and SHARD_PATTERN.fullmatch(d.name)):
                continue
            try:
                o = claim_directory(d)
            except (OSError, ConfigError) as exc:
                notes.append(f"{d}: not read: {exc}")
                continue
            if o is None:
                notes.append(f"{d}: in use by a live process (a running job's: nothing to salvage)")
                continue
            claimed.append(o)
        run = read_run(tier.backend, opts)
        held = _held(claimed, storage_id, run, notes)
        mirrors = {(m.order, d.name): d for o in claimed for h in o.mirrors.values() for m, d in _valid(h)}
        return _Salvage(tier, opts, notes, mirrors).run(held, str(root), progress)
    finally:
        for o in claimed:
            o.close()


def _held(claimed: list[Orphan], storage_id: str, run: str | None, notes: list[str]) -> Held:
    """Every valid snapshot of the claimed directories (own and mirrors) that belongs to this
    storage tier and its run: order -> rank -> (memory manifest, slot)."""
    out: Held = {}
    for o in claimed:
        for src in (o.own, *o.mirrors.values()):
            for m in src.tier.holdings():  # the valid ones (the others are logged, skipped)
                where = f"{src.directory}: step {m.step}"
                if m.storage and m.storage != storage_id:
                    notes.append(
                        f"{where}: saved for another storage tier (id {m.storage}, not {storage_id})"
                    )
                    continue
                if m.run and run and m.run != run:
                    notes.append(f"{where}: of run {m.run}; the storage tier belongs to run {run}")
                    continue
                _, slot = src.tier.read(m.step)
                out.setdefault(m.order, {}).setdefault(m.rank, (m, slot))
    return out


def _valid(held: MemoryHeld) -> list[tuple[Manifest, Path]]:
    return [(m, held.directory) for m in held.tier.holdings()]


class _Salvage:
    def __init__(
        self, tier: Tier, opts: Options, notes: list[str], mirrors: dict[tuple[Order, str], Path]
    ) -> None:
        self.tier, self.opts, self.notes = tier, opts, notes
        #: (snapshot, owner) -> the claimed mirror directory holding it: where the chunks a
        #: mirror leaves to the mirrors of its owner's node-mates are
        self.mirrors = mirrors

    def run(self, held: Held, where: str, progress: Callable[[int, int], None] | None) -> SalvageReport:
        be, opts = self.tier.backend, self.opts
        records = read_commits(be, opts)
        by_step = {r.step: r for r in records}
        newest = max((r.order for r in records), default=(-1, -1))
        seen = {r.order: r.ancestors for r in records}
        for o, shards in held.items():
            seen.setdefault(o, next(iter(shards.values()))[0].ancestors)
        left = abandoned(list(seen.items()))
        todo: list[Order] = []
        for o in sorted(held, reverse=True):
            if o[1] in by_step and by_step[o[1]].order == o:
                continue  # committed already
            if o <= newest:
                self.notes.append(f"step {o[1]} (generation {o[0]}): storage holds a newer committed step")
            elif o in left:
                self.notes.append(f"step {o[1]} (generation {o[0]}): on a timeline the run has left")
            elif o[1] in by_step:
                other = by_step[o[1]].generation
                self.notes.append(
                    f"step {o[1]} (generation {o[0]}): storage has step {o[1]} committed by generation "
                    f"{other}; not overwritten (a restart decides between them)"
                )
            else:
                todo.append(o)
        total = sum(m.total_bytes for o in todo for m, _ in held[o].values())
        done = [0]

        def advance(n: int) -> None:
            done[0] += n
            if progress is not None:
                progress(done[0], total)

        pool = ThreadPoolExecutor(opts.io_threads, thread_name_prefix="flashckpt-io")
        hash_pool = ThreadPoolExecutor(opts.hash_threads, thread_name_prefix="flashckpt-hash")
        try:
            self.writer = ChunkWriter(opts, pool, hash_pool)
            self.commits = CommitProtocol(opts, Control.on_store(None, 0, 1, opts.coord_timeout_s), pool)
            self.reuse = Reuse(opts)
            steps = [self._one(o, held[o], advance) for o in todo]
        finally:
            pool.shutdown(wait=True)
            hash_pool.shutdown(wait=True)
        return SalvageReport(be.url, where, steps, self.notes)

    def _one(
        self, o: Order, shards: dict[int, tuple[Manifest, Slot]], advance: Callable[[int], None]
    ) -> SalvagedStep:
        worlds = {m.world_size for m, _ in shards.values()}
        world = max(worlds)
        out = SalvagedStep(o[1], o[0], world)
        if len(worlds) > 1:
            out.error = f"the shards held here were saved by jobs of {sorted(worlds)} ranks"
            return out
        try:
            for r in range(world):
                if self._there(o, r, world):
                    out.present.append(r)
                elif r in shards:
                    m, slot = shards[r]
                    out.bytes_written += self._write(m, slot)
                    out.written.append(r)
                    advance(m.total_bytes)
                else:
                    out.missing.append(r)
            if not out.missing:
                out.committed = self._commit(o, world)
        except FlashCkptError as exc:
            out.error = f"{type(exc).__name__}: {exc}"
            log.warning("flashckpt: salvaging step %d failed: %s", o[1], exc)
        return out

    def _there(self, o: Order, rank: int, world: int) -> bool:
        """Storage holds rank ``rank``'s manifest of this very snapshot."""
        key = manifest_key(o[1], rank, world)
        try:
            return decode_manifest(read_record(self.tier.backend, key, key, self.opts), key).order == o
        except (ObjectNotFound, CorruptCheckpointError):
            return False

    def _write(self, m: Manifest, slot: Slot) -> int:
        """One shard: the chunks storage lacks (each checked against its checksum first, or
        checksummed now if the process died before it sealed the snapshot), then its manifest."""
        verify = m.sealed
        # chunks the other ranks of the node held are read from their (claimed) directories;
        # those a mirror leaves to the owner's node-mates, from the mirrors of those
        with contextlib.ExitStack() as stack:
            src: Slot | PartsReader = slot
            holders = part_holders(m)
            if holders and slot.path.parent.parent.name == "mirrors":
                gone = [h for h in holders if (m.order, h) not in self.mirrors]
                if gone:
                    raise CorruptCheckpointError(
                        f"the part of step {m.step} that {gone[0]}'s mirror held is not here"
                    )
                dirs = {h: self.mirrors[(m.order, h)] for h in holders}
                src = stack.enter_context(PartsReader(m, slot, slot.path.parent, dirs=dirs).open())
            elif holders:
                src = stack.enter_context(PartsReader(m, slot, slot.path.parent.parent).open())
            if not m.sealed:
                m = self.writer.hash(m, src)
            out, written = self.writer.write(self.tier, m, src, self.reuse.known(self.tier, m), verify=verify)
        self.commits.write_manifest(self.tier, out)
        self.reuse.remember(self.tier, out)
        log.info("flashckpt: wrote rank %d's shard of step %d (%d bytes)", m.rank, m.step, written)
        return written

    def _commit(self, o: Order, world: int) -> bool:
        """Every shard is there: commit the step (another node's salvage may have already)."""
        try:
            if read_commit(self.tier.backend, o[1], self.opts).order == o:
                return True
        except ObjectNotFound:
            pass
        self.commits.commit_shared(self.tier, o[1], world, o)
        log.info("flashckpt: committed step %d", o[1])
        return True


def collect_by_hand(be: Backend, keep: int, opts: Options, *, dry_run: bool, grace_s: float) -> GcReport:
    """Retention of ``be`` by hand (see the module docstring): keep the newest ``keep``
    committed steps of the run's timeline (at least 1); with ``dry_run`` nothing is deleted
    and the report says what would be."""
    if keep < 1:
        raise ConfigError("keep must be at least 1: the newest committed step is never deleted")
    store = retrying(be, opts)
    plan = plan_retention(be, keep, opts)
    notes: list[str] = []
    if not dry_run:
        for r in plan.retire:
            store.delete(commit_key(r.step))
        for s in plan.dirs:
            delete_manifests(be, s, opts)
    report = GcReport(
        dry_run,
        kept=[r.step for r in plan.kept],
        retired=[r.step for r in plan.retire],
        left=[r.step for r in plan.left],
        dirs=list(plan.dirs),
        chunks=0,
        bytes=0,
        young=0,
        notes=notes,
    )
    try:
        doomed = unreferenced_chunks(be, plan.kept, opts, every_manifest=True, without=plan.dirs, strict=True)
    except CorruptCheckpointError as exc:
        notes.append(
            f"chunks not collected: a manifest does not validate ({exc}); its chunks may be a step's"
        )
        return report
    cutoff = time.time() - grace_s
    for key in doomed:
        try:
            if store.modified(key) > cutoff:
                report.young += 1
                continue
            size = store.head(key)
            if not dry_run:
                store.delete(key)
        except ObjectNotFound:
            continue  # gone meanwhile (the job's own retention)
        report.chunks += 1
        report.bytes += size
    if report.young:
        notes.append(
            f"{report.young} unreferenced chunk(s) younger than {grace_s:.0f} s left alone: a live job "
            "may be writing the step they belong to"
        )
    return report
