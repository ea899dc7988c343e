"""Bad input raises a clear error that names the group / parameter (SPEC.md §1-§6)."""

from __future__ import annotations

import re

import pytest
import torch
from foundation_models import one_thread, reference_backend  # noqa: F401
from torch import nn

from parq.optim import (
    NMSGDOptimizer,
    NonFiniteParameterError,
    ProxBinaryRelax,
    ProxHardQuant,
    ProxPARQ,
    ProxSoftQuant,
    QuantOptimizer,
)
from parq.quant import (
    AsymUnifQuantizer,
    LSBQuantizer,
    MaxUnifQuantizer,
    TernaryUnifQuantizer,
    UnifQuantizer,
)


def make(quantizer=None, bits=2, shapes=((4, 3),), dtype=torch.float32, block=None, **kw):
    params = [nn.Parameter(torch.randn(s).to(dtype)) for s in shapes]
    free = nn.Parameter(torch.randn(3))
    group = {"params": params, "quant_bits": bits}
    if block is not None:
        group["quant_block_size"] = block
    base = torch.optim.SGD([{"params": [free]}, group], lr=0.1)
    return QuantOptimizer(base, quantizer or UnifQuantizer(), ProxHardQuant(), **kw), params


@pytest.mark.parametrize("bits", [-1, 9, 12, 15])
def test_quant_bits_out_of_range(bits):
    with pytest.raises(ValueError, match=re.escape("param_groups[1]") + ".*quant_bits.*0..8"):
        make(bits=bits)


def test_quant_bits_16_and_up_means_unquantized():
    opt, (p,) = make(bits=16)
    p.grad = torch.ones_like(p)
    opt.step()
    assert "latent" not in opt.state[p]


@pytest.mark.parametrize("bits", [2.0, True, "2"])
def test_quant_bits_must_be_int(bits):
    with pytest.raises(TypeError, match=re.escape("param_groups[1]") + ".*quant_bits"):
        make(bits=bits)


@pytest.mark.parametrize("quantizer", [UnifQuantizer(), AsymUnifQuantizer(), MaxUnifQuantizer()])
def test_ternary_bits_with_non_ternary_quantizer(quantizer):
    name = type(quantizer).__name__
    with pytest.raises(ValueError, match=re.escape("param_groups[1] (quant_bits=0)") + f".*{name}"):
        make(quantizer, bits=0)
    with pytest.raises(ValueError, match=name):
        quantizer.quantize(torch.randn(5), 0)


def test_maxunif_one_bit():
    with pytest.raises(ValueError, match=re.escape("param_groups[1] (quant_bits=1)")):
        make(MaxUnifQuantizer(), bits=1)
    with pytest.raises(ValueError, match="quant_bits >= 2"):
        MaxUnifQuantizer().quantize(torch.randn(5), 1)
    make(MaxUnifQuantizer(), bits=2)  # fine


@pytest.mark.parametrize("bits", [1, 2, 4, 8])
def test_ternary_unif_needs_zero_bits(bits):
    with pytest.raises(ValueError, match=re.escape("param_groups[1]") + ".*TernaryUnifQuantizer"):
        make(TernaryUnifQuantizer(), bits=bits)


@pytest.mark.parametrize("bits", [3, 4, 8])
def test_optimal_lsbq_needs_at_most_two_bits(bits):
    with pytest.raises(NotImplementedError, match=re.escape("param_groups[1]") + ".*optimal"):
        make(LSBQuantizer(optimal=True), bits=bits)
    with pytest.raises(NotImplementedError):
        LSBQuantizer(optimal=True).quantize(torch.randn(8), bits)


@pytest.mark.parametrize(
    ("shape", "block", "pattern"),
    [
        ((4, 6), 4, r"params\[0\] \(shape \(4, 6\)\).*quant_block_size=4"),  # doesn't divide
        ((2, 2, 4), 4, r"params\[0\] \(shape \(2, 2, 4\)\).*quant_block_size=4"),  # 3-D
        ((7,), 2, r"params\[0\] \(shape \(7,\)\).*quant_block_size=2"),  # 1-D, doesn't divide
        ((4, 4), 0, r"param_groups\[1\].*quant_block_size must be a positive int"),
        ((4, 4), -4, r"param_groups\[1\].*quant_block_size must be a positive int"),
        ((4, 4), 2.0, r"param_groups\[1\].*quant_block_size must be a positive int"),
    ],
)
def test_bad_block_size(shape, block, pattern):
    with pytest.raises(ValueError, match=r"param_groups\[1\]") as info:
        make(shapes=(shape,), block=block)
    assert re.search(pattern, str(info.value)), str(info.value)


def test_bad_block_size_in_add_param_group():
    opt, _ = make()
    with pytest.raises(ValueError, match=r"param_groups\[2\] params\[1\] \(shape \(3, 5\)\)"):
        opt.add_param_group(
            {
                "params": [nn.Parameter(torch.randn(2, 4)), nn.Parameter(torch.randn(3, 5))],
                "quant_bits": 2,
                "quant_block_size": 4,
            }
        )


