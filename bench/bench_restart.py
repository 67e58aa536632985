"""A fresh job after a crash: the Checkpointer's constructor plus ``restore`` from memory.

    python -m bench.bench_restart [--ranks 2] [--mib 1024] [--repeats 3] [--split] [--markdown]

Each round: ``--ranks`` processes (gloo, one machine) save one step of a data-parallel state
(``--mib`` per rank, identical on every rank) into memory and die without closing (the memory
tier stays, as after a crash).  New processes then build a Checkpointer on the same memory
directories and restore: the constructor's time and the restore's are measured per rank, the
slowest rank counts.  Baseline, measured in the same run: every rank copying its state into
a preallocated buffer at the same time (the floor of any restore that lands in the state;
flashckpt's also verifies every byte).  Median over ``--repeats`` rounds.  ``--split``: the
ranks share one memory directory with ``dedup_replicated``, so the snapshot restored is
staged once per node (each rank reads the other's part from its slot).
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

import torch
import torch.multiprocessing as mp

import flashckpt

MiB = 1 << 20


def make_state(mib: int) -> dict[str, torch.Tensor]:
    """A data-parallel state: the same on every rank (seed 0), 64 MiB fp32 tensors."""
    g = torch.Generator().manual_seed(0)
    n = max(1, mib // 64)
    return {f"w{i}": torch.randn(16 * MiB, generator=g) for i in range(n)}


def _init(rank: int, world: int, init: str) -> None:
    torch.distributed.init_process_group(
        "gloo", init_method=init, rank=rank, world_size=world, timeout=timedelta(seconds=300)
    )


def _memory(args: argparse.Namespace, rank: int) -> Path:
    """``--split``: one memory directory for the node (its ranks share replicated state)."""
    return Path(args.shm) if args.split else Path(args.shm) / f"r{rank}"


def _options(args: argparse.Namespace) -> flashckpt.Options:
    return flashckpt.Options(coord_timeout_s=300, dedup_replicated=args.split)


def save_and_die(rank: int, world: int, init: str, args: argparse.Namespace) -> None:
    torch.set_num_threads(args.threads)
    _init(rank, world, init)
    state = make_state(args.mib)
    ckpt = flashckpt.Checkpointer(args.storage, memory_dir=_memory(args, rank), persist_every=1000,
                                  options=_options(args), preempt_signals=None)  # fmt: skip
    ckpt.restore(state)
    # --split: the third save is staged once per node (the first two show the ranks' chunks
    # changing alike); the last save is the one restored
    for step in range(3 if args.split else 1):
        for v in state.values():
            v.add_(1.0)
        h = ckpt.save(step, state)
        assert h is not None
        h.wait()
        torch.distributed.barrier()
    os._exit(0)  # the job dies: its memory tier stays


def restart(rank: int, world: int, init: str, args: argparse.Namespace, out: str) -> None:
    torch.set_num_threads(args.threads)
    _init(rank, world, init)
    # a restarted job has built its model: the state's memory is faulted in, as is the floor's
    state = {k: torch.zeros_like(v) for k, v in make_state(args.mib).items()}
    floor_dst = {k: torch.ones_like(v) for k, v in state.items()}
    torch.distributed.barrier()
    t0 = time.perf_counter()
    for k, v in state.items():
        floor_dst[k].copy_(v)
    floor = time.perf_counter() - t0
    del floor_dst
    torch.distributed.barrier()
    t0 = time.perf_counter()
    ckpt = flashckpt.Checkpointer(args.storage, memory_dir=_memory(args, rank), persist_every=1000,
                                  options=_options(args), preempt_signals=None)  # fmt: skip
    t1 = time.perf_counter()
    got = ckpt.restore(state)
    t2 = time.perf_counter()
    assert got == (2 if args.split else 0) and ckpt.stats["restored"]["tier"] == "memory", ckpt.stats
    want = make_state(args.mib)
    for _ in range(got + 1):  # as the saves updated it
        for v in want.values():
            v.add_(1.0)
    assert all(torch.equal(v, want[k]) for k, v in state.items()), "restored other bytes"
    res = {"floor": floor, "constructor": t1 - t0, "restore": t2 - t1, "total": t2 - t0}
    (Path(out) / f"rank{rank}.json").write_text(json.dumps(res))
    torch.distributed.barrier()
    os._exit(0)  # (no close: the next round starts from the same kind of leftover memory)


def one_round(args: argparse.Namespace, i: int) -> dict[str, float]:
    base = Path(tempfile.mkdtemp(prefix="flashckpt-bench-restart-"))
    shm = Path(tempfile.mkdtemp(prefix="flashckpt-bench-restart-", dir="/dev/shm"))
    args.storage, args.shm = str(base / "storage"), str(shm)
    try:
        for phase, fn in enumerate((save_and_die, restart)):
            init = f"file://{base}/rendezvous-{phase}"
            extra = (str(base),) if fn is restart else ()
            mp.start_processes(
                fn, args=(args.ranks, init, args, *extra), nprocs=args.ranks, start_method="spawn"
            )
        ranks = [json.loads((base / f"rank{r}.json").read_text()) for r in range(args.ranks)]
        return {k: max(r[k] for r in ranks) for k in ranks[0]}
    finally:
        shutil.rmtree(base, ignore_errors=True)
        shutil.rmtree(shm, ignore_errors=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ranks", type=int, default=2)
    ap.add_argument("--mib", type=int, default=1024, help="state per rank, MiB")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--markdown", action="store_true")
    ap.add_argument(
        "--split",
        action="store_true",
        help="dedup_replicated, one memory directory: state staged once per node",
    )
    args = ap.parse_args()
    args.threads = max(1, (os.cpu_count() or 2) // args.ranks)
    rounds = [one_round(args, i) for i in range(args.repeats)]
    med = {k: statistics.median(r[k] for r in rounds) for k in rounds[0]}
    rows = [
        ("floor: every rank copies its state at once", med["floor"]),
        ("Checkpointer constructor (slowest rank)", med["constructor"]),
        ("restore from memory, every byte verified (slowest rank)", med["restore"]),
        ("constructor + restore (slowest rank)", med["total"]),
    ]
    if args.markdown:
        print(f"| {args.ranks} ranks, {args.mib} MiB each, median of {args.repeats} | seconds | x floor |")
        print("| --- | --- | --- |")
        for name, s in rows:
            print(f"| {name} | {s:.3f} | {s / med['floor']:.2f}x |")
    else:
        for name, s in rows:
            print(f"{name:<60} {s:8.3f} s  {s / med['floor']:5.2f}x")


if __name__ == "__main__":
    main()
