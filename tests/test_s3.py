"""The storage tier on a real S3 server (moto on loopback) through s3fs over HTTP."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch

import flashckpt
from tests.conftest import assert_state_equal, make_state, train_step

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
