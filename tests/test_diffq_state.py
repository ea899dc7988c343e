"""Quantized state of ``parq.diffq`` (SPEC.md §11): exact round trips (15-bit groups,
``group_size=0``, packed and not), the size figures, ``UniformQuantizer`` and ``LSQ``."""

from __future__ import annotations

import io
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from parq.diffq import LSQ, DiffQuantizer, UniformQuantizer, restore_quantized_state
from parq.diffq.state import pack_levels, unpack_levels
from parq_kernels.reference_diffq import logits_from_bits


def _model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(40, 64), nn.ReLU(), nn.Linear(64, 10))


def _eval_out(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        return model(x)


def _spread_bits(q: DiffQuantizer) -> None:
    """Logits whose true bits cycle through 1..15 (15 included) over the groups."""
    with torch.no_grad():
        for qp in q._qparams:
            n = qp.logit.numel()
            bits = (torch.arange(n) % 14 + 2).float() + 0.2  # 2.2 .. 15.2 -> 2 .. 15
            qp.logit.copy_(logits_from_bits(bits.clamp_max(14.99), q.min_bits, q.max_bits,
                                            q._code))  # fmt: skip


@pytest.mark.parametrize("group", [0, 1, 8])
@pytest.mark.parametrize("packed", [True, False])
@pytest.mark.parametrize("param", ["bits", "noise"])
def test_diffq_round_trip_is_exact(group, packed, param):
    model = _model()
    q = DiffQuantizer(model, min_size=0, group_size=group, param=param, float16=True)
    if group:
        _spread_bits(q)
    x = torch.randn(5, 40)
    expected = [w.clone() for w in q._eval_weights()]
    state = q.get_quantized_state(packed=packed)
    if group:
        bits = torch.cat([e["bits"] for e in state["quantized"]])
        assert 15 in bits.tolist() and 2 in bits.tolist()
    buf = io.BytesIO()
    torch.save(state, buf)
    state = torch.load(io.BytesIO(buf.getvalue()), weights_only=False)
    fresh = _model(seed=1)
    restore_quantized_state(fresh, state)
    for qp, w in zip(q._qparams, expected, strict=True):
        got = dict(fresh.named_parameters())[qp.name]
        assert torch.equal(got.detach(), w), qp.name
    torch.testing.assert_close(_eval_out(fresh, x), _eval_out(model, x))


def test_packed_state_is_smaller_and_sizes_are_reported():
    q = DiffQuantizer(_model(), min_size=0, group_size=8, init_bits=3)
    packed, plain = q.get_quantized_state(True), q.get_quantized_state(False)
    levels = [e["levels"] for e in plain["quantized"]]
    assert all(set(e["levels"]) == {3} for e in packed["quantized"])
    n0 = 64 * 40
    assert packed["quantized"][0]["levels"][3][0].numel() == math.ceil(n0 * 3 / 8)
    got = unpack_levels(packed["quantized"])
    assert all(torch.equal(a, b.to(torch.int32)) for a, b in zip(got, levels, strict=True))
    assert 0 < q.compressed_model_size() < q.packed_model_size()
    assert q.packed_model_size() < 4 * 3274 / 2**20 + 0.01


def test_fifteen_bit_levels_use_two_streams():
    entry = {"shape": [3], "group_size": 1, "bits": torch.tensor([15, 9, 4], dtype=torch.uint8),
             "levels": torch.tensor([32767, 300, 15], dtype=torch.int16)}  # fmt: skip
    pack_levels([entry])
    assert [len(entry["levels"][b]) for b in (4, 9, 15)] == [1, 2, 2]
    assert unpack_levels([entry])[0].tolist() == [32767, 300, 15]


def test_restore_rejects_a_mismatched_model():
    q = DiffQuantizer(_model(), min_size=0)
    state = q.get_quantized_state()
    with pytest.raises(ValueError, match="state"):
        restore_quantized_state(nn.Sequential(nn.Linear(40, 64)), state)
    with pytest.raises(ValueError, match="meta"):
        restore_quantized_state(_model(), {"quantized": []})


@pytest.mark.parametrize("qat", [False, True])
def test_uniform_quantizer(qat):
    model = _model()
    q = UniformQuantizer(model, bits=4, min_size=0, qat=qat, exclude=["bias"])
    w = model[0].weight.detach().clone()
    mn, mx = w.min(), w.max()
    expected = torch.round((w - mn) / (mx - mn) * 15) / 15 * (mx - mn) + mn
    assert torch.equal(q._eval_weights()[0], expected)
    x = torch.randn(5, 40)
    model.train()
    out = model[:1](x)  # plain latent weights
    h = F.linear(x, expected if qat else w, model[0].bias)
    seen = {}
    model[0].register_forward_hook(lambda m, i, o: seen.update(out=o))
    model(x).sum().backward()
    torch.testing.assert_close(seen["out"], h)
    assert not torch.equal(out, h) if qat else torch.equal(out, h)
    assert "weight" not in model[0].__dict__  # cleaned up
    assert model[0].weight.grad is not None
    assert q.true_model_size() == pytest.approx((4 * (2560 + 640) + 64 * 2 + 32 * 74) / 2**23)
    fresh = _model(seed=3)
    restore_quantized_state(fresh, q.get_quantized_state())
    assert torch.equal(fresh[0].weight.detach(), expected)


def test_lsq_initial_step_and_gradient_scale():
    model = _model()
    bits = 4
    q = LSQ(model, bits=bits, min_size=0, exclude=["bias"])
    q.setup_optimizer(torch.optim.SGD(model.parameters(), lr=0.1))
    w = model[0].weight.detach().clone()
    step0 = 2 * w.abs().mean() / math.sqrt(2 ** (bits - 1))
    torch.testing.assert_close(model[0].weight_lsq.detach(), step0.reshape(1))
    seen = {}
    model[0].register_forward_hook(lambda m, i, o: seen.update(w=m.weight))
    x = torch.randn(5, 40)
    model(x).square().sum().backward()
    # reference: the same w_q with an unscaled step, its gradient times g
    s = step0.reshape(1).clone().requires_grad_(True)
    levels = torch.clamp(w / s, -8, 7)
    wq = ((levels.round() - levels).detach() + levels) * s
    assert torch.equal(seen["w"].detach(), wq.detach())
    h = F.relu(F.linear(x, wq, model[0].bias))
    lsq2 = model[2]
    s2 = lsq2.weight_lsq.detach()
    l2 = torch.clamp(lsq2.weight.detach() / s2, -8, 7)
    wq2 = ((l2.round() - l2).detach() + l2) * s2
    F.linear(h, wq2, lsq2.bias.detach()).square().sum().backward()
    g = 1 / math.sqrt(w.numel() * (2 ** (bits - 1) - 1))
    torch.testing.assert_close(model[0].weight_lsq.grad, s.grad * g, rtol=1e-4, atol=1e-7)
    assert q.true_model_size() == pytest.approx((4 * (2560 + 640) + 32 * 2 + 32 * 74) / 2**23)
    fresh = _model(seed=4)
    restore_quantized_state(fresh, q.get_quantized_state())
    assert torch.equal(fresh[0].weight.detach(), wq.detach())


def test_lsq_and_uniform_bad_arguments():
    model = _model()
    with pytest.raises(ValueError, match="bits"):
        LSQ(model, bits=1)
    with pytest.raises(ValueError, match="bits"):
        UniformQuantizer(model, bits=16)
    with pytest.raises(RuntimeError, match="setup_optimizer"):
        LSQ(model, min_size=0)
        model(torch.randn(2, 40))


def test_lsq_on_a_zero_weight_starts_from_a_tiny_positive_step():
    """A zero-initialised weight gives 2 mean|w| / sqrt(2^(b-1)) = 0: the step is clamped to
    float32's tiny, so the forward, backward and state are finite and the step can learn."""
    model = _model()
    with torch.no_grad():
        model[0].weight.zero_()
    q = LSQ(model, bits=4, min_size=0, exclude=["bias"])
    assert model[0].weight_lsq.item() == torch.finfo(torch.float32).tiny
    q.setup_optimizer(torch.optim.SGD(model.parameters(), lr=0.1))
    out = model(torch.randn(5, 40))
    out.square().sum().backward()
    assert torch.isfinite(out).all()
    for p in model.parameters():
        assert p.grad is None or torch.isfinite(p.grad).all()
    assert _eval_out(model, torch.randn(3, 40)).isfinite().all()
    fresh = _model(seed=5)
    restore_quantized_state(fresh, q.get_quantized_state())
    assert torch.equal(fresh[0].weight.detach(), torch.zeros(64, 40))
