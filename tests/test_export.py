"""``save_quantized`` / ``load_quantized`` round trips (SPEC.md §10): every quantizer x
layout x bits, bitwise with float32 levels; half-precision levels within one rounding;
half-precision models; the stored indices are the weights' levels; a model that is not
hard-quantized is projected to its nearest levels, and the move is reported."""

from __future__ import annotations

import math
import pickle
import warnings

import pytest
import torch
from safetensors import safe_open
from torch import nn

from parq.export import load_quantized, save_quantized
from parq.optim import ProxHardQuant, ProxPARQ, QuantOptimizer
from parq.quant import (
    AsymUnifQuantizer,
    LSBQuantizer,
    MaxUnifQuantizer,
    TernaryUnifQuantizer,
    UnifQuantizer,
)
from parq_kernels import reference
from parq_kernels.pack_ops import index_width, unpack

QUANTIZERS = {
    "unif": (UnifQuantizer, (1, 2, 3, 4, 8)),
    "unif-center": (lambda: UnifQuantizer(center=True), (2,)),
    "maxunif": (MaxUnifQuantizer, (2, 3, 4, 8)),
    "ternary": (TernaryUnifQuantizer, (0,)),
    "asym": (AsymUnifQuantizer, (1, 2, 3, 4, 8)),
    "lsbq": (LSBQuantizer, (0, 1, 2, 3, 4, 8)),
    "lsbq-opt": (lambda: LSBQuantizer(optimal=True), (0, 1, 2)),
}
LAYOUTS = ("tensor", "channel", "block")
CASES = [(q, b, lay) for q, (_, bits) in QUANTIZERS.items() for b in bits for lay in LAYOUTS]


class Net(nn.Module):
    """Quantized: ``fc.weight`` (5, 12), ``conv.weight`` (3, 2, 3, 3; not with blocks),
    ``vec`` (8,); the biases and a buffer stay as they are."""

    def __init__(self, dtype: torch.dtype = torch.float32) -> None:
        super().__init__()
        self.fc = nn.Linear(12, 5, dtype=dtype)
        self.conv = nn.Conv2d(2, 3, 3, dtype=dtype)
        self.vec = nn.Parameter(torch.randn(8, dtype=dtype))
        self.register_buffer("count", torch.tensor(7))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv(x[:, :18].reshape(-1, 2, 3, 3)).flatten(1)
        return self.fc(x[:, :12]).sum(1) + h.sum(1) + (x[:, :8] * self.vec).sum(1)


def quantized_model(qname: str, bits: int, layout: str, prox=None, steps: int = 3,
                    dtype: torch.dtype = torch.float32, seed: int = 0):  # fmt: skip
    """A Net trained ``steps`` steps with the quantizer (hard by default: hard-quantized)."""
    torch.manual_seed(seed)
    model = Net(dtype)
    if layout == "block":
        qparams, others = [model.fc.weight, model.vec], [model.conv.weight]
        group = {"params": qparams, "quant_bits": bits, "quant_block_size": 4}
    else:
        qparams, others = [model.fc.weight, model.conv.weight, model.vec], []
        group = {"params": qparams, "quant_bits": bits}
    others += [model.fc.bias, model.conv.bias]
    base = torch.optim.SGD([group, {"params": others}], lr=0.05, momentum=0.9)
    opt = QuantOptimizer(base, QUANTIZERS[qname][0](), prox or ProxHardQuant(), quant_period=2,
                         quant_per_channel=layout != "tensor")  # fmt: skip
    x = torch.randn(4, 18, dtype=dtype)
    for _ in range(steps):
        opt.zero_grad()
        (model(x) ** 2).mean().backward()
        opt.step()
    return model, opt


def _same_model(a: nn.Module, b: nn.Module) -> None:
    for (name, x), (_, y) in zip(a.state_dict().items(), b.state_dict().items(), strict=True):
        assert x.dtype == y.dtype and torch.equal(x, y), name


