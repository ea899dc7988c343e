"""Pure-PyTorch ground truth for every parq op (SPEC.md §3-§4).

Written like ordinary PyTorch, one parameter at a time. Every function works on
a 2-D float32 tensor ``x`` of shape ``(rows, n)`` whose rows are independent
quantization groups (a channel, a block, or a whole tensor as a single row), and
level sets ``Q`` of shape ``(rows, K)`` sorted ascending.

The built-in quantizers and prox maps of :mod:`parq` call these functions, and
:func:`quant_prox_` (the ``reference`` backend of the fused op) loops over
parameters calling them, so there is exactly one statement of the math. Never
change this file to match a kernel: kernels are tested against it.
"""

from __future__ import annotations

import itertools

import torch
from torch import Tensor

from parq_kernels.kinds import ProxKind, QuantKind


def _sgn(x: Tensor) -> Tensor:
    """+1 for x >= 0, -1 otherwise (SPEC.md §2: zero maps to +1)."""
    return torch.where(x >= 0, 1.0, -1.0).to(x.dtype)


def _tiny(x: Tensor) -> float:
    return torch.finfo(x.dtype).tiny


def _row_mean(x: Tensor) -> Tensor:
    """Mean over each row, keepdim; 0 for empty rows."""
    if x.size(1) == 0:
        return x.new_zeros(x.size(0), 1)
    return x.mean(dim=1, keepdim=True)


def _row_amax(x: Tensor) -> Tensor:
    """Max over each row, keepdim; 0 for empty rows."""
    if x.size(1) == 0:
        return x.new_zeros(x.size(0), 1)
    return x.amax(dim=1, keepdim=True)


# ---------------------------------------------------------------------------
# Quantizers: (q, Q) for each row of x (SPEC.md §3). q is always exactly one of
# the values of Q (both are built with the same float operations).
# ---------------------------------------------------------------------------


