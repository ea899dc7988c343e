"""Threshold ternary quantization (SPEC.md §9): a threshold ``D`` and one level per side."""

from __future__ import annotations

import math
import numbers

import torch
from torch import Tensor

from parq.quant.quantizer import Quantizer, as_bits, from_rows, rows_view

DELTA_METHODS = ("mean", "max")


def quantize_ternary_threshold(
    x: Tensor, delta_factor: float, method: str
) -> tuple[Tensor, Tensor]:
    """``(q, Q)`` for the rows of ``x`` (float32 ``(rows, n)``); ``Q = [-a_neg, 0, a_pos]``."""
    tiny = torch.finfo(x.dtype).tiny
    ax = x.abs()
    if x.size(1) == 0:
        stat = x.new_zeros(x.size(0), 1)
    elif method == "mean":
        stat = ax.mean(dim=1, keepdim=True)
    else:
        stat = ax.amax(dim=1, keepdim=True)
    D = delta_factor * stat
    pos, neg = x >= D, x <= -D
    n_pos = pos.sum(dim=1, keepdim=True)
    n_neg = neg.sum(dim=1, keepdim=True)
    a_pos = torch.where(pos, x, 0.0).sum(dim=1, keepdim=True) / n_pos.clamp_min(1)
    a_neg = torch.where(neg, -x, 0.0).sum(dim=1, keepdim=True) / n_neg.clamp_min(1)
    both_empty = D.clamp_min(tiny)
    a_pos, a_neg = (
        torch.where(n_pos > 0, a_pos, torch.where(n_neg > 0, a_neg, both_empty)),
        torch.where(n_neg > 0, a_neg, torch.where(n_pos > 0, a_pos, both_empty)),
    )
    q = torch.where(pos, a_pos, torch.where(neg, -a_neg, torch.zeros_like(x)))
    Q = torch.cat([-a_neg, torch.zeros_like(a_pos), a_pos], dim=1)
    return q, Q


class TernaryThresholdQuantizer(Quantizer):
    """Ternary weights with a threshold (``b == 0`` only; SPEC.md §9).

    ``D = delta_factor * mean|x|`` (``delta_method="max"``: ``delta_factor * max|x|``,
    with a factor such as 0.05); ``Q = [-a_neg, 0, a_pos]``, ``a_pos`` the mean of the
    ``x >= D``, ``a_neg`` the mean of ``-x`` over the ``x <= -D`` (an empty side takes the
    other's value, both empty ``max(D, tiny)``); ``q = a_pos`` where ``x >= D``, ``-a_neg``
    where ``x <= -D``, else 0. No fused kernel: the optimizer takes the generic path.
    """

    #: Why the fused ops do not serve this quantizer (parq.optim.routing records it).
    generic_path_reason = "threshold ternary quantizer: no fused kernel"

    def __init__(self, delta_factor: float = 0.7, delta_method: str = "mean") -> None:
        ok = isinstance(delta_factor, numbers.Real) and not isinstance(delta_factor, bool)
        if not (ok and math.isfinite(delta_factor) and delta_factor > 0):
            raise ValueError(
                f"TernaryThresholdQuantizer(delta_factor=...) must be a finite number > 0, "
                f"got {delta_factor!r}"
            )
        if delta_method not in DELTA_METHODS:
            raise ValueError(
                f"TernaryThresholdQuantizer(delta_method=...) must be one of {DELTA_METHODS}, "
                f"got {delta_method!r}"
            )
        super().__init__(center=False)
        self.delta_factor = float(delta_factor)
        self.delta_method = delta_method

    def check_bits(self, b: int) -> None:
        b = as_bits(b)
        if b != 0:
            raise ValueError(f"TernaryThresholdQuantizer needs quant_bits == 0 (ternary), got {b}")

    def get_quant_size(self, b: int) -> int:
        self.check_bits(b)
        return 3

    def quantize(self, p: Tensor, b: int, dim: int | None = None) -> tuple[Tensor, Tensor]:
        self.check_bits(b)
        q, Q = quantize_ternary_threshold(rows_view(p, dim), self.delta_factor, self.delta_method)
        q = from_rows(q, p, dim).to(torch.promote_types(p.dtype, torch.float32))
        return q, (Q[0] if dim is None else Q)
