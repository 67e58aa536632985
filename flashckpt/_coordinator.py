"""Coordinator: what each tier holds, which step to restore from where, and retention.

Single-process view: the inventory of this rank's tiers.  (The job-wide inventory across
ranks builds on the same functions.)  Every function here reads storage through retries and
validates what it reads; a bad record raises :class:`CorruptCheckpointError`.  Callable from
any thread; the persist thread calls :func:`apply_retention`.
"""

from __future__ import annotations

import bisect
import ctypes
import dataclasses
import logging
import re
from collections.abc import Callable, Collection, Sequence
from concurrent.futures import Executor
from dataclasses import dataclass
from typing import TYPE_CHECKING

import xxhash

from flashckpt import _hooks as hooks
from flashckpt._config import Options
from flashckpt.errors import CoordinationError, CorruptCheckpointError, ObjectNotFound, StateMismatchError
from flashckpt.format import (
    CHUNKS_PREFIX,
    CODEC_RAW,
    MAX_RECORD_BYTES,
    RUN_KEY,
    UNSEALED,
    ChunkEntry,
    CommitRecord,
    Manifest,
    checksum,
    commit_key,
    decode_commit,
    decode_manifest,
    decode_run,
    encode_run,
    manifest_key,
    memory_manifest_key,
    parse_chunk_key,
    parse_memory_manifest_key,
    step_prefix,
)
from flashckpt.storage import Backend
from flashckpt.transfer.codec import decode
from flashckpt.transfer.futures import run_all
from flashckpt.transfer.store import retrying

if TYPE_CHECKING:
    from flashckpt._transfer import Tier

log = logging.getLogger(__name__)

_COMMIT_NAME = re.compile(r"^step-(\d{12})$")
_STEP_DIR = re.compile(r"^(\d{12})/$")
_PIECE = 1 << 20  # checksum-and-copy granularity: stays in cache between the two


def committed_steps(be: Backend, opts: Options) -> list[int]:
    """Step numbers with a commit record on ``be``, lowest first (names only: nothing is read).
    Names that are not commit keys (a foreign file) are skipped."""
    names = retrying(be, opts).children("commits/")
    return sorted(int(m.group(1)) for n in names if (m := _COMMIT_NAME.match(n)))


def read_record(be: Backend, key: str, what: str, opts: Options) -> bytes:
    """A record (manifest or commit record), read with a length limit: an object larger than
    any record is refused without being read whole."""
    # The size first: an object store backend reads a ranged GET into a buffer of the length
    # asked for, so the bound passed to ``get`` must be the object's size, not the limit.
    size = retrying(be, opts).head(key)
    if size > MAX_RECORD_BYTES:
        raise CorruptCheckpointError(f"{what}: {size} bytes, larger than any record ({MAX_RECORD_BYTES})")
    return retrying(be, opts).get(key, length=size)  # (replaced meanwhile: the
    # record's trailer does not match)


def read_commits(be: Backend, opts: Options) -> list[CommitRecord]:
    """The commit records on ``be``, oldest first in ``(generation, step)`` order: the order
    in which "latest", retention and the commit protocol see steps (docs/format.md).

    A record that fails validation is skipped with a warning (its step is unusable, and is
    never deleted by retention either).  A tier that cannot be read raises ``StorageError``.
    """
    out = []
    for step in committed_steps(be, opts):
        what = f"commit record of step {step} on {be.url}"
        try:
            record = decode_commit(read_record(be, commit_key(step), what, opts), what)
            if record.step != step:
                raise CorruptCheckpointError(f"{what} names step {record.step}")
        except ObjectNotFound:
            continue  # retired meanwhile
        except CorruptCheckpointError as exc:
            log.warning("flashckpt: skipping step %d: %s", step, exc)
            continue
        out.append(record)
    return sorted(out, key=lambda r: r.order)


def memory_steps(be: Backend) -> list[int]:
    """Steps with a manifest in a memory-tier rank directory, oldest first."""
    return sorted(s for n in be.children("") if (s := parse_memory_manifest_key(n)) is not None)


