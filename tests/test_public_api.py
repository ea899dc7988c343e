"""The public release's API beyond the classes (SPEC.md §1): ``parq.utils``,
``Quantizer.remove_mean``, ``normalized_mirror_sigmoid(t, t1, t2, s, c)``, integer-like
``quant_bits``, NM-SGD's positional order, constructor validation, and the
``ImportError`` of the torchao names when torchao is missing."""

from __future__ import annotations

import importlib
import math
import re
import sys

import numpy as np
import pytest
import torch
from foundation_models import one_thread, reference_backend  # noqa: F401
from torch import nn

import parq
from parq.optim import (
    NMSGDOptimizer,
    ProxHardQuant,
    ProxPARQ,
    QuantOptimizer,
    build_quant_optimizer,
)
from parq.optim.parq import normalized_mirror_sigmoid
from parq.quant import LSBQuantizer, MaxUnifQuantizer, Quantizer, UnifQuantizer
from parq.utils import channel_bucketize, is_dtensor

INSTALL = 'pip install "torchao==0.18.0"'

# ---------------------------------------------------------------------------
# parq.utils
# ---------------------------------------------------------------------------


def test_is_dtensor():
    assert is_dtensor(torch.randn(3)) is False
    assert is_dtensor(nn.Parameter(torch.randn(3))) is False
    assert is_dtensor(None) is False


def test_is_dtensor_true_for_a_dtensor():
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Replicate, distribute_tensor
    from torch.testing._internal.distributed.fake_pg import FakeStore

    assert not dist.is_initialized()
    dist.init_process_group("fake", store=FakeStore(), rank=0, world_size=1)
    try:
        mesh = init_device_mesh("cpu", (1,))
        assert is_dtensor(distribute_tensor(torch.randn(4), mesh, [Replicate()]))
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("right", [False, True])
@pytest.mark.parametrize("shape", [(5, 7), (3, 1), (1, 40), (4, 0)])
def test_channel_bucketize_is_rowwise_bucketize(right, shape):
    rows = shape[0]
    boundaries = torch.sort(torch.randn(rows, 4), dim=1).values
    x = torch.randn(shape)
    if shape[1] >= 2:  # values equal to a boundary: where right=False and True differ
        x[:, 0] = boundaries[:, 1]
        x[:, 1] = boundaries[:, 3]
    out = channel_bucketize(x, boundaries, right=right)
    assert out.dtype == torch.int64 and out.shape == x.shape
    for i in range(rows):
        assert torch.equal(out[i], torch.bucketize(x[i], boundaries[i], right=right))


def test_channel_bucketize_default_is_left_and_counts_levels_below():
    Q = torch.tensor([[-1.0, 0.0, 1.0], [0.0, 2.0, 4.0]])
    x = torch.tensor([[-2.0, -1.0, 0.5, 9.0], [0.0, 1.0, 4.0, 5.0]])
    assert channel_bucketize(x, Q).tolist() == [[0, 0, 2, 3], [0, 1, 2, 3]]
    assert channel_bucketize(x, Q, right=True).tolist() == [[0, 1, 2, 3], [1, 1, 3, 3]]


def test_channel_bucketize_rejects_bad_shapes():
    with pytest.raises(ValueError, match="2-D boundaries"):
        channel_bucketize(torch.randn(3), torch.randn(3))
    with pytest.raises(ValueError, match="first dimension"):
        channel_bucketize(torch.randn(2, 5), torch.randn(3, 4))


# ---------------------------------------------------------------------------
# Quantizer.remove_mean
# ---------------------------------------------------------------------------


def test_remove_mean_whole_tensor():
    p = torch.randn(4, 6)
    before = p.clone()
    centered, mean = Quantizer.remove_mean(p)
    assert mean.dim() == 0 and torch.equal(mean, p.mean())
    assert torch.equal(centered, p - p.mean())
    assert torch.equal(p, before)  # p is not modified


def test_remove_mean_per_row_keeps_dim():
    p = torch.randn(4, 6)
    centered, mean = UnifQuantizer.remove_mean(p, dim=-1)  # a static method on subclasses too
    assert mean.shape == (4, 1)
    assert torch.equal(mean, p.mean(dim=-1, keepdim=True))
    assert torch.allclose(centered.mean(dim=-1), torch.zeros(4), atol=1e-6)


class CenteredSign(Quantizer):
    """A user quantizer in the public style: centers with ``remove_mean``."""

    def get_quant_size(self, b):
        return 2

    def quantize(self, p, b, dim=None):
        x, mean = self.remove_mean(p.detach(), dim)
        s = x.abs().mean() if dim is None else x.abs().mean(dim=dim, keepdim=True)
        q = torch.where(x >= 0, s, -s) + mean
        Q = torch.cat([-s + mean, s + mean], dim=-1) if dim is not None else torch.stack([-s, s])
        return q, (Q if dim is not None else Q + mean)


