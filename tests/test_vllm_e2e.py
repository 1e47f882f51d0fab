"""KV-Runahead inside vLLM on CPU (0.26.0; .ci/run runs the N=2 engines on 0.32.0 too), against plain vLLM
with one worker.

Each engine runs once per session in its own process (tests/engine_runner.py), one per (model, mode, N)
serving every test of that setting: the tiny model's engines take prompts one by one, at once, seeded, and
four rounds of requests sharing prefixes; tests compare greedy tokens and logprobs, the head's KV blocks,
the blocks chain positions hold, and per-worker accounting. The tiny model has 2 KV heads (MHA) so that
the TP engines of tests/test_tp_e2e.py and tests/test_tp_layout.py share these prompts and the one-worker
engine; SmolLM2 (GQA, 30 layers, real weights) is the chain's model with several query heads per KV head.
"""
import pytest
import torch

from tests.models import smollm2, tiny_llama
from tests.specs import ALONE_LENGTHS, BS, HIT, SHARED, TINY_ENGINE, TINY_LENGTHS, rand_prompts, tiny

def smol_prompts():
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(smollm2())
    text = open(torch.__file__.replace("__init__.py", "functional.py")).read()  # real English-ish text
    ids = tok.encode(text)
    doc = ids[:2900]
    q = tok.encode("\n\nSummarize the code above in one sentence:")
    other = ids[8000:9500]
    assert len(doc) == 2900 and len(other) == 1500
    # the last prompt shares the whole of the first (two chunks at budget 2048) and adds 800 tokens
    return [doc + q, ids[5000:5777], other + q, doc + q + ids[12000:12800] + q]


def smol_spec(workers):
    # prefix caching on (vLLM's default): the last prompt hits the cache for the first prompt's
    # whole blocks (a two-chunk prefix); its new tokens run ahead after that cached prefix.
    return dict(model=smollm2(), workers=workers, block_size=BS, max_tokens=10,
                engine=dict(max_model_len=4096, max_num_batched_tokens=2048, block_size=BS,
                            enable_prefix_caching=True),
                kvr={"min_tokens": 512}, alone=smol_prompts(), batch=[], kv_layers=[0, 15, 29])


@pytest.fixture(scope="session")
def smol_ref(engines):
    return engines.get("smol-1", smol_spec(1))


@pytest.mark.parametrize("workers", [2, 3])
def test_tiny_tokens_and_kv_equal_one_worker(engines, tiny_ref, workers):
    run = tiny(engines, workers)
    assert run["alone"] == tiny_ref["alone"]          # greedy tokens, prompts one by one
    assert run["batch"] == tiny_ref["batch"]          # concurrent: mixed prefill + decode steps
    for got, want in zip(run["logprobs"], tiny_ref["logprobs"], strict=True):
        torch.testing.assert_close(torch.tensor(got), torch.tensor(want), atol=1e-4, rtol=0)
    # the last prompt hit the cache for the 2500-token prompt's whole blocks of its first HIT tokens
    assert run["cached"] == tiny_ref["cached"] == [0] * len(TINY_LENGTHS) + [HIT // BS * BS]
    for n, kv, ref in zip(ALONE_LENGTHS, run["kv"], tiny_ref["kv"], strict=True):
        assert len(kv) == len(ref) == 2
        for layer, (a, b) in enumerate(zip(kv, ref)):
            # every whole block of the prompt: each chunk's KV, runahead segments and cached prefix alike
            assert a.shape == b.shape and a.shape[0] == n // BS
            # fp32: the same math on other batch shapes; tolerance 1e-5
            torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5, msg=f"prompt {n}, layer {layer}")


