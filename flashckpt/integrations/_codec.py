"""The allow-listed encoding of the Python objects a framework's checkpoint dict carries
beyond what flashckpt's state format holds natively.  Never pickle.

flashckpt's format holds tensors, dicts (``OrderedDict`` kept, with a state dict's
``_metadata``), lists, tuples, sets, int/float (inf, nan)/str/bytes/bool/None keys and
values, ``torch.dtype``/``device``/``Size``.  Lightning's checkpoint dict adds, inside
``hyper_parameters`` (``save_hyperparameters()`` on typical arguments): enum members,
dataclass instances, namedtuples, ``argparse.Namespace`` and class objects
(``hparams_type``).  Each becomes a small dict marked ``{"__flashckpt__": KIND, ...}``:

============  ============================================  =======================================
kind          encoded                                       decoded
============  ============================================  =======================================
``enum``      the class (``module:Qual.Name``), the value   ``Class(value)``
``dataclass`` the class, every field encoded                 the class without ``__init__``, fields set
``namedtuple`` the class, the fields in order               ``Class._make(fields)``
``namespace`` the attributes                                ``argparse.Namespace(**attributes)``
``class``     the class                                     the class
``dropped``   the type and a ``repr`` (at most 200 chars)   left as that dict
============  ============================================  =======================================

A class is looked up by name among the modules already imported, never imported (a name
read from storage must not run a module's code), and must be of the kind recorded (an
``Enum`` subclass, a dataclass, a namedtuple); when it is not found the marked dict is
returned as it is, with a warning.  Under a key listed in ``droppable`` (``hyper_parameters``:
Lightning's resume does not read it), any other value is replaced by a ``dropped`` record
with a warning naming its key path; anywhere else it is left to the state format, which
refuses it with its key path (:class:`~flashckpt.UnsupportedStateError`).  A dict that has a
``"__flashckpt__"`` key of its own is refused the same way.
"""

from __future__ import annotations

import argparse
import dataclasses
import enum
import logging
import sys
from collections import OrderedDict
from typing import Any

import torch

from flashckpt.errors import UnsupportedStateError

log = logging.getLogger(__name__)

MARK = "__flashckpt__"
_PLAIN = (bool, int, float, str, bytes, type(None), torch.Tensor, torch.dtype, torch.device, torch.Size)


def _name(cls: type) -> str:
    return f"{cls.__module__}:{cls.__qualname__}"


def _join(path: str, key: Any) -> str:
    return f"{path}.{key}" if path else str(key)


def encode(
    obj: Any, path: str = "", *, droppable: frozenset[str] = frozenset(), dropping: bool = False
) -> Any:
    """``obj`` with every allow-listed object replaced by its marked dict (see the module
    docstring); containers are copied, tensors and plain values are not."""
    if isinstance(obj, enum.Enum):
        return {MARK: "enum", "class": _name(type(obj)), "value": encode(obj.value, path, dropping=dropping)}
    if isinstance(obj, type):
        return {MARK: "class", "class": _name(obj)}
    if dataclasses.is_dataclass(obj):
        fields = {
            f.name: encode(getattr(obj, f.name), _join(path, f.name), dropping=dropping)
            for f in dataclasses.fields(obj)
        }
        return {MARK: "dataclass", "class": _name(type(obj)), "fields": fields}
    if isinstance(obj, tuple) and hasattr(type(obj), "_fields") and not isinstance(obj, torch.Size):
        items = [encode(v, _join(path, i), dropping=dropping) for i, v in enumerate(obj)]
        return {MARK: "namedtuple", "class": _name(type(obj)), "fields": items}
    if isinstance(obj, argparse.Namespace):
        attrs = {k: encode(v, _join(path, k), dropping=dropping) for k, v in vars(obj).items()}
        return {MARK: "namespace", "fields": attrs}
    if isinstance(obj, dict):
        if MARK in obj:
            raise UnsupportedStateError(path, f"the key {MARK!r} is reserved by flashckpt")
        out: dict[Any, Any] = OrderedDict() if isinstance(obj, OrderedDict) else {}
        for k, v in obj.items():
            sub = _join(path, k)
            out[k] = encode(v, sub, droppable=droppable, dropping=dropping or (not path and k in droppable))
        meta = getattr(obj, "_metadata", None)
        if meta is not None:
            out._metadata = meta  # type: ignore[attr-defined]
        return out
    if isinstance(obj, list):
        return [encode(v, _join(path, i), dropping=dropping) for i, v in enumerate(obj)]
    if type(obj) is tuple:
        return tuple(encode(v, _join(path, i), dropping=dropping) for i, v in enumerate(obj))
    if isinstance(obj, (set, frozenset)):
        if dropping and not all(isinstance(v, _PLAIN) for v in obj):
            return _dropped(obj, path)
        return obj
    if dropping and not isinstance(obj, _PLAIN):
        return _dropped(obj, path)
    return obj  # the state format takes it, or refuses it with its key path


