"""Crash campaign: multi-rank torchrun jobs SIGKILLed at random points, restarted, checked.

``python -m tests.crash_campaign --trials 200 --seed S --out DIR`` runs the full campaign;
``python -m tests.crash_campaign --trial-seed T --out DIR`` reruns one trial (the one-line
reproduction printed for every failure).  Run it niced: it keeps both cores of this machine busy.

A trial is a job of 2 simulated nodes x 2 ranks (two ``torchrun`` agents on localhost, gloo,
``tests/dist_worker.py --model campaign``: tensors of several 64 KiB chunks).  From its seed
it draws

* what dies: one rank, or one whole node (its agent and both workers; the node's memory
  directory and local disk are deleted before the restart, as a replaced machine would have
  neither);
* where: a hook point of the library's event seam (``flashckpt/_hooks.py``) among staging
  (``stage.tensor``), persist (``persist.chunk``, ``persist.manifest``; local or storage tier),
  mirror push (``mirror.piece``; the victim is the sender or the peer receiving), commit
  (``commit.record``, ``commit.done``; local or storage) and retention (``retention.delete``;
  local or storage), and which occurrence (counted from a random step on: the k-th tensor,
  chunk or piece);
* the job's settings: ``keep`` in {1, 2, None}, ``persist_every`` in {1, 2}, the storage
  tier's compression (``none`` / ``zstd``), ``dedup_replicated``; mirrors are on (2 nodes:
  one peer copy), a local disk per node.

Attempt 0 runs until the kill; the job then fails as torchrun makes it fail, and whatever is
still running after a grace period is killed too (a scheduler tearing the job down).  With
every process gone, the runner computes what the restart must find from the evidence on
disk, not from the library's answer: for each rank, the snapshots a surviving copy can still
give (its own memory tier if its node survived, a mirror of it in a surviving node's memory,
its node's local disk if the node survived, committed steps on storage), each read with
``flashckpt.format``'s decoders and every chunk's bytes checked against its checksum (decoded
here, independently of the library's codec).  The expected restore is the newest snapshot, in
``(generation, step)`` order, that every rank can load.  The whole job is then restarted
(both agents) and must bring every rank back at exactly that step (``attempt0-rank{R}.json``)
and end, after training to the last step, bitwise equal to an uninterrupted run with the same
settings (one reference run per settings combination, cached).  "Steps lost" is the newest
step whose ``save`` had returned on every rank (``staged-rank{R}``) minus the restored step.
After the restarted run, every committed step on storage must load for every rank and the
memory tier must be empty (a clean run leaves nothing in /dev/shm).

Output in ``DIR``: ``trials.jsonl`` (one line per trial, appended as trials finish),
``summary.json`` and ``summary.md`` (the table), ``failures/<seed>/`` (logs and evidence of
each failed trial).  Each trial's processes carry ``CRASHCAMP_TRIAL`` in their environment;
the runner kills every one left and removes its directories (in /tmp and /dev/shm).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import hashlib
import json
import os
import random
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import xxhash
import zstandard

ROOT = Path(__file__).resolve().parent.parent
STEPS = 8
WORLD = 4
PER_NODE = 2
NODES = WORLD // PER_NODE
CHUNK = 64 << 10
GROUPS = ("stage", "persist", "mirror", "commit", "retention")
Order = tuple[int, int]


# -- what a trial does -----------------------------------------------------------------------------


@dataclass(frozen=True)
class Settings:
    """The job's settings that matter to a crash."""

    keep: int | None
    persist_every: int
    compression: str  # of the storage tier: "none" or "zstd"
    dedup: bool

    @property
    def key(self) -> str:
        dedup = "dedup" if self.dedup else "plain"
        return f"keep{self.keep or 'all'}-pe{self.persist_every}-{self.compression}-{dedup}"

    def worker_args(self) -> list[str]:
        return [
            "--model",
            "campaign",
            "--chunk-bytes",
            str(CHUNK),
            "--keep",
            str(self.keep or 0),
            "--persist-every",
            str(self.persist_every),
            "--compression",
            self.compression,
            *(["--dedup"] if self.dedup else []),
            "--keep-going",
        ]


@dataclass(frozen=True)
class Plan:
    """One trial, drawn from its seed."""

    seed: int
    kind: str  # "rank" or "node"
    group: str  # one of GROUPS
    point: str  # the hook point
    tier: str | None  # "local" / "storage", for points that name one
    step: int  # counted from this step on
    occurrence: int  # the k-th firing
    trigger: int  # the rank whose hook fires (-1: whichever rank gets there first)
    victim: str  # "self", "node", "peer", "peer-node" (see tests/dist_worker.py)
    settings: Settings

    def kill_plan(self) -> dict[str, Any]:
        return {
            "point": self.point,
            "tier": self.tier,
            "step": self.step,
            "occurrence": self.occurrence,
            "trigger": self.trigger,
            "victim": self.victim,
        }

    def to_json(self) -> str:
        body = dataclasses.asdict(self)
        del body["seed"]
        return json.dumps(body)

    @staticmethod
    def from_json(seed: int, text: str) -> Plan:
        body = json.loads(text)
        body["settings"] = Settings(**body["settings"])
        return Plan(seed=seed, **body)

    def describe(self) -> str:
        tier = f"/{self.tier}" if self.tier else ""
        who = "any rank" if self.trigger < 0 else f"rank {self.trigger}"
        return (
            f"{self.kind} kill ({self.victim}) at {self.point}{tier} #{self.occurrence} from step "
            f"{self.step} in {who}; {self.settings.key}"
        )


def draw(seed: int) -> Plan:
    """The trial of ``seed``: every choice comes from this one generator."""
    rng = random.Random(seed)
    kind = rng.choice(("rank", "node"))
    group = rng.choice(GROUPS)
    keep = rng.choice((1, 2)) if group == "retention" else rng.choice((1, 2, None))
    settings = Settings(
        keep=keep,
        persist_every=rng.choice((1, 2)),
        compression=rng.choice(("none", "zstd")),
        dedup=rng.choice((False, True)),
    )
    step = rng.randint(1, STEPS - 2)
    trigger = rng.randrange(WORLD)
    tier: str | None = None
    victim = "self" if kind == "rank" else "node"
    if group == "stage":
        point, occurrence = "stage.tensor", rng.randint(1, 30)
    elif group == "persist":
        point = rng.choice(("persist.chunk", "persist.chunk", "persist.chunk", "persist.manifest"))
        tier = rng.choice(("local", "storage"))
        occurrence = rng.randint(1, 45) if point == "persist.chunk" else 1
    elif group == "mirror":
        point, occurrence = "mirror.piece", rng.randint(1, 55)
        if rng.random() < 0.5:  # the peer receiving the push dies instead of the sender
            victim = "peer" if kind == "rank" else "peer-node"
    elif group == "commit":
        point = rng.choice(("commit.record", "commit.done"))
        tier = rng.choice(("local", "storage"))
        occurrence = 1
        if tier == "storage":
            trigger = -1  # the storage commit is written by whichever rank arrives last
    else:
        point = "retention.delete"
        tier = rng.choice(("local", "storage"))
        commits = STEPS if settings.persist_every == 1 else (STEPS + 1) // 2 + 1
        occurrence = rng.randint(1, max(1, commits - (keep or 0) - 1))
        step = 0
        if tier == "storage":
            trigger = 0  # the shared tier's retention is rank 0's
    return Plan(seed, kind, group, point, tier, step, occurrence, trigger, victim, settings)


