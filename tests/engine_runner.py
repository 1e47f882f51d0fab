"""Runs one vLLM engine in its own process and saves what the tests compare.

    python -m tests.engine_runner SPEC.json OUT.pt

SPEC: model, workers (1 = plain vLLM), decode ("tp": KV-Runahead in TP layout over the tp ranks),
alone (prompts sent one by one; after each, the head's KV of the prompt's whole blocks and, with KV-Runahead, how many of its
chunks ran ahead), batch (prompts sent at once: mixed prefill/decode steps), seeded
(prompts sampled at temperature 0.8 with a per-request seed, n=1 and n=2; each n under a cache salt of its
own, so the n=2 run does not hit the n=1 run's blocks),
chat (first, question, turns: each turn the last prompt + its answer + question),
long (phases of prompts and max_tokens, each sent at once: decodes that outgrow a small KV cache; tokens,
logprobs, vLLM's preemptions and, with KV-Runahead, the head's counts per phase),
max_tokens, engine kwargs; rounds (lists of prompts, or {"prompts", "max_tokens"}, each sent at once, one
after the other: tokens, every token's logprob and cached tokens per request; with KV-Runahead, the head's
counts of the round and, after it, every KV block a chain position's record says it holds compared with
the head's, byte for byte).
Always: the tokens vLLM's scheduler scheduled in all (what the head's recorder saw), the engine's metrics,
its KV blocks per rank, and with KV-Runahead every rank's kvr_stats.
"""
import json
import os
import sys
import time

import torch


def read_blocks(worker, block_ids, layers):
    """KV of whole blocks for the given layer indices (CPU copies)."""
    caches = worker.model_runner.kv_caches
    idx = torch.tensor(block_ids, dtype=torch.long)
    return [caches[i].index_select(0, idx).clone() for i in layers]


def kv_blocks(worker):
    """KV blocks vLLM gave this rank's cache (every rank has the same count)."""
    return worker.model_runner.kv_cache_config.num_blocks


def preemptions(llm) -> float:
    return next(m.value for m in llm.get_metrics() if m.name == "vllm:num_preemptions")


def num_layers(worker):
    return len(worker.model_runner.kv_caches)


def held_mismatches(llm, block_size):
    """Per chain position: (blocks its record says it holds in full, of them how many differ from the
    head's in any byte of any layer). Every worker keeps the same record; T = 1 here: rank = position."""
    import numpy as np

    valid = llm.collective_rpc("kvr_holdings")[-1]
    layers = list(range(llm.collective_rpc(num_layers)[-1]))
    out = []
    for pos in range(len(valid)):
        full = [int(b) for b in np.flatnonzero(valid[pos] == block_size)]
        if not full:
            out.append((0, 0))
            continue
        kv = llm.collective_rpc(read_blocks, args=(full, layers))
        differ = torch.zeros(len(full), dtype=torch.bool)
        for mine, head in zip(kv[pos], kv[-1]):
            differ |= (mine.view(torch.uint8) != head.view(torch.uint8)).flatten(1).any(dim=1)
        out.append((len(full), int(differ.sum())))
    return out


AHEAD = ("chunks_ahead", "chunks_ahead_cached", "tokens_ahead", "prefix_tokens_held")
ON_HEAD = ("chunks_not_ahead",)   # prefill chunks vLLM's own model computed (the head, or the TP model), by reason


def head_counts(llm, keys=AHEAD):
    s = llm.collective_rpc("kvr_stats")[-1]  # KV-Runahead's head is vLLM's output rank, the last
    # (TP layout: every rank counts the same)
    return {k: s[k] for k in keys if k in s}


def scheduled(llm) -> int:
    """Tokens vLLM's scheduler scheduled so far (the head's record of every step; every rank's is the same)."""
    return sum(map(sum, llm.collective_rpc("kvr_steps")[-1]))


def counts_since(before: dict, after: dict) -> dict:
    """after - before, per count (per reason for the counts by reason)."""
    out = {}
    for k, v in after.items():
        if isinstance(v, dict):
            out[k] = {r: n - before[k].get(r, 0) for r, n in v.items() if n != before[k].get(r, 0)}
        else:
            out[k] = v - before[k]
    return out


