"""Hostile and broken on-storage records: every one must raise ``CorruptCheckpointError``.

The decoders are the trust boundary of flashckpt: whatever bytes storage returns, they either
produce a manifest / commit record that is safe to act on, or raise ``CorruptCheckpointError``
(never another exception type, never a hang, never a huge allocation).  The end-to-end tests
corrupt a real checkpoint directory and check that restore and load fall back to the next
older intact step.
"""

from __future__ import annotations

import json
import logging
import os
import random
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

import flashckpt
from flashckpt import format as fmt
from flashckpt.format import (
    CODEC_RAW,
    ChunkEntry,
    CommitRecord,
    Manifest,
    TensorEntry,
    checksum,
    commit_key,
    decode_commit,
    decode_manifest,
    decode_record,
    decode_tree,
    encode_commit,
    encode_manifest,
    encode_record,
    manifest_key,
)
from flashckpt.format.keys import MAX_KEY_CHARS, check_key
from tests.conftest import chunk_paths, set_format_limit

HEX = "0123456789abcdef" * 2
CHUNK0 = "steps/000000000007/r00000-of-00001/000000"
CHUNK1 = "steps/000000000007/r00000-of-00001/000001"


def _tree(n: int) -> dict[str, Any]:
    return {"T": "dict", "k": [f"t{i}" for i in range(n)], "v": [{"T": "tensor", "i": i} for i in range(n)]}


def _valid_manifest() -> Manifest:
    """A small valid shard: a 4x4 float32 tensor in chunk 0 (bytes [0, 1024)), then a gap, then
    an int64 scalar in chunk 1 (bytes [8192, 8200)), and an empty tensor at the very end."""
    return Manifest(
        step=7,
        rank=0,
        world_size=1,
        node="node-a",
        created_unix=1_700_000_000.5,
        total_bytes=8200,
        tensors=(
            TensorEntry(torch.float32, (4, 4), 0, 64),
            TensorEntry(torch.int64, (), 8192, 8),
            TensorEntry(torch.uint8, (0,), 8200, 0),
        ),
        chunks=(
            ChunkEntry(CHUNK0, 0, 0, 1024, 1024, CODEC_RAW, HEX),
            ChunkEntry(CHUNK1, 0, 8192, 8, 8, CODEC_RAW, HEX),
        ),
        tree=_tree(3),
    )


def _body() -> dict[str, Any]:
    """The JSON body of the valid manifest, as a dict to mutate."""
    raw = encode_manifest(_valid_manifest())
    return json.loads(raw[: raw.rindex(b"\n#xxh3_128:")])


def _body_bytes() -> bytes:
    return json.dumps(_body(), separators=(",", ":")).encode()


def _with_trailer(body: bytes) -> bytes:
    """Any bytes with a valid checksum trailer (so only the content can be rejected)."""
    return body + b"\n#xxh3_128:" + checksum(body).encode("ascii") + b"\n"


def _decode(raw: bytes) -> Manifest:
    return decode_manifest(raw, "test manifest")


def _decode_c(raw: bytes) -> CommitRecord:
    return decode_commit(raw, "test commit")


def test_valid_manifest_round_trips() -> None:
    m = _valid_manifest()
    assert _decode(encode_manifest(m)) == m
    assert _decode(encode_record(_body())) == m
    assert m.state_tree()["t1"] == fmt.TensorRef(1)


# --------------------------------------------------------------------------------------------
# truncation and bit flips: the trailer catches them


def test_truncated_at_every_cut_point() -> None:
    raw = encode_manifest(_valid_manifest())
    for cut in range(len(raw)):
        with pytest.raises(flashckpt.CorruptCheckpointError):
            _decode(raw[:cut])


def test_flipped_byte_anywhere() -> None:
    raw = encode_manifest(_valid_manifest())
    for pos in range(len(raw)):
        for bit in (0x01, 0x80):
            bad = bytearray(raw)
            bad[pos] ^= bit
            with pytest.raises(flashckpt.CorruptCheckpointError):
                _decode(bytes(bad))


def test_real_saved_manifest_truncated_and_flipped(dirs: dict[str, Path]) -> None:
    state = {"w": torch.randn(300, 300), "b": torch.arange(10), "extra": {"epoch": 3, "name": "x"}}
    with flashckpt.Checkpointer(dirs["storage"], memory_dir=dirs["memory"]) as ckpt:
        ckpt.save(3, state).wait()  # type: ignore[union-attr]
    raw = (dirs["storage"] / manifest_key(3, 0, 1)).read_bytes()
    m = _decode(raw)
    assert m.step == 3 and len(m.tensors) == 2
    for cut in [*range(0, len(raw), 7), len(raw) - 1, len(raw) - 2, len(raw) - 34]:
        with pytest.raises(flashckpt.CorruptCheckpointError):
            _decode(raw[:cut])
    for pos in range(0, len(raw), 5):
        bad = bytearray(raw)
        bad[pos] ^= 0x20
        with pytest.raises(flashckpt.CorruptCheckpointError):
            _decode(bytes(bad))
    raw_c = (dirs["storage"] / commit_key(3)).read_bytes()
    assert _decode_c(raw_c).step == 3
    for cut in range(len(raw_c)):
        with pytest.raises(flashckpt.CorruptCheckpointError):
            _decode_c(raw_c[:cut])


@pytest.mark.parametrize(
    "raw",
    [
        pytest.param(b"", id="empty"),
        pytest.param(b"\n#xxh3_128:" + b"0" * 32 + b"\n", id="trailer-only-bad-digest"),
        pytest.param(_with_trailer(b""), id="trailer-only-empty-body"),
        pytest.param(_with_trailer(b"{}")[:-1], id="no-final-newline"),
        pytest.param(_with_trailer(b"{}")[:-1] + b"\r", id="cr-instead-of-newline"),
        pytest.param(
            b"{}" + b"\n#xxh3_128:" + checksum(b"{}").upper().encode() + b"\n", id="uppercase-digest"
        ),
        pytest.param(b"{}" + b"\n#xxh3_64:" + checksum(b"{}").encode() + b"\n", id="wrong-trailer-tag"),
        pytest.param(b"\x00" * 100, id="nul-bytes"),
        pytest.param(random.Random(0).randbytes(4096), id="random-bytes"),
    ],
)
def test_broken_records(raw: bytes) -> None:
    with pytest.raises(flashckpt.CorruptCheckpointError):
        _decode(raw)
    with pytest.raises(flashckpt.CorruptCheckpointError):
        _decode_c(raw)


def test_record_over_size_limit_rejected_before_parsing(monkeypatch: pytest.MonkeyPatch) -> None:
    raw = encode_manifest(_valid_manifest())
    set_format_limit(monkeypatch, "MAX_RECORD_BYTES", len(raw) - 1)
    with pytest.raises(flashckpt.CorruptCheckpointError, match="over the limit"):
        _decode(raw)


# --------------------------------------------------------------------------------------------
# raw JSON-level hostility (valid trailer)


def _nested(depth: int, opener: str, closer: str, leaf: str = "0") -> str:
    return opener * depth + leaf + closer * depth


