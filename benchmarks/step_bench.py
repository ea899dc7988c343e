"""Benchmarks of a whole ``QuantOptimizer.step()`` on model-shaped parameter sets.

For each case (a parameter set, a quantizer + prox map, a base optimizer, a
``quant_period``) these variants are timed, each on its own fresh copy of the
parameters, with fixed random gradients; one timed call runs ``quant_period``
steps (a whole period: one level update and ``quant_period - 1`` steps between):

* ``base``: the base optimizer's ``step()`` alone (no QAT), torch's default kernels;
* ``base(fused=True)``: the same with torch's ``fused=True`` kernels: the yardstick
  (``t / torch fused`` column) that a QAT step is compared with;
* ``generic``: ``QuantOptimizer(..., fused=False)``, the per-parameter path that
  mirrors the public PARQ release (timed at ``quant_period=1`` only: it is the
  slowest variant by far, and the goal it serves is stated for that period);
* ``fused-prox:<backend>``: ``QuantOptimizer(..., fuse_base_step=False)``: restore the
  latents, torch's base step, then the fused quantize/prox op (the previous design);
* ``fused:<backend>``: ``QuantOptimizer(..., backend=<backend>)``, the default: the
  base update fused with quantize + prox (SPEC.md §8);
* ``stream``: ``a.add_(b)`` in place on buffers whose read + write traffic equals one
  ``fused`` step's byte model, once per step of the period, in the same round-robin:
  the memory bandwidth of a working set of the case's size, used in place as an
  optimizer uses it (the ``of best BW`` column divides by the higher of it and the
  case's fastest variant: report.py).

The ``QuantOptimizer`` variants wrap the base optimizer built with ``fused=True``, as
the yardstick is: the parameters they do not quantize (biases, norms) get torch's fused
kernels in both (a base optimizer with torch's CPU defaults steps them one tensor at a
time, which made the steps of the small-tensor models up to 1.6x slower: ResNet-20 1.4x,
ViT-B/16 blocks 1.6x).

Quick mode leaves out ``fused:reference`` / ``fused-prox:reference`` when a compiled
backend is available (the op suite compares the backends).

Cases: the headline: the issue-4 set (:func:`issue4_cases`) and the model sets
(:func:`headline_model_cases`: ResNet-20, ViT-B/16 blocks, Llama-style blocks from module
trees where installed, :mod:`benchmarks.model_sets`, and the 4-bit recipe); 3 and 4 bits
on the issue-4 set (:func:`low_bit_cases`: uniform, ``MaxUnifQuantizer``, LSBQ, hard and
PARQ); the hard phase on it (:func:`hard_phase_cases`: ``ProxHardQuant`` per channel,
``ProxPARQ`` past its ``anneal_end`` per channel and per tensor; in this phase the steps
between level updates only map to the nearest level), the same set with bf16 parameters
(:func:`bf16_cases`), whole-model shapes (:func:`model_cases`) and the host time of a step
on 8 tiny tensors (:func:`host_cases`). A case may leave
variants out (``skip``: quick mode's added cases time no ``base``, neither the 3- / 4-bit
nor the bf16 cases ``generic``, and the 3- / 4-bit cases no ``fused-prox``).

Byte model (minimal traffic per element of itemsize ``s``, per step):
SGD with momentum reads ``p, grad, buf`` and writes ``buf, p`` (``5 s``); AdamW (also
``adamw95``: betas (0.9, 0.95)) reads ``p, grad, m, v`` and writes ``p, m, v`` (``7 s``);
plain SGD ``3 s``. The fused step adds one write per quantized element (it reads the
latent where the base step reads ``p``, and writes both the latent and the projected
``p``): ``+1 s`` (level updates of rows that fit on chip add nothing; long rows add a
read of the latent per extra statistics pass, not counted). The unfused paths
(``fused-prox``, ``generic``) add the latent restore (read latent, write p: ``2 s``) and
the quantize/prox pass (read p, write latent, write p: ``3 s``): ``+5 s``.
"""

