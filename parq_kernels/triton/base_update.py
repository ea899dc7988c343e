"""The base-optimizer update of the fused step (SPEC.md §8): host scalars + per-element math.

torch's own single-tensor SGD / Adam / AdamW update applied to the latent
weights, in float32, with the operations in torch's order; the ground truth is
:mod:`parq_kernels.reference_step`, and ``csrc/base_update.h`` +
``csrc/validate_step.cpp`` are the C++ twins of this file.

Host side, :func:`step_args` checks ``hparams`` and turns them into the kernel
arguments: nine float scalars ``h0..h8`` (rounded once to float32 when passed,
as torch's kernels receive them) and one ``OPT`` constexpr (the update kind in
its low two bits, plus option bits). Scalars that torch computes in double on
the host (Adam's bias corrections, ``lr / (1 - beta1^step)``, ``1 - lr * wd``)
are computed here the same way, per call; nothing is recomputed per element.

====  ==========================  ==========================================
arg   SGD                         Adam / AdamW
====  ==========================  ==========================================
h0    ``-lr``                     ``-lr / (1 - beta1^step)``
h1    ``momentum``                ``weight_decay`` (Adam: ``g += wd * w``)
h2    ``1 - dampening``           ``1 - lr * weight_decay`` (AdamW decay)
h3    ``weight_decay``            ``1 - beta1`` (the lerp weight)
h4    --                          ``1 - (1 - beta1)`` in float32 (lerp)
h5    --                          ``beta2``
h6    --                          ``1 - beta2``
h7    --                          ``eps``
h8    --                          ``sqrt(1 - beta2^step)``
====  ==========================  ==========================================

Device side, :func:`update_tile` reads a tile of latent, gradient and state,
applies the update in float32 and stores the latent and state back in their
dtype (the parameter's); it returns the latent *as stored*, which is what the
quantizer and the prox map see (``float(dtype(w))``).
"""

from __future__ import annotations

import math
import struct
from dataclasses import dataclass

import triton
import triton.language as tl

from parq_kernels.kinds import NUM_HPARAMS, OptimKind

# OPT bits (constexpr): the OptimKind in bits 0-1, then the options. Tested as
# ``BIT & OPT`` (constexpr on the left: the interpreter passes OPT as a plain int)
KIND_MASK = tl.constexpr(3)
SGD = tl.constexpr(0)
ADAMW = tl.constexpr(2)
MAXIMIZE = tl.constexpr(4)
HAS_WD = tl.constexpr(8)  # weight_decay != 0 (torch skips the term otherwise)
MOMENTUM = tl.constexpr(16)  # SGD: momentum != 0 (bufs1 are the momentum buffers)
NESTEROV = tl.constexpr(32)  # SGD
INIT_BUF = tl.constexpr(64)  # SGD: the buffers hold no history yet (buf = g)
LERP_SMALL = tl.constexpr(128)  # Adam: |1 - beta1| < 0.5 (torch's lerp branch)
AMSGRAD = tl.constexpr(256)  # Adam: bufs3 are max_exp_avg_sq


@dataclass(frozen=True)
class StepArgs:
    """The kernel arguments of one base update (module doc)."""

    kind: OptimKind
    scalars: tuple[float, ...]  # h0..h8
    opt: int  # the OPT constexpr
    nbufs: int  # how many of bufs1/2/3 the update reads and writes


def _f32(x: float) -> float:
    """``x`` rounded to float32 (as ``static_cast<float>``)."""
    return struct.unpack("f", struct.pack("f", x))[0]


def _flag(v: float, name: str) -> bool:
    if v not in (0.0, 1.0):
        raise ValueError(f"fused_step_: hparams {name} must be 0 or 1, got {v}")
    return v != 0.0


