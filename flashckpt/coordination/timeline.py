"""The run's timeline as one Checkpointer continues it, and whose snapshots are whose.

Snapshots are ordered by ``(generation, step)`` (docs/format.md): every Checkpointer saves in
a generation newer than everything its ``restore`` saw, so the run a user continues (after a
rollback to an older step, or a fallback past a corrupt one) is the newest, whatever the step
numbers of the steps it abandoned.  :class:`Timeline` is the one owner of this rank's place
on it: the generation, the run id, the last step saved or restored, and where the timeline
branched off older generations.  Training thread only.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

from flashckpt.coordination.inventory import Ancestors, Order
from flashckpt.format import MAX_ANCESTORS

log = logging.getLogger(__name__)

#: What :meth:`Timeline.mark` saves and :meth:`Timeline.back_to` puts back.
Mark = tuple[int, int | None, Ancestors]


@dataclass
class Timeline:
    """This rank's place on the run's timeline.  See the module docstring."""

    gen: int  # the generation the next save is made in
    run: str  # the run id (the storage tier's run record, else a fresh one)
    run_known: bool  # the storage tier names the run
    storage: str  # which storage tier this Checkpointer's snapshots belong to (in every manifest)
    prev: int | None = None  # the last step saved or restored: a lower one starts a generation
    prev_saved: bool = False  # whether this generation saved step ``prev`` (again starts one too)
    ancestors: Ancestors = ()  # where this generation's timeline branched off older ones
    _warned: set[str] = field(default_factory=set)  # memory snapshots of other runs, named once

    def next_save(self, step: int) -> None:
        """Before ``step`` is saved: one order ``(generation, step)`` names one save.  A step
        below the last one saved or restored continues the run from ``step - 1`` (the steps
        above are left behind); a step this generation saved already continues it from that
        earlier save.  Either starts a new generation."""
        prev = self.prev
        if prev is not None and (step < prev or (step == prev and self.prev_saved)):
            branch = step - 1 if step < prev else step
            self.ancestors = ((self.gen, branch), *self.ancestors)[:MAX_ANCESTORS]
            self.gen += 1
            if step < prev:
                log.warning("flashckpt: step %d is below step %d: a new timeline starts here", step, prev)
            else:
                log.info("flashckpt: step %d saved again: the newer save comes first", step)
        self.prev, self.prev_saved = step, True

    def restored(self, order: Order, ancestors: Ancestors, newest_gen: int, run: str) -> None:
        """``order`` was restored: saves from here on are newer than everything any rank saw
        (``newest_gen``, a rollback's included), on a timeline that continues from it.  ``run``:
        the restored snapshot's, continued when the storage tier names none."""
        self.gen = max(self.gen, newest_gen + 1)
        self.prev, self.prev_saved = order[1], False
        self.ancestors = (order, *ancestors)[:MAX_ANCESTORS]
        if run and not self.run_known:
            self.run = run

    def mark(self) -> Mark:
        return self.gen, self.prev, self.ancestors

    def back_to(self, mark: Mark) -> None:
        self.gen, self.prev, self.ancestors = mark

    def fresh(self, newest_gen: int) -> None:
        """Nothing was restored: the next save starts afresh, newer than everything seen."""
        self.gen = max(self.gen, newest_gen + 1)
        self.prev, self.ancestors = None, ()

    def ours(self, storage: str, run: str, where: str) -> bool:
        """A memory snapshot (own or a peer's mirror) belongs to this run: saved for this
        storage tier, and, once the storage tier names its run, by that run.  (Wiping the
        storage tier does not disown memory: that is how a lost node's steps come back.)
        ``where`` names the snapshots in the warning, given once per place."""
        why = None
        if storage and storage != self.storage:
            why = "it was saved for another storage tier"
        elif run and self.run_known and run != self.run:
            why = f"it belongs to run {run}, the storage tier to run {self.run}"
        if why is None:
            return True
        if where not in self._warned:
            self._warned.add(where)
            log.warning("flashckpt: not restoring the memory snapshots in %s: %s", where, why)
        return False
