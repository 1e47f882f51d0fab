"""The benchmarks' kvr-tp config is KV-Runahead's TP layout in every harness, and the reports show it beside
1 GPU, TP and today's mode. No engine starts: each harness's arguments are built into vLLM's config as
`LLM(...)` and `vllm serve` would build them (what the plugin reads at start), and the reports get records
shaped as the runs write them."""
import pytest

from benchmarks import common, models, report, serve_bench, serve_report, serving, serving_report, ttft


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return models.write_model("tiny", str(tmp_path_factory.mktemp("models")))


def _config(engine_args):
    import vllm_kvrunahead.plugin

    vllm_kvrunahead.plugin.register()
    return engine_args.create_engine_config()


def _layout(engine_args):
    """(decode, workers, world size, TP size) of the engine these EngineArgs describe, as KV-Runahead reads it."""
    cfg = _config(engine_args)
    pc, kvr = cfg.parallel_config, cfg.additional_config["kv_runahead"]
    return kvr["mode"], kvr["num_workers"], pc.world_size, pc.tensor_parallel_size


def test_kvr_tp_passes_the_link_where_it_measures_one_and_leaves_auto_to_the_servers(model_dir):
    """ttft.py's kvr-tp names the interconnect it measures (every prompt runs ahead there; the start-up line's
    crossover is then that host's); serving.py and serve_bench.py start KV-Runahead as a user would (link auto,
    the step budget rule: N x vLLM's default for the first prompt in line, vLLM's default for the rest)."""
    from vllm.engine.arg_utils import EngineArgs
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    for link in ("nvlink", "no-p2p"):
        kvr = _config(EngineArgs(**common.engine_kwargs("kvr-tp", model_dir, 4096, 2, link))).additional_config
        assert (kvr["kv_runahead"]["link"], kvr["kv_runahead"]["min_tokens"]) == (link, 0)
    plain = _config(EngineArgs(**serving.serving_kwargs("tp", model_dir, 4096, 2, "nvlink", {})))
    cfg = _config(EngineArgs(**serving.serving_kwargs("kvr-tp", model_dir, 4096, 2, "no-p2p", {})))
    kvr, default = cfg.additional_config["kv_runahead"], plain.scheduler_config.max_num_batched_tokens
    assert (kvr["link"], kvr["min_tokens"], kvr["step_budget"]) == ("auto", None, default)
    assert cfg.scheduler_config.max_num_batched_tokens == 2 * default
    a = serve_bench.parse_args(["--configs", "kvr-tp"])
    argv = ["--model", model_dir, "--skip-tokenizer-init"] + serve_bench.engine_args(a, "kvr-tp", 2, 4096, True)
    served = _config(EngineArgs.from_cli_args(EngineArgs.add_cli_args(FlexibleArgumentParser()).parse_args(argv)))
    assert served.additional_config["kv_runahead"]["link"] == "auto"


def test_serving_takes_the_prediction_tables_lengths_and_records_the_link():
    a = serving.parse_args(["--configs", "1gpu,tp,kvr-tp", "--lengths", "16384,131072,32768,65536"])
    assert a.params["default_lengths"] == [16384, 32768, 65536, 131072] and a.params["max_model_len"] == 131072 + 512
    assert serving.parse_args([]).params["default_lengths"] == [32768, 65536]
    k = serving.KvrStats._tp_layout([dict(chunks_ahead=1, **{"chunks_not_ahead.tp_faster": 3}, guest_tokens=10,
                                          tp_tokens=5, decode_tokens=2)], "model", "nvlink")
    assert (k["link"], k["chunks_not_ahead"], k["tp_prefill_tokens"]) == ("nvlink", {"tp_faster": 3}, 3)


def test_serve_bench_records_the_tp_layouts_start_up_lines(tmp_path):
    log = tmp_path / "server.log"
    log.write_text("(Worker_TP0 pid=1) INFO 12-07 [rank.py:103] KV-Runahead: link profile nvlink for the TP layout "
                   "(auto: NVLink between every pair of the TP group's GPUs)\n"
                   "(Worker_TP0 pid=1) INFO 12-07 [rank.py:104] KV-Runahead: TP layout on nvlink: chunks of >= 5360 "
                   "tokens run ahead (TP=4 is faster below)\n")
    got = serve_bench._from_log(str(log))
    assert got["link_line"].startswith("KV-Runahead: link profile nvlink for the TP layout (auto: NVLink")
    assert got["tp_layout_line"] == ("KV-Runahead: TP layout on nvlink: chunks of >= 5360 tokens run ahead "
                                     "(TP=4 is faster below)")


