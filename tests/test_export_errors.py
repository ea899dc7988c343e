"""Rejected packed files (SPEC.md §10): truncated, another format version, not a parq
file, shapes or names that do not fit the model, inconsistent metadata, corrupted
indices. Every error names the file and the parameter it is about, and a rejected
load leaves the model untouched."""

from __future__ import annotations

import json
import struct

import pytest
import torch
from safetensors.torch import save_file
from test_export import Net, quantized_model

from parq.export import PackedFormatError, load_quantized, save_quantized
from parq.export.format import read_header
from parq.optim import ProxHardQuant, QuantOptimizer
from parq.quant import UnifQuantizer


@pytest.fixture
def saved(tmp_path):
    """A ternary per-channel model (K = 3: the 2-bit code 3 is invalid) and its file."""
    model, opt = quantized_model("ternary", 0, "channel")
    path = tmp_path / "m.safetensors"
    save_quantized(path, model, opt, levels_dtype=torch.float32)
    return model, path


def _split(path) -> tuple[dict, bytes]:
    blob = path.read_bytes()
    (n,) = struct.unpack("<Q", blob[:8])
    return json.loads(blob[8 : 8 + n]), blob[8 + n :]


def _write(path, header: dict, data: bytes) -> None:
    raw = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + data)


def _edit_parq(path, fn) -> None:
    """Apply ``fn`` to the file's parq metadata document."""
    header, data = _split(path)
    doc = json.loads(header["__metadata__"]["parq"])
    fn(doc)
    header["__metadata__"]["parq"] = json.dumps(doc)
    _write(path, header, data)


def _rejects(path, model, match: str) -> str:
    """The load raises PackedFormatError matching ``match`` and changes nothing."""
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(PackedFormatError, match=match) as info:
        load_quantized(path, model)
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), f"{k} changed by a rejected load"
    assert str(path) in str(info.value)
    return str(info.value)


@pytest.mark.parametrize("keep", [0.0, 0.5, 0.99])
def test_truncated_data_names_the_parameter(saved, keep):
    """Cut inside the data: the error names a tensor that lies (partly) past the end."""
    model, path = saved
    header = read_header(path)
    blob = path.read_bytes()
    data_size = int((len(blob) - header.data_start) * keep)
    path.write_bytes(blob[: header.data_start + data_size])
    msg = _rejects(path, Net(), r"truncated: (parameter|tensor) '")
    cut_off = [k for k, (_, _, (_, end)) in header.tensors.items() if end > data_size]
    named = msg.split("'")[1]
    assert any(k == named or k.startswith(named + ".q") for k in cut_off), (msg, cut_off)


@pytest.mark.parametrize("size", [0, 5, 40])
def test_truncated_header(saved, size):
    _, path = saved
    path.write_bytes(path.read_bytes()[:size])
    _rejects(path, Net(), "too short|truncated or not safetensors")


def test_wrong_format_version(saved):
    _, path = saved
    _edit_parq(path, lambda doc: doc.update(version=2))
    _rejects(path, Net(), "version 2 is not supported .*version 1")


def test_not_a_parq_file(tmp_path):
    path = tmp_path / "plain.safetensors"
    save_file(Net().state_dict(), str(path))
    _rejects(path, Net(), "not a packed parq file")


def test_mismatched_shape_names_the_parameter(saved):
    _, path = saved
    other = Net()
    other.fc = torch.nn.Linear(12, 6)
    _rejects(path, other, r"parameter 'fc.weight' has shape \[5, 12\] in the file, \[6, 12\]")
    other = Net()
    other.conv.bias = torch.nn.Parameter(torch.zeros(4))  # a plain tensor
    _rejects(path, other, r"parameter 'conv.bias' has shape \[3\] in the file, \[4\]")


def test_missing_and_unexpected_names(saved):
    _, path = saved
    bigger = Net()
    bigger.extra = torch.nn.Parameter(torch.zeros(2))
    _rejects(path, bigger, "the model's 'extra' is missing from the file")
    smaller = Net()
    del smaller.vec
    _rejects(path, smaller, "'vec' is in the file but not in the model")


def test_missing_tensor_of_a_parameter(saved):
    _, path = saved
    header, data = _split(path)
    del header["conv.weight.qlevels"]
    _write(path, header, data)
    _rejects(path, Net(), r"parameter 'conv.weight' \(qlevels\) is missing from the file")


def test_inconsistent_metadata(saved):
    _, path = saved
    _edit_parq(path, lambda doc: doc["params"]["fc.weight"].update(w=3))
    _rejects(path, Net(), "parameter 'fc.weight': K=3 levels need w=2 bits")
    _edit_parq(path, lambda doc: doc["params"]["fc.weight"].update(w=2, rows=4))
    _rejects(path, Net(), "parameter 'fc.weight': channel layout of 4 x 12 does not cover")


