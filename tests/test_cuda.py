"""The GPU path: pinned slots, device-to-host copies on a side stream.  Skipped without CUDA."""

from __future__ import annotations

import errno
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

import flashckpt
from flashckpt import _hooks as hooks
from flashckpt.staging import stager as _staging

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


# -- the CUDA review's fixes (2026-11): D1, D2, D3/L3, L1, L2, L5 ---------------------------------

_REPO = Path(__file__).resolve().parents[1]


def _sleep_s(seconds: float, device: int = 0) -> None:
    """Queue a kernel that spins for about ``seconds`` on the current stream of ``device``."""
    clock_khz = getattr(torch.cuda.get_device_properties(device), "clock_rate", 1_500_000)
    with torch.cuda.device(device):
        torch.cuda._sleep(int(seconds * clock_khz * 1000))


def _stager(directory: Path) -> _staging.Stager:
    directory.mkdir(mode=0o700)
    return _staging.Stager(directory, flashckpt.Options(prefault=False))


def _slot_bytes(slot: _staging.Slot, layout: _staging.Layout, i: int, like: torch.Tensor) -> torch.Tensor:
    return slot.tensor(layout.offsets[i], layout.nbytes[i], like.dtype, like.shape).clone()


def test_conj_and_neg_views_stage_bitwise_into_a_pinned_slot(shm_dir: Path) -> None:
    """D1: torch's non-blocking D2H copy applies the conj/neg bit to the host destination
    before the DMA lands (pytorch/pytorch#146286); staging resolves the bit on the GPU."""
    z = torch.randn(1 << 20, dtype=torch.complex64, device="cuda")
    m = torch.randn(512, 384, dtype=torch.complex64, device="cuda")
    views = [z.conj(), z.conj().imag, -z.conj(), m.t().conj(), m.conj().imag.t(), z.real]
    assert views[0].is_conj() and views[1].is_neg()
    expected = [v.resolve_conj().resolve_neg().cpu() for v in views]
    stager = _stager(shm_dir)
    try:
        layout = stager.layout(views)
        slot, _ = stager.acquire(layout.total_bytes)
        stager.stage(slot, views, layout)
        assert slot.pinned and slot.pin_device == 0
        assert slot.tensor(0, 8, torch.uint8, (8,)).is_pinned()
        for i, e in enumerate(expected):
            got = _slot_bytes(slot, layout, i, e)
            assert torch.equal(got.view(torch.uint8), e.contiguous().view(torch.uint8)), i
        stager.release(slot)
    finally:
        stager.close(unlink=True)


def test_conj_view_round_trips_through_a_checkpointer(dirs: dict[str, Path]) -> None:
    z = torch.randn(1 << 16, dtype=torch.complex64, device="cuda")
    state = {"c": z.conj(), "n": z.conj().imag}
    expected = {k: v.resolve_conj().resolve_neg().cpu() for k, v in state.items()}
    with flashckpt.Checkpointer(dirs["storage"], memory_dir=dirs["memory"]) as ckpt:
        h = ckpt.save(0, state)
        assert h is not None
        h.wait()
    out = flashckpt.load(dirs["storage"])
    for k, e in expected.items():
        assert torch.equal(out[k].resolve_conj().resolve_neg(), e), k


def test_a_failed_copy_leaves_no_device_copy_in_flight(shm_dir: Path) -> None:
    """L2: ``save`` releases the slot as soon as ``stage`` raises."""
    x = torch.arange(64 << 20, dtype=torch.uint8, device="cuda")
    cpu = torch.ones(16)
    stager = _stager(shm_dir)

    def fail(**info: Any) -> None:
        raise OSError(errno.EIO, "injected")

    off = hooks.on("stage.tensor", fail)
    try:
        layout = stager.layout([x, cpu])
        slot, _ = stager.acquire(layout.total_bytes)
        _sleep_s(0.3)  # the side stream's copy waits behind this
        with pytest.raises(OSError, match="injected"):
            stager.stage(slot, [x, cpu], layout)
        assert all(s.query() for s in stager._streams.values()), "a DMA is still writing into the slot"
        assert torch.equal(_slot_bytes(slot, layout, 0, x), x.cpu())
        stager.release(slot)
    finally:
        off()
        stager.close(unlink=True)


def test_a_pinned_cpu_source_is_read_after_the_pending_copy_into_it(shm_dir: Path) -> None:
    """L5: an offload/EMA buffer in pinned host memory, the destination of a non-blocking
    device-to-host copy still queued on the current stream when ``save`` is called."""
    g = torch.arange(16 << 20, dtype=torch.int32, device="cuda")
    h = torch.zeros(16 << 20, dtype=torch.int32, pin_memory=True)
    stager = _stager(shm_dir)
    try:
        layout = stager.layout([h])
        slot, _ = stager.acquire(layout.total_bytes)
        _sleep_s(0.3)
        h.copy_(g, non_blocking=True)  # lands after the sleep
        stager.stage(slot, [h], layout)
        assert torch.equal(_slot_bytes(slot, layout, 0, h), g.cpu())
        stager.release(slot)
    finally:
        stager.close(unlink=True)


