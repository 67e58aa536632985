"""Mirror benchmark: peer mirroring over loopback, against a raw socket copy, in one run.

    python -m bench.bench_mirror [--mib 512] [--repeats 5] [--steps 12] [--markdown]

1. Throughput: one snapshot of ``--mib`` MiB pushed to a ``MirrorServer`` (the real path:
   HMAC handshake, manifest, bytes straight from the slot into the peer's slot) against a
   raw loopback TCP copy of the same bytes into a preallocated buffer (``sendall`` /
   ``recv_into``): the floor.
2. Training with mirroring on and off: two ranks on two simulated nodes (gloo), a compute-bound
   step (matmuls) and ``save`` every step; the step time with ``mirror=1`` against
   ``mirror=0``, and with the bandwidth cap ``--cap-mib-s`` as well.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import statistics
import tempfile
import threading
import time
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
import torch.multiprocessing as mp

import flashckpt
from flashckpt.replication.client import push
from flashckpt.replication.server import MirrorServer
from flashckpt.staging.memory_tier import read_memory_manifest
from flashckpt.testing import parts

MiB = 1 << 20


# -- 1. throughput ------------------------------------------------------------------------------


def raw_socket_copy(nbytes: int) -> float:
    """Seconds to move ``nbytes`` through a loopback TCP connection into a preallocated buffer."""
    src = bytearray(os.urandom(1 << 20)) * (nbytes >> 20)
    dst = bytearray(len(src))
    srv = socket.create_server(("127.0.0.1", 0))
    port = srv.getsockname()[1]
    done = threading.Event()

    def receive() -> None:
        conn, _ = srv.accept()
        with conn:
            view, got = memoryview(dst), 0
            while got < len(dst):
                got += conn.recv_into(view[got:], min(len(dst) - got, 4 << 20))
        done.set()

    t = threading.Thread(target=receive)
    t.start()
    t0 = time.perf_counter()
    with socket.create_connection(("127.0.0.1", port)) as sock:
        view = memoryview(src)
        for off in range(0, len(src), 4 << 20):
            sock.sendall(view[off : off + (4 << 20)])
        done.wait()
    secs = time.perf_counter() - t0
    t.join()
    srv.close()
    return secs


def mirror_push(tmp: Path, shm: Path, mib: int, repeats: int) -> tuple[list[float], list[float]]:
    """Seconds per push of a ``mib`` MiB snapshot to a MirrorServer; and the raw copies
    measured alternately with them."""
    state = {"w": torch.randn(mib * MiB // 4)}
    ckpt = flashckpt.Checkpointer(tmp / "storage", memory_dir=shm / "owner", persist_every=1000)
    server = MirrorServer(shm / "peer" / "r00001-of-00002", b"k" * 32, flashckpt.Options(), "127.0.0.1")
    pushes, raws = [], []
    try:
        for step in range(repeats + 1):
            ckpt.save(step, state)
            ckpt.wait()
            m = read_memory_manifest(parts(ckpt).memory.backend, step)
            slot = next(s for s in parts(ckpt).stager.slots if s.step == step)
            t0 = time.perf_counter()
            push(("127.0.0.1", server.port), b"k" * 32, "r00000-of-00002", m, slot.view, flashckpt.Options())
            secs = time.perf_counter() - t0
            raw = raw_socket_copy(m.total_bytes)
            if step:  # the first push also faults the peer's slot in
                pushes.append(secs)
                raws.append(raw)
    finally:
        server.drop()
        server.close()
        ckpt.close()
    return pushes, raws


# -- 2. training with mirroring on and off ------------------------------------------------------


def train_worker(rank: int, init: str, args: argparse.Namespace, out: str) -> None:
    os.environ["FLASHCKPT_NODE_ID"] = f"node{rank}"
    os.environ["FLASHCKPT_MIRROR_HOST"] = "127.0.0.1"
    torch.set_num_threads(1)
    torch.distributed.init_process_group(
        "gloo", init_method=init, rank=rank, world_size=2, timeout=timedelta(seconds=300)
    )
    torch.manual_seed(rank)
    state = {"w": torch.randn(args.mib * MiB // 4 // 2)}  # half the size per rank
    a = torch.randn(384, 384)
    res: dict[str, Any] = {}
    for name, mirror, cap in (("off", 0, 0.0), ("on", 1, 0.0), ("on, capped", 1, args.cap_mib_s * MiB)):
        opts = flashckpt.Options(mirror_bytes_per_s=cap)
        where = Path(args.tmp) / f"storage-{mirror}-{cap}"
        with flashckpt.Checkpointer(
            where, memory_dir=f"{args.shm}/{name}{rank}", mirror=mirror, persist_every=1000, options=opts
        ) as ckpt:
            ckpt.restore(state)
            parts(ckpt).stager.join_prefault()
            times, handles = [], []
            for step in range(args.steps):
                torch.distributed.barrier()
                t0 = time.perf_counter()
                for _ in range(args.matmuls):
                    a = torch.tanh(a @ a)
                state["w"].add_(1e-3)
                handles.append(ckpt.save(step, state))
                times.append(time.perf_counter() - t0)
            for h in handles:
                try:
                    h.wait()  # type: ignore[union-attr]
                except flashckpt.FlashCkptError:
                    pass  # a mirror abandoned because the peer fell behind: counted below
            res[name] = statistics.median(times[2:])
            res[f"{name} mirrored"] = sum("mirror" in h.durable_on() for h in handles)  # type: ignore[union-attr]
    Path(out, f"rank{rank}.json").write_text(json.dumps(res))
    torch.distributed.destroy_process_group()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--mib", type=int, default=512)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--matmuls", type=int, default=40, help="compute per training step")
    ap.add_argument("--cap-mib-s", type=float, default=256.0)
    ap.add_argument("--markdown", action="store_true")
    ap.add_argument("--json", help="also write the figures here")
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="flashckpt-bench-mirror-"))
    shm = Path(tempfile.mkdtemp(prefix="flashckpt-bench-mirror-", dir="/dev/shm"))
    args.tmp, args.shm = str(tmp), str(shm)
    try:
        pushes, raws = mirror_push(tmp, shm, args.mib, args.repeats)
        out = tmp / "results"
        out.mkdir()
        mp.start_processes(
            train_worker,
            args=(f"file://{tmp / 'rdzv'}", args, str(out)),
            nprocs=2,
            join=True,
            start_method="spawn",
        )
        train = [json.loads((out / f"rank{r}.json").read_text()) for r in range(2)]
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.rmtree(shm, ignore_errors=True)
    nbytes = args.mib * MiB
    push_s, raw_s = statistics.median(pushes), statistics.median(raws)
    pair = statistics.median(p / r for p, r in zip(pushes, raws, strict=True))
    step = {k: max(t[k] for t in train) for k in ("off", "on", "on, capped")}
    done = {k: min(t[f"{k} mirrored"] for t in train) for k in ("on", "on, capped")}
    rows = [
        (
            f"raw loopback socket copy, {args.mib} MiB",
            f"{raw_s:.3f} s ({nbytes / raw_s / 1e9:.2f} GB/s)",
            "1.00x",
        ),
        (
            f"mirror push, {args.mib} MiB (handshake, manifest, into the peer's slot)",
            f"{push_s:.3f} s ({nbytes / push_s / 1e9:.2f} GB/s)",
            f"{push_s / raw_s:.2f}x (paired median {pair:.2f}x)",
        ),
        (
            f"training step, mirror off ({args.mib // 2} MiB/rank saved every step)",
            f"{step['off']:.3f} s",
            "1.00x",
        ),
        (
            f"training step, mirror on ({done['on']}/{args.steps} snapshots mirrored)",
            f"{step['on']:.3f} s",
            f"{step['on'] / step['off']:.2f}x",
        ),
        (
            f"training step, mirror on, capped at {args.cap_mib_s:.0f} MiB/s "
            f"({done['on, capped']}/{args.steps} mirrored)",
            f"{step['on, capped']:.3f} s",
            f"{step['on, capped'] / step['off']:.2f}x",
        ),
    ]
    if args.markdown:
        print("| mirror | value | ratio |")
        print("| --- | --- | --- |")
        for name, value, ratio in rows:
            print(f"| {name} | {value} | {ratio} |")
    else:
        for name, value, ratio in rows:
            print(f"{name:<66} {value:>26} {ratio}")
    if args.json:
        figures = {
            "bytes": nbytes,
            "raw_socket_s": raw_s,
            "push_s": push_s,
            "push_x_socket_paired": pair,
            "step_mirror_off_s": step["off"],
            "step_mirror_on_s": step["on"],
            "step_mirror_capped_s": step["on, capped"],
            "mirrored": f"{done['on']}/{args.steps}, capped {done['on, capped']}/{args.steps}",
        }
        Path(args.json).write_text(json.dumps({"push": push_s, **figures}, indent=1))


if __name__ == "__main__":
    main()
