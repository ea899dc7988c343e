"""The enums every layer of parq_kernels shares (the leaf module: it imports nothing of ours).

* :class:`QuantKind`: which quantizer computes ``(q, Q)`` (SPEC.md §3);
* :class:`ProxKind`: which proximal map projects the weights (SPEC.md §4);
* :class:`OptimKind`: which base-optimizer update the fused step applies to the
  latent weights (SPEC.md §8), with the layout of its ``hparams``.

The C++ and CUDA kernels mirror these values in ``csrc/levels.h`` and
``csrc/base_update.h``; the Triton kernels in their ``tl.constexpr`` constants.
"""

from __future__ import annotations

from enum import IntEnum


class QuantKind(IntEnum):
    """Which quantizer computes ``(q, Q)``; ``qargs`` meaning per kind."""

    UNIFORM = 0  # b >= 1; qargs = (scale_is_max: 0/1, int_shift, zero_point)
    TERNARY_UNIF = 1  # b == 0; qargs = ()
    ASYM = 2  # b >= 1; qargs = ()
    LSBQ_GREEDY = 3  # b >= 1; qargs = ()
    LSBQ_TERNARY = 4  # b == 0; qargs = (ternary_multiplier,)
    LSBQ_OPTIMAL = 5  # b in {0, 1, 2} (b == 1 is greedy); qargs = ()
    TERNARY_THRESHOLD = 6  # b == 0; qargs = (delta_factor, method: 0 mean|x| / 1 max|x|)


class ProxKind(IntEnum):
    """Which proximal map is applied; ``prox_arg`` meaning per kind."""

    NONE = 0  # p keeps its (shrunk) value; levels are still computed on update
    HARD = 1  # p = hard(p)
    SOFT = 2  # prox_arg = temperature T
    PARQ = 3  # prox_arg = inverse slope rho in (0, 1]
    RELAX = 4  # prox_arg = theta in [0, 1): p = (1 - theta) p + theta hard(p)
    PROXQUANT_L1 = 5  # prox_arg = lam >= 0: soft-threshold toward hard(p) (SPEC.md §9)
    PROXQUANT_L2 = 6  # prox_arg = lam >= 0: p = (p + lam hard(p)) / (1 + lam)
    BINARYCONNECT = 7  # p = hard(p), latent clamped to [gamma Q_0, gamma Q_{K-1}] per row


#: Prox kinds whose projection needs ``hard(x)`` (the quantizer's q or the nearest level).
HARD_KINDS = frozenset({ProxKind.HARD, ProxKind.RELAX, ProxKind.PROXQUANT_L1,
                        ProxKind.PROXQUANT_L2, ProxKind.BINARYCONNECT})  # fmt: skip


class OptimKind(IntEnum):
    """Which base-optimizer update the fused step applies (torch's math, SPEC.md §8).

    ``hparams`` of the fused step, by kind (every entry a float; flags are 0/1):

    * ``SGD``: ``(lr, momentum, dampening, weight_decay, nesterov, maximize, init_buf)``;
      ``bufs1`` are the momentum buffers when ``momentum != 0`` (else empty);
      ``init_buf = 1``: the buffers hold no history yet (torch's first step:
      ``buf = g``), their contents are ignored and overwritten.
    * ``ADAM`` / ``ADAMW`` (L2 / decoupled weight decay): ``(lr, beta1, beta2, eps,
      weight_decay, maximize, amsgrad, step)`` with ``step`` the step count *after*
      this step's increment (bias corrections ``1 - beta^step``); ``bufs1`` /
      ``bufs2`` / ``bufs3`` are ``exp_avg`` / ``exp_avg_sq`` / ``max_exp_avg_sq``
      (``bufs3`` empty unless ``amsgrad``).
    """

    SGD = 0
    ADAM = 1
    ADAMW = 2


#: Number of ``hparams`` entries of each :class:`OptimKind`.
NUM_HPARAMS = {OptimKind.SGD: 7, OptimKind.ADAM: 8, OptimKind.ADAMW: 8}


def num_levels(kind: QuantKind, bits: int, qargs: tuple[float, ...] = ()) -> int:
    """K, the number of levels per row, for a quantizer kind and bit width."""
    if kind == QuantKind.UNIFORM:
        return int((2**bits - 2 * qargs[1]) // 1) + 1
    if kind in (QuantKind.TERNARY_UNIF, QuantKind.LSBQ_TERNARY, QuantKind.TERNARY_THRESHOLD):
        return 3
    if kind == QuantKind.LSBQ_OPTIMAL and bits == 0:
        return 3
    return 2**bits
