"""A training process for crash tests: ``python -m tests.crash_worker --storage ... [--slow-put S]``.

Trains with the state of ``tests.conftest``, saves every step, prints ``STAGED <step>`` after
each save returns and ``DURABLE <step>`` when a save is durable.  ``--slow-put`` delays every
chunk put on the storage tier (a declared fault plan), so that a parent can SIGKILL it while a
step is being persisted.  ``--hang`` keeps it alive after the last step until it is killed.
"""

from __future__ import annotations

import argparse
import sys
import time

import flashckpt
from flashckpt.backends import Fault, FaultPlan, FaultyBackend, LocalBackend
from tests.conftest import make_state, train_step


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--storage", required=True)
    ap.add_argument("--memory", required=True)
    ap.add_argument("--local")
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--slow-put", type=float, default=0.0)
    ap.add_argument("--slow-from-step", type=int, default=0)
    ap.add_argument("--hang", action="store_true")
    args = ap.parse_args()

    storage: object = args.storage
    if args.slow_put:
        # delay chunk puts of steps >= slow_from_step (keys look like steps/000000000003/...)
        faults = [
            Fault(op="put", key_contains=f"steps/{s:012d}/", times=None, error=None, delay_s=args.slow_put)
            for s in range(args.slow_from_step, args.steps)
        ]
        storage = FaultyBackend(LocalBackend(args.storage), FaultPlan(faults))
    state = make_state()
    ckpt = flashckpt.Checkpointer(storage, local_dir=args.local, memory_dir=args.memory, keep=None)  # type: ignore[arg-type]
    start = ckpt.restore(state)
    first = 0 if start is None else start + 1
    print(f"START {first}", flush=True)
    for step in range(first, args.steps):
        train_step(state, step)
        handle = ckpt.save(step, state)
        print(f"STAGED {step}", flush=True)
        if handle is not None and not args.slow_put:
            handle.wait()
            print(f"DURABLE {step}", flush=True)
    if args.hang:
        while True:
            time.sleep(1)
    ckpt.close()
    print("DONE", flush=True)
    sys.exit(0)


if __name__ == "__main__":
    main()
