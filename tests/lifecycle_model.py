"""The reference model behind ``tests/test_lifecycle.py``.

Four parts, none of which asks the engine what it holds:

- **content**: what a save holds is a function of ``(uid, step, m_seed)``, and those three
  are plain values inside it, so any stored copy says which save it claims to be and can be
  rebuilt bit for bit (bf16 and fp32 tensors of several 64 KiB chunks, a tensor that is the
  same in every save so chunks are shared between steps, small packed tensors, plain values).
- **the timeline** (:class:`Model`): every save is a node whose parent is the snapshot the
  user continued from, so the current timeline is the chain from the newest save back to the
  root.  A save of step ``s`` continues from the last save, or from what the last ``restore``
  of that Checkpointer returned (nothing: a fresh start), walked back to the newest ancestor
  below ``s`` (docs/format.md, "the timeline": a save below the previous one starts a new
  timeline too).  So after ``restore(step=S)`` and a save, or a fallback past a corrupt step
  and a save, the steps the run abandoned are off the timeline whatever their numbers.
- **the inspector** (:func:`scan`): reads every tier's files with the format's decoders and
  its own chunk decoder and checksum, and says for every copy of every snapshot: does the
  engine list it (its record decodes), would it load (every byte verifies), and does what it
  holds equal what the save it names held.
- **the damage** the test did itself (:class:`Damage`), so that a broken copy can be told
  apart from one the engine broke.

And the crash child (:func:`child_main`), run from a fork server and SIGKILLed by the parent.
"""

from __future__ import annotations

import contextlib
import dataclasses
import multiprocessing
import os
import re
import threading
import time
import traceback
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import xxhash
import zstandard

import flashckpt
from flashckpt import _hooks as hooks
from flashckpt.errors import CorruptCheckpointError
from flashckpt.format import (
    SLOT_NAMES,
    StatefulRecord,
    TensorRef,
    check_memory_manifest,
    decode_commit,
    decode_manifest,
    decode_run,
    manifest_key,
)

KiB = 1024
#: Tiny states of several chunks each; no fsync (crashes here are process deaths, never power
#: losses, and the page cache survives them); retries fast.
OPTS = flashckpt.Options(
    chunk_bytes=64 * KiB,
    small_tensor_bytes=64 * KiB,
    retries=2,
    backoff_s=0.01,
    backoff_max_s=0.05,
    fsync=False,
    coord_timeout_s=30.0,
)
SHARD = "r00000-of-00001"
TIERS = ("memory", "local", "storage")
W_NUMEL = 100_000  # bf16, 200,000 bytes: 4 chunks
M_NUMEL = 38_405  # fp32, 153,620 bytes: 3 chunks
FROZEN_NUMEL = 65_536  # fp32, 262,144 bytes: 4 chunks, the same in every save


# -- content -------------------------------------------------------------------------------------

_frozen: torch.Tensor | None = None
_cache: OrderedDict[tuple[int, int, int], dict[str, Any]] = OrderedDict()
_cache_lock = threading.Lock()


def frozen() -> torch.Tensor:
    global _frozen
    if _frozen is None:
        _frozen = torch.randn(FROZEN_NUMEL, generator=torch.Generator().manual_seed(424242))
    return _frozen


def content(uid: int, step: int, m_seed: int) -> dict[str, Any]:
    """What save ``uid`` of ``step`` holds.  ``m_seed`` names the optimizer moments: a save
    that leaves them unchanged keeps its parent's (its chunks are then shared)."""
    key = (uid, step, m_seed)
    with _cache_lock:
        got = _cache.get(key)
        if got is not None:
            _cache.move_to_end(key)
            return got
    g = torch.Generator().manual_seed(2 * uid + 1)
    out = {
        "model": {"w": (torch.randn(W_NUMEL, generator=g) * 0.02).to(torch.bfloat16), "frozen": frozen()},
        "optim": {
            "m": torch.randn(M_NUMEL, generator=torch.Generator().manual_seed(2 * m_seed + 2)),
            "count": torch.tensor([step, uid], dtype=torch.int64),
        },
        "small": [torch.full((7,), float(uid)), torch.arange(9, dtype=torch.int32) + uid],
        "meta": {"uid": uid, "step": step, "m_seed": m_seed, "note": "lifecycle"},
    }
    with _cache_lock:
        _cache[key] = out
        while len(_cache) > 48:
            _cache.popitem(last=False)
    return out


