"""KV-Runahead's vLLM worker: the platform's worker plus a per-step rewrite.

Every worker receives the same SchedulerOutput. This class keeps the book of
live requests, plans the step (pure ``plan.make_plan``), hands its model runner
a rewritten output (its own segment of each long prefill chunk), and binds the
chain traffic for the KV connector hooks. The head (vLLM's output rank) also
runs everything else in the step and samples; the other workers run nothing but
their segments.
"""
from __future__ import annotations

import contextlib
import dataclasses
import logging
import os

from . import vllm_seam
from .comm import ChainComm
from .config import ADDITIONAL_CONFIG_KEY, KVRunaheadConfig
from .connector import EMPTY_META, KVRunaheadConnector, RunaheadMeta
from .holdings import ChainHoldings
from .lut import PartitionTable
from .partition import CostModel
from .partitioner import Partitioner
from .plan import StepPlan, make_plan
from .refine import Refiner
from .topology import ChainTopology, stage_device

from .log import logger


def runahead_config(vllm_config) -> KVRunaheadConfig:
    d = (vllm_config.additional_config or {}).get(ADDITIONAL_CONFIG_KEY)
    if not isinstance(d, dict) or "num_workers" not in d:
        raise RuntimeError(
            "vllm_kvrunahead.Worker is used but the vllm-kvrunahead plugin did not run in the "
            "process that built the config; install the package (pip install -e .) and do not "
            "exclude 'kvrunahead' from VLLM_PLUGINS")
    return KVRunaheadConfig(**d).validate()


