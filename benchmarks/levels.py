"""``python -m benchmarks --levels [LEVEL ...]``: the suites once per CPU level, side by side.

Each level runs in a child process, ``python -m benchmarks --<mode> --suites <suites>
--device cpu --no-progress`` with ``ATEN_CPU_CAPABILITY=<level>`` in its environment,
so that torch's own kernels (the ``fused=True`` yardstick, the fake-quantize kernel)
run at the same level as parq's (SPEC.md §14: parq's ``cpu`` backend takes its level
from torch's capability). The variable is read once at process start, hence one
process per level. The children's progress lines are echoed with the level in front;
each child writes its JSON to a temporary folder, and this parent collects them.

One table follows, a row per case, per level these columns (all ratios of medians of
that level's run):

* step suite: ``fused`` (the fused step / torch's ``fused=True`` step), ``fused-prox``
  (``fuse_base_step=False`` / torch's step), ``public/fused`` (the public-style
  ``generic`` step / the fused step: how many times faster; ``quant_period=1`` only);
* fakequant suite: ``kernel/composed`` (torch's fake-quantize kernel / the composed ops:
  above 1 backs the composed ops that ``parq.fakequant`` runs on CPUs) and ``qat/float``;
* op suite: ``ref/fused`` (the reference backend / the compiled one: a speedup).

Which level served each child comes from its own environment record (torch's capability
and parq's ``cpu_level()``); where either differs from the level asked for, the table
says so. Files: ``<cpu>_<date>_<mode>_levels[_<suites>].{json,md,csv}``; the JSON holds
every child's whole payload (environment, copy bandwidth, rows).
"""

from __future__ import annotations

import argparse
import csv
import datetime
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from benchmarks import cpu_info, environment, report

REPO_ROOT = Path(__file__).resolve().parent.parent
NA = cpu_info.NOT_AVAILABLE
PICK_SKIP = ("stream", "reference(compile)")
# per suite: (column, variant or prefixes ending in ":" joined by "|", row key)
COLUMNS = {
    "step": [("fused", "fused:|diffq:", "time_vs_base"),
             ("fused-prox", "fused-prox:", "time_vs_base"),
             ("public/fused", "fused:", "speedup_vs_reference")],
    "fakequant": [("kernel/composed", "torch kernel", "time_vs_base"),
                  ("qat/float", "qat:w8a8", "time_vs_base")],
    "op": [("ref/fused", "", "speedup_vs_reference")],
}  # fmt: skip


LEGEND = {
    "step": "fused = the fused step / torch's fused=True step (DiffQ rows: the DiffQ step / "
    "the plain step); fused-prox = "
    "fuse_base_step=False / torch's step; public/fused = the public-style step / the fused "
    "step (x faster; quant_period=1 only)",
    "fakequant": "kernel/composed = torch's fake-quantize kernel / the composed ops "
    "(> 1: the composed ops that parq.fakequant runs on CPUs are faster); qat/float = the "
    "W8A8 QAT model / the float model",
    "op": "ref/fused = the reference backend / the compiled one (x faster)",
}


def child_command(args: argparse.Namespace, out_dir: Path) -> list[str]:
    cmd = [sys.executable, "-m", "benchmarks", f"--{args.mode}", "--suites", *args.suites]
    cmd += ["--device", "cpu", "--out", str(out_dir), "--no-progress"]
    cmd += ["--no-compile"] if args.no_compile else []
    return cmd + (["--repeats", str(args.repeats)] if args.repeats else [])


def run_child(level: str, args: argparse.Namespace, out_dir: Path) -> dict:
    """Run one level's child; its payload, or ``{"error": ...}`` if it failed."""
    env = {**os.environ, cpu_info.ENV_VAR: level}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH")]))
    tail: list[str] = []
    with open(out_dir / "stdout.txt", "w") as stdout:
        proc = subprocess.Popen(child_command(args, out_dir), cwd=REPO_ROOT, env=env,
                                stdout=stdout, stderr=subprocess.PIPE, text=True)  # fmt: skip
        for line in proc.stderr:  # progress lines, notes, a traceback
            print(f"[{level}] {line.rstrip()}", file=sys.stderr, flush=True)
            tail = (tail + [line.rstrip()])[-20:]
        code = proc.wait()
    found = sorted(out_dir.glob("*.json"))
    if code != 0 or len(found) != 1:
        return {"error": f"exit status {code}: " + " | ".join(tail[-5:])}
    return json.loads(found[0].read_text())


def served_note(level: str, payload: dict) -> str:
    """'' when torch and parq (where it reports a level) ran ``level``, else what ran."""
    if "error" in payload:
        return "failed: " + payload["error"]
    cpu = payload["environment"].get("cpu", {})
    notes = []
    if str(cpu.get("torch_capability", "")).lower() != level:
        notes.append(f"torch ran {cpu.get('torch_capability')}")
    if cpu.get("parq_level") is not None and cpu["parq_level"] != level:
        notes.append(f"parq served {cpu['parq_level']}")
    return ", ".join(notes)


def served_text(level: str, payload: dict) -> str:
    """What ran in ``level``'s child (its environment record), and ``*`` with what
    differs from the level asked for."""
    cpu = payload.get("environment", {}).get("cpu")
    note = served_note(level, payload)
    ran = cpu_info.level_text(cpu) if cpu else NA
    return ran + (f"; * {note}" if note else "") if "error" not in payload else note


def _pick(rows: dict[str, dict], variant: str) -> str | None:
    """``variant``, or for prefixes (``fused:|diffq:``; ``""``: the op suite's backends)
    the first compiled backend's variant of the first prefix present, else the
    reference backend's."""
    if variant and not variant.endswith(":"):
        return variant
    for prefix in variant.split("|"):
        names = [v for v in rows if v.startswith(prefix) and v not in PICK_SKIP
                 and (prefix or ":" not in v)]  # fmt: skip
        names.sort(key=lambda v: v.endswith("reference"))
        if names:
            return names[0]
    return None


