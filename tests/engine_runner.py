"""Runs one vLLM engine in its own process and saves what the tests compare.

    python -m tests.engine_runner SPEC.json OUT.pt

SPEC: model, workers (1 = plain vLLM), alone (prompts sent one by one, with
the head's KV blocks of each read right after it), batch (prompts sent at
once: mixed prefill/decode steps), max_tokens, engine kwargs.
"""
import json
import os
import sys

import torch


def read_blocks(worker, block_ids, layers):
    """KV of whole blocks for the given layer indices (CPU copies)."""
    caches = worker.model_runner.kv_caches
    idx = torch.tensor(block_ids, dtype=torch.long)
    return [caches[i].index_select(0, idx).clone() for i in layers]


def main(spec_path, out_path):
    spec = json.loads(open(spec_path).read())
    workers = spec["workers"]
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    os.environ["VLLM_ALLOW_INSECURE_SERIALIZATION"] = "1"  # test-only: collective_rpc(read_blocks)
    if workers > 1:
        os.environ["VLLM_CPU_OMP_THREADS_BIND"] = "|".join(str(i % 2) for i in range(workers))
    from vllm import LLM, SamplingParams

    kw = dict(model=spec["model"], skip_tokenizer_init=True, dtype="float32", enforce_eager=True, seed=0,
              **spec.get("engine", {}))
    if workers > 1:
        kw.update(worker_cls="vllm_kvrunahead.Worker", prefill_context_parallel_size=workers,
                  additional_config={"kv_runahead": spec.get("kvr", {})})
    else:
        kw.update(worker_cls="tests.recording_worker.RecordingWorker")
    llm = LLM(**kw)
    sp = SamplingParams(max_tokens=spec["max_tokens"], temperature=0, ignore_eos=True, logprobs=1)
    out = {"alone": [], "kv": [], "batch": [], "logprobs": []}
    seen = 0
    for ids in spec["alone"]:
        o = llm.generate([{"prompt_token_ids": ids}], sp, use_tqdm=False)[0]
        out["alone"].append(list(o.outputs[0].token_ids))
        out["logprobs"].append([max(lp.values(), key=lambda x: x.logprob).logprob for lp in o.outputs[0].logprobs])
        recs = llm.collective_rpc("kvr_request_blocks")
        head = len(recs) - 1 if workers > 1 else 0  # KV-Runahead's head is vLLM's output rank
        reqs = recs[head][seen:]
        seen += len(reqs)
        prompt_len, block_ids = reqs[-1]
        bs = spec["block_size"]
        full = block_ids[0][: prompt_len // bs]  # whole blocks inside the prompt
        layers = spec.get("kv_layers")
        kv = llm.collective_rpc(read_blocks, args=(full, layers or [0]))[head] if layers is not None else None
        out["kv"].append(kv)
    if spec.get("batch"):
        outs = llm.generate([{"prompt_token_ids": ids} for ids in spec["batch"]], sp, use_tqdm=False)
        out["batch"] = [list(o.outputs[0].token_ids) for o in outs]
    if workers > 1:
        out["stats"] = llm.collective_rpc("kvr_stats")
    torch.save(out, out_path)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
