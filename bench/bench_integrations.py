"""Step time with a checkpoint every step: flashckpt's integrations against the frameworks' own.

    python -m bench.bench_integrations [--steps 40] [--repeats 3] [--markdown] [--plot PATH] [--json PATH]

A small GPT-style model (Transformers' GPT-2 built from a config: 4 layers, width 256, a
8192-token vocabulary, sequences of 128, batches of 8, AdamW; about 6M parameters, a
state of about 70 MB) trained on this machine's CPU, each configuration in a fresh process:

* Lightning: no checkpoints; ``ModelCheckpoint(every_n_train_steps=1)``; the same with
  Lightning's ``AsyncCheckpointIO``; ``FlashCheckpoint(every=1)`` (persisted every step, and
  with ``persist_every=10``: every step in memory, every tenth also on disk).
* Transformers' Trainer: no checkpoints; ``save_steps=1``; ``FlashCheckpointCallback(every=1)``
  (and ``persist_every=10``).

The step time of a run is the median of the time between two consecutive batch ends over the
steps after the warm-up (the first ``--warmup`` steps: slot faulting, the allocator); each
configuration runs ``--repeats`` times, round robin, and its step time is the median of its
runs' (the table gives their range too).  The overhead is that minus the step time without
checkpoints of the same framework, measured in the same run.  Every checkpoint goes to a
fresh directory on the same disk.  Targets (issue 12): flashckpt's step time within 1.1x of no
checkpoints, its overhead at least 10x smaller than each framework's own per-step
checkpointing.  (The frameworks' saves are ``torch.save`` into the page cache, not synced;
flashckpt's persisted snapshots are fsync'd and committed.)
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent

CONFIGS = [
    ("lightning", "none"),
    ("lightning", "model_checkpoint"),
    ("lightning", "async_checkpoint_io"),
    ("lightning", "flash"),
    ("lightning", "flash_persist10"),
    ("hf", "none"),
    ("hf", "save_steps"),
    ("hf", "flash"),
    ("hf", "flash_persist10"),
]
LABELS = {
    "none": "no checkpoints",
    "model_checkpoint": "ModelCheckpoint(every_n_train_steps=1)",
    "async_checkpoint_io": "ModelCheckpoint + AsyncCheckpointIO",
    "save_steps": "save_steps=1",
    "flash": "flashckpt every=1 (persisted every step)",
    "flash_persist10": "flashckpt every=1, persist_every=10",
}


def _model() -> Any:
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    cfg = GPT2Config(vocab_size=8192, n_positions=128, n_embd=256, n_layer=4, n_head=4)
    return GPT2LMHeadModel(cfg)


def _data(n: int) -> Any:
    import torch

    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 8192, (n, 128), generator=g)
    return torch.utils.data.TensorDataset(ids)


def _lightning(kind: str, steps: int, where: Path) -> list[float]:
    import lightning.pytorch as pl
    import torch

    times: list[float] = []

    class Net(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.gpt = _model()

        def training_step(self, batch: Any, batch_idx: int) -> Any:
            (ids,) = batch
            return self.gpt(input_ids=ids, labels=ids).loss

        def configure_optimizers(self) -> Any:
            return torch.optim.AdamW(self.parameters(), lr=1e-4)

    class Clock(pl.Callback):
        def on_train_batch_end(self, *args: Any) -> None:
            times.append(time.perf_counter())

    callbacks: list[Any] = [Clock()]
    plugins: list[Any] = []
    if kind in ("model_checkpoint", "async_checkpoint_io"):
        callbacks.append(
            pl.callbacks.ModelCheckpoint(dirpath=where / "mc", every_n_train_steps=1, save_top_k=1)
        )
    if kind == "async_checkpoint_io":
        from lightning.pytorch.plugins.io import AsyncCheckpointIO

        plugins.append(AsyncCheckpointIO())
    if kind.startswith("flash"):
        from flashckpt.integrations.lightning import FlashCheckpoint

        extra = {"persist_every": 10} if kind == "flash_persist10" else {}
        callbacks.append(FlashCheckpoint(where / "flash", every=1, memory_dir=_shm(where), **extra))
    trainer = pl.Trainer(
        max_steps=steps, accelerator="cpu", devices=1, callbacks=callbacks, plugins=plugins,
        logger=False, enable_progress_bar=False, enable_model_summary=False,
        enable_checkpointing=kind != "none", default_root_dir=str(where),
    )  # fmt: skip
    loader = torch.utils.data.DataLoader(_data(8 * steps), batch_size=8)
    trainer.fit(Net(), loader)
    return [b - a for a, b in itertools.pairwise(times)]


def _hf(kind: str, steps: int, where: Path) -> list[float]:
    from transformers import Trainer, TrainerCallback, TrainingArguments

    times: list[float] = []

    class Clock(TrainerCallback):
        def on_step_end(self, *args: Any, **kwargs: Any) -> None:
            times.append(time.perf_counter())

    class Tokens:
        def __init__(self) -> None:
            self.ds = _data(8 * steps)

        def __len__(self) -> int:
            return len(self.ds)

        def __getitem__(self, i: int) -> dict[str, Any]:
            (ids,) = self.ds[i]
            return {"input_ids": ids, "labels": ids}

    callbacks: list[Any] = [Clock()]
    if kind.startswith("flash"):
        from flashckpt.integrations.transformers import FlashCheckpointCallback

        extra = {"persist_every": 10} if kind == "flash_persist10" else {}
        callbacks.append(FlashCheckpointCallback(where / "flash", every=1, memory_dir=_shm(where), **extra))
    args = TrainingArguments(
        output_dir=str(where / "out"), max_steps=steps, per_device_train_batch_size=8, learning_rate=1e-4,
        save_strategy="steps" if kind == "save_steps" else "no", save_steps=1, save_total_limit=1,
        logging_steps=10_000, report_to=[], use_cpu=True, disable_tqdm=True, seed=0,
    )  # fmt: skip
    trainer = Trainer(model=_model(), args=args, train_dataset=Tokens(), callbacks=callbacks)
    trainer.train()
    return [b - a for a, b in itertools.pairwise(times)]


def _shm(where: Path) -> Path:
    """The memory tier of a run: on ``/dev/shm`` (a slot on a disk-backed file system would be
    written back to the disk the checkpoints go to), removed with ``where``."""
    d = Path(tempfile.mkdtemp(prefix="flashckpt-bench-int-", dir="/dev/shm"))
    (where / "shm").symlink_to(d)
    return d


def _one(framework: str, kind: str, steps: int) -> dict[str, Any]:
    """One configuration, in this process (the child's side)."""
    where = Path(tempfile.mkdtemp(prefix="flashckpt-bench-int-", dir=os.environ.get("BENCH_DIR")))
    try:
        fn = _lightning if framework == "lightning" else _hf
        return {"framework": framework, "kind": kind, "steps": fn(kind, steps, where)}
    finally:
        if (where / "shm").is_symlink():
            shutil.rmtree((where / "shm").resolve(), ignore_errors=True)
        shutil.rmtree(where, ignore_errors=True)


def run(framework: str, kind: str, steps: int) -> dict[str, Any]:
    """One configuration in a fresh process."""
    cmd = [
        sys.executable,
        "-m",
        "bench.bench_integrations",
        "--child",
        framework,
        kind,
        "--steps",
        str(steps),
    ]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "PYTHONWARNINGS": "ignore"}
    p = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=1800)
    if p.returncode != 0:
        raise RuntimeError(f"{framework}/{kind} failed:\n{p.stdout[-3000:]}\n{p.stderr[-3000:]}")
    line = [ln for ln in p.stdout.splitlines() if ln.startswith("RESULT ")][-1]
    return dict(json.loads(line[len("RESULT ") :]))


