"""The tuner's search against synthetic TTFT functions with a known optimum, and one
real (CPU) tuning run that writes a loadable table."""
import itertools
import json
import os
import time

import pytest

from tests import timing
from tests.models import tiny_llama
from tests.procs import run_python
from vllm_kvrunahead.core.lut import PartitionTable
from vllm_kvrunahead.core.partition import CostModel, balanced_split, from_fractions, predicted_ttft
from vllm_kvrunahead.tools.tune import search


def test_search_finds_known_optimum_of_a_bowl():
    opt = (0.5, 0.3, 0.2)
    calls = []

    def ttft(f):
        calls.append(f)
        return 1.0 + sum((a - b) ** 2 for a, b in zip(f, opt))

    best, t, n = search(ttft, (0.25, 0.25, 0.5))
    assert max(abs(a - b) for a, b in zip(best, opt)) < 0.011
    assert t == pytest.approx(1.0, abs=1e-3) and n == len(set(calls))  # each point measured once


@pytest.mark.parametrize("n_workers", [2, 3, 4])
def test_search_from_a_wrong_cost_model_reaches_the_optimum(n_workers):
    # "measured" TTFT: the pipeline model with constants unlike the cost model the start comes from
    truth = CostModel(num_layers=8, linear=1e-6, attn=5e-11, xfer=2e-8)
    guess = CostModel(num_layers=8, linear=1e-6, attn=1.5e-10, xfer=0.0)  # attention 3x too heavy
    n = 32768

    def ttft(f):
        return predicted_ttft(from_fractions(n, f), truth)

    start = tuple(s.length / n for s in balanced_split(n, n_workers, guess))
    best, t, evals = search(ttft, start, levels=4)
    assert t < ttft(start) * 0.97 and t < ttft(tuple([1 / n_workers] * n_workers))
    if n_workers <= 3:  # brute force over a 1% grid
        grid = [i / 100 for i in range(1, 100)]
        brute = min(ttft(f + (1 - sum(f),)) for f in itertools.product(grid, repeat=n_workers - 1)
                    if sum(f) <= 0.99)
        assert t <= brute * 1.01
    assert evals < 200


def test_search_refuses_bad_start():
    with pytest.raises(ValueError, match="sum to 1"):
        search(lambda f: 1.0, (0.5, 0.6))


def test_tuner_refuses_offsets_it_cannot_measure():
    from types import SimpleNamespace

    from vllm_kvrunahead.tools.tune import tune

    def llm(prefix_caching):
        cache = SimpleNamespace(block_size=128, enable_prefix_caching=prefix_caching)
        return SimpleNamespace(llm_engine=SimpleNamespace(vllm_config=SimpleNamespace(cache_config=cache)))

    with pytest.raises(ValueError, match="needs an engine with prefix caching"):
        tune(llm(False), 2, [600], offsets=[0, 512])
    with pytest.raises(ValueError, match="offset 600 must be >= 0 and a multiple of the KV block size 128"):
        tune(llm(True), 2, [600], offsets=[0, 600])


def test_tuner_cli_writes_a_loadable_table(tmp_path):
    # one engine: cold prompts and chunks after a 512-token prefix-cache hit (4 blocks)
    out = tmp_path / "table.json"
    env = dict(os.environ, VLLM_CPU_KVCACHE_SPACE="1", VLLM_CPU_OMP_THREADS_BIND="0|1")
    t = time.monotonic()
    done = run_python(["-m", "vllm_kvrunahead.tools.tune", "--model", tiny_llama(), "--workers", "2",
                       "--lengths", "600,1200", "--offsets", "0,512", "--out", str(out),
                       "--repeats", "1", "--search-repeats", "1", "--levels", "1",
                       "--engine-args", json.dumps({"dtype": "float32", "enforce_eager": True, "block_size": 128})],
                      tmp_path / "tune.log", 600, env=env)
    timing.record("tuner-2", "tuner", 2, tiny_llama(), None, time.monotonic() - t)
    assert done.returncode == 0, done.output[-6000:]
    t = PartitionTable.load(out)
    assert t.n_workers == 2 and t.offsets == (0, 512) and t.tokens == (600, 1200) and t.row(512).tokens == (600, 1200)
    d = json.loads(out.read_text())
    assert d["format"] == "kvrunahead-lut/2"
    assert [(e.get("offset", 0), e["tokens"]) for e in d["entries"]] == [(0, 600), (0, 1200), (512, 600), (512, 1200)]
    for e, entry in zip(d["measured"], d["entries"]):
        # no timing claims on a shared CPU: the table holds the split that re-measured fastest
        assert set(e["ttft_s"]) == {"best", "model", "even"} and all(v > 0 for v in e["ttft_s"].values())
        assert e["chosen"] == min(e["ttft_s"], key=e["ttft_s"].get)
        assert entry["fractions"] == e["fractions"] and entry["tokens"] == e["tokens"]
        assert entry.get("offset", 0) == e["offset"]
        assert e["measurements"] >= 3
        # the search started from the split the engine ran (read back; the tuner checked it ran
        # [offset, offset + tokens) ahead): its inner bound is a block bound of the prompt
        bound = e["offset"] + e["model_fractions"][0] * e["tokens"]
        assert bound == pytest.approx(round(bound / 128) * 128) and e["offset"] < bound < e["offset"] + e["tokens"]


