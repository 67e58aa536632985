"""Which snapshot a restore loads, and from where: every rank's inventory, gathered.

:func:`take_inventory` lists what this rank's tiers hold; :func:`plan_restore` gathers every
rank's holdings (its tiers, and the copies its memory keeps of other ranks' shards) and
returns the snapshots every rank can load, newest first, never one of a timeline the run
has left unless asked for by step.  Training thread only; :func:`plan_restore` is a
collective (every rank calls it).
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Any

from flashckpt import _hooks as hooks
from flashckpt.coordination.inventory import Ancestors, Order, read_commits
from flashckpt.coordination.parts import RankParts
from flashckpt.coordination.retention import abandoned
from flashckpt.errors import StorageError, TransientStorageError
from flashckpt.format import SHARD_PATTERN, shard_name
from flashckpt.transfer.tier import Tier

log = logging.getLogger(__name__)

#: Per tier, cheapest first: the snapshots it holds and their ancestry.
Inventory = list[tuple[Tier, dict[Order, Ancestors]]]


@dataclasses.dataclass
class RestorePlan:
    """What this rank's tiers hold, the snapshots every rank can load (newest first), per
    snapshot the peers holding a copy of this rank's shard, and the newest generation any
    rank saw anywhere (the next saves are newer than it)."""

    inventory: Inventory
    steps: list[Order]
    mirrored: dict[Order, list[int]]
    newest_gen: int
    newest: Order | None  # the newest snapshot every rank can load, whatever ``step`` asked
    #: shard -> snapshot -> peers holding a copy of it: the node-mates of this rank's old
    #: node whose mirrors hold the chunks this rank's copies leave to them
    part_copies: dict[str, dict[Order, list[int]]] = dataclasses.field(default_factory=dict)


def memory_snapshots(parts: RankParts) -> dict[Order, Ancestors]:
    """Snapshots in this rank's memory tier that belong to this run (with their ancestry)."""
    where = str(parts.rank_dir)
    return {
        m.order: m.ancestors for m in parts.mem.holdings() if parts.timeline.ours(m.storage, m.run, where)
    }


@hooks.timed("time.restore.inventory")
def take_inventory(parts: RankParts) -> tuple[Inventory, list[tuple[Tier, StorageError]]]:
    """The snapshots each tier of this rank holds, cheapest tier first, and the tiers that
    could not be listed (they count as empty)."""
    inv: Inventory = [(parts.memory, memory_snapshots(parts))]
    unlisted: list[tuple[Tier, StorageError]] = []
    for tier in parts.tiers:
        try:
            inv.append((tier, {r.order: r.ancestors for r in read_commits(tier.backend, parts.opts)}))
        except StorageError as exc:
            log.warning("flashckpt: cannot list the %s tier (%s): %s", tier.name, tier.backend.url, exc)
            unlisted.append((tier, exc))
            inv.append((tier, {}))
    return inv, unlisted


def plan_restore(parts: RankParts, want: int | None, *, node_lead: bool) -> RestorePlan:
    """Every rank (gathers): what each rank can load, and the snapshots every rank can load,
    newest first (``want``: only that step).  Raises :class:`TransientStorageError` for a
    "latest" restore when some rank could not list a tier (every rank decides alike)."""
    inventory, unlisted = take_inventory(parts)
    mine = {o for _, held in inventory for o in held}
    ancestry = {o: a for _, held in inventory for o, a in held.items()}
    if node_lead:
        warn_foreign_shards(parts)
    held_here: dict[str, list[list[Any]]] = {}
    if parts.mirror_server is not None:
        # shard directories this node keeps for ranks that run elsewhere now (renumbered)
        parts.mirror_server.claim_orphans(parts.memory_root, parts.world, parts.timeline.storage)
        held_here = parts.mirror_server.snapshots()
    names = [f"rank {parts.rank}: {t.name}" for t, _ in unlisted]
    own = [[o[0], o[1], [list(a) for a in ancestry[o]]] for o in sorted(mine)]
    job = _Job(parts, parts.ctl.all_gather([own, held_here, names]))
    if want is None and job.unlisted:
        raise TransientStorageError(
            f"some tiers could not be listed ({', '.join(job.unlisted)}): refusing to start from "
            "scratch or to restore from the other tiers (that could roll the run back past the "
            "steps the unreachable ones hold); retry when they are reachable, or restore an "
            "explicit step"
        ) from (unlisted[0][1] if unlisted else None)
    every = [job.available(r) for r in range(parts.world)]
    common = set.intersection(*every)
    # "latest" is never a snapshot of a timeline the run has left (a fallback must not
    # resume it); an explicit step is the user's call, and its continuation is the newest
    known = job.ancestry()
    left = abandoned([(o, known.get(o, ())) for o in set().union(*every)])
    newest = max(common - left, default=None)
    common = common - left if want is None else {o for o in common if o[1] == want}
    mirrored = job.copies(parts.rank)
    part_copies = {h: job.held(h) for h in job.holders(parts.rank)}
    if parts.ctl.distributed and (mine | set(mirrored)) - common:
        log.info(
            "flashckpt: rank %d holds snapshots %s that not every rank has; newest common: %s",
            parts.rank,
            sorted((mine | set(mirrored)) - common)[-3:],
            max(common) if common else None,
        )
    return RestorePlan(
        inventory, sorted(common, reverse=True), mirrored, job.newest_gen(), newest, part_copies
    )


