"""Fuzzing the readers of untrusted storage: records, the state tree, chunk codecs, and
``flashckpt.load`` of whatever the decoders accept.

Valid shards (tensors of every dtype, zero-size ones, gaps, chunks in every codec, stored at
an offset inside their object, one or two ranks with DTensors) and commit records are built
through the real encoders, then mutated structurally (field types and values, huge, negative
and zero numbers, deep nesting, other codecs, overlapping chunks, names with ``..``, absolute
paths, odd characters) and at the byte level (flips, cuts, insertions; with the trailer
recomputed, so the JSON is parsed, and without).  What must hold:

* ``decode_manifest`` / ``decode_commit`` / ``decode_tree`` / ``_codec.decode`` return, or
  raise ``CorruptCheckpointError``: nothing else;
* a step whose records decode is loaded by ``flashckpt.load`` from a real POSIX tree (chunk
  objects, manifests and a commit record that matches them), or ``load`` raises a
  ``FlashCkptError``; an unmutated step comes back bitwise;
* no file outside ``tmp_path`` is written, and nothing under it is read outside the step's
  tree (an audit hook watches every open);
* nothing hangs (pytest-timeout).

The run is sized by time, not by a count: ``FLASHCKPT_FUZZ_SECONDS`` (unset: about 30 s in
all, with fixed seeds, for CI; ``600``: ten minutes of fresh random seeds, printed so that a
failure can be replayed with ``FLASHCKPT_FUZZ_SEED``).  Each target runs batches of
Hypothesis examples until its share of the budget is spent, and prints what it tried.
``FLASHCKPT_FUZZ_REPORT=path`` also appends those figures to a JSON-lines file.
"""

from __future__ import annotations

import copy
import itertools
import json
import math
import os
import random
import shutil
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import zstandard
from hypothesis import HealthCheck, Phase, given, seed, settings
from hypothesis import strategies as st

import flashckpt
from flashckpt.format import (
    CODEC_RAW,
    DTYPES,
    ChunkEntry,
    CommitRecord,
    DTensorRef,
    Manifest,
    StatefulRecord,
    TensorEntry,
    TensorRef,
    checksum,
    chunk_key,
    commit_key,
    decode_commit,
    decode_manifest,
    decode_tree,
    encode_commit,
    encode_manifest,
    encode_tree,
    manifest_key,
    tensor_nbytes,
)
from flashckpt.transfer.codec import decode as codec_decode
from tests.hostile.tree import encode_as

# --------------------------------------------------------------------------------------------
# budget

_ENV_SECONDS = os.environ.get("FLASHCKPT_FUZZ_SECONDS", "").strip()
LONG = bool(_ENV_SECONDS)
TOTAL_SECONDS = float(_ENV_SECONDS) if LONG else 30.0
#: Share of the budget per target.
SHARES = {"manifest_load": 0.40, "manifest_decode": 0.15, "commit": 0.15, "tree": 0.15, "codec": 0.15}
#: Quick runs replay the same seeds (CI is deterministic up to machine speed); long runs
#: draw fresh ones unless FLASHCKPT_FUZZ_SEED pins them.
BASE_SEED = int(
    os.environ.get("FLASHCKPT_FUZZ_SEED") or (random.SystemRandom().getrandbits(32) if LONG else 0)
)
BATCH = 50  # examples per Hypothesis run; runs repeat until the time is spent


def _timeout(target: str) -> float:
    """pytest-timeout for a target: its budget plus room for one slow shrink."""
    return TOTAL_SECONDS * SHARES[target] * 1.5 + 120


_SETTINGS = settings(
    max_examples=BATCH,
    deadline=None,
    database=None,  # replay with FLASHCKPT_FUZZ_SEED, not from files in the checkout
    phases=(Phase.generate, Phase.shrink),
    suppress_health_check=list(HealthCheck),
    derandomize=False,
)


@dataclass
class Tally:
    """What one target tried: outcomes by name, and the time it took."""

    target: str
    counts: Counter[str] = field(default_factory=Counter)
    t0: float = field(default_factory=time.monotonic)

    def add(self, outcome: str) -> None:
        self.counts[outcome] += 1

    def report(self, batches: int) -> str:
        secs = time.monotonic() - self.t0
        n = self.counts["examples"]
        outcomes = ", ".join(f"{k}={v}" for k, v in sorted(self.counts.items()) if k != "examples")
        line = (
            f"fuzz {self.target}: {n} inputs in {secs:.1f} s ({n / max(secs, 1e-9):.0f}/s), "
            f"{batches} batches from seed {BASE_SEED}: {outcomes}"
        )
        path = os.environ.get("FLASHCKPT_FUZZ_REPORT")
        if path:
            with open(path, "a") as f:
                rec = {"target": self.target, "inputs": n, "seconds": secs, "seed": BASE_SEED}
                f.write(json.dumps({**rec, "outcomes": dict(self.counts)}) + "\n")
        return line


def _campaign(target: str, run: Callable[[], None], tally: Tally) -> None:
    """Run Hypothesis batches of ``run`` (a @given test) until the target's share is spent."""
    end = time.monotonic() + TOTAL_SECONDS * SHARES[target]
    batches = 0
    while batches == 0 or time.monotonic() < end:
        seed(BASE_SEED * 1_000_003 + batches)(run)()
        batches += 1
    print(tally.report(batches), file=sys.stderr)


