"""The QAT demo CLI (``examples/qat_digits.py``): a smoke run and its argument checks."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
from example_loader import load_example

models = load_example("models")
demo = load_example("qat_digits")
cli = load_example("qat_cli")  # the demo's options (loaded by qat_digits already)


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo")
    threads = torch.get_num_threads()
    try:
        assert demo.main(["--smoke", "--no-progress", "--out", str(out)]) == 0
    finally:
        torch.set_num_threads(threads)  # main() sets --threads for the whole process
    files = sorted(p.name for p in out.iterdir())
    assert len(files) == 2, files
    stem = out / Path(files[0]).stem
    return stem, json.loads(stem.with_suffix(".json").read_text())


def test_smoke_default_settings_and_outputs(smoke_run):
    stem, payload = smoke_run
    assert stem.name.startswith("qat_digits_cnn_") and stem.name.endswith("_smoke")
    results = payload["results"]
    # default run: full precision, 2-bit PARQ and ternary, per channel; then 2-bit PARQ
    # weights with 8-bit and 4-bit fake-quantized activations (W2A8, W2A4)
    assert [r["setting"] for r in results] == [
        "FP32", "2-bit lsbq parq", "ternary lsbq parq", "2-bit lsbq parq A8", "2-bit lsbq parq A4"
    ]  # fmt: skip
    assert [r["act_bits"] for r in results] == [None, None, None, 8, 4]
    assert payload["config"]["quant_per_channel"] is True
    for r in results:
        assert 0.0 <= r["test_acc"] <= 1.0 and 0.0 <= r["train_acc"] <= 1.0
        assert r["steps"] == 2 * 8  # 2 epochs of 512 images in batches of 64
    for r in results[1:]:
        # annealing ended before the last step: every group holds at most K values
        assert r["levels"] == (4 if r["bits"] == 2 else 3)
        assert 1 <= r["levels_used"] <= r["levels"]
        assert r["backend"] in ("cpu", "reference")


def test_smoke_table(smoke_run):
    stem, payload = smoke_run
    md = stem.with_suffix(".md").read_text()
    header = "| setting | test acc | vs FP (points) | train acc | levels used / K | steps |"
    assert header in md
    fp = payload["results"][0]["test_acc"]
    for r in payload["results"][1:]:
        delta = f"{100 * (r['test_acc'] - fp):+.1f}"
        assert f"| {r['setting']} | {r['test_acc']:.4f} | {delta} |" in md


def test_settings_cross_product():
    args = demo.parse_args(
        ["--quant-bits", "1", "2", "--quant-method", "uniform", "lsbq", "--quant-proxmap", "hard",
         "--no-fp"]
    )  # fmt: skip
    labels = [s.label for s in demo.settings(args)]
    assert labels == [
        "1-bit uniform hard", "1-bit lsbq hard", "2-bit uniform hard", "2-bit lsbq hard",
        "1-bit uniform hard A8", "1-bit uniform hard A4",  # --act-bits 8 4 (default)
    ]  # fmt: skip
    args = demo.parse_args(["--epochs", "10"])
    assert (args.anneal_start, args.anneal_end) == (1.0, 7.0)
    # --act-bits: settings with the first weight setting; without a value: none
    args = demo.parse_args(["--quant-bits", "4", "0", "--quant-proxmap", "hard", "parq",
                            "--act-bits", "6", "3", "--no-fp"])  # fmt: skip
    labels = [s.label for s in demo.settings(args)]
    assert labels[-2:] == ["4-bit lsbq hard A6", "4-bit lsbq hard A3"] and len(labels) == 6
    args = demo.parse_args(["--act-bits"])
    assert [s.label for s in demo.settings(args)] == [
        "FP32", "2-bit lsbq parq", "ternary lsbq parq"
    ]  # fmt: skip


def test_act_quant_cnn_shares_the_weights_and_is_the_cnn_when_bypassed():
    from parq.fakequant import QModuleState, qmodule_state

    cnn = models.DigitsCNN()
    wrapped = models.ActQuantDigitsCNN(cnn, 4)
    assert [id(p) for p in wrapped.parameters()] == [id(p) for p in cnn.parameters()]
    x = torch.randn(5, 1, 8, 8)
    cnn.eval(), wrapped.eval()
    assert torch.equal(wrapped(x), cnn(x))
    with qmodule_state(wrapped, QModuleState.QUANT_AWARE_TRAIN_ACT_ONLY):
        y = wrapped(x)
        assert not torch.equal(y, cnn(x))
        h = wrapped.block1(wrapped.input(x))
    assert len(torch.unique(h)) <= 16  # 4-bit activations
    assert demo.evaluate(wrapped, x, torch.zeros(5, dtype=torch.long)) >= 0.0
    assert wrapped.training and wrapped.block1.qstate == QModuleState.BYPASSED


def test_block_size_groups():
    args = demo.parse_args(["--quant-block-size", "32"])
    model = models.DigitsCNN()
    groups = demo.param_groups(model, demo.Setting(2), args)
    blocked = [g for g in groups if "quant_block_size" in g]
    assert len(blocked) == 1 and blocked[0]["params"] == [model.fc.weight]
    assert blocked[0]["quant_block_size"] == 32 and blocked[0]["quant_bits"] == 2
    convs = next(g for g in groups if "quant_bits" in g and "quant_block_size" not in g)
    assert len(convs["params"]) == 3
    fp = demo.param_groups(model, demo.Setting(None), args)
    assert all("quant_bits" not in g for g in fp)


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--quant-lsbq-optimal", "--quant-bits", "4"], "supports --quant-bits 0, 1 or 2, got [4]"),
        (["--quant-lsbq-optimal", "--quant-method", "uniform"], "needs --quant-method lsbq"),
        (["--quant-bits", "9"], "--quant-bits must be in 0..8"),
        (["--quant-method", "nf4"], "invalid choice: 'nf4'"),
        (["--quant-proxmap", "round"], "invalid choice: 'round'"),
        (["--epochs", "4", "--anneal-end", "5"], "--anneal-end (5.0) must be <= --epochs (4)"),
        (["--anneal-start", "3", "--anneal-end", "2"], "--anneal-start must be >= 0 and <"),
        (["--quant-block-size", "32", "--no-quant-per-channel"], "needs --quant-per-channel"),
        (["--quant-block-size", "0"], "--quant-block-size must be >= 1"),
        (["--quant-period", "0"], "--quant-period must be >= 1"),
        (["--backend", "tpu"], "--backend tpu: unknown parq backend 'tpu'"),
        (["--model", "vgg"], "--model must be one of"),
        (["--act-bits", "1"], "--act-bits must be in 2..16, got [1]"),
        (["--act-bits", "8", "--model", "resnet20"], "--act-bits (activation quantization) "
         "supports --model cnn, got 'resnet20'"),
    ],
)  # fmt: skip
def test_argument_errors(argv, message, capsys):
    with pytest.raises(SystemExit) as exc:
        demo.parse_args(argv)
    assert exc.value.code == 2
    assert message in capsys.readouterr().err


def test_resnet20_runs_on_digits_and_matches_benchmark_shapes():
    from benchmarks import shapes

    model = models.ResNet20(num_classes=10, in_channels=3)
    got = [(n, tuple(p.shape)) for n, p in model.named_parameters()]
    assert got == [(s.name, s.shape) for s in shapes.resnet20()]
    digits_model = models.build_model("resnet20", in_channels=1)
    assert digits_model(torch.randn(2, 1, 8, 8)).shape == (2, 10)
    assert models.build_model("cnn")(torch.randn(3, 1, 8, 8)).shape == (3, 10)
    with pytest.raises(ValueError, match="unknown model 'vgg'"):
        models.build_model("vgg")


# ---------------------------------------------------------------------------
# Missing optional packages and bad arguments: plain output / parser errors, before any work
# ---------------------------------------------------------------------------


def test_without_tqdm_plain_progress_and_one_note(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "tqdm", None)  # `import tqdm` raises ImportError
    threads = torch.get_num_threads()
    try:
        argv = ["--smoke", "--no-fp", "--quant-bits", "2", "--out", str(tmp_path)]
        assert demo.main(argv) == 0
    finally:
        torch.set_num_threads(threads)
    err = capsys.readouterr().err
    notes = [line for line in err.splitlines() if line.startswith("note:")]
    assert notes == ["note: tqdm is not installed: plain progress lines (pip install tqdm)"]
    assert "2-bit lsbq parq epoch 1/2 loss" in err and "epoch 2/2" in err
    assert len(list(tmp_path.glob("qat_digits_cnn_*_smoke.json"))) == 1


def test_warmup_longer_than_the_run_is_an_argument_error(capsys):
    with pytest.raises(SystemExit) as exc:
        demo.parse_args(["--smoke", "--warmup-steps", "16"])  # the smoke run has 16 steps
    assert exc.value.code == 2
    assert "--warmup-steps (16) must be < the run's 16 optimizer steps" in capsys.readouterr().err
    assert demo.parse_args(["--smoke", "--warmup-steps", "15"]).warmup_steps == 15


def test_warmup_until_the_last_step_still_quantizes(tmp_path):
    threads = torch.get_num_threads()
    try:
        argv = ["--smoke", "--no-fp", "--quant-bits", "2", "--no-progress", "--out", str(tmp_path)]
        assert demo.main([*argv, "--warmup-steps", "15", "--act-bits"]) == 0
    finally:
        torch.set_num_threads(threads)
    (result,) = json.loads(next(tmp_path.glob("*.json")).read_text())["results"]
    assert result["levels"] == 4 and 1 <= result["levels_used"] <= 4


def test_train_images_matches_the_split():
    x_train, _, x_test, _ = demo.load_data(0, smoke=False)
    assert len(x_train) == cli.train_images(False) and len(x_train) + len(x_test) == 1797
    assert len(demo.load_data(0, smoke=True)[0]) == cli.train_images(True) == 512


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--lr", "nan"], "argument --lr: must be a finite number, got 'nan'"),
        (["--lr", "inf"], "argument --lr: must be a finite number, got 'inf'"),
        (["--lr", "fast"], "argument --lr: must be a number, got 'fast'"),
        (["--weight-decay", "-1"], "--weight-decay must be >= 0"),
        (["--anneal-steepness", "nan"], "argument --anneal-steepness: must be a finite number"),
        (["--anneal-end", "inf"], "argument --anneal-end: must be a finite number"),
        (["--device", "bogus"], "--device 'bogus' is not a device"),
        (["--device", "meta"], "--device 'meta': only cpu and cuda[:i] are supported"),
    ]
    + ([] if torch.cuda.is_available() else [(["--device", "cuda"], "CUDA is not available")]),
)
def test_more_argument_errors(argv, message, capsys):
    with pytest.raises(SystemExit) as exc:
        demo.parse_args(argv)
    assert exc.value.code == 2
    assert message in capsys.readouterr().err


def test_unwritable_out_fails_before_any_work(tmp_path, monkeypatch, capsys):
    blocker = tmp_path / "a-file"
    blocker.write_text("")

    def no_work(*args, **kwargs):
        raise AssertionError("work started before --out was checked")

    monkeypatch.setattr(demo, "load_data", no_work)
    with pytest.raises(SystemExit) as exc:
        demo.main(["--smoke", "--out", str(blocker / "results")])
    assert exc.value.code == 2
    assert "--out" in (err := capsys.readouterr().err) and "not a writable directory" in err
