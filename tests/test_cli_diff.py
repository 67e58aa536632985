"""``flashckpt diff``: keys on one side only, dtype/shape and value changes, tensors that differ
(max absolute and relative error, tolerances), and tensors proven equal by their chunks'
checksums without being read."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch

import flashckpt
from flashckpt.catalog import Catalog
from flashckpt.cli import main

BIG = 1 << 19  # elements: 2 MiB, over small_tensor_bytes: a tensor of its own chunks


def _base() -> dict[str, Any]:
    g = torch.Generator().manual_seed(0)
    return {
        "w": torch.randn(BIG, generator=g),
        "frozen": torch.randn(BIG, generator=g),
        "small": torch.arange(6.0),
        "nan": torch.tensor([1.0, float("nan"), float("inf")]),
        "extra": {"epoch": 1, "gone": torch.zeros(2)},
    }


def _save(root: Path, memory: Path, states: dict[int, dict[str, Any]]) -> None:
    with flashckpt.Checkpointer(root, memory_dir=memory, keep=None, preempt_signals=None) as ckpt:
        for step, st in states.items():
            ckpt.save(step, st)


def _diff(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, dict[str, Any]]:
    code = main(["diff", *argv, "--json"])
    return code, json.loads(capsys.readouterr().out)


@pytest.fixture
def reads(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Counts the tensors diff reads (Catalog.read_tensor, the public reader)."""
    n: list[int] = []
    real = Catalog.read_tensor

    def counting(self: Catalog, m: Any, index: int) -> torch.Tensor:
        n.append(index)
        return real(self, m, index)

    monkeypatch.setattr(Catalog, "read_tensor", counting)
    return n


def test_a_step_against_itself_is_equal_and_its_large_tensors_are_not_read(
    dirs: dict[str, Path], capsys: pytest.CaptureFixture[str], reads: list[int]
) -> None:
    _save(dirs["storage"], dirs["memory"], {3: _base()})
    url = str(dirs["storage"])
    code, r = _diff(capsys, f"{url}@3", f"{url}@3")
    assert code == 0 and r["compared"] == 5 and r["unread"] == 2  # w and frozen fill their own chunks
    assert len(reads) == 2 * (r["compared"] - r["unread"])


def test_every_kind_of_difference_is_reported_and_exits_1(
    dirs: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str], reads: list[int]
) -> None:
    a = _base()
    b = _base()
    b["w"] = a["w"] + 1e-3
    b["small"] = a["small"].to(torch.float64)  # a dtype change
    b["extra"] = {"epoch": 2, "new": torch.ones(3)}
    _save(dirs["storage"], dirs["memory"], {1: a, 2: b})
    url = str(dirs["storage"])
    code, r = _diff(capsys, f"{url}@1", f"{url}@2")
    assert code == 1
    assert r["only_a"] == ["extra.gone"] and r["only_b"] == ["extra.new"]
    changed = {c["key"]: (c["a"], c["b"]) for c in r["changed"]}
    assert changed == {"small": ("float32 (6,)", "float64 (6,)"), "extra.epoch": ("1", "2")}
    (d,) = r["differ"]
    assert d["key"] == "w" and d["max_abs"] == pytest.approx(1e-3, rel=1e-3)
    assert r["unread"] == 1  # frozen: equal checksums
    # within a tolerance the tensor is close; the other changes still count
    code, r = _diff(capsys, f"{url}@1", f"{url}@2", "--atol", "1e-2")
    assert code == 1 and r["differ"] == []
    # across two storage tiers (another run) with the same content: equal, mostly unread
    other = tmp_path / "other"
    _save(other, dirs["memory"] / "x", {7: a})
    code, r = _diff(capsys, f"{url}@1", f"{other}@7")
    assert code == 0 and r["unread"] == 2


def test_nans_and_infinities_must_sit_at_the_same_places(
    dirs: dict[str, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    a, b, c = _base(), _base(), _base()
    b["nan"] = torch.tensor([1.0 + 1e-6, float("nan"), float("inf")])  # close, NaN and inf kept
    c["nan"] = torch.tensor([1.0, 2.0, float("-inf")])  # NaN gone, inf flipped
    _save(dirs["storage"], dirs["memory"], {1: a, 2: b, 3: c})
    url = str(dirs["storage"])
    assert _diff(capsys, f"{url}@1", f"{url}@2")[0] == 1  # bitwise by default
    assert _diff(capsys, f"{url}@1", f"{url}@2", "--atol", "1e-5")[0] == 0
    code, r = _diff(capsys, f"{url}@1", f"{url}@3", "--atol", "10")
    assert code == 1 and [d["key"] for d in r["differ"]] == ["nan"]


def test_a_step_that_is_not_there_exits_2_with_one_line(
    dirs: dict[str, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    _save(dirs["storage"], dirs["memory"], {1: _base()})
    url = str(dirs["storage"])
    assert main(["diff", f"{url}@1", f"{url}@9"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "step 9 is not committed" in err[0]
    assert main(["diff", url, url]) == 0  # newest by default
    assert "0 differ" in capsys.readouterr().out
