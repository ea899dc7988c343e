"""Packed export of an FSDP2 (DTensor) model, on CPU with gloo, world size 2
(tests/export_scenarios.py): gathered on every rank, written by rank 0, loaded back
into sharded and plain models bitwise."""

from __future__ import annotations

import os
import tempfile

import pytest
from distributed_harness import launch

pytestmark = pytest.mark.distributed


def test_sharded_export_round_trip():
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "sharded.safetensors")
        results = launch("export_scenarios:export_round_trip", 2, path)
    assert [r["written"] for r in results] == [True, False]  # rank 0 writes
    for r in results:
        assert r["max_moved"] == 0.0  # the hard phase: nothing projected
        assert r["sharded_equal"] and all(r["sharded_equal"].values()), r["sharded_equal"]
    assert results[0]["plain_equal"] and all(results[0]["plain_equal"].values())
    # per-block and per-channel weights, per-tensor (globally reduced) biases
    assert set(results[0]["layouts"].values()) == {"block", "channel", "tensor"}
