"""The op contracts shared by every backend (reference, triton, cpu, cuda).

Two fused, multi-tensor, in-place ops serve the quantized part of a
``QuantOptimizer.step()`` for one parameter group (one device and dtype):

``quant_prox_(params, latents, quants, nonfinite, quant_kind, bits, qargs,
center, update, prox_kind, prox_arg, gamma, backend)``: after the base
optimizer has updated ``params`` (SPEC.md §5):

* ``params[i]``: 2-D ``(rows, cols)``, contiguous, fp32 / bf16 / fp16. Each row
  is one quantization group (a channel, a block, or the whole tensor as one
  row). Read, then overwritten with the projected weights.
* ``latents[i]``: same shape and dtype; written with the *input* ``params[i]``
  (before the shrink), i.e. the full-precision latent copy: read and written, as
  an element whose input is NaN/Inf keeps its previous latent (see below).
* ``quants[i]``: ``(rows, K)`` float32 level sets, sorted ascending per row.
  Written when ``update`` is true, read otherwise.
* ``nonfinite``: int32 ``(len(params),)``; entry ``i`` is set to 1 when a
  non-finite value of ``params[i]`` is seen (never cleared by the op).

Non-finite values (SPEC.md §6): an element whose new value is NaN/Inf does not
enter the latent (nor, in ``fused_step_``, the optimizer state): it keeps its
previous latent (and state), and ``x`` below is that kept latent. Its parameter
is flagged. A non-finite ``x`` (a latent that was never finite) is flagged too and
written to ``params`` as it is; the levels of its row are then unspecified.

``fused_step_(params, latents, grads, bufs1, bufs2, bufs3, quants, nonfinite,
optim_kind, hparams, quant_kind, bits, qargs, center, update, prox_kind,
prox_arg, gamma, backend)``: the base optimizer's update and the above in one
pass (SPEC.md §8). ``latents[i]`` is read and overwritten with the updated
latent ``w = base_update(latent, grad, state)`` (stored in the parameter
dtype); ``params[i]`` is written (not read) with the projection of ``w / gamma``;
``quants`` and ``nonfinite`` as above (an element whose new latent or new state
is non-finite keeps its previous latent and state, and is flagged).
``grads[i]`` (read) and ``bufs1/2/3[i]`` (the base optimizer's state, read and
written) have the shape and dtype of ``params[i]`` and are contiguous (the C++ kernels
also read a gradient of any shape with ``params[i]``'s number of elements: the fused
step's kept call passes the parameters' own gradients to them);
``optim_kind`` (:class:`OptimKind`) says which update it is and what ``hparams``
and the buffers hold. The update is torch's own math, computed in float32.

Scalars (host-side, the same for every parameter of the call):

* ``quant_kind`` (:class:`QuantKind`), ``bits``, ``qargs`` (see ``QuantKind``),
  ``center`` (quantize ``x - mean(x)`` and add the mean back).
* ``update``: compute fresh levels ``Q`` (and use the quantizer's own ``q`` as
  ``hard(x)``); otherwise reuse ``quants`` and ``hard(x)`` is the nearest level.
* ``prox_kind`` (:class:`ProxKind`) and ``prox_arg``: the schedule scalar the
  front end computed for this step (temperature ``T``, inverse slope ``rho``,
  relaxation weight ``theta``, or ProxQuant's ``lambda``). BINARYCONNECT projects
  like HARD and also clamps ``latents[i]`` per row to ``[gamma Q_0, gamma Q_{K-1}]``
  (in float32, after the latent is written; :func:`reference.clamp_latents_`).
* ``gamma``: the shrink divisor (``x = p / gamma`` before quantizing; 1.0 = off).
* ``backend``: ``""`` picks automatically (see :mod:`parq_kernels.backends`),
  otherwise ``"triton"``, ``"cuda"``, ``"cpu"`` or ``"reference"``.

The math is SPEC.md §3-§4 and §8; :mod:`parq_kernels.reference` and
:mod:`parq_kernels.reference_step` are its ground truth.
"""

from __future__ import annotations

import torch
from torch import Tensor

from parq_kernels.kinds import NUM_HPARAMS, OptimKind, ProxKind, QuantKind, num_levels

SCHEMA = (
    "quant_prox_(Tensor(a!)[] params, Tensor(b!)[] latents, Tensor(c!)[] quants, "
    "Tensor(d!) nonfinite, int quant_kind, int bits, float[] qargs, bool center, bool update, "
    'int prox_kind, float prox_arg, float gamma, str backend="") -> ()'
)

