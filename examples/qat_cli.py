"""The QAT demo's command line (:mod:`qat_digits`): its options, their checks, and the
training settings they ask for (:class:`Setting`)."""

from __future__ import annotations

import argparse
import itertools
import math
from dataclasses import dataclass
from pathlib import Path

from models import MODELS

from benchmarks.cli_checks import check_device, check_out_dir, finite_float
from parq_kernels import backends

_ROOT = Path(__file__).resolve().parent.parent

PROXMAPS = ("hard", "soft", "parq", "binaryrelax", "proxquant", "binaryconnect")
METHODS = ("lsbq", "uniform", "lsbq-refined", "ternary-threshold")
REFINE_ROUNDS = 3  # --quant-method lsbq-refined
DIGITS_IMAGES = 1797  # sklearn.datasets.load_digits (shipped with scikit-learn)
TEST_FRACTION = 0.2
SMOKE_TRAIN_IMAGES = 512


def train_images(smoke: bool) -> int:
    """Training images of the split in :func:`load_data` (test: ceil(20 %), as sklearn)."""
    n = DIGITS_IMAGES - math.ceil(TEST_FRACTION * DIGITS_IMAGES)
    return min(n, SMOKE_TRAIN_IMAGES) if smoke else n


@dataclass(frozen=True)
class Setting:
    """One training run: ``bits is None`` is full precision; ``act_bits``: activations
    fake-quantized to that many bits (None: float activations)."""

    bits: int | None = None
    method: str = "lsbq"
    proxmap: str = "parq"
    act_bits: int | None = None

    @property
    def label(self) -> str:
        if self.bits is None:
            return "FP32"
        b = "ternary" if self.bits == 0 else f"{self.bits}-bit"
        acts = "" if self.act_bits is None else f" A{self.act_bits}"
        return f"{b} {self.method} {self.proxmap}{acts}"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        epilog="Several values of --quant-bits/--quant-method/--quant-proxmap run every "
        "combination; the FP baseline runs first unless --no-fp.",
    )
    p.add_argument("--model", default="cnn", help=f"{' or '.join(MODELS)} (default cnn)")
    p.add_argument("--epochs", type=int, default=20, help="training epochs (default 20)")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument(
        "--lr", type=finite_float, default=2e-3, help="AdamW learning rate (cosine decay)"
    )
    p.add_argument("--weight-decay", type=finite_float, default=1e-4)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--quant-bits",
        type=int,
        nargs="+",
        default=[2, 0],
        help="bits per weight, 0 = ternary; several values run several settings",
    )
    p.add_argument("--quant-method", nargs="+", choices=METHODS, default=["lsbq"])
    p.add_argument(
        "--act-bits",
        type=int,
        nargs="*",
        default=[8, 4],
        help="activation bits of the weight + activation settings, each run with the first "
        "--quant-bits/--quant-method/--quant-proxmap (default 8 4; no value: none)",
    )
    p.add_argument("--quant-proxmap", nargs="+", choices=PROXMAPS, default=["parq"])
    p.add_argument(
        "--quant-lsbq-optimal", action="store_true", help="optimal LSBQ levels (bits 0, 1, 2 only)"
    )
    p.add_argument(
        "--quant-per-channel",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="one level set per output channel (default on)",
    )
    p.add_argument(
        "--quant-block-size",
        type=int,
        default=None,
        help="quantize 2-D weights in blocks of this many columns",
    )
    p.add_argument(
        "--anneal-start",
        type=finite_float,
        default=None,
        help="epoch where the prox map starts annealing (default 10%% of --epochs)",
    )
    p.add_argument(
        "--anneal-end",
        type=finite_float,
        default=None,
        help="epoch where weights become hard-quantized (default 70%% of --epochs)",
    )
    p.add_argument("--anneal-steepness", type=finite_float, default=10.0, help="PARQ steepness")
    p.add_argument(
        "--reg-rate",
        type=finite_float,
        default=2.0,
        help="ProxQuant: lambda grows by this much per epoch after --anneal-start (times lr)",
    )
    p.add_argument(
        "--freeze-epoch",
        type=finite_float,
        default=None,
        help="hard-quantize and freeze the quantized weights at this epoch (freeze_step)",
    )
    p.add_argument(
        "--compare",
        action="store_true",
        help="train every method (FP, STE, BinaryRelax, PARQ, ProxQuant, BinaryConnect) at the "
        "first --quant-bits value; write the table and a chart",
    )
    p.add_argument(
        "--warmup-steps",
        type=int,
        default=0,
        help="full-precision optimizer steps before QAT starts",
    )
    p.add_argument(
        "--quant-period", type=int, default=10, help="recompute the levels every this many steps"
    )
    p.add_argument(
        "--backend", default="auto", help="fused-op backend: auto, reference, cpu, cuda or triton"
    )
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch CPU threads (default 1: the model is too small to gain from more)",
    )
    p.add_argument("--no-fp", action="store_true", help="skip the full-precision baseline")
    p.add_argument(
        "--no-export",
        action="store_true",
        help="skip the packed export (save_quantized, size report, reload) of quantized models",
    )
    p.add_argument(
        "--export-dir",
        type=Path,
        default=None,
        help="keep the packed .safetensors files here (default: a temporary directory)",
    )
    p.add_argument(
        "--smoke", action="store_true", help="tiny run for tests: 2 epochs on 512 training images"
    )
    p.add_argument(
        "--out",
        type=Path,
        default=_ROOT / "benchmarks" / "results",
        help="directory for the accuracy table (default benchmarks/results)",
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = p.parse_args(argv)  # fmt: skip
    check_args(p, args)
    return args


def check_args(p: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Reject bad combinations with a message naming the argument."""
    if args.smoke:
        args.epochs = 2
    if args.model not in MODELS and not args.model.startswith("tv:"):
        p.error(f"--model must be one of {MODELS} (or tv:<torchvision model>), got {args.model!r}")
    for name in ("epochs", "batch_size", "quant_period"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.threads < 1:
        p.error(f"--threads must be >= 1, got {args.threads}")
    if args.warmup_steps < 0:
        p.error(f"--warmup-steps must be >= 0, got {args.warmup_steps}")
    if args.lr <= 0:
        p.error(f"--lr must be > 0, got {args.lr}")
    if args.weight_decay < 0:
        p.error(f"--weight-decay must be >= 0, got {args.weight_decay}")
    total = -(-train_images(args.smoke) // args.batch_size) * args.epochs
    if args.warmup_steps >= total:
        p.error(
            f"--warmup-steps ({args.warmup_steps}) must be < the run's {total} optimizer steps "
            f"({args.epochs} epochs), else quantization never starts"
        )
    bad = [b for b in args.quant_bits if not 0 <= b <= 8]
    if bad:
        p.error(f"--quant-bits must be in 0..8 (0 = ternary), got {bad}")
    bad = [b for b in args.act_bits if not 2 <= b <= 16]
    if bad:
        p.error(f"--act-bits must be in 2..16, got {bad}")
    if args.act_bits and args.model != "cnn":
        p.error(f"--act-bits (activation quantization) supports --model cnn, got {args.model!r}; "
                "pass --act-bits without a value for weights only")  # fmt: skip
    if args.quant_lsbq_optimal:
        if "lsbq" not in args.quant_method:
            p.error("--quant-lsbq-optimal needs --quant-method lsbq")
        big = [b for b in args.quant_bits if b > 2]
        if big:
            p.error(f"--quant-lsbq-optimal supports --quant-bits 0, 1 or 2, got {big}")
    if args.quant_block_size is not None:
        if args.quant_block_size < 1:
            p.error(f"--quant-block-size must be >= 1, got {args.quant_block_size}")
        if not args.quant_per_channel:
            p.error("--quant-block-size needs --quant-per-channel (each block is one group)")
    if args.anneal_start is None:
        args.anneal_start = 0.1 * args.epochs
    if args.anneal_end is None:
        args.anneal_end = 0.7 * args.epochs
    if not 0 <= args.anneal_start < args.anneal_end:
        p.error(
            f"--anneal-start must be >= 0 and < --anneal-end, got {args.anneal_start} "
            f"and {args.anneal_end}"
        )
    if args.anneal_end > args.epochs:
        p.error(
            f"--anneal-end ({args.anneal_end}) must be <= --epochs ({args.epochs}), "
            "so that the evaluated model is quantized"
        )
    if args.anneal_steepness <= 0:
        p.error(f"--anneal-steepness must be > 0, got {args.anneal_steepness}")
    if args.reg_rate < 0:
        p.error(f"--reg-rate must be >= 0, got {args.reg_rate}")
    if args.freeze_epoch is not None and not 0 <= args.freeze_epoch < args.epochs:
        p.error(f"--freeze-epoch must be in [0, --epochs), got {args.freeze_epoch}")
    if "ternary-threshold" in args.quant_method and any(b != 0 for b in args.quant_bits):
        p.error("--quant-method ternary-threshold needs --quant-bits 0")
    args.device = str(check_device(p, args.device))
    if args.backend != "auto":
        try:
            backends.resolve(args.device, args.backend)
        except (ValueError, backends.BackendUnavailableError) as exc:
            p.error(f"--backend {args.backend}: {exc}")
    check_out_dir(p, args.out)
    if args.export_dir is not None:
        check_out_dir(p, args.export_dir, "--export-dir")


def settings(args: argparse.Namespace) -> list[Setting]:
    runs = [] if args.no_fp else [Setting()]
    for bits, method, prox in itertools.product(
        args.quant_bits, args.quant_method, args.quant_proxmap
    ):
        runs.append(Setting(bits, method, prox))
    first = (args.quant_bits[0], args.quant_method[0], args.quant_proxmap[0])
    runs += [Setting(*first, act_bits=a) for a in args.act_bits]
    return list(dict.fromkeys(runs))
