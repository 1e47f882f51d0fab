"""Every touch of vLLM internals lives here, so a vLLM upgrade edits one module.

The seam is what vLLM 0.26's two model runners share: the SchedulerOutput each
worker receives (V1-based CPUModelRunner on CPU, model runner V2 on GPUs) and
the KV-connector hooks the attention op calls per layer
(``maybe_transfer_kv_layer`` -> ``wait_for_layer_load`` / ``save_kv_layer``).

The releases it is tested with are listed once, in ``config.SUPPORTED_VLLM``. Where releases differ,
the seam decides by what the installed vLLM has (a field, an attribute), once, here, never by its
version number; everything else reads the same on all of them.
"""
from __future__ import annotations

import dataclasses

import vllm
from vllm.distributed.kv_transfer import kv_transfer_state
from vllm.distributed.kv_transfer.kv_connector.v1.base import (  # noqa: F401 (re-exported)
    KVConnectorBase_V1, KVConnectorMetadata, KVConnectorRole
)
from vllm.distributed.kv_transfer.kv_connector.v1.metrics import (  # noqa: F401 (re-exported)
    KVConnectorPromMetrics, KVConnectorStats
)
from vllm.exceptions import VLLMValidationError as RequestError  # noqa: F401 (HTTP 400 on 0.26 and 0.32)
from vllm.platforms import current_platform
from vllm.sampling_params import SamplingParams
from vllm.v1.core.sched.output import CachedRequestData, NewRequestData, SchedulerOutput

from ..core.partition import ModelShape
from ..core.plan import DECODE, ReqView, StepPlan

VLLM_VERSION = vllm.__version__.split("+")[0]  # for messages only


def has_field(cls, name: str) -> bool:
    return name in {f.name for f in dataclasses.fields(cls)}


# Fields every rewritten step output carries. A model runner that calls the connector's start_load_kv
# *after* the forward unless the step says it loads KV synchronously (SchedulerOutput.has_sync_kv_loads,
# 0.32) gets that flag: KV-Runahead's start_load_kv posts the receives and the head's prefix sends that
# the per-layer hooks wait on, so it must run before the forward (0.26 always calls it there).
STEP_FIELDS: dict = {"has_sync_kv_loads": True} if has_field(SchedulerOutput, "has_sync_kv_loads") else {}


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


def tp_size(parallel_config) -> int:
    """Tensor-parallel ranks per runahead stage. The config hook keeps vLLM's TP size and sets PCP
    back to 1 (world_size stays S x T), so vLLM lays ranks out as [-1 (the S stages), DP=1, PP=1,
    PCP=1, TP]: its TP groups are the stages, exactly as for TP x PCP (TP innermost)."""
    return parallel_config.tensor_parallel_size


def model_shape(model_config) -> ModelShape | None:
    """What a tuned split depends on, from vLLM's model config (None: an unusual config)."""
    hf = model_config.hf_text_config
    try:
        return ModelShape(
            layers=hf.num_hidden_layers,
            hidden=hf.hidden_size,
            heads=hf.num_attention_heads,
            kv_heads=model_config.get_total_num_kv_heads(),
            intermediate=getattr(hf, "intermediate_size", None) or 4 * hf.hidden_size,
            head_dim=model_config.get_head_size(),
        )
    except (AttributeError, TypeError):  # no table matches; the default cost model
        return None


def model_memory(model_config) -> dict | None:
    """What a memory plan needs of the model beyond its shape (``core/memory.py``), or None (an unusual
    config: no plan)."""
    shape = model_shape(model_config)
    try:
        return dict(shape=shape, vocab=model_config.get_vocab_size(), dtype_bytes=model_config.dtype.itemsize,
                    tied=bool(getattr(model_config.hf_text_config, "tie_word_embeddings", False)))
    except (AttributeError, TypeError):
        return None


def gpu_memory_bytes(device: int = 0) -> int:
    """The first GPU's memory (through NVML on CUDA: no CUDA context in the process that builds the config)."""
    from vllm.platforms import current_platform

    return current_platform.get_device_total_memory(device)


def block_size(kv_cache_config) -> int:
    """The KV block size of the model's one KV cache group (the config hook refuses others)."""
    groups = kv_cache_config.kv_cache_groups
    if len(groups) != 1:
        raise ValueError(
            f"KV-Runahead supports models with one KV cache group; this one has {len(groups)} "
            "(hybrid / sliding-window mixes are not supported)")
    return groups[0].kv_cache_spec.block_size


def num_kv_blocks(kv_cache_config) -> int:
    """KV blocks (scheduler blocks) every worker's cache has: the engine sizes all workers alike."""
    return kv_cache_config.num_blocks


