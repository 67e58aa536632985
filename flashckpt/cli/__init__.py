"""The ``flashckpt`` command line: list, inspect, verify, export and compare checkpoints on
every tier; salvage a dead job's memory-only steps; retention by hand; plan the interval.

Exit codes (as DESIGN.md has them): 0 ok; 1 verification failed (``verify`` found a corrupt
step, ``ls`` a step whose records do not validate); 2 usage or access error (bad arguments
or URL, a tier or step that cannot be read, an unexpected error).  When a run finds both,
2 wins: some steps were not checked.  The tree may hold anything (torn or hostile records):
a bad step is reported and the others are still listed or verified, and no error ever
prints a traceback, only one line on stderr.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any, TypeVar

import torch

from flashckpt.catalog import Catalog
from flashckpt.cli import maintain
from flashckpt.cli._common import FAILED, OK, USAGE, add_url, line, progress, storage_options, warn
from flashckpt.errors import CheckpointNotFound, CorruptCheckpointError, FlashCkptError, ObjectNotFound
from flashckpt.format import DTensorRef, Manifest, TensorRef, tree_leaves

T = TypeVar("T")


def _verdict(exc: BaseException) -> tuple[int, str]:
    """What a failure while reading one step means: (exit code, label).  A record or chunk
    that fails validation, or is missing from a committed step, is corruption; anything
    else (an unreadable tier, an unexpected error) means the step could not be checked."""
    if isinstance(exc, (CorruptCheckpointError, ObjectNotFound)):
        return FAILED, "CORRUPT"
    if isinstance(exc, FlashCkptError):
        return USAGE, "UNREADABLE"
    return USAGE, f"ERROR ({type(exc).__name__})"


def _ls_tiers(args: argparse.Namespace) -> int:
    """``ls`` with ``--memory-dir`` / ``--local-dir``: one row per snapshot across the tiers."""
    from flashckpt.catalog import tier_copies

    with Catalog(args.url, storage_options=storage_options(args)) as cat:
        copies = tier_copies(cat, memory_dir=args.memory_dir, local_dir=args.local_dir)
    snaps: dict[tuple[int, int], dict[str, Any]] = {}
    for c in copies:
        fresh = {
            "step": c.step,
            "generation": c.generation,
            "world_size": c.world_size,
            "tiers": {},
            "unsealed": [],
            "shard_bytes": {},
            "created_unix": None,
        }
        row = snaps.setdefault((c.generation, c.step), fresh)
        row["world_size"] = max(row["world_size"], c.world_size)
        row["tiers"].setdefault(c.tier, set()).add(c.rank)
        if c.nbytes is not None:
            row["shard_bytes"][c.rank] = c.nbytes
        if c.created_unix is not None:
            row["created_unix"] = min(row["created_unix"] or c.created_unix, c.created_unix)
        if not c.sealed:
            row["unsealed"].append(c.rank)
    pick = None
    for order in sorted(snaps, reverse=True):
        row = snaps[order]
        held = set().union(*row["tiers"].values())
        missing = sorted(set(range(row["world_size"])) - held)
        if missing:
            row["note"] = f"passed over: no copy of rank(s) {', '.join(map(str, missing))}"
        elif pick is None:
            pick = order
            row["note"] = "restore picks this (if every byte verifies)"
    rows = []
    for order in sorted(snaps):
        row = snaps[order]
        tiers = {t: sorted(r) for t, r in row["tiers"].items()}
        shards = row.pop("shard_bytes")
        size = sum(shards.values()) if len(shards) == row["world_size"] else None
        rows.append({**row, "tiers": tiers, "bytes": size, "restore": order == pick})
    if args.json:
        print(json.dumps(rows))
        return OK

    def cell(row: dict[str, Any], tier: str) -> str:
        ranks = row["tiers"].get(tier)
        if not ranks:
            return "-"
        return "all" if len(ranks) == row["world_size"] else ",".join(f"r{r}" for r in ranks)

    now = time.time()
    print(f"{'step':>12}  {'ranks':>5}  {'bytes':>13}  {'age':>7}  {'memory':<8} {'mirror':<8} {'local':<8} "
          f"{'storage':<8} note")  # fmt: skip
    for row in rows:
        mem = cell(row, "memory") + ("*" if row["unsealed"] else "")
        size = "?" if row["bytes"] is None else f"{row['bytes']:,}"
        age = "?" if row["created_unix"] is None else _age(now - row["created_unix"])
        where = f"{mem:<8} {cell(row, 'mirror'):<8} {cell(row, 'local'):<8} {cell(row, 'storage'):<8}"
        head = f"{row['step']:>12}  {row['world_size']:>5}  {size:>13}  {age:>7}"
        print(f"{head}  {where} {row.get('note', '')}".rstrip())
    if any(r["unsealed"] for r in rows):
        print("(* a memory copy not yet checksummed: the process stopped while persisting it)")
    return OK


def _age(seconds: float) -> str:
    """``42s``, ``17m``, ``5h``, ``3d``."""
    seconds = max(0.0, seconds)
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{seconds / size:.0f}{unit}"
    return f"{seconds:.0f}s"


def _ls(args: argparse.Namespace) -> int:
    if args.memory_dir is not None or args.local_dir is not None:
        return _ls_tiers(args)
    rows: list[dict[str, Any]] = []
    code = OK
    with Catalog(args.url, storage_options=storage_options(args)) as cat:
        for info in cat.steps():
            row: dict[str, Any] = {
                "step": info.step,
                "world_size": info.world_size,
                "bytes": info.bytes,
                "created_unix": info.created_unix,
                "error": None,
            }
            if info.error is not None:
                step_code, label = _verdict(info.error)
                code = max(code, step_code)
                row["error"] = f"{label}: {line(info.error)}"
                warn(f"step {info.step}: {row['error']}")
            rows.append(row)
    if args.json:
        print(json.dumps(rows))
    else:
        print(f"{'step':>12}  {'ranks':>5}  {'bytes':>14}")
        for r in rows:
            if r["error"] is None:
                print(f"{r['step']:>12}  {r['world_size']:>5}  {r['bytes']:>14,}")
            else:
                print(f"{r['step']:>12}  {'?':>5}  {'?':>14}  {r['error'].split(':')[0]}")
    return code


def _verify(args: argparse.Namespace) -> int:
    code = OK
    with Catalog(args.url, storage_options=storage_options(args)) as cat:
        steps = cat.step_numbers()
        if args.step is not None:
            steps = [s for s in steps if s == args.step]
            if not steps:
                warn(f"step {args.step} is not committed at {cat.url}")
                return USAGE
        if not steps:
            warn(f"no committed step at {cat.url}: nothing to verify")
        rows: list[dict[str, Any]] = []
        for step in steps:
            try:
                with progress(f"step {step}") as bar:
                    cat.verify(step, bar)  # every rank's records, the shards against each other, every chunk
                rows.append({"step": step, "ok": True, "error": None})
            except Exception as exc:  # report this step, verify the others  # noqa: BLE001
                step_code, label = _verdict(exc)
                code = max(code, step_code)
                rows.append({"step": step, "ok": False, "error": f"{label}: {line(exc)}"})
            if not args.json:
                r = rows[-1]
                print(f"step {step}: ok" if r["ok"] else f"step {step}: {r['error']}")
    if args.json:
        print(json.dumps(rows))
    return code


def _newest(cat: Catalog) -> int:
    """The newest committed step whose records validate, in ``(generation, step)`` order."""
    good = [i for i in cat.steps() if i.error is None]
    if not good:
        raise CheckpointNotFound(f"no committed step at {cat.url}")
    return max(good, key=lambda i: (i.generation or 0, i.step)).step


def _tree_rows(m: Manifest) -> Iterator[dict[str, Any]]:
    """One row per leaf of a shard's saved tree (keys as the state walk names them)."""
    for key, node in tree_leaves(m.state_tree()):
        if isinstance(node, (TensorRef, DTensorRef)):
            e = m.tensors[node.index]
            row = {"key": key, "kind": "tensor", "dtype": str(e.dtype).removeprefix("torch."),
                   "shape": list(e.shape), "bytes": e.nbytes, "index": node.index}  # fmt: skip
            if isinstance(node, DTensorRef):
                row.update(kind="dtensor", global_shape=list(node.shape), placements=list(node.placements),
                           mesh=list(node.mesh))  # fmt: skip
            yield row
        else:
            text = repr(node)
            yield {"key": key, "kind": "value", "value": text if len(text) <= 80 else text[:77] + "..."}


