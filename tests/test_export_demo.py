"""The export step of the QAT demo (``examples/qat_digits.py`` -> ``examples/export_step.py``):
the 2-bit model is written packed, reported and reloaded with the same accuracy."""

from __future__ import annotations

import json

import torch
from test_demo_cli import demo

from parq.export import report_file


def test_demo_exports_and_reloads_the_2bit_model(tmp_path, capsys):
    out, keep = tmp_path / "out", tmp_path / "packed"
    threads = torch.get_num_threads()
    try:
        assert demo.main(["--smoke", "--no-progress", "--no-fp", "--quant-bits", "2", "--out",
                          str(out), "--export-dir", str(keep), "--act-bits", "8"]) == 0  # fmt: skip
    finally:
        torch.set_num_threads(threads)
    printed = capsys.readouterr().out
    assert "== packed export: 2-bit lsbq parq ==" in printed and "bits per weight" in printed
    result, act8 = json.loads(next(out.glob("*.json")).read_text())["results"]
    assert act8["act_bits"] == 8  # with quantized activations: reloaded with its observers
    assert act8["export"]["bitwise_with_float32_levels"] is True
    export = result["export"]
    assert export["reloaded_test_acc"] == result["test_acc"]
    assert export["bitwise_with_float32_levels"] is True
    assert export["quantized_weights"] == 15248  # the CNN's four conv / linear weights
    assert 2.0 < export["bits_per_weight"] < 2.5  # 2-bit indices + float16 levels per channel
    files = sorted(p.name for p in keep.iterdir())
    assert files == ["qat_digits_cnn_2-bit_lsbq_parq.safetensors",
                     "qat_digits_cnn_2-bit_lsbq_parq_A8.safetensors",
                     "qat_digits_cnn_2-bit_lsbq_parq_A8_fp32levels.safetensors",
                     "qat_digits_cnn_2-bit_lsbq_parq_fp32levels.safetensors"]  # fmt: skip
    report = report_file(keep / files[0])
    assert report.file_bytes == export["packed_file_bytes"]
    assert report.float32_bytes == export["float32_bytes"]
    assert "Packed export" in next(out.glob("*.md")).read_text()


def test_demo_no_export(tmp_path):
    threads = torch.get_num_threads()
    try:
        assert demo.main(["--smoke", "--no-progress", "--no-fp", "--quant-bits", "0",
                          "--no-export", "--out", str(tmp_path), "--act-bits"]) == 0  # fmt: skip
    finally:
        torch.set_num_threads(threads)
    (result,) = json.loads(next(tmp_path.glob("*.json")).read_text())["results"]
    assert "export" not in result
