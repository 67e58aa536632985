"""``flashckpt plan``: the checkpoint interval that maximises goodput, from measured costs.

Pure arithmetic (no I/O); the command line feeds it from flags or a ``--stats`` JSON.

Notation (seconds): ``delta`` the time a save blocks training; ``mtbf`` the job's mean time
between failures (``lam = 1 / mtbf``); ``tau`` the compute time between two snapshots.

* **Young** (1974): ``tau* = sqrt(2 delta mtbf)``.
* **Daly** (2006, the higher-order optimum): ``tau* = sqrt(2 delta M) (1 + sqrt(delta / 2M) / 3
  + (delta / 2M) / 9) - delta`` for ``delta < 2M``, else ``M``; his expected wall time for
  ``Ts`` of work, restart time ``R``: ``Tw = M e^(R/M) (e^((tau + delta)/M) - 1) Ts / tau``.
  His worked examples (R = 10 min, delta = 5 min; M = 24 h / 6 h / 15 min: 117 / 57 / 9.1 min)
  are in the tests.
* **Several tiers, asynchronous persistence** (``../shared/reviews/integrations-2026-11.md``
  section 5.2): a failure of class ``k`` (process crash: the memory tier survives; node
  loss: a peer's mirror survives, else storage; the whole job: storage) with share ``p_k``
  loses ``tau / 2`` (since the last snapshot) plus how far the newest snapshot of the tier
  that survives trails (memory and mirrors: nothing; storage, every ``persist_every``-th
  snapshot persisted: ``(persist_every - 1) tau / 2`` on average plus the persist time), and
  costs the restart and restore from that tier ``R_k``.  The waste per unit of time is

      W(tau) = delta / tau + lam * sum_k p_k (tau / 2 + lag_k(tau) + R_k)

  whose minimum is Young's with the failure rate weighted by how much of the interval a
  failure loses: ``tau* = sqrt(2 delta / (lam (1 + p_storage (persist_every - 1))))``.
  Constraints: ``tau >= step`` (a snapshot per step at most) and ``persist_every * tau >=
  persist time`` (a persisted snapshot must be written before the next one is: the persist
  bandwidth), which sets ``persist_every``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

#: the failure classes and the tier that survives each when nothing better is configured
CLASSES = ("crash", "node", "job")


def young(delta: float, mtbf: float) -> float:
    """Young's optimum interval."""
    return math.sqrt(2 * delta * mtbf)


def daly(delta: float, mtbf: float) -> float:
    """Daly's higher-order optimum interval (``mtbf`` when ``delta >= 2 mtbf``)."""
    if delta >= 2 * mtbf:
        return mtbf
    x = delta / (2 * mtbf)
    return math.sqrt(2 * delta * mtbf) * (1 + math.sqrt(x) / 3 + x / 9) - delta


def daly_wall_time(tau: float, delta: float, mtbf: float, restart: float, work: float) -> float:
    """Daly's expected wall-clock time to complete ``work`` seconds of computation."""
    return mtbf * math.exp(restart / mtbf) * (math.exp((tau + delta) / mtbf) - 1) * work / tau


@dataclass(frozen=True)
class Costs:
    """What one job measured and assumes (seconds; shares sum to 1)."""

    step: float  # a training step
    blocking: float  # a save, on the training thread
    mtbf: float  # the job's mean time between failures
    persist: float = 0.0  # a snapshot to storage (background)
    restore: dict[str, float] = field(default_factory=dict)  # tier -> restart + restore time
    shares: dict[str, float] = field(default_factory=lambda: {"crash": 0.75, "node": 0.2, "job": 0.05})
    mirrors: bool = False  # a peer's memory holds a copy (node loss resumes from it)

    def __post_init__(self) -> None:
        for name in ("step", "blocking", "mtbf"):
            v = getattr(self, name)
            if not (isinstance(v, (int, float)) and math.isfinite(v) and v > 0):
                raise ValueError(f"{name} must be a positive number of seconds, got {v!r}")
        if not (math.isfinite(self.persist) and self.persist >= 0):
            raise ValueError(f"persist must be >= 0 seconds, got {self.persist!r}")
        unknown = set(self.shares) - set(CLASSES)
        if unknown:
            raise ValueError(f"unknown failure classes {sorted(unknown)} (use {', '.join(CLASSES)})")
        if any(not (0 <= v <= 1) for v in self.shares.values()) or abs(sum(self.shares.values()) - 1) > 1e-6:
            raise ValueError(f"failure shares must be in [0, 1] and sum to 1, got {self.shares}")
        for tier, v in self.restore.items():
            if not (math.isfinite(v) and v >= 0):
                raise ValueError(f"restore time of {tier} must be >= 0 seconds, got {v!r}")

    def survivor(self, cls: str) -> str:
        """The tier a failure of class ``cls`` resumes from."""
        if cls == "crash":
            return "memory"
        if cls == "node" and self.mirrors:
            return "mirror"
        return "storage"

    def restart(self, tier: str) -> float:
        return self.restore.get(tier, self.restore.get("storage", 0.0))


