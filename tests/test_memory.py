"""The TP layout's memory plan per GPU (core/memory.py) and its refusal at config time, before any weights load."""
from types import SimpleNamespace

import pytest
import torch

from vllm_kvrunahead.core.memory import (GIB, PEER_LAYERS, guest_weight_bytes, layer_linear_bytes, tp_layout_plan,
                                         weight_bytes)
from vllm_kvrunahead.core.partition import ModelShape

LLAMA3_8B = ModelShape(layers=32, hidden=4096, heads=32, kv_heads=8, intermediate=14336, head_dim=128)
LLAMA3_70B = ModelShape(layers=80, hidden=8192, heads=64, kv_heads=8, intermediate=28672, head_dim=128)
H200, H100 = int(139.8 * GIB), int(79.2 * GIB)  # what vLLM reports of the cards (gpu_guest_segments.log)


def plan(shape=LLAMA3_8B, n=1, budget=16384, max_len=131072, gpu=H200, util=0.85, guest="full"):
    return tp_layout_plan(shape, vocab=128256, tied=False, n=n, dtype_bytes=2, step_budget=budget,
                          max_model_len=max_len, block_size=16, gpu_bytes=gpu, utilization=util, guest=guest)


def test_weights_are_the_checkpoints():
    assert weight_bytes(LLAMA3_8B, 128256, False, 2) / GIB == pytest.approx(14.96, abs=0.01)   # measured: 14.96
    assert weight_bytes(LLAMA3_70B, 128256, False, 2) / GIB == pytest.approx(131.4, abs=0.1)


@pytest.mark.parametrize("budget, max_len, measured", [(16384, 131072, 689_104), (65536, 65600, 610_256)])
def test_plan_reproduces_the_one_gpu_run(budget, max_len, measured):
    """One H200, util 0.85, the guest beside vLLM's runner (benchmarks/results/gpu_smoke/guest_segments/)."""
    p = plan(budget=budget, max_len=max_len)
    assert 0.96 * measured < p.kv_tokens < measured   # an estimate, on the safe side
    assert p.guest_weights == p.vllm_weights and p.comm == 0   # one rank: no peers, no comm buffers


@pytest.mark.parametrize("budget, max_len, measured", [(16384, 131072, 267_152), (65536, 65600, 188_288)])
def test_plan_is_on_the_safe_side_on_one_h100(budget, max_len, measured):
    """One H100, util 0.85 (benchmarks/results/gpu_smoke/guest_segments_h100/): within 10%, never above."""
    assert 0.90 * measured < plan(budget=budget, max_len=max_len, gpu=H100).kv_tokens < measured


def test_plan_counts_the_comm_arena_a_rank_allocates():
    """The arena of a rank of N=4 at a 64k budget, allocated on one H100 (self_and_arena.json): 2,289,696,768
    bytes, and vLLM's KV lost 17,472 tokens (2 MiB blocks of 16) for it."""
    arena = plan(n=4, budget=65536, max_len=65600, gpu=H100).comm
    assert arena == 2_289_696_768
    assert 17_472 // 16 == -(-arena // (16 * 128 * 1024))   # the KV blocks it cost: its bytes, rounded up


def test_a_model_beyond_one_gpu_has_no_kv_left():
    p = plan(LLAMA3_70B, n=8, util=0.9)
    assert p.kv < 0 and p.kv_tokens == 0
    four = plan(n=4, gpu=H100, util=0.9)
    assert four.vllm_weights == four.guest_weights // 4 and four.comm > 0 and four.kv_tokens > 1_000_000


def model_config(shape: ModelShape, max_len: int):
    hf = SimpleNamespace(num_hidden_layers=shape.layers, hidden_size=shape.hidden,
                         num_attention_heads=shape.heads, intermediate_size=shape.intermediate,
                         tie_word_embeddings=False)
    return SimpleNamespace(model="llama-70b", hf_text_config=hf, max_model_len=max_len, dtype=torch.bfloat16,
                           get_total_num_kv_heads=lambda: shape.kv_heads, get_head_size=lambda: shape.head_dim,
                           get_vocab_size=lambda: 128256, is_encoder_decoder=False, use_mla=False,
                           runner_type="generate", is_hybrid=False, is_attention_free=False)


def tp_config(shape, max_len=131072, n=8):
    return SimpleNamespace(
        model_config=model_config(shape, max_len), speculative_config=None, kv_transfer_config=None,
        parallel_config=SimpleNamespace(tensor_parallel_size=n, pipeline_parallel_size=1, data_parallel_size=1,
                                        decode_context_parallel_size=1, distributed_executor_backend="mp",
                                        nnodes=1),
        cache_config=SimpleNamespace(block_size=16, gpu_memory_utilization=0.9),
        scheduler_config=SimpleNamespace(max_num_batched_tokens=16384))


