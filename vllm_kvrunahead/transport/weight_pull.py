"""The peer guest's weight traffic: each rank pulls a decoder layer's TP shards from every rank, one-sided.

Weights are read-only once loaded, so no rank needs to take part in another's fetch: every rank publishes its
shards once, at start-up, and each guest copies the pieces of layer l it needs (``core/weight_shards.py``)
straight from its peers' memory into the layer's slot when it is about to run it. Nothing waits on a peer
mid-step, so the weight traffic cannot deadlock with the KV flows, whose ranks run layers out of step
(``core/tp_order.py``'s lags). A collective fetch (an all-gather per layer) would make every rank wait for
the slowest to reach the layer, and on CPU, where a KV wait blocks the host, it deadlocked.

On CPU a rank publishes its shards in a shared-memory file (vLLM's own tensors are moved into it, so the
shards are held once) and maps its peers'. On GPUs it publishes CUDA IPC handles of vLLM's tensors (torch's
own, as torch.multiprocessing shares CUDA tensors) and a pull is a device-to-device copy of a peer's memory
(the copy engines over NVLink; ``docs/guest-beyond-one-gpu.md``, option (b)); it runs on the layer's own
stream, not yet ahead of it.
"""
from __future__ import annotations

import os
import uuid
from dataclasses import dataclass

import torch
import torch.distributed as dist

from ..core.weight_shards import Piece

SHM = "/dev/shm"


@dataclass(frozen=True)
class ShardedWeight:
    """One weight of a layer: this rank's shard of it, where each rank's pieces go, along which dimension."""
    shard: torch.Tensor                 # this rank's: vLLM's TP model's parameter itself
    pieces: list[list[Piece]]          # per rank
    dim: int                           # the cut dimension (0: rows, 1: columns)


class SharedShards:
    """Every rank's shards of the layers' weights (``layers[l]``: ``ShardedWeight`` per weight, in the order
    ``take`` fills), readable by every rank. Collective at construction (``group``: every rank, gloo)."""

    def __init__(self, layers: list[list[ShardedWeight]], rank: int, n: int, group) -> None:
        self.layers, self.rank, self.n = layers, rank, n
        shards = [w.shard for ws in layers for w in ws]
        if not shards or len({(s.dtype, s.device) for s in shards}) != 1:
            raise ValueError("KV-Runahead's peer guest publishes shards of one dtype on one device")
        sizes = [s.numel() for s in shards]
        cpu = shards[0].device.type == "cpu"
        need = sum(sizes) * shards[0].element_size()
        free = _shm_free() if cpu else need
        every = [None] * n
        dist.all_gather_object(every, ((sum(sizes), str(shards[0].dtype), shards[0].device.type), free), group=group)
        if len({e[0] for e in every}) != 1:
            raise ValueError(f"KV-Runahead's peer guest: the ranks' shards differ in size, dtype or device: {every}")
        if any(f < need for _, f in every):   # every rank refuses alike (a file beyond the mount's size: SIGBUS)
            raise RuntimeError(f"KV-Runahead's peer guest needs {need / 2 ** 20:.0f} MiB of {SHM} on every rank for "
                               f"its weight shards; a rank has {min(f for _, f in every) / 2 ** 20:.0f} MiB free. "
                               "Enlarge it (a container's --shm-size) or use the full guest")
        publish = _publish_shm if cpu else _publish_ipc
        flats = publish(shards, rank, n, group)   # per rank: its shards, in order
        # per rank, per layer, per weight: a view of that rank's shard
        self.peers: list[list[list[torch.Tensor]]] = []
        for flat in flats:
            views = iter(flat)
            self.peers.append([[next(views) for _ in ws] for ws in layers])
        self.layers_taken = 0
        self.bytes_pulled = 0

    def take(self, layer: int, dests: list[torch.Tensor]) -> None:
        """Layer ``layer``'s full weights into ``dests``, from every rank's shards."""
        for k in range(self.n):
            for j, (w, dest) in enumerate(zip(self.layers[layer], dests, strict=True)):
                src = self.peers[k][layer][j]
                for p in w.pieces[k]:
                    dest.narrow(w.dim, p.dst, p.length).copy_(src.narrow(w.dim, p.src, p.length))
                    if k != self.rank:
                        self.bytes_pulled += p.length * src.stride(w.dim) * src.element_size() \
                            if w.dim == 0 else src.shape[0] * p.length * src.element_size()
        self.layers_taken += 1


def _shm_free() -> int:
    st = os.statvfs(SHM)
    return st.f_bavail * st.f_frsize


def _publish_shm(shards: list[torch.Tensor], rank: int, n: int, group) -> list[list[torch.Tensor]]:
    """CPU: this rank's shards moved into a shared-memory file, every rank's file mapped."""
    dtype, sizes = shards[0].dtype, [s.numel() for s in shards]
    total = sum(sizes)
    tag = [uuid.uuid4().hex if rank == 0 else None]
    dist.broadcast_object_list(tag, src=dist.get_global_rank(group, 0), group=group)
    paths = [f"{SHM}/kvr-peer-{tag[0]}-{k}" for k in range(n)]
    mine = torch.from_file(paths[rank], shared=True, size=total, dtype=dtype)
    with torch.no_grad():
        for s, view in zip(shards, torch.split(mine, sizes), strict=True):
            view.copy_(s.reshape(-1))
            s.set_(view.view(s.shape))   # vLLM's parameter now lives in the shared file: held once
    dist.barrier(group=group)        # every file written
    flats = [mine if k == rank else torch.from_file(paths[k], shared=True, size=total, dtype=dtype) for k in range(n)]
    dist.barrier(group=group)        # every file mapped: the names can go (the mappings stay)
    os.unlink(paths[rank])
    return [[v.view(s.shape) for v, s in zip(torch.split(flat, sizes), shards, strict=True)] for flat in flats]


def _publish_ipc(shards: list[torch.Tensor], rank: int, n: int, group) -> list[list[torch.Tensor]]:
    """GPUs: CUDA IPC handles of this rank's shards (vLLM's tensors, alive as long as its model), every peer's
    opened on this rank."""
    from torch.multiprocessing.reductions import reduce_tensor

    mine = [reduce_tensor(s.detach()) for s in shards]
    every = [None] * n
    dist.all_gather_object(every, [args for _, args in mine], group=group)
    rebuild = mine[0][0]
    return [shards if k == rank else [rebuild(*args) for args in every[k]] for k in range(n)]
