"""A backend wrapper that injects failures from a declared plan (for tests and drills).

Example::

    plan = FaultPlan([Fault(op="put", key_contains="/c", after=2, times=3,
                            error=TransientStorageError)])
    backend = FaultyBackend(LocalBackend(path), plan)

The 3rd, 4th and 5th ``put`` of a key containing ``/c`` raise; everything else is passed to
the wrapped backend.  ``delay_s`` slows matching calls down, ``truncate_to`` makes matching
reads return fewer bytes.  Thread-safe: the plan's counters are under a lock.
"""

from __future__ import annotations

import builtins
import errno
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal, get_args

from flashckpt.errors import StorageError, TransientStorageError
from flashckpt.storage.protocol import Backend, Buffer, Capabilities

Op = Literal["put", "get", "head", "list", "delete"]


@dataclass(frozen=True, kw_only=True)
class Fault:
    """One rule of a :class:`FaultPlan`.  ``get`` covers ``get`` and ``get_into``; ``list``
    covers ``list`` and ``children``."""

    op: Op
    key_contains: str = ""
    after: int = 0
    times: int | None = 1
    error: type[StorageError] | None = TransientStorageError
    errno: int = errno.EIO
    delay_s: float = 0.0
    truncate_to: int | None = None

    def __post_init__(self) -> None:
        if self.op not in get_args(Op):
            raise ValueError(f"Fault.op must be one of {get_args(Op)}, got {self.op!r}")


@dataclass
class FaultPlan:
    """An ordered list of faults; the first rule that matches a call decides its fate."""

    faults: list[Fault]
    seen: dict[int, int] = field(default_factory=dict)
    fired: int = 0
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def match(self, op: str, key: str) -> Fault | None:
        with self._lock:
            for i, f in enumerate(self.faults):
                if f.op != op or f.key_contains not in key:
                    continue
                n = self.seen.get(i, 0)
                self.seen[i] = n + 1
                if n < f.after or (f.times is not None and n >= f.after + f.times):
                    continue
                self.fired += 1
                return f
        return None


class FaultyBackend:
    """Wraps ``inner`` and applies ``plan`` to every call.  See the module docstring."""

    def __init__(self, inner: Backend, plan: FaultPlan) -> None:
        self.inner = inner
        self.plan = plan

    @property
    def url(self) -> str:
        return self.inner.url

    @property
    def capabilities(self) -> Capabilities:
        return self.inner.capabilities

    def __getattr__(self, name: str) -> object:
        return getattr(self.inner, name)

    def _apply(self, op: str, key: str) -> Fault | None:
        f = self.plan.match(op, key)
        if f is None:
            return None
        if f.delay_s:
            time.sleep(f.delay_s)
        if f.error is not None:
            raise f.error(f.errno, f"injected fault: {op} {key}")
        return f

    def put(self, key: str, data: Buffer | Sequence[Buffer], *, exclusive: bool = False) -> None:
        self._apply("put", key)
        self.inner.put(key, data, exclusive=exclusive)

    def get(self, key: str, *, offset: int = 0, length: int | None = None) -> bytes:
        f = self._apply("get", key)
        data = self.inner.get(key, offset=offset, length=length)
        return data[: f.truncate_to] if f is not None and f.truncate_to is not None else data

    def get_into(self, key: str, buf: memoryview, *, offset: int = 0) -> int:
        f = self._apply("get", key)
        if f is not None and f.truncate_to is not None:
            buf = buf[: f.truncate_to]
        return self.inner.get_into(key, buf, offset=offset)

    def head(self, key: str) -> int:
        self._apply("head", key)
        return self.inner.head(key)

    def modified(self, key: str) -> float:
        self._apply("head", key)
        return self.inner.modified(key)

    def list(self, prefix: str = "") -> builtins.list[str]:
        self._apply("list", prefix)
        return self.inner.list(prefix)

    def children(self, prefix: str) -> builtins.list[str]:
        self._apply("list", prefix)
        return self.inner.children(prefix)

    def delete(self, key: str) -> None:
        self._apply("delete", key)
        self.inner.delete(key)

    def delete_prefix(self, prefix: str) -> None:
        self._apply("delete", prefix)
        self.inner.delete_prefix(prefix)

    def close(self) -> None:
        self.inner.close()
