"""QAT demo: full precision vs PARQ quantization-aware training on scikit-learn digits.

The 1797 8x8 digit images of ``sklearn.datasets.load_digits`` (shipped with
scikit-learn, no download) are split 80/20 (stratified, ``--seed``), and a small
CNN (or ResNet-20) is trained once in full precision and once per QAT setting,
all from the same initialization. A QAT setting is one (bits, method, prox map)
of the cross product of ``--quant-bits``, ``--quant-method`` and
``--quant-proxmap``; the default run compares FP, 2-bit and ternary (0-bit)
LSBQ with the PARQ prox map, per channel, and then 2-bit weights with 8-bit and
with 4-bit activations (W2A8, W2A4).

Activations (``--act-bits``, default ``8 4``; ``--act-bits`` alone: none): each
value adds a setting with the weights of the first ``--quant-bits`` /
``--quant-method`` / ``--quant-proxmap`` value (quantized by PARQ, as above) and
the activations fake-quantized by ``parq.fakequant`` (the input image and every
conv + BN + ReLU output: asymmetric affine, bias-corrected EMA ranges; state
``QUANT_AWARE_TRAIN_ACT_ONLY`` while training, ``QUANT_EVAL_ACT_ONLY`` with
frozen ranges while evaluating). CNN only.

Quantized: every conv / linear weight (per channel by default; with
``--quant-block-size B`` the 2-D weights whose width B divides are quantized in
blocks of B). BatchNorm parameters and biases stay in full precision.

Schedules are in epochs (fractions allowed) and converted to optimizer steps:
the prox map anneals from ``--anneal-start`` to ``--anneal-end``, after which
weights are hard-quantized; ``--anneal-end`` must not exceed ``--epochs``, so
the evaluated model is quantized. ``--warmup-steps`` and ``--quant-period``
are in optimizer steps, as in ``QuantOptimizer``.

Each quantized model is then exported (``examples/export_step.py``): written as a
packed low-bit file with ``parq.export.save_quantized``, its size report printed,
and reloaded into a fresh model that is evaluated again (``--no-export`` skips it).

Writes the accuracy table to ``<out>/qat_digits_<model>_<date>.{md,json}``
(default ``benchmarks/results``).

Examples::

    python examples/qat_digits.py
    python examples/qat_digits.py --quant-bits 1 2 4 --quant-method uniform lsbq
    python examples/qat_digits.py --quant-bits 2 --quant-lsbq-optimal --quant-proxmap parq hard
    python examples/qat_digits.py --quant-bits 2 --quant-proxmap proxquant --reg-rate 0.5
    python examples/qat_digits.py --compare --quant-bits 1   # every method, table + chart
    python examples/qat_digits.py --no-fp --quant-bits 4 --act-bits 8 6 4 3

``--compare`` (:mod:`qat_compare`) trains FP, STE (hard), BinaryRelax, PARQ, ProxQuant and
BinaryConnect at the first ``--quant-bits`` value and writes the accuracy table and a chart.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

_ROOT = Path(__file__).resolve().parent.parent
try:
    import parq  # noqa: F401
except ImportError:  # running from a checkout that is not pip-installed
    sys.path.insert(0, str(_ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))
if str(_ROOT) not in sys.path:  # benchmarks.cli_checks: the checks shared with the benchmarks
    sys.path.append(str(_ROOT))

from export_step import export_and_reload, export_table  # noqa: E402
from models import ActQuantDigitsCNN, build_model  # noqa: E402
from qat_cli import (  # noqa: E402  (the demo's options: qat_cli.py)
    REFINE_ROUNDS,
    SMOKE_TRAIN_IMAGES,
    TEST_FRACTION,
    Setting,
    parse_args,
    settings,
)

from benchmarks.cli_checks import (  # noqa: E402
    optional_module,
)
from parq.fakequant import QModule, QModuleState, qmodule_state, set_qmodule_state  # noqa: E402
from parq.optim import (  # noqa: E402
    ProxBinaryConnect,
    ProxBinaryRelax,
    ProxHardQuant,
    ProxPARQ,
    ProxQuant,
    ProxSoftQuant,
    QuantOptimizer,
)
from parq.quant import (  # noqa: E402
    LSBQuantizer,
    TernaryThresholdQuantizer,
    TernaryUnifQuantizer,
    UnifQuantizer,
)
from parq_kernels import backends  # noqa: E402


def load_data(seed: int, smoke: bool) -> tuple[torch.Tensor, ...]:
    """``(x_train, y_train, x_test, y_test)``: standardized ``(N, 1, 8, 8)`` images."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    x = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0
    y = torch.tensor(digits.target, dtype=torch.long)
    idx_train, idx_test = train_test_split(
        range(len(y)), test_size=TEST_FRACTION, random_state=seed, stratify=digits.target
    )
    if smoke:
        idx_train = idx_train[:SMOKE_TRAIN_IMAGES]
    x_train, x_test = x[idx_train], x[idx_test]
    mean, std = x_train.mean(), x_train.std()
    return (x_train - mean) / std, y[idx_train], (x_test - mean) / std, y[idx_test]


