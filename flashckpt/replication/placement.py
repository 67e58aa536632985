"""Where each rank's mirrors go, and the address its own server is reached at."""

from __future__ import annotations

import os
import socket


def mirror_peers(nodes: list[str], rank: int, k: int) -> list[int]:
    """The ranks that hold ``rank``'s mirrors: one on each of the ``k`` nodes after its own
    (in sorted node order), at the same position among that node's ranks.  Stable across steps
    and attempts; never on the rank's own node, so one node's loss never takes a shard and all
    of its copies."""
    names = sorted(set(nodes))
    by_node = {n: [r for r, m in enumerate(nodes) if m == n] for n in names}
    mine = nodes[rank]
    pos = by_node[mine].index(rank)
    i = names.index(mine)
    out = []
    for j in range(1, min(k, len(names) - 1) + 1):
        ranks = by_node[names[(i + j) % len(names)]]
        out.append(ranks[pos % len(ranks)])
    return out


def default_host() -> str:
    """The address peers reach this rank's mirror server at: ``FLASHCKPT_MIRROR_HOST``, else
    the address the host name resolves to."""
    host = os.environ.get("FLASHCKPT_MIRROR_HOST")
    if host:
        return host
    try:
        return socket.gethostbyname(socket.gethostname())
    except OSError:
        return "127.0.0.1"