def _committed_step(cat: Catalog, step: int | None) -> int | None:
    """``step`` (default: the newest committed one) if it is committed, else ``None`` (said)."""
    step = step if step is not None else _newest(cat)
    if step not in cat.step_numbers():
        warn(f"step {step} is not committed at {cat.url}")
        return None
    return step


def _tensor_stats(t: torch.Tensor) -> dict[str, Any]:
    """min, max, mean, L2 norm over the finite elements; NaN and inf counts."""
    if t.is_complex():
        t = t.abs()
    x = t.detach().to(torch.float64) if t.dtype != torch.bool else t.to(torch.float64)
    finite = torch.isfinite(x)
    vals = x[finite]
    out: dict[str, Any] = {
        "numel": t.numel(),
        "nan": int(torch.isnan(x).sum()),
        "inf": int(torch.isinf(x).sum()),
    }
    if vals.numel():
        out.update(
            min=float(vals.min()), max=float(vals.max()), mean=float(vals.mean()), norm=float(vals.norm())
        )
    else:
        out.update(min=None, max=None, mean=None, norm=None)
    return out


def _inspect(args: argparse.Namespace) -> int:
    with Catalog(args.url, storage_options=storage_options(args)) as cat:
        step = _committed_step(cat, args.step)
        if step is None:
            return USAGE
        try:
            manifests = cat.manifests(step)
        except Exception as exc:  # a damaged record: one line, its verdict  # noqa: BLE001
            code, label = _verdict(exc)
            warn(f"step {step}: {label}: {exc}")
            return code
        world = len(manifests)
        if not 0 <= args.rank < world:
            warn(f"step {step} was saved by {world} rank(s): there is no rank {args.rank}")
            return USAGE
        m = manifests[args.rank]
        rows = list(_tree_rows(m))
        if args.tensor is not None:
            hit = [r for r in rows if r["key"] == args.tensor and r["kind"] != "value"]
            if not hit:
                warn(
                    f"step {step}, rank {args.rank}: no tensor {args.tensor!r} "
                    "(`flashckpt inspect URL` lists the keys)"
                )
                return USAGE
            try:
                t = cat.read_tensor(m, hit[0]["index"])
            except Exception as exc:  # noqa: BLE001 - its verdict, one line
                code, label = _verdict(exc)
                warn(f"step {step}, {args.tensor}: {label}: {exc}")
                return code
            stats = {"step": step, "rank": args.rank, **{k: v for k, v in hit[0].items() if k != "index"}}
            stats.update(_tensor_stats(t))
            if args.json:
                print(json.dumps(stats))
            else:
                for k, v in stats.items():
                    print(f"{k:>12}  {v}")
            return OK
        if args.json:
            print(json.dumps({"step": step, "world_size": world, "rank": args.rank,
                              "bytes": sum(x.total_bytes for x in manifests), "entries": rows}))  # fmt: skip
            return OK
        total = sum(x.total_bytes for x in manifests)
        print(f"step {step}: {world} rank(s), {total:,} bytes; rank {args.rank}'s tree:")
        for r in rows:
            if r["kind"] == "value":
                print(f"  {r['key']:<48} = {r['value']}")
            else:
                extra = f"  {r['placements']} of {r['global_shape']}" if r["kind"] == "dtensor" else ""
                print(f"  {r['key']:<48} {r['dtype']:<10} {tuple(r['shape'])!s:<18} {r['bytes']:>12,}{extra}")
    return OK


