"""Proof that one build of ``parq_kernels._C`` runs on older x86-64 CPUs (SPEC.md §14).

``python -m benchmarks.portable_check`` (``make check-portable``) runs a small child program
natively, then under qemu-user's CPU emulation (``qemu-x86_64 -cpu <model>``) as

* ``Nehalem``: the x86-64 baseline (SSE4.2, no AVX): torch serves at level ``default``;
* ``Haswell``: AVX2 + FMA, no AVX-512: torch serves at level ``avx2``.

The child imports torch and parq_kernels, prints torch's CPU capability and the level that
serves parq's ``cpu`` backend, and runs one ``fused_step_`` through the ``cpu`` backend and
through the ``reference`` backend on the same inputs for each case (fp32 / bf16 x SGD-momentum /
AdamW x quantization-update / non-update step, hard prox, one per-channel 8 x 300 parameter and
one per-tensor 2 x 5000 parameter, i.e. a single row of 10000), judged by the tests' own
criterion (``tests/step_harness.py``: levels within a few ulp, outputs within SPEC.md §6,
latent and state to float32 rounding). A build that lets code compiled for a newer
instruction set run on an older CPU (an ``-march`` of the building machine, or an inline
function kept by the linker in its AVX2/AVX-512 form) dies under ``-cpu Nehalem`` with SIGILL.
Exit code 0 only if every model passes; 2 if qemu-user is missing.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
QEMU = "qemu-x86_64"
MODELS = ("Nehalem", "Haswell")  # what each model lacks: see the module docstring
MARKER = "PORTABLE_CHECK "  # the child's report lines: MARKER + JSON
SIGILL_CODES = (-4, 132)  # killed by SIGILL (subprocess), or 128 + 4 (through a shell)
TIMEOUT_S = 900.0  # torch's import alone takes ~35 s under TCG emulation on a busy 2-core CPU
CHILD_CODE = "from benchmarks.portable_check import run_child; raise SystemExit(run_child())"


def _report(**fields: object) -> None:
    print(MARKER + json.dumps(fields), flush=True)


def run_child() -> int:
    """The child program: the cases of the module docstring. Reports as it goes (MARKER +
    JSON lines: ``stage``, ``capability``, ``level``, then ``cases``, ``failures``, ``error``),
    so a run that dies shows how far it got; returns 0 iff every case matched."""
    _report(stage="python started")
    import torch

    _report(stage="torch imported", capability=torch.backends.cpu.get_cpu_capability())
    from parq_kernels import backends

    sys.path.insert(0, str(ROOT / "tests"))  # the tests' harness (plain modules, no pytest)
    from kernel_harness import PROX_CONFIGS, QUANT_CONFIGS, make_rows
    from step_harness import OC, assert_step_matches_reference

    error, failures, cases = "", [], 0
    _report(stage="loading parq_kernels._C")  # its load runs the extension's static init
    try:
        backends.get_impl("cpu", "fused_step_")
    except backends.BackendUnavailableError as exc:
        error = str(exc)
    level = backends.cpu_level() if hasattr(backends, "cpu_level") else None
    _report(stage="parq_kernels._C loaded" if not error else "no cpu backend", level=level)
    qc = next(c for c in QUANT_CONFIGS if c.name == "unif-b2")
    pc = next(c for c in PROX_CONFIGS if c.name == "hard")
    for dtype in [] if error else [torch.float32, torch.bfloat16]:
        # per channel: 8 rows of 300; per tensor: a 2 x 5000 tensor is one row of 10000
        latents = make_rows([(8, 300), (1, 2 * 5000)], dtype=dtype, seed=11)
        for oname in ("sgd-mom-wd", "adamw"):
            for update in (True, False):
                cases += 1
                case = f"{str(dtype).removeprefix('torch.')} {oname} update={update}"
                _report(stage=f"case {case}")
                try:
                    assert_step_matches_reference("cpu", latents, OC[oname], qc, pc, update)
                except Exception as exc:  # AssertionError: a mismatch; anything else too
                    failures.append(f"{case}: {type(exc).__name__}: {exc}")
    _report(stage="done", cases=cases, failures=failures, error=error)
    return 0 if cases and not failures and not error else 1


@dataclass
class Outcome:
    model: str
    status: str
    capability: str = "?"
    level: str = "?"
    seconds: float = 0.0
    detail: str = ""


def parse_result(stdout: str) -> dict:
    """The child's MARKER lines merged, later ones winning (empty if it printed none)."""
    result: dict = {}
    for line in stdout.splitlines():
        if line.startswith(MARKER):
            result |= json.loads(line.removeprefix(MARKER))
    return result


