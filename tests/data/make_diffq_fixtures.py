"""Write the fixtures of ``tests/test_diffq_files.py`` (``tests/data/<case>.pt``): states
written by the public ``diffq`` 0.2.4 and the weights its own ``restore_quantized_state``
gives back.

Run in a scratch venv with diffq 0.2.4; not part of the test suite (parq never imports
diffq, which is CC-BY-NC)::

    python3 -m venv /tmp/diffq-venv
    /tmp/diffq-venv/bin/pip install torch==2.13.0 numpy==2.4.6 cython==3.3.2
    /tmp/diffq-venv/bin/pip install --no-deps --no-build-isolation diffq==0.2.4
    /tmp/diffq-venv/bin/python tests/data/make_diffq_fixtures.py

Each file holds one case: the float ``state_dict`` of the trained model (``float_state``),
diffq's quantized states (``states``: ``packed`` = ``get_quantized_state(packed=True)``,
``unpacked`` = ``packed=False``, ``torch_pack`` = ``packed=True, torch_pack=True``), and for
each the parameters that diffq's restore writes into a fresh model (``expected``;
``None`` where diffq's restore fails or gives back memory it never wrote, with the reason in
``diffq_notes``). diffq's restore is run as its module-level function runs it (build the
class from ``meta``, ``restore_quantized_state``, ``detach``); its ``detach`` raises for a
weight tied across two modules after the weights are written, which is noted and ignored.
The tests import :func:`build_model` from here (no diffq needed for that).
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from torch import nn

HERE = Path(__file__).resolve().parent
MIN_SIZE = 0.00025  # MB: parameters of more than 65 elements are quantized


class ConvNet(nn.Module):
    """Two convolutions with a batch norm, three linear layers, ``dec.weight`` tied to
    ``fc1.weight``: quantized 72 + 288 + 128 + 128 elements (groups of 8 divide each), 60
    small ones left in float."""

    def __init__(self, width: int = 8) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(2, 4, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(4)
        self.conv2 = nn.Conv2d(4, width, 3, padding=1)
        self.fc1 = nn.Linear(width, 16)
        self.fc2 = nn.Linear(16, 8)
        self.dec = nn.Linear(8, 16)
        if width == 8:
            self.dec.weight = self.fc1.weight  # (16, 8) both: tied, quantized once

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.bn1(self.conv1(x)))
        x = torch.relu(self.conv2(x)).mean((2, 3))
        x = torch.relu(self.fc2(torch.relu(self.fc1(x))))
        return self.dec(x)


def build_model(seed: int = 0, width: int = 8) -> ConvNet:
    """The fixtures' model, initialised from ``seed`` (``width != 8``: a mismatched one)."""
    torch.manual_seed(seed)
    return ConvNet(width)


def _train(model: nn.Module, quantizer, steps: int, penalty: float, qlr: float) -> None:
    """A few Adam steps on random data, the quantizer's own parameters at ``qlr``."""
    opt = torch.optim.Adam([p for n, p in model.named_parameters()
                            if not n.endswith(("_diffq", "_lsq"))], lr=1e-2)  # fmt: skip
    if quantizer is not None:
        quantizer.setup_optimizer(opt, lr=qlr)
    gen = torch.Generator().manual_seed(1)
    model.train()
    for _ in range(steps):
        x = torch.randn(16, 2, 6, 6, generator=gen)
        y = torch.randn(16, 16, generator=gen)
        loss = nn.functional.mse_loss(model(x), y)
        if penalty:
            loss = loss + penalty * quantizer.model_size()
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()


def _spread_logits(quantizer, name: str, top: float) -> None:
    """Logits of parameter ``name`` whose bits cycle over 2 .. ``top`` (so levels of more
    than 8 bits are stored too)."""
    module = dict(quantizer.model.named_modules())[name]
    for qp in quantizer._qparams:
        if qp.other is None and qp.name == "weight" and qp.module is module:
            n = qp.logit.numel()
            bits = 2.2 + torch.arange(n).float() % (top - 1.5)
            t = (bits - quantizer.min_bits) / (quantizer.max_bits - quantizer.min_bits)
            with torch.no_grad():
                qp.logit.copy_(torch.logit(t.clamp(1e-4, 1 - 1e-4)))


