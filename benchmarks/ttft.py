"""TTFT benchmark: plain vLLM (1 GPU), tensor parallel, and KV-Runahead (even / balanced / table partition;
kvr-tp: the TP layout).

One engine per config, each in its own child process, measuring all prompt lengths; the kvr-even,
kvr-balanced and kvr-table configs share one KV-Runahead engine (chain of full-model copies, the last
decodes) and switch partition by RPC (kvr_set_partition). With --tune-lengths that engine first runs the
tuner (vllm_kvrunahead.tools.tune) and kvr-table uses its table. kvr-tp is an engine of its own: TP=N with
KV-Runahead's worker (vLLM's TP model decodes, every rank's full-model guest runs prompts ahead; cost-model
split, every prompt ahead), its records holding per rank what ran ahead (kvr_stats deltas).
  TTFT     = wall time of llm.generate([prompt], max_tokens=1)  (`vllm bench latency --output-len 1`)
  decode   = 64 / (t(max_tokens=65) - TTFT median)  tokens/s of one request
  KV       = kv_cache_tokens: tokens of KV the engine holds (vLLM's blocks x block size), every config
Records are merged into OUT/ttft.json as soon as each length is measured (so a run cut short by
the device's time limit keeps what it got), replacing records with the same key.

  python -m benchmarks.ttft --model llama3-8b --configs 1gpu,tp,kvr-even,kvr-balanced --n-gpus 2 \
      --lengths 4096,8192,16384,32768,65536 --out $OUT
"""
import argparse
import json
import os
import statistics
import time

from benchmarks import common, models

KEY = ("device", "model", "prompt_tokens", "config", "n_gpus", "interconnect", "backend")
GEN_TOKENS = 65   # the decode probe; the engine's max_model_len leaves room for it


