"""The folder of hostile files: each named case of ``cases.py`` is refused with
``CorruptCheckpointError`` by the check that owns it, and a tree whose newest step is hostile
restores and loads the intact older step instead (never another exception type, never a
partial state)."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

import flashckpt
from flashckpt.format import commit_key, decode_commit, decode_manifest, manifest_key
from tests.conftest import set_format_limit
from tests.hostile.cases import CASES, Case
from tests.hostile.tree import Step, assert_state, saved_tree, state_for


@pytest.fixture(scope="module")
def base_tree(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return saved_tree(tmp_path_factory, "hostile")


@pytest.fixture
def tree(base_tree: Path, tmp_path: Path) -> Path:
    root = tmp_path / "storage"
    shutil.copytree(base_tree, root)
    return root


def _make_hostile(root: Path, case: Case, monkeypatch: pytest.MonkeyPatch) -> Step:
    s = Step(root, 2)
    case.apply(s)
    s.write()
    if case.limit is not None:
        set_format_limit(monkeypatch, "MAX_RECORD_BYTES", case.limit)
    return s


def _params() -> list[object]:
    return [pytest.param(c, id=c.name) for c in CASES]


@pytest.mark.parametrize("case", _params())
def test_refused_by_its_check(tree: Path, case: Case, monkeypatch: pytest.MonkeyPatch) -> None:
    s = _make_hostile(tree, case, monkeypatch)
    world = len(s.manifests)
    for rank in range(world):
        raw = (tree / manifest_key(2, rank, world)).read_bytes()
        if case.refused_by == "manifest" and rank == case.rank:
            with pytest.raises(flashckpt.CorruptCheckpointError):
                decode_manifest(raw)
        elif case.refused_by != "manifest":
            decode_manifest(raw)
    raw = (tree / commit_key(2)).read_bytes()
    if case.refused_by == "commit":
        with pytest.raises(flashckpt.CorruptCheckpointError):
            decode_commit(raw)
    elif case.refused_by == "load":
        assert decode_commit(raw).world_size == world
    with pytest.raises(flashckpt.CheckpointNotFound) as info:
        flashckpt.load(tree, step=2)
    assert isinstance(info.value.__cause__, flashckpt.CorruptCheckpointError), repr(info.value.__cause__)


@pytest.mark.parametrize("case", _params())
def test_load_falls_back_to_the_intact_step(tree: Path, case: Case, monkeypatch: pytest.MonkeyPatch) -> None:
    _make_hostile(tree, case, monkeypatch)
    assert_state(flashckpt.load(tree), state_for(1))


@pytest.mark.parametrize("case", _params())
def test_restore_falls_back_to_the_intact_step(
    tree: Path, shm_dir: Path, case: Case, monkeypatch: pytest.MonkeyPatch
) -> None:
    _make_hostile(tree, case, monkeypatch)
    state = state_for(9)
    with flashckpt.Checkpointer(tree, memory_dir=shm_dir, keep=3) as ckpt:
        assert ckpt.restore(state) == 1
    assert_state(state, state_for(1))


# the base the cases start from is valid: a case is refused for its own edit, not the builder's


def test_rewritten_step_is_intact(tree: Path) -> None:
    Step(tree, 2).write()
    assert_state(flashckpt.load(tree), state_for(2))


def test_two_rank_step_consolidates(tree: Path) -> None:
    s = Step(tree, 2)
    s.as_two_ranks("w")
    s.write()
    out = flashckpt.load(tree)
    want = state_for(2)
    assert torch.equal(out["w"], torch.cat([want["w"], want["w"]]))
    assert_state({**out, "w": want["w"]}, want)
    assert_state(flashckpt.load(tree, rank=1), want)  # a rank's own shard: its local tensor


def test_generate_writes_every_case(tmp_path: Path) -> None:
    """The script that writes the folder of hostile files (and fuzzing seeds) runs."""
    from tests.hostile.generate import generate

    assert generate(tmp_path) == len(CASES)
    names = {p.name for p in (tmp_path / "records").iterdir()}
    assert {f"{c.name}.commit" for c in CASES} <= names and "valid.manifest" in names
    for name in ("manifest", "commit", "tree", "codec"):
        assert any((tmp_path / name).iterdir())
