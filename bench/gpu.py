"""One-GPU check of flashckpt's CUDA path (the CUDA review of 2026-11, section 6).

Eleven checks, each printed as one JSON line as it finishes, then a JSON summary written to
``--out`` (``gpu-summary.json``, and ``gpu-summary.md`` to read).  A check that would start
after ``--budget-s`` seconds is skipped (reported as such), except the last one, the
registration accounting, which always runs.  The exit status is 1 if a check failed, else
0.  Without a CUDA device it prints ``no CUDA device: skipped`` and exits 0.

Run on a machine with a GPU (about 2-2.5 minutes)::

    python -m bench.gpu --out bench/results/gpu

Slots go under /dev/shm when it has more than 6 GiB free (else the temporary directory), and
sizes shrink to what /dev/shm and the GPU hold (N GiB needs 4N GiB of /dev/shm, 2N of GPU memory).
Everything created is removed at the end, also on error.

Every fix of the review is asserted here, on a real GPU:

* D1: conj/neg views round-trip bitwise through pinned slots (check 5, pinned and pageable);
* D2: a forced registration failure leaves no pending CUDA error: the next kernel runs (8);
* D3/L3: a CPU-only state leaves ``torch.cuda.is_initialized()`` false (9, a subprocess), and
  every registration happens on the training thread, under the training device (11);
* L1: ``restore`` returns only once the host-to-device copies are done, read at once on a
  stream that does not wait (6; with two GPUs also for a target on the other device);
* L2: a failure injected mid-copy leaves no device-to-host copy in flight (3);
* L5: a pinned CPU source with a non-blocking copy into it still queued is read after it (3).

A spy around ``torch.cuda.cudart()`` logs every ``cudaHostRegister``/``cudaHostUnregister``
with its thread, device, return code and duration; it is also how check 8 forces a failure
(invalid flags).  Private attributes of flashckpt are read (``_stager``, ``Slot.pinned``),
never changed, except in check 5's pageable arm, which switches pinning off.
"""

from __future__ import annotations

import argparse
import gc
import json
import mmap
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

import flashckpt
from flashckpt import _hooks as hooks
from flashckpt.staging import stager as _staging
from flashckpt.testing import parts

MiB = 1 << 20
GiB = 1 << 30
REPO = Path(__file__).resolve().parents[1]
SHM = Path("/dev/shm")


class CheckFailed(AssertionError):
    """An assertion of a check did not hold."""


def require(condition: bool, what: str) -> None:
    if not condition:
        raise CheckFailed(what)


# -- the spy ---------------------------------------------------------------------------------------


@dataclass
class Call:
    op: str  # "register" / "unregister"
    thread: str
    device: int
    rc: int
    seconds: float
    addr: int
    nbytes: int


class CudartSpy:
    """Wraps ``torch.cuda.cudart()`` for this process: records every registration call.
    ``fail`` makes registrations fail (invalid flags), as a real failure would."""

    def __init__(self) -> None:
        self.calls: list[Call] = []
        self.fail = False
        self._lock = threading.Lock()
        self._real: Callable[[], Any] = torch.cuda.cudart

    def install(self) -> None:
        torch.cuda.cudart = self._wrapped

    def uninstall(self) -> None:
        torch.cuda.cudart = self._real

    def real(self) -> Any:
        return self._real()

    def count(self, op: str) -> int:
        with self._lock:
            return sum(1 for c in self.calls if c.op == op)

    def _wrapped(self) -> Any:
        return _SpiedCudart(self, self._real())

    def record(self, call: Call) -> None:
        with self._lock:
            self.calls.append(call)


class _SpiedCudart:
    def __init__(self, spy: CudartSpy, inner: Any) -> None:
        self._spy, self._inner = spy, inner

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)

    def cudaHostRegister(self, addr: int, nbytes: int, flags: int) -> Any:
        t0 = time.perf_counter()
        rc = self._inner.cudaHostRegister(addr, nbytes, 0xFFFF if self._spy.fail else flags)
        self._spy.record(
            Call("register", threading.current_thread().name, torch.cuda.current_device(), int(rc),
                 time.perf_counter() - t0, addr, nbytes)
        )  # fmt: skip
        return rc

    def cudaHostUnregister(self, addr: int) -> Any:
        t0 = time.perf_counter()
        rc = self._inner.cudaHostUnregister(addr)
        self._spy.record(
            Call("unregister", threading.current_thread().name, torch.cuda.current_device(), int(rc),
                 time.perf_counter() - t0, addr, 0)
        )  # fmt: skip
        return rc


# -- helpers ---------------------------------------------------------------------------------------


def sleep_s(seconds: float, device: int | None = None) -> None:
    """Queue a kernel that spins about ``seconds`` on the current stream of ``device``."""
    index = torch.cuda.current_device() if device is None else device
    clock_khz = getattr(torch.cuda.get_device_properties(index), "clock_rate", 1_500_000)
    with torch.cuda.device(index):
        torch.cuda._sleep(int(seconds * clock_khz * 1000))  # type: ignore[no-untyped-call]


def bits(t: torch.Tensor) -> torch.Tensor:
    """The bytes of ``t``'s values, on the CPU (float8 and bool compare as bytes)."""
    v = t.detach().resolve_conj().resolve_neg().cpu().contiguous().reshape(-1)
    return v.view(torch.uint8)


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.shape == b.shape and a.dtype == b.dtype and torch.equal(bits(a), bits(b))


