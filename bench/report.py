"""The report of ``python -m bench``: one Markdown page, the targets, and the plots.

``render(results, out)`` takes what ``bench/__main__.py`` gathered (``latest.json``) and returns
the Markdown; the PNG plots go to ``out`` (skipped, and said so, without matplotlib).  Every
ratio is computed here from figures measured in the same run.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

MiB = 1 << 20
GiB = 1 << 30


def _core(res: dict[str, Any], g: float) -> dict[str, Any]:
    c = res.get(f"core/{g:g}") or {}
    rs = c.get("results") or []
    return dict(rs[0]) if rs else {}


def _sec(x: Any) -> str:
    return "—" if not isinstance(x, (int, float)) or math.isnan(x) else f"{x:.3f} s"


def _ratio(a: Any, b: Any) -> float | None:
    if isinstance(a, (int, float)) and isinstance(b, (int, float)) and b > 0 and not math.isnan(a):
        return float(a) / float(b)
    return None


def _x(r: float | None) -> str:
    return "—" if r is None else f"{r:.2f}x"


def _failed(res: dict[str, Any], key: str) -> str | None:
    v = res.get(key)
    if isinstance(v, dict) and "failed" in v:
        return f"{key}: failed ({v['failed']}; log {v.get('log')})"
    return None


#: (figure, target, how it is measured: fn(results, size) -> (measured ratio, detail), direction)
Target = tuple[str, str, "Measure", str, float]


Measure = Callable[[dict[str, Any], float], tuple[float | None, str]]


def _paired(key: str, base: str) -> Measure:
    """bench_core's paired ratio of ``key`` (each run over the floor taken just before it)."""

    def fn(res: dict[str, Any], g: float) -> tuple[float | None, str]:
        c = _core(res, g)
        return c.get(f"{key}_pair"), f"{_sec(c.get(key))} / {_sec(c.get(base))}"

    return fn


def _over(num: str, den: str) -> Measure:
    """``num / den`` of the same size's core figures."""

    def fn(res: dict[str, Any], g: float) -> tuple[float | None, str]:
        c = _core(res, g)
        return _ratio(c.get(num), c.get(den)), f"{_sec(c.get(num))} / {_sec(c.get(den))}"

    return fn


def _t_training(res: dict[str, Any], g: float) -> tuple[float | None, str]:
    t = res.get("training") or {}
    ratio = _ratio(t.get("flashckpt"), t.get("none"))
    return ratio, f"{t.get('flashckpt', 0):.2f} / {t.get('none', 0):.2f} steps/s (durable every 10th)"


def _t_training_durable(res: dict[str, Any], g: float) -> tuple[float | None, str]:
    t = res.get("training") or {}
    return _ratio(t.get("flashckpt_durable"), t.get("none")), f"{t.get('flashckpt_durable', 0):.2f} steps/s"


def _t_memory(res: dict[str, Any], g: float) -> tuple[float | None, str]:
    m = (res.get(f"memory/{g:g}") or {}).get("flashckpt") or {}
    r = m.get("ratio")
    return r, "" if r is None else f"{m.get('extra_bytes', 0) / GiB:.2f} GiB"


TARGETS: list[Target] = [
    (
        "save blocking / copy floor, steady state (paired)",
        "<= 1.2",
        _paired("blocking_steady", "floor"),
        "le",
        1.2,
    ),
    (
        "first save after `restore()` / copy floor",
        "<= 2",
        _paired("blocking_cold", "floor_steady"),
        "le",
        2.0,
    ),
    (
        "`torch.save` + fsync / flashckpt blocking",
        ">= 10",
        _over("torch_save", "blocking_steady"),
        "ge",
        10.0,
    ),
    (
        "DCP `async_save` blocking / flashckpt blocking",
        ">= 1.3",
        _over("dcp_async_blocking", "blocking_steady"),
        "ge",
        1.3,
    ),
    (
        "DCP `async_save` until durable / flashckpt until durable on local",
        ">= 3",
        _over("dcp_async_durable", "durable_local"),
        "ge",
        3.0,
    ),
    (
        "durable on local / fastest raw write (paired)",
        "<= 1.3",
        _paired("so_durable", "so_raw_paired"),
        "le",
        1.3,
    ),
    ("restore from memory / copy floor (paired)", "<= 1.5", _paired("restore_memory", "floor"), "le", 1.5),
    (
        "DCP `load` (page cache warm) / flashckpt restore from memory",
        ">= 4",
        _over("dcp_load_warm", "restore_memory"),
        "ge",
        4.0,
    ),
    ("training throughput, a save every step / none", ">= 0.9", _t_training, "ge", 0.9),
    ("the same, every save made durable (shown too)", ">= 0.9", _t_training_durable, "ge", 0.9),
    ("peak extra host memory during save / state size", "<= 2.2", _t_memory, "le", 2.2),
]


