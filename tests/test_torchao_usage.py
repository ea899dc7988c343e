"""torchao PARQ users' code with only the import path changed (``torchao.prototype.parq``
-> ``parq``): the usage patterns of torchao's own PARQ tests, written for this suite.

Needs ``torchao``; skipped with the reason without it. torchao runs several of these
only on GPUs; here they run on the CPU (int4 needs an sm90 GPU and is left out).
"""

from __future__ import annotations

import copy

import pytest
import torch
from foundation_models import one_thread  # noqa: F401
from torch import nn

pytest.importorskip("torchao", reason='needs torchao: pip install "torchao==0.18.0"')

from torchao.quantization.granularity import PerGroup  # noqa: E402
from torchao.quantization.qat import IntxFakeQuantizeConfig, QATConfig  # noqa: E402
from torchao.quantization.quant_api import (  # noqa: E402
    Int8DynamicActivationIntxWeightConfig,
    IntxWeightOnlyConfig,
    _is_linear,
    quantize_,
)
from torchao.quantization.quant_primitives import MappingType  # noqa: E402
from torchao.quantization.quantize_.workflows import IntxUnpackedToInt8Tensor  # noqa: E402

# the import paths a torchao PARQ user changes
from parq.optim import ProxHardQuant, ProxPARQ, QuantOptimizer  # noqa: E402
from parq.quant import (  # noqa: E402
    LSBQuantizer,
    StretchedIntxWeightConfig,
    StretchedUnifTorchaoQuantizer,
    TernaryUnifQuantizer,
    UnifQuantizer,
    UnifTorchaoQuantizer,
)
from parq.quant.config_torchao import (  # noqa: E402
    TRANSFORMERS_AVAIL,
    _attach_hf_quantization_config,
    _is_hf_model,
)
from parq.quant.uniform_torchao import _BIT_WIDTH_TO_DTYPE  # noqa: E402


class Net(nn.Module):
    def __init__(self, m=128, n=128, k=16, bias=False, embedding=True, tied=False):
        super().__init__()
        self._tied_weights_keys: dict[str, str] = {}
        self.embed_tokens = nn.Embedding(k, m) if embedding else nn.Identity()
        self.linear1 = nn.Linear(m, n, bias=bias)
        self.linear2 = nn.Linear(n, k, bias=bias)
        if embedding and tied:
            self.linear2.weight = self.embed_tokens.weight
            self._tied_weights_keys["linear2.weight"] = "embed_tokens.weight"

    def example_inputs(self):
        if isinstance(self.embed_tokens, nn.Identity):
            return torch.randn(1, self.linear1.in_features)
        return torch.randint(1, self.embed_tokens.num_embeddings, (1, self.linear1.in_features))

    def forward(self, x):
        return torch.sigmoid(self.linear2(torch.relu(self.linear1(self.embed_tokens(x)))))


def param_groups(model, b, group_size=None, embed_b=4):
    linear, embed, other, seen = [], [], [], set()
    for module in model.children():
        for name, p in module.named_parameters():
            if name == "weight" and p.data_ptr() in seen:
                continue
            seen.add(p.data_ptr())
            if name == "weight" and _is_linear(module):
                linear.append(p)
            elif name == "weight" and isinstance(module, nn.Embedding):
                embed.append(p)
            else:
                other.append(p)
    block = {"quant_block_size": group_size} if group_size else {}
    groups = [{"params": linear, "quant_bits": b, **block}, {"params": other}]
    if embed:
        groups.append({"params": embed, "quant_bits": embed_b})
    return groups


def embed_group_map(model, base, quantizer):
    embed_ptrs = {m.weight.data_ptr() for m in model.modules() if isinstance(m, nn.Embedding)}
    quantized = [g for g in base.param_groups if g.get("quant_bits", 16) < 16]
    for i, group in enumerate(quantized):
        if all(p.data_ptr() in embed_ptrs for p in group["params"]):
            return {"group_quantizer_map": {i: quantizer}}
    raise AssertionError("no embedding group")