def quantize_uniform(
    x: Tensor, b: int, scale_max: bool, int_shift: float, zero_point: float
) -> tuple[Tensor, Tensor]:
    ax = x.abs()
    q_max = _row_amax(ax)
    if not scale_max:
        q_max = torch.minimum(b * _row_mean(ax), q_max)
    q_max = q_max.clamp_min(_tiny(x))
    r = 2 ** (b - 1) - int_shift
    s = q_max / r
    q = (torch.round(torch.clamp(x, -q_max, q_max) / s - zero_point) + zero_point) * s
    K = int((2**b - 2 * int_shift) // 1) + 1
    Q = (torch.arange(K, dtype=x.dtype, device=x.device) - r) * s
    return q, Q


def quantize_ternary_unif(x: Tensor) -> tuple[Tensor, Tensor]:
    s = _row_amax(x.abs()).clamp_min(_tiny(x)) / 1.5
    q = torch.clamp(torch.round(x / s), -1, 1) * s
    Q = torch.tensor([-1.0, 0.0, 1.0], dtype=x.dtype, device=x.device) * s
    return q, Q


def quantize_asym(x: Tensor, b: int) -> tuple[Tensor, Tensor]:
    if x.size(1) == 0:
        x_min = x_max = x.new_zeros(x.size(0), 1)
    else:
        x_min = x.amin(dim=1, keepdim=True)
        x_max = x.amax(dim=1, keepdim=True)
    top = 2**b - 1
    s = ((x_max - x_min) / top).clamp_min(_tiny(x))
    z = torch.round(x_min / s)
    q = torch.clamp(torch.round(x / s), z, z + top) * s
    Q = (z + torch.arange(top + 1, dtype=x.dtype, device=x.device)) * s
    return q, Q


def _binary_levels(v: Tensor) -> Tensor:
    """sort{ sum_i c_i v_i : c in {-1,+1}^b } for v of shape (rows, b).

    The sum runs over i in order, exactly like the accumulation of q in the
    greedy and optimal 2-bit quantizers, so that q is bitwise one of these.
    """
    b = v.size(1)
    signs = torch.tensor(
        list(itertools.product((-1.0, 1.0), repeat=b)), dtype=v.dtype, device=v.device
    )  # (2**b, b)
    Q = v.new_zeros(v.size(0), 2**b)
    for i in range(b):
        Q = Q + signs[:, i] * v[:, i : i + 1]
    return Q.sort(dim=1).values


def quantize_lsbq_greedy(x: Tensor, b: int) -> tuple[Tensor, Tensor]:
    r = x
    q = torch.zeros_like(x)
    vs = []
    for _ in range(b):
        v = _row_mean(r.abs())
        step = v * _sgn(r)
        q = q + step
        r = r - step
        vs.append(v)
    return q, _binary_levels(torch.cat(vs, dim=1))


def quantize_lsbq_ternary(x: Tensor, ternary_multiplier: float) -> tuple[Tensor, Tensor]:
    v = ternary_multiplier * _row_mean(x.abs())
    q = torch.where(x <= -v / 2, -v, torch.where(x <= v / 2, torch.zeros_like(x), v))
    Q = torch.cat([-v, torch.zeros_like(v), v], dim=1)
    return q, Q


def quantize_ternary_threshold(
    x: Tensor, delta_factor: float, delta_max: bool
) -> tuple[Tensor, Tensor]:
    """Threshold ternary (SPEC.md §9): ``D = delta_factor * mean|x|`` (``delta_max``:
    ``* max|x|``), ``Q = [-a_neg, 0, a_pos]`` with ``a_pos`` the mean of the ``x >= D`` and
    ``a_neg`` the mean of ``-x`` over the ``x <= -D``; an empty side takes the other side's
    value, both empty ``max(D, tiny)``. ``q = a_pos`` where ``x >= D``, ``-a_neg`` where
    ``x <= -D`` (the first test wins: ``D = 0``), else 0."""
    ax = x.abs()
    D = delta_factor * (_row_amax(ax) if delta_max else _row_mean(ax))
    pos, neg = x >= D, x <= -D
    n_pos = pos.sum(dim=1, keepdim=True)
    n_neg = neg.sum(dim=1, keepdim=True)
    a_pos = torch.where(pos, x, 0.0).sum(dim=1, keepdim=True) / n_pos.clamp_min(1)
    a_neg = torch.where(neg, -x, 0.0).sum(dim=1, keepdim=True) / n_neg.clamp_min(1)
    both_empty = D.clamp_min(_tiny(x))
    a_pos, a_neg = (
        torch.where(n_pos > 0, a_pos, torch.where(n_neg > 0, a_neg, both_empty)),
        torch.where(n_neg > 0, a_neg, torch.where(n_pos > 0, a_pos, both_empty)),
    )
    q = torch.where(pos, a_pos, torch.where(neg, -a_neg, torch.zeros_like(x)))
    Q = torch.cat([-a_neg, torch.zeros_like(a_pos), a_pos], dim=1)
    return q, Q


def optimal_split(x: Tensor, ternary: bool) -> tuple[Tensor, Tensor]:
    """Exact two-cluster split of |x| per row (SPEC.md §3, optimal LSBQ).

    Returns ``(lo, hi)`` as float64 ``(rows, 1)``: the mean magnitude of the
    ``k*`` smallest entries and of the rest, for the ``k*`` minimizing the
    squared error (ternary: the lower group is quantized to 0, so ``lo = 0``).
    """
    rows, n = x.shape
    a = x.abs().double().sort(dim=1).values
    zero = a.new_zeros(rows, 1)
    S = torch.cat([zero, a.cumsum(dim=1)], dim=1)  # S_k, k = 0..n
    T = (a * a).sum(dim=1, keepdim=True)
    k = torch.arange(n + 1, dtype=torch.float64, device=x.device)
    lo = torch.where(k > 0, S / k.clamp_min(1), 0.0)
    hi = torch.where(k < n, (S[:, -1:] - S) / (n - k).clamp_min(1), 0.0)
    if ternary:
        E = T - (n - k) * hi * hi
        lo = torch.zeros_like(lo)
    else:
        E = T - k * lo * lo - (n - k) * hi * hi
    k_star = E.argmin(dim=1, keepdim=True)  # first minimum: smallest k on ties
    return lo.gather(1, k_star), hi.gather(1, k_star)


def quantize_lsbq_optimal(x: Tensor, b: int) -> tuple[Tensor, Tensor]:
    if b == 1:
        return quantize_lsbq_greedy(x, 1)
    if b == 0:
        _, hi = optimal_split(x, ternary=True)
        A = hi.to(x.dtype)
        half = A / 2
        s = _sgn(x)
        q = (s + _sgn(x - s * half)) * half
        Q = torch.cat([-A, torch.zeros_like(A), A], dim=1)
        return q, Q
    if b == 2:
        lo, hi = optimal_split(x, ternary=False)
        v1 = ((hi + lo) / 2).to(x.dtype)
        v2 = ((hi - lo) / 2).to(x.dtype)
        s1 = _sgn(x)
        q = v1 * s1
        q = q + v2 * _sgn(x - q)
        return q, _binary_levels(torch.cat([v1, v2], dim=1))
    raise NotImplementedError(f"optimal LSBQ is defined for b in {{0, 1, 2}}, got b={b}")


def quantize_rows(
    x: Tensor, kind: int, b: int, qargs: tuple[float, ...], center: bool
) -> tuple[Tensor, Tensor]:
    """Dispatch on ``kind`` (:class:`QuantKind`); ``x`` is float32 (rows, n)."""
    if center:
        m = _row_mean(x)
        q, Q = quantize_rows(x - m, kind, b, qargs, center=False)
        return q + m, Q + m
    kind = QuantKind(kind)
    if kind == QuantKind.UNIFORM:
        return quantize_uniform(x, b, bool(qargs[0]), qargs[1], qargs[2])
    if kind == QuantKind.TERNARY_UNIF:
        return quantize_ternary_unif(x)
    if kind == QuantKind.ASYM:
        return quantize_asym(x, b)
    if kind == QuantKind.LSBQ_GREEDY:
        return quantize_lsbq_greedy(x, b)
    if kind == QuantKind.LSBQ_TERNARY:
        return quantize_lsbq_ternary(x, qargs[0])
    if kind == QuantKind.TERNARY_THRESHOLD:
        return quantize_ternary_threshold(x, qargs[0], bool(qargs[1]))
    return quantize_lsbq_optimal(x, b)


# ---------------------------------------------------------------------------
# Level lookups and proximal maps (SPEC.md §4). All take x (rows, n), Q (rows, K).
# ---------------------------------------------------------------------------


def nearest_level(x: Tensor, Q: Tensor) -> Tensor:
    """Q[#{j : M_j < x}] with midpoints M_j = (Q_j + Q_{j+1}) / 2 (ties go low)."""
    if Q.size(1) == 1:
        return Q.expand_as(x).clone()
    M = ((Q[:, :-1] + Q[:, 1:]) / 2).contiguous()
    idx = torch.searchsorted(M, x.contiguous(), right=False)
    return Q.gather(1, idx)


def interval(x: Tensor, Q: Tensor) -> tuple[Tensor, Tensor]:
    """``(lo, hi)``: the levels around x; both equal the end level outside Q."""
    i = torch.searchsorted(Q.contiguous(), x.contiguous(), right=False)  # #{Q_j < x}
    K = Q.size(1)
    lo = Q.gather(1, (i - 1).clamp_min(0))
    hi = Q.gather(1, i.clamp_max(K - 1))
    return lo, hi


def prox_soft(x: Tensor, Q: Tensor, T: float) -> Tensor:
    lo, hi = interval(x, Q)
    c = (lo + hi) / 2
    d = (hi - lo) / 2
    u = (torch.clamp(x, lo, hi) - lo) / (hi - lo + 1e-12)
    denom = torch.sigmoid(torch.tensor(T / 2, dtype=torch.float64)).item() - 0.5
    return c + d * (torch.sigmoid(T * (u - 0.5)) - 0.5) / denom


def prox_parq(x: Tensor, Q: Tensor, rho: float) -> Tensor:
    lo, hi = interval(x, Q)
    c = (lo + hi) / 2
    return torch.clamp(c + (x - c) / rho, lo, hi)


def prox_quant_l1(x: Tensor, hard: Tensor, lam: float) -> Tensor:
    """ProxQuant, l1 penalty: soft-threshold ``x`` toward ``hard`` by ``lam`` (SPEC.md §9)."""
    d = x - hard
    return hard + _sgn(d) * torch.clamp_min(d.abs() - lam, 0.0)


def prox_quant_l2(x: Tensor, hard: Tensor, lam: float) -> Tensor:
    """ProxQuant, l2 penalty: ``(x + lam hard) / (1 + lam)`` (SPEC.md §9)."""
    return (x + lam * hard) / (1.0 + lam)


def apply_prox(x: Tensor, q: Tensor | None, Q: Tensor, kind: int, arg: float) -> Tensor:
    """The projected value of x; ``q`` is the quantizer's output on update steps.

    BINARYCONNECT projects like HARD here; its latent clamp is :func:`clamp_latents_`."""
    kind = ProxKind(kind)
    if kind == ProxKind.NONE:
        return x
    if kind == ProxKind.SOFT:
        return prox_soft(x, Q, arg)
    if kind == ProxKind.PARQ:
        return prox_parq(x, Q, arg)
    hard = q if q is not None else nearest_level(x, Q)
    if kind in (ProxKind.HARD, ProxKind.BINARYCONNECT):
        return hard
    if kind == ProxKind.PROXQUANT_L1:
        return prox_quant_l1(x, hard, arg)
    if kind == ProxKind.PROXQUANT_L2:
        return prox_quant_l2(x, hard, arg)
    return (1 - arg) * x + arg * hard  # RELAX


def clamp_latents_(latents: list[Tensor], quants: list[Tensor], gamma: float) -> None:
    """BinaryConnect's clipped latents (SPEC.md §9): each row of ``latents[i]`` (2-D,
    any float dtype) is clamped in float32 to ``[gamma Q_0, gamma Q_{K-1}]`` of its row of
    ``quants[i]`` (``(rows, K)``), the level range in the latent's (unshrunk) scale. The
    reference backend, the generic path and the sharded path call it after their pass; the
    CPU, CUDA and Triton kernels do the same float32 clamp inside their write pass."""
    for latent, Q in zip(latents, quants, strict=True):
        if latent.numel() == 0:
            continue
        lo = Q[:, :1].float() * gamma
        hi = Q[:, -1:].float() * gamma
        if latent.dtype == torch.float32:  # in place: one pass (min(max(x, lo), hi) too)
            latent.clamp_(lo, hi)
        else:
            latent.copy_(torch.minimum(torch.maximum(latent.float(), lo), hi))


# ---------------------------------------------------------------------------
# The fused op, reference backend: one parameter at a time.
# ---------------------------------------------------------------------------


def quant_prox_(
    params: list[Tensor],
    latents: list[Tensor],
    quants: list[Tensor],
    nonfinite: Tensor,
    quant_kind: int,
    bits: int,
    qargs: tuple[float, ...],
    center: bool,
    update: bool,
    prox_kind: int,
    prox_arg: float,
    gamma: float,
) -> None:
    """Reference backend of ``parq_kernels::quant_prox_`` (contract in ops.py)."""
    for i, (p, latent, Q) in enumerate(zip(params, latents, quants, strict=True)):
        finite = torch.isfinite(p)
        latent.copy_(torch.where(finite, p, latent))  # a NaN/Inf update keeps the old latent
        x = latent.float()
        if gamma != 1.0:
            x = x / gamma
        fine = torch.isfinite(x)
        nonfinite[i] |= (~finite | ~fine).any().to(nonfinite.dtype)  # no host sync
        q = None
        if update:
            q, Q_new = quantize_rows(x, quant_kind, bits, qargs, center)
            Q.copy_(Q_new)
        p.copy_(torch.where(fine, apply_prox(x, q, Q, prox_kind, prox_arg), x))
    if prox_kind == ProxKind.BINARYCONNECT:
        clamp_latents_(latents, quants, gamma)
