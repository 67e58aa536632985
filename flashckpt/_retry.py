"""Retries with exponential backoff and full jitter, decided by the error's type."""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Callable
from typing import TypeVar

from flashckpt._config import Options
from flashckpt.errors import FlashCkptError

log = logging.getLogger(__name__)
T = TypeVar("T")


def retry(fn: Callable[[], T], what: str, opts: Options) -> T:
    """Call ``fn``; retry a :class:`FlashCkptError` whose type says ``retryable``.

    Attempt ``k`` sleeps a uniform random time in ``[0, min(backoff_max_s, backoff_s * 2**k)]``
    first (full jitter spreads the retries of thousands of ranks).  ``what`` is logged and must
    not contain credentials.  Any thread may call this.
    """
    for attempt in range(1, opts.retries + 1):
        try:
            return fn()
        except FlashCkptError as exc:
            if not exc.retryable or attempt == opts.retries:
                raise
            delay = random.uniform(0, min(opts.backoff_max_s, opts.backoff_s * 2 ** (attempt - 1)))
            log.warning(
                "%s failed (%s); retry %d of %d in %.2f s", what, exc, attempt, opts.retries - 1, delay
            )
            time.sleep(delay)
    raise AssertionError("unreachable")
