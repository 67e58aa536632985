"""The Transformers integration with the real library: a GPT-2 built from a config, real
processes, real signals.

A run SIGKILLed between two snapshots and resumed with
``trainer.train(resume_from_checkpoint=cb.resume_path())`` ends with the same weights, bitwise,
as a run never interrupted: one process and two DDP processes (each rank its own dropout
stream), restored from the memory tier.  A SIGTERM stops training at a committed final step
with exit status 0.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from flashckpt.errors import ConfigError
from tests.integrations.launch import ended, max_difference, run_worker

pytest.importorskip("transformers")
pytest.importorskip("accelerate")


def _run(out: Path, *args: str, world: int = 1, expect: int | None = 0) -> str:
    return run_worker("tests.integrations.hf_worker", out, list(args), world=world, expect=expect)


@pytest.mark.subprocess
def test_a_run_killed_between_snapshots_resumes_bitwise_from_the_memory_tier(
    tmp_path: Path, shm_dir: Path
) -> None:
    ref, run = tmp_path / "ref", tmp_path / "run"
    _run(ref, "--storage", str(ref / "st"), "--memory", str(shm_dir / "ref"))
    assert ended(ref)["path"] is None  # nothing to resume the first time
    common = ["--storage", str(run / "st"), "--memory", str(shm_dir / "run")]
    _run(run, *common, "--die-at", "8", expect=-9)  # snapshots at steps 3 and 6 (every=3)
    _run(run, *common)
    end = ended(run)
    assert end["global_step"] == 25
    assert end["restored"]["step"] == 6 and end["restored"]["tier"] == "memory"
    assert end["path"].endswith("checkpoint-6") and end["resume_left"] == []  # removed once read
    assert max_difference(ref, run) == 0


@pytest.mark.subprocess
@pytest.mark.distributed
def test_two_ddp_ranks_killed_between_snapshots_resume_bitwise_each_from_its_own_memory(
    tmp_path: Path, shm_dir: Path
) -> None:
    ref, run = tmp_path / "ref", tmp_path / "run"
    _run(ref, "--storage", str(ref / "st"), "--memory", str(shm_dir / "ref"), world=2)
    common = ["--storage", str(run / "st"), "--memory", str(shm_dir / "run")]
    _run(run, *common, "--die-at", "8", world=2, expect=None)
    assert not (run / "end-rank0.json").exists()
    _run(run, *common, world=2)
    for r in range(2):
        end = ended(run, r)
        assert end["global_step"] == 25 and end["path"].endswith(f"rank{r}/checkpoint-6")
        assert end["restored"]["step"] == 6 and end["restored"]["tier"] == "memory"
        assert max_difference(ref, run, r) == 0


@pytest.mark.subprocess
def test_sigterm_stops_training_at_a_committed_final_step_with_status_0_and_the_next_run_resumes_there(
    tmp_path: Path, shm_dir: Path
) -> None:
    ref, run = tmp_path / "ref", tmp_path / "run"
    _run(ref, "--storage", str(ref / "st"), "--memory", str(shm_dir / "ref"))
    common = ["--storage", str(run / "st"), "--memory", str(shm_dir / "run")]
    _run(run, *common, "--sigterm-at", "7")  # status 0
    assert ended(run)["global_step"] == 8  # the signal came before step 8: its end is the final snapshot
    from flashckpt.catalog import Catalog

    with Catalog(run / "st") as cat:
        assert max(cat.step_numbers()) == 8
    _run(run, *common)
    end = ended(run)
    assert end["restored"]["step"] == 8 and end["global_step"] == 25
    assert max_difference(ref, run) == 0


def test_resume_dir_inside_output_dir_and_sharded_strategies_are_refused(tmp_path: Path) -> None:
    from transformers import TrainingArguments

    from flashckpt.integrations.transformers import FlashCheckpointCallback

    cb = FlashCheckpointCallback(tmp_path / "st", resume_dir=tmp_path / "out" / "resume")
    args = TrainingArguments(output_dir=str(tmp_path / "out"), use_cpu=True, report_to=[])
    with pytest.raises(ConfigError, match="inside output_dir"):
        cb.on_init_end(args, None, None, model=None)
    cb = FlashCheckpointCallback(tmp_path / "st")
    args.fsdp = "full_shard"  # (set after construction: FSDP itself needs a GPU here)
    with pytest.raises(ConfigError, match="FSDP and DeepSpeed"):
        cb.on_init_end(args, None, None, model=None)
    with pytest.raises(ConfigError, match="every"):
        FlashCheckpointCallback(tmp_path / "st", every=0)
    from transformers import TrainerCallback

    assert isinstance(FlashCheckpointCallback(tmp_path / "st"), TrainerCallback)
