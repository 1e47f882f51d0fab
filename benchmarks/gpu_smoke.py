"""Are the plugin's patches inert for engines that run no KV-Runahead chain? One GPU, model runner V2.

  python -m benchmarks.gpu_smoke --out $OUT            # GPU: small Llama (4 layers, hidden 1024, GQA 16q/4kv), bf16
  python -m benchmarks.gpu_smoke --out /tmp/s --tiny   # CPU smoke of this script (tiny Llama, fp32, eager)

Three engines, each in its own child process (so no vLLM state leaks between them), same weights and prompts:
  a  plain vLLM, the plugin NOT loaded: VLLM_PLUGINS names every other general plugin (or "none")
  b  plain vLLM, the plugin loaded through its entry point (VLLM_PLUGINS unset, vLLM's default)
  c  the plugin's worker with one worker: worker_cls="vllm_kvrunahead.Worker", prefill_context_parallel_size=1
Engine settings: dummy weights, then redrawn N(0, 0.02) per parameter name (gpu_correctness.reinit_normal, so
tokens depend on the whole context; vLLM's dummy values make a context-blind model), max_model_len 8192,
max_num_batched_tokens 2048 (a 5000-token prompt is prefilled in 3 chunks, which drives update_requests for
running requests), prefix caching on, seed 0, vLLM's default CUDA graphs on GPU, greedy, 16 tokens
(ignore_eos), logprobs=1. Prompts, one generate() call each: 5000 tokens; 300 tokens; the first 4096 tokens of
the 5000-token prompt + 600 new ones (a prefix-cache hit); then 8 concurrent prompts of mixed lengths.

Inside each engine's worker (llm.collective_rpc with a function; VLLM_ALLOW_INSECURE_SERIALIZATION=1): the
worker and model-runner classes, whether the runner is model runner V2's
(vllm.v1.worker.gpu.model_runner.GPUModelRunner or a subclass), whether GPUModelRunner.update_requests carries
the plugin's `_kvrunahead` marker (patch head-runner-starts-at-its-segment applied), whether the runner's
update_requests resolves to that class attribute, and how often it was called during the generates (an
instance-level counter that delegates to the class method, installed before the first generate). The CPU build
runs model runner V1 (CPUModelRunner), so the V2 checks are reported as not applicable there.

Writes OUT/gpu_smoke.json (every request's tokens and per-token logprobs per engine, worker checks, engine start
times, versions, device) and OUT/gpu_smoke.md (the comparison table); per-engine logs in OUT/engine_<x>.log.
"""
import argparse
import json
import os
import subprocess
import sys
import time

from benchmarks import common

MAX_TOKENS = 16
ENGINES = {
    "a": "plain vLLM, plugin not loaded (VLLM_PLUGINS excludes it)",
    "b": "plain vLLM, plugin loaded (entry point)",
    "c": "plugin worker, 1 worker (worker_cls=vllm_kvrunahead.Worker, pcp=1)",
}
_LLAMA = dict(architectures=["LlamaForCausalLM"], model_type="llama", hidden_act="silu", rms_norm_eps=1e-5,
              attention_bias=False, mlp_bias=False, bos_token_id=1, eos_token_id=2, tie_word_embeddings=False,
              rope_theta=10000.0, max_position_embeddings=8192)
MODELS = {
    "small": dict(_LLAMA, hidden_size=1024, num_hidden_layers=4, num_attention_heads=16, num_key_value_heads=4,
                  intermediate_size=2816, vocab_size=32000, dtype="bfloat16", torch_dtype="bfloat16"),
    # head_dim 32 given explicitly: 64/4 = 16 is not a head size vLLM's CPU attention takes.
    "tiny": dict(_LLAMA, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, head_dim=32,
                 num_key_value_heads=2, intermediate_size=128, vocab_size=512, dtype="float32",
                 torch_dtype="float32"),
}
BATCH_LENGTHS = (17, 130, 700, 1500, 2600, 3333, 4100, 6000)   # the 8 concurrent prompts


def write_model(name, root):
    d = os.path.join(root, f"smoke-{name}")
    os.makedirs(d, exist_ok=True)
    cfg = MODELS[name]
    with open(os.path.join(d, "config.json"), "w") as f:
        json.dump(cfg, f, indent=1)
    with open(os.path.join(d, "generation_config.json"), "w") as f:
        json.dump(dict(bos_token_id=cfg["bos_token_id"], eos_token_id=cfg["eos_token_id"]), f)
    return d


def prompts(vocab):
    """(name, [token ids]) per generate() call."""
    import numpy as np

    def ids(n, tag):
        return np.random.default_rng([n, tag]).integers(3, vocab, size=n).tolist()

    long = ids(5000, 1)
    return [("long5000", [long]), ("short300", [ids(300, 2)]),
            ("prefix4096+600", [long[:4096] + ids(600, 3)]),
            ("batch8", [ids(n, 10 + i) for i, n in enumerate(BATCH_LENGTHS)])]


