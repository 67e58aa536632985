"""Any fsspec URL as a tier (``s3://``, ``gs://``, ``memory://``, ...), S3 through s3fs.

fsspec runs async file systems (s3fs) on its own I/O event loop thread and bridges every
call from sync code with :func:`fsspec.asyn.sync`; this backend uses that one bridge and
has no loop of its own.  Every method may be called from any thread except fsspec's I/O
loop thread (a sync call from there would deadlock); calls from several threads run
concurrently.

S3 goes through s3fs's client and its error translation, but moves bytes itself, without
copies (:class:`~flashckpt.backends.s3.S3Transfer`, in ``backends/s3.py``).  Other file
systems use ``cat_file`` and ``pipe_file``, and parallel ranged ``cat_file`` calls above
``range_bytes``.

S3 defaults, each overridden by the same key in ``storage_options["config_kwargs"]`` (see
:func:`s3_defaults`; s3fs's own retry loop is set to one attempt): connect and read
timeouts (``backends.s3.CONNECT_TIMEOUT_S``, ``READ_TIMEOUT_S``; the read timeout bounds the
time without a byte from the server, so a hung server fails the request instead of hanging
forever; aiohttp does not apply it while a request body is being sent, so an upload that
makes no progress for as long fails too), a connection pool of at least ``max_concurrency``,
no retries inside botocore or s3fs: retries belong to the transfer layer
(``Options.retries``), so a stalled request costs one read timeout per attempt, not one per
attempt of three nested layers; and no CRC of GET bodies (botocore's
``response_checksum_validation``): the transfer layer checks every chunk it reads (xxh3).

Errors are translated at this edge: throttling, 5xx, timeouts and dropped connections become
:class:`TransientStorageError` (retried by the transfer layer); out of space or quota
(``507``, ``QuotaExceeded``, MinIO's ``XMinioStorageFull``, ``EntityTooLarge``)
:class:`StorageFullError`, like ``ENOSPC`` on a POSIX tier; missing keys
:class:`ObjectNotFound`; refusals :class:`StoragePermissionError`.  ``storage_options``
(endpoint, credentials, region) are passed to fsspec and never logged: ``url`` is redacted.
"""

from __future__ import annotations

import builtins
import datetime
import errno
import posixpath
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from flashckpt.backends.s3 import S3Transfer, is_full, is_s3, is_transient, s3_defaults
from flashckpt.errors import ObjectNotFound, StorageError, StorageFullError, TransientStorageError
from flashckpt.storage.protocol import Buffer, Capabilities, check_key, check_range, translate_os_error
from flashckpt.storage.redact import redact_text, redact_url


def translate(exc: BaseException, what: str) -> StorageError:
    """Any exception from fsspec/s3fs as a typed :class:`StorageError` (credential-free).

    Out of space / quota first (a ``507`` is not a transient 5xx), then transient, then the
    ``OSError`` translation every backend shares.
    """
    if isinstance(exc, StorageError):
        return exc
    # fsspec's bridge re-raises a timeout as an FSTimeoutError without a message; an HTTP
    # client's message may hold the request URL, with a presigned URL's signature in it
    detail = redact_text(str(exc) or str(exc.__cause__ or ""))
    err: StorageError
    if is_full(exc):
        err = StorageFullError(errno.ENOSPC, f"{what}: out of space or quota: {type(exc).__name__}: {detail}")
    elif is_transient(exc):
        err = TransientStorageError(errno.EAGAIN, f"{what}: {type(exc).__name__}: {detail}")
    elif isinstance(exc, OSError):
        return translate_os_error(exc, what)
    else:
        err = StorageError(errno.EIO, f"{what}: {type(exc).__name__}: {detail}")
    err.__cause__ = exc
    return err


def _join(data: Sequence[Buffer]) -> bytearray:
    """Several buffers as one (one copy): the rare multi-buffer put."""
    parts = [memoryview(d).cast("B") for d in data]
    out = bytearray(sum(len(p) for p in parts))
    pos = 0
    for p in parts:
        out[pos : pos + len(p)] = p
        pos += len(p)
    return out


