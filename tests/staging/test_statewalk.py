"""The state walk end to end: what a state may hold, and how it comes back.

Every test goes through a real ``Checkpointer`` (save, wait, restore) and through
``flashckpt.load``; tensors are compared byte for byte (NaN payloads included).
"""

from __future__ import annotations

import collections
import math
import shutil
import tempfile
from collections import OrderedDict
from pathlib import Path
from typing import Any

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import flashckpt
from flashckpt.format import DTYPES, decode_manifest, manifest_key
from flashckpt.testing import parts
from tests.conftest import assert_state_equal, make_state, train_step

DTYPE_ITEMS = sorted(DTYPES.items())
FAST = flashckpt.Options(fsync=False)  # for the many small Checkpointers of the property test


def _ckpt(dirs: dict[str, Path], **kw: Any) -> flashckpt.Checkpointer:
    return flashckpt.Checkpointer(dirs["storage"], memory_dir=dirs["memory"], **kw)


def _rand(dtype: torch.dtype, shape: tuple[int, ...], gen: torch.Generator | None = None) -> torch.Tensor:
    """Random bytes viewed as ``dtype`` (NaNs, infinities, odd bit patterns included)."""
    n = math.prod(shape)
    if dtype == torch.bool:  # a bool byte other than 0/1 is not a valid bool
        return torch.randint(0, 2, shape, dtype=torch.uint8, generator=gen).view(torch.bool)
    raw = torch.randint(0, 256, (max(n, 1) * dtype.itemsize,), dtype=torch.uint8, generator=gen)
    return raw.view(dtype)[:n].reshape(shape)


def _bytes(t: torch.Tensor) -> torch.Tensor:
    return t.detach().contiguous().reshape(-1).view(torch.uint8)


def same_tensor(a: torch.Tensor, b: torch.Tensor) -> bool:
    return (
        isinstance(b, torch.Tensor)
        and a.dtype == b.dtype
        and a.shape == b.shape
        and b.device.type == "cpu"
        and torch.equal(_bytes(a), _bytes(b))
    )


