"""One rank's share of KV-Runahead in TP layout (``tp_layout.py``): the owner of its runahead state.

vLLM runs plain ``--tensor-parallel-size N``: its scheduler, KV sizing, TP model, sampler and output
rank are untouched. Per step, on every rank alike:

    step = chain.rewrite(scheduler_output)   # plan; vLLM's step with each runahead chunk cut to its last token
    chain.run_ahead(step)                    # the guest's segment, its head shards into the paged cache
    ... vLLM's TP runner runs step.scheduler_output on all ranks, which sample as in plain TP ...

Any prefill chunk of prompt tokens may run ahead: cold, or after cached tokens (a later chunk of a long
prompt, a prefix-cache hit, a conversation's next turn), whose prefix every rank gathers from the
ranks holding its heads. What the chain cannot carry (decodes, output tokens a resumed request
recomputes, prompt logprobs, ...) is the TP model's.
"""
from __future__ import annotations

import torch.distributed as dist

from . import vllm_seam
from .chain import SplitTools, Step
from .comm import ChainComm, ShardComm
from .config import KVRunaheadConfig
from .guest import Guest
from .connector import EMPTY_META
from .guest_connector import GuestConnector, GuestMeta
from .log import logger
from .partition import CostModel
from .plan import DECODE, make_plan
from .stats import ChainStats
from .tp_layout import TPStep, kv_heads_of, tp_step, tp_view


class TPChain(SplitTools):
    """Request book, split, links (chain and head shards), the guest and its hooks of one TP rank."""

    is_head = True  # every rank runs vLLM's TP step and samples, as in plain TP

    def __init__(self, kvr: KVRunaheadConfig, vllm_config, rank: int, kv_cache_config, guest: Guest) -> None:
        n = self.n = kvr.num_workers
        self.kvr, self.rank, self.guest = kvr, rank, guest
        self.shape = vllm_seam.model_shape(vllm_config.model_config)
        self.cost = CostModel.for_shape(self.shape)
        self.block_size = vllm_seam.block_size(kv_cache_config)
        group = vllm_seam.world_device_group()
        self.comm = ChainComm(rank - 1 if rank > 0 else None, rank + 1 if rank < n - 1 else None, group,
                              kvr.recv_timeout_s, vllm_seam.world_cpu_group())
        backend = dist.get_backend(group)
        self.shards = ShardComm(rank, n, backend, kvr.recv_timeout_s)
        self.gather = ShardComm(rank, n, backend, kvr.recv_timeout_s, directional=True)
        self.counters = ChainStats(n)
        self.total_heads = total_heads = vllm_config.model_config.get_total_num_kv_heads()
        vllm_seam.set_worker_transfer_config(guest.config)  # the connector base class reads it
        self.connector = GuestConnector(guest.config, guest.kv_cache_config, self.comm, self.shards, self.gather,
                                        self.counters, rank, [kv_heads_of(k, n, total_heads) for k in range(n)])
        self.connector.register_scratch(guest.scratch_by_layer())
        vllm_seam.install_connector(self.connector)  # vLLM's runner registers its caches with it next
        self.book = vllm_seam.RequestBook()
        self._tails: dict[str, int] = {}      # vLLM's runner starts each runahead chunk here this step
        self._guest_reqs: set[str] = set()    # requests the guest's runner holds from its last step
        self.decode_tokens = 0                # decode steps vLLM's TP model ran (the same on every rank)

    def start(self, runner) -> None:
        """Once vLLM's runner has registered its KV caches with the connector: the split, and every link warmed."""
        self.device = self.connector.device
        vllm_seam.follow_rewritten_starts(runner, lambda: self._tails)
        self.partitioner = self._partitioner()
        self.comm.warm_up_open(self.device)
        self.shards.warm_up(self.device)
        self.gather.warm_up(self.device)
        logger.info("KV-Runahead: TP rank %d of %d decodes; prompts run ahead on every rank's full model "
                    "(partition %s, %s)", self.rank, self.n, self.partitioner.describe(),
                    "where the cost model predicts a gain" if self.kvr.min_tokens is None
                    else f"chunks of >= {self.kvr.min_tokens} tokens")

    # -- per step -------------------------------------------------------------
    def plan(self, scheduler_output) -> TPStep:
        self.book.update(scheduler_output)
        views = [tp_view(v) for v in vllm_seam.request_views(scheduler_output, self.book)]
        self.decode_tokens += sum(v.num_scheduled for v in views if v.on_head == DECODE)
        plan = make_plan(views, self.n, splitter=self.partitioner, block_size=self.block_size)
        step = tp_step(plan, self.guest.kv_cache_config.num_blocks)
        self.counters.count_tp_step(step)
        return step

    def rewrite(self, scheduler_output) -> Step:
        """vLLM's step, each runahead chunk cut to its last token (its KV before that comes from the guests)."""
        step = self.plan(scheduler_output)
        tails = step.tails()
        self._tails = {rid: seg.start for rid, seg in tails.items()}
        mine = vllm_seam.starting_at(scheduler_output, tails, EMPTY_META)  # the connector: stats only
        self.counters.count_run(mine.total_num_scheduled_tokens)
        return Step(step, mine, scheduler_output)

    def run_ahead(self, step: Step) -> None:
        """This rank's guest segment of every runahead chunk, and the head shards: before vLLM's forward."""
        plan: TPStep = step.plan
        if not plan:
            return
        segs = plan.guest_segments(self.rank)
        so = vllm_seam.segments_only(step.original, segs, self._guest_reqs,
                                     GuestMeta.of(plan.traffic_for(self.rank, self.total_heads)), self.book)
        self._guest_reqs = set(segs)
        self.guest.run(so)

    def learn(self, step: Step) -> None:
        pass

    # -- reports and tools ----------------------------------------------------
    def stats(self) -> dict:
        c = self.counters
        return {
            "decode": "tp", "chain_pos": self.rank, "is_head": True, "n_workers": self.n,
            "tp_rank": self.rank, "tp_size": self.n, "tp_group": vllm_seam.tp_group_ranks(),
            "chunks_ahead": c.chunks_ahead, "chunks_ahead_cached": c.chunks_ahead_cached,
            "tokens_ahead": c.tokens_ahead, "prefix_tokens_gathered": c.prefix_tokens_sent,
            "chunks_on_tp": dict(c.chunks_on_head),
            # this rank's guest ran its segments; vLLM's TP model ran the rest of every step
            "segment_tokens": list(c.segment_tokens), "guest_tokens": c.segment_tokens[self.rank],
            "tp_tokens": c.tokens_run, "decode_tokens": self.decode_tokens,
            "steps_run": c.steps_run, "chain_steps": c.steps, "layers_sent": c.layers_sent,
            "blocks_sent": c.blocks_sent, "blocks_received": c.blocks_received,
            "bytes_sent": self.comm.bytes_sent + self.shards.bytes_sent + self.gather.bytes_sent,
            "bytes_received": self.comm.bytes_received + self.shards.bytes_received + self.gather.bytes_received,
            "live_requests": len(self.book), "partition": self.partitioner.describe(),
            "scratch_blocks": self.guest.kv_cache_config.num_blocks,
        }

    def device_key(self) -> str:
        return vllm_seam.device_name(self.device)

    def close(self) -> None:
        vllm_seam.uninstall_connector()