@pytest.mark.parametrize(
    "build",
    [
        lambda s, e: ProxPARQ(s, e),
        lambda s, e: ProxSoftQuant(s, e),
        lambda s, e: ProxBinaryRelax(s, e),
    ],
)
@pytest.mark.parametrize(("start", "end"), [(5, 5), (6, 2)])
def test_anneal_start_before_end(build, start, end):
    with pytest.raises(ValueError, match="anneal_start < anneal_end"):
        build(start, end)


def test_other_prox_arguments():
    with pytest.raises(ValueError, match="steepness"):
        ProxPARQ(0, 5, steepness=0)
    with pytest.raises(ValueError, match="t_start"):
        ProxSoftQuant(0, 5, t_start=10.0, t_end=1.0)
    with pytest.raises(ValueError, match="t_power"):
        ProxSoftQuant(0, 5, t_power=0)


@pytest.mark.parametrize("dtype", [torch.int64, torch.int8, torch.complex64])
def test_integer_or_complex_param_in_quantized_group(dtype):
    bad = nn.Parameter(torch.ones(2, 3, dtype=dtype), requires_grad=dtype.is_complex)
    base = torch.optim.SGD(
        [{"params": [nn.Parameter(torch.randn(4)), bad], "quant_bits": 2}], lr=0.1
    )
    with pytest.raises(TypeError, match=r"param_groups\[0\] params\[1\] \(shape \(2, 3\)\)"):
        QuantOptimizer(base, UnifQuantizer(), ProxHardQuant())


@pytest.mark.parametrize("frac", [-0.1, 1.5])
def test_anneal_wd_frac_range(frac):
    with pytest.raises(ValueError, match="anneal_wd_frac"):
        make(anneal_wd_frac=frac)


def test_other_constructor_arguments():
    with pytest.raises(ValueError, match="quant_period"):
        make(quant_period=0)
    with pytest.raises(ValueError, match="warmup_steps"):
        make(warmup_steps=-1)
    with pytest.raises(ValueError, match="nm_gamma"):
        base = torch.optim.SGD([nn.Parameter(torch.randn(3))], lr=0.1)
        NMSGDOptimizer(base, UnifQuantizer(), ProxHardQuant(), nm_gamma=0.0)
    with pytest.raises(TypeError, match="quantizer"):
        make(quantizer="uniform")
    with pytest.raises(ValueError, match="scale_method"):
        UnifQuantizer(scale_method="median")


@pytest.mark.parametrize("fused", [True, False])
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_nonfinite_param_raises_at_update_step(fused, bad, dtype):
    opt, params = make(shapes=((4, 3), (2, 5)), dtype=dtype, quant_period=2, fused=fused)
    for p in params:
        p.grad = torch.ones_like(p)
    opt.step()  # update step, all finite
    params[1].grad[1, 2] = bad
    opt.step()  # not an update step: not checked (at most one check per quant_period)
    pattern = r"param_groups\[1\] params\[1\] \(shape \(2, 5\)"
    with pytest.raises(NonFiniteParameterError, match=pattern) as info:
        opt.step()  # update step: reports what the steps since the last update saw
    assert "check_finite=False" in str(info.value) and "at step 1" in str(info.value)
    assert issubclass(NonFiniteParameterError, FloatingPointError)


@pytest.mark.parametrize("fused", [True, False])
def test_check_finite_false_turns_the_error_off(fused):
    """No error; the NaN still does not enter the latent (the element keeps its old one)."""
    opt, params = make(quant_period=1, fused=fused, check_finite=False)
    params[0].grad = torch.ones_like(params[0])
    opt.step()
    before = opt.state[params[0]]["latent"].clone()
    params[0].grad[0, 0] = float("nan")
    opt.step()
    latent = opt.state[params[0]]["latent"]
    assert torch.isfinite(latent).all() and latent[0, 0] == before[0, 0]
    assert torch.isfinite(params[0]).all()


def test_tied_weight_listed_twice_is_refused():
    """Issue 22 item 4: a tensor listed twice in a quantized group (a tied embedding and
    head collected by hand) would get one latent overwritten by the other's projection."""
    emb = torch.nn.Embedding(16, 8)
    head = torch.nn.Linear(8, 16, bias=False)
    head.weight = emb.weight
    weights = [emb.weight, head.weight]
    with pytest.warns(UserWarning, match="duplicate"):  # torch's own warning
        base = torch.optim.SGD([{"params": weights, "quant_bits": 2}], lr=0.1)
    with pytest.raises(ValueError, match=r"params\[1\].*same tensor as params\[0\]"):
        QuantOptimizer(base, UnifQuantizer(), ProxHardQuant())
    once = [p for _, p in torch.nn.ModuleDict({"e": emb, "h": head}).named_parameters()]
    assert len(once) == 1  # named_parameters lists the tie once: the supported way
    opt = QuantOptimizer(torch.optim.SGD([{"params": once, "quant_bits": 2}], lr=0.1),
                         UnifQuantizer(), ProxHardQuant())  # fmt: skip
    extra = torch.nn.Parameter(torch.randn(4, 4))
    with pytest.raises(ValueError, match="same tensor"), pytest.warns(UserWarning):
        opt.add_param_group({"params": [extra, extra], "quant_bits": 2})
    assert len(opt.param_groups) == 1 and extra not in opt.state
