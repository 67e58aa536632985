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

The Checkpointer assembles one rank's parts and reads as the data path: ``save`` walks the
state, stages it in a slot (staging), records it in the memory tier and hands it to the save
worker (coordination.worker); ``restore`` plans from every rank's inventory
(coordination.plan), loads the newest snapshot every rank can load (coordination.restore),
moves the timeline on (coordination.timeline) and salvages what only memory held
(coordination.salvage).
"""

from __future__ import annotations

import atexit
import contextlib
import logging
import os
import secrets
import threading
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any, Literal

from flashckpt._config import Options, default_memory_root, memory_root, node_id, options_from_env, storage_id
from flashckpt._dist import Control
from flashckpt._secure import private_dir
from flashckpt.backends import LocalBackend
from flashckpt.coordination.handle import SaveHandle, wait_quietly
from flashckpt.coordination.inventory import read_run
from flashckpt.coordination.membership import close_mirrors, setup_mirrors
from flashckpt.coordination.nodesplit import node_split
from flashckpt.coordination.parts import RankParts
from flashckpt.coordination.plan import plan_restore, take_inventory
from flashckpt.coordination.preemption import DEFAULT_SIGNALS, Preemption, parse_signals
from flashckpt.coordination.restore import Loaded, Restorer
from flashckpt.coordination.retention import start_sweep
from flashckpt.coordination.salvage import Salvage
from flashckpt.coordination.save import Saver, Staged
from flashckpt.coordination.timeline import Timeline
from flashckpt.coordination.worker import Persister
from flashckpt.errors import (
    CheckpointNotFound,
    ClosedError,
    ConfigError,
    CorruptCheckpointError,
    StorageError,
    WaitTimeout,
)
from flashckpt.format import MAX_STEP, shard_name
from flashckpt.staging.memory_tier import MemoryTier, lock
from flashckpt.staging.stager import Stager
from flashckpt.staging.statewalk import flatten
from flashckpt.storage import Backend, open_backend
from flashckpt.transfer.codec import Compression
from flashckpt.transfer.tier import Tier

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


def _check_args(every: Any, persist_every: Any, keep: Any, mirror: Any) -> None:
    for name, v in (("every", every), ("persist_every", persist_every)):
        if type(v) is not int or v < 1:
            raise ConfigError(f"{name} must be an int >= 1, got {v!r}")
    if keep is not None and (type(keep) is not int or keep < 1):
        raise ConfigError(f"keep must be an int >= 1 or None, got {keep!r}")
    if mirror is not None and (type(mirror) is not int or mirror < 0):
        raise ConfigError(f"mirror must be None or an int >= 0, got {mirror!r}")


def _open_tiers(
    storage: str | os.PathLike[str] | Backend,
    local_dir: str | os.PathLike[str] | Backend | None,
    compression: str | dict[str, str | None] | None,
    storage_options: dict[str, Any] | None,
    opts: Options,
    ctl: Control,
    owned: list[Backend],
) -> list[Tier]:
    """The persistent tiers, cheapest first (local, storage); the backends opened here are
    added to ``owned`` (the Checkpointer closes them)."""
    per_tier = _compression_per_tier(compression)
    storage_be = open_backend(
        storage,
        storage_options=storage_options,
        max_concurrency=opts.io_threads,
        range_bytes=opts.chunk_bytes,
    )
    if isinstance(storage_be, LocalBackend) and not isinstance(storage, Backend):
        storage_be = LocalBackend(storage_be.root, fsync=opts.fsync, direct_io=opts.direct_io)
    if not isinstance(storage, Backend):
        owned.append(storage_be)
    tiers: list[Tier] = []
    if local_dir is not None:
        # A node-local disk: in a multi-rank job each rank keeps its shard in its own
        # directory there, with its own commit records (see docs/format.md).
        if isinstance(local_dir, Backend):
            local_be: Backend = local_dir
        else:
            where = Path(local_dir) / shard_name(ctl.rank, ctl.world) if ctl.world > 1 else local_dir
            local_be = LocalBackend(where, fsync=opts.fsync, direct_io=opts.direct_io)
            owned.append(local_be)
        tiers.append(Tier("local", local_be, per_tier.get("local", Compression(None))))
    # Default: compress for object storage (zstd level 1 outruns the network path), not
    # for POSIX tiers (it is slower than NVMe writes here).
    default = Compression(None) if isinstance(storage_be, LocalBackend) else Compression(1)
    tiers.append(Tier("storage", storage_be, per_tier.get("storage", default), shared=True, holds_run=True))
    return tiers


def _rank_directory(
    url: str, memory_dir: str | os.PathLike[str] | None, rank: int, world: int
) -> tuple[Path, list[Path], Path]:
    """This rank's memory-tier directory, the directories above it that a clean close removes
    once empty (never above a ``memory_dir`` given), and the highest one that need not be
    private.  Every directory from the per-user root (or the ``memory_dir`` given) down is
    created 0700 and checked (ours, not a link, no access for others): flashckpt/_secure.py."""
    base = Path(memory_dir) if memory_dir is not None else Path(default_memory_root())
    rank_dir = private_dir(memory_root(url, memory_dir) / shard_name(rank, world), trusted_above=base.parent)
    return rank_dir, [rank_dir.parent, *([base] if memory_dir is None else [])], base.parent


def _close_all(backends: list[Backend]) -> None:
    for be in backends:
        try:
            be.close()
        except Exception as exc:  # logged: the other backends are closed too  # noqa: BLE001
            log.debug("flashckpt: closing %s: %s", be.url, exc)


def _timeline(ctl: Control, storage: Tier, storage_id: str, opts: Options) -> tuple[Timeline, list[str]]:
    """Every rank, at construction (one gather): this Checkpointer's timeline (its generation:
    rank 0's clock in microseconds, so later Checkpointers save newer snapshots and
    ``restore`` raises it above everything it sees; the run id: the storage tier's run
    record, else a fresh one) and every rank's node name."""
    run, known = secrets.token_hex(8), False
    if ctl.rank == 0:
        try:
            have = read_run(storage.backend, opts)
        except (StorageError, CorruptCheckpointError) as exc:  # restore reports the tier
            log.warning("flashckpt: cannot read the run record of the storage tier: %s", exc)
            have = None
        if have is not None:
            run, known = have, True
    info = ctl.all_gather([node_id(), time.time_ns() // 1000, run, known])
    timeline = Timeline(int(info[0][1]), str(info[0][2]), bool(info[0][3]), storage_id)
    return timeline, [str(i[0]) for i in info]


class _Stats:
    """What ``Checkpointer.stats`` reports: written by the training thread, read by any."""

    def __init__(self) -> None:
        self._figures: dict[str, Any] = {"saves": 0}
        self._last: SaveHandle | None = None  # the last save's handle: its tiers as they finish
        self._lock = threading.Lock()

    def saved(self, step: int, staged: Staged, blocking: float) -> None:
        """A save returned after ``blocking`` seconds."""
        with self._lock:
            self._figures.update(
                step=step,
                blocking_s=blocking,
                slot_wait_s=staged.waited,
                bytes=staged.nbytes,
                cold=staged.cold,
                persisted=len(staged.handle.tiers) > 1,
                saves=self._figures["saves"] + 1,
            )
            self._last = staged.handle
        if staged.nbytes:
            log.debug(
                "flashckpt: staged step %d, %d bytes in %.3f s (%.2f GB/s)%s%s",
                step,
                staged.nbytes,
                blocking,
                staged.nbytes / max(blocking, 1e-9) / 1e9,
                f", waited {staged.waited:.3f} s for a slot" if staged.waited > 1e-3 else "",
                " (cold slot)" if staged.cold else "",
            )

    def restored(self, loaded: Loaded, secs: float, newest: tuple[int, int] | None) -> None:
        """A restore loaded ``loaded`` in ``secs`` (``newest``: the newest snapshot every rank
        could load, which a rollback or a fallback did not)."""
        s, tier, resharded = loaded.step, loaded.tier, loaded.manifest is None
        with self._lock:
            self._figures["restored"] = {
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
        if newest is not None and loaded.order < newest:
            log.warning(
                "flashckpt: restored step %d, not the newest step %d: the run continues from step %d, "
                "and the snapshots it leaves behind are older than its next saves (retired as newer "
                "ones are committed)",
                s,
                newest[1],
                s,
            )

    def report(self) -> dict[str, Any]:
        with self._lock:
            out = dict(self._figures)
            last = self._last
        out.update(last.report() if last is not None else {"persist_s": {}, "errors": []})
        return out


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
        preempt_signals: the signals that mean the job is being preempted (default SIGTERM and
            SIGUSR1; names or numbers; ``None`` or ``()``: none).  Handlers are installed when
            the Checkpointer is built on the main thread, chained to the ones they replace,
            and put back by ``close``.  See :attr:`preempted`.
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
        preempt_signals: Iterable[int | str] | None = DEFAULT_SIGNALS,
        options: Options | None = None,
    ) -> None:
        _check_args(every, persist_every, keep, mirror)
        signals = parse_signals(preempt_signals)
        self._closed = True  # until built: close() does nothing, nothing is registered
        self._opts = options_from_env(options)
        self._every, self._persist_every, self._keep = every, persist_every, keep
        self._seq = 0  # saves made so far (after `every`): the same on every rank, names a save
        # held by the training thread in save and close, and by the preemption watcher when it
        # persists the newest snapshot itself
        self._busy = threading.RLock()
        self._handles: list[SaveHandle] = []
        self._sweeper: threading.Thread | None = None  # removes temporary files killed writers left
        self._stats = _Stats()
        self._owned: list[Backend] = []  # backends this Checkpointer opened (and closes)
        with contextlib.ExitStack() as undo:
            self._build(undo, storage, local_dir, memory_dir, compression, storage_options, process_group)
            self._mirrors = setup_mirrors(self._parts, self._nodes, mirror, undo)
            self._preemption = Preemption(signals, self._opts.preempt_grace_s, self._ctl, self._at_grace)
            self._preemption.install()
            undo.callback(self._preemption.uninstall)
            undo.pop_all()
        self._closed = False
        atexit.register(self._atexit)
        log.debug(
            "flashckpt: rank %d/%d on node %s, memory tier %s, run %s generation %d",
            self._rank,
            self._world,
            self._node,
            self._rank_dir,
            self._timeline.run,
            self._timeline.gen,
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
        self._ctl = ctl = Control(process_group, self._opts.coord_timeout_s)
        undo.callback(ctl.release)
        self._rank, self._world, self._node = ctl.rank, ctl.world, node_id()
        undo.callback(_close_all, self._owned)
        self._tiers = _open_tiers(
            storage, local_dir, compression, storage_options, self._opts, ctl, self._owned
        )
        url = self._tiers[-1].backend.url
        sid = storage_id(url)  # which storage tier the snapshots belong to (in every manifest)
        self._rank_dir, self._parents, trusted = _rank_directory(url, memory_dir, self._rank, self._world)
        self._lock_fd = lock(self._rank_dir, trusted)
        undo.callback(os.close, self._lock_fd)
        self._stager = Stager(self._rank_dir, self._opts)
        undo.callback(self._stager.close, unlink=False)
        self._mem = MemoryTier(self._rank_dir, self._stager.slots, parts=True)
        self._mem.adopt()
        self._mem.refuse_foreign(sid, url)
        self._memory = Tier("memory", self._mem.backend)
        self._persister = Persister(self._opts, self._mem, self._stager, self._keep, ctl)
        undo.callback(self._persister.close)
        self._timeline, self._nodes = _timeline(ctl, self._tiers[-1], sid, self._opts)
        self._persister.split = node_split(ctl, self._nodes, self._rank_dir, self._lock_fd, self._opts)
        # A copy of this rank's shard in a peer's memory (a mirror, or the shard's own memory
        # left on a node its rank moved away from) is fetched into this rank's memory tier.
        mirror_tier = Tier("mirror", self._mem.backend)
        self._parts = RankParts(
            self._opts, ctl, self._rank_dir, self._tiers, self._memory, mirror_tier,
            self._mem, self._stager, self._persister, self._timeline, self._node, self._persister.split,
        )  # fmt: skip
        self._restorer = Restorer(self._parts)
        self._salvage = Salvage(self._parts, self._track)
        self._saver = Saver(self._parts, self._salvage, self._track)

    # -- public API ----------------------------------------------------------------------------
    def __enter__(self) -> Checkpointer:
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        self.close(_raise=exc is None, _aborted=exc is not None)

    @property
    def memory_path(self) -> Path:
        """This rank's memory-tier directory."""
        return self._rank_dir

    @property
    def preempted(self) -> bool:
        """The job is being preempted: stop the loop (``close`` waits until the final snapshot
        is durable).  Any thread.  After a signal in ``preempt_signals`` the next ``save`` call
        takes a forced, persisted snapshot; one process: True from the signal on; several ranks:
        True on every rank after the same, final ``save`` call.  README, "Preemption"."""
        p = self._preemption
        return p.final_taken or (self._world == 1 and p.signalled)

    @property
    def stats(self) -> dict[str, Any]:
        """The last save's figures: ``blocking_s``, ``slot_wait_s``, ``bytes``, ``cold``,
        ``persisted``, ``persist_s`` per tier (filled in as tiers finish) and ``errors`` (every
        failure of the last save, tier by tier, mirror and retention failures included); after
        a successful ``restore``, ``restored``: its ``step``, ``tier``, ``bytes`` and ``seconds``.
        Any thread."""
        return {**self._stats.report(), "prefaulting": self._stager.prefaulting}

    def save(self, step: int, state: Any, *, force: bool = False) -> SaveHandle | None:
        """Stage ``state`` as ``step`` and return at once; persistence runs in the background.

        Blocks only for the copy into a staging slot (and, if both slots are still being
        persisted, until one is free: ``stats["slot_wait_s"]``).  Returns ``None`` when
        ``step % every != 0`` and not ``force``.  Background failures never raise here; a
        state that cannot be saved raises :class:`UnsupportedStateError` before any slot is
        taken, and a persist thread that is gone raises at once instead of hanging.  Saving a
        step below the last one saved or restored continues the run from there: the new
        snapshots are newer than the old higher-numbered ones (see docs/format.md).

        ``state`` may also be a function of no arguments that returns the state: it is called
        only when this call stages (a framework whose state dict costs something to build,
        like Lightning's, builds it only then).
        """
        self._check_open()
        _check_step(step)
        with self._busy:  # the preemption watcher may persist the newest snapshot meanwhile
            final = self._preemption.at_save()
            if not (force or final) and step % self._every:
                return None
            self._persister.check_alive()
            t0 = time.perf_counter()
            if callable(state) and not hasattr(state, "state_dict"):
                state = state()
            flat = flatten(state)  # refuses what the format cannot hold, before a slot is taken
            layout = self._stager.layout(flat.tensors)
            # Every rank makes the same saves: these change alike on every rank, whatever fails.
            self._seq += 1
            self._timeline.next_save(step)
            persist = force or final or (step // self._every) % self._persist_every == 0
            staged = self._saver.stage(step, flat, layout, persist=persist, seq=f"save{self._seq}")
            self._stats.saved(step, staged, time.perf_counter() - t0)
            if final:
                self._preemption.took_final()
            return staged.handle

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
        if self._sweeper is None:
            self._sweeper = start_sweep(self._tiers, self._rank, self._opts)
        plan = plan_restore(self._parts, want, node_lead=self._nodes.index(self._node) == self._rank)
        loaded, progress = self._restorer.newest(plan, state)
        if loaded is not None:
            self._stats.restored(loaded, time.perf_counter() - t0, plan.newest)
            self._timeline.restored(
                loaded.order, loaded.ancestry(plan.inventory), plan.newest_gen, loaded.run
            )
            self._persister.protect = {loaded.step: self._timeline.gen}
            if loaded.manifest is None or loaded.slot is None:  # resharded: nothing of it is staged
                self._stager.prefault(self._stager.layout(flatten(state).tensors).total_bytes)
            else:  # a fetched copy is in this rank's memory tier now
                self._salvage.after_restore(loaded.manifest, loaded.slot, plan.inventory)
            return loaded.step
        mark = self._timeline.mark()
        self._timeline.fresh(plan.newest_gen)  # nothing restored: the next save starts afresh
        try:
            self._restorer.nothing(want, state, progress)
        except CheckpointNotFound:
            # The step asked for is not there and the state is untouched: the run goes on from
            # where it was, so its next save continues (or branches off) the last save or
            # restore, and retention keeps the steps it continues from.
            self._timeline.back_to(mark)
            raise
        return None

    def prepare(self, state: Any, *, wait: bool = False, timeout: float | None = None) -> None:
        """Fault the staging slots in for ``state``'s size on a background thread, so that the
        first ``save`` costs a warm copy.  ``restore`` does this already (a restarted job maps
        only the slot it restores from; the rest is faulted in behind it).  ``wait``: return
        once the slots are warm (``WaitTimeout`` after ``timeout`` seconds); without it,
        ``stats["prefaulting"]`` says whether that is still going on.  Training thread."""
        self._check_open()
        self._stager.prefault(self._stager.layout(flatten(state).tensors).total_bytes)
        if wait and not self._stager.join_prefault(timeout):
            raise WaitTimeout(f"the staging slots were not faulted in within {timeout} s")

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
        inventory, _ = take_inventory(self._parts)
        held = [o for _, orders in inventory for o in orders]
        return max(held)[1] if held else None

    def close(self, *, _raise: bool = True, _aborted: bool = False) -> None:
        """Wait for background work, persist the newest snapshot if it was memory-only, stop the
        threads, and free the memory tier if everything is durable.  Idempotent.

        Leaving a ``with`` block on an exception (``_aborted``) in a multi-rank job persists
        the newest snapshot to this rank's own tiers only: a peer may be dead (the exception
        is often a collective's), and the shared tier's commit would wait ``coord_timeout_s``
        for it, holding the restart back.  The memory tier keeps it; the restart salvages it."""
        if self._closed:
            return
        self._closed = True
        atexit.unregister(self._atexit)
        self._preemption.closing()
        self._stager.stop_prefault()  # faulting slots in for saves that will not come
        clean = False
        try:
            self._drain()
            with self._busy:
                self._salvage.at_close({h.step for h in self._handles if h.failures}, shared=not _aborted)
            self._drain()
            if not _aborted:
                self._salvage.await_shared_commits()
            clean = self._salvage.memory_durable()
            close_mirrors(self._parts, clean)
        finally:
            self._stop(clean)
        if _raise:
            for h in self._handles:
                h.raise_failure()

    # -- internals -----------------------------------------------------------------------------
    def _stop(self, clean: bool) -> None:
        """Close: stop every thread, and free the memory tier if ``clean`` (else keep it for
        the next attempt)."""
        self._preemption.uninstall()
        self._persister.close()
        if self._sweeper is not None:
            self._sweeper.join()
        if self._parts.mirror_server is not None:
            self._parts.mirror_server.close()
        self._stager.close(unlink=clean)
        if clean:
            self._mem.release(self._lock_fd, self._parents)
        else:
            log.warning(
                "flashckpt: keeping the memory tier %s: the newest snapshot is not durable on every tier",
                self._rank_dir,
            )
            os.close(self._lock_fd)
        self._ctl.release()
        _close_all(self._owned)

    def _at_grace(self) -> Callable[[], None]:
        """The preemption watcher, when the grace period ended before ``close``: persist the
        newest snapshot if it lives in memory only; returns a bounded wait for durability."""
        with self._busy:
            if self._closed:
                return lambda: None
            self._salvage.at_close({h.step for h in self._handles if h.failures})
            handles = list(self._handles)
        return lambda: wait_quietly(handles, self._opts.coord_timeout_s)

    def _check_open(self) -> None:
        if self._closed:
            raise ClosedError("this Checkpointer is closed")

    def _track(self, handle: SaveHandle) -> None:
        self._handles = [h for h in self._handles if not h.done() or h.failures]
        self._handles.append(handle)

    def _drain(self) -> None:
        """Wait for every queued background job, without raising their errors (but raising
        at once if the persist thread is gone)."""
        self._stager.join_prefault()
        self._persister.join()

    def _atexit(self) -> None:
        try:
            self.close(_raise=False)
        except Exception:
            log.exception("flashckpt: close at exit failed")
