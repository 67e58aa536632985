"""The Lightning integration with the real library: tiny models, real processes, real signals.

A run SIGKILLed between two snapshots and resumed with Lightning's own ``fit(ckpt_path="last")``
ends with the same weights, bitwise, as a run never interrupted: one process and two DDP
processes on gloo (each rank its own dropout stream and data position), restored from the
memory tier.  A SIGTERM ends the fit at a committed final step with exit status 0.  The
checkpoint dict's Python types round-trip; what cannot be stored names its key path.
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import enum
import logging
import math
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any, NamedTuple

import pytest
import torch

import flashckpt
from flashckpt.errors import ConfigError, UnsupportedStateError
from flashckpt.integrations._codec import MARK, decode, encode
from tests.integrations.launch import ROOT, ended, max_difference, run_worker

pl = pytest.importorskip("lightning.pytorch")
pytest.importorskip("torchdata")


def _run(out: Path, *args: str, world: int = 1, pkg: str = "lightning", expect: int | None = 0) -> str:
    worker = "tests.integrations.lightning_worker"
    return run_worker(worker, out, list(args), world=world, expect=expect, LIGHTNING_PKG=pkg)


@pytest.mark.subprocess
def test_beside_a_model_checkpoint_saving_at_the_same_steps_the_flash_snapshot_is_resumed(
    tmp_path: Path, shm_dir: Path
) -> None:
    ref, run = tmp_path / "ref", tmp_path / "run"
    _run(ref, "--storage", str(ref / "st"), "--memory", str(shm_dir / "ref"))
    common = ["--storage", str(run / "st"), "--memory", str(shm_dir / "run"), "--model-checkpoint", "3"]
    _run(run, *common, "--die-at", "8", expect=-9)
    # Lightning's "last" is the newest file: the ModelCheckpoint's last.ckpt of step 6, written
    # after the pointer; the IO resumes the flash snapshot of that step instead (RNG included)
    assert (run / "mc" / "last.ckpt").stat().st_mtime_ns >= (
        run / "st" / "flashckpt-last.ckpt"
    ).stat().st_mtime_ns
    assert sorted(p.name for p in (run / "mc").iterdir()) == ["epoch=0-step=6.ckpt", "last.ckpt"]
    _run(run, *common)
    end = ended(run)
    assert end["restored"]["step"] == 6 and end["restored"]["tier"] == "memory"
    assert max_difference(ref, run) == 0


@pytest.mark.subprocess
def test_a_run_killed_between_snapshots_resumes_bitwise_from_the_memory_tier(
    tmp_path: Path, shm_dir: Path
) -> None:
    ref, run = tmp_path / "ref", tmp_path / "run"
    _run(ref, "--storage", str(ref / "st"), "--memory", str(shm_dir / "ref"))
    common = ["--storage", str(run / "st"), "--memory", str(shm_dir / "run")]
    _run(run, *common, "--die-at", "8", expect=-9)  # snapshots at steps 3 and 6 (every=3)
    _run(run, *common)
    end = ended(run)
    assert end["global_step"] == 25
    assert end["restored"]["step"] == 6 and end["restored"]["tier"] == "memory"
    assert max_difference(ref, run) == 0


@pytest.mark.subprocess
@pytest.mark.distributed
def test_two_ddp_ranks_killed_between_snapshots_resume_bitwise_each_from_its_own_memory(
    tmp_path: Path, shm_dir: Path
) -> None:
    ref, run = tmp_path / "ref", tmp_path / "run"
    _run(ref, "--storage", str(ref / "st"), "--memory", str(shm_dir / "ref"), world=2)
    common = ["--storage", str(run / "st"), "--memory", str(shm_dir / "run")]
    _run(run, *common, "--die-at", "8", world=2, expect=None)  # both ranks SIGKILLed at step 8
    assert not (run / "end-rank0.json").exists()
    _run(run, *common, world=2)
    for r in range(2):
        end = ended(run, r)
        assert end["global_step"] == 25
        assert end["restored"]["step"] == 6 and end["restored"]["tier"] == "memory"
        assert max_difference(ref, run, r) == 0


@pytest.mark.subprocess
@pytest.mark.parametrize("pkg", ["lightning", "pytorch_lightning"])
def test_sigterm_ends_the_fit_at_a_committed_final_step_with_status_0_and_the_next_fit_resumes_there(
    tmp_path: Path, shm_dir: Path, pkg: str
) -> None:
    if pkg == "pytorch_lightning":
        pytest.importorskip("pytorch_lightning")
    ref, run = tmp_path / "ref", tmp_path / "run"
    _run(ref, "--storage", str(ref / "st"), "--memory", str(shm_dir / "ref"), pkg=pkg)
    common = ["--storage", str(run / "st"), "--memory", str(shm_dir / "run")]
    _run(run, *common, "--sigterm-at", "7", pkg=pkg)  # status 0
    first = ended(run)
    # the signal came before step 8 trained: step 8 is the final snapshot although every=3
    assert first["global_step"] == 8 and first["fit"] in ("returned", "SystemExit(None)")
    from flashckpt.catalog import Catalog

    with Catalog(run / "st") as cat:
        assert max(cat.step_numbers()) == 8
    _run(run, *common, pkg=pkg)
    end = ended(run)
    assert end["restored"]["step"] == 8 and end["global_step"] == 25
    assert max_difference(ref, run) == 0


# -- the checkpoint dict's types --------------------------------------------------------------------
class Color(enum.Enum):
    RED = "red"


class Level(enum.IntEnum):
    HIGH = 3


@dataclasses.dataclass(frozen=True)
class Config:
    width: int
    tags: tuple[str, ...]
    color: Color


class Point(NamedTuple):
    x: float
    y: float


def _lightning_like() -> dict[str, Any]:
    sd = collections.OrderedDict([("w", torch.randn(3, 2)), ("b", torch.zeros(2))])
    sd._metadata = collections.OrderedDict([("", {"version": 1})])  # type: ignore[attr-defined]
    return {
        "epoch": 1,
        "global_step": 12,
        "pytorch-lightning_version": "2.6.6",
        "state_dict": sd,
        "optimizer_states": [
            {
                "state": {0: {"step": torch.tensor(12.0), "exp_avg": torch.ones(3, 2)}},
                "param_groups": [
                    {"betas": (0.9, 0.999), "lr": 1e-3, "amsgrad": False, "foreach": None, "params": [0, 1]}
                ],
            }
        ],
        "callbacks": {
            "ModelCheckpoint{'monitor': None}": {"kth_value": torch.tensor(math.inf), "best_k_models": {}}
        },
        "loops": {
            "fit_loop": {
                "state_dict": {
                    "combined_loader": [{"_num_yielded": 4, "gen": torch.arange(5, dtype=torch.uint8)}]
                }
            }
        },
        "lr_schedulers": [
            {"_schedule_phases": [{"end_step": 3.0, "start_lr": "initial_lr"}], "nan": math.nan}
        ],
        "hparams_name": "kwargs",
        "hyper_parameters": {
            "color": Color.RED,
            "level": Level.HIGH,
            "config": Config(4, ("a", "b"), Color.RED),
            "point": Point(1.0, 2.0),
            "args": argparse.Namespace(lr=0.1, layers=[1, 2]),
            "ids": {3, 1},
            "kind": dict,
        },
        "hparams_type": collections.OrderedDict,
    }


def _same(a: Any, b: Any, path: str = "") -> None:
    assert type(a) is type(b), (path, type(a), type(b))
    if isinstance(a, torch.Tensor):
        assert a.dtype == b.dtype and a.shape == b.shape and torch.equal(a.nan_to_num(), b.nan_to_num()), path
    elif isinstance(a, dict):
        assert list(a) == list(b), path  # keys, their types and their order
        assert getattr(a, "_metadata", None) == getattr(b, "_metadata", None), path
        for k in a:
            _same(a[k], b[k], f"{path}/{k}")
    elif isinstance(a, (list, tuple)) and not hasattr(a, "_fields"):
        assert len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            _same(x, y, f"{path}/{i}")
    elif isinstance(a, float) and math.isnan(a):
        assert math.isnan(b), path
    else:
        assert a == b, path


def test_a_lightning_checkpoint_dict_round_trips_through_a_checkpointer(dirs: dict[str, Path]) -> None:
    ckpt_dict = _lightning_like()
    with flashckpt.Checkpointer(dirs["storage"], memory_dir=dirs["memory"]) as ckpt:
        ckpt.save(12, {"lightning": encode(ckpt_dict, droppable=frozenset({"hyper_parameters"}))})
        holder: dict[str, Any] = {}
        assert ckpt.restore(holder) == 12
    back = decode(holder["lightning"])
    _same(ckpt_dict, back)
    # and offline, from storage
    from flashckpt.integrations.lightning import load_checkpoint

    _same(ckpt_dict, load_checkpoint(dirs["storage"]))


def test_classes_are_looked_up_among_imported_modules_only_and_rebuilt_without_init() -> None:
    rec = encode({"c": Config(1, (), Color.RED)})
    rec["c"]["class"] = "some_module_never_imported:Config"
    assert decode(rec)["c"][MARK] == "dataclass"  # left as the dict: nothing was imported
    rec = encode({"c": Color.RED})
    rec["c"]["class"] = f"{__name__}:Config"  # a dataclass named as an enum
    assert decode(rec)["c"][MARK] == "enum"
    assert "some_module_never_imported" not in sys.modules

    calls: list[int] = []

    @dataclasses.dataclass
    class Traced:
        x: int

        def __post_init__(self) -> None:
            calls.append(self.x)

    globals()["Traced"] = Traced
    Traced.__qualname__ = "Traced"
    try:
        saved = encode(Traced(5))
        calls.clear()
        back = decode(saved)
        assert isinstance(back, Traced) and back.x == 5 and calls == []  # no __init__, no __post_init__
    finally:
        del globals()["Traced"]


def test_what_cannot_be_stored_names_its_key_path_or_is_dropped_where_resume_does_not_read_it(
    dirs: dict[str, Path], caplog: pytest.LogCaptureFixture
) -> None:
    with flashckpt.Checkpointer(dirs["storage"], memory_dir=dirs["memory"]) as ckpt:
        bad = {"callbacks": {"Mine": {"handle": open}}}
        with pytest.raises(UnsupportedStateError, match=re.escape("lightning.callbacks.Mine.handle")):
            ckpt.save(1, {"lightning": encode(bad, droppable=frozenset({"hyper_parameters"}))})
        with pytest.raises(UnsupportedStateError, match="reserved"):
            encode({"x": {MARK: 1}})
        with caplog.at_level(logging.WARNING, logger="flashckpt"):
            enc = encode(
                {"hyper_parameters": {"fn": open, "ok": 1}}, droppable=frozenset({"hyper_parameters"})
            )
        assert "hyper_parameters.fn" in caplog.text
        assert enc["hyper_parameters"]["fn"][MARK] == "dropped" and enc["hyper_parameters"]["ok"] == 1
        ckpt.save(2, {"lightning": enc})


def test_strategies_other_than_single_device_and_ddp_are_refused_by_name(tmp_path: Path) -> None:
    from flashckpt.integrations.lightning import FlashCheckpoint

    class FSDPOnCPU(pl.strategies.FSDPStrategy):  # (Lightning refuses FSDP itself on a CPU)
        pass

    cb = FlashCheckpoint(tmp_path / "st", framework="lightning")
    trainer = pl.Trainer(
        strategy=FSDPOnCPU(), accelerator="cpu", devices=1, callbacks=[cb], max_steps=1,
        logger=False, enable_progress_bar=False, enable_model_summary=False,
    )  # fmt: skip
    with pytest.raises(ConfigError, match=r"single-device and DDP.*FSDPOnCPU"):
        cb.setup(trainer, None, "fit")
    assert cb.checkpointer is None


def test_configuration_errors_are_clear(tmp_path: Path) -> None:
    from flashckpt.integrations.lightning import FlashCheckpoint

    with pytest.raises(ConfigError, match="dirpath"):
        FlashCheckpoint("s3://bucket/run")
    with pytest.raises(ConfigError, match="every"):
        FlashCheckpoint(tmp_path, every=0)
    with pytest.raises(ConfigError, match="framework"):
        FlashCheckpoint(tmp_path, framework="keras")
    cb = FlashCheckpoint(tmp_path, framework="lightning")
    assert isinstance(cb, FlashCheckpoint) and isinstance(cb, pl.callbacks.OnExceptionCheckpoint)
    assert cb.ckpt_path == os.path.join(tmp_path, "flashckpt-last.ckpt")


def test_importing_flashckpt_pulls_in_no_framework() -> None:
    code = (
        "import sys, flashckpt, flashckpt.integrations; "
        "top = {m.split('.')[0] for m in sys.modules}; "
        "print(sorted(top & {'lightning', 'pytorch_lightning', 'transformers'}))"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
