"""KV-Runahead under realistic vLLM traffic, next to plain vLLM on 1 GPU and tensor parallelism.

Unlike ttft.py, every engine runs with vLLM's own scheduler defaults: no max_num_batched_tokens
(the default step budget, chunked prefill: 16384 tokens on H100/H200 for `LLM`), prefix caching on
(the default), no max_num_seqs, and KV-Runahead with no options at all (what a new user gets).
Configs: 1gpu (once, n_gpus=1), tp (tensor_parallel_size=N), kvr (worker_cls=vllm_kvrunahead.Worker,
prefill_context_parallel_size=N: a chain of full-model copies, the last decodes), kvr-tp (the same worker
with tensor_parallel_size=N: the TP layout, vLLM's TP model decodes and every rank's full-model guest runs
prompts ahead). One engine per (config, N), each in its own child process, runs every scenario; records
are merged into OUT/serving.json as soon as each scenario ends, with the engine's KV capacity in tokens.

Scenarios (all prompts random token ids, new ones per repeat, the same ones for every config):
  default-budget         one prompt of 32k and one of 64k tokens (--lengths: others), max_tokens=1; value =
                         wall time of generate() (TTFT), median of 3. Prompts longer than the step budget
                         are chunked by vLLM's scheduler.
  concurrent-16x16k      16 prompts of 16k tokens in one generate(), max_tokens=1; value = wall time,
  concurrent-16x16k-64   the same with max_tokens=64; median of 2.
  multi-turn             8 conversations x 4 turns in lock-step (one generate() per turn); each turn's
                         prompt = previous prompt + previous answer (32 tokens) + 8k new tokens, so
                         prefix caching serves the history. value = mean per-request TTFT of turns 2-4
                         (RequestOutput.metrics.first_token_latency: arrival to first token, offline API
                         with disable_log_stats=False); prefix-cache hit rate from num_cached_tokens.
For kvr and kvr-tp every record holds collective_rpc("kvr_stats") deltas over the scenario, per worker
(kvr: tokens each worker computed, chain steps; kvr-tp: tokens each rank's guest and vLLM's TP model
computed, the chunks that ran ahead and those TP=N was predicted to finish sooner, and the link profile
the plugin found, "link": kv_runahead.link is left at auto, so a record whose link is not --interconnect
says auto chose another profile than the one the predictions assume): how much of the prefill ran ahead.

  python -m benchmarks.serving --model llama3-8b --n-gpus 2 --configs 1gpu,tp,kvr --budget-s 500 --out $OUT
  python -m benchmarks.serving --model tiny --n-gpus 2 --configs 1gpu,kvr,kvr-tp --smoke --out /tmp/serving_smoke

Cost (H100/H200, Llama-3-8B shape; 1 GPU prefills 16k in ~0.5 s, 32k ~1.2 s, 64k ~3.3 s, 16x16k ~7.6 s).
Per engine: start 60-90 s (torch.compile + CUDA graphs; the compile cache is shared by 1gpu and kvr,
which compile the same per-GPU graph) + ~10 s process start/shutdown. Scenarios on 1 GPU:
default-budget 3 x (1.2 + 3.3) ~ 14 s; concurrent 2 x 7.6 + 2 x (7.6 + 64 decode steps ~1 s) ~ 33 s;
multi-turn 4 turns x 8 x 8k new tokens over a growing history + 4 x 32 decode steps ~ 12-15 s; in all
~60 s, about half that at N=2 and a third at N=4. So:
  call 1 (--n-gpus 2 --configs 1gpu,tp,kvr): 3 engines ~ 3 x 85 + 60 + 2 x 35 ~ 390 s (worst ~470 s)
  call 2 (--n-gpus 4 --configs tp,kvr):      2 engines ~ 2 x 90 + 2 x 25 ~ 230 s (worst ~300 s)
Both fit a 10-minute device call with --budget-s 500; --scenarios / --repeats trim a run further.
"""
import argparse
import json
import os
import statistics
import time
import traceback

