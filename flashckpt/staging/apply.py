"""A verified snapshot in a slot, loaded back into a live state in place.

:func:`precheck` refuses a snapshot the state cannot take before anything is written;
:func:`fill_targets` picks the live tensors a memory-tier restore fills while it checksums
the slot (one pass over memory instead of two); :func:`apply` loads the rest.  Training
thread only (the copies to a device run on its side stream and are synchronized before
:func:`apply` returns).
"""

from __future__ import annotations

import bisect
import logging
from typing import Any

import torch

from flashckpt import _hooks as hooks
from flashckpt.format import Manifest, part_holders
from flashckpt.staging.stager import Slot, restore_copies
from flashckpt.staging.statewalk import check_loadable, find_targets, load_into

log = logging.getLogger(__name__)


def precheck(state: Any, m: Manifest, *, resharding: bool = False) -> None:
    """Refuse (StateMismatchError) a snapshot the state cannot take, before any write."""

    def meta(i: int) -> tuple[torch.dtype, tuple[int, ...]]:
        return m.tensors[i].dtype, m.tensors[i].shape

    replaced = check_loadable(state, m.state_tree(), meta, resharding=resharding)
    if replaced:
        log.warning(
            "flashckpt: step %d: %d tensor(s) changed shape or dtype and are replaced by the "
            "saved ones instead of filled in place (references to the old tensors keep the old "
            "values): %s%s",
            m.step,
            len(replaced),
            ", ".join(replaced[:5]),
            ", ..." if len(replaced) > 5 else "",
        )


def fill_targets(m: Manifest, state: Any, filled: dict[int, torch.Tensor]) -> list[tuple[int, int, int]]:
    """Pick the live tensors a memory-tier restore can fill while it checksums: recorded in
    ``filled`` (tensor index -> live tensor); returns their ``(start, end, address)`` ranges,
    sorted, as ``verify_chunks`` takes them."""

    def accept(i: int, t: torch.Tensor) -> bool:
        e = m.tensors[i]
        return (
            e.nbytes > 0
            and t.device.type == "cpu"
            and t.dtype == e.dtype
            and tuple(t.shape) == e.shape
            and t.is_contiguous()
            and not t.is_conj()
            and not t.is_neg()
        )

    filled.update(find_targets(state, m.state_tree(), accept))
    entries = ((m.tensors[i], t) for i, t in filled.items())
    return sorted((e.offset, e.offset + e.nbytes, t.data_ptr()) for e, t in entries)


def part_fills(m: Manifest, fills: list[tuple[int, int, int]], slot: Slot) -> list[tuple[int, int, int]]:
    """``fills`` plus, for the chunks of ``m`` another rank of the node holds
    (``format.part_holders``), the bytes no fill takes, into ``slot`` at their own offsets
    (allocated first): what :func:`apply` copies out of the slot is then all there."""
    starts = [f[0] for f in fills]
    extra: list[tuple[int, int]] = []
    for chunks in part_holders(m).values():
        for c in chunks:
            cur, end = c.offset, c.offset + c.nbytes
            j = max(0, bisect.bisect_right(starts, cur) - 1)
            while cur < end:
                while j < len(fills) and fills[j][1] <= cur:
                    j += 1
                nxt = fills[j][0] if j < len(fills) else end
                if nxt > cur:
                    extra.append((cur, min(nxt, end)))
                    cur = min(nxt, end)
                else:
                    cur = fills[j][1]
    if not extra:
        return fills
    slot.allocate(extra, holes=True)
    return sorted(fills + [(lo, hi, slot.address + lo) for lo, hi in extra])


@hooks.timed("time.restore.apply")
def apply(m: Manifest, slot: Slot, state: Any, filled: dict[int, torch.Tensor]) -> None:
    """Load the verified snapshot in ``slot`` into ``state``.  Returns (or raises) only once
    every copy out of the slot is finished, on every device written: the slot may be reused
    right after."""
    tree = m.state_tree()
    with restore_copies(slot) as copies:

        def materialize(i: int, target: torch.Tensor | None) -> torch.Tensor:
            done = filled.get(i)
            if target is not None and done is not None and _same_memory(done, target):
                return target  # already filled while the slot was checksummed
            e = m.tensors[i]
            # A tensor filled while the slot was checksummed holds the verified bytes (the
            # slot may not: a chunk another rank of the node holds is read into the fill only)
            src = done if done is not None else slot.tensor(e.offset, e.nbytes, e.dtype, e.shape)
            if target is not None and target.dtype == e.dtype and tuple(target.shape) == e.shape:
                try:
                    copies.copy(target, src)
                    return target
                except RuntimeError:  # not writable in place (e.g. an expanded, stride-0 view)
                    pass
            device = target.device if target is not None else torch.device("cpu")
            return src.to(device=device, copy=True)

        load_into(state, tree, materialize)


def _same_memory(a: torch.Tensor, b: torch.Tensor) -> bool:
    """``a`` and ``b`` are views of the very same elements (a module's state dict hands out
    new tensor objects that alias its parameters)."""
    return (
        a.device == b.device
        and a.dtype == b.dtype
        and a.data_ptr() == b.data_ptr()
        and a.shape == b.shape
        and a.stride() == b.stride()
    )
