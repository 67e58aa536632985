"""Multi-rank jobs with real processes: ``torchrun`` on gloo, real SIGKILLs, real restarts.

The job (``tests/dist_worker.py``) couples its ranks through gradient all-reduces, so a rank
resumed at a different step than its peers would diverge from the uninterrupted run: the
bitwise comparison with that run checks that every rank came back at the same, newest
consistent step.
"""

from __future__ import annotations

import gc
import json
import os
import shutil
import socket
import subprocess
import sys
import weakref
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.multiprocessing as mp

import flashckpt
from flashckpt.format import (
    carried,
    check_memory_manifest,
    commit_key,
    decode_commit,
    decode_manifest,
    memory_manifest_key,
    part_holders,
)
from flashckpt.testing import parts
from tests.conftest import make_state

pytestmark = [pytest.mark.distributed, pytest.mark.subprocess]

ROOT = Path(__file__).resolve().parent.parent
STEPS = 8


def _exit_before_finalization() -> None:
    """End a gloo worker once everything is checked and written and every Checkpointer closed.

    Something keeps the gloo group alive past ``destroy_process_group``: an FSDP device mesh
    (held by the model's DTensors, freed only by the interpreter's final GC), and any AdamW
    (torch's dynamo keeps WORLD referenced).  Its worker thread may then drop
    a finished work's tensors while the interpreter finalizes; taking the GIL there ends the
    thread inside a noexcept frame and the process aborts ("terminate called without an active
    exception"; backtrace: ``ProcessGroupGloo::runLoop`` -> ``~AsyncAllgatherCoalescedWork`` ->
    ``decref_pyobject`` -> ``PyThread_exit_thread``; pytorch/pytorch#179291).  About 1 run in
    30-45 here, so skip finalization.
    """
    os._exit(0)


def _job_cmd(
    launcher: list[str], out: Path, storage: Path, memory: Path, steps: int, extra: tuple[str, ...]
) -> list[str]:
    """``torchrun <launcher args> -m tests.dist_worker <worker args>``."""
    worker = ["--out", str(out), "--storage", str(storage), "--memory", str(memory), "--steps", str(steps)]
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        *launcher,
        "-m",
        "tests.dist_worker",
        *worker,
        *extra,
    ]


def _job_env(out: Path) -> dict[str, str]:
    # torchrun's agent leaves log directories and error files under TMPDIR: keep them in out
    return {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "PYTHONPATH": str(ROOT),
        "FLASHCKPT_MIRROR_HOST": "127.0.0.1",
        "TMPDIR": str(out),
    }


def _torchrun(nproc: int, out: Path, storage: Path, memory: Path, *extra: str, steps: int = STEPS) -> None:
    """One torchrun agent (one restart allowed) running ``nproc`` ranks."""
    out.mkdir(parents=True, exist_ok=True)
    launcher = [
        f"--nproc-per-node={nproc}",
        "--max-restarts=1",
        "--monitor-interval=0.2",
        f"--master-port={_free_port()}",
    ]
    cmd = _job_cmd(launcher, out, storage, memory, steps, extra)
    proc = subprocess.run(cmd, cwd=ROOT, env=_job_env(out), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _finals(out: Path, nproc: int) -> list[dict[str, Any]]:
    return [torch.load(out / f"final-rank{r}.pt", weights_only=False) for r in range(nproc)]


def _assert_same(a: list[dict[str, Any]], b: list[dict[str, Any]]) -> None:
    assert len(a) == len(b)
    for ra, rb in zip(a, b, strict=True):
        for k, v in ra["model"].items():
            assert torch.equal(v, rb["model"][k]), k
        oa, ob = ra["optim"]["state"], rb["optim"]["state"]
        assert oa.keys() == ob.keys()
        for i in oa:
            for k, v in oa[i].items():
                assert torch.equal(torch.as_tensor(v), torch.as_tensor(ob[i][k])), (i, k)
        assert ra["sched"] == rb["sched"]
        assert ra["extra"] == rb["extra"]


def _restored(out: Path, attempt: int, nproc: int) -> list[dict[str, Any]]:
    return [json.loads((out / f"attempt{attempt}-rank{r}.json").read_text()) for r in range(nproc)]


def _commits(storage: Path) -> list[int]:
    return sorted(int(p.name.split("-")[1]) for p in (storage / "commits").iterdir())


def _verify_all(storage: Path, world: int) -> None:
    """Every committed step loads for every rank, every chunk present and intact (retention's
    chunk GC never took a chunk a committed step references)."""
    for step in _commits(storage):
        for rank in range(world):
            flashckpt.load(storage, step=step, rank=rank)


@dataclass
class Reference:
    finals: dict[int, list[dict[str, Any]]]  # world size -> each rank's final state
    storage: dict[int, Path]  # world size -> the storage tier it left


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Reference]:
    """The uninterrupted 2- and 4-rank runs."""
    base = tmp_path_factory.mktemp("reference")
    memory = Path(f"/dev/shm/flashckpt-test-ref-{os.getpid()}")
    ref = Reference({}, {})
    try:
        for n in (2, 4):
            ref.storage[n] = base / f"storage{n}"
            _torchrun(n, base / f"out{n}", ref.storage[n], memory)
            ref.finals[n] = _finals(base / f"out{n}", n)
            _verify_all(ref.storage[n], n)
        yield ref
    finally:
        left = [p for p in memory.rglob("*") if p.is_file()] if memory.exists() else []
        shutil.rmtree(memory, ignore_errors=True)
        assert not left, f"a clean run left its memory tier behind: {left}"


