"""The chunk writer: a staged shard's chunks, checksummed, encoded and put on one tier.

:class:`ChunkWriter` writes the chunks only; which chunks may be referenced again
(``known``), which rank writes a replicated chunk (an :class:`Exchange`), the manifest and
the commit record are the coordination part's.  Its methods run on the persist thread; the
checksums run on the ``flashckpt-hash`` pool and the writes on the ``flashckpt-io`` pool.
Whatever happens, no write still reads the slot once a method returns or raises (the slot is
given back to the stager after it, and a straggler would store the next snapshot's bytes
under this chunk's content address).
"""

from __future__ import annotations

import bisect
import dataclasses
import threading
from collections.abc import Callable, Mapping
from concurrent.futures import CancelledError, Future, InvalidStateError, ThreadPoolExecutor, wait
from typing import Protocol, TypeVar

from flashckpt import _hooks as hooks
from flashckpt._config import Options
from flashckpt.errors import CorruptCheckpointError
from flashckpt.format import ChunkEntry, Manifest, checksum, chunk_key
from flashckpt.transfer.codec import encode
from flashckpt.transfer.futures import run_all, wait_all
from flashckpt.transfer.store import retrying
from flashckpt.transfer.tier import Tier

T = TypeVar("T")


class Exchange(Protocol):
    """The ranks of a job split the writes of a replicated shard: chunk ``i`` is written by
    rank ``owners[i]``, which publishes its entries; the others reference them."""

    owners: list[int]
    rank: int

    def publish(self, mine: Mapping[int, ChunkEntry]) -> None:
        """Publish this rank's entries of the chunks it owns (possibly none).  Never raises."""

    def entry(self, owner: int, i: int, src: ChunkEntry) -> ChunkEntry | None:
        """The owner's entry of chunk ``i``, if it names exactly ``src``'s content; None if
        the owner published none (this rank then writes the chunk itself)."""


class SlotBytes(Protocol):
    """Where a staged snapshot's bytes are read: a :class:`~flashckpt.staging.stager.Slot`,
    or a ``PartsReader`` (chunks held by other ranks of the node read from their slots)."""

    @property
    def name(self) -> str: ...

    def view(self, offset: int, nbytes: int) -> memoryview: ...


