"""Write every hostile case of ``cases.py`` to a folder, for inspection or as a fuzzing corpus.

    python -m tests.hostile.generate OUT

``OUT/records/<case>.manifest[-r<rank>]`` and ``OUT/records/<case>.commit`` are the bytes a
reader finds on storage for the hostile step (both records of every case: one of them is the
hostile one, see ``Case.refused_by``), and ``OUT/records/valid.*`` the intact step they were
made from.  ``OUT/manifest/``, ``OUT/commit/``, ``OUT/tree/`` and ``OUT/codec/`` hold seeds
for the targets of ``tests/fuzz/atheris_decode.py`` in its input formats (records: a first
byte, then the record; an odd first byte followed by the JSON body alone asks the harness to
append a valid trailer; trees: a byte, then JSON; chunks: codec index, size, stored bytes).
Nothing is kept but the output folder: the checkpoint the cases start from is saved to a
temporary directory and removed.
"""

from __future__ import annotations

import json
import shutil
import sys
import tempfile
import uuid
from pathlib import Path
from typing import Any

import flashckpt
from flashckpt.format import commit_key, manifest_key
from tests.conftest import SHM
from tests.hostile.cases import CASES
from tests.hostile.tree import Step, state_for

_TRAILER = b"\n#xxh3_128:"
#: The codec ids in the order of ``tests/fuzz/atheris_decode.py``'s ``_CODECS``.
CODECS = ["raw/1", "zstd/1", "zstd-bg2/1", "zstd-bg4/1", "zstd-bg8/1", "zstd-bg3/1", "lz4/1"]


def _seed(folder: Path, name: str, raw: bytes) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / name).write_bytes(b"\x00" + raw)
    if _TRAILER in raw:
        (folder / f"{name}.body").write_bytes(b"\x01" + raw[: raw.rindex(_TRAILER)])


def _save(root: Path, step: Step, name: str, out: Path) -> None:
    records = out / "records"
    records.mkdir(parents=True, exist_ok=True)
    world = len(step.manifests)
    for rank in range(world):
        raw = (root / manifest_key(step.step, rank, world)).read_bytes()
        suffix = "" if world == 1 else f"-r{rank}"
        (records / f"{name}.manifest{suffix}").write_bytes(raw)
        _seed(out / "manifest", f"{name}{suffix}", raw)
        try:
            body = json.loads(raw[: raw.rindex(_TRAILER)])
        except ValueError:  # a torn or damaged record: no tree or chunks to seed from
            body = None
        if isinstance(body, dict) and "tree" in body:  # seeds for the tree target: byte 0, JSON
            (out / "tree").mkdir(parents=True, exist_ok=True)
            (out / "tree" / f"{name}{suffix}").write_bytes(b"\x05" + json.dumps(body["tree"]).encode())
        for i, c in enumerate(body.get("chunks", []) if isinstance(body, dict) else []):
            _codec_seed(root, out / "codec", f"{name}{suffix}-{i}", c)
    raw = (root / commit_key(step.step)).read_bytes()
    (records / f"{name}.commit").write_bytes(raw)
    _seed(out / "commit", name, raw)


def _codec_seed(root: Path, folder: Path, name: str, chunk: Any) -> None:
    """A chunk as a seed for the codec target: codec index, size (2 bytes), stored bytes."""
    try:
        key, at, _offset, nbytes, stored, codec, _digest = chunk
        blob = (root / key).read_bytes()[at : at + stored]
        index = CODECS.index(codec)
    except (ValueError, TypeError, OSError):
        return  # a hostile entry that names no readable chunk
    folder.mkdir(parents=True, exist_ok=True)
    (folder / name).write_bytes(bytes([index]) + min(nbytes, 0xFFFF).to_bytes(2, "little") + blob)


def generate(out: Path) -> int:
    """Write the folder; returns the number of cases written."""
    with tempfile.TemporaryDirectory() as tmp:
        base = Path(tmp) / "storage"
        memory = (SHM or Path(tmp)) / f"flashckpt-generate-{uuid.uuid4().hex[:12]}"
        try:
            with flashckpt.Checkpointer(base, memory_dir=memory, keep=None) as ckpt:
                ckpt.save(2, state_for(2))
        finally:
            shutil.rmtree(memory, ignore_errors=True)
        _save(base, Step(base, 2), "valid", out)
        for case in CASES:
            root = Path(tmp) / case.name
            shutil.copytree(base, root)
            step = Step(root, 2)
            case.apply(step)
            step.write()
            _save(root, step, case.name, out)
            shutil.rmtree(root)
    return len(CASES)


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit(f"usage: python -m {__spec__.name if __spec__ else 'tests.hostile.generate'} OUT")
    n = generate(Path(sys.argv[1]))
    print(f"{n} hostile cases written to {sys.argv[1]}")