def test_llm_harnesses_start_kvr_tp_as_the_tp_layout_and_kvr_as_the_chain(model_dir):
    from vllm.engine.arg_utils import EngineArgs

    def layout(kw):
        return _layout(EngineArgs(**kw))

    assert layout(common.engine_kwargs("kvr-tp", model_dir, 4096, 2)) == ("tp_layout", 2, 2, 2)
    assert layout(serving.serving_kwargs("kvr-tp", model_dir, 4096, 2, "nvlink", {})) == ("tp_layout", 2, 2, 2)
    assert layout(common.engine_kwargs("kvr", model_dir, 4096, 2)) == ("copies", 2, 2, 1)
    assert layout(serving.serving_kwargs("kvr", model_dir, 4096, 2, "nvlink", {})) == ("copies", 2, 2, 1)
    # ttft.py: kvr-tp is an engine of its own, not a partition of the chain engine
    a = ttft.parse_args(["--configs", "1gpu,tp,kvr-balanced,kvr-tp"])
    assert a.kvr_variants == ["kvr-balanced"]


def test_serve_bench_starts_kvr_tp_as_the_tp_layout(model_dir):
    from vllm.engine.arg_utils import EngineArgs
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    a = serve_bench.parse_args(["--smoke"])
    parser = EngineArgs.add_cli_args(FlexibleArgumentParser())
    for cfg, want in (("kvr-tp", ("tp_layout", 2, 2, 2)), ("kvr", ("copies", 2, 2, 1))):
        argv = ["--model", model_dir, "--skip-tokenizer-init"] + serve_bench.engine_args(a, cfg, 2, 4096, True)
        args = EngineArgs.from_cli_args(parser.parse_args(argv))
        assert _layout(args) == want, cfg
        assert args.additional_config["kv_runahead"]["min_tokens"] == a.kvr_options["min_tokens"]


class _Engine:
    """collective_rpc("kvr_stats") of a TP-layout engine at N=2: two snapshots, before and after a scenario."""

    def __init__(self):
        snap = [dict(mode="tp_layout", rank=r, position=r, returns_output=True, tp_rank=r, chunks_ahead=0,
                     tokens_ahead=0, segment_tokens=[0, 0], tokens_run=0, decode_tokens=0) for r in range(2)]
        after = [dict(s, chunks_ahead=2, tokens_ahead=4096, segment_tokens=[3000, 1094], tokens_run=10, decode_tokens=8)
                 for s in snap]
        self.snaps = [snap, after]

    def collective_rpc(self, method):
        assert method == "kvr_stats"
        return self.snaps.pop(0)


