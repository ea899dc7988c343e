"""The step suite's headline model sets (``benchmarks/model_sets.py``) and the 3- / 4-bit
and model-set cases of ``benchmarks/step_bench.py``."""

from __future__ import annotations

import sys
from dataclasses import replace

import pytest
import torch
from torch import nn

from benchmarks import cli, model_sets, shapes, step_bench, tv_models

CPU = torch.device("cpu")
TINY = tuple(shapes.linear_stack(2, 64))


def _as_set(specs) -> set:
    return {(s.name, s.shape, s.quantized) for s in specs}


def _blocks(specs) -> list:
    return [s for s in specs if s.name.startswith("layers.")]


def test_specs_from_module_quantizes_weights_of_two_or_more_dimensions():
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = nn.Embedding(10, 4)
            self.fc = nn.Linear(4, 3)
            self.norm = nn.LayerNorm(3)
            self.attn = nn.MultiheadAttention(4, 2)
            self.cls_token = nn.Parameter(torch.zeros(1, 1, 4))

    specs = {s.name: s for s in model_sets.specs_from_module(model_sets.on_meta(M), "m.")}
    assert {n for n, s in specs.items() if s.quantized} == {
        "m.emb.weight", "m.fc.weight", "m.attn.in_proj_weight", "m.attn.out_proj.weight"
    }  # fmt: skip
    assert specs["m.cls_token"].shape == (1, 1, 4) and not specs["m.cls_token"].quantized


def test_resnet20_is_the_torchvision_layout_module_tree():
    specs, source = model_sets.resnet20()
    assert source == model_sets.TV_MODELS
    model = tv_models.resnet20()
    assert shapes.count(specs) == sum(p.numel() for p in model.parameters())
    convs = sum(m.weight.numel() for m in model.modules() if isinstance(m, nn.Conv2d | nn.Linear))
    assert shapes.count(specs, quantized=True) == convs


def test_shapes_fallback_without_the_libraries(monkeypatch):
    for name in ("timm", "torchvision", "transformers"):
        monkeypatch.setitem(sys.modules, name, None)  # import fails
    vit, source = model_sets.vit_b16_blocks(2)
    assert source == model_sets.SHAPES
    assert _as_set(vit) == _as_set(_blocks(shapes.vit_b16(depth=2)))
    assert shapes.count(vit) == 2 * 7_087_872  # one ViT-B/16 encoder block
    llama, source = model_sets.llama_blocks(0.25, 2)
    assert source == model_sets.SHAPES
    assert _as_set(llama) == _as_set(_blocks(shapes.llama_1b(scale=0.25, depth=2)))


def test_llama_blocks_from_transformers_match_the_shapes():
    pytest.importorskip("transformers")
    for scale, depth in ((0.25, 2), (1.0, 1)):
        specs, source = model_sets.llama_blocks(scale, depth)
        if source == model_sets.SHAPES:
            pytest.skip("transformers' LlamaModel does not build here")
        assert source == "module tree (transformers LlamaConfig)"
        assert _as_set(specs) == _as_set(_blocks(shapes.llama_1b(scale=scale, depth=depth)))


def test_vit_blocks_from_a_library_have_the_blocks_size():
    specs, source = model_sets.vit_b16_blocks(1)
    assert shapes.count(specs) == 7_087_872 and shapes.count(specs, quantized=True) == 7_077_888
    assert source in (model_sets.SHAPES, "module tree (timm)", "module tree (torchvision)")


def test_headline_model_cases():
    cases = step_bench.headline_model_cases(quick=True, repeats=5)
    assert len(cases) == 10 and {c.period for c in cases} == {10, 1}
    assert all(c.repeats == 5 and c.per_channel for c in cases)
    kinds = {(c.model.split("/")[0], c.base, c.quantizer, c.bits, c.prox) for c in cases}
    assert kinds == {
        ("resnet20", "sgd", "uniform", 2, "parq"),
        ("vit_b16-blocks", "adamw", "uniform", 2, "parq"),
        ("llama1b-blocks", "adamw", "uniform", 2, "parq"),
        ("llama1b-blocks", "adamw95", "maxunif", 4, "hard"),  # the 4-bit recipe
    }
    names = [c.name for c in cases]
    assert len(set(names)) == len(names)
    assert "llama1b-blocks/4x2L/maxunif4+hard/channel/adamw95/period10" in names
    # the recipe also in bf16 (torchao PARQ's Llama run), the rest in float32
    bf16 = [c.name for c in cases if c.dtype == torch.bfloat16]
    assert sorted(bf16) == [f"llama1b-blocks/4x2L/maxunif4+hard/channel/adamw95/period{p}/bf16"
                            for p in (1, 10)]  # fmt: skip
    full = {c.model for c in step_bench.headline_model_cases(quick=False)}
    assert full == {"resnet20", "vit_b16-blocks/12L", "llama1b-blocks/4L"}