def test_user_quantizer_calling_remove_mean_trains():
    w = nn.Parameter(torch.randn(3, 8) + 2.0)
    base = torch.optim.SGD([{"params": [w], "quant_bits": 1}], lr=0.1)
    opt = QuantOptimizer(base, CenteredSign(), ProxHardQuant(), quant_per_channel=True)
    for _ in range(3):
        w.grad = torch.randn_like(w)
        opt.step()
    for row, levels in zip(w.detach(), opt.state[w]["quants"], strict=True):
        assert set(row.tolist()) <= set(levels.tolist())


# ---------------------------------------------------------------------------
# normalized_mirror_sigmoid(t, t1, t2, s, c)
# ---------------------------------------------------------------------------


def _public_formula(t, t1, t2, s, c):
    """The public release's documented formula (normalized only for c = 0.5)."""
    f = (t - t1) / (t2 - t1)
    st = 1 / (1 + math.exp(s * (f - c)))
    s1, s2 = 1 / (1 + math.exp(-0.5 * s)), 1 / (1 + math.exp(0.5 * s))
    return (st - s2) / (s1 - s2)


@pytest.mark.parametrize("t", [100, 101, 137, 250, 399])
@pytest.mark.parametrize("s", [1.0, 10.0, 25.0])
def test_normalized_mirror_sigmoid_public_order_and_values(t, s):
    got = normalized_mirror_sigmoid(t, 100, 400, s, 0.5)
    assert got == pytest.approx(_public_formula(t, 100, 400, s, 0.5), rel=1e-12, abs=1e-15)


def test_normalized_mirror_sigmoid_ends_and_fix():
    assert normalized_mirror_sigmoid(10, 10, 20, 10.0, 0.3) == pytest.approx(1.0, abs=1e-12)
    assert normalized_mirror_sigmoid(20, 10, 20, 10.0, 0.3) == pytest.approx(0.0, abs=1e-12)
    # (fix) the public formula is not 1 at t1 for c != 0.5; ours is
    assert abs(_public_formula(10, 10, 20, 10.0, 0.3) - 1.0) > 1e-3


def test_prox_parq_schedule_is_normalized_mirror_sigmoid():
    prox = ProxPARQ(anneal_start=5, anneal_end=45, steepness=7.0, anneal_center=0.4)
    for t in (5, 12, 30, 44):
        assert prox.inv_slope(t) == max(
            torch.finfo(torch.float32).tiny, normalized_mirror_sigmoid(t, 5, 45, 7.0, 0.4)
        )


def test_normalized_mirror_sigmoid_errors_name_the_arguments():
    with pytest.raises(ValueError, match="t1 < t2"):
        normalized_mirror_sigmoid(5, 10, 10, 1.0, 0.5)
    with pytest.raises(ValueError, match=r"t1 <= t <= t2, got t=30"):
        normalized_mirror_sigmoid(30, 10, 20, 1.0, 0.5)


# ---------------------------------------------------------------------------
# Integer-like quant_bits
# ---------------------------------------------------------------------------


def _train(bits, steps=3):
    torch.manual_seed(1)
    w = nn.Parameter(torch.randn(4, 8))
    group = {"params": [w], "quant_bits": bits}
    opt = QuantOptimizer(
        torch.optim.SGD([group], lr=0.1), UnifQuantizer(), ProxHardQuant(), quant_period=2
    )
    for s in range(steps):
        w.grad = torch.full_like(w, 0.1 * (s + 1))
        opt.step()
    return w.detach(), opt


@pytest.mark.parametrize("bits", [np.int64(2), np.int32(2), torch.tensor(2)])
def test_integer_like_quant_bits_train_like_int(bits):
    expected, _ = _train(2)
    got, opt = _train(bits)
    assert torch.equal(got, expected)
    assert type(opt.param_groups[0]["quant_bits"]) is int


def test_integer_like_block_size():
    w = nn.Parameter(torch.randn(4, 8))
    group = {"params": [w], "quant_bits": 2, "quant_block_size": np.int64(4)}
    opt = QuantOptimizer(torch.optim.SGD([group], lr=0.1), UnifQuantizer(), ProxHardQuant(),
                         quant_per_channel=True)  # fmt: skip
    assert type(opt.param_groups[0]["quant_block_size"]) is int
    w.grad = torch.ones_like(w)
    opt.step()
    assert opt.state[w]["quants"].shape == (8, 4)


