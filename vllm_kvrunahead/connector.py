"""The per-layer half of KV-Runahead, as a (worker-side) vLLM KV connector.

vLLM's attention op calls ``wait_for_layer_load`` before and ``save_kv_layer``
after each attention layer when a KV connector is installed; the model runner
binds per-step metadata before the forward and calls ``wait_for_save`` after.
Here, per layer: receive the prefix KV from the predecessor into this worker's
own paged blocks (same slots on every worker: they share the block table),
attend, then send prefix + own KV to the successor. With ``send_on_entry`` the send
goes out at the layer's attention entry instead: vLLM writes the layer's K and V
into the cache in an op of its own just before, so they are final there, and a
successor waits for this layer's QKV projection, not for its attention and MLP.
"""
from __future__ import annotations

import sys
import dataclasses
from typing import Any

import numpy as np
import torch

from . import kv_layout
from .comm import ChainComm
from .plan import Traffic
from .stats import ChainStats
from .profiling import StepProfiler
from .log import logger
from .vllm_seam import (
    KVConnectorBase_V1,
    KVConnectorMetadata,
    connector_metadata,
    kv_block_count,
    layer_order,
    layers_writing_kv_in_forward,
)


class RunaheadMeta(Traffic, KVConnectorMetadata):
    """This worker's ring traffic for one step (``plan.Traffic``), as the metadata vLLM's runner binds
    to the connector. send goes out once its layer's attention has run, or at the layer's attention
    entry with send_on_entry."""

    @classmethod
    def of(cls, traffic: Traffic) -> "RunaheadMeta":
        return cls(**{f.name: getattr(traffic, f.name) for f in dataclasses.fields(traffic)})


EMPTY_META = RunaheadMeta()
AHEAD = 2  # the head keeps its prefix sends this many layers ahead of its own layer


