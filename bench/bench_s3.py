"""Object storage benchmark: flashckpt's S3 tier vs boto3's managed transfer, same server.

    .venv/bin/python -m bench.bench_s3 --mib 256

Starts a real S3 server (moto's ThreadedMotoServer) on 127.0.0.1 and a free port, in this
process, and measures for the same bytes, the same concurrency (``--concurrency``: requests
in flight) and the same part size (``--part-mib``: boto3's ``multipart_chunksize``,
flashckpt's ``chunk_bytes``, one object and one GET each):

upload
  - boto3 ``upload_fileobj``: one object of the whole state, multipart in parts;
  - boto3 ``TransferManager.upload``: one object per part, the layout flashckpt writes
    (``multipart_threshold`` = 2 parts, so each is one ``PutObject``);
  - flashckpt's S3 backend alone (``FsspecBackend.put``, ``--concurrency`` threads), the
    same objects: the transport, nothing else;
  - flashckpt ``save()`` -> durable on S3, steady state (warm slots; every chunk changed since
    the last step, so every chunk is uploaded: content addressing skips nothing), raw and
    zstd level 1.  Includes the copy into the slot, checksums, encoding, the manifest and the
    commit record.

download (every destination is fresh memory: a new, never touched ``/dev/shm`` mapping, as
a restore's slot is; first touch costs about a copy's worth of page faults here)
  - boto3 ``download_fileobj`` of the one object, ranged GETs of a part;
  - boto3 ``TransferManager.download`` of the per-part objects;
  - flashckpt's S3 backend alone (``FsspecBackend.get_into``, ``--concurrency`` threads) on
    the same per-part objects: the transport, nothing else;
  - boto3 "restore": the per-part objects into fresh memory, then copied into preallocated
    tensors (no listing, no checksums);
  - flashckpt ``restore`` from S3 into preallocated tensors (the memory tier is released
    first): lists commits, reads the manifest, maps and faults in a fresh slot, downloads,
    decodes (zstd), verifies every chunk (xxh3), copies into the tensors.

Integrity checks: boto3 sends a CRC32 with each PUT and checks the CRC32 of each whole-object
GET (botocore's defaults); flashckpt sends the CRC32 too, checks no CRC on GETs, and its
restore checks the xxh3 of every chunk instead.  ``--part-mib`` above 64 is not like for
like: a ``Checkpointer``'s S3 tier reads in 64 MiB requests.

Each measurement is repeated (``--repeats``), boto3 and flashckpt interleaved (each repeat
starts with the next measurement, so none always runs first), and the median is reported.
"vs boto3" is boto3's median time over flashckpt's (> 1: flashckpt is faster), against the
faster of the two boto3 layouts, and for restore against boto3's "restore" (and, in
brackets, its download alone).  The server runs in this process and shares its two cores
and its GIL with both clients: compare ratios, not GB/s.
"""

from __future__ import annotations

import argparse
import io
import json
import logging
import mmap
import os
import shutil
import socket
import statistics
import tempfile
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

import flashckpt
from flashckpt.backends import FsspecBackend
from flashckpt.transfer.codec import Compression, encode

BUCKET = "flashckpt-bench"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class _ViewWriter(io.RawIOBase):
    """A seekable file object over a memoryview: boto3 writes its parts straight into it."""

    def __init__(self, view: memoryview) -> None:
        self._view = view
        self._pos = 0

    def writable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._pos

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self._pos, io.SEEK_END: len(self._view)}[whence]
        self._pos = base + offset
        return self._pos

    def write(self, data: Any) -> int:
        n = len(data)
        self._view[self._pos : self._pos + n] = data
        self._pos += n
        return n


@contextmanager
def _fresh_memory(where: Path, nbytes: int) -> Iterator[memoryview]:
    """A shared mapping of a new /dev/shm file, never touched: like a restore's fresh slot."""
    path = where / f"fresh-{time.monotonic_ns()}"
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        os.ftruncate(fd, nbytes)
        mm = mmap.mmap(fd, nbytes, flags=mmap.MAP_SHARED)
    finally:
        os.close(fd)
        path.unlink()
    view = memoryview(mm)
    try:
        yield view
    finally:
        view.release()
        mm.close()