def _dropped(obj: Any, path: str) -> dict[str, Any]:
    log.warning(
        "flashckpt: %s: a %s cannot be saved without pickle; dropped (a resume does not read it)",
        path,
        type(obj).__qualname__,
    )
    return {MARK: "dropped", "type": _name(type(obj)), "repr": repr(obj)[:200]}


def decode(obj: Any) -> Any:
    """The inverse of :func:`encode` (see the module docstring for what a class lookup may
    and may not do)."""
    if isinstance(obj, dict):
        if MARK in obj:
            return _decode_marked(obj)
        out: dict[Any, Any] = OrderedDict() if isinstance(obj, OrderedDict) else {}
        for k, v in obj.items():
            out[k] = decode(v)
        meta = getattr(obj, "_metadata", None)
        if meta is not None:
            out._metadata = meta  # type: ignore[attr-defined]
        return out
    if isinstance(obj, list):
        return [decode(v) for v in obj]
    if type(obj) is tuple:
        return tuple(decode(v) for v in obj)
    return obj


def _decode_marked(rec: dict[str, Any]) -> Any:
    kind = rec.get(MARK)
    if kind == "namespace":
        return argparse.Namespace(**{str(k): decode(v) for k, v in dict(rec.get("fields", {})).items()})
    if kind == "dropped":
        return rec
    cls = _lookup(rec.get("class"))
    try:
        if kind == "class" and cls is not None:
            return cls
        if kind == "enum" and isinstance(cls, enum.EnumMeta):
            return cls(decode(rec["value"]))
        if kind == "dataclass" and isinstance(cls, type) and dataclasses.is_dataclass(cls):
            inst = object.__new__(cls)  # no __init__: a name read from storage runs no user code
            for k, v in dict(rec["fields"]).items():
                object.__setattr__(inst, str(k), decode(v))
            return inst
        if (
            kind == "namedtuple"
            and isinstance(cls, type)
            and issubclass(cls, tuple)
            and hasattr(cls, "_make")
        ):
            return cls._make(decode(v) for v in rec["fields"])
    except (KeyError, TypeError, ValueError) as exc:
        log.warning("flashckpt: cannot rebuild a %s of %s: %s; kept as a dict", kind, rec.get("class"), exc)
        return rec
    log.warning("flashckpt: %s %s is not among the imported classes: kept as a dict", kind, rec.get("class"))
    return rec


def _lookup(name: Any) -> Any:
    """The object ``module:Qual.Name`` names, if its module is imported already (never imports)."""
    if not isinstance(name, str) or ":" not in name:
        return None
    mod_name, _, qual = name.partition(":")
    obj: Any = sys.modules.get(mod_name)
    for part in qual.split("."):
        if obj is None or part.startswith("__") or part == "<locals>":
            return None
        obj = getattr(obj, part, None)
    return obj if isinstance(obj, type) else None