@pytest.mark.parametrize(
    ("nproc", "kill_rank", "where"),
    [(2, 1, "stage"), (2, 1, "persist"), (2, -1, "commit"), (4, 3, "persist")],
)
def test_a_rank_killed_mid_save_resumes_every_rank_at_the_newest_consistent_step(
    reference: Reference,
    tmp_path: Path,
    shm_dir: Path,
    nproc: int,
    kill_rank: int,
    where: str,
) -> None:
    out, storage, local = tmp_path / "out", tmp_path / "storage", tmp_path / "local"
    kill_step = 4
    _torchrun(
        nproc,
        out,
        storage,
        shm_dir,
        "--localdisk",
        str(local),
        "--keep",
        "0",
        "--kill-rank",
        str(kill_rank),
        "--kill-step",
        str(kill_step),
        "--kill-at",
        where,
    )
    _assert_same(reference.finals[nproc], _finals(out, nproc))
    first = _restored(out, 0, nproc)
    assert all(r["start"] is None for r in first)
    again = _restored(out, 1, nproc)
    # the newest step every rank had staged when the job died (the others may have gone on)
    staged = [int((out / f"staged-rank{r}").read_text().split()[-1]) for r in range(nproc)]
    expect = min(staged)
    assert expect >= (kill_step - 1 if where == "stage" else kill_step)
    assert {r["start"] for r in again} == {expect}
    assert all(r["restored"]["tier"] == "memory" for r in again)  # no rank read storage
    # nothing staged was lost: every step ended up committed with every rank's shard (the
    # attempt after the crash persisted and committed what the crash interrupted)
    assert _commits(storage) == list(range(STEPS))
    _verify_all(storage, nproc)
    for s in range(STEPS):
        record = decode_commit((storage / commit_key(s)).read_bytes())
        assert record.world_size == nproc and len(record.manifests) == nproc
    assert not shm_dir.exists() or not any(p.is_file() for p in shm_dir.rglob("*")), "memory-tier files left"


def test_a_finished_job_extended_later_restores_from_each_ranks_local_disk(
    reference: Reference, tmp_path: Path, shm_dir: Path
) -> None:
    out, storage, local = tmp_path / "out", tmp_path / "storage", tmp_path / "local"
    _torchrun(2, out, storage, shm_dir, "--localdisk", str(local), steps=5)
    _torchrun(2, out, storage, shm_dir, "--localdisk", str(local))
    assert [r["restored"]["tier"] for r in _restored(out, 0, 2)] == ["local", "local"]
    _assert_same(reference.finals[2], _finals(out, 2))
    # the second run without its local disks (a new set of nodes): from storage
    for p in local.iterdir():
        subprocess.run(["rm", "-rf", str(p)], check=True)
    (out / "final-rank0.pt").unlink()
    _torchrun(2, out, storage, shm_dir, "--localdisk", str(local), steps=STEPS + 1)
    got = [(r["restored"]["tier"], r["restored"]["step"]) for r in _restored(out, 0, 2)]
    assert got == [("storage", STEPS - 1)] * 2
    assert (out / "final-rank0.pt").exists()


def test_a_different_world_size_is_a_clear_error_not_a_fresh_start(
    reference: Reference, shm_dir: Path
) -> None:
    storage = reference.storage[2]
    with (
        flashckpt.Checkpointer(storage, memory_dir=shm_dir) as ckpt,
        pytest.raises(flashckpt.StateMismatchError, match="saved by 2 ranks; this job has 1"),
    ):
        ckpt.restore(make_state())
    # offline, the plain per-rank state of a 2-rank step: rank 0's by default, or any rank's
    for rank in (None, 0, 1):
        loaded = flashckpt.load(storage) if rank is None else flashckpt.load(storage, rank=rank)
        want = reference.finals[2][rank or 0]["model"]
        assert all(torch.equal(v, want[k]) for k, v in loaded["model"].items())
    with pytest.raises(flashckpt.ConfigError, match="out of range"):
        flashckpt.load(storage, rank=2)


# -- a dead rank never hangs the others: torch.multiprocessing, no restarts ----------------------


def _dead_peer_worker(rank: int, init: str, storage: str, memory: str, result: str) -> None:
    torch.distributed.init_process_group(
        "gloo", init_method=init, rank=rank, world_size=2, timeout=timedelta(seconds=20)
    )
    opts = flashckpt.Options(coord_timeout_s=3.0)
    ckpt = flashckpt.Checkpointer(storage, memory_dir=f"{memory}/rank{rank}", options=opts, keep=None)
    state = make_state(seed=rank)
    assert ckpt.restore(state) is None
    handle = ckpt.save(0, state)
    assert handle is not None
    if rank == 1:
        os._exit(0)  # gone before persisting: rank 0 waits for its shard in vain
    outcomes = []
    for step in (1, 2, 3):  # training goes on; the first commit is given up on after the timeout
        try:
            handle.wait(timeout=60)
            outcomes.append(("committed", handle.durable_on()))
        except flashckpt.FlashCkptError as exc:
            outcomes.append((f"{type(exc).__name__}: {exc}", handle.durable_on()))
        if step < 3:
            handle = ckpt.save(step, state)
            assert handle is not None
    try:
        ckpt.restore(make_state(seed=rank))
        restore = "restored"
    except flashckpt.CoordinationError as exc:
        restore = f"CoordinationError: {exc}"
    Path(result).write_text(json.dumps({"saves": outcomes, "restore": restore}))
    ckpt.close(_raise=False)
    os._exit(0)


def test_a_dead_rank_fails_the_commit_and_the_restore_of_the_others_instead_of_hanging(
    tmp_path: Path, shm_dir: Path
) -> None:
    result = tmp_path / "result.json"
    init = f"file://{tmp_path / 'rendezvous'}"
    mp.start_processes(
        _dead_peer_worker,
        args=(init, str(tmp_path / "storage"), str(shm_dir), str(result)),
        nprocs=2,
        join=True,
        start_method="spawn",
    )
    got = json.loads(result.read_text())
    first, *later = got["saves"]
    assert first[0].startswith("WaitTimeout") and "commit" in first[0]
    # the later saves skip the storage tier at once instead of each waiting out the timeout;
    # the memory tier still has them
    for error, durable in later:
        assert error.startswith("CoordinationError") and "still waiting for a rank" in error, error
        assert durable == ["memory"]
    assert got["restore"].startswith("CoordinationError")
    commits = tmp_path / "storage" / "commits"
    assert not commits.exists() or not any(commits.iterdir())


