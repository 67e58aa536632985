"""The benchmark's own logic, without running a benchmark: the report's ratios and verdicts
(``bench/report.py``), the GPU check's page (``bench/gpu.py``), and the safetensors reader of
the compression figure (``bench/bench_suite.py``)."""

from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import Any

import torch

from bench.bench_suite import _safetensors
from bench.gpu import markdown
from bench.report import render, targets


def _results(blocking_pair: float, training: tuple[float, float]) -> dict[str, Any]:
    core = {
        "floor": 0.1,
        "floor_steady": 0.1,
        "blocking_steady": 0.11,
        "blocking_steady_pair": blocking_pair,
        "blocking_cold": 0.15,
        "blocking_cold_pair": 1.5,
        "torch_save": 2.2,
        "dcp_async_blocking": 0.2,
        "dcp_async_durable": 3.0,
        "durable_local": 0.5,
        "so_durable": 0.6,
        "so_durable_pair": 1.2,
        "so_raw_paired": 0.5,
        "restore_memory": 0.12,
        "restore_memory_pair": 1.2,
        "dcp_load_warm": 0.3,
    }
    return {
        "machine": {
            "date": "d",
            "git": "g",
            "cores": 2,
            "cpu": "c",
            "memory_gib": 24,
            "kernel": "k",
            "versions": {},
        },
        "quick": True,
        "sizes": [0.25],
        "seconds": 1.0,
        "core/0.25": {"results": [core]},
        "memory/0.25": {"flashckpt": {"ratio": 2.03, "extra_bytes": 1 << 29}},
        "training": {
            "none": training[0],
            "flashckpt": training[1],
            "flashckpt_durable": training[1] * 0.9,
            "steps": 10,
            "model_bytes": 1 << 20,
        },
        "tc/0.25": {"failed": "exit code 1", "log": "logs/tc-0.25.log"},
    }


def test_each_target_is_judged_on_the_figures_of_the_same_run(tmp_path: Path) -> None:
    rows = {r["figure"]: r for r in targets(_results(1.1, (3.0, 2.85)))}
    assert rows["save blocking / copy floor, steady state (paired)"]["met"] is True
    assert rows["`torch.save` + fsync / flashckpt blocking"]["ratio"] == 2.2 / 0.11  # 20x: met
    assert rows["`torch.save` + fsync / flashckpt blocking"]["met"] is True
    assert rows["DCP `load` (page cache warm) / flashckpt restore from memory"]["met"] is False  # 2.5x < 4
    assert abs(rows["training throughput, a save every step / none"]["ratio"] - 0.95) < 1e-9
    missed = {r["figure"]: r for r in targets(_results(1.3, (3.0, 1.0)))}
    assert missed["save blocking / copy floor, steady state (paired)"]["met"] is False
    assert missed["training throughput, a save every step / none"]["met"] is False
    # a missed target says why, from the same run's figures; a met one says nothing
    res = _results(1.3, (3.0, 1.0))
    res["core/0.25"]["results"][0]["steady"] = [
        {"blocking": 0.13, "floor_before": 0.1},
        {"blocking": 0.12, "floor_before": 0.1},
    ]
    why = {r["figure"]: r for r in targets(res)}["save blocking / copy floor, steady state (paired)"]["why"]
    assert "just before it: 1.30x, 1.20x (the median is judged; 10 ms above the floor)" in why
    res["core/0.25"]["results"][0]["so_steady"] = [
        {"durable_all": 0.6, "persist_s": {"memory": 0.05, "storage": 0.5}, "raw_before": 0.45}
    ]
    why = {r["figure"]: r for r in targets(res)}["durable on local / fastest raw write (paired)"]
    assert why["met"] is True and why["why"] == ""  # 1.2x paired: met, nothing to explain
    res["core/0.25"]["results"][0]["so_durable_pair"] = 1.5
    why = {r["figure"]: r for r in targets(res)}["durable on local / fastest raw write (paired)"]["why"]
    assert why.startswith("of 600 ms: checksums 50 ms, the write 500 ms (the raw write just before: 450 ms)")
    assert "the rest 50 ms" in why
    load = missed["DCP `load` (page cache warm) / flashckpt restore from memory"]["why"]
    assert load.startswith("300 ms against 120 ms")
    assert rows["save blocking / copy floor, steady state (paired)"]["why"] == ""