from benchmarks import common, models, serving_report

SCENARIOS = ("default-budget", "concurrent", "multi-turn")
SERVING_CONFIGS = ("1gpu", "tp", "kvr", "kvr-tp")

# Scenario sizes: full (GPU) and --smoke (CPU, tiny model: every scenario, scaled down).
FULL = dict(default_lengths=[32768, 65536], conc_n=16, conc_len=16384, conc_gen=64,
            mt_convs=8, mt_turns=4, mt_new=8192, mt_gen=32, warmup_len=4096,
            max_model_len=65536 + 512, repeats_default=3, repeats_conc=2)
SMOKE = dict(default_lengths=[2048, 3072], conc_n=4, conc_len=2048, conc_gen=8,
             mt_convs=2, mt_turns=3, mt_new=1024, mt_gen=8, warmup_len=2048,
             max_model_len=4096, repeats_default=3, repeats_conc=2)
# Prompt tags (common.prompt seeds on (length, tag)): disjoint ranges, so no scenario's prompt can be
# a prefix-cache hit for another's.
TAG_WARMUP, TAG_DEFAULT, TAG_CONC, TAG_MT = 9_000_000, 1_000, 100_000, 500_000


def _k(n):
    return f"{n // 1024}k" if n % 1024 == 0 else str(n)


def conc_names(p):
    base = f"concurrent-{p['conc_n']}x{_k(p['conc_len'])}"
    return [(base, 1), (f"{base}-{p['conc_gen']}", p["conc_gen"])]


