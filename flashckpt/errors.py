"""The one error hierarchy of flashckpt.

Every error raised by flashckpt derives from :class:`FlashCkptError` and also from the
matching built-in exception, so ``except FileNotFoundError`` keeps working for callers that
do not know about flashckpt.  Whether an error is worth retrying is a property of its type
(:attr:`FlashCkptError.retryable`), never decided by matching message strings.

A failure in a background thread keeps its type and is raised exactly once, from
``SaveHandle.wait()`` or ``Checkpointer.wait()``; it never propagates into ``save()``.
"""

from __future__ import annotations

__all__ = [
    "CheckpointNotFound",
    "ClosedError",
    "ConfigError",
    "CorruptCheckpointError",
    "FlashCkptError",
    "ObjectNotFound",
    "StateMismatchError",
    "StorageError",
    "StorageFullError",
    "StoragePermissionError",
    "TransientStorageError",
    "WaitTimeout",
    "UnsupportedStateError",
]


class FlashCkptError(Exception):
    """Root of every error raised by flashckpt."""

    #: True when the same operation may succeed if tried again (throttling, a reset connection).
    retryable: bool = False


class ConfigError(FlashCkptError, ValueError):
    """An argument or environment override is invalid."""


class UnsupportedStateError(FlashCkptError, TypeError):
    """The state holds an object flashckpt cannot save; the message names its key path."""

    def __init__(self, path: str, detail: str) -> None:
        super().__init__(f"cannot checkpoint state at {path or '<root>'}: {detail}")
        self.path = path


class StateMismatchError(FlashCkptError, ValueError):
    """A checkpoint cannot be loaded into the given state (e.g. an immutable tuple differs)."""


class CorruptCheckpointError(FlashCkptError, ValueError):
    """Stored bytes fail validation: bad checksum, truncated file, hostile or torn manifest."""


class CheckpointNotFound(FlashCkptError, FileNotFoundError):
    """The requested step is not complete on any tier."""


class ClosedError(FlashCkptError, RuntimeError):
    """The checkpointer was used after ``close()``."""


class WaitTimeout(FlashCkptError, TimeoutError):
    """A wait with a timeout ran out before the work was durable."""


class CoordinationError(FlashCkptError, RuntimeError):
    """Ranks could not agree: a peer died or timed out in a collective, or the job's store failed."""


class StorageError(FlashCkptError, OSError):
    """A tier failed to store or return bytes.  Raised at the backend edge, never past it untyped."""


class TransientStorageError(StorageError):
    """A failure that is expected to go away: throttling, 5xx, reset connection, timeout."""

    retryable = True


class ObjectNotFound(StorageError, FileNotFoundError):
    """The key does not exist on the tier."""


class StorageFullError(StorageError):
    """The tier is out of space (``ENOSPC``, quota).  Not retried: space rarely appears by itself."""


class StoragePermissionError(StorageError, PermissionError):
    """The tier refused access."""