def read_committed_manifest(be: Backend, step: int, rank: int, world: int, opts: Options) -> Manifest:
    """The manifest of shard ``rank``/``world`` of committed ``step`` on ``be``, validated
    against the commit record (size and checksum)."""
    what = f"step {step} on {be.url}"
    raw = read_record(be, commit_key(step), f"commit record of {what}", opts)
    record = decode_commit(raw, f"commit record of {what}")
    if record.step != step:
        raise CorruptCheckpointError(f"commit record of {what} names step {record.step}")
    if record.world_size != world:
        raise StateMismatchError(
            f"{what} was saved by {record.world_size} ranks; this job has {world} (a job restores "
            "the world size that saved it; DTensor state can be resharded, see docs/architecture.md)"
        )
    want = manifest_key(step, rank, world)
    entry = next((m for m in record.manifests if m[0] == want), None)
    if entry is None:
        raise CorruptCheckpointError(f"commit record of {what} has no shard {want}")
    mraw = read_record(be, want, f"manifest {want}", opts)
    if len(mraw) != entry[1] or checksum(mraw) != entry[2]:
        raise CorruptCheckpointError(f"manifest {want} on {be.url} does not match its commit record")
    m = decode_manifest(mraw, f"manifest {want}")
    if (m.step, m.rank, m.world_size) != (step, rank, world):
        raise CorruptCheckpointError(f"manifest {want} describes another shard")
    if m.generation != record.generation:
        raise CorruptCheckpointError(f"manifest {want} belongs to another generation than its commit")
    return m


def read_run(be: Backend, opts: Options) -> str | None:
    """The run id the tier's run record names, or None when there is none."""
    what = f"run record on {be.url}"
    try:
        return decode_run(read_record(be, RUN_KEY, what, opts), what)
    except ObjectNotFound:
        return None


def claim_run(be: Backend, run: str, opts: Options) -> None:
    """Before a tier's first commit by this process: write its run record, unless it holds one
    already.  Raises :class:`CoordinationError` if it names another run (two runs writing one
    storage tier)."""
    have = read_run(be, opts)
    if have is None:
        exclusive = be.capabilities.exclusive_create
        try:
            retrying(be, opts).put(RUN_KEY, encode_run(run), exclusive=exclusive)
        except FileExistsError:
            have = read_run(be, opts)
    if have is not None and have != run:
        raise CoordinationError(
            f"the storage tier {be.url} belongs to run {have}, this Checkpointer to run {run}: "
            "two runs write to one storage tier"
        )


def read_memory_manifest(be: Backend, step: int) -> Manifest:
    key = memory_manifest_key(step)
    m = decode_manifest(be.get(key), f"memory manifest {key}", allow_unsealed=True)
    if m.step != step:
        raise CorruptCheckpointError(f"memory manifest {key} describes step {m.step}")
    return m


@hooks.timed("time.restore.fetch")
def fetch_chunks(
    be: Backend,
    m: Manifest,
    dest: Callable[[int, int], memoryview],
    pool: Executor,
    opts: Options,
) -> None:
    """Read every chunk of ``m`` from ``be`` into ``dest(offset, nbytes)`` and verify it.
    Returns, or raises the first failure, only once no read is still writing into ``dest``."""
    store = retrying(be, opts)

    def one(i: int) -> None:
        c = m.chunks[i]
        view = dest(c.offset, c.nbytes)
        # raw chunks land in place; encoded ones go through a buffer of their stored size
        into = view if c.codec == CODEC_RAW else memoryview(bytearray(c.stored_nbytes))
        n = store.get_into(c.key, into, offset=c.at)
        if n != c.stored_nbytes:
            raise CorruptCheckpointError(
                f"chunk {c.key} on {be.url} is truncated ({n} of {c.stored_nbytes} bytes)"
            )
        if c.codec != CODEC_RAW:
            decode(c.codec, into, view)
        if checksum(view) != c.checksum:
            raise CorruptCheckpointError(f"chunk {c.key} on {be.url} fails its checksum")

    run_all(pool, one, range(len(m.chunks)))  # never returns with a read still writing


