"""The storage seam: a flat key -> bytes store.

Keys are ``/``-separated relative names made of ``[A-Za-z0-9._-]`` segments (see
:func:`check_key`); a backend never sees tensors, codecs or ranks.  Retries, timeouts and
concurrency belong to the transfer layer, not here: a backend call either succeeds or raises a
typed :class:`~flashckpt.errors.StorageError`.

All methods may be called from any thread concurrently; implementations must be thread-safe.
"""

from __future__ import annotations

import builtins
import errno
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

from flashckpt.errors import (
    ObjectNotFound,
    StorageError,
    StorageFullError,
    StoragePermissionError,
    TransientStorageError,
)

# The key grammar is the format's (flashckpt.format.keys); re-exported here for the backends.
from flashckpt.format.keys import MAX_KEY_CHARS as MAX_KEY_CHARS
from flashckpt.format.keys import check_key as check_key
from flashckpt.storage.redact import redact_text

Buffer = bytes | bytearray | memoryview


def check_range(offset: int, length: int | None) -> None:
    """Refuse a negative ``offset`` or ``length`` with ``ValueError`` (a caller's bug, not a
    storage failure)."""
    if offset < 0 or (length is not None and length < 0):
        raise ValueError(f"invalid byte range: offset={offset}, length={length}")


@dataclass(frozen=True, kw_only=True)
class Capabilities:
    """What a backend promises beyond the basic protocol."""

    #: ``put`` is atomic for readers: they see the old object, or the whole new one.
    atomic_put: bool = True
    #: ``put(..., exclusive=True)`` fails with ``FileExistsError`` if the key exists.
    exclusive_create: bool = False
    #: Data survives a crash of the machine (fsync'd disk, object store); False for shm.
    durable: bool = True


@runtime_checkable
class Backend(Protocol):
    """One tier of storage.  See the module docstring for the rules."""

    @property
    def url(self) -> str:
        """Where this backend stores data, with any credentials removed (safe to log)."""
        ...

    @property
    def capabilities(self) -> Capabilities: ...

    def put(self, key: str, data: Buffer | Sequence[Buffer], *, exclusive: bool = False) -> None:
        """Store ``data`` (one buffer or several, concatenated) under ``key``, atomically."""
        ...

    def get(self, key: str, *, offset: int = 0, length: int | None = None) -> bytes:
        """Return ``length`` bytes of ``key`` from ``offset`` (all of the rest when ``None``).

        Fewer when the object ends first, and never more memory than the bytes returned: a
        caller bounds a record by asking for ``limit + 1`` bytes and refusing a longer answer.
        """
        ...

    def get_into(self, key: str, buf: memoryview, *, offset: int = 0) -> int:
        """Read ``len(buf)`` bytes of ``key`` from ``offset`` into ``buf``; return bytes read.

        Raises :class:`~flashckpt.errors.CorruptCheckpointError`-free: a short object simply
        returns fewer bytes, and the caller decides what that means.
        """
        ...

    def head(self, key: str) -> int:
        """Return the size of ``key`` in bytes; raise ``ObjectNotFound`` if absent."""
        ...

    def modified(self, key: str) -> float:
        """When ``key`` was last written, in seconds since the epoch (the server's clock on
        object storage); raise ``ObjectNotFound`` if absent.  Retention by hand
        (``flashckpt gc``) leaves chunks younger than its grace period alone: a live job may
        have written them for a manifest it has not written yet."""
        ...

    def list(self, prefix: str = "") -> builtins.list[str]:
        """Return every key that starts with ``prefix`` (sorted)."""
        ...

    def children(self, prefix: str) -> builtins.list[str]:
        """Immediate children of ``prefix`` (which ends with ``/`` or is empty), sorted.

        Objects are returned by name, sub-prefixes by name with a trailing ``/``.
        """
        ...

    def delete(self, key: str) -> None:
        """Remove ``key``; a missing key is not an error."""
        ...

    def delete_prefix(self, prefix: str) -> None:
        """Remove every key under ``prefix`` (which must end with ``/``)."""
        ...

    def close(self) -> None:
        """Release threads and connections (idempotent).  Whoever opened the backend closes
        it, after its last call."""
        ...


_TRANSIENT_ERRNOS = {
    errno.EAGAIN,
    errno.EINTR,
    errno.ETIMEDOUT,
    errno.ECONNRESET,
    errno.ECONNABORTED,
    errno.ECONNREFUSED,
    errno.EPIPE,
    errno.EBUSY,
    errno.ESTALE,
}


def translate_os_error(exc: OSError, what: str) -> StorageError:
    """Map an ``OSError`` from a backend call to the matching typed :class:`StorageError`.

    ``what`` describes the operation and must not contain credentials.
    """
    if isinstance(exc, StorageError):
        return exc
    msg = f"{what}: {redact_text(str(exc.strerror or exc))}"
    code = exc.errno
    err: StorageError
    if isinstance(exc, FileNotFoundError) or code == errno.ENOENT:
        err = ObjectNotFound(errno.ENOENT, msg)
    elif code in (errno.ENOSPC, errno.EDQUOT):
        err = StorageFullError(code, msg)
    elif isinstance(exc, PermissionError) or code in (errno.EACCES, errno.EPERM, errno.EROFS):
        err = StoragePermissionError(code or errno.EACCES, msg)
    elif code in _TRANSIENT_ERRNOS or isinstance(exc, (TimeoutError, ConnectionError)):
        err = TransientStorageError(code or errno.EIO, msg)
    else:
        err = StorageError(code or errno.EIO, msg)
    err.__cause__ = exc
    return err
