"""The backend conformance suite: every backend must pass all of it."""

from __future__ import annotations

import errno
import os
import socket
import stat
import subprocess
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

import flashckpt
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
from flashckpt.errors import (
    ConfigError,
    ObjectNotFound,
    StorageError,
    StorageFullError,
    StoragePermissionError,
    TransientStorageError,
)
from flashckpt.storage.protocol import translate_os_error
from flashckpt.testing import BackendConformance
from tests.conftest import make_state

BACKENDS = ["local", "local-buffered", "shm", "faulty-passthrough", "fsspec-memory", "s3"]


@pytest.fixture(params=BACKENDS)
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


class TestConformance(BackendConformance):
    """The shipped conformance suite (flashckpt.testing), derived for every backend above
    through the module's ``backend`` fixture."""


def test_no_temporary_files_left(backend: Backend, tmp_path: Path) -> None:
    """Beyond the listing (the suite's ``test_a_put_leaves_only_its_object``): on disk."""
    backend.put("a/b", b"x" * 10)
    inner = getattr(backend, "inner", backend)
    if isinstance(inner, LocalBackend):
        assert [p.name for p in Path(inner.root).rglob("*") if p.is_file()] == ["b"]


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


def _s3_client(s3: dict[str, object]) -> Any:
    import boto3

    return boto3.client(
        "s3",
        endpoint_url=str(s3["endpoint"]),
        region_name="us-east-1",
        aws_access_key_id="testing",
        aws_secret_access_key="testing",
    )


def test_s3_large_objects_go_in_parts_and_come_back_in_ranges(s3: dict[str, object]) -> None:
    """Above ``range_bytes`` a put is a multipart upload and a read is parallel ranged GETs,
    each streamed into its slice of the caller's buffer."""
    part = 5 << 20  # S3's smallest part
    be = FsspecBackend(str(s3["url"]), storage_options=s3["storage_options"], range_bytes=part)  # type: ignore[arg-type]
    try:
        data = os.urandom(2 * part + 12345)
        be.put("big", memoryview(data))
        etag = _s3_client(s3).head_object(Bucket=s3["bucket"], Key="run/big")["ETag"]
        assert etag.strip('"').endswith("-3")  # three parts
        buf = bytearray(len(data) + 100)
        assert be.get_into("big", memoryview(buf)) == len(data)
        assert bytes(buf[: len(data)]) == data
        assert be.get("big", offset=part - 7, length=part + 14) == data[part - 7 : 2 * part + 7]
        tail = bytearray(2 * part)  # from inside the second part to past the end
        assert be.get_into("big", memoryview(tail), offset=part + 1) == len(data) - part - 1
        assert bytes(tail[: len(data) - part - 1]) == data[part + 1 :]
        be.put("list", [memoryview(data)[:part], b"+", memoryview(data)[part:]])
        assert be.get("list") == data[:part] + b"+" + data[part:]
    finally:
        be.close()


def test_s3_a_failed_multipart_upload_is_aborted(s3: dict[str, object]) -> None:
    """A part that fails fails the put with a retryable error, and the upload is aborted:
    no parts are left stored (and billed) on the server."""
    from tests.s3proxy import FaultProxy, ProxyFault, ProxyPlan

    plan = ProxyPlan([ProxyFault("PUT", "partNumber=2", "500", times=1)])
    proxy = FaultProxy(str(s3["endpoint"]), plan)
    opts = {**s3["storage_options"], "endpoint_url": proxy.url}  # type: ignore[dict-item]
    be = FsspecBackend(str(s3["url"]), storage_options=opts, range_bytes=5 << 20)
    try:
        data = os.urandom(11 << 20)
        with pytest.raises(TransientStorageError):
            be.put("big", data)
        assert plan.fired == 1
        uploads = _s3_client(s3).list_multipart_uploads(Bucket=s3["bucket"])
        assert uploads.get("Uploads", []) == []
        with pytest.raises(ObjectNotFound):
            be.head("big")
        be.put("big", data)  # the fault is spent
        assert be.get("big") == data
    finally:
        be.close()
        proxy.close()


