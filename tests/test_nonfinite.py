"""NaN/Inf gradients on every path of QuantOptimizer.step() (SPEC.md §6, issue 10).

The policy: a non-finite value never enters the latent (nor, on the fused step, the
optimizer state); the element keeps its previous latent and is projected from it;
the parameter is flagged, and the next level update raises NonFiniteParameterError
naming it and the step that saw it, after clearing non-finite entries that torch's own
base step may have left in its state. Skipping the bad batch and going on works, and
torch.amp.GradScaler's skipped steps work.
"""

from __future__ import annotations

import pytest
import torch
from foundation_models import one_thread  # noqa: F401  (autouse fixture)

from parq.optim import NonFiniteParameterError, ProxPARQ, QuantOptimizer
from parq.quant import LSBQuantizer, UnifQuantizer
from parq.quant.quantizer import Quantizer

PATHS = {
    "fused-step": dict(),
    "fused-prox": dict(fuse_base_step=False),
    "generic": dict(fused=False),
    "fused-step-reference": dict(backend="reference"),
}
BASES = {
    "sgd": lambda g: torch.optim.SGD(g, lr=0.05, momentum=0.9, weight_decay=1e-3),
    "adamw": lambda g: torch.optim.AdamW(g, lr=1e-2, amsgrad=True),
}


def _setup(path: str, base: str, period: int = 2):
    torch.manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(4, 6)), torch.nn.Parameter(torch.randn(3, 5)),
              torch.nn.Parameter(torch.randn(5))]  # fmt: skip
    groups = [{"params": params[:2], "quant_bits": 2}, {"params": params[2:]}]
    opt = QuantOptimizer(BASES[base](groups), LSBQuantizer(), ProxPARQ(2, 8), quant_period=period,
                         quant_per_channel=True, **PATHS[path])  # fmt: skip
    return opt, params


def _grads(params, step, bad=None):
    g = torch.Generator().manual_seed(step)
    for p in params:
        p.grad = torch.randn(p.shape, generator=g) * 0.1
    if bad is not None:
        params[1].grad[2, 3] = bad


def _all_state_finite(opt, params) -> bool:
    tensors = [*params] + [v for p in params for v in opt.state[p].values() if torch.is_tensor(v)]
    return all(bool(torch.isfinite(t).all()) for t in tensors)


@pytest.mark.parametrize("path", list(PATHS))
@pytest.mark.parametrize("base", list(BASES))
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_skip_the_bad_batch_and_go_on(path, base, bad):
    opt, params = _setup(path, base)
    for step in range(3):
        _grads(params, step)
        opt.step()
    latent_before = opt.state[params[1]]["latent"].clone()
    _grads(params, 3, bad)
    opt.step()  # step 3: not a level update (period 2): noted, not raised
    assert opt.state[params[1]]["latent"][2, 3] == latent_before[2, 3]  # kept
    assert torch.isfinite(opt.state[params[1]]["latent"]).all()
    _grads(params, 4, bad)
    with pytest.raises(NonFiniteParameterError, match=r"param_groups\[0\] params\[1\].* step 3"):
        opt.step()  # step 4: a level update reports it
    assert opt.num_steps == 5  # the step itself completed, with the bad elements kept
    assert _all_state_finite(opt, params)
    for step in range(5, 10):  # skipping the bad batches: no more errors, training goes on
        _grads(params, step)
        opt.step()
    assert _all_state_finite(opt, params)
    assert opt.state[params[1]]["latent"][2, 3] != latent_before[2, 3]  # it trains again


@pytest.mark.parametrize("path", ["fused-step", "fused-prox", "generic"])
def test_nonfinite_at_the_first_quantized_step(path):
    """At the end of warmup there is no latent yet: a bad element keeps the weight it had
    before the step."""
    torch.manual_seed(0)
    w = torch.nn.Parameter(torch.randn(3, 4))
    opt = QuantOptimizer(torch.optim.SGD([{"params": [w], "quant_bits": 2}], lr=0.1),
                         UnifQuantizer(), ProxPARQ(5, 9), warmup_steps=1, quant_period=1,
                         **PATHS[path])  # fmt: skip
    w.grad = torch.ones_like(w)
    opt.step()  # warmup
    before = w.detach().clone()
    w.grad[0, 1] = float("nan")
    with pytest.raises(NonFiniteParameterError):
        opt.step()
    latent = opt.state[w]["latent"]
    assert latent[0, 1] == before[0, 1] and torch.isfinite(latent).all()


def test_grad_scaler_skips_steps_with_infs():
    """torch.amp.GradScaler unscales through QuantOptimizer's param_groups and skips the
    step on inf: no error, nothing changes; a fused=True torch base is not mistaken for
    an optimizer that unscales itself."""
    torch.manual_seed(0)
    model = torch.nn.Linear(6, 4)
    base = torch.optim.AdamW([{"params": [model.weight], "quant_bits": 2},
                              {"params": [model.bias]}], lr=1e-2, fused=True)  # fmt: skip
    opt = QuantOptimizer(base, UnifQuantizer(), ProxPARQ(0, 10), quant_period=1)
    assert base._step_supports_amp_scaling and not opt._step_supports_amp_scaling
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    x = torch.randn(8, 6)
    for step in range(4):
        opt.zero_grad()
        scaler.scale(model(x).square().mean()).backward()
        if step == 2:
            model.weight.grad[0, 0] = float("inf")
        snapshot = opt.state_dict() if step == 2 else None
        w = model.weight.detach().clone()
        scaler.step(opt)
        scaler.update()
        if step == 2:  # skipped: weights and every state tensor as they were
            assert torch.equal(model.weight, w)
            assert opt.state_dict()["param_groups"] == snapshot["param_groups"]
    assert scaler.get_scale() == 2.0**9  # halved once, at the skipped step
    assert opt.num_steps == 3 and _all_state_finite(opt, [model.weight])


class Exact(Quantizer):  # a user quantizer: the generic path (and its finite handling)
    def get_quant_size(self, b):
        return UnifQuantizer().get_quant_size(b)

    def quantize(self, p, b, dim=None):
        return UnifQuantizer().quantize(p, b, dim)


def test_user_quantizer_path_keeps_latents_finite_too():
    torch.manual_seed(0)
    w = torch.nn.Parameter(torch.randn(3, 4))
    opt = QuantOptimizer(torch.optim.SGD([{"params": [w], "quant_bits": 2}], lr=0.1, momentum=0.9),
                         Exact(), ProxPARQ(0, 4), quant_period=1)  # fmt: skip
    w.grad = torch.ones_like(w)
    opt.step()
    assert opt.step_paths[0].path == "base step + generic prox"
    w.grad[1, 1] = float("nan")
    with pytest.raises(NonFiniteParameterError):
        opt.step()
    assert _all_state_finite(opt, [w])
