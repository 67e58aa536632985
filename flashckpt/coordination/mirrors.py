"""Pushing each sealed snapshot to the peers that mirror this rank (a tier named ``mirror``).

A mirror is best effort unless ``Options.require_mirrors``: a slow or dead peer never fails
the save's other tiers, and a push is abandoned when a save waits for its slot.  Persist
thread only; the pushes run on the ``flashckpt-mirror`` thread.  Which peers mirror a rank
is decided by :mod:`.membership`.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor, wait
from dataclasses import dataclass

from flashckpt._config import Options
from flashckpt._dist import Control
from flashckpt.coordination.handle import SaveHandle
from flashckpt.format import Manifest, memory_manifest
from flashckpt.replication.client import MirrorAbort, push
from flashckpt.staging.memory_tier import PartsReader
from flashckpt.staging.stager import Slot

log = logging.getLogger(__name__)


@dataclass
class Pushes:
    """One snapshot's pushes in flight: (peer rank, future of the bytes sent)."""

    t0: float
    futures: list[tuple[int, Future[int]]]


class MirrorPushes:
    """The peers holding this rank's mirrors, and the pushes to them."""

    def __init__(self, opts: Options, control: Control) -> None:
        self.opts = opts
        self.control = control
        #: (peer rank, address) of the ranks holding this rank's mirrors; set by the Checkpointer
        self.peers: list[tuple[int, tuple[str, int]]] = []
        self.owner = ""  # this rank's shard name, as the peers file it
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="flashckpt-mirror")
        self._abort = threading.Event()
        #: peers whose mirror is failing now: a failure is logged once per peer and episode
        self._failing: set[int] = set()

    def start(self, m: Manifest, slot: Slot | PartsReader) -> Pushes | None:
        """Start pushing sealed ``m`` (its bytes read from ``slot``) to each peer, alongside
        the tier writes; the slot stays held until :meth:`finish`.  A peer is sent the chunks
        this rank holds: a chunk it leaves to a rank of its node (replicated state staged
        once per node) is that rank's to send to its own peers, on the same node as ours
        (``mirror_peers``), so a node's replicated state crosses the network once.  None if
        there are no peers."""
        if not self.peers:
            return None
        # A fresh abort per snapshot: setting it (``finish``) shuts the pushes' sockets down,
        # so even a send blocked on a peer that stopped reading ends at once.
        self._abort = MirrorAbort()
        t0 = time.perf_counter()
        mine = memory_manifest(m, slot.name, parts=True)
        args = (self.control.secret, self.owner, mine, slot.view, self.opts, self._abort)
        return Pushes(t0, [(peer, self._pool.submit(push, addr, *args)) for peer, addr in self.peers])

    def finish(self, pushes: Pushes, handle: SaveHandle, step: int, slot_wanted: Callable[[], bool]) -> None:
        """Wait for the pushes and report the ``mirror`` tier on ``handle``.  Only the pushes
        hold the slot now: if a save waits for it (``slot_wanted``), the peers cannot keep up,
        and this snapshot's mirror is abandoned (reported) rather than cost training time."""
        futures = [f for _, f in pushes.futures]
        while not all(f.done() for f in futures):
            if slot_wanted():
                self._abort.set()
            wait(futures, timeout=0.005)
        error: BaseException | None = None
        sent = 0
        for peer, fut in pushes.futures:
            try:
                sent += fut.result()
            except Exception as exc:  # a slow or dead peer never fails the save's other tiers  # noqa: BLE001
                self._failed(peer, step, exc)
                error = error or exc
            else:
                if peer in self._failing:
                    self._failing.discard(peer)
                    log.info("flashckpt: mirroring to rank %d works again (step %d)", peer, step)
        handle.written_bytes["mirror"] = sent
        handle._finish_tier("mirror", time.perf_counter() - pushes.t0, error, fatal=self.opts.require_mirrors)

    def _failed(self, peer: int, step: int, exc: BaseException) -> None:
        """A mirror is best effort: logged once per peer and episode (a slow peer would
        otherwise log every step), always in ``stats``."""
        if peer in self._failing:
            log.debug("flashckpt: mirroring step %d to rank %d failed: %s", step, peer, exc)
            return
        self._failing.add(peer)
        log.warning(
            "flashckpt: mirroring step %d to rank %d failed: %s (logged once until it works again; "
            "the local and storage tiers are unaffected)",
            step,
            peer,
            exc,
        )

    def close(self) -> None:
        """Wait for the pushes in flight and stop the push thread."""
        self._pool.shutdown(wait=True)
