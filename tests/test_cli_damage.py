"""Every reading command against each kind of damage to a committed step: a flipped bit, a
truncated chunk, a missing chunk, a missing manifest.  Each exits 1 with one line naming the
step, never a traceback and never a result built from damaged bytes; the intact step beside
it still reads."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import flashckpt
from flashckpt.cli import main
from flashckpt.format import manifest_key
from tests.conftest import chunk_paths


def _damage(storage: Path, kind: str) -> None:
    chunk = chunk_paths(storage, 2)[0]
    if kind == "bit flip":
        data = bytearray(chunk.read_bytes())
        data[len(data) // 3] ^= 0x01
        chunk.write_bytes(bytes(data))
    elif kind == "truncation":
        chunk.write_bytes(chunk.read_bytes()[:-5])
    elif kind == "missing chunk":
        chunk.unlink()
    else:
        (storage / manifest_key(2, 0, 1)).unlink()


@pytest.fixture
def damaged(tmp_path: Path, shm_dir: Path, request: pytest.FixtureRequest) -> Path:
    storage = tmp_path / "storage"
    g = torch.Generator().manual_seed(0)
    with flashckpt.Checkpointer(storage, memory_dir=shm_dir, keep=None, preempt_signals=None) as ckpt:
        for step in (1, 2):
            ckpt.save(step, {"w": torch.randn(50_000, generator=g), "b": torch.randn(10, generator=g)})
    _damage(storage, request.param)
    return storage


KINDS = ["bit flip", "truncation", "missing chunk", "missing manifest"]


@pytest.mark.parametrize("damaged", KINDS, indirect=True)
@pytest.mark.parametrize(
    "argv",
    [
        ["verify", "{s}"],
        ["verify", "{s}", "--step", "2"],
        ["inspect", "{s}", "--step", "2", "--tensor", "w"],
        ["restore", "{s}", "--step", "2", "--out", "{o}/x.safetensors"],
        ["restore", "{s}", "--step", "2", "--out", "{o}/x.pt"],
        ["diff", "{s}@1", "{s}@2"],
    ],
    ids=["verify", "verify-step", "inspect", "restore-st", "restore-pt", "diff"],
)
def test_damage_exits_1_with_one_line_and_writes_nothing(
    damaged: Path,
    tmp_path: Path,
    argv: list[str],
    capsys: pytest.CaptureFixture[str],
    request: pytest.FixtureRequest,
) -> None:
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    code = main([a.format(s=damaged, o=out_dir) for a in argv])
    got = capsys.readouterr()
    assert code == 1, got.out + got.err
    assert "Traceback" not in got.err and got.err.count("\n") <= 1
    assert "step 2" in got.out + got.err
    assert not any(out_dir.iterdir())  # no export from damaged bytes, not even a partial file
    if argv[0] == "verify" and "--step" not in argv:
        assert "step 1: ok" in got.out  # the intact step beside it is still checked
    if argv[0] == "verify" and request.node.callspec.params["damaged"] != "missing manifest":
        assert "rank 0, tensors w, b:" in got.out  # where the damage is (one chunk holds both)
    assert main(["verify", str(damaged), "--step", "1"]) == 0
    capsys.readouterr()
    assert main(["verify", str(damaged), "--json"]) == 1
    rows = json.loads(capsys.readouterr().out)
    assert [(r["step"], r["ok"]) for r in rows] == [(1, True), (2, False)] and "CORRUPT" in rows[1]["error"]
