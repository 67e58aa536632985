"""One command for every benchmark: ``python -m bench``.

    python -m bench --quick          # 256 MiB, fewer repeats: under 5 minutes here
    python -m bench                  # 256 MiB, 1 GiB and 4 GiB: under 30 minutes here
    python -m bench --dist           # also the multi-rank and mirror figures (bench_dist, bench_mirror)

Each measurement runs in a process of its own (``bench.bench_core``, ``bench.bench_suite``
sections, ``bench.bench_s3``; with ``--dist`` also ``bench.bench_dist`` and
``bench.bench_mirror``), its raw figures in JSON; then one report: ``<out>/latest.md`` (every
figure, every ratio, the targets, the machine and the versions), ``<out>/latest.json`` (the raw
figures) and PNG plots beside them, which the README embeds.  A section that fails is reported
as such in the report (its log is in ``<out>/logs/``); the others still run.

Rivals that are not dependencies of flashckpt are measured where they are installed
(``bash bench/setup`` installs them: matplotlib for the plots, Meta's ``torch_checkpointing``,
and the all-MiniLM-L6-v2 weights for the compression figure); a missing one is named in the
report.  States are transformer-shaped: bf16 weights with fp32 master weights and Adam moments
(14 bytes per parameter), random values that change between saves.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
#: the sections without a size in their key
SECTIONS = ("s3", "training", "compression", "dist", "mirrors")
GiB = 1 << 30


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


class Runner:
    """Runs each section as ``python -m MODULE ...`` with a JSON result file; keeps going on
    failure (the report names it)."""

    def __init__(self, out: Path, disk: Path, total: int) -> None:
        self.out, self.disk, self.total = out, disk, total
        self.done = 0
        self.t0 = time.perf_counter()
        (out / "logs").mkdir(parents=True, exist_ok=True)

    def run(self, name: str, title: str, module: str, args: list[str], timeout: float) -> dict[str, Any]:
        self.done += 1
        fd, tmp = tempfile.mkstemp(prefix="bench-", suffix=".json", dir=self.disk)
        os.close(fd)
        logf = self.out / "logs" / f"{name}.log"
        cmd = [sys.executable, "-m", module, *args, "--json", tmp]
        log(f"[{self.done}/{self.total}] {title}  ({time.perf_counter() - self.t0:.0f} s so far)")
        t0 = time.perf_counter()
        try:
            with open(logf, "w") as f:
                proc = subprocess.run(
                    cmd, cwd=REPO, stdout=f, stderr=subprocess.STDOUT, timeout=timeout, check=False
                )
            ok = proc.returncode == 0
            why = f"exit code {proc.returncode}"
        except subprocess.TimeoutExpired:
            ok, why = False, f"over its {timeout:.0f} s bound"
        try:
            data = json.loads(Path(tmp).read_text()) if ok else None
        except (OSError, ValueError) as exc:
            data, why = None, f"no result: {exc}"
        finally:
            Path(tmp).unlink(missing_ok=True)
        secs = time.perf_counter() - t0
        if data is None:
            log(f"    FAILED ({why}); log: {logf}")
            return {"failed": why, "log": str(logf.relative_to(self.out)), "seconds": secs}
        log(f"    done in {secs:.0f} s")
        data["seconds"] = secs
        return dict(data)


def machine() -> dict[str, Any]:
    import torch

    import flashckpt

    cpu = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    rev = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True
    ).stdout
    versions = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "flashckpt": flashckpt.__version__,
    }
    for mod in ("torch_checkpointing", "matplotlib", "s3fs", "moto", "boto3"):
        try:
            versions[mod] = str(__import__(mod).__version__)
        except Exception:
            versions[mod] = "not installed"
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "memory_gib": round(mem / GiB, 1),
        "kernel": platform.release(),
        "git": rev.strip(),
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "versions": versions,
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="256 MiB only, fewer repeats (under 5 minutes)")
    p.add_argument("--dist", action="store_true", help="also bench_dist (4 ranks) and bench_mirror")
    p.add_argument("--sizes", help="state sizes in GiB, comma-separated (default 0.25,1,4; --quick 0.25)")
    p.add_argument("--out", default=str(REPO / "bench" / "results"), help="where latest.md/json and plots go")
    p.add_argument(
        "--dir", default=None, help="a disk directory for the files (default: the repository's bench/)"
    )
    p.add_argument(
        "--only",
        help="comma-separated sections to run (core,read,memory,rivals,mirror,s3,training,compression); "
        "the others are taken from the last latest.json of the same sizes, and the report says so",
    )
    p.add_argument(
        "--render", action="store_true", help="only write latest.md and the plots again from latest.json"
    )
    args = p.parse_args(argv)
    if args.render:
        from bench.report import render

        out = Path(args.out)
        if not (out / "latest.json").is_file():
            raise SystemExit(f"--render: no {out / 'latest.json'} to render (run python -m bench first)")
        (out / "latest.md").write_text(render(json.loads((out / "latest.json").read_text()), out))
        log(f"wrote {out / 'latest.md'} and the plots from {out / 'latest.json'}")
        return 0
    sizes = [float(s) for s in (args.sizes or ("0.25" if args.quick else "0.25,1,4")).split(",") if s]
    only = set(args.only.split(",")) if args.only else None
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    disk = Path(args.dir) if args.dir else REPO / "bench"
    repeats = "2" if args.quick else "3"

    def want(section: str) -> bool:
        return only is None or section in only

    plan: list[tuple[str, str, str, list[str], float]] = []  # (key, name, module, args, timeout)
    for g in sizes:
        tag = f"{g:g}"
        scratch = ["--dir", str(disk)]
        if want("core"):
            core = ["--sizes", tag, "--repeats", repeats, "--no-profile", "--step-s", "1", *scratch]
            plan.append((f"core/{tag}", f"core, {tag} GiB", "bench.bench_core", core, 1800))
        common = ["--gib", tag, "--repeats", repeats, *scratch]
        if want("read"):
            plan.append(
                (
                    f"read/{tag}",
                    f"raw read and torch.load, {tag} GiB",
                    "bench.bench_suite",
                    ["read", *common],
                    900,
                )
            )
        if want("memory"):
            plan.append(
                (f"memory/{tag}", f"host memory, {tag} GiB", "bench.bench_suite", ["memory", *common], 1200)
            )
        if want("rivals"):
            plan.append(
                (
                    f"tc/{tag}",
                    f"torch_checkpointing, {tag} GiB",
                    "bench.bench_suite",
                    ["torch_checkpointing", *common],
                    900,
                )
            )
        if want("mirror") and g <= 1:  # two ranks' states and slots in this machine's memory
            plan.append(
                (
                    f"mirror/{tag}",
                    f"restore from a peer mirror, {tag} GiB",
                    "bench.bench_suite",
                    ["mirror", *common],
                    900,
                )
            )
    if want("s3"):
        mib = "256" if args.quick else "1024"
        plan.append(
            ("s3", f"S3 on loopback, {mib} MiB", "bench.bench_s3", ["--mib", mib, "--repeats", repeats], 1800)
        )
    if want("training"):
        steps = ["--steps", "20" if args.quick else "60", "--repeats", "1" if args.quick else "3"]
        plan.append(("training", "training throughput", "bench.bench_suite", ["training", *steps], 1800))
    if want("compression"):
        plan.append(("compression", "compression on real weights", "bench.bench_suite", ["compression"], 600))
    if args.dist:
        plan.append(
            ("dist", "4 ranks (bench_dist)", "bench.bench_dist", ["--ranks", "4", "--mib", "256"], 1800)
        )
        plan.append(
            (
                "mirrors",
                "mirror push and training (bench_mirror)",
                "bench.bench_mirror",
                ["--mib", "256"],
                1800,
            )
        )

    runner = Runner(out, disk, len(plan))
    results: dict[str, Any] = {"machine": machine(), "quick": args.quick, "sizes": sizes}
    previous = out / "latest.json"
    if only is not None and previous.is_file():  # the other sections: from the last run
        old = json.loads(previous.read_text())
        if old.get("sizes") == sizes and old.get("quick") == args.quick:
            rerun = {p[0] for p in plan}
            keep = {k: v for k, v in old.items() if k not in results and k not in rerun and k != "dates"}
            results.update(keep)
            dates = old.get("dates") or {}
            results["dates"] = {
                k: dates.get(k, old["machine"].get("date")) for k in keep if "/" in k or k in SECTIONS
            }
            results["rerun"] = {"sections": sorted(rerun), "earlier": sorted(set(results["dates"].values()))}
    for key, name, module, margs, timeout in plan:
        results[key] = runner.run(key.replace("/", "-"), name, module, margs, timeout)
    results["seconds"] = time.perf_counter() - runner.t0
    from bench.report import render

    (out / "latest.json").write_text(json.dumps(results, indent=1, default=str))
    md = render(results, out)
    (out / "latest.md").write_text(md)
    log(f"wrote {out / 'latest.md'}, {out / 'latest.json'} and the plots, in {results['seconds']:.0f} s")
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
