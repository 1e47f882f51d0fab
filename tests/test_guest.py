"""Issue 22, step 1: a guest (the full model under a one-rank TP group, vllm_kvrunahead/guest.py) on every
rank of a plain TP=2 vLLM engine (tests/guest_worker.py), against plain TP=1 and plain TP=2 engines.

Three engines (tests/guest_runner.py), the tiny model with 2 KV heads (each TP rank holds one):
- the guest's next-token logprobs over the whole vocabulary equal one worker's, on each rank;
- the engine's own tokens, logprobs, prefix-cache hits and KV bytes equal plain TP=2's: the guest runs
  between requests whose cached KV is read afterwards, and does not disturb vLLM's model, cache or sampling;
- what the guest holds (its full weights and its scratch KV) is reported for the KV budget to subtract.
"""
import json
import math
import random
from pathlib import Path

import pytest
import torch

from tests.models import tiny_llama
from vllm_kvrunahead.guest import kv_bytes_left

BS = 128
MAX_LEN = 2048
VOCAB = 512
# fp32, the same weights: measured 0.0 between the guest and one worker; plain TP=2 differs from one
# worker by 4.8e-7 (its all-reduce sums in another order), so which group the guest ran under is shown by
# the report (its ranks, its weight bytes), not by this tolerance.
LOGPROB_TOL = 1e-6


def guest_spec(tp: int, guest: bool) -> dict:
    rng = random.Random(5)

    def prompt(n):
        return [rng.randrange(VOCAB) for _ in range(n)]

    alone = [prompt(300), prompt(700)]
    return dict(model=tiny_llama(kv_heads=2), tp=tp, guest=guest, vocab=VOCAB, max_tokens=8,
                engine=dict(max_model_len=MAX_LEN, max_num_batched_tokens=1024, block_size=BS,
                            enable_prefix_caching=True),
                # 1 token; shorter than a block; just past one; several blocks
                probes=[prompt(1), prompt(7), prompt(130), prompt(600)],
                alone=alone,
                # after the guest ran: two prompts that hit the cached blocks of the alone prompts, one cold
                after=[alone[0] + prompt(50), alone[1][:512] + prompt(200), prompt(90)])


@pytest.fixture(scope="module")
def runs(engines):
    return {name: engines.get(f"guest-{name}", guest_spec(tp, guest), runner="tests.guest_runner")
            for name, (tp, guest) in {"tp1": (1, False), "tp2": (2, False), "guest": (2, True)}.items()}


def test_guest_logprobs_equal_one_worker_on_every_rank(runs):
    one, run = runs["tp1"], runs["guest"]
    assert len(run["guest"]) == 2
    for rank, probes in enumerate(run["guest"]):
        assert len(probes) == len(one["probes"])
        for i, ((token, got), (ref_token, ref)) in enumerate(zip(probes, one["probes"])):
            got = torch.tensor(got)
            assert token == ref_token, f"rank {rank}, probe {i}"
            assert not got.isnan().any() and not torch.from_numpy(ref).isnan().any()  # the whole vocabulary
            torch.testing.assert_close(got, torch.from_numpy(ref), atol=LOGPROB_TOL, rtol=0,
                                       msg=f"rank {rank}, probe {i}")


def test_guest_runs_under_its_own_one_rank_group_and_layers(runs):
    for rank, rep in enumerate(runs["guest"]["report"]):
        assert rep["guest_tp_ranks"] == [rank]      # its one-rank group
        assert rep["vllm_tp_ranks"] == [0, 1]       # vLLM's TP group is back in place after the guest's calls
        # the same layer names, each model in its own forward context (no "Duplicate layer name")
        assert rep["guest_layers"] == rep["vllm_layers"] == [f"model.layers.{i}.self_attn.attn" for i in range(2)]


