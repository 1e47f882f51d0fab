"""The guest's per-layer hooks in TP layout (``tp_layout.py``): the chain, plus each layer's KV head shards.

The chain part is ``KVRunaheadConnector``'s, aimed at the guest's scratch: the KV of [c, segment start)
arrives from rank - 1 before each attention layer, and [c, segment end) goes on to rank + 1 after it.
A chunk after c cached tokens also needs the cached prefix [0, c), all heads, in the scratch: this rank's
own heads from its paged blocks, the others' from the ranks that hold them (``gather``, its own
``ShardComm``, two layers in flight). A layer's prefix lands at the previous layer's exit (the first's
before the forward): rank 0's guest writes its own tokens into the block holding an unaligned c before
the layer's entry hook runs, and the prefix's slots of that block must be there first.
After each layer this rank also
- copies its own KV heads of [c, segment end) from the scratch into its paged blocks (vLLM's TP layer
  of the same name), and
- sends every earlier rank that rank's KV heads of this rank's segment (``ShardComm``, one group per pair).
Its own heads of the later segments, posted for the whole step when the step starts, are waited for
and written into its paged blocks when the guest's forward ends (``wait_for_save``): before vLLM's TP
forward reads them.
"""
from __future__ import annotations

import dataclasses
import sys
from typing import Any

import numpy as np
import torch

from . import kv_layout
from .comm import ChainComm, ShardComm
from .connector import KVRunaheadConnector, RunaheadMeta
from .stats import ChainStats
from .tp_layout import GuestTraffic
from .vllm_seam import KVConnectorRole, bound_metadata, connector_metadata


@dataclasses.dataclass(frozen=True)
class GuestMeta(RunaheadMeta):
    """One rank's ``GuestTraffic`` as the metadata the guest's runner binds (the chain's fields are
    ``RunaheadMeta``'s: recv and send, in scratch blocks)."""

    keep_src: np.ndarray = dataclasses.field(default_factory=lambda: np.zeros(0, dtype=np.int64))
    keep_dst: np.ndarray = dataclasses.field(default_factory=lambda: np.zeros(0, dtype=np.int64))
    shard_send: tuple = ()
    shard_recv: tuple = ()
    own_src: np.ndarray = dataclasses.field(default_factory=lambda: np.zeros(0, dtype=np.int64))
    own_dst: np.ndarray = dataclasses.field(default_factory=lambda: np.zeros(0, dtype=np.int64))
    gather_send: tuple = ()
    gather_recv: tuple = ()

    @classmethod
    def of(cls, t: GuestTraffic) -> "GuestMeta":
        return cls(**{f.name: getattr(t, f.name) for f in dataclasses.fields(t)})


