"""The storage seam (part Storage): the backend protocol every tier is written through, and
the registry that opens a backend for a URL.

Backends themselves live in ``flashckpt.backends`` (the ``backends/`` directory); this package
never imports them at module level (the registry imports one lazily when a URL asks for it).
"""

from __future__ import annotations

from flashckpt.storage.protocol import Backend, Buffer, Capabilities, check_range, translate_os_error
from flashckpt.storage.redact import redact_text, redact_url
from flashckpt.storage.registry import open_backend

__all__ = [
    "Backend",
    "Buffer",
    "Capabilities",
    "check_range",
    "open_backend",
    "redact_text",
    "redact_url",
    "translate_os_error",
]
