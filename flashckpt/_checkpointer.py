"""The public ``Checkpointer``: stage on ``save``, persist in the background, restore in place.

Call order (one process per rank; every method from the training thread only)::

    ckpt = Checkpointer(storage, local_dir=..., keep=3)
    start = ckpt.restore(state)        # also faults the staging slots in, in the background
    for step in ...:
        ckpt.save(step, state)         # a memory copy; returns a SaveHandle
    ckpt.close()                       # waits, persists the newest snapshot, frees memory

Background threads: ``flashckpt-persist`` (one, ordered jobs), ``flashckpt-hash-*`` (chunk
checksums), ``flashckpt-io-*`` (transfers, verification), ``flashckpt-prefault`` (slot
faulting), ``flashckpt-mirror*`` (peer mirrors, multi-node jobs).  ``close`` joins them all.

Snapshots are ordered by ``(generation, step)`` (docs/format.md): every Checkpointer saves in
a generation newer than everything its ``restore`` saw, so the run a user continues (after a
rollback to an older step, or a fallback past a corrupt one) is the newest, whatever the step
numbers of the steps it abandoned.
"""

from __future__ import annotations

import atexit
import contextlib
import dataclasses
import fcntl
import hashlib
import logging
import os
import secrets
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

import torch

from flashckpt import _hooks as hooks
from flashckpt._config import Options, default_memory_root, node_id, options_from_env
from flashckpt._coordinator import (
    Ancestors,
    Order,
    Source,
    abandoned,
    fetch_chunks,
    plan_sources,
    read_commits,
    read_committed_manifest,
    read_record,
    read_run,
    verify_chunks,
)
from flashckpt._dist import Control
from flashckpt._reshard import StepReader
from flashckpt._secure import open_private, private_dir
from flashckpt._transfer import Job, Persister, PersisterDied, SaveHandle, Tier
from flashckpt.backends import LocalBackend
from flashckpt.errors import (
    CheckpointNotFound,
    ClosedError,
    ConfigError,
    CoordinationError,
    CorruptCheckpointError,
    FlashCkptError,
    StateMismatchError,
    StorageError,
    TransientStorageError,
)
from flashckpt.format import (
    CODEC_RAW,
    MAX_ANCESTORS,
    MAX_STEP,
    SHARD_PATTERN,
    ChunkEntry,
    Manifest,
    TensorEntry,
    decode_manifest,
    manifest_key,
    memory_manifest,
    now,
    shard_name,
)
from flashckpt.replication.mirror import MirrorServer, default_host, fetch, mirror_peers
from flashckpt.staging.memory_tier import MemoryTier
from flashckpt.staging.stager import Slot, Stager, check_fits, restore_copies
from flashckpt.staging.statewalk import check_loadable, find_targets, flatten, load_into
from flashckpt.storage import Backend, open_backend, translate_os_error
from flashckpt.transfer.codec import Compression

log = logging.getLogger(__name__)


def _compression_per_tier(spec: str | dict[str, str | None] | None) -> dict[str, Compression]:
    """``None``: per-tier defaults; ``"zstd[:L]"``/``"none"``: the storage tier; a dict: explicit
    per tier (``{"local": None, "storage": "zstd:3"}``)."""
    if spec is None:
        return {}
    if isinstance(spec, str):
        return {"storage": Compression.parse(spec)}
    if isinstance(spec, dict):
        unknown = set(spec) - {"local", "storage"}
        if unknown:
            raise ConfigError(f"compression: unknown tiers {sorted(unknown)} (use 'local', 'storage')")
        return {k: Compression.parse(v) for k, v in spec.items()}
    raise ConfigError(f"compression must be None, a string or a dict, got {spec!r}")


def _check_step(step: Any, what: str = "step") -> int:
    if type(step) is not int or not 0 <= step <= MAX_STEP:
        raise ConfigError(f"{what} must be an int in [0, {MAX_STEP}], got {step!r}")
    return step


@dataclasses.dataclass
class _RestorePlan:
    """What this rank's tiers hold, the snapshots every rank can load (newest first), per
    snapshot the peers holding a copy of this rank's shard, and the newest generation any
    rank saw anywhere (the next saves are newer than it)."""

    inventory: list[tuple[Tier, dict[Order, Ancestors]]]
    steps: list[Order]
    mirrored: dict[Order, list[int]]
    newest_gen: int
    newest: Order | None  # the newest snapshot every rank can load, whatever ``step`` asked


@dataclasses.dataclass
class _Loaded:
    """A step loaded into the state: from ``tier``, staged in ``slot`` (held busy) under
    ``manifest``; both ``None`` when it was resharded from storage."""

    order: Order
    tier: Tier
    manifest: Manifest | None
    slot: Slot | None
    nbytes: int

    @property
    def step(self) -> int:
        return self.order[1]


@dataclasses.dataclass
class _Progress:
    """Across the steps a restore tries: whether the state was written to, the last error."""

    touched: bool = False
    last_error: BaseException | None = None

    def failed(self, exc: BaseException, *, touched: bool) -> None:
        self.last_error = exc
        self.touched = self.touched or touched