def _side(spec: str) -> tuple[str, int | None]:
    """``URL`` or ``URL@STEP``."""
    url, at, step = spec.rpartition("@")
    if at and step.isdigit():
        return url, int(step)
    return spec, None


def _same_chunks(a: Manifest, b: Manifest, ia: int, ib: int) -> bool:
    """Tensor ``ia`` of ``a`` and ``ib`` of ``b`` each fill whole chunks, and those chunks have
    the same sizes and checksums (of their raw bytes): the tensors are equal, unread."""

    def cover(m: Manifest, i: int) -> list[tuple[int, int, str]] | None:
        e = m.tensors[i]
        end = e.offset + e.nbytes
        cs = sorted(
            (c for c in m.chunks if c.offset < end and c.offset + c.nbytes > e.offset), key=lambda c: c.offset
        )
        if not cs or cs[0].offset != e.offset or cs[-1].offset + cs[-1].nbytes != e.offset + e.nbytes:
            return None  # packed with other tensors: the checksum covers more than this one
        return [(c.offset - e.offset, c.nbytes, c.checksum) for c in cs]

    ca, cb = cover(a, ia), cover(b, ib)
    return ca is not None and ca == cb


def _compare(x: torch.Tensor, y: torch.Tensor, atol: float, rtol: float) -> tuple[bool, float, float]:
    """(close, max absolute error, max relative error) of two tensors of one dtype and shape.
    ``atol == rtol == 0``: close means bitwise equal.  Otherwise NaNs and infinities must sit
    at the same places (infinities with the same sign), and ``|x - y| <= atol + rtol |y|``."""
    wide = torch.complex128 if x.is_complex() else torch.float64
    xd, yd = x.to(wide), y.to(wide)
    finite = torch.isfinite(xd) & torch.isfinite(yd)
    err = (xd - yd).abs()[finite]
    scale = yd.abs()[finite]
    rel = err / scale.clamp_min(torch.finfo(torch.float64).tiny)
    abs_max = float(err.max()) if err.numel() else 0.0
    rel_max = float(rel.max()) if rel.numel() else 0.0
    if atol == 0 and rtol == 0:
        bits = x.contiguous().reshape(-1).view(torch.uint8), y.contiguous().reshape(-1).view(torch.uint8)
        return bool(torch.equal(*bits)), abs_max, rel_max
    inf_x, inf_y = torch.isinf(xd), torch.isinf(yd)
    special = torch.equal(torch.isnan(xd), torch.isnan(yd)) and torch.equal(inf_x, inf_y)
    special = special and torch.equal(xd[inf_x], yd[inf_y])
    return bool(special and bool((err <= atol + rtol * scale).all())), abs_max, rel_max