from __future__ import annotations

import functools
import gc
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace

import torch

from benchmarks import model_sets, shapes
from benchmarks.op_bench import STREAM, stream_fn
from benchmarks.shapes import ParamSpec
from benchmarks.timing import Timing, measure_interleaved
from parq.optim import ProxHardQuant, ProxPARQ, QuantOptimizer
from parq.quant import (
    LSBQuantizer,
    MaxUnifQuantizer,
    TernaryThresholdQuantizer,
    TernaryUnifQuantizer,
    UnifQuantizer,
)

BASE_BYTES = {"sgd": 5, "adamw": 7, "adamw95": 7}  # per element, in units of the itemsize
FUSED_EXTRA_BYTES = 1  # fused step: the projected weights are written too
UNFUSED_EXTRA_BYTES = 5  # restore (2) + quantize/prox pass (3)
HEADLINE = "8xLinear1024"  # the issue-4 set: 8 x Linear(1024, 1024)
FUSED_BASE = "base(fused=True)"  # torch's fused=True step: the yardstick
PARQ_ANNEALED_END = 1  # parq-annealed: ProxPARQ(anneal_start=0, anneal_end=1)
DTYPE_NAMES = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}
QUANTIZERS = {
    "uniform": UnifQuantizer,
    "maxunif": MaxUnifQuantizer,
    "lsbq": LSBQuantizer,
    "lsbq_opt": lambda: LSBQuantizer(optimal=True),
    "ternary": TernaryUnifQuantizer,
    "ternary_thr": TernaryThresholdQuantizer,
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
    period: int = 1  # quant_period; one timed call = one period of steps
    repeats: int | None = None  # timed repeats, when the case needs more than its mode's
    skip: tuple[str, ...] = ()  # variants (or kinds: "fused-prox") left out, for a mode's time
    source: str = field(default=model_sets.SHAPES, compare=False)  # where the shapes came from

    @property
    def name(self) -> str:
        gran = "channel" if self.per_channel else "tensor"
        dtype = "" if self.dtype == torch.float32 else "/" + DTYPE_NAMES[self.dtype]
        return (f"{self.model}/{self.quantizer}{self.bits}+{self.prox}/{gran}/{self.base}"
                f"/period{self.period}{dtype}")  # fmt: skip

    @property
    def pre_steps(self) -> int:
        """Untimed steps run when a variant is built: past ``anneal_end`` for the
        annealed PARQ cases, so that every timed step is in the hard phase."""
        return PARQ_ANNEALED_END if self.prox == "parq-annealed" else 0

    @property
    def numel(self) -> int:
        return shapes.count(list(self.specs))

    def bytes(self, variant: str) -> int:
        """Bytes one timed call (``period`` steps) of ``variant`` moves (module doc)."""
        per_step = BASE_BYTES[self.base] * self.numel
        if variant.startswith("fused:") or variant == STREAM:
            per_step += FUSED_EXTRA_BYTES * shapes.count(list(self.specs), quantized=True)
        elif not variant.startswith("base"):  # generic, fused-prox
            per_step += UNFUSED_EXTRA_BYTES * shapes.count(list(self.specs), quantized=True)
        return per_step * self.itemsize * self.period

    @property
    def itemsize(self) -> int:
        return torch.empty((), dtype=self.dtype).element_size()

    def memory_needed(self) -> int:
        """Bytes one variant holds: params, grads, optimizer state, latents."""
        states = 1 if self.base == "sgd" else 2  # momentum; Adam's two moments
        return (3 + states) * self.numel * self.itemsize


def issue4_cases(repeats: int | None = None) -> list[StepCase]:
    """8 x Linear(1024, 1024), 2-bit weights, unquantized biases, SGD and AdamW, levels
    every 10 steps (the default) and every step; ``repeats``: timed repeats of each (the
    headline ratios: more samples than the model-shaped cases get)."""
    specs = tuple(shapes.linear_stack(8, 1024))
    cases = []
    for period in (10, 1):
        for base in ("sgd", "adamw"):
            cases += [
                StepCase("8xLinear1024", specs, "uniform", 2, "parq", True, base, period=period),
                StepCase("8xLinear1024", specs, "lsbq", 2, "parq", True, base, period=period),
                StepCase("8xLinear1024", specs, "uniform", 2, "hard", False, base, period=period),
            ]
    return [replace(c, repeats=repeats) for c in cases]


def hard_phase_cases(repeats: int | None = None, skip: tuple[str, ...] = ()) -> list[StepCase]:
    """The hard phase on the headline set: uniform 2-bit with ``ProxHardQuant`` per
    channel (per tensor is in :func:`issue4_cases`), and ``ProxPARQ`` past its
    ``anneal_end`` (``parq-annealed``: every timed step maps hard, as every PARQ run ends)
    per channel and per tensor; SGD and AdamW, ``quant_period`` 10 (nine of ten steps
    reuse the levels) and 1."""
    specs = tuple(shapes.linear_stack(8, 1024))
    kinds = [("hard", True), ("parq-annealed", True), ("parq-annealed", False)]
    one = StepCase(HEADLINE, specs, repeats=repeats, skip=skip)
    return [
        replace(one, prox=prox, per_channel=per_channel, base=base, period=period)
        for period in (10, 1)
        for base in ("sgd", "adamw")
        for prox, per_channel in kinds
    ]


def bf16_cases(
    periods: tuple[int, ...] = (10, 1), repeats: int | None = None, skip: tuple[str, ...] = ()
) -> list[StepCase]:
    """The headline set with bf16 parameters (latent and state bf16, as torch's fused
    SGD / AdamW keep them; the yardstick is their ``fused=True`` step on the same bf16
    parameters): uniform 2-bit + PARQ per channel and + hard per tensor, SGD and AdamW."""
    specs = tuple(shapes.linear_stack(8, 1024))
    kinds = [("parq", True), ("hard", False)]
    one = StepCase(HEADLINE, specs, dtype=torch.bfloat16, repeats=repeats, skip=skip)
    return [
        replace(one, prox=prox, per_channel=per_channel, base=base, period=period)
        for period in periods
        for base in ("sgd", "adamw")
        for prox, per_channel in kinds
    ]


def headline_model_cases(quick: bool, repeats: int | None = None) -> list[StepCase]:
    """The headline's model sets (:func:`benchmarks.model_sets.headline_sets`): ResNet-20
    with SGD (momentum 0.9), ViT-B/16 blocks and Llama-style blocks with AdamW, 2-bit
    uniform + PARQ per channel; and the 4-bit recipe: the Llama-style blocks, 4-bit
    ``MaxUnifQuantizer`` + ``ProxHardQuant`` per channel, ``AdamW(betas=(0.9, 0.95))``
    (``adamw95``), in float32 and in bf16 (how torchao PARQ's Llama run trained: the
    yardstick is torch's fused step on the same bf16 parameters); ``quant_period`` 10 and 1."""
    sets = model_sets.headline_sets(quick)
    fp32 = torch.float32
    kinds = [
        (name, specs, source, base, "uniform", 2, "parq", fp32)
        for (name, specs, source), base in zip(sets, ("sgd", "adamw", "adamw"), strict=True)
    ]
    name, specs, source = sets[-1]
    for dtype in (fp32, torch.bfloat16):  # the 4-bit recipe, as published (bf16) too
        kinds.append((name, specs, source, "adamw95", "maxunif", 4, "hard", dtype))
    return [
        StepCase(name, tuple(specs), quantizer, bits, prox, True, base, period=period,
                 repeats=repeats, source=source, dtype=dtype)
        for period in (10, 1)
        for name, specs, source, base, quantizer, bits, prox, dtype in kinds
    ]  # fmt: skip


def low_bit_cases(
    bases: tuple[str, ...] = ("sgd", "adamw"),
    repeats: int | None = None,
    skip: tuple[str, ...] = (),
) -> list[StepCase]:
    """3 and 4 bits on the headline set: uniform (``UnifQuantizer``), ``MaxUnifQuantizer``
    and LSBQ greedy, each with ``ProxHardQuant`` and PARQ, per channel, ``quant_period``
    10 and 1."""
    specs = tuple(shapes.linear_stack(8, 1024))
    one = StepCase(HEADLINE, specs, repeats=repeats, skip=skip)
    return [
        replace(one, quantizer=quantizer, bits=bits, prox=prox, base=base, period=period)
        for period in (10, 1)
        for base in bases
        for bits in (3, 4)
        for quantizer in ("uniform", "maxunif", "lsbq")
        for prox in ("hard", "parq")
    ]


def model_cases(quick: bool) -> list[StepCase]:
    """ResNet-50, ViT-B/16, Llama-1B shapes, whole models (scaled down when ``quick``),
    ``quant_period`` 10 (ResNet-20 is in :func:`headline_model_cases`)."""
    if quick:
        sets = [
            ("resnet50/4", shapes.resnet50(scale=0.25), "sgd"),
            ("vit_b16/4x4L", shapes.vit_b16(scale=0.25, depth=4), "adamw"),
            ("llama1b/8x2L", shapes.llama_1b(scale=0.125, depth=2, vocab=8192), "adamw"),
        ]
    else:
        sets = [
            ("resnet50", shapes.resnet50(), "sgd"),
            ("vit_b16", shapes.vit_b16(), "adamw"),
            ("llama1b", shapes.llama_1b(), "adamw"),
        ]
    return [StepCase(name, tuple(specs), base=base, period=10) for name, specs, base in sets]


HOST = "8xLinear16"  # host time: 8 x (16, 16) weights, the kernels' work next to nothing


def host_cases(repeats: int | None = None, skip: tuple[str, ...] = ()) -> list[StepCase]:
    """Host time (issue 20): 8 weights of (16, 16), no bias, uniform 2-bit + PARQ per
    tensor, SGD and AdamW, ``quant_period`` 10: the whole step is Python, op calls and torch's
    per-tensor overhead, and its ratio to torch's fused step is the host-time ratio."""
    specs = tuple(ParamSpec(f"{i}.weight", (16, 16), True) for i in range(8))
    one = StepCase(HOST, specs, per_channel=False, period=10, repeats=repeats, skip=skip)
    return [replace(one, base=base) for base in ("sgd", "adamw")]


def smoke_cases() -> list[StepCase]:
    """Tiny: PARQ per channel, the hard phase (annealed PARQ) per tensor, hard on bf16."""
    specs = tuple(shapes.linear_stack(2, 64))
    return [
        StepCase("2xLinear64", specs, base="sgd"),
        StepCase("2xLinear64", specs, prox="parq-annealed", per_channel=False, base="sgd"),
        StepCase("2xLinear64", specs, prox="hard", base="sgd", dtype=torch.bfloat16),
    ]


def _base_optimizer(case: StepCase, groups: list[dict], fused: bool) -> torch.optim.Optimizer:
    flag = {"fused": True} if fused else {}
    if case.base == "sgd":
        return torch.optim.SGD(groups, lr=0.01, momentum=0.9, weight_decay=1e-4, **flag)
    if case.base in ("adamw", "adamw95"):  # adamw95: the 4-bit recipe's betas
        betas = (0.9, 0.95) if case.base == "adamw95" else (0.9, 0.999)
        return torch.optim.AdamW(groups, lr=1e-3, betas=betas, weight_decay=0.01, **flag)
    raise ValueError(f"unknown base optimizer {case.base!r}")


def _draw(specs: tuple[ParamSpec, ...]) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """``(weights, gradient)`` per spec, float32 on the CPU, seeded: the same for every
    variant of a case."""
    gen = torch.Generator(device="cpu").manual_seed(0)
    return [
        (torch.randn(s.shape, generator=gen) * 0.02, torch.randn(s.shape, generator=gen) * 1e-3)
        for s in specs
    ]


_draw_cached = functools.lru_cache(maxsize=1)(_draw)  # drawn once per set, not per variant
CACHE_MAX_NUMEL = 1 << 26  # larger sets (full-size models) are drawn per variant


def _initial_values(case: StepCase) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return (_draw_cached if case.numel <= CACHE_MAX_NUMEL else _draw)(case.specs)


def build(case: StepCase, device: torch.device, variant: str) -> Callable[[], object]:
    """Fresh parameters with gradients, and the callable that runs one period of
    ``variant`` (module doc)."""
    if variant == STREAM:  # one step's traffic per call, one call per step of the period
        one = stream_fn(case.bytes(STREAM) // case.period, device)

        def streams() -> None:
            for _ in range(case.period):
                one()

        return streams
    quantized, other = [], []
    for spec, (w, g) in zip(case.specs, _initial_values(case), strict=True):
        p = torch.nn.Parameter(w.to(device=device, dtype=case.dtype, copy=True))
        p.grad = g.to(device=device, dtype=case.dtype, copy=True)
        (quantized if spec.quantized else other).append(p)
    groups = [{"params": quantized, "quant_bits": case.bits}, {"params": other}]
    opt = _base_optimizer(case, groups, fused=variant != "base")  # (module doc)
    if not variant.startswith("base"):
        prox = {
            "parq": lambda: ProxPARQ(anneal_start=0, anneal_end=10**6),
            "parq-annealed": lambda: ProxPARQ(anneal_start=0, anneal_end=PARQ_ANNEALED_END),
            "hard": ProxHardQuant,
        }[case.prox]()
        kw = {"quant_period": case.period, "quant_per_channel": case.per_channel}
        quantizer = QUANTIZERS[case.quantizer]()
        if variant == "generic":
            opt = QuantOptimizer(opt, quantizer, prox, fused=False, **kw)
        else:
            kind, backend = variant.split(":")
            opt = QuantOptimizer(opt, quantizer, prox, backend=backend,
                                 fuse_base_step=kind == "fused", **kw)  # fmt: skip

    for _ in range(case.pre_steps):  # every variant alike, untimed
        opt.step()

    def period() -> None:
        for _ in range(case.period):
            opt.step()

    period.optimizer = opt  # for inspection (tests)
    return period


def variants(case: StepCase, backend_names: list[str], fused_reference: bool) -> list[str]:
    """The variants timed for ``case`` (module doc)."""
    fused = [b for b in backend_names if b != "reference" or fused_reference] or ["reference"]
    out = ["base", FUSED_BASE]
    if case.period == 1:
        out.append("generic")
    out += [f"fused-prox:{b}" for b in fused] + [f"fused:{b}" for b in fused]
    return [v for v in [*out, STREAM] if v not in case.skip and v.split(":")[0] not in case.skip]


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
    """Yield ``(variant, timing or None, note)`` for each of :func:`variants`.

    All variants are built at once and timed round-robin when they fit in ~60% of
    the free memory; otherwise one at a time; a single variant that does not fit
    is reported as skipped."""
    names = variants(case, backend_names, fused_reference)
    need, have = case.memory_needed(), available_memory(device)
    if need > 0.6 * have:
        for variant in names:
            yield variant, None, f"skipped: needs ~{need / 1e9:.1f} GB, {have / 1e9:.1f} GB free"
        return
    together = need * len(names) <= 0.6 * have
    groups = [names] if together else [[v] for v in names]
    for group in groups:
        fns = {v: build(case, device, v) for v in group}
        timings = measure_interleaved(fns, device=device, repeats=repeats, warmup=warmup)
        del fns
        gc.collect()
        for v in group:
            yield v, timings[v], ""
