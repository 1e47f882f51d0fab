"""KV-Runahead's vLLM worker: the platform's worker speaking vLLM's protocol, delegating to its mode.

Every worker receives the same SchedulerOutput. Its mode (``runahead.Runahead``, built once by
``modes.runahead_for``; ``NO_RUNAHEAD`` for one worker) rewrites it into this rank's share. In the TP
layout (``tp_layout/rank.py``) every rank first runs its guest's segments (``run_ahead``), then vLLM's TP step.
In the chain of copies (``copies/rank.py``) the head (vLLM's output rank) runs the last segment of each runahead
chunk, everything else in the step, and samples; the other workers run nothing but their segments.
"""
from __future__ import annotations

import contextlib
import logging
import os

import torch

from . import modes
from .config import TP_LAYOUT, runahead_config
from .log import logger
from .runahead import NO_RUNAHEAD
from .vllm_side import seam


# The TP layout's step issues work from 7 CUDA streams per rank (vLLM's, the shards' and the gather's side
# streams, one per NCCL communicator: docs/tp-layout-transport.md), and CUDA runs a process's streams through
# CUDA_DEVICE_MAX_CONNECTIONS hardware queues (8 by default), read when the CUDA context is made. Streams that
# share a queue start their work in issue order, so a round waiting for other ranks holds back whatever another
# flow queued behind it: tp_order completes under any sharing (tests/test_tp_order.py), but a queue per stream,
# vLLM's own streams included, keeps one flow from waiting behind another.
TP_LAYOUT_QUEUES = "32"


def set_hardware_queues(kvr) -> None:
    """TP layout: CUDA_DEVICE_MAX_CONNECTIONS (unless set), before this process makes its CUDA context."""
    if kvr.mode != TP_LAYOUT:
        return
    os.environ.setdefault("CUDA_DEVICE_MAX_CONNECTIONS", TP_LAYOUT_QUEUES)
    if torch.cuda.is_initialized():
        logger.warning("KV-Runahead: CUDA was initialized before the TP layout's worker; CUDA_DEVICE_MAX_CONNECTIONS"
                       "=%s may not apply to its streams", os.environ["CUDA_DEVICE_MAX_CONNECTIONS"])


class Worker(seam.worker_base()):
    """Use with --worker-cls vllm_kvrunahead.Worker and
    --tensor-parallel-size N: TP layout (every rank decodes and holds its KV heads; each also holds the
    full model, its guest, for the runahead prefill), or
    --prefill-context-parallel-size N [--tensor-parallel-size T: N stages of T TP ranks; each TP rank
    of a stage plans the same step from the same scheduler output and moves its own KV heads along its
    TP rank's chain]."""

    _kvrunahead_worker = True  # subclasses are recognized by the config hook too

    def __init__(self, vllm_config, local_rank, rank, distributed_init_method, is_driver_worker=False):
        self.kvr = runahead_config(vllm_config)  # before vLLM's set-up: a missing plugin fails here
        set_hardware_queues(self.kvr)  # before vLLM's set-up makes the CUDA context
        super().__init__(vllm_config, local_rank, rank, distributed_init_method,
                         is_driver_worker=is_driver_worker)
        self.runahead = NO_RUNAHEAD
        self.host = modes.host_for(self.kvr)  # the guest's builder (TP layout), or NO_GUEST
        self._sample_owed = False  # a rank that returns no output ran a step and waits for sample_tokens

    def init_device(self) -> None:
        super().init_device()
        self.host.init_device(self.local_rank)

    def load_model(self, *args, **kwargs) -> None:
        with self.host.loading(self.vllm_config, self.device, self.model_runner.get_model):
            super().load_model(*args, **kwargs)

    def determine_available_memory(self) -> int:
        return self.host.kv_bytes_left(super().determine_available_memory, self.cache_config)

    def initialize_from_config(self, kv_cache_config) -> None:
        self.runahead = modes.runahead_for(self.kvr, self.vllm_config, self.rank, kv_cache_config, self.host)
        super().initialize_from_config(kv_cache_config)
        self.runahead.start(self.model_runner)

    def execute_model(self, scheduler_output):
        step = self.runahead.rewrite(scheduler_output)
        with self._fail_fast(every_rank=True):
            self.runahead.run_ahead(step)
        out = self._run(step.scheduler_output)
        self.runahead.learn(step)
        return out if self.runahead.returns_output else None  # vLLM reads the output rank's reply only

    def _run(self, scheduler_output):
        self._sample_owed = False
        if scheduler_output is None:  # a chain worker with no segment in this step
            return None
        with self._fail_fast():
            out = super().execute_model(scheduler_output)
        self._sample_owed = out is None and not self.runahead.returns_output
        return out

    def sample_tokens(self, grammar_output):
        if self.runahead.returns_output:
            return super().sample_tokens(grammar_output)
        if self._sample_owed:
            self._sample_owed = False
            with self._fail_fast():
                super().sample_tokens(None)  # a partial prefill: the token is discarded
        return None

    @contextlib.contextmanager
    def _fail_fast(self, every_rank: bool = False):
        """A chain worker that fails mid-prefill (e.g. out of memory) exits at once; with ``every_rank``
        the head too (TP layout: any rank's guest; its peers wait for its shards).

        vLLM's executor reads only the head's reply, and the head would wait for this worker's KV
        until the step's RPC timeout (minutes on NCCL, which has no receive timeout). A dead worker
        process is noticed by the executor within a second, so the engine fails its requests and
        stops instead of hanging.
        """
        if self.runahead.returns_output and not every_rank:
            yield
            return
        try:
            yield
        except BaseException:
            logger.exception("KV-Runahead: chain worker rank %d failed mid-prefill; exiting so the "
                             "engine stops now instead of the head waiting for its KV", self.rank)
            logging.shutdown()
            os._exit(1)

    # -- RPCs (collective_rpc) --------------------------------------------------
    def kvr_stats(self) -> dict:
        """Per-worker evidence: what this worker computed and moved."""
        return {**self.runahead.stats(), "rank": self.rank}

    def kvr_set_fractions(self, fractions) -> None:
        """Tuner hook: cut every runahead prompt by these fractions (None: back to the configured split)."""
        self.runahead.set_fractions(fractions)

    def kvr_set_partition(self, method: str | None = None, table: dict | None = None) -> str:
        """Benchmark hook: another partition method, or a table given as its JSON dict, without an
        engine restart (None, None: back to the configuration)."""
        return self.runahead.set_partition(method, table)

    def shutdown(self) -> None:
        self.runahead.close()
        self.runahead = NO_RUNAHEAD
        super().shutdown()