def template() -> dict[str, Any]:
    """A state to restore into: the shapes of every save, none of their values."""
    return {
        "model": {
            "w": torch.full((W_NUMEL,), 7.0, dtype=torch.bfloat16),
            "frozen": torch.zeros(FROZEN_NUMEL),
        },
        "optim": {"m": torch.full((M_NUMEL,), -1.0), "count": torch.zeros(2, dtype=torch.int64)},
        "small": [torch.zeros(7), torch.zeros(9, dtype=torch.int32)],
        "meta": {"uid": -1, "step": -1, "m_seed": -1, "note": "template"},
    }


def meta_of(state: Any) -> tuple[int, int, int] | None:
    """``(uid, step, m_seed)`` that a state (or a decoded tree) says it is."""
    try:
        m = state["meta"]
        uid, step, m_seed = m["uid"], m["step"], m["m_seed"]
    except (KeyError, TypeError, IndexError):
        return None
    if not all(type(v) is int for v in (uid, step, m_seed)):
        return None
    return uid, step, m_seed


def diff(got: Any, want: Any, path: str = "") -> str | None:
    """None if ``got`` equals ``want`` bit for bit (tensors: dtype, shape and every byte;
    plain values: type and value), else where they differ."""
    if isinstance(want, torch.Tensor):
        if not isinstance(got, torch.Tensor):
            return f"{path}: {type(got).__name__}, not a tensor"
        if got.dtype != want.dtype or tuple(got.shape) != tuple(want.shape):
            return f"{path}: {got.dtype}{tuple(got.shape)} != {want.dtype}{tuple(want.shape)}"
        a = got.detach().contiguous().reshape(-1).view(torch.uint8)
        b = want.detach().contiguous().reshape(-1).view(torch.uint8)
        if not torch.equal(a, b):
            i = int((a != b).nonzero()[0])
            return f"{path}: bytes differ (first at byte {i})"
        return None
    if isinstance(want, dict):
        if not isinstance(got, dict) or list(got.keys()) != list(want.keys()):
            return f"{path}: keys {list(got)[:6] if isinstance(got, dict) else type(got).__name__}"
        for k in want:
            d = diff(got[k], want[k], f"{path}.{k}")
            if d:
                return d
        return None
    if isinstance(want, (list, tuple)):
        if type(got) is not type(want) or len(got) != len(want):
            return f"{path}: {type(got).__name__} of {len(got) if hasattr(got, '__len__') else '?'}"
        for i, (x, y) in enumerate(zip(got, want, strict=True)):
            d = diff(x, y, f"{path}[{i}]")
            if d:
                return d
        return None
    if type(got) is not type(want) or got != want:
        return f"{path}: {got!r} != {want!r}"
    return None


# -- the timeline ---------------------------------------------------------------------------------


@dataclass(eq=False)
class Node:
    """One save the user made (in this process or a crashed child)."""

    uid: int
    step: int
    m_seed: int
    parent: Node | None
    origin: str  # "save" or "child"
    #: the link to ``parent`` is a branch: the run continued from a restore of it, or from it
    #: as the newest save below a lower step (the engine records ``(generation, parent.step)``
    #: as an ancestor then)
    branch: bool = False
    #: a fresh start: the save after a restore that found nothing (no parent, no ancestry)
    fresh: bool = False

    def content(self) -> dict[str, Any]:
        return content(self.uid, self.step, self.m_seed)

    def __repr__(self) -> str:
        return f"<save {self.uid}: step {self.step}>"


#: ``Checkpointer.restore`` returned nothing: the next save is a fresh start (no parent).
ROOT = "root"


class Model:
    """What the user saved, and which of it is the run they continue (see the module doc)."""

    def __init__(self) -> None:
        self.nodes: dict[int, Node] = {}
        self.head: Node | None = None  # the newest save: the run continues from it
        self._uid = 0

    def new_uid(self) -> int:
        self._uid += 1
        return self._uid

    def add(
        self, uid: int, step: int, m_seed: int, base: Node | None, origin: str, *, restored: bool = False
    ) -> Node:
        """Save ``uid`` of ``step``, continuing from ``base`` (the last save, or what a restore
        returned: ``restored``, with ``base`` None for a fresh start): its parent is ``base``
        if that has the same step (saved again: the earlier save stays on the timeline, just
        older), else the newest snapshot of ``base``'s timeline below ``step`` (a lower step
        leaves the ones above behind)."""
        p = base
        if p is None or p.step != step:
            while p is not None and p.step >= step:
                p = p.parent
        n = Node(uid, step, m_seed, p, origin)
        n.branch = p is not None and (restored or p is not base)
        n.fresh = restored and base is None
        self.nodes[uid] = n
        self.head = n
        return n

    def chain(self, head: Node | None = None) -> list[Node]:
        """The current timeline (or ``head``'s), newest first."""
        out, n = [], self.head if head is None else head
        while n is not None:
            out.append(n)
            n = n.parent
        return out


