"""KV-Runahead x tensor parallel on CPU: S=2 runahead stages of T=2 TP ranks (4 processes).

Compared with one worker (TP=1, one process) and with plain vLLM TP=2, on the tiny engines' prompts
(tests/specs.py): greedy tokens (prompts one by one, chunked prompts, a prefix-cache hit, concurrent
prefill + decode steps) and the head stage's KV per TP rank, which must equal plain TP=2's rank for rank
(each rank holds its own KV heads). The tiny model has 2 KV heads (MHA), so each TP rank holds a different
one. How vLLM lays out stages of T=3 (SmolLM2's 3 KV heads) is checked on the config and the topology
(tests/test_plugin_and_config.py, tests/test_chain.py): the chains are per TP rank whatever T is.
"""
import pytest
import torch

from tests.specs import ALONE_LENGTHS, BS, HIT, tiny

LENGTHS = ALONE_LENGTHS


@pytest.fixture(scope="module")
def runs(engines, tiny_ref):
    return {"one": tiny_ref, "tp2": tiny(engines, 1, 2), "s2t2": tiny(engines, 2, 2)}


def test_s2_t2_tokens_equal_one_worker_and_plain_tp2(runs):
    one, tp2, run = runs["one"], runs["tp2"], runs["s2t2"]
    assert run["alone"] == tp2["alone"] == one["alone"]
    assert run["batch"] == tp2["batch"] == one["batch"]   # concurrent: mixed prefill + decode steps
    for got, want in zip(run["logprobs"], tp2["logprobs"], strict=True):
        torch.testing.assert_close(torch.tensor(got), torch.tensor(want), atol=1e-4, rtol=0)
    # the last prompt hit the cache (HIT tokens of the 2500-token prompt's whole blocks)
    assert run["cached"] == tp2["cached"] == one["cached"] and run["cached"][-1] == HIT // BS * BS


def test_s2_t2_head_kv_equals_plain_tp2_per_rank_and_one_worker(runs):
    one, tp2, run = runs["one"], runs["tp2"], runs["s2t2"]
    for n, kv, ref, full in zip(LENGTHS, run["kv"], tp2["kv"], one["kv"], strict=True):
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
    assert head["chunks_ahead"] >= 3 + 2 + 1   # 2500 (3 chunks), 1027 (2), 300
    ahead = dict(zip(LENGTHS, runs["s2t2"]["ahead"]))
    # the chunked prompt: all 3 chunks ran on the chains, the later two after the head's cached prefix
    assert (ahead[2500]["chunks_ahead"], ahead[2500]["chunks_ahead_cached"], ahead[2500]["tokens_ahead"]) == (3, 2, 2500)
    # after the prefix-cache hit: its new tokens ran on the chains, after the cached prefix
    assert (ahead[HIT + 300]["chunks_ahead"], ahead[HIT + 300]["chunks_ahead_cached"]) == (1, 1)
    # one plan on every rank; every rank moved KV on its own chain; both TP ranks of a stage computed
    # the same tokens and moved the same bytes (each its own KV head)
    assert all(s["chunks_ahead"] == head["chunks_ahead"] for s in stats)
    for a, b in ((stats[0], stats[1]), (stats[2], stats[3])):
        for k in ("tokens_run", "steps_run", "blocks_sent", "blocks_received", "bytes_sent"):
            assert a[k] == b[k], k
    assert stats[0]["blocks_sent"] > 0 and stats[2]["blocks_received"] > 0
    assert all(s["live_requests"] == 0 for s in stats)
