"""S3 through s3fs, without copies: the part of :class:`~flashckpt.backends.FsspecBackend`
that only an ``s3://`` file system uses.

:class:`S3Transfer` moves the bytes of one s3fs file system itself, on fsspec's event loop
thread (every method bridges with :func:`fsspec.asyn.sync`; call them from any thread but
that one): ``read_into`` streams the body of a ranged ``GetObject`` straight into the caller's
buffer (``readinto``: no whole-object ``bytes``, no second copy; the buffer's pages are
faulted in first, on the calling thread), and ``put`` sends the caller's buffer as a file
read in place (:class:`_ViewReader`; ``bytes`` would be copied whole twice more on the way,
into fresh page-faulting memory), its CRC32 computed on the calling thread.  One request per
``range_bytes``; above it, parallel ranged GETs and a multipart upload, at most
``max_concurrency`` requests in flight for one call.  An upload that makes no progress for
``read_timeout`` fails (:meth:`S3Transfer._watched`).

Also here: the defaults :class:`FsspecBackend` gives s3fs (:func:`s3_defaults`), and the
tables that classify an S3 error (throttled and 5xx: transient; out of space or quota: full),
judged by exception type and the structured error code and status, never by message text.
Errors leave this module untranslated: ``FsspecBackend`` translates them (``translate``).
"""

from __future__ import annotations

import asyncio
import base64
import ctypes
import errno
import io
import mmap
import time
import zlib
from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import Any

from flashckpt import _platform
from flashckpt.errors import StorageError
from flashckpt.storage.protocol import Buffer

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


def is_full(exc: BaseException) -> bool:
    s3 = _s3_error(exc)
    return s3 is not None and (s3[0] in _FULL_CODES or s3[1] == _INSUFFICIENT_STORAGE)


def is_transient(exc: BaseException) -> bool:
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


def pick(group: BaseExceptionGroup) -> BaseException:
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
    lasting = [e for e in leaves if not isinstance(e, asyncio.CancelledError) and not is_transient(e)]
    return (lasting or leaves)[0]


def _is_invalid_range(exc: BaseException) -> bool:
    s3 = _s3_error(exc)
    return s3 is not None and (s3[0] == "InvalidRange" or s3[1] == 416)


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
        #: ``time.monotonic()`` of the last read or seek: how :meth:`S3Transfer._watched`
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


_PREFAULT_MIN_BYTES = 1 << 20
_prefault_ok = _platform.madvise is not None


def _prefault(view: memoryview) -> None:
    """Fault in the pages of a destination buffer on the calling thread, the GIL released.

    Every S3 body is copied into its destination on fsspec's one event loop thread, holding
    the GIL; in fresh memory each 4 KiB would also take a page fault there, serializing the
    faults of every download behind one thread.  ``MADV_POPULATE_WRITE`` maps the pages in
    without changing a byte; already mapped pages cost a page-table walk.  Best effort: a
    no-op where unsupported (and never again after it fails once).
    """
    global _prefault_ok
    if not _prefault_ok or len(view) < _PREFAULT_MIN_BYTES or view.readonly or not view.c_contiguous:
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
    try:
        _platform.populate_write(first, last - first)
    except OSError:
        _prefault_ok = False  # an old kernel (EINVAL) or memory that cannot be populated


def is_s3(cls: type) -> bool:
    """True if ``cls`` is (a subclass of) s3fs's ``S3FileSystem``."""
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


class S3Transfer:
    """The byte moving of one s3fs file system (see the module docstring).  Thread-safe: any
    thread but fsspec's loop thread calls ``put``, ``get`` and ``read_into`` concurrently."""

    def __init__(self, fs: Any, *, range_bytes: int, max_concurrency: int) -> None:
        self.fs = fs
        self._range = max(1, range_bytes)
        self._part = max(_MIN_PART_BYTES, self._range)
        self._concurrency = max(1, max_concurrency)
        fs.retries = 1  # s3fs's own retry loop around each call (a class default of 5)
        read_timeout = fs.config_kwargs.get("read_timeout", READ_TIMEOUT_S)
        self._stall_s: float | None = None if read_timeout is None else float(read_timeout)

    def put(self, path: str, view: memoryview) -> None:
        """Store ``view`` (bytes, read in place) as the object ``path``; untranslated errors."""
        from fsspec.asyn import sync

        sync(self.fs.loop, self._put, path, view, self._crc32s(view))

    def get(self, path: str, offset: int, length: int) -> bytes:
        """At most ``length`` (> 0) bytes of ``path`` from ``offset``; untranslated errors."""
        from fsspec.asyn import sync

        data: bytes = sync(self.fs.loop, self._get, path, offset, length)
        return data

    def read_into(self, path: str, view: memoryview, offset: int) -> int:
        """Read ``[offset, offset + len(view))`` of ``path`` into ``view``: bytes read (fewer
        when the object is shorter); untranslated errors."""
        from fsspec.asyn import sync

        _prefault(view)
        return int(sync(self.fs.loop, self._read_into, path, view, offset))

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

    async def _put(self, path: str, view: memoryview, sums: Sequence[Mapping[str, str]]) -> None:
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
                raise pick(group)  # noqa: B904 (keeps its own cause: the S3 error)
            parts = [t.result() for t in tasks]
            await call("complete_multipart_upload", MultipartUpload={"Parts": parts}, **ids)
        except BaseException:
            try:  # parts of an upload never completed are stored (and billed) until aborted
                await asyncio.shield(call("abort_multipart_upload", **ids))
            except Exception:  # best effort: the failed part's error is raised below  # noqa: BLE001
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
                except BaseException:  # cancelling: the request's outcome is decided already  # noqa: BLE001
                    pass
            body.release()

    async def _get(self, path: str, offset: int, length: int) -> bytes:
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
            got += await self._read_into(path, view[got:], offset + got)
        # fewer: the object changed meanwhile, or its body ended early
        return bytes(buf) if got == len(buf) else bytes(buf[:got])

    async def _read_into(self, path: str, view: memoryview, offset: int) -> int:
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
            raise pick(group)  # noqa: B904 (keeps its own cause: the S3 error)
        total = 0
        for s, t in zip(starts, tasks, strict=True):
            if t.result():
                total = s + t.result()  # ranges past the end read nothing; the last one is short
        return total