class Worker(vllm_seam.worker_base()):
    """Use with --worker-cls vllm_kvrunahead.Worker --prefill-context-parallel-size N
    [--tensor-parallel-size T: N stages of T TP ranks; each TP rank of a stage plans the same step
    from the same scheduler output and moves its own KV heads along its TP rank's chain]."""

    _kvrunahead_worker = True  # subclasses are recognized by the config hook too

    def __init__(self, vllm_config, local_rank, rank, distributed_init_method, is_driver_worker=False):
        self.kvr = runahead_config(vllm_config)
        super().__init__(vllm_config, local_rank, rank, distributed_init_method,
                         is_driver_worker=is_driver_worker)
        pc = vllm_config.parallel_config
        self.topo = ChainTopology(self.kvr.num_workers, vllm_seam.head_rank(pc), rank, vllm_seam.tp_size(pc))
        self.connector: KVRunaheadConnector | None = None
        self.book = vllm_seam.RequestBook()
        self.shape = vllm_seam.model_shape(vllm_config.model_config)
        self.cost = CostModel.for_shape(self.shape, self.topo.tp_size)
        self.partitioner: Partitioner | None = None  # built once the device is known
        self._runner_reqs: set[str] = set()  # requests a chain worker's runner holds
        self._head_starts: dict[str, int] = {}  # the head's segment starts this step
        self._ran = False
        self.steps_run = 0       # evidence for tests: forward passes this worker ran
        self.tokens_run = 0      # ... and tokens it computed
        self.last_segments: list = []  # segments of the last runahead step, per request
        self.chunks_ahead = 0          # prefill chunks that ran on the chain ...
        self.chunks_ahead_cached = 0   # ... of them, chunks after cached tokens (later chunk, cache hit, resumed)
        self.tokens_ahead = 0          # ... and their tokens
        self.prefix_tokens_held = 0    # cached-prefix tokens chain positions did not need to receive
        self.chunks_prefix_not_final = 0  # chunks kept on the head: their cached prefix was computed that step

    @property
    def chain_pos(self) -> int:
        return self.topo.pos

    @property
    def is_head(self) -> bool:
        return self.topo.is_head

    # -- set-up -------------------------------------------------------------
    def initialize_from_config(self, kv_cache_config) -> None:
        if self.kvr.num_workers > 1:
            self.block_size = vllm_seam.block_size(kv_cache_config)
            self.holdings = ChainHoldings(self.kvr.num_workers - 1, vllm_seam.num_kv_blocks(kv_cache_config),
                                          self.block_size)
            comm = ChainComm.for_ring(self.topo, vllm_seam.world_device_group(),
                                      vllm_seam.world_cpu_group(), self.kvr.recv_timeout_s)
            vllm_seam.set_worker_transfer_config(self.vllm_config)
            self.connector = KVRunaheadConnector(self.vllm_config, vllm_seam.KVConnectorRole.WORKER,
                                                 kv_cache_config, comm,
                                                 profile=self.kvr.profile or self.kvr.refine,
                                                 send_on_entry=self.kvr.early_send)
            vllm_seam.install_connector(self.connector)
        super().initialize_from_config(kv_cache_config)
        if self.connector is not None:
            if self.is_head:
                vllm_seam.follow_rewritten_starts(self.model_runner, lambda: self._head_starts)
            self.partitioner = self._build_partitioner()  # after the KV caches: the device is known
            logger.info("KV-Runahead: rank %d is chain position %d of %d%s%s (partition %s, %s%s)",
                        self.rank, self.chain_pos, self.kvr.num_workers, " (head)" if self.is_head else "",
                        f", TP rank {self.topo.tp_rank} of {self.topo.tp_size}" if self.topo.tp_size > 1 else "",
                        self.partitioner.describe(),
                        "chunks run ahead where the cost model predicts a gain" if self.kvr.min_tokens is None
                        else f"chunks of >= {self.kvr.min_tokens} tokens run ahead",
                        ", online refinement on" if self.kvr.refine else "")
            self.connector.comm.warm_up(self.connector.device, first=self.chain_pos == 0)

    # -- per step -------------------------------------------------------------
    def plan(self, scheduler_output) -> StepPlan:
        """This step's plan (the book must already hold the step's requests); the holdings then
        record what the step leaves on each chain position."""
        views = vllm_seam.request_views(scheduler_output, self.book)
        plan = make_plan(views, self.kvr.num_workers, splitter=self.partitioner, block_size=self.block_size,
                         holdings=self.holdings)
        self.holdings.record(plan, views)
        return plan

    def _meta(self, plan: StepPlan) -> RunaheadMeta:
        if not plan:
            return EMPTY_META
        pos, up = self.chain_pos, plan.upfront_blocks()
        recv, send = plan.recv_blocks(pos), plan.send_blocks(pos)
        if self.is_head:
            return RunaheadMeta(recv=recv, send_ahead=send, upfront_send=up)
        if pos == 0:
            return RunaheadMeta(recv=recv, send=send, upfront_recv=up)
        return RunaheadMeta(recv=recv, send=send)

    def execute_model(self, scheduler_output):
        if self.connector is None:  # one worker: plain vLLM
            return super().execute_model(scheduler_output)
        self.book.update(scheduler_output)
        plan = self.plan(scheduler_output)
        meta = self._meta(plan)
        self.chunks_prefix_not_final += len(plan.prefix_not_final)
        if plan:
            self.last_segments = [[(g.start, g.end) for g in r.segments] for r in plan.requests]
            self.chunks_ahead += len(plan.requests)
            self.chunks_ahead_cached += sum(r.start > 0 for r in plan.requests)
            self.tokens_ahead += sum(r.segments[-1].end - r.start for r in plan.requests)
            self.prefix_tokens_held += sum(sum(r.held) for r in plan.requests)
        if self.is_head:
            self._head_starts = {r.req_id: r.segments[-1].start for r in plan.requests}
            so = vllm_seam.for_head(scheduler_output, plan, meta)
            if so.total_num_scheduled_tokens:
                self.steps_run += 1
                self.tokens_run += so.total_num_scheduled_tokens
            out = super().execute_model(so)
            self._refine(plan, scheduler_output)
            return out
        self._ran = False
        if not plan:
            return None
        so = vllm_seam.for_chain_worker(scheduler_output, plan, self.chain_pos, self._runner_reqs, meta, self.book)
        self._runner_reqs = set(so.num_scheduled_tokens)
        self.steps_run += 1
        self.tokens_run += so.total_num_scheduled_tokens
        with self._fail_fast():
            out = super().execute_model(so)
            self._ran = out is None  # the runner waits for sample_tokens to finish the step
            self._refine(plan, scheduler_output)
        return None

    @contextlib.contextmanager
    def _fail_fast(self):
        """A chain worker that fails mid-prefill (e.g. out of memory) exits at once.

        vLLM's executor reads only the head's reply, and the head would wait for this
        worker's KV until the step's RPC timeout (minutes on NCCL, which has no receive
        timeout). A dead worker process is noticed by the executor within a second, so
        the engine fails its requests and stops instead of hanging.
        """
        try:
            yield
        except BaseException:
            logger.exception("KV-Runahead: chain worker rank %d failed mid-prefill; exiting so the "
                             "engine stops now instead of the head waiting for its KV", self.rank)
            logging.shutdown()
            os._exit(1)

    def _refine(self, plan: StepPlan, scheduler_output) -> None:
        """Online refinement: learn from steps that prefilled one prompt and nothing else (the
        head's busy time then is that prompt's alone). Every worker decides this from the same
        scheduler output and gets the same busy times, so all keep the same split."""
        r = self.partitioner.refiner if self.partitioner else None
        if r is None or len(plan.requests) != 1:
            return
        req = plan.requests[0]
        n = req.segments[-1].end
        if req.start != 0 or scheduler_output.total_num_scheduled_tokens != n:
            return
        p = self.connector.profiler.total
        busy = self.connector.comm.gather_times(p.last_step_s - p.last_stall_s, self.chain_pos,
                                                self.kvr.num_workers, self.topo.tp_size)
        used = tuple(s.length / n for s in req.segments)
        if r.observe(n, used, busy, self.partitioner.base_fractions(n)) and self.is_head:
            logger.info("KV-Runahead refine: %d-token prompt, busy ms per worker %s -> fractions %s",
                        n, [round(b * 1e3, 2) for b in busy],
                        [round(f, 4) for f in self.partitioner.fractions(n)])

    def sample_tokens(self, grammar_output):
        if self.connector is None or self.is_head:
            return super().sample_tokens(grammar_output)
        if self._ran:
            self._ran = False
            with self._fail_fast():
                super().sample_tokens(None)  # a partial prefill: the token is discarded
        return None

    def kvr_stats(self) -> dict:
        """Per-worker evidence (collective_rpc("kvr_stats")): what this worker computed and moved."""
        s = self.connector.stats if self.connector else None
        return {
            "rank": self.rank, "chain_pos": self.chain_pos, "is_head": self.is_head,
            "tp_rank": self.topo.tp_rank, "tp_size": self.topo.tp_size, "tp_group": vllm_seam.tp_group_ranks(),
            "steps_run": self.steps_run, "tokens_run": self.tokens_run,
            "chain_steps": s.steps if s else 0,
            "last_segments": self.last_segments,
            "chunks_ahead": self.chunks_ahead, "chunks_ahead_cached": self.chunks_ahead_cached,
            "tokens_ahead": self.tokens_ahead, "prefix_tokens_held": self.prefix_tokens_held,
            "chunks_prefix_not_final": self.chunks_prefix_not_final,
            "live_requests": len(self.book),
            "blocks_received": s.blocks_received if s else 0,
            "blocks_sent": s.blocks_sent if s else 0,
            "layers_sent": s.layers_sent if s else 0,
            "layers_sent_on_entry": s.layers_sent_on_entry if s else 0,
            "bytes_sent": self.connector.comm.bytes_sent if self.connector else 0,
            "profile": dataclasses.asdict(self.connector.profiler.total)
            if self.connector and (self.kvr.profile or self.kvr.refine) else None,
            "partition": self.partitioner.describe() if self.partitioner else None,
            "refine": self.partitioner.refiner.state() if self.partitioner and self.partitioner.refiner else None,
        }

    def _build_partitioner(self, method: str | None = None, table: PartitionTable | None = None) -> Partitioner:
        """The configured split (no arguments), another method, or a given table."""
        n = self.kvr.num_workers
        refiner = Refiner(n) if self.kvr.refine else None
        kw = dict(min_tokens=self.kvr.min_tokens, block_size=self.block_size)
        if table is not None:
            return Partitioner("table", n, self.cost, table, refiner, **kw)
        return Partitioner.build(method or self.kvr.partition, n, self.cost, self.shape,
                                 stage_device(vllm_seam.device_name(self.connector.device), self.topo.tp_size),
                                 self.kvr.table_path if method is None else None, refiner, **kw)

    def kvr_set_fractions(self, fractions) -> None:
        """Tuner hook: cut every runahead prompt by these fractions (None: back to the configured split)."""
        self.partitioner.set_override(fractions)

    def kvr_set_partition(self, method: str | None = None, table: dict | None = None) -> str:
        """Benchmark hook: switch to another partition method, or to a table given as its JSON
        dict, without an engine restart (None, None: back to the configuration)."""
        self.partitioner = self._build_partitioner(
            method, PartitionTable.from_dict(table, "kvr_set_partition") if table is not None else None)
        return self.partitioner.describe()

    def shutdown(self) -> None:
        if self.connector is not None:
            vllm_seam.uninstall_connector()
            self.connector = None
        super().shutdown()
