"""Staging: reusable host-memory slots, the layout of a shard in them, and the copy.

A slot is one file in the memory tier directory (``/dev/shm`` by default, mode 0600) mapped
shared, so its bytes outlive a crash of the training process.  There are two slots (double
buffering): while one is being checksummed / persisted in the background, the next ``save``
copies into the other.  When both are busy, ``acquire`` waits and reports how long; a save is
never dropped.

Slots are faulted in ahead of time on the ``flashckpt-prefault`` thread as soon as the state's
size is known (first-touch of fresh shared memory costs several times a copy), pinned with
``cudaHostRegister`` when CUDA is available, and copied into on a side CUDA stream for device
tensors.  A slot only grows; its contents survive growth.

Threads: ``acquire``/``stage`` run on the training thread; ``release`` on the persist thread;
``prefault`` starts the prefault thread, which ``close`` joins.
"""

from __future__ import annotations

import ctypes
import errno
import logging
import mmap
import os
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from flashckpt import _hooks as hooks
from flashckpt._config import Options
from flashckpt.errors import StorageFullError

log = logging.getLogger(__name__)

_PAGE = 4096
_LINE = 64
_GROW = 2 << 20  # capacities are rounded up to 2 MiB
_PIECE = 16 << 20  # the prefault thread faults this much between checks for a running copy
_MADV_POPULATE_WRITE = 23  # Linux >= 5.14: fault pages in, report ENOMEM instead of SIGBUS


def _libc_madvise() -> Callable[[int, int, int], int] | None:
    """libc ``madvise`` through ctypes, which releases the GIL (``mmap.madvise`` and
    ``mmap(MAP_POPULATE)`` hold it on CPython 3.11, stalling the training thread)."""
    if os.uname().sysname != "Linux":
        return None
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        fn = libc.madvise
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    fn.restype = ctypes.c_int

    def madvise(addr: int, length: int, advice: int) -> int:
        return int(fn(addr, length, advice))

    return madvise


_madvise = _libc_madvise()


def _populate_write(addr: int, length: int) -> None:
    assert _madvise is not None
    if _madvise(addr, length, _MADV_POPULATE_WRITE) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"MADV_POPULATE_WRITE failed: {os.strerror(err)}")


def _probe_populate_write() -> bool:
    """True if this kernel supports MADV_POPULATE_WRITE."""
    if _madvise is None:
        return False
    m = mmap.mmap(-1, mmap.PAGESIZE)
    try:
        t = torch.frombuffer(m, dtype=torch.uint8)
        ok = _madvise(t.data_ptr(), mmap.PAGESIZE, _MADV_POPULATE_WRITE) == 0
        del t
        return ok
    finally:
        m.close()


_CAN_POPULATE_WRITE = _probe_populate_write()


def _round_up(n: int, align: int) -> int:
    return (n + align - 1) // align * align


@dataclass(frozen=True)
class Layout:
    """Where each tensor lives in a shard's byte range, and how the range is cut into chunks.

    Tensors of ``small_tensor_bytes`` or more start on a page boundary and get chunks of their
    own (at most ``chunk_bytes`` each); smaller tensors are packed, cache-line aligned, into
    shared chunks after them.  Every chunk starts on a page boundary (O_DIRECT friendly).
    """

    signature: tuple[tuple[torch.dtype, tuple[int, ...]], ...]
    offsets: tuple[int, ...]
    nbytes: tuple[int, ...]
    total_bytes: int
    chunks: tuple[tuple[int, int], ...]  # (offset, nbytes)


def signature_of(tensors: Sequence[torch.Tensor]) -> tuple[tuple[torch.dtype, tuple[int, ...]], ...]:
    return tuple((t.dtype, tuple(t.shape)) for t in tensors)