# --------------------------------------------------------------------------------------------
# watching the file system: an audit hook (installed once, active only inside a check)


@dataclass
class _Watch:
    tmp: str  # nothing outside may be written
    root: str  # nothing under tmp outside root may be opened
    seen: list[tuple[str, str]] = field(default_factory=list)


_WATCH: _Watch | None = None
_WATCH_LOCK = threading.Lock()
_WRITE_EVENTS = {
    "os.mkdir",
    "os.rename",
    "os.remove",
    "os.rmdir",
    "os.symlink",
    "os.link",
    "os.truncate",
    "os.chmod",
    "os.chown",
    "shutil.rmtree",
    "shutil.move",
    "shutil.copyfile",
}
_WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND


def _norm(p: Any) -> str | None:
    if isinstance(p, int):
        return None  # a file descriptor: its open was seen
    try:
        s = os.fsdecode(os.fspath(p))
    except TypeError:
        return None
    return os.path.normpath(os.path.join(os.getcwd(), s))


def _audit(event: str, args: tuple[Any, ...]) -> None:
    w = _WATCH
    if w is None:
        return
    if event == "open":
        path, mode, flags = args
        writes = (isinstance(mode, str) and any(c in mode for c in "wax+")) or (
            isinstance(flags, int) and flags & _WRITE_FLAGS
        )
        p = _norm(path)
        if p is not None:
            w.seen.append(("write" if writes else "read", p))
    elif event in _WRITE_EVENTS:
        for a in args[:2]:
            p = _norm(a)
            if p is not None:
                w.seen.append(("write", p))


sys.addaudithook(_audit)


def _inside(path: str, root: str) -> bool:
    return path == root or path.startswith(root.rstrip(os.sep) + os.sep)


class _Watching:
    """``with _Watching(tmp, root):`` checks the file-system accesses made inside."""

    def __init__(self, tmp: Path, root: Path) -> None:
        self.w = _Watch(os.path.normpath(tmp), os.path.normpath(root))

    def __enter__(self) -> None:
        global _WATCH
        _WATCH_LOCK.acquire()
        _WATCH = self.w

    def __exit__(self, *exc: object) -> None:
        global _WATCH
        _WATCH = None
        _WATCH_LOCK.release()
        for kind, path in self.w.seen:
            if kind == "write":
                assert _inside(path, self.w.tmp), f"wrote {path} outside tmp_path"
            if _inside(path, self.w.tmp):
                assert _inside(path, self.w.root), f"{kind} {path}: outside the checkpoint's tree"


# --------------------------------------------------------------------------------------------
# valid shards


@dataclass
class Shard:
    """One rank's shard as the writer would store it, plus what loading it must give."""

    manifest: Manifest
    objects: dict[str, bytes]  # chunk objects by key
    expected: Any  # the state load must return (tensors materialized)


@dataclass
class StepSpec:
    step: int
    shards: list[Shard]
    consolidated: Any  # what load() of the whole step returns

    @property
    def world(self) -> int:
        return len(self.shards)

    @property
    def generation(self) -> int:
        """The step's place on the run's timeline: every shard of a step has the same."""
        return self.shards[0].manifest.generation

    def __post_init__(self) -> None:
        for shard in self.shards[1:]:
            shard.manifest = replace(shard.manifest, generation=self.generation)


_DTYPE_NAMES = sorted(DTYPES)
_CODECS = ["raw/1", "zstd/1", "zstd-bg2/1", "zstd-bg4/1", "zstd-bg8/1"]


