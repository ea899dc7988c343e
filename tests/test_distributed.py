"""FSDP2 / DTensor sharded QAT (SPEC.md §7), on CPU with gloo.

Two process launches (world 2 and world 3) run every scenario of
``distributed_scenarios.py``; each rank asserts as it goes (parameters after
every step against a plain single-process ``QuantOptimizer``, state, collective
counts) and returns a summary that the tests below check again by name.
"""

from __future__ import annotations

import copy
import tempfile

import pytest
import torch
from distributed_harness import launch
from distributed_scenarios import CONFIGS, PERIOD, PLACEMENT_CASES, STEPS, TOL, WARMUP

pytestmark = pytest.mark.distributed

UPDATE_STEPS = [s >= WARMUP and (s - WARMUP) % PERIOD == 0 for s in range(STEPS)]


def _launch(target: str, world: int, *args):
    try:
        return launch(target, world, *args)[0]
    except Exception as exc:  # reported by every test that needs this launch
        return exc


@pytest.fixture(scope="module")
def world2():
    with tempfile.TemporaryDirectory() as ckpt_dir:
        yield _launch("distributed_scenarios:suite_world2", 2, ckpt_dir)


@pytest.fixture(scope="module")
def world3():
    return _launch("distributed_scenarios:suite_world3", 3)


def _part(result, key: str):
    if isinstance(result, Exception):
        raise AssertionError(f"the distributed launch failed:\n{result}") from result
    return result[key]


def _check_run(run: dict, expected_per_update: int) -> None:
    assert run["max_rel_diff"] <= TOL
    assert run["counts"] == [expected_per_update if u else 0 for u in UPDATE_STEPS]


@pytest.mark.parametrize("config", list(CONFIGS))
def test_sharded_equals_unsharded_world2(world2, config):
    """Per-channel / per-block / per-tensor groups, all quantizer kinds, hard and PARQ,
    SGD and AdamW, through warmup, annealing and hard phases: equal after every step."""
    _check_run(_part(world2, "equivalence")[config], CONFIGS[config]["collectives"])


@pytest.mark.parametrize(
    "config", ["channel-parq-sgd", "tensor-parq-adamw", "tensor-threshold-parq-adamw"]
)
def test_sharded_equals_unsharded_world3_uneven(world3, config):
    """33, 16, 6, 5 and 2 rows over 3 ranks (11/11/11, 6/6/4, 2/2/2, 2/2/1, 1/1/0)."""
    _check_run(_part(world3, "equivalence")[config], CONFIGS[config]["collectives"])


def test_collectives_per_step(world2):
    """Per-channel: none. Per-tensor: one all-gather per reduction round per group,
    whatever the number of parameters (2 + 3 + 5 parameters here, 2 + 3 + 1 rounds)."""
    runs = _part(world2, "equivalence")
    assert set(runs["channel-only-hard-adamw"]["counts"]) == {0}
    assert max(runs["tensor-parq-adamw"]["counts"]) == 6
    assert max(runs["tensor-hard-sgd"]["counts"]) == 3
    # no collective on steps that reuse the levels
    for run in runs.values():
        assert all(c == 0 for c, u in zip(run["counts"], UPDATE_STEPS, strict=True) if not u)


def test_fused_step_on_local_shards(world2):
    """Shard(0) per-channel / per-block groups take the fused step (SPEC §8) on their local
    shards, with no collective; per-tensor groups keep the base step + global statistics."""
    runs = _part(world2, "equivalence")
    assert runs["channel-only-hard-adamw"]["paths"] == ["fused step", "fused step", "base step"]
    paths = runs["channel-parq-sgd"]["paths"]
    assert paths[:2] == ["fused step", "fused step"], paths
    assert paths[2].startswith("base step + sharded prox (DTensor parameters, quantization "
                               "groups split across ranks"), paths  # fmt: skip


def test_hsdp(world2):
    """(Replicate, Shard(0)) meshes: reductions over the shard dim only (none if it is 1)."""
    _check_run(_part(world2, "hsdp_1x2")["tensor-parq-adamw"], 6)
    _check_run(_part(world2, "hsdp_2x1")["channel-parq-sgd"], 0)


