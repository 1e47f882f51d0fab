"""One GPU: does the TP layout's guest (vllm_kvrunahead/guest.py) live beside vLLM's own model runner?

The TP layout needs >= 2 GPUs; this checks its riskiest piece on one: the plugin's worker with a guest forced
on (GuestHost, as every TP-layout rank builds it) inside a plain one-GPU engine, against plain vLLM.

  python -m benchmarks.gpu_guest_smoke --out $OUT           # GPU: Llama-3-8B shape, dummy weights, bf16,
                                                            # vLLM's defaults (torch.compile, CUDA graphs)
  python -m benchmarks.gpu_guest_smoke --out /tmp/g --tiny  # CPU smoke of this script

Two engines, each in its own child process, the same prompts (greedy, 8 tokens): `plain` and `guest`. Written
to OUT/gpu_guest_smoke.json and .md: each engine's start time, runner class, KV cache tokens, tokens; the
guest's weight bytes, scratch bytes and activation peak (what the KV budget leaves out for it), and whether the
guest's runner could run its profile forward (at the step budget) under its own one-rank group.
"""
import argparse
import json
import os
import subprocess
import sys
import time

from vllm_kvrunahead.worker import Worker

LENGTHS = (300, 5000, 12000)


class GuestSmokeWorker(Worker):
    """The plugin's worker with one worker (no chain) and a guest forced on."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        from vllm_kvrunahead.vllm_side.guest import GuestHost

        self.host = GuestHost()

    def kvr_guest_facts(self) -> dict:
        g = self.host.guest
        return dict(guest_runner=type(g.runner).__module__ + "." + type(g.runner).__name__,
                    vllm_runner=type(self.model_runner).__module__ + "." + type(self.model_runner).__name__,
                    guest_weight_bytes=g.weight_bytes(), guest_scratch_bytes=g.scratch_bytes(),
                    guest_activation_peak_bytes=self.host.activation_peak,
                    guest_tp_ranks=list(g.group.ranks), scratch_blocks=g.kv_cache_config.num_blocks)


def child(which, model, tiny, out_path):
    import random

    from vllm import LLM, SamplingParams

    kw = dict(model=model, skip_tokenizer_init=True, load_format="dummy", seed=0, max_model_len=16384,
              max_num_batched_tokens=8192)
    if tiny:
        kw.update(dtype="float32", enforce_eager=True, max_model_len=4096, max_num_batched_tokens=2048)
    else:
        kw.update(dtype="bfloat16", gpu_memory_utilization=0.85)
    if which == "guest":
        kw.update(worker_cls="benchmarks.gpu_guest_smoke.GuestSmokeWorker")
    t = time.time()
    llm = LLM(**kw)
    rec = dict(engine=which, start_s=round(time.time() - t, 1))
    cc = llm.llm_engine.vllm_config.cache_config
    rec["kv_cache_tokens"] = cc.num_gpu_blocks * cc.block_size
    if which == "guest":
        rec.update(llm.collective_rpc("kvr_guest_facts")[0])
    rng = random.Random(0)
    vocab = 512 if tiny else 128256
    prompts = [[rng.randrange(3, vocab) for _ in range(n)] for n in ((300, 1500, 3000) if tiny else LENGTHS)]
    sp = SamplingParams(max_tokens=8, temperature=0, ignore_eos=True)
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], sp, use_tqdm=False)
    rec["tokens"] = [list(o.outputs[0].token_ids) for o in outs]
    with open(out_path, "w") as f:
        json.dump(rec, f)
    llm.llm_engine.engine_core.shutdown()


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True)
    ap.add_argument("--tiny", action="store_true")
    ap.add_argument("--child", nargs=3, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.child:
        child(a.child[0], a.child[1], a.tiny, a.child[2])
        sys.stdout.flush()
        os._exit(0)
    from benchmarks import models

    os.makedirs(a.out, exist_ok=True)
    model = models.write_model("tiny" if a.tiny else "llama3-8b", a.out)
    recs = []
    for which in ("plain", "guest"):
        path = os.path.join(a.out, f"{which}.json")
        log = os.path.join(a.out, f"engine_{which}.log")
        cmd = [sys.executable, "-m", "benchmarks.gpu_guest_smoke", "--out", a.out, "--child", which, model, path]
        cmd += ["--tiny"] if a.tiny else []
        with open(log, "w") as f:
            rc = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, timeout=420, start_new_session=True).returncode
        rec = json.load(open(path)) if os.path.exists(path) else dict(engine=which, error=f"rc={rc}, see {log}")
        recs.append(rec)
        print(json.dumps({k: v for k, v in rec.items() if k != "tokens"}), flush=True)
    import torch
    import vllm

    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"
    same = len(recs) == 2 and all("tokens" in r for r in recs) and recs[0]["tokens"] == recs[1]["tokens"]
    summary = dict(device=device, vllm=vllm.__version__, tokens_equal=same, engines=recs)
    json.dump(summary, open(os.path.join(a.out, "gpu_guest_smoke.json"), "w"), indent=1)
    lines = [f"# Guest beside vLLM's runner, one GPU ({device}, vLLM {vllm.__version__})", "",
             f"Greedy tokens of 3 prompts (300, 5000, 12000 tokens) equal between the engines: {same}", "",
             "| engine | start s | KV cache tokens | runner | guest runner | guest weights GiB | scratch GiB | "
             "guest activation peak GiB |", "|---|---|---|---|---|---|---|---|"]
    gib = lambda b: "-" if b is None else f"{b / 2**30:.2f}"  # noqa: E731
    for r in recs:
        lines.append(f"| {r['engine']} | {r.get('start_s', '-')} | {r.get('kv_cache_tokens', r.get('error'))} | "
                     f"{r.get('vllm_runner', '-')} | {r.get('guest_runner', '-')} | {gib(r.get('guest_weight_bytes'))} | "
                     f"{gib(r.get('guest_scratch_bytes'))} | {gib(r.get('guest_activation_peak_bytes'))} |")
    open(os.path.join(a.out, "gpu_guest_smoke.md"), "w").write("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
