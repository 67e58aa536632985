"""Options and FLASHCKPT_* environment values: nonsense is refused where it is given."""

from __future__ import annotations

import dataclasses
import math
import os
from typing import Any

import pytest

from flashckpt import Options
from flashckpt._config import MAX_SECONDS, default_memory_root, options_from_env
from flashckpt.errors import ConfigError

FLOATS = [
    "backoff_s",
    "backoff_max_s",
    "coord_timeout_s",
    "gc_grace_s",
    "mirror_bytes_per_s",
    "mirror_timeout_s",
    "preempt_grace_s",
]
INTS = ["chunk_bytes", "small_tensor_bytes", "io_threads", "hash_threads", "retries"]
BOOLS = ["fsync", "direct_io", "prefault", "dedup_replicated", "require_mirrors", "stage_once_per_node"]

BAD: list[tuple[str, Any]] = [
    # every float option: finite, a real number
    *[(name, v) for name in FLOATS for v in (math.nan, math.inf, -math.inf, -1.0, 10**400, "1", None, True)],
    # zero breaks these: no backoff, collectives that time out at once, non-blocking sockets
    ("backoff_s", 0.0),
    ("backoff_max_s", 0),
    ("coord_timeout_s", 0.0),
    ("mirror_timeout_s", 0),
    ("preempt_grace_s", 0),
    # durations beyond what a wait can take
    *[
        (name, MAX_SECONDS * 2)
        for name in ("coord_timeout_s", "mirror_timeout_s", "gc_grace_s", "backoff_max_s", "preempt_grace_s")
    ],
    # ints are ints: not bools, not floats (not even integral ones), not strings
    *[(name, v) for name in INTS for v in (True, 4096.0, "4096", None, -4096)],
    ("io_threads", 0),
    ("hash_threads", 0),
    ("retries", 0),
    ("chunk_bytes", 0),
    ("chunk_bytes", 60 << 10),  # below 64 KiB
    ("chunk_bytes", (64 << 10) + 512),  # not a multiple of 4096
    ("chunk_bytes", 8 << 30),  # above S3's one-request limit
    # switches are switches
    *[(name, v) for name in BOOLS for v in (0, 1, "no", None)],
]


@pytest.mark.parametrize(("name", "value"), BAD, ids=[f"{n}={v!r}"[:40] for n, v in BAD])
def test_nonsense_options_are_refused_naming_the_option(name: str, value: Any) -> None:
    with pytest.raises(ConfigError) as ei:
        Options(**{name: value})
    assert f"Options.{name}" in str(ei.value)


GOOD: list[tuple[str, Any, Any]] = [
    ("gc_grace_s", 0, 0.0),  # zero is fine where it means "no wait"
    ("gc_grace_s", 0.0, 0.0),
    ("mirror_bytes_per_s", 0, 0.0),  # zero: no cap
    ("coord_timeout_s", 3, 3.0),  # ints are accepted for floats and stored as floats
    ("mirror_timeout_s", 0.5, 0.5),
    ("small_tensor_bytes", 0, 0),
    ("chunk_bytes", 64 << 10, 64 << 10),  # the smallest chunk: cheap multi-chunk tensors
    ("chunk_bytes", 4 << 30, 4 << 30),
    ("fsync", False, False),
]


@pytest.mark.parametrize(("name", "value", "stored"), GOOD)
def test_sensible_options_are_kept(name: str, value: Any, stored: Any) -> None:
    got = getattr(Options(**{name: value}), name)
    assert got == stored and type(got) is type(stored)


def test_defaults_are_unchanged() -> None:
    o = Options()
    assert (o.chunk_bytes, o.small_tensor_bytes, o.io_threads, o.hash_threads, o.retries) == (
        64 << 20,
        1 << 20,
        2,
        2,
        5,
    )
    assert (o.backoff_s, o.backoff_max_s, o.coord_timeout_s, o.gc_grace_s) == (0.2, 10.0, 300.0, 600.0)
    assert (o.mirror_bytes_per_s, o.mirror_timeout_s, o.preempt_grace_s) == (0.0, 60.0, 10.0)
    assert (o.fsync, o.direct_io, o.prefault, o.dedup_replicated) == (True, True, True, False)
    assert o.stage_once_per_node is True
    kinds = {f.name: f.type for f in dataclasses.fields(Options)}
    assert sorted(kinds) == sorted(FLOATS + INTS + BOOLS)  # a new option gets a row above


def test_backoff_cap_is_not_below_the_first_delay() -> None:
    with pytest.raises(ConfigError, match="backoff_max_s"):
        Options(backoff_s=1.0, backoff_max_s=0.5)
    assert Options(backoff_s=0.5, backoff_max_s=0.5).backoff_max_s == 0.5


@pytest.mark.parametrize(
    ("var", "raw", "what"),
    [
        ("FLASHCKPT_CHUNK_BYTES", "nan", "not an integer"),
        ("FLASHCKPT_CHUNK_BYTES", "1e6", "not an integer"),
        ("FLASHCKPT_CHUNK_BYTES", "65536.0", "not an integer"),
        ("FLASHCKPT_CHUNK_BYTES", "1000", "Options.chunk_bytes"),
        ("FLASHCKPT_CHUNK_BYTES", "-65536", "Options.chunk_bytes"),
        ("FLASHCKPT_IO_THREADS", "0", "Options.io_threads"),
        ("FLASHCKPT_IO_THREADS", "inf", "not an integer"),
        ("FLASHCKPT_IO_THREADS", "two", "not an integer"),
    ],
)
def test_bad_environment_values_are_refused_naming_the_variable(
    monkeypatch: pytest.MonkeyPatch, var: str, raw: str, what: str
) -> None:
    monkeypatch.setenv(var, raw)
    with pytest.raises(ConfigError) as ei:
        options_from_env(None)
    assert var in str(ei.value) and what in str(ei.value)


def test_environment_values_apply_and_explicit_options_win(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FLASHCKPT_CHUNK_BYTES", " 65536 ")
    monkeypatch.setenv("FLASHCKPT_IO_THREADS", "3")
    got = options_from_env(None)
    assert (got.chunk_bytes, got.io_threads) == (64 << 10, 3)
    mine = Options(io_threads=1)
    assert options_from_env(mine) is mine
    monkeypatch.setenv("FLASHCKPT_IO_THREADS", "")  # empty: unset
    assert options_from_env(None).io_threads == Options().io_threads


def test_default_memory_root_is_per_effective_user(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("FLASHCKPT_MEMORY_DIR", raising=False)
    base = "/dev/shm" if os.path.isdir("/dev/shm") else None
    root = default_memory_root()
    assert os.path.basename(root) == f"flashckpt-{os.geteuid()}"
    if base is not None:
        assert os.path.dirname(root) == base
    monkeypatch.setenv("FLASHCKPT_MEMORY_DIR", "/somewhere/else")
    assert default_memory_root() == "/somewhere/else"
