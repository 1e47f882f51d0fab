"""Greedy tokens of plain vLLM (1gpu) vs KV-Runahead (kvr-*) on the same weights, several prompt lengths.

  python -m benchmarks.gpu_correctness --model llama3-8b --n-gpus 2 --lengths 1000,4099,16384 --out $OUT

Weights. vLLM's dummy loader (model_loader/weight_utils.py: initialize_dummy_weights) fills every
parameter with uniform(-1e-3, 1e-3) from a generator seeded 1234 *per parameter*: values depend only
on the parameter's shape, dtype and device type, not on LLM(seed=...). So 1gpu and kvr ranks (which
hold the full, unsharded model) get bit-identical weights; TP shards do not (each shard is filled
from the same seed, so TP is a different model). But such a model is blind to context: with norm
weights ~1e-3 the logits spread ~1e-5 and the argmax is set by the last token alone, so a broken
attention would still match. Hence `--init normal` (default runs both): after loading, every matrix
is redrawn N(0, 0.02) from a per-parameter-name seed and norm weights set to 1 (identical on every
rank and in every engine), which makes tokens depend on the whole prompt.

Per length it prints whether the 16 greedy tokens are identical and, where they differ, the first
differing position with the top-2 logprobs of both there (a near-tie shows as a tiny margin).
Writes OUT/correctness.json and OUT/correctness.log.
"""
import argparse
import json
import os
import sys
import time
import traceback

from benchmarks import common, models

MAX_TOKENS = 16


def reinit_normal(model):
    """Runs inside each worker (llm.apply_model): redraw weights N(0, 0.02) seeded by parameter name."""
    import zlib
    import torch
    from vllm.model_executor.layers.linear import LinearBase
    model = model.unwrap() if hasattr(model, "unwrap") else model   # a CUDA-graph wrapper, if any
    n = 0
    with torch.no_grad():
        for mname, mod in model.named_modules():
            for pname, p in list(mod.named_parameters(recurse=False)):
                if not p.is_floating_point() or p.is_meta:   # meta: a peer guest's unused LM head
                    continue
                name = f"{mname}.{pname}"
                if p.numel() == 0 and isinstance(mod, LinearBase) and pname == "weight":
                    # CPU: vLLM packed this weight into oneDNN at load and dropped it; rebuild it.
                    shape = (getattr(mod, "output_size_per_partition", mod.output_size),
                             getattr(mod, "input_size_per_partition", mod.input_size))
                    p = torch.nn.Parameter(torch.empty(shape, dtype=mod.params_dtype), requires_grad=False)
                    mod.weight = p
                if p.dim() == 1:
                    p.fill_(1.0 if pname == "weight" else 0.0)   # norm scales 1, biases 0
                else:
                    g = torch.Generator(device=p.device)
                    g.manual_seed(zlib.crc32(name.encode()))
                    p.normal_(0.0, 0.02, generator=g)
                n += p.numel()
            if hasattr(mod, "cpu_linear"):   # CPU: re-pack the new values
                from vllm.model_executor.layers.utils import dispatch_cpu_unquantized_gemm
                dispatch_cpu_unquantized_gemm(mod, remove_weight=isinstance(mod, LinearBase))
    return n


def run_one(a):
    from vllm import LLM, SamplingParams
    kw = common.engine_kwargs(a.one_config, os.path.join(a.models_dir, a.model), max(a.lengths) + MAX_TOKENS + 16,
                              a.n_gpus, a.interconnect, a.backend, json.loads(a.engine_args))
    print("ENGINE", json.dumps(kw), flush=True)
    llm = LLM(**kw)
    sp = SamplingParams(max_tokens=MAX_TOKENS, temperature=0, logprobs=2, ignore_eos=True)
    vocab = models.vocab_size(a.model)
    res = {}
    # Import by module name: under `python -m` this file is __main__, which workers cannot unpickle.
    from benchmarks.gpu_correctness import reinit_normal as reinit
    for init in a.init:
        if init == "normal":
            print("RESULT reinit: %s params per rank" % llm.apply_model(reinit), flush=True)
        for n in a.lengths:
            try:
                o = llm.generate([common.prompt(n, vocab, 30_000)], sp, use_tqdm=False)[0].outputs[0]
                # per position: [[token, logprob], ...] by rank (top-2, plus the chosen one if not in them)
                tops = [sorted(([t, lp.logprob, lp.rank] for t, lp in d.items()), key=lambda x: x[2])
                        for d in o.logprobs]
                r = dict(tokens=list(o.token_ids), top=[[x[:2] for x in t] for t in tops])
            except Exception as e:  # noqa: BLE001 - record and go on
                r = dict(error=f"{type(e).__name__}: {e}"[:500])
            res.setdefault(init, {})[str(n)] = r
            print(f"RESULT {a.one_config} init={init} len={n}: {r.get('tokens', r.get('error'))}", flush=True)
            with open(a.result, "w") as f:   # after each length: a crash later keeps what was measured
                json.dump(res, f)
    common.shutdown(llm)


def compare(base, other, name_b, name_o):
    """One line: identical, or first differing position with the top-2 of both there."""
    if "error" in base or "error" in other:
        return f"ERROR {base.get('error') or other.get('error')}"
    tb, to = base["tokens"], other["tokens"]
    same = next((i for i, (x, y) in enumerate(zip(tb, to)) if x != y), None)
    # logprob drift of the chosen token over the common prefix: how close the two computations are
    k = len(tb) if same is None else same
    drift = max((abs(base["top"][i][0][1] - other["top"][i][0][1]) for i in range(k)), default=0.0)
    if same is None:
        return f"IDENTICAL ({len(tb)} tokens, max |dlogprob| {drift:.2e})"
    fmt = lambda top: ", ".join(f"{t}:{lp:.6f}" for t, lp in top[:2])   # noqa: E731
    margin = base["top"][same][0][1] - base["top"][same][1][1] if len(base["top"][same]) > 1 else float("nan")
    return (f"DIFFER at position {same} (max |dlogprob| before it {drift:.2e}): "
            f"{name_b} top2 [{fmt(base['top'][same])}] | {name_o} top2 [{fmt(other['top'][same])}] | "
            f"{name_b} margin {margin:.2e}")


