"""KV-Runahead on vLLM's own stats path: a served engine's `/metrics` and periodic stats log line, after a
known mix of requests (.ci/run runs it on vLLM 0.26.0 and 0.32.0)."""
import random
import re
import time
import urllib.request

import pytest

from tests.models import tiny_llama

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


@pytest.fixture(scope="module")
def served():
    """A KV-Runahead server (2 workers, prefix caching, profile on, stats logged every second) after the mix:
    a long cold prompt, a two-turn conversation whose second turn hits the cache, a short prompt and a
    prompt_logprobs request, one after another."""
    from tests import timing

    proc, base, log = timing.server("metrics-2-server", tiny_llama(), 2, prefix_caching=True,
                                    kvr={"min_tokens": 256, "profile": True},
                                    env={"VLLM_SERVER_DEV_MODE": "1", "VLLM_LOG_STATS_INTERVAL": "1"})
    try:
        rng = random.Random(5)
        toks = lambda n: [rng.randrange(512) for _ in range(n)]  # noqa: E731
        long, turn1, short, logprobs = toks(900), toks(700), toks(100), toks(600)
        answers = {"long": complete(base, long)}
        answer1 = complete(base, turn1)
        turn2 = turn1 + answer1 + toks(300)
        answers["turn2"] = complete(base, turn2)
        complete(base, short)
        complete(base, logprobs, prompt_logprobs=1)
        from benchmarks.serve_bench import http

        stats = http(base, "/collective_rpc", {"method": "kvr_stats"})["results"]
        deadline = time.time() + 30  # the front end records an interval's stats as they arrive; the log line each second
        while time.time() < deadline and not (
                metrics(base).get('vllm:kv_runahead_chunks_not_ahead_total{reason="prompt_logprobs"}')
                and any("KV-Runahead" in line for line in log)):
            time.sleep(0.5)
        yield dict(base=base, log=log, stats=stats, metrics=metrics(base), answers=answers, long=long,
                   cached_at=len(turn1) // BLOCK * BLOCK, turn2=len(turn2))
    finally:
        timing.stop(proc)


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
    def logged():
        lines = [line for line in served["log"] if "KV Transfer metrics" in line]
        chunks = [re.search(r"KV-Runahead chunks ahead cold/cached=(\d+)/(\d+)", line) for line in lines]
        return lines, chunks, tuple(sum(int(m.group(i)) for m in chunks if m) for i in (1, 2))

    deadline = time.time() + 30  # the last interval is logged up to a second after it ends
    while logged()[2] != (2, 1) and time.time() < deadline:
        time.sleep(0.5)
    lines, chunks, total = logged()
    assert lines and all(chunks), "".join(served["log"][-40:])   # every such line is KV-Runahead's
    assert total == (2, 1), total                                 # each interval's chunks, logged once


def test_a_server_with_one_worker_has_no_kv_runahead_metrics(served):
    """KV-Runahead's worker with one worker (no chain): plain vLLM, no KV-Runahead figures anywhere."""
    from tests import timing

    proc, base, log = timing.server("metrics-1-server", tiny_llama(), 1, ["--worker-cls", "vllm_kvrunahead.Worker"],
                                    prefix_caching=True, env={"VLLM_LOG_STATS_INTERVAL": "1"})
    try:
        assert complete(base, served["long"]) == served["answers"]["long"]
        time.sleep(2)  # a stats interval passes
        text = urllib.request.urlopen(base + "/metrics", timeout=10).read().decode()
        assert "kv_runahead" not in text and "vllm:num_requests_running" in text
        assert not any("KV Transfer metrics" in line or "KV-Runahead" in line for line in log), "".join(log[-40:])
    finally:
        timing.stop(proc)