def assert_same(a: Any, b: Any, path: str = "") -> None:
    """Exact equality: same types, same keys in the same order, tensors bytewise, NaN == NaN,
    -0.0 != 0.0."""
    if isinstance(a, torch.Tensor):
        assert same_tensor(a, b), path
        return
    assert type(a) is type(b), (path, type(a), type(b))
    if isinstance(a, dict):
        assert list(a.keys()) == list(b.keys()), path
        for k in a:
            assert_same(a[k], b[k], f"{path}.{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            assert_same(x, y, f"{path}.{i}")
    elif isinstance(a, float):
        assert (math.isnan(a) and math.isnan(b)) or (a == b and math.copysign(1, a) == math.copysign(1, b)), (
            path
        )
    else:
        assert a == b, path


def _save(dirs: dict[str, Path], state: Any, step: int = 0, **kw: Any) -> None:
    with _ckpt(dirs, **kw) as ckpt:
        h = ckpt.save(step, state)
        assert h is not None
        h.wait()


def _round_trip(dirs: dict[str, Path], state: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """Save ``state``, close, then restore into ``{}`` with a new Checkpointer (disk tier) and
    ``flashckpt.load`` it.  Returns (restored, loaded)."""
    _save(dirs, state)
    restored: dict[str, Any] = {}
    with _ckpt(dirs) as ckpt:
        assert ckpt.restore(restored) == 0
    return restored, flashckpt.load(dirs["storage"])


# --------------------------------------------------------------------------------------------
# tensors


def test_every_dtype_round_trips_bytewise(dirs: dict[str, Path]) -> None:
    torch.manual_seed(0)
    state: dict[str, Any] = {}
    for name, dt in DTYPE_ITEMS:
        state[name] = {
            "plain": _rand(dt, (5, 7)),
            "big": _rand(dt, ((1 << 20) // dt.itemsize + 3,)),  # over small_tensor_bytes: own chunk
            "scalar": _rand(dt, ()),
            "empty": _rand(dt, (0,)),
            "empty2d": _rand(dt, (3, 0)),
            "transposed": _rand(dt, (4, 6)).t(),
            "strided": _rand(dt, (20,))[1::3],
        }
    restored, loaded = _round_trip(dirs, state)
    assert_same(state, restored)
    assert_same(state, loaded)
    for name, _ in DTYPE_ITEMS:
        assert loaded[name]["scalar"].dim() == 0
        assert loaded[name]["empty2d"].shape == (3, 0)


@pytest.mark.parametrize(("name", "dtype"), DTYPE_ITEMS, ids=[n for n, _ in DTYPE_ITEMS])
def test_every_dtype_restores_in_place(dirs: dict[str, Path], name: str, dtype: torch.dtype) -> None:
    gen = torch.Generator().manual_seed(len(name))
    saved = {"a": _rand(dtype, (3, 5), gen), "s": _rand(dtype, (), gen), "nc": _rand(dtype, (6, 4), gen).t()}
    _save(dirs, saved)
    target = {"a": _rand(dtype, (3, 5), gen), "s": _rand(dtype, (), gen), "nc": _rand(dtype, (6, 4), gen).t()}
    before = dict(target)
    with _ckpt(dirs) as ckpt:
        assert ckpt.restore(target) == 0
    for k in saved:
        assert target[k] is before[k], k
        assert same_tensor(saved[k], target[k]), k
    assert not target["nc"].is_contiguous()  # restored into the same (transposed) tensor


def test_views_of_one_storage_round_trip_and_restore_in_place(dirs: dict[str, Path]) -> None:
    base = torch.arange(48, dtype=torch.float32)
    views = {
        "base": base,
        "head": base[:10],
        "overlap": base[5:20],
        "grid": base.view(6, 8),
        "cols": base.view(6, 8)[:, 1::3],
        "t": base.view(6, 8).t(),
        "as_int": base.view(torch.int32)[::5],
        "diag": base.view(6, 8).diagonal(),
    }
    expected = {k: v.clone() for k, v in views.items()}
    restored, loaded = _round_trip(dirs, views)
    assert_same(expected, restored)
    assert_same(expected, loaded)

    # scribble over the shared storage, then restore into the very same views
    base.fill_(-1.0)
    objects = dict(views)
    with _ckpt(dirs) as ckpt:
        assert ckpt.restore(views) == 0
    for k in views:
        assert views[k] is objects[k], k
        assert views[k].untyped_storage().data_ptr() == base.untyped_storage().data_ptr(), k
    assert_same(expected, views)


def test_tied_tensors_are_saved_once_and_stay_tied(dirs: dict[str, Path]) -> None:
    w = torch.randn(64, 32)
    state = {"a": w, "b": w, "nested": {"again": w}, "other": w.clone()}
    restored, loaded = _round_trip(dirs, state)
    for out in (restored, loaded):
        assert_same(state, out)
        assert out["a"] is out["b"] is out["nested"]["again"]
        assert out["other"] is not out["a"]
    raw = (dirs["storage"] / manifest_key(0, 0, 1)).read_bytes()
    assert len(decode_manifest(raw).tensors) == 2  # w once, and the clone

    # a module with tied weights (TinyNet.head.weight is emb.weight) keeps the tie on restore
    src = make_state(seed=0)
    _save(dirs, src, step=1)
    dst = make_state(seed=5)
    with _ckpt(dirs) as ckpt:
        assert ckpt.restore(dst) == 1
    m = dst["model"]
    assert m.head.weight is m.emb.weight  # type: ignore[attr-defined]
    assert_state_equal(src, dst)


def test_nested_containers(dirs: dict[str, Path]) -> None:
    t = [torch.randn(3), torch.arange(4), torch.ones(2, 2, dtype=torch.float16)]
    state = {
        "list": [1, [2, [3, [t[0]]]], (t[1], "x", (None, t[2]))],
        "tuple": (t[0], [t[1], {"deep": (1, 2.5, [])}], ()),
        "dict": {"a": {"b": {"c": {"d": [t[2], {}]}}}},
        "empty": {"l": [], "t": (), "d": {}, "od": OrderedDict()},
    }
    restored, loaded = _round_trip(dirs, state)
    assert_same(state, restored)
    assert_same(state, loaded)


# --------------------------------------------------------------------------------------------
# plain values


def _plain_values() -> dict[str, Any]:
    od: OrderedDict[str, int] = OrderedDict()
    for k in "zyxa":
        od[k] = ord(k)
    return {
        "int": 7,
        "neg": -3,
        "zero": 0,
        "big": 2**64 + 1,
        "huge": 3**200,
        "neg_huge": -(2**100),
        "float": 0.1,
        "nan": math.nan,
        "inf": math.inf,
        "ninf": -math.inf,
        "negzero": -0.0,
        "tiny": 5e-324,
        "max": 1.7976931348623157e308,
        "str": 'héllo wörld ✓ 中文 🚀 \x00 \n \\ "q"',
        "empty_str": "",
        "true": True,
        "false": False,
        "none": None,
        "bytes": bytes(range(256)),
        "empty_bytes": b"",
        "set": {1, "two", (3, 4), None, 2.5},
        "empty_set": set(),
        "frozenset": frozenset({"a", (1, (2, 3)), -7}),
        "dtypes": [dt for _, dt in DTYPE_ITEMS],
        "devices": [
            torch.device("cpu"),
            torch.device("cpu", 0),
            torch.device("meta"),
            torch.device("cuda", 3),
        ],
        "int_keys": {3: "c", -1: "m", 2**70: "big", 0: "z"},
        "tuple_keys": {(1, 2): "a", ("x", (None, 3)): "b", (): "empty"},
        "mixed_keys": {"s": 1, 2: 2, None: 3, 1.5: 4, True: 5, (1,): 6},
        "ordered": od,
        "list_of_dicts": [{"a": 1}, {"b": [2, 3]}],
    }


def test_plain_values_round_trip(dirs: dict[str, Path]) -> None:
    state = _plain_values()
    restored, loaded = _round_trip(dirs, state)
    assert_same(state, restored)
    assert_same(state, loaded)
    assert type(loaded["ordered"]) is OrderedDict
    assert list(loaded["ordered"]) == ["z", "y", "x", "a"]
    assert math.copysign(1.0, loaded["negzero"]) == -1.0


def test_torch_size_keeps_its_type(dirs: dict[str, Path]) -> None:
    state = {"size": torch.Size([2, 3, 400]), "empty": torch.Size([])}
    restored, loaded = _round_trip(dirs, state)
    for out in (restored, loaded):
        assert out["size"] == torch.Size([2, 3, 400])
        assert type(out["size"]) is torch.Size
        assert type(out["empty"]) is torch.Size


def test_plain_values_replace_old_values_on_restore(dirs: dict[str, Path]) -> None:
    state = _plain_values()
    _save(dirs, state)
    target: dict[str, Any] = {k: "old" for k in state}
    target["not_in_checkpoint"] = 123
    keep_list: list[Any] = ["will", "be", "replaced"]
    target["list_of_dicts"] = keep_list
    with _ckpt(dirs) as ckpt:
        assert ckpt.restore(target) == 0
    assert target.pop("not_in_checkpoint") == 123  # restore updates, it does not clear
    assert target["list_of_dicts"] is keep_list  # a list is updated in place
    assert_same(state, target)


# --------------------------------------------------------------------------------------------
# property test: random nested states


def _tensor_leaf() -> st.SearchStrategy[torch.Tensor]:
    @st.composite
    def build(draw: st.DrawFn) -> torch.Tensor:
        dtype = draw(st.sampled_from([dt for _, dt in DTYPE_ITEMS]))
        shape = tuple(draw(st.lists(st.integers(0, 5), max_size=3)))
        seed = draw(st.integers(0, 2**31 - 1))
        t = _rand(dtype, shape, torch.Generator().manual_seed(seed))
        if t.dim() >= 2 and draw(st.booleans()):
            t = t.transpose(0, 1)
        return t

    return build()


PLAIN = (
    st.none()
    | st.booleans()
    | st.integers(-(2**80), 2**80)
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=8)
    | st.binary(max_size=8)
)
KEYS = st.text(max_size=6) | st.integers(-5, 5)
STATES = st.dictionaries(
    st.text(max_size=6),
    st.recursive(
        _tensor_leaf() | PLAIN,
        lambda children: (
            st.lists(children, max_size=3)
            | st.lists(children, max_size=3).map(tuple)
            | st.dictionaries(KEYS, children, max_size=3)
        ),
        max_leaves=12,
    ),
    max_size=5,
)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(state=STATES)
def test_property_load_returns_exactly_what_was_saved(state: dict[str, Any]) -> None:
    root = Path(tempfile.mkdtemp(prefix="flashckpt-prop-"))
    try:
        dirs = {"storage": root / "storage", "memory": root / "memory"}
        ckpt = _ckpt(dirs, options=FAST)
        try:
            ckpt.save(3, state).wait()  # type: ignore[union-attr]
            restored: dict[str, Any] = {}
            assert ckpt.restore(restored) == 3  # from the memory tier
            assert_same(state, restored)
        finally:
            ckpt.close()
        assert_same(state, flashckpt.load(dirs["storage"]))
    finally:
        shutil.rmtree(root, ignore_errors=True)


# --------------------------------------------------------------------------------------------
# in-place semantics and aliasing


def _slot_ranges(ckpt: flashckpt.Checkpointer) -> list[tuple[int, int]]:
    out = []
    for slot in parts(ckpt).stager.slots:
        buf = slot._buf
        if buf is not None:
            out.append((buf.data_ptr(), buf.data_ptr() + slot.capacity))
    return out


def _tensors_of(state: Any) -> list[torch.Tensor]:
    if isinstance(state, torch.Tensor):
        return [state]
    if isinstance(state, dict):
        return [t for v in state.values() for t in _tensors_of(v)]
    if isinstance(state, (list, tuple)):
        return [t for v in state for t in _tensors_of(v)]
    return []


def _assert_not_in_slots(tensors: list[torch.Tensor], ranges: list[tuple[int, int]]) -> None:
    assert ranges, "no slot is mapped"
    for t in tensors:
        if t.numel() == 0:
            continue
        start = t.untyped_storage().data_ptr()
        end = start + t.untyped_storage().nbytes()
        for lo, hi in ranges:
            assert end <= lo or start >= hi, "a restored tensor aliases a staging slot"


def test_restore_is_in_place_and_never_aliases_staging(dirs: dict[str, Path]) -> None:
    src = make_state(seed=0)
    for step in range(3):
        train_step(src, step)
    src["bufs"] = {"buf": torch.randn(1000, 300), "small": torch.arange(5)}
    _save(dirs, src, step=3)

    dst = make_state(seed=9)
    train_step(dst, 0)
    dst["bufs"] = {"buf": torch.zeros(1000, 300), "small": torch.zeros(3, dtype=torch.int64)}
    model = dst["model"]
    params = {k: v for k, v in model.named_parameters()}  # type: ignore[attr-defined]
    buffers = {k: v for k, v in model.named_buffers()}  # type: ignore[attr-defined]
    buf_obj = dst["bufs"]["buf"]  # type: ignore[index]
    fresh: dict[str, Any] = {}

    with _ckpt(dirs) as ckpt:
        assert ckpt.restore(dst) == 3
        assert ckpt.restore(fresh) == 3  # from the memory tier this time
        for k, v in model.named_parameters():  # type: ignore[attr-defined]
            assert v is params[k], k
        for k, v in model.named_buffers():  # type: ignore[attr-defined]
            assert v is buffers[k], k
        assert dst["bufs"]["buf"] is buf_obj  # type: ignore[index]
        assert torch.equal(dst["bufs"]["small"], torch.arange(5))  # other shape: replaced  # type: ignore[index]
        assert_state_equal(src, dst)
        for k, v in src["model"].state_dict().items():  # type: ignore[attr-defined]
            assert torch.equal(fresh["model"][k], v), k

        restored = (
            _tensors_of(dst["bufs"])
            + _tensors_of(fresh)
            + [
                t
                for st_ in dst["optim"].state.values()
                for t in st_.values()  # type: ignore[attr-defined]
            ]
        )
        _assert_not_in_slots(restored, _slot_ranges(ckpt))
        snapshot = [t.clone() for t in restored]

        # overwrite both staging slots with other values of the same layout
        other = make_state(seed=3)
        other["bufs"] = {"buf": torch.full((1000, 300), 7.0), "small": torch.arange(5) * 100}
        for step in (10, 11, 12):
            train_step(other, step)
            ckpt.save(step, other).wait()  # type: ignore[union-attr]
        _assert_not_in_slots(restored, _slot_ranges(ckpt))
        for a, b in zip(restored, snapshot, strict=True):
            assert torch.equal(_bytes(a), _bytes(b))
    assert_state_equal(src, dst)


def test_in_place_keeps_containers_parameters_and_tuples(dirs: dict[str, Path]) -> None:
    p = torch.nn.Parameter(torch.randn(4, 3))
    saved = {
        "p": p,
        "pair": (torch.arange(3), torch.ones(2)),
        "lst": [torch.zeros(2)],
        "d": {"x": torch.ones(1)},
    }
    expected = {
        "p": p.detach().clone(),
        "pair": tuple(t.clone() for t in saved["pair"]),
        "lst": [saved["lst"][0].clone()],
        "d": {"x": torch.ones(1)},
    }
    _save(dirs, saved)
    target = {
        "p": torch.nn.Parameter(torch.zeros(4, 3)),
        "pair": (torch.zeros(3, dtype=torch.int64), torch.zeros(2)),
        "lst": [torch.ones(2)],
        "d": {"x": torch.zeros(1)},
    }

    def parts() -> list[Any]:
        pair, lst, d = target["pair"], target["lst"], target["d"]
        return [target["p"], pair, lst, d, pair[0], pair[1], lst[0], d["x"]]

    before = parts()
    with _ckpt(dirs) as ckpt:
        assert ckpt.restore(target) == 0
    for i, (a, b) in enumerate(zip(before, parts(), strict=True)):
        assert a is b, i
    assert isinstance(target["p"], torch.nn.Parameter) and target["p"].requires_grad
    assert target["p"].grad is None
    assert_same(expected, {**target, "p": target["p"].detach()})


def test_conj_and_neg_views_are_not_confused_with_their_base(dirs: dict[str, Path]) -> None:
    z = torch.randn(5, dtype=torch.complex64)
    state = {"z": z, "zc": z.conj(), "im": z.imag, "neg_im": z.conj().imag}
    expected = {k: v.resolve_conj().resolve_neg().clone() for k, v in state.items()}
    restored, loaded = _round_trip(dirs, state)
    assert_same(expected, loaded)
    assert_same(expected, restored)


def test_restore_into_expanded_tensor(dirs: dict[str, Path]) -> None:
    state = {"e": torch.tensor([2.5]).expand(4), "x": torch.ones(2)}
    _save(dirs, state)
    assert_same({"e": torch.full((4,), 2.5), "x": torch.ones(2)}, flashckpt.load(dirs["storage"]))
    target = {"e": torch.tensor([0.0]).expand(4), "x": torch.zeros(2)}
    with _ckpt(dirs) as ckpt:
        assert ckpt.restore(target) == 0
    assert torch.equal(target["e"], torch.full((4,), 2.5))


def test_load_result_does_not_alias_anything(dirs: dict[str, Path]) -> None:
    state = {"a": torch.randn(2000, 100), "b": torch.arange(10)}
    _save(dirs, state)
    first = flashckpt.load(dirs["storage"])
    second = flashckpt.load(dirs["storage"])
    first["a"].add_(1.0)
    first["b"].zero_()
    assert_same(state, second)
    assert first["a"].untyped_storage().data_ptr() != second["a"].untyped_storage().data_ptr()


# --------------------------------------------------------------------------------------------
# a state whose shape changes between saves


def _adam_state(seed: int) -> dict[str, Any]:
    torch.manual_seed(seed)
    model = torch.nn.Linear(8, 4)
    return {"model": model, "optim": torch.optim.AdamW(model.parameters(), lr=0.1)}


def _adam_step(state: dict[str, Any]) -> None:
    loss = state["model"](torch.ones(2, 8)).square().sum()
    state["optim"].zero_grad()
    loss.backward()
    state["optim"].step()


def test_optimizer_moments_appear_after_the_first_step(dirs: dict[str, Path]) -> None:
    state = _adam_state(0)
    with _ckpt(dirs) as ckpt:
        ckpt.save(0, state).wait()  # type: ignore[union-attr]
        at0 = {k: v.clone() for k, v in state["model"].state_dict().items()}
        _adam_step(state)
        ckpt.save(1, state).wait()  # type: ignore[union-attr]
        at1 = {k: v.clone() for k, v in state["model"].state_dict().items()}
        moments1 = {k: v.clone() for k, v in state["optim"].state[state["model"].weight].items()}

    for step, weights in ((0, at0), (1, at1)):
        fresh = _adam_state(42)
        if step == 0:  # moments in the target but not in the checkpoint: they go away
            _adam_step(fresh)
        with _ckpt(dirs) as ckpt:
            assert ckpt.restore(fresh, step=step) == step
        for k, v in weights.items():
            assert torch.equal(fresh["model"].state_dict()[k], v), (step, k)
        opt_state = fresh["optim"].state
        if step == 0:
            assert len(opt_state) == 0
        else:
            got = opt_state[fresh["model"].weight]
            assert got.keys() == moments1.keys()
            for k, v in moments1.items():
                assert torch.equal(got[k], v), k

    loaded = flashckpt.load(dirs["storage"], step=0)
    assert loaded["optim"]["state"] == {}
    loaded = flashckpt.load(dirs["storage"], step=1)
    assert set(loaded["optim"]["state"][0]) == {"step", "exp_avg", "exp_avg_sq"}


def test_grown_embedding_mismatch_is_a_clear_error(dirs: dict[str, Path]) -> None:
    torch.manual_seed(0)
    state: dict[str, Any] = {"emb": torch.nn.Embedding(10, 4), "extra": {"n": 10}}
    with _ckpt(dirs) as ckpt:
        ckpt.save(0, state).wait()  # type: ignore[union-attr]
        small = state["emb"].weight.detach().clone()
        state["emb"] = torch.nn.Embedding(20, 4)  # the vocabulary grew
        state["extra"]["n"] = 20
        ckpt.save(1, state).wait()  # type: ignore[union-attr]
        big = state["emb"].weight.detach().clone()

    with _ckpt(dirs) as ckpt:
        target = {"emb": torch.nn.Embedding(20, 4), "extra": {}}
        with pytest.raises(flashckpt.StateMismatchError) as info:
            ckpt.restore(target, step=0)
        msg = str(info.value)
        assert "emb" in msg and "Embedding" in msg and "size mismatch" in msg, msg

        target = {"emb": torch.nn.Embedding(10, 4), "extra": {}}
        with pytest.raises(flashckpt.StateMismatchError, match="emb"):
            ckpt.restore(target, step=1)

        # matching shapes work, in either direction, and the Checkpointer is still usable
        target = {"emb": torch.nn.Embedding(10, 4), "extra": {}}
        assert ckpt.restore(target, step=0) == 0
        assert torch.equal(target["emb"].weight, small) and target["extra"] == {"n": 10}
        target = {"emb": torch.nn.Embedding(20, 4), "extra": {}}
        assert ckpt.restore(target) == 1
        assert torch.equal(target["emb"].weight, big) and target["extra"] == {"n": 20}
        ckpt.save(2, target).wait()  # type: ignore[union-attr]

    # a bare tensor of another shape is simply replaced (only Stateful objects can object)
    loose = {"emb": {"weight": torch.zeros(3, 4)}}
    _save(dirs, {"emb": {"weight": small}}, step=5)
    with _ckpt(dirs) as ckpt:
        assert ckpt.restore(loose, step=5) == 5
    assert torch.equal(loose["emb"]["weight"], small)


# --------------------------------------------------------------------------------------------
# unsupported objects


class _Opaque:
    pass


Point = collections.namedtuple("Point", "x y")


def _unsupported() -> list[Any]:
    return [
        pytest.param(lambda: _Opaque(), id="instance"),
        pytest.param(lambda: lambda x: x, id="lambda"),
        pytest.param(lambda: torch.eye(3).to_sparse(), id="sparse-coo"),
        pytest.param(lambda: torch.eye(3).to_sparse_csr(), id="sparse-csr"),
        pytest.param(lambda: torch.quantize_per_tensor(torch.rand(4), 0.1, 0, torch.quint8), id="quantized"),
        pytest.param(lambda: Point(1, 2), id="namedtuple"),
        pytest.param(lambda: torch.empty(3, device="meta"), id="meta-tensor"),
        pytest.param(lambda: object, id="class"),
        pytest.param(lambda: range(3), id="range"),
        pytest.param(lambda: 1 + 2j, id="complex-number"),
    ]


@pytest.mark.filterwarnings("ignore:Sparse CSR tensor support:UserWarning")
@pytest.mark.filterwarnings("ignore:torch.quantize_per_tensor:UserWarning")
@pytest.mark.parametrize("make", _unsupported())
def test_unsupported_objects_name_their_path(dirs: dict[str, Path], make: Any) -> None:
    good = {"w": torch.ones(3), "extra": {"epoch": 1}}
    with _ckpt(dirs) as ckpt:
        for state, path in (
            ({"w": torch.ones(3), "extra": {"obj": make()}}, "extra.obj"),
            ({"extra": [0, {"deep": (1, make())}]}, "extra.1.deep.1"),
        ):
            with pytest.raises(flashckpt.UnsupportedStateError) as info:
                ckpt.save(0, state)
            assert info.value.path == path
            assert path in str(info.value)
        # nothing was staged or committed, and the Checkpointer still works
        assert ckpt.latest_step() is None
        ckpt.save(1, good).wait()  # type: ignore[union-attr]
    assert_same(good, flashckpt.load(dirs["storage"]))


def test_unsupported_dict_key_names_its_container(dirs: dict[str, Path]) -> None:
    with _ckpt(dirs) as ckpt, pytest.raises(flashckpt.UnsupportedStateError, match=r"extra\.table"):
        ckpt.save(0, {"extra": {"table": {_Opaque(): 1}}})


# --------------------------------------------------------------------------------------------
# a real training state


def test_training_state_round_trip_and_bitwise_continuation(dirs: dict[str, Path]) -> None:
    state = make_state(seed=0)
    for step in range(5):
        train_step(state, step)
    _save(dirs, state, step=4)

    resumed = make_state(seed=77)  # different initial weights: everything must come from the checkpoint
    with _ckpt(dirs) as ckpt:
        assert ckpt.restore(resumed) == 4
    assert_state_equal(state, resumed)

    offline = make_state(seed=78)
    loaded = flashckpt.load(dirs["storage"])
    for name in ("model", "optim", "sched"):
        offline[name].load_state_dict(loaded[name])  # type: ignore[attr-defined]
    offline["extra"] = loaded["extra"]
    assert_state_equal(state, offline)

    for step in range(5, 9):
        train_step(state, step)
        train_step(resumed, step)
        train_step(offline, step)
    assert_state_equal(state, resumed)
    assert_state_equal(state, offline)
