"""Chunk codecs: byte-grouped zstd round trips and ratios on weights drawn like trained ones."""

from __future__ import annotations

import pytest
import torch

from flashckpt._codec import RAW, Compression, decode, encode, is_known
from flashckpt.errors import ConfigError, CorruptCheckpointError


def _bytes(t: torch.Tensor) -> memoryview:
    return memoryview(t.contiguous().view(torch.uint8).numpy())


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32, torch.float64])
def test_round_trip_bytewise(dtype: torch.dtype) -> None:
    t = (torch.randn(1 << 16) * 0.02).to(dtype)
    data = _bytes(t)
    for group in (1, dtype.itemsize):
        codec, stored = encode(data, group, Compression(1))
        assert is_known(codec)
        out = bytearray(len(data))
        decode(codec, stored, memoryview(out))
        assert bytes(out) == bytes(data)


def test_bf16_weights_compress_below_three_quarters_with_byte_grouping() -> None:
    g = torch.Generator().manual_seed(0)
    t = (torch.randn(1 << 22, generator=g) * 0.02).to(torch.bfloat16)
    codec, stored = encode(_bytes(t), 2, Compression(1))
    assert codec == "zstd-bg2/1"
    assert len(stored) <= 0.75 * t.numel() * 2
    plain_codec, plain = encode(_bytes(t), 1, Compression(1))
    assert plain_codec == "zstd/1" and len(stored) < len(plain)  # grouping pays


def test_incompressible_chunks_are_stored_raw() -> None:
    data = memoryview(torch.randint(0, 256, (1 << 16,), dtype=torch.uint8).numpy())
    codec, stored = encode(data, 1, Compression(3))
    assert codec == RAW and stored is data
    assert encode(data, 1, Compression(None))[0] == RAW


def test_corrupt_compressed_data_is_detected() -> None:
    t = (torch.randn(1 << 14) * 0.02).to(torch.bfloat16)
    codec, stored = encode(_bytes(t), 2, Compression(1))
    bad = bytearray(stored)
    bad[len(bad) // 2] ^= 0xFF
    out = bytearray(t.numel() * 2)
    with pytest.raises(CorruptCheckpointError):
        decode(codec, bytes(bad[: len(bad) // 2]), memoryview(out))
    with pytest.raises(CorruptCheckpointError):
        decode(codec, stored, memoryview(bytearray(len(out) - 2)))
    with pytest.raises(CorruptCheckpointError):
        decode("lz4/9", stored, memoryview(out))


def test_compression_spec() -> None:
    assert Compression.parse(None).level is None
    assert Compression.parse("zstd").level == 1
    assert Compression.parse("zstd:7").level == 7
    for bad in ("gzip", "zstd:", "zstd:99", "zstd:x", 3):
        with pytest.raises(ConfigError):
            Compression.parse(bad)  # type: ignore[arg-type]