def test_tuner_engine_kwargs_start_the_tp_layout_or_the_chain():
    from vllm_kvrunahead.tools.tune import engine_kwargs

    tp = engine_kwargs("m", 4, [600, 1200], [0, 512], "tp")
    assert tp["tensor_parallel_size"] == 4 and "prefill_context_parallel_size" not in tp
    copies = engine_kwargs("m", 4, [600, 1200], [0], "copies", {"dtype": "float32"})
    assert copies["prefill_context_parallel_size"] == 4 and "tensor_parallel_size" not in copies
    assert copies["dtype"] == "float32" and not copies["enable_prefix_caching"] and tp["enable_prefix_caching"]
    for kw in (tp, copies):   # every chunk ahead, whole in one step, from the cost model's split
        assert kw["additional_config"]["kv_runahead"] == {"min_tokens": 0, "partition": "model"}
        assert kw["max_num_batched_tokens"] == 1216 and kw["worker_cls"] == "vllm_kvrunahead.Worker"


def test_tuner_and_split_rpcs_on_a_tp_layout_engine(engines):
    """The TP layout (the tiny model with 2 KV heads, TP=2): the tuner measures cold chunks and chunks after a
    512-token prefix-cache hit and writes a table keyed "cpu tp-layout"; the table, "even", fixed fractions
    and the configured split, set by RPC on the running engine, each cut the next prompt on every rank
    (the guests' last segment ends one token early: vLLM's TP forward computes the last token)."""
    from vllm_kvrunahead.core.partition import Chunk, align_bounds, from_fractions

    spec = dict(model=tiny_llama(kv_heads=2), workers=2, lengths=[600, 1200], offsets=[0, 512],
                engine={"dtype": "float32", "enforce_eager": True, "block_size": 128})
    run = engines.get("tiny-kv2-tune-tp", spec, runner="tests.tp_tune_runner")
    d = run["table"]
    t = PartitionTable.from_dict(d, "tuner output")
    assert t.n_workers == 2 and t.offsets == (0, 512) and t.tokens == (600, 1200) and d["device"] == "cpu tp-layout"
    for e in d["measured"]:
        assert set(e["ttft_s"]) == {"best", "model", "even"} and e["chosen"] == min(e["ttft_s"], key=e["ttft_s"].get)
        bound = e["offset"] + e["model_fractions"][0] * e["tokens"]   # the engine's own split, read back whole
        assert bound == pytest.approx(round(bound / 128) * 128) and sum(e["model_fractions"]) == pytest.approx(1)

    def cut(n, fractions):   # the plan's segments of a cold n-token prompt, the guests' last one a token short
        segs = align_bounds(Chunk(0, n, n), [float(s.end) for s in from_fractions(n, fractions)[:-1]], 128)
        return [[(s.start, s.end) for s in segs[:-1]] + [(segs[-1].start, n - 1)]]

    assert run["model_desc"] == run["back_desc"] == ["model", "model"]            # the tuner's engine: partition model
    assert all(x.startswith("table: table kvr_set_partition for lone chunks") for x in run["table_desc"])
    for name, want in (("table_split", cut(600, t.fractions_for(600))), ("even_split", cut(1200, (0.5, 0.5))),
                       ("fixed_split", cut(1200, (0.25, 0.75)))):
        assert run[name] == [want, want], (name, run[name], want)   # both ranks, the same cut
    assert run["even_desc"] == ["even", "even"]
    model = run["model_split"][0][0]
    assert run["model_split"][1] == run["model_split"][0] and model[0][0] == 0 and model[-1][1] == 1199
    assert all(s["mode"] == "tp_layout" and s["link"] == "no-p2p" for s in run["stats"])