def test_the_4bit_recipe_builds_adamw_095_and_15_levels():
    recipe = next(c for c in step_bench.headline_model_cases(quick=True) if c.base == "adamw95")
    tiny = replace(recipe, specs=TINY)
    for variant in ("base(fused=True)", "fused:cpu"):
        opt = step_bench.build(tiny, CPU, variant).optimizer
        base = getattr(opt, "base_optimizer", opt)
        assert isinstance(base, torch.optim.AdamW) and base.defaults["fused"]
        assert all(g["betas"] == (0.9, 0.95) for g in base.param_groups)
    opt.step()
    assert opt.state[opt.param_groups[0]["params"][0]]["quants"].shape == (64, 15)
    assert tiny.bytes("fused:cpu") == replace(tiny, base="adamw").bytes("fused:cpu")


@pytest.mark.parametrize(
    "quantizer, bits, levels",
    [("uniform", 3, 8), ("uniform", 4, 16), ("maxunif", 3, 7), ("maxunif", 4, 15),
     ("lsbq", 3, 8), ("lsbq", 4, 16)],
)  # fmt: skip
def test_low_bit_cases_step_with_their_level_count(quantizer, bits, levels):
    cases = [c for c in step_bench.low_bit_cases() if (c.quantizer, c.bits) == (quantizer, bits)]
    assert {(c.prox, c.base, c.period) for c in cases} == {
        (p, b, t) for p in ("hard", "parq") for b in ("sgd", "adamw") for t in (10, 1)
    }
    assert all(c.model == step_bench.HEADLINE and c.per_channel for c in cases)
    for case in cases[:2]:  # hard and PARQ
        period = step_bench.build(replace(case, specs=TINY), CPU, "fused:cpu")
        period()
        p = period.optimizer.param_groups[0]["params"][0]
        Q = period.optimizer.state[p]["quants"]
        assert Q.shape == (64, levels) and torch.isfinite(p).all()
        assert (p >= Q[:, :1] - 1e-6).all() and (p <= Q[:, -1:] + 1e-6).all()


def test_quick_mode_adds_the_model_sets_and_low_bit_cases():
    mode = cli.mode_config("quick")
    low = [c for c in mode.step_cases if c.bits in (3, 4) and c.model == step_bench.HEADLINE]
    assert len(low) == 24 * len(cli.QUICK_LOW_BIT_BASES)  # 2 periods x 2 bits x 3 x 2 prox
    assert all(c.skip == ("base", "generic", "fused-prox") for c in low)
    assert step_bench.variants(low[0], ["cpu"], fused_reference=False) == [
        "base(fused=True)", "fused:cpu", "stream"
    ]  # fmt: skip
    models = [c for c in mode.step_cases if c.repeats == cli.QUICK_MODEL_REPEATS]
    assert len(models) == 10 and all(c.skip == ("base",) for c in models)
    assert [c.model for c in mode.memory_cases] == [
        "8xLinear1024", "8xLinear1024", "resnet20", "vit_b16-blocks/2L", "llama1b-blocks/4x2L",
        "llama1b-blocks/4x2L", "llama1b-blocks/4x2L",
    ]  # fmt: skip
    assert [c.dtype for c in mode.memory_cases][-2:] == [torch.float32, torch.bfloat16]
    assert len({c.name for c in mode.step_cases}) == len(mode.step_cases)  # names are unique
    host = [c for c in mode.step_cases if c.model == step_bench.HOST]
    assert [(c.base, c.per_channel, c.period) for c in host] == [("sgd", False, 10),
                                                                 ("adamw", False, 10)]  # fmt: skip
    assert all(len(c.specs) == 8 and c.numel == 8 * 256 for c in host)