@hooks.timed("time.restore.verify")
def verify_chunks(
    m: Manifest,
    view: Callable[[int, int], memoryview],
    pool: Executor,
    where: str,
    *,
    base: int = 0,
    fills: Sequence[tuple[int, int, int]] = (),
) -> Manifest:
    """Verify chunks that are already in memory (the memory tier); return the manifest with
    every checksum filled in (unsealed chunks are checksummed, not verified).

    ``fills`` (sorted ``(start, end, dst_address)`` byte ranges of the shard, memory at
    ``base``) are copied out while each chunk is checksummed, piece by cache-sized piece, so
    the bytes are read from memory once instead of twice.  If a chunk then fails, those
    destinations hold a mix of bytes: the caller must treat them as overwritten (no copy is
    still running by the time this raises).
    """
    starts = [f[0] for f in fills]

    def one(c: ChunkEntry) -> ChunkEntry:
        if not fills:
            digest = checksum(view(c.at, c.stored_nbytes))
        else:
            h = xxhash.xxh3_128()
            end = c.at + c.stored_nbytes
            j = max(0, bisect.bisect_right(starts, c.at) - 1)
            for p in range(c.at, end, _PIECE):
                q = min(p + _PIECE, end)
                h.update(view(p, q - p))
                while j < len(fills) and fills[j][1] <= p:
                    j += 1
                k = j
                while k < len(fills) and fills[k][0] < q:
                    lo, hi = max(p, fills[k][0]), min(q, fills[k][1])
                    if lo < hi:
                        ctypes.memmove(fills[k][2] + (lo - fills[k][0]), base + lo, hi - lo)
                    k += 1
            digest = h.hexdigest()
        if c.checksum == UNSEALED:
            return dataclasses.replace(c, checksum=digest)
        if digest != c.checksum:
            raise CorruptCheckpointError(f"chunk at {c.at} of {c.key} in {where} fails its checksum")
        return c

    return m.with_chunks(run_all(pool, one, m.chunks))  # no copy still running once it raises


#: A snapshot's place on the run's timeline: ``(generation, step)`` (docs/format.md).
Order = tuple[int, int]


@dataclass(frozen=True)
class Source:
    step: int
    tier: Tier
    generation: int = 0


Ancestors = tuple[tuple[int, int], ...]


def abandoned(snapshots: Sequence[tuple[Order, Ancestors]]) -> set[Order]:
    """The snapshots that lie on a timeline the run has left.

    The newest snapshot (in ``(generation, step)`` order) is on the run's current timeline,
    and its ancestors say where that timeline branched off older generations, nearest first:
    ``(g, s)``, the run continued from step ``s`` of generation ``g``.  Going back along them,
    the timeline holds nothing above the lowest branch step seen so far: a snapshot of an
    ancestor generation above that bound was left behind; so was every snapshot of a
    generation between the newest and its oldest known ancestor that is not an ancestor
    itself (a branch the run left).  Older generations (their records retired, or the
    ancestry cut at :data:`~flashckpt.format.MAX_ANCESTORS`) are on the timeline up to the
    lowest branch step; with no ancestry at all (a run that never restored), none is
    abandoned.
    """
    if not snapshots:
        return set()
    newest, ancestors = max(snapshots, key=lambda x: x[0])
    kept: dict[int, int] = {}  # generation -> the highest step of it on the timeline
    bound: int | None = None  # the lowest branch step so far, going back
    for g, s in ancestors:
        bound = s if bound is None else min(bound, s)
        kept[g] = min(kept.get(g, bound), bound)
    floor = min(kept, default=newest[0])
    out = set()
    for (g, s), _ in snapshots:
        if g == newest[0]:
            continue
        if g in kept:
            left = s > kept[g]
        elif g > floor:
            left = True  # a branch between the newest and its oldest known ancestor
        else:
            left = bound is not None and s > bound
        if left:
            out.add((g, s))
    return out


def plan_sources(inventory: Sequence[tuple[Tier, Collection[Order]]], want: Order) -> list[Source]:
    """The tiers to try for snapshot ``want``, cheapest first (``inventory`` lists tiers
    from cheapest to dearest with the snapshots each holds)."""
    return [Source(want[1], tier, want[0]) for tier, held in inventory if want in held]