def _align(n: int, a: int) -> int:
    return -(-n // a) * a


@st.composite
def _tensor_specs(draw: st.DrawFn) -> list[tuple[str, list[int]]]:
    out = []
    for _ in range(draw(st.integers(0, 5))):
        name = draw(st.sampled_from(_DTYPE_NAMES))
        ndim = draw(st.integers(0, 3))
        shape = draw(st.lists(st.integers(0, 7), min_size=ndim, max_size=ndim))
        out.append((name, shape))
    return out


def _tensor_from(data: bytes, offset: int, name: str, shape: list[int]) -> torch.Tensor:
    dtype = DTYPES[name]
    nbytes = tensor_nbytes(dtype, shape)
    whole = torch.frombuffer(bytearray(data[offset : offset + nbytes]) or bytearray(1), dtype=torch.uint8)
    return whole[:nbytes].view(dtype).view(shape).clone()


@st.composite
def _shard(
    draw: st.DrawFn,
    specs: list[tuple[str, list[int]]],
    fixed: dict[int, bytes],
    tree_of: Callable[[list[int]], Any],
    *,
    step: int,
    rank: int,
    world: int,
) -> Shard:
    """Lay ``specs`` out with gaps, fill them (tensor ``i`` with ``fixed[i]`` if given),
    cut the shard into chunks in random codecs and build the manifest; ``tree_of(indices)``
    gives the Python state tree (TensorRef leaves) for the tensors."""
    offsets, pos = [], 0
    for name, shape in specs:
        pos = _align(pos + draw(st.integers(0, 9)), DTYPES[name].itemsize)
        offsets.append(pos)
        pos += tensor_nbytes(DTYPES[name], shape)
    total = pos + draw(st.integers(0, 5))
    rng = random.Random(draw(st.integers(0, 2**32)))
    data = bytearray(rng.randbytes(total) if draw(st.booleans()) else bytes(total))
    for i, (name, shape) in enumerate(specs):
        nbytes = tensor_nbytes(DTYPES[name], shape)
        o = offsets[i]
        if i in fixed:
            data[o : o + nbytes] = fixed[i]
        elif name == "bool":  # torch stores 0/1; other bytes do not survive a copy
            data[o : o + nbytes] = bytes(b & 1 for b in data[o : o + nbytes])
    # chunks: cut points, each piece in a codec it can use, some gap-only pieces left out
    cuts = sorted({c for c in draw(st.lists(st.integers(1, max(1, total - 1)), max_size=4)) if 0 < c < total})
    edges = [0, *cuts, total]
    spans = [(o, o + tensor_nbytes(DTYPES[n], s)) for o, (n, s) in zip(offsets, specs, strict=True)]
    chunks, objects = [], {}
    for a, b in itertools_pairwise(edges):
        holds = any(lo < b and a < hi for lo, hi in spans if lo < hi)
        if not holds and b != total and draw(st.booleans()):
            continue  # a gap between chunks: alignment padding, never read
        raw = bytes(data[a:b])
        usable = [c for c in _CODECS if c == CODEC_RAW or (raw and len(raw) % _group(c) == 0)]
        codec = draw(st.sampled_from(usable))
        stored = encode_as(raw, codec)
        prefix = rng.randbytes(draw(st.sampled_from([0, 0, 3, 64])))
        key = chunk_key(checksum(raw), codec)
        if key in objects:  # same bytes, same codec: one object (as the writer dedups)
            at = objects[key].index(stored) if stored in objects[key] else len(objects[key])
            if at == len(objects[key]):
                objects[key] += stored
        else:
            objects[key] = prefix + stored
            at = len(prefix)
        chunks.append(ChunkEntry(key, at, a, b - a, len(stored), codec, checksum(raw)))
    tensors = tuple(
        TensorEntry(DTYPES[n], tuple(s), o, tensor_nbytes(DTYPES[n], s))
        for o, (n, s) in zip(offsets, specs, strict=True)
    )
    tree = tree_of(list(range(len(specs))))
    m = Manifest(
        step=step,
        rank=rank,
        world_size=world,
        node=draw(st.sampled_from(["node-a", "", "n" * 255, "ünï"])),
        created_unix=draw(st.sampled_from([0.0, 1_700_000_000.25, 2.0**53, 42])),
        total_bytes=total,
        tensors=tensors,
        chunks=tuple(chunks),
        tree=encode_tree(tree),
        generation=draw(st.sampled_from([0, 0, 3, 2**62])),
    )
    materialized = [_tensor_from(bytes(data), o, n, s) for o, (n, s) in zip(offsets, specs, strict=True)]
    return Shard(m, objects, _expect(tree, materialized))


def itertools_pairwise(xs: list[int]) -> Iterator[tuple[int, int]]:
    return itertools.pairwise(xs)


def _group(codec: str) -> int:
    return int(codec[7]) if codec.startswith("zstd-bg") else 1


_KEYS = st.one_of(st.text(max_size=6), st.integers(-5, 5), st.booleans(), st.none())
_LEAVES = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(2**80), 2**80),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=8),
    st.binary(max_size=8),
    st.sampled_from(
        [torch.float32, torch.bfloat16, torch.uint8, torch.device("cpu"), torch.device("cuda", 1)]
    ),
    st.lists(st.integers(0, 9), max_size=3).map(torch.Size),
)


def _values(refs: list[int]) -> st.SearchStrategy[Any]:
    leaves = _LEAVES if not refs else st.one_of(_LEAVES, st.sampled_from(refs).map(TensorRef))
    return st.recursive(
        leaves,
        lambda ch: st.one_of(
            st.lists(ch, max_size=3),
            st.dictionaries(_KEYS, ch, max_size=3),
            st.tuples(ch, ch),
            st.frozensets(st.integers(0, 9) | st.text(max_size=3), max_size=3),
            st.builds(
                StatefulRecord,
                st.sampled_from(["torch.optim.adamw.AdamW", ""]),
                st.dictionaries(_KEYS, ch, max_size=3),
            ),
        ),
        max_leaves=10,
    )


def _expect(tree: Any, tensors: list[torch.Tensor]) -> Any:
    """What ``build`` makes of a Python state tree: tensors for refs, state dicts for
    Stateful records."""
    if isinstance(tree, TensorRef):
        return tensors[tree.index]
    if isinstance(tree, DTensorRef):
        return tensors[tree.index]  # the local shard (replaced when consolidating)
    if isinstance(tree, StatefulRecord):
        return _expect(tree.state, tensors)
    if isinstance(tree, dict):
        return {k: _expect(v, tensors) for k, v in tree.items()}
    if isinstance(tree, torch.Size):
        return tree
    if isinstance(tree, list):
        return [_expect(v, tensors) for v in tree]
    if isinstance(tree, tuple):
        return tuple(_expect(v, tensors) for v in tree)
    return tree


def _same(a: Any, b: Any) -> bool:
    if isinstance(b, torch.Tensor):
        return (
            isinstance(a, torch.Tensor)
            and a.dtype == b.dtype
            and a.shape == b.shape
            and torch.equal(a.reshape(-1).view(torch.uint8), b.reshape(-1).view(torch.uint8))
        )
    if isinstance(b, float) and math.isnan(b):
        return isinstance(a, float) and math.isnan(a)
    if type(a) is not type(b):
        return False
    if isinstance(b, dict):
        return list(a) == list(b) and all(_same(a[k], b[k]) for k in b)
    if isinstance(b, (list, tuple)) and not isinstance(b, torch.Size):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b, strict=True))
    return bool(a == b)


