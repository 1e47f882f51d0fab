"""One GPU: the TP layout's guest (vllm_kvrunahead/guest.py) runs real segments [c, c + s) of one rank.

The TP layout needs >= 2 GPUs; everything one rank does runs on one. A one-GPU engine with vLLM's defaults
(model runner V2, torch.compile, FULL_AND_PIECEWISE CUDA graphs with capture sizes up to 512, prefix caching)
and the plugin's worker with the guest built as every TP-layout rank builds it (``GuestHost``) and its
``TPLayoutRank`` made for N = 1 (this rank owns every KV head; no peers). vLLM prefills one prompt P; then RPCs
drive the guest through segments of P exactly as ``TPLayoutRank.run_ahead`` does (``TPStep.traffic_for``,
``GuestMeta``, ``segments_only``, the ``GuestConnector``'s hooks): the cached prefix [0, c) lands in the
scratch from vLLM's paged blocks, the guest computes [c, c + s), and the keep path copies its KV into paged
blocks, here spare blocks, so that vLLM's own KV of the same tokens stays beside it for comparison.

  python -m benchmarks.gpu_guest_segments --out $OUT              # GPU: Llama-3-8B shape, bf16
  python -m benchmarks.gpu_guest_segments --out /tmp/g --tiny     # CPU smoke of this script (tiny model)
  ... --guest-cudagraphs    the guest keeps vLLM's CUDA-graph mode (the bug of issue 33, for contrast)

Records (OUT/gpu_guest_segments.json and .md):
- kv: guest KV vs vLLM's KV of the same tokens at the first, a middle and the last layer (whole blocks inside
  [c, c + s)) for the first and second guest steps of 32, 300 and 512 tokens (sizes vLLM's dispatcher sends
  to CUDA graphs) and for (c, s) = (0, 8k), (16k, 8k), (48k, 16k); first == second bitwise;
- the guest runner's dispatch of those sizes (NONE: it never captures);
- timing: guest segment vs vLLM's own prefill of a chunk of s new tokens after the same c cached tokens, each
  timed between device syncs inside the worker, median of 3, for c in {0, 16k, 48k}, s in {4k, 8k, 16k};
- memory: the guest's weights, scratch and activation peak (what the KV budget leaves out for it), vLLM's
  KV tokens, and the peak allocated during the largest segment.
"""
import argparse
import dataclasses
import json
import math
import os
import random
import statistics
import subprocess
import sys
import time

from vllm_kvrunahead.worker import Worker

GPU = dict(prompt=65536, max_model_len=65600, budget=65536, layers=(0, 15, 31),
           first_steps=(32, 300, 512), kv=((0, 8192), (16384, 8192), (49152, 16384)),
           cs=(49152, 16384, 0), ss=(4096, 8192, 16384))
TINY = dict(prompt=3072, max_model_len=3200, budget=3072, layers=(0, 1),
            first_steps=(32, 300, 512), kv=((0, 1024), (1024, 512), (2048, 1024)),
            cs=(2048, 1024, 0), ss=(256, 512))
REPEATS = 3


def _sync():
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()


def _timed(fn):
    _sync()
    t = time.perf_counter()
    out = fn()
    _sync()
    return out, time.perf_counter() - t


class _Book:
    """What ``segments_only`` reads: the request's data (P's, cut to [0, c + s), under its own id)."""

    def __init__(self, data):
        self._d = data

    def data(self, rid):
        return self._d