@pytest.mark.parametrize("qname, bits, layout", CASES, ids=[f"{q}-b{b}-{lay}" for q, b, lay in
                                                           CASES])  # fmt: skip
def test_round_trip_is_bitwise_with_float32_levels(tmp_path, qname, bits, layout):
    model, opt = quantized_model(qname, bits, layout)
    path = tmp_path / "model.safetensors"
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a hard-quantized model moves nowhere: no warning
        result = save_quantized(path, model, opt, levels_dtype=torch.float32)
    assert result.max_moved == 0.0 and result.written
    names = {"tensor": ["fc.weight", "conv.weight", "vec"], "channel": ["fc.weight",
             "conv.weight", "vec"], "block": ["fc.weight", "vec"]}[layout]  # fmt: skip
    assert [p.name for p in result.params] == names
    K = opt.quantizer.get_quant_size(bits)
    for p in result.params:
        assert (p.bits, p.K, p.w) == (bits, K, index_width(K))
        assert p.layout == ("tensor" if layout == "channel" and p.name == "vec" else layout)
    torch.manual_seed(123)
    fresh = Net()
    load_quantized(path, fresh)
    _same_model(model, fresh)


def test_stored_indices_are_the_weights_levels(tmp_path):
    """Decoding the file by hand (unpack, gather) gives the weights: idx = position of
    the weight in its row's Q (SPEC.md §10)."""
    model, opt = quantized_model("lsbq", 2, "channel")
    path = tmp_path / "m.safetensors"
    save_quantized(path, model, opt, levels_dtype=torch.float32)
    with safe_open(str(path), framework="pt") as f:
        for name, p in (("fc.weight", model.fc.weight), ("conv.weight", model.conv.weight)):
            Q = f.get_tensor(f"{name}.qlevels")
            assert torch.equal(Q, opt.state[p]["quants"].reshape(Q.shape).sort(dim=1).values)
            idx = unpack([f.get_tensor(f"{name}.qidx")], [p.numel()], 2, "reference")[0]
            rows = p.detach().reshape(Q.size(0), -1)
            assert torch.equal(Q.gather(1, idx.long().view(rows.shape)), rows)
            assert f.get_tensor(f"{name}.qidx").numel() == math.ceil(p.numel() * 2 / 8)


@pytest.mark.parametrize("levels_dtype, eps", [(torch.float16, 2**-11), (torch.bfloat16, 2**-8)])
def test_half_levels_within_one_rounding(tmp_path, levels_dtype, eps):
    model, opt = quantized_model("unif", 3, "channel")
    path = tmp_path / "m.safetensors"
    save_quantized(path, model, opt, levels_dtype=levels_dtype)
    fresh = Net()
    load_quantized(path, fresh)
    for (name, x), (_, y) in zip(model.named_parameters(), fresh.named_parameters(), strict=True):
        if name in ("fc.weight", "conv.weight", "vec"):
            assert torch.equal(y, x.to(levels_dtype).float()), name  # Q[idx] rounded once
            assert ((y - x).abs() <= eps * x.abs()).all(), name
        else:
            assert torch.equal(x, y), name


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_half_precision_model_round_trip(tmp_path, dtype):
    """Weights stored in bf16/fp16 are their levels rounded: the index still finds the
    level, and Q[idx] cast to the dtype gives the weight back bitwise."""
    model, opt = quantized_model("lsbq", 2, "channel", dtype=dtype)
    path = tmp_path / "m.safetensors"
    assert save_quantized(path, model, opt, levels_dtype=torch.float32).max_moved == 0.0
    fresh = Net(dtype)
    load_quantized(path, fresh)
    _same_model(model, fresh)


