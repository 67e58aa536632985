"""Named hostile steps: each turns an intact saved step into a hostile one.

A case edits a :class:`~tests.hostile.tree.Step` (its manifest or commit bodies, bytes, chunk
objects).  ``refused_by`` says which check must stop it:

* ``"manifest"``: ``decode_manifest`` of rank ``rank``'s manifest raises
  ``CorruptCheckpointError``;
* ``"commit"``: ``decode_commit`` of the commit record does;
* ``"load"``: every record decodes (the hostility is in the chunk bytes, or in how the shards
  of a multi-rank step disagree), and reading the step raises ``CorruptCheckpointError``.

Cases with ``limit`` run with ``format.MAX_RECORD_BYTES`` lowered to it (an oversized record
without writing a gigabyte).  The M5/H1/L9 cases of reliability-2026-11 are all here.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

from flashckpt.format import checksum
from tests.hostile.tree import Body, Step, tensor_of, tree_index, with_trailer


@dataclass(frozen=True)
class Case:
    name: str
    apply: Callable[[Step], None]
    refused_by: Literal["manifest", "commit", "load"]
    rank: int = 0
    limit: int | None = None


def _set(path: tuple[Any, ...], value: Any, rank: int = 0) -> Callable[[Step], None]:
    """Set one field of rank's manifest body."""

    def apply(s: Step) -> None:
        obj: Any = s.manifests[rank]
        for p in path[:-1]:
            obj = obj[p]
        obj[path[-1]] = value

    return apply


def _commit_set(name: str, value: Any) -> Callable[[Step], None]:
    return lambda s: s.commit_edits.append(lambda body: body.__setitem__(name, value))


def _json_text(body: Body, marker: str, text: str) -> bytes:
    """``body`` as a record in which the string ``marker`` stands for raw JSON ``text`` (a
    number no encoder writes, such as ``1e400``), with a valid trailer."""
    data = json.dumps(body, separators=(",", ":")).replace(json.dumps(marker), text)
    return with_trailer(data.encode())


def _manifest_number(path: tuple[Any, ...], text: str) -> Callable[[Step], None]:
    """Rank 0's manifest with the JSON number ``text`` at ``path`` (e.g. ``1e400``, which
    Python's JSON reader turns into ``inf``)."""

    def apply(s: Step) -> None:
        _set(path, "@number@")(s)
        body = s.manifests[0]
        s.manifest_edits[0] = lambda _raw: _json_text(body, "@number@", text)

    return apply


def _commit_number(name: str, text: str) -> Callable[[Step], None]:
    def apply(s: Step) -> None:
        def edit(raw: bytes) -> bytes:
            body = json.loads(raw[: raw.rindex(b"\n#xxh3_128:")])
            body[name] = "@number@"
            return _json_text(body, "@number@", text)

        s.commit_bytes_edit = edit

    return apply


# -- bytes -------------------------------------------------------------------------------------


def _flip(raw: bytes, pos: int) -> bytes:
    bad = bytearray(raw)
    bad[pos] ^= 0x01
    return bytes(bad)


