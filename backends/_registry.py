"""Choosing a backend for a URL.  Imports of optional dependencies stay lazy."""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any
from urllib.parse import urlsplit

from flashckpt.backends._base import Backend
from flashckpt.backends._redact import redact_text, redact_url
from flashckpt.errors import ConfigError


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
    from flashckpt.backends.local import LocalBackend

    text = os.fspath(target)
    if not text.strip():
        raise ConfigError("an empty path is not a storage location (it would mean the current directory)")
    if "://" not in text:
        return LocalBackend(text)
    parts = urlsplit(text)
    if parts.scheme == "file":
        if parts.netloc not in ("", "localhost"):
            raise ConfigError(f"file:// URL with a host is not supported: {redact_url(text)}")
        return LocalBackend(parts.path)
    from flashckpt.backends.fsspec import FsspecBackend

    try:
        import fsspec

        fsspec.get_filesystem_class(parts.scheme)
    except (ImportError, ValueError) as exc:
        hint = " (pip install 'flashckpt[s3]')" if parts.scheme in ("s3", "s3a") else ""
        raise ConfigError(
            f"no fsspec file system for {parts.scheme!r} URLs{hint}: {redact_url(text)}"
        ) from exc
    return FsspecBackend(
        text, storage_options=storage_options, max_concurrency=max_concurrency, range_bytes=range_bytes
    )


__all__ = ["open_backend", "redact_text", "redact_url"]