def set_engine_env(processes: int, kv_bytes: bool = False) -> None:
    """Before vLLM is imported: 1 GiB of KV per worker (unless the engine sets kv_cache_memory_bytes: the
    variable would override it), RPCs that carry functions, one core per worker."""
    if kv_bytes:
        os.environ.pop("VLLM_CPU_KVCACHE_SPACE", None)
    else:
        os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    os.environ["VLLM_ALLOW_INSECURE_SERIALIZATION"] = "1"  # test-only: collective_rpc(read_blocks)
    if processes > 1:
        os.environ["VLLM_CPU_OMP_THREADS_BIND"] = "|".join(str(i % 2) for i in range(processes))


def save_and_stop(llm, out: dict, out_path) -> None:
    torch.save(out, out_path)
    # Stop the engine core and its workers before the os._exit below: they are separate processes, and
    # vLLM 0.32's outlive a parent that leaves without its teardown, holding the runner's output open.
    llm.llm_engine.engine_core.shutdown()


def run_as_script(main) -> None:
    main(sys.argv[1], sys.argv[2])
    # Results are saved; leave without the interpreter's teardown, where a C++ thread of vLLM's CPU build
    # can abort a finished run ("terminate called without an active exception", exit -6).
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def main(spec_path, out_path):
    t0 = time.monotonic()
    spec = json.loads(open(spec_path).read())
    workers = spec["workers"]
    tp = spec.get("tp", 1)  # TP ranks per stage (workers 1: plain vLLM TP)
    set_engine_env(workers * tp, "kv_cache_memory_bytes" in spec.get("engine", {}))
    from vllm import LLM, SamplingParams

    kw = dict(model=spec["model"], skip_tokenizer_init=True, dtype="float32", enforce_eager=True, seed=0,
              disable_log_stats=False, tensor_parallel_size=tp, **spec.get("engine", {}))
    kvr = workers > 1 or spec.get("decode") == "tp"
    if workers > 1:
        kw.update(worker_cls="tests.recording_worker.RecordingKVRWorker", prefill_context_parallel_size=workers,
                  additional_config={"kv_runahead": spec.get("kvr", {})})
    elif kvr:
        kw.update(worker_cls="tests.recording_worker.RecordingKVRWorker",
                  additional_config={"kv_runahead": spec.get("kvr", {})})
    else:
        kw.update(worker_cls="tests.recording_worker.RecordingWorker")
    llm = LLM(**kw)
    start_s = time.monotonic() - t0   # vLLM imported, engine and workers up
    sp = SamplingParams(max_tokens=spec["max_tokens"], temperature=0, ignore_eos=True, logprobs=1)
    out = {"start_s": start_s, "alone": [], "kv": [], "batch": [], "logprobs": [], "seeded": [], "ahead": [], "cached": []}
    seen = 0
    for ids in spec["alone"]:
        before = head_counts(llm) if kvr else None
        o = llm.generate([{"prompt_token_ids": ids}], sp, use_tqdm=False)[0]
        out["alone"].append(list(o.outputs[0].token_ids))
        out["logprobs"].append([max(lp.values(), key=lambda x: x.logprob).logprob for lp in o.outputs[0].logprobs])
        out["cached"].append(o.num_cached_tokens or 0)
        if before is not None:
            out["ahead"].append({k: v - before[k] for k, v in head_counts(llm).items()})
        recs = llm.collective_rpc("kvr_request_blocks")
        head = len(recs) - 1  # with TP: the head stage's ranks are the last tp ranks
        reqs = recs[head][seen:]
        seen += len(reqs)
        prompt_len, block_ids = reqs[-1]
        full = block_ids[: prompt_len // spec["block_size"]]  # whole blocks inside the prompt
        layers = spec.get("kv_layers")
        if not layers:
            out["kv"].append(None)
        else:
            kv = llm.collective_rpc(read_blocks, args=(full, layers))
            out["kv"].append(kv[head] if tp == 1 else kv[len(kv) - tp:])  # TP: one list per TP rank
    out["rounds"] = []
    for r in spec.get("rounds", []):
        prompts, k = (r["prompts"], r["max_tokens"]) if isinstance(r, dict) else (r, spec["max_tokens"])
        sp_round = SamplingParams(max_tokens=k, temperature=0, ignore_eos=True, logprobs=1)
        before, tokens = head_counts(llm, AHEAD + ON_HEAD) if kvr else None, scheduled(llm)
        outs = llm.generate([{"prompt_token_ids": ids} for ids in prompts], sp_round, use_tqdm=False)
        out["rounds"].append(dict(
            tokens=[list(o.outputs[0].token_ids) for o in outs],
            logprobs=[[lp[t].logprob for t, lp in zip(o.outputs[0].token_ids, o.outputs[0].logprobs)] for o in outs],
            cached=[o.num_cached_tokens or 0 for o in outs],
            scheduled_tokens=scheduled(llm) - tokens,
            ahead=counts_since(before, head_counts(llm, AHEAD + ON_HEAD)) if kvr else None,
            held=held_mismatches(llm, spec["block_size"]) if workers > 1 else None))
    out["chat"] = []
    if spec.get("chat"):  # each turn: the last turn's prompt and answer, then the question
        c, prompt = spec["chat"], spec["chat"]["first"]
        for _ in range(c["turns"]):
            o = llm.generate([{"prompt_token_ids": prompt}], sp, use_tqdm=False)[0]
            toks = list(o.outputs[0].token_ids)
            out["chat"].append(dict(tokens=toks, cached=o.num_cached_tokens or 0,
                                    logprobs=[lp[t].logprob for t, lp in zip(toks, o.outputs[0].logprobs)]))
            prompt = prompt + toks + c["question"]
    if spec.get("batch"):
        outs = llm.generate([{"prompt_token_ids": ids} for ids in spec["batch"]], sp, use_tqdm=False)
        out["batch"] = [list(o.outputs[0].token_ids) for o in outs]
        out["batch_logprobs"] = [[lp[t].logprob for t, lp in zip(o.outputs[0].token_ids, o.outputs[0].logprobs)]
                                 for o in outs]
    out["long"] = []
    for phase in spec.get("long", []):  # prompts whose decodes outgrow a small KV cache: vLLM preempts them
        before, counts = preemptions(llm), head_counts(llm, AHEAD + ON_HEAD) if kvr else None
        sp_long = SamplingParams(max_tokens=phase["max_tokens"], temperature=0, ignore_eos=True, logprobs=1)
        outs = llm.generate([{"prompt_token_ids": ids} for ids in phase["prompts"]], sp_long, use_tqdm=False)
        out["long"].append(dict(
            tokens=[list(o.outputs[0].token_ids) for o in outs],
            logprobs=[[lp[t].logprob for t, lp in zip(o.outputs[0].token_ids, o.outputs[0].logprobs)] for o in outs],
            preemptions=preemptions(llm) - before,
            ahead=counts_since(counts, head_counts(llm, AHEAD + ON_HEAD)) if kvr else None))
    for n in (1, 2) if spec.get("seeded") else ():
        seeded = SamplingParams(max_tokens=spec["max_tokens"], temperature=0.8, seed=7, n=n, ignore_eos=True)
        # one prompt at a time: plain vLLM on CPU cannot rewind a seeded generator after a partial chunk
        outs = [llm.generate([{"prompt_token_ids": ids, "cache_salt": f"seeded-n{n}"}], seeded, use_tqdm=False)[0]
                for ids in spec["seeded"]]
        out["seeded"].append([[list(c.token_ids) for c in o.outputs] for o in outs])
    out["scheduled_tokens"] = scheduled(llm)
    if spec.get("steps"):
        out["steps"] = llm.collective_rpc("kvr_steps")[-1]  # the scheduler output the head received
    out["metrics"] = {}
    for m in llm.get_metrics():  # a labelled metric's samples summed
        if hasattr(m, "value"):
            out["metrics"][m.name] = out["metrics"].get(m.name, 0) + m.value
    out["kv_blocks"] = llm.collective_rpc(kv_blocks)
    if kvr:
        out["stats"] = llm.collective_rpc("kvr_stats")
    if spec.get("decode") == "tp":
        out["guest"] = llm.collective_rpc("kvr_guest_report")
    save_and_stop(llm, out, out_path)


if __name__ == "__main__":
    run_as_script(main)
