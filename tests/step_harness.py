"""Compare a backend of the fused step (``fused_step_``) with the reference.

The fused step is the base optimizer's update of the latent weights followed by
quantize + prox (SPEC.md §8). A backend passes when

* its non-finite flags equal the reference's (an element whose update is NaN/Inf keeps
  its latent and state: that is compared like every other value);
* its updated latent and optimizer state equal the reference's to float32
  rounding (a few ulp of the storage dtype, or 1e-6 of the tensor's largest
  magnitude): both compute torch's update in float32, but may round differently;
* its levels and projected weights pass :mod:`kernel_harness`'s criterion
  against the reference ``quant_prox_`` run on the backend's *own* updated latent
  (so a one-ulp difference of the latent that moves an element across a decision
  boundary is judged as such, not as a wrong projection).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from kernel_harness import (
    LEVEL_RTOL,
    ProxConfig,
    QuantConfig,
    _assert_params_close,
    _assert_rounding_close,
    run_op,
)
from torch import Tensor

from parq_kernels import backends
from parq_kernels.kinds import OptimKind, ProxKind


@dataclass(frozen=True)
class OptimConfig:
    name: str
    kind: OptimKind
    hparams: tuple[float, ...]

    @property
    def nbufs(self) -> int:
        """How many of bufs1/2/3 the update uses."""
        if self.kind == OptimKind.SGD:
            return 1 if self.hparams[1] != 0 else 0
        return 3 if self.hparams[6] else 2


# SGD: (lr, momentum, dampening, weight_decay, nesterov, maximize, init_buf)
# Adam / AdamW: (lr, beta1, beta2, eps, weight_decay, maximize, amsgrad, step)
OPTIM_CONFIGS = [
    OptimConfig("sgd", OptimKind.SGD, (0.1, 0.0, 0.0, 0.0, 0, 0, 0)),
    OptimConfig("sgd-mom-wd", OptimKind.SGD, (0.05, 0.9, 0.0, 1e-3, 0, 0, 0)),
    OptimConfig("sgd-mom-first", OptimKind.SGD, (0.05, 0.9, 0.0, 1e-3, 0, 0, 1)),
    OptimConfig("sgd-nesterov-max", OptimKind.SGD, (0.05, 0.9, 0.0, 1e-3, 1, 1, 0)),
    OptimConfig("sgd-dampening", OptimKind.SGD, (0.05, 0.8, 0.3, 0.0, 0, 0, 0)),
    OptimConfig("adam", OptimKind.ADAM, (1e-2, 0.9, 0.999, 1e-8, 0.0, 0, 0, 3)),
    OptimConfig("adam-wd-max", OptimKind.ADAM, (1e-2, 0.8, 0.99, 1e-6, 1e-2, 1, 0, 1)),
    OptimConfig("adam-amsgrad", OptimKind.ADAM, (1e-2, 0.9, 0.999, 1e-8, 0.0, 0, 1, 5)),
    OptimConfig("adamw", OptimKind.ADAMW, (1e-3, 0.9, 0.999, 1e-8, 1e-2, 0, 0, 10)),
    OptimConfig("adamw-ams-beta0.3", OptimKind.ADAMW, (1e-3, 0.3, 0.99, 1e-8, 0.1, 0, 1, 2)),
]
OC = {c.name: c for c in OPTIM_CONFIGS}


def make_state(latents: list[Tensor], oc: OptimConfig, seed: int = 5) -> tuple[list, list]:
    """Random gradients and optimizer state like the latents: ``(grads, [bufs1, bufs2, bufs3])``;
    second moments are non-negative and ``max_exp_avg_sq`` is sometimes below ``exp_avg_sq``."""
    g = torch.Generator().manual_seed(seed)

    def rand(p: Tensor, scale: float) -> Tensor:
        return (torch.randn(p.shape, generator=g) * scale).to(dtype=p.dtype, device=p.device)

    grads = [rand(p, 0.1) for p in latents]
    bufs: list[list[Tensor]] = [[], [], []]
    for p in latents:
        if oc.kind == OptimKind.SGD:
            if oc.nbufs:
                bufs[0].append(rand(p, 0.05))
            continue
        bufs[0].append(rand(p, 0.02))
        bufs[1].append(rand(p, 0.01).square())
        if oc.nbufs == 3:
            bufs[2].append(rand(p, 0.01).square())
    return grads, bufs


@dataclass
class StepResult:
    params: list[Tensor]
    latents: list[Tensor]
    bufs: list[list[Tensor]]
    quants: list[Tensor]
    flags: Tensor


def run_step(backend, latents, grads, bufs, oc, qc, pc, update=True, gamma=1.0, quants=None):
    """One backend's ``fused_step_`` on copies of the inputs."""
    ps = [torch.full_like(p, float("nan")) for p in latents]
    lats = [p.clone() for p in latents]
    bs = [[b.clone() for b in group] for group in bufs]
    if quants is None:
        qs = [torch.full((p.size(0), qc.K), float("nan"), device=p.device) for p in latents]
    else:
        qs = [Q.clone() for Q in quants]
    flags = torch.zeros(len(latents), dtype=torch.int32, device=latents[0].device)
    impl = backends.get_impl(backend, "fused_step_")
    impl(ps, lats, [g.clone() for g in grads], *bs, qs, flags, int(oc.kind), oc.hparams,
         int(qc.kind), qc.bits, qc.qargs, qc.center, update, int(pc.kind), pc.arg,
         gamma)  # fmt: skip
    return StepResult(ps, lats, bs, qs, flags)


