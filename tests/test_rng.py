"""flashckpt.RNGState: a resumed run draws the same numbers as an uninterrupted one."""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import pytest
import torch

import flashckpt


def draws() -> tuple[list[float], list[float], list[float]]:
    return torch.rand(5).tolist(), [random.random() for _ in range(5)], np.random.rand(5).tolist()


def test_every_generator_comes_back_as_it_was_saved(dirs: dict[str, Path]) -> None:
    torch.manual_seed(1), random.seed(2), np.random.seed(3)
    draws()  # somewhere in the middle of every stream
    random.gauss(0, 1)  # Python's cached Gaussian too
    with flashckpt.Checkpointer(dirs["storage"], memory_dir=dirs["memory"]) as ckpt:
        ckpt.save(0, {"rng": flashckpt.RNGState()})
        ckpt.wait()
    expected = draws(), random.gauss(0, 1)
    torch.manual_seed(99), random.seed(99), np.random.seed(99)  # another process, in effect
    with flashckpt.Checkpointer(dirs["storage"], memory_dir=dirs["memory"]) as ckpt:
        assert ckpt.restore({"rng": flashckpt.RNGState()}) == 0
    assert (draws(), random.gauss(0, 1)) == expected


class Net(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = torch.nn.Linear(16, 32)
        self.drop = torch.nn.Dropout(0.5)
        self.b = torch.nn.Linear(32, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.b(self.drop(torch.relu(self.a(x))))


def train(net: Net, opt: torch.optim.Optimizer, steps: range) -> None:
    for _ in steps:
        x = torch.randn(8, 16)  # the data comes from the generator too
        loss = net(x).square().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()


@pytest.mark.parametrize("with_rng", [True, False])
def test_a_resumed_run_with_dropout_is_bitwise_the_uninterrupted_one(
    dirs: dict[str, Path], with_rng: bool
) -> None:
    """With the RNG in the state the resumed run is bitwise equal; without it the dropout
    masks and the data differ (the check can fail)."""
    torch.manual_seed(0)
    net = Net()
    opt = torch.optim.AdamW(net.parameters(), lr=1e-2)
    train(net, opt, range(3))
    state: dict[str, object] = {"net": net, "opt": opt}
    if with_rng:
        state["rng"] = flashckpt.RNGState()
    with flashckpt.Checkpointer(dirs["storage"], memory_dir=dirs["memory"]) as ckpt:
        ckpt.save(3, state)
        ckpt.wait()
    train(net, opt, range(3, 6))
    uninterrupted = [p.detach().clone() for p in net.parameters()]

    torch.manual_seed(12345)  # the new process seeds as it likes
    net2 = Net()
    opt2 = torch.optim.AdamW(net2.parameters(), lr=1e-2)
    state2: dict[str, object] = {"net": net2, "opt": opt2}
    if with_rng:
        state2["rng"] = flashckpt.RNGState()
    with flashckpt.Checkpointer(dirs["storage"], memory_dir=dirs["memory"]) as ckpt:
        assert ckpt.restore(state2) == 3
    train(net2, opt2, range(3, 6))
    same = all(torch.equal(a, b) for a, b in zip(uninterrupted, net2.parameters(), strict=True))
    assert same == with_rng


def test_a_generator_saved_but_missing_here_is_left_alone_with_a_warning(
    caplog: pytest.LogCaptureFixture,
) -> None:
    state = flashckpt.RNGState().state_dict()
    state["cuda"] = [torch.get_rng_state()]  # as if saved on a GPU machine
    before = torch.get_rng_state()
    with caplog.at_level("WARNING"):
        flashckpt.RNGState().load_state_dict(state)
    if not torch.cuda.is_available():
        assert "CUDA RNG state saved" in caplog.text
    assert torch.equal(torch.get_rng_state(), before)
    with pytest.raises(TypeError, match="uint8"):
        flashckpt.RNGState().load_state_dict({**state, "torch": [1, 2, 3]})
