"""Control plane of a multi-rank job: the job's process group and its store.

Two channels, chosen by thread:

* **Collectives** (``all_gather``) run only on the training thread, inside calls every rank
  makes in the same order: ``Checkpointer(...)``, ``restore``, ``close``.  They use a gloo
  group: the job's group when it is gloo, else a gloo group created once over the same ranks
  (an NCCL group cannot carry Python objects between hosts' CPUs).
* **The store** (the job's c10d store, under a per-Checkpointer prefix) is what the
  ``flashckpt-persist`` thread uses to agree on commits: a background thread never issues a
  collective, which would interleave with the training thread's own collectives.

A one-process job (no ``torch.distributed``, or world size 1) gets the same interface with
no communication at all.
"""

from __future__ import annotations

import logging
import pickle
import secrets
import time
from datetime import timedelta
from typing import Any

from flashckpt.errors import CoordinationError, WaitTimeout

log = logging.getLogger(__name__)


class Control:
    """Rank, world size and the two channels.  Constructed on the training thread of every
    rank at the same time (it may run one collective)."""

    def __init__(self, process_group: Any, timeout_s: float) -> None:
        self.timeout_s = timeout_s
        self.rank, self.world = 0, 1
        self._pg: Any = None
        self._own_pg = False  # True: ``_pg`` is the gloo group created here (the job's is not gloo)
        self._store: Any = None
        self._prefix = ""
        #: Shared by the ranks of this Checkpointer only (drawn by rank 0, sent over the job's
        #: group): authenticates mirror connections.
        self.secret = b""
        import torch.distributed as dist

        if not (dist.is_available() and dist.is_initialized()):
            if process_group is not None:
                raise CoordinationError("process_group given but torch.distributed is not initialized")
            return
        pg: Any = process_group if process_group is not None else dist.group.WORLD
        self.rank, self.world = dist.get_rank(pg), dist.get_world_size(pg)
        if self.world == 1:
            return
        if dist.get_backend(pg) == "gloo":
            self._pg = pg
        else:
            self._pg = dist.new_group(
                ranks=dist.get_process_group_ranks(pg),
                backend="gloo",
                timeout=timedelta(seconds=timeout_s),
            )
            self._own_pg = True
        from torch.distributed.distributed_c10d import PrefixStore, _get_process_group_store

        # Keys of this Checkpointer only: a nonce from rank 0, so that a store that outlives a
        # job attempt (or a second Checkpointer in the same job) never sees stale counters.
        token = self.all_gather(secrets.token_hex(32) if self.rank == 0 else None)[0]
        nonce, self.secret = token[:16], bytes.fromhex(token)
        self._prefix = f"flashckpt/{nonce}/"
        self._store = PrefixStore(self._prefix, _get_process_group_store(pg))

    def release(self) -> None:
        """Training thread, once no thread uses this Control any more (``Checkpointer.close``;
        no collective).  Destroys the gloo group this Control created (a job that opens a
        Checkpointer per phase must not collect groups, each with threads and sockets), and
        drops the references to the job's group and store, so that a closed Checkpointer that
        stays referenced does not keep the group's worker threads alive past
        ``destroy_process_group``.  Rank and world size stay readable.  Idempotent."""
        import torch.distributed as dist

        pg, self._pg, self._store = self._pg, None, None
        if pg is not None and self._own_pg and dist.is_initialized():
            try:
                dist.destroy_process_group(pg)
            except (RuntimeError, ValueError, KeyError) as exc:  # already destroyed with WORLD
                log.debug("flashckpt: destroying the control group: %s", exc)

    @property
    def distributed(self) -> bool:
        return self.world > 1

    # -- training thread: collectives ---------------------------------------------------------
    def all_gather(self, obj: Any) -> list[Any]:
        """Training thread, every rank: ``obj`` of every rank, in rank order."""
        if not self.distributed:
            return [obj]
        import torch.distributed as dist

        out: list[Any] = [None] * self.world
        try:
            dist.all_gather_object(out, obj, group=self._pg)
        except RuntimeError as exc:  # a dead peer: gloo raises after the group's timeout
            raise CoordinationError(f"all_gather among {self.world} ranks failed: {exc}") from exc
        return out

    def all_ok(self, ok: bool) -> bool:
        """Training thread, every rank: True if every rank passed True."""
        return all(self.all_gather(bool(ok)))

    # -- any thread: the store -----------------------------------------------------------------
    def arrive(self, key: str) -> int:
        """Count one arrival at ``key``; return the count including this one."""
        return int(self._call("add", key + "/n", 1))

    def publish(self, key: str, outcome: str) -> None:
        """Record the outcome of ``key`` (``"ok"`` or a failure text) for the waiting ranks."""
        self._call("set", key + "/done", outcome.encode())

    def delete(self, key: str) -> None:
        """Best effort: drop a published outcome nobody will read again."""
        try:
            self._call("delete_key", key + "/done")
        except CoordinationError as exc:
            log.debug("flashckpt: could not delete %s: %s", key, exc)

    def outcome_now(self, key: str) -> str | None:
        """``key``'s published outcome, or ``None`` if no rank has published it yet (no wait)."""
        done = key + "/done"
        if not self._call("check", [done]):
            return None
        return bytes(self._call("get", done)).decode(errors="replace")

    def await_outcome(self, key: str, timeout_s: float | None = None) -> str:
        """Block until some rank publishes ``key``'s outcome; return it.  Raises
        :class:`WaitTimeout` after ``timeout_s`` (default: the control timeout).  A server-side
        wait of the store, not polling: thousands of waiting ranks cost the store nothing."""
        t = self.timeout_s if timeout_s is None else timeout_s
        done = key + "/done"
        assert self._store is not None, "store used in a one-rank job"
        t0 = time.monotonic()
        try:
            self._store.wait([done], timedelta(seconds=t))
        except RuntimeError as exc:  # the store's own timeout error differs by store type
            if time.monotonic() - t0 >= t * 0.99:
                raise WaitTimeout(f"no rank completed {key!r} within {t:.0f} s") from exc
            raise CoordinationError(f"store wait for {key!r} failed: {exc}") from exc
        return bytes(self._call("get", done)).decode(errors="replace")

    def _call(self, op: str, *args: Any) -> Any:
        assert self._store is not None, "store used in a one-rank job"
        try:
            return getattr(self._store, op)(*args)
        except (RuntimeError, pickle.PickleError) as exc:  # DistStoreError and friends
            raise CoordinationError(f"store {op} {args[0]!r} failed: {exc}") from exc
