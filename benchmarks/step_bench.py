"""Benchmarks of a whole ``QuantOptimizer.step()`` on model-shaped parameter sets.

For each case (a parameter set, a quantizer + prox map, a base optimizer) these
variants are timed, each on its own fresh copy of the parameters, with fixed
random gradients, quantization update every step (``quant_period=1``):

* ``base``: the base optimizer's ``step()`` alone (no QAT);
* ``generic``: ``QuantOptimizer(..., fused=False)``, the per-parameter path
  that mirrors the public PARQ release (the reference of this suite);
* ``fused:<backend>``: ``QuantOptimizer(..., backend=<backend>)`` for each
  available backend of the fused op (quick mode leaves out ``fused:reference``
  when a compiled backend is available: it is the slowest and adds no information
  that the op suite does not give).

Byte model (minimal traffic per element of itemsize ``s``, per step):
SGD with momentum reads ``p, grad, buf`` and writes ``buf, p`` (``5 s``); AdamW
reads ``p, grad, m, v`` and writes ``p, m, v`` (``7 s``). A quantized element adds
the latent restore (read latent, write p: ``2 s``) and the fused quantize/prox
pass (read p, write latent, write p: ``3 s``), ``5 s`` more. The same byte count
is used for the generic and fused paths (they do the same work).
"""

from __future__ import annotations

import gc
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch

from benchmarks import shapes
from benchmarks.shapes import ParamSpec
from benchmarks.timing import Timing, measure_interleaved
from parq.optim import ProxHardQuant, ProxPARQ, QuantOptimizer
from parq.quant import LSBQuantizer, TernaryUnifQuantizer, UnifQuantizer

BASE_BYTES = {"sgd": 5, "adamw": 7}  # per element, in units of the itemsize
QAT_EXTRA_BYTES = 5
QUANTIZERS = {
    "uniform": UnifQuantizer,
    "lsbq": LSBQuantizer,
    "lsbq_opt": lambda: LSBQuantizer(optimal=True),
    "ternary": TernaryUnifQuantizer,
}


@dataclass(frozen=True)
class StepCase:
    model: str
    specs: tuple[ParamSpec, ...] = field(repr=False)
    quantizer: str = "uniform"
    bits: int = 2
    prox: str = "parq"
    per_channel: bool = True
    base: str = "sgd"
    dtype: torch.dtype = torch.float32

    @property
    def name(self) -> str:
        gran = "channel" if self.per_channel else "tensor"
        return f"{self.model}/{self.quantizer}{self.bits}+{self.prox}/{gran}/{self.base}"

    @property
    def numel(self) -> int:
        return shapes.count(list(self.specs))

    @property
    def bytes_base(self) -> int:
        return BASE_BYTES[self.base] * self.numel * self.itemsize

    @property
    def bytes_qat(self) -> int:
        extra = QAT_EXTRA_BYTES * shapes.count(list(self.specs), quantized=True)
        return self.bytes_base + extra * self.itemsize

    @property
    def itemsize(self) -> int:
        return torch.empty((), dtype=self.dtype).element_size()

    def memory_needed(self) -> int:
        """Bytes one variant holds: params, grads, optimizer state, latents."""
        states = 1 if self.base == "sgd" else 2
        return (3 + states) * self.numel * self.itemsize


def issue4_cases() -> list[StepCase]:
    """8 x Linear(1024, 1024), 2-bit weights, unquantized biases, SGD and AdamW."""
    specs = tuple(shapes.linear_stack(8, 1024))
    cases = []
    for base in ("sgd", "adamw"):
        cases += [
            StepCase("8xLinear1024", specs, "uniform", 2, "parq", True, base),
            StepCase("8xLinear1024", specs, "lsbq", 2, "parq", True, base),
            StepCase("8xLinear1024", specs, "uniform", 2, "hard", False, base),
        ]
    return cases