def step_args(optim_kind: int, hparams: tuple[float, ...]) -> StepArgs:
    """Check ``hparams`` (layout in :class:`OptimKind`) and build the kernel arguments."""
    if optim_kind not in tuple(OptimKind):
        raise ValueError(f"fused_step_: optim_kind must be an OptimKind in 0..2, got {optim_kind}")
    kind = OptimKind(optim_kind)
    if len(hparams) != NUM_HPARAMS[kind]:
        raise ValueError(f"fused_step_: hparams of {kind.name} has {NUM_HPARAMS[kind]} entries, "
                         f"got {len(hparams)}")  # fmt: skip
    h = [float(v) for v in hparams]
    if not all(math.isfinite(v) for v in h):
        raise ValueError(f"fused_step_: hparams entries must be finite, got {h}")
    if kind == OptimKind.SGD:
        lr, momentum, dampening, weight_decay = h[:4]
        opt = int(kind)
        opt |= int(MAXIMIZE) if _flag(h[5], "maximize") else 0
        opt |= int(HAS_WD) if weight_decay != 0.0 else 0
        opt |= int(MOMENTUM) if momentum != 0.0 else 0
        opt |= int(NESTEROV) if _flag(h[4], "nesterov") else 0
        opt |= int(INIT_BUF) if _flag(h[6], "init_buf") else 0
        scalars = (-lr, momentum, 1.0 - dampening, weight_decay, 0.0, 0.0, 0.0, 0.0, 0.0)
        return StepArgs(kind, scalars, opt, 1 if momentum != 0.0 else 0)
    lr, beta1, beta2, eps, weight_decay = h[:5]
    step = h[7]
    if step < 1.0:
        raise ValueError(f"fused_step_: hparams step (after the increment) must be >= 1, "
                         f"got {step}")  # fmt: skip
    # torch (capturable=False): bias corrections in double on the host
    bc1 = 1.0 - beta1**step
    bc2 = 1.0 - beta2**step
    if bc1 == 0.0 or not bc2 > 0.0:
        raise ValueError(f"fused_step_: bias corrections of beta1={beta1}, beta2={beta2} at "
                         f"step {step} are zero")  # fmt: skip
    lerp_w = _f32(1.0 - beta1)  # torch: exp_avg.lerp_(g, 1 - beta1), weight in float
    amsgrad = _flag(h[6], "amsgrad")
    opt = int(kind)
    opt |= int(MAXIMIZE) if _flag(h[5], "maximize") else 0
    opt |= int(HAS_WD) if weight_decay != 0.0 else 0
    opt |= int(LERP_SMALL) if abs(lerp_w) < 0.5 else 0
    opt |= int(AMSGRAD) if amsgrad else 0
    scalars = (-(lr / bc1), weight_decay, 1.0 - lr * weight_decay, lerp_w, _f32(1.0 - lerp_w),
               beta2, 1.0 - beta2, eps, bc2**0.5)  # fmt: skip
    return StepArgs(kind, scalars, opt, 3 if amsgrad else 2)


@triton.jit
def sgd_update(w, g, buf, h0, h1, h2, h3, OPT: tl.constexpr):
    """torch.optim.SGD on float32 ``w``: returns ``(w, buf)`` (``buf`` unread with
    ``INIT_BUF``, unused without ``MOMENTUM``)."""
    if MAXIMIZE & OPT:
        g = -g
    if HAS_WD & OPT:
        g = g + h3 * w
    if MOMENTUM & OPT:
        if INIT_BUF & OPT:  # noqa: SIM108 (constexpr branches in triton)
            buf = g
        else:
            buf = buf * h1 + h2 * g
        if NESTEROV & OPT:  # noqa: SIM108
            g = g + h1 * buf
        else:
            g = buf
    return w + h0 * g, buf


