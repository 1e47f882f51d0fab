"""The guest's per-layer hooks in TP layout (``core/tp_step.py``): vLLM's connector calls during the guest's
forward, handed to ``transport/tp_hooks.TPHooks``, which issues the step's chain, KV head shards and prefix
gather in ``core/tp_order.step_order``'s order (``docs/tp-layout-transport.md``).

The chain brings the KV of [c, segment start) from rank - 1 into the scratch before each attention layer
and sends [c, segment end) on to rank + 1 after it; a chunk after c cached tokens also needs the cached
prefix [0, c), every KV head, in the scratch (this rank's own from its paged blocks, the others' gathered
from their owners, a layer landing at the previous layer's exit). After each layer this rank also copies
its own KV heads of [c, segment end) into its paged blocks (vLLM's TP layer of the same name) and sends
every earlier rank that rank's KV heads of its segment, in rounds; its own KV heads of the later segments
land in its paged blocks as their rounds arrive, all before the guest's forward ends (``wait_for_save``),
so before vLLM's TP forward reads them. Each message sits in a preallocated slot of the rank's
``CommArena``, which vLLM's KV budget leaves out (``vllm_side/guest.py``).
"""
from __future__ import annotations

import sys
from typing import Any

import torch

from ..core.stats import RunaheadStats
from ..core.tp_step import GuestTraffic
from ..transport.comm import ChainComm, CommArena, RoundComm
from ..transport.tp_hooks import TPHooks
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
    def __init__(self, guest_config, kv_cache_config, comm: ChainComm, shards: RoundComm, gather: RoundComm,
                 stats: RunaheadStats, rank: int, heads: list[tuple[int, int]], arena: CommArena):
        super().__init__(guest_config, kv_cache_config, stats)
        self.comm, self.shards, self.gather, self.rank, self.heads = comm, shards, gather, rank, heads
        self.hooks = TPHooks(comm, shards, gather, arena, stats, rank, heads, kv_cache_config.num_blocks)
        self.chain = self.hooks.chain

    def register_scratch(self, scratch: dict[str, torch.Tensor]) -> None:
        """The guest's scratch, by layer name: what the chain's hooks read and write."""
        self.hooks.register(scratch, layer_order(list(scratch)))
        self.order, self.block_shape = self.hooks.order, self.hooks.block_shape
        self.dtype, self.device = self.hooks.dtype, self.hooks.device

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
        self.hooks.register_paged(paged)

    @property
    def paged(self) -> dict[str, torch.Tensor]:
        return self.hooks.paged

    def start_load_kv(self, forward_context, **kwargs: Any) -> None:
        meta = connector_metadata(self)
        self.hooks.start(meta if isinstance(meta, GuestMeta) else None)

    def wait_for_layer_load(self, layer_name: str) -> None:
        self.hooks.enter(layer_name)

    def save_kv_layer(self, layer_name: str, kv_layer: torch.Tensor, attn_metadata, **kwargs: Any) -> None:
        self.hooks.exit(layer_name, kv_layer)

    def wait_for_save(self) -> None:
        if sys.exc_info()[1] is not None:  # vLLM calls it on a raising forward's way out
            self.hooks.abort()
            return
        self.hooks.finish()

    def get_kv_connector_stats(self):
        # The guest's runner asks too, and its output is thrown away: the interval's figures wait for
        # vLLM's runner, whose output rank's reply carries them to vLLM's stats path.
        if isinstance(bound_metadata(self), GuestMeta):
            return None
        return super().get_kv_connector_stats()
