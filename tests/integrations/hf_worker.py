"""A tiny Hugging Face Trainer run for tests/integrations/test_transformers.py.

``python -m tests.integrations.hf_worker --out DIR --storage S --memory M [options]`` (or
one rank of it under ``torchrun``: DDP on gloo).

A GPT-2 built from a config (2 layers, dropout 0.1; nothing downloaded), AdamW with a linear
schedule, 10 steps per epoch of a shuffled dataset, 25 steps; resumed with
``trainer.train(resume_from_checkpoint=cb.resume_path())`` every time (``None`` the first
time).  ``--die-at N`` SIGKILLs the process when step ``N + 1`` begins (after the step end of
step ``N``), ``--sigterm-at N`` sends it a SIGTERM then.  At the end each rank writes its
weights to ``DIR/weights-rank{R}.pt`` and ``DIR/end-rank{R}.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
from pathlib import Path
from typing import Any

import torch
from transformers import GPT2Config, GPT2LMHeadModel, Trainer, TrainerCallback, TrainingArguments

from flashckpt.integrations.transformers import FlashCheckpointCallback


class Tokens(torch.utils.data.Dataset[dict[str, torch.Tensor]]):
    def __init__(self, n: int) -> None:
        g = torch.Generator().manual_seed(0)
        self.data = torch.randint(0, 64, (n, 16), generator=g)

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.data[i], "labels": self.data[i]}


class Signals(TrainerCallback):
    def __init__(self, die_at: int, sigterm_at: int) -> None:
        self.die_at, self.sigterm_at = die_at, sigterm_at

    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        # each rank its own dropout stream (the Trainer seeds every rank alike); a resumed run's
        # generators are set back by the Trainer after this, from each rank's RNG file
        torch.manual_seed(100 + args.process_index)

    def on_step_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if state.global_step == self.die_at:
            os.kill(os.getpid(), signal.SIGKILL)
        if state.global_step == self.sigterm_at:
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
    a = ap.parse_args()
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    torch.manual_seed(0)
    cfg = GPT2Config(
        vocab_size=64,
        n_positions=16,
        n_embd=32,
        n_layer=2,
        n_head=2,
        resid_pdrop=0.1,
        embd_pdrop=0.1,
        attn_pdrop=0.1,
    )
    model = GPT2LMHeadModel(cfg)
    args = TrainingArguments(
        output_dir=str(a.out / "hf"),
        max_steps=a.steps,
        per_device_train_batch_size=4,
        learning_rate=5e-3,
        lr_scheduler_type="linear",
        save_strategy="no",
        logging_steps=5,
        report_to=[],
        seed=0,
        use_cpu=True,
        disable_tqdm=True,
        dataloader_num_workers=0,
    )
    cb = FlashCheckpointCallback(a.storage, every=a.every, memory_dir=a.memory, resume_dir=a.out / "resume")
    trainer = Trainer(
        model=model,
        args=args,
        train_dataset=Tokens(40 * world),
        callbacks=[cb, Signals(a.die_at, a.sigterm_at)],
    )
    path = cb.resume_path(trainer)
    restored = dict(cb.checkpointer.stats.get("restored", {})) if cb.checkpointer is not None else {}
    trainer.train(resume_from_checkpoint=path)
    torch.save({k: v.clone() for k, v in model.state_dict().items()}, a.out / f"weights-rank{rank}.pt")
    end = {
        "global_step": trainer.state.global_step,
        "restored": restored,
        "path": path,
        "resume_left": sorted(str(p) for p in (a.out / "resume").rglob("*"))
        if (a.out / "resume").exists()
        else [],
    }
    (a.out / f"end-rank{rank}.json").write_text(json.dumps(end))
    if world > 1:
        torch.distributed.destroy_process_group()
        os._exit(0)  # see tests/test_distributed.py::_exit_before_finalization


if __name__ == "__main__":
    main()
