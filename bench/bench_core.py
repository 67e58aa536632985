"""Core benchmark: what a flashckpt save / restore costs next to a memory copy and a raw disk write.

One run measures, for each state size (transformer-shaped tensors; bf16 weights + fp32
optimizer-like tensors by default):

* the floor: ``dst.copy_(src)`` into preallocated, already-touched buffers (default torch threads);
* the fastest raw write of the same bytes: buffered + fsync, and O_DIRECT (4 MiB writes from a
  page-aligned buffer) with one and two threads;
* ``torch.save`` + fsync and ``torch.load`` (cold, if the page cache can be dropped, and warm);
* DCP ``save``, ``async_save`` (blocking, and until durable) and ``load`` into a preallocated state;
* flashckpt: the first (cold) save after ``restore()`` and a simulated training step, steady-state
  save blocking time, time until durable on the local tier and on both tiers, a storage-only
  configuration (one disk tier), restore from memory, restore from disk.

The machines this runs on are shared and small (2 cores): another process's load, and the
memory state (8 GiB of mapped slots make every copy slower here), show up in every copy time.
So the ratios that the targets are judged on are *paired*: each steady-state save and each
restore from memory is measured right after a floor copy of the same bytes (the cold save is
judged against the median of those floors), each storage-only save right after the fastest raw
write, and the median of the per-pair ratios is reported next to the ratio to the phase median.
The CPU used by other processes during each phase is reported; ``--wait-quiet`` waits for an
idle machine before each size.  The cold save is measured honestly: ``restore()`` starts the
prefault, then a training step of ``--step-s`` seconds runs (a sleep, or ``--train-step compute``),
and the save follows; how long the training thread was stalled during that step is reported.

Run::

    .venv/bin/python -m bench.bench_core --sizes 0.25                      # quick
    .venv/bin/python -m bench.bench_core --sizes 1,4 --markdown --json bench/results/core.json

Everything it creates (disk directories, ``/dev/shm`` directories) is removed at the end, also
on error.  A few library internals are wrapped with timers (``--no-profile`` to switch off) to
say where the time goes; they are read, never changed.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import glob
import json
import math
import mmap
import os
import platform
import shutil
import statistics
import sys
import tempfile
import threading
import time
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch

import flashckpt
from flashckpt import _hooks as hooks
from flashckpt.staging import stager as _staging
from flashckpt.testing import parts

GiB = 1 << 30
MiB = 1 << 20
ALIGN = 4096
REPO = Path(__file__).resolve().parent.parent

# Targets from the issue: result key -> (what it is divided by, largest ratio that passes).
TARGETS = {
    "blocking_steady": ("floor", 1.2),
    "blocking_cold": ("floor", 2.0),
    "so_durable": ("raw", 1.3),
    "restore_memory": ("floor", 1.5),
}


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def median(xs: list[float]) -> float:
    return statistics.median(xs) if xs else math.nan


# --------------------------------------------------------------------------------------------
# the state


def _plan_shape(total_bytes: int, bytes_per_param: int) -> tuple[int, int, int]:
    """(hidden, layers, vocab) so that the state is ``total_bytes`` within one embedding row."""
    params = total_bytes // bytes_per_param
    for h in (4096, 3072, 2048, 1536, 1024, 768, 512, 384, 256, 128):
        per_layer = 12 * h * h + 2 * h
        layers = min(48, (params - 16384 * h) // per_layer)
        if layers >= 4:
            return h, layers, (params - layers * per_layer) // h
    raise SystemExit(f"a state of {total_bytes} bytes is too small for this benchmark")


def build_state(total_bytes: int, mode: str, seed: int = 0) -> tuple[dict[str, Any], dict[str, Any]]:
    """A transformer-shaped training state of about ``total_bytes``.

    Per layer: qkv [3h, h], proj [h, h], mlp up [4h, h], mlp down [h, 4h], two norms [h]; plus
    an embedding [vocab, h] sized to reach ``total_bytes``.  ``fp32`` / ``bf16``: weights only.
    ``mixed``: bf16 weights plus fp32 master weights, ``exp_avg`` and ``exp_avg_sq`` per
    parameter (mixed-precision Adam: 14 bytes per parameter, 6/7 of them fp32).
    """
    wdtype = torch.float32 if mode == "fp32" else torch.bfloat16
    bpp = {"fp32": 4, "bf16": 2, "mixed": 14}[mode]
    h, layers, vocab = _plan_shape(total_bytes, bpp)
    shapes: dict[str, tuple[int, ...]] = {"embed.weight": (vocab, h)}
    for i in range(layers):
        p = f"layers.{i}."
        shapes[p + "attn_norm.weight"] = (h,)
        shapes[p + "attn.qkv.weight"] = (3 * h, h)
        shapes[p + "attn.proj.weight"] = (h, h)
        shapes[p + "mlp_norm.weight"] = (h,)
        shapes[p + "mlp.up.weight"] = (4 * h, h)
        shapes[p + "mlp.down.weight"] = (h, 4 * h)
    shapes["final_norm.weight"] = (h,)
    g = torch.Generator().manual_seed(seed)
    model: dict[str, torch.Tensor] = {}
    optim_state: dict[str, dict[str, torch.Tensor]] = {}
    for name, shape in shapes.items():
        w32 = torch.ones(shape) if len(shape) == 1 else torch.empty(shape).normal_(0.0, 0.02, generator=g)
        model[name] = w32 if wdtype == torch.float32 else w32.to(wdtype)
        if mode == "mixed":
            optim_state[name] = {
                "master": w32,
                "exp_avg": torch.empty(shape).normal_(0.0, 1e-3, generator=g),
                "exp_avg_sq": torch.empty(shape).uniform_(0.0, 1e-6, generator=g),
            }
    state: dict[str, Any] = {"model": model, "step": 1000}
    if mode == "mixed":
        state["optim"] = {
            "state": optim_state,
            "param_groups": [{"lr": 3e-4, "betas": [0.9, 0.95], "weight_decay": 0.1, "params": list(shapes)}],
        }
    tensors = list(iter_tensors(state))
    info = {
        "hidden": h,
        "layers": layers,
        "vocab": vocab,
        "tensors": len(tensors),
        "bytes": sum(t.nbytes for t in tensors),
        "dtype": mode,
    }
    return state, info


def iter_tensors(obj: Any) -> Iterator[torch.Tensor]:
    if isinstance(obj, torch.Tensor):
        yield obj
    elif isinstance(obj, dict):
        for v in obj.values():
            yield from iter_tensors(v)
    elif isinstance(obj, list):
        for v in obj:
            yield from iter_tensors(v)


def _rebuild(obj: Any, it: Iterator[torch.Tensor]) -> Any:
    if isinstance(obj, torch.Tensor):
        return next(it)
    if isinstance(obj, dict):
        return {k: _rebuild(v, it) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_rebuild(v, it) for v in obj]
    return obj


def same(a: Any, b: Any) -> bool:
    ta, tb = list(iter_tensors(a)), list(iter_tensors(b))
    return len(ta) == len(tb) and all(torch.equal(x, y) for x, y in zip(ta, tb, strict=True))


def tensor_bytes(t: torch.Tensor) -> memoryview:
    return memoryview(t.reshape(-1).view(torch.uint8).numpy())


class Mirror:
    """A preallocated copy of the state in one page-aligned anonymous mapping.

    Laid out like a flashckpt slot (large tensors page-aligned, small ones packed), so that
    ``view`` holds the same bytes flashckpt writes.  Serves as the floor's destination, the
    source of the raw O_DIRECT writes and the preallocated target of every restore / load.
    """

    def __init__(self, state: dict[str, Any]) -> None:
        src = list(iter_tensors(state))
        layout = _staging.plan_layout(src, flashckpt.Options())
        self.nbytes = (layout.total_bytes + ALIGN - 1) // ALIGN * ALIGN
        self.padding = self.nbytes - sum(t.nbytes for t in src)
        self.chunks = layout.chunks
        self._mm = mmap.mmap(-1, self.nbytes)
        buf = torch.frombuffer(self._mm, dtype=torch.uint8)
        self.tensors = [
            buf[off : off + n].view(t.dtype).view(t.shape)
            for t, off, n in zip(src, layout.offsets, layout.nbytes, strict=True)
        ]
        del buf
        self.state = _rebuild(state, iter(self.tensors))
        self.src = src
        self.copy()  # first touch

    def copy(self) -> float:
        """The floor: copy every tensor of the state into its preallocated twin."""
        t0 = time.perf_counter()
        for d, s in zip(self.tensors, self.src, strict=True):
            d.copy_(s)
        return time.perf_counter() - t0

    def clear(self) -> None:
        for t in self.tensors:
            t.zero_()

    def view(self) -> memoryview:
        return memoryview(self._mm)

    def close(self) -> None:
        self.tensors, self.state, self.src = [], None, []
        gc.collect()
        try:
            self._mm.close()
        except BufferError:  # a view is still alive; the mapping goes with it
            log("  mirror: a view is still alive; unmapping deferred")


# --------------------------------------------------------------------------------------------
# helpers


class CpuMeter:
    """CPU used by other processes (in cores) while a phase ran: on a shared 2-core machine a
    foreign load shows up directly in every copy time."""

    HZ = os.sysconf("SC_CLK_TCK")

    @staticmethod
    def _busy() -> int:
        with open("/proc/stat") as f:
            v = [int(x) for x in f.readline().split()[1:]]
        return v[0] + v[1] + v[2] + v[5] + v[6] + (v[7] if len(v) > 7 else 0)

    @staticmethod
    def _own() -> int:
        with open("/proc/self/stat") as f:
            v = f.read().rsplit(")", 1)[1].split()
        return int(v[11]) + int(v[12])  # utime + stime of all threads

    def __init__(self) -> None:
        self.t, self.busy, self.own = time.perf_counter(), self._busy(), self._own()

    def foreign_cores(self) -> float:
        wall = time.perf_counter() - self.t
        foreign = (self._busy() - self.busy) - (self._own() - self.own)
        return round(max(0.0, foreign / self.HZ / max(wall, 1e-9)), 3)


def wait_quiet(limit_s: float, threshold: float = 0.15, window_s: float = 3.0) -> float:
    """Wait up to ``limit_s`` until other processes use less than ``threshold`` cores over
    ``window_s``; return the last foreign load seen."""
    deadline = time.monotonic() + limit_s
    said = False
    while True:
        m = CpuMeter()
        time.sleep(window_s)
        load = m.foreign_cores()
        if load < threshold:
            return load
        if time.monotonic() >= deadline:
            log(f"machine still busy ({load:.2f} cores used by other processes); measuring anyway")
            return load
        if not said:
            log(f"waiting for a quiet machine ({load:.2f} cores used by other processes)")
            said = True


def first_touch(nbytes: int) -> float:
    """Seconds to write every page of a fresh ``/dev/shm`` file of ``nbytes`` through a
    mapping: what mapping a fresh slot costs (the prefault after a restore, a restore into a
    new process's slot) before any byte of a snapshot counts; a limit of this machine."""
    with tempfile.NamedTemporaryFile(dir="/dev/shm", prefix="flashckpt-bench-touch-") as f:
        f.truncate(nbytes)
        with mmap.mmap(f.fileno(), nbytes) as mm:
            t = torch.frombuffer(mm, dtype=torch.uint8)
            t0 = time.perf_counter()
            t.fill_(1)
            secs = time.perf_counter() - t0
            del t
    return secs


def drop_caches() -> bool:
    """Write back and drop the page cache (root only).  False when not possible."""
    os.sync()
    try:
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("3\n")
        return True
    except OSError:
        return False


def quiesce() -> None:
    gc.collect()
    os.sync()


def rm(path: Path) -> None:
    shutil.rmtree(path, ignore_errors=True)
    with contextlib.suppress(FileNotFoundError, IsADirectoryError):
        path.unlink()


class Profiler:
    """Times where a save and a restore spend their time, from the engine's timed points
    (``flashckpt._hooks``: the event seam; nothing of the library is patched).  Diagnostics
    only: a point costs one dict lookup while nobody listens."""

    POINTS = (
        "slot.ensure",
        "stager.stage",
        "stager.acquire",
        "persist.hash",
        "persist.tier",
        "persist.retention",
        "restore.apply",
        "restore.inventory",
        "restore.verify",
        "restore.fetch",
        "backend.put",
        "backend.delete_prefix",
    )

    def __init__(self) -> None:
        self.events: list[tuple[str, str, float, float]] = []
        self._lock = threading.Lock()
        self._off: list[Callable[[], None]] = []

    def _record(self, *, point: str, t0: float, seconds: float, tier: str | None = None, **_: Any) -> None:
        label = point.removeprefix("time.")
        name = f"{label}.{tier}" if tier is not None else label
        with self._lock:
            self.events.append((name, threading.current_thread().name, t0, t0 + seconds))

    def install(self) -> None:
        self._off = [hooks.on(f"time.{p}", self._record) for p in self.POINTS]

    def uninstall(self) -> None:
        for off in self._off:
            off()
        self._off.clear()

    def window(self, t0: float, t1: float) -> dict[str, float]:
        """Seconds per ``label@thread`` over the calls that started in ``[t0, t1]``."""
        out: dict[str, float] = {}
        with self._lock:
            for label, thread, a, b in self.events:
                if t0 <= a <= t1:
                    who = "main" if thread == "MainThread" else thread.split("_")[0]
                    key = f"{label}@{who}"
                    out[key] = round(out.get(key, 0.0) + (b - a), 4)
        return out


# --------------------------------------------------------------------------------------------
# raw writes


def _write_all(fd: int, mv: memoryview) -> None:
    while len(mv):
        mv = mv[os.write(fd, mv) :]


def raw_buffered(path: Path, tensors: list[torch.Tensor]) -> float:
    """Each tensor's bytes, straight from the tensor, through the page cache; then fsync."""
    t0 = time.perf_counter()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        for t in tensors:
            _write_all(fd, tensor_bytes(t))
        os.fsync(fd)
    finally:
        os.close(fd)
    return time.perf_counter() - t0


def _direct_range(path: Path, mv: memoryview, file_off: int, piece: int) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_DIRECT, 0o644)
    try:
        done = 0
        while done < len(mv):
            done += os.pwrite(fd, mv[done : done + piece], file_off + done)
        os.fsync(fd)
    finally:
        os.close(fd)