@st.composite
def steps(draw: st.DrawFn) -> StepSpec:
    """A valid step of one rank, or of two ranks holding DTensors sharded along dim 0."""
    step = draw(st.integers(0, 10**12 - 1))
    if draw(st.integers(0, 3)) > 0:
        specs = draw(_tensor_specs())
        root = draw(st.dictionaries(st.text(max_size=6), _values(list(range(len(specs)))), max_size=4))
        shard = draw(_shard(specs, {}, lambda _refs: root, step=step, rank=0, world=1))
        return StepSpec(step, [shard], shard.expected)
    # two ranks: DTensors d0.. split along dim 0 at a random row, plus plain values
    dts = []
    for _ in range(draw(st.integers(1, 2))):
        name = draw(st.sampled_from(_DTYPE_NAMES))
        shape = draw(st.lists(st.integers(0, 5), min_size=1, max_size=3))
        split = draw(st.integers(0, shape[0]))
        data = random.Random(draw(st.integers(0, 2**32))).randbytes(tensor_nbytes(DTYPES[name], shape))
        if name == "bool":
            data = bytes(b & 1 for b in data)
        dts.append((name, shape, split, data))
    shards, plain0 = [], None
    for rank in range(2):
        specs, fixed, refs = [], {}, {}
        for j, (name, shape, split, data) in enumerate(dts):
            lo, hi = (0, split) if rank == 0 else (split, shape[0])
            row = tensor_nbytes(DTYPES[name], shape[1:])
            fixed[len(specs)] = data[lo * row : hi * row]
            refs[f"d{j}"] = DTensorRef(
                len(specs), tuple(shape), (lo,) + (0,) * (len(shape) - 1), ("S0",), (2,)
            )
            specs.append((name, [hi - lo, *shape[1:]]))
        extra = draw(_tensor_specs())
        first_plain = len(specs)
        specs += extra
        plain = draw(_values(list(range(first_plain, len(specs)))))
        tree = {**refs, "p": plain}
        shard = draw(_shard(specs, fixed, lambda _refs, tree=tree: tree, step=step, rank=rank, world=2))
        shards.append(shard)
        if rank == 0:
            plain0 = shard.expected["p"]
    whole = {f"d{j}": _tensor_from(data, 0, name, shape) for j, (name, shape, _split, data) in enumerate(dts)}
    return StepSpec(step, shards, {**whole, "p": plain0})


# --------------------------------------------------------------------------------------------
# mutations


_HOSTILE_INTS = [
    0,
    1,
    -1,
    2,
    3,
    7,
    255,
    256,
    4096,
    2**31,
    2**32,
    2**49,
    2**50,
    2**50 + 1,
    2**53,
    2**53 + 1,
    2**62,
    2**63 - 1,
    2**63,
    2**64,
    10**12,
    10**12 - 1,
    -(2**63),
    10**400,
]
_HOSTILE_STRS = [
    "",
    ".",
    "..",
    "../x",
    "../../outside",
    "/etc/passwd",
    "/",
    "chunks/ab/../../x",
    "chunks//x",
    "a\x00b",
    "é",
    "a\\b",
    "~",
    "x" * 300,
    "steps/000000000001/r00000-of-00001.manifest",
    "raw/1",
    "zstd/1",
    "zstd-bg2/1",
    "zstd-bg4/1",
    "zstd-bg8/1",
    "zstd-bg3/1",
    "lz4/1",
    "RAW/1",
    "raw/1\n",
    "float32",
    "bfloat16",
    "complex128",
    "bool",
    "qint8",
    "tensor",
    "dtensor",
    "dict",
    "tuple",
    "stateful",
    "float",
    "size",
    "set",
    "frozenset",
    "bytes",
    "dtype",
    "device",
    "nan",
    "inf",
    "-inf",
    "S0",
    "S1",
    "S63",
    "S64",
    "R",
    "cuda:99999999999999999999",
    "0" * 32,
    "f" * 32,
    "job",
    "rank",
    "flashckpt.manifest",
    "flashckpt.commit",
]
#: Strings that stand for JSON text no encoder writes: non-finite numbers, and nesting deeper
#: than a recursive encoder (or this file's mutator) could produce.
_MARKERS = {
    "@1e400@": "1e400",
    "@-1e400@": "-1e400",
    "@NaN@": "NaN",
    "@Inf@": "Infinity",
    "@bigexp@": "1e99999",
    "@deep-list@": "[" * 5000 + "0" + "]" * 5000,
    "@deep-tuple@": '{"T":"tuple","v":[' * 2000 + "1" + "]}" * 2000,
    "@deep-object@": '{"a":' * 100_000 + "1" + "}" * 100_000,
}
_HOSTILE_NODES: list[Any] = [
    None,
    True,
    False,
    [],
    {},
    [[]],
    {"T": "tensor", "i": 0},
    {"T": "tensor", "i": 10**9},
    {"T": "dtensor", "i": 0, "shape": [2**50, 2**50], "offset": [0, 0], "placements": ["S0"], "mesh": [2]},
    {
        "T": "dtensor",
        "i": 0,
        "shape": [1, 1, 1, 1],
        "offset": [0, 0, 0, 0],
        "placements": ["S3"],
        "mesh": [1],
    },
    {"T": "float", "v": "nan"},
    {"T": "bytes", "v": "=="},
    {"T": "size", "v": [2**50] * 64},
    {"T": "set", "v": [[1]]},
    ["float32", [0, 2**50, 2**50], 0],
    ["uint8", [2**40, 0, 2**40], 0],
    ["chunks/ab/x.raw-1", 0, 0, 1, 1, "raw/1", "0" * 32],
    1.5,
    -0.0,
    1e308,
    *_MARKERS,
]