def _raw_body_with_tree(tree_json: str) -> bytes:
    body = json.dumps({k: v for k, v in _body().items() if k != "tree"})
    return _with_trailer((body[:-1] + ',"tree":' + tree_json + "}").encode())


@pytest.mark.parametrize(
    "raw",
    [
        pytest.param(_with_trailer(b"[1, 2, 3]"), id="json-array"),
        pytest.param(_with_trailer(b'"a string"'), id="json-string"),
        pytest.param(_with_trailer(b"5"), id="json-number"),
        pytest.param(_with_trailer(b"null"), id="json-null"),
        pytest.param(_with_trailer(b"true"), id="json-true"),
        pytest.param(_with_trailer(b'{"format": "flashckpt.manifest", '), id="json-unterminated"),
        pytest.param(_with_trailer(b"\xff\xfe\xfd{}"), id="invalid-utf8-prefix"),
        pytest.param(_with_trailer(b'{"format": "flashckpt.manifest\xc3\x28"}'), id="invalid-utf8-in-string"),
        pytest.param(_with_trailer(b'{"a": "\xed\xa0\x80"}'), id="utf8-encoded-surrogate"),
        pytest.param(_with_trailer(b'{"a": NaN}'), id="nan-constant"),
        pytest.param(_with_trailer(b'{"a": Infinity}'), id="infinity-constant"),
        pytest.param(_with_trailer(b'{"a": -Infinity}'), id="neg-infinity-constant"),
        pytest.param(_raw_body_with_tree("NaN"), id="nan-as-tree"),
        pytest.param(
            _with_trailer(_body_bytes().replace(b'"version":1', b'"version":NaN')),
            id="nan-as-version",
        ),
        pytest.param(_with_trailer(b'{"a": ' + b"9" * 5000 + b"}"), id="int-with-5000-digits"),
        pytest.param(_with_trailer(_nested(10_000, "[", "]").encode()), id="top-level-depth-10000"),
        pytest.param(_raw_body_with_tree(_nested(10_000, "[", "]")), id="tree-list-depth-10000"),
        pytest.param(_raw_body_with_tree(_nested(100_000, "[", "]")), id="tree-list-depth-100000"),
        pytest.param(
            _raw_body_with_tree(_nested(10_000, '{"T":"tuple","v":[', "]}", "1")), id="tree-tuple-depth-10000"
        ),
        pytest.param(_raw_body_with_tree(_nested(10_000, '{"a":', "}")), id="tree-object-depth-10000"),
        pytest.param(_raw_body_with_tree(_nested(500, "[", "]")), id="tree-list-depth-500"),
        pytest.param(_raw_body_with_tree(_nested(101, "[", "]")), id="tree-list-depth-101"),
        pytest.param(
            _raw_body_with_tree(_nested(150, '{"T":"stateful","kind":"x","v":', "}", "1")),
            id="tree-stateful-depth-150",
        ),
        pytest.param(
            _raw_body_with_tree(_nested(150, '{"T":"dict","k":["a"],"v":[', "]}", "1")),
            id="tree-dict-depth-150",
        ),
        pytest.param(
            _raw_body_with_tree(
                '{"T":"dict","k":[' + _nested(150, '{"T":"tuple","v":[', "]}") + '],"v":[1]}'
            ),
            id="tree-dict-key-depth-150",
        ),
    ],
)
def test_hostile_json(raw: bytes) -> None:
    with pytest.raises(flashckpt.CorruptCheckpointError):
        _decode(raw)


def test_depth_limit_is_not_off_by_much() -> None:
    # nesting well below the limit is fine; the limit itself is enforced
    ok = _decode(_raw_body_with_tree(_nested(90, "[", "]")))
    node = ok.state_tree()
    for _ in range(90):
        assert isinstance(node, list) and len(node) == 1
        node = node[0]
    assert node == 0


# --------------------------------------------------------------------------------------------
# manifest bodies with a valid trailer but hostile content

Mutation = Callable[[dict[str, Any]], None]


def _set(path: tuple[Any, ...], value: Any) -> Mutation:
    def mutate(body: dict[str, Any]) -> None:
        obj: Any = body
        for p in path[:-1]:
            obj = obj[p]
        obj[path[-1]] = value

    return mutate


def _delete(name: str) -> Mutation:
    return lambda body: body.pop(name)


def _chunk_key(key: Any) -> Mutation:
    return _set(("chunks", 0, 0), key)


def _tree_is(tree: Any) -> Mutation:
    return _set(("tree",), tree)


def _many(*ms: Mutation) -> Mutation:
    def mutate(body: dict[str, Any]) -> None:
        for m in ms:
            m(body)

    return mutate


def _only_tensor(entry: list[Any], total: int = 8200) -> Mutation:
    return _many(_set(("tensors",), [entry]), _set(("total_bytes",), total), _tree_is(_tree(1)))


