"""Coverage-guided fuzzing of the storage readers with atheris (libFuzzer).  By hand, not in CI.

    pip install atheris
    python -m tests.hostile.generate /tmp/corpus          # seeds: valid and hostile records
    python tests/fuzz/atheris_decode.py manifest /tmp/corpus/manifest -max_total_time=600
    python tests/fuzz/atheris_decode.py commit /tmp/corpus/commit -max_total_time=600
    python tests/fuzz/atheris_decode.py tree /tmp/corpus/tree -max_total_time=600
    python tests/fuzz/atheris_decode.py codec /tmp/corpus/codec -max_total_time=600

Targets: ``manifest`` (``decode_manifest``), ``commit`` (``decode_commit``), ``tree``
(``decode_tree`` of any JSON) and ``codec`` (``_codec.decode``).  Each must return or raise
``CorruptCheckpointError``; anything else is a crash, and libFuzzer keeps the input
(``crash-<sha1>``).  For the record targets, an input whose first byte is odd gets a valid
checksum trailer appended, so that the JSON parser and the validators see it (libFuzzer cannot
forge an xxh3-128); with an even first byte the input is taken as a whole record.  Run from
the repository root; flags after the target go to libFuzzer (``-help=1``).
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from pathlib import Path

import atheris

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # this checkout's flashckpt

with atheris.instrument_imports(include=["flashckpt"]):
    from flashckpt.errors import CorruptCheckpointError
    from flashckpt.format import checksum, decode_commit, decode_manifest, decode_tree
    from flashckpt.transfer.codec import decode as codec_decode

_TRAILER = b"\n#xxh3_128:"
_CODECS = ["raw/1", "zstd/1", "zstd-bg2/1", "zstd-bg4/1", "zstd-bg8/1", "zstd-bg3/1", "lz4/1"]


def _record(data: bytes) -> bytes:
    if data and data[0] & 1:
        body = data[1:]
        return body + _TRAILER + checksum(body).encode("ascii") + b"\n"
    return data[1:]


def manifest(data: bytes) -> None:
    try:
        m = decode_manifest(_record(data), "fuzz")
    except CorruptCheckpointError:
        return
    m.state_tree()  # what every reader does next


def commit(data: bytes) -> None:
    try:
        decode_commit(_record(data), "fuzz")
    except CorruptCheckpointError:
        return


def tree(data: bytes) -> None:
    try:
        node = json.loads(data[1:])
    except (ValueError, RecursionError):
        return  # decode_record turns these into CorruptCheckpointError before the tree
    try:
        decode_tree(node, data[0] % 5 if data else 0)
    except CorruptCheckpointError:
        return


def codec(data: bytes) -> None:
    """Input: a codec (byte 0, an index into ``_CODECS``), the chunk's size (bytes 1-2, little
    endian), then the stored bytes."""
    if len(data) < 3:
        return
    name = _CODECS[data[0] % len(_CODECS)]
    out = bytearray(int.from_bytes(data[1:3], "little"))
    try:
        codec_decode(name, data[3:], memoryview(out))
    except CorruptCheckpointError:
        return


TARGETS: dict[str, Callable[[bytes], None]] = {
    "manifest": manifest,
    "commit": commit,
    "tree": tree,
    "codec": codec,
}


def main() -> None:
    if len(sys.argv) < 2 or sys.argv[1] not in TARGETS:
        sys.exit(f"usage: {sys.argv[0]} {{{','.join(TARGETS)}}} [corpus_dir] [libFuzzer flags]")
    target = TARGETS[sys.argv[1]]
    atheris.Setup([sys.argv[0], *sys.argv[2:]], target)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
