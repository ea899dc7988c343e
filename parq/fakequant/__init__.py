"""Fake quantization of weights and activations (SPEC.md §12; TorchQuant's model).

Quantizers are modules (an observer + a rule), wrappers apply them around layers, and a
state machine says which quantizers run and which observers update::

    from parq.fakequant import (AffineQuantizer, ExpAvgMinMax, BatchMinMax, QModuleState,
                                QWrapper, set_qmodule_state, qmodule_state)

    block = QWrapper([conv, bn, nn.ReLU()],
                     weight_quantizer=AffineQuantizer(4, BatchMinMax(per_channel=True),
                                                      symmetric=True, per_channel=True),
                     acts_quantizer=AffineQuantizer(8, ExpAvgMinMax()),
                     fold_bn=True)
    set_qmodule_state(model, QModuleState.QUANT_AWARE_TRAIN)   # train: observe + quantize
    with qmodule_state(model, QModuleState.QUANT_EVAL):        # evaluate with frozen ranges
        ...

Files: ``functional`` (the formulas, straight-through gradients, torch's fused kernels
where exact), ``observers``, ``quantizers``, ``state``, ``wrappers``
(``QWrapper``, ``QOp``, BatchNorm folding), ``converters`` (``FusedResNet``, ``FusedMobileNetV2``).
With ``QuantOptimizer``, PARQ quantizes the weights (``weight_quantizer=None``) and these
modules the activations.
"""

from parq.fakequant.converters import FusedMobileNetV2, FusedResNet
from parq.fakequant.functional import affine_quantize, gradient_clip, qfmt_quantize
from parq.fakequant.observers import BatchMinMax, ExpAvgMinMax, Observer, ObserverNotReadyError
from parq.fakequant.quantizers import AffineQuantizer, QfmtQuantizer, Quantizer
from parq.fakequant.state import QModule, QModuleState, qmodule_state, set_qmodule_state
from parq.fakequant.wrappers import QOp, QWrapper

__all__ = [
    "affine_quantize",
    "qfmt_quantize",
    "gradient_clip",
    "Observer",
    "BatchMinMax",
    "ExpAvgMinMax",
    "ObserverNotReadyError",
    "Quantizer",
    "AffineQuantizer",
    "QfmtQuantizer",
    "QModuleState",
    "QModule",
    "set_qmodule_state",
    "qmodule_state",
    "QWrapper",
    "QOp",
    "FusedResNet",
    "FusedMobileNetV2",
]
