"""The chain of copies (``--prefill-context-parallel-size N``): one worker's place in the KV chain and
everything it keeps between steps, the one owner of its runahead state (a ``runahead.Runahead``).

``chain_for`` builds a ``Chain`` for each of N >= 2 workers (``modes.runahead_for`` picks it). Per step:

    step = chain.rewrite(scheduler_output)   # book, plan, holdings; this worker's share and its ring traffic
    ... the runner runs step.scheduler_output (None: nothing on this worker) ...
    chain.learn(step)                        # online refinement

Every worker plans each step from the same scheduler output, so all keep the same book, holdings
and split without exchanging anything but KV.
"""
from __future__ import annotations

from dataclasses import asdict

from ..config import COPIES, KVRunaheadConfig
from ..core.holdings import ChainHoldings
from ..core.partition import CostModel, fractions_of
from ..core.partitioner import SplitSetting
from ..core.plan import DECODE, StepPlan, make_plan
from ..core.stats import RunaheadStats, worker_stats
from ..core.topology import ChainTopology, stage_device
from ..log import logger
from ..runahead import SplitTuning, Step
from ..transport.comm import ChainComm
from ..vllm_side import seam
from .connector import KVRunaheadConnector, RunaheadMeta


def chain_for(kvr: KVRunaheadConfig, vllm_config, rank: int, kv_cache_config) -> "Chain":
    """This worker's chain, its links and KV connector made and installed (collective: every rank at once)."""
    pc = vllm_config.parallel_config
    topo = ChainTopology(kvr.num_workers, seam.head_rank(pc), rank, seam.tp_size(pc))
    comm = ChainComm.for_ring(topo, seam.world_device_group(), seam.world_cpu_group(), kvr.recv_timeout_s)
    seam.set_worker_transfer_config(vllm_config)
    connector = KVRunaheadConnector(vllm_config, kv_cache_config, comm, RunaheadStats(kvr.num_workers),
                                    profile=kvr.profile or kvr.refine, send_on_entry=kvr.early_send)
    seam.install_connector(connector)
    return Chain(kvr, topo, seam.model_shape(vllm_config.model_config), seam.block_size(kv_cache_config),
                 seam.num_kv_blocks(kv_cache_config), comm, connector)


