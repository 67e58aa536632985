"""What a storage tier holds, read-only: the public face the command line (and any tool)
reads checkpoints through.

:class:`Catalog` lists the committed steps of one tier with their records validated, and
verifies a step by re-reading every chunk of every shard against its checksum, one chunk at
a time (bounded memory), the shards checked against each other.  Nothing here writes.
Any thread; a Catalog holds a small pool of reader threads until :meth:`Catalog.close`.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from flashckpt._config import Options, memory_root, storage_id
from flashckpt.backends import LocalBackend
from flashckpt.coordination.inventory import committed_steps, read_commit, read_committed_manifest
from flashckpt.coordination.reshard import StepReader
from flashckpt.errors import CheckpointNotFound, CorruptCheckpointError, ObjectNotFound
from flashckpt.format import SHARD_PATTERN, DTensorRef, Manifest, TensorRef, tensor_nbytes, tree_leaves
from flashckpt.staging.memory_tier import memory_steps, read_memory_manifest
from flashckpt.staging.stager import check_fits
from flashckpt.storage import Backend, open_backend
from flashckpt.transfer.reader import fetch_chunks


@dataclass(frozen=True)
class StepInfo:
    """One committed step: its commit record's figures (``None`` where the records do not
    validate; ``error`` then says why)."""

    step: int
    world_size: int | None = None
    bytes: int | None = None
    created_unix: float | None = None
    generation: int | None = None
    error: BaseException | None = None


class Catalog:
    """The committed steps of one storage tier (a path, an fsspec URL, or a ``Backend``)."""

    def __init__(
        self,
        storage: str | os.PathLike[str] | Backend,
        *,
        storage_options: dict[str, Any] | None = None,
        options: Options | None = None,
    ) -> None:
        self.opts = options if options is not None else Options()
        self.backend = open_backend(storage, storage_options=storage_options)
        self._owned = not isinstance(storage, Backend)
        if isinstance(self.backend, LocalBackend) and not self.backend.root.is_dir():
            raise CheckpointNotFound(f"no such directory: {self.backend.root}")  # a typo is no empty run
        self._pool = ThreadPoolExecutor(self.opts.io_threads, thread_name_prefix="flashckpt-io")

    def __enter__(self) -> Catalog:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def url(self) -> str:
        return self.backend.url

    def step_numbers(self) -> list[int]:
        """The step numbers with a commit record, lowest first (names only: nothing is read)."""
        return committed_steps(self.backend, self.opts)

    def info(self, step: int) -> StepInfo:
        """``step``'s commit record and every shard's manifest, validated.  Raises what a
        record that does not validate raises (``CorruptCheckpointError``, ``StorageError``)."""
        rec = read_commit(self.backend, step, self.opts)
        total = sum(
            read_committed_manifest(self.backend, step, r, rec.world_size, self.opts).total_bytes
            for r in range(rec.world_size)
        )
        return StepInfo(step, rec.world_size, total, rec.created_unix, rec.generation)

    def steps(self) -> list[StepInfo]:
        """Every committed step, lowest first; a step whose records do not validate is listed
        with its ``error`` (the others are still listed)."""
        out = []
        for step in self.step_numbers():
            try:
                out.append(self.info(step))
            except Exception as exc:  # reported on the step; the others are listed  # noqa: BLE001
                out.append(StepInfo(step, error=exc))
        return out

    def manifests(self, step: int) -> list[Manifest]:
        """Every rank's manifest of ``step``, each validated against the commit record (rank
        order).  Reads records only.  Raises what a record that does not validate raises."""
        rec = read_commit(self.backend, step, self.opts)
        return [
            read_committed_manifest(self.backend, step, r, rec.world_size, self.opts)
            for r in range(rec.world_size)
        ]

    def read_tensor(self, m: Manifest, index: int) -> torch.Tensor:
        """Tensor ``index`` of the shard ``m`` describes (a fresh CPU tensor), read from the
        chunks that hold it, every one verified against its checksum; memory: those chunks."""
        if not 0 <= index < len(m.tensors):
            raise IndexError(f"tensor {index} of a shard of {len(m.tensors)}")
        e = m.tensors[index]
        if e.nbytes == 0:
            return torch.empty(e.shape, dtype=e.dtype)
        lo, hi = e.offset, e.offset + e.nbytes
        chunks = [c for c in m.chunks if c.offset < hi and c.offset + c.nbytes > lo]
        base = min(c.offset for c in chunks)
        end = max(c.offset + c.nbytes for c in chunks)
        if base > lo or end < hi:
            raise CorruptCheckpointError(f"step {m.step}: no chunk holds all of tensor {index}")
        check_fits(end - base, None, f"tensor {index} of step {m.step}")
        buf = bytearray(end - base)
        fetch_chunks(
            self.backend, m.with_chunks(chunks), lambda off, n: memoryview(buf)[off - base : off - base + n],
            self._pool, self.opts,
        )  # fmt: skip
        whole = torch.frombuffer(buf, dtype=torch.uint8)
        return whole[lo - base : hi - base].view(e.dtype).view(e.shape).clone()

    def leaf_specs(self, step: int) -> list[tuple[str, torch.dtype | None, tuple[int, ...]]]:
        """``(key, dtype, shape)`` of every leaf of ``step``'s consolidated state, in the order
        :meth:`leaves` yields them (a DTensor with its global shape; a plain value with dtype
        ``None`` and shape ``()``).  Reads rank 0's records only."""
        rec = read_commit(self.backend, step, self.opts)
        m = read_committed_manifest(self.backend, step, 0, rec.world_size, self.opts)
        out: list[tuple[str, torch.dtype | None, tuple[int, ...]]] = []
        for key, node in tree_leaves(m.state_tree()):
            if isinstance(node, TensorRef):
                e = m.tensors[node.index]
                out.append((key, e.dtype, tuple(e.shape)))
            elif isinstance(node, DTensorRef):
                out.append((key, m.tensors[node.index].dtype, tuple(node.shape)))
            else:
                out.append((key, None, ()))
        return out

    def leaves(self, step: int) -> Iterator[tuple[str, Any]]:
        """``(key, value)`` of every leaf of ``step``'s consolidated state, in tree order: a
        tensor (a fresh CPU tensor, verified; a DTensor as its whole global tensor, from every
        rank's shard; the rest from rank 0's) or a plain value.  Keys join the path with dots,
        as ``inspect`` prints them.  Memory: one tensor and the chunks that hold it (at most
        twice ``Options.chunk_bytes`` of chunks are kept between tensors)."""
        reader = StepReader(self.backend, step, self.opts, self._pool, cache_bytes=2 * self.opts.chunk_bytes)
        for key, node in tree_leaves(reader.trees[0]):
            if isinstance(node, TensorRef):
                yield key, reader.tensor(0, node.index)
            elif isinstance(node, DTensorRef):
                dtype = reader.manifests[0].tensors[node.index].dtype
                check_fits(tensor_nbytes(dtype, node.shape), None, f"{key} of step {step}")
                whole = torch.empty(node.shape, dtype=dtype)
                reader.fill(key, whole, (0,) * len(node.shape), node.shape)
                yield key, whole
            else:
                yield key, node

    def verify(self, step: int, progress: Callable[[int, int], None] | None = None) -> None:
        """Re-read every chunk of every shard of ``step`` and check it against its checksum,
        one chunk at a time; the shards are checked against each other.  Raises
        ``CorruptCheckpointError`` (or ``ObjectNotFound``) for a damaged step.
        ``progress(done, total)``: called with the bytes checked so far after each chunk."""
        reader = StepReader(self.backend, step, self.opts, self._pool)
        total = sum(c.nbytes for m in reader.manifests for c in m.chunks)
        done = 0
        for m in reader.manifests:
            size = max((c.nbytes for c in m.chunks), default=0)
            check_fits(size, None, f"a chunk of step {step}")  # a hostile size fails cleanly
            buf = bytearray(size)  # one chunk at a time: bounded memory
            for c in m.chunks:
                try:
                    fetch_chunks(self.backend, m.with_chunks([c]), _scratch(buf), self._pool, self.opts)
                except (CorruptCheckpointError, ObjectNotFound) as exc:
                    raise CorruptCheckpointError(
                        f"rank {m.rank}, {_held_by(m, c.offset, c.nbytes)}: {exc}"
                    ) from exc
                done += c.nbytes
                if progress is not None:
                    progress(done, total)

    def close(self) -> None:
        self._pool.shutdown(wait=True)
        if self._owned:
            self.backend.close()


