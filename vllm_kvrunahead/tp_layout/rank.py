"""The TP layout (``--tensor-parallel-size N``): one rank's share, the owner of its runahead state (a
``runahead.Runahead``; the per-step rule is ``core/tp_step.py``).

vLLM runs plain ``--tensor-parallel-size N``: its scheduler, KV sizing, TP model, sampler and output
rank are untouched. Per step, on every rank alike:

    step = rank.rewrite(scheduler_output)   # plan; vLLM's step with each runahead chunk cut to its last token
    rank.run_ahead(step)                    # the guest's segment, its KV head shards into the paged cache
    ... vLLM's TP runner runs step.scheduler_output on all ranks, which sample as in plain TP ...

Any prefill chunk of prompt tokens may run ahead: cold, or after cached tokens (a later chunk of a long
prompt, a prefix-cache hit, a conversation's next turn), whose prefix every rank gathers from the
ranks holding its KV heads. What the guests cannot carry (decodes, output tokens a resumed request
recomputes, prompt logprobs, ...) is the TP model's. ``tp_layout_for`` builds a rank's parts and hands
them to ``TPLayoutRank``, so tests can build one from fakes.
"""
from __future__ import annotations

import dataclasses

from ..config import TP_LAYOUT, KVRunaheadConfig
from ..core.partition import CostModel, ModelShape
from ..core.partitioner import SplitSetting
from ..core.plan import DECODE, make_plan
from ..core.stats import RunaheadStats, worker_stats
from ..core.topology import tp_layout_device
from ..core.tp_cost import NCCL_SWITCHES, TPLayoutCost, TPLayoutSplitter, resolve_link
from ..core.tp_order import step_lag
from ..core.tp_step import TPStep, kv_heads_of, tp_step, tp_view
from ..log import logger
from ..runahead import SplitTuning, Step
from ..transport.comm import CommArena
from ..transport.tp_hooks import tp_links
from ..vllm_side import seam
from ..vllm_side.guest import Guest
from .connector import TP_FORWARD, GuestConnector, GuestMeta


def tp_layout_for(kvr: KVRunaheadConfig, vllm_config, rank: int, kv_cache_config, guest: Guest,
                  arena: CommArena) -> "TPLayoutRank":
    """This rank's share of the TP layout, its links made and its guest's connector installed (collective:
    every rank calls it at once, before vLLM's runner registers its KV caches with the connector).
    ``arena``: its comm buffers (``GuestHost``: allocated before vLLM sized its KV cache, left out of it)."""
    n = kvr.num_workers
    comm, shards, gather = tp_links(rank, n, seam.world_device_group(), seam.world_cpu_group(),
                                    kvr.recv_timeout_s, arena)
    stats = RunaheadStats(n)
    total_heads = vllm_config.model_config.get_total_num_kv_heads()
    seam.set_worker_transfer_config(guest.config)  # the connector base class reads it
    connector = GuestConnector(guest.config, guest.kv_cache_config, comm, shards, gather, stats, rank,
                               [kv_heads_of(k, n, total_heads) for k in range(n)], arena)
    connector.register_scratch(guest.scratch_by_layer())
    seam.install_connector(connector)  # vLLM's runner registers its caches with it next
    # auto: from what every rank reports, all-gathered, so every rank plans with the same profile
    link, why = resolve_link(kvr.link, *seam.link_facts(NCCL_SWITCHES)) if kvr.link == "auto" \
        else resolve_link(kvr.link, [], None)
    return TPLayoutRank(kvr, rank, seam.model_shape(vllm_config.model_config), total_heads,
                        seam.block_size(kv_cache_config), guest, connector, link=link, link_why=why,
                        max_step_tokens=vllm_config.scheduler_config.max_num_batched_tokens)


