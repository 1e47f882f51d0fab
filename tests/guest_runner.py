"""Runs one vLLM engine in its own process for tests/test_guest.py and saves what the tests compare.

    python -m tests.guest_runner SPEC.json OUT.pt

SPEC: model, tp, guest (true: tests.guest_worker.GuestWorker, a guest on every rank), engine kwargs,
probes (prompts whose next-token logprobs over the whole vocabulary are read from the engine, and with
a guest also from every rank's guest), alone (prompts sent one by one, before the guest runs) and after
(prompts sent at once after it; they share prefixes with ``alone`` and hit vLLM's prefix cache).
"""
import json

import numpy as np

from tests.engine_runner import read_blocks, run_as_script, save_and_stop, set_engine_env


def kv_blocks(worker):
    return worker.model_runner.kv_cache_config.num_blocks


def full_logprobs(o, vocab):
    row = np.full(vocab, np.nan, dtype=np.float32)
    for tok, lp in o.outputs[0].logprobs[0].items():
        row[tok] = lp.logprob
    return o.outputs[0].token_ids[0], row


def main(spec_path, out_path):
    spec = json.loads(open(spec_path).read())
    tp = spec["tp"]
    set_engine_env(tp)
    from vllm import LLM, SamplingParams

    worker = "tests.guest_worker.GuestWorker" if spec.get("guest") else "tests.recording_worker.RecordingWorker"
    llm = LLM(model=spec["model"], skip_tokenizer_init=True, dtype="float32", enforce_eager=True, seed=0,
              tensor_parallel_size=tp, worker_cls=worker, max_logprobs=-1, **spec["engine"])
    vocab = spec["vocab"]
    greedy = SamplingParams(max_tokens=spec["max_tokens"], temperature=0, ignore_eos=True, logprobs=1)

    def generate(prompts):
        outs = llm.generate([{"prompt_token_ids": p} for p in prompts], greedy, use_tqdm=False)
        return [dict(tokens=list(o.outputs[0].token_ids), cached=o.num_cached_tokens or 0,
                     logprobs=[lp[t].logprob for t, lp in zip(o.outputs[0].token_ids, o.outputs[0].logprobs)])
                for o in outs]

    out = {"alone": [generate([p])[0] for p in spec["alone"]]}
    if spec.get("guest"):
        out["guest"] = llm.collective_rpc("kvr_guest_prefill", args=(spec["probes"],))  # per rank
        out["report"] = llm.collective_rpc("kvr_guest_report")
    probe = SamplingParams(max_tokens=1, temperature=0, logprobs=-1)
    out["probes"] = [full_logprobs(o, vocab) for o in llm.generate(
        [{"prompt_token_ids": p} for p in spec["probes"]], probe, use_tqdm=False)]
    out["after"] = generate(spec["after"])
    # every rank's KV of the alone prompts' whole blocks, read after the guest ran and the cache was hit
    tables = llm.collective_rpc("kvr_request_blocks")[0][:len(spec["alone"])]
    bs = spec["engine"]["block_size"]
    out["kv"] = [llm.collective_rpc(read_blocks, args=(blocks[:n // bs], [0, 1])) for n, blocks in tables]
    out["kv_blocks"] = llm.collective_rpc(kv_blocks)
    save_and_stop(llm, out, out_path)


if __name__ == "__main__":
    run_as_script(main)
