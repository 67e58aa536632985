"""Staging: reusable host-memory slots, the layout of a shard in them, and the copy.

A slot is one file in the memory tier directory (``/dev/shm`` by default, mode 0600) mapped
shared, so its bytes outlive a crash of the training process.  There are two slots (double
buffering): while one is being checksummed / persisted in the background, the next ``save``
copies into the other.  When both are busy, ``acquire`` waits and reports how long; a save is
never dropped.

Slots are faulted in ahead of time on the ``flashckpt-prefault`` thread as soon as the state's
size is known (first-touch of fresh shared memory costs several times a copy), and copied into
on a side CUDA stream for device tensors.  A slot only grows; its contents survive growth.

Pinning (``cudaHostRegister``) is lazy: a slot is registered on the training thread, under the
device of the first CUDA tensor staged into it (or restored from it), never for a CPU-only state
and never on a background thread.  A background thread would start on device 0 and create a
CUDA context there (0.3-0.6 GiB of GPU 0 in every rank process); a CPU-only job would
initialise CUDA for nothing.  A registration that fails falls back to pageable copies, with the
CUDA runtime's pending error cleared: left pending, it would be raised by the next unrelated
kernel launch of the training thread.  Slots that hold peers' mirrors are never pinned.

Slot files are opened without following symbolic links and used only if they are regular files
of this user that no one else can read (``open_private``): the memory tier lives in a directory
others may be able to write to (/dev/shm).

Threads: ``acquire``/``stage`` run on the training thread; ``release`` on the persist thread;
``prefault`` starts the prefault thread, which ``close`` joins.
"""

from __future__ import annotations

import bisect
import contextlib
import ctypes
import errno
import functools
import logging
import mmap
import os
import stat
import threading
import time
from collections.abc import Callable, Collection, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from flashckpt import _hooks as hooks
from flashckpt import _platform, _secure
from flashckpt._config import Options
from flashckpt.errors import ConfigError, FlashCkptError, StorageFullError

log = logging.getLogger(__name__)

_PAGE = 4096
_LINE = 64
_GROW = 2 << 20  # capacities are rounded up to 2 MiB
_PIECE = 16 << 20  # the prefault thread faults this much between checks for a running copy
# libc madvise off the GIL (flashckpt/_platform.py); module names here, so tests can patch them
_populate_write = _platform.populate_write
_CAN_POPULATE_WRITE = _platform.CAN_POPULATE_WRITE
# torch's multi-tensor copy (torch >= 2.1): one call stages every host tensor
_foreach_copy: Callable[[list[torch.Tensor], list[torch.Tensor]], None] | None = getattr(
    torch, "_foreach_copy_", None
)


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
        for p in directory.glob("slot-*.bin"):
            try:  # lstat: a link planted there must not count its target (slots refuse links)
                info = p.lstat()
            except FileNotFoundError:
                continue
            if stat.S_ISREG(info.st_mode):
                free += info.st_size
    else:
        free = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    if nbytes > free:
        raise StorageFullError(errno.ENOMEM, f"{what} needs {nbytes} bytes of memory; {free} are free")


# -- files of the memory tier ---------------------------------------------------------------------
# Slot files are opened by ``flashckpt._secure.open_private``: never through a link planted where
# a slot goes (it would let whoever planted it have this process overwrite, extend or read any
# file it can write), only a regular file of this user that nobody else can read or write.


def open_private(path: Path) -> int:
    """A slot file, read-write, created 0600 if missing (see :mod:`flashckpt._secure`)."""
    return _secure.open_private(path, write=True, create=True)


# -- CUDA --------------------------------------------------------------------------------------
# Every CUDA runtime call of this module goes through these few functions.  They run on the
# training thread, except ``_unregister`` (any thread that unmaps a slot: it selects the device
# the slot was registered under first, so that it never creates a context on device 0).


def _cudart() -> Any:
    """torch's bindings of the CUDA runtime (initialises CUDA if it is not yet)."""
    return torch.cuda.cudart()  # type: ignore[no-untyped-call]


def _device(index: int) -> contextlib.AbstractContextManager[Any]:
    """Make CUDA device ``index`` the calling thread's current device for a block."""
    return torch.cuda.device(index)


