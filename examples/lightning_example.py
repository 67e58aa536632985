"""Example: PyTorch Lightning with flashckpt, killed mid-run and resumed with ``ckpt_path="last"``.

    pip install 'flashckpt[lightning]'
    python examples/lightning_example.py

One callback switches it on: ``FlashCheckpoint`` snapshots the full Lightning checkpoint
(weights, optimizer, scheduler, loop and data-loader state, RNG) into shared memory every
step and persists every 10th.  The first attempt is SIGKILLed at step 17; the second calls
``trainer.fit(..., ckpt_path="last")`` exactly as with Lightning's own checkpoints and
resumes at step 17 from memory.  The final weights are compared bit for bit with an
uninterrupted run.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from _story import attempts, verdict, workspace  # examples/_story.py: scratch dirs, the closing check
from torchdata.stateful_dataloader import StatefulDataLoader

from flashckpt.integrations.lightning import FlashCheckpoint

STEPS, CRASH_AT = 30, 17


class Net(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.body = torch.nn.Sequential(
            torch.nn.Linear(8, 32), torch.nn.ReLU(), torch.nn.Dropout(0.2), torch.nn.Linear(32, 1)
        )

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        return torch.nn.functional.mse_loss(self.body(x), y)

    def configure_optimizers(self) -> Any:
        opt = torch.optim.AdamW(self.parameters(), lr=1e-2)
        sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=5e-2, total_steps=STEPS)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}


class Story(pl.Callback):
    """Says where training starts; with ``crash``, SIGKILLs the process at step CRASH_AT."""

    def __init__(self, flash: FlashCheckpoint, crash: bool) -> None:
        self.flash, self.crash = flash, crash

    def on_train_start(self, trainer: Any, pl_module: Any) -> None:
        ckpt = self.flash.checkpointer
        got = ckpt.stats.get("restored") if ckpt is not None else None
        where = f" (restored step {got['step']} from the {got['tier']} tier)" if got else ""
        print(f"  training starts at step {trainer.global_step}{where}", flush=True)

    def on_train_batch_end(
        self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        ckpt = self.flash.checkpointer
        if trainer.global_step % 5 == 0 and ckpt is not None:
            print(
                f"  step {trainer.global_step:2d}: save blocked {ckpt.stats['blocking_s'] * 1e3:.2f} ms",
                flush=True,
            )

    def on_train_batch_start(self, trainer: Any, pl_module: Any, batch: Any, batch_idx: int) -> None:
        if self.crash and trainer.global_step == CRASH_AT:
            print(f"  *** SIGKILL at step {CRASH_AT} (storage has step 10 only) ***")
            sys.stdout.flush()
            os.kill(os.getpid(), signal.SIGKILL)


def fit(workdir: Path, memory: Path, crash: bool) -> None:
    """One attempt (its own process)."""
    for name in ("lightning.pytorch", "lightning.fabric"):
        logging.getLogger(name).setLevel(logging.WARNING)  # the example's own lines only
    pl.seed_everything(0, workers=True)
    x = torch.randn(40, 8, generator=torch.Generator().manual_seed(0))
    data = StatefulDataLoader(
        torch.utils.data.TensorDataset(x, x.sum(1, keepdim=True)), batch_size=4, shuffle=True
    )
    flash = FlashCheckpoint(workdir / "storage", every=1, persist_every=10, memory_dir=memory)
    trainer = pl.Trainer(
        max_steps=STEPS, accelerator="cpu", callbacks=[flash, Story(flash, crash)], logger=False,
        enable_progress_bar=False, enable_model_summary=False, default_root_dir=str(workdir),
    )  # fmt: skip
    model = Net()
    trainer.fit(model, data, ckpt_path="last")  # "last" finds the flash snapshot (None the first time)
    torch.save(model.state_dict(), workdir / "final.pt")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--attempt", choices=["crash", "resume", "reference"])
    ap.add_argument("--workdir", type=Path)
    ap.add_argument("--memory", type=Path)
    args = ap.parse_args()
    if args.attempt:
        fit(args.workdir, args.memory, crash=args.attempt == "crash")
        return
    with workspace("lightning") as (base, shm):
        plan = [("run", "crash", "attempt 1: train, checkpoint every step, crash"),
                ("run", "resume", "attempt 2: trainer.fit(ckpt_path='last')"),
                ("ref", "reference", "reference: the same run without a crash")]  # fmt: skip
        attempts(os.path.abspath(__file__), plan, base, shm, PYTHONWARNINGS="ignore")
        a = torch.load(base / "run" / "final.pt", weights_only=True)
        verdict(a, torch.load(base / "ref" / "final.pt", weights_only=True))


if __name__ == "__main__":
    main()
