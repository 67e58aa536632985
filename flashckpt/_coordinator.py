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
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Executor
from dataclasses import dataclass
from typing import TYPE_CHECKING

import xxhash

from flashckpt import _hooks as hooks
from flashckpt._codec import decode
from flashckpt._config import Options
from flashckpt._retry import retry
from flashckpt.backends import Backend
from flashckpt.backends._base import check_key
from flashckpt.errors import CorruptCheckpointError, ObjectNotFound, StateMismatchError
from flashckpt.format import (
    CHUNKS_PREFIX,
    CODEC_RAW,
    UNSEALED,
    ChunkEntry,
    Manifest,
    checksum,
    commit_key,
    decode_commit,
    decode_manifest,
    manifest_key,
    memory_manifest_key,
    parse_memory_manifest_key,
    step_prefix,
)

if TYPE_CHECKING:
    from flashckpt._transfer import Tier

log = logging.getLogger(__name__)

_COMMIT_NAME = re.compile(r"^step-(\d{12})$")
_STEP_DIR = re.compile(r"^(\d{12})/$")
_PIECE = 1 << 20  # checksum-and-copy granularity: stays in cache between the two


def committed_steps(be: Backend, opts: Options) -> list[int]:
    """Steps with a commit record on ``be``, oldest first."""
    names = retry(lambda: be.children("commits/"), f"list commits on {be.url}", opts)
    return sorted(int(m.group(1)) for n in names if (m := _COMMIT_NAME.match(n)))


def memory_steps(be: Backend) -> list[int]:
    """Steps with a manifest in a memory-tier rank directory, oldest first."""
    return sorted(s for n in be.children("") if (s := parse_memory_manifest_key(n)) is not None)


def read_committed_manifest(be: Backend, step: int, rank: int, world: int, opts: Options) -> Manifest:
    """The manifest of shard ``rank``/``world`` of committed ``step`` on ``be``, validated
    against the commit record (size and checksum)."""
    what = f"step {step} on {be.url}"
    raw = retry(lambda: be.get(commit_key(step)), f"get commit of {what}", opts)
    record = decode_commit(raw, f"commit record of {what}", check_key=check_key)
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
    mraw = retry(lambda: be.get(want), f"get {want}", opts)
    if len(mraw) != entry[1] or checksum(mraw) != entry[2]:
        raise CorruptCheckpointError(f"manifest {want} on {be.url} does not match its commit record")
    m = decode_manifest(mraw, f"manifest {want}", check_key=check_key)
    if (m.step, m.rank, m.world_size) != (step, rank, world):
        raise CorruptCheckpointError(f"manifest {want} describes another shard")
    return m


def read_memory_manifest(be: Backend, step: int) -> Manifest:
    key = memory_manifest_key(step)
    m = decode_manifest(be.get(key), f"memory manifest {key}", check_key=check_key, allow_unsealed=True)
    if m.step != step:
        raise CorruptCheckpointError(f"memory manifest {key} describes step {m.step}")
    return m


def fetch_chunks(
    be: Backend,
    m: Manifest,
    dest: Callable[[int, int], memoryview],
    pool: Executor,
    opts: Options,
) -> None:
    """Read every chunk of ``m`` from ``be`` into ``dest(offset, nbytes)`` and verify it."""

    def one(i: int) -> None:
        c = m.chunks[i]
        view = dest(c.offset, c.nbytes)
        # raw chunks land in place; encoded ones go through a buffer of their stored size
        into = view if c.codec == CODEC_RAW else memoryview(bytearray(c.stored_nbytes))
        n = retry(lambda: be.get_into(c.key, into, offset=c.at), f"get {c.key}", opts)
        if n != c.stored_nbytes:
            raise CorruptCheckpointError(
                f"chunk {c.key} on {be.url} is truncated ({n} of {c.stored_nbytes} bytes)"
            )
        if c.codec != CODEC_RAW:
            decode(c.codec, into, view)
        if checksum(view) != c.checksum:
            raise CorruptCheckpointError(f"chunk {c.key} on {be.url} fails its checksum")

    for f in [pool.submit(one, i) for i in range(len(m.chunks))]:
        f.result()


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
    destinations hold a mix of bytes: the caller must treat them as overwritten.
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

    return m.with_chunks(list(pool.map(one, m.chunks)))


@dataclass(frozen=True)
class Source:
    step: int
    tier: Tier


def plan_sources(inventory: Sequence[tuple[Tier, Sequence[int]]], step: int | None) -> list[Source]:
    """Every (step, tier) to try, newest step first and cheapest tier first within a step.

    ``inventory`` lists tiers from cheapest to dearest with the steps each holds.
    """
    steps = sorted({s for _, held in inventory for s in held}, reverse=True)
    if step is not None:
        steps = [s for s in steps if s == step]
    return [Source(s, tier) for s in steps for tier, held in inventory if s in held]


