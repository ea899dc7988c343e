"""Which torchao ``quantize_`` config represents a group trained with a torchao
quantizer, and how that choice is recorded on a Hugging Face model (needs ``torchao``).

Drop-in for ``torchao.prototype.parq.quant.config_torchao``: ``StretchedIntxWeightConfig``
is torchao's own config class (so ``quantize_`` and Hugging Face's ``TorchAoConfig``
serialization know it), and torchao's private helper names are kept as aliases
(``_get_config_from_quantizer``, ``_is_hf_model``, ``_attach_hf_quantization_config``).

The mapping is torchao PARQ's (``torchao.prototype.parq``), so a converted model is
the same whichever of the two trained it:

* ``Int4UnifTorchaoQuantizer``: ``Int4WeightOnlyConfig(group_size=quant_block_size)``
  (weight-only in both cases);
* ``StretchedUnifTorchaoQuantizer``: ``StretchedIntxWeightConfig`` (int8 dynamic
  activations; ``activation_quantization=None`` for weight-only);
* ``UnifTorchaoQuantizer``: ``Int8DynamicActivationIntxWeightConfig``, or
  ``IntxWeightOnlyConfig`` for weight-only.

Granularity: ``PerGroup(quant_block_size)`` when the group has a block size, else
``PerAxis(0)`` (one scale per output row).
"""

from __future__ import annotations

import importlib
from collections.abc import Callable

import torch
from torch import nn

from parq._torchao import torchao_missing
from parq.quant.quantizer import as_bits

try:
    from torchao.core.config import AOBaseConfig
    from torchao.prototype.parq import StretchedIntxWeightConfig
    from torchao.quantization import (
        Int4WeightOnlyConfig,
        Int8DynamicActivationIntxWeightConfig,
        IntxWeightOnlyConfig,
        MappingType,
        ModuleFqnToConfig,
        PerAxis,
        PerGroup,
    )

    from parq.quant.uniform_torchao import (
        _BIT_WIDTH_TO_DTYPE,
        Int4UnifTorchaoQuantizer,
        StretchedUnifTorchaoQuantizer,
        UnifTorchaoQuantizer,
    )
except ImportError as exc:
    raise torchao_missing("parq.quant.config_torchao", exc) from exc


def _transformers_available() -> bool:
    try:
        importlib.import_module("transformers")
    except ImportError:
        return False
    return True


TRANSFORMERS_AVAIL = _transformers_available()


def config_for_quantizer(
    quantizer: UnifTorchaoQuantizer,
    weight_only: bool,
    device: torch.device | None,
    b: int,
    block_size: int | None,
    version: int = 2,
) -> AOBaseConfig:
    """The torchao config that converts a group quantized with ``quantizer`` at ``b``
    bits (``block_size``: the group's ``quant_block_size``). ``device`` is accepted
    for torchao's signature and unused."""
    if not isinstance(quantizer, UnifTorchaoQuantizer):
        raise TypeError(
            "only torchao quantizers (UnifTorchaoQuantizer and its subclasses) have a torchao "
            f"config, got {type(quantizer).__name__}"
        )
    granularity = PerGroup(block_size) if block_size is not None else PerAxis(0)
    if isinstance(quantizer, Int4UnifTorchaoQuantizer):
        return Int4WeightOnlyConfig(group_size=block_size, version=version)
    b = as_bits(b)
    if isinstance(quantizer, StretchedUnifTorchaoQuantizer):
        config = StretchedIntxWeightConfig(
            b=b,
            quant_min=quantizer.quant_min,
            quant_max=quantizer.quant_max,
            granularity=granularity,
            version=version,
        )
        if weight_only:
            config.activation_quantization = None
        return config
    if b not in _BIT_WIDTH_TO_DTYPE:
        raise ValueError(f"torchao has no integer weight dtype for quant_bits={b} (needs 1..8)")
    weight_dtype = _BIT_WIDTH_TO_DTYPE[b]
    if weight_only:
        return IntxWeightOnlyConfig(
            weight_dtype=weight_dtype,
            granularity=granularity,
            mapping_type=quantizer.mapping_type,
            version=version,
        )
    return Int8DynamicActivationIntxWeightConfig(
        weight_dtype=weight_dtype,
        weight_granularity=granularity,
        weight_mapping_type=quantizer.mapping_type,
        act_mapping_type=MappingType.ASYMMETRIC,
        version=version,
    )


def is_hf_model(model: nn.Module) -> bool:
    """A Hugging Face ``transformers`` model (its ``config`` is a ``PretrainedConfig``)."""
    if not TRANSFORMERS_AVAIL:
        return False
    from transformers import PretrainedConfig

    return isinstance(getattr(model, "config", None), PretrainedConfig)


def attach_hf_quantization_config(
    model: nn.Module,
    filter_fns: list[Callable[..., bool]],
    configs: list[AOBaseConfig | None],
    module_to_config: dict[str, AOBaseConfig | None] | None = None,
) -> None:
    """Record the conversion on a Hugging Face model as ``model.config.quantization_config``
    (a ``TorchAoConfig`` over ``ModuleFqnToConfig``), so ``save_pretrained`` /
    ``from_pretrained`` reproduce it.

    ``filter_fns[i]`` selects the modules of ``configs[i]``; ``module_to_config`` may
    hold a ``"_default"`` config (for all remaining linear layers). Tied weights (named in
    ``model._tied_weights_keys``) and normalization layers are not converted.
    """
    if not is_hf_model(model):
        raise ValueError(
            f"attach_hf_quantization_config needs a Hugging Face model, got {type(model).__name__}"
        )
    if len(filter_fns) != len(configs):
        raise ValueError(
            f"filter_fns and configs must have the same length, got {len(filter_fns)} "
            f"and {len(configs)}"
        )
    from transformers import TorchAoConfig

    module_to_config = {} if module_to_config is None else module_to_config
    tied_keys = set(getattr(model, "_tied_weights_keys", None) or [])
    not_converted = []
    for name, module in model.named_modules():
        if not hasattr(module, "weight"):
            continue
        if f"{name}.weight" in tied_keys or "norm" in name:
            not_converted.append(name)
            continue
        for filter_fn, config in zip(filter_fns, configs, strict=True):
            if filter_fn(module):
                module_to_config[name] = config
    model.config.quantization_config = TorchAoConfig(
        quant_type=ModuleFqnToConfig(module_to_config),
        include_input_output_embeddings=True,
        modules_to_not_convert=not_converted,
    )


# torchao.prototype.parq's names for them
_get_config_from_quantizer = config_for_quantizer
_is_hf_model = is_hf_model
_attach_hf_quantization_config = attach_hf_quantization_config

__all__ = [
    "StretchedIntxWeightConfig",
    "TRANSFORMERS_AVAIL",
    "config_for_quantizer",
    "is_hf_model",
    "attach_hf_quantization_config",
]
