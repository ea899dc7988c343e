"""DiffQ demo: accuracy vs true model size on scikit-learn digits, next to PARQ.

The digits CNN (``examples/models.py``) is trained with ``parq.diffq.DiffQuantizer``
(learned bit widths, one per group of ``--group-size`` weights) at each penalty of
``--penalties``: ``loss = cross_entropy + penalty * model_size()`` (MB). The conv /
linear weights are quantized (BatchNorm parameters and biases stay float32, as in
``qat_digits.py``). Each model is evaluated with its true quantized weights and its
true size (``true_model_size()``); the curve is shown next to PARQ's 2-bit and
ternary points of the latest ``benchmarks/results/qat_digits_cnn_*.json`` (written by
``examples/qat_digits.py``, same data split, model, epochs and seed), whose size is the
packed export's: ``w = ceil(log2 K)`` bits per weight, ``K`` float16 levels per channel,
the rest float32.

Writes ``<out>/diffq_digits_<date>.{md,json,png}`` (default ``benchmarks/results``; the
chart needs matplotlib). ``--smoke``: 2 epochs on 512 images, two penalties.

Examples::

    python examples/diffq_digits.py
    python examples/diffq_digits.py --penalties 0 5 50 --group-size 16
"""

from __future__ import annotations

import argparse
import datetime
import itertools
import json
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(Path(__file__).resolve().parent))
if str(_ROOT) not in sys.path:
    sys.path.insert(0, str(_ROOT))

from models import build_model  # noqa: E402
from qat_digits import evaluate, load_data  # noqa: E402

from benchmarks.cli_checks import check_out_dir, finite_float  # noqa: E402
from parq.diffq import DiffQuantizer  # noqa: E402

PENALTIES = (0.0, 2.0, 10.0, 50.0, 200.0, 1000.0)
MB = 2**23  # bits
MIN_BITS, MAX_BITS = 2, 15  # DiffQuantizer's defaults, which train() uses
MARKERS = "s^Dv<>pP*Xh"  # one per PARQ / FP32 point (cycled beyond)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--penalties", type=finite_float, nargs="+", default=list(PENALTIES),
                   help="size penalties (per MB) to train with")  # fmt: skip
    p.add_argument("--epochs", type=int, default=20)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--lr", type=finite_float, default=2e-3,
                   help="AdamW learning rate of the weights")  # fmt: skip
    p.add_argument("--lr-logits", type=finite_float, default=5e-2,
                   help="learning rate of the logits")  # fmt: skip
    p.add_argument("--group-size", type=int, default=8,
                   help="weights per learned bit width (0: one per tensor)")  # fmt: skip
    p.add_argument("--init-bits", type=finite_float, default=8.0,
                   help=f"initial bits, in [{MIN_BITS}, {MAX_BITS}]")  # fmt: skip
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (>= 1)")
    p.add_argument("--smoke", action="store_true", help="2 epochs, 512 images, 2 penalties")
    p.add_argument(
        "--out",
        type=Path,
        default=_ROOT / "benchmarks" / "results",
        help="directory for the table, JSON and chart (default benchmarks/results)",
    )
    args = p.parse_args(argv)
    check_args(p, args)
    if args.smoke:
        args.epochs, args.penalties = 2, args.penalties[:1] + args.penalties[-1:]
    return args


