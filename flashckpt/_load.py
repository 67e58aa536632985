"""``flashckpt.load``: a consolidated CPU state from a storage URL, for offline use."""

from __future__ import annotations

import logging
import mmap
import os
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Literal

import torch

from flashckpt._config import Options
from flashckpt.coordination.inventory import (
    committed_steps,
    read_commit,
    read_commits,
    read_committed_manifest,
)
from flashckpt.coordination.reshard import StepReader
from flashckpt.coordination.retention import abandoned
from flashckpt.errors import CheckpointNotFound, ConfigError, CorruptCheckpointError
from flashckpt.format import Manifest
from flashckpt.staging.stager import check_fits
from flashckpt.staging.statewalk import build
from flashckpt.storage import Backend, open_backend
from flashckpt.transfer.reader import fetch_chunks

log = logging.getLogger(__name__)


def load(
    url: str | os.PathLike[str] | Backend,
    *,
    step: int | Literal["latest"] = "latest",
    storage_options: dict[str, Any] | None = None,
    options: Options | None = None,
    rank: int | None = None,
) -> dict[str, Any]:
    """Return the state saved at ``step`` (default: the newest intact committed step).

    The result has the saved nesting; tensors are fresh CPU tensors; each ``Stateful`` entry
    (module, optimizer, ...) is the ``state_dict()`` it saved.  Every chunk is verified.  A
    corrupt newest step is skipped with a warning when ``step="latest"``.  Any thread may call
    this; it starts and joins its own I/O threads.

    A step saved by several ranks is consolidated: every DTensor (FSDP2, TP) comes back as its
    whole global tensor, assembled from all shards; everything else comes from rank 0 (in such
    jobs it is replicated).  ``rank=k`` returns rank ``k``'s own shard instead (DTensors as its
    local shards).

    A backend opened here from ``url`` is closed before returning; a ``Backend`` passed in
    stays open (it is the caller's).
    """
    if step != "latest" and (type(step) is not int or step < 0):
        raise ConfigError(f"step must be 'latest' or a non-negative int, got {step!r}")
    opts = options or Options()
    be = open_backend(url, storage_options=storage_options)
    try:
        return _load(be, step, opts, rank)
    finally:
        if not isinstance(url, Backend):  # ours to close (its threads); never the caller's
            be.close()


def _load(be: Backend, step: int | Literal["latest"], opts: Options, rank: int | None) -> dict[str, Any]:
    """Newest first in ``(generation, step)`` order, never a step of a timeline the run left
    (docs/format.md); anything that goes wrong with one step (whatever its type: a hostile
    record can provoke any) makes it unusable, and the next older one is tried."""
    records = read_commits(be, opts)
    left = abandoned([(r.order, r.ancestors) for r in records])
    steps = [r.step for r in records if r.order not in left]
    if step != "latest":  # by name: a step whose records fail validation says why below
        steps = [s for s in committed_steps(be, opts) if s == step]
    if not steps:
        raise CheckpointNotFound(f"no committed step {'' if step == 'latest' else step} at {be.url}")
    last: BaseException | None = None
    with ThreadPoolExecutor(opts.io_threads, thread_name_prefix="flashckpt-io") as pool:
        for s in reversed(steps):
            try:
                return _load_step(be, s, opts, pool, rank)
            except (ConfigError, KeyboardInterrupt):
                raise
            except Exception as exc:  # logged: the next older step is tried  # noqa: BLE001
                log.warning("flashckpt: step %d at %s is unusable: %s", s, be.url, exc)
                last = exc
    raise CheckpointNotFound(f"no intact committed step at {be.url}") from last


def _load_step(
    be: Backend, step: int, opts: Options, pool: ThreadPoolExecutor, rank: int | None
) -> dict[str, Any]:
    t0 = time.perf_counter()
    world = read_commit(be, step, opts).world_size
    if rank is not None and not 0 <= rank < world:
        raise ConfigError(f"rank {rank} is out of range: step {step} was saved by {world} ranks")
    if world > 1 and rank is None:
        reader = StepReader(be, step, opts, pool)
        out = reader.consolidate()
        log.info(
            "flashckpt: loaded step %d from %s, %d ranks consolidated, %d bytes read in %.3f s",
            step,
            be.url,
            world,
            reader.bytes_read,
            time.perf_counter() - t0,
        )
        if not isinstance(out, dict):
            raise CorruptCheckpointError(f"step {step} does not hold a dict state")
        return out
    m = read_committed_manifest(be, step, rank or 0, world, opts)
    check_fits(m.total_bytes, None, f"step {step}")
    buf = mmap.mmap(-1, max(m.total_bytes, 1))
    try:
        fetch_chunks(be, m, lambda off, n: memoryview(buf)[off : off + n], pool, opts)
        out = _build_from(buf, m)
    finally:
        try:
            buf.close()
        except BufferError:  # pragma: no cover - a view escaped; the GC unmaps it
            pass
    log.info(
        "flashckpt: loaded step %d from %s, %d bytes in %.3f s",
        step,
        be.url,
        m.total_bytes,
        time.perf_counter() - t0,
    )
    if not isinstance(out, dict):
        raise CorruptCheckpointError(f"step {step} does not hold a dict state")
    return out


def _build_from(buf: mmap.mmap, m: Manifest) -> Any:
    """Build fresh tensors (clones) from verified bytes; no view of ``buf`` outlives this call."""
    whole = torch.frombuffer(buf, dtype=torch.uint8)

    def materialize(i: int, _target: torch.Tensor | None) -> torch.Tensor:
        e = m.tensors[i]
        return whole[e.offset : e.offset + e.nbytes].view(e.dtype).view(e.shape).clone()

    return build(m.state_tree(), materialize)
