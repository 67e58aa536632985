"""Preemption: a signal (SIGTERM, SIGUSR1, ...) turns the next save into the job's final one.

Who calls what:

* **The signal handler** (Python runs it on the main thread, between two bytecodes) only
  records the signal, wakes the watcher through a pipe (``os.write``: no lock that the
  interrupted code could hold) and calls the handler it replaced (chained).  The same pipe is
  the process's wakeup fd (``signal.set_wakeup_fd``, unless another owner, e.g. asyncio, has
  it), which the interpreter writes the signal number to at once, from C: the watcher learns
  of the signal even while the main thread is blocked in native code, where Python handlers
  do not run (a collective waiting for a rank that died: torchrun then SIGTERMs the survivors).
* **The training thread** calls :meth:`Preemption.at_save` on every ``save`` call; it says
  whether this call takes the final snapshot.
* **The ``flashckpt-preempt`` thread** (the watcher) waits for the signal, then for the grace
  period; if the process is still running then, it persists the newest staged snapshot
  (``on_grace``) and, when the replaced disposition was the default one (terminate), asks the
  main thread to terminate the process the way the signal would have, now that the snapshot
  is durable.  If the main thread never ran the handler in the whole grace period it is stuck
  in native code and will make no save: the process ends at once (exit status 128 + signal);
  its snapshots stay in the memory tier, where the restart finds and persists them.

The final step in a multi-rank job.  A signal may reach one rank only, or the ranks at
different steps.  The first rank to see it announces, under a store key, that the final
save is the call *after* its current one (``n + 1``, counted in ``save`` calls, which every
rank makes alike); every rank reads that key at each ``save`` call (one store round trip).
When the ranks train in lockstep (any per-step collective: DDP, FSDP), no rank can be at
call ``n + 2`` before the announcing rank has left call ``n``, so every rank reads the key
at call ``n + 1`` at the latest and takes the final snapshot there: the same step on every
rank.  A rank that finds itself past the announced call (ranks that run free of one another)
takes its final snapshot at once and says so in the log; restore then finds the newest step
every rank committed.
"""

from __future__ import annotations

import logging
import os
import select
import signal
import threading
import time
from collections.abc import Callable, Iterable
from typing import Any

from flashckpt._dist import Control
from flashckpt.errors import ConfigError, FlashCkptError

log = logging.getLogger(__name__)

#: The signals that mean "preempted" by default: SIGTERM (Kubernetes, SLURM at the end of a
#: job's time or on preemption), SIGUSR1 (SLURM's ``--signal=USR1@...`` before requeueing).
DEFAULT_SIGNALS = ("SIGTERM", "SIGUSR1")
_KEY = "preempt/final"
#: How long the watcher lets the main thread act on its request to end the process.
_EXIT_WAIT_S = 2.0

Handler = Callable[[int, Any], Any] | int | signal.Handlers | None


def parse_signals(spec: Iterable[int | str] | None) -> tuple[signal.Signals, ...]:
    """``spec`` as signals (names like ``"SIGTERM"``/``"TERM"`` or numbers); ``None`` or
    empty: none.  Raises :class:`ConfigError` for what is not a signal one can handle."""
    if spec is None:
        return ()
    if isinstance(spec, (str, int)):
        raise ConfigError(f"preempt_signals must be a list of signals, got {spec!r}")
    out: list[signal.Signals] = []
    for s in spec:
        try:
            if isinstance(s, str):
                name = s.upper() if s.upper().startswith("SIG") else "SIG" + s.upper()
                sig = signal.Signals[name]
            elif isinstance(s, int) and not isinstance(s, bool):
                sig = signal.Signals(s)
            else:
                raise KeyError(s)
        except (KeyError, ValueError):
            raise ConfigError(f"preempt_signals: {s!r} is not a signal") from None
        if sig in (signal.SIGKILL, signal.SIGSTOP):
            raise ConfigError(f"preempt_signals: {sig.name} cannot be caught")
        if sig not in out:
            out.append(sig)
    return tuple(out)


