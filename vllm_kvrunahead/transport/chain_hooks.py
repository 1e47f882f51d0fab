"""The chain's per-layer moves (torch only): receive [c, segment start) before a layer's attention, send
[c, segment end) on after it, in ``ring_order.step_order``'s order, through ``ChainComm``.

One ``ChainHooks`` runs over one set of KV caches: a chain-of-copies worker's paged caches
(``copies.connector.KVRunaheadConnector``) or a TP-layout guest's scratch (``tp_layout.connector.GuestConnector``).
vLLM's attention op calls the connector's ``wait_for_layer_load`` before and ``save_kv_layer`` after each
attention layer; the connector hands them to ``enter`` and ``exit``. With ``send_on_entry`` the send goes
out at the layer's attention entry instead: vLLM writes the layer's K and V into the cache in an op of its
own just before, so they are final there, and a successor waits for this layer's QKV projection, not for
its attention and MLP.
"""
from __future__ import annotations

import numpy as np
import torch

from ..core.ring_order import MESSAGES, POST_RECV, PREFIX, SEND, UPFRONT, WAIT_RECV, Op, Role, StepOrder, step_order
from ..core.stats import RunaheadStats
from ..log import logger
from . import kv_layout
from .comm import ChainComm
from .profiling import StepProfiler