def _late_peer_worker(rank: int, init: str, storage: str, memory: str, result: str) -> None:
    """Rank 1 stages step 0 only after rank 0 gave up on its commit and skipped step 1."""
    from torch.distributed.distributed_c10d import _get_default_store

    torch.distributed.init_process_group(
        "gloo", init_method=init, rank=rank, world_size=2, timeout=timedelta(seconds=60)
    )
    store = _get_default_store()
    opts = flashckpt.Options(coord_timeout_s=2.0)
    ckpt = flashckpt.Checkpointer(storage, memory_dir=f"{memory}/rank{rank}", options=opts, keep=None)
    state = make_state(seed=rank)
    outcomes = []

    def save(step: int) -> None:
        handle = ckpt.save(step, state)
        assert handle is not None
        try:
            handle.wait(timeout=60)
            outcomes.append("committed")
        except flashckpt.FlashCkptError as exc:
            outcomes.append(f"{type(exc).__name__}: {exc}")

    if rank == 0:
        save(0)  # rank 1 is late: the commit is given up on
        save(1)  # skipped at once: step 0 is still unresolved
        store.set("test/go", "1")
        store.wait(["test/rank1-saved-1"])
    else:
        store.wait(["test/go"])
        save(0)  # the last to arrive: commits step 0
        save(1)  # rank 0 skipped it: reported as not committed
        store.set("test/rank1-saved-1", "1")
    save(2)  # rank 0 sees step 0 resolved and writes the tier again
    Path(f"{result}{rank}").write_text(json.dumps(outcomes))
    ckpt.close()
    torch.distributed.destroy_process_group()
    _exit_before_finalization()


def test_a_late_rank_pauses_the_shared_tier_until_it_catches_up(tmp_path: Path, shm_dir: Path) -> None:
    result = tmp_path / "result"
    init = f"file://{tmp_path / 'rendezvous'}"
    args = (init, str(tmp_path / "storage"), str(shm_dir), str(result))
    mp.start_processes(_late_peer_worker, args=args, nprocs=2, join=True, start_method="spawn")
    got = [json.loads(Path(f"{result}{r}").read_text()) for r in range(2)]
    assert got[0][0].startswith("WaitTimeout"), got[0]
    assert got[0][1].startswith("CoordinationError") and "still waiting for a rank" in got[0][1], got[0]
    assert got[1][0] == "committed"
    assert got[1][1].startswith("CoordinationError") and "not committed" in got[1][1], got[1]
    assert got[0][2] == got[1][2] == "committed"
    assert _commits(tmp_path / "storage") == [0, 2]
    _verify_all(tmp_path / "storage", 2)


# -- a job whose main group is not gloo (NCCL on GPUs): control runs on a gloo group of its own ---


def _non_gloo_worker(rank: int, init: str, storage: str, memory: str, result: str) -> None:
    """The main group is torch's in-process ``fake`` backend (no GPU here for NCCL): it runs
    no communication, so every collective flashckpt needs must go over its own gloo group."""
    import torch.testing._internal.distributed.fake_pg  # registers the "fake" backend

    # a real store: with an init_method, the fake backend rendezvouses on a store of its own
    store = torch.distributed.FileStore(init, 2)
    torch.distributed.init_process_group("fake", store=store, rank=rank, world_size=2)
    assert torch.distributed.get_backend() == "fake"
    state = make_state(seed=rank)
    with flashckpt.Checkpointer(storage, memory_dir=f"{memory}/rank{rank}", keep=None) as ckpt:
        control = parts(ckpt).ctl._pg
        assert control is not torch.distributed.group.WORLD
        assert torch.distributed.get_backend(control) == "gloo"
        assert ckpt.restore(state) is None
        for step in range(3):
            ckpt.save(step, make_state(seed=10 * rank + step))
        ckpt.wait()
    # closed, while ``ckpt`` stays referenced: the gloo group it created is gone
    alive = weakref.ref(control)
    del control
    gc.collect()
    freed = alive() is None and len(torch.distributed.distributed_c10d._world.pg_map) == 1
    with flashckpt.Checkpointer(storage, memory_dir=f"{memory}/rank{rank}", keep=None) as ckpt:
        got = ckpt.restore(state)
    want = make_state(seed=10 * rank + 2)["model"].state_dict()  # type: ignore[attr-defined]
    same = all(torch.equal(v, want[k]) for k, v in state["model"].state_dict().items())  # type: ignore[attr-defined]
    Path(f"{result}{rank}").write_text(json.dumps({"step": got, "same": same, "control_freed": freed}))
    torch.distributed.destroy_process_group()
    _exit_before_finalization()


def test_a_job_whose_main_group_is_not_gloo_coordinates_over_its_own_gloo_group(
    tmp_path: Path, shm_dir: Path
) -> None:
    result, storage = tmp_path / "result", tmp_path / "storage"
    args = (str(tmp_path / "rendezvous"), str(storage), str(shm_dir), str(result))
    mp.start_processes(_non_gloo_worker, args=args, nprocs=2, join=True, start_method="spawn")
    got = [json.loads(Path(f"{result}{r}").read_text()) for r in range(2)]
    assert got == [{"step": 2, "same": True, "control_freed": True}] * 2
    assert _commits(storage) == [0, 1, 2]
    _verify_all(storage, 2)


# -- FSDP2 / DTensor state: local shards with their placement ------------------------------------


class _AppState:
    """The DCP idiom: a ``Stateful`` over ``get_state_dict`` / ``set_state_dict``."""

    def __init__(self, model: torch.nn.Module, optim: torch.optim.Optimizer) -> None:
        self.model, self.optim = model, optim

    def state_dict(self) -> dict[str, Any]:
        from torch.distributed.checkpoint.state_dict import get_state_dict

        msd, osd = get_state_dict(self.model, self.optim)
        return {"model": msd, "optim": osd}

    def load_state_dict(self, sd: dict[str, Any]) -> None:
        from torch.distributed.checkpoint.state_dict import set_state_dict

        set_state_dict(self.model, self.optim, model_state_dict=sd["model"], optim_state_dict=sd["optim"])


def _fsdp_state() -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh("cpu", (torch.distributed.get_world_size(),))
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 24), torch.nn.ReLU(), torch.nn.Linear(24, 6))
    for layer in model:
        if isinstance(layer, torch.nn.Linear):
            fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model, torch.optim.AdamW(model.parameters(), lr=1e-2)


def _fsdp_step(model: torch.nn.Module, optim: torch.optim.Optimizer, step: int) -> None:
    g = torch.Generator().manual_seed(100 * torch.distributed.get_rank() + step)
    model(torch.randn(4, 8, generator=g)).square().mean().backward()
    optim.step()
    optim.zero_grad()


