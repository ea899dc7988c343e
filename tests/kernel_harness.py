"""Compare a backend of the fused op with the reference, to SPEC.md §6.

Every backend test (triton, cpu, cuda) uses this one criterion:

* ``latents`` equal the input weights exactly (where an input is NaN/Inf: the
  previous latent, which the op keeps); the non-finite flags are equal;
* ``quants`` agree to a few ulp of the row's scale;
* the projected weights agree within ``atol = 1e-6 * max|x| * A`` (``A`` the
  map's largest slope, §6) plus a few ulp of the storage dtype; an element
  outside that is accepted only if ``x`` lies within ``BOUNDARY_REL`` of a
  decision boundary, which is checked, not assumed: nudging that element by
  ``± BOUNDARY_REL * max|x|`` must make the reference produce the backend's value.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import Tensor

from parq_kernels import backends
from parq_kernels.ops import ProxKind, QuantKind, num_levels

BOUNDARY_REL = 2e-6  # 1e-6 of SPEC.md §6, doubled for float32 reduction-order noise
LEVEL_RTOL = 4e-6  # Q agreement, relative to the row's largest level magnitude


@dataclass(frozen=True)
class QuantConfig:
    name: str
    kind: QuantKind
    bits: int
    qargs: tuple[float, ...] = ()
    center: bool = False

    @property
    def K(self) -> int:
        return num_levels(self.kind, self.bits, self.qargs)


@dataclass(frozen=True)
class ProxConfig:
    name: str
    kind: ProxKind
    arg: float = 0.0

    def slope(self) -> float:
        """A of SPEC.md §6: the map's largest slope."""
        if self.kind == ProxKind.PARQ:
            return 1.0 / self.arg
        if self.kind == ProxKind.SOFT:
            T = self.arg
            return T / (4 * (1 / (1 + math.exp(-T / 2)) - 0.5))
        return 1.0


UNIF = (0.0, 0.5, 0.5)  # UnifQuantizer defaults: mean scale, int_shift 0.5, zero_point 0.5
MAXUNIF = (1.0, 1.0, 0.0)  # MaxUnifQuantizer

QUANT_CONFIGS = [
    QuantConfig("unif-b1", QuantKind.UNIFORM, 1, UNIF),
    QuantConfig("unif-b2", QuantKind.UNIFORM, 2, UNIF),
    QuantConfig("unif-b4", QuantKind.UNIFORM, 4, UNIF),
    QuantConfig("unif-b8", QuantKind.UNIFORM, 8, UNIF),
    QuantConfig("unif-b3-center", QuantKind.UNIFORM, 3, UNIF, center=True),
    QuantConfig("maxunif-b2", QuantKind.UNIFORM, 2, MAXUNIF),
    QuantConfig("maxunif-b4", QuantKind.UNIFORM, 4, MAXUNIF),
    QuantConfig("ternary-unif", QuantKind.TERNARY_UNIF, 0),
    QuantConfig("asym-b1", QuantKind.ASYM, 1),
    QuantConfig("asym-b2", QuantKind.ASYM, 2),
    QuantConfig("asym-b4", QuantKind.ASYM, 4),
    QuantConfig("lsbq-b1", QuantKind.LSBQ_GREEDY, 1),
    QuantConfig("lsbq-b2", QuantKind.LSBQ_GREEDY, 2),
    QuantConfig("lsbq-b3", QuantKind.LSBQ_GREEDY, 3),
    QuantConfig("lsbq-b4", QuantKind.LSBQ_GREEDY, 4),
    QuantConfig("lsbq-b8", QuantKind.LSBQ_GREEDY, 8),
    QuantConfig("lsbq-b2-center", QuantKind.LSBQ_GREEDY, 2, center=True),
    QuantConfig("lsbq-ternary", QuantKind.LSBQ_TERNARY, 0, (1.1,)),
    QuantConfig("lsbq-opt-b0", QuantKind.LSBQ_OPTIMAL, 0),
    QuantConfig("lsbq-opt-b1", QuantKind.LSBQ_OPTIMAL, 1),
    QuantConfig("lsbq-opt-b2", QuantKind.LSBQ_OPTIMAL, 2),
    QuantConfig("lsbq-opt-b2-center", QuantKind.LSBQ_OPTIMAL, 2, center=True),
    QuantConfig("ternary-thr-mean", QuantKind.TERNARY_THRESHOLD, 0, (0.7, 0.0)),
    QuantConfig("ternary-thr-max", QuantKind.TERNARY_THRESHOLD, 0, (0.05, 1.0)),
    QuantConfig("ternary-thr-center", QuantKind.TERNARY_THRESHOLD, 0, (0.7, 0.0), center=True),
]

