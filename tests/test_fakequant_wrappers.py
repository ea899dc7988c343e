"""SPEC.md §12: the QModuleState machine, QWrapper (accepted / rejected patterns, BN
folding) and QOp."""

from __future__ import annotations

import copy
import operator

import numpy as np
import pytest
import torch
from torch import nn

from parq.fakequant import (
    AffineQuantizer,
    BatchMinMax,
    ExpAvgMinMax,
    QModuleState,
    QOp,
    QWrapper,
    qmodule_state,
    set_qmodule_state,
)

S = QModuleState


class Spy(AffineQuantizer):
    """An 8-bit affine quantizer that records the calls the wrappers make."""

    def __init__(self, per_channel: bool = False) -> None:
        super().__init__(8, BatchMinMax(per_channel), per_channel=per_channel)
        self.calls: list[str] = []

    def pre_observe(self, x):
        self.calls.append("pre_observe")
        super().pre_observe(x)

    def quantize(self, x):
        self.calls.append("quantize")
        return super().quantize(x)

    def post_observe(self, x):
        self.calls.append("post_observe")


# state -> (weight quantizer calls, activation quantizer calls); written out by hand
OBS, QUANT, BOTH = ["pre_observe", "post_observe"], ["quantize"], [
    "pre_observe", "quantize", "post_observe"
]  # fmt: skip
EXPECTED = {
    S.BYPASSED: ([], []),
    S.QUANT_AWARE_TRAIN_WEIGHT_ONLY: (BOTH, []),
    S.QUANT_AWARE_TRAIN_ACT_ONLY: ([], BOTH),
    S.QUANT_AWARE_TRAIN: (BOTH, BOTH),
    S.CALIBRATION: (OBS, OBS),
    S.CALIBRATION_WEIGHT_ONLY: (OBS, []),
    S.CALIBRATION_ACT_ONLY: ([], OBS),
    S.QUANT_EVAL_WEIGHT_ONLY: (QUANT, []),
    S.QUANT_EVAL_ACT_ONLY: ([], QUANT),
    S.QUANT_EVAL: (QUANT, QUANT),
}


def test_state_values_are_1_to_10_in_spec_order():
    assert [s.value for s in S] == list(range(1, 11))
    assert list(EXPECTED) == list(S) and S(1) is S.BYPASSED and S(10) is S.QUANT_EVAL


@pytest.mark.parametrize("state", list(S))
def test_each_state_runs_and_observes_what_spec_says(state):
    torch.manual_seed(0)
    lin = nn.Linear(6, 4)
    wrapper = QWrapper([lin, nn.ReLU()], Spy(per_channel=True), Spy())
    x = torch.randn(5, 6)
    float_w = lin.weight.detach().clone()
    wrapper.weight_quantizer.observer.force_ranges(-0.01, 0.01)  # coarse, frozen ranges
    wrapper.acts_quantizer.observer.force_ranges(0.0, 0.1)
    set_qmodule_state(wrapper, state)
    y = wrapper(x)
    w_calls, a_calls = EXPECTED[state]
    assert wrapper.weight_quantizer.calls == w_calls
    assert wrapper.acts_quantizer.calls == a_calls
    # which observers updated: the forced (narrow) ranges are replaced by the batch ranges
    w_min = wrapper.weight_quantizer.observer.get_ranges()[0]
    a_max = wrapper.acts_quantizer.observer.get_ranges()[1]
    assert torch.equal(w_min, float_w.amin(1)) == ("pre_observe" in w_calls)
    ref = torch.relu(nn.functional.linear(x, float_w, lin.bias))
    w_used = wrapper.weight_quantizer.quantize(float_w) if "quantize" in w_calls else float_w
    pre_act = torch.relu(nn.functional.linear(x, w_used, lin.bias))
    assert (a_max.item() == pre_act.max().item()) == ("pre_observe" in a_calls)
    # and the output is float exactly when no quantizer runs
    assert torch.equal(y, ref) == ("quantize" not in w_calls + a_calls)


