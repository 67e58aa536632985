"""State walk: flatten a training state into tensors + a safe tree, and load it back in place.

A state is a nest of dicts, lists and tuples whose leaves are tensors, plain values, or
``Stateful`` objects (anything with ``state_dict()`` and ``load_state_dict()``: modules,
optimizers, LR schedulers, ``torch.distributed.checkpoint.stateful.Stateful``).

Called on the training thread only.  Flattening does not copy tensor data.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Iterator, Mapping, MutableMapping
from dataclasses import dataclass
from typing import Any

import torch

from flashckpt.errors import StateMismatchError, UnsupportedStateError
from flashckpt.format import DTYPE_NAMES, DTensorRef, StatefulRecord, TensorRef, encode_tree


@dataclass
class FlatState:
    """A flattened state: ``tensors[i]`` is referenced by ``TensorRef(i)`` in ``tree``."""

    tree: Any  # JSON nodes (format.encode_tree output)
    tensors: list[torch.Tensor]
    paths: list[str]


def is_stateful(obj: Any) -> bool:
    return (
        not isinstance(obj, (torch.Tensor, dict, list, tuple))
        and callable(getattr(obj, "state_dict", None))
        and callable(getattr(obj, "load_state_dict", None))
    )


def _join(path: str, key: Any) -> str:
    return f"{path}.{key}" if path else str(key)


def flatten(state: Any) -> FlatState:
    """Walk ``state``; return its tree and the tensors it references (not copied).

    Exact duplicates (same storage, offset, shape, strides and dtype, e.g. tied weights) are
    stored once and referenced twice.  Raises :class:`UnsupportedStateError` naming the path of
    the first object that cannot be saved.
    """
    f = _Flattener()
    flat_tree = f.walk(state, "", 0)
    try:
        tree = encode_tree(flat_tree)
    except TypeError as exc:
        path, _, detail = str(exc).partition(": ")
        raise UnsupportedStateError(path if path != "<root>" else "", detail) from None
    return FlatState(tree, f.tensors, f.paths)


class _Flattener:
    """One walk of :func:`flatten`: the tensors found so far, each exact duplicate once."""

    def __init__(self) -> None:
        self.tensors: list[torch.Tensor] = []
        self.paths: list[str] = []
        self._seen: dict[tuple[Any, ...], int] = {}

    def walk(self, obj: Any, path: str, depth: int) -> Any:
        """``obj`` with every tensor replaced by its reference, every ``Stateful`` by a record."""
        if depth > 90:
            raise UnsupportedStateError(path, "state nested too deeply (or a reference cycle)")
        if is_dtensor(obj):
            return self.dtensor(obj, path)
        if isinstance(obj, torch.Tensor):
            return self.tensor(obj, path)
        if isinstance(obj, dict):
            out: dict[Any, Any] = OrderedDict() if isinstance(obj, OrderedDict) else {}
            if getattr(obj, "_metadata", None) is not None:
                out = OrderedDict()
                out._metadata = obj._metadata  # type: ignore[attr-defined]
            for k, v in obj.items():
                out[k] = self.walk(v, _join(path, k), depth + 1)
            return out
        if type(obj) is list:
            return [self.walk(v, _join(path, i), depth + 1) for i, v in enumerate(obj)]
        if type(obj) is tuple:
            return tuple(self.walk(v, _join(path, i), depth + 1) for i, v in enumerate(obj))
        if is_stateful(obj):
            try:
                sd = obj.state_dict()
            except Exception as exc:
                raise UnsupportedStateError(
                    path, f"state_dict() of {type(obj).__qualname__} failed: {exc}"
                ) from exc
            kind = f"{type(obj).__module__}.{type(obj).__qualname__}"
            return StatefulRecord(kind, self.walk(sd, path, depth + 1))
        return obj

    def tensor(self, t: torch.Tensor, path: str) -> TensorRef:
        _check_tensor(t, path)
        t = t.detach()
        key = None
        if t.numel() > 0:
            key = (
                t.device,
                t.untyped_storage().data_ptr(),
                t.storage_offset(),
                t.shape,
                t.stride(),
                t.dtype,
                t.is_conj(),
                t.is_neg(),
            )
            if key in self._seen:
                return TensorRef(self._seen[key])
        self.tensors.append(t)
        self.paths.append(path)
        if key is not None:
            self._seen[key] = len(self.tensors) - 1
        return TensorRef(len(self.tensors) - 1)

    def dtensor(self, t: Any, path: str) -> DTensorRef:
        from torch.distributed.tensor import Replicate, Shard
        from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

        placements = []
        for p in t.placements:
            if type(p) is Shard:
                placements.append(f"S{p.dim}")
            elif type(p) is Replicate:
                placements.append("R")
            else:
                raise UnsupportedStateError(
                    path, f"DTensor placement {p} is not supported (Shard and Replicate are)"
                )
        _, offset = compute_local_shape_and_global_offset(t.shape, t.device_mesh, t.placements)
        ref = self.tensor(t.to_local(), path)
        return DTensorRef(
            ref.index,
            tuple(int(d) for d in t.shape),
            tuple(int(o) for o in offset),
            tuple(placements),
            tuple(int(d) for d in t.device_mesh.shape),
        )


def is_dtensor(obj: Any) -> bool:
    """A ``torch.distributed.tensor.DTensor`` (without importing torch.distributed for others)."""
    if not isinstance(obj, torch.Tensor) or type(obj).__name__ != "DTensor":
        return False
    from torch.distributed.tensor import DTensor

    return isinstance(obj, DTensor)


def _check_tensor(t: torch.Tensor, path: str) -> None:
    if t.layout != torch.strided:
        raise UnsupportedStateError(path, f"tensor layout {t.layout} is not supported (dense only)")
    if t.is_quantized:
        raise UnsupportedStateError(path, "quantized tensors are not supported")
    if t.is_nested:
        raise UnsupportedStateError(path, "nested tensors are not supported")
    if t.device.type == "meta":
        raise UnsupportedStateError(path, "meta tensors have no data to save")
    if t.dtype not in DTYPE_NAMES:
        raise UnsupportedStateError(path, f"dtype {t.dtype} cannot be stored")


# --------------------------------------------------------------------------------------------
# loading

Materialize = Callable[[int, "torch.Tensor | None"], torch.Tensor]


class _Loader:
    """Applies a decoded tree to a live state.  ``materialize(i, target)`` returns tensor ``i``
    copied into ``target`` when compatible, else a fresh tensor (never a view of staging)."""

    def __init__(
        self,
        materialize: Materialize,
        *,
        in_place: bool,
        fill_dtensor: Callable[[str, Any], None] | None = None,
        build_dtensor: Callable[[str, DTensorRef], torch.Tensor] | None = None,
    ) -> None:
        self._materialize = materialize
        self._fresh: dict[int, torch.Tensor] = {}
        self._in_place = in_place
        self._fill_dtensor = fill_dtensor
        self._build_dtensor = build_dtensor

    def dtensor(self, ref: DTensorRef, target: Any, path: str) -> Any:
        """A DTensor shard: copied into the live DTensor's local tensor (or, with
        ``fill_dtensor``, filled by it: resharding).  Building a fresh state (``in_place``
        False) gives ``build_dtensor(path, ref)``, by default the local shard as a plain tensor."""
        if not self._in_place:
            if self._build_dtensor is not None:
                return self._build_dtensor(path, ref)
            return self.tensor(TensorRef(ref.index), None)
        if not is_dtensor(target):
            raise StateMismatchError(
                f"{path or '<root>'}: the checkpoint holds a DTensor shard here, the state has "
                f"{type(target).__qualname__}; build the sharded state first (e.g. with "
                "torch.distributed.checkpoint.state_dict.get_state_dict) and restore into it"
            )
        if self._fill_dtensor is not None:
            self._fill_dtensor(path, target)
            return target
        local = target.to_local()
        got = self._materialize(ref.index, local)
        if got is not local:
            raise StateMismatchError(
                f"{path or '<root>'}: the live DTensor's local shard is {tuple(local.shape)} "
                f"{local.dtype}, the checkpoint's is {tuple(got.shape)} {got.dtype} (placements "
                f"{list(ref.placements)} on a {list(ref.mesh)} mesh): the sharding changed"
            )
        return target

    def tensor(self, ref: TensorRef, target: Any) -> torch.Tensor:
        if isinstance(target, torch.Tensor):
            return self._materialize(ref.index, target)
        if ref.index not in self._fresh:
            self._fresh[ref.index] = self._materialize(ref.index, None)
        return self._fresh[ref.index]

    def value(self, current: Any, node: Any, path: str, exact: bool) -> Any:
        """Return the loaded value for ``node``; ``current`` is updated in place when possible.

        ``exact``: build containers with exactly the saved keys (inside a ``Stateful``), instead
        of updating the user's own containers and keeping keys the checkpoint does not have.
        """
        if isinstance(node, TensorRef):
            return self.tensor(node, current)
        if isinstance(node, DTensorRef):
            return self.dtensor(node, current, path)
        if isinstance(node, StatefulRecord):
            if is_stateful(current):
                sd = self.value(current.state_dict(), node.state, path, exact=True)
                try:
                    current.load_state_dict(sd)
                except Exception as exc:
                    raise StateMismatchError(
                        f"{path or '<root>'}: {type(current).__qualname__}.load_state_dict "
                        f"rejected the checkpoint: {exc}"
                    ) from exc
                return current
            return self.value(None, node.state, path, exact=True)
        if isinstance(node, dict):
            return self._dict(current, node, path, exact)
        if isinstance(node, list):
            return self._list(current, node, path, exact)
        if isinstance(node, torch.Size):  # a tuple subclass, but a plain value
            return node
        if isinstance(node, tuple):
            old_t = current if isinstance(current, tuple) and len(current) == len(node) else None
            items = [
                self.value(old_t[i] if old_t is not None else None, v, _join(path, i), exact)
                for i, v in enumerate(node)
            ]
            if old_t is not None and all(a is b for a, b in zip(items, old_t, strict=True)):
                return old_t
            return tuple(items)
        return node

    def _dict(self, current: Any, node: dict[Any, Any], path: str, exact: bool) -> Any:
        if not exact and isinstance(current, MutableMapping):
            for k, v in node.items():
                old = current.get(k)
                new = self.value(old, v, _join(path, k), exact)
                if new is not old or k not in current:
                    current[k] = new
            return current
        base = current if isinstance(current, dict) else {}
        out: dict[Any, Any] = type(node)()
        if getattr(node, "_metadata", None) is not None:
            out._metadata = node._metadata  # type: ignore[attr-defined]
        for k, v in node.items():
            out[k] = self.value(base.get(k), v, _join(path, k), exact)
        return out

    def _list(self, current: Any, node: list[Any], path: str, exact: bool) -> Any:
        old_list = current if isinstance(current, list) else None
        items = [
            self.value(
                old_list[i] if old_list is not None and i < len(old_list) else None,
                v,
                _join(path, i),
                exact,
            )
            for i, v in enumerate(node)
        ]
        if not exact and old_list is not None:
            old_list[:] = items
            return old_list
        return items


def _pairs(
    state: Any, tree: Any, on_stateful: Callable[[Any, Any, Any, str], None] | None = None
) -> Iterator[tuple[str, Any, TensorRef | DTensorRef]]:
    """The dry walk of a live ``state`` against a saved ``tree``, as :func:`load_into` would
    pair them: yields ``(path, live value, tensor or DTensor reference)`` for each saved
    tensor whose place the state has.  Nothing is mutated and no ``load_state_dict`` runs:
    a ``Stateful`` is looked into through ``state_dict()`` (shown to ``on_stateful(obj,
    live state dict, saved state, path)`` first)."""

    def walk(current: Any, node: Any, path: str) -> Iterator[tuple[str, Any, TensorRef | DTensorRef]]:
        if isinstance(node, (TensorRef, DTensorRef)):
            yield path, current, node
        elif isinstance(node, StatefulRecord):
            if is_stateful(current):
                live = current.state_dict()
                if on_stateful is not None:
                    on_stateful(current, live, node.state, path or "<root>")
                yield from walk(live, node.state, path)
        elif isinstance(node, dict):
            if isinstance(current, Mapping):
                for k, v in node.items():
                    yield from walk(current.get(k), v, _join(path, k))
        elif (
            isinstance(node, (list, tuple))
            and not isinstance(node, torch.Size)
            and isinstance(current, (list, tuple))
            and len(current) == len(node)
        ):
            for i, (c, v) in enumerate(zip(current, node, strict=True)):
                yield from walk(c, v, _join(path, i))

    return walk(state, tree, "")


def find_targets(
    state: Any, tree: Any, accept: Callable[[int, torch.Tensor], bool]
) -> dict[int, torch.Tensor]:
    """The live tensors that ``load_into`` would copy saved tensor ``i`` into, for each ``i``
    where ``accept(i, tensor)``.  A dry walk (:func:`_pairs`)."""
    found: dict[int, torch.Tensor] = {}
    for _, current, node in _pairs(state, tree):
        if node.index in found:
            continue
        if isinstance(node, DTensorRef):
            if is_dtensor(current) and accept(node.index, local := current.to_local()):
                found[node.index] = local
        elif isinstance(current, torch.Tensor) and accept(node.index, current):
            found[node.index] = current
    return found


TensorMeta = Callable[[int], "tuple[torch.dtype, tuple[int, ...]]"]


def check_loadable(state: Any, tree: Any, meta: TensorMeta, *, resharding: bool = False) -> list[str]:
    """A dry run of :func:`load_into`: raise :class:`StateMismatchError` for anything that
    would make loading ``tree`` into ``state`` fail halfway, before a byte is written.

    Checked: the state is a mapping; a DTensor shard goes into a live DTensor with the same
    local shape and dtype (unless ``resharding``); a module's ``load_state_dict`` gets exactly
    its keys with its shapes (what the default ``strict=True`` demands); an optimizer gets
    as many parameter groups, each with as many parameters, as it has.  ``meta(i)`` gives
    saved tensor ``i``'s dtype and shape.  Returns the paths of plain tensors that will be
    replaced instead of filled in place (their shape or dtype changed), for the caller to log.
    Training thread; nothing is mutated (``Stateful`` objects are read through ``state_dict``).
    """
    if not isinstance(state, MutableMapping):
        raise StateMismatchError(f"restore needs a dict-like state, got {type(state).__qualname__}")
    replaced: list[str] = []

    def stateful(obj: Any, live: Any, saved: Any, where: str) -> None:
        _check_stateful(obj, live, saved, where, meta)

    for path, current, node in _pairs(state, tree, stateful):
        where = path or "<root>"
        if isinstance(node, TensorRef):
            if isinstance(current, torch.Tensor) and (current.dtype, tuple(current.shape)) != meta(
                node.index
            ):
                replaced.append(where)
            continue
        if not is_dtensor(current):
            raise StateMismatchError(
                f"{where}: the checkpoint holds a DTensor shard here, the state has "
                f"{type(current).__qualname__}; build the sharded state first and restore into it"
            )
        local = current.to_local()
        if not resharding and (local.dtype, tuple(local.shape)) != meta(node.index):
            dtype, shape = meta(node.index)
            raise StateMismatchError(
                f"{where}: the live DTensor's local shard is {tuple(local.shape)} {local.dtype}, "
                f"the checkpoint's is {shape} {dtype}: the sharding changed"
            )
    return replaced


def _check_stateful(obj: Any, live: Any, saved: Any, where: str, meta: TensorMeta) -> None:
    """What ``load_state_dict`` of common torch objects would refuse, found before loading."""
    name = type(obj).__qualname__
    if isinstance(obj, torch.nn.Module) and isinstance(live, Mapping) and isinstance(saved, Mapping):
        missing, unexpected = sorted(set(live) - set(saved)), sorted(set(saved) - set(live))
        if missing or unexpected:
            raise StateMismatchError(
                f"{where}: {name}.load_state_dict would refuse the checkpoint: missing keys "
                f"{missing[:5]}, unexpected keys {unexpected[:5]}"
            )
        for k, node in saved.items():
            t = live[k]
            if isinstance(node, TensorRef) and isinstance(t, torch.Tensor):
                shape = meta(node.index)[1]
                if tuple(t.shape) != shape:
                    raise StateMismatchError(
                        f"{where}.{k}: {name}.load_state_dict would refuse the checkpoint: size "
                        f"mismatch, the checkpoint's is {list(shape)}, the model's {list(t.shape)}"
                    )
    elif isinstance(obj, torch.optim.Optimizer) and isinstance(live, Mapping) and isinstance(saved, Mapping):

        def sizes(sd: Mapping[Any, Any]) -> list[int]:
            groups = sd.get("param_groups")
            if not isinstance(groups, list):
                return []
            return [len(g.get("params", [])) if isinstance(g, Mapping) else -1 for g in groups]

        if sizes(live) != sizes(saved):
            raise StateMismatchError(
                f"{where}: {name}.load_state_dict would refuse the checkpoint: parameter groups "
                f"of sizes {sizes(saved)} saved, {sizes(live)} now"
            )


def load_into(
    state: Any, tree: Any, materialize: Materialize, *, fill_dtensor: Callable[[str, Any], None] | None = None
) -> None:
    """Load a decoded tree into ``state`` in place.  ``state`` must be a mutable mapping.
    ``fill_dtensor(path, live_dtensor)`` replaces the shard copy for DTensors (resharding)."""
    if not isinstance(state, MutableMapping):
        raise StateMismatchError(f"restore needs a dict-like state, got {type(state).__qualname__}")
    with torch.no_grad():
        _Loader(materialize, in_place=True, fill_dtensor=fill_dtensor).value(state, tree, "", exact=False)


def build(
    tree: Any, materialize: Materialize, *, dtensor: Callable[[str, DTensorRef], torch.Tensor] | None = None
) -> Any:
    """Build a fresh state from a decoded tree (``Stateful`` entries become their state dicts).
    ``dtensor(path, ref)`` gives the value of a DTensor (default: its local shard)."""
    with torch.no_grad():
        return _Loader(materialize, in_place=False, build_dtensor=dtensor).value(None, tree, "", exact=True)
