"""The on-storage format: manifests, commit records, the state tree, and storage keys.

Everything read from storage passes through :func:`decode_manifest` or :func:`decode_commit`,
which validate every field against hard limits before anything else trusts it.  Nothing here
unpickles: the state tree is JSON with a small tag vocabulary.  See ``docs/format.md``.

One module per kind of thing, each importing only those before it:

* :mod:`~flashckpt.format.keys`: the key grammar (every object's name, :func:`check_key`);
* :mod:`~flashckpt.format.record`: the framing every record shares (JSON body, checksum
  trailer, version) and the hard parser limits;
* :mod:`~flashckpt.format.tree`: the state tree codec and the dtype names;
* :mod:`~flashckpt.format.manifest`: manifests, and the memory tier's view of them;
* :mod:`~flashckpt.format.commit`: commit records and the run record.

The package does no I/O: pure functions and frozen dataclasses only; safe to call from any
thread.  Every public name is re-exported here (``from flashckpt.format import X``).  Each
module binds the limits it uses when it is imported: lowering one (as tests do) means setting
it on every format module that holds it (``tests/conftest.py``, ``set_format_limit``).
"""

from __future__ import annotations

from flashckpt.format.commit import (
    COMMIT_FORMAT,
    RUN_FORMAT,
    CommitRecord,
    decode_commit,
    decode_run,
    encode_commit,
    encode_run,
)
from flashckpt.format.keys import (
    CHUNKS_PREFIX,
    CODEC_PATTERN,
    CODEC_RAW,
    MAX_KEY_CHARS,
    RUN_KEY,
    SHARD_PATTERN,
    SLOT_NAMES,
    check_key,
    chunk_key,
    commit_key,
    manifest_key,
    memory_manifest_key,
    parse_chunk_key,
    parse_commit_key,
    parse_manifest_key,
    parse_memory_manifest_key,
    parse_step_prefix,
    shard_name,
    step_prefix,
)
from flashckpt.format.manifest import (
    MANIFEST_FORMAT,
    UNSEALED,
    ChunkEntry,
    Manifest,
    TensorEntry,
    carried,
    check_memory_manifest,
    decode_manifest,
    encode_manifest,
    memory_manifest,
    part_holders,
)
from flashckpt.format.record import (
    FORMAT_VERSION,
    MAX_ANCESTORS,
    MAX_CHUNKS,
    MAX_CREATED_UNIX,
    MAX_GENERATION,
    MAX_INT_BITS,
    MAX_MESH_CELLS,
    MAX_NDIM,
    MAX_RECORD_BYTES,
    MAX_STEP,
    MAX_TENSORS,
    MAX_TOTAL_BYTES,
    MAX_TREE_DEPTH,
    MAX_WORLD,
    checksum,
    decode_record,
    encode_record,
    now,
)
from flashckpt.format.tree import (
    DTYPE_NAMES,
    DTYPES,
    DTensorRef,
    StatefulRecord,
    TensorRef,
    decode_tree,
    encode_key,
    encode_tree,
    shape_extent,
    tensor_nbytes,
    tree_leaves,
)

__all__ = [
    # keys
    "CHUNKS_PREFIX",
    "CODEC_PATTERN",
    "CODEC_RAW",
    "MAX_KEY_CHARS",
    "RUN_KEY",
    "SHARD_PATTERN",
    "SLOT_NAMES",
    "check_key",
    "chunk_key",
    "commit_key",
    "manifest_key",
    "memory_manifest_key",
    "parse_chunk_key",
    "parse_commit_key",
    "parse_manifest_key",
    "parse_memory_manifest_key",
    "parse_step_prefix",
    "shard_name",
    "step_prefix",
    # record
    "FORMAT_VERSION",
    "MAX_ANCESTORS",
    "MAX_CHUNKS",
    "MAX_CREATED_UNIX",
    "MAX_GENERATION",
    "MAX_INT_BITS",
    "MAX_MESH_CELLS",
    "MAX_NDIM",
    "MAX_RECORD_BYTES",
    "MAX_STEP",
    "MAX_TENSORS",
    "MAX_TOTAL_BYTES",
    "MAX_TREE_DEPTH",
    "MAX_WORLD",
    "checksum",
    "decode_record",
    "encode_record",
    "now",
    # tree
    "DTYPES",
    "DTYPE_NAMES",
    "DTensorRef",
    "StatefulRecord",
    "TensorRef",
    "decode_tree",
    "encode_key",
    "encode_tree",
    "shape_extent",
    "tensor_nbytes",
    "tree_leaves",
    # manifest
    "MANIFEST_FORMAT",
    "UNSEALED",
    "ChunkEntry",
    "Manifest",
    "TensorEntry",
    "check_memory_manifest",
    "carried",
    "part_holders",
    "decode_manifest",
    "encode_manifest",
    "memory_manifest",
    # commit
    "COMMIT_FORMAT",
    "RUN_FORMAT",
    "CommitRecord",
    "decode_commit",
    "decode_run",
    "encode_commit",
    "encode_run",
]
