"""The parts one rank's ``Checkpointer`` assembles, as its restorer and salvage see them."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from flashckpt._config import Options
from flashckpt._dist import Control
from flashckpt.coordination.nodesplit import NodeSplit
from flashckpt.coordination.timeline import Timeline
from flashckpt.coordination.worker import Persister
from flashckpt.replication.server import MirrorServer
from flashckpt.staging.memory_tier import MemoryTier
from flashckpt.staging.stager import Stager
from flashckpt.transfer.tier import Tier


@dataclass
class RankParts:
    """One rank's parts (built by the Checkpointer; training thread only)."""

    opts: Options
    ctl: Control
    rank_dir: Path  # this rank's memory-tier directory
    tiers: list[Tier]  # the persistent tiers, cheapest first (local, storage)
    memory: Tier  # this rank's memory tier, as a tier
    mirror_tier: Tier  # a copy of this rank's shard in a peer's memory, fetched into ``memory``
    mem: MemoryTier
    stager: Stager
    persister: Persister
    timeline: Timeline
    node: str  # this rank's node name
    split: NodeSplit  # which chunks of a save the node's other ranks stage
    mirror_server: MirrorServer | None = None
    addrs: list[tuple[str, int]] = field(default_factory=list)  # every rank's mirror server

    @property
    def rank(self) -> int:
        return self.ctl.rank

    @property
    def world(self) -> int:
        return self.ctl.world

    @property
    def memory_root(self) -> Path:
        """The directory of every rank's memory tier on this node."""
        return self.rank_dir.parent
