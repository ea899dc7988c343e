"""``python -m benchmarks [--quick|--full|--smoke] [--out DIR] [--levels [LEVEL ...]]``.

Reports the environment, measures the copy bandwidth, runs the op micro-benchmarks
(the fused ops and the packed-export ops) and the ``QuantOptimizer.step()``
benchmarks on every available backend, then prints the tables and writes
``<device>_<date>_<mode>.{csv,json,md,png}``. ``--levels`` runs the suites once per CPU
instruction-set level in child processes instead (:mod:`benchmarks.levels`).
"""

from __future__ import annotations

import argparse
import datetime
import sys
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from types import ModuleType

import torch

from benchmarks import (
    cpu_info,
    diffq_bench,
    environment,
    fakequant_bench,
    levels,
    memory,
    op_bench,
    pack_bench,
    report,
    step_bench,
)
from benchmarks.cli_checks import check_device, check_out_dir, optional_module

DEFAULT_OUT = Path(__file__).resolve().parent / "results"
SUITES = ("op", "step", "fakequant")
# quick mode's hard-phase and bf16 step cases: 3 timed repeats (the headline 9), and no
# `base` (torch's default kernels) nor bf16 `generic`, so that they add < ~40 s on 2 cores
QUICK_ADDED_REPEATS = 3
# the headline's model sets (ResNet-20, ViT-B/16 blocks, Llama-style blocks, the 4-bit recipe)
# get 5 in quick mode and leave out `base`; the 3- / 4-bit cases get 3, SGD only (both bases
# in full mode), and time neither `base`, `generic` nor `fused-prox` (the fused step against
# torch's fused step only)
QUICK_MODEL_REPEATS = 5
QUICK_LOW_BIT_BASES = ("sgd",)
QUICK_LOW_BIT_SKIP = ("base", "generic", "fused-prox")
QUICK_HOST_REPEATS = 15  # the host-time cases: a timed call is ~2 ms, the spread is wide


@dataclass(frozen=True)
class Mode:
    op_cases: list
    step_cases: list
    op_shape: tuple[int, int, int]  # (tensors, rows, cols) per op case
    repeats: int
    warmup: int
    step_repeats: int
    copy_bytes: int
    fakequant_cases: list = ()
    fused_reference: bool = True  # time fused:reference steps when a compiled backend exists
    pack_cases: list = field(default_factory=list)  # packed-export ops (op suite)
    diffq_cases: list = field(default_factory=list)  # DiffQ training steps (step suite)
    memory_cases: list = field(default_factory=list)  # state and peak memory (step suite)


def mode_config(name: str) -> Mode:
    if name == "smoke":
        return Mode(
            op_cases=op_bench.smoke_grid(),
            step_cases=step_bench.smoke_cases(),
            op_shape=(1, 8, 64),
            repeats=3,
            warmup=1,
            step_repeats=3,
            copy_bytes=1 << 22,
            pack_cases=pack_bench.smoke_grid(),
            fakequant_cases=fakequant_bench.smoke_cases(),
            memory_cases=step_bench.smoke_cases()[:1],
        )
    if name == "quick":
        headline = step_bench.issue4_cases(repeats=9)
        models = step_bench.headline_model_cases(quick=True, repeats=QUICK_MODEL_REPEATS)
        models = [replace(c, skip=("base",)) for c in models]
        return Mode(
            op_cases=op_bench.quick_grid(),
            step_cases=headline
            + models
            + step_bench.low_bit_cases(QUICK_LOW_BIT_BASES, QUICK_ADDED_REPEATS, QUICK_LOW_BIT_SKIP)
            + step_bench.hard_phase_cases(repeats=QUICK_ADDED_REPEATS, skip=("base",))
            + step_bench.bf16_cases(repeats=QUICK_ADDED_REPEATS, skip=("base", "generic"))
            + step_bench.model_cases(quick=True)
            + step_bench.host_cases(repeats=QUICK_HOST_REPEATS, skip=QUICK_LOW_BIT_SKIP),
            op_shape=(2, 256, 1024),
            repeats=5,
            warmup=1,
            step_repeats=3,
            copy_bytes=1 << 27,
            fakequant_cases=fakequant_bench.quick_cases(),
            fused_reference=False,
            pack_cases=pack_bench.quick_grid(),
            diffq_cases=diffq_bench.quick_cases(),
            memory_cases=memory_cases(headline + models),
        )
    headline = step_bench.issue4_cases() + step_bench.headline_model_cases(quick=False)
    return Mode(
        op_cases=op_bench.full_grid(),
        step_cases=headline
        + step_bench.low_bit_cases()
        + step_bench.hard_phase_cases()
        + step_bench.bf16_cases()
        + step_bench.model_cases(quick=False)
        + step_bench.host_cases(),
        op_shape=(4, 1024, 4096),
        repeats=20,
        warmup=3,
        step_repeats=10,
        copy_bytes=1 << 30,
        pack_cases=pack_bench.full_grid(),
        diffq_cases=diffq_bench.full_cases(),
        fakequant_cases=fakequant_bench.full_cases(),
        memory_cases=memory_cases(headline),
    )