class TPLayoutRank(SplitTuning):
    """Request book, split, links (chain and head shards), the guest and its hooks of one TP rank."""

    returns_output = True  # every rank runs vLLM's TP step and samples, as in plain TP

    def __init__(self, kvr: KVRunaheadConfig, rank: int, shape: ModelShape | None, total_heads: int,
                 block_size: int, guest: Guest, connector: GuestConnector, *, link: str | None = None,
                 link_why: str = "", max_step_tokens: int | None = None) -> None:
        """``link``, ``link_why``: the link profile ``tp_layout_for`` resolved (None: ``kv_runahead.link``
        resolved with no facts); ``max_step_tokens``: the most a step takes (the start-up line's range)."""
        self.n = kvr.num_workers
        self.kvr, self.rank, self.shape, self.total_heads, self.block_size = kvr, rank, shape, total_heads, block_size
        self.guest, self.connector = guest, connector
        self.comm, self.shards, self.gather = connector.comm, connector.shards, connector.gather
        self.counters: RunaheadStats = connector.stats  # one record: the connector counts what it moves
        self.cost = CostModel.for_shape(shape)
        # without facts (a rank made outside tp_layout_for): the option itself, or auto's guess from nothing
        self.link, self.link_why = (link, link_why) if link else resolve_link(kvr.link, [], None)
        # which chunks run ahead: each against vLLM's TP=N prefill of it on these links (docs/tp-layout-cost.md)
        self.tp_cost = TPLayoutCost.build(shape, self.n, self.link, block_size=block_size, guest=kvr.guest)
        self.max_step_tokens = max_step_tokens or 1 << 17
        self.book = seam.RequestBook()
        self.split: SplitSetting | None = None  # start(): tables are keyed by the device
        self._tails: dict[str, int] = {}      # vLLM's runner starts each runahead chunk here this step
        self._guest_reqs: set[str] = set()    # requests the guest's runner holds from its last step

    def start(self, runner) -> None:
        """Once vLLM's runner has registered its KV caches with the connector: the split, and every link warmed."""
        self.device = self.connector.device
        seam.follow_rewritten_starts(runner, lambda: self._tails)
        # tables of this mode only: "<GPU> tp-layout" (a chain-of-copies table on the same GPUs cuts another split)
        self.split = SplitSetting(self.kvr, self.cost, self.shape, self.block_size,
                                  tp_layout_device(seam.device_name(self.device)))
        self.comm.warm_up_open(self.device)
        self.shards.warm_up(self.device)
        self.gather.warm_up(self.device)
        logger.info("KV-Runahead: TP rank %d of %d decodes; prompts run ahead on every rank's full model "
                    "(partition %s, %s)", self.rank, self.n, self.split.partitioner.describe(),
                    f"where the cost model predicts them faster than TP={self.n} on {self.link}"
                    if self.kvr.min_tokens is None else f"chunks of >= {self.kvr.min_tokens} tokens")
        if self.rank == 0:  # every rank decides alike; one says so
            logger.info("KV-Runahead: link profile %s for the TP layout (%s)", self.link, self.link_why)
            logger.info("KV-Runahead: %s", self.tp_cost.startup_line(self.max_step_tokens,
                                                                      min_tokens=self.kvr.min_tokens))

    # -- per step -------------------------------------------------------------
    def plan(self, scheduler_output) -> TPStep:
        self.book.update(scheduler_output)
        views = [tp_view(v) for v in seam.request_views(scheduler_output, self.book)]
        splitter = TPLayoutSplitter(self.split.partitioner, self.tp_cost, self.kvr.min_tokens)
        plan = make_plan(views, self.n, splitter=splitter, block_size=self.block_size)
        step = tp_step(plan, self.guest.kv_cache_config.num_blocks, self.total_heads)
        # every rank derives the same lags from the same plan: its rounds of shards and gather follow them
        if step:
            step = dataclasses.replace(step, lag=step_lag(self.cost, [r.segments for r in step.requests]))
        self.counters.count_step(step, step.kv_bytes(self.connector.block_bytes))
        self.counters.count_decodes(sum(v.num_scheduled for v in views if v.not_ahead == DECODE))
        return step

    def rewrite(self, scheduler_output) -> Step:
        """vLLM's step, each runahead chunk cut to its last token (its KV before that comes from the guests)."""
        step = self.plan(scheduler_output)
        tails = step.tails()
        self._tails = {rid: seg.start for rid, seg in tails.items()}
        mine = seam.starting_at(scheduler_output, tails, TP_FORWARD)  # the connector: stats only
        self.counters.count_run(mine.total_num_scheduled_tokens)
        return Step(step, mine, scheduler_output)

    def run_ahead(self, step: Step) -> None:
        """This rank's guest segment of every runahead chunk, and the head shards: before vLLM's forward."""
        plan: TPStep = step.plan
        if not plan:
            return
        segs = plan.guest_segments(self.rank)
        so = seam.segments_only(step.original, segs, self._guest_reqs,
                                     GuestMeta.of(plan.traffic_for(self.rank, self.total_heads)), self.book)
        self._guest_reqs = set(segs)
        self.guest.run(so)

    def learn(self, step: Step) -> None:
        pass

    # -- reports and tools ----------------------------------------------------
    def stats(self) -> dict:
        """What this rank computed and moved (``kvr_stats``): its guest's tokens are its ``segment_tokens``,
        its vLLM runner's (the TP model's) ``tokens_run``."""
        return worker_stats(
            self.counters, mode=TP_LAYOUT, position=self.rank, returns_output=True, tp_rank=self.rank,
            tp_size=self.n, tp_group=seam.tp_group_ranks(), live_requests=len(self.book),
            bytes_sent=self.comm.bytes_sent + self.shards.bytes_sent + self.gather.bytes_sent,
            bytes_received=self.comm.bytes_received + self.shards.bytes_received + self.gather.bytes_received,
            partition=self.split.partitioner.describe(), scratch_blocks=self.guest.kv_cache_config.num_blocks,
            link=self.link)

    def close(self) -> None:
        seam.uninstall_connector()
