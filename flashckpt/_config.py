"""Tuning options and environment overrides, read in one place.

Explicit arguments win over ``FLASHCKPT_*`` environment variables, which win over defaults.
"""

from __future__ import annotations

import hashlib
import math
import os
import socket
import tempfile
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Any

from flashckpt.errors import ConfigError

MiB = 1 << 20
#: Smallest ``Options.chunk_bytes``: small enough that tests can cut a tensor into many chunks
#: cheaply; every chunk still starts on a page boundary (O_DIRECT).
MIN_CHUNK_BYTES = 64 << 10
#: Largest ``Options.chunk_bytes``: a chunk is one object, and S3 takes at most 5 GiB in one
#: request (``PutObject``, or one part of a multipart upload).
MAX_CHUNK_BYTES = 4 << 30


@dataclass(frozen=True, kw_only=True)
class Options:
    """Knobs below the pinned API.  Pass ``options=Options(...)`` to ``Checkpointer``."""

    #: Largest chunk a tensor is cut into; a chunk is one object on the persistent tiers.
    #: A multiple of 4096 from 64 KiB to 4 GiB.
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
    #: Temporary files (``*.tmp-*``) a killed writer left on a tier are deleted once they are
    #: this old (or 60 s, whichever is longer), unless this process made them.  (The shared
    #: tier's chunk GC needs no grace: it runs in a commit window, when no rank writes.)
    gc_grace_s: float = 600.0
    #: Multi-rank jobs whose ranks hold the same state (data parallel, e.g. DDP): each chunk
    #: whose bytes are the same on its owner rank goes to the shared tier from that rank only,
    #: so N ranks write 1/N each.  Chunks that differ (per-rank RNG state) are written by
    #: every rank as usual.  Costs one store key per rank per step.  With
    #: ``stage_once_per_node``, the ranks of a node also stage replicated chunks once between
    #: them (see there); the local tier still holds every rank's full shard.
    dedup_replicated: bool = False
    #: With ``dedup_replicated``, ranks sharing a node and a memory directory: a chunk of a
    #: tensor of its own (``small_tensor_bytes`` or more) that two snapshots showed changing
    #: the same way on every rank of the node is from then on copied by one of them only
    #: (each rank copies about 1/k of it on k ranks) and read from that rank's memory by
    #: the others (persist, restore, mirrors): a save blocks for a fraction of the copy and
    #: the node holds one copy per slot.  Such a chunk is assumed to stay the same on every
    #: rank (a rank restores its owner's bytes).  False: every rank stages its whole state.
    stage_once_per_node: bool = True
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
    #: Preemption: how long after the signal the loop has to take its final save and close
    #: before the newest staged snapshot is persisted from a background thread (keep it well
    #: inside the scheduler's own grace: SLURM's KillWait and Kubernetes' default are 30 s).
    preempt_grace_s: float = 10.0

    def __post_init__(self) -> None:
        """Validate every field (any thread): a ``ConfigError`` names the option.  Floats are
        stored as ``float`` (``coord_timeout_s=3`` is accepted)."""
        for f in fields(self):
            v = getattr(self, f.name)
            kind = _KINDS[f.name]
            if kind == "bool":
                if not isinstance(v, bool):
                    raise ConfigError(f"Options.{f.name} must be True or False, got {v!r}")
            elif kind == "int":
                if type(v) is not int:  # not a bool, not a float (64.0 * MiB is a slip)
                    raise ConfigError(f"Options.{f.name} must be an int, got {v!r}")
            elif kind == "float":
                if isinstance(v, bool) or not isinstance(v, (int, float)):
                    raise ConfigError(f"Options.{f.name} must be a number, got {v!r}")
                try:
                    fv = float(v)
                except OverflowError:  # an int beyond any float
                    fv = math.inf
                if not math.isfinite(fv):
                    raise ConfigError(f"Options.{f.name} must be a finite number, got {v!r}")
                object.__setattr__(self, f.name, fv)
            if kind not in ("int", "float"):
                continue
            lo, positive, hi = _BOUNDS.get(f.name, (0, False, None))
            v = getattr(self, f.name)
            if positive and not v > 0:
                raise ConfigError(f"Options.{f.name} must be > 0, got {v!r}")
            if not v >= lo:
                raise ConfigError(f"Options.{f.name} must be >= {lo}, got {v!r}")
            if hi is not None and v > hi:
                raise ConfigError(f"Options.{f.name} must be at most {hi}, got {v!r}")
        if self.chunk_bytes % 4096:
            raise ConfigError(f"Options.chunk_bytes must be a multiple of 4096, got {self.chunk_bytes}")
        if self.backoff_max_s < self.backoff_s:
            raise ConfigError(
                f"Options.backoff_max_s ({self.backoff_max_s}) must be >= backoff_s ({self.backoff_s})"
            )