class ChunkWriter:
    """Writes chunks of staged shards; persist thread only (the pools are its helpers)."""

    def __init__(self, opts: Options, pool: ThreadPoolExecutor, hash_pool: ThreadPoolExecutor) -> None:
        self.opts = opts
        self.pool = pool
        self.hash_pool = hash_pool

    @hooks.timed("time.persist.hash")
    def hash(self, m: Manifest, slot: SlotBytes) -> Manifest:
        """Memory manifest ``m`` with the checksum of each chunk read from ``slot`` (on the
        I/O pool); every entry otherwise as it was."""
        digests = run_all(self.pool, lambda c: checksum(slot.view(c.offset, c.nbytes)), m.chunks)
        return m.with_chunks(
            dataclasses.replace(c, checksum=d) for c, d in zip(m.chunks, digests, strict=True)
        )

    def write(
        self,
        tier: Tier,
        m: Manifest,
        slot: SlotBytes,
        known: Mapping[str, ChunkEntry],
        *,
        verify: bool = False,
        exchange: Exchange | None = None,
    ) -> tuple[Manifest, int]:
        """Write the chunks of sealed ``m`` that ``known`` does not hold; return ``m`` with the
        tier's entries, and the bytes written.

        ``verify``: ``m``'s checksums were not computed from the slot just now (a salvaged
        snapshot): each chunk is checked before it is written, so damaged bytes are never
        stored, above all not under the content address of good ones.  ``exchange``: the
        ranks split the writes (see :class:`Exchange`); this rank always publishes, even when
        it fails, so that no rank waits out the timeout for it.
        """
        groups = byte_groups(m)
        futures: list[Future[ChunkEntry]] = []
        written: list[Future[ChunkEntry]] = []  # every write reading the slot
        deferred: list[int] = []  # chunks another rank owns: resolved once it has published
        published = [False]  # set by _exchange once this rank has published
        try:
            for i, (src, group) in enumerate(zip(m.chunks, groups, strict=True)):
                hit = known.get(src.checksum)
                if hit is not None and hit.nbytes == src.nbytes:
                    done: Future[ChunkEntry] = Future()
                    done.set_result(dataclasses.replace(hit, offset=src.offset))
                    futures.append(done)
                    continue
                if exchange is not None and exchange.owners[i] != exchange.rank:
                    deferred.append(i)
                    futures.append(Future())
                    continue
                written.append(self.pool.submit(self.put_from, tier, m.step, src, slot, group, verify))
                futures.append(written[-1])
            if exchange is not None:
                self._exchange(exchange, tier, m, slot, futures, written, deferred, groups, published, verify)
            out = m.with_chunks(wait_all(futures))
        except BaseException:
            for f in futures:
                f.cancel()
            wait(written)
            if exchange is not None and not published[0]:
                exchange.publish({})
            raise
        return out, sum(f.result().stored_nbytes for f in written)

    def write_unsealed(
        self,
        tier: Tier,
        m: Manifest,
        slot: SlotBytes,
        known: Mapping[str, ChunkEntry],
        on_sealed: Callable[[Manifest], None],
    ) -> tuple[Manifest, int]:
        """:meth:`write` of a snapshot not yet checksummed.  Chunks are checksummed on the
        hash pool at memory speed; as each checksum is known, the chunk's write (unless
        ``known`` holds its bytes) goes to the I/O pool, so the first writes start after one
        chunk's checksum instead of all of them.  ``on_sealed(sealed manifest)`` is called on
        this thread as soon as every checksum is known, while the writes go on."""
        groups = byte_groups(m)
        digests: list[Future[str]] = [Future() for _ in m.chunks]
        entries: list[Future[ChunkEntry]] = [Future() for _ in m.chunks]
        writes: list[Future[ChunkEntry]] = []
        reused: set[int] = set()
        stop = threading.Event()

        def hash_then_write(i: int, src: ChunkEntry, group: int) -> None:
            """Hash pool: checksum chunk ``i``, then hand its write to the I/O pool.  Settles
            ``digests[i]`` and ``entries[i]`` whatever happens (the persist thread waits)."""
            try:
                d = checksum(slot.view(src.at, src.stored_nbytes))
                _settle(digests[i], d)
                c = dataclasses.replace(src, checksum=d)
                hit = known.get(d)
                if hit is not None and hit.nbytes == c.nbytes:
                    reused.add(i)
                    _settle(entries[i], dataclasses.replace(hit, offset=c.offset))
                elif stop.is_set():  # the tier failed: write nothing more from this slot
                    _settle(entries[i], error=CancelledError())
                else:  # (after interpreter shutdown began, submit raises: settled below)
                    write = self.pool.submit(self.put_from, tier, m.step, c, slot, group)
                    writes.append(write)
                    write.add_done_callback(lambda f: _settle_from(f, entries[i]))
            except BaseException as exc:  # settled into the futures: whoever waits raises it  # noqa: BLE001
                _settle(digests[i], error=exc)
                _settle(entries[i], error=exc)

        tasks: list[Future[None]] = []
        try:
            for i, (src, group) in enumerate(zip(m.chunks, groups, strict=True)):
                tasks.append(self.hash_pool.submit(hash_then_write, i, src, group))
            sealed = m.with_chunks(
                dataclasses.replace(c, checksum=d) for c, d in zip(m.chunks, wait_all(digests), strict=True)
            )
            on_sealed(sealed)
            out = sealed.with_chunks(wait_all(entries))
        except BaseException:
            # The slot goes back to the stager after this: nothing may read it any more.
            stop.set()
            for t in tasks:
                t.cancel()
            wait(tasks)  # every hash task has returned: no write is submitted after this
            for w in writes:
                w.cancel()
            wait(list(writes))
            raise
        return out, sum(e.stored_nbytes for i, e in enumerate(out.chunks) if i not in reused)

    def _exchange(
        self,
        exchange: Exchange,
        tier: Tier,
        m: Manifest,
        slot: SlotBytes,
        futures: list[Future[ChunkEntry]],
        written: list[Future[ChunkEntry]],
        deferred: list[int],
        groups: list[int],
        published: list[bool],
        verify: bool,
    ) -> None:
        """Publish the entries of the chunks this rank owns (what succeeded: the others reuse
        it), then resolve each chunk another rank owns: its owner's entry when it names the
        same content, else (state that is not replicated after all, or an owner that never
        publishes) this rank's own write.  Correctness never rests on the state really being
        replicated; only the bytes saved do."""
        owned = [i for i in range(len(m.chunks)) if exchange.owners[i] == exchange.rank]
        wait([futures[i] for i in owned])  # all of them, even when one fails
        mine = {i: futures[i].result() for i in owned if futures[i].exception() is None}
        exchange.publish(mine)
        published[0] = True
        if len(mine) < len(owned):
            futures[next(i for i in owned if i not in mine)].result()  # raises that chunk's error
        for i in deferred:
            src = m.chunks[i]
            entry = exchange.entry(exchange.owners[i], i, src)
            if entry is not None:
                futures[i].set_result(entry)
                continue
            fut = self.pool.submit(self.put_from, tier, m.step, src, slot, groups[i], verify)
            written.append(fut)
            fut.add_done_callback(lambda f, i=i: _settle_from(f, futures[i]))  # type: ignore[misc]

    def put_from(
        self, tier: Tier, step: int, c: ChunkEntry, slot: SlotBytes, group: int, verify: bool = False
    ) -> ChunkEntry:
        """I/O pool: :meth:`put` chunk ``c`` read from ``slot`` here (a chunk another rank of
        the node holds is read into a buffer now, not when the write was queued: at most
        ``io_threads`` such buffers exist at once)."""
        return self.put(tier, step, c, slot.view(c.at, c.stored_nbytes), group, verify)

    def put(
        self, tier: Tier, step: int, c: ChunkEntry, view: memoryview, group: int, verify: bool = False
    ) -> ChunkEntry:
        """I/O pool: encode one chunk for ``tier`` (if it compresses) and put it at its content
        address.  At most ``io_threads`` encoded buffers exist at once: memory stays bounded.
        ``verify``: check the bytes against ``c.checksum`` first (see :meth:`write`)."""
        if verify and checksum(view) != c.checksum:
            raise CorruptCheckpointError(
                f"step {step}: the chunk at {c.offset} in memory fails its checksum; not written"
            )
        codec, stored = encode(view, group, tier.compression)
        key = chunk_key(c.checksum, codec, len(stored))
        retrying(tier.backend, self.opts).put(key, stored)
        hooks.fire("persist.chunk", step=step, tier=tier.name, key=key)
        return ChunkEntry(key, 0, c.offset, c.nbytes, len(stored), codec, c.checksum)


