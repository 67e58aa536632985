"""Model-based test of the Checkpointer lifecycle (STYLE.md, "Tests").

A hypothesis ``RuleBasedStateMachine`` drives one Checkpointer (and its successors) through
random sequences of saves (bursts, lower steps, unchanged moments, forced persists), restores
(latest and ``step=``), clean closes and reopens with other tiers, compression and ``keep``,
crashes (a child process on the same directories restores, saves and is SIGKILLed at an
event point, after a save, or after a delay), wiped tiers, damaged objects (a byte flipped,
a file truncated or deleted: chunks, manifests, commit records, slot files) and foreign files.
The reference model (``tests/lifecycle_model.py``) knows what every save held and which saves
are the run the user continues; it reads the tiers itself.

After every rule, with the background work drained:

- every copy a tier lists belongs to a save, and if it verifies it holds exactly what that
  save held; a copy that does not verify was broken by the test, never by the engine;
- no copy of a save of the current timeline that verified before is gone, unless the test
  damaged it in this rule or a retention pass retired it while the tier listed ``keep``
  newer saves of that timeline (each pass is observed through the ``retention.delete``
  event point, in this process and reported by a crash child); the newest save is never
  lost from memory while no tier holds it; a save reported durable (a ``SaveHandle`` done,
  ``DURABLE`` from a child) verifies on each tier it was reported on;
- the newest save of a rule (a save that returned, in this process or a killed child) has
  an intact copy somewhere;
- foreign files are where they were, with their bytes; nothing flashckpt logs is an error
  the test's own damage does not explain.

What the model knows of a crash: the child's restore result (checked like any restore), every
save whose ``save()`` returned (``STAGED``), and the one in flight when the kill came, which
happened if and only if a copy of it exists (its memory manifest is written after its copy);
a save reported ``DURABLE``; each retention pass.  Nothing is assumed about what was
persisted: the inspector reads what is there, and the invariants say what must be.

``restore()`` returns the newest save of the current timeline that has an intact copy on a
tier the Checkpointer reads, ``restore(step=S)`` the newest save of step ``S`` that has one
(on whichever timeline: the user named it), bitwise, in place; or ``None`` /
``CheckpointNotFound`` when there is none.  After a clean close: every tier
passes ``flashckpt verify`` except for the commits the test damaged, ``flashckpt.load`` of
every intact commit is bitwise, no flashckpt thread is left, and the memory tier is
released exactly when the last snapshot is committed on every tier.  Every rule runs under a
time limit (a hang is a failure, with every thread's stack).

Short run: ``test_lifecycle`` (about two minutes).  Long run:
``FLASHCKPT_LIFECYCLE_MINUTES=30 pytest tests/test_lifecycle.py -k long -s`` runs fresh seeds
until the budget is spent and prints its figures (``FLASHCKPT_LIFECYCLE_REPORT=path`` also
writes them as JSON).  ``FLASHCKPT_LIFECYCLE_EXAMPLES=N`` changes the short run's number of
sequences.

Known defects (``KNOWN``) have standalone ``xfail(strict=True)`` reproductions at the end of
this file; the machine recognises each by its signature (the engine's own rule explains the
outcome) and counts it instead of failing, so that a campaign goes on to find the next one.
When a defect is fixed, remove its entry and its ``xfail``.  ``FLASHCKPT_LIFECYCLE_STRICT=1``
tolerates none.
"""

from __future__ import annotations

import contextlib
import dataclasses
import faulthandler
import functools
import io
import json
import logging
import os
import re
import shutil
import signal
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, ClassVar

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    invariant,
    precondition,
    rule,
    run_state_machine_as_test,
)

import flashckpt
from flashckpt import cli
from tests.lifecycle_model import (
    FOREIGN,
    OPTS,
    ROOT,
    SHARD,
    TIERS,
    Copy,
    Damage,
    Model,
    Node,
    Retirement,
    Scan,
    abandoned,
    content,
    diff,
    meta_of,
    model_pick,
    read_run,
    run_child,
    scan,
    stop_fork_server,
    template,
    usable,
    watch_retention,
)

MINUTES = float(os.environ.get("FLASHCKPT_LIFECYCLE_MINUTES") or 0)
STRICT = os.environ.get("FLASHCKPT_LIFECYCLE_STRICT", "") not in ("", "0")

#: Known defects the machine tolerates (counted) so a campaign finds the next one; each has
#: a standalone ``xfail(strict=True)`` reproduction below.  Empty with STRICT.
KNOWN: dict[str, str] = {}  # K1-K7, found by this machine, are fixed; their reproductions are below
if STRICT:
    KNOWN = {}

DELTAS = [1, 1, 2, 0, -1, -3, 5]  # step of the next save relative to the last one
COMPRESSION = [None, "zstd", "none", "zstd:3"]
POINTS = [
    "stage.done",
    "stage.tensor",
    "persist.next",
    "persist.chunk",
    "persist.manifest",
    "commit.record",
    "commit.done",
    "retention.delete",
    "restore.loaded",
]
#: The short run: sequences and rules per sequence (about two minutes on two shared cores).
CI_EXAMPLES = int(os.environ.get("FLASHCKPT_LIFECYCLE_EXAMPLES") or 24)
CI_STEPS = 50
LIMIT_S = {"check": 120.0, "crash": 120.0}  # per rule; others 60 s


# -- figures -------------------------------------------------------------------------------------


@dataclasses.dataclass
class Figures:
    sequences: int = 0
    rules: Counter[str] = dataclasses.field(default_factory=Counter)
    kills: Counter[str] = dataclasses.field(default_factory=Counter)
    tolerated: Counter[str] = dataclasses.field(default_factory=Counter)
    events: Counter[str] = dataclasses.field(default_factory=Counter)
    failures: list[str] = dataclasses.field(default_factory=list)
    history: list[str] = dataclasses.field(default_factory=list)  # of the last failing sequence
    started: float = dataclasses.field(default_factory=time.monotonic)

    def as_dict(self) -> dict[str, Any]:
        return {
            "wall_s": round(time.monotonic() - self.started, 1),
            "sequences": self.sequences,
            "rules": sum(self.rules.values()),
            "per_rule": dict(self.rules.most_common()),
            "kills": dict(self.kills.most_common()),
            "events": dict(self.events.most_common()),
            "tolerated_known_defects": dict(self.tolerated.most_common()),
            "failures": self.failures,
        }


FIG = Figures()


# -- time limits ---------------------------------------------------------------------------------


class RuleTimeout(Exception):
    """A rule did not finish within its bound: something hangs."""


