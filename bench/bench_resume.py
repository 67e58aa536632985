"""How exact is a resume?  flashckpt's integrations against the frameworks' own, in one run.

    python -m bench.bench_resume [--markdown]

Each case trains the integration tests' tiny models (``tests/integrations/*_worker.py``:
dropout, a shuffled dataloader, 25 steps, 10 per epoch) once uninterrupted and once SIGKILLed
when step 8 begins and resumed the framework's way; the table gives the largest absolute
difference of any final weight (0: bitwise).  Lightning's own resume uses
``ModelCheckpoint(every_n_train_steps=3, save_last=True)`` and ``fit(ckpt_path="last")``;
flashckpt's ``FlashCheckpoint(every=3)``.  Under DDP (2 processes, gloo) both with a stateful
``StatefulDistributedSampler`` and with the ``DistributedSampler`` Lightning injects.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from tests.integrations.launch import ROOT, command, env, max_difference

CASES = [
    # (label, worker, world, extra args of both runs)
    ("Lightning, 1 process: flashckpt", "lightning", 1, []),
    ("Lightning, 1 process: Lightning's own", "lightning", 1, ["--no-flash", "--model-checkpoint", "3"]),
    ("Lightning, 2 DDP ranks, stateful sampler: flashckpt", "lightning", 2, []),
    (
        "Lightning, 2 DDP ranks, stateful sampler: Lightning's own",
        "lightning",
        2,
        ["--no-flash", "--model-checkpoint", "3"],
    ),
    ("Lightning, 2 DDP ranks, injected sampler: flashckpt", "lightning", 2, ["--injected-sampler"]),
    (
        "Lightning, 2 DDP ranks, injected sampler: Lightning's own",
        "lightning",
        2,
        ["--injected-sampler", "--no-flash", "--model-checkpoint", "3"],
    ),
    ("Transformers, 1 process: flashckpt", "hf", 1, []),
    ("Transformers, 2 DDP ranks: flashckpt", "hf", 2, []),
]


def _run(worker: str, world: int, out: Path, shm: Path, args: list[str], expect: int | None = 0) -> None:
    mod = f"tests.integrations.{'lightning' if worker == 'lightning' else 'hf'}_worker"
    cmd = command(mod, ["--out", str(out), "--storage", str(out / "st"), "--memory", str(shm), *args], world)
    out.mkdir(parents=True, exist_ok=True)
    p = subprocess.run(cmd, cwd=ROOT, env=env(out), capture_output=True, text=True, timeout=600)
    if expect is not None and p.returncode != expect:
        tail = f"{p.stdout[-4000:]}\n{p.stderr[-8000:]}"
        raise RuntimeError(f"{' '.join(cmd)} ended with {p.returncode}:\n{tail}")


def max_diff(a: Path, b: Path, world: int) -> float:
    return max(max_difference(a, b, r) for r in range(world))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--markdown", action="store_true")
    p.add_argument("--only", help="run the cases whose label contains this")
    a = p.parse_args(argv)
    rows = []
    for label, worker, world, extra in CASES:
        if a.only and a.only not in label:
            continue
        tmp = Path(tempfile.mkdtemp(prefix="flashckpt-bench-resume-"))
        shm = Path(tempfile.mkdtemp(prefix="flashckpt-bench-resume-", dir="/dev/shm"))
        try:
            ref, run = tmp / "ref", tmp / "run"
            _run(worker, world, ref, shm / "ref", extra)
            _run(worker, world, run, shm / "run", [*extra, "--die-at", "8"], expect=None)
            _run(worker, world, run, shm / "run", extra)
            d = max_diff(ref, run, world)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
            shutil.rmtree(shm, ignore_errors=True)
        rows.append((label, d))
        print(f"# {label}: {d:.3g}", file=sys.stderr, flush=True)
    if a.markdown:
        print("| resume after a SIGKILL at step 8 | max abs weight difference at step 25 |\n| --- | --- |")
        for label, d in rows:
            print(f"| {label} | {'0 (bitwise)' if d == 0 else f'{d:.3g}'} |")
    else:
        for label, d in rows:
            print(f"{label:62s} {'0 (bitwise)' if d == 0 else f'{d:.3g}'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