def side_by_side(payloads: dict[str, dict]) -> list[dict]:
    """One dict per (suite, case): ``suite``, ``case`` and ``<level> <column>`` values."""
    cases: dict[tuple[str, str], dict[str, dict[str, dict]]] = {}
    for level, payload in payloads.items():
        for row in payload.get("rows", []):
            by_level = cases.setdefault((row["suite"], row["case"]), {})
            by_level.setdefault(level, {})[row["variant"]] = row
    out = []
    for (suite, case), by_level in cases.items():
        entry = {"suite": suite, "case": case}
        for level in payloads:
            for column, variant, key in COLUMNS.get(suite, []):
                rows = by_level.get(level, {})
                entry[f"{level} {column}"] = rows.get(_pick(rows, variant), {}).get(key)
        out.append(entry)
    return out


def table(payloads: dict[str, dict], entries: list[dict], markdown: bool = False) -> str:
    """The side-by-side table (one per suite present), and the served-level lines."""
    lines = []
    for suite in COLUMNS:
        mine = [e for e in entries if e["suite"] == suite]
        if not mine:
            continue
        keys = [f"{lvl} {c}" for lvl in payloads for c, _, _ in COLUMNS[suite]]
        keys = [k for k in keys if any(e[k] is not None for e in mine)] or keys
        header = ["case"] + [k + ("*" if served_note(k.split()[0], payloads[k.split()[0]])
                                  else "") for k in keys]  # fmt: skip
        body = [[e["case"]] + ["-" if e[k] is None else f"{e[k]:.2f}" for k in keys] for e in mine]
        if markdown:
            lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
            lines += ["| " + " | ".join(r) + " |" for r in body] + [""]
        else:
            widths = [max(len(x) for x in col) for col in zip(header, *body, strict=True)]
            fmt = "  ".join(f"{{:{'<' if i == 0 else '>'}{w}}}" for i, w in enumerate(widths))
            lines += [fmt.format(*header), "  ".join("-" * w for w in widths)]
            lines += [fmt.format(*r) for r in body] + [""]
    for level, payload in payloads.items():
        lines.append(f"{'- ' if markdown else ''}{level}: {served_text(level, payload)}")
    legend = [LEGEND[s] for s in COLUMNS if any(e["suite"] == s for e in entries)]
    legend = ["Ratios of each level's medians. " + "; ".join(legend) + ". *: the level that "
              "ran differs from the one asked for (below)."]  # fmt: skip
    return "\n".join(legend + [""] + lines)


def supported_or_error(parser: argparse.ArgumentParser, asked: list[str]) -> list[str]:
    """The levels to run: ``asked`` (all this machine supports when empty), checked."""
    have = cpu_info.supported_levels()
    bad = [lvl for lvl in asked if lvl not in have]
    if bad:
        parser.error(f"--levels {' '.join(bad)}: this machine runs {', '.join(have)} only")
    return [lvl for lvl in cpu_info.LEVELS if lvl in (asked or have)]


def main(args: argparse.Namespace) -> int:
    t_start = time.perf_counter()
    record = cpu_info.cpu_record()
    print(cpu_info.describe(record), flush=True)
    what = f"suites: {' '.join(args.suites)}, {args.mode}"
    print(f"levels to run: {', '.join(args.levels)} ({what}; one child process each, "
          f"{cpu_info.ENV_VAR}=<level>)", flush=True)  # fmt: skip
    payloads: dict[str, dict] = {}
    for i, level in enumerate(args.levels, 1):
        print(f"\n== level {level} ({i}/{len(args.levels)}) ==", flush=True)
        t0 = time.perf_counter()
        with tempfile.TemporaryDirectory(prefix=f"parq-bench-{level}-") as tmp:
            payloads[level] = run_child(level, args, Path(tmp))
        print(f"level {level}: {served_text(level, payloads[level])} "
              f"({time.perf_counter() - t0:.0f} s)", flush=True)  # fmt: skip
    entries = side_by_side(payloads)
    print("\n== side by side: time / torch's fused step (and the other ratios) per level ==")
    print(table(payloads, entries), flush=True)

    date = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d")
    suites = "" if args.suites == ["step"] else "_" + "-".join(args.suites)
    stem = args.out / f"{environment.device_slug(torch.device('cpu'))}_{date}_{args.mode}_levels"
    stem = stem.with_name(stem.name + suites)
    elapsed = time.perf_counter() - t_start
    payload = {
        "mode": args.mode,
        "date_utc": date,
        "command": ["python", "-m", "benchmarks", *args.argv],
        "elapsed_s": elapsed,
        "cpu": record,
        "levels": {lvl: {"served_note": served_note(lvl, p), **p} for lvl, p in payloads.items()},
        "side_by_side": entries,
    }
    report.write_json(payload, stem.with_suffix(".json"))
    headline = f"**CPU**: {record['model']}; levels run: {', '.join(args.levels)}"
    stem.with_suffix(".md").write_text(f"{headline}\n\n{table(payloads, entries, True)}\n")
    keys = list(dict.fromkeys(k for e in entries for k in e))
    with open(stem.with_suffix(".csv"), "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=keys or ["suite", "case"], restval="")
        writer.writeheader()
        writer.writerows({k: ("" if v is None else v) for k, v in e.items()} for e in entries)
    print(f"\nwrote {stem}.{{json,md,csv}} in {elapsed:.0f} s")
    return 1 if any("error" in p for p in payloads.values()) else 0


__all__ = ["main", "side_by_side", "table", "served_note", "supported_or_error", "child_command"]