def frontend_tokenizer(input_processor):
    """The tokenizer vLLM's frontend validates prompts with, or None (--skip-tokenizer-init): on the
    input processor's renderer where it has one (0.32), else on the input processor (0.26)."""
    renderer = getattr(input_processor, "renderer", None)
    if renderer is not None:
        return getattr(renderer, "tokenizer", None)
    return input_processor.tokenizer


def scheduler_demand(scheduler) -> tuple[int, bool, int]:
    """What the engine's scheduler is about to schedule: tokens its running requests want now, whether
    one of them is still in its prompt, and the uncomputed tokens of the first waiting request."""
    running, prefilling = 0, False
    for r in scheduler.running:
        running += max(0, r.num_tokens_with_spec + r.num_output_placeholders - r.num_computed_tokens)
        prefilling = prefilling or r.num_computed_tokens < r.num_prompt_tokens
    first = 0
    # 0.32 also keeps the waiting requests it passed over in a queue of their own (skipped_waiting)
    for queue in (scheduler.waiting, getattr(scheduler, "skipped_waiting", None)):
        if queue is not None and len(queue):
            r = queue.peek_request()
            first = r.num_tokens - r.num_computed_tokens
            break
    return running, prefilling, first


def llm_config(llm):
    """The VllmConfig an offline ``vllm.LLM``'s engine runs with (for tools such as the tuner)."""
    return llm.llm_engine.vllm_config


def set_worker_transfer_config(vllm_config) -> None:
    """A worker-local KV transfer config: the connector base class wants one; the engine's
    scheduler never sees it (KV-Runahead plans on the workers)."""
    from vllm.config import KVTransferConfig

    vllm_config.kv_transfer_config = KVTransferConfig(kv_connector="KVRunaheadConnector", kv_role="kv_both")


def connector_metadata(connector):
    """This step's metadata bound to ``connector`` by the model runner."""
    return connector._get_connector_metadata()


def bound_metadata(connector):
    """The step metadata bound to ``connector`` now, or None between steps."""
    return getattr(connector, "_connector_metadata", None)


def kv_block_count(connector) -> int:
    """KV blocks (scheduler blocks) in the cache config the connector was built with."""
    return num_kv_blocks(connector._kv_cache_config)


def world_device_group():
    from vllm.distributed.parallel_state import get_world_group

    return get_world_group().device_group


def tp_group_ranks() -> list[int]:
    """The global ranks of this worker's vLLM tensor-parallel group (its runahead stage)."""
    from vllm.distributed.parallel_state import get_tp_group

    return list(get_tp_group().ranks)


def world_cpu_group():
    from vllm.distributed.parallel_state import get_world_group

    return get_world_group().cpu_group


def link_facts(env_keys) -> tuple[list[dict], bool | None]:
    """What every rank of the world (the TP layout's TP group) knows about its links, all-gathered over
    the world's CPU group, so every rank holds the same list (collective: every rank calls it at once):
    per rank its NCCL switches (``env_keys`` from its environment), its local GPU index and whether its GPU
    reaches each local GPU peer to peer (``device``, ``peers``; None without a GPU). Second: whether vLLM
    finds NVLink between every pair of the ranks' physical GPUs (its custom all-reduce's test, on NVML;
    None: no GPU, or NVML could not say)."""
    import os

    import torch
    import torch.distributed as dist

    group = world_cpu_group()
    facts = {"env": {k: os.environ[k] for k in env_keys if k in os.environ}, "device": None, "peers": None}
    if current_platform.is_cuda() and torch.cuda.is_available():
        mine = torch.cuda.current_device()
        facts.update(device=mine, physical=current_platform.visible_device_id_to_physical_device_id(mine),
                     peers={j: j == mine or torch.cuda.can_device_access_peer(mine, j)
                            for j in range(torch.cuda.device_count())})
    everyone: list = [None] * dist.get_world_size(group)
    dist.all_gather_object(everyone, facts, group=group)
    nvlink = None
    if all(f["device"] is not None for f in everyone):
        try:
            nvlink = bool(current_platform.is_fully_connected([f["physical"] for f in everyone]))
        except Exception:  # noqa: BLE001 - NVML missing or refusing: unknown, the caller's guess decides
            nvlink = None
    # each rank asked NVML itself: agree on one answer (False if any rank saw no NVLink, None if any could
    # not tell), so every rank plans with the same profile
    answers: list = [None] * len(everyone)
    dist.all_gather_object(answers, nvlink, group=group)
    return everyone, (False if False in answers else None if None in answers else True)