# -- the inspector --------------------------------------------------------------------------------


@dataclass
class Copy:
    """One copy of one snapshot on one tier, as the inspector found it."""

    tier: str
    step: int
    order: tuple[int, int] | None  # (generation, step); None: its record does not decode
    meta: tuple[int, int, int] | None  # (uid, step, m_seed) its tree claims
    listed: bool  # the engine lists it (its commit record / memory manifest is valid)
    intact: bool  # the engine would load it: every byte verifies
    run: str = ""
    sealed: bool = True
    deps: tuple[str, ...] = ()  # files (keys on its tier) it relies on
    ranges: tuple[tuple[str, int, int, str], ...] = ()  # memory: (slot, start, end, checksum) of chunks
    problem: str = ""
    bad_key: str | None = None  # the chunk object that failed, if one did
    made_ns: int = 0  # memory: when its manifest was written
    #: the failing chunk object holds the same bytes in another encoding (K6)
    reencoded: bool = False
    content_problem: str | None = None  # intact copies: how it differs from what was saved

    @property
    def uid(self) -> int | None:
        return None if self.meta is None else self.meta[0]

    def __repr__(self) -> str:
        state = "intact" if self.intact else ("listed, broken" if self.listed else "unlisted")
        return f"<{self.tier} step {self.step} uid {self.uid} {self.order} {state} {self.problem}>"


@dataclass
class Scan:
    copies: dict[str, list[Copy]]
    run: str | None  # what the storage tier's run record names
    foreign: dict[str, bytes | None] = field(default_factory=dict)

    def on(self, tier: str, uid: int) -> Copy | None:
        return next((c for c in self.copies[tier] if c.uid == uid), None)


def _sig(path: Path) -> tuple[int, int, int] | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return (st.st_ino, st.st_size, st.st_mtime_ns)


def _read(path: Path) -> bytes | None:
    try:
        return path.read_bytes()
    except (FileNotFoundError, NotADirectoryError, IsADirectoryError):
        return None


def decode_chunk(codec: str, stored: bytes, nbytes: int) -> bytes:
    """An independent decoder of the chunk codecs in docs/format.md."""
    if codec == "raw/1":
        if len(stored) != nbytes:
            raise ValueError("raw chunk of the wrong size")
        return stored
    m = re.fullmatch(r"zstd(?:-bg([248]))?/1", codec)
    if m is None:
        raise ValueError(f"unknown codec {codec}")
    raw = zstandard.ZstdDecompressor().decompress(stored, max_output_size=nbytes)
    if len(raw) != nbytes:
        raise ValueError("wrong decoded size")
    g = int(m.group(1) or 1)
    if g == 1:
        return raw
    return np.frombuffer(raw, dtype=np.uint8).reshape(g, -1).T.tobytes()


def digest(data: bytes | memoryview) -> str:
    return xxhash.xxh3_128(data).hexdigest()


def _build(m: Any, shard: bytearray) -> Any:
    """The state a manifest's tree describes, its tensors read from ``shard``."""
    whole = torch.frombuffer(shard, dtype=torch.uint8) if len(shard) else torch.empty(0, dtype=torch.uint8)
    tensors = [
        whole[e.offset : e.offset + e.nbytes].view(e.dtype).reshape(e.shape)
        if e.nbytes
        else torch.empty(e.shape, dtype=e.dtype)
        for e in m.tensors
    ]

    def walk(node: Any) -> Any:
        if isinstance(node, TensorRef):
            return tensors[node.index]
        if isinstance(node, StatefulRecord):
            return walk(node.state)
        if isinstance(node, dict):
            return {k: walk(v) for k, v in node.items()}
        if isinstance(node, list):
            return [walk(v) for v in node]
        if isinstance(node, tuple):
            return tuple(walk(v) for v in node)
        return node

    return walk(m.state_tree())


