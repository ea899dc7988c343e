"""The DiffQ demo (``examples/diffq_digits.py``): a smoke run writes its table, JSON and
chart, and bad arguments are refused."""

from __future__ import annotations

import json

import pytest
import torch
from example_loader import load_example

demo = load_example("diffq_digits")


def test_smoke_run(tmp_path):
    threads = torch.get_num_threads()
    try:
        assert demo.main(["--smoke", "--out", str(tmp_path), "--penalties", "0", "500"]) == 0
    finally:
        torch.set_num_threads(threads)
    files = sorted(p.suffix for p in tmp_path.iterdir())
    assert files[:2] == [".json", ".md"]
    data = json.loads(next(tmp_path.glob("*.json")).read_text())
    assert [r["penalty"] for r in data["results"]] == [0.0, 500.0]
    for r in data["results"]:
        assert 0 <= r["test_acc"] <= 1 and 2 <= r["mean_bits"] <= 15
    # the penalty shrinks the model
    assert data["results"][1]["true_size_kb"] < data["results"][0]["true_size_kb"]


def test_parq_size_formula():
    # DigitsCNN: conv1 16x1x3x3, conv2 32x16x3x3, conv3 32x32x3x3, fc 10x128 (+ 170 float)
    weights, rows = 144 + 4608 + 9216 + 1280, 16 + 32 + 32 + 10
    assert demo.parq_size_kb(2) == pytest.approx((2 * weights + 16 * 4 * rows + 32 * 170) / 2**13)


@pytest.mark.parametrize("argv", [["--penalties", "-1"], ["--epochs", "0"], ["--lr", "0"]])
def test_bad_arguments(argv, tmp_path):
    with pytest.raises(SystemExit):
        demo.parse_args([*argv, "--out", str(tmp_path)])