class _Damaged(Exception):
    """A step ``diff`` reads is damaged (its verdict: exit 1)."""


def _damaged(cat: Catalog, step: int, read: Callable[[], T]) -> T:
    """``read()``; a damaged record or chunk raised as :class:`_Damaged`, naming the step."""
    try:
        return read()
    except (CorruptCheckpointError, ObjectNotFound) as exc:
        raise _Damaged(f"{cat.url} step {step}: CORRUPT: {exc}") from exc


def _diff(args: argparse.Namespace) -> int:
    (url_a, step_a), (url_b, step_b) = _side(args.a), _side(args.b)
    report: dict[str, Any] = {
        "only_a": [],
        "only_b": [],
        "changed": [],
        "differ": [],
        "compared": 0,
        "unread": 0,
    }
    with (
        Catalog(url_a, storage_options=storage_options(args)) as ca,
        Catalog(url_b, storage_options=storage_options(args)) as cb,
    ):
        sa, sb = _committed_step(ca, step_a), _committed_step(cb, step_b)
        if sa is None or sb is None:
            return USAGE
        try:
            ma, mb = _damaged(ca, sa, lambda: ca.manifests(sa)), _damaged(cb, sb, lambda: cb.manifests(sb))
        except _Damaged as damage:
            warn(damage)
            return FAILED
        report.update(a=f"{ca.url}@{sa}", b=f"{cb.url}@{sb}", world_a=len(ma), world_b=len(mb))
        if len(ma) != len(mb):
            report["changed"].append({"key": "<world size>", "a": len(ma), "b": len(mb)})
        for rank in range(min(len(ma), len(mb))):
            a, b = ma[rank], mb[rank]
            prefix = f"[rank {rank}] " if max(len(ma), len(mb)) > 1 else ""
            ra = {r["key"]: r for r in _tree_rows(a)}
            rb = {r["key"]: r for r in _tree_rows(b)}
            report["only_a"] += [prefix + k for k in ra if k not in rb]
            report["only_b"] += [prefix + k for k in rb if k not in ra]
            for k in (k for k in ra if k in rb):
                x, y = ra[k], rb[k]
                if x["kind"] == "value" or y["kind"] == "value":
                    if x.get("value") != y.get("value") or x["kind"] != y["kind"]:
                        report["changed"].append({"key": prefix + k, "a": x.get("value", x.get("dtype")),
                                                  "b": y.get("value", y.get("dtype"))})  # fmt: skip
                    continue
                if (x["dtype"], x["shape"]) != (y["dtype"], y["shape"]):
                    report["changed"].append({"key": prefix + k, "a": f"{x['dtype']} {tuple(x['shape'])}",
                                              "b": f"{y['dtype']} {tuple(y['shape'])}"})  # fmt: skip
                    continue
                report["compared"] += 1
                if _same_chunks(a, b, x["index"], y["index"]):
                    report["unread"] += 1
                    continue
                try:
                    tx = _damaged(ca, sa, lambda: ca.read_tensor(a, x["index"]))  # noqa: B023 - called now
                    ty = _damaged(cb, sb, lambda: cb.read_tensor(b, y["index"]))  # noqa: B023
                except _Damaged as damage:
                    warn(damage)
                    return FAILED
                close, abs_max, rel_max = _compare(tx, ty, args.atol, args.rtol)
                if not close:
                    report["differ"].append({"key": prefix + k, "max_abs": abs_max, "max_rel": rel_max})
    same = not any(report[k] for k in ("only_a", "only_b", "changed", "differ"))
    if args.json:
        print(json.dumps(report))
    else:
        for k in report["only_a"]:
            print(f"only in A: {k}")
        for k in report["only_b"]:
            print(f"only in B: {k}")
        for c in report["changed"]:
            print(f"changed: {c['key']}: {c['a']} -> {c['b']}")
        for d in report["differ"]:
            print(f"differs: {d['key']}: max abs {d['max_abs']:.6g}, max rel {d['max_rel']:.6g}")
        bound = "" if args.atol == args.rtol == 0 else f" beyond atol {args.atol} / rtol {args.rtol}"
        print(
            f"A = {report['a']}, B = {report['b']}: {report['compared']} tensors compared "
            f"({report['unread']} equal by their chunks' checksums, not read), "
            f"{len(report['differ'])} differ{bound}"
        )
    return OK if same else FAILED