def _judge(c: Copy, m: Any, shard: bytearray) -> None:
    """Fill in ``c.content_problem``: does the intact copy hold what its save held?"""
    state = _build(m, shard)
    meta = meta_of(state)
    if meta is None or meta != c.meta:
        c.content_problem = f"its tree says {meta}"
        return
    c.content_problem = diff(state, content(*meta))


_persist_cache: dict[tuple[Any, ...], Copy] = {}


def _persistent_copy(root: Path, tier: str, name: str) -> Copy | None:
    """One commit record of a persistent tier, followed to every byte it names."""
    m_step = re.fullmatch(r"step-(\d{12})", name)
    if m_step is None:
        return None  # not a commit key: a foreign file
    step = int(m_step.group(1))
    ckey = f"commits/{name}"
    mkey = manifest_key(step, 0, 1)
    raw = _read(root / ckey)
    if raw is None:
        return None
    try:
        rec = decode_commit(raw, ckey)
        if rec.step != step:
            raise CorruptCheckpointError("names another step")
    except CorruptCheckpointError as exc:
        return Copy(tier, step, None, None, False, False, deps=(ckey,), problem=f"commit record: {exc}")
    order = (rec.generation, step)
    c = Copy(tier, step, order, None, True, False, run=rec.run, deps=(ckey, mkey))
    entry = next((e for e in rec.manifests if e[0] == mkey), None)
    mraw = _read(root / mkey)
    if rec.world_size != 1 or entry is None:
        c.problem = "commit record of another shape"
        return c
    if mraw is None:
        c.problem = "manifest missing"
        return c
    if len(mraw) != entry[1] or digest(mraw) != entry[2]:
        c.problem = "manifest does not match its commit record"
        return c
    try:
        m = decode_manifest(mraw, mkey)
    except CorruptCheckpointError as exc:
        c.problem = f"manifest: {exc}"
        return c
    if (m.step, m.rank, m.world_size) != (step, 0, 1) or m.generation != rec.generation:
        c.problem = "manifest of another snapshot"
        return c
    c.meta = meta_of(m.state_tree())
    c.deps = (ckey, mkey, *sorted({ch.key for ch in m.chunks}))
    key = (tier, str(root), digest(raw), digest(mraw), tuple(_sig(root / k) for k in c.deps[2:]))
    hit = _persist_cache.get(key)
    if hit is not None:
        return dataclasses.replace(hit)
    shard = bytearray(m.total_bytes)
    for ch in m.chunks:
        path = root / ch.key
        try:
            with open(path, "rb") as f:
                f.seek(ch.at)
                stored = f.read(ch.stored_nbytes)
        except OSError:
            c.problem, c.bad_key = f"chunk {ch.key} missing", ch.key
            break
        if len(stored) != ch.stored_nbytes:
            c.problem, c.bad_key = f"chunk {ch.key} truncated", ch.key
            break
        try:
            data = decode_chunk(ch.codec, stored, ch.nbytes)
        except (ValueError, zstandard.ZstdError) as exc:
            c.problem, c.bad_key = f"chunk {ch.key}: {exc}", ch.key
            break
        if digest(data) != ch.checksum:
            c.problem, c.bad_key = f"chunk {ch.key} fails its checksum", ch.key
            break
        shard[ch.offset : ch.offset + ch.nbytes] = data
    else:
        c.intact = True
        _judge(c, m, shard)
    if c.bad_key is not None:
        bad = next(ch for ch in m.chunks if ch.key == c.bad_key)
        whole = _read(root / bad.key)
        with contextlib.suppress(ValueError, zstandard.ZstdError):
            c.reencoded = (
                whole is not None and digest(decode_chunk(bad.codec, whole, bad.nbytes)) == bad.checksum
            )
    if len(_persist_cache) > 4096:
        _persist_cache.clear()
    _persist_cache[key] = dataclasses.replace(c)
    return c


def scan_persistent(root: Path, tier: str) -> list[Copy]:
    try:
        names = sorted(os.listdir(root / "commits"))
    except (FileNotFoundError, NotADirectoryError):
        return []
    out = []
    for name in names:
        c = _persistent_copy(root, tier, name)
        if c is not None:
            out.append(c)
    return out


