"""Models for the QAT examples.

* :class:`DigitsCNN`: a small CNN for the 8x8 scikit-learn digits (about 15k parameters).
* :class:`ActQuantDigitsCNN`: the same CNN (the same modules) with its activations
  fake-quantized by ``parq.fakequant`` (the weights are left to the optimizer: PARQ).
* :class:`ResNet20`: the CIFAR ResNet-20 of He et al. (2016): three stages of
  three basic blocks (16, 32, 64 channels), parameter-free option-A shortcuts
  (stride-2 subsampling plus zero channels), global average pooling. About
  0.27M parameters with 3 input channels and 10 classes. Any input size works
  (the digits images are 8x8, CIFAR's 32x32). ``benchmarks/shapes.py`` lists the
  same parameter shapes for the optimizer-step benchmarks.

torchvision is optional: :func:`build_model` offers its models only if
``import torchvision`` works.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from parq.fakequant import AffineQuantizer, ExpAvgMinMax, QOp, QWrapper


class DigitsCNN(nn.Module):
    """conv(1->w) -> conv(w->2w) -> pool -> conv(2w->2w) -> pool -> fc(8w->10), BN after
    each conv; ``w = 16`` gives about 15k parameters."""

    def __init__(self, num_classes: int = 10, in_channels: int = 1, width: int = 16) -> None:
        super().__init__()
        w = width
        self.conv1 = nn.Conv2d(in_channels, w, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(w)
        self.conv2 = nn.Conv2d(w, 2 * w, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(2 * w)
        self.conv3 = nn.Conv2d(2 * w, 2 * w, 3, padding=1, bias=False)
        self.bn3 = nn.BatchNorm2d(2 * w)
        self.fc = nn.Linear(2 * w * 2 * 2, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn1(self.conv1(x)))
        x = F.max_pool2d(F.relu(self.bn2(self.conv2(x))), 2)  # 8x8 -> 4x4
        x = F.max_pool2d(F.relu(self.bn3(self.conv3(x))), 2)  # 4x4 -> 2x2
        return self.fc(x.flatten(1))


class ActQuantDigitsCNN(nn.Module):
    """``cnn`` with ``bits``-bit activations: the input image and the output of every
    conv + BN + ReLU are fake-quantized (asymmetric affine, ranges from a bias-corrected
    EMA of the batch min / max, momentum 0.9), so every conv and the fc read ``bits``-bit
    inputs (max-pooling keeps values on the grid). The weights are ``cnn``'s own (shared,
    not copied) and not fake-quantized here: with ``QuantOptimizer`` PARQ quantizes them.
    The logits stay float. In ``QModuleState.BYPASSED`` (the default) this is ``cnn``."""

    def __init__(self, cnn: DigitsCNN, bits: int) -> None:
        super().__init__()

        def acts() -> AffineQuantizer:
            return AffineQuantizer(bits, ExpAvgMinMax(momentum=0.9))

        self.input = QOp(nn.Identity(), acts())
        self.block1 = QWrapper([cnn.conv1, cnn.bn1, nn.ReLU()], None, acts())
        self.block2 = QWrapper([cnn.conv2, cnn.bn2, nn.ReLU()], None, acts())
        self.block3 = QWrapper([cnn.conv3, cnn.bn3, nn.ReLU()], None, acts())
        self.fc = cnn.fc

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.block1(self.input(x))
        x = F.max_pool2d(self.block2(x), 2)  # 8x8 -> 4x4
        x = F.max_pool2d(self.block3(x), 2)  # 4x4 -> 2x2
        return self.fc(x.flatten(1))


class BasicBlock(nn.Module):
    """Two 3x3 conv + BN; option-A shortcut when the shape changes."""

    def __init__(self, c_in: int, c_out: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.stride = stride
        self.pad = c_out - c_in

    def shortcut(self, x: torch.Tensor) -> torch.Tensor:
        if self.stride != 1:
            x = x[:, :, :: self.stride, :: self.stride]
        if self.pad:
            x = F.pad(x, (0, 0, 0, 0, self.pad // 2, self.pad - self.pad // 2))
        return x

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class ResNet20(nn.Module):
    """CIFAR ResNet-20 (module doc); parameter names match ``benchmarks/shapes.py``."""

    def __init__(self, num_classes: int = 10, in_channels: int = 3, width: int = 16) -> None:
        super().__init__()
        widths = [width, 2 * width, 4 * width]
        self.conv1 = nn.Conv2d(in_channels, widths[0], 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(widths[0])
        c_in = widths[0]
        for s, c in enumerate(widths, start=1):
            blocks = []
            for b in range(3):
                blocks.append(BasicBlock(c_in, c, stride=2 if (s > 1 and b == 0) else 1))
                c_in = c
            setattr(self, f"layer{s}", nn.Sequential(*blocks))
        self.fc = nn.Linear(c_in, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d | nn.Linear):
                nn.init.kaiming_normal_(m.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        return self.fc(F.adaptive_avg_pool2d(x, 1).flatten(1))


def torchvision_available() -> bool:
    try:
        import torchvision  # noqa: F401
    except Exception:
        return False
    return True


MODELS = ("cnn", "resnet20")


def build_model(name: str, num_classes: int = 10, in_channels: int = 1) -> nn.Module:
    """``cnn``, ``resnet20``, or ``tv:<name>`` (a torchvision model, if installed)."""
    if name == "cnn":
        return DigitsCNN(num_classes, in_channels)
    if name == "resnet20":
        return ResNet20(num_classes, in_channels)
    if name.startswith("tv:"):
        if not torchvision_available():
            raise ValueError(f"model {name!r} needs torchvision, which is not installed")
        import torchvision

        return torchvision.models.get_model(name[3:], num_classes=num_classes)
    raise ValueError(f"unknown model {name!r}; choose from {MODELS} or tv:<torchvision name>")
