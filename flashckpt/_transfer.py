"""Transfer: the background pipeline that makes a staged snapshot durable.

For each staged snapshot, the ``flashckpt-persist`` thread

1. checksums every chunk in the slot (on the ``flashckpt-io`` pool; xxh3 releases the GIL),
2. writes the memory-tier manifest (the snapshot now survives a crash of the process),
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
from concurrent.futures import Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from typing import Any, TypeVar

from flashckpt._codec import Compression, encode
from flashckpt._config import Options
from flashckpt._coordinator import apply_retention, committed_steps, read_committed_manifest
from flashckpt._dist import Control
from flashckpt._mirror import push
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
    """Owns the ``flashckpt-persist`` thread and the ``flashckpt-io`` pool."""

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
        if not job.hashed:
            t0 = time.perf_counter()
            try:
                m = self._hash(m, job.slot)
                data = encode_manifest(m)
                key = memory_manifest_key(m.step)
                self.memory.backend.put(key, data)
            except BaseException as exc:
                log.error("flashckpt: step %d could not be written to the memory tier: %s", m.step, exc)
                for name in job.handle.tiers:
                    job.handle._finish_tier(name, 0.0, exc)
                for tier in job.tiers:
                    self._report_failure(job, tier, exc)
                return committed, waits
            job.handle._finish_tier("memory", time.perf_counter() - t0)
        pushes = self._start_mirrors(job, m)
        for tier in job.tiers:
            t0 = time.perf_counter()
            try:
                ckey = self._commit_key(job, tier)
                if ckey is not None:
                    self._check_stalled(tier)
                job.handle.written_bytes[tier.name] = self.persist(tier, m, job.slot, job.seq)
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
                            self.control.delete(f"dedup/{tier.name}/{m.step}/{job.seq}/r{r}")
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
        self._finish_mirrors(job, pushes)
        return committed, waits

    def _start_mirrors(self, job: Job, m: Manifest) -> list[tuple[int, float, Future[int]]]:
        """Persist thread: start pushing the sealed snapshot to each peer (off this thread,
        alongside the tier writes; the slot stays held until they are done)."""
        if not (job.mirror and self.mirror_peers):
            return []
        self._mirror_abort.clear()
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

    def _check_stalled(self, tier: Tier) -> None:
        """Persist thread, before writing to a shared tier: raise if an earlier commit this rank
        gave up waiting for is still unresolved.  A step is written only after the previous
        one was seen committed (the chunk GC relies on it, see ``collect_chunks``), so waiting
        again here would cost each save ``coord_timeout_s``."""
        if self._stalled is None:
            return
        key, step = self._stalled
        if self.control.outcome_now(key) is None:
            raise CoordinationError(
                f"not written to the {tier.name} tier: step {step}'s commit is still waiting for "
                f"a rank (gave up after {self.control.timeout_s:.0f} s); this tier resumes once "
                "that rank catches up, or after a restart"
            )
        log.info("flashckpt: step %d's commit resolved late; writing the %s tier again", step, tier.name)
        self._stalled = None

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
        retry(lambda: be.put(commit_key(step), encode_commit(record)), f"commit step {step}", opts)

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

    def persist(self, tier: Tier, m: Manifest, slot: Slot, seq: str = "") -> int:
        """Write one shard to ``tier``: new chunks, then the manifest, then the commit record.

        Chunks are content-addressed: one whose bytes the tier's newest commit already holds is
        referenced again, not encoded or written.  With ``Options.dedup_replicated`` on the
        shared tier of a multi-rank job, a chunk whose bytes its owner rank also holds is
        written by the owner only (see :meth:`_dedup`).  Returns the chunk bytes written.
        """
        be, opts = tier.backend, self.opts
        # Re-saving a step number: un-commit first, so the step is never committed while torn.
        retry(lambda: be.delete(commit_key(m.step)), f"uncommit step {m.step}", opts)
        known = self._known(tier, m)
        groups = _byte_groups(m)
        owners = None
        if opts.dedup_replicated and tier.shared and self.control.distributed:
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
            written.append(self.pool.submit(self._put_chunk, tier, src, view, group))
            futures.append(written[-1])
        if owners is not None:
            self._dedup(tier, m, slot, seq, owners, futures, written, deferred, groups)
        out = m.with_chunks(_wait_all(futures))
        mkey = manifest_key(m.step, m.rank, m.world_size)
        mdata = encode_manifest(out)
        retry(lambda: be.put(mkey, mdata), f"put {mkey}", opts)
        # Later saves reuse the chunks of this rank's own newest manifest: retention never
        # deletes it before a newer manifest of this rank exists (see collect_chunks).
        self._known_chunks[tier.name] = {c.checksum: c for c in out.chunks}
        if not (tier.shared and self.control.distributed):
            scope = "rank" if m.world_size > 1 else "job"
            record = CommitRecord(m.step, m.world_size, now(), ((mkey, len(mdata), checksum(mdata)),), scope)
            cdata = encode_commit(record)
            retry(lambda: be.put(commit_key(m.step), cdata), f"commit step {m.step}", opts)
        return sum(f.result().stored_nbytes for f in written)

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
        base = f"dedup/{tier.name}/{m.step}/{seq}/"
        mine = {i: futures[i].result() for i in range(len(m.chunks)) if owners[i] == ctl.rank}
        ctl.publish(
            base + f"r{ctl.rank}",
            json.dumps({str(i): [c.checksum, c.key, c.stored_nbytes, c.codec] for i, c in mine.items()}),
        )
        blobs: dict[int, dict[str, Any] | None] = {}
        for i in deferred:
            o, src = owners[i], m.chunks[i]
            if o not in blobs:
                try:
                    blobs[o] = json.loads(ctl.await_outcome(base + f"r{o}"))
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
            fut = self.pool.submit(self._put_chunk, tier, src, view, groups[i])
            written.append(fut)
            fut.add_done_callback(lambda f, i=i: _chain(f, futures[i]))  # type: ignore[misc]

    def _put_chunk(self, tier: Tier, c: ChunkEntry, view: memoryview, group: int) -> ChunkEntry:
        """I/O pool: encode one chunk for ``tier`` (if it compresses) and put it at its content
        address.  At most ``io_threads`` encoded buffers exist at once: memory stays bounded."""
        codec, stored = encode(view, group, tier.compression)
        key = chunk_key(c.checksum, codec)
        retry(lambda: tier.backend.put(key, stored), f"put {key}", self.opts)
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


def _chain(src: Future[T], dst: Future[T]) -> None:
    exc = src.exception()
    if exc is not None:
        dst.set_exception(exc)
    else:
        dst.set_result(src.result())


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
