"""Turn --prefill-context-parallel-size N into N KV-Runahead workers.

vLLM sizes its worker pool as TP x PP x PCP, so PCP=N is the one existing flag
that starts N full-model workers (with --tensor-parallel-size T: N runahead
stages of T tensor-parallel ranks each, N x T workers). But vLLM's own PCP (MLA-only) then reshapes
KV blocks in the scheduler, the block tables and the attention backend
selection. When the worker class is KV-Runahead's, this hook keeps the N (x T)
workers (world_size) and sets PCP back to 1 before the rest of VllmConfig's
post-init runs, so every other part of vLLM behaves as with one worker; the
worker count and options travel in additional_config["kv_runahead"].
It also refuses unsupported combinations with one clear error each.

Rank layout. vLLM's initialize_model_parallel lays world ranks out as
[ExternalDP, DP, PP, PCP, TP] (TP innermost). For TP x PCP that gives rank
s*T + r to PCP rank s, TP rank r, TP groups [s*T .. s*T+T-1]. With PCP set back
to 1 and world_size S x T kept, the S stages land on the leading (external DP)
axis instead: the TP groups are the same ranks, [s*T .. s*T+T-1]; vLLM's PCP
groups become single ranks (the chain does not use them: ChainComm talks over
the world group). The output rank, world_size - T x PCP = (S-1) x T, is TP rank
0 of the last stage: the head stage. So no further patch is needed for TP.
"""
from __future__ import annotations

import os

from ...config import ADDITIONAL_CONFIG_KEY, COPIES, OFF, PEER_GUEST, TP_LAYOUT, KVRunaheadConfig, flags_mode, flags_workers
from . import Patch, check_not_replaced, wrap_method


def check_supported(vllm_config, cfg: KVRunaheadConfig) -> None:
    pc, mc = vllm_config.parallel_config, vllm_config.model_config
    n = cfg.num_workers
    if pc.pipeline_parallel_size > 1:
        raise ValueError("KV-Runahead: --pipeline-parallel-size > 1 is not supported (runahead stages may be "
                         "tensor-parallel, not pipeline-parallel); use --pipeline-parallel-size 1")
    if pc.data_parallel_size > 1:
        raise ValueError("KV-Runahead: --data-parallel-size > 1 is not supported; use 1")
    if pc.decode_context_parallel_size > 1:
        raise ValueError("KV-Runahead: --decode-context-parallel-size > 1 is not supported; use 1")
    if pc.distributed_executor_backend == "ray" and os.environ.get("VLLM_USE_RAY_V2_EXECUTOR_BACKEND", "1") == "0":
        raise ValueError("KV-Runahead with Ray needs vLLM's Ray executor V2; unset "
                         "VLLM_USE_RAY_V2_EXECUTOR_BACKEND=0")
    if vllm_config.speculative_config is not None:
        raise ValueError("KV-Runahead: speculative decoding is not supported; remove --speculative-config")
    if vllm_config.kv_transfer_config is not None and vllm_config.kv_transfer_config.kv_connector:
        raise ValueError("KV-Runahead cannot be combined with --kv-transfer-config; remove one of them")
    if mc is not None:
        if mc.is_encoder_decoder:
            raise ValueError(f"KV-Runahead: encoder-decoder models ({mc.model}) are not supported")
        if mc.use_mla:
            raise ValueError(f"KV-Runahead: MLA models ({mc.model}) are not supported; vLLM's own "
                             "--prefill-context-parallel-size serves them without --worker-cls")
        if mc.runner_type != "generate":
            raise ValueError(f"KV-Runahead: only generative models are supported, not {mc.runner_type!r}")
        # Refused here, not when the worker sees its KV cache groups (after ~30 s of weight loading
        # on CPU, wrapped in vLLM's generic "Engine core initialization failed").
        layer_types = sorted(set(getattr(mc.hf_text_config, "layer_types", None) or ()))
        if mc.is_hybrid or mc.is_attention_free or len(layer_types) > 1:
            kinds = ", ".join(layer_types) if len(layer_types) > 1 else "hybrid or attention-free layers"
            raise ValueError(f"KV-Runahead supports models with one KV cache group; {mc.model} mixes {kinds} "
                             "(hybrid / sliding-window mixes are not supported)")
    if cfg.guest == PEER_GUEST and getattr(mc, "quantization", None) is not None:
        raise ValueError(f"KV-Runahead: the peer guest copies plain weights from vLLM's TP shards; {mc.model} is "
                         f"quantized ({mc.quantization}): drop \"guest\": \"peer\" or serve an unquantized checkpoint")
    from vllm.platforms import current_platform

    if current_platform.is_cuda_alike() and pc.nnodes == 1 and cfg.mode == COPIES:
        have = current_platform.device_count()
        tp = pc.tensor_parallel_size
        if n * tp > have:
            what = f"{n} workers" if tp == 1 else f"{n} stages x {tp} TP ranks"
            raise ValueError(f"KV-Runahead: {what} need {n * tp} GPUs, only {have} visible; "
                             f"use --prefill-context-parallel-size {max(1, have // tp)} or fewer")
    if current_platform.is_cuda_alike() and cfg.mode == TP_LAYOUT:
        check_fits(vllm_config, cfg)
    most = getattr(vllm_config.scheduler_config, "max_num_batched_tokens", None)
    if cfg.step_budget is not None and most is not None and cfg.step_budget > most:
        raise ValueError(f"KV-Runahead: step_budget {cfg.step_budget} is more than --max-num-batched-tokens "
                         f"{most}; lower step_budget or raise --max-num-batched-tokens")
    if cfg.partition == "table":
        from ...core.lut import PartitionTable

        t = PartitionTable.load(cfg.table_path)
        if t.n_workers != n:
            raise ValueError(f"KV-Runahead: table {cfg.table_path} is for {t.n_workers} workers, not {n}")