def plan_layout(tensors: Sequence[torch.Tensor], opts: Options) -> Layout:
    sizes = [t.numel() * t.element_size() for t in tensors]
    offsets = [0] * len(tensors)
    chunks: list[tuple[int, int]] = []
    cursor = 0
    for i, n in enumerate(sizes):
        if n >= opts.small_tensor_bytes:
            cursor = _round_up(cursor, _PAGE)
            offsets[i] = cursor
            for start in range(0, n, opts.chunk_bytes):
                chunks.append((cursor + start, min(opts.chunk_bytes, n - start)))
            cursor += n
    pack_start = pack_end = -1
    for i, n in enumerate(sizes):
        if n == 0 or n >= opts.small_tensor_bytes:
            continue
        if pack_start < 0 or _round_up(pack_end, _LINE) + n - pack_start > opts.chunk_bytes:
            if pack_start >= 0:
                chunks.append((pack_start, pack_end - pack_start))
            pack_start = pack_end = _round_up(cursor, _PAGE)
        offsets[i] = _round_up(pack_end, _LINE)
        pack_end = cursor = offsets[i] + n
    if pack_start >= 0:
        chunks.append((pack_start, pack_end - pack_start))
    return Layout(signature_of(tensors), tuple(offsets), tuple(sizes), cursor, tuple(sorted(chunks)))


def check_fits(nbytes: int, directory: Path | None, what: str) -> None:
    """Refuse to map ``nbytes`` that the memory tier (or RAM) cannot hold, before trying.

    A manifest's size is validated against its chunk table, but a hostile or simply too large
    shard must fail cleanly here rather than exhaust shared memory.
    """
    if directory is not None:
        st = os.statvfs(directory)
        free = st.f_bavail * st.f_frsize
        free += sum(p.stat().st_size for p in directory.glob("slot-*.bin"))
    else:
        free = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    if nbytes > free:
        raise StorageFullError(errno.ENOMEM, f"{what} needs {nbytes} bytes of memory; {free} are free")


class _Faulting:
    """A slot mapping being faulted in, ``_PIECE`` by ``_PIECE``: the prefault thread claims
    pieces, and so does a save that would otherwise wait for it (``Slot.help_fault``), so
    the two cores fault the slot in together.  Page faults on tmpfs scale with threads (on
    this project's VM two threads fault 2 GiB in 0.84-1.10 s, one in 1.6 s)."""

    def __init__(self, fd: int, base: int, capacity: int) -> None:
        self.fd, self.base, self.capacity = fd, base, capacity
        self.next = 0  # first unclaimed byte
        self.active = 0  # pieces being faulted right now
        self.helped = 0  # bytes faulted by helpers
        self.error: BaseException | None = None
        self.cond = threading.Condition()

    def left(self) -> bool:
        with self.cond:
            return self.next < self.capacity and self.error is None

    def work(self, pause: Callable[[], None] | None = None, *, helper: bool = False) -> None:
        """Fault unclaimed pieces in until none is left.  Raises the first error (and no
        piece is claimed after it)."""
        while True:
            if pause is not None:
                pause()
            with self.cond:
                if self.next >= self.capacity or self.error is not None:
                    return
                off = self.next
                self.next += _PIECE
                self.active += 1
            n = min(_PIECE, self.capacity - off)
            error: BaseException | None = None
            try:
                os.posix_fallocate(self.fd, off, n)
                _populate_write(self.base + off, n)
            except BaseException as exc:
                error = exc
            with self.cond:
                self.active -= 1
                if error is not None and self.error is None:
                    self.error = error
                if error is None and helper:
                    self.helped += n
                self.cond.notify_all()
            if error is not None:
                raise error

    def drain(self) -> None:
        """Wait for every claimed piece to be done (the owner, before closing ``fd``)."""
        with self.cond:
            while self.active:
                self.cond.wait()