def summarize(results: list[dict[str, Any]], warmup: int) -> list[dict[str, Any]]:
    """One row per configuration: the median over its runs of each run's median step time
    (and the range over runs); ratios against the same framework's runs without checkpoints."""
    per: dict[tuple[str, str], list[float]] = {}
    for r in results:
        per.setdefault((r["framework"], r["kind"]), []).append(statistics.median(r["steps"][warmup:]))
    rows: list[dict[str, Any]] = []
    base: dict[str, float] = {}
    for (fw, kind), meds in per.items():
        rows.append({"framework": fw, "kind": kind, "step_s": statistics.median(meds), "runs": meds})
        if kind == "none":
            base[fw] = rows[-1]["step_s"]
    own: dict[str, list[dict[str, Any]]] = {}
    for row in rows:
        b = base[row["framework"]]
        row["ratio"] = row["step_s"] / b
        row["overhead_s"] = row["step_s"] - b
        if row["kind"] in ("model_checkpoint", "async_checkpoint_io", "save_steps"):
            own.setdefault(row["framework"], []).append(row)
    for row in rows:
        if row["kind"].startswith("flash"):
            mine = max(row["overhead_s"], 1e-4)
            row["vs_framework"] = {o["kind"]: o["overhead_s"] / mine for o in own.get(row["framework"], [])}
    return rows


