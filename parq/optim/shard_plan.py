"""Where the quantization groups of a DTensor parameter live (SPEC.md §7).

:func:`plan_param` cuts a parameter's quantization groups (SPEC.md §2) on its
*global* shape and says how they map onto the local shard: the view of the local
tensor the kernels get, whether its rows are whole groups (no collective) or
parts of groups split across ranks (statistics reduced over the sharded mesh
dimension's process group), and the placement of the levels ``Q`` in the state.
:mod:`parq.optim.sharding` runs the step on these plans. Also here: the small
helpers that tell a DTensor from a plain tensor and take its local shard.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor

from parq.optim.layout import RowLayout, row_layout


class UnsupportedPlacementError(ValueError):
    """A DTensor parameter's placements cannot be quantized correctly."""


def is_dtensor(p: Tensor) -> bool:
    return type(p).__name__ == "DTensor"


def has_dtensor(params: list[Tensor]) -> bool:
    return any(is_dtensor(p) for p in params)


def _local(t: Tensor) -> Tensor:
    """The local shard of a DTensor (a plain tensor as it is), sharing storage.

    Inside ``step`` (no autograd) this is the DTensor's local tensor; reading the
    attribute directly costs well under a microsecond, ``to_local()`` ~10 us.
    """
    if not is_dtensor(t):
        return t
    local = getattr(t, "_local_tensor", None)
    return local if local is not None else t.to_local()


def local_tensors(tensors: list[Tensor]) -> list[Tensor]:
    """:func:`_local` of each tensor."""
    return [_local(t) for t in tensors]


# ---------------------------------------------------------------------------
# Placement plans: where each quantization group of a parameter lives.
# ---------------------------------------------------------------------------


@dataclass
class ShardPlan:
    """How one parameter's quantization groups map onto its local tensor.

    ``rows_local x cols_local`` is the view of the local tensor handed to the
    quantizer; ``split`` means its rows are parts of global groups of length
    ``cols_global`` whose statistics are reduced over ``group``.
    """

    layout: RowLayout
    local: Tensor  # the local shard (shares storage with the parameter)
    rows_local: int
    cols_local: int
    cols_global: int
    split: bool
    group: object | None  # ProcessGroup of the sharded mesh dim (None: nothing to reduce)
    shard_dim: int | None  # tensor dim sharded across ranks
    row_chunks: tuple[int, ...]  # split rows: local row length on each rank of ``group``
    mesh: object | None
    placements: tuple | None
    q_shape: tuple[int, ...]  # global shape of state["quants"]
    q_local_shape: tuple[int, ...]  # its local shape on this rank
    q_placements: tuple | None


