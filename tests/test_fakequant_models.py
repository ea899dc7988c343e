"""SPEC.md §12 on whole models: FusedResNet / FusedMobileNetV2 on models with torchvision's
module structure (``benchmarks/tv_models.py``; torchvision itself is optional),
``torch.compile`` of a wrapped model, and PARQ weights with fake-quantized activations."""

from __future__ import annotations

import copy
import os
import subprocess
import sys

import pytest
import torch
from torch import nn

from benchmarks import tv_models
from parq.fakequant import (
    AffineQuantizer,
    BatchMinMax,
    ExpAvgMinMax,
    FusedMobileNetV2,
    FusedResNet,
    QfmtQuantizer,
    QModuleState,
    QOp,
    QWrapper,
    qmodule_state,
    set_qmodule_state,
)
from parq.fakequant.functional import fake_quantize
from parq.optim import ProxHardQuant, QuantOptimizer
from parq.quant import UnifQuantizer

S = QModuleState


def w4(module: nn.Module) -> AffineQuantizer:
    return AffineQuantizer(4, BatchMinMax(per_channel=True), symmetric=True, per_channel=True)


def a4(module: nn.Module) -> AffineQuantizer:
    return AffineQuantizer(4, ExpAvgMinMax(0.9))


def small_models() -> dict[str, tuple[nn.Module, type, tuple[int, ...]]]:
    return {
        "resnet20": (tv_models.resnet20(), FusedResNet, (3, 3, 16, 16)),
        "bottleneck": (
            tv_models.ResNet(tv_models.Bottleneck, (1, 2), (8, 16), num_classes=7),
            FusedResNet,
            (2, 3, 40, 40),
        ),
        "mobilenet_v2": (tv_models.MobileNetV2(num_classes=5, width_mult=0.25), FusedMobileNetV2,
                         (2, 3, 32, 32)),
    }  # fmt: skip


@pytest.mark.parametrize("name", list(small_models()))
@pytest.mark.parametrize("flags", [{}, {"quantize_first": True, "quantize_fc": True}])
def test_converters_keep_the_float_outputs_in_bypassed(name, flags):
    net, convert, shape = small_models()[name]
    ref = copy.deepcopy(net)
    fused = convert(net, w4, a4, **flags)
    # the weights are kept: the very same parameters
    assert {id(p) for p in fused.parameters()} == {id(p) for p in net.parameters()}
    x = torch.randn(shape)
    for mode in ("train", "eval"):  # training mode: BN batch statistics and running updates
        getattr(fused, mode)(), getattr(ref, mode)()
        torch.manual_seed(1)  # the same dropout mask
        y = fused(x)
        torch.manual_seed(1)
        assert torch.equal(y, ref(x)), mode
    for m_ref, m in zip(ref.modules(), net.modules(), strict=True):
        if isinstance(m, nn.BatchNorm2d):
            assert torch.equal(m.running_mean, m_ref.running_mean)
            assert torch.equal(m.running_var, m_ref.running_var)


def _count(model: nn.Module) -> tuple[int, int]:
    w = sum(m.weight_quantizer is not None for m in model.modules() if isinstance(m, QWrapper))
    a = sum(m.acts_quantizer is not None for m in model.modules() if isinstance(m, QWrapper | QOp))
    return w, a


def test_resnet20_quantizer_placement_and_factory_arguments():
    seen = []

    def wq(module):
        seen.append(type(module).__name__)
        return w4(module)

    net = tv_models.resnet20()
    n_convs = sum(isinstance(m, nn.Conv2d) for m in net.modules())
    assert n_convs == 21  # stem, 18 block convs, 2 downsample convs
    fused = FusedResNet(net, wq, a4)
    # every conv but the first; outputs of every conv (+BN)(+ReLU) and of the 9 adds
    assert _count(fused) == (20, 21 + 9) and set(seen) == {"Conv2d"}
    full = FusedResNet(tv_models.resnet20(), w4, a4, quantize_first=True, quantize_fc=True)
    assert _count(full) == (22, 21 + 9 + 2)  # + fc weights; + image and fc input
    assert FusedResNet(tv_models.resnet20(), None, a4).stem.weight_quantizer is None
    only_3x3 = FusedResNet(tv_models.resnet20(), w4, lambda m: a4(m) if isinstance(m, nn.Conv2d)
                           and m.kernel_size == (3, 3) else None)  # fmt: skip
    assert _count(only_3x3) == (20, 19)  # a factory may return None


