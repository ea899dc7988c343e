"""Tiny models, data and quantizer / prox-map grids for the foundation tests.

Shared by ``test_optimizer.py`` and ``test_resume.py``; everything is small so
that a full training run costs a few milliseconds on CPU.
"""

from __future__ import annotations

import pytest
import torch
from torch import Tensor, nn

from parq.optim import ProxBinaryRelax, ProxHardQuant, ProxPARQ, ProxSoftQuant, QuantOptimizer
from parq.quant import (
    AsymUnifQuantizer,
    LSBQuantizer,
    MaxUnifQuantizer,
    TernaryThresholdQuantizer,
    TernaryUnifQuantizer,
    UnifQuantizer,
)


@pytest.fixture(autouse=True)
def one_thread():
    """Run on one intra-op thread: tiny tensors on a shared 2-core machine are
    several times faster without OpenMP hand-offs. Import it into a test module
    to make it autouse there."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(autouse=True)
def reference_backend(monkeypatch):
    """The fused path runs on the reference backend (the ground truth of SPEC.md),
    whatever compiled backend is built: these tests compare it bitwise with the
    generic path. Backends are compared with the reference elsewhere."""
    monkeypatch.setenv("PARQ_KERNELS_BACKEND", "reference")


# (id, quantizer factory, bits, K)
QUANTIZERS = [
    ("unif-b2", lambda: UnifQuantizer(), 2, 4),
    ("unif-center-b3", lambda: UnifQuantizer(center=True), 3, 8),
    ("maxunif-b2", lambda: MaxUnifQuantizer(), 2, 3),
    ("ternunif-b0", lambda: TernaryUnifQuantizer(), 0, 3),
    ("asym-b2", lambda: AsymUnifQuantizer(), 2, 4),
    ("lsbq-b1", lambda: LSBQuantizer(), 1, 2),
    ("lsbq-b3", lambda: LSBQuantizer(), 3, 8),
    ("lsbq-ternary-b0", lambda: LSBQuantizer(), 0, 3),
    ("lsbq-opt-b0", lambda: LSBQuantizer(optimal=True), 0, 3),
    ("lsbq-opt-b2", lambda: LSBQuantizer(optimal=True), 2, 4),
    ("thr-ternary-b0", lambda: TernaryThresholdQuantizer(), 0, 3),
]

ANNEAL_START, ANNEAL_END = 1, 4

PROX_MAPS = [
    ("hard", lambda: ProxHardQuant()),
    ("soft", lambda: ProxSoftQuant(ANNEAL_START, ANNEAL_END)),
    ("parq", lambda: ProxPARQ(ANNEAL_START, ANNEAL_END)),
    ("relax", lambda: ProxBinaryRelax(ANNEAL_START, ANNEAL_END)),
]


class TinyMLP(nn.Module):
    def __init__(self, dtype: torch.dtype = torch.float32) -> None:
        super().__init__()
        self.fc1 = nn.Linear(6, 8, dtype=dtype)
        self.fc2 = nn.Linear(8, 3, dtype=dtype)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(torch.tanh(self.fc1(x)))


class TinyCNN(nn.Module):
    def __init__(self, dtype: torch.dtype = torch.float32) -> None:
        super().__init__()
        self.conv = nn.Conv2d(2, 4, 3, dtype=dtype)
        self.fc = nn.Linear(4 * 3 * 3, 3, dtype=dtype)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(torch.relu(self.conv(x)).flatten(1))


def make_model(kind: str, seed: int = 0, dtype: torch.dtype = torch.float32) -> nn.Module:
    torch.manual_seed(seed)
    return TinyMLP(dtype) if kind == "mlp" else TinyCNN(dtype)


def make_batches(kind: str, steps: int, seed: int = 1, dtype=torch.float32) -> list:
    g = torch.Generator().manual_seed(seed)
    shape = (5, 6) if kind == "mlp" else (5, 2, 5, 5)
    return [
        (torch.randn(shape, generator=g).to(dtype), torch.randint(0, 3, (5,), generator=g))
        for _ in range(steps)
    ]


def split_params(model: nn.Module) -> tuple[list[Tensor], list[Tensor]]:
    """(weights of dim > 1, the rest): the usual PARQ grouping."""
    weights = [p for p in model.parameters() if p.dim() > 1]
    others = [p for p in model.parameters() if p.dim() <= 1]
    return weights, others


def param_groups(model: nn.Module, bits: int, **extra) -> list[dict]:
    weights, others = split_params(model)
    return [{"params": weights, "quant_bits": bits, **extra}, {"params": others}]


def train_step(model: nn.Module, opt, batch, closure: bool = False):
    x, y = batch

    def loss_fn():
        opt.zero_grad()
        loss = nn.functional.cross_entropy(model(x).float(), y)
        loss.backward()
        return loss

    if closure:
        return opt.step(loss_fn)
    loss = loss_fn()
    opt.step()
    return loss


def build(
    kind: str,
    quantizer,
    prox_map,
    bits: int,
    base: str = "sgd",
    seed: int = 0,
    dtype=torch.float32,
    group_extra: dict | None = None,
    **opt_kwargs,
):
    """(model, QuantOptimizer) for a tiny model; ``base`` is "sgd" or "adamw"."""
    model = make_model(kind, seed, dtype)
    groups = param_groups(model, bits, **(group_extra or {}))
    if base == "sgd":
        base_opt = torch.optim.SGD(groups, lr=0.1, momentum=0.9, weight_decay=1e-3)
    elif base == "adam":
        base_opt = torch.optim.Adam(groups, lr=0.01)
    else:
        base_opt = torch.optim.AdamW(groups, lr=0.01, weight_decay=1e-2)
    opt_kwargs.setdefault("quant_period", 2)
    return model, QuantOptimizer(base_opt, quantizer, prox_map, **opt_kwargs)


def snapshot(model: nn.Module, opt) -> dict:
    """Deep copies of every parameter and every optimizer state tensor."""
    out = {f"param:{n}": p.detach().clone() for n, p in model.named_parameters()}
    for i, p in enumerate(model.parameters()):
        for key, value in opt.state[p].items() if p in opt.state else []:
            if torch.is_tensor(value):
                out[f"state:{i}:{key}"] = value.detach().clone()
    return out


def assert_bitwise_equal(a: dict, b: dict) -> None:
    assert a.keys() == b.keys(), (sorted(a), sorted(b))
    for key in a:
        x, y = a[key], b[key]
        assert x.dtype == y.dtype and x.shape == y.shape, key
        assert torch.equal(x, y), f"{key}: max diff {(x.float() - y.float()).abs().max()}"


def rows_of(p: Tensor, per_channel: bool, block_size: int | None = None) -> Tensor:
    """The quantization groups of ``p`` as rows (SPEC.md §2)."""
    x = p.detach().float()
    if block_size is not None:
        x = x.reshape(-1, block_size)
        return x if per_channel else x.reshape(1, -1)
    if per_channel and p.dim() > 1:
        return x.reshape(p.size(0), -1)
    return x.reshape(1, -1)


def assert_on_levels(p: Tensor, Q: Tensor, K: int, per_channel: bool, block=None) -> None:
    """Every row of ``p`` takes at most K distinct values, all from its row of Q."""
    rows = rows_of(p, per_channel, block)
    Q_rows = Q.reshape(rows.size(0), -1) if Q.dim() == 2 else Q.reshape(1, -1)
    assert Q_rows.size(1) == K
    for r in range(rows.size(0)):
        vals = rows[r].unique()
        assert vals.numel() <= K
        assert torch.isin(vals, Q_rows[r]).all(), (vals, Q_rows[r])


def quant_opt(base_opt, quantizer, prox_map, **kw) -> QuantOptimizer:
    return QuantOptimizer(base_opt, quantizer, prox_map, **kw)
