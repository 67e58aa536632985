"""Replicated state staged once per node: a steady save's blocking time and the memory a node holds.

    python -m bench.bench_node [--ranks 2] [--mib 1024] [--saves 5] [--markdown]

``--ranks`` processes on this machine (one node, gloo, one memory directory) hold the same
data-parallel state (``--mib`` per rank, identical everywhere, updated the same way before
every save).  Each save is timed on every rank; the slowest rank counts (training waits for
it at its next collective).  The persist thread seals each snapshot in memory and persists
nothing (``persist_every`` beyond the run): what is measured is the copy a save costs.  Each
save waits for the previous one's seal first, as a training step in between would.

Two Checkpointers in the same run: ``dedup_replicated`` with ``stage_once_per_node`` (the
node's ranks each copy a part of the replicated chunks once they have seen them change the
same way: from the third save on) and without (every rank copies everything).  Baselines in
the same run: one rank copying its state into a preallocated buffer while the others wait
(the copy floor of one rank), every rank doing so at once, and every rank copying its
1/ranks share at once (what the split itself cannot beat: the node's memory bandwidth).
Also: the bytes of the slot files the node holds (``st_blocks``) after the saves.  Median
over ``--saves`` measured saves after ``--warmup`` saves.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import tempfile
import time
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
import torch.multiprocessing as mp

import flashckpt

MiB = 1 << 20


def make_state(mib: int) -> dict[str, torch.Tensor]:
    """A data-parallel state: the same on every rank (seed 0), 64 MiB fp32 tensors."""
    g = torch.Generator().manual_seed(0)
    return {f"w{i}": torch.randn(16 * MiB, generator=g) for i in range(max(1, mib // 64))}


def _floor(
    state: dict[str, torch.Tensor], dst: dict[str, torch.Tensor], share: tuple[int, int] = (0, 1)
) -> float:
    """Copy ``state`` (every ``share[1]``-th tensor from ``share[0]`` on) into ``dst``."""
    r, k = share
    t0 = time.perf_counter()
    for i, (name, v) in enumerate(state.items()):
        if i % k == r:
            dst[name].copy_(v)
    return time.perf_counter() - t0


def _slot_bytes(memory: Path) -> int:
    return sum(p.stat().st_blocks * 512 for p in memory.rglob("slot-*.bin"))


def worker(rank: int, world: int, init: str, args: argparse.Namespace, out: str) -> None:
    torch.set_num_threads(args.threads)
    torch.distributed.init_process_group(
        "gloo", init_method=init, rank=rank, world_size=world, timeout=timedelta(seconds=600)
    )
    barrier = torch.distributed.barrier
    state = make_state(args.mib)
    dst = {k: torch.ones_like(v) for k, v in state.items()}  # faulted in: a preallocated buffer
    res: dict[str, Any] = {"alone": [], "together": [], "share": []}
    for _ in range(args.saves):
        for r in range(world):  # one rank copies while the others wait
            barrier()
            if r == rank:
                res["alone"].append(_floor(state, dst))
        barrier()
        res["together"].append(_floor(state, dst))
        barrier()  # every rank copies its 1/world share at once: the split's own floor
        res["share"].append(_floor(state, dst, (rank, world)))
    del dst
    for mode in ("split", "whole"):
        memory = Path(args.shm) / mode
        opts = flashckpt.Options(
            dedup_replicated=True, stage_once_per_node=mode == "split", coord_timeout_s=600
        )
        ckpt = flashckpt.Checkpointer(f"{args.storage}-{mode}", memory_dir=memory, options=opts,
                                      persist_every=10**9, preempt_signals=None)  # fmt: skip
        times = []
        for step in range(args.warmup + args.saves):
            for v in state.values():
                v.add_(1.0)  # the same update on every rank
            barrier()
            t0 = time.perf_counter()
            h = ckpt.save(step, state)
            times.append(time.perf_counter() - t0)
            assert h is not None
            h.wait()  # sealed in memory (the training step in between)
            barrier()
        res[mode] = times[args.warmup :]
        barrier()
        if rank == 0:
            res[f"{mode}_bytes"] = _slot_bytes(memory)
        barrier()
        ckpt.close()
    (Path(out) / f"rank{rank}.json").write_text(json.dumps(res))
    barrier()
    torch.distributed.destroy_process_group()


def run(args: argparse.Namespace) -> dict[str, float]:
    base = Path(tempfile.mkdtemp(prefix="flashckpt-bench-node-"))
    shm = Path(tempfile.mkdtemp(prefix="flashckpt-bench-node-", dir="/dev/shm"))
    args.storage, args.shm = str(base / "storage"), str(shm)
    try:
        mp.start_processes(
            worker,
            args=(args.ranks, f"file://{base}/rendezvous", args, str(base)),
            nprocs=args.ranks,
            start_method="spawn",
        )
        ranks = [json.loads((base / f"rank{r}.json").read_text()) for r in range(args.ranks)]
    finally:
        shutil.rmtree(base, ignore_errors=True)
        shutil.rmtree(shm, ignore_errors=True)
    out = {}
    for k in ("alone", "together", "share", "split", "whole"):
        slowest = [max(r[k][i] for r in ranks) for i in range(args.saves)]
        out[k] = statistics.median(slowest)
    out["split_bytes"], out["whole_bytes"] = ranks[0]["split_bytes"], ranks[0]["whole_bytes"]
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ranks", type=int, default=2)
    ap.add_argument("--mib", type=int, default=1024, help="state per rank, MiB")
    ap.add_argument("--saves", type=int, default=5)
    ap.add_argument(
        "--warmup", type=int, default=6, help="saves before measuring (the split is learned by then)"
    )
    ap.add_argument("--markdown", action="store_true")
    args = ap.parse_args()
    args.threads = max(1, (os.cpu_count() or 2) // args.ranks)
    m = run(args)
    state = args.mib * MiB
    rows = [
        ("floor: one rank copies its state alone", m["alone"], ""),
        ("floor: every rank copies its state at once", m["together"], ""),
        ("floor: every rank copies its 1/ranks share at once", m["share"], ""),
        ("save blocking, every rank stages its whole state", m["whole"], f"{m['whole_bytes'] / state:.2f}"),
        (
            "save blocking, replicated state staged once per node",
            m["split"],
            f"{m['split_bytes'] / state:.2f}",
        ),
    ]
    head = f"{args.ranks} ranks, {args.mib} MiB each, median of {args.saves} (slowest rank)"
    if args.markdown:
        print(f"| {head} | seconds | x one rank's copy | node memory, states |")
        print("| --- | --- | --- | --- |")
        for name, s, mem in rows:
            print(f"| {name} | {s:.3f} | {s / m['alone']:.2f}x | {mem} |")
    else:
        print(head)
        for name, s, mem in rows:
            print(f"{name:<56} {s:8.3f} s  {s / m['alone']:5.2f}x  {mem}")


if __name__ == "__main__":
    main()