@pytest.fixture
def gpu(monkeypatch):
    """A CUDA platform with 141 GB cards, as the config hook sees one (no GPU here)."""
    from vllm.platforms import current_platform

    from vllm_kvrunahead.vllm_side import seam

    monkeypatch.setattr(type(current_platform), "is_cuda_alike", lambda self=None: True, raising=False)
    monkeypatch.setattr(seam, "gpu_memory_bytes", lambda device=0: H200)


def test_the_tp_layout_refuses_a_model_that_cannot_fit_with_its_plan(gpu):
    from vllm_kvrunahead.config import KVRunaheadConfig
    from vllm_kvrunahead.vllm_side.patches.config_hook import check_supported

    with pytest.raises(ValueError, match=r"the TP layout does not fit llama-70b on this GPU: every rank holds the full "
                                         r"model as its guest \(131.4 GiB\) beside vLLM's 1/8 shard; .* KV -\d+\.\d GiB "
                                         r"\(0 tokens\), fewer than --max-model-len 131072\. With guest \"peer\" "):
        check_supported(tp_config(LLAMA3_70B), KVRunaheadConfig(num_workers=8, mode="tp_layout"))


def test_a_model_that_fits_logs_its_plan(gpu, kvr_log):
    import logging

    from vllm_kvrunahead.log import LOGGER_NAME

    from vllm_kvrunahead.config import KVRunaheadConfig
    from vllm_kvrunahead.vllm_side.patches.config_hook import check_supported

    with kvr_log.at_level(logging.INFO, logger=LOGGER_NAME):
        check_supported(tp_config(LLAMA3_8B, n=4), KVRunaheadConfig(num_workers=4, mode="tp_layout"))
    assert any("TP layout's plan per GPU (est.): 125.8 GiB usable = vLLM's weights 3.7 + guest's weights 15.0 + "
               "scratch 1.0 + activation peak 2.7"
               in r.getMessage() for r in kvr_log.records), kvr_log.text


def test_the_peer_guest_holds_three_layers_the_embedding_and_the_norms():
    """Llama-3-70B (docs/guest-beyond-one-gpu.md section 1: 855.65M parameters a layer, the embedding 1.957 GiB):
    the peer guest's ring of 2 slots + 1 staging layer, the full embedding, the final norm and every layer's two
    norms; no LM head."""
    h, layers = 8192, 80
    per_layer = h * 64 * 128 + h * 2 * 8 * 128 + 64 * 128 * h + 3 * h * 28672 + 2 * h
    assert per_layer / 1e6 == pytest.approx(855.65, abs=0.01)
    linear = 2 * (per_layer - 2 * h)
    assert linear / GIB == pytest.approx(1.594, abs=0.001) and layer_linear_bytes(LLAMA3_70B, 2) == linear
    embedding = 2 * 128256 * h
    assert embedding / GIB == pytest.approx(1.957, abs=0.001)
    expected = 3 * linear + embedding + 2 * h + 2 * (2 * h * layers)
    assert PEER_LAYERS == 3 and guest_weight_bytes(LLAMA3_70B, 128256, False, 2, "peer") == expected
    assert guest_weight_bytes(LLAMA3_70B, 128256, True, 2, "peer") == expected   # a tied head is the embedding
    assert guest_weight_bytes(LLAMA3_70B, 128256, False, 2, "full") == weight_bytes(LLAMA3_70B, 128256, False, 2)
    with pytest.raises(ValueError, match="unknown guest 'half'"):
        guest_weight_bytes(LLAMA3_70B, 128256, False, 2, "half")
    peer, full = plan(LLAMA3_70B, n=8, gpu=H100, util=0.9, guest="peer"), plan(LLAMA3_70B, n=8, gpu=H100, util=0.9)
    assert peer.guest_weights == expected and peer.vllm_weights == full.vllm_weights
    # the rest of the plan is the full guest's: only the weights it holds differ
    assert (peer.scratch, peer.activation_peak, peer.comm, peer.extras) == \
        (full.scratch, full.activation_peak, full.comm, full.extras)
    assert peer.kv == full.kv + full.guest_weights - expected and peer.kv_tokens > 131072 > full.kv_tokens
    assert "guest's weights (peer: 3 layers + embedding) 6.7 + " in peer.line()


