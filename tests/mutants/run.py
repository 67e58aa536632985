"""Run the mutation campaign: plant each bug of ``catalogue.py`` in a scratch copy of the
repository, run the test suite there, and record which tests notice.

    nice -n 10 python -m tests.mutants.run                      # every mutant, whole suite, -x
    python -m tests.mutants.run --only slot_never_released     # one (repeatable, or a,b,c)
    python -m tests.mutants.run --tests tests/backends/test_backends.py # a narrower suite
    python -m tests.mutants.run --check                        # every mutant still applies?
    python -m tests.mutants.run --baseline                     # also run the unmutated copy

Each mutant runs in a fresh copy of the working tree (uncommitted changes included) under
``/tmp``, with ``PYTHONPATH`` and the working directory pointing at the copy, so the suite and
the processes it starts (torchrun workers, the CLI) import the mutated package.  Where it is
allowed (root, or user namespaces), the suite runs in its own mount and pid namespace: a
private tmpfs on ``/dev/shm`` (nothing it leaves there outlives the run, and other people's
``/dev/shm`` entries are never seen, let alone deleted) and a pid namespace whose processes all
die with it.  Otherwise the run is a process group killed at the end, and ``/dev/shm`` entries
that appeared during the run are reported, not deleted (they may be another session's).

Outcomes: ``killed`` (a test failed), ``timeout`` (only a hang noticed it: a test killed by
pytest-timeout, or the suite over its wall-clock bound: the weak catch), ``survived`` (the
whole suite passed), ``error`` (the suite could not run; see the log).  With ``-x`` (the
default) a killed mutant stops at its first killing test; ``--more`` then reruns the file of
that test without ``-x`` to name more killers.  Results are merged into
``<out>/results.json`` and rendered as ``<out>/results.md`` (default ``tests/mutants/results``).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from dataclasses import asdict, dataclass, field
from pathlib import Path

from tests.mutants.catalogue import BY_NAME, MUTANTS, Mutant

ROOT = Path(__file__).resolve().parents[2]
DEFAULT_OUT = ROOT / "tests" / "mutants" / "results"
BASELINE = "_baseline"
#: The whole suite, in this order: the slowest files last, so that ``-x`` stops a killed
#: mutant early (a survivor runs everything anyway).  Every other test file comes first.
SLOW_LAST = [
    "tests/format/test_fuzz.py",
    "tests/backends/test_s3.py",
    "tests/test_crash.py",
    "tests/test_cli.py",
    "tests/test_distributed.py",
]
_SKIP_DIRS = {".git", ".venv", "__pycache__", ".mypy_cache", ".ruff_cache", ".pytest_cache", ".hypothesis"}
_TIMEOUT_MARK = re.compile(r"Timeout \(?>?[0-9.]+s\)?|Timeout >[0-9.]+s")


class MutantMoved(RuntimeError):
    """The text a mutant replaces is not in its file exactly once: the code moved."""


@dataclass
class Failure:
    test: str
    message: str
    timeout: bool


@dataclass
class Result:
    name: str
    description: str
    file: str
    status: str = "error"  # killed | timeout | survived | error | moved
    killers: list[str] = field(default_factory=list)  # tests that failed (not by a timeout)
    timeouts: list[str] = field(default_factory=list)  # tests killed by pytest-timeout / the bound
    seconds: float = 0.0
    returncode: int | None = None
    note: str = ""
    tests: str = ""  # what was run
    flaky: list[str] = field(default_factory=list)  # failed once, passed on the rerun: deselected


# -- scratch copies ---------------------------------------------------------------------------


def _ignore(src: str, names: list[str]) -> set[str]:
    out = {n for n in names if n in _SKIP_DIRS or n.endswith((".pyc", ".egg-info"))}
    if Path(src).resolve() == (ROOT / "tests" / "mutants").resolve():
        out.add("results")
    return out


def make_copy(scratch: Path) -> Path:
    tree = scratch / "repo"
    shutil.copytree(ROOT, tree, symlinks=True, ignore=_ignore)
    return tree


def whole_suite(tree: Path) -> list[str]:
    """Every test file of ``tree``, fast ones first (see :data:`SLOW_LAST`)."""
    files = sorted(p.relative_to(tree).as_posix() for p in (tree / "tests").rglob("test_*.py"))
    files = [f for f in files if "/mutants/" not in f]
    return [f for f in files if f not in SLOW_LAST] + [f for f in SLOW_LAST if f in files]


def apply(m: Mutant, tree: Path) -> None:
    """Plant ``m`` in ``tree``; raises :class:`MutantMoved` unless ``m.old`` occurs once."""
    path = tree / m.file
    if not path.is_file():
        raise MutantMoved(f"{m.name}: {m.file} does not exist")
    text = path.read_text()
    n = text.count(m.old)
    if n != 1:
        raise MutantMoved(
            f"{m.name}: the text to replace occurs {n} times in {m.file} (expected exactly once): "
            "the code moved; place the mutant again in tests/mutants/catalogue.py"
        )
    path.write_text(text.replace(m.old, m.new))


# -- running the suite ------------------------------------------------------------------------

_SANDBOX = [
    "unshare",
    "--mount",
    "--propagation",
    "private",
    "--pid",
    "--fork",
    "--mount-proc",
    "--kill-child",
]
# pid 1 of the namespace is this shell (it reaps orphans); the suite is its child
_SANDBOX_SCRIPT = 'mount -t tmpfs -o mode=1777 flashckpt-mutants /dev/shm || exit 97; "$@"; exit $?'


def sandbox_available() -> bool:
    if shutil.which("unshare") is None:
        return False
    try:
        probe = subprocess.run(
            [*_SANDBOX, "sh", "-c", _SANDBOX_SCRIPT, "sh", "true"], capture_output=True, timeout=60
        )
    except (OSError, subprocess.TimeoutExpired):
        return False
    return probe.returncode == 0


def _shm_entries() -> set[str]:
    try:
        return set(os.listdir("/dev/shm"))
    except OSError:
        return set()


def _kill_group(proc: subprocess.Popen[bytes]) -> None:
    """End the process group the suite runs in (the sandbox's processes die with it)."""
    for sig, grace in ((signal.SIGTERM, 10.0), (signal.SIGKILL, 30.0)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            continue
        # the leader is gone; members of its group may not be
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        return


_LINGER_S = 30.0


def _wait(proc: subprocess.Popen[bytes], junit: Path, wall_s: float) -> tuple[int | None, bool, bool]:
    """Wait for the suite: (return code or None, over the wall-clock bound, lingered).

    pytest writes its junit report when the session is over; a process that is still there
    ``_LINGER_S`` later waits for something a test left running (a multiprocessing child of a
    failed test, joined at exit): it is stopped, and its failures count as reported."""
    deadline = time.monotonic() + wall_s
    over_at: float | None = None
    while True:
        rc = proc.poll()
        if rc is not None:
            return rc, False, False
        now = time.monotonic()
        if now > deadline:
            return None, True, False
        if over_at is None and junit.is_file() and junit.stat().st_size > 0:
            over_at = now
        if over_at is not None and now - over_at > _LINGER_S:
            return None, False, True
        time.sleep(1.0)


def run_suite(
    tree: Path,
    scratch: Path,
    tests: list[str],
    *,
    exitfirst: bool,
    wall_s: float,
    test_timeout: float,
    sandbox: bool,
    log_path: Path,
    tag: str,
    deselect: list[str] = (),  # type: ignore[assignment]
) -> tuple[int | None, bool, list[Failure], str]:
    """Run pytest in ``tree``.  Returns (return code or None if killed, wall clock exceeded,
    failures, note)."""
    basetemp = scratch / f"basetemp-{tag}"
    junit = scratch / f"junit-{tag}.xml"
    tmp = scratch / "tmp"
    tmp.mkdir(exist_ok=True)
    cmd = [
        sys.executable,
        "-m",
        "pytest",
        "-v",
        "-rfE",
        "-p",
        "no:cacheprovider",
        f"--basetemp={basetemp}",
        "-o",
        f"cache_dir={scratch / 'cache'}",
        "-o",
        f"timeout={test_timeout:g}",
        "-o",
        "junit_family=xunit1",
        f"--junitxml={junit}",
        *(["-x"] if exitfirst else []),
        *(a for t in deselect for a in ("--deselect", t)),
        *tests,
    ]
    if sandbox:
        cmd = [*_SANDBOX, "sh", "-c", _SANDBOX_SCRIPT, "sh", *cmd]
    env = {k: v for k, v in os.environ.items() if not k.startswith(("FLASHCKPT_", "PYTEST_"))}
    env["PYTHONPATH"] = str(tree) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    env["TMPDIR"] = str(tmp)
    env["PYTHONDONTWRITEBYTECODE"] = "1"
    env.pop("COLUMNS", None)
    shm_before = set() if sandbox else _shm_entries()
    notes: list[str] = []
    with open(log_path, "wb") as log:
        log.write(f"$ {' '.join(cmd)}\n".encode())
        log.flush()
        proc = subprocess.Popen(
            cmd, cwd=tree, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )
        try:
            rc, timed_out, lingered = _wait(proc, junit, wall_s)
        finally:
            _kill_group(proc)  # leftovers of a finished run too (a daemon a test forgot)
    if lingered:
        notes.append(f"pytest finished but did not exit within {_LINGER_S:g} s (a test's process lived on)")
    if not sandbox:
        new = sorted(_shm_entries() - shm_before)
        if new:
            notes.append(f"/dev/shm entries appeared during the run (not deleted, may be others'): {new[:5]}")
    failures = _parse_junit(junit)
    out = log_path.read_text(errors="replace")
    if rc == 97 and sandbox:
        notes.append("the sandbox could not mount /dev/shm")
    if not failures or timed_out:
        hung = _hung_test(out)
        if hung and not any(f.test == hung for f in failures):
            failures.append(Failure(hung, "still running when the suite was stopped", True))
    if not failures:
        for line in out.splitlines():  # collection errors, or a run without junit
            mm = re.match(r"^(FAILED|ERROR) (\S+)(?: - (.*))?$", line)
            if mm:
                msg = mm.group(3) or ""
                failures.append(Failure(mm.group(2), msg, bool(_TIMEOUT_MARK.search(msg))))
    return rc, timed_out, failures, "; ".join(notes)


def _parse_junit(path: Path) -> list[Failure]:
    try:
        root = ET.parse(path).getroot()
    except (OSError, ET.ParseError):
        return []
    out = []
    for case in root.iter("testcase"):
        bad = case.find("failure")
        if bad is None:
            bad = case.find("error")
        if bad is None:
            continue
        file = case.get("file") or ""
        classname, name = case.get("classname") or "", case.get("name") or ""
        module = file[:-3].replace("/", ".") if file.endswith(".py") else ""
        if file and classname.startswith(module):
            parts = [p for p in classname[len(module) :].split(".") if p]
            test = "::".join([file, *parts, name])
        else:
            test = f"{classname}::{name}"
        message = (bad.get("message") or "") + "\n" + (bad.text or "")[-2000:]
        first = bad.get("message") or (bad.text or "").strip().splitlines()[-1:] or [""]
        msg = first if isinstance(first, str) else first[0]
        out.append(Failure(test, msg.strip()[:300], bool(_TIMEOUT_MARK.search(message))))
    return out


def _hung_test(output: str) -> str | None:
    """In ``-v`` output, a test whose outcome never came: the last line is its node id."""
    lines = [ln for ln in output.splitlines() if ln.strip()]
    for ln in reversed(lines[-50:]):
        mm = re.match(r"^(tests/\S+::\S+)(.*)$", ln)
        if not mm:
            continue
        if re.search(r"\b(PASSED|FAILED|ERROR|SKIPPED|XFAIL|XPASS)\b", mm.group(2)):
            return None
        return mm.group(1)  # (followed by nothing, or by the shell's "Terminated")
    return None


# -- one mutant -------------------------------------------------------------------------------


def run_one(m: Mutant | None, args: argparse.Namespace, sandbox: bool, logs: Path) -> Result:
    name = m.name if m is not None else BASELINE
    res = Result(name, m.description if m else "the unmutated copy", m.file if m else "")
    res.tests = " ".join(args.tests) if args.tests else "tests"
    scratch = Path(tempfile.mkdtemp(prefix=f"flashckpt-mutant-{name}-"))
    t0 = time.monotonic()
    try:
        tree = make_copy(scratch)
        if m is not None:
            try:
                apply(m, tree)
            except MutantMoved as exc:
                res.status, res.note = "moved", str(exc)
                print(f"!! {exc}", file=sys.stderr)
                return res
        suite = list(args.tests) or whole_suite(tree)
        deselect: list[str] = []
        for attempt in range(1, 4):
            tag = "main" if attempt == 1 else f"main{attempt}"
            rc, timed_out, failures, note = run_suite(
                tree,
                scratch,
                suite,
                exitfirst=not args.no_x,
                wall_s=max(60.0, args.timeout - (time.monotonic() - t0)),
                test_timeout=args.test_timeout,
                sandbox=sandbox,
                log_path=logs / f"{name}.{tag}.log",
                tag=tag,
                deselect=deselect,
            )
            res.returncode, res.note = rc, note
            real = [f for f in failures if not f.timeout]
            confirm = args.more or args.confirm
            if not (m is not None and not args.no_x and real and not timed_out and confirm):
                break
            # Confirm the kill: the killer's file again, without -x.  A first killer that
            # passes there failed by chance (load, timing): deselect it and run again.
            first = real[0]
            left = min(600.0, max(60.0, args.timeout - (time.monotonic() - t0)))
            _, _, more, _ = run_suite(
                tree,
                scratch,
                [first.test.split("::", 1)[0]],
                exitfirst=False,
                wall_s=left,
                test_timeout=args.test_timeout,
                sandbox=sandbox,
                log_path=logs / f"{name}.{tag}.more.log",
                tag=f"{tag}-more",
                deselect=deselect,
            )
            if any(f.test == first.test for f in more) or any(not f.timeout for f in more):
                seen = {f.test for f in failures}
                failures += [f for f in more if f.test not in seen]
                break
            res.flaky.append(first.test)
            deselect.append(first.test)
            print(f"    {first.test} failed once and passed again: deselected, running again", flush=True)
        res.killers = [f.test for f in failures if not f.timeout]
        res.timeouts = [f.test for f in failures if f.timeout]
        if res.killers:
            res.status = "killed"
        elif res.timeouts or timed_out:
            res.status = "timeout"
            if timed_out:
                res.note = (res.note + "; " if res.note else "") + f"suite over its {args.timeout:g} s bound"
        elif rc == 0 or (rc is None and not timed_out):  # (None: passed, then lingered)
            res.status = "survived"
        else:
            res.status = "error"
            res.note = (res.note + "; " if res.note else "") + f"pytest exited {rc} with no failing test"
        if failures:
            res.note = (
                (res.note + "; " if res.note else "")
                + "first: "
                + next((f.message for f in failures if not f.timeout), failures[0].message)[:200]
            )
        return res
    finally:
        res.seconds = round(time.monotonic() - t0, 1)
        shutil.rmtree(scratch, ignore_errors=True)


# -- reports ----------------------------------------------------------------------------------


def load_results(out: Path) -> dict[str, dict]:
    try:
        return dict(json.loads((out / "results.json").read_text()))
    except (OSError, ValueError):
        return {}


def write_results(out: Path, results: dict[str, dict]) -> None:
    out.mkdir(parents=True, exist_ok=True)
    order = [BASELINE, *(m.name for m in MUTANTS)]
    ordered = {k: results[k] for k in order if k in results}
    ordered.update({k: v for k, v in results.items() if k not in ordered})
    (out / "results.json").write_text(json.dumps(ordered, indent=1) + "\n")
    (out / "results.md").write_text(render(ordered))


def render(results: dict[str, dict]) -> str:
    base_fail = set((results.get(BASELINE) or {}).get("killers", []))
    lines = [
        "| mutant | what it plants | outcome | by which tests (first few) | time |",
        "| --- | --- | --- | --- | --- |",
    ]
    counts: dict[str, int] = {}
    for name, r in results.items():
        if name == BASELINE:
            continue
        counts[r["status"]] = counts.get(r["status"], 0) + 1
        tests = r["killers"] or r["timeouts"]
        shown = []
        for t in tests[:3]:
            short = t.removeprefix("tests/")
            shown.append(f"`{short}`" + (" (fails unmutated too)" if t in base_fail else ""))
        more = f" +{len(tests) - 3}" if len(tests) > 3 else ""
        outcome = {"timeout": "timeout only"}.get(r["status"], r["status"])
        if r.get("flaky"):
            outcome += (
                " (deselected after a chance failure: "
                + ", ".join(f"`{t.removeprefix('tests/')}`" for t in r["flaky"])
                + ")"
            )
        lines.append(
            f"| `{name}` | {r['description']} (`{r['file']}`) | {outcome} | "
            f"{', '.join(shown)}{more} | {r['seconds']:.0f} s |"
        )
    summary = ", ".join(f"{v} {k}" for k, v in sorted(counts.items()))
    head = [f"# Mutation campaign\n\n{summary}.\n"]
    if BASELINE in results:
        b = results[BASELINE]
        failing = b["killers"] + b["timeouts"]
        head.append(
            f"Baseline (unmutated): {b['status']}, {b['seconds']:.0f} s"
            + (f"; failing: {', '.join(failing)}" if failing else "")
            + "\n"
        )
    return "\n".join(head) + "\n" + "\n".join(lines) + "\n"


# -- main -------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m tests.mutants.run", description=__doc__.split("\n\n")[0])
    p.add_argument("--only", action="append", default=[], help="mutant name(s), repeatable or a,b,c")
    p.add_argument("--timeout", type=float, default=1800.0, help="wall-clock bound per mutant run (s)")
    p.add_argument("--test-timeout", type=float, default=300.0, help="pytest-timeout per test (s)")
    p.add_argument("--tests", nargs="+", default=[], help="test paths (default: the whole suite)")
    p.add_argument("--no-x", action="store_true", help="run every test (the full list of killers)")
    p.add_argument("--more", action="store_true", help="after a -x kill, rerun the killer's file without -x")
    p.add_argument(
        "--confirm", action="store_true", help="like --more (confirms a kill; a chance failure is deselected)"
    )
    p.add_argument("--baseline", action="store_true", help="first run the unmutated copy")
    p.add_argument("--check", action="store_true", help="only check that every mutant applies")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT, help="where results.json/.md go")
    p.add_argument("--nice", type=int, default=10, help="run at this niceness at least (default 10)")
    p.add_argument("--no-sandbox", action="store_true", help="no private /dev/shm and pid namespace")
    args = p.parse_args(argv)

    names = [n for arg in args.only for n in arg.split(",") if n]
    unknown = [n for n in names if n not in BY_NAME]
    if unknown:
        p.error(f"unknown mutants: {unknown}; known: {', '.join(BY_NAME)}")
    chosen = [BY_NAME[n] for n in names] if names else list(MUTANTS)

    if args.check:
        bad = 0
        with tempfile.TemporaryDirectory(prefix="flashckpt-mutant-check-") as d:
            tree = make_copy(Path(d))
            for m in chosen:
                path = tree / m.file
                text = path.read_text() if path.is_file() else ""
                n = text.count(m.old)
                verdict = "ok" if n == 1 and m.old != m.new else "MOVED"
                if verdict == "ok":
                    try:  # the mutated file must still compile
                        compile(text.replace(m.old, m.new), str(path), "exec")
                    except SyntaxError as exc:
                        verdict = f"BROKEN ({exc})"
                bad += verdict != "ok"
                print(f"{verdict:5} {m.name}: {m.file} ({n} match{'es' if n != 1 else ''})")
        return 1 if bad else 0

    def stop(signum: int, frame: object) -> None:  # SIGTERM: clean up like Ctrl-C
        raise KeyboardInterrupt(f"signal {signum}")

    signal.signal(signal.SIGTERM, stop)
    current = os.nice(0)
    if args.nice > current:
        os.nice(args.nice - current)
    sandbox = not args.no_sandbox and sandbox_available()
    if not sandbox:
        print("note: no mount/pid namespace here: /dev/shm is shared; new entries are only reported")
    out: Path = args.out
    logs = out / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    results = load_results(out)
    todo: list[Mutant | None] = ([None] if args.baseline else []) + list(chosen)
    t_all = time.monotonic()
    moved = 0
    for i, m in enumerate(todo, 1):
        label = m.name if m is not None else BASELINE
        print(f"[{i}/{len(todo)}] {label} ...", flush=True)
        res = run_one(m, args, sandbox, logs)
        moved += res.status == "moved"
        shown = ", ".join((res.killers or res.timeouts)[:3])
        print(f"    {res.status} in {res.seconds:.0f} s {shown}", flush=True)
        results[label] = asdict(res)
        write_results(out, results)
    print(f"campaign done in {time.monotonic() - t_all:.0f} s; results in {out / 'results.md'}")
    return 2 if moved else 0


if __name__ == "__main__":
    sys.exit(main())
