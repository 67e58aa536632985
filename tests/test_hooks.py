"""The event seam (``flashckpt._hooks``): named points, and the timed points benchmarks read
instead of wrapping private methods (``bench/bench_core.py``'s profiler)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

import flashckpt
from flashckpt import _hooks as hooks
from tests.conftest import make_state, train_step


@pytest.fixture(autouse=True)
def _no_hooks() -> Any:
    yield
    hooks.clear()


def test_a_timed_call_fires_once_it_returns_or_raises_with_its_info() -> None:
    seen: list[dict[str, Any]] = []
    asked: list[int] = []

    def info(x: int) -> dict[str, Any]:
        asked.append(x)
        return {"x": x}

    @hooks.timed("time.test", info)
    def f(x: int) -> int:
        if x < 0:
            raise ValueError("negative")
        return 2 * x

    assert f(3) == 6 and not asked  # nobody listens: info is not even asked for
    off = hooks.on("time.test", lambda **kw: seen.append(kw))
    assert f(4) == 8
    with pytest.raises(ValueError, match="negative"):
        f(-1)
    off()
    assert f(5) == 10
    assert [(s["x"], s["failed"]) for s in seen] == [(4, False), (-1, True)]
    assert all(s["point"] == "time.test" and s["seconds"] >= 0 and s["t0"] > 0 for s in seen)


def test_the_benchmark_profiler_sees_a_save_and_a_restore_through_the_seam(
    tmp_path: Path, shm_dir: Path
) -> None:
    """Every label the benchmark's table shows comes from a timed point: a save is acquire,
    stage and one write per tier; a restore is inventory, verify (memory) and apply."""
    from bench.bench_core import Profiler

    prof = Profiler()
    prof.install()
    try:
        state = make_state()
        with flashckpt.Checkpointer(tmp_path / "s", local_dir=tmp_path / "l", memory_dir=shm_dir) as ckpt:
            train_step(state, 0)
            ckpt.save(0, state)
            ckpt.wait()
            assert ckpt.restore(make_state()) == 0
    finally:
        prof.uninstall()
    labels = {e[0] for e in prof.events}
    for want in (
        "stager.acquire",
        "stager.stage",
        "persist.tier.local",
        "persist.tier.storage",
        "restore.inventory",
        "restore.verify",
        "restore.apply",
        "backend.put",
    ):
        assert want in labels, (want, sorted(labels))
    window = prof.window(0.0, float("inf"))
    assert window["stager.stage@main"] > 0
    assert not hooks._listeners, "uninstall left listeners behind"
