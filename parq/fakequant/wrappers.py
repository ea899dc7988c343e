"""``QWrapper`` and ``QOp``: modules that fake-quantize weights and outputs (SPEC.md §12).

``QWrapper(layers, weight_quantizer=None, acts_quantizer=None, fold_bn=False)`` wraps one
of these sequences (a list, tuple, ``nn.Sequential`` or a single layer):

* ``Linear`` [+ ``ReLU`` | ``ReLU6`` | ``SiLU``]
* ``Conv2d`` [+ ``BatchNorm2d``] [+ ``ReLU`` | ``ReLU6`` | ``SiLU``]

``Conv2d`` keeps every argument (stride, padding incl. ``"same"``, dilation, groups, bias,
``padding_mode``: the layer's own ``_conv_forward`` runs). Anything else raises
``TypeError``. The wrapped layers are kept, not copied (their parameters are the
wrapper's). Forward, by the module's :class:`~parq.fakequant.state.QModuleState`:

``w -> [weight quantizer] -> conv / linear -> [BN] -> [act] -> [acts quantizer]``

``fold_bn=True`` (conv + BN only) folds the BatchNorm into the weight that the weight
quantizer observes and quantizes, in the states where the weight quantizer runs or
observes; in the others (``BYPASSED``, activation-only) the layers run as they are, so
``BYPASSED`` is the float model exactly. Per output channel ``c``, conv + BN computes
``gamma_c (conv(x, w)_c - mean_c) / sqrt(var_c + eps) + beta_c``; folded:
``w_fold = w * s``, ``b_fold = beta + (b - mean) * s``, ``s = gamma / sqrt(var + eps)``
(``b``: the conv bias, 0 if none; ``gamma = 1``, ``beta = 0`` without ``affine``), and
``y = conv(x, quantize(w_fold)) + b_fold``.

* Training (``bn.training``, or a BN without running statistics): the batch statistics
  are those of the float convolution ``conv(x, w)``, computed first (an extra conv, as in
  Jacob et al. 2018), with gradients through them as in BatchNorm; the running statistics
  are updated exactly as ``BatchNorm2d`` does (momentum or cumulative average, unbiased
  variance, ``num_batches_tracked``).
* Evaluation: the running statistics.

Without quantization this equals conv + BN within float32 rounding (tested).

``QOp(op, acts_quantizer)``: ``op(*args, **kwargs)`` (any callable, e.g. a residual add),
then its output fake-quantized by the state's activation actions.

Shapes: whatever the wrapped layers take, e.g. ``(N, C_in, H, W) -> (N, C_out, H', W')``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from parq.fakequant.quantizers import Quantizer
from parq.fakequant.state import QModule, apply_quantizer

ACTIVATIONS = (nn.ReLU, nn.ReLU6, nn.SiLU)
PATTERNS = (
    "Linear",
    "Linear, ReLU | ReLU6 | SiLU",
    "Conv2d",
    "Conv2d, BatchNorm2d",
    "Conv2d, ReLU | ReLU6 | SiLU",
    "Conv2d, BatchNorm2d, ReLU | ReLU6 | SiLU",
)


def _check_quantizer(name: str, q: object) -> Quantizer | None:
    if q is not None and not isinstance(q, Quantizer):
        raise TypeError(
            f"{name} must be a parq.fakequant Quantizer (AffineQuantizer, QfmtQuantizer, ...) "
            f"or None, got {type(q).__name__}"
        )
    return q


def _split(
    layers: Sequence[nn.Module],
) -> tuple[nn.Module, nn.BatchNorm2d | None, nn.Module | None]:
    """``(layer, bn, act)`` of an accepted pattern, else TypeError."""
    mods = list(layers)
    names = ", ".join(type(m).__name__ for m in mods) or "nothing"
    accepted = " / ".join(f"[{p}]" for p in PATTERNS)
    bad = TypeError(f"QWrapper: layers must be one of {accepted}; got [{names}]")
    if not mods or not isinstance(mods[0], nn.Linear | nn.Conv2d):
        raise bad
    layer, rest = mods[0], mods[1:]
    bn = None
    if rest and isinstance(rest[0], nn.BatchNorm2d):
        if not isinstance(layer, nn.Conv2d):
            raise bad
        bn, rest = rest[0], rest[1:]
        if bn.num_features != layer.out_channels:
            raise ValueError(
                f"QWrapper: BatchNorm2d({bn.num_features}) after a conv with "
                f"{layer.out_channels} output channels"
            )
    act = None
    if rest and isinstance(rest[0], ACTIVATIONS):
        act, rest = rest[0], rest[1:]
    if rest:
        raise bad
    return layer, bn, act


def _update_running_stats(bn: nn.BatchNorm2d, mean: Tensor, var: Tensor, n: int) -> None:
    """BatchNorm2d's running-statistics update from the batch ``mean`` and biased ``var``
    over ``n`` values per channel."""
    with torch.no_grad():
        factor = 0.0 if bn.momentum is None else bn.momentum
        if bn.num_batches_tracked is not None:
            bn.num_batches_tracked.add_(1)
            if bn.momentum is None:  # cumulative moving average
                factor = 1.0 / float(bn.num_batches_tracked)
        unbiased = var * (n / max(n - 1, 1))
        bn.running_mean.mul_(1 - factor).add_(mean, alpha=factor)
        bn.running_var.mul_(1 - factor).add_(unbiased, alpha=factor)


def folded_weight_and_bias(conv: nn.Conv2d, bn: nn.BatchNorm2d, x: Tensor) -> tuple[Tensor, Tensor]:
    """``(w_fold, b_fold)`` of shapes ``conv.weight.shape`` and ``(C_out,)`` for input ``x``
    (``(N, C_in, H, W)``; read only when batch statistics are used). Updates the running
    statistics in training mode (module doc)."""
    use_batch_stats = bn.training or bn.running_mean is None
    if use_batch_stats:
        y = conv._conv_forward(x, conv.weight, conv.bias)
        var, mean = torch.var_mean(y, dim=(0, 2, 3), unbiased=False)
        if bn.training and bn.running_mean is not None:
            _update_running_stats(bn, mean.detach(), var.detach(), y.numel() // y.size(1))
    else:
        mean, var = bn.running_mean, bn.running_var
    scale = torch.rsqrt(var + bn.eps)
    beta = None
    if bn.weight is not None:
        scale = bn.weight * scale
        beta = bn.bias
    w = conv.weight * scale.reshape(-1, 1, 1, 1)
    b = -mean * scale if conv.bias is None else (conv.bias - mean) * scale
    if beta is not None:
        b = b + beta
    return w, b


class QWrapper(QModule):
    """Fake-quantized ``Linear`` / ``Conv2d`` [+ BN] [+ activation] (module doc)."""

    def __init__(
        self,
        layers: nn.Module | Sequence[nn.Module],
        weight_quantizer: Quantizer | None = None,
        acts_quantizer: Quantizer | None = None,
        fold_bn: bool = False,
    ) -> None:
        super().__init__()
        if isinstance(layers, nn.Module) and not isinstance(layers, nn.Sequential | nn.ModuleList):
            layers = [layers]
        elif not isinstance(layers, Sequence | nn.Sequential | nn.ModuleList):
            raise TypeError(
                f"layers must be a layer or a sequence of layers, got {type(layers).__name__}"
            )
        self.layer, self.bn, self.act = _split(layers)
        self.weight_quantizer = _check_quantizer("weight_quantizer", weight_quantizer)
        self.acts_quantizer = _check_quantizer("acts_quantizer", acts_quantizer)
        if not isinstance(fold_bn, bool):
            raise TypeError(f"fold_bn must be a bool, got {type(fold_bn).__name__}")
        if fold_bn and self.bn is None:
            raise ValueError("fold_bn=True needs a BatchNorm2d after the Conv2d in layers")
        self.fold_bn = fold_bn

    def _op(self, x: Tensor, w: Tensor, b: Tensor | None) -> Tensor:
        if isinstance(self.layer, nn.Conv2d):
            return self.layer._conv_forward(x, w, b)
        return F.linear(x, w, b)

    def forward(self, x: Tensor) -> Tensor:
        a = self.actions
        wq = self.weight_quantizer
        weights_active = wq is not None and (a.observe_weights or a.quantize_weights)
        if weights_active and self.fold_bn:
            w, b = folded_weight_and_bias(self.layer, self.bn, x)
            w = apply_quantizer(wq, w, a.observe_weights, a.quantize_weights)
            y = self._op(x, w, b)
        else:
            w = self.layer.weight
            if weights_active:
                w = apply_quantizer(wq, w, a.observe_weights, a.quantize_weights)
            y = self._op(x, w, self.layer.bias)
            if self.bn is not None:
                y = self.bn(y)
        if self.act is not None:
            y = self.act(y)
        return apply_quantizer(self.acts_quantizer, y, a.observe_acts, a.quantize_acts)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, fold_bn={self.fold_bn}"


class QOp(QModule):
    """``op(*args, **kwargs)`` with its output fake-quantized (module doc). ``op``: any
    callable; an ``nn.Module`` is registered as a submodule."""

    def __init__(self, op: Callable[..., Tensor], acts_quantizer: Quantizer | None) -> None:
        super().__init__()
        if not callable(op):
            raise TypeError(
                f"op must be callable (a module or a function), got {type(op).__name__}"
            )
        self.op = op
        self.acts_quantizer = _check_quantizer("acts_quantizer", acts_quantizer)

    def forward(self, *args, **kwargs) -> Tensor:
        a = self.actions
        return apply_quantizer(self.acts_quantizer, self.op(*args, **kwargs), a.observe_acts,
                               a.quantize_acts)  # fmt: skip

    def extra_repr(self) -> str:
        name = self.op.__name__ if not isinstance(self.op, nn.Module) and hasattr(
            self.op, "__name__") else ""  # fmt: skip
        return f"{super().extra_repr()}{', op=' + name if name else ''}"


__all__ = ["QWrapper", "QOp", "PATTERNS", "ACTIVATIONS", "folded_weight_and_bias"]