def make_quantizer(s: Setting, optimal: bool):
    if s.method == "lsbq":
        return LSBQuantizer(optimal=optimal)
    if s.method == "lsbq-refined":
        return LSBQuantizer(refine_rounds=REFINE_ROUNDS)
    if s.method == "ternary-threshold":
        return TernaryThresholdQuantizer()
    return TernaryUnifQuantizer() if s.bits == 0 else UnifQuantizer()


def make_proxmap(s: Setting, start: int, end: int, steepness: float, args=None, epoch_steps=1):
    if s.proxmap == "hard":
        return ProxHardQuant()
    if s.proxmap == "binaryconnect":
        return ProxBinaryConnect()
    if s.proxmap == "proxquant":
        reg = 2.0 if args is None else args.reg_rate
        return ProxQuant(reg, anneal_start=start, anneal_end=end, steps_per_epoch=epoch_steps)
    if s.proxmap == "soft":
        return ProxSoftQuant(start, end)
    if s.proxmap == "binaryrelax":
        return ProxBinaryRelax(start, end)
    return ProxPARQ(start, end, steepness=steepness)


def param_groups(model: torch.nn.Module, s: Setting, args: argparse.Namespace) -> list[dict]:
    weights, blocked, other = [], [], []
    block = args.quant_block_size
    for p in model.parameters():
        if p.dim() < 2:
            other.append(p)
        elif block is not None and p.dim() == 2 and p.size(-1) % block == 0:
            blocked.append(p)
        else:
            weights.append(p)
    groups = [{"params": other, "weight_decay": 0.0}]
    if s.bits is None:
        return groups + [{"params": weights + blocked}]
    if weights:
        groups.append({"params": weights, "quant_bits": s.bits})
    if blocked:
        groups.append({"params": blocked, "quant_bits": s.bits, "quant_block_size": block})
    return groups


def freeze_step(args: argparse.Namespace, steps_per_epoch: int) -> int | None:
    """``--freeze-epoch`` in optimizer steps (at least ``--warmup-steps``), or None."""
    if getattr(args, "freeze_epoch", None) is None:
        return None
    return max(args.warmup_steps, round(args.freeze_epoch * steps_per_epoch))


