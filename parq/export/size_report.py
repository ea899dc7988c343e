"""What packing saves (SPEC.md §10): per quantized parameter and in total, the dense
bytes, the packed bytes (indices + levels), the bits per weight with the levels
counted, and the zlib-compressed size.

:func:`size_report` builds the packed file of a model in memory; :func:`report_file`
reads a saved one. Both measure the same bytes: the report is computed from the file's
own header and data (``zlib.compress`` at level 9).
"""

from __future__ import annotations

import math
import zlib
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from parq.export.format import PackedParam, parse_header

ZLIB_LEVEL = 9
FLOAT_CODES = {"F64", "F32", "F16", "BF16", "F8_E5M2", "F8_E4M3"}


@dataclass(frozen=True)
class ParamSize:
    """Sizes of one quantized parameter, in bytes."""

    name: str
    shape: tuple[int, ...]
    layout: str
    bits: int
    K: int
    w: int
    numel: int
    dense_bytes: int  # numel x the parameter dtype's size
    idx_bytes: int
    level_bytes: int
    zlib_bytes: int  # zlib of the packed indices and levels
    moved: float

    @property
    def packed_bytes(self) -> int:
        return self.idx_bytes + self.level_bytes

    @property
    def bits_per_weight(self) -> float:
        return 8 * self.packed_bytes / self.numel if self.numel else 0.0


@dataclass(frozen=True)
class SizeReport:
    """Per-parameter :class:`ParamSize` rows and the totals of the whole file."""

    params: list[ParamSize]
    other_tensors: int  # parameters and buffers stored as they are
    other_bytes: int
    float32_bytes: int  # the whole model with every floating tensor in float32
    dense_bytes: int  # the whole model as stored (each tensor in its own dtype)
    file_bytes: int  # the packed file (header included)
    zlib_bytes: int  # zlib of the packed file
    levels_dtype: str
    source: str = field(default="")

    @property
    def quantized_numel(self) -> int:
        return sum(p.numel for p in self.params)

    @property
    def packed_bytes(self) -> int:
        return sum(p.packed_bytes for p in self.params)

    @property
    def bits_per_weight(self) -> float:
        """Bits per quantized weight, levels included."""
        n = self.quantized_numel
        return 8 * self.packed_bytes / n if n else 0.0

    def as_dict(self) -> dict:
        out = asdict(self)
        out.update(quantized_numel=self.quantized_numel, packed_bytes=self.packed_bytes,
                   bits_per_weight=self.bits_per_weight)  # fmt: skip
        return out

    def __str__(self) -> str:
        head = ["parameter", "shape", "layout", "bits", "K", "w", "dense B", "idx B", "levels B",
                "bits/weight", "zlib B"]  # fmt: skip
        body = [[p.name, "x".join(map(str, p.shape)) or "()", p.layout, str(p.bits), str(p.K),
                 str(p.w), str(p.dense_bytes), str(p.idx_bytes), str(p.level_bytes),
                 f"{p.bits_per_weight:.3f}", str(p.zlib_bytes)] for p in self.params]  # fmt: skip
        widths = [max(len(r[i]) for r in [head, *body]) for i in range(len(head))]
        fmt = "  ".join(f"{{:{'<' if i < 3 else '>'}{w}}}" for i, w in enumerate(widths))
        lines = [fmt.format(*head), fmt.format(*("-" * w for w in widths))]
        lines += [fmt.format(*r) for r in body]
        q_dense = sum(p.dense_bytes for p in self.params)
        idx = sum(p.idx_bytes for p in self.params)
        lines += [
            "",
            f"quantized weights: {self.quantized_numel} in {len(self.params)} parameters, "
            f"{q_dense} B dense -> {self.packed_bytes} B packed (indices {idx} B + levels "
            f"{self.packed_bytes - idx} B in {self.levels_dtype}): "
            f"{self.bits_per_weight:.3f} bits per weight",
            f"other tensors: {self.other_tensors}, {self.other_bytes} B as stored",
            f"model: {self.float32_bytes} B in float32 ({self.dense_bytes} B as stored) -> "
            f"packed file {self.file_bytes} B ({_ratio(self.float32_bytes, self.file_bytes)} "
            f"smaller than float32), zlib {self.zlib_bytes} B "
            f"({_ratio(self.float32_bytes, self.zlib_bytes)})",
        ]
        if any(p.moved > 0 for p in self.params):
            worst = max(self.params, key=lambda p: p.moved)
            lines.append(f"not hard-quantized: projected onto the levels, largest move "
                         f"{worst.moved:.4g} in {worst.name!r}")  # fmt: skip
        return "\n".join(lines)


def _ratio(a: int, b: int) -> str:
    return f"{a / b:.2f}x" if b else "-"


def _itemsize(dtype_name: str) -> int:
    dtype = getattr(torch, dtype_name, None)
    return dtype.itemsize if isinstance(dtype, torch.dtype) else 4


def report_bytes(blob: bytes, source: str = "") -> SizeReport:
    """The size report of a packed file held in ``blob``."""
    h = parse_header(blob, len(blob), source or "packed file")

    def data(key: str) -> bytes:
        begin, end = h.tensors[key][2]
        return blob[h.data_start + begin : h.data_start + end]

    rows = []
    for p in h.params.values():
        packed = data(f"{p.name}.qidx") + data(f"{p.name}.qlevels")
        rows.append(_param_size(p, h.nbytes(f"{p.name}.qidx"), h.nbytes(f"{p.name}.qlevels"),
                                len(zlib.compress(packed, ZLIB_LEVEL))))  # fmt: skip
    other = sum(h.nbytes(n) for n in h.plain)
    other32 = 0
    for n in h.plain:
        code, shape, _ = h.tensors[n]
        other32 += 4 * math.prod(shape) if code in FLOAT_CODES else h.nbytes(n)
    return SizeReport(
        params=rows,
        other_tensors=len(h.plain),
        other_bytes=other,
        float32_bytes=other32 + sum(4 * p.numel for p in rows),
        dense_bytes=other + sum(p.dense_bytes for p in rows),
        file_bytes=len(blob),
        zlib_bytes=len(zlib.compress(blob, ZLIB_LEVEL)),
        levels_dtype=h.levels_dtype,
        source=source,
    )


def _param_size(p: PackedParam, idx_bytes: int, level_bytes: int, zlib_bytes: int) -> ParamSize:
    return ParamSize(p.name, p.shape, p.layout, p.bits, p.K, p.w, p.numel,
                     p.numel * _itemsize(p.dtype), idx_bytes, level_bytes, zlib_bytes,
                     p.moved)  # fmt: skip


def size_report(
    model: torch.nn.Module, optimizer, levels_dtype: torch.dtype = torch.float16
) -> SizeReport:
    """The size report of the file ``save_quantized(path, model, optimizer, levels_dtype)``
    would write (built in memory; with DTensor parameters a collective, as saving is)."""
    from safetensors.torch import save

    from parq.export.packed import build

    packed = build(model, optimizer, levels_dtype)
    return report_bytes(save(packed.tensors, metadata=packed.metadata), "in memory")


def report_file(path: str | Path) -> SizeReport:
    """The size report of a saved packed file."""
    return report_bytes(Path(path).read_bytes(), str(path))


__all__ = ["ParamSize", "SizeReport", "size_report", "report_file", "report_bytes"]