def raw_direct(base: Path, mv: memoryview, threads: int, same_file: bool, piece: int = 4 * MiB) -> float:
    """O_DIRECT writes of ``mv`` (page-aligned, a multiple of 4096 long) in ``piece`` writes, split
    over ``threads`` (one file each, or disjoint ranges of one file); every file fsynced."""
    n = len(mv)
    cut = [0] + [(n * i // threads) // piece * piece for i in range(1, threads)] + [n]
    jobs = []
    for i in range(threads):
        path = base if same_file else base.with_name(f"{base.name}.{i}")
        jobs.append((path, mv[cut[i] : cut[i + 1]], cut[i] if same_file else 0, piece))
    errors: list[BaseException] = []

    def run(*job: Any) -> None:
        try:
            _direct_range(*job)
        except BaseException as exc:
            errors.append(exc)

    t0 = time.perf_counter()
    ths = [threading.Thread(target=run, args=j) for j in jobs]
    for t in ths:
        t.start()
    for t in ths:
        t.join()
    secs = time.perf_counter() - t0
    for _, part, _, _ in jobs:
        part.release()
    if errors:
        raise errors[0]
    return secs


def raw_chunks(d: Path, mirror: Mirror, threads: int = 2, piece: int = 4 * MiB) -> float:
    """flashckpt's file protocol without flashckpt (a diagnostic, not a floor): every chunk of
    the slot layout to its own file, written to a temporary name (O_DIRECT for the aligned part,
    the tail through the page cache), fsynced, renamed, directory fsynced; ``threads`` at once."""
    out = d / "raw_chunks"
    out.mkdir()
    mv = mirror.view()
    todo = list(enumerate(mirror.chunks))
    lock = threading.Lock()
    errors: list[BaseException] = []

    def one(i: int, off: int, n: int) -> None:
        tmp, final = out / f"{i}.tmp", out / f"{i}"
        aligned = n - n % ALIGN
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        try:
            if aligned:
                dfd = os.open(tmp, os.O_WRONLY | os.O_DIRECT)
                try:
                    done = 0
                    while done < aligned:
                        done += os.pwrite(dfd, mv[off + done : off + min(aligned, done + piece)], done)
                finally:
                    os.close(dfd)
            if n > aligned:
                os.pwrite(fd, mv[off + aligned : off + n], aligned)
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, final)
        dfd = os.open(out, os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)

    def worker() -> None:
        try:
            while True:
                with lock:
                    if not todo or errors:
                        return
                    i, (off, n) = todo.pop(0)
                one(i, off, n)
        except BaseException as exc:
            errors.append(exc)

    t0 = time.perf_counter()
    ths = [threading.Thread(target=worker) for _ in range(threads)]
    for t in ths:
        t.start()
    for t in ths:
        t.join()
    secs = time.perf_counter() - t0
    mv.release()
    if errors:
        raise errors[0]
    return secs


RAW_METHODS = ("raw_buffered", "raw_direct_1t", "raw_direct_2t", "raw_direct_2t_1file")
RAW_DIAGNOSTIC = ("raw_chunks_2t",)


def raw_write(method: str, d: Path, mirror: Mirror) -> float:
    """One raw write of the state's bytes with ``method``; the files are deleted afterwards."""
    quiesce()
    p = d / f"{method}.bin"
    mv = mirror.view()
    try:
        if method == "raw_buffered":
            secs = raw_buffered(p, mirror.src)
        elif method == "raw_direct_1t":
            secs = raw_direct(p, mv, 1, same_file=True)
        elif method == "raw_direct_2t":
            secs = raw_direct(p, mv, 2, same_file=False)
        elif method == "raw_direct_2t_1file":
            secs = raw_direct(p, mv, 2, same_file=True)
        else:
            secs = raw_chunks(d, mirror, 2)
    finally:
        mv.release()
        for f in d.glob(f"{method}.bin*"):
            f.unlink()
        rm(d / "raw_chunks")
    return secs


def measure_raw(d: Path, mirror: Mirror, repeats: int) -> dict[str, Any]:
    times: dict[str, list[float]] = {k: [] for k in RAW_METHODS + RAW_DIAGNOSTIC}
    for _ in range(repeats):
        for key in RAW_METHODS + RAW_DIAGNOSTIC:
            times[key].append(raw_write(key, d, mirror))
            log(f"  {key}: {times[key][-1]:.3f} s")
    out: dict[str, Any] = {k: median(v) for k, v in times.items()}
    best = min(RAW_METHODS, key=lambda k: out[k])
    out["raw_fastest"] = out[best]
    out["raw_fastest_method"] = best
    out["raw_bytes"] = mirror.nbytes
    out["raw_chunk_files"] = len(mirror.chunks)
    return out


# --------------------------------------------------------------------------------------------
# torch.save / DCP


def measure_torch(d: Path, state: dict[str, Any], can_drop: bool) -> dict[str, Any]:
    out: dict[str, Any] = {}
    p = d / "torch_save.pt"
    quiesce()
    t0 = time.perf_counter()
    with open(p, "wb") as f:
        torch.save(state, f)
        f.flush()
        os.fsync(f.fileno())
    out["torch_save"] = time.perf_counter() - t0
    log(f"  torch.save + fsync: {out['torch_save']:.3f} s")
    try:
        for kind in ("cold", "warm") if can_drop else ("warm",):
            if kind == "cold":
                drop_caches()
            gc.collect()
            t0 = time.perf_counter()
            loaded = torch.load(p, weights_only=True)
            out[f"torch_load_{kind}"] = time.perf_counter() - t0
            log(f"  torch.load ({kind}): {out[f'torch_load_{kind}']:.3f} s")
            del loaded
            gc.collect()
    finally:
        p.unlink()
    return out


def measure_dcp(d: Path, state: dict[str, Any], mirror: Mirror, can_drop: bool) -> dict[str, Any]:
    import torch.distributed.checkpoint as dcp

    warnings.filterwarnings("ignore", message=".*torch.distributed is disabled.*")
    out: dict[str, Any] = {}
    try:
        quiesce()
        t0 = time.perf_counter()
        dcp.save(state, storage_writer=dcp.FileSystemWriter(d / "dcp_sync", thread_count=2, sync_files=True))
        out["dcp_save"] = time.perf_counter() - t0
        log(f"  DCP save: {out['dcp_save']:.3f} s")
        quiesce()
        t0 = time.perf_counter()
        fut = dcp.async_save(
            state, storage_writer=dcp.FileSystemWriter(d / "dcp_async", thread_count=2, sync_files=True)
        )
        out["dcp_async_blocking"] = time.perf_counter() - t0
        getattr(fut, "upload_completion", fut).result()
        out["dcp_async_durable"] = time.perf_counter() - t0
        log(f"  DCP async_save: {out['dcp_async_blocking']:.3f} s blocking, {out['dcp_async_durable']:.3f} s")
        del fut
        rm(d / "dcp_async")
        quiesce()
        for kind in ("cold", "warm") if can_drop else ("warm",):
            mirror.clear()
            if kind == "cold":
                drop_caches()
            t0 = time.perf_counter()
            dcp.load(mirror.state, storage_reader=dcp.FileSystemReader(d / "dcp_sync"))
            out[f"dcp_load_{kind}"] = time.perf_counter() - t0
            log(f"  DCP load ({kind}): {out[f'dcp_load_{kind}']:.3f} s")
        out["dcp_load_ok"] = same(mirror.state, state)
    except Exception as exc:  # an extra baseline: report it, do not fail the run
        out["dcp_error"] = f"{type(exc).__name__}: {exc}"
        log(f"  DCP failed: {out['dcp_error']}")
    finally:
        rm(d / "dcp_sync")
        rm(d / "dcp_async")
        mirror.copy()
        gc.collect()
    return out


# --------------------------------------------------------------------------------------------
# flashckpt


def training_step(ckpt: flashckpt.Checkpointer, seconds: float, kind: str) -> dict[str, Any]:
    """Simulate a training step right after ``restore`` (``restore`` has started the prefault).

    Returns when the prefault thread had finished (seconds into the step; None if it was still
    running when the step ended), the longest the training thread went without running (a
    5 ms sleep or a small matmul should come back at once: anything longer is a stall), and
    the step's real length.  Reads ``parts(ckpt).stager._prefault_thread`` for this diagnostic only.
    """
    t0 = time.perf_counter()
    done_at: float | None = None
    a = b = None
    if kind == "compute":
        a, b = torch.randn(512, 512), torch.randn(512, 512)
    worst = 0.0
    while (now := time.perf_counter() - t0) < seconds:
        if done_at is None and not parts(ckpt).stager.prefaulting:
            done_at = now
        t1 = time.perf_counter()
        if a is not None and b is not None:
            torch.mm(a, b)
            worst = max(worst, time.perf_counter() - t1)
        else:
            time.sleep(0.005)
            worst = max(worst, time.perf_counter() - t1 - 0.005)
    return {"prefault_done_at": done_at, "max_stall": worst, "wall": time.perf_counter() - t0}


def change_every_chunk(state: Any, step: int) -> None:
    """Change one byte in every 4 KiB of every tensor of ``state`` (a cheap training step)."""
    if isinstance(state, torch.Tensor):
        if state.numel():
            state.view(-1).view(torch.uint8)[step % 4096 :: 4096].add_(1)
    elif isinstance(state, dict):
        for v in state.values():
            change_every_chunk(v, step)
    elif isinstance(state, (list, tuple)):
        for v in state:
            change_every_chunk(v, step)


def timed_save(
    ckpt: flashckpt.Checkpointer, step: int, state: dict[str, Any], prof: Profiler | None, local: bool
) -> dict[str, Any]:
    """``save``; poll the handle until the local tier is durable (if there is one); ``wait``.

    Every chunk is changed first (untimed), as a training step does: chunks are content-
    addressed, and an unchanged one would not be written again."""
    change_every_chunk(state, step)
    t0 = time.perf_counter()
    handle = ckpt.save(step, state, force=True)
    t_ret = time.perf_counter()
    assert handle is not None
    st = ckpt.stats
    r: dict[str, Any] = {
        "blocking": st["blocking_s"],
        "call": t_ret - t0,
        "slot_wait": st["slot_wait_s"],
        "cold_slot": st["cold"],
    }
    if local:
        while "local" not in handle.persist_s and not handle.done():
            time.sleep(0.0005)
        r["durable_local"] = time.perf_counter() - t0
    handle.wait()
    r["durable_all"] = time.perf_counter() - t0
    # Background work that follows durability (retention of older steps, in some versions of
    # the library) must not bleed into the next measurement: wait for it, and record how long.
    t1 = time.perf_counter()
    ckpt.wait()
    r["background_after_durable"] = time.perf_counter() - t1
    # stats["persist_s"] is folded in by a callback that runs after the handle is released:
    # record whether it was already there when wait() returned.
    r["stats_persist_s_at_wait"] = dict(ckpt.stats["persist_s"])
    r["persist_s"] = dict(handle.persist_s)
    if prof is not None:
        r["profile"] = prof.window(t0, time.perf_counter())
    return r


def measure_flashckpt(
    d: Path,
    shm: Path,
    state: dict[str, Any],
    mirror: Mirror,
    args: argparse.Namespace,
    prof: Profiler | None,
    can_drop: bool,
    raw_method: str,
) -> dict[str, Any]:
    out: dict[str, Any] = {}
    store, local = d / "store", d / "local"
    opened: list[flashckpt.Checkpointer] = []

    def new(mem: str, **kw: Any) -> flashckpt.Checkpointer:
        c = flashckpt.Checkpointer(memory_dir=shm / mem, keep=1, **kw)
        opened.append(c)
        return c

    try:
        # -- local + storage, both on the disk -----------------------------------------------
        quiesce()
        ckpt = new("mem-a", storage=store, local_dir=local)
        t0 = time.perf_counter()
        assert ckpt.restore(state) is None  # nothing saved yet: starts the prefault
        out["restore_empty_call"] = time.perf_counter() - t0
        step_info = training_step(ckpt, args.step_s, args.train_step)
        out["training_step"] = step_info
        out["prefault_done_after_s"] = step_info["prefault_done_at"]
        out["step_max_stall"] = step_info["max_stall"]
        out["step_overrun"] = step_info["wall"] - args.step_s
        cold = timed_save(ckpt, 1, state, prof, local=True)
        out["cold"] = cold
        out["blocking_cold"] = cold["blocking"]
        t0 = time.perf_counter()
        parts(ckpt).stager.join_prefault()  # diagnostic: is the prefault still running after the first save?
        out["prefault_left_after_cold"] = time.perf_counter() - t0
        out["floor_after_cold"] = mirror.copy()  # diagnostic only: the cold ratio uses the steady floors
        log(
            f"  flashckpt cold save: {cold['blocking']:.3f} s blocking ({cold['call']:.3f} s call; floor "
            f"just after {out['floor_after_cold']:.3f} s; slot mapped in save: {cold['cold_slot']}); "
            f"training step of {args.step_s} s: prefault done after {out['prefault_done_after_s']}, longest "
            f"stall {out['step_max_stall']:.3f} s, overran by {out['step_overrun']:.3f} s; prefault still "
            f"ran {out['prefault_left_after_cold']:.3f} s after the save had become durable; "
            f"durable local {cold['durable_local']:.3f} s, all {cold['durable_all']:.3f} s"
        )
        steady = []
        for i in range(args.repeats):
            quiesce()
            floor = mirror.copy()
            r = timed_save(ckpt, 2 + i, state, prof, local=True)
            r["floor_before"] = floor
            steady.append(r)
            persist = {k: round(v, 3) for k, v in r["persist_s"].items()}
            log(
                f"  flashckpt save: {r['blocking']:.3f} s blocking (floor {floor:.3f} s), "
                f"durable local {r['durable_local']:.3f} s, all {r['durable_all']:.3f} s, persist_s {persist}"
            )
        out["steady"] = steady
        out["blocking_steady_2tier"] = median([r["blocking"] for r in steady])
        out["blocking_steady_2tier_pair"] = median([r["blocking"] / r["floor_before"] for r in steady])
        out["slot_wait_steady"] = median([r["slot_wait"] for r in steady])
        out["durable_local"] = median([r["durable_local"] for r in steady])
        out["durable_all"] = median([r["durable_all"] for r in steady])
        for tier in ("memory", "local", "storage"):
            out[f"persist_{tier}"] = median([r["persist_s"].get(tier, math.nan) for r in steady])
        last_step = 1 + args.repeats

        # -- restore from memory: this checkpointer stays open, its memory tier is live --------
        times, pairs = [], []
        for _ in range(max(1, args.repeats)):
            floor = mirror.copy()
            mirror.clear()
            gc.collect()
            t0 = time.perf_counter()
            got = ckpt.restore(mirror.state)
            times.append(time.perf_counter() - t0)
            pairs.append(times[-1] / floor)
            assert got == last_step, (got, last_step)
            if prof is not None:
                out.setdefault("restore_memory_profile", []).append(prof.window(t0, time.perf_counter()))
        out["restore_memory"] = median(times)
        out["restore_memory_pair"] = median(pairs)
        out["restore_memory_ok"] = same(mirror.state, state)
        log(
            f"  flashckpt restore from memory: {out['restore_memory']:.3f} s "
            f"({out['restore_memory_pair']:.2f}x the floor just before; ok={out['restore_memory_ok']})"
        )
        ckpt.close()
        out["memory_freed_on_close"] = not (shm / "mem-a").exists()

        # -- restore from disk: a new process's view, with an empty memory tier ---------------
        for i, kind in enumerate(("cold", "warm") if can_drop else ("first", "second")):
            mirror.clear()
            gc.collect()
            if kind == "cold":
                drop_caches()
            ckpt = new(f"mem-r{i}", storage=store, local_dir=local)
            t0 = time.perf_counter()
            got = ckpt.restore(mirror.state)
            secs = time.perf_counter() - t0
            assert got == last_step, (got, last_step)
            out[f"restore_disk_{kind}"] = secs
            if prof is not None:
                out[f"restore_disk_{kind}_profile"] = prof.window(t0, time.perf_counter())
            out[f"restore_disk_{kind}_ok"] = same(mirror.state, state)
            ckpt.close()
            log(f"  flashckpt restore from disk ({kind}): {secs:.3f} s (ok={out[f'restore_disk_{kind}_ok']})")

        # -- storage only: one disk tier, paired with the fastest raw write ----------------------
        quiesce()
        ckpt = new("mem-s", storage=d / "store-only")
        assert ckpt.restore(state) is None
        t0 = time.perf_counter()
        parts(ckpt).stager.join_prefault()  # diagnostic: how long the prefault takes on its own
        out["prefault_join_s"] = time.perf_counter() - t0
        out["floor_before_joined"] = mirror.copy()
        first = timed_save(ckpt, 1, state, prof, local=False)
        out["so_first"] = first
        out["blocking_after_join"] = first["blocking"]
        log(
            f"  storage-only: prefault took {out['prefault_join_s']:.3f} s (joined), first save "
            f"{first['blocking']:.3f} s blocking (floor {out['floor_before_joined']:.3f} s), "
            f"durable {first['durable_all']:.3f} s"
        )
        so = []
        for i in range(args.repeats):
            floor = mirror.copy()
            raw = raw_write(raw_method, d, mirror)
            quiesce()
            r = timed_save(ckpt, 2 + i, state, prof, local=False)
            r["floor_before"], r["raw_before"] = floor, raw
            so.append(r)
            persist = {k: round(v, 3) for k, v in r["persist_s"].items()}
            log(
                f"  storage-only save: {r['blocking']:.3f} s blocking (floor {floor:.3f} s), durable "
                f"{r['durable_all']:.3f} s ({raw_method} just before: {raw:.3f} s), persist_s {persist}"
            )
        out["so_steady"] = so
        out["so_blocking"] = median([r["blocking"] for r in so])
        out["so_blocking_pair"] = median([r["blocking"] / r["floor_before"] for r in so])
        # Steady-state blocking: both configurations pooled (2 x repeats saves, each paired with
        # the floor copy measured just before it); the cold save is judged against the same floors.
        pooled = steady + so
        out["blocking_steady"] = median([r["blocking"] for r in pooled])
        out["blocking_steady_pair"] = median([r["blocking"] / r["floor_before"] for r in pooled])
        out["floor_steady"] = median([r["floor_before"] for r in pooled])
        out["blocking_cold_pair"] = cold["blocking"] / out["floor_steady"]
        out["so_durable"] = median([r["durable_all"] for r in so])
        out["so_durable_pair"] = median([r["durable_all"] / r["raw_before"] for r in so])
        out["so_raw_paired"] = median([r["raw_before"] for r in so])
        out["so_persist_storage"] = median([r["persist_s"].get("storage", math.nan) for r in so])
        out["so_persist_memory"] = median([r["persist_s"].get("memory", math.nan) for r in so])
        out["so_persist_pair"] = median(
            [r["persist_s"].get("storage", math.nan) / r["raw_before"] for r in so]
        )
        out["so_background_after_durable"] = median([r["background_after_durable"] for r in so])
        if prof is not None:
            out["so_retention"] = median(
                [r["profile"].get("persist.retention@flashckpt-persist", 0.0) for r in so]
            )
        ckpt.close()
    finally:
        for c in opened:
            try:
                c.close(_raise=False)
            except Exception as exc:
                log(f"  close failed: {exc}")
        gc.collect()
    return out


# --------------------------------------------------------------------------------------------
# one size


def run_size(gib: float, args: argparse.Namespace, root: Path, shm_root: Path, prof: Profiler | None) -> dict:
    res: dict[str, Any] = {"size_gib": gib}
    t0 = time.perf_counter()
    state, info = build_state(int(gib * GiB), args.dtype)
    res["state"] = info
    log(
        f"size {gib} GiB: {info['bytes'] / GiB:.3f} GiB in {info['tensors']} tensors (h={info['hidden']}, "
        f"layers={info['layers']}, vocab={info['vocab']}, {info['dtype']}), built in "
        f"{time.perf_counter() - t0:.1f} s"
    )
    d = root / f"size-{gib:g}"
    shm = shm_root / f"size-{gib:g}"
    d.mkdir(parents=True)
    shm.mkdir(parents=True)
    foreign: dict[str, float] = {}
    res["foreign_cores"] = foreign
    mirror: Mirror | None = None
    try:
        mirror = Mirror(state)
        can_drop = args.drop_caches and drop_caches()
        res["page_cache_dropped"] = can_drop
        if args.wait_quiet > 0:
            wait_quiet(args.wait_quiet)
        m = CpuMeter()
        floors = [mirror.copy() for _ in range(args.floor_repeats)]
        res["floor"] = median(floors)
        res["floor_all"] = floors
        log(f"  floor copy: {res['floor']:.3f} s (runs: {', '.join(f'{x:.3f}' for x in floors)})")
        if args.compare_1thread:
            torch.set_num_threads(1)
            try:
                res["floor_1thread"] = median([mirror.copy() for _ in range(args.floor_repeats)])
            finally:
                torch.set_num_threads(args.threads)
            log(f"  floor copy, 1 thread: {res['floor_1thread']:.3f} s")
        foreign["floor"] = m.foreign_cores()
        res["first_touch"] = first_touch(info["bytes"])
        log(f"  first touch of as much fresh shared memory: {res['first_touch']:.3f} s")
        m = CpuMeter()
        res.update(measure_raw(d, mirror, args.io_repeats))
        res["raw"] = res["raw_fastest"]
        foreign["raw"] = m.foreign_cores()
        m = CpuMeter()
        res.update(measure_torch(d, state, can_drop))
        foreign["torch"] = m.foreign_cores()
        if not args.no_dcp:
            m = CpuMeter()
            res.update(measure_dcp(d, state, mirror, can_drop))
            foreign["dcp"] = m.foreign_cores()
        if args.wait_quiet > 0:
            wait_quiet(args.wait_quiet)
        m = CpuMeter()
        fastest_direct = min((k for k in RAW_METHODS if k != "raw_buffered"), key=lambda k: res[k])
        res.update(measure_flashckpt(d, shm, state, mirror, args, prof, can_drop, fastest_direct))
        foreign["flashckpt"] = m.foreign_cores()
        log(f"  CPU used by other processes (cores, per phase): {foreign}")
    finally:
        if mirror is not None:
            mirror.close()
        del state
        gc.collect()
        rm(d)
        rm(shm)
    return res


# --------------------------------------------------------------------------------------------
# report


def _s(x: Any) -> str:
    return "—" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.3f} s"


