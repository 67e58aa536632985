"""Replicated state staged once per node, split across the node's ranks.

With ``Options.dedup_replicated``, the ranks of one node hold the same bytes for most of the
state (data parallel).  Each chunk of the layout has an owner among the node's ranks
(:func:`~flashckpt.coordination.dedup.assign_owners` over every chunk, by bytes: stable from
save to save, whatever is learned).  Once a rank has seen two snapshots in which every rank
of the node staged the same bytes for a chunk of a tensor of its own (``small_tensor_bytes``
or more; packs of small tensors, where per-rank state such as RNG states lives, never count),
bytes that changed between the two, its later saves of the same layout copy such a chunk
only if they own it, and their memory manifests name the owner's shard for the others
(``format.check_memory_manifest(parts=True)``).

Why this is safe whatever each rank has learned, and when: an owner always copies the chunks
it owns, and a rank that has not learned a chunk copies it too, so every chunk a manifest
leaves to another rank is in that rank's snapshot of the same step.  Ranks need not agree on
anything beyond the node list gathered at construction.  What it assumes: a chunk that
training changed the same way on every rank of the node stays the same on all of them (the
user declared the state replicated); a rank then restores the owner's bytes of it.  A chunk
that never changed (zeros each rank fills in later) or ever differed is never assumed so.

The node's ranks must see each other's memory tiers (same ``memory_dir``, same machine):
checked once at construction (:func:`node_split`, a collective), else nothing is split.

Threads: ``plan`` on the training thread, ``learn`` on the persist thread (one lock).
"""

from __future__ import annotations

import bisect
import logging
import os
import secrets
import threading
from pathlib import Path

from flashckpt._config import Options
from flashckpt._dist import Control
from flashckpt.coordination.dedup import assign_owners
from flashckpt.errors import CorruptCheckpointError, StorageError
from flashckpt.format import SLOT_NAMES, Manifest, shard_name
from flashckpt.staging.memory_tier import read_part_manifest
from flashckpt.staging.stager import Layout

log = logging.getLogger(__name__)

#: Snapshots of one layout compared at most (a chunk not learned by then is staged by every
#: rank: the cost of learning stays bounded)
_ROUNDS = 16

#: What a layout is known by: each tensor's (dtype name, shape, offset in the shard)
LayoutKey = tuple[tuple[str, tuple[int, ...], int], ...]


def layout_key(layout: Layout) -> LayoutKey:
    return tuple((str(d), tuple(s), o) for (d, s), o in zip(layout.signature, layout.offsets, strict=True))


def manifest_key(m: Manifest) -> LayoutKey:
    return tuple((str(t.dtype), tuple(t.shape), t.offset) for t in m.tensors)


