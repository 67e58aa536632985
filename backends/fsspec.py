"""Any fsspec URL as a tier (``s3://``, ``gs://``, ``memory://``, ...), S3 through s3fs.

fsspec runs async file systems (s3fs) on its own I/O event loop thread and bridges every
call from sync code; this backend only calls fsspec's sync API, so it needs no loop of its
own.  Large objects are uploaded by s3fs as multipart uploads with bounded concurrency
(``max_concurrency``), and read back with parallel ranged GETs (``range_bytes`` each).

Errors are translated at this edge: throttling, 5xx, timeouts and dropped connections become
:class:`TransientStorageError` (retried by the transfer layer); missing keys
:class:`ObjectNotFound`; refusals :class:`StoragePermissionError`.  ``storage_options``
(endpoint, credentials, region) are passed to fsspec and never logged: ``url`` is redacted.
Thread-safe: fsspec file systems may be called from several threads.
"""

from __future__ import annotations

import builtins
import errno
import posixpath
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from flashckpt.backends._base import Buffer, Capabilities, check_key, translate_os_error
from flashckpt.backends._registry import redact_url
from flashckpt.errors import ObjectNotFound, StorageError, TransientStorageError

_THROTTLE_CODES = frozenset(
    {
        "SlowDown",
        "Throttling",
        "ThrottlingException",
        "TooManyRequests",
        "RequestLimitExceeded",
        "RequestTimeout",
        "InternalError",
        "ServiceUnavailable",
        "OperationAborted",
    }
)


def _transient_types() -> tuple[type[BaseException], ...]:
    out: list[type[BaseException]] = [TimeoutError, ConnectionError]
    try:
        from botocore import exceptions as be

        out += [be.HTTPClientError, be.ConnectionError, be.ReadTimeoutError, be.ConnectTimeoutError]
    except ImportError:
        pass
    try:
        import aiohttp

        out.append(aiohttp.ClientError)
    except ImportError:
        pass
    try:
        from fsspec.exceptions import FSTimeoutError

        out.append(FSTimeoutError)
    except ImportError:
        pass
    return tuple(out)


def _is_transient(exc: BaseException) -> bool:
    """Throttling, 5xx, timeouts, resets, judged by exception type and the structured S3 error
    code/status (never by message text), anywhere in the cause chain."""
    seen = 0
    types = _transient_types()
    e: BaseException | None = exc
    while e is not None and seen < 10:
        if isinstance(e, types):
            return True
        response = getattr(e, "response", None)
        if isinstance(response, Mapping):
            code = str(response.get("Error", {}).get("Code", ""))
            status = response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0)
            if code in _THROTTLE_CODES or (isinstance(status, int) and (status >= 500 or status == 429)):
                return True
        e = e.__cause__ or e.__context__
        seen += 1
    return False


def translate(exc: BaseException, what: str) -> StorageError:
    """Any exception from fsspec/s3fs as a typed :class:`StorageError` (credential-free)."""
    if isinstance(exc, StorageError):
        return exc
    if _is_transient(exc):
        err: StorageError = TransientStorageError(errno.EAGAIN, f"{what}: {type(exc).__name__}: {exc}")
        err.__cause__ = exc
        return err
    if isinstance(exc, OSError):
        return translate_os_error(exc, what)
    err = StorageError(errno.EIO, f"{what}: {type(exc).__name__}: {exc}")
    err.__cause__ = exc
    return err