def test_mobilenet_v2_quantizer_placement():
    net = tv_models.MobileNetV2(num_classes=5, width_mult=0.25)
    n_convs = sum(isinstance(m, nn.Conv2d) for m in net.modules())
    n_adds = sum(getattr(m, "use_res_connect", False) for m in net.modules())
    assert n_adds == 11  # at width 0.25 the first block (8 -> 8 channels) has one too
    fused = FusedMobileNetV2(net, w4, a4, quantize_fc=True)
    assert _count(fused) == (n_convs - 1 + 1, n_convs + n_adds + 1)


@pytest.mark.parametrize("name", list(small_models()))
def test_converted_models_train_and_evaluate_quantized(name):
    net, convert, shape = small_models()[name]
    fused = convert(net, w4, a4, quantize_first=True, quantize_fc=True, fold_bn=True)
    x = torch.randn(shape)
    set_qmodule_state(fused, S.QUANT_AWARE_TRAIN)
    fused.train()
    fused(x).sum().backward()
    grads = [p.grad for p in fused.parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    outputs = []
    quantizing = [m for m in fused.modules() if isinstance(m, QWrapper | QOp) and m.acts_quantizer]
    hooks = [m.register_forward_hook(lambda m, i, o: outputs.append(o)) for m in quantizing]
    with qmodule_state(fused, S.QUANT_EVAL), torch.no_grad():
        fused.eval()
        y = fused(x)
    for h in hooks:
        h.remove()
    assert torch.isfinite(y).all() and len(outputs) == _count(fused)[1]
    assert all(len(torch.unique(o)) <= 16 for o in outputs)  # 4-bit activations


def test_converter_argument_errors():
    net = tv_models.resnet20()
    with pytest.raises(TypeError, match="weight_quantizer must be a factory module -> Quantizer"):
        FusedResNet(net, w4(None), a4)
    with pytest.raises(TypeError, match="acts_quantizer must be a factory"):
        FusedResNet(net, w4, "int8")
    with pytest.raises(TypeError, match=r"acts_quantizer\(Conv2d\) returned BatchMinMax"):
        FusedResNet(net, w4, lambda m: BatchMinMax())
    with pytest.raises(TypeError, match="FusedResNet: Sequential lacks conv1, bn1, relu"):
        FusedResNet(nn.Sequential(nn.Linear(2, 2)), w4, a4)
    with pytest.raises(TypeError, match="FusedMobileNetV2: ResNet lacks features, classifier"):
        FusedMobileNetV2(net, w4, a4)
    with pytest.raises(TypeError, match="net must be a torch.nn.Module"):
        FusedResNet(None, w4, a4)


_CHILD = "PARQ_FAKEQUANT_COMPILE_CHILD"


def test_torch_compile_of_a_wrapped_model_forward_and_backward():
    """Inductor compiles fake quantization (the composed affine and Q-format ops, torch's
    fake-quantize kernel, the straight-through autograd functions, BN folding, observers
    updated in place) without recompiling from step to step, and matches eager.

    Runs in a child process: the first compilation of a backward makes dynamo wrap the
    ``_init_group`` of torch.optim classes process-wide, after which ``QuantOptimizer`` no
    longer recognizes AdamW as torch's (``parq/optim/fused_step.py::base_kind`` compares
    ``_init_group`` by identity without ``inspect.unwrap``) and the fused-step tests that
    follow in the same session would fail."""
    if os.environ.get(_CHILD) != "1":
        node = f"{__file__}::test_torch_compile_of_a_wrapped_model_forward_and_backward"
        cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", node]
        env = {**os.environ, _CHILD: "1"}
        r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
        assert r.returncode == 0, (r.stdout + r.stderr)[-4000:]
        assert "1 passed" in r.stdout
        return
    torch.manual_seed(0)

    def build():
        torch.manual_seed(1)
        conv, bn = nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8)
        dw = nn.Conv2d(8, 8, 3, padding=2, dilation=2, groups=8)
        wq = AffineQuantizer(4, BatchMinMax(per_channel=True), True, True, per_channel=True)
        return nn.Sequential(
            QOp(nn.Identity(), AffineQuantizer(8, ExpAvgMinMax())),
            QWrapper([conv, bn, nn.ReLU()], wq, AffineQuantizer(4, ExpAvgMinMax()), fold_bn=True),
            QWrapper([dw, nn.ReLU6()], None, QfmtQuantizer(8, False, BatchMinMax(), True)),
            nn.Flatten(),
            QWrapper(nn.Linear(8 * 6 * 6, 4)),
        )

    eager, compiled_model = build(), build()
    x0 = torch.randn(2, 3, 6, 6)
    for m in (eager, compiled_model):
        set_qmodule_state(m, S.QUANT_AWARE_TRAIN)
        m(x0)  # first observation (buffers take their shapes) eagerly
    torch._dynamo.reset()
    compiled = torch.compile(compiled_model)

    def step() -> None:
        x = torch.randn(4, 3, 6, 6)
        y_e, y_c = eager(x), compiled(x)
        torch.testing.assert_close(y_c, y_e, rtol=1e-5, atol=1e-5)
        y_e.square().sum().backward()
        y_c.square().sum().backward()
        for (n, p_e), p_c in zip(eager.named_parameters(), compiled_model.parameters(),
                                 strict=True):  # fmt: skip
            torch.testing.assert_close(p_c.grad, p_e.grad, rtol=1e-4, atol=1e-5, msg=n)

    step()  # compiles
    with torch._dynamo.config.patch(error_on_recompile=True):
        step()  # the observers' in-place updates do not recompile
    obs_e = eager[1].acts_quantizer.observer.get_ranges()
    obs_c = compiled_model[1].acts_quantizer.observer.get_ranges()
    torch.testing.assert_close(obs_c, obs_e)  # the EMA advanced the same way

    # torch's kernel (what CUDA tensors take for power-of-two deltas) compiles too
    def kernel_fq(x: torch.Tensor) -> torch.Tensor:
        d, z = torch.tensor(0.125), torch.tensor(0.0)
        return fake_quantize(x, d, z, -8, 7, clip=True, pow2=True, kernel=True)

    x = (torch.randn(64) * 2).requires_grad_()
    y = torch.compile(kernel_fq)(x)
    assert torch.equal(y, kernel_fq(x.detach()))
    y.sum().backward()
    assert torch.equal(x.grad, ((x >= -1.0) & (x <= 0.875)).float())