def apply_retention(
    be: Backend, keep: int, opts: Options, *, gc_candidates: dict[str, tuple[int, float]] | None = None
) -> list[int]:
    """Keep the newest ``keep`` committed steps on ``be``; delete older ones and torn leftovers.

    A step is un-committed (record deleted) before its data, so a crash midway leaves an
    uncommitted directory, never a committed step with missing chunks.  Uncommitted steps
    newer than the newest commit are left alone: a save may be writing them.  Returns the
    deleted steps.  ``gc_candidates`` (a tier every rank of a job writes to): see
    :func:`collect_chunks`.
    """
    steps = committed_steps(be, opts)
    if not steps:
        return []
    doomed = steps[:-keep] if keep > 0 else []
    kept = set(steps[-keep:])
    for s in doomed:
        hooks.fire("retention.delete", step=s, tier=be.url)
        retry(lambda s=s: be.delete(commit_key(s)), f"delete commit of step {s}", opts)  # type: ignore[misc]
    names = retry(lambda: be.children("steps/"), f"list steps on {be.url}", opts)
    newest = steps[-1]
    removed = []
    for name in names:
        m = _STEP_DIR.match(name)
        if not m:
            continue
        s = int(m.group(1))
        if s in kept or s > newest:
            continue
        try:
            retry(lambda s=s: be.delete_prefix(step_prefix(s)), f"delete step {s}", opts)  # type: ignore[misc]
        except ObjectNotFound:
            pass
        removed.append(s)
    if gc_candidates is not None:
        collect_chunks(be, sorted(kept), opts, candidates=gc_candidates)
    elif doomed or removed:
        collect_chunks(be, sorted(kept), opts)
    return removed


def collect_chunks(
    be: Backend,
    kept: Sequence[int],
    opts: Options,
    *,
    candidates: dict[str, tuple[int, float]] | None = None,
) -> int:
    """Delete chunk objects that no manifest references; return how many.

    One process (``candidates`` is None): the manifests of the kept steps count.  Safe against
    this process's saves: the persist thread runs it between jobs, and a save only reuses
    chunks of its own newest manifest, which is kept.

    A tier shared by the ranks of a job (rank 0 runs this after each commit): every manifest
    present counts, committed or in flight; and another rank may have written a chunk for a
    manifest it has not written yet.  So a chunk is deleted only if it was already
    unreferenced at a pass made at an older commit (``candidates`` maps it to the newest
    committed step and the time when it was first seen so), and at least ``opts.gc_grace_s``
    ago.  That suffices because a rank writes the chunks of step S+1 only after it has seen
    step S committed (or failed): by the next commit after a chunk was written, the manifest
    that references it exists.  A rank reuses chunks of its own newest manifest only, and
    that manifest's step is retired only after a newer step is committed, which needs the
    rank's next manifest, written first.
    """
    referenced: set[str] = set()

    def get(key: str) -> bytes:
        return retry(lambda: be.get(key), f"get {key}", opts)

    keys: list[str] = []
    if candidates is None:
        for s in kept:
            record = decode_commit(get(commit_key(s)), check_key=check_key)
            keys.extend(key for key, _size, _digest in record.manifests)
    else:
        # listed before the chunks: a manifest written after this never references a chunk
        # that the listing below misses as new
        listed = retry(lambda: be.list("steps/"), f"list steps on {be.url}", opts)
        keys = [k for k in listed if k.endswith(".manifest")]
    for key in keys:
        try:
            m = decode_manifest(get(key), key, check_key=check_key)
        except (ObjectNotFound, CorruptCheckpointError) as exc:
            if candidates is None:
                raise
            log.debug("collect_chunks: skipping %s: %s", key, exc)  # being retired or torn
            continue
        referenced.update(c.key for c in m.chunks)
    deleted = 0
    t_now = time.monotonic()
    newest = max(kept, default=-1)
    chunks = retry(lambda: be.list(CHUNKS_PREFIX), f"list chunks on {be.url}", opts)
    present = set(chunks)
    if candidates is not None:
        for key in list(candidates):
            if key in referenced or key not in present:
                del candidates[key]
    for key in chunks:
        if key in referenced:
            continue
        if candidates is not None:
            seen_at, first = candidates.setdefault(key, (newest, t_now))
            if seen_at >= newest or t_now - first < opts.gc_grace_s:
                continue
            del candidates[key]
        retry(lambda k=key: be.delete(k), f"delete {key}", opts)  # type: ignore[misc]
        deleted += 1
    return deleted
