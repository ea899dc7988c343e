"""Result rows -> derived columns, terminal table, CSV, JSON, Markdown and PNG.

One row per (suite, case, variant). Derived columns, all from the same run:

* ``gbps`` = bytes (the suite's byte model) / median time;
* ``frac_copy_bw`` ("of best BW") = ``gbps`` / the best bandwidth measured on the
  case's working set in this run: the case's own ``stream`` row (an in-place
  ``a.add_(b)`` over a working set of the case's size, timed in the same round-robin;
  else the device's copy bandwidth measured at the start of the run) or any of the
  case's variants, whichever is higher (torch's fused optimizer steps, and kernels with
  streaming stores, can move their bytes faster than ``add_``), so it is at most 100 %;
* ``speedup_vs_reference`` = median of the case's reference row / this median
  (op suite: the ``reference`` backend; step suite: the ``generic`` path);
* ``speedup_vs_compile`` = median of ``reference(compile)`` / this median (op suite);
* ``time_vs_base`` = this median / median of the base optimizer's step alone with
  torch's ``fused=True`` kernels (``base(fused=True)``; ``base`` where that is absent)
  (step suite); of the float model (``float``) or of the composed fake-quantize ops
  (``composed``) (fakequant suite).

Rows without a byte model (``bytes`` None: the fakequant suite's model cases) have no
GB/s or bandwidth fraction.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

from benchmarks import cpu_info, memory

COLUMNS = [
    "suite",
    "case",
    "variant",
    "numel",
    "bytes",
    "median_ms",
    "q1_ms",
    "q3_ms",
    "min_ms",
    "max_ms",
    "repeats",
    "gbps",
    "frac_copy_bw",
    "speedup_vs_reference",
    "speedup_vs_compile",
    "time_vs_base",
    "note",
]
REFERENCE_VARIANT = {"op": "reference", "step": "generic"}
COMPILE_VARIANT = "reference(compile)"
STREAM_VARIANT = "stream"
FUSED_BASE_VARIANT = "base(fused=True)"
BASE_VARIANTS = {"step": (FUSED_BASE_VARIANT, "base"), "fakequant": ("float", "composed")}
SUITE_TITLES = {
    "op": "ops: fused quant_prox_ / fused_step_, packed export, DiffQ",
    "step": "QuantOptimizer.step()",
    "fakequant": "fake quantization (parq.fakequant), forward + backward",
}
MEMORY_TITLE = "memory: optimizer state and one step's peak (step suite)"
TABLE_COLUMNS = [
    ("case", "case", "{}"),
    ("variant", "variant", "{}"),
    ("median_ms", "median ms", "{:.3f}"),
    ("iqr_ms", "IQR ms", "{:.3f}"),
    ("gbps", "GB/s", "{:.2f}"),
    ("frac_copy_bw", "of best BW", "{:.1%}"),
    ("speedup_vs_reference", "x vs ref", "{:.2f}"),
    ("speedup_vs_compile", "x vs compile", "{:.2f}"),
    ("time_vs_base", "t / torch fused", "{:.2f}"),
]


def make_row(suite: str, case: str, variant: str, numel: int, nbytes: int, timing, note=""):
    """A row with the measured columns filled in (``timing`` may be None: not measured)."""
    row = {c: None for c in COLUMNS}
    row.update(suite=suite, case=case, variant=variant, numel=numel, bytes=nbytes, note=note)
    if timing is not None:
        row.update(
            median_ms=timing.median * 1e3,
            q1_ms=timing.q1 * 1e3,
            q3_ms=timing.q3 * 1e3,
            min_ms=timing.min * 1e3,
            max_ms=timing.max * 1e3,
            repeats=timing.repeats,
        )
    return row


def _ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None


def derive(rows: list[dict], copy_gbps: float) -> list[dict]:
    """Fill in the derived columns in place (see module doc); returns ``rows``."""
    by_case: dict[tuple[str, str], dict[str, dict]] = {}
    for row in rows:
        by_case.setdefault((row["suite"], row["case"]), {})[row["variant"]] = row
    for row in rows:
        if row["bytes"] and row["median_ms"] is not None:
            row["gbps"] = row["bytes"] / (row["median_ms"] * 1e-3) / 1e9
    for row in rows:
        med = row["median_ms"]
        if med is None:
            continue
        peers = by_case[(row["suite"], row["case"])]
        if row["bytes"]:
            stream = peers.get(STREAM_VARIANT, {})
            stream_med = stream.get("median_ms")
            own = stream["bytes"] / (stream_med * 1e-3) / 1e9 if stream_med else copy_gbps
            best = max([own] + [p["gbps"] for p in peers.values() if p.get("gbps")])
            row["frac_copy_bw"] = row["gbps"] / best
        if row["variant"] == STREAM_VARIANT:
            continue
        if row["suite"] in REFERENCE_VARIANT and not row["variant"].startswith("base"):
            ref = peers.get(REFERENCE_VARIANT[row["suite"]], {}).get("median_ms")
            row["speedup_vs_reference"] = _ratio(ref, med)  # (the base step is no QAT)
        if row["suite"] == "op":
            row["speedup_vs_compile"] = _ratio(peers.get(COMPILE_VARIANT, {}).get("median_ms"), med)
        else:
            base = next((peers[v] for v in BASE_VARIANTS[row["suite"]] if v in peers), {})
            row["time_vs_base"] = _ratio(med, base.get("median_ms"))
    return rows


def _cell(row: dict, key: str, fmt: str) -> str:
    if key == "iqr_ms":
        value = None if row["q3_ms"] is None else row["q3_ms"] - row["q1_ms"]
    else:
        value = row[key]
    if value is None:
        return "-" if key != "median_ms" or not row["note"] else "n/a"
    return fmt.format(value)


def table(rows: list[dict], suite: str, markdown: bool = False) -> str:
    """The rows of one suite as an aligned text table (or a Markdown table)."""
    keys = [c for c in TABLE_COLUMNS if not (suite == "op" and c[0] == "time_vs_base")]
    if suite == "step":
        keys = [c for c in keys if c[0] != "speedup_vs_compile"]
    if suite == "fakequant":  # t / the float model or the composed ops
        keys = [c for c in keys if not c[0].startswith("speedup")]
        keys[-1] = ("time_vs_base", "t / base", "{:.2f}")
    header = [c[1] for c in keys]
    mine = [r for r in rows if r["suite"] == suite]
    body = [[_cell(r, k, f) for k, _, f in keys] for r in mine]
    notes = [f"{r['case']} {r['variant']}: {r['note']}" for r in mine if r["note"]]
    if markdown:
        lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        lines += ["| " + " | ".join(cells) + " |" for cells in body]
    else:
        widths = [max(len(x) for x in col) for col in zip(header, *body, strict=True)]
        fmt = "  ".join(f"{{:{'<' if i < 2 else '>'}{w}}}" for i, w in enumerate(widths))
        lines = [fmt.format(*header), "  ".join("-" * w for w in widths)]
        lines += [fmt.format(*cells) for cells in body]
    return "\n".join(lines + [f"note: {n}" for n in notes])


def environment_text(env: dict, copy_gbps: float) -> str:
    lines = [
        f"device: {env['device']} ({env['device_name']}), torch threads: {env['cpu_threads']}, "
        f"cpu count: {env['cpu_count']}",
        f"python {env['python']}, torch {env['torch']}, triton {env['triton']}",
        f"copy bandwidth (read + write): {copy_gbps:.2f} GB/s",
        f"backends benchmarked: {', '.join(env['backends_available'])}",
    ]
    if env.get("cpu"):  # the CPU's flags and levels (benchmarks/cpu_info.py)
        lines[1:1] = cpu_info.describe(env["cpu"]).splitlines()
    lines += [f"backend {k} not benchmarked: {v}" for k, v in env["backends_missing"].items()]
    return "\n".join(lines)


def write_csv(rows: list[dict], path: Path) -> None:
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS)
        writer.writeheader()
        for row in rows:
            writer.writerow({k: ("" if v is None else v) for k, v in row.items()})


def write_json(payload: dict, path: Path) -> None:
    path.write_text(json.dumps(payload, indent=2, default=str) + "\n")


def cpu_headline(env: dict) -> str:
    """The CPU and the level that served, for the top of a report (Markdown)."""
    cpu = env.get("cpu")
    if not cpu:
        return f"**Device**: {env.get('device_name')}"
    return f"**CPU**: {cpu['model']}; {cpu_info.level_text(cpu)}"


def fakequant_level_note(env: dict) -> str:
    """Where the composed-ops-vs-torch-kernel choice of ``parq.fakequant`` was measured:
    both run torch's own CPU kernels, so at torch's capability (one CPU, one level; other
    levels: ``python -m benchmarks --levels --suites fakequant``)."""
    cpu = env.get("cpu")
    if not cpu or not str(env.get("device", "")).startswith("cpu"):
        return ""
    return (f"`composed` vs `torch kernel` measured on {cpu['model']} at torch capability "
            f"{cpu['torch_capability']} (other levels: `--levels --suites fakequant`)")  # fmt: skip


def write_markdown(rows: list[dict], env: dict, copy_gbps: float, path: Path,
                   memory_rows: list[dict] | None = None) -> None:  # fmt: skip
    text = [cpu_headline(env), "", "```", environment_text(env, copy_gbps), "```", ""]
    headings = {
        "op": "Ops",
        "step": "QuantOptimizer.step()",
        "fakequant": "Fake quantization (t / base: the float model, or the composed ops)",
    }
    notes = {"fakequant": fakequant_level_note(env)}
    for suite, heading in headings.items():
        if any(r["suite"] == suite for r in rows):  # a partial run: its suites only
            note = [notes[suite], ""] if notes.get(suite) else []
            text += [f"### {heading}", "", *note, table(rows, suite, markdown=True), ""]
        if suite == "step" and memory_rows:
            text += ["### Memory", "", memory.table(memory_rows, markdown=True), ""]
    path.write_text("\n".join(text))


def write_chart(rows: list[dict], title: str, path: Path) -> None:
    """Panels: op throughput as a fraction of the best bandwidth on its working set, step
    time relative to torch's fused base step, per case and variant."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [
        ("op", "frac_copy_bw", "fused ops: fraction of the best bandwidth on the working set"),
        ("step", "time_vs_base", "QuantOptimizer.step(): time / torch's fused=True step (log)"),
        ("fakequant", "time_vs_base", "fake quantization: time / float model or composed ops"),
    ]
    panels = [p for p in panels if any(r["suite"] == p[0] for r in rows)] or panels[:2]
    n_cases = [len({r["case"] for r in rows if r["suite"] == s}) for s, _, _ in panels]
    fig, axes = plt.subplots(1, len(panels), figsize=(7.5 * len(panels), 1.5 + 0.45 * max(
        n_cases + [4])), squeeze=False)  # fmt: skip
    for ax, (suite, key, label) in zip(axes[0], panels, strict=True):
        data = [r for r in rows if r["suite"] == suite and r[key] is not None
                and r["variant"] != STREAM_VARIANT]  # fmt: skip
        cases = list(dict.fromkeys(r["case"] for r in data))
        variants = list(dict.fromkeys(r["variant"] for r in data))
        colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
        labelled: set[str] = set()
        for c_i, case in enumerate(cases):  # a case's own variants, centred on its tick
            own = [r for r in data if r["case"] == case]
            height = 0.8 / max(1, len(own))
            for k, r in enumerate(own):
                v = r["variant"]
                ax.barh(c_i + (k - (len(own) - 1) / 2) * height, r[key], height=height,
                        color=colors[variants.index(v) % len(colors)],
                        label=None if v in labelled else v)  # fmt: skip
                labelled.add(v)
        ax.set_yticks(range(len(cases)), cases, fontsize=7)
        ax.set_ylim(-0.5, len(cases) - 0.5)
        ax.invert_yaxis()
        ax.set_title(label, fontsize=9)
        if suite != "op" and data:
            ax.set_xscale("log")
            ax.axvline(1.0, color="k", lw=0.8)
        if variants:
            ax.legend(fontsize=7, loc="lower right" if suite != "fakequant" else "best")
    fig.suptitle(title, fontsize=10)
    fig.tight_layout(rect=(0, 0, 1, 1 - 0.45 / fig.get_figheight()))  # room for the title
    fig.savefig(path, dpi=110)
    plt.close(fig)