@pytest.mark.parametrize("b", [0, 1, 2, 4])
@pytest.mark.parametrize("unif", [True, False])
@pytest.mark.parametrize("hard", [True, False])
@pytest.mark.parametrize("embed_map", [True, False])
def test_train_loop_reaches_the_level_count(b, unif, hard, embed_map):
    model = Net(bias=True)
    quantizer = (TernaryUnifQuantizer() if b == 0 else UnifQuantizer()) if unif else LSBQuantizer()
    base = torch.optim.AdamW(param_groups(model, b, embed_b=b))
    prox = ProxHardQuant() if hard else ProxPARQ(anneal_start=0, anneal_end=2)
    kw = embed_group_map(model, base, type(quantizer)()) if embed_map else {}
    optimizer = QuantOptimizer(base, quantizer, prox, **kw)
    for _ in range(3):
        model(model.example_inputs()).sum().backward()
        optimizer.step()
    for child in model.children():
        if isinstance(child, nn.Linear):
            assert child.weight.unique().numel() == quantizer.get_quant_size(b)


def quantized_like(model, quantizer, b, group_size):
    """Each linear weight quantized the way the optimizer cuts it (rows of group_size)."""
    out = {}
    for name, module in model.named_children():
        if _is_linear(module):
            w = module.weight.detach()
            q, _ = quantizer.quantize(w.view(-1, group_size), b=b, dim=-1)
            out[name] = q.view(w.shape)
    return out


@pytest.mark.parametrize("b", [2, 3, 4, 8])
@pytest.mark.parametrize("group_size", [32, 128])
def test_intx_weight_only_matches_quantize_(b, group_size):
    model = Net()
    reference = copy.deepcopy(model).eval()
    config = IntxWeightOnlyConfig(
        weight_dtype=_BIT_WIDTH_TO_DTYPE[b], granularity=PerGroup(group_size)
    )
    quantize_(reference, config)
    for name, q in quantized_like(model, UnifTorchaoQuantizer(), b, group_size).items():
        assert torch.equal(q, getattr(reference, name).weight.dequantize()), name


def check_convert(model, reference, optimizer, weight_only):
    optimizer.zero_grad()
    optimizer.step()  # no gradients: quantize only
    trained = copy.deepcopy(model)
    optimizer.torchao_convert(model, weight_only=weight_only, embed_weight_only=True)
    x = model.example_inputs()
    torch.testing.assert_close(model(x), trained(x))
    for name, module in model.named_modules():
        if _is_linear(module):
            expected = getattr(reference, name).weight.dequantize()
            assert torch.equal(getattr(trained, name).weight, expected), name
            assert torch.equal(module.weight.dequantize(), expected), name


def check_subclasses(model, weight_only):
    tied = getattr(model, "_tied_weights_keys", {})
    for name, module in model.named_modules():
        if not hasattr(module, "weight") or f"{name}.weight" in tied:
            continue
        if _is_linear(module) or isinstance(module, nn.Embedding):
            assert isinstance(module.weight, IntxUnpackedToInt8Tensor), name
            dynamic = _is_linear(module) and not weight_only
            expected = "int8_asym_per_token" if dynamic else None
            assert module.weight.activation_quantization == expected, name


@pytest.mark.parametrize("b", [2, 3, 4, 8])
def test_intx_weight_only_end_to_end(b, group_size=32):
    model = Net(m=256, n=256, embedding=False)
    reference = copy.deepcopy(model).eval()
    quantize_(
        reference,
        IntxWeightOnlyConfig(weight_dtype=_BIT_WIDTH_TO_DTYPE[b], granularity=PerGroup(group_size)),
    )
    base = torch.optim.AdamW(param_groups(model, b, group_size))
    optimizer = QuantOptimizer(
        base, UnifTorchaoQuantizer(), ProxHardQuant(), quant_per_channel=True
    )
    check_convert(model, reference, optimizer, weight_only=True)
    check_subclasses(model, weight_only=True)


