"""``flashckpt restore --out``: a consolidated step written as a file other tools load.

By the suffix of ``--out``:

* ``.safetensors``: one safetensors file (tensors only; values are listed on stderr as left
  out);
* a directory (``--out DIR/``, or a path without a suffix): the Hugging Face layout, sharded
  ``model-0000k-of-0000n.safetensors`` of at most ``--max-shard-size`` each plus
  ``model.safetensors.index.json``;
* ``.pt``: ``torch.save`` of a flat ``{key: tensor or value}`` dict, loadable with
  ``torch.load(weights_only=True)``.

Safetensors files are written as a stream (the header from the step's records, then each
tensor as it is read): memory holds one tensor.  The ``.pt`` tensors are staged in a memory-mapped file
beside the output (the page cache, not the process, holds them) and removed after.  Every
output is written to a temporary name and renamed when complete.
"""

from __future__ import annotations

import contextlib
import json
import mmap
import os
import re
import struct
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch

#: safetensors' dtype names
_ST_DTYPES = {
    torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
    torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
    torch.bool: "BOOL", torch.float8_e4m3fn: "F8_E4M3", torch.float8_e5m2: "F8_E5M2",
    torch.uint16: "U16", torch.uint32: "U32", torch.uint64: "U64",
}  # fmt: skip
_CASTS = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def parse_size(text: str) -> int:
    """``5GB``, ``500MB``, ``2GiB``, ``1000000`` -> bytes."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?i?B)?\s*", text, re.IGNORECASE)
    if not m:
        raise ValueError(f"--max-shard-size: not a size: {text!r}")
    unit = (m.group(2) or "B").upper()
    scale = {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
             "KIB": 1 << 10, "MIB": 1 << 20, "GIB": 1 << 30, "TIB": 1 << 40}[unit]  # fmt: skip
    n = int(float(m.group(1)) * scale)
    if n <= 0:
        raise ValueError(f"--max-shard-size must be positive, got {text!r}")
    return n


Spec = tuple[str, "torch.dtype | None", tuple[int, ...]]


def _pick(key: str, only: str | None) -> str | None:
    """``key`` with ``only``'s prefix removed, or ``None`` when it is not under ``only``."""
    if only is None or key == only:
        return key
    return key[len(only) + 1 :] if key.startswith(only + ".") else None


def _cast_to(dtype: torch.dtype | None, cast: str | None) -> torch.dtype | None:
    return _CASTS[cast] if cast is not None and dtype is not None and dtype.is_floating_point else dtype


def select_specs(specs: list[Spec], only: str | None, cast: str | None) -> list[Spec]:
    """:func:`select` applied to :meth:`Catalog.leaf_specs`."""
    return [(k, _cast_to(dt, cast), shape) for key, dt, shape in specs if (k := _pick(key, only)) is not None]


def select(
    leaves: Iterator[tuple[str, Any]], only: str | None, cast: str | None
) -> Iterator[tuple[str, Any]]:
    """The leaves under ``only`` (its prefix removed from their keys), floating tensors cast to
    ``cast`` (``bf16``, ``fp16``, ``fp32``)."""
    for key, value in leaves:
        k = _pick(key, only)
        if k is None:
            continue
        if isinstance(value, torch.Tensor) and value.is_floating_point() and cast is not None:
            value = value.to(_CASTS[cast])
        yield k, value


def tally(
    leaves: Iterator[tuple[str, Any]], specs: list[Spec], progress: Callable[[int, int], None] | None
) -> Iterator[tuple[str, Any]]:
    """``leaves`` as they are, calling ``progress(done, total)`` with the tensor bytes passed on
    so far (``total`` from ``specs``)."""
    total = sum(_nbytes(dtype, shape) for _, dtype, shape in specs if dtype is not None)
    done = 0
    for key, value in leaves:
        yield key, value
        if isinstance(value, torch.Tensor) and progress is not None:
            done += value.numel() * value.element_size()
            progress(done, total)


