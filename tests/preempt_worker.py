"""A plain training loop that a test preempts with a real signal (tests/test_preemption.py).

``python -m tests.preempt_worker --out DIR --storage S --memory M [--rank R --world W --port P]``

Each step trains ``tests.conftest``'s small model (with ``--world`` > 1 the ranks are coupled
by one ``all_reduce`` per step, as data-parallel ranks are), calls ``ckpt.save`` and appends
the step to ``DIR/steps-rank{R}``.  The loop stops when ``ckpt.preempted`` turns True
(``--ignore-preemption``: it never looks), or hangs in ``time.sleep`` after ``--hang-after``
steps (a loop that never reaches its next ``save``); ``--die-after N`` SIGKILLs the rank after step
``N``'s save (its peer then blocks in the next ``all_reduce``).  At the end it writes
``DIR/end-rank{R}.json`` (the step it restored and from which tier, the last step it trained
and whether it stopped preempted) and its final state to ``DIR/state-rank{R}.pt``.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import time
from pathlib import Path

import torch
import torch.distributed as dist

import flashckpt
from tests.conftest import make_state, train_step


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--storage", required=True)
    ap.add_argument("--memory", required=True)
    ap.add_argument("--rank", type=int, default=0)
    ap.add_argument("--world", type=int, default=1)
    ap.add_argument("--port", type=int, default=0)
    ap.add_argument("--steps", type=int, default=10_000)
    ap.add_argument("--every", type=int, default=1)
    ap.add_argument("--persist-every", type=int, default=1)
    ap.add_argument("--grace", type=float, default=10.0)
    ap.add_argument("--step-sleep", type=float, default=0.05)
    ap.add_argument("--hang-after", type=int, default=-1)
    ap.add_argument("--ignore-preemption", action="store_true")
    ap.add_argument("--die-after", type=int, default=-1, help="SIGKILL this rank after this step's save")
    a = ap.parse_args()
    if a.world > 1:
        os.environ["FLASHCKPT_NODE_ID"] = f"node{a.rank}"
        dist.init_process_group(
            "gloo", init_method=f"tcp://127.0.0.1:{a.port}", rank=a.rank, world_size=a.world
        )
    state = make_state(seed=a.rank)
    memory = Path(a.memory) / f"node{a.rank}" if a.world > 1 else Path(a.memory)
    steps_file = a.out / f"steps-rank{a.rank}"
    end: dict[str, object] = {}
    with flashckpt.Checkpointer(
        a.storage,
        memory_dir=memory,
        every=a.every,
        persist_every=a.persist_every,
        mirror=0,
        options=flashckpt.Options(preempt_grace_s=a.grace, coord_timeout_s=60),
    ) as ckpt:
        start = ckpt.restore(state)
        end["restored"] = start
        end["tier"] = ckpt.stats.get("restored", {}).get("tier")
        last = None
        for step in range(0 if start is None else start + 1, a.steps):
            train_step(state, step)
            if a.world > 1:
                t = torch.ones(1)
                dist.all_reduce(t)
            ckpt.save(step, state)
            last = step
            with steps_file.open("a") as f:
                f.write(f"{step}\n")
            if step == a.hang_after:
                time.sleep(3600)
            if step == a.die_after:
                os.kill(os.getpid(), signal.SIGKILL)
            if not a.ignore_preemption and ckpt.preempted:
                break
            time.sleep(a.step_sleep)
        end["last"] = last
        end["preempted"] = ckpt.preempted
    torch.save({"model": state["model"].state_dict()}, a.out / f"state-rank{a.rank}.pt")  # type: ignore[attr-defined]
    (a.out / f"end-rank{a.rank}.json").write_text(json.dumps(end))
    if a.world > 1:
        dist.destroy_process_group()
        os._exit(0)  # see tests/test_distributed.py::_exit_before_finalization


if __name__ == "__main__":
    main()
