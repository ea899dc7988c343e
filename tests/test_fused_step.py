"""The fused step through QuantOptimizer (SPEC.md §8) against the unfused path.

Each run trains two copies of the same parameters with the same gradient
sequence (fixed random gradients, so that the two runs see equal inputs at
every step and differences can only come from float32 rounding): one
QuantOptimizer on the fused step, one with ``fused=False`` (torch's own
``base.step()`` on the restored latents, then the public release's
per-parameter quantize/prox). After every step: unquantized groups bitwise
equal; latents and the base optimizer's state within float32 rounding; the
projected weights within SPEC.md §6 tolerances (an element may differ more only
when it sits on a decision boundary: at most one per 1000 elements).

Warmup, annealing and the hard phase are all crossed (warmup 3, anneal 5..20,
32 steps, levels every 3 steps).
"""

from __future__ import annotations

import pytest
import torch
from foundation_models import one_thread  # noqa: F401  (autouse fixture)

from parq.optim import (
    ProxBinaryRelax,
    ProxHardQuant,
    ProxPARQ,
    ProxSoftQuant,
    QuantOptimizer,
)
from parq.quant import LSBQuantizer, TernaryThresholdQuantizer, TernaryUnifQuantizer, UnifQuantizer

STEPS = 32
SHAPES = [(6, 5), (4, 3, 3, 3), (2, 40), (7,)]  # 2-D, 4-D and a 1-D (quantized per tensor)

BASES = {
    "sgd": lambda g: torch.optim.SGD(g, lr=0.05),
    "sgd-mom-wd": lambda g: torch.optim.SGD(g, lr=0.05, momentum=0.9, weight_decay=1e-3),
    "sgd-nesterov-max": lambda g: torch.optim.SGD(g, lr=0.05, momentum=0.8, nesterov=True,
                                                  weight_decay=1e-3, maximize=True),
    "sgd-dampening": lambda g: torch.optim.SGD(g, lr=0.05, momentum=0.9, dampening=0.25),
    "adam": lambda g: torch.optim.Adam(g, lr=1e-2),
    "adam-wd-ams-max": lambda g: torch.optim.Adam(g, lr=1e-2, weight_decay=1e-2, amsgrad=True,
                                                  maximize=True),
    "adamw": lambda g: torch.optim.AdamW(g, lr=1e-2, weight_decay=1e-2),
    "adamw-ams-betas": lambda g: torch.optim.AdamW(g, lr=1e-2, betas=(0.3, 0.99), eps=1e-6,
                                                   weight_decay=0.1, amsgrad=True),
    "adamw-tensor-lr": lambda g: torch.optim.AdamW(g, lr=torch.tensor(1e-2)),
    "adamw-foreach": lambda g: torch.optim.AdamW(g, lr=1e-2, foreach=True),
    "adam-fused-flag": lambda g: torch.optim.Adam(g, lr=1e-2, fused=True),
}  # fmt: skip


def _params(dtype=torch.float32, seed=0) -> list[torch.nn.Parameter]:
    g = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter((torch.randn(s, generator=g) * 0.3).to(dtype)) for s in SHAPES]


def _grads(step: int, params, seed=1) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed * 1000 + step)
    return [(torch.randn(p.shape, generator=g) * 0.1).to(p.dtype) for p in params]


def _build(params, base, quantizer, prox, fused, bits=2, backend=None, block=None, **kw):
    weights, others = params[:-1], params[-1:]
    group = {"params": weights, "quant_bits": bits}
    if block is not None:
        group["quant_block_size"] = block
        group["params"] = [w for w in weights if w.dim() <= 2 and w.size(-1) % block == 0]
        chosen = {id(w) for w in group["params"]}
        others = [w for w in weights if id(w) not in chosen] + others
    kw.setdefault("warmup_steps", 3)
    kw.setdefault("quant_period", 3)
    return QuantOptimizer(BASES[base]([group, {"params": others}]), quantizer, prox,
                          fused=fused, backend=backend if fused else None, **kw)  # fmt: skip


def _ulp(dtype):
    return torch.finfo(dtype).eps


def _assert_close(a, b, what, ulps=4):
    """Within ``ulps`` ulp of each value, or 1e-6 of the tensor's largest magnitude
    (half precision: ``ulps`` ulp of it, as a rounding of an intermediate of that
    size can survive a cancellation)."""
    assert a.dtype == b.dtype and a.shape == b.shape, what
    if a.numel() == 0:
        return
    a, b, ulp = a.detach().float(), b.detach().float(), _ulp(a.dtype)
    floor = 1e-6 if ulp < 1e-6 else ulps * ulp
    tol = floor * b.abs().max() + ulps * ulp * b.abs()
    assert bool(((a - b).abs() <= tol).all()), f"{what}: max diff {(a - b).abs().max()}"


