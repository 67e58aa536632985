"""The commit protocol: a step is committed on a tier once its commit record is written.

On a tier of this rank's own (memory, a node-local disk) the rank commits its shard as soon
as the manifest is written.  On a tier every rank of a job writes (storage), the ranks count
arrivals in the job's store and the last to arrive checks every shard's manifest and writes
the record (:meth:`CommitProtocol.commit_shared`); the others wait for the outcome it
publishes.  A rank that gave up waiting writes nothing more to that tier until the outcome is
known (:meth:`CommitProtocol.check_stalled`): the shared tier's chunk GC relies on it.

Persist thread only, except :meth:`CommitProtocol.commit_shared`, which rank 0's training
thread also calls when a salvage after a restart finds every shard on the tier.
"""

from __future__ import annotations

import logging
from concurrent.futures import Executor

from flashckpt import _hooks as hooks
from flashckpt._config import Options
from flashckpt._dist import Control
from flashckpt.coordination.inventory import Order, claim_run, read_commits
from flashckpt.errors import CoordinationError, CorruptCheckpointError, FlashCkptError, WaitTimeout
from flashckpt.format import (
    CHUNKS_PREFIX,
    CommitRecord,
    Manifest,
    checksum,
    commit_key,
    decode_manifest,
    encode_commit,
    encode_manifest,
    manifest_key,
    now,
)
from flashckpt.transfer.futures import run_all
from flashckpt.transfer.reader import read_record
from flashckpt.transfer.store import retrying
from flashckpt.transfer.tier import Tier

log = logging.getLogger(__name__)