def test_reports_show_kvr_tp_beside_one_gpu_tp_and_kvr():
    stats = serving.KvrStats(_Engine(), True)
    k = stats.delta(stats.snap())
    # guests 4094 tokens; vLLM's TP model 10, of them 8 decodes: each chunk's last token
    assert (k["layout"], k["chunks_ahead"], k["guest_tokens"], k["tp_prefill_tokens"]) == ("tp", 2, 4094, 2)
    assert k["chain_share"] == pytest.approx(4094 / 4096)
    kv = {"1gpu": 792_528, "tp": 3_678_224, "kvr": 792_528, "kvr-tp": 3_020_000}
    base = dict(device="H200", model="llama3-8b", interconnect="nvlink", model_note="m")
    serving_recs = [dict(base, config=c, n_gpus=1 if c == "1gpu" else 4, scenario="default-budget",
                         prompt_tokens=32768, max_tokens=1, num_requests=1, value_s=v, kv_cache_tokens=kv[c],
                         **({"kvr": k} if c == "kvr-tp" else {}))
                    for c, v in (("1gpu", 1.2), ("tp", 0.4), ("kvr", 0.36), ("kvr-tp", 0.37))]
    md = serving_report.markdown(serving_recs)
    assert "| default-budget: 1 x 32k, TTFT | 1.200 s | 0.400 s (3.00x) | 0.360 s (3.33x) | 0.370 s (3.24x) |" in md
    assert "kvr-tp N=4 3,020,000 (3.81x 1 GPU, 0.82x TP)" in md and "kvr N=4 792,528 (1.00x 1 GPU, 0.22x TP)" in md
    assert "| default-budget: 1 x 32k, TTFT | 4 | 1.00 | 2 | 3000 / 1094 | 10 (8) |" in md
    ttft_recs = [dict(base, config=c if c != "kvr" else "kvr-balanced", n_gpus=4, backend="mp", prompt_tokens=32768,
                      ttft_s_median=v, decode_tok_s=d, kv_cache_tokens=kv[c])
                 for c, v, d in (("1gpu", 1.2, 166), ("tp", 0.4, 302), ("kvr", 0.36, 167), ("kvr-tp", 0.37, 300))]
    md = report.markdown(ttft_recs)
    assert "| 32768 | 1.2 s | 0.4 s (3.00x) | 0.36 s (3.33x) | 0.37 s (3.24x) | 166 | 302 | 167 | 300 |" in md
    assert "kvr-tp 3,020,000 (3.81x 1 GPU, 0.82x TP)" in md
    serve_recs = [dict(base, config=c, n_gpus=4, workload="random", request_rate=0.5, input_len=None,
                       median_ttft_ms=t, p99_ttft_ms=t, mean_tpot_ms=p, kv_cache_tokens=kv[c],
                       **({"kvr": dict(layout="tp", chunks_ahead=10, tokens_ahead=163840, chain_share=0.99)}
                          if c == "kvr-tp" else {}))
                  for c, t, p in (("tp", 250, 3.5), ("kvr", 211, 8.3), ("kvr-tp", 215, 3.5))]
    md = serve_report.markdown(serve_recs)
    assert "| 0.5 | 0.250 / 0.250 | 0.211 / 0.211 | 0.215 / 0.215 |" in md
    assert "kvr-tp N=4 3,020,000 (0.82x TP)" in md and "| kvr-tp N=4 | 0.5 | 10 (-) | 163840 | 0.99 |" in md


def test_serving_runs_the_peer_guest_for_models_beyond_one_gpu(model_dir, tmp_path):
    """serving.py --guest peer: kvr-tp's engine is the TP layout with the peer guest (issue 31's GPU run:
    llama3-70b / qwen2.5-32b, dummy weights); their shapes' plan refuses the full guest on an H100 at N=8 and
    fits the peer guest (core/memory.py, from the configs as vLLM reads them)."""
    from vllm.engine.arg_utils import EngineArgs

    from vllm_kvrunahead.core.memory import tp_layout_plan
    from vllm_kvrunahead.vllm_side.seam import model_memory

    a = serving.parse_args(["--configs", "tp,kvr-tp", "--guest", "peer", "--model", "llama3-70b", "--n-gpus", "8"])
    assert "--guest" in serving._pass_through(a) and a.guest == "peer"
    cfg = _config(EngineArgs(**serving.serving_kwargs("kvr-tp", model_dir, 4096, 2, "nvlink", {}, a.guest)))
    assert cfg.additional_config["kv_runahead"]["guest"] == "peer" and cfg.additional_config["kv_runahead"]["mode"] == "tp_layout"
    plain = _config(EngineArgs(**serving.serving_kwargs("kvr-tp", model_dir, 4096, 2, "nvlink", {})))
    assert plain.additional_config["kv_runahead"]["guest"] == "full"
    h100 = int(79.18 * 2 ** 30)
    for name in ("llama3-70b", "qwen2.5-32b"):
        mc = EngineArgs(model=models.write_model(name, str(tmp_path)), skip_tokenizer_init=True,
                        max_model_len=131072).create_model_config()
        m = model_memory(mc)
        plans = {g: tp_layout_plan(m["shape"], vocab=m["vocab"], tied=m["tied"], n=8, dtype_bytes=m["dtype_bytes"],
                                   step_budget=16384, max_model_len=131072, block_size=16, gpu_bytes=h100,
                                   utilization=0.9, guest=g) for g in ("full", "peer")}
        assert plans["full"].kv_tokens == 0 and plans["peer"].kv_tokens > 131072 * 4, (name, plans)
