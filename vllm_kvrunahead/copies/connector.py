"""The chain of copies' KV connector: the chain's per-layer moves (``chain_hooks.ChainHooks``) over this
worker's own paged blocks (the same slots on every worker: they share the block table).

vLLM's attention op calls ``wait_for_layer_load`` before and ``save_kv_layer`` after each attention layer
when a KV connector is installed; the model runner binds per-step metadata (``RunaheadMeta``: this worker's
ring traffic) before the forward and calls ``wait_for_save`` after.
"""
from __future__ import annotations

import dataclasses
import sys
from typing import Any

import torch

from ..core.plan import Traffic
from ..core.stats import RunaheadStats
from ..transport.chain_hooks import ChainHooks
from ..transport.comm import ChainComm
from ..transport.profiling import StepProfiler
from ..vllm_side.kv_connector import WorkerConnector
from ..vllm_side.seam import (
    KVConnectorMetadata, connector_metadata, kv_block_count, layer_order, layers_writing_kv_in_forward
)


class RunaheadMeta(Traffic, KVConnectorMetadata):
    """This worker's ring traffic for one step (``plan.Traffic``), as the metadata vLLM's runner binds
    to the connector. send goes out once its layer's attention has run, or at the layer's attention
    entry with send_on_entry."""

    @classmethod
    def of(cls, traffic: Traffic) -> "RunaheadMeta":
        return cls(**{f.name: getattr(traffic, f.name) for f in dataclasses.fields(traffic)})


EMPTY_META = RunaheadMeta()


class KVRunaheadConnector(WorkerConnector):
    """The chain of copies' connector: the chain's hooks over this worker's paged KV caches."""

    def __init__(self, vllm_config, kv_cache_config, comm: ChainComm, stats: RunaheadStats,
                 profile: bool = False, send_on_entry: bool = False):
        super().__init__(vllm_config, kv_cache_config, stats)
        self.comm = comm
        self.chain = ChainHooks(comm, stats, kv_block_count(self), profile, send_on_entry)

    def register_kv_caches(self, kv_caches: dict[str, torch.Tensor]) -> None:
        order = layer_order(list(kv_caches))
        self.chain.register(kv_caches, order, layers_writing_kv_in_forward(self._vllm_config, order))

    @property
    def device(self):
        return self.chain.device

    @property
    def block_bytes(self) -> int:
        return self.chain.block_bytes

    @property
    def profiler(self) -> StepProfiler:
        return self.chain.profiler

    def start_load_kv(self, forward_context, **kwargs: Any) -> None:
        meta = connector_metadata(self)
        self.chain.start(meta if isinstance(meta, RunaheadMeta) else EMPTY_META)

    def wait_for_layer_load(self, layer_name: str) -> None:
        self.chain.enter(layer_name)

    def save_kv_layer(self, layer_name: str, kv_layer: torch.Tensor, attn_metadata, **kwargs: Any) -> None:
        self.chain.exit(kv_layer)

    def wait_for_save(self) -> None:
        self.chain.finish(failed=sys.exc_info()[1] is not None)  # vLLM calls it on a raising forward's way out