def test_s3_timeouts_and_retries_are_explicit_and_overridable(s3: dict[str, object]) -> None:
    from flashckpt.backends.s3 import CONNECT_TIMEOUT_S, READ_TIMEOUT_S, s3_defaults

    opts = s3_defaults({"key": "k", "config_kwargs": {"read_timeout": 99}}, max_concurrency=16)
    assert opts["key"] == "k"
    assert opts["config_kwargs"] == {
        "connect_timeout": CONNECT_TIMEOUT_S,
        "read_timeout": 99,
        "max_pool_connections": 16,
        "retries": {"max_attempts": 0},
        "response_checksum_validation": "when_required",
    }
    be = FsspecBackend(str(s3["url"]), storage_options=s3["storage_options"])  # type: ignore[arg-type]
    try:
        config = be.fs.config_kwargs
        assert config["connect_timeout"] == CONNECT_TIMEOUT_S and config["read_timeout"] == READ_TIMEOUT_S
        retries = config["retries"]  # botocore rewrites it as total_max_attempts once connected
        assert retries.get("total_max_attempts", retries.get("max_attempts", 0) + 1) == 1
        assert be.fs.retries == 1  # one attempt inside s3fs and botocore: the transfer layer retries
        be.put("k", b"v")
        assert be.get("k") == b"v"
    finally:
        be.close()


def test_object_store_errors_are_translated_by_code_and_status() -> None:
    from botocore.exceptions import ClientError, ReadTimeoutError

    from flashckpt.backends.fsspec import translate

    def client_error(code: str, status: int) -> ClientError:
        return ClientError(
            {"Error": {"Code": code}, "ResponseMetadata": {"HTTPStatusCode": status}}, "PutObject"
        )

    cases: list[tuple[BaseException, type[StorageError]]] = [
        (client_error("XMinioStorageFull", 507), StorageFullError),
        (client_error("SomethingNew", 507), StorageFullError),  # 507 is never transient
        (client_error("QuotaExceeded", 403), StorageFullError),
        (client_error("XMinioAdminBucketQuotaExceeded", 400), StorageFullError),
        (client_error("EntityTooLarge", 400), StorageFullError),
        (client_error("SlowDown", 503), TransientStorageError),
        (client_error("InternalError", 500), TransientStorageError),
        (ReadTimeoutError(endpoint_url="http://x"), TransientStorageError),
        (TimeoutError("no progress"), TransientStorageError),
    ]
    for exc, kind in cases:
        err = translate(exc, "put k")
        assert type(err) is kind, (exc, err)
        assert err.retryable is (kind is TransientStorageError)
        wrapped = OSError(errno.EIO, "s3fs's translation")  # what s3fs raises, the ClientError as cause
        wrapped.__cause__ = exc
        assert type(translate(wrapped, "put k")) is kind
    full = translate(client_error("XMinioStorageFull", 507), "put k")
    assert full.errno == errno.ENOSPC and isinstance(full, StorageError)


def test_s3_puts_carry_the_crc32_botocore_would_send(s3: dict[str, object]) -> None:
    """The backend computes each body's CRC32 off the event loop; S3 must store the same
    checksum as for the same bytes put by boto3 (moto does not verify it, so compare)."""
    client = _s3_client(s3)
    be = FsspecBackend(str(s3["url"]), storage_options=s3["storage_options"], range_bytes=5 << 20)  # type: ignore[arg-type]
    try:
        for size in (0, 1, 3 << 20):
            data = os.urandom(size)
            client.put_object(Bucket=s3["bucket"], Key="run/ref", Body=data)
            be.put("mine", data)
            sums = [
                client.head_object(Bucket=s3["bucket"], Key=k, ChecksumMode="ENABLED").get("ChecksumCRC32")
                for k in ("run/ref", "run/mine")
            ]
            assert sums[0] is not None and sums[0] == sums[1], size
    finally:
        be.close()