def _local_copy(app: _AppState) -> dict[str, torch.Tensor]:
    from flashckpt.staging.statewalk import flatten

    flat = flatten({"app": app})
    return {p: t.clone() for p, t in zip(flat.paths, flat.tensors, strict=True)}


def _fsdp_worker(rank: int, world: int, init: str, storage: str, memory: str, result: str) -> None:
    torch.distributed.init_process_group(
        "gloo", init_method=init, rank=rank, world_size=world, timeout=timedelta(seconds=60)
    )
    model, optim = _fsdp_state()
    app = _AppState(model, optim)
    state = {"app": app, "extra": {"step": 0}}
    checks: dict[str, bool] = {}
    with flashckpt.Checkpointer(storage, memory_dir=f"{memory}/a{rank}", keep=None) as ckpt:
        for step in range(3):
            _fsdp_step(model, optim, step)
        state["extra"]["step"] = 2
        ckpt.save(2, state)
        ckpt.wait()
        saved = _local_copy(app)
        # the global tensors as FSDP itself assembles them (a collective): the test's yardstick
        sd = app.state_dict()
        full = {
            "model": {k: v.full_tensor() for k, v in sd["model"].items()},
            "optim": {
                fqn: {k: v.full_tensor() if hasattr(v, "full_tensor") else v for k, v in st.items()}
                for fqn, st in sd["optim"]["state"].items()
            },
        }
        if rank == 0:
            torch.save(full, f"{result}.full.pt")
        for step in range(3, 5):
            _fsdp_step(model, optim, step)
        uninterrupted = _local_copy(app)
        assert ckpt.restore(state) == 2
        checks["from_memory"] = ckpt.stats["restored"]["tier"] == "memory"
        now = _local_copy(app)
        checks["restored_bitwise"] = now.keys() == saved.keys() and all(
            torch.equal(now[k], saved[k]) for k in saved
        )
        for step in range(3, 5):
            _fsdp_step(model, optim, step)
        again = _local_copy(app)
        checks["continued_bitwise"] = all(torch.equal(again[k], uninterrupted[k]) for k in uninterrupted)
    # a new process's view: nothing in memory, the shard comes from storage
    model2, optim2 = _fsdp_state()
    app2 = _AppState(model2, optim2)
    with flashckpt.Checkpointer(storage, memory_dir=f"{memory}/b{rank}") as ckpt:
        assert ckpt.restore({"app": app2, "extra": {}}) == 2
        checks["from_storage"] = ckpt.stats["restored"]["tier"] == "storage"
        got = _local_copy(app2)
        checks["storage_bitwise"] = all(torch.equal(got[k], saved[k]) for k in saved)
    torch.distributed.barrier()
    Path(f"{result}.{rank}").write_text(json.dumps(checks))
    torch.distributed.destroy_process_group()
    _exit_before_finalization()


def test_fsdp2_state_saved_as_local_shards_restored_in_place_resharded_and_consolidated(
    tmp_path: Path, shm_dir: Path
) -> None:
    from flashckpt.format import DTensorRef, decode_manifest, manifest_key

    world = 4
    storage, result = tmp_path / "storage", tmp_path / "result"
    mp.start_processes(
        _fsdp_worker,
        args=(world, f"file://{tmp_path / 'rendezvous'}", str(storage), str(shm_dir), str(result)),
        nprocs=world,
        join=True,
        start_method="spawn",
    )
    for r in range(world):
        checks = json.loads(Path(f"{result}.{r}").read_text())
        assert checks == dict.fromkeys(checks, True) and len(checks) == 5, (r, checks)
    # what rank 1 stored: its shard of the first layer's weight, rows 6..11 of 24
    m = decode_manifest((storage / manifest_key(2, 1, world)).read_bytes())
    refs: list[DTensorRef] = []

    def collect(node: Any) -> None:
        if isinstance(node, DTensorRef):
            refs.append(node)
        elif isinstance(node, dict):
            for v in node.values():
                collect(v)
        elif isinstance(node, (list, tuple)):
            for v in node:
                collect(v)
        elif hasattr(node, "state"):
            collect(node.state)

    collect(m.state_tree())
    weight = [r for r in refs if r.shape == (24, 8)]
    assert weight and all(r.placements == ("S0",) and r.mesh == (4,) and r.offset == (6, 0) for r in weight)
    assert all(m.tensors[r.index].shape == (6, 8) for r in weight)

    # offline: whole tensors, assembled from the 4 shards, equal to what FSDP assembles
    whole = flashckpt.load(storage)["app"]
    full = torch.load(f"{result}.full.pt", weights_only=False)
    assert whole["model"].keys() == full["model"].keys()
    assert all(torch.equal(whole["model"][k], v) for k, v in full["model"].items())
    for fqn, st in full["optim"].items():
        for k, v in st.items():
            assert torch.equal(torch.as_tensor(whole["optim"]["state"][fqn][k]), torch.as_tensor(v)), (fqn, k)
    torch.save(whole, tmp_path / "whole.pt")
    # and by the command line: one safetensors file, and a Hugging Face directory of shards
    from safetensors.torch import load_file

    from flashckpt.cli import main

    assert (
        main(["restore", str(storage), "--only", "app.model", "--out", str(tmp_path / "m.safetensors")]) == 0
    )
    exported = load_file(tmp_path / "m.safetensors")
    assert exported.keys() == full["model"].keys()
    assert all(torch.equal(exported[k], v) for k, v in full["model"].items())
    hf = tmp_path / "hf"
    assert (
        main(["restore", str(storage), "--only", "app.model", "--out", str(hf), "--max-shard-size", "1KB"])
        == 0
    )
    index = json.loads((hf / "model.safetensors.index.json").read_text())
    files = set(index["weight_map"].values())
    assert len(files) > 1
    merged = {k: v for f in files for k, v in load_file(hf / f).items()}
    assert merged.keys() == full["model"].keys()
    assert all(torch.equal(merged[k], v) for k, v in full["model"].items())

    # the same step restored by a job of 2 ranks: resharded from storage
    mp.start_processes(
        _reshard_worker,
        args=(2, f"file://{tmp_path / 'rendezvous2'}", str(storage), str(shm_dir), str(tmp_path)),
        nprocs=2,
        join=True,
        start_method="spawn",
    )
    for r in range(2):
        checks = json.loads((tmp_path / f"reshard.{r}").read_text())
        assert checks == {"step": 2, "tier": "storage", "resharded": True, "model": True, "optim": True}, (
            checks
        )
    assert not shm_dir.exists() or not any(p.is_file() for p in shm_dir.rglob("*"))


