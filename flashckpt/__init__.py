"""flashckpt: checkpoints that cost about one memory copy.

The public API is :class:`Checkpointer`, :func:`load`, :class:`SaveHandle`, :class:`Options`,
:class:`RNGState` (the random generators, as a ``Stateful`` a state can hold) and the error
hierarchy rooted at :class:`FlashCkptError`.  See ``docs/architecture.md``.
"""

from __future__ import annotations

from flashckpt._config import Options
from flashckpt._load import load
from flashckpt.checkpointer import Checkpointer
from flashckpt.coordination.handle import SaveHandle
from flashckpt.errors import (
    CheckpointNotFound,
    ClosedError,
    ConfigError,
    CoordinationError,
    CorruptCheckpointError,
    FlashCkptError,
    ObjectNotFound,
    StateMismatchError,
    StorageError,
    StorageFullError,
    StoragePermissionError,
    TransientStorageError,
    UnsupportedStateError,
    WaitTimeout,
)
from flashckpt.rng import RNGState

__version__ = "0.1.0"

__all__ = [
    "CheckpointNotFound",
    "Checkpointer",
    "ClosedError",
    "ConfigError",
    "CoordinationError",
    "CorruptCheckpointError",
    "FlashCkptError",
    "ObjectNotFound",
    "Options",
    "RNGState",
    "SaveHandle",
    "StateMismatchError",
    "StorageError",
    "StorageFullError",
    "StoragePermissionError",
    "TransientStorageError",
    "UnsupportedStateError",
    "WaitTimeout",
    "__version__",
    "load",
]