# -- processes ----------------------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def trial_processes(tag: str) -> list[tuple[int, dict[str, str]]]:
    """Live processes whose environment carries ``CRASHCAMP_TRIAL=tag`` (agents and workers;
    torchrun starts workers in sessions of their own, so process groups do not find them)."""
    out = []
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            raw = Path(f"/proc/{d}/environ").read_bytes()
        except OSError:
            continue
        if f"CRASHCAMP_TRIAL={tag}\0".encode() not in raw + b"\0":
            continue
        env = dict(kv.split("=", 1) for kv in raw.decode(errors="replace").split("\0") if "=" in kv)
        if env.get("CRASHCAMP_TRIAL") == tag:
            out.append((int(d), env))
    return out


def kill_all(tag: str, agents: list[subprocess.Popen[bytes]], term_grace: float = 5.0) -> None:
    """End every process of the trial: SIGTERM the workers (a worker never dies between a
    save's return and its record), SIGKILL whatever is left after ``term_grace``."""
    for pid, env in trial_processes(tag):
        if "RANK" in env:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + term_grace
    while time.monotonic() < deadline and any("RANK" in env for _, env in trial_processes(tag)):
        time.sleep(0.05)
    for _ in range(200):
        left = trial_processes(tag)
        if not left:
            break
        for pid, _env in left:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        for a in agents:
            with contextlib.suppress(subprocess.TimeoutExpired):
                a.wait(timeout=0.05)
        time.sleep(0.05)
    for a in agents:
        with contextlib.suppress(subprocess.TimeoutExpired):
            a.wait(timeout=10)
    left = trial_processes(tag)
    if left:
        raise RuntimeError(f"processes of trial {tag} survive SIGKILL: {[p for p, _ in left]}")


@dataclass
class Dirs:
    base: Path  # everything on disk, removed at the end
    memory: Path  # on /dev/shm, removed at the end
    tag: str

    @property
    def storage(self) -> Path:
        return self.base / "storage"

    @property
    def local(self) -> Path:
        return self.base / "local"

    def out(self, attempt: int) -> Path:
        return self.base / f"out{attempt}"

    def remove(self) -> None:
        shutil.rmtree(self.base, ignore_errors=True)
        shutil.rmtree(self.memory, ignore_errors=True)

    @staticmethod
    def make(work: Path, name: str) -> Dirs:
        tag = f"{os.getpid()}-{name}"
        base = work / name
        shutil.rmtree(base, ignore_errors=True)
        base.mkdir(parents=True)
        shm = Path("/dev/shm") if Path("/dev/shm").is_dir() else Path(tempfile.gettempdir())
        memory = shm / f"flashckpt-crashcamp-{tag}"
        shutil.rmtree(memory, ignore_errors=True)
        return Dirs(base, memory, tag)


def launch(
    dirs: Dirs, attempt: int, settings: Settings, kill: dict[str, Any] | None
) -> list[subprocess.Popen[bytes]]:
    """Start the job: one torchrun agent per simulated node (2 ranks each)."""
    out = dirs.out(attempt)
    out.mkdir(parents=True, exist_ok=True)
    port = _free_port()
    worker = [
        "--out",
        str(out),
        "--storage",
        str(dirs.storage),
        "--memory",
        str(dirs.memory),
        "--localdisk",
        str(dirs.local),
        "--steps",
        str(STEPS),
        *settings.worker_args(),
        *(["--kill-plan", json.dumps(kill)] if kill else []),
    ]
    agents = []
    for node in range(NODES):
        env = {
            **os.environ,
            "OMP_NUM_THREADS": "1",
            "PYTHONPATH": str(ROOT),
            "FLASHCKPT_MIRROR_HOST": "127.0.0.1",
            "TMPDIR": str(out),  # torchrun's log directories and error files
            "CRASHCAMP_TRIAL": dirs.tag,
            "CRASHCAMP_NODE": str(node),
        }
        cmd = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            f"--nnodes={NODES}",
            f"--node-rank={node}",
            f"--nproc-per-node={PER_NODE}",
            "--master-addr=127.0.0.1",
            f"--master-port={port}",
            "--max-restarts=0",
            "--monitor-interval=0.2",
            "-m",
            "tests.dist_worker",
            *worker,
        ]
        log = open(out / f"agent{node}.log", "wb")  # noqa: SIM115 (closed after the child has it)
        try:
            agents.append(
                subprocess.Popen(
                    cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
                )
            )
        finally:
            log.close()
    return agents


def wait_agents(agents: list[subprocess.Popen[bytes]], deadline: float, stop: Path | None = None) -> str:
    """Wait until every agent has exited ("exited"), ``stop`` exists ("stop"), or the
    deadline ("timeout")."""
    while True:
        if stop is not None and stop.exists():
            return "stop"
        if all(a.poll() is not None for a in agents):
            return "exited"
        if time.monotonic() > deadline:
            return "timeout"
        time.sleep(0.05)


def run_clean(dirs: Dirs, attempt: int, settings: Settings, timeout: float) -> tuple[bool, str]:
    """Run the job to its end; (every agent exited 0, why not)."""
    agents = launch(dirs, attempt, settings, None)
    try:
        how = wait_agents(agents, time.monotonic() + timeout)
    finally:
        kill_all(dirs.tag, agents)
    if how == "timeout":
        return False, f"attempt {attempt} did not finish within {timeout:.0f} s (a hang)"
    codes = [a.returncode for a in agents]
    if any(codes):
        return False, f"attempt {attempt}: agents exited {codes}"
    return True, ""


# -- evidence: what each rank can still load, read from disk ---------------------------------------------


def _check_key(key: str) -> str:
    from flashckpt.format.keys import check_key

    return check_key(key)


