"""Every touch of vLLM internals lives here, so a vLLM upgrade edits one module.

The seam is what vLLM 0.26's two model runners share: the SchedulerOutput each
worker receives (V1-based CPUModelRunner on CPU, model runner V2 on GPUs) and
the KV-connector hooks the attention op calls per layer
(``maybe_transfer_kv_layer`` -> ``wait_for_layer_load`` / ``save_kv_layer``).
"""
from __future__ import annotations

import dataclasses

from vllm.distributed.kv_transfer import kv_transfer_state
from vllm.distributed.kv_transfer.kv_connector.v1.base import (  # noqa: F401 (re-exported)
    KVConnectorBase_V1,
    KVConnectorMetadata,
    KVConnectorRole,
)
from vllm.platforms import current_platform
from vllm.v1.core.sched.output import CachedRequestData, SchedulerOutput

from .plan import ReqView, StepPlan

def worker_base() -> type:
    """The platform's own worker class: KV-Runahead's Worker subclasses it."""
    if current_platform.is_cpu():
        from vllm.v1.worker.cpu_worker import CPUWorker

        return CPUWorker
    from vllm.v1.worker.gpu_worker import Worker

    return Worker


def head_rank(parallel_config) -> int:
    """vLLM's output rank (the worker whose output the executor returns)."""
    return parallel_config.world_size - (
        parallel_config.tensor_parallel_size * parallel_config.prefill_context_parallel_size)


def world_device_group():
    from vllm.distributed.parallel_state import get_world_group

    return get_world_group().device_group


def world_cpu_group():
    from vllm.distributed.parallel_state import get_world_group

    return get_world_group().cpu_group


def device_name(device) -> str:
    """The GPU's marketing name (what shipped tables are keyed by), or "cpu"."""
    import torch

    return torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"


def install_connector(connector) -> None:
    """Make ``connector`` the KV connector the attention op's hooks call."""
    if kv_transfer_state._KV_CONNECTOR_AGENT is not None:
        raise ValueError(
            "KV-Runahead cannot be combined with another KV connector (--kv-transfer-config); "
            "remove one of them")
    kv_transfer_state._KV_CONNECTOR_AGENT = connector


def uninstall_connector() -> None:
    kv_transfer_state._KV_CONNECTOR_AGENT = None


def request_views(so: SchedulerOutput) -> list[ReqView]:
    """Requests scheduled for the first time this step, as plain views for the planner.

    Only new requests can run ahead (their KV starts empty); cached ones
    (decodes, later chunks, resumed) always run on the head.
    """
    views = []
    for nr in so.scheduled_new_reqs:
        sp = nr.sampling_params
        eligible = (
            nr.prompt_token_ids is not None
            and nr.prompt_embeds is None
            and not nr.mm_features
            and nr.lora_request is None
            and nr.pooling_params is None
            and sp is not None
            and sp.prompt_logprobs is None
            and len(nr.block_ids) == 1
        )
        views.append(ReqView(
            req_id=nr.req_id,
            num_computed=nr.num_computed_tokens,
            num_scheduled=so.num_scheduled_tokens.get(nr.req_id, 0),
            prompt_len=len(nr.prompt_token_ids or ()),
            block_ids=tuple(nr.block_ids[0]) if nr.block_ids else (),
            eligible=eligible,
        ))
    return views


def for_head(so: SchedulerOutput, plan: StepPlan, meta) -> SchedulerOutput:
    """The head computes the last segment of each runahead request, everything else as scheduled."""
    pos = plan.n_workers - 1
    segs = {r.req_id: r.segments[pos] for r in plan.requests}
    if not segs:
        return dataclasses.replace(so, kv_connector_metadata=meta)
    new_reqs = [
        dataclasses.replace(nr, num_computed_tokens=segs[nr.req_id].start) if nr.req_id in segs else nr
        for nr in so.scheduled_new_reqs
    ]
    num_sched = dict(so.num_scheduled_tokens)
    for rid, seg in segs.items():
        num_sched[rid] = seg.length
    return dataclasses.replace(
        so,
        scheduled_new_reqs=new_reqs,
        num_scheduled_tokens=num_sched,
        total_num_scheduled_tokens=sum(num_sched.values()),
        kv_connector_metadata=meta,
    )


def for_chain_worker(so: SchedulerOutput, plan: StepPlan, pos: int, finished: set[str], meta) -> SchedulerOutput:
    """A non-head worker's step: only its segment of each runahead request, nothing else.

    Its runner forgets last step's requests (``finished``), so each runahead
    request arrives as new, with its full block table and computed = segment start.
    """
    segs = {r.req_id: r.segments[pos] for r in plan.requests}
    new_reqs = [
        dataclasses.replace(nr, num_computed_tokens=segs[nr.req_id].start)
        for nr in so.scheduled_new_reqs if nr.req_id in segs
    ]
    num_sched = {rid: seg.length for rid, seg in segs.items()}
    empty = SchedulerOutput.make_empty()
    return dataclasses.replace(
        empty,
        scheduled_new_reqs=new_reqs,
        scheduled_cached_reqs=CachedRequestData.make_empty(),
        num_scheduled_tokens=num_sched,
        total_num_scheduled_tokens=sum(num_sched.values()),
        num_common_prefix_blocks=[0] * len(so.num_common_prefix_blocks),
        finished_req_ids=set(finished),
        kv_connector_metadata=meta,
    )