def device_name(device) -> str:
    """The GPU's marketing name (what shipped tables are keyed by), or "cpu"."""
    import torch

    return torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"


def layer_order(layer_names: list[str]) -> list[str]:
    """Attention layer names in forward order (by the layer index in the name, as vLLM binds them)."""
    from vllm.model_executor.models.utils import extract_layer_index

    return sorted(layer_names, key=extract_layer_index)


def layers_writing_kv_in_forward(vllm_config, layer_names: list[str]) -> list[str]:
    """Those of the attention layers whose backend writes K and V into the paged cache inside its
    forward. For every other layer vLLM runs the cache write as its own op (``unified_kv_cache_update``,
    0.26 and 0.32) right before the attention op whose entry calls the connector's
    ``wait_for_layer_load``: the layer's KV is final there, before its attention runs."""
    layers = vllm_config.compilation_config.static_forward_context
    return [n for n in layer_names
            if getattr(layers[n].attn_backend, "forward_includes_kv_cache_update", True)
            or getattr(layers[n], "kv_sharing_target_layer_name", None) is not None]


def install_connector(connector) -> None:
    """Make ``connector`` the KV connector the attention op's hooks call."""
    if kv_transfer_state._KV_CONNECTOR_AGENT is not None:
        raise ValueError(
            "KV-Runahead cannot be combined with another KV connector (--kv-transfer-config); "
            "remove one of them")
    kv_transfer_state._KV_CONNECTOR_AGENT = connector


def uninstall_connector() -> None:
    kv_transfer_state._KV_CONNECTOR_AGENT = None


def kv_caches_by_layer(runner, kv_cache_config) -> dict:
    """A V1 runner's KV cache tensors by attention layer name (its list is in layer order)."""
    names = layer_order([n for g in kv_cache_config.kv_cache_groups for n in g.layer_names])
    if len(names) != len(runner.kv_caches):
        raise ValueError(f"KV-Runahead: {len(runner.kv_caches)} KV caches for {len(names)} attention layers")
    return dict(zip(names, runner.kv_caches))


class RequestBook:
    """Every live request's NewRequestData and block table (KV cache group 0).

    A SchedulerOutput carries a request's data once, when it is first scheduled, and
    afterwards only each step's new blocks; a chain worker's runner forgets requests
    between runahead steps, so every worker keeps this book from the outputs it sees.
    """

    def __init__(self) -> None:
        self._data: dict[str, NewRequestData] = {}
        self._blocks: dict[str, list[int]] = {}

    def __len__(self) -> int:
        return len(self._data)

    def update(self, so: SchedulerOutput) -> None:
        for rid in so.finished_req_ids:
            self._data.pop(rid, None)
            self._blocks.pop(rid, None)
        for nr in so.scheduled_new_reqs:  # also resumed requests on model runner V2
            self._data[nr.req_id] = nr
            self._blocks[nr.req_id] = list(nr.block_ids[0]) if nr.block_ids else []
        cr = so.scheduled_cached_reqs
        for rid, new in zip(cr.req_ids, cr.new_block_ids):
            if rid not in self._data:
                continue
            if rid in cr.resumed_req_ids:  # V1: the resumed request's whole new block table
                self._blocks[rid] = list(new[0]) if new else []
            elif new:
                self._blocks[rid].extend(new[0])

    def data(self, req_id: str) -> NewRequestData:
        return self._data[req_id]

    def blocks(self, req_id: str) -> list[int]:
        return self._blocks[req_id]


def _why_not_ahead(nr: NewRequestData) -> str:
    """Why the chain cannot compute this request's prompt ("": it can). It computes plain token prompts
    of generative, text-only requests; the head needs all logits for prompt logprobs."""
    sp = nr.sampling_params
    if nr.prompt_token_ids is None or nr.prompt_embeds is not None:
        return "prompt_embeds"
    if nr.mm_features:
        return "multimodal"
    if nr.lora_request is not None:
        return "lora"
    if nr.pooling_params is not None or sp is None:
        return "pooling"
    if sp.prompt_logprobs is not None:
        return "prompt_logprobs"
    if len(nr.block_ids) != 1:
        return "kv_cache_groups"
    return ""


def _why_past_prompt(c: int, m: int, prompt_len: int) -> str:
    """Tokens after the prompt: a decode, or the output tokens a resumed request recomputes (chain
    workers compute prompt tokens only)."""
    if c < prompt_len:
        return ""
    return DECODE if m == 1 else "output_tokens"