@contextlib.contextmanager
def bounded(seconds: float, what: str) -> Iterator[None]:
    """Raise :class:`RuleTimeout` in the main thread after ``seconds`` (and dump every
    thread's stack first).  Waits on locks, events and joins are interrupted by it."""

    def fire(_signum: int, _frame: Any) -> None:
        faulthandler.dump_traceback(all_threads=True)
        raise RuleTimeout(f"{what} took more than {seconds:.0f} s")

    old = signal.signal(signal.SIGALRM, fire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


def counted(name: str, *, damage: bool = False) -> Callable[[Callable[..., None]], Callable[..., None]]:
    """A rule body: counted, numbered, and bounded in time.  At most two rules that damage
    or litter the tiers run in a row (hypothesis enables a random subset of rules per
    sequence; without this some sequences are nothing but wipes)."""

    def wrap(fn: Callable[..., None]) -> Callable[..., None]:
        @functools.wraps(fn)
        def run(self: Lifecycle, *args: Any, **kwargs: Any) -> None:
            FIG.rules[name] += 1
            self.rule += 1
            self.history.append(f"{self.rule} {name} {args or ''}{kwargs or ''}"[:300])
            self.streak = self.streak + 1 if damage else 0
            self.keeps = []
            self.observed = []
            self.created = []
            self.k4 = False
            self.retired.clear()
            self.errors_seen = len(self.log.records)
            try:
                with bounded(LIMIT_S.get(name, 60.0), name):
                    fn(self, *args, **kwargs)
            except BaseException as exc:  # for a failure that does not replay: what it was
                FIG.history = [*self.history[-40:], f"  failed: {type(exc).__name__}: {exc}"[:2000]]
                raise

        return run

    return wrap


class _Records(logging.Handler):
    """flashckpt's log records at WARNING and above (errors and dead threads fail the test)."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


# -- the machine ---------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Cfg:
    local: bool
    keep: int | None
    compression: dict[str, str | None]
    persist_every: int

    @property
    def tiers(self) -> tuple[str, ...]:
        return ("memory", "local", "storage") if self.local else ("memory", "storage")

    @property
    def persistent(self) -> tuple[str, ...]:
        return self.tiers[1:]


class Lifecycle(RuleBasedStateMachine):
    base: Path = Path("/tmp")  # the test sets it (its own tmp_path)
    #: every memory root a machine of this process made (the fixture removes what is left)
    mem_roots: ClassVar[list[Path]] = []

    def __init__(self) -> None:
        super().__init__()
        FIG.sequences += 1
        tag = uuid.uuid4().hex[:12]
        self.dir = self.base / f"seq-{tag}"
        self.mem_root = Path("/dev/shm") / f"flashckpt-lifecycle-{tag}"
        Lifecycle.mem_roots.append(self.mem_root)
        self.roots = {
            "memory": self.mem_root / SHARD,
            "local": self.dir / "local",
            "storage": self.dir / "storage",
        }
        self.model = Model()
        self.damage = Damage(self.roots)
        self.ckpt: flashckpt.Checkpointer | None = None
        self.cfg: Cfg | None = None
        self.pending: Node | str | None = None  # what the last restore of this Checkpointer gave
        self.prev_step: int | None = None  # the last step saved or restored by it
        self.last: Node | None = None  # the last snapshot it saved or restored
        self.run_known: str | None = None  # the storage tier's run when it was made
        self.scan: Scan = scan(self.roots)
        #: which save each (generation, step) was, learned while its copies could be read (a
        #: copy whose manifest is damaged still has a commit record, and retention counts it)
        self.order_uid: dict[tuple[int, int], int] = {}
        self.rule = 0
        self.keeps: list[int | None] = []  # keep of every Checkpointer that ran in this rule
        self.observed: list[tuple[str, int]] = []  # (tier, uid) reported durable in this rule
        self.created: list[Node] = []  # saves made in this rule
        self.k4 = False  # this rule restored or closed while the last snapshot was not the newest save
        self.streak = 0  # damage rules in a row
        self.history: list[str] = []  # rules and what they did (failures that do not replay)
        #: retention passes of this rule (the parent's, via the event seam; a child's, reported)
        self.retired: list[Retirement] = []
        self._unwatch = watch_retention(self.roots, self.retired.append)
        self.foreign: dict[Path, bytes] = {}
        self.log = _Records()
        self.errors_seen = 0
        self.opened_at = 0  # the rule that opened the Checkpointer in use
        #: objects the test damaged that were still damaged at the last check: a log of this
        #: rule may be about one the engine has replaced since (a step saved again)
        self.damaged_at_check: set[tuple[str, str]] = set()
        lg = logging.getLogger("flashckpt")
        lg.addHandler(self.log)
        self._propagate = lg.propagate
        lg.propagate = False  # thousands of expected warnings (damage, rollbacks)

    # -- rules: the Checkpointer -----------------------------------------------------------
    @precondition(lambda self: self.ckpt is None)
    @rule(
        local=st.booleans(),
        keep=st.sampled_from([3, 1, 2, None]),
        comp_local=st.sampled_from(COMPRESSION),
        comp_storage=st.sampled_from(COMPRESSION),
        persist_every=st.sampled_from([1, 2, 3]),
    )
    @counted("open")
    def open(
        self,
        local: bool,
        keep: int | None,
        comp_local: str | None,
        comp_storage: str | None,
        persist_every: int,
    ) -> None:
        """A new Checkpointer on the same directories, and its first restore."""
        cfg = Cfg(local, keep, {"local": comp_local, "storage": comp_storage}, persist_every)
        self.run_known = read_run(self.roots["storage"])
        self.keeps.append(keep)
        self.ckpt = flashckpt.Checkpointer(
            self.roots["storage"],
            local_dir=self.roots["local"] if local else None,
            memory_dir=self.mem_root,
            keep=keep,
            persist_every=persist_every,
            compression=cfg.compression if local else {"storage": comp_storage},
            options=OPTS,
        )
        self.cfg = cfg
        self.opened_at = self.rule
        self.pending, self.prev_step, self.last = None, None, None
        self._restore(None)

    @precondition(lambda self: self.ckpt is not None)
    @rule(
        saves=st.lists(
            st.tuples(st.sampled_from(DELTAS), st.booleans(), st.booleans(), st.booleans()),
            min_size=1,
            max_size=3,
        )
    )
    @counted("save")
    def save(self, saves: list[tuple[int, bool, bool, bool]]) -> None:
        """One to three saves back to back (a third one waits for a slot), each with the
        next step or a lower one, moments changed or not, forced or not, waited for or not."""
        assert self.ckpt is not None and self.cfg is not None
        self.keeps.append(self.cfg.keep)
        handles = []
        for delta, unchanged, force, wait in saves:
            base = self._base()
            step = max(0, (self.prev_step if self.prev_step is not None else -1) + delta)
            uid = self.model.new_uid()
            m_seed = base.m_seed if unchanged and base is not None else uid
            h = self.ckpt.save(step, content(uid, step, m_seed), force=force)
            assert h is not None
            restored = self.pending is not None
            node = self.model.add(uid, step, m_seed, base, "save", restored=restored)
            self.created.append(node)
            self.pending, self.prev_step, self.last = None, step, node
            handles.append((node, h))
            if wait:
                h.wait(timeout=60)
        self._quiesce()
        for node, h in handles:
            assert h.done(), h
            for t in h.durable_on():
                if t in ("local", "storage"):
                    self.observed.append((t, node.uid))

    @precondition(lambda self: self.ckpt is not None)
    @rule()
    @counted("restore")
    def restore_latest(self) -> None:
        self._restore(None)

    @precondition(lambda self: self.ckpt is not None)
    @rule(data=st.data())
    @counted("restore_step")
    def restore_step(self, data: st.DataObject) -> None:
        on_chain = sorted({n.step for n in self.model.chain()}) or [0]
        every = sorted({n.step for n in self.model.nodes.values()}) or [0]
        pick = data.draw(st.tuples(st.integers(0, 2), st.integers(0, 1 << 16)), label="step")
        steps = [on_chain, every, list(range(13))][pick[0]]
        want = steps[pick[1] % len(steps)]
        self._restore(want)

    @precondition(lambda self: self.ckpt is not None)
    @rule()
    @counted("close")
    def close(self) -> None:
        """A clean close, then what must hold of every tier afterwards."""
        assert self.ckpt is not None and self.cfg is not None
        self.keeps.append(self.cfg.keep)
        self.k4 = self.k4 or (self.last is not None and self.last is not self.model.head)
        before = scan(self.roots)
        refused = False  # close refused to persist memory bytes the test damaged
        try:
            self.ckpt.close()
        except flashckpt.CorruptCheckpointError as exc:
            if not self._damaged_memory(str(exc)):
                raise
            refused = True
        cfg, last = self.cfg, self.last
        self.ckpt = self.cfg = None
        self._after_close(cfg, last, before, refused)

    # hypothesis draws among enabled rules uniformly: the lifecycle's own rules twice as often
    reopen = open
    save_more = save

    # -- rules: a crash ---------------------------------------------------------------------
    @precondition(lambda self: self.ckpt is None)
    @rule(
        local=st.booleans(),
        keep=st.sampled_from([3, 1, 2, None]),
        comp_local=st.sampled_from(COMPRESSION),
        comp_storage=st.sampled_from(COMPRESSION),
        persist_every=st.sampled_from([1, 2, 3]),
        saves=st.lists(st.tuples(st.sampled_from(DELTAS), st.booleans(), st.booleans()), max_size=5),
        kill=st.one_of(
            st.tuples(st.just("hook"), st.sampled_from(POINTS), st.integers(1, 6)),
            st.tuples(st.just("staged"), st.integers(1, 5)),
            st.tuples(st.just("delay"), st.sampled_from([0.0, 0.005, 0.02, 0.05, 0.1, 0.3])),
            st.just(("end",)),
        ),
    )
    @counted("crash")
    def crash(
        self,
        local: bool,
        keep: int | None,
        comp_local: str | None,
        comp_storage: str | None,
        persist_every: int,
        saves: list[tuple[int, bool, bool]],
        kill: tuple[Any, ...],
    ) -> None:
        """A training process on the same directories restores, saves and is SIGKILLed."""
        cfg = Cfg(local, keep, {"local": comp_local, "storage": comp_storage}, persist_every)
        self.keeps.append(keep)
        run_known = read_run(self.roots["storage"])
        before = scan(self.roots)
        uids = [self.model.new_uid() for _ in saves]
        child = {
            "storage": str(self.roots["storage"]),
            "local": str(self.roots["local"]) if local else None,
            "memory": str(self.mem_root),
            "keep": keep,
            "persist_every": persist_every,
            "compression": cfg.compression if local else {"storage": comp_storage},
            "saves": [(u, d, unchanged, wait) for u, (d, unchanged, wait) in zip(uids, saves, strict=True)],
            "hook": (kill[1], kill[2]) if kill[0] == "hook" else None,
        }
        rep = run_child(child, kill)
        said = [m[:3] if m[0] != "RETIRE" else ("RETIRE", m[1].tier, m[1].step) for m in rep.messages]
        self.history.append(f"  child: {said}"[:1500])
        FIG.kills[kill[0] if kill[0] != "hook" else f"hook {kill[1]}"] += 1
        if rep.at is not None:
            FIG.events[f"killed at {rep.at[1]}"] += 1
        assert not rep.hung, f"the crash child hung: {rep.messages}"
        assert rep.error is None, f"the crash child failed: {rep.error}"
        assert rep.exitcode == -signal.SIGKILL, f"the crash child ended with {rep.exitcode}: {rep.messages}"
        after = scan(self.roots)
        base: Node | str | None = None
        if rep.restored is not None:
            if rep.restored[0] == "RESTORE_FAILED":
                self._judge_failure(before, cfg.tiers, run_known, None, rep.restored[1], rep.restored[2])
                return
            _, r, meta, problem = rep.restored
            assert problem is None, f"the child's restore is not bitwise: {problem}"
            base = self._judge(before, cfg.tiers, run_known, None, r, meta)
        prev = base
        restored = rep.restored is not None
        for i, (uid, step, m_seed) in enumerate(rep.saving):
            # the save in flight when the kill came happened if a copy of it exists
            if uid not in rep.staged:
                assert i == len(rep.saving) - 1, rep.messages
                if not any(c.uid == uid for t in TIERS for c in after.copies[t]):
                    FIG.events["in-flight save lost"] += 1
                    break
                FIG.events["in-flight save kept"] += 1
            parent = None if prev in (None, ROOT) else prev
            prev = self.model.add(uid, step, m_seed, parent, "child", restored=restored)  # type: ignore[arg-type]
            restored = False
            self.created.append(prev)
        self.retired += rep.retired
        for uid, tiers in rep.durable.items():
            self.observed += [(t, uid) for t in tiers if t in ("local", "storage")]

    crash_again = crash

    # -- rules: damage -----------------------------------------------------------------------
    @precondition(lambda self: self.ckpt is None and self.streak < 2)
    @rule()
    @counted("wipe_memory", damage=True)
    def wipe_memory(self) -> None:
        """A new node: the memory tier is gone (only when no Checkpointer has it open)."""
        self._wipe("memory", self.mem_root)

    @precondition(lambda self: self.streak < 2)
    @rule(tier=st.sampled_from(["local", "storage"]))
    @counted("wipe", damage=True)
    def wipe(self, tier: str) -> None:
        """The local disk or the storage tier is lost (also under an open Checkpointer)."""
        self._quiesce()
        self._wipe(tier, self.roots[tier])

    @precondition(lambda self: self.streak < 2)
    @rule(
        tier=st.sampled_from(TIERS),
        what=st.sampled_from(["chunk", "manifest", "commit", "slot"]),
        how=st.sampled_from(["flip", "truncate", "delete"]),
        data=st.data(),
    )
    @counted("corrupt", damage=True)
    def corrupt(self, tier: str, what: str, how: str, data: st.DataObject) -> None:
        """Flip a byte of, truncate or delete one stored object."""
        # every draw up front, whatever is stored: a crash's timing changes what is there
        # between runs of one sequence, and hypothesis replays sequences draw by draw
        pick, cut, pos = data.draw(st.tuples(*[st.integers(0, 1 << 24)] * 3), label="key, size, pos")
        self._quiesce()
        root = self.roots[tier]
        if tier == "memory":
            what = {"chunk": "slot", "commit": "manifest"}.get(what, what)
            pattern = r"step-\d{12}\.manifest" if what == "manifest" else r"slot-[01]\.bin"
        else:
            what = "chunk" if what == "slot" else what
            pattern = {
                "chunk": r"chunks/[0-9a-f]{2}/[0-9a-f]{32}\.(raw|zstd|zstd-bg[248])-1",
                "manifest": r"steps/\d{12}/r\d{5}-of-\d{5}\.manifest",
                "commit": r"commits/step-\d{12}",
            }[what]
        keys = sorted(
            k
            for p in (root.rglob("*") if root.is_dir() else [])
            if re.fullmatch(pattern, k := p.relative_to(root).as_posix())
        )
        if what == "slot":
            # an unsealed snapshot (a crash before its checksums) cannot tell damage from data
            unsealed = {c.deps[1] for c in self.scan.copies["memory"] if c.listed and not c.sealed}
            keys = [k for k in keys if k not in unsealed]
            if self.ckpt is not None:
                how = "flip"  # a mapped slot file is never cut (SIGBUS) nor unlinked under it
        if not keys:
            FIG.events["corrupt: nothing to damage"] += 1
            return
        key = keys[pick % len(keys)]
        path = root / key
        size = path.stat().st_size
        FIG.events[f"corrupt {tier} {what} {how}"] += 1
        self.history.append(f"  {how} {tier} {key} (size {size}, cut {cut % max(size, 1)}, pos {pos})")
        if how == "delete" or (how == "truncate" and size == 0):
            path.unlink()
            if what == "slot":
                self.damage.hit_slot(self.scan, key, 0, 1 << 62, self.rule)
        elif how == "truncate":
            os.truncate(path, cut % size)
            if what == "slot":
                self.damage.hit_slot(self.scan, key, cut % size, 1 << 62, self.rule)
        else:
            if size == 0:
                return
            hi = size
            if what == "slot":  # aim at bytes a snapshot holds
                ends = [r[2] for c in self.scan.copies["memory"] if c.listed for r in c.ranges if r[0] == key]
                hi = min(size, max(ends, default=size))
            pos %= hi
            with open(path, "r+b") as f:
                f.seek(pos)
                old = f.read(1)[0]
                f.seek(pos)
                f.write(bytes([old ^ 0xA5]))
            if what == "slot":
                self.damage.hit_slot(self.scan, key, pos, pos + 1, self.rule)
                return
        self.damage.record(tier, key, self.rule)

    @precondition(lambda self: len(self.foreign) < 6 and self.streak < 2)
    @rule(where=st.sampled_from(["local", "storage", "memory"]), name=st.sampled_from(FOREIGN))
    @counted("foreign", damage=True)
    def foreign_file(self, where: str, name: str) -> None:
        """A file that is not flashckpt's (an editor's, a file system's, a user's note)."""
        root = self.mem_root if where == "memory" else self.roots[where]
        path = root / name
        if path.exists():
            return
        path.parent.mkdir(parents=True, exist_ok=True)
        data = f"not flashckpt's: {name} {self.rule}".encode()
        path.write_bytes(data)
        self.foreign[path] = data

    # -- the invariant ------------------------------------------------------------------------
    @invariant()
    def check(self) -> None:
        with bounded(LIMIT_S["check"], "check"):
            self._quiesce()
            now = scan(self.roots)
            problems: list[str] = []
            self._check_copies(now, problems)
            self._check_losses(self.scan, now, problems)
            for path, data in self.foreign.items():
                try:
                    got = path.read_bytes()
                except OSError as exc:
                    got = repr(exc).encode()
                if got != data:
                    problems.append(f"foreign file {path} was changed or deleted: {got[:60]!r}")
            bad = [
                r
                for r in self.log.records[self.errors_seen :]
                if (r.levelno >= logging.ERROR or "retention on" in r.getMessage())
                and not self._excused_log(r)
            ]
            problems += [f"flashckpt logged: {r.levelname} {r.getMessage()}" for r in bad]
            self.errors_seen = len(self.log.records)
            self.damaged_at_check = {k for k in self.damage.files if self.damage.live(*k)}
            self.scan = now
            self._learn_orders(now)
            if problems:
                FIG.history = [*self.history[-40:], "  failed: " + "; ".join(problems)[:2000]]
            assert not problems, "\n".join(problems)

    def _excused_log(self, r: logging.LogRecord) -> bool:
        """Errors that the test's own damage explains: retention stops (reported, chunks kept)
        while a kept step's manifest is damaged (it cannot know which chunks that step
        references; the manifest may have been replaced since, by the step saved again in the
        same rule); close cannot persist a snapshot whose memory manifest is damaged."""
        m = re.search(
            r"retention on the (\w+) tier .* failed: \w+: .*?(steps/\d{12}/r\d{5}-of-\d{5}\.manifest)",
            r.getMessage(),
        )
        if m is not None and (
            self.damage.live(m.group(1), m.group(2)) or (m.group(1), m.group(2)) in self.damaged_at_check
        ):
            FIG.events["retention stopped by a damaged manifest"] += 1
            return True
        if self._damaged_memory(r.getMessage()):
            return True
        # close() cannot persist a memory-only snapshot whose memory manifest the test damaged
        m = re.search(r"memory manifest of step (\d+) in ", r.getMessage())
        if m is not None and self.damage.live("memory", f"step-{int(m.group(1)):012d}.manifest"):
            FIG.events["close: a damaged memory manifest"] += 1
            return True
        return False

    def teardown(self) -> None:
        self._unwatch()
        lg = logging.getLogger("flashckpt")
        lg.removeHandler(self.log)
        lg.propagate = self._propagate
        try:
            if self.ckpt is not None:
                with bounded(60, "teardown close"), contextlib.suppress(Exception):
                    self.ckpt.close()
        finally:
            self.ckpt = None
            shutil.rmtree(self.dir, ignore_errors=True)
            shutil.rmtree(self.mem_root, ignore_errors=True)

    # -- helpers ------------------------------------------------------------------------------
    def _base(self) -> Node | None:
        """What the next save continues from: the last restore's result, else the last save."""
        if self.pending is ROOT:
            return None
        if isinstance(self.pending, Node):
            return self.pending
        return self.model.head

    def _quiesce(self) -> None:
        """Every background job of the open Checkpointer done (its errors fail the test,
        except those the test's own damage explains)."""
        if self.ckpt is not None:
            try:
                self.ckpt.wait(timeout=60)
            except flashckpt.CorruptCheckpointError as exc:
                if not self._damaged_memory(str(exc)):
                    raise

    def _damaged_memory(self, msg: str) -> bool:
        """``msg`` says a memory snapshot was not persisted (salvage, close) because its bytes
        fail their checksum, and the test flipped or cut bytes of a slot file: the engine
        refused to store damaged bytes, as it must."""
        if (
            re.search(r"the chunk at \d+ in memory fails its checksum; not written", msg)
            and self.damage.slot_ranges
        ):
            FIG.events["damaged memory snapshot refused"] += 1
            return True
        return False

    def _restore(self, want: int | None) -> None:
        assert self.ckpt is not None and self.cfg is not None
        self.keeps.append(self.cfg.keep)
        self.k4 = self.k4 or (self.last is not None and self.last is not self.model.head)
        tiers = self.cfg.tiers
        before = scan(self.roots)
        listed = [
            c.order for t in tiers for c in before.copies[t] if usable(c, tiers, self.run_known) and c.order
        ]
        latest = self.ckpt.latest_step()
        assert latest == (max(listed)[1] if listed else None), (latest, sorted(listed))
        state = template()
        w = state["model"]["w"]
        try:
            r = self.ckpt.restore(state) if want is None else self.ckpt.restore(state, step=want)
        except (flashckpt.CheckpointNotFound, flashckpt.CorruptCheckpointError) as exc:
            self._judge_failure(before, tiers, self.run_known, want, type(exc).__name__, str(exc))
            if isinstance(exc, flashckpt.CorruptCheckpointError):
                self.pending, self.prev_step = ROOT, None
            else:
                self.prev_step = None
            return
        meta = meta_of(state) if r is not None else None
        if r is not None:
            assert state["model"]["w"] is w, "restore replaced a tensor it should fill in place"
            assert meta is not None, "the restored state has no meta"
            problem = diff(state, content(*meta))
            assert problem is None, f"restore({want}) -> {r}: not bitwise what was saved: {problem}"
        got = self._judge(before, tiers, self.run_known, want, r, meta)
        self.pending = got
        self.prev_step = r
        if isinstance(got, Node):
            self.last = got

    def _judge(
        self,
        before: Scan,
        tiers: tuple[str, ...],
        run_known: str | None,
        want: int | None,
        r: int | None,
        meta: tuple[int, int, int] | None,
    ) -> Node | str:
        """Check a restore's result against the model; returns what the run continues from."""
        expect = model_pick(self.model, before, tiers, run_known, want, self.order_uid)
        what = f"restore(step={'latest' if want is None else want}) on {tiers}"
        if r is None:
            assert want is None, f"{what} returned None"
            assert expect is None, f"{what} returned None; expected {expect} ({self._where(before, expect)})"
            return ROOT
        assert meta is not None and meta[1] == r, (r, meta)
        node = self.model.nodes.get(meta[0])
        assert node is not None, f"{what} returned a snapshot no save made: {meta}"
        assert (node.step, node.m_seed) == meta[1:], (node, meta)
        if expect is not None and node is expect:
            FIG.events["restore: newest" if node is self.model.head else "restore: fell back"] += 1
            return node
        self._tolerate(
            "K1",
            False,
            f"{what} returned {node}, expected {expect}; chain {self.model.chain()[:6]}; "
            f"copies: {self._where(before, node)}; expected's: {self._where(before, expect)}",
        )
        return node

    def _judge_failure(
        self,
        before: Scan,
        tiers: tuple[str, ...],
        run_known: str | None,
        want: int | None,
        kind: str,
        msg: str,
    ) -> None:
        expect = model_pick(self.model, before, tiers, run_known, want, self.order_uid)
        assert expect is None, f"restore(step={want}) raised {kind}: {msg}; expected {expect}"
        if kind == "CheckpointNotFound":
            assert want is not None, f"restore() raised {kind}: {msg}"
        else:
            assert kind == "CorruptCheckpointError", (kind, msg)

    def _tolerate(self, known: str, explained: bool, message: str) -> None:
        if explained and known in KNOWN:
            FIG.tolerated[known] += 1
            return
        raise AssertionError(message)

    def _where(self, s: Scan, node: Node | None) -> list[Copy]:
        if node is None:
            return []
        return [c for t in TIERS for c in s.copies[t] if c.uid == node.uid]

    def _wipe(self, tier: str, path: Path) -> None:
        root = self.roots[tier]
        if root.is_dir():
            for p in root.rglob("*"):
                if p.is_file():
                    self.damage.files[(tier, p.relative_to(root).as_posix())] = (None, self.rule)
        self.damage.wiped[tier] = self.rule
        shutil.rmtree(path, ignore_errors=True)
        self.foreign = {p: d for p, d in self.foreign.items() if not p.is_relative_to(path)}

    def _check_copies(self, now: Scan, problems: list[str]) -> None:
        for tier in TIERS:
            for c in now.copies[tier]:
                if c.meta is not None:
                    node = self.model.nodes.get(c.meta[0])
                    if node is None:
                        problems.append(f"{c}: a snapshot no save made")
                    elif (node.step, node.m_seed) != c.meta[1:]:
                        problems.append(f"{c}: is not what save {node} held")
                if c.intact and c.content_problem:
                    problems.append(f"{c}: verifies but holds other bytes: {c.content_problem}")
                if not c.intact and not self.damage.touches(c):
                    known = "K6" if c.reencoded else "K3"
                    explained = c.reencoded or self.damage.taints(c)
                    self._note(
                        problems, known, explained, f"{c}: broken, and not by the test{self._detail(c)}"
                    )

    def _check_losses(self, before: Scan, now: Scan, problems: list[str]) -> None:
        """No save of the current timeline lost a copy that verified, except as allowed."""
        chain = self.model.chain()
        pos = {n.uid: i for i, n in enumerate(chain)}  # 0: the newest
        head = self.model.head
        keep = min((k for k in self.keeps if k is not None), default=None)  # None: no retention ran
        items: list[tuple[str, int, Copy | None]] = [
            (c.tier, c.uid, c) for t in TIERS for c in before.copies[t] if c.intact and c.uid is not None
        ]
        items += [(t, uid, None) for t, uid in self.observed]
        # a save that returned is in memory at least
        where = [now.on(t, head.uid) for t in TIERS] if head is not None and head in self.created else []
        if (
            where
            and not any(x is not None and x.intact for x in where)
            and not any(x is not None and self.damage.touches(x, since=self.rule) for x in where)
        ):
            problems.append(f"the newest save {head} has no intact copy anywhere: {where}")
        for tier, uid, was in items:
            cur = now.on(tier, uid)
            if cur is not None and cur.intact:
                continue
            if uid not in pos:
                continue  # the run left it: retired or replaced at will
            node = self.model.nodes[uid]
            if any(n.step == node.step for n in chain[: pos[uid]]):
                continue  # a newer save of its step number took its place (one per tier)
            if was is not None and self.damage.touches(was, since=self.rule):
                continue
            if cur is not None and self.damage.touches(cur, since=self.rule):
                continue
            if was is None and cur is not None and cur.listed and self.damage.touches(cur):
                # Reported durable, but it references an object the test damaged in place
                # after an older step wrote it: a save reuses the chunks its tier's newest
                # commit holds without reading them back (a deleted basis commit is noticed,
                # bitrot is not: restore and verify are where it shows; docs/reliability.md).
                # (Before the known-defect explanations: the object the test damaged itself
                # explains the broken copy, whatever else holds the same bytes.)
                FIG.events["durable save reuses an object the test damaged"] += 1
                continue
            if cur is not None and cur.reencoded:
                self._note(problems, "K6", True, f"{node}'s {tier} copy was broken: {cur}")
                continue
            if cur is not None and self.damage.taints(cur):
                self._note(problems, "K3", True, f"{node}'s {tier} copy was destroyed: {cur}")
                continue
            if tier == "memory":
                # a memory copy is a cache once the step is committed on the persistent tiers
                # (their bytes are not read again: damage there is the test's); the newest
                # save's memory copy is never dropped while it is its only one
                # (a copy whose manifest the test damaged has no uid: known by its order)
                others = [self._on(now, t, uid) for t in ("local", "storage")]
                if (
                    node is head
                    and not any(x is not None and x.intact for x in others)
                    and not any(x is not None and x.listed for x in others)
                ):
                    # K7: a commit of another save with this save's (generation, step) made the
                    # engine take this memory copy for durable
                    same = was is not None and any(
                        x.listed and x.order == was.order and x.uid != uid
                        for t in ("local", "storage")
                        for x in now.copies[t]
                    )
                    self._note(
                        problems,
                        "K7" if same else "K4",
                        same or self.k4,
                        f"the newest save {node} lost its last copy (memory): {cur}",
                    )
                continue
            verdict = self._retirement(node, tier, keep)
            if verdict == "fair":
                continue
            self._note(
                problems,
                "K1",
                verdict == "K1",
                f"{node} (on the timeline) lost its intact {tier} copy ({cur}): "
                + ("no retention pass retired it" if verdict is None else f"retired with keep {self.keeps}"),
            )

    def _on(self, s: Scan, tier: str, uid: int) -> Copy | None:
        """Save ``uid``'s copy on ``tier``: by the uid its tree names, else (its manifest
        unreadable) by the order its commit record names, if the model saw that order's uid."""
        c = s.on(tier, uid)
        if c is not None:
            return c
        return next(
            (x for x in s.copies[tier] if x.uid is None and x.order and self.order_uid.get(x.order) == uid),
            None,
        )

    def _learn_orders(self, s: Scan) -> None:
        for t in TIERS:
            for c in s.copies[t]:
                if c.uid is not None and c.order is not None:
                    self.order_uid.setdefault(c.order, c.uid)

    def _retirement(self, node: Node, tier: str, keep: int | None) -> str | None:
        """Judge the retention pass that retired ``node`` on ``tier`` in this rule, from what
        the tier listed at that moment: ``"fair"`` if some snapshot J listed then has
        ``node`` on its timeline with ``keep`` newer saves of that timeline listed (the pass
        after J's commit may retire it), ``"K1"`` if only the engine's timeline rule says so,
        None if no pass retired it."""
        events = [r for r in self.retired if r.tier == tier and r.step == node.step]
        events = [r for r in events if any(u == node.uid for u, _ in r.listed)]
        if not events:
            return None
        for r in events:
            # a commit record counts whether or not its manifest can be read (the test may
            # have damaged it): retention counts commits, it does not read their data
            listed = {u if u is not None else self.order_uid.get(o) for u, o in r.listed} - {None}
            for j in (self.model.nodes[u] for u in listed if u in self.model.nodes):
                newer, n = 0, j
                while n is not None and n is not node:
                    newer += n.uid in listed
                    n = n.parent
                if n is node and keep is not None and newer >= keep:
                    return "fair"
        for r in events:
            orders = [o for _, o in r.listed]
            mine = next(o for u, o in r.listed if u == node.uid)
            current = [o for o in orders if o > mine and o not in abandoned(orders)]
            if keep is not None and len(current) >= keep:
                return "K1"
        return "unfair"

    def _detail(self, c: Copy) -> str:
        """What the test did to the objects a broken copy relies on (for failures that do not
        replay: a crash's timing)."""
        out = [f"deps {c.deps[:4]}", f"made_ns {c.made_ns}"]
        out += [
            f"file damage {k}: {v}" for k, v in self.damage.files.items() if k[0] == c.tier and k[1] in c.deps
        ]
        out += [f"slot damage {r}" for r in self.damage.slot_ranges if c.tier == "memory" and r[0] in c.deps]
        for slot in (d for d in c.deps if d.startswith("slot-")):
            with contextlib.suppress(OSError):
                out.append(f"{slot}: {os.stat(self.roots['memory'] / slot).st_size} bytes")
        return "\n    " + "\n    ".join(out) + "\n  history:\n    " + "\n    ".join(self.history[-40:])

    def _note(self, problems: list[str], known: str, explained: bool, message: str) -> None:
        if explained and known in KNOWN:
            FIG.tolerated[known] += 1
        else:
            problems.append(message)

    def _after_close(self, cfg: Cfg, last: Node | None, before: Scan, refused: bool = False) -> None:
        deadline = time.monotonic() + 5
        while True:
            left = [t.name for t in threading.enumerate() if t.name.startswith("flashckpt-")]
            if not left or time.monotonic() > deadline:
                break
            time.sleep(0.02)
        assert not left, f"threads left after close: {left}"
        s = scan(self.roots)
        # what close() checks: a commit record of the last snapshot's (generation, step) on
        # every tier (its records, not its bytes)
        order = next(
            (c.order for x in (before, s) for t in TIERS for c in x.copies[t] if last and c.uid == last.uid),
            None,
        )
        if order is None and last is not None:  # every copy's tree damaged: the order it had
            order = next((o for o, u in self.order_uid.items() if u == last.uid), None)
        durable = last is None or (
            order is not None
            and all(any(c.listed and c.order == order for c in s.copies[t]) for t in cfg.persistent)
        )
        kept = self.roots["memory"].exists()
        if kept:
            mem_ok = last is not None and any(c.listed and c.uid == last.uid for c in before.copies["memory"])
            if durable and mem_ok and refused:
                # the newest snapshot (not the one the run continues from, after a restore)
                # could not be persisted: its memory bytes were damaged by the test
                FIG.events["close kept memory: a damaged snapshot was not persisted"] += 1
            else:
                assert not (durable and mem_ok), (
                    f"a clean close kept the memory tier though {last} is durable"
                )
        else:
            # close keeps the memory tier while a snapshot it can read there is not durable; a
            # snapshot whose manifest the test damaged is not one it can read (nothing is lost)
            readable = last is not None and any(
                c.listed and c.uid == last.uid for c in before.copies["memory"]
            )
            if not durable and readable and order is not None:
                # a persistent tier the test wiped since this Checkpointer opened: close makes
                # the newest snapshot durable there again, not an older one a restore returned;
                # nothing is lost while another persistent tier holds it
                missing = [
                    t for t in cfg.persistent if not any(c.listed and c.order == order for c in s.copies[t])
                ]
                wiped = all(self.damage.wiped.get(t, -1) >= self.opened_at for t in missing)
                if wiped and len(missing) < len(cfg.persistent):
                    FIG.events["close: the run's step is missing only on a tier the test wiped"] += 1
                    durable = True
            assert durable or not readable, (
                f"close released the memory tier, but {last} is not committed on every tier"
            )
        for tier in ("local", "storage"):
            root = self.roots[tier]
            if not (root / "commits").is_dir():
                continue
            out = io.StringIO()
            with contextlib.redirect_stdout(out), contextlib.redirect_stderr(io.StringIO()):
                rc = cli.main(["verify", str(root)])
            text = out.getvalue()
            bad = {int(m) for m in re.findall(r"step (\d+): CORRUPT", text)}
            want_bad = {c.step for c in s.copies[tier] if not c.intact}
            assert bad == want_bad, (
                f"flashckpt verify {tier}: corrupt {sorted(bad)}, broken {sorted(want_bad)}"
            )
            assert rc == (1 if want_bad else 0), (rc, text)
            for c in s.copies[tier]:
                if not c.intact:
                    assert self.damage.touches(c), f"verify {tier}: {c} is broken, and not by the test"
                    continue
                got = flashckpt.load(root, step=c.step, options=OPTS)
                problem = diff(got, content(*c.meta)) if c.meta else "no meta"
                assert problem is None, f"flashckpt.load({tier}, step={c.step}): {problem}"
            self._check_load_latest(tier, root, s)

    def _check_load_latest(self, tier: str, root: Path, s: Scan) -> None:
        """``flashckpt.load(url)`` gives what a restore from that tier alone would."""
        expect = model_pick(self.model, s, (tier,), None, None, self.order_uid)
        try:
            got = meta_of(flashckpt.load(root, options=OPTS))
        except flashckpt.CheckpointNotFound:
            got = None
        if (got and got[0]) == (expect and expect.uid):
            return
        by_number = max((c for c in s.copies[tier] if c.intact), key=lambda c: c.step, default=None)
        self._tolerate(
            "K5",
            got is not None and by_number is not None and got == by_number.meta,
            f"flashckpt.load({tier}) gave save {got}, the timeline's newest there is {expect}",
        )


