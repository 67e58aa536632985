"""Staging slots: the hand-out rule and the prefault, at the Stager level."""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import stat
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, ClassVar

import pytest
import torch

import flashckpt
import flashckpt.errors
from flashckpt import _hooks as hooks
from flashckpt.staging import stager as _staging
from flashckpt.staging.stager import Stager


def _hold_prefault(stager: Stager, until: Callable[[Any], bool]) -> None:
    """Make the prefault thread, after its first piece of slot 0, wait until ``until(job)``
    (or no piece is left), so that a test does not depend on which thread is faster."""
    pause = stager._wait_for_copies
    slot0 = stager.slots[0]

    def slow_pause() -> None:
        job = slot0.faulting
        deadline = time.monotonic() + 30
        while job is not None and job.next > 0 and not until(job) and job.left():
            assert time.monotonic() < deadline, "the waiting save never helped"
            time.sleep(0.001)
        pause()

    stager._wait_for_copies = slow_pause  # type: ignore[method-assign]


def _start_prefault(stager: Stager, n: int) -> None:
    """Start the prefault and return once it is faulting slot 0 in."""
    stager.prefault(n)
    deadline = time.monotonic() + 30
    while stager.slots[0].faulting is None and not stager.slots[0].warm(n):
        assert time.monotonic() < deadline
        time.sleep(0.001)


def test_a_save_waiting_for_the_prefault_faults_the_slot_in_alongside_it(shm_dir: Path) -> None:
    shm_dir.mkdir()
    stager = Stager(shm_dir, flashckpt.Options())
    _hold_prefault(stager, until=lambda job: job.helped > 0)
    n = 96 << 20
    try:
        _start_prefault(stager, n)
        slot, waited = stager.acquire(n)
        assert slot is stager.slots[0] and slot.warm(n) and waited > 0
        assert stager.helped_bytes > 0
        # every byte is allocated: no piece was lost between the two threads
        assert os.stat(slot.path).st_blocks * 512 >= slot.capacity >= n
        stager.release(slot)
    finally:
        stager.close(unlink=True)
    assert not any(shm_dir.iterdir())