def test_sweep_removes_the_temporary_files_of_killed_writers_only(tmp_path: Path) -> None:
    be = LocalBackend(tmp_path / "tier")
    be.put("commits/step-000000000003", b"record")
    d = tmp_path / "tier" / "commits"
    dead = subprocess.Popen(["true"])  # a pid that has exited
    dead.wait()
    host = socket.gethostname()
    names = {
        "dead": f"step-000000000004.tmp-{host}-{dead.pid}-0",  # a writer of this host, gone
        "live": f"step-000000000005.tmp-{host}-{os.getpid()}-0",  # this process: in flight
        "remote": "step-000000000006.tmp-otherhost-123-0",  # another host: only age tells
        "remote_old": "step-000000000007.tmp-otherhost-123-1",
    }
    for name in names.values():
        (d / name).write_bytes(b"partial")
    old = time.time() - 3600
    os.utime(d / names["remote_old"], (old, old))
    assert be.list("commits/") == ["commits/step-000000000003"]  # listings never show them
    assert be.sweep_temps(600) == 2
    assert sorted(p.name for p in d.iterdir()) == sorted(
        ["step-000000000003", names["live"], names["remote"]]
    )


def test_a_restore_sweeps_what_a_killed_writer_left(tmp_path: Path, shm_dir: Path) -> None:
    state = make_state()
    with flashckpt.Checkpointer(tmp_path / "s", local_dir=tmp_path / "l", memory_dir=shm_dir) as ckpt:
        ckpt.save(0, state)
    dead = subprocess.Popen(["true"])
    dead.wait()
    left = [
        tmp_path / tier / "commits" / f"step-000000000001.tmp-{socket.gethostname()}-{dead.pid}-7"
        for tier in ("s", "l")
    ]
    for p in left:
        p.write_bytes(b"half a commit record")
    with flashckpt.Checkpointer(tmp_path / "s", local_dir=tmp_path / "l", memory_dir=shm_dir) as ckpt:
        assert ckpt.restore(make_state()) == 0
    assert not any(p.exists() for p in left)


# -- records read with a bound (L3) -------------------------------------------------------


# -- the memory tier's backend is private (H3) -------------------------------------------


def test_private_backend_creates_every_directory_0700_and_files_0600(shm_dir: Path) -> None:
    root = shm_dir / "job" / "r00000-of-00001"
    be = LocalBackend(root, private=True, fsync=False)
    be.put("mirrors/r00001-of-00002/step-000000000001.manifest", b"m")
    for d in (shm_dir, shm_dir / "job", root, root / "mirrors", root / "mirrors" / "r00001-of-00002"):
        assert stat.S_IMODE(os.lstat(d).st_mode) == 0o700, d
    f = root / "mirrors" / "r00001-of-00002" / "step-000000000001.manifest"
    assert stat.S_IMODE(os.lstat(f).st_mode) == 0o600


def test_private_backend_never_follows_a_planted_link(shm_dir: Path, tmp_path: Path) -> None:
    be = LocalBackend(shm_dir, private=True, fsync=False)
    be.put("step-000000000001.manifest", b"ours")
    victim = tmp_path / "victim"
    victim.write_bytes(b"precious")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "step-000000000003.manifest").write_bytes(b"theirs")
    (shm_dir / "step-000000000002.manifest").symlink_to(victim)
    (shm_dir / "mirrors").symlink_to(elsewhere)
    for key in ("step-000000000002.manifest", "mirrors/step-000000000003.manifest"):
        for call in (
            lambda k: be.get(k),
            lambda k: be.get(k, length=3),
            lambda k: be.head(k),
            lambda k: be.get_into(k, memoryview(bytearray(8))),
        ):
            with pytest.raises(StoragePermissionError, match="symbolic link") as ei:
                call(key)
            assert key in str(ei.value)
    with pytest.raises(StoragePermissionError, match="symbolic link"):
        be.put("mirrors/x", b"planted dir")  # a directory on the way: refused, not followed
    be.put("step-000000000002.manifest", b"replaced")  # the link itself is replaced
    assert victim.read_bytes() == b"precious"
    assert sorted(p.name for p in elsewhere.iterdir()) == ["step-000000000003.manifest"]
    assert not (shm_dir / "step-000000000002.manifest").is_symlink()
    assert be.get("step-000000000002.manifest") == b"replaced"
    assert be.get("step-000000000001.manifest") == b"ours"