def plan(p, scenarios):
    """Every record a config should produce: (scenario, prompt_tokens, max_tokens, num_requests)."""
    out = []
    if "default-budget" in scenarios:
        out += [("default-budget", n, 1, 1) for n in p["default_lengths"]]
    if "concurrent" in scenarios:
        out += [(name, p["conc_len"], mt, p["conc_n"]) for name, mt in conc_names(p)]
    if "multi-turn" in scenarios:
        out.append(("multi-turn", p["mt_new"], p["mt_gen"], p["mt_convs"]))
    return out


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--configs", default="1gpu,tp,kvr", help="of 1gpu, tp, kvr, kvr-tp (1gpu runs once, n_gpus=1)")
    ap.add_argument("--n-gpus", default="2", help="comma list, e.g. 2,4: tp and kvr run at each")
    ap.add_argument("--scenarios", default=",".join(SCENARIOS), help=f"subset of {', '.join(SCENARIOS)}")
    ap.add_argument("--repeats", type=int, default=0,
                    help="repeats of default-budget and concurrent (0: 3 and 2); multi-turn runs once")
    ap.add_argument("--model", default="llama3-8b", choices=sorted(models.MODELS))
    ap.add_argument("--interconnect", default="nvlink", choices=["nvlink", "no-p2p"])
    ap.add_argument("--guest", default="full", choices=["full", "peer"],
                    help="kvr-tp's guest (kv_runahead.guest); peer for llama3-70b / qwen2.5-32b, whose full "
                         "weights do not fit one GPU")
    ap.add_argument("--smoke", action="store_true", help="every scenario scaled down (CPU, --model tiny)")
    ap.add_argument("--lengths", default="", help="comma list: the default-budget scenario's prompt lengths "
                    "(default 32768,65536; smoke 2048,3072); max_model_len follows the longest")
    ap.add_argument("--out", default="bench_out")
    ap.add_argument("--device-name", default=None, help="default: torch.cuda.get_device_name() or 'cpu'")
    ap.add_argument("--budget-s", type=float, default=0,
                    help="stop starting engines/scenarios/repeats after this many seconds (0: no limit)")
    ap.add_argument("--engine-args", default="{}", help='JSON merged into LLM(...), e.g. \'{"max_num_seqs": 64}\'')
    ap.add_argument("--models-dir", default="/tmp/kvr_models")
    # child-only
    ap.add_argument("--one-config", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--deadline", type=float, default=0, help=argparse.SUPPRESS)
    ap.add_argument("--vllm-version", default=None, help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    a.configs = [c.strip() for c in a.configs.split(",") if c.strip()]
    a.n_gpus = [int(x) for x in str(a.n_gpus).split(",") if x.strip()]
    a.scenarios = [s.strip() for s in a.scenarios.split(",") if s.strip()]
    bad = [c for c in a.configs if c not in SERVING_CONFIGS] + [s for s in a.scenarios if s not in SCENARIOS]
    if bad:
        ap.error(f"unknown config/scenario {bad}; configs: {SERVING_CONFIGS}, scenarios: {SCENARIOS}")
    a.params = dict(SMOKE if a.smoke else FULL)
    if a.lengths:
        lengths = sorted(int(x) for x in a.lengths.split(",") if x.strip())
        a.params.update(default_lengths=lengths, max_model_len=max(a.params["max_model_len"], max(lengths) + 512))
    if a.repeats:
        a.params.update(repeats_default=a.repeats, repeats_conc=a.repeats)
    return a


def base_record(a, config, n, scenario, prompt_tokens, max_tokens, num_requests):
    return dict(device=a.device_name, vllm_version=a.vllm_version, model=a.model, scenario=scenario,
                config=config, n_gpus=n, interconnect=a.interconnect, prompt_tokens=prompt_tokens,
                max_tokens=max_tokens, num_requests=num_requests, model_note=models.note(a.model))


def serving_kwargs(config, model_dir, max_len, n, interconnect, extra, guest="full"):
    """LLM(...) arguments: common.engine_kwargs minus everything that overrides vLLM's scheduler
    defaults (step budget, prefix caching, max_num_seqs), and KV-Runahead without options (but kvr-tp's
    guest: "peer" for models whose full weights do not fit one GPU)."""
    kw = common.engine_kwargs("tp" if config in ("tp", "kvr-tp") else "1gpu", model_dir, max_len, n, interconnect, "mp")
    for k in ("max_num_batched_tokens", "enable_prefix_caching", "max_num_seqs"):
        kw.pop(k, None)
    if config == "kvr":
        kw.update(worker_cls="vllm_kvrunahead.Worker", prefill_context_parallel_size=n)
        if n > 1:
            kw["distributed_executor_backend"] = "mp"
    elif config == "kvr-tp":   # TP=N with KV-Runahead's worker: the TP layout
        kw["worker_cls"] = "vllm_kvrunahead.Worker"
        if guest != "full":
            kw["additional_config"] = {"kv_runahead": {"guest": guest}}
    kw["disable_log_stats"] = False   # LLM turns stats off; on, RequestOutput.metrics carries per-request TTFT
    kw.update(extra)
    return kw


# ---------------------------------------------------------------- child: one engine, all scenarios
def rank_figures(x: dict) -> dict:
    """One rank's kvr_stats with the TP layout's per-rank figures under the names the reports use: its
    guest's tokens (its own segments) and vLLM's TP model's tokens on it."""
    if x.get("mode") == "tp_layout":
        return dict(x, guest_tokens=x["segment_tokens"][x["position"]], tp_tokens=x["tokens_run"])
    return x


def _numeric(d):
    """The numeric (not bool) fields of a dict, one level of nested dicts flattened as a.b."""
    out = {}
    for k, v in (d or {}).items():
        if isinstance(v, bool):
            continue
        if isinstance(v, (int, float)):
            out[k] = v
        elif isinstance(v, dict):
            out.update({f"{k}.{k2}": v2 for k2, v2 in _numeric(v).items()})
    return out


class KvrStats:
    """collective_rpc("kvr_stats") before and after a scenario -> per-worker deltas of numeric fields, and
    how much of the prefill ran ahead (layout "head": tokens on chain workers; "tp": tokens on the guests)."""

    def __init__(self, llm, enabled):
        self.llm, self.enabled = llm, enabled

    def snap(self):
        if not self.enabled:
            return None
        try:
            return self.llm.collective_rpc("kvr_stats")
        except Exception as e:  # noqa: BLE001 - keep measuring if the plugin's stats change
            print(f"kvr_stats failed: {e!r}", flush=True)
            return None

    def delta(self, before):
        after = self.snap()
        if before is None or after is None:
            return None
        workers = []
        for b, x in zip(before, after):
            nb, nx = _numeric(rank_figures(b)), _numeric(rank_figures(x))
            w = {k: nx[k] - nb.get(k, 0) for k in nx if k not in ("rank", "position")}
            w.update(rank=x.get("rank"), position=x.get("position"), returns_output=x.get("returns_output"))
            workers.append(w)
        workers.sort(key=lambda w: (w["position"] is None, w["position"]))
        if after and after[0].get("mode") == "tp_layout":
            return self._tp_layout(workers, after[0].get("partition"), after[0].get("link"))
        head = sum(w.get("tokens_run", 0) for w in workers if w["returns_output"])
        chain = sum(w.get("tokens_run", 0) for w in workers if not w["returns_output"])
        return dict(layout="head", workers=workers, head_tokens=head, chain_tokens=chain,
                    chain_share=chain / (head + chain) if head + chain else None,
                    partition=after[0].get("partition") if after else None)

    @staticmethod
    def _tp_layout(workers, partition, link=None):
        """Every rank runs vLLM's TP step (the same tokens on each) after its guest's segments; the share
        ahead is the guests' tokens of all prefill tokens computed (vLLM's TP model: each chunk's last token,
        and the chunks that did not run ahead)."""
        guest = sum(w.get("guest_tokens", 0) for w in workers)
        tp = workers[0].get("tp_tokens", 0) - workers[0].get("decode_tokens", 0) if workers else 0
        return dict(layout="tp", workers=workers, guest_tokens=guest, tp_prefill_tokens=tp,
                    chain_share=guest / (guest + tp) if guest + tp else None,
                    chunks_ahead=workers[0].get("chunks_ahead") if workers else None,
                    chunks_not_ahead={k.split(".", 1)[1]: v for k, v in workers[0].items()
                                      if k.startswith("chunks_not_ahead.") and v} if workers else None,
                    partition=partition, link=link)


def _ttft(o):
    """Per-request TTFT (arrival to first token) from RequestOutput.metrics, None where not filled."""
    v = getattr(getattr(o, "metrics", None), "first_token_latency", 0) or 0
    return v if v > 0 else None


def _prefix_counters(llm):
    """Cumulative prefix-cache (queries, hits) in tokens from vLLM's Prometheus metrics, or None."""
    try:
        q = h = 0
        for m in llm.get_metrics():
            if m.name == "vllm:prefix_cache_queries":
                q += m.value
            elif m.name == "vllm:prefix_cache_hits":
                h += m.value
        return q, h
    except Exception:  # noqa: BLE001 - stats logging off or renamed: the record just lacks it
        return None


def run_one(a):
    from vllm import LLM, SamplingParams
    cfg, n = a.one_config.split(":")
    n = int(n)
    p = a.params
    vocab = models.vocab_size(a.model)
    kw = serving_kwargs(cfg, os.path.join(a.models_dir, a.model), p["max_model_len"], n, a.interconnect,
                        json.loads(a.engine_args), a.guest)
    print("ENGINE", json.dumps(kw), flush=True)
    t0 = time.perf_counter()
    llm = LLM(**kw)
    start_s = time.perf_counter() - t0
    vc = llm.llm_engine.vllm_config
    pc = vc.parallel_config
    engine = dict(dtype=kw["dtype"], engine_start_s=round(start_s, 1),
                  max_num_batched_tokens=vc.scheduler_config.max_num_batched_tokens,
                  max_num_seqs=vc.scheduler_config.max_num_seqs, kv_cache_tokens=common.kv_cache_tokens(llm),
                  chunked_prefill=vc.scheduler_config.enable_chunked_prefill,
                  prefix_caching=vc.cache_config.enable_prefix_caching, max_model_len=p["max_model_len"],
                  parallel=dict(world=pc.world_size, tp=pc.tensor_parallel_size,
                                pcp=pc.prefill_context_parallel_size, worker_cls=str(pc.worker_cls)),
                  guest=((vc.additional_config or {}).get("kv_runahead") or {}).get("guest"))
    print(f"RESULT {cfg} N={n}: engine start {start_s:.1f} s, {json.dumps(engine)}", flush=True)
    stats = KvrStats(llm, cfg in ("kvr", "kvr-tp"))
    if cfg == "kvr-tp":
        link = llm.collective_rpc("kvr_stats")[0].get("link")
        engine["link"] = link
        print(f"RESULT {cfg} N={n}: link profile {link}" + ("" if link == a.interconnect else
              f" (auto), not --interconnect {a.interconnect}: the predictions for {a.interconnect} do not apply"),
              flush=True)
    out_json = os.path.join(a.out, "serving.json")
    over = (lambda: a.deadline and time.time() > a.deadline)

    def gen(prompts, max_tokens):
        sp = SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True)
        t = time.perf_counter()
        outs = llm.generate(prompts, sp, use_tqdm=False)
        dt = time.perf_counter() - t
        for o in outs:
            if len(o.outputs[0].token_ids) != max_tokens:
                raise RuntimeError(f"asked {max_tokens} tokens, got {len(o.outputs[0].token_ids)}")
        return dt, outs

    # Warm-up (excluded): long enough for the cost model to run it ahead (~1.1k tokens at N=2, ~2.3k at N=4), a
    # few decodes.
    _, w = gen([common.prompt(p["warmup_len"], vocab, TAG_WARMUP)], 4)
    have_metrics = _ttft(w[0]) is not None
    print(f"RESULT {cfg} N={n}: warm-up done, per-request metrics {'on' if have_metrics else 'OFF'}", flush=True)

    def emit(rec):
        common.merge_records(out_json, [rec], serving_report.KEY)
        print("RESULT " + json.dumps(rec), flush=True)

    def timed(scenario, prompt_tokens, max_tokens, num_requests, repeats, make_prompts, note):
        """value_s = median wall time of generate() over repeats (fresh prompts each), stopped early
        (with what it has) past the deadline."""
        rec = dict(base_record(a, cfg, n, scenario, prompt_tokens, max_tokens, num_requests), **engine)
        if over():
            emit(dict(rec, error="skipped: time budget"))
            return
        try:
            before = stats.snap()
            ts, req_ttft = [], []
            for r in range(repeats):
                if r and over():
                    rec["note_budget"] = f"cut to {r} of {repeats} repeats by the time budget"
                    break
                dt, outs = gen(make_prompts(r), max_tokens)
                ts.append(dt)
                req_ttft.append([_ttft(o) for o in outs])
            rec.update(value_s=statistics.median(ts), repeats=ts, note=note)
            if have_metrics and num_requests > 1:
                last = [x for x in req_ttft[-1] if x is not None]
                rec.update(ttft_mean_s=statistics.mean(last), ttft_max_s=max(last), ttft_last_repeat_s=last)
            k = stats.delta(before)
            if k is not None:
                rec["kvr"] = k
        except Exception as e:  # noqa: BLE001 - OOM or plugin error: record it, go on
            traceback.print_exc()
            rec["error"] = f"{type(e).__name__}: {e}"[:500]
        emit(rec)

    if "default-budget" in a.scenarios:
        for L in p["default_lengths"]:
            timed("default-budget", L, 1, 1, p["repeats_default"],
                  lambda r, L=L: [common.prompt(L, vocab, TAG_DEFAULT + r)],
                  "TTFT = wall time of generate([prompt], max_tokens=1), vLLM's default step budget")
    if "concurrent" in a.scenarios:
        for i, (name, mt) in enumerate(conc_names(p)):
            timed(name, p["conc_len"], mt, p["conc_n"], p["repeats_conc"],
                  lambda r, i=i: [common.prompt(p["conc_len"], vocab, TAG_CONC + 50_000 * i + 100 * r + j)
                                  for j in range(p["conc_n"])],
                  f"wall time of one generate() of {p['conc_n']} prompts, max_tokens={mt}; "
                  "ttft_*: per-request arrival to first token, last repeat")
    if "multi-turn" in a.scenarios:
        emit(multi_turn(a, cfg, n, p, vocab, gen, stats, engine, have_metrics, llm, over))
    common.shutdown(llm)


def multi_turn(a, cfg, n, p, vocab, gen, stats, engine, have_metrics, llm, over):
    """Lock-step conversations; value_s = mean per-request TTFT of turns 2.. (prefix-cache hits)."""
    import numpy as np
    rec = dict(base_record(a, cfg, n, "multi-turn", p["mt_new"], p["mt_gen"], p["mt_convs"]), **engine)
    if over():
        return dict(rec, error="skipped: time budget")
    rng = np.random.default_rng(7)
    hist = [[] for _ in range(p["mt_convs"])]
    turns = []
    try:
        before, prom0 = stats.snap(), _prefix_counters(llm)
        for t in range(p["mt_turns"]):
            if t and over():
                rec["note_budget"] = f"cut to {t} of {p['mt_turns']} turns by the time budget"
                break
            prompts = []
            for c in range(p["mt_convs"]):
                hist[c] = hist[c] + common.prompt(p["mt_new"], vocab, TAG_MT + 100 * t + c)["prompt_token_ids"]
                prompts.append({"prompt_token_ids": list(hist[c])})
            mt = p["mt_gen"] if have_metrics else 1
            wall, outs = gen(prompts, mt)
            if have_metrics:
                ttft = [_ttft(o) for o in outs]
                answers = [list(o.outputs[0].token_ids) for o in outs]
            else:   # TTFT of the turn = wall time of generate(max_tokens=1); answer = random tokens
                ttft = [wall] * len(outs)
                answers = [rng.integers(1, vocab, size=p["mt_gen"]).tolist() for _ in outs]
            for c in range(p["mt_convs"]):
                hist[c] += answers[c]
            cached = [o.num_cached_tokens or 0 for o in outs]
            lens = [len(x["prompt_token_ids"]) for x in prompts]
            turns.append(dict(turn=t + 1, wall_s=wall, ttft_s=ttft, ttft_mean_s=statistics.mean(ttft),
                              prompt_tokens=lens, cached_tokens=cached, hit_rate=sum(cached) / sum(lens)))
            print(f"RESULT {cfg} N={n} multi-turn turn {t + 1}: mean TTFT {turns[-1]['ttft_mean_s']:.4f} s, "
                  f"wall {wall:.3f} s, prefix-cache hit rate {turns[-1]['hit_rate']:.3f}", flush=True)
        later = [x for tr in turns[1:] for x in tr["ttft_s"]]
        rec.update(value_s=statistics.mean(later) if later else None, turns=turns,
                   repeats=[tr["ttft_mean_s"] for tr in turns],
                   hit_rate=(sum(sum(tr["cached_tokens"]) for tr in turns[1:]) /
                             sum(sum(tr["prompt_tokens"]) for tr in turns[1:])) if turns[1:] else None,
                   note=("value = mean per-request TTFT (RequestOutput.metrics.first_token_latency) of turns "
                         f"2-{len(turns)}; history = previous prompt + its {p['mt_gen']} generated tokens + "
                         f"{p['mt_new']} new tokens; repeats = mean TTFT per turn; hit_rate = cached / "
                         "prompt tokens of turns 2..") if have_metrics else
                        ("RequestOutput.metrics not filled: TTFT per turn = wall time of generate(max_tokens=1) "
                         f"of the whole turn; the answer appended to the history is {p['mt_gen']} random tokens"))
        prom1 = _prefix_counters(llm)
        if prom0 and prom1 and prom1[0] > prom0[0]:
            rec["hit_rate_prometheus"] = (prom1[1] - prom0[1]) / (prom1[0] - prom0[0])   # all turns
        if rec["value_s"] is None:
            rec["error"] = "skipped: time budget (only turn 1 ran)"
        k = stats.delta(before)
        if k is not None:
            rec["kvr"] = k
    except Exception as e:  # noqa: BLE001
        traceback.print_exc()
        rec["error"] = f"{type(e).__name__}: {e}"[:500]
    return rec


# ---------------------------------------------------------------- parent: one child per (config, N)
MIN_START_S = 120   # do not start an engine with less left: ~60-90 s start + one scenario


def main(a):
    t_start, deadline, cpu = common.start_parent(a)
    print(f"device={a.device_name} vllm={a.vllm_version} model={a.model} n_gpus={a.n_gpus} configs={a.configs} "
          f"scenarios={a.scenarios} smoke={a.smoke} interconnect={a.interconnect}", flush=True)
    # KV-Runahead before tp at each N, the TP layout first: if the budget runs out, the comparison is what is lost.
    runs = ([("1gpu", 1)] if "1gpu" in a.configs else []) + \
        [(c, n) for n in a.n_gpus for c in ("kvr-tp", "kvr", "tp") if c in a.configs]
    out_json = os.path.join(a.out, "serving.json")
    for cfg, n in runs:
        tag = f"serving_{a.model}_{cfg}_n{n}_{a.interconnect}"
        log = os.path.join(a.out, "logs", tag + ".log")
        left = deadline - time.time() if deadline else None
        done = set()
        if left is not None and left < MIN_START_S:
            why = "skipped: time budget"
        else:
            argv = ["benchmarks.serving", "--one-config", f"{cfg}:{n}", "--device-name", a.device_name,
                    "--vllm-version", str(a.vllm_version), "--deadline", str(deadline)] + _pass_through(a)
            env = common.child_env(cfg, n, a.interconnect, cpu)
            if cpu:
                env.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")   # GiB; the default (4+) is a lot on a small box
            t = time.time()
            # Past the deadline the child stops starting work by itself; the timeout is the backstop.
            rc, lines = common.run_child(argv, env, log, timeout=left + 45 if left is not None else None)
            print(f"[{tag}] child rc={rc} in {time.time() - t:.0f} s, log {log}", flush=True)
            for line in lines:
                if line.startswith("RESULT {"):
                    r = json.loads(line[len("RESULT "):])
                    done.add((r["scenario"], r["prompt_tokens"], r["max_tokens"]))
            why = f"config failed (rc={rc}): {common.first_error(log)}"
            if rc != 0:
                print(common.tail(log), flush=True)
        missing = [dict(base_record(a, cfg, n, s, pt, mt, nr), error=why)
                   for s, pt, mt, nr in plan(a.params, a.scenarios) if (s, pt, mt) not in done]
        if missing:
            common.merge_records(out_json, missing, serving_report.KEY)
    print(f"done in {time.time() - t_start:.0f} s -> {out_json}", flush=True)
    if os.path.exists(out_json):
        serving_report.write(a.out, png=False)


def _pass_through(a):
    return ["--n-gpus", ",".join(map(str, a.n_gpus)), "--model", a.model, "--interconnect", a.interconnect,
            "--guest", a.guest,
            "--scenarios", ",".join(a.scenarios), "--repeats", str(a.repeats), "--out", a.out,
            "--engine-args", a.engine_args, "--models-dir", a.models_dir, "--lengths", a.lengths,
            "--configs", ",".join(a.configs)] + (["--smoke"] if a.smoke else [])


if __name__ == "__main__":
    args = parse_args()
    common.child_or_parent(args, run_one, main)
