"""Control plane of a multi-rank job: the job's process group and its store.

Two channels, chosen by thread:

* **Collectives** (``all_gather``) run only on the training thread, inside calls every rank
  makes in the same order: ``Checkpointer(...)``, ``restore``, ``close``.  They use a gloo
  group: the job's group when it is gloo, else a gloo group created once over the same ranks
  (an NCCL group cannot carry Python objects between hosts' CPUs).  Objects travel as JSON
  in uint8 tensors, never pickled: nothing a peer sends is unpickled (``all_gather_object``
  would run the unpickler on whatever arrives over the unauthenticated job network).
* **The store** (the job's c10d store, under a per-Checkpointer prefix) is what the
  ``flashckpt-persist`` thread uses to agree on commits: a background thread never issues a
  collective, which would interleave with the training thread's own collectives.

A one-process job (no ``torch.distributed``, or world size 1) gets the same interface with
no communication at all.
"""

from __future__ import annotations

import contextlib
import json
import logging
import pickle
import re
import secrets
import time
from collections.abc import Callable
from datetime import timedelta
from typing import Any

from flashckpt.errors import CoordinationError, WaitTimeout

log = logging.getLogger(__name__)

#: The most one rank may contribute to one ``all_gather`` (its object as JSON), and the most
#: one gather may bring in (every rank's contribution is padded to the largest): the objects
#: gathered are node names, addresses, inventories and outcomes, kilobytes each.
MAX_GATHER_BYTES = 16 << 20
MAX_GATHER_TOTAL = 1 << 30
_HEX = re.compile(r"[0-9a-f]+")


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
        # It is public (it names store keys), so it is drawn apart from the secret.
        drawn = {"secret": secrets.token_hex(32), "nonce": secrets.token_hex(8)} if self.rank == 0 else None
        token = self.all_gather(drawn)[0]
        if not (
            isinstance(token, dict)
            and isinstance(token.get("secret"), str)
            and isinstance(token.get("nonce"), str)
            and len(token["secret"]) == 64
            and len(token["nonce"]) == 16
            and _HEX.fullmatch(token["secret"] + token["nonce"])
        ):
            raise CoordinationError("rank 0 sent no valid job secret")
        self.secret = bytes.fromhex(token["secret"])
        self._prefix = f"flashckpt/{token['nonce']}/"
        self._store = PrefixStore(self._prefix, _get_process_group_store(pg))

    @classmethod
    def on_store(cls, store: Any, rank: int, world: int, timeout_s: float) -> Control:
        """A Control for ``rank`` of ``world`` over a c10d ``store`` (e.g. a ``HashStore``)
        and no process group: the store channel only, no collectives.  For tests and tools
        that drive the persist thread's protocols (commit, dedup) of several ranks in one
        process."""
        self = cls.__new__(cls)
        self.timeout_s = timeout_s
        self.rank, self.world = rank, world
        self._pg, self._own_pg, self._store, self._prefix = None, False, store, ""
        self.secret = b""
        return self

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
        """Training thread, every rank: ``obj`` of every rank, in rank order.

        ``obj`` must be JSON-able (dicts with string keys, lists, tuples, strings, numbers,
        booleans, ``None``) and at most :data:`MAX_GATHER_BYTES` as JSON; what comes back is
        decoded JSON (tuples come back as lists), in a one-rank job too.  Raises
        :class:`CoordinationError` on every rank alike when a rank cannot encode its object,
        sends too much or sends something that is not JSON, and when a peer is dead."""
        try:
            data: bytes | None = json.dumps(obj, separators=(",", ":"), allow_nan=False).encode()
            error = None
        except (TypeError, ValueError, RecursionError) as exc:
            data, error = None, exc
        if data is None:
            if self.distributed:  # take part all the same: the other ranks raise too, not hang
                with contextlib.suppress(CoordinationError):
                    self._gather_bytes(None)
            raise CoordinationError(f"cannot gather {type(obj).__name__}: {error}") from error
        if not self.distributed:
            return [_decode(data, 0)]
        return [_decode(b, r) for r, b in enumerate(self._gather_bytes(data))]

    def _gather_bytes(self, data: bytes | None) -> list[bytes]:
        """Training thread, every rank: every rank's ``data`` (``None``: this rank has
        nothing to send, and every rank raises), with tensor collectives on the gloo group:
        the lengths, then the bytes padded to the longest."""
        import torch
        import torch.distributed as dist

        n = -1 if data is None else len(data)
        lengths = [torch.zeros(1, dtype=torch.int64) for _ in range(self.world)]
        self._collective(
            lambda: dist.all_gather(lengths, torch.tensor([n], dtype=torch.int64), group=self._pg)
        )
        sizes = [int(t.item()) for t in lengths]
        # Every rank sees the same sizes, so every rank takes the same branch here.
        if min(sizes) < 0:
            raise CoordinationError(f"all_gather: rank {sizes.index(min(sizes))} had nothing to send")
        longest = max(sizes)
        if longest > MAX_GATHER_BYTES or longest * self.world > MAX_GATHER_TOTAL:
            r = sizes.index(longest)
            raise CoordinationError(f"all_gather: rank {r} sent {longest} bytes, over the limit")
        buf = torch.zeros(max(longest, 1), dtype=torch.uint8)
        if data:
            buf[: len(data)] = torch.frombuffer(bytearray(data), dtype=torch.uint8)
        out = [torch.empty_like(buf) for _ in range(self.world)]
        self._collective(lambda: dist.all_gather(out, buf, group=self._pg))
        return [t[:k].numpy().tobytes() for t, k in zip(out, sizes, strict=True)]

    def _collective(self, fn: Callable[[], object]) -> None:
        try:
            fn()
        except RuntimeError as exc:  # a dead peer: gloo raises after the group's timeout
            raise CoordinationError(f"all_gather among {self.world} ranks failed: {exc}") from exc

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

    def propose(self, key: str, value: str) -> str:
        """Publish ``value`` as ``key``'s outcome unless some rank published one first; return
        the outcome that holds (one atomic compare-and-set on the store)."""
        done = key + "/done"
        return bytes(self._call("compare_set", done, b"", value.encode())).decode(errors="replace")

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


def _reject_constant(name: str) -> None:
    raise ValueError(f"non-finite constant {name}")


def _decode(data: bytes, rank: int) -> Any:
    """A peer's gathered object: JSON only (nothing else is ever decoded from a peer)."""
    try:
        return json.loads(data, parse_constant=_reject_constant)
    except (ValueError, RecursionError) as exc:
        raise CoordinationError(f"all_gather: rank {rank} sent something that is not JSON") from exc