@pytest.mark.skipif(os.geteuid() != 0, reason="making a file of another owner needs root")
def test_private_backend_refuses_files_of_another_owner(shm_dir: Path) -> None:
    be = LocalBackend(shm_dir, private=True, fsync=False)
    be.put("step-000000000001.manifest", b"planted")
    os.chown(shm_dir / "step-000000000001.manifest", 65534, 65534)
    with pytest.raises(StoragePermissionError, match="owned by uid 65534"):
        be.get("step-000000000001.manifest")


# -- the temporary-file sweeper stays in flashckpt's key space (M6) --------------------------


def test_sweep_never_touches_user_files(tmp_path: Path) -> None:
    root = tmp_path / "tier"
    be = LocalBackend(root)
    be.put("commits/step-000000000003", b"record")
    dead = subprocess.Popen(["true"])
    dead.wait()
    host = socket.gethostname()
    ours = [
        f"commits/step-000000000004.tmp-{host}-{dead.pid}-0",
        f"steps/000000000004/r00000-of-00001.manifest.tmp-{host}-{dead.pid}-1",
        f"chunks/ab/{'ab' * 16}.raw.tmp-otherhost-77-2",  # another host, old
    ]
    users = [
        "report.tmp-final.docx",
        "notes/draft.tmp-v2",
        f"notes/step.tmp-{host}-{dead.pid}-0",  # the exact pattern, but not flashckpt's directory
        f"backup.tmp-{host}-{dead.pid}-0",
        "commits/report.tmp-final.docx",  # flashckpt's directory, but not a name put makes
        f"commits/step.tmp-{host}-{dead.pid}",
        f"steps/x.tmp-{host}-{dead.pid}-y",
        "chunks/ab/draft.tmp-v2",
    ]
    old = time.time() - 3600
    for rel in ours + users:
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(b"x")
        os.utime(root / rel, (old, old))
    assert be.sweep_temps(60) == len(ours)
    assert all((root / rel).exists() for rel in users)
    assert not any((root / rel).exists() for rel in ours)
    assert be.get("commits/step-000000000003") == b"record"


def test_a_restore_leaves_user_files_in_the_storage_directory(tmp_path: Path, shm_dir: Path) -> None:
    state = make_state()
    storage = tmp_path / "s"
    with flashckpt.Checkpointer(storage, memory_dir=shm_dir) as ckpt:
        ckpt.save(0, state)
    users = [storage / "report.tmp-final.docx", storage / "notes" / "draft.tmp-v2"]
    old = time.time() - 3600
    for p in users:
        p.parent.mkdir(exist_ok=True)
        p.write_bytes(b"mine")
        os.utime(p, (old, old))
    with flashckpt.Checkpointer(storage, memory_dir=shm_dir) as ckpt:
        assert ckpt.restore(make_state()) == 0
    assert all(p.read_bytes() == b"mine" for p in users)


@pytest.mark.parametrize("empty", ["", "  ", "file://"])
def test_an_empty_storage_path_is_refused(empty: str, shm_dir: Path) -> None:
    with pytest.raises(ConfigError, match="empty path"):
        open_backend(empty)
    with pytest.raises(ConfigError, match="empty path"):
        flashckpt.Checkpointer(empty, memory_dir=shm_dir)
    if "://" not in empty:
        with pytest.raises(ConfigError, match="empty path"):
            LocalBackend(empty)
    assert not shm_dir.exists()


# -- directories are durable before a put returns (L4) -----------------------------------


