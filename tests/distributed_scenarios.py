"""Per-rank bodies of the FSDP2 / DTensor tests (run through ``distributed_harness``).

Every scenario trains the same small conv + Linear net twice in each process:
the **reference** is a plain model with a plain ``QuantOptimizer`` on the full
batch; the **sharded** copy is wrapped with ``fully_shard`` and sees this rank's
slice of the batch (FSDP2 averages the gradients). After every step the full
sharded parameters must equal the reference's (SPEC.md §6 tolerances), and the
collectives issued inside ``QuantOptimizer.step`` are counted.
"""

from __future__ import annotations

import functools

import torch
import torch.distributed as dist
from torch import Tensor, nn

from parq.optim import ProxBinaryConnect, ProxHardQuant, ProxPARQ, QuantOptimizer
from parq.quant import (
    AsymUnifQuantizer,
    LSBQuantizer,
    MaxUnifQuantizer,
    TernaryThresholdQuantizer,
    TernaryUnifQuantizer,
    UnifQuantizer,
)

BATCH = 6  # divisible by world sizes 1, 2, 3
STEPS = 9
WARMUP, PERIOD, ANNEAL = 1, 2, (3, 7)  # warmup, annealing and hard phases within STEPS


class Net(nn.Module):
    """conv (6,2,3,3) -> fc1 (33,96) -> fc2 (16,33) -> fc3 (5,16) -> fc4 (2,5): uneven rows
    for 2 and 3 ranks (fc4 leaves the third rank an empty shard)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(2, 6, 3)
        self.fc1 = nn.Linear(96, 33)
        self.fc2 = nn.Linear(33, 16)
        self.fc3 = nn.Linear(16, 5)
        self.fc4 = nn.Linear(5, 2)

    def forward(self, x: Tensor) -> Tensor:
        h = torch.tanh(self.conv(x)).flatten(1)
        h = torch.tanh(self.fc2(torch.tanh(self.fc1(h))))
        return self.fc4(torch.tanh(self.fc3(h)))


def batch(step: int) -> tuple[Tensor, Tensor]:
    g = torch.Generator().manual_seed(1000 + step)
    return torch.randn(BATCH, 2, 6, 6, generator=g), torch.randint(0, 2, (BATCH,), generator=g)


# Configurations: (groups, quant_per_channel, group_quantizer_map, prox, base, expected
# collectives per quantization-update step). Groups: (param names, quant_bits, block size).
WEIGHTS_BLOCK = ["fc1.weight", "fc3.weight"]
WEIGHTS_CHAN = ["conv.weight", "fc2.weight", "fc4.weight"]
BIASES = ["conv.bias", "fc1.bias", "fc2.bias", "fc3.bias", "fc4.bias"]
CONFIGS = {
    # per-block (Unif), per-channel (greedy LSBQ), per-tensor biases (optimal LSBQ b=2: 1 gather)
    "channel-parq-sgd": dict(
        groups=[(WEIGHTS_BLOCK, 2, 8), (WEIGHTS_CHAN, 2, None), (BIASES, 2, None)],
        per_channel=True,
        qmap={0: UnifQuantizer(), 1: LSBQuantizer(), 2: LSBQuantizer(optimal=True)},
        prox="parq",
        base="sgd",
        collectives=1,
    ),
    # per-channel only, biases unquantized: no collective at all
    "channel-only-hard-adamw": dict(
        groups=[(WEIGHTS_BLOCK, 3, 8), (WEIGHTS_CHAN, 0, None), (BIASES, 16, None)],
        per_channel=True,
        qmap={0: MaxUnifQuantizer(), 1: LSBQuantizer(optimal=True)},
        prox="hard",
        base="adamw",
        collectives=0,
    ),
    # per-tensor: center (1 round) + uniform (1); greedy b=3 (3 rounds); optimal ternary (1)
    "tensor-parq-adamw": dict(
        groups=[(WEIGHTS_BLOCK, 2, None), (WEIGHTS_CHAN, 3, None), (BIASES, 0, None)],
        per_channel=False,
        qmap={0: UnifQuantizer(center=True), 1: LSBQuantizer(), 2: LSBQuantizer(optimal=True)},
        prox="parq",
        base="adamw",
        collectives=2 + 3 + 1,
    ),
    # per-tensor: asymmetric (1), ternary uniform (1), simple ternary LSBQ (1)
    "tensor-hard-sgd": dict(
        groups=[(WEIGHTS_BLOCK, 2, None), (WEIGHTS_CHAN, 0, None), (BIASES, 0, None)],
        per_channel=False,
        qmap={0: AsymUnifQuantizer(), 1: TernaryUnifQuantizer(), 2: LSBQuantizer()},
        prox="hard",
        base="sgd",
        collectives=3,
    ),
    # per-tensor threshold ternary (SPEC §9): D (global mean or max), then the global
    # sums and counts of each side: 2 rounds per group
    "tensor-threshold-parq-adamw": dict(
        groups=[(WEIGHTS_BLOCK, 0, None), (WEIGHTS_CHAN, 0, None), (BIASES, 0, None)],
        per_channel=False,
        qmap={
            0: TernaryThresholdQuantizer(),
            1: TernaryThresholdQuantizer(0.05, "max"),
            2: TernaryThresholdQuantizer(0.5),
        },  # fmt: skip
        prox="parq",
        base="adamw",
        collectives=2 + 2 + 2,
    ),
}


def build(cfg: dict, model: nn.Module, **kw) -> QuantOptimizer:
    named = dict(model.named_parameters())
    groups = []
    for names, bits, block in cfg["groups"]:
        g = {"params": [named[n] for n in names], "quant_bits": bits}
        if block is not None:
            g["quant_block_size"] = block
        groups.append(g)
    if cfg["base"] == "sgd":
        base = torch.optim.SGD(groups, lr=0.2, momentum=0.9, weight_decay=1e-3)
    else:
        base = torch.optim.AdamW(groups, lr=0.02, weight_decay=1e-2)
    prox = ProxPARQ(*ANNEAL) if cfg["prox"] == "parq" else ProxHardQuant()
    return QuantOptimizer(
        base, LSBQuantizer(), prox, warmup_steps=WARMUP, quant_period=PERIOD,
        quant_per_channel=cfg["per_channel"], group_quantizer_map=cfg["qmap"],
        anneal_wd_frac=0.5, **kw,
    )  # fmt: skip


def shard(model: nn.Module, mesh) -> nn.Module:
    from torch.distributed.fsdp import fully_shard

    for m in (model.conv, model.fc1, model.fc2, model.fc3, model.fc4):
        fully_shard(m, mesh=mesh)
    return fully_shard(model, mesh=mesh)


def train_step(model, opt, step: int, rank: int, world: int) -> None:
    x, y = batch(step)
    n = BATCH // world
    x, y = x[rank * n : (rank + 1) * n], y[rank * n : (rank + 1) * n]
    opt.zero_grad()
    nn.functional.cross_entropy(model(x), y).backward()
    opt.step()


# ---------------------------------------------------------------------------
# Counting the collectives issued inside step()
# ---------------------------------------------------------------------------

COLLECTIVES = (
    "all_reduce", "all_gather", "all_gather_single", "all_gather_into_tensor",
    "all_gather_object", "broadcast", "reduce_scatter", "reduce_scatter_tensor",
    "all_to_all", "all_to_all_single", "reduce", "gather", "scatter", "barrier",
)  # fmt: skip


class CollectiveCounter:
    """Counts outermost calls of torch.distributed collectives while active."""

    def __init__(self) -> None:
        self.count, self._depth, self._saved = 0, 0, []

    def _wrap(self, fn):
        @functools.wraps(fn)
        def counted(*args, **kwargs):
            if self._depth == 0:
                self.count += 1
            self._depth += 1
            try:
                return fn(*args, **kwargs)
            finally:
                self._depth -= 1

        return counted

    def __enter__(self):
        from torch.distributed import distributed_c10d

        for module in (dist, distributed_c10d):
            for name in COLLECTIVES:
                fn = getattr(module, name, None)
                if fn is not None:
                    self._saved.append((module, name, fn))
                    setattr(module, name, self._wrap(fn))
        return self

    def __exit__(self, *exc):
        for module, name, fn in reversed(self._saved):
            setattr(module, name, fn)
        self._saved.clear()


# ---------------------------------------------------------------------------
# Comparison with the reference (SPEC.md §6)
# ---------------------------------------------------------------------------


def full(t: Tensor) -> Tensor:
    return t.full_tensor() if type(t).__name__ == "DTensor" else t


def max_rel_diff(sharded: nn.Module, ref: nn.Module) -> float:
    """max over parameters of max|a - b| / max(max|b|, 1e-12) (a full_tensor collective)."""
    worst = 0.0
    ref_params = dict(ref.named_parameters())
    for name, p in sharded.named_parameters():
        a, b = full(p.detach()), ref_params[name].detach()
        worst = max(worst, float((a - b).abs().max() / b.abs().max().clamp_min(1e-12)))
    return worst


def assert_state_equal(opt: QuantOptimizer, ref_opt: QuantOptimizer, sharded, ref, tol) -> None:
    """latent and quants of every quantized parameter, and the group scalars."""
    ref_params = dict(ref.named_parameters())
    for name, p in sharded.named_parameters():
        st, rst = opt.state.get(p, {}), ref_opt.state.get(ref_params[name], {})
        assert st.keys() == rst.keys(), (name, st.keys(), rst.keys())
        for key in ("latent", "quants"):
            if key in rst:
                a, b = full(st[key]), rst[key]
                a = a.reshape(b.shape)  # per-block quants are (rows, blocks, K) when sharded
                err = float((a - b).abs().max()) if a.numel() else 0.0
                assert err <= tol * max(float(b.abs().max()) if b.numel() else 0.0, 1e-12), (
                    name, key, err,
                )  # fmt: skip
    for g, rg in zip(opt.param_groups, ref_opt.param_groups, strict=True):
        for key in ("num_steps", "cumu_lr", "inv_slope", "initial_wd", "weight_decay"):
            assert g.get(key) == rg.get(key), (key, g.get(key), rg.get(key))


TOL = 2e-5  # relative to max|p|; float32 sums in a different order (SPEC §6)


def equivalence(rank: int, world: int, names: list[str], mesh_shape=None) -> dict:
    """Sharded vs reference for each named config; returns collectives per step.

    ``mesh_shape=(replicas, shards)`` runs HSDP (placements ``(Replicate, Shard(0))``).
    """
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Replicate, Shard

    if mesh_shape is None:
        mesh = init_device_mesh("cpu", (world,))
    else:
        mesh = init_device_mesh("cpu", tuple(mesh_shape), mesh_dim_names=("replicate", "shard"))
    shards = mesh.size(mesh.ndim - 1)
    out = {}
    for cname in names:
        cfg = CONFIGS[cname]
        torch.manual_seed(0)
        ref = Net()
        sharded = Net()
        sharded.load_state_dict(ref.state_dict())
        shard(sharded, mesh)
        ref_opt, opt = build(cfg, ref), build(cfg, sharded)
        expected_placements = (Shard(0),) if mesh.ndim == 1 else (Replicate(), Shard(0))
        assert all(tuple(p.placements) == expected_placements for p in sharded.parameters())
        counts, diffs = [], []
        for step in range(STEPS):
            train_step(ref, ref_opt, step, 0, 1)
            counter = CollectiveCounter()
            x, y = batch(step)
            n = BATCH // world
            opt.zero_grad()
            loss = nn.functional.cross_entropy(
                sharded(x[rank * n : (rank + 1) * n]), y[rank * n : (rank + 1) * n]
            )
            loss.backward()
            with counter:
                opt.step()
            counts.append(counter.count)
            diffs.append(max_rel_diff(sharded, ref))
            assert diffs[-1] <= TOL, (cname, step, diffs)
        assert_state_equal(opt, ref_opt, sharded, ref, TOL)
        update = [s >= WARMUP and (s - WARMUP) % PERIOD == 0 for s in range(STEPS)]
        expected = [cfg["collectives"] if u and shards > 1 else 0 for u in update]
        assert counts == expected, (cname, counts, expected)
        out[cname] = {"counts": counts, "max_rel_diff": max(diffs), "mesh": list(mesh.shape),
                      "paths": [str(path) for path in opt.step_paths]}  # fmt: skip
    return out


def run_sharded(rank, world, mesh, cfg, steps, model=None, opt=None, start=0, save=()):
    """Train a sharded Net up to ``steps``; ``save``: ``(step, dir, group)`` checkpoints."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    if model is None:
        torch.manual_seed(0)
        model = shard(Net(), mesh)
        opt = build(cfg, model)
    for step in range(start, steps):
        for at, ckpt, group in save:
            if step == at:
                model_sd, optim_sd = get_state_dict(model, opt)
                dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=ckpt,
                         process_group=group)  # fmt: skip
        train_step(model, opt, step, rank, world)
    return model, opt


