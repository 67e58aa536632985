"""The on-storage format: manifests, commit records, the state tree, and storage keys.

Everything read from storage passes through :func:`decode_manifest` or :func:`decode_commit`,
which validate every field against hard limits before anything else trusts it.  Nothing here
unpickles: the state tree is JSON with a small tag vocabulary.  See ``docs/format.md``.

Pure functions and frozen dataclasses only; safe to call from any thread.
"""

from __future__ import annotations

import base64
import bisect
import dataclasses
import itertools
import json
import math
import numbers
import re
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import torch
import xxhash

from flashckpt.errors import CorruptCheckpointError

FORMAT_VERSION = 1
MANIFEST_FORMAT = "flashckpt.manifest"
COMMIT_FORMAT = "flashckpt.commit"
CODEC_RAW = "raw/1"
#: Codec ids with their versions: ``raw/1``, ``zstd/1`` and byte-grouped ``zstd-bg{2,4,8}/1``.
CODEC_PATTERN = re.compile(r"(raw|zstd|zstd-bg[248])/1")
#: Checksum of a chunk in a memory-tier manifest written at the end of the staging copy,
#: before the background thread has checksummed it ("sealed" it).
UNSEALED = ""

# Hard parser limits: a manifest that exceeds any of them is rejected before use.
MAX_RECORD_BYTES = 1 << 30
MAX_TENSORS = 10_000_000
MAX_CHUNKS = 10_000_000
MAX_NDIM = 64
MAX_TOTAL_BYTES = 1 << 50
MAX_TREE_DEPTH = 100
MAX_STEP = 10**12 - 1
MAX_WORLD = 1 << 20
MAX_GENERATION = 1 << 62
#: Branch points a record keeps (its timeline's ancestry, nearest first); older ones drop off.
MAX_ANCESTORS = 32
#: Ints in a state tree: at most this many bits (about 2,400 decimal digits; JSON readers
#: refuse ints beyond 4,300 digits, and no training state needs more).
MAX_INT_BITS = 8000
#: ``created_unix`` is a JSON int or float in ``[0, 2**53]`` (seconds; every int in range
#: converts to a float exactly, and the bound keeps ``float()`` of it from overflowing).
MAX_CREATED_UNIX = 1 << 53
#: Cells of a DTensor's device mesh (the product of its dimensions): at most the world size.
MAX_MESH_CELLS = MAX_WORLD
#: The slot files of a memory tier (and of a mirror held for a peer).
SLOT_NAMES = ("slot-0.bin", "slot-1.bin")
_RUN_ID = re.compile(r"[0-9a-f]{1,64}")

_TRAILER = b"\n#xxh3_128:"
_TRAILER_LEN = len(_TRAILER) + 32 + 1

# Every dtype CPU PyTorch can store and copy, by a stable name.
_DTYPE_NAMES = [
    "float64",
    "float32",
    "float16",
    "bfloat16",
    "float8_e4m3fn",
    "float8_e4m3fnuz",
    "float8_e5m2",
    "float8_e5m2fnuz",
    "float8_e8m0fnu",
    "float4_e2m1fn_x2",
    "complex128",
    "complex64",
    "complex32",
    "int64",
    "int32",
    "int16",
    "int8",
    "uint64",
    "uint32",
    "uint16",
    "uint8",
    "bool",
    "bits8",
    "bits16",
    "bits1x8",
    "bits2x4",
    "bits4x2",
]
DTYPES: dict[str, torch.dtype] = {
    n: getattr(torch, n) for n in _DTYPE_NAMES if isinstance(getattr(torch, n, None), torch.dtype)
}
DTYPE_NAMES: dict[torch.dtype, str] = {v: k for k, v in DTYPES.items()}


def checksum(data: Any) -> str:
    """xxh3-128 of a buffer, as 32 hex digits.  Releases the GIL on large buffers."""
    return xxhash.xxh3_128_hexdigest(data)


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


def parse_memory_manifest_key(key: str) -> int | None:
    m = _MEMORY_MANIFEST_RE.match(key)
    return int(m.group(1)) if m else None