def test_engine_with_guest_equals_plain_tp2(runs):
    tp2, run = runs["tp2"], runs["guest"]
    for key in ("alone", "after"):
        for got, want in zip(run[key], tp2[key], strict=True):
            assert got["tokens"] == want["tokens"] and got["cached"] == want["cached"]
            torch.testing.assert_close(torch.tensor(got["logprobs"]), torch.tensor(want["logprobs"]),
                                       atol=LOGPROB_TOL, rtol=0)
    # the prompts sent after the guest ran read KV that vLLM cached before it (whole blocks)
    assert [a["cached"] for a in run["after"]] == [256, 512, 0]
    for (token, got), (ref_token, ref) in zip(run["probes"], tp2["probes"], strict=True):
        assert token == ref_token
        torch.testing.assert_close(torch.from_numpy(got), torch.from_numpy(ref), atol=LOGPROB_TOL, rtol=0)
    # every rank's KV of the alone prompts' whole blocks, read at the end: byte for byte plain TP=2's
    lengths = [len(p) for p in guest_spec(2, True)["alone"]]
    for n, got, want in zip(lengths, run["kv"], tp2["kv"], strict=True):
        for rank in range(2):
            for layer, (a, b) in enumerate(zip(got[rank], want[rank], strict=True)):
                assert a.shape[:2] == (n // BS, 1)   # whole blocks, one KV head per rank
                assert torch.equal(a.view(torch.uint8), b.view(torch.uint8)), f"prompt {n} rank {rank} layer {layer}"


def checkpoint_bytes(model_dir: str) -> int:
    from safetensors import safe_open

    total = 0
    with safe_open(str(Path(model_dir) / "model.safetensors"), "pt") as f:
        for k in f.keys():
            t = f.get_slice(k)
            total += math.prod(t.get_shape()) * 4  # fp32
    return total


def test_guest_memory_is_reported_and_vllm_kv_untouched(runs):
    run, tp2 = runs["guest"], runs["tp2"]
    cfg = json.loads((Path(tiny_llama(kv_heads=2)) / "config.json").read_text())
    head_dim = cfg["hidden_size"] // cfg["num_attention_heads"]
    # the scratch: one tensor (ring 1) for one request of max_model_len tokens, with every KV head
    page = BS * cfg["num_key_value_heads"] * head_dim * 2 * 4  # K and V, fp32
    scratch = math.ceil(MAX_LEN / BS) * page
    full = checkpoint_bytes(tiny_llama(kv_heads=2))
    for rank, rep in enumerate(run["report"]):
        assert rep["weights"] == full, rank                     # the whole model, not a TP shard
        # vLLM's own model on this rank: the TP=2 shard (all but the norms halved)
        assert full // 2 < rep["vllm_weights"] < full, rank
        assert rep["rope_shared"]   # so the guest's weights leave its rotary cache out: it is vLLM's
        assert rep["scratch_regions"] == 1 and rep["scratch_blocks"] == MAX_LEN // BS  # both layers, same bytes
        assert rep["scratch"] == scratch, rank
        assert rep["reserved"] == rep["weights"] + rep["scratch"]
    # VLLM_CPU_KVCACHE_SPACE fixes vLLM's KV space: the guest comes on top, and vLLM's blocks stay
    assert run["kv_blocks"] == tp2["kv_blocks"]


class _Cache:
    def __init__(self, explicit):
        self.kv_cache_memory_bytes = explicit


@pytest.mark.parametrize("explicit, rss_counted, left", [
    (None, False, 1000 - 300),   # GPU profile: counts vLLM's own weights only, so the guest is subtracted
    (None, True, 1000),          # CPU automatic: the process's RSS already holds the guest
    (1 << 30, False, 1000),      # explicit KV size: vLLM's layers get it, the guest comes on top
])
def test_kv_budget_subtracts_the_guest_where_vllm_does_not_count_it(explicit, rss_counted, left):
    assert kv_bytes_left(1000, 300, _Cache(explicit), rss_counted=rss_counted) == left