def evaluate(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    """Test accuracy; fake-quantized activations with their ranges frozen."""
    model.eval()
    quantized = any(isinstance(m, QModule) for m in model.modules())
    frozen = qmodule_state(model, QModuleState.QUANT_EVAL_ACT_ONLY) if quantized else None
    with torch.no_grad(), frozen or contextlib.nullcontext():
        acc = (model(x).argmax(1) == y).float().mean().item()
    model.train()
    return acc


def observed(model: torch.nn.Module, x: torch.Tensor) -> torch.nn.Module:
    """``model`` after one forward, so that its activation observers hold ranges (of the
    shape a trained model's have; a file's values then overwrite them)."""
    if any(isinstance(m, QModule) for m in model.modules()):
        with torch.no_grad():
            model(x[:2])
    return model


def max_levels_used(opt: torch.optim.Optimizer) -> tuple[int, int]:
    """``(most distinct values in one quantization group, K)`` over the quantized weights."""
    most, k = 0, 0
    for group in opt.regularized_param_groups():
        for p in group["params"]:
            Q = opt.state[p].get("quants")
            if Q is None:  # quantization has not started (still in warmup)
                continue
            k = max(k, Q.size(-1))
            rows = p.detach().reshape(Q.size(0) if Q.dim() == 2 else 1, -1)
            most = max(most, max(len(torch.unique(r)) for r in rows))
    return most, k


def train(s: Setting, data: tuple[torch.Tensor, ...], args: argparse.Namespace, tqdm=None) -> dict:
    """Train one setting; ``tqdm`` (the module) draws a bar, else, unless
    ``--no-progress``, one plain line per epoch goes to stderr."""
    x_train, y_train, x_test, y_test = (t.to(args.device) for t in data)
    torch.manual_seed(args.seed)

    def make_model() -> torch.nn.Module:
        model = build_model(args.model, num_classes=10, in_channels=1).to(args.device)
        if s.act_bits is not None:  # the same modules, activations fake-quantized
            model = ActQuantDigitsCNN(model, s.act_bits).to(args.device)
            set_qmodule_state(model, QModuleState.QUANT_AWARE_TRAIN_ACT_ONLY)
        return model

    model = make_model()
    steps_per_epoch = -(-len(y_train) // args.batch_size)
    total = steps_per_epoch * args.epochs
    base = torch.optim.AdamW(param_groups(model, s, args), lr=args.lr,
                             weight_decay=args.weight_decay)  # fmt: skip
    opt = base
    if s.bits is not None:
        start = round(args.anneal_start * steps_per_epoch)
        end = max(start + 1, round(args.anneal_end * steps_per_epoch))
        opt = QuantOptimizer(
            base,
            make_quantizer(s, args.quant_lsbq_optimal),
            make_proxmap(s, start, end, args.anneal_steepness, args, steps_per_epoch),
            warmup_steps=args.warmup_steps,
            quant_period=args.quant_period,
            quant_per_channel=args.quant_per_channel,
            backend=None if args.backend == "auto" else args.backend,
            freeze_step=freeze_step(args, steps_per_epoch),
        )
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(base, T_max=total)
    gen = torch.Generator().manual_seed(args.seed)
    bar = None
    if tqdm is not None and not args.no_progress:
        bar = tqdm.tqdm(total=args.epochs, desc=f"{s.label:>24}", unit="epoch", file=sys.stderr)
    t0 = time.perf_counter()
    history = []
    for epoch in range(args.epochs):
        order = torch.randperm(len(y_train), generator=gen).to(args.device)
        for i in range(0, len(order), args.batch_size):
            idx = order[i : i + args.batch_size]
            loss = F.cross_entropy(model(x_train[idx]), y_train[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
        history.append(evaluate(model, x_test, y_test))
        if bar is not None:
            acc = history[-1]
            bar.set_postfix(loss=f"{loss.item():.3f}", test_acc=f"{acc:.3f}")
            bar.update(1)
        elif not args.no_progress:
            acc = history[-1]
            print(
                f"{s.label:>24} epoch {epoch + 1}/{args.epochs} loss {loss.item():.3f} "
                f"test_acc {acc:.3f}",
                file=sys.stderr,
                flush=True,
            )
    seconds = time.perf_counter() - t0
    if bar is not None:
        bar.close()
    result = {
        "setting": s.label,
        "bits": s.bits,
        "method": s.method if s.bits is not None else None,
        "proxmap": s.proxmap if s.bits is not None else None,
        "act_bits": s.act_bits,
        "test_acc": evaluate(model, x_test, y_test),
        "train_acc": evaluate(model, x_train, y_train),
        "steps": total,
        "train_s": seconds,
        "backend": None,
        "levels_used": None,
        "levels": None,
        "epoch_test_acc": history,
    }
    if s.bits is not None:
        result["backend"] = backends.resolve(args.device, opt.backend)
        result["levels_used"], result["levels"] = max_levels_used(opt)
        if not args.no_export:  # packed low-bit file, size report, reload (SPEC.md §10)
            result["export"] = export_and_reload(model, opt, s.label, args, x_test, y_test,
                                                 result["test_acc"], args.export_dir,
                                                 lambda: observed(make_model(), x_test),
                                                 evaluate)  # fmt: skip
    return result


def table(results: list[dict]) -> str:
    """Markdown table: test accuracy per setting and its difference from FP."""
    fp = next((r["test_acc"] for r in results if r["bits"] is None), None)
    lines = [
        "| setting | test acc | vs FP (points) | train acc | levels used / K | steps | train s |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in results:
        delta = "-" if fp is None or r["bits"] is None else f"{100 * (r['test_acc'] - fp):+.1f}"
        lv = "-" if r["levels"] is None else f"{r['levels_used']} / {r['levels']}"
        lines.append(
            f"| {r['setting']} | {r['test_acc']:.4f} | {delta} | {r['train_acc']:.4f} | {lv} "
            f"| {r['steps']} | {r['train_s']:.1f} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    tqdm = None if args.no_progress else optional_module("tqdm", "plain progress lines")
    torch.set_num_threads(args.threads)
    if args.compare:
        import qat_compare

        return qat_compare.run(args, argv, tqdm, sys.modules[__name__])
    data = load_data(args.seed, args.smoke)
    runs = settings(args)
    print(
        f"digits: {len(data[1])} train / {len(data[3])} test images, model {args.model}, "
        f"{args.epochs} epochs, {len(runs)} settings, per-channel={args.quant_per_channel}",
        flush=True,
    )
    results = [train(s, data, args, tqdm) for s in runs]
    text = table(results)
    packed = export_table(results)
    if packed:
        text += "\n\nPacked export (parq.export.save_quantized, float16 levels):\n\n" + packed
    print("\n" + text)
    date = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d")
    stem = args.out / f"qat_digits_{args.model}_{date}{'_smoke' if args.smoke else ''}"
    config = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
    stem.with_suffix(".md").write_text(
        f"QAT on scikit-learn digits ({date}), command: "
        f"`python examples/qat_digits.py {' '.join(sys.argv[1:] if argv is None else argv)}`\n\n"
        + text + "\n"
    )  # fmt: skip
    stem.with_suffix(".json").write_text(
        json.dumps({"date_utc": date, "config": config, "results": results}, indent=2) + "\n"
    )
    print(f"\nwrote {stem}.{{md,json}}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