def _body_flipped(raw: bytes) -> bytes:
    return _flip(raw, len(raw) // 3)  # inside the JSON; the trailer no longer matches


def _digest_flipped(raw: bytes) -> bytes:
    return _flip(raw, len(raw) - 2)  # one hex digit of the trailer: 'b' <-> 'c', '0' <-> '1'


def _half_json(raw: bytes) -> bytes:
    body = raw[: raw.rindex(b"\n#xxh3_128:")]
    return with_trailer(body[: len(body) // 2])  # a torn JSON with a trailer that matches it


def _padded(raw: bytes) -> bytes:
    """The same record padded with JSON whitespace to more than 16 KiB (valid otherwise)."""
    body = raw[: raw.rindex(b"\n#xxh3_128:")]
    return with_trailer(body[:-1] + b" " * (20 << 10) + body[-1:])


def _manifest_bytes(edit: Callable[[bytes], bytes]) -> Callable[[Step], None]:
    return lambda s: s.manifest_edits.__setitem__(0, edit)


def _commit_bytes(edit: Callable[[bytes], bytes]) -> Callable[[Step], None]:
    return lambda s: setattr(s, "commit_bytes_edit", edit)


# -- chunks ------------------------------------------------------------------------------------


def _odd_group_chunk(group: int) -> Callable[[Step], None]:
    """One ``zstd-bg{group}`` chunk whose size is not a multiple of the group: it decompresses
    to the right number of bytes and matches its checksum, but cannot be split into planes."""

    def apply(s: Step) -> None:
        data = s.shard()
        data += b"\0" * ((group // 2 - len(data)) % group)
        assert len(data) % group == group // 2
        s.one_chunk(0, data, f"zstd-bg{group}/1")

    return apply


def zstd_frame(content_size: int, payload: bytes) -> bytes:
    """A zstd frame whose header declares ``content_size`` bytes, holding ``payload`` as one
    raw block.  A decoder that trusts the header allocates ``content_size`` bytes up front."""
    header = b"\x28\xb5\x2f\xfd" + bytes([0xE0]) + struct.pack("<Q", content_size)
    return header + (1 | len(payload) << 3).to_bytes(3, "little") + payload


def _zstd_declares(content_size: int) -> Callable[[Step], None]:
    def apply(s: Step) -> None:
        data = s.shard()
        s.one_chunk(0, data, "zstd/1", stored=zstd_frame(content_size, data[:4]))

    return apply


def _empty_zstd_chunk(s: Step) -> None:
    """An extra zstd chunk of 0 bytes at the end of the shard (the writer stores empty chunks
    raw), whose frame declares a terabyte."""
    body = s.manifests[0]
    key, stored = s.put_chunk(b"", "zstd/1", stored=zstd_frame(1 << 40, b""))
    body["chunks"].append([key, 0, body["total_bytes"], 0, stored, "zstd/1", checksum(b"")])


# -- tensors -----------------------------------------------------------------------------------


def _extra_tensor(dtype: str, shape: list[int]) -> Callable[[Step], None]:
    """A zero-size tensor ``shape`` added to the table and the tree (key ``z``)."""

    def apply(s: Step) -> None:
        body = s.manifests[0]
        body["tensors"].append([dtype, shape, 0])
        body["tree"]["k"].append("z")
        body["tree"]["v"].append({"T": "tensor", "i": len(body["tensors"]) - 1})

    return apply


def _dtensor(rank: int = 0, **fields: Any) -> Callable[[Step], None]:
    """Top-level ``w`` (a 64x32 float32 tensor) as a DTensor node with ``fields`` set; a
    one-rank step's ``w`` first becomes the one shard of a 64x32 DTensor."""

    def apply(s: Step) -> None:
        body = s.manifests[rank]
        node = body["tree"]["v"][tree_index(body, "w")]
        if node["T"] == "tensor":
            node.update(shape=[64, 32], offset=[0, 0], placements=["S0"], mesh=[1], T="dtensor")
        node.update(fields)

    return apply


def _two_ranks(*edits: Callable[[Step], None]) -> Callable[[Step], None]:
    def apply(s: Step) -> None:
        s.as_two_ranks("w")
        for e in edits:
            e(s)

    return apply


def _rank1_dtype(dtype: str) -> Callable[[Step], None]:
    def apply(s: Step) -> None:
        body = s.manifests[1]
        body["tensors"][tensor_of(body, "w")][0] = dtype

    return apply


def _tree_value(value: Any) -> Callable[[Step], None]:
    """``extra.step`` of the tree set to ``value``."""

    def apply(s: Step) -> None:
        body = s.manifests[0]
        extra = body["tree"]["v"][tree_index(body, "extra")]
        extra["v"][extra["k"].index("step")] = value

    return apply


def _tree_number(text: str) -> Callable[[Step], None]:
    def apply(s: Step) -> None:
        _tree_value("@number@")(s)
        body = s.manifests[0]
        s.manifest_edits[0] = lambda _raw: _json_text(body, "@number@", text)

    return apply


BIG = 1 << 50

CASES: list[Case] = [
    # torn, oversized and tampered records
    Case("manifest-truncated", _manifest_bytes(lambda r: r[:-7]), "manifest"),
    Case("manifest-torn-json-with-valid-trailer", _manifest_bytes(_half_json), "manifest"),
    Case("manifest-flipped-byte", _manifest_bytes(_body_flipped), "manifest"),
    Case("manifest-wrong-checksum", _manifest_bytes(_digest_flipped), "manifest"),
    Case("manifest-oversized", _manifest_bytes(_padded), "manifest", limit=16 << 10),
    Case("commit-truncated", _commit_bytes(lambda r: r[:-7]), "commit"),
    Case("commit-torn-json-with-valid-trailer", _commit_bytes(_half_json), "commit"),
    Case("commit-wrong-checksum", _commit_bytes(_digest_flipped), "commit"),
    Case("commit-oversized", _commit_bytes(_padded), "commit", limit=16 << 10),
    # names that would leave the checkpoint's directory
    Case("chunk-name-dotdot", _set(("chunks", 0, 0), "../../../outside"), "manifest"),
    Case("chunk-name-absolute", _set(("chunks", 0, 0), "/etc/passwd"), "manifest"),
    Case("chunk-name-backslash", _set(("chunks", 0, 0), "chunks\\..\\..\\outside"), "manifest"),
    Case("chunk-name-nul", _set(("chunks", 0, 0), "chunks/ab/x\x00y"), "manifest"),
    Case(
        "commit-manifest-name-dotdot",
        lambda s: s.commit_edits.append(lambda b: b["manifests"][0].__setitem__(0, "../x.manifest")),
        "commit",
    ),
    # created_unix (H1's record trigger, M5, L9)
    Case("manifest-created-400-digit-int", _set(("created_unix",), 10**400), "manifest"),
    Case("manifest-created-1e400", _manifest_number(("created_unix",), "1e400"), "manifest"),
    Case("manifest-created-negative", _set(("created_unix",), -1.0), "manifest"),
    Case("manifest-created-bool", _set(("created_unix",), True), "manifest"),
    Case("commit-created-400-digit-int", _commit_set("created_unix", 10**400), "commit"),
    Case("commit-created-1e400", _commit_number("created_unix", "1e400"), "commit"),
    Case("commit-created-2**64", _commit_set("created_unix", 2**64), "commit"),
    # chunk codecs (M5)
    Case("zstd-bg2-odd-size", _odd_group_chunk(2), "manifest"),
    Case("zstd-bg4-size-not-multiple", _odd_group_chunk(4), "manifest"),
    Case("zstd-bg8-size-not-multiple", _odd_group_chunk(8), "manifest"),
    Case("zstd-empty-chunk", _empty_zstd_chunk, "manifest"),
    Case("zstd-frame-declares-1TiB", _zstd_declares(1 << 40), "load"),
    Case("zstd-frame-declares-2**62", _zstd_declares(1 << 62), "load"),
    # shapes (M5): zero-size tensors whose strides overflow, DTensors that do not fit
    Case("zero-size-tensor-dims-2**50", _extra_tensor("float32", [0, BIG, BIG]), "manifest"),
    Case("zero-size-tensor-int64-overflow", _extra_tensor("float64", [1 << 40, 0, 1 << 40]), "manifest"),
    Case("zero-size-tensor-over-limit", _extra_tensor("uint8", [0, BIG, 2]), "manifest"),
    Case("dtensor-ndim-above-tensor", _dtensor(shape=[64, 32, 5], offset=[0, 0, 0]), "manifest"),
    Case("dtensor-ndim-below-tensor", _dtensor(shape=[2048], offset=[0]), "manifest"),
    Case("dtensor-shard-outside-global", _dtensor(shape=[64, 16]), "manifest"),
    Case("dtensor-offset-pushes-shard-out", _dtensor(offset=[1, 0]), "manifest"),
    Case("dtensor-global-over-limit", _dtensor(shape=[1 << 40, 1 << 40]), "manifest"),
    Case("dtensor-mesh-product-huge", _dtensor(mesh=[1 << 20] * 8, placements=["R"] * 8), "manifest"),
    # state tree values (L9 and the int limit)
    Case("tree-bare-1e400", _tree_number("1e400"), "manifest"),
    Case("tree-bare-minus-1e400", _tree_number("-1e400"), "manifest"),
    Case("tree-int-over-8000-bits", _tree_value(10**3000), "manifest"),
    # two-rank DTensor steps whose shards disagree (M5: the reader's IndexError; consolidate's
    # allocation)
    Case(
        "two-ranks-dtensor-ndim-above-tensor",
        _two_ranks(_dtensor(1, shape=[128, 32, 1], offset=[64, 0, 0])),
        "manifest",
        rank=1,
    ),
    Case("two-ranks-global-shapes-differ", _two_ranks(_dtensor(1, shape=[256, 32])), "load"),
    Case("two-ranks-dtypes-differ", _two_ranks(_rank1_dtype("int32")), "load"),
    Case(
        "two-ranks-global-4TiB",
        _two_ranks(_dtensor(0, shape=[1 << 20, 1 << 20]), _dtensor(1, shape=[1 << 20, 1 << 20])),
        "load",
    ),
    Case(
        "two-ranks-global-not-covered",
        _two_ranks(_dtensor(0, shape=[129, 32]), _dtensor(1, shape=[129, 32])),
        "load",
    ),
]