def decode_chunk(codec: str, stored: bytes, nbytes: int) -> bytes:
    """A chunk's raw bytes, decoded as docs/format.md describes (not with the library's codec)."""
    if codec == "raw/1":
        if len(stored) != nbytes:
            raise ValueError(f"raw chunk of {len(stored)} bytes, expected {nbytes}")
        return stored
    name = codec.split("/")[0]
    raw = zstandard.ZstdDecompressor().decompress(stored, max_output_size=nbytes)
    if len(raw) != nbytes:
        raise ValueError(f"chunk decompresses to {len(raw)} bytes, expected {nbytes}")
    if name == "zstd":
        return raw
    group = int(name.removeprefix("zstd-bg"))
    planes = np.frombuffer(raw, dtype=np.uint8).reshape(group, nbytes // group)
    return planes.T.copy().tobytes()  # plane i holds byte i of every element


def _digest(data: bytes | memoryview) -> str:
    return xxhash.xxh3_128_hexdigest(data)


def _storage_id(storage: Path) -> str:
    """How the library names the storage tier in its manifests (sha256 of its URL)."""
    return hashlib.sha256(f"file://{storage.absolute()}".encode()).hexdigest()[:16]


@dataclass
class Holding:
    """One snapshot of one rank in one place."""

    order: Order
    source: str  # "memory", "mirror@rank{q}", "local", "storage"
    ok: bool
    why: str = ""
    meta: tuple[str, str] = ("", "")  # a memory snapshot's storage tier and run


def memory_holdings(
    directory: Path,
    shard: str,
    source: str,
    *,
    mirror: bool,
    part_dirs: Callable[[str], list[Path]] | None = None,
) -> list[Holding]:
    """The snapshots of ``shard`` in a memory-tier directory (a rank's own, or a mirror held
    for it): each manifest decoded, the slot it names present and large enough, a slot claimed
    by one snapshot only (the newest), every chunk of a sealed snapshot checked against its
    checksum (an unsealed one, which the restore checksums and seals, only for its size).  A
    chunk another rank of the node holds is read from that rank's directory beside this one,
    or, for a mirror, from any of ``part_dirs(rank)`` (the surviving copies of that rank's
    shard) that holds it intact."""
    from flashckpt.format import SLOT_NAMES, decode_manifest

    found: list[tuple[Any, str]] = []
    out: list[Holding] = []
    rank, world = int(shard[1:6]), int(shard[-5:])
    for path in sorted(directory.glob("step-*.manifest")) if directory.is_dir() else []:
        try:
            m = decode_manifest(path.read_bytes(), str(path), check_key=_check_key, allow_unsealed=not mirror)
        except Exception as exc:  # a torn or foreign record: not loadable
            out.append(Holding((-1, int(path.name[5:17])), source, False, f"bad manifest: {exc}"))
            continue
        why = ""
        keys = {c.key for c in m.chunks if c.key in SLOT_NAMES}
        held = {c.key for c in m.chunks} - keys  # other ranks of the node hold these chunks
        if (m.rank, m.world_size) != (rank, world) or path.name != f"step-{m.step:012d}.manifest":
            why = "describes another shard or step"
        elif len(keys) > 1:
            why = f"names slots {sorted(keys | held)}"
        elif any(not re.fullmatch(rf"r\d{{5}}-of-{world:05d}", k) or k == shard for k in held):
            why = f"names other holders {sorted(held)}"
        elif any(c.codec != "raw/1" or c.at != c.offset or c.stored_nbytes != c.nbytes for c in m.chunks):
            why = "a chunk is not raw at its own offset"
        if why:
            out.append(Holding(m.order, source, False, why))
            continue
        found.append((m, next(iter(keys), SLOT_NAMES[0])))
    claims: dict[str, Any] = {}
    for m, slot in found:
        if slot not in claims or m.order > claims[slot].order:
            claims[slot] = m
    for m, slot in found:
        if claims[slot] is not m:
            out.append(Holding(m.order, source, False, f"{slot} holds a newer snapshot"))
            continue
        path = directory / slot
        size = path.stat().st_size if path.is_file() else -1
        if size < m.total_bytes:
            out.append(Holding(m.order, source, False, f"{slot}: {size} bytes, needs {m.total_bytes}"))
            continue
        bad = ""
        with open(path, "rb") as f:
            data = f.read(m.total_bytes)
        where = part_dirs if mirror and part_dirs else (lambda k: [directory.parent / k])
        parts = {k: [_part_bytes(d, m) for d in where(k)] for k in {c.key for c in m.chunks} - {slot}}
        for c in m.chunks:
            found_c = [(data, None)] if c.key == slot else parts[c.key]
            found_c = [
                (g, o) for g, o in found_c if g is not None and (o is None or (c.offset, c.nbytes) in o)
            ]
            if not found_c:
                bad = f"rank {c.key} holds no copy of its part"
                break
            if m.sealed and all(
                _digest(memoryview(g)[c.at : c.at + c.nbytes]) != c.checksum for g, _ in found_c
            ):
                bad = f"chunk at {c.offset} fails its checksum"
                break
        out.append(
            Holding(m.order, source, not bad, bad or ("" if m.sealed else "unsealed"), (m.storage, m.run))
        )
    return out


def _part_bytes(directory: Path, m: Any) -> tuple[bytes | None, set[tuple[int, int]] | None]:
    """The slot bytes of the same snapshot as ``m`` in another rank's memory-tier directory of
    the node (chunks replicated on the node are staged by one rank), and the chunks
    ``(offset, size)`` that rank staged itself; (None, None) if it has none."""
    from flashckpt.format import SLOT_NAMES, decode_manifest

    path = directory / f"step-{m.step:012d}.manifest"
    try:
        other = decode_manifest(path.read_bytes(), str(path), check_key=_check_key, allow_unsealed=True)
    except Exception:  # gone, torn: no copy
        return None, None
    slots = {c.key for c in other.chunks if c.key in SLOT_NAMES}
    if other.order != m.order or other.run != m.run or len(slots) != 1:
        return None, None
    name = slots.pop()
    slot = directory / name
    own = {(c.offset, c.nbytes) for c in other.chunks if c.key == name}
    return (slot.read_bytes(), own) if slot.is_file() else (None, None)


def committed_holdings(root: Path, rank: int, world: int, source: str, scope: str) -> list[Holding]:
    """The committed snapshots of shard ``rank`` on a persistent tier: commit record, the
    manifest it names (size and checksum), every chunk object present and decoding to bytes
    with the manifest's checksum."""
    from flashckpt.format import decode_commit, decode_manifest, manifest_key

    out: list[Holding] = []
    commits = root / "commits"
    for path in sorted(commits.iterdir()) if commits.is_dir() else []:
        if not (path.name.startswith("step-") and len(path.name) == 17 and path.name[5:].isdigit()):
            continue
        step = int(path.name[5:])
        try:
            rec = decode_commit(path.read_bytes(), str(path), check_key=_check_key)
        except Exception as exc:
            out.append(Holding((-1, step), source, False, f"bad commit record: {exc}"))
            continue
        order = (rec.generation, rec.step)
        why = ""
        want = manifest_key(step, rank, world)
        entry = next((e for e in rec.manifests if e[0] == want), None)
        if rec.step != step or rec.scope != scope or rec.world_size != world or entry is None:
            why = (
                f"commit record of another kind (step {rec.step}, scope {rec.scope}, world {rec.world_size})"
            )
        else:
            try:
                raw = (root / want).read_bytes()
                if len(raw) != entry[1] or _digest(raw) != entry[2]:
                    raise ValueError("manifest does not match its commit record")
                m = decode_manifest(raw, want, check_key=_check_key)
                if (m.step, m.rank, m.world_size, m.generation) != (step, rank, world, rec.generation):
                    raise ValueError("manifest of another shard or generation")
                for c in m.chunks:
                    with open(root / c.key, "rb") as f:
                        f.seek(c.at)
                        stored = f.read(c.stored_nbytes)
                    if len(stored) != c.stored_nbytes:
                        raise ValueError(f"{c.key}: {len(stored)} of {c.stored_nbytes} bytes")
                    if _digest(decode_chunk(c.codec, stored, c.nbytes)) != c.checksum:
                        raise ValueError(f"{c.key} fails its checksum")
            except Exception as exc:
                why = f"{type(exc).__name__}: {exc}"
        out.append(Holding(order, source, not why, why))
    return out


@dataclass
class Evidence:
    holdings: dict[int, list[Holding]]  # rank -> every copy found
    loadable: dict[int, list[Order]]  # rank -> snapshots some surviving copy gives intact
    expected: Order | None  # the newest snapshot every rank can load
    notes: list[str] = field(default_factory=list)

    def as_json(self) -> dict[str, Any]:
        return {
            "expected": self.expected,
            "loadable": {r: v for r, v in self.loadable.items()},
            "holdings": {
                r: [[h.order, h.source, h.ok, h.why] for h in hs] for r, hs in self.holdings.items()
            },
            "notes": self.notes,
        }


def _abandoned(orders: list[Order]) -> set[Order]:
    """Snapshots on a timeline the run left (docs/format.md): a newer generation holds a lower step."""
    out: set[Order] = set()
    lowest_newer = None
    for gen in sorted({g for g, _ in orders}, reverse=True):
        steps = [s for g, s in orders if g == gen]
        if lowest_newer is not None:
            out.update((gen, s) for s in steps if s > lowest_newer)
        lowest_newer = min(steps) if lowest_newer is None else min(lowest_newer, *steps)
    return out


def gather_evidence(dirs: Dirs, lost_node: int | None) -> Evidence:
    """What the restart must find, from what is on disk now (every process is gone)."""
    from flashckpt.format import RUN_KEY, decode_run, shard_name

    notes = []
    run = None
    if (dirs.storage / RUN_KEY).is_file():
        run = decode_run((dirs.storage / RUN_KEY).read_bytes())
    sid = _storage_id(dirs.storage)
    holdings: dict[int, list[Holding]] = {}

    def mirror_dirs(owner: str) -> list[Path]:
        """Every surviving copy of ``owner``'s shard in a peer's memory (a mirror leaves the
        chunks its owner's node-mates staged to their mirrors, wherever those are held)."""
        return [
            dirs.memory / f"node{q // PER_NODE}" / shard_name(q, WORLD) / "mirrors" / owner
            for q in range(WORLD)
            if q // PER_NODE != lost_node
        ]

    for r in range(WORLD):
        shard = shard_name(r, WORLD)
        node = r // PER_NODE
        hs: list[Holding] = []
        if node != lost_node:
            hs += memory_holdings(dirs.memory / f"node{node}" / shard, shard, "memory", mirror=False)
            hs += committed_holdings(dirs.local / f"node{node}" / shard, r, WORLD, "local", "rank")
        for q in range(WORLD):
            if q // PER_NODE in (node, lost_node):
                continue
            held = dirs.memory / f"node{q // PER_NODE}" / shard_name(q, WORLD) / "mirrors" / shard
            hs += memory_holdings(held, shard, f"mirror@rank{q}", mirror=True, part_dirs=mirror_dirs)
        hs += committed_holdings(dirs.storage, r, WORLD, "storage", "job")
        for h in hs:  # memory of another storage tier or run is never restored (Checkpointer._ours)
            storage, mrun = h.meta
            if h.ok and storage and storage != sid:
                h.ok, h.why = False, f"saved for storage tier {storage}, not {sid}"
            elif h.ok and mrun and run is not None and mrun != run:
                h.ok, h.why = False, f"of run {mrun}, the storage tier's is {run}"
        holdings[r] = hs
    loadable = {r: sorted({h.order for h in hs if h.ok}) for r, hs in holdings.items()}
    left = _abandoned(sorted(set().union(*map(set, loadable.values()))))
    common = set.intersection(*(set(v) - left for v in loadable.values()))
    gens = {o[0] for v in loadable.values() for o in v}
    if len(gens) > 1:
        notes.append(f"several generations: {sorted(gens)}")
    expected = max(common) if common else None
    return Evidence(holdings, loadable, expected, notes)


# -- mutants: the campaign must catch a library that gets it wrong ----------------------------------------

#: ``hide``: every copy of rank 0's shard of the expected step disappears before the restart (a
#: library that loses or hides a good step); ``corrupt``: one byte of it changes in rank 0's
#: cheapest copy, checksum updated to match (a library that restores wrong bytes).
MUTANTS = ("hide", "corrupt")


def mutate(how: str, dirs: Dirs, ev: Evidence, expected: Order, lost_node: int | None) -> str:
    """Apply a mutant between the crash and the restart; returns what was done."""
    import dataclasses as dc

    from flashckpt.format import (
        SLOT_NAMES,
        commit_key,
        decode_manifest,
        encode_manifest,
        memory_manifest_key,
        shard_name,
    )

    shard = shard_name(0, WORLD)
    step = expected[1]
    places = [dirs.memory / "node0" / shard] if lost_node != 0 else []
    places += [
        dirs.memory / f"node{q // PER_NODE}" / shard_name(q, WORLD) / "mirrors" / shard
        for q in range(WORLD)
        if q // PER_NODE not in (0, lost_node)
    ]
    if how == "hide":
        done = []
        for d in places:
            m = d / memory_manifest_key(step)
            if m.exists():
                m.unlink()
                done.append(str(m.relative_to(dirs.memory)))
        for root in (dirs.local / "node0" / shard, dirs.storage):
            c = root / commit_key(step)
            if c.exists():
                c.unlink()
                done.append(str(c.relative_to(dirs.base)))
        return f"hid step {step} of rank 0: {done}"
    for d in places:  # corrupt: the first memory copy the restore would read
        path = d / memory_manifest_key(step)
        if not path.exists():
            continue
        m = decode_manifest(path.read_bytes(), str(path), check_key=_check_key, allow_unsealed=True)
        c = max((x for x in m.chunks if x.key in SLOT_NAMES), key=lambda c: c.nbytes)  # in its own slot
        with open(d / c.key, "r+b") as f:
            f.seek(c.at + c.nbytes // 2)
            b = f.read(1)
            f.seek(c.at + c.nbytes // 2)
            f.write(bytes([b[0] ^ 0x10]))
            f.seek(c.at)
            digest = _digest(f.read(c.nbytes)) if m.sealed else c.checksum
        chunks = [dc.replace(x, checksum=digest) if x is c else x for x in m.chunks]
        path.write_bytes(encode_manifest(m.with_chunks(chunks)))
        return (
            f"flipped a bit of step {step} of rank 0 in {path.relative_to(dirs.memory)} (chunk at {c.offset})"
        )
    return f"no memory copy of step {step} of rank 0 to corrupt"


# -- comparing states ------------------------------------------------------------------------------------


def _bytes_of(t: Any) -> Any:
    import torch

    return t.detach().contiguous().reshape(-1).view(torch.uint8)


def first_difference(a: Any, b: Any, path: str = "") -> str | None:
    """Where two saved states differ (bitwise for tensors), or None."""
    import torch

    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        if not (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor)):
            return f"{path}: tensor vs {type(b).__name__}"
        if a.dtype != b.dtype or a.shape != b.shape:
            return f"{path}: {a.dtype}{list(a.shape)} vs {b.dtype}{list(b.shape)}"
        if not torch.equal(_bytes_of(a), _bytes_of(b)):  # bitwise: NaN payloads, -0.0 included
            return f"{path}: values differ"
        return None
    if isinstance(a, dict) and isinstance(b, dict):
        if list(a.keys()) != list(b.keys()):
            return f"{path}: keys {sorted(map(str, a))[:8]} vs {sorted(map(str, b))[:8]}"
        for k in a:
            d = first_difference(a[k], b[k], f"{path}.{k}")
            if d:
                return d
        return None
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        if type(a) is not type(b) or len(a) != len(b):
            return f"{path}: {type(a).__name__}[{len(a)}] vs {type(b).__name__}[{len(b)}]"
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            d = first_difference(x, y, f"{path}[{i}]")
            if d:
                return d
        return None
    if type(a) is not type(b) or a != b:
        return f"{path}: {a!r} vs {b!r}"
    return None


def load_finals(out: Path) -> list[Any]:
    import torch

    return [torch.load(out / f"final-rank{r}.pt", weights_only=False) for r in range(WORLD)]


def reported_errors(out: Path) -> list[str]:
    """What the library raised after training (``wait``, ``close``) in an attempt, per rank."""
    found = []
    for r in range(WORLD):
        p = out / f"errors-rank{r}.json"
        if p.exists():
            found += [f"rank {r}: {e}" for e in json.loads(p.read_text())]
    return found


def notable_lines(out: Path, most: int = 20) -> list[str]:
    """The library's warnings and errors in an attempt's logs (distinct lines), and the last
    line of each traceback (the exception)."""
    seen: list[str] = []
    for log in sorted(out.glob("agent*.log")):
        lines = [x.rstrip() for x in log.read_text(errors="replace").splitlines()]
        for i, line in enumerate(lines):
            if "Traceback (most recent call last)" in line:
                prefix = line.split("Traceback")[0]
                k = i + 1
                while (
                    k < len(lines)
                    and lines[k].startswith(prefix)
                    and (lines[k][len(prefix) :].startswith((" ", "File")) or lines[k] == prefix.strip())
                ):
                    k += 1
                ours = any("/flashckpt/" in x or "/backends/" in x for x in lines[i + 1 : k])
                line = ("exception in flashckpt: " if ours else "exception: ") + (
                    lines[k] if k < len(lines) else "?"
                )
            elif "flashckpt:" not in line:
                continue
            line = line.strip()
            if line[:300] not in seen:
                seen.append(line[:300])
    return seen[:most]


#: Exceptions of torchrun's agent when the job ends (not the library's).
_AGENT_EXCEPTION = re.compile(r"ChildFailedError|DistNetworkError|torch/distributed/elastic|SignalException")
_EXCEPTION = re.compile(r"^exception[^:]*: (\[rank\d+\]: )?[\w.]*(Error|Exception|Interrupt)\b")


def late_failures(res: dict[str, Any]) -> list[str]:
    """Failures read from a trial's record after the fact: an exception that escaped the
    library in the restarted run (a thread that died, a call that raised)."""
    out = []
    for line in res.get("log1", []):
        if line.startswith("exception in flashckpt:") or (
            _EXCEPTION.match(line) and not _AGENT_EXCEPTION.search(line)
        ):
            why = f"an exception escaped the library in the restarted run: {line}"
            if why not in res["failures"] and why not in out:
                out.append(why)
    return out


def memory_left(memory: Path) -> list[str]:
    return (
        sorted(str(p.relative_to(memory)) for p in memory.rglob("*") if p.is_file())
        if memory.exists()
        else []
    )


def verify_finished(dirs: Dirs) -> list[str]:
    """A finished run's persistent tiers (problems, or []): every committed step on storage and
    on each rank's local disk loads, and the last step is committed on all of them (the run
    saved it; a restart that un-commits it, or never commits it, loses it on those tiers)."""
    from flashckpt.format import shard_name

    problems = []
    last = (-1, STEPS - 1)
    for r in range(WORLD):
        tiers = [
            ("storage", committed_holdings(dirs.storage, r, WORLD, "storage", "job")),
            (
                f"local disk of rank {r}",
                committed_holdings(
                    dirs.local / f"node{r // PER_NODE}" / shard_name(r, WORLD), r, WORLD, "local", "rank"
                ),
            ),
        ]
        for name, hs in tiers:
            problems += [f"{name}: step {h.order[1]} (rank {r}): {h.why}" for h in hs if not h.ok]
            newest = max((h.order for h in hs if h.ok), default=None)
            if newest is None or newest[1] != last[1]:
                what = f"is {newest[1]}" if newest else "is none"
                if name != "storage" or r == 0:
                    problems.append(
                        f"{name}: the newest committed step that loads {what}, not the last step {last[1]}"
                    )
    return problems


# -- the campaign --------------------------------------------------------------------------------


class Campaign:
    def __init__(
        self, out: Path, work: Path, grace: float, timeout: float, keep_failed: int, mutant: str | None = None
    ) -> None:
        self.mutant = mutant
        self.keep_logs = False  # keep every trial's logs and records (in DIR/kept/), not only failures
        self.out = out
        self.work = work
        self.grace = grace
        self.timeout = timeout
        self.keep_failed = keep_failed
        self.refs: dict[str, list[Any] | None] = {}
        self.ref_findings: dict[str, list[str]] = {}
        self.first_ref: tuple[str, list[Any]] | None = None
        out.mkdir(parents=True, exist_ok=True)
        work.mkdir(parents=True, exist_ok=True)

    def log(self, msg: str) -> None:
        line = f"[{time.strftime('%H:%M:%S')}] {msg}"
        print(line, flush=True)
        with open(self.out / "campaign.log", "a") as f:
            f.write(line + "\n")

    # references
    def reference(self, settings: Settings) -> tuple[list[Any] | None, str]:
        """The uninterrupted run's final states with ``settings`` (cached), and which settings
        they come from.  A reference run whose library reported an error, left the memory tier
        or a committed step that does not load is a finding (``self.ref_findings``); its final
        states are used all the same (they do not depend on checkpointing: the references of
        all settings are checked to be equal).  If it wrote none, another settings' are used."""
        key = settings.key
        if key not in self.refs and key not in self.ref_findings:
            self._run_reference(settings)
        if self.refs.get(key) is not None:
            return self.refs[key], key
        other = next(((k, f) for k, f in self.refs.items() if f is not None), None)
        return (other[1], other[0]) if other else (None, key)

    def _run_reference(self, settings: Settings) -> None:
        key = settings.key
        saved = self.out / "refs" / key
        if (saved / f"final-rank{WORLD - 1}.pt").exists():
            self.refs[key] = load_finals(saved)
            return
        t0 = time.monotonic()
        dirs = Dirs.make(self.work, f"ref-{key}")
        finals = None
        findings = []
        try:
            ok, why = run_clean(dirs, 0, settings, self.timeout)
            if not ok:
                findings.append(f"the uninterrupted run failed: {why}")
            findings += reported_errors(dirs.out(0))
            findings += verify_finished(dirs)[:3]
            left = memory_left(dirs.memory)
            if left:
                findings.append(f"the clean run left the memory tier: {left[:4]}")
            if all((dirs.out(0) / f"final-rank{r}.pt").exists() for r in range(WORLD)):
                finals = load_finals(dirs.out(0))
                saved.mkdir(parents=True, exist_ok=True)
                for r in range(WORLD):
                    shutil.copy(dirs.out(0) / f"final-rank{r}.pt", saved / f"final-rank{r}.pt")
            if findings:
                self._keep(dirs, f"ref-{key}")
        finally:
            kill_all(dirs.tag, [])
            dirs.remove()
        self.log(
            f"reference {key}: {time.monotonic() - t0:.1f} s"
            + (f"; FINDINGS: {findings}" if findings else "")
        )
        if findings:
            self.ref_findings[key] = findings
        if finals is not None:
            if self.first_ref is None:
                self.first_ref = (key, finals)
            else:
                d = first_difference(self.first_ref[1], finals)
                if d:  # the settings must not change training
                    self.ref_findings.setdefault(key, []).append(
                        f"differs from the {self.first_ref[0]} run: {d}"
                    )
        self.refs[key] = finals

    def _keep(self, dirs: Dirs, name: str, where: str = "failures") -> None:
        """Keep a failed trial's logs and records (and its directories, for the first few)."""
        dest = self.out / where / name
        dest.mkdir(parents=True, exist_ok=True)
        kept = len(list((self.out / "failures").glob("*/tree")))
        for p in dirs.base.glob("out*/*"):
            if p.is_file() and not p.name.endswith(".pt") and not p.name.startswith("window-"):
                shutil.copy(p, dest / f"{p.parent.name}-{p.name}")
        (dest / "memory-listing.txt").write_text("\n".join(memory_left(dirs.memory)) + "\n")
        if kept < self.keep_failed:
            shutil.copytree(
                dirs.base, dest / "tree", symlinks=True, ignore=shutil.ignore_patterns("torchelastic_*")
            )
            if dirs.memory.exists():
                shutil.copytree(dirs.memory, dest / "tree" / "memory", symlinks=True)

    # one trial
    def trial(self, seed: int, plan: Plan | None = None) -> dict[str, Any]:
        """Run trial ``seed`` (its plan drawn from the seed, or ``plan``); returns its record."""
        plan = plan or draw(seed)
        t0 = time.monotonic()
        res: dict[str, Any] = {
            "seed": seed,
            "plan": dataclasses.asdict(plan),
            "describe": plan.describe(),
            "repro": f"python -m tests.crash_campaign --trial-seed {seed} --out /tmp/crashcamp-repro-{seed}"
            + (f" --mutant {self.mutant}" if self.mutant else "")
            + (f" --plan '{plan.to_json()}'" if plan != draw(seed) else ""),
            "failures": [],
        }
        ref, ref_key = self.reference(plan.settings)
        if ref_key != plan.settings.key:
            res["reference"] = ref_key
        dirs = Dirs.make(self.work, f"t{seed}")
        try:
            self._trial(plan, dirs, res, ref)
        except Exception as exc:  # the runner's own error: reported as such, never hidden
            res["failures"].append(f"runner error: {type(exc).__name__}: {exc}")
        finally:
            with contextlib.suppress(Exception):
                kill_all(dirs.tag, [])
            if res["failures"] or self.keep_logs:
                with contextlib.suppress(Exception):
                    (dirs.base / "out0" / "result.json").write_text(json.dumps(res, indent=1, default=str))
                    self._keep(dirs, f"t{seed}", "failures" if res["failures"] else "kept")
            dirs.remove()
        res["wall_s"] = round(time.monotonic() - t0, 1)
        res["ok"] = res["fired"] is not False and not res["failures"]
        return res

    def _trial(self, plan: Plan, dirs: Dirs, res: dict[str, Any], ref: list[Any] | None) -> None:
        res["fired"] = None
        out0, out1 = dirs.out(0), dirs.out(1)
        # attempt 0: until the kill, then as torchrun makes the job fail, then torn down
        agents = launch(dirs, 0, plan.settings, plan.kill_plan())
        killed_at = None
        try:
            how = wait_agents(agents, time.monotonic() + self.timeout, out0 / "killed.json")
            if how == "stop":
                killed_at = time.monotonic()
                how = wait_agents(agents, killed_at + self.grace)
                res["job_ended_by_itself"] = how == "exited"
                res["agent_codes0"] = [a.returncode for a in agents]
        finally:
            kill_all(dirs.tag, agents)
        if killed_at is None:
            if how == "timeout":
                res["fired"] = None
                res["failures"].append(
                    f"attempt 0 neither finished nor reached its kill in {self.timeout:.0f} s"
                )
                return
            res["fired"] = False  # the draw's occurrence never came: no crash to test
            return
        res["fired"] = True
        killed = json.loads((out0 / "killed.json").read_text())
        res["killed"] = killed
        lost_node = killed["node"] if killed["victim"] in ("node", "peer-node") else None
        res["lost_node"] = lost_node
        if lost_node is not None:  # a replaced machine: no memory, no local disk
            shutil.rmtree(dirs.memory / f"node{lost_node}", ignore_errors=True)
            shutil.rmtree(dirs.local / f"node{lost_node}", ignore_errors=True)
        ev = gather_evidence(dirs, lost_node)
        res["evidence"] = ev.as_json()
        expected = ev.expected
        res["expected"] = None if expected is None else expected[1]
        staged = {}
        for r in range(WORLD):
            p = out0 / f"staged-rank{r}"
            lines = p.read_text().split() if p.exists() else []
            staged[r] = int(lines[-1]) if lines else None
        res["staged"] = staged
        returned = (
            None
            if any(v is None for v in staged.values())
            else min(v for v in staged.values() if v is not None)
        )
        res["newest_returned"] = returned
        if self.mutant is not None and expected is not None:
            res["mutant"] = mutate(self.mutant, dirs, ev, expected, lost_node)
        if lost_node is None and returned is not None and (expected is None or expected[1] < returned):
            # no node lost: every rank's memory still held the newest step saved everywhere
            res["failures"].append(
                f"step {returned} had been saved on every rank and no node was lost, but no copy of it "
                f"survives for every rank (newest loadable everywhere: {res['expected']})"
            )
        # attempt 1: the whole job again, to the end
        ok, why = run_clean(dirs, 1, plan.settings, self.timeout)
        res["log1"] = notable_lines(out1)
        res["failures"] += late_failures(res)
        attempts = {}
        for r in range(WORLD):
            p = out1 / f"attempt0-rank{r}.json"
            attempts[r] = json.loads(p.read_text()) if p.exists() else None
        res["restored"] = {r: (a or {}).get("start") for r, a in attempts.items()}
        res["restored_from"] = {r: ((a or {}).get("restored") or {}).get("tier") for r, a in attempts.items()}
        starts = set(res["restored"].values())
        got = next(iter(starts)) if len(starts) == 1 else None
        res["resumed_at_newest"] = (
            all(a is not None for a in attempts.values()) and len(starts) == 1 and got == res["expected"]
        )
        if not res["resumed_at_newest"]:
            res["failures"].append(
                f"restored {res['restored']} (from {res['restored_from']}), "
                f"expected {res['expected']} on every rank"
            )
        for r, tier in res["restored_from"].items():  # the library's source must hold that step
            have = {h.source.split("@")[0] for h in ev.holdings[r] if h.ok and h.order[1] == got}
            if tier is not None and tier not in have:
                res["failures"].append(
                    f"rank {r} restored step {got} from the {tier} tier, which holds no intact copy of it"
                )
        if returned is not None and got is not None:
            res["steps_lost"] = returned - got
        elif returned is not None and len(starts) == 1 and got is None:
            res["steps_lost"] = returned + 1  # back to the start
        if not ok:
            res["failures"].append(why)
            res["bitwise_equal"] = False
            return
        errors = reported_errors(out1)
        if errors:
            res["failures"].append(f"the restarted run reported: {errors[0]}")
        if ref is None:
            res["bitwise_equal"] = None
            res["failures"].append("no reference run wrote its final states")
        else:
            finals = load_finals(out1)
            diffs = [d for r in range(WORLD) if (d := first_difference(ref[r], finals[r], f"rank{r}"))]
            res["bitwise_equal"] = not diffs
            if diffs:
                res["failures"].append(f"final state differs from the uninterrupted run: {diffs[0]}")
        problems = verify_finished(dirs)
        left = memory_left(dirs.memory)
        res["clean_end"] = not problems and not left and not errors
        if problems:
            res["failures"].append(f"after the restarted run: {'; '.join(problems[:3])}")
        if left:
            res["failures"].append(f"the restarted run's clean close left the memory tier: {left[:4]}")


# -- the table -----------------------------------------------------------------------------------


def summarize(
    results: list[dict[str, Any]], ref_findings: dict[str, list[str]] | None = None
) -> dict[str, Any]:
    fired = [r for r in results if r.get("fired")]

    def figures(rs: list[dict[str, Any]]) -> dict[str, Any]:
        lost = [r["steps_lost"] for r in rs if r.get("steps_lost") is not None]
        return {
            "trials": len(rs),
            "resumed_at_newest": sum(1 for r in rs if r.get("resumed_at_newest")),
            "bitwise_equal": sum(1 for r in rs if r.get("bitwise_equal")),
            "clean_end": sum(1 for r in rs if r.get("clean_end")),
            "failed": sum(1 for r in rs if r.get("failures")),
            "steps_lost_total": sum(lost),
            "steps_lost_max": max(lost, default=None),
            "steps_lost_distribution": dict(sorted(Counter(lost).items())),
        }

    by_point: dict[str, list[dict[str, Any]]] = {}
    by_kind: dict[str, list[dict[str, Any]]] = {}
    for r in fired:
        p = r["plan"]
        by_point.setdefault(p["group"], []).append(r)
        by_kind.setdefault(p["kind"], []).append(r)
    return {
        "all": figures(fired),
        "not_fired": sum(1 for r in results if r.get("fired") is False),
        "by_point": {k: figures(by_point[k]) for k in GROUPS if k in by_point},
        "by_kind": {k: figures(v) for k, v in sorted(by_kind.items())},
        "failures": [
            {"seed": r["seed"], "describe": r["describe"], "failures": r["failures"], "repro": r["repro"]}
            for r in results
            if r.get("failures")
        ],
        "wall_s": round(sum(r.get("wall_s", 0) for r in results), 1),
        "reference_findings": ref_findings or {},
        "failure_causes": dict(
            Counter(
                re.sub(r"\d+", "N", f)[:140] for r in results for f in r.get("failures", [])
            ).most_common()
        ),
        "restart_warnings": dict(
            Counter(re.sub(r"\d+", "N", w)[:160] for r in fired for w in r.get("log1", [])).most_common(30)
        ),
    }


def markdown(summary: dict[str, Any], seed: int | None) -> str:
    head = "| | trials | failed | resumed at newest | bitwise equal | clean end | steps lost | max | distr. |"
    rows = [head, "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]

    def row(name: str, f: dict[str, Any]) -> str:
        dist = ", ".join(f"{k}: {v}" for k, v in f["steps_lost_distribution"].items())
        return (
            f"| {name} | {f['trials']} | {f['failed']} | {f['resumed_at_newest']} | {f['bitwise_equal']} | "
            f"{f['clean_end']} | {f['steps_lost_total']} | {f['steps_lost_max']} | {dist} |"
        )

    rows.append(row("**all**", summary["all"]))
    for k, f in summary["by_point"].items():
        rows.append(row(f"at {k}", f))
    for k, f in summary["by_kind"].items():
        rows.append(row(f"{k} killed", f))
    text = [f"# Crash campaign (seed {seed})" if seed is not None else "# Crash campaign", ""]
    text += rows
    text += [
        "",
        f"Kills that never fired (not counted above): {summary['not_fired']}.  "
        f"Wall time of the trials: {summary['wall_s']} s.",
        "",
    ]
    if summary.get("reference_findings"):
        text += ["## Uninterrupted reference runs that went wrong", ""]
        for k, fs in summary["reference_findings"].items():
            text += [f"- {k}: {f}" for f in fs]
        text.append("")
    if summary.get("restart_warnings"):
        text += ["## What the restarted runs logged (trials)", ""]
        text += [f"- {n}: `{w}`" for w, n in summary["restart_warnings"].items()]
        text.append("")
    if summary.get("failure_causes"):
        text += ["## Failure reasons (numbers replaced by N)", ""]
        text += [f"- {n}: {w}" for w, n in summary["failure_causes"].items()]
        text.append("")
    if summary["failures"]:
        text.append(f"## Failures ({len(summary['failures'])})")
        text.append("")
        for f in summary["failures"]:
            text.append(f"- seed {f['seed']}: {f['describe']}")
            for why in f["failures"]:
                text.append(f"  - {why}")
            text.append(f"  - reproduce: `{f['repro']}`")
    else:
        text.append("No failures.")
    return "\n".join(text) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--trials", type=int, default=200, help="trials whose kill fired")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--trial-seed", type=int, action="append", help="run only these trials")
    ap.add_argument("--plan", help="with one --trial-seed: run this plan (JSON, as Plan.to_json) instead")
    ap.add_argument("--out", required=True, type=Path)
    ap.add_argument("--work", type=Path, default=None, help="where trials run (default: a fresh dir in /tmp)")
    ap.add_argument("--grace", type=float, default=10.0, help="seconds the job may take to fail by itself")
    ap.add_argument("--timeout", type=float, default=300.0, help="per attempt")
    ap.add_argument("--keep-failed", type=int, default=5, help="failed trials kept whole")
    ap.add_argument(
        "--keep-logs", action="store_true", help="keep every trial's logs (DIR/kept/), not only failures'"
    )
    ap.add_argument(
        "--mutant",
        choices=MUTANTS,
        help="check the campaign itself: make every trial's restart go wrong the way a defect would",
    )
    ap.add_argument(
        "--resummarize",
        action="store_true",
        help="only rebuild DIR's summary from DIR/trials.jsonl (with the checks of this version)",
    )
    args = ap.parse_args(argv)
    if args.resummarize:
        results = [json.loads(line) for line in (args.out / "trials.jsonl").read_text().splitlines()]
        for r in results:
            r["failures"] = r.get("failures", []) + late_failures(r)
            r["ok"] = r.get("fired") is not False and not r["failures"]
        old = (
            json.loads((args.out / "summary.json").read_text())
            if (args.out / "summary.json").exists()
            else {}
        )
        summary = summarize(results, old.get("reference_findings"))
        summary["campaign_wall_s"] = old.get("campaign_wall_s")
        summary["seed"] = old.get("seed")
        (args.out / "summary.json").write_text(json.dumps(summary, indent=1, default=str))
        (args.out / "summary.md").write_text(markdown(summary, summary["seed"]))
        print(markdown(summary, summary["seed"]))
        return 1 if summary["failures"] else 0
    work = args.work or Path(tempfile.mkdtemp(prefix="crashcamp-"))
    camp = Campaign(args.out, work, args.grace, args.timeout, args.keep_failed, args.mutant)
    camp.keep_logs = args.keep_logs
    results: list[dict[str, Any]] = []
    if args.trial_seed:
        seeds = iter(args.trial_seed)
        wanted = len(args.trial_seed)
    else:
        seeds = (args.seed * 100_000 + i for i in range(10 * args.trials))
        wanted = args.trials
    t0 = time.monotonic()
    try:
        for seed in seeds:
            if sum(1 for r in results if r.get("fired") is not False) >= wanted:
                break
            r = camp.trial(seed, Plan.from_json(seed, args.plan) if args.plan else None)
            results.append(r)
            with open(args.out / "trials.jsonl", "a") as f:
                f.write(json.dumps(r, default=str) + "\n")
            status = "ok" if r["ok"] else ("no kill" if r["fired"] is False else "FAILED")
            camp.log(
                f"trial {len(results)} seed {seed}: {status} in {r['wall_s']} s: {r['describe']}; "
                f"expected {r.get('expected')} restored {r.get('restored')} lost {r.get('steps_lost')}"
                + (f"; {r['failures']}" if r["failures"] else "")
            )
    finally:
        summary = summarize(results, camp.ref_findings)
        summary["campaign_wall_s"] = round(time.monotonic() - t0, 1)
        summary["seed"] = None if args.trial_seed else args.seed
        (args.out / "summary.json").write_text(json.dumps(summary, indent=1, default=str))
        (args.out / "summary.md").write_text(markdown(summary, summary["seed"]))
        if args.work is None:
            shutil.rmtree(work, ignore_errors=True)
    print(markdown(summary, summary["seed"]))
    return 1 if summary["failures"] else 0


if __name__ == "__main__":
    sys.exit(main())
