"""Mirror membership: which peers hold each rank's mirrors (chosen at construction, one
server per rank when the job spans several nodes), and, at close, which copies held for
other ranks go.  Training thread only."""

from __future__ import annotations

import contextlib
import logging

from flashckpt.coordination.parts import RankParts
from flashckpt.errors import FlashCkptError
from flashckpt.format import shard_name
from flashckpt.replication.placement import default_host, mirror_peers
from flashckpt.replication.server import MirrorServer

log = logging.getLogger(__name__)


def setup_mirrors(parts: RankParts, nodes: list[str], mirror: int | None, undo: contextlib.ExitStack) -> int:
    """Every rank, at construction (gathers when the job spans several nodes): where each
    rank's mirrors go (``mirror`` copies, ``None``: 1 when the job spans more than one
    node), and a server per rank, which serves the mirrors it holds whenever the job spans
    several nodes (also those an earlier attempt left, when this one mirrors nothing new).
    Returns the copies per snapshot."""
    n_nodes = len(set(nodes))
    k = (1 if n_nodes > 1 else 0) if mirror is None else mirror
    if k > n_nodes - 1:
        if mirror:
            log.warning(
                "flashckpt: mirror=%d but the job spans %d node(s): %d cop%s per snapshot",
                mirror,
                n_nodes,
                n_nodes - 1,
                "y" if n_nodes == 2 else "ies",
            )
        k = n_nodes - 1
    if n_nodes < 2:
        return k
    server = MirrorServer(parts.rank_dir, parts.ctl.secret, parts.opts)
    parts.mirror_server = server
    undo.callback(server.close)
    gathered = parts.ctl.all_gather([default_host(), server.port])
    parts.addrs = [(str(a[0]), int(a[1])) for a in gathered]
    pushes = parts.persister.mirrors
    pushes.peers = [(p, parts.addrs[p]) for p in mirror_peers(nodes, parts.rank, k)]
    pushes.owner = shard_name(parts.rank, parts.world)
    log.debug("flashckpt: rank %d mirrors to ranks %s", parts.rank, [p for p, _ in pushes.peers])
    return k


def close_mirrors(parts: RankParts, clean: bool) -> None:
    """On close: drop the mirrors this rank holds for owners that closed cleanly (their
    snapshots are durable), keep the others for the next attempt.  Store only, no
    collective: an owner that never closes is waited for ``coord_timeout_s`` at most."""
    server, ctl = parts.mirror_server, parts.ctl
    if server is None:
        return
    try:
        ctl.publish(f"closed/r{parts.rank}", "clean" if clean else "dirty")
    except FlashCkptError as exc:
        log.warning("flashckpt: keeping the mirrors held here: %s", exc)
        return
    for owner in server.holdings():
        rank, world = int(owner[1:6]), int(owner[-5:])
        if world != parts.world:  # a mirror from a job of another shape: nobody restores it
            server.drop(owner)
            continue
        try:
            outcome = ctl.await_outcome(f"closed/r{rank}")
        except FlashCkptError as exc:
            log.warning("flashckpt: keeping the mirror of %s: %s", owner, exc)
            continue
        if outcome == "clean":
            server.drop(owner)
        else:
            log.warning("flashckpt: keeping the mirror of %s: its owner is not durable", owner)
