"""The save worker: the ``flashckpt-persist`` thread that makes a staged snapshot durable.

For each staged snapshot it

1. checksums every chunk in the slot (on the ``flashckpt-hash`` pool; xxh3 releases the GIL),
   each chunk's write to the first persistent tier (on the ``flashckpt-io`` pool) starting as
   soon as its checksum is known, so that checksumming overlaps the writes,
2. once every checksum is known, writes the sealed memory-tier manifest (a crash from then on
   finds a verified snapshot; before, ``save`` left an unsealed one) and starts the mirrors,
3. for each persistent tier (local, then storage): writes the chunks in parallel
   (:mod:`flashckpt.transfer.writer`), then the manifest, then the commit record
   (:mod:`.commit`), then applies retention (:mod:`.retention`),
4. releases the slot.

Every storage call goes through the retrying store; a tier that still fails is reported on
the :class:`SaveHandle` and in the log, and the other tiers go on.  Nothing here ever runs
on, or raises into, the training thread.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from flashckpt import _hooks as hooks
from flashckpt._config import Options
from flashckpt._dist import Control
from flashckpt.coordination.commit import CommitProtocol
from flashckpt.coordination.dedup import RankExchange, Reuse, clear_entries, dedups, publish_none
from flashckpt.coordination.handle import SaveHandle
from flashckpt.coordination.mirrors import MirrorPushes, Pushes
from flashckpt.coordination.nodesplit import NodeSplit
from flashckpt.coordination.retention import apply_retention, collect_chunks
from flashckpt.errors import CoordinationError, CorruptCheckpointError, FlashCkptError
from flashckpt.format import Manifest, manifest_key, part_holders
from flashckpt.staging.memory_tier import MemoryTier, PartsReader
from flashckpt.staging.stager import Slot, Stager
from flashckpt.transfer.tier import Tier
from flashckpt.transfer.writer import ChunkWriter, SlotBytes

log = logging.getLogger(__name__)


@dataclass
class Job:
    """One snapshot for the persist thread.  ``manifest.chunks`` already hold checksums when
    ``hashed`` (a salvaged snapshot from the memory tier); else they are filled in here."""

    manifest: Manifest
    slot: Slot
    tiers: list[Tier]
    handle: SaveHandle
    hashed: bool = False
    #: Names this save among the ranks (every rank makes the same calls in the same order).
    seq: str = ""
    #: Ranks that write this step to a shared tier in this attempt; the last one commits.
    #: ``None``: every rank.  (A salvage after a restart: only ranks that lack their shard.)
    writers: int | None = None
    generation: int = 0  # the slot's generation when the job was made
    mirror: bool = False  # also push the snapshot to the peers' memory (tier "mirror")
    #: the other ranks' parts of the snapshot, pinned when it is submitted (``submit``)
    reader: PartsReader | None = None
    error: BaseException | None = None  # the snapshot cannot be read (a part is gone)


class PersisterDied(FlashCkptError, RuntimeError):
    """The ``flashckpt-persist`` thread is gone (a bug): nothing can be persisted any more."""


class Persister:
    """Owns the ``flashckpt-persist`` thread and the ``flashckpt-hash`` and ``flashckpt-io`` pools.

    The thread never dies of a job: any exception in a job, its retention or its chunk GC
    fails that job (on its handle, in the log) and the thread takes the next one.  If it is
    gone anyway, :meth:`submit` and :meth:`join` raise :class:`PersisterDied` instead of
    hanging, and the jobs it left are failed and their slots given back.
    """

    def __init__(
        self,
        opts: Options,
        memory: MemoryTier,
        stager: Stager,
        keep: int | None,
        control: Control | None = None,
    ) -> None:
        self.opts = opts
        self.memory = memory
        self.stager = stager
        self.keep = keep
        self.control = control if control is not None else Control(None, opts.coord_timeout_s)
        #: the restored step -> the generation the run continues in after it: retention
        #: keeps the restored step while it commits snapshots taken before the restore
        #: (older ones salvaged, or newer ones of the timeline it left, persisted at close);
        #: snapshots of the continued run (that generation or later) may retire it.  Set by
        #: the training thread in ``restore``.
        self.protect: dict[int, int] = {}
        self._died: BaseException | None = None
        self.pool = ThreadPoolExecutor(
            max(opts.io_threads, opts.hash_threads), thread_name_prefix="flashckpt-io"
        )
        #: checksums of a fresh snapshot, running ahead of its writes on ``pool``
        self.hash_pool = ThreadPoolExecutor(opts.hash_threads, thread_name_prefix="flashckpt-hash")
        self.writer = ChunkWriter(opts, self.pool, self.hash_pool)
        self.commits = CommitProtocol(opts, self.control, self.pool)
        self.reuse = Reuse(opts)  # persist thread only
        self.mirrors = MirrorPushes(opts, self.control)  # its peers are set by the Checkpointer
        #: which chunks the node's ranks stage once between them; set by the Checkpointer
        self.split: NodeSplit | None = None
        self._sealed: Manifest | None = None  # the last job's fresh sealed snapshot
        self._queue: queue.Queue[Job | None] = queue.Queue()
        self._thread = threading.Thread(target=self._loop, name="flashckpt-persist", daemon=True)
        self._thread.start()

    def submit(self, job: Job) -> None:
        """Training thread: hand a staged slot over.  Never blocks.  Raises
        :class:`PersisterDied` if the thread is gone (the caller gives the slot back)."""
        self.check_alive()
        if part_holders(job.manifest) and job.reader is None:
            try:  # the other ranks of the node keep their parts until this job has read them
                job.reader = PartsReader(job.manifest, job.slot, self.memory.directory.parent)
            except CorruptCheckpointError as exc:  # a part is gone already: the job fails
                log.error("flashckpt: step %d: %s", job.manifest.step, exc)
                job.error = exc
        self._queue.put(job)

    def idle(self) -> bool:
        """Any thread: no job is queued or in progress (no slot will be given back by this
        thread until a new job is submitted).  A job's slot is released before its
        ``task_done``, so once this is True every finished job's slot is free."""
        return self._queue.unfinished_tasks == 0

    @property
    def alive(self) -> bool:
        """Any thread: the persist thread is running."""
        return self._thread.is_alive()

    def check_alive(self) -> None:
        """Any thread: raise :class:`PersisterDied` if the persist thread is gone."""
        if self._died is not None or not self._thread.is_alive():
            raise PersisterDied(
                f"the flashckpt-persist thread is gone ({self._died!r}); nothing more can be "
                "persisted: close this Checkpointer and create a new one"
            ) from self._died

    def close(self) -> None:
        """Finish every queued job, then stop the thread and the pools."""
        if self._thread.is_alive():
            self._queue.put(None)
            self._thread.join()
        self.pool.shutdown(wait=True)
        self.hash_pool.shutdown(wait=True)
        self.mirrors.close()

    # -- persist thread ----------------------------------------------------------------------
    def _loop(self) -> None:
        job: Job | None = None
        try:
            while True:
                job = self._queue.get()
                if job is None:
                    self._queue.task_done()
                    return
                hooks.fire("persist.next", step=job.manifest.step)  # (tests: a thread that dies)
                try:
                    self._process(job)
                except BaseException as exc:  # _process reports its own; this is the last guard
                    log.exception("flashckpt: persist of step %d failed unexpectedly", job.manifest.step)
                    job.handle._fail_pending(exc)
                job = None
                self._queue.task_done()
        except BaseException as exc:
            self._died = exc
            log.critical("flashckpt: the persist thread died: %r", exc, exc_info=True)
            if job is not None:  # the job in hand: failed, its slot given back
                job.handle._fail_pending(exc)
                if job.reader is not None:
                    job.reader.close()
                self.stager.release(job.slot)
                self._queue.task_done()
        finally:
            self._abandon_queue()

    def _abandon_queue(self) -> None:
        """The persist thread is ending: fail the jobs still queued and give their slots back
        (a clean close queues nothing after its sentinel; after a death this unblocks
        ``save``, ``wait`` and ``close``)."""
        while True:
            try:
                job = self._queue.get_nowait()
            except queue.Empty:
                return
            if job is not None:
                error = self._died or PersisterDied("the persist thread stopped before this job")
                job.handle._fail_pending(error)
                if job.reader is not None:
                    job.reader.close()
                self.stager.release(job.slot)
            self._queue.task_done()

    def join(self) -> None:
        """Block until every submitted job, retention included, is finished.  Raises
        :class:`PersisterDied` (instead of waiting forever) if the thread is gone."""
        q = self._queue
        while True:
            with q.all_tasks_done:
                if not q.unfinished_tasks:
                    break
                q.all_tasks_done.wait(0.5)
            if not self._thread.is_alive():
                with q.all_tasks_done:
                    if q.unfinished_tasks:
                        self.check_alive()
                        raise PersisterDied("the persist thread stopped with jobs left")
        if self._died is not None:  # every job was failed; the Checkpointer is unusable
            self.check_alive()

    def _process(self, job: Job) -> None:
        """Persist thread: one job, then retention of the tiers it committed.  Never raises."""
        committed: list[Tier] = []
        released = False
        try:
            committed, waits = self._run(job)
            if job.tiers and len(committed) == len(job.tiers) and not job.handle.failures:
                self.stager.mark_durable(job.slot, job.generation)
            # Waiting for the other ranks' shards needs no slot: hand it back first.
            self.stager.release(job.slot)
            released = True
            self._learn()
            for tier, key, t0 in waits:
                if self._await_commit(job, tier, key, t0):
                    committed.append(tier)
            if waits and len(committed) == len(job.tiers) and not job.handle.failures:
                self.stager.mark_durable(job.slot, job.generation)
        except BaseException as exc:  # never let the thread die silently
            log.exception("flashckpt persist of step %d failed unexpectedly", job.manifest.step)
            job.handle._fail_pending(exc)
        finally:
            if job.reader is not None:
                job.reader.close()
            if not released:
                self.stager.release(job.slot)
            # Every tier is reported by now; one that is not would hang its waiters forever.
            left = [name for name in job.handle.tiers if name in job.handle._pending]
            if left:
                log.error("flashckpt: step %d: tiers %s were never reported (a bug)", job.manifest.step, left)
                job.handle._fail_pending(FlashCkptError(f"internal error: tiers {left} were not reported"))
        # Retention runs after the step is reported durable and its slot is free: deleting
        # old steps is not part of the cost of this save.  Its failures are the handle's
        # warnings (the step itself is durable).
        for tier in committed:
            self._retain(tier, job)

    def _protected(self, job: Job) -> list[int]:
        """The restored steps retention keeps after ``job`` (see ``protect``)."""
        return [s for s, g in self.protect.items() if job.manifest.generation < g]

    def _retain(self, tier: Tier, job: Job) -> None:
        """Persist thread: retention of ``tier`` after ``job`` committed there.  Never raises:
        a failure (of any type: a foreign file, a hostile record, a bug) is logged and
        reported on the job's handle as a warning, and the thread goes on."""
        if self.keep is None:
            return
        shared = tier.shared and self.control.distributed
        if shared and self.control.rank != 0:
            return  # job-wide retention of a shared tier is rank 0's
        try:
            apply_retention(
                tier.backend,
                self.keep,
                self.opts,
                protect=[job.manifest.step, *self._protected(job)],
                collect=not shared,  # a shared tier's chunks: in the commit window (_collect_shared)
            )
        except Exception as exc:  # retention failing never fails a save, nor the thread  # noqa: BLE001
            log.warning(
                "flashckpt: retention on the %s tier (%s) failed: %s: %s",
                tier.name,
                tier.backend.url,
                type(exc).__name__,
                exc,
            )
            job.handle._warn(f"retention on {tier.name}", exc)

    def _collect_shared(self, tier: Tier, job: Job) -> None:
        """Persist thread of the rank that committed a save every rank made, in the commit
        window (the other ranks wait for the outcome, none writes chunks): delete the chunks
        no manifest on the shared tier references (see ``collect_chunks``).  Never raises: a
        failure is a warning on the handle (the step is committed)."""
        if self.keep is None:
            return
        try:
            n = collect_chunks(tier.backend, (), self.opts, every_manifest=True)
            log.debug(
                "flashckpt: step %d: collected %d chunk(s) on the %s tier", job.manifest.step, n, tier.name
            )
        except Exception as exc:  # the step is committed: a warning on its handle  # noqa: BLE001
            log.warning(
                "flashckpt: chunk GC on the %s tier failed: %s: %s", tier.name, type(exc).__name__, exc
            )
            job.handle._warn(f"chunk GC on {tier.name}", exc)

    def _run(self, job: Job) -> tuple[list[Tier], list[tuple[Tier, str, float]]]:
        """Seal and persist one job.  Returns the tiers on which it was committed, and the
        shared tiers whose commit waits for other ranks: ``(tier, key, start time)``."""
        run = _SaveRun(self, job)
        run.run()
        self._sealed = run.m if run.m.sealed and not job.hashed else None
        return run.committed, run.waits

    def _learn(self) -> None:
        """After a fresh snapshot's job, slot released: which chunks the node's ranks share
        (``NodeSplit.learn``).  Never raises."""
        m, self._sealed = self._sealed, None
        if m is None or self.split is None or not self.split.enabled:
            return
        try:
            self.split.learn(m)
        except Exception as exc:  # nothing learned: later saves copy everything  # noqa: BLE001
            log.warning("flashckpt: step %d: %s: %s", m.step, type(exc).__name__, exc)

    def _committed(self, job: Job, tier: Tier, t0: float) -> None:
        secs = time.perf_counter() - t0
        log.info(
            "flashckpt: step %d committed on %s tier in %.3f s (%.2f GB/s)",
            job.manifest.step,
            tier.name,
            secs,
            job.manifest.total_bytes / max(secs, 1e-9) / 1e9,
        )
        job.handle._finish_tier(tier.name, secs)

    def _await_commit(self, job: Job, tier: Tier, key: str, t0: float) -> bool:
        """Persist thread, slot released: wait for the rank that writes the commit record."""
        try:
            self.commits.await_outcome(key, job.manifest)
        except FlashCkptError as exc:
            log.error("flashckpt: step %d on the %s tier: %s", job.manifest.step, tier.name, exc)
            job.handle._finish_tier(tier.name, time.perf_counter() - t0, exc)
            return False
        self._committed(job, tier, t0)
        return True

    def _dedups(self, tier: Tier) -> bool:
        return dedups(self.opts, self.control, tier)

    @hooks.timed("time.persist.tier", lambda self, tier, *a, **k: {"tier": tier.name})
    def persist(
        self,
        tier: Tier,
        m: Manifest,
        slot: SlotBytes,
        seq: str = "",
        *,
        on_sealed: Callable[[Manifest], None] | None = None,
        verify: bool = False,
        dedup: bool = True,
    ) -> int:
        """Write one shard to ``tier``: new chunks, then the manifest, then (on a tier of this
        rank's own) the commit record.  Returns the chunk bytes written.

        Chunks are content-addressed: one whose bytes the tier's newest commit already holds is
        referenced again, not encoded or written (:class:`Reuse`).  With
        ``Options.dedup_replicated`` on the shared tier of a multi-rank job, a chunk whose bytes
        its owner rank also holds is written by the owner only (:class:`RankExchange`).

        ``m`` may be unsealed (no checksums yet) when ``on_sealed`` is given: each chunk task
        checksums its chunk before it writes it, and ``on_sealed(sealed manifest)`` is called
        on this thread as soon as every checksum is known, while the writes go on.

        ``dedup``: False for a save only some ranks make (a salvage): every chunk of the
        shard is written by this rank (the ranks that do not write would never publish theirs).

        ``verify``: ``m``'s checksums were not computed from the slot just now (a snapshot
        salvaged from the memory tier, or persisted at close): every chunk written is checked
        against its checksum first (see :meth:`ChunkWriter.write`).
        """
        self.commits.uncommit(tier, m.step)
        known = self.reuse.known(tier, m)
        dedup = dedup and self._dedups(tier)
        if not m.sealed:
            if on_sealed is None or dedup:
                raise ValueError("an unsealed manifest is persisted only with on_sealed, without dedup")
            out, written = self.writer.write_unsealed(tier, m, slot, known, on_sealed)
        else:
            exchange = RankExchange(self.control, tier, m, seq) if dedup else None
            out, written = self.writer.write(tier, m, slot, known, verify=verify, exchange=exchange)
        entry = self.commits.write_manifest(tier, out)
        self.reuse.remember(tier, out)
        self.commits.commit_own(tier, out, entry)
        return written

    def _discard(self, tier: Tier, m: Manifest) -> None:
        """Best effort: remove this shard's manifest of a failed step.  Its new chunks are
        shared by content and may be referenced by other steps: the next retention pass
        deletes those that no kept step references."""
        be = tier.backend
        try:
            be.delete(manifest_key(m.step, m.rank, m.world_size))
        except FlashCkptError as exc:
            log.debug("could not remove partial step %d on %s: %s", m.step, be.url, exc)


