"""Run a function on N gloo processes (CPU) and collect what each returns."""
from __future__ import annotations

import io
import os
import tempfile
import traceback

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def _entry(rank, world, init_file, fn, args, q):
    try:
        dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
        buf = io.BytesIO()  # plain bytes: torch's shared-memory tensors die with the child
        torch.save(fn(rank, world, *args), buf)
        q.put((rank, "ok", buf.getvalue()))
    except BaseException:  # noqa: BLE001 - report any failure to the parent
        q.put((rank, "error", traceback.format_exc()))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def run_ranks(fn, world: int, *args, timeout: float = 120.0):
    """fn(rank, world, *args) on ``world`` processes; returns results by rank, raises on failure."""
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    with tempfile.TemporaryDirectory() as d:
        init_file = os.path.join(d, "init")
        procs = [ctx.Process(target=_entry, args=(r, world, init_file, fn, args, q)) for r in range(world)]
        for p in procs:
            p.start()
        out, errors = {}, []
        try:
            for _ in range(world):
                rank, status, val = q.get(timeout=timeout)
                (out.__setitem__(rank, val) if status == "ok" else errors.append(f"rank {rank}:\n{val}"))
        finally:
            for p in procs:
                p.join(timeout=10)
                if p.is_alive():
                    p.kill()
    if errors:
        raise AssertionError("\n".join(errors))
    return [torch.load(io.BytesIO(out[r]), weights_only=False) for r in range(world)]
