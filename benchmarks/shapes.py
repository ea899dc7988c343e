"""Parameter shapes of the models whose optimizer steps are benchmarked.

Each builder returns the list of :class:`ParamSpec` of a model (names, shapes,
and whether QAT would quantize the tensor: conv / linear / embedding weights
are quantized; biases, norms, class and position tokens are not). Only shapes
matter to an optimizer step, so no model is instantiated. ``scale`` shrinks the
widths (and the vocabulary) for quick CPU runs; ``scale=1`` is the real model.

* ResNet-20 (CIFAR, He et al. 2016, option-A shortcuts): the same shapes as
  ``examples/models.py::ResNet20`` (checked by the tests).
* ResNet-50 (ImageNet, torchvision layout, 1x1 downsample convolutions).
* ViT-B/16 (224x224, 1000 classes).
* A Llama-style decoder of about 1.2B parameters (Llama-3.2-1B shapes: width
  2048, 16 layers, grouped-query attention with 8 KV heads, SwiGLU 8192,
  vocabulary 128256, tied embeddings).
"""

from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass(frozen=True)
class ParamSpec:
    name: str
    shape: tuple[int, ...]
    quantized: bool

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


def _w(c: int, scale: float) -> int:
    return max(1, round(c * scale))


def _bn(name: str, c: int) -> list[ParamSpec]:
    return [ParamSpec(f"{name}.weight", (c,), False), ParamSpec(f"{name}.bias", (c,), False)]


def _linear(name: str, out_f: int, in_f: int, bias: bool = True) -> list[ParamSpec]:
    specs = [ParamSpec(f"{name}.weight", (out_f, in_f), True)]
    if bias:
        specs.append(ParamSpec(f"{name}.bias", (out_f,), False))
    return specs


def resnet20(scale: float = 1.0, num_classes: int = 10, in_channels: int = 3) -> list[ParamSpec]:
    widths = [_w(16, scale), _w(32, scale), _w(64, scale)]
    specs = [ParamSpec("conv1.weight", (widths[0], in_channels, 3, 3), True)]
    specs += _bn("bn1", widths[0])
    c_in = widths[0]
    for s, c in enumerate(widths, start=1):
        for b in range(3):
            pre = f"layer{s}.{b}"
            specs.append(ParamSpec(f"{pre}.conv1.weight", (c, c_in, 3, 3), True))
            specs += _bn(f"{pre}.bn1", c)
            specs.append(ParamSpec(f"{pre}.conv2.weight", (c, c, 3, 3), True))
            specs += _bn(f"{pre}.bn2", c)
            c_in = c
    return specs + _linear("fc", num_classes, c_in)


def resnet50(scale: float = 1.0, num_classes: int = 1000) -> list[ParamSpec]:
    stem = _w(64, scale)
    specs = [ParamSpec("conv1.weight", (stem, 3, 7, 7), True), *_bn("bn1", stem)]
    c_in = stem
    for s, (width, blocks) in enumerate(zip((64, 128, 256, 512), (3, 4, 6, 3), strict=True), 1):
        w = _w(width, scale)
        for b in range(blocks):
            pre = f"layer{s}.{b}"
            specs.append(ParamSpec(f"{pre}.conv1.weight", (w, c_in, 1, 1), True))
            specs += _bn(f"{pre}.bn1", w)
            specs.append(ParamSpec(f"{pre}.conv2.weight", (w, w, 3, 3), True))
            specs += _bn(f"{pre}.bn2", w)
            specs.append(ParamSpec(f"{pre}.conv3.weight", (4 * w, w, 1, 1), True))
            specs += _bn(f"{pre}.bn3", 4 * w)
            if b == 0:
                specs.append(ParamSpec(f"{pre}.downsample.0.weight", (4 * w, c_in, 1, 1), True))
                specs += _bn(f"{pre}.downsample.1", 4 * w)
            c_in = 4 * w
    return specs + _linear("fc", num_classes, c_in)


def vit_b16(scale: float = 1.0, depth: int = 12, num_classes: int = 1000) -> list[ParamSpec]:
    d = _w(768, scale)
    tokens = (224 // 16) ** 2 + 1
    specs = [
        ParamSpec("conv_proj.weight", (d, 3, 16, 16), True),
        ParamSpec("conv_proj.bias", (d,), False),
        ParamSpec("class_token", (1, 1, d), False),
        ParamSpec("pos_embedding", (1, tokens, d), False),
    ]
    for i in range(depth):
        pre = f"layers.{i}"
        specs += _bn(f"{pre}.ln_1", d)
        specs += _linear(f"{pre}.attn.in_proj", 3 * d, d)
        specs += _linear(f"{pre}.attn.out_proj", d, d)
        specs += _bn(f"{pre}.ln_2", d)
        specs += _linear(f"{pre}.mlp.0", 4 * d, d)
        specs += _linear(f"{pre}.mlp.3", d, 4 * d)
    return specs + _bn("ln", d) + _linear("head", num_classes, d)


def llama_1b(scale: float = 1.0, depth: int = 16, vocab: int | None = None) -> list[ParamSpec]:
    d, ffn = _w(2048, scale), _w(8192, scale)
    kv = _w(512, scale)
    vocab = vocab or _w(128256, scale)
    specs = [ParamSpec("embed_tokens.weight", (vocab, d), True)]
    for i in range(depth):
        pre = f"layers.{i}"
        specs.append(ParamSpec(f"{pre}.input_layernorm.weight", (d,), False))
        specs += _linear(f"{pre}.self_attn.q_proj", d, d, bias=False)
        specs += _linear(f"{pre}.self_attn.k_proj", kv, d, bias=False)
        specs += _linear(f"{pre}.self_attn.v_proj", kv, d, bias=False)
        specs += _linear(f"{pre}.self_attn.o_proj", d, d, bias=False)
        specs.append(ParamSpec(f"{pre}.post_attention_layernorm.weight", (d,), False))
        specs += _linear(f"{pre}.mlp.gate_proj", ffn, d, bias=False)
        specs += _linear(f"{pre}.mlp.up_proj", ffn, d, bias=False)
        specs += _linear(f"{pre}.mlp.down_proj", d, ffn, bias=False)
    return specs + [ParamSpec("norm.weight", (d,), False)]


def linear_stack(n: int = 8, features: int = 1024) -> list[ParamSpec]:
    """``n`` x ``Linear(features, features)``: the issue-4 CPU case."""
    specs: list[ParamSpec] = []
    for i in range(n):
        specs += _linear(f"{i}", features, features)
    return specs


def count(specs: list[ParamSpec], quantized: bool | None = None) -> int:
    """Total elements (of the quantized / unquantized tensors only, if given)."""
    return sum(s.numel for s in specs if quantized is None or s.quantized == quantized)
