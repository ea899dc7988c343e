"""The QAT demo's new options: --compare (table + chart), ProxQuant / BinaryConnect,
--freeze-epoch, refined LSBQ and threshold ternary, and their argument checks."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from example_loader import load_example

load_example("models")
demo = load_example("qat_digits")


def _main(argv):
    threads = torch.get_num_threads()
    try:
        return demo.main(argv)
    finally:
        torch.set_num_threads(threads)


def test_compare_smoke(tmp_path):
    assert _main(["--compare", "--quant-bits", "1", "--smoke", "--no-progress",
                  "--out", str(tmp_path)]) == 0  # fmt: skip
    files = sorted(p.name for p in tmp_path.iterdir())
    stems = {Path(f).stem for f in files}
    assert len(stems) == 1 and next(iter(stems)).startswith("qat_compare_cnn_1-bit_lsbq_")
    suffixes = {Path(f).suffix for f in files}
    assert {".md", ".json"} <= suffixes
    payload = json.loads((tmp_path / (next(iter(stems)) + ".json")).read_text())
    labels = [r["label"] for r in payload["results"]]
    assert labels == ["FP32", "STE (hard)", "BinaryRelax", "PARQ", "ProxQuant", "BinaryConnect"]
    for r in payload["results"]:
        assert len(r["epoch_test_acc"]) == 2 and r["epoch_test_acc"][-1] == r["test_acc"]
        if r["bits"] is not None:
            assert r["levels"] == 2 and 1 <= r["levels_used"] <= 2
    md = (tmp_path / (next(iter(stems)) + ".md")).read_text()
    assert "| BinaryConnect |" in md and "--compare" in md


@pytest.mark.parametrize(
    "argv, levels",
    [
        (["--quant-bits", "2", "--quant-proxmap", "proxquant", "binaryconnect"], 4),
        (["--quant-bits", "2", "--quant-method", "lsbq-refined", "--freeze-epoch", "1.5"], 4),
        (["--quant-bits", "0", "--quant-method", "ternary-threshold"], 3),
    ],
    ids=["proxquant-binaryconnect", "refined-freeze", "ternary-threshold"],
)
def test_new_settings_smoke(tmp_path, argv, levels):
    assert _main([*argv, "--smoke", "--no-progress", "--no-fp", "--out", str(tmp_path)]) == 0
    payload = json.loads(next(tmp_path.glob("*.json")).read_text())
    for r in payload["results"]:
        assert r["levels"] == levels and 1 <= r["levels_used"] <= levels


@pytest.mark.parametrize(
    "argv, match",
    [
        (["--reg-rate", "-1"], "--reg-rate"),
        (["--freeze-epoch", "25"], "--freeze-epoch"),
        (["--quant-method", "ternary-threshold", "--quant-bits", "2"], "ternary-threshold"),
    ],
)
def test_new_argument_checks(argv, match, capsys):
    with pytest.raises(SystemExit):
        demo.parse_args(argv)
    assert match in capsys.readouterr().err