MANIFEST_CASES: list[Any] = [
    # header
    pytest.param(_set(("version",), 2), id="version-from-the-future"),
    pytest.param(_set(("version",), 0), id="version-0"),
    pytest.param(_set(("version",), -1), id="version-negative"),
    pytest.param(_set(("version",), "1"), id="version-str"),
    pytest.param(_set(("version",), 1.0), id="version-float"),
    pytest.param(_set(("version",), True), id="version-bool"),
    pytest.param(_set(("version",), None), id="version-null"),
    pytest.param(_delete("version"), id="version-missing"),
    pytest.param(_set(("format",), "flashckpt.commit"), id="format-commit"),
    pytest.param(_set(("format",), "FLASHCKPT.MANIFEST"), id="format-case"),
    pytest.param(_set(("format",), ["flashckpt.manifest"]), id="format-list"),
    pytest.param(_delete("format"), id="format-missing"),
    # integer fields: ranges and exact types (bool is an int in Python)
    pytest.param(_set(("step",), -1), id="step-negative"),
    pytest.param(_set(("step",), 10**12), id="step-too-big"),
    pytest.param(_set(("step",), 7.0), id="step-float"),
    pytest.param(_set(("step",), True), id="step-bool"),
    pytest.param(_set(("step",), "7"), id="step-str"),
    pytest.param(_delete("step"), id="step-missing"),
    pytest.param(_set(("rank",), 1), id="rank-not-below-world"),
    pytest.param(_set(("rank",), -1), id="rank-negative"),
    pytest.param(_set(("rank",), False), id="rank-bool"),
    pytest.param(_set(("world_size",), 0), id="world-0"),
    pytest.param(_set(("world_size",), (1 << 20) + 1), id="world-too-big"),
    pytest.param(_set(("world_size",), True), id="world-bool"),
    pytest.param(_set(("world_size",), 1.0), id="world-float"),
    pytest.param(_set(("total_bytes",), -1), id="total-negative"),
    pytest.param(_set(("total_bytes",), (1 << 50) + 1), id="total-over-limit"),
    pytest.param(_set(("total_bytes",), 2**64), id="total-2**64"),
    pytest.param(_set(("total_bytes",), 8200.0), id="total-float"),
    pytest.param(_set(("total_bytes",), True), id="total-bool"),
    pytest.param(_set(("total_bytes",), "8200"), id="total-str"),
    pytest.param(_set(("total_bytes",), None), id="total-null"),
    pytest.param(_set(("node",), 5), id="node-int"),
    pytest.param(_set(("node",), "n" * 256), id="node-too-long"),
    pytest.param(_set(("node",), None), id="node-null"),
    pytest.param(_set(("created_unix",), "yesterday"), id="created-str"),
    pytest.param(_set(("created_unix",), None), id="created-null"),
    pytest.param(_delete("created_unix"), id="created-missing"),
    # tables
    pytest.param(_set(("tensors",), {"0": ["float32", [4, 4], 0]}), id="tensors-object"),
    pytest.param(_set(("tensors",), None), id="tensors-null"),
    pytest.param(_delete("tensors"), id="tensors-missing"),
    pytest.param(_set(("chunks",), "chunk"), id="chunks-str"),
    pytest.param(_delete("chunks"), id="chunks-missing"),
    # tensor entries
    pytest.param(_set(("tensors", 0), ["float32", [4, 4]]), id="tensor-entry-short"),
    pytest.param(_set(("tensors", 0), ["float32", [4, 4], 0, 0]), id="tensor-entry-long"),
    pytest.param(_set(("tensors", 0), {"dtype": "float32"}), id="tensor-entry-object"),
    pytest.param(_set(("tensors", 0), "float32"), id="tensor-entry-str"),
    pytest.param(_set(("tensors", 0, 0), "float128"), id="dtype-unknown"),
    pytest.param(_set(("tensors", 0, 0), "torch.float32"), id="dtype-qualified"),
    pytest.param(_set(("tensors", 0, 0), "qint8"), id="dtype-quantized"),
    pytest.param(_set(("tensors", 0, 0), 6), id="dtype-int"),
    pytest.param(_set(("tensors", 0, 0), None), id="dtype-null"),
    pytest.param(_set(("tensors", 0, 0), ["float32"]), id="dtype-list"),
    pytest.param(_set(("tensors", 0, 0), {"a": 1}), id="dtype-object"),
    pytest.param(_set(("tensors", 0, 1), [2**40, 2**40]), id="shape-2**40-squared"),
    pytest.param(_set(("tensors", 0, 1), [1] * 1000), id="shape-ndim-1000"),
    pytest.param(_set(("tensors", 0, 1), [1] * 65), id="shape-ndim-65"),
    pytest.param(_set(("tensors", 0, 1), [4, -4]), id="shape-negative"),
    pytest.param(_set(("tensors", 0, 1), [-1]), id="shape-minus-one"),
    pytest.param(_set(("tensors", 0, 1), [4.0, 4]), id="shape-float"),
    pytest.param(_set(("tensors", 0, 1), [True, 16]), id="shape-bool"),
    pytest.param(_set(("tensors", 0, 1), ["4", "4"]), id="shape-str-dims"),
    pytest.param(_set(("tensors", 0, 1), "4x4"), id="shape-str"),
    pytest.param(_set(("tensors", 0, 1), None), id="shape-null"),
    pytest.param(_set(("tensors", 0, 1), [[4], [4]]), id="shape-nested"),
    pytest.param(_set(("tensors", 0, 1), [0, 2**60]), id="shape-zero-times-huge"),
    pytest.param(_set(("tensors", 0, 1), [5000]), id="tensor-end-beyond-total"),
    pytest.param(_set(("tensors", 0, 2), 8200), id="tensor-offset-at-total"),
    pytest.param(_set(("tensors", 0, 2), 2**70), id="tensor-offset-huge"),
    pytest.param(_set(("tensors", 0, 2), -4), id="offset-negative"),
    pytest.param(_set(("tensors", 0, 2), 0.0), id="offset-float"),
    pytest.param(_set(("tensors", 0, 2), False), id="offset-bool"),
    pytest.param(_set(("tensors", 0, 2), None), id="offset-null"),
    pytest.param(_set(("tensors", 2, 2), 8201), id="empty-tensor-beyond-total"),
    pytest.param(_set(("tensors", 0, 1), [257]), id="tensor-spills-into-gap"),
    pytest.param(_set(("tensors", 0, 2), 1000), id="tensor-straddles-chunk-end"),
    pytest.param(_set(("tensors", 0, 2), 4096), id="tensor-inside-gap"),
    pytest.param(_set(("tensors", 1, 2), 8188), id="tensor-starts-in-gap"),
    pytest.param(_only_tensor(["uint8", [10**9], 0], total=10**9), id="1e9-bytes-no-chunk-covers"),
    pytest.param(
        _many(_set(("chunks",), []), _set(("total_bytes",), 10**9), _set(("tensors", 0, 1), [1000, 1000])),
        id="1e9-total-no-chunks",
    ),
    pytest.param(
        _only_tensor(["uint8", [1 << 50], 0], total=1 << 50),
        id="2**50-tensor-no-chunk-covers",
    ),
    pytest.param(
        _many(_set(("chunks", 0, 3), 32), _set(("chunks", 0, 4), 32)), id="chunk-smaller-than-tensor"
    ),
    # chunk entries
    pytest.param(_set(("chunks", 0), [CHUNK0, 0, 0, 4096, 4096, CODEC_RAW]), id="chunk-entry-short"),
    pytest.param(_set(("chunks", 0), {"key": CHUNK0}), id="chunk-entry-object"),
    pytest.param(_set(("chunks", 1, 2), 1000), id="chunks-overlap"),
    pytest.param(_set(("chunks", 1), [CHUNK1, 0, 0, 1024, 1024, CODEC_RAW, HEX]), id="chunks-same-range"),
    pytest.param(_many(_set(("chunks", 0, 3), 8193), _set(("chunks", 0, 4), 8193)), id="chunk-overlaps-next"),
    pytest.param(_set(("chunks", 1, 2), 8196), id="chunk-beyond-total"),
    pytest.param(_set(("chunks", 1, 2), 2**70), id="chunk-offset-huge"),
    pytest.param(_set(("chunks", 0, 1), -1), id="chunk-at-negative"),
    pytest.param(_set(("chunks", 0, 1), 0.5), id="chunk-at-float"),
    pytest.param(_set(("chunks", 0, 1), (1 << 50) + 1), id="chunk-at-huge"),
    pytest.param(_set(("chunks", 0, 2), True), id="chunk-offset-bool"),
    pytest.param(_set(("chunks", 0, 3), -4096), id="chunk-size-negative"),
    pytest.param(_set(("chunks", 0, 3), 1024.0), id="chunk-size-float"),
    pytest.param(_set(("chunks", 0, 4), 1023), id="raw-chunk-stored-differs"),
    pytest.param(_set(("chunks", 0, 4), None), id="chunk-stored-null"),
    pytest.param(_set(("chunks", 0, 5), "lz4/1"), id="codec-unknown"),
    pytest.param(_set(("chunks", 0, 5), "zstd/2"), id="codec-future-version"),
    pytest.param(_set(("chunks", 0, 5), "RAW/1"), id="codec-case"),
    pytest.param(_set(("chunks", 0, 5), None), id="codec-null"),
    pytest.param(_set(("chunks", 0, 5), ["raw/1"]), id="codec-list"),
    pytest.param(_set(("chunks", 0, 6), "not-a-checksum"), id="checksum-garbage"),
    pytest.param(_set(("chunks", 0, 6), HEX.upper()), id="checksum-uppercase"),
    pytest.param(_set(("chunks", 0, 6), HEX[:-1]), id="checksum-31-digits"),
    pytest.param(_set(("chunks", 0, 6), HEX + "0"), id="checksum-33-digits"),
    pytest.param(_set(("chunks", 0, 6), HEX[:-1] + "\n"), id="checksum-trailing-newline"),
    pytest.param(_set(("chunks", 0, 6), ""), id="checksum-empty"),
    pytest.param(_set(("chunks", 0, 6), 12345), id="checksum-int"),
    pytest.param(_set(("chunks", 0, 6), None), id="checksum-null"),
    # chunk names: must never reach outside the checkpoint root
    pytest.param(_chunk_key("steps/../../../../etc/passwd"), id="key-dotdot"),
    pytest.param(_chunk_key(".."), id="key-only-dotdot"),
    pytest.param(_chunk_key("steps/./x"), id="key-dot-segment"),
    pytest.param(_chunk_key("/etc/passwd"), id="key-absolute"),
    pytest.param(_chunk_key("steps//x"), id="key-empty-segment"),
    pytest.param(_chunk_key("steps/x/"), id="key-trailing-slash"),
    pytest.param(_chunk_key("steps\\..\\..\\x"), id="key-backslash"),
    pytest.param(_chunk_key("steps/x\x00y"), id="key-nul"),
    pytest.param(_chunk_key("steps/x\ny"), id="key-inner-newline"),
    pytest.param(_chunk_key("steps/x\n"), id="key-trailing-newline"),
    pytest.param(_chunk_key("~/x"), id="key-tilde"),
    pytest.param(_chunk_key("steps/éx"), id="key-non-ascii"),
    pytest.param(_chunk_key(""), id="key-empty"),
    pytest.param(_chunk_key("a" * 201), id="key-segment-too-long"),
    pytest.param(_chunk_key("/".join(["a" * 100] * 11)), id="key-too-long"),
    pytest.param(_chunk_key(5), id="key-int"),
    pytest.param(_chunk_key(None), id="key-null"),
    pytest.param(_chunk_key(["steps", "x"]), id="key-list"),
    # the state tree
    pytest.param(_tree_is({"T": "pickle", "v": "gASVAAAA"}), id="tree-unknown-tag"),
    pytest.param(_tree_is({"T": None}), id="tree-null-tag"),
    pytest.param(_tree_is({"T": ["dict"]}), id="tree-list-tag"),
    pytest.param(_tree_is({}), id="tree-empty-object"),
    pytest.param(_tree_is({"T": "tensor", "i": 3}), id="tensor-ref-out-of-range"),
    pytest.param(_tree_is({"T": "tensor", "i": -1}), id="tensor-ref-negative"),
    pytest.param(_tree_is({"T": "tensor", "i": 2**70}), id="tensor-ref-huge"),
    pytest.param(_tree_is({"T": "tensor", "i": 0.0}), id="tensor-ref-float"),
    pytest.param(_tree_is({"T": "tensor", "i": True}), id="tensor-ref-bool"),
    pytest.param(_tree_is({"T": "tensor", "i": "0"}), id="tensor-ref-str"),
    pytest.param(_tree_is({"T": "tensor"}), id="tensor-ref-missing"),
    pytest.param(_tree_is({"T": "dict", "k": ["a", "b"], "v": [1]}), id="dict-length-mismatch"),
    pytest.param(_tree_is({"T": "dict", "k": "ab", "v": [1, 2]}), id="dict-keys-str"),
    pytest.param(_tree_is({"T": "dict", "k": ["a"]}), id="dict-values-missing"),
    pytest.param(_tree_is({"T": "dict", "k": [["a"]], "v": [1]}), id="dict-key-list"),
    pytest.param(
        _tree_is({"T": "dict", "k": [{"T": "dict", "k": [], "v": []}], "v": [1]}), id="dict-key-dict"
    ),
    pytest.param(_tree_is({"T": "dict", "k": [{"T": "set", "v": []}], "v": [1]}), id="dict-key-set"),
    pytest.param(
        _tree_is({"T": "dict", "k": [{"T": "tuple", "v": [[1]]}], "v": [1]}), id="dict-key-tuple-list"
    ),
    pytest.param(_tree_is({"T": "dict", "k": [{"T": "tensor", "i": 0}], "v": [1]}), id="dict-key-tensor"),
    pytest.param(
        _tree_is({"T": "dict", "k": [], "v": [], "meta": {"T": "tensor", "i": 0}}), id="meta-tensor"
    ),
    pytest.param(_tree_is({"T": "tuple", "v": "abc"}), id="tuple-str"),
    pytest.param(_tree_is({"T": "tuple"}), id="tuple-missing"),
    pytest.param(_tree_is({"T": "set", "v": [[1]]}), id="set-of-list"),
    pytest.param(_tree_is({"T": "frozenset", "v": {"a": 1}}), id="frozenset-object"),
    pytest.param(_tree_is({"T": "set", "v": [{"T": "tensor", "i": 0}]}), id="set-of-tensor"),
    pytest.param(_tree_is({"T": "stateful", "kind": 5, "v": {}}), id="stateful-kind-int"),
    pytest.param(_tree_is({"T": "stateful", "v": {}}), id="stateful-kind-missing"),
    pytest.param(_tree_is({"T": "float", "v": "NaN"}), id="float-word-case"),
    pytest.param(_tree_is({"T": "float", "v": "1e999"}), id="float-word-other"),
    pytest.param(_tree_is({"T": "float", "v": 1.5}), id="float-word-number"),
    pytest.param(_tree_is({"T": "size", "v": [2, -1]}), id="size-negative"),
    pytest.param(_tree_is({"T": "size", "v": [2.0]}), id="size-float"),
    pytest.param(_tree_is({"T": "size", "v": [True]}), id="size-bool"),
    pytest.param(_tree_is({"T": "size", "v": "23"}), id="size-str"),
    pytest.param(_tree_is({"T": "size", "v": [2**100]}), id="size-2**100"),
    pytest.param(_tree_is({"T": "size", "v": [2**63]}), id="size-2**63"),
    pytest.param(_tree_is({"T": "bytes", "v": "not base64!"}), id="bytes-bad-base64"),
    pytest.param(_tree_is({"T": "bytes", "v": "aé=="}), id="bytes-non-ascii"),
    pytest.param(_tree_is({"T": "bytes", "v": "abc"}), id="bytes-bad-padding"),
    pytest.param(_tree_is({"T": "bytes", "v": [1, 2]}), id="bytes-list"),
    pytest.param(_tree_is({"T": "dtype", "v": "float128"}), id="dtype-node-unknown"),
    pytest.param(_tree_is({"T": "dtype", "v": None}), id="dtype-node-null"),
    pytest.param(_tree_is({"T": "dtype", "v": ["float32"]}), id="dtype-node-list"),
    pytest.param(_tree_is({"T": "device", "v": "xyz:0"}), id="device-unknown"),
    pytest.param(_tree_is({"T": "device", "v": ""}), id="device-empty"),
    pytest.param(_tree_is({"T": "device", "v": "cpu\x00"}), id="device-nul"),
    pytest.param(_tree_is({"T": "device", "v": "cuda:-1"}), id="device-negative-index"),
    pytest.param(_tree_is({"T": "device", "v": "cuda:" + "9" * 30}), id="device-huge-index"),
    pytest.param(_tree_is({"T": "device", "v": 0}), id="device-int"),
    # reliability-2026-11 M5, H1, L9: accepted by the decoder, then a bare error in restore/load
    pytest.param(_set(("created_unix",), 10**400), id="created-400-digit-int"),
    pytest.param(_set(("created_unix",), 2**53 + 1), id="created-over-2**53"),
    pytest.param(_set(("created_unix",), -0.5), id="created-negative"),
    pytest.param(_set(("created_unix",), False), id="created-bool"),
    pytest.param(_many(_set(("chunks", 0, 3), 1023), _set(("chunks", 0, 5), "zstd-bg2/1")), id="bg2-odd"),
    pytest.param(
        _many(_set(("chunks", 0, 3), 1022), _set(("chunks", 0, 5), "zstd-bg4/1")), id="bg4-not-mult"
    ),
    pytest.param(
        _many(_set(("chunks", 0, 3), 1020), _set(("chunks", 0, 5), "zstd-bg8/1")), id="bg8-not-mult"
    ),
    pytest.param(
        _many(_set(("chunks", 1, 3), 0), _set(("chunks", 1, 5), "zstd/1"), _set(("total_bytes",), 8192)),
        id="zstd-chunk-of-0-bytes",
    ),
    pytest.param(_set(("tensors", 2, 1), [0, 1 << 50, 1 << 50]), id="zero-size-dims-2**50"),
    pytest.param(_set(("tensors", 2, 1), [1 << 40, 1 << 40, 0]), id="zero-size-strides-over-int64"),
    pytest.param(_set(("tensors", 2, 1), [0, 1 << 49, 4]), id="zero-size-extent-over-limit"),
    pytest.param(_tree_is(10**3000), id="tree-int-over-8000-bits"),
    pytest.param(_tree_is({"T": "tuple", "v": [-(10**3000)]}), id="tree-negative-int-over-8000-bits"),
]