SHORT = {
    "model_checkpoint": "ModelCheckpoint",
    "async_checkpoint_io": "AsyncCheckpointIO",
    "save_steps": "save_steps",
}


def table(rows: list[dict[str, Any]], markdown: bool) -> str:
    head = ["framework", "checkpointing", "step (median of runs)", "runs", "x no ckpt", "overhead/step"]
    head.append("framework's overhead / flashckpt's")
    lines = []
    for r in rows:
        vs = ", ".join(f"{SHORT[k]}: {v:.1f}x" for k, v in r.get("vs_framework", {}).items())
        runs = "-".join(f"{x * 1e3:.0f}" for x in (min(r["runs"]), max(r["runs"]))) + " ms"
        lines.append(
            [r["framework"], LABELS[r["kind"]], f"{r['step_s'] * 1e3:.1f} ms", runs, f"{r['ratio']:.3f}x",
             f"{r['overhead_s'] * 1e3:+.1f} ms", vs]
        )  # fmt: skip
    if markdown:
        out = ["| " + " | ".join(head) + " |", "| " + " | ".join("---" for _ in head) + " |"]
        out += ["| " + " | ".join(ln) + " |" for ln in lines]
        return "\n".join(out)
    widths = [max(len(h), *(len(ln[i]) for ln in lines)) for i, h in enumerate(head)]
    fmt = "  ".join(f"{{:<{w}}}" for w in widths)
    return "\n".join([fmt.format(*head), *(fmt.format(*ln) for ln in lines)])


def plot(rows: list[dict[str, Any]], path: str) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print(f"matplotlib is not installed; skipping --plot {path}", file=sys.stderr)
        return
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    for ax, fw in zip(axes, ("lightning", "hf"), strict=True):
        rs = [r for r in rows if r["framework"] == fw]
        ax.barh([LABELS[r["kind"]] for r in rs], [r["step_s"] * 1e3 for r in rs],
                color=["#4c72b0" if r["kind"].startswith("flash") else "#999999" for r in rs])  # fmt: skip
        ax.set_title({"lightning": "PyTorch Lightning", "hf": "Transformers Trainer"}[fw])
        ax.set_xlabel("step time, ms (median)")
        ax.invert_yaxis()
    fig.suptitle("A checkpoint every step: step time (GPT-2 4x256, ~70 MB state, 2-core CPU)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--warmup", type=int, default=8)
    p.add_argument("--repeats", type=int, default=3, help="runs of each configuration, round robin")
    p.add_argument("--only", help="comma-separated framework/kind pairs, e.g. hf/none,hf/flash")
    p.add_argument("--markdown", action="store_true")
    p.add_argument("--plot")
    p.add_argument("--json")
    p.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    os.environ.setdefault("OMP_NUM_THREADS", str(os.cpu_count() or 1))
    if a.child:
        print("RESULT " + json.dumps(_one(a.child[0], a.child[1], a.steps)), flush=True)
        return 0
    configs = CONFIGS
    if a.only:
        want = {tuple(x.split("/")) for x in a.only.split(",")}
        frameworks = {w[0] for w in want}
        configs = [c for c in CONFIGS if c in want or (c[1] == "none" and c[0] in frameworks)]
    results = []
    for rep in range(a.repeats):  # round robin: a slow spell of the machine hits every configuration
        for fw, kind in configs:
            t0 = time.perf_counter()
            results.append(run(fw, kind, a.steps))
            print(
                f"# run {rep + 1}: {fw}/{kind}: {time.perf_counter() - t0:.0f} s", file=sys.stderr, flush=True
            )
    rows = summarize(results, a.warmup)
    print(table(rows, a.markdown))
    if a.json:
        Path(a.json).write_text(json.dumps({"rows": rows, "raw": results}, indent=1))
    if a.plot:
        plot(rows, a.plot)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
