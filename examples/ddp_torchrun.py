"""Example: a 2-rank DDP job under ``torchrun`` loses a rank to SIGKILL and resumes.

    python examples/ddp_torchrun.py          # runs the whole story below and checks it

or one attempt by hand (what a cluster scheduler runs):

    torchrun --nproc-per-node 2 --max-restarts 1 examples/ddp_torchrun.py --workdir /tmp/w

Each rank trains a replica of a small MLP (gradients all-reduced over gloo) and calls
``ckpt.save`` every step; storage gets every 5th step.  At step 13 rank 1 kills itself with
SIGKILL.  torchrun restarts both ranks; ``ckpt.restore`` agrees across the ranks on the
newest step every rank holds (13, from shared memory: never written to storage) and the job
finishes.  The final weights are compared bit for bit with an uninterrupted run.
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import subprocess
import sys
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist
from _story import verdict, workspace  # examples/_story.py: scratch dirs, the closing check

import flashckpt

STEPS, CRASH_AT = 20, 13


def train(workdir: Path, memory: Path, crash: bool) -> None:
    """One rank of one attempt (under torchrun)."""
    # torchrun keeps its store across restarts: each attempt its own prefix (README, "Distributed jobs")
    attempt = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"))
    store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), is_master=False)
    dist.init_process_group(
        "gloo",
        store=dist.PrefixStore(f"attempt{attempt}", store),
        rank=int(os.environ["RANK"]),
        world_size=int(os.environ["WORLD_SIZE"]),
        timeout=timedelta(seconds=60),
    )
    rank = dist.get_rank()
    torch.manual_seed(0)  # every replica starts alike (DDP broadcasts rank 0's anyway)
    net = torch.nn.Sequential(torch.nn.Linear(16, 64), torch.nn.ReLU(), torch.nn.Linear(64, 1))
    model = torch.nn.parallel.DistributedDataParallel(net)
    optim = torch.optim.AdamW(model.parameters(), lr=1e-2)
    state = {"model": model, "optim": optim, "rng": flashckpt.RNGState()}
    with flashckpt.Checkpointer(workdir / "storage", memory_dir=memory, persist_every=5, keep=2) as ckpt:
        start = ckpt.restore(state)  # every rank calls it: they agree on one step
        if rank == 0:
            where = ckpt.stats.get("restored", {}).get("tier")
            got = "" if start is None else f" (restored step {start} from {where})"
            print(f"  attempt {attempt}: start at step {0 if start is None else start + 1}{got}", flush=True)
        for step in range(0 if start is None else start + 1, STEPS):
            g = torch.Generator().manual_seed(step * 2 + rank)  # each rank its own data
            x = torch.randn(32, 16, generator=g)
            loss = torch.nn.functional.mse_loss(model(x), x.sum(1, keepdim=True))
            optim.zero_grad()
            loss.backward()
            optim.step()
            ckpt.save(step, state)
            if rank == 0 and step % 5 == 0:
                print(f"  step {step:2d} loss {loss.item():.4f} save blocked "
                      f"{ckpt.stats['blocking_s'] * 1e3:.2f} ms", flush=True)  # fmt: skip
            if crash and attempt == 0 and rank == 1 and step == CRASH_AT:
                print(
                    f"  *** rank 1 SIGKILLed at step {step} (storage has step {step - step % 5}) ***",
                    flush=True,
                )
                os.kill(os.getpid(), signal.SIGKILL)
    if rank == 0:
        torch.save(net.state_dict(), workdir / "final.pt")
    dist.destroy_process_group()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def torchrun(workdir: Path, memory: Path, crash: bool) -> None:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node=2", "--max-restarts=1",
           "--monitor-interval=0.2", "--master-addr=127.0.0.1", f"--master-port={free_port()}",
           os.path.abspath(__file__), "--workdir", str(workdir), "--memory", str(memory),
           *(["--crash"] if crash else [])]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TMPDIR": str(workdir)}
    subprocess.run(cmd, check=True, env=env, stderr=subprocess.DEVNULL if crash else None)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workdir", type=Path)
    ap.add_argument("--memory", type=Path, help="the memory tier (default: WORKDIR/shm)")
    ap.add_argument("--crash", action="store_true")
    args = ap.parse_args()
    if args.workdir is not None and "RANK" in os.environ:
        train(args.workdir, args.memory or args.workdir / "shm", args.crash)
        return
    with workspace("ddp") as (base, shm):
        runs = {}
        for name, crash in (("crash and resume", True), ("uninterrupted", False)):
            w = base / name.replace(" ", "-")
            w.mkdir()
            print(f"{name}: torchrun, 2 ranks")
            torchrun(w, shm / w.name, crash)
            runs[name] = torch.load(w / "final.pt", weights_only=True)
        verdict(*runs.values())


if __name__ == "__main__":
    main()