def memory_cases(headline: list) -> list:
    """The headline's sets at ``quant_period`` 10, one case per set, base, quantizer and
    dtype: 8 x Linear(1024, 1024) uniform 2-bit + PARQ with SGD and AdamW, the model sets
    (the 4-bit recipe in float32 and bf16)."""
    return [c for c in headline if c.period == 10 and c.per_channel and c.quantizer != "lsbq"]


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks",
        description="Benchmark the fused op quant_prox_ and QuantOptimizer.step() on every "
        "available backend against the pure-PyTorch reference, and fake quantization against "
        "the float model; see benchmarks/README.md.",
    )
    size = parser.add_mutually_exclusive_group()
    size.add_argument(
        "--quick",
        dest="mode",
        action="store_const",
        const="quick",
        help="small grid and scaled-down models (default; minutes on a CPU)",
    )
    size.add_argument(
        "--full",
        dest="mode",
        action="store_const",
        const="full",
        help="the whole grid and full-size models (for GPUs)",
    )
    size.add_argument(
        "--smoke",
        dest="mode",
        action="store_const",
        const="smoke",
        help="tiny shapes, a couple of cases (seconds; used by the tests)",
    )
    parser.add_argument(
        "--out",
        type=Path,
        default=DEFAULT_OUT,
        help="results directory (default: benchmarks/results)",
    )
    parser.add_argument(
        "--device", default=None, help="cpu or cuda[:i] (default: cuda if available, else cpu)"
    )
    parser.add_argument(
        "--suites",
        nargs="+",
        choices=SUITES,
        default=None,
        help="which suites to run (default: all, with --levels: step; a partial run's files are "
        "named after its suites)",
    )
    parser.add_argument(
        "--no-compile", action="store_true", help="skip the torch.compile baselines"
    )
    parser.add_argument(
        "--repeats",
        type=int,
        default=None,
        help="timed repeats per measurement (default: per mode)",
    )
    parser.add_argument("--no-progress", action="store_true", help="plain progress lines")
    parser.add_argument(
        "--levels",
        nargs="*",
        choices=cpu_info.LEVELS,
        default=None,
        metavar="LEVEL",
        help="run the suites (default: step) once per CPU level, each in a child process with "
        "ATEN_CPU_CAPABILITY=<level>, and write one side-by-side table; no LEVEL: every level "
        f"this machine supports ({', '.join(cpu_info.LEVELS)})",
    )
    args = parser.parse_args(argv)  # fmt: skip
    args.mode = args.mode or "quick"
    args.argv = list(sys.argv[1:] if argv is None else argv)
    args.suites = args.suites or (["step"] if args.levels is not None else list(SUITES))
    args.suites = [s for s in SUITES if s in args.suites]
    default_device = "cpu" if args.levels is not None else None
    default_device = default_device or ("cuda" if torch.cuda.is_available() else "cpu")
    args.device = check_device(parser, args.device or default_device)
    if args.levels is not None:
        if args.device.type != "cpu":
            parser.error("--levels times the CPU kernels: use it with --device cpu")
        args.levels = levels.supported_or_error(parser, args.levels)
    if args.repeats is not None and args.repeats < 1:
        parser.error(f"--repeats must be >= 1, got {args.repeats}")
    check_out_dir(parser, args.out)
    return args


