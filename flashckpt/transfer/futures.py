"""Batches of tasks on a thread pool that finish together.

A batch whose tasks write into a caller's buffer (a slot, a user's tensor, a read buffer)
must not return, nor raise, while one of them is still running: the caller gives the buffer
back at once (a slot is reused by the next save, a tensor handed to the user), and a late
write would land in bytes that now belong to someone else.  ``Executor.map`` and a loop of
``future.result()`` raise at the first failure and leave the rest running; these helpers
wait for every task that started, cancel the ones that had not, then raise the first error.

Any thread may call them (not from a task of the same pool: it could wait for itself).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from concurrent.futures import Executor, Future
from typing import TypeVar

T = TypeVar("T")
A = TypeVar("A")


def wait_all(futures: list[Future[T]]) -> list[T]:
    """The results of ``futures`` in order, once every one of them is done.  At the first
    failure the ones not started are cancelled; the first error (in ``futures`` order) is
    raised after the running ones finished."""
    error: BaseException | None = None
    results: list[T] = []
    for f in futures:
        try:
            results.append(f.result())
        except BaseException as exc:  # the first error is raised once every task is done  # noqa: BLE001
            if error is None:
                error = exc
                for g in futures:
                    g.cancel()
    if error is not None:
        raise error
    return results


def run_all(pool: Executor, fn: Callable[[A], T], items: Iterable[A]) -> list[T]:
    """``[fn(x) for x in items]`` on ``pool``; see :func:`wait_all` for what a failure does.
    If submitting fails halfway (the pool is shut down), the tasks already submitted are
    waited for before that error is raised."""
    futures: list[Future[T]] = []
    try:
        for x in items:
            futures.append(pool.submit(fn, x))
    except BaseException:
        for f in futures:
            f.cancel()
        try:
            wait_all(futures)
        except BaseException:  # the submit error is the one raised  # noqa: BLE001
            pass  # the submit error is the one to report
        raise
    return wait_all(futures)
