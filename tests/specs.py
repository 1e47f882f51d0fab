"""The tiny model's engine specs (tests/engine_runner.py), one engine per (mode, N) serving every test of that
setting: the chain of copies (tests/test_vllm_e2e.py), TP stages (tests/test_tp_e2e.py), the TP layout and
plain TP (tests/test_tp_layout.py) take the same prompts, compared with the one worker's engine (conftest's
``tiny_ref``, also the reference of the server's load)."""
import random

from tests.models import tiny_llama

BS = 128  # KV block size on CPU
BUDGET = 1000  # step budget, not a whole number of blocks: later chunks start inside a block
# prefix caching on (vLLM's default): the rounds and the last prompt one by one hit the cache
TINY_ENGINE = dict(max_model_len=4096, max_num_batched_tokens=BUDGET, block_size=BS,
                   enable_prefix_caching=True)
# 1: shorter than N; 100: shorter than a block; 1027/2500: not divisible by 2 or 3;
# 1027: 2 chunks; 2500: 3 chunks (starts 0, 1000, 2000), each run ahead
TINY_LENGTHS = [1, 2, 100, 300, 1000, 1027, 2500]
HIT = 2000   # the last prompt one by one: the 2500-token prompt's first 2000 tokens and 300 new ones
ALONE_LENGTHS = TINY_LENGTHS + [HIT + 300]


def rand_prompts(lengths, seed):
    rng = random.Random(seed)
    return [[rng.randrange(512) for _ in range(n)] for n in lengths]


def tiny_alone():
    """TINY_LENGTHS' prompts, then one that hits the cache for the 2500-token prompt's first HIT tokens
    (whole blocks: HIT // BS * BS) and adds 300: its new tokens run after that cached prefix."""
    prompts = rand_prompts(TINY_LENGTHS, 1)
    return prompts + [prompts[-1][:HIT] + rand_prompts([300], 5)[0]]


def tiny_spec(workers, tp=1, decode=None):
    """The tiny model's engine: KV-Runahead's chain of N = workers (tp 1), TP stages (workers x tp), TP layout
    (decode "tp"), plain TP (workers 1, tp > 1) or one worker. The chain and one worker also take seeded
    requests and the rounds of shared prefixes (one worker: the server's load too, the reference of
    test_openai_server_under_load_loses_nothing_and_frees_all_blocks)."""
    spec = dict(model=tiny_llama(kv_heads=2), workers=workers, tp=tp, block_size=BS, max_tokens=8,
                engine=TINY_ENGINE, kvr={"min_tokens": 0}, alone=tiny_alone(),
                batch=rand_prompts(TINY_LENGTHS + [1500, 900], 2), kv_layers=[0, 1])
    if decode:
        spec["decode"] = decode
    if tp == 1 and not decode:
        # N=3 also runs online refinement (it moves the split, never the tokens) and sends each layer's KV
        # at its attention entry (early_send: the tokens and KV must not change either)
        spec["kvr"] = {"min_tokens": 0, "profile": True, "refine": workers == 3, "early_send": workers == 3}
        # n=2 of each in one step (2 x 500 <= 1000): plain vLLM on CPU cannot rewind a seeded
        # generator after a partial chunk
        spec["seeded"] = rand_prompts([300, 500], 3)
        spec["rounds"] = shared_rounds() + ([load_round()] if workers == 1 else [])
    return spec


def shared_rounds():
    """Concurrent requests that share prefixes (the tiny engines' rounds). vLLM caches a block's hash when
    it schedules the block, so a request admitted into a step can hit blocks another request computes in
    that same step (budget 1000, blocks of 128):
    - round 1: A (1700) and B = A[:1600] + 300 at once: step 2 computes A's [1000, 1700) and admits B
      with a hit on A's whole blocks of [0, 1600), those from 896 on computed in that step;
    - round 2: C = A[:1600] + 400, a later hit on the same prefix (what chain positions hold of it);
    - round 3: P (2600, three chunks), Q = P[:2432] + 300 (hits P's last chunk in its step) and
      R = P[:1280] + 100 (hits blocks computed in earlier steps) at once;
    - round 4: 13 requests, a shared system prompt and a shared document at different offsets."""
    rng = random.Random(11)

    def toks(n):
        return [rng.randrange(512) for _ in range(n)]

    a, p, system, doc = toks(1700), toks(2600), toks(700), toks(1500)
    mix = ([system + toks(n) for n in (50, 300, 900, 20, 600)] + [doc + toks(n) for n in (100, 400, 250)]
           + [toks(n) for n in (1200, 80, 2000)] + [system + doc[:800] + toks(200), doc[:1000] + toks(64)])
    return [[a, a[:1600] + toks(300)], [a[:1600] + toks(400)], [p, p[:2432] + toks(300), p[:1280] + toks(100)], mix]


def load_round():
    """The requests test_openai_server_under_load_loses_nothing_and_frees_all_blocks sends the server, at
    once, each to MAX_TOKENS (the server's requests stop earlier: compared up to theirs)."""
    from benchmarks.serve_load import MAX_TOKENS, workload

    return {"prompts": [r["prompt"] for r in workload(200, seed=7)], "max_tokens": MAX_TOKENS}


SHARED = len(shared_rounds())   # the tiny chain engines' rounds: these; one worker's adds the load round


def tiny_name(workers: int, tp: int = 1, decode: str | None = None) -> str:
    """The engine's name in the session cache: one per (mode, N)."""
    if decode == "tp":
        return f"tiny-layout{tp}"
    if tp > 1:
        return f"tiny-tp{tp}" if workers == 1 else f"tiny-s{workers}t{tp}"
    return f"tiny-{workers}"


def tiny(engines, workers: int, tp: int = 1, decode: str | None = None) -> dict:
    """That engine's run (started once per session)."""
    return engines.get(tiny_name(workers, tp, decode), tiny_spec(workers, tp, decode))
