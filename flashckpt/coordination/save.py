"""One save: the state's tensors copied into a free slot, recorded in the memory tier, and
handed to the save worker.  Training thread only.

This is the only cost a save has on the training thread: a slot (waiting if both are still
being persisted), one memory copy, one small record in shared memory.  Any exception after
the slot is taken (even a ``KeyboardInterrupt``) gives it back and forgets its half-written
snapshot; a memory tier that is full is reported on a failed handle, never raised.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

from flashckpt import _hooks as hooks
from flashckpt.coordination.handle import SaveHandle
from flashckpt.coordination.parts import RankParts
from flashckpt.coordination.salvage import Salvage
from flashckpt.coordination.worker import Job
from flashckpt.format import CODEC_RAW, ChunkEntry, Manifest, TensorEntry, now
from flashckpt.staging.stager import Layout, Slot
from flashckpt.staging.statewalk import FlatState
from flashckpt.storage import translate_os_error

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Staged:
    """A save's outcome on the training thread: its handle and what staging cost."""

    handle: SaveHandle
    waited: float  # seconds waiting for a free slot
    nbytes: int  # bytes staged (0: the save failed before its copy)
    cold: bool  # the slot had to be mapped (the state outgrew it)


class Saver:
    """Stages saves of one rank (see the module docstring)."""

    def __init__(self, parts: RankParts, salvage: Salvage, track: Callable[[SaveHandle], None]) -> None:
        self.parts = parts
        self.salvage = salvage  # told which snapshot is the newest, and whether it is persisted
        self.track = track

    def stage(self, step: int, flat: FlatState, layout: Layout, *, persist: bool, seq: str) -> Staged:
        """Copy ``flat`` into a slot as ``step`` and hand it to the save worker (with the
        persistent tiers when ``persist``); ``seq`` names the save among the ranks."""
        p = self.parts
        slot, waited = p.stager.acquire(
            layout.total_bytes, check=p.persister.check_alive, idle=p.persister.idle
        )
        try:
            p.mem.reclaim(slot, p.opts.coord_timeout_s)  # its bytes are about to change
            held_by = p.split.plan(layout)  # chunks another rank of the node stages
            cold = p.stager.stage(slot, flat.tensors, layout, skip=held_by.keys())
            p.stager.mark_staged(slot)
            manifest = p.mem.record(slot, self._manifest(step, flat, layout, slot, held_by))
            hooks.fire("stage.done", step=step)
            handle = self._submit(manifest, slot, persist, seq)
        except OSError as exc:  # the memory tier is full: report, never kill training
            p.mem.forget(slot)
            p.stager.release(slot)
            return self._failed(step, exc)
        except BaseException:  # whatever it is, the slot goes back and says nothing
            p.mem.forget(slot)
            p.stager.release(slot)
            raise
        if cold:  # the state grew: grow the other slot too, off the training thread
            p.stager.prefault(layout.total_bytes)
        return Staged(handle, waited, layout.total_bytes, cold)

    def _manifest(
        self, step: int, flat: FlatState, layout: Layout, slot: Slot, held_by: dict[int, str]
    ) -> Manifest:
        """The unsealed manifest of a snapshot just staged in ``slot``; chunk ``i`` of
        ``held_by`` is in the slot of the rank of the node named there."""
        p, tl = self.parts, self.parts.timeline
        entries = tuple(
            TensorEntry(t.dtype, tuple(t.shape), off, n)
            for t, off, n in zip(flat.tensors, layout.offsets, layout.nbytes, strict=True)
        )
        chunks = tuple(
            ChunkEntry(held_by.get(i, slot.name), o, o, n, n, CODEC_RAW, "")
            for i, (o, n) in enumerate(layout.chunks)
        )
        return Manifest(
            step,
            p.rank,
            p.world,
            p.node,
            now(),
            layout.total_bytes,
            entries,
            chunks,
            flat.tree,
            generation=tl.gen,
            storage=tl.storage,
            run=tl.run,
            ancestors=tl.ancestors,
        )

    def _submit(self, manifest: Manifest, slot: Slot, persist: bool, seq: str) -> SaveHandle:
        """Hand a staged snapshot to the persist thread; returns its handle."""
        p = self.parts
        tiers = p.tiers if persist else []
        mirrored = bool(p.persister.mirrors.peers)
        handle = SaveHandle(
            manifest.step, ["memory", *(["mirror"] if mirrored else []), *(t.name for t in tiers)]
        )
        job = Job(manifest, slot, list(tiers), handle, seq=seq, generation=slot.generation, mirror=mirrored)
        p.persister.submit(job)
        self.track(handle)
        self.salvage.last = (manifest.step, slot, persist)
        return handle

    def _failed(self, step: int, error: OSError) -> Staged:
        """A save that could not even be staged (memory tier full): a handle that failed."""
        exc = translate_os_error(error, f"stage step {step}")
        log.error("flashckpt: step %d could not be staged in %s: %s", step, self.parts.rank_dir, exc)
        handle = SaveHandle(step, ["memory"])
        handle._finish_tier("memory", 0.0, exc)
        self.track(handle)
        return Staged(handle, 0.0, 0, False)