# ---- run inside the worker (llm.collective_rpc); imported by module name so the worker can unpickle it ----

def worker_checks(worker, install_counter=False):
    import sys as _sys
    worker = getattr(worker, "worker", worker)   # vLLM's WorkerWrapperBase holds the worker
    runner = worker.model_runner
    r = dict(pid=os.getpid(), worker_cls=f"{type(worker).__module__}.{type(worker).__qualname__}",
             runner_cls=f"{type(runner).__module__}.{type(runner).__qualname__}",
             runner_mro=[f"{c.__module__}.{c.__qualname__}" for c in type(runner).__mro__[:6]])
    plugin = _sys.modules.get("vllm_kvrunahead.plugin")
    r["plugin_registered_here"] = bool(plugin and plugin.is_registered())
    patches = _sys.modules.get("vllm_kvrunahead.vllm_side.patches")
    r["patches_applied_here"] = sorted(getattr(patches, "_applied", ())) if patches else []
    try:
        from vllm.v1.worker.gpu.model_runner import GPUModelRunner as V2
    except Exception as e:  # noqa: BLE001
        r["v2_import_error"] = repr(e)
        return r
    r["runner_is_v2"] = isinstance(runner, V2)
    r["patch_marker_on_v2_update_requests"] = bool(getattr(V2.update_requests, "_kvrunahead", False))
    r["update_requests_code"] = V2.update_requests.__code__.co_filename
    if r["runner_is_v2"]:
        r["runner_update_requests_is_class_attr"] = type(runner).update_requests is V2.update_requests
        from vllm_kvrunahead.vllm_side.seam import SEGMENT_STARTS
        r["runner_has_segment_starts_mark"] = getattr(runner, SEGMENT_STARTS, None) is not None
        if install_counter and "update_requests" not in vars(runner):
            bound = runner.update_requests   # the class's (the plugin's wrapper where it is applied)
            runner._smoke_update_requests_calls = 0

            def counted(scheduler_output):
                runner._smoke_update_requests_calls += 1
                return bound(scheduler_output)
            runner.update_requests = counted
        r["update_requests_calls"] = getattr(runner, "_smoke_update_requests_calls", None)
    return r


# ---- one engine (child process) ----

def run_engine(a):
    import importlib.metadata as md

    import torch
    import vllm
    from vllm import LLM, SamplingParams

    gpu = torch.cuda.is_available()
    model_dir = write_model(a.model, a.models_dir)
    kw = dict(model=model_dir, load_format="dummy", skip_tokenizer_init=True,
              dtype="bfloat16" if gpu else "float32", max_model_len=8192, max_num_batched_tokens=2048,
              enable_prefix_caching=True, seed=0, max_num_seqs=16)
    if gpu:
        kw["gpu_memory_utilization"] = 0.85
    else:
        kw["enforce_eager"] = True   # compile time dominates on CPU; GPU keeps vLLM's default CUDA graphs
        kw["gpu_memory_utilization"] = 0.25   # on CPU: the share of host memory reserved
    if a.engine == "c":
        kw.update(worker_cls="vllm_kvrunahead.Worker", prefill_context_parallel_size=1)
    print("ENGINE", json.dumps(kw), "VLLM_PLUGINS=%r" % os.environ.get("VLLM_PLUGINS"), flush=True)
    rec = dict(engine=a.engine, what=ENGINES[a.engine], engine_kwargs=kw,
               vllm_plugins_env=os.environ.get("VLLM_PLUGINS"),
               vllm=vllm.__version__, torch=torch.__version__,
               device=torch.cuda.get_device_name() if gpu else "cpu",
               general_plugins_found=[(e.name, e.value) for e in md.entry_points(group="vllm.general_plugins")])
    t0 = time.time()
    llm = LLM(**kw)
    rec["engine_start_s"] = round(time.time() - t0, 2)
    plugin = sys.modules.get("vllm_kvrunahead.plugin")
    rec["plugin_registered_in_llm_process"] = bool(plugin and plugin.is_registered())
    # Import by module name: under `python -m` this file is __main__, which workers cannot unpickle.
    from benchmarks.gpu_correctness import reinit_normal
    from benchmarks.gpu_smoke import worker_checks
    rec["reinit_params"] = llm.apply_model(reinit_normal)
    rec["worker_before"] = llm.collective_rpc(worker_checks, kwargs=dict(install_counter=True))
    print("RESULT worker before:", json.dumps(rec["worker_before"]), flush=True)
    sp = SamplingParams(max_tokens=MAX_TOKENS, temperature=0, logprobs=1, ignore_eos=True)
    rec["requests"] = []
    t0 = time.time()
    for name, batch in prompts(MODELS[a.model]["vocab_size"]):
        outs = llm.generate([{"prompt_token_ids": p} for p in batch], sp, use_tqdm=False)
        for i, (p, o) in enumerate(zip(batch, outs)):
            c = o.outputs[0]
            lps = [lp[t].logprob for t, lp in zip(c.token_ids, c.logprobs)]
            rec["requests"].append(dict(name=f"{name}[{i}]", prompt_len=len(p), num_cached_tokens=o.num_cached_tokens,
                                        tokens=list(c.token_ids), logprobs=lps, finish_reason=c.finish_reason))
            print(f"RESULT {name}[{i}] len={len(p)} cached={o.num_cached_tokens} tokens={list(c.token_ids)}",
                  flush=True)
    rec["generate_s"] = round(time.time() - t0, 2)
    rec["worker_after"] = llm.collective_rpc(worker_checks)
    print("RESULT worker after:", json.dumps(rec["worker_after"]), flush=True)
    with open(os.path.join(a.out, f"engine_{a.engine}.json"), "w") as f:
        json.dump(rec, f)
    print("RESULT done", flush=True)


