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


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--penalties", "-1"], "--penalties must be finite and >= 0"),
        (["--epochs", "0"], "--epochs must be >= 1, got 0"),
        (["--epochs", "-1"], "--epochs must be >= 1, got -1"),
        (["--batch-size", "0"], "--batch-size must be >= 1, got 0"),
        (["--group-size", "-4"], "--group-size must be >= 0 (0: one group per tensor), got -4"),
        (["--lr", "0"], "--lr must be > 0, got 0.0"),
        (["--lr-logits", "nan"], "--lr-logits: must be a finite number"),
        (["--init-bits", "-3"], "--init-bits must be in [2, 15] (DiffQuantizer's min_bits, "
                                "max_bits), got -3.0"),
        (["--init-bits", "16"], "--init-bits must be in [2, 15]"),
        (["--threads", "-2"], "--threads must be >= 1, got -2"),
        (["--threads", "0"], "--threads must be >= 1, got 0"),
    ],
)  # fmt: skip
def test_bad_arguments(argv, message, tmp_path, capsys):
    """Each bad argument ends with argparse's one-line message naming it (exit 2), no
    traceback, before any work."""
    with pytest.raises(SystemExit) as exc:
        demo.parse_args([*argv, "--out", str(tmp_path)])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_unwritable_out_is_an_argument_error(tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("")
    for out in (blocker / "x", blocker):  # under a file (/etc/passwd/x), a file itself
        with pytest.raises(SystemExit) as exc:
            demo.parse_args(["--out", str(out)])
        assert exc.value.code == 2
        err = capsys.readouterr().err
        assert f"--out {str(out)!r} is not a writable directory" in err


def test_chart_draws_every_point(tmp_path, monkeypatch):
    """One line for the DiffQ sweep and one marker per PARQ / FP32 point, however many
    (the committed results have five: FP32, A2, A4, 2-bit and ternary)."""
    pytest.importorskip("matplotlib")
    import matplotlib.pyplot as plt

    figures = []
    monkeypatch.setattr(plt, "close", figures.append)
    results = [{"penalty": p, "true_size_kb": s, "test_acc": 0.9} for p, s in ((0, 40), (9, 6))]
    points = [{"method": f"P{i}", "true_size_kb": 5.0 + i, "test_acc": 0.8} for i in range(7)]
    assert demo.chart(results, points, tmp_path / "c.png")
    (ax,) = figures[0].axes
    labels = [line.get_label() for line in ax.lines]
    assert labels == ["DiffQ (penalty sweep)"] + [f"P{i}" for i in range(7)]
    assert len({line.get_marker() for line in ax.lines[1:]}) == 7  # each its own marker