def test_parq_weights_and_fake_quantized_activations_in_one_model():
    """2-bit weights by QuantOptimizer (PARQ's hard prox here), 4-bit activations by the
    modules: after training, weights hold <= 4 values per row and activations <= 16."""
    torch.manual_seed(0)
    conv, bn, fc = nn.Conv2d(1, 4, 3, padding=1, bias=False), nn.BatchNorm2d(4), nn.Linear(64, 3)
    model = nn.Sequential(
        QOp(nn.Identity(), a4(None)),
        QWrapper([conv, bn, nn.ReLU()], None, a4(conv)),
        nn.Flatten(),
        QWrapper(fc),
    )
    groups = [
        {"params": [conv.weight], "quant_bits": 2},
        {"params": [bn.weight, bn.bias, fc.weight, fc.bias]},
    ]
    base = torch.optim.SGD(groups, lr=0.05)
    opt = QuantOptimizer(base, UnifQuantizer(), ProxHardQuant(), quant_per_channel=True)
    set_qmodule_state(model, S.QUANT_AWARE_TRAIN_ACT_ONLY)
    x, y = torch.randn(32, 1, 4, 4), torch.randint(0, 3, (32,))
    losses = []
    for _ in range(20):
        loss = nn.functional.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    assert all(len(torch.unique(row)) <= 4 for row in conv.weight.detach().reshape(4, -1))
    with qmodule_state(model, S.QUANT_EVAL_ACT_ONLY), torch.no_grad():
        model.eval()
        acts = model[1](model[0](x))
    assert len(torch.unique(acts)) <= 16
