"""``size_report`` / ``report_file`` and ``python -m parq.export`` on a hand-built model
whose sizes are known (SPEC.md §10), and the file-size bound of the packed format."""

from __future__ import annotations

import json
import math
import zlib

import pytest
import torch
from safetensors import safe_open
from torch import nn

from parq.export import report_file, save_quantized, size_report
from parq.export.__main__ import main
from parq.export.format import read_header
from parq.optim import ProxHardQuant, QuantOptimizer
from parq.quant import TernaryUnifQuantizer, UnifQuantizer


class Tiny(nn.Module):
    """fc.weight (4, 16) 2-bit per channel, vec (13,) ternary per tensor; a bias, a float16
    buffer and an int64 buffer stored as they are."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(16, 4, bias=False)
        self.vec = nn.Parameter(torch.randn(13))
        self.bias = nn.Parameter(torch.zeros(5))
        self.register_buffer("scale", torch.ones(3, dtype=torch.float16))
        self.register_buffer("steps", torch.tensor(11))


@pytest.fixture
def tiny():
    torch.manual_seed(0)
    model = Tiny()
    groups = [{"params": [model.fc.weight], "quant_bits": 2},
              {"params": [model.vec], "quant_bits": 0}, {"params": [model.bias]}]  # fmt: skip
    base = torch.optim.SGD(groups, lr=0.0)
    qmap = {1: TernaryUnifQuantizer()}
    opt = QuantOptimizer(base, UnifQuantizer(), ProxHardQuant(), quant_per_channel=True,
                         group_quantizer_map=qmap)  # fmt: skip
    opt.step()  # lr 0: the weights are only projected onto their levels
    return model, opt


def test_size_report_numbers(tiny, tmp_path):
    model, opt = tiny
    report = size_report(model, opt)  # float16 levels
    fc, vec = report.params
    assert (fc.name, fc.layout, fc.bits, fc.K, fc.w, fc.numel) == ("fc.weight", "channel", 2, 4,
                                                                   2, 64)  # fmt: skip
    assert (fc.dense_bytes, fc.idx_bytes, fc.level_bytes) == (256, 16, 4 * 4 * 2)
    assert fc.bits_per_weight == 8 * 48 / 64 == 6.0
    assert (vec.name, vec.layout, vec.bits, vec.K, vec.w) == ("vec", "tensor", 0, 3, 2)
    assert (vec.dense_bytes, vec.idx_bytes, vec.level_bytes) == (52, math.ceil(13 * 2 / 8), 6)
    assert report.quantized_numel == 77 and report.packed_bytes == 48 + 10
    assert report.bits_per_weight == pytest.approx(8 * 58 / 77)
    assert (report.other_tensors, report.other_bytes) == (3, 20 + 6 + 8)
    assert report.dense_bytes == 256 + 52 + 34
    assert report.float32_bytes == 256 + 52 + 20 + 12 + 8  # float16 buffer counted at 4 B
    assert report.levels_dtype == "float16"

    path = tmp_path / "tiny.safetensors"
    save_quantized(path, model, opt)
    blob = path.read_bytes()
    assert report.file_bytes == len(blob)
    assert report.zlib_bytes == len(zlib.compress(blob, 9))
    with safe_open(str(path), framework="pt") as f:
        packed = (f.get_tensor("fc.weight.qidx").numpy().tobytes()
                  + f.get_tensor("fc.weight.qlevels").numpy().tobytes())  # fmt: skip
    assert fc.zlib_bytes == len(zlib.compress(packed, 9))
    assert report_file(path).as_dict() | {"source": ""} == report.as_dict() | {"source": ""}

    text = str(report)
    sizes = (f"{report.file_bytes} B", f"{report.zlib_bytes} B", "bits per weight")
    for needle in ("fc.weight", "4x16", "channel", "6.000", "vec", *sizes):
        assert needle in text, needle


def test_file_size_within_the_packed_bound(tiny, tmp_path):
    """The data section is exactly the packed indices + levels + other tensors; the
    header (JSON metadata) is small."""
    model, opt = tiny
    path = tmp_path / "tiny.safetensors"
    save_quantized(path, model, opt, levels_dtype=torch.float32)
    header = read_header(path)
    size = path.stat().st_size
    packed = sum(math.ceil(p.numel * p.w / 8) + 4 * p.K * p.rows for p in header.params.values())
    assert size - header.data_start == packed + 20 + 6 + 8
    assert header.data_start < 600 + 250 * len(header.tensors)
    assert size <= header.data_start + packed + 34


def test_cli_report_and_info(tiny, tmp_path, capsys):
    model, opt = tiny
    path = tmp_path / "tiny.safetensors"
    save_quantized(path, model, opt)
    assert main(["report", str(path)]) == 0
    out = capsys.readouterr().out
    assert "fc.weight" in out and "bits per weight" in out
    assert main(["report", str(path), "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["file_bytes"] == path.stat().st_size and len(doc["params"]) == 2
    assert main(["info", str(path)]) == 0
    out = capsys.readouterr().out
    assert "fc.weight: float32 [4, 16], channel (4 x 16), bits 2, K 4, w 2" in out
    path.write_bytes(path.read_bytes()[:-4])
    assert main(["report", str(path)]) == 2
    assert "truncated" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    assert exit_info.value.code == 0
