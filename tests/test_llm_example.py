"""The LLM QAT example (``examples/llm_qat.py``): its ``--quick`` run through Hugging Face's
``Trainer`` in a child process (a byte-level Llama on ``pydoc_data.topics``, FP vs 2-bit PARQ
per channel, a checkpoint resumed, the packed export), and its argument checks.

The runs need the ``llm`` extra (transformers, accelerate; ``make setup`` installs them) and
skip, saying so, without it; the argument checks need neither.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from example_loader import load_example

from parq.export import load_quantized

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "examples" / "llm_qat.py"
llm = load_example("llm_qat")  # imports no transformers until a run starts
NEEDS = 'the llm extra is not installed (pip install "transformers==5.25.0" "accelerate==1.16.0")'


def run_example(out: Path, *extra: str) -> tuple[dict, Path, str]:
    """``llm_qat.py --quick`` in a fresh interpreter; (its JSON, the file stem, stdout)."""
    pytest.importorskip("transformers", reason=NEEDS)
    pytest.importorskip("accelerate", reason=NEEDS)
    path = os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])
    env = dict(os.environ, PYTHONPATH=path)
    cmd = [sys.executable, str(SCRIPT), "--quick", "--no-progress", "--threads", "1",
           "--out", str(out), "--work-dir", str(out / "work"), *extra]  # fmt: skip
    proc = subprocess.run(cmd, cwd=out, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    (js,) = out.glob("llm_qat_*_quick.json")
    return json.loads(js.read_text()), js.with_suffix(""), proc.stdout


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    out = tmp_path_factory.mktemp("llm_qat")
    return run_example(out)


def test_outputs_and_perplexities(quick):
    payload, stem, stdout = quick
    assert stem.name.startswith("llm_qat_2bit_channel_")
    chart = llm.importlib.util.find_spec("matplotlib") is not None
    suffixes = {".md", ".json"} | ({".png"} if chart else set())
    assert {p.suffix for p in stem.parent.glob(stem.name + ".*")} == suffixes
    r = payload["results"]
    for m in (r["fp"]["metrics"], r["qat"]["metrics"], r["export"]["reloaded"]):
        assert math.isfinite(m["perplexity"]) and 1.0 < m["perplexity"] < 256.0  # < uniform
        assert m["perplexity"] == pytest.approx(math.exp(m["val_loss"]))
    # 24 steps trained something: below the untrained model's ~256 (uniform over bytes)
    assert r["fp"]["metrics"]["perplexity"] < 120 and r["qat"]["metrics"]["perplexity"] < 120
    assert r["fp"]["global_step"] == r["qat"]["global_step"] == 24
    assert r["qat"]["step_paths"][0] == "fused step"  # the quantized group: AdamW fused in
    md = stem.with_suffix(".md").read_text()
    assert "| model | weights | val loss | bits / byte | perplexity | vs FP | train s |" in md
    assert f"{r['qat']['metrics']['perplexity']:.3f}" in md and "packed export" in md
    assert "Validation:" in stdout and "wrote " in stdout


def test_qat_weights_on_the_level_grid(quick):
    """From the packed file, reloaded into a fresh model here: every row of every quantized
    projection holds at most 2**bits distinct values; the embedding and norms are not
    quantized."""
    payload, stem, _ = quick
    grid = payload["results"]["qat"]["level_grid"]
    assert grid["off_grid"] == [] and grid["K"] == 4 and grid["max_distinct_per_group"] <= 4
    args = llm.parse_args(["--quick"])
    model = llm.build_model(args, seed=123)
    load_quantized(stem.parent / "work" / "llm_qat_2bit_fp32levels.safetensors", model)
    quantized = 0
    for name, p in model.named_parameters():
        if name.rsplit(".", 2)[-2] in llm.QUANTIZED:
            quantized += 1
            assert max(len(torch.unique(row)) for row in p.detach()) <= 4, name
        else:  # embedding (tied lm_head) and RMSNorm weights: full precision
            assert len(torch.unique(p.detach())) > 4, name
    assert quantized == 2 * 7
    export = payload["results"]["export"]
    assert export["bitwise_with_float32_levels"] and export["float32_levels_val_loss_equal"]
    assert export["quantized_weights"] == 2 * (4 * 64 * 64 + 3 * 64 * 192)
    assert 2.0 < export["bits_per_weight"] < 3.1  # 2-bit indices + 4 float16 levels per row


def test_resume_continues_from_the_checkpoint(quick):
    payload, stem, _ = quick
    res = payload["results"]["resume"]
    assert res["checkpoint_step"] == 12 and res["trainer_step"] == 12
    assert (stem.parent / "work" / "qat" / "checkpoint-12" / "optimizer.pt").is_file()
    # the QuantOptimizer state loaded through Trainer (torch.load weights_only=True)
    assert {"latent", "quants", "exp_avg", "exp_avg_sq", "step"} <= set(res["state_keys"])
    assert res["state_equal"] and res["groups_equal"]
    assert res["latents_restored"] == res["quantized_params"] == 14
    assert res["num_steps_saved"] == res["num_steps_restored"] == 12
    # and the run goes on as the uninterrupted one did
    assert res["final_step"] == 24 and [s for s, _ in res["loss_log"]] == list(range(14, 25, 2))
    assert res["losses_equal"] and res["max_loss_diff"] == 0.0
    assert res["weights_equal"] and res["latents_equal"]


def test_per_block_4bit(tmp_path):
    payload, stem, _ = run_example(tmp_path, "--bits", "4", "--block-size", "16", "--no-resume",
                                   "--sample-bytes", "0")  # fmt: skip
    assert stem.name.startswith("llm_qat_4bit_block16_")
    r = payload["results"]
    assert "resume" not in r
    grid = r["qat"]["level_grid"]
    assert grid["K"] == 16 and grid["max_distinct_per_group"] <= 16 and grid["off_grid"] == []
    assert grid["groups"] == 2 * (4 * 64 * 64 + 3 * 64 * 192) // 16  # one level set per block
    assert math.isfinite(r["qat"]["metrics"]["perplexity"])


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--bits", "9"], "--bits must be in 1..8"),
        (["--quick", "--block-size", "48"], "--block-size must be >= 1 and divide"),
        (["--anneal-start", "0.8", "--anneal-end", "0.5"], "--anneal-start and --anneal-end"),
        (["--steps", "4", "--anneal-end", "1.0"], "--anneal-end (1.0 of 4 steps"),
        (["--checkpoint-at", "0.005"], "--checkpoint-at 0.005 of 300 steps"),
        (["--hidden", "100", "--heads", "3"], "--hidden (100) must be a multiple of --heads"),
        (["--seq-len", "1"], "--seq-len must be >= 2"),
        (["--val-fraction", "0.7"], "--val-fraction must be in (0, 0.5)"),
        (["--lr", "nan"], "must be a finite number"),
        (["--quantizer", "ternary"], "invalid choice"),
    ],
)
def test_argument_errors(argv, message, capsys):
    with pytest.raises(SystemExit) as exc:
        llm.parse_args(argv)
    assert exc.value.code == 2
    assert message in capsys.readouterr().err


def test_quick_sizes_and_explicit_values_win():
    args = llm.parse_args(["--quick", "--steps", "30"])
    assert (args.hidden, args.intermediate, args.seq_len, args.steps) == (64, 192, 64, 30)
    assert llm.checkpoint_step(args) == 16 and llm.anneal_steps(args) == (3, 22)


def test_missing_extra_says_how_to_install(monkeypatch, capsys):
    monkeypatch.setattr(llm.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(SystemExit) as exc:
        llm.require_transformers()
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert (
        'needs transformers and accelerate (the llm extra): pip install "transformers==5.25.0"'
        ' "accelerate==1.16.0"' in err
    )


def test_pins_agree():
    """The example's install hint, pyproject's ``llm`` extra and the Makefile's pins."""
    tomllib = pytest.importorskip("tomllib", reason="Python < 3.11 has no tomllib")
    extra = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    pins = extra["optional-dependencies"]["llm"]
    assert " ".join(f'"{p}"' for p in pins) == llm.PINS
    makefile = (ROOT / "Makefile").read_text()
    for pin in pins:
        name, version = pin.split("==")
        assert f"{name.upper()}_VERSION ?= {version}\n" in makefile
