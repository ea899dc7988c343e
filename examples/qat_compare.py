"""``qat_digits.py --compare``: every QAT method at one bit width, a table and a chart.

Trains, from the same initialization and data order: full precision, STE (hard
quantization after every step, the latent kept: the straight-through estimator),
BinaryRelax, PARQ, ProxQuant (l1, lambda growing per epoch, lr-scaled) and BinaryConnect
(hard weights over clipped latents), with the quantizer of the first ``--quant-method``
at the first ``--quant-bits`` value. Writes
``<out>/qat_compare_<model>_<bits>_<date>.{md,json,png}``: the accuracy table, the
per-epoch test accuracy, and a chart (final accuracy per method; test accuracy over
epochs). Without matplotlib the chart is skipped with a note.
"""

from __future__ import annotations

import argparse
import datetime
import json
import sys
from pathlib import Path
from types import ModuleType

from benchmarks.cli_checks import optional_module

#: (prox map of qat_digits, label in the table and chart)
METHODS = [
    ("hard", "STE (hard)"),
    ("binaryrelax", "BinaryRelax"),
    ("parq", "PARQ"),
    ("proxquant", "ProxQuant"),
    ("binaryconnect", "BinaryConnect"),
]


def settings(demo: ModuleType, bits: int, method: str) -> list[tuple[object, str]]:
    """``[(Setting, label)]``: full precision first, then every prox map of :data:`METHODS`."""
    runs = [(demo.Setting(), "FP32")]
    return runs + [(demo.Setting(bits, method, prox), label) for prox, label in METHODS]


def table(results: list[dict], bits_label: str) -> str:
    """Markdown: final test accuracy per method, its difference from FP, best epoch."""
    fp = next(r["test_acc"] for r in results if r["bits"] is None)
    lines = [
        f"| method ({bits_label}) | test acc | vs FP (points) | best epoch acc | train acc "
        "| levels used / K | train s |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in results:
        delta = "-" if r["bits"] is None else f"{100 * (r['test_acc'] - fp):+.1f}"
        lv = "-" if r["levels"] is None else f"{r['levels_used']} / {r['levels']}"
        best = max(r["epoch_test_acc"]) if r["epoch_test_acc"] else r["test_acc"]
        lines.append(
            f"| {r['label']} | {r['test_acc']:.4f} | {delta} | {best:.4f} | "
            f"{r['train_acc']:.4f} | {lv} | {r['train_s']:.1f} |"
        )
    return "\n".join(lines)


def chart(results: list[dict], title: str, path: Path) -> bool:
    """Bar chart of the final test accuracy and lines of test accuracy per epoch."""
    matplotlib = optional_module("matplotlib", "no comparison chart")
    if matplotlib is None:
        return False
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4.5))
    labels = [r["label"] for r in results]
    accs = [100 * r["test_acc"] for r in results]
    bars = ax1.bar(range(len(labels)), accs, color=[f"C{i}" for i in range(len(labels))])
    ax1.set_xticks(range(len(labels)), labels, rotation=25, ha="right")
    ax1.set_ylabel("final test accuracy (%)")
    low = min(accs)
    ax1.set_ylim(max(0.0, low - 5), 100)
    for bar, acc in zip(bars, accs, strict=True):
        ax1.text(bar.get_x() + bar.get_width() / 2, acc, f"{acc:.1f}", ha="center", va="bottom")
    for i, r in enumerate(results):
        hist = [100 * a for a in r["epoch_test_acc"]]
        ax2.plot(range(1, len(hist) + 1), hist, label=r["label"], color=f"C{i}")
    ax2.set_xlabel("epoch")
    ax2.set_ylabel("test accuracy (%)")
    ax2.set_ylim(max(0.0, min(min(100 * a for a in r["epoch_test_acc"]) for r in results)), 100)
    ax2.legend(loc="lower right")
    ax2.grid(alpha=0.3)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def run(args: argparse.Namespace, argv: list[str] | None, tqdm, demo: ModuleType) -> int:
    """Train every method, print the table, write ``.md``, ``.json`` and ``.png``."""
    bits, method = args.quant_bits[0], args.quant_method[0]
    bits_label = "ternary" if bits == 0 else f"{bits}-bit"
    data = demo.load_data(args.seed, args.smoke)
    runs = settings(demo, bits, method)
    print(
        f"digits: {len(data[1])} train / {len(data[3])} test images, model {args.model}, "
        f"{args.epochs} epochs, {bits_label} {method}, {len(runs)} methods",
        flush=True,
    )
    results = []
    for s, label in runs:
        r = demo.train(s, data, args, tqdm)
        r["label"] = label
        results.append(r)
    text = table(results, f"{bits_label} {method}")
    print("\n" + text)
    date = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d")
    name = f"qat_compare_{args.model}_{bits_label}_{method}_{date}{'_smoke' if args.smoke else ''}"
    stem = args.out / name
    command = " ".join(sys.argv[1:] if argv is None else argv)
    title = (f"QAT on scikit-learn digits, {args.model}, {bits_label} {method}, "
             f"{args.epochs} epochs")  # fmt: skip
    drawn = chart(results, title, stem.with_suffix(".png"))
    stem.with_suffix(".md").write_text(
        f"{title} ({date}), command: `python examples/qat_digits.py {command}`\n\n" + text + "\n"
    )
    config = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
    stem.with_suffix(".json").write_text(
        json.dumps({"date_utc": date, "config": config, "results": results}, indent=2) + "\n"
    )
    print(f"\nwrote {stem}.{{md,json{',png' if drawn else ''}}}")
    return 0
