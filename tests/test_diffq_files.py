"""States written by the public ``diffq`` 0.2.4 (SPEC.md §11): the fixtures in ``tests/data``
(made with the real diffq by ``tests/data/make_diffq_fixtures.py``, which also defines the
model) restore through ``parq.diffq.restore_quantized_state`` to the weights diffq's own
restore gives, bit for bit; malformed states raise ``ValueError`` naming the fault and
leave the model as it was."""

from __future__ import annotations

import copy
import functools
import importlib.util
import io
import pickle
from pathlib import Path

import pytest
import torch
from torch import nn

from parq.diffq import DiffQuantizer, load_diffq_state, restore_quantized_state
from parq.diffq.diffq_files import is_diffq_state

DATA = Path(__file__).resolve().parent / "data"
_spec = importlib.util.spec_from_file_location("make_diffq_fixtures",
                                               DATA / "make_diffq_fixtures.py")  # fmt: skip
fixtures = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(fixtures)
VARIANTS = ("packed", "unpacked", "torch_pack")


@functools.cache
def _case(name: str) -> dict:
    return load_diffq_state(DATA / f"{name}.pt")


def _state(name: str, variant: str) -> dict:
    return copy.deepcopy(_case(name)["states"][variant])


def _params(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.named_parameters(remove_duplicate=False)}


def _present() -> list[tuple[str, str]]:
    return [(c, v) for c in fixtures.CASES for v in VARIANTS if v in _case(c)["states"]]


def test_fixtures_hold_what_they_claim():
    """Each quantizer, each format diffq can write, per-group bits spread over 2..13 after
    training (levels of more than 8 bits too), 15-bit groups, a tied weight, float16."""
    for name in fixtures.CASES:
        case = _case(name)
        assert case["diffq_version"] == "0.2.4"
        for variant, state in case["states"].items():
            assert is_diffq_state(state) and state["meta"]["packed"] == (variant != "unpacked")
    klasses = {_case(c)["states"]["unpacked"]["meta"]["klass"].__name__ for c in fixtures.CASES}
    assert klasses == {"DiffQuantizer", "UniformQuantizer", "LSQ"}
    bits = torch.cat([e[2] for e in _case("diffq_group8")["states"]["unpacked"]["quantized"]])
    assert set(range(2, 14)) <= set(bits.tolist())
    bits = torch.cat([e[2] for e in _case("diffq_15bits")["states"]["unpacked"]["quantized"]])
    assert 15 in bits.tolist()
    assert len(_case("diffq_group8")["states"]["packed"]["float16"]) > 0
    assert "torch_pack" not in _case("uniform_bits6")["states"]  # diffq cannot write it


@pytest.mark.parametrize(("name", "variant"), _present())
def test_restores_what_diffq_restores(name, variant):
    case = _case(name)
    expected, note = case["expected"][variant], case["diffq_notes"][variant]
    model = fixtures.build_model(seed=7)  # not the fixture's weights: all must be written
    if expected is None and "15-bit" in note:  # diffq restores memory it never wrote
        before = _params(model)
        with pytest.raises(ValueError, match="15 bits"):
            restore_quantized_state(model, _state(name, variant))
        assert all(torch.equal(v, before[k]) for k, v in _params(model).items())
        return
    if expected is None:  # group_size=0 packed: diffq's restore fails, its unpacked works
        assert "restore raised" in note
        expected = case["expected"]["unpacked"]
    restore_quantized_state(model, _state(name, variant))
    got = _params(model)
    assert got.keys() == expected.keys()
    for key, value in expected.items():
        assert got[key].dtype == value.dtype and torch.equal(got[key], value), key
    floats = case["float_state"]  # the quantized weights are not the float ones
    assert any(not torch.equal(got[k], floats[k]) for k in got)


def test_plain_torch_load_needs_diffq_the_loader_does_not():
    path = DATA / "diffq_group8.pt"
    with pytest.raises(pickle.UnpicklingError, match="diffq"):
        torch.load(path, weights_only=True)
    state = load_diffq_state(path)["states"]["packed"]
    assert state["meta"]["klass"] is DiffQuantizer


def test_a_klass_given_by_name_and_a_saved_copy_restore_too():
    expected = _case("lsq_bits4")["expected"]["packed"]
    state = _state("lsq_bits4", "packed")
    state["meta"]["klass"] = "LSQ"
    buf = io.BytesIO()
    torch.save(state, buf)
    model = fixtures.build_model(seed=3)
    restore_quantized_state(model, load_diffq_state(io.BytesIO(buf.getvalue())))
    assert all(torch.equal(v, expected[k]) for k, v in _params(model).items())


def _drop(key):
    return lambda s: s.pop(key)


def _set_meta(key, value):
    return lambda s: s["meta"].__setitem__(key, value)


def _edit_entry(index, fn):
    def edit(s):
        entry = list(s["quantized"][index])
        fn(entry)
        s["quantized"][index] = tuple(entry)

    return edit


def _cut_lines(entry):  # a bitpack stream with its last line removed
    entry[0] = entry[0][:-1]