def _nbytes(dtype: torch.dtype, shape: tuple[int, ...]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n * torch.empty((), dtype=dtype).element_size()


def _header(entries: list[tuple[str, torch.dtype, tuple[int, ...], int]]) -> bytes:
    meta: dict[str, Any] = {"__metadata__": {"format": "pt", "producer": "flashckpt"}}
    off = 0
    for key, dtype, shape, nbytes in entries:
        meta[key] = {"dtype": _ST_DTYPES[dtype], "shape": list(shape), "data_offsets": [off, off + nbytes]}
        off += nbytes
    raw = json.dumps(meta, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # the data starts 8-byte aligned
    return struct.pack("<Q", len(raw)) + raw


def write_safetensors(
    specs: list[Spec], leaves: Iterator[tuple[str, Any]], out: Path, *, shard_bytes: int | None = None
) -> dict[str, Any]:
    """Write the tensors of ``leaves`` (described beforehand by ``specs``, in the same order)
    as one safetensors file (``shard_bytes`` None) or a Hugging Face sharded directory; each
    file's header comes from ``specs``, then each tensor is written as it arrives: memory
    holds one tensor.  Returns what was written (files, tensors, bytes, values left out)."""
    entries = []
    for key, dtype, shape in specs:
        if dtype is None:
            continue
        if dtype not in _ST_DTYPES:
            raise ValueError(f"{key}: safetensors has no {dtype} (leave it out with --only, or use .pt)")
        entries.append((key, dtype, shape, _nbytes(dtype, shape)))
    if not entries:
        raise ValueError("nothing to write: the selection holds no tensor")
    groups: list[list[tuple[str, torch.dtype, tuple[int, ...], int]]] = [[]]
    for e in entries:
        if shard_bytes is not None and groups[-1] and sum(x[3] for x in groups[-1]) + e[3] > shard_bytes:
            groups.append([])
        groups[-1].append(e)
    made = False
    if shard_bytes is None:
        names, paths = [out.name], [out]
    else:
        made = not out.exists()
        out.mkdir(parents=True, exist_ok=True)
        names = [f"model-{i + 1:05d}-of-{len(groups):05d}.safetensors" for i in range(len(groups))]
        paths = [out / n for n in names]
    tmps = [p.with_name(f".{p.name}.tmp-{os.getpid()}") for p in paths]
    left_out: list[str] = []
    stream = iter(leaves)
    try:
        for group, tmp in zip(groups, tmps, strict=True):
            with open(tmp, "wb") as f:
                f.write(_header(group))
                for key, dtype, shape, _n in group:
                    got_key, value = next(stream)
                    while not isinstance(value, torch.Tensor):
                        left_out.append(got_key)
                        got_key, value = next(stream)
                    if got_key != key or value.dtype != dtype or tuple(value.shape) != shape:
                        raise RuntimeError(f"{got_key}: the step's data does not match its records")
                    if value.numel():
                        f.write(value.contiguous().reshape(-1).view(torch.uint8).numpy().data)
                f.flush()
                os.fsync(f.fileno())
        left_out += [k for k, v in stream if not isinstance(v, torch.Tensor)]
        for tmp, path in zip(tmps, paths, strict=True):
            os.replace(tmp, path)
        total = sum(e[3] for e in entries)
        if shard_bytes is not None:
            weight_map = {e[0]: names[i] for i, g in enumerate(groups) for e in g}
            index = {"metadata": {"total_size": total}, "weight_map": weight_map}
            (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
        made = False  # complete: it stays
        return {"files": names, "tensors": len(entries), "bytes": total, "left_out": left_out}
    finally:
        for tmp in tmps:
            tmp.unlink(missing_ok=True)
        if made:
            with contextlib.suppress(OSError):  # the directory this call made, left empty
                out.rmdir()


def write_pt(leaves: Iterator[tuple[str, Any]], out: Path) -> dict[str, Any]:
    """``torch.save`` of a flat ``{key: tensor or value}`` dict; while it is written each
    tensor lives in its own page-aligned mapping of a scratch file beside ``out`` (torch.save
    refuses views of one storage as different dtypes), so the page cache holds them."""
    scratch = out.with_name(f".{out.name}.scratch-{os.getpid()}")
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    items: list[tuple[str, Any]] = []
    used = 0
    try:
        with open(scratch, "w+b") as f:
            for key, value in leaves:
                if isinstance(value, torch.Tensor) and value.numel():
                    n = value.numel() * value.element_size()
                    f.truncate(used + n)
                    mapping = mmap.mmap(f.fileno(), n, offset=used)
                    dst = torch.frombuffer(mapping, dtype=torch.uint8).view(value.dtype).view(value.shape)
                    dst.copy_(value)
                    value = dst
                    used += n + (-n % mmap.ALLOCATIONGRANULARITY)
                items.append((key, value))
            torch.save(dict(items), tmp)
            items.clear()
        os.replace(tmp, out)
        return {"files": [out.name], "tensors": None, "bytes": used, "left_out": []}
    finally:
        tmp.unlink(missing_ok=True)
        scratch.unlink(missing_ok=True)