def scan_memory(rank_dir: Path) -> list[Copy]:
    """The memory tier as a new process would adopt it (and as the open one holds it)."""
    try:
        names = sorted(os.listdir(rank_dir))
    except (FileNotFoundError, NotADirectoryError):
        return []
    slots: dict[str, bytes] = {}
    for s in SLOT_NAMES:
        data = _read(rank_dir / s)
        if data is not None:
            slots[s] = data
    found: list[tuple[Copy, Any, str]] = []
    for name in names:
        mm = re.fullmatch(r"step-(\d{12})\.manifest", name)
        if mm is None:
            continue
        step = int(mm.group(1))
        raw = _read(rank_dir / name)
        if raw is None:
            continue
        try:
            m = decode_manifest(raw, name, allow_unsealed=True)
            if m.step != step:
                raise CorruptCheckpointError("describes another step")
            slot = check_memory_manifest(m, name)
        except CorruptCheckpointError as exc:
            found.append(
                (Copy("memory", step, None, None, False, False, deps=(name,), problem=str(exc)), None, "")
            )
            continue
        ranges = tuple((slot, ch.at, ch.at + ch.nbytes, ch.checksum) for ch in m.chunks)
        c = Copy(
            "memory",
            step,
            m.order,
            meta_of(m.state_tree()),
            True,
            False,
            run=m.run,
            sealed=m.sealed,
            deps=(name, slot),
            ranges=ranges,
        )
        st = _sig(rank_dir / name)
        c.made_ns = st[2] if st else 0
        data = slots.get(slot)
        if not data:
            c.listed, c.problem = False, "its slot file is missing"
        found.append((c, m, slot))
    # two manifests naming one slot: the newer one wins (the slot holds its bytes)
    for c, _m, slot in found:
        if c.listed and any(o.listed and s == slot and o.order > c.order for o, _, s in found if o is not c):
            c.listed, c.problem = False, "a newer snapshot names its slot"
    for c, m, slot in found:
        if not c.listed:
            continue
        data = slots[slot]
        shard = bytearray(m.total_bytes)
        ok = True
        for ch in m.chunks:
            piece = data[ch.at : ch.at + ch.nbytes]
            piece = piece + bytes(ch.nbytes - len(piece))  # past the end of the file: zeros
            if ch.checksum and digest(piece) != ch.checksum:
                c.problem = f"chunk at {ch.at} fails its checksum"
                ok = False
                break
            shard[ch.offset : ch.offset + ch.nbytes] = piece
        if ok:
            c.intact = True  # an unsealed snapshot is sealed with whatever its slot holds
            _judge(c, m, shard)
    return [c for c, _, _ in found]


def read_run(storage: Path) -> str | None:
    raw = _read(storage / "run")
    if raw is None:
        return None
    try:
        return decode_run(raw)
    except CorruptCheckpointError:
        return None


def scan(roots: dict[str, Path]) -> Scan:
    """Every copy on every tier (``roots``: tier -> directory; memory: the rank directory)."""
    return Scan(
        {
            "memory": scan_memory(roots["memory"]),
            "local": scan_persistent(roots["local"], "local"),
            "storage": scan_persistent(roots["storage"], "storage"),
        },
        read_run(roots["storage"]),
    )


def abandoned(orders: list[tuple[int, int]]) -> set[tuple[int, int]]:
    """The engine's rule (docs/format.md, the timeline), from its definition: ``(g, s)`` is
    abandoned when a newer generation holds a lower step."""
    out = set()
    for g, s in orders:
        if any(g2 > g and s2 < s for g2, s2 in orders):
            out.add((g, s))
    return out


def usable(c: Copy, tiers: tuple[str, ...], run_known: str | None) -> bool:
    """The engine would consider this copy in a restore (a memory snapshot of another run is
    not restored once the storage tier names its run)."""
    if c.tier not in tiers or not c.listed:
        return False
    return not (c.tier == "memory" and run_known and c.run and c.run != run_known)


