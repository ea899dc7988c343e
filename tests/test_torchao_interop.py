"""The torchao surface (SPEC.md §1) against torchao's own PARQ (``torchao.prototype.parq``).

Needs ``torchao`` (``pip install "torchao==0.18.0"``; ``make setup`` installs it): skipped
with the reason without it. Everything here compares bitwise: our torchao quantizers
against torchao's, a model trained with our ``QuantOptimizer`` against the same model
trained with torchao's, and ``torchao_convert``'s converted tensors and outputs against
torchao's conversion of that model.
"""

from __future__ import annotations

import copy
import itertools
import sys
import types

import pytest
import torch
from foundation_models import one_thread  # noqa: F401
from torch import nn

torchao = pytest.importorskip("torchao", reason='needs torchao: pip install "torchao==0.18.0"')

import torchao.prototype.parq as ao_parq  # noqa: E402
from torchao.prototype.parq import api as ao_api  # noqa: E402
from torchao.quantization import (  # noqa: E402
    Int4WeightOnlyConfig,
    Int8DynamicActivationIntxWeightConfig,
    IntxWeightOnlyConfig,
    PerAxis,
    PerGroup,
    quantize_,
)
from torchao.quantization.quant_api import _is_linear  # noqa: E402

from parq import api  # noqa: E402
from parq.optim import ProxHardQuant, ProxPARQ, QuantOptimizer  # noqa: E402
from parq.quant import (  # noqa: E402
    Int4UnifTorchaoQuantizer,
    LSBQuantizer,
    StretchedIntxWeightConfig,
    StretchedUnifTorchaoQuantizer,
    UnifQuantizer,
    UnifTorchaoQuantizer,
)
from parq.quant import config_torchao as torchao_configs  # noqa: E402
from parq.quant.uniform_torchao import _BIT_WIDTH_TO_DTYPE  # noqa: E402

AO_QUANTIZER = {
    UnifTorchaoQuantizer: ao_parq.quant.UnifTorchaoQuantizer,
    StretchedUnifTorchaoQuantizer: ao_parq.quant.StretchedUnifTorchaoQuantizer,
    Int4UnifTorchaoQuantizer: ao_parq.quant.Int4UnifTorchaoQuantizer,
}


def twin(quantizer):
    """torchao's quantizer with the same settings."""
    if isinstance(quantizer, StretchedUnifTorchaoQuantizer):
        return ao_parq.quant.StretchedUnifTorchaoQuantizer(quantizer.b, quantizer.int_shift)
    return AO_QUANTIZER[type(quantizer)]()


# ---------------------------------------------------------------------------
# Quantizers
# ---------------------------------------------------------------------------

