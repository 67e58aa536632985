"""The state tree: JSON with a small tag vocabulary, never pickle.  :func:`encode_tree` turns
a flattened state into JSON nodes, :func:`decode_tree` validates and decodes them; the dtype
names, and the byte sizes of tensor shapes.

Pure functions and frozen dataclasses only (no I/O); safe to call from any thread.
"""

from __future__ import annotations

import base64
import math
import numbers
import re
from collections import OrderedDict
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import torch

from flashckpt.errors import CorruptCheckpointError
from flashckpt.format.record import (
    MAX_INT_BITS,
    MAX_MESH_CELLS,
    MAX_NDIM,
    MAX_TOTAL_BYTES,
    MAX_TREE_DEPTH,
    MAX_WORLD,
)

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


def tree_leaves(node: Any, path: str = "") -> Iterator[tuple[str, Any]]:
    """``(key, leaf)`` of every leaf of a decoded tree, in order: a :class:`TensorRef`, a
    :class:`DTensorRef` or a plain value; a :class:`StatefulRecord` stands for its state dict.
    Keys join the path with dots, as the state walk names them in its errors."""
    if isinstance(node, (TensorRef, DTensorRef)):
        yield path, node
    elif isinstance(node, StatefulRecord):
        yield from tree_leaves(node.state, path)
    elif isinstance(node, dict):
        for k, v in node.items():
            yield from tree_leaves(v, _join(path, k))
    elif isinstance(node, (list, tuple)) and not isinstance(node, torch.Size):
        for i, v in enumerate(node):
            yield from tree_leaves(v, _join(path, i))
    else:
        yield path, node


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
        return _decode_dict(node, n_tensors, depth)
    if tag == "tuple":
        return tuple(decode_tree(x, n_tensors, depth + 1) for x in _list(v))
    if tag == "stateful":
        kind = node.get("kind")
        if not isinstance(kind, str):
            raise CorruptCheckpointError("bad stateful node")
        return StatefulRecord(kind, decode_tree(v, n_tensors, depth + 1))
    return _decode_tagged_value(tag, v, depth)


def _decode_dict(node: dict[str, Any], n_tensors: int, depth: int) -> dict[Any, Any]:
    """A ``dict`` node: keys and values, ordered (and a module's ``_metadata``) as saved."""
    keys, vals = node.get("k"), node.get("v")
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


def _decode_tagged_value(tag: Any, v: Any, depth: int) -> Any:
    """A tagged plain value (no tensor below it): float words, sizes, sets, bytes, dtypes,
    devices."""
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


def tensor_nbytes(dtype: torch.dtype, shape: Iterable[int]) -> int:
    n = dtype.itemsize
    for d in shape:
        n *= d
    return n
