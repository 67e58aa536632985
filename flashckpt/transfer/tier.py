"""A named storage tier: where a shard is written and how (its backend, its encoding)."""

from __future__ import annotations

from dataclasses import dataclass

from flashckpt.storage import Backend
from flashckpt.transfer.codec import Compression

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
    #: The tier holds the run record (the storage tier): written before its first commit.
    holds_run: bool = False