class _Recorder:
    """Records the calls that make a put durable, in order, by path (fds through /proc)."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.events: list[tuple[str, str]] = []
        real_fsync, real_replace, real_link, real_mkdir = os.fsync, os.replace, os.link, os.mkdir

        def fsync(fd: int) -> None:
            real_fsync(fd)
            self.events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))

        def replace(src: Any, dst: Any, **kw: Any) -> None:
            real_replace(src, dst, **kw)
            self.events.append(("rename", os.fspath(dst)))

        def link(src: Any, dst: Any, **kw: Any) -> None:
            real_link(src, dst, **kw)
            self.events.append(("rename", os.fspath(dst)))

        def mkdir(path: Any, mode: int = 0o777, **kw: Any) -> None:
            real_mkdir(path, mode, **kw)
            self.events.append(("mkdir", os.fspath(path)))

        monkeypatch.setattr(os, "fsync", fsync)
        monkeypatch.setattr(os, "replace", replace)
        monkeypatch.setattr(os, "link", link)
        monkeypatch.setattr(os, "mkdir", mkdir)

    def index(self, kind: str, path: Path | str, pred: Any = None) -> int:
        hits = [
            i
            for i, e in enumerate(self.events)
            if e[0] == kind and (pred or (lambda p: p == str(path)))(e[1])
        ]
        assert hits, (kind, str(path), self.events)
        return hits[0]


@pytest.mark.skipif(not Path("/proc/self/fd").is_dir(), reason="needs /proc to name fds")
@pytest.mark.parametrize("exclusive", [False, True])
def test_put_makes_data_name_and_new_directories_durable_in_order(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, exclusive: bool
) -> None:
    root = tmp_path / "new" / "tier"
    be = LocalBackend(root, direct_io=False)
    rec = _Recorder(monkeypatch)
    key = "chunks/ab/" + "ab" * 16 + ".raw"
    be.put(key, b"x" * 5000, exclusive=exclusive)
    final = root / key
    tmp_fsync = rec.index("fsync", "", lambda p: p.startswith(f"{final}.tmp-"))
    renamed = rec.index("rename", final)
    assert tmp_fsync < renamed, "the data must be durable before its name appears"
    assert rec.index("fsync", final.parent) > renamed, "the new entry must be fsynced in its directory"
    for d in (tmp_path / "new", root, root / "chunks", root / "chunks" / "ab"):
        made = rec.index("mkdir", d)
        assert rec.index("fsync", d.parent) > made, f"{d} is not fsynced in its parent"
    assert all(i < len(rec.events) for i in (tmp_fsync, renamed))
    # a second object in the same directory: no directory work again, same order for the file
    rec.events.clear()
    be.put("chunks/ab/" + "cd" * 16 + ".raw", b"y", exclusive=exclusive)
    assert [e[0] for e in rec.events] == ["fsync", "rename", "fsync"]


@pytest.mark.skipif(not Path("/proc/self/fd").is_dir(), reason="needs /proc to name fds")
def test_a_directory_a_killed_writer_made_is_fsynced_in_its_parent(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    root = tmp_path / "tier"
    (root / "steps" / "000000000005").mkdir(parents=True)  # mkdir done, fsync never came
    be = LocalBackend(root, direct_io=False)
    rec = _Recorder(monkeypatch)
    be.put("steps/000000000005/r00000-of-00001.manifest", b"m")
    assert rec.index("fsync", root / "steps") >= 0
    assert rec.index("fsync", root) >= 0
    assert not [e for e in rec.events if e[0] == "mkdir"]


def test_no_directory_fsync_without_fsync(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    be = LocalBackend(tmp_path / "tier", fsync=False)
    rec = _Recorder(monkeypatch)
    be.put("steps/000000000001/m", b"m")
    assert [e for e in rec.events if e[0] == "fsync"] == []


# -- credentials never reach a log line (L6) -----------------------------------------------


@pytest.mark.parametrize(
    ("url", "redacted"),
    [
        ("s3://AKIA:SECRET@bucket/x", "s3://***@bucket/x"),
        ("s3://user@bucket/x", "s3://***@bucket/x"),
        ("s3://AKIA:SE@CRET@bucket/x", "s3://***@bucket/x"),  # '@' in the password
        ("s3://AKIA:SE/CRET@bucket/x", "s3://***@bucket/x"),  # '/' in the password
        ("s3://AKIA:a/b@c/d@bucket/run", "s3://***@bucket/run"),
        ("s3://AKIA:SE%40CR%2FET@bucket/x", "s3://***@bucket/x"),  # percent-encoded
        ("s3://AKIA:SE?CRET@bucket/x", "s3://***@bucket/x"),
        ("ftp://user:pw@host:21/dir", "ftp://***@host:21/dir"),
        ("https://h.example/o?sig=S3CR3T&sv=2024", "https://h.example/o?sig=***&sv=2024"),
        ("https://h/o?token=T&x=1", "https://h/o?token=***&x=1"),
        (
            "https://b.s3.amazonaws.com/k?X-Amz-Algorithm=AWS4-HMAC-SHA256&X-Amz-Credential=AKIA%2F2024"
            "&X-Amz-Date=20240101T000000Z&X-Amz-Security-Token=TOK&X-Amz-Signature=abc123",
            "https://b.s3.amazonaws.com/k?X-Amz-Algorithm=AWS4-HMAC-SHA256&X-Amz-Credential=***"
            "&X-Amz-Date=20240101T000000Z&X-Amz-Security-Token=***&X-Amz-Signature=***",
        ),
        ("s3://b/k?access_key=A&secret=B&password=C", "s3://b/k?access_key=***&secret=***&password=***"),
        (
            "https://h/o?AWSAccessKeyId=A&Signature=B&api_key=C",
            "https://h/o?AWSAccessKeyId=***&Signature=***&api_key=***",
        ),
        ("https://u:p@h/o?sig=1#access_token=2", "https://***@h/o?sig=***#access_token=***"),
        # nothing to hide: unchanged
        ("s3://bucket/run@v2/x", "s3://bucket/run@v2/x"),
        ("http://127.0.0.1:9000/bucket/a@b", "http://127.0.0.1:9000/bucket/a@b"),
        ("s3://bucket/x?versionId=3", "s3://bucket/x?versionId=3"),
        ("/local/dir/with:colon@at", "/local/dir/with:colon@at"),
        ("memory://root", "memory://root"),
    ],
)
def test_redact_url_removes_every_credential(url: str, redacted: str) -> None:
    assert redact_url(url) == redacted
    for secret in ("SECRET", "CRET", "SE%40CR", "S3CR3T", "TOK", "abc123"):
        if secret in url:
            assert secret not in redact_url(url)


def test_object_store_error_messages_are_redacted() -> None:
    from flashckpt.backends.fsspec import translate

    exc = OSError(errno.EIO, "403 for url https://b.example/k?X-Amz-Signature=abc123&X-Amz-Credential=AK")
    err = translate(exc, "get k")
    assert "abc123" not in str(err) and "X-Amz-Signature=***" in str(err)
    err = translate(ValueError("bad https://user:hunter2@host/x"), "get k")
    assert "hunter2" not in str(err)


# -- backends are closed by whoever opened them (L5) ---------------------------------------


def test_fsspec_close_stops_the_range_pool() -> None:
    def range_threads() -> set[threading.Thread]:
        return {t for t in threading.enumerate() if t.name.startswith("flashckpt-range") and t.is_alive()}

    before = range_threads()
    be = FsspecBackend(f"memory://flashckpt-{uuid.uuid4().hex[:8]}/root", range_bytes=1 << 16)
    data = os.urandom(1 << 20)
    be.put("big", data)
    assert be.get("big") == data and be.get("big", length=len(data) + 1) == data
    assert range_threads() - before  # parallel ranges ran on the pool
    be.close()
    be.close()  # idempotent
    assert not range_threads() - before


def test_load_closes_the_backend_it_opened_only(shm_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    closed: list[str] = []
    real_close = FsspecBackend.close

    def close(self: FsspecBackend) -> None:
        closed.append(self.url)
        real_close(self)

    monkeypatch.setattr(FsspecBackend, "close", close)
    url = f"memory://flashckpt-{uuid.uuid4().hex[:8]}/run"
    with flashckpt.Checkpointer(url, memory_dir=shm_dir) as ckpt:
        ckpt.save(0, make_state())
    closed.clear()  # the Checkpointer's own backend is the lead's (Checkpointer.close)
    assert flashckpt.load(url)["extra"] == {"epoch": 0, "seen": []}
    assert closed == [url]
    with pytest.raises(flashckpt.CheckpointNotFound):
        flashckpt.load(url + "-nothing-here")
    assert closed == [url, url + "-nothing-here"]
    mine = FsspecBackend(url)
    flashckpt.load(mine)
    assert len(closed) == 2  # the caller's backend stays open
    mine.close()
