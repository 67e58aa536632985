"""A step of a real POSIX tier, as JSON bodies and chunk objects to rewrite.

Tests (and ``generate.py``) save a few steps with a real ``Checkpointer``, open the newest
one with :class:`Step`, make it hostile (edit the manifest or commit bodies, add chunk
objects in any codec, turn it into a two-rank DTensor step) and :meth:`Step.write` it back
with a commit record that matches, so that only validation can stop it.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import zstandard

from flashckpt.format import (
    CODEC_RAW,
    CommitRecord,
    checksum,
    chunk_key,
    commit_key,
    encode_commit,
    encode_record,
    manifest_key,
)
from flashckpt.transfer.codec import decode

Body = dict[str, Any]
_TRAILER = b"\n#xxh3_128:"


def state_for(step: int) -> dict[str, Any]:
    """The state every hostile tree saves at ``step``: small tensors (one packed chunk) and values."""
    g = torch.Generator().manual_seed(step)
    return {
        "w": torch.randn(64, 32, generator=g),
        "b": torch.randn(32, generator=g),
        "idx": torch.randint(0, 100, (7,), generator=g),
        "extra": {"step": step, "name": f"s{step}"},
    }


def assert_state(got: dict[str, Any], want: dict[str, Any]) -> None:
    """Bitwise equality of two states of :func:`state_for`'s shape."""
    assert got.keys() == want.keys()
    for k, v in want.items():
        if isinstance(v, torch.Tensor):
            assert got[k].dtype == v.dtype and torch.equal(got[k], v), k
        else:
            assert got[k] == v, k


def body_of(raw: bytes) -> Body:
    """The JSON body of a record (its trailer dropped, not checked)."""
    out: Body = json.loads(raw[: raw.rindex(_TRAILER)])
    return out


def with_trailer(body: bytes) -> bytes:
    """Any bytes with a valid checksum trailer, so that only their content can be refused."""
    return body + _TRAILER + checksum(body).encode("ascii") + b"\n"


def encode_as(data: bytes, codec: str) -> bytes:
    """``data`` stored with ``codec`` exactly as the writer does (byte planes, then one zstd
    frame), whether or not it shrinks, and whatever its length (a hostile ``zstd-bg`` chunk
    whose size is not a multiple of the group is split into planes of the longest length that
    is; the rest is appended)."""
    if codec == CODEC_RAW:
        return data
    group = int(codec[len("zstd-bg")]) if codec.startswith("zstd-bg") else 1
    src = data
    if group > 1:
        whole = len(data) - len(data) % group
        planes = np.frombuffer(data[:whole], dtype=np.uint8).reshape(-1, group).T
        src = np.ascontiguousarray(planes).tobytes() + data[whole:]
    return zstandard.ZstdCompressor(level=1, write_content_size=True).compress(src)


def tree_index(body: Body, key: str) -> int:
    """Position of top-level ``key`` in a manifest's state tree (a dict node)."""
    keys: list[Any] = body["tree"]["k"]
    return keys.index(key)


def tensor_of(body: Body, key: str) -> int:
    """The tensor-table index of the top-level tensor ``key``."""
    node = body["tree"]["v"][tree_index(body, key)]
    assert node["T"] in ("tensor", "dtensor"), node
    i: int = node["i"]
    return i


