"""Shared fixtures: deterministic seeds, the devices to test on, backend helpers.

On a machine without a GPU, Triton kernels run on CPU tensors through the Triton
interpreter: ``TRITON_INTERPRET=1`` is set here, before anything imports triton.
The automatic backend choice never picks the interpreter, so only tests that ask
for ``backend="triton"`` explicitly use it.
"""

from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


@pytest.fixture(params=DEVICES)
def device(request) -> torch.device:
    return torch.device(request.param)