# --------------------------------------------------------------------------------------------
# the state tree: JSON with tags, never pickle


@dataclass(frozen=True)
class TensorRef:
    """A tensor in the state tree: index into the manifest's tensor table."""

    index: int


@dataclass(frozen=True)
class DTensorRef:
    """A DTensor in the state tree: this rank's local shard is tensor ``index``; the rest says
    where the shard sits in the global tensor.  ``placements`` has one entry per mesh
    dimension: ``"S<dim>"`` (sharded along tensor dim ``dim``) or ``"R"`` (replicated)."""

    index: int
    shape: tuple[int, ...]  # the global shape
    offset: tuple[int, ...]  # the global index of the shard's first element
    placements: tuple[str, ...]
    mesh: tuple[int, ...]  # the device mesh's shape


_PLACEMENT = re.compile(r"S([0-9]|[1-5][0-9]|6[0-3])|R")


@dataclass(frozen=True)
class StatefulRecord:
    """An object saved through its ``state_dict()``; ``kind`` is informational only."""

    kind: str
    state: Any


_SCALARS = (str, bool, type(None))


def encode_tree(obj: Any, path: str = "") -> Any:
    """Turn a flattened state (with :class:`TensorRef` leaves) into JSON-able nodes.

    Raises ``TypeError`` naming the path for anything the vocabulary cannot express; the state
    walk turns that into an ``UnsupportedStateError`` before any of it reaches storage.
    """
    if isinstance(obj, _SCALARS):
        return obj
    if isinstance(obj, TensorRef):
        return {"T": "tensor", "i": obj.index}
    if isinstance(obj, DTensorRef):
        return {
            "T": "dtensor",
            "i": obj.index,
            "shape": list(obj.shape),
            "offset": list(obj.offset),
            "placements": list(obj.placements),
            "mesh": list(obj.mesh),
        }
    if isinstance(obj, numbers.Integral):
        v = int(obj)
        if v.bit_length() > MAX_INT_BITS:
            raise TypeError(f"{path or '<root>'}: an int of {v.bit_length()} bits (at most {MAX_INT_BITS})")
        return v
    if isinstance(obj, numbers.Real):
        f = float(obj)
        return f if math.isfinite(f) else {"T": "float", "v": repr(f)}
    if isinstance(obj, StatefulRecord):
        return {"T": "stateful", "kind": obj.kind, "v": encode_tree(obj.state, path)}
    if isinstance(obj, dict):
        node: dict[str, Any] = {
            "T": "dict",
            "k": [encode_key(k, path) for k in obj],
            "v": [encode_tree(v, _join(path, k)) for k, v in obj.items()],
        }
        if isinstance(obj, OrderedDict):
            node["ordered"] = True
        meta = getattr(obj, "_metadata", None)
        if meta is not None:
            node["meta"] = encode_tree(meta, _join(path, "_metadata"))
        return node
    if type(obj) is list:
        return [encode_tree(v, _join(path, i)) for i, v in enumerate(obj)]
    if type(obj) is tuple:
        return {"T": "tuple", "v": [encode_tree(v, _join(path, i)) for i, v in enumerate(obj)]}
    if isinstance(obj, torch.Size):
        return {"T": "size", "v": [int(d) for d in obj]}
    if isinstance(obj, (set, frozenset)) and type(obj) in (set, frozenset):
        tag = "set" if type(obj) is set else "frozenset"
        items = sorted((encode_key(v, path) for v in obj), key=repr)
        return {"T": tag, "v": items}
    if isinstance(obj, (bytes, bytearray)):
        return {"T": "bytes", "v": base64.b64encode(bytes(obj)).decode("ascii")}
    if isinstance(obj, torch.dtype):
        if obj not in DTYPE_NAMES:
            raise TypeError(f"{path}: dtype {obj} has no stable name")
        return {"T": "dtype", "v": DTYPE_NAMES[obj]}
    if isinstance(obj, torch.device):
        return {"T": "device", "v": str(obj)}
    raise TypeError(f"{path or '<root>'}: objects of type {type(obj).__qualname__} are not supported")


