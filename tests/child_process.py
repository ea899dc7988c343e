"""Run a test's Python code in a fresh interpreter with the checkout importable: for what
changes process-wide state (dynamo's caches and torch.optim patches, torch's CPU level)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run_child(code: str, timeout: float = 600, **env: str) -> str:
    """Run ``code``; assert it exits 0 (its stderr in the message) and return its stdout."""
    full = dict(os.environ, **env)
    full["PYTHONPATH"] = os.pathsep.join([str(ROOT / "tests"), str(ROOT),
                                          os.environ.get("PYTHONPATH", "")])  # fmt: skip
    out = subprocess.run([sys.executable, "-c", code], env=full, capture_output=True, text=True,
                         timeout=timeout)  # fmt: skip
    assert out.returncode == 0, out.stderr[-3000:]
    return out.stdout