@functools.cache
def _libcudart() -> ctypes.CDLL | None:
    """The CUDA runtime library torch loaded, or None (torch linked it statically).

    Never a second copy: the last error that must be cleared is per thread *and per copy of
    the runtime*, so only the copy torch calls into will do.  ``RTLD_NOLOAD`` makes sure of it.
    """
    candidates = []
    try:
        with open("/proc/self/maps", encoding="utf-8", errors="replace") as maps:
            for line in maps:
                fields = line.split(maxsplit=5)
                if len(fields) == 6 and "/libcudart" in fields[5]:
                    candidates.append(fields[5].strip())
    except OSError:
        pass
    candidates += ["libcudart.so.13", "libcudart.so.12", "libcudart.so.11.0", "libcudart.so"]
    for name in dict.fromkeys(candidates):
        try:
            lib = ctypes.CDLL(name, mode=os.RTLD_NOLOAD | os.RTLD_NOW)
            fn = lib.cudaGetLastError
        except (OSError, AttributeError):
            continue
        fn.argtypes = []
        fn.restype = ctypes.c_int
        return lib
    return None


def _clear_last_error(device: int) -> None:
    """Reset the calling thread's pending CUDA runtime error after a failed call.

    torch checks every kernel launch with ``cudaGetLastError``: an error left pending by a
    failed ``cudaHostRegister`` would be raised, misattributed, by the training thread's next
    kernel.  ``cudaGetLastError`` (through ctypes, on the libcudart torch loaded) returns and
    resets it.  A tiny kernel launch then checks that it is gone, whichever copy of the
    runtime torch uses (a statically linked one cannot be reached through ctypes): its launch
    check raises a pending error, and c10 resets the error before raising, so the next launch
    succeeds.
    """
    lib = _libcudart()
    if lib is not None:
        lib.cudaGetLastError()
    with _device(device):
        for attempt in range(2):
            try:
                torch.ones(1, device=torch.device("cuda", device))
                return
            except Exception as exc:  # the pending error, raised and thereby reset  # noqa: BLE001
                log.debug("flashckpt: cleared a pending CUDA error (attempt %d): %s", attempt, exc)


def _error_string(cudart: Any, rc: int) -> str:
    """``cudaGetErrorString(rc)`` and the code, e.g. ``out of memory (2)``."""
    try:
        return f"{cudart.cudaGetErrorString(cudart.cudaError(rc))} ({rc})"
    except Exception:  # an old or stripped binding: the number still identifies the error  # noqa: BLE001
        return f"CUDA error {rc}"


_warned: set[str] = set()
_warned_lock = threading.Lock()


def _warn_once(reason: str, message: str) -> None:
    """A failed registration recurs with every slot and mapping: warn once per process and
    distinct ``reason``; the repeats go to the debug log."""
    with _warned_lock:
        repeat = reason in _warned
        _warned.add(reason)
    log.log(logging.DEBUG if repeat else logging.WARNING, "%s", message)


def _register(addr: int, nbytes: int, device: int, what: Path) -> bool:
    """Training thread: ``cudaHostRegister`` ``nbytes`` at ``addr`` under ``device``; True if
    the range is now pinned.  Never raises: a failure (an error code or an exception, e.g.
    CUDA unusable in a forked child) leaves no pending CUDA error and is warned about once;
    the caller copies through pageable memory instead."""
    try:
        with _device(device):
            cudart = _cudart()
            t0 = time.perf_counter()
            rc = int(cudart.cudaHostRegister(addr, nbytes, 0))  # 0: default (portable under UVA)
            if rc == 0:
                seconds = time.perf_counter() - t0
                log.debug("pinned %s (%d bytes) on cuda:%d in %.3f s", what, nbytes, device, seconds)
                return True
            _clear_last_error(device)
            reason = _error_string(cudart, rc)
    except Exception as exc:  # pinning is best effort: logged once  # noqa: BLE001
        reason = f"{type(exc).__name__}: {exc}"
    _warn_once(
        reason,
        f"flashckpt: cudaHostRegister of {what} ({nbytes} bytes) failed: {reason}; "
        "copies between it and the GPU use pageable memory (slower)",
    )
    return False


def _unregister(addr: int, device: int, what: Path) -> None:
    """Any thread: ``cudaHostUnregister`` a range ``_register`` pinned under ``device``.
    Never raises; a failure is logged and leaves no pending CUDA error."""
    try:
        with _device(device):
            cudart = _cudart()
            rc = int(cudart.cudaHostUnregister(addr))
            if rc == 0:
                return
            _clear_last_error(device)
            reason = _error_string(cudart, rc)
    except Exception as exc:  # logged: unpinning is best effort  # noqa: BLE001
        reason = f"{type(exc).__name__}: {exc}"
    log.warning("flashckpt: cudaHostUnregister of %s failed: %s", what, reason)


def _cuda_initialized() -> bool:
    """torch has initialised CUDA in this process (asking creates no context)."""
    return bool(torch.cuda.is_initialized())  # type: ignore[no-untyped-call]