def encode_key(k: Any, path: str) -> Any:
    """Dict keys and set members: hashable scalars and tuples of them."""
    if isinstance(k, (str, bool, type(None), numbers.Integral, numbers.Real)):
        return encode_tree(k, path)
    if type(k) is tuple:
        return {"T": "tuple", "v": [encode_key(v, path) for v in k]}
    raise TypeError(f"{path or '<root>'}: dict key {k!r} of type {type(k).__qualname__}")


def _join(path: str, key: Any) -> str:
    return f"{path}.{key}" if path else str(key)


_FLOAT_WORDS = {"nan": math.nan, "inf": math.inf, "-inf": -math.inf}


def decode_tree(node: Any, n_tensors: int, depth: int = 0) -> Any:
    """Validate and decode a tree read from storage.  Raises ``CorruptCheckpointError``."""
    if depth > MAX_TREE_DEPTH:
        raise CorruptCheckpointError("state tree nested too deeply")
    if isinstance(node, float) and not math.isfinite(node):  # JSON's 1e400; the writer tags these
        raise CorruptCheckpointError("a non-finite number outside a float node")
    if type(node) is int and node.bit_length() > MAX_INT_BITS:  # the writer refuses these
        raise CorruptCheckpointError(f"an int of {node.bit_length()} bits in the state tree")
    if node is None or isinstance(node, (bool, int, float, str)):
        return node
    if isinstance(node, list):
        return [decode_tree(v, n_tensors, depth + 1) for v in node]
    if not isinstance(node, dict):
        raise CorruptCheckpointError(f"bad state tree node of type {type(node).__name__}")
    tag = node.get("T")
    v = node.get("v")
    if tag == "tensor":
        i = node.get("i")
        if type(i) is not int or not 0 <= i < n_tensors:
            raise CorruptCheckpointError(f"tensor reference {i!r} out of range")
        return TensorRef(i)
    if tag == "dtensor":
        return _decode_dtensor(node, n_tensors)
    if tag == "dict":
        keys, vals = node.get("k"), v
        if not isinstance(keys, list) or not isinstance(vals, list) or len(keys) != len(vals):
            raise CorruptCheckpointError("bad dict node")
        items = [
            (_hashable(decode_tree(k, 0, depth + 1)), decode_tree(x, n_tensors, depth + 1))
            for k, x in zip(keys, vals, strict=True)
        ]
        meta = node.get("meta")
        if meta is not None:
            # What nn.Module.state_dict returns: an OrderedDict carrying ``_metadata``.
            out: dict[Any, Any] = OrderedDict(items)
            out._metadata = decode_tree(meta, 0, depth + 1)  # type: ignore[attr-defined]
            return out
        return OrderedDict(items) if node.get("ordered") is True else dict(items)
    if tag == "tuple":
        return tuple(decode_tree(x, n_tensors, depth + 1) for x in _list(v))
    if tag == "stateful":
        kind = node.get("kind")
        if not isinstance(kind, str):
            raise CorruptCheckpointError("bad stateful node")
        return StatefulRecord(kind, decode_tree(v, n_tensors, depth + 1))
    if tag == "float" and isinstance(v, str) and v in _FLOAT_WORDS:
        return _FLOAT_WORDS[v]
    if tag == "size":
        dims = _list(v)
        if len(dims) > MAX_NDIM or not all(type(d) is int and 0 <= d <= MAX_TOTAL_BYTES for d in dims):
            raise CorruptCheckpointError("bad torch.Size node")
        return torch.Size(dims)
    if tag in ("set", "frozenset"):
        items = [_hashable(decode_tree(x, 0, depth + 1)) for x in _list(v)]
        return set(items) if tag == "set" else frozenset(items)
    if tag == "bytes" and isinstance(v, str):
        try:
            return base64.b64decode(v.encode("ascii"), validate=True)
        except ValueError as exc:
            raise CorruptCheckpointError("bad bytes node") from exc
    if tag == "dtype" and isinstance(v, str) and v in DTYPES:
        return DTYPES[v]
    if tag == "device" and isinstance(v, str):
        try:
            return torch.device(v)
        except RuntimeError as exc:
            raise CorruptCheckpointError(f"bad device {v!r}") from exc
    raise CorruptCheckpointError(f"unknown state tree node {str(tag)[:40]!r}")


