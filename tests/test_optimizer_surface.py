"""The rest of the public release's QuantOptimizer surface (SPEC.md §1), and bad input that
must leave no state behind (issue 10): latent helpers, quantize_, start_step, attribute
fall-through, torch's optimizer hooks, add_param_group, backend names, dtype changes,
meta-device parameters, the grad mode of a step."""

from __future__ import annotations

import copy

import pytest
import torch
from foundation_models import one_thread  # noqa: F401  (autouse fixture)

from parq.optim import ProxHardQuant, ProxPARQ, QuantOptimizer
from parq.quant import LSBQuantizer, UnifQuantizer
from parq_kernels.backends import BackendUnavailableError


def _model_opt(**kw):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3))
    weights = [model[0].weight, model[2].weight]
    others = [model[0].bias, model[2].bias]
    base = torch.optim.AdamW([{"params": weights, "quant_bits": 2}, {"params": others}], lr=1e-2)
    return model, QuantOptimizer(base, LSBQuantizer(), ProxPARQ(2, 10), quant_period=2, **kw)


def _train(model, opt, steps, seed=1):
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        x, y = torch.randn(5, 6, generator=g), torch.randint(0, 3, (5,), generator=g)
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(x), y).backward()
        opt.step()


def _fixed_grad_steps(opt, steps, seed):
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        for group in opt.param_groups:
            for p in group["params"]:
                p.grad = torch.randn(p.shape, generator=g) * 0.1
        opt.step()


@pytest.mark.parametrize("fused", [True, False])
def test_restore_evaluate_save_continue_matches_an_uninterrupted_run(fused):
    """The public release's pattern: restore the latents, evaluate (or checkpoint) the
    full-precision model, save the latents back, go on: the latents, levels and projected
    weights follow the uninterrupted run's (same gradients)."""
    m1, o1 = _model_opt(fused=fused)
    m2, o2 = _model_opt(fused=fused)
    _train(m1, o1, 5)
    _train(m2, o2, 5)
    o2.restore_latent_params()
    for p in o2.param_groups[0]["params"]:
        assert torch.equal(p, o2.state[p]["latent"])
    with torch.no_grad():
        m2(torch.randn(2, 6))  # evaluate the latent model
    o2.save_latent_params()
    _fixed_grad_steps(o1, 5, seed=2)
    _fixed_grad_steps(o2, 5, seed=2)
    for a, b in zip(m1.parameters(), m2.parameters(), strict=True):
        assert torch.equal(a, b)
        for key, value in o1.state[a].items():
            assert torch.equal(value, o2.state[b][key]), key


def test_save_latent_params_creates_missing_latents():
    model, opt = _model_opt()
    opt.save_latent_params()  # before any step
    for p in opt.param_groups[0]["params"]:
        assert torch.equal(opt.state[p]["latent"], p) and opt.state[p]["latent"] is not p


def test_quantize_static_helper():
    p = torch.randn(4, 7)
    quants = torch.empty(4, 4)
    q = QuantOptimizer.quantize_(p, quants, UnifQuantizer(), 2, dim=-1)
    q_ref, Q_ref = UnifQuantizer().quantize(p, 2, dim=-1)
    assert torch.equal(q, q_ref) and torch.equal(quants, Q_ref)


def test_load_state_dict_start_step():
    model, opt = _model_opt()
    _train(model, opt, 3)
    sd = copy.deepcopy(opt.state_dict())
    model2, opt2 = _model_opt()
    opt2.load_state_dict(sd, start_step=40)
    assert opt2.num_steps == 40 and opt.num_steps == 3
    with pytest.raises(ValueError, match="start_step"):
        opt2.load_state_dict(sd, start_step=-1)


def test_attribute_fall_through_to_the_base_optimizer():
    model, opt = _model_opt()
    opt.base_optimizer.custom_counter = 7
    assert opt.custom_counter == 7
    assert opt.param_groups is opt.base_optimizer.param_groups
    with pytest.raises(AttributeError, match="no_such_thing"):
        opt.no_such_thing  # noqa: B018


def test_torch_optimizer_hooks_run():
    model, opt = _model_opt()
    seen = []
    opt.register_state_dict_pre_hook(lambda o: seen.append("sd-pre"))
    opt.register_state_dict_post_hook(lambda o, sd: {**sd, "extra": 1})
    opt.register_load_state_dict_pre_hook(lambda o, sd: seen.append("load-pre"))
    opt.register_load_state_dict_post_hook(lambda o: seen.append("load-post"))
    opt.register_step_pre_hook(lambda o, args, kwargs: seen.append("step-pre"))
    opt.register_step_post_hook(lambda o, args, kwargs: seen.append("step-post"))
    _train(model, opt, 1)
    sd = opt.state_dict()
    assert sd["extra"] == 1
    opt.load_state_dict(sd)
    assert seen == ["step-pre", "step-post", "sd-pre", "load-pre", "load-post"]


def test_a_rejected_param_group_is_not_kept():
    model, opt = _model_opt()
    _train(model, opt, 2)
    bad = torch.nn.Parameter(torch.randn(3, 5))
    with pytest.raises(ValueError, match="quant_bits"):
        opt.add_param_group({"params": [bad], "quant_bits": 11})
    assert len(opt.param_groups) == 2
    _train(model, opt, 2)  # later steps are not broken
    with pytest.raises(ValueError, match="quant_block_size"):
        opt.add_param_group({"params": [bad], "quant_bits": 2, "quant_block_size": 2})
    assert len(opt.param_groups) == 2
    opt.add_param_group({"params": [bad], "quant_bits": 2})
    bad.grad = torch.ones_like(bad)
    opt.step()
    assert "latent" in opt.state[bad]


