"""Demo: a CPU training loop checkpoints every step, is killed with SIGKILL, and resumes.

    python examples/demo.py            # (after `bash .ci/setup`; or just `bash examples/run_demo.sh`)

Attempt 1 trains a small transformer and saves every step (persisting every 5th step to
disk); at step 23 the process kills itself with SIGKILL, mid-run.  Attempt 2 is a new
process: ``restore`` finds step 23 in shared memory (it survived the crash although it was
never written to disk), persists it, and training goes on to the end.  The final weights are
compared bit for bit with an uninterrupted run.
"""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time

import torch

import flashckpt

STEPS, CRASH_AT = 40, 23


def build(seed: int = 0) -> dict[str, object]:
    torch.manual_seed(seed)
    layer = torch.nn.TransformerEncoderLayer(d_model=128, nhead=4, dim_feedforward=512, batch_first=True)
    model = torch.nn.Sequential(
        torch.nn.Embedding(1000, 128),
        torch.nn.TransformerEncoder(layer, num_layers=2),
        torch.nn.Linear(128, 1000),
    )
    optim = torch.optim.AdamW(model.parameters(), lr=3e-4)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(optim, T_max=STEPS)
    return {"model": model, "optim": optim, "sched": sched, "extra": {"losses": []}}


def train_step(state: dict[str, object], step: int) -> float:
    model, optim, sched = state["model"], state["optim"], state["sched"]
    g = torch.Generator().manual_seed(step)  # the data of a step depends only on its number
    tokens = torch.randint(0, 1000, (8, 32), generator=g)
    model.train()  # type: ignore[attr-defined]
    torch.manual_seed(10_000 + step)  # dropout masks, reproducible per step
    logits = model(tokens[:, :-1])  # type: ignore[operator]
    loss = torch.nn.functional.cross_entropy(logits.reshape(-1, 1000), tokens[:, 1:].reshape(-1))
    optim.zero_grad()  # type: ignore[attr-defined]
    loss.backward()
    optim.step()  # type: ignore[attr-defined]
    sched.step()  # type: ignore[attr-defined]
    state["extra"]["losses"].append(round(loss.item(), 4))  # type: ignore[index]
    return loss.item()


def attempt(workdir: str, memory: str, crash: bool) -> None:
    """One attempt of the job (its own process)."""
    logging.basicConfig(level=logging.INFO, format="    %(message)s")
    state = build()
    with flashckpt.Checkpointer(
        os.path.join(workdir, "storage"),
        local_dir=os.path.join(workdir, "nvme"),
        memory_dir=memory,
        persist_every=5,
        keep=2,
    ) as ckpt:
        start = ckpt.restore(state)
        first = 0 if start is None else start + 1
        print(f"  attempt starts at step {first}" + ("" if start is None else f" (restored step {start})"))
        for step in range(first, STEPS):
            loss = train_step(state, step)
            ckpt.save(step, state)
            if step % 5 == 0 or step == CRASH_AT:
                s = ckpt.stats
                print(f"  step {step:3d}  loss {loss:.4f}  save blocked {s['blocking_s'] * 1e3:6.2f} ms")
            if crash and step == CRASH_AT:
                print(f"  *** SIGKILL at step {step} (persisted to disk so far: step {step - step % 5}) ***")
                sys.stdout.flush()
                os.kill(os.getpid(), signal.SIGKILL)
    torch.save(state["model"].state_dict(), os.path.join(workdir, "final.pt"))  # type: ignore[attr-defined]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--attempt", choices=["crash", "resume"])
    ap.add_argument("--workdir")
    ap.add_argument("--memory")
    args = ap.parse_args()
    if args.attempt:
        attempt(args.workdir, args.memory, crash=args.attempt == "crash")
        return

    workdir = tempfile.mkdtemp(prefix="flashckpt-demo-")
    shm = "/dev/shm" if os.path.isdir("/dev/shm") else workdir
    shm_real = tempfile.mkdtemp(prefix="flashckpt-demo-", dir=shm)  # the memory tier: shared memory
    try:
        me = [sys.executable, os.path.abspath(__file__), "--workdir", workdir, "--memory", shm_real]
        print("attempt 1: train and checkpoint every step, then crash")
        r = subprocess.run([*me, "--attempt", "crash"])
        if r.returncode != -signal.SIGKILL:
            sys.exit(f"attempt 1 ended with status {r.returncode}, not SIGKILL")
        print(f"  -> process died with signal {-r.returncode} ({signal.Signals(-r.returncode).name})")
        left = sorted(os.listdir(os.path.join(shm_real, "r00000-of-00001")))
        print("  memory tier left by the crash:", left)
        print("attempt 2: a new process restores and finishes")
        t0 = time.perf_counter()
        subprocess.run([*me, "--attempt", "resume"], check=True)
        print(f"  -> finished in {time.perf_counter() - t0:.1f} s")
        print("reference: the same run without a crash")
        ref = build()
        for step in range(STEPS):
            train_step(ref, step)
        final = torch.load(os.path.join(workdir, "final.pt"), weights_only=True)
        same = all(torch.equal(v, final[k]) for k, v in ref["model"].state_dict().items())  # type: ignore[attr-defined]
        print(f"resumed run == uninterrupted run, bit for bit: {same}")
        left = os.path.exists(shm_real) and os.listdir(shm_real)
        print(f"shared memory left behind after the clean finish: {left or 'nothing'}")
        if not same or left:
            sys.exit(1)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
        shutil.rmtree(shm_real, ignore_errors=True)


if __name__ == "__main__":
    main()
