"""Launch a scenario function on ``world`` CPU processes (gloo, 127.0.0.1).

``launch("module:function", world, *args)`` spawns ``world`` processes with
``torch.multiprocessing.spawn``; each sets up the default process group and
calls ``function(rank, world, *args)``. A failure on any rank (an assertion
included) is raised in the parent with that rank's traceback, and the other
ranks are terminated. Each rank may return a JSON-able value; ``launch``
returns the list of them, in rank order.

A rank that succeeded leaves with ``os._exit(0)`` once its result is written and
the process group is destroyed: torch 2.13's gloo backend can abort the process
at interpreter exit ("terminate called without an active exception" from a
``pt_gloo_runloop`` thread, also without parq), and ``os._exit`` skips that
teardown (atexit handlers, C++ static destructors) after the work is done. A
rank that failed exits through ``torch.multiprocessing`` as before, so its
traceback reaches the parent.
"""

from __future__ import annotations

import contextlib
import datetime
import importlib
import json
import os
import socket
import sys
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
            f.flush()
            os.fsync(f.fileno())
        dist.barrier()
    finally:
        dist.destroy_process_group()
    _leave()


def _leave() -> None:
    """Exit this rank with status 0 now, skipping the interpreter's teardown."""
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(OSError, ValueError):  # closed or broken: nothing to save
            stream.flush()
    os._exit(0)


def launch(target: str, world: int, *args) -> list:
    """Run ``target`` (``"module:function"``) on ``world`` processes; per-rank results."""
    with tempfile.TemporaryDirectory() as out_dir:
        mp.spawn(_entry, args=(world, free_port(), target, out_dir, args), nprocs=world, join=True)
        results = []
        for rank in range(world):
            with open(os.path.join(out_dir, f"rank{rank}.json")) as f:
                results.append(json.load(f))
        return results
