"""Chunk codecs: byte-grouped zstd round trips and ratios on weights drawn like trained ones."""

from __future__ import annotations

import struct
from typing import Any

import numpy as np
import pytest
import torch
import zstandard

from flashckpt.errors import ConfigError, CorruptCheckpointError
from flashckpt.transfer.codec import RAW, Compression, decode, encode, is_known


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
    for bad in ("gzip", "zstd:", "zstd:99", "zstd:x", 3, "zstd\n", "zstd:3\n"):
        with pytest.raises(ConfigError):
            Compression.parse(bad)  # type: ignore[arg-type]


def _frame(content_size: int, payload: bytes) -> bytes:
    """A zstd frame whose header declares ``content_size`` bytes, ``payload`` as a raw block."""
    header = b"\x28\xb5\x2f\xfd" + bytes([0xE0]) + struct.pack("<Q", content_size)
    return header + (1 | len(payload) << 3).to_bytes(3, "little") + payload


def _good(codec: str, n: int) -> bytes:
    data = bytes(range(256)) * (n // 256) + bytes(n % 256)
    got, stored = encode(memoryview(data), int(codec[7]) if "bg" in codec else 1, Compression(1))
    assert got == codec
    return bytes(stored)


BAD_INPUTS: list[Any] = [
    # a header that declares more than the chunk holds: the decompressor would allocate it
    pytest.param("zstd/1", _frame(1 << 40, b"abcd"), 4096, id="frame-declares-1TiB"),
    pytest.param("zstd/1", _frame(1 << 62, b"abcd"), 4096, id="frame-declares-2**62"),
    pytest.param("zstd/1", _frame(2**64 - 2, b"abcd"), 4096, id="frame-declares-2**64-2"),
    pytest.param("zstd/1", _frame(4097, b"a" * 4097), 4096, id="frame-declares-one-more"),
    pytest.param("zstd/1", _frame(4095, b"a" * 4095), 4096, id="frame-declares-one-less"),
    pytest.param("zstd/1", _frame(1 << 40, b""), 0, id="empty-chunk-frame-declares-1TiB"),
    pytest.param("zstd/1", b"", 4096, id="empty-stored"),
    pytest.param("zstd/1", b"\x28\xb5\x2f\xfd", 4096, id="magic-only"),
    pytest.param("zstd/1", b"\x50\x2a\x4d\x18" + bytes(8), 4096, id="skippable-frame"),
    pytest.param("zstd/1", bytes(64), 4096, id="zeros"),
    pytest.param("zstd-bg2/1", _good("zstd-bg2/1", 4096), 4095, id="bg2-odd-size"),
    pytest.param("zstd-bg4/1", _good("zstd-bg4/1", 4096), 4094, id="bg4-size-not-multiple"),
    pytest.param("zstd-bg8/1", _good("zstd-bg8/1", 4096), 4092, id="bg8-size-not-multiple"),
    pytest.param("zstd-bg8/1", _good("zstd-bg8/1", 4096), 0, id="bg8-empty"),
    pytest.param("zstd/1", _good("zstd/1", 4096), 0, id="zstd-into-nothing"),
    pytest.param("zstd-bg3/1", _good("zstd/1", 4096), 4096, id="codec-bg3"),
    pytest.param("zstd/1\n", _good("zstd/1", 4096), 4096, id="codec-trailing-newline"),
    pytest.param(None, _good("zstd/1", 4096), 4096, id="codec-none"),
    pytest.param(["zstd/1"], _good("zstd/1", 4096), 4096, id="codec-list"),
    pytest.param("raw/1", b"abc", 4, id="raw-short"),
    pytest.param("raw/1", b"abcde", 4, id="raw-long"),
]


@pytest.mark.parametrize(("codec", "stored", "n"), BAD_INPUTS)
def test_decode_refuses_any_bad_input_with_corrupt_only(codec: Any, stored: bytes, n: int) -> None:
    with pytest.raises(CorruptCheckpointError):
        decode(codec, stored, memoryview(bytearray(n)))


@pytest.mark.parametrize("codec", ["zstd/1", "zstd-bg2/1", "zstd-bg4/1", "zstd-bg8/1"])
def test_decode_accepts_a_frame_without_a_declared_size(codec: str) -> None:
    data = bytes(range(256)) * 16
    group = int(codec[7]) if "bg" in codec else 1
    planes = np.ascontiguousarray(np.frombuffer(data, dtype=np.uint8).reshape(-1, group).T).tobytes()
    stored = zstandard.ZstdCompressor(write_content_size=False).compress(planes)
    out = bytearray(len(data))
    decode(codec, stored, memoryview(out))
    assert out == data
    with pytest.raises(CorruptCheckpointError):  # and the size still must match
        decode(codec, stored, memoryview(bytearray(len(data) + 8)))
