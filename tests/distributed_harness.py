"""Launch a scenario function on ``world`` CPU processes (gloo, 127.0.0.1).

``launch("module:function", world, *args)`` spawns ``world`` processes with
``torch.multiprocessing.spawn``; each sets up the default process group and
calls ``function(rank, world, *args)``. A failure on any rank (an assertion
included) is raised in the parent with that rank's traceback, and the other
ranks are terminated. Each rank may return a JSON-able value; ``launch``
returns the list of them, in rank order.
"""

from __future__ import annotations

import datetime
import importlib
import json
import os
import socket
import tempfile

import torch
import torch.multiprocessing as mp

TIMEOUT = datetime.timedelta(seconds=90)  # a hung collective fails instead of blocking CI


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(rank: int, world: int, port: int, target: str, out_dir: str, args: tuple) -> None:
    import torch.distributed as dist

    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=TIMEOUT)
    try:
        module, name = target.split(":")
        result = getattr(importlib.import_module(module), name)(rank, world, *args)
        with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
            json.dump(result, f)
        dist.barrier()
    finally:
        dist.destroy_process_group()


def launch(target: str, world: int, *args) -> list:
    """Run ``target`` (``"module:function"``) on ``world`` processes; per-rank results."""
    with tempfile.TemporaryDirectory() as out_dir:
        mp.spawn(_entry, args=(world, free_port(), target, out_dir, args), nprocs=world, join=True)
        results = []
        for rank in range(world):
            with open(os.path.join(out_dir, f"rank{rank}.json")) as f:
                results.append(json.load(f))
        return results
