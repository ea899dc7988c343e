"""Refined LSBQ (SPEC.md §9): least-squares refits of the greedy coefficients.

After the greedy pass (codes ``B``, ``n x b`` entries ±1, and coefficients ``v`` per
group), each round solves ``v = argmin ||x - B v||^2`` (keeping the old ``v`` where
``B^T B`` is singular), makes ``v`` positive and sorted descending (the matching columns
of ``B`` flip and move with it), and assigns every element the nearest of the ``2^b``
levels (ties to the lower level), which gives the new ``B``. A round whose squared error
would exceed the previous one (float rounding in an already optimal group) is not
taken, so the error never increases; ``q`` is the nearest level of the final ``Q``
(never farther than the kept assignment). Batched over the groups: one ``b x b`` solve per
group per round, in float64.
"""

from __future__ import annotations

import itertools

import torch
from torch import Tensor

from parq_kernels import reference


def _sign_table(b: int, device: torch.device) -> Tensor:
    """(2**b, b) float32 of all sign codes, in ``reference._binary_levels``' order."""
    return torch.tensor(list(itertools.product((-1.0, 1.0), repeat=b)), device=device)


def _greedy_codes(x: Tensor, b: int) -> tuple[Tensor, Tensor]:
    """The greedy pass's ``(v, B)``: ``(rows, b)`` and ``(rows, n, b)``."""
    r = x
    vs, codes = [], []
    for _ in range(b):
        v = r.abs().mean(dim=1, keepdim=True) if x.size(1) else x.new_zeros(x.size(0), 1)
        s = torch.where(r >= 0, 1.0, -1.0)
        r = r - v * s
        vs.append(v)
        codes.append(s)
    return torch.cat(vs, dim=1), torch.stack(codes, dim=2)


def _assign(x: Tensor, v: Tensor, signs: Tensor, codes: bool) -> tuple[Tensor, Tensor, Tensor]:
    """Nearest of the levels of ``v`` (ties low, ``reference.nearest_level``'s lookup):
    ``(q, Q sorted, B codes of q)`` (``B`` only if ``codes``, else None)."""
    Q = reference._binary_levels(v)
    M = ((Q[:, :-1] + Q[:, 1:]) / 2).contiguous()
    idx = torch.searchsorted(M, x.contiguous(), right=False)  # index of q in Q
    q = Q.gather(1, idx)
    B = None
    if codes:
        order = (v @ signs.T).argsort(dim=1, stable=True)  # sorted position -> sign code
        B = signs[order.gather(1, idx)]  # (rows, n, b)
    return q, Q, B


def _sq_err(x: Tensor, q: Tensor) -> Tensor:
    return (x.double() - q.double()).square().sum(dim=1)


def quantize_lsbq_refined(x: Tensor, b: int, rounds: int) -> tuple[Tensor, Tensor]:
    """``(q, Q)`` of refined LSBQ for the rows of ``x`` (float32 ``(rows, n)``), ``b >= 1``."""
    q, Q = reference.quantize_lsbq_greedy(x, b)
    if rounds == 0 or x.size(0) == 0:
        return q, Q
    v, B = _greedy_codes(x, b)
    signs = _sign_table(b, x.device)
    err = _sq_err(x, q)
    eye = torch.eye(b, dtype=torch.float64, device=x.device)
    for r in range(rounds):
        Bd = B.double()
        G = Bd.transpose(1, 2) @ Bd  # (rows, b, b), exact integers
        rhs = (Bd.transpose(1, 2) @ x.double().unsqueeze(2)).squeeze(2)
        singular = torch.linalg.matrix_rank(G) < b
        G = torch.where(singular[:, None, None], eye, G)  # solvable; result discarded
        v_new = torch.linalg.solve(G, rhs).float()
        v_new = v_new.abs().sort(dim=1, descending=True).values  # flips and moves B too
        v_new = torch.where(singular[:, None], v, v_new)
        last = r == rounds - 1
        q_new, Q_new, B_new = _assign(x, v_new, signs, codes=not last)
        err_new = _sq_err(x, q_new)
        take = err_new <= err
        v = torch.where(take[:, None], v_new, v)
        q = torch.where(take[:, None], q_new, q)
        Q = torch.where(take[:, None], Q_new, Q)
        if not last:
            B = torch.where(take[:, None, None], B_new, B)
        err = torch.where(take, err_new, err)
    # q is the nearest level (no farther than the kept q): what the fused path computes
    # from the stored levels
    return reference.nearest_level(x, Q), Q
