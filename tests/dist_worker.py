"""One rank of a multi-rank training job for the distributed tests, run under ``torchrun``.

``python -m torch.distributed.run --nproc-per-node N -m tests.dist_worker --out DIR ...``

Each rank trains its own shard of a small model (a ``TinyNet`` seeded by its rank) with
gradients averaged over the gloo group, so the ranks are coupled exactly as in data- and
model-parallel jobs.  Ranks 2k and 2k+1 form simulated node k (``--node-shift`` renumbers:
node k+SHIFT): ``FLASHCKPT_NODE_ID`` and a memory directory per node.  Initialisation uses a
per-attempt ``PrefixStore`` (DESIGN.md).

``--kill-rank R --kill-step S --kill-at WHERE`` SIGKILLs rank R in attempt 0 while step S is
``stage`` (half copied into the slot), ``persist`` (a chunk of it being written to storage) or
``commit`` (whichever rank arrives last, about to write the commit record: R is ignored).
At the end every rank writes its final state to ``DIR/final-rank{R}.pt`` and what it restored
to ``DIR/attempt{A}-rank{R}.json``; in attempt 0 each rank appends every step whose ``save``
returned to ``DIR/staged-rank{R}``.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import threading
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

import flashckpt
from flashckpt import _hooks as hooks
from tests.conftest import make_state


def _die() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


# Held by the training thread from ``save`` until the step is written to ``staged-rank{R}``.
# A kill from a background thread (persist, commit) takes it first, so that the file never
# misses a step whose save had returned; if the training thread holds it for long, it is
# blocked inside ``save`` (waiting for a slot), where a kill is just as exact.
_window = threading.Lock()


def _die_from_background() -> None:
    _window.acquire(timeout=5)
    _die()


def _arm(where: str, step: int) -> None:
    """Make this process SIGKILL itself at ``where`` of ``step`` (the library's event seam)."""
    if where == "stage":

        def stage(index: int, count: int, **_: Any) -> None:
            if _current["step"] == step and index == count // 2:
                _die()  # half of the tensors are in the slot

        hooks.on("stage.tensor", stage)
    elif where == "persist":

        def chunk(step: int, tier: str, **_: Any) -> None:
            if tier == "storage" and step == kill_step:
                _die_from_background()  # a chunk of it is on storage, the rest is not

        kill_step = step
        hooks.on("persist.chunk", chunk)
    elif where == "commit":

        def commit(step: int, tier: str, **_: Any) -> None:
            if tier == "storage" and step == kill_step:
                _die_from_background()  # every shard is there, the record is not

        kill_step = step
        hooks.on("commit.record", commit)
    else:
        raise SystemExit(f"unknown --kill-at {where}")


_current: dict[str, int | None] = {"step": None}


def train_step(state: dict[str, Any], step: int, rank: int) -> None:
    model, optim, sched = state["model"], state["optim"], state["sched"]
    g = torch.Generator().manual_seed(1000 * (rank + 1) + step)
    idx = torch.randint(0, 32, (8,), generator=g)
    loss = torch.nn.functional.cross_entropy(model(idx), idx)
    optim.zero_grad()
    loss.backward()
    for p in model.parameters():  # the coupling of a data-parallel job
        if p.grad is not None:
            dist.all_reduce(p.grad)
            p.grad /= dist.get_world_size()
    optim.step()
    sched.step()
    state["extra"]["epoch"] = step // 4
    state["extra"]["seen"].append(step)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--storage", required=True)
    ap.add_argument("--memory", required=True, help="base; node k uses BASE/node{k}")
    ap.add_argument("--localdisk", help="base; node k uses BASE/node{k}")
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--keep", type=int, default=2, help="0: keep every step")
    ap.add_argument("--kill-rank", type=int, default=-1)
    ap.add_argument("--kill-step", type=int, default=-1)
    ap.add_argument("--kill-at", default="")
    ap.add_argument("--mirror", type=int, default=None)
    ap.add_argument("--die-at-end", action="store_true", help="SIGKILL every rank once all is durable")
    ap.add_argument("--node-shift", type=int, default=0, help="ranks 2k, 2k+1 run on node k+SHIFT")
    args = ap.parse_args()

    attempt = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"))
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    node = (rank // 2 + args.node_shift) % max(1, world // 2)
    os.environ["FLASHCKPT_NODE_ID"] = f"node{node}"
    dist.init_process_group(
        "gloo",
        store=dist.PrefixStore(f"attempt{attempt}", _agent_store()),
        rank=rank,
        world_size=world,
        timeout=timedelta(seconds=60),
    )
    # the commit is written by whichever rank arrives last: arm them all, the committer dies
    if attempt == 0 and (rank == args.kill_rank or args.kill_at == "commit"):
        _arm(args.kill_at, args.kill_step)

    state = make_state(seed=rank)
    out = Path(args.out)
    local = None if args.localdisk is None else f"{args.localdisk}/node{node}"
    opts = flashckpt.Options(coord_timeout_s=60.0, gc_grace_s=0.0)
    with flashckpt.Checkpointer(
        args.storage,
        local_dir=local,
        memory_dir=f"{args.memory}/node{node}",
        keep=args.keep or None,
        mirror=args.mirror,
        options=opts,
    ) as ckpt:
        start = ckpt.restore(state)
        info = {"start": start, "restored": ckpt.stats.get("restored")}
        (out / f"attempt{attempt}-rank{rank}.json").write_text(json.dumps(info))
        first = 0 if start is None else start + 1
        for step in range(first, args.steps):
            train_step(state, step, rank)
            _current["step"] = step
            with _window:
                ckpt.save(step, state)
                if attempt == 0:
                    with open(out / f"staged-rank{rank}", "a") as f:
                        f.write(f"{step}\n")
        ckpt.wait()
        if args.die_at_end:
            dist.barrier()  # every rank's saves (and mirrors) are done: now the job dies
            _die()
    final = {k: v.state_dict() if hasattr(v, "state_dict") else v for k, v in state.items()}
    torch.save(final, out / f"final-rank{rank}.pt")
    dist.destroy_process_group()
    # Skip interpreter finalization: torch's gloo teardown race (see
    # tests/test_distributed.py::_exit_before_finalization) aborts about 1 run in 40.
    os._exit(0)


def _agent_store() -> dist.Store:
    """The torchrun agent's store (the TCPStore at MASTER_ADDR:MASTER_PORT), as a client."""
    return dist.TCPStore(
        os.environ["MASTER_ADDR"],
        int(os.environ["MASTER_PORT"]),
        is_master=False,
        timeout=timedelta(seconds=60),
        use_libuv=True,
    )


if __name__ == "__main__":
    main()