def model_pick(
    model: Model,
    s: Scan,
    tiers: tuple[str, ...],
    run_known: str | None,
    want: int | None,
    order_uid: dict[tuple[int, int], int] | None = None,
) -> Node | None:
    """What a restore must return: for ``latest``, the newest save of the current timeline
    with an intact copy on a tier this Checkpointer reads; for ``step=S``, the newest save of
    step ``S`` with one, whichever timeline it is on (the user named it: a step the run left
    behind is not hidden from an explicit restore, and the run continues from it).

    The current timeline is the one the surviving evidence names: the newest save that still
    has a valid record (a commit record, a memory manifest) on these tiers, and its ancestry.
    When every record of the newest saves is gone (a wiped tier), nothing can tell that the
    older saves were left behind, and the engine is not asked to.  A record whose manifest
    the test damaged still names its (generation, step): ``order_uid`` (what the test saw
    there before) tells whose it is."""

    def uid(c: Copy) -> int | None:
        if c.uid is not None:
            return c.uid
        return (order_uid or {}).get(c.order) if c.order else None

    if want is None:
        seen = [
            u
            for t in tiers
            for c in s.copies[t]
            if usable(c, tiers, run_known) and (u := uid(c)) in model.nodes
        ]
        if not seen:
            return None
        candidates = model.chain(model.nodes[max(seen)])
        root = candidates[-1]
        if root.fresh:
            # A fresh start records no ancestry, so it abandons nothing older (the engine keeps
            # every older generation on the timeline, newest first, up to the lowest step the
            # run branched at since): a good older step is never hidden (docs/reliability.md)
            bound = min(
                (n.parent.step for n in candidates if n.branch and n.parent is not None), default=None
            )
            older = [
                n for n in model.nodes.values() if n.uid < root.uid and (bound is None or n.step <= bound)
            ]
            candidates += sorted(older, key=lambda n: -n.uid)
    else:
        candidates = sorted((n for n in model.nodes.values() if n.step == want), key=lambda n: -n.uid)
    for n in candidates:
        for t in tiers:
            c = s.on(t, n.uid)
            if c is not None and c.intact and usable(c, tiers, run_known):
                return n
    return None


# -- the test's own damage ------------------------------------------------------------------------


@dataclass
class Damage:
    """Objects the test damaged (per tier: key -> the file's signature right after, or None
    when deleted), and bytes it flipped in slot files.  A copy counts as damaged by the test
    only while the damage is still there (the engine may have replaced the object since)."""

    roots: dict[str, Path]
    files: dict[tuple[str, str], tuple[tuple[int, int, int] | None, int]] = field(default_factory=dict)
    #: byte ranges of slot files the test flipped, cut off or deleted: (slot, start, end, rule,
    #: time); a memory snapshot older than the damage that holds those bytes is damaged
    slot_ranges: list[tuple[str, int, int, int, int]] = field(default_factory=list)
    wiped: dict[str, int] = field(default_factory=dict)  # tier -> rule
    #: checksums of sealed memory chunks whose bytes the test flipped (K3: what a salvage of
    #: them writes fails those checksums)
    tainted: set[str] = field(default_factory=set)

    def taints(self, c: Copy) -> bool:
        """``c`` is broken by a chunk object holding bytes the test flipped in memory."""
        if c.bad_key is None:
            return False
        m = re.search(r"/([0-9a-f]{32})\.", c.bad_key)
        return m is not None and m.group(1) in self.tainted

    def record(self, tier: str, key: str, rule: int) -> None:
        self.files[(tier, key)] = (_sig(self.roots[tier] / key), rule)

    def live(self, tier: str, key: str, since: int = 0) -> bool:
        got = self.files.get((tier, key))
        if got is not None and got[1] >= since:
            sig, _ = got
            now = _sig(self.roots[tier] / key)
            if sig is None:
                if now is None:
                    return True
            elif now == sig:
                return True
        w = self.wiped.get(tier)
        return w is not None and w >= since and not (self.roots[tier] / key).exists()

    def touches(self, c: Copy, since: int = 0) -> bool:
        """The test's damage (done in rule ``since`` or later) is in an object ``c`` relies on."""
        if any(self.live(c.tier, k, since) for k in c.deps):
            return True
        if c.tier != "memory":
            return False
        for slot, start, end, rule, t_ns in self.slot_ranges:
            if rule < since or c.made_ns >= t_ns:
                continue
            if any(s == slot and lo < end and start < hi for s, lo, hi, _ in c.ranges):
                return True
        return False

    def hit_slot(self, scan: Scan, slot: str, start: int, end: int, rule: int) -> None:
        """The test changed bytes ``[start, end)`` of ``slot`` (a flip, a cut, a deletion)."""
        self.slot_ranges.append((slot, start, end, rule, time.time_ns()))
        self.tainted |= {
            r[3]
            for c in scan.copies["memory"]
            if c.listed and c.sealed
            for r in c.ranges
            if r[0] == slot and r[1] < end and start < r[2]
        }


