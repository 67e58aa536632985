"""PyTorch Lightning: ``FlashCheckpoint``, a callback that stages the whole Lightning
checkpoint of every rank in memory every ``every`` steps; resume with Lightning's own
``trainer.fit(model, ckpt_path="last")``.

    from flashckpt.integrations.lightning import FlashCheckpoint

    trainer = Trainer(callbacks=[FlashCheckpoint("/mnt/pfs/run-7", every=50)], ...)
    trainer.fit(model, datamodule, ckpt_path="last")  # resumes when there is something to resume

Public seams only (Lightning 2.2+, ``lightning`` or ``pytorch_lightning``):

* The callback is an ``OnExceptionCheckpoint`` whose ``ckpt_path`` is a small pointer file
  (``flashckpt-last.ckpt`` in ``dirpath``, by default the storage directory): that is how
  ``ckpt_path="last"`` finds it (Lightning asks no ``CheckpointIO`` which checkpoint is last;
  it picks the newest file among its checkpoint callbacks' candidates), and how a ``fit``
  without ``ckpt_path`` resumes.  Being a ``Checkpoint``, it stops Lightning from adding its
  default ``ModelCheckpoint``: add your own for periodic ``.ckpt`` files (they work side by side).
* In ``setup`` it wraps the strategy's ``CheckpointIO`` (``trainer.strategy.checkpoint_io``,
  a public property) in one that loads the pointer through flashckpt and passes every other
  path to the IO it wraps.
* Every ``every`` optimizer steps, ``on_train_batch_end`` (on every rank, where
  ``ModelCheckpoint`` saves: after the step's scheduler updates) calls
  ``trainer.save_checkpoint(pointer)``: Lightning builds its checkpoint dict on every rank
  (model, optimizers, schedulers, loops with the data position of a stateful dataloader,
  callbacks, precision, hyper-parameters), hands it to this callback's ``on_save_checkpoint``
  and, on rank 0 only, to the IO (which writes the pointer); every rank then stages its own
  dict and its own random generators (``flashckpt.RNGState``).  Nothing Lightning calls on
  rank 0 alone runs a collective.
* ``load_checkpoint(pointer)`` runs on every rank: each restores its own snapshot (from
  memory when the process crashed, from storage otherwise) and returns its dict; the random
  generators are set back in ``on_train_start``, once Lightning's restore is done.
* Preemption (SIGTERM, SIGUSR1; the ``preempt_signals`` option): the next batch end takes a
  final snapshot on every rank at the same step and persists it, then stops the fit
  (``trainer.should_stop``); the process exits normally.

Strategies: single device and DDP (``ddp``, ``ddp_spawn``, ``ddp_fork``); sharded strategies
(FSDP, DeepSpeed, model parallel) save through their own distributed checkpointing, not a
``CheckpointIO``, and are refused with an error that says so.  The hooks run on the training
thread of each rank.  See docs/integrations.md.
"""

from __future__ import annotations

import importlib
import json
import logging
import os
import re
import sys
from pathlib import Path
from typing import Any

import flashckpt
from flashckpt.errors import CheckpointNotFound, ConfigError
from flashckpt.integrations._codec import decode, encode

log = logging.getLogger(__name__)

POINTER_NAME = "flashckpt-last"
_POINTER_KIND = "flashckpt-lightning-pointer"
#: Keys of Lightning's checkpoint dict that its resume does not read (``load_from_checkpoint``
#: does): what cannot be encoded there is dropped with a warning instead of refused.
_DROPPABLE = frozenset({"hyper_parameters", "datamodule_hyper_parameters"})
_LAST = re.compile(r"^last(-v?\d+)?\.ckpt$")
_NAMESPACES = ("lightning.pytorch", "pytorch_lightning")
_built: dict[str, tuple[type, type]] = {}


