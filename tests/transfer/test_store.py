"""The retrying store (``flashckpt.transfer.store``) against ``FaultyBackend``, without a
Checkpointer: every call to a persistent tier is retried here, once, by the error's type."""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

import flashckpt
from flashckpt.backends import Fault, FaultPlan, FaultyBackend, LocalBackend
from flashckpt.errors import ObjectNotFound, StorageError, StorageFullError, TransientStorageError
from flashckpt.storage import Backend
from flashckpt.transfer.store import RetryingStore, retrying

OPTS = flashckpt.Options(retries=3, backoff_s=0.001, backoff_max_s=0.002)


def _get_into(store: Backend, n: int, *, offset: int) -> tuple[int, bytes]:
    buf = bytearray(n)
    return store.get_into("d/k", memoryview(buf), offset=offset), bytes(buf)


#: (fault op, the call on a store holding "d/k" = b"0123456789", what it returns)
CALLS: list[tuple[str, Callable[[Backend], Any], Any]] = [
    ("put", lambda s: s.put("d/new", b"xyz"), None),
    ("get", lambda s: s.get("d/k", offset=2, length=3), b"234"),
    ("get", lambda s: _get_into(s, 4, offset=5), (4, b"5678")),
    ("head", lambda s: s.head("d/k"), 10),
    ("list", lambda s: s.list("d/"), ["d/k"]),
    ("list", lambda s: s.children("d/"), ["k"]),
    ("delete", lambda s: s.delete("d/k"), None),
    ("delete", lambda s: s.delete_prefix("d/"), None),
]


IDS = ["put", "get", "get_into", "head", "list", "children", "delete", "delete_prefix"]


def _store(tmp_path: Path, *faults: Fault) -> tuple[LocalBackend, FaultPlan, FaultyBackend]:
    inner = LocalBackend(tmp_path / "s")
    inner.put("d/k", b"0123456789")
    plan = FaultPlan(list(faults))
    return inner, plan, FaultyBackend(inner, plan)


@pytest.mark.parametrize(("op", "call", "want"), CALLS, ids=IDS)
def test_every_call_is_retried_past_transient_errors(tmp_path: Path, op: str, call: Any, want: Any) -> None:
    _, plan, faulty = _store(tmp_path, Fault(op=op, times=OPTS.retries - 1))  # type: ignore[arg-type]
    assert call(RetryingStore(faulty, OPTS)) == want
    assert plan.fired == OPTS.retries - 1


@pytest.mark.parametrize(("op", "call", "want"), CALLS, ids=IDS)
def test_the_last_attempt_s_error_is_raised(tmp_path: Path, op: str, call: Any, want: Any) -> None:
    _, plan, faulty = _store(tmp_path, Fault(op=op, times=None))  # type: ignore[arg-type]
    with pytest.raises(TransientStorageError, match="injected"):
        call(RetryingStore(faulty, OPTS))
    assert plan.fired == OPTS.retries


@pytest.mark.parametrize("error", [StorageError, StorageFullError, ObjectNotFound])
def test_an_error_that_retrying_will_not_fix_is_raised_at_once(
    tmp_path: Path, error: type[StorageError]
) -> None:
    _, plan, faulty = _store(tmp_path, Fault(op="put", times=None, error=error))
    with pytest.raises(error):
        RetryingStore(faulty, OPTS).put("d/k", b"x")
    assert plan.fired == 1


def test_a_store_is_never_wrapped_twice(tmp_path: Path) -> None:
    """``retrying`` of a store with the same options is that store: a call is never retried
    by two layers (retries * retries attempts, and as many backoffs)."""
    _, plan, faulty = _store(tmp_path, Fault(op="head", times=None))
    once = retrying(faulty, OPTS)
    assert retrying(once, OPTS) is once
    with pytest.raises(TransientStorageError):
        retrying(retrying(once, OPTS), OPTS).head("d/k")
    assert plan.fired == OPTS.retries
    other = flashckpt.Options(retries=2, backoff_s=0.001, backoff_max_s=0.002)
    rewrapped = retrying(once, other)
    assert rewrapped.backend is faulty and rewrapped.opts is other  # unwrapped, then wrapped once


def test_a_retry_is_logged_with_the_call_the_key_and_the_url(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    _, _, faulty = _store(tmp_path, Fault(op="get", times=1))
    with caplog.at_level(logging.WARNING, logger="flashckpt"):
        assert RetryingStore(faulty, OPTS).get("d/k") == b"0123456789"
    (said,) = [r.getMessage() for r in caplog.records]
    assert said.startswith(f"get d/k on {faulty.url} failed") and "retry 1 of 2" in said


def test_the_store_passes_the_backend_through_and_does_not_close_it(tmp_path: Path) -> None:
    inner, _, faulty = _store(tmp_path)
    store = RetryingStore(faulty, OPTS)
    assert isinstance(store, Backend)
    assert store.url == inner.url and store.capabilities == inner.capabilities
    store.put("d/x", b"1", exclusive=True)
    with pytest.raises(FileExistsError):
        store.put("d/x", b"2", exclusive=True)  # exclusive is passed through (and not retried)
    store.close()
    assert inner.get("d/x") == b"1"  # still open: closing is the opener's
