"""The backend conformance suite: what the engine relies on from every backend.

Every backend the engine writes a tier through must pass all of it: whole objects replaced
atomically (and ``exclusive`` puts refused when the object exists, if the backend says it
can), ranged and bounded reads that never allocate more than the object holds, the typed
errors (``ObjectNotFound``), listings and children with prefixes, safe keys only, and
concurrent puts.  See :mod:`flashckpt.testing` for how to run it against a backend.
"""

from __future__ import annotations

import mmap
import os
import threading
import time
import tracemalloc

import pytest

from flashckpt.errors import ObjectNotFound, StorageError
from flashckpt.storage.protocol import Backend, check_key

#: Keys the key grammar refuses: every backend refuses to put them (``ValueError``).
UNSAFE_KEYS = [
    "../x",
    "a/../b",
    "/abs",
    "a//b",
    "",
    ".",
    "a/./b",
    "a\\b",
    "a\x00b",
    "x" * 300,
    ".hidden",
    "a/",
]


class BackendConformance:
    """Subclass with a ``backend`` fixture yielding a fresh, empty backend (see the module
    docstring).  Each test uses a few MiB at most."""

    def test_put_get_roundtrip_and_ranges(self, backend: Backend) -> None:
        data = os.urandom(3 << 20) + b"tail"  # > 1 MiB: exercises the O_DIRECT path + unaligned tail
        backend.put("a/b/c", data)
        assert backend.get("a/b/c") == data
        assert backend.get("a/b/c", offset=5, length=10) == data[5:15]
        assert backend.get("a/b/c", offset=len(data) - 4) == b"tail"
        assert backend.head("a/b/c") == len(data)
        buf = bytearray(1000)
        assert backend.get_into("a/b/c", memoryview(buf), offset=100) == 1000
        assert bytes(buf) == data[100:1100]
        big = bytearray(len(data) + 50)
        assert backend.get_into("a/b/c", memoryview(big)) == len(data)  # short object: fewer bytes

    def test_put_from_aligned_writable_memory(self, backend: Backend) -> None:
        m = mmap.mmap(-1, 4 << 20)
        m[:] = os.urandom(4 << 20)
        view = memoryview(m)
        backend.put("x", view[: (2 << 20) + 123])
        assert backend.get("x") == m[: (2 << 20) + 123]
        backend.put("y", [view[:10], b"-", view[10:20]])  # several buffers, concatenated
        assert backend.get("y") == m[:10] + b"-" + m[10:20]
        view.release()
        m.close()

    def test_put_replaces_atomically_and_exclusive(self, backend: Backend) -> None:
        backend.put("k", b"old")
        backend.put("k", b"new")
        assert backend.get("k") == b"new"
        if backend.capabilities.exclusive_create:
            with pytest.raises(FileExistsError):
                backend.put("k", b"again", exclusive=True)
            assert backend.get("k") == b"new"
            backend.put("fresh", b"1", exclusive=True)
            assert backend.get("fresh") == b"1"

    def test_missing_keys(self, backend: Backend) -> None:
        with pytest.raises(ObjectNotFound) as ei:
            backend.get("nope")
        assert isinstance(ei.value, FileNotFoundError) and isinstance(ei.value, StorageError)
        with pytest.raises(ObjectNotFound):
            backend.head("nope/x")
        with pytest.raises(ObjectNotFound):
            backend.get_into("nope", memoryview(bytearray(1)))
        with pytest.raises(ObjectNotFound):
            backend.modified("nope")
        backend.delete("nope")  # idempotent
        backend.delete_prefix("nope/")
        assert backend.list("nope") == []
        assert backend.children("nope/") == []

    def test_modified_is_the_time_of_the_last_write(self, backend: Backend) -> None:
        # object stores keep whole seconds and their clock is not ours: a generous window
        before = time.time()
        backend.put("m/a", b"x")
        first = backend.modified("m/a")
        assert before - 120 <= first <= time.time() + 120
        time.sleep(1.1)
        backend.put("m/a", b"y")  # a write again is newer: gc's grace period starts over
        assert backend.modified("m/a") > first

    def test_list_children_delete(self, backend: Backend) -> None:
        for k in ["s/1/a", "s/1/b", "s/2/a", "t", "s10"]:
            backend.put(k, k.encode())
        assert backend.list("s/") == ["s/1/a", "s/1/b", "s/2/a"]
        assert backend.list("s") == ["s/1/a", "s/1/b", "s/2/a", "s10"]
        assert backend.list("") == ["s/1/a", "s/1/b", "s/2/a", "s10", "t"]
        assert backend.children("") == ["s/", "s10", "t"]
        assert backend.children("s/") == ["1/", "2/"]
        backend.delete("s/2/a")
        assert backend.children("s/") == ["1/"]  # empty parents pruned
        backend.delete_prefix("s/1/")
        assert backend.list("s/") == []
        with pytest.raises(ValueError):
            backend.delete_prefix("s")

    def test_concurrent_puts(self, backend: Backend) -> None:
        payloads = {f"c/{i}": os.urandom(200_000 + i) for i in range(16)}
        threads = [threading.Thread(target=backend.put, args=(k, v)) for k, v in payloads.items()]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        for k, v in payloads.items():
            assert backend.get(k) == v
        assert len(backend.list("c/")) == 16

    def test_a_put_leaves_only_its_object(self, backend: Backend) -> None:
        backend.put("a/b", b"x" * 10)
        assert backend.list("") == ["a/b"]
        assert backend.children("a/") == ["b"]

    @pytest.mark.parametrize("key", UNSAFE_KEYS)
    def test_unsafe_keys_are_refused(self, backend: Backend, key: str) -> None:
        with pytest.raises(ValueError):
            check_key(key)
        with pytest.raises(ValueError):
            backend.put(key, b"x")

    def test_reads_at_and_past_the_end(self, backend: Backend) -> None:
        backend.put("a", b"0123456789")
        assert backend.get_into("a", memoryview(bytearray(5)), offset=8) == 2
        assert backend.get_into("a", memoryview(bytearray(5)), offset=10) == 0
        assert backend.get_into("a", memoryview(bytearray(5)), offset=20) == 0
        assert backend.get("a", offset=20, length=3) == b""
        backend.put("empty", b"")
        assert backend.get("empty") == b""
        assert backend.get_into("empty", memoryview(bytearray(5))) == 0

    def test_get_with_a_length_reads_at_most_that_many_bytes(self, backend: Backend) -> None:
        """Callers bound a record by asking for ``limit + 1`` bytes: every backend returns at
        most that many, and never allocates the bound for a smaller object."""
        data = os.urandom((3 << 20) + 5)
        backend.put("big", data)
        assert backend.get("big", length=1000) == data[:1000]
        assert backend.get("big", offset=7, length=1 << 20) == data[7 : 7 + (1 << 20)]
        limit = 1 << 30
        assert backend.get("big", length=limit + 1) == data  # a bound beyond the object: all of it
        assert backend.get("big", offset=len(data) - 3, length=limit + 1) == data[-3:]
        backend.put("record", b"r" * 100)
        tracemalloc.start()
        try:
            assert backend.get("record", length=limit + 1) == b"r" * 100
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
        assert peak < 16 << 20, peak
        for bad in ({"offset": -1}, {"length": -1}):
            with pytest.raises(ValueError):
                backend.get("record", **bad)