def test_restore_copies_wait_for_the_targets_devices(shm_dir: Path) -> None:
    """L1: the copies run on each target's device; waiting on the current device only is not
    enough when a target lives elsewhere, and the wait must happen on errors too."""
    devices = list(range(min(torch.cuda.device_count(), 2)))
    shm_dir.mkdir(mode=0o700)
    slot = _staging.Slot(shm_dir, 0)
    n = 64 << 20
    try:
        slot.ensure(n)
        src = slot.tensor(0, n, torch.uint8, (n,))
        src.copy_(torch.arange(n, dtype=torch.int64).to(torch.uint8))
        targets = [torch.zeros(n, dtype=torch.uint8, device=f"cuda:{d}") for d in devices]
        torch.cuda.set_device(0)
        for d in devices:
            _sleep_s(0.3, d)
        with pytest.raises(ValueError, match="refused"), _staging.restore_copies(slot) as copies:
            for t in targets:
                copies.copy(t, src)
            raise ValueError("load_state_dict refused the state")
        for d in devices:
            assert torch.cuda.current_stream(d).query(), f"cuda:{d} still copying from the slot"
        assert slot.pinned and slot.pin_device == devices[0]
        for t in targets:
            assert torch.equal(t.cpu(), src)
    finally:
        slot.release_mapping()


_SUBPROCESS_PRELUDE = """
import sys, threading, tempfile, pathlib
import torch
import flashckpt
from flashckpt.staging import stager as _staging

calls = []
real = torch.cuda.cudart

class Spy:
    def __init__(self, inner, fail):
        self.inner, self.fail = inner, fail
    def __getattr__(self, name):
        return getattr(self.inner, name)
    def cudaHostRegister(self, addr, n, flags):
        calls.append(("register", threading.current_thread().name, torch.cuda.current_device()))
        return self.inner.cudaHostRegister(addr, n, 0xFFFF if self.fail else flags)
    def cudaHostUnregister(self, addr):
        calls.append(("unregister", threading.current_thread().name, torch.cuda.current_device()))
        return self.inner.cudaHostUnregister(addr)
"""


def _run(code: str) -> str:
    env = {**os.environ, "PYTHONPATH": str(_REPO)}
    proc = subprocess.run(
        [sys.executable, "-c", _SUBPROCESS_PRELUDE + code],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc.stdout


def test_a_failed_registration_does_not_fail_the_next_kernel(shm_dir: Path) -> None:
    """D2: a failed cudaHostRegister leaves the runtime's last error pending; torch's next
    checked kernel launch would raise it as its own failure."""
    code = f"""
FAIL = True
torch.cuda.cudart = lambda: Spy(real(), FAIL)
d = pathlib.Path({str(shm_dir)!r}); d.mkdir(mode=0o700)
stager = _staging.Stager(d, flashckpt.Options(prefault=False))
x = torch.randn(1 << 20, device="cuda")
layout = stager.layout([x])
slot, _ = stager.acquire(layout.total_bytes)
stager.stage(slot, [x], layout)
assert not slot.pinned and calls and calls[0][0] == "register"
y = (x * 2).sum()  # the next kernel on this thread
torch.cuda.synchronize()
assert torch.equal(slot.tensor(0, layout.nbytes[0], x.dtype, x.shape), x.cpu())
stager.release(slot)
stager.close(unlink=True)
print("ok")
"""
    assert "ok" in _run(code)


def test_a_cpu_state_leaves_cuda_uninitialised_and_gpu_saves_pin_on_the_training_thread(
    dirs: dict[str, Path],
) -> None:
    """D3/L3: no context for a CPU-only job; registrations on the training thread only."""
    code = f"""
torch.cuda.cudart = lambda: Spy(real(), False)
with flashckpt.Checkpointer({str(dirs["storage"])!r}, memory_dir={str(dirs["memory"])!r}) as ckpt:
    state = {{"w": torch.randn(1 << 20)}}
    ckpt.restore(state)
    for step in range(3):
        ckpt.save(step, state).wait()
    assert ckpt.restore(state) == 2
    assert not torch.cuda.is_initialized(), "a CPU-only state initialised CUDA"
    assert calls == []
    gpu = {{"w": torch.randn(1 << 20, device="cuda")}}
    for step in range(3, 6):
        ckpt.save(step, gpu).wait()
main = threading.main_thread().name
assert [c for c in calls if c[0] == "register"], calls
assert all(c[1] == main for c in calls if c[0] == "register"), calls
assert all(c[2] == 0 for c in calls), calls
print("ok")
"""
    assert "ok" in _run(code)