def check_args(p: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Reject bad values with argparse's message naming the argument (exit 2), before any
    work (``qat_cli.check_args`` is the model)."""
    if any(x < 0 for x in args.penalties):
        p.error("--penalties must be finite and >= 0")
    for name in ("epochs", "batch_size", "threads"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.group_size < 0:
        p.error(f"--group-size must be >= 0 (0: one group per tensor), got {args.group_size}")
    for name in ("lr", "lr_logits"):
        if not getattr(args, name) > 0:
            p.error(f"--{name.replace('_', '-')} must be > 0, got {getattr(args, name)}")
    if not MIN_BITS <= args.init_bits <= MAX_BITS:
        p.error(f"--init-bits must be in [{MIN_BITS}, {MAX_BITS}] (DiffQuantizer's min_bits, "
                f"max_bits), got {args.init_bits}")  # fmt: skip
    check_out_dir(p, args.out)


def train(penalty: float, data: tuple[torch.Tensor, ...], args: argparse.Namespace) -> dict:
    x_train, y_train, x_test, y_test = data
    torch.manual_seed(args.seed)
    model = build_model("cnn", num_classes=10, in_channels=1)
    quantizer = DiffQuantizer(model, min_size=0, group_size=args.group_size,
                              init_bits=args.init_bits, exclude=["bn*", "bias"])  # fmt: skip
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=1e-4)
    quantizer.setup_optimizer(opt, lr=args.lr_logits)
    steps = -(-len(y_train) // args.batch_size) * args.epochs
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=steps)
    gen = torch.Generator().manual_seed(args.seed)
    t0 = time.perf_counter()
    for _ in range(args.epochs):
        order = torch.randperm(len(y_train), generator=gen)
        for i in range(0, len(order), args.batch_size):
            idx = order[i : i + args.batch_size]
            loss = F.cross_entropy(model(x_train[idx]), y_train[idx])
            loss = loss + penalty * quantizer.model_size()
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
    seconds = time.perf_counter() - t0
    bits = torch.cat([b.reshape(-1) for b in quantizer.get_bits().values()])
    true_bits = bits.round().clamp(1, 15)
    return {"method": "DiffQ", "penalty": penalty, "test_acc": evaluate(model, x_test, y_test),
            "true_size_kb": quantizer.true_model_size() * 1024,
            "mean_bits": float(true_bits.mean()), "min_bits": int(true_bits.min()),
            "max_bits": int(true_bits.max()), "steps": steps, "train_s": seconds}  # fmt: skip


def parq_size_kb(bits: int) -> float:
    """Packed-export size of the digits CNN quantized by PARQ per channel (module doc)."""
    K = 3 if bits == 0 else 2**bits
    width = (K - 1).bit_length()
    total = 0
    for p in build_model("cnn", num_classes=10, in_channels=1).parameters():
        total += width * p.numel() + 16 * K * p.size(0) if p.dim() >= 2 else 32 * p.numel()
    return total / MB * 1024


def parq_points() -> tuple[list[dict], str | None]:
    """PARQ's and FP32's points from the latest committed qat_digits_cnn_*.json."""
    files = sorted(p for p in (_ROOT / "benchmarks" / "results").glob("qat_digits_cnn_*.json")
                   if "smoke" not in p.name)  # fmt: skip
    if not files:
        return [], None
    points = []
    for r in json.loads(files[-1].read_text())["results"]:
        if r["bits"] is None:
            size = sum(32 * p.numel() for p in build_model("cnn", 10, 1).parameters()) / MB
            points.append(
                {"method": "FP32", "test_acc": r["test_acc"], "true_size_kb": size * 1024}
            )
        elif r["method"] == "lsbq":
            points.append({"method": f"PARQ {r['setting']}", "test_acc": r["test_acc"],
                           "true_size_kb": parq_size_kb(r["bits"])})  # fmt: skip
    return points, files[-1].name


def table(results: list[dict], points: list[dict]) -> str:
    lines = ["| method | penalty | test acc | true size (KB) | bits mean [min, max] | train s |",
             "|---|---|---|---|---|---|"]  # fmt: skip
    for r in results:
        lines.append(f"| DiffQ | {r['penalty']:g} | {r['test_acc']:.4f} | {r['true_size_kb']:.2f} "
                     f"| {r['mean_bits']:.2f} [{r['min_bits']}, {r['max_bits']}] "
                     f"| {r['train_s']:.1f} |")  # fmt: skip
    for r in points:
        lines.append(
            f"| {r['method']} | - | {r['test_acc']:.4f} | {r['true_size_kb']:.2f} | - | - |"
        )
    return "\n".join(lines)


def chart(results: list[dict], points: list[dict], path: Path) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed: no chart (pip install matplotlib)", file=sys.stderr)
        return False
    fig, ax = plt.subplots(figsize=(6, 4))
    xs = [r["true_size_kb"] for r in results]
    ax.plot(xs, [r["test_acc"] for r in results], "o-", label="DiffQ (penalty sweep)")
    for r in results:
        ax.annotate(f"{r['penalty']:g}", (r["true_size_kb"], r["test_acc"]), fontsize=7,
                    textcoords="offset points", xytext=(3, 3))  # fmt: skip
    for r, marker in zip(points, itertools.cycle(MARKERS)):
        ax.plot([r["true_size_kb"]], [r["test_acc"]], marker, label=r["method"])
    ax.set_xscale("log")
    ticks = [t for t in (4, 5, 6, 8, 10, 15, 20, 30, 60) if min(xs) / 1.2 <= t <= 70]
    ax.set_xticks(ticks, [str(t) for t in ticks])
    ax.minorticks_off()
    ax.set_xlabel("true model size (KB)")
    ax.set_ylabel("test accuracy")
    ax.set_title("digits CNN: accuracy vs size")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    data = load_data(args.seed, args.smoke)
    t0 = time.perf_counter()
    results = []
    for penalty in args.penalties:
        results.append(train(penalty, data, args))
        r = results[-1]
        print(
            f"penalty {penalty:g}: test acc {r['test_acc']:.4f}, true size "
            f"{r['true_size_kb']:.2f} KB, mean bits {r['mean_bits']:.2f}",
            flush=True,
        )
    points, source = parq_points()
    text = table(results, points)
    print("\n" + text)
    date = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d")
    stem = args.out / f"diffq_digits_{date}{'_smoke' if args.smoke else ''}"
    command = " ".join(sys.argv[1:] if argv is None else argv)
    note = f"PARQ / FP32 points from `{source}`.\n\n" if source else ""
    stem.with_suffix(".md").write_text(
        f"DiffQ on scikit-learn digits ({date}), command: `python examples/diffq_digits.py "
        f"{command}`, group size {args.group_size}, {args.epochs} epochs.\n\n{note}{text}\n"
    )
    config = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
    stem.with_suffix(".json").write_text(json.dumps(
        {"date_utc": date, "config": config, "results": results, "parq": points,
         "parq_source": source, "total_s": time.perf_counter() - t0}, indent=2) + "\n")  # fmt: skip
    wrote = "md,json" + (",png" if chart(results, points, stem.with_suffix(".png")) else "")
    print(f"\nwrote {stem}.{{{wrote}}} in {time.perf_counter() - t0:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
