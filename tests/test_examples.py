"""Every example runs, as a user runs it, and ends with a bitwise-equal resume (so none rots).

The examples run side by side (one process each, started together by a module fixture): on
this machine's two cores that halves the wall time of running them one after the other."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from importlib.util import find_spec
from pathlib import Path

import pytest

pytestmark = [pytest.mark.subprocess]

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / "examples"
#: example -> the module it needs (skipped without it)
NEEDS = {
    "demo.py": None,
    "ddp_torchrun.py": None,
    "lightning_example.py": "lightning",
    "transformers_example.py": "transformers",
    "s3_example.py": "moto",
    "salvage_walkthrough.py": None,
}


@pytest.fixture(scope="module")
def runs() -> Iterator[dict[str, subprocess.CompletedProcess[str]]]:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    procs = {
        name: subprocess.Popen(
            [sys.executable, str(EXAMPLES / name)],
            cwd=ROOT,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for name, module in NEEDS.items()
        if module is None or find_spec(module) is not None
    }
    done: dict[str, subprocess.CompletedProcess[str]] = {}
    try:
        for name, p in procs.items():
            out, err = p.communicate(timeout=300)
            done[name] = subprocess.CompletedProcess(p.args, p.returncode, out, err)
        yield done
    finally:
        for p in procs.values():
            if p.poll() is None:
                p.kill()
                p.communicate()


def _check(runs: dict[str, subprocess.CompletedProcess[str]], name: str, *expect: str) -> str:
    if name not in runs:
        pytest.skip(f"{name} needs {NEEDS[name]}")
    proc = runs[name]
    out = proc.stdout
    assert proc.returncode == 0, out[-3000:] + proc.stderr[-3000:]
    for line in expect:
        assert line in out, out
    return out


def test_demo_plain_loop(runs: dict[str, subprocess.CompletedProcess[str]]) -> None:
    out = _check(runs, "demo.py", "SIGKILL", "save blocked", "bit for bit: True")
    assert "left behind after the clean finish: nothing" in out


@pytest.mark.parametrize(
    ("name", "expect"),
    [
        ("ddp_torchrun.py", ["rank 1 SIGKILLed at step 13", "restored step 13 from memory"]),
        ("lightning_example.py", ["restored step 17 from the memory tier"]),
        ("transformers_example.py", ["restored step 17 from the memory tier"]),
        ("s3_example.py", ["restored step 11 from the storage tier", "step 11: ok"]),
        (
            "salvage_walkthrough.py",
            ["step 17 (1 rank(s)): wrote rank(s) 0", "restored step 17 from the storage tier"],
        ),
    ],
)
def test_example_resumes_bitwise(
    runs: dict[str, subprocess.CompletedProcess[str]], name: str, expect: list[str]
) -> None:
    out = _check(runs, name, *expect)
    assert json.loads(out.strip().splitlines()[-1]) == {"bitwise_equal": True}
