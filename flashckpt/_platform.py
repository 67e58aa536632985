"""libc ``madvise`` for the code that faults memory in off the GIL (a leaf any part may use:
the staging slots' prefault, the S3 backend's download buffers).

``mmap.madvise`` and ``mmap(MAP_POPULATE)`` hold the GIL on CPython 3.11, stalling the training
thread; ``madvise`` through ctypes releases it.  Any thread.
"""

from __future__ import annotations

import ctypes
import mmap
import os
from collections.abc import Callable

#: Linux >= 5.14: fault the pages of a range in, writable, without changing a byte; reports
#: ``ENOMEM`` where touching the pages would raise ``SIGBUS`` (a full tmpfs).
MADV_POPULATE_WRITE = 23


#: Linux: free the pages of a range of a shared mapping and their tmpfs backing (a hole: reads
#: give zeros, a write allocates afresh).
MADV_REMOVE = 9


def _libc_madvise() -> Callable[[int, int, int], int] | None:
    if os.uname().sysname != "Linux":
        return None
    try:
        fn = ctypes.CDLL(None, use_errno=True).madvise
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    fn.restype = ctypes.c_int

    def madvise(addr: int, length: int, advice: int) -> int:
        return int(fn(addr, length, advice))

    return madvise


#: ``madvise(addr, length, advice) -> 0 or -1`` (errno in ``ctypes.get_errno()``), or None
#: off Linux
madvise = _libc_madvise()


def populate_write(addr: int, length: int) -> None:
    """Fault ``[addr, addr + length)`` in (page-aligned ``addr``); ``OSError`` if the kernel
    refuses (out of memory, or no ``MADV_POPULATE_WRITE``)."""
    if madvise is None:
        raise OSError(0, "madvise is not available on this platform")
    if madvise(addr, length, MADV_POPULATE_WRITE) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"MADV_POPULATE_WRITE failed: {os.strerror(err)}")


def remove_pages(addr: int, length: int) -> None:
    """Punch ``[addr, addr + length)`` (page-aligned) out of a shared mapping and its file:
    the memory goes back to the system.  ``OSError`` if the kernel refuses."""
    if madvise is None:
        raise OSError(0, "madvise is not available on this platform")
    if madvise(addr, length, MADV_REMOVE) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"MADV_REMOVE failed: {os.strerror(err)}")


def _probe_populate_write() -> bool:
    if madvise is None:
        return False
    m = mmap.mmap(-1, mmap.PAGESIZE)
    try:
        holder = ctypes.c_char.from_buffer(m)
        try:
            ok = madvise(ctypes.addressof(holder), mmap.PAGESIZE, MADV_POPULATE_WRITE) == 0
        finally:
            del holder
        return ok
    finally:
        m.close()


#: True if this kernel supports ``MADV_POPULATE_WRITE``
CAN_POPULATE_WRITE = _probe_populate_write()