#: The kind of every field, from its annotation ("int", "float", "bool").
_KINDS = {f.name: str(f.type) for f in fields(Options)}
#: Longest duration an option may give.  Larger values overflow the waits they reach
#: (``threading`` and ``timedelta`` limits, gloo's milliseconds) far from where they were set.
MAX_SECONDS = 1e9
#: ``(minimum, must be > 0, maximum)`` per numeric field; fields not listed are >= 0.
_BOUNDS: dict[str, tuple[float, bool, float | None]] = {
    "chunk_bytes": (MIN_CHUNK_BYTES, True, MAX_CHUNK_BYTES),
    "io_threads": (1, True, None),
    "hash_threads": (1, True, None),
    "retries": (1, True, None),
    # zero: every retry at once, which a throttled store answers with more throttling
    "backoff_s": (0, True, MAX_SECONDS),
    "backoff_max_s": (0, True, MAX_SECONDS),
    # zero: every collective and commit wait would time out at once
    "coord_timeout_s": (0, True, MAX_SECONDS),
    # zero: the 60 s floor applies; NaN would disable the rule
    "gc_grace_s": (0, False, MAX_SECONDS),
    # zero: no cap
    "mirror_bytes_per_s": (0, False, None),
    # zero makes every mirror socket non-blocking: every transfer would fail
    "mirror_timeout_s": (0, True, MAX_SECONDS),
    # zero: the watcher would persist the moment the signal comes, racing the final save
    "preempt_grace_s": (0, True, MAX_SECONDS),
}


_ENV_INTS = {"chunk_bytes": "FLASHCKPT_CHUNK_BYTES", "io_threads": "FLASHCKPT_IO_THREADS"}


def options_from_env(base: Options | None) -> Options:
    """Apply ``FLASHCKPT_CHUNK_BYTES`` / ``FLASHCKPT_IO_THREADS`` unless ``base`` was explicit.

    Each value is checked like the option it sets; a bad one is a ``ConfigError`` naming the
    variable.  Training thread (``Checkpointer`` construction)."""
    if base is not None:
        return base
    out = Options()
    for name, var in _ENV_INTS.items():
        raw = os.environ.get(var)
        if not raw:
            continue
        try:
            value = int(raw.strip(), 10)
        except ValueError:
            raise ConfigError(f"{var}={raw!r} is not an integer") from None
        try:
            changes: dict[str, Any] = {name: value}
            out = replace(out, **changes)
        except ConfigError as exc:
            raise ConfigError(f"{var}={raw!r}: {exc}") from None
    return out


def node_id() -> str:
    """This node's identity: ``FLASHCKPT_NODE_ID`` when set, else the host name."""
    return os.environ.get("FLASHCKPT_NODE_ID") or socket.gethostname()


def default_memory_root() -> str:
    """``FLASHCKPT_MEMORY_DIR``, else a per-user directory on ``/dev/shm`` (tmp elsewhere).

    The per-user directory is named by the effective uid, the owner
    :func:`flashckpt._secure.private_dir` requires; its parent (``/dev/shm``) is the directory
    to trust above it."""
    env = os.environ.get("FLASHCKPT_MEMORY_DIR")
    if env:
        return env
    base = "/dev/shm" if os.path.isdir("/dev/shm") else tempfile.gettempdir()
    return os.path.join(base, f"flashckpt-{os.geteuid()}")


def storage_id(url: str) -> str:
    """The id every memory snapshot names its storage tier by (16 hex digits of the SHA-256
    of the tier's URL, credentials removed): a memory tier of another job is told apart."""
    return hashlib.sha256(url.encode()).hexdigest()[:16]


def memory_root(url: str, memory_dir: str | os.PathLike[str] | None) -> Path:
    """The directory holding the shard directories of the storage tier at ``url``: the
    ``memory_dir`` a job was given, else its own directory below :func:`default_memory_root`."""
    if memory_dir is not None:
        return Path(memory_dir)
    return Path(default_memory_root()) / storage_id(url)
