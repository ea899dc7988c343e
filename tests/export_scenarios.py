"""Per-rank body of the FSDP2 / DTensor export test (run through ``distributed_harness``).

A sharded Net (``distributed_scenarios``) trains through the PARQ anneal into the hard
phase with per-block, per-channel and per-tensor groups; ``save_quantized`` gathers
the shards (a collective) and rank 0 writes; every rank then loads the file into a
fresh sharded Net and rank 0 also into a plain one. Both must equal the trained
sharded model bitwise (float32 levels).
"""

from __future__ import annotations

import torch
from distributed_scenarios import CONFIGS, STEPS, Net, build, full, shard, train_step

from parq.export import load_quantized, save_quantized


def export_round_trip(rank: int, world: int, path: str) -> dict:
    from torch.distributed.device_mesh import init_device_mesh

    mesh = init_device_mesh("cpu", (world,))
    torch.manual_seed(0)
    model = shard(Net(), mesh)
    opt = build(CONFIGS["channel-parq-sgd"], model)
    for step in range(STEPS):  # ends in the hard phase
        train_step(model, opt, step, rank, world)
    result = save_quantized(path, model, opt, levels_dtype=torch.float32)
    trained = {name: full(t).detach().clone() for name, t in model.state_dict().items()}

    torch.manual_seed(1)
    fresh = shard(Net(), mesh)
    load_quantized(path, fresh)
    sharded_equal = {name: bool(torch.equal(full(t), trained[name]))
                     for name, t in fresh.state_dict().items()}  # fmt: skip
    plain_equal = {}
    if rank == 0:
        plain = Net()
        load_quantized(path, plain)
        plain_equal = {name: bool(torch.equal(t, trained[name]))
                       for name, t in plain.state_dict().items()}  # fmt: skip
    return {
        "written": result.written,
        "max_moved": result.max_moved,
        "layouts": {p.name: p.layout for p in result.params},
        "sharded_equal": sharded_equal,
        "plain_equal": plain_equal,
    }
