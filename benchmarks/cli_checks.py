"""Argument checks and optional packages shared by the command-line tools
(``python -m benchmarks`` and ``examples/qat_digits.py``).

Everything here runs before any work: a bad argument ends the tool with an
argparse-style message (``parser.error``, exit status 2), and a missing optional
package (tqdm, matplotlib) is reported once, in one line, and the tool goes on with
plain output.
"""

from __future__ import annotations

import argparse
import importlib
import math
import sys
import tempfile
from pathlib import Path
from types import ModuleType

import torch


def finite_float(text: str) -> float:
    """argparse ``type=``: a float that is neither NaN nor infinite."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a number, got {text!r}") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"must be a finite number, got {text!r}")
    return value


def check_device(
    parser: argparse.ArgumentParser, text: str, option: str = "--device"
) -> torch.device:
    """``text`` as a usable torch device (cpu, or an existing cuda one), else ``parser.error``."""
    try:
        device = torch.device(text)
    except (RuntimeError, ValueError) as exc:
        parser.error(f"{option} {text!r} is not a device: {exc}")
    if device.type == "cpu":
        return device
    if device.type != "cuda":
        parser.error(f"{option} {text!r}: only cpu and cuda[:i] are supported")
    if not torch.cuda.is_available():
        parser.error(
            f"{option} {text!r}: CUDA is not available (torch.cuda.is_available() is False)"
        )
    if device.index is not None and device.index >= torch.cuda.device_count():
        parser.error(
            f"{option} {text!r}: there are {torch.cuda.device_count()} CUDA device(s) "
            f"(indices 0..{torch.cuda.device_count() - 1})"
        )
    return device


def check_out_dir(parser: argparse.ArgumentParser, path: Path, option: str = "--out") -> Path:
    """Create ``path`` if needed and make sure a file can be written there."""
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path, prefix=".write-test-"):
            pass
    except OSError as exc:
        parser.error(f"{option} {str(path)!r} is not a writable directory: {exc}")
    return path


def optional_module(name: str, without: str) -> ModuleType | None:
    """``import name``, or None after one line on stderr saying what is skipped."""
    try:
        return importlib.import_module(name)
    except ImportError:
        print(f"note: {name} is not installed: {without} (pip install {name})", file=sys.stderr)
        return None


__all__ = ["finite_float", "check_device", "check_out_dir", "optional_module"]
