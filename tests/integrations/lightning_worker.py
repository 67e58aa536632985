"""A tiny Lightning training run for tests/integrations/test_lightning.py.

``python -m tests.integrations.lightning_worker --out DIR --storage S --memory M [options]``
(or one rank of it under ``torchrun``: the DDP strategy on gloo).

A model with dropout, AdamW, a OneCycle schedule stepped per step, and a shuffled torchdata
``StatefulDataLoader`` of 10 batches per epoch; ``fit(ckpt_path="last")`` every time (the
first run finds nothing and starts afresh).  ``--die-at N`` SIGKILLs the process when step
``N`` begins (after the batch end of step ``N - 1``), ``--sigterm-at N`` sends it a SIGTERM
then.  At the end each rank writes its model's weights to ``DIR/weights-rank{R}.pt`` and
``DIR/end-rank{R}.json`` (the global step, the tier its restore came from).  ``--no-flash
--model-checkpoint N`` is Lightning's own resume, for comparison (bench/bench_resume.py);
``--injected-sampler`` lets Lightning put its ``DistributedSampler`` around the data.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import signal
from pathlib import Path
from typing import Any

import torch
from torchdata.stateful_dataloader import StatefulDataLoader
from torchdata.stateful_dataloader.sampler import StatefulDistributedSampler

from flashckpt.integrations.lightning import FlashCheckpoint

PKG = os.environ.get("LIGHTNING_PKG", "lightning")
pl: Any = importlib.import_module("lightning.pytorch" if PKG == "lightning" else "pytorch_lightning")


class Net(pl.LightningModule):
    def __init__(self, total_steps: int) -> None:
        super().__init__()
        self.total_steps = total_steps
        self.body = torch.nn.Sequential(
            torch.nn.Linear(8, 32), torch.nn.ReLU(), torch.nn.Dropout(0.2), torch.nn.Linear(32, 1)
        )

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        return torch.nn.functional.mse_loss(self.body(x), y)

    def configure_optimizers(self) -> Any:
        opt = torch.optim.AdamW(self.parameters(), lr=1e-2)
        sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=5e-2, total_steps=self.total_steps)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}


class Signals(pl.Callback):
    def __init__(self, die_at: int, sigterm_at: int) -> None:
        self.die_at, self.sigterm_at = die_at, sigterm_at

    def on_train_batch_start(self, trainer: Any, pl_module: Any, batch: Any, batch_idx: int) -> None:
        if trainer.global_step == self.die_at:
            os.kill(os.getpid(), signal.SIGKILL)
        if trainer.global_step == self.sigterm_at:
            os.kill(os.getpid(), signal.SIGTERM)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--storage", required=True)
    ap.add_argument("--memory", required=True)
    ap.add_argument("--steps", type=int, default=25)
    ap.add_argument("--every", type=int, default=3)
    ap.add_argument("--die-at", type=int, default=-1)
    ap.add_argument("--sigterm-at", type=int, default=-1)
    ap.add_argument("--no-flash", action="store_true")
    ap.add_argument(
        "--model-checkpoint", type=int, default=0, help="also a ModelCheckpoint(save_last=True) every N"
    )
    ap.add_argument("--injected-sampler", action="store_true", help="DDP: Lightning's DistributedSampler")
    a = ap.parse_args()
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    pl.seed_everything(0, workers=True)
    model = Net(a.steps)
    torch.manual_seed(100 + rank)  # each rank its own dropout stream
    g = torch.Generator().manual_seed(0)
    x = torch.randn(40 * world, 8, generator=g)
    ds = torch.utils.data.TensorDataset(x, x.sum(1, keepdim=True))
    if world > 1 and not a.injected_sampler:
        # a stateful sampler of each rank's part: with Lightning's injected DistributedSampler
        # (not stateful) a resumed epoch is reshuffled (docs/integrations.md)
        sampler = StatefulDistributedSampler(ds, num_replicas=world, rank=rank, shuffle=True, seed=0)
        loader = StatefulDataLoader(ds, batch_size=4, sampler=sampler)
    else:
        loader = StatefulDataLoader(ds, batch_size=4, shuffle=True)
    callbacks: list[Any] = [Signals(a.die_at, a.sigterm_at)]
    flash = None
    if not a.no_flash:
        flash = FlashCheckpoint(a.storage, every=a.every, memory_dir=a.memory, framework=PKG)
        callbacks.append(flash)
    if a.model_checkpoint:
        mc = pl.callbacks.ModelCheckpoint(
            dirpath=a.out / "mc", every_n_train_steps=a.model_checkpoint, save_last=True
        )
        callbacks.append(mc)  # after FlashCheckpoint: its last.ckpt is the newer file at a common step
    trainer = pl.Trainer(
        max_steps=a.steps,
        accelerator="cpu",
        devices=world,
        strategy="ddp" if world > 1 else "auto",
        callbacks=callbacks,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=str(a.out),
        enable_checkpointing=flash is not None or a.model_checkpoint > 0,
        use_distributed_sampler=a.injected_sampler,
    )
    restored: dict[str, Any] = {}

    class Where(pl.Callback):
        def on_train_start(self, trainer: Any, pl_module: Any) -> None:
            if flash is not None and flash.checkpointer is not None:
                restored.update(flash.checkpointer.stats.get("restored", {}))

    trainer.callbacks.append(Where())
    try:  # a SIGTERM ends the fit with Lightning's SIGTERMException, a SystemExit (status 0)
        trainer.fit(model, loader, ckpt_path="last" if flash is not None or a.model_checkpoint else None)
    except SystemExit as exc:
        ended: Any = f"SystemExit({exc.code})"
    else:
        ended = "returned"
    torch.save(model.state_dict(), a.out / f"weights-rank{rank}.pt")
    end = {"global_step": trainer.global_step, "restored": restored, "fit": ended}
    (a.out / f"end-rank{rank}.json").write_text(json.dumps(end))


if __name__ == "__main__":
    main()