# -- foreign files --------------------------------------------------------------------------------

#: Names a user or a file system leaves in a checkpoint tree: never flashckpt keys, never
#: flashckpt's temporary names, never where flashckpt needs a directory.
FOREIGN = (
    "README.txt",
    ".DS_Store",
    "notes",
    "run.bak",
    "commits/README",
    "commits/step-5",
    "commits/step-000000000003.bak",
    "commits/.nfs000000000123abcd00000001",
    "chunks/.DS_Store",
    "chunks/ab/file copy 1",
    "chunks/db/.nfs000000000123abcd00000002",
    "chunks/9f/9f2c0000000000000000000000000000.raw-1.orig",
    "chunks/zz/readme",
    "steps/README",
    "steps/000000000001/notes.txt",
    "steps/000000000002/old.manifest",
    "steps/000000000099/r00000-of-00001.manifest.bak",
)


# -- retention, observed ------------------------------------------------------------------------


@dataclass(frozen=True)
class Retirement:
    """Retention is about to retire ``step`` on ``tier``; ``listed``: what the tier's commit
    records named at that moment, as ``(uid, order)`` (uid None when unreadable)."""

    tier: str
    step: int
    listed: tuple[tuple[int | None, tuple[int, int]], ...]


def watch_retention(roots: dict[str, Path], sink: Any) -> Any:
    """Register a ``retention.delete`` callback that records a :class:`Retirement` with
    ``sink`` (called on the persist thread, before the commit record goes).  Returns the
    function that unregisters it."""
    by_url = {f"file://{Path(r).absolute()}": t for t, r in roots.items() if t != "memory"}

    def seen(**info: Any) -> None:
        tier = by_url.get(str(info.get("tier")))
        if tier is None:
            return
        listed = tuple(
            (c.uid, c.order) for c in scan_persistent(Path(roots[tier]), tier) if c.listed and c.order
        )
        sink(Retirement(tier, int(info["step"]), listed))

    return hooks.on("retention.delete", seen)


# -- the crash child ------------------------------------------------------------------------------


def child_main(conn: Any, cfg: dict[str, Any]) -> None:
    """A training process: open a Checkpointer on the test's directories, restore, save the
    planned steps, report each on ``conn``, and wait to be killed (never close).

    ``cfg["hook"]``: ``(point, n)``: at the n-th firing of that event point, report ``AT``
    and stall that thread, so the parent's SIGKILL lands exactly there."""
    lock = threading.Lock()

    def send(*msg: Any) -> None:
        with lock:
            try:
                conn.send(msg)
            except Exception:
                pass

    roots = {"storage": Path(cfg["storage"])}
    if cfg["local"]:
        roots["local"] = Path(cfg["local"])
    watch_retention(roots, lambda r: send("RETIRE", r))
    if cfg.get("hook"):
        point, nth = cfg["hook"]
        seen = [0]

        def at(**info: Any) -> None:
            with lock:
                seen[0] += 1
                n = seen[0]
            if n == nth:
                send("AT", point, {k: str(v) for k, v in info.items() if k != "point"})
                time.sleep(3600)

        hooks.on(point, at)
    try:
        ckpt = flashckpt.Checkpointer(
            cfg["storage"],
            local_dir=cfg["local"],
            memory_dir=cfg["memory"],
            keep=cfg["keep"],
            persist_every=cfg["persist_every"],
            compression=cfg["compression"],
            options=OPTS,
        )
        state = template()
        try:
            r = ckpt.restore(state)
        except flashckpt.FlashCkptError as exc:
            send("RESTORE_FAILED", type(exc).__name__, str(exc))
            time.sleep(3600)
        meta = meta_of(state) if r is not None else None
        problem = None
        if r is not None:
            problem = "no meta" if meta is None else diff(state, content(*meta))
            if meta is not None and meta[1] != r:
                problem = f"restore returned {r}, the state says step {meta[1]}"
        send("RESTORED", r, meta, problem)
        prev = -1 if meta is None else meta[1]
        m_seed = None if meta is None else meta[2]
        for uid, delta, unchanged, wait in cfg["saves"]:
            step = max(0, prev + delta)
            ms = m_seed if unchanged and m_seed is not None else uid
            send("SAVING", uid, step, ms)
            h = ckpt.save(step, content(uid, step, ms))
            send("STAGED", uid)
            if wait and h is not None:
                h.wait(timeout=60)
                send("DURABLE", uid, list(h.durable_on()))
            prev, m_seed = step, ms
        send("END")
    except BaseException as exc:
        send("ERROR", f"{type(exc).__name__}: {exc}", traceback.format_exc())
    time.sleep(3600)