def _namespace(framework: str | None) -> str:
    """The Lightning package the user's ``Trainer`` comes from: ``framework`` (``"lightning"``
    or ``"pytorch_lightning"``), else whichever of the two is imported (``lightning`` if both
    are: ``setup`` checks against the Trainer), else whichever is installed."""
    if framework is not None:
        ns = {"lightning": "lightning.pytorch", "lightning.pytorch": "lightning.pytorch"}.get(
            framework, framework
        )
        if ns not in _NAMESPACES:
            raise ConfigError(f"framework must be 'lightning' or 'pytorch_lightning', got {framework!r}")
        return ns
    for ns in _NAMESPACES:
        if ns in sys.modules:
            return ns
    for ns in _NAMESPACES:
        try:
            importlib.import_module(ns)
            return ns
        except ImportError:
            continue
    raise ImportError("FlashCheckpoint needs PyTorch Lightning: pip install 'flashckpt[lightning]'")


class FlashCheckpoint:
    """A Lightning callback: flash checkpoints every ``every`` optimizer steps, on every rank.

    Args:
        storage: the storage tier (a path or URL), as for :class:`flashckpt.Checkpointer`.
        every: stage a snapshot every this many optimizer steps (``trainer.global_step``).
        dirpath: where the pointer file ``flashckpt-last.ckpt`` lives, a directory every rank
            sees (default: ``storage`` when it is a local path; required otherwise: the
            pointer cannot live on object storage, where Lightning's "last" does not look).
        framework: ``"lightning"`` or ``"pytorch_lightning"`` (default: the one imported).
        **checkpointer_options: passed to :class:`flashckpt.Checkpointer` (``local_dir``,
            ``persist_every``, ``keep``, ``mirror``, ``compression``, ``preempt_signals``,
            ``options``, ...).

    Constructed on the main thread before ``Trainer(...)``; its hooks run on the training
    thread of every rank.
    """

    def __new__(cls, *args: Any, **kwargs: Any) -> Any:
        if cls is FlashCheckpoint:  # the subclass of the user's Lightning's classes
            cls = _classes(_namespace(kwargs.get("framework")))[0]
        return super().__new__(cls)

    def __init__(
        self,
        storage: str | os.PathLike[str],
        *,
        every: int = 1,
        dirpath: str | os.PathLike[str] | None = None,
        framework: str | None = None,
        **checkpointer_options: Any,
    ) -> None:
        if type(every) is not int or every < 1:
            raise ConfigError(f"every must be an int >= 1, got {every!r}")
        for bad in ("every", "process_group", "storage"):
            if bad in checkpointer_options:
                raise ConfigError(f"FlashCheckpoint sets {bad} itself")
        if dirpath is None:
            if isinstance(storage, os.PathLike) or "://" not in str(storage):
                dirpath = os.fspath(storage)
            elif str(storage).startswith("file://"):
                dirpath = str(storage)[len("file://") :]
            else:
                raise ConfigError(
                    f"FlashCheckpoint({storage!r}): give dirpath=, a directory every rank sees, for the "
                    "pointer file Lightning's ckpt_path='last' finds (it cannot live on object storage)"
                )
        self.storage = storage
        self.every = every
        self.framework = framework
        self.checkpointer_options = checkpointer_options
        self._init(os.fspath(dirpath))

    def _init(self, dirpath: str) -> None:  # the namespace's base classes' __init__
        raise NotImplementedError

    def __reduce__(self) -> Any:  # ddp_spawn pickles the trainer's callbacks
        kwargs = dict(self.checkpointer_options, every=self.every, framework=self.framework)
        kwargs["dirpath"] = self.dirpath  # type: ignore[attr-defined]
        return (_rebuild, (self.storage, kwargs))


def _rebuild(storage: Any, kwargs: dict[str, Any]) -> Any:
    return FlashCheckpoint(storage, **kwargs)


def load_checkpoint(
    storage: str | os.PathLike[str], *, step: int | str = "latest", **load_options: Any
) -> Any:
    """Offline: the Lightning checkpoint dict of ``step`` (rank 0's) from ``storage``, decoded,
    with CPU tensors (``flashckpt.load`` underneath).  Any thread."""
    state = flashckpt.load(os.fspath(storage), step=step, **load_options)  # type: ignore[arg-type]
    return decode(state["lightning"])