def _dtensor_tree(**fields: Any) -> Mutation:
    """Tensor 0 (4x4 float32) as the shard of a DTensor; ``fields`` override the valid node."""
    node = {"T": "dtensor", "i": 0, "shape": [8, 4], "offset": [4, 0], "placements": ["S0"], "mesh": [2]}
    return _tree_is({"T": "dict", "k": ["w"], "v": [{**node, **fields}]})


DTENSOR_CASES: list[Any] = [
    pytest.param(_dtensor_tree(shape=[8, 4, 1], offset=[4, 0, 0]), id="global-ndim-above-local"),
    pytest.param(_dtensor_tree(shape=[32], offset=[16]), id="global-ndim-below-local"),
    pytest.param(_dtensor_tree(offset=[5, 0]), id="shard-past-global-end"),
    pytest.param(_dtensor_tree(shape=[8, 3]), id="shard-wider-than-global"),
    pytest.param(_dtensor_tree(shape=[1 << 25, 1 << 25], offset=[0, 0]), id="global-over-2**50-bytes"),
    pytest.param(_dtensor_tree(shape=[1 << 50, 1 << 50], offset=[0, 0]), id="global-over-int64"),
    pytest.param(_dtensor_tree(mesh=[1 << 20, 2], placements=["S0", "R"]), id="mesh-cells-over-world"),
    pytest.param(
        _tree_is(
            {
                "T": "stateful",
                "kind": "x",
                "v": [
                    {"T": "dtensor", "i": 0, "shape": [4], "offset": [0], "placements": ["R"], "mesh": [1]}
                ],
            }
        ),
        id="nested-in-stateful-list",
    ),
]


