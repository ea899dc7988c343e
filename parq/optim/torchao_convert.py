"""``QuantOptimizer.torchao_convert`` and ``get_filter_fns``: turn a model trained with
torchao quantizers into torchao's low-bit tensor subclasses.

Same semantics as torchao PARQ's ``QuantOptimizer.torchao_convert`` (and so the same
converted model): the latent (full-precision) weights are put back, then each quantized
group whose quantizer is a torchao one is converted by ``torchao.quantization.quantize_``
with the config of :func:`parq.quant.config_torchao.config_for_quantizer`, selecting
the group's modules by the data pointers of their parameters. Because the quantizer and
the config use the same torchao primitives, the converted weights equal the quantized
weights of a quantization-update step.

* ``weight_only=False`` gives int8 dynamic activations (``Int8DynamicActivationIntxWeightConfig``
  / ``StretchedIntxWeightConfig``); embeddings are always weight-only, unless their
  weight is tied to a linear layer (``model._tied_weights_keys``) and
  ``embed_weight_only=False``, where the embedding is converted like the linear layer.
* A Hugging Face model also gets ``model.config.quantization_config`` (the group that
  holds every linear layer becomes the ``"_default"``).

Groups with a non-torchao quantizer (``LSBQuantizer``, ``UnifQuantizer``, ...) have no
torchao tensor: they are left as they are (projected, not restored), with a warning.
torchao's own function stops with an ``AssertionError`` there.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from typing import TYPE_CHECKING

import torch
from torch import nn

from parq._torchao import require_torchao

if TYPE_CHECKING:
    from parq.quant.quantizer import Quantizer

# ``optimizer`` below is a parq.optim.QuantOptimizer (which imports this module through
# its public_surface mixin: annotated as torch's Optimizer so that no import goes back)
QuantOptimizer = torch.optim.Optimizer


def _data_ptr(t: torch.Tensor) -> int | None:
    try:
        return t.data_ptr()
    except RuntimeError:  # a tensor subclass without storage (already converted)
        return None


class GroupFilter:
    """``filter_fn(module, *args)`` for ``quantize_``: true iff one of ``module``'s own
    parameters shares its data pointer with a parameter of the quantized group."""

    def __init__(self, index: int, data_ptrs: set[int]) -> None:
        self.index = index
        self.data_ptrs = frozenset(data_ptrs)

    def __call__(self, module: nn.Module, *args: object) -> bool:
        return any(_data_ptr(p) in self.data_ptrs for p in module.parameters(recurse=False))

    def __repr__(self) -> str:
        return f"GroupFilter(quantized group {self.index}, {len(self.data_ptrs)} parameters)"


def get_filter_fns(
    optimizer: QuantOptimizer, model: nn.Module | None = None
) -> Iterator[GroupFilter]:
    """One filter per quantized parameter group, in order (``model`` is not needed:
    torchao's signature). Taken now, from the parameters as they are."""
    filters = [
        GroupFilter(i, {p.data_ptr() for p in group["params"]})
        for i, group in enumerate(optimizer.regularized_param_groups())
    ]
    return iter(filters)


def group_quantizer(optimizer: QuantOptimizer, index: int) -> Quantizer:
    """The quantizer of the ``index``-th quantized group."""
    mapping = optimizer.group_quantizer_map
    if mapping and index in mapping:
        return mapping[index]
    return optimizer.quantizer


@torch.no_grad()
def _restore_latents(optimizer: QuantOptimizer, groups: list[dict]) -> None:
    for group in groups:
        for p in group["params"]:
            latent = optimizer.state[p].get("latent") if p in optimizer.state else None
            if p.requires_grad and latent is not None:
                p.copy_(latent)


def torchao_convert(
    optimizer: QuantOptimizer,
    model: nn.Module,
    weight_only: bool = False,
    embed_weight_only: bool = False,
) -> None:
    """Convert ``model``'s quantized weights to torchao tensor subclasses, in place."""
    require_torchao("QuantOptimizer.torchao_convert")
    from torchao.quantization import quantize_
    from torchao.quantization.quant_api import _is_linear

    from parq.quant.config_torchao import (
        attach_hf_quantization_config,
        config_for_quantizer,
        is_hf_model,
    )
    from parq.quant.uniform_torchao import UnifTorchaoQuantizer

    model.eval()
    embed_ptrs: set[int] = set()
    linear_ptrs: set[int] = set()
    embeddings = []
    for module in model.modules():
        if isinstance(module, nn.Embedding):
            embeddings.append(module)
            embed_ptrs.add(module.weight.data_ptr())
        elif _is_linear(module) and module.weight.data_ptr() not in embed_ptrs:
            linear_ptrs.add(module.weight.data_ptr())

    tied_embeddings = not embed_weight_only and bool(getattr(model, "_tied_weights_keys", None))
    if tied_embeddings:  # the dynamic-activation transform reads `bias` of what it converts
        for module in embeddings:
            module.bias = None

    groups = list(optimizer.regularized_param_groups())
    filter_fns = list(get_filter_fns(optimizer, model))
    configs = []
    converted = []
    all_linear_index = -1
    for i, group in enumerate(groups):
        quantizer = group_quantizer(optimizer, i)
        params = group["params"]
        if not params:
            configs.append(None)
            continue
        if not isinstance(quantizer, UnifTorchaoQuantizer):
            warnings.warn(
                f"torchao_convert: quantized group {i} uses {type(quantizer).__name__}, which has "
                "no torchao tensor; its weights are left as they are (floating point)",
                stacklevel=3,
            )
            configs.append(None)
            continue
        ptrs = {p.data_ptr() for p in params}
        if ptrs == linear_ptrs:
            all_linear_index = i
        has_embedding = not ptrs.isdisjoint(embed_ptrs)
        configs.append(
            config_for_quantizer(
                quantizer,
                weight_only or (has_embedding and not tied_embeddings),
                params[0].device,
                group["quant_bits"],
                group.get("quant_block_size"),
            )
        )
        converted.append(group)
    _restore_latents(optimizer, converted)

    if is_hf_model(model):
        hf_filters, hf_configs = filter_fns[:], configs[:]
        module_to_config = None
        if all_linear_index > -1:
            module_to_config = {"_default": hf_configs.pop(all_linear_index)}
            hf_filters.pop(all_linear_index)
        attach_hf_quantization_config(model, hf_filters, hf_configs, module_to_config)

    for config, filter_fn in zip(configs, filter_fns, strict=True):
        if config is not None:
            quantize_(model, config, filter_fn=filter_fn)


__all__ = ["GroupFilter", "get_filter_fns", "group_quantizer", "torchao_convert"]
