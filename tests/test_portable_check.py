"""benchmarks/portable_check.py without qemu: its classification of what a child did, its
reading of the child's report lines, and its child program run natively (SPEC.md §14)."""

from __future__ import annotations

import sys

import pytest
import torch

from benchmarks import portable_check as pc
from parq_kernels import backends

DONE = {"stage": "done", "cases": 8, "failures": [], "error": ""}


@pytest.mark.parametrize(
    ("returncode", "result", "status"),
    [
        (0, DONE, "ok"),
        (None, {"stage": "torch imported"}, "timeout"),
        (-4, {"stage": "torch imported"}, "SIGILL (illegal instruction)"),
        (132, {}, "SIGILL (illegal instruction)"),
        (1, DONE | {"failures": ["fp32 adamw update=True: AssertionError: x"]}, "mismatch"),
        (
            1,
            DONE | {"cases": 0, "error": "parq backend 'cpu' unavailable"},
            "error (no cpu backend)",
        ),
        (0, {"stage": "case float32 adamw update=True"}, "crashed (rc 0)"),  # no "done"
        (0, DONE | {"cases": 0}, "crashed (rc 0)"),  # nothing was compared
        (-11, {}, "crashed (rc -11)"),
        (1, {}, "crashed (rc 1)"),
    ],
)
def test_classify(returncode, result, status):
    assert pc.classify(returncode, result) == status


def test_parse_result_merges_report_lines():
    out = "\n".join([
        "noise",
        pc.MARKER + '{"stage": "torch imported", "capability": "AVX2"}',
        "PORTABLE_CHECKS not ours",
        pc.MARKER + '{"stage": "done", "level": "avx2"}',
    ])  # fmt: skip
    assert pc.parse_result(out) == {"stage": "done", "capability": "AVX2", "level": "avx2"}
    assert pc.parse_result("nothing reported\n") == {}


def test_child_command_and_env():
    assert pc.child_command(None) == [sys.executable, "-c", pc.CHILD_CODE]
    assert pc.child_command("Nehalem") == [pc.QEMU, "-cpu", "Nehalem", sys.executable, "-c",
                                           pc.CHILD_CODE]  # fmt: skip
    assert pc.child_env()["PYTHONPATH"].split(":")[0] == str(pc.ROOT)


def _fake_child(monkeypatch, code: str) -> None:
    monkeypatch.setattr(pc, "child_command", lambda model: [sys.executable, "-c", code])


def test_run_model_sees_sigill_and_how_far_it_got(monkeypatch):
    """A child killed by SIGILL (what qemu does when the guest runs an unknown instruction)."""
    _fake_child(monkeypatch, f"import os, signal; print({pc.MARKER!r} + "
                '\'{"stage": "torch imported", "capability": "DEFAULT"}\', flush=True); '
                "os.kill(os.getpid(), signal.SIGILL)")  # fmt: skip
    out = pc.run_model("Nehalem", timeout=60)
    assert (out.model, out.status, out.capability, out.level) == (
        "Nehalem", "SIGILL (illegal instruction)", "DEFAULT", "?")  # fmt: skip
    assert "last stage reached: torch imported" in out.detail


def test_run_model_timeout_keeps_the_stage(monkeypatch):
    _fake_child(monkeypatch, f"import time; print({pc.MARKER!r} + "
                "'{\"stage\": \"python started\"}', flush=True); time.sleep(60)")  # fmt: skip
    out = pc.run_model("Haswell", timeout=3)
    assert out.status == "timeout" and 3 <= out.seconds < 30
    assert "last stage reached: python started" in out.detail


def test_child_program_passes_natively():
    """The real child program, in a subprocess, on this machine's own CPU."""
    out = pc.run_model(None, timeout=120)
    assert out.capability == torch.backends.cpu.get_cpu_capability()
    try:
        backends.get_impl("cpu", "fused_step_")
    except backends.BackendUnavailableError:
        assert out.status == "error (no cpu backend)", out.detail
        return
    assert out.status == "ok", out.detail
    assert out.level == str(backends.cpu_level())


def test_child_program_reports_a_mismatch(monkeypatch, capsys):
    """run_child in this process, its ``cpu`` backend replaced by the reference with one
    element of each updated latent moved: every case is a mismatch."""
    reference = backends.get_impl("reference", "fused_step_")

    def off_by_a_bit(params, latents, *args):
        reference(params, latents, *args)
        for t in latents:
            t.view(-1)[0] += 0.01

    real = backends.get_impl
    monkeypatch.setattr(backends, "get_impl",
                        lambda name, op="quant_prox_": off_by_a_bit if name == "cpu" else
                        real(name, op))  # fmt: skip
    assert pc.run_child() == 1
    result = pc.parse_result(capsys.readouterr().out)
    assert (result["stage"], result["cases"], len(result["failures"])) == ("done", 8, 8)
    assert pc.classify(1, result) == "mismatch"


def test_main_exit_codes(monkeypatch, capsys):
    monkeypatch.setattr(pc.platform, "machine", lambda: "x86_64")
    monkeypatch.setattr(pc.shutil, "which", lambda name: None)
    assert pc.main([]) == 2
    assert "apt-get install qemu-user" in capsys.readouterr().out
    monkeypatch.setattr(pc.shutil, "which", lambda name: "/usr/bin/" + name)
    status = {"native": "ok", "Nehalem": "ok", "Haswell": "ok"}
    monkeypatch.setattr(
        pc, "run_model", lambda m, t: pc.Outcome(m or "native", status[m or "native"])
    )
    assert pc.main([]) == 0
    status["Nehalem"] = "SIGILL (illegal instruction)"
    assert pc.main([]) == 1
    table = capsys.readouterr().out
    assert "| Nehalem   | SIGILL (illegal instruction) |" in table
    assert pc.main(["--no-native", "--models", "Haswell"]) == 0
