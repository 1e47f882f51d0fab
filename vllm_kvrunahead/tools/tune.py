"""Offline search of segment fractions on measured TTFT (the paper's load balancing).

    python -m vllm_kvrunahead.tools.tune --model DIR --workers 2 --lengths 8192,32768 [--offsets 0,8192] --out table.json

Starts one engine with KV-Runahead, then for each offset and prompt length (a chunk of that
many new tokens after ``offset`` prefix-cache-hit tokens; 0: a cold prompt) starts from the
cost-model split and searches the fractions by measuring TTFT in that engine
(coarse steps first, then finer around the best: a hierarchical grid search
moving mass between any two segments). The fractions under test are set on the
workers by RPC, so no engine restarts. Writes a lookup table (``lut.py`` format,
keyed by model shape, N and GPU, which ``partition: auto`` picks up when the file
is in ``vllm_kvrunahead/core/tables/``) with the re-measured TTFT of the best, the
even and the cost-model split per offset and length. With --engine-args '{"tensor_parallel_size": T}'
it tunes N stages of T TP ranks; the table's device is then "<GPU> x T" (``topology.stage_device``).
With --layout tp it tunes the TP layout (--tensor-parallel-size N, the guests' split: every rank also
receives its KV heads of the later segments, the last token is vLLM's TP forward's); the table's device
is then "<GPU> tp-layout" (``topology.tp_layout_device``), which only the TP layout reads.

    python -m vllm_kvrunahead.tools.tune --model DIR --workers 4 --layout tp --lengths 8192,32768 --out table.json
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

from ..config import TP_LAYOUT, mode_of
from ..core.lut import FORMAT, FORMAT_COLD, PartitionTable
from ..core.partition import check_fractions, even_split, fractions_of
from ..core.topology import stage_device, tp_layout_device

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
    check_fractions(start, name="start fractions")
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


def _ids(rng, length: int, vocab: int) -> list[int]:
    return [rng.randrange(1, vocab) for _ in range(length)]


def _ttft(llm, length: int, vocab: int, repeats: int, rng, *, offset: int = 0, fractions=None) -> float:
    """Median seconds to the first token of ``length`` new prompt tokens after ``offset`` cached ones,
    cut by ``fractions`` (None: the engine's configured split).

    Every prompt is new (drawn from ``rng``), so nothing hits the prefix cache unless meant to. For
    offset c > 0 each repeat first sends a fresh c-token prefix (one output token, the configured
    split, untimed), then times prefix + ``length`` new tokens: the prefix is a prefix-cache hit,
    and chain workers hold what the prefix's own runahead step left them (position k: [0, e_k) of
    it, ``holdings.py``). That is what a conversation's next turn finds when the previous turn ran
    ahead; a fresh prefix per measurement gives every candidate that same state, where reusing one
    would let each measurement inherit the holdings of the one before.
    """
    from vllm import SamplingParams

    sp = SamplingParams(max_tokens=1, temperature=0)
    times = []
    if offset == 0:
        llm.collective_rpc("kvr_set_fractions", args=(fractions,))
    for _ in range(repeats):
        ids = _ids(rng, offset + length, vocab)
        if offset:
            llm.collective_rpc("kvr_set_fractions", args=(None,))
            llm.generate([{"prompt_token_ids": ids[:offset]}], sp, use_tqdm=False)
            llm.collective_rpc("kvr_set_fractions", args=(fractions,))
        t0 = time.perf_counter()
        llm.generate([{"prompt_token_ids": ids}], sp, use_tqdm=False)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def _last_split(llm, length: int, offset: int) -> Fractions:
    """Fractions of the runahead chunk the engine ran last, checked to be [offset, offset + length):
    a prefix cache that missed, or a chunk kept on the head (or on the TP model), would make the
    measurements meaningless. In the TP layout the guests' last segment ends one token early (vLLM's TP
    forward computes the last one); the split, and the fractions the tuner sets, cover the whole chunk."""
    stats = llm.collective_rpc("kvr_stats")[0]
    segs = [list(map(list, r)) for r in stats["last_segments"]]
    if stats.get("mode") == TP_LAYOUT and len(segs) == 1:
        segs[0][-1][1] += 1
    if len(segs) != 1 or segs[0][0][0] != offset or segs[0][-1][1] != offset + length:
        raise RuntimeError(f"tuning {length} tokens after {offset} cached: expected one runahead chunk "
                           f"[{offset}, {offset + length}), the engine's last runahead step ran {segs}")
    return tuple((e - s) / length for s, e in segs[0])


def tune(llm, n_workers: int, lengths: list[int], *, offsets: list[int] = (0,), repeats: int = 3,
         search_repeats: int = 2, step: float = 0.08, levels: int = 3, points: int = 2, log=print) -> dict:
    """Search fractions per (offset, length) in a running KV-Runahead engine; return the table (a dict).

    Offset c > 0: chunks of ``length`` new tokens after a c-token prefix-cache hit (see ``_ttft``);
    c must be a multiple of the KV block size (the cache hits whole blocks) and the engine needs
    prefix caching. The search starts from the engine's own split without override ("model": the
    CLI configures partition "model", the cost model with the offset and the chain's holdings).
    The search measures each candidate ``search_repeats`` times; afterwards the best, cost-model
    and even splits are measured again ``repeats`` times on fresh prompts, so the reported
    best is not the (optimistically biased) minimum the search happened to see, and the
    table takes the fastest of the three.
    """
    import random

    import torch
    import vllm

    from ..vllm_side.seam import device_name, llm_config, model_shape

    cfg = llm_config(llm)
    cache = cfg.cache_config
    offsets = sorted(set(offsets))
    if any(c > 0 for c in offsets) and not cache.enable_prefix_caching:
        raise ValueError("tuning offsets > 0 needs an engine with prefix caching enabled")
    for c in offsets:
        if c < 0 or c % cache.block_size:
            raise ValueError(f"offset {c} must be >= 0 and a multiple of the KV block size {cache.block_size} "
                             "(the prefix cache hits whole blocks)")
    vocab = cfg.model_config.get_vocab_size()
    rng = random.Random(0)
    entries = []
    try:
        for c, n in itertools.product(offsets, lengths):
            _ttft(llm, n, vocab, 1, rng, offset=c)  # warm-up at this length, with the engine's own split
            model_f = _last_split(llm, n, c)

            def measure(f: Fractions, n=n, c=c, reps=search_repeats) -> float:
                return _ttft(llm, n, vocab, reps, rng, offset=c, fractions=list(f))

            t0 = time.perf_counter()
            best, search_t, evals = search(measure, model_f, step=step, levels=levels, points=points)
            cands = {"best": best, "model": model_f, "even": fractions_of(even_split(n, n_workers))}
            final = {name: measure(f, reps=repeats) for name, f in cands.items()}
            # the table keeps whichever split re-measured fastest: never worse than even or the cost model
            chosen = min(final, key=final.get)
            entries.append(dict(offset=c, tokens=n, fractions=list(cands[chosen]), chosen=chosen, ttft_s=final,
                                model_fractions=list(model_f),
                                search_best_s=search_t, measurements=evals,
                                search_s=round(time.perf_counter() - t0, 1)))
            log(json.dumps(entries[-1]))
    finally:
        llm.collective_rpc("kvr_set_fractions", args=(None,))
    shape = model_shape(cfg.model_config)
    gpu = device_name(torch.device("cuda" if torch.cuda.is_available() else "cpu"))
    # a stage's device: "<GPU> x T" with --tensor-parallel-size T (tables are per stage); the TP layout's
    # tables: "<GPU> tp-layout" (its split is its own)
    device = tp_layout_device(gpu) if mode_of(cfg) == TP_LAYOUT else \
        stage_device(gpu, cfg.parallel_config.tensor_parallel_size)
    # cold entries only: the /1 format, which plugins that predate offsets read too
    table = dict(format=FORMAT if offsets != [0] else FORMAT_COLD, n_workers=n_workers,
                 vllm_version=vllm.__version__, device=device,
                 model=dict(name=os.path.basename(str(cfg.model_config.model).rstrip("/")),
                            **(dataclasses.asdict(shape) if shape else {})),
                 dtype=str(cfg.model_config.dtype).replace("torch.", ""),
                 entries=[dict(**({"offset": e["offset"]} if e["offset"] else {}), tokens=e["tokens"],
                               fractions=e["fractions"]) for e in entries],
                 measured=entries)
    PartitionTable.from_dict(table, "tuner output")  # what we write must load
    return table


def engine_kwargs(model: str, workers: int, lengths: list[int], offsets: list[int], layout: str = "copies",
                  extra: dict | None = None) -> dict:
    """``LLM(...)`` arguments of the tuner's engine: every chunk runs ahead (min_tokens 0) with the cost
    model's split to start from; prefix caching only for offsets (tuner prompts are all new, so cold ones
    never hit); one step fits the longest chunk and the longest prefix, so each runs ahead whole (a fixed
    budget: step_budget's per-step rule does not apply)."""
    parallel = dict(tensor_parallel_size=workers) if layout == "tp" else dict(prefill_context_parallel_size=workers)
    kw = dict(model=model, skip_tokenizer_init=True, enable_prefix_caching=max(offsets) > 0, seed=0,
              max_model_len=max(offsets) + max(lengths) + 16,
              max_num_batched_tokens=max(max(lengths), max(offsets)) + 16,
              worker_cls="vllm_kvrunahead.Worker", **parallel,
              additional_config={"kv_runahead": {"min_tokens": 0, "partition": "model"}})
    kw.update(extra or {})
    return kw


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True)
    ap.add_argument("--workers", type=int, required=True)
    ap.add_argument("--lengths", required=True, help="comma list of prompt lengths")
    ap.add_argument("--offsets", default="0",
                    help="comma list of cached tokens before the chunk (multiples of the KV block size); "
                         "0: cold prompts")
    ap.add_argument("--out", required=True)
    ap.add_argument("--repeats", type=int, default=3, help="measurements of the final best/model/even splits")
    ap.add_argument("--search-repeats", type=int, default=2, help="measurements of each candidate")
    ap.add_argument("--levels", type=int, default=3)
    ap.add_argument("--step", type=float, default=0.08)
    ap.add_argument("--points", type=int, default=2)
    ap.add_argument("--engine-args", default="{}", help="JSON: extra LLM(...) arguments, e.g. load_format")
    ap.add_argument("--layout", default="copies", choices=["copies", "tp"],
                    help="copies: the chain of copies (--prefill-context-parallel-size N); tp: the TP layout "
                         "(--tensor-parallel-size N)")
    a = ap.parse_args(argv)
    lengths = sorted(int(x) for x in a.lengths.split(","))
    offsets = sorted(int(x) for x in a.offsets.split(","))
    from vllm import LLM

    llm = LLM(**engine_kwargs(a.model, a.workers, lengths, offsets, a.layout, json.loads(a.engine_args)))
    table = tune(llm, a.workers, lengths, offsets=offsets, repeats=a.repeats, search_repeats=a.search_repeats,
                 step=a.step, levels=a.levels, points=a.points)
    with open(a.out, "w") as f:
        json.dump(table, f, indent=1)
    print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
