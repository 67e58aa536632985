"""Hugging Face Transformers: ``FlashCheckpointCallback``, a ``TrainerCallback`` that stages
the model, optimizer, scheduler, grad scaler, trainer state and random generators of every
rank in memory every ``every`` steps; resume with the Trainer's own
``resume_from_checkpoint``.

    from flashckpt.integrations.transformers import FlashCheckpointCallback

    cb = FlashCheckpointCallback("/mnt/pfs/run-7", every=50)
    trainer = Trainer(model=model, args=args, train_dataset=ds, callbacks=[cb])
    trainer.train(resume_from_checkpoint=cb.resume_path())  # None the first time

Public seams only (Transformers 4.40+, 5.x):

* ``on_step_end`` (every rank, after the optimizer and scheduler steps, ``state.global_step``
  counting the step just taken) stages ``{model, optimizer, scheduler, scaler, trainer state,
  RNG}`` with :class:`flashckpt.Checkpointer` (a memory copy; persisted in the background).
* ``resume_path()`` (every rank, before ``train``) restores the newest step every rank can
  load (from memory after a crash) and writes it out as the Trainer's native ``checkpoint-N``
  directory (``model.safetensors`` through ``save_pretrained``, ``optimizer.pt``,
  ``scheduler.pt``, ``scaler.pt``, ``rng_state[_R].pth``, ``trainer_state.json``), each rank its
  own, in ``resume_dir`` (default: a fresh directory under the system's temporary directory),
  never inside ``output_dir``, where the Trainer's rotation deletes ``checkpoint-*`` folders.
  The Trainer's own resume then loads it: the data position comes from the trainer state
  (``skip_first_batches``), each rank's generators from its own RNG file.  The directory is
  removed once the first step after the resume has ended.
* Preemption (SIGTERM, SIGUSR1; the ``preempt_signals`` option): the next step end takes a
  final snapshot on every rank at the same step, persists it and stops training
  (``control.should_training_stop``); the process ends normally.

Supported: one process and DDP (``torchrun``); FSDP and DeepSpeed save sharded state their own
way and are refused.  Hooks run on the training thread of each rank.  See docs/integrations.md.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch

import flashckpt
from flashckpt.errors import ConfigError

log = logging.getLogger(__name__)


def _base() -> type:
    try:
        from transformers import TrainerCallback
    except ImportError as exc:
        raise ImportError("FlashCheckpointCallback needs Transformers: pip install 'flashckpt[hf]'") from exc
    return TrainerCallback


class FlashCheckpointCallback:
    """Flash checkpoints for the Hugging Face ``Trainer`` (see the module docstring).

    Args:
        storage: the storage tier (a path or URL), as for :class:`flashckpt.Checkpointer`.
        every: stage a snapshot every this many optimizer steps (``state.global_step``).
        resume_dir: where ``resume_path`` writes ``checkpoint-N`` (per rank: ``rank{R}/``);
            default: a new directory under the system's temporary directory.  Never inside
            the Trainer's ``output_dir``.
        **checkpointer_options: passed to :class:`flashckpt.Checkpointer` (``local_dir``,
            ``memory_dir``, ``persist_every``, ``keep``, ``compression``, ``preempt_signals``,
            ``options``, ...).

    Constructed on the main thread of every rank, before the ``Trainer``; methods run on the
    training thread.
    """

    def __new__(cls, *args: Any, **kwargs: Any) -> Any:
        if cls is FlashCheckpointCallback:
            cls = _callback_class()
        return super().__new__(cls)

    def __init__(
        self,
        storage: str | os.PathLike[str],
        *,
        every: int = 1,
        resume_dir: str | os.PathLike[str] | None = None,
        **checkpointer_options: Any,
    ) -> None:
        if type(every) is not int or every < 1:
            raise ConfigError(f"every must be an int >= 1, got {every!r}")
        for bad in ("every", "process_group", "storage"):
            if bad in checkpointer_options:
                raise ConfigError(f"FlashCheckpointCallback sets {bad} itself")
        self.storage = storage
        self.every = every
        self.resume_dir = None if resume_dir is None else Path(resume_dir)
        self.checkpointer_options = checkpointer_options
        self._ckpt: flashckpt.Checkpointer | None = None
        self._model: Any = None
        self._trainer: Any = None
        self._materialized: Path | None = None
        self._checked = False

    @property
    def checkpointer(self) -> flashckpt.Checkpointer | None:
        """This rank's Checkpointer (from ``resume_path`` or the first step on)."""
        return self._ckpt

    def _checkpointer(self) -> flashckpt.Checkpointer:
        if self._ckpt is None:
            self._ckpt = flashckpt.Checkpointer(self.storage, every=self.every, **self.checkpointer_options)
        return self._ckpt

    # -- resuming (every rank, before train) ---------------------------------------------------
    def resume_path(self, trainer: Any = None) -> str | None:
        """The native ``checkpoint-N`` directory of the newest step every rank can load,
        written out for ``trainer.train(resume_from_checkpoint=...)``; ``None`` when there is
        nothing to resume.  Every rank calls it (they agree on the step).  ``trainer``
        (optional) adds its other ``ExportableState`` callbacks to the trainer state saved."""
        if trainer is not None:
            self._trainer = trainer
            self._model = trainer.model
            self._check(trainer.args)
        ckpt = self._checkpointer()
        holder: dict[str, Any] = {}
        step = ckpt.restore(holder)
        if step is None:
            return None
        if self._model is None:
            raise RuntimeError(
                "resume_path: pass the Trainer, or construct the Trainer with this callback first"
            )
        return str(self._materialize(step, holder["hf"]))

    def _materialize(self, step: int, saved: dict[str, Any]) -> Path:
        """Write ``saved`` as the Trainer's ``checkpoint-{step}`` directory of this rank."""
        from transformers.trainer import OPTIMIZER_NAME, SCALER_NAME, SCHEDULER_NAME, TRAINER_STATE_NAME

        world = int(saved["world"])
        rank = int(saved["rank"])
        base = (
            self.resume_dir if self.resume_dir is not None else Path(tempfile.mkdtemp(prefix="flashckpt-hf-"))
        )
        where = base / f"rank{rank}" / f"checkpoint-{step}"
        tmp = where.with_name(where.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        _write_weights(saved["model"], tmp / "model.safetensors")
        config = getattr(self._model, "config", None)
        if config is not None and hasattr(config, "to_json_file"):
            config.to_json_file(tmp / "config.json")
        torch.save(saved["optimizer"], tmp / OPTIMIZER_NAME)
        torch.save(saved["scheduler"], tmp / SCHEDULER_NAME)
        if saved.get("scaler") is not None:
            torch.save(saved["scaler"], tmp / SCALER_NAME)
        rng_file = "rng_state.pth" if world <= 1 else f"rng_state_{rank}.pth"
        torch.save(_hf_rng(saved["rng"], distributed=world > 1), tmp / rng_file)
        (tmp / TRAINER_STATE_NAME).write_text(saved["trainer_state"])
        shutil.rmtree(where, ignore_errors=True)
        os.replace(tmp, where)
        self._materialized = where if self.resume_dir is not None else base
        log.info("flashckpt: step %d written out for the Trainer's resume at %s", step, where)
        return where

    # -- training (every rank) -----------------------------------------------------------------
    def _check(self, args: Any) -> None:
        if self._checked:
            return
        if getattr(args, "fsdp", None) or getattr(args, "deepspeed", None):
            raise ConfigError(
                "FlashCheckpointCallback supports one process and DDP; FSDP and DeepSpeed save "
                "sharded state their own way"
            )
        out = Path(args.output_dir).resolve() if getattr(args, "output_dir", None) else None
        if out is not None and self.resume_dir is not None:
            rd = self.resume_dir.resolve()
            if rd == out or out in rd.parents:
                raise ConfigError(
                    f"resume_dir {rd} is inside output_dir {out}, where the Trainer's checkpoint "
                    "rotation deletes checkpoint-* folders"
                )
        self._checked = True

    def on_init_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self._model = kwargs.get("model")
        self._check(args)

    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self._check(args)
        self._checkpointer()

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> Any:
        ckpt = self._checkpointer()
        step = int(state.global_step)

        def capture() -> dict[str, Any]:
            return {"hf": self._capture(args, state, control, kwargs)}

        ckpt.save(step, capture)
        self._forget_materialized()
        if ckpt.preempted:
            log.warning("flashckpt: preempted: stopping training after step %d", step)
            control.should_training_stop = True
        return control

    def _capture(self, args: Any, state: Any, control: Any, kw: dict[str, Any]) -> dict[str, Any]:
        """This rank's training state as the Trainer's own checkpoint holds it."""
        opt = kw.get("optimizer")
        sched = kw.get("lr_scheduler")
        model = kw.get("model") or self._model
        if model is None or opt is None or sched is None:
            raise RuntimeError("FlashCheckpointCallback: the Trainer passed no model, optimizer or scheduler")
        from transformers.trainer_callback import ExportableState

        # as the Trainer's own save updates them: its control and (when resume_path was given
        # the Trainer) its other exportable callbacks
        stateful = dict(state.stateful_callbacks or {})
        exportable = [
            control,
            *(self._trainer.callback_handler.callbacks if self._trainer is not None else []),
        ]
        for cb in exportable:
            if isinstance(cb, ExportableState):
                stateful[type(cb).__name__] = cb.state()
        trainer_state = dataclasses.asdict(state)
        trainer_state["stateful_callbacks"] = stateful
        return {
            "model": model.state_dict(),
            "optimizer": opt.state_dict(),
            "scheduler": sched.state_dict(),
            "scaler": _scaler_state(opt),
            "rng": flashckpt.RNGState(),
            "trainer_state": json.dumps(trainer_state, indent=2, sort_keys=True) + "\n",
            "world": int(args.world_size),
            "rank": int(args.process_index),
        }

    def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self._forget_materialized()
        ckpt, self._ckpt = self._ckpt, None
        if ckpt is not None:
            ckpt.close()

    def _forget_materialized(self) -> None:
        """The resume directory has served (the Trainer read it all before its first step
        ended): removed."""
        if self._materialized is not None:
            shutil.rmtree(self._materialized, ignore_errors=True)
            with contextlib.suppress(OSError):  # this rank's directory, if nothing else is in it
                self._materialized.parent.rmdir()
            self._materialized = None


def _write_weights(sd: dict[str, Any], path: Path) -> None:
    """The model's state dict as ``model.safetensors``, keyed as the Trainer's resume loads it
    (``model.load_state_dict(weights, strict=False)``).  Every rank writes its own (the
    model's ``save_pretrained`` writes on rank 0 only).  A tied weight is one tensor under
    two keys in the restored state: written once, loaded through either key."""
    from safetensors.torch import save_file

    out: dict[str, torch.Tensor] = {}
    kept: set[int] = set()
    storages: set[int] = set()
    for k, t in sd.items():
        if not isinstance(t, torch.Tensor) or id(t) in kept:
            continue
        kept.add(id(t))
        if t.untyped_storage().data_ptr() in storages:  # safetensors refuses shared storage
            t = t.clone()
        storages.add(t.untyped_storage().data_ptr())
        out[k] = t.contiguous()
    save_file(out, str(path), metadata={"format": "pt"})


def _scaler_state(opt: Any) -> Any:
    scaler = getattr(opt, "scaler", None)  # accelerate's AcceleratedOptimizer holds the GradScaler
    return scaler.state_dict() if scaler is not None and hasattr(scaler, "state_dict") else None


def _hf_rng(saved: dict[str, Any], *, distributed: bool) -> dict[str, Any]:
    """flashckpt's RNG record as the Trainer's ``rng_state.pth`` holds it."""
    import numpy as np

    py = saved["python"]
    out: dict[str, Any] = {
        "python": (int(py["version"]), tuple(int(x) for x in py["state"]), py["gauss_next"]),
        "cpu": saved["torch"],
    }
    if "numpy" in saved:
        n = saved["numpy"]
        keys = n["keys"].cpu().numpy().view(np.uint32)
        out["numpy"] = (n["kind"], keys, int(n["pos"]), int(n["has_gauss"]), float(n["cached_gaussian"]))
    else:
        out["numpy"] = np.random.get_state()
    if "cuda" in saved:
        cuda = list(saved["cuda"])
        out["cuda"] = (
            cuda if distributed else cuda[torch.cuda.current_device() if torch.cuda.is_available() else 0]
        )
    return out


_cls: type | None = None


def _callback_class() -> type:
    global _cls
    if _cls is None:
        base = _base()
        _cls = type("FlashCheckpointCallback", (FlashCheckpointCallback, base), {})
    return _cls


__all__ = ["FlashCheckpointCallback"]