def _ms(x: Any) -> str:
    return "—" if not isinstance(x, (int, float)) or math.isnan(x) else f"{x * 1000:.0f} ms"


def _extra(key: str, base: str, what: str) -> Callable[[dict[str, Any], float], str]:
    """Why a ratio over ``base`` was missed: the milliseconds ``key`` spends above it."""

    def fn(res: dict[str, Any], g: float) -> str:
        c = _core(res, g)
        a, b = c.get(key), c.get(base)
        gap = a - b if isinstance(a, (int, float)) and isinstance(b, (int, float)) else None
        return f"{_ms(gap)} above {_ms(b)}: {what}"

    return fn


def _why_cold(res: dict[str, Any], g: float) -> str:
    c = _core(res, g)
    done, step, touch = c.get("prefault_done_after_s"), c.get("training_step") or {}, c.get("first_touch")
    per_gib = _ratio(touch, g)
    rate = "—" if per_gib is None else f"{per_gib:.2f} s per GiB"
    when = "had not finished" if done is None else f"finished {done:.2f} s"
    return (
        f"the prefault of both slots (off the training thread) {when} into the {step.get('wall', 0):.1f} s "
        f"step, so the save faulted the rest of its slot in: first touch of fresh shared memory "
        f"costs {rate} on this machine (measured in the same run)"
    )


def _why_over(num: str, den: str, what: str) -> Callable[[dict[str, Any], float], str]:
    def fn(res: dict[str, Any], g: float) -> str:
        c = _core(res, g)
        return f"{_ms(c.get(num))} against {_ms(c.get(den))}: {what}"

    return fn


def _why_blocking(res: dict[str, Any], g: float) -> str:
    c = _core(res, g)
    runs = [r for r in (c.get("steady") or []) + (c.get("so_steady") or []) if r.get("floor_before")]
    ratios = ", ".join(f"{r['blocking'] / r['floor_before']:.2f}x" for r in runs)
    return (
        f"each steady save against the copy floor measured just before it: {ratios} (the median is "
        f"judged; {_ms(c.get('blocking_steady', 0) - c.get('floor', 0))} above the floor)"
    )


