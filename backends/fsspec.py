"""Any fsspec URL as a tier (``s3://``, ``gs://``, ``memory://``, ...), S3 through s3fs.

fsspec runs async file systems (s3fs) on its own I/O event loop thread and bridges every
call from sync code with :func:`fsspec.asyn.sync`; this backend uses that one bridge and
has no loop of its own.  Every method may be called from any thread except fsspec's I/O
loop thread (a sync call from there would deadlock); calls from several threads run
concurrently.

S3 goes through s3fs's client and its error translation, but moves bytes itself, without
copies: ``get_into`` streams the body of a ranged ``GetObject`` straight into the caller's
buffer (``readinto``: no whole-object ``bytes``, no second copy; the buffer's pages are
faulted in first, on the calling thread), and ``put`` sends the caller's buffer as a file
read in place (``bytes`` would be copied whole twice more on the way, into fresh
page-faulting memory), its CRC32 computed on the calling thread.  Every request shares the
one event loop thread: what can run on the callers' threads with the GIL released does.
One request per ``range_bytes`` (64 MiB: a default chunk is one ``GetObject`` /
``PutObject``); above it, parallel ranged GETs and a multipart upload, at most
``max_concurrency`` requests in flight for one call.  Other file systems use ``cat_file``
and ``pipe_file``.

S3 defaults, each overridden by the same key in ``storage_options["config_kwargs"]`` (see
:func:`s3_defaults`; s3fs's own retry loop is set to one attempt): connect and read
timeouts (:data:`CONNECT_TIMEOUT_S`, :data:`READ_TIMEOUT_S`; the read timeout bounds the
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

import asyncio
import base64
import builtins
import ctypes
import errno
import io
import mmap
import os
import posixpath
import time
import zlib
from collections.abc import Awaitable, Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from flashckpt.backends._base import Buffer, Capabilities, check_key, check_range, translate_os_error
from flashckpt.backends._redact import redact_text, redact_url
from flashckpt.errors import ObjectNotFound, StorageError, StorageFullError, TransientStorageError

#: Seconds to wait for a TCP connection to the object store (S3 ``connect_timeout``).
CONNECT_TIMEOUT_S = 10.0
#: Seconds a request may go without receiving a byte before it fails as a transient error
#: (S3 ``read_timeout``): a GET whose body stops, a PUT whose response never comes.
READ_TIMEOUT_S = 30.0

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
#: Error codes of an object store that is out of space or over a quota.  ``EntityTooLarge``
#: is also what some S3-compatible stores answer when an upload would exceed a quota.
_FULL_CODES = frozenset(
    {
        "QuotaExceeded",
        "EntityTooLarge",
        "InsufficientStorage",
        "XMinioStorageFull",
        "XMinioStorageBackendFull",
        "XMinioAdminBucketQuotaExceeded",
    }
)
_INSUFFICIENT_STORAGE = 507
_MIN_PART_BYTES = 5 << 20  # S3's smallest part of a multipart upload (but the last)


def _transient_types() -> tuple[type[BaseException], ...]:
    out: list[type[BaseException]] = [TimeoutError, ConnectionError]
    try:
        from botocore import exceptions as be

        out += [
            be.HTTPClientError,  # includes ReadTimeoutError, ResponseStreamingError
            be.ConnectionError,  # includes ConnectTimeoutError, EndpointConnectionError
            be.IncompleteReadError,  # a body shorter than its Content-Length
        ]
    except ImportError:
        pass
    try:
        from botocore.parsers import ResponseParserError

        out.append(ResponseParserError)  # an error document cut off by a dropped connection
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


_TRANSIENT: tuple[type[BaseException], ...] | None = None


def _s3_error(exc: BaseException) -> tuple[str, int] | None:
    """The structured S3 ``(error code, HTTP status)`` anywhere in the cause chain, if any."""
    e: BaseException | None = exc
    for _ in range(10):
        if e is None:
            return None
        response = getattr(e, "response", None)
        if isinstance(response, Mapping):
            code = str(response.get("Error", {}).get("Code", ""))
            status = response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0)
            return code, status if isinstance(status, int) else 0
        e = e.__cause__ or e.__context__
    return None


def _is_full(exc: BaseException) -> bool:
    s3 = _s3_error(exc)
    return s3 is not None and (s3[0] in _FULL_CODES or s3[1] == _INSUFFICIENT_STORAGE)


def _is_transient(exc: BaseException) -> bool:
    """Throttling, 5xx, timeouts, resets, judged by exception type and the structured S3 error
    code/status (never by message text), anywhere in the cause chain."""
    global _TRANSIENT
    if _TRANSIENT is None:
        _TRANSIENT = _transient_types()
    e: BaseException | None = exc
    for _ in range(10):
        if e is None:
            break
        if isinstance(e, _TRANSIENT):
            return True
        e = e.__cause__ or e.__context__
    s3 = _s3_error(exc)
    if s3 is None:
        return False
    code, status = s3
    return code in _THROTTLE_CODES or status >= 500 or status == 429


def _pick(group: BaseExceptionGroup) -> BaseException:
    """The error to report for several failed parts: one that retrying will not fix, if any
    (out of space, refused), else the first."""
    leaves: list[BaseException] = []
    stack: list[BaseException] = [group]
    while stack:
        e = stack.pop()
        if isinstance(e, BaseExceptionGroup):
            stack.extend(reversed(e.exceptions))
        else:
            leaves.append(e)
    lasting = [e for e in leaves if not isinstance(e, asyncio.CancelledError) and not _is_transient(e)]
    return (lasting or leaves)[0]


def _is_invalid_range(exc: BaseException) -> bool:
    s3 = _s3_error(exc)
    return s3 is not None and (s3[0] == "InvalidRange" or s3[1] == 416)


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
    if _is_full(exc):
        err = StorageFullError(errno.ENOSPC, f"{what}: out of space or quota: {type(exc).__name__}: {detail}")
    elif _is_transient(exc):
        err = TransientStorageError(errno.EAGAIN, f"{what}: {type(exc).__name__}: {detail}")
    elif isinstance(exc, OSError):
        return translate_os_error(exc, what)
    else:
        err = StorageError(errno.EIO, f"{what}: {type(exc).__name__}: {detail}")
    err.__cause__ = exc
    return err


class _ViewReader(io.BytesIO):
    """A seekable, read-only file over a buffer, without copying it: the body of a PUT.

    botocore hashes it and aiohttp sends it in small reads (256 KiB); a ``bytes`` body would
    be copied whole twice more on the way (botocore wraps it in a ``BytesIO`` that aiohttp
    unshares; a ``bytearray`` is sliced by aiohttp and asyncio), each copy into fresh,
    page-faulting memory.  A ``BytesIO`` by type, so that aiohttp reads it on the event loop
    (any other file is read on an executor thread, two GIL hand-offs per 256 KiB); every
    method that would see ``BytesIO``'s own (empty) buffer is overridden.  Read from fsspec's
    loop thread, one request at a time.
    """

    def __init__(self, data: Buffer) -> None:
        super().__init__()
        self._view = memoryview(data).cast("B")
        self._pos = 0
        #: ``time.monotonic()`` of the last read or seek: how :meth:`FsspecBackend._watched`
        #: tells a stalled upload from a slow one
        self.touched = time.monotonic()

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def writable(self) -> bool:
        return False

    def tell(self) -> int:
        return self._pos

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self._pos, io.SEEK_END: len(self._view)}[whence]
        self._pos = max(0, base + offset)
        self.touched = time.monotonic()
        return self._pos

    def read(self, size: int | None = -1) -> bytes:
        stop = len(self._view) if size is None or size < 0 else min(len(self._view), self._pos + size)
        out = bytes(self._view[self._pos : stop])
        self._pos += len(out)
        self.touched = time.monotonic()
        return out

    read1 = read

    def readinto(self, b: Any) -> int:
        out = memoryview(b).cast("B")
        n = max(0, min(len(out), len(self._view) - self._pos))
        out[:n] = self._view[self._pos : self._pos + n]
        self._pos += n
        self.touched = time.monotonic()
        return n

    readinto1 = readinto

    def readline(self, size: int | None = -1) -> bytes:
        raise io.UnsupportedOperation("readline")

    def getbuffer(self) -> memoryview:
        return self._view[:]  # a view of its own: the caller may release it

    def getvalue(self) -> bytes:
        return bytes(self._view)

    def write(self, b: Any) -> int:
        raise io.UnsupportedOperation("write")

    def truncate(self, size: int | None = None) -> int:
        raise io.UnsupportedOperation("truncate")

    def close(self) -> None:  # aiohttp closes a body it has sent; botocore may send it again
        pass

    def release(self) -> None:
        """Let go of the caller's buffer (a slot stays mappable): once the request is over."""
        try:
            self._view.release()
        except BufferError:  # a view handed out by getbuffer is still alive
            pass


