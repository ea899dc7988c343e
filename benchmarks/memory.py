"""Memory of an optimizer step, measured: the state an optimizer keeps, and one step's peak.

Two numbers per parameter set (the step suite's ``memory`` section):

* **state bytes per parameter element** (:func:`state_bytes`): the bytes of the distinct
  tensor storages in ``optimizer.state``, after one step (states are created lazily),
  divided by the set's parameter elements (quantized or not), split by kind: ``latent``
  (the full-precision weights ``QuantOptimizer`` keeps), ``levels`` (``quants``, float32),
  ``moments`` (SGD's momentum buffer, Adam's ``exp_avg`` / ``exp_avg_sq``) and ``other``
  (Adam's per-parameter ``step`` scalars). Measured for torch's ``fused=True`` optimizer
  alone and for ``QuantOptimizer`` (its state is the base optimizer's, plus its own keys);
* **peak extra memory of one step** (:func:`peak_step_bytes`): the most memory the step
  holds at any time beyond what it held on entry. On a GPU: ``torch.cuda.max_memory_allocated``
  after ``reset_peak_memory_stats``, less the memory allocated before. On a CPU (no such
  counter): ``torch.profiler`` with ``profile_memory=True`` records every allocation and
  free of torch's CPU allocator with its size and time; the peak of their running sum
  within the step. Memory a C++ kernel takes with ``malloc`` / ``std::vector`` (the CPU
  kernels' per-thread row scratch) is not torch's and is not seen. Checked by the tests:
  0 for torch's fused SGD, ``2 n`` floats for ``(a * 2 + 1).sum()`` of ``n`` floats.
  ``QuantOptimizer`` is measured on a step between level updates and on an update step.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterator

import torch
from torch.profiler import ProfilerActivity, profile

from benchmarks import shapes, step_bench

STATE_KINDS = {
    "latent": "latent",
    "quants": "levels",
    "momentum_buffer": "moments",
    "exp_avg": "moments",
    "exp_avg_sq": "moments",
    "max_exp_avg_sq": "moments",
}
KINDS = ("latent", "levels", "moments", "other")
MIB = 1 << 20


def state_bytes(optimizer: torch.optim.Optimizer) -> dict[str, int]:
    """Bytes of the tensors in ``optimizer.state``, by kind (:data:`KINDS`) and ``total``;
    a storage shared by several entries is counted once."""
    out = dict.fromkeys(KINDS, 0)
    seen: set[tuple[str, int]] = set()
    for state in optimizer.state.values():
        for key, value in state.items():
            if not isinstance(value, torch.Tensor):
                continue
            storage = value.untyped_storage()
            ident = (str(value.device), storage.data_ptr())
            if ident in seen:
                continue
            seen.add(ident)
            out[STATE_KINDS.get(key, "other")] += storage.nbytes()
    out["total"] = sum(out[k] for k in KINDS)
    return out


@contextlib.contextmanager
def _quiet_stderr() -> Iterator[None]:
    """Kineto prints a line on the C-level stderr at each profiler start and stop."""
    try:
        saved = os.dup(2)
    except OSError:  # no file descriptor 2
        yield
        return
    try:
        with open(os.devnull, "w") as null:
            os.dup2(null.fileno(), 2)
            yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def allocation_trace(fn: Callable[[], object]) -> list[int]:
    """Signed sizes of the CPU allocations (+) and frees (-) during ``fn()``, in time order
    (torch's profiler, ``profile_memory=True``)."""
    with _quiet_stderr(), profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = [e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"]
    events.sort(key=lambda e: e.start_ns())  # stable: records of one time keep their order
    return [e.nbytes() for e in events]


def peak_of(trace: list[int]) -> tuple[int, int]:
    """``(peak, retained)`` of a trace of signed sizes: the highest running sum (0 if it
    never rises above the start) and the final one."""
    running = peak = 0
    for nbytes in trace:
        running += nbytes
        peak = max(peak, running)
    return peak, running


def peak_step_bytes(fn: Callable[[], object], device: torch.device) -> tuple[int, int]:
    """``(peak, retained)`` bytes of ``fn()`` beyond the memory held before it (module doc)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        before = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        fn()
        torch.cuda.synchronize(device)
        peak = torch.cuda.max_memory_allocated(device) - before
        return max(0, peak), torch.cuda.memory_allocated(device) - before
    return peak_of(allocation_trace(fn))


def step_memory(optimizer, device: torch.device, period: int) -> dict:
    """State bytes (by kind) after one step, and the peak extra bytes of one step: with
    ``period > 1`` of a step between level updates (``between``) and of the next update
    step (``update``), with ``period == 1`` of an update step. ``optimizer`` has not
    stepped yet."""
    optimizer.step()  # creates the state; a level update
    out = {"state": state_bytes(optimizer)}
    if period > 1:
        out["between"] = peak_step_bytes(optimizer.step, device)
        for _ in range(period - 2):
            optimizer.step()
    out["update"] = peak_step_bytes(optimizer.step, device)
    return out


def _dtype_note(case: step_bench.StepCase) -> str:
    return "" if case.dtype == torch.float32 else f" ({step_bench.DTYPE_NAMES[case.dtype]})"


def measure_case(case: step_bench.StepCase, device: torch.device, backend: str) -> dict:
    """:func:`step_memory` of torch's ``fused=True`` optimizer alone and of
    ``QuantOptimizer`` (``fused:<backend>``, the default fused step) on ``case``'s set."""
    out = {"set": case.model, "case": case.name, "source": case.source, "base": case.base,
           "quantizer": f"{case.quantizer}{case.bits}+{case.prox}" + _dtype_note(case),
           "numel": case.numel,
           "quantized": shapes.count(list(case.specs), quantized=True)}  # fmt: skip
    for key, variant, period in (("torch_fused", step_bench.FUSED_BASE, 1),
                                 ("quantopt", f"fused:{backend}", case.period)):  # fmt: skip
        opt = step_bench.build(case, device, variant).optimizer
        out[key] = {"variant": variant, **step_memory(opt, device, period)}
        del opt
    return out


def per_element(row: dict, nbytes: int) -> float:
    return nbytes / row["numel"]


def human_bytes(nbytes: int) -> str:
    """``12 B``, ``1.5 KiB``, ``3.25 MiB``, ``1.20 GiB``."""
    for unit, size in (("GiB", 1 << 30), ("MiB", MIB), ("KiB", 1 << 10)):
        if abs(nbytes) >= size:
            return f"{nbytes / size:.{1 if unit == 'KiB' else 2}f} {unit}"
    return f"{nbytes} B"


def _peak(row: dict, key: str, step: str) -> str:
    value = row[key].get(step)
    return "-" if value is None else human_bytes(value[0])


MEMORY_LEGEND = (
    "state: bytes per parameter element in `optimizer.state` after one step (torch's "
    "`fused=True` optimizer alone; `QuantOptimizer`'s fused step, split by kind); peak: the "
    "most memory one step holds beyond what it held before (torch's allocator; `between`: "
    "a step that reuses the levels, `update`: one that recomputes them)"
)


def table(rows: list[dict], markdown: bool = False) -> str:
    """One line per set: state bytes per element, torch's and QuantOptimizer's, and the
    peak extra memory of one step (module doc)."""
    header = ["set", "base", "quantizer", "params", "torch state", "QuantOpt state",
              *(f"  {k}" for k in KINDS), "torch peak", "QuantOpt peak between",
              "QuantOpt peak update", "source"]  # fmt: skip
    body = []
    for r in rows:
        q = r["quantopt"]["state"]
        body.append([r["set"], r["base"], r["quantizer"], f"{r['numel'] / 1e6:.2f}M",
                     f"{per_element(r, r['torch_fused']['state']['total']):.2f}",
                     f"{per_element(r, q['total']):.2f}",
                     *(f"{per_element(r, q[k]):.2f}" for k in KINDS),
                     _peak(r, "torch_fused", "update"), _peak(r, "quantopt", "between"),
                     _peak(r, "quantopt", "update"), r["source"]])  # fmt: skip
    if markdown:
        lines = ["| " + " | ".join(h.strip() for h in header) + " |", "|" + "---|" * len(header)]
        lines += ["| " + " | ".join(cells) + " |" for cells in body]
    else:
        widths = [max(len(x) for x in col) for col in zip(header, *body, strict=True)]
        fmt = "  ".join(f"{{:{'<' if i < 3 or i == len(header) - 1 else '>'}{w}}}"
                        for i, w in enumerate(widths))  # fmt: skip
        lines = [fmt.format(*header), "  ".join("-" * w for w in widths)]
        lines += [fmt.format(*cells) for cells in body]
    return "\n".join([MEMORY_LEGEND, "", *lines])