@hooks.timed("time.persist.retention")
def apply_retention(
    be: Backend,
    keep: int,
    opts: Options,
    *,
    protect: Sequence[int] = (),
    collect: bool = True,
) -> list[int]:
    """Keep the newest ``keep`` committed steps on ``be`` in ``(generation, step)`` order, and
    the steps in ``protect`` (just committed, just restored: even on a timeline the run had
    left, see :func:`abandoned`); retire the others and delete
    step directories nothing needs.  Returns the step numbers whose directories were deleted.

    A step is un-committed (record deleted) before its data, so a crash midway leaves an
    uncommitted directory, never a committed step with missing chunks.  A step directory is
    deleted only if no kept step has its number and every manifest in it is older than the
    newest commit: a save in flight (this job's next step, a re-save of a step number, a
    rank ahead of this one) writes manifests of the newest generation, newer than any commit,
    and they are never touched.  Directories of abandoned steps (a rollback) go once the run
    passes them.  Records that fail validation, and names that are not flashckpt keys, are
    skipped, never deleted.  ``collect``: delete the chunks no kept step references (a tier
    every rank of a job writes to is collected in its commit window instead, see
    :func:`collect_chunks`).
    """
    records = read_commits(be, opts)
    if not records:
        return []
    newest = records[-1].order
    # A protected step is kept whichever timeline its record is on: a step just restored from
    # a timeline the run had left is the run's again, but only its next save records that.
    # Kept besides the newest ``keep`` of the timeline, never in place of one of them.
    off = abandoned([(r.order, r.ancestors) for r in records])
    left = {o for o in off if o[1] not in protect}
    for r in records:
        if r.order in left:
            log.warning(
                "flashckpt: retiring step %d on %s: the run continued from an older step (timeline "
                "generation %d), so this step is no longer part of it",
                r.step,
                be.url,
                r.generation,
            )
    current = [r for r in records if r.order not in off]
    kept_records = current[-keep:] + [r for r in current[:-keep] if r.step in protect]
    kept_records += [r for r in records if r.order in off and r.order not in left]
    kept = {r.step for r in kept_records}
    store = retrying(be, opts)
    for r in records:
        if r.step not in kept:
            hooks.fire("retention.delete", step=r.step, tier=be.url)
            store.delete(commit_key(r.step))
    names = store.children("steps/")
    removed = []
    for name in names:
        m = _STEP_DIR.match(name)
        if not m:
            continue
        s = int(m.group(1))
        if s in kept or s in protect or not _older_than(be, s, newest, opts):
            continue
        _delete_manifests(be, s, opts)
        removed.append(s)
    if collect and (removed or len(kept_records) < len(records)):
        collect_chunks(be, kept_records, opts)
    return removed


_MANIFEST_NAME = re.compile(r"r\d{5}-of-\d{5}\.manifest")


def _delete_manifests(be: Backend, step: int, opts: Options) -> None:
    """Delete the manifests of ``step`` (its directory goes once empty); a name that is not
    a manifest key is not flashckpt's and stays."""
    store = retrying(be, opts)
    for key in store.list(step_prefix(step)):
        if _MANIFEST_NAME.fullmatch(key[len(step_prefix(step)) :]):
            store.delete(key)


def _older_than(be: Backend, step: int, newest: Order, opts: Options) -> bool:
    """True if every manifest in step ``step``'s directory is older than ``newest`` (an
    unreadable one counts as newer: it is left alone)."""
    for key in retrying(be, opts).list(step_prefix(step)):
        if not key.endswith(".manifest"):
            continue
        try:
            m = decode_manifest(read_record(be, key, key, opts), key)
        except ObjectNotFound:
            continue
        except CorruptCheckpointError:
            return False
        if m.order >= newest:
            return False
    return True


def collect_chunks(
    be: Backend,
    kept: Sequence[CommitRecord],
    opts: Options,
    *,
    every_manifest: bool = False,
) -> int:
    """Delete chunk objects that no manifest references; return how many.

    Names under ``chunks/`` that are not chunk keys are skipped, never deleted.

    One process (``every_manifest`` False): the manifests of the kept steps count.  Safe
    against this process's saves: the persist thread runs it between jobs, and a save only
    reuses chunks of its own newest manifest, which is kept.

    A tier shared by the ranks of a job (``every_manifest``): every manifest present counts,
    committed or not, and it runs only in a commit window: after the last rank's manifest
    of a save every rank makes arrived and the commit record is written, before the outcome
    is published.  Then no rank writes chunks: each has written its shard of this step and
    waits for the outcome, and writes the next step's only after it (a rank that gave up
    waiting writes no more to the tier until that outcome is known, see
    ``Persister._check_stalled``).  A pass while ranks write cannot be made safe by rules
    about passes: a restarted run that replays its steps writes again, under the same
    content address, chunks a killed attempt left unreferenced, just as a pass deletes them.
    """
    referenced: set[str] = set()
    keys: list[str] = []
    if not every_manifest:
        for record in kept:
            keys.extend(key for key, _size, _digest in record.manifests)
    else:
        listed = retrying(be, opts).list("steps/")
        keys = [k for k in listed if k.endswith(".manifest")]
    for key in keys:
        try:
            m = decode_manifest(read_record(be, key, key, opts), key)
        except (ObjectNotFound, CorruptCheckpointError) as exc:
            if not every_manifest:
                raise
            log.debug("collect_chunks: skipping %s: %s", key, exc)  # torn or not flashckpt's
            continue
        referenced.update(c.key for c in m.chunks)
    deleted = 0
    store = retrying(be, opts)
    for key in store.list(CHUNKS_PREFIX):
        if parse_chunk_key(key) is None or key in referenced:  # a foreign file is no chunk
            continue
        store.delete(key)
        deleted += 1
    return deleted
