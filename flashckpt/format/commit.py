"""Commit records (a step is committed on a tier if and only if its record exists there) and
the run record (the id of the run whose steps a storage tier holds).

Pure functions and frozen dataclasses only (no I/O); safe to call from any thread.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass

from flashckpt.errors import CorruptCheckpointError
from flashckpt.format import keys as _keys
from flashckpt.format.manifest import _RUN_ID, _decode_lineage, _lineage
from flashckpt.format.record import (
    FORMAT_VERSION,
    MAX_RECORD_BYTES,
    MAX_STEP,
    MAX_WORLD,
    _check_header,
    _int,
    _time,
    decode_record,
    encode_record,
    now,
)

COMMIT_FORMAT = "flashckpt.commit"


@dataclass(frozen=True)
class CommitRecord:
    """A step is committed on a tier if and only if this record exists there."""

    step: int
    world_size: int
    created_unix: float
    manifests: tuple[tuple[str, int, str], ...]  # (key, bytes, checksum)
    #: ``"job"``: the tier holds every shard (``world_size`` manifests); ``"rank"``: a tier
    #: private to one rank (a node-local disk in a multi-rank job) holds that rank's only.
    scope: str = "job"
    generation: int = 0  # see Manifest.generation
    run: str = ""  # see Manifest.run
    ancestors: tuple[tuple[int, int], ...] = ()  # see Manifest.ancestors

    @property
    def order(self) -> tuple[int, int]:
        return (self.generation, self.step)


def encode_commit(c: CommitRecord) -> bytes:
    body = {
        "format": COMMIT_FORMAT,
        "version": FORMAT_VERSION,
        "step": c.step,
        "world_size": c.world_size,
        "created_unix": c.created_unix,
        "manifests": [list(m) for m in c.manifests],
    }
    if c.scope != "job":
        body["scope"] = c.scope
    body.update(_lineage(c.generation, run=c.run, ancestors=c.ancestors))
    return encode_record(body)


def decode_commit(
    raw: bytes, what: str = "commit record", *, check_key: Callable[[str], str] = _keys.check_key
) -> CommitRecord:
    """Parse and validate a commit record.  ``check_key`` validates the manifests' object names
    (by default :func:`~flashckpt.format.keys.check_key`)."""
    obj = decode_record(raw, what)
    _check_header(obj, COMMIT_FORMAT, what)
    step = _int(obj, "step", 0, MAX_STEP)
    world = _int(obj, "world_size", 1, MAX_WORLD)
    created = _time(obj, what)
    scope = obj.get("scope", "job")
    if scope not in ("job", "rank"):
        raise CorruptCheckpointError(f"{what}: unknown scope")
    ms = obj.get("manifests")
    if not isinstance(ms, list) or len(ms) != (world if scope == "job" else 1):
        raise CorruptCheckpointError(f"{what}: bad manifest list")
    out = []
    for m in ms:
        if not (isinstance(m, list) and len(m) == 3 and isinstance(m[0], str)):
            raise CorruptCheckpointError(f"{what}: bad manifest entry")
        key, size, digest = m
        try:
            check_key(key)
        except ValueError as exc:
            raise CorruptCheckpointError(f"{what}: unsafe manifest name") from exc
        if (
            type(size) is not int
            or not 0 < size <= MAX_RECORD_BYTES
            or not isinstance(digest, str)
            or not re.fullmatch(r"[0-9a-f]{32}", digest)
        ):
            raise CorruptCheckpointError(f"{what}: bad manifest entry")
        out.append((key, size, digest))
    gen, _storage, run, ancestors = _decode_lineage(obj, what)
    return CommitRecord(step, world, created, tuple(out), scope, gen, run, ancestors)


# --------------------------------------------------------------------------------------------
# the run record (its key is flashckpt.format.keys.RUN_KEY)

RUN_FORMAT = "flashckpt.run"


def encode_run(run: str) -> bytes:
    if not _RUN_ID.fullmatch(run):
        raise ValueError(f"bad run id {run!r}")
    return encode_record({"format": RUN_FORMAT, "version": FORMAT_VERSION, "run": run, "created_unix": now()})


def decode_run(raw: bytes, what: str = "run record") -> str:
    obj = decode_record(raw, what)
    _check_header(obj, RUN_FORMAT, what)
    _time(obj, what)
    run = obj.get("run")
    if not isinstance(run, str) or not _RUN_ID.fullmatch(run):
        raise CorruptCheckpointError(f"{what}: bad run id")
    return run
