"""NaN / Inf in QuantOptimizer.step() (SPEC.md §6): flags kept without host syncs, read
at level updates.

Every path of a step treats a non-finite value alike: it never enters the latent
(nor, on the fused step, the optimizer state); the element keeps its previous
latent and is projected from it, and its parameter is flagged. The flags of each op
call are device tensors; :class:`NonFiniteFlags` keeps them until the next
quantization-update step reads them (one host sync per ``quant_period`` on a GPU),
then clears the non-finite entries that torch's own base step (the unfused paths)
may have left in the state, and raises :class:`NonFiniteParameterError`: the step
has completed, so skipping the bad batch and going on works.
"""

from __future__ import annotations

import torch
from torch import Tensor

from parq.optim.shard_plan import local_tensors


class NonFiniteParameterError(FloatingPointError):
    """A quantized parameter got NaN or Inf (raised at a quantization-update step)."""


class NonFiniteFlags:
    """The non-finite flags of the op calls since the last level update."""

    def __init__(self) -> None:
        self.pending: list[tuple[int, list[tuple[int, Tensor]], Tensor, int]] = []

    def note(self, index: int, items: list[tuple[int, Tensor]], flags: Tensor, n: int) -> None:
        """Keep one call's flags: ``items[i] = (j, param)`` is flagged by ``flags[i]``."""
        if flags.device.type != "meta":  # meta tensors have no values to check
            self.pending.append((index, items, flags, n))

    def check(self, state) -> None:
        """Read the kept flags (a level update): raise if any parameter was flagged."""
        pending, self.pending = self.pending, []
        bad = [(index, j, p, n) for index, items, flags, n in pending
               for (j, p), f in zip(items, flags.tolist(), strict=True) if f]  # fmt: skip
        if not bad:
            return
        for _, _, p, _ in bad:  # what torch's own base step may have left in its state
            for key, value in state[p].items():
                if key not in ("latent", "quants", "step") and torch.is_tensor(value):
                    torch.nan_to_num_(local_tensors([value])[0], 0.0, 0.0, 0.0)
        index, j, p, n = bad[0]
        others = f" (and {len(bad) - 1} more)" if len(bad) > 1 else ""
        raise NonFiniteParameterError(
            f"param_groups[{index}] params[{j}] (shape {tuple(p.shape)}, {p.dtype}){others} got "
            f"NaN or Inf from the base optimizer at step {n}; those elements kept their previous "
            "latent weights and optimizer state, so the optimizer stays usable (skip the batch "
            "and go on; check the loss and learning rate), or pass check_finite=False to turn "
            "this error off"
        )


def split_group_error(index: int, j: int, p: Tensor) -> NonFiniteParameterError:
    """The error of a quantization group split across ranks, raised at once on every rank
    (its non-finite flag is part of the reduced statistics)."""
    return NonFiniteParameterError(
        f"param_groups[{index}] params[{j}] (shape {tuple(p.shape)}, {p.dtype}) holds NaN or "
        "Inf after the base optimizer step; refusing to quantize it (check the loss and "
        "learning rate, or pass check_finite=False to skip this check)"
    )
