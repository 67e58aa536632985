"""Transfer: the background pipeline that makes a staged snapshot durable.

For each staged snapshot, the ``flashckpt-persist`` thread

1. checksums every chunk in the slot (on the ``flashckpt-hash`` pool; xxh3 releases the GIL),
   each chunk's write to the first persistent tier (on the ``flashckpt-io`` pool) starting as
   soon as its checksum is known, so that checksumming overlaps the writes,
2. once every checksum is known, writes the sealed memory-tier manifest (a crash from then on
   finds a verified snapshot; before, ``save`` left an unsealed one) and starts the mirrors,
3. for each persistent tier (local, then storage): writes the chunks in parallel, then the
   manifest, then the commit record, then applies retention,
4. releases the slot.

Every storage call is retried with exponential backoff and full jitter while its error type
says ``retryable``; a tier that still fails is reported on the :class:`SaveHandle` and in the
log, and the other tiers go on.  Nothing here ever runs on, or raises into, the training
thread.
"""

from __future__ import annotations

import bisect
import dataclasses
import json
import logging
import queue
import threading
import time
from collections.abc import Callable, Iterable
from concurrent.futures import CancelledError, Future, InvalidStateError, ThreadPoolExecutor, wait
from dataclasses import dataclass
from typing import Any, TypeVar

from flashckpt import _hooks as hooks
from flashckpt._config import Options
from flashckpt._coordinator import (
    apply_retention,
    claim_run,
    collect_chunks,
    read_commits,
    read_committed_manifest,
    read_record,
)
from flashckpt._dist import Control
from flashckpt.errors import CoordinationError, CorruptCheckpointError, FlashCkptError, WaitTimeout
from flashckpt.format import (
    CHUNKS_PREFIX,
    CODEC_PATTERN,
    MAX_TOTAL_BYTES,
    ChunkEntry,
    CommitRecord,
    Manifest,
    checksum,
    chunk_key,
    commit_key,
    decode_commit,
    decode_manifest,
    encode_commit,
    encode_manifest,
    manifest_key,
    now,
)
from flashckpt.replication.mirror import MirrorAbort, push
from flashckpt.staging.memory_tier import MemoryTier
from flashckpt.staging.stager import Slot, Stager
from flashckpt.storage import Backend
from flashckpt.transfer.codec import Compression, encode
from flashckpt.transfer.futures import run_all, wait_all
from flashckpt.transfer.store import retrying

log = logging.getLogger(__name__)
T = TypeVar("T")
RAW_TIER = Compression(None)


@dataclass(frozen=True)
class Tier:
    """A named storage tier.  ``name`` is one of ``memory``, ``local``, ``storage``."""

    name: str
    backend: Backend
    compression: Compression = RAW_TIER
    #: Every rank of a multi-rank job writes its shard here, and a step is committed once all
    #: of them are (the storage tier).  Otherwise the tier is this rank's own: memory, and a
    #: node-local disk, whose commit records hold this rank's shard only.
    shared: bool = False
    #: The tier holds the run record (the storage tier): written before its first commit.
    holds_run: bool = False


class _Failure:
    """A background error, raised at most once by whichever wait sees it first."""

    def __init__(self, tier: str, error: BaseException) -> None:
        self.tier = tier
        self.error = error
        self.observed = False
        self.lock = threading.Lock()

    def claim(self) -> bool:
        with self.lock:
            if self.observed:
                return False
            self.observed = True
            return True


