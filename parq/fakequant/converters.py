"""Converters of whole models with torchvision's module structure (SPEC.md §12).

``FusedResNet(net, weight_quantizer, acts_quantizer, *, quantize_first=False,
quantize_fc=False, fold_bn=False)`` and ``FusedMobileNetV2(...)`` (same arguments) build a
model whose layers are :class:`~parq.fakequant.wrappers.QWrapper` / ``QOp`` around the
*same* modules of ``net`` (the weights are kept and shared, not copied). torchvision is
not needed: the converters read the structure by attribute names.

* ResNet: ``conv1, bn1, relu, [maxpool], layer1 .. layerN, avgpool, fc``; blocks with
  ``conv1, bn1, conv2, bn2, [conv3, bn3], relu, downsample`` (``BasicBlock`` /
  ``Bottleneck``; ``downsample`` None or ``Sequential(Conv2d, BatchNorm2d)``). Any number
  of stages, so CIFAR-style ResNets (3 stages, no max-pool) convert too.
* MobileNetV2: ``features`` (``Conv2dNormActivation`` = ``Sequential(Conv2d,
  BatchNorm2d, ReLU6)``, and ``InvertedResidual`` with ``conv`` and
  ``use_res_connect``), ``classifier = Sequential(Dropout, Linear)``.

The quantizer arguments are factories ``module -> Quantizer`` (or None: no quantizer), so
that every layer gets its own observer; a factory may return None to skip a layer. Each
is called with the layer concerned: the conv / linear for its weights and for its output
(after BN and activation), the block for the output of a residual add (``QOp``), the
first conv for the network input, the fc for its input.

Quantized: every conv weight and conv(+BN)(+act) output, every residual add's output.
``quantize_first``: also the first conv's weights and the network input (else the image
and the first conv stay float; its output is quantized all the same).
``quantize_fc``: also the classifier's weights and its input (else it stays float).
``fold_bn``: QWrappers fold each BatchNorm into the quantized weights.
The logits are never quantized. In ``BYPASSED`` the converted model computes exactly what
``net`` computes (same ops, same order).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from parq.fakequant.quantizers import Quantizer
from parq.fakequant.wrappers import QOp, QWrapper

QuantizerFactory = Callable[[nn.Module], Quantizer | None]


def _factory(name: str, f: object) -> Callable[[nn.Module], Quantizer | None]:
    if f is None:
        return lambda module: None
    if isinstance(f, Quantizer) or not callable(f):
        raise TypeError(
            f"{name} must be a factory module -> Quantizer (one quantizer per layer, e.g. "
            f"lambda m: AffineQuantizer(8, ExpAvgMinMax())) or None, got {type(f).__name__}"
        )

    def make(module: nn.Module) -> Quantizer | None:
        q = f(module)
        if q is not None and not isinstance(q, Quantizer):
            raise TypeError(f"{name}({type(module).__name__}) returned {type(q).__name__}, "
                            "not a parq.fakequant Quantizer")  # fmt: skip
        return q

    return make


def _need(net: nn.Module, attrs: tuple[str, ...], what: str) -> None:
    if not isinstance(net, nn.Module):
        raise TypeError(f"net must be a torch.nn.Module, got {type(net).__name__}")
    missing = [a for a in attrs if not hasattr(net, a)]
    if missing:
        raise TypeError(
            f"{what}: {type(net).__name__} lacks {', '.join(missing)}; expected torchvision's "
            "module structure"
        )


class _ResidualAdd(nn.Module):
    """``a + b``, then ``act`` if given (the add of a residual block)."""

    def __init__(self, act: nn.Module | None) -> None:
        super().__init__()
        self.act = act

    def forward(self, a: Tensor, b: Tensor) -> Tensor:
        y = a + b
        return y if self.act is None else self.act(y)


class _FusedResBlock(nn.Module):
    """A ResNet ``BasicBlock`` or ``Bottleneck`` with every conv wrapped."""

    def __init__(self, block: nn.Module, where: str, wq, aq, fold_bn: bool) -> None:
        super().__init__()
        _need(block, ("conv1", "bn1", "conv2", "bn2", "relu", "downsample"), f"FusedResNet {where}")
        names = ["conv1", "conv2"] + (["conv3"] if hasattr(block, "conv3") else [])
        stages = []
        for i, n in enumerate(names):
            conv, bn = getattr(block, n), getattr(block, "bn" + n[-1])
            layers = [conv, bn] if i == len(names) - 1 else [conv, bn, block.relu]
            stages.append(QWrapper(layers, wq(conv), aq(conv), fold_bn))
        self.body = nn.Sequential(*stages)
        ds = block.downsample
        self.downsample = None
        if ds is not None:
            ds = list(ds) if isinstance(ds, nn.Sequential) else [ds]
            self.downsample = QWrapper(ds, wq(ds[0]), aq(ds[0]), fold_bn)
        self.add = QOp(_ResidualAdd(block.relu), aq(block))

    def forward(self, x: Tensor) -> Tensor:
        out = self.body(x)
        identity = x if self.downsample is None else self.downsample(x)
        return self.add(out, identity)


def _input_quant(aq, first: nn.Module, enabled: bool) -> QOp | None:
    return QOp(nn.Identity(), aq(first)) if enabled else None


class FusedResNet(nn.Module):
    """A ResNet (torchvision structure) with fake-quantized convs and adds (module doc)."""

    def __init__(
        self,
        net: nn.Module,
        weight_quantizer: QuantizerFactory | None,
        acts_quantizer: QuantizerFactory | None,
        *,
        quantize_first: bool = False,
        quantize_fc: bool = False,
        fold_bn: bool = False,
    ) -> None:
        super().__init__()
        _need(net, ("conv1", "bn1", "relu", "layer1", "avgpool", "fc"), "FusedResNet")
        wq = _factory("weight_quantizer", weight_quantizer)
        aq = _factory("acts_quantizer", acts_quantizer)
        self.input_quant = _input_quant(aq, net.conv1, quantize_first)
        first_wq = wq(net.conv1) if quantize_first else None
        self.stem = QWrapper([net.conv1, net.bn1, net.relu], first_wq, aq(net.conv1), fold_bn)
        self.maxpool = getattr(net, "maxpool", None) or nn.Identity()
        self.num_stages = 0
        while hasattr(net, f"layer{self.num_stages + 1}"):
            i = self.num_stages = self.num_stages + 1
            blocks = [_FusedResBlock(b, f"layer{i}.{j}", wq, aq, fold_bn)
                      for j, b in enumerate(getattr(net, f"layer{i}"))]  # fmt: skip
            setattr(self, f"layer{i}", nn.Sequential(*blocks))
        self.avgpool = net.avgpool
        self.fc_input = _input_quant(aq, net.fc, quantize_fc)
        self.fc = QWrapper([net.fc], wq(net.fc), None) if quantize_fc else net.fc

    def forward(self, x: Tensor) -> Tensor:
        """``(N, C, H, W)`` images -> ``(N, num_classes)`` logits."""
        if self.input_quant is not None:
            x = self.input_quant(x)
        x = self.maxpool(self.stem(x))
        for i in range(1, self.num_stages + 1):
            x = getattr(self, f"layer{i}")(x)
        x = torch.flatten(self.avgpool(x), 1)
        if self.fc_input is not None:
            x = self.fc_input(x)
        return self.fc(x)


class _FusedInvertedResidual(nn.Module):
    """A MobileNetV2 ``InvertedResidual``: its ``conv`` sequence wrapped, plus the add."""

    def __init__(self, block: nn.Module, where: str, wq, aq, fold_bn: bool) -> None:
        super().__init__()
        seq, body, i = list(block.conv), [], 0
        while i < len(seq):
            m = seq[i]
            if isinstance(m, nn.Sequential):  # Conv2dNormActivation
                group = list(m)
            elif isinstance(m, nn.Conv2d):  # the linear projection: Conv2d, BatchNorm2d
                group = seq[i : i + 2] if i + 1 < len(seq) else [m]
            else:
                raise TypeError(f"FusedMobileNetV2 {where}.conv[{i}]: unexpected "
                                f"{type(m).__name__}")  # fmt: skip
            body.append(QWrapper(group, wq(group[0]), aq(group[0]), fold_bn))
            i += 1 if isinstance(m, nn.Sequential) else len(group)
        self.conv = nn.Sequential(*body)
        self.add = QOp(_ResidualAdd(None), aq(block)) if block.use_res_connect else None

    def forward(self, x: Tensor) -> Tensor:
        y = self.conv(x)
        return y if self.add is None else self.add(x, y)


class FusedMobileNetV2(nn.Module):
    """A MobileNetV2 (torchvision structure) with fake-quantized convs and adds (module doc)."""

    def __init__(
        self,
        net: nn.Module,
        weight_quantizer: QuantizerFactory | None,
        acts_quantizer: QuantizerFactory | None,
        *,
        quantize_first: bool = False,
        quantize_fc: bool = False,
        fold_bn: bool = False,
    ) -> None:
        super().__init__()
        _need(net, ("features", "classifier"), "FusedMobileNetV2")
        wq = _factory("weight_quantizer", weight_quantizer)
        aq = _factory("acts_quantizer", acts_quantizer)
        features = []
        for i, m in enumerate(net.features):
            if hasattr(m, "conv") and hasattr(m, "use_res_connect"):
                features.append(_FusedInvertedResidual(m, f"features.{i}", wq, aq, fold_bn))
            elif isinstance(m, nn.Sequential) and len(m) > 0:
                w = wq(m[0]) if (i > 0 or quantize_first) else None
                features.append(QWrapper(list(m), w, aq(m[0]), fold_bn))
            else:
                raise TypeError(f"FusedMobileNetV2: features.{i} is a {type(m).__name__}, "
                                "expected Conv2dNormActivation or InvertedResidual")  # fmt: skip
        self.input_quant = _input_quant(aq, net.features[0][0], quantize_first)
        self.features = nn.Sequential(*features)
        head = list(net.classifier)
        if not head or not isinstance(head[-1], nn.Linear):
            raise TypeError("FusedMobileNetV2: classifier must end with a Linear")
        if quantize_fc:
            fc = head[-1]
            head[-1:] = [QOp(nn.Identity(), aq(fc)), QWrapper([fc], wq(fc), None)]
        self.classifier = nn.Sequential(*head)

    def forward(self, x: Tensor) -> Tensor:
        """``(N, 3, H, W)`` images -> ``(N, num_classes)`` logits."""
        if self.input_quant is not None:
            x = self.input_quant(x)
        x = F.adaptive_avg_pool2d(self.features(x), (1, 1))
        return self.classifier(torch.flatten(x, 1))


__all__ = ["FusedResNet", "FusedMobileNetV2", "QuantizerFactory"]
