"""Reading a multi-rank step as a whole: resharding DTensors, consolidating for offline use.

A step saved by N ranks holds, per rank, the local shards of its DTensors with their global
offsets (``format.DTensorRef``).  Any region of a global tensor can be assembled from the
shards that overlap it; that serves both

* ``restore`` in a job with another world size (or mesh): each rank fills its live
  DTensors' local shards from whichever saved shards overlap them, and
* ``flashckpt.load`` of a multi-rank step: whole tensors.

Tensors and values that are not DTensors come from one saved rank (``source_rank``): in the
jobs that reshard (FSDP, HSDP, TP) they are replicated.  Reads go to the storage tier only
(memory and local tiers hold the old world's shards under other names) and every chunk read
is verified.  Callable from any thread; the Checkpointer calls it on the training thread.
"""

from __future__ import annotations

import threading
from concurrent.futures import Executor
from typing import Any

import torch

from flashckpt._config import Options
from flashckpt.coordination.inventory import read_commit, read_committed_manifest
from flashckpt.errors import CorruptCheckpointError, StateMismatchError
from flashckpt.format import (
    CODEC_RAW,
    DTensorRef,
    Manifest,
    checksum,
    tensor_nbytes,
    tree_leaves,
)
from flashckpt.staging.stager import check_fits
from flashckpt.staging.statewalk import build, load_into
from flashckpt.storage import Backend
from flashckpt.transfer.codec import decode
from flashckpt.transfer.futures import run_all
from flashckpt.transfer.store import retrying