@pytest.mark.parametrize("workers", [2, 3])
def test_tiny_every_chunk_of_a_long_prompt_runs_ahead(engines, workers):
    """Chunked prefill (budget 1000 < prompt): every chunk runs on the chain, the later ones
    after the head's cached prefix, starting inside a KV block (1000, 2000)."""
    run = tiny(engines, workers)
    ahead = dict(zip(ALONE_LENGTHS, run["ahead"], strict=True))
    held = {n: a.pop("prefix_tokens_held") for n, a in ahead.items()}
    assert ahead[2500] == {"chunks_ahead": 3, "chunks_ahead_cached": 2, "tokens_ahead": 2500}
    # after a prefix-cache hit: the new tokens ran ahead, after the cached prefix
    assert ahead[HIT + 300] == {"chunks_ahead": 1, "chunks_ahead_cached": 1, "tokens_ahead": HIT + 300 - HIT // BS * BS}
    # chunks 2 and 3: each chain position already held its part of the earlier chunks' KV (whole
    # blocks) and received only the rest; the KV and tokens above equal one worker's all the same
    assert held[2500] >= (workers - 1) * BS
    assert ahead[1] == ahead[2] == ahead[100] == {"chunks_ahead": 0, "chunks_ahead_cached": 0, "tokens_ahead": 0}
    assert ahead[300]["chunks_ahead"] == ahead[1000]["chunks_ahead"] == 1
    # 1027 = 1000 + 27: the 27-token chunk has room for one chain block (1000 -> 1024) at N=2 only
    assert ahead[1027]["chunks_ahead_cached"] == (1 if workers == 2 else 0)


@pytest.mark.parametrize("workers", [2, 3])
def test_tiny_seeded_sampling_runs_ahead_and_equals_one_worker(engines, tiny_ref, workers):
    """Seeded sampling (n=1 and n=2, temperature 0.8): the head samples exactly as one worker;
    chain workers sample nothing of the user's (their throwaway pass is plain greedy)."""
    run = tiny(engines, workers)
    assert len(run["seeded"]) == 2 and run["seeded"] == tiny_ref["seeded"]
    n1, n2 = tiny_ref["seeded"]
    assert all(len(o) == 1 for o in n1) and all(len(o) == 2 for o in n2)
    assert any(len(set(map(tuple, o))) == 2 for o in n2)  # sampled, not greedy: the two answers differ


@pytest.mark.parametrize("workers", [2, 3])
def test_tiny_each_worker_computes_only_its_segment(engines, tiny_ref, workers):
    run = tiny(engines, workers)
    stats = sorted(run["stats"], key=lambda s: s["position"])
    head, chain = stats[-1], stats[:-1]
    assert head["returns_output"] and head["rank"] == workers - 1  # vLLM's output rank
    computed = sum(s["tokens_run"] for s in stats)
    # every token vLLM scheduled (prompt tokens past the cached ones, decodes) computed once, on exactly one
    # worker; and vLLM scheduled what one worker's engine did for the same requests (less the server load
    # round only that engine ran)
    assert computed == run["scheduled_tokens"] == tiny_ref["scheduled_tokens"] - tiny_ref["rounds"][-1]["scheduled_tokens"]
    for s in chain:
        assert s["steps_run"] == s["kv_steps"] > 0    # non-head workers ran runahead steps only
        assert s["blocks_sent"] > 0
        # early_send (N=3): every layer a chain worker sent went out at its attention entry; else none
        assert s["layers_sent"] >= s["kv_steps"] > 0
        assert s["layers_sent_on_entry"] == (s["layers_sent"] if workers == 3 else 0)
    # chain workers computed only segments of runahead chunks, and the head at least one token of each
    assert 0 < sum(s["tokens_run"] for s in chain) < head["tokens_ahead"]
    # the ring: the head receives segments and sends cached prefixes of later chunks to position 0
    assert head["blocks_received"] > 0 and head["blocks_sent"] > 0 and chain[0]["blocks_received"] > 0
    assert all(s["chunks_ahead"] == head["chunks_ahead"] > 0 for s in stats)   # one plan on every worker
    assert all(s["live_requests"] == 0 for s in stats)                          # the book forgets finished ones
    for s in stats:  # profile: every runahead step timed on every worker
        p = s["profile"]
        assert p["steps"] == s["kv_steps"] and p["step_s"] > 0 and 0 <= p["stall_s"] < p["step_s"]
    segs = head["last_segments"][-1]
    lengths = [e - s for s, e in segs]
    assert len(segs) == workers and segs[0][0] == 0
    assert all(e % BS == 0 for _, e in segs[:-1])          # whole KV blocks cross the chain
    # no shipped table for this model on CPU: auto falls back to the cost model
    assert all(s["partition"].startswith("auto: cost model") for s in stats)
    if workers == 2:
        assert lengths[0] >= lengths[-1]                   # balanced: earlier segments longer
        assert all(s["refine"] is None for s in stats)     # off by default
    else:
        # online refinement learned from the one-prompt steps, identically on every worker
        states = [s["refine"] for s in stats]
        assert states[0] and all(st == states[0] for st in states), states
        assert sum(b["updates"] for b in states[0].values()) >= 1


@pytest.mark.parametrize("workers", [2])   # N=3: the tiny model's engines
def test_smollm2_tokens_and_kv_equal_one_worker(engines, smol_ref, workers):
    run = engines.get(f"smol-{workers}", smol_spec(workers))
    assert run["alone"] == smol_ref["alone"]
    for kv, ref in zip(run["kv"], smol_ref["kv"]):
        for a, b in zip(kv, ref):
            torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)
    for logprobs, ref in zip(run["logprobs"], smol_ref["logprobs"]):
        torch.testing.assert_close(torch.tensor(logprobs), torch.tensor(ref), atol=1e-3, rtol=0)
    # the last prompt hit the cache for the first one's whole blocks (two chunks of it) ...
    assert run["cached"] == smol_ref["cached"] and run["cached"][-1] == len(smol_prompts()[0]) // BS * BS
    # ... and its new tokens ran ahead after that prefix; the first prompt ran as two chunks
    assert run["ahead"][-1]["chunks_ahead_cached"] == run["ahead"][-1]["chunks_ahead"] == 1
    # ... where the chain positions still held the first prompt's KV they had computed or received:
    # the cached history was not sent again (the next turn of a conversation)
    assert run["ahead"][-1]["prefix_tokens_held"] >= (workers - 1) * 1024
    first = dict(run["ahead"][0])
    assert first.pop("prefix_tokens_held") > 0   # its second chunk: the first chunk's KV was held
    assert first == {"chunks_ahead": 2, "chunks_ahead_cached": 1, "tokens_ahead": len(smol_prompts()[0])}