@pytest.mark.parametrize("bits", [np.float64(2.0), torch.tensor(2.0), np.bool_(True)])
def test_non_integer_quant_bits_still_rejected(bits):
    with pytest.raises(TypeError, match="quant_bits"):
        _train(bits)


@pytest.mark.parametrize("quantizer", [UnifQuantizer(), LSBQuantizer(), MaxUnifQuantizer()])
def test_quantizers_take_integer_like_bits(quantizer):
    x = torch.randn(6, 5)
    for b in (np.int64(3), torch.tensor(3)):
        assert quantizer.get_quant_size(b) == quantizer.get_quant_size(3)
        q, Q = quantizer.quantize(x, b, dim=-1)
        q3, Q3 = quantizer.quantize(x, 3, dim=-1)
        assert torch.equal(q, q3) and torch.equal(Q, Q3)


# ---------------------------------------------------------------------------
# NMSGDOptimizer / build_quant_optimizer: the public positional order
# ---------------------------------------------------------------------------


def _base():
    w = nn.Parameter(torch.randn(4, 3))
    return torch.optim.SGD([{"params": [w], "quant_bits": 2}], lr=0.1)


def test_nmsgd_nm_gamma_is_the_ninth_positional():
    opt = NMSGDOptimizer(_base(), UnifQuantizer(), ProxHardQuant(), 1, 5, True, True, 0.5, 4.0)
    assert opt.nm_gamma == 4.0
    assert (opt.warmup_steps, opt.quant_period, opt.quant_per_channel) == (1, 5, True)
    assert (opt.quant_shrink, opt.anneal_wd_frac, opt.group_quantizer_map) == (True, 0.5, None)


def test_nmsgd_group_quantizer_map_is_keyword_only():
    args = (_base(), UnifQuantizer(), ProxHardQuant(), 0, 10, False, False, 0.0, 4.0)
    with pytest.raises(TypeError):
        NMSGDOptimizer(*args, {0: LSBQuantizer()})
    opt = NMSGDOptimizer(*args, group_quantizer_map={0: LSBQuantizer()})
    assert isinstance(opt.group_quantizer_map[0], LSBQuantizer)


def test_build_quant_optimizer_positional_nm_gamma():
    nm = build_quant_optimizer(
        _base(), UnifQuantizer(), ProxHardQuant(), 0, 10, False, False, 0.0, 2.0
    )
    assert type(nm) is NMSGDOptimizer and nm.nm_gamma == 2.0
    plain = build_quant_optimizer(_base(), UnifQuantizer(), ProxHardQuant())
    assert type(plain) is QuantOptimizer
    mapped = build_quant_optimizer(
        _base(), UnifQuantizer(), ProxHardQuant(), nm_gamma=3.0, group_quantizer_map={}
    )
    assert type(mapped) is NMSGDOptimizer and mapped.group_quantizer_map == {}


# ---------------------------------------------------------------------------
# Construction-time validation
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("bad", [-1.0, 0.0, float("nan"), float("inf"), "1.1", True])
def test_lsbq_ternary_multiplier_must_be_finite_positive(bad):
    with pytest.raises(ValueError, match=re.escape("LSBQuantizer(ternary_multiplier=...)")):
        LSBQuantizer(ternary_multiplier=bad)


def test_lsbq_ternary_multiplier_accepts_positive_numbers():
    assert LSBQuantizer(ternary_multiplier=np.float32(0.7)).get_quant_size(0) == 3


def test_unif_int_shift_error_names_int_shift_and_the_bits_it_needs():
    quantizer = UnifQuantizer(int_shift=2.0)
    with pytest.raises(ValueError) as info:
        quantizer.quantize(torch.randn(8), 2)
    message = str(info.value)
    assert "int_shift=2.0" in message and "quant_bits >= 3" in message
    assert "2**(quant_bits-1)" in message
    q, Q = quantizer.quantize(torch.randn(8), 3)  # 2**2 - 2 = 2 > 0: five levels
    assert Q.numel() == 5


def test_unif_int_shift_error_at_optimizer_construction():
    w = nn.Parameter(torch.randn(4, 3))
    base = torch.optim.SGD([{"params": [w], "quant_bits": 2}], lr=0.1)
    with pytest.raises(
        ValueError, match=re.escape("param_groups[0] (quant_bits=2)") + ".*int_shift"
    ):
        QuantOptimizer(base, UnifQuantizer(int_shift=2.0), ProxHardQuant())