def _decode_dtensor(node: dict[str, Any], n_tensors: int) -> DTensorRef:
    i = node.get("i")
    if type(i) is not int or not 0 <= i < n_tensors:
        raise CorruptCheckpointError(f"tensor reference {i!r} out of range")

    def ints(name: str, lo: int, hi: int, most: int) -> tuple[int, ...]:
        v = node.get(name)
        if not isinstance(v, list) or len(v) > most or not all(type(d) is int and lo <= d <= hi for d in v):
            raise CorruptCheckpointError(f"bad dtensor node: {name}")
        return tuple(v)

    shape = ints("shape", 0, MAX_TOTAL_BYTES, MAX_NDIM)
    offset = ints("offset", 0, MAX_TOTAL_BYTES, MAX_NDIM)
    mesh = ints("mesh", 1, MAX_WORLD, 8)
    placements = node.get("placements")
    if (
        len(offset) != len(shape)
        or not isinstance(placements, list)
        or len(placements) != len(mesh)
        or not all(isinstance(p, str) and _PLACEMENT.fullmatch(p) for p in placements)
        or any(p != "R" and int(p[1:]) >= len(shape) for p in placements)
        or any(o > d for o, d in zip(offset, shape, strict=True))
        or math.prod(mesh) > MAX_MESH_CELLS
    ):
        raise CorruptCheckpointError("bad dtensor node")
    return DTensorRef(i, shape, offset, tuple(placements), mesh)


def shape_extent(itemsize: int, shape: Iterable[int]) -> int:
    """Bytes spanned by a C-contiguous tensor of ``shape`` if every 0 dimension were 1.

    This bounds the strides torch computes for the shape (the largest is the product of the
    trailing dimensions, each counted as at least 1), so a zero-size tensor of dims near
    2**50 cannot overflow them; for a tensor with elements it is its size in bytes.
    """
    n = itemsize
    for d in shape:
        n *= max(d, 1)
    return n


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


def _list(v: Any) -> list[Any]:
    if not isinstance(v, list):
        raise CorruptCheckpointError("expected a list in the state tree")
    return v


def _hashable(k: Any) -> Any:
    try:
        hash(k)
    except TypeError as exc:
        raise CorruptCheckpointError("unhashable dict key in state tree") from exc
    return k


# --------------------------------------------------------------------------------------------
# manifests


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


def tensor_nbytes(dtype: torch.dtype, shape: Iterable[int]) -> int:
    n = dtype.itemsize
    for d in shape:
        n *= d
    return n


def encode_record(body: dict[str, Any]) -> bytes:
    """JSON body + a trailer line with the body's xxh3-128, so truncation is always detected."""
    data = json.dumps(body, separators=(",", ":"), allow_nan=False).encode("utf-8")
    return data + _TRAILER + checksum(data).encode("ascii") + b"\n"


def decode_record(raw: bytes, what: str) -> dict[str, Any]:
    if len(raw) > MAX_RECORD_BYTES:
        raise CorruptCheckpointError(f"{what}: record of {len(raw)} bytes is over the limit")
    if len(raw) < _TRAILER_LEN or raw[-_TRAILER_LEN:-33] != _TRAILER or raw[-1:] != b"\n":
        raise CorruptCheckpointError(f"{what}: truncated record (no checksum trailer)")
    body, digest = raw[:-_TRAILER_LEN], raw[-33:-1]
    if checksum(body).encode("ascii") != digest:
        raise CorruptCheckpointError(f"{what}: record checksum mismatch")
    try:
        obj = json.loads(body, parse_constant=_reject_constant, parse_float=_finite_float)
    except (ValueError, RecursionError) as exc:
        raise CorruptCheckpointError(f"{what}: not valid JSON") from exc
    if not isinstance(obj, dict):
        raise CorruptCheckpointError(f"{what}: record is not an object")
    return obj