class FsspecBackend:
    """A prefix of an fsspec file system as a key -> bytes store."""

    def __init__(
        self,
        url: str,
        *,
        storage_options: Mapping[str, Any] | None = None,
        range_bytes: int = 16 << 20,
        max_concurrency: int = 4,
    ) -> None:
        import fsspec

        opts = dict(storage_options or {})
        self._url = redact_url(url)
        try:
            self.fs, root = fsspec.core.url_to_fs(url, **opts)
        except (ImportError, ValueError) as exc:
            raise translate(exc, f"open {self._url}") from exc
        self.root = root.rstrip("/")
        self._range = range_bytes
        self._concurrency = max(1, max_concurrency)
        self._pool = ThreadPoolExecutor(self._concurrency, thread_name_prefix="flashckpt-range")
        self._pipe_kwargs: dict[str, Any] = {}
        if hasattr(self.fs, "max_concurrency"):  # s3fs: concurrency of one multipart upload
            self._pipe_kwargs = {"max_concurrency": self._concurrency}
        self._caps = Capabilities(atomic_put=True, exclusive_create=False, durable=True)

    @property
    def url(self) -> str:
        return self._url

    @property
    def capabilities(self) -> Capabilities:
        return self._caps

    def _path(self, key: str) -> str:
        return f"{self.root}/{check_key(key)}"

    def _key(self, path: str) -> str:
        path = path.rstrip("/")
        root = self.root.lstrip("/")
        p = path.lstrip("/")
        return p[len(root) + 1 :] if p.startswith(root + "/") else posixpath.basename(p)

    def put(self, key: str, data: Buffer | Sequence[Buffer], *, exclusive: bool = False) -> None:
        path = self._path(key)
        if isinstance(data, (bytes, bytearray, memoryview)):
            payload = bytes(data)
        else:
            payload = b"".join(bytes(d) for d in data)
        try:
            try:
                self.fs.pipe_file(path, payload, **self._pipe_kwargs)
            except TypeError:  # file systems whose pipe_file takes no options
                self.fs.pipe_file(path, payload)
        except Exception as exc:
            raise translate(exc, f"put {key} on {self.url}") from exc

    def get(self, key: str, *, offset: int = 0, length: int | None = None) -> bytes:
        path = self._path(key)
        end = None if length is None else offset + length
        try:
            if length is not None and length > 2 * self._range:
                buf = bytearray(length)
                n = self._ranged_into(key, path, memoryview(buf), offset)
                return bytes(buf[:n])
            return bytes(self.fs.cat_file(path, start=offset or None, end=end))
        except StorageError:
            raise
        except Exception as exc:
            raise translate(exc, f"get {key} from {self.url}") from exc

    def get_into(self, key: str, buf: memoryview, *, offset: int = 0) -> int:
        view = buf.cast("B") if buf.format != "B" else buf
        path = self._path(key)
        try:
            if len(view) > 2 * self._range:
                return self._ranged_into(key, path, view, offset)
            data = self.fs.cat_file(path, start=offset or None, end=offset + len(view))
        except StorageError:
            raise
        except Exception as exc:
            raise translate(exc, f"get {key} from {self.url}") from exc
        n = min(len(data), len(view))
        view[:n] = data[:n]
        return n

    def _ranged_into(self, key: str, path: str, view: memoryview, offset: int) -> int:
        """Parallel ranged GETs of ``[offset, offset + len(view))`` straight into ``view``."""
        size = self.head(key)
        want = max(0, min(len(view), size - offset))

        def one(start: int) -> int:
            stop = min(start + self._range, want)
            data = self.fs.cat_file(path, start=offset + start, end=offset + stop)
            view[start : start + len(data)] = data
            return len(data)

        try:
            got = sum(self._pool.map(one, range(0, want, self._range)))
        except Exception as exc:
            raise translate(exc, f"get {key} from {self.url}") from exc
        return int(got)

    def head(self, key: str) -> int:
        try:
            info = self.fs.info(self._path(key))
        except Exception as exc:
            raise translate(exc, f"head {key} on {self.url}") from exc
        if info.get("type") == "directory":
            raise ObjectNotFound(errno.ENOENT, f"head {key} on {self.url}: not an object")
        return int(info["size"])

    def list(self, prefix: str = "") -> builtins.list[str]:
        base = self.root if "/" not in prefix else f"{self.root}/{prefix.rsplit('/', 1)[0]}"
        try:
            paths = self.fs.find(base)
        except FileNotFoundError:
            return []
        except Exception as exc:
            raise translate(exc, f"list {prefix!r} on {self.url}") from exc
        keys = (self._key(p) for p in paths)
        return sorted(k for k in keys if k.startswith(prefix))

    def children(self, prefix: str) -> builtins.list[str]:
        if prefix and not prefix.endswith("/"):
            raise ValueError(f"children needs a prefix ending in '/', got {prefix!r}")
        base = f"{self.root}/{prefix.rstrip('/')}" if prefix else self.root
        if prefix:
            check_key(prefix.rstrip("/"))
        try:
            entries = (
                self.fs.ls(base, detail=True, refresh=True)
                if _takes_refresh(self.fs)
                else self.fs.ls(base, detail=True)
            )
        except FileNotFoundError:
            return []
        except Exception as exc:
            raise translate(exc, f"list {prefix!r} on {self.url}") from exc
        out = []
        for e in entries:
            name = posixpath.basename(str(e["name"]).rstrip("/"))
            if not name or str(e["name"]).rstrip("/") == base.rstrip("/"):
                continue
            out.append(name + "/" if e.get("type") == "directory" else name)
        return sorted(set(out))

    def delete(self, key: str) -> None:
        try:
            self.fs.rm_file(self._path(key))
        except FileNotFoundError:
            return
        except Exception as exc:
            if isinstance(translate(exc, ""), ObjectNotFound):
                return
            raise translate(exc, f"delete {key} on {self.url}") from exc

    def delete_prefix(self, prefix: str) -> None:
        if not prefix.endswith("/"):
            raise ValueError(f"delete_prefix needs a prefix ending in '/', got {prefix!r}")
        path = self._path(prefix.rstrip("/"))
        try:
            self.fs.rm(path, recursive=True)
        except FileNotFoundError:
            return
        except Exception as exc:
            raise translate(exc, f"delete {prefix} on {self.url}") from exc

    def close(self) -> None:
        self._pool.shutdown(wait=True)


def _takes_refresh(fs: Any) -> bool:
    return type(fs).__name__ == "S3FileSystem"