def _restore(args: argparse.Namespace) -> int:
    from pathlib import Path

    from flashckpt.cli.export import parse_size, select, select_specs, tally, write_pt, write_safetensors

    out = Path(args.out)
    shard = parse_size(args.max_shard_size)
    with Catalog(args.url, storage_options=storage_options(args)) as cat:
        step = _committed_step(cat, args.step)
        if step is None:
            return USAGE
        try:
            specs = select_specs(cat.leaf_specs(step), args.only, args.dtype)
            if args.only is not None and not specs:
                warn(f"step {step} has nothing under {args.only!r}")
                return USAGE
            with progress(f"step {step}") as bar:
                leaves = tally(select(cat.leaves(step), args.only, args.dtype), specs, bar)
                if out.suffix == ".pt":
                    done = write_pt(leaves, out)
                elif out.suffix == ".safetensors":
                    done = write_safetensors(specs, leaves, out)
                else:
                    done = write_safetensors(specs, leaves, out, shard_bytes=shard)
        except (CorruptCheckpointError, ObjectNotFound) as exc:
            warn(f"step {step}: CORRUPT: {exc}")
            return FAILED
    if done["left_out"]:
        shown = ", ".join(done["left_out"][:8]) + (", ..." if len(done["left_out"]) > 8 else "")
        warn(f"{len(done['left_out'])} value(s) that are not tensors left out: {shown}")
    files = ", ".join(done["files"])
    print(f"step {step} -> {out}: {files} ({done['bytes']:,} bytes of tensors)")
    return OK