def byte_groups(m: Manifest) -> list[int]:
    """Per chunk: the element size to byte-group by before zstd (1 = none).  Only chunks
    inside one floating-point tensor are grouped (packs of small tensors are not)."""
    spans = sorted((t.offset, t.offset + t.nbytes, t.dtype) for t in m.tensors if t.nbytes)
    starts = [s[0] for s in spans]
    out = []
    for c in m.chunks:
        i = bisect.bisect_right(starts, c.offset) - 1
        group = 1
        if i >= 0 and c.offset + c.nbytes <= spans[i][1]:
            dtype = spans[i][2]
            if dtype.is_floating_point and dtype.itemsize in (2, 4, 8):
                group = dtype.itemsize
        out.append(group)
    return out


def _settle(dst: Future[T], result: T | None = None, *, error: BaseException | None = None) -> None:
    """Complete ``dst`` unless it is done already (cancelled by a failing wait)."""
    try:
        if error is not None:
            dst.set_exception(error)
        else:
            dst.set_result(result)  # type: ignore[arg-type]
    except InvalidStateError:
        pass


def _settle_from(src: Future[T], dst: Future[T]) -> None:
    """Complete ``dst`` as ``src`` completed (a done-callback of ``src``)."""
    if src.cancelled():
        dst.cancel()
        return
    exc = src.exception()
    if exc is not None:
        _settle(dst, error=exc)
    else:
        _settle(dst, src.result())