def _cut_stream(entry):  # DiffQ: one bit width's level stream loses its last line
    streams = list(entry[0])
    b = next(i for i, d in enumerate(streams) if d is not None)
    streams[b] = streams[b][:-1]
    entry[0] = streams


def _fewer_planes(entry):
    streams = list(entry[0])
    b = next(i for i, d in enumerate(streams) if d is not None and d.shape[1] > 1)
    streams[b] = streams[b][:, :-1]
    entry[0] = streams


def _drop_stream(entry):
    streams = list(entry[0])
    streams[next(i for i, d in enumerate(streams) if d is not None)] = None
    entry[0] = streams


def _cut_levels(entry):  # unpacked: one row (group) of levels missing
    entry[0] = entry[0][:-1]


MALFORMED = [
    ("diffq_group8", "packed", _drop("float16"), "no 'float16' entry"),
    ("diffq_group8", "packed", lambda s: s["meta"].pop("klass"), "'klass'"),
    ("diffq_group8", "packed", _set_meta("klass", "Quantizer"), "unknown quantizer"),
    ("diffq_group8", "packed", lambda s: s["meta"]["init_kwargs"].update(width=3),
     "unknown DiffQuantizer arguments"),
    ("diffq_group8", "packed", lambda s: s["quantized"].pop(), "'quantized' holds 3"),
    ("diffq_group8", "packed", lambda s: s["others"].append(torch.zeros(2)), "'others' holds"),
    ("diffq_group8", "packed", _edit_entry(1, _cut_stream), "truncated"),
    ("diffq_group8", "packed", _edit_entry(1, _fewer_planes), "bit planes"),
    ("diffq_group8", "packed", _edit_entry(1, _drop_stream), "stream is missing"),
    ("diffq_group8", "packed", _edit_entry(0, lambda e: e.pop()), "tuple of 3"),
    ("diffq_group8", "packed", _edit_entry(0, lambda e: e.__setitem__(1, (0.0,))), "min, max"),
    ("diffq_group8", "torch_pack", _edit_entry(1, lambda e: e.__setitem__(2, e[2][:, :-1])),
     "truncated"),
    ("diffq_group8", "unpacked", _edit_entry(2, _cut_levels), r"levels of shape \(16, 8\)"),
    ("diffq_group8", "unpacked", _edit_entry(2, lambda e: e.__setitem__(2, e[2] * 0)),
     "bits outside"),
    ("diffq_group8", "unpacked", lambda s: s["float16"][0].resize_(3), r"shape \(4,\)"),
    ("uniform_bits6", "packed", _edit_entry(0, _cut_lines), "truncated"),
    ("uniform_bits6", "packed", _set_meta("init_kwargs", {"bits": "6"}), "bits must be"),
    ("lsq_bits4", "packed", _edit_entry(3, _cut_lines), "truncated"),
    ("lsq_bits4", "unpacked", _edit_entry(3, lambda e: e.__setitem__(1, 0.5)), "step"),
]  # fmt: skip


@pytest.mark.parametrize(("name", "variant", "edit", "match"), MALFORMED)
def test_malformed_states_raise_and_leave_the_model(name, variant, edit, match):
    state = _state(name, variant)
    edit(state)
    model = fixtures.build_model(seed=7)
    before = _params(model)
    with pytest.raises(ValueError, match=match):
        restore_quantized_state(model, state)
    after = _params(model)
    assert after.keys() == before.keys()
    assert all(torch.equal(v, before[k]) for k, v in after.items())


def _wider(seed: int) -> nn.Module:  # 5 quantized parameters (no tie), other shapes
    return fixtures.build_model(seed, width=12)


def _fc2_doubled(seed: int) -> nn.Module:  # same count, fc2 (16, 16) instead of (8, 16)
    model = fixtures.build_model(seed)
    model.fc2 = nn.Linear(16, 16)
    return model


@pytest.mark.parametrize("make", [_wider, _fc2_doubled])
@pytest.mark.parametrize(("name", "variant"), [("diffq_group8", "packed"),
                                               ("diffq_group8", "unpacked"),
                                               ("uniform_bits12", "packed"),
                                               ("lsq_bits4", "torch_pack")])  # fmt: skip
def test_another_model_is_refused(make, name, variant):
    model = make(5)
    before = _params(model)
    with pytest.raises(ValueError, match="diffq state: "):
        restore_quantized_state(model, _state(name, variant))
    assert all(torch.equal(v, before[k]) for k, v in _params(model).items())


def test_a_quantizers_own_method_refuses_a_diffq_state_saying_how():
    """The method reads this package's states only: a diffq state is refused, naming the
    function that reads it, and the model is left as it was."""
    model = fixtures.build_model(seed=7)
    quantizer = DiffQuantizer(model, group_size=8)
    before = _params(model)
    with pytest.raises(ValueError, match=r"parq\.diffq\.restore_quantized_state"):
        quantizer.restore_quantized_state(_state("diffq_group8", "packed"))
    assert all(torch.equal(v, before[k]) for k, v in _params(model).items())