class Slot:
    """One shared-memory staging buffer.  Mapping changes happen under ``lock``."""

    def __init__(self, directory: Path, index: int) -> None:
        self.index = index
        self.name = f"slot-{index}.bin"
        self.path = directory / self.name
        self.lock = threading.Lock()
        self.capacity = 0
        self.step: int | None = None  # the step whose bytes this slot holds, if any
        # The step is committed on every persisting tier: this copy is only a cache of it and
        # may be overwritten by the next save without losing anything.
        self.durable = False
        self.generation = 0  # bumped whenever the slot takes a new snapshot
        self.busy = False
        self.prefaulting = False  # busy because the prefault thread is mapping it
        self.faulting: _Faulting | None = None  # set while ``ensure`` faults pages in
        self._mm: mmap.mmap | None = None
        self._buf: torch.Tensor | None = None
        self._pinned = False

    @property
    def mapped(self) -> bool:
        return self._buf is not None

    def warm(self, nbytes: int) -> bool:
        """Mapped for at least ``nbytes``: a copy into it faults no fresh memory."""
        return self._buf is not None and self.capacity >= nbytes

    def ensure(self, nbytes: int, *, pause: Callable[[], None] | None = None) -> bool:
        """Map at least ``nbytes``; return True if fresh memory had to be mapped.

        Every page is allocated (``fallocate``: a sparse tmpfs file that cannot be filled
        later would kill the process with SIGBUS on the copy instead of raising here) and
        mapped in up front.  With ``pause`` (the prefault thread), the work is done in
        ``_PIECE`` steps and ``pause()`` is called between them, so that a save copying into
        the other slot does not compete with page faulting for the two cores.
        """
        with self.lock:
            if self._buf is not None and self.capacity >= nbytes:
                return False
            capacity = max(_round_up(max(nbytes, 1), _GROW), self.capacity)
            self._unmap()
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | getattr(os, "O_CLOEXEC", 0), 0o600)
            old_size = os.fstat(fd).st_size
            try:
                capacity = max(capacity, old_size)
                if not _CAN_POPULATE_WRITE:
                    os.posix_fallocate(fd, 0, capacity)
                    flags = mmap.MAP_SHARED | getattr(mmap, "MAP_POPULATE", 0)
                    self._mm = mmap.mmap(fd, capacity, flags=flags)
                else:
                    # posix_fallocate and libc madvise release the GIL: other threads
                    # (the training thread above all) run while pages are faulted in.
                    os.ftruncate(fd, max(capacity, os.fstat(fd).st_size))
                    self._mm = mmap.mmap(fd, capacity, flags=mmap.MAP_SHARED)
                    base = torch.frombuffer(self._mm, dtype=torch.uint8).data_ptr()
                    job = _Faulting(fd, base, capacity)
                    self.faulting = job
                    try:
                        job.work(pause)
                    finally:
                        self.faulting = None
                        job.drain()  # a helper's piece may still be running: fd stays open
                    if job.error is not None:  # a helper's piece failed: the slot has holes
                        raise job.error
            except BaseException:
                if self._mm is not None:
                    try:
                        self._mm.close()
                    except BufferError:
                        pass
                    self._mm = None
                try:  # give back what a failed growth allocated (the memory tier may be full)
                    os.ftruncate(fd, old_size)
                except OSError:
                    pass
                raise
            finally:
                os.close(fd)
            self._buf = torch.frombuffer(self._mm, dtype=torch.uint8)
            self.capacity = capacity
            self._pin()
            return True

    def help_fault(self) -> int:
        """Training thread, waiting for this slot's prefault: fault pieces of it in too.
        Returns the bytes this call faulted.  Errors are the prefault thread's to report."""
        job = self.faulting
        if job is None:
            return 0
        before = job.helped
        try:
            job.work(helper=True)
        except OSError:
            pass
        return job.helped - before

    def adopt(self) -> bool:
        """Map a slot file left by an earlier process; False if there is none."""
        try:
            size = os.stat(self.path).st_size
        except FileNotFoundError:
            return False
        if size == 0:
            return False
        self.ensure(size)
        return True

    def tensor(self, offset: int, nbytes: int, dtype: torch.dtype, shape: Sequence[int]) -> torch.Tensor:
        assert self._buf is not None
        return self._buf[offset : offset + nbytes].view(dtype).view(tuple(shape))

    @property
    def address(self) -> int:
        """Address of the mapping (valid while the slot is held busy)."""
        assert self._buf is not None
        return int(self._buf.data_ptr())

    def view(self, offset: int, nbytes: int) -> memoryview:
        assert self._mm is not None
        return memoryview(self._mm)[offset : offset + nbytes]

    def release_mapping(self) -> None:
        with self.lock:
            self._unmap()

    def _pin(self) -> None:
        if not torch.cuda.is_available() or self._buf is None:
            return
        rc = torch.cuda.cudart().cudaHostRegister(  # type: ignore[no-untyped-call]
            self._buf.data_ptr(), self.capacity, 0
        )
        self._pinned = int(rc) == 0
        if not self._pinned:
            log.warning("cudaHostRegister of %s failed (%s); device copies will be slower", self.path, rc)

    def _unmap(self) -> None:
        if self._buf is None:
            return
        if self._pinned:
            torch.cuda.cudart().cudaHostUnregister(self._buf.data_ptr())  # type: ignore[no-untyped-call]
            self._pinned = False
        self._buf = None
        mm, self._mm = self._mm, None
        self.capacity = 0
        if mm is not None:
            try:
                mm.close()
            except BufferError:  # a view is still alive somewhere; the GC unmaps it later
                log.debug("slot %s still has live views; unmapping deferred", self.path)


