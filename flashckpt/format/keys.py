"""The key grammar: the names of every object on a tier, and :func:`check_key`, which every
name read from storage passes before a backend sees it.

Pure functions and constants only (no I/O); imports nothing else of the format.
"""

from __future__ import annotations

import re

CODEC_RAW = "raw/1"
#: Codec ids with their versions: ``raw/1``, ``zstd/1`` and byte-grouped ``zstd-bg{2,4,8}/1``.
#: (Kept beside :data:`_CHUNK_RE`, which names the same codecs in a chunk key.)
CODEC_PATTERN = re.compile(r"(raw|zstd|zstd-bg[248])/1")
#: The slot files of a memory tier (and of a mirror held for a peer).
SLOT_NAMES = ("slot-0.bin", "slot-1.bin")

_SEGMENT = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._-]{0,199}")
MAX_KEY_CHARS = 1024


def check_key(key: str) -> str:
    """Return ``key`` if it is a safe relative name, else raise ``ValueError``.

    Safe means: no empty, ``.`` or ``..`` segment, no leading ``/``, only portable characters.
    Every name read from a manifest passes through here before it reaches a backend, so a
    hostile manifest cannot make a backend touch anything outside the checkpoint's root.
    """
    if not isinstance(key, str) or not key or len(key) > MAX_KEY_CHARS:
        raise ValueError(f"invalid storage key {key!r}")
    for seg in key.split("/"):
        if not _SEGMENT.fullmatch(seg) or seg in (".", ".."):
            raise ValueError(f"invalid storage key {key!r}")
    return key


# --------------------------------------------------------------------------------------------
# storage keys


def commit_key(step: int) -> str:
    return f"commits/step-{step:012d}"


def step_prefix(step: int) -> str:
    return f"steps/{step:012d}/"


#: How ``shard_name`` names a shard (also its memory-tier directory).
SHARD_PATTERN = re.compile(r"r\d{5}-of-\d{5}")


def shard_name(rank: int, world_size: int) -> str:
    return f"r{rank:05d}-of-{world_size:05d}"


def manifest_key(step: int, rank: int, world_size: int) -> str:
    return f"{step_prefix(step)}{shard_name(rank, world_size)}.manifest"


CHUNKS_PREFIX = "chunks/"


def chunk_key(digest: str, codec: str, stored_nbytes: int | None = None) -> str:
    """Content address of a chunk: its raw bytes' checksum and how they are stored.  Shared by
    every step (and rank) that holds the same bytes: an unchanged chunk is written once.

    An encoded chunk's address also names its stored size: the same bytes encoded at another
    compression level are another frame of another length, which must not replace the object
    older manifests read (they record its length).  Two frames of one address decode alike."""
    name = f"{CHUNKS_PREFIX}{digest[:2]}/{digest}.{codec.replace('/', '-')}"
    return name if codec == CODEC_RAW or stored_nbytes is None else f"{name}.{stored_nbytes}"


_CHUNK_RE = re.compile(r"chunks/([0-9a-f]{2})/([0-9a-f]{32})\.((?:raw|zstd|zstd-bg[248])-1)(?:\.\d{1,16})?")


def parse_chunk_key(key: str) -> str | None:
    """The checksum a chunk key names, or None if ``key`` is not a chunk key (a foreign file
    under ``chunks/``: an NFS silly-rename, ``.DS_Store``, a copy): those are never touched."""
    m = _CHUNK_RE.fullmatch(key)
    return m.group(2) if m and m.group(2).startswith(m.group(1)) else None


def memory_manifest_key(step: int) -> str:
    return f"step-{step:012d}.manifest"


_COMMIT_RE = re.compile(r"^commits/step-(\d{12})$")
_MEMORY_MANIFEST_RE = re.compile(r"^step-(\d{12})\.manifest$")


def parse_commit_key(key: str) -> int | None:
    m = _COMMIT_RE.match(key)
    return int(m.group(1)) if m else None


_STEP_PREFIX_RE = re.compile(r"^steps/(\d{12})/$")
_MANIFEST_RE = re.compile(r"^steps/(\d{12})/r(\d{5})-of-(\d{5})\.manifest$")


def parse_step_prefix(prefix: str) -> int | None:
    """The step a step directory's prefix (``steps/<step>/``) names, else None."""
    m = _STEP_PREFIX_RE.match(prefix)
    return int(m.group(1)) if m else None


def parse_manifest_key(key: str) -> tuple[int, int, int] | None:
    """``(step, rank, world size)`` of a manifest key, else None (not flashckpt's)."""
    m = _MANIFEST_RE.match(key)
    return (int(m.group(1)), int(m.group(2)), int(m.group(3))) if m else None


def parse_memory_manifest_key(key: str) -> int | None:
    m = _MEMORY_MANIFEST_RE.match(key)
    return int(m.group(1)) if m else None


#: The key of the storage tier's run record: the id of the run whose steps the tier holds,
#: written once, before the tier's first commit.  Memory tiers of another run are never
#: restored from (see Manifest.run).
RUN_KEY = "run"