def _settings(examples: int, steps: int, *, fixed: bool = False) -> settings:
    """``fixed``: the same sequences every run (CI: a failure there is a regression, and
    reproducible; exploring new sequences is the long run's job)."""
    return settings(
        max_examples=examples,
        stateful_step_count=steps,
        deadline=None,
        derandomize=fixed,
        database=None,
        suppress_health_check=list(HealthCheck),
        report_multiple_bugs=False,
    )


def _describe(exc: BaseException) -> str:
    """A failure with hypothesis's notes (the sequence) and, for a failure that did not replay
    (a crash's timing), every sub-exception."""
    out = [f"{type(exc).__name__}: {exc}", *getattr(exc, "__notes__", [])]
    for sub in getattr(exc, "exceptions", []):
        out.append("  | " + _describe(sub).replace("\n", "\n  | "))
    return "\n".join(out)


def _print_figures(capsys: pytest.CaptureFixture[str]) -> None:
    figures = FIG.as_dict()
    with capsys.disabled():
        print("\nlifecycle figures:", json.dumps(figures, indent=1))
    out = os.environ.get("FLASHCKPT_LIFECYCLE_REPORT")
    if out:
        Path(out).write_text(json.dumps(figures, indent=1))


@pytest.fixture
def machine_base(tmp_path: Path) -> Iterator[Path]:
    Lifecycle.base = tmp_path
    yield tmp_path
    stop_fork_server()
    for p in Lifecycle.mem_roots:  # ours only: another run on this machine has its own
        shutil.rmtree(p, ignore_errors=True)
    Lifecycle.mem_roots.clear()