# ---- parent: three children, then the comparison ----

def other_general_plugins():
    import importlib.metadata as md
    names = sorted({e.name for e in md.entry_points(group="vllm.general_plugins")} - {"kvrunahead"})
    return ",".join(names) or "none"


def compare(base, rec):
    """Per request: tokens equal, max |logprob difference| over positions (where both have one)."""
    rows, max_d, all_eq = [], 0.0, True
    by_name = {r["name"]: r for r in rec["requests"]}
    for r0 in base["requests"]:
        r1 = by_name.get(r0["name"])
        if r1 is None:
            rows.append(dict(name=r0["name"], missing=True))
            all_eq = False
            continue
        eq = r0["tokens"] == r1["tokens"]
        d = max((abs(x - y) for x, y in zip(r0["logprobs"], r1["logprobs"])), default=0.0)
        first = next((i for i, (x, y) in enumerate(zip(r0["tokens"], r1["tokens"])) if x != y), None)
        rows.append(dict(name=r0["name"], tokens_equal=eq, first_diff=first, max_abs_dlogprob=d,
                         cached_equal=r0["num_cached_tokens"] == r1["num_cached_tokens"]))
        all_eq &= eq
        max_d = max(max_d, d)
    return dict(tokens_equal=all_eq and len(by_name) == len(base["requests"]), max_abs_dlogprob=max_d,
                cached_equal=all(x.get("cached_equal", False) for x in rows), per_request=rows)


def worker_summary(rec, gpu):
    w = (rec.get("worker_after") or [{}])[0]
    if not gpu:
        v2 = "n/a (CPU: V1 runner)"
    else:
        v2 = "yes" if w.get("runner_is_v2") else "NO"
    marker = w.get("patch_marker_on_v2_update_requests")
    calls = w.get("update_requests_calls")
    return dict(runner=w.get("runner_cls"), worker=w.get("worker_cls"), v2=v2, patch_marker=marker,
                update_requests_calls=calls, plugin_registered_worker=w.get("plugin_registered_here"),
                plugin_registered_llm=rec.get("plugin_registered_in_llm_process"))


def markdown(res):
    gpu = res["device"] != "cpu"
    lines = [f"device: {res['device']} (nvidia-smi: {res.get('nvidia_smi')}), vLLM {res.get('vllm')}, "
             f"torch {res.get('torch')}, model: {res['model_note']}", "",
             "| engine | starts (s) | tokens equal to (a) | max abs logprob diff vs (a) | cached tokens equal | "
             "V2 runner | plugin loaded (LLM proc / worker) | patch marker on V2 update_requests | "
             "update_requests calls |",
             "|---|---|---|---|---|---|---|---|---|"]
    for e in ENGINES:
        rec = res["engines"].get(e, {})
        if not rec.get("requests"):
            lines.append(f"| ({e}) {ENGINES[e]} | FAILED rc={rec.get('rc')} | | | | | | | |")
            continue
        w = worker_summary(rec, gpu)
        cmp_ = res["compare"].get(e)
        eq = "(reference)" if e == "a" else ("yes" if cmp_["tokens_equal"] else "NO")
        d = "-" if e == "a" else f"{cmp_['max_abs_dlogprob']:.3g}"
        ce = "-" if e == "a" else ("yes" if cmp_["cached_equal"] else "NO")
        lines.append(f"| ({e}) {ENGINES[e]} | {rec['engine_start_s']} | {eq} | {d} | {ce} | {w['v2']} | "
                     f"{w['plugin_registered_llm']} / {w['plugin_registered_worker']} | {w['patch_marker']} | "
                     f"{w['update_requests_calls']} |")
    lines += ["", "runner classes: " + "; ".join(
        f"({e}) {worker_summary(r, gpu)['runner']} in {worker_summary(r, gpu)['worker']}"
        for e, r in res["engines"].items() if r.get("requests"))]
    if not gpu:
        lines.append("CPU: the CPU build runs model runner V1 (CPUModelRunner); the V2 checks apply on GPUs only.")
    return "\n".join(lines) + "\n"