_MADV_POPULATE_WRITE = 23  # Linux >= 5.14
_PREFAULT_MIN_BYTES = 1 << 20


def _libc_madvise() -> Callable[[int, int, int], int] | None:
    if os.uname().sysname != "Linux":
        return None
    try:
        fn = ctypes.CDLL(None, use_errno=True).madvise
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    fn.restype = ctypes.c_int
    return fn


_madvise = _libc_madvise()


def _prefault(view: memoryview) -> None:
    """Fault in the pages of a destination buffer on the calling thread, the GIL released.

    Every S3 body is copied into its destination on fsspec's one event loop thread, holding
    the GIL; in fresh memory each 4 KiB would also take a page fault there, serializing the
    faults of every download behind one thread.  ``MADV_POPULATE_WRITE`` maps the pages in
    without changing a byte; already mapped pages cost a page-table walk.  Best effort: a
    no-op where unsupported (and never again after it fails once).
    """
    global _madvise
    if _madvise is None or len(view) < _PREFAULT_MIN_BYTES or view.readonly or not view.c_contiguous:
        return
    try:
        holder = ctypes.c_char.from_buffer(view)
    except (TypeError, ValueError):
        return
    try:
        start = ctypes.addressof(holder)
    finally:
        del holder
    page = mmap.PAGESIZE
    first = start - start % page  # the whole pages the view touches: all in its mapping
    last = -(-(start + len(view)) // page) * page
    if _madvise(first, last - first, _MADV_POPULATE_WRITE) != 0:
        _madvise = None  # an old kernel (EINVAL) or memory that cannot be populated


def _join(data: Sequence[Buffer]) -> bytearray:
    """Several buffers as one (one copy): the rare multi-buffer put."""
    parts = [memoryview(d).cast("B") for d in data]
    out = bytearray(sum(len(p) for p in parts))
    pos = 0
    for p in parts:
        out[pos : pos + len(p)] = p
        pos += len(p)
    return out


def _is_s3(cls: type) -> bool:
    return any(c.__name__ == "S3FileSystem" for c in cls.__mro__)


def s3_defaults(storage_options: Mapping[str, Any], max_concurrency: int) -> dict[str, Any]:
    """``storage_options`` for s3fs with this backend's defaults filled in (see the module
    docstring); a key the caller gave always wins, inside ``config_kwargs`` too.  Pure."""
    opts = dict(storage_options)
    config = {
        "connect_timeout": CONNECT_TIMEOUT_S,
        "read_timeout": READ_TIMEOUT_S,
        "max_pool_connections": max(10, max_concurrency),
        "retries": {"max_attempts": 0},  # retries after the first attempt
        # no CRC of every GET body on the event loop: flashckpt checks each chunk's xxh3
        "response_checksum_validation": "when_required",
    }
    config.update(opts.get("config_kwargs") or {})
    opts["config_kwargs"] = config
    return opts


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
            if _is_s3(fsspec.get_filesystem_class(protocol)):
                opts = s3_defaults(opts, self._concurrency)
            self.fs, root = fsspec.core.url_to_fs(url, **opts)
        except (ImportError, ValueError) as exc:
            raise translate(exc, f"open {self._url}") from exc
        self.root = root.rstrip("/")
        self._range = max(1, range_bytes)
        self._s3 = _is_s3(type(self.fs))
        self._part = max(_MIN_PART_BYTES, self._range)
        self._stall_s: float | None = None
        if self._s3:
            self.fs.retries = 1  # s3fs's own retry loop around each call (a class default of 5)
            read_timeout = self.fs.config_kwargs.get("read_timeout", READ_TIMEOUT_S)
            self._stall_s = None if read_timeout is None else float(read_timeout)
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
            if self._s3:
                from fsspec.asyn import sync

                view = memoryview(buf).cast("B")
                sums = self._crc32s(view)
                sync(self.fs.loop, self._s3_put, path, view, sums)
                return
            self.fs.pipe_file(path, buf if isinstance(buf, bytes) else bytes(buf))
        except Exception as exc:
            raise translate(exc, f"put {key} on {self.url}") from exc

    def _crc32s(self, view: memoryview) -> list[dict[str, str]]:
        """The CRC32 botocore would send with each request body (one per part), computed here
        on the calling thread, the GIL released, instead of on the event loop thread that
        every request shares.  None when the configuration asks for no checksums."""
        if self.fs.config_kwargs.get("request_checksum_calculation", "when_supported") != "when_supported":
            return [{} for _ in range(0, max(1, len(view)), self._part)]
        out = []
        for start in range(0, max(1, len(view)), self._part):
            crc = zlib.crc32(view[start : start + self._part])
            crc32 = base64.b64encode(crc.to_bytes(4, "big")).decode("ascii")
            out.append({"ChecksumAlgorithm": "CRC32", "ChecksumCRC32": crc32})  # as botocore sends it
        return out

    async def _s3_put(self, path: str, view: memoryview, sums: Sequence[Mapping[str, str]]) -> None:
        """fsspec's loop thread: one ``PutObject`` up to ``range_bytes``, else a multipart
        upload of ``range_bytes`` parts, ``max_concurrency`` in flight (aborted if a part
        fails).  Every body is read from ``view`` in place, under :meth:`_watched`; ``sums``
        are the checksum arguments of each part (:meth:`_crc32s`)."""
        bucket, key, _ = self.fs.split_path(path)
        call = self.fs._call_s3
        if len(view) <= self._part:
            await self._watched(
                view, lambda body: call("put_object", Bucket=bucket, Key=key, Body=body, **sums[0])
            )
            self.fs.invalidate_cache(path)
            return
        upload = (await call("create_multipart_upload", Bucket=bucket, Key=key))["UploadId"]
        ids = {"Bucket": bucket, "Key": key, "UploadId": upload}
        limit = asyncio.Semaphore(self._concurrency)

        async def part(number: int, start: int) -> dict[str, Any]:
            async with limit:
                out = await self._watched(
                    view[start : start + self._part],
                    lambda body: call("upload_part", PartNumber=number, Body=body, **ids, **sums[number - 1]),
                )
            return {"PartNumber": number, "ETag": out["ETag"]}

        try:
            try:
                async with asyncio.TaskGroup() as tg:  # one failed part cancels the others
                    starts = range(0, len(view), self._part)
                    tasks = [tg.create_task(part(i + 1, s)) for i, s in enumerate(starts)]
            except BaseExceptionGroup as group:
                raise _pick(group)  # noqa: B904 (keeps its own cause: the S3 error)
            parts = [t.result() for t in tasks]
            await call("complete_multipart_upload", MultipartUpload={"Parts": parts}, **ids)
        except BaseException:
            try:  # parts of an upload never completed are stored (and billed) until aborted
                await asyncio.shield(call("abort_multipart_upload", **ids))
            except Exception:
                pass
            raise
        self.fs.invalidate_cache(path)

    async def _watched(self, view: memoryview, send: Callable[[_ViewReader], Awaitable[Any]]) -> Any:
        """fsspec's loop thread: ``send(body)`` with a request body read from ``view``, failed
        with ``TimeoutError`` when the upload stops making progress.

        aiohttp arms its read timeout only once the body has been written, and a write to a
        server that stopped reading waits forever.  So: no byte of the body taken for
        ``read_timeout`` seconds fails the request; once the whole body has been taken, the
        response has ``2 * read_timeout`` (the last bytes still draining, then the server's
        own ``read_timeout``)."""
        body = _ViewReader(view)
        task = asyncio.ensure_future(send(body))
        stall = self._stall_s
        try:
            while True:
                done, _ = await asyncio.wait({task}, timeout=None if stall is None else min(1.0, stall / 4))
                if done:
                    return task.result()
                assert stall is not None
                idle = time.monotonic() - body.touched
                if idle > (stall if body.tell() < len(view) else 2 * stall):
                    raise TimeoutError(
                        f"the upload of {len(view)} bytes made no progress for {idle:.1f} s "
                        f"({body.tell()} bytes sent)"
                    )
        finally:
            if not task.done():
                task.cancel()
                try:
                    await task
                except BaseException:
                    pass
            body.release()

    def get(self, key: str, *, offset: int = 0, length: int | None = None) -> bytes:
        """At most ``length`` bytes from ``offset`` (the rest of the object when ``None``);
        never allocates more than the object holds, so ``length=limit + 1`` bounds a record
        without costing ``limit`` bytes of memory.  Any thread but fsspec's loop thread."""
        check_range(offset, length)
        path = self._path(key)
        try:
            if length == 0:
                return b""
            if self._s3 and length is not None:
                from fsspec.asyn import sync

                data: bytes = sync(self.fs.loop, self._s3_get, path, offset, length)
                return data
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

    async def _s3_get(self, path: str, offset: int, length: int) -> bytes:
        """fsspec's loop thread: at most ``length`` bytes from ``offset``.  One ranged GET of
        up to ``range_bytes``, whose ``Content-Range`` gives the object's size; a buffer of
        exactly the bytes to return (never ``length`` for a short object); the rest, if the
        object holds more than one range, in parallel ranged GETs into that buffer."""
        bucket, key, version = self.fs.split_path(path)
        extra = {"VersionId": version} if version else {}
        first = min(length, self._range)
        try:
            resp = await self.fs._call_s3(
                "get_object", Bucket=bucket, Key=key, Range=f"bytes={offset}-{offset + first - 1}", **extra
            )
        except Exception as exc:
            if _is_invalid_range(exc):  # starts at or past the end of the object
                return b""
            raise
        body = resp["Body"]
        try:
            sent = int(resp.get("ContentLength") or 0)
            content_range = str(resp.get("ContentRange") or "")
            if content_range:  # "bytes 0-99/12345"
                total = int(content_range.rsplit("/", 1)[1])
            elif offset:
                raise StorageError(errno.EIO, f"get {path}: the server ignored the Range header")
            else:  # the whole object came back
                total = sent
            buf = bytearray(max(0, min(length, total - offset)))
            view = memoryview(buf)
            got, want = 0, min(sent, len(buf))
            while got < want:
                n = await body.readinto(view[got:want])
                if not n:
                    break
                got += n
        finally:
            body.close()
        if got == first and got < len(buf):
            got += await self._s3_read_into(path, view[got:], offset + got)
        # fewer: the object changed meanwhile, or its body ended early
        return bytes(buf) if got == len(buf) else bytes(buf[:got])

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
        if self._s3:
            from fsspec.asyn import sync

            _prefault(view)
            return int(sync(self.fs.loop, self._s3_read_into, path, view, offset))
        if len(view) <= self._range:
            data = self.fs.cat_file(path, start=offset or None, end=offset + len(view))
            n = min(len(data), len(view))
            view[:n] = data[:n]
            return n
        return self._ranged_into(path, view, offset)

    async def _s3_read_into(self, path: str, view: memoryview, offset: int) -> int:
        """fsspec's loop thread: ranged GETs of ``range_bytes`` each, at most
        ``max_concurrency`` in flight, every body streamed into its part of ``view``."""
        bucket, key, version = self.fs.split_path(path)
        extra = {"VersionId": version} if version else {}
        limit = asyncio.Semaphore(self._concurrency)

        async def one(start: int) -> int:
            part = view[start : start + self._range]
            first = offset + start
            async with limit:
                try:
                    resp = await self.fs._call_s3(
                        "get_object",
                        Bucket=bucket,
                        Key=key,
                        Range=f"bytes={first}-{first + len(part) - 1}",
                        **extra,
                    )
                except Exception as exc:
                    if _is_invalid_range(exc):  # starts at or past the end of the object
                        return 0
                    raise
                if first and not resp.get("ContentRange"):
                    raise StorageError(errno.EIO, f"get {path}: the server ignored the Range header")
                body = resp["Body"]
                got = 0
                try:
                    while got < len(part):
                        n = await body.readinto(part[got:])
                        if not n:
                            break
                        got += n
                finally:
                    body.close()
                return got

        if len(view) <= self._range:
            return await one(0)
        starts = range(0, len(view), self._range)
        try:
            # a failed range cancels the others: nothing writes into ``view`` after we return
            async with asyncio.TaskGroup() as tg:
                tasks = [tg.create_task(one(s)) for s in starts]
        except BaseExceptionGroup as group:
            raise _pick(group)  # noqa: B904 (keeps its own cause: the S3 error)
        total = 0
        for s, t in zip(starts, tasks, strict=True):
            if t.result():
                total = s + t.result()  # ranges past the end read nothing; the last one is short
        return total

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
                self.fs.ls(base, detail=True, refresh=True) if self._s3 else self.fs.ls(base, detail=True)
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
