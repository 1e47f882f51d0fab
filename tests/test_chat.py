"""Multi-turn chat through the OpenAI server: SmolLM2 (real weights, real tokenizer and chat
template), KV-Runahead on 2 workers, and in TP layout on 3 ranks (SmolLM2's 3 KV heads), next to one
plain worker, prefix caching on (vLLM's default). Turns 2 and 3 hit the prefix cache for the
conversation so far, and their new tokens run ahead after that cached history (with 2 workers the head
sends it to the chain; in TP layout every rank gathers its heads from the others)."""
import json
import urllib.request

import pytest
import torch

from tests import timing
from tests.models import smollm2

SYSTEM = "You are a concise assistant. Answer in one sentence."
# fp32, SmolLM2's 30 layers: plain TP=3 (no plugin) differs from one worker by up to 1.6e-5 on this chat,
# and TP layout from plain TP=3 by up to 1.4e-5 (measured side by side; the answers are identical)
TP3_LOGPROB_TOL = 3e-5


def turns() -> list[str]:
    text = open(torch.__file__.replace("__init__.py", "functional.py")).read()  # real English-ish text
    return [text[:5000] + "\n\nWhat is this code about?",
            text[20000:22500] + "\n\nAnd what does this part add?",
            text[40000:42500] + "\n\nName one function defined here."]


def all_stats(base: str) -> list[dict]:
    req = urllib.request.Request(base + "/collective_rpc", data=json.dumps({"method": "kvr_stats"}).encode(),
                                 headers={"Content-Type": "application/json"})
    return json.loads(urllib.request.urlopen(req, timeout=60).read())["results"]


def head_stats(base: str) -> dict:
    return all_stats(base)[-1]  # the head: the last rank (TP layout: every rank counts the same)


def converse(workers: int, decode: str = "head", kvr: dict | None = None) -> dict:
    from openai import OpenAI

    env = {"VLLM_SERVER_DEV_MODE": "1"}  # exposes /collective_rpc (kvr_stats) on loopback
    proc, base, log = timing.server(f"smol-chat-{decode}-{workers}", smollm2(), workers,
                                    ["--enable-prompt-tokens-details"], env, tokenizer=True, prefix_caching=True,
                                    decode=decode, kvr=kvr)
    try:
        client = OpenAI(base_url=base + "/v1", api_key="none", max_retries=0, timeout=300)
        model = client.models.list().data[0].id
        messages = [{"role": "system", "content": SYSTEM}]
        out = {"answers": [], "prompt_tokens": [], "cached": [], "ahead": [], "logprobs": [], "log": log}
        for user in turns():
            messages.append({"role": "user", "content": user})
            before = head_stats(base) if workers > 1 else None
            r = client.chat.completions.create(model=model, messages=messages, max_tokens=16, temperature=0,
                                               logprobs=True)
            answer = r.choices[0].message.content
            out["logprobs"].append([t.logprob for t in r.choices[0].logprobs.content])
            messages.append({"role": "assistant", "content": answer})
            out["answers"].append(answer)
            out["prompt_tokens"].append(r.usage.prompt_tokens)
            out["cached"].append(r.usage.prompt_tokens_details.cached_tokens or 0)
            if before is not None:
                after = head_stats(base)
                out["ahead"].append({k: after[k] - before.get(k, 0) for k in ("chunks_ahead", "chunks_ahead_cached")
                                     if k in after})
        if workers > 1:
            out["stats"] = all_stats(base)
        assert proc.poll() is None
        return out
    finally:
        timing.stop(proc)


@pytest.fixture(scope="module")
def one_worker():
    return converse(1)


def test_three_turn_chat_hits_the_prefix_cache_and_runs_ahead(one_worker):
    ref, run = one_worker, converse(2)
    assert run["answers"] == ref["answers"] and all(run["answers"])
    assert run["prompt_tokens"] == ref["prompt_tokens"] and ref["prompt_tokens"][0] > 1024  # turn 1: 2 chunks
    assert run["cached"] == ref["cached"]
    assert ref["cached"][0] == 0 and ref["cached"][1] > 1000 and ref["cached"][2] > ref["cached"][1]
    assert run["ahead"][0] == {"chunks_ahead": 2, "chunks_ahead_cached": 1}, run["ahead"]   # a later chunk
    for turn in run["ahead"][1:]:  # new tokens after the cached history ran on the chain
        assert turn["chunks_ahead_cached"] >= 1 and turn["chunks_ahead"] == turn["chunks_ahead_cached"], run["ahead"]
    assert any("KV-Runahead: rank 1 is chain position 1 of 2 (head)" in line for line in run["log"]), \
        "".join(run["log"][-40:])   # the start-up line the README promises


def test_three_turn_chat_in_tp_layout_with_the_peer_guest_on_three_ranks_equals_one_worker(one_worker):
    """SmolLM2 has 3 KV heads: TP layout over 3 ranks, one head each, with the peer guest (issue 31: it holds 3
    of SmolLM2's 30 decoder layers and pulls each from the 3 ranks' TP shards as it runs; on the tiny model its
    KV is the full guest's bit for bit, tests/test_tp_layout.py). Turn 1's two chunks and turns 2 and 3 after
    their cached history run ahead on the guests; vLLM's TP=3 model decodes every token."""
    ref, run = one_worker, converse(3, decode="tp", kvr={"min_tokens": 256, "guest": "peer"})
    assert run["answers"] == ref["answers"]
    assert run["prompt_tokens"] == ref["prompt_tokens"] and run["cached"] == ref["cached"]
    for got, want in zip(run["logprobs"], ref["logprobs"], strict=True):
        torch.testing.assert_close(torch.tensor(got), torch.tensor(want), atol=TP3_LOGPROB_TOL, rtol=0)
    assert run["ahead"][0] == {"chunks_ahead": 2, "chunks_ahead_cached": 1}, run["ahead"]
    for turn in run["ahead"][1:]:  # the new tokens after the cached history: the prefix gathered from the ranks
        assert turn["chunks_ahead_cached"] >= 1 and turn["chunks_ahead"] == turn["chunks_ahead_cached"], run["ahead"]
    stats = run["stats"]
    assert [s["tp_rank"] for s in stats] == [0, 1, 2] and all(s["mode"] == "tp_layout" for s in stats)
    assert len({s["decode_tokens"] for s in stats}) == 1 and stats[0]["decode_tokens"] >= 3 * 15
    assert all(s["segment_tokens"][s["position"]] > 0 for s in stats)
    assert any("KV-Runahead: TP rank 0 of 3 decodes" in line for line in run["log"]), "".join(run["log"][-40:])
    # the start-up line the README promises: 30 layers pulled into a ring of 3
    assert any("TP rank 0's guest pulls each of its 30 decoder layers from the 3 ranks' TP shards into a ring of 3 "
               "layers" in line for line in run["log"]), "".join(run["log"][-40:])