@pytest.mark.parametrize("mutate", DTENSOR_CASES)
def test_dtensor_must_fit_its_local_tensor(mutate: Mutation) -> None:
    body = _body()
    mutate(body)
    with pytest.raises(flashckpt.CorruptCheckpointError):
        _decode(encode_record(body))


def test_valid_dtensors_and_limits_are_accepted() -> None:
    """The new checks are not off by one: what the writer can produce still decodes."""
    for fields in ({}, {"offset": [0, 0], "shape": [4, 4], "mesh": [1]}, {"shape": [8, 4], "offset": [4, 0]}):
        body = _body()
        _dtensor_tree(**fields)(body)
        assert isinstance(_decode(encode_record(body)).state_tree()["w"], fmt.DTensorRef)
    body = _body()
    body["created_unix"] = 2**53
    body["tensors"][2][1] = [0, 1 << 48, 4]  # 2**50 bytes of extent: at the limit
    body["chunks"][0][3:6] = [1024, 900, "zstd-bg8/1"]
    body["tree"] = {"T": "tuple", "v": [2**7999, -(2**7999), 1.5e308]}
    m = _decode(encode_record(body))
    assert m.created_unix == 2.0**53 and m.chunks[0].codec == "zstd-bg8/1"


@pytest.mark.parametrize("where", ["created_unix", "tree", "version", "step", "chunk-size"])
@pytest.mark.parametrize("text", ["1e400", "-1e400", "1E999", "1234567890e300"])
def test_non_finite_json_numbers_are_refused_anywhere(where: str, text: str) -> None:
    """docs/format.md: JSON numbers that Python reads as inf are refused wherever they are."""
    body = _body()
    target = {
        "created_unix": ("created_unix",),
        "tree": ("tree",),
        "version": ("version",),
        "step": ("step",),
        "chunk-size": ("chunks", 0, 3),
    }[where]
    _set(target, "@n@")(body)
    raw = _with_trailer(json.dumps(body, separators=(",", ":")).replace('"@n@"', text).encode())
    with pytest.raises(flashckpt.CorruptCheckpointError):
        _decode(raw)
    commit = _commit_body()
    commit["created_unix"] = "@n@"
    raw = _with_trailer(json.dumps(commit).replace('"@n@"', text).encode())
    with pytest.raises(flashckpt.CorruptCheckpointError):
        _decode_c(raw)


@pytest.mark.parametrize("mutate", MANIFEST_CASES)
def test_hostile_manifest(mutate: Mutation) -> None:
    body = _body()
    mutate(body)
    raw = encode_record(body)
    with pytest.raises(flashckpt.CorruptCheckpointError):
        _decode(raw)


