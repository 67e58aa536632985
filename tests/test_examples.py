"""Every example runs, as a user runs it, and ends with a bitwise-equal resume (so none rots)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = [pytest.mark.subprocess]

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / "examples"


def _run(name: str, *expect: str) -> str:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run(
        [sys.executable, str(EXAMPLES / name)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300
    )
    out = proc.stdout
    assert proc.returncode == 0, out[-3000:] + proc.stderr[-3000:]
    assert json.loads(out.strip().splitlines()[-1]) == {"bitwise_equal": True}
    for line in expect:
        assert line in out, out
    return out


def test_demo_plain_loop() -> None:
    out = subprocess.run(
        [sys.executable, str(EXAMPLES / "demo.py")],
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert "SIGKILL" in out.stdout and "bit for bit: True" in out.stdout
    assert "save blocked" in out.stdout and "left behind after the clean finish: nothing" in out.stdout


def test_ddp_under_torchrun_loses_a_rank_and_resumes_from_memory() -> None:
    _run("ddp_torchrun.py", "rank 1 SIGKILLed at step 13", "restored step 13 from memory")


def test_lightning() -> None:
    pytest.importorskip("lightning")
    _run("lightning_example.py", "restored step 17 from the memory tier")


def test_transformers() -> None:
    pytest.importorskip("transformers")
    _run("transformers_example.py", "restored step 17 from the memory tier")


def test_s3_on_a_loopback_server() -> None:
    pytest.importorskip("moto.server")
    _run("s3_example.py", "restored step 11 from the storage tier", "step 11: ok")


def test_salvage_walkthrough() -> None:
    _run(
        "salvage_walkthrough.py",
        "step 17 (1 rank(s)): wrote rank(s) 0",
        "restored step 17 from the storage tier",
    )