def test_context_manager_restores_each_modules_state():
    a, b = QWrapper(nn.Linear(3, 3)), QOp(operator.add, Spy())
    model = nn.ModuleDict({"a": a, "b": b})
    a.qstate, b.qstate = S.CALIBRATION, S.QUANT_EVAL_ACT_ONLY
    with qmodule_state(model, S.QUANT_AWARE_TRAIN) as m:
        assert m is model and a.qstate == b.qstate == S.QUANT_AWARE_TRAIN
    assert (a.qstate, b.qstate) == (S.CALIBRATION, S.QUANT_EVAL_ACT_ONLY)
    with pytest.raises(RuntimeError, match="boom"), qmodule_state(model, "quant_eval"):
        assert a.qstate == S.QUANT_EVAL
        raise RuntimeError("boom")
    assert (a.qstate, b.qstate) == (S.CALIBRATION, S.QUANT_EVAL_ACT_ONLY)
    assert set_qmodule_state(model, 4) == 2 and a.qstate == S.QUANT_AWARE_TRAIN
    set_qmodule_state(model, np.int64(5))  # integer-like values are accepted (SPEC §1)
    assert a.qstate == S.CALIBRATION


def test_state_argument_errors():
    w = QWrapper(nn.Linear(2, 2))
    with pytest.raises(ValueError, match="state must be a QModuleState"):
        set_qmodule_state(w, 11)
    with pytest.raises(ValueError, match="state must be a QModuleState"):
        set_qmodule_state(w, "training")
    with pytest.raises(TypeError, match="module must be a torch.nn.Module"):
        set_qmodule_state([w], S.QUANT_EVAL)
    with (
        pytest.raises(ValueError, match="contains no QWrapper / QOp"),
        qmodule_state(nn.Linear(2, 2), S.QUANT_EVAL),
    ):
        pass


# --- accepted patterns -----------------------------------------------------------------

CONVS = {
    "plain": dict(in_channels=4, out_channels=6, kernel_size=3),
    "stride_pad_bias": dict(in_channels=4, out_channels=6, kernel_size=3, stride=2, padding=1),
    "dilation": dict(in_channels=4, out_channels=6, kernel_size=3, padding=2, dilation=2),
    "groups": dict(in_channels=4, out_channels=8, kernel_size=3, padding=1, groups=2),
    "depthwise": dict(in_channels=4, out_channels=4, kernel_size=3, padding=1, groups=4),
    "same": dict(in_channels=4, out_channels=6, kernel_size=(3, 5), padding="same",
                 dilation=(2, 1), bias=False),
    "reflect": dict(in_channels=4, out_channels=6, kernel_size=3, padding=1,
                    padding_mode="reflect"),
    "replicate": dict(in_channels=4, out_channels=6, kernel_size=3, padding=2,
                      padding_mode="replicate", dilation=2),
    "circular": dict(in_channels=4, out_channels=6, kernel_size=3, padding=1,
                     padding_mode="circular", stride=(1, 2)),
}  # fmt: skip
TAILS = {
    "": [],
    "bn": ["bn"],
    "relu": [nn.ReLU],
    "bn_relu6": ["bn", nn.ReLU6],
    "bn_silu": ["bn", nn.SiLU],
}


def _layers(conv_kw: dict, tail: list) -> list[nn.Module]:
    conv = nn.Conv2d(**conv_kw)
    mods = [conv]
    for t in tail:
        mods.append(nn.BatchNorm2d(conv.out_channels) if t == "bn" else t())
    return mods


@pytest.mark.parametrize("tail", list(TAILS))
@pytest.mark.parametrize("conv", list(CONVS))
def test_conv_patterns_bypassed_equal_float_and_quantize_the_weights(conv, tail):
    mods = _layers(CONVS[conv], TAILS[tail])
    ref = nn.Sequential(*copy.deepcopy(mods)).eval()
    w = QWrapper(nn.Sequential(*mods), Spy(per_channel=True), Spy()).eval()
    x = torch.randn(2, 4, 9, 10)
    assert torch.equal(w(x), ref(x))  # BYPASSED: the float layers exactly
    set_qmodule_state(w, S.QUANT_AWARE_TRAIN)
    y = w(x)
    # the same layers with the fake-quantized weight and output
    wq = w.weight_quantizer.quantize(mods[0].weight)
    manual = mods[0]._conv_forward(x, wq, mods[0].bias)
    for m in mods[1:]:
        manual = m(manual)
    assert torch.equal(y, w.acts_quantizer.quantize(manual))
    assert y.shape == ref(x).shape


@pytest.mark.parametrize("act", [None, nn.ReLU, nn.ReLU6, nn.SiLU])
def test_linear_patterns(act):
    mods = [nn.Linear(5, 3)] + ([act()] if act else [])
    w = QWrapper(mods if act else mods[0], Spy(per_channel=True), Spy())
    x = torch.randn(4, 2, 5)  # leading dimensions pass through
    ref = nn.Sequential(*mods)(x)
    assert torch.equal(w(x), ref)
    set_qmodule_state(w, S.QUANT_AWARE_TRAIN)
    y = w(x)
    y.sum().backward()
    assert y.shape == (4, 2, 3) and mods[0].weight.grad is not None
    assert len(torch.unique(y)) <= 256