@pytest.mark.parametrize("arg", ["int_shift", "zero_point"])
def test_unif_non_finite_arguments_rejected(arg):
    with pytest.raises(ValueError, match=f"{arg}="):
        UnifQuantizer(**{arg: float("nan")})


# ---------------------------------------------------------------------------
# torchao names without torchao
# ---------------------------------------------------------------------------


@pytest.fixture
def without_torchao(monkeypatch):
    """Make ``import torchao`` fail, and forget every module that imported it."""
    cached = [
        name
        for name in sys.modules
        if name == "torchao"
        or name.startswith("torchao.")
        or name
        in (
            "parq.quant.uniform_torchao",
            "parq.quant.config_torchao",
        )
    ]
    for name in cached:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "torchao", None)


def _is_parq(name: str) -> bool:
    return name == "parq" or name.startswith("parq.")


@pytest.fixture
def fresh_parq(monkeypatch):
    """``parq`` imported anew (kernels stay imported: they register ops once); every
    ``parq`` module is put back as it was afterwards."""
    before = {name for name in sys.modules if _is_parq(name)}
    for name in before:
        monkeypatch.delitem(sys.modules, name)
    yield lambda: importlib.import_module("parq")
    for name in [n for n in sys.modules if _is_parq(n) and n not in before]:
        del sys.modules[name]  # imported by the test only; monkeypatch restores the rest


def test_parq_imports_without_torchao(without_torchao, fresh_parq):
    fresh = fresh_parq()
    assert fresh is not parq
    for module in ("parq.quant", "parq.optim", "parq.utils", "parq.api", "parq.export"):
        importlib.import_module(module)
    assert hasattr(fresh, "QuantOptimizer") and hasattr(fresh, "LSBQuantizer")


@pytest.mark.parametrize(
    ("module", "name"),
    [
        ("parq.quant", "UnifTorchaoQuantizer"),
        ("parq.quant", "StretchedUnifTorchaoQuantizer"),
        ("parq.quant", "Int4UnifTorchaoQuantizer"),
        ("parq.quant", "StretchedIntxWeightConfig"),
        ("parq", "UnifTorchaoQuantizer"),
        ("parq", "StretchedIntxWeightConfig"),
    ],
)
def test_torchao_names_raise_import_error_with_install_command(
    without_torchao, fresh_parq, module, name
):
    fresh_parq()
    owner = importlib.import_module(module)
    with pytest.raises(ImportError, match=re.escape(INSTALL)) as info:
        getattr(owner, name)
    assert f"{module}.{name}" in str(info.value)
    with pytest.raises(ImportError, match=re.escape(INSTALL)):
        exec(f"from {module} import {name}", {})


def test_torchao_modules_and_calls_raise_import_error(without_torchao, fresh_parq):
    fresh_parq()
    for module in ("parq.quant.uniform_torchao", "parq.quant.config_torchao"):
        with pytest.raises(ImportError, match=re.escape(INSTALL)):
            importlib.import_module(module)
    api = importlib.import_module("parq.api")
    optim = importlib.import_module("parq.optim")
    quant = importlib.import_module("parq.quant")  # the fresh modules' classes
    with pytest.raises(ImportError, match=re.escape(INSTALL)):
        api.QuantConfig(bitwidth=4)  # its default quantizer is a torchao one
    model = nn.Linear(4, 3)
    with pytest.raises(ImportError, match=re.escape(INSTALL)):
        api.create_optimizer(
            model, [(api.QuantConfig(4, quantizer=quant.UnifQuantizer()), lambda m, n: True)],
            torch.optim.SGD, {"lr": 0.1},
        )  # fmt: skip
    base = torch.optim.SGD([{"params": [model.weight], "quant_bits": 2}], lr=0.1)
    opt = optim.QuantOptimizer(base, quant.UnifQuantizer(), optim.ProxHardQuant())
    with pytest.raises(ImportError, match=re.escape(INSTALL)):
        opt.torchao_convert(model)
    assert len(list(opt.get_filter_fns(model))) == 1  # pure bookkeeping: no torchao needed


def test_api_with_parq_quantizers_needs_no_torchao(without_torchao, fresh_parq):
    fresh_parq()
    api = importlib.import_module("parq.api")
    quant = importlib.import_module("parq.quant")
    model = nn.Sequential(nn.Linear(4, 3), nn.Linear(3, 2))
    config = api.QuantConfig(bitwidth=2, quantizer=quant.LSBQuantizer())
    groups, mapping = api.create_param_groups_and_group_quantizer_map(
        model, [(config, lambda module, name: name.endswith("weight"))]
    )
    assert [len(g["params"]) for g in groups] == [2, 2]
    assert mapping == {0: config.quantizer}