class Checkpointer:
    """Flash checkpoints for one training process.  See the module docstring for call order.

    Args:
        storage: the storage tier: a local path, a ``file://`` URL, or a ``Backend``.
        local_dir: an optional fast local tier (NVMe), written before ``storage``.
        memory_dir: where the staging slots live (default: a per-user, per-storage directory
            under ``/dev/shm``; ``FLASHCKPT_MEMORY_DIR`` overrides the default).
        every: ``save`` stages only when ``step % every == 0`` (or ``force=True``).
        persist_every: snapshot ``k`` (counted in multiples of ``every``) is persisted when
            ``k % persist_every == 0``; the others live in memory only.  Forced saves persist.
        keep: committed steps kept on each persistent tier (``None``: keep all).
        mirror: copies of each rank's snapshots in the memory of peers on other nodes
            (``None``: 1 when the job spans more than one node, else 0).
        compression: ``None`` (default: zstd level 1 for object storage, raw for POSIX tiers),
            ``"zstd"``/``"zstd:LEVEL"``/``"none"`` for the storage tier, or a dict per tier,
            e.g. ``{"local": None, "storage": "zstd:3"}``.
        storage_options: passed to the storage backend.
        process_group: the job's process group (default: the default group, if
            ``torch.distributed`` is initialized); every rank of it constructs a Checkpointer.
        options: tuning knobs (:class:`flashckpt.Options`).

    A constructor that fails releases everything it took (lock, mappings, threads, groups).
    """

    def __init__(
        self,
        storage: str | os.PathLike[str] | Backend,
        *,
        local_dir: str | os.PathLike[str] | Backend | None = None,
        memory_dir: str | os.PathLike[str] | None = None,
        every: int = 1,
        persist_every: int = 1,
        keep: int | None = 3,
        mirror: int | None = None,
        compression: str | dict[str, str | None] | None = None,
        storage_options: dict[str, Any] | None = None,
        process_group: Any = None,
        options: Options | None = None,
    ) -> None:
        for name, v in (("every", every), ("persist_every", persist_every)):
            if type(v) is not int or v < 1:
                raise ConfigError(f"{name} must be an int >= 1, got {v!r}")
        if keep is not None and (type(keep) is not int or keep < 1):
            raise ConfigError(f"keep must be an int >= 1 or None, got {keep!r}")
        if mirror is not None and (type(mirror) is not int or mirror < 0):
            raise ConfigError(f"mirror must be None or an int >= 0, got {mirror!r}")
        self._closed = True  # until built: close() does nothing, nothing is registered
        self._opts = options_from_env(options)
        self._every, self._persist_every, self._keep = every, persist_every, keep
        self._seq = 0  # saves made so far (after `every`): the same on every rank, names a save
        self._restores = 0  # likewise for restores
        # outcome keys of shared commits another rank makes of snapshots this rank holds in
        # memory (a salvage where this rank's shard was there): close waits for them
        self._awaited: list[str] = []
        self._prev: int | None = None  # the last step saved or restored: a lower one starts a generation
        self._prev_saved = False  # whether this generation saved step ``_prev`` (again starts one too)
        self._ancestors: Ancestors = ()  # where this generation's timeline branched off older ones
        self._unlisted: list[tuple[Tier, StorageError]] = []  # tiers the last inventory could not list
        self._handles: list[SaveHandle] = []
        self._sweeper: threading.Thread | None = None  # removes temporary files killed writers left
        self._last: tuple[int, Slot, bool] | None = None  # (step, slot, persisted)
        self._stats: dict[str, Any] = {"saves": 0}
        self._last_handle: SaveHandle | None = None  # the last save's: ``stats`` reads it
        self._stats_lock = threading.Lock()
        self._warned: set[str] = set()  # memory snapshots of other runs, named once
        self._mirror_server: MirrorServer | None = None
        self._addrs: list[tuple[str, int]] = []
        self._mirrors = 0
        with contextlib.ExitStack() as undo:
            self._build(undo, storage, local_dir, memory_dir, compression, storage_options, process_group)
            self._setup_mirrors(mirror, undo)
            undo.pop_all()
        self._closed = False
        atexit.register(self._atexit)
        log.debug(
            "flashckpt: rank %d/%d on node %s, memory tier %s, run %s generation %d",
            self._rank,
            self._world,
            self._node,
            self._rank_dir,
            self._run,
            self._gen,
        )

    def _build(
        self,
        undo: contextlib.ExitStack,
        storage: str | os.PathLike[str] | Backend,
        local_dir: str | os.PathLike[str] | Backend | None,
        memory_dir: str | os.PathLike[str] | None,
        compression: str | dict[str, str | None] | None,
        storage_options: dict[str, Any] | None,
        process_group: Any,
    ) -> None:
        """The constructor's body; every resource taken is registered on ``undo``."""
        self._ctl = Control(process_group, self._opts.coord_timeout_s)
        undo.callback(self._ctl.release)
        self._rank, self._world = self._ctl.rank, self._ctl.world
        self._node = node_id()
        per_tier = _compression_per_tier(compression)
        self._owned: list[Backend] = []  # backends this Checkpointer opened (and closes)
        storage_be = open_backend(
            storage,
            storage_options=storage_options,
            max_concurrency=self._opts.io_threads,
            range_bytes=self._opts.chunk_bytes,
        )
        if isinstance(storage_be, LocalBackend) and not isinstance(storage, Backend):
            storage_be = LocalBackend(storage_be.root, fsync=self._opts.fsync, direct_io=self._opts.direct_io)
        if not isinstance(storage, Backend):
            self._owned.append(storage_be)
        undo.callback(self._close_backends)
        self._tiers: list[Tier] = []
        if local_dir is not None:
            # A node-local disk: in a multi-rank job each rank keeps its shard in its own
            # directory there, with its own commit records (see docs/format.md).
            if isinstance(local_dir, Backend):
                local_be: Backend = local_dir
            else:
                local_be = LocalBackend(
                    Path(local_dir) / shard_name(self._rank, self._world) if self._world > 1 else local_dir,
                    fsync=self._opts.fsync,
                    direct_io=self._opts.direct_io,
                )
                self._owned.append(local_be)
            self._tiers.append(Tier("local", local_be, per_tier.get("local", Compression(None))))
        # Default: compress for object storage (zstd level 1 outruns the network path), not
        # for POSIX tiers (it is slower than NVMe writes here).
        default = Compression(None) if isinstance(storage_be, LocalBackend) else Compression(1)
        self._tiers.append(
            Tier("storage", storage_be, per_tier.get("storage", default), shared=True, holds_run=True)
        )
        #: which storage tier this Checkpointer's snapshots belong to (in every manifest)
        self._storage_id = hashlib.sha256(storage_be.url.encode()).hexdigest()[:16]
        # Every directory from the per-user root (or the memory_dir given) down is created 0700
        # and checked (ours, not a link, no access for others): see flashckpt/_secure.py.
        base = Path(memory_dir) if memory_dir is not None else Path(default_memory_root())
        root = base if memory_dir is not None else base / self._storage_id
        self._memory_dir_given = memory_dir
        self._trusted_above = base.parent
        self._rank_dir = private_dir(root / shard_name(self._rank, self._world), trusted_above=base.parent)
        self._memory_root = self._rank_dir.parent
        self._lock_fd = self._take_lock()
        undo.callback(os.close, self._lock_fd)
        self._stager = Stager(self._rank_dir, self._opts)
        undo.callback(self._stager.close, unlink=False)
        self._mem = MemoryTier(self._rank_dir, self._stager.slots)
        self._mem.adopt()
        self._refuse_foreign_memory()
        self._memory = Tier("memory", self._mem.backend)
        # A copy of this rank's shard in a peer's memory (a mirror, or the shard's own memory
        # left on a node its rank moved away from), fetched into this rank's memory tier.
        self._mirror_tier = Tier("mirror", self._mem.backend)
        self._persister = Persister(self._opts, self._mem, self._stager, self._keep, self._ctl)
        undo.callback(self._persister.close)
        self._lineage()

    def _refuse_foreign_memory(self) -> None:
        """A memory tier holding snapshots saved for another storage tier belongs to another
        job (two jobs given one ``memory_dir``): using it would overwrite them, and a clean
        close would delete them, though they may be that job's only copy of its newest step."""
        others = sorted(
            {m.storage for m in self._mem.holdings() if m.storage and m.storage != self._storage_id}
        )
        if others:
            raise ConfigError(
                f"memory tier {self._rank_dir} holds snapshots of another job (storage tier "
                f"{others[0]}, not {self._storage_id} = {self._tiers[-1].backend.url}): give this "
                "job its own memory_dir, or persist and delete those snapshots first"
            )

    def _lineage(self) -> None:
        """Every rank, at construction (one gather): the node names, this Checkpointer's
        generation (rank 0's clock in microseconds: later Checkpointers save newer snapshots;
        ``restore`` raises it above everything it sees) and the run id (the storage tier's
        run record, else a fresh one)."""
        run, known = secrets.token_hex(8), False
        if self._rank == 0:
            try:
                have = read_run(self._tiers[-1].backend, self._opts)
            except (StorageError, CorruptCheckpointError) as exc:  # restore reports the tier
                log.warning("flashckpt: cannot read the run record of the storage tier: %s", exc)
                have = None
            if have is not None:
                run, known = have, True
        info = self._ctl.all_gather([self._node, time.time_ns() // 1000, run, known])
        self._nodes = [str(i[0]) for i in info]
        self._gen, self._run, self._run_known = int(info[0][1]), str(info[0][2]), bool(info[0][3])

    # -- public API ----------------------------------------------------------------------------
    def __enter__(self) -> Checkpointer:
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        self.close(_raise=exc is None)

    @property
    def memory_path(self) -> Path:
        """This rank's memory-tier directory."""
        return self._rank_dir

    @property
    def stats(self) -> dict[str, Any]:
        """The last save's figures: ``blocking_s``, ``slot_wait_s``, ``bytes``, ``cold``,
        ``persisted``, ``persist_s`` per tier (filled in as tiers finish) and ``errors`` (every
        failure of the last save, tier by tier, mirror and retention failures included); after
        a successful ``restore``, ``restored``: its ``step``, ``tier``, ``bytes`` and ``seconds``."""
        with self._stats_lock:
            out = dict(self._stats)
            last = self._last_handle
        out.update(last.report() if last is not None else {"persist_s": {}, "errors": []})
        return out

    def save(self, step: int, state: Any, *, force: bool = False) -> SaveHandle | None:
        """Stage ``state`` as ``step`` and return at once; persistence runs in the background.

        Blocks only for the copy into a staging slot (and, if both slots are still being
        persisted, until one is free: ``stats["slot_wait_s"]``).  Returns ``None`` when
        ``step % every != 0`` and not ``force``.  Background failures never raise here; a
        state that cannot be saved raises :class:`UnsupportedStateError` before any slot is
        taken, and a persist thread that is gone raises at once instead of hanging.  Saving a
        step below the last one saved or restored continues the run from there: the new
        snapshots are newer than the old higher-numbered ones (see docs/format.md).
        """
        self._check_open()
        _check_step(step)
        if not force and step % self._every:
            return None
        self._persister.check_alive()
        t0 = time.perf_counter()
        flat = flatten(state)  # refuses what the format cannot hold, before a slot is taken
        layout = self._stager.layout(flat.tensors)
        # Every rank makes the same saves: these change alike on every rank, whatever fails.
        self._seq += 1
        # One order (generation, step) names one save.  A step below the last one saved or
        # restored continues the run from step - 1 (the steps above are left behind); the
        # step this generation saved already continues it from that earlier save.
        prev = self._prev
        if prev is not None and (step < prev or (step == prev and self._prev_saved)):
            branch = step - 1 if step < prev else step
            self._ancestors = ((self._gen, branch), *self._ancestors)[:MAX_ANCESTORS]
            self._gen += 1
            if step < prev:
                log.warning("flashckpt: step %d is below step %d: a new timeline starts here", step, prev)
            else:
                log.info("flashckpt: step %d saved again: the newer save comes first", step)
        self._prev, self._prev_saved = step, True
        slot, waited = self._stager.acquire(
            layout.total_bytes, check=self._persister.check_alive, idle=self._persister.idle
        )
        try:
            self._mem.forget(slot)  # its bytes are about to change
            cold = self._stager.stage(slot, flat.tensors, layout)
            self._stager.mark_staged(slot)
            manifest = self._mem.record(slot, self._manifest(step, flat.tree, flat.tensors, layout, slot))
            hooks.fire("stage.done", step=step)
            handle = self._submit(step, manifest, slot, force)
        except OSError as exc:  # the memory tier is full: report, never kill training
            self._mem.forget(slot)
            self._stager.release(slot)
            return self._failed_save(step, translate_os_error(exc, f"stage step {step}"), t0)
        except BaseException:  # whatever it is, the slot goes back and says nothing
            self._mem.forget(slot)
            self._stager.release(slot)
            raise
        if cold:  # the state grew: grow the other slot too, off the training thread
            self._stager.prefault(layout.total_bytes)
        self._record_save(step, time.perf_counter() - t0, waited, layout.total_bytes, cold, handle)
        return handle

    def _manifest(self, step: int, tree: Any, tensors: Any, layout: Any, slot: Slot) -> Manifest:
        """The unsealed manifest of a snapshot just staged in ``slot``."""
        entries = tuple(
            TensorEntry(t.dtype, tuple(t.shape), off, n)
            for t, off, n in zip(tensors, layout.offsets, layout.nbytes, strict=True)
        )
        chunks = tuple(ChunkEntry(slot.name, o, o, n, n, CODEC_RAW, "") for o, n in layout.chunks)
        return Manifest(
            step,
            self._rank,
            self._world,
            self._node,
            now(),
            layout.total_bytes,
            entries,
            chunks,
            tree,
            generation=self._gen,
            storage=self._storage_id,
            run=self._run,
            ancestors=self._ancestors,
        )

    def _submit(self, step: int, manifest: Manifest, slot: Slot, force: bool) -> SaveHandle:
        """Hand a staged snapshot to the persist thread; returns its handle."""
        persist = force or (step // self._every) % self._persist_every == 0
        tiers = self._tiers if persist else []
        mirrored = bool(self._persister.mirror_peers)
        handle = SaveHandle(step, ["memory", *(["mirror"] if mirrored else []), *(t.name for t in tiers)])
        job = Job(
            manifest,
            slot,
            list(tiers),
            handle,
            seq=f"save{self._seq}",
            generation=slot.generation,
            mirror=mirrored,
        )
        self._persister.submit(job)
        self._track(handle)
        self._last = (step, slot, persist)
        return handle

    def _record_save(
        self, step: int, blocking: float, waited: float, nbytes: int, cold: bool, handle: SaveHandle
    ) -> None:
        with self._stats_lock:
            self._stats.update(
                step=step,
                blocking_s=blocking,
                slot_wait_s=waited,
                bytes=nbytes,
                cold=cold,
                persisted=len(handle.tiers) > 1,
                saves=self._stats["saves"] + 1,
            )
            self._last_handle = handle
        log.debug(
            "flashckpt: staged step %d, %d bytes in %.3f s (%.2f GB/s)%s%s",
            step,
            nbytes,
            blocking,
            nbytes / max(blocking, 1e-9) / 1e9,
            f", waited {waited:.3f} s for a slot" if waited > 1e-3 else "",
            " (cold slot)" if cold else "",
        )

    def _failed_save(self, step: int, exc: StorageError, t0: float) -> SaveHandle:
        """A save that could not even be staged (memory tier full): a handle that failed."""
        log.error("flashckpt: step %d could not be staged in %s: %s", step, self._rank_dir, exc)
        handle = SaveHandle(step, ["memory"])
        handle._finish_tier("memory", 0.0, exc)
        self._track(handle)
        with self._stats_lock:
            self._stats.update(
                step=step,
                blocking_s=time.perf_counter() - t0,
                slot_wait_s=0.0,
                bytes=0,
                cold=False,
                persisted=False,
                saves=self._stats["saves"] + 1,
            )
            self._last_handle = handle
        return handle

    def restore(self, state: Any, *, step: int | Literal["latest"] = "latest") -> int | None:
        """Load the newest complete step (or ``step``) into ``state`` in place.

        Every rank of a job calls this at the same time; they agree on the newest snapshot
        every rank can load, in ``(generation, step)`` order.  Each rank tries its own memory,
        then a peer's mirror of its shard, then its local tier, then storage; a snapshot that
        fails verification on one source is tried on the next, and if it fails on every
        source of some rank, all ranks go on to the next older one (with a warning).  Nothing
        is written into ``state`` before the snapshot's structure is found compatible with it
        (a module's keys and shapes, an optimizer's groups, DTensor shards).  A DTensor step
        saved by another world size is resharded from storage.  Returns the step, or ``None``
        when nothing was saved.  A snapshot that a persistent tier lacks is persisted again in
        the background (salvage).  Raises :class:`CheckpointNotFound` when an explicit
        ``step`` is not available intact (nothing changes: the next save continues from the last
        save or restore), :class:`TransientStorageError` when a tier could not
        be listed (restoring what the others hold could roll the run back), and
        :class:`CorruptCheckpointError` when nothing intact remains after the state was
        already written to.  Saves after a restore are newer than every snapshot it saw.
        """
        self._check_open()
        want = None if step == "latest" else _check_step(step)
        self._drain()
        t0 = time.perf_counter()
        self._start_sweep()
        plan = self._plan_restore(want)
        progress = _Progress()
        for key in plan.steps:
            loaded, fatal = self._load_step(key, state, plan, progress)
            agreed, run = self._agree(key, loaded, fatal, progress)
            if agreed:
                assert loaded is not None
                return self._restored(loaded, plan, state, t0, run)
        lineage = self._gen, self._prev, self._ancestors
        self._gen = max(self._gen, plan.newest_gen + 1)
        self._prev, self._ancestors = None, ()  # nothing restored: the next save starts afresh
        try:
            self._restore_nothing(want, state, progress)
        except CheckpointNotFound:
            # The step asked for is not there and the state is untouched: the run goes on from
            # where it was, so its next save continues (or branches off) the last save or
            # restore, and retention keeps the steps it continues from.
            self._gen, self._prev, self._ancestors = lineage
            raise
        return None

    def prepare(self, state: Any) -> None:
        """Fault the staging slots in for ``state``'s size on a background thread, so that the
        first ``save`` costs a warm copy.  ``restore`` does this already."""
        self._check_open()
        self._stager.prefault(self._stager.layout(flatten(state).tensors).total_bytes)

    def wait(self, timeout: float | None = None) -> None:
        """Block until every save so far is durable; raise the first unreported failure of a
        durable tier (mirror failures only with ``Options.require_mirrors``).  Raises at once
        if the persist thread is gone, instead of waiting for it."""
        deadline = None if timeout is None else time.monotonic() + timeout
        for h in list(self._handles):
            left = None if deadline is None else max(0.0, deadline - time.monotonic())
            h.wait(left)
        self._handles = [h for h in self._handles if not h.done()]
        self._persister.join()  # retention of the last commits, which follows them

    def latest_step(self) -> int | None:
        """The newest step held by any tier of this rank, in ``(generation, step)`` order (not
        verified: ``restore`` verifies)."""
        self._check_open()
        held = [o for _, orders in self._inventory() for o in orders]
        return max(held)[1] if held else None

    def close(self, *, _raise: bool = True) -> None:
        """Wait for background work, persist the newest snapshot if it was memory-only, stop the
        threads, and free the memory tier if everything is durable.  Idempotent."""
        if self._closed:
            return
        self._closed = True
        atexit.unregister(self._atexit)
        clean = False
        try:
            self._drain()
            self._persist_memory_only()
            self._drain()
            self._await_shared_commits()
            clean = self._memory_durable()
            self._close_mirrors(clean)
        finally:
            self._persister.close()
            if self._sweeper is not None:
                self._sweeper.join()
            if self._mirror_server is not None:
                self._mirror_server.close()
            self._stager.close(unlink=clean)
            if clean:
                self._release_memory()
            else:
                log.warning(
                    "flashckpt: keeping the memory tier %s: the newest snapshot is not durable on every tier",
                    self._rank_dir,
                )
                os.close(self._lock_fd)
            self._ctl.release()
            self._close_backends()
        if _raise:
            for h in self._handles:
                h.raise_failure()

    # -- internals -----------------------------------------------------------------------------
    def _setup_mirrors(self, mirror: int | None, undo: contextlib.ExitStack) -> None:
        """Every rank, at construction: where each rank's mirrors go, and a server per rank.

        Ranks serve the mirrors they hold whenever the job spans several nodes (also those an
        earlier attempt left, when this one mirrors nothing new).
        """
        nodes = self._nodes
        self._node_lead = nodes.index(self._node) == self._rank  # the lowest rank on this node
        n_nodes = len(set(nodes))
        k = (1 if n_nodes > 1 else 0) if mirror is None else mirror
        if k > n_nodes - 1:
            if mirror:
                log.warning(
                    "flashckpt: mirror=%d but the job spans %d node(s): %d cop%s per snapshot",
                    mirror,
                    n_nodes,
                    n_nodes - 1,
                    "y" if n_nodes == 2 else "ies",
                )
            k = n_nodes - 1
        self._mirrors = k
        if n_nodes < 2:
            return
        self._mirror_server = MirrorServer(self._rank_dir, self._ctl.secret, self._opts)
        undo.callback(self._mirror_server.close)
        gathered = self._ctl.all_gather([default_host(), self._mirror_server.port])
        self._addrs = [(str(a[0]), int(a[1])) for a in gathered]
        self._persister.mirror_peers = [(p, self._addrs[p]) for p in mirror_peers(nodes, self._rank, k)]
        self._persister.mirror_owner = shard_name(self._rank, self._world)
        peers = [p for p, _ in self._persister.mirror_peers]
        log.debug("flashckpt: rank %d mirrors to ranks %s", self._rank, peers)

    def _close_mirrors(self, clean: bool) -> None:
        """On close: drop the mirrors this rank holds for owners that closed cleanly (their
        snapshots are durable), keep the others for the next attempt.  Store only, no
        collective: an owner that never closes is waited for ``coord_timeout_s`` at most."""
        server = self._mirror_server
        if server is None:
            return
        try:
            self._ctl.publish(f"closed/r{self._rank}", "clean" if clean else "dirty")
        except FlashCkptError as exc:
            log.warning("flashckpt: keeping the mirrors held here: %s", exc)
            return
        for owner in server.holdings():
            rank, world = int(owner[1:6]), int(owner[-5:])
            if world != self._world:  # a mirror from a job of another shape: nobody restores it
                server.drop(owner)
                continue
            try:
                outcome = self._ctl.await_outcome(f"closed/r{rank}")
            except FlashCkptError as exc:
                log.warning("flashckpt: keeping the mirror of %s: %s", owner, exc)
                continue
            if outcome == "clean":
                server.drop(owner)
            else:
                log.warning("flashckpt: keeping the mirror of %s: its owner is not durable", owner)

    def _check_open(self) -> None:
        if self._closed:
            raise ClosedError("this Checkpointer is closed")

    def _take_lock(self) -> int:
        """The memory tier's ``flock``: refuses a second live Checkpointer on the directory.

        The holder unlinks the file at a clean close while it still holds it (and removes the
        directory once empty), so a process that opened the old file meanwhile gets the lock
        of an unlinked inode: every taker checks that the file it locked is still the one at
        the path, else it makes the directory again if needed and tries again."""
        path = self._rank_dir / "lock"
        for _ in range(100):
            try:
                fd = open_private(path, write=True, create=True)
            except FileNotFoundError:  # the directory went with a clean close meanwhile
                private_dir(self._rank_dir, trusted_above=self._trusted_above)
                continue
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                raise ConfigError(
                    f"memory tier {self._rank_dir} is in use by another live process "
                    "(two Checkpointers for the same storage and rank?)"
                ) from None
            try:
                same = os.fstat(fd).st_ino == os.stat(path, follow_symlinks=False).st_ino
            except FileNotFoundError:
                same = False
            if same:
                return fd
            os.close(fd)  # the old holder unlinked it after we opened it: take the new file
        raise ConfigError(f"cannot take the lock of memory tier {self._rank_dir}")

    def _track(self, handle: SaveHandle) -> None:
        self._handles = [h for h in self._handles if not h.done() or h.failures]
        self._handles.append(handle)

    def _drain(self) -> None:
        """Wait for every queued background job, without raising their errors (but raising
        at once if the persist thread is gone)."""
        self._stager.join_prefault()
        self._persister.join()

    @hooks.timed("time.restore.inventory")
    def _inventory(self) -> list[tuple[Tier, dict[Order, Ancestors]]]:
        """The snapshots each tier of this rank holds, cheapest tier first.  A tier that
        cannot be listed counts as empty and is recorded in ``self._unlisted``."""
        inv: list[tuple[Tier, dict[Order, Ancestors]]] = [(self._memory, self._memory_snapshots())]
        self._unlisted = []
        for tier in self._tiers:
            try:
                inv.append((tier, {r.order: r.ancestors for r in read_commits(tier.backend, self._opts)}))
            except StorageError as exc:
                log.warning("flashckpt: cannot list the %s tier (%s): %s", tier.name, tier.backend.url, exc)
                self._unlisted.append((tier, exc))
                inv.append((tier, {}))
        return inv

    def _memory_snapshots(self) -> dict[Order, Ancestors]:
        """Snapshots in this rank's memory tier that belong to this run (with their ancestry)."""
        where = str(self._rank_dir)
        return {m.order: m.ancestors for m in self._mem.holdings() if self._ours(m.storage, m.run, where)}

    def _ours(self, storage: str, run: str, where: str) -> bool:
        """A memory snapshot (own or a peer's mirror) belongs to this run: saved for this
        storage tier, and, once the storage tier names its run, by that run.  (Wiping the
        storage tier does not disown memory: that is how a lost node's steps come back.)"""
        why = None
        if storage and storage != self._storage_id:
            why = "it was saved for another storage tier"
        elif run and self._run_known and run != self._run:
            why = f"it belongs to run {run}, the storage tier to run {self._run}"
        if why is None:
            return True
        if where not in self._warned:
            self._warned.add(where)
            log.warning("flashckpt: not restoring the memory snapshots in %s: %s", where, why)
        return False

    def _load(
        self, tier: Tier, key: Order, state: Any, filled: dict[int, torch.Tensor]
    ) -> tuple[Manifest, Slot]:
        """Return the verified memory manifest of snapshot ``key`` and a busy slot holding
        its bytes, after checking ``state`` can take it (nothing is written to the state
        before that).

        From the memory tier, tensors of ``state`` that the step will be loaded into (CPU,
        contiguous, same dtype and shape) are filled while the slot is checksummed: one pass
        over memory instead of two.  They are recorded in ``filled``; if verification fails
        after that, the caller knows the state was written to.  From a persistent tier, the
        shard is read into a slot, which then holds it as a memory snapshot.
        """
        pool = self._persister.pool
        step = key[1]
        if tier is self._memory:
            m, slot = self._mem.read(step)
            if m.order != key:
                raise CorruptCheckpointError(f"the memory tier holds another snapshot of step {step}")
            self._precheck(state, m)
            if not self._stager.try_acquire(slot):
                raise CorruptCheckpointError(f"slot of step {step} is busy")
            try:
                fills = self._fills(m, state, filled)
                sealed = verify_chunks(
                    m, slot.view, pool, str(self._rank_dir), base=slot.address, fills=fills
                )
                if not m.sealed:  # the crash came before the persist thread checksummed it
                    self._mem.seal(slot, sealed)
            except BaseException:
                self._stager.release(slot)
                raise
            return sealed, slot
        m = read_committed_manifest(tier.backend, step, self._rank, self._world, self._opts)
        if m.order != key:
            raise CorruptCheckpointError(f"step {step} on the {tier.name} tier changed meanwhile")
        self._precheck(state, m)
        check_fits(m.total_bytes, self._rank_dir, f"step {step} on the {tier.name} tier")
        slot, _ = self._stager.acquire(
            m.total_bytes, replacing=step, check=self._persister.check_alive, idle=self._persister.idle
        )
        try:
            self._mem.forget(slot)
            slot.ensure(m.total_bytes)
            fetch_chunks(tier.backend, m, slot.view, pool, self._opts)
            local = self._mem.record(slot, m)  # the slot holds decoded bytes: a raw manifest
        except BaseException:
            self._mem.forget(slot)
            self._stager.release(slot)
            raise
        return local, slot

    def _precheck(self, state: Any, m: Manifest, *, resharding: bool = False) -> None:
        """Refuse (StateMismatchError) a snapshot the state cannot take, before any write."""

        def meta(i: int) -> tuple[torch.dtype, tuple[int, ...]]:
            return m.tensors[i].dtype, m.tensors[i].shape

        replaced = check_loadable(state, m.state_tree(), meta, resharding=resharding)
        if replaced:
            log.warning(
                "flashckpt: step %d: %d tensor(s) changed shape or dtype and are replaced by the "
                "saved ones instead of filled in place (references to the old tensors keep the old "
                "values): %s%s",
                m.step,
                len(replaced),
                ", ".join(replaced[:5]),
                ", ..." if len(replaced) > 5 else "",
            )

    @staticmethod
    def _fills(m: Manifest, state: Any, filled: dict[int, torch.Tensor]) -> list[tuple[int, int, int]]:
        """Pick the live tensors a memory-tier restore can fill while it checksums."""

        def accept(i: int, t: torch.Tensor) -> bool:
            e = m.tensors[i]
            return (
                e.nbytes > 0
                and t.device.type == "cpu"
                and t.dtype == e.dtype
                and tuple(t.shape) == e.shape
                and t.is_contiguous()
                and not t.is_conj()
                and not t.is_neg()
            )

        filled.update(find_targets(state, m.state_tree(), accept))
        entries = ((m.tensors[i], t) for i, t in filled.items())
        return sorted((e.offset, e.offset + e.nbytes, t.data_ptr()) for e, t in entries)

    @hooks.timed("time.restore.apply")
    def _apply(self, m: Manifest, slot: Slot, state: Any, filled: dict[int, torch.Tensor]) -> None:
        """Load the verified snapshot in ``slot`` into ``state``.  Returns (or raises) only once
        every copy out of the slot is finished, on every device written: the slot may be
        reused right after."""
        tree = m.state_tree()
        with restore_copies(slot) as copies:

            def materialize(i: int, target: torch.Tensor | None) -> torch.Tensor:
                if target is not None and filled.get(i) is target:
                    return target  # already filled while the slot was checksummed
                e = m.tensors[i]
                src = slot.tensor(e.offset, e.nbytes, e.dtype, e.shape)
                if target is not None and target.dtype == e.dtype and tuple(target.shape) == e.shape:
                    try:
                        copies.copy(target, src)
                        return target
                    except RuntimeError:  # not writable in place (e.g. an expanded, stride-0 view)
                        pass
                device = target.device if target is not None else torch.device("cpu")
                return src.to(device=device, copy=True)

            load_into(state, tree, materialize)

    def _start_sweep(self) -> None:
        """Training thread, first ``restore``: remove, on a background thread, the temporary
        files that killed writers left in the POSIX tiers (this rank's local tier; the shared
        tier on rank 0 only: one walk per job).  Those of a dead process of this host go at
        once, any other after ``max(gc_grace_s, 60 s)``: see ``LocalBackend.sweep_temps``."""
        if self._sweeper is not None:
            return
        tiers = [t for t in self._tiers if not t.shared or self._rank == 0]
        backends = [t.backend for t in tiers if isinstance(t.backend, LocalBackend)]
        max_age = max(self._opts.gc_grace_s, 60.0)

        def sweep() -> None:
            for be in backends:
                try:
                    n = be.sweep_temps(max_age)
                except Exception as exc:  # never a silent death: logged, and the next one goes on  # noqa: BLE001
                    log.warning("flashckpt: sweeping %s failed: %s", be.url, exc)
                    continue
                if n:
                    log.info("flashckpt: removed %d unfinished temporary files from %s", n, be.url)

        self._sweeper = threading.Thread(target=sweep, name="flashckpt-sweep", daemon=True)
        self._sweeper.start()

    def _plan_restore(self, want: int | None) -> _RestorePlan:
        """Training thread, every rank (gathers): what each rank can load, and the snapshots
        every rank can load, newest first."""
        inventory = self._inventory()
        mine = {o for _, held in inventory for o in held}
        ancestry = {o: a for _, held in inventory for o, a in held.items()}
        if self._node_lead:
            self._warn_foreign_shards()
        held_here: dict[str, list[list[Any]]] = {}
        if self._mirror_server is not None:
            # shard directories this node keeps for ranks that run elsewhere now (renumbered)
            self._mirror_server.claim_orphans(self._memory_root, self._world, self._storage_id)
            held_here = self._mirror_server.snapshots()
        unlisted = [f"rank {self._rank}: {t.name}" for t, _ in self._unlisted]
        own = [[o[0], o[1], [list(a) for a in ancestry[o]]] for o in sorted(mine)]
        everyone = self._ctl.all_gather([own, held_here, unlisted])
        if want is None and any(u for _, _, u in everyone):  # every rank decides alike
            names = ", ".join(x for _, _, u in everyone for x in u)
            raise TransientStorageError(
                f"some tiers could not be listed ({names}): refusing to start from scratch or to "
                "restore from the other tiers (that could roll the run back past the steps the "
                "unreachable ones hold); retry when they are reachable, or restore an explicit step"
            ) from (self._unlisted[0][1] if self._unlisted else None)
        newest_gen = max(
            [o[0] for own, _, _ in everyone for o in own]
            + [s[0] for _, held, _ in everyone for snaps in held.values() for s in snaps],
            default=-1,
        )

        def copies(r: int) -> dict[Order, list[int]]:
            """Snapshots of rank ``r``'s shard in some rank's memory: order -> holders."""
            shard, out = shard_name(r, self._world), dict[Order, list[int]]()
            for q, (_, held, _) in enumerate(everyone):
                for gen, step, storage, run, _anc in held.get(shard, []):
                    if self._ours(storage, run, f"rank {q}'s copies of {shard}"):
                        out.setdefault((int(gen), int(step)), []).append(q)
            return out

        def available(r: int) -> set[Order]:
            return {(int(g), int(s)) for g, s, _ in everyone[r][0]} | set(copies(r))

        # the ancestry of every snapshot any rank sees (one generation's snapshots agree)
        known: dict[Order, Ancestors] = {}
        for own_q, held_q, _ in everyone:
            rows = [(g, s, a) for g, s, a in own_q] + [(x[0], x[1], x[4]) for v in held_q.values() for x in v]
            for g, s, a in rows:
                known.setdefault((int(g), int(s)), tuple((int(x), int(y)) for x, y in a))
        every = [available(r) for r in range(self._world)]
        common = set.intersection(*every)
        # "latest" is never a snapshot of a timeline the run has left (a fallback must not
        # resume it); an explicit step is the user's call, and its continuation is the newest
        left = abandoned([(o, known.get(o, ())) for o in set().union(*every)])
        newest = max(common - left, default=None)
        common = common - left if want is None else {o for o in common if o[1] == want}
        mirrored = copies(self._rank)
        if self._ctl.distributed and (mine | set(mirrored)) - common:
            log.info(
                "flashckpt: rank %d holds snapshots %s that not every rank has; newest common: %s",
                self._rank,
                sorted((mine | set(mirrored)) - common)[-3:],
                max(common) if common else None,
            )
        return _RestorePlan(inventory, sorted(common, reverse=True), mirrored, newest_gen, newest)

    def _warn_foreign_shards(self) -> None:
        """The lowest rank of a node, in ``restore``: name memory-tier directories left by a
        job of another world size.  This job never reads them (resharding reads storage), and
        deleting them is the user's call: they may hold the only copy of a step if that job
        resumes with its old size."""
        suffix = f"-of-{self._world:05d}"
        try:
            other = sorted(
                d.name
                for d in self._memory_root.iterdir()
                if d.is_dir() and SHARD_PATTERN.fullmatch(d.name) and not d.name.endswith(suffix)
            )
        except OSError:
            return
        if other:
            log.warning(
                "flashckpt: %s holds memory-tier shards of a job with another world size (%s%s), which "
                "this %d-rank job never reads; delete them if that job will not resume",
                self._memory_root,
                ", ".join(other[:4]),
                ", ..." if len(other) > 4 else "",
                self._world,
            )

    def _load_step(
        self, key: Order, state: Any, plan: _RestorePlan, progress: _Progress
    ) -> tuple[_Loaded | None, BaseException | None]:
        """Training thread: load snapshot ``key`` into ``state`` from this rank's cheapest
        source that verifies.  Returns what was loaded (``None``: no source worked), and an
        error that ends the restore on every rank (the state does not fit the step).

        Anything that goes wrong while a source is read and verified (whatever its type: a
        hostile record can provoke any) makes that source unusable, and the next is tried."""
        step = key[1]
        sources: list[tuple[Source, int | None]] = [(src, None) for src in plan_sources(plan.inventory, key)]
        at = 1 if sources and sources[0][0].tier is self._memory else 0
        sources[at:at] = [(Source(step, self._mirror_tier, key[0]), q) for q in plan.mirrored.get(key, [])]
        for src, peer in sources:
            filled: dict[int, torch.Tensor] = {}
            where = f"rank {peer}'s memory" if peer is not None else f"the {src.tier.name} tier"
            try:
                if peer is not None:  # a copy of this rank's shard in a peer's memory
                    m, slot = self._load_mirror(peer, key, state)
                else:
                    m, slot = self._load(src.tier, key, state, filled)
            except StateMismatchError as exc:
                if peer is not None or not src.tier.shared:
                    return None, exc
                try:
                    nbytes = self._reshard(src.tier, step, state, exc)
                except (CorruptCheckpointError, StorageError) as err:
                    progress.failed(err, touched=True)
                    log.warning("flashckpt: resharding step %d failed: %s", step, err)
                    continue
                except BaseException as err:  # returned: the caller tries the next source  # noqa: BLE001
                    return None, err
                return _Loaded(key, src.tier, None, None, nbytes), None
            except (PersisterDied, KeyboardInterrupt):
                raise
            except Exception as exc:  # logged: the next source is tried  # noqa: BLE001
                progress.failed(exc, touched=bool(filled))
                log.warning(
                    "flashckpt: step %d on %s is unusable, trying the next source: %s", step, where, exc
                )
                continue
            try:
                hooks.fire("restore.loaded", step=step, tier=src.tier.name if peer is None else "mirror")
                self._apply(m, slot, state, filled)
            except BaseException as exc:  # the state does not fit the step: the user's to fix  # noqa: BLE001
                self._stager.release(slot)
                return None, exc
            return _Loaded(key, src.tier, m, slot, m.total_bytes), None
        return None, None

    def _agree(
        self, key: Order, loaded: _Loaded | None, fatal: BaseException | None, progress: _Progress
    ) -> tuple[bool, str]:
        """Training thread, every rank (gathers): True if every rank loaded snapshot ``key``,
        and the run it belongs to (rank 0's).  Raises a rank's fatal error on every rank; else,
        if another rank failed, the state holds the step here and the next older snapshot
        will overwrite it."""
        run = loaded.manifest.run if loaded is not None and loaded.manifest is not None else ""
        outcomes = self._ctl.all_gather([loaded is not None, None if fatal is None else repr(fatal), run])
        if fatal is not None:
            raise fatal
        failed = [(r, f) for r, (_, f, _) in enumerate(outcomes) if f is not None]
        if failed:
            raise CoordinationError(f"restore failed on rank {failed[0][0]}: {failed[0][1]}")
        if loaded is not None and all(ok for ok, _, _ in outcomes):
            return True, str(outcomes[0][2])
        if loaded is not None:
            progress.touched = True
            if loaded.slot is not None:
                self._stager.release(loaded.slot)
            log.warning("flashckpt: step %d is unusable on another rank; trying an older one", key[1])
        return False, ""

    def _restored(self, loaded: _Loaded, plan: _RestorePlan, state: Any, t0: float, run: str) -> int:
        """Training thread, every rank: record and log a restore, start the next generation,
        then salvage (gathers)."""
        s, tier = loaded.step, loaded.tier
        secs = time.perf_counter() - t0
        resharded = loaded.manifest is None
        with self._stats_lock:
            self._stats["restored"] = {
                "step": s,
                "tier": tier.name,
                "bytes": loaded.nbytes,
                "seconds": secs,
                "resharded": resharded,
            }
        log.info(
            "flashckpt: restored step %d from the %s tier%s, %d bytes in %.3f s (%.2f GB/s)",
            s,
            tier.name,
            " (resharded)" if resharded else "",
            loaded.nbytes,
            secs,
            loaded.nbytes / max(secs, 1e-9) / 1e9,
        )
        if plan.newest is not None and loaded.order < plan.newest:
            log.warning(
                "flashckpt: restored step %d, not the newest step %d: the run continues from step %d, "
                "and the snapshots it leaves behind are older than its next saves (retired as newer "
                "ones are committed)",
                s,
                plan.newest[1],
                s,
            )
        # Saves from here on are newer than everything any rank saw (a rollback's included),
        # on a timeline that continues from the restored snapshot.
        self._gen = max(self._gen, plan.newest_gen + 1)
        self._prev, self._prev_saved = s, False
        self._ancestors = (loaded.order, *self._restored_ancestors(loaded, plan))[:MAX_ANCESTORS]
        if run and not self._run_known:
            self._run = run  # the storage tier names no run: continue the restored one's
        self._persister.protect = {s: self._gen}
        if loaded.manifest is None or loaded.slot is None:  # resharded: nothing of it is staged
            self._stager.prefault(self._stager.layout(flatten(state).tensors).total_bytes)
        else:  # a fetched copy is in this rank's memory tier now
            self._after_restore(loaded.manifest, loaded.slot, plan.inventory)
        return int(s)

    @staticmethod
    def _restored_ancestors(loaded: _Loaded, plan: _RestorePlan) -> Ancestors:
        """The restored snapshot's own ancestry (from its manifest, else the inventory)."""
        if loaded.manifest is not None:
            return loaded.manifest.ancestors
        for _, held in plan.inventory:
            if loaded.order in held:
                return held[loaded.order]
        return ()

    def _restore_nothing(self, want: int | None, state: Any, progress: _Progress) -> None:
        """Training thread, every rank (gathers): no step could be restored.  Raise if that is
        not a clean fresh start, else prefault the slots for ``state``."""
        outcome = self._ctl.all_gather(progress.touched)
        if any(outcome):
            raise CorruptCheckpointError(
                "no step could be restored on every rank, and a state was already written to (a "
                "snapshot found corrupt while it was loaded, or a step another rank could not "
                "load): the state is partially overwritten; rebuild it"
            ) from progress.last_error
        if want is not None:
            raise CheckpointNotFound(f"step {want} is not available intact on every rank") from (
                progress.last_error
            )
        if progress.last_error is not None:
            log.warning("flashckpt: no usable checkpoint found; starting from scratch")
        self._stager.prefault(self._stager.layout(flatten(state).tensors).total_bytes)

    def _load_mirror(self, peer: int, key: Order, state: Any) -> tuple[Manifest, Slot]:
        """Fetch this rank's shard of snapshot ``key`` from the copy rank ``peer`` holds, into
        a free slot of this rank's memory tier, and verify every chunk.  Returns a busy slot."""
        held: list[Slot] = []
        step = key[1]

        def into(m: Manifest) -> Callable[[int, int], memoryview]:
            check_fits(m.total_bytes, self._rank_dir, f"step {step} from rank {peer}'s mirror")
            slot, _ = self._stager.acquire(
                m.total_bytes, replacing=step, check=self._persister.check_alive, idle=self._persister.idle
            )
            held.append(slot)
            self._mem.forget(slot)
            slot.ensure(m.total_bytes)
            return slot.view

        try:
            me = shard_name(self._rank, self._world)
            m = fetch(self._addrs[peer], self._ctl.secret, me, step, into, self._opts)
            if (m.rank, m.world_size) != (self._rank, self._world) or m.order != key:
                raise CorruptCheckpointError(f"rank {peer}'s copy of step {step} is another snapshot")
            if not self._ours(m.storage, m.run, f"rank {peer}'s copies"):
                raise CorruptCheckpointError(f"rank {peer}'s copy of step {step} belongs to another run")
            self._precheck(state, m)
            slot = held[0]
            where = f"rank {peer}'s mirror"
            sealed = verify_chunks(
                memory_manifest(m, slot.name), slot.view, self._persister.pool, where, base=slot.address
            )
            sealed = self._mem.record(slot, sealed)
        except BaseException:
            for slot in held:
                self._mem.forget(slot)
                self._stager.release(slot)
            raise
        return sealed, slot

    def _reshard(self, tier: Tier, step: int, state: Any, mismatch: StateMismatchError) -> int:
        """Load ``step``, saved by another world size, from the shared tier: each DTensor's
        local shard is assembled from the saved shards that overlap it (see ``_reshard``).
        Returns the bytes this rank read.  Re-raises ``mismatch`` when the step holds no
        DTensors: plain per-rank state cannot be redistributed."""
        reader = StepReader(tier.backend, step, self._opts, self._persister.pool)
        if reader.world == self._world or not reader.has_dtensors:
            raise mismatch
        log.info(
            "flashckpt: step %d was saved by %d ranks; resharding it for %d", step, reader.world, self._world
        )
        reader.restore_into(state, source_rank=self._rank % reader.world)
        return reader.bytes_read

    def _after_restore(
        self, m: Manifest, slot: Slot, inventory: list[tuple[Tier, dict[Order, Ancestors]]]
    ) -> None:
        """Salvage, then prefault the other slot.  Every rank calls this (it gathers).

        Snapshots staged in memory but not persisted (the crash came first) are written to the
        tiers that lack them, oldest first: the restored one, and an older snapshot of the same
        generation still in the other slot if it is newer than what a tier holds.  On the
        shared tier of a multi-rank job a step can only be committed with every rank's shard:
        the ranks whose shard is missing there write it and the last of them commits; if every
        shard is there already but the commit record is not (the committing rank died), rank 0
        commits it.  A snapshot restored from a persistent tier is written again only where the
        job needs it committed: the shared tier.
        """
        self._restores += 1
        order = m.order
        held = {t.name: set(s) for t, s in inventory}
        missing = [t for t in self._tiers if order not in held.get(t.name, set())]
        self._stager.mark_staged(slot, durable=bool(self._tiers) and not missing)
        # in memory now: the restored snapshot (whatever tier it came from), and older ones
        # of its generation (other generations are other timelines: never salvaged)
        in_memory = {o for o in held.get(self._memory.name, set()) if o[0] == order[0]} | {order}
        todo: dict[Order, list[Tier]] = {}
        for t in self._tiers:
            if t.shared and self._ctl.distributed:
                continue
            on_tier = held.get(t.name, set())
            newest = max(on_tier, default=(-1, -1))
            for o in sorted(in_memory):
                if o not in on_tier and (o == order or newest < o < order):
                    todo.setdefault(o, []).append(t)
        writers: dict[Order, int] = {}
        if self._ctl.distributed:  # the restored snapshot's bytes are in its slot, wherever they came from
            writers = self._salvage_shared(order, in_memory, held, todo)
        for o in sorted(todo):
            self._salvage(o, m if o == order else None, slot, todo[o], writers.get(o))
        # A restored snapshot counts as persisted: what a tier lacks was salvaged above (the
        # same decision on every rank: close must never start a shared commit only some do).
        self._last = (m.step, slot, True)
        if order not in todo:
            self._stager.release(slot)
        self._stager.prefault(m.total_bytes)

    def _salvage_shared(
        self,
        restored: Order,
        in_memory: set[Order],
        held: dict[str, set[Order]],
        todo: dict[Order, list[Tier]],
    ) -> dict[Order, int]:
        """Training thread, every rank: which uncommitted snapshots the ranks write to the
        shared tier (added to ``todo``); returns the number of writers per snapshot."""
        shared = next(t for t in self._tiers if t.shared)
        committed = held.get(shared.name, set())
        newest = max(committed, default=(-1, -1))
        mine = sorted(o for o in in_memory if o not in committed and (o == restored or newest < o < restored))
        gathered = self._ctl.all_gather([list(o) for o in mine])
        orders = sorted({(int(g), int(s)) for lst in gathered for g, s in lst})
        status = [self._shard_status(shared, o, in_memory) for o in orders]
        everyone = self._ctl.all_gather(status)
        writers: dict[Order, int] = {}
        for i, o in enumerate(orders):
            column = [st[i] for st in everyone]
            if "none" in column:
                continue  # some rank has neither the shard nor the snapshot: never complete
            writers[o] = column.count("write")
            # the key the committing rank publishes its outcome under (the persist thread's
            # for the writers' jobs, which share this seq on every rank)
            key = f"commit/{shared.name}/{o[1]}/restore{self._restores}"
            if status[i] == "write":
                todo.setdefault(o, []).append(shared)
            elif writers[o] == 0 and self._rank == 0:
                log.info("flashckpt: every shard of step %d is on the storage tier; committing it", o[1])
                outcome = "ok"
                try:
                    self._persister.commit_shared(shared, o[1], self._world, o)
                except FlashCkptError as exc:
                    log.error("flashckpt: committing step %d failed: %s", o[1], exc)
                    outcome = f"failed: {exc}"
                self._ctl.publish(key, outcome)
            else:  # another rank commits it: close waits for that before it judges the memory tier
                self._awaited.append(key)
        return writers

    def _shard_status(self, tier: Tier, order: Order, in_memory: set[Order]) -> str:
        """``have``: this rank's manifest of that very snapshot is on ``tier``; ``write``: it
        is not, but the snapshot is in memory; ``none``: neither."""
        key = manifest_key(order[1], self._rank, self._world)
        try:
            there = decode_manifest(read_record(tier.backend, key, key, self._opts), key)
            if there.order == order:
                return "have"
        except (StorageError, CorruptCheckpointError):
            pass
        return "write" if order in in_memory else "none"

    def _salvage(
        self, order: Order, m: Manifest | None, slot: Slot | None, tiers: list[Tier], writers: int | None
    ) -> None:
        """Hand a memory snapshot to the persist thread (``m``/``slot``: the restored one,
        whose slot the caller holds; else the snapshot is looked up and its slot taken)."""
        step = order[1]
        if m is None:
            try:
                m, slot = self._mem.read(step)
                if m.order != order:
                    raise CorruptCheckpointError(f"memory holds another snapshot of step {step}")
            except (CorruptCheckpointError, StorageError) as exc:
                log.warning("flashckpt: cannot persist the memory snapshot of step %d: %s", step, exc)
                return
            if not self._stager.try_acquire(slot):
                return
        assert slot is not None
        log.info(
            "flashckpt: step %d is missing on the %s tier; persisting it from memory",
            step,
            ", ".join(t.name for t in tiers),
        )
        handle = SaveHandle(step, [t.name for t in tiers])
        try:
            self._persister.submit(
                Job(
                    m,
                    slot,
                    tiers,
                    handle,
                    hashed=m.sealed,
                    seq=f"restore{self._restores}",
                    writers=writers,
                    generation=slot.generation,
                )
            )
        except BaseException:
            self._stager.release(slot)
            raise
        self._track(handle)

    def _persist_memory_only(self) -> None:
        """On close: persist the snapshots that live in memory only.

        A multi-rank job persists the last one saved (every rank makes the same saves, so
        every rank submits the same job: close runs no collective); one process persists
        every snapshot of its memory tier that a tier lacks (a look at an older step with
        ``restore(step=...)`` after memory-only saves leaves the newer one there)."""
        if not self._tiers:
            return
        if not self._ctl.distributed:
            failed = {h.step for h in self._handles if h.failures}  # reported; not retried here
            try:
                for order, tiers in self._not_durable():
                    if order[1] not in failed:
                        self._persist_snapshot(order[1], None, tiers)
                return
            except FlashCkptError as exc:  # a tier cannot be listed: persist the last one, at least
                log.warning("flashckpt: cannot tell which snapshots only live in memory: %s", exc)
        if self._last is not None and not self._last[2]:
            self._persist_snapshot(self._last[0], self._last[1], list(self._tiers))

    def _not_durable(self) -> list[tuple[Order, list[Tier]]]:
        """The memory tier's snapshots of this run (not of an abandoned timeline) that are
        newer than everything a persistent tier holds, oldest first, with those tiers.  (An
        older one that a tier lacks was retired there, or superseded while it lived in memory
        only: it is not lost.)  Raises ``StorageError`` if a tier cannot be listed."""
        memory = self._memory_snapshots()
        held = {
            t.name: {r.order: r.ancestors for r in read_commits(t.backend, self._opts)} for t in self._tiers
        }
        seen = dict(memory)
        for h in held.values():
            seen.update(h)
        left = abandoned(list(seen.items()))

        def lacking(o: Order) -> list[Tier]:
            return [t for t in self._tiers if o > max(held[t.name], default=(-1, -1))]

        return [(o, ts) for o in sorted(memory) if o not in left and (ts := lacking(o))]

    def _persist_snapshot(self, step: int, slot: Slot | None, tiers: list[Tier]) -> None:
        """Training thread, close: hand the memory snapshot of ``step`` (in ``slot`` when the
        caller knows it) to the persist thread for ``tiers``."""
        try:
            m, holder = self._mem.read(step)
            if slot is not None and holder is not slot:
                raise CorruptCheckpointError(f"step {step} moved to another slot")
        except (CorruptCheckpointError, StorageError) as exc:
            log.error("flashckpt: cannot persist step %d on close: %s", step, exc)
            return
        if not self._stager.try_acquire(holder):
            return
        handle = SaveHandle(step, [t.name for t in tiers])
        if self._last is not None and self._last[0] == step:
            self._last = (step, holder, True)
        try:
            job = Job(m, holder, tiers, handle, hashed=m.sealed, seq="close", generation=holder.generation)
            self._persister.submit(job)
        except BaseException:
            self._stager.release(holder)
            raise
        self._track(handle)

    def _await_shared_commits(self) -> None:
        """Close, every rank that salvaged: wait (bounded by ``coord_timeout_s``) for the shared
        commits other ranks make of snapshots this rank holds, so that the memory tier is judged
        after them, not while they are on their way."""
        for key in self._awaited:
            try:
                outcome = self._ctl.await_outcome(key)
            except FlashCkptError as exc:
                log.warning("flashckpt: %s: %s", key, exc)
                continue
            if outcome != "ok":
                log.warning("flashckpt: %s: %s", key, outcome)
        self._awaited.clear()

    def _memory_durable(self) -> bool:
        """Every snapshot the memory tier holds for this run is committed on every persistent
        tier (or lies on an abandoned timeline): the memory tier may go."""
        try:
            return not self._not_durable()
        except FlashCkptError:
            return False

    def _release_memory(self) -> None:
        """Clean close, everything durable: delete the memory tier (its slot files are unlinked
        by the stager) and the lock last, while it is still held (see ``_take_lock``)."""
        self._mem.clear()
        be = self._mem.backend
        for name in be.children(""):
            if not name.endswith("/") and name != "lock":
                be.delete(name)
        with contextlib.suppress(FileNotFoundError):
            (self._rank_dir / "lock").unlink()
        os.close(self._lock_fd)
        # the per-user directory above the default root too; never above a memory_dir given
        dirs = [self._rank_dir, self._memory_root]
        if self._memory_dir_given is None:
            dirs.append(self._memory_root.parent)
        for d in dirs:
            try:
                d.rmdir()
            except OSError:
                break

    def _close_backends(self) -> None:
        for be in self._owned:
            try:
                be.close()
            except Exception as exc:  # logged: the other backends are closed too  # noqa: BLE001
                log.debug("flashckpt: closing %s: %s", be.url, exc)

    def _atexit(self) -> None:
        try:
            self.close(_raise=False)
        except Exception:
            log.exception("flashckpt: close at exit failed")