def test_backend_names_are_checked_at_construction():
    p = torch.nn.Parameter(torch.randn(3, 4))
    base = torch.optim.SGD([{"params": [p], "quant_bits": 2}], lr=0.1)
    with pytest.raises(ValueError, match="backend must be one of"):
        QuantOptimizer(base, UnifQuantizer(), ProxHardQuant(), backend="bogus")
    with pytest.raises(BackendUnavailableError, match="cuda"):
        QuantOptimizer(base, UnifQuantizer(), ProxHardQuant(), backend="cuda")
    assert not base.state and p.grad is None  # nothing was stepped


@pytest.mark.parametrize("fused", [True, False])
def test_model_dtype_change_mid_training(fused):
    """model.to(bfloat16) after some steps: the latents follow (converted, not replaced by
    the projected weights), and training goes on (an SGD base: torch's own AdamW cannot
    step fp32 moments with bf16 gradients)."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3))
    groups = [{"params": [model[0].weight, model[2].weight], "quant_bits": 2},
              {"params": [model[0].bias, model[2].bias]}]  # fmt: skip
    base = torch.optim.SGD(groups, lr=0.05, momentum=0.9)
    opt = QuantOptimizer(base, LSBQuantizer(), ProxPARQ(2, 10), quant_period=2, fused=fused)
    _train(model, opt, 3)
    latents = [opt.state[p]["latent"].clone() for p in opt.param_groups[0]["params"]]
    model.to(torch.bfloat16)
    opt.restore_latent_params()  # latent (fp32) -> p (bf16)
    for p, latent in zip(opt.param_groups[0]["params"], latents, strict=True):
        assert torch.equal(p, latent.to(torch.bfloat16))
    g = torch.Generator().manual_seed(3)
    for _ in range(3):
        opt.zero_grad()
        x = torch.randn(5, 6, generator=g).to(torch.bfloat16)
        model(x).float().square().mean().backward()
        opt.step()
    for p in opt.param_groups[0]["params"]:
        assert opt.state[p]["latent"].dtype == torch.bfloat16 and torch.isfinite(p).all()


def test_meta_device_parameters_step_without_crashing():
    with torch.device("meta"):
        w = torch.nn.Parameter(torch.empty(4, 6))
    base = torch.optim.SGD([{"params": [w], "quant_bits": 2}], lr=0.1, momentum=0.9)
    opt = QuantOptimizer(base, UnifQuantizer(), ProxHardQuant(), quant_period=1)
    w.grad = torch.empty_like(w)
    opt.step()
    opt.step()
    assert opt.state[w]["latent"].device.type == "meta" and opt.num_steps == 2


def test_dtype_change_without_restore_keeps_the_latents_on_every_path():
    """model.to(bfloat16) straight after a step (p holds projected weights): the fused step
    converts the latents too, as the unfused path does, rather than restarting from p."""
    runs = []
    for kw in ({}, {"fuse_base_step": False}):
        torch.manual_seed(0)
        model = torch.nn.Linear(6, 8)
        base = torch.optim.SGD([{"params": [model.weight], "quant_bits": 2},
                                {"params": [model.bias]}], lr=0.05, momentum=0.9)  # fmt: skip
        opt = QuantOptimizer(base, LSBQuantizer(), ProxHardQuant(), quant_period=2, **kw)
        _fixed_grad_steps(opt, 3, seed=4)
        latent = opt.state[model.weight]["latent"].clone()
        assert not torch.equal(latent, model.weight)  # p is the projection, not the latent
        model.to(torch.bfloat16)
        for p in (model.weight, model.bias):
            p.grad = torch.zeros_like(p)
        opt.state[model.weight]["momentum_buffer"].zero_()
        opt.step()  # zero gradient and momentum: the latent only changes dtype
        assert torch.equal(opt.state[model.weight]["latent"], latent.to(torch.bfloat16))
        runs.append(opt.step_paths[0].path)
    assert runs == ["fused step", "base step + fused prox"]


@pytest.mark.parametrize("outer", [True, False])
def test_the_step_runs_without_grad_and_restores_the_grad_mode(outer):
    """As ``@torch.no_grad()`` (which step no longer wraps it in): grad mode off inside the
    step, on inside the closure, and the caller's mode back after it, an error included."""
    model, opt = _model_opt()
    seen = []
    schedule = opt.prox_map.schedule

    def watched(step_count):
        seen.append(torch.is_grad_enabled())
        return schedule(step_count)

    opt.prox_map.schedule = watched

    def closure():
        seen.append(torch.is_grad_enabled())
        opt.zero_grad()
        loss = model(torch.ones(2, 6)).square().sum()
        loss.backward()
        return loss

    with torch.set_grad_enabled(outer):
        for _ in range(3):
            opt.step(closure)
        assert torch.is_grad_enabled() is outer
        assert seen[0] is True and not any(seen[1:2]) and len(seen) >= 4
        opt.param_groups[0]["quant_bits"] = 99.5  # not an integer: the step raises
        with pytest.raises((TypeError, ValueError)):
            opt.step()
        assert torch.is_grad_enabled() is outer
