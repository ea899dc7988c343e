"""Micro-benchmarks of the packed-export ops ``pack_``, ``unpack_`` and ``dequantize_``
(SPEC.md §10), per backend, in the op suite.

One case = op x index width (from the level count ``K``) x, for ``dequantize_``, the
granularity of the levels and the output dtype, on the op suite's multi-tensor set
(``n_tensors`` tensors of ``rows x cols`` elements; random indices ``< K``, float16
levels as ``save_quantized`` writes them). Variants, timed round-robin like the fused
ops: every available backend through the public op, ``reference(compile)``
(``torch.compile`` of the reference function, where the case asks for it) and
``stream`` (``a.add_(b)`` over the case's byte count: the bandwidth yardstick).

Byte model (what a one-pass kernel must move), per tensor of ``n`` elements:
``pack_``: read ``n`` index bytes + write ``ceil(n*w/8)``; ``unpack_``: the reverse;
``dequantize_``: read ``ceil(n*w/8)`` + the levels (``rows * K * 2``), write
``n * itemsize`` of the output dtype.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch

from benchmarks.op_bench import DTYPES, compile_fresh, rows_cols, time_variants
from benchmarks.timing import Timing
from parq_kernels import reference_pack
from parq_kernels.pack_ops import dequantize_, index_width, pack_, packed_nbytes, unpack_

OPS = {"pack": pack_, "unpack": unpack_, "dequantize": dequantize_}
LEVELS_DTYPE = torch.float16


@dataclass(frozen=True)
class PackCase:
    op: str  # "pack", "unpack" or "dequantize"
    K: int  # levels per group: the index width is ceil(log2 K)
    granularity: str = "channel"  # dequantize: one level set per tensor / channel / block
    dtype: str = "fp32"  # dequantize: output dtype
    compile: bool = False

    @property
    def width(self) -> int:
        return index_width(self.K)

    @property
    def name(self) -> str:
        k = "" if self.K & (self.K - 1) == 0 else f"K{self.K}"  # K = 2**w: w says it
        base = f"{self.op}/w{self.width}{k}"
        return f"{base}/{self.granularity}/{self.dtype}" if self.op == "dequantize" else base


def quick_grid() -> list[PackCase]:
    """Each op at 2 bits, the widths 1 / 3 / 4 / 8 and ternary, levels per tensor and
    channel, half-precision outputs; torch.compile on two cases."""
    return [
        PackCase("pack", 4, compile=True),
        PackCase("pack", 2),
        PackCase("pack", 8),
        PackCase("pack", 16),
        PackCase("pack", 256),
        PackCase("unpack", 4),
        PackCase("unpack", 8),
        PackCase("dequantize", 4, compile=True),
        PackCase("dequantize", 3),
        PackCase("dequantize", 4, granularity="tensor"),
        PackCase("dequantize", 16, dtype="bf16"),
        PackCase("dequantize", 256),
    ]


def full_grid() -> list[PackCase]:
    widths = (2, 3, 4, 8, 16, 32, 64, 128, 256)
    cases = [PackCase(op, K, compile=K == 4) for op in ("pack", "unpack") for K in widths]
    for K in widths:
        for gran in ("tensor", "channel", "block32"):
            for dtype in DTYPES:
                compile_it = K == 4 and gran == "channel" and dtype == "fp32"
                cases.append(PackCase("dequantize", K, gran, dtype, compile_it))
    return cases


def smoke_grid() -> list[PackCase]:
    return [PackCase("dequantize", 4)]


class PackInputs:
    """The tensors of one case (outputs are overwritten whole: nothing to reset)."""

    def __init__(self, case: PackCase, device: torch.device, n_tensors: int, rows: int,
                 cols: int) -> None:  # fmt: skip
        r, c = rows_cols(case.granularity, rows, cols)
        w, gen = case.width, torch.Generator().manual_seed(0)
        idx = [torch.randint(0, case.K, (r * c,), generator=gen, dtype=torch.uint8).to(device)
               for _ in range(n_tensors)]  # fmt: skip
        streams = [torch.empty(packed_nbytes(r * c, w), dtype=torch.uint8, device=device)
                   for _ in range(n_tensors)]  # fmt: skip
        reference_pack.pack_(idx, streams, w)
        self.numel = n_tensors * r * c
        stream_bytes = n_tensors * packed_nbytes(r * c, w)
        if case.op == "pack":
            self.args = (idx, streams, w)
            self.bytes = self.numel + stream_bytes
        elif case.op == "unpack":
            self.args = (streams, [torch.empty_like(t) for t in idx], w)
            self.bytes = self.numel + stream_bytes
        else:
            levels = [torch.randn(r, case.K, generator=gen).to(device, LEVELS_DTYPE)
                      for _ in range(n_tensors)]  # fmt: skip
            out = [torch.empty(r, c, dtype=DTYPES[case.dtype], device=device)
                   for _ in range(n_tensors)]  # fmt: skip
            bad = torch.zeros(n_tensors, dtype=torch.int32, device=device)
            self.args = (streams, levels, out, bad, w)
            self.bytes = stream_bytes + sum(q.nbytes for q in levels) + sum(o.nbytes for o in out)

    def reset(self) -> None:
        pass

    def call(self, fn: Callable, **kw) -> None:
        fn(*self.args, **kw)


def compiled_reference(case: PackCase) -> tuple[Callable | None, str]:
    """``(torch.compile(<the case's reference op>), "")`` or ``(None, why)``."""
    return compile_fresh(getattr(reference_pack, f"{case.op}_"))


def run_case(
    case: PackCase,
    device: torch.device,
    backend_names: list[str],
    compile_baseline: bool,
    *,
    n_tensors: int,
    rows: int,
    cols: int,
    repeats: int,
    warmup: int,
) -> Iterator[tuple[str, Timing | None, PackInputs, str]]:
    """Yield ``(variant, timing or None, inputs, note)`` like :func:`op_bench.run_case`."""
    inputs = PackInputs(case, device, n_tensors, rows, cols)
    op = OPS[case.op]
    compiled = compiled_reference(case) if compile_baseline and case.compile else None
    timed = time_variants(lambda name: inputs.call(op, backend=name), inputs.call, compiled,
                          backend_names=backend_names, nbytes=inputs.bytes, device=device,
                          repeats=repeats, warmup=warmup)  # fmt: skip
    for variant, timing, note in timed:
        yield variant, timing, inputs, note
