"""The storage tier on a real S3 server (moto on loopback) through s3fs over HTTP."""

from __future__ import annotations

import errno
import logging
import time
from pathlib import Path

import pytest
import torch

import flashckpt
from tests.conftest import assert_state_equal, make_state, train_step

pytestmark = [pytest.mark.s3]

SECRET = "sEcReT-do-not-log-4f2a"


def _opts(s3: dict[str, object]) -> dict[str, object]:
    return {**s3["storage_options"], "key": "AKIAFLASHCKPT", "secret": SECRET}  # type: ignore[dict-item]


def test_save_restore_load_through_s3(
    s3: dict[str, object], shm_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    url = str(s3["url"])
    reference = make_state()
    for step in range(5):
        train_step(reference, step)
    state = make_state()
    with flashckpt.Checkpointer(url, memory_dir=shm_dir, storage_options=_opts(s3), keep=2) as ckpt:
        for step in range(3):
            train_step(state, step)
            ckpt.save(step, state)
        ckpt.wait()
        assert ckpt.stats["errors"] == [] and "storage" in ckpt.stats["persist_s"]
        stats_text = repr(ckpt.stats)
    assert not shm_dir.exists()
    resumed = make_state(seed=9)
    with flashckpt.Checkpointer(url, memory_dir=shm_dir, storage_options=_opts(s3)) as ckpt:
        assert ckpt.restore(resumed) == 2  # from S3: the memory tier was released
        assert "from the storage tier" in caplog.text
        for step in range(3, 5):
            train_step(resumed, step)
            ckpt.save(step, resumed)
    assert_state_equal(resumed, reference)
    out = flashckpt.load(url, storage_options=_opts(s3))
    assert out["extra"]["seen"] == [0, 1, 2, 3, 4]
    for k, v in reference["model"].state_dict().items():  # type: ignore[attr-defined]
        assert torch.equal(out["model"][k], v)
    assert SECRET not in caplog.text and SECRET not in stats_text


def test_bad_credentials_fail_in_the_background_without_leaking(
    s3: dict[str, object], shm_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    opts = {**_opts(s3), "endpoint_url": "http://127.0.0.1:9"}  # nothing listens on port 9
    state = make_state()
    with flashckpt.Checkpointer(
        "s3://nobody-home/run",
        memory_dir=shm_dir,
        storage_options=opts,
        options=flashckpt.Options(retries=2, backoff_s=0.01),
    ) as ckpt:
        h = ckpt.save(0, state)
        assert h is not None
        with pytest.raises(flashckpt.StorageError) as ei:
            h.wait(timeout=120)
        assert ei.value.retryable  # a refused connection is transient
        errors = ckpt.stats["errors"]
        ckpt.close(_raise=False)
    assert errors and SECRET not in repr(errors) and SECRET not in str(ei.value)
    assert SECRET not in caplog.text


def test_unknown_scheme_is_a_clear_error() -> None:
    with pytest.raises(flashckpt.ConfigError, match="no fsspec file system"):
        flashckpt.Checkpointer("nosuchscheme://x/y")


def test_object_storage_is_compressed_by_default_and_posix_is_not(
    s3: dict[str, object], tmp_path: Path, shm_dir: Path
) -> None:
    """bf16 weights drawn like trained weights: byte-grouped zstd on S3, raw on local NVMe."""
    import boto3

    g = torch.Generator().manual_seed(0)
    state = {"w": (torch.randn(4 << 20, generator=g) * 0.02).to(torch.bfloat16)}
    url = str(s3["url"])
    with flashckpt.Checkpointer(
        url, local_dir=tmp_path / "l", memory_dir=shm_dir, storage_options=_opts(s3)
    ) as ckpt:
        ckpt.save(0, state)
    client = boto3.client(
        "s3",
        endpoint_url=str(s3["endpoint"]),
        region_name="us-east-1",
        aws_access_key_id="x",
        aws_secret_access_key="y",
    )
    objs = client.list_objects_v2(Bucket=str(s3["bucket"]), Prefix="run/chunks/")["Contents"]
    chunk_bytes = sum(o["Size"] for o in objs if not o["Key"].endswith(".manifest"))
    raw = state["w"].numel() * 2
    assert chunk_bytes <= 0.75 * raw
    local_chunks = sum(
        p.stat().st_size
        for p in (tmp_path / "l" / "chunks").rglob("*")
        if p.is_file() and p.suffix != ".manifest"
    )
    assert local_chunks == raw
    out = flashckpt.load(url, storage_options=_opts(s3))
    assert torch.equal(out["w"].view(torch.int16), state["w"].view(torch.int16))
    fresh = {"w": torch.zeros_like(state["w"])}
    with flashckpt.Checkpointer(url, memory_dir=shm_dir, storage_options=_opts(s3)) as ckpt:
        assert ckpt.restore(fresh) == 0
    assert torch.equal(fresh["w"].view(torch.int16), state["w"].view(torch.int16))


def test_explicit_compression_per_tier(tmp_path: Path, shm_dir: Path) -> None:
    state = {"w": (torch.randn(1 << 20) * 0.02).to(torch.bfloat16)}
    with flashckpt.Checkpointer(
        tmp_path / "s",
        local_dir=tmp_path / "l",
        memory_dir=shm_dir,
        compression={"local": None, "storage": "zstd:3"},
    ) as ckpt:
        ckpt.save(0, state)

    def size(root: Path) -> int:
        files = (root / "chunks").rglob("*")
        return sum(p.stat().st_size for p in files if p.suffix != ".manifest" and p.is_file())

    assert size(tmp_path / "l") == (1 << 20) * 2
    assert size(tmp_path / "s") < 0.75 * (1 << 20) * 2
    assert torch.equal(flashckpt.load(tmp_path / "s")["w"], state["w"])
    with pytest.raises(flashckpt.ConfigError):
        flashckpt.Checkpointer(tmp_path / "s", memory_dir=shm_dir, compression={"nvme": "zstd"})


@pytest.mark.parametrize("kind", ["503", "500", "drop"])
def test_s3_faults_during_a_save_then_commit(s3: dict[str, object], shm_dir: Path, kind: str) -> None:
    """Throttling, 5xx and dropped connections on chunk uploads (through a real proxy in front
    of the server): the step commits once the faults stop; the older step is untouched; the
    training thread never waits for it."""
    from tests.s3proxy import FaultProxy, ProxyFault, ProxyPlan

    plan = ProxyPlan()
    proxy = FaultProxy(str(s3["endpoint"]), plan)
    try:
        opts = {**_opts(s3), "endpoint_url": proxy.url, "config_kwargs": {"retries": {"max_attempts": 1}}}
        state = make_state()
        options = flashckpt.Options(retries=8, backoff_s=0.05, backoff_max_s=0.5)
        url = str(s3["url"])
        with flashckpt.Checkpointer(
            url, memory_dir=shm_dir, storage_options=opts, keep=None, options=options
        ) as ckpt:
            ckpt.save(0, state).wait()  # type: ignore[union-attr]
            plan.faults.append(ProxyFault("PUT", "/steps/000000000001/", kind, times=4))  # type: ignore[arg-type]
            train_step(state, 0)
            h = ckpt.save(1, state)
            assert h is not None
            assert ckpt.stats["blocking_s"] < 5  # staged; the faults are the persist thread's business
            h.wait(timeout=120)
            assert ckpt.stats["errors"] == []
        assert plan.fired == 4
        out1 = flashckpt.load(url, storage_options=_opts(s3), step=1)
        assert out1["extra"]["seen"] == [0]
        out0 = flashckpt.load(url, storage_options=_opts(s3), step=0)
        assert out0["extra"]["seen"] == []
    finally:
        proxy.close()


def _through(proxy_url: str, s3: dict[str, object], read_timeout_s: float = 2.0) -> dict[str, object]:
    """Storage options for the fault proxy, with short timeouts and no retries inside botocore."""
    config = {
        "read_timeout": read_timeout_s,
        "connect_timeout": read_timeout_s,
        "retries": {"max_attempts": 0},
    }
    return {**_opts(s3), "endpoint_url": proxy_url, "config_kwargs": config}


def _big_state() -> dict[str, object]:
    """One 24 MiB tensor, stored raw: one chunk, a body larger than what the loopback socket
    buffers absorb, so a server that stops reading it really blocks the sender."""
    return {"big": torch.randn(6 << 20, generator=torch.Generator().manual_seed(0)), "extra": {"n": 1}}


@pytest.mark.slow
@pytest.mark.parametrize(("kind", "why"), [("stall", "ReadTimeoutError"), ("stall-upload", "no progress")])
def test_a_stalled_upload_times_out_and_is_retried(
    s3: dict[str, object], shm_dir: Path, caplog: pytest.LogCaptureFixture, kind: str, why: str
) -> None:
    """A server that never answers a chunk PUT (``stall``), or stops reading its body midway
    (``stall-upload``, which aiohttp's read timeout does not cover): the attempt fails after
    the read timeout, as a retryable error, and the retry commits the step."""
    from tests.s3proxy import FaultProxy, ProxyFault, ProxyPlan

    caplog.set_level(logging.WARNING, logger="flashckpt")

    plan = ProxyPlan([ProxyFault("PUT", "/run/chunks/", kind, times=1)])  # type: ignore[arg-type]
    proxy = FaultProxy(str(s3["endpoint"]), plan)
    try:
        state = _big_state()
        options = flashckpt.Options(retries=4, backoff_s=0.05, backoff_max_s=0.2)
        url = str(s3["url"])
        with flashckpt.Checkpointer(
            url,
            memory_dir=shm_dir,
            storage_options=_through(proxy.url, s3),
            compression="none",
            options=options,
        ) as ckpt:
            t0 = time.monotonic()
            h = ckpt.save(0, state)
            assert h is not None
            h.wait(timeout=120)
            waited = time.monotonic() - t0
            assert ckpt.stats["errors"] == []
        assert plan.fired == 1
        assert waited >= 2.0  # the stalled attempt was given its read timeout, no less
        assert why in caplog.text  # the retry names the timeout that ended the attempt
        out = flashckpt.load(url, storage_options=_opts(s3))
        assert torch.equal(out["big"], state["big"])  # type: ignore[arg-type]
    finally:
        proxy.close()


@pytest.mark.slow
def test_a_stalled_download_times_out_and_restore_retries(s3: dict[str, object], shm_dir: Path) -> None:
    """A GET whose body stops halfway: the read fails after the read timeout, the transfer
    layer reads the chunk again, and restore returns the step intact."""
    from tests.s3proxy import FaultProxy, ProxyFault, ProxyPlan

    url = str(s3["url"])
    state = _big_state()
    with flashckpt.Checkpointer(
        url, memory_dir=shm_dir, storage_options=_opts(s3), compression="none"
    ) as ckpt:
        ckpt.save(3, state)
    assert not shm_dir.exists()
    plan = ProxyPlan([ProxyFault("GET", "/run/chunks/", "stall-body", times=1)])
    proxy = FaultProxy(str(s3["endpoint"]), plan)
    try:
        fresh = {"big": torch.zeros(6 << 20), "extra": {"n": 0}}
        options = flashckpt.Options(retries=3, backoff_s=0.05, backoff_max_s=0.2)
        with flashckpt.Checkpointer(
            url, memory_dir=shm_dir, storage_options=_through(proxy.url, s3), options=options
        ) as ckpt:
            t0 = time.monotonic()
            assert ckpt.restore(fresh) == 3
            assert time.monotonic() - t0 >= 2.0
        assert plan.fired == 1
        assert torch.equal(fresh["big"], state["big"])  # type: ignore[arg-type]
    finally:
        proxy.close()


@pytest.mark.slow
def test_a_hung_server_is_reported_not_waited_for(s3: dict[str, object], shm_dir: Path) -> None:
    """Every PUT of the new step hangs: after ``Options.retries`` read timeouts the save fails
    with a retryable StorageError (instead of waiting forever); the older step is untouched."""
    from tests.s3proxy import FaultProxy, ProxyFault, ProxyPlan

    plan = ProxyPlan()
    proxy = FaultProxy(str(s3["endpoint"]), plan)
    try:
        url = str(s3["url"])
        state = make_state()
        options = flashckpt.Options(retries=2, backoff_s=0.05, backoff_max_s=0.2)
        with flashckpt.Checkpointer(
            url, memory_dir=shm_dir, storage_options=_through(proxy.url, s3), keep=None, options=options
        ) as ckpt:
            ckpt.save(0, state).wait(timeout=60)  # type: ignore[union-attr]
            plan.faults.append(ProxyFault("PUT", "/run/", "stall", times=1000))
            train_step(state, 0)
            t0 = time.monotonic()
            h = ckpt.save(1, state)
            assert h is not None
            with pytest.raises(flashckpt.StorageError) as ei:
                h.wait(timeout=120)
            assert time.monotonic() - t0 < 60
            assert ei.value.retryable and "timeout" in str(ei.value).lower()
            ckpt.close(_raise=False)
        assert plan.fired >= 2  # both attempts were made, each one timed out
        assert flashckpt.load(url, storage_options=_opts(s3))["extra"]["seen"] == []  # step 0
    finally:
        proxy.close()


@pytest.mark.parametrize("kind", ["507", "quota", "too-large"])
def test_a_full_object_store_is_storage_full_and_not_retried(
    s3: dict[str, object], shm_dir: Path, kind: str
) -> None:
    """An object store out of space or over quota (MinIO's ``507 XMinioStorageFull``,
    ``QuotaExceeded``, ``EntityTooLarge``) fails the save with StorageFullError, the error the
    local tier raises for ENOSPC: not retried, reported once; the older step is untouched."""
    from tests.s3proxy import FaultProxy, ProxyFault, ProxyPlan

    plan = ProxyPlan()
    proxy = FaultProxy(str(s3["endpoint"]), plan)
    try:
        url = str(s3["url"])
        state = make_state()
        options = flashckpt.Options(retries=5, backoff_s=0.05)
        with flashckpt.Checkpointer(
            url, memory_dir=shm_dir, storage_options=_through(proxy.url, s3), keep=None, options=options
        ) as ckpt:
            ckpt.save(0, state).wait(timeout=60)  # type: ignore[union-attr]
            plan.faults.append(ProxyFault("PUT", "/run/chunks/", kind, times=1000))  # type: ignore[arg-type]
            train_step(state, 0)
            h = ckpt.save(1, state)
            assert h is not None
            with pytest.raises(flashckpt.StorageFullError) as ei:
                h.wait(timeout=60)
            assert not ei.value.retryable and ei.value.errno == errno.ENOSPC
            assert "StorageFullError" in ckpt.stats["errors"][0]
            ckpt.close(_raise=False)
        assert plan.fired == 1  # not retried
        assert flashckpt.load(url, storage_options=_opts(s3))["extra"]["seen"] == []
    finally:
        proxy.close()