def _vs(r: dict[str, Any], key: str, base: str, label: str) -> str:
    v, b = r.get(key), r.get(base)
    if v is None or not b:
        return _s(v)
    return f"{v:.3f} s ({v / b:.2f}x {label})"


def _target(r: dict[str, Any], key: str, label: str) -> str:
    """value, the paired ratio with PASS/MISS, and the ratio to the phase median."""
    base, limit = TARGETS[key]
    v, pair, b = r.get(key), r.get(f"{key}_pair"), r.get(base)
    if v is None:
        return "—"
    s = f"{v:.3f} s"
    if pair is not None:
        s += f" ({pair:.2f}x {label} paired, {'PASS' if pair <= limit else 'MISS'}"
        if b:
            s += f"; {v / b:.2f}x phase median"
        s += ")"
    return s


def _foreign(r: dict[str, Any]) -> str:
    f = r.get("foreign_cores") or {}
    return ", ".join(f"{k} {v:.2f}" for k, v in f.items()) or "—"


def _prefault(r: dict[str, Any]) -> str:
    v = r.get("prefault_done_after_s", "—")
    if v is None:
        return (
            f"no: still running when the step ended ({_s(r.get('prefault_left_after_cold'))} left after wait)"
        )
    return f"{v:.2f} s" if isinstance(v, float) else str(v)