def classify(returncode: int | None, result: dict) -> str:
    """The status of one run from its return code (None: it timed out) and its result."""
    if returncode is None:
        return "timeout"
    if returncode in SIGILL_CODES:
        return "SIGILL (illegal instruction)"
    if result.get("failures"):
        return "mismatch"
    if result.get("error"):
        return "error (no cpu backend)"
    if returncode == 0 and result.get("stage") == "done" and result.get("cases"):
        return "ok"
    return f"crashed (rc {returncode})"


def child_command(model: str | None) -> list[str]:
    """The child's command line: natively when ``model`` is None, else under qemu-user."""
    base = [sys.executable, "-c", CHILD_CODE]
    return base if model is None else [QEMU, "-cpu", model, *base]


def child_env() -> dict[str, str]:
    """This process's environment with the checkout first on PYTHONPATH (and without
    PYTHONOPTIMIZE: the comparison is made of ``assert`` statements)."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONOPTIMIZE"}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    return env


def _noise(line: str) -> bool:
    return "TCG doesn't support requested feature" in line  # qemu: the model's extra flags


def _text(out: str | bytes | None) -> str:
    return out.decode(errors="replace") if isinstance(out, bytes) else out or ""


def run_model(model: str | None, timeout: float) -> Outcome:
    """Run the child for one CPU model (None: natively) and classify what happened."""
    name = model or "native"
    start = time.perf_counter()
    returncode: int | None = None
    try:
        proc = subprocess.run(child_command(model), env=child_env(), cwd=ROOT,
                              capture_output=True, text=True, timeout=timeout)  # fmt: skip
        returncode, stdout, stderr = proc.returncode, proc.stdout, proc.stderr
    except subprocess.TimeoutExpired as exc:  # what it printed before: how far it got
        stdout, stderr = _text(exc.stdout), _text(exc.stderr)
    result = parse_result(stdout)
    outcome = Outcome(name, classify(returncode, result), seconds=time.perf_counter() - start)
    outcome.capability = str(result.get("capability", "?"))
    outcome.level = str(result.get("level", "?"))
    if outcome.status != "ok":
        lines = [f"{name}: last stage reached: {result.get('stage', 'none')}"]
        lines += result.get("failures", []) + [result.get("error", "")]
        lines += [ln for ln in stderr.splitlines() if not _noise(ln)][-8:]
        outcome.detail = "\n".join(ln for ln in lines if ln)
    return outcome


def format_table(outcomes: list[Outcome]) -> str:
    """A Markdown table of the outcomes."""
    rows = [("CPU model", "status", "torch capability", "parq level", "seconds")]
    rows += [(o.model, o.status, o.capability, o.level, f"{o.seconds:.1f}") for o in outcomes]
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["| " + " | ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) + " |"
             for r in rows]  # fmt: skip
    lines.insert(1, "|" + "|".join("-" * (w + 2) for w in widths) + "|")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    models = " ".join(MODELS)
    parser.add_argument("--models", nargs="+", default=list(MODELS),
                        help=f"qemu CPU models to emulate (default: {models})")  # fmt: skip
    parser.add_argument("--timeout", type=float, default=TIMEOUT_S,
                        help=f"seconds per run (default {TIMEOUT_S:.0f})")  # fmt: skip
    parser.add_argument("--no-native", action="store_true", help="skip the native run")
    args = parser.parse_args(argv)
    if platform.machine() not in ("x86_64", "AMD64"):
        print(f"portable_check: emulates x86-64 CPUs; this machine is {platform.machine()}")
        return 2
    if shutil.which(QEMU) is None:
        print(f"portable_check: {QEMU} not found; install it with: apt-get install qemu-user")
        return 2
    outcomes = []
    for model in ([] if args.no_native else [None]) + args.models:
        print(f"running {model or 'native'} ...", flush=True)
        outcomes.append(run_model(model, args.timeout))
        if outcomes[-1].detail:
            print(outcomes[-1].detail, flush=True)
    print(format_table(outcomes))
    return 0 if all(o.status == "ok" for o in outcomes) else 1


if __name__ == "__main__":
    sys.exit(main())