class NodeSplit:
    """Which chunks of a save this rank leaves to another rank of its node (see the module
    docstring).  ``enabled`` False: nothing is ever split."""

    def __init__(
        self, rank: int, world: int, nodes: list[str], root: Path, small_tensor_bytes: int, enabled: bool
    ) -> None:
        self.rank = rank
        self.world = world
        self.local = [r for r, n in enumerate(nodes) if n == nodes[rank]]
        self.enabled = enabled and len(self.local) > 1
        self.root = root
        self.small = small_tensor_bytes
        self._lock = threading.Lock()
        self._learned: dict[LayoutKey, frozenset[int]] = {}
        self._rounds: dict[LayoutKey, int] = {}  # snapshots compared, per layout
        self._pending: Manifest | None = None  # a snapshot the others had not sealed yet
        #: the last snapshot compared, and the checksums its ranks agreed on, by chunk index
        self._agreed: dict[LayoutKey, tuple[tuple[int, int], dict[int, str]]] = {}
        self._owners: tuple[Layout, list[int]] | None = None
        self._differed: dict[LayoutKey, set[int]] = {}  # chunks that once differed between ranks
        self._key: tuple[Layout, LayoutKey] | None = None  # the last layout's key

    def owners(self, layout: Layout) -> list[int]:
        """The rank of this node owning each chunk of ``layout`` (cached for the last one)."""
        cached = self._owners
        if cached is not None and cached[0] is layout:
            return cached[1]
        pos = assign_owners([n for _, n in layout.chunks], len(self.local))
        owners = [self.local[p] for p in pos]
        self._owners = (layout, owners)
        return owners

    def plan(self, layout: Layout) -> dict[int, str]:
        """Training thread: the chunks of a save of ``layout`` this rank does not copy, with
        the shard name of the rank that does (empty: copy everything)."""
        if not self.enabled:
            return {}
        cached = self._key
        if cached is None or cached[0] is not layout:
            cached = self._key = (layout, layout_key(layout))
        with self._lock:
            same = self._learned.get(cached[1])
        if not same:
            return {}
        owners = self.owners(layout)
        return {i: shard_name(owners[i], self.world) for i in same if owners[i] != self.rank}

    def learn(self, m: Manifest) -> None:
        """Persist thread, ``m`` this rank's fresh sealed snapshot: :meth:`compare` it with the
        node's other ranks' seals of the same snapshot.  One the others have not sealed yet
        is compared again after the next snapshot's job, instead of being waited for."""
        pending, self._pending = self._pending, None
        if pending is not None and pending.order < m.order:
            self.compare(pending)
        if not self.compare(m):
            self._pending = m

    def compare(self, m: Manifest) -> bool:
        """Persist thread, ``m`` this rank's sealed snapshot: find the chunks (of tensors of
        their own) that every rank of the node staged itself with the same bytes, and learn
        those whose bytes were also the same everywhere in the last such snapshot and have
        changed since: replicated state that training updates.  A chunk that never changes
        (zeros a rank fills in later, frozen per-rank data) or that ever differed between two
        ranks is never learned.  Returns False if another rank has not sealed the same snapshot yet (compare
        it again later); True otherwise."""
        if not self.enabled or not m.sealed:
            return True
        key = manifest_key(m)
        with self._lock:
            learned = self._learned.get(key, frozenset())
            rounds = self._rounds.get(key, 0)
            differed = self._differed.setdefault(key, set())
        if rounds >= _ROUNDS:
            return True  # what is not learned by now is staged by every rank
        agreed = {
            i: m.chunks[i].checksum
            for i in _own_tensor_chunks(m, self.small)
            if i not in learned and i not in differed and m.chunks[i].key in SLOT_NAMES
        }
        seen_different: set[int] = set()
        for r in self.local:
            if r == self.rank or not agreed:
                continue
            try:
                other = read_part_manifest(self.root, shard_name(r, self.world), m)
            except (CorruptCheckpointError, StorageError) as exc:  # gone, or not made yet
                log.debug("flashckpt: nothing learned from step %d: %s", m.step, exc)
                return False
            if not other.sealed:
                return False
            if manifest_key(other) != key or len(other.chunks) != len(m.chunks):
                return True  # another layout there: nothing to learn from this snapshot
            kept = {}
            for i, d in agreed.items():
                c = other.chunks[i]
                if c.key not in SLOT_NAMES:  # that rank did not stage it itself: no evidence
                    continue
                if (c.offset, c.nbytes, c.checksum) == (m.chunks[i].offset, m.chunks[i].nbytes, d):
                    kept[i] = d
                else:
                    seen_different.add(i)
            agreed = kept
        with self._lock:
            differed |= seen_different  # never learned, whatever comes later
            prev = self._agreed.get(key)
            if prev is not None and prev[0] >= m.order:
                return True  # an older snapshot sealed late: nothing to compare
            self._agreed[key] = (m.order, agreed)
            self._rounds[key] = rounds + 1
            new = {i for i, d in agreed.items() if prev is not None and prev[1].get(i, d) != d}
            if not new:
                return True
            self._learned[key] = learned | new
            total = len(self._learned[key])
        log.info(
            "flashckpt: %d of %d chunks are replicated on the %d ranks of this node: each is staged "
            "by one of them from now on",
            total,
            len(m.chunks),
            len(self.local),
        )
        return True


def _own_tensor_chunks(m: Manifest, small: int) -> list[int]:
    """Indexes of ``m``'s chunks that lie inside one tensor of ``small`` bytes or more."""
    spans = sorted((t.offset, t.offset + t.nbytes) for t in m.tensors if t.nbytes >= small)
    starts = [s for s, _ in spans]
    out = []
    for i, c in enumerate(m.chunks):
        j = bisect.bisect_right(starts, c.offset) - 1
        if j >= 0 and c.offset + c.nbytes <= spans[j][1]:
            out.append(i)
    return out


def node_split(ctl: Control, nodes: list[str], rank_dir: Path, lock_fd: int, opts: Options) -> NodeSplit:
    """Every rank, at construction: this rank's :class:`NodeSplit`, enabled with
    ``dedup_replicated`` and ``stage_once_per_node`` if the ranks of every node see each
    other's memory tiers (one gather and one ``all_ok``)."""
    # (the collectives run whatever this rank's options: ranks given other options than the
    # others never leave them waiting; what each enables is safe whatever the others do)
    wanted = opts.dedup_replicated and opts.stage_once_per_node
    ok = _visible(ctl, nodes, rank_dir, lock_fd, wanted)
    return NodeSplit(ctl.rank, ctl.world, nodes, rank_dir.parent, opts.small_tensor_bytes, wanted and ok)


def _visible(ctl: Control, nodes: list[str], rank_dir: Path, lock_fd: int, wanted: bool) -> bool:
    """Every rank (one gather): True if the ranks of every node see each other's memory
    tiers.  Each rank writes a token into its memory tier's lock file and checks its node's
    others."""
    if not ctl.distributed or len(set(nodes)) == len(nodes):  # (every rank knows: none gathers)
        return False
    token = secrets.token_hex(8)
    try:
        os.pwrite(lock_fd, token.encode(), 0)
        ok = True
    except OSError as exc:
        log.warning("flashckpt: cannot mark the memory tier for the node's other ranks: %s", exc)
        ok = False
    tokens = ctl.all_gather(token)
    root = rank_dir.parent
    for r, t in enumerate(tokens):
        if r == ctl.rank or nodes[r] != nodes[ctl.rank]:
            continue
        try:
            with open(root / shard_name(r, ctl.world) / "lock", "rb") as f:
                seen = f.read(64).decode(errors="replace")
        except OSError:
            seen = ""
        if seen != t:
            (log.warning if wanted else log.debug)(
                "flashckpt: rank %d is said to share this node but its memory tier is not in %s: "
                "replicated state is staged by every rank",
                r,
                root,
            )
            ok = False
    return ctl.all_ok(ok)