def test_mutations_start_from_a_valid_body() -> None:
    # guard against the table passing only because the base body is already invalid
    assert _decode(encode_record(_body())) == _valid_manifest()
    assert _decode(_raw_body_with_tree(json.dumps(_tree(3)))) == _valid_manifest()


def test_table_counts_over_limit(monkeypatch: pytest.MonkeyPatch) -> None:
    raw = encode_manifest(_valid_manifest())
    set_format_limit(monkeypatch, "MAX_TENSORS", 2)
    with pytest.raises(flashckpt.CorruptCheckpointError, match="tensor table"):
        _decode(raw)
    set_format_limit(monkeypatch, "MAX_TENSORS", 3)
    set_format_limit(monkeypatch, "MAX_CHUNKS", 1)
    with pytest.raises(flashckpt.CorruptCheckpointError, match="chunk table"):
        _decode(raw)


def test_huge_counts_do_not_allocate() -> None:
    """Limits are checked on the numbers, before anything is sized from them."""
    body = _body()
    body["total_bytes"] = 1 << 50
    body["tensors"] = [["float64", [1 << 20, 1 << 20, 1 << 20], 0]]
    body["tree"] = _tree(1)
    with pytest.raises(flashckpt.CorruptCheckpointError):
        _decode(encode_record(body))
    # a lone valid tensor of 2**50 bytes would need a chunk covering it
    body["tensors"] = [["uint8", [1 << 50], 0]]
    with pytest.raises(flashckpt.CorruptCheckpointError):
        _decode(encode_record(body))


def test_decode_tree_rejects_deep_nesting_without_recursion_error() -> None:
    node: Any = 1
    for _ in range(10_000):
        node = {"T": "tuple", "v": [node]}
    with pytest.raises(flashckpt.CorruptCheckpointError):
        decode_tree(node, 0)
    node = 1
    for _ in range(10_000):
        node = [node]
    with pytest.raises(flashckpt.CorruptCheckpointError):
        decode_tree(node, 0)


# --------------------------------------------------------------------------------------------
# commit records


def _commit_body() -> dict[str, Any]:
    rec = CommitRecord(7, 1, 1_700_000_000.0, ((manifest_key(7, 0, 1), 1234, HEX),))
    raw = encode_commit(rec)
    assert _decode_c(raw) == rec
    return json.loads(raw[: raw.rindex(b"\n#xxh3_128:")])


def _manifest_name(name: Any) -> Mutation:
    return _set(("manifests", 0, 0), name)


COMMIT_CASES: list[Any] = [
    pytest.param(_set(("version",), 2), id="version-from-the-future"),
    pytest.param(_set(("version",), True), id="version-bool"),
    pytest.param(_set(("format",), "flashckpt.manifest"), id="format-manifest"),
    pytest.param(_delete("format"), id="format-missing"),
    pytest.param(_set(("step",), -1), id="step-negative"),
    pytest.param(_set(("step",), True), id="step-bool"),
    pytest.param(_set(("step",), 7.0), id="step-float"),
    pytest.param(_set(("world_size",), 0), id="world-0"),
    pytest.param(_set(("world_size",), 2), id="world-2-with-one-manifest"),
    pytest.param(_set(("world_size",), True), id="world-bool"),
    pytest.param(_set(("world_size",), 2**40), id="world-huge"),
    pytest.param(_set(("manifests",), []), id="no-manifests"),
    pytest.param(
        lambda b: b["manifests"].append([manifest_key(7, 0, 1), 10, HEX]), id="two-manifests-world-1"
    ),
    pytest.param(_set(("manifests",), None), id="manifests-null"),
    pytest.param(_set(("manifests",), {"a": 1}), id="manifests-object"),
    pytest.param(_set(("manifests", 0), "steps/x.manifest"), id="manifest-entry-str"),
    pytest.param(_set(("manifests", 0), [manifest_key(7, 0, 1), 10]), id="manifest-entry-short"),
    pytest.param(_set(("manifests", 0), [manifest_key(7, 0, 1), 10, HEX, 0]), id="manifest-entry-long"),
    pytest.param(_manifest_name("../../etc/passwd"), id="name-dotdot"),
    pytest.param(_manifest_name("/etc/passwd"), id="name-absolute"),
    pytest.param(_manifest_name("steps//x.manifest"), id="name-empty-segment"),
    pytest.param(_manifest_name("steps\\x.manifest"), id="name-backslash"),
    pytest.param(_manifest_name("steps/x\x00.manifest"), id="name-nul"),
    pytest.param(_manifest_name(""), id="name-empty"),
    pytest.param(_manifest_name(7), id="name-int"),
    pytest.param(_manifest_name(None), id="name-null"),
    pytest.param(_set(("manifests", 0, 1), 0), id="size-0"),
    pytest.param(_set(("manifests", 0, 1), -5), id="size-negative"),
    pytest.param(_set(("manifests", 0, 1), (1 << 30) + 1), id="size-over-record-limit"),
    pytest.param(_set(("manifests", 0, 1), 2**70), id="size-huge"),
    pytest.param(_set(("manifests", 0, 1), 12.0), id="size-float"),
    pytest.param(_set(("manifests", 0, 1), True), id="size-bool"),
    pytest.param(_set(("manifests", 0, 1), "12"), id="size-str"),
    pytest.param(_set(("manifests", 0, 2), None), id="digest-null"),
    pytest.param(_set(("manifests", 0, 2), 5), id="digest-int"),
    pytest.param(_set(("created_unix",), "now"), id="created-str"),
    pytest.param(_delete("created_unix"), id="created-missing"),
    pytest.param(_set(("created_unix",), 10**400), id="created-400-digit-int"),  # H1's record trigger
    pytest.param(_set(("created_unix",), -(10**400)), id="created-negative-400-digit-int"),
    pytest.param(_set(("created_unix",), 2**64), id="created-2**64"),
    pytest.param(_set(("created_unix",), True), id="created-bool"),
]


@pytest.mark.parametrize("mutate", COMMIT_CASES)
def test_hostile_commit(mutate: Mutation) -> None:
    body = _commit_body()
    mutate(body)
    with pytest.raises(flashckpt.CorruptCheckpointError):
        _decode_c(encode_record(body))


def test_commit_is_not_a_manifest_and_vice_versa() -> None:
    with pytest.raises(flashckpt.CorruptCheckpointError):
        _decode(encode_record(_commit_body()))
    with pytest.raises(flashckpt.CorruptCheckpointError):
        _decode_c(encode_record(_body()))


def test_decode_record_gives_the_object() -> None:
    assert decode_record(encode_record({"a": [1, 2]}), "x") == {"a": [1, 2]}


# --------------------------------------------------------------------------------------------
# storage keys


