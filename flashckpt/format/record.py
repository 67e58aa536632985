"""The framing every record shares: a JSON body and a checksum trailer, the format version,
the hard parser limits, and the small validators the manifest and commit decoders use.

Pure functions and constants only (no I/O); imports nothing else of the format.
"""

from __future__ import annotations

import json
import math
import time
from typing import Any

import xxhash

from flashckpt.errors import CorruptCheckpointError

FORMAT_VERSION = 1

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

_TRAILER = b"\n#xxh3_128:"
_TRAILER_LEN = len(_TRAILER) + 32 + 1


def checksum(data: Any) -> str:
    """xxh3-128 of a buffer, as 32 hex digits.  Releases the GIL on large buffers."""
    return xxhash.xxh3_128_hexdigest(data)


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


def now() -> float:
    return time.time()
