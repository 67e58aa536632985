"""``flashckpt salvage`` and ``flashckpt gc`` on one process's checkpoints (the multi-node
salvage, with real SIGKILLs, is in tests/test_distributed.py), and every command against a
real S3 server on loopback."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import flashckpt
from flashckpt.catalog import Catalog
from flashckpt.cli import main
from flashckpt.format import checksum, chunk_key, decode_manifest, manifest_key, parse_chunk_key
from flashckpt.maintenance import gc

ROOT = Path(__file__).resolve().parent.parent

pytestmark = [pytest.mark.subprocess]

#: ``FLASHCKPT_FULL_CAMPAIGNS=1``: the full-size campaigns (run before an issue is resolved)
FULL = os.environ.get("FLASHCKPT_FULL_CAMPAIGNS", "") not in ("", "0")

#: a job that saves steps 0-4 (persisting every third: 0 and 3) and dies without close
CRASHED_JOB = """
import json, os, sys, torch, flashckpt
storage, memory, options, compression = sys.argv[1:5]
ckpt = flashckpt.Checkpointer(
    storage, memory_dir=memory, persist_every=3, preempt_signals=None,
    storage_options=json.loads(options) or None, compression=compression or None,
    options=flashckpt.Options(chunk_bytes=256 << 10),  # five chunks a step
)
g = torch.Generator().manual_seed(7)
for step in range(5):
    ckpt.save(step, {"w": torch.randn(300_000, generator=g), "step": step})