def test_a_failed_piece_of_a_helping_save_never_leaves_a_warm_slot_with_holes(
    shm_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The waiting save's piece fails (ENOMEM, as on a full memory tier): the prefault must
    not take the slot for mapped, or the next copy would hit unallocated pages (SIGBUS)."""
    shm_dir.mkdir()
    stager = Stager(shm_dir, flashckpt.Options())
    real = _staging._populate_write
    failed = threading.Event()
    main = threading.get_ident()

    def populate(addr: int, length: int) -> None:
        if threading.get_ident() == main and not failed.is_set():
            failed.set()
            raise OSError(errno.ENOMEM, "injected")
        real(addr, length)

    monkeypatch.setattr(_staging, "_populate_write", populate)
    _hold_prefault(stager, until=lambda job: failed.is_set())
    n = 96 << 20
    try:
        _start_prefault(stager, n)
        slot, _ = stager.acquire(n)
        stager.release(slot)
        stager.join_prefault()
        assert failed.is_set()
        for s in stager.slots:  # a slot taken for mapped is allocated to its last byte
            if s.warm(n):
                assert os.stat(s.path).st_blocks * 512 >= s.capacity
        assert not stager.slots[0].warm(n)  # the slot whose piece failed was given up
    finally:
        stager.close(unlink=True)


# -- slot files: never through a link, only a private regular file of this user -------------------

_MiB = 1 << 20


def _plant(kind: str, path: Path, victim: Path) -> None:
    """Put something hostile where a slot file goes."""
    if kind == "symlink":
        path.symlink_to(victim)
    elif kind == "hardlink":
        os.link(victim, path)
    elif kind == "fifo":
        os.mkfifo(path, 0o600)
    elif kind == "directory":
        path.mkdir(mode=0o700)
    elif kind == "group-readable":
        path.write_bytes(b"x" * 4096)
        path.chmod(0o640)
    elif kind == "other-owner":
        if os.geteuid() != 0:
            pytest.skip("needs root to give a file to another user")
        path.write_bytes(b"x" * 4096)
        path.chmod(0o600)
        os.chown(path, 65534, 65534)
    else:
        raise AssertionError(kind)


@pytest.mark.parametrize(
    "kind", ["symlink", "hardlink", "fifo", "directory", "group-readable", "other-owner"]
)
def test_a_planted_slot_file_is_refused_with_an_error_naming_it(shm_dir: Path, kind: str) -> None:
    """Another local user can create files in /dev/shm: a link where slot-0.bin goes must
    not make flashckpt overwrite (or extend, or expose) the file it points to."""
    shm_dir.mkdir(mode=0o700)
    victim = shm_dir / "victim.bin"
    victim.write_bytes(b"precious" * 512)
    victim.chmod(0o600)
    before = victim.read_bytes()
    path = shm_dir / "slot-0.bin"
    _plant(kind, path, victim)
    snapshot = os.lstat(path)
    slot = _staging.Slot(shm_dir, 0)
    with pytest.raises(flashckpt.errors.ConfigError, match=str(path)):
        slot.ensure(2 * _MiB)
    with pytest.raises(flashckpt.errors.ConfigError, match=str(path)):
        slot.adopt()
    assert not slot.mapped
    assert victim.read_bytes() == before and victim.stat().st_mode & 0o777 == 0o600
    after = os.lstat(path)  # what was planted is left as found (size, mode, owner)
    assert (after.st_size, after.st_mode, after.st_uid) == (
        snapshot.st_size,
        snapshot.st_mode,
        snapshot.st_uid,
    )


def test_a_planted_link_fails_the_save_and_the_prefault_logs_it(
    shm_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    shm_dir.mkdir(mode=0o700)
    victim = shm_dir / "victim.bin"
    victim.write_bytes(b"precious")
    (shm_dir / "slot-0.bin").symlink_to(victim)
    stager = Stager(shm_dir, flashckpt.Options())
    t = torch.arange(1000, dtype=torch.float32)
    layout = stager.layout([t])
    try:
        stager.prefault(layout.total_bytes)
        stager.join_prefault()
        assert "slot-0.bin" in caplog.text and "symbolic link" in caplog.text
        assert not any(s.busy for s in stager.slots)  # the prefault left both slots released
        slot, _ = stager.acquire(layout.total_bytes)
        assert slot is stager.slots[1]  # the mapped one
        stager.release(slot)
        with pytest.raises(flashckpt.errors.ConfigError, match=r"slot-0\.bin"):
            stager.stage(stager.slots[0], [t], layout)
    finally:
        stager.close(unlink=False)
    assert victim.read_bytes() == b"precious"


def test_slot_files_are_created_private_whatever_the_umask(shm_dir: Path) -> None:
    shm_dir.mkdir(mode=0o700)
    old = os.umask(0o277)  # 0600 & ~0277 = 0400: a file its owner could no longer open to write
    try:
        slot = _staging.Slot(shm_dir, 0)
        slot.ensure(_MiB)
    finally:
        os.umask(old)
    try:
        st = os.stat(slot.path)
        assert stat.S_IMODE(st.st_mode) == 0o600 and st.st_uid == os.geteuid()
        slot.tensor(0, 8, torch.uint8, (8,)).fill_(7)
        slot.release_mapping()
        again = _staging.Slot(shm_dir, 0)  # an existing private slot is adopted, bytes kept
        assert again.adopt() and again.capacity >= _MiB
        assert again.tensor(0, 8, torch.uint8, (8,)).tolist() == [7] * 8
        again.release_mapping()
    finally:
        slot.release_mapping()


# -- the prefault thread never dies silently ------------------------------------------------------


def test_an_unexpected_error_on_the_prefault_thread_is_logged_and_the_slots_released(
    shm_dir: Path, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    shm_dir.mkdir(mode=0o700)
    died: list[BaseException | None] = []
    monkeypatch.setattr(threading, "excepthook", lambda args: died.append(args.exc_value))

    def broken(addr: int, length: int) -> None:
        raise RuntimeError("injected bug")

    monkeypatch.setattr(_staging, "_populate_write", broken)
    monkeypatch.setattr(_staging, "_CAN_POPULATE_WRITE", True)
    stager = Stager(shm_dir, flashckpt.Options())
    try:
        stager.prefault(4 * _MiB)
        stager.join_prefault()
        assert not died, "the prefault thread died with an uncaught exception"
        errors = [
            r for r in caplog.records if r.name == "flashckpt.staging.stager" and r.levelno >= logging.ERROR
        ]
        assert errors and "injected bug" in caplog.text
        assert not any(s.busy or s.prefaulting or s.mapped for s in stager.slots)
    finally:
        stager.close(unlink=True)


# -- CUDA, faked: which thread calls what, and what a failure leaves behind --------------------------


class FakeCuda:
    """Stands in for the CUDA runtime on a machine without a GPU: records every call with its
    thread and (per-thread) current device, and models the runtime's pending last error."""

    ERRORS: ClassVar[dict[int, str]] = {1: "invalid argument", 2: "out of memory"}

    def __init__(self) -> None:
        self.calls: list[tuple[str, str, int | None]] = []  # (call, thread name, device)
        self.register_rc = 0
        self.unregister_rc = 0
        self.cudart_error: Exception | None = None
        self.pending = 0  # the runtime's last error: raised by the next checked kernel launch
        self.registered: dict[int, int] = {}
        self._local = threading.local()

    @property
    def current(self) -> int | None:
        return getattr(self._local, "device", None)

    def _record(self, call: str) -> None:
        self.calls.append((call, threading.current_thread().name, self.current))

    # torch.cuda.cudart()
    def cudart(self) -> FakeCuda:
        if self.cudart_error is not None:
            raise self.cudart_error
        return self

    def cudaHostRegister(self, addr: int, nbytes: int, flags: int) -> int:
        self._record("register")
        if self.register_rc:
            self.pending = self.register_rc
            return self.register_rc
        assert addr not in self.registered
        self.registered[addr] = nbytes
        return 0

    def cudaHostUnregister(self, addr: int) -> int:
        self._record("unregister")
        self.registered.pop(addr, None)
        if self.unregister_rc:
            self.pending = self.unregister_rc
        return self.unregister_rc

    def cudaError(self, code: int) -> int:
        return code

    def cudaGetErrorString(self, code: int) -> str:
        return self.ERRORS[code]

    # libcudart, through ctypes
    def cudaGetLastError(self) -> int:
        rc, self.pending = self.pending, 0
        return rc

    # torch.cuda.device(i)
    @contextlib.contextmanager
    def device(self, index: int) -> Iterator[None]:
        old = self.current
        self._local.device = index
        try:
            yield
        finally:
            self._local.device = old


@pytest.fixture
def fake_cuda(monkeypatch: pytest.MonkeyPatch) -> FakeCuda:
    fake = FakeCuda()
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "cudart", fake.cudart)
    monkeypatch.setattr(_staging, "_device", fake.device)
    monkeypatch.setattr(_staging, "_libcudart", lambda: fake)
    monkeypatch.setattr(_staging, "_warned", set())
    return fake


