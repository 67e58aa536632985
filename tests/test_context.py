"""The context manager: a normal exit waits until durable and frees memory; an exception
persists the newest staged snapshot before it propagates."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import flashckpt


def _state(step: int) -> dict[str, torch.Tensor]:
    return {"w": torch.full((1024,), float(step)), "b": torch.arange(step + 1)}


def test_a_normal_exit_leaves_every_save_durable_and_the_memory_tier_freed(dirs: dict[str, Path]) -> None:
    with flashckpt.Checkpointer(dirs["storage"], memory_dir=dirs["memory"], persist_every=4) as ckpt:
        for step in range(3):  # 0 persisted, 1 and 2 in memory only
            ckpt.save(step, _state(step))
        memory = ckpt.memory_path
    assert not memory.exists()  # freed: everything it held is durable
    assert torch.equal(flashckpt.load(dirs["storage"])["w"], _state(2)["w"])  # the newest persisted


def test_an_exception_persists_the_newest_snapshot_before_it_propagates(dirs: dict[str, Path]) -> None:
    with (
        pytest.raises(RuntimeError, match="the loss went NaN"),
        flashckpt.Checkpointer(dirs["storage"], memory_dir=dirs["memory"], persist_every=4) as ckpt,
    ):
        for step in range(3):
            ckpt.save(step, _state(step))
        raise RuntimeError("the loss went NaN")
    loaded = flashckpt.load(dirs["storage"])
    assert torch.equal(loaded["w"], _state(2)["w"]) and torch.equal(loaded["b"], _state(2)["b"])
