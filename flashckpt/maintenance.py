"""An operator's writes to a storage tier, with no job running: :func:`salvage` (the steps
that only lived in a dead job's memory, made durable) and :func:`gc` (retention by hand).
The command line's ``flashckpt salvage`` and ``flashckpt gc`` call these; so can any tool.

Reading is :class:`flashckpt.catalog.Catalog`'s; these are the only public functions that
write.  Any one thread.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

from flashckpt._config import Options, memory_root, storage_id
from flashckpt.backends import LocalBackend
from flashckpt.coordination.offline import (
    GcReport,
    SalvagedStep,
    SalvageReport,
    collect_by_hand,
    salvage_memory,
)
from flashckpt.errors import CheckpointNotFound
from flashckpt.storage import open_backend
from flashckpt.transfer.codec import Compression
from flashckpt.transfer.tier import Tier

__all__ = ["GcReport", "SalvageReport", "SalvagedStep", "gc", "salvage"]


def salvage(
    storage: str | os.PathLike[str],
    memory_dir: str | os.PathLike[str] | None = None,
    *,
    storage_options: dict[str, Any] | None = None,
    options: Options | None = None,
    compression: str | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> SalvageReport:
    """After a job died, on a node whose memory tier survived: write to ``storage`` every
    snapshot this node's memory holds (the job's own shards and the mirrors its ranks held
    for peers) that is newer than the newest step committed there, and commit each step once
    every rank's shard is there.  Run it on every surviving node; the last one commits.

    ``memory_dir``: the job's ``memory_dir`` (default: the default memory tier of this
    storage tier, as the job used it when given none).  ``compression``: how chunks are
    stored (``"zstd"``, ``"zstd:3"``; default raw), as the job's ``compression``.  Nothing
    committed is overwritten or deleted, and the memory tier is left as it is (a restart
    restores from it and drops it at its clean close).  Shard directories a live process
    holds are not read (a running job's).  Safe to run again.  ``progress(done, total)``:
    bytes of shards handled so far.
    """
    opts = options if options is not None else Options()
    be = open_backend(storage, storage_options=storage_options)
    try:
        tier = Tier("storage", be, Compression.parse(compression), shared=True, holds_run=True)
        return salvage_memory(tier, memory_root(be.url, memory_dir), storage_id(be.url), opts, progress)
    finally:
        be.close()


def gc(
    storage: str | os.PathLike[str],
    keep: int,
    *,
    dry_run: bool = False,
    grace_s: float | None = None,
    storage_options: dict[str, Any] | None = None,
    options: Options | None = None,
) -> GcReport:
    """Retention by hand on one tier: keep the newest ``keep`` (at least 1) committed steps
    of the run's current timeline, retire the others (and steps on timelines the run has
    left), delete the step directories and chunks nothing needs.  Never deleted: the newest
    committed step, a save in flight (manifests newer than the newest commit, and chunks
    younger than ``grace_s``, default ``Options.gc_grace_s``), records that fail validation
    and what they reference, and files that are not flashckpt's.  ``dry_run``: delete
    nothing, report what would go."""
    opts = options if options is not None else Options()
    be = open_backend(storage, storage_options=storage_options)
    try:
        grace = opts.gc_grace_s if grace_s is None else grace_s
        if grace < 0:
            raise ValueError(f"grace_s must be >= 0, got {grace}")
        if isinstance(be, LocalBackend) and not be.root.is_dir():
            raise CheckpointNotFound(f"no such directory: {be.root}")  # a typo is no empty tier
        return collect_by_hand(be, keep, opts, dry_run=dry_run, grace_s=grace)
    finally:
        be.close()