def main(a):
    os.makedirs(os.path.join(a.out, "logs"), exist_ok=True)
    models.write_model(a.model, a.models_dir)
    dev, ver = common.probe_device()
    logf = open(os.path.join(a.out, "correctness.log"), "a")

    def say(s):
        print(s, flush=True)
        logf.write(s + "\n")
        logf.flush()
    say(f"# {time.strftime('%F %T')} device={dev} vllm={ver} model={a.model} n_gpus={a.n_gpus} "
        f"interconnect={a.interconnect} backend={a.backend} lengths={a.lengths} init={a.init}")
    results = {}
    if a.baseline_from:
        # Reuse the baseline config's tokens from an earlier run (same model, lengths, init and prompts;
        # the 1-GPU engine does not depend on the executor backend or interconnect): saves one engine start.
        with open(a.baseline_from) as f:
            prev = json.load(f)
        results[a.configs[0]] = prev["results"][a.configs[0]]
        say(f"{a.configs[0]}: taken from {a.baseline_from} (device={prev.get('device')}, "
            f"backend={prev.get('backend')}, interconnect={prev.get('interconnect')})")
    for cfg in a.configs:
        if cfg in results:
            continue
        tag = f"correctness_{a.model}_{cfg}_n{a.n_gpus}_{a.interconnect}_{a.backend}"
        log, res = os.path.join(a.out, "logs", tag + ".log"), os.path.join(a.out, "logs", tag + ".json")
        if os.path.exists(res):
            os.remove(res)
        argv = ["benchmarks.gpu_correctness", "--one-config", cfg, "--result", res] + _pass_through(a)
        rc, _ = common.run_child(argv, common.child_env(cfg, a.n_gpus, a.interconnect, dev == "cpu"), log,
                                 timeout=a.child_timeout or None)
        results[cfg] = {}
        if os.path.exists(res):
            with open(res) as f:
                results[cfg] = json.load(f)
        if rc != 0:
            err = f"config failed (rc={rc}): {common.first_error(log)} (log: {log})"
            say(f"{cfg}: {err}")
            for i in a.init:   # lengths the child never reached
                for n in a.lengths:
                    results[cfg].setdefault(i, {}).setdefault(str(n), dict(error=err))
    base = a.configs[0]
    summary = []
    for init in a.init:
        for n in a.lengths:
            for cfg in a.configs[1:]:
                line = compare(results[base][init][str(n)], results[cfg][init][str(n)], base, cfg)
                say(f"[init={init}] len={n} {cfg} vs {base}: {line}")
                summary.append(dict(init=init, prompt_tokens=n, config=cfg, baseline=base, verdict=line))
    with open(os.path.join(a.out, "correctness.json"), "w") as f:
        json.dump(dict(device=dev, vllm_version=ver, model=a.model, n_gpus=a.n_gpus, interconnect=a.interconnect,
                       backend=a.backend, baseline_from=a.baseline_from, summary=summary, results=results),
                  f, indent=1)


def _pass_through(a):
    return ["--n-gpus", str(a.n_gpus), "--lengths", ",".join(map(str, a.lengths)), "--model", a.model,
            "--interconnect", a.interconnect, "--backend", a.backend, "--init", ",".join(a.init),
            "--engine-args", a.engine_args, "--models-dir", a.models_dir]


def parse_args():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--configs", default="1gpu,kvr-even,kvr-balanced", help="the first one is the baseline")
    ap.add_argument("--n-gpus", type=int, default=2)
    ap.add_argument("--lengths", default="1000,4099,16384")
    ap.add_argument("--model", default="llama3-8b", choices=sorted(models.MODELS))
    ap.add_argument("--interconnect", default="nvlink", choices=["nvlink", "no-p2p"])
    ap.add_argument("--backend", default="mp", choices=["mp", "ray"])
    ap.add_argument("--init", default="dummy,normal", help="dummy (vLLM's), normal (redrawn N(0,0.02)), or both")
    ap.add_argument("--engine-args", default="{}")
    ap.add_argument("--models-dir", default="/tmp/kvr_models")
    ap.add_argument("--child-timeout", type=float, default=0, help="seconds per config (0: none)")
    ap.add_argument("--baseline-from", default=None,
                    help="correctness.json of an earlier run: take the first config's tokens from it")
    ap.add_argument("--out", default="bench_out")
    ap.add_argument("--one-config", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--result", default=None, help=argparse.SUPPRESS)
    a = ap.parse_args()
    a.lengths = [int(x) for x in a.lengths.split(",")]
    a.configs = [c.strip() for c in a.configs.split(",") if c.strip()]
    a.init = [i.strip() for i in a.init.split(",") if i.strip()]
    return a


if __name__ == "__main__":
    args = parse_args()
    if args.one_config:
        # apply_model ships reinit_normal (a function) to the workers, which vLLM only pickles when asked to.
        os.environ["VLLM_ALLOW_INSECURE_SERIALIZATION"] = "1"
        rc = 0
        try:
            run_one(args)
        except BaseException:  # noqa: BLE001
            traceback.print_exc()
            rc = 1
        sys.stdout.flush()
        os._exit(rc)
    main(args)