@pytest.fixture
def gpu_size(gpu, monkeypatch):
    """Sets the fake cards' size (bytes) as the config hook sees it."""
    from vllm_kvrunahead.vllm_side import seam

    return lambda size: monkeypatch.setattr(seam, "gpu_memory_bytes", lambda device=0: size)


def test_70b_on_eight_h100s_is_refused_with_the_full_guest_naming_the_peer_guests_kv(gpu_size):
    from vllm_kvrunahead.config import KVRunaheadConfig
    from vllm_kvrunahead.vllm_side.patches.config_hook import check_supported

    gpu_size(H100)
    peer = plan(LLAMA3_70B, n=8, gpu=H100, util=0.9, guest="peer")
    with pytest.raises(ValueError, match=(
            r"does not fit llama-70b on this GPU: every rank holds the full model as its guest \(131\.4 GiB\) "
            r"beside vLLM's 1/8 shard; .* KV -\d+\.\d GiB \(0 tokens\), fewer than --max-model-len 131072\. "
            r"With guest \"peer\" .* it fits: guest's weights 6\.7 GiB instead of 131\.4, "
            rf"KV {peer.kv / GIB:.1f} GiB \({peer.kv_tokens} tokens\) per GPU \(est\.\); set --additional-config "
            r"'\{\"kv_runahead\": \{\"guest\": \"peer\"\}\}'")):
        check_supported(tp_config(LLAMA3_70B), KVRunaheadConfig(num_workers=8, mode="tp_layout"))


def test_70b_on_eight_h100s_fits_with_the_peer_guest_and_logs_its_plan(gpu_size, kvr_log):
    import logging

    from vllm_kvrunahead.config import KVRunaheadConfig
    from vllm_kvrunahead.log import LOGGER_NAME
    from vllm_kvrunahead.vllm_side.patches.config_hook import check_supported

    gpu_size(H100)
    peer = plan(LLAMA3_70B, n=8, gpu=H100, util=0.9, guest="peer")
    with kvr_log.at_level(logging.INFO, logger=LOGGER_NAME):
        check_supported(tp_config(LLAMA3_70B), KVRunaheadConfig.from_dict(8, {"guest": "peer"}, "tp_layout"))
    assert any(f"TP layout's plan per GPU (est.): {peer.line()}" in r.getMessage() for r in kvr_log.records), \
        kvr_log.text
    assert "guest's weights (peer: 3 layers + embedding) 6.7" in peer.line() and peer.kv_tokens > 131072


def test_a_gpu_too_small_for_the_peer_guest_too_is_refused_with_what_to_change(gpu_size):
    from vllm_kvrunahead.config import KVRunaheadConfig
    from vllm_kvrunahead.vllm_side.patches.config_hook import check_supported

    small = 32 * GIB   # 28.8 GiB usable: vLLM's 16.4 GiB shard, the peer guest's 6.7 GiB and the rest leave no KV
    gpu_size(small)
    peer = plan(LLAMA3_70B, n=8, gpu=small, util=0.9, guest="peer")
    assert peer.kv_tokens < 131072
    what = (r"fewer than --max-model-len 131072\. Lower --max-model-len or --max-num-batched-tokens, raise "
            r"--gpu-memory-utilization, use more GPUs .* or serve it with plain --tensor-parallel-size without "
            r"--worker-cls")
    with pytest.raises(ValueError, match=(
            r"the TP layout with guest \"peer\" does not fit llama-70b on this GPU: every rank holds vLLM's 1/8 "
            r"shard \(16\.4 GiB\) and its guest's 3 gathered layers, embedding and norms \(6\.7 GiB\); per GPU "
            rf"\(est\.\) 28\.8 GiB usable = .* KV {peer.kv / GIB:.1f} GiB \({max(peer.kv_tokens, 0)} tokens\), "
            + what)):
        check_supported(tp_config(LLAMA3_70B), KVRunaheadConfig.from_dict(8, {"guest": "peer"}, "tp_layout"))
    with pytest.raises(ValueError, match=(   # the full guest's error: the peer guest's numbers, then the same advice
            r"the TP layout does not fit llama-70b .* Guest \"peer\" \(--additional-config .*\) would not fit "
            rf"either: guest's weights 6\.7 GiB instead of 131\.4, KV {peer.kv / GIB:.1f} GiB "
            rf"\({peer.kv_tokens} tokens\) per GPU \(est\.\)\. Lower --max-model-len")):
        check_supported(tp_config(LLAMA3_70B), KVRunaheadConfig(num_workers=8, mode="tp_layout"))
