"""The inventory: which snapshots each tier holds, validated, and where to read one from.

Every function reads storage through retries and validates what it reads; a bad record
raises :class:`~flashckpt.errors.CorruptCheckpointError`.  Any thread may call them (the
training thread plans restores with them, the persist thread reads a tier's commits).
"""

from __future__ import annotations

import logging
from collections.abc import Collection, Sequence
from dataclasses import dataclass

from flashckpt._config import Options
from flashckpt.errors import CoordinationError, CorruptCheckpointError, ObjectNotFound, StateMismatchError
from flashckpt.format import (
    RUN_KEY,
    CommitRecord,
    Manifest,
    checksum,
    commit_key,
    decode_commit,
    decode_manifest,
    decode_run,
    encode_run,
    manifest_key,
    parse_commit_key,
)
from flashckpt.storage import Backend
from flashckpt.transfer.reader import read_record
from flashckpt.transfer.store import retrying
from flashckpt.transfer.tier import Tier

log = logging.getLogger(__name__)

#: A snapshot's place on the run's timeline: ``(generation, step)`` (docs/format.md).
Order = tuple[int, int]
#: Where a timeline branched off older generations, nearest first: ``(generation, step)``.
Ancestors = tuple[tuple[int, int], ...]


def committed_steps(be: Backend, opts: Options) -> list[int]:
    """Step numbers with a commit record on ``be``, lowest first (names only: nothing is read).
    Names that are not commit keys (a foreign file) are skipped."""
    names = retrying(be, opts).children("commits/")
    return sorted(s for n in names if (s := parse_commit_key(f"commits/{n}")) is not None)


def read_commit(be: Backend, step: int, opts: Options) -> CommitRecord:
    """The commit record of ``step`` on ``be``, validated (size bound, checksum, fields) and
    checked to name that step.  The one reader of commit records: every place that reads
    one by step calls it.  Raises ``ObjectNotFound`` when there is none."""
    what = f"commit record of step {step} on {be.url}"
    record = decode_commit(read_record(be, commit_key(step), what, opts), what)
    if record.step != step:
        raise CorruptCheckpointError(f"{what} names step {record.step}")
    return record


def read_commits(be: Backend, opts: Options) -> list[CommitRecord]:
    """The commit records on ``be``, oldest first in ``(generation, step)`` order: the order
    in which "latest", retention and the commit protocol see steps (docs/format.md).

    A record that fails validation is skipped with a warning (its step is unusable, and is
    never deleted by retention either).  A tier that cannot be read raises ``StorageError``.
    """
    out = []
    for step in committed_steps(be, opts):
        try:
            record = read_commit(be, step, opts)
        except ObjectNotFound:
            continue  # retired meanwhile
        except CorruptCheckpointError as exc:
            log.warning("flashckpt: skipping step %d: %s", step, exc)
            continue
        out.append(record)
    return sorted(out, key=lambda r: r.order)


def read_committed_manifest(be: Backend, step: int, rank: int, world: int, opts: Options) -> Manifest:
    """The manifest of shard ``rank``/``world`` of committed ``step`` on ``be``, validated
    against the commit record (size and checksum)."""
    what = f"step {step} on {be.url}"
    record = read_commit(be, step, opts)
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


@dataclass(frozen=True)
class Source:
    step: int
    tier: Tier
    generation: int = 0


def plan_sources(inventory: Sequence[tuple[Tier, Collection[Order]]], want: Order) -> list[Source]:
    """The tiers to try for snapshot ``want``, cheapest first (``inventory`` lists tiers
    from cheapest to dearest with the snapshots each holds)."""
    return [Source(want[1], tier, want[0]) for tier, held in inventory if want in held]