class StepReader:
    """Every rank's manifest of one committed step, and verified tensor reads from it."""

    def __init__(
        self, be: Backend, step: int, opts: Options, pool: Executor, *, cache_bytes: int | None = None
    ) -> None:
        """``cache_bytes``: keep at most this many bytes of verified chunks (the oldest go
        first; ``None``: every chunk read, for as long as this reader lives)."""
        self.be, self.step, self.opts, self.pool = be, step, opts, pool
        self.cache_bytes = cache_bytes
        self.world = read_commit(be, step, opts).world_size
        self.manifests: list[Manifest] = run_all(
            pool, lambda r: read_committed_manifest(be, step, r, self.world, opts), range(self.world)
        )
        self.trees = [m.state_tree() for m in self.manifests]
        self.pieces: dict[str, list[tuple[int, DTensorRef]]] = {}
        for r, tree in enumerate(self.trees):
            for path, ref in tree_leaves(tree):
                if isinstance(ref, DTensorRef):
                    self.pieces.setdefault(path, []).append((r, ref))
        for path, pieces in self.pieces.items():
            self._check_pieces(path, pieces)
        self._chunks: dict[str, bytes] = {}
        self._lock = threading.Lock()
        self.bytes_read = 0

    def _check_pieces(self, path: str, pieces: list[tuple[int, DTensorRef]]) -> None:
        """The saved shards of one DTensor must agree with each other: each is valid alone
        (``decode_manifest`` checked it against its own tensor table), but a reader that
        trusted rank 0's global shape and dtype would mix, or mis-size, the others.  Their
        bytes together must also be able to cover the global tensor: that bounds what
        :meth:`consolidate` allocates by what is actually stored."""
        rank0, ref0 = pieces[0]
        dtype = self.manifests[rank0].tensors[ref0.index].dtype
        stored = 0
        for rank, ref in pieces:
            local = self.manifests[rank].tensors[ref.index]
            if ref.shape != ref0.shape or local.dtype != dtype:
                raise CorruptCheckpointError(
                    f"step {self.step}: the saved shards of {path or '<root>'} disagree: rank {rank0} has "
                    f"a {list(ref0.shape)} {dtype} DTensor, rank {rank} a {list(ref.shape)} {local.dtype} one"
                )
            stored += local.nbytes
        if tensor_nbytes(dtype, ref0.shape) > stored:
            raise CorruptCheckpointError(
                f"step {self.step}: the saved shards of {path or '<root>'} ({stored} bytes) cannot cover "
                f"its global shape {list(ref0.shape)}"
            )

    @property
    def has_dtensors(self) -> bool:
        return bool(self.pieces)

    # -- bytes --------------------------------------------------------------------------------
    def tensor(self, rank: int, index: int) -> torch.Tensor:
        """Saved tensor ``index`` of ``rank``, as a fresh CPU tensor (verified)."""
        m = self.manifests[rank]
        e = m.tensors[index]
        check_fits(e.nbytes, None, f"tensor {index} of rank {rank} of step {self.step}")
        out = torch.empty(e.nbytes, dtype=torch.uint8)
        if e.nbytes:
            dst = out.numpy()
            for c in m.chunks:
                lo, hi = max(c.offset, e.offset), min(c.offset + c.nbytes, e.offset + e.nbytes)
                if lo < hi:
                    data = self._chunk(m, c.key, c.at, c.nbytes, c.stored_nbytes, c.codec, c.checksum)
                    dst[lo - e.offset : hi - e.offset] = memoryview(data)[lo - c.offset : hi - c.offset]
        return out.view(e.dtype).view(e.shape)

    def _chunk(self, m: Manifest, key: str, at: int, n: int, stored: int, codec: str, digest: str) -> bytes:
        with self._lock:
            hit = self._chunks.get(digest)
        if hit is not None:
            return hit
        check_fits(stored + (n if codec != CODEC_RAW else 0), None, f"chunk {key} of step {self.step}")
        buf = bytearray(stored)
        got = retrying(self.be, self.opts).get_into(key, memoryview(buf), offset=at)
        if got != stored:
            raise CorruptCheckpointError(f"chunk {key} on {self.be.url} is truncated ({got} of {stored})")
        if codec != CODEC_RAW:
            raw = bytearray(n)
            decode(codec, memoryview(buf), memoryview(raw))
            buf = raw
        if checksum(buf) != digest:
            raise CorruptCheckpointError(f"chunk {key} on {self.be.url} fails its checksum")
        data = bytes(buf)
        with self._lock:
            self._chunks[digest] = data
            self.bytes_read += stored
            if self.cache_bytes is not None:
                held = sum(len(v) for v in self._chunks.values())
                for old in list(self._chunks):
                    if held <= self.cache_bytes or old == digest:
                        break
                    held -= len(self._chunks.pop(old))
        return data

    # -- regions ------------------------------------------------------------------------------
    def fill(self, path: str, target: torch.Tensor, offset: tuple[int, ...], shape: tuple[int, ...]) -> None:
        """Fill ``target`` (the region ``offset`` + ``target.shape`` of the global tensor at
        ``path``, whose global shape must be ``shape``) from the saved shards."""
        pieces = self.pieces.get(path)
        if not pieces:
            raise StateMismatchError(f"{path or '<root>'}: the checkpoint has no DTensor here")
        if pieces[0][1].shape != shape:
            raise StateMismatchError(
                f"{path}: the global shape is {list(shape)}, the checkpoint's {list(pieces[0][1].shape)}"
            )
        covered = torch.zeros(target.shape, dtype=torch.bool)
        for rank, ref in pieces:
            t_sl, p_sl = [], []
            for d in range(len(shape)):
                n = self.manifests[rank].tensors[ref.index].shape[d]
                lo = max(offset[d], ref.offset[d])
                hi = min(offset[d] + target.shape[d], ref.offset[d] + n)
                if lo >= hi:
                    break
                t_sl.append(slice(lo - offset[d], hi - offset[d]))
                p_sl.append(slice(lo - ref.offset[d], hi - ref.offset[d]))
            else:
                region = covered[tuple(t_sl)]
                if bool(region.all()):
                    continue  # a replica of what is already there
                src = self.tensor(rank, ref.index)
                if src.dtype != target.dtype:
                    raise StateMismatchError(f"{path}: dtype {target.dtype}, the checkpoint's {src.dtype}")
                target[tuple(t_sl)] = src[tuple(p_sl)]
                covered[tuple(t_sl)] = True
        if not bool(covered.all()):
            raise CorruptCheckpointError(f"{path}: the saved shards do not cover the region being loaded")

    # -- whole steps --------------------------------------------------------------------------
    def restore_into(self, state: Any, source_rank: int) -> None:
        """Load into a live state: DTensors from every overlapping shard, the rest from
        ``source_rank``'s own shard."""
        tree = self.trees[source_rank]

        def materialize(i: int, target: torch.Tensor | None) -> torch.Tensor:
            src = self.tensor(source_rank, i)
            if target is not None and target.dtype == src.dtype and target.shape == src.shape:
                target.copy_(src)
                return target
            return src

        def fill_dtensor(path: str, target: Any) -> None:
            from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

            mesh, placements = target.device_mesh, target.placements
            _, offset = compute_local_shape_and_global_offset(target.shape, mesh, placements)
            local = target.to_local()
            buf = torch.empty(local.shape, dtype=local.dtype)
            self.fill(path, buf, tuple(int(o) for o in offset), tuple(int(d) for d in target.shape))
            local.copy_(buf)

        load_into(state, tree, materialize, fill_dtensor=fill_dtensor)

    def consolidate(self) -> Any:
        """A fresh state: every DTensor as its whole global tensor, the rest from rank 0."""

        def materialize(i: int, _target: torch.Tensor | None) -> torch.Tensor:
            return self.tensor(0, i)

        def whole(path: str, ref: DTensorRef) -> torch.Tensor:
            dtype = self.manifests[0].tensors[ref.index].dtype
            # the shards were checked to be able to cover this (so it is no larger than what
            # is stored); it must also fit in memory
            check_fits(tensor_nbytes(dtype, ref.shape), None, f"{path or '<root>'} of step {self.step}")
            out = torch.empty(ref.shape, dtype=dtype)
            self.fill(path, out, (0,) * len(ref.shape), ref.shape)
            return out

        return build(self.trees[0], materialize, dtensor=whole)
