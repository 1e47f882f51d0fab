"""The guest's per-layer hooks in TP layout (``core/tp_step.py``): the chain, plus each layer's KV head shards.

The chain part is ``chain_hooks.ChainHooks``, aimed at the guest's scratch: the KV of [c, segment start)
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

import sys
from typing import Any

import torch

from ..core.stats import RunaheadStats
from ..core.tp_step import GuestTraffic
from ..transport import kv_layout
from ..transport.chain_hooks import ChainHooks
from ..transport.comm import ChainComm, ShardComm
from ..vllm_side.kv_connector import WorkerConnector
from ..vllm_side.seam import KVConnectorMetadata, bound_metadata, connector_metadata, layer_order


class GuestMeta(GuestTraffic, KVConnectorMetadata):
    """One rank's ``GuestTraffic`` as the metadata the guest's runner binds (the chain's messages recv and
    send are in scratch blocks)."""

    @classmethod
    def of(cls, t: GuestTraffic) -> "GuestMeta":
        return cls(**{name: getattr(t, name) for name in t.__dataclass_fields__})


class TPForwardMeta(KVConnectorMetadata):
    """What vLLM's own TP forward binds: no traffic (its hooks do nothing); the connector reports the
    step's stats to vLLM's stats path there."""


TP_FORWARD = TPForwardMeta()


class GuestConnector(WorkerConnector):
    GATHER_AHEAD = 2  # layers of the prefix gather in flight: the one landing next and the one after

    def __init__(self, guest_config, kv_cache_config, comm: ChainComm, shards: ShardComm, gather: ShardComm,
                 stats: RunaheadStats, rank: int, heads: list[tuple[int, int]]):
        super().__init__(guest_config, kv_cache_config, stats)
        self.comm, self.shards, self.gather, self.rank, self.heads = comm, shards, gather, rank, heads
        self.chain = ChainHooks(comm, stats, kv_cache_config.num_blocks)  # over the scratch
        self.paged: dict[str, torch.Tensor] = {}
        self._reset()

    def register_scratch(self, scratch: dict[str, torch.Tensor]) -> None:
        """The guest's scratch, by layer name: what the chain's hooks read and write."""
        self.chain.register(scratch, layer_order(list(scratch)))
        self.order, self.block_shape = self.chain.order, self.chain.block_shape
        self.dtype, self.device = self.chain.dtype, self.chain.device

    @property
    def block_bytes(self) -> int:
        """One scratch block of every layer, all KV heads."""
        return self.chain.block_bytes

    def register_kv_caches(self, paged: dict[str, torch.Tensor]) -> None:
        """vLLM's own (TP) KV caches, by layer name, as its runner registers them with the installed
        connector: where this rank's KV heads land. vLLM's TP forward binds no traffic (``TP_FORWARD``):
        the hooks do nothing there, and the connector only carries the stats to vLLM's stats path."""
        if set(paged) != set(self.chain.kv_caches):
            raise ValueError("KV-Runahead: the guest's attention layers are not vLLM's model's "
                             f"({sorted(self.chain.kv_caches)[:2]}... vs {sorted(paged)[:2]}...)")
        any_paged = next(iter(paged.values()))
        lo, hi = self.heads[self.rank]
        if any_paged.shape[1] != hi - lo or tuple(any_paged.shape[2:]) != self.block_shape[1:]:
            raise ValueError(f"KV-Runahead: a TP rank's KV block {tuple(any_paged.shape[1:])} is not KV heads "
                             f"[{lo}, {hi}) of the guest's {self.block_shape}")
        self.paged = dict(paged)

    def _reset(self) -> None:
        self._to_paged: tuple[torch.Tensor, torch.Tensor] | None = None  # None: no shards this step
        self._send_to: list[tuple[int, torch.Tensor]] = []
        self._recv_into: list[tuple[int, torch.Tensor]] = []
        self._prefix: tuple[torch.Tensor, torch.Tensor] | None = None  # None: no cached prefix this step
        self._gather_to: list[tuple[int, torch.Tensor]] = []
        self._gather_from: list[tuple[int, torch.Tensor]] = []

    def start_load_kv(self, forward_context, **kwargs: Any) -> None:
        meta = connector_metadata(self)
        self._reset()
        if not isinstance(meta, GuestMeta):
            self.chain.reset()
            return
        self.chain.start(meta)
        if not len(meta.keep_src):
            return
        blocks = self.chain.device_blocks
        self._to_paged = (blocks(meta.keep_src), blocks(meta.keep_dst))
        self._send_to = [(dst, blocks(ids)) for dst, ids in meta.shard_send if len(ids)]
        self._recv_into = [(src, blocks(ids)) for src, ids in meta.shard_recv if len(ids)]
        lo, hi = self.heads[self.rank]
        for _ in self.order:  # layer by layer, each later rank in order: how the buffers come back
            for src, ids in self._recv_into:
                self.shards.post_recv(src, (len(ids), hi - lo, *self.block_shape[1:]), self.dtype, self.device)
        if len(meta.own_src):
            self._prefix = (blocks(meta.own_src), blocks(meta.own_dst))
            self._gather_to = [(dst, blocks(ids)) for dst, ids in meta.gather_send]
            self._gather_from = [(src, blocks(ids)) for src, ids in meta.gather_recv]
            for layer in range(min(self.GATHER_AHEAD, len(self.order))):
                self._post_gather(layer)
            self._land_prefix(0)

    def _post_gather(self, layer: int) -> None:
        """Send this rank's KV heads of the prefix, layer ``layer``, to those lacking them; post its receives."""
        name = self.order[layer]
        for dst, ids in self._gather_to:
            self.gather.post_send(dst, kv_layout.gather(self.paged[name], ids))
            self.stats.blocks_sent += len(ids)
        for src, ids in self._gather_from:
            a, b = self.heads[src]
            self.gather.post_recv(src, (len(ids), b - a, *self.block_shape[1:]), self.dtype, self.device)

    def _land_prefix(self, layer: int) -> None:
        """Layer ``layer``'s cached prefix, all KV heads, into the scratch (before that layer runs), and the
        gather of the layer after the ones in flight posted."""
        name = self.order[layer]
        scratch = self.chain.kv_caches[name]
        lo, hi = self.heads[self.rank]
        src, dst = self._prefix
        kv_layout.scatter(scratch[:, lo:hi], dst, kv_layout.gather(self.paged[name], src))
        for (peer, ids), buf in zip(self._gather_from, self.gather.wait_recvs(len(self._gather_from))):
            a, b = self.heads[peer]
            kv_layout.scatter(scratch[:, a:b], ids, buf)
            self.stats.blocks_received += len(ids)
        if layer + self.GATHER_AHEAD < len(self.order):
            self._post_gather(layer + self.GATHER_AHEAD)

    def wait_for_layer_load(self, layer_name: str) -> None:
        self.chain.enter(layer_name)

    def save_kv_layer(self, layer_name: str, kv_layer: torch.Tensor, attn_metadata, **kwargs: Any) -> None:
        self.chain.exit(kv_layer)
        if self._to_paged is None:
            return
        lo, hi = self.heads[self.rank]
        src, dst = self._to_paged
        kv_layout.scatter(self.paged[layer_name], dst, kv_layout.gather(kv_layer, src)[:, lo:hi])
        for peer, ids in self._send_to:
            a, b = self.heads[peer]
            self.shards.post_send(peer, kv_layout.gather(kv_layer, ids)[:, a:b])
            self.stats.blocks_sent += len(ids)
        if self._prefix is not None and self.chain.layer < len(self.order):
            self._land_prefix(self.chain.layer)  # the next layer's, now that this one's KV has gone out

    def wait_for_save(self) -> None:
        if sys.exc_info()[1] is not None:  # vLLM calls it on a raising forward's way out
            self._abort()
            return
        if self._to_paged is not None:
            try:
                bufs = iter(self.shards.wait_recvs())
                for name in self.order:
                    for _, ids in self._recv_into:
                        kv_layout.scatter(self.paged[name], ids, next(bufs))
                        self.stats.blocks_received += len(ids)
                self.shards.end_step()
                self.gather.end_step()
            except BaseException:
                self._abort()
                raise
        self._reset()
        self.chain.finish(failed=False)

    def _abort(self) -> None:
        """The step failed: every flow's traffic dropped without waiting (a peer may be gone)."""
        self.shards.abort_step()
        self.gather.abort_step()
        self.chain.finish(failed=True)
        self._reset()

    def get_kv_connector_stats(self):
        # The guest's runner asks too, and its output is thrown away: the interval's figures wait for
        # vLLM's runner, whose output rank's reply carries them to vLLM's stats path.
        if isinstance(bound_metadata(self), GuestMeta):
            return None
        return super().get_kv_connector_stats()
