"""Choosing a backend for a URL.  Imports of optional dependencies stay lazy."""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from typing import Any
from urllib.parse import urlsplit

from flashckpt.backends._base import Backend
from flashckpt.errors import ConfigError

_USERINFO = re.compile(r"^([a-zA-Z][a-zA-Z0-9+.-]*://)[^/@]*@")


def redact_url(url: str) -> str:
    """``url`` with any ``user:password@`` part removed: safe for logs, errors and stats."""
    return _USERINFO.sub(r"\1***@", str(url))


def open_backend(
    target: str | os.PathLike[str] | Backend,
    *,
    storage_options: Mapping[str, Any] | None = None,
    max_concurrency: int = 4,
    range_bytes: int = 64 << 20,
) -> Backend:
    """Return a backend for a local path, a ``file://`` URL, or pass a ready backend through.
    ``max_concurrency`` / ``range_bytes``: see :class:`FsspecBackend` (object stores).

    Called from the training thread during ``Checkpointer`` construction.
    """
    if isinstance(target, Backend):
        return target
    from flashckpt.backends.local import LocalBackend

    text = os.fspath(target)
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