def _reject_constant(name: str) -> None:
    raise ValueError(f"non-finite constant {name} in record")


def _finite_float(text: str) -> float:
    """JSON numbers with a fraction or exponent: ``1e400`` is valid JSON, but Python reads it
    as ``inf``, which no writer produces (they tag non-finite floats in the state tree)."""
    v = float(text)
    if not math.isfinite(v):
        raise ValueError(f"non-finite number {text[:40]} in record")
    return v


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


def _time(obj: dict[str, Any], what: str) -> float:
    """``created_unix``: a JSON int or float in ``[0, MAX_CREATED_UNIX]``.  The comparisons are
    exact for ints of any size and false for NaN, so nothing here can overflow (``float()``
    of a 400-digit int would)."""
    v: Any = obj.get("created_unix")
    if type(v) not in (int, float) or not 0 <= v <= MAX_CREATED_UNIX:
        raise CorruptCheckpointError(f"{what}: bad created_unix {str(v)[:40]}")
    return float(v)


def _int(obj: dict[str, Any], name: str, lo: int, hi: int) -> int:
    v = obj.get(name)
    if type(v) is not int or not lo <= v <= hi:
        raise CorruptCheckpointError(f"manifest field {name!r} invalid: {str(v)[:40]}")
    return v


def _check_header(obj: dict[str, Any], fmt: str, what: str) -> None:
    if obj.get("format") != fmt:
        raise CorruptCheckpointError(f"{what}: not a {fmt} record")
    version = obj.get("version")
    if type(version) is not int or version > FORMAT_VERSION or version < 1:
        raise CorruptCheckpointError(
            f"{what}: format version {version!r} (this flashckpt reads <= {FORMAT_VERSION})"
        )


