"""Multi-turn chat through the OpenAI server: SmolLM2 (real weights, real tokenizer and chat
template), KV-Runahead on 2 workers next to one plain worker, prefix caching on (vLLM's default).
Turns 2 and 3 hit the prefix cache for the conversation so far, and their new tokens run ahead
after that cached history (the head sends it to the chain)."""
import json
import urllib.request

import torch

from benchmarks.serve_load import start_server, stop_server
from tests.models import smollm2

SYSTEM = "You are a concise assistant. Answer in one sentence."


def turns() -> list[str]:
    text = open(torch.__file__.replace("__init__.py", "functional.py")).read()  # real English-ish text
    return [text[:5000] + "\n\nWhat is this code about?",
            text[20000:22500] + "\n\nAnd what does this part add?",
            text[40000:42500] + "\n\nName one function defined here."]


def head_stats(base: str) -> dict:
    req = urllib.request.Request(base + "/collective_rpc", data=json.dumps({"method": "kvr_stats"}).encode(),
                                 headers={"Content-Type": "application/json"})
    return json.loads(urllib.request.urlopen(req, timeout=60).read())["results"][-1]  # the head: last rank


def converse(workers: int) -> dict:
    from openai import OpenAI

    env = {"VLLM_SERVER_DEV_MODE": "1"}  # exposes /collective_rpc (kvr_stats) on loopback
    proc, base, log = start_server(smollm2(), workers, ["--enable-prompt-tokens-details"], env,
                                   tokenizer=True, prefix_caching=True)
    try:
        client = OpenAI(base_url=base + "/v1", api_key="none", max_retries=0, timeout=300)
        model = client.models.list().data[0].id
        messages = [{"role": "system", "content": SYSTEM}]
        out = {"answers": [], "prompt_tokens": [], "cached": [], "ahead": [], "log": log}
        for user in turns():
            messages.append({"role": "user", "content": user})
            before = head_stats(base) if workers > 1 else None
            r = client.chat.completions.create(model=model, messages=messages, max_tokens=16, temperature=0)
            answer = r.choices[0].message.content
            messages.append({"role": "assistant", "content": answer})
            out["answers"].append(answer)
            out["prompt_tokens"].append(r.usage.prompt_tokens)
            out["cached"].append(r.usage.prompt_tokens_details.cached_tokens or 0)
            if before is not None:
                after = head_stats(base)
                out["ahead"].append({k: after[k] - before[k] for k in ("chunks_ahead", "chunks_ahead_cached")})
        assert proc.poll() is None
        return out
    finally:
        stop_server(proc)


def test_three_turn_chat_hits_the_prefix_cache_and_runs_ahead():
    ref, run = converse(1), converse(2)
    assert run["answers"] == ref["answers"] and all(run["answers"])
    assert run["prompt_tokens"] == ref["prompt_tokens"] and ref["prompt_tokens"][0] > 1024  # turn 1: 2 chunks
    assert run["cached"] == ref["cached"]
    assert ref["cached"][0] == 0 and ref["cached"][1] > 1000 and ref["cached"][2] > ref["cached"][1]
    assert run["ahead"][0] == {"chunks_ahead": 2, "chunks_ahead_cached": 1}, run["ahead"]   # a later chunk
    for turn in run["ahead"][1:]:  # new tokens after the cached history ran on the chain
        assert turn["chunks_ahead_cached"] >= 1 and turn["chunks_ahead"] == turn["chunks_ahead_cached"], run["ahead"]
    assert any("KV-Runahead: rank 1 is chain position 1 of 2 (head)" in line for line in run["log"]), \
        "".join(run["log"][-40:])   # the start-up line the README promises