def _paths(
    node: Any, prefix: tuple[Any, ...] = (), out: list[tuple[Any, ...]] | None = None
) -> list[tuple[Any, ...]]:
    out = [] if out is None else out
    out.append(prefix)
    if len(out) > 4000:
        return out
    if isinstance(node, dict):
        for k, v in node.items():
            _paths(v, (*prefix, k), out)
    elif isinstance(node, list):
        for i, v in enumerate(node):
            _paths(v, (*prefix, i), out)
    return out


def _get(node: Any, path: tuple[Any, ...]) -> Any:
    for p in path:
        node = node[p]
    return node


def _put(body: Any, path: tuple[Any, ...], value: Any) -> Any:
    if not path:
        return value
    _get(body, path[:-1])[path[-1]] = value
    return body


_HOSTILE_VALUES = st.one_of(
    st.sampled_from(_HOSTILE_INTS),
    st.sampled_from(_HOSTILE_STRS),
    st.sampled_from(_HOSTILE_NODES).map(copy.deepcopy),
    st.integers(-(2**70), 2**70),
    st.floats(allow_nan=False, allow_infinity=False),
    st.text(max_size=12),
)


@st.composite
def _mutate(draw: st.DrawFn, body: Any) -> Any:
    """One structural mutation of a JSON document."""
    paths = _paths(body)
    path = draw(st.sampled_from(paths))
    node = _get(body, path)
    kind = draw(
        st.sampled_from(
            [
                "replace",
                "perturb",
                "delete",
                "duplicate",
                "swap",
                "nest",
                "copy",
                "targeted",
                "targeted",
                "dtensor",
            ]
        )
    )
    if kind == "perturb" and type(node) is int:
        op = draw(st.sampled_from([1, -1, 2, -2, 4095, 2**50, 2**63, -(2**63)]))
        return _put(body, path, draw(st.sampled_from([node + op, node * op, -node, 0, node // 2])))
    if kind == "delete" and path:
        parent = _get(body, path[:-1])
        del parent[path[-1]]
        return body
    if kind == "duplicate" and isinstance(node, list) and node:
        node.insert(draw(st.integers(0, len(node))), copy.deepcopy(draw(st.sampled_from(node))))
        return body
    if kind == "swap" and isinstance(node, list) and len(node) > 1:
        i, j = draw(st.integers(0, len(node) - 1)), draw(st.integers(0, len(node) - 1))
        node[i], node[j] = node[j], node[i]
        return body
    if kind == "nest":
        depth = draw(st.sampled_from([1, 2, 50, 99, 100, 101, 200]))  # deeper: the _MARKERS
        wrapped: Any = node
        tuple_wrap = draw(st.booleans())
        for _ in range(depth):
            wrapped = {"T": "tuple", "v": [wrapped]} if tuple_wrap else [wrapped]
        return _put(body, path, wrapped)
    if kind == "copy":  # one part of the document where another belongs (a chunk as a tensor, ...)
        return _put(body, path, copy.deepcopy(_get(body, draw(st.sampled_from(paths)))))
    if kind == "targeted" and isinstance(body, dict):
        return _targeted(draw, body)
    if kind == "dtensor":
        found = [p for p in paths if isinstance(n := _get(body, p), dict) and n.get("T") == "dtensor"]
        if found:
            _dtensor_edit(draw, _get(body, draw(st.sampled_from(found))))
            return body
    return _put(body, path, draw(_HOSTILE_VALUES))


def _dtensor_edit(draw: st.DrawFn, node: dict[str, Any]) -> None:
    """A DTensor node that no longer fits its tensor, its mesh or the other ranks' nodes."""
    shape, offset = node.get("shape"), node.get("offset")
    if not (isinstance(shape, list) and isinstance(offset, list)):
        return
    if not all(type(v) is int for v in [*shape, *offset]):
        return  # an earlier mutation got here first
    edit = draw(st.integers(0, 5))
    if edit == 0:  # a dimension more than the local tensor has
        shape.append(draw(st.sampled_from([0, 1, 3])))
        offset.append(0)
    elif edit == 1 and shape:  # one fewer
        shape.pop()
        offset.pop()
    elif edit == 2 and shape:  # another global size
        shape[draw(st.integers(0, len(shape) - 1))] = draw(st.sampled_from([0, 1, 6, 2**20, 2**40, 2**50]))
    elif edit == 3 and offset:  # the shard moved
        offset[draw(st.integers(0, len(offset) - 1))] += draw(st.sampled_from([1, -1, 5]))
    elif edit == 4:
        node["placements"] = draw(st.sampled_from([["R"], ["S1"], ["S0", "S0"], ["S9"]]))
    else:
        node["i"] = draw(st.sampled_from([0, 1, 2, -1]))


def _targeted(draw: st.DrawFn, body: dict[str, Any]) -> dict[str, Any]:
    """Mutations aimed at what the format's checks are about."""
    chunks, tensors = body.get("chunks"), body.get("tensors")
    choice = draw(st.integers(0, 9))
    if choice == 0 and isinstance(chunks, list) and len(chunks) > 1:  # overlapping chunks
        i = draw(st.integers(1, len(chunks) - 1))
        if isinstance(chunks[i], list) and isinstance(chunks[i - 1], list) and len(chunks[i]) > 3:
            prev, here = chunks[i - 1][2:3], chunks[i][2]
            if prev and type(here) is int:  # (earlier mutations may have left anything here)
                chunks[i][2] = prev[0] if draw(st.booleans()) else here - 1
    elif (
        choice == 1
        and isinstance(chunks, list)
        and chunks
        and isinstance(chunks[0], list)
        and len(chunks[0]) > 5
    ):
        i = draw(st.integers(0, len(chunks) - 1))
        if isinstance(chunks[i], list) and len(chunks[i]) > 5:
            chunks[i][5] = draw(st.sampled_from([*_CODECS, "zstd-bg3/1", "lz4/1"]))
    elif (
        choice == 2
        and isinstance(tensors, list)
        and tensors
        and isinstance(tensors[0], list)
        and len(tensors[0]) > 1
    ):
        i = draw(st.integers(0, len(tensors) - 1))
        if isinstance(tensors[i], list) and len(tensors[i]) > 1:
            tensors[i][1] = draw(
                st.sampled_from(
                    [[0, 2**50, 2**50], [2**40, 0, 2**40], [0] * 64, [1] * 65, [2**50], [0, 2**62]]
                )
            )
    elif choice == 3 and isinstance(chunks, list) and chunks and isinstance(chunks[0], list) and chunks[0]:
        chunks[0][0] = draw(st.sampled_from(_HOSTILE_STRS))
    elif choice == 4:
        body["created_unix"] = draw(
            st.sampled_from([10**400, -1, 2**53 + 1, 2**64, True, "@1e400@", "@NaN@", 0, 2**53])
        )
    elif choice == 5 and isinstance(body.get("tree"), dict):
        dt = {
            "T": "dtensor",
            "i": 0,
            "shape": draw(st.lists(st.sampled_from([0, 1, 4, 2**25, 2**50]), max_size=4)),
        }
        dt["offset"] = [0] * len(dt["shape"])
        dt["placements"], dt["mesh"] = draw(
            st.sampled_from([(["S0"], [2]), (["R"], [1]), (["R"] * 8, [2**20] * 8)])
        )
        body["tree"] = {"T": "dict", "k": ["x"], "v": [dt]}
    elif (
        choice == 6
        and isinstance(chunks, list)
        and chunks
        and isinstance(chunks[-1], list)
        and len(chunks[-1]) > 4
    ):
        if type(chunks[-1][3]) is int:  # size and total disagree
            chunks[-1][3] += draw(st.sampled_from([1, -1, 2**40]))
    elif choice == 7:
        body["total_bytes"] = draw(st.sampled_from([0, 2**50, 2**50 + 1, -1]))
    elif choice == 8 and isinstance(body.get("manifests"), list) and body["manifests"]:
        body["manifests"].append(copy.deepcopy(body["manifests"][0]))
        body["world_size"] = len(body["manifests"])
    else:
        for name in ("step", "rank", "world_size", "version", "generation"):
            if name in body and draw(st.booleans()):
                body[name] = draw(st.sampled_from([*_HOSTILE_INTS, 1.0, True, "1", None]))
    return body


def _encode_json(body: Any) -> bytes:
    text = json.dumps(body, separators=(",", ":"), allow_nan=True)
    for marker, number in _MARKERS.items():
        text = text.replace(json.dumps(marker), number)
    return text.encode("utf-8", "surrogatepass")


_TRAILER = b"\n#xxh3_128:"


def _with_trailer(body: bytes) -> bytes:
    return body + _TRAILER + checksum(body).encode("ascii") + b"\n"


@st.composite
def _byte_edit(draw: st.DrawFn, data: bytes) -> bytes:
    n = len(data)
    op = draw(st.sampled_from(["flip", "set", "cut", "insert", "truncate", "extend", "dup"]))
    pos = draw(st.integers(0, max(0, n - 1)))
    if op == "flip" and n:
        b = bytearray(data)
        b[pos] ^= 1 << draw(st.integers(0, 7))
        return bytes(b)
    if op == "set" and n:
        b = bytearray(data)
        b[pos] = draw(
            st.sampled_from([0, 0x0A, 0x22, 0x5C, 0x7B, 0x7D, 0x5B, 0x5D, 0x2C, 0x3A, 0x80, 0xFF, 0x30])
        )
        return bytes(b)
    if op == "cut":
        return data[:pos] + data[pos + draw(st.integers(1, 16)) :]
    if op == "insert":
        return data[:pos] + draw(st.binary(min_size=1, max_size=8)) + data[pos:]
    if op == "truncate":
        return data[:pos]
    if op == "dup":
        return data[:pos] + data[pos : pos + draw(st.integers(1, 64))] + data[pos:]
    return data + draw(st.binary(max_size=16))


@st.composite
def _hostile_record(draw: st.DrawFn, raw: bytes, tally: Tally) -> bytes:
    """``raw`` (an encoded record) mutated: structurally, then maybe at the byte level with
    the trailer recomputed (the JSON parser sees it) or not (the trailer must catch it)."""
    body = json.loads(raw[: raw.rindex(_TRAILER)])
    # mostly mutated: about one in ten is left as the encoder wrote it (Hypothesis favours the
    # bounds of a range, so they map to mutations)
    n = (1, 1, 2, 3, 1, 2, 0, 1, 2, 3)[draw(st.integers(0, 9))]
    for _ in range(n):
        body = draw(_mutate(body))
    out = _with_trailer(_encode_json(body)) if n else raw
    level = draw(st.sampled_from(["none", "none", "none", "body", "whole"]))
    if level == "body":
        out = _with_trailer(draw(_byte_edit(out[: out.rindex(_TRAILER)])))
    elif level == "whole":
        out = draw(_byte_edit(out))
    tally.add("unmutated" if n == 0 and level == "none" else f"mutated-{level}")
    return out


# --------------------------------------------------------------------------------------------
# writing a step into a real POSIX tree, and loading it


def _write(root: Path, spec: StepSpec, manifests: list[bytes], commit: bytes | None = None) -> None:
    for shard in spec.shards:
        for key, blob in shard.objects.items():
            path = root / key
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(blob)
    entries = []
    for rank, raw in enumerate(manifests):
        key = manifest_key(spec.step, rank, spec.world)
        path = root / key
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(raw)
        entries.append((key, len(raw), checksum(raw)))
    if commit is None:
        rec = CommitRecord(spec.step, spec.world, 1_700_000_000.5, tuple(entries), generation=spec.generation)
        commit = encode_commit(rec)
    (root / commit_key(spec.step)).parent.mkdir(parents=True, exist_ok=True)
    (root / commit_key(spec.step)).write_bytes(commit)


def _load(tmp: Path, root: Path, step: int, tally: Tally) -> Any:
    """``flashckpt.load`` of ``step`` under watch: returns the state, or None when refused
    (with a FlashCkptError only)."""
    try:
        with _Watching(tmp, root):
            out = flashckpt.load(root, step=step)
    except flashckpt.FlashCkptError as exc:
        cause = exc.__cause__ if isinstance(exc, flashckpt.CheckpointNotFound) and exc.__cause__ else exc
        tally.add(f"load-refused:{type(cause).__name__}")
        return None
    tally.add("loaded")
    return out


def _decode_m(raw: bytes, tally: Tally) -> Manifest | None:
    try:
        m = decode_manifest(raw, "fuzzed manifest")
    except flashckpt.CorruptCheckpointError:
        tally.add("manifest-refused")
        return None
    tally.add("manifest-decoded")
    return m


# --------------------------------------------------------------------------------------------
# targets


@pytest.mark.timeout(_timeout("manifest_decode"))
def test_fuzz_decode_manifest(tmp_path: Path) -> None:
    tally = Tally("manifest_decode")

    @_SETTINGS
    @given(st.data())
    def run(data: st.DataObject) -> None:
        spec = data.draw(steps())
        rank = data.draw(st.integers(0, spec.world - 1))
        raw = encode_manifest(spec.shards[rank].manifest)
        hostile = data.draw(_hostile_record(raw, tally))
        tally.add("examples")
        with _Watching(tmp_path, tmp_path / "none"):
            m = _decode_m(hostile, tally)
            if hostile == raw:
                assert m == spec.shards[rank].manifest
            if m is not None:
                m.state_tree()

    _campaign("manifest_decode", run, tally)


@pytest.mark.timeout(_timeout("manifest_load"))
def test_fuzz_load_what_decodes(tmp_path: Path) -> None:
    tally = Tally("manifest_load")

    @_SETTINGS
    @given(st.data())
    def run(data: st.DataObject) -> None:
        spec = data.draw(steps())
        manifests = [encode_manifest(s.manifest) for s in spec.shards]
        rank = data.draw(st.integers(0, spec.world - 1))
        hostile = data.draw(_hostile_record(manifests[rank], tally))
        tally.add("examples")
        with _Watching(tmp_path, tmp_path / "none"):
            m = _decode_m(hostile, tally)
        if m is None:
            return
        valid = hostile == manifests[rank]
        manifests[rank] = hostile
        root = Path(tempfile.mkdtemp(dir=tmp_path))
        try:
            _write(root, spec, manifests)
            out = _load(tmp_path, root, spec.step, tally)
            if valid:
                assert out is not None and _same(out, spec.consolidated), "a valid step did not load bitwise"
        finally:
            shutil.rmtree(root)

    _campaign("manifest_load", run, tally)


@pytest.mark.timeout(_timeout("commit"))
def test_fuzz_commit_records(tmp_path: Path) -> None:
    tally = Tally("commit")

    @_SETTINGS
    @given(st.data())
    def run(data: st.DataObject) -> None:
        spec = data.draw(steps())
        manifests = [encode_manifest(s.manifest) for s in spec.shards]
        entries = tuple(
            (manifest_key(spec.step, r, spec.world), len(raw), checksum(raw))
            for r, raw in enumerate(manifests)
        )
        scope = "rank" if spec.world == 1 and data.draw(st.booleans()) else "job"
        rec = CommitRecord(
            spec.step,
            spec.world,
            data.draw(st.sampled_from([0.0, 1.5, 2.0**53, 1_700_000_000])),
            entries,
            scope,
            spec.generation,  # a commit names its manifests' place on the timeline
            data.draw(st.sampled_from(["", "0123abcd", "f" * 64])),
        )
        raw = encode_commit(rec)
        hostile = data.draw(_hostile_record(raw, tally))
        tally.add("examples")
        try:
            with _Watching(tmp_path, tmp_path / "none"):
                got = decode_commit(hostile, "fuzzed commit")
        except flashckpt.CorruptCheckpointError:
            tally.add("commit-refused")
            return
        tally.add("commit-decoded")
        if hostile == raw:
            assert got == rec
        root = Path(tempfile.mkdtemp(dir=tmp_path))
        try:
            _write(root, spec, manifests, hostile)
            out = _load(tmp_path, root, spec.step, tally)
            if hostile == raw:
                assert out is not None and _same(out, spec.consolidated)
        finally:
            shutil.rmtree(root)

    _campaign("commit", run, tally)


_TAGS = [
    "tensor",
    "dtensor",
    "dict",
    "tuple",
    "stateful",
    "float",
    "size",
    "set",
    "frozenset",
    "bytes",
    "dtype",
    "device",
]
_FIELDS = ["T", "v", "k", "i", "shape", "offset", "placements", "mesh", "kind", "meta", "ordered"]
_JSON_LEAVES = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(2**64), 2**64),
    st.sampled_from([10**400, -(10**3000), 2**8000, 2**7999]),
    st.floats(),
    st.text(max_size=6),
    st.sampled_from(_TAGS + _HOSTILE_STRS),
)
_JSON = st.recursive(
    _JSON_LEAVES,
    lambda ch: st.one_of(
        st.lists(ch, max_size=4),
        st.dictionaries(st.sampled_from(_FIELDS) | st.text(max_size=3), ch, max_size=5),
        st.builds(
            lambda t, rest: {"T": t, **rest},
            st.sampled_from(_TAGS),
            st.dictionaries(st.sampled_from(_FIELDS[1:]), ch, max_size=5),
        ),
    ),
    max_leaves=25,
)


@pytest.mark.timeout(_timeout("tree"))
def test_fuzz_decode_tree() -> None:
    tally = Tally("tree")

    @_SETTINGS
    @given(_JSON, st.integers(0, 4), st.integers(0, 3))
    def run(node: Any, n_tensors: int, nest: int) -> None:
        tally.add("examples")
        for _ in range(nest * 40):
            node = [node]
        try:
            decode_tree(node, n_tensors)
        except flashckpt.CorruptCheckpointError:
            tally.add("refused")
        else:
            tally.add("decoded")

    _campaign("tree", run, tally)


@st.composite
def _chunk_inputs(draw: st.DrawFn) -> tuple[Any, bytes, int, bytes]:
    """A chunk in a codec, maybe damaged, and the size a reader would decode it to."""
    n = draw(st.sampled_from([0, 1, 2, 3, 4, 7, 8, 64, 4096, 4097]))
    data = random.Random(draw(st.integers(0, 2**32))).randbytes(n) if draw(st.booleans()) else bytes(n)
    codec = draw(st.sampled_from(_CODECS))
    if codec != CODEC_RAW and (n == 0 or n % _group(codec)):
        codec = "zstd/1" if n else CODEC_RAW
    stored = encode_as(data, codec)
    kind = draw(st.sampled_from(["ok", "edit", "size", "codec", "frame", "nosize"]))
    out_n = n
    if kind == "edit":
        stored = draw(_byte_edit(stored))
    elif kind == "size":
        out_n = max(0, n + draw(st.sampled_from([-8, -2, -1, 1, 2, 8, 4096])))
    elif kind == "codec":
        codec = draw(st.sampled_from([*_CODECS, "zstd-bg3/1", "zstd/2", "zstd/1\n", "", None, 5]))
    elif kind == "frame":  # a header that declares anything
        size = draw(st.sampled_from([0, 1, n, n + 1, 2**31, 2**40, 2**62, 2**64 - 3]))
        header = b"\x28\xb5\x2f\xfd" + bytes([0xE0]) + size.to_bytes(8, "little")
        payload = data[: draw(st.integers(0, len(data)))]
        stored = header + (1 | len(payload) << 3).to_bytes(3, "little") + payload
        codec = draw(st.sampled_from(["zstd/1", "zstd-bg2/1"]))
    elif kind == "nosize" and codec != CODEC_RAW and n:
        g = _group(codec)
        src = np.ascontiguousarray(np.frombuffer(data, dtype=np.uint8).reshape(-1, g).T).tobytes()
        stored = zstandard.ZstdCompressor(write_content_size=False).compress(src)
    return codec, stored, out_n, data if (kind in ("ok", "nosize") and out_n == n) else b""


@pytest.mark.timeout(_timeout("codec"))
def test_fuzz_codec_decode() -> None:
    tally = Tally("codec")

    @_SETTINGS
    @given(_chunk_inputs())
    def run(inputs: tuple[Any, bytes, int, bytes]) -> None:
        codec, stored, n, want = inputs
        tally.add("examples")
        out = bytearray(n)
        try:
            codec_decode(codec, stored, memoryview(out))
        except flashckpt.CorruptCheckpointError:
            tally.add("refused")
            assert not want or codec not in _CODECS, "an intact chunk was refused"
            return
        tally.add("decoded")
        if want:
            assert out == want

    _campaign("codec", run, tally)