def _restore_with_diffq(state: dict) -> tuple[dict | None, str]:
    """diffq's restore of ``state`` into a fresh model: (its parameters or None, note)."""
    model = build_model(seed=123)
    meta = state["meta"]
    quantizer = meta["klass"](model, **meta["init_kwargs"])
    note = ""
    try:
        quantizer.restore_quantized_state(state)
    except Exception as exc:  # recorded in the fixture
        return None, f"restore raised {exc!r}"
    try:
        quantizer.detach()
    except AttributeError as exc:
        note = f"detach raised {exc!r} after restoring (tied weight)"
    suffix = meta["init_kwargs"].get("suffix", "_lsq" if "LSQ" in meta["klass"].__name__
                                     else "_diffq")  # fmt: skip
    params = model.named_parameters(remove_duplicate=False)  # tied: both names, one tensor
    return {k: v.detach() for k, v in params if not k.endswith(suffix)}, note


# fmt: off
CASES = {
    # name: (class name, constructor kwargs, train steps, penalty, logit lr, spread)
    "diffq_group8": ("DiffQuantizer", {"group_size": 8, "float16": True}, 8, 2.0, 0.5, 0),
    "diffq_group0": ("DiffQuantizer", {"group_size": 0, "init_bits": 5}, 4, 0.0, 0.1, 0),
    "diffq_15bits": ("DiffQuantizer", {"group_size": 8, "extra_bits": 1}, 0, 0.0, 0.0, 14),
    "uniform_bits6": ("UniformQuantizer", {"bits": 6}, 0, 0.0, 0.0, 0),
    "uniform_bits12": ("UniformQuantizer", {"bits": 12, "float16": True,
                                            "exclude": ["fc2.*"]}, 0, 0.0, 0.0, 0),
    "lsq_bits4": ("LSQ", {"bits": 4}, 6, 0.0, 1e-2, 0),
}
# fmt: on


def _share_equal(expected: dict) -> None:
    """Where two variants' expected tensors are equal, keep one object (saved once)."""
    first: dict = {}
    for sd in expected.values():
        for key, value in (sd or {}).items():
            seen = first.setdefault(key, value)
            if seen.dtype == value.dtype and torch.equal(seen, value):
                sd[key] = seen


def make_case(name: str) -> dict:
    import diffq  # only in the scratch venv

    klass_name, kwargs, steps, penalty, qlr, spread = CASES[name]
    model = build_model()
    _train(model, None, 3, 0.0, 0.0)  # float pre-training: weights away from the init
    quantizer = getattr(diffq, klass_name)(model, min_size=MIN_SIZE, **kwargs)
    if steps:
        _train(model, quantizer, steps, penalty, qlr)
    if spread:  # diffq_15bits: extra_bits=1 turns the spread's 14.2 into 15
        _spread_logits(quantizer, "conv2", spread)
    suffix = "_lsq" if klass_name == "LSQ" else "_diffq"
    float_state = {k: v for k, v in model.state_dict().items()
                   if not k.endswith(suffix)}  # fmt: skip
    states, expected, notes = {}, {}, {}
    for variant, args in (("packed", {"packed": True}), ("unpacked", {"packed": False}),
                          ("torch_pack", {"packed": True, "torch_pack": True})):  # fmt: skip
        try:
            states[variant] = quantizer.get_quantized_state(**args)
        except Exception as exc:  # recorded in the fixture
            notes[variant] = f"get_quantized_state raised {exc!r}"
            continue
        expected[variant], notes[variant] = _restore_with_diffq(states[variant])
    if klass_name == "DiffQuantizer":
        bits = torch.cat([s[2] for s in states["unpacked"]["quantized"]])
        for variant in ("packed", "torch_pack"):
            if expected.get(variant) is not None and bits.eq(15).any():
                expected[variant] = None  # levels of 15-bit groups are never written
                notes[variant] = "15-bit groups: diffq restores uninitialised memory"
        print(name, "bits", torch.bincount(bits.long(), minlength=16).tolist())
    _share_equal(expected)
    return {"case": name, "diffq_version": diffq.__version__,
            "torch_version": str(torch.__version__), "float_state": float_state,
            "states": states, "expected": expected, "diffq_notes": notes}  # fmt: skip


def main() -> None:
    for name in sys.argv[1:] or CASES:
        case = make_case(name)
        torch.save(case, HERE / f"{name}.pt")
        size = (HERE / f"{name}.pt").stat().st_size
        print(name, f"{size} bytes", {k: v for k, v in case["diffq_notes"].items() if v})


if __name__ == "__main__":
    main()
