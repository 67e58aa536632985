"""One rank of a multi-rank training job for the distributed tests, run under ``torchrun``.

``python -m torch.distributed.run --nproc-per-node N -m tests.dist_worker --out DIR ...``

Each rank trains its own shard of a small model (a ``TinyNet`` seeded by its rank) with
gradients averaged over the gloo group, so the ranks are coupled exactly as in data- and
model-parallel jobs.  Ranks 2k and 2k+1 form simulated node k (``--node-shift`` renumbers:
node k+SHIFT): ``FLASHCKPT_NODE_ID`` and a memory directory per node.  Initialisation uses a
per-attempt ``PrefixStore`` (DESIGN.md).

``--kill-rank R --kill-step S --kill-at WHERE`` SIGKILLs rank R in attempt 0 while step S is
``stage`` (half copied into the slot), ``persist`` (a chunk of it being written to storage) or
``commit`` (whichever rank arrives last, about to write the commit record: R is ignored).
At the end every rank writes its final state to ``DIR/final-rank{R}.pt`` and what it restored
to ``DIR/attempt{A}-rank{R}.json``; in attempt 0 each rank appends every step whose ``save``
returned to ``DIR/staged-rank{R}``.

The crash campaign (``tests/crash_campaign.py``) uses more of it: ``--model campaign`` (a model
with tensors of several 64 KiB chunks, replicated across ranks like DDP, plus per-rank buffers),
the job's settings (``--persist-every``, ``--compression``, ``--dedup``) and ``--kill-plan JSON``,
a general kill: at the ``occurrence``-th firing of a hook ``point`` (optionally on one ``tier``,
counted from ``step`` on) in rank ``trigger`` (-1: any rank; the first to get there), SIGKILL the
``victim``: ``self``, ``node`` (the trigger's simulated node: its agent and both workers),
``peer`` (the rank that holds the trigger's mirror) or ``peer-node`` (that rank's node).  Other
processes are found by the environment variables the runner gives each agent
(``CRASHCAMP_TRIAL``, ``CRASHCAMP_NODE``); what was killed is written to ``DIR/killed.json``.
A killed rank never dies between the return of a ``save`` and the line in ``staged-rank{R}``
that records it: the training thread holds ``DIR/window-rank{R}`` (an ``flock``) from ``save``
until that line is written, and every killer takes it first (a SIGTERM arriving inside it is
acted on when it ends).  ``--keep-going``: a failure the library reports after training
(``wait``, ``close``) is written to ``DIR/errors-rank{R}.json`` instead of ending the rank, and
the final state is written all the same.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import json
import os
import signal
import threading
import time
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

import flashckpt
from flashckpt import _hooks as hooks
from tests.conftest import make_state


def _die() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


class _Window:
    """The span from a ``save`` until its step is written to ``staged-rank{R}``: an ``flock``
    on ``DIR/window-rank{R}``, held by the training thread.  A killer (a background thread of
    this process, or another rank killing this one) takes it first, so that the file never
    misses a step whose save had returned; if the training thread holds it for long, it is
    blocked inside ``save`` (waiting for a slot), where a kill is just as exact."""

    def __init__(self) -> None:
        self.fd = -1
        self.inside = False
        self.term = False  # a SIGTERM came inside the window: die when it ends

    def open(self, path: Path) -> None:
        self.fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)

    def __enter__(self) -> None:
        if self.fd >= 0:
            fcntl.flock(self.fd, fcntl.LOCK_EX)
        self.inside = True

    def __exit__(self, *exc: object) -> None:
        self.inside = False
        if self.fd >= 0:
            fcntl.flock(self.fd, fcntl.LOCK_UN)
        if self.term:
            _die()


_window = _Window()
_out: Path | None = None  # DIR


def _take_window(rank: int, timeout: float = 5.0) -> None:
    """Take rank ``rank``'s window (any process, any thread but that rank's training thread)
    and keep it until the process dies."""
    if _out is None:
        return
    fd = os.open(_out / f"window-rank{rank}", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    deadline = time.monotonic() + timeout
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return
        except BlockingIOError:
            if time.monotonic() > deadline:
                return  # blocked inside save: exact as well
            time.sleep(0.001)


def _on_sigterm(signum: int, frame: Any) -> None:
    """torchrun's agent (or the campaign's teardown) ends a rank: never inside the window."""
    if _window.inside:
        _window.term = True
    else:
        _die()


def _die_from_background() -> None:
    _take_window(int(os.environ["RANK"]))
    _die()


def _arm(where: str, step: int) -> None:
    """Make this process SIGKILL itself at ``where`` of ``step`` (the library's event seam)."""
    if where == "stage":

        def stage(index: int, count: int, **_: Any) -> None:
            if _current["step"] == step and index == count // 2:
                _die()  # half of the tensors are in the slot

        hooks.on("stage.tensor", stage)
    elif where == "persist":

        def chunk(step: int, tier: str, **_: Any) -> None:
            if tier == "storage" and step == kill_step:
                _die_from_background()  # a chunk of it is on storage, the rest is not

        kill_step = step
        hooks.on("persist.chunk", chunk)
    elif where == "commit":

        def commit(step: int, tier: str, **_: Any) -> None:
            if tier == "storage" and step == kill_step:
                _die_from_background()  # every shard is there, the record is not

        kill_step = step
        hooks.on("commit.record", commit)
    else:
        raise SystemExit(f"unknown --kill-at {where}")


# -- the campaign's kill plan ---------------------------------------------------------------------

#: Hook points a kill plan may name (flashckpt/_hooks.py).
PLAN_POINTS = (
    "stage.tensor",
    "persist.chunk",
    "persist.manifest",
    "mirror.piece",
    "commit.record",
    "commit.done",
    "retention.delete",
)


def _trial_processes(node: int | None = None) -> list[tuple[int, dict[str, str]]]:
    """(pid, environment) of this trial's processes (on simulated node ``node``), found by
    the variables the runner gave their agents."""
    trial = os.environ.get("CRASHCAMP_TRIAL")
    out = []
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            raw = Path(f"/proc/{d}/environ").read_bytes()
        except OSError:
            continue
        env = dict(kv.split("=", 1) for kv in raw.decode(errors="replace").split("\0") if "=" in kv)
        mine = bool(trial) and env.get("CRASHCAMP_TRIAL") == trial
        if mine and (node is None or env.get("CRASHCAMP_NODE") == str(node)):
            out.append((int(d), env))
    return out


def _claim_kill(record: dict[str, Any]) -> bool:
    """The first rank to get to a kill claims it (one kill per trial); records what it kills."""
    assert _out is not None
    try:
        fd = os.open(_out / "killed.claim", os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        return False
    os.close(fd)
    tmp = _out / f"killed.json.tmp-{os.getpid()}"
    tmp.write_text(json.dumps(record))
    os.replace(tmp, _out / "killed.json")
    return True


def _execute(plan: dict[str, Any], rank: int, world: int, info: dict[str, Any]) -> None:
    """SIGKILL the plan's victim; this process too if it is one of them."""
    victim = plan["victim"]
    per_node = 2
    peer = (rank + per_node) % world  # the rank holding this rank's mirror (the next node)
    me = os.getpid()
    if victim == "self":
        ranks, node = [rank], None
    elif victim == "peer":
        ranks, node = [peer], None
    elif victim == "node":
        node = rank // per_node
        ranks = list(range(node * per_node, node * per_node + per_node))
    elif victim == "peer-node":
        node = peer // per_node
        ranks = list(range(node * per_node, node * per_node + per_node))
    else:
        raise SystemExit(f"unknown victim {victim}")
    record = {
        "trigger": rank,
        "point": plan["point"],
        "info": {k: v for k, v in info.items() if isinstance(v, (int, str, float, type(None)))},
        "thread": threading.current_thread().name,
        "victim": victim,
        "ranks": ranks,
        "node": node,
        "time": time.time(),
    }
    if not _claim_kill(record):
        return
    procs = _trial_processes(node) if node is not None else _trial_processes()
    workers = {int(env["RANK"]): pid for pid, env in procs if "RANK" in env and "TORCHELASTIC_RUN_ID" in env}
    agents = [pid for pid, env in procs if "RANK" not in env] if node is not None else []
    for pid in agents:  # a node dies whole: its agent first, so it does not react
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    for r in ranks:
        pid = workers.get(r)
        if pid is None or pid == me:
            continue
        _take_window(r)
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    if rank in ranks:
        if threading.current_thread() is not threading.main_thread():
            _take_window(rank)
        _die()


def _arm_plan(plan: dict[str, Any], rank: int, world: int, storage: str) -> None:
    """Arm a kill plan (see the module docstring) on this rank."""
    point = plan["point"]
    if point not in PLAN_POINTS:
        raise SystemExit(f"unknown kill point {point}")
    if plan.get("trigger", -1) not in (-1, rank):
        return
    lock = threading.Lock()
    seen = [0]
    storage_url = f"file://{Path(storage).absolute()}"  # LocalBackend.url

    def tier_of(info: dict[str, Any]) -> str | None:
        tier = info.get("tier")
        if point == "retention.delete" and isinstance(tier, str):
            return "storage" if tier == storage_url else "local"
        return tier

    def fire(**info: Any) -> None:
        info.pop("point", None)
        step = _current["step"] if point == "stage.tensor" else info.get("step")
        if plan.get("tier") and tier_of(info) != plan["tier"]:
            return
        if point != "retention.delete" and (step is None or step < plan["step"]):
            return
        with lock:
            seen[0] += 1
            if seen[0] != plan["occurrence"]:
                return
        info["step"] = step
        info["occurrence"] = seen[0]
        _execute(plan, rank, world, info)

    hooks.on(point, fire)


_current: dict[str, int | None] = {"step": None}


# -- the campaign's model -------------------------------------------------------------------------


class CampaignNet(torch.nn.Module):
    """A small model whose large tensors span several 64 KiB chunks, none a whole number of
    them (400,000 and 240,000 bytes), with tied weights."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = torch.nn.Embedding(1000, 100)
        self.up = torch.nn.Linear(100, 600)
        self.down = torch.nn.Linear(600, 100)
        self.norm = torch.nn.LayerNorm(100)
        self.head = torch.nn.Linear(100, 1000, bias=False)
        self.head.weight = self.emb.weight

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        h = self.emb(idx)
        h = h + self.down(torch.relu(self.up(h)))
        return self.head(self.norm(h))


def campaign_state(rank: int) -> dict[str, Any]:
    """The model replicated on every rank (same seed, averaged gradients: DDP), so that
    replicated chunks exist for ``dedup_replicated``; per-rank buffers besides: a counter of
    which only a chunk or two change per step (unchanged chunks are referenced again), a
    frozen tensor, and a bfloat16 average (another byte group)."""
    torch.manual_seed(0)
    model = CampaignNet()
    optim = torch.optim.AdamW(model.parameters(), lr=1e-2)
    sched = torch.optim.lr_scheduler.StepLR(optim, step_size=3, gamma=0.5)
    g = torch.Generator().manual_seed(100 + rank)
    bufs = {
        "counts": torch.zeros(30000, dtype=torch.int64),
        "frozen": torch.rand(51200, generator=g),
        "ema": model.emb.weight.detach().to(torch.bfloat16).clone(),
    }
    return {"model": model, "optim": optim, "sched": sched, "bufs": bufs, "extra": {"epoch": 0, "seen": []}}


def train_step(state: dict[str, Any], step: int, rank: int) -> None:
    model, optim, sched = state["model"], state["optim"], state["sched"]
    g = torch.Generator().manual_seed(1000 * (rank + 1) + step)
    campaign = isinstance(model, CampaignNet)
    idx = torch.randint(0, 1000, (16,), generator=g) if campaign else torch.randint(0, 32, (8,), generator=g)
    loss = torch.nn.functional.cross_entropy(model(idx), idx)
    optim.zero_grad()
    loss.backward()
    for p in model.parameters():  # the coupling of a data-parallel job
        if p.grad is not None:
            dist.all_reduce(p.grad)
            p.grad /= dist.get_world_size()
    optim.step()
    sched.step()
    if campaign:
        bufs = state["bufs"]
        bufs["counts"].index_add_(0, idx * 29 % 30000, torch.ones(16, dtype=torch.int64))
        bufs["ema"].copy_((0.9 * bufs["ema"].float() + 0.1 * model.emb.weight.detach()).to(torch.bfloat16))
    state["extra"]["epoch"] = step // 4
    state["extra"]["seen"].append(step)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--storage", required=True)
    ap.add_argument("--memory", required=True, help="base; node k uses BASE/node{k}")
    ap.add_argument("--localdisk", help="base; node k uses BASE/node{k}")
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--keep", type=int, default=2, help="0: keep every step")
    ap.add_argument("--kill-rank", type=int, default=-1)
    ap.add_argument("--kill-step", type=int, default=-1)
    ap.add_argument("--kill-at", default="")
    ap.add_argument("--mirror", type=int, default=None)
    ap.add_argument("--die-at-end", action="store_true", help="SIGKILL every rank once all is durable")
    ap.add_argument("--dump-at-death", action="store_true", help="with --die-at-end: died-rank<r>.pt first")
    ap.add_argument("--node-shift", type=int, default=0, help="ranks 2k, 2k+1 run on node k+SHIFT")
    ap.add_argument("--model", choices=("tiny", "campaign"), default="tiny")
    ap.add_argument("--persist-every", type=int, default=1)
    ap.add_argument("--compression", default=None, help="the storage tier's: none, zstd")
    ap.add_argument("--dedup", action="store_true", help="Options.dedup_replicated")
    ap.add_argument("--chunk-bytes", type=int, default=None, help="also the small-tensor threshold")
    ap.add_argument("--coord-timeout", type=float, default=60.0)
    ap.add_argument("--kill-plan", default="", help="JSON: see the module docstring")
    ap.add_argument(
        "--keep-going",
        action="store_true",
        help="a save the library reports failed after training (wait, close) goes to errors-rank{R}.json; "
        "the final state is written all the same",
    )
    args = ap.parse_args()

    attempt = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"))
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    node = (rank // 2 + args.node_shift) % max(1, world // 2)
    os.environ["FLASHCKPT_NODE_ID"] = f"node{node}"
    dist.init_process_group(
        "gloo",
        store=dist.PrefixStore(f"attempt{attempt}", _agent_store()),
        rank=rank,
        world_size=world,
        timeout=timedelta(seconds=60),
    )
    global _out
    out = _out = Path(args.out)
    _window.open(out / f"window-rank{rank}")
    # the commit is written by whichever rank arrives last: arm them all, the committer dies
    if attempt == 0 and (rank == args.kill_rank or args.kill_at == "commit"):
        _arm(args.kill_at, args.kill_step)
    if attempt == 0 and args.kill_plan:
        _arm_plan(json.loads(args.kill_plan), rank, world, args.storage)

    state = campaign_state(rank) if args.model == "campaign" else make_state(seed=rank)
    local = None if args.localdisk is None else f"{args.localdisk}/node{node}"
    sizes: dict[str, Any] = {}
    if args.chunk_bytes is not None:  # tensors from one chunk up get chunks of their own
        sizes = {"chunk_bytes": args.chunk_bytes, "small_tensor_bytes": args.chunk_bytes}
    # preempt_grace_s: a rank torchrun SIGTERMs while it is blocked in a collective with a dead
    # rank (where no Python handler runs) is ended by the library's watcher after it
    opts = flashckpt.Options(
        coord_timeout_s=args.coord_timeout,
        gc_grace_s=0.0,
        dedup_replicated=args.dedup,
        preempt_grace_s=3.0,
        **sizes,
    )
    errors: list[str] = []  # --keep-going: failures the library reported after training
    trained = False
    try:
        with flashckpt.Checkpointer(
            args.storage,
            local_dir=local,
            memory_dir=f"{args.memory}/node{node}",
            keep=args.keep or None,
            mirror=args.mirror,
            persist_every=args.persist_every,
            compression=args.compression,
            options=opts,
        ) as ckpt:
            # Installed after the Checkpointer's own handler (which sees the signal first
            # otherwise, and whose watcher ends a process blocked in native code only where
            # the handler it replaced is the default one)
            signal.signal(signal.SIGTERM, _on_sigterm)
            start = ckpt.restore(state)
            info = {"start": start, "restored": ckpt.stats.get("restored")}
            (out / f"attempt{attempt}-rank{rank}.json").write_text(json.dumps(info))
            first = 0 if start is None else start + 1
            for step in range(first, args.steps):
                train_step(state, step, rank)
                _current["step"] = step
                with _window:
                    ckpt.save(step, state)
                    if attempt == 0:
                        with open(out / f"staged-rank{rank}", "a") as f:
                            f.write(f"{step}\n")
            trained = True
            try:
                ckpt.wait()
            except flashckpt.FlashCkptError as exc:
                if not args.keep_going:
                    raise
                errors.append(f"wait: {type(exc).__name__}: {exc}")
            if args.die_at_end:
                dist.barrier()  # every rank's saves (and mirrors) are done: now the job dies
                if args.dump_at_death:  # what a restore of the last step must bring back
                    died = {k: v.state_dict() if hasattr(v, "state_dict") else v for k, v in state.items()}
                    torch.save(died, out / f"died-rank{rank}.pt")
                _die()
    except flashckpt.FlashCkptError as exc:
        if not (args.keep_going and trained):
            raise
        errors.append(f"close: {type(exc).__name__}: {exc}")
    if errors:
        (out / f"errors-rank{rank}.json").write_text(json.dumps(errors))
    final = {k: v.state_dict() if hasattr(v, "state_dict") else v for k, v in state.items()}
    torch.save(final, out / f"final-rank{rank}.pt")
    dist.destroy_process_group()
    # Skip interpreter finalization: torch's gloo teardown race (see
    # tests/test_distributed.py::_exit_before_finalization) aborts about 1 run in 40.
    os._exit(0)


def _agent_store() -> dist.Store:
    """The torchrun agent's store (the TCPStore at MASTER_ADDR:MASTER_PORT), as a client."""
    return dist.TCPStore(
        os.environ["MASTER_ADDR"],
        int(os.environ["MASTER_PORT"]),
        is_master=False,
        timeout=timedelta(seconds=60),
        use_libuv=True,
    )


if __name__ == "__main__":
    main()
