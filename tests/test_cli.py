"""The ``flashckpt`` command line, run as a real console script."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

import flashckpt
from flashckpt.cli import main
from tests.conftest import chunk_paths, set_format_limit
from tests.hostile.cases import CASES, Case
from tests.hostile.tree import Step, saved_tree

pytestmark = [pytest.mark.subprocess]

REPO = Path(__file__).resolve().parent.parent


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    exe = shutil.which("flashckpt", path=str(Path(sys.executable).parent))
    cmd = [exe] if exe else [sys.executable, "-m", "flashckpt.cli"]
    # the console script of an editable install imports the checkout it was installed from:
    # put this one first, so that a worktree's tests run its own code
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])),
    }
    return subprocess.run([*cmd, *args], capture_output=True, text=True, timeout=120, env=env)


def test_ls_and_verify_raw_and_compressed(tmp_path: Path, shm_dir: Path) -> None:
    state = {"w": (torch.randn(1 << 20) * 0.02).to(torch.bfloat16), "step": 0}
    for comp in ("none", "zstd"):
        root = tmp_path / comp
        with flashckpt.Checkpointer(root, memory_dir=shm_dir, compression=comp, keep=None) as ckpt:
            for step in (3, 4):
                state["w"] = state["w"] + 1  # a new chunk for each step (unchanged ones are shared)
                ckpt.save(step, state)
        out = _cli("ls", str(root), "--json")
        assert out.returncode == 0, out.stderr
        rows = json.loads(out.stdout)
        assert [r["step"] for r in rows] == [3, 4] and all(r["world_size"] == 1 for r in rows)
        ok = _cli("verify", str(root))
        assert ok.returncode == 0 and "step 3: ok" in ok.stdout and "step 4: ok" in ok.stdout, (
            ok.stdout + ok.stderr
        )
        chunk = chunk_paths(root, 4)[0]
        data = bytearray(chunk.read_bytes())
        data[len(data) // 2] ^= 0x10
        chunk.write_bytes(bytes(data))
        bad = _cli("verify", str(root))
        assert bad.returncode == 1 and "step 4: CORRUPT" in bad.stdout and "step 3: ok" in bad.stdout
        assert _cli("verify", str(root), "--step", "9").returncode == 2


# --------------------------------------------------------------------------------------------
# hostile trees: report the bad step, go on with the others, never a traceback


@pytest.fixture(scope="module")
def base_tree(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return saved_tree(tmp_path_factory, "cli")


@pytest.fixture
def tree(base_tree: Path, tmp_path: Path) -> Path:
    root = tmp_path / "storage"
    shutil.copytree(base_tree, root)
    return root


def _hostile(root: Path, case: Case, step: int = 1) -> None:
    s = Step(root, step)
    case.apply(s)
    s.write()


def _main(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    code = main(list(args))
    out, err = capsys.readouterr()
    return code, out, err


@pytest.mark.parametrize("case", [pytest.param(c, id=c.name) for c in CASES])
def test_hostile_step_is_reported_and_the_others_checked(
    tree: Path, case: Case, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    _hostile(tree, case)
    if case.limit is not None:
        set_format_limit(monkeypatch, "MAX_RECORD_BYTES", case.limit)
    code, out, err = _main(capsys, "verify", str(tree))
    assert code == 1, out + err
    lines = out.splitlines()
    assert lines[0] == "step 0: ok" and lines[2] == "step 2: ok", out
    assert lines[1].startswith("step 1: CORRUPT: ") and len(lines) == 3, out
    assert "Traceback" not in err

    code, out, err = _main(capsys, "ls", str(tree), "--json")
    rows = json.loads(out)
    assert [r["step"] for r in rows] == [0, 1, 2]
    assert rows[0]["error"] is None and rows[2]["error"] is None
    assert rows[0]["bytes"] == rows[2]["bytes"] > 0
    if case.refused_by == "load":  # the records are valid: only reading the step finds it out
        assert code == 0 and rows[1]["error"] is None, err
    else:
        assert code == 1 and rows[1]["error"].startswith("CORRUPT: "), rows[1]
        assert err.count("\n") == 1 and err.startswith("flashckpt: step 1: CORRUPT: "), err


def test_console_script_on_a_hostile_tree(tree: Path) -> None:
    """The real console script: exit codes, one line per problem, no traceback."""
    _hostile(tree, next(c for c in CASES if c.name == "manifest-created-400-digit-int"), step=2)
    _hostile(tree, next(c for c in CASES if c.name == "zstd-frame-declares-1TiB"), step=1)
    ls = _cli("ls", str(tree))
    assert ls.returncode == 1, ls.stdout + ls.stderr
    assert ls.stdout.split()[3:6] == ["0", "1", "2"] or "CORRUPT" in ls.stdout, ls.stdout
    assert ls.stderr.count("\n") == 1 and "step 2: CORRUPT" in ls.stderr and "Traceback" not in ls.stderr
    verify = _cli("verify", str(tree))
    assert verify.returncode == 1, verify.stdout + verify.stderr
    assert verify.stdout.splitlines()[0] == "step 0: ok"
    assert verify.stdout.splitlines()[1].startswith("step 1: CORRUPT: ")
    assert verify.stdout.splitlines()[2].startswith("step 2: CORRUPT: ")
    assert "Traceback" not in verify.stderr


def test_usage_and_access_errors_exit_2_with_one_line(tmp_path: Path) -> None:
    missing = _cli("verify", str(tmp_path / "no-such-run"))
    assert missing.returncode == 2 and missing.stderr.count("\n") == 1, missing.stderr
    assert "Traceback" not in missing.stderr and not (tmp_path / "no-such-run").exists()
    scheme = _cli("ls", "nosuchscheme://bucket/run")
    assert scheme.returncode == 2 and scheme.stderr.count("\n") == 1 and "Traceback" not in scheme.stderr
    usage = _cli("verify")
    assert usage.returncode == 2 and "Traceback" not in usage.stderr


def test_any_error_is_one_line_and_exit_2(
    tree: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    from flashckpt.catalog import Catalog

    def boom(*_args: object) -> list[int]:
        raise RuntimeError("first line\nsecond line\x1b[31m")

    monkeypatch.setattr(Catalog, "step_numbers", boom)
    for cmd in ("ls", "verify"):
        code, out, err = _main(capsys, cmd, str(tree))
        assert code == 2 and out == "", (out, err)
        assert err == "flashckpt: RuntimeError: first line\\nsecond line\\x1b[31m\n", err


def test_an_unexpected_error_in_one_step_exits_2_after_checking_the_others(
    tree: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    from flashckpt.catalog import Catalog

    real = Catalog.verify

    def flaky(self: Catalog, step: int, progress: Any = None) -> None:
        if step == 1:
            raise ValueError("not a corruption")
        real(self, step, progress)

    monkeypatch.setattr(Catalog, "verify", flaky)
    code, out, _err = _main(capsys, "verify", str(tree))
    assert code == 2
    assert out.splitlines() == ["step 0: ok", "step 1: ERROR (ValueError): not a corruption", "step 2: ok"]
    # a corrupt step as well: 2 still wins (not every step could be checked)
    _hostile(tree, next(c for c in CASES if c.name == "zstd-bg2-odd-size"), step=2)
    code, out, _err = _main(capsys, "verify", str(tree))
    assert code == 2 and out.splitlines()[2].startswith("step 2: CORRUPT: ")


def test_verify_reports_progress_over_every_byte_and_draws_a_bar_on_a_terminal(
    dirs: dict[str, Path], capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    import io

    import torch

    from flashckpt.catalog import Catalog

    opts = flashckpt.Options(chunk_bytes=64 << 10)
    with flashckpt.Checkpointer(dirs["storage"], memory_dir=dirs["memory"], options=opts) as ckpt:
        ckpt.save(2, {"w": torch.randn(1 << 18), "b": torch.ones(3)})
    seen: list[tuple[int, int]] = []
    with Catalog(dirs["storage"]) as cat:
        cat.verify(2, lambda done, total: seen.append((done, total)))
        (m,) = cat.manifests(2)
    total = sum(c.nbytes for c in m.chunks)
    assert len(seen) == len(m.chunks) > 1 and seen[-1] == (total, total)
    assert [d for d, _ in seen] == sorted(d for d, _ in seen)

    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    term = Terminal()
    monkeypatch.setattr(sys, "stderr", term)
    assert main(["verify", str(dirs["storage"])]) == 0
    assert "step 2" in term.getvalue()  # the bar, on the terminal only
    assert capsys.readouterr().out.strip() == "step 2: ok"


def test_restore_out_draws_a_bar_over_the_tensor_bytes_on_a_terminal_only(
    dirs: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    import io

    import torch

    from flashckpt.cli.export import tally

    with flashckpt.Checkpointer(dirs["storage"], memory_dir=dirs["memory"]) as ckpt:
        ckpt.save(2, {"w": torch.randn(1000), "b": torch.ones(3), "note": "x"})
    seen: list[tuple[int, int]] = []
    leaves = [("w", torch.zeros(1000)), ("b", torch.zeros(3)), ("note", "x")]
    specs = [("w", torch.float32, (1000,)), ("b", torch.float32, (3,)), ("note", None, ())]
    assert list(tally(iter(leaves), specs, lambda d, t: seen.append((d, t)))) == leaves
    assert seen == [(4000, 4012), (4012, 4012)]

    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    term = Terminal()
    monkeypatch.setattr(sys, "stderr", term)
    assert main(["restore", str(dirs["storage"]), "--out", str(tmp_path / "x.safetensors")]) == 0
    assert "step 2" in term.getvalue()
    monkeypatch.undo()
    assert main(["restore", str(dirs["storage"]), "--out", str(tmp_path / "y.safetensors")]) == 0
    assert "step 2 ->" in capsys.readouterr().out
