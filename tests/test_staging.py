"""Staging slots: the hand-out rule and the prefault, at the Stager level."""

from __future__ import annotations

import os
import time
from pathlib import Path

import flashckpt
from flashckpt._staging import Stager


def test_a_save_waiting_for_the_prefault_faults_the_slot_in_alongside_it(shm_dir: Path) -> None:
    shm_dir.mkdir()
    stager = Stager(shm_dir, flashckpt.Options())
    pause = stager._wait_for_copies
    slot0 = stager.slots[0]

    def slow_pause() -> None:
        # The prefault thread, after its first piece: hold until the waiting save has helped,
        # so that the test does not depend on which thread is faster.
        job = slot0.faulting
        deadline = time.monotonic() + 30
        while job is not None and job.next > 0 and job.helped == 0 and job.left():
            assert time.monotonic() < deadline, "the waiting save never helped"
            time.sleep(0.001)
        pause()

    stager._wait_for_copies = slow_pause  # type: ignore[method-assign]
    n = 96 << 20
    try:
        stager.prefault(n)
        deadline = time.monotonic() + 30
        while slot0.faulting is None and not slot0.warm(n):
            assert time.monotonic() < deadline
            time.sleep(0.001)
        slot, waited = stager.acquire(n)
        assert slot is slot0 and slot.warm(n) and waited > 0
        assert stager.helped_bytes > 0
        # every byte is allocated: no piece was lost between the two threads
        assert os.stat(slot.path).st_blocks * 512 >= slot.capacity >= n
        stager.release(slot)
    finally:
        stager.close(unlink=True)
    assert not any(shm_dir.iterdir())
