"""Reading from a tier: one record with a size bound (:func:`read_record`), the chunks of a
shard into memory, each checked against its checksum (:func:`fetch_chunks`), and chunks
already in memory checked, optionally copied out as they are read (:func:`verify_chunks`).

Any thread may call these; the pools they are given run the reads and checksums.  Every read
of a persistent tier goes through the retrying store.
"""

from __future__ import annotations

import bisect
import ctypes
import dataclasses
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Executor

import xxhash

from flashckpt import _hooks as hooks
from flashckpt._config import Options
from flashckpt.errors import CorruptCheckpointError
from flashckpt.format import CODEC_RAW, MAX_RECORD_BYTES, UNSEALED, ChunkEntry, Manifest, checksum
from flashckpt.storage import Backend
from flashckpt.transfer.codec import decode
from flashckpt.transfer.futures import run_all
from flashckpt.transfer.store import retrying

_PIECE = 1 << 20  # checksum-and-copy granularity: stays in cache between the two


def read_record(be: Backend, key: str, what: str, opts: Options) -> bytes:
    """A record (manifest or commit record), read with a length limit: an object larger than
    any record is refused without being read whole."""
    # The size first: an object store backend reads a ranged GET into a buffer of the length
    # asked for, so the bound passed to ``get`` must be the object's size, not the limit.
    size = retrying(be, opts).head(key)
    if size > MAX_RECORD_BYTES:
        raise CorruptCheckpointError(f"{what}: {size} bytes, larger than any record ({MAX_RECORD_BYTES})")
    return retrying(be, opts).get(key, length=size)  # (replaced meanwhile: the
    # record's trailer does not match)


@hooks.timed("time.restore.fetch")
def fetch_chunks(
    be: Backend,
    m: Manifest,
    dest: Callable[[int, int], memoryview],
    pool: Executor,
    opts: Options,
) -> None:
    """Read every chunk of ``m`` from ``be`` into ``dest(offset, nbytes)`` and verify it.
    Returns, or raises the first failure, only once no read is still writing into ``dest``."""
    store = retrying(be, opts)

    def one(i: int) -> None:
        c = m.chunks[i]
        view = dest(c.offset, c.nbytes)
        # raw chunks land in place; encoded ones go through a buffer of their stored size
        into = view if c.codec == CODEC_RAW else memoryview(bytearray(c.stored_nbytes))
        n = store.get_into(c.key, into, offset=c.at)
        if n != c.stored_nbytes:
            raise CorruptCheckpointError(
                f"chunk {c.key} on {be.url} is truncated ({n} of {c.stored_nbytes} bytes)"
            )
        if c.codec != CODEC_RAW:
            decode(c.codec, into, view)
        if checksum(view) != c.checksum:
            raise CorruptCheckpointError(f"chunk {c.key} on {be.url} fails its checksum")

    run_all(pool, one, range(len(m.chunks)))  # never returns with a read still writing


@hooks.timed("time.restore.verify")
def verify_chunks(
    m: Manifest,
    view: Callable[[int, int], memoryview],
    pool: Executor,
    where: str,
    *,
    base: int = 0,
    fills: Sequence[tuple[int, int, int]] = (),
    readv: Callable[[int, list[memoryview]], int] | None = None,
) -> Manifest:
    """Verify chunks that are already in memory (the memory tier); return the manifest with
    every checksum filled in (unsealed chunks are checksummed, not verified).

    ``fills`` (sorted ``(start, end, dst_address)`` byte ranges of the shard, memory at
    ``base``) are copied out while each chunk is checksummed, piece by cache-sized piece, so
    the bytes are read from memory once instead of twice.  With ``readv(offset, buffers)``
    (a ``preadv`` of the slot file), each piece is read straight into its destinations (and
    a scratch buffer for the bytes between them) and checksummed there: a slot an earlier
    process left, not yet mapped in, then costs no page faults.  If a chunk then fails, those
    destinations hold a mix of bytes: the caller must treat them as overwritten (no copy is
    still running by the time this raises).
    """
    starts = [f[0] for f in fills]

    def one(c: ChunkEntry) -> ChunkEntry:
        if not fills:
            digest = checksum(view(c.at, c.stored_nbytes))
        elif readv is not None:
            digest = _digest_read(c, readv, _pieces(c, fills, starts), where)
        else:
            digest = _digest_copied(view, base, _pieces(c, fills, starts))
        if c.checksum == UNSEALED:
            return dataclasses.replace(c, checksum=digest)
        if digest != c.checksum:
            raise CorruptCheckpointError(f"chunk at {c.at} of {c.key} in {where} fails its checksum")
        return c

    return m.with_chunks(run_all(pool, one, m.chunks))  # no copy still running once it raises


Pieces = Iterator[tuple[int, int, list[tuple[int, int, int]]]]


def _pieces(c: ChunkEntry, fills: Sequence[tuple[int, int, int]], starts: list[int]) -> Pieces:
    """Chunk ``c``'s bytes in cache-sized pieces ``[p, q)``, each with the parts of ``fills``
    it covers: ``(lo, hi, destination address of lo)``, in order."""
    end = c.at + c.stored_nbytes
    j = max(0, bisect.bisect_right(starts, c.at) - 1)
    for p in range(c.at, end, _PIECE):
        q = min(p + _PIECE, end)
        while j < len(fills) and fills[j][1] <= p:
            j += 1
        parts, k = [], j
        while k < len(fills) and fills[k][0] < q:
            lo, hi = max(p, fills[k][0]), min(q, fills[k][1])
            if lo < hi:
                parts.append((lo, hi, fills[k][2] + (lo - fills[k][0])))
            k += 1
        yield p, q, parts


def _digest_copied(view: Callable[[int, int], memoryview], base: int, pieces: Pieces) -> str:
    """Checksum each piece where it is mapped (at ``base``) and copy the fills it covers."""
    h = xxhash.xxh3_128()
    for p, q, parts in pieces:
        h.update(view(p, q - p))
        for lo, hi, dst in parts:
            ctypes.memmove(dst, base + lo, hi - lo)
    return h.hexdigest()


def _digest_read(
    c: ChunkEntry, readv: Callable[[int, list[memoryview]], int], pieces: Pieces, where: str
) -> str:
    """Read each piece with ``readv`` straight into the fills it covers (a scratch buffer for
    the bytes between them) and checksum it there."""
    h = xxhash.xxh3_128()
    scratch = memoryview(bytearray(min(_PIECE, c.stored_nbytes)))
    for p, q, parts in pieces:
        bufs: list[memoryview] = []
        cur = p
        for lo, hi, dst in parts:
            if lo > cur:
                bufs.append(scratch[cur - p : lo - p])
            bufs.append(memoryview((ctypes.c_char * (hi - lo)).from_address(dst)).cast("B"))
            cur = hi
        if cur < q:
            bufs.append(scratch[cur - p : q - p])
        n = readv(p, bufs)
        if n != q - p:
            raise CorruptCheckpointError(f"slot of {where} is truncated at byte {p + n}")
        for b in bufs:
            h.update(b)
    return h.hexdigest()
