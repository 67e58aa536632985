"""Manifests: one rank's shard of one step (its tensor table, chunk table and state tree),
their encoder and the validating decoder, the memory tier's view of a manifest, and the
lineage fields (generation, run, ancestors) that manifests and commit records share.

Pure functions and frozen dataclasses only (no I/O); safe to call from any thread.
"""

from __future__ import annotations

import bisect
import dataclasses
import itertools
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import torch

from flashckpt.errors import CorruptCheckpointError
from flashckpt.format import keys as _keys
from flashckpt.format.keys import CODEC_PATTERN, CODEC_RAW, SHARD_PATTERN, SLOT_NAMES, shard_name
from flashckpt.format.record import (
    FORMAT_VERSION,
    MAX_ANCESTORS,
    MAX_CHUNKS,
    MAX_GENERATION,
    MAX_NDIM,
    MAX_STEP,
    MAX_TENSORS,
    MAX_TOTAL_BYTES,
    MAX_WORLD,
    _check_header,
    _int,
    _time,
    decode_record,
    encode_record,
)
from flashckpt.format.tree import (
    DTYPE_NAMES,
    DTYPES,
    DTensorRef,
    StatefulRecord,
    decode_tree,
    shape_extent,
    tensor_nbytes,
)

MANIFEST_FORMAT = "flashckpt.manifest"
#: Checksum of a chunk in a memory-tier manifest written at the end of the staging copy,
#: before the background thread has checksummed it ("sealed" it).
UNSEALED = ""
#: A run or storage id (lineage fields, and the run record in commit.py).
_RUN_ID = re.compile(r"[0-9a-f]{1,64}")


@dataclass(frozen=True)
class TensorEntry:
    dtype: torch.dtype
    shape: tuple[int, ...]
    offset: int
    nbytes: int


@dataclass(frozen=True)
class ChunkEntry:
    """Bytes ``[offset, offset + nbytes)`` of the shard, stored in object ``key`` from ``at``."""

    key: str
    at: int
    offset: int
    nbytes: int
    stored_nbytes: int
    codec: str
    checksum: str


@dataclass(frozen=True)
class Manifest:
    """One rank's shard of one step: tensor table, chunk table and state tree."""

    step: int
    rank: int
    world_size: int
    node: str
    created_unix: float
    total_bytes: int
    tensors: tuple[TensorEntry, ...]
    chunks: tuple[ChunkEntry, ...]
    tree: Any  # JSON nodes; decode with decode_tree(tree, len(tensors))
    #: The run generation: snapshots are ordered by ``(generation, step)``, so a run continued
    #: from an older step (a rollback) is newer than the steps it abandoned.  See format.md.
    generation: int = 0
    #: Which run the snapshot belongs to: a hash of the storage tier's URL and the run id
    #: ("" when not known).  Memory tiers are checked against them before a restore.
    storage: str = ""
    run: str = ""
    #: Where this snapshot's timeline branched off older ones, nearest first: ``(g, s)`` means
    #: its run continued from step ``s`` of generation ``g`` (so ``g``'s steps above ``s`` were
    #: left behind).  At most :data:`MAX_ANCESTORS`.  See format.md, "The timeline".
    ancestors: tuple[tuple[int, int], ...] = ()

    def with_chunks(self, chunks: Iterable[ChunkEntry]) -> Manifest:
        return dataclasses.replace(self, chunks=tuple(chunks))

    @property
    def order(self) -> tuple[int, int]:
        """``(generation, step)``: the newer snapshot has the larger one."""
        return (self.generation, self.step)

    @property
    def sealed(self) -> bool:
        return all(c.checksum != UNSEALED for c in self.chunks)

    def state_tree(self) -> Any:
        return decode_tree(self.tree, len(self.tensors))


def _check_dtensors(node: Any, tensors: tuple[TensorEntry, ...], what: str) -> None:
    """Every DTensor of a decoded tree fits its local tensor: the same number of dimensions,
    the shard inside the global shape, and the global shape within the byte limit."""
    if isinstance(node, DTensorRef):
        local = tensors[node.index]
        if len(local.shape) != len(node.shape):
            raise CorruptCheckpointError(
                f"{what}: a DTensor of {len(node.shape)} dimensions whose local tensor has {len(local.shape)}"
            )
        if any(o + n > d for o, n, d in zip(node.offset, local.shape, node.shape, strict=True)):
            raise CorruptCheckpointError(f"{what}: a DTensor shard that lies outside its global shape")
        if shape_extent(local.dtype.itemsize, node.shape) > MAX_TOTAL_BYTES:
            raise CorruptCheckpointError(f"{what}: a DTensor whose global shape is over the size limit")
    elif isinstance(node, StatefulRecord):
        _check_dtensors(node.state, tensors, what)
    elif isinstance(node, dict):  # keys hold no tensors: decode_tree refuses them there
        for v in node.values():
            _check_dtensors(v, tensors, what)
    elif isinstance(node, (list, tuple)):
        for v in node:
            _check_dtensors(v, tensors, what)