class _Job:
    """What every rank gathered: per rank, ``[own snapshots, copies held of other shards,
    tiers it could not list]``."""

    def __init__(self, parts: RankParts, everyone: list[Any]) -> None:
        self.parts = parts
        self.everyone = everyone
        self.unlisted = [x for _, _, u in everyone for x in u]
        self._cache: dict[str, dict[Order, list[tuple[int, list[str]]]]] = {}

    def newest_gen(self) -> int:
        """The newest generation any rank saw anywhere."""
        gens = [o[0] for own, _, _ in self.everyone for o in own]
        gens += [s[0] for _, held, _ in self.everyone for snaps in held.values() for s in snaps]
        return int(max(gens, default=-1))

    def _rows(self, shard: str) -> dict[Order, list[tuple[int, list[str]]]]:
        """Copies of ``shard`` in some rank's memory that belong to this run: order ->
        ``(rank holding it, shards whose copies hold the chunks it leaves to them)``."""
        if shard not in self._cache:
            out: dict[Order, list[tuple[int, list[str]]]] = {}
            for q, (_, held, _) in enumerate(self.everyone):
                for gen, step, storage, run, _anc, holders in held.get(shard, []):
                    if self.parts.timeline.ours(storage, run, f"rank {q}'s copies of {shard}"):
                        out.setdefault((int(gen), int(step)), []).append((q, [str(h) for h in holders]))
            self._cache[shard] = out
        return self._cache[shard]

    def held(self, shard: str) -> dict[Order, list[int]]:
        """Snapshots of ``shard`` in some rank's memory: order -> the ranks holding them."""
        return {o: [q for q, _ in rows] for o, rows in self._rows(shard).items()}

    def copies(self, r: int) -> dict[Order, list[int]]:
        """Snapshots of rank ``r``'s shard that some rank's memory holds whole, or whose
        chunks left to other shards' copies are held too: order -> ranks holding one."""
        out: dict[Order, list[int]] = {}
        for o, rows in self._rows(shard_name(r, self.parts.world)).items():
            for q, holders in rows:
                if all(o in self._rows(h) for h in holders):
                    out.setdefault(o, []).append(q)
        return out

    def holders(self, r: int) -> set[str]:
        """The shards whose copies hold chunks that rank ``r``'s copies leave to them."""
        rows = self._rows(shard_name(r, self.parts.world)).values()
        return {h for row in rows for _, holders in row for h in holders}

    def available(self, r: int) -> set[Order]:
        """Every snapshot rank ``r`` can load: from its tiers or a copy in some memory."""
        return {(int(g), int(s)) for g, s, _ in self.everyone[r][0]} | set(self.copies(r))

    def ancestry(self) -> dict[Order, Ancestors]:
        """The ancestry of every snapshot any rank sees (one generation's snapshots agree)."""
        known: dict[Order, Ancestors] = {}
        for own_q, held_q, _ in self.everyone:
            rows = [(g, s, a) for g, s, a in own_q] + [(x[0], x[1], x[4]) for v in held_q.values() for x in v]
            for g, s, a in rows:
                known.setdefault((int(g), int(s)), tuple((int(x), int(y)) for x, y in a))
        return known


def warn_foreign_shards(parts: RankParts) -> None:
    """The lowest rank of a node, in ``restore``: name memory-tier directories left by a job
    of another world size.  This job never reads them (resharding reads storage), and
    deleting them is the user's call: they may hold the only copy of a step if that job
    resumes with its old size."""
    suffix = f"-of-{parts.world:05d}"
    root = parts.memory_root
    try:
        other = sorted(
            d.name
            for d in root.iterdir()
            if d.is_dir() and SHARD_PATTERN.fullmatch(d.name) and not d.name.endswith(suffix)
        )
    except OSError:
        return
    if other:
        log.warning(
            "flashckpt: %s holds memory-tier shards of a job with another world size (%s%s), which "
            "this %d-rank job never reads; delete them if that job will not resume",
            root,
            ", ".join(other[:4]),
            ", ..." if len(other) > 4 else "",
            parts.world,
        )