PROX_CONFIGS = [
    ProxConfig("none", ProxKind.NONE),
    ProxConfig("hard", ProxKind.HARD),
    ProxConfig("soft-T5", ProxKind.SOFT, 5.0),
    ProxConfig("parq-rho0.3", ProxKind.PARQ, 0.3),
    ProxConfig("relax-0.4", ProxKind.RELAX, 0.4),
]

DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def placed(t: Tensor, misalign: bool) -> Tensor:
    """A copy of ``t`` whose storage starts 64-byte aligned, or one element past it (the
    CPU loops' head then takes the per-element code until the streaming-store alignment)."""
    per = 64 // t.element_size()
    base = torch.empty(t.numel() + 2 * per, dtype=t.dtype)
    skip = (-(base.data_ptr() // t.element_size()) % per) + (1 if misalign else 0)
    out = base[skip : skip + t.numel()].view(t.shape)
    out.copy_(t)
    return out


def make_rows(
    shapes: list[tuple[int, int]],
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    seed: int = 0,
    zero_row: bool = False,
) -> list[Tensor]:
    """Random 2-D weights (rows are quantization groups); optionally an all-zero first row."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for rows, cols in shapes:
        x = torch.randn(rows, cols, generator=g) * (0.5 + torch.rand(rows, 1, generator=g))
        if zero_row and rows > 0:
            x[0] = 0
        out.append(x.to(dtype=dtype, device=device))
    return out


@dataclass
class OpResult:
    params: list[Tensor]
    latents: list[Tensor]
    quants: list[Tensor]
    flags: Tensor
    inputs: list[Tensor] = field(default_factory=list)


PREVIOUS = 0.25  # the latent before a call: what an element whose input is NaN/Inf keeps


def previous_latent(p: Tensor) -> Tensor:
    return torch.full_like(p, PREVIOUS)


def expected_latent(p: Tensor) -> Tensor:
    """The latent after a call (ops.py): the input, or the previous latent where it is not
    finite."""
    return torch.where(torch.isfinite(p), p, previous_latent(p))


def run_op(
    backend: str,
    params: list[Tensor],
    qc: QuantConfig,
    pc: ProxConfig,
    update: bool = True,
    gamma: float = 1.0,
    quants: list[Tensor] | None = None,
) -> OpResult:
    """Run one backend's implementation on copies of the inputs."""
    ps = [p.clone() for p in params]
    lats = [previous_latent(p) for p in params]
    if quants is None:
        qs = [torch.full((p.size(0), qc.K), float("nan"), device=p.device) for p in params]
    else:
        qs = [Q.clone() for Q in quants]
    flags = torch.zeros(len(params), dtype=torch.int32, device=params[0].device)
    impl = backends.get_impl(backend)
    impl(ps, lats, qs, flags, int(qc.kind), qc.bits, qc.qargs, qc.center, update,
         int(pc.kind), pc.arg, gamma)  # fmt: skip
    return OpResult(ps, lats, qs, flags, [p.clone() for p in params])


def _ulp(dtype: torch.dtype) -> float:
    return torch.finfo(dtype).eps


def assert_matches_reference(
    backend: str,
    params: list[Tensor],
    qc: QuantConfig,
    pc: ProxConfig,
    update: bool = True,
    gamma: float = 1.0,
    quants: list[Tensor] | None = None,
) -> None:
    """Run ``backend`` and the reference on the same inputs and compare (module doc)."""
    if not update and quants is None:  # levels from a reference update step
        quants = run_op(
            "reference", params, qc, ProxConfig("none", ProxKind.NONE), True, gamma
        ).quants
    out = run_op(backend, params, qc, pc, update, gamma, quants)
    ref = run_op("reference", params, qc, pc, update, gamma, quants)
    ctx = f"[{backend} {qc.name} {pc.name} update={update} gamma={gamma}]"
    assert torch.equal(out.flags.cpu(), ref.flags.cpu()), f"{ctx} non-finite flags differ"
    for i, p in enumerate(params):
        where = f"{ctx} param {i} shape {tuple(p.shape)} {p.dtype}"
        assert torch.equal(out.latents[i], expected_latent(p)), (
            f"{where}: latent is not the input (or, where that is not finite, the old latent)"
        )
        Qo, Qr = out.quants[i].float().cpu(), ref.quants[i].float().cpu()
        scale_Q = Qr.abs().amax(dim=1, keepdim=True) if Qr.numel() else Qr
        assert torch.all((Qo - Qr).abs() <= LEVEL_RTOL * scale_Q + 1e-30), (
            f"{where}: levels differ, max |dQ| = {(Qo - Qr).abs().max().item():.3g}"
        )
        _assert_params_close(backend, where, params, i, qc, pc, update, gamma, quants, out, ref)


def _assert_params_close(backend, where, params, i, qc, pc, update, gamma, quants, out, ref):
    x = expected_latent(params[i]).float() / gamma
    yo, yr = out.params[i].float(), ref.params[i].float()
    if x.numel() == 0:
        return
    row_max = x.abs().amax(dim=1, keepdim=True).clamp_min(1e-30)
    if qc.center:
        row_max = row_max * 2
    tol = 1e-6 * row_max * pc.slope() + 4 * _ulp(torch.float32) * row_max
    tol = tol + 2 * _ulp(params[i].dtype) * yr.abs()
    bad = (yo - yr).abs() > tol
    if not bad.any():
        return
    ok = torch.zeros_like(bad)
    for sign in (1.0, -1.0):  # is each differing element next to a decision boundary?
        # nudge in float32 (the compute type), then round like the backend stores
        nudged = [p.float() for p in params]
        delta = (sign * BOUNDARY_REL * gamma * row_max).expand_as(x)
        nudged[i] = nudged[i] + torch.where(bad, delta, torch.zeros_like(delta))
        alt = run_op("reference", nudged, qc, pc, update, gamma, quants).params[i]
        alt = alt.to(params[i].dtype).float()
        ok |= bad & ((yo - alt).abs() <= tol)
    stray = bad & ~ok
    assert not stray.any(), (
        f"{where}: {int(stray.sum())} element(s) differ away from any decision boundary, "
        f"e.g. x={x[stray][0].item():.8g} {backend}={yo[stray][0].item():.8g} "
        f"reference={yr[stray][0].item():.8g}"
    )


# ---------------------------------------------------------------------------
# Whole-optimizer equivalence: a backend vs the reference backend, in lockstep.
# ---------------------------------------------------------------------------


class TinyNet(torch.nn.Module):
    """2-D, 4-D and 1-D parameters, with row counts that do not divide evenly."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = torch.nn.Conv2d(2, 5, 3)  # weight (5, 2, 3, 3)
        self.fc1 = torch.nn.Linear(5 * 4 * 4, 33)
        self.fc2 = torch.nn.Linear(33, 8)

    def forward(self, x: Tensor) -> Tensor:
        x = torch.relu(self.conv(x)).flatten(1)
        return self.fc2(torch.relu(self.fc1(x)))


def _build(backend, make_quantizer, make_prox, dtype, base, block_size, device, bits=2,
           **qopt_kwargs):  # fmt: skip
    from parq.optim import QuantOptimizer

    torch.manual_seed(1)
    model = TinyNet().to(dtype=dtype, device=device)
    if block_size is None:
        weights = [model.fc1.weight, model.fc2.weight, model.conv.weight]
    else:  # 2-D weights whose columns the block size divides (fc1 has 80, fc2 33)
        weights = [w for w in (model.fc1.weight, model.fc2.weight) if w.size(1) % block_size == 0]
    groups = [
        {"params": weights, "quant_bits": bits, "quant_block_size": block_size},
        {"params": [model.fc1.bias, model.conv.bias]},
    ]
    if base == "sgd":
        opt = torch.optim.SGD(groups, lr=0.05, momentum=0.9, weight_decay=1e-4)
    else:
        opt = torch.optim.AdamW(groups, lr=0.01)
    qopt = QuantOptimizer(opt, make_quantizer(), make_prox(), backend=backend, **qopt_kwargs)
    return model, qopt


def _assert_rounding_close(a: Tensor, b: Tensor, what: str) -> None:
    """Equal to float32 rounding of one step's update (SPEC §8): a few ulp of the
    storage dtype of each value, or 1e-6 of the tensor's largest magnitude."""
    assert a.dtype == b.dtype and a.shape == b.shape, f"{what}: {a.dtype} {a.shape}"
    ulp = _ulp(a.dtype)
    if a.numel() == 0:
        return
    a, b = a.detach().float(), b.detach().float()
    tol = 1e-6 * b.abs().max().clamp_min(1e-30) + 2 * ulp * b.abs()
    assert bool(((a - b).abs() <= tol).all()), f"{what}: max diff {(a - b).abs().max()}"


def assert_optimizer_matches_reference(
    backend: str,
    make_quantizer,
    make_prox,
    steps: int = 30,
    dtype: torch.dtype = torch.float32,
    base: str = "sgd",
    block_size: int | None = None,
    device: str | torch.device = "cpu",
    bits: int = 2,
    **qopt_kwargs,
) -> None:
    """``steps`` QuantOptimizer steps with ``backend`` vs ``reference``, in lockstep.

    Both optimizers see the same weights and gradients at every step (after
    each comparison the reference state is copied into the backend's), so each
    step is compared on equal inputs: weights within SPEC §6 tolerance (at most
    one boundary flip per 1000 elements), levels to a few ulp, the latent and the
    base optimizer's state to float32 rounding (SPEC §8: the fused step computes
    torch's update itself), ``inv_slope`` and ``num_steps`` equal.
    """
    fast_model, fast = _build(backend, make_quantizer, make_prox, dtype, base, block_size,
                              device, bits, **qopt_kwargs)  # fmt: skip
    ref_model, ref = _build("reference", make_quantizer, make_prox, dtype, base, block_size,
                            device, bits, **qopt_kwargs)  # fmt: skip
    g = torch.Generator().manual_seed(2)
    for step in range(steps):
        x = torch.randn(4, 2, 6, 6, generator=g).to(dtype=dtype, device=device)
        for model, opt in ((fast_model, fast), (ref_model, ref)):
            opt.zero_grad()
            model(x).float().square().mean().backward()
            opt.step()
        where = f"[{backend} step {step}]"
        for (name, pf), pr in zip(
            fast_model.named_parameters(), ref_model.parameters(), strict=True
        ):
            tol = 1e-5 * pr.detach().float().abs().max().clamp_min(1e-30)
            tol = tol + 2 * _ulp(dtype) * pr.detach().float().abs()
            bad = (pf.detach().float() - pr.detach().float()).abs() > tol
            assert int(bad.sum()) <= max(1, pr.numel() // 1000), (
                f"{where} {name}: {int(bad.sum())} differ"
            )
            sf, sr = fast.state[pf], ref.state[pr]
            if "quants" in sr:
                Qf, Qr = sf["quants"], sr["quants"]
                assert Qf.shape == Qr.shape and Qf.dtype == torch.float32, f"{where} {name} Q"
                assert torch.allclose(Qf, Qr, rtol=LEVEL_RTOL, atol=1e-30), (
                    f"{where} {name} Q values"
                )
            for key, vr in sr.items():  # latent and the base optimizer's state (SPEC §8)
                if key != "quants" and torch.is_tensor(vr) and vr.dim() > 0:
                    _assert_rounding_close(sf[key], vr, f"{where} {name} {key}")
        for gf, gr in zip(fast.param_groups, ref.param_groups, strict=True):
            assert gf.get("inv_slope") == gr.get("inv_slope"), f"{where} inv_slope"
            assert gf.get("num_steps") == gr.get("num_steps"), f"{where} num_steps"
        # lockstep: continue both from the reference's state
        with torch.no_grad():
            for pf, pr in zip(fast_model.parameters(), ref_model.parameters(), strict=True):
                pf.copy_(pr)
                for key, value in ref.state[pr].items():
                    if torch.is_tensor(value):
                        fast.state[pf][key].copy_(value)
