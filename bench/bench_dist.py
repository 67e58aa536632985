"""Multi-rank benchmark: N ranks (gloo, one machine) saving and restoring together.

    python -m bench.bench_dist --ranks 4 --mib 256 [--repeats 5] [--markdown]

Measured in one run:

* the single-process floor: one process alone copying one rank's bytes into a preallocated
  buffer (with a rank's thread count: the cores divided among the ranks); and the concurrent
  floor: every rank copying its bytes at the same time (sharing cores and memory bandwidth);
* ``save()`` blocking time per rank (median of ``--repeats`` saves after a warm-up, each save
  made durable before the next so that persistence does not overlap the next copy);
* storage bytes written per rank, by a data-parallel state (identical on every rank) with and
  without ``Options.dedup_replicated``;
* restore time per rank from memory (the same Checkpointer) and from storage (a fresh one);
* restore after a lost node: the ranks as 2 simulated nodes with ``mirror=1``; the job dies
  (every process exits without closing), node 1's memory is deleted, and a new job restores:
  node 0's ranks from their own memory, node 1's from the mirrors node 0 holds (over
  loopback TCP, every byte verified).

The state per rank is transformer-shaped: bf16 weights, fp32 master weights and two Adam
moments, 4 MiB to 64 MiB tensors.  Storage is a local directory (``--dir``, default /tmp).
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
from flashckpt.testing import parts

MiB = 1 << 20


def make_state(mib: int, seed: int) -> dict[str, Any]:
    """About ``mib`` MiB: per block of 14 bytes/param, a bf16 weight and 3 fp32 tensors."""
    g = torch.Generator().manual_seed(seed)
    params = mib * MiB // 14
    out: dict[str, Any] = {"model": {}, "optim": {}}
    i = 0
    while params > 0:
        n = min(params, 4 * MiB)
        w = torch.randn(n, generator=g) * 0.02
        out["model"][f"w{i}"] = w.to(torch.bfloat16)
        out["optim"][f"w{i}"] = {"master": w, "m": torch.zeros(n), "v": torch.zeros(n)}
        params -= n
        i += 1
    return out


def touch(state: dict[str, Any], step: int) -> None:
    """A training step's worth of change, cheap: every tensor changes."""
    for v in state["model"].values():
        v.add_(1e-3)
    for o in state["optim"].values():
        o["m"].add_(step)


def floor_copy(state: dict[str, Any], repeats: int) -> float:
    """Median seconds to copy every tensor of ``state`` into a preallocated buffer."""
    flat = [t for t in _tensors(state)]
    dst = [torch.empty_like(t) for t in flat]
    for d, s in zip(dst, flat, strict=True):
        d.copy_(s)  # fault the destination in
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        for d, s in zip(dst, flat, strict=True):
            d.copy_(s)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def _tensors(state: Any) -> list[torch.Tensor]:
    if isinstance(state, torch.Tensor):
        return [state]
    if isinstance(state, dict):
        return [t for v in state.values() for t in _tensors(v)]
    return []