def _devices_with_context() -> list[int]:
    """The CUDA devices this process has a context on (none if CUDA is not initialised).
    Never creates one."""
    if not _cuda_initialized():
        return []
    has_context = getattr(torch._C, "_cuda_hasPrimaryContext", None)
    if has_context is None:  # not in this build: the current device surely has one
        return [torch.cuda.current_device()]
    return [i for i in range(torch.cuda.device_count()) if has_context(i)]


def _sync_current_streams(devices: Iterable[int]) -> None:
    """Training thread: wait until the work queued so far on the current stream of each of
    ``devices`` is done (an event per stream; other streams and other work are not waited
    for, unlike ``torch.cuda.synchronize``, which waits for the whole current device only)."""
    for index in sorted(set(devices)):
        event = torch.cuda.Event()  # type: ignore[no-untyped-call]
        event.record(torch.cuda.current_stream(index))
        event.synchronize()


def _wait_for_device_writes(host_sources: Iterable[torch.Tensor]) -> None:
    """Training thread, before the host copies of a stage: a pinned CPU tensor may be the
    destination of a non-blocking device-to-host copy still queued on a current stream (an
    EMA or offload buffer); wait for those streams, or its bytes would be read half-written.

    Without CUDA initialised no such copy can be pending, and ``is_pinned`` is not asked: it
    calls ``cudaPointerGetAttributes``, which can create a context.
    """
    if not _cuda_initialized():
        return
    if any(t.is_pinned() for t in host_sources):
        _sync_current_streams(_devices_with_context())


