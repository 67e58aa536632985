"""The final-step agreement of flashckpt/coordination/preemption.py, against its claim.

Ranks that train in lockstep (a collective between two ``save`` calls) make call ``k`` only
after every rank has finished call ``k - 1``: a round per call, the ranks in any order
within it.  Signals reach any subset of ranks at any time (before any call of any round).
Claim: every rank takes exactly one final snapshot, at the same call, and no later than
one call after the first signal was acted on.
"""

from __future__ import annotations

import signal

import torch.distributed as dist
from hypothesis import given, settings
from hypothesis import strategies as st

from flashckpt._dist import Control
from flashckpt.coordination.preemption import Preemption


def _ranks(world: int) -> list[Preemption]:
    store = dist.HashStore()
    out = []
    for r in range(world):
        p = Preemption((signal.SIGTERM,), 10.0, Control.on_store(store, r, world, 5.0), lambda: lambda: None)
        out.append(p)
    return out


def _signal(p: Preemption) -> None:
    p._handle(signal.SIGTERM, None)  # what the handler does, without a process-wide signal


@settings(max_examples=300, deadline=None)
@given(
    world=st.integers(1, 5),
    rounds=st.integers(1, 8),
    data=st.data(),
)
def test_every_rank_takes_its_final_snapshot_at_the_same_call(
    world: int, rounds: int, data: st.DataObject
) -> None:
    ranks = _ranks(world)
    finals: dict[int, list[int]] = {r: [] for r in range(world)}
    first_signal_call: int | None = None
    for call in range(1, rounds + 1):
        order = data.draw(st.permutations(range(world)), label=f"order of call {call}")
        for r in order:
            if (
                data.draw(st.booleans(), label=f"signal rank {r} before call {call}")
                and not ranks[r].signalled
            ):
                _signal(ranks[r])
                if first_signal_call is None:
                    first_signal_call = call
            if ranks[r].at_save():  # its call number `call`
                ranks[r].took_final()
                finals[r].append(call)
    taken = [f for f in finals.values() if f]
    if first_signal_call is None:
        assert not taken
        return
    # every rank took one, the same; or the run ended before the agreed call
    assert all(len(f) <= 1 for f in finals.values())
    calls = {f[0] for f in taken}
    assert len(calls) <= 1
    if taken:
        assert len(taken) == world, finals
        (final,) = calls
        assert first_signal_call <= final <= first_signal_call + (0 if world == 1 else 1)
    else:
        assert rounds <= first_signal_call  # the agreed call lies beyond the last round