def model_cases(quick: bool) -> list[StepCase]:
    """ResNet-20, ResNet-50, ViT-B/16, Llama-1B shapes (scaled down when ``quick``)."""
    if quick:
        sets = [
            ("resnet20", shapes.resnet20(), "sgd"),
            ("resnet50/4", shapes.resnet50(scale=0.25), "sgd"),
            ("vit_b16/4x4L", shapes.vit_b16(scale=0.25, depth=4), "adamw"),
            ("llama1b/8x2L", shapes.llama_1b(scale=0.125, depth=2, vocab=8192), "adamw"),
        ]
    else:
        sets = [
            ("resnet20", shapes.resnet20(), "sgd"),
            ("resnet50", shapes.resnet50(), "sgd"),
            ("vit_b16", shapes.vit_b16(), "adamw"),
            ("llama1b", shapes.llama_1b(), "adamw"),
        ]
    return [StepCase(name, tuple(specs), base=base) for name, specs, base in sets]


def smoke_cases() -> list[StepCase]:
    return [StepCase("2xLinear64", tuple(shapes.linear_stack(2, 64)), base="sgd")]


def _base_optimizer(case: StepCase, groups: list[dict]) -> torch.optim.Optimizer:
    if case.base == "sgd":
        return torch.optim.SGD(groups, lr=0.01, momentum=0.9, weight_decay=1e-4)
    if case.base == "adamw":
        return torch.optim.AdamW(groups, lr=1e-3, weight_decay=0.01)
    raise ValueError(f"unknown base optimizer {case.base!r}")


def build(case: StepCase, device: torch.device, variant: str) -> torch.optim.Optimizer:
    """Fresh parameters with gradients, and the optimizer of ``variant``."""
    gen = torch.Generator(device="cpu").manual_seed(0)
    quantized, other = [], []
    for spec in case.specs:
        p = torch.nn.Parameter(
            (torch.randn(spec.shape, generator=gen) * 0.02).to(device=device, dtype=case.dtype)
        )
        p.grad = (torch.randn(spec.shape, generator=gen) * 1e-3).to(device, case.dtype)
        (quantized if spec.quantized else other).append(p)
    groups = [{"params": quantized, "quant_bits": case.bits}, {"params": other}]
    base = _base_optimizer(case, groups)
    if variant == "base":
        return base
    prox = ProxPARQ(anneal_start=0, anneal_end=10**6) if case.prox == "parq" else ProxHardQuant()
    kw = {"quant_period": 1, "quant_per_channel": case.per_channel}
    if variant == "generic":
        return QuantOptimizer(base, QUANTIZERS[case.quantizer](), prox, fused=False, **kw)
    backend = variant.removeprefix("fused:")
    return QuantOptimizer(base, QUANTIZERS[case.quantizer](), prox, backend=backend, **kw)


def available_memory(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 1 << 62


def run_case(
    case: StepCase,
    device: torch.device,
    backend_names: list[str],
    *,
    repeats: int,
    warmup: int,
    fused_reference: bool = True,
) -> Iterator[tuple[str, Timing | None, str]]:
    """Yield ``(variant, timing or None, note)`` for base, generic and each fused backend
    (``fused:reference`` only if ``fused_reference`` or no other backend is available).

    All variants are built at once and timed round-robin when they fit in ~60% of
    the free memory; otherwise one at a time; a single variant that does not fit
    is reported as skipped."""
    fused = [b for b in backend_names if b != "reference" or fused_reference]
    if not fused:
        fused = ["reference"]
    variants = ["base", "generic", *(f"fused:{b}" for b in fused)]
    need, have = case.memory_needed(), available_memory(device)
    if need > 0.6 * have:
        for variant in variants:
            yield variant, None, f"skipped: needs ~{need / 1e9:.1f} GB, {have / 1e9:.1f} GB free"
        return
    together = need * len(variants) <= 0.6 * have
    groups = [variants] if together else [[v] for v in variants]
    for group in groups:
        opts = {v: build(case, device, v) for v in group}
        timings = measure_interleaved(
            {v: opt.step for v, opt in opts.items()}, device=device, repeats=repeats, warmup=warmup
        )
        del opts
        gc.collect()
        for v in group:
            yield v, timings[v], ""