def copy_pairs(
    views: Sequence[torch.Tensor | None],
    tensors: Sequence[torch.Tensor],
    layout: Layout,
    skip: Collection[int],
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """``(destination, source)`` per copy of a save: each tensor whole into its view, or, where
    chunks of it are in ``skip`` (another rank of the node stages them: replicated state
    staged once per node), the flat element ranges between them.  Only chunks of a tensor of
    its own (``small_tensor_bytes`` or more) are left out, and only where the tensor can be
    sliced flat (contiguous, no conj/neg bit); anything else is copied whole (a superset is
    always safe)."""
    gaps: dict[int, list[tuple[int, int]]] = {}
    if skip:
        # (empty tensors sit at offset 0 too: they never hold a chunk)
        order = sorted((i for i, n in enumerate(layout.nbytes) if n), key=lambda i: layout.offsets[i])
        sorted_starts = [layout.offsets[i] for i in order]
        for ci in sorted(skip):
            off, n = layout.chunks[ci]
            j = order[bisect.bisect_right(sorted_starts, off) - 1]
            start, size = layout.offsets[j], layout.nbytes[j]
            if off >= start and off + n <= start + size:  # (packed chunks hold no such tensor)
                gaps.setdefault(j, []).append((off - start, off - start + n))
    out: list[tuple[torch.Tensor, torch.Tensor]] = []
    for j, (t, dst) in enumerate(zip(tensors, views, strict=True)):
        if dst is None:
            continue
        holes = gaps.get(j)
        if not holes or layout.nbytes[j] < 1 or not t.is_contiguous() or t.is_conj() or t.is_neg():
            out.append((dst, t))
            continue
        item = t.element_size()
        flat_dst, flat_src = dst.view(-1), t.view(-1)
        cur = 0
        for lo, hi in sorted(holes):
            if lo > cur:
                out.append((flat_dst[cur // item : lo // item], flat_src[cur // item : lo // item]))
            cur = max(cur, hi)
        if cur < layout.nbytes[j]:
            out.append((flat_dst[cur // item :], flat_src[cur // item :]))
    return out


class RestoreCopies:
    """The copies of one restore from a slot into live tensors (see ``restore_copies``)."""

    def __init__(self, slot: Slot | None) -> None:
        self._slot = slot
        #: CUDA devices written by non-blocking host-to-device copies so far
        self.devices: set[int] = set()

    def copy(self, target: torch.Tensor, src: torch.Tensor) -> None:
        """Copy ``src`` (a view of the slot) into ``target`` in place.  A CUDA target gets a
        non-blocking copy on its device's current stream (the user's later kernels are
        ordered after it); its device is recorded for the synchronization at the end.  The
        slot is pinned first, under that device, if it is not yet.  Raises what ``copy_``
        raises (e.g. ``RuntimeError`` for a target that cannot be written in place)."""
        if target.is_cuda:
            index = target.device.index
            assert index is not None  # a CUDA tensor's device always has an index
            if self._slot is not None:
                self._slot.pin(index)
            self.devices.add(index)  # before the copy: one that fails halfway is waited for too
            target.copy_(src, non_blocking=True)
        else:
            target.copy_(src)

    def synchronize(self) -> None:
        """Wait for every copy ``copy`` queued (per device: its current stream)."""
        if self.devices:
            _sync_current_streams(self.devices)


@contextlib.contextmanager
def restore_copies(slot: Slot | None = None) -> Iterator[RestoreCopies]:
    """Training thread, restore: copy a slot's bytes into live tensors with
    ``copies.copy(target, src)``, and leave the block only once every non-blocking
    host-to-device copy has finished, on each device written (not only the current one),
    even when the block raises: the slot may be released (reused, unmapped) right after.

    CPU targets are copied synchronously and touch no CUDA API: a CPU-only restore leaves
    CUDA uninitialised.  When the block raises, a failure to synchronize is logged and the
    block's exception propagates.
    """
    copies = RestoreCopies(slot)
    try:
        yield copies
    except BaseException:
        try:
            copies.synchronize()
        except Exception as exc:  # logged: the error being handled is raised  # noqa: BLE001
            log.warning("flashckpt: waiting for the restore's device copies failed: %s", exc)
        raise
    copies.synchronize()


def _synchronize_streams(streams: Sequence[Any], *, failing: bool) -> None:
    """Training thread: synchronize every one of ``streams``, even if one raises; then raise
    the first error, or, when the copy is already ``failing``, log it (the copy's error is
    the one to report)."""
    first: Exception | None = None
    for stream in streams:
        try:
            stream.synchronize()
        except Exception as exc:  # the first is raised once every stream is synchronized  # noqa: BLE001
            if failing:
                log.warning("flashckpt: synchronizing a staging stream failed: %s", exc)
            elif first is None:
                first = exc
    if first is not None:
        raise first


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
            except BaseException as exc:  # recorded in the job: its owner raises it  # noqa: BLE001
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


def _help_quietly(job: _Faulting) -> None:
    """A helper thread of :meth:`Slot._fault_in`: its error is recorded in the job, whose
    owner raises it."""
    try:
        job.work(helper=True)
    except BaseException:  # recorded in the job: its owner raises it  # noqa: BLE001
        pass


class Slot:
    """One shared-memory staging buffer.  Mapping changes happen under ``lock``.

    ``pin=False`` for slots whose bytes never go to a GPU (peers' mirrors, orphans): they are
    never page-locked.  Otherwise a slot is pinned only when the training thread asks
    (``pin``), once per mapping; growth unpins it and the next ``pin`` registers the new
    mapping.
    """

    def __init__(self, directory: Path, index: int, *, pin: bool = True) -> None:
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
        #: mapped as an earlier process left it (``adopt``), not yet allocated and faulted in
        #: for writing: read faults map its pages as a restore reads them; ``ensure`` (the
        #: prefault thread, or a save) faults it in before anything is copied into it
        self.lazy = False
        self._mm: mmap.mmap | None = None
        self._buf: torch.Tensor | None = None
        # the destination views of the last layout copied into this mapping (a save of the
        # same state shape reuses them: no slicing per tensor per save)
        self._views: tuple[object, list[torch.Tensor | None]] | None = None
        self._may_pin = pin
        self._pinned = False
        self._pin_failed = False  # this mapping could not be pinned: do not try again per save
        self.pin_device: int | None = None  # the device the mapping was registered under
        #: page ranges ``(lo, hi)`` of this mapping given back (:meth:`trim`)
        self.trimmed: set[tuple[int, int]] = set()

    @property
    def mapped(self) -> bool:
        return self._buf is not None

    def warm(self, nbytes: int) -> bool:
        """Mapped for at least ``nbytes``: a copy into it faults no fresh memory."""
        return self._buf is not None and self.capacity >= nbytes and not self.lazy

    @hooks.timed("time.slot.ensure")
    def ensure(self, nbytes: int, *, pause: Callable[[], None] | None = None, helpers: int = 0) -> bool:
        """Map at least ``nbytes``; return True if fresh memory had to be mapped.

        Every page is allocated (``fallocate``: a sparse tmpfs file that cannot be filled
        later would kill the process with SIGBUS on the copy instead of raising here) and
        mapped in up front.  With ``pause`` (the prefault thread), the work is done in
        ``_PIECE`` steps and ``pause()`` is called between them, so that a save copying into
        the other slot does not compete with page faulting for the two cores.  ``helpers``
        threads fault pieces in alongside the caller (a restore that waits for the slot:
        page faults on tmpfs scale with threads).

        Any thread (training, prefault, mirror connections).  Never pins; growing a pinned
        mapping unpins it first.  The file is opened with ``open_private``: ``ConfigError``
        if what is at ``path`` is not a private regular file of this user.
        """
        with self.lock:
            if self._buf is not None and self.capacity >= nbytes:
                if not self.lazy:
                    return False
                if _CAN_POPULATE_WRITE:  # adopted: fault it in where it is mapped (bytes kept)
                    fd = open_private(self.path)
                    try:
                        self._fault_in(fd, self.address, self.capacity, pause, helpers)
                    finally:
                        os.close(fd)
                    self.lazy = False
                    return True
            capacity = max(_round_up(max(nbytes, 1), _GROW), self.capacity)
            self._unmap()
            fd = open_private(self.path)
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
                    self._fault_in(fd, base, capacity, pause, helpers)
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
            self.lazy = False
            return True

    def _fault_in(
        self, fd: int, base: int, capacity: int, pause: Callable[[], None] | None, helpers: int = 0
    ) -> None:
        """Under ``lock``: allocate and fault in ``[base, base + capacity)`` (the mapping of
        ``fd``), helped by a save that waits for it (:meth:`help_fault`) and by ``helpers``
        threads of its own (joined before it returns; their errors are the job's)."""
        job = _Faulting(fd, base, capacity)
        self.faulting = job
        threads = [
            threading.Thread(target=_help_quietly, args=(job,), name="flashckpt-fault", daemon=True)
            for _ in range(helpers)
        ]
        try:
            for t in threads:
                t.start()
            job.work(pause)
        finally:
            for t in threads:
                t.join()
            self.faulting = None
            job.drain()  # a helper's piece may still be running: fd stays open
        if job.error is not None:  # a helper's piece failed: the slot has holes
            raise job.error

    def help_fault(self) -> int:
        """Training thread, waiting for this slot's prefault: fault pieces of it in too.
        Returns the bytes this call faulted.  Errors are the prefault thread's to report."""
        job = self.faulting
        if job is None:
            return 0
        before = job.helped
        try:
            job.work(helper=True)
        except Exception:  # recorded in the job: the prefault thread (its owner) reports it  # noqa: BLE001
            pass
        return job.helped - before

    def adopt(self) -> bool:
        """Map a slot file left by an earlier process, lazily (:attr:`lazy`: no work in
        proportion to its size, so a restarted job's constructor is quick and a restore
        faults in only the slot it reads); False if there is none.  Raises ``ConfigError``
        if what is there is not a private regular file of this user (see ``open_private``).
        Never pins: no CUDA call happens here."""
        try:
            st = os.lstat(self.path)  # never follows a link: ``open_private`` refuses one
        except FileNotFoundError:
            return False
        if stat.S_ISREG(st.st_mode) and st.st_size == 0:
            return False
        if not _CAN_POPULATE_WRITE:  # no way to fault in a mapping later: at once, as before
            self.ensure(st.st_size)
            return True
        with self.lock:
            fd = open_private(self.path)
            try:
                size = os.fstat(fd).st_size
                if size == 0:
                    return False
                self._unmap()
                self._mm = mmap.mmap(fd, size, flags=mmap.MAP_SHARED)
            finally:
                os.close(fd)
            self._buf = torch.frombuffer(self._mm, dtype=torch.uint8)
            self.capacity = size
            self.lazy = True
        return True

    @contextlib.contextmanager
    def file_reader(self) -> Iterator[Callable[[int, list[memoryview]], int] | None]:
        """While the slot is held busy: ``readv(offset, buffers)``, a ``preadv`` of the slot's
        file (bytes read), when the slot is :attr:`lazy` (reading the file copies from the
        page cache without mapping pages in); None otherwise (read the mapping)."""
        if not self.lazy:
            yield None
            return
        fd = open_private(self.path)
        try:
            yield lambda offset, bufs: os.preadv(fd, bufs, offset)
        finally:
            os.close(fd)

    def tensor(self, offset: int, nbytes: int, dtype: torch.dtype, shape: Sequence[int]) -> torch.Tensor:
        assert self._buf is not None
        return self._buf[offset : offset + nbytes].view(dtype).view(tuple(shape))

    def views(self, layout: Layout, tensors: Sequence[torch.Tensor]) -> list[torch.Tensor | None]:
        """Training thread, slot held busy and mapped for ``layout``: where each of ``tensors``
        (whose dtypes and shapes ``layout`` was planned for) goes in this slot (``None``: an
        empty tensor).  Cached for the last layout of this mapping."""
        cached = self._views
        if cached is not None and cached[0] is layout:
            return cached[1]
        out: list[torch.Tensor | None] = [
            self.tensor(off, n, t.dtype, t.shape) if n else None
            for t, off, n in zip(tensors, layout.offsets, layout.nbytes, strict=True)
        ]
        self._views = (layout, out)
        return out

    def trim(self, ranges: Iterable[tuple[int, int]]) -> int:
        """Slot held busy: give back the memory of byte ranges ``(offset, nbytes)`` that the
        snapshot in it does not hold (chunks another rank of the node holds); returns the bytes
        trimmed.  Not for a pinned mapping (CUDA keeps its pages: they stay) nor a lazy one
        (it is faulted in whole later anyway).  A later copy into a trimmed range allocates it
        first (:meth:`allocate`)."""
        if self._buf is None or self.lazy or self._pinned or _platform.madvise is None:
            return 0
        done = 0
        with self.lock:
            for off, n in ranges:
                lo, hi = _round_up(off, _PAGE), (off + n) // _PAGE * _PAGE
                if hi <= lo or (lo, hi) in self.trimmed or hi > self.capacity:
                    continue
                try:
                    _platform.remove_pages(self.address + lo, hi - lo)
                except OSError as exc:  # the memory simply stays
                    log.debug("flashckpt: could not trim %s: %s", self.path, exc)
                    return done
                self.trimmed.add((lo, hi))
                done += hi - lo
        return done

    def allocate(self, ranges: Iterable[tuple[int, int]], *, holes: bool = False) -> None:
        """Slot held busy: allocate the trimmed pages among byte ranges ``(offset, nbytes)``
        before anything is written there (a write into a hole of a full tmpfs would be a
        ``SIGBUS``; this raises ``OSError`` instead).  ``holes``: the ranges themselves,
        trimmed or not (a slot an earlier process left may have holes nobody recorded)."""
        if not self.trimmed and not holes:
            return
        with self.lock:
            fd = open_private(self.path)
            try:
                for off, n in ranges:
                    if holes:
                        os.posix_fallocate(fd, off, n)
                    for lo, hi in [t for t in self.trimmed if t[0] < off + n and off < t[1]]:
                        os.posix_fallocate(fd, lo, hi - lo)
                        self.trimmed.discard((lo, hi))
            finally:
                os.close(fd)

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

    @property
    def pinned(self) -> bool:
        """The current mapping is registered with CUDA (page-locked)."""
        return self._pinned

    def pin(self, device: int) -> bool:
        """Training thread only: register the mapping with CUDA (``cudaHostRegister``) so that
        copies between it and GPUs are asynchronous DMAs; True if it is pinned.

        Registered under ``device`` (the device of the tensors about to be copied), which must
        already have a context: the call then creates none.  Once per mapping: after a failure
        (warned about once, no pending CUDA error left) the mapping stays pageable.  A no-op
        for a slot made with ``pin=False`` or not mapped.
        """
        if not self._may_pin:
            return False
        with self.lock:
            if self._buf is None or self._pinned or self._pin_failed:
                return self._pinned
            self._pinned = _register(self._buf.data_ptr(), self.capacity, device, self.path)
            self._pin_failed = not self._pinned
            self.pin_device = device if self._pinned else None
            return self._pinned

    def _unmap(self) -> None:
        """Under ``lock``, any thread.  Unregisters first, under the device the mapping was
        registered under (a background thread would otherwise start on device 0)."""
        if self._buf is None:
            return
        if self._pinned:
            assert self.pin_device is not None
            _unregister(self._buf.data_ptr(), self.pin_device, self.path)
        self._pinned = self._pin_failed = False
        self.pin_device = None
        self._buf = None
        self._views = None
        self.trimmed = set()
        mm, self._mm = self._mm, None
        self.capacity = 0
        if mm is not None:
            try:
                mm.close()
            except BufferError:  # a view is still alive somewhere; the GC unmaps it later
                log.debug("slot %s still has live views; unmapping deferred", self.path)


class NoSlotWillFree(FlashCkptError, RuntimeError):
    """Every staging slot is held and nothing that would give one back is running (a bug)."""


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
        self._closing = False  # close: the prefault thread stops waiting for busy slots
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
    @hooks.timed("time.stager.acquire")
    def acquire(
        self,
        nbytes: int = 0,
        *,
        replacing: int | None = None,
        keep: Slot | None = None,
        check: Callable[[], None] | None = None,
        idle: Callable[[], bool] | None = None,
    ) -> tuple[Slot, float]:
        """Block until a slot is free; mark it busy.  Returns the slot and seconds waited.
        ``keep``: a slot never taken (waited for the other instead): a restore passes the slot
        of the newest snapshot while it lives in memory only, which loading an older step must
        not overwrite.

        A wait has no fixed bound (a slot is held while a large snapshot is persisted, which
        takes as long as the storage needs), but a save never waits for a slot nobody will
        give back: ``check()`` is called at least twice a second while waiting and may raise
        (the Checkpointer raises if the persist thread that would free the slot is gone), and
        ``idle()`` says that nothing that could give a slot back is running (no persist job
        queued or in progress).  No slot free, none being prefaulted and ``idle()`` on two
        checks in a row (the slots were looked at again between them) is a slot that leaked:
        :class:`NoSlotWillFree` is raised at once.

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
        stuck = 0  # checks in a row that found no slot free, none prefaulting, nothing running
        while True:
            with self._cond:
                free = [s for s in self.slots if not s.busy and s is not keep]
                if free:
                    slot = self._pick(free, nbytes, replacing)
                    if slot.warm(nbytes) or not any(p.prefaulting for p in self.slots):
                        slot.busy = True
                        return slot, time.perf_counter() - t0
                # Waiting for the prefault: fault that slot in alongside it rather than idle.
                target = next((p for p in self.slots if p.prefaulting), None)
                job = target.faulting if target is not None else None
                idle_wait = target is None or job is None or not job.left()
                if idle_wait:  # re-checked now and then: a prefault may start faulting a slot in
                    self._wait(0.05 if target is not None else 0.5)
            if not idle_wait:
                assert target is not None
                self.helped_bytes += target.help_fault()
                continue
            if check is not None:
                check()
            if idle is not None and target is None and not free and idle():
                stuck += 1
                if stuck >= 2:
                    raise NoSlotWillFree(
                        f"no staging slot will be given back: all {len(self.slots)} are held and "
                        "nothing that would free one is running (a flashckpt bug: a slot leaked); "
                        "close this Checkpointer and create a new one"
                    )
            else:
                stuck = 0

    def _pick(self, free: list[Slot], nbytes: int, replacing: int | None) -> Slot:
        """Under the lock: the free slot :meth:`acquire` prefers (see there)."""
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
            slot = next((s for s in free if s.warm(nbytes) and (s.step is None or s.durable)), slot)
        return slot

    def _wait(self, seconds: float) -> None:
        """Under the lock: wait for a slot to be given back (counted in ``waiters``: the
        mirror pushes holding a slot give up when a save waits)."""
        self.waiters += 1
        try:
            self._cond.wait(seconds)
        finally:
            self.waiters -= 1

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

    def mark_staged(self, slot: Slot, *, durable: bool = False) -> None:
        """Training thread: ``slot`` took a new snapshot (which step it holds is the memory
        tier's to record: ``MemoryTier.record``); it is the newest staged one."""
        with self._cond:
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
        if not self.opts.prefault or all(s.warm(nbytes) for s in self.slots):
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
            left = list(self.slots)
            while left:
                busy = []
                for slot in left:
                    if slot.warm(want) or self._closing:
                        continue
                    if not self.try_acquire(slot):
                        busy.append(slot)  # being persisted, or restored into: once it is free
                        continue
                    slot.prefaulting = True
                    try:
                        slot.ensure(want, pause=self._wait_for_copies)
                    except (OSError, ConfigError) as exc:  # memory tier full; a planted file
                        log.warning("flashckpt: prefaulting %s to %d bytes failed: %s", slot.path, want, exc)
                    except Exception:  # a bug: this thread must not die without a word
                        log.exception("flashckpt: prefaulting %s to %d bytes failed", slot.path, want)
                    finally:
                        slot.prefaulting = False
                        self.release(slot)
                left = busy
                if left:
                    with self._cond:  # a release notifies; the training thread may also stage into it
                        if all(s.busy for s in left) and not self._closing:
                            self._cond.wait(0.5)
                        if self._closing:
                            left = []
            log.debug("prefaulted slots to %d bytes in %.3f s", want, time.perf_counter() - t0)
            done = want

    def _wait_for_copies(self) -> None:
        """Prefault thread: hold off while the training thread is copying into a slot."""
        with self._cond:
            while self._copying:
                self._cond.wait()

    @property
    def prefaulting(self) -> bool:
        """Any thread: the prefault thread is still faulting slots in."""
        t = self._prefault_thread
        return t is not None and t.is_alive()

    def join_prefault(self, timeout: float | None = None) -> bool:
        """Training thread: wait (at most ``timeout`` seconds) for the prefault thread to
        finish faulting slots in; True if it has."""
        t = self._prefault_thread
        if t is not None:
            t.join(timeout)
            if t.is_alive():
                return False
            self._prefault_thread = None
        return True

    # -- the copy ----------------------------------------------------------------------------
    @hooks.timed("time.stager.stage")
    def stage(
        self, slot: Slot, tensors: Sequence[torch.Tensor], layout: Layout, skip: Collection[int] = ()
    ) -> bool:
        """Training thread: copy ``tensors`` into ``slot`` per ``layout``; return True if the
        slot was cold.  When this returns (or raises), no copy into the slot is in flight:
        the caller may modify its tensors, and release or reuse the slot.

        Device tensors are copied on a side stream per device that first waits for that
        device's current stream (work on other streams must be ordered by the caller); the
        side streams are synchronized before returning, also when a copy raises.  The slot
        is pinned first, under the device of the first CUDA tensor, if it is not yet (the
        registration's time then counts in this save; once per mapping).  A conj or neg view
        is resolved on the device, on the side stream, before its copy (torch's
        non-blocking device-to-host copy applies the bit to the host destination before the
        DMA lands, pytorch/pytorch#146286).  CPU tensors are copied by this thread; if one of
        them is pinned, the current stream of every device with a context is waited for first
        (it may be the destination of a non-blocking copy still in flight).

        GPU memory: a non-contiguous device tensor is made contiguous by ``copy_`` in a
        temporary as large as the tensor, on the side stream; a conj/neg view needs one as
        large too (both for a non-contiguous conj/neg view).  Temporaries are freed one
        tensor at a time, so the extra peak is about the size of the largest such tensor
        (twice it for a non-contiguous conj/neg view); the allocator keeps the block cached
        in the side stream's pool afterwards, so ``memory_reserved`` grows by that much for
        good, and a GPU near its limit can raise ``torch.OutOfMemoryError`` here (the save
        fails, nothing is left in flight).

        ``skip``: indexes of ``layout.chunks`` another rank of the node stages (see
        :func:`copy_pairs`); trimmed pages the copy writes into are allocated first.
        """
        cold = slot.ensure(layout.total_bytes)
        if slot.trimmed:
            skipped = {layout.chunks[i] for i in skip}
            slot.allocate(c for c in layout.chunks if c not in skipped)
        device = next((t.device.index for t in tensors if t.is_cuda), None)
        if device is not None:
            slot.pin(device)
        with self._cond:
            self._copying = True
        try:
            self._copy(copy_pairs(slot.views(layout, tensors), tensors, layout, skip))
        finally:
            with self._cond:
                self._copying = False
                self._cond.notify_all()
        return cold

    def _copy(self, pairs: Iterable[tuple[torch.Tensor, torch.Tensor]]) -> None:
        by_device: dict[torch.device, list[tuple[torch.Tensor, torch.Tensor]]] = {}
        host: list[tuple[torch.Tensor, torch.Tensor]] = []
        for dst, t in pairs:
            if t.device.type == "cpu":
                host.append((dst, t))
            else:
                by_device.setdefault(t.device, []).append((dst, t))
        pending: list[Any] = []  # side streams with copies queued
        failing = True
        try:
            for device, pairs in by_device.items():
                if device.type == "cuda":
                    self._copy_from_device(device, pairs, pending)
                else:
                    for dst, src in pairs:
                        dst.copy_(src)
            if host:
                _wait_for_device_writes(src for _, src in host)
            if host and _foreach_copy is not None and not hooks.listening("stage.tensor"):
                # one call for every tensor: no Python dispatch per tensor (each copy_ is
                # still parallel inside)
                _foreach_copy([d for d, _ in host], [s for _, s in host])
            else:
                for i, (dst, src) in enumerate(host):
                    dst.copy_(src)
                    hooks.fire("stage.tensor", index=i, count=len(host))
            failing = False
        finally:
            # Also on an error: the caller releases the slot (and may unmap it) at once, and
            # the sources may be freed; no DMA may still be writing into the slot by then.
            _synchronize_streams(pending, failing=failing)

    def _copy_from_device(
        self, device: torch.device, pairs: Sequence[tuple[torch.Tensor, torch.Tensor]], pending: list[Any]
    ) -> None:
        """Queue the copies of one CUDA device's tensors on its side stream; the stream is
        appended to ``pending`` before anything is queued, so that the caller synchronizes it
        even if queueing raises halfway."""
        stream = self._stream(device)
        pending.append(stream)
        stream.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(stream):
            for dst, src in pairs:
                if src.is_conj() or src.is_neg():
                    src = src.resolve_conj().resolve_neg()  # on the device, on the side stream
                dst.copy_(src, non_blocking=True)

    def _stream(self, device: torch.device) -> Any:
        idx = device.index if device.index is not None else torch.cuda.current_device()
        if idx not in self._streams:
            self._streams[idx] = torch.cuda.Stream(device=idx)  # type: ignore[no-untyped-call]
        return self._streams[idx]

    def stop_prefault(self) -> None:
        """Any thread, at close: the prefault thread starts faulting no more slots in (the
        one it is on is finished) and stops waiting for busy ones."""
        with self._cond:
            self._closing = True
            self._cond.notify_all()

    def close(self, *, unlink: bool) -> None:
        self.stop_prefault()
        self.join_prefault()
        for slot in self.slots:
            slot.release_mapping()
            if unlink:
                try:
                    slot.path.unlink()
                except FileNotFoundError:
                    pass
