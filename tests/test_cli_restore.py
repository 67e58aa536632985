"""``flashckpt restore --out``: a step exported as .pt, .safetensors or a Hugging Face sharded
directory, loaded back and compared bitwise; subtrees, casts, refusals and damage."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file

import flashckpt
from flashckpt.cli import main
from tests.conftest import chunk_paths


def _state() -> dict[str, Any]:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 256), torch.nn.LayerNorm(256), torch.nn.Linear(256, 8))
    model[0].to(torch.bfloat16)
    opt = torch.optim.AdamW(model.parameters())
    return {
        "model": model,
        "optim": opt,
        "extra": {"epoch": 3, "ids": torch.arange(5), "mask": torch.ones(2, dtype=torch.bool)},
    }


@pytest.fixture
def step(dirs: dict[str, Path]) -> dict[str, Any]:
    state = _state()
    with flashckpt.Checkpointer(dirs["storage"], memory_dir=dirs["memory"], preempt_signals=None) as ckpt:
        ckpt.save(7, state)
    return dict(flashckpt.load(dirs["storage"]))


def _flat(tree: Any, path: str = "") -> dict[str, Any]:
    if isinstance(tree, dict):
        out: dict[str, Any] = {}
        for k, v in tree.items():
            out.update(_flat(v, f"{path}.{k}" if path else str(k)))
        return out
    if isinstance(tree, (list, tuple)):
        out = {}
        for i, v in enumerate(tree):
            out.update(_flat(v, f"{path}.{i}" if path else str(i)))
        return out
    return {path: tree}


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b)
    return bool(a == b)


def test_a_pt_export_holds_every_key_bitwise_and_loads_with_weights_only(
    dirs: dict[str, Path], step: dict[str, Any], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "all.pt"
    assert main(["restore", str(dirs["storage"]), "--out", str(out)]) == 0
    got = torch.load(out, weights_only=True)
    want = _flat(step)
    assert got.keys() == want.keys()
    assert all(_same(got[k], want[k]) for k in want)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no scratch left


def test_safetensors_and_a_sharded_directory_hold_the_model_bitwise(
    dirs: dict[str, Path], step: dict[str, Any], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    want = step["model"]
    one = tmp_path / "model.safetensors"
    assert main(["restore", str(dirs["storage"]), "--out", str(one), "--only", "model"]) == 0
    got = load_file(str(one))
    assert got.keys() == want.keys() and all(_same(got[k], want[k]) for k in want)
    hf = tmp_path / "hf"
    assert (
        main(
            ["restore", str(dirs["storage"]), "--out", str(hf), "--only", "model", "--max-shard-size", "8KB"]
        )
        == 0
    )
    index = json.loads((hf / "model.safetensors.index.json").read_text())
    shards = sorted(p.name for p in hf.glob("model-*.safetensors"))
    assert len(shards) >= 3 and set(index["weight_map"].values()) == set(shards)
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in want.values())
    got = {}
    for name in shards:
        got.update(load_file(str(hf / name)))
    assert got.keys() == want.keys() and all(_same(got[k], want[k]) for k in want)
    # and a framework's own sharded loader reads it into the model
    transformers = pytest.importorskip("transformers")
    model = _state()["model"]
    transformers.trainer_utils.load_sharded_checkpoint(model, str(hf), strict=True)
    assert all(torch.equal(v, want[k]) for k, v in model.state_dict().items())


def test_a_cast_touches_floating_tensors_only(
    dirs: dict[str, Path], step: dict[str, Any], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "x.safetensors"
    assert main(["restore", str(dirs["storage"]), "--out", str(out), "--dtype", "bf16"]) == 0
    got = load_file(str(out))
    want = _flat(step)
    assert got["model.2.weight"].dtype == torch.bfloat16
    assert torch.equal(got["model.2.weight"], want["model.2.weight"].to(torch.bfloat16))
    assert got["extra.ids"].dtype == torch.int64 and got["extra.mask"].dtype == torch.bool
    assert "extra.epoch" not in got  # a value: left out, and said so
    assert "value(s) that are not tensors left out" in capsys.readouterr().err


def test_what_safetensors_cannot_hold_is_refused_by_key(
    dirs: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with flashckpt.Checkpointer(dirs["storage"], memory_dir=dirs["memory"], preempt_signals=None) as ckpt:
        ckpt.save(1, {"z": torch.tensor([1 + 2j]), "w": torch.ones(3)})
    out = tmp_path / "z.safetensors"
    assert main(["restore", str(dirs["storage"]), "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "z: safetensors has no torch.complex64" in err[0] and not out.exists()
    assert main(["restore", str(dirs["storage"]), "--out", str(tmp_path / "z.pt")]) == 0
    assert main(["restore", str(dirs["storage"]), "--out", str(out), "--only", "nope"]) == 2


def test_a_damaged_chunk_exits_1_and_leaves_no_output(
    dirs: dict[str, Path], step: dict[str, Any], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    for chunk in chunk_paths(dirs["storage"], 7):
        data = bytearray(chunk.read_bytes())
        data[len(data) // 2] ^= 0x01
        chunk.write_bytes(bytes(data))
    for out in (tmp_path / "a.pt", tmp_path / "a.safetensors", tmp_path / "hf"):
        assert main(["restore", str(dirs["storage"]), "--out", str(out)]) == 1
        assert "CORRUPT" in capsys.readouterr().err
        assert not out.exists()
    assert not [p for p in tmp_path.rglob(".*")]
