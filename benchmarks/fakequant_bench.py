"""Benchmarks of fake quantization (``parq.fakequant``, SPEC.md §12).

Two kinds of case, each timed round-robin (all variants of a case interleaved):

* **model**: one forward + backward (``model(x).sum().backward()``, training mode, fresh
  gradients) of a CIFAR ResNet-20 with torchvision's module structure
  (``benchmarks/tv_models.py``), input ``(batch, 3, 32, 32)``. Variants:

  - ``float``: the float model (the yardstick: column ``t / base``);
  - ``bypassed``: ``FusedResNet`` in ``BYPASSED`` (the cost of the wrappers alone);
  - ``qat:w8a8``: ``QUANT_AWARE_TRAIN``, every conv weight 8-bit symmetric per channel
    (``BatchMinMax``), every conv output and residual add 8-bit asymmetric per tensor
    (``ExpAvgMinMax``), first conv and fc float (``FusedResNet``'s defaults);
  - ``qat:w8a8+fold_bn``: the same with BatchNorm folded into the quantized weights (one
    more convolution per conv in training, for the batch statistics);
  - ``qat:w8a8(compile)``: ``torch.compile`` of the ``qat:w8a8`` model (full mode only:
    compiling a ResNet's forward and backward takes minutes on a CPU).

* **op**: the fake-quantize op alone, forward, on an activation-sized tensor, per tensor,
  8-bit, power-of-two ``delta`` (where torch's kernel is exact). Variants: ``composed``
  (the ops ``parq.fakequant`` uses on CPUs: div, round, clamp_min_, clamp_max_, mul_ in
  place; the yardstick), ``torch kernel`` (``torch.fake_quantize_per_tensor_affine``, what
  ``parq.fakequant`` uses on CUDA), ``composed(compile)`` (``torch.compile`` of the
  composed ops: one fused loop; full mode only), and ``stream``: an in-place
  ``a.add_(b)`` moving the same bytes (the bandwidth yardstick of the ``of best BW``
  column, as in the op suite). These rows back the choice of path per device. Both
  variants run torch's own CPU kernels, at torch's capability (one instruction-set level):
  the run's environment records it and the report names it above this suite's table;
  ``python -m benchmarks --levels --suites fakequant`` re-checks the choice at each
  level this CPU supports (``kernel/composed`` per level, :mod:`benchmarks.levels`).

Byte model: model cases have none (compute-bound convolutions); op cases read and
write the tensor once: ``2 * numel * 4`` bytes (float32).
"""

from __future__ import annotations

import gc
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
from torch import nn

from benchmarks import tv_models
from benchmarks.op_bench import STREAM, stream_fn
from benchmarks.timing import Timing, measure_interleaved
from parq.fakequant import (
    AffineQuantizer,
    BatchMinMax,
    ExpAvgMinMax,
    FusedResNet,
    QModuleState,
    set_qmodule_state,
)
from parq.fakequant.functional import fake_quantize

COMPILE_SUFFIX = "(compile)"


