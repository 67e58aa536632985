"""Retention: which committed steps a tier keeps, and deleting the rest safely.

A step is un-committed before its data is deleted; a record that fails validation and a
name that is not a flashckpt key are never deleted.  The persist thread calls
:func:`apply_retention` after a commit (rank 0 for a tier every rank writes) and
:func:`collect_chunks` in a shared tier's commit window; nothing else deletes steps.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Collection, Sequence
from dataclasses import dataclass

from flashckpt import _hooks as hooks
from flashckpt._config import Options
from flashckpt.backends import LocalBackend
from flashckpt.coordination.inventory import Ancestors, Order, read_commits
from flashckpt.errors import CorruptCheckpointError, ObjectNotFound
from flashckpt.format import (
    CHUNKS_PREFIX,
    CommitRecord,
    commit_key,
    decode_manifest,
    parse_chunk_key,
    parse_manifest_key,
    parse_step_prefix,
    step_prefix,
)
from flashckpt.storage import Backend
from flashckpt.transfer.reader import read_record
from flashckpt.transfer.store import retrying
from flashckpt.transfer.tier import Tier

log = logging.getLogger(__name__)


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


@dataclass(frozen=True)
class RetentionPlan:
    """What a retention pass deletes, decided before anything is: the commit records it
    retires (those of ``left``: on a timeline the run has left), the step directories it
    deletes, and the records it keeps."""

    retire: list[CommitRecord]
    left: list[CommitRecord]
    dirs: list[int]
    kept: list[CommitRecord]


def plan_retention(be: Backend, keep: int, opts: Options, *, protect: Sequence[int] = ()) -> RetentionPlan:
    """The rules of :func:`apply_retention`, applied to what ``be`` holds now; nothing is
    deleted (``flashckpt gc --dry-run`` reports this plan, :func:`apply_retention` carries
    it out)."""
    records = read_commits(be, opts)
    if not records:
        return RetentionPlan([], [], [], [])
    newest = records[-1].order
    # A protected step is kept whichever timeline its record is on: a step just restored from
    # a timeline the run had left is the run's again, but only its next save records that.
    # Kept besides the newest ``keep`` of the timeline, never in place of one of them.
    off = abandoned([(r.order, r.ancestors) for r in records])
    left = {o for o in off if o[1] not in protect}
    current = [r for r in records if r.order not in off]
    kept_records = current[-keep:] + [r for r in current[:-keep] if r.step in protect]
    kept_records += [r for r in records if r.order in off and r.order not in left]
    kept = {r.step for r in kept_records}
    dirs = []
    for name in retrying(be, opts).children("steps/"):
        s = parse_step_prefix(f"steps/{name}")
        if s is None or s in kept or s in protect or not _older_than(be, s, newest, opts):
            continue
        dirs.append(s)
    retire = [r for r in records if r.step not in kept]
    return RetentionPlan(retire, [r for r in retire if r.order in left], dirs, kept_records)


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
    plan = plan_retention(be, keep, opts, protect=protect)
    for r in plan.left:
        log.warning(
            "flashckpt: retiring step %d on %s: the run continued from an older step (timeline "
            "generation %d), so this step is no longer part of it",
            r.step,
            be.url,
            r.generation,
        )
    store = retrying(be, opts)
    for r in plan.retire:
        hooks.fire("retention.delete", step=r.step, tier=be.url)
        store.delete(commit_key(r.step))
    for s in plan.dirs:
        delete_manifests(be, s, opts)
    if collect and (plan.dirs or plan.retire):
        collect_chunks(be, plan.kept, opts)
    return plan.dirs


def delete_manifests(be: Backend, step: int, opts: Options) -> None:
    """Delete the manifests of ``step`` (its directory goes once empty); a name that is not
    a manifest key is not flashckpt's and stays."""
    store = retrying(be, opts)
    for key in store.list(step_prefix(step)):
        if (parsed := parse_manifest_key(key)) is not None and parsed[0] == step:
            store.delete(key)


def _older_than(be: Backend, step: int, newest: Order, opts: Options) -> bool:
    """True if every manifest in step ``step``'s directory is older than ``newest`` (an
    unreadable one counts as newer: it is left alone)."""
    for key in retrying(be, opts).list(step_prefix(step)):
        if parse_manifest_key(key) is None:
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
    ``CommitProtocol.check_stalled``).  A pass while ranks write cannot be made safe by rules
    about passes: a restarted run that replays its steps writes again, under the same
    content address, chunks a killed attempt left unreferenced, just as a pass deletes them.
    """
    store = retrying(be, opts)
    doomed = unreferenced_chunks(be, kept, opts, every_manifest=every_manifest)
    for key in doomed:
        store.delete(key)
    return len(doomed)


def unreferenced_chunks(
    be: Backend,
    kept: Sequence[CommitRecord],
    opts: Options,
    *,
    every_manifest: bool = False,
    without: Collection[int] = (),
    strict: bool = False,
) -> list[str]:
    """The chunk keys on ``be`` that no manifest references, as :func:`collect_chunks` counts
    them (``kept``, ``every_manifest``: see there); ``without``: with ``every_manifest``, the
    manifests of these steps do not count (their directories are about to go).  Names under
    ``chunks/`` that are not chunk keys are never listed.  ``strict``: a manifest that fails
    validation raises (its chunks might be a step's only copy) instead of being skipped."""
    referenced: set[str] = set()
    keys: list[str] = []
    if not every_manifest:
        for record in kept:
            keys.extend(key for key, _size, _digest in record.manifests)
    else:
        listed = retrying(be, opts).list("steps/")
        keys = [k for k in listed if (p := parse_manifest_key(k)) is not None and p[0] not in without]
    for key in keys:
        try:
            m = decode_manifest(read_record(be, key, key, opts), key)
        except (ObjectNotFound, CorruptCheckpointError) as exc:
            if not every_manifest or (strict and not isinstance(exc, ObjectNotFound)):
                raise
            log.debug("collect_chunks: skipping %s: %s", key, exc)  # torn or not flashckpt's
            continue
        referenced.update(c.key for c in m.chunks)
    # a foreign file is no chunk
    return [
        k
        for k in retrying(be, opts).list(CHUNKS_PREFIX)
        if parse_chunk_key(k) is not None and k not in referenced
    ]


def start_sweep(tiers: Sequence[Tier], rank: int, opts: Options) -> threading.Thread:
    """Training thread, first ``restore``: remove, on a ``flashckpt-sweep`` thread, the
    temporary files that killed writers left in the POSIX tiers (this rank's local tier; the
    shared tier on rank 0 only: one walk per job).  Those of a dead process of this host go
    at once, any other after ``max(gc_grace_s, 60 s)``: see ``LocalBackend.sweep_temps``.
    Returns the thread (started; whoever started it joins it)."""
    mine = [t for t in tiers if not t.shared or rank == 0]
    backends = [t.backend for t in mine if isinstance(t.backend, LocalBackend)]
    max_age = max(opts.gc_grace_s, 60.0)

    def sweep() -> None:
        for be in backends:
            try:
                n = be.sweep_temps(max_age)
            except Exception as exc:  # never a silent death: logged, and the next one goes on  # noqa: BLE001
                log.warning("flashckpt: sweeping %s failed: %s", be.url, exc)
                continue
            if n:
                log.info("flashckpt: removed %d unfinished temporary files from %s", n, be.url)

    thread = threading.Thread(target=sweep, name="flashckpt-sweep", daemon=True)
    thread.start()
    return thread
