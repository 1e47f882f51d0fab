"""Offline search of segment fractions on measured TTFT (the paper's load balancing).

    python -m vllm_kvrunahead.tune --model DIR --workers 2 --lengths 8192,32768 --out table.json

Starts one engine with KV-Runahead, then for each prompt length starts from the
cost-model split and searches the fractions by measuring TTFT in that engine
(coarse steps first, then finer around the best: a hierarchical grid search
moving mass between any two segments). The fractions under test are set on the
workers by RPC, so no engine restarts. Writes a lookup table (``lut.py`` format,
keyed by model shape, N and GPU, which ``partition: auto`` picks up when the file
is in ``vllm_kvrunahead/tables/``) with the re-measured TTFT of the best, the
even and the cost-model split per length.
"""
from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import os
import statistics
import time
from typing import Callable

from .lut import FORMAT, PartitionTable
from .partition import even_split, from_fractions

Fractions = tuple[float, ...]


def _normalized(f) -> Fractions:
    s = sum(f)
    return tuple(x / s for x in f)


def search(measure: Callable[[Fractions], float], start: Fractions, *, step: float = 0.08,
           levels: int = 3, points: int = 2, floor: float = 0.01) -> tuple[Fractions, float, int]:
    """Minimize measure(fractions) from ``start``.

    Per level, the neighbours of the current point move k * step (k = 1..points)
    of the prompt from any segment to any other, keeping every fraction >= floor;
    the search moves to the best neighbour while that improves (TTFT is close to
    a max over workers: first-improvement or neighbour-only moves get stuck),
    then halves the step.
    Returns (best fractions, its measure, number of measurements).
    """
    if abs(sum(start) - 1) > 1e-6 or min(start) <= 0:
        raise ValueError(f"start fractions must be positive and sum to 1, got {start}")
    cache: dict[Fractions, float] = {}

    def m(f: Fractions) -> float:
        key = tuple(round(x, 6) for x in f)
        if key not in cache:
            cache[key] = measure(_normalized(f))
        return cache[key]

    best = _normalized(start)
    best_t = m(best)
    for _ in range(levels):
        while True:  # steepest descent on this level's grid: move to the best neighbour
            cands = []
            for i, j in itertools.permutations(range(len(best)), 2):
                for k in range(1, points + 1):
                    cand = list(best)
                    cand[i] += k * step
                    cand[j] -= k * step
                    if min(cand) >= floor:
                        cands.append(tuple(cand))
            if not cands:
                break
            t, cand = min((m(c), c) for c in cands)
            if t >= best_t:
                break
            best, best_t = cand, t
        step /= 2
    return _normalized(best), best_t, len(cache)


def fractions_of(segments) -> Fractions:
    n = segments[-1].end
    return tuple(s.length / n for s in segments)


def _ttft(llm, length: int, vocab: int, repeats: int, tag: int) -> float:
    import random

    from vllm import SamplingParams

    times = []
    sp = SamplingParams(max_tokens=1, temperature=0)
    for r in range(repeats):
        rng = random.Random(hash((length, tag, r)) & 0xFFFF)
        prompt = {"prompt_token_ids": [rng.randrange(1, vocab) for _ in range(length)]}
        t0 = time.perf_counter()
        llm.generate([prompt], sp, use_tqdm=False)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def tune(llm, n_workers: int, lengths: list[int], *, repeats: int = 3, search_repeats: int = 2,
         step: float = 0.08, levels: int = 3, points: int = 2, log=print) -> dict:
    """Search fractions per length in a running KV-Runahead engine; return the table (a dict).

    The search measures each candidate ``search_repeats`` times; afterwards the best, cost-model
    and even splits are measured again ``repeats`` times on fresh prompts, so the reported
    best is not the (optimistically biased) minimum the search happened to see, and the
    table takes the fastest of the three.
    """
    import torch
    import vllm

    from .vllm_seam import model_shape

    vocab = llm.llm_engine.model_config.get_vocab_size()
    entries = []
    try:
        for n in lengths:
            llm.collective_rpc("kvr_set_fractions", args=(None,))
            _ttft(llm, n, vocab, 1, tag=-1)  # warm-up at this length

            def measure(f: Fractions, n=n, reps=search_repeats, tag=0) -> float:
                llm.collective_rpc("kvr_set_fractions", args=(list(f),))
                return _ttft(llm, n, vocab, reps, tag=tag)

            model_f = fractions_of(from_fractions(n, llm.collective_rpc("kvr_model_fractions", args=(n,))[0]))
            t0 = time.perf_counter()
            best, search_t, evals = search(measure, model_f, step=step, levels=levels, points=points)
            cands = {"best": best, "model": model_f, "even": fractions_of(even_split(n, n_workers))}
            final = {name: measure(f, reps=repeats, tag=1) for name, f in cands.items()}
            # the table keeps whichever split re-measured fastest: never worse than even or the cost model
            chosen = min(final, key=final.get)
            entries.append(dict(tokens=n, fractions=list(cands[chosen]), chosen=chosen, ttft_s=final,
                                search_best_s=search_t, measurements=evals,
                                search_s=round(time.perf_counter() - t0, 1)))
            log(json.dumps(entries[-1]))
    finally:
        llm.collective_rpc("kvr_set_fractions", args=(None,))
    shape = model_shape(llm.llm_engine.model_config)
    table = dict(format=FORMAT, n_workers=n_workers, vllm_version=vllm.__version__,
                 device=torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
                 model=dict(name=os.path.basename(str(llm.llm_engine.model_config.model).rstrip("/")),
                            **(dataclasses.asdict(shape) if shape else {})),
                 dtype=str(llm.llm_engine.model_config.dtype).replace("torch.", ""),
                 entries=[dict(tokens=e["tokens"], fractions=e["fractions"]) for e in entries],
                 measured=entries)
    PartitionTable.from_dict(table, "tuner output")  # what we write must load
    return table


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True)
    ap.add_argument("--workers", type=int, required=True)
    ap.add_argument("--lengths", required=True, help="comma list of prompt lengths")
    ap.add_argument("--out", required=True)
    ap.add_argument("--repeats", type=int, default=3, help="measurements of the final best/model/even splits")
    ap.add_argument("--search-repeats", type=int, default=2, help="measurements of each candidate")
    ap.add_argument("--levels", type=int, default=3)
    ap.add_argument("--step", type=float, default=0.08)
    ap.add_argument("--points", type=int, default=2)
    ap.add_argument("--engine-args", default="{}", help="JSON: extra LLM(...) arguments, e.g. load_format")
    a = ap.parse_args(argv)
    lengths = sorted(int(x) for x in a.lengths.split(","))
    from vllm import LLM

    kw = dict(model=a.model, skip_tokenizer_init=True, enable_prefix_caching=False, seed=0,
              max_model_len=max(lengths) + 16, max_num_batched_tokens=max(lengths) + 16,
              worker_cls="vllm_kvrunahead.Worker", prefill_context_parallel_size=a.workers,
              additional_config={"kv_runahead": {"min_tokens": 0, "partition": "model"}})
    kw.update(json.loads(a.engine_args))
    llm = LLM(**kw)
    table = tune(llm, a.workers, lengths, repeats=a.repeats, search_repeats=a.search_repeats,
                 step=a.step, levels=a.levels, points=a.points)
    with open(a.out, "w") as f:
        json.dump(table, f, indent=1)
    print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