def encode_manifest(m: Manifest) -> bytes:
    return encode_record(
        {
            "format": MANIFEST_FORMAT,
            "version": FORMAT_VERSION,
            "step": m.step,
            "rank": m.rank,
            "world_size": m.world_size,
            "node": m.node,
            "created_unix": m.created_unix,
            "total_bytes": m.total_bytes,
            "tensors": [[DTYPE_NAMES[t.dtype], list(t.shape), t.offset] for t in m.tensors],
            "chunks": [
                [c.key, c.at, c.offset, c.nbytes, c.stored_nbytes, c.codec, c.checksum] for c in m.chunks
            ],
            "tree": m.tree,
            **_lineage(m.generation, m.storage, m.run, m.ancestors),
        }
    )


def _lineage(
    generation: int, storage: str = "", run: str = "", ancestors: tuple[tuple[int, int], ...] = ()
) -> dict[str, Any]:
    """The optional lineage fields of a record: written only when set, so that records of a
    run that never rolled back read the same as before they existed."""
    out: dict[str, Any] = {}
    if generation:
        out["generation"] = generation
    if storage:
        out["storage"] = storage
    if run:
        out["run"] = run
    if ancestors:
        out["ancestors"] = [list(a) for a in ancestors[:MAX_ANCESTORS]]
    return out


def _decode_lineage(obj: dict[str, Any], what: str) -> tuple[int, str, str, tuple[tuple[int, int], ...]]:
    gen = obj.get("generation", 0)
    if type(gen) is not int or not 0 <= gen <= MAX_GENERATION:
        raise CorruptCheckpointError(f"{what}: bad generation")
    ids = []
    for name in ("storage", "run"):
        v = obj.get(name, "")
        if not isinstance(v, str) or (v and not _RUN_ID.fullmatch(v)):
            raise CorruptCheckpointError(f"{what}: bad {name} id")
        ids.append(v)
    raw = obj.get("ancestors", [])
    ok = isinstance(raw, list) and len(raw) <= MAX_ANCESTORS
    ancestors = []
    for a in raw if ok else []:
        if not (
            isinstance(a, list)
            and len(a) == 2
            and type(a[0]) is int
            and 0 <= a[0] < gen
            and type(a[1]) is int
            and -1 <= a[1] <= MAX_STEP
        ):
            ok = False
            break
        ancestors.append((a[0], a[1]))
    if not ok:  # (an ancestor is always an older generation; -1: nothing of it was kept)
        raise CorruptCheckpointError(f"{what}: bad ancestors")
    return gen, ids[0], ids[1], tuple(ancestors)


def decode_manifest(
    raw: bytes,
    what: str = "manifest",
    *,
    check_key: Callable[[str], str] = _keys.check_key,
    allow_unsealed: bool = False,
) -> Manifest:
    """Parse and validate a manifest.  ``check_key`` validates chunk object names (by default
    :func:`~flashckpt.format.keys.check_key`).

    ``allow_unsealed`` admits chunks whose checksum is :data:`UNSEALED` (memory tier only:
    a snapshot whose copy finished but whose checksums are still being computed).
    """
    obj = decode_record(raw, what)
    _check_header(obj, MANIFEST_FORMAT, what)
    step = _int(obj, "step", 0, MAX_STEP)
    world = _int(obj, "world_size", 1, MAX_WORLD)
    rank = _int(obj, "rank", 0, world - 1)
    total = _int(obj, "total_bytes", 0, MAX_TOTAL_BYTES)
    node = obj.get("node")
    created = _time(obj, what)
    if not isinstance(node, str) or len(node) > 255:
        raise CorruptCheckpointError(f"{what}: bad node")
    raw_tensors, raw_chunks = obj.get("tensors"), obj.get("chunks")
    if not isinstance(raw_tensors, list) or len(raw_tensors) > MAX_TENSORS:
        raise CorruptCheckpointError(f"{what}: bad tensor table")
    if not isinstance(raw_chunks, list) or len(raw_chunks) > MAX_CHUNKS:
        raise CorruptCheckpointError(f"{what}: bad chunk table")
    chunks = tuple(_decode_chunk(c, total, what, check_key, allow_unsealed) for c in raw_chunks)
    ordered = sorted(chunks, key=lambda c: c.offset)
    for a, b in itertools.pairwise(ordered):
        if b.offset < a.offset + a.nbytes:
            raise CorruptCheckpointError(f"{what}: chunks overlap")
    extent = max((c.offset + c.nbytes for c in chunks), default=0)
    if total != extent:
        raise CorruptCheckpointError(f"{what}: total_bytes {total} does not match the chunks ({extent})")
    tensors = tuple(_decode_tensor(t, total, what) for t in raw_tensors)
    _check_coverage(tensors, ordered, what)
    tree = obj.get("tree")
    # validate now (callers decode again when they need it): the tree, and its DTensors
    # against the tensor table
    _check_dtensors(decode_tree(tree, len(tensors)), tensors, what)
    gen, storage, run, ancestors = _decode_lineage(obj, what)
    return Manifest(
        step, rank, world, node, created, total, tensors, chunks, tree, gen, storage, run, ancestors
    )