@pytest.mark.parametrize(
    "layers",
    [
        [nn.Conv1d(2, 2, 3)],
        [nn.Linear(2, 2), nn.BatchNorm1d(2)],
        [nn.Linear(2, 2), nn.BatchNorm2d(2)],
        [nn.Conv2d(2, 2, 1), nn.ReLU(), nn.BatchNorm2d(2)],
        [nn.Conv2d(2, 2, 1), nn.BatchNorm2d(2), nn.ReLU(), nn.ReLU()],
        [nn.Conv2d(2, 2, 1), nn.GELU()],
        [nn.ReLU()],
        [],
        [nn.Conv2d(2, 2, 1), nn.Conv2d(2, 2, 1)],
        [nn.Conv2d(2, 2, 1), nn.BatchNorm1d(2)],
    ],
    ids=lambda layers: "-".join(type(m).__name__ for m in layers) or "empty",
)
def test_rejected_patterns_raise_type_error(layers):
    with pytest.raises(TypeError, match=r"QWrapper: layers must be one of \[Linear\] / "):
        QWrapper(layers)


def test_wrapper_argument_errors():
    with pytest.raises(TypeError, match="weight_quantizer must be a parq.fakequant Quantizer"):
        QWrapper(nn.Linear(2, 2), weight_quantizer=lambda m: None)
    with pytest.raises(TypeError, match="acts_quantizer must be"):
        QWrapper(nn.Linear(2, 2), acts_quantizer=BatchMinMax())
    with pytest.raises(ValueError, match="fold_bn=True needs a BatchNorm2d"):
        QWrapper(nn.Conv2d(2, 2, 1), fold_bn=True)
    with pytest.raises(TypeError, match="fold_bn must be a bool"):
        QWrapper([nn.Conv2d(2, 2, 1), nn.BatchNorm2d(2)], fold_bn=1)
    with pytest.raises(ValueError, match=r"BatchNorm2d\(3\) after a conv with 2 output"):
        QWrapper([nn.Conv2d(2, 2, 1), nn.BatchNorm2d(3)])
    with pytest.raises(TypeError, match="layers must be a layer or a sequence"):
        QWrapper(42)
    with pytest.raises(TypeError, match="op must be callable"):
        QOp("add", None)


# --- BatchNorm folding ---------------------------------------------------------------


def _conv_bn(momentum=0.1, affine=True, bias=False, **conv_kw):
    kw = dict(in_channels=3, out_channels=5, kernel_size=3, padding=1) | conv_kw
    conv = nn.Conv2d(**kw, bias=bias)
    bn = nn.BatchNorm2d(conv.out_channels, momentum=momentum, affine=affine)
    with torch.no_grad():
        if affine:
            bn.weight.uniform_(0.5, 2.0)
            bn.bias.uniform_(-1.0, 1.0)
        bn.running_mean.uniform_(-0.5, 0.5)
        bn.running_var.uniform_(0.5, 2.0)
    return conv, bn