class Chain(SplitTuning):
    """Topology, request book, holdings, split (partitioner and refiner), links, KV connector and
    stats of one worker of an N-worker chain (N runahead stages of T TP ranks each)."""

    def __init__(self, kvr: KVRunaheadConfig, topo: ChainTopology, shape, block_size: int, num_blocks: int,
                 comm: ChainComm, connector: KVRunaheadConnector) -> None:
        self.kvr, self.topo, self.shape, self.block_size = kvr, topo, shape, block_size
        self.cost = CostModel.for_shape(shape, topo.tp_size)
        self.book = seam.RequestBook()
        self.holdings = ChainHoldings(kvr.num_workers - 1, num_blocks, block_size)
        self.comm, self.connector = comm, connector
        self.counters: RunaheadStats = connector.stats  # one record: the connector counts what it moves
        self.split: SplitSetting | None = None  # start(): tables are keyed by the device
        self.block_bytes = 0  # start(): one KV block of every layer, as it crosses a link
        self._runner_reqs: set[str] = set()  # requests a chain worker's runner holds from its last step
        self._head_starts: dict[str, int] = {}  # the head's segment starts this step

    @property
    def returns_output(self) -> bool:
        """The head (vLLM's output rank) returns the output and samples; chain workers' runners run
        partial prefills whose tokens are thrown away."""
        return self.topo.is_head

    def start(self, runner) -> None:
        """Once the runner has allocated the KV caches (the connector then knows the device)."""
        self.device = self.connector.device
        self.block_bytes = self.connector.block_bytes
        if self.topo.is_head:
            seam.follow_rewritten_starts(runner, lambda: self._head_starts)
        device_key = stage_device(seam.device_name(self.device), self.topo.tp_size)
        self.split = SplitSetting(self.kvr, self.cost, self.shape, self.block_size, device_key)
        logger.info("KV-Runahead: rank %d is chain position %d of %d%s%s (partition %s, %s%s)",
                    self.topo.rank, self.topo.pos, self.kvr.num_workers, " (head)" if self.topo.is_head else "",
                    f", TP rank {self.topo.tp_rank} of {self.topo.tp_size}" if self.topo.tp_size > 1 else "",
                    self.split.partitioner.describe(),
                    "chunks run ahead where the cost model predicts a gain" if self.kvr.min_tokens is None
                    else f"chunks of >= {self.kvr.min_tokens} tokens run ahead",
                    ", online refinement on" if self.kvr.refine else "")
        self.comm.warm_up(self.device, first=self.topo.pos == 0)

    # -- per step -------------------------------------------------------------
    def plan(self, scheduler_output) -> StepPlan:
        """This step's plan; the holdings then record what it leaves on each chain position."""
        self.book.update(scheduler_output)
        views = seam.request_views(scheduler_output, self.book)
        plan = make_plan(views, self.kvr.num_workers, splitter=self.split.partitioner, block_size=self.block_size,
                         holdings=self.holdings)
        self.holdings.record(plan, views)
        self.counters.count_step(plan, plan.kv_bytes(self.block_bytes))
        self.counters.count_decodes(sum(v.num_scheduled for v in views if v.not_ahead == DECODE))
        return plan

    def rewrite(self, scheduler_output) -> Step:
        """This worker's share of the step: the head computes the last segment of every runahead chunk
        and everything else; a chain position computes its segments only (nothing when none runs ahead)."""
        plan = self.plan(scheduler_output)
        meta = RunaheadMeta.of(plan.traffic_for(self.topo.pos))
        if self.topo.is_head:
            self._head_starts = {r.req_id: r.segments[-1].start for r in plan.requests}
            mine = seam.for_head(scheduler_output, plan, meta)
        elif plan:
            mine = seam.for_chain_worker(scheduler_output, plan, self.topo.pos, self._runner_reqs, meta,
                                              self.book)
            self._runner_reqs = set(mine.num_scheduled_tokens)
        else:
            mine = None
        if mine is not None:
            self.counters.count_run(mine.total_num_scheduled_tokens)
        return Step(plan, mine, scheduler_output)

    def run_ahead(self, step: Step) -> None:
        """Nothing before the runner's step: the connector runs the chain inside its forward."""

    def learn(self, step: Step) -> None:
        """With ``profile`` (or ``refine``), after every runahead step: every position's step time and
        receive stalls, gathered on every worker (a few bytes over the CPU group), for the stats; and
        online refinement, from steps that prefilled one prompt and nothing else (the head's busy time
        then is that prompt's alone). Every worker decides this from the same scheduler output and gets
        the same times, so all keep the same split."""
        if not (step.plan and (self.kvr.profile or self.kvr.refine)):
            return
        p = self.connector.profiler.total
        pos, n, t = self.topo.pos, self.kvr.num_workers, self.topo.tp_size
        step_s, stall_s = self.comm.gather_times((p.last_step_s, p.last_stall_s), pos, n, t)
        self.counters.observe_times(step_s, stall_s)
        p = self.split.partitioner
        r = p.refiner
        if r is None or len(step.plan.requests) != 1:
            return
        req = step.plan.requests[0]
        n_tok = req.segments[-1].end
        if req.start != 0 or step.original.total_num_scheduled_tokens != n_tok:
            return
        busy = [a - b for a, b in zip(step_s, stall_s)]
        if r.observe(n_tok, fractions_of(req.segments), busy, p.base_fractions(n_tok)) and self.topo.is_head:
            logger.info("KV-Runahead refine: %d-token prompt, busy ms per worker %s -> fractions %s",
                        n_tok, [round(b * 1e3, 2) for b in busy], [round(f, 4) for f in p.fractions(n_tok)])

    # -- reports and tools ----------------------------------------------------
    def stats(self) -> dict:
        """What this worker computed and moved (``kvr_stats``)."""
        p = self.split.partitioner
        profiled = self.kvr.profile or self.kvr.refine
        return worker_stats(
            self.counters, mode=COPIES, position=self.topo.pos, returns_output=self.returns_output,
            tp_rank=self.topo.tp_rank, tp_size=self.topo.tp_size, tp_group=seam.tp_group_ranks(),
            live_requests=len(self.book), bytes_sent=self.comm.bytes_sent, bytes_received=self.comm.bytes_received,
            partition=p.describe(), profile=asdict(self.connector.profiler.total) if profiled else None,
            refine=p.refiner.state() if p.refiner else None)

    def close(self) -> None:
        seam.uninstall_connector()