@dataclass(frozen=True)
class FakeQuantCase:
    kind: str  # "model" or "op"
    shape: tuple[int, ...]  # model: (batch, 3, H, W) input; op: the tensor
    compile: bool = False  # also time a torch.compile variant

    @property
    def name(self) -> str:
        dims = "x".join(map(str, self.shape))
        return f"resnet20/fwd+bwd/{dims}" if self.kind == "model" else f"fake_quantize/{dims}"

    @property
    def numel(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n

    def bytes(self) -> int | None:
        return None if self.kind == "model" else 2 * self.numel * 4

    def variants(self, compile_baseline: bool) -> list[str]:
        if self.kind == "model":
            out = ["float", "bypassed", "qat:w8a8", "qat:w8a8+fold_bn"]
            return out + (["qat:w8a8" + COMPILE_SUFFIX] if compile_baseline else [])
        out = ["composed", "torch kernel"]
        return out + (["composed" + COMPILE_SUFFIX] if compile_baseline else []) + [STREAM]


def quick_cases() -> list[FakeQuantCase]:
    return [
        FakeQuantCase("model", (32, 3, 32, 32)),
        FakeQuantCase("op", (32, 16, 32, 32)),  # no compile: --quick stays fast
    ]


def full_cases() -> list[FakeQuantCase]:
    return [
        FakeQuantCase("model", (128, 3, 32, 32), compile=True),
        FakeQuantCase("op", (128, 16, 32, 32), compile=True),
    ]


def smoke_cases() -> list[FakeQuantCase]:
    return [FakeQuantCase("model", (2, 3, 8, 8)), FakeQuantCase("op", (2, 4, 8, 8))]


def _weights(module: nn.Module) -> AffineQuantizer:
    return AffineQuantizer(8, BatchMinMax(per_channel=True), symmetric=True, per_channel=True)


def _acts(module: nn.Module) -> AffineQuantizer:
    return AffineQuantizer(8, ExpAvgMinMax(0.9))


def build_model(variant: str, device: torch.device) -> nn.Module:
    """The model of ``variant`` (module doc), same initial weights for every variant."""
    torch.manual_seed(0)
    net = tv_models.resnet20().to(device)
    if variant == "float":
        return net
    fold = "+fold_bn" in variant
    model = FusedResNet(net, _weights, _acts, fold_bn=fold).to(device)
    if variant.startswith("qat"):
        set_qmodule_state(model, QModuleState.QUANT_AWARE_TRAIN)
    return model


def compiled(fn: Callable) -> Callable:
    """``torch.compile(fn)`` after a reset of dynamo's caches (a seam for the tests)."""
    torch._dynamo.reset()
    return torch.compile(fn)


def _model_fns(case: FakeQuantCase, device: torch.device, names: list[str]) -> dict:
    x = torch.randn(case.shape, generator=torch.Generator().manual_seed(1)).to(device)
    fns = {}
    for name in names:
        model = build_model(name.removesuffix(COMPILE_SUFFIX), device).train()
        run = compiled(model) if name.endswith(COMPILE_SUFFIX) else model

        def step(model=model, run=run) -> None:
            model.zero_grad(set_to_none=True)
            run(x).sum().backward()

        step()  # first observation (and compilation) untimed
        fns[name] = step
    return fns


def _op_fns(case: FakeQuantCase, device: torch.device, names: list[str]) -> dict:
    x = torch.randn(case.shape, generator=torch.Generator().manual_seed(1)).to(device)
    delta = torch.tensor(2.0**-4, device=device)
    zero = torch.zeros((), device=device)

    def composed(x: torch.Tensor) -> torch.Tensor:
        return fake_quantize(x, delta, zero, -128, 127, pow2=True, kernel=False)

    fns = {
        "composed": lambda: composed(x),
        "torch kernel": lambda: fake_quantize(x, delta, zero, -128, 127, pow2=True, kernel=True),
        STREAM: stream_fn(case.bytes(), device),
    }
    if "composed" + COMPILE_SUFFIX in names:
        comp = compiled(composed)
        comp(x)  # compiles (untimed)
        fns["composed" + COMPILE_SUFFIX] = lambda: comp(x)
    return {n: fns[n] for n in names}


def run_case(
    case: FakeQuantCase,
    device: torch.device,
    *,
    compile_baseline: bool,
    repeats: int,
    warmup: int,
) -> Iterator[tuple[str, Timing | None, str]]:
    """Yield ``(variant, timing or None, note)`` for each variant, timed round-robin; a
    compile failure is reported in the note and the other variants still run."""
    names = case.variants(compile_baseline and case.compile)
    build = _model_fns if case.kind == "model" else _op_fns
    note = ""
    try:
        fns = build(case, device, names)
    except Exception as exc:  # a torch.compile failure: drop that variant, go on
        if not any(n.endswith(COMPILE_SUFFIX) for n in names):
            raise
        note = f"torch.compile failed: {type(exc).__name__}: {exc}"[:300]
        names = [n for n in names if not n.endswith(COMPILE_SUFFIX)]
        fns = build(case, device, names)
    timings = measure_interleaved(fns, device=device, repeats=repeats, warmup=warmup)
    del fns
    gc.collect()
    for name in case.variants(compile_baseline and case.compile):
        if name in timings:
            yield name, timings[name], ""
        else:
            yield name, None, note


__all__ = ["FakeQuantCase", "quick_cases", "full_cases", "smoke_cases", "run_case"]
