"""Issue 22, TP layout (docs/decode-design.md): vLLM runs plain TP=N with KV-Runahead's worker; every rank
runs its guest's segment of each cold chunk, keeps its KV heads in vLLM's paged cache, and vLLM's TP model
computes the chunk's last token, samples and decodes on every rank.

Against one worker and plain TP=2 (the engines tests/test_tp_e2e.py starts, shared in one session), the tiny
model with 2 KV heads (each TP rank holds one): prompts one by one (1027 and 2500 are chunked at budget
1000: their first chunk runs ahead, the later ones are prefilled by the TP model), then concurrent prefill
and decode steps.
"""
import pytest
import torch

from tests.test_tp_e2e import LENGTHS, tp_spec
from tests.test_vllm_e2e import BS, BUDGET

# fp32. The guest computes KV with one worker's numerics (its layers see one worker's hidden states), vLLM's
# TP model with TP's (its all-reduce sums in another order): plain TP=2's logprobs differ from one
# worker's by up to ~5e-7 here.
LOGPROB_TOL = 1e-6


def layout_spec():
    return {**tp_spec(1, 2), "decode": "tp"}


@pytest.fixture(scope="module")
def runs(engines):
    out = {name: engines.get(f"tiny-kv2-{name}", tp_spec(w, t))
           for name, (w, t) in {"one": (1, 1), "tp2": (1, 2)}.items()}
    out["layout"] = engines.get("tiny-kv2-tplayout", layout_spec())
    return out


def test_tp_layout_tokens_and_logprobs_equal_one_worker_and_plain_tp2(runs):
    one, tp2, run = runs["one"], runs["tp2"], runs["layout"]
    assert run["alone"] == tp2["alone"] == one["alone"]
    assert run["batch"] == tp2["batch"] == one["batch"]
    for ref in (tp2, one):
        for got, want in zip(run["logprobs"], ref["logprobs"], strict=True):
            torch.testing.assert_close(torch.tensor(got), torch.tensor(want), atol=LOGPROB_TOL, rtol=0)


def test_tp_layout_every_rank_holds_its_kv_head_of_one_worker_and_plain_tp2(runs):
    one, tp2, run = runs["one"], runs["tp2"], runs["layout"]
    for n, kv, ref, full in zip(LENGTHS, run["kv"], tp2["kv"], one["kv"], strict=True):
        assert len(kv) == 2
        for r in range(2):
            for layer in range(2):
                a = kv[r][layer]
                assert a.shape[:2] == (n // BS, 1)
                # KV head r of one worker's cache, and plain TP=2's rank r. The guests computed the blocks
                # before g (the first chunk but its last token), vLLM's TP model the rest. Layer 0's KV
                # comes straight from the embeddings: byte for byte one worker's where the guests made it
                # and TP's where TP did. Later layers see attention outputs, whose sums run in another
                # order when a segment's queries start after a prefix (chain) or heads are split (TP).
                g = (min(n, BUDGET) - 1) // BS
                mine = full[layer][:, r:r + 1]
                torch.testing.assert_close(a, mine, atol=1e-5, rtol=1e-5, msg=f"{n} rank {r} layer {layer}")
                torch.testing.assert_close(a, ref[r][layer], atol=1e-5, rtol=1e-5, msg=f"{n} rank {r} layer {layer}")
                if layer == 0:
                    assert torch.equal(a[:g].view(torch.uint8), mine[:g].view(torch.uint8)), (n, r)
                    assert torch.equal(a[g:].view(torch.uint8), ref[r][0][g:].view(torch.uint8)), (n, r)


def test_tp_layout_runs_cold_chunks_ahead_and_decodes_on_every_rank(runs):
    stats = runs["layout"]["stats"]
    assert [s["tp_rank"] for s in stats] == [0, 1] and all(s["decode"] == "tp" for s in stats)
    ahead = dict(zip(LENGTHS, runs["layout"]["ahead"]))
    assert ahead[2500]["chunks_ahead"] == 1 and ahead[300]["chunks_ahead"] == 1
    for s in stats:
        assert s["decode_tokens"] > 0 and s["guest_tokens"] > 0 and s["tp_tokens"] > 0
        assert s["chunks_on_tp"].get("after_cached", 0) >= 3   # 1027's second chunk, 2500's two
    assert stats[0]["chunks_ahead"] == stats[1]["chunks_ahead"] >= 4
    assert stats[0]["decode_tokens"] == stats[1]["decode_tokens"]
    assert stats[1]["blocks_sent"] > 0 and stats[0]["blocks_received"] > 0
