"""The benchmarks' CPU record, the hard-phase and bf16 step cases, and ``--levels``
(``benchmarks/cpu_info.py``, ``benchmarks/step_bench.py``, ``benchmarks/levels.py``).

One ``--smoke --levels default`` run starts a real child process (``ATEN_CPU_CAPABILITY=
default``, the step suite on tiny shapes); the other checks use synthetic payloads.
"""

from __future__ import annotations

import csv
import json

import pytest
import torch

from benchmarks import cli, cpu_info, environment, levels, report, step_bench
from parq_kernels import backends
from parq_kernels.kinds import ProxKind

RECORD_KEYS = {"model", "machine", "flags", "torch_capability", "aten_cpu_capability_env",
               "parq_level", "parq_levels"}  # fmt: skip


def test_cpu_record_has_the_fields():
    record = cpu_info.cpu_record()
    assert set(record) == RECORD_KEYS
    assert record["torch_capability"] == torch.backends.cpu.get_cpu_capability()
    assert record["parq_level"] == backends.cpu_level()  # None before the per-level build
    assert record["parq_levels"] == list(backends.cpu_levels())
    assert set(record["flags"]) <= set(cpu_info.X86_FLAGS + cpu_info.ARM_FLAGS)
    assert record["model"]
    env = environment.environment(torch.device("cpu"))
    assert set(env["cpu"]) == RECORD_KEYS
    text = report.environment_text(env, 1.0)
    assert f"cpu: {record['model']}" in text and "cpu level: torch capability" in text
    if record["parq_level"] is None:
        assert "parq cpu level n/a" in text
    assert report.cpu_headline(env).startswith(f"**CPU**: {record['model']};")
    assert record["torch_capability"] in report.fakequant_level_note(env)


AVX512 = ["avx2", "fma", "avx512f", "avx512bw", "avx512vl", "avx512dq"]


@pytest.mark.parametrize(
    "flags, cap, env, want",
    [
        ([], "DEFAULT", None, ["default"]),
        (["avx", "avx2"], "AVX2", None, ["default"]),  # AVX2 without FMA
        (["avx2", "fma"], "AVX2", None, ["default", "avx2"]),
        (AVX512[:-1], "AVX2", None, ["default", "avx2"]),  # no avx512dq: torch's test
        (AVX512, "AVX512", None, ["default", "avx2", "avx512"]),
        (AVX512, "AVX2", None, ["default", "avx2"]),  # torch chose AVX2: no higher
        (AVX512, "DEFAULT", "default", ["default", "avx2", "avx512"]),  # the variable lowered it
        (["asimd", "sve"], "SVE256", None, ["default"]),
    ],
)
def test_levels_from_flags(flags, cap, env, want):
    assert cpu_info.levels_from_flags(flags, cap, env) == want


def test_supported_levels_prefers_parq_own_list():
    record = {"parq_levels": ["default", "avx2"], "flags": [], "torch_capability": "DEFAULT",
              "aten_cpu_capability_env": None}  # fmt: skip
    assert cpu_info.supported_levels(record) == ["default", "avx2"]
    assert cpu_info.supported_levels({**record, "parq_levels": []}) == ["default"]


def _payload(torch_cap: str, parq_level: str | None, rows: list[dict]) -> dict:
    cpu = {"model": "X", "flags": [], "torch_capability": torch_cap, "parq_level": parq_level,
           "parq_levels": [], "aten_cpu_capability_env": torch_cap.lower()}  # fmt: skip
    return {"environment": {"cpu": cpu}, "rows": rows}


def _row(case: str, variant: str, **values) -> dict:
    row = {"suite": "step", "case": case, "variant": variant}
    row.update({k: values.get(k) for k in ("time_vs_base", "speedup_vs_reference")})
    return row


def test_side_by_side_picks_the_compiled_backend_and_marks_other_levels():
    rows = [
        _row("c", "base(fused=True)", time_vs_base=1.0),
        _row("c", "fused:reference", time_vs_base=9.0, speedup_vs_reference=2.0),
        _row("c", "fused:cpu", time_vs_base=1.25, speedup_vs_reference=12.5),
        _row("c", "fused-prox:cpu", time_vs_base=2.5, speedup_vs_reference=5.0),
    ]
    payloads = {
        "default": _payload("DEFAULT", "default", rows),
        "avx2": _payload("AVX2", "default", rows[:3]),  # parq kept its default level
    }
    entries = levels.side_by_side(payloads)
    assert entries == [{
        "suite": "step", "case": "c",
        "default fused": 1.25, "default fused-prox": 2.5, "default public/fused": 12.5,
        "avx2 fused": 1.25, "avx2 fused-prox": None, "avx2 public/fused": 12.5,
    }]  # fmt: skip
    assert levels.served_note("default", payloads["default"]) == ""
    assert levels.served_note("avx2", payloads["avx2"]) == "parq served default"
    assert levels.served_note("avx512", payloads["avx2"]) == ("torch ran AVX2, parq served default")
    text = levels.table(payloads, entries)
    assert "avx2 fused*" in text and "default fused*" not in text
    assert "avx2: torch capability AVX2" in text and "* parq served default" in text
    failed = {"default": {"error": "exit status 1: boom"}}
    assert levels.served_note("default", failed["default"]).startswith("failed: exit status 1")