QUANTIZER_CASES = [
    (UnifTorchaoQuantizer, 2),
    (UnifTorchaoQuantizer, 3),
    (UnifTorchaoQuantizer, 4),
    (UnifTorchaoQuantizer, 8),
    (lambda: StretchedUnifTorchaoQuantizer(2), 2),
    (lambda: StretchedUnifTorchaoQuantizer(3), 3),
    (lambda: StretchedUnifTorchaoQuantizer(4, int_shift=1.0), 4),
    (Int4UnifTorchaoQuantizer, 4),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("dim", [-1, None])
@pytest.mark.parametrize(("make", "b"), QUANTIZER_CASES)
def test_quantizers_equal_torchao(make, b, dim, dtype):
    x = (torch.randn(48, 32) * torch.rand(48, 1)).to(dtype)
    x[3] = 0  # an all-zero group: the eps floor of the scale
    ours, theirs = make(), twin(make())
    q, Q = ours.quantize(x, b, dim)
    q_ref, Q_ref = theirs.quantize(x, b, dim)
    assert torch.equal(q, q_ref) and q.dtype == q_ref.dtype
    assert torch.equal(Q, Q_ref) and Q.shape == Q_ref.shape
    assert ours.get_quant_size(b) == theirs.get_quant_size(b) == Q.size(-1)
    assert torch.equal(x, x.clone())  # p untouched: quantize returned new tensors


@pytest.mark.parametrize("b", [2, 3])
@pytest.mark.parametrize("group_size", [32, 256])
def test_stretched_equals_unif_quantizer(b, group_size):
    """torchao's test: StretchedUnifTorchaoQuantizer(b) is UnifQuantizer() exactly."""
    p = torch.randn(512, 512).view(-1, group_size)
    q_ref, Q_ref = UnifQuantizer().quantize(p, b, dim=-1)
    q, Q = StretchedUnifTorchaoQuantizer(b).quantize(p, b, dim=-1)
    assert torch.equal(q, q_ref) and torch.equal(Q, Q_ref)


def test_unif_torchao_one_quantizer_many_bit_widths():
    """Ranges are derived per call (torchao's quantizer keeps the first one it saw)."""
    quantizer = UnifTorchaoQuantizer()
    assert [quantizer.get_quant_size(b) for b in (2, 4, 8)] == [4, 16, 256]
    assert quantizer.quant_min is None and quantizer.quant_max is None


def test_torchao_quantizer_bit_errors():
    with pytest.raises(ValueError, match="quant_bits in 1..8"):
        UnifTorchaoQuantizer().check_bits(0)
    with pytest.raises(ValueError, match=r"built for 2 bits, got quant_bits=3"):
        StretchedUnifTorchaoQuantizer(2).quantize(torch.randn(4, 8), 3, dim=-1)
    with pytest.raises(ValueError, match="int_shift"):
        StretchedUnifTorchaoQuantizer(1, int_shift=1.0)  # 2**0 - 1 = 0: one level
    with pytest.raises(ValueError, match="quant_min < quant_max"):
        UnifTorchaoQuantizer(quant_min=3, quant_max=3)


def test_bit_width_dtypes_match_torchao():
    from torchao.prototype.parq.quant.uniform_torchao import _BIT_WIDTH_TO_DTYPE as theirs

    assert {b: theirs[b] for b in range(1, 9)} == _BIT_WIDTH_TO_DTYPE


def test_stretched_config_is_torchaos_class():
    assert StretchedIntxWeightConfig is ao_parq.StretchedIntxWeightConfig


@pytest.mark.parametrize("b", [2, 3])
@pytest.mark.parametrize("group_size", [32, 512])
def test_stretched_config_converts_to_the_quantizer_values(b, group_size):
    """torchao's test: quantize_ with StretchedIntxWeightConfig dequantizes to exactly
    what the quantizer gives."""
    linear = nn.Linear(512, 64, bias=False)
    quantizer = StretchedUnifTorchaoQuantizer(b)
    q, _ = quantizer.quantize(linear.weight.detach().view(-1, group_size), b, dim=-1)
    config = StretchedIntxWeightConfig(
        b=b,
        quant_min=quantizer.quant_min,
        quant_max=quantizer.quant_max,
        granularity=PerGroup(group_size),
        activation_quantization=None,
    )
    quantize_(linear, config)
    assert torch.equal(linear.weight.dequantize(), q.view(64, 512))


# ---------------------------------------------------------------------------
# Configs
# ---------------------------------------------------------------------------


def test_config_for_quantizer_mapping():
    make = torchao_configs.config_for_quantizer
    c = make(Int4UnifTorchaoQuantizer(), False, None, 4, 32)
    assert isinstance(c, Int4WeightOnlyConfig) and c.group_size == 32
    c = make(StretchedUnifTorchaoQuantizer(2), False, None, 2, None)
    assert isinstance(c, StretchedIntxWeightConfig) and c.granularity == PerAxis(0)
    assert (c.b, c.quant_min, c.quant_max) == (2, -1.5, 1.5)
    assert c.activation_quantization == "int8_asym_per_token"
    c = make(StretchedUnifTorchaoQuantizer(3), True, None, 3, 64)
    assert c.activation_quantization is None and c.granularity == PerGroup(64)
    c = make(UnifTorchaoQuantizer(), True, None, 4, 16)
    assert isinstance(c, IntxWeightOnlyConfig) and c.weight_dtype == torch.int4
    c = make(UnifTorchaoQuantizer(), False, None, 8, None)
    assert isinstance(c, Int8DynamicActivationIntxWeightConfig) and c.weight_dtype == torch.int8
    with pytest.raises(TypeError, match="LSBQuantizer"):
        make(LSBQuantizer(), False, None, 2, None)


# ---------------------------------------------------------------------------
# torchao_convert: our optimizer vs torchao's, same model, same steps
# ---------------------------------------------------------------------------


class M(nn.Module):
    """torchao's test model: embedding -> linear -> relu -> linear -> sigmoid."""

    def __init__(self, m=64, n=64, k=16, bias=True, embedding=True, tied_weights=False):
        super().__init__()
        self._tied_weights_keys: dict[str, str] = {}
        self.embed_tokens = nn.Embedding(k, m) if embedding else nn.Identity()
        self.linear1 = nn.Linear(m, n, bias=bias)
        self.linear2 = nn.Linear(n, k, bias=bias)
        if embedding and tied_weights:
            self.linear2.weight = self.embed_tokens.weight
            self._tied_weights_keys["linear2.weight"] = "embed_tokens.weight"

    def example_inputs(self):
        if isinstance(self.embed_tokens, nn.Identity):
            return torch.randn(2, self.linear1.in_features)
        return torch.randint(1, self.embed_tokens.num_embeddings, (2, 8))

    def forward(self, x):
        return torch.sigmoid(self.linear2(torch.relu(self.linear1(self.embed_tokens(x)))))


def build_param_groups(model, b, group_size=None, embed_b=4):
    """torchao's test split: linear weights, embeddings (tied ones once), the rest."""
    quant, embed, rest, seen = [], [], [], set()
    for module in model.children():
        for name, p in module.named_parameters():
            if name == "weight":
                if p.data_ptr() in seen:
                    continue
                seen.add(p.data_ptr())
            if _is_linear(module) and name == "weight":
                quant.append(p)
            elif isinstance(module, nn.Embedding) and name == "weight":
                embed.append(p)
            else:
                rest.append(p)
    block = {"quant_block_size": group_size} if group_size else {}
    groups = [{"params": quant, "quant_bits": b, **block}, {"params": rest}]
    if embed:
        groups.append({"params": embed, "quant_bits": embed_b})
    return groups


def train_twins(make_quantizer, b, group_size, embedding, tied, steps=3, embed_quantizer=None):
    """The same model trained by our QuantOptimizer and by torchao's, in lockstep."""
    torch.manual_seed(0)
    model = M(embedding=embedding, tied_weights=tied)
    model_ao = copy.deepcopy(model)
    if tied:  # deepcopy keeps the tie; make it explicit for readers
        assert model_ao.linear2.weight is model_ao.embed_tokens.weight
    pairs = []
    for m, QO, Prox, wrap in (
        (model, QuantOptimizer, ProxHardQuant, lambda q: q),
        (model_ao, ao_parq.QuantOptimizer, ao_parq.ProxHardQuant, twin),
    ):
        base = torch.optim.AdamW(build_param_groups(m, b, group_size, embed_b=b), lr=1e-2)
        kw = {}
        if embedding:  # the embedding group is the second quantized group
            kw["group_quantizer_map"] = {1: wrap(embed_quantizer or make_quantizer())}
        opt = QO(base, wrap(make_quantizer()), Prox(), quant_per_channel=True, quant_period=2, **kw)
        pairs.append((m, opt))
    for _ in range(steps):
        x = model.example_inputs()
        for m, opt in pairs:
            opt.zero_grad()
            m(x).square().mean().backward()
            opt.step()
    for (name, p), p_ao in zip(model.named_parameters(), model_ao.parameters(), strict=True):
        assert torch.equal(p, p_ao), name
    return pairs


def assert_same_conversion(model, model_ao):
    x = model.example_inputs()
    assert torch.equal(model(x), model_ao(x))
    for (name, module), module_ao in zip(model.named_modules(), model_ao.modules(), strict=True):
        w, w_ao = getattr(module, "weight", None), getattr(module_ao, "weight", None)
        if w is None:
            continue
        assert type(w) is type(w_ao), name
        for attr in ("qdata", "scale", "zero_point"):
            if hasattr(w_ao, attr):
                assert torch.equal(getattr(w, attr), getattr(w_ao, attr)), (name, attr)
        if hasattr(w_ao, "activation_quantization"):
            assert w.activation_quantization == w_ao.activation_quantization, name


CONVERT_CASES = [  # (quantizer, bits, group size, embedding, tied)
    (UnifTorchaoQuantizer, 4, None, True, False),
    (UnifTorchaoQuantizer, 2, 16, True, False),
    (UnifTorchaoQuantizer, 8, 32, False, False),
    (lambda: StretchedUnifTorchaoQuantizer(2), 2, None, True, True),
    (lambda: StretchedUnifTorchaoQuantizer(3), 3, 16, True, True),
    (UnifTorchaoQuantizer, 4, 16, True, True),
]


@pytest.mark.parametrize(
    ("weight_only", "embed_weight_only"), list(itertools.product([False, True], repeat=2))
)
@pytest.mark.parametrize(("make", "b", "group_size", "embedding", "tied"), CONVERT_CASES)
def test_torchao_convert_equals_torchao(
    make, b, group_size, embedding, tied, weight_only, embed_weight_only
):
    (model, opt), (model_ao, opt_ao) = train_twins(make, b, group_size, embedding, tied)
    opt.torchao_convert(model, weight_only=weight_only, embed_weight_only=embed_weight_only)
    opt_ao.torchao_convert(model_ao, weight_only=weight_only, embed_weight_only=embed_weight_only)
    assert_same_conversion(model, model_ao)
    assert not model.training
    for name in ("linear1", "linear2"):
        assert hasattr(getattr(model, name).weight, "qdata"), name
    if tied:
        assert torch.equal(model.embed_tokens.weight.qdata, model.linear2.weight.qdata)


def test_torchao_convert_at_a_quantization_step_keeps_the_weights():
    """Right after an update step, the converted weights are the trained (projected) ones."""
    (model, opt), _ = train_twins(UnifTorchaoQuantizer, 4, 16, False, False, steps=3)
    projected = {n: m.weight.detach().clone() for n, m in model.named_children() if _is_linear(m)}
    opt.torchao_convert(model, weight_only=True)
    for name, weight in projected.items():
        assert torch.equal(getattr(model, name).weight.dequantize(), weight), name


def test_get_filter_fns_select_each_groups_modules():
    (model, opt), (model_ao, opt_ao) = train_twins(UnifTorchaoQuantizer, 4, None, True, False)
    ours = list(opt.get_filter_fns(model))
    theirs = list(opt_ao.get_filter_fns(model_ao))
    assert len(ours) == len(theirs) == 2
    for fn, fn_ao in zip(ours, theirs, strict=True):
        for (name, module), module_ao in zip(
            model.named_modules(), model_ao.modules(), strict=True
        ):
            # the models are copies: compare selection by position, not by pointer
            assert fn(module, name) == fn_ao(module_ao, name), name
    assert [n for n, m in model.named_modules() if ours[0](m, n)] == ["linear1", "linear2"]
    assert [n for n, m in model.named_modules() if ours[1](m, n)] == ["embed_tokens"]


def test_torchao_convert_leaves_non_torchao_groups_with_a_warning():
    torch.manual_seed(0)
    model = M(embedding=True)
    base = torch.optim.AdamW(build_param_groups(model, 2, embed_b=4), lr=1e-2)
    opt = QuantOptimizer(
        base,
        LSBQuantizer(),
        ProxPARQ(0, 4),
        quant_per_channel=True,
        group_quantizer_map={1: UnifTorchaoQuantizer()},
    )
    for _ in range(2):
        opt.zero_grad()
        model(model.example_inputs()).sum().backward()
        opt.step()
    linear_before = model.linear1.weight.detach().clone()
    with pytest.warns(UserWarning, match="group 0 uses LSBQuantizer"):
        opt.torchao_convert(model, weight_only=True)
    assert type(model.linear1.weight) is nn.Parameter
    assert torch.equal(model.linear1.weight, linear_before)  # projected, not restored
    assert hasattr(model.embed_tokens.weight, "qdata")


# ---------------------------------------------------------------------------
# Hugging Face: the quantization config recorded on the model (fake transformers)
# ---------------------------------------------------------------------------


class _PretrainedConfig:
    pass


class _TorchAoConfig:
    def __init__(self, quant_type, include_input_output_embeddings, modules_to_not_convert):
        self.quant_type = quant_type
        self.include_input_output_embeddings = include_input_output_embeddings
        self.modules_to_not_convert = modules_to_not_convert


@pytest.fixture
def fake_transformers(monkeypatch):
    module = types.ModuleType("transformers")
    module.PretrainedConfig = _PretrainedConfig
    module.TorchAoConfig = _TorchAoConfig
    monkeypatch.setitem(sys.modules, "transformers", module)
    monkeypatch.setattr(torchao_configs, "TRANSFORMERS_AVAIL", True)


@pytest.mark.filterwarnings("ignore:Config Deprecation")  # torchao's note on "_default"
def test_hf_model_gets_quantization_config(fake_transformers):
    (model, opt), _ = train_twins(UnifTorchaoQuantizer, 4, None, True, True)
    model.config = _PretrainedConfig()
    assert torchao_configs.is_hf_model(model)
    opt.torchao_convert(model)
    quantization_config = model.config.quantization_config
    assert quantization_config.include_input_output_embeddings is True
    assert quantization_config.modules_to_not_convert == ["linear2"]  # the tied pointer
    fqn_to_config = quantization_config.quant_type.fqn_to_config
    assert set(fqn_to_config) == {"_default", "embed_tokens"}
    assert isinstance(fqn_to_config["_default"], Int8DynamicActivationIntxWeightConfig)


def test_not_hf_without_transformers_config():
    assert not torchao_configs.is_hf_model(nn.Linear(2, 2))


# ---------------------------------------------------------------------------
# parq.api against torchao.prototype.parq.api
# ---------------------------------------------------------------------------


def test_quant_config_defaults_and_validation():
    assert isinstance(api.QuantConfig(2).quantizer, StretchedUnifTorchaoQuantizer)
    assert api.QuantConfig(3).quantizer.b == 3
    assert type(api.QuantConfig(4).quantizer) is UnifTorchaoQuantizer
    assert api.QuantConfig(8, group_size=32).group_size == 32
    with pytest.raises(ValueError, match="bitwidth"):
        api.QuantConfig(1)
    with pytest.raises(ValueError, match="group_size"):
        api.QuantConfig(4, group_size=0)
    with pytest.raises(AttributeError):
        api.QuantConfig(4).bitwidth = 2  # frozen


def _specs(mk):
    return [
        (mk.QuantConfig(4, group_size=16), lambda m, n: isinstance(m, nn.Linear) and "1" in n),
        # linear2.weight is tied to the embedding: named once, as embed_tokens.weight
        (mk.QuantConfig(2), lambda m, n: isinstance(m, nn.Linear) and "2" in n),
        (mk.QuantConfig(8), lambda m, n: isinstance(m, nn.Conv2d)),  # matches nothing
    ]


def test_param_groups_and_map_match_torchao(capsys):
    torch.manual_seed(0)
    model = M(tied_weights=True)
    groups, mapping = api.create_param_groups_and_group_quantizer_map(model, _specs(api))
    groups_ao, mapping_ao = ao_api.create_param_groups_and_group_quantizer_map(
        model, _specs(ao_api)
    )
    capsys.readouterr()  # torchao prints every parameter
    assert len(groups) == len(groups_ao) == 3
    for g, g_ao in zip(groups, groups_ao, strict=True):
        assert [id(p) for p in g["params"]] == [id(p) for p in g_ao["params"]]
        assert {k: v for k, v in g.items() if k != "params"} == {
            k: v for k, v in g_ao.items() if k != "params"
        }
    assert [len(g["params"]) for g in groups] == [2, 1, 1]  # linear1, linear2.bias, embedding
    assert sorted(mapping) == sorted(mapping_ao) == [0, 1]
    assert type(mapping[1]) is StretchedUnifTorchaoQuantizer


def test_two_matching_configs_raise():
    model = nn.Sequential(nn.Linear(4, 4))
    both = [(api.QuantConfig(4), lambda m, n: True), (api.QuantConfig(8), lambda m, n: True)]
    with pytest.raises(ValueError, match="'0.weight' matches more than one QuantConfig"):
        api.create_param_groups_and_group_quantizer_map(model, both)


def test_create_optimizer_trains_and_converts_like_torchao(capsys):
    torch.manual_seed(0)
    model = M(embedding=False)
    model_ao = copy.deepcopy(model)
    specs = [(api.QuantConfig(4, group_size=16), lambda m, n: _is_linear(m) and "weight" in n)]
    specs_ao = [
        (ao_api.QuantConfig(4, group_size=16), lambda m, n: _is_linear(m) and "weight" in n)
    ]
    opt = api.create_optimizer(model, specs, torch.optim.AdamW, {"lr": 1e-2})
    opt_ao = ao_api.create_optimizer(model_ao, specs_ao, torch.optim.AdamW, {"lr": 1e-2})
    capsys.readouterr()
    assert type(opt) is QuantOptimizer and opt.quant_period == 1 and opt.quant_per_channel
    for _ in range(3):
        x = model.example_inputs()
        for m, o in ((model, opt), (model_ao, opt_ao)):
            o.zero_grad()
            m(x).sum().backward()
            o.step()
    for p, p_ao in zip(model.parameters(), model_ao.parameters(), strict=True):
        assert torch.equal(p, p_ao)
    opt.torchao_convert(model, weight_only=True)
    opt_ao.torchao_convert(model_ao, weight_only=True)
    assert_same_conversion(model, model_ao)