@pytest.mark.parametrize(
    "kw",
    [{}, {"bias": True}, {"affine": False}, {"momentum": None}, {"dilation": 2, "padding": 2},
     {"groups": 5, "in_channels": 5}, {"padding_mode": "reflect"}],
    ids=["plain", "bias", "no_affine", "cumulative", "dilation", "depthwise", "reflect"],
)  # fmt: skip
def test_bn_folding_equals_conv_bn_in_eval_and_training(kw):
    conv, bn = _conv_bn(**kw)
    ref = nn.Sequential(copy.deepcopy(conv), copy.deepcopy(bn))
    # CALIBRATION_WEIGHT_ONLY: the folded path runs (the weight is observed) unquantized
    w = QWrapper([conv, bn], Spy(per_channel=True), fold_bn=True)
    set_qmodule_state(w, S.CALIBRATION_WEIGHT_ONLY)
    x = torch.randn(4, conv.in_channels, 7, 6)
    for mode in ("eval", "train", "train", "eval"):
        getattr(w, mode)(), getattr(ref, mode)()
        xr = x.clone().requires_grad_()
        xw = x.clone().requires_grad_()
        y_ref, y = ref(xr), w(xw)
        scale = y_ref.abs().max().item()
        torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-5 * scale)
        if mode == "train":  # gradients through the batch statistics, as BatchNorm's
            g = torch.randn_like(y)
            y.backward(g)
            y_ref.backward(g)
            torch.testing.assert_close(xw.grad, xr.grad, rtol=1e-4, atol=1e-5)
            torch.testing.assert_close(
                conv.weight.grad,
                ref[0].weight.grad,
                rtol=1e-4,
                atol=1e-5 * conv.weight.grad.abs().max().item(),
            )
        torch.testing.assert_close(bn.running_mean, ref[1].running_mean)
        torch.testing.assert_close(bn.running_var, ref[1].running_var)
        assert bn.num_batches_tracked == ref[1].num_batches_tracked
        x = torch.randn_like(x)
    # the weight observer saw the folded weight w * gamma / sqrt(var + eps)
    gamma = bn.weight if bn.affine else torch.ones(5)
    folded = conv.weight * (gamma / torch.sqrt(bn.running_var + bn.eps)).reshape(-1, 1, 1, 1)
    torch.testing.assert_close(w.weight_quantizer.observer.get_ranges()[1], folded.amax((1, 2, 3)))


def test_bn_folding_quantizes_the_folded_weight():
    conv, bn = _conv_bn()
    w = QWrapper([conv, bn, nn.ReLU()], Spy(per_channel=True), fold_bn=True).eval()
    set_qmodule_state(w, S.QUANT_AWARE_TRAIN_WEIGHT_ONLY)
    x = torch.randn(2, 3, 5, 5)
    y = w(x)
    s = bn.weight / torch.sqrt(bn.running_var + bn.eps)
    wf = conv.weight * s.reshape(-1, 1, 1, 1)
    wq = w.weight_quantizer.quantize(wf)
    assert len(torch.unique(wq[0])) <= 256
    want = torch.relu(nn.functional.conv2d(x, wq, bn.bias - bn.running_mean * s, padding=1))
    torch.testing.assert_close(y, want, rtol=1e-6, atol=1e-6)
    # activation-only states never fold: the BN runs as it is
    set_qmodule_state(w, S.QUANT_AWARE_TRAIN_ACT_ONLY)
    assert torch.equal(w(x), torch.relu(bn(conv(x))))


def test_bn_without_running_stats_folds_batch_statistics_in_eval_too():
    conv = nn.Conv2d(3, 4, 1, bias=False)
    bn = nn.BatchNorm2d(4, track_running_stats=False)
    w = QWrapper([conv, bn], Spy(per_channel=True), fold_bn=True).eval()
    set_qmodule_state(w, S.CALIBRATION)
    x = torch.randn(3, 3, 4, 4)
    torch.testing.assert_close(w(x), bn(conv(x)), rtol=1e-5, atol=1e-5)


# --- QOp -------------------------------------------------------------------------------


def test_qop_quantizes_the_output_of_any_op():
    q = QOp(operator.add, AffineQuantizer(2, BatchMinMax()))
    a, b = torch.tensor([0.0, 1.0, 2.0]), torch.tensor([0.0, 0.2, 0.9])
    assert torch.equal(q(a, b), a + b)  # BYPASSED
    set_qmodule_state(q, S.QUANT_AWARE_TRAIN)
    delta = torch.tensor(2.9) / 3  # range [0, 2.9], 4 levels, z = 0
    assert torch.equal(q(a, b), torch.tensor([0.0, 1.0, 3.0]) * delta)
    q2 = QOp(nn.Identity(), None)
    set_qmodule_state(q2, S.QUANT_EVAL)
    assert torch.equal(q2(a), a) and "op" in dict(q2.named_children())
    assert "op=add" in repr(q)


def test_ema_observer_in_a_wrapper_freezes_in_eval_states():
    w = QWrapper(nn.Linear(4, 4), acts_quantizer=AffineQuantizer(8, ExpAvgMinMax(0.9)))
    set_qmodule_state(w, S.QUANT_AWARE_TRAIN_ACT_ONLY)
    for _ in range(3):
        w(torch.randn(8, 4))
    before = [r.clone() for r in w.acts_quantizer.observer.get_ranges()]
    with qmodule_state(w, S.QUANT_EVAL_ACT_ONLY):
        w(torch.randn(8, 4) * 100)
    after = w.acts_quantizer.observer.get_ranges()
    assert all(torch.equal(a, b) for a, b in zip(before, after, strict=True))