class GuestConnector(KVRunaheadConnector):
    GATHER_AHEAD = 2  # layers of the prefix gather in flight: the one landing next and the one after

    def __init__(self, guest_config, kv_cache_config, comm: ChainComm, shards: ShardComm, gather: ShardComm,
                 stats: ChainStats, rank: int, heads: list[tuple[int, int]]):
        self.shards, self.gather, self.rank, self.heads = shards, gather, rank, heads
        self.paged: dict[str, torch.Tensor] = {}
        super().__init__(guest_config, KVConnectorRole.WORKER, kv_cache_config, comm, stats)

    def register_scratch(self, scratch: dict[str, torch.Tensor]) -> None:
        """The guest's scratch, by layer name: what the chain's hooks read and write."""
        super().register_kv_caches(scratch)

    def register_kv_caches(self, paged: dict[str, torch.Tensor]) -> None:
        """vLLM's own (TP) KV caches, by layer name, as its runner registers them with the installed
        connector: where this rank's heads land. vLLM's TP forward binds no traffic (``EMPTY_META``): the
        hooks do nothing there, and the connector only carries the stats to vLLM's stats path."""
        if set(paged) != set(self.kv_caches):
            raise ValueError("KV-Runahead: the guest's attention layers are not vLLM's model's "
                             f"({sorted(self.kv_caches)[:2]}... vs {sorted(paged)[:2]}...)")
        any_paged = next(iter(paged.values()))
        lo, hi = self.heads[self.rank]
        if any_paged.shape[1] != hi - lo or tuple(any_paged.shape[2:]) != self.block_shape[1:]:
            raise ValueError(f"KV-Runahead: a TP rank's KV block {tuple(any_paged.shape[1:])} is not heads "
                             f"[{lo}, {hi}) of the guest's {self.block_shape}")
        self.paged = dict(paged)

    def _reset(self) -> None:
        super()._reset()
        self._keep: tuple[torch.Tensor, torch.Tensor] | None = None  # None: no shards this step
        self._send_to: list[tuple[int, torch.Tensor]] = []
        self._recv_into: list[tuple[int, torch.Tensor]] = []
        self._own: tuple[torch.Tensor, torch.Tensor] | None = None  # None: no cached prefix this step
        self._gather_to: list[tuple[int, torch.Tensor]] = []
        self._gather_from: list[tuple[int, torch.Tensor]] = []

    def start_load_kv(self, forward_context, **kwargs: Any) -> None:
        super().start_load_kv(forward_context, **kwargs)
        meta = connector_metadata(self)
        if not isinstance(meta, GuestMeta) or not len(meta.keep_src):
            return
        self._keep = (self._device_blocks(meta.keep_src), self._device_blocks(meta.keep_dst))
        self._send_to = [(dst, self._device_blocks(ids)) for dst, ids in meta.shard_send if len(ids)]
        self._recv_into = [(src, self._device_blocks(ids)) for src, ids in meta.shard_recv if len(ids)]
        lo, hi = self.heads[self.rank]
        for _ in self.order:  # layer by layer, each later rank in order: how the buffers come back
            for src, ids in self._recv_into:
                self.shards.post_recv(src, (len(ids), hi - lo, *self.block_shape[1:]), self.dtype, self.device)
        if len(meta.own_src):
            self._own = (self._device_blocks(meta.own_src), self._device_blocks(meta.own_dst))
            self._gather_to = [(dst, self._device_blocks(ids)) for dst, ids in meta.gather_send]
            self._gather_from = [(src, self._device_blocks(ids)) for src, ids in meta.gather_recv]
            for layer in range(min(self.GATHER_AHEAD, len(self.order))):
                self._post_gather(layer)
            self._land_prefix(0)

    def _post_gather(self, layer: int) -> None:
        """Send this rank's heads of the prefix, layer ``layer``, to those lacking them; post its receives."""
        name = self.order[layer]
        for dst, ids in self._gather_to:
            self.gather.post_send(dst, kv_layout.gather(self.paged[name], ids))
            self.stats.blocks_sent += len(ids)
        for src, ids in self._gather_from:
            a, b = self.heads[src]
            self.gather.post_recv(src, (len(ids), b - a, *self.block_shape[1:]), self.dtype, self.device)

    def _land_prefix(self, layer: int) -> None:
        """Layer ``layer``'s cached prefix, all heads, into the scratch (before that layer runs), and the
        gather of the layer after the ones in flight posted."""
        name = self.order[layer]
        scratch = self.kv_caches[name]
        lo, hi = self.heads[self.rank]
        src, dst = self._own
        kv_layout.scatter(scratch[:, lo:hi], dst, kv_layout.gather(self.paged[name], src))
        for (peer, ids), buf in zip(self._gather_from, self.gather.wait_recvs(len(self._gather_from))):
            a, b = self.heads[peer]
            kv_layout.scatter(scratch[:, a:b], ids, buf)
            self.stats.blocks_received += len(ids)
        if layer + self.GATHER_AHEAD < len(self.order):
            self._post_gather(layer + self.GATHER_AHEAD)

    def save_kv_layer(self, layer_name: str, kv_layer: torch.Tensor, attn_metadata, **kwargs: Any) -> None:
        super().save_kv_layer(layer_name, kv_layer, attn_metadata, **kwargs)
        if self._keep is None:
            return
        lo, hi = self.heads[self.rank]
        src, dst = self._keep
        kv_layout.scatter(self.paged[layer_name], dst, kv_layout.gather(kv_layer, src)[:, lo:hi])
        for peer, ids in self._send_to:
            a, b = self.heads[peer]
            self.shards.post_send(peer, kv_layout.gather(kv_layer, ids)[:, a:b])
            self.stats.blocks_sent += len(ids)
        if self._own is not None and self._layer < len(self.order):
            self._land_prefix(self._layer)  # the next layer's, now that this one's KV has gone out

    def wait_for_save(self) -> None:
        if sys.exc_info()[1] is not None:
            self.shards.abort_step()
            self.gather.abort_step()
            super().wait_for_save()
            return
        if self._keep is not None:
            try:
                bufs = iter(self.shards.wait_recvs())
                for name in self.order:
                    for _, ids in self._recv_into:
                        kv_layout.scatter(self.paged[name], ids, next(bufs))
                        self.stats.blocks_received += len(ids)
                self.shards.end_step()
                self.gather.end_step()
            except BaseException:
                self.shards.abort_step()
                self.gather.abort_step()
                self.comm.abort_step()
                self._reset()
                raise
        super().wait_for_save()

    def get_kv_connector_stats(self):
        # The guest's runner asks too, and its output is thrown away: the interval's figures wait for
        # vLLM's runner, whose output rank's reply carries them to vLLM's stats path.
        if isinstance(bound_metadata(self), GuestMeta):
            return None
        return super().get_kv_connector_stats()
