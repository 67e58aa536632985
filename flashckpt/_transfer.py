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
from dataclasses import dataclass, field
from typing import Any, TypeVar

from flashckpt import _hooks as hooks
from flashckpt._codec import Compression, encode
from flashckpt._config import Options
from flashckpt._coordinator import apply_retention, committed_steps, read_committed_manifest
from flashckpt._dist import Control
from flashckpt._mirror import MirrorAbort, push
from flashckpt._retry import retry
from flashckpt._staging import Slot, Stager
from flashckpt.backends import Backend
from flashckpt.errors import CoordinationError, FlashCkptError, WaitTimeout
from flashckpt.format import (
    CODEC_PATTERN,
    MAX_TOTAL_BYTES,
    ChunkEntry,
    CommitRecord,
    Manifest,
    checksum,
    chunk_key,
    commit_key,
    encode_commit,
    encode_manifest,
    manifest_key,
    memory_manifest_key,
    now,
)

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
        self.failures: list[_Failure] = []
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
        for f in self.failures:
            if f.claim():
                raise f.error

    def durable_on(self) -> tuple[str, ...]:
        """Tiers on which this step is durable."""
        failed = {f.tier for f in self.failures}
        return tuple(t for t in self.tiers if t in self.persist_s and t not in failed)

    # -- called by the persist thread ------------------------------------------------------
    def _finish_tier(self, tier: str, seconds: float, error: BaseException | None = None) -> None:
        with self._lock:
            self.persist_s[tier] = seconds
            if error is not None:
                self.failures.append(_Failure(tier, error))
            self._pending.discard(tier)
            if not self._pending:
                self._event.set()


@dataclass
class Job:
    """One snapshot for the persist thread.  ``manifest.chunks`` already hold checksums when
    ``hashed`` (a salvaged snapshot from the memory tier); else they are filled in here."""

    manifest: Manifest
    slot: Slot
    tiers: list[Tier]
    handle: SaveHandle
    hashed: bool = False
    on_done: list[Callable[[SaveHandle], None]] = field(default_factory=list)
    #: Names this save among the ranks (every rank makes the same calls in the same order).
    seq: str = ""
    #: Ranks that write this step to a shared tier in this attempt; the last one commits.
    #: ``None``: every rank.  (A salvage after a restart: only ranks that lack their shard.)
    writers: int | None = None
    generation: int = 0  # the slot's generation when the job was made
    mirror: bool = False  # also push the snapshot to the peers' memory (tier "mirror")