class SaveHandle:
    """The result of ``Checkpointer.save``: staged already, durable once :meth:`wait` returns.

    ``wait``/``done`` may be called from any thread.  A background failure is raised once,
    from the first ``wait`` (this handle's or the checkpointer's) that sees it.
    """

    def __init__(self, step: int, tiers: Iterable[str]) -> None:
        self.step = step
        self.tiers = tuple(tiers)
        self.persist_s: dict[str, float] = {}
        #: chunk bytes written per persistent tier (unchanged chunks are not written again)
        self.written_bytes: dict[str, int] = {}
        #: failures of durable tiers (memory, local, storage): raised once by ``wait``
        self.failures: list[_Failure] = []
        #: failures that do not make the snapshot less durable (a peer's mirror, unless
        #: ``Options.require_mirrors``; retention after the commit): reported in ``stats``
        #: and the log, never raised
        self.warnings: list[_Failure] = []
        self._pending = set(self.tiers)
        self._event = threading.Event()
        self._lock = threading.Lock()
        if not self._pending:
            self._event.set()

    def __repr__(self) -> str:
        state = "done" if self.done() else "pending"
        return f"SaveHandle(step={self.step}, tiers={self.tiers}, {state})"

    def done(self) -> bool:
        """True once every tier has finished (successfully or not)."""
        return self._event.is_set()

    def wait(self, timeout: float | None = None) -> None:
        """Block until the snapshot is durable on every configured tier.

        Raises :class:`~flashckpt.errors.WaitTimeout` if ``timeout`` runs out, and the first
        tier's error (with its original type) if a tier failed and nobody has raised it yet.
        """
        if not self._event.wait(timeout):
            raise WaitTimeout(f"step {self.step} not durable after {timeout} s")
        self.raise_failure()

    def raise_failure(self) -> None:
        """Raise this save's first failure unless some wait raised one already: a save's
        failure is raised once, however many tiers it failed (all are in ``stats``)."""
        claimed = [f for f in self.failures if f.claim()]
        if len(claimed) == len(self.failures) and claimed:
            raise claimed[0].error

    def report(self) -> dict[str, Any]:
        """Any thread: what is known so far: ``persist_s`` and ``written_bytes`` per tier, and
        ``errors`` (every failure and warning, as ``"tier: Type: message"``)."""
        with self._lock:
            return {
                "persist_s": dict(self.persist_s),
                "written_bytes": dict(self.written_bytes),
                "errors": [
                    f"{f.tier}: {type(f.error).__name__}: {f.error}" for f in self.failures + self.warnings
                ],
            }

    def durable_on(self) -> tuple[str, ...]:
        """Tiers on which this step is durable."""
        failed = {f.tier for f in self.failures}
        return tuple(t for t in self.tiers if t in self.persist_s and t not in failed)

    # -- called by the persist thread ------------------------------------------------------
    def _finish_tier(
        self, tier: str, seconds: float, error: BaseException | None = None, *, fatal: bool = True
    ) -> None:
        with self._lock:
            if tier not in self._pending:
                return  # reported already (a tier is reported once)
            self.persist_s[tier] = seconds
            if error is not None:
                (self.failures if fatal else self.warnings).append(_Failure(tier, error))
            self._pending.discard(tier)
            if not self._pending:
                self._event.set()

    def _fail_pending(self, error: BaseException) -> None:
        """Report every tier not reported yet as failed with ``error``."""
        for name in self.tiers:
            self._finish_tier(name, 0.0, error)

    def _warn(self, tier: str, error: BaseException) -> None:
        """A failure after the fact that does not change durability (retention)."""
        with self._lock:
            self.warnings.append(_Failure(tier, error))


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
        #: peers whose mirror is failing now: a failure is logged once per peer and episode
        self._mirror_failing: set[int] = set()
        #: (peer rank, address) of the ranks holding this rank's mirrors; set by the Checkpointer
        self.mirror_peers: list[tuple[int, tuple[str, int]]] = []
        self.mirror_owner = ""  # this rank's shard name, as the peers file it
        self._mirror_pool = ThreadPoolExecutor(1, thread_name_prefix="flashckpt-mirror")
        self._mirror_abort = threading.Event()
        self.pool = ThreadPoolExecutor(
            max(opts.io_threads, opts.hash_threads), thread_name_prefix="flashckpt-io"
        )
        #: checksums of a fresh snapshot, running ahead of its writes on ``pool``
        self.hash_pool = ThreadPoolExecutor(opts.hash_threads, thread_name_prefix="flashckpt-hash")
        self._queue: queue.Queue[Job | None] = queue.Queue()
        #: A shared-tier commit this rank stopped waiting for (``WaitTimeout``): (key, step).
        #: Until it resolves, later saves skip the shared tier at once (reported) instead of
        #: each waiting ``coord_timeout_s`` for a rank that is likely dead.  Persist thread only.
        self._stalled: tuple[str, tuple[int, int]] | None = None
        # persist thread only: per tier, chunks of this rank's newest manifest there, by checksum
        self._known_chunks: dict[str, dict[str, ChunkEntry]] = {}
        self._known_order: dict[str, tuple[int, int]] = {}
        self._run_claimed: set[str] = set()  # tiers whose run record this process has checked
        self._thread = threading.Thread(target=self._loop, name="flashckpt-persist", daemon=True)
        self._thread.start()

    def submit(self, job: Job) -> None:
        """Training thread: hand a staged slot over.  Never blocks.  Raises
        :class:`PersisterDied` if the thread is gone (the caller gives the slot back)."""
        self.check_alive()
        self._queue.put(job)

    def idle(self) -> bool:
        """Any thread: no job is queued or in progress (no slot will be given back by this
        thread until a new job is submitted).  A job's slot is released before its
        ``task_done``, so once this is True every finished job's slot is free."""
        return self._queue.unfinished_tasks == 0

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
        self._mirror_pool.shutdown(wait=True)

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
            for tier, key, t0 in waits:
                if self._await_commit(job, tier, key, t0):
                    committed.append(tier)
            if waits and len(committed) == len(job.tiers) and not job.handle.failures:
                self.stager.mark_durable(job.slot, job.generation)
        except BaseException as exc:  # never let the thread die silently
            log.exception("flashckpt persist of step %d failed unexpectedly", job.manifest.step)
            job.handle._fail_pending(exc)
        finally:
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
        m = job.manifest
        committed: list[Tier] = []
        waits: list[tuple[Tier, str, float]] = []
        pushes: list[tuple[int, float, Future[int]]] = []
        t_seal = time.perf_counter()
        # Checksums are computed in the first tier's chunk tasks, each before its write
        # (unless that tier deduplicates across ranks, which needs them all up front).
        # (A snapshot without chunks counts as sealed: it has nothing to checksum.)
        pipelined = not job.hashed and not m.sealed and bool(job.tiers) and not self._dedups(job.tiers[0])

        def sealed(sm: Manifest) -> None:
            """Every checksum is known: the memory tier's manifest, then the mirrors."""
            nonlocal m, pushes
            m = sm
            error: BaseException | None = None
            try:
                self.memory.seal(job.slot, sm)
            except BaseException as exc:  # the tiers go on: their writes carry the checksums  # noqa: BLE001
                log.error("flashckpt: step %d's sealed manifest was not written to memory: %s", sm.step, exc)
                error = exc
            job.handle._finish_tier("memory", time.perf_counter() - t_seal, error)
            pushes = self._start_mirrors(job, sm)

        def seal_now() -> bool:
            """Checksum the whole slot here (the first tier did not get to it); False, with
            every tier still pending failed, if that fails."""
            try:
                sm = self._hash(m, job.slot)
            except BaseException as exc:  # every pending tier is failed with it  # noqa: BLE001
                log.error("flashckpt: step %d could not be checksummed: %s", m.step, exc)
                for tier in job.tiers:
                    if tier.name in job.handle._pending:
                        self._report_failure(job, tier, exc)
                for name in job.handle.tiers:
                    if name in job.handle._pending:
                        job.handle._finish_tier(name, 0.0, exc)
                return False
            sealed(sm)
            return True

        if job.hashed:
            pushes = self._start_mirrors(job, m)
        elif not pipelined and not seal_now():
            return committed, waits
        for i, tier in enumerate(job.tiers):
            if not m.sealed and i > 0 and not seal_now():  # the first tier failed before sealing
                return committed, waits
            t0 = time.perf_counter()
            ckey = self._commit_key(job, tier)
            if ckey is not None:
                try:
                    self._check_stalled(tier, job)
                except FlashCkptError as exc:  # nothing was written: nothing to discard
                    self._report_failure(job, tier, exc)
                    log.error("flashckpt: step %d skips the %s tier: %s", m.step, tier.name, exc)
                    job.handle._finish_tier(tier.name, 0.0, exc)
                    continue
            try:
                on_sealed = sealed if pipelined and i == 0 else None
                job.handle.written_bytes[tier.name] = self.persist(
                    tier,
                    m,
                    job.slot,
                    job.seq,
                    on_sealed=on_sealed,
                    verify=job.hashed,
                    dedup=job.writers is None,
                )
                if ckey is not None:
                    arrived = self.control.arrive(ckey)
                    if arrived < (job.writers or self.control.world):
                        waits.append((tier, ckey, t0))  # another rank writes the commit record
                        continue
                    try:
                        self.commit_shared(tier, m.step, m.world_size, m.order)
                    except BaseException as exc:
                        self.control.publish(ckey, f"the commit by rank {self.control.rank} failed: {exc}")
                        raise
                    if job.writers is None:  # every rank wrote its shard and waits: no writer runs
                        self._collect_shared(tier, job)
                    self.control.publish(ckey, "ok")
                    if self.opts.dedup_replicated:  # every rank has read them: its manifest is in
                        for r in range(self.control.world):
                            self.control.delete(_dedup_key(tier, m.step, job.seq, r))
            except BaseException as exc:  # this tier fails with it; the others go on  # noqa: BLE001
                self._discard(tier, m)
                self._report_failure(job, tier, exc)
                secs = time.perf_counter() - t0
                log.error(
                    "flashckpt: step %d failed on the %s tier (%s) after %.2f s: %s",
                    m.step,
                    tier.name,
                    tier.backend.url,
                    secs,
                    exc,
                )
                job.handle._finish_tier(tier.name, secs, exc)
                continue
            self._committed(job, tier, t0)
            committed.append(tier)
        if not m.sealed and not seal_now():  # the only tier failed before sealing
            return committed, waits
        self._finish_mirrors(job, pushes)
        return committed, waits

    def _start_mirrors(self, job: Job, m: Manifest) -> list[tuple[int, float, Future[int]]]:
        """Persist thread: start pushing the sealed snapshot to each peer (off this thread,
        alongside the tier writes; the slot stays held until they are done)."""
        if not (job.mirror and self.mirror_peers):
            return []
        # A fresh abort per snapshot: setting it (``_finish_mirrors``) shuts the pushes'
        # sockets down, so even a send blocked on a peer that stopped reading ends at once.
        self._mirror_abort = MirrorAbort()
        t0 = time.perf_counter()
        return [
            (
                peer,
                t0,
                self._mirror_pool.submit(
                    push,
                    addr,
                    self.control.secret,
                    self.mirror_owner,
                    m,
                    job.slot.view,
                    self.opts,
                    self._mirror_abort,
                ),
            )
            for peer, addr in self.mirror_peers
        ]

    def _finish_mirrors(self, job: Job, pushes: list[tuple[int, float, Future[int]]]) -> None:
        if not pushes:
            return
        # Only the pushes hold the slot now.  If a save is waiting for it, the peers cannot keep
        # up: abandon this snapshot's mirror (reported) rather than cost training time.
        while not all(f.done() for _, _, f in pushes):
            if self.stager.waiters:
                self._mirror_abort.set()
            wait([f for _, _, f in pushes], timeout=0.005)
        error: BaseException | None = None
        sent = 0
        for peer, _t0, fut in pushes:
            try:
                sent += fut.result()
            except Exception as exc:  # a slow or dead peer never fails the save's other tiers  # noqa: BLE001
                self._mirror_failed(peer, job.manifest.step, exc)
                error = error or exc
            else:
                if peer in self._mirror_failing:
                    self._mirror_failing.discard(peer)
                    log.info("flashckpt: mirroring to rank %d works again (step %d)", peer, job.manifest.step)
        secs = time.perf_counter() - pushes[0][1]
        job.handle.written_bytes["mirror"] = sent
        job.handle._finish_tier("mirror", secs, error, fatal=self.opts.require_mirrors)

    def _mirror_failed(self, peer: int, step: int, exc: BaseException) -> None:
        """A mirror is best effort: logged once per peer and episode (a slow peer would
        otherwise log every step), always in ``stats``."""
        if peer in self._mirror_failing:
            log.debug("flashckpt: mirroring step %d to rank %d failed: %s", step, peer, exc)
            return
        self._mirror_failing.add(peer)
        log.warning(
            "flashckpt: mirroring step %d to rank %d failed: %s (logged once until it works again; "
            "the local and storage tiers are unaffected)",
            step,
            peer,
            exc,
        )

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

    def _commit_key(self, job: Job, tier: Tier) -> str | None:
        """The store key on which the ranks count arrivals for this job on a shared tier."""
        if not (tier.shared and self.control.distributed):
            return None
        return f"commit/{tier.name}/{job.manifest.step}/{job.seq}"

    def _report_failure(self, job: Job, tier: Tier, exc: BaseException) -> None:
        """Tell the ranks waiting on this job's commit that it cannot happen."""
        key = self._commit_key(job, tier)
        if key is None:
            return
        try:
            self.control.publish(key, f"rank {self.control.rank} failed: {type(exc).__name__}: {exc}")
        except FlashCkptError as err:
            log.warning("flashckpt: could not report the failure of step %d: %s", job.manifest.step, err)

    def _check_stalled(self, tier: Tier, job: Job) -> None:
        """Persist thread, before writing to a shared tier: raise if an earlier commit this rank
        gave up waiting for is still unresolved.  A step is written only after the previous
        one was seen committed (the chunk GC relies on it, see ``collect_chunks``), so waiting
        again here would cost each save ``coord_timeout_s``.  Resolved: an outcome was
        published for it, or the tier holds a commit of that step or a newer one."""
        if self._stalled is None:
            return
        key, order = self._stalled
        if self.control.outcome_now(key) is None and not self._committed_since(tier, order):
            if self._dedups(tier):  # the other ranks wait for this rank's chunk entries: none
                self.control.publish(_dedup_key(tier, job.manifest.step, job.seq, self.control.rank), "{}")
            raise CoordinationError(
                f"not written to the {tier.name} tier: step {order[1]}'s commit is still waiting for "
                f"a rank (gave up after {self.control.timeout_s:.0f} s); this tier resumes once "
                "that rank catches up, or after a restart"
            )
        log.info("flashckpt: step %d's commit resolved late; writing the %s tier again", order[1], tier.name)
        self._stalled = None

    def _committed_since(self, tier: Tier, order: tuple[int, int]) -> bool:
        """The tier holds a commit of that snapshot or a newer one (in timeline order: an
        abandoned step with a higher number is older, see docs/format.md)."""
        try:
            return any(r.order >= order for r in read_commits(tier.backend, self.opts))
        except FlashCkptError as exc:
            log.debug("flashckpt: cannot list the %s tier: %s", tier.name, exc)
            return False

    def _await_commit(self, job: Job, tier: Tier, key: str, t0: float) -> bool:
        """Persist thread, slot released: wait for the rank that writes the commit record."""
        try:
            try:
                outcome = self.control.await_outcome(key)
            except WaitTimeout:
                self._stalled = (key, job.manifest.order)
                raise
            if outcome != "ok":
                raise CoordinationError(f"step {job.manifest.step} was not committed: {outcome}")
        except FlashCkptError as exc:
            log.error("flashckpt: step %d on the %s tier: %s", job.manifest.step, tier.name, exc)
            job.handle._finish_tier(tier.name, time.perf_counter() - t0, exc)
            return False
        self._committed(job, tier, t0)
        return True

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
        self._claim_run(tier, run)
        hooks.fire("commit.record", step=step, tier=tier.name)
        retrying(be, opts).put(commit_key(step), encode_commit(record))
        hooks.fire("commit.done", step=step, tier=tier.name)

    def _claim_run(self, tier: Tier, run: str) -> None:
        """Before the first commit this process writes to ``tier``: its run record."""
        if tier.holds_run and run and tier.name not in self._run_claimed:
            claim_run(tier.backend, run, self.opts)
            self._run_claimed.add(tier.name)

    @hooks.timed("time.persist.hash")
    def _hash(self, m: Manifest, slot: Slot) -> Manifest:
        digests = run_all(self.pool, lambda c: checksum(slot.view(c.offset, c.nbytes)), m.chunks)
        return m.with_chunks(
            ChunkEntry(slot.name, c.offset, c.offset, c.nbytes, c.nbytes, c.codec, d)
            for c, d in zip(m.chunks, digests, strict=True)
        )

    def _discard(self, tier: Tier, m: Manifest) -> None:
        """Best effort: remove this shard's manifest of a failed step.  Its new chunks are
        shared by content and may be referenced by other steps: the next retention pass
        deletes those that no kept step references."""
        be = tier.backend
        try:
            be.delete(manifest_key(m.step, m.rank, m.world_size))
        except FlashCkptError as exc:
            log.debug("could not remove partial step %d on %s: %s", m.step, be.url, exc)

    def _known(self, tier: Tier, m: Manifest) -> dict[str, ChunkEntry]:
        """Chunks of this shard already on ``tier`` (from its newest commit), by checksum.

        The chunks remembered from this rank's last manifest there are reused only while that
        step is still committed there (one record read per save): a tier that lost it (wiped,
        a replaced disk, a commit that failed) gets every chunk written again, never a
        manifest that references objects it no longer holds."""
        known = self._known_chunks.get(tier.name)
        if known is not None and not self._basis_committed(tier):
            log.info("flashckpt: the %s tier no longer holds the step its chunks were reused from", tier.name)
            known = None
            self._known_order.pop(tier.name, None)
        if known is None:
            known = {}
            try:
                records = read_commits(tier.backend, self.opts)
                if records:
                    newest = records[-1]
                    prev = read_committed_manifest(tier.backend, newest.step, m.rank, m.world_size, self.opts)
                    known = {c.checksum: c for c in prev.chunks}
                    self._known_order[tier.name] = newest.order
            except FlashCkptError as exc:  # nothing to reuse: everything is written again
                log.debug("no chunks to reuse on %s: %s", tier.backend.url, exc)
            self._known_chunks[tier.name] = known
        return known

    def _basis_committed(self, tier: Tier) -> bool:
        """The step whose chunks ``_known`` remembers for ``tier`` is still committed there."""
        order = self._known_order.get(tier.name)
        if order is None:
            return not self._known_chunks.get(tier.name)  # nothing to reuse: nothing to check
        what = f"commit record of step {order[1]} on {tier.backend.url}"
        try:
            raw = read_record(tier.backend, commit_key(order[1]), what, self.opts)
            return decode_commit(raw, what).order == order
        except FlashCkptError as exc:
            log.debug("flashckpt: %s: %s", what, exc)
            return False

    @hooks.timed("time.persist.tier", lambda self, tier, *a, **k: {"tier": tier.name})
    def persist(
        self,
        tier: Tier,
        m: Manifest,
        slot: Slot,
        seq: str = "",
        *,
        on_sealed: Callable[[Manifest], None] | None = None,
        verify: bool = False,
        dedup: bool = True,
    ) -> int:
        """Write one shard to ``tier``: new chunks, then the manifest, then the commit record.

        Chunks are content-addressed: one whose bytes the tier's newest commit already holds is
        referenced again, not encoded or written.  With ``Options.dedup_replicated`` on the
        shared tier of a multi-rank job, a chunk whose bytes its owner rank also holds is
        written by the owner only (see :meth:`_dedup`).  Returns the chunk bytes written.

        ``m`` may be unsealed (no checksums yet) when ``on_sealed`` is given: each chunk task
        checksums its chunk before it writes it, and ``on_sealed(sealed manifest)`` is called
        on this thread as soon as every checksum is known, while the writes go on.

        ``dedup``: False for a save only some ranks make (a salvage): every chunk of the
        shard is written by this rank (the ranks that do not write would never publish theirs).

        ``verify``: ``m``'s checksums were not computed from the slot just now (a snapshot
        salvaged from the memory tier, or persisted at close): every chunk written is checked
        against its checksum first, so damaged bytes are never stored, above all not under
        the content address of good ones (which other committed steps share).
        """
        be, opts = tier.backend, self.opts
        # Re-saving a step number: un-commit first, so the step is never committed while torn.
        retrying(be, opts).delete(commit_key(m.step))
        known = self._known(tier, m)
        groups = _byte_groups(m)
        dedup = dedup and self._dedups(tier)
        if not m.sealed:
            if on_sealed is None or dedup:
                raise ValueError("an unsealed manifest is persisted only with on_sealed, without dedup")
            return self._persist_unsealed(tier, m, slot, known, groups, on_sealed)
        owners = None
        if dedup:
            owners = assign_owners([c.nbytes for c in m.chunks], self.control.world)
        futures: list[Future[ChunkEntry]] = []
        written: list[Future[ChunkEntry]] = []  # every write reading the slot
        deferred: list[int] = []  # chunks another rank owns: resolved once it has published
        published = [False]
        try:
            for i, (src, group) in enumerate(zip(m.chunks, groups, strict=True)):
                hit = known.get(src.checksum)
                if hit is not None and hit.nbytes == src.nbytes:
                    done: Future[ChunkEntry] = Future()
                    done.set_result(dataclasses.replace(hit, offset=src.offset))
                    futures.append(done)
                    continue
                if owners is not None and owners[i] != self.control.rank:
                    deferred.append(i)
                    futures.append(Future())
                    continue
                view = slot.view(src.at, src.stored_nbytes)
                written.append(self.pool.submit(self._put_chunk, tier, m.step, src, view, group, verify))
                futures.append(written[-1])
            if owners is not None:
                self._dedup(tier, m, slot, seq, owners, futures, written, deferred, groups, published, verify)
            out = m.with_chunks(wait_all(futures))
        except BaseException:
            # The slot goes back to the stager after this: every write that reads it must be
            # over first (a straggler would store the next snapshot's bytes under this
            # chunk's content address).  And the other ranks must not wait out the timeout
            # for this rank's chunk entries: an empty set makes them write their own.
            for f in futures:
                f.cancel()
            wait(written)
            if owners is not None and not published[0]:
                self._publish_entries(tier, m, seq, {})
            raise
        self._finish_persist(tier, m, out)
        return sum(f.result().stored_nbytes for f in written)

    def _persist_unsealed(
        self,
        tier: Tier,
        m: Manifest,
        slot: Slot,
        known: dict[str, ChunkEntry],
        groups: list[int],
        on_sealed: Callable[[Manifest], None],
    ) -> int:
        """``persist`` of a snapshot not yet checksummed.  Chunks are checksummed on the
        ``flashckpt-hash`` pool at memory speed; as each checksum is known, the chunk's write
        (unless ``known`` holds its bytes) goes to the I/O pool, so the first writes start
        after one chunk's checksum instead of all of them."""
        digests: list[Future[str]] = [Future() for _ in m.chunks]
        entries: list[Future[ChunkEntry]] = [Future() for _ in m.chunks]
        writes: list[Future[ChunkEntry]] = []
        reused: set[int] = set()
        stop = threading.Event()

        def hash_then_write(i: int, src: ChunkEntry, group: int) -> None:
            """Hash pool: checksum chunk ``i``, then hand its write to the I/O pool.  Settles
            ``digests[i]`` and ``entries[i]`` whatever happens (the persist thread waits)."""
            try:
                view = slot.view(src.at, src.stored_nbytes)
                d = checksum(view)
                _settle(digests[i], d)
                c = ChunkEntry(slot.name, src.offset, src.offset, src.nbytes, src.nbytes, src.codec, d)
                hit = known.get(d)
                if hit is not None and hit.nbytes == c.nbytes:
                    reused.add(i)
                    _settle(entries[i], dataclasses.replace(hit, offset=c.offset))
                elif stop.is_set():  # the tier failed: write nothing more from this slot
                    _settle(entries[i], error=CancelledError())
                else:  # (after interpreter shutdown began, submit raises: settled below)
                    write = self.pool.submit(self._put_chunk, tier, m.step, c, view, group)
                    writes.append(write)
                    write.add_done_callback(lambda f: _settle_from(f, entries[i]))
            except BaseException as exc:  # settled into the futures: whoever waits raises it  # noqa: BLE001
                _settle(digests[i], error=exc)
                _settle(entries[i], error=exc)

        tasks: list[Future[None]] = []
        try:
            for i, (src, group) in enumerate(zip(m.chunks, groups, strict=True)):
                tasks.append(self.hash_pool.submit(hash_then_write, i, src, group))
            sealed = m.with_chunks(
                ChunkEntry(slot.name, c.offset, c.offset, c.nbytes, c.nbytes, c.codec, d)
                for c, d in zip(m.chunks, wait_all(digests), strict=True)
            )
            on_sealed(sealed)
            out = sealed.with_chunks(wait_all(entries))
        except BaseException:
            # The slot goes back to the stager after this: nothing may read it any more.
            stop.set()
            for t in tasks:
                t.cancel()
            wait(tasks)  # every hash task has returned: no write is submitted after this
            for w in writes:
                w.cancel()
            wait(list(writes))
            raise
        self._finish_persist(tier, sealed, out)
        return sum(e.stored_nbytes for i, e in enumerate(out.chunks) if i not in reused)

    def _finish_persist(self, tier: Tier, m: Manifest, out: Manifest) -> None:
        """The manifest of ``out`` (``m`` with the tier's chunk entries), then, on a tier of
        this rank's own, its commit record."""
        be, opts = tier.backend, self.opts
        mkey = manifest_key(m.step, m.rank, m.world_size)
        mdata = encode_manifest(out)
        retrying(be, opts).put(mkey, mdata)
        hooks.fire("persist.manifest", step=m.step, tier=tier.name)
        # Later saves reuse the chunks of this rank's own newest manifest: retention never
        # deletes it before a newer manifest of this rank exists (see collect_chunks).  A
        # salvaged older snapshot is not the newest: retention may retire it at once.
        if m.order >= self._known_order.get(tier.name, (-1, -1)):
            self._known_chunks[tier.name] = {c.checksum: c for c in out.chunks}
            self._known_order[tier.name] = m.order
        if not (tier.shared and self.control.distributed):
            scope = "rank" if m.world_size > 1 else "job"
            entries = ((mkey, len(mdata), checksum(mdata)),)
            record = CommitRecord(
                m.step,
                m.world_size,
                now(),
                entries,
                scope,
                generation=m.generation,
                run=m.run,
                ancestors=m.ancestors,
            )
            self._claim_run(tier, m.run)
            cdata = encode_commit(record)
            hooks.fire("commit.record", step=m.step, tier=tier.name)
            retrying(be, opts).put(commit_key(m.step), cdata)
            hooks.fire("commit.done", step=m.step, tier=tier.name)

    def _dedup(
        self,
        tier: Tier,
        m: Manifest,
        slot: Slot,
        seq: str,
        owners: list[int],
        futures: list[Future[ChunkEntry]],
        written: list[Future[ChunkEntry]],
        deferred: list[int],
        groups: list[int],
        published: list[bool],
        verify: bool,
    ) -> None:
        """Deduplicated save of replicated state (persist thread; every rank runs it).

        Chunk ``i`` is owned by rank ``owners[i]`` (spread by bytes).  Each rank writes the
        chunks it owns and publishes their entries under one store key; for a chunk it does
        not own, it waits for the owner's entries and references the owner's object when the
        checksums agree, else (state that is not replicated after all, or an owner that never
        publishes within ``coord_timeout_s``) writes its own.  Correctness never rests on the
        state really being replicated; only the bytes saved do.
        """
        ctl = self.control
        owned = [i for i in range(len(m.chunks)) if owners[i] == ctl.rank]
        wait([futures[i] for i in owned])  # all of them, even when one fails
        mine = {i: futures[i].result() for i in owned if futures[i].exception() is None}
        self._publish_entries(tier, m, seq, mine)  # what succeeded: the others reuse it
        published[0] = True
        if len(mine) < len(owned):
            futures[next(i for i in owned if i not in mine)].result()  # raises that chunk's error
        blobs: dict[int, dict[str, Any] | None] = {}
        for i in deferred:
            o, src = owners[i], m.chunks[i]
            if o not in blobs:
                try:
                    blobs[o] = json.loads(ctl.await_outcome(_dedup_key(tier, m.step, seq, o)))
                except (FlashCkptError, ValueError) as exc:
                    log.warning("flashckpt: rank %d published no chunks of step %d: %s", o, m.step, exc)
                    blobs[o] = None
            got = (blobs[o] or {}).get(str(i))
            # the owner's entry comes from another process: it must name this very content
            if (
                isinstance(got, list)
                and len(got) == 4
                and got[0] == src.checksum
                and isinstance(got[3], str)
                and CODEC_PATTERN.fullmatch(got[3])
                and got[1] == chunk_key(src.checksum, got[3], got[2])
                and type(got[2]) is int
                and 0 < got[2] <= MAX_TOTAL_BYTES
            ):
                entry = ChunkEntry(got[1], 0, src.offset, src.nbytes, got[2], got[3], src.checksum)
                futures[i].set_result(entry)
                continue
            view = slot.view(src.at, src.stored_nbytes)
            fut = self.pool.submit(self._put_chunk, tier, m.step, src, view, groups[i], verify)
            written.append(fut)
            fut.add_done_callback(lambda f, i=i: _settle_from(f, futures[i]))  # type: ignore[misc]

    def _publish_entries(self, tier: Tier, m: Manifest, seq: str, mine: dict[int, ChunkEntry]) -> None:
        """Publish this rank's chunk entries of a deduplicated save (possibly none)."""
        body = json.dumps({str(i): [c.checksum, c.key, c.stored_nbytes, c.codec] for i, c in mine.items()})
        try:
            self.control.publish(_dedup_key(tier, m.step, seq, self.control.rank), body)
        except FlashCkptError as exc:
            log.warning("flashckpt: could not publish the chunks of step %d: %s", m.step, exc)

    def _dedups(self, tier: Tier) -> bool:
        """Chunks of replicated state are written once per job on this tier."""
        return self.opts.dedup_replicated and tier.shared and self.control.distributed

    def _put_chunk(
        self, tier: Tier, step: int, c: ChunkEntry, view: memoryview, group: int, verify: bool = False
    ) -> ChunkEntry:
        """I/O pool: encode one chunk for ``tier`` (if it compresses) and put it at its content
        address.  At most ``io_threads`` encoded buffers exist at once: memory stays bounded.
        ``verify``: check the bytes against ``c.checksum`` first (see :meth:`persist`)."""
        if verify and checksum(view) != c.checksum:
            raise CorruptCheckpointError(
                f"step {step}: the chunk at {c.offset} in memory fails its checksum; not written"
            )
        codec, stored = encode(view, group, tier.compression)
        key = chunk_key(c.checksum, codec, len(stored))
        retrying(tier.backend, self.opts).put(key, stored)
        hooks.fire("persist.chunk", step=step, tier=tier.name, key=key)
        return ChunkEntry(key, 0, c.offset, c.nbytes, len(stored), codec, c.checksum)