def timed(fn: Callable[[], object], repeats: int = 3) -> float:
    """Median seconds of ``fn`` followed by a device synchronize."""
    out = []
    for _ in range(repeats):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        out.append(time.perf_counter() - t0)
    return statistics.median(out)


def gbs(nbytes: int, seconds: float) -> float:
    return round(nbytes / max(seconds, 1e-9) / 1e9, 3)


def zeroed_like(t: torch.Tensor) -> torch.Tensor:
    """A tensor of ``t``'s dtype, shape and (where dense) strides, all bytes zero."""
    out = torch.empty_like(t)
    out.untyped_storage().fill_(0)  # type: ignore[attr-defined]
    return out


@dataclass
class Ctx:
    args: argparse.Namespace
    spy: CudartSpy
    root: Path  # slots (memory tiers)
    disk: Path  # storage tiers
    shm_free: int
    start: float = field(default_factory=time.monotonic)
    raw: dict[str, float] = field(default_factory=dict)
    n: int = 0

    def ckpt(self, name: str, **options: Any) -> flashckpt.Checkpointer:
        """A Checkpointer of its own for one check: memory-only saves (``persist_every``
        large), no fsync (the disk is not what is measured)."""
        opts = flashckpt.Options(fsync=False, direct_io=False, **options)
        self.n += 1
        tag = f"{self.n:02d}-{name}"
        return flashckpt.Checkpointer(
            str(self.disk / tag), memory_dir=str(self.root / tag), persist_every=1_000_000, options=opts
        )

    def fits(self, nbytes: int, *, shm_copies: float = 4.0, gpu_copies: float = 2.0) -> bool:
        gpu_free, _ = torch.cuda.mem_get_info()
        return nbytes * shm_copies <= self.shm_free and nbytes * gpu_copies <= gpu_free


def warm(ck: flashckpt.Checkpointer, state: dict[str, Any], first_step: int = 1) -> int:
    """Fault both slots in and pin both (pinning is lazy: on the first save into each slot);
    return the next step number."""
    ck.prepare(state)
    parts(ck).stager.join_prefault()
    for step in (first_step, first_step + 1):
        h = ck.save(step, state)
        assert h is not None
        h.wait()
    return first_step + 2


def slot_ranges(ck: flashckpt.Checkpointer) -> list[tuple[int, int]]:
    return [(s.address, s.address + s.capacity) for s in parts(ck).stager.slots if s.mapped]


# -- the checks ------------------------------------------------------------------------------------


def _registered_bandwidth(reg: torch.Tensor, g: torch.Tensor, out: dict[str, Any]) -> None:
    """Register ``reg`` (a mapping of a /dev/shm file) as a slot is, measure, unregister."""
    n = reg.numel()
    t0 = time.perf_counter()
    rc = int(torch.cuda.cudart().cudaHostRegister(reg.data_ptr(), n, 0))  # type: ignore[no-untyped-call]
    out["register_s_per_gib"] = round((time.perf_counter() - t0) * GiB / n, 4)
    require(rc == 0, f"cudaHostRegister of a /dev/shm mapping failed: {rc}")
    try:
        out["registered_d2h_gbs"] = gbs(n, timed(lambda: reg.copy_(g, non_blocking=True)))
        out["registered_h2d_gbs"] = gbs(n, timed(lambda: g.copy_(reg, non_blocking=True)))
    finally:
        t0 = time.perf_counter()
        rc = int(torch.cuda.cudart().cudaHostUnregister(reg.data_ptr()))  # type: ignore[no-untyped-call]
        out["unregister_s_per_gib"] = round((time.perf_counter() - t0) * GiB / n, 4)
    require(rc == 0, f"cudaHostUnregister failed: {rc}")


def check_raw_bandwidth(ctx: Ctx) -> dict[str, Any]:
    """1: raw D2H/H2D bandwidth: pageable, cudaHostAlloc (pin_memory), and a registered
    /dev/shm mapping like a slot.  Registered must reach 0.7x cudaHostAlloc D2H."""
    n = GiB if ctx.fits(GiB, shm_copies=1.5, gpu_copies=1.2) else 256 * MiB
    g = torch.ones(n, dtype=torch.uint8, device="cuda")
    pageable = torch.zeros(n, dtype=torch.uint8)
    pinned = torch.zeros(n, dtype=torch.uint8, pin_memory=True)
    path = ctx.root / "raw.bin"
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    try:
        os.posix_fallocate(fd, 0, n)
        mm = mmap.mmap(fd, n, flags=mmap.MAP_SHARED)
    finally:
        os.close(fd)
    out: dict[str, Any] = {"bytes": n}
    out["pageable_d2h_gbs"] = gbs(n, timed(lambda: pageable.copy_(g, non_blocking=True)))
    out["pinned_d2h_gbs"] = gbs(n, timed(lambda: pinned.copy_(g, non_blocking=True)))
    out["pinned_h2d_gbs"] = gbs(n, timed(lambda: g.copy_(pinned, non_blocking=True)))
    reg = torch.frombuffer(mm, dtype=torch.uint8)
    try:
        reg.fill_(0)  # fault in, as a prefaulted slot is
        _registered_bandwidth(reg, g, out)
    finally:
        del reg  # no view may outlive the mapping
        mm.close()
        path.unlink()
    ctx.raw = {k: float(v) for k, v in out.items()}
    require(
        out["registered_d2h_gbs"] >= 0.7 * out["pinned_d2h_gbs"],
        f"registered D2H {out['registered_d2h_gbs']} GB/s < 0.7 x cudaHostAlloc {out['pinned_d2h_gbs']} GB/s",
    )
    return out