class Progress:
    """A tqdm bar (``tqdm``: the module, or None for one plain line per item)."""

    def __init__(self, total: int, tqdm: ModuleType | None):
        self.bar = None
        if tqdm is not None:
            self.bar = tqdm.tqdm(total=total, unit="case", file=sys.stderr, dynamic_ncols=True)
        self.total, self.done = total, 0

    def step(self, label: str) -> None:
        self.done += 1
        if self.bar is not None:
            self.bar.set_description_str(label[:60])
            self.bar.update(1)
        else:
            print(f"[{self.done}/{self.total}] {label}", file=sys.stderr, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.levels is not None:
        return levels.main(args)
    # optional packages, reported before any work: without them, plain output
    tqdm = None if args.no_progress else optional_module("tqdm", "plain progress lines")
    matplotlib = optional_module("matplotlib", "no chart (.png)")
    mode, device = mode_config(args.mode), args.device
    repeats = args.repeats or mode.repeats
    step_repeats = args.repeats or mode.step_repeats
    t_start = time.perf_counter()
    env = environment.environment(device)
    available = env["backends_available"]
    copy_gbps, copy_timing = environment.copy_bandwidth(device, mode.copy_bytes)
    print(report.environment_text(env, copy_gbps), flush=True)

    op_cases = mode.op_cases if "op" in args.suites else []
    pack_cases = mode.pack_cases if "op" in args.suites else []
    step_cases = mode.step_cases if "step" in args.suites else []
    diffq_cases = mode.diffq_cases if "step" in args.suites else []
    fq_cases = list(mode.fakequant_cases) if "fakequant" in args.suites else []
    mem_cases = mode.memory_cases if "step" in args.suites else []
    total = len(op_cases) + len(pack_cases) + len(step_cases) + len(diffq_cases) + len(fq_cases)
    total += len(mem_cases)
    progress = Progress(total, tqdm)
    rows: list[dict] = []
    n_tensors, n_rows, n_cols = mode.op_shape
    op_suites = [(op_bench, case) for case in op_cases] + [(pack_bench, c) for c in pack_cases]
    for bench, case in op_suites:  # the fused ops, then the packed-export ops: same harness
        for variant, timing, inputs, note in bench.run_case(
            case,
            device,
            available,
            compile_baseline=not args.no_compile,
            n_tensors=n_tensors,
            rows=n_rows,
            cols=n_cols,
            repeats=repeats,
            warmup=mode.warmup,
        ):
            rows.append(report.make_row("op", case.name, variant, inputs.numel, inputs.bytes,
                                        timing, note))  # fmt: skip
        progress.step(case.name)
    for case in step_cases:
        for variant, timing, note in step_bench.run_case(
            case,
            device,
            available,
            repeats=args.repeats or case.repeats or step_repeats,
            warmup=mode.warmup,
            fused_reference=mode.fused_reference,
        ):
            rows.append(report.make_row("step", case.name, variant, case.numel,
                                        case.bytes(variant), timing, note))  # fmt: skip
        progress.step(case.name)
    for case in diffq_cases:
        timed = diffq_bench.run_case(case, device, available, repeats=step_repeats,
                                     warmup=mode.warmup)  # fmt: skip
        for variant, timing, note in timed:
            rows.append(report.make_row("step", case.name, variant, case.numel,
                                        case.bytes(variant), timing, note))  # fmt: skip
        progress.step(case.name)
    mem_backend = next((b for b in available if b != "reference"), "reference")  # compiled
    mem_rows = []
    for case in mem_cases:  # state bytes and one step's peak (benchmarks/memory.py)
        mem_rows.append(memory.measure_case(case, device, mem_backend))
        progress.step(f"memory {case.name}")
    for case in fq_cases:
        for variant, timing, note in fakequant_bench.run_case(
            case, device, compile_baseline=not args.no_compile, repeats=repeats,
            warmup=mode.warmup,
        ):  # fmt: skip
            rows.append(report.make_row("fakequant", case.name, variant, case.numel,
                                        case.bytes(), timing, note))  # fmt: skip
        progress.step(case.name)
    progress.close()
    report.derive(rows, copy_gbps)

    for suite, title in report.SUITE_TITLES.items():
        if any(r["suite"] == suite for r in rows):
            note = report.fakequant_level_note(env) if suite == "fakequant" else ""
            print(f"\n== {title} ==\n" + (f"{note}\n" if note else "") + report.table(rows, suite))
        if suite == "step" and mem_rows:
            print(f"\n== {report.MEMORY_TITLE} ==\n" + memory.table(mem_rows))
    elapsed = time.perf_counter() - t_start
    date = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d")
    stem = args.out / f"{environment.device_slug(device)}_{date}_{args.mode}"
    if set(args.suites) != set(SUITES):  # a partial run never overwrites a whole one
        stem = stem.with_name(stem.name + "_" + "-".join(s for s in SUITES if s in args.suites))
    payload = {
        "mode": args.mode,
        "date_utc": date,
        "command": ["python", "-m", "benchmarks", *args.argv],
        "elapsed_s": elapsed,
        "environment": env,
        "copy_bandwidth_gbps": copy_gbps,
        "copy_timing_s": copy_timing.as_dict(),
        "op_shape": {"tensors": n_tensors, "rows": n_rows, "cols": n_cols},
        "byte_models": {
            "op": op_bench.__doc__.split("Byte model")[1].strip(),
            "pack": pack_bench.__doc__.split("Byte model")[1].strip(),
            "step": step_bench.__doc__.split("Byte model")[1].strip(),
            "diffq": diffq_bench.__doc__.split("Byte model")[1].strip(),
            "fakequant": fakequant_bench.__doc__.split("Byte model")[1].strip(),
        },
        "rows": rows,
        "memory": mem_rows,
        "memory_method": memory.__doc__.split("\n\n", 1)[1].strip(),
    }
    report.write_csv(rows, stem.with_suffix(".csv"))
    report.write_json(payload, stem.with_suffix(".json"))
    report.write_markdown(rows, env, copy_gbps, stem.with_suffix(".md"), mem_rows)
    suffixes = "csv,json,md"
    if matplotlib is not None:
        title = f"parq benchmarks, {env['device_name']} ({args.mode}, {date})"
        report.write_chart(rows, title, stem.with_suffix(".png"))
        suffixes += ",png"
    print(f"\nwrote {stem}.{{{suffixes}}} in {elapsed:.0f} s")
    return 0