def _byte_groups(m: Manifest) -> list[int]:
    """Per chunk: the element size to byte-group by before zstd (1 = none).  Only chunks
    inside one floating-point tensor are grouped (packs of small tensors are not)."""
    spans = sorted((t.offset, t.offset + t.nbytes, t.dtype) for t in m.tensors if t.nbytes)
    starts = [s[0] for s in spans]
    out = []
    for c in m.chunks:
        i = bisect.bisect_right(starts, c.offset) - 1
        group = 1
        if i >= 0 and c.offset + c.nbytes <= spans[i][1]:
            dtype = spans[i][2]
            if dtype.is_floating_point and dtype.itemsize in (2, 4, 8):
                group = dtype.itemsize
        out.append(group)
    return out


def assign_owners(sizes: list[int], world: int) -> list[int]:
    """Deterministic owner rank per chunk: largest first, each to the least-loaded rank."""
    load = [0] * world
    owners = [0] * len(sizes)
    for i in sorted(range(len(sizes)), key=lambda i: (-sizes[i], i)):
        r = min(range(world), key=lambda r: (load[r], r))
        owners[i] = r
        load[r] += sizes[i]
    return owners


def _dedup_key(tier: Tier, step: int, seq: str, rank: int) -> str:
    """The store key under which ``rank`` publishes its chunk entries of a deduplicated save."""
    return f"dedup/{tier.name}/{step}/{seq}/r{rank}"


def _settle(dst: Future[T], result: T | None = None, *, error: BaseException | None = None) -> None:
    """Complete ``dst`` unless it is done already (cancelled by a failing wait)."""
    try:
        if error is not None:
            dst.set_exception(error)
        else:
            dst.set_result(result)  # type: ignore[arg-type]
    except InvalidStateError:
        pass


def _settle_from(src: Future[T], dst: Future[T]) -> None:
    """Complete ``dst`` as ``src`` completed (a done-callback of ``src``)."""
    if src.cancelled():
        dst.cancel()
        return
    exc = src.exception()
    if exc is not None:
        _settle(dst, error=exc)
    else:
        _settle(dst, src.result())