ckpt.wait()
os._exit(0)  # the process dies: the memory tier stays, as after a crash
"""


def _expected(step: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(7)
    for _ in range(step):
        torch.randn(300_000, generator=g)
    return torch.randn(300_000, generator=g)


def _crash(storage: str, memory: Path, options: dict[str, Any] | None = None, compression: str = "") -> None:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    argv = [sys.executable, "-c", CRASHED_JOB, storage, str(memory), json.dumps(options or {}), compression]
    subprocess.run(argv, env=env, check=True, timeout=120)


def _run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out = capsys.readouterr()
    return code, out.out, out.err


def _steps(storage: str | Path, **kw: Any) -> list[int]:
    with Catalog(storage, **kw) as cat:
        return cat.step_numbers()


@pytest.mark.parametrize("compression", ["", "zstd"])
def test_salvage_commits_the_memory_only_step_and_a_restart_on_a_wiped_node_resumes_it_bitwise(
    tmp_path: Path, shm_dir: Path, capsys: pytest.CaptureFixture[str], compression: str
) -> None:
    storage = tmp_path / "storage"
    _crash(str(storage), shm_dir, compression=compression)
    assert _steps(storage) == [0, 3]
    argv = ["salvage", str(storage), "--memory-dir", str(shm_dir)]
    code, out, _ = _run(capsys, *argv, *(["--compression", compression] if compression else []))
    assert code == 0 and "step 4 (1 rank(s)): wrote rank(s) 0" in out and "committed" in out, out
    assert _steps(storage) == [0, 3, 4]
    m = decode_manifest((storage / manifest_key(4, 0, 1)).read_bytes())
    assert {c.codec.startswith("zstd") for c in m.chunks} == {bool(compression)}
    # again: nothing to do, nothing written
    code, out, _ = _run(capsys, *argv)
    assert code == 0 and "nothing to salvage" in out
    assert _run(capsys, "verify", str(storage))[0] == 0
    # the node is wiped; a restart elsewhere resumes from storage at step 4, bitwise
    memory = shm_dir.parent / f"{shm_dir.name}-fresh"
    try:
        with flashckpt.Checkpointer(storage, memory_dir=memory, preempt_signals=None) as ckpt:
            state = {"w": torch.zeros(300_000), "step": -1}
            assert ckpt.restore(state) == 4
            assert ckpt.stats["restored"]["tier"] == "storage"
        assert torch.equal(state["w"], _expected(4)) and state["step"] == 4
    finally:
        import shutil

        shutil.rmtree(memory, ignore_errors=True)


def _flip_memory_chunk(memory: Path, step: int) -> None:
    """Flip one bit of ``step``'s bytes in its memory slot (the checksums stay as sealed)."""
    (shard,) = [d for d in memory.iterdir() if d.is_dir()]
    m = decode_manifest((shard / f"step-{step:012d}.manifest").read_bytes(), allow_unsealed=True)
    assert m.sealed  # the persist thread checksummed the memory-only snapshot
    c = m.chunks[0]
    slot = shard / c.key  # a memory manifest's chunks name their slot file
    with open(slot, "r+b") as f:
        f.seek(c.at + c.nbytes // 2)
        b = f.read(1)
        f.seek(c.at + c.nbytes // 2)
        f.write(bytes([b[0] ^ 0x04]))


def test_damaged_memory_bytes_are_never_stored_nor_committed(
    tmp_path: Path, shm_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    storage = tmp_path / "storage"
    _crash(str(storage), shm_dir)
    _flip_memory_chunk(shm_dir, 4)
    chunks_before = set((storage / "chunks").rglob("*"))
    code, out, _ = _run(capsys, "salvage", str(storage), "--memory-dir", str(shm_dir))
    assert code == 1 and "step 4 (1 rank(s)): FAILED" in out and "checksum" in out.lower(), out
    assert _steps(storage) == [0, 3]  # never committed
    assert not (storage / manifest_key(4, 0, 1)).exists()
    # no damaged bytes stored: every chunk written holds the bytes its content address names
    new = [p for p in set((storage / "chunks").rglob("*")) - chunks_before if p.is_file()]
    for p in new:
        assert checksum(p.read_bytes()) == parse_chunk_key(p.relative_to(storage).as_posix()), p
    assert _run(capsys, "verify", str(storage))[0] == 0


def test_a_memory_tier_a_live_job_holds_is_not_read(
    tmp_path: Path, shm_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    storage = tmp_path / "storage"
    with flashckpt.Checkpointer(storage, memory_dir=shm_dir, persist_every=10, preempt_signals=None) as ckpt:
        ckpt.save(0, {"w": torch.ones(8)})
        ckpt.save(1, {"w": torch.ones(8)})  # memory only
        ckpt.wait()
        code, out, err = _run(capsys, "salvage", str(storage), "--memory-dir", str(shm_dir))
        assert code == 0 and "nothing to salvage" in out and "in use by a live process" in err
        assert _steps(storage) == [0]


def test_salvage_usage_errors_exit_2_with_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, _, err = _run(capsys, "salvage", str(tmp_path / "s"), "--memory-dir", str(tmp_path / "nothing"))
    assert code == 2 and err.count("\n") == 1 and "no memory tier" in err
    code, _, err = _run(capsys, "salvage", str(tmp_path / "s"), "--storage-options", "[1]")
    assert code == 2 and "expected a JSON object" in err


# -- gc ---------------------------------------------------------------------------------------------


def _history(storage: Path, memory: Path, steps: int, seed: int = 0) -> dict[int, torch.Tensor]:
    """``steps`` committed steps, every one kept, each changing some chunks; returns each
    step's tensor."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(64, 4096, generator=g)
    out = {}
    with flashckpt.Checkpointer(
        storage,
        memory_dir=memory,
        keep=None,
        preempt_signals=None,
        options=flashckpt.Options(chunk_bytes=65536),
    ) as ckpt:
        for step in range(steps):
            w = w.clone()
            w[step % 64] += 1.0  # one changed chunk per step: the others are shared
            ckpt.save(step, {"w": w})
            out[step] = w
    return out


def test_gc_keeps_the_newest_steps_deletes_what_nothing_needs_and_dry_run_says_so_first(
    tmp_path: Path, shm_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    storage = tmp_path / "storage"
    states = _history(storage, shm_dir, 6)
    foreign = storage / "chunks" / "README.txt"
    foreign.write_text("not flashckpt's")

    def files() -> dict[Path, int]:
        return {p: p.stat().st_size for p in storage.rglob("*") if p.is_file()}

    before = files()
    code, out, _ = _run(capsys, "gc", str(storage), "--keep", "2", "--dry-run", "--grace", "0", "--json")
    dry = json.loads(out)
    assert code == 0 and files() == before  # nothing deleted
    assert dry["kept"] == [4, 5] and dry["retired"] == [0, 1, 2, 3] and dry["dirs"] == [0, 1, 2, 3]
    assert dry["chunks"] == 4 and dry["bytes"] > 0  # each retired step's own changed chunk
    code, out, _ = _run(capsys, "gc", str(storage), "--keep", "2", "--grace", "0", "--json")
    real = json.loads(out)
    assert code == 0 and {**real, "dry_run": True} == dry  # the dry run said exactly this
    assert _steps(storage) == [4, 5] and foreign.exists()
    freed = sum(n for p, n in before.items() if p not in files())
    assert freed >= real["bytes"]
    for step in (4, 5):
        assert torch.equal(flashckpt.load(storage, step=step)["w"], states[step])
    assert _run(capsys, "verify", str(storage))[0] == 0
    code, out, _ = _run(capsys, "gc", str(storage), "--keep", "2", "--grace", "0")
    assert code == 0 and "retired none" in out and "0 chunk(s)" in out


def test_gc_leaves_young_unreferenced_chunks_a_live_job_may_be_writing(
    tmp_path: Path, shm_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    storage = tmp_path / "storage"
    _history(storage, shm_dir, 2)
    # a chunk a live job wrote for a step whose manifest is not there yet
    pending = storage / chunk_key("ab" * 16, "raw/1")
    pending.parent.mkdir(parents=True, exist_ok=True)
    pending.write_bytes(b"12345")
    code, _, err = _run(capsys, "gc", str(storage), "--keep", "1")  # default grace: 600 s
    assert code == 0 and pending.exists() and "younger than 600 s" in err
    code, _, err = _run(capsys, "gc", str(storage), "--keep", "1", "--grace", "0")
    assert code == 0 and not pending.exists()


def test_gc_collects_no_chunk_while_a_manifest_does_not_validate(
    tmp_path: Path, shm_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    storage = tmp_path / "storage"
    _history(storage, shm_dir, 3)
    torn = storage / manifest_key(2, 0, 1)
    torn.write_bytes(torn.read_bytes()[:-7])
    chunks = {p for p in (storage / "chunks").rglob("*") if p.is_file()}
    code, _, err = _run(capsys, "gc", str(storage), "--keep", "1", "--grace", "0")
    assert code == 0 and "chunks not collected" in err
    assert chunks <= {p for p in (storage / "chunks").rglob("*") if p.is_file()}


@pytest.mark.parametrize("argv", [["--keep", "0"], ["--keep", "1", "--grace", "-1"]])
def test_gc_bad_input_exits_2(
    tmp_path: Path, shm_dir: Path, capsys: pytest.CaptureFixture[str], argv: list[str]
) -> None:
    storage = tmp_path / "storage"
    _history(storage, shm_dir, 1)
    code, _, err = _run(capsys, "gc", str(storage), *argv)
    assert code == 2 and err.count("\n") == 1
    assert _run(capsys, "gc", str(tmp_path / "typo"), "--keep", "1")[0] == 2


@settings(
    max_examples=200 if FULL else 12,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(steps=st.integers(1, 7), keep=st.integers(1, 8), seed=st.integers(0, 3))
def test_gc_never_takes_a_byte_of_a_step_it_keeps(
    tmp_path_factory: pytest.TempPathFactory, steps: int, keep: int, seed: int
) -> None:
    base = tmp_path_factory.mktemp("gc")
    memory = Path("/dev/shm") / f"flashckpt-test-gc-{base.name}"
    try:
        states = _history(base / "storage", memory, steps, seed)
    finally:
        import shutil

        shutil.rmtree(memory, ignore_errors=True)
    dry = gc(base / "storage", keep, dry_run=True, grace_s=0)
    real = gc(base / "storage", keep, grace_s=0)
    assert real.kept == dry.kept == list(range(max(0, steps - keep), steps))
    assert (real.retired, real.dirs, real.chunks, real.bytes) == (
        dry.retired,
        dry.dirs,
        dry.chunks,
        dry.bytes,
    )
    for step in real.kept:
        assert torch.equal(flashckpt.load(base / "storage", step=step)["w"], states[step])


# -- every command on S3 ------------------------------------------------------------------------------


def test_every_command_against_a_real_s3_server_on_loopback(
    s3: dict[str, Any], shm_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    url, so = str(s3["url"]), dict(s3["storage_options"])
    _crash(url, shm_dir, so)
    opt = ["--storage-options", json.dumps(so)]
    code, out, _ = _run(capsys, "ls", url, *opt, "--memory-dir", str(shm_dir), "--json")
    rows = {r["step"]: r for r in json.loads(out)}
    assert code == 0 and rows[4]["tiers"] == {"memory": [0]} and rows[4]["restore"]
    code, out, _ = _run(capsys, "salvage", url, *opt, "--memory-dir", str(shm_dir), "--json")
    assert code == 0 and [(s["step"], s["committed"]) for s in json.loads(out)["steps"]] == [(4, True)]
    code, out, _ = _run(capsys, "verify", url, *opt)
    assert code == 0 and "step 4: ok" in out
    code, out, _ = _run(capsys, "inspect", url, *opt, "--tensor", "w", "--json")
    stats = json.loads(out)
    assert code == 0 and stats["step"] == 4 and stats["numel"] == 300_000
    assert stats["max"] == pytest.approx(float(_expected(4).max()))
    target = tmp_path / "w.safetensors"
    code, _, _ = _run(capsys, "restore", url, *opt, "--out", str(target))
    from safetensors.torch import load_file

    assert code == 0 and torch.equal(load_file(target)["w"], _expected(4))
    code, out, _ = _run(capsys, "diff", f"{url}@3", f"{url}@4", *opt, "--json")
    assert code == 1 and [d["key"] for d in json.loads(out)["differ"]] == ["w"]
    code, out, _ = _run(capsys, "gc", url, *opt, "--keep", "1", "--grace", "0", "--json")
    assert code == 0 and json.loads(out)["retired"] == [0, 3]
    assert _steps(url, storage_options=so) == [4]
    assert torch.equal(flashckpt.load(url, storage_options=so)["w"], _expected(4))


#: ``flashckpt salvage`` that SIGKILLs itself at the ``n``-th firing of a hook point
KILLED_SALVAGE = """
import os, signal, sys
from flashckpt import _hooks as hooks
from flashckpt.cli import main
point, n = sys.argv[1], int(sys.argv[2])
seen = [0]
def maybe(**_):
    seen[0] += 1
    if seen[0] == n:
        os.kill(os.getpid(), signal.SIGKILL)
hooks.on(point, maybe)
sys.exit(main(["salvage", *sys.argv[3:]]))
"""


#: where a salvage is killed: the n-th firing of a hook point (five chunks are written)
KILLS = [("persist.chunk", 1), ("persist.chunk", 3), ("persist.manifest", 1), ("commit.record", 1)]
if FULL:
    KILLS = [("persist.chunk", n) for n in range(1, 6)] + [
        ("persist.manifest", 1), ("commit.record", 1), ("commit.done", 1)
    ]  # fmt: skip


@pytest.mark.parametrize(("point", "n"), KILLS)
def test_a_salvage_killed_anywhere_is_finished_by_running_it_again(
    tmp_path: Path, shm_dir: Path, capsys: pytest.CaptureFixture[str], point: str, n: int
) -> None:
    storage = tmp_path / "storage"
    _crash(str(storage), shm_dir)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    argv = [sys.executable, "-c", KILLED_SALVAGE, point, str(n), str(storage), "--memory-dir", str(shm_dir)]
    killed = subprocess.run(argv, env=env, capture_output=True, timeout=120)
    assert killed.returncode == -9, killed.stderr  # it died where it was told to
    # committed whole or not at all (after the record is written it is committed)
    assert _steps(storage) == ([0, 3, 4] if point == "commit.done" else [0, 3])
    assert _run(capsys, "verify", str(storage))[0] == 0
    code, out, _ = _run(capsys, "salvage", str(storage), "--memory-dir", str(shm_dir))
    assert code == 0 and ("committed" in out or "nothing to salvage" in out), out
    assert _steps(storage) == [0, 3, 4] and _run(capsys, "verify", str(storage))[0] == 0
    assert torch.equal(flashckpt.load(storage, step=4)["w"], _expected(4))
