"""Storage tiers behind one small key -> bytes protocol.

This directory is imported as ``flashckpt.backends`` (``flashckpt/backends`` is a link to it);
importing it under any other name is refused so that there is exactly one copy of each class.
"""

from __future__ import annotations

if __name__ != "flashckpt.backends":  # pragma: no cover - guard against `import backends`
    raise ImportError(f"the storage backends must be imported as 'flashckpt.backends', not {__name__!r}")

from flashckpt.backends.faults import Fault, FaultPlan, FaultyBackend
from flashckpt.backends.fsspec import FsspecBackend
from flashckpt.backends.local import LocalBackend
from flashckpt.storage.protocol import Backend, Capabilities, translate_os_error
from flashckpt.storage.registry import open_backend, redact_url

__all__ = [
    "Backend",
    "Capabilities",
    "Fault",
    "FaultPlan",
    "FaultyBackend",
    "FsspecBackend",
    "LocalBackend",
    "open_backend",
    "redact_url",
    "translate_os_error",
]
