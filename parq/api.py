"""Drop-in for ``torchao.prototype.parq.api``: build a QAT optimizer from
``(QuantConfig, filter_fn)`` pairs.

``QuantConfig``'s default quantizers and :func:`create_optimizer` need ``torchao``
(``pip install "torchao==0.18.0"``); with an explicit ``quantizer`` (any parq
``Quantizer``), :func:`create_param_groups_and_group_quantizer_map` works without it.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from parq.optim.proxmap import ProxHardQuant
from parq.optim.quantopt import QuantOptimizer
from parq.quant.quantizer import Quantizer, as_bits

logger = logging.getLogger(__name__)

FilterFn = Callable[[nn.Module, str], bool]


@dataclass(frozen=True, slots=True)
class QuantConfig:
    """How to quantize the parameters a filter selects.

    Args:
        bitwidth: bits per weight, >= 2 (becomes the group's ``quant_bits``).
        group_size: optional ``quant_block_size`` (> 0).
        quantizer: default ``StretchedUnifTorchaoQuantizer(bitwidth)`` for 2 and 3 bits,
            ``UnifTorchaoQuantizer()`` above (both need torchao).
    """

    bitwidth: int
    group_size: int | None = None
    quantizer: Quantizer | None = None

    def __post_init__(self) -> None:
        bitwidth = as_bits(self.bitwidth, "QuantConfig(bitwidth=...)")
        if bitwidth < 2:
            raise ValueError(f"QuantConfig(bitwidth=...) must be >= 2, got {self.bitwidth}")
        object.__setattr__(self, "bitwidth", bitwidth)
        if self.group_size is not None:
            group_size = as_bits(self.group_size, "QuantConfig(group_size=...)")
            if group_size <= 0:
                raise ValueError(
                    f"QuantConfig(group_size=...) must be positive, got {self.group_size}"
                )
            object.__setattr__(self, "group_size", group_size)
        if self.quantizer is None:
            from parq import quant

            if bitwidth in (2, 3):
                default = quant.StretchedUnifTorchaoQuantizer(b=bitwidth)
            else:
                default = quant.UnifTorchaoQuantizer()
            object.__setattr__(self, "quantizer", default)
        elif not isinstance(self.quantizer, Quantizer):
            raise TypeError(
                f"QuantConfig(quantizer=...) must be a parq Quantizer, got {type(self.quantizer)}"
            )


def create_param_groups_and_group_quantizer_map(
    model: nn.Module,
    quant_configs_and_filter_fns: list[tuple[QuantConfig, FilterFn]],
) -> tuple[list[dict[str, Any]], dict[int, Quantizer]]:
    """Parameter groups for the base optimizer and the ``group_quantizer_map``.

    Each parameter goes to the group of the one config whose ``filter_fn(owning_module,
    parameter_name)`` is true (two matches raise ``ValueError``), or to a last,
    unquantized group with ``weight_decay=0.0``. A parameter sharing memory with one
    already placed (tied weights) is skipped. Empty groups are dropped; the quantized
    groups come first, so a group's index is also its index among the quantized groups.
    """
    configs = [config for config, _ in quant_configs_and_filter_fns]
    for i, config in enumerate(configs):
        if not isinstance(config, QuantConfig):
            raise TypeError(
                f"quant_configs_and_filter_fns[{i}] must hold a QuantConfig, got {type(config)}"
            )
    quantized: list[list[nn.Parameter]] = [[] for _ in configs]
    unquantized: list[nn.Parameter] = []
    seen: dict[int, str] = {}
    for name, param in model.named_parameters():
        module_name, _, _ = name.rpartition(".")
        owner = model.get_submodule(module_name) if module_name else model
        ptr = param.data_ptr()
        if ptr and ptr in seen:  # another Parameter on the same memory (tied weights)
            logger.info("skipping %s: it shares memory with %s", name, seen[ptr])
            continue
        if ptr:
            seen[ptr] = name
        matches = [i for i, (_, fn) in enumerate(quant_configs_and_filter_fns) if fn(owner, name)]
        if len(matches) > 1:
            raise ValueError(
                f"parameter {name!r} matches more than one QuantConfig: "
                + ", ".join(repr(configs[i]) for i in matches)
            )
        (quantized[matches[0]] if matches else unquantized).append(param)
        logger.debug(
            "%s (%s): %s", name, type(owner).__name__, configs[matches[0]] if matches else None
        )

    param_groups: list[dict[str, Any]] = []
    group_quantizer_map: dict[int, Quantizer] = {}
    for config, params in zip(configs, quantized, strict=True):
        if not params:
            continue
        group: dict[str, Any] = {"params": params, "quant_bits": config.bitwidth}
        if config.group_size is not None:
            group["quant_block_size"] = config.group_size
        group_quantizer_map[len(param_groups)] = config.quantizer
        param_groups.append(group)
    if unquantized:
        param_groups.append({"params": unquantized, "weight_decay": 0.0})
    return param_groups, group_quantizer_map


def create_optimizer(
    model: nn.Module,
    quant_configs_and_filter_fns: list[tuple[QuantConfig, FilterFn]],
    base_optimizer_cls: type[torch.optim.Optimizer],
    base_optimizer_kwargs: dict[str, Any],
    *,
    warmup_steps: int = 0,
    quant_period: int = 1,
    quant_per_channel: bool = True,
) -> QuantOptimizer:
    """``QuantOptimizer(base_optimizer_cls(groups, **base_optimizer_kwargs),
    UnifTorchaoQuantizer(), ProxHardQuant(), ...)`` over the groups of
    :func:`create_param_groups_and_group_quantizer_map` (each quantized group uses its
    config's quantizer)."""
    from parq import quant

    param_groups, group_quantizer_map = create_param_groups_and_group_quantizer_map(
        model, quant_configs_and_filter_fns
    )
    base_optimizer = base_optimizer_cls(param_groups, **base_optimizer_kwargs)
    return QuantOptimizer(
        base_optimizer,
        quant.UnifTorchaoQuantizer(),
        ProxHardQuant(),
        warmup_steps=warmup_steps,
        quant_period=quant_period,
        quant_per_channel=quant_per_channel,
        group_quantizer_map=group_quantizer_map,
    )


__all__ = ["QuantConfig", "create_param_groups_and_group_quantizer_map", "create_optimizer"]
