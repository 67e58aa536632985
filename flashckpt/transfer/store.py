"""Retries with exponential backoff and full jitter, decided by the error's type, and the
store that applies them to every call to a persistent tier (:class:`RetryingStore`).

A backend call either succeeds or raises a typed :class:`~flashckpt.errors.StorageError`
(the storage part's rule); whether to try again is decided here, once, by the error's type
(``retryable``), never by a call site.  The engine reaches a persistent tier only through
:func:`retrying`, so each call is retried exactly once over (a wrapped store is never wrapped
again).  The memory tier's manifest files are not: a local tmpfs has no transient errors.
"""

from __future__ import annotations

import builtins
import logging
import random
import time
from collections.abc import Callable, Sequence
from typing import TypeVar

from flashckpt._config import Options
from flashckpt.errors import FlashCkptError
from flashckpt.storage import Backend, Buffer, Capabilities

log = logging.getLogger(__name__)
T = TypeVar("T")


def retry(fn: Callable[[], T], what: str, opts: Options) -> T:
    """Call ``fn``; retry a :class:`FlashCkptError` whose type says ``retryable``.

    Attempt ``k`` sleeps a uniform random time in ``[0, min(backoff_max_s, backoff_s * 2**k)]``
    first (full jitter spreads the retries of thousands of ranks).  ``what`` is logged and must
    not contain credentials.  Any thread may call this.
    """
    for attempt in range(1, opts.retries + 1):
        try:
            return fn()
        except FlashCkptError as exc:
            if not exc.retryable or attempt == opts.retries:
                raise
            delay = random.uniform(0, min(opts.backoff_max_s, opts.backoff_s * 2 ** (attempt - 1)))
            log.warning(
                "%s failed (%s); retry %d of %d in %.2f s", what, exc, attempt, opts.retries - 1, delay
            )
            time.sleep(delay)
    raise AssertionError("unreachable")


class RetryingStore:
    """``backend`` with every call retried by :func:`retry` under ``opts``; a
    :class:`~flashckpt.storage.Backend` itself.  Thread-safe as the backend is (it holds no
    state of its own).  It does not own the backend: ``close`` is the opener's, on the
    backend itself, and is not offered here."""

    def __init__(self, backend: Backend, opts: Options) -> None:
        self.backend = backend
        self.opts = opts

    @property
    def url(self) -> str:
        return self.backend.url

    @property
    def capabilities(self) -> Capabilities:
        return self.backend.capabilities

    def _call(self, fn: Callable[[], T], what: str) -> T:
        return retry(fn, f"{what} on {self.backend.url}", self.opts)

    def put(self, key: str, data: Buffer | Sequence[Buffer], *, exclusive: bool = False) -> None:
        self._call(lambda: self.backend.put(key, data, exclusive=exclusive), f"put {key}")

    def get(self, key: str, *, offset: int = 0, length: int | None = None) -> bytes:
        return self._call(lambda: self.backend.get(key, offset=offset, length=length), f"get {key}")

    def get_into(self, key: str, buf: memoryview, *, offset: int = 0) -> int:
        return self._call(lambda: self.backend.get_into(key, buf, offset=offset), f"get {key}")

    def head(self, key: str) -> int:
        return self._call(lambda: self.backend.head(key), f"head {key}")

    def modified(self, key: str) -> float:
        return self._call(lambda: self.backend.modified(key), f"modified time of {key}")

    def list(self, prefix: str = "") -> builtins.list[str]:
        return self._call(lambda: self.backend.list(prefix), f"list {prefix or '/'}")

    def children(self, prefix: str) -> builtins.list[str]:
        return self._call(lambda: self.backend.children(prefix), f"list {prefix or '/'}")

    def delete(self, key: str) -> None:
        self._call(lambda: self.backend.delete(key), f"delete {key}")

    def delete_prefix(self, prefix: str) -> None:
        self._call(lambda: self.backend.delete_prefix(prefix), f"delete {prefix}")

    def close(self) -> None:
        """Nothing: the backend is its opener's to close."""


def retrying(backend: Backend, opts: Options) -> RetryingStore:
    """``backend`` as a :class:`RetryingStore` under ``opts`` (itself if it already is one
    with these options: a call is never retried by two layers)."""
    if isinstance(backend, RetryingStore) and backend.opts is opts:
        return backend
    if isinstance(backend, RetryingStore):
        backend = backend.backend
    return RetryingStore(backend, opts)