class _SaveRun:
    """One job's pass over its tiers (persist thread): seal it, write each tier, commit."""

    def __init__(self, p: Persister, job: Job) -> None:
        self.p = p
        self.job = job
        self.m = job.manifest  # the sealed manifest once every checksum is known
        self.committed: list[Tier] = []
        self.waits: list[tuple[Tier, str, float]] = []
        self.pushes: Pushes | None = None
        self.t_seal = time.perf_counter()
        # Checksums are computed in the first tier's chunk tasks, each before its write
        # (unless that tier deduplicates across ranks, which needs them all up front).
        # (A snapshot without chunks counts as sealed: it has nothing to checksum.)
        m = self.m
        self.pipelined = not job.hashed and not m.sealed and bool(job.tiers) and not p._dedups(job.tiers[0])
        #: where the snapshot's bytes are read: its slot, and the slots of the node's other
        #: ranks for the chunks they hold (replicated state staged once per node)
        self.src: Slot | PartsReader = job.slot

    def run(self) -> None:
        """Seal, write each tier, push the mirrors (the other ranks' parts read through the
        job's ``PartsReader``), then give back the slot's pages of chunks it does not hold.
        Reports every tier."""
        job = self.job
        try:
            if job.error is not None:
                raise job.error
            if job.reader is not None:
                self.src = job.reader.open(self.p.opts.coord_timeout_s)
        except BaseException as exc:  # every tier fails with it  # noqa: BLE001
            log.error("flashckpt: step %d: %s", job.manifest.step, exc)
            self._fail_all(exc)
            return
        self._run()
        if job.reader is not None:
            job.reader.close()
            job.slot.trim((c.offset, c.nbytes) for c in job.manifest.chunks if c.key != job.slot.name)

    def _run(self) -> None:
        job = self.job
        if job.hashed:
            self._start_mirrors()
        elif not self.pipelined and not self._seal_now():
            return
        for i, tier in enumerate(job.tiers):
            if not self.m.sealed and i > 0 and not self._seal_now():  # the first tier failed before sealing
                return
            self._tier(i, tier)
        if not self.m.sealed and not self._seal_now():  # the only tier failed before sealing
            return
        if self.pushes is not None:
            self.p.mirrors.finish(
                self.pushes, job.handle, job.manifest.step, lambda: bool(self.p.stager.waiters)
            )

    def _sealed(self, sm: Manifest) -> None:
        """Every checksum is known: the memory tier's manifest, then the mirrors."""
        self.m = sm
        error: BaseException | None = None
        try:
            self.p.memory.seal(self.job.slot, sm)
        except BaseException as exc:  # the tiers go on: their writes carry the checksums  # noqa: BLE001
            log.error("flashckpt: step %d's sealed manifest was not written to memory: %s", sm.step, exc)
            error = exc
        self.job.handle._finish_tier("memory", time.perf_counter() - self.t_seal, error)
        hooks.fire("persist.sealed", step=sm.step)
        self._start_mirrors()

    def _start_mirrors(self) -> None:
        if self.job.mirror:
            self.pushes = self.p.mirrors.start(self.m, self.src)

    def _seal_now(self) -> bool:
        """Checksum the whole slot here (the first tier did not get to it); False, with
        every tier still pending failed, if that fails."""
        try:
            sm = self.p.writer.hash(self.m, self.src)
        except BaseException as exc:  # every pending tier is failed with it  # noqa: BLE001
            log.error("flashckpt: step %d could not be checksummed: %s", self.m.step, exc)
            self._fail_all(exc)
            return False
        self._sealed(sm)
        return True

    def _fail_all(self, exc: BaseException) -> None:
        """Every tier still pending fails with ``exc`` (the other ranks of a shared tier are
        told)."""
        job = self.job
        for tier in job.tiers:
            if tier.name in job.handle._pending:
                if self.p._dedups(tier):  # the others wait for this rank's chunk entries: none
                    publish_none(self.p.control, tier, self.m.step, job.seq)
                self.p.commits.report_failure(self._key(tier), self.m.step, exc)
        for name in job.handle.tiers:
            if name in job.handle._pending:
                job.handle._finish_tier(name, 0.0, exc)

    def _key(self, tier: Tier) -> str | None:
        return self.p.commits.key(tier, self.m.step, self.job.seq)

    def _tier(self, i: int, tier: Tier) -> None:
        """Write ``tier`` (the ``i``-th) and commit there, or report why not."""
        p, job = self.p, self.job
        t0 = time.perf_counter()
        ckey = self._key(tier)
        if ckey is not None and not self._may_write(tier, ckey):
            return
        try:
            on_sealed = self._sealed if self.pipelined and i == 0 else None
            job.handle.written_bytes[tier.name] = p.persist(
                tier,
                self.m,
                self.src,
                job.seq,
                on_sealed=on_sealed,
                verify=job.hashed,
                dedup=job.writers is None,
            )
            if ckey is not None and not self._commit_shared(tier, ckey, t0):
                return  # another rank writes the commit record
        except BaseException as exc:  # this tier fails with it; the others go on  # noqa: BLE001
            p._discard(tier, self.m)
            p.commits.report_failure(ckey, self.m.step, exc)
            secs = time.perf_counter() - t0
            log.error(
                "flashckpt: step %d failed on the %s tier (%s) after %.2f s: %s",
                self.m.step,
                tier.name,
                tier.backend.url,
                secs,
                exc,
            )
            job.handle._finish_tier(tier.name, secs, exc)
            return
        p._committed(job, tier, t0)
        self.committed.append(tier)

    def _may_write(self, tier: Tier, ckey: str) -> bool:
        """A shared tier: False (reported) while an earlier commit is stalled (nothing was
        written: nothing to discard)."""
        p, m = self.p, self.m
        try:
            try:
                p.commits.check_stalled(tier)
            except CoordinationError:
                if p._dedups(tier):  # the other ranks wait for this rank's chunk entries: none
                    publish_none(p.control, tier, m.step, self.job.seq)
                raise
        except FlashCkptError as exc:
            p.commits.report_failure(ckey, m.step, exc)
            log.error("flashckpt: step %d skips the %s tier: %s", m.step, tier.name, exc)
            self.job.handle._finish_tier(tier.name, 0.0, exc)
            return False
        return True

    def _commit_shared(self, tier: Tier, ckey: str, t0: float) -> bool:
        """This rank's shard is on a shared tier: arrive; the last rank to arrive commits
        (True); the others wait for its outcome later, slot released (False)."""
        p, job, m = self.p, self.job, self.m
        arrived = p.control.arrive(ckey)
        if arrived < (job.writers or p.control.world):
            self.waits.append((tier, ckey, t0))
            return False
        try:
            p.commits.commit_shared(tier, m.step, m.world_size, m.order)
        except BaseException as exc:
            p.commits.publish(ckey, f"the commit by rank {p.control.rank} failed: {exc}")
            raise
        if job.writers is None:  # every rank wrote its shard and waits: no writer runs
            p._collect_shared(tier, job)
        p.commits.publish(ckey, "ok")
        if p.opts.dedup_replicated:  # every rank has read them: its manifest is in
            clear_entries(p.control, tier, m.step, job.seq)
        return True