def _why_durable(res: dict[str, Any], g: float) -> str:
    c = _core(res, g)
    so = c.get("so_steady") or []
    if not so:
        return ""
    mid = sorted(so, key=lambda r: r["durable_all"])[len(so) // 2]
    hashed, written = mid["persist_s"].get("memory", 0.0), mid["persist_s"].get("storage", 0.0)
    rest = mid["durable_all"] - hashed - written
    return (
        f"of {_ms(mid['durable_all'])}: checksums {_ms(hashed)}, the write {_ms(written)} (the raw write "
        f"just before: {_ms(mid.get('raw_before'))}), the rest {_ms(rest)} (manifest, commit record, "
        "fsyncs of files and directories)"
    )


def _why_training(res: dict[str, Any], g: float) -> str:
    return "persisting every step takes its CPU time (checksums, writes) from the training's 2 cores"


#: For a missed target, why, from the same run's figures: ``fn(results, size) -> str``.
WHY: dict[str, Callable[[dict[str, Any], float], str]] = {
    "save blocking / copy floor, steady state (paired)": _why_blocking,
    "first save after `restore()` / copy floor": _why_cold,
    "DCP `async_save` until durable / flashckpt until durable on local": _why_over(
        "dcp_async_durable",
        "durable_local",
        "at this size both are mostly fixed costs (fsyncs of files, directories and records)",
    ),
    "durable on local / fastest raw write (paired)": _why_durable,
    "restore from memory / copy floor (paired)": _extra(
        "restore_memory", "floor", "every byte is checksummed (xxh3) as it is copied, on the same 2 cores"
    ),
    "DCP `load` (page cache warm) / flashckpt restore from memory": _why_over(
        "dcp_load_warm",
        "restore_memory",
        "at this size flashckpt's restore is mostly its checksum and fixed costs",
    ),
    "training throughput, a save every step / none": _why_training,
    "the same, every save made durable (shown too)": _why_training,
}


def targets(res: dict[str, Any]) -> list[dict[str, Any]]:
    """Every target at every size (training: once): measured ratio, met or not, and for a
    missed one why (:data:`WHY`)."""
    rows = []
    for name, want, fn, how, limit in TARGETS:
        once = fn in (_t_training, _t_training_durable)
        sizes = [res["sizes"][0]] if once else res["sizes"]
        for g in sizes:
            r, detail = fn(res, g)
            met = None if r is None else (r <= limit if how == "le" else r >= limit)
            label = "all" if once else f"{g:g} GiB"
            why = WHY[name](res, g) if met is False and name in WHY else ""
            rows.append(
                {
                    "figure": name,
                    "target": want,
                    "size": label,
                    "ratio": r,
                    "detail": detail,
                    "met": met,
                    "why": why,
                }
            )
    return rows


def _table(head: list[str], rows: list[list[str]]) -> str:
    out = ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    out += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(out)


def _figure_rows(
    cs: list[dict[str, Any]], figures: list[tuple[str, list[dict[str, Any]], str]]
) -> list[list[str]]:
    """One table row per ``(label, per-size results, key)``: each size's seconds and its ratio
    to that size's copy floor (``cs``: the core results, one per size)."""

    def cell(v: Any, c: dict[str, Any]) -> str:
        return f"{_sec(v)} ({_x(_ratio(v, c.get('floor')))})"

    return [[label, *(cell(src[i].get(key), c) for i, c in enumerate(cs))] for label, src, key in figures]


def _save_rows(res: dict[str, Any]) -> list[list[str]]:
    sizes = res["sizes"]
    cs = [_core(res, g) for g in sizes]
    tcs = [res.get(f"tc/{g:g}") or {} for g in sizes]

    figures = [
        ("copy into a preallocated buffer (the floor)", cs, "floor"),
        ("fastest raw write + fsync", cs, "raw_fastest"),
        ("**flashckpt save, blocking (steady)**", cs, "blocking_steady"),
        ("flashckpt first save after `restore()`", cs, "blocking_cold"),
        ("flashckpt until durable on local (local + storage tiers)", cs, "durable_local"),
        ("flashckpt until durable on both tiers", cs, "durable_all"),
        ("flashckpt until durable, one disk tier", cs, "so_durable"),
        ("`torch.save` + fsync", cs, "torch_save"),
        ("DCP `save`", cs, "dcp_save"),
        ("DCP `async_save`, blocking", cs, "dcp_async_blocking"),
        ("DCP `async_save`, until durable", cs, "dcp_async_durable"),
        ("`torch_checkpointing` async save, blocking (staged)", tcs, "save_blocking"),
        ("`torch_checkpointing` async save, until written (no fsync)", tcs, "save_durable"),
    ]
    return _figure_rows(cs, figures)


def _restore_rows(res: dict[str, Any]) -> list[list[str]]:
    sizes = res["sizes"]
    cs = [_core(res, g) for g in sizes]
    rd = [res.get(f"read/{g:g}") or {} for g in sizes]
    mr = [res.get(f"mirror/{g:g}") or {} for g in sizes]

    figures = [
        ("copy into a preallocated buffer (the floor)", cs, "floor"),
        ("fastest raw read (O_DIRECT; cold buffered or mmap)", rd, "raw_read_fastest"),
        ("raw loopback socket copy", mr, "raw_socket"),
        ("first touch of as much fresh shared memory (this VM's limit)", cs, "first_touch"),
        ("**flashckpt restore from memory**", cs, "restore_memory"),
        ("flashckpt restore from a peer's mirror (fresh process, lost node)", mr, "restore_mirror"),
        ("flashckpt restore from local disk, cold", cs, "restore_disk_cold"),
        ("flashckpt restore from local disk, warm", cs, "restore_disk_warm"),
        ("`torch.load`, cold", cs, "torch_load_cold"),
        ("`torch.load(mmap=True)` + copy into the state", rd, "torch_load_mmap"),
        ("DCP `load`, cold", cs, "dcp_load_cold"),
        ("DCP `load`, warm", cs, "dcp_load_warm"),
    ]
    return _figure_rows(cs, figures)


def render(res: dict[str, Any], out: Path) -> str:
    m = res["machine"]
    sizes = res["sizes"]
    heads = [f"{g:g} GiB" for g in sizes]
    lines = [
        "# flashckpt benchmarks",
        "",
        f"`python -m bench{' --quick' if res.get('quick') else ''}` on {m['date']}, git {m['git']}: "
        f"{m['cores']} cores ({m['cpu']}), {m['memory_gib']} GiB RAM, Linux {m['kernel']}; "
        + ", ".join(f"{k} {v}" for k, v in m["versions"].items())
        + f". {res['seconds']:.0f} s in all.",
        "",
        *(
            [
                f"Sections {', '.join(res['rerun']['sections'])} were measured again at that date; the "
                f"others come from earlier runs ({', '.join(res['rerun']['earlier'])}; each section's "
                "date is in latest.json), their ratios to the copy floor from the newest core run.",
                "",
            ]
            if res.get("rerun")
            else []
        ),
        "States: transformer-shaped, bf16 weights with fp32 master weights and Adam moments (14 bytes per "
        "parameter), random values changed between saves. Every ratio is against a figure measured in "
        "the same run; *paired* ratios divide each measurement by the floor measured just before it.",
        "",
        "## Targets",
        "",
    ]
    rows = targets(res)
    lines.append(
        _table(
            ["figure", "target", "size", "measured", "from", "met", "why missed"],
            [
                [
                    r["figure"],
                    r["target"],
                    r["size"],
                    _x(r["ratio"]),
                    r["detail"],
                    "—" if r["met"] is None else ("yes" if r["met"] else "**no**"),
                    r["why"],
                ]
                for r in rows
            ],
        )
    )
    missed = [r for r in rows if r["met"] is False]
    unknown = [r for r in rows if r["met"] is None]
    summary = f"{sum(r['met'] is True for r in rows)} of {len(rows)} met, {len(missed)} missed"
    summary += f", {len(unknown)} not measured (see the notes)." if unknown else "."
    lines += ["", summary]
    lines += ["", "## Save", "", "Seconds (x the copy floor of the same size).", ""]
    lines.append(_table(["", *heads], _save_rows(res)))
    lines += ["", "## Restore", "", "Seconds (x the copy floor of the same size).", ""]
    lines.append(_table(["", *heads], _restore_rows(res)))
    lines += ["", "## Host memory during a save", ""]
    mem_rows = []
    methods = [
        ("flashckpt", "flashckpt (3 saves, double buffer)"),
        ("torch_save", "`torch.save` + fsync"),
        ("dcp_async_save", "DCP `async_save`"),
    ]
    for method, label in methods:
        cells = []
        for g in sizes:
            v = ((res.get(f"memory/{g:g}") or {}).get(method)) or {}
            cells.append("—" if "ratio" not in v else f"{v['ratio']:.2f}x ({v['extra_bytes'] / GiB:.2f} GiB)")
        mem_rows.append([label, *cells])
    lines += ["Peak resident memory of the saving process above what it held before, x the state's size.", ""]
    lines.append(_table(["", *heads], mem_rows))
    t = res.get("training") or {}
    if "none" in t:
        lines += ["", "## Training throughput", ""]
        lines.append(
            f"A GPT-style model ({t.get('model_bytes', 0) / MiB:.0f} MiB of weights, AdamW: about "
            f"three times that in state) trained on CPU for {t.get('steps')} steps; median of the runs."
        )
        lines.append("")
        trows = [
            [label, f"{t[k]:.2f}", _x(_ratio(t[k], t["none"]))]
            for k, label in (
                ("none", "no checkpoint"),
                ("flashckpt", "flashckpt every step (durable every 10th, as `torch.save`'s)"),
                ("flashckpt_durable", "flashckpt every step, each one made durable (as DCP's)"),
                ("torch_save", "`torch.save` + fsync every 10 steps"),
                ("dcp_async_save", "DCP `async_save` every step"),
            )
            if k in t
        ]
        lines.append(_table(["", "steps/s", "x none"], trows))
    z = res.get("compression") or {}
    lines += ["", "## Compression on trained weights", ""]
    if z.get("installed"):
        lines.append(
            f"{z['source']} ({z['bytes'] / MiB:.1f} MiB, {z['tensors']} fp32 tensors) saved to a disk tier: "
            f"zstd stores {z['zstd']['ratio']:.3f} of the raw bytes "
            f"({_sec(z['zstd']['durable_s'])} to durable, {_sec(z['none']['durable_s'])} without "
            "compression); restored bitwise: "
            f"{z['zstd']['bitwise'] and z['none']['bitwise']}."
        )
    else:
        lines.append(str(z.get("why") or z.get("failed") or "not measured"))
    s3 = res.get("s3") or {}
    if "median" in s3:
        md = s3["median"]
        nb = s3["bytes"]
        lines += ["", f"## S3 (moto on loopback, {nb / MiB:.0f} MiB)", ""]
        srows = []
        for k in sorted(md):
            srows.append([k, _sec(md[k]), f"{nb / md[k] / 1e9:.2f}"])
        lines.append(_table(["", "seconds", "GB/s"], srows))
    tc = [res.get(f"tc/{g:g}") or {} for g in sizes]
    notes = [
        f"`torch_checkpointing`: {x.get('why') or x.get('error') or x.get('note')}"
        for x in tc[:1]
        if x.get("why") or x.get("error") or x.get("note")
    ]
    notes += [f for k in res if (f := _failed(res, k))]
    dist = res.get("dist") or {}
    if "ranks" in dist:
        rk = dist["ranks"]
        worst = {
            k: max(r[k] for r in rk) for k in ("blocking", "durable", "restore_memory", "restore_storage")
        }
        lines += ["", "## Multi-rank (4 ranks, 256 MiB each, slowest rank)", ""]
        lines.append(
            _table(
                ["", "seconds", "x one process's copy floor"],
                [
                    [k.replace("_", " "), _sec(v), _x(_ratio(v, dist.get("single_floor")))]
                    for k, v in worst.items()
                ]
                + [
                    [f"after losing a node: from {x['tier']}", _sec(x["seconds"]), ""]
                    for x in dist.get("lost", [])[:4]
                ],
            )
        )
    mirrors = res.get("mirrors") or {}
    if "push" in mirrors:
        mib = mirrors.get("bytes", 0) / MiB
        off = mirrors.get("step_mirror_off_s")
        lines += ["", f"## Peer mirrors (bench_mirror, {mib:.0f} MiB per rank, 2 ranks)", ""]
        lines.append(
            _table(
                ["", "seconds", "x"],
                [
                    ["raw loopback socket copy of these bytes", _sec(mirrors.get("raw_socket_s")), "1.00x"],
                    [
                        "push of a snapshot to the peer's memory (x the socket copy just before)",
                        _sec(mirrors.get("push_s")),
                        _x(mirrors.get("push_x_socket_paired")),
                    ],
                    ["training step, mirrors off", _sec(off), "1.00x"],
                    [
                        "training step, mirrors on (a push behind every save)",
                        _sec(mirrors.get("step_mirror_on_s")),
                        _x(_ratio(mirrors.get("step_mirror_on_s"), off)),
                    ],
                    [
                        "training step, mirrors on with the bandwidth capped",
                        _sec(mirrors.get("step_mirror_capped_s")),
                        _x(_ratio(mirrors.get("step_mirror_capped_s"), off)),
                    ],
                ],
            )
        )
        lines += ["", f"Snapshots mirrored: {mirrors.get('mirrored', '—')}."]
    plots = draw(res, out)
    if plots:
        lines += ["", "## Plots", ""] + [f"![{p.stem}]({p.name})" for p in plots]
    else:
        notes.append("plots not drawn: matplotlib is not installed (`bash bench/setup`)")
    if notes:
        lines += ["", "## Notes", ""] + [f"- {n}" for n in notes]
    return "\n".join(lines) + "\n"


def draw(res: dict[str, Any], out: Path) -> list[Path]:
    """``save.png``, ``restore.png``, ``training.png`` in ``out``; [] without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return []
    sizes = res["sizes"]
    made = []

    def bars(name: str, title: str, series: list[tuple[str, Callable[[float], Any]]]) -> None:
        fig, ax = plt.subplots(figsize=(10, 4.8))
        width = 0.8 / len(series)
        blues = iter(["#1f4e9c", "#3f7fd0", "#8fb8ea"])
        others = iter(["#d62728", "#ff7f0e", "#8c564b", "#9467bd"])
        for j, (label, get) in enumerate(series):
            ys = [get(g) for g in sizes]
            xs = [i + (j - (len(series) - 1) / 2) * width for i in range(len(sizes))]
            ours = label.startswith("flashckpt")
            color = "#aaaaaa" if "floor" in label else next(blues) if ours else next(others)
            ax.bar(xs, [y if isinstance(y, (int, float)) else 0 for y in ys], width, label=label, color=color)
        ax.set_xticks(range(len(sizes)), [f"{g:g} GiB" for g in sizes])
        ax.set_yscale("log")
        ax.set_ylabel("seconds (log scale)")
        ax.set_title(title)
        ax.legend(fontsize=8, ncol=2)
        fig.tight_layout()
        path = out / f"{name}.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        made.append(path)

    def core(key: str) -> Callable[[float], Any]:
        return lambda g: _core(res, g).get(key)

    bars(
        "save",
        "Save: time the training loop is blocked, and until durable",
        [
            ("copy floor", core("floor")),
            ("flashckpt blocking", core("blocking_steady")),
            ("DCP async_save blocking", core("dcp_async_blocking")),
            ("torch_checkpointing blocking", lambda g: (res.get(f"tc/{g:g}") or {}).get("save_blocking")),
            ("torch.save + fsync", core("torch_save")),
            ("flashckpt until durable (local)", core("durable_local")),
            ("DCP async_save until durable", core("dcp_async_durable")),
        ],
    )
    bars(
        "restore",
        "Restore into an existing state",
        [
            ("copy floor", core("floor")),
            ("flashckpt from memory", core("restore_memory")),
            (
                "flashckpt from a peer mirror",
                lambda g: (res.get(f"mirror/{g:g}") or {}).get("restore_mirror"),
            ),
            ("flashckpt from local disk (cold)", core("restore_disk_cold")),
            ("torch.load mmap + copy", lambda g: (res.get(f"read/{g:g}") or {}).get("torch_load_mmap")),
            ("DCP load (cold)", core("dcp_load_cold")),
        ],
    )
    t = res.get("training") or {}
    if "none" in t:
        fig, ax = plt.subplots(figsize=(7, 3.2))
        kinds = ("none", "flashckpt", "flashckpt_durable", "torch_save", "dcp_async_save")
        keys = [k for k in kinds if k in t]
        labels = {
            "none": "no checkpoint",
            "flashckpt": "flashckpt every step (durable every 10th)",
            "flashckpt_durable": "flashckpt every step, each durable",
            "torch_save": "torch.save every 10",
            "dcp_async_save": "DCP async_save every step",
        }
        ax.barh(
            [labels[k] for k in keys],
            [t[k] for k in keys],
            color=["#1f77b4" if k.startswith("flashckpt") else "#999999" for k in keys],
        )
        ax.invert_yaxis()
        ax.set_xlabel("training steps per second (higher is better)")
        ax.set_title("Training throughput with checkpoints (CPU)")
        fig.tight_layout()
        path = out / "training.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        made.append(path)
    return made
