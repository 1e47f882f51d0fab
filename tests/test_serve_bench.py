"""Pure checks of the serve benchmark's inputs (no server): workload length ranges, prompt counts,
and the word-level tokenizer's exact decode -> encode round trip that bench serve's datasets rely on."""
from benchmarks import models, serve_bench


def test_workload_ranges_and_prompt_counts():
    _, ins, outs = serve_bench.bench_args(serve_bench.FULL["longmix"])
    assert 2048 <= ins[0] < 2100 and 65000 < ins[1] <= 65536, ins
    assert outs == (32, 256), outs
    assert serve_bench.bench_args(serve_bench.FULL["random"])[1:] == ((16384, 16384), (64, 64))
    assert serve_bench.bench_args(serve_bench.FULL["prefix"])[1] == (16384, 16384)
    for spec in (serve_bench.FULL, serve_bench.SMOKE):
        p = serve_bench.GPU if spec is serve_bench.FULL else serve_bench.CPU
        for w in spec.values():
            assert serve_bench.bench_args(w)[1][1] + serve_bench.bench_args(w)[2][1] <= p["max_model_len"]
            for r in w["rates"]:
                n = serve_bench.num_prompts(w, r, p)
                assert n >= p["min_prompts"]
                if w["dataset"] == "prefix_repetition":
                    assert n % w["num_prefixes"] == 0


def test_word_level_tokenizer_round_trip(tmp_path):
    from transformers import AutoTokenizer
    d = models.write_model("tiny-serve", str(tmp_path), tokenizer=True)
    tok = AutoTokenizer.from_pretrained(d)
    cfg = models.MODELS["tiny-serve"][0]
    assert tok.vocab_size == cfg["vocab_size"] and tok.num_special_tokens_to_add() == 0
    assert (tok.bos_token_id, tok.eos_token_id) == (cfg["bos_token_id"], cfg["eos_token_id"])
    ids = [(i * 7919) % cfg["vocab_size"] for i in range(3000)]   # special ids included
    assert tok.encode(tok.decode(ids), add_special_tokens=False) == ids
