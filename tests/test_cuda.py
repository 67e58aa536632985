"""The GPU path: pinned slots, device-to-host copies on a side stream.  Skipped without CUDA."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import flashckpt

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def test_cuda_state_round_trip_in_place(dirs: dict[str, Path]) -> None:
    model = torch.nn.Linear(256, 256).cuda()
    optim = torch.optim.AdamW(model.parameters())
    model(torch.randn(8, 256, device="cuda")).sum().backward()
    optim.step()
    state = {"model": model, "optim": optim, "x": torch.randn(1 << 20, device="cuda")}
    expected = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
    x = state["x"].cpu().clone()
    with flashckpt.Checkpointer(dirs["storage"], memory_dir=dirs["memory"]) as ckpt:
        h = ckpt.save(0, state)
        assert h is not None
        state["x"].add_(1)  # save() returned: the copy is complete, changing the state is safe
        h.wait()
        weight = model.weight
        with torch.no_grad():
            model.weight.zero_()
        assert ckpt.restore(state) == 0
    assert model.weight is weight and model.weight.is_cuda
    for k, v in model.state_dict().items():
        assert torch.equal(v.cpu(), expected[k])
    assert torch.equal(state["x"].cpu(), x)
    out = flashckpt.load(dirs["storage"])
    assert not out["x"].is_cuda and torch.equal(out["x"], x)