def _pieces(size: int, seed: int) -> dict[str, torch.Tensor]:
    """``size`` bytes of fp32 on the GPU in pieces of at most 1 GiB, each from its own seed
    (so that one piece at a time can be made again to check a restore bitwise)."""
    out = {}
    for i, off in enumerate(range(0, size, GiB)):
        g = torch.Generator(device="cuda").manual_seed(seed + i)
        out[f"w{i}"] = torch.randn(min(GiB, size - off) // 4, device="cuda", generator=g)
    return out


def _same_pieces(state: dict[str, torch.Tensor], seed: int) -> bool:
    for i, name in enumerate(state):
        g = torch.Generator(device="cuda").manual_seed(seed + i)
        want = torch.randn(state[name].numel(), device="cuda", generator=g)
        if not torch.equal(state[name], want):
            return False
        del want
    return True


def check_save_blocking(ctx: Ctx) -> dict[str, Any]:
    """2: ``save`` blocking time vs size (1, 4 and 16 GiB where they fit, else 256 MiB), warm
    and pinned, against the registered D2H bandwidth of check 1; no registration during warm
    saves; then ``restore`` host-to-device into the zeroed state, checked bitwise."""
    sizes = [s for s in (GiB, 4 * GiB, 16 * GiB) if ctx.fits(s)] or [256 * MiB]
    rows: list[dict[str, Any]] = []
    for size in sizes:
        if time.monotonic() - ctx.start > ctx.args.budget_s * 0.6:
            rows.append({"bytes": size, "skipped": "budget"})
            continue
        state = _pieces(size, seed=size >> 20)
        with ctx.ckpt(f"save-{size >> 20}M") as ck:
            step = warm(ck, state)
            slots = parts(ck).stager.slots
            require(all(s.pinned for s in slots), "a slot is not pinned after two saves")
            require(
                all(s.tensor(0, 1, torch.uint8, (1,)).is_pinned() for s in slots), "a slot is not page-locked"
            )
            registrations = ctx.spy.count("register")
            walls, blocking, cold = [], [], []
            for s in range(step, step + 3):
                torch.cuda.synchronize()
                t0 = time.perf_counter()
                h = ck.save(s, state)
                walls.append(time.perf_counter() - t0)
                stats = ck.stats
                blocking.append(float(stats["blocking_s"]))
                cold.append(bool(stats["cold"]))
                assert h is not None
                h.wait()
            require(ctx.spy.count("register") == registrations, "a warm save registered memory")
            require(not any(cold), "a warm save was cold")
            for w, b in zip(walls, blocking, strict=True):
                require(abs(w - b) <= 0.05 * w + 0.003, f"wall {w:.4f} s vs blocking_s {b:.4f} s")
            for t in state.values():
                t.zero_()
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            got = ck.restore(state)
            torch.cuda.synchronize()
            restore_s = time.perf_counter() - t0
            require(got == step + 2, f"restore returned step {got}, not {step + 2}")
            require(_same_pieces(state, seed=size >> 20), "the restored state is not bitwise the saved one")
        median = statistics.median(blocking)
        row = {"bytes": size, "blocking_s": round(median, 4), "gbs": gbs(size, median)}
        registered = ctx.raw.get("registered_d2h_gbs")
        if registered:
            row["x_d2h_floor"] = round(median / (size / (registered * 1e9)), 3)
        row["restore_h2d_s"] = round(restore_s, 4)
        row["restore_gbs"] = gbs(size, restore_s)
        if ctx.raw.get("pinned_h2d_gbs"):
            row["restore_x_h2d_floor"] = round(restore_s / (size / (ctx.raw["pinned_h2d_gbs"] * 1e9)), 3)
        rows.append(row)
        del state
        torch.cuda.empty_cache()
    measured = [r for r in rows if "gbs" in r]
    out: dict[str, Any] = {"sizes": rows}
    if len(measured) >= 2:  # blocking = overhead + bytes / marginal bandwidth
        xs = [float(r["bytes"]) for r in measured]
        ys = [float(r["blocking_s"]) for r in measured]
        slope, intercept = statistics.linear_regression(xs, ys)
        out["overhead_s"] = round(intercept, 4)
        out["marginal_gbs"] = round(1 / max(slope, 1e-15) / 1e9, 3)
    registered = ctx.raw.get("registered_d2h_gbs")
    pageable = ctx.raw.get("pageable_d2h_gbs")
    for r in measured:
        if r["bytes"] < GiB or registered is None or pageable is None:
            continue
        require(
            r["gbs"] >= 0.6 * registered, f"save copy {r['gbs']} GB/s < 0.6 x raw registered {registered}"
        )
        if registered >= 1.5 * pageable:
            require(r["gbs"] >= 1.3 * pageable, f"save copy {r['gbs']} GB/s < 1.3 x pageable {pageable}")
    return out


def check_in_flight(ctx: Ctx) -> dict[str, Any]:
    """3: kernels still running at save time; plus L2 (a failure mid-copy leaves nothing in
    flight) and L5 (a pinned CPU source with a pending copy into it)."""
    out: dict[str, Any] = {}
    x = torch.zeros(16 * MiB, device="cuda")
    a = torch.randn(8192, 8192, dtype=torch.bfloat16, device="cuda")
    y = torch.zeros(8192, 8192, dtype=torch.bfloat16, device="cuda")
    cpu = torch.ones(1000)
    state: dict[str, Any] = {"x": x, "y": y, "cpu": cpu}
    with ctx.ckpt("in-flight") as ck:
        step = warm(ck, state)
        sleep_s(0.5)
        x.fill_(1)
        h = ck.save(step, state)
        out["blocking_s"] = round(float(ck.stats["blocking_s"]), 4)
        x.fill_(2)
        assert h is not None
        h.wait()
        require(ck.restore(state) == step, "restore did not return the step just saved")
        require(bool(torch.all(x == 1)), "the save did not wait for the kernel writing x")
        require(out["blocking_s"] >= 0.4, f"blocking_s {out['blocking_s']} < 0.4 s behind a 0.5 s kernel")

        sleep_s(0.2)
        for _ in range(20):
            torch.matmul(a, a, out=y)
        h = ck.save(step + 1, state)
        final = y.clone()  # queued after the matmuls: their final value
        y.zero_()
        assert h is not None
        h.wait()
        require(ck.restore(state) == step + 1, "restore did not return the step just saved")
        require(same_bits(y, final), "y differs from its value after the matmuls")

        # L2: the hook fires after the CPU tensor's copy, while the GPU copies may be queued.
        sleep_s(0.3)

        def fail(**info: Any) -> None:
            raise RuntimeError("injected failure mid-copy")

        off = hooks.on("stage.tensor", fail)
        try:
            ck.save(step + 2, state)
            raise CheckFailed("the injected failure did not fail the save")
        except RuntimeError as exc:
            require("injected" in str(exc), f"unexpected error: {exc}")
        finally:
            off()
        streams = list(parts(ck).stager._streams.values())
        require(all(s.query() for s in streams), "L2: a staging copy is still in flight after a failed save")
        require(not any(s.busy for s in parts(ck).stager.slots), "the failed save left a slot busy")
        out["l2_synchronized"] = True

    # L5: an offload buffer in pinned host memory, written by a non-blocking copy still queued
    g = torch.full((16 * MiB,), 7, dtype=torch.int32, device="cuda")
    host = torch.zeros(16 * MiB, dtype=torch.int32, pin_memory=True)
    with ctx.ckpt("pinned-source") as ck:
        warm(ck, {"h": host}, first_step=1)
        host.zero_()
        sleep_s(0.3)
        host.copy_(g, non_blocking=True)
        h = ck.save(10, {"h": host})
        torch.cuda.synchronize()
        host.zero_()
        assert h is not None
        h.wait()
        require(ck.restore({"h": host}) == 10, "restore did not return the step just saved")
        require(bool(torch.all(host == 7)), "L5: the pinned source was read before the copy into it landed")
        out["l5_ok"] = True

    # Negative control: without wait_stream a side-stream copy races the kernel (the check can see it).
    side = torch.cuda.Stream()  # type: ignore[no-untyped-call]
    probe = torch.empty(x.numel(), pin_memory=True)
    x.zero_()
    torch.cuda.synchronize()
    sleep_s(0.5)
    x.fill_(1)
    with torch.cuda.stream(side):
        probe.copy_(x, non_blocking=True)
    side.synchronize()
    out["race_detectable"] = not bool(torch.all(probe == 1))
    torch.cuda.synchronize()
    require(out["race_detectable"], "negative control: an unordered copy was not caught racing")
    return out


def _round_trip_cases() -> dict[str, torch.Tensor]:
    gen = torch.Generator(device="cuda").manual_seed(0)
    base = torch.randn(256, 384, device="cuda", generator=gen)
    v = torch.randn(1000, device="cuda", generator=gen)
    cases: dict[str, torch.Tensor] = {
        "f32": base.clone(),
        "f16": base.half(),
        "bf16": base.bfloat16(),
        "f8e4m3": base.to(torch.float8_e4m3fn),
        "f8e5m2": base.to(torch.float8_e5m2),
        "i64": torch.randint(-(2**62), 2**62, (1000,), dtype=torch.int64, device="cuda", generator=gen),
        "u8": torch.randint(0, 256, (4097,), dtype=torch.uint8, device="cuda", generator=gen),
        "bool": base > 0,
        "c64": torch.randn(300, dtype=torch.complex64, device="cuda", generator=gen),
        "scalar": torch.tensor(3.25, device="cuda"),
        "one": torch.ones(1, device="cuda"),
        "empty": torch.empty(0, 5, device="cuda"),
        "big": torch.randn(3 * MiB, device="cuda", generator=gen),  # page-aligned, chunked path
        "transposed": base.t(),
        "strided": base[::3, 1::2],
        "channels_last": torch.randn(4, 8, 16, 16, device="cuda", generator=gen).to(
            memory_format=torch.channels_last
        ),
        "overlap_a": v[0:600],
        "overlap_b": v[400:1000],
        "expanded": torch.randn(384, device="cuda", generator=gen).expand(256, 384),
        "f8_transposed": base.to(torch.float8_e4m3fn).t(),
    }
    uint16 = getattr(torch, "uint16", None)
    if uint16 is not None:  # limited support: only if the copies themselves work
        try:
            u16 = torch.arange(999, dtype=torch.int32, device="cuda").to(uint16)
            torch.empty_like(u16).copy_(u16.cpu(), non_blocking=True)
            torch.cuda.synchronize()
            cases["u16"] = u16
        except (RuntimeError, TypeError, NotImplementedError):
            pass
    return cases


def check_round_trip(ctx: Ctx) -> dict[str, Any]:
    """4: bitwise GPU round trip of dtypes and layouts, restored into GPU targets (dense
    targets keep the source's strides: transposed targets take non-contiguous H2D copies)."""
    state: dict[str, Any] = _round_trip_cases()
    expected = {k: bits(v) for k, v in state.items()}
    with ctx.ckpt("round-trip") as ck:
        h = ck.save(1, state)
        assert h is not None
        h.wait()
        targets: dict[str, Any] = {k: zeroed_like(v) for k, v in state.items()}
        originals = dict(targets)
        require(ck.restore(targets) == 1, "restore did not return the step just saved")
    wrong = [k for k, e in expected.items() if not torch.equal(bits(targets[k]), e)]
    require(not wrong, f"not bitwise equal after the round trip: {wrong}")
    in_place = sorted(k for k in targets if targets[k] is originals[k])
    require(
        "transposed" in in_place and not targets["transposed"].is_contiguous(), "transposed target replaced"
    )
    return {
        "cases": sorted(state),
        "in_place": len(in_place),
        "replaced": sorted(set(targets) - set(in_place)),
    }


def check_conj_neg(ctx: Ctx) -> dict[str, Any]:
    """5: conj/neg views through pinned slots (D1) and, as a control, pageable ones."""
    z = torch.randn(1 << 20, dtype=torch.complex64, device="cuda")
    m = torch.randn(512, 384, dtype=torch.complex64, device="cuda")
    out: dict[str, Any] = {}
    for arm in ("pinned", "pageable"):
        state: dict[str, Any] = {
            "conj": z.conj(),
            "neg": z.conj().imag,
            "conj_t": m.t().conj(),
            "neg_t": m.conj().imag.t(),
        }
        expected = {k: bits(v) for k, v in state.items()}
        real_pin = _staging.Slot.pin
        if arm == "pageable":
            _staging.Slot.pin = lambda self, device: False  # type: ignore[method-assign]
        try:
            with ctx.ckpt(f"conj-{arm}") as ck:
                step = warm(ck, state)
                pinned = all(s.pinned for s in parts(ck).stager.slots)
                require(pinned == (arm == "pinned"), f"{arm} arm: slots pinned = {pinned}")
                h = ck.save(step, state)
                assert h is not None
                h.wait()
                targets: dict[str, Any] = {
                    k: zeroed_like(v.resolve_conj().resolve_neg()) for k, v in state.items()
                }
                require(ck.restore(targets) == step, "restore did not return the step just saved")
        finally:
            _staging.Slot.pin = real_pin  # type: ignore[method-assign]
        wrong = [k for k, e in expected.items() if not torch.equal(bits(targets[k]), e)]
        out[arm] = wrong or "ok"
        require(not wrong, f"{arm} slots: conj/neg views not bitwise equal: {wrong}")
    return out


def check_restore_sync(ctx: Ctx) -> dict[str, Any]:
    """6: restore in place returns with the copies done (L1), replaces only mismatched
    targets, and never hands out views of a slot."""
    n = GiB if ctx.fits(GiB) else 256 * MiB
    w = torch.randn(n // 4, device="cuda")
    state: dict[str, Any] = {"w": w, "m": torch.randn(1000, device="cuda"), "extra": torch.arange(10000.0)}
    out: dict[str, Any] = {"bytes": n}
    with ctx.ckpt("restore-sync") as ck:
        h = ck.save(1, state)
        assert h is not None
        h.wait()
        expected_w, expected_m = w.clone(), state["m"].clone()
        w.zero_()
        mismatched = torch.zeros(1000, dtype=torch.float16, device="cuda")
        targets: dict[str, Any] = {"w": w, "m": mismatched}
        # Queue a long kernel right before the copies: restore must still return after them.
        off = hooks.on("restore.loaded", lambda **info: sleep_s(0.5))
        try:
            t0 = time.perf_counter()
            require(ck.restore(targets) == 1, "restore did not return the step just saved")
            seconds = time.perf_counter() - t0
        finally:
            off()
        fresh = torch.cuda.Stream()  # type: ignore[no-untyped-call]
        with torch.cuda.stream(fresh):  # does not wait for the current stream
            equal = torch.equal(w, expected_w)
        fresh.synchronize()
        require(equal, "L1: restore returned before its host-to-device copies were done")
        out["restore_gbs"] = gbs(n, seconds)
        require(targets["w"] is w, "a matching target was replaced")
        require(targets["m"] is not mismatched and torch.equal(targets["m"], expected_m), "mismatched target")
        extra = targets["extra"]
        require(not extra.is_cuda, "the missing key came back on the GPU")
        p = extra.data_ptr()
        require(all(not lo <= p < hi for lo, hi in slot_ranges(ck)), "a restored tensor aliases a slot")
        kept = extra.clone()
        for step in (2, 3):  # overwrite both slots
            h = ck.save(step, state)
            assert h is not None
            h.wait()
        require(torch.equal(extra, kept), "a restored tensor changed when the slots were overwritten")
    if torch.cuda.device_count() >= 2:  # a target on a device other than the current one
        other = torch.zeros(n // 4, device="cuda:1")
        src = {"w": torch.randn(n // 4, device="cuda:1")}
        with ctx.ckpt("restore-sync-1") as ck:
            h = ck.save(1, src)
            assert h is not None
            h.wait()
            torch.cuda.set_device(0)
            off = hooks.on("restore.loaded", lambda **info: sleep_s(0.5, 1))
            try:
                require(ck.restore({"w": other}) == 1, "restore did not return the step just saved")
            finally:
                off()
            require(torch.cuda.current_stream(1).query(), "L1: cuda:1 still copying after restore returned")
            out["second_device"] = "ok"
    return out


def check_gpu_memory(ctx: Ctx) -> dict[str, Any]:
    """7: GPU memory around a save of a non-contiguous 512 MiB tensor (L6)."""
    n = 512 * MiB if ctx.fits(512 * MiB, gpu_copies=3.0) else 64 * MiB
    base = torch.randn(n // 4 // 8192, 8192, device="cuda")
    state = {"t": base.t()}
    with ctx.ckpt("gpu-memory") as ck:
        ck.prepare(state)
        parts(ck).stager.join_prefault()
        torch.cuda.synchronize()
        allocated, reserved = torch.cuda.memory_allocated(), torch.cuda.memory_reserved()
        h = ck.save(1, state)
        assert h is not None
        h.wait()
        torch.cuda.synchronize()
        after_allocated, after_reserved = torch.cuda.memory_allocated(), torch.cuda.memory_reserved()
        target = {"t": zeroed_like(base).t()}
        require(ck.restore(target) == 1, "restore did not return the step just saved")
        require(same_bits(target["t"], state["t"]), "non-contiguous tensor not bitwise equal")
    require(after_allocated == allocated, f"memory_allocated {allocated} -> {after_allocated}")
    return {"bytes": n, "reserved_growth_bytes": after_reserved - reserved}


_SUBPROCESS_SPY = """
import json, logging, pathlib, sys, threading
import torch
import flashckpt
from flashckpt.staging import stager as _staging
from flashckpt.testing import parts
logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
calls = []
real = torch.cuda.cudart
class Spy:
    def __init__(self, inner, fail):
        self.inner, self.fail = inner, fail
    def __getattr__(self, name):
        return getattr(self.inner, name)
    def cudaHostRegister(self, addr, n, flags):
        rc = self.inner.cudaHostRegister(addr, n, 0xFFFF if self.fail else flags)
        calls.append(("register", threading.current_thread().name, int(rc)))
        return rc
    def cudaHostUnregister(self, addr):
        rc = self.inner.cudaHostUnregister(addr)
        calls.append(("unregister", threading.current_thread().name, int(rc)))
        return rc
"""


def _subprocess(code: str, timeout_s: float = 120.0) -> tuple[dict[str, Any], str]:
    """Run ``code`` (after the spy prelude) in a fresh interpreter; it prints one JSON line."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run(
        [sys.executable, "-c", _SUBPROCESS_SPY + code],
        capture_output=True,
        text=True,
        env=env,
        timeout=timeout_s,
    )
    require(proc.returncode == 0, f"subprocess failed ({proc.returncode}): {proc.stderr[-2000:]}")
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    require(bool(lines), f"subprocess printed no result: {proc.stdout[-500:]} {proc.stderr[-2000:]}")
    return json.loads(lines[-1]), proc.stderr


def check_failed_registration(ctx: Ctx) -> dict[str, Any]:
    """8: D2, in a subprocess: a registration forced to fail, then ``(x*2).sum()``."""
    directory = ctx.root / "d2"
    code = f"""
torch.cuda.cudart = lambda: Spy(real(), True)
d = pathlib.Path({str(directory)!r}); d.mkdir(mode=0o700)
ck = flashckpt.Checkpointer({str(ctx.disk / "d2")!r}, memory_dir=str(d),
                            options=flashckpt.Options(prefault=False, fsync=False))
x = torch.randn(1 << 22, device="cuda")
ck.save(0, {{"x": x}}).wait()
error = None
try:
    y = float((x * 2).sum())
    torch.cuda.synchronize()
except Exception as exc:
    error = repr(exc)
pinned = [s.pinned for s in parts(ck).stager.slots]
ck.close()
print(json.dumps({{"next_kernel_error": error, "calls": calls, "pinned": pinned}}))
"""
    result, stderr = _subprocess(code)
    require(any(c[0] == "register" and c[2] != 0 for c in result["calls"]), "the registration did not fail")
    require(result["next_kernel_error"] is None, f"D2: the next kernel raised {result['next_kernel_error']}")
    require(not any(result["pinned"]), "a slot claims to be pinned after a failed registration")
    warned = [ln for ln in stderr.splitlines() if "cudaHostRegister" in ln]
    require(len(warned) == 1, f"expected one warning naming the error, got {warned}")
    return {"warning": warned[0][-200:]}


def check_cpu_state(ctx: Ctx) -> dict[str, Any]:
    """9: D3/L3, in a subprocess: a CPU-only state never initialises CUDA."""
    code = f"""
torch.cuda.cudart = lambda: Spy(real(), False)
with flashckpt.Checkpointer({str(ctx.disk / "cpu")!r}, memory_dir={str(ctx.root / "cpu")!r},
                            options=flashckpt.Options(fsync=False)) as ck:
    state = {{"w": torch.randn(1 << 22), "n": 3}}
    ck.restore(state)
    for step in range(4):
        ck.save(step, state).wait()
    restored = ck.restore(state)
print(json.dumps({{"initialized": torch.cuda.is_initialized(), "calls": calls, "restored": restored}}))
"""
    result, _ = _subprocess(code)
    require(result["restored"] == 3, f"restore returned {result['restored']}")
    require(not result["initialized"], "L3: a CPU-only state initialised CUDA")
    require(result["calls"] == [], f"L3: a CPU-only state registered memory: {result['calls']}")
    return {"initialized": result["initialized"]}


def check_fsdp2(ctx: Ctx) -> dict[str, Any]:
    """10: FSDP2 ``fully_shard`` on a 1-GPU NCCL group: save, zero, restore the local shards."""
    code = f"""
from datetime import timedelta
import torch.distributed as dist
from torch.distributed.fsdp import fully_shard
torch.cuda.set_device(0)
dist.init_process_group("nccl", init_method="file://{ctx.disk / "fsdp-rdzv"}", rank=0, world_size=1,
                        timeout=timedelta(seconds=60))
torch.manual_seed(0)
model = torch.nn.Sequential(torch.nn.Linear(1024, 1024), torch.nn.ReLU(), torch.nn.Linear(1024, 1024)).cuda()
fully_shard(model)
optim = torch.optim.AdamW(model.parameters())
model(torch.randn(8, 1024, device="cuda")).sum().backward()
optim.step()
def local(sd):
    return {{k: (v.to_local() if hasattr(v, "to_local") else v).detach().clone() for k, v in sd.items()}}
expected = local(model.state_dict())
with flashckpt.Checkpointer({str(ctx.disk / "fsdp")!r}, memory_dir={str(ctx.root / "fsdp")!r},
                            options=flashckpt.Options(fsync=False)) as ck:
    state = {{"model": model, "optim": optim}}
    ck.save(0, state).wait()
    with torch.no_grad():
        for p in model.parameters():
            p.zero_()
    restored = ck.restore(state)
got = local(model.state_dict())
wrong = [k for k in expected if not torch.equal(expected[k].cpu().view(-1).view(torch.uint8),
                                                got[k].cpu().contiguous().view(-1).view(torch.uint8))]
dist.destroy_process_group()
print(json.dumps({{"restored": restored, "wrong": wrong, "keys": len(expected)}}))
"""
    result, _ = _subprocess(code, timeout_s=180.0)
    require(result["restored"] == 0, f"restore returned {result['restored']}")
    require(result["wrong"] == [], f"local shards differ: {result['wrong']}")
    return {"keys": result["keys"]}


def check_accounting(ctx: Ctx) -> dict[str, Any]:
    """11 (always last): every successful registration of this process has exactly one later
    unregistration with rc 0, none is registered twice, and all registrations happened on the
    training thread under the training device (D3)."""
    live: dict[int, Call] = {}
    problems: list[str] = []
    for c in ctx.spy.calls:
        if c.op == "register":
            if c.rc != 0:
                continue
            if c.addr in live:
                problems.append(f"registered twice: {c.addr:#x}")
            live[c.addr] = c
        else:
            reg = live.pop(c.addr, None)
            if reg is None:
                problems.append(f"unregistered without a registration: {c.addr:#x} rc {c.rc}")
            elif c.rc != 0:
                problems.append(f"unregistration failed: {c.addr:#x} rc {c.rc}")
            elif c.device != reg.device:
                problems.append(f"unregistered under cuda:{c.device}, registered under cuda:{reg.device}")
    problems += [f"never unregistered: {c.addr:#x} ({c.nbytes} bytes)" for c in live.values()]
    main = threading.main_thread().name
    training_device = torch.cuda.current_device()
    registrations = [c for c in ctx.spy.calls if c.op == "register"]
    where = sorted({(c.thread, c.device) for c in registrations})
    problems += [f"D3: registration on {t} (cuda:{d})" for t, d in where if t != main or d != training_device]
    seconds = [c.seconds * GiB / c.nbytes for c in registrations if c.nbytes and c.rc == 0]
    out = {
        "registrations": len(registrations),
        "unregistrations": ctx.spy.count("unregister"),
        "where": [f"{t}@cuda:{d}" for t, d in where],
        "register_s_per_gib_median": round(statistics.median(seconds), 4) if seconds else None,
    }
    require(not problems, "; ".join(problems[:10]))
    return out


@dataclass(frozen=True)
class Check:
    number: int
    name: str
    run: Callable[[Ctx], dict[str, Any]]
    always: bool = False


CHECKS = (
    Check(1, "raw bandwidth", check_raw_bandwidth),
    Check(2, "save blocking vs size", check_save_blocking),
    Check(3, "kernels in flight, L2, L5", check_in_flight),
    Check(4, "bitwise round trip", check_round_trip),
    Check(5, "conj/neg views (D1)", check_conj_neg),
    Check(6, "restore sync and aliasing (L1)", check_restore_sync),
    Check(7, "GPU memory, non-contiguous (L6)", check_gpu_memory),
    Check(8, "failed registration (D2)", check_failed_registration),
    Check(9, "CPU-only state (L3)", check_cpu_state),
    Check(10, "FSDP2 shards", check_fsdp2),
    Check(11, "registration accounting (D3)", check_accounting, always=True),
)


def run_check(ctx: Ctx, check: Check) -> dict[str, Any]:
    line: dict[str, Any] = {"check": check.number, "name": check.name}
    elapsed = time.monotonic() - ctx.start
    if elapsed > ctx.args.budget_s and not check.always:
        line["status"] = "skipped"
        line["reason"] = f"time budget ({ctx.args.budget_s:.0f} s) spent"
        return line
    t0 = time.monotonic()
    try:
        line["metrics"] = check.run(ctx)
        line["status"] = "pass"
    except CheckFailed as exc:
        line["status"] = "fail"
        line["error"] = str(exc)
    except Exception as exc:
        line["status"] = "error"
        line["error"] = f"{type(exc).__name__}: {exc}"
        line["traceback"] = traceback.format_exc()[-3000:]
    line["seconds"] = round(time.monotonic() - t0, 3)
    gc.collect()
    try:  # a sticky CUDA error would fail every later check: say so here
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
    except Exception as exc:
        line["status"] = "error"
        line["cleanup_error"] = f"{type(exc).__name__}: {exc}"
    return line


def shm_root() -> tuple[Path, int]:
    """/dev/shm when it has more than 6 GiB free, else the temporary directory."""
    if SHM.is_dir():
        st = os.statvfs(SHM)
        free = st.f_bavail * st.f_frsize
        if free > 6 * GiB:
            return SHM, free
    tmp = Path(tempfile.gettempdir())
    st = os.statvfs(tmp)
    return tmp, st.f_bavail * st.f_frsize


@contextmanager
def workspace() -> Iterator[tuple[Path, Path, int]]:
    base, free = shm_root()
    root = Path(tempfile.mkdtemp(prefix="flashckpt-gpu-", dir=base))
    disk = Path(tempfile.mkdtemp(prefix="flashckpt-gpu-disk-"))
    try:
        yield root, disk, free
    finally:
        shutil.rmtree(root, ignore_errors=True)
        shutil.rmtree(disk, ignore_errors=True)


def markdown(summary: dict[str, Any]) -> str:
    """The summary as a page: every check's status, and the save/restore figures by size."""
    c = summary["counts"]
    lines = [
        f"# flashckpt GPU check: {summary['device']} ({summary['devices']} device(s))",
        "",
        f"torch {summary['torch']}, CUDA {summary['cuda']}; {summary['seconds']:.0f} s. "
        f"{c['pass']} passed, {c['fail']} failed, {c['error']} errors, {c['skipped']} skipped.",
        "",
        "| check | status | seconds | note |",
        "| --- | --- | --- | --- |",
    ]
    for ln in summary["checks"]:
        note = ln.get("error") or ln.get("reason") or ""
        lines.append(
            f"| {ln['check']}. {ln['name']} | {ln['status']} | {ln.get('seconds', '')} | {note[:200]} |"
        )
    saves = next((ln for ln in summary["checks"] if ln["check"] == 2 and "metrics" in ln), None)
    if saves is not None:
        lines += [
            "",
            "| size | save blocking | x registered D2H floor | restore H2D | x pinned H2D floor | bitwise |",
            "| --- | --- | --- | --- | --- | --- |",
        ]
        for r in saves["metrics"]["sizes"]:
            if "skipped" in r:
                lines.append(f"| {r['bytes'] / GiB:g} GiB | skipped ({r['skipped']}) | | | | |")
                continue
            save = f"{r['blocking_s']:.4f} s ({r['gbs']} GB/s) | {r.get('x_d2h_floor', '—')}"
            load = (
                f"{r['restore_h2d_s']:.4f} s ({r['restore_gbs']} GB/s) | {r.get('restore_x_h2d_floor', '—')}"
            )
            lines.append(f"| {r['bytes'] / GiB:g} GiB | {save} | {load} | yes |")
    return "\n".join(lines) + "\n"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    p.add_argument("--out", default="bench/results/gpu", help="directory for gpu-summary.json")
    p.add_argument("--budget-s", type=float, default=150.0, help="checks that would start later are skipped")
    p.add_argument("--only", default="", help="comma-separated check numbers to run (11 always runs)")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if not torch.cuda.is_available():
        print("no CUDA device: skipped")
        return 0
    only = {int(x) for x in args.only.split(",") if x.strip()}
    spy = CudartSpy()
    spy.install()
    torch.cuda.set_device(0)  # the training device of this process
    started = time.time()
    lines = []
    try:
        with workspace() as (root, disk, free):
            ctx = Ctx(args, spy, root, disk, free)
            for check in CHECKS:
                if only and check.number not in only and not check.always:
                    continue
                line = run_check(ctx, check)
                lines.append(line)
                print(json.dumps(line), flush=True)
    finally:
        spy.uninstall()
    summary = {
        "device": torch.cuda.get_device_name(0),
        "devices": torch.cuda.device_count(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "started": started,
        "seconds": round(time.time() - started, 3),
        "budget_s": args.budget_s,
        "counts": {
            s: sum(1 for ln in lines if ln["status"] == s) for s in ("pass", "fail", "error", "skipped")
        },
        "checks": lines,
        "spy": [asdict(c) for c in spy.calls],
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "gpu-summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    (out / "gpu-summary.md").write_text(markdown(summary))
    print(json.dumps({"summary": str(out / "gpu-summary.json"), **summary["counts"]}), flush=True)
    return 1 if summary["counts"]["fail"] or summary["counts"]["error"] else 0


if __name__ == "__main__":
    sys.exit(main())