class CommitProtocol:
    """Commits of one rank's saves, on every tier (see the module docstring)."""

    def __init__(self, opts: Options, control: Control, pool: Executor) -> None:
        self.opts = opts
        self.control = control
        self.pool = pool
        #: A shared-tier commit this rank stopped waiting for (``WaitTimeout``): (key, order).
        #: Until it resolves, later saves skip the shared tier at once (reported) instead of
        #: each waiting ``coord_timeout_s`` for a rank that is likely dead.
        self._stalled: tuple[str, Order] | None = None
        self._run_claimed: set[str] = set()  # tiers whose run record this process has checked

    def key(self, tier: Tier, step: int, seq: str) -> str | None:
        """The store key on which the ranks count arrivals for a save on a shared tier; None
        on a tier of this rank's own."""
        if not (tier.shared and self.control.distributed):
            return None
        return f"commit/{tier.name}/{step}/{seq}"

    def uncommit(self, tier: Tier, step: int) -> None:
        """Before a step number is written again: delete its commit record, so the step is
        never committed while torn."""
        retrying(tier.backend, self.opts).delete(commit_key(step))

    def write_manifest(self, tier: Tier, out: Manifest) -> tuple[str, int, str]:
        """Put the manifest of shard ``out``; return its commit entry (key, size, checksum)."""
        mkey = manifest_key(out.step, out.rank, out.world_size)
        mdata = encode_manifest(out)
        retrying(tier.backend, self.opts).put(mkey, mdata)
        hooks.fire("persist.manifest", step=out.step, tier=tier.name)
        return mkey, len(mdata), checksum(mdata)

    def commit_own(self, tier: Tier, m: Manifest, entry: tuple[str, int, str]) -> None:
        """On a tier of this rank's own: the commit record of shard ``m`` (its manifest
        written, ``entry``); on a shared tier of a job nothing (see :meth:`commit_shared`)."""
        if tier.shared and self.control.distributed:
            return
        scope = "rank" if m.world_size > 1 else "job"
        record = CommitRecord(
            m.step,
            m.world_size,
            now(),
            (entry,),
            scope,
            generation=m.generation,
            run=m.run,
            ancestors=m.ancestors,
        )
        self.claim_run(tier, m.run)
        cdata = encode_commit(record)
        hooks.fire("commit.record", step=m.step, tier=tier.name)
        retrying(tier.backend, self.opts).put(commit_key(m.step), cdata)
        hooks.fire("commit.done", step=m.step, tier=tier.name)

    def report_failure(self, key: str | None, step: int, exc: BaseException) -> None:
        """Tell the ranks waiting on a save's commit (``key``) that it cannot happen."""
        if key is None:
            return
        try:
            self.control.publish(key, f"rank {self.control.rank} failed: {type(exc).__name__}: {exc}")
        except FlashCkptError as err:
            log.warning("flashckpt: could not report the failure of step %d: %s", step, err)

    def check_stalled(self, tier: Tier) -> None:
        """Before writing to a shared tier: raise :class:`CoordinationError` if an earlier
        commit this rank gave up waiting for is still unresolved.  A step is written only
        after the previous one was seen committed (the chunk GC relies on it, see
        ``collect_chunks``), so waiting again here would cost each save ``coord_timeout_s``.
        Resolved: an outcome was published for it, or the tier holds a commit of that step
        or a newer one."""
        if self._stalled is None:
            return
        key, order = self._stalled
        if self.control.outcome_now(key) is None and not self._committed_since(tier, order):
            raise CoordinationError(
                f"not written to the {tier.name} tier: step {order[1]}'s commit is still waiting for "
                f"a rank (gave up after {self.control.timeout_s:.0f} s); this tier resumes once "
                "that rank catches up, or after a restart"
            )
        log.info("flashckpt: step %d's commit resolved late; writing the %s tier again", order[1], tier.name)
        self._stalled = None

    def _committed_since(self, tier: Tier, order: Order) -> bool:
        """The tier holds a commit of that snapshot or a newer one (in timeline order: an
        abandoned step with a higher number is older, see docs/format.md)."""
        try:
            return any(r.order >= order for r in read_commits(tier.backend, self.opts))
        except FlashCkptError as exc:
            log.debug("flashckpt: cannot list the %s tier: %s", tier.name, exc)
            return False

    def await_outcome(self, key: str, m: Manifest) -> None:
        """Slot released: wait for the rank that writes the commit record of ``m``'s save.
        Raises :class:`WaitTimeout` (and remembers the commit as stalled) or
        :class:`CoordinationError` if it was not committed."""
        try:
            outcome = self.control.await_outcome(key)
        except WaitTimeout:
            self._stalled = (key, m.order)
            raise
        if outcome != "ok":
            raise CoordinationError(f"step {m.step} was not committed: {outcome}")

    def publish(self, key: str, outcome: str) -> None:
        """The committer: publish the outcome (``"ok"`` or why not) to the waiting ranks."""
        self.control.publish(key, outcome)

    def commit_shared(self, tier: Tier, step: int, world: int, order: tuple[int, int] | None = None) -> None:
        """Check every shard's manifest and write the commit record (persist thread of the last
        rank to arrive; or rank 0's training thread, when a salvage finds every shard there).

        Every manifest must describe shard ``r`` of this step and the same snapshot (one
        generation and run; ``order`` when given): a shard left by another save of the same
        step number is never committed with the others.

        And every chunk they reference must be on the tier.  Rank 0's chunk GC runs after each
        commit while the ranks write the next step's chunks; a rank may write again, under the
        same content address, a chunk that an earlier failed save left unreferenced (a
        restarted run replays its steps), just as the GC deletes it.  The committer runs only
        after every rank arrived, rank 0 included, whose GC pass of the previous commit has
        then finished: what it sees present stays present until the next commit."""
        be, opts = tier.backend, self.opts

        def entry(rank: int) -> tuple[tuple[str, int, str], Manifest]:
            key = manifest_key(step, rank, world)
            data = read_record(be, key, key, opts)
            m = decode_manifest(data, key)
            if (m.step, m.rank, m.world_size) != (step, rank, world):
                raise CorruptCheckpointError(f"{key} describes another shard")
            return (key, len(data), checksum(data)), m

        got = run_all(self.pool, entry, range(world))
        lineages = {(m.generation, m.run, m.ancestors) for _, m in got}
        first = got[0][1]
        if len(lineages) != 1 or (order is not None and first.generation != order[0]):
            raise CorruptCheckpointError(f"the shards of step {step} belong to different saves")
        present = set(retrying(be, opts).list(CHUNKS_PREFIX))
        for _, m in got:
            lost = [c.key for c in m.chunks if c.key not in present]
            if lost:
                raise CorruptCheckpointError(
                    f"step {step}: {len(lost)} chunk(s) of rank {m.rank} are gone from the {tier.name} "
                    f"tier (e.g. {lost[0]}): not committed"
                )
        entries = tuple(e for e, _ in got)
        record = CommitRecord(
            step, world, now(), entries, generation=first.generation, run=first.run, ancestors=first.ancestors
        )
        run = first.run
        self.claim_run(tier, run)
        hooks.fire("commit.record", step=step, tier=tier.name)
        retrying(be, opts).put(commit_key(step), encode_commit(record))
        hooks.fire("commit.done", step=step, tier=tier.name)

    def claim_run(self, tier: Tier, run: str) -> None:
        """Before the first commit this process writes to ``tier``: its run record."""
        if tier.holds_run and run and tier.name not in self._run_claimed:
            claim_run(tier.backend, run, self.opts)
            self._run_claimed.add(tier.name)