@pytest.mark.subprocess
@pytest.mark.timeout(900, method="thread")
def test_lifecycle(machine_base: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """The short run (CI): about two minutes."""
    global FIG
    FIG = Figures()
    try:
        run_state_machine_as_test(
            Lifecycle,
            settings=_settings(
                examples=CI_EXAMPLES, steps=CI_STEPS, fixed=not os.environ.get("FLASHCKPT_LIFECYCLE_EXPLORE")
            ),
        )
    except Exception as exc:
        if FIG.history:  # what the failing run did (a crash's timing may not replay)
            raise AssertionError(
                _describe(exc) + "\n  history of the failing run:\n    " + "\n    ".join(FIG.history)
            ) from exc
        raise
    finally:
        _print_figures(capsys)


class _Drawn:
    """Stands in for hypothesis' ``data`` in a replayed rule: returns the recorded draw."""

    def __init__(self, value: Any) -> None:
        self.value = value

    def draw(self, *_: Any, **__: Any) -> Any:
        return self.value


def _replay(rules: list[tuple[str, dict[str, Any]]]) -> None:
    """Run a sequence of the machine's rules, checking the invariant after each (a shrunk
    sequence hypothesis printed; ``corrupt``'s ``data`` is given as the draw it recorded)."""
    s = Lifecycle()
    try:
        s.check()
        for name, kw in rules:
            if "data" in kw:
                kw = {**kw, "data": _Drawn(kw["data"])}
            getattr(s, name)(**kw)
            s.check()
    finally:
        s.teardown()


_PLAIN = {"comp_local": None, "comp_storage": None, "local": False, "persist_every": 1}


@pytest.mark.subprocess
def test_the_model_knows_a_copy_with_a_damaged_manifest_by_its_order(machine_base: Path) -> None:
    """Found by the 30-minute run of 2026-12-01 (the model's defect, not the engine's): the
    newest step committed, its storage manifest then truncated by the test, and a clean close
    released the memory copy (the step is committed: memory is a cache).  The model looked
    for the storage copy by the uid its tree names, which a damaged manifest no longer says,
    and reported the memory copy as the last one lost."""
    _replay(
        [
            ("open", {**_PLAIN, "keep": 3}),
            ("save", {"saves": [(1, False, False, True), (1, False, False, False), (1, False, False, True)]}),
            ("close", {}),
            ("crash", {**_PLAIN, "keep": 3, "kill": ("hook", "stage.done", 1), "saves": []}),
            ("open", {**_PLAIN, "keep": 1}),
            ("save", {"saves": [(1, True, True, True)]}),
            (
                "corrupt",
                {"data": (2924, 438, 8170), "how": "truncate", "tier": "storage", "what": "manifest"},
            ),
            ("close", {}),
        ]
    )


@pytest.mark.subprocess
def test_the_model_lets_close_release_a_memory_copy_the_test_made_unreadable(machine_base: Path) -> None:
    """Found by the same run (the model's defects): close released the memory tier when the
    last snapshot's memory manifest had been damaged by the test, once with the step still
    committed (its storage manifest damaged too: known by its order now), once with the
    storage tier wiped.  Close keeps the memory tier for snapshots it can read; one whose
    manifest is damaged is not, and nothing is lost by releasing it."""
    _replay(
        [
            ("wipe_memory", {}),
            ("open", {**_PLAIN, "keep": 3}),
            ("close", {}),
            ("crash", {**_PLAIN, "keep": 3, "kill": ("hook", "stage.done", 1), "saves": [(1, False, False)]}),
            ("open", {**_PLAIN, "keep": 3}),
            ("corrupt", {"data": (0, 0, 0), "how": "flip", "tier": "memory", "what": "commit"}),
            ("corrupt", {"data": (0, 0, 0), "how": "flip", "tier": "storage", "what": "manifest"}),
            ("close", {}),
        ]
    )
    _replay(
        [
            ("open", {**_PLAIN, "keep": 3}),
            ("save", {"saves": [(1, True, False, False)]}),
            ("close", {}),
            ("wipe_memory", {}),
            ("open", {**_PLAIN, "comp_local": "zstd:3", "comp_storage": "zstd:3", "keep": 2}),
            ("corrupt", {"data": (24600, 170, 8406287), "how": "flip", "tier": "memory", "what": "commit"}),
            ("wipe", {"tier": "storage"}),
            ("close", {}),
        ]
    )


@pytest.mark.subprocess
def test_the_model_counts_a_rollback_whose_manifest_the_test_damaged(machine_base: Path) -> None:
    """Found by the 30-minute run of 2026-12-01 (the model's defect): steps 0 and 1 saved,
    then step 0 again (a new timeline: 1 is left behind); the new step 0's memory manifest
    deleted and its storage manifest truncated by the test.  Its commit record still names
    its (generation, step), so the engine does not resume the abandoned step 1 (and starts
    from scratch: nothing of the current timeline is intact).  The model took a record whose
    manifest is unreadable for no evidence, and expected step 1."""
    _replay(
        [
            ("wipe_memory", {}),
            ("open", {**_PLAIN, "keep": 3, "persist_every": 3}),
            ("restore_latest", {}),
            ("restore_step", {"data": (0, 1557)}),
            ("restore_step", {"data": (0, 0)}),
            ("restore_latest", {}),
            ("save", {"saves": [(1, True, True, True), (1, True, True, True), (-3, False, True, True)]}),
            ("restore_latest", {}),
            ("corrupt", {"data": (120478, 84, 102776), "how": "delete", "tier": "memory", "what": "commit"}),
            (
                "corrupt",
                {"data": (89245, 1723, 63956), "how": "truncate", "tier": "storage", "what": "manifest"},
            ),
            ("restore_step", {"data": (0, 404)}),
            ("foreign_file", {"name": "commits/step-5", "where": "storage"}),
            ("restore_latest", {}),
        ]
    )


_N1 = {**_PLAIN, "keep": 3}


@pytest.mark.subprocess
def test_a_save_after_restoring_a_missing_step_continues_the_run(machine_base: Path) -> None:
    """The 30-minute run of 2026-12-01 (an engine defect, reported twice): ``restore(step=9)``
    for a step that does not exist raised and reset the Checkpointer's timeline, so the next
    save (step 1) started a timeline with no past, and retention (keep=3) deleted step 0, the
    step it continued from, keeping steps 3 and 5 it had left.  The plain test:
    ``tests/test_trust.py::test_a_restore_of_a_missing_step_leaves_the_timeline_as_it_was``."""
    P = {"comp_local": None, "comp_storage": None}
    _replay(
        [
            ("open", {**P, "keep": 3, "local": False, "persist_every": 3}),
            ("restore_step", {"data": (0, 0)}),
            ("save", {"saves": [(1, False, False, False)] * 3}),
            ("save", {"saves": [(1, False, False, False)] * 3}),
            ("corrupt", {"data": (0, 0, 0), "how": "flip", "tier": "memory", "what": "chunk"}),
            ("restore_step", {"data": (0, 5081)}),
            ("restore_step", {"data": (2, 100)}),
            ("wipe", {"tier": "local"}),
            ("save", {"saves": [(2, False, True, False)]}),
        ]
    )


@pytest.mark.subprocess
def test_the_model_excuses_retention_stopped_by_a_manifest_saved_again_since(machine_base: Path) -> None:
    """The 30-minute run of 2026-12-01 (the model's defect): the test damaged step 1's storage
    manifest; in one later rule retention stopped on it (reported, as it must) and then step 1
    was saved again, replacing the manifest, so the damage was no longer there when the
    model judged the warning.  Damage still there at the previous check now explains it."""
    P = {"comp_local": None, "comp_storage": None}
    _replay(
        [
            (
                "crash",
                {
                    **P,
                    "keep": 3,
                    "kill": ("hook", "stage.done", 1),
                    "local": False,
                    "persist_every": 1,
                    "saves": [],
                },
            ),
            ("wipe_memory", {}),
            ("wipe_memory", {}),
            (
                "crash",
                {
                    **P,
                    "keep": 3,
                    "kill": ("end",),
                    "local": False,
                    "persist_every": 1,
                    "saves": [(1, False, False), (1, False, False)],
                },
            ),
            ("open", {**P, "keep": 3, "local": False, "persist_every": 1}),
            ("save", {"saves": [(0, False, False, False)]}),
            ("corrupt", {"data": (1543, 0, 0), "how": "flip", "tier": "storage", "what": "manifest"}),
            ("save", {"saves": [(1, True, False, False)]}),
            ("restore_latest", {}),
            ("restore_latest", {}),
            (
                "save",
                {"saves": [(1, False, False, False), (-3, False, False, False), (1, False, False, False)]},
            ),
        ]
    )


@pytest.mark.subprocess
def test_restoring_a_step_the_run_had_left_keeps_it_through_close(machine_base: Path) -> None:
    """The 30-minute run of 2026-12-01 (an engine defect): a crashed run left step 5 in memory
    only, then branched to step 2; ``restore(step=5)`` persisted step 5 and retention retired it
    at once as a step of the timeline the run had left, and close released the memory copy.
    The plain test: ``tests/test_trust.py::test_restoring_a_step_the_run_had_left_never_retires_it``."""
    P = {"comp_local": None, "comp_storage": None}
    N1 = _N1
    _replay(
        [
            ("foreign_file", {"name": "README.txt", "where": "local"}),
            ("wipe_memory", {}),
            ("open", {**P, "keep": 3, "local": True, "persist_every": 1}),
            ("close", {}),
            ("wipe_memory", {}),
            ("crash", {**N1, "kill": ("hook", "stage.done", 1), "saves": []}),
            ("wipe", {"tier": "local"}),
            ("wipe_memory", {}),
            ("crash", {**N1, "kill": ("hook", "stage.done", 1), "saves": []}),
            ("foreign_file", {"name": "README.txt", "where": "local"}),
            ("wipe_memory", {}),
            ("open", N1),
            ("close", {}),
            ("wipe_memory", {}),
            ("wipe_memory", {}),
            ("open", N1),
            ("close", {}),
            ("wipe_memory", {}),
            ("wipe_memory", {}),
            ("open", {**N1, "comp_storage": "zstd:3"}),
            ("save", {"saves": [(1, True, False, True), (1, True, True, True), (1, False, False, False)]}),
            ("save", {"saves": [(1, False, False, False)]}),
            ("close", {}),
            ("wipe_memory", {}),
            ("wipe_memory", {}),
            ("open", N1),
            ("close", {}),
            ("wipe_memory", {}),
            ("wipe_memory", {}),
            ("open", N1),
            ("save", {"saves": [(0, True, True, True), (2, True, True, True), (-1, False, True, False)]}),
            ("close", {}),
            ("wipe_memory", {}),
            (
                "open",
                {
                    "comp_local": "none",
                    "comp_storage": "zstd:3",
                    "keep": 2,
                    "local": False,
                    "persist_every": 2,
                },
            ),
            ("close", {}),
            (
                "crash",
                {
                    "comp_local": "zstd:3",
                    "comp_storage": "zstd:3",
                    "keep": 3,
                    "kill": ("end",),
                    "local": True,
                    "persist_every": 2,
                    "saves": [
                        (1, True, True),
                        (1, True, False),
                        (0, True, False),
                        (-1, True, True),
                        (-3, False, False),
                    ],
                },
            ),
            (
                "open",
                {"comp_local": "none", "comp_storage": "zstd", "keep": 3, "local": True, "persist_every": 1},
            ),
            ("restore_step", {"data": (1, 9189)}),
            ("close", {}),
        ]
    )


@pytest.mark.subprocess
def test_the_model_blames_the_damaged_object_before_a_known_defect(machine_base: Path) -> None:
    """The 30-minute run of 2026-12-01 (the model's defect): the test flipped a byte of a chunk
    object on storage that every step shares, and the next durable save referenced it (a save
    reuses the chunks its tier's newest commit holds without reading them back: not
    promised).  The model checked first whether the chunk's bytes had also been flipped in
    memory earlier (a fixed defect's signature) and reported it as that.  The crash children
    here are killed after delays: the sequence replays on this machine, but a different
    timing may take another path (then it passes without reaching the case)."""
    P = {"comp_local": None, "comp_storage": None}
    _replay(
        [
            ("corrupt", {"data": (11, 0, 0), "how": "flip", "tier": "memory", "what": "chunk"}),
            ("corrupt", {"data": (0, 0, 0), "how": "flip", "tier": "memory", "what": "chunk"}),
            (
                "crash",
                {
                    **P,
                    "keep": 3,
                    "kill": ("end",),
                    "local": True,
                    "persist_every": 1,
                    "saves": [
                        (1, False, False),
                        (1, True, True),
                        (1, True, False),
                        (1, True, True),
                        (1, False, False),
                    ],
                },
            ),
            (
                "crash",
                {**P, "keep": 3, "kill": ("staged", 1), "local": True, "persist_every": 1, "saves": []},
            ),
            ("corrupt", {"data": (0, 11, 0), "how": "flip", "tier": "memory", "what": "chunk"}),
            (
                "crash",
                {
                    **P,
                    "keep": 3,
                    "kill": ("hook", "stage.done", 1),
                    "local": True,
                    "persist_every": 1,
                    "saves": [(1, True, False)],
                },
            ),
            (
                "crash",
                {**P, "keep": 3, "kill": ("staged", 1), "local": False, "persist_every": 1, "saves": []},
            ),
            (
                "crash",
                {
                    **P,
                    "keep": 3,
                    "kill": ("delay", 0.0),
                    "local": True,
                    "persist_every": 1,
                    "saves": [(1, False, False), (1, False, False)],
                },
            ),
            (
                "crash",
                {
                    "comp_local": None,
                    "comp_storage": "none",
                    "keep": 3,
                    "kill": ("delay", 0.0),
                    "local": False,
                    "persist_every": 1,
                    "saves": [],
                },
            ),
            ("corrupt", {"data": (0, 0, 0), "how": "flip", "tier": "memory", "what": "slot"}),
            ("corrupt", {"data": (0, 7, 0), "how": "flip", "tier": "memory", "what": "chunk"}),
            (
                "crash",
                {
                    "comp_local": None,
                    "comp_storage": "zstd:3",
                    "keep": None,
                    "kill": ("staged", 3),
                    "local": False,
                    "persist_every": 1,
                    "saves": [(1, True, True), (5, False, True)],
                },
            ),
            ("corrupt", {"data": (1999, 233557, 1080), "how": "truncate", "tier": "memory", "what": "chunk"}),
            ("corrupt", {"data": (338145, 727312, 1007), "how": "flip", "tier": "storage", "what": "chunk"}),
            (
                "crash",
                {
                    **P,
                    "keep": 3,
                    "kill": ("delay", 0.1),
                    "local": False,
                    "persist_every": 3,
                    "saves": [(1, False, False), (1, True, True)],
                },
            ),
        ]
    )


@pytest.mark.subprocess
def test_the_model_lets_close_keep_memory_when_a_damaged_newest_snapshot_was_refused(
    machine_base: Path,
) -> None:
    """The 30-minute run of 2026-12-01, on d0e4a63 (the model's defect): after ``restore(step=0)``
    the newest snapshot (step 1, memory only) is still what a restart resumes; close could not
    persist it (the test had flipped its bytes: refused, as it must be) and kept the memory
    tier.  The model asked only whether the step the run continues from was durable."""
    n = {**_PLAIN, "keep": 3, "persist_every": 2}
    flip = {"data": (0, 0, 0), "how": "flip", "tier": "memory", "what": "chunk"}
    no = (False, False, False)
    seen = FIG.events["close kept memory: a damaged snapshot was not persisted"]
    _replay(
        [
            ("open", n),
            ("restore_step", {"data": (0, 0)}),
            ("corrupt", flip),
            ("save", {"saves": [(1, *no), (-3, *no), (1, *no)]}),
            ("restore_step", {"data": (0, 0)}),
            ("corrupt", flip),
            ("close", {}),
        ]
    )
    assert FIG.events["close kept memory: a damaged snapshot was not persisted"] == seen + 1


@pytest.mark.subprocess
def test_the_model_lets_close_leave_a_restored_step_off_a_tier_the_test_wiped(machine_base: Path) -> None:
    """The 30-minute run of 2026-12-01, on d0e4a63 (the model's defect): ``restore(step=6)``, a
    step the run had left, persisted it to both tiers; the test then wiped the local tier, and
    close made the newest snapshot durable there again and released memory.  Step 6 stays
    committed on storage: nothing is lost; the model wanted it on every tier."""
    n = {**_PLAIN, "keep": 3, "local": True}
    no = (False, False, False)
    seen = FIG.events["close: the run's step is missing only on a tier the test wiped"]
    _replay(
        [
            ("open", n),
            ("save", {"saves": [(1, *no)]}),
            ("save", {"saves": [(1, *no), (0, *no), (5, *no)]}),
            ("corrupt", {"data": (0, 0, 0), "how": "flip", "tier": "memory", "what": "chunk"}),
            ("save", {"saves": [(-3, False, False, False)]}),
            ("restore_step", {"data": (1, 343)}),
            ("wipe", {"tier": "local"}),
            ("close", {}),
        ]
    )
    assert FIG.events["close: the run's step is missing only on a tier the test wiped"] == seen + 1


@pytest.mark.slow
@pytest.mark.subprocess
@pytest.mark.skipif(not MINUTES, reason="the long run: set FLASHCKPT_LIFECYCLE_MINUTES")
@pytest.mark.timeout(int(MINUTES * 60) + 3600, method="thread")
def test_lifecycle_long(machine_base: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """The long run: fresh seeds until ``FLASHCKPT_LIFECYCLE_MINUTES`` are spent; every
    failure is recorded (hypothesis's minimal sequence) and the run goes on."""
    global FIG
    FIG = Figures()
    deadline = time.monotonic() + MINUTES * 60
    try:
        while time.monotonic() < deadline:
            try:
                run_state_machine_as_test(Lifecycle, settings=_settings(examples=5, steps=50))
            except Exception as exc:
                text = _describe(exc)
                if FIG.history:  # what the failing run did (a crash's timing may not replay)
                    text += "\n  history of the failing run:\n    " + "\n    ".join(FIG.history)
                    FIG.history = []
                FIG.failures.append(text[:12000])
                with capsys.disabled():
                    print(f"\nFAILURE {len(FIG.failures)}:\n{FIG.failures[-1]}\n", flush=True)
    finally:
        _print_figures(capsys)
    assert not FIG.failures, f"{len(FIG.failures)} failures"


# -- known defects: minimal reproductions found by the machine ----------------------------------


def _open(dirs: dict[str, Path], **kw: Any) -> flashckpt.Checkpointer:
    kw.setdefault("options", OPTS)
    return flashckpt.Checkpointer(dirs["storage"], memory_dir=dirs["memory"], **kw)


def _load_ok(url: Path, step: int, uid: int, m_seed: int) -> str | None:
    """None if ``step`` on ``url`` loads bitwise as save ``uid``, else what is wrong."""
    try:
        got = flashckpt.load(url, step=step, options=OPTS)
    except flashckpt.FlashCkptError as exc:
        return f"{type(exc).__name__}: {exc}"
    return diff(got, content(uid, step, m_seed))


def test_a_save_after_the_tier_lost_its_chunks_commits_a_step_that_loads(dirs: dict[str, Path]) -> None:
    """Found as: open, save, wipe the local tier, save (state.wipe(tier='local') between two
    saves).  The frozen tensor's chunks are referenced, not written again."""
    with _open(dirs, local_dir=dirs["local"]) as ckpt:
        h = ckpt.save(0, content(1, 0, 1))
        assert h is not None
        h.wait(timeout=60)
        shutil.rmtree(dirs["local"])  # the node's disk was replaced; the job goes on
        h = ckpt.save(1, content(2, 1, 2))
        assert h is not None
        h.wait(timeout=60)  # durable on every tier, it says
        assert "local" in h.durable_on()
    assert _load_ok(dirs["local"], 1, 2, 2) is None


def test_retention_after_a_rollback_keeps_the_rollback_point_not_the_abandoned_steps(
    dirs: dict[str, Path],
) -> None:
    with _open(dirs, keep=2) as ckpt:
        for s in range(4):  # storage keeps 2 and 3
            ckpt.save(s, content(s + 1, s, s + 1))
    with _open(dirs, keep=2) as ckpt:
        assert ckpt.restore(template(), step=2) == 2  # the run continues from 2: 3 is abandoned
        h = ckpt.save(4, content(100, 4, 100))
        assert h is not None
        h.wait(timeout=60)
        ckpt.wait(timeout=60)
    kept = sorted(p.name for p in (dirs["storage"] / "commits").iterdir())
    assert kept == ["step-000000000002", "step-000000000004"]


def test_a_fallback_after_a_rollback_never_resumes_the_abandoned_steps(dirs: dict[str, Path]) -> None:
    """Found as: saves of steps 0, 1, then 0 again (a new timeline), the new step 0 damaged:
    restore() resumed the abandoned step 1.  Here the same with restore(step=...)."""
    with _open(dirs, keep=None) as ckpt:
        for s in range(6):
            ckpt.save(s, content(s + 1, s, s + 1))
    with _open(dirs, keep=None) as ckpt:
        assert ckpt.restore(template(), step=2) == 2  # 3, 4 and 5 are abandoned
        h = ckpt.save(4, content(100, 4, 100))  # replaces 4; 5 is seen as abandoned, 3 is not
        assert h is not None
        h.wait(timeout=60)
    shutil.rmtree(dirs["memory"], ignore_errors=True)  # a new node
    manifest = dirs["storage"] / "steps" / "000000000004" / "r00000-of-00001.manifest"
    raw = bytearray(manifest.read_bytes())
    raw[10] ^= 0xA5  # the new step is damaged (its commit record still names it)
    manifest.write_bytes(bytes(raw))
    state = template()
    with _open(dirs, keep=None) as ckpt:
        got = ckpt.restore(state)
    assert got == 2, f"restored step {got} ({meta_of(state)}), not the rollback point 2"


_SALVAGE_CHILD = """
import json, os, sys
import flashckpt
from tests.lifecycle_model import OPTS, content
cfg = json.loads(sys.argv[1])
ckpt = flashckpt.Checkpointer(
    cfg["storage"], memory_dir=cfg["memory"], persist_every=4, keep=None, options=OPTS
)
for step, uid, m_seed in cfg["saves"]:
    ckpt.save(step, content(uid, step, m_seed), force=step < 2)
ckpt.wait()
os._exit(0)  # a crash: no close, the memory tier stays
"""


def test_salvage_never_writes_bytes_that_fail_their_checksum(dirs: dict[str, Path]) -> None:
    """Found as: a crash with two snapshots in memory, a byte of the older one's slot
    flipped, then a restore: the salvaged older step was committed with a chunk that fails
    its checksum.  Here the chunk is also one an older committed step holds."""
    import subprocess
    import sys

    from flashckpt.format import TensorRef, decode_manifest

    # storage: step 0 (moments m1) and step 1 (m2); memory only: step 2 (m1 again), step 3
    saves = [(0, 1, 1), (1, 2, 2), (2, 3, 1), (3, 4, 4)]
    cfg = {"storage": str(dirs["storage"]), "memory": str(dirs["memory"]), "saves": saves}
    out = subprocess.run(
        [sys.executable, "-c", _SALVAGE_CHILD, json.dumps(cfg)],
        cwd=Path(__file__).resolve().parents[1],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr
    rank_dir = dirs["memory"] / SHARD
    m = decode_manifest((rank_dir / "step-000000000002.manifest").read_bytes())
    assert m.sealed
    ref = m.state_tree()["optim"]["m"]
    assert isinstance(ref, TensorRef)
    at = m.tensors[ref.index].offset + 1000
    with open(rank_dir / m.chunks[0].key, "r+b") as f:  # a bit flip in memory, in step 2's moments
        f.seek(at)
        b = f.read(1)[0]
        f.seek(at)
        f.write(bytes([b ^ 0x10]))
    state = template()
    with _open(dirs, keep=None) as ckpt:
        assert ckpt.restore(state) == 3  # from memory; steps 2 and 3 are salvaged to storage
        assert diff(state, content(4, 3, 4)) is None
        with pytest.raises(flashckpt.CorruptCheckpointError, match=r"step 2: the chunk at \d+ .* checksum"):
            ckpt.wait(timeout=60)  # the damaged step is reported, never written
    problems = {s: _load_ok(dirs["storage"], s, uid, ms) for s, uid, ms in saves}
    assert problems[0] is None, f"the committed step 0 was destroyed: {problems[0]}"
    assert problems[1] is None and problems[3] is None, problems
    assert problems[2] is not None and "no committed step 2" in problems[2], f"committed: {problems[2]}"


def test_close_after_restoring_an_older_step_keeps_the_newest_save(dirs: dict[str, Path]) -> None:
    with _open(dirs, persist_every=2) as ckpt:
        ckpt.save(0, content(1, 0, 1))  # persisted
        ckpt.save(1, content(2, 1, 2))  # memory only (persist_every=2)
        assert ckpt.restore(template(), step=0) == 0  # a look at step 0; nothing saved after it
    state = template()
    with _open(dirs, persist_every=2) as ckpt:
        got = ckpt.restore(state)
    assert got == 1 and diff(state, content(2, 1, 2)) is None, f"restored {got}: step 1 is lost"


def test_load_latest_is_the_step_restore_resumes(dirs: dict[str, Path]) -> None:
    """Found as: saves of steps 3 and 4, then lower steps (a new timeline), keep=None, close:
    load(storage) gave the abandoned step 4."""
    with _open(dirs, keep=None) as ckpt:
        for s in range(4):
            ckpt.save(s, content(s + 1, s, s + 1))
    with _open(dirs, keep=None) as ckpt:
        assert ckpt.restore(template(), step=1) == 1
        ckpt.save(2, content(100, 2, 100))  # the run goes on from 1; the old 3 is abandoned
    state = template()
    with _open(dirs, keep=None) as ckpt:
        assert ckpt.restore(state) == 2 and meta_of(state) == (100, 2, 100)
    assert meta_of(flashckpt.load(dirs["storage"], options=OPTS)) == (100, 2, 100)


def test_a_save_with_another_zstd_level_never_breaks_older_steps(dirs: dict[str, Path]) -> None:
    """Found as: a local chunk of a committed step 'truncated', not by the test, after a
    Checkpointer with compression 'zstd:3' saved moments an older step (saved with 'zstd')
    also held."""
    with _open(dirs, compression="zstd", keep=None) as ckpt:
        ckpt.save(0, content(1, 0, 1))  # moments m1
        ckpt.save(1, content(2, 1, 2))  # moments m2: the newest commit holds no m1 chunk
    with _open(dirs, compression="zstd:3", keep=None) as ckpt:
        assert ckpt.restore(template()) == 1
        h = ckpt.save(2, content(3, 2, 1))  # moments m1 again, encoded at level 3
        assert h is not None
        h.wait(timeout=60)
    assert _load_ok(dirs["storage"], 2, 3, 1) is None
    assert _load_ok(dirs["storage"], 0, 1, 1) is None, "step 0 was broken by a later save"


_RESAVE_CHILD = """
import json, os, sys
import flashckpt
from tests.lifecycle_model import OPTS, content
cfg = json.loads(sys.argv[1])
ckpt = flashckpt.Checkpointer(cfg["storage"], memory_dir=cfg["memory"], persist_every=2, options=OPTS)
ckpt.save(1, content(1, 1, 1), force=True)  # committed
ckpt.save(1, content(2, 1, 2))  # the same step again, other bytes: memory only (persist_every)
ckpt.wait()
os._exit(0)  # a crash: no close, the memory tier stays
"""


def test_a_step_saved_twice_comes_back_as_the_second_save(dirs: dict[str, Path]) -> None:
    """Found as: a crash child saved step 2, waited, saved step 2 again and was killed before
    that save was committed; open, close: the newest save was gone."""
    import subprocess
    import sys

    cfg = {"storage": str(dirs["storage"]), "memory": str(dirs["memory"])}
    out = subprocess.run(
        [sys.executable, "-c", _RESAVE_CHILD, json.dumps(cfg)],
        cwd=Path(__file__).resolve().parents[1],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr
    state = template()
    with _open(dirs, persist_every=2) as ckpt:
        assert ckpt.restore(state) == 1
        assert meta_of(state) == (2, 1, 2)  # the second save, from memory
    state = template()
    with _open(dirs, persist_every=2) as ckpt:
        assert ckpt.restore(state) == 1
    assert meta_of(state) == (2, 1, 2), f"step 1 came back as {meta_of(state)}"


@pytest.mark.subprocess
def test_restores_of_older_steps_keep_the_newest_memory_only_save(machine_base: Path) -> None:
    """Found by the 15-minute run of 2026-12-01 on 74c27f0 (the engine's defect, older than
    the restructure: it replays on 5935e9d too): with ``persist_every=3`` the newest save lived
    in memory only, and three restores of older steps took, in turn, the slot it was in.
    Fixed: a restore never takes the slot of the newest snapshot while memory is its only
    copy (``Stager.acquire(keep=...)``; plain test in test_trust)."""
    _replay(
        [
            ("wipe", {"tier": "local"}),
            ("open", {**_PLAIN, "keep": None, "persist_every": 3}),
            ("restore_latest", {}),
            ("save", {"saves": [(1, False, False, True)]}),
            ("save", {"saves": [(1, True, True, True)]}),
            ("save", {"saves": [(5, False, False, True)]}),
            ("save", {"saves": [(0, False, True, True)]}),
            ("save", {"saves": [(2, False, False, False), (5, True, False, True), (0, True, False, False)]}),
            ("save", {"saves": [(1, False, True, True), (2, True, True, True), (2, True, False, True)]}),
            (
                "save",
                {"saves": [(-1, False, True, False), (-1, True, True, False), (-1, True, False, False)]},
            ),
            ("restore_step", {"data": (1, 65535)}),
            ("save", {"saves": [(1, True, True, False), (2, True, True, False), (5, True, False, True)]}),
            ("wipe", {"tier": "local"}),
            ("restore_latest", {}),
            ("save", {"saves": [(1, True, True, False), (2, True, False, True)]}),
            ("restore_step", {"data": (1, 4590)}),
            ("restore_step", {"data": (1, 222)}),
            ("restore_step", {"data": (0, 570)}),
        ]
    )
