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
"""

from __future__ import annotations

import atexit
import dataclasses
import fcntl
import hashlib
import logging
import os
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

import torch

from flashckpt import _hooks as hooks
from flashckpt._codec import Compression
from flashckpt._config import Options, default_memory_root, node_id, options_from_env
from flashckpt._coordinator import (
    Source,
    committed_steps,
    fetch_chunks,
    memory_steps,
    plan_sources,
    read_committed_manifest,
    read_memory_manifest,
    verify_chunks,
)
from flashckpt._dist import Control
from flashckpt._mirror import MirrorServer, default_host, fetch, mirror_peers
from flashckpt._reshard import StepReader
from flashckpt._staging import Slot, Stager, check_fits
from flashckpt._statewalk import find_targets, flatten, load_into
from flashckpt._transfer import Job, Persister, SaveHandle, Tier
from flashckpt.backends import Backend, LocalBackend, open_backend, translate_os_error
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
    SHARD_PATTERN,
    ChunkEntry,
    Manifest,
    TensorEntry,
    encode_manifest,
    manifest_key,
    memory_manifest_key,
    now,
    shard_name,
)

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


@dataclasses.dataclass
class _RestorePlan:
    """What this rank's tiers hold, the steps every rank can load (newest first), and per
    step the peers holding a copy of this rank's shard."""

    inventory: list[tuple[Tier, list[int]]]
    steps: list[int]
    mirrored: dict[int, list[int]]


