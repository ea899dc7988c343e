"""``save_quantized`` / ``load_quantized``: a QAT model as packed low-bit indices plus
level sets, in one ``safetensors`` file (SPEC.md §10; layout in :mod:`.format`).

Saving reads the optimizer's levels and projects every quantized weight onto its
nearest level (:mod:`.collect`); a model that is hard-quantized (the end of a PARQ /
soft / BinaryRelax anneal, or ``ProxHardQuant``) does not move, otherwise the largest
move is reported (a warning, and :attr:`ExportResult.max_moved`). The indices are
packed by ``parq_kernels::pack_`` (one call per index width and device).

Loading parses and checks the whole file against the model first (format version,
names, shapes, dtypes, sizes, levels finite and sorted, and every index ``< K``), dequantizes with
``parq_kernels::dequantize_`` on the parameter's device, and only then writes into the
model: a rejected file leaves the model untouched. Only safetensors is read (no pickle).

FSDP2 / DTensor: ``save_quantized`` gathers each sharded tensor with ``full_tensor()``
(a collective: call it on every rank) and rank 0 writes the file (then all ranks meet
at a barrier); ``load_quantized`` reads the whole file on every rank and copies each
rank's shard into its DTensor parameters (no collective). In any initialized process
group only rank 0 writes; without DTensor tensors there is no barrier (a plain model is
the same on every rank, and the call may come from rank 0 alone).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from parq.export.collect import QuantizedParam, model_tensors, plain_tensors, quantized_params
from parq.export.format import (
    LEVEL_DTYPES,
    Header,
    PackedFormatError,
    PackedParam,
    metadata,
    read_header,
)
from parq.optim.shard_plan import is_dtensor, local_tensors
from parq_kernels.pack_ops import dequantize, index_width, pack

FLOATS = (torch.float32, torch.float16, torch.bfloat16)


@dataclass(frozen=True)
class ExportResult:
    """What ``save_quantized`` wrote: the quantized parameters' entries, and the largest
    distance a weight moved onto its level (0.0 for a hard-quantized model)."""

    path: str
    params: list[PackedParam]
    plain: list[str]
    max_moved: float
    written: bool  # False on the ranks > 0 of a distributed job


@dataclass
class PackedModel:
    """The content of a packed file: CPU ``tensors`` and the ``metadata`` map ready for
    ``safetensors.torch.save_file``, the quantized ``params`` and the ``plain`` names."""

    tensors: dict[str, Tensor]
    metadata: dict[str, str]
    params: list[PackedParam]
    plain: list[str]
    sharded: bool  # some tensor was a DTensor (gathered with a collective)


def build(
    model: torch.nn.Module, optimizer, levels_dtype: torch.dtype = torch.float16
) -> PackedModel:
    """The packed file of ``model`` (module doc), in memory."""
    if levels_dtype not in LEVEL_DTYPES.values():
        raise ValueError(f"levels_dtype must be one of {list(LEVEL_DTYPES.values())}, "
                         f"got {levels_dtype}")  # fmt: skip
    qps = quantized_params(model, optimizer)
    plain = plain_tensors(model, qps)
    streams = _pack_all(qps)
    tensors: dict[str, Tensor] = {}
    entries = []
    for q, stream in zip(qps, streams, strict=True):
        entry = PackedParam(q.name, tuple(q.values.shape), str(q.values.dtype).removeprefix(
            "torch."), q.bits, q.levels.size(1), index_width(q.levels.size(1)), q.layout_name,
            q.layout.block_size, q.layout.rows, q.layout.cols, q.quantizer, q.moved)  # fmt: skip
        levels = q.levels.to(levels_dtype)
        if not torch.isfinite(levels).all():
            raise ValueError(
                f"parameter {q.name!r}: levels up to {q.levels.abs().max():.4g} overflow "
                f"{levels_dtype}; save with levels_dtype=torch.float32"
            )
        tensors[f"{q.name}.qidx"] = stream.cpu()
        tensors[f"{q.name}.qlevels"] = levels.reshape(entry.levels_shape).cpu().contiguous()
        entries.append(entry)
    storages = set()
    for name, t in plain.items():
        if name in tensors:
            raise ValueError(f"tensor {name!r} collides with a packed tensor's name")
        t = t.cpu()
        key = t.untyped_storage().data_ptr()
        if key in storages or not t.is_contiguous() or t.untyped_storage().nbytes() != t.nbytes:
            t = t.clone(memory_format=torch.contiguous_format)  # safetensors: no shared memory
        storages.add(key)
        tensors[name] = t
    sharded = any(is_dtensor(q.param) for q in qps) or any(
        is_dtensor(t) for t in model_tensors(model).values()
    )
    meta = metadata(entries, list(plain), levels_dtype)
    return PackedModel(tensors, meta, entries, list(plain), sharded)


def _pack_all(qps: list[QuantizedParam]) -> list[Tensor]:
    """The packed stream of each parameter: one ``pack_`` call per (width, device)."""
    out: list[Tensor | None] = [None] * len(qps)
    by: dict[tuple, list[int]] = {}
    for i, q in enumerate(qps):
        by.setdefault((index_width(q.levels.size(1)), q.indices.device), []).append(i)
    for (w, _), items in by.items():
        for i, stream in zip(items, pack([qps[i].indices for i in items], w), strict=True):
            out[i] = stream
    return out


def _rank() -> int | None:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank()
    return None


def save_quantized(
    path: str | Path,
    model: torch.nn.Module,
    optimizer,
    levels_dtype: torch.dtype = torch.float16,
) -> ExportResult:
    """Write ``model`` as packed indices + levels (module doc).

    Args:
        path: the ``.safetensors`` file to write.
        model: the model whose quantized parameters ``optimizer`` (a ``QuantOptimizer``)
            holds; other parameters and persistent buffers are stored as they are.
        levels_dtype: dtype of the stored levels (``float32`` gives a bitwise round trip,
            ``float16`` / ``bfloat16`` halve the level bytes).
    """
    packed = build(model, optimizer, levels_dtype)
    entries = packed.params
    rank = _rank()
    written = rank in (None, 0)
    if written:
        from safetensors.torch import save_file

        save_file(packed.tensors, str(path), metadata=packed.metadata)
    if packed.sharded and rank is not None:
        import torch.distributed as dist

        dist.barrier()
    moved = [e for e in entries if e.moved > 0]
    if moved:
        worst = max(moved, key=lambda e: e.moved)
        warnings.warn(f"{len(moved)} quantized parameter(s) were not hard-quantized and were "
                      f"projected to their nearest levels; largest move {worst.moved:.4g} "
                      f"in {worst.name!r}", stacklevel=2)  # fmt: skip
    return ExportResult(str(path), entries, packed.plain,
                        max((e.moved for e in entries), default=0.0), written)  # fmt: skip


def _check_against(header: Header, targets: dict[str, Tensor], where: str) -> None:
    """Names and shapes of the file against the model (errors name the parameter)."""
    names = list(header.params) + header.plain
    for name in names:
        if name not in targets:
            raise PackedFormatError(f"{where}: {name!r} is in the file but not in the model")
    for name in targets:
        if name not in header.params and name not in header.plain:
            raise PackedFormatError(f"{where}: the model's {name!r} is missing from the file")
    for name in names:
        shape = header.params[name].shape if name in header.params else header.tensors[name][1]
        if tuple(targets[name].shape) != tuple(shape):
            raise PackedFormatError(f"{where}: parameter {name!r} has shape {list(shape)} in the "
                                    f"file, {list(targets[name].shape)} in the model")  # fmt: skip


def _read(path: str, keys: list[str]) -> dict[str, Tensor]:
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(path, framework="pt", device="cpu") as f:
            return {k: f.get_tensor(k) for k in keys}
    except (SafetensorError, OSError, RuntimeError) as exc:
        raise PackedFormatError(f"{path}: unreadable safetensors file ({exc})") from None


def _check_levels(path: str, header: Header, raw: dict[str, Tensor]) -> None:
    """Every row of levels finite and sorted ascending, as ``save_quantized`` writes them
    (a NaN level would load as NaN weights, unsorted ones break the nearest-level search)."""
    for p in header.params.values():
        levels = raw[f"{p.name}.qlevels"].float().reshape(p.rows, p.K)
        unsorted = levels[:, 1:] < levels[:, :-1]
        for bad, what in ((~torch.isfinite(levels), "are not finite"),
                          (unsorted, "are not sorted ascending")):  # fmt: skip
            rows = bad.any(1).nonzero().flatten()
            if rows.numel():
                r = int(rows[0])
                raise PackedFormatError(f"{path}: parameter {p.name!r}: its levels {what} "
                                        f"({rows.numel()} of {p.rows} rows, first row {r}: "
                                        f"{levels[r, :8].tolist()})")  # fmt: skip


def _dequantize_all(path: str, header: Header, raw: dict[str, Tensor],
                    targets: dict[str, Tensor]) -> dict[str, Tensor]:  # fmt: skip
    """Every quantized parameter's weights, on its device, in its dtype (when a float
    type the ops serve; else float32); raises naming a corrupted stream."""
    groups: dict[tuple, list[PackedParam]] = {}
    for p in header.params.values():
        t = targets[p.name]
        dtype = t.dtype if t.dtype in FLOATS else torch.float32
        groups.setdefault((p.w, local_tensors([t])[0].device, dtype), []).append(p)
    out = {}
    for (w, device, dtype), items in groups.items():
        streams = [raw[f"{p.name}.qidx"].to(device) for p in items]
        levels = [raw[f"{p.name}.qlevels"].to(device).reshape(p.rows, p.K) for p in items]
        values, bad = dequantize(streams, levels, [(p.rows, p.cols) for p in items], w, dtype)
        for p, v, b in zip(items, values, bad.tolist(), strict=True):
            if b:
                raise PackedFormatError(f"{path}: parameter {p.name!r}: its packed indices hold "
                                        f"a code >= K={p.K} (corrupted file)")  # fmt: skip
            out[p.name] = v.view(p.shape)
    return out


def _assign(target: Tensor, value: Tensor) -> None:
    if is_dtensor(target):
        from torch.distributed.tensor import distribute_tensor

        local = local_tensors([target])[0]
        shard = distribute_tensor(value.to(local.device), target.device_mesh, target.placements,
                                  src_data_rank=None)  # fmt: skip
        local.copy_(shard.to_local())
    else:
        target.copy_(value)


@torch.no_grad()
def load_quantized(path: str | Path, model: torch.nn.Module) -> None:
    """Write the dequantized weights (``Q[idx]`` cast to each parameter's dtype) and the
    other tensors of the packed file at ``path`` into ``model`` (module doc). Raises
    :class:`PackedFormatError`, naming the file and parameter, and changes nothing, if
    the file is truncated, of another format version, or does not fit the model."""
    path = str(path)
    header = read_header(path)
    targets = model_tensors(model)
    _check_against(header, targets, path)
    keys = [f"{n}.{s}" for n in header.params for s in ("qidx", "qlevels")] + header.plain
    raw = _read(path, keys)
    _check_levels(path, header, raw)
    values = _dequantize_all(path, header, raw, targets)
    values.update({name: raw[name] for name in header.plain})
    for name, value in values.items():  # everything checked: now write
        _assign(targets[name], value)