def merge_records(path, new):
    """Append `new` to the list in `path`, dropping older records with the same KEY. Atomic."""
    common.merge_records(path, new, KEY)


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--configs", default="1gpu,tp,kvr-even,kvr-balanced")
    ap.add_argument("--n-gpus", type=int, default=2)
    ap.add_argument("--lengths", default="4096,8192,16384,32768")
    ap.add_argument("--model", default="llama3-8b", choices=sorted(models.MODELS))
    ap.add_argument("--interconnect", default="nvlink", choices=["nvlink", "no-p2p"])
    ap.add_argument("--backend", default="mp", choices=["mp", "ray"])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", default="bench_out")
    ap.add_argument("--device-name", default=None, help="default: torch.cuda.get_device_name() or 'cpu'")
    ap.add_argument("--budget-s", type=float, default=0,
                    help="stop starting configs/lengths after this many seconds (0: no limit); set it "
                         "below the device call's limit so the run ends cleanly with its records")
    ap.add_argument("--engine-args", default="{}", help='JSON merged into LLM(...), e.g. \'{"enforce_eager": true}\'')
    ap.add_argument("--models-dir", default="/tmp/kvr_models")
    ap.add_argument("--tune-lengths", default="", help="kvr engine: tune a table at these lengths first")
    ap.add_argument("--tune-args", default="{}", help='JSON for vllm_kvrunahead.tools.tune.tune, e.g. \'{"levels": 2}\'')
    ap.add_argument("--table", default=None, help="kvr-table without tuning: this lookup table JSON")
    ap.add_argument("--early-send", action="store_true",
                    help="kvr engine with early_send on; its records are named kvr-*-early (A/B against a run without)")
    # child-only
    ap.add_argument("--one-config", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--deadline", type=float, default=0, help=argparse.SUPPRESS)
    ap.add_argument("--vllm-version", default=None, help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    a.lengths = sorted(int(x) for x in a.lengths.split(","))
    a.configs = [c.strip() for c in a.configs.split(",") if c.strip()]
    a.tune_lengths = sorted(int(x) for x in a.tune_lengths.split(",") if x.strip())
    # all measured in one "kvr" engine; kvr-tp (another layout) runs alone
    a.kvr_variants = [c for c in a.configs if c.startswith("kvr-") and c != "kvr-tp"]
    return a


KVR_VARIANTS = {"kvr-even": "even", "kvr-balanced": "model", "kvr-table": None}   # None: the table


def kvr_name(a, variant):
    """The config name a kvr variant's records carry (-early: measured with early_send on)."""
    return variant + ("-early" if a.early_send else "")


def base_record(a, config):
    return dict(device=a.device_name, vllm_version=a.vllm_version, model=a.model, config=config,
                n_gpus=a.n_gpus, interconnect=a.interconnect, backend=a.backend,
                model_note=models.note(a.model))


# ---------------------------------------------------------------- child: one engine, all lengths
def run_one(a):
    from vllm import LLM, SamplingParams
    cfg = a.one_config
    vocab = models.vocab_size(a.model)
    max_len = max(a.lengths) + 128   # room for the 65-token decode probe
    kw = common.engine_kwargs(cfg, os.path.join(a.models_dir, a.model), max_len, a.n_gpus, a.interconnect,
                              a.backend, json.loads(a.engine_args))
    if cfg == "kvr" and a.early_send:
        kw["additional_config"]["kv_runahead"]["early_send"] = True
    print("ENGINE", json.dumps(kw), flush=True)
    t0 = time.perf_counter()
    llm = LLM(**kw)
    start_s = time.perf_counter() - t0
    # What the engine really runs with (a config silently falling back to 1 GPU would show here).
    pc = llm.llm_engine.vllm_config.parallel_config
    parallel = dict(world=pc.world_size, tp=pc.tensor_parallel_size, pcp=pc.prefill_context_parallel_size,
                    worker_cls=str(pc.worker_cls))
    print(f"RESULT {cfg}: engine start {start_s:.1f} s", flush=True)

    def gen(length, tag, max_tokens=1):
        sp = SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True)
        t = time.perf_counter()
        o = llm.generate([common.prompt(length, vocab, tag)], sp, use_tqdm=False)
        dt = time.perf_counter() - t
        n = len(o[0].outputs[0].token_ids)
        if n != max_tokens:
            raise RuntimeError(f"asked {max_tokens} tokens, got {n}")
        return dt

    engine = dict(dtype=kw["dtype"], parallel=parallel, engine_start_s=round(start_s, 1),
                  kv_cache_tokens=common.kv_cache_tokens(llm))
    print(f"RESULT {cfg}: KV cache {engine['kv_cache_tokens']} tokens", flush=True)
    if cfg != "kvr":
        measure_lengths(a, cfg, gen, engine, counts=(lambda: tp_layout_counts(llm)) if cfg == "kvr-tp" else None)
        common.shutdown(llm)
        return
    table = None
    if a.tune_lengths:
        from vllm_kvrunahead.tools.tune import tune
        table = tune(llm, a.n_gpus, a.tune_lengths, log=lambda m: print("RESULT tune: " + m, flush=True),
                     **json.loads(a.tune_args))
        path = os.path.join(a.out, f"table_{a.model}_n{a.n_gpus}_{a.interconnect}.json")
        with open(path, "w") as f:
            json.dump(table, f, indent=1)
        print(f"RESULT table written: {path}", flush=True)
    elif a.table:
        with open(a.table) as f:
            table = json.load(f)
    for variant in a.kvr_variants:
        method = KVR_VARIANTS[variant]
        if method is None and table is None:
            print(f"ERROR {variant}: no table (give --tune-lengths or --table)", flush=True)
            continue
        desc = llm.collective_rpc("kvr_set_partition", args=(method, table if method is None else None))[0]
        print(f"RESULT {variant}: partition {desc}", flush=True)

        def profile():
            st = sorted(llm.collective_rpc("kvr_stats"), key=lambda x: x["position"])
            return [dict(pos=x["position"], step_s=x["profile"]["last_step_s"],
                         stall_s=x["profile"]["last_stall_s"], segment=(x["last_segments"] or [None])[-1])
                    for x in st if x["profile"]]
        measure_lengths(a, kvr_name(a, variant), gen, dict(engine, partition=desc), profile)
    common.shutdown(llm)


TP_LAYOUT_COUNTS = ("chunks_ahead", "tokens_ahead", "guest_tokens", "tp_tokens", "decode_tokens", "bytes_sent",
                    "bytes_received")


def tp_layout_counts(llm):
    """kvr-tp: per TP rank, the kvr_stats counters that say where prompts ran (guests ahead or vLLM's TP model)."""
    st = sorted(llm.collective_rpc("kvr_stats"), key=lambda x: x["tp_rank"])
    from benchmarks.serving import rank_figures

    return [{k: rank_figures(x)[k] for k in TP_LAYOUT_COUNTS} for x in st]


def measure_lengths(a, cfg, gen, extra, profile=None, counts=None):
    """TTFT (median of a.repeats after a warm-up) and decode speed at every length -> ttft.json. counts: per-rank
    counters, recorded as their change over the warm-up and timed repeats ("runahead")."""
    out_json = os.path.join(a.out, "ttft.json")
    for n in a.lengths:
        rec = dict(base_record(a, cfg), prompt_tokens=n, **extra)
        if a.deadline and time.time() > a.deadline:
            rec["error"] = "skipped: time budget"
        else:
            try:
                before = counts() if counts else None
                gen(n, 10_000)                                   # warm-up, excluded
                ts = [gen(n, r) for r in range(a.repeats)]       # a new prompt each repeat: nothing to cache
                med = statistics.median(ts)
                if profile is not None:
                    rec["profile"] = profile()                   # per chain worker, of the last repeat
                if counts:
                    rec["runahead"] = [{k: x[k] - b[k] for k in x} for b, x in zip(before, counts(), strict=True)]
                t65 = gen(n, 20_000, GEN_TOKENS)
                rec.update(ttft_s_median=med, ttft_s_all=ts, t_gen65_s=t65,
                           decode_tok_s=(GEN_TOKENS - 1) / (t65 - med) if t65 > med else None)
            except Exception as e:  # noqa: BLE001 - OOM or plugin error: record it, try the next length
                rec["error"] = f"{type(e).__name__}: {e}"[:500]
        merge_records(out_json, [rec])
        print("RESULT " + json.dumps(rec), flush=True)


# ---------------------------------------------------------------- parent: one child per config
def main(a):
    t_start, deadline, cpu = common.start_parent(a)
    print(f"device={a.device_name} vllm={a.vllm_version} model={a.model} n_gpus={a.n_gpus} "
          f"interconnect={a.interconnect} backend={a.backend} lengths={a.lengths}", flush=True)
    unknown = [c for c in a.kvr_variants if c not in KVR_VARIANTS]
    if unknown:
        raise SystemExit(f"unknown config(s) {unknown}; known: 1gpu, tp, kvr-tp, {', '.join(KVR_VARIANTS)}")
    children = [c for c in a.configs if c not in a.kvr_variants] + (["kvr"] if a.kvr_variants else [])
    for cfg in children:
        names = [kvr_name(a, v) for v in a.kvr_variants] if cfg == "kvr" else [cfg]
        tag = f"{a.model}_{cfg}_n{a.n_gpus}_{a.interconnect}_{a.backend}"
        log = os.path.join(a.out, "logs", tag + ".log")
        left = deadline - time.time() if deadline else None
        done = set()
        if left is not None and left < 60:    # an engine alone takes ~60 s to start
            rc, why = "skipped", "skipped: time budget"
        else:
            argv = ["benchmarks.ttft", "--one-config", cfg, "--device-name", a.device_name,
                    "--vllm-version", str(a.vllm_version), "--deadline", str(deadline)] + _pass_through(a)
            t = time.time()
            rc, lines = common.run_child(argv, common.child_env(cfg, a.n_gpus, a.interconnect, cpu), log,
                                         timeout=left)
            print(f"[{tag}] child rc={rc} in {time.time() - t:.0f} s, log {log}", flush=True)
            for line in lines:
                if line.startswith("RESULT {"):
                    r = json.loads(line[len("RESULT "):])
                    done.add((r["config"], r["prompt_tokens"]))
            why = f"config failed (rc={rc}): {common.first_error(log)}"
            if rc != 0:
                print(common.tail(log), flush=True)
        missing = [dict(base_record(a, c), prompt_tokens=n, error=why) for c in names for n in a.lengths
                   if (c, n) not in done]
        if missing:
            merge_records(os.path.join(a.out, "ttft.json"), missing)
    print(f"done in {time.time() - t_start:.0f} s -> {os.path.join(a.out, 'ttft.json')}", flush=True)


def _pass_through(a):
    return ["--n-gpus", str(a.n_gpus), "--lengths", ",".join(map(str, a.lengths)), "--model", a.model,
            "--interconnect", a.interconnect, "--backend", a.backend, "--repeats", str(a.repeats),
            "--out", a.out, "--engine-args", a.engine_args, "--models-dir", a.models_dir,
            "--configs", ",".join(a.configs), "--tune-lengths", ",".join(map(str, a.tune_lengths)),
            "--tune-args", a.tune_args] + (["--table", a.table] if a.table else []) + \
        (["--early-send"] if a.early_send else [])


if __name__ == "__main__":
    args = parse_args()
    common.child_or_parent(args, run_one, main)
