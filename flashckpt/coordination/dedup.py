"""Chunks written once: across saves (:class:`Reuse`: a chunk whose bytes this rank's newest
commit on a tier holds is referenced, not written) and across ranks (:class:`RankExchange`:
with ``Options.dedup_replicated``, a replicated chunk of a job's shared tier is written by
its owner rank only, the others reference the owner's object).  Persist thread only.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from typing import Any

from flashckpt._config import Options
from flashckpt._dist import Control
from flashckpt.coordination.inventory import Order, read_commit, read_commits, read_committed_manifest
from flashckpt.errors import FlashCkptError
from flashckpt.format import (
    CODEC_PATTERN,
    MAX_TOTAL_BYTES,
    ChunkEntry,
    Manifest,
    chunk_key,
)
from flashckpt.transfer.tier import Tier

log = logging.getLogger(__name__)


class Reuse:
    """Per tier, the chunks of this rank's newest manifest there, by checksum."""

    def __init__(self, opts: Options) -> None:
        self.opts = opts
        self._chunks: dict[str, dict[str, ChunkEntry]] = {}
        self._order: dict[str, Order] = {}

    def known(self, tier: Tier, m: Manifest) -> dict[str, ChunkEntry]:
        """Chunks of this shard already on ``tier`` (from its newest commit), by checksum.

        The chunks remembered from this rank's last manifest there are reused only while that
        step is still committed there (one record read per save): a tier that lost it (wiped,
        a replaced disk, a commit that failed) gets every chunk written again, never a
        manifest that references objects it no longer holds."""
        known = self._chunks.get(tier.name)
        if known is not None and not self._basis_committed(tier):
            log.info("flashckpt: the %s tier no longer holds the step its chunks were reused from", tier.name)
            known = None
            self._order.pop(tier.name, None)
        if known is None:
            known = {}
            try:
                records = read_commits(tier.backend, self.opts)
                if records:
                    newest = records[-1]
                    prev = read_committed_manifest(tier.backend, newest.step, m.rank, m.world_size, self.opts)
                    known = {c.checksum: c for c in prev.chunks}
                    self._order[tier.name] = newest.order
            except FlashCkptError as exc:  # nothing to reuse: everything is written again
                log.debug("no chunks to reuse on %s: %s", tier.backend.url, exc)
            self._chunks[tier.name] = known
        return known

    def remember(self, tier: Tier, out: Manifest) -> None:
        """``out``'s manifest is now on ``tier``: later saves reuse its chunks if it is this
        rank's newest there (retention never deletes it before a newer manifest of this rank
        exists, see ``collect_chunks``; a salvaged older snapshot is not the newest)."""
        if out.order >= self._order.get(tier.name, (-1, -1)):
            self._chunks[tier.name] = {c.checksum: c for c in out.chunks}
            self._order[tier.name] = out.order

    def _basis_committed(self, tier: Tier) -> bool:
        """The step whose chunks :meth:`known` remembers for ``tier`` is still committed there."""
        order = self._order.get(tier.name)
        if order is None:
            return not self._chunks.get(tier.name)  # nothing to reuse: nothing to check
        try:
            return read_commit(tier.backend, order[1], self.opts).order == order
        except FlashCkptError as exc:
            log.debug("flashckpt: the commit of step %d on %s: %s", order[1], tier.backend.url, exc)
            return False


def dedups(opts: Options, control: Control, tier: Tier) -> bool:
    """Chunks of replicated state are written once per job on this tier."""
    return opts.dedup_replicated and tier.shared and control.distributed


def assign_owners(sizes: list[int], world: int) -> list[int]:
    """Deterministic owner rank per chunk: largest first, each to the least-loaded rank."""
    load = [0] * world
    owners = [0] * len(sizes)
    for i in sorted(range(len(sizes)), key=lambda i: (-sizes[i], i)):
        r = min(range(world), key=lambda r: (load[r], r))
        owners[i] = r
        load[r] += sizes[i]
    return owners


def dedup_key(tier: Tier, step: int, seq: str, rank: int) -> str:
    """The store key under which ``rank`` publishes its chunk entries of a deduplicated save."""
    return f"dedup/{tier.name}/{step}/{seq}/r{rank}"


class RankExchange:
    """The :class:`~flashckpt.transfer.writer.Exchange` of one deduplicated save of shard
    ``m`` to ``tier``, through the job's store.  Chunk ``i`` is owned by rank ``owners[i]``
    (spread by bytes); each rank publishes the entries of the chunks it wrote under one key,
    and the others wait for them (up to ``coord_timeout_s``)."""

    def __init__(self, control: Control, tier: Tier, m: Manifest, seq: str) -> None:
        self.control = control
        self.rank = control.rank
        self.tier = tier
        self.step = m.step
        self.seq = seq
        self.owners = assign_owners([c.nbytes for c in m.chunks], control.world)
        self._blobs: dict[int, dict[str, Any] | None] = {}

    def publish(self, mine: Mapping[int, ChunkEntry]) -> None:
        """Publish this rank's chunk entries (possibly none).  Never raises."""
        body = json.dumps({str(i): [c.checksum, c.key, c.stored_nbytes, c.codec] for i, c in mine.items()})
        try:
            self.control.publish(dedup_key(self.tier, self.step, self.seq, self.rank), body)
        except FlashCkptError as exc:
            log.warning("flashckpt: could not publish the chunks of step %d: %s", self.step, exc)

    def entry(self, owner: int, i: int, src: ChunkEntry) -> ChunkEntry | None:
        """The owner's entry of chunk ``i`` if it names ``src``'s very content (it comes from
        another process: every field is checked), else None."""
        if owner not in self._blobs:
            try:
                key = dedup_key(self.tier, self.step, self.seq, owner)
                self._blobs[owner] = json.loads(self.control.await_outcome(key))  # checked below
            except (FlashCkptError, ValueError) as exc:
                log.warning("flashckpt: rank %d published no chunks of step %d: %s", owner, self.step, exc)
                self._blobs[owner] = None
        blob = self._blobs[owner]
        got = blob.get(str(i)) if isinstance(blob, dict) else None
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
            return ChunkEntry(got[1], 0, src.offset, src.nbytes, got[2], got[3], src.checksum)
        return None


def publish_none(control: Control, tier: Tier, step: int, seq: str) -> None:
    """This rank writes nothing of the save: the others need not wait for its entries."""
    control.publish(dedup_key(tier, step, seq, control.rank), "{}")


def clear_entries(control: Control, tier: Tier, step: int, seq: str) -> None:
    """After the commit (every rank has read the entries): delete them from the store."""
    for r in range(control.world):
        control.delete(dedup_key(tier, step, seq, r))
