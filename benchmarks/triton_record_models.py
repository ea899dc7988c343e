"""Record the Triton launches of the headline and model-shaped parameter sets, for the
ahead-of-time build (``python -m benchmarks.triton_record_models``; issue 21).

The test-suite recording (:mod:`benchmarks.triton_record`) has the tests' shapes; the
planner gives the benchmark's sets other tiles (8 x Linear(1024, 1024): 4 x 1024; the
ResNet / ViT / Llama sets: 8 x 512, 16 x 256, 16 x 32, 16 x 64, 2 x 2048, 64 x 64, ...).
This runs ``QuantOptimizer`` steps with the Triton backend under the interpreter (GPU tile
sizes) on one parameter per distinct tile of those sets (as many rows as one tile holds,
the set's own columns), over 2-bit uniform and LSBQ and 4-bit MaxUnif, SGD-momentum / AdamW,
PARQ / hard, per channel / per tensor, fp32 / bf16, level updates and steps between, and
writes the distinct launches as JSON for ``python -m benchmarks.triton_aot --launches``.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

DEFAULT_OUT = Path("benchmarks/results/triton_launches_models.json")


def model_params(specs: list, device: str = "cpu") -> list:
    """One (rows, cols) tensor per distinct tile of a set (GPU plan sizes): the planner
    sizes a tile's rows by the set's tallest parameter of that block width."""
    import torch

    from parq_kernels.triton import plan

    full = []
    for s in specs:
        shape = getattr(s, "shape", ())
        if len(shape) >= 2 and getattr(s, "quantized", True):
            cols = 1
            for d in shape[1:]:
                cols *= d
            full.append(torch.empty(shape[0], cols, device="meta"))
    tiles = plan.tile_shape(full) if full else []
    seen, out = set(), []
    for meta, tile in zip(full, tiles, strict=True):
        if tile in seen:
            continue
        seen.add(tile)
        out.append(torch.randn(tile[0], meta.size(1), device=device) * 0.05)  # one tile tall
    return out


def run_steps() -> None:
    from benchmarks import shapes

    sets = {"8xLinear1024": shapes.linear_stack(), "resnet20": shapes.resnet20(),
            "resnet50": shapes.resnet50(), "vit_b16": shapes.vit_b16(),
            "llama_1b": shapes.llama_1b()}  # fmt: skip
    for name, specs in sets.items():
        print(f"{name}:", flush=True)
        _run_set(model_params(specs))


def _run_set(base_weights: list) -> None:
    import itertools

    import torch

    from parq.optim import ProxHardQuant, ProxPARQ, QuantOptimizer
    from parq.quant import LSBQuantizer, MaxUnifQuantizer, UnifQuantizer

    quantizers = {
        "uniform2": (UnifQuantizer, 2),
        "lsbq2": (LSBQuantizer, 2),
        "maxunif4": (MaxUnifQuantizer, 4),
    }  # the headline's and the 4-bit recipe's
    grid = itertools.product(quantizers, (torch.float32, torch.bfloat16), ("sgd", "adamw"),
                             ("parq", "hard"), (True, False))  # fmt: skip
    for qname, dtype, optim, prox, per_channel in grid:
        make_quantizer, bits = quantizers[qname]
        ps = [torch.nn.Parameter(w.to(dtype)) for w in base_weights]
        group = [{"params": ps, "quant_bits": bits}]
        base = (torch.optim.SGD(group, lr=0.01, momentum=0.9) if optim == "sgd"
                else torch.optim.AdamW(group, lr=1e-3))  # fmt: skip
        pm = ProxPARQ(0, 100) if prox == "parq" else ProxHardQuant()
        opt = QuantOptimizer(base, make_quantizer(), pm, quant_period=2,
                             quant_per_channel=per_channel, backend="triton")  # fmt: skip
        for _ in range(2):  # a level update, then a step between
            for p in ps:
                p.grad = torch.randn_like(p) * 0.01
            opt.step()
    print(f"  {len(quantizers) * 16} option sets: ok", flush=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="launches JSON")
    args = parser.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET") != "1":
        parser.error("run under the Triton interpreter: TRITON_INTERPRET=1")
    from benchmarks import triton_record

    triton_record.install()
    run_steps()
    n = triton_record.write(args.out)
    print(f"{n} distinct launches -> {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