GOOD_KEYS = [
    "a",
    "A",
    "_",
    "0",
    "a.b",
    "a-b_c.d",
    "a..b",
    "a.",
    "commits/step-000000000001",
    "steps/000000000001/r00000-of-00001/000000",
    "steps/000000000001/r00000-of-00001.manifest",
    "step-000000000001.manifest",
    "x" * 200,
    "/".join(["x" * 200] * 5),
    "/".join(["a"] * (MAX_KEY_CHARS // 2)),
]

BAD_KEYS: list[Any] = [
    "",
    "/",
    "//",
    "/a",
    "/etc/passwd",
    "a/",
    "a//b",
    ".",
    "..",
    "./a",
    "a/.",
    "a/./b",
    "../a",
    "a/..",
    "a/../b",
    "...",
    ".hidden",
    "-a",
    "a\\b",
    "..\\a",
    "a\x00b",
    "a\x00",
    "a b",
    " a",
    "a\tb",
    "a\nb",
    "\na",
    "a\r",
    "é",
    "a:b",
    "~",
    "a*",
    "a?",
    "x" * 201,
    "/".join(["x" * 200] * 5) + "/" + "y" * 30,
    "a" * (MAX_KEY_CHARS + 1),
    None,
    5,
    b"abc",
    ["a"],
    "a\n",
    "a\n/b",
]


@pytest.mark.parametrize("key", GOOD_KEYS)
def test_check_key_accepts(key: str) -> None:
    assert check_key(key) == key


@pytest.mark.parametrize("key", BAD_KEYS)
def test_check_key_rejects(key: Any) -> None:
    with pytest.raises(ValueError):
        check_key(key)


def test_decoders_check_names_by_default() -> None:
    """``check_key`` is optional: the decoders default to the format's own, the one the
    backends re-export."""
    assert check_key is fmt.keys.check_key is fmt.check_key
    assert decode_manifest(encode_manifest(_valid_manifest())) == _valid_manifest()
    body = _body()
    body["chunks"][0][0] = "../../etc/passwd"
    with pytest.raises(flashckpt.CorruptCheckpointError, match="unsafe chunk name"):
        decode_manifest(encode_record(body))
    commit = _commit_body()
    assert decode_commit(encode_record(commit)).manifests[0][0] == manifest_key(7, 0, 1)
    commit["manifests"][0][0] = "../../etc/passwd"
    with pytest.raises(flashckpt.CorruptCheckpointError, match="unsafe manifest name"):
        decode_commit(encode_record(commit))


# --------------------------------------------------------------------------------------------
# end to end: a corrupt newest step on disk is skipped, the next older one restored


def _state(step: int) -> dict[str, Any]:
    g = torch.Generator().manual_seed(step)
    return {
        "big": torch.randn(512, 1024, generator=g),  # 2 MiB: a chunk of its own
        "small": torch.randn(10, generator=g),
        "idx": torch.randint(0, 100, (7,), generator=g),
        "extra": {"step": step, "name": f"s{step}"},
    }


def _assert_equal(a: dict[str, Any], b: dict[str, Any]) -> None:
    assert a.keys() == b.keys()
    for k in a:
        if isinstance(a[k], torch.Tensor):
            assert torch.equal(a[k], b[k]), k
        else:
            assert a[k] == b[k], k


def _save_three(dirs: dict[str, Path]) -> None:
    with flashckpt.Checkpointer(dirs["storage"], memory_dir=dirs["memory"], keep=3) as ckpt:
        for step in range(3):
            ckpt.save(step, _state(step))
        ckpt.wait()
    # the clean close freed the memory tier: restores below read the disk copies
    assert not (dirs["memory"] / "r00000-of-00001").exists()
    assert sorted(p.name for p in (dirs["storage"] / "commits").iterdir()) == [
        "step-000000000000",
        "step-000000000001",
        "step-000000000002",
    ]


def _chunk(root: Path, step: int, index: int = 0) -> Path:
    return chunk_paths(root, step)[index]


def _flip_chunk(root: Path) -> None:
    path = _chunk(root, 2)
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x04
    path.write_bytes(bytes(data))


def _flip_last_chunk(root: Path) -> None:
    path = _chunk(root, 2, -1)
    data = bytearray(path.read_bytes())
    data[-1] ^= 0x01
    path.write_bytes(bytes(data))


def _truncate_chunk(root: Path) -> None:
    path = _chunk(root, 2)
    os.truncate(path, path.stat().st_size - 1000)


def _empty_chunk(root: Path) -> None:
    os.truncate(_chunk(root, 2), 0)


def _delete_chunk(root: Path) -> None:
    (_chunk(root, 2)).unlink()


def _extend_chunk(root: Path) -> None:
    # extra bytes after the chunk are not read: harmless, so this must NOT make the step unusable
    with open(_chunk(root, 2), "ab") as f:
        f.write(b"junk")


def _rewrite_manifest(root: Path, mutate: Mutation, *, recommit: bool) -> None:
    """Replace step 2's manifest by a hostile one (valid trailer); with ``recommit``, also write
    a commit record that matches it, so the manifest decoder itself must reject it."""
    mpath = root / manifest_key(2, 0, 1)
    raw = mpath.read_bytes()
    body = json.loads(raw[: raw.rindex(b"\n#xxh3_128:")])
    mutate(body)
    new = encode_record(body)
    mpath.write_bytes(new)
    if recommit:
        entries = ((manifest_key(2, 0, 1), len(new), checksum(new)),)
        gen = body.get("generation", 0)  # the same snapshot's place on the timeline
        rec = CommitRecord(2, 1, 1.0, entries, generation=gen if type(gen) is int and gen >= 0 else 0)
        (root / commit_key(2)).write_bytes(encode_commit(rec))


def _hostile_manifest(mutate: Mutation, *, recommit: bool = True) -> Callable[[Path], None]:
    return lambda root: _rewrite_manifest(root, mutate, recommit=recommit)


def _bad_commit(root: Path) -> None:
    path = root / commit_key(2)
    path.write_bytes(path.read_bytes()[:-5])


def _commit_for_other_step(root: Path) -> None:
    raw = (root / commit_key(1)).read_bytes()
    (root / commit_key(2)).write_bytes(raw)


def _manifest_missing(root: Path) -> None:
    (root / manifest_key(2, 0, 1)).unlink()


def _misaligned(body: dict[str, Any]) -> None:
    # the float32 "small" tensor moved one byte: still inside its chunk, but not aligned
    for t in body["tensors"]:
        if t[0] == "float32" and t[1] == [10]:
            t[2] += 1


def _total_huge_no_chunks(body: dict[str, Any]) -> None:
    # passes every per-field check; a reader that sizes a buffer from total_bytes would map 1 PiB
    body["total_bytes"] = 1 << 50
    body["tensors"] = []
    body["chunks"] = []
    body["tree"] = {"T": "dict", "k": [], "v": []}


def _chunk_escapes(body: dict[str, Any]) -> None:
    body["chunks"][0][0] = "../../../../../../etc/passwd"


def _chunk_absolute(body: dict[str, Any]) -> None:
    body["chunks"][0][0] = "/etc/passwd"


def _chunk_other_step(body: dict[str, Any]) -> None:
    # a name that is safe but points at other data (another chunk's object): the checksum
    # must catch it
    others = [c[0] for c in body["chunks"] if c[0] != body["chunks"][0][0]]
    assert others, "the saved state must have at least two distinct chunks"
    body["chunks"][0][0] = others[-1]


def _chunk_is_a_directory(body: dict[str, Any]) -> None:
    body["chunks"][0][0] = "steps/000000000002/r00000-of-00001"


def _tree_unknown_tag(body: dict[str, Any]) -> None:
    body["tree"] = {"T": "pickle", "v": "gASV"}


CORRUPTIONS: list[Any] = [
    pytest.param(_flip_chunk, id="flip-byte-in-big-chunk"),
    pytest.param(_flip_last_chunk, id="flip-byte-in-packed-chunk"),
    pytest.param(_truncate_chunk, id="truncate-chunk"),
    pytest.param(_empty_chunk, id="empty-chunk"),
    pytest.param(_delete_chunk, id="delete-chunk"),
    pytest.param(_bad_commit, id="truncate-commit-record"),
    pytest.param(_commit_for_other_step, id="commit-record-of-other-step"),
    pytest.param(_manifest_missing, id="manifest-missing"),
    pytest.param(_hostile_manifest(_chunk_escapes, recommit=False), id="hostile-manifest-old-commit"),
    pytest.param(_hostile_manifest(_chunk_escapes), id="manifest-chunk-dotdot"),
    pytest.param(_hostile_manifest(_chunk_absolute), id="manifest-chunk-absolute"),
    pytest.param(_hostile_manifest(_chunk_other_step), id="manifest-chunk-of-other-step"),
    pytest.param(_hostile_manifest(_chunk_is_a_directory), id="manifest-chunk-is-a-directory"),
    pytest.param(_hostile_manifest(_tree_unknown_tag), id="manifest-tree-unknown-tag"),
    pytest.param(_hostile_manifest(_set(("version",), 2)), id="manifest-version-2"),
    pytest.param(_hostile_manifest(_set(("step",), 1)), id="manifest-names-other-step"),
    pytest.param(_hostile_manifest(_misaligned), id="manifest-misaligned-tensor"),
    pytest.param(_hostile_manifest(_total_huge_no_chunks), id="manifest-total-1PiB"),
]


@pytest.mark.parametrize("corrupt", CORRUPTIONS)
def test_restore_and_load_skip_a_corrupt_newest_step(
    dirs: dict[str, Path], corrupt: Callable[[Path], None], caplog: pytest.LogCaptureFixture
) -> None:
    _save_three(dirs)
    corrupt(dirs["storage"])
    caplog.set_level(logging.WARNING, logger="flashckpt")

    state = _state(9)
    with flashckpt.Checkpointer(dirs["storage"], memory_dir=dirs["memory"], keep=3) as ckpt:
        assert ckpt.restore(state) == 1
        _assert_equal(state, _state(1))
        assert any("step 2" in r.getMessage() and r.levelno == logging.WARNING for r in caplog.records)
        with pytest.raises(flashckpt.CheckpointNotFound):
            ckpt.restore(_state(9), step=2)
        # the explicit older steps are still fine
        again = _state(9)
        assert ckpt.restore(again, step=0) == 0
        _assert_equal(again, _state(0))

    caplog.clear()
    out = flashckpt.load(dirs["storage"])
    _assert_equal(out, _state(1))
    assert any("step 2" in r.getMessage() and r.levelno == logging.WARNING for r in caplog.records)
    with pytest.raises(flashckpt.CheckpointNotFound):
        flashckpt.load(dirs["storage"], step=2)


def test_harmless_trailing_bytes_in_a_chunk_are_not_corruption(dirs: dict[str, Path]) -> None:
    _save_three(dirs)
    _extend_chunk(dirs["storage"])
    state = _state(9)
    with flashckpt.Checkpointer(dirs["storage"], memory_dir=dirs["memory"], keep=3) as ckpt:
        assert ckpt.restore(state) == 2
    _assert_equal(state, _state(2))
    _assert_equal(flashckpt.load(dirs["storage"]), _state(2))


def test_every_step_corrupt_means_not_found(dirs: dict[str, Path]) -> None:
    _save_three(dirs)
    for step in range(3):
        path = _chunk(dirs["storage"], step)
        data = bytearray(path.read_bytes())
        data[0] ^= 0xFF
        path.write_bytes(bytes(data))
    state = _state(9)
    with flashckpt.Checkpointer(dirs["storage"], memory_dir=dirs["memory"], keep=3) as ckpt:
        assert ckpt.restore(state) is None  # nothing intact: start from scratch
        with pytest.raises(flashckpt.CheckpointNotFound):
            ckpt.restore(state, step=1)
    _assert_equal(state, _state(9))  # untouched
    with pytest.raises(flashckpt.CheckpointNotFound):
        flashckpt.load(dirs["storage"])


def test_hostile_chunk_name_never_touches_files_outside_root(dirs: dict[str, Path]) -> None:
    """A manifest (with a matching commit) naming ``../outside`` must not read that file."""
    _save_three(dirs)
    outside = dirs["storage"].parent / "outside"
    big = _chunk(dirs["storage"], 2)
    outside.write_bytes(big.read_bytes())  # identical bytes: only the name check can stop it
    big.unlink()

    def escape(body: dict[str, Any]) -> None:
        body["chunks"][0][0] = "../outside"

    _rewrite_manifest(dirs["storage"], escape, recommit=True)
    with pytest.raises(flashckpt.CorruptCheckpointError, match="unsafe chunk name"):
        _decode((dirs["storage"] / manifest_key(2, 0, 1)).read_bytes())
    assert flashckpt.load(dirs["storage"])["extra"]["step"] == 1


@pytest.mark.parametrize("step", [0, 7, 10**12 - 1])
@pytest.mark.parametrize(("rank", "world"), [(0, 1), (3, 8), (99999, 99999)])
def test_every_key_parses_back_to_what_named_it(step: int, rank: int, world: int) -> None:
    """The key grammar is written once (format.keys): every name it makes parses back, and
    nothing else does (the engine lists tiers by these parsers: a name they refuse is not
    flashckpt's and is never deleted)."""
    from flashckpt.format import (
        commit_key,
        manifest_key,
        memory_manifest_key,
        parse_commit_key,
        parse_manifest_key,
        parse_memory_manifest_key,
        parse_step_prefix,
        step_prefix,
    )

    assert parse_commit_key(commit_key(step)) == step
    assert parse_step_prefix(step_prefix(step)) == step
    assert parse_manifest_key(manifest_key(step, rank, world)) == (step, rank, world)
    assert parse_memory_manifest_key(memory_manifest_key(step)) == step
    for foreign in (
        commit_key(step) + ".tmp-host-1-2",
        step_prefix(step) + "x/",
        manifest_key(step, rank, world) + ".tmp-host-1-2",
        step_prefix(step) + "notes.manifest",
        "steps/12/r00000-of-00001.manifest",
        "",
    ):
        assert parse_commit_key(foreign) is None
        assert parse_step_prefix(foreign) is None
        assert parse_manifest_key(foreign) is None
        assert parse_memory_manifest_key(foreign) is None
