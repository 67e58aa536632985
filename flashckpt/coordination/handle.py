"""What a save returns: :class:`SaveHandle`, staged already, durable once ``wait`` returns.

The persist thread reports each tier on it as that tier finishes; any thread may wait on it.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterable
from typing import Any

from flashckpt.errors import FlashCkptError, WaitTimeout

log = logging.getLogger(__name__)


class _Failure:
    """A background error, raised at most once by whichever wait sees it first."""

    def __init__(self, tier: str, error: BaseException) -> None:
        self.tier = tier
        self.error = error
        self.observed = False
        self.lock = threading.Lock()

    def claim(self) -> bool:
        with self.lock:
            if self.observed:
                return False
            self.observed = True
            return True


class SaveHandle:
    """The result of ``Checkpointer.save``: staged already, durable once :meth:`wait` returns.

    ``wait``/``done`` may be called from any thread.  A background failure is raised once,
    from the first ``wait`` (this handle's or the checkpointer's) that sees it.
    """

    def __init__(self, step: int, tiers: Iterable[str]) -> None:
        self.step = step
        self.tiers = tuple(tiers)
        self.persist_s: dict[str, float] = {}
        #: chunk bytes written per persistent tier (unchanged chunks are not written again)
        self.written_bytes: dict[str, int] = {}
        #: failures of durable tiers (memory, local, storage): raised once by ``wait``
        self.failures: list[_Failure] = []
        #: failures that do not make the snapshot less durable (a peer's mirror, unless
        #: ``Options.require_mirrors``; retention after the commit): reported in ``stats``
        #: and the log, never raised
        self.warnings: list[_Failure] = []
        self._pending = set(self.tiers)
        self._event = threading.Event()
        self._lock = threading.Lock()
        if not self._pending:
            self._event.set()

    def __repr__(self) -> str:
        state = "done" if self.done() else "pending"
        return f"SaveHandle(step={self.step}, tiers={self.tiers}, {state})"

    def done(self) -> bool:
        """True once every tier has finished (successfully or not)."""
        return self._event.is_set()

    def wait(self, timeout: float | None = None) -> None:
        """Block until the snapshot is durable on every configured tier.

        Raises :class:`~flashckpt.errors.WaitTimeout` if ``timeout`` runs out, and the first
        tier's error (with its original type) if a tier failed and nobody has raised it yet.
        """
        if not self._event.wait(timeout):
            raise WaitTimeout(f"step {self.step} not durable after {timeout} s")
        self.raise_failure()

    def raise_failure(self) -> None:
        """Raise this save's first failure unless some wait raised one already: a save's
        failure is raised once, however many tiers it failed (all are in ``stats``)."""
        claimed = [f for f in self.failures if f.claim()]
        if len(claimed) == len(self.failures) and claimed:
            raise claimed[0].error

    def report(self) -> dict[str, Any]:
        """Any thread: what is known so far: ``persist_s`` and ``written_bytes`` per tier, and
        ``errors`` (every failure and warning, as ``"tier: Type: message"``)."""
        with self._lock:
            return {
                "persist_s": dict(self.persist_s),
                "written_bytes": dict(self.written_bytes),
                "errors": [
                    f"{f.tier}: {type(f.error).__name__}: {f.error}" for f in self.failures + self.warnings
                ],
            }

    def durable_on(self) -> tuple[str, ...]:
        """Tiers on which this step is durable."""
        failed = {f.tier for f in self.failures}
        return tuple(t for t in self.tiers if t in self.persist_s and t not in failed)

    # -- called by the persist thread ------------------------------------------------------
    def _finish_tier(
        self, tier: str, seconds: float, error: BaseException | None = None, *, fatal: bool = True
    ) -> None:
        with self._lock:
            if tier not in self._pending:
                return  # reported already (a tier is reported once)
            self.persist_s[tier] = seconds
            if error is not None:
                (self.failures if fatal else self.warnings).append(_Failure(tier, error))
            self._pending.discard(tier)
            if not self._pending:
                self._event.set()

    def _fail_pending(self, error: BaseException) -> None:
        """Report every tier not reported yet as failed with ``error``."""
        for name in self.tiers:
            self._finish_tier(name, 0.0, error)

    def _warn(self, tier: str, error: BaseException) -> None:
        """A failure after the fact that does not change durability (retention)."""
        with self._lock:
            self.warnings.append(_Failure(tier, error))


def wait_quietly(handles: list[SaveHandle], timeout_s: float) -> None:
    """Wait (``timeout_s`` in all) until ``handles`` are durable, logging what failed instead
    of raising it (it stays on the handles for ``wait`` and ``close``).  Any thread."""
    deadline = time.monotonic() + timeout_s
    for h in handles:
        try:
            h.wait(max(0.0, deadline - time.monotonic()))
        except FlashCkptError as exc:
            log.error("flashckpt: step %d did not become durable: %s", h.step, exc)
