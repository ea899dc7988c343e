"""The model-shaped sets of the step suite's headline, from real module trees where installed.

An optimizer step only sees the parameters' shapes, so each set is a list of
:class:`~benchmarks.shapes.ParamSpec`; where a library that defines the model is
installed, the list is read from its module tree (built on the ``meta`` device: no
memory, no weights), else it comes from the shapes-only builders of
:mod:`benchmarks.shapes`. Each builder returns ``(specs, source)``, ``source`` naming
where the shapes came from (the report prints it beside the set).

* :func:`resnet20`: the CIFAR ResNet-20 of :mod:`benchmarks.tv_models` (torchvision's
  module structure: option-B 1x1 downsample shortcuts; torchvision itself has no
  ResNet-20), always a module tree.
* :func:`vit_b16_blocks`: ``depth`` ViT-B/16 encoder blocks at the real width (768,
  12 heads, MLP 3072, qkv bias): timm's ``vision_transformer.Block``, else
  torchvision's ``EncoderBlock``, else :func:`benchmarks.shapes.vit_b16`'s ``layers.*``.
* :func:`llama_blocks`: ``depth`` decoder layers of Llama-3.2-1B (width 2048, 32 heads of
  64, 8 KV heads, SwiGLU 8192, RMSNorm, no biases), widths times ``scale``: transformers'
  ``LlamaModel`` from a ``LlamaConfig``, else :func:`benchmarks.shapes.llama_1b`'s ``layers.*``.

Only the blocks are taken for the transformer sets (no token / patch embedding, no
head): they hold nearly all of a large model's quantized weights. A module tree's
tensor is quantized when it is a weight of dimension >= 2 (linear, convolution,
embedding and attention projection weights); biases, norms and tokens are not, as in
:mod:`benchmarks.shapes`.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from benchmarks import shapes, tv_models
from benchmarks.shapes import ParamSpec

SHAPES = "shapes (benchmarks/shapes.py)"
TV_MODELS = "module tree (benchmarks/tv_models.py, torchvision layout)"
VIT_WIDTH, VIT_HEADS, VIT_MLP = 768, 12, 3072
LLAMA = {"hidden": 2048, "ffn": 8192, "heads": 32, "kv_heads": 8}  # Llama-3.2-1B


def quantized(name: str, p: torch.Tensor) -> bool:
    """QAT's usual choice: weights of dimension >= 2 (module doc)."""
    return p.dim() >= 2 and name.rsplit(".", 1)[-1].endswith("weight")


def specs_from_module(module: nn.Module, prefix: str = "") -> list[ParamSpec]:
    """The :class:`ParamSpec` of every parameter of ``module``, in its own order."""
    return [
        ParamSpec(prefix + name, tuple(p.shape), quantized(name, p))
        for name, p in module.named_parameters()
    ]


def on_meta(build: Callable[[], nn.Module]) -> nn.Module:
    """``build()`` with parameters on the ``meta`` device (shapes only, no memory)."""
    with torch.device("meta"):
        return build()


def resnet20() -> tuple[list[ParamSpec], str]:
    """CIFAR ResNet-20 (10 classes) from :func:`benchmarks.tv_models.resnet20`."""
    return specs_from_module(on_meta(tv_models.resnet20)), TV_MODELS


def _timm_vit_blocks(depth: int) -> nn.Module:
    from timm.models.vision_transformer import Block

    return nn.Sequential(*[Block(VIT_WIDTH, VIT_HEADS, mlp_ratio=VIT_MLP / VIT_WIDTH,
                                 qkv_bias=True) for _ in range(depth)])  # fmt: skip


def _torchvision_vit_blocks(depth: int) -> nn.Module:
    from torchvision.models.vision_transformer import EncoderBlock

    return nn.Sequential(*[EncoderBlock(VIT_HEADS, VIT_WIDTH, VIT_MLP, 0.0, 0.0)
                           for _ in range(depth)])  # fmt: skip


def vit_b16_blocks(depth: int) -> tuple[list[ParamSpec], str]:
    """``depth`` ViT-B/16 encoder blocks (module doc)."""
    for source, build in (("timm", _timm_vit_blocks), ("torchvision", _torchvision_vit_blocks)):
        try:
            module = on_meta(lambda build=build: build(depth))
        except Exception:  # not installed, or does not import with this torch
            continue
        return specs_from_module(module, "layers."), f"module tree ({source})"
    specs = [s for s in shapes.vit_b16(depth=depth) if s.name.startswith("layers.")]
    return specs, SHAPES


def llama_config(scale: float, depth: int) -> dict:
    """Llama-3.2-1B's block sizes times ``scale`` (heads of 64 kept), ``depth`` layers."""
    d, ffn = round(LLAMA["hidden"] * scale), round(LLAMA["ffn"] * scale)
    heads = max(1, round(LLAMA["heads"] * scale))
    kv_heads = max(1, round(LLAMA["kv_heads"] * scale))
    return {"hidden_size": d, "intermediate_size": ffn, "num_attention_heads": heads,
            "num_key_value_heads": kv_heads, "head_dim": d // heads,
            "num_hidden_layers": depth}  # fmt: skip


def _transformers_llama_blocks(scale: float, depth: int) -> nn.Module:
    from transformers import LlamaConfig, LlamaModel

    config = LlamaConfig(vocab_size=64, attention_bias=False, mlp_bias=False,
                         tie_word_embeddings=True, **llama_config(scale, depth))  # fmt: skip
    return LlamaModel(config).layers


def llama_blocks(scale: float = 1.0, depth: int = 2) -> tuple[list[ParamSpec], str]:
    """``depth`` Llama-3.2-1B decoder layers, widths times ``scale`` (module doc)."""
    try:
        module = on_meta(lambda: _transformers_llama_blocks(scale, depth))
    except Exception:  # not installed, or does not import with this torch
        specs = [s for s in shapes.llama_1b(scale=scale, depth=depth, vocab=1)
                 if s.name.startswith("layers.")]  # fmt: skip
        return specs, SHAPES
    return specs_from_module(module, "layers."), "module tree (transformers LlamaConfig)"


def headline_sets(quick: bool) -> list[tuple[str, list[ParamSpec], str]]:
    """``(name, specs, source)`` of the headline's model sets: ResNet-20, ViT-B/16 blocks,
    Llama-style blocks (quick: 2 ViT blocks, 2 Llama layers at 1/4 width; full: 12 ViT
    blocks, 4 Llama layers at the real width)."""
    if quick:
        vit, llama = ("vit_b16-blocks/2L", 2), ("llama1b-blocks/4x2L", 0.25, 2)
    else:
        vit, llama = ("vit_b16-blocks/12L", 12), ("llama1b-blocks/4L", 1.0, 4)
    return [
        ("resnet20", *resnet20()),
        (vit[0], *vit_b16_blocks(vit[1])),
        (llama[0], *llama_blocks(*llama[1:])),
    ]
