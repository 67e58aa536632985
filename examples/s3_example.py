"""Example: checkpoints on S3 (or any S3-compatible store), resumed on a fresh machine.

    python examples/s3_example.py                               # a local S3 server (moto)
    python examples/s3_example.py --url s3://bucket/run-7       # your bucket (AWS_* credentials)
    python examples/s3_example.py --url s3://b/r --endpoint http://minio:9000

Without ``--url`` it starts a real S3 server on 127.0.0.1 (``moto[server]``, the test
dependency) and creates a bucket.  Attempt 1 trains 12 steps, persisting every 4th step to
S3 (and compressing it with zstd), and closes cleanly: nothing stays in memory.  Attempt 2
is a "fresh machine": an empty memory directory, so ``restore`` reads step 11 from S3, every
chunk verified.  Then the command line lists and verifies what the bucket holds.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import socket
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import torch

import flashckpt


def build() -> dict[str, Any]:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 256), torch.nn.GELU(), torch.nn.Linear(256, 64))
    return {"model": model, "optim": torch.optim.AdamW(model.parameters(), lr=1e-3)}


def step_fn(state: dict[str, Any], step: int) -> None:
    x = torch.randn(16, 64, generator=torch.Generator().manual_seed(step))
    loss = torch.nn.functional.mse_loss(state["model"](x), x)
    state["optim"].zero_grad()
    loss.backward()
    state["optim"].step()


def local_s3() -> tuple[str, Any]:
    """A moto S3 server on a free loopback port, with a bucket: (endpoint, server)."""
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # no line per request

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    return f"http://127.0.0.1:{port}", server


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--url", help="s3://bucket/prefix (default: a bucket on a local moto server)")
    ap.add_argument("--endpoint", help="an S3-compatible endpoint URL")
    args = ap.parse_args()
    server = None
    options: dict[str, Any] = {}
    url, endpoint = args.url, args.endpoint
    if url is None:
        endpoint, server = local_s3()
        os.environ.setdefault("AWS_ACCESS_KEY_ID", "testing")
        os.environ.setdefault("AWS_SECRET_ACCESS_KEY", "testing")
        import boto3

        boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1").create_bucket(Bucket="demo")
        url = "s3://demo/run-7"
        print(f"a local S3 server at {endpoint}, bucket 'demo'")
    if endpoint:
        options = {"endpoint_url": endpoint, "client_kwargs": {"region_name": "us-east-1"}}
    shm = Path(
        tempfile.mkdtemp(prefix="flashckpt-s3-", dir="/dev/shm" if os.path.isdir("/dev/shm") else None)
    )
    try:
        print(f"attempt 1: 12 steps, every 4th persisted to {url} (zstd)")
        state = build()
        with flashckpt.Checkpointer(
            url, storage_options=options, memory_dir=shm / "a", persist_every=4, compression="zstd", keep=2
        ) as ckpt:
            for step in range(12):
                step_fn(state, step)
                ckpt.save(step, state)
            s = ckpt.stats
            print(f"  the last save blocked training {s['blocking_s'] * 1e3:.2f} ms "
                  f"({s['slot_wait_s'] * 1e3:.2f} ms of it waiting for a slot in use)")  # fmt: skip
        # the clean close persisted step 11 (memory only until then) and freed the memory tier
        print("attempt 2: a fresh machine (empty memory): restore reads S3")
        again = build()
        with flashckpt.Checkpointer(url, storage_options=options, memory_dir=shm / "b") as ckpt:
            step = ckpt.restore(again)
            got = ckpt.stats["restored"]
            print(f"  restored step {step} from the {got['tier']} tier ({got['bytes']:,} bytes, verified)")
        same = all(
            torch.equal(v, again["model"].state_dict()[k]) for k, v in state["model"].state_dict().items()
        )
        print(f"restored == saved, bit for bit: {same}")
        cli = [sys.executable, "-m", "flashckpt.cli"]
        so = ["--storage-options", json.dumps(options)]
        for cmd in (["ls", url, *so], ["verify", url, *so]):
            print("$ flashckpt " + " ".join(cmd[:2]))
            subprocess.run([*cli, *cmd], check=True)
        print(json.dumps({"bitwise_equal": same}))
        sys.exit(0 if same else 1)
    finally:
        shutil.rmtree(shm, ignore_errors=True)
        if server is not None:
            server.stop()


if __name__ == "__main__":
    main()