@triton.jit
def adam_update(w, g, m, v, vmax, h0, h1, h2, h3, h4, h5, h6, h7, h8, OPT: tl.constexpr):
    """torch.optim.Adam / AdamW on float32 ``w``: returns ``(w, m, v, vmax)``."""
    if MAXIMIZE & OPT:
        g = -g
    if HAS_WD & OPT:
        if (KIND_MASK & OPT) == ADAMW:
            w = w * h2
        else:
            g = g + h1 * w
    if LERP_SMALL & OPT:  # noqa: SIM108 (torch's lerp, two branches on the weight)
        m = m + h3 * (g - m)
    else:
        m = g - (g - m) * h4
    v = v * h5 + h6 * g * g
    vv = v
    if AMSGRAD & OPT:
        vmax = tl.where((v > vmax) | (v != v), v, vmax)  # torch.maximum: NaN propagates
        vv = vmax
    # IEEE sqrt and division (torch's kernels; Triton's plain ones are approximate on GPU)
    denom = tl.math.div_rn(tl.math.sqrt_rn(vv), h8) + h7
    return w + tl.math.div_rn(h0 * m, denom), m, v, vmax  # addcdiv: w + (value * m) / denom


@triton.jit
def update_tile(lp, gp, b1p, b2p, b3p, mask, h0, h1, h2, h3, h4, h5, h6, h7, h8,
                OPT: tl.constexpr):  # fmt: skip
    """One tile of the base update, in place.

    ``lp``/``gp``/``b1p``/``b2p``/``b3p``: blocks of pointers to the latent,
    gradient and state elements (state pointers unused where ``OPT`` says so),
    ``mask`` the valid elements. Reads and writes the latent and the state
    (stored in their dtype), reads the gradient. An element whose new latent or
    state is not finite (as stored) keeps its old ones (ops.py). Returns the stored
    latent as float32 (0 where masked) and the mask of the elements that kept theirs.
    """
    w0 = tl.load(lp, mask=mask, other=0.0)
    w = w0.to(tl.float32)
    g = tl.load(gp, mask=mask, other=0.0).to(tl.float32)
    if (KIND_MASK & OPT) == SGD:
        if MOMENTUM & OPT:
            b0 = tl.load(b1p, mask=mask, other=0.0)  # zeros before the first update
            if INIT_BUF & OPT:  # noqa: SIM108
                buf = g  # torch's first step starts the buffer at g
            else:
                buf = b0.to(tl.float32)
            w, buf = sgd_update(w, g, buf, h0, h1, h2, h3, OPT)
            nb = buf.to(b1p.dtype.element_ty)
            new = w.to(lp.dtype.element_ty)
            ok = _finite(new.to(tl.float32)) & _finite(nb.to(tl.float32))
            tl.store(b1p, tl.where(ok, nb, b0), mask=mask)
        else:
            w, buf = sgd_update(w, g, g, h0, h1, h2, h3, OPT)
            new = w.to(lp.dtype.element_ty)
            ok = _finite(new.to(tl.float32))
    else:
        m0 = tl.load(b1p, mask=mask, other=0.0)
        v0 = tl.load(b2p, mask=mask, other=0.0)
        if AMSGRAD & OPT:  # noqa: SIM108
            x0 = tl.load(b3p, mask=mask, other=0.0)
        else:
            x0 = v0
        w, m, v, vmax = adam_update(w, g, m0.to(tl.float32), v0.to(tl.float32),
                                    x0.to(tl.float32), h0, h1, h2, h3, h4, h5, h6, h7, h8,
                                    OPT)  # fmt: skip
        nm, nv, nx = m.to(m0.dtype), v.to(v0.dtype), vmax.to(x0.dtype)
        new = w.to(lp.dtype.element_ty)
        ok = _finite(new.to(tl.float32)) & _finite(nm.to(tl.float32)) & _finite(nv.to(tl.float32))
        if AMSGRAD & OPT:
            ok = ok & _finite(nx.to(tl.float32))
            tl.store(b3p, tl.where(ok, nx, x0), mask=mask)
        tl.store(b1p, tl.where(ok, nm, m0), mask=mask)
        tl.store(b2p, tl.where(ok, nv, v0), mask=mask)
    stored = tl.where(ok, new, w0)
    tl.store(lp, stored, mask=mask)
    return tl.where(mask, stored.to(tl.float32), 0.0), mask & (ok == 0)


@triton.jit
def _finite(x):
    """True where ``x`` (float32) is finite: NaN and +-Inf give NaN when subtracted."""
    return (x - x) == 0.0