class Step:
    """Step ``step`` of the POSIX tier at ``root``: the commit body, each rank's manifest body
    and the shard bytes (read through the chunks, which must be intact when opened)."""

    def __init__(self, root: Path, step: int) -> None:
        self.root, self.step = root, step
        self.commit: Body = body_of((root / commit_key(step)).read_bytes())
        self.manifests: list[Body] = [body_of((root / m[0]).read_bytes()) for m in self.commit["manifests"]]
        self._old_keys = [m[0] for m in self.commit["manifests"]]
        #: Byte-level edits of a rank's encoded manifest (truncation, a bad trailer, ...).
        self.manifest_edits: dict[int, Callable[[bytes], bytes]] = {}
        #: Edits of the commit record's body, made after :meth:`write` fills in the manifests.
        self.commit_edits: list[Callable[[Body], None]] = []
        #: A byte-level edit of the encoded commit record.
        self.commit_bytes_edit: Callable[[bytes], bytes] | None = None

    # -- bytes ---------------------------------------------------------------------------------
    def shard(self, rank: int = 0) -> bytes:
        """The shard's bytes, decoded from its chunk objects (gaps are zeros)."""
        body = self.manifests[rank]
        out = bytearray(body["total_bytes"])
        for key, at, offset, nbytes, stored, codec, _digest in body["chunks"]:
            with open(self.root / key, "rb") as f:
                f.seek(at)
                data = f.read(stored)
            decode(codec, data, memoryview(out)[offset : offset + nbytes])
        return bytes(out)

    def put_chunk(self, data: bytes, codec: str, *, stored: bytes | None = None) -> tuple[str, int]:
        """Write ``data`` as a chunk object in ``codec`` (or the given ``stored`` bytes under its
        name); returns ``(key, stored_nbytes)``."""
        blob = encode_as(data, codec) if stored is None else stored
        key = chunk_key(checksum(data), codec)
        path = self.root / key
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(blob)
        return key, len(blob)

    def one_chunk(self, rank: int, data: bytes, codec: str, *, stored: bytes | None = None) -> None:
        """Replace rank's chunk table by one chunk holding ``data`` (``total_bytes`` follows)."""
        key, n = self.put_chunk(data, codec, stored=stored)
        body = self.manifests[rank]
        body["chunks"] = [[key, 0, 0, len(data), n, codec, checksum(data)]]
        body["total_bytes"] = len(data)

    # -- shapes ----------------------------------------------------------------------------------
    def as_two_ranks(self, key: str = "w") -> None:
        """Make this a step of two ranks whose top-level tensor ``key`` is a DTensor sharded
        along dim 0 (each rank's local shard holds the saved tensor's bytes: the global tensor
        is two copies of it, one above the other).  Everything else is the same on both."""
        base = self.manifests[0]
        i = tensor_of(base, key)
        local = base["tensors"][i][1]
        self.manifests = []
        for rank in range(2):
            body = copy.deepcopy(base)
            body["rank"], body["world_size"] = rank, 2
            body["tree"]["v"][tree_index(body, key)] = {
                "T": "dtensor",
                "i": i,
                "shape": [2 * local[0], *local[1:]],
                "offset": [rank * local[0]] + [0] * (len(local) - 1),
                "placements": ["S0"],
                "mesh": [2],
            }
            self.manifests.append(body)

    def dtensor(self, rank: int, key: str = "w") -> Body:
        """The DTensor node of top-level ``key`` in rank's tree (see :meth:`as_two_ranks`)."""
        node: Body = self.manifests[rank]["tree"]["v"][tree_index(self.manifests[rank], key)]
        return node

    # -- writing ---------------------------------------------------------------------------------
    def manifest_bytes(self, rank: int) -> bytes:
        """Rank's manifest as :meth:`write` writes it."""
        raw = encode_record(self.manifests[rank])
        edit = self.manifest_edits.get(rank)
        return raw if edit is None else edit(raw)

    def commit_bytes(self) -> bytes:
        """The commit record :meth:`write` writes: it lists every rank's manifest (at the key a
        reader looks for it, whatever its body claims) with its true size and checksum."""
        world = len(self.manifests)
        entries = []
        for rank in range(world):
            raw = self.manifest_bytes(rank)
            entries.append((manifest_key(self.step, rank, world), len(raw), checksum(raw)))
        # the same place on the run's timeline as the step it replaces (docs/format.md)
        lineage = {"generation": self.commit.get("generation", 0), "run": self.commit.get("run", "")}
        record = CommitRecord(self.step, world, self.commit["created_unix"], tuple(entries), **lineage)
        body = body_of(encode_commit(record))
        for edit in self.commit_edits:
            edit(body)
        raw = encode_record(body)
        return raw if self.commit_bytes_edit is None else self.commit_bytes_edit(raw)

    def write(self) -> None:
        """Replace the step on disk: every manifest, then the commit record."""
        for key in self._old_keys:
            (self.root / key).unlink(missing_ok=True)
        world = len(self.manifests)
        for rank in range(world):
            path = self.root / manifest_key(self.step, rank, world)
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(self.manifest_bytes(rank))
        (self.root / commit_key(self.step)).write_bytes(self.commit_bytes())


def saved_tree(tmp_path_factory: pytest.TempPathFactory, name: str) -> Path:
    """Steps 0, 1 and 2 of :func:`state_for` saved by a real Checkpointer (one rank): the
    base a module's hostile cases start from (copy it per test)."""
    import shutil
    import uuid

    import flashckpt
    from tests.conftest import SHM

    root = tmp_path_factory.mktemp(name) / "storage"
    memory = (SHM or tmp_path_factory.getbasetemp()) / f"flashckpt-test-{uuid.uuid4().hex[:12]}"
    try:
        with flashckpt.Checkpointer(root, memory_dir=memory, keep=None) as ckpt:
            for step in range(3):
                ckpt.save(step, state_for(step))
    finally:
        shutil.rmtree(memory, ignore_errors=True)
    return root
