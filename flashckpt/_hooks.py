"""The event seam: named points in the engine where tests and tools observe or inject faults.

``fire(point, **info)`` runs the callbacks registered for ``point`` on the calling thread; with
none registered it costs one dict lookup.  A callback may raise (the engine then fails as if
the operation at that point had failed) or kill the process (crash tests).  Tests use this
instead of patching private methods, so the engine can be rearranged without breaking them.

Points (the thread that fires each, and its ``info``):

==========================  ===================  ==============================================
point                       thread               info
==========================  ===================  ==============================================
``stage.tensor``            training             ``index``, ``count`` (after a CPU tensor's copy)
``stage.done``              training             ``step`` (copied, memory manifest written)
``persist.next``            persist              ``step`` (a job taken from the queue; an
                                                 exception here ends the thread: tests of a
                                                 persist thread that died)
``persist.chunk``           io pool              ``step``, ``tier``, ``key`` (chunk written)
``persist.manifest``        persist              ``step``, ``tier`` (manifest written)
``commit.record``           persist / training   ``step``, ``tier`` (about to write the record)
``commit.done``             persist / training   ``step``, ``tier`` (record written)
``retention.delete``        persist              ``step``, ``tier`` (its URL; about to retire)
``mirror.piece``            mirror               ``step``, ``sent`` (bytes sent so far)
``restore.loaded``          training             ``step``, ``tier`` (verified, before apply)
==========================  ===================  ==============================================
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

Callback = Callable[..., None]

_listeners: dict[str, list[Callback]] = {}
_lock = threading.Lock()


def on(point: str, fn: Callback) -> Callable[[], None]:
    """Call ``fn(point=..., **info)`` whenever ``point`` fires; returns a function that
    unregisters it.  Any thread."""
    with _lock:
        _listeners.setdefault(point, []).append(fn)

    def off() -> None:
        with _lock:
            fns = _listeners.get(point, [])
            if fn in fns:
                fns.remove(fn)
            if not fns:
                _listeners.pop(point, None)

    return off


def fire(point: str, **info: Any) -> None:
    """Run the callbacks of ``point`` (none: a dict lookup).  Exceptions propagate."""
    fns = _listeners.get(point)
    if not fns:
        return
    for fn in list(fns):
        fn(point=point, **info)


def clear() -> None:
    """Drop every callback (tests, between cases)."""
    with _lock:
        _listeners.clear()