def check_fits(vllm_config, cfg: KVRunaheadConfig) -> None:
    """The TP layout's memory plan per GPU for its guest (``cfg.guest``; est., ``core/memory.py``), logged;
    refused, with the plan, where KV would not hold one request of max_model_len: a "full" guest holds the
    whole model on every rank, so a model whose weights do not fit one GPU with room for KV fails here, not
    after minutes of loading. A refused "full" guest's error also gives the "peer" guest's plan."""
    from ...config import PEER_GUEST
    from ...core.memory import GIB, PEER_LAYERS, tp_layout_plan
    from ...log import logger
    from ..seam import gpu_memory_bytes, model_memory

    mc, cc, sc = vllm_config.model_config, vllm_config.cache_config, vllm_config.scheduler_config
    model = model_memory(mc) if mc is not None else None
    if model is None or model["shape"] is None:
        return
    n, gpu = cfg.num_workers, gpu_memory_bytes()

    def plan_for(guest: str):
        return tp_layout_plan(model["shape"], vocab=model["vocab"], tied=model["tied"], n=n,
                              dtype_bytes=model["dtype_bytes"], step_budget=sc.max_num_batched_tokens,
                              max_model_len=mc.max_model_len, block_size=cc.block_size or 16,
                              gpu_bytes=gpu, utilization=cc.gpu_memory_utilization, guest=guest)

    plan = plan_for(cfg.guest)
    logger.info("KV-Runahead: TP layout's plan per GPU (est.): %s", plan.line())
    if plan.kv_tokens >= mc.max_model_len:
        return
    change = ("Lower --max-model-len or --max-num-batched-tokens, raise --gpu-memory-utilization, use more GPUs "
              "(a larger --tensor-parallel-size), or serve it with plain --tensor-parallel-size without "
              "--worker-cls (models beyond one GPU: docs/guest-beyond-one-gpu.md)")
    short = f"per GPU (est.) {plan.line()}, fewer than --max-model-len {mc.max_model_len}."
    if cfg.guest == PEER_GUEST:
        raise ValueError(
            f'KV-Runahead: the TP layout with guest "{PEER_GUEST}" does not fit {mc.model} on this GPU: every '
            f"rank holds vLLM's 1/{n} shard ({plan.vllm_weights / GIB:.1f} GiB) and its guest's {PEER_LAYERS} "
            f"gathered layers, embedding and norms ({plan.guest_weights / GIB:.1f} GiB); {short} {change}")
    peer = plan_for(PEER_GUEST)
    setting = f"""--additional-config '{{"kv_runahead": {{"guest": "{PEER_GUEST}"}}}}'"""
    peer_kv = (f"guest's weights {peer.guest_weights / GIB:.1f} GiB instead of {plan.guest_weights / GIB:.1f}, "
               f"KV {peer.kv / GIB:.1f} GiB ({peer.kv_tokens} tokens) per GPU (est.)")
    if peer.kv_tokens >= mc.max_model_len:
        what = (f'With guest "{PEER_GUEST}" (each decoder layer gathered from the ranks\' TP shards just before '
                f"it runs: docs/guest-beyond-one-gpu.md) it fits: {peer_kv}; set {setting}, or serve it with "
                "plain --tensor-parallel-size without --worker-cls")
    else:
        what = f'Guest "{PEER_GUEST}" ({setting}) would not fit either: {peer_kv}. {change}'
    raise ValueError(
        f"KV-Runahead: the TP layout does not fit {mc.model} on this GPU: every rank holds the full model as its "
        f"guest ({plan.guest_weights / GIB:.1f} GiB) beside vLLM's 1/{n} shard; {short} {what}")