def test_levels_argument_errors(monkeypatch, capsys):
    monkeypatch.setattr(cpu_info, "supported_levels", lambda record=None: ["default"])
    with pytest.raises(SystemExit) as exc:
        cli.main(["--smoke", "--levels", "avx512"])
    assert exc.value.code == 2
    assert "--levels avx512: this machine runs default only" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cli.main(["--smoke", "--levels", "sse"])
    assert "invalid choice" in capsys.readouterr().err
    args = cli.parse_args(["--smoke", "--levels", "--no-compile", "--repeats", "2"])
    assert args.levels == ["default"] and args.suites == ["step"]
    cmd = levels.child_command(args, "OUT")
    want = "-m benchmarks --smoke --suites step --device cpu --out OUT --no-progress"
    assert cmd[1:] == [*want.split(), "--no-compile", "--repeats", "2"]


def test_levels_smoke_run_writes_the_side_by_side_table(tmp_path, capsys):
    assert cli.main(["--smoke", "--levels", "default", "--out", str(tmp_path)]) == 0
    out = capsys.readouterr()
    assert "== level default (1/1) ==" in out.out and "[default] [1/4]" in out.err  # + memory
    (stem,) = {p.stem for p in tmp_path.iterdir()}
    assert stem.startswith("cpu-") and stem.endswith("_smoke_levels")
    payload = json.loads((tmp_path / f"{stem}.json").read_text())
    child = payload["levels"]["default"]
    cpu = child["environment"]["cpu"]
    assert cpu["aten_cpu_capability_env"] == "default" and cpu["torch_capability"] == "DEFAULT"
    assert cpu["parq_level"] in (None, "default") and child["served_note"] == ""
    names = [c.name for c in step_bench.smoke_cases()]
    assert [e["case"] for e in payload["side_by_side"]] == names
    with open(tmp_path / f"{stem}.csv") as f:
        table = list(csv.DictReader(f))
    assert [r["case"] for r in table] == names
    assert all(float(r["default fused"]) > 0 and float(r["default public/fused"]) > 0
               for r in table)  # fmt: skip
    md = (tmp_path / f"{stem}.md").read_text()
    assert md.startswith("**CPU**: ") and "| case | default fused | default fused-prox |" in md
    assert "- default: torch capability DEFAULT (ATEN_CPU_CAPABILITY=default)" in md


def test_quick_grid_has_the_hard_phase_and_bf16_cases():
    names = {c.name: c for c in cli.mode_config("quick").step_cases}
    for period in (10, 1):
        for base in ("sgd", "adamw"):
            tail = f"{base}/period{period}"
            for kind in ("hard/channel", "parq-annealed/channel", "parq-annealed/tensor"):
                case = names[f"8xLinear1024/uniform2+{kind}/{tail}"]
                assert case.skip == ("base",)
            for kind in ("parq/channel", "hard/tensor"):
                case = names[f"8xLinear1024/uniform2+{kind}/{tail}/bf16"]
                assert case.dtype == torch.bfloat16 and "generic" in case.skip
    full = {c.name for c in cli.mode_config("full").step_cases}
    added = {n for n in names if n.startswith("8xLinear1024/uniform2+")
             and ("hard/channel" in n or "annealed" in n or n.endswith("/bf16"))}  # fmt: skip
    assert len(added) == 20 and added <= full


def test_parq_annealed_case_times_only_hard_steps():
    specs = tuple(step_bench.shapes.linear_stack(2, 16))
    case = step_bench.StepCase("2xLinear16", specs, prox="parq-annealed", period=1)
    period = step_bench.build(case, torch.device("cpu"), "fused:reference")
    opt = period.optimizer
    assert opt.num_steps == step_bench.PARQ_ANNEALED_END  # the untimed step ran
    period()
    assert opt.prox_map.schedule(opt.num_steps - 1)[0] == ProxKind.HARD
    for p in opt.param_groups[0]["params"]:  # hard: every weight is one of its row's levels
        q = opt.state[p]["quants"]
        assert (p.detach()[:, :, None] == q[:, None, :]).any(-1).all()


def test_side_by_side_diffq_and_fakequant_columns():
    rows = [
        _row("diffq/mlp4x256/g8/b64", "base", time_vs_base=1.0),
        _row("diffq/mlp4x256/g8/b64", "diffq:cpu", time_vs_base=1.5, speedup_vs_reference=3.0),
        {**_row("fake_quantize/2x4x8x8", "torch kernel", time_vs_base=4.0), "suite": "fakequant"},
    ]
    (diffq, fq) = levels.side_by_side({"avx2": _payload("AVX2", None, rows)})
    assert diffq["avx2 fused"] == 1.5 and diffq["avx2 public/fused"] is None
    assert fq == {"suite": "fakequant", "case": "fake_quantize/2x4x8x8",
                  "avx2 kernel/composed": 4.0, "avx2 qat/float": None}  # fmt: skip
