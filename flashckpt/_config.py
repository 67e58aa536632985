"""Tuning options and environment overrides, read in one place.

Explicit arguments win over ``FLASHCKPT_*`` environment variables, which win over defaults.
"""

from __future__ import annotations

import os
import socket
import tempfile
from dataclasses import dataclass, fields, replace
from typing import Any

from flashckpt.errors import ConfigError

MiB = 1 << 20


@dataclass(frozen=True, kw_only=True)
class Options:
    """Knobs below the pinned API.  Pass ``options=Options(...)`` to ``Checkpointer``."""

    #: Largest chunk a tensor is cut into; a chunk is one object on the persistent tiers.
    chunk_bytes: int = 64 * MiB
    #: Tensors smaller than this are packed together into shared chunks.
    small_tensor_bytes: int = 1 * MiB
    #: Parallel chunk writes / reads per tier.
    io_threads: int = 2
    #: Threads that checksum chunks after staging and before restore.
    hash_threads: int = 2
    #: Attempts per storage operation for retryable errors (1 = no retry).
    retries: int = 5
    #: First backoff delay; doubles per attempt with full jitter, capped at ``backoff_max_s``.
    backoff_s: float = 0.2
    backoff_max_s: float = 10.0
    #: fsync chunk files, records and directories on the local and storage tiers.
    fsync: bool = True
    #: Use O_DIRECT for large chunk writes when the file system supports it.
    direct_io: bool = True
    #: Fault the staging slots in on a background thread as soon as the state's size is known.
    prefault: bool = True
    #: Multi-rank jobs: how long a rank waits for the others (a collective in ``restore``, the
    #: commit of a step) before it reports :class:`~flashckpt.CoordinationError` / a failure.
    coord_timeout_s: float = 300.0
    #: Multi-rank jobs: a chunk of the shared tier that no manifest references is deleted only
    #: after it has stayed unreferenced this long (a rank may be about to reference it).
    gc_grace_s: float = 600.0
    #: Multi-rank jobs whose ranks hold the same state (data parallel, e.g. DDP): each chunk
    #: whose bytes are the same on its owner rank goes to the shared tier from that rank only,
    #: so N ranks write 1/N each.  Chunks that differ (per-rank RNG state) are written by
    #: every rank as usual.  Costs one store key per rank per step; memory and local tiers
    #: still hold every rank's full state.
    dedup_replicated: bool = False
    #: Peer mirrors: the cap on bytes per second one rank sends to its peers (0: no cap), so
    #: that mirroring leaves the network and cores to training.
    mirror_bytes_per_s: float = 0.0
    #: Peer mirrors: socket timeout of every mirror operation; a slower peer is reported and
    #: the transfer abandoned.
    mirror_timeout_s: float = 60.0
    #: Peer mirrors are best effort: a failed mirror is reported in ``stats`` and the log and
    #: never raised.  True makes ``SaveHandle.wait`` / ``Checkpointer.wait`` / ``close``
    #: raise it like a failed durable tier.
    require_mirrors: bool = False

    def __post_init__(self) -> None:
        for f in fields(self):
            v = getattr(self, f.name)
            if isinstance(v, bool):
                continue
            if isinstance(v, (int, float)) and v < 0:
                raise ConfigError(f"Options.{f.name} must be >= 0, got {v}")
        if self.chunk_bytes < MiB or self.chunk_bytes % 4096:
            raise ConfigError("Options.chunk_bytes must be a multiple of 4096 and >= 1 MiB")
        if self.io_threads < 1 or self.hash_threads < 1 or self.retries < 1:
            raise ConfigError("Options.io_threads, hash_threads and retries must be >= 1")


_ENV_INTS = {"chunk_bytes": "FLASHCKPT_CHUNK_BYTES", "io_threads": "FLASHCKPT_IO_THREADS"}


def options_from_env(base: Options | None) -> Options:
    """Apply ``FLASHCKPT_CHUNK_BYTES`` / ``FLASHCKPT_IO_THREADS`` unless ``base`` was explicit."""
    if base is not None:
        return base
    changes: dict[str, Any] = {}
    for name, var in _ENV_INTS.items():
        raw = os.environ.get(var)
        if raw:
            try:
                changes[name] = int(raw)
            except ValueError:
                raise ConfigError(f"{var}={raw!r} is not an integer") from None
    return replace(Options(), **changes)


def node_id() -> str:
    """This node's identity: ``FLASHCKPT_NODE_ID`` when set, else the host name."""
    return os.environ.get("FLASHCKPT_NODE_ID") or socket.gethostname()


def default_memory_root() -> str:
    """``FLASHCKPT_MEMORY_DIR``, else a per-user directory on ``/dev/shm`` (tmp elsewhere)."""
    env = os.environ.get("FLASHCKPT_MEMORY_DIR")
    if env:
        return env
    base = "/dev/shm" if os.path.isdir("/dev/shm") else tempfile.gettempdir()
    return os.path.join(base, f"flashckpt-{os.getuid()}")