def resume(rank, world, mesh, cfg, ckpt: str, group, optimizer_only_api: bool = False):
    """A fresh sharded Net (other init) loaded from ``ckpt``; returns (model, opt, step)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint import state_dict as sd

    torch.manual_seed(123)  # different init: everything must come from the checkpoint
    model = shard(Net(), mesh)
    opt = build(cfg, model)
    if optimizer_only_api:
        model_sd = sd.get_model_state_dict(model)
        optim_sd = sd.get_optimizer_state_dict(model, opt)
    else:
        model_sd, optim_sd = sd.get_state_dict(model, opt)
    state = {"model": model_sd, "optim": optim_sd}
    dcp.load(state, checkpoint_id=ckpt, process_group=group)
    if optimizer_only_api:
        sd.set_model_state_dict(model, state["model"])
        sd.set_optimizer_state_dict(model, opt, state["optim"])
    else:
        sd.set_state_dict(model, opt, model_state_dict=state["model"],
                          optim_state_dict=state["optim"])  # fmt: skip
    return model, opt, opt.num_steps


CKPT_CONFIG = dict(
    groups=[(WEIGHTS_BLOCK, 2, 8), (WEIGHTS_CHAN, 2, None), (BIASES, 2, None)],
    per_channel=True,
    qmap={0: UnifQuantizer(), 1: LSBQuantizer(), 2: LSBQuantizer(optimal=True)},
    prox="parq",
    base="adamw",
)
SAVE_AT = 5  # mid-annealing (ANNEAL = (3, 7))


def checkpoint(rank: int, world: int, ckpt_dir: str) -> dict:
    """Save at world 2 mid-annealing; resume at world 2 and world 1; and save at 1, load at 2."""
    import os

    from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

    assert world == 2
    mesh = init_device_mesh("cpu", (world,))
    cfg = CKPT_CONFIG
    torch.manual_seed(0)
    ref = Net()
    ref_opt = build(cfg, ref)
    for step in range(STEPS):
        train_step(ref, ref_opt, step, 0, 1)
    ck2, ck1 = os.path.join(ckpt_dir, "w2"), os.path.join(ckpt_dir, "w1")
    ck_warm = os.path.join(ckpt_dir, "warmup")
    out = {}
    # uninterrupted world-2 run, checkpointed at SAVE_AT
    saves = ((SAVE_AT, ck2, None), (WARMUP, ck_warm, None))
    model, opt = run_sharded(rank, world, mesh, cfg, STEPS, save=saves)
    out["uninterrupted"] = max_rel_diff(model, ref)
    assert out["uninterrupted"] <= TOL, out
    final = {n: full(p.detach()).clone() for n, p in model.named_parameters()}
    # resume at world 2: bitwise the uninterrupted run
    m2, o2, n2 = resume(rank, world, mesh, cfg, ck2, None)
    assert n2 == SAVE_AT, n2
    assert abs(o2.param_groups[0]["cumu_lr"] - 0.02 * (SAVE_AT - WARMUP)) < 1e-12
    run_sharded(rank, world, mesh, cfg, STEPS, m2, o2, start=SAVE_AT)
    for n, p in m2.named_parameters():
        assert torch.equal(full(p.detach()), final[n]), n
    assert_state_equal(o2, ref_opt, m2, ref, TOL)
    # a checkpoint taken before quantization started (state placeholders only)
    mw, ow, nw = resume(rank, world, mesh, cfg, ck_warm, None)
    assert nw == WARMUP and all("latent" not in ow.state[p] for p in mw.parameters()), nw
    run_sharded(rank, world, mesh, cfg, STEPS, mw, ow, start=WARMUP)
    for n, p in mw.named_parameters():
        assert torch.equal(full(p.detach()), final[n]), n
    # world 1 (rank 0 alone, its own 1-rank group): resume from the world-2 checkpoint,
    # and an uninterrupted world-1 run that saves its own checkpoint
    solo = dist.new_group([0])
    if rank == 0:
        mesh1 = DeviceMesh.from_group(solo, "cpu")
        m1, o1, n1 = resume(0, 1, mesh1, cfg, ck2, solo, optimizer_only_api=True)
        assert n1 == SAVE_AT, n1
        run_sharded(0, 1, mesh1, cfg, STEPS, m1, o1, start=SAVE_AT)
        out["w2_to_w1"] = max_rel_diff(m1, ref)
        assert out["w2_to_w1"] <= TOL, out
        assert_state_equal(o1, ref_opt, m1, ref, TOL)
        run_sharded(0, 1, mesh1, cfg, STEPS, save=((SAVE_AT, ck1, solo),))
    dist.barrier()
    # resume at world 2 from the world-1 checkpoint
    m3, o3, n3 = resume(rank, world, mesh, cfg, ck1, None)
    assert n3 == SAVE_AT, n3
    run_sharded(rank, world, mesh, cfg, STEPS, m3, o3, start=SAVE_AT)
    out["w1_to_w2"] = max_rel_diff(m3, ref)
    assert out["w1_to_w2"] <= TOL, out
    assert_state_equal(o3, ref_opt, m3, ref, TOL)
    # placements of the restored state
    for p in m3.parameters():
        st = o3.state[p]
        assert tuple(st["latent"].placements) == tuple(p.placements)
    return out


# ---------------------------------------------------------------------------
# Hand-placed DTensor parameters: Replicate, Shard(1), and the rejected ones
# ---------------------------------------------------------------------------


class UserPARQ(ProxPARQ):
    """A user prox map (overrides apply_): served by the generic per-parameter path."""

    def apply_(self, p, q, Q, step_count, dim=None):
        return super().apply_(p, q, Q, step_count, dim)


def _case(kind, per_channel, block, make_q, bits, ncoll, nm=False, fused=True, prox=ProxPARQ):
    return dict(kind=kind, per_channel=per_channel, block=block, make_q=make_q, bits=bits,
                ncoll=ncoll, nm=nm, fused=fused, prox=prox)  # fmt: skip


# placement of the 2-D / 3-D weights (the 1-D bias: Shard(0), or Replicate), per_channel,
# block size, quantizer, bits, collectives per update step (the bias is per-tensor)
PLACEMENT_CASES = {
    "replicate-channel": _case("R", True, None, lambda: LSBQuantizer(), 2, 0),
    "replicate-tensor": _case("R", False, None, lambda: LSBQuantizer(optimal=True), 2, 0),
    "shard1-tensor": _case("S1", False, None, lambda: UnifQuantizer(center=True), 2, 2),
    "shard1-channel": _case("S1", True, None, lambda: LSBQuantizer(), 3, 3),
    "shard1-channel-optimal": _case("S1", True, None, lambda: LSBQuantizer(optimal=True), 0, 1),
    "shard1-block": _case("S1", True, 4, lambda: UnifQuantizer(), 2, 0),
    "shard0-tensor-nmsgd": _case("S0", False, None, lambda: MaxUnifQuantizer(), 2, 1, nm=True),
    "shard0-tensor-unfused": _case("S0", False, None, lambda: LSBQuantizer(), 2, 2, fused=False),
    "shard0-channel-unfused": _case("S0", True, None, lambda: UnifQuantizer(), 2, 1, fused=False),
    "shard1-channel-userprox": _case("S1", True, None, lambda: LSBQuantizer(), 2, 2, prox=UserPARQ),
    # SPEC §9: BinaryConnect's latent clamp with global and local levels; refined LSBQ
    "shard1-tensor-binaryconnect": _case(
        "S1",
        False,
        None,
        lambda: UnifQuantizer(center=True),
        2,
        2,
        prox=lambda *_: ProxBinaryConnect(),
    ),
    "shard0-channel-binaryconnect": _case(
        "S0", True, None, lambda: UnifQuantizer(), 2, 1, prox=lambda *_: ProxBinaryConnect()
    ),
    "replicate-channel-refined": _case(
        "R", True, None, lambda: LSBQuantizer(refine_rounds=2), 2, 0
    ),
}


def _placed_params(kind: str, mesh, block) -> tuple[list[Tensor], list]:
    """Full initial tensors and their placements: two weights and a 1-D bias."""
    from torch.distributed.tensor import Replicate, Shard

    g = torch.Generator().manual_seed(7)
    shapes = [(9, 16), (16,)] if block else [(9, 16), (5, 3, 4), (7,)]
    fulls = [torch.randn(s, generator=g) for s in shapes]
    pl = {"R": Replicate(), "S0": Shard(0), "S1": Shard(1)}[kind]
    places = [[pl] if t.dim() > 1 else [Replicate() if kind == "R" else Shard(0)] for t in fulls]
    return fulls, places


def placements(rank: int, world: int) -> dict:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import distribute_tensor

    from parq.optim import NMSGDOptimizer

    mesh = init_device_mesh("cpu", (world,))
    out = {}
    for name, case in PLACEMENT_CASES.items():
        block, bits, nm = case["block"], case["bits"], case["nm"]
        fulls, places = _placed_params(case["kind"], mesh, block)
        ref_params = [nn.Parameter(t.clone()) for t in fulls]
        params = [nn.Parameter(distribute_tensor(t.clone(), mesh, pl))
                  for t, pl in zip(fulls, places, strict=True)]  # fmt: skip
        opts = []
        for ps in (ref_params, params):
            group = {"params": ps, "quant_bits": bits}
            if block:
                group["quant_block_size"] = block
            base = torch.optim.SGD([group], lr=0.1, momentum=0.9)
            cls, extra = (NMSGDOptimizer, {"nm_gamma": 2.0}) if nm else (QuantOptimizer, {})
            opts.append(cls(base, case["make_q"](), case["prox"](2, 5), warmup_steps=1,
                            quant_period=2, quant_per_channel=case["per_channel"],
                            quant_shrink=nm, fused=case["fused"], **extra))  # fmt: skip
        counts = []
        for step in range(7):
            g = torch.Generator().manual_seed(50 + step)
            for rp, p, pl in zip(ref_params, params, places, strict=True):
                grad = torch.randn(rp.shape, generator=g)
                rp.grad = grad
                p.grad = distribute_tensor(grad.clone(), mesh, pl)
            opts[0].step()
            counter = CollectiveCounter()
            with counter:
                opts[1].step()
            counts.append(counter.count)
            for rp, p in zip(ref_params, params, strict=True):
                a, b = full(p.detach()), rp.detach()
                err = float((a - b).abs().max() / b.abs().max())
                assert err <= TOL, (name, step, err)
        for rp, p in zip(ref_params, params, strict=True):
            st, rst = opts[1].state[p], opts[0].state[rp]
            assert tuple(st["latent"].placements) == tuple(p.placements), name
            torch.testing.assert_close(full(st["quants"]).reshape(rst["quants"].shape),
                                       rst["quants"], rtol=TOL, atol=0)  # fmt: skip
        expected = [case["ncoll"] if s >= 1 and (s - 1) % 2 == 0 else 0 for s in range(7)]
        assert counts == expected, (name, counts, expected)
        out[name] = counts
    out["errors"] = _placement_errors(mesh, world)
    return out


def _expect_error(fn, *needles) -> str:
    from parq.optim.shard_plan import UnsupportedPlacementError

    try:
        fn()
    except UnsupportedPlacementError as exc:
        msg = str(exc)
        for needle in needles:
            assert needle in msg, (needle, msg)
        return msg
    raise AssertionError(f"no UnsupportedPlacementError; expected {needles}")


def _placement_errors(mesh, world: int) -> list[str]:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor, Partial, Shard, distribute_tensor

    from parq.quant import Quantizer

    def make(p, per_channel=False, block=None, quantizer=None):
        group = {"params": [p], "quant_bits": 2}
        if block:
            group["quant_block_size"] = block
        base = torch.optim.SGD([group], lr=0.1)
        return QuantOptimizer(base, quantizer or UnifQuantizer(), ProxHardQuant(),
                              quant_per_channel=per_channel)  # fmt: skip

    msgs = []
    partial = nn.Parameter(DTensor.from_local(torch.ones(4, 4), mesh, [Partial()]))
    msgs.append(_expect_error(lambda: make(partial), "params[0]", "Partial"))
    mesh2 = init_device_mesh("cpu", (1, world))
    two = nn.Parameter(distribute_tensor(torch.ones(4, 4), mesh2, [Shard(0), Shard(1)]))
    msgs.append(_expect_error(lambda: make(two), "params[0]", "two mesh dims"))
    straddle = nn.Parameter(distribute_tensor(torch.ones(12), mesh, [Shard(0)]))
    msgs.append(_expect_error(lambda: make(straddle, True, 4), "params[0]", "straddle"))

    class UserQuantizer(Quantizer):
        def get_quant_size(self, b):
            return 2

        def quantize(self, p, b, dim=None):
            return p.sign(), torch.tensor([-1.0, 1.0])

    user = nn.Parameter(distribute_tensor(torch.ones(6, 4), mesh, [Shard(0)]))
    opt = make(user, quantizer=UserQuantizer())
    user.grad = distribute_tensor(torch.ones(6, 4), mesh, [Shard(0)])
    msgs.append(_expect_error(opt.step, "params[0]", "UserQuantizer"))
    return msgs


# ---------------------------------------------------------------------------
# Suites: everything one process launch runs (each launch costs seconds of imports)
# ---------------------------------------------------------------------------


def suite_world2(rank: int, world: int, ckpt_dir: str) -> dict:
    return {
        "equivalence": equivalence(rank, world, list(CONFIGS)),
        "hsdp_1x2": equivalence(rank, world, ["tensor-parq-adamw"], mesh_shape=(1, world)),
        "hsdp_2x1": equivalence(rank, world, ["channel-parq-sgd"], mesh_shape=(world, 1)),
        "placements": placements(rank, world),
        "checkpoint": checkpoint(rank, world, ckpt_dir),
    }


def suite_world3(rank: int, world: int) -> dict:
    names = ["channel-parq-sgd", "tensor-parq-adamw", "tensor-threshold-parq-adamw"]
    return {"equivalence": equivalence(rank, world, names)}
