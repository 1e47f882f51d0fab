"""The TP layout's rank set-up around its traffic (fast, no engine): the comm arena is allocated once, before
vLLM measures its KV budget, and left out of it; the arena's size for Llama-3-8B; CUDA's hardware queues."""
import math
import os
from types import SimpleNamespace

import pytest

GIB = 2**30


def fake_guest(page_size_bytes, block_size, layers, budget, max_model_len, calls):
    group = SimpleNamespace(kv_cache_spec=SimpleNamespace(page_size_bytes=page_size_bytes, block_size=block_size),
                            layer_names=[f"model.layers.{i}.self_attn.attn" for i in range(layers)])
    return SimpleNamespace(
        kv_cache_config=SimpleNamespace(kv_cache_groups=[group]),
        config=SimpleNamespace(scheduler_config=SimpleNamespace(max_num_batched_tokens=budget),
                               model_config=SimpleNamespace(max_model_len=max_model_len)),
        allocate_scratch=lambda cache_config: calls.append("scratch"),
        profile=lambda: calls.append("profile") or 1000,
        reserved_bytes=lambda: 5000)


def test_the_arena_is_allocated_before_vllm_measures_and_left_out_of_the_kv_budget(monkeypatch):
    """GPU accounting (vLLM's profile counts neither the guest nor the arena, both allocated before it):
    vLLM's KV budget is what it measured less the guest's weights and scratch, its activation peak and
    the arena, which is there, whole, when vLLM measures; its bytes are comm_buffer_bytes' total."""
    from vllm_kvrunahead.core.tp_order import comm_buffer_bytes
    from vllm_kvrunahead.core.tp_step import MAX_CHUNKS
    from vllm_kvrunahead.vllm_side import guest as guest_mod

    monkeypatch.setattr(guest_mod, "current_platform", SimpleNamespace(is_cpu=lambda: False))
    calls = []
    host = guest_mod.GuestHost()
    host.n, host.total_kv_heads, host.device = 4, 4, "cpu"
    # 2 layers, 4 KV heads of 8 values, fp32, blocks of 16: a page is K and V of 16 tokens
    host.guest = fake_guest(2 * 16 * 4 * 8 * 4, 16, 2, budget=1024, max_model_len=4096, calls=calls)

    def measure():
        calls.append(("measure", host.arena.nbytes))
        return 10**9

    left = host.kv_bytes_left(measure, SimpleNamespace(kv_cache_memory_bytes=None))
    want = comm_buffer_bytes(n=4, layers=2, kv_bytes_per_token_layer=2 * 4 * 8 * 4, total_kv_heads=4,
                             step_budget=1024, max_model_len=4096, block_size=16, max_chunks=MAX_CHUNKS)
    assert host.arena.nbytes == want.total > 0
    assert {name: (len(ts), ts[0].numel()) for name, ts in host.arena.slots.items()} == want.slots
    assert calls == ["scratch", "profile", ("measure", want.total)]
    assert left == 10**9 - 5000 - 1000 - want.total


def test_the_arena_of_llama3_8b():
    """Llama-3-8B (32 layers, 8 KV heads of 128, bf16: a 16-token page is 64 KiB), vLLM's 16k step
    budget, max_model_len 128k, MAX_CHUNKS chunks a step, through the guest's KV spec:

        GiB per rank   chain   shards   gather   total
        N=4            0.254   0.128    1.25     1.632
        N=8            0.254   0.128    1.375    1.757
    """
    from vllm_kvrunahead.vllm_side.guest import comm_bytes

    guest = fake_guest(2 * 16 * 8 * 128 * 2, 16, 32, budget=16384, max_model_len=131072, calls=[])
    four, eight = comm_bytes(guest, 4, 8), comm_bytes(guest, 8, 8)
    assert four.chain / GIB == pytest.approx(0.254, abs=1e-3) and four.shards / GIB == pytest.approx(0.128, abs=1e-3)
    assert four.gather / GIB == pytest.approx(1.25) and eight.gather / GIB == pytest.approx(1.375)
    assert four.total / GIB == pytest.approx(1.632, abs=1e-3) and eight.total / GIB == pytest.approx(1.757, abs=1e-3)
    # what one slot of each holds: the gather's receive slots are the KV heads a rank lacks of 128k tokens
    assert eight.slots["gather_recv"] == (2, 7 * 131072 * 4096 // 8) and eight.slots["gather_stage"] == (8, 2**26)
    assert math.isclose(sum(c * b for c, b in eight.slots.values()), eight.total)


@pytest.mark.parametrize("mode, preset, want", [
    ("tp_layout", None, "32"),      # a hardware queue per stream: vLLM's, 2 side streams, 4 communicators'
    ("tp_layout", "8", "8"),        # the user's setting stays
    ("copies", None, None),         # the chain of copies: CUDA's default
])
def test_the_tp_layout_gives_its_streams_hardware_queues_before_cuda_starts(monkeypatch, mode, preset, want):
    from vllm_kvrunahead.worker import set_hardware_queues

    if preset is None:
        monkeypatch.delenv("CUDA_DEVICE_MAX_CONNECTIONS", raising=False)
    else:
        monkeypatch.setenv("CUDA_DEVICE_MAX_CONNECTIONS", preset)
    set_hardware_queues(SimpleNamespace(mode=mode))
    assert os.environ.get("CUDA_DEVICE_MAX_CONNECTIONS") == want