@dataclass
class ChildReport:
    restored: tuple[Any, ...] | None = None  # ("RESTORED", r, meta, problem) / ("RESTORE_FAILED", ...)
    saving: list[tuple[int, int, int]] = field(default_factory=list)  # (uid, step, m_seed) in order
    staged: set[int] = field(default_factory=set)
    durable: dict[int, list[str]] = field(default_factory=dict)
    retired: list[Retirement] = field(default_factory=list)
    at: tuple[Any, ...] | None = None
    error: str | None = None
    ended: bool = False
    hung: bool = False
    exitcode: int | None = None
    messages: list[tuple[Any, ...]] = field(default_factory=list)


_ctx: Any = None


def fork_context() -> Any:
    """A fork server that has imported torch and flashckpt once, so that a crash child starts
    in milliseconds instead of seconds."""
    global _ctx
    if _ctx is None:
        ctx = multiprocessing.get_context("forkserver")
        ctx.set_forkserver_preload(["tests.lifecycle_model"])
        _ctx = ctx
    return _ctx


def stop_fork_server() -> None:
    """End the fork server and the resource tracker this module started (none stays behind)."""
    global _ctx
    if _ctx is None:
        return
    from multiprocessing import forkserver, resource_tracker

    for stop in (forkserver._forkserver._stop, resource_tracker._resource_tracker._stop):
        try:
            stop()
        except Exception:
            pass
    _ctx = None


def run_child(cfg: dict[str, Any], kill: tuple[Any, ...], timeout_s: float = 60.0) -> ChildReport:
    """Start the crash child and SIGKILL it when ``kill`` says: ``("hook",)`` when it reports
    reaching its event point, ``("staged", k)`` after its k-th save returned, ``("delay", s)``
    s seconds after its restore returned, and in any case once it ends or fails.  Then read
    everything it reported before it died."""
    ctx = fork_context()
    rx, tx = ctx.Pipe(duplex=False)
    proc = ctx.Process(target=child_main, args=(tx, cfg), name="lifecycle-crash", daemon=True)
    proc.start()
    tx.close()
    rep = ChildReport()
    deadline = time.monotonic() + timeout_s
    fire_at: float | None = None

    def take(msg: tuple[Any, ...]) -> bool:
        """Record one message; True if it is the moment to kill."""
        rep.messages.append(msg)
        kind = msg[0]
        if kind in ("RESTORED", "RESTORE_FAILED"):
            rep.restored = msg
        elif kind == "SAVING":
            rep.saving.append((msg[1], msg[2], msg[3]))
        elif kind == "STAGED":
            rep.staged.add(msg[1])
        elif kind == "DURABLE":
            rep.durable[msg[1]] = list(msg[2])
        elif kind == "AT":
            rep.at = msg
        elif kind == "RETIRE":
            rep.retired.append(msg[1])
        elif kind == "ERROR":
            rep.error = f"{msg[1]}\n{msg[2]}"
        elif kind == "END":
            rep.ended = True
        if kind in ("END", "ERROR", "RESTORE_FAILED"):
            return True
        if kill[0] == "hook" and kind == "AT":
            return True
        return kill[0] == "staged" and kind == "STAGED" and len(rep.staged) >= kill[1]

    try:
        while True:
            now = time.monotonic()
            if now >= deadline:
                rep.hung = True
                break
            if fire_at is not None and now >= fire_at:
                break
            limit = min(deadline, fire_at) if fire_at is not None else deadline
            if not rx.poll(max(0.0, limit - now)):
                continue
            try:
                msg = rx.recv()
            except EOFError:
                break  # it died on its own
            if take(msg):
                break
            if kill[0] == "delay" and msg[0] == "RESTORED":
                fire_at = time.monotonic() + kill[1]
    finally:
        proc.kill()
        proc.join(30)
        while True:
            try:
                if not rx.poll(0):
                    break
                take(rx.recv())
            except (EOFError, OSError):
                break
        rx.close()
        rep.exitcode = proc.exitcode
        proc.close()
    return rep