class _IO:
    """Loads and writes the pointer; passes every other path to the IO it wraps."""

    def __init__(self, wrapped: Any, callback: Any) -> None:
        super().__init__()
        self.wrapped = wrapped
        self.callback = callback

    def _ours(self, path: Any) -> bool:
        return bool(os.path.normpath(os.fspath(path)) == os.path.normpath(self.callback.ckpt_path))

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any = None) -> None:
        if self._ours(path):  # rank 0 (under DDP): the snapshot itself is staged by every rank
            self.callback._write_pointer()
            return
        self.wrapped.save_checkpoint(checkpoint, path, storage_options=storage_options)

    def load_checkpoint(
        self, path: Any, map_location: Any = None, weights_only: Any = None
    ) -> dict[str, Any]:
        if self._ours(path):
            got: dict[str, Any] | None = self.callback._restore()
            if got is None:
                raise CheckpointNotFound(
                    f"{path} points at {self.callback.storage}, which holds no snapshot this job can "
                    "restore; remove the pointer file to start afresh"
                )
            return got
        loaded: dict[str, Any] = self.wrapped.load_checkpoint(
            path, map_location=map_location, weights_only=weights_only
        )
        if _LAST.match(os.path.basename(os.fspath(path))):
            # Lightning chose a ModelCheckpoint's "last" file by its mtime: a flash
            # snapshot of the same or a later step is the better resume (it has the RNG,
            # every rank's own state, and may come from memory).
            ours: dict[str, Any] | None = self.callback._restore()
            if ours is not None and ours.get("global_step", -1) >= loaded.get("global_step", 0):
                log.info(
                    "flashckpt: resuming from the flash snapshot of step %s instead of %s",
                    ours["global_step"],
                    path,
                )
                return ours
        return loaded

    def remove_checkpoint(self, path: Any) -> None:
        if not self._ours(path):
            self.wrapped.remove_checkpoint(path)

    def teardown(self) -> None:
        self.wrapped.teardown()