def test_a_cpu_state_never_touches_cuda_and_the_prefault_thread_never_pins(
    shm_dir: Path, fake_cuda: FakeCuda
) -> None:
    """D3/L3: a background thread starts on device 0 (a registration there creates a context
    on GPU 0 in every rank process), and a CPU-only job must not initialise CUDA at all."""
    shm_dir.mkdir(mode=0o700)
    stager = Stager(shm_dir, flashckpt.Options())
    tensors = [torch.arange(300_000, dtype=torch.float32), torch.ones(3, dtype=torch.float64)]
    layout = stager.layout(tensors)
    try:
        stager.prefault(layout.total_bytes)
        stager.join_prefault()
        for _ in range(3):
            slot, _ = stager.acquire(layout.total_bytes)
            stager.stage(slot, tensors, layout)
            stager.release(slot)
        assert fake_cuda.calls == []
        assert not any(s.pinned for s in stager.slots)
        with _staging.restore_copies(stager.slots[0]) as copies:  # a restore into CPU tensors
            out = torch.empty(300_000, dtype=torch.float32)
            copies.copy(
                out, stager.slots[0].tensor(layout.offsets[0], layout.nbytes[0], torch.float32, (300_000,))
            )
        assert torch.equal(out, tensors[0]) and copies.devices == set()
        assert fake_cuda.calls == []
    finally:
        stager.close(unlink=True)


def test_pinning_happens_on_the_training_thread_under_the_given_device_and_unpinning_under_it_too(
    shm_dir: Path, fake_cuda: FakeCuda
) -> None:
    shm_dir.mkdir(mode=0o700)
    stager = Stager(shm_dir, flashckpt.Options())
    try:
        slot = stager.slots[0]
        slot.ensure(2 * _MiB)
        assert slot.pin(3) and slot.pinned and slot.pin_device == 3
        assert slot.pin(3)  # once per mapping
        me = threading.current_thread().name
        assert fake_cuda.calls == [("register", me, 3)]
        stager.prefault(8 * _MiB)  # growth on the prefault thread unpins (under device 3), never pins
        stager.join_prefault()
        assert slot.capacity >= 8 * _MiB and not slot.pinned
        assert fake_cuda.calls[1:] == [("unregister", "flashckpt-prefault", 3)]
        assert fake_cuda.current is None  # the device selection did not leak out of the call
        mirror = _staging.Slot(shm_dir, 7, pin=False)  # peers' mirrors are never page-locked
        mirror.ensure(_MiB)
        assert not mirror.pin(0) and len(fake_cuda.calls) == 2
        mirror.release_mapping()
        mirror.path.unlink()
    finally:
        stager.close(unlink=True)
    assert fake_cuda.registered == {}