# A plain Library registration (not torch.library.custom_op): custom_op wraps
# every implementation in torch._disable_dynamo, whose first call imports all of
# torch._dynamo (seconds) and adds per-call overhead to every optimizer step.
STEP_SCHEMA = (
    "fused_step_(Tensor(a!)[] params, Tensor(b!)[] latents, Tensor[] grads, "
    "Tensor(c!)[] bufs1, Tensor(d!)[] bufs2, Tensor(e!)[] bufs3, Tensor(f!)[] quants, "
    "Tensor(g!) nonfinite, int optim_kind, float[] hparams, int quant_kind, int bits, "
    "float[] qargs, bool center, bool update, int prox_kind, float prox_arg, float gamma, "
    'str backend="") -> ()'
)

_lib = torch.library.Library("parq_kernels", "DEF")
_lib.define(SCHEMA)
_lib.define(STEP_SCHEMA)


def _eager(params: list[Tensor], nonfinite: Tensor) -> bool:
    """Whether a wrapper may call its implementation directly: eager plain tensors, no
    compile tracing and no dispatch mode (fake tensors, functionalization), where going
    through the dispatcher would only add its argument checks (the implementations
    check their arguments themselves). Saves ~0.1 ms a call on a CPU."""
    modes = getattr(torch._C, "_len_torch_dispatch_stack", None)
    return (
        modes is not None
        and type(nonfinite) is Tensor
        and all(type(p) is Tensor for p in params)
        and not torch.compiler.is_compiling()
        and modes() == 0
    )


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
    impl = backends.get_impl(backends.resolve(params[0].device, backend or None), "quant_prox_")
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
    if _eager(params, nonfinite):
        _quant_prox_impl(params, latents, quants, nonfinite, int(quant_kind), int(bits),
                         [float(a) for a in qargs], bool(center), bool(update), int(prox_kind),
                         float(prox_arg), float(gamma), backend)  # fmt: skip
        return
    torch.ops.parq_kernels.quant_prox_(params, latents, quants, nonfinite, int(quant_kind),
                                       int(bits), [float(a) for a in qargs], bool(center),
                                       bool(update), int(prox_kind), float(prox_arg),
                                       float(gamma), backend)  # fmt: skip


def _fused_step_impl(
    params: list[Tensor],
    latents: list[Tensor],
    grads: list[Tensor],
    bufs1: list[Tensor],
    bufs2: list[Tensor],
    bufs3: list[Tensor],
    quants: list[Tensor],
    nonfinite: Tensor,
    optim_kind: int,
    hparams: list[float],
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

    impl = backends.get_impl(backends.resolve(params[0].device, backend or None), "fused_step_")
    impl(params, latents, grads, bufs1, bufs2, bufs3, quants, nonfinite, optim_kind,
         tuple(hparams), quant_kind, bits, tuple(qargs), center, update, prox_kind, prox_arg,
         gamma)  # fmt: skip


_lib.impl("fused_step_", _fused_step_impl, "CompositeExplicitAutograd")


@torch.library.register_fake("parq_kernels::fused_step_")
def _fused_step_fake(params, latents, grads, bufs1, bufs2, bufs3, quants, nonfinite, optim_kind,
                     hparams, quant_kind, bits, qargs, center, update, prox_kind, prox_arg,
                     gamma, backend=""):  # fmt: skip
    return None


def check_hparams(optim_kind: int, hparams: list[float] | tuple[float, ...]) -> OptimKind:
    """The :class:`OptimKind` of ``optim_kind``; raises if ``hparams`` has the wrong length."""
    kind = OptimKind(optim_kind)
    if len(hparams) != NUM_HPARAMS[kind]:
        raise ValueError(
            f"fused_step_: hparams of {kind.name} has {NUM_HPARAMS[kind]} entries, "
            f"got {len(hparams)}"
        )
    return kind


def fused_step_(
    params: list[Tensor],
    latents: list[Tensor],
    grads: list[Tensor],
    bufs1: list[Tensor],
    bufs2: list[Tensor],
    bufs3: list[Tensor],
    quants: list[Tensor],
    nonfinite: Tensor,
    optim_kind: int,
    hparams: list[float],
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
    """Fused base-optimizer update + quantize + prox over many parameters (module doc)."""
    if _eager(params, nonfinite):
        _fused_step_impl(params, latents, grads, bufs1, bufs2, bufs3, quants, nonfinite,
                         int(optim_kind), [float(h) for h in hparams], int(quant_kind),
                         int(bits), [float(a) for a in qargs], bool(center), bool(update),
                         int(prox_kind), float(prox_arg), float(gamma), backend)  # fmt: skip
        return
    torch.ops.parq_kernels.fused_step_(params, latents, grads, bufs1, bufs2, bufs3, quants,
                                       nonfinite, int(optim_kind), [float(h) for h in hparams],
                                       int(quant_kind), int(bits), [float(a) for a in qargs],
                                       bool(center), bool(update), int(prox_kind),
                                       float(prox_arg), float(gamma), backend)  # fmt: skip


__all__ = ["OptimKind", "ProxKind", "QuantKind", "num_levels", "quant_prox_", "fused_step_",
           "check_hparams", "SCHEMA", "STEP_SCHEMA"]  # fmt: skip
