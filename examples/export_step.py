"""The export step of the QAT demo (``examples/qat_digits.py``, SPEC.md §10).

After a quantized setting has trained, its model is written with
``parq.export.save_quantized`` (float16 levels, the default), the size report is
printed, and the file is loaded into a freshly built model, which is evaluated on the
same test images (float16 levels round each level once, so its accuracy is printed next
to the trained model's). A second file with float32 levels must reload bitwise, with the
same accuracy: that is asserted.
"""

from __future__ import annotations

import math
import tempfile
from pathlib import Path

import torch
from models import build_model

from parq.export import load_quantized, save_quantized, size_report


def _evaluate(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    model.eval()
    with torch.no_grad():
        return (model(x).argmax(1) == y).float().mean().item()


def export_and_reload(model, optimizer, label: str, args, x_test, y_test, test_acc: float,
                      out_dir: Path | None, make_model=None, evaluate=None) -> dict:  # fmt: skip
    """Save, report, reload, re-evaluate; returns the figures for the results JSON.
    ``make_model()`` builds the fresh model (default: ``args.model`` as built by
    :func:`models.build_model`), ``evaluate(model, x, y)`` measures it (default: the
    plain test accuracy)."""
    evaluate = evaluate or _evaluate
    slug = label.replace(" ", "_")
    with tempfile.TemporaryDirectory() as tmp:
        where = Path(out_dir) if out_dir is not None else Path(tmp)
        path = where / f"qat_digits_{args.model}_{slug}.safetensors"
        result = save_quantized(path, model, optimizer)  # float16 levels
        report = size_report(model, optimizer)
        if make_model is None:
            fresh = build_model(args.model, num_classes=10, in_channels=1).to(args.device)
        else:
            fresh = make_model()
        load_quantized(path, fresh)
        reloaded_acc = evaluate(fresh, x_test, y_test)
        diff = 0.0
        for a, b in zip(fresh.parameters(), model.parameters(), strict=True):
            a, b = a.detach().float(), b.detach().float()
            diff = max(diff, float(((a - b).abs() / b.abs().clamp_min(1e-30)).max()))
        exact = where / f"qat_digits_{args.model}_{slug}_fp32levels.safetensors"
        save_quantized(exact, model, optimizer, levels_dtype=torch.float32)
        load_quantized(exact, fresh)
        pairs = zip(fresh.state_dict().values(), model.state_dict().values(), strict=True)
        bitwise = all(torch.equal(a, b) for a, b in pairs)
        exact_acc = evaluate(fresh, x_test, y_test)
    print(f"\n== packed export: {label} ==\n{report}")
    print(
        f"reloaded into a fresh model: test acc {reloaded_acc:.4f} (trained model "
        f"{test_acc:.4f}); weights within float16 rounding of the levels (max relative "
        f"difference {diff:.2e}); with float32 levels: "
        f"{'bitwise equal' if bitwise else 'NOT bitwise equal'}, test acc {exact_acc:.4f}"
    )
    if not bitwise or exact_acc != test_acc or result.max_moved > 0:
        raise AssertionError(f"{label}: the packed model differs from the trained one "
                             f"(bitwise={bitwise}, acc {exact_acc} vs {test_acc}, "
                             f"moved={result.max_moved})")  # fmt: skip
    return {
        "float32_bytes": report.float32_bytes,
        "packed_file_bytes": report.file_bytes,
        "quantized_weights": report.quantized_numel,
        "packed_weight_bytes": report.packed_bytes,
        "bits_per_weight": report.bits_per_weight,
        "zlib_bytes": report.zlib_bytes,
        "levels_dtype": report.levels_dtype,
        "reloaded_test_acc": reloaded_acc,
        "max_rel_weight_diff": diff,
        "bitwise_with_float32_levels": bitwise,
    }


def export_table(results: list[dict]) -> str:
    """Markdown table of the packed exports (the settings that have one)."""
    rows = [r for r in results if r.get("export")]
    if not rows:
        return ""
    lines = [
        "| setting | float32 model B | packed file B | bits / weight (levels incl.) | zlib B "
        "| test acc trained -> reloaded |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        e = r["export"]
        ratio = e["float32_bytes"] / e["packed_file_bytes"] if e["packed_file_bytes"] else math.nan
        lines.append(
            f"| {r['setting']} | {e['float32_bytes']} | {e['packed_file_bytes']} ({ratio:.1f}x "
            f"smaller) | {e['bits_per_weight']:.3f} | {e['zlib_bytes']} | {r['test_acc']:.4f} -> "
            f"{e['reloaded_test_acc']:.4f} |"
        )
    return "\n".join(lines)