def assert_step_matches_reference(
    backend: str,
    latents: list[Tensor],
    oc: OptimConfig,
    qc: QuantConfig,
    pc: ProxConfig,
    update: bool = True,
    gamma: float = 1.0,
    seed: int = 5,
    bad_grad: tuple[int, int, int, float] | None = None,
) -> None:
    """Run ``backend`` and the reference fused step on the same inputs (module doc);
    ``bad_grad = (i, row, col, value)`` puts a NaN/Inf into a gradient: that element keeps
    its latent and state (both runs must agree on it) and its parameter is flagged."""
    grads, bufs = make_state(latents, oc, seed)
    if bad_grad is not None:
        i, r, c, value = bad_grad
        grads[i][r, c] = value
    quants = None
    if not update:  # levels of the starting latents, from a reference update step
        quants = run_op("reference", latents, qc, ProxConfig("none", ProxKind.NONE), True,
                        gamma).quants  # fmt: skip
    out = run_step(backend, latents, grads, bufs, oc, qc, pc, update, gamma, quants)
    ref = run_step("reference", latents, grads, bufs, oc, qc, pc, update, gamma, quants)
    ctx = f"[{backend} {oc.name} {qc.name} {pc.name} update={update} gamma={gamma}]"
    assert torch.equal(out.flags.cpu(), ref.flags.cpu()), f"{ctx} non-finite flags differ"
    # the prox part, judged on the backend's own updated latent
    again = run_op("reference", out.latents, qc, pc, update, gamma, quants)
    for i, p in enumerate(latents):
        where = f"{ctx} param {i} shape {tuple(p.shape)} {p.dtype}"
        _assert_rounding_close(out.latents[i], ref.latents[i], f"{where} latent")
        for k in range(oc.nbufs):
            _assert_rounding_close(out.bufs[k][i], ref.bufs[k][i], f"{where} bufs{k + 1}")
        Qo, Qr = out.quants[i].float().cpu(), again.quants[i].float().cpu()
        scale_Q = Qr.abs().amax(dim=1, keepdim=True) if Qr.numel() else Qr
        assert torch.all((Qo - Qr).abs() <= LEVEL_RTOL * scale_Q + 1e-30), (
            f"{where}: levels differ, max |dQ| = {(Qo - Qr).abs().max().item():.3g}"
        )
        _assert_params_close(backend, where, out.latents, i, qc, pc, update, gamma, quants,
                             out, again)  # fmt: skip
