"""Choosing a backend for a URL.

The backends are named here by dotted path and imported when a URL first needs one: this
part never imports a backend module statically (the backends import the protocol from here,
so the arrow points one way), and optional dependencies (fsspec, s3fs) stay lazy.
"""

from __future__ import annotations

import importlib
import os
from collections.abc import Mapping
from typing import Any
from urllib.parse import urlsplit

from flashckpt.errors import ConfigError
from flashckpt.storage.protocol import Backend
from flashckpt.storage.redact import redact_text, redact_url

#: backend kind -> "module:class"
BACKENDS = {
    "local": "flashckpt.backends.local:LocalBackend",
    "fsspec": "flashckpt.backends.fsspec:FsspecBackend",
}


def backend_class(kind: str) -> Any:
    """The class that implements backend ``kind`` (a key of :data:`BACKENDS`), imported now."""
    module, _, name = BACKENDS[kind].partition(":")
    return getattr(importlib.import_module(module), name)


def open_backend(
    target: str | os.PathLike[str] | Backend,
    *,
    storage_options: Mapping[str, Any] | None = None,
    max_concurrency: int = 4,
    range_bytes: int = 64 << 20,
) -> Backend:
    """Return a backend for a local path, a ``file://`` URL, or pass a ready backend through.
    ``max_concurrency`` / ``range_bytes``: see :class:`FsspecBackend` (object stores).  An
    empty path is a ``ConfigError`` (it would silently mean the current directory).  The
    caller closes the backend it gets, unless it passed it in.

    Called from the training thread during ``Checkpointer`` construction.
    """
    if isinstance(target, Backend):
        return target
    text = os.fspath(target)
    if not text.strip():
        raise ConfigError("an empty path is not a storage location (it would mean the current directory)")
    if "://" not in text:
        return backend_class("local")(text)  # type: ignore[no-any-return]
    parts = urlsplit(text)
    if parts.scheme == "file":
        if parts.netloc not in ("", "localhost"):
            raise ConfigError(f"file:// URL with a host is not supported: {redact_url(text)}")
        return backend_class("local")(parts.path)  # type: ignore[no-any-return]
    try:
        import fsspec

        fsspec.get_filesystem_class(parts.scheme)
    except (ImportError, ValueError) as exc:
        hint = " (pip install 'flashckpt[s3]')" if parts.scheme in ("s3", "s3a") else ""
        raise ConfigError(
            f"no fsspec file system for {parts.scheme!r} URLs{hint}: {redact_url(text)}"
        ) from exc
    return backend_class("fsspec")(  # type: ignore[no-any-return]
        text, storage_options=storage_options, max_concurrency=max_concurrency, range_bytes=range_bytes
    )


__all__ = ["open_backend", "redact_text", "redact_url"]
