"""The op contract shared by every backend (reference, triton, cpu, cuda).

One fused, multi-tensor, in-place op serves the whole quantized part of a
``QuantOptimizer.step()`` for one parameter group (one device and dtype):

``quant_prox_(params, latents, quants, nonfinite, quant_kind, bits, qargs,
center, update, prox_kind, prox_arg, gamma, backend)``

For every ``i``:

* ``params[i]``: 2-D ``(rows, cols)``, contiguous, fp32 / bf16 / fp16. Each row
  is one quantization group (a channel, a block, or the whole tensor as one
  row). Read, then overwritten with the projected weights.
* ``latents[i]``: same shape and dtype; written with the *input* ``params[i]``
  (before the shrink), i.e. the full-precision latent copy.
* ``quants[i]``: ``(rows, K)`` float32 level sets, sorted ascending per row.
  Written when ``update`` is true, read otherwise.
* ``nonfinite``: int32 ``(len(params),)``; entry ``i`` is set to 1 when a
  non-finite value of ``params[i]`` is seen (never cleared by the op).

Scalars (host-side, the same for every parameter of the call):

* ``quant_kind`` (:class:`QuantKind`), ``bits``, ``qargs`` (see ``QuantKind``),
  ``center`` (quantize ``x - mean(x)`` and add the mean back).
* ``update``: compute fresh levels ``Q`` (and use the quantizer's own ``q`` as
  ``hard(x)``); otherwise reuse ``quants`` and ``hard(x)`` is the nearest level.
* ``prox_kind`` (:class:`ProxKind`) and ``prox_arg``: the schedule scalar the
  front end computed for this step (temperature ``T``, inverse slope ``rho``,
  or relaxation weight ``theta``).
* ``gamma``: the shrink divisor (``x = p / gamma`` before quantizing; 1.0 = off).
* ``backend``: ``""`` picks automatically (see :mod:`parq_kernels.backends`),
  otherwise ``"triton"``, ``"cuda"``, ``"cpu"`` or ``"reference"``.

The math is SPEC.md §3-§4; :mod:`parq_kernels.reference` is its ground truth.
"""

from __future__ import annotations

from enum import IntEnum

import torch
from torch import Tensor


class QuantKind(IntEnum):
    """Which quantizer computes ``(q, Q)``; ``qargs`` meaning per kind."""

    UNIFORM = 0  # b >= 1; qargs = (scale_is_max: 0/1, int_shift, zero_point)
    TERNARY_UNIF = 1  # b == 0; qargs = ()
    ASYM = 2  # b >= 1; qargs = ()
    LSBQ_GREEDY = 3  # b >= 1; qargs = ()
    LSBQ_TERNARY = 4  # b == 0; qargs = (ternary_multiplier,)
    LSBQ_OPTIMAL = 5  # b in {0, 1, 2} (b == 1 is greedy); qargs = ()


class ProxKind(IntEnum):
    """Which proximal map is applied; ``prox_arg`` meaning per kind."""

    NONE = 0  # p keeps its (shrunk) value; levels are still computed on update
    HARD = 1  # p = hard(p)
    SOFT = 2  # prox_arg = temperature T
    PARQ = 3  # prox_arg = inverse slope rho in (0, 1]
    RELAX = 4  # prox_arg = theta in [0, 1): p = (1 - theta) p + theta hard(p)


def num_levels(kind: QuantKind, bits: int, qargs: tuple[float, ...] = ()) -> int:
    """K, the number of levels per row, for a quantizer kind and bit width."""
    if kind == QuantKind.UNIFORM:
        return int((2**bits - 2 * qargs[1]) // 1) + 1
    if kind in (QuantKind.TERNARY_UNIF, QuantKind.LSBQ_TERNARY):
        return 3
    if kind == QuantKind.LSBQ_OPTIMAL and bits == 0:
        return 3
    return 2**bits


SCHEMA = (
    "quant_prox_(Tensor(a!)[] params, Tensor(b!)[] latents, Tensor(c!)[] quants, "
    "Tensor(d!) nonfinite, int quant_kind, int bits, float[] qargs, bool center, bool update, "
    'int prox_kind, float prox_arg, float gamma, str backend="") -> ()'
)

# A plain Library registration (not torch.library.custom_op): custom_op wraps
# every implementation in torch._disable_dynamo, whose first call imports all of
# torch._dynamo (seconds) and adds per-call overhead to every optimizer step.
_lib = torch.library.Library("parq_kernels", "DEF")
_lib.define(SCHEMA)


def _quant_prox_impl(
    params: list[Tensor],
    latents: list[Tensor],
    quants: list[Tensor],
    nonfinite: Tensor,
    quant_kind: int,
    bits: int,
    qargs: list[float],
    center: bool,
    update: bool,
    prox_kind: int,
    prox_arg: float,
    gamma: float,
    backend: str = "",
) -> None:
    if not params:
        return
    from parq_kernels import backends

    # the dispatcher has already checked the scalars against SCHEMA: pass them through
    impl = backends.get_impl(backends.resolve(params[0].device, backend or None))
    impl(params, latents, quants, nonfinite, quant_kind, bits, tuple(qargs), center, update,
         prox_kind, prox_arg, gamma)  # fmt: skip


# Every device goes through the backend table (which knows which backend serves it).
_lib.impl("quant_prox_", _quant_prox_impl, "CompositeExplicitAutograd")


@torch.library.register_fake("parq_kernels::quant_prox_")
def _quant_prox_fake(params, latents, quants, nonfinite, quant_kind, bits, qargs, center,
                     update, prox_kind, prox_arg, gamma, backend=""):  # fmt: skip
    return None


def quant_prox_(
    params: list[Tensor],
    latents: list[Tensor],
    quants: list[Tensor],
    nonfinite: Tensor,
    quant_kind: int,
    bits: int,
    qargs: list[float],
    center: bool,
    update: bool,
    prox_kind: int,
    prox_arg: float,
    gamma: float,
    backend: str = "",
) -> None:
    """Fused latent copy + quantize + prox over many parameters (module doc)."""
    torch.ops.parq_kernels.quant_prox_(params, latents, quants, nonfinite, int(quant_kind),
                                       int(bits), [float(a) for a in qargs], bool(center),
                                       bool(update), int(prox_kind), float(prox_arg),
                                       float(gamma), backend)  # fmt: skip
