"""The distributed harness itself: results come back, failures name the rank's error,
and a rank that would abort at interpreter exit (what torch 2.13's gloo teardown
sometimes does) still counts as a success once its result is written."""

from __future__ import annotations

import atexit
import os

import pytest
from distributed_harness import launch

pytestmark = pytest.mark.distributed


def abort_at_exit(rank: int, world: int, tag: str) -> dict:
    """Return a result, then arrange for the interpreter's exit to SIGABRT the rank."""
    atexit.register(os.abort)
    return {"rank": rank, "world": world, "tag": tag}


def fail(rank: int, world: int) -> int:
    # every rank fails: which rank's error comes back first is up to the scheduler (a rank
    # that is still running sees its peer's group go away and fails on its own)
    raise RuntimeError(f"rank {rank} of {world} failed on purpose")


def test_result_survives_an_abort_at_interpreter_exit():
    results = launch("test_distributed_harness:abort_at_exit", 2, "x")
    assert results == [{"rank": 0, "world": 2, "tag": "x"}, {"rank": 1, "world": 2, "tag": "x"}]


def test_a_failing_rank_reports_its_traceback():
    with pytest.raises(Exception, match=r"rank [01] of 2 failed on purpose"):
        launch("test_distributed_harness:fail", 2)