class KVRunaheadConnector(KVConnectorBase_V1):
    def __init__(self, vllm_config, role, kv_cache_config, comm: ChainComm, stats: ChainStats,
                 profile: bool = False, send_on_entry: bool = False):
        super().__init__(vllm_config, role, kv_cache_config)
        self.vllm_config = vllm_config
        self.comm = comm
        self._profile = profile
        self.send_on_entry = send_on_entry
        self.kv_caches: dict[str, torch.Tensor] = {}
        self.order: list[str] = []  # layer names in forward order
        self.stats = stats  # the chain's one stats record: the connector counts what it moves
        self._reset()

    def _reset(self) -> None:
        self._recv = self._send = self._ahead = self._pending = None  # kernel block ids / next receive
        self._layer = 0           # attention layers entered this step
        self._layers_sent = 0
        self._busy = False        # this step moves KV

    # -- set-up ---------------------------------------------------------
    def register_kv_caches(self, kv_caches: dict[str, torch.Tensor]) -> None:
        shapes = set()
        for name, cache in kv_caches.items():
            kv_layout.check_layer_cache(name, cache)
            shapes.add((tuple(cache.shape), cache.dtype))
        if len(shapes) != 1:
            raise ValueError(
                f"KV-Runahead needs the same KV cache shape in every layer, got {sorted(map(str, shapes))}")
        self.kv_caches = dict(kv_caches)
        self.order = layer_order(list(kv_caches))
        writes_in_forward = layers_writing_kv_in_forward(self.vllm_config, self.order) if self.send_on_entry else []
        if writes_in_forward:
            logger.warning("KV-Runahead: early_send is off: the attention backend of %d layer(s) (%s, ...) writes "
                           "the KV cache inside its forward, so the KV is final only after attention",
                           len(writes_in_forward), writes_in_forward[0])
            self.send_on_entry = False
        any_cache = next(iter(kv_caches.values()))
        self.block_shape = tuple(any_cache.shape[1:])
        self.dtype, self.device = any_cache.dtype, any_cache.device
        self.profiler = StepProfiler(self.device, self._profile)
        # kernel blocks per scheduler block (some backends split blocks)
        spec_blocks = kv_block_count(self)
        if any_cache.shape[0] % spec_blocks:
            raise ValueError(f"KV-Runahead: {any_cache.shape[0]} kernel blocks do not split "
                             f"{spec_blocks} KV blocks evenly")
        self.per_block = any_cache.shape[0] // spec_blocks

    # -- per step ---------------------------------------------------------
    def start_load_kv(self, forward_context, **kwargs: Any) -> None:
        """Message order per peer pair is fixed (NCCL runs a pair's sends and receives in issue
        order on one stream): head: upfront, prefix layers 0 and 1, then per layer l: prefix
        l+2, receive l+1; position 0: upfront, receive 0, then per layer: receive l+1, send l."""
        meta = connector_metadata(self)
        self._reset()
        if not isinstance(meta, RunaheadMeta):
            return
        busy = any(len(b) for b in (meta.recv, meta.send, meta.send_ahead, meta.upfront_send, meta.upfront_recv))
        if not busy:
            return
        self._busy = True
        self.stats.steps += 1
        self.profiler.begin()
        if len(meta.upfront_send):
            blocks = self._device_blocks(meta.upfront_send)
            self.comm.post_send(torch.stack([kv_layout.gather(self.kv_caches[n], blocks) for n in self.order]))
            self.stats.blocks_sent += len(blocks) * len(self.order)
        if len(meta.upfront_recv):
            blocks = self._device_blocks(meta.upfront_recv)
            buf = torch.empty((len(self.order), len(blocks), *self.block_shape), dtype=self.dtype,
                              device=self.device)
            self.comm.wait_recv(self.comm.post_recv(buf))
            for name, data in zip(self.order, buf):
                kv_layout.scatter(self.kv_caches[name], blocks, data)
            self.stats.blocks_received += len(blocks) * len(self.order)
        if len(meta.send_ahead):
            self._ahead = self._device_blocks(meta.send_ahead)
            for layer in range(min(AHEAD, len(self.order))):
                self._send_ahead(layer)
        if len(meta.recv):
            self._recv = self._device_blocks(meta.recv)
            self._pending = self._post_recv()
        if len(meta.send):
            self._send = self._device_blocks(meta.send)

    def _device_blocks(self, block_ids: np.ndarray) -> torch.Tensor:
        ids = kv_layout.kernel_blocks(block_ids, self.per_block)
        return torch.from_numpy(ids).to(self.device, non_blocking=True)

    def _post_recv(self):
        buf = torch.empty((len(self._recv), *self.block_shape), dtype=self.dtype, device=self.device)
        return self.comm.post_recv(buf), buf

    def _send_ahead(self, layer: int) -> None:
        self.comm.post_send(kv_layout.gather(self.kv_caches[self.order[layer]], self._ahead))
        self._layers_sent += 1
        self.stats.layers_sent += 1
        self.stats.blocks_sent += len(self._ahead)

    def wait_for_layer_load(self, layer_name: str) -> None:
        layer = self._layer
        self._layer += 1
        if self._ahead is not None:
            if layer >= len(self.order) or self.order[layer] != layer_name:
                raise RuntimeError(
                    f"KV-Runahead: attention layer {layer_name} ran as layer {layer}; the prefix is sent in "
                    f"the order {self.order[:4]}...: the model's layers do not run in index order")
            if layer + AHEAD < len(self.order):
                self._send_ahead(layer + AHEAD)
        # Sending this layer at its entry: the send goes before the next layer's receive. NCCL runs a
        # group's point-to-point ops in issue order on one stream per rank, so a send posted after that
        # receive would wait for the predecessor's next layer.
        send_now = self.send_on_entry and self._send is not None
        if self._recv is not None:
            if self._pending is None:
                raise RuntimeError(f"KV-Runahead: layer {layer_name} asked for more layers than the model has")
            work, buf = self._pending
            self._pending = None
            if not send_now:
                self._post_next_recv()  # post the next layer's receive before waiting on this one
            waited = self.profiler.around_wait()
            self.comm.wait_recv(work)
            waited()
            kv_layout.scatter(self.kv_caches[layer_name], self._recv, buf)
            self.stats.blocks_received += len(self._recv)
        if send_now:
            self._post_layer_send(self.kv_caches[layer_name])
            self.stats.layers_sent_on_entry += 1
            if self._recv is not None:
                self._post_next_recv()

    def _post_next_recv(self) -> None:
        self._pending = self._post_recv() if self._layer < len(self.order) else None

    def _post_layer_send(self, kv_layer: torch.Tensor) -> None:
        self.comm.post_send(kv_layout.gather(kv_layer, self._send))
        self._layers_sent += 1
        self.stats.layers_sent += 1
        self.stats.blocks_sent += len(self._send)

    def save_kv_layer(self, layer_name: str, kv_layer: torch.Tensor, attn_metadata, **kwargs: Any) -> None:
        if self._send is not None and not self.send_on_entry:
            self._post_layer_send(kv_layer)

    def wait_for_save(self) -> None:
        if sys.exc_info()[1] is not None:  # vLLM calls this on the way out of a forward that raised
            if self._busy:
                logger.error("KV-Runahead: step aborted at attention layer %d of %d; its chain traffic is dropped",
                             self._layer, len(self.order))
            self.comm.drop_sends()
            self._reset()
            return
        self.comm.wait_sends()
        if self._recv is not None and self._layer != len(self.order):
            raise RuntimeError(
                f"KV-Runahead: {len(self.order) - self._layer} layer(s) of prefix KV were never consumed; "
                "the model has attention layers the chain cannot see")
        if (self._send is not None or self._ahead is not None) and self._layers_sent != len(self.order):
            raise RuntimeError(f"KV-Runahead: sent {self._layers_sent} of {len(self.order)} layers")
        if self._busy:
            self.profiler.end()
        self._reset()

    # -- scheduler side: unused (KV-Runahead plans on the workers) ----------
    def get_num_new_matched_tokens(self, request, num_computed_tokens):
        return 0, False

    def update_state_after_alloc(self, request, blocks, num_external_tokens):
        return None

    def build_connector_meta(self, scheduler_output):
        return EMPTY_META

    def request_finished_all_groups(self, request, block_ids):
        return False, None