def test_a_first_save_after_restore_that_missed_names_the_first_touch_it_waited_for() -> None:
    res = _results(1.1, (3.0, 2.85))
    core = res["core/0.25"]["results"][0]
    core.update(
        blocking_cold=0.9,
        blocking_cold_pair=9.0,
        prefault_done_after_s=None,
        training_step={"wall": 1.0},
        first_touch=0.1,
    )
    row = next(r for r in targets(res) if r["figure"] == "first save after `restore()` / copy floor")
    assert row["met"] is False
    assert "had not finished into the 1.0 s step" in row["why"]
    assert "0.40 s per GiB" in row["why"]  # 0.1 s for 0.25 GiB


def test_the_page_names_what_was_missed_and_what_failed_to_run(tmp_path: Path) -> None:
    page = render(_results(1.3, (3.0, 1.0)), tmp_path)
    assert "| save blocking / copy floor, steady state (paired) | <= 1.2 | 0.25 GiB | 1.30x |" in page
    assert "**no**" in page
    assert "tc/0.25: failed (exit code 1; log logs/tc-0.25.log)" in page  # a rival that did not run
    assert "7 of 11 met, 4 missed." in page


def test_the_gpu_page_lists_every_check_and_the_save_and_restore_figures() -> None:
    summary = {
        "device": "GPU",
        "devices": 1,
        "torch": "2.13",
        "cuda": "12",
        "seconds": 100.0,
        "counts": {"pass": 2, "fail": 1, "error": 0, "skipped": 0},
        "checks": [
            {"check": 1, "name": "raw bandwidth", "status": "pass", "seconds": 1.0},
            {
                "check": 2,
                "name": "save blocking vs size",
                "status": "pass",
                "seconds": 30.0,
                "metrics": {
                    "sizes": [
                        {
                            "bytes": 1 << 30,
                            "blocking_s": 0.05,
                            "gbs": 21.5,
                            "x_d2h_floor": 1.07,
                            "restore_h2d_s": 0.06,
                            "restore_gbs": 17.9,
                            "restore_x_h2d_floor": 1.2,
                        },
                        {"bytes": 16 << 30, "skipped": "budget"},
                    ]
                },
            },
            {"check": 8, "name": "failed registration (D2)", "status": "fail", "error": "pending CUDA error"},
        ],
    }
    page = markdown(summary)
    assert "2 passed, 1 failed" in page
    assert "| 8. failed registration (D2) | fail |  | pending CUDA error |" in page
    assert "| 1 GiB | 0.0500 s (21.5 GB/s) | 1.07 | 0.0600 s (17.9 GB/s) | 1.2 | yes |" in page
    assert "| 16 GiB | skipped (budget) |" in page


def test_the_safetensors_reader_gives_back_each_tensor_bitwise(tmp_path: Path) -> None:
    tensors = {"a": torch.randn(3, 5), "b": torch.randn(7).to(torch.bfloat16), "c": torch.arange(4)}
    names = {torch.float32: "F32", torch.bfloat16: "BF16", torch.int64: "I64"}
    header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
    data, at = b"", 0
    for k, t in tensors.items():
        raw = t.contiguous().view(torch.uint8).numpy().tobytes()
        header[k] = {"dtype": names[t.dtype], "shape": list(t.shape), "data_offsets": [at, at + len(raw)]}
        data, at = data + raw, at + len(raw)
    blob = json.dumps(header).encode()
    (tmp_path / "m.safetensors").write_bytes(struct.pack("<Q", len(blob)) + blob + data)
    got = _safetensors(tmp_path / "m.safetensors")
    assert got.keys() == tensors.keys()
    assert all(torch.equal(got[k], v) and got[k].dtype == v.dtype for k, v in tensors.items())