def main_parent(a):
    os.makedirs(a.out, exist_ok=True)
    t_end = time.time() + a.budget_s
    try:
        smi = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True).stdout.strip()
    except FileNotFoundError:
        smi = None
    dev, vllm_version = common.probe_device()   # no CUDA context in this process
    cfg = MODELS[a.model]
    res = dict(device=dev, nvidia_smi=smi, vllm=vllm_version, model=a.model, model_config=cfg,
               model_note=(f"Llama {cfg['num_hidden_layers']} layers, hidden {cfg['hidden_size']}, "
                           f"{cfg['num_attention_heads']}q/{cfg['num_key_value_heads']}kv heads, vocab "
                           f"{cfg['vocab_size']}, dummy weights redrawn N(0, 0.02)"),
               engines={}, compare={}, started=time.strftime("%Y-%m-%d %H:%M:%S"))
    others = other_general_plugins()
    for e in a.engines.split(","):
        env = dict(os.environ, VLLM_ALLOW_INSECURE_SERIALIZATION="1")
        if e == "a":
            env["VLLM_PLUGINS"] = others
        else:
            env.pop("VLLM_PLUGINS", None)
        left = t_end - time.time()
        if left < 30:
            print(f"ERROR engine {e}: skipped, {left:.0f}s of the budget left", flush=True)
            res["engines"][e] = dict(rc="skipped")
            continue
        print(f"== engine ({e}): {ENGINES[e]}", flush=True)
        log = os.path.join(a.out, f"engine_{e}.log")
        argv = ["benchmarks.gpu_smoke", "--child", e, "--out", a.out, "--model", a.model,
                "--models-dir", a.models_dir]
        t0 = time.time()
        rc, _ = common.run_child(argv, env, log, timeout=min(a.engine_timeout_s, left))
        path = os.path.join(a.out, f"engine_{e}.json")
        if rc == 0 and os.path.exists(path):
            with open(path) as f:
                res["engines"][e] = json.load(f)
            os.remove(path)
        else:
            res["engines"][e] = dict(rc=rc, log_tail=common.tail(log, 40))
            print(f"ERROR engine {e}: rc={rc}\n" + common.tail(log, 40), flush=True)
        res["engines"][e]["wall_s"] = round(time.time() - t0, 1)
    for k in ("vllm", "torch"):
        res[k] = next((r[k] for r in res["engines"].values() if k in r), res.get(k))
    base = res["engines"].get("a", {})
    for e in ("b", "c"):
        if base.get("requests") and res["engines"].get(e, {}).get("requests"):
            res["compare"][e] = compare(base, res["engines"][e])
    with open(os.path.join(a.out, "gpu_smoke.json"), "w") as f:
        json.dump(res, f, indent=1)
    md = markdown(res)
    with open(os.path.join(a.out, "gpu_smoke.md"), "w") as f:
        f.write(md)
    print(md)
    for e, c in res["compare"].items():
        for r in c["per_request"]:
            print(f"  ({e}) {r['name']}: tokens_equal={r.get('tokens_equal')} first_diff={r.get('first_diff')} "
                  f"max|dlogprob|={r.get('max_abs_dlogprob')} cached_equal={r.get('cached_equal')}")
    ok = (len(res["compare"]) == 2 and all(c["tokens_equal"] for c in res["compare"].values()))
    print("SMOKE", "PASS" if ok else "FAIL (see above)")
    return 0 if ok else 1


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="bench_out")
    ap.add_argument("--tiny", action="store_true", help="tiny fp32 model (CPU smoke of this script)")
    ap.add_argument("--model", default=None, choices=sorted(MODELS))
    ap.add_argument("--models-dir", default="/tmp/kvr_models")
    ap.add_argument("--engines", default="a,b,c")
    ap.add_argument("--budget-s", type=float, default=520, help="all engines together")
    ap.add_argument("--engine-timeout-s", type=float, default=200)
    ap.add_argument("--entry-point-into", default=None, metavar="SITE",
                    help="only write the plugin's entry point (a bare dist-info) into SITE, e.g. /tmp/site")
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.entry_point_into:
        from benchmarks.entry_point import write_entry_point

        write_entry_point(a.entry_point_into)
        return 0
    a.model = a.model or ("tiny" if a.tiny else "small")
    if a.child:
        a.engine = a.child
        run_engine(a)
        return 0
    return main_parent(a)


if __name__ == "__main__":
    sys.exit(main())