class Preemption:
    """One Checkpointer's preemption handling (see the module docstring).

    Args:
        signals: the signals to handle (none: this object only answers "not preempted").
        grace_s: how long after the signal the loop has to take its final save and close.
        ctl: the job's control plane (the store carries the final step between ranks).
        on_grace: called on the watcher thread when the grace period ends before ``close``;
            persists the newest staged snapshot and returns a function that waits (bounded)
            until it is durable.
    """

    def __init__(
        self,
        signals: tuple[signal.Signals, ...],
        grace_s: float,
        ctl: Control,
        on_grace: Callable[[], Callable[[], None]],
    ) -> None:
        self._signals = signals
        self._grace_s = grace_s
        self._ctl = ctl
        self._on_grace = on_grace
        self._previous: dict[signal.Signals, Handler] = {}
        self._received: signal.Signals | None = None  # set by the handler
        self._calls = 0  # save calls so far
        self._final_call: int | None = None  # the save call that takes the final snapshot
        self._final_taken = False
        self._terminate = False  # the watcher asks the handler to end the process
        self._uninstalled = False  # closed: a handler of ours still installed only chains
        self._closing = threading.Event()
        self._pipe: tuple[int, int] | None = None
        self._wakeup = False  # the pipe is the process's signal wakeup fd
        self._watcher: threading.Thread | None = None

    # -- main thread -----------------------------------------------------------------------------
    def install(self) -> None:
        """Install the handlers, chained to the ones they replace.  Main thread only: from any
        other thread (signal handlers belong to the main thread) nothing is installed and a
        debug line says so."""
        if not self._signals:
            return
        if threading.current_thread() is not threading.main_thread():
            log.debug("flashckpt: not on the main thread: no preemption handlers installed")
            return
        r, w = os.pipe()
        os.set_blocking(w, False)
        self._pipe = (r, w)
        try:
            old = signal.set_wakeup_fd(w, warn_on_full_buffer=False)
            if old != -1:  # another owner's (asyncio's): left to it; the handler still wakes us
                signal.set_wakeup_fd(old)
            self._wakeup = old == -1
            for sig in self._signals:
                self._previous[sig] = signal.getsignal(sig)
                signal.signal(sig, self._handle)
        except BaseException:
            self.uninstall()
            raise
        self._watcher = threading.Thread(target=self._watch, name="flashckpt-preempt", daemon=True)
        self._watcher.start()

    def closing(self) -> None:
        """The loop is closing (any thread): the watcher neither persists nor ends the process."""
        self._closing.set()

    def uninstall(self) -> None:
        """Stop the watcher and put back the handlers replaced (where ours is still the one
        installed: a handler installed after ours, which may chain to it, stays; ours then
        only chains).  Any thread; handlers are put back from the main thread only."""
        self._closing.set()
        self._uninstalled = True
        if self._pipe is not None:
            _wake(self._pipe[1])
        if self._watcher is not None and self._watcher is not threading.current_thread():
            self._watcher.join(timeout=self._grace_s + 60.0)
        if threading.current_thread() is threading.main_thread():
            if self._wakeup and self._pipe is not None:
                now = signal.set_wakeup_fd(-1)
                if now != self._pipe[1]:  # another owner took it after us: theirs stays
                    signal.set_wakeup_fd(now)
                self._wakeup = False
            for sig, prev in list(self._previous.items()):
                if signal.getsignal(sig) == self._handle:
                    signal.signal(sig, prev if prev is not None else signal.SIG_DFL)
                    del self._previous[sig]
        # Closed only once it is not the wakeup fd any more: the interpreter writes signal
        # numbers to that fd, and a closed number may be reused by another file or socket.
        # (Put back only from the main thread: closed from another one, the pipe stays open.)
        if (
            self._pipe is not None
            and not self._wakeup
            and (self._watcher is None or not self._watcher.is_alive())
        ):
            for fd in self._pipe:
                os.close(fd)
            self._pipe = None

    @property
    def signalled(self) -> bool:
        """A preemption signal reached this process.  Any thread."""
        return self._received is not None

    @property
    def final_taken(self) -> bool:
        """This rank has taken the job's final snapshot.  Any thread."""
        return self._final_taken

    def at_save(self) -> bool:
        """Training thread, every ``save`` call (counted here: every rank makes them alike):
        True if this call takes the final snapshot.  One store round trip per call in a
        multi-rank job (none in a one-process job, none without ``signals``)."""
        self._calls += 1
        call = self._calls
        if self._final_taken or not self._signals:
            return False
        if self._final_call is None:
            self._final_call = self._learn(call)
        if self._final_call is None or call < self._final_call:
            return False
        if call > self._final_call:
            log.error(
                "flashckpt: this rank learnt of the preemption at save call %d, after the final "
                "call %d the job agreed on (its ranks do not train in lockstep): it takes its final "
                "snapshot now; a restore finds the newest step every rank committed",
                call,
                self._final_call,
            )
        log.warning("flashckpt: preempted: this save call takes the final snapshot and persists it")
        return True

    def took_final(self) -> None:
        """Training thread: the final snapshot was staged (and handed on to persist)."""
        self._final_taken = True

    def _learn(self, call: int) -> int | None:
        """The final call, if this rank knows it now: its own signal (a one-process job: this
        call; a multi-rank job: announced as the next call), or another rank's announcement."""
        if not self._ctl.distributed:
            return call if self._received is not None else None
        try:
            if self._received is not None:
                return int(self._ctl.propose(_KEY, str(call + 1)))
            announced = self._ctl.outcome_now(_KEY)
        except (FlashCkptError, ValueError) as exc:
            log.warning("flashckpt: cannot read or announce the preemption: %s", exc)
            return None
        if announced is None:
            return None
        log.warning("flashckpt: another rank was preempted: save call %s takes the final snapshot", announced)
        return int(announced)

    # -- the handler (main thread, between bytecodes) ------------------------------------------
    def _handle(self, signum: int, frame: Any) -> None:
        sig = signal.Signals(signum)
        prev = self._previous.get(sig)
        if self._terminate or (self._uninstalled and prev in (signal.SIG_DFL, None)):
            # the watcher's request, or a closed Checkpointer's handler still installed (another
            # library put it back): end the process as the signal would have
            signal.signal(sig, signal.SIG_DFL)
            os.kill(os.getpid(), sig)
            return
        if self._uninstalled:  # closed: only the handler it replaced acts
            if callable(prev):
                prev(signum, frame)
            return
        first = self._received is None
        self._received = sig
        if first and self._pipe is not None and not self._closing.is_set():
            _wake(self._pipe[1])
        if callable(prev):
            prev(signum, frame)

    # -- the watcher thread ----------------------------------------------------------------------
    def _watch(self) -> None:
        assert self._pipe is not None
        try:
            sig = self._await_signal()
            if sig is None:
                return
            log.warning(
                "flashckpt: %s received: the next save is the final one; the loop has %.0f s to close",
                sig.name,
                self._grace_s,
            )
            if self._closing.wait(self._grace_s):
                return
            default = self._previous.get(sig) in (signal.SIG_DFL, None)
            if self._received is None:
                # the handler never ran: the main thread is blocked in native code (a collective
                # waiting for a dead rank) and makes no save; its snapshots stay in the memory tier
                log.error(
                    "flashckpt: the training thread has been blocked in native code since %s (%.0f s): "
                    "no save can come; the snapshots stay in the memory tier for the restart%s",
                    sig.name,
                    self._grace_s,
                    "; ending the process" if default else "",
                )
                if default:
                    logging.shutdown()
                    os._exit(128 + sig)
                return
            log.warning(
                "flashckpt: %.0f s after %s the loop has not closed: persisting the newest snapshot",
                self._grace_s,
                sig.name,
            )
            wait_durable = self._on_grace()
            if default and not self._closing.is_set():
                wait_durable()
                if not self._closing.is_set():
                    log.warning("flashckpt: ending the process as %s would have", sig.name)
                    self._terminate = True
                    os.kill(os.getpid(), sig)
                    # The handler runs when the main thread next runs Python code; one stuck in
                    # a call that never returns gets the signal's exit status all the same.
                    time.sleep(_EXIT_WAIT_S)
                    os._exit(128 + sig)
        except Exception:  # a watcher never dies silently: logged; training goes on
            log.exception("flashckpt: the preemption watcher failed")

    def _await_signal(self) -> signal.Signals | None:
        """Watcher: block until one of our signals arrives (None: closed first).  The pipe
        carries the handler's wake-up (``\\0``) and, as the process's wakeup fd, the number of
        every signal that has a Python handler (others are skipped)."""
        assert self._pipe is not None
        ours = {int(s) for s in self._signals}
        while True:
            select.select([self._pipe[0]], [], [])
            data = os.read(self._pipe[0], 512)
            if self._closing.is_set() or not data:
                return None
            if self._received is not None:
                return self._received
            got = [b for b in data if b in ours]
            if got:
                return signal.Signals(got[0])


def _wake(fd: int) -> None:
    try:
        os.write(fd, b"\0")
    except (BlockingIOError, OSError):  # full (already woken) or closed: nothing to do
        pass