def _pairs(text: str, what: str) -> dict[str, float]:
    """``a=1,b=2`` as a dict of floats."""
    out: dict[str, float] = {}
    for part in filter(None, (x.strip() for x in text.split(","))):
        key, eq, value = part.partition("=")
        try:
            if not eq:
                raise ValueError(part)
            out[key.strip()] = float(value)
        except ValueError:
            raise ValueError(f"{what}: expected NAME=NUMBER[,NAME=NUMBER...], got {text!r}") from None
    return out


def _plan(args: argparse.Namespace) -> int:
    from flashckpt.cli.plan import Costs, plan

    stats: dict[str, Any] = {}
    if args.stats:
        with open(args.stats) as f:
            stats = json.load(f)
        if not isinstance(stats, dict):
            raise ValueError(f"{args.stats}: not a JSON object (write Checkpointer.stats with json.dump)")
    persist_s = stats.get("persist_s") or {}
    restored = stats.get("restored") or {}
    restore = {str(restored["tier"]): float(restored["seconds"])} if "tier" in restored else {}
    restore.update(_pairs(args.restore or "", "--restore"))
    blocking = args.blocking if args.blocking is not None else stats.get("blocking_s")
    persist = args.persist if args.persist is not None else persist_s.get("storage", 0.0)
    if blocking is None or args.step is None or args.mtbf is None:
        raise ValueError("plan needs --step, --mtbf and --blocking (or a --stats JSON with blocking_s)")
    shares = _pairs(args.failures, "--failures")
    costs = Costs(
        step=args.step, blocking=float(blocking), mtbf=args.mtbf * 3600, persist=float(persist),
        restore=restore, shares=shares, mirrors=args.mirrors,
    )  # fmt: skip
    p = plan(costs, every_now=args.every, persist_every_now=args.persist_every)
    report = {
        "young_s": p.tau_young, "daly_s": p.tau_daly, "interval_s": p.tau, "every": p.every,
        "persist_every": p.persist_every, "binds": p.binds, "waste": p.waste, "goodput": p.goodput,
        "wasted_per_day_s": p.wasted_per_day(), "waste_now": p.waste_now,
        "wasted_per_day_now_s": None if p.waste_now is None else p.wasted_per_day(p.waste_now),
    }  # fmt: skip
    if args.json:
        print(json.dumps(report))
        return OK
    print(f"optimum interval: Young {p.tau_young:.1f} s, Daly {p.tau_daly:.1f} s")
    print(
        f"recommended: every={p.every} steps ({p.tau:.1f} s of training), persist_every={p.persist_every} "
        f"(binding: {p.binds})"
    )
    print(f"expected waste {p.waste:.2%} ({p.wasted_per_day() / 60:.1f} min/day), goodput {p.goodput:.2%}")
    if p.waste_now is not None:
        print(
            f"current every={args.every}, persist_every={args.persist_every}: waste {p.waste_now:.2%} "
            f"({p.wasted_per_day(p.waste_now) / 60:.1f} min/day)"
        )
    return OK


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="flashckpt",
        description=__doc__.split("\n\n")[0] if __doc__ else None,
        epilog="exit codes: 0 ok, 1 verification failed, 2 usage or access error",
    )
    parser.add_argument("-v", "--verbose", action="store_true")
    sub = parser.add_subparsers(dest="cmd", required=True)
    _read_commands(sub)
    maintain.add_commands(sub)
    _plan_command(sub)
    return parser


