"""``flashckpt inspect``: the saved tree of a step (keys, dtypes, shapes, bytes, values; every
rank's shard) and one tensor's statistics, read from the chunks that hold it, verified."""

from __future__ import annotations

import json
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.multiprocessing as mp

import flashckpt
from flashckpt.cli import main


def _inspect(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, Any]:
    code = main(["inspect", *argv, "--json"])
    out = capsys.readouterr().out
    return code, json.loads(out) if out.strip() else None


def _state() -> dict[str, Any]:
    torch.manual_seed(0)
    model = torch.nn.Linear(64, 32)
    opt = torch.optim.AdamW(model.parameters())
    model(torch.randn(4, 64)).sum().backward()
    opt.step()
    odd = torch.randn(300).to(torch.bfloat16)
    odd[3], odd[7], odd[9] = float("nan"), float("inf"), -float("inf")
    return {
        "model": model,
        "optim": opt,
        "extra": {
            "epoch": 3,
            "name": "run-7",
            "odd": odd,
            "ids": torch.arange(10, dtype=torch.int32),
            "mask": torch.tensor([True, False, True]),
            "z": torch.tensor([3 + 4j, 1j]),
            "empty": torch.empty(0, 5),
            "big": torch.randn(256, 1024),
        },
    }


def _expected(t: torch.Tensor) -> dict[str, Any]:
    x = (t.abs() if t.is_complex() else t).to(torch.float64)
    f = x[torch.isfinite(x)]
    out: dict[str, Any] = {
        "nan": int(torch.isnan(x).sum()),
        "inf": int(torch.isinf(x).sum()),
        "numel": t.numel(),
    }
    for k, fn in (("min", torch.min), ("max", torch.max), ("mean", torch.mean), ("norm", torch.linalg.norm)):
        out[k] = float(fn(f)) if f.numel() else None
    return out


@pytest.fixture
def saved(dirs: dict[str, Path]) -> dict[str, Any]:
    state = _state()
    opts = flashckpt.Options(chunk_bytes=64 << 10, small_tensor_bytes=4096)  # "big" spans 16 chunks
    with flashckpt.Checkpointer(dirs["storage"], memory_dir=dirs["memory"], options=opts) as ckpt:
        ckpt.save(4, state)
        ckpt.save(9, state)
    return state


def test_the_tree_lists_every_key_with_its_dtype_shape_and_bytes_or_value(
    dirs: dict[str, Path], saved: dict[str, Any], capsys: pytest.CaptureFixture[str]
) -> None:
    code, out = _inspect(capsys, str(dirs["storage"]))  # the newest step by default
    assert code == 0 and out["step"] == 9 and out["world_size"] == 1
    rows = {r["key"]: r for r in out["entries"]}
    for k, v in saved["model"].state_dict().items():
        r = rows[f"model.{k}"]
        assert (r["dtype"], r["shape"], r["bytes"]) == ("float32", list(v.shape), v.numel() * 4)
    assert rows["optim.state.0.exp_avg"]["shape"] == [32, 64]
    assert rows["optim.param_groups.0.betas.0"] == {
        "key": "optim.param_groups.0.betas.0",
        "kind": "value",
        "value": "0.9",
    }
    assert rows["extra.name"]["value"] == "'run-7'" and rows["extra.odd"]["dtype"] == "bfloat16"
    code, out = _inspect(capsys, str(dirs["storage"]), "--step", "4")
    assert code == 0 and out["step"] == 4
    assert main(["inspect", str(dirs["storage"])]) == 0  # the table
    assert "model.weight" in capsys.readouterr().out


@pytest.mark.parametrize(
    "key", ["extra.odd", "extra.ids", "extra.mask", "extra.z", "extra.empty", "extra.big", "model.bias"]
)
def test_a_tensors_statistics_are_those_of_the_tensor_saved(
    dirs: dict[str, Path], saved: dict[str, Any], capsys: pytest.CaptureFixture[str], key: str
) -> None:
    code, out = _inspect(capsys, str(dirs["storage"]), "--tensor", key)
    assert code == 0
    group, name = key.split(".")
    t = saved[group][name] if group == "extra" else saved[group].state_dict()[name]
    want = _expected(t)
    for k, v in want.items():
        assert out[k] == (pytest.approx(v, rel=1e-12) if isinstance(v, float) else v), k


def test_a_damaged_chunk_of_the_tensor_exits_1_and_the_others_still_read(
    dirs: dict[str, Path], saved: dict[str, Any], capsys: pytest.CaptureFixture[str]
) -> None:
    from flashckpt.catalog import Catalog

    with Catalog(dirs["storage"]) as cat:  # the first chunk that holds "big"
        (m,) = cat.manifests(9)
    code, out = _inspect(capsys, str(dirs["storage"]))
    index = next(r["index"] for r in out["entries"] if r["key"] == "extra.big")
    e = m.tensors[index]
    key = min((c for c in m.chunks if e.offset <= c.offset < e.offset + e.nbytes), key=lambda c: c.offset).key
    victim = dirs["storage"] / key
    data = bytearray(victim.read_bytes())
    data[100] ^= 0x40
    victim.write_bytes(bytes(data))
    assert main(["inspect", str(dirs["storage"]), "--tensor", "extra.big"]) == 1
    err = capsys.readouterr().err
    assert "CORRUPT" in err and len(err.strip().splitlines()) == 1
    code, _ = _inspect(capsys, str(dirs["storage"]), "--tensor", "model.weight")
    assert code == 0


@pytest.mark.parametrize(
    ("argv", "says"),
    [
        (["--tensor", "nope"], "no tensor 'nope'"),
        (["--tensor", "extra.epoch"], "no tensor 'extra.epoch'"),  # a value, not a tensor
        (["--step", "5"], "step 5 is not committed"),
        (["--rank", "1"], "no rank 1"),
    ],
)
def test_bad_requests_exit_2_with_one_line(
    dirs: dict[str, Path],
    saved: dict[str, Any],
    capsys: pytest.CaptureFixture[str],
    argv: list[str],
    says: str,
) -> None:
    assert main(["inspect", str(dirs["storage"]), *argv]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and says in err[0]


def _two_ranks(rank: int, init: str, storage: str, memory: str) -> None:
    torch.distributed.init_process_group(
        "gloo", init_method=init, rank=rank, world_size=2, timeout=timedelta(seconds=30)
    )
    try:
        with flashckpt.Checkpointer(storage, memory_dir=f"{memory}/rank{rank}", preempt_signals=None) as ckpt:
            ckpt.save(1, {"shared": torch.ones(8), "mine": torch.full((4,), float(rank + 1))})
    finally:
        torch.distributed.destroy_process_group()


@pytest.mark.subprocess
def test_every_ranks_shard_is_inspected(
    tmp_path: Path, shm_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    storage = tmp_path / "storage"
    mp.spawn(_two_ranks, args=(f"file://{tmp_path / 'rdzv'}", str(storage), str(shm_dir)), nprocs=2)
    for rank in (0, 1):
        code, out = _inspect(capsys, str(storage), "--rank", str(rank), "--tensor", "mine")
        assert code == 0 and out["mean"] == rank + 1 and out["rank"] == rank
    code, out = _inspect(capsys, str(storage))
    assert code == 0 and out["world_size"] == 2