class FsspecBackend:
    """A prefix of an fsspec file system as a key -> bytes store.  See the module docstring."""

    def __init__(
        self,
        url: str,
        *,
        storage_options: Mapping[str, Any] | None = None,
        range_bytes: int = 64 << 20,
        max_concurrency: int = 4,
    ) -> None:
        """Any thread; opens no connection yet.  ``range_bytes``: one ranged GET, and one part
        of a multipart upload (S3: objects up to it are one ``PutObject``).
        ``max_concurrency``: requests in flight for one large read or upload (across calls,
        concurrency is the callers': each call of a small object is one request)."""
        import fsspec

        opts = dict(storage_options or {})
        self._url = redact_url(url)
        self._concurrency = max(1, max_concurrency)
        try:
            protocol = fsspec.core.split_protocol(url)[0] or "file"
            if is_s3(fsspec.get_filesystem_class(protocol)):
                opts = s3_defaults(opts, self._concurrency)
            self.fs, root = fsspec.core.url_to_fs(url, **opts)
        except (ImportError, ValueError) as exc:
            raise translate(exc, f"open {self._url}") from exc
        self.root = root.rstrip("/")
        self._range = max(1, range_bytes)
        self._s3 = (
            S3Transfer(self.fs, range_bytes=self._range, max_concurrency=self._concurrency)
            if is_s3(type(self.fs))
            else None
        )
        self._pool = ThreadPoolExecutor(self._concurrency, thread_name_prefix="flashckpt-range")
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
        buf = data if isinstance(data, (bytes, bytearray, memoryview)) else _join(data)
        try:
            if self._s3 is not None:
                self._s3.put(path, memoryview(buf).cast("B"))
                return
            self.fs.pipe_file(path, buf if isinstance(buf, bytes) else bytes(buf))
        except Exception as exc:
            raise translate(exc, f"put {key} on {self.url}") from exc

    def get(self, key: str, *, offset: int = 0, length: int | None = None) -> bytes:
        """At most ``length`` bytes from ``offset`` (the rest of the object when ``None``);
        never allocates more than the object holds, so ``length=limit + 1`` bounds a record
        without costing ``limit`` bytes of memory.  Any thread but fsspec's loop thread."""
        check_range(offset, length)
        path = self._path(key)
        try:
            if length == 0:
                return b""
            if self._s3 is not None and length is not None:
                return self._s3.get(path, offset, length)
            if length is not None and length > self._range:
                # a large limit: learn the size first, and read only what is there
                length = max(0, min(length, int(self.fs.size(path)) - offset))
                if length > self._range:
                    buf = bytearray(length)
                    n = self._ranged_into(path, memoryview(buf), offset)
                    return bytes(buf) if n == length else bytes(buf[:n])
            end = None if length is None else offset + length
            return bytes(self.fs.cat_file(path, start=offset or None, end=end))
        except Exception as exc:
            raise translate(exc, f"get {key} from {self.url}") from exc

    def get_into(self, key: str, buf: memoryview, *, offset: int = 0) -> int:
        check_range(offset, None)
        view = buf.cast("B") if buf.format != "B" else buf
        try:
            return self._read_into(self._path(key), view, offset)
        except Exception as exc:
            raise translate(exc, f"get {key} from {self.url}") from exc

    def _read_into(self, path: str, view: memoryview, offset: int) -> int:
        """Read ``[offset, offset + len(view))`` of ``path`` into ``view``; bytes read (fewer
        when the object is shorter).  Untranslated errors."""
        if not len(view):
            return 0
        if self._s3 is not None:
            return self._s3.read_into(path, view, offset)
        if len(view) <= self._range:
            data = self.fs.cat_file(path, start=offset or None, end=offset + len(view))
            n = min(len(data), len(view))
            view[:n] = data[:n]
            return n
        return self._ranged_into(path, view, offset)

    def _ranged_into(self, path: str, view: memoryview, offset: int) -> int:
        """Non-S3 file systems: parallel ``cat_file`` ranges of ``[offset, offset + len(view))``
        straight into ``view``, on the ``flashckpt-range`` pool."""
        size = int(self.fs.size(path))
        want = max(0, min(len(view), size - offset))

        def one(start: int) -> int:
            stop = min(start + self._range, want)
            data = self.fs.cat_file(path, start=offset + start, end=offset + stop)
            view[start : start + len(data)] = data
            return len(data)

        return int(sum(self._pool.map(one, range(0, want, self._range))))

    def head(self, key: str) -> int:
        try:
            info = self.fs.info(self._path(key))
        except Exception as exc:
            raise translate(exc, f"head {key} on {self.url}") from exc
        if info.get("type") == "directory":
            raise ObjectNotFound(errno.ENOENT, f"head {key} on {self.url}: not an object")
        return int(info["size"])

    def modified(self, key: str) -> float:
        what = f"modified time of {key} on {self.url}"
        try:
            info = self.fs.info(self._path(key))
        except Exception as exc:
            raise translate(exc, what) from exc
        if info.get("type") == "directory":
            raise ObjectNotFound(errno.ENOENT, f"{what}: not an object")
        for name in ("mtime", "LastModified", "last_modified", "modified", "created"):
            value = info.get(name)
            if isinstance(value, datetime.datetime):
                if value.tzinfo is None:  # fsspec's convention: naive times are UTC
                    value = value.replace(tzinfo=datetime.UTC)
                return value.timestamp()
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                return float(value)
        raise StorageError(f"{what}: the file system reports none (fields: {sorted(info)})")

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
                if self._s3 is not None
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
        """Stop the ``flashckpt-range`` pool (joins its threads).  Idempotent; the caller that
        opened this backend calls it once its last call has returned."""
        self._pool.shutdown(wait=True)