def test_index_beyond_the_levels(saved):
    """Code 3 in a ternary stream (K = 3): caught before anything is written."""
    _, path = saved
    header = read_header(path)
    begin, _ = header.tensors["conv.weight.qidx"][2]
    blob = bytearray(path.read_bytes())
    blob[header.data_start + begin] = 0xFF
    path.write_bytes(bytes(blob))
    _rejects(path, Net(), r"parameter 'conv.weight': its packed indices hold a code >= K=3")


def test_save_rejects_levels_that_overflow_half(tmp_path):
    torch.manual_seed(0)
    model = Net()
    with torch.no_grad():
        model.fc.weight.mul_(1e6)
    base = torch.optim.SGD([{"params": [model.fc.weight], "quant_bits": 2}], lr=0.1)
    opt = QuantOptimizer(base, UnifQuantizer(), ProxHardQuant())
    with pytest.raises(ValueError, match="'fc.weight': levels up to .* overflow torch.float16"):
        save_quantized(tmp_path / "m.safetensors", model, opt)
    with pytest.raises(ValueError, match="levels_dtype must be one of"):
        save_quantized(tmp_path / "m.safetensors", model, opt, levels_dtype=torch.int8)
    assert not (tmp_path / "m.safetensors").exists()


def test_save_needs_the_quant_optimizer(tmp_path):
    model = Net()
    with pytest.raises(TypeError, match="QuantOptimizer that holds the model's levels, got SGD"):
        save_quantized(tmp_path / "m.safetensors", model, torch.optim.SGD(model.parameters()))


def test_nan_weights_are_rejected_at_save(tmp_path):
    model, opt = quantized_model("unif", 2, "channel")
    with torch.no_grad():
        model.vec[3] = float("nan")
    with pytest.raises(ValueError, match="parameter 'vec' holds NaN/Inf"):
        save_quantized(tmp_path / "m.safetensors", model, opt)


def _set_meta(path, key, value) -> None:
    """Replace one entry of the safetensors metadata map (the raw 'parq' string, or the map)."""
    header, data = _split(path)
    if key is None:
        header["__metadata__"] = value
    else:
        header["__metadata__"][key] = value
    _write(path, header, data)


@pytest.mark.parametrize(
    "edit, match",
    [
        (lambda p: _set_meta(p, "parq", "[1, 2]"), "'parq' metadata is not a JSON object"),
        (lambda p: _set_meta(p, "parq", '"text"'), "'parq' metadata is not a JSON object"),
        (lambda p: _set_meta(p, None, ["parq"]), "metadata is not a string map"),
        (lambda p: _write(p, [1, 2], b""), "header is not a JSON object"),
        (lambda p: _edit_parq(p, lambda d: d.update(params=[1, 2])), "'params' is not an object"),
        (lambda p: _edit_parq(p, lambda d: d.update(tensors=5)), "'tensors' is not a list"),
        (lambda p: _edit_parq(p, lambda d: d.update(tensors=[3])), "'tensors' is not a list"),
        (lambda p: _edit_parq(p, lambda d: d["params"].update(vec=[1])), "parameter 'vec'"),
        (lambda p: _edit_parq(p, lambda d: d.update(levels_dtype=[1])), "levels dtype"),
    ],
    ids=["list", "string", "map-list", "header-list", "params-list", "tensors-int",
         "tensors-ints", "entry-list", "levels-dtype-list"],
)  # fmt: skip
def test_metadata_of_the_wrong_json_type(saved, edit, match, capsys):
    """Valid JSON that is not what the format says: PackedFormatError naming the file, and
    the CLI exits 2 with one line (no traceback)."""
    from parq.export.__main__ import main

    _, path = saved
    edit(path)
    _rejects(path, Net(), match)
    for command in ("info", "report"):
        capsys.readouterr()
        assert main([command, str(path)]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and str(path) in err and "Traceback" not in err, err


@pytest.mark.parametrize("bad", ["nan", "inf", "unsorted"])
def test_levels_that_are_not_finite_or_not_sorted_are_rejected(saved, bad):
    """save_quantized never writes such levels; a file that holds them is refused on load."""
    from safetensors.torch import load_file

    _, path = saved
    tensors = load_file(str(path))
    header, _ = _split(path)
    levels = tensors["fc.weight.qlevels"]
    if bad == "unsorted":
        levels[2] = levels[2].flip(0)
    else:
        levels[2, 1] = float(bad)
    save_file(tensors, str(path), metadata=header["__metadata__"])
    _rejects(path, Net(), r"parameter 'fc.weight': its levels (are not finite|are not sorted)"
                          r".* first row 2")  # fmt: skip
