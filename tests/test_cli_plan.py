"""``flashckpt plan``: Young's and Daly's optimum (against Daly's published examples), the
multi-tier waste model, its constraints, and the command line."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import flashckpt
from flashckpt.cli import main
from flashckpt.cli.plan import Costs, daly, daly_wall_time, plan, waste, young

MIN, HOUR = 60.0, 3600.0


@pytest.mark.parametrize(("mtbf", "published"), [(24 * HOUR, 117), (6 * HOUR, 57), (15 * MIN, 9.1)])
def test_daly_reproduces_his_worked_examples(mtbf: float, published: float) -> None:
    # Daly (2006): restart R = 10 min, checkpoint delta = 5 min; optimum 117 / 57 / 9.1 min
    tau = daly(5 * MIN, mtbf) / MIN
    assert abs(tau - published) <= 0.5 if published > 10 else abs(tau - published) <= 0.05
    # and it is the minimum of his expected wall time (within the grid's resolution)
    grid = [x * MIN / 10 for x in range(10, 3000)]
    best = min(grid, key=lambda t: daly_wall_time(t, 5 * MIN, mtbf, 10 * MIN, 1e6))
    assert abs(best / MIN - tau) <= 0.02 * tau + 0.1


def test_young_and_the_limits() -> None:
    assert young(0.2, 3 * HOUR) == pytest.approx(65.7, abs=0.05)  # the review's example
    assert daly(10.0, 4.0) == 4.0  # delta >= 2M: the MTBF itself
    assert daly(0.2, 3 * HOUR) == pytest.approx(young(0.2, 3 * HOUR), rel=0.01)  # delta << M


def test_a_cheap_save_is_bound_by_the_step_time() -> None:
    c = Costs(step=1.0, blocking=1e-4, mtbf=0.5 * HOUR, shares={"crash": 1.0})
    p = plan(c)
    assert p.binds == "step time" and p.every == 1 and p.persist_every == 1


def test_a_slow_storage_tier_sets_persist_every() -> None:
    c = Costs(step=1.0, blocking=0.05, mtbf=4 * HOUR, persist=120.0)
    p = plan(c)
    assert p.binds == "persist bandwidth"
    assert p.persist_every * p.tau >= 120.0 and (p.persist_every - 1) * p.tau < 120.0 + p.tau


def test_memory_only_failures_give_youngs_interval() -> None:
    c = Costs(step=0.1, blocking=0.5, mtbf=2 * HOUR, shares={"crash": 1.0})
    p = plan(c)
    assert p.binds == "failure rate"
    assert p.tau == pytest.approx(young(0.5, 2 * HOUR), abs=0.1)


@settings(max_examples=200, deadline=None)
@given(
    step=st.floats(0.05, 5.0),
    blocking=st.floats(0.001, 30.0),
    mtbf_h=st.floats(0.2, 48.0),
    persist=st.floats(0.0, 600.0),
    crash=st.floats(0.0, 1.0),
    node=st.floats(0.0, 1.0),
    mirrors=st.booleans(),
)
def test_the_recommendation_is_near_the_best_feasible_setting(
    step: float, blocking: float, mtbf_h: float, persist: float, crash: float, node: float, mirrors: bool
) -> None:
    node = min(node, 1 - crash)
    shares = {"crash": crash, "node": node, "job": max(0.0, 1 - crash - node)}
    c = Costs(
        step=step, blocking=blocking, mtbf=mtbf_h * HOUR, persist=persist, shares=shares, mirrors=mirrors
    )
    p = plan(c)
    assert p.every >= 1 and p.persist_every >= 1
    assert persist == 0 or p.persist_every * p.tau >= persist - 1e-6  # the bandwidth constraint holds
    best = math.inf
    for every in {max(1, round(p.every * f)) for f in (0.25, 0.5, 0.8, 0.9, 1, 1.1, 1.25, 2, 4)} | {1}:
        tau = every * step
        need = max(1, math.ceil(persist / tau - 1e-9)) if persist else 1
        for pe in (need, need + 1, 2 * need):
            best = min(best, waste(c, tau, pe))
    assert p.waste <= best * 1.02 + 1e-9


def test_the_command_line_reads_flags_or_a_checkpointers_stats(
    dirs: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["plan", "--step", "1", "--blocking", "0.2", "--mtbf", "3", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["binds"] == "failure rate" and out["young_s"] == pytest.approx(65.7, abs=0.05)
    with flashckpt.Checkpointer(dirs["storage"], memory_dir=dirs["memory"]) as ckpt:
        ckpt.save(0, {"w": torch.zeros(1 << 16)}).wait(60)  # type: ignore[union-attr]
        stats = ckpt.stats
    (tmp_path / "stats.json").write_text(json.dumps(stats))
    code = main(
        ["plan", "--stats", str(tmp_path / "stats.json"), "--step", "0.5", "--mtbf", "6", "--every", "100"]
    )
    text = capsys.readouterr().out
    assert code == 0 and "recommended: every=" in text and "current every=100" in text


@pytest.mark.parametrize(
    "argv",
    [
        ["plan", "--step", "1", "--mtbf", "3"],  # no blocking time
        ["plan", "--step", "1", "--blocking", "0.2", "--mtbf", "3", "--failures", "crash=0.5"],  # not 1
        ["plan", "--step", "1", "--blocking", "0.2", "--mtbf", "3", "--failures", "meteor=1"],
        ["plan", "--step", "-1", "--blocking", "0.2", "--mtbf", "3"],
        ["plan", "--step", "1", "--blocking", "0.2", "--mtbf", "3", "--restore", "memory"],
        ["plan", "--stats", "/nonexistent/stats.json", "--step", "1", "--mtbf", "3"],
    ],
)
def test_bad_input_is_one_line_and_exit_2(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("flashckpt: ")