def _reshard_worker(rank: int, world: int, init: str, storage: str, memory: str, tmp: str) -> None:
    from torch.distributed.checkpoint.state_dict import get_state_dict

    torch.distributed.init_process_group(
        "gloo", init_method=init, rank=rank, world_size=world, timeout=timedelta(seconds=60)
    )
    model, optim = _fsdp_state()
    _fsdp_step(model, optim, 99)  # state unlike the saved one, optimizer moments in place
    with flashckpt.Checkpointer(storage, memory_dir=f"{memory}/c{rank}") as ckpt:
        step = ckpt.restore({"app": _AppState(model, optim), "extra": {}})
        info = ckpt.stats["restored"]
    whole = torch.load(Path(tmp) / "whole.pt", weights_only=False)
    msd, osd = get_state_dict(model, optim)
    full = {k: v.full_tensor() for k, v in msd.items()}  # a collective: every rank
    model_ok = full.keys() == whole["model"].keys() and all(
        torch.equal(full[k], whole["model"][k]) for k in full
    )
    optim_ok = True
    for fqn, st in osd["state"].items():
        for k, v in st.items():
            got = v.full_tensor() if hasattr(v, "full_tensor") else v
            optim_ok = optim_ok and torch.equal(
                torch.as_tensor(got), torch.as_tensor(whole["optim"]["state"][fqn][k])
            )
    checks = {
        "step": step,
        "tier": info["tier"],
        "resharded": info["resharded"],
        "model": model_ok,
        "optim": optim_ok,
    }
    (Path(tmp) / f"reshard.{rank}").write_text(json.dumps(checks))
    torch.distributed.destroy_process_group()
    _exit_before_finalization()


# -- deduplicated saves of replicated (DDP) state -------------------------------------------------