def convert(vllm_config) -> None:
    pc = vllm_config.parallel_config
    mode = flags_mode(pc.worker_cls, pc.prefill_context_parallel_size, pc.tensor_parallel_size)
    if mode is None:
        return
    extra = vllm_config.additional_config
    if isinstance(extra, dict) and isinstance(extra.get(ADDITIONAL_CONFIG_KEY), dict) \
            and "num_workers" in extra[ADDITIONAL_CONFIG_KEY]:
        return  # converted already (a config copied after post-init)
    # TP layout: vLLM runs plain TP=N and every rank adds the full model for the runahead prefill
    n = flags_workers(mode, pc.prefill_context_parallel_size, pc.tensor_parallel_size)
    cfg = KVRunaheadConfig.from_dict(n, (extra or {}).get(ADDITIONAL_CONFIG_KEY), mode)
    if mode != OFF:
        check_not_replaced()
        check_supported(vllm_config, cfg)
    if mode == COPIES:
        # world_size (= S x T) was computed with it and stays; vLLM then lays the ranks out as
        # [S, DP=1, PP=1, PCP=1, TP] (parallel_state.initialize_model_parallel): the same TP groups
        # as TP x PCP, one per stage, with none of PCP's MLA-only paths
        pc.prefill_context_parallel_size = 1
    if vllm_config.additional_config is None:
        vllm_config.additional_config = {}
    vllm_config.additional_config[ADDITIONAL_CONFIG_KEY] = cfg.to_dict()


def _apply() -> None:
    from vllm.config import VllmConfig

    def make(orig):
        def __post_init__(self, *args, **kwargs):
            convert(self)
            return orig(self, *args, **kwargs)
        return __post_init__

    wrap_method(VllmConfig, "__post_init__", make)


PATCH = Patch(
    name="pcp-flag-starts-kvrunahead-workers",
    symbol="vllm.config.VllmConfig.__post_init__",
    why="A plugin cannot change how many workers vLLM starts; --prefill-context-parallel-size is the "
        "flag that starts N full-model workers, but vLLM's own PCP machinery (MLA-only) must then stay off.",
    how="Wraps __post_init__: for worker_cls vllm_kvrunahead.*, validates, keeps world_size=N x TP, sets "
        "PCP back to 1 and stores the worker (stage) count in additional_config['kv_runahead']. With "
        "--tensor-parallel-size T, vLLM's TP groups stay one per stage (TP is the innermost rank dimension "
        "with or without PCP); only its PCP groups shrink to single ranks, which the chain does not use.",
    upstream="Not upstream. vLLM has no plugin hook for the worker count; a generic "
             "'world size from worker class' hook or dense-model PCP would make this unnecessary. "
             "0.32.0 refuses PCP > 1 later in the same __post_init__ (model runner V1, the CPU runner: "
             "'Model Runner V1 does not support: prefill context parallel'; model runner V2's "
             "PCPManager.validate_config refuses dense models); this wrapper sets PCP back to 1 before "
             "either check runs, so both releases take it unchanged.",
    remove_when="vLLM's PCP supports dense (non-MLA) models with pluggable KV exchange, or exposes a "
                "hook for plugins to size the worker pool.",
    apply=_apply,
)
