"""KV-Runahead x tensor parallel on CPU: S=2 runahead stages of T=2 TP ranks (4 processes).

Compared with one worker (TP=1, one process) and with plain vLLM TP=2: greedy tokens (prompts
one by one, a chunked prompt, concurrent prefill + decode steps) and the head stage's KV per TP
rank, which must equal plain TP=2's rank for rank (each rank holds its own KV heads).
The tiny model here has 2 KV heads (MHA), so each TP rank holds a different one.
"""
import pytest
import torch

from tests.models import tiny_llama
from tests.test_vllm_e2e import BS, TINY_ENGINE, rand_prompts

# 2500: three chunks at budget 1000 (later chunks start inside a block), each run ahead
LENGTHS = [2, 300, 1027, 2500]


def tp_spec(workers, tp):
    return dict(model=tiny_llama(kv_heads=2), workers=workers, tp=tp, block_size=BS, max_tokens=8,
                engine=TINY_ENGINE, kvr={"min_tokens": 0}, alone=rand_prompts(LENGTHS, 1),
                batch=rand_prompts(LENGTHS + [1500, 900], 2), kv_layers=[0, 1])


@pytest.fixture(scope="module")
def runs(engines):
    return {name: engines.get(f"tiny-kv2-{name}", tp_spec(w, t))
            for name, (w, t) in {"one": (1, 1), "tp2": (1, 2), "s2t2": (2, 2)}.items()}


def test_s2_t2_tokens_equal_one_worker_and_plain_tp2(runs):
    one, tp2, run = runs["one"], runs["tp2"], runs["s2t2"]
    assert run["alone"] == tp2["alone"] == one["alone"]
    assert run["batch"] == tp2["batch"] == one["batch"]   # concurrent: mixed prefill + decode steps
    for got, want in zip(run["logprobs"], tp2["logprobs"]):
        torch.testing.assert_close(torch.tensor(got), torch.tensor(want), atol=1e-4, rtol=0)


def test_s2_t2_head_kv_equals_plain_tp2_per_rank_and_one_worker(runs):
    one, tp2, run = runs["one"], runs["tp2"], runs["s2t2"]
    for n, kv, ref, full in zip(LENGTHS, run["kv"], tp2["kv"], one["kv"]):
        assert len(kv) == len(ref) == 2   # the head stage's two TP ranks
        for r in range(2):
            for layer, (a, b) in enumerate(zip(kv[r], ref[r])):
                assert a.shape == b.shape and a.shape[0] == n // BS
                torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5, msg=f"prompt {n}, TP rank {r}, layer {layer}")
        # TP rank r holds KV head r of one worker's cache (CPU layout: blocks, KV heads, ...)
        for layer in range(2):
            f = full[layer]
            assert f.shape[1] == 2 and kv[0][layer].shape[1] == 1
            for r in range(2):
                torch.testing.assert_close(kv[r][layer], f[:, r:r + 1], atol=1e-5, rtol=1e-5,
                                           msg=f"prompt {n}, TP rank {r}, layer {layer} vs one worker")


def test_s2_t2_chain_is_two_chains_one_per_tp_rank(runs):
    stats = runs["s2t2"]["stats"]
    assert [(s["rank"], s["position"], s["tp_rank"], s["returns_output"]) for s in stats] == [
        (0, 0, 0, False), (1, 0, 1, False), (2, 1, 0, True), (3, 1, 1, True)]
    # vLLM built its TP groups per stage, as for TP x PCP (TP innermost): [0, 1] and [2, 3]
    assert [s["tp_group"] for s in stats] == [[0, 1], [0, 1], [2, 3], [2, 3]]
    head = stats[2]
    assert head["chunks_ahead"] >= len(LENGTHS) + 2   # 2500 (3 chunks), 1027 (2), 300
    ahead = dict(zip(LENGTHS, runs["s2t2"]["ahead"]))
    # the chunked prompt: all 3 chunks ran on the chains, the later two after the head's cached prefix
    assert (ahead[2500]["chunks_ahead"], ahead[2500]["chunks_ahead_cached"], ahead[2500]["tokens_ahead"]) == (3, 2, 2500)
    # one plan on every rank; every rank moved KV on its own chain; both TP ranks of a stage computed
    # the same tokens and moved the same bytes (each its own KV head)
    assert all(s["chunks_ahead"] == head["chunks_ahead"] for s in stats)
    for a, b in ((stats[0], stats[1]), (stats[2], stats[3])):
        for k in ("tokens_run", "steps_run", "blocks_sent", "blocks_received", "bytes_sent"):
            assert a[k] == b[k], k
    assert stats[0]["blocks_sent"] > 0 and stats[2]["blocks_received"] > 0
    assert all(s["live_requests"] == 0 for s in stats)


def smol_tp_spec(workers, tp):
    """SmolLM2-135M has 9 query and 3 KV heads: TP=2 cannot shard it (vLLM refuses: 9 % 2), so its
    hybrid runs S=2 stages of T=3 (6 processes). A two-chunk prompt (budget 2048) with prefix caching
    on, then a second prompt whose prefix hits the cache; 10 decode steps each."""
    from tests.test_vllm_e2e import smol_prompts

    from tests.models import smollm2

    p = smol_prompts()
    return dict(model=smollm2(), workers=workers, tp=tp, block_size=BS, max_tokens=10,
                engine=dict(max_model_len=4096, max_num_batched_tokens=2048, block_size=BS,
                            enable_prefix_caching=True),
                kvr={"min_tokens": 512}, alone=[p[0], p[3]], batch=[], kv_layers=[0, 29])


@pytest.fixture(scope="module")
def smol_runs(engines):
    from tests.test_vllm_e2e import smol_spec

    runs = {name: engines.get(f"smol-tp-{name}", smol_tp_spec(w, t)) for name, (w, t) in {"tp3": (1, 3), "s2t3": (2, 3)}.items()}
    # one worker: test_vllm_e2e's SmolLM2 engine (same engine settings), which ran all four prompts
    # (p[0] .. p[3]: the two here are its first and last) and saved layers 0, 15 and 29
    runs["one"] = engines.get("smol-1", smol_spec(1))
    return runs


def test_smollm2_s2_t3_tokens_and_head_kv_equal_plain_tp3_and_one_worker(smol_runs):
    one, tp3, run = smol_runs["one"], smol_runs["tp3"], smol_runs["s2t3"]
    mine = [0, 3]    # one worker's prompts that this spec sends
    assert run["alone"] == tp3["alone"] == [one["alone"][i] for i in mine]
    assert run["cached"] == tp3["cached"] and run["cached"][-1] > 0   # the second prompt hit the cache
    for logprobs, ref in zip(run["logprobs"], tp3["logprobs"]):
        torch.testing.assert_close(torch.tensor(logprobs), torch.tensor(ref), atol=1e-3, rtol=0)
    for kv, ref, full in zip(run["kv"], tp3["kv"], [one["kv"][i] for i in mine]):
        full = [full[0], full[2]]   # layers 0 and 29 of one worker's 0, 15, 29
        assert len(kv) == len(ref) == 3
        for r in range(3):
            for layer in range(2):
                torch.testing.assert_close(kv[r][layer], ref[r][layer], atol=1e-4, rtol=1e-4)
                torch.testing.assert_close(kv[r][layer], full[layer][:, r:r + 1], atol=1e-4, rtol=1e-4)
    head = run["stats"][3]
    assert head["returns_output"] and head["tp_group"] == [3, 4, 5]
    assert head["chunks_ahead"] == 3 and head["chunks_ahead_cached"] == 2   # 2 chunks, then after the cache