class Stager:
    """Two slots and the rule for handing them out.  See the module docstring for threads."""

    def __init__(self, directory: Path, opts: Options) -> None:
        self.directory = directory
        self.opts = opts
        self.slots = [Slot(directory, 0), Slot(directory, 1)]
        self._cond = threading.Condition()
        self._last: Slot | None = None
        self._prefault_thread: threading.Thread | None = None
        self._prefault_bytes = 0
        self._prefault_running = False
        self._copying = False
        #: bytes of slots the training thread faulted in while a save waited for the prefault
        self.helped_bytes = 0
        self._streams: dict[int, Any] = {}
        self._layouts: dict[Any, Layout] = {}
        #: Saves blocked in ``acquire`` right now (read by the persist thread, unlocked).
        self.waiters = 0

    # -- layout ------------------------------------------------------------------------------
    def layout(self, tensors: Sequence[torch.Tensor]) -> Layout:
        sig = signature_of(tensors)
        cached = self._layouts.get(sig)
        if cached is None:
            cached = plan_layout(tensors, self.opts)
            self._layouts = {sig: cached}  # states rarely alternate between two shapes
        return cached

    # -- slot hand-out -----------------------------------------------------------------------
    def acquire(
        self, nbytes: int = 0, *, replacing: int | None = None, check: Callable[[], None] | None = None
    ) -> tuple[Slot, float]:
        """Block until a slot is free; mark it busy.  Returns the slot and seconds waited.

        A wait has no fixed bound (a slot is held while a large snapshot is persisted, which
        takes as long as the storage needs), but ``check()`` is called at least twice a second
        while waiting and may raise (the Checkpointer raises if the persist thread that
        would free the slot is gone), so a save never waits for a slot nobody will free.

        Prefers a slot holding step ``replacing`` (a copy about to be replaced anyway), then an
        empty slot, then the slot that does not hold the newest staged step, so the newest
        snapshot in memory stays intact while the next one is written.  A slot that is already
        mapped for ``nbytes`` is taken over a cold one when what it holds is durable elsewhere
        (the slot a restore just filled, while the other is still being faulted in: the first
        save after a restart then costs a copy, not a page-faulting pass).  If the chosen slot
        is not yet mapped for ``nbytes`` while the prefault thread is faulting the other one in,
        waits for the prefault, and faults pieces of that slot in alongside it meanwhile (two
        threads fault memory in faster than one).
        """
        t0 = time.perf_counter()
        while True:
            with self._cond:
                free = [s for s in self.slots if not s.busy]
                if free:
                    free.sort(
                        key=lambda s: (
                            replacing is None or s.step != replacing,
                            s.step is not None,
                            s is self._last,
                            s.step or 0,
                        )
                    )
                    slot = free[0]
                    if not slot.warm(nbytes):
                        slot = next(
                            (s for s in free if s.warm(nbytes) and (s.step is None or s.durable)), slot
                        )
                    if slot.warm(nbytes) or not any(p.prefaulting for p in self.slots):
                        slot.busy = True
                        return slot, time.perf_counter() - t0
                # Waiting for the prefault: fault that slot in alongside it rather than idle.
                target = next((p for p in self.slots if p.prefaulting), None)
                job = target.faulting if target is not None else None
                if target is None or job is None or not job.left():
                    self.waiters += 1
                    try:  # re-checked now and then: a prefault may start faulting a slot in
                        self._cond.wait(0.05 if target is not None else 0.5)
                    finally:
                        self.waiters -= 1
                    wait_more = True
                else:
                    wait_more = False
            if wait_more:
                if check is not None:
                    check()
                continue
            assert target is not None
            self.helped_bytes += target.help_fault()

    def try_acquire(self, slot: Slot) -> bool:
        with self._cond:
            if slot.busy:
                return False
            slot.busy = True
            return True

    def release(self, slot: Slot) -> None:
        with self._cond:
            slot.busy = False
            self._cond.notify_all()

    def mark_staged(self, slot: Slot, step: int, *, durable: bool = False) -> None:
        with self._cond:
            slot.step = step
            slot.durable = durable
            slot.generation += 1
            self._last = slot

    def mark_durable(self, slot: Slot, generation: int) -> None:
        """Persist thread: the snapshot ``generation`` of ``slot`` is now committed on every
        tier (ignored if the slot has taken a newer snapshot since)."""
        with self._cond:
            if slot.generation == generation:
                slot.durable = True

    # -- prefault ----------------------------------------------------------------------------
    def prefault(self, nbytes: int) -> None:
        """Fault both slots in to ``nbytes`` on a background thread; returns at once.

        Slots that are busy (being persisted) are skipped; a save that finds its slot too
        small grows it itself.
        """
        if not self.opts.prefault or all(s.mapped and s.capacity >= nbytes for s in self.slots):
            return
        with self._cond:
            self._prefault_bytes = max(self._prefault_bytes, nbytes)
            t = self._prefault_thread
            if t is not None and t.is_alive() and self._prefault_running:
                return  # the running thread picks the new size up before it exits
            self._prefault_running = True
        t = threading.Thread(target=self._prefault_loop, name="flashckpt-prefault", daemon=True)
        self._prefault_thread = t
        t.start()

    def _prefault_loop(self) -> None:
        done = 0
        while True:
            with self._cond:
                want = self._prefault_bytes
                if want <= done:
                    self._prefault_running = False
                    return
            t0 = time.perf_counter()
            for slot in self.slots:
                if self.try_acquire(slot):
                    slot.prefaulting = True
                    try:
                        slot.ensure(want, pause=self._wait_for_copies)
                    except OSError as exc:
                        log.warning("prefaulting %s to %d bytes failed: %s", slot.path, want, exc)
                    finally:
                        slot.prefaulting = False
                        self.release(slot)
            log.debug("prefaulted slots to %d bytes in %.3f s", want, time.perf_counter() - t0)
            done = want

    def _wait_for_copies(self) -> None:
        """Prefault thread: hold off while the training thread is copying into a slot."""
        with self._cond:
            while self._copying:
                self._cond.wait()

    def join_prefault(self) -> None:
        t = self._prefault_thread
        if t is not None:
            t.join()
            self._prefault_thread = None

    # -- the copy ----------------------------------------------------------------------------
    def stage(self, slot: Slot, tensors: Sequence[torch.Tensor], layout: Layout) -> bool:
        """Copy ``tensors`` into ``slot`` per ``layout``; return True if the slot was cold.

        Device tensors are copied on a side stream that first waits for the current stream,
        and the stream is synchronized before returning: the caller may modify its tensors as
        soon as this returns.
        """
        cold = slot.ensure(layout.total_bytes)
        with self._cond:
            self._copying = True
        try:
            self._copy(slot, tensors, layout)
        finally:
            with self._cond:
                self._copying = False
                self._cond.notify_all()
        return cold

    def _copy(self, slot: Slot, tensors: Sequence[torch.Tensor], layout: Layout) -> None:
        by_device: dict[torch.device, list[tuple[torch.Tensor, torch.Tensor]]] = {}
        host: list[tuple[torch.Tensor, torch.Tensor]] = []
        for t, off, n in zip(tensors, layout.offsets, layout.nbytes, strict=True):
            if n == 0:
                continue
            dst = slot.tensor(off, n, t.dtype, t.shape)
            if t.device.type == "cpu":
                host.append((dst, t))
            else:
                by_device.setdefault(t.device, []).append((dst, t))
        streams = []
        for device, pairs in by_device.items():
            if device.type == "cuda":
                stream = self._stream(device)
                stream.wait_stream(torch.cuda.current_stream(device))
                with torch.cuda.stream(stream):
                    for dst, src in pairs:
                        dst.copy_(src, non_blocking=True)
                streams.append(stream)
            else:
                for dst, src in pairs:
                    dst.copy_(src)
        for i, (dst, src) in enumerate(host):
            dst.copy_(src)
            hooks.fire("stage.tensor", index=i, count=len(host))
        for stream in streams:
            stream.synchronize()

    def _stream(self, device: torch.device) -> Any:
        idx = device.index if device.index is not None else torch.cuda.current_device()
        if idx not in self._streams:
            self._streams[idx] = torch.cuda.Stream(device=idx)  # type: ignore[no-untyped-call]
        return self._streams[idx]

    def close(self, *, unlink: bool) -> None:
        self.join_prefault()
        for slot in self.slots:
            slot.release_mapping()
            if unlink:
                try:
                    slot.path.unlink()
                except FileNotFoundError:
                    pass