def test_not_hard_quantized_is_projected_and_reported(tmp_path):
    """Mid-anneal weights (PARQ) are projected to the nearest level (SPEC.md §4 near);
    the largest move is returned and warned about; loading gives the projection."""
    model, opt = quantized_model("unif", 2, "channel", prox=ProxPARQ(0, 100), steps=4)
    path = tmp_path / "m.safetensors"
    expected, moved = {}, 0.0
    for name, p in (("fc.weight", model.fc.weight), ("conv.weight", model.conv.weight)):
        Q = opt.state[p]["quants"]
        x = p.detach().reshape(Q.size(0), -1)
        near = reference.nearest_level(x, Q)
        expected[name] = near.reshape(p.shape)
        moved = max(moved, float((x - near).abs().max()))
    assert moved > 1e-3  # the anneal has barely started: the weights are off their levels
    with pytest.warns(UserWarning, match="not hard-quantized.*largest move"):
        result = save_quantized(path, model, opt, levels_dtype=torch.float32)
    by_name = {p.name: p.moved for p in result.params}
    assert max(by_name["fc.weight"], by_name["conv.weight"]) == pytest.approx(moved, rel=1e-6)
    assert result.max_moved >= moved
    fresh = Net()
    load_quantized(path, fresh)
    assert torch.equal(fresh.fc.weight, expected["fc.weight"])
    assert torch.equal(fresh.conv.weight, expected["conv.weight"])


def test_parameter_without_levels_gets_its_quantizers_levels(tmp_path):
    """Before the first quantized step there are no stored levels: the group's quantizer
    computes them (as the step would) and the weights are projected."""
    torch.manual_seed(0)
    model = Net()
    base = torch.optim.SGD([{"params": [model.fc.weight], "quant_bits": 2}], lr=0.1)
    opt = QuantOptimizer(base, UnifQuantizer(), ProxHardQuant(), quant_per_channel=True)
    path = tmp_path / "m.safetensors"
    with pytest.warns(UserWarning, match="not hard-quantized"):
        save_quantized(path, model, opt, levels_dtype=torch.float32)
    _, Q = UnifQuantizer().quantize(model.fc.weight.detach(), 2, dim=-1)
    fresh = Net()
    load_quantized(path, fresh)
    assert torch.equal(fresh.fc.weight, reference.nearest_level(model.fc.weight.detach(), Q))


def test_loading_never_unpickles(tmp_path, monkeypatch):
    model, opt = quantized_model("lsbq", 2, "channel")
    path = tmp_path / "m.safetensors"
    save_quantized(path, model, opt)

    def forbidden(*args, **kwargs):
        raise AssertionError("pickle used")

    monkeypatch.setattr(torch, "load", forbidden)
    monkeypatch.setattr(pickle, "loads", forbidden)
    monkeypatch.setattr(pickle, "load", forbidden)
    load_quantized(path, Net())


def test_tied_parameters_are_stored_once(tmp_path):
    model, opt = quantized_model("unif", 2, "channel")
    model.alias = model.fc  # the same module (and weight) under a second name
    fresh = Net()
    fresh.alias = fresh.fc
    path = tmp_path / "m.safetensors"
    save_quantized(path, model, opt, levels_dtype=torch.float32)
    with safe_open(str(path), framework="pt") as f:
        assert not any(k.startswith("alias.") for k in f.keys())  # noqa: SIM118 (safe_open has no __iter__)
    load_quantized(path, fresh)
    _same_model(model, fresh)


@pytest.mark.parametrize("per_channel", [True, False])
def test_empty_parameter_round_trip(tmp_path, per_channel):
    def make():
        m = nn.Module()
        m.empty, m.w = nn.Parameter(torch.empty(0, 5)), nn.Parameter(torch.randn(3, 4))
        return m

    model = make()
    base = torch.optim.SGD([{"params": [model.empty, model.w], "quant_bits": 2}], lr=0.1)
    opt = QuantOptimizer(base, UnifQuantizer(), ProxHardQuant(), quant_per_channel=per_channel)
    model.w.grad, model.empty.grad = torch.randn(3, 4), torch.empty(0, 5)
    opt.step()
    path = tmp_path / "m.safetensors"
    result = save_quantized(path, model, opt, levels_dtype=torch.float32)
    assert [p.numel for p in result.params] == [0, 12]
    fresh = make()
    load_quantized(path, fresh)
    _same_model(model, fresh)