def worker(rank: int, world: int, init: str, args: argparse.Namespace, out_dir: str) -> None:
    torch.set_num_threads(args.threads)  # ranks share the cores: no oversubscription
    torch.distributed.init_process_group(
        "gloo", init_method=init, rank=rank, world_size=world, timeout=timedelta(seconds=300)
    )
    barrier = torch.distributed.barrier
    res: dict[str, Any] = {}
    base = Path(args.dir)
    shm = Path(args.shm)

    # the concurrent floor: every rank copies at once
    state = make_state(args.mib, seed=rank)
    barrier()
    res["floor_concurrent"] = floor_copy(state, args.repeats)
    res["bytes"] = sum(t.numel() * t.element_size() for t in _tensors(state))

    # save blocking, durable between saves; then restore from memory
    opts = flashckpt.Options(coord_timeout_s=300)
    with flashckpt.Checkpointer(base / "storage", memory_dir=shm / f"a{rank}", keep=2, options=opts) as ckpt:
        assert ckpt.restore(state) is None
        parts(ckpt).stager.join_prefault()  # the cold first save is bench_core's subject, not this one's
        blocking, durable = [], []
        for step in range(args.repeats + 1):
            touch(state, step)
            barrier()
            t0 = time.perf_counter()
            handle = ckpt.save(step, state)
            t1 = time.perf_counter()
            assert handle is not None
            handle.wait()
            t2 = time.perf_counter()
            if step:
                blocking.append(t1 - t0)
                durable.append(t2 - t0)
        res["blocking"] = statistics.median(blocking)
        res["durable"] = statistics.median(durable)
        barrier()
        t0 = time.perf_counter()
        assert ckpt.restore(state) == args.repeats
        res["restore_memory"] = time.perf_counter() - t0
        res["restore_memory_tier"] = ckpt.stats["restored"]["tier"]

    # restore from storage: a fresh Checkpointer, nothing in memory
    with flashckpt.Checkpointer(base / "storage", memory_dir=shm / f"b{rank}", options=opts) as ckpt:
        barrier()
        t0 = time.perf_counter()
        assert ckpt.restore(state) == args.repeats
        res["restore_storage"] = time.perf_counter() - t0
        res["restore_storage_tier"] = ckpt.stats["restored"]["tier"]

    # data-parallel state (identical on every rank): bytes written with and without dedup
    replicated = make_state(args.mib, seed=0)
    for dedup in (False, True):
        o = flashckpt.Options(coord_timeout_s=300, dedup_replicated=dedup)
        where = base / f"ddp-{dedup}"
        with flashckpt.Checkpointer(where, memory_dir=shm / f"d{dedup}{rank}", options=o) as ckpt:
            barrier()
            t0 = time.perf_counter()
            handle = ckpt.save(0, replicated)
            assert handle is not None
            handle.wait()
            res[f"ddp_durable_{dedup}"] = time.perf_counter() - t0
            res[f"ddp_written_{dedup}"] = ckpt.stats["written_bytes"]["storage"]
    (Path(out_dir) / f"rank{rank}.json").write_text(json.dumps(res))
    torch.distributed.destroy_process_group()