@pytest.mark.parametrize("workers", [2, 3])
def test_prefix_hits_on_blocks_computed_in_the_same_step_equal_one_worker(engines, tiny_ref, workers):
    """A chunk whose cached prefix is computed in its own step runs on the head (the ring would send
    that prefix before it exists); every request's tokens and logprobs equal one worker's, and every
    KV block a chain position's record says it holds is the head's, byte for byte."""
    run = tiny(engines, workers)
    assert len(run["rounds"]) == SHARED and len(tiny_ref["rounds"]) == SHARED + 1
    for i, (got, want) in enumerate(zip(run["rounds"], tiny_ref["rounds"][:SHARED], strict=True)):
        assert got["cached"] == want["cached"], f"round {i}"
        assert got["tokens"] == want["tokens"], f"round {i}"
        for j, (lp, ref) in enumerate(zip(got["logprobs"], want["logprobs"], strict=True)):
            torch.testing.assert_close(torch.tensor(lp), torch.tensor(ref), atol=1e-6, rtol=0,
                                       msg=lambda m: f"round {i}, request {j}: {m}")
        held = got["held"]
        assert all(differ == 0 for _, differ in held), f"round {i}: (held, differing) blocks per position {held}"
    # the scenario happened: B hit A's whole blocks of [0, 1600) (those of [896, 1600) computed in that step) ...
    hit = 1600 // BS * BS
    assert tiny_ref["rounds"][0]["cached"] == [0, hit] and tiny_ref["rounds"][1]["cached"] == [hit]
    assert tiny_ref["rounds"][2]["cached"] == [0, 2432, 1280]
    r1, r2, r3, r4 = (r["ahead"] for r in run["rounds"])
    # ... B and Q stayed on the head for it, and cache hits on final blocks (C, R, round 4) ran ahead
    assert r1["chunks_not_ahead"].get("prefix_not_final", 0) >= 1 and r3["chunks_not_ahead"].get("prefix_not_final", 0) >= 1
    assert r2["chunks_ahead_cached"] >= 1 and r3["chunks_ahead_cached"] >= 1 and r4["chunks_ahead_cached"] >= 1
    assert sum(r["prefix_tokens_held"] for r in (r1, r2, r3, r4)) > 0
    assert sum(n for n, _ in run["rounds"][-1]["held"]) > 0   # positions hold blocks, all checked above


def steps_spec(workers):
    # every prompt arrives at once; max_num_batched_tokens 4000 could hold them all in one step
    p = rand_prompts(TINY_LENGTHS, 1)
    return dict(model=tiny_llama(kv_heads=2), workers=workers, block_size=BS, max_tokens=8, alone=[], steps=True,
                engine=dict(TINY_ENGINE, max_num_batched_tokens=4000), kvr={"min_tokens": 0, "step_budget": 1000},
                batch=[p[6], p[4], p[3], p[2]])


def test_a_step_takes_one_long_prompt_whole_and_does_not_pack_the_next_ones_with_it(engines, tiny_ref):
    """Per-step budget (kv_runahead.step_budget 1000, max 4000): the 2500-token prompt runs whole in the
    first step, alone; the others follow at 1000 tokens a step, as with vLLM's default budget, instead of
    all four in one step whose first tokens would all wait for it. Tokens equal one worker's."""
    run = engines.get("tiny-steps-2", steps_spec(2))
    assert run["batch"] == [tiny_ref["alone"][i] for i in (6, 4, 3, 2)]
    assert run["steps"][0] == [2500], run["steps"][:4]
    assert sum(run["steps"][1]) <= 1000 + 1 and 1000 in run["steps"][1] + run["steps"][2], run["steps"][:4]
    head = run["stats"][-1]
    assert head["chunks_ahead"] >= 2   # the long prompt (one chunk) and the 1000-token one ran on the chain