@dataclasses.dataclass
class _Loaded:
    """A step loaded into the state: from ``tier``, staged in ``slot`` (held busy) under
    ``manifest``; both ``None`` when it was resharded from storage."""

    step: int
    tier: Tier
    manifest: Manifest | None
    slot: Slot | None
    nbytes: int


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
        self._opts = options_from_env(options)
        self._every, self._persist_every, self._keep = every, persist_every, keep
        self._ctl = Control(process_group, self._opts.coord_timeout_s)
        self._rank, self._world = self._ctl.rank, self._ctl.world
        self._node = node_id()
        self._seq = 0  # saves staged so far: the same on every rank, names a save among them
        self._restores = 0  # likewise for restores
        self._unlisted: list[tuple[Tier, StorageError]] = []  # tiers the last inventory could not list

        per_tier = _compression_per_tier(compression)
        storage_be = open_backend(
            storage,
            storage_options=storage_options,
            max_concurrency=self._opts.io_threads,
            range_bytes=self._opts.chunk_bytes,
        )
        self._tiers: list[Tier] = []
        if local_dir is not None:
            # A node-local disk: in a multi-rank job each rank keeps its shard in its own
            # directory there, with its own commit records (see docs/format.md).
            local_be = (
                local_dir
                if isinstance(local_dir, Backend)
                else LocalBackend(
                    Path(local_dir) / shard_name(self._rank, self._world) if self._world > 1 else local_dir,
                    fsync=self._opts.fsync,
                    direct_io=self._opts.direct_io,
                )
            )
            self._tiers.append(Tier("local", local_be, per_tier.get("local", Compression(None))))
        if isinstance(storage_be, LocalBackend) and not isinstance(storage, Backend):
            storage_be = LocalBackend(storage_be.root, fsync=self._opts.fsync, direct_io=self._opts.direct_io)
        # Default: compress for object storage (zstd level 1 outruns the network path), not
        # for POSIX tiers (it is slower than NVMe writes here).
        default = Compression(None) if isinstance(storage_be, LocalBackend) else Compression(1)
        self._tiers.append(Tier("storage", storage_be, per_tier.get("storage", default), shared=True))

        job = hashlib.sha256(storage_be.url.encode()).hexdigest()[:16]
        root = Path(memory_dir) if memory_dir is not None else Path(default_memory_root()) / job
        self._memory_root = root
        self._memory_dir_given = memory_dir
        self._rank_dir = root / shard_name(self._rank, self._world)
        self._rank_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        self._lock_fd = self._take_lock()
        self._memory = Tier(
            "memory",
            LocalBackend(self._rank_dir, fsync=False, direct_io=False, private=True, durable=False),
        )
        # A copy of this rank's shard in a peer's memory (a mirror, or the shard's own memory
        # left on a node its rank moved away from), fetched into this rank's memory tier.
        self._mirror_tier = Tier("mirror", self._memory.backend)
        self._stager = Stager(self._rank_dir, self._opts)
        self._adopt_memory()
        self._persister = Persister(self._opts, self._memory, self._stager, keep, self._ctl)
        self._mirror_server: MirrorServer | None = None
        self._addrs: list[tuple[str, int]] = []
        self._mirrors = 0
        try:
            self._setup_mirrors(mirror)
        except BaseException:
            self._persister.close()
            os.close(self._lock_fd)
            raise
        self._handles: list[SaveHandle] = []
        self._sweeper: threading.Thread | None = None  # removes temporary files killed writers left
        self._last: tuple[int, Slot, bool] | None = None  # (step, slot, persisted)
        self._stats: dict[str, Any] = {"saves": 0}
        self._stats_lock = threading.Lock()
        self._closed = False
        atexit.register(self._atexit)
        log.debug(
            "flashckpt: rank %d/%d on node %s, memory tier %s",
            self._rank,
            self._world,
            self._node,
            self._rank_dir,
        )

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
        ``persisted``, ``persist_s`` per tier (filled in as tiers finish) and ``errors``; after a
        successful ``restore``, ``restored``: its ``step``, ``tier``, ``bytes`` and ``seconds``."""
        with self._stats_lock:
            out = dict(self._stats)
            out["persist_s"] = dict(out.get("persist_s", {}))
            out["errors"] = list(out.get("errors", []))
            return out

    def save(self, step: int, state: Any, *, force: bool = False) -> SaveHandle | None:
        """Stage ``state`` as ``step`` and return at once; persistence runs in the background.

        Blocks only for the copy into a staging slot (and, if both slots are still being
        persisted, until one is free: ``stats["slot_wait_s"]``).  Returns ``None`` when
        ``step % every != 0`` and not ``force``.  Background failures never raise here.
        """
        self._check_open()
        if type(step) is not int or step < 0:
            raise ConfigError(f"step must be a non-negative int, got {step!r}")
        if not force and step % self._every:
            return None
        t0 = time.perf_counter()
        flat = flatten(state)
        layout = self._stager.layout(flat.tensors)
        slot, waited = self._stager.acquire(layout.total_bytes)
        try:
            # Forget what the slot held, and an idle older copy of this same step number.
            for s in self._stager.slots:
                if s.step is not None and (s is slot or (s.step == step and not s.busy)):
                    self._memory.backend.delete(memory_manifest_key(s.step))
                    s.step, s.durable = None, False
            cold = self._stager.stage(slot, flat.tensors, layout)
        except OSError as exc:  # the memory tier is full: report, never kill training
            self._stager.release(slot)
            return self._failed_save(step, translate_os_error(exc, f"stage step {step}"), t0)
        except BaseException:
            self._stager.release(slot)
            raise
        if cold:  # the state grew: grow the other slot too, off the training thread
            self._stager.prefault(layout.total_bytes)
        self._stager.mark_staged(slot, step)
        persist = force or (step // self._every) % self._persist_every == 0
        tensors = tuple(
            TensorEntry(t.dtype, tuple(t.shape), off, n)
            for t, off, n in zip(flat.tensors, layout.offsets, layout.nbytes, strict=True)
        )
        chunks = tuple(ChunkEntry(slot.name, o, o, n, n, CODEC_RAW, "") for o, n in layout.chunks)
        manifest = Manifest(
            step, self._rank, self._world, self._node, now(), layout.total_bytes, tensors, chunks, flat.tree
        )
        # Written synchronously once the copy is complete: from here on the snapshot survives a
        # crash of this process.  The persist thread replaces it with a checksummed (sealed) one.
        try:
            self._memory.backend.put(memory_manifest_key(step), encode_manifest(manifest))
        except StorageError as exc:
            self._stager.release(slot)
            return self._failed_save(step, exc, t0)
        hooks.fire("stage.done", step=step)
        tiers = self._tiers if persist else []
        mirrored = bool(self._persister.mirror_peers)
        handle = SaveHandle(step, ["memory", *(["mirror"] if mirrored else []), *(t.name for t in tiers)])
        self._track(handle)
        self._last = (step, slot, persist)
        self._seq += 1
        self._persister.submit(
            Job(
                manifest,
                slot,
                list(tiers),
                handle,
                on_done=[self._on_done],
                seq=f"save{self._seq}",
                generation=slot.generation,
                mirror=mirrored,
            )
        )
        blocking = time.perf_counter() - t0
        with self._stats_lock:
            self._stats.update(
                step=step,
                blocking_s=blocking,
                slot_wait_s=waited,
                bytes=layout.total_bytes,
                cold=cold,
                persisted=persist,
                persist_s={},
                errors=[],
                saves=self._stats["saves"] + 1,
            )
        log.info(
            "flashckpt: staged step %d, %d bytes in %.3f s (%.2f GB/s)%s%s",
            step,
            layout.total_bytes,
            blocking,
            layout.total_bytes / max(blocking, 1e-9) / 1e9,
            f", waited {waited:.3f} s for a slot" if waited > 1e-3 else "",
            " (cold slot)" if cold else "",
        )
        return handle

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
                persist_s={},
                errors=[f"memory: {type(exc).__name__}: {exc}"],
                saves=self._stats["saves"] + 1,
            )
        return handle

    def restore(self, state: Any, *, step: int | Literal["latest"] = "latest") -> int | None:
        """Load the newest complete step (or ``step``) into ``state`` in place.

        Every rank of a job calls this at the same time; they agree on the newest step that
        every rank can load.  Each rank tries its own memory, then a peer's mirror of its
        shard, then its local tier, then storage; a step that fails verification on one
        source is tried on the next, and if it fails on every source of some rank, all ranks
        go on to the next older step (with a warning).  A DTensor step saved by another world
        size is resharded from storage.  Returns the step, or ``None`` when nothing was saved.
        A step that a persistent tier lacks is persisted again in the background (salvage).
        Raises :class:`CheckpointNotFound` when an explicit ``step`` is not available intact,
        and :class:`CorruptCheckpointError` when nothing intact remains after the state was
        already written to.
        """
        self._check_open()
        if step != "latest" and (type(step) is not int or step < 0):
            raise ConfigError(f"step must be 'latest' or a non-negative int, got {step!r}")
        want = None if step == "latest" else int(step)
        self._drain()
        t0 = time.perf_counter()
        self._start_sweep()
        plan = self._plan_restore(want)
        progress = _Progress()
        for s in plan.steps:
            loaded, fatal = self._load_step(s, state, plan, progress)
            if self._agree(s, loaded, fatal, progress):
                assert loaded is not None
                return self._restored(loaded, plan, state, t0)
        self._restore_nothing(want, state, progress)
        return None

    def prepare(self, state: Any) -> None:
        """Fault the staging slots in for ``state``'s size on a background thread, so that the
        first ``save`` costs a warm copy.  ``restore`` does this already."""
        self._check_open()
        self._stager.prefault(self._stager.layout(flatten(state).tensors).total_bytes)

    def wait(self, timeout: float | None = None) -> None:
        """Block until every save so far is durable; raise the first unreported failure."""
        deadline = None if timeout is None else time.monotonic() + timeout
        for h in list(self._handles):
            left = None if deadline is None else max(0.0, deadline - time.monotonic())
            h.wait(left)
        self._handles = [h for h in self._handles if not h.done()]
        self._persister.join()  # retention of the last commits, which follows them

    def latest_step(self) -> int | None:
        """The newest step held by any tier (not verified: ``restore`` verifies)."""
        self._check_open()
        steps = [s for _, held in self._inventory() for s in held]
        return max(steps) if steps else None

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
            self._persist_last()
            self._drain()
            clean = self._last_durable()
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
        if _raise:
            for h in self._handles:
                h.raise_failure()

    # -- internals -----------------------------------------------------------------------------
    def _setup_mirrors(self, mirror: int | None) -> None:
        """Every rank, at construction: where each rank's mirrors go, and a server per rank.

        Ranks serve the mirrors they hold whenever the job spans several nodes (also those an
        earlier attempt left, when this one mirrors nothing new).
        """
        nodes = self._ctl.all_gather(self._node)
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
        self._addrs = [tuple(a) for a in self._ctl.all_gather((default_host(), self._mirror_server.port))]
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
        fd = os.open(self._rank_dir / "lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise ConfigError(
                f"memory tier {self._rank_dir} is in use by another live process "
                "(two Checkpointers for the same storage and rank?)"
            ) from None
        return fd

    def _track(self, handle: SaveHandle) -> None:
        self._handles = [h for h in self._handles if not h.done() or h.failures]
        self._handles.append(handle)

    def _on_done(self, handle: SaveHandle) -> None:
        """Persist thread: fold a finished save into ``stats`` if it is still the last one."""
        with self._stats_lock:
            if self._stats.get("step") != handle.step:
                return
            self._stats["persist_s"] = dict(handle.persist_s)
            self._stats["written_bytes"] = dict(handle.written_bytes)
            self._stats["errors"] = [
                f"{f.tier}: {type(f.error).__name__}: {f.error}" for f in handle.failures
            ]

    def _drain(self) -> None:
        """Wait for every queued background job, without raising their errors."""
        self._stager.join_prefault()
        self._persister.join()

    def _inventory(self) -> list[tuple[Tier, list[int]]]:
        """What each tier holds; a tier that cannot be listed counts as empty and is recorded
        in ``self._unlisted`` (``restore`` then refuses to start from scratch)."""
        inv: list[tuple[Tier, list[int]]] = [(self._memory, memory_steps(self._memory.backend))]
        self._unlisted = []
        for tier in self._tiers:
            try:
                inv.append((tier, committed_steps(tier.backend, self._opts)))
            except StorageError as exc:
                log.warning("flashckpt: cannot list the %s tier (%s): %s", tier.name, tier.backend.url, exc)
                self._unlisted.append((tier, exc))
                inv.append((tier, []))
        return inv

    def _adopt_memory(self) -> None:
        """Map slot files and index memory manifests left by an earlier process."""
        by_name = {s.name: s for s in self._stager.slots}
        for s in self._stager.slots:
            s.adopt()
        for step in memory_steps(self._memory.backend):
            try:
                m = read_memory_manifest(self._memory.backend, step)
                keys = {c.key for c in m.chunks}
                slot = by_name.get(next(iter(keys))) if len(keys) == 1 else None
                if m.total_bytes and (slot is None or not slot.mapped or slot.capacity < m.total_bytes):
                    raise CorruptCheckpointError("memory manifest does not match its slot")
                if slot is not None:
                    if slot.step is not None and slot.step > step:
                        raise CorruptCheckpointError("slot holds a newer step")
                    if slot.step is not None:
                        self._memory.backend.delete(memory_manifest_key(slot.step))
                    slot.step, slot.durable = step, False
            except (CorruptCheckpointError, StorageError) as exc:
                log.warning("flashckpt: dropping memory snapshot of step %d: %s", step, exc)
                self._memory.backend.delete(memory_manifest_key(step))

    def _slot_of(self, m: Manifest) -> Slot:
        keys = {c.key for c in m.chunks}
        for s in self._stager.slots:
            if keys <= {s.name} and s.step == m.step:
                return s
        raise CorruptCheckpointError(f"memory snapshot of step {m.step} has no slot")

    def _load(
        self, tier: Tier, step: int, state: Any, filled: dict[int, torch.Tensor]
    ) -> tuple[Manifest, Slot]:
        """Return the verified manifest of ``step`` and a busy slot holding its bytes.

        From the memory tier, tensors of ``state`` that the step will be loaded into (CPU,
        contiguous, same dtype and shape) are filled while the slot is checksummed: one pass
        over memory instead of two.  They are recorded in ``filled``; if verification fails
        after that, the caller knows the state was written to.
        """
        pool = self._persister.pool
        if tier is self._memory:
            m = read_memory_manifest(tier.backend, step)
            slot = self._slot_of(m)
            if not self._stager.try_acquire(slot):
                raise CorruptCheckpointError(f"slot of step {step} is busy")
            try:
                fills = self._fills(m, state, filled)
                sealed = verify_chunks(
                    m, slot.view, pool, str(self._rank_dir), base=slot.address, fills=fills
                )
                if not m.sealed:  # the crash came before the persist thread checksummed it
                    tier.backend.put(memory_manifest_key(step), encode_manifest(sealed))
            except BaseException:
                self._stager.release(slot)
                raise
            return sealed, slot
        m = read_committed_manifest(tier.backend, step, self._rank, self._world, self._opts)
        check_fits(m.total_bytes, self._rank_dir, f"step {step} on the {tier.name} tier")
        slot, _ = self._stager.acquire(m.total_bytes, replacing=step)
        try:
            if slot.step is not None:
                self._memory.backend.delete(memory_manifest_key(slot.step))
                slot.step, slot.durable = None, False
            slot.ensure(m.total_bytes)
            fetch_chunks(tier.backend, m, slot.view, pool, self._opts)
            local = m.with_chunks(
                ChunkEntry(slot.name, c.offset, c.offset, c.nbytes, c.stored_nbytes, c.codec, c.checksum)
                for c in m.chunks
            )
            self._memory.backend.put(memory_manifest_key(step), encode_manifest(local))
            slot.step = step
        except BaseException:
            self._stager.release(slot)
            raise
        return local, slot

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

    def _apply(self, m: Manifest, slot: Slot, state: Any, filled: dict[int, torch.Tensor]) -> None:
        tree = m.state_tree()
        cuda = False

        def materialize(i: int, target: torch.Tensor | None) -> torch.Tensor:
            nonlocal cuda
            if target is not None and filled.get(i) is target:
                return target  # already filled while the slot was checksummed
            e = m.tensors[i]
            src = slot.tensor(e.offset, e.nbytes, e.dtype, e.shape)
            if target is not None and target.dtype == e.dtype and tuple(target.shape) == e.shape:
                try:
                    if target.is_cuda:
                        cuda = True
                        target.copy_(src, non_blocking=True)
                    else:
                        target.copy_(src)
                    return target
                except RuntimeError:  # not writable in place (e.g. an expanded, stride-0 view)
                    pass
            device = target.device if target is not None else torch.device("cpu")
            return src.to(device=device, copy=True)

        load_into(state, tree, materialize)
        if cuda:
            torch.cuda.synchronize()

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
                except OSError as exc:
                    log.warning("flashckpt: sweeping %s failed: %s", be.url, exc)
                    continue
                if n:
                    log.info("flashckpt: removed %d unfinished temporary files from %s", n, be.url)

        self._sweeper = threading.Thread(target=sweep, name="flashckpt-sweep", daemon=True)
        self._sweeper.start()

    def _plan_restore(self, want: int | None) -> _RestorePlan:
        """Training thread, every rank (gathers): what each rank can load, and the steps every
        rank can load, newest first."""
        inventory = self._inventory()
        mine = {s for _, held in inventory for s in held if want is None or s == want}
        if self._node_lead:
            self._warn_foreign_shards()
        holdings: dict[str, list[int]] = {}
        if self._mirror_server is not None:
            # shard directories this node keeps for ranks that run elsewhere now (renumbered)
            self._mirror_server.claim_orphans(self._memory_root, self._world)
            holdings = self._mirror_server.holdings()
        # The newest step every rank can load: from its own memory, its local disk, storage,
        # or a copy of its shard in a peer's memory.
        everyone = self._ctl.all_gather((sorted(mine), holdings))
        wanted = (lambda x: True) if want is None else (lambda x: x == want)

        def available(r: int) -> set[int]:
            shard = shard_name(r, self._world)
            out = set(everyone[r][0])
            for _, held_q in everyone:
                out.update(x for x in held_q.get(shard, []) if wanted(x))
            return out

        me = shard_name(self._rank, self._world)
        mirrored: dict[int, list[int]] = {}  # step -> ranks holding a copy of this rank's shard
        for q, (_, held_q) in enumerate(everyone):
            for step_q in held_q.get(me, []):
                if wanted(step_q):
                    mirrored.setdefault(step_q, []).append(q)
        common = set.intersection(*(available(r) for r in range(self._world)))
        mine |= set(mirrored)
        if self._ctl.distributed and mine - common:
            log.info(
                "flashckpt: rank %d holds steps %s that not every rank has; newest common: %s",
                self._rank,
                sorted(mine - common)[-3:],
                max(common) if common else None,
            )
        return _RestorePlan(inventory, sorted(common, reverse=True), mirrored)

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
        self, s: int, state: Any, plan: _RestorePlan, progress: _Progress
    ) -> tuple[_Loaded | None, BaseException | None]:
        """Training thread: load step ``s`` into ``state`` from this rank's cheapest source
        that verifies.  Returns what was loaded (``None``: no source worked), and an error
        that ends the restore on every rank (the state does not fit the step)."""
        sources: list[tuple[Source, int | None]] = [(src, None) for src in plan_sources(plan.inventory, s)]
        at = 1 if sources and sources[0][0].tier is self._memory else 0
        sources[at:at] = [(Source(s, self._mirror_tier), q) for q in plan.mirrored.get(s, [])]
        for src, peer in sources:
            filled: dict[int, torch.Tensor] = {}
            try:
                if peer is not None:  # a copy of this rank's shard in a peer's memory
                    m, slot = self._load_mirror(peer, s)
                else:
                    m, slot = self._load(src.tier, src.step, state, filled)
            except StateMismatchError as exc:
                if peer is not None:
                    progress.failed(exc, touched=False)
                    log.warning("flashckpt: step %d in rank %d's memory is another shape: %s", s, peer, exc)
                    continue
                if not src.tier.shared:
                    return None, exc
                try:
                    nbytes = self._reshard(src.tier, src.step, state, exc)
                except (CorruptCheckpointError, StorageError) as err:
                    progress.failed(err, touched=True)
                    log.warning("flashckpt: resharding step %d failed: %s", src.step, err)
                    continue
                except BaseException as err:
                    return None, err
                return _Loaded(s, src.tier, None, None, nbytes), None
            except (CorruptCheckpointError, StorageError) as exc:
                progress.failed(exc, touched=bool(filled))
                where = f"rank {peer}'s memory" if peer is not None else f"the {src.tier.name} tier"
                log.warning("flashckpt: step %d on %s is unusable, trying the next source: %s", s, where, exc)
                continue
            except FlashCkptError as exc:  # a peer refusing the job's secret, or the like
                if peer is None:
                    raise
                progress.failed(exc, touched=False)
                log.warning("flashckpt: step %d from rank %d's memory is unusable: %s", s, peer, exc)
                continue
            try:
                hooks.fire("restore.loaded", step=s, tier=src.tier.name if peer is None else "mirror")
                self._apply(m, slot, state, filled)
            except BaseException as exc:  # the state does not fit the step: the user's to fix
                self._stager.release(slot)
                return None, exc
            return _Loaded(s, src.tier, m, slot, m.total_bytes), None
        return None, None

    def _agree(
        self, s: int, loaded: _Loaded | None, fatal: BaseException | None, progress: _Progress
    ) -> bool:
        """Training thread, every rank (gathers): True if every rank loaded step ``s``.  Raises
        a rank's fatal error on every rank; else, if another rank failed, the state holds
        step ``s`` here and the next older step will overwrite it."""
        outcomes = self._ctl.all_gather((loaded is not None, None if fatal is None else repr(fatal)))
        if fatal is not None:
            raise fatal
        failed = [(r, f) for r, (_, f) in enumerate(outcomes) if f is not None]
        if failed:
            raise CoordinationError(f"restore failed on rank {failed[0][0]}: {failed[0][1]}")
        if loaded is not None and all(ok for ok, _ in outcomes):
            return True
        if loaded is not None:
            progress.touched = True
            if loaded.slot is not None:
                self._stager.release(loaded.slot)
            log.warning("flashckpt: step %d is unusable on another rank; trying an older one", s)
        return False

    def _restored(self, loaded: _Loaded, plan: _RestorePlan, state: Any, t0: float) -> int:
        """Training thread, every rank: record and log a restore, then salvage (gathers)."""
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
        if loaded.manifest is None or loaded.slot is None:  # resharded: nothing of it is staged
            self._stager.prefault(self._stager.layout(flatten(state).tensors).total_bytes)
        else:  # a fetched copy is in this rank's memory tier now
            where = self._memory if tier is self._mirror_tier else tier
            self._after_restore(loaded.manifest, loaded.slot, where, plan.inventory)
        return int(s)

    def _restore_nothing(self, want: int | None, state: Any, progress: _Progress) -> None:
        """Training thread, every rank (gathers): no step could be restored.  Raise if that is
        not a clean fresh start, else prefault the slots for ``state``."""
        outcome = self._ctl.all_gather(
            (progress.touched, [f"rank {self._rank}: {t.name}" for t, _ in self._unlisted])
        )
        unlisted = [x for _, u in outcome for x in u]
        if unlisted and want is None:  # every rank decides alike
            raise TransientStorageError(
                f"nothing restorable was found, but some tiers could not be listed ({', '.join(unlisted)}): "
                "refusing to start from scratch; retry when they are reachable"
            ) from (self._unlisted[0][1] if self._unlisted else progress.last_error)
        if any(t for t, _ in outcome):
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

    def _load_mirror(self, peer: int, step: int) -> tuple[Manifest, Slot]:
        """Fetch this rank's shard of ``step`` from the mirror rank ``peer`` holds, into a free
        slot of this rank's memory tier, and verify every chunk.  Returns a busy slot."""
        held: list[Slot] = []

        def into(m: Manifest) -> Callable[[int, int], memoryview]:
            check_fits(m.total_bytes, self._rank_dir, f"step {step} from rank {peer}'s mirror")
            slot, _ = self._stager.acquire(m.total_bytes, replacing=step)
            held.append(slot)
            if slot.step is not None:
                self._memory.backend.delete(memory_manifest_key(slot.step))
                slot.step, slot.durable = None, False
            slot.ensure(m.total_bytes)
            return slot.view

        try:
            me = shard_name(self._rank, self._world)
            m = fetch(self._addrs[peer], self._ctl.secret, me, step, into, self._opts)
            if (m.rank, m.world_size) != (self._rank, self._world):
                raise CorruptCheckpointError(f"rank {peer}'s mirror of step {step} holds another shard")
            slot = held[0]
            local = m.with_chunks(dataclasses.replace(c, key=slot.name) for c in m.chunks)
            where = f"rank {peer}'s mirror"
            sealed = verify_chunks(local, slot.view, self._persister.pool, where, base=slot.address)
            self._memory.backend.put(memory_manifest_key(step), encode_manifest(sealed))
            slot.step = step
        except BaseException:
            for slot in held:
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
        self, m: Manifest, slot: Slot, tier: Tier, inventory: list[tuple[Tier, list[int]]]
    ) -> None:
        """Salvage, then prefault the other slot.  Every rank calls this (it gathers).

        Snapshots staged in memory but not persisted (the crash came first) are written to the
        tiers that lack them, oldest first: the restored step, and an older snapshot still in
        the other slot if it is newer than what a tier holds.  On the shared tier of a
        multi-rank job a step can only be committed with every rank's shard: the ranks whose
        shard is missing there write it and the last of them commits; if every shard is there
        already but the commit record is not (the committing rank died), rank 0 commits it.
        A step restored from a persistent tier is written again only where the job needs it
        committed: the shared tier.
        """
        self._restores += 1
        held = {t.name: set(s) for t, s in inventory}
        missing = [t for t in self._tiers if m.step not in held.get(t.name, set())]
        self._stager.mark_staged(slot, m.step, durable=bool(self._tiers) and not missing)
        in_memory = held.get(self._memory.name, set()) | ({m.step} if tier is self._memory else set())
        todo: dict[int, list[Tier]] = {}
        for t in self._tiers:
            if t.shared and self._ctl.distributed:
                continue
            newest = max(held.get(t.name, set()), default=-1)
            for s in sorted(in_memory):
                if s not in held.get(t.name, set()) and (s == m.step or newest < s < m.step):
                    todo.setdefault(s, []).append(t)
        writers: dict[int, int] = {}
        if self._ctl.distributed:  # the restored step's bytes are in its slot, wherever it came from
            writers = self._salvage_shared(m.step, in_memory | {m.step}, held, todo)
        for s in sorted(todo):
            self._salvage(s, m if s == m.step else None, slot, todo[s], writers.get(s))
        if m.step in todo:
            self._last = (m.step, slot, True)
        else:
            self._stager.release(slot)
            self._last = (m.step, slot, not missing)
        self._stager.prefault(m.total_bytes)

    def _salvage_shared(
        self, restored: int, in_memory: set[int], held: dict[str, set[int]], todo: dict[int, list[Tier]]
    ) -> dict[int, int]:
        """Training thread, every rank: which uncommitted steps the ranks write to the shared
        tier (added to ``todo``); returns the number of writers per step."""
        shared = next(t for t in self._tiers if t.shared)
        committed = held.get(shared.name, set())
        newest = max(committed, default=-1)
        mine = {s for s in in_memory if s not in committed and (s == restored or newest < s < restored)}
        steps = sorted(set().union(*self._ctl.all_gather(sorted(mine))))
        status = []
        for s in steps:
            try:
                shared.backend.head(manifest_key(s, self._rank, self._world))
                status.append("have")
            except StorageError:
                status.append("write" if s in in_memory else "none")
        everyone = self._ctl.all_gather(status)
        writers: dict[int, int] = {}
        for i, s in enumerate(steps):
            column = [st[i] for st in everyone]
            if "none" in column:
                continue  # some rank has neither the shard nor the snapshot: never complete
            writers[s] = column.count("write")
            if status[i] == "write":
                todo.setdefault(s, []).append(shared)
            elif writers[s] == 0 and self._rank == 0:
                log.info("flashckpt: every shard of step %d is on the storage tier; committing it", s)
                self._persister.commit_shared(shared, s, self._world)
        return writers

    def _salvage(
        self, step: int, m: Manifest | None, slot: Slot | None, tiers: list[Tier], writers: int | None
    ) -> None:
        """Hand a memory snapshot to the persist thread (``m``/``slot``: the restored step,
        whose slot the caller holds; else the snapshot is looked up and its slot taken)."""
        if m is None:
            try:
                m = read_memory_manifest(self._memory.backend, step)
                slot = self._slot_of(m)
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
        self._track(handle)
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

    def _persist_last(self) -> None:
        """On close: persist the newest snapshot if it lives in memory only."""
        if self._last is None or self._last[2] or not self._tiers:
            return
        step, slot, _ = self._last
        if slot.step != step or not self._stager.try_acquire(slot):
            return
        try:
            m = read_memory_manifest(self._memory.backend, step)
        except (CorruptCheckpointError, StorageError) as exc:
            self._stager.release(slot)
            log.error("flashckpt: cannot persist step %d on close: %s", step, exc)
            return
        handle = SaveHandle(step, [t.name for t in self._tiers])
        self._track(handle)
        self._last = (step, slot, True)
        self._persister.submit(
            Job(m, slot, list(self._tiers), handle, hashed=True, seq="close", generation=slot.generation)
        )

    def _last_durable(self) -> bool:
        if self._last is None:
            return True
        step = self._last[0]
        for h in self._handles:
            if h.step == step and h.failures:
                return False
        try:
            return all(step in committed_steps(t.backend, self._opts) for t in self._tiers)
        except FlashCkptError:
            return False

    def _release_memory(self) -> None:
        be = self._memory.backend
        for name in be.children(""):
            if not name.endswith("/"):
                be.delete(name)
        # the per-user directory above the default root too; never above a memory_dir given
        dirs = [self._rank_dir, self._memory_root]
        if self._memory_dir_given is None:
            dirs.append(self._memory_root.parent)
        for d in dirs:
            try:
                d.rmdir()
            except OSError:
                break

    def _atexit(self) -> None:
        try:
            self.close(_raise=False)
        except Exception:
            log.exception("flashckpt: close at exit failed")