class _Callback(FlashCheckpoint):
    """The callback's behaviour; :func:`_classes` puts it before the Lightning package's own
    ``OnExceptionCheckpoint`` and gives it that package's names (class attributes below)."""

    _base: Any = None  # the package's OnExceptionCheckpoint
    _trainer_cls: Any = None  # its Trainer
    _strategies: Any = ()  # its single-device and DDP strategies
    ckpt_path: str  # OnExceptionCheckpoint's: the pointer file
    _io_cls: Any = None  # the IO class built on its CheckpointIO
    _ns = ""

    def _init(self, dirpath: str) -> None:
        self._base.__init__(self, dirpath, filename=POINTER_NAME)
        self._ckpt: flashckpt.Checkpointer | None = None
        self._trainer: Any = None
        self._capturing = False
        self._captured: dict[str, Any] | None = None
        self._last_step = -1
        self._rng_pending: dict[str, Any] | None = None

    @property
    def state_key(self) -> str:
        return "FlashCheckpoint"

    # -- setup and teardown (every rank) -------------------------------------------------
    def setup(self, trainer: Any, pl_module: Any, stage: str) -> None:
        if stage != "fit":
            return
        if not isinstance(trainer, self._trainer_cls):
            other = "pytorch_lightning" if self._ns == "lightning.pytorch" else "lightning"
            raise ConfigError(
                f"FlashCheckpoint was built for {self._ns.split('.')[0]}, the Trainer comes from "
                f"{type(trainer).__module__.split('.')[0]}: pass framework={other!r}"
            )
        strategy: Any = trainer.strategy
        if not isinstance(strategy, self._strategies) or "DeepSpeed" in type(strategy).__name__:
            raise ConfigError(
                f"FlashCheckpoint supports the single-device and DDP strategies; "
                f"{type(strategy).__name__} saves sharded state through its own distributed "
                "checkpointing, not a CheckpointIO"
            )
        if not isinstance(strategy.checkpoint_io, self._io_cls):
            strategy.checkpoint_io = self._io_cls(strategy.checkpoint_io, self)
        if self._ckpt is None:
            self._ckpt = flashckpt.Checkpointer(self.storage, every=self.every, **self.checkpointer_options)
        self._trainer = trainer

    def teardown(self, trainer: Any, pl_module: Any, stage: str) -> None:
        # (OnExceptionCheckpoint's teardown deletes its file: the pointer stays)
        if stage == "fit":
            self._close(None)

    def on_exception(self, trainer: Any, pl_module: Any, exception: BaseException) -> None:
        # Not a save of the live state (an exception may leave it half-updated): the
        # newest staged snapshot is persisted, if it lived in memory only.
        self._close(exception)

    def _close(self, exc: BaseException | None) -> None:
        ckpt, self._ckpt = self._ckpt, None
        if ckpt is not None:
            if exc is None:
                ckpt.close()
            else:
                ckpt.__exit__(type(exc), exc, exc.__traceback__)

    # -- saving (every rank) ---------------------------------------------------------------
    def on_train_batch_end(
        self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        step = int(trainer.global_step)
        if step == self._last_step or self._ckpt is None:
            return  # accumulating gradients: no optimizer step since the last call
        self._last_step = step
        self._ckpt.save(step, self._capture)
        if self._ckpt.preempted:
            log.warning("flashckpt: preempted: stopping the fit after step %d", step)
            trainer.should_stop = True

    def _capture(self) -> dict[str, Any]:
        """Lightning's checkpoint dict of this rank, with its random generators."""
        self._capturing = True
        try:
            self._trainer.save_checkpoint(self.ckpt_path, weights_only=False)
        finally:
            self._capturing = False
        captured, self._captured = self._captured, None
        if captured is None:
            raise RuntimeError("Lightning did not call on_save_checkpoint while saving the pointer")
        return {"lightning": encode(captured, droppable=_DROPPABLE)}

    def on_save_checkpoint(self, trainer: Any, pl_module: Any, checkpoint: dict[str, Any]) -> None:
        if self._capturing:
            # the dict is complete once save_checkpoint returns (the module's own hook
            # runs after the callbacks'): kept by reference until then
            checkpoint["flashckpt"] = {"rng": flashckpt.RNGState().state_dict()}
            self._captured = checkpoint

    def _write_pointer(self) -> None:
        """Rank 0 (Lightning's IO call): the pointer, rewritten so that its mtime wins
        Lightning's "last" comparison with other checkpoint files."""
        path = Path(self.ckpt_path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
        tmp.write_text(json.dumps({"kind": _POINTER_KIND, "storage": str(self.storage)}))
        os.replace(tmp, path)

    # -- loading (every rank) --------------------------------------------------------------
    def _restore(self) -> dict[str, Any] | None:
        if self._ckpt is None:
            raise RuntimeError("FlashCheckpoint: a load before setup")
        holder: dict[str, Any] = {}
        if self._ckpt.restore(holder) is None:
            return None
        checkpoint: dict[str, Any] = decode(holder["lightning"])
        self._last_step = int(checkpoint.get("global_step", -1))
        return checkpoint

    def on_load_checkpoint(self, trainer: Any, pl_module: Any, checkpoint: dict[str, Any]) -> None:
        extra = checkpoint.get("flashckpt")
        self._rng_pending = extra.get("rng") if isinstance(extra, dict) else None

    def on_train_start(self, trainer: Any, pl_module: Any) -> None:
        if self._rng_pending is not None:
            flashckpt.RNGState().load_state_dict(self._rng_pending)
            self._rng_pending = None

    @property
    def checkpointer(self) -> flashckpt.Checkpointer | None:
        """This rank's Checkpointer, between ``setup`` and the end of the fit."""
        return self._ckpt


def _classes(ns: str) -> tuple[type, type]:
    """The callback and IO classes built on ``ns``'s own ``OnExceptionCheckpoint`` and
    ``CheckpointIO`` (Lightning recognises only its own package's classes)."""
    if ns not in _built:
        pl = importlib.import_module(ns)
        callbacks = importlib.import_module(f"{ns}.callbacks")
        plugins = importlib.import_module(f"{ns}.plugins")
        strategies = importlib.import_module(f"{ns}.strategies")
        io = type("FlashCheckpointIO", (_IO, plugins.CheckpointIO), {})
        names = {
            "_base": callbacks.OnExceptionCheckpoint,
            "_trainer_cls": pl.Trainer,
            "_strategies": (strategies.SingleDeviceStrategy, strategies.DDPStrategy),
            "_io_cls": io,
            "_ns": ns,
        }
        cb = type("FlashCheckpoint", (_Callback, callbacks.OnExceptionCheckpoint), names)
        _built[ns] = (cb, io)
    return _built[ns]


__all__ = ["FlashCheckpoint", "load_checkpoint"]
