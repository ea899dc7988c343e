"""Micro-benchmarks of the fused ops ``quant_prox_`` and ``fused_step_``, per backend.

One case = quantizer x bits x prox map x granularity x dtype x update, and for
``fused_step_`` cases a base optimizer (``optim``: ``sgd`` = SGD with momentum 0.9
and weight decay, ``adamw``), run on a small multi-tensor set (``n_tensors``
weights of ``rows x cols``). For each case every available backend is timed
through the public op, plus the baselines: ``torch.compile`` of the pure-PyTorch
reference (``reference(compile)``), and ``stream``: ``a.add_(b)`` in place on two
buffers whose read + write traffic equals the case's byte model, in the same
round-robin: the memory bandwidth of a working set of the case's size, read and
written in place like an optimizer step (a plain ``copy_`` pays a read of its
destination that the byte model does not count, so an in-place step outruns it).
The inputs are reset to the same values (untimed) before every call.

Byte model (minimal traffic of one call, what a one-pass kernel must move):
``quant_prox_``: per element, read ``p`` + write ``latent`` + write ``p`` =
``3 * itemsize``; ``fused_step_``: read latent, grad and state, write latent, state
and ``p``: ``6 * itemsize`` (SGD with momentum), ``8 * itemsize`` (AdamW); plus the
level sets, ``rows * K * 4`` bytes (written on update, read otherwise).

SPEC.md §9 cases: the prox maps ``proxquant`` (l1, a lambda mid-schedule),
``proxquant_l2`` and ``binaryconnect`` (the kernels' HARD pass with the latent clamp in
its write pass), ``ternary_thr`` (threshold ternary: two statistics reads of each row),
and ``lsbq_refined`` (refined LSBQ, 3 rounds): as on the optimizer's fused path, its
update calls compute the levels with batched torch ops (timed, part of the call) and
run the op with them as stored levels.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch

from benchmarks.timing import Timing, measure_interleaved
from parq.quant.lsbq_refine import quantize_lsbq_refined
from parq_kernels import reference, reference_step
from parq_kernels.kinds import OptimKind
from parq_kernels.ops import ProxKind, QuantKind, fused_step_, num_levels, quant_prox_

COMPILED = "reference(compile)"
STREAM = "stream"

# quantizer name -> bits -> (QuantKind, qargs); "where b allows"
_UNIFORM = (0.0, 0.5, 0.5)  # UnifQuantizer defaults: mean scale, int_shift 0.5, zero_point 0.5
QUANTIZERS: dict[str, dict[int, tuple[QuantKind, tuple[float, ...]]]] = {
    "uniform": {b: (QuantKind.UNIFORM, _UNIFORM) for b in (1, 2, 4, 8)},
    "lsbq": {0: (QuantKind.LSBQ_TERNARY, (1.1,))}
    | {b: (QuantKind.LSBQ_GREEDY, ()) for b in (1, 2, 4, 8)},
    "lsbq_opt": {b: (QuantKind.LSBQ_OPTIMAL, ()) for b in (0, 1, 2)},
    "ternary": {0: (QuantKind.TERNARY_UNIF, ())},
    "ternary_thr": {0: (QuantKind.TERNARY_THRESHOLD, (0.7, 0.0))},  # delta_factor 0.7, mean
    "lsbq_refined": {b: (QuantKind.LSBQ_GREEDY, ()) for b in (2, 3, 4)},
}
REFINE_ROUNDS = 3  # lsbq_refined
PROX = {
    "hard": (ProxKind.HARD, 0.0),
    "parq": (ProxKind.PARQ, 0.5),  # rho = 0.5 mid-anneal
    "proxquant": (ProxKind.PROXQUANT_L1, 1e-3),  # lambda of the order of the weights' 2e-2
    "proxquant_l2": (ProxKind.PROXQUANT_L2, 0.5),
    "binaryconnect": (ProxKind.BINARYCONNECT, 0.0),
}
GRID_PROX = ("hard", "parq")  # the full cross product; the others in extra_grid()
GRANULARITIES = ("tensor", "channel", "block32", "block128")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
# base optimizer of fused_step_ cases: (kind, hparams without the trailing step/init, buffers)
OPTIMS = {
    "sgd": (OptimKind.SGD, (0.01, 0.9, 0.0, 1e-4, 0.0, 0.0, 0.0), 1),
    "adamw": (OptimKind.ADAMW, (1e-3, 0.9, 0.999, 1e-8, 0.01, 0.0, 0.0, 10.0), 2),
}


@dataclass(frozen=True)
class OpCase:
    quantizer: str
    bits: int
    prox: str
    granularity: str
    dtype: str = "fp32"
    update: bool = True
    compile: bool = True  # also time torch.compile(reference) for this case
    optim: str | None = None  # a fused_step_ case with this base optimizer (OPTIMS)

    @property
    def name(self) -> str:
        upd = "" if self.update else "/noupdate"
        step = f"step:{self.optim}/" if self.optim else ""
        return (f"{step}{self.quantizer}{self.bits}/{self.prox}/{self.granularity}/"
                f"{self.dtype}{upd}")  # fmt: skip

    @property
    def kind(self) -> tuple[QuantKind, tuple[float, ...]]:
        return QUANTIZERS[self.quantizer][self.bits]


def full_grid() -> list[OpCase]:
    """Every valid combination (bits 0, 1, 2, 4, 8 where the quantizer allows);
    torch.compile baseline on the fp32 per-channel update cases (one compile each)."""
    cases = []
    for qname, by_bits in QUANTIZERS.items():
        if qname == "lsbq_refined":
            continue
        for bits, prox, gran, dtype, update in itertools.product(
            sorted(by_bits), GRID_PROX, GRANULARITIES, DTYPES, (True, False)
        ):
            compile_it = dtype == "fp32" and update and gran == "channel"
            cases.append(OpCase(qname, bits, prox, gran, dtype, update, compile_it))
    return cases + step_grid() + extra_grid()


def extra_grid() -> list[OpCase]:
    """SPEC.md §9: the ProxQuant / BinaryConnect prox maps and refined LSBQ."""
    cases = []
    for prox, update, gran in itertools.product(
        ("proxquant", "proxquant_l2", "binaryconnect"), (True, False), ("channel", "tensor")
    ):
        cases.append(OpCase("uniform", 2, prox, gran, update=update, compile=False))
        cases.append(OpCase("lsbq", 2, prox, gran, update=update, compile=False))
    for bits, gran in itertools.product((2, 3, 4), ("channel", "tensor")):
        cases.append(OpCase("lsbq_refined", bits, "parq", gran, compile=False))
    for prox in ("proxquant", "binaryconnect"):
        cases.append(OpCase("uniform", 2, prox, "channel", update=False, optim="sgd",
                            compile=False))  # fmt: skip
    return cases


def quick_grid() -> list[OpCase]:
    """A small subset covering each axis once (torch.compile on a few cases only)."""
    return [
        OpCase("uniform", 2, "parq", "channel", compile=True),
        OpCase("uniform", 2, "hard", "channel", compile=False),
        OpCase("uniform", 2, "parq", "tensor", compile=False),
        OpCase("uniform", 2, "parq", "block32", compile=False),
        OpCase("uniform", 2, "parq", "block128", compile=False),
        OpCase("uniform", 2, "parq", "channel", update=False, compile=False),
        OpCase("uniform", 4, "parq", "channel", compile=False),
        OpCase("uniform", 8, "parq", "channel", compile=False),
        OpCase("uniform", 2, "parq", "channel", dtype="bf16", compile=False),
        OpCase("lsbq", 2, "parq", "channel", compile=True),
        OpCase("lsbq", 4, "parq", "channel", compile=False),
        OpCase("lsbq_opt", 2, "parq", "channel", compile=False),
        OpCase("lsbq_opt", 0, "parq", "tensor", compile=False),
        OpCase("ternary", 0, "parq", "channel", compile=False),
        OpCase("ternary_thr", 0, "parq", "channel", compile=False),
        OpCase("ternary_thr", 0, "hard", "tensor", compile=False),
        OpCase("uniform", 2, "proxquant", "channel", compile=False),
        OpCase("lsbq", 2, "binaryconnect", "channel", update=False, compile=False),
        OpCase("lsbq_refined", 3, "parq", "channel", compile=False),
        *step_grid(),
        OpCase(
            "uniform", 2, "binaryconnect", "channel", update=False, optim="sgd", compile=False
        ),  # fmt: skip
    ]


def step_grid() -> list[OpCase]:
    """``fused_step_`` cases: SGD-momentum and AdamW, uniform and LSBQ, update or not."""
    return [
        OpCase("uniform", 2, "parq", "channel", optim="sgd", compile=True),
        OpCase("uniform", 2, "parq", "channel", update=False, optim="sgd", compile=False),
        OpCase("lsbq", 2, "parq", "channel", optim="adamw", compile=True),
        OpCase("lsbq", 2, "parq", "channel", update=False, optim="adamw", compile=False),
        OpCase("uniform", 2, "hard", "tensor", optim="adamw", compile=False),
        OpCase("ternary_thr", 0, "parq", "channel", optim="adamw", compile=False),
    ]


def smoke_grid() -> list[OpCase]:
    """Two tiny cases (the first with the torch.compile baseline unless --no-compile)."""
    return [
        OpCase("uniform", 2, "parq", "channel", compile=True),
        OpCase("lsbq", 2, "hard", "block32", compile=False),
        OpCase("uniform", 2, "parq", "channel", optim="adamw", compile=False),
    ]


def rows_cols(granularity: str, rows: int, cols: int) -> tuple[int, int]:
    """Row layout of one ``rows x cols`` weight for a granularity."""
    if granularity == "tensor":
        return 1, rows * cols
    if granularity == "channel":
        return rows, cols
    block = int(granularity.removeprefix("block"))
    return rows * cols // block, block


class OpInputs:
    """The tensors of one case; ``reset()`` restores what the op overwrites (untimed)."""

    def __init__(self, case: OpCase, device: torch.device, n_tensors: int, rows: int, cols: int):
        kind, qargs = case.kind
        self.K = num_levels(kind, case.bits, qargs)
        r, c = rows_cols(case.granularity, rows, cols)
        dtype = DTYPES[case.dtype]
        gen = torch.Generator(device="cpu").manual_seed(0)

        def rand(scale: float) -> list[torch.Tensor]:
            return [(torch.randn(r, c, generator=gen) * scale).to(device=device, dtype=dtype)
                    for _ in range(n_tensors)]  # fmt: skip

        self.pristine = rand(0.02)
        self.params = [t.clone() for t in self.pristine]
        self.latents = [torch.empty_like(t) for t in self.pristine]
        self.quants = [torch.empty(r, self.K, device=device) for _ in self.pristine]
        self.nonfinite = torch.zeros(n_tensors, dtype=torch.int32, device=device)
        self.numel = n_tensors * r * c
        self.grads, self.bufs, self.pristine_bufs = [], [[], [], []], []
        per_element = 3
        if case.optim is not None:  # fused_step_: latents are read, params written
            self.latents = [t.clone() for t in self.pristine]
            self.grads = rand(1e-3)
            _, _, nbufs = OPTIMS[case.optim]
            self.pristine_bufs = [[t.abs() for t in rand(1e-3)] for _ in range(nbufs)]
            self.bufs[:nbufs] = [[t.clone() for t in b] for b in self.pristine_bufs]
            per_element = 4 + 2 * nbufs  # read latent, grad, state; write latent, state, p
        self.bytes = per_element * self.numel * self.pristine[0].element_size()
        self.bytes += 4 * n_tensors * r * self.K
        if not case.update:  # levels must exist before a prox-only call
            quant_prox_([t.clone() for t in self.pristine], [torch.empty_like(t) for t in
                        self.pristine], self.quants, self.nonfinite, int(kind), case.bits,
                        list(qargs), False, True, int(ProxKind.NONE), 0.0, 1.0,
                        backend="reference")  # fmt: skip

    def reset(self) -> None:
        if self.grads:
            torch._foreach_copy_(self.latents, self.pristine)
            for bufs, pristine in zip(self.bufs, self.pristine_bufs, strict=False):
                torch._foreach_copy_(bufs, pristine)
        else:
            torch._foreach_copy_(self.params, self.pristine)

    def call(self, case: OpCase, fn: Callable, **kw) -> None:
        kind, qargs = case.kind
        prox_kind, prox_arg = PROX[case.prox]
        public = fn in (quant_prox_, fused_step_)
        update = case.update
        if case.quantizer == "lsbq_refined" and update and case.optim is None:
            for p, Q in zip(self.params, self.quants, strict=True):  # the fused path's levels
                Q.copy_(quantize_lsbq_refined(p.float(), case.bits, REFINE_ROUNDS)[1])
            update = False
        tail = (int(kind), case.bits, list(qargs) if public else tuple(qargs), False,
                update, int(prox_kind), prox_arg, 1.0)  # fmt: skip
        if case.optim is None:
            fn(self.params, self.latents, self.quants, self.nonfinite, *tail, **kw)
            return
        okind, hparams = OPTIMS[case.optim][:2]
        fn(self.params, self.latents, self.grads, *self.bufs, self.quants, self.nonfinite,
           int(okind), list(hparams) if public else hparams, *tail, **kw)  # fmt: skip


def stream_fn(nbytes: int, device: torch.device) -> Callable[[], object]:
    """``a.add_(b)`` on float32 buffers that read + write ``nbytes`` in all (3 per element)."""
    n = max(1, nbytes // 12)
    a = torch.zeros(n, device=device)
    b = torch.zeros(n, device=device)
    return lambda: a.add_(b)


def compiled_reference(case: OpCase) -> tuple[Callable | None, str]:
    """``(torch.compile(<the case's reference op>), "")`` or ``(None, why)``."""
    return compile_fresh(reference_step.fused_step_ if case.optim else reference.quant_prox_)


def compile_fresh(fn: Callable) -> tuple[Callable | None, str]:
    """``(torch.compile(fn), "")`` or ``(None, why)``. Dynamo's caches are reset first, so
    every case compiles afresh and never silently falls back to eager after too many
    recompilations."""
    try:
        torch._dynamo.reset()
        return torch.compile(fn), ""
    except Exception as exc:
        return None, f"torch.compile unavailable: {type(exc).__name__}: {exc}"


def run_case(
    case: OpCase,
    device: torch.device,
    backend_names: list[str],
    compile_baseline: bool,
    *,
    n_tensors: int,
    rows: int,
    cols: int,
    repeats: int,
    warmup: int,
) -> Iterator[tuple[str, Timing | None, OpInputs, str]]:
    """Yield ``(variant, timing or None, inputs, note)`` for each backend, then for
    the ``torch.compile`` baseline when ``compile_baseline and case.compile``.
    All variants are timed round-robin on the same inputs."""
    inputs = OpInputs(case, device, n_tensors, rows, cols)
    op = fused_step_ if case.optim else quant_prox_
    compiled = compiled_reference(case) if compile_baseline and case.compile else None
    timed = time_variants(lambda name: inputs.call(case, op, backend=name),
                          lambda fn: inputs.call(case, fn), compiled,
                          backend_names=backend_names, nbytes=inputs.bytes, device=device,
                          repeats=repeats, warmup=warmup, setup=inputs.reset)  # fmt: skip
    for variant, timing, note in timed:
        yield variant, timing, inputs, note


def time_variants(
    on_backend: Callable[[str], object],
    with_fn: Callable[[Callable], object],
    compiled: tuple[Callable | None, str] | None,
    *,
    backend_names: list[str],
    nbytes: int,
    device: torch.device,
    repeats: int,
    warmup: int,
    setup: Callable[[], object] | None = None,
) -> Iterator[tuple[str, Timing | None, str]]:
    """Time an op round-robin on each backend (``on_backend(name)``), as ``torch.compile``
    of its reference (``compiled``: :func:`compiled_reference`'s answer, ``None`` for no
    such row; ``with_fn(fn)`` runs it) and the ``stream`` over ``nbytes``; yields
    ``(variant, timing or None, note)`` (the op and packed-export suites share it)."""
    fns = {name: (lambda name=name: on_backend(name)) for name in backend_names}
    compile_note = None  # None: no compiled row
    if compiled is not None:
        fn, compile_note = compiled
        if fn is not None:
            try:
                if setup is not None:
                    setup()
                with_fn(fn)  # compiles (untimed)
                fns[COMPILED] = lambda: with_fn(fn)
            except Exception as exc:  # a graph torch.compile cannot handle: report, go on
                compile_note = f"torch.compile failed: {type(exc).__name__}: {exc}"[:300]
    fns[STREAM] = stream_fn(nbytes, device)
    timings = measure_interleaved(fns, device=device, repeats=repeats, warmup=warmup, setup=setup)
    for name in backend_names:
        yield name, timings[name], ""
    if compile_note is not None:
        yield COMPILED, timings.get(COMPILED), compile_note
    yield STREAM, timings[STREAM], ""