def _disk(r: dict[str, Any], kind: str) -> str:
    alias = {"cold": "first", "warm": "second"}
    key = f"restore_disk_{kind}" if f"restore_disk_{kind}" in r else f"restore_disk_{alias[kind]}"
    v = r.get(key)
    if v is None:
        return "—"
    parts = [
        f"{v / r[b]:.2f}x {name}"
        for b, name in ((f"torch_load_{kind}", "torch.load"), (f"dcp_load_{kind}", "DCP load"))
        if r.get(b)
    ]
    return f"{v:.3f} s ({', '.join(parts)})" if parts else f"{v:.3f} s"


ROWS: list[tuple[str, Callable[[dict[str, Any]], str]]] = [
    ("state: GiB, tensors, h x layers", lambda r: _state(r)),
    ("CPU used by other processes (cores)", _foreign),
    ("floor: copy into preallocated buffers (median)", lambda r: _s(r.get("floor"))),
    ("floor, 1 thread", lambda r: _s(r.get("floor_1thread"))),
    ("flashckpt save blocking, steady [<= 1.2x floor]", lambda r: _target(r, "blocking_steady", "floor")),
    ("flashckpt first save blocking, cold [<= 2x floor]", lambda r: _target(r, "blocking_cold", "floor")),
    ("  floor copies next to the saves (median)", lambda r: _s(r.get("floor_steady"))),
    ("  steady blocking: local+storage / storage-only (paired)", lambda r: _per_config(r)),
    ("  prefault finished (s into the training step)", _prefault),
    ("  training thread: longest stall / step overrun", lambda r: _pair(r, "step_max_stall", "step_overrun")),
    (
        "  first save after join_prefault()",
        lambda r: _vs(r, "blocking_after_join", "floor_before_joined", "floor"),
    ),
    ("  slot_wait_s, steady", lambda r: _s(r.get("slot_wait_steady"))),
    ("flashckpt storage-only: save -> durable [<= 1.3x raw]", lambda r: _target(r, "so_durable", "raw")),
    ("  raw write just before each save (median)", lambda r: _s(r.get("so_raw_paired"))),
    ("  persist_s['storage'] (paired ratio to raw)", lambda r: _persist_pair(r)),
    ("  retention (deleting the previous step), wherever it ran", lambda r: _s(r.get("so_retention"))),
    ("  background work after durable (ckpt.wait() after handle.wait())", lambda r: _after(r)),
    ("  persist_s['memory'] (until all checksums are known)", lambda r: _s(r.get("so_persist_memory"))),
    ("flashckpt local+storage: save -> durable on local", lambda r: _vs(r, "durable_local", "raw", "raw")),
    ("flashckpt local+storage: save -> durable on both", lambda r: _vs(r, "durable_all", "raw", "raw")),
    ("  persist_s['local'] / ['storage']", lambda r: _pair(r, "persist_local", "persist_storage")),
    ("  cold save -> durable on local / both", lambda r: _cold_durable(r)),
    ("raw write: buffered + fsync", lambda r: _s(r.get("raw_buffered"))),
    ("raw write: O_DIRECT 4 MiB, 1 thread", lambda r: _s(r.get("raw_direct_1t"))),
    ("raw write: O_DIRECT 4 MiB, 2 threads, 2 files", lambda r: _s(r.get("raw_direct_2t"))),
    ("raw write: O_DIRECT 4 MiB, 2 threads, 1 file", lambda r: _s(r.get("raw_direct_2t_1file"))),
    (
        "raw write: flashckpt's chunk-file protocol, 2 threads (diagnostic)",
        lambda r: f"{_s(r.get('raw_chunks_2t'))} ({r.get('raw_chunk_files')} files)",
    ),
    (
        "raw write: fastest (phase median)",
        lambda r: f"{_s(r.get('raw'))} ({r.get('raw_fastest_method', '')})",
    ),
    ("torch.save + fsync", lambda r: _vs(r, "torch_save", "raw", "raw")),
    ("DCP save (2 threads, fsync)", lambda r: _vs(r, "dcp_save", "raw", "raw")),
    ("DCP async_save blocking", lambda r: _vs(r, "dcp_async_blocking", "floor", "floor")),
    ("DCP async_save until durable", lambda r: _vs(r, "dcp_async_durable", "raw", "raw")),
    ("flashckpt restore from memory [<= 1.5x floor]", lambda r: _target(r, "restore_memory", "floor")),
    ("flashckpt restore from disk, cold", lambda r: _disk(r, "cold")),
    ("flashckpt restore from disk, warm", lambda r: _disk(r, "warm")),
    ("torch.load, cold / warm", lambda r: _pair(r, "torch_load_cold", "torch_load_warm")),
    ("DCP load into preallocated, cold / warm", lambda r: _pair(r, "dcp_load_cold", "dcp_load_warm")),
]