class SegmentsWorker(Worker):
    """The plugin's worker on one GPU with the TP layout's guest and its ``TPLayoutRank`` for N = 1."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        from vllm_kvrunahead.vllm_side import guest

        if os.environ.get("KVR_GUEST_CUDAGRAPHS") == "1":   # the bug of issue 33, for contrast
            made = guest.guest_config

            def keep_graphs(vllm_config, *kind):
                cfg = made(vllm_config, *kind)
                cfg.compilation_config.cudagraph_mode = vllm_config.compilation_config.cudagraph_mode
                return cfg

            guest.guest_config = keep_graphs
        if os.environ.get("KVR_GUEST_EAGER") == "1":   # the guest without torch.compile: whose kernels differ?
            made_eager = guest.guest_config

            def eager(vllm_config, *kind):
                from vllm.config import CompilationMode

                cfg = made_eager(vllm_config, *kind)
                cfg.compilation_config.mode = CompilationMode.NONE
                return cfg

            guest.guest_config = eager
        self.host = guest.GuestHost(os.environ.get("KVR_GUEST", "full"))   # peer: its layers pulled from vLLM's
        arena_ranks = int(os.environ.get("KVR_ARENA_RANKS", "0"))
        if arena_ranks:   # the comm arena a rank of N would allocate, left out of vLLM's KV budget the same way
            budget = self.host.kv_bytes_left

            def as_rank_of_n(measure, cache_config):
                self.host.n = arena_ranks
                return budget(measure, cache_config)

            self.host.kv_bytes_left = as_rank_of_n
        self.tables = {}       # req id -> (NewRequestData, block ids), kept after the request finishes
        self.step_times = []   # (tokens, seconds) of vLLM's own forward steps while timing is on
        self.timing = False
        self._seg = 0

    def initialize_from_config(self, kv_cache_config) -> None:
        from vllm_kvrunahead.tp_layout.rank import tp_layout_for
        from vllm_kvrunahead.transport.comm import CommArena

        kvr = dataclasses.replace(self.kvr, mode="tp_layout")   # one rank: no peers, every KV head its own
        arena = self.host.arena if not os.environ.get("KVR_ARENA_RANKS") else CommArena({}, self.host.device)
        # one rank's arena: empty (with --arena-ranks the N-rank arena stays allocated, counted and unused)
        self.runahead = tp_layout_for(kvr, self.vllm_config, self.rank, kv_cache_config, self.host.guest, arena)
        super(Worker, self).initialize_from_config(kv_cache_config)   # vLLM's own: its runner registers its caches
        self.runahead.start(self.model_runner)

    def execute_model(self, scheduler_output):
        so = scheduler_output
        for nr in so.scheduled_new_reqs:
            self.tables[nr.req_id] = (nr, list(nr.block_ids[0]))
        cr = so.scheduled_cached_reqs
        for rid, new in zip(cr.req_ids, cr.new_block_ids):
            if rid in self.tables and new:
                self.tables[rid][1].extend(new[0])
        if not self.timing:
            return super().execute_model(so)
        out, dt = _timed(lambda: super(SegmentsWorker, self).execute_model(so))
        self.step_times.append((so.total_num_scheduled_tokens, dt))
        return out

    # -- RPCs --------------------------------------------------------------------------------------
    def kvr_reinit_normal(self) -> int:
        """N(0, 0.02) weights, seeded by parameter name: vLLM's model and the guest's become the same."""
        from benchmarks.gpu_correctness import reinit_normal

        return reinit_normal(self.get_model()) + reinit_normal(self.host.guest.runner.get_model())

    def kvr_facts(self) -> dict:
        import torch

        g = self.host.guest
        cc = g.config.compilation_config
        disp = getattr(g.runner, "cudagraph_dispatcher", None)
        sizes = (1, 32, 300, 512, 600, 2048)
        return dict(
            guest_runner=f"{type(g.runner).__module__}.{type(g.runner).__name__}",
            vllm_runner=f"{type(self.model_runner).__module__}.{type(self.model_runner).__name__}",
            guest_cudagraph_mode=str(cc.cudagraph_mode), guest_compile_mode=str(cc.mode),
            vllm_cudagraph_mode=str(self.vllm_config.compilation_config.cudagraph_mode),
            vllm_max_capture_size=self.vllm_config.compilation_config.max_cudagraph_capture_size,
            guest_dispatch={n: str(disp.dispatch(num_tokens=n)[0]) for n in sizes} if disp else None,
            guest_weight_bytes=g.weight_bytes(), guest_scratch_bytes=g.scratch_bytes(), guest_kind=self.host.kind,
            peer_ring_bytes=g.peer.nbytes if g.peer else None, peer_layers_taken=g.peer.shards.layers_taken if g.peer else None,
            guest_activation_peak_bytes=self.host.activation_peak, arena_ranks=self.host.n,
            arena_bytes=self.host.arena.nbytes, arena_plan_bytes=self.host.comm.total, scratch_blocks=g.kv_cache_config.num_blocks,
            paged_blocks=int(next(iter(self.runahead.connector.paged.values())).shape[0]),
            block_size=self.runahead.block_size,
            paged_block_shape=list(next(iter(self.runahead.connector.paged.values())).shape[1:]),
            memory_allocated=torch.cuda.memory_allocated() if torch.cuda.is_available() else None)

    def kvr_timing(self, on: bool) -> list:
        """Turn timing of vLLM's own steps on or off; returns (and forgets) what was timed."""
        self.timing, times, self.step_times = on, self.step_times, []
        return times

    def kvr_vllm_self(self, prompt_len: int, other_len: int, layers=()) -> dict:
        """vLLM against itself: its KV of P's first ``other_len`` tokens (P prefilled in its own steps)
        beside its KV of a prompt that is exactly those tokens, prefilled alone (a cache salt of its own):
        what vLLM's kernels change with the step's size, the yardstick for the guest's differences."""
        import torch

        bs, paged = self.runahead.block_size, self.runahead.connector.paged
        _, p_blocks = next(t for t in self.tables.values() if len(t[0].prompt_token_ids) == prompt_len)
        _, q_blocks = next(t for t in self.tables.values() if len(t[0].prompt_token_ids) == other_len)
        full = other_len // bs
        dev = self.runahead.device
        a_ids = torch.tensor(q_blocks[:full], dtype=torch.long, device=dev)
        b_ids = torch.tensor(p_blocks[:full], dtype=torch.long, device=dev)
        rec = dict(prompt_len=prompt_len, other_len=other_len)
        for layer in layers:
            name = self.runahead.connector.order[layer]
            a, b = paged[name].index_select(0, a_ids), paged[name].index_select(0, b_ids)
            af, bf = a.float(), b.float()
            rec[f"layer{layer}"] = dict(blocks=full, bitwise=bool(torch.equal(a, b)),
                                        max_abs=float((af - bf).abs().max()),
                                        rel=float((af - bf).norm() / bf.norm()) if bf.norm() > 0 else None)
        return rec

    def kvr_segment(self, prompt_len: int, c: int, s: int, layers=(), peak: bool = False) -> dict:
        """The guest computes [c, c + s) of the prompt of ``prompt_len`` tokens (prefilled by vLLM before),
        as one TP-layout rank owning every head would; returns its time and, per layer in ``layers``, its KV
        of the whole blocks inside [c, c + s) beside vLLM's own."""
        import torch

        from vllm_kvrunahead.core.partition import Segment
        from vllm_kvrunahead.core.tp_step import GuestReq, TPStep
        from vllm_kvrunahead.tp_layout.connector import GuestMeta
        from vllm_kvrunahead.vllm_side import seam

        nr, blocks = next(t for t in self.tables.values() if len(t[0].prompt_token_ids) == prompt_len)  # P: the first
        chain, bs = self.runahead, self.runahead.block_size
        paged = chain.connector.paged
        num_paged = next(iter(paged.values())).shape[0]
        first, end = c // bs, math.ceil((c + s) / bs)
        used = set(blocks)
        spare = [b for b in range(num_paged - 1, -1, -1) if b not in used][:end - first]
        ids = tuple(blocks[:first]) + tuple(spare)   # [0, c): vLLM's blocks of P; [c, c + s): spare blocks
        self._seg += 1
        rid = f"kvr-seg-{self._seg}"
        step = TPStep(1, bs, (GuestReq(rid, (Segment(0, c, c + s),), ids, 0),))
        meta = GuestMeta.of(step.traffic_for(0, chain.total_heads))
        data = dataclasses.replace(nr, req_id=rid, prompt_token_ids=list(nr.prompt_token_ids[:c + s]),
                                   prefill_token_ids=None, num_computed_tokens=c)
        empty = dataclasses.replace(seam.SchedulerOutput.make_empty(), num_common_prefix_blocks=[0])
        so = seam.segments_only(empty, step.guest_segments(0), chain._guest_reqs, meta, _Book(data))
        chain._guest_reqs = {rid}
        # poison what the guest must write or land (scratch, its paged blocks): stale KV cannot pass for it
        for t in self.host.guest.runner.kv_caches:
            t.fill_(float("nan"))
        spare_t = torch.tensor(spare, dtype=torch.long, device=chain.device)
        for cache in paged.values():
            cache.index_fill_(0, spare_t, float("nan"))
        if peak and torch.cuda.is_available():
            _sync()
            torch.cuda.reset_peak_memory_stats()
            before = torch.cuda.memory_allocated()
        _, dt = _timed(lambda: self.host.guest.run(so))
        rec = dict(c=c, s=s, seconds=dt)
        if peak and torch.cuda.is_available():
            rec["peak_bytes_above_start"] = torch.cuda.max_memory_allocated() - before
        full = range(-(-c // bs), (c + s) // bs)   # blocks wholly inside [c, c + s)
        mine = torch.tensor([ids[b] for b in full], dtype=torch.long, device=chain.device)
        theirs = torch.tensor([blocks[b] for b in full], dtype=torch.long, device=chain.device)
        for layer in layers:
            name = chain.connector.order[layer]
            a, b = paged[name].index_select(0, mine).float(), paged[name].index_select(0, theirs).float()
            rec[f"layer{layer}"] = dict(
                blocks=len(full), bitwise=bool(torch.equal(paged[name].index_select(0, mine),
                                                           paged[name].index_select(0, theirs))),
                max_abs=float((a - b).abs().max()) if len(full) else None,
                rel=float((a - b).norm() / b.norm()) if len(full) and b.norm() > 0 else None,
                ref_max_abs=float(b.abs().max()) if len(full) else None,
                digest=float(a.double().sum()) if len(full) else None)
        return rec


def child(a, out_path):
    from vllm import LLM, SamplingParams

    p = TINY if a.tiny else GPU
    kw = dict(model=a.model_dir, skip_tokenizer_init=True, load_format="dummy", seed=0,
              max_model_len=a.max_model_len or p["max_model_len"],
              max_num_batched_tokens=a.budget or p["budget"], enable_prefix_caching=True,
              worker_cls="benchmarks.gpu_guest_segments.SegmentsWorker")
    if a.tiny:   # CPU: a little KV and the memory check's share of this machine's RAM
        os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
        kw.update(dtype="float32", enforce_eager=True, gpu_memory_utilization=0.3)
    else:   # vLLM's serving defaults otherwise (max_num_seqs 256: CUDA graphs captured up to 512 tokens)
        kw.update(dtype="bfloat16", gpu_memory_utilization=0.85, max_num_seqs=256)
    rec = dict(engine_kwargs={k: v for k, v in kw.items() if k != "model"},
               guest_cudagraphs=os.environ.get("KVR_GUEST_CUDAGRAPHS") == "1", guest=os.environ.get("KVR_GUEST", "full"))

    def save():
        with open(out_path, "w") as f:
            json.dump(rec, f, indent=1)

    t = time.time()
    llm = LLM(**kw)
    rec["start_s"] = round(time.time() - t, 1)
    cc = llm.llm_engine.vllm_config.cache_config
    rec["kv_cache_tokens"] = cc.num_gpu_blocks * cc.block_size
    rpc = lambda name, *args: llm.collective_rpc(name, args=args)[0]  # noqa: E731
    rec["reinit_params"] = rpc("kvr_reinit_normal")
    rec["facts"] = rpc("kvr_facts")
    save()
    rng = random.Random(0)
    vocab = 512 if a.tiny else 128256
    toks = lambda n: [rng.randrange(3, vocab) for _ in range(n)]  # noqa: E731
    n = a.prompt or p["prompt"]
    prompt = toks(n)
    one = SamplingParams(max_tokens=1, temperature=0, ignore_eos=True)
    o = llm.generate([{"prompt_token_ids": prompt}], one, use_tqdm=False)[0]
    rec["prompt_tokens"], rec["prompt_cached_tokens"] = n, o.num_cached_tokens
    rec["vllm_self"] = []
    for m in a.vllm_self:   # vLLM's own KV of P[:m], prefilled alone, beside its KV inside P
        llm.generate([{"prompt_token_ids": prompt[:m], "cache_salt": f"self-{m}"}], one, use_tqdm=False)
        rec["vllm_self"].append(rpc("kvr_vllm_self", n, m, list(p["layers"])))
        save()
    # KV: the first guest steps of each small size twice (a lazy capture would show in the first), then
    # longer segments after cached prefixes; all before any other request can take P's blocks.
    rec["kv"] = []
    for s in p["first_steps"]:
        for i in (1, 2):
            rec["kv"].append(dict(rpc("kvr_segment", n, 0, s, list(p["layers"])), run=i))
            save()
    longest = max(c + s for c, s in p["kv"] if c + s <= n)
    for c, s in p["kv"]:
        if c + s <= n:
            rec["kv"].append(dict(rpc("kvr_segment", n, c, s, list(p["layers"]), c + s == longest), run=1))
            save()
    if a.no_timing:
        rec["timing"] = []
    else:
        rec["timing"] = timing(llm, rpc, p, n, prompt, toks, one, save, rec)
    save()
    llm.llm_engine.engine_core.shutdown()


def timing(llm, rpc, p, n, prompt, toks, one, save, rec):
    """Guest segment vs vLLM's own chunk of s new tokens after the same c cached tokens (longest prefix
    first: its blocks are then the most recently used of P's, so the cache keeps them)."""
    rows = []
    for c in p["cs"]:
        for s in p["ss"]:
            if c + s > n:
                continue
            guest = [rpc("kvr_segment", n, c, s)["seconds"] for _ in range(REPEATS)]
            vllm_s, cached = [], []
            for _ in range(REPEATS):
                rpc("kvr_timing", True)
                o = llm.generate([{"prompt_token_ids": prompt[:c] + toks(s)}], one, use_tqdm=False)[0]
                steps = rpc("kvr_timing", False)
                cached.append(o.num_cached_tokens)
                vllm_s.append(max(dt for _, dt in steps))   # max_tokens=1: the chunk's step is the only long one
            g, v = statistics.median(guest), statistics.median(vllm_s)
            rows.append(dict(c=c, s=s, guest_s=g, vllm_s=v, ratio=g / v, guest_all=guest, vllm_all=vllm_s,
                             vllm_cached_tokens=cached))
            rec["timing"] = rows
            save()
    return rows


def report(rec, device, version):
    gib = lambda b: "-" if b is None else f"{b / 2**30:.2f}"  # noqa: E731
    f = rec.get("facts", {})
    lines = [f"# The TP layout's guest runs one rank's segments on one GPU ({device}, vLLM {version})", "",
             f"Engine: {json.dumps(rec.get('engine_kwargs'))}; guest keeps vLLM's CUDA graphs: "
             f"{rec.get('guest_cudagraphs')}", "",
             f"- runners: vLLM {f.get('vllm_runner')} ({f.get('vllm_cudagraph_mode')}, captures up to "
             f"{f.get('vllm_max_capture_size')} tokens), guest {f.get('guest_runner')} "
             f"({f.get('guest_cudagraph_mode')}, compile mode {f.get('guest_compile_mode')})",
             f"- guest dispatch by step size: {f.get('guest_dispatch')}",
             *[f"- vLLM against itself, P[:{r['other_len']}] alone vs inside P: "
               + ", ".join(f"layer {k[5:]} bitwise {v['bitwise']}, max abs {v['max_abs']:.3g}, rel {v['rel']:.3g}"
                           for k, v in r.items() if k.startswith("layer")) for r in rec.get("vllm_self", [])],
             f"- KV budget leaves out: guest weights {gib(f.get('guest_weight_bytes'))} GiB, scratch "
             f"{gib(f.get('guest_scratch_bytes'))} GiB, activation peak {gib(f.get('guest_activation_peak_bytes'))} "
             f"GiB, comm arena {gib(f.get('arena_bytes'))} GiB (a rank of N={f.get('arena_ranks')}); vLLM's KV cache: "
             f"{rec.get('kv_cache_tokens')} tokens; engine start {rec.get('start_s')} s",
             f"- prompt P: {rec.get('prompt_tokens')} tokens (cached when prefilled: {rec.get('prompt_cached_tokens')})",
             "", "## Guest KV against vLLM's KV of the same tokens (whole blocks inside [c, c + s))", "",
             "| c | s | guest step | layer | blocks | bitwise equal | max abs diff | rel. diff | max abs (vLLM) |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rec.get("kv", []):
        for k in sorted(x for x in r if x.startswith("layer")):
            d = r[k]
            fmt = lambda x: "-" if x is None else f"{x:.3g}"  # noqa: E731
            lines.append(f"| {r['c']} | {r['s']} | {r.get('run')} | {k[5:]} | {d['blocks']} | {d['bitwise']} | "
                         f"{fmt(d['max_abs'])} | {fmt(d['rel'])} | {fmt(d['ref_max_abs'])} |")
    firsts = {}
    for r in rec.get("kv", []):
        if r["c"] == 0 and r["s"] in (32, 300, 512):
            firsts.setdefault(r["s"], []).append([r[k]["digest"] for k in sorted(r) if k.startswith("layer")])
    lines += ["", "First and second guest steps of each small size give the same KV: " + ", ".join(
        f"{s}: {len(v) == 2 and v[0] == v[1]}" for s, v in firsts.items())]
    big = [r for r in rec.get("kv", []) if "peak_bytes_above_start" in r]
    if big:
        lines.append(f"Peak allocated during the ({big[0]['c']}, {big[0]['s']}) segment: "
                     f"{gib(big[0]['peak_bytes_above_start'])} GiB above the step's start")
    if rec.get("timing"):
        lines += ["", "## Guest segment vs vLLM's own chunk after the same cached prefix (median of 3, s)", "",
                  "| c (cached) | s (new) | guest | vLLM | guest / vLLM | vLLM's cached tokens |",
                  "|---|---|---|---|---|---|"]
        for r in rec["timing"]:
            lines.append(f"| {r['c']} | {r['s']} | {r['guest_s']:.4f} | {r['vllm_s']:.4f} | {r['ratio']:.3f} | "
                         f"{r['vllm_cached_tokens']} |")
    return "\n".join(lines) + "\n"


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True)
    ap.add_argument("--tiny", action="store_true")
    ap.add_argument("--guest-cudagraphs", action="store_true", help="the guest keeps vLLM's CUDA-graph mode")
    ap.add_argument("--no-timing", action="store_true")
    ap.add_argument("--guest-eager", action="store_true", help="the guest without torch.compile")
    ap.add_argument("--guest", default="full", choices=["full", "peer"],
                    help="the guest's kind (kv_runahead.guest); peer: a ring of 3 layers pulled from vLLM's weights")
    ap.add_argument("--vllm-self", type=lambda v: [int(x) for x in v.split(",") if x], default=[],
                    help="lengths m: vLLM's KV of P[:m] prefilled alone against its KV inside P (e.g. 512,8192)")
    ap.add_argument("--arena-ranks", type=int, default=0,
                    help="allocate the comm arena a TP-layout rank of N would (left out of the KV budget, unused)")
    ap.add_argument("--prompt", type=int, default=0, help="tokens of P (default: 65536; tiny 3072)")
    ap.add_argument("--max-model-len", type=int, default=0)
    ap.add_argument("--budget", type=int, default=0, help="max_num_batched_tokens")
    ap.add_argument("--timeout", type=float, default=540)
    ap.add_argument("--tag", default="gpu_guest_segments", help="names the files written to OUT")
    ap.add_argument("--models-dir", default="/tmp/kvr_models", help="where the model's config is written")
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--model-dir", default=None, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.child:
        os.environ["VLLM_ALLOW_INSECURE_SERIALIZATION"] = "1"
        rc = 0
        try:
            child(a, a.child)
        except BaseException:  # noqa: BLE001 - the record so far is saved; the log has the rest
            import traceback

            traceback.print_exc()
            rc = 1
        sys.stdout.flush()
        os._exit(rc)
    from benchmarks import models

    os.makedirs(a.out, exist_ok=True)
    model = models.write_model("tiny" if a.tiny else "llama3-8b", a.models_dir)
    path, log = os.path.join(a.out, f"{a.tag}.json"), os.path.join(a.out, f"{a.tag}.log")
    env = dict(os.environ, KVR_GUEST_CUDAGRAPHS="1" if a.guest_cudagraphs else "0", KVR_GUEST=a.guest)
    if a.arena_ranks:
        env["KVR_ARENA_RANKS"] = str(a.arena_ranks)
    if a.guest_eager:
        env["KVR_GUEST_EAGER"] = "1"
    cmd = [sys.executable, "-m", "benchmarks.gpu_guest_segments", "--child", path, "--model-dir", model,
           "--out", a.out, "--prompt", str(a.prompt), "--max-model-len", str(a.max_model_len),
           "--budget", str(a.budget), "--vllm-self", ",".join(map(str, a.vllm_self))] + (["--tiny"] if a.tiny else []) + (["--no-timing"] if a.no_timing else [])
    from benchmarks.procs import end_group

    with open(log, "w") as f:
        p = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        try:
            rc = p.wait(timeout=a.timeout)
        except subprocess.TimeoutExpired:
            rc = "timeout"
        end_group(p, grace_s=10)   # an engine the child left behind (it exits with os._exit) holds the GPU
    rec = json.load(open(path)) if os.path.exists(path) else {}
    rec["rc"] = rc
    import torch
    import vllm

    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"
    rec.update(device=device, vllm=vllm.__version__)
    json.dump(rec, open(path, "w"), indent=1)
    md = report(rec, device, vllm.__version__)
    open(os.path.join(a.out, f"{a.tag}.md"), "w").write(md)
    print(md)
    print(f"child rc={rc}; log {log}")
    if rc != 0:   # the report above shows what ran; the caller must not take a failed run for a result
        sys.exit(f"gpu_guest_segments: the engine's child failed (rc={rc}); see {log}")


if __name__ == "__main__":
    main()
