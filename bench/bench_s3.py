"""Object storage benchmark: flashckpt's S3 tier vs boto3's managed transfer, same server.

    .venv/bin/python -m bench.bench_s3 --mib 256

Starts a real S3 server (moto) on 127.0.0.1 and a free port, then measures in one run, for
the same bytes and the same concurrency:

- boto3 ``upload_fileobj`` / ``download_fileobj`` (managed multipart transfer);
- flashckpt: ``save()`` -> durable on the S3 tier (raw, and zstd level 1), and ``restore``
  from S3 into a fresh process-level state (the memory tier is released first);
- compression ratio and MB/s per thread for fp32 and bf16 weights drawn like trained ones
  (N(0, 0.02)), plain and byte-grouped.

Prints a Markdown table.  The server on loopback is the bottleneck here: compare ratios.
"""

from __future__ import annotations

import argparse
import io
import logging
import os
import shutil
import socket
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

import flashckpt
from flashckpt._codec import Compression, encode


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _median(fn: Callable[[], float], n: int) -> float:
    return statistics.median(fn() for _ in range(n))


def codec_table(mib: int) -> list[tuple[str, str, str]]:
    rows = []
    g = torch.Generator().manual_seed(0)
    for dtype in (torch.float32, torch.bfloat16):
        t = (torch.randn(mib * (1 << 20) // dtype.itemsize, generator=g) * 0.02).to(dtype)
        data = memoryview(t.view(torch.uint8).numpy())
        for group in (1, dtype.itemsize):
            t0 = time.perf_counter()
            codec, stored = encode(data, group, Compression(1))
            secs = time.perf_counter() - t0
            name = f"{str(dtype).removeprefix('torch.')} {'byte-grouped' if group > 1 else 'plain'}"
            rows.append(
                (name, f"{len(stored) / len(data):.3f}", f"{len(data) / secs / 1e6:.0f} MB/s ({codec})")
            )
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--mib", type=int, default=256, help="state size in MiB")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--concurrency", type=int, default=4)
    args = ap.parse_args()
    logging.getLogger("werkzeug").setLevel(logging.ERROR)

    import boto3
    from boto3.s3.transfer import TransferConfig
    from moto.server import ThreadedMotoServer

    port = _free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    endpoint = f"http://127.0.0.1:{port}"
    creds = {"aws_access_key_id": "bench", "aws_secret_access_key": "bench"}
    client = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1", **creds)
    client.create_bucket(Bucket="flashckpt-bench")
    opts = {
        "endpoint_url": endpoint,
        "key": "bench",
        "secret": "bench",
        "client_kwargs": {"region_name": "us-east-1"},
    }
    work = Path(tempfile.mkdtemp(prefix="flashckpt-bench-s3-"))
    shm = Path(
        tempfile.mkdtemp(prefix="flashckpt-bench-s3-", dir="/dev/shm" if os.path.isdir("/dev/shm") else None)
    )
    rows: list[tuple[str, str, str]] = []
    try:
        n = args.mib << 20
        g = torch.Generator().manual_seed(1)
        # bf16 weights as trained weights look, in 64 MiB tensors (one chunk each)
        per = (64 << 20) // 2
        state: dict[str, Any] = {
            f"w{i}": (torch.randn(per, generator=g) * 0.02).to(torch.bfloat16) for i in range(n // (64 << 20))
        }
        nbytes = sum(t.numel() * 2 for t in state.values())
        payload = b"".join(t.view(torch.uint8).numpy().tobytes() for t in state.values())
        cfg = TransferConfig(multipart_chunksize=64 << 20, max_concurrency=args.concurrency, use_threads=True)

        def boto_up() -> float:
            t0 = time.perf_counter()
            client.upload_fileobj(io.BytesIO(payload), "flashckpt-bench", "boto/blob", Config=cfg)
            return time.perf_counter() - t0

        def boto_down() -> float:
            out = io.BytesIO()
            t0 = time.perf_counter()
            client.download_fileobj("flashckpt-bench", "boto/blob", out, Config=cfg)
            return time.perf_counter() - t0

        up = _median(boto_up, args.repeats)
        down = _median(boto_down, args.repeats)
        rows.append(("boto3 managed upload", f"{up:.2f} s", f"{nbytes / up / 1e9:.3f} GB/s"))
        rows.append(("boto3 managed download", f"{down:.2f} s", f"{nbytes / down / 1e9:.3f} GB/s"))

        options = flashckpt.Options(io_threads=args.concurrency)
        for comp in ("none", "zstd"):
            url = f"s3://flashckpt-bench/{comp}"
            times = []
            for step in range(args.repeats):
                with flashckpt.Checkpointer(
                    url,
                    memory_dir=shm / comp,
                    storage_options=opts,
                    compression=comp,
                    keep=1,
                    options=options,
                ) as ckpt:
                    t0 = time.perf_counter()
                    h = ckpt.save(step, state)
                    assert h is not None
                    h.wait()
                    times.append(time.perf_counter() - t0)
            t = statistics.median(times)
            rows.append(
                (
                    f"flashckpt save -> durable on S3 ({comp})",
                    f"{t:.2f} s",
                    f"{nbytes / t / 1e9:.3f} GB/s, {up / t:.2f}x boto3",
                )
            )
            fresh = {k: torch.empty_like(v) for k, v in state.items()}
            rtimes = []
            for _ in range(args.repeats):
                with flashckpt.Checkpointer(
                    url, memory_dir=shm / f"r{comp}", storage_options=opts, options=options
                ) as ckpt:
                    t0 = time.perf_counter()
                    ckpt.restore(fresh)
                    rtimes.append(time.perf_counter() - t0)
            assert all(torch.equal(fresh[k].view(torch.int16), v.view(torch.int16)) for k, v in state.items())
            t = statistics.median(rtimes)
            rows.append(
                (
                    f"flashckpt restore from S3 ({comp})",
                    f"{t:.2f} s",
                    f"{nbytes / t / 1e9:.3f} GB/s, {down / t:.2f}x boto3",
                )
            )
        rows += [(f"zstd-1 {a}", f"ratio {b}", c) for a, b, c in codec_table(64)]
    finally:
        shutil.rmtree(work, ignore_errors=True)
        shutil.rmtree(shm, ignore_errors=True)
        server.stop()
    print(f"\n{args.mib} MiB of bf16 weights N(0, 0.02), concurrency {args.concurrency}, moto on loopback\n")
    print("| measurement | time / ratio | throughput |")
    print("| --- | --- | --- |")
    for r in rows:
        print(f"| {r[0]} | {r[1]} | {r[2]} |")


if __name__ == "__main__":
    main()