def stretched_config(quantizer, b, group_size, activations):
    return StretchedIntxWeightConfig(
        b=b,
        quant_min=quantizer.quant_min,
        quant_max=quantizer.quant_max,
        granularity=PerGroup(group_size),
        activation_quantization="int8_asym_per_token" if activations else None,
    )


@pytest.mark.parametrize("b", [2, 3])
def test_stretched_weight_only_end_to_end(b, group_size=32):
    model = Net(m=256, n=256, embedding=False)
    quantizer = StretchedUnifTorchaoQuantizer(b)
    reference = copy.deepcopy(model).eval()
    quantize_(reference, stretched_config(quantizer, b, group_size, False), filter_fn=_is_linear)
    base = torch.optim.AdamW(param_groups(model, b, group_size))
    optimizer = QuantOptimizer(base, quantizer, ProxHardQuant(), quant_per_channel=True)
    check_convert(model, reference, optimizer, weight_only=True)
    check_subclasses(model, weight_only=True)


def fake_quantize_activations(model, optimizer, dtype):
    config = IntxFakeQuantizeConfig(
        torch.int8, "per_token", is_symmetric=False, scale_precision=dtype
    )
    for filter_fn in optimizer.get_filter_fns(model):
        try:
            quantize_(
                model, QATConfig(activation_config=config, step="prepare"), filter_fn=filter_fn
            )
        except ValueError as exc:  # torchao has no activation fake quantization for embeddings
            assert "embedding" in str(exc)


@pytest.mark.parametrize("b", [2, 3])
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32, torch.bfloat16])
def test_stretched_tied_embedding_and_linear(b, dtype):
    model = Net(m=128, n=128, tied=True)
    quantizer = StretchedUnifTorchaoQuantizer(b)
    base = torch.optim.SGD(param_groups(model, b))
    kw = embed_group_map(model, base, UnifTorchaoQuantizer())
    optimizer = QuantOptimizer(base, quantizer, ProxHardQuant(), quant_per_channel=True, **kw)
    optimizer.zero_grad()
    optimizer.step()
    fake_quantize_activations(model, optimizer, dtype)
    optimizer.torchao_convert(model, embed_weight_only=True)
    check_subclasses(model, weight_only=False)
    assert torch.equal(model.embed_tokens.weight.qdata, model.linear2.weight.qdata)


@pytest.mark.parametrize("b", [2, 4, 8])
@pytest.mark.parametrize("group_size", [32, 128])
def test_int8_dynamic_activation_end_to_end(b, group_size):
    torch.manual_seed(1)
    model = Net(embedding=False, bias=True)
    x = model.example_inputs()
    reference = copy.deepcopy(model).eval()
    quantizer = UnifTorchaoQuantizer()
    quantize_(
        reference,
        Int8DynamicActivationIntxWeightConfig(
            weight_dtype=_BIT_WIDTH_TO_DTYPE[b],
            weight_granularity=PerGroup(group_size),
            weight_mapping_type=quantizer.mapping_type,
            act_mapping_type=MappingType.ASYMMETRIC,
        ),
    )
    expected = reference(x)
    base = torch.optim.SGD(param_groups(model, b, group_size))
    optimizer = QuantOptimizer(base, quantizer, ProxHardQuant(), quant_per_channel=True)
    optimizer.zero_grad()
    optimizer.step()
    fake_quantize_activations(model, optimizer, torch.float32)
    torch.testing.assert_close(model(x), expected, atol=0, rtol=0)
    optimizer.torchao_convert(model)
    torch.testing.assert_close(model(x), expected)
    check_subclasses(model, weight_only=False)


def test_hf_helpers_are_importable_and_refuse_plain_models():
    assert isinstance(TRANSFORMERS_AVAIL, bool)
    assert not _is_hf_model(Net())
    with pytest.raises(ValueError, match="Hugging Face model"):
        _attach_hf_quantization_config(Net(), [], [])
