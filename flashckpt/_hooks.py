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
``persist.sealed``          persist              ``step`` (every checksum known, the memory
                                                 manifest sealed; the mirrors start next)
``persist.chunk``           io pool              ``step``, ``tier``, ``key`` (chunk written)
``persist.manifest``        persist              ``step``, ``tier`` (manifest written)
``commit.record``           persist / training   ``step``, ``tier`` (about to write the record)
``commit.done``             persist / training   ``step``, ``tier`` (record written)
``retention.delete``        persist              ``step``, ``tier`` (its URL; about to retire)
``mirror.piece``            mirror               ``step``, ``sent`` (bytes sent so far)
``restore.loaded``          training             ``step``, ``tier`` (verified, before apply)
==========================  ===================  ==============================================

Timed points (:func:`timed`): each fires once the call it wraps returns or raises, on the thread
that made the call, with ``t0`` (``time.perf_counter()`` at the start), ``seconds``, ``failed``
(it raised) and the ``info`` named here.  Benchmarks read where the time of a save or restore
goes from these (``bench/bench_core.py``'s profiler), never by wrapping private methods.

==============================  ===================  ===========================================
point                           thread               what was timed (``info``)
==============================  ===================  ===========================================
``time.stager.acquire``         training             waiting for a free staging slot
``time.stager.stage``           training             the copy of a state into a slot
``time.slot.ensure``            training / prefault  mapping and faulting in a slot's memory
``time.persist.hash``           persist              checksumming a whole slot at once
``time.persist.tier``           persist              writing one snapshot to a tier (``tier``)
``time.persist.retention``      persist              a retention pass on a tier
``time.restore.inventory``      training             finding what every tier holds
``time.restore.fetch``          training             reading chunks of a tier into a slot
``time.restore.verify``         training             checking a slot's chunks against a manifest
``time.restore.apply``          training             copying a restored snapshot into the state
``time.backend.put``            any                  ``LocalBackend.put`` (``key``)
``time.backend.delete_prefix``  any                  ``LocalBackend.delete_prefix``
==============================  ===================  ===========================================
"""

from __future__ import annotations

import functools
import threading
import time
from collections.abc import Callable
from typing import Any, ParamSpec, TypeVar

Callback = Callable[..., None]
P = ParamSpec("P")
R = TypeVar("R")

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


def listening(point: str) -> bool:
    """Some callback is registered for ``point`` (a code path may then take its slower,
    observable form)."""
    return point in _listeners


def clear() -> None:
    """Drop every callback (tests, between cases)."""
    with _lock:
        _listeners.clear()


def timed(
    point: str, info: Callable[..., dict[str, Any]] | None = None
) -> Callable[[Callable[P, R]], Callable[P, R]]:
    """Decorate a function so that each call fires ``point`` when it returns or raises (see
    the module docstring), with ``info(*args, **kwargs)`` added when given.  Without a
    listener a call costs one dict lookup more; ``info`` is then not called."""

    def decorate(fn: Callable[P, R]) -> Callable[P, R]:
        @functools.wraps(fn)
        def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
            if point not in _listeners:
                return fn(*args, **kwargs)
            t0 = time.perf_counter()
            failed = True
            try:
                out = fn(*args, **kwargs)
                failed = False
                return out
            finally:
                extra = info(*args, **kwargs) if info is not None else {}
                fire(point, t0=t0, seconds=time.perf_counter() - t0, failed=failed, **extra)

        return wrapper

    return decorate