def memory_manifest(m: Manifest, slot: str, *, parts: bool = False) -> Manifest:
    """``m`` as the memory tier describes it: every chunk in slot file ``slot`` at the shard's
    own offsets, raw.  What a slot holds is always the decoded bytes, whatever tier they were
    read from (a storage tier's codecs and stored sizes describe that tier's objects only).
    ``parts``: a chunk another rank of the node holds (its key a shard name, see
    :func:`check_memory_manifest`) keeps its key (a rank's own memory tier); without it every
    chunk is said to be in ``slot`` (a mirror holds the whole shard)."""
    return m.with_chunks(
        ChunkEntry(
            c.key if parts and SHARD_PATTERN.fullmatch(c.key) else slot,
            c.offset,
            c.offset,
            c.nbytes,
            c.nbytes,
            CODEC_RAW,
            c.checksum,
        )
        for c in m.chunks
    )


def check_memory_manifest(m: Manifest, what: str, *, capacity: int | None = None, parts: bool = False) -> str:
    """The one validator of memory-tier and mirror manifests; returns the slot file named.

    A memory manifest describes one slot's bytes: every chunk in the same slot file
    (:data:`SLOT_NAMES`), raw, stored at its own offset with stored size == size, and the
    shard fits the slot's ``capacity`` (when the slot is mapped).  With ``parts`` (a rank's
    own memory tier, or a mirror of it), a chunk may instead be held by another rank of the
    same node (replicated state staged once per node), or by the mirror of that rank: its key
    is that rank's shard name (:func:`part_holders`), raw, at its own offset.  Raises
    :class:`CorruptCheckpointError`.  Used everywhere such a manifest is read or written."""
    slots = {c.key for c in m.chunks if c.key in SLOT_NAMES}
    others = {c.key for c in m.chunks} - slots
    if len(slots) > 1 or (others and not parts):
        raise CorruptCheckpointError(
            f"{what}: chunks must all lie in one slot file, not {sorted(slots | others)[:3]}"
        )
    own = shard_name(m.rank, m.world_size)
    for key in others:
        if not SHARD_PATTERN.fullmatch(key) or key == own or not key.endswith(f"-of-{m.world_size:05d}"):
            raise CorruptCheckpointError(f"{what}: a chunk held by {key[:40]!r}, not another rank of the job")
    for c in m.chunks:
        if c.codec != CODEC_RAW or c.stored_nbytes != c.nbytes or c.at != c.offset:
            raise CorruptCheckpointError(
                f"{what}: a memory chunk must be raw at its own offset (chunk at {c.offset}: "
                f"{c.codec}, {c.stored_nbytes} of {c.nbytes} bytes at {c.at})"
            )
    if capacity is not None and m.total_bytes > capacity:
        raise CorruptCheckpointError(f"{what}: {m.total_bytes} bytes do not fit the slot ({capacity})")
    return next(iter(slots), SLOT_NAMES[0])


def carried(m: Manifest) -> list[ChunkEntry]:
    """The chunks of a memory manifest held in its own slot (all of them for a snapshot held
    whole): what a mirror push or fetch sends of it."""
    return [c for c in m.chunks if c.key in SLOT_NAMES]