def request_views(so: SchedulerOutput, book: RequestBook) -> list[ReqView]:
    """Every request scheduled this step, as plain views for the planner (``book`` updated first).

    A prefill chunk may run ahead wherever it starts; decodes and requests the chain cannot
    carry stay on the head.
    """
    starts = {nr.req_id: nr.num_computed_tokens for nr in so.scheduled_new_reqs}
    cr = so.scheduled_cached_reqs
    starts.update(zip(cr.req_ids, cr.num_computed_tokens))
    views = []
    for rid, m in so.num_scheduled_tokens.items():
        if rid not in starts:
            continue
        nr = book.data(rid)
        c, prompt_len = starts[rid], len(nr.prompt_token_ids or ())
        views.append(ReqView(
            req_id=rid, num_computed=c, num_scheduled=m, prompt_len=prompt_len,
            block_ids=tuple(book.blocks(rid)),
            not_ahead=_why_past_prompt(c, m, prompt_len) or _why_not_ahead(nr)
            or ("spec_decode" if rid in so.scheduled_spec_decode_tokens else ""),
        ))
    return views


SEGMENT_STARTS = "_kvr_segment_starts"  # the head runner's mark (patches/runner_starts.py)


def follow_rewritten_starts(runner, starts) -> None:
    """Make ``runner`` (the head's) start each request where ``starts()`` says (req id -> tokens
    computed), as the rewritten scheduler output does: model runner V1 reads that count from the
    output; V2 keeps its own on the GPU, which the registered patch head-runner-starts-at-its-segment
    sets for the runner marked here."""
    setattr(runner, SEGMENT_STARTS, starts)


def for_head(so: SchedulerOutput, plan: StepPlan, meta) -> SchedulerOutput:
    """The head computes the last segment of each runahead chunk, everything else as scheduled:
    its runner takes the chain's KV of [c, segment start) as computed."""
    return starting_at(so, {r.req_id: r.segments[plan.n_workers - 1] for r in plan.requests}, meta)


def starting_at(so: SchedulerOutput, segs: dict, meta) -> SchedulerOutput:
    """``so`` with each request of ``segs`` (req id -> Segment) computing that segment only: the
    runner takes the KV before the segment's start as computed."""
    if not segs:
        return dataclasses.replace(so, kv_connector_metadata=meta, **STEP_FIELDS)
    new_reqs = [
        dataclasses.replace(nr, num_computed_tokens=segs[nr.req_id].start) if nr.req_id in segs else nr
        for nr in so.scheduled_new_reqs
    ]
    cr = so.scheduled_cached_reqs
    cached = dataclasses.replace(cr, num_computed_tokens=[
        segs[rid].start if rid in segs else c for rid, c in zip(cr.req_ids, cr.num_computed_tokens)])
    num_sched = dict(so.num_scheduled_tokens)
    for rid, seg in segs.items():
        num_sched[rid] = seg.length
    return dataclasses.replace(
        so,
        scheduled_new_reqs=new_reqs,
        scheduled_cached_reqs=cached,
        num_scheduled_tokens=num_sched,
        total_num_scheduled_tokens=sum(num_sched.values()),
        kv_connector_metadata=meta,
        **STEP_FIELDS,
    )


# A chain worker's segment ends before the prompt does, so the runner discards its token; plain
# greedy sampling keeps the user's seed, penalties, logprobs and grammar away from the throwaway
# pass (a seeded request's CPU generator cannot rewind: "CPU Generator does not use offset").
CHAIN_SAMPLING = SamplingParams(max_tokens=1, temperature=0.0)


def for_chain_worker(so: SchedulerOutput, plan: StepPlan, pos: int, finished: set[str], meta,
                     book: RequestBook) -> SchedulerOutput:
    """A non-head worker's step: only its segment of each runahead chunk, nothing else.

    Its runner forgets last step's requests (``finished``), so each runahead request
    arrives as new, with its whole block table and computed = segment start.
    """
    return segments_only(so, {r.req_id: (r.segments[pos], r.block_ids) for r in plan.requests}, finished,
                         meta, book)


def segments_only(so: SchedulerOutput, segs: dict, finished: set[str], meta, book: RequestBook) -> SchedulerOutput:
    """A step of nothing but the given segments (req id -> (Segment, block ids)), each request new to
    the runner (which forgets ``finished``, last step's), computed = segment start, sampled greedily
    and thrown away (``CHAIN_SAMPLING``)."""
    new_reqs, num_sched = [], {}
    for rid, (seg, block_ids) in segs.items():
        new_reqs.append(dataclasses.replace(
            book.data(rid), num_computed_tokens=seg.start, block_ids=(list(block_ids),),
            sampling_params=CHAIN_SAMPLING))
        num_sched[rid] = seg.length
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
        **STEP_FIELDS,
    )