def _assert_projection_close(p, r, slope, what, ulps=4):
    """Weights within SPEC §6 (the latent's rounding times the map's slope), plus a few
    ulp of the storage dtype; boundary flips for at most 1 in 1000 elements."""
    ulp = _ulp(p.dtype)
    p, r = p.detach().float(), r.detach().float()
    scale = r.abs().max().clamp_min(1e-30)
    floor = 1e-5 if ulp < 1e-6 else ulps * ulp
    tol = floor * scale * slope + ulps * ulp * r.abs()
    bad = (p - r).abs() > tol
    assert int(bad.sum()) <= max(1, r.numel() // 1000), f"{what}: {int(bad.sum())} differ"


def run_pair(base, make_quantizer, make_prox, dtype=torch.float32, backend=None, steps=STEPS,
             ulps=4, **kw):  # fmt: skip
    """Train a fused and an unfused optimizer in step; compare after every step."""
    pa, pb = _params(dtype), _params(dtype)
    fa = _build(pa, base, make_quantizer(), make_prox(), True, backend=backend, **kw)
    fb = _build(pb, base, make_quantizer(), make_prox(), False, **kw)
    for step in range(steps):
        for params, opt in ((pa, fa), (pb, fb)):
            for p, g in zip(params, _grads(step, params), strict=True):
                p.grad = g
            opt.step()
        quantized = {id(p) for p in fa.param_groups[0]["params"]}
        slope = 1.0 / max(fa.param_groups[0].get("inv_slope", 1.0), 1e-3)
        for i, (a, b) in enumerate(zip(pa, pb, strict=True)):
            where = f"[{base} step {step}] param {i}"
            if id(a) not in quantized:
                assert torch.equal(a, b), f"{where}: unquantized group differs"
                continue
            sa, sb = fa.state[a], fb.state[b]
            assert sa.keys() == sb.keys(), f"{where}: state keys {sorted(sa)} != {sorted(sb)}"
            for key in sb:
                if key == "quants":  # levels from latents that agree to rounding
                    rtol = 1e-5 if dtype == torch.float32 else ulps * _ulp(dtype)
                    torch.testing.assert_close(sa[key], sb[key], rtol=rtol, atol=rtol * 0.3)
                elif key == "step":
                    assert sa[key].dtype == sb[key].dtype and sa[key].device == sb[key].device
                    assert float(sa[key]) == float(sb[key]), where
                else:
                    _assert_close(sa[key], sb[key], f"{where} {key}", ulps)
            _assert_projection_close(a, b, slope, f"{where} weights", ulps)
    if backend is not None:
        assert fa.step_paths[0].path == "fused step", fa.step_paths
    return fa, fb


@pytest.mark.parametrize("base", list(BASES))
@pytest.mark.parametrize("backend", ["cpu", "reference"])
def test_every_base_optimizer_option_set(base, backend):
    run_pair(base, UnifQuantizer, lambda: ProxPARQ(5, 20), backend=backend, quant_per_channel=True)


QUANT_PROX = [
    ("unif-hard-tensor", UnifQuantizer, ProxHardQuant, dict(quant_per_channel=False)),
    ("lsbq-parq-channel", LSBQuantizer, lambda: ProxPARQ(5, 20), dict(quant_per_channel=True)),
    ("lsbq3-soft-channel", LSBQuantizer, lambda: ProxSoftQuant(5, 20),
     dict(quant_per_channel=True, bits=3)),
    ("ternary-relax-tensor", TernaryUnifQuantizer, lambda: ProxBinaryRelax(5, 20),
     dict(quant_per_channel=False, bits=0)),
    ("optimal-parq-block", lambda: LSBQuantizer(optimal=True), lambda: ProxPARQ(5, 20),
     dict(quant_per_channel=True, block=5)),
    ("center-hard-shrink", lambda: UnifQuantizer(center=True), ProxHardQuant,
     dict(quant_per_channel=True, quant_shrink=True)),
    ("thr-ternary-parq-channel", TernaryThresholdQuantizer, lambda: ProxPARQ(5, 20),
     dict(quant_per_channel=True, bits=0)),
    ("thr-ternary-max-hard-tensor", lambda: TernaryThresholdQuantizer(0.05, "max"),
     ProxHardQuant, dict(quant_per_channel=False, bits=0)),
    ("unif-parq-wd-anneal", UnifQuantizer, lambda: ProxPARQ(5, 20),
     dict(quant_per_channel=True, anneal_wd_frac=0.5, quant_period=1, warmup_steps=0)),
]  # fmt: skip


@pytest.mark.parametrize(("name", "mq", "mp", "kw"), QUANT_PROX, ids=[c[0] for c in QUANT_PROX])
@pytest.mark.parametrize("base", ["sgd-mom-wd", "adamw"])
def test_quantizers_prox_maps_and_layouts(name, mq, mp, kw, base):
    fa, fb = run_pair(base, mq, mp, backend="cpu", **kw)
    for key in ("cumu_lr", "inv_slope", "weight_decay", "num_steps"):
        assert fa.param_groups[0].get(key) == fb.param_groups[0].get(key), key


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("base", ["sgd-nesterov-max", "adamw-ams-betas"])
def test_half_precision_parameters(dtype, base):
    """torch updates bf16/fp16 with per-op half rounding, the fused step in float32 with
    one rounding: they agree to a few half-precision ulps per step."""
    run_pair(base, LSBQuantizer, lambda: ProxPARQ(5, 20), dtype=dtype, backend="cpu",
             quant_per_channel=True, ulps=16)  # fmt: skip