@dataclass(frozen=True)
class Copy:
    """One rank's copy of one snapshot on one tier (records only: not verified)."""

    tier: str  # "memory", "mirror" (a peer's shard this node holds), "local" or "storage"
    generation: int
    step: int
    rank: int
    world_size: int
    where: str  # the directory or URL that holds it
    sealed: bool = True  # memory: its checksums are written (a crash mid-persist may leave one unsealed)
    nbytes: int | None = None  # this rank's shard
    created_unix: float | None = None  # when the snapshot was taken


def tier_copies(
    cat: Catalog,
    *,
    memory_dir: str | os.PathLike[str] | None = None,
    local_dir: str | os.PathLike[str] | None = None,
) -> list[Copy]:
    """Every copy the tiers of ``cat``'s storage hold: its commit records; with ``local_dir``,
    each rank's local tier (``local_dir/rNNNNN-of-MMMMM``, or ``local_dir`` itself for one
    process); with ``memory_dir`` (``"default"``: the default memory root of this storage),
    each shard directory there (this node's ranks' own snapshots, or those of ranks that moved
    since, as ``memory``) and the peers' shards its ranks hold as mirrors (``mirror``).
    Records that do not validate are left out (``ls`` and ``verify`` of each tier report
    them); memory snapshots of another storage tier are too."""
    out: list[Copy] = []
    for step in cat.step_numbers():
        try:
            shards = cat.manifests(step)  # every rank's, validated against the commit record
        except Exception:  # left out: it went meanwhile, or does not validate  # noqa: BLE001
            continue
        for m in shards:
            out.append(Copy("storage", m.generation, m.step, m.rank, m.world_size, cat.url,
                            nbytes=m.total_bytes, created_unix=m.created_unix))  # fmt: skip
    if local_dir is not None:
        root = Path(local_dir)
        dirs = (
            sorted(p for p in root.iterdir() if p.is_dir() and SHARD_PATTERN.fullmatch(p.name))
            if root.is_dir()
            else []
        )
        for d in dirs or ([root] if root.is_dir() else []):
            with Catalog(d, options=cat.opts) as local:
                for info in local.steps():
                    if info.error is not None or info.world_size is None:
                        continue
                    rank = int(d.name[1:6]) if d is not root else 0
                    out.append(Copy("local", info.generation or 0, info.step, rank, info.world_size, str(d),
                                    nbytes=info.bytes, created_unix=info.created_unix))  # fmt: skip
    if memory_dir is not None:
        sid = storage_id(cat.url)
        root = memory_root(cat.url, None if str(memory_dir) == "default" else memory_dir)
        dirs = (
            sorted(p for p in root.iterdir() if p.is_dir() and SHARD_PATTERN.fullmatch(p.name))
            if root.is_dir()
            else []
        )
        for d in dirs:
            mirrors = d / "mirrors"
            held = (
                sorted(p for p in mirrors.iterdir() if p.is_dir() and SHARD_PATTERN.fullmatch(p.name))
                if mirrors.is_dir()
                else []
            )
            for where, tier in [(d, "memory"), *((p, "mirror") for p in held)]:
                be = LocalBackend(where, fsync=False, direct_io=False)
                for step in memory_steps(be):
                    try:
                        m = read_memory_manifest(be, step)
                    except Exception:  # left out: a torn or foreign record  # noqa: BLE001
                        continue
                    if m.storage and m.storage != sid:
                        continue
                    out.append(Copy(tier, m.generation, m.step, m.rank, m.world_size, str(where), m.sealed,
                                    m.total_bytes, m.created_unix))  # fmt: skip
    return out


def _held_by(m: Manifest, offset: int, nbytes: int) -> str:
    """The keys of the tensors of shard ``m`` whose bytes overlap ``[offset, offset + nbytes)``,
    as ``inspect`` names them (a few, then how many more)."""
    keys = {
        node.index: key
        for key, node in tree_leaves(m.state_tree())
        if isinstance(node, (TensorRef, DTensorRef))
    }
    hit = [
        keys.get(i, f"tensor {i}")
        for i, e in enumerate(m.tensors)
        if e.nbytes and e.offset < offset + nbytes and e.offset + e.nbytes > offset
    ]
    more = f" and {len(hit) - 4} more" if len(hit) > 4 else ""
    return ("tensor " if len(hit) == 1 else "tensors ") + ", ".join(hit[:4]) + more


def _scratch(buf: bytearray) -> Callable[[int, int], memoryview]:
    return lambda _offset, n: memoryview(buf)[:n]
