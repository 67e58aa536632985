"""Example: a Hugging Face Trainer with flashckpt, killed mid-run and resumed.

    pip install 'flashckpt[hf]'
    python examples/transformers_example.py

A tiny GPT-2 built from a config (nothing is downloaded).  ``FlashCheckpointCallback``
snapshots model, optimizer, scheduler, trainer state and RNG into shared memory every step
and persists every 10th; the Trainer's own saving is off.  The first attempt is SIGKILLed at
step 17; the second passes ``cb.resume_path(trainer)`` to ``trainer.train`` (a native
checkpoint folder written from the flash snapshot) and resumes at step 17.  The final weights
are compared bit for bit with an uninterrupted run.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
from pathlib import Path
from typing import Any

import torch
from _story import attempts, verdict, workspace  # examples/_story.py: scratch dirs, the closing check
from transformers import GPT2Config, GPT2LMHeadModel, Trainer, TrainerCallback, TrainingArguments

from flashckpt.integrations.transformers import FlashCheckpointCallback

STEPS, CRASH_AT = 30, 17


class Tokens(torch.utils.data.Dataset[dict[str, torch.Tensor]]):
    def __init__(self) -> None:
        self.data = torch.randint(0, 64, (40, 16), generator=torch.Generator().manual_seed(0))

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.data[i], "labels": self.data[i]}


class Story(TrainerCallback):
    """Says where training starts; with ``crash``, SIGKILLs the process at step CRASH_AT."""

    def __init__(self, flash: FlashCheckpointCallback, crash: bool) -> None:
        self.flash, self.crash = flash, crash

    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        ckpt = self.flash.checkpointer
        got = ckpt.stats.get("restored") if ckpt is not None else None
        where = f" (restored step {got['step']} from the {got['tier']} tier)" if got else ""
        print(f"  training starts{where}", flush=True)

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        ckpt = self.flash.checkpointer
        if state.global_step % 5 == 0 and ckpt is not None:
            print(
                f"  step {state.global_step:2d}: save blocked {ckpt.stats['blocking_s'] * 1e3:.2f} ms",
                flush=True,
            )

    def on_step_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if self.crash and state.global_step == CRASH_AT:
            print(f"  *** SIGKILL at step {CRASH_AT} (storage has step 10 only) ***", flush=True)
            os.kill(os.getpid(), signal.SIGKILL)


def train(workdir: Path, memory: Path, crash: bool) -> None:
    """One attempt (its own process)."""
    logging.getLogger("transformers").setLevel(logging.ERROR)
    torch.manual_seed(0)
    cfg = GPT2Config(vocab_size=64, n_positions=16, n_embd=32, n_layer=2, n_head=2)
    model = GPT2LMHeadModel(cfg)
    args = TrainingArguments(
        output_dir=str(workdir / "out"), max_steps=STEPS, per_device_train_batch_size=4, learning_rate=5e-3,
        save_strategy="no", report_to=[], seed=0, use_cpu=True, disable_tqdm=True, logging_strategy="no",
    )  # fmt: skip
    flash = FlashCheckpointCallback(
        workdir / "storage", every=1, persist_every=10, memory_dir=memory, resume_dir=workdir / "resume"
    )
    trainer = Trainer(model=model, args=args, train_dataset=Tokens(), callbacks=[flash, Story(flash, crash)])
    trainer.train(resume_from_checkpoint=flash.resume_path(trainer))  # None the first time
    torch.save(model.state_dict(), workdir / "final.pt")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--attempt", choices=["crash", "resume", "reference"])
    ap.add_argument("--workdir", type=Path)
    ap.add_argument("--memory", type=Path)
    args = ap.parse_args()
    if args.attempt:
        train(args.workdir, args.memory, crash=args.attempt == "crash")
        return
    with workspace("hf") as (base, shm):
        plan = [("run", "crash", "attempt 1: train, checkpoint every step, crash"),
                ("run", "resume", "attempt 2: trainer.train(resume_from_checkpoint=resume_path)"),
                ("ref", "reference", "reference: the same run without a crash")]  # fmt: skip
        attempts(os.path.abspath(__file__), plan, base, shm)
        a = torch.load(base / "run" / "final.pt", weights_only=True)
        verdict(a, torch.load(base / "ref" / "final.pt", weights_only=True))


if __name__ == "__main__":
    main()
