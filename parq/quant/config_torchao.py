"""Drop-in for ``torchao.prototype.parq.quant.config_torchao`` (needs ``torchao``).

``StretchedIntxWeightConfig`` is torchao's own config class (so ``quantize_`` and
Hugging Face's ``TorchAoConfig`` serialization know it); the helpers are
:mod:`parq.export.torchao_configs`' under torchao's names.
"""

from parq.export.torchao_configs import (
    TRANSFORMERS_AVAIL,
    StretchedIntxWeightConfig,
    attach_hf_quantization_config,
    config_for_quantizer,
    is_hf_model,
)

_attach_hf_quantization_config = attach_hf_quantization_config
_get_config_from_quantizer = config_for_quantizer
_is_hf_model = is_hf_model

__all__ = ["StretchedIntxWeightConfig", "TRANSFORMERS_AVAIL"]
