"""The backend conformance suite: every backend must pass all of it."""

from __future__ import annotations

import errno
import os
import threading
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from flashckpt.backends import (
    Backend,
    Fault,
    FaultPlan,
    FaultyBackend,
    FsspecBackend,
    LocalBackend,
    open_backend,
    redact_url,
)
from flashckpt.backends._base import check_key, translate_os_error
from flashckpt.errors import (
    ConfigError,
    ObjectNotFound,
    StorageError,
    StorageFullError,
    StoragePermissionError,
    TransientStorageError,
)


@pytest.fixture(params=["local", "local-buffered", "shm", "faulty-passthrough", "fsspec-memory", "s3"])
def backend(request: pytest.FixtureRequest, tmp_path: Path, shm_dir: Path) -> Iterator[Backend]:
    kind = request.param
    be: Backend
    if kind == "s3":
        s3 = request.getfixturevalue("s3")
        be = FsspecBackend(str(s3["url"]), storage_options=s3["storage_options"])  # type: ignore[arg-type]
    elif kind == "fsspec-memory":
        be = FsspecBackend(f"memory://flashckpt-{uuid.uuid4().hex[:8]}/root")
    elif kind == "local":
        be = LocalBackend(tmp_path / "root")
    elif kind == "local-buffered":
        be = LocalBackend(tmp_path / "root", direct_io=False, fsync=False)
    elif kind == "shm":
        be = LocalBackend(shm_dir, fsync=False, private=True, durable=False)
    else:
        be = FaultyBackend(LocalBackend(tmp_path / "root"), FaultPlan([]))
    yield be
    be.close()


def test_put_get_roundtrip_and_ranges(backend: Backend) -> None:
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


def test_put_from_aligned_writable_memory(backend: Backend) -> None:
    import mmap

    m = mmap.mmap(-1, 4 << 20)
    m[:] = os.urandom(4 << 20)
    view = memoryview(m)
    backend.put("x", view[: (2 << 20) + 123])
    assert backend.get("x") == m[: (2 << 20) + 123]
    backend.put("y", [view[:10], b"-", view[10:20]])  # several buffers, concatenated
    assert backend.get("y") == m[:10] + b"-" + m[10:20]
    view.release()
    m.close()


def test_put_replaces_atomically_and_exclusive(backend: Backend) -> None:
    backend.put("k", b"old")
    backend.put("k", b"new")
    assert backend.get("k") == b"new"
    if backend.capabilities.exclusive_create:
        with pytest.raises(FileExistsError):
            backend.put("k", b"again", exclusive=True)
        assert backend.get("k") == b"new"
        backend.put("fresh", b"1", exclusive=True)
        assert backend.get("fresh") == b"1"


def test_missing_keys(backend: Backend) -> None:
    with pytest.raises(ObjectNotFound) as ei:
        backend.get("nope")
    assert isinstance(ei.value, FileNotFoundError) and isinstance(ei.value, StorageError)
    with pytest.raises(ObjectNotFound):
        backend.head("nope/x")
    with pytest.raises(ObjectNotFound):
        backend.get_into("nope", memoryview(bytearray(1)))
    backend.delete("nope")  # idempotent
    backend.delete_prefix("nope/")
    assert backend.list("nope") == []
    assert backend.children("nope/") == []


def test_list_children_delete(backend: Backend) -> None:
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


def test_concurrent_puts(backend: Backend) -> None:
    payloads = {f"c/{i}": os.urandom(200_000 + i) for i in range(16)}
    threads = [threading.Thread(target=backend.put, args=(k, v)) for k, v in payloads.items()]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for k, v in payloads.items():
        assert backend.get(k) == v
    assert len(backend.list("c/")) == 16


def test_no_temporary_files_left(backend: Backend, tmp_path: Path) -> None:
    backend.put("a/b", b"x" * 10)
    inner = getattr(backend, "inner", backend)
    if isinstance(inner, LocalBackend):
        assert [p.name for p in Path(inner.root).rglob("*") if p.is_file()] == ["b"]
    assert backend.list("") == ["a/b"]


@pytest.mark.parametrize(
    "key", ["../x", "a/../b", "/abs", "a//b", "", ".", "a/./b", "a\\b", "a\x00b", "x" * 300, ".hidden", "a/"]
)
def test_unsafe_keys_are_refused(backend: Backend, key: str) -> None:
    with pytest.raises(ValueError):
        check_key(key)
    with pytest.raises(ValueError):
        backend.put(key, b"x")


def test_private_backend_modes(shm_dir: Path) -> None:
    be = LocalBackend(shm_dir, private=True, fsync=False)
    be.put("d/f", b"x")
    assert (shm_dir / "d" / "f").stat().st_mode & 0o077 == 0
    assert (shm_dir / "d").stat().st_mode & 0o077 == 0


def test_error_translation() -> None:
    cases = [
        (FileNotFoundError(errno.ENOENT, "x"), ObjectNotFound, False),
        (OSError(errno.ENOSPC, "full"), StorageFullError, False),
        (PermissionError(errno.EACCES, "no"), StoragePermissionError, False),
        (OSError(errno.ECONNRESET, "reset"), TransientStorageError, True),
        (TimeoutError("slow"), TransientStorageError, True),
        (OSError(errno.EIO, "io"), StorageError, False),
    ]
    for exc, kind, retryable in cases:
        err = translate_os_error(exc, "put k")
        assert type(err) is kind and err.retryable is retryable and err.__cause__ is exc


def test_fault_plan_counts_and_fires() -> None:
    plan = FaultPlan([Fault(op="put", key_contains="c/", after=1, times=2, error=TransientStorageError)])
    fired = [plan.match("put", "c/1") is not None for _ in range(5)]
    assert fired == [False, True, True, False, False]
    assert plan.match("get", "c/1") is None and plan.match("put", "d/1") is None


def test_open_backend_and_redaction(tmp_path: Path) -> None:
    assert isinstance(open_backend(tmp_path), LocalBackend)
    assert isinstance(open_backend(f"file://{tmp_path}"), LocalBackend)
    with pytest.raises(ConfigError):
        open_backend("file://otherhost/x")
    with pytest.raises(ConfigError) as ei:
        open_backend("weird://user:secret@host/x")
    assert "secret" not in str(ei.value)
    assert redact_url("s3://AKIA:SECRET@bucket/x") == "s3://***@bucket/x"
