"""The per-layer half of KV-Runahead, as a (worker-side) vLLM KV connector.

vLLM's attention op calls ``wait_for_layer_load`` before and ``save_kv_layer``
after each attention layer when a KV connector is installed; the model runner
binds per-step metadata before the forward and calls ``wait_for_save`` after.
Here, per layer: receive the prefix KV from the predecessor into this worker's
own paged blocks (same slots on every worker: they share the block table),
attend, then send prefix + own KV to the successor.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from . import kv_layout
from .comm import ChainComm
from .profiling import StepProfiler
from .vllm_seam import KVConnectorBase_V1, KVConnectorMetadata


@dataclass
class RunaheadMeta(KVConnectorMetadata):
    """This worker's chain traffic for one step (scheduler block ids, in message order)."""

    recv_blocks: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    send_blocks: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))


EMPTY_META = RunaheadMeta()


@dataclass
class ChainStats:
    steps: int = 0
    blocks_received: int = 0  # kernel blocks x layers
    blocks_sent: int = 0


class KVRunaheadConnector(KVConnectorBase_V1):
    def __init__(self, vllm_config, role, kv_cache_config, comm: ChainComm, profile: bool = False):
        super().__init__(vllm_config, role, kv_cache_config)
        self.comm = comm
        self._profile = profile
        self.kv_caches: dict[str, torch.Tensor] = {}
        self.stats = ChainStats()
        self._recv: torch.Tensor | None = None  # kernel block ids to receive
        self._send: torch.Tensor | None = None  # kernel block ids to send
        self._pending = None
        self._layers_left = 0
        self._layers_sent = 0

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
        any_cache = next(iter(kv_caches.values()))
        self.block_shape = tuple(any_cache.shape[1:])
        self.dtype, self.device = any_cache.dtype, any_cache.device
        self.profiler = StepProfiler(self.device, self._profile)
        # kernel blocks per scheduler block (some backends split blocks)
        spec_blocks = self._kv_cache_config.num_blocks
        if any_cache.shape[0] % spec_blocks:
            raise ValueError(f"KV-Runahead: {any_cache.shape[0]} kernel blocks do not split "
                             f"{spec_blocks} KV blocks evenly")
        self.per_block = any_cache.shape[0] // spec_blocks

    # -- per step ---------------------------------------------------------
    def start_load_kv(self, forward_context, **kwargs: Any) -> None:
        meta = self._get_connector_metadata()
        self._recv = self._send = self._pending = None
        self._layers_sent = 0
        if not isinstance(meta, RunaheadMeta):
            return
        if len(meta.recv_blocks):
            self._recv = self._device_blocks(meta.recv_blocks)
            self._layers_left = len(self.kv_caches)
            self._pending = self._post_recv()
        if len(meta.send_blocks):
            self._send = self._device_blocks(meta.send_blocks)
        if self._recv is not None or self._send is not None:
            self.stats.steps += 1
            self.profiler.begin()

    def _device_blocks(self, block_ids: np.ndarray) -> torch.Tensor:
        ids = kv_layout.kernel_blocks(block_ids, self.per_block)
        return torch.from_numpy(ids).to(self.device, non_blocking=True)

    def _post_recv(self):
        buf = torch.empty((len(self._recv), *self.block_shape), dtype=self.dtype, device=self.device)
        return self.comm.post_recv(buf), buf

    def wait_for_layer_load(self, layer_name: str) -> None:
        if self._recv is None:
            return
        if self._pending is None:
            raise RuntimeError(f"KV-Runahead: layer {layer_name} asked for more layers than the model has")
        work, buf = self._pending
        self._layers_left -= 1
        # post the next layer's receive before waiting on this one (post, compute, wait)
        self._pending = self._post_recv() if self._layers_left > 0 else None
        waited = self.profiler.around_wait()
        self.comm.wait_recv(work)
        waited()
        kv_layout.scatter(self.kv_caches[layer_name], self._recv, buf)
        self.stats.blocks_received += len(self._recv)

    def save_kv_layer(self, layer_name: str, kv_layer: torch.Tensor, attn_metadata, **kwargs: Any) -> None:
        if self._send is None:
            return
        self.comm.post_send(kv_layout.gather(kv_layer, self._send))
        self._layers_sent += 1
        self.stats.blocks_sent += len(self._send)

    def wait_for_save(self) -> None:
        self.comm.wait_sends()
        if self._recv is not None and self._layers_left != 0:
            raise RuntimeError(
                f"KV-Runahead: {self._layers_left} layer(s) of prefix KV were never consumed; "
                "the model has attention layers the chain cannot see")
        if self._send is not None and self._layers_sent != len(self.kv_caches):
            raise RuntimeError(
                f"KV-Runahead: sent {self._layers_sent} of {len(self.kv_caches)} layers")
        if self._recv is not None or self._send is not None:
            self.profiler.end()
        self._recv = self._send = self._pending = None

    # -- scheduler side: unused (KV-Runahead plans on the workers) ----------
    def get_num_new_matched_tokens(self, request, num_computed_tokens):
        return 0, False

    def update_state_after_alloc(self, request, blocks, num_external_tokens):
        return None

    def build_connector_meta(self, scheduler_output):
        return EMPTY_META

    def request_finished_all_groups(self, request, block_ids):
        return False, None