@pytest.mark.parametrize("case", list(PLACEMENT_CASES))
def test_other_placements(world2, case):
    """Replicate, Shard(1) (per-tensor, per-channel rows split across ranks, aligned
    per-block), NM-SGD on Shard(0): equal to the unsharded run, expected collectives."""
    counts = _part(world2, "placements")[case]
    ncoll = PLACEMENT_CASES[case]["ncoll"]
    assert counts == [ncoll if s >= 1 and (s - 1) % 2 == 0 else 0 for s in range(7)]


def test_unsupported_placements_raise(world2):
    msgs = _part(world2, "placements")["errors"]
    assert len(msgs) == 4
    assert all(m.startswith("param_groups[0] params[0] (shape") for m in msgs)
    assert "Partial" in msgs[0] and "two mesh dims" in msgs[1]
    assert "straddle" in msgs[2] and "UserQuantizer" in msgs[3]


def test_checkpoint_resume_across_world_sizes(world2):
    """DCP get/set_state_dict: saved at world 2 mid-annealing, resumed at 2 (bitwise the
    uninterrupted run), at 1, and saved at 1 / resumed at 2; a warmup-time checkpoint."""
    ck = _part(world2, "checkpoint")
    assert ck["uninterrupted"] <= TOL
    assert ck["w2_to_w1"] <= TOL
    assert ck["w1_to_w2"] <= TOL


# ---------------------------------------------------------------------------
# Checkpoint placeholders, single process (what makes the DCP skeleton complete)
# ---------------------------------------------------------------------------


def _plain_opt(params, warmup):
    from parq.optim import ProxHardQuant, QuantOptimizer
    from parq.quant import UnifQuantizer

    base = torch.optim.AdamW([{"params": params, "quant_bits": 2}], lr=0.1)
    return QuantOptimizer(base, UnifQuantizer(), ProxHardQuant(), warmup_steps=warmup)


def test_no_placeholders_for_plain_parameters():
    """state_dict() in warmup (and before any step) holds no latent/quants for ordinary
    parameters, so it loads into a plain torch optimizer (and the public release); the
    placeholders that make the DCP skeleton complete are for DTensor parameters only (the
    warmup-checkpoint scenario of test_dcp_checkpoints exercises them)."""
    p = torch.nn.Parameter(torch.randn(4, 3))
    opt = _plain_opt([p], warmup=2)
    assert opt.state_dict()["state"] == {}
    p.grad = torch.randn(4, 3)
    opt.step()
    sd = copy.deepcopy(opt.state_dict())
    assert set(sd["state"][0]) == {"step", "exp_avg", "exp_avg_sq"}
    q = torch.nn.Parameter(p.detach().clone())
    plain = torch.optim.AdamW([{"params": [q], "quant_bits": 2}], lr=0.1)
    plain.load_state_dict(sd)
    for o, t in ((opt, p), (plain, q)):
        t.grad = torch.ones_like(t)
        o.step()  # still warmup for opt: a plain AdamW step
    assert torch.equal(p, q)


def test_checkpoints_across_the_start_of_quantization():
    """No state for a parameter AdamW has no state for (grad None); checkpoints taken in
    warmup and once quantization has started load and train on identically."""
    p, idle = torch.nn.Parameter(torch.randn(4, 3)), torch.nn.Parameter(torch.randn(5))
    opt = _plain_opt([p, idle], warmup=1)
    p.grad = torch.randn(4, 3)
    opt.step()  # warmup: idle has no grad, no AdamW state
    sd = copy.deepcopy(opt.state_dict())
    assert set(sd["state"]) == {0} and "latent" not in sd["state"][0]
    p.grad = torch.randn(4, 3)
    opt.step()  # quantization starts
    sd = copy.deepcopy(opt.state_dict())
    assert not torch.isnan(sd["state"][0]["quants"]).any()
    p2, idle2 = (torch.nn.Parameter(t.detach().clone()) for t in (p, idle))
    opt2 = _plain_opt([p2, idle2], warmup=1)
    opt2.load_state_dict(sd)
    for o, t in ((opt, p), (opt2, p2)):
        t.grad = torch.ones_like(t)
        o.step()
    assert torch.equal(p2, p) and torch.equal(idle2, idle)
