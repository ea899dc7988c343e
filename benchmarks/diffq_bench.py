"""Training-step overhead of DiffQ (SPEC.md §11), in the step suite.

One case = an MLP (``layers`` Linear layers of ``width x width``, batch ``batch``) and a
DiffQ group size. One timed call is a whole training step: forward, cross-entropy
(+ ``model_size()`` for the DiffQ variants), backward, AdamW ``step()``. Variants, each on
its own copy of the model, timed round-robin:

* ``base``: the plain step (no quantizer): the ``t / torch fused`` column divides by it,
  so it reads as the DiffQ step's time over the plain step's;
* ``generic``: DiffQ with the noise injected per parameter by plain torch ops under
  autograd (``w + R * D * e`` with ``D`` expanded per element), as a straightforward
  implementation does: the ``x vs ref`` column's baseline;
* ``diffq:<backend>``: ``DiffQuantizer`` with the fused multi-tensor ops of that backend
  (one op call per forward and one per backward for all parameters).

Byte model: the float32 weights once (``4 n``; not a traffic model: the step is
dominated by the matmuls, the GB/s columns only scale the times).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from benchmarks.timing import Timing, measure_interleaved
from parq.diffq import DiffQuantizer
from parq.diffq.functions import draw_noise
from parq_kernels import backends
from parq_kernels.diffq_ops import DIFFQ_OPS
from parq_kernels.reference_diffq import noise_scale_from_logits


@dataclass(frozen=True)
class DiffQCase:
    layers: int
    width: int
    batch: int = 32
    group_size: int = 8

    @property
    def name(self) -> str:
        return f"diffq/mlp{self.layers}x{self.width}/g{self.group_size}/b{self.batch}"

    @property
    def numel(self) -> int:
        return self.layers * self.width * self.width

    def bytes(self, variant: str) -> int:
        return 4 * self.numel


def quick_cases() -> list[DiffQCase]:
    return [DiffQCase(4, 256)]


def full_cases() -> list[DiffQCase]:
    return [DiffQCase(4, 256), DiffQCase(4, 1024), DiffQCase(4, 1024, group_size=0),
            DiffQCase(8, 512, batch=128)]  # fmt: skip


def smoke_cases() -> list[DiffQCase]:
    return [DiffQCase(2, 32, batch=4)]


class PerParamDiffQ(DiffQuantizer):
    """DiffQ whose training forward injects the noise parameter by parameter with
    plain torch ops (the baseline of the fused ops; same math)."""

    def _train_weights(self) -> list[torch.Tensor]:
        out = []
        weights, logits = self._weights_logits()
        noise = draw_noise([w.detach() for w in weights], self.noise, self.generator)
        for qp, w, lg, e in zip(self._qparams, weights, logits, noise, strict=True):
            R = (w.max() - w.min()).detach()
            D = noise_scale_from_logits(lg, self.min_bits, self.max_bits, self._code)
            D = D.repeat_interleave(self._group(qp))[: w.numel()].view(w.shape)
            out.append(w + R * D * e)
        return out


def _mlp(case: DiffQCase) -> nn.Module:
    layers = []
    for _ in range(case.layers - 1):
        layers += [nn.Linear(case.width, case.width), nn.ReLU()]
    layers.append(nn.Linear(case.width, case.width))
    return nn.Sequential(*layers)


class Trainer:
    """One model (+ quantizer) with its optimizer and a fixed batch."""

    def __init__(self, case: DiffQCase, device: torch.device, quantizer: type | None,
                 backend: str = "") -> None:  # fmt: skip
        torch.manual_seed(0)
        self.model = _mlp(case).to(device)
        self.quantizer = None
        opt = torch.optim.AdamW(self.model.parameters(), lr=1e-3)
        if quantizer is not None:
            self.quantizer = quantizer(self.model, min_size=0, group_size=case.group_size,
                                       exclude=["*bias"])  # fmt: skip
            self.quantizer.setup_optimizer(opt)
            self.quantizer.backend = backend
        self.opt = opt
        gen = torch.Generator().manual_seed(1)
        self.x = torch.randn(case.batch, case.width, generator=gen).to(device)
        self.y = torch.randint(0, case.width, (case.batch,), generator=gen).to(device)

    def step(self) -> None:
        loss = F.cross_entropy(self.model(self.x), self.y)
        if self.quantizer is not None:
            loss = loss + 1e-3 * self.quantizer.model_size()
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        self.opt.step()


def run_case(case: DiffQCase, device: torch.device, backend_names: list[str], *, repeats: int,
             warmup: int) -> Iterator[tuple[str, Timing, str]]:  # fmt: skip
    """Yield ``(variant, timing, note)`` for each variant (module doc)."""
    trainers = {"base": Trainer(case, device, None),
                "generic": Trainer(case, device, PerParamDiffQ)}  # fmt: skip
    for name in backend_names:
        impls = backends._load(name)[0] or {}
        if not all(op in impls for op in DIFFQ_OPS):
            continue  # e.g. triton: no DiffQ kernels
        trainers[f"diffq:{name}"] = Trainer(case, device, DiffQuantizer, name)
    fns = {name: t.step for name, t in trainers.items()}
    timings = measure_interleaved(fns, device=device, repeats=repeats, warmup=warmup)
    for name in fns:
        yield name, timings[name], ""