def _read_commands(sub: Any) -> None:
    """ls, verify, inspect, restore, diff."""
    p = sub.add_parser("ls", help="list committed steps (exit 1 if a step's records do not validate)")
    add_url(p)
    p.add_argument(
        "--memory-dir", metavar="D",
        help="also this node's memory tier: the memory_dir the job used, or 'default' (its default one)",
    )  # fmt: skip
    p.add_argument("--local-dir", metavar="D", help="also the local tier (the job's local_dir)")
    p.add_argument("--json", action="store_true")
    p.set_defaults(fn=_ls)
    p = sub.add_parser("verify", help="check every checksum of committed steps (exit 1 if one is corrupt)")
    add_url(p)
    p.add_argument("--step", type=int)
    p.add_argument("--json", action="store_true")
    p.set_defaults(fn=_verify)
    p = sub.add_parser("inspect", help="the saved tree of a step; with --tensor, one tensor's statistics")
    add_url(p)
    p.add_argument("--step", type=int, help="default: the newest committed step")
    p.add_argument("--rank", type=int, default=0, help="whose shard (default 0)")
    p.add_argument("--tensor", metavar="KEY", help="min, max, mean, norm, NaN/inf counts of this tensor")
    p.add_argument("--json", action="store_true")
    p.set_defaults(fn=_inspect)
    p = sub.add_parser(
        "restore",
        help="export a step, consolidated: --out X.pt, X.safetensors, or a directory (Hugging Face layout)",
        description="A committed step, every rank's DTensor shards put together, every chunk verified, "
        "written by the suffix of --out: .pt (torch.load(weights_only=True) reads it), .safetensors, or "
        "a directory: sharded safetensors plus model.safetensors.index.json.  Memory: one tensor.",
    )
    add_url(p)
    p.add_argument("--step", type=int, help="default: the newest committed step")
    p.add_argument("--out", required=True)
    p.add_argument("--only", metavar="KEY", help="the subtree under KEY (e.g. model), its prefix removed")
    p.add_argument("--dtype", choices=["bf16", "fp16", "fp32"], help="cast floating tensors")
    p.add_argument("--max-shard-size", default="5GB", help="directory output: the most per file (5GB)")
    p.set_defaults(fn=_restore)
    p = sub.add_parser(
        "diff",
        help="compare two steps (URL[@STEP] URL[@STEP]); exit 1 if they differ",
        description="Keys only on one side, dtype and shape changes, values that changed, and for "
        "tensors that differ the largest absolute and relative error.  Tensors whose chunks have "
        "the same checksums on both sides are equal without being read.  Default: bitwise.",
    )
    add_url(p, "a", "b")
    p.add_argument("--atol", type=float, default=0.0)
    p.add_argument("--rtol", type=float, default=0.0)
    p.add_argument("--json", action="store_true")
    p.set_defaults(fn=_diff)


def _plan_command(sub: Any) -> None:
    p = sub.add_parser(
        "plan",
        help="the checkpoint interval that maximises goodput, from measured costs",
        description="Young's and Daly's optimum, and the every/persist_every that minimise the "
        "expected waste (checkpoint cost, rework and restarts) over process crashes, node losses "
        "and whole-job losses; see flashckpt/cli/plan.py for the model.",
    )
    p.add_argument("--stats", help="a JSON of Checkpointer.stats (blocking_s, persist_s, restored)")
    p.add_argument("--step", type=float, help="seconds per training step")
    p.add_argument("--blocking", type=float, help="seconds a save blocks training")
    p.add_argument("--persist", type=float, help="seconds to persist a snapshot to storage")
    p.add_argument("--restore", help="restart + restore seconds per tier: memory=S,mirror=S,storage=S")
    p.add_argument("--mtbf", type=float, help="the job's mean time between failures, hours")
    p.add_argument(
        "--failures", default="crash=0.75,node=0.2,job=0.05",
        help="shares of failure classes (crash: memory survives; node: a mirror or storage; job: storage)",
    )  # fmt: skip
    p.add_argument("--mirrors", action="store_true", help="a peer's memory holds a copy (mirror=1)")
    p.add_argument("--every", type=int, help="the current every, to compare")
    p.add_argument("--persist-every", type=int, default=1, help="the current persist_every")
    p.add_argument("--json", action="store_true")
    p.set_defaults(fn=_plan)


def main(argv: Sequence[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)  # usage errors: a usage line and exit 2, from argparse
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING)
    try:
        return int(args.fn(args))
    except KeyboardInterrupt:
        warn("interrupted")
        return 130
    except BrokenPipeError:  # the reader of stdout went away (`flashckpt ls ... | head`)
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no error at exit's flush
        return FAILED
    except (FlashCkptError, ValueError, OSError) as exc:
        warn(exc)
        return USAGE
    except Exception as exc:  # no traceback, whatever happened  # noqa: BLE001
        warn(f"{type(exc).__name__}: {exc}")
        return USAGE


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