def _after(r: dict[str, Any]) -> str:
    return _s(r.get("so_background_after_durable"))


def _per_config(r: dict[str, Any]) -> str:
    a, b = r.get("blocking_steady_2tier_pair"), r.get("so_blocking_pair")
    if a is None or b is None:
        return "—"
    return f"{_s(r.get('blocking_steady_2tier'))} ({a:.2f}x) / {_s(r.get('so_blocking'))} ({b:.2f}x)"


def _persist_pair(r: dict[str, Any]) -> str:
    v, p = r.get("so_persist_storage"), r.get("so_persist_pair")
    return f"{v:.3f} s ({p:.2f}x raw)" if v is not None and p is not None else _s(v)


def _state(r: dict[str, Any]) -> str:
    s = r["state"]
    return f"{s['bytes'] / GiB:.3f}, {s['tensors']}, {s['hidden']} x {s['layers']}"


def _pair(r: dict[str, Any], a: str, b: str) -> str:
    return f"{_s(r.get(a))} / {_s(r.get(b))}"


def _cold_durable(r: dict[str, Any]) -> str:
    c = r.get("cold")
    return f"{_s(c['durable_local'])} / {_s(c['durable_all'])}" if c else "—"


def table(results: list[dict[str, Any]], markdown: bool) -> str:
    head = ["measurement"] + [f"{r['size_gib']:g} GiB" for r in results]
    rows = [[name] + [fn(r) for r in results] for name, fn in ROWS]
    if markdown:
        lines = ["| " + " | ".join(head) + " |", "| " + " | ".join("---" for _ in head) + " |"]
        return "\n".join(lines + ["| " + " | ".join(row) + " |" for row in rows])
    widths = [max(len(row[i]) for row in [head, *rows]) for i in range(len(head))]
    fmt = "  ".join(f"{{:<{w}}}" for w in widths)
    lines = [fmt.format(*head), fmt.format(*("-" * w for w in widths))]
    return "\n".join(lines + [fmt.format(*r) for r in rows])


