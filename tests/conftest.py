"""Shared fixtures: private memory-tier directories on /dev/shm that are always cleaned up."""

from __future__ import annotations

import os
import shutil
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

SHM = Path("/dev/shm") if Path("/dev/shm").is_dir() else None


@pytest.fixture(autouse=True, scope="session")
def _private_torch_caches(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """Worker processes that import FSDP create torch's inductor cache: keep it in pytest's
    temporary directory instead of /tmp/torchinductor_<user>."""
    old = os.environ.get("TORCHINDUCTOR_CACHE_DIR")
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(tmp_path_factory.mktemp("torchinductor"))
    yield
    if old is None:
        del os.environ["TORCHINDUCTOR_CACHE_DIR"]
    else:
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = old


@pytest.fixture
def shm_dir() -> Iterator[Path]:
    """A fresh, not yet existing directory on /dev/shm (tmp elsewhere), removed afterwards."""
    base = SHM or Path(os.environ.get("TMPDIR", "/tmp"))
    path = base / f"flashckpt-test-{uuid.uuid4().hex[:12]}"
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def dirs(tmp_path: Path, shm_dir: Path) -> dict[str, Path]:
    """storage, local and memory directories for one Checkpointer."""
    return {"storage": tmp_path / "storage", "local": tmp_path / "local", "memory": shm_dir}


class TinyNet(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb = torch.nn.Embedding(32, 16)
        self.lin = torch.nn.Linear(16, 16)
        self.norm = torch.nn.LayerNorm(16)
        self.bn = torch.nn.BatchNorm1d(16)
        self.head = torch.nn.Linear(16, 32, bias=False)
        self.head.weight = self.emb.weight  # tied weights: one storage, two keys

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        return self.head(self.norm(self.bn(torch.relu(self.lin(self.emb(idx))))))


def make_state(seed: int = 0) -> dict[str, object]:
    """A model, an AdamW optimizer, a scheduler and plain values, as a training loop has."""
    torch.manual_seed(seed)
    model = TinyNet()
    optim = torch.optim.AdamW(model.parameters(), lr=1e-2)
    sched = torch.optim.lr_scheduler.StepLR(optim, step_size=3, gamma=0.5)
    return {"model": model, "optim": optim, "sched": sched, "extra": {"epoch": 0, "seen": []}}


def train_step(state: dict[str, object], step: int) -> None:
    """One deterministic training step (the data depends only on the step number)."""
    model, optim, sched = state["model"], state["optim"], state["sched"]
    assert isinstance(model, TinyNet)
    g = torch.Generator().manual_seed(1000 + step)
    idx = torch.randint(0, 32, (8,), generator=g)
    loss = torch.nn.functional.cross_entropy(model(idx), idx)
    optim.zero_grad()  # type: ignore[attr-defined]
    loss.backward()
    optim.step()  # type: ignore[attr-defined]
    sched.step()  # type: ignore[attr-defined]
    extra = state["extra"]
    assert isinstance(extra, dict)
    extra["epoch"] = step // 4
    extra["seen"].append(step)


def assert_state_equal(a: dict[str, object], b: dict[str, object]) -> None:
    """Bitwise equality of two training states (model, optimizer, scheduler, extras)."""
    ma, mb = a["model"].state_dict(), b["model"].state_dict()  # type: ignore[attr-defined]
    assert ma.keys() == mb.keys()
    for k in ma:
        assert torch.equal(ma[k], mb[k]), k
    oa, ob = a["optim"].state_dict(), b["optim"].state_dict()  # type: ignore[attr-defined]
    assert oa["param_groups"] == ob["param_groups"]
    assert oa["state"].keys() == ob["state"].keys()
    for pid in oa["state"]:
        for k, v in oa["state"][pid].items():
            assert torch.equal(v, ob["state"][pid][k]), (pid, k)
    assert a["sched"].state_dict() == b["sched"].state_dict()  # type: ignore[attr-defined]
    assert a["extra"] == b["extra"]


@pytest.fixture(scope="session")
def s3_server() -> Iterator[str]:
    """A real S3 server (moto) on 127.0.0.1 and a free port, for the whole session."""
    import logging
    import socket

    moto_server = pytest.importorskip("moto.server")
    pytest.importorskip("s3fs")
    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.stop()


@pytest.fixture
def s3(s3_server: str) -> dict[str, object]:
    """A fresh bucket: ``{"url": "s3://bucket/run", "storage_options": {...}}``."""
    import boto3

    bucket = f"flashckpt-{uuid.uuid4().hex[:12]}"
    creds = {"aws_access_key_id": "testing", "aws_secret_access_key": "testing"}
    boto3.client("s3", endpoint_url=s3_server, region_name="us-east-1", **creds).create_bucket(Bucket=bucket)
    options = {
        "endpoint_url": s3_server,
        "key": "testing",
        "secret": "testing",
        "client_kwargs": {"region_name": "us-east-1"},
    }
    return {"url": f"s3://{bucket}/run", "bucket": bucket, "endpoint": s3_server, "storage_options": options}


def chunk_paths(root: Path, step: int, rank: int = 0, world: int = 1) -> list[Path]:
    """The chunk files of one committed shard on a POSIX tier, in shard order."""
    from flashckpt import Options
    from flashckpt.backends import LocalBackend
    from flashckpt.coordination.inventory import read_committed_manifest

    m = read_committed_manifest(LocalBackend(root), step, rank, world, Options())
    return [root / c.key for c in sorted(m.chunks, key=lambda c: c.offset)]


def set_format_limit(monkeypatch: pytest.MonkeyPatch, name: str, value: int) -> None:
    """Lower the format's limit ``name`` (``MAX_RECORD_BYTES``, ``MAX_TENSORS``, ...) for one
    test, everywhere the format reads it: the module of ``flashckpt.format`` that defines it
    and every one that imports it (``decode_commit`` bounds manifest sizes by
    ``MAX_RECORD_BYTES`` too), as setting it on the single ``format.py`` used to."""
    import flashckpt.format as fmt

    modules = [fmt, fmt.keys, fmt.record, fmt.tree, fmt.manifest, fmt.commit]
    holders = [m for m in modules if hasattr(m, name)]
    assert holders, f"flashckpt.format has no limit {name}"
    for m in holders:
        monkeypatch.setattr(m, name, value)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Every test that uses the S3 server is marked ``s3`` (``-m "not s3"`` leaves them out)."""
    for item in items:
        if "s3" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.s3)