def decode_manifest(
    raw: bytes, what: str = "manifest", *, check_key: Callable[[str], str], allow_unsealed: bool = False
) -> Manifest:
    """Parse and validate a manifest.  ``check_key`` validates chunk object names.

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


def memory_manifest(m: Manifest, slot: str) -> Manifest:
    """``m`` as the memory tier describes it: every chunk in slot file ``slot`` at the shard's
    own offsets, raw.  What a slot holds is always the decoded bytes, whatever tier they were
    read from (a storage tier's codecs and stored sizes describe that tier's objects only)."""
    return m.with_chunks(
        ChunkEntry(slot, c.offset, c.offset, c.nbytes, c.nbytes, CODEC_RAW, c.checksum) for c in m.chunks
    )


def check_memory_manifest(m: Manifest, what: str, *, capacity: int | None = None) -> str:
    """The one validator of memory-tier and mirror manifests; returns the slot file named.

    A memory manifest describes one slot's bytes: every chunk in the same slot file
    (:data:`SLOT_NAMES`), raw, stored at its own offset with stored size == size, and the
    shard fits the slot's ``capacity`` (when the slot is mapped).  Raises
    :class:`CorruptCheckpointError`.  Used everywhere such a manifest is read or written."""
    keys = {c.key for c in m.chunks}
    if len(keys) > 1 or not keys <= set(SLOT_NAMES):
        raise CorruptCheckpointError(f"{what}: chunks must all lie in one slot file, not {sorted(keys)[:3]}")
    for c in m.chunks:
        if c.codec != CODEC_RAW or c.stored_nbytes != c.nbytes or c.at != c.offset:
            raise CorruptCheckpointError(
                f"{what}: a memory chunk must be raw at its own offset (chunk at {c.offset}: "
                f"{c.codec}, {c.stored_nbytes} of {c.nbytes} bytes at {c.at})"
            )
    if capacity is not None and m.total_bytes > capacity:
        raise CorruptCheckpointError(f"{what}: {m.total_bytes} bytes do not fit the slot ({capacity})")
    return next(iter(keys), SLOT_NAMES[0])


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


# --------------------------------------------------------------------------------------------
# commit records


@dataclass(frozen=True)
class CommitRecord:
    """A step is committed on a tier if and only if this record exists there."""

    step: int
    world_size: int
    created_unix: float
    manifests: tuple[tuple[str, int, str], ...]  # (key, bytes, checksum)
    #: ``"job"``: the tier holds every shard (``world_size`` manifests); ``"rank"``: a tier
    #: private to one rank (a node-local disk in a multi-rank job) holds that rank's only.
    scope: str = "job"
    generation: int = 0  # see Manifest.generation
    run: str = ""  # see Manifest.run
    ancestors: tuple[tuple[int, int], ...] = ()  # see Manifest.ancestors

    @property
    def order(self) -> tuple[int, int]:
        return (self.generation, self.step)


def encode_commit(c: CommitRecord) -> bytes:
    body = {
        "format": COMMIT_FORMAT,
        "version": FORMAT_VERSION,
        "step": c.step,
        "world_size": c.world_size,
        "created_unix": c.created_unix,
        "manifests": [list(m) for m in c.manifests],
    }
    if c.scope != "job":
        body["scope"] = c.scope
    body.update(_lineage(c.generation, run=c.run, ancestors=c.ancestors))
    return encode_record(body)


def decode_commit(
    raw: bytes, what: str = "commit record", *, check_key: Callable[[str], str]
) -> CommitRecord:
    obj = decode_record(raw, what)
    _check_header(obj, COMMIT_FORMAT, what)
    step = _int(obj, "step", 0, MAX_STEP)
    world = _int(obj, "world_size", 1, MAX_WORLD)
    created = _time(obj, what)
    scope = obj.get("scope", "job")
    if scope not in ("job", "rank"):
        raise CorruptCheckpointError(f"{what}: unknown scope")
    ms = obj.get("manifests")
    if not isinstance(ms, list) or len(ms) != (world if scope == "job" else 1):
        raise CorruptCheckpointError(f"{what}: bad manifest list")
    out = []
    for m in ms:
        if not (isinstance(m, list) and len(m) == 3 and isinstance(m[0], str)):
            raise CorruptCheckpointError(f"{what}: bad manifest entry")
        key, size, digest = m
        try:
            check_key(key)
        except ValueError as exc:
            raise CorruptCheckpointError(f"{what}: unsafe manifest name") from exc
        if (
            type(size) is not int
            or not 0 < size <= MAX_RECORD_BYTES
            or not isinstance(digest, str)
            or not re.fullmatch(r"[0-9a-f]{32}", digest)
        ):
            raise CorruptCheckpointError(f"{what}: bad manifest entry")
        out.append((key, size, digest))
    gen, _storage, run, ancestors = _decode_lineage(obj, what)
    return CommitRecord(step, world, created, tuple(out), scope, gen, run, ancestors)


# --------------------------------------------------------------------------------------------
# the run record

#: The key of the storage tier's run record: the id of the run whose steps the tier holds,
#: written once, before the tier's first commit.  Memory tiers of another run are never
#: restored from (see Manifest.run).
RUN_KEY = "run"
RUN_FORMAT = "flashckpt.run"


def encode_run(run: str) -> bytes:
    if not _RUN_ID.fullmatch(run):
        raise ValueError(f"bad run id {run!r}")
    return encode_record({"format": RUN_FORMAT, "version": FORMAT_VERSION, "run": run, "created_unix": now()})


def decode_run(raw: bytes, what: str = "run record") -> str:
    obj = decode_record(raw, what)
    _check_header(obj, RUN_FORMAT, what)
    _time(obj, what)
    run = obj.get("run")
    if not isinstance(run, str) or not _RUN_ID.fullmatch(run):
        raise CorruptCheckpointError(f"{what}: bad run id")
    return run


def now() -> float:
    return time.time()
