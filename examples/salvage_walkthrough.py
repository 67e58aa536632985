"""Example: a job dies with its newest steps only in memory; the operator salvages them.

    python examples/salvage_walkthrough.py

The job checkpoints every step into shared memory but persists only every 10th (cheap
snapshots, rare writes).  It is SIGKILLed at step 17: storage holds step 10, the node's
memory holds 16 and 17.  The node is about to be recycled, so the operator, on that node:

    flashckpt ls URL --memory-dir D        # which steps are where, and which a restart picks
    flashckpt salvage URL --memory-dir D   # persist and commit what only memory holds

then the node's memory is wiped, and the job restarts elsewhere: it resumes from storage at
step 17 instead of 10.  The final weights are compared bit for bit with an uninterrupted run.
(A multi-node job runs ``salvage`` on every surviving node; the last one commits.)
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import torch
from _story import verdict, workspace  # examples/_story.py: scratch dirs, the closing check

import flashckpt

STEPS, CRASH_AT = 25, 17


def build() -> dict[str, Any]:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(32, 128), torch.nn.Tanh(), torch.nn.Linear(128, 32))
    return {"model": model, "optim": torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)}


def train(storage: Path, memory: Path, crash: bool) -> None:
    """One attempt (its own process)."""
    state = build()
    with flashckpt.Checkpointer(storage, memory_dir=memory, persist_every=10, preempt_signals=None) as ckpt:
        start = ckpt.restore(state)
        if start is not None:
            print(f"  restored step {start} from the {ckpt.stats['restored']['tier']} tier")
        for step in range(0 if start is None else start + 1, STEPS):
            x = torch.randn(16, 32, generator=torch.Generator().manual_seed(step))
            loss = torch.nn.functional.mse_loss(state["model"](x), x.flip(1))
            state["optim"].zero_grad()
            loss.backward()
            state["optim"].step()
            ckpt.save(step, state)
            if crash and step == CRASH_AT:
                ckpt.wait()  # (only so that the story is exact: step 10 is durable)
                print(f"  *** SIGKILL at step {step} ***", flush=True)
                os.kill(os.getpid(), signal.SIGKILL)
    torch.save(state["model"].state_dict(), storage.parent / "final.pt")


def flashckpt_cli(*args: str) -> None:
    print("$ flashckpt " + " ".join(args), flush=True)
    subprocess.run([sys.executable, "-m", "flashckpt.cli", *args], check=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--attempt", choices=["crash", "resume"])
    ap.add_argument("--storage", type=Path)
    ap.add_argument("--memory", type=Path)
    args = ap.parse_args()
    if args.attempt:
        train(args.storage, args.memory, crash=args.attempt == "crash")
        return
    with workspace("salvage") as (base, shm):
        storage, memory = base / "storage", shm / "node"
        me = [sys.executable, os.path.abspath(__file__), "--storage", str(storage)]
        print("the job: every step into memory, every 10th to storage")
        subprocess.run([*me, "--attempt", "crash", "--memory", str(memory)])
        print("the operator, on the dead job's node:")
        flashckpt_cli("ls", str(storage), "--memory-dir", str(memory))
        flashckpt_cli("salvage", str(storage), "--memory-dir", str(memory))
        shutil.rmtree(memory)
        print("the node is recycled (its memory wiped); the job restarts on another one:")
        subprocess.run([*me, "--attempt", "resume", "--memory", str(shm / "other-node")], check=True)
        ref = build()
        for step in range(STEPS):
            x = torch.randn(16, 32, generator=torch.Generator().manual_seed(step))
            loss = torch.nn.functional.mse_loss(ref["model"](x), x.flip(1))
            ref["optim"].zero_grad()
            loss.backward()
            ref["optim"].step()
        final = torch.load(base / "final.pt", weights_only=True)
        verdict(final, ref["model"].state_dict())


if __name__ == "__main__":
    main()