class _Wide(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.layers = torch.nn.ModuleList(torch.nn.Linear(512, 512, bias=False) for _ in range(8))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = torch.tanh(layer(x))
        return x


def _ddp_worker(rank: int, world: int, init: str, storage: str, memory: str, result: str) -> None:
    torch.distributed.init_process_group(
        "gloo", init_method=init, rank=rank, world_size=world, timeout=timedelta(seconds=60)
    )
    torch.manual_seed(0)
    model = torch.nn.parallel.DistributedDataParallel(_Wide())
    optim = torch.optim.AdamW(model.parameters(), lr=1e-3)
    for step in range(2):
        g = torch.Generator().manual_seed(10 * rank + step)
        model(torch.randn(4, 512, generator=g)).square().mean().backward()
        optim.step()
        optim.zero_grad()
    # replicated model and optimizer, plus a per-rank part (as a data loader's position)
    state = {"model": model.module, "optim": optim, "rank_local": torch.full((64,), float(rank))}
    out: dict[str, Any] = {}
    for dedup in (False, True):
        opts = flashckpt.Options(dedup_replicated=dedup)
        where = f"{storage}-{'dedup' if dedup else 'plain'}"
        with flashckpt.Checkpointer(where, memory_dir=f"{memory}/{dedup}{rank}", options=opts) as ckpt:
            handle = ckpt.save(2, state)
            assert handle is not None
            handle.wait()
            out[str(dedup)] = ckpt.stats["written_bytes"]["storage"]
        restored = {
            "model": _Wide(),
            "optim": torch.optim.AdamW(_Wide().parameters(), lr=1e-3),
            "rank_local": torch.zeros(64),
        }
        with flashckpt.Checkpointer(where, memory_dir=f"{memory}/r{dedup}{rank}") as ckpt:
            assert ckpt.restore(restored) == 2
            ok = torch.equal(restored["rank_local"], state["rank_local"])
            want = model.module.state_dict()
            ok = ok and all(torch.equal(v, want[k]) for k, v in restored["model"].state_dict().items())
            out[f"restored_{dedup}"] = ok
    out["state_bytes"] = sum(t.numel() * t.element_size() for t in _flat_tensors(state))
    Path(f"{result}.{rank}").write_text(json.dumps(out))
    torch.distributed.destroy_process_group()
    _exit_before_finalization()


def _flat_tensors(state: Any) -> list[torch.Tensor]:
    from flashckpt.staging.statewalk import flatten

    return flatten(state).tensors


def test_deduplicated_ddp_saves_write_each_replicated_byte_once(tmp_path: Path, shm_dir: Path) -> None:
    world = 4
    storage, result = tmp_path / "storage", tmp_path / "result"
    mp.start_processes(
        _ddp_worker,
        args=(world, f"file://{tmp_path / 'rendezvous'}", str(storage), str(shm_dir), str(result)),
        nprocs=world,
        join=True,
        start_method="spawn",
    )
    got = [json.loads(Path(f"{result}.{r}").read_text()) for r in range(world)]
    assert all(g["restored_False"] and g["restored_True"] for g in got)
    state_bytes = got[0]["state_bytes"]  # 24 MiB: 8 weights of 1 MiB and their 2 Adam moments
    plain = [g["False"] for g in got]
    dedup = [g["True"] for g in got]
    assert all(p >= state_bytes for p in plain)  # every rank wrote everything
    # with deduplication the ranks wrote the replicated bytes once between them, spread evenly
    # (24 chunks of 1 MiB over 4 ranks), plus each rank its own small packed chunk
    assert sum(dedup) <= state_bytes * 1.02
    assert max(dedup) <= state_bytes / world * 1.1
    # the same objects back both checkpoints (content-addressed): dedup saved writes, not space
    chunks = {
        p: sorted(q.name for q in (Path(f"{storage}-{p}") / "chunks").rglob("*.*"))
        for p in ("plain", "dedup")
    }
    assert chunks["plain"] == chunks["dedup"]


def _gc_window_worker(rank: int, world: int, init: str, storage: str, memory: str, result: str) -> None:
    """Rank 0 commits step 0 (its manifest write is slowed, so it arrives last) and collects
    the shared tier's chunks, its chunk listings slowed by a second; rank 1 writes step 1's
    first chunk as soon as it may, then holds its manifest back for two seconds."""
    import time

    from flashckpt import _hooks as hooks
    from flashckpt.backends import Fault, FaultPlan, FaultyBackend, LocalBackend

    torch.distributed.init_process_group(
        "gloo", init_method=init, rank=rank, world_size=world, timeout=timedelta(seconds=60)
    )
    be: Any = storage
    if rank == 0:
        slow = [
            Fault(op="put", key_contains="steps/000000000000/r00000", times=1, error=None, delay_s=1.0),
            Fault(op="list", key_contains="chunks/", times=None, error=None, delay_s=1.0),
        ]
        be = FaultyBackend(LocalBackend(storage), FaultPlan(slow))
    else:
        held = []

        def hold(*, step: int, **_: Any) -> None:
            if step == 1 and not held:
                held.append(step)
                time.sleep(2.0)

        hooks.on("persist.chunk", hold)
    opts = flashckpt.Options(gc_grace_s=0.0, chunk_bytes=1 << 16, small_tensor_bytes=1 << 16)
    state = make_state(seed=rank)
    out: dict[str, Any] = {}
    with flashckpt.Checkpointer(be, memory_dir=f"{memory}/{rank}", keep=1, options=opts) as ckpt:
        ckpt.save(0, state)
        for t in state["model"].parameters():
            t.data.add_(1.0)  # step 1's chunks are new: the GC could take them
        ckpt.save(1, state)
        try:
            ckpt.wait()
            out["wait"] = "ok"
        except flashckpt.FlashCkptError as exc:
            out["wait"] = f"{type(exc).__name__}: {exc}"
    back = make_state(seed=99)
    with flashckpt.Checkpointer(storage, memory_dir=f"{memory}/back{rank}", options=opts) as ckpt:
        out["restored"] = ckpt.restore(back)
    want = state["model"].state_dict()
    out["equal"] = all(torch.equal(v, want[k]) for k, v in back["model"].state_dict().items())
    Path(f"{result}.{rank}").write_text(json.dumps(out))
    torch.distributed.destroy_process_group()
    _exit_before_finalization()


def test_the_shared_chunk_gc_never_runs_while_ranks_write_the_next_step(
    tmp_path: Path, shm_dir: Path
) -> None:
    """The committer of a step collects the shared tier's unreferenced chunks inside the
    commit window, while every other rank waits for the outcome: once the outcome is out,
    ranks write the next step's chunks before its manifest names them, and a collection then
    would delete them (the next commit is refused: its chunks are gone).  With no grace
    period, the window is what protects them."""
    world = 2
    storage, result = tmp_path / "storage", tmp_path / "result"
    mp.start_processes(
        _gc_window_worker,
        args=(world, f"file://{tmp_path / 'rendezvous'}", str(storage), str(shm_dir), str(result)),
        nprocs=world,
        join=True,
        start_method="spawn",
    )
    got = [json.loads(Path(f"{result}.{r}").read_text()) for r in range(world)]
    assert [g["wait"] for g in got] == ["ok", "ok"], got
    assert [(g["restored"], g["equal"]) for g in got] == [(1, True), (1, True)], got


# -- peer mirrors: lose a node, resume without storage --------------------------------------------


def _two_nodes(
    out: Path, storage: Path, memory: Path, *extra: str, steps: int, expect_ok: bool = True
) -> None:
    """Two torchrun agents on localhost (``--nnodes=2``, static rendezvous), 2 ranks each;
    ranks 2k and 2k+1 are node k (their own FLASHCKPT_NODE_ID and memory directory)."""
    out.mkdir(parents=True, exist_ok=True)
    port = _free_port()
    procs = []
    for node in (0, 1):
        launcher = [
            "--nnodes=2",
            f"--node-rank={node}",
            "--nproc-per-node=2",
            "--master-addr=127.0.0.1",
            f"--master-port={port}",
            "--max-restarts=0",
            "--monitor-interval=0.2",
        ]
        cmd = _job_cmd(launcher, out, storage, memory, steps, extra)
        procs.append(
            subprocess.Popen(
                cmd, cwd=ROOT, env=_job_env(out), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
            )
        )
    logs = [p.communicate(timeout=300)[0] for p in procs]
    if expect_ok:
        assert all(p.returncode == 0 for p in procs), "\n".join(x[-4000:] for x in logs)


def test_a_lost_node_resumes_from_its_peers_memory_with_storage_gone(
    reference: Reference, tmp_path: Path, shm_dir: Path
) -> None:
    out, storage, local = tmp_path / "out", tmp_path / "storage", tmp_path / "local"
    # train 6 of 8 steps with one mirror per snapshot, then the whole job dies
    _two_nodes(out, storage, shm_dir, "--localdisk", str(local), "--die-at-end", steps=6, expect_ok=False)
    assert {json.loads((out / f"attempt0-rank{r}.json").read_text())["start"] for r in range(4)} == {None}
    held = sorted(p.relative_to(shm_dir).parts[0:4] for p in shm_dir.rglob("mirrors/*/step-*.manifest"))
    # node0 holds node1's shards and the other way round
    assert {(h[0], h[3]) for h in held} == {
        ("node0", "r00002-of-00004"),
        ("node0", "r00003-of-00004"),
        ("node1", "r00000-of-00004"),
        ("node1", "r00001-of-00004"),
    }
    # node1 is lost with its memory; every local disk and the whole storage tier are gone too
    for gone in (shm_dir / "node1", local, storage):
        shutil.rmtree(gone)
    # a fresh node1 joins; the job goes on to step 8
    _two_nodes(out, storage, shm_dir, "--localdisk", str(local), steps=STEPS)
    restored = _restored(out, 0, 4)
    assert [r["start"] for r in restored] == [5, 5, 5, 5]
    assert [r["restored"]["tier"] for r in restored] == ["memory", "memory", "mirror", "mirror"]
    _assert_same(reference.finals[4], _finals(out, 4))
    # the resumed steps are committed again, and a clean run leaves no memory or mirror behind
    assert _commits(storage)[-1] == STEPS - 1
    assert not any(p.is_file() for p in shm_dir.rglob("*")), sorted(shm_dir.rglob("*"))


def test_a_damaged_copy_in_a_peers_memory_is_refused_after_it_filled_the_state_and_the_job_resumes_older(
    reference: Reference, tmp_path: Path, shm_dir: Path
) -> None:
    """A restore from a peer's copy fills the state while it verifies the bytes (one pass over
    memory); a chunk damaged in the peer's memory (the transport authenticates what the peer
    sends, not what it should hold) fails its checksum after part of it was written to the
    state.  That rank has no other copy of step 5, so every rank goes back to step 4 (committed),
    which overwrites every tensor again: the resumed run ends bitwise where the reference does."""
    out, storage = tmp_path / "out", tmp_path / "storage"
    _two_nodes(out, storage, shm_dir, "--persist-every", "4", "--die-at-end", steps=6, expect_ok=False)
    assert _commits(storage) == [0, 4]
    [path] = shm_dir.glob(f"node0/*/mirrors/r00002-of-00004/{memory_manifest_key(5)}")
    m = decode_manifest(path.read_bytes(), "copy", allow_unsealed=True)
    big = max(m.chunks, key=lambda c: c.nbytes)
    with open(path.parent / check_memory_manifest(m, "copy"), "r+b") as f:
        f.seek(big.offset + big.nbytes // 2)
        byte = f.read(1)
        f.seek(big.offset + big.nbytes // 2)
        f.write(bytes([byte[0] ^ 0x40]))
    shutil.rmtree(shm_dir / "node1")  # lost with its memory
    _two_nodes(out, storage, shm_dir, "--persist-every", "4", steps=STEPS)
    restored = _restored(out, 0, 4)
    assert [r["start"] for r in restored] == [4, 4, 4, 4]
    _assert_same(reference.finals[4], _finals(out, 4))


def test_a_lost_node_whose_replicated_state_was_mirrored_once_resumes_bitwise_from_the_parts(
    tmp_path: Path, shm_dir: Path
) -> None:
    """Replicated state staged once per node is mirrored once per node too: each rank sends
    its peer the chunks it holds, and a copy names the node-mate whose copy holds the rest.
    After node1 is lost, ``salvage`` on node0 writes and commits step 5 (memory only) from the
    copies and their parts; a restart resumes ranks 2-3 from their copies (each fetches the
    parts its node-mate's copy holds, on another peer), every byte verified."""
    out, storage = tmp_path / "out", tmp_path / "storage"
    split = ("--model", "campaign", "--dedup", "--chunk-bytes", "65536", "--persist-every", "4")
    _two_nodes(out, storage, shm_dir, *split, "--die-at-end", "--dump-at-death", steps=6, expect_ok=False)
    assert _commits(storage) == [0, 4]
    held = shm_dir.glob(f"node0/*/mirrors/*/{memory_manifest_key(5)}")
    copies = {p.parent.name: decode_manifest(p.read_bytes(), "m") for p in held}
    assert sorted(copies) == ["r00002-of-00004", "r00003-of-00004"], sorted(copies)
    # each copy leaves chunks to the other's: node1's replicated state crossed over once
    assert [sorted(part_holders(m)) for _, m in sorted(copies.items())] == [
        ["r00003-of-00004"],
        ["r00002-of-00004"],
    ]
    sent = sum(c.nbytes for m in copies.values() for c in carried(m))
    assert sent < 1.5 * copies["r00002-of-00004"].total_bytes, (sent, copies["r00002-of-00004"].total_bytes)
    shutil.rmtree(shm_dir / "node1")  # lost with its memory
    # the operator salvages a copy of node0's memory (the job below restarts from the original)
    shutil.copytree(shm_dir / "node0", shm_dir / "salvaged", symlinks=True)
    report = _salvage(storage, shm_dir / "salvaged")
    assert [(s["step"], s["committed"], s["missing"]) for s in report["steps"]] == [(5, True, [])], report
    assert sorted(report["steps"][0]["written"]) == [0, 1, 2, 3]
    _verify_all(storage, 4)  # every chunk of step 5 matches the checksums its ranks sealed
    shutil.rmtree(shm_dir / "salvaged")
    _two_nodes(out, storage, shm_dir, *split, steps=6)
    restored = _restored(out, 0, 4)
    assert [r["start"] for r in restored] == [5, 5, 5, 5]
    assert [r["restored"]["tier"] for r in restored] == ["memory", "memory", "mirror", "mirror"]
    died = [torch.load(out / f"died-rank{r}.pt", weights_only=False) for r in range(4)]
    finals = _finals(out, 4)
    _assert_same(died, finals)
    for a, b in zip(died, finals, strict=True):
        assert all(torch.equal(v, b["bufs"][k]) for k, v in a["bufs"].items())


def test_ranks_renumbered_across_nodes_restore_from_the_memory_their_shards_left(
    reference: Reference, tmp_path: Path, shm_dir: Path
) -> None:
    """The new attempt puts ranks 0-1 on node1 and ranks 2-3 on node0: each shard's memory,
    and the mirrors its rank held, stay in a directory of the node it ran on, which no rank
    of the new attempt owns.  One rank there claims and serves it."""
    out, storage = tmp_path / "out", tmp_path / "storage"
    _two_nodes(out, storage, shm_dir, "--die-at-end", steps=6, expect_ok=False)
    # node1 is lost with its memory, and the storage tier is gone: node0's memory is all there is
    for gone in (shm_dir / "node1", storage):
        shutil.rmtree(gone)
    _two_nodes(out, storage, shm_dir, "--node-shift", "1", steps=STEPS)
    restored = _restored(out, 0, 4)
    assert [r["start"] for r in restored] == [5, 5, 5, 5]
    # ranks 0-1 (on the fresh node1) from the shards they left on node0, ranks 2-3 from the
    # mirrors node0's old ranks held for them: every one through a peer's memory
    assert [r["restored"]["tier"] for r in restored] == ["mirror"] * 4
    _assert_same(reference.finals[4], _finals(out, 4))
    assert _commits(storage)[-1] == STEPS - 1
    _verify_all(storage, 4)
    # the orphaned directories are dropped once their owners closed clean
    assert not any(p.is_file() for p in shm_dir.rglob("*")), sorted(shm_dir.rglob("*"))


# -- salvage: the steps only memory held, made durable by the operator -----------------------------


def _cli(cmd: str, storage: Path, memory: Path) -> Any:
    """``flashckpt CMD STORAGE --memory-dir MEMORY --json`` in its own process, as an operator
    runs it on a node."""
    argv = [sys.executable, "-m", "flashckpt.cli", cmd, str(storage), "--memory-dir", str(memory)]
    proc = subprocess.run(
        [*argv, "--json"], cwd=ROOT, env=_job_env(memory.parent), capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return json.loads(proc.stdout)


def _salvage(storage: Path, memory: Path) -> dict[str, Any]:
    return dict(_cli("salvage", storage, memory))


def test_salvage_on_the_surviving_node_commits_the_memory_only_step_of_a_lost_node(
    reference: Reference, tmp_path: Path, shm_dir: Path
) -> None:
    """A 2-node job persists every 4th step and dies (SIGKILL, every process) after step 5;
    node1 is lost with its memory.  Node0's memory holds its ranks' shards of step 5 and the
    mirrors of node1's: ``salvage`` there alone writes and commits step 5.  A restart on
    fresh nodes (every memory wiped) resumes from storage at step 5, bitwise."""
    out, storage = tmp_path / "out", tmp_path / "storage"
    _two_nodes(out, storage, shm_dir, "--persist-every", "4", "--die-at-end", steps=6, expect_ok=False)
    assert _commits(storage) == [0, 4]
    shutil.rmtree(shm_dir / "node1")
    # what the operator sees on node0: step 5 only in memory, node1's shards as mirrors
    rows = {r["step"]: r for r in _cli("ls", storage, shm_dir / "node0")}
    assert rows[5]["tiers"] == {"memory": [0, 1], "mirror": [2, 3]} and rows[5]["restore"]
    report = _salvage(storage, shm_dir / "node0")
    assert [(s["step"], s["committed"], s["missing"]) for s in report["steps"]] == [(5, True, [])]
    assert sorted(report["steps"][0]["written"]) == [0, 1, 2, 3]
    assert _commits(storage) == [0, 4, 5]
    _verify_all(storage, 4)
    assert _salvage(storage, shm_dir / "node0")["steps"] == []  # again: nothing left to do
    shutil.rmtree(shm_dir)
    _two_nodes(out, storage, shm_dir, steps=STEPS)
    restored = _restored(out, 0, 4)
    assert [r["start"] for r in restored] == [5] * 4
    assert [r["restored"]["tier"] for r in restored] == ["storage"] * 4
    _assert_same(reference.finals[4], _finals(out, 4))


def test_salvage_without_mirrors_is_run_on_each_node_and_the_last_one_commits(
    reference: Reference, tmp_path: Path, shm_dir: Path
) -> None:
    out, storage = tmp_path / "out", tmp_path / "storage"
    _two_nodes(
        out,
        storage,
        shm_dir,
        "--persist-every",
        "4",
        "--mirror",
        "0",
        "--die-at-end",
        steps=6,
        expect_ok=False,
    )
    first = _salvage(storage, shm_dir / "node1")["steps"]
    assert [(s["step"], sorted(s["written"]), s["missing"], s["committed"]) for s in first] == [
        (5, [2, 3], [0, 1], False)
    ]
    assert _commits(storage) == [0, 4]  # never committed without every shard
    last = _salvage(storage, shm_dir / "node0")["steps"]
    assert [(s["step"], sorted(s["written"]), s["present"], s["committed"]) for s in last] == [
        (5, [0, 1], [2, 3], True)
    ]
    shutil.rmtree(shm_dir)
    _two_nodes(out, storage, shm_dir, steps=STEPS)
    assert [r["start"] for r in _restored(out, 0, 4)] == [5] * 4
    _assert_same(reference.finals[4], _finals(out, 4))


# -- one rank's newest step is corrupt everywhere: every rank takes the older one -----------------


def _two_phase_worker(rank: int, phase: int, init: str, storage: str, memory: str, out: str) -> None:
    from tests.conftest import train_step

    torch.distributed.init_process_group(
        "gloo", init_method=f"{init}{phase}", rank=rank, world_size=2, timeout=timedelta(seconds=60)
    )
    state = make_state(seed=rank)
    ckpt = flashckpt.Checkpointer(storage, memory_dir=f"{memory}/m{rank}", keep=None)
    if phase == 0:
        for step in range(3):
            train_step(state, step)
            ckpt.save(step, state)
            if step == 1:
                torch.save(state["model"].state_dict(), f"{out}/step1-rank{rank}.pt")  # type: ignore[attr-defined]
        ckpt.wait()
        torch.distributed.barrier()
        os._exit(0)  # a crash: the memory tier stays
    got = ckpt.restore(state)
    want = torch.load(f"{out}/step1-rank{rank}.pt")
    same = all(torch.equal(v, want[k]) for k, v in state["model"].state_dict().items())  # type: ignore[attr-defined]
    Path(f"{out}/restored-rank{rank}.json").write_text(json.dumps({"step": got, "same": same}))
    ckpt.close()
    torch.distributed.destroy_process_group()
    _exit_before_finalization()


def test_a_step_corrupt_on_one_rank_everywhere_sends_every_rank_to_the_older_step(
    tmp_path: Path, shm_dir: Path
) -> None:
    from flashckpt.format import decode_manifest, manifest_key

    storage, init = tmp_path / "storage", f"file://{tmp_path / 'rdzv'}"
    args = (init, str(storage), str(shm_dir), str(tmp_path))
    mp.start_processes(_two_phase_worker, args=(0, *args), nprocs=2, join=True, start_method="spawn")
    # rank 1's step 2: one byte flipped in memory and in storage
    mem = shm_dir / "m1" / "r00001-of-00002"
    m = decode_manifest((mem / "step-000000000002.manifest").read_bytes(), allow_unsealed=True)
    c = m.chunks[0]
    with open(mem / c.key, "r+b") as f:
        f.seek(c.at)
        b = f.read(1)
        f.seek(c.at)
        f.write(bytes([b[0] ^ 1]))
    m = decode_manifest((storage / manifest_key(2, 1, 2)).read_bytes())
    chunk = storage / m.chunks[0].key
    data = bytearray(chunk.read_bytes())
    data[len(data) // 2] ^= 1
    chunk.write_bytes(bytes(data))
    mp.start_processes(_two_phase_worker, args=(1, *args), nprocs=2, join=True, start_method="spawn")
    got = [json.loads((tmp_path / f"restored-rank{r}.json").read_text()) for r in range(2)]
    assert got == [{"step": 1, "same": True}, {"step": 1, "same": True}]