def breakdown(results: list[dict[str, Any]]) -> str:
    """Where the time went, from the library timers (seconds per function@thread)."""
    lines = []
    for r in results:
        lines.append(f"{r['size_gib']:g} GiB:")
        items = [("cold save", (r.get("cold") or {}).get("profile"))]
        items += [(f"steady save {i + 1}", s.get("profile")) for i, s in enumerate(r.get("steady", []))]
        items += [
            (f"storage-only save {i + 1}", s.get("profile")) for i, s in enumerate(r.get("so_steady", []))
        ]
        items += [("restore from memory", (r.get("restore_memory_profile") or [None])[0])]
        items += [(f"restore from disk, {k}", r.get(f"restore_disk_{k}_profile")) for k in ("cold", "warm")]
        for name, prof in items:
            if prof:
                shown = ", ".join(f"{k} {v:.3f}" for k, v in prof.items() if v >= 0.0005)
                lines.append(f"  {name}: {shown}")
    return "\n".join(lines)


def verdicts(results: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    out: dict[str, dict[str, Any]] = {}
    for r in results:
        v: dict[str, Any] = {}
        for key, (base, limit) in TARGETS.items():
            pair = r.get(f"{key}_pair")
            if pair is not None:
                v[key] = {
                    "paired_ratio": round(pair, 3),
                    "phase_ratio": round(r[key] / r[base], 3) if r.get(base) else None,
                    "limit": limit,
                    "pass": pair <= limit,
                }
        out[f"{r['size_gib']:g}"] = v
    return out


def plot(results: list[dict[str, Any]], path: str) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log(f"matplotlib is not installed; skipping --plot {path}")
        return
    keys = [
        ("floor", "copy floor"),
        ("blocking_steady", "flashckpt blocking"),
        ("blocking_cold", "flashckpt cold"),
        ("dcp_async_blocking", "DCP async blocking"),
        ("raw", "raw write"),
        ("so_durable", "flashckpt durable"),
        ("torch_save", "torch.save"),
        ("dcp_save", "DCP save"),
        ("restore_memory", "restore memory"),
        ("restore_disk_cold", "restore disk (cold)"),
    ]
    fig, ax = plt.subplots(figsize=(11, 4.5))
    width = 0.8 / max(1, len(results))
    for j, r in enumerate(results):
        xs = [i + j * width for i in range(len(keys))]
        ax.bar(xs, [r.get(k) or 0.0 for k, _ in keys], width, label=f"{r['size_gib']:g} GiB")
    ticks = [i + 0.4 - width / 2 for i in range(len(keys))]
    ax.set_xticks(ticks, [n for _, n in keys], rotation=30, ha="right")
    ax.set_ylabel("seconds")
    ax.set_title(f"flashckpt core benchmark ({results[0]['state']['dtype']})")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    log(f"wrote {path}")


# --------------------------------------------------------------------------------------------
# main


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    p.add_argument("--sizes", default="1,4", help="comma-separated state sizes in GiB (fractions allowed)")
    p.add_argument("--dtype", choices=("fp32", "bf16", "mixed"), default="mixed")
    p.add_argument("--repeats", type=int, default=3, help="steady-state saves / restores measured (median)")
    p.add_argument("--floor-repeats", type=int, default=5)
    p.add_argument("--io-repeats", type=int, default=1, help="runs of each raw write method (median)")
    p.add_argument("--dir", help="disk directory for the files (default: bench/results/ in the repo)")
    p.add_argument("--step-s", type=float, default=2.0, help="simulated training step after restore()")
    p.add_argument("--train-step", choices=("sleep", "compute"), default="sleep")
    p.add_argument("--threads", type=int, default=torch.get_num_threads(), help="torch threads")
    p.add_argument("--compare-1thread", action="store_true", help="also measure a 1-thread floor")
    p.add_argument("--no-dcp", action="store_true")
    p.add_argument("--wait-quiet", type=float, default=0.0, help="wait up to S seconds for an idle machine")
    p.add_argument("--no-drop-caches", dest="drop_caches", action="store_false")
    p.add_argument("--no-profile", dest="profile", action="store_false")
    p.add_argument("--json", help="write the results here")
    p.add_argument("--plot", help="draw a bar chart here (needs matplotlib)")
    p.add_argument("--markdown", action="store_true", help="print the table as Markdown")
    return p.parse_args(argv)


def library_sources() -> dict[str, str]:
    """sha256 (12 hex digits) of every flashckpt source file as imported: the library may change
    between runs, and a result is only comparable with results from the same sources."""
    import hashlib

    root = Path(flashckpt.__file__).parent
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()[:12]
        for p in sorted(root.rglob("*.py"))
    }


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    sources = library_sources()
    sizes = [float(s) for s in args.sizes.split(",") if s.strip()]
    torch.set_num_threads(args.threads)
    base = Path(args.dir) if args.dir else REPO / "bench" / "results"
    made_base = not base.exists()
    base.mkdir(parents=True, exist_ok=True)
    shm_before = set(glob.glob("/dev/shm/flashckpt*"))
    root = Path(tempfile.mkdtemp(prefix="core-", dir=base))
    shm_root = Path(tempfile.mkdtemp(prefix="flashckpt-bench-", dir="/dev/shm"))
    prof = Profiler() if args.profile else None
    results: list[dict[str, Any]] = []
    rc = 0
    try:
        if os.stat(root).st_dev == os.stat(shm_root).st_dev:
            raise SystemExit(f"{base} is on the same file system as /dev/shm; pass --dir on a real disk")
        if prof is not None:
            prof.install()
        for gib in sizes:
            results.append(run_size(gib, args, root, shm_root, prof))
            quiesce()
    finally:
        if prof is not None:
            prof.uninstall()
        rm(root)
        rm(shm_root)
        if made_base:
            with contextlib.suppress(OSError):
                base.rmdir()
        left = sorted(set(glob.glob("/dev/shm/flashckpt*")) - shm_before)
        ours = [p for p in left if p.startswith("/dev/shm/flashckpt-bench-")]
        if ours:
            log(f"LEFT BEHIND in /dev/shm by this run: {ours}")
            rc = 1
        else:
            log("cleanup ok: this run left nothing in /dev/shm/flashckpt*")
        if others := [p for p in left if p not in ours]:
            log(f"note: other processes created {others} in /dev/shm during the run")
    meta = {
        "torch": torch.__version__,
        "flashckpt": flashckpt.__version__,
        "python": platform.python_version(),
        "cpus": os.cpu_count(),
        "torch_threads": args.threads,
        "args": vars(args),
        "flashckpt_sources": sources,
    }
    print(table(results, args.markdown))
    print("\nwhere the time went (library timers, s):")
    print(breakdown(results))
    v = verdicts(results)
    print("\ntargets (paired ratios):")
    for size, checks in v.items():
        line = ", ".join(
            f"{k} {c['paired_ratio']:.2f}x <= {c['limit']} {'PASS' if c['pass'] else 'MISS'}"
            for k, c in checks.items()
        )
        print(f"  {size} GiB: {line}")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        with open(args.json, "w") as f:
            json.dump({"meta": meta, "results": results, "targets": v}, f, indent=1, default=str)
        log(f"wrote {args.json}")
    if args.plot and results:
        plot(results, args.plot)
    return rc


if __name__ == "__main__":
    sys.exit(main())
