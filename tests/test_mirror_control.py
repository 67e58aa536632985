"""The control plane's collectives carry JSON, never pickles (L10), and the job secret and the
store nonce are drawn independently (M2).  A real 2-process gloo group, spawned."""

from __future__ import annotations

import json
import os
import pickle
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
import torch.multiprocessing as mp

from flashckpt._dist import Control
from flashckpt.errors import CoordinationError

pytestmark = pytest.mark.subprocess

# What the Checkpointer gathers (checkpointer.py, coordination/plan.py, restore.py), as each rank passes it.
GATHERED: list[Any] = [
    "node0",  # node names
    ("10.0.0.1", 41234),  # mirror server addresses
    ([3, 4, 5], {"r00001-of-00002": [4, 5], "r00003-of-00004": []}),  # inventories
    (True, None),  # restore outcomes
    (False, "CorruptCheckpointError('step 5: checksum mismatch \u00e9')"),
    (True, ["rank 0: local"]),  # _restore_nothing
    ["have", "write", "none"],  # salvage statuses
    [],
]


class _Unpickled(Exception):
    pass


def _worker(rank: int, init: str, out: str) -> None:
    import torch.distributed as dist
    from torch.distributed import distributed_c10d

    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=2, timeout=timedelta(seconds=20))
    seen: list[str] = []

    def trap(*_: object, **__: object) -> Any:
        seen.append("unpickle")
        raise _Unpickled("something was unpickled")

    # every way torch (all_gather_object) and pickle itself would unpickle peer data
    distributed_c10d._unpickler = trap  # type: ignore[attr-defined]
    pickle.loads = trap  # type: ignore[assignment]
    pickle.load = trap  # type: ignore[assignment]
    pickle.Unpickler = trap  # type: ignore[assignment, misc]
    result: dict[str, Any] = {}
    ctl = Control(None, 20.0)
    result["secret"] = ctl.secret.hex()
    result["prefix"] = ctl._prefix
    ctl.arrive("k")  # the store works under the nonce's prefix
    result["gathered"] = [ctl.all_gather(obj if rank == 1 else _rank0(obj)) for obj in GATHERED]
    # a peer that sends a pickle, or bytes that are not JSON: a clear error on every rank
    for evil in (pickle.dumps({"x": 1}), b"\x80\x04not json", b'{"a": NaN}'):
        try:
            if rank == 1:
                ctl._gather_bytes(evil)
                result.setdefault("errors", []).append(None)
            else:
                ctl.all_gather("fine")
        except CoordinationError as exc:
            result.setdefault("errors", []).append(str(exc))
    # a rank whose object cannot be encoded: every rank raises, none hangs
    try:
        ctl.all_gather({1j} if rank == 1 else "fine")
    except CoordinationError as exc:
        result["unencodable"] = str(exc)
    result["unpickled"] = seen
    if rank == 1:
        Path(out, "rank1.json").write_text(json.dumps(result))
        os._exit(0)  # a dead peer from here on
    try:
        ctl.all_gather("alone")
    except CoordinationError as exc:
        result["dead_peer"] = str(exc)
    Path(out, "rank0.json").write_text(json.dumps(result))
    os._exit(0)  # skip finalization: torch's gloo teardown race (pytorch/pytorch#179291)


def _rank0(obj: Any) -> Any:
    """Rank 0 gathers something else than rank 1 (so each side's decoding is checked)."""
    return {"rank0": obj}


def test_all_gather_round_trips_what_the_checkpointer_gathers_and_unpickles_nothing(tmp_path: Path) -> None:
    init = f"file://{tmp_path / 'rendezvous'}"
    mp.start_processes(_worker, args=(init, str(tmp_path)), nprocs=2, join=True, start_method="spawn")
    got = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    for r in range(2):
        assert got[r]["unpickled"] == []
        # JSON: tuples come back as lists, and every rank sees the same
        want = [[{"rank0": json.loads(json.dumps(o))}, json.loads(json.dumps(o))] for o in GATHERED]
        assert got[r]["gathered"] == want
    # one secret for the job, and a store nonce drawn apart from it
    assert got[0]["secret"] == got[1]["secret"] and len(got[0]["secret"]) == 64
    assert got[0]["prefix"] == got[1]["prefix"]
    nonce = got[0]["prefix"].split("/")[1]
    assert len(nonce) == 16 and nonce not in got[0]["secret"]
    # rank 1 sent a pickle, then not-JSON, then a bare NaN: rank 0 refused each, unpickling nothing
    assert [e is not None and "not JSON" in e for e in got[0]["errors"]] == [True, True, True]
    assert got[1]["errors"] == [None, None, None]
    assert all(
        "cannot gather set" in got[r]["unencodable"] or "nothing to send" in got[r]["unencodable"]
        for r in range(2)
    )
    assert "cannot gather set" in got[1]["unencodable"] and "rank 1" in got[0]["unencodable"]
    assert "all_gather among 2 ranks failed" in got[0]["dead_peer"]


def test_a_one_process_job_gathers_json_too() -> None:
    ctl = Control(None, 5.0)
    assert ctl.all_gather(("h", 1)) == [["h", 1]]
    with pytest.raises(CoordinationError, match="cannot gather"):
        ctl.all_gather(object())