def lost_node_worker(rank: int, world: int, phase: int, args: argparse.Namespace, out_dir: str) -> None:
    """Phase 0: save one mirrored step, then die.  Phase 1: restore it, node 1's memory gone."""
    torch.set_num_threads(args.threads)
    os.environ["FLASHCKPT_NODE_ID"] = f"node{rank // 2}"
    os.environ["FLASHCKPT_MIRROR_HOST"] = "127.0.0.1"
    init = f"file://{args.dir}/rendezvous-lost-{phase}"
    torch.distributed.init_process_group(
        "gloo", init_method=init, rank=rank, world_size=world, timeout=timedelta(seconds=300)
    )
    state = make_state(args.mib, seed=rank)
    opts = flashckpt.Options(coord_timeout_s=300)
    memory = Path(args.shm) / "lost" / f"node{rank // 2}"
    ckpt = flashckpt.Checkpointer(Path(args.dir) / "storage-lost", memory_dir=memory, mirror=1, options=opts)
    if phase == 0:
        assert ckpt.restore(state) is None
        handle = ckpt.save(0, state)
        assert handle is not None
        handle.wait()
        torch.distributed.barrier()
        os._exit(0)  # the whole job dies: memory and mirrors stay
    torch.distributed.barrier()
    t0 = time.perf_counter()
    assert ckpt.restore(state) == 0
    res = {"seconds": time.perf_counter() - t0, "tier": ckpt.stats["restored"]["tier"]}
    ckpt.close()
    (Path(out_dir) / f"lost{rank}.json").write_text(json.dumps(res))
    torch.distributed.destroy_process_group()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ranks", type=int, default=4)
    ap.add_argument("--mib", type=int, default=256, help="state per rank, MiB")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--dir", default=None, help="where storage goes (default: a temp dir in /tmp)")
    ap.add_argument("--markdown", action="store_true")
    ap.add_argument("--json", help="also write the raw figures here")
    args = ap.parse_args()
    args.threads = max(1, (os.cpu_count() or 1) // args.ranks)

    tmp = Path(tempfile.mkdtemp(prefix="flashckpt-bench-dist-", dir=args.dir))
    shm = Path(tempfile.mkdtemp(prefix="flashckpt-bench-dist-", dir="/dev/shm"))
    args.dir, args.shm = str(tmp), str(shm)
    try:
        torch.set_num_threads(args.threads)  # a rank's threads, alone on the machine
        single = floor_copy(make_state(args.mib, seed=0), args.repeats)
        out = tmp / "results"
        out.mkdir()
        mp.start_processes(
            worker,
            args=(args.ranks, f"file://{tmp / 'rendezvous'}", args, str(out)),
            nprocs=args.ranks,
            join=True,
            start_method="spawn",
        )
        ranks = [json.loads((out / f"rank{r}.json").read_text()) for r in range(args.ranks)]
        lost: list[dict[str, Any]] = []
        if args.ranks >= 4 and args.ranks % 2 == 0:
            for phase in (0, 1):
                mp.start_processes(
                    lost_node_worker,
                    args=(args.ranks, phase, args, str(out)),
                    nprocs=args.ranks,
                    join=True,
                    start_method="spawn",
                )
                if phase == 0:
                    shutil.rmtree(shm / "lost" / "node1")  # node 1 is lost with its memory
            lost = [json.loads((out / f"lost{r}.json").read_text()) for r in range(args.ranks)]
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.rmtree(shm, ignore_errors=True)
    report(args, single, ranks, lost)


def report(
    args: argparse.Namespace, single: float, ranks: list[dict[str, Any]], lost: list[dict[str, Any]]
) -> None:
    n = args.ranks
    nbytes = ranks[0]["bytes"]

    def worst(key: str) -> float:
        return max(r[key] for r in ranks)

    conc = worst("floor_concurrent")
    rows = [
        ("state per rank", f"{nbytes / MiB:.0f} MiB", ""),
        ("copy floor, one process alone", f"{single:.3f} s", "1.00x"),
        (f"copy floor, {n} ranks at once (slowest rank)", f"{conc:.3f} s", f"{conc / single:.2f}x"),
        (
            "save() blocking per rank (slowest rank, median)",
            f"{worst('blocking'):.3f} s",
            f"{worst('blocking') / single:.2f}x single, {worst('blocking') / conc:.2f}x concurrent",
        ),
        ("save -> committed on storage (slowest rank)", f"{worst('durable'):.3f} s", ""),
        (
            f"restore from memory (slowest rank; {ranks[0]['restore_memory_tier']})",
            f"{worst('restore_memory'):.3f} s",
            f"{worst('restore_memory') / conc:.2f}x concurrent floor",
        ),
        (
            f"restore from storage (slowest rank; {ranks[0]['restore_storage_tier']})",
            f"{worst('restore_storage'):.3f} s",
            f"{worst('restore_storage') / worst('restore_memory'):.1f}x memory",
        ),
    ]
    if lost:
        for tier in sorted({r["tier"] for r in lost}):
            who = [r for r, x in enumerate(lost) if x["tier"] == tier]
            secs = max(lost[r]["seconds"] for r in who)
            rows.append(
                (
                    f"after losing node 1: ranks {', '.join(map(str, who))} restore from {tier} (slowest)",
                    f"{secs:.3f} s",
                    f"{secs / worst('restore_storage'):.2f}x storage",
                )
            )
    plain = [r["ddp_written_False"] for r in ranks]
    dedup = [r["ddp_written_True"] for r in ranks]
    rows += [
        (
            "DDP state, storage bytes written, all ranks: plain / dedup",
            f"{sum(plain) / MiB:.0f} / {sum(dedup) / MiB:.0f} MiB",
            f"{sum(dedup) / sum(plain):.3f}",
        ),
        (
            "DDP state, per rank with dedup (min / max)",
            f"{min(dedup) / MiB:.0f} / {max(dedup) / MiB:.0f} MiB",
            f"{max(dedup) / nbytes:.3f} of a replica",
        ),
        (
            "DDP state, save -> committed: plain / dedup (slowest rank)",
            f"{worst('ddp_durable_False'):.3f} / {worst('ddp_durable_True'):.3f} s",
            f"{worst('ddp_durable_True') / worst('ddp_durable_False'):.2f}x",
        ),
    ]
    if args.markdown:
        print(f"| {n} ranks, {nbytes / MiB:.0f} MiB each | value | ratio |")
        print("| --- | --- | --- |")
        for name, value, ratio in rows:
            print(f"| {name} | {value} | {ratio} |")
    else:
        for name, value, ratio in rows:
            print(f"{name:<62} {value:>20} {ratio}")
    if args.json:
        raw = {"single_floor": single, "ranks": ranks, "lost": lost}
        Path(args.json).write_text(json.dumps(raw, indent=1))


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "2")
    main()
