"""Staging slots: the hand-out rule and the prefault, at the Stager level."""

from __future__ import annotations

import errno
import os
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

import flashckpt
from flashckpt import _staging
from flashckpt._staging import Stager


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