def test_a_failed_registration_leaves_no_pending_cuda_error_and_warns_once(
    shm_dir: Path, fake_cuda: FakeCuda, caplog: pytest.LogCaptureFixture
) -> None:
    """D2: the raw binding only returns the code; the runtime keeps it as the thread's last
    error, and torch's next kernel launch check would raise it as its own failure."""
    shm_dir.mkdir(mode=0o700)
    fake_cuda.register_rc = 2
    slots = [_staging.Slot(shm_dir, 0), _staging.Slot(shm_dir, 1)]
    try:
        for s in slots:
            s.ensure(2 * _MiB)
            assert not s.pin(0) and not s.pinned
            assert fake_cuda.pending == 0
            assert not s.pin(0)  # not retried on every save
        assert [c[0] for c in fake_cuda.calls] == ["register", "register"]
        warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
        assert len(warnings) == 1 and "out of memory (2)" in warnings[0].getMessage()
        assert "slot-0.bin" in warnings[0].getMessage()
        slots[0].ensure(8 * _MiB)  # a new mapping is tried again
        fake_cuda.register_rc = 0
        assert slots[0].pin(0)
    finally:
        for s in slots:
            s.release_mapping()


def test_an_exception_from_cuda_falls_back_to_pageable_copies(
    shm_dir: Path, fake_cuda: FakeCuda, caplog: pytest.LogCaptureFixture
) -> None:
    shm_dir.mkdir(mode=0o700)
    fake_cuda.cudart_error = RuntimeError("Cannot re-initialize CUDA in forked subprocess")
    slot = _staging.Slot(shm_dir, 0)
    try:
        slot.ensure(2 * _MiB)
        assert not slot.pin(0)
        assert "Cannot re-initialize CUDA" in caplog.text
    finally:
        slot.release_mapping()


def test_a_failed_unregistration_is_reported_and_leaves_no_pending_error(
    shm_dir: Path, fake_cuda: FakeCuda, caplog: pytest.LogCaptureFixture
) -> None:
    shm_dir.mkdir(mode=0o700)
    slot = _staging.Slot(shm_dir, 0)
    slot.ensure(2 * _MiB)
    assert slot.pin(1)
    fake_cuda.unregister_rc = 1
    slot.release_mapping()
    assert not slot.mapped and not slot.pinned and fake_cuda.pending == 0
    assert "cudaHostUnregister" in caplog.text and "invalid argument (1)" in caplog.text
    assert fake_cuda.calls[-1] == ("unregister", threading.current_thread().name, 1)


class _FakeCudaTensor:
    """Enough of a CUDA tensor for the bookkeeping around a copy."""

    def __init__(self, like: torch.Tensor, index: int) -> None:
        self.dtype, self.shape = like.dtype, like.shape
        self.device = torch.device("cuda", index)
        self.is_cuda = True
        self.copies: list[bool] = []

    def copy_(self, src: torch.Tensor, non_blocking: bool = False) -> None:
        self.copies.append(non_blocking)


class _FakeStream:
    def __init__(self, error: Exception | None = None) -> None:
        self.synchronized = 0
        self.error = error

    def synchronize(self) -> None:
        self.synchronized += 1
        if self.error is not None:
            raise self.error