class Persister:
    """Owns the ``flashckpt-persist`` thread and the ``flashckpt-hash`` and ``flashckpt-io`` pools."""

    def __init__(
        self, opts: Options, memory: Tier, stager: Stager, keep: int | None, control: Control | None = None
    ) -> None:
        self.opts = opts
        self.memory = memory
        self.stager = stager
        self.keep = keep
        self.control = control if control is not None else Control(None, opts.coord_timeout_s)
        # per shared tier: unreferenced chunk -> (newest commit, time) when first seen so
        self._gc_candidates: dict[str, dict[str, tuple[int, float]]] = {}
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
        self._stalled: tuple[str, int] | None = None
        self._known_chunks: dict[str, dict[str, ChunkEntry]] = {}  # persist thread only
        self._thread = threading.Thread(target=self._loop, name="flashckpt-persist", daemon=True)
        self._thread.start()

    def submit(self, job: Job) -> None:
        """Training thread: hand a staged slot over.  Never blocks."""
        self._queue.put(job)

    def close(self) -> None:
        """Finish every queued job, then stop the thread and the pool."""
        self._queue.put(None)
        self._thread.join()
        self.pool.shutdown(wait=True)
        self.hash_pool.shutdown(wait=True)
        self._mirror_pool.shutdown(wait=True)

    # -- persist thread ----------------------------------------------------------------------
    def _loop(self) -> None:
        while True:
            job = self._queue.get()
            if job is None:
                self._queue.task_done()
                return
            try:
                self._process(job)
            finally:
                self._queue.task_done()

    def join(self) -> None:
        """Block until every submitted job, retention included, is finished."""
        self._queue.join()

    def _process(self, job: Job) -> None:
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
            for name in job.handle.tiers:
                if name in job.handle._pending:
                    job.handle._finish_tier(name, 0.0, exc)
        finally:
            if not released:
                self.stager.release(job.slot)
            # Every tier is reported by now; one that is not would hang its waiters forever.
            left = [name for name in job.handle.tiers if name in job.handle._pending]
            if left:
                log.error("flashckpt: step %d: tiers %s were never reported (a bug)", job.manifest.step, left)
                for name in left:
                    error = FlashCkptError(f"internal error: the {name} tier was not reported")
                    job.handle._finish_tier(name, 0.0, error)
            for cb in job.on_done:
                try:
                    cb(job.handle)
                except Exception:
                    log.exception("flashckpt completion callback failed")
        # Retention runs after the step is reported durable and its slot is free: deleting
        # old steps is not part of the cost of this save.
        for tier in committed:
            self._retain(tier)

    def _retain(self, tier: Tier) -> None:
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
                gc_candidates=self._gc_candidates.setdefault(tier.name, {}) if shared else None,
            )
        except FlashCkptError as exc:  # retention failing never fails a save
            log.warning(
                "flashckpt: retention on the %s tier (%s) failed: %s", tier.name, tier.backend.url, exc
            )

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
                self.memory.backend.put(memory_manifest_key(sm.step), encode_manifest(sm))
            except BaseException as exc:  # the tiers go on: their writes carry the checksums
                log.error("flashckpt: step %d's sealed manifest was not written to memory: %s", sm.step, exc)
                error = exc
            job.handle._finish_tier("memory", time.perf_counter() - t_seal, error)
            pushes = self._start_mirrors(job, sm)

        def seal_now() -> bool:
            """Checksum the whole slot here (the first tier did not get to it); False, with
            every tier still pending failed, if that fails."""
            try:
                sm = self._hash(m, job.slot)
            except BaseException as exc:
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
                    tier, m, job.slot, job.seq, on_sealed=on_sealed
                )
                if ckey is not None:
                    arrived = self.control.arrive(ckey)
                    if arrived < (job.writers or self.control.world):
                        waits.append((tier, ckey, t0))  # another rank writes the commit record
                        continue
                    try:
                        self.commit_shared(tier, m.step, m.world_size)
                    except BaseException as exc:
                        self.control.publish(ckey, f"the commit by rank {self.control.rank} failed: {exc}")
                        raise
                    self.control.publish(ckey, "ok")
                    if self.opts.dedup_replicated:  # every rank has read them: its manifest is in
                        for r in range(self.control.world):
                            self.control.delete(_dedup_key(tier, m.step, job.seq, r))
            except BaseException as exc:
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
            except Exception as exc:  # a slow or dead peer never fails the save's other tiers
                log.warning(
                    "flashckpt: mirroring step %d to rank %d failed: %s", job.manifest.step, peer, exc
                )
                error = error or exc
        secs = time.perf_counter() - pushes[0][1]
        job.handle.written_bytes["mirror"] = sent
        job.handle._finish_tier("mirror", secs, error)

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
        key, step = self._stalled
        if self.control.outcome_now(key) is None and not self._committed_since(tier, step):
            if self._dedups(tier):  # the other ranks wait for this rank's chunk entries: none
                self.control.publish(_dedup_key(tier, job.manifest.step, job.seq, self.control.rank), "{}")
            raise CoordinationError(
                f"not written to the {tier.name} tier: step {step}'s commit is still waiting for "
                f"a rank (gave up after {self.control.timeout_s:.0f} s); this tier resumes once "
                "that rank catches up, or after a restart"
            )
        log.info("flashckpt: step %d's commit resolved late; writing the %s tier again", step, tier.name)
        self._stalled = None

    def _committed_since(self, tier: Tier, step: int) -> bool:
        try:
            return any(s >= step for s in committed_steps(tier.backend, self.opts))
        except FlashCkptError as exc:
            log.debug("flashckpt: cannot list the %s tier: %s", tier.name, exc)
            return False

    def _await_commit(self, job: Job, tier: Tier, key: str, t0: float) -> bool:
        """Persist thread, slot released: wait for the rank that writes the commit record."""
        try:
            try:
                outcome = self.control.await_outcome(key)
            except WaitTimeout:
                self._stalled = (key, job.manifest.step)
                raise
            if outcome != "ok":
                raise CoordinationError(f"step {job.manifest.step} was not committed: {outcome}")
        except FlashCkptError as exc:
            log.error("flashckpt: step %d on the %s tier: %s", job.manifest.step, tier.name, exc)
            job.handle._finish_tier(tier.name, time.perf_counter() - t0, exc)
            return False
        self._committed(job, tier, t0)
        return True

    def commit_shared(self, tier: Tier, step: int, world: int) -> None:
        """Check every shard's manifest and write the commit record (persist thread of the last
        rank to arrive; or rank 0's training thread, when a salvage finds every shard there)."""
        be, opts = tier.backend, self.opts

        def entry(rank: int) -> tuple[str, int, str]:
            key = manifest_key(step, rank, world)
            data = retry(lambda: be.get(key), f"get {key}", opts)
            return key, len(data), checksum(data)

        entries = tuple(self.pool.map(entry, range(world)))
        record = CommitRecord(step, world, now(), entries)
        hooks.fire("commit.record", step=step, tier=tier.name)
        retry(lambda: be.put(commit_key(step), encode_commit(record)), f"commit step {step}", opts)
        hooks.fire("commit.done", step=step, tier=tier.name)

    def _hash(self, m: Manifest, slot: Slot) -> Manifest:
        digests = list(self.pool.map(lambda c: checksum(slot.view(c.offset, c.nbytes)), m.chunks))
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
        """Chunks of this shard already on ``tier`` (from its newest commit), by checksum."""
        known = self._known_chunks.get(tier.name)
        if known is None:
            known = {}
            try:
                steps = committed_steps(tier.backend, self.opts)
                if steps:
                    prev = read_committed_manifest(tier.backend, steps[-1], m.rank, m.world_size, self.opts)
                    known = {c.checksum: c for c in prev.chunks}
            except FlashCkptError as exc:  # nothing to reuse: everything is written again
                log.debug("no chunks to reuse on %s: %s", tier.backend.url, exc)
            self._known_chunks[tier.name] = known
        return known

    def persist(
        self,
        tier: Tier,
        m: Manifest,
        slot: Slot,
        seq: str = "",
        *,
        on_sealed: Callable[[Manifest], None] | None = None,
    ) -> int:
        """Write one shard to ``tier``: new chunks, then the manifest, then the commit record.

        Chunks are content-addressed: one whose bytes the tier's newest commit already holds is
        referenced again, not encoded or written.  With ``Options.dedup_replicated`` on the
        shared tier of a multi-rank job, a chunk whose bytes its owner rank also holds is
        written by the owner only (see :meth:`_dedup`).  Returns the chunk bytes written.

        ``m`` may be unsealed (no checksums yet) when ``on_sealed`` is given: each chunk task
        checksums its chunk before it writes it, and ``on_sealed(sealed manifest)`` is called
        on this thread as soon as every checksum is known, while the writes go on.
        """
        be, opts = tier.backend, self.opts
        # Re-saving a step number: un-commit first, so the step is never committed while torn.
        retry(lambda: be.delete(commit_key(m.step)), f"uncommit step {m.step}", opts)
        known = self._known(tier, m)
        groups = _byte_groups(m)
        if not m.sealed:
            if on_sealed is None or self._dedups(tier):
                raise ValueError("an unsealed manifest is persisted only with on_sealed, without dedup")
            return self._persist_unsealed(tier, m, slot, known, groups, on_sealed)
        owners = None
        if self._dedups(tier):
            owners = assign_owners([c.nbytes for c in m.chunks], self.control.world)
        futures: list[Future[ChunkEntry]] = []
        written: list[Future[ChunkEntry]] = []
        deferred: list[int] = []  # chunks another rank owns: resolved once it has published
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
            written.append(self.pool.submit(self._put_chunk, tier, m.step, src, view, group))
            futures.append(written[-1])
        if owners is not None:
            self._dedup(tier, m, slot, seq, owners, futures, written, deferred, groups)
        out = m.with_chunks(_wait_all(futures))
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
            except BaseException as exc:
                _settle(digests[i], error=exc)
                _settle(entries[i], error=exc)

        tasks: list[Future[None]] = []
        try:
            for i, (src, group) in enumerate(zip(m.chunks, groups, strict=True)):
                tasks.append(self.hash_pool.submit(hash_then_write, i, src, group))
            sealed = m.with_chunks(
                ChunkEntry(slot.name, c.offset, c.offset, c.nbytes, c.nbytes, c.codec, d)
                for c, d in zip(m.chunks, _wait_all(digests), strict=True)
            )
            on_sealed(sealed)
            out = sealed.with_chunks(_wait_all(entries))
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
        retry(lambda: be.put(mkey, mdata), f"put {mkey}", opts)
        hooks.fire("persist.manifest", step=m.step, tier=tier.name)
        # Later saves reuse the chunks of this rank's own newest manifest: retention never
        # deletes it before a newer manifest of this rank exists (see collect_chunks).
        self._known_chunks[tier.name] = {c.checksum: c for c in out.chunks}
        if not (tier.shared and self.control.distributed):
            scope = "rank" if m.world_size > 1 else "job"
            record = CommitRecord(m.step, m.world_size, now(), ((mkey, len(mdata), checksum(mdata)),), scope)
            cdata = encode_commit(record)
            hooks.fire("commit.record", step=m.step, tier=tier.name)
            retry(lambda: be.put(commit_key(m.step), cdata), f"commit step {m.step}", opts)
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
        mine = {i: futures[i].result() for i in range(len(m.chunks)) if owners[i] == ctl.rank}
        ctl.publish(
            _dedup_key(tier, m.step, seq, ctl.rank),
            json.dumps({str(i): [c.checksum, c.key, c.stored_nbytes, c.codec] for i, c in mine.items()}),
        )
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
                and got[1] == chunk_key(src.checksum, got[3])
                and type(got[2]) is int
                and 0 < got[2] <= MAX_TOTAL_BYTES
            ):
                entry = ChunkEntry(got[1], 0, src.offset, src.nbytes, got[2], got[3], src.checksum)
                futures[i].set_result(entry)
                continue
            view = slot.view(src.at, src.stored_nbytes)
            fut = self.pool.submit(self._put_chunk, tier, m.step, src, view, groups[i])
            written.append(fut)
            fut.add_done_callback(lambda f, i=i: _settle_from(f, futures[i]))  # type: ignore[misc]

    def _dedups(self, tier: Tier) -> bool:
        """Chunks of replicated state are written once per job on this tier."""
        return self.opts.dedup_replicated and tier.shared and self.control.distributed

    def _put_chunk(self, tier: Tier, step: int, c: ChunkEntry, view: memoryview, group: int) -> ChunkEntry:
        """I/O pool: encode one chunk for ``tier`` (if it compresses) and put it at its content
        address.  At most ``io_threads`` encoded buffers exist at once: memory stays bounded."""
        codec, stored = encode(view, group, tier.compression)
        key = chunk_key(c.checksum, codec)
        retry(lambda: tier.backend.put(key, stored), f"put {key}", self.opts)
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


def _wait_all(futures: list[Future[T]]) -> list[T]:
    """Wait for every future; cancel the rest and raise the first error if one fails."""
    error: BaseException | None = None
    results: list[T] = []
    for f in futures:
        try:
            results.append(f.result())
        except BaseException as exc:
            if error is None:
                error = exc
                for g in futures:
                    g.cancel()
    if error is not None:
        raise error
    return results