class ChainHooks:
    """The chain's per-layer moves over one set of KV caches: a worker's paged caches (the chain of copies)
    or a TP-layout guest's scratch. ``start`` takes the step's messages (``Traffic``'s fields: recv, send,
    send_prefix, upfront_send, upfront_recv; missing ones are empty), then every layer's ``enter`` and
    ``exit``, then ``finish``."""

    def __init__(self, comm: ChainComm, stats: RunaheadStats, num_blocks: int,
                 profile: bool = False, send_on_entry: bool = False):
        self.comm, self.stats, self.num_blocks = comm, stats, num_blocks
        self._profile = profile
        self.send_on_entry = send_on_entry
        self.kv_caches: dict[str, torch.Tensor] = {}
        self.order: list[str] = []  # layer names in forward order
        self.reset()

    def reset(self) -> None:
        self._step: StepOrder | None = None  # this step's operations (None: it moves no KV)
        self._blocks: dict[str, torch.Tensor] = {}  # kernel block ids, by message
        self.layer = 0            # attention layers entered this step
        self._layers_sent = 0

    # -- set-up ---------------------------------------------------------
    def register(self, kv_caches: dict[str, torch.Tensor], order: list[str],
                 writes_in_forward: list[str] = ()) -> None:
        """The caches by layer name; ``order``: the layer names in forward order; ``writes_in_forward``: the
        layers whose attention backend writes the KV inside its forward (early sends are off for them)."""
        shapes = set()
        for name, cache in kv_caches.items():
            kv_layout.check_layer_cache(name, cache)
            shapes.add((tuple(cache.shape), cache.dtype))
        if len(shapes) != 1:
            raise ValueError(
                f"KV-Runahead needs the same KV cache shape in every layer, got {sorted(map(str, shapes))}")
        self.kv_caches = dict(kv_caches)
        self.order = list(order)
        if self.send_on_entry and writes_in_forward:
            logger.warning("KV-Runahead: early_send is off: the attention backend of %d layer(s) (%s, ...) writes "
                           "the KV cache inside its forward, so the KV is final only after attention",
                           len(writes_in_forward), writes_in_forward[0])
            self.send_on_entry = False
        any_cache = next(iter(kv_caches.values()))
        self.block_shape = tuple(any_cache.shape[1:])
        self.dtype, self.device = any_cache.dtype, any_cache.device
        self.profiler = StepProfiler(self.device, self._profile)
        # kernel blocks per scheduler block (some backends split blocks)
        if any_cache.shape[0] % self.num_blocks:
            raise ValueError(f"KV-Runahead: {any_cache.shape[0]} kernel blocks do not split "
                             f"{self.num_blocks} KV blocks evenly")
        self.per_block = any_cache.shape[0] // self.num_blocks
        # one scheduler block of every layer, as it crosses a link (what the stats count per block moved)
        self.block_bytes = len(self.order) * self.per_block * any_cache[0].numel() * any_cache.element_size()

    def device_blocks(self, block_ids: np.ndarray) -> torch.Tensor:
        """Scheduler block ids as the kernel block ids of these caches, on their device."""
        ids = kv_layout.kernel_blocks(block_ids, self.per_block)
        return torch.from_numpy(ids).to(self.device, non_blocking=True)

    # -- per step ---------------------------------------------------------
    def start(self, traffic) -> None:
        self.reset()
        self._blocks = {name: self.device_blocks(ids) for name in MESSAGES
                        if len(ids := getattr(traffic, name, ()))}
        if not self._blocks:
            return
        self._step = step_order(Role(len(self.order), send_on_entry=self.send_on_entry,
                                     **{name: name in self._blocks for name in MESSAGES}))
        self.stats.steps += 1
        self.profiler.begin()
        for op in self._step.start:
            self._issue(op)

    def enter(self, layer_name: str) -> None:
        """Before layer ``layer_name``'s attention."""
        layer = self.layer
        self.layer += 1
        if self._step is None:
            return
        if layer >= len(self.order):
            raise RuntimeError(f"KV-Runahead: layer {layer_name} asked for more layers than the model has")
        if "send_prefix" in self._blocks and self.order[layer] != layer_name:
            raise RuntimeError(
                f"KV-Runahead: attention layer {layer_name} ran as layer {layer}; the prefix is sent in "
                f"the order {self.order[:4]}...: the model's layers do not run in index order")
        for op in self._step.entry[layer]:
            self._issue(op, self.kv_caches[layer_name])

    def exit(self, kv_layer: torch.Tensor) -> None:
        """After the attention of the layer entered last, whose KV cache is ``kv_layer``."""
        if self._step is not None and 0 < self.layer <= len(self.order):
            for op in self._step.exit[self.layer - 1]:
                self._issue(op, kv_layer)

    def _issue(self, op: Op, kv: torch.Tensor | None = None) -> None:
        """One operation of ``ring_order.step_order``; kv: the cache of the layer being run."""
        if op.msg == UPFRONT:
            self._upfront(op)
        elif op.kind == POST_RECV:
            self.comm.post_recv((len(self._blocks["recv"]), *self.block_shape), self.dtype, self.device)
        elif op.kind == WAIT_RECV:
            waited = self.profiler.around_wait()
            buf = self.comm.wait_recv()
            waited()
            kv_layout.scatter(kv, self._blocks["recv"], buf)
            self.stats.blocks_received += len(self._blocks["recv"])
        elif op.msg == PREFIX:
            self._send_layer(self.kv_caches[self.order[op.layer]], self._blocks["send_prefix"])
        else:
            self._send_layer(kv, self._blocks["send"])
            self.stats.layers_sent_on_entry += self.send_on_entry

    def _upfront(self, op: Op) -> None:
        """The blocks holding an unaligned chunk start, all layers in one message."""
        if op.kind == SEND:
            blocks = self._blocks["upfront_send"]
            self.comm.post_send(torch.stack([kv_layout.gather(self.kv_caches[n], blocks) for n in self.order]))
            self.stats.blocks_sent += len(blocks) * len(self.order)
            return
        blocks = self._blocks["upfront_recv"]
        if op.kind == POST_RECV:
            self.comm.post_recv((len(self.order), len(blocks), *self.block_shape), self.dtype, self.device)
            return
        for name, data in zip(self.order, self.comm.wait_recv()):
            kv_layout.scatter(self.kv_caches[name], blocks, data)
        self.stats.blocks_received += len(blocks) * len(self.order)

    def _send_layer(self, kv_layer: torch.Tensor, blocks: torch.Tensor) -> None:
        # the comm's copy: its next send slot where it has an arena (TP layout), else a new tensor
        self.comm.post_send(self.comm.send_copy(kv_layer, blocks))
        self._layers_sent += 1
        self.stats.layers_sent += 1
        self.stats.blocks_sent += len(blocks)

    def finish(self, failed: bool) -> None:
        """The step's end: its sends waited for and every message checked, or (``failed``: the forward
        raised) its traffic dropped without waiting, since a peer may be gone."""
        if failed:
            if self._step is not None:
                logger.error("KV-Runahead: step aborted at attention layer %d of %d; its chain traffic is dropped",
                             self.layer, len(self.order))
            self.abort()
            return
        problem = None
        if "recv" in self._blocks and self.layer != len(self.order):
            problem = (f"KV-Runahead: {len(self.order) - self.layer} layer(s) of prefix KV were never consumed; "
                       "the model has attention layers the chain cannot see")
        elif self._blocks.keys() & {"send", "send_prefix"} and self._layers_sent != len(self.order):
            problem = f"KV-Runahead: sent {self._layers_sent} of {len(self.order)} layers"
        if problem:
            self.abort()
            raise RuntimeError(problem)
        self.comm.end_step()
        if self._step is not None:
            self.profiler.end()
        self.reset()

    def abort(self) -> None:
        self.comm.abort_step()
        self.reset()