def test_a_copy_that_fails_midway_still_waits_for_the_queued_device_copies(
    shm_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """L2: ``save`` releases the slot as soon as ``stage`` raises; a device-to-host DMA still
    writing into it then would land in the next snapshot (or in unmapped memory)."""
    shm_dir.mkdir(mode=0o700)
    stager = Stager(shm_dir, flashckpt.Options())
    streams: list[_FakeStream] = []

    def queue(self: Stager, device: torch.device, pairs: Any, pending: list[Any]) -> None:
        streams.append(_FakeStream())
        pending.append(streams[-1])

    monkeypatch.setattr(Stager, "_copy_from_device", queue)
    monkeypatch.setattr(_staging.Slot, "pin", lambda self, device: False)
    cpu = torch.arange(10, dtype=torch.float32)
    gpu = _FakeCudaTensor(torch.empty(1000, dtype=torch.float32), 0)
    layout = stager.layout([cpu, torch.empty(1000, dtype=torch.float32)])

    def fail(**info: Any) -> None:
        raise OSError(errno.EIO, "injected")

    off = hooks.on("stage.tensor", fail)
    try:
        slot, _ = stager.acquire(layout.total_bytes)
        with pytest.raises(OSError, match="injected"):
            stager.stage(slot, [cpu, gpu], layout)  # type: ignore[list-item]
        assert [s.synchronized for s in streams] == [1]
        stager.release(slot)
    finally:
        off()
        stager.close(unlink=True)


def test_every_staging_stream_is_synchronized_even_if_one_fails() -> None:
    bad, good = _FakeStream(RuntimeError("async error")), _FakeStream()
    with pytest.raises(RuntimeError, match="async error"):
        _staging._synchronize_streams([bad, good], failing=False)
    assert (bad.synchronized, good.synchronized) == (1, 1)
    _staging._synchronize_streams([bad, good], failing=True)  # logged: the copy's error wins
    assert (bad.synchronized, good.synchronized) == (2, 2)


def test_restore_copies_wait_for_every_device_written_even_when_the_restore_fails(
    shm_dir: Path, fake_cuda: FakeCuda, monkeypatch: pytest.MonkeyPatch
) -> None:
    """L1: the host-to-device copies run on each *target's* device; the restore must wait for
    those devices (not the current one only) before the slot is released, error or not."""
    shm_dir.mkdir(mode=0o700)
    synced: list[list[int]] = []
    monkeypatch.setattr(_staging, "_sync_current_streams", lambda devices: synced.append(sorted(devices)))
    slot = _staging.Slot(shm_dir, 0)
    slot.ensure(2 * _MiB)
    src = slot.tensor(0, 4000, torch.float32, (1000,))
    try:
        targets = [_FakeCudaTensor(src, 1), _FakeCudaTensor(src, 2), _FakeCudaTensor(src, 1)]
        with pytest.raises(ValueError, match="load_state_dict"), _staging.restore_copies(slot) as copies:
            for t in targets:
                copies.copy(t, src)  # type: ignore[arg-type]
            assert synced == []
            raise ValueError("load_state_dict refused the state")
        assert synced == [[1, 2]]
        assert all(t.copies == [True] for t in targets)  # non-blocking
        # the slot was pinned for the copies, on this thread, under the first target's device
        assert slot.pinned and fake_cuda.calls == [("register", threading.current_thread().name, 1)]
        with _staging.restore_copies(slot) as copies:
            copies.copy(_FakeCudaTensor(src, 0), src)  # type: ignore[arg-type]
        assert synced[-1] == [0] and len(fake_cuda.calls) == 1
    finally:
        slot.release_mapping()


def test_pinned_cpu_sources_wait_for_the_device_streams_first(
    shm_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """L5: a pinned CPU tensor may be the destination of a non-blocking device-to-host copy
    still queued; its bytes are read only after the current streams got that far."""
    shm_dir.mkdir(mode=0o700)
    events: list[Any] = []
    monkeypatch.setattr(_staging, "_sync_current_streams", lambda devices: events.append(sorted(devices)))
    monkeypatch.setattr(_staging, "_devices_with_context", lambda: [0, 2])
    stager = Stager(shm_dir, flashckpt.Options())
    tensors = [torch.ones(100), torch.zeros(100)]
    layout = stager.layout(tensors)
    off = hooks.on("stage.tensor", lambda **info: events.append(info["index"]))
    try:
        slot, _ = stager.acquire(layout.total_bytes)

        def asked(self: torch.Tensor, *args: Any) -> bool:
            raise AssertionError("is_pinned() asked without CUDA: it may create a context")

        monkeypatch.setattr(torch.Tensor, "is_pinned", asked)
        stager.stage(slot, tensors, layout)  # CUDA not initialised: nothing can be in flight
        assert events == [0, 1]
        monkeypatch.setattr(_staging, "_cuda_initialized", lambda: True)
        monkeypatch.setattr(torch.Tensor, "is_pinned", lambda self, *args: False)
        stager.stage(slot, tensors, layout)
        assert events == [0, 1, 0, 1]
        monkeypatch.setattr(torch.Tensor, "is_pinned", lambda self, *args: self is tensors[1])
        stager.stage(slot, tensors, layout)
        assert events == [0, 1, 0, 1, [0, 2], 0, 1]
        stager.release(slot)
    finally:
        off()
        stager.close(unlink=True)