def _chunk_sizes(size: int, parts: int) -> tuple[int, ...]:
    """Sizes of ``torch.chunk(range(size), parts)`` padded with zeros to ``parts``."""
    step = -(-size // parts) if size else 0
    return tuple(max(0, min(step, size - i * step)) for i in range(parts))


def _where(index: int, j: int, p: Tensor) -> str:
    placements = getattr(p, "placements", None)
    extra = f", placements {tuple(placements)}" if placements is not None else ""
    return f"param_groups[{index}] params[{j}] (shape {tuple(p.shape)}{extra})"


def plan_param(p: Tensor, layout: RowLayout, K: int, where: str) -> ShardPlan:
    """The :class:`ShardPlan` of ``p`` (a DTensor or a plain tensor)."""
    if not is_dtensor(p):
        q_shape = (layout.rows, K) if layout.grouped else (K,)
        return ShardPlan(layout, p, layout.rows, layout.cols, layout.cols, False, None, None, (),
                         None, None, q_shape, q_shape, None)  # fmt: skip
    from torch.distributed.tensor import Replicate, Shard

    mesh, placements = p.device_mesh, tuple(p.placements)
    shard_mesh_dim, shard_dim = None, None
    for mesh_dim, pl in enumerate(placements):
        if type(pl) is Replicate:
            continue
        if type(pl) is not Shard:
            raise UnsupportedPlacementError(
                f"{where}: placement {pl} on mesh dim {mesh_dim} is not supported "
                "(only Shard(d) on one mesh dim and Replicate elsewhere)"
            )
        if shard_mesh_dim is not None:
            raise UnsupportedPlacementError(
                f"{where}: sharded on two mesh dims ({shard_mesh_dim} and {mesh_dim}); "
                "only one sharded mesh dim is supported"
            )
        shard_mesh_dim, shard_dim = mesh_dim, pl.dim % p.dim()
    local = _local(p)
    split, group, sizes = False, None, ()
    if shard_mesh_dim is not None and mesh.size(shard_mesh_dim) > 1:
        sizes = _chunk_sizes(p.size(shard_dim), mesh.size(shard_mesh_dim))
        coord = mesh.get_local_rank(shard_mesh_dim)
        if local.size(shard_dim) != sizes[coord]:
            raise UnsupportedPlacementError(
                f"{where}: local shard has {local.size(shard_dim)} entries along dim "
                f"{shard_dim}, expected {sizes[coord]} (torch.chunk layout)"
            )
        split = _rows_split(p, layout, shard_dim, sizes, where)
        if split:
            group = mesh.get_group(shard_mesh_dim)
    replicated = tuple(Replicate() for _ in placements)
    B = layout.block_size
    if split:  # rows = global groups, each holding its local part
        rows_local = layout.rows
        cols_local = local.numel() // rows_local if rows_local else 0
        per_rank = p.numel() // p.size(shard_dim) if p.size(shard_dim) else 0
        row_chunks = tuple(per_rank * s // max(rows_local, 1) for s in sizes)
    else:  # whole groups on this rank
        cols_local = layout.cols
        rows_local = local.numel() // cols_local if layout.grouped and cols_local else 1
        row_chunks = ()
    if not layout.grouped:
        q_shape, q_local, q_pl = (K,), (K,), replicated
    elif split:  # per-channel rows split across ranks
        q_shape, q_local, q_pl = (layout.rows, K), (layout.rows, K), replicated
    elif B is not None and p.dim() == 2:
        q_shape = (p.size(0), p.size(1) // B, K)
        q_local, q_pl = (local.size(0), local.size(1) // B, K), placements
    else:  # per-channel or per-block of a 1-D parameter: one level row per local row
        q_shape, q_local, q_pl = (layout.rows, K), (rows_local, K), placements
    return ShardPlan(layout, local, rows_local, cols_local, layout.cols, split, group, shard_dim,
                     row_chunks, mesh, placements, q_shape, q_local, q_pl)  # fmt: skip


def _rows_split(
    p: Tensor, layout: RowLayout, shard_dim: int, sizes: tuple[int, ...], where: str
) -> bool:
    """Are the quantization groups of ``p`` split across ranks by this sharding?"""
    if not layout.grouped:
        return True
    B = layout.block_size
    if B is None:  # per-channel: rows are dim 0
        return shard_dim != 0
    # per-block: blocks run along the last dim; a block must not straddle two ranks
    if (p.dim() == 2 and shard_dim == 0) or all(s % B == 0 for s in sizes):
        return False
    raise UnsupportedPlacementError(
        f"{where}: quant_block_size={B} blocks straddle ranks (local sizes along dim "
        f"{shard_dim}: {list(sizes)}); shard dim 0 of a 2-D parameter, or make the shard "
        "sizes multiples of the block size"
    )


def check_group(group: dict, index: int, bits: int, quantizer, per_channel: bool) -> None:
    """Raise :class:`UnsupportedPlacementError` early for a group's DTensor parameters."""
    for j, p in enumerate(group["params"]):
        if is_dtensor(p):
            where = _where(index, j, p)
            layout = row_layout(p, group.get("quant_block_size"), per_channel, where + ": ")
            plan_param(p, layout, quantizer.get_quant_size(bits), where)
