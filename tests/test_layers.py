"""The parts of the engine and the imports that must never exist between them.

Every module of ``flashckpt/`` belongs to one part of the architecture (docs/architecture.md;
``../shared/architecture.json`` is where the parts and the forbidden arrows were first written
down), or is a leaf every part may use.  An import from one part to another that the
architecture forbids fails here, and so does a module that belongs to no part (a new module
must say where it stands).  Imports are read with ``ast``: nothing is imported or run.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PKG = ROOT / "flashckpt"

#: module (dotted, or a package prefix ending in ".") -> part
PARTS: dict[str, str] = {
    "flashckpt": "Face",
    "flashckpt.checkpointer": "Face",
    "flashckpt._load": "Face",
    "flashckpt.catalog": "Face",
    "flashckpt.maintenance": "Face",
    "flashckpt.rng": "Face",
    "flashckpt.cli": "CLI",
    "flashckpt.cli.": "CLI",
    "flashckpt.integrations": "Integrations",
    "flashckpt.integrations.": "Integrations",
    "flashckpt.coordination": "Coordination",
    "flashckpt.coordination.": "Coordination",
    "flashckpt.replication": "Replication",
    "flashckpt.replication.": "Replication",
    "flashckpt.staging": "Staging",
    "flashckpt.staging.": "Staging",
    "flashckpt.transfer": "Transfer",
    "flashckpt.transfer.": "Transfer",
    "flashckpt.format": "Format",
    "flashckpt.format.": "Format",
    "flashckpt.storage": "Storage",
    "flashckpt.storage.": "Storage",
    "flashckpt.testing": "Testing",  # the conformance suite shipped for backend authors
    "flashckpt.testing.": "Testing",
    "flashckpt.backends": "Backends",  # the package also re-exports the storage protocol
    "flashckpt.backends.": "Backends",
}

#: modules any part may import: errors, options, the event seam, file-safety helpers, the
#: process-group control
LEAVES = {
    "flashckpt.errors",
    "flashckpt._config",
    "flashckpt._hooks",
    "flashckpt._secure",
    "flashckpt._dist",
    "flashckpt._platform",
}

#: (from, to, why): the arrows that must never exist (architecture.json's "never")
NEVER = [
    ("Backends", "Transfer", "backends see bytes and keys, never codecs or retries"),
    ("Format", "Storage", "the format is pure: no I/O"),
    ("Staging", "Transfer", "staging is a memory copy; it never does I/O"),
    ("Storage", "Coordination", "dependencies point down"),
    ("Backends", "Face", "dependencies point down"),
]


def _module_name(path: Path) -> str:
    rel = path.relative_to(ROOT).with_suffix("")
    parts = list(rel.parts)
    if parts[0] == "backends":  # the directory imported as flashckpt.backends
        parts.insert(0, "flashckpt")
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def part_of(module: str) -> str | None:
    """The part a ``flashckpt`` module belongs to; None for a leaf; KeyError if unplaced."""
    if module in LEAVES:
        return None
    if module in PARTS:
        return PARTS[module]
    prefixes = [p for p in PARTS if p.endswith(".") and module.startswith(p)]
    if prefixes:
        return PARTS[max(prefixes, key=len)]
    raise KeyError(module)


def imports_of(path: Path, module: str | None = None) -> set[str]:
    """The ``flashckpt`` modules ``path`` (module ``module``, by default the one at that
    path) imports: ``from a import b`` counts ``a.b`` when that is a module, else ``a``; at
    any depth of the file (a function-level import is an arrow too)."""
    tree = ast.parse(path.read_text(encoding="utf-8"), str(path))
    me = module or _module_name(path)
    is_pkg = path.name == "__init__.py"
    out: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names if a.name.split(".")[0] == "flashckpt")
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = me.split(".") if is_pkg else me.split(".")[:-1]
                base = base[: len(base) - (node.level - 1)]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            if mod.split(".")[0] != "flashckpt":
                continue
            for a in node.names:
                sub = f"{mod}.{a.name}"
                where = ROOT / Path(*sub.split("."))
                known = where.with_suffix(".py").exists() or (where / "__init__.py").exists()
                out.add(sub if known else mod)
    return out


def _modules() -> list[Path]:
    """Every module of the package, the backends directory too (``flashckpt/backends`` is a
    link to it, which ``rglob`` does not follow)."""
    return sorted([*PKG.rglob("*.py"), *(ROOT / "backends").rglob("*.py")])


def test_every_module_belongs_to_a_part() -> None:
    unplaced = []
    for path in _modules():
        try:
            part_of(_module_name(path))
        except KeyError:
            unplaced.append(_module_name(path))
    assert not unplaced, f"modules that belong to no part (add them to PARTS or LEAVES): {unplaced}"


def test_no_forbidden_arrow() -> None:
    bad = []
    for path in _modules():
        src = part_of(_module_name(path))
        for mod in imports_of(path):
            dst = part_of(mod)
            for a, b, why in NEVER:
                if (src, dst) == (a, b):
                    bad.append(f"{_module_name(path)} -> {mod}: {a} -> {b} ({why})")
    assert not bad, "\n".join(bad)


@pytest.mark.parametrize(
    ("source", "as_module", "forbidden"),
    [
        ("from flashckpt.transfer.writer import ChunkWriter\n", "flashckpt.backends.local", True),
        ("def f():\n    from flashckpt.transfer import store\n", "flashckpt.backends.local", True),
        ("import flashckpt.checkpointer\n", "flashckpt.backends.fsspec", True),
        ("from ..transfer import codec\n", "flashckpt.backends.fsspec", True),
        ("from flashckpt.coordination import inventory\n", "flashckpt.storage.registry", True),
        ("from flashckpt.errors import ConfigError\n", "flashckpt.backends.local", False),
        ("from flashckpt.storage.protocol import Backend\n", "flashckpt.format", True),
        ("from flashckpt.format import checksum\n", "flashckpt.staging.stager", False),
        ("from flashckpt.transfer import codec\n", "flashckpt.staging.memory_tier", True),
    ],
)
def test_the_checker_sees_a_forbidden_import(
    tmp_path: Path, source: str, as_module: str, forbidden: bool
) -> None:
    """The checker itself: an import planted in a stand-in for a module of a given part is
    caught, or not, as the table says."""
    planted = tmp_path / ("__init__.py" if (ROOT / Path(*as_module.split("."))).is_dir() else "x.py")
    planted.write_text(source)
    src = part_of(as_module)
    found = [
        (a, b) for mod in imports_of(planted, as_module) for a, b, _ in NEVER if (src, part_of(mod)) == (a, b)
    ]
    assert bool(found) == forbidden, (source, as_module, found)


#: parts that see the engine only through its public face (and the format, and the leaves)
FACE_ONLY = {"CLI": {"Face", "Format"}, "Integrations": {"Face", "Format"}}


def test_the_cli_and_the_integrations_use_only_the_public_face() -> None:
    bad = []
    for path in _modules():
        src = part_of(_module_name(path))
        if src not in FACE_ONLY:
            continue
        for mod in imports_of(path):
            dst = part_of(mod)
            if dst is not None and dst != src and dst not in FACE_ONLY[src]:
                bad.append(f"{_module_name(path)} -> {mod} ({dst})")
    assert not bad, "\n".join(bad)


def part_graph() -> dict[str, set[str]]:
    """part -> the other parts its modules import (leaves left out)."""
    graph: dict[str, set[str]] = {}
    for path in _modules():
        src = part_of(_module_name(path))
        if src is None:
            continue
        for mod in imports_of(path):
            dst = part_of(mod)
            if dst is not None and dst != src:
                graph.setdefault(src, set()).add(dst)
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle of ``graph`` (its nodes in order, the first repeated at the end), or None."""
    state: dict[str, int] = {}  # 1: on the path, 2: done
    path: list[str] = []

    def visit(n: str) -> list[str] | None:
        state[n] = 1
        path.append(n)
        for m in sorted(graph.get(n, ())):
            if state.get(m) == 1:
                return [*path[path.index(m) :], m]
            if m not in state and (found := visit(m)):
                return found
        path.pop()
        state[n] = 2
        return None

    for n in sorted(graph):
        if n not in state and (found := visit(n)):
            return found
    return None


def test_the_cycle_finder() -> None:
    assert find_cycle({"a": {"b"}, "b": {"c"}}) is None
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": {"b", "c"}}) == ["b", "b"]


def test_no_cycle_between_parts() -> None:
    cycle = find_cycle(part_graph())
    assert cycle is None, " -> ".join(cycle or [])


def test_every_package_is_installed() -> None:
    """A package missing from pyproject's list works from a checkout and is missing from a
    wheel: every directory of the package with an ``__init__.py`` is listed."""
    import tomllib

    listed = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    found = {
        ".".join(p.parent.relative_to(ROOT).parts)
        for p in PKG.rglob("__init__.py")
        if "__pycache__" not in p.parts
    } | {"flashckpt.backends"}
    assert found <= listed, f"add to [tool.setuptools] packages: {sorted(found - listed)}"