def part_holders(m: Manifest) -> dict[str, list[ChunkEntry]]:
    """The chunks of a memory manifest that other ranks of the node hold, by their shard name
    (empty for a snapshot held whole in its slot).  ``m`` passed
    ``check_memory_manifest(parts=True)``."""
    out: dict[str, list[ChunkEntry]] = {}
    for c in m.chunks:
        if c.key not in SLOT_NAMES:
            out.setdefault(c.key, []).append(c)
    return out


def _decode_tensor(t: Any, total: int, what: str) -> TensorEntry:
    if not isinstance(t, list) or len(t) != 3:
        raise CorruptCheckpointError(f"{what}: bad tensor entry")
    name, shape, offset = t
    if not isinstance(name, str) or name not in DTYPES:
        raise CorruptCheckpointError(f"{what}: unknown dtype {str(name)[:40]!r}")
    if (
        not isinstance(shape, list)
        or len(shape) > MAX_NDIM
        or not all(type(d) is int and 0 <= d <= MAX_TOTAL_BYTES for d in shape)
    ):
        raise CorruptCheckpointError(f"{what}: bad tensor shape")
    dtype = DTYPES[name]
    if shape_extent(dtype.itemsize, shape) > MAX_TOTAL_BYTES:  # zero-size ones included
        raise CorruptCheckpointError(f"{what}: tensor shape over the size limit")
    nbytes = tensor_nbytes(dtype, shape)
    if type(offset) is not int or offset < 0 or offset + nbytes > total:
        raise CorruptCheckpointError(f"{what}: tensor bytes outside the shard")
    if offset % max(1, dtype.itemsize):
        raise CorruptCheckpointError(f"{what}: tensor offset not aligned to its element size")
    return TensorEntry(dtype, tuple(shape), offset, nbytes)


def _decode_chunk(
    c: Any, total: int, what: str, check_key: Callable[[str], str], allow_unsealed: bool
) -> ChunkEntry:
    if not isinstance(c, list) or len(c) != 7:
        raise CorruptCheckpointError(f"{what}: bad chunk entry")
    key, at, offset, nbytes, stored, codec, digest = c
    try:
        key = check_key(key)
    except ValueError as exc:
        raise CorruptCheckpointError(f"{what}: unsafe chunk name {str(key)[:80]!r}") from exc
    ints = (at, offset, nbytes, stored)
    if not all(type(v) is int and 0 <= v <= MAX_TOTAL_BYTES for v in ints):
        raise CorruptCheckpointError(f"{what}: bad chunk sizes")
    if offset + nbytes > total or not isinstance(codec, str) or not CODEC_PATTERN.fullmatch(codec):
        raise CorruptCheckpointError(f"{what}: chunk outside the shard or unknown codec")
    if codec == CODEC_RAW and stored != nbytes:
        raise CorruptCheckpointError(f"{what}: raw chunk with stored size != size")
    if codec != CODEC_RAW and (nbytes == 0 or nbytes % _codec_group(codec)):
        # the writer byte-groups only whole elements, and stores empty chunks raw
        raise CorruptCheckpointError(f"{what}: a {codec} chunk of {nbytes} bytes")
    if stored > nbytes + (nbytes >> 7) + 4096:  # zstd never expands by more than this
        raise CorruptCheckpointError(f"{what}: chunk stored larger than any codec produces")
    if not isinstance(digest, str) or not (
        re.fullmatch(r"[0-9a-f]{32}", digest) or (allow_unsealed and digest == UNSEALED)
    ):
        raise CorruptCheckpointError(f"{what}: bad chunk checksum")
    return ChunkEntry(key, at, offset, nbytes, stored, codec, digest)


def _codec_group(codec: str) -> int:
    """The byte-group size of a codec id that matches :data:`CODEC_PATTERN` (1: none)."""
    return int(codec[7]) if codec.startswith("zstd-bg") else 1


def _check_coverage(tensors: tuple[TensorEntry, ...], chunks: list[ChunkEntry], what: str) -> None:
    """Every tensor byte must lie inside chunks (a manifest cannot point outside its data)."""
    spans: list[list[int]] = []
    for c in chunks:
        if spans and c.offset == spans[-1][1]:
            spans[-1][1] = c.offset + c.nbytes
        elif c.nbytes:
            spans.append([c.offset, c.offset + c.nbytes])
    starts = [s[0] for s in spans]
    for t in tensors:
        if t.nbytes == 0:
            continue
        i = bisect.bisect_right(starts, t.offset) - 1
        if i < 0 or t.offset + t.nbytes > spans[i][1]:
            raise CorruptCheckpointError(f"{what}: tensor bytes not covered by any chunk")