def codec_table(mib: int) -> list[tuple[str, str, str]]:
    rows = []
    g = torch.Generator().manual_seed(0)
    for dtype in (torch.float32, torch.bfloat16):
        t = (torch.randn(mib * (1 << 20) // dtype.itemsize, generator=g) * 0.02).to(dtype)
        data = t.view(torch.uint8).numpy().data
        for group in (1, dtype.itemsize):
            t0 = time.perf_counter()
            codec, stored = encode(data, group, Compression(1))
            secs = time.perf_counter() - t0
            name = f"{str(dtype).removeprefix('torch.')} {'byte-grouped' if group > 1 else 'plain'}"
            rows.append(
                (name, f"{len(stored) / len(data):.3f}", f"{len(data) / secs / 1e6:.0f} MB/s ({codec})")
            )
    return rows


def _timed(fn: Callable[[], object]) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--mib", type=int, default=256, help="state size in MiB (a multiple of --part-mib)")
    ap.add_argument("--repeats", type=int, default=5, help="runs of each measurement (median)")
    ap.add_argument("--concurrency", type=int, default=4, help="requests in flight, both clients")
    ap.add_argument("--part-mib", type=int, default=64, help="part / chunk / GET size, both clients")
    ap.add_argument("--json", help="also write the medians here")
    args = ap.parse_args()
    logging.getLogger("werkzeug").setLevel(logging.ERROR)

    import boto3
    from boto3.s3.transfer import TransferConfig, TransferManager
    from botocore.config import Config
    from moto.server import ThreadedMotoServer

    conc, part = args.concurrency, args.part_mib << 20
    nparts = max(1, (args.mib << 20) // part)
    nbytes = nparts * part
    port = _free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    endpoint = f"http://127.0.0.1:{port}"
    pool_size = max(10, conc)  # both clients: a connection for every request in flight
    client = boto3.client(
        "s3",
        endpoint_url=endpoint,
        region_name="us-east-1",
        aws_access_key_id="bench",
        aws_secret_access_key="bench",
        config=Config(max_pool_connections=pool_size),
    )
    client.create_bucket(Bucket=BUCKET)
    opts: dict[str, Any] = {
        "endpoint_url": endpoint,
        "key": "bench",
        "secret": "bench",
        "client_kwargs": {"region_name": "us-east-1"},
        "config_kwargs": {"max_pool_connections": pool_size},
    }
    cfg = TransferConfig(
        multipart_threshold=2 * part, multipart_chunksize=part, max_concurrency=conc, use_threads=True
    )
    shm = Path(
        tempfile.mkdtemp(prefix="flashckpt-bench-s3-", dir="/dev/shm" if os.path.isdir("/dev/shm") else None)
    )
    times: dict[str, list[float]] = {}
    written: dict[str, int] = {}

    def record(name: str, secs: float) -> None:
        times.setdefault(name, []).append(secs)

    try:
        g = torch.Generator().manual_seed(1)
        # bf16 weights as trained weights look, one tensor per part (one chunk each)
        state: dict[str, torch.Tensor] = {
            f"w{i}": (torch.randn(part // 2, generator=g) * 0.02).to(torch.bfloat16) for i in range(nparts)
        }
        payload = b"".join(t.view(torch.uint8).numpy().tobytes() for t in state.values())
        pieces = [payload[i * part : (i + 1) * part] for i in range(nparts)]
        targets = {
            side: {k: torch.zeros_like(v) for k, v in state.items()} for side in ("boto3", "flashckpt")
        }

        def boto_upload_blob() -> None:
            client.upload_fileobj(io.BytesIO(payload), BUCKET, "boto/blob", Config=cfg)

        def boto_upload_parts() -> None:
            with TransferManager(client, cfg) as tm:
                futures = [tm.upload(io.BytesIO(p), BUCKET, f"boto/parts/{i}") for i, p in enumerate(pieces)]
                for f in futures:
                    f.result()

        def boto_download_blob(dest: memoryview) -> None:
            client.download_fileobj(BUCKET, "boto/blob", _ViewWriter(dest), Config=cfg)

        def boto_download_parts(dest: memoryview) -> None:
            with TransferManager(client, cfg) as tm:
                futures = [
                    tm.download(BUCKET, f"boto/parts/{i}", _ViewWriter(dest[i * part : (i + 1) * part]))
                    for i in range(nparts)
                ]
                for f in futures:
                    f.result()

        backend = FsspecBackend(
            f"s3://{BUCKET}/boto/parts", storage_options=opts, range_bytes=part, max_concurrency=conc
        )
        io_pool = ThreadPoolExecutor(conc, thread_name_prefix="bench-io")

        def fc_download_parts(dest: memoryview) -> None:
            def one(i: int) -> None:
                n = backend.get_into(str(i), dest[i * part : (i + 1) * part])
                assert n == part

            list(io_pool.map(one, range(nparts)))

        uploads = FsspecBackend(
            f"s3://{BUCKET}/fc/parts", storage_options=opts, range_bytes=part, max_concurrency=conc
        )

        def fc_upload_parts() -> None:
            list(io_pool.map(lambda i: uploads.put(str(i), pieces[i]), range(nparts)))

        def boto_restore() -> None:
            with _fresh_memory(shm, nbytes) as dest:
                boto_download_parts(dest)
                for i, t in enumerate(targets["boto3"].values()):
                    src = torch.frombuffer(dest[i * part : (i + 1) * part], dtype=torch.bfloat16)
                    t.copy_(src)
                    del src

        def download(name: str, fn: Callable[[memoryview], None]) -> None:
            with _fresh_memory(shm, nbytes) as dest:
                record(name, _timed(lambda: fn(dest)))
                assert dest[:16] == payload[:16] and dest[-16:] == payload[-16:]

        # ---- upload -------------------------------------------------------------------------
        options = flashckpt.Options(io_threads=conc, chunk_bytes=part)
        ckpts = {
            comp: flashckpt.Checkpointer(
                f"s3://{BUCKET}/{comp}",
                memory_dir=shm / f"save-{comp}",
                storage_options=opts,
                compression=comp,
                keep=1,
                options=options,
            )
            for comp in ("none", "zstd")
        }
        step = 0

        def next_step() -> None:
            nonlocal step
            step += 1
            for t in state.values():  # every chunk changes: all of them are uploaded
                t[0] += 1

        def save(comp: str) -> float:
            ckpt = ckpts[comp]
            t0 = time.perf_counter()
            h = ckpt.save(step, state)
            assert h is not None
            h.wait()
            secs = time.perf_counter() - t0
            ckpt.wait()  # retention of the previous step, outside the timing
            written[comp] = int(ckpt.stats["written_bytes"]["storage"])
            return secs

        for _warm in range(2):  # both slots mapped and faulted in: the steady state
            next_step()
            for comp in ckpts:
                save(comp)

        def rotated(jobs: list[Callable[[], None]], r: int) -> list[Callable[[], None]]:
            """Each repeat starts with the next job: no side always runs first or last."""
            return jobs[r % len(jobs) :] + jobs[: r % len(jobs)]

        def save_job(comp: str) -> Callable[[], None]:
            return lambda: record(f"flashckpt save -> durable ({comp})", save(comp))

        up_jobs: list[Callable[[], None]] = [
            lambda: record("boto3 upload_fileobj, one object", _timed(boto_upload_blob)),
            lambda: record("boto3 TransferManager.upload, one object per part", _timed(boto_upload_parts)),
            lambda: record("flashckpt S3 backend put, same objects", _timed(fc_upload_parts)),
            *(save_job(comp) for comp in ckpts),
        ]
        for r in range(args.repeats):
            next_step()
            for job in rotated(up_jobs, r):
                job()
        for ckpt in ckpts.values():
            ckpt.close()

        # ---- download / restore -------------------------------------------------------------
        def restore_job(comp: str) -> Callable[[], None]:
            def job() -> None:
                with flashckpt.Checkpointer(
                    f"s3://{BUCKET}/{comp}", memory_dir=shm / "restore", storage_options=opts, options=options
                ) as ckpt:
                    t0 = time.perf_counter()
                    got = ckpt.restore(targets["flashckpt"])
                    record(f"flashckpt restore ({comp})", time.perf_counter() - t0)
                assert got == step and not (shm / "restore").exists()
                for k, v in state.items():
                    assert torch.equal(targets["flashckpt"][k].view(torch.int16), v.view(torch.int16))
                    targets["flashckpt"][k].zero_()

            return job

        down_jobs: list[Callable[[], None]] = [
            lambda: download("boto3 download_fileobj, one object", boto_download_blob),
            lambda: download("boto3 TransferManager.download, one object per part", boto_download_parts),
            lambda: download("flashckpt S3 backend get_into, same objects", fc_download_parts),
            lambda: record("boto3 restore: download + copy into tensors", _timed(boto_restore)),
            *(restore_job(comp) for comp in ckpts),
        ]
        for r in range(args.repeats):
            for job in rotated(down_jobs, r):
                job()
        io_pool.shutdown()
        backend.close()
        uploads.close()
        codec_rows = codec_table(64)
    finally:
        shutil.rmtree(shm, ignore_errors=True)
        server.stop()

    med = {k: statistics.median(v) for k, v in times.items()}
    up_ref = min(
        med["boto3 upload_fileobj, one object"], med["boto3 TransferManager.upload, one object per part"]
    )
    down_ref = min(
        med["boto3 download_fileobj, one object"],
        med["boto3 TransferManager.download, one object per part"],
    )
    restore_ref = med["boto3 restore: download + copy into tensors"]
    print(
        f"\n{nbytes >> 20} MiB of bf16 weights N(0, 0.02) in {nparts} parts of {part >> 20} MiB, "
        f"concurrency {conc}, moto on loopback, median of {args.repeats}\n"
    )
    print("| measurement | time | GB/s | vs boto3 |")
    print("| --- | --- | --- | --- |")

    def row(name: str, ref: float | None, note: str = "", also: float | None = None) -> None:
        t = med[name]
        vs = "" if ref is None else f"{ref / t:.2f}x"
        if also is not None:
            vs += f" ({also / t:.2f}x boto3's download alone)"
        print(f"| {name}{note} | {t:.3f} s | {nbytes / t / 1e9:.3f} | {vs} |")

    print("| **upload** | | | |")
    row("boto3 upload_fileobj, one object", None)
    row("boto3 TransferManager.upload, one object per part", None)
    row("flashckpt S3 backend put, same objects", up_ref)
    for comp in ckpts:
        note = f" ({written[comp] / nbytes:.2f} of raw sent)" if comp != "none" else ""
        row(f"flashckpt save -> durable ({comp})", up_ref, note)
    print("| **download into fresh memory** | | | |")
    row("boto3 download_fileobj, one object", None)
    row("boto3 TransferManager.download, one object per part", None)
    row("flashckpt S3 backend get_into, same objects", down_ref)
    print("| **restore into preallocated tensors** | | | |")
    row("boto3 restore: download + copy into tensors", None)
    for comp in ckpts:
        row(f"flashckpt restore ({comp})", restore_ref, also=down_ref)
    if args.json:
        Path(args.json).write_text(json.dumps({"bytes": nbytes, "median": med, "written": written}, indent=1))
    print("\n| zstd level 1, 64 MiB | ratio | speed, one thread |")
    print("| --- | --- | --- |")
    for a, b, c in codec_rows:
        print(f"| {a} | {b} | {c} |")


if __name__ == "__main__":
    main()