def waste(c: Costs, tau: float, persist_every: int) -> float:
    """Expected fraction of time lost (checkpoint cost plus rework and restarts) at interval
    ``tau`` with every ``persist_every``-th snapshot persisted."""
    lam = 1 / c.mtbf
    lost = 0.0
    for cls, p in c.shares.items():
        tier = c.survivor(cls)
        lag = (persist_every - 1) * tau / 2 + c.persist if tier == "storage" else 0.0
        lost += p * (tau / 2 + lag + c.restart(tier))
    return min(1.0, c.blocking / tau + lam * lost)


@dataclass(frozen=True)
class Plan:
    """The recommendation and what it rests on."""

    tau_young: float
    tau_daly: float
    tau: float  # the interval recommended (seconds of training between snapshots)
    every: int  # in steps
    persist_every: int
    binds: str  # "failure rate", "step time" or "persist bandwidth"
    waste: float  # fraction of time lost at the recommendation
    waste_now: float | None  # ... at the current setting, when given

    @property
    def goodput(self) -> float:
        return 1 - self.waste

    def wasted_per_day(self, waste: float | None = None) -> float:
        return 86400 * (self.waste if waste is None else waste)


def plan(c: Costs, *, every_now: int | None = None, persist_every_now: int = 1) -> Plan:
    """The setting that minimises :func:`waste` under the constraints (see the module
    docstring), with Young's and Daly's optimum for comparison.

    ``W`` is convex in ``tau`` for a fixed ``persist_every`` (``P``): its optimum is the
    unconstrained one, or the constraint's bound (``tau >= step``, ``P tau >= persist``).  Each
    ``P`` from 1 up to the one that lets a snapshot be persisted every step is tried, both
    whole numbers of steps around each optimum, and the least waste wins."""
    tau_y, tau_d = young(c.blocking, c.mtbf), daly(c.blocking, c.mtbf)
    p_storage = sum(p for cls, p in c.shares.items() if c.survivor(cls) == "storage")
    lam = 1 / c.mtbf
    p_max = max(1, math.ceil(c.persist / c.step - 1e-9)) if c.persist > 0 else 1
    best: tuple[float, int, int, str] | None = None
    for pe in _candidates(p_max):
        free = math.sqrt(2 * c.blocking / (lam * (1 + p_storage * (pe - 1))))
        floor_bw = c.persist / pe
        tau = max(free, floor_bw, c.step)
        binds = "step time" if tau == c.step and c.step >= free else "failure rate"
        if floor_bw >= free and floor_bw >= c.step:
            binds = "persist bandwidth"
        for every in {max(1, math.floor(tau / c.step)), max(1, math.ceil(tau / c.step))}:
            t = every * c.step
            if c.persist > 0 and pe * t < c.persist - 1e-9:
                continue
            w = waste(c, t, pe)
            if best is None or w < best[0] - 1e-15:
                best = (w, every, pe, binds)
    assert best is not None  # pe = p_max always admits every = 1
    w, every, pe, binds = best
    now = None if every_now is None else waste(c, every_now * c.step, persist_every_now)
    return Plan(tau_y, tau_d, every * c.step, every, pe, binds, w, now)


def _candidates(p_max: int) -> list[int]:
    """Every ``persist_every`` up to 64, then a geometric sweep (``W`` changes slowly there)."""
    out = list(range(1, min(p_max, 64) + 1))
    p = 64
    while p < p_max:
        p = min(p_max, int(p * 1.25) + 1)
        out.append(p)
    return out
