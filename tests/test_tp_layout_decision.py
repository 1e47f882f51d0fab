"""A TP-layout rank decides which chunks run ahead against vLLM's TP=N on its link profile (fast: the installed
vLLM's SchedulerOutput through ``TPLayoutRank.plan``, the guest and its connector faked). Llama-3-8B's shape
(``shape`` None), N=2: a cold 2048-token prompt is TP=2's on NVLink (crossover ~3k) and runs ahead without P2P
(crossover ~1.1k); ``min_tokens`` overrides the cost model."""
import dataclasses
from types import SimpleNamespace

import pytest
from vllm.sampling_params import SamplingParams
from vllm.v1.core.sched.output import CachedRequestData, NewRequestData, SchedulerOutput

from vllm_kvrunahead.config import KVRunaheadConfig
from vllm_kvrunahead.core.partitioner import SplitSetting
from vllm_kvrunahead.core.stats import RunaheadStats
from vllm_kvrunahead.tp_layout.rank import TPLayoutRank

BS = 16


class FakeFlow:
    bytes_sent = bytes_received = 0


def rank(n: int, link: str, min_tokens: int | None = None) -> TPLayoutRank:
    kvr = KVRunaheadConfig(num_workers=n, min_tokens=min_tokens, mode="tp_layout", link=link)
    connector = SimpleNamespace(comm=FakeFlow(), shards=FakeFlow(), gather=FakeFlow(), stats=RunaheadStats(n),
                                block_bytes=4000)
    t = TPLayoutRank(kvr, 0, None, 8, BS, SimpleNamespace(kv_cache_config=SimpleNamespace(num_blocks=4096)), connector)
    t.split = SplitSetting(kvr, t.cost, None, BS, "cpu tp-layout")   # start() builds it on an engine
    return t


def prompt_step(tokens: int) -> SchedulerOutput:
    req = NewRequestData(req_id="a", prompt_token_ids=list(range(1, tokens + 1)), mm_features=[],
                         sampling_params=SamplingParams(max_tokens=4), pooling_params=None,
                         block_ids=(list(range(-(-tokens // BS))),), num_computed_tokens=0, lora_request=None)
    return dataclasses.replace(SchedulerOutput.make_empty(), scheduled_new_reqs=[req], num_scheduled_tokens={"a": tokens},
                               total_num_scheduled_tokens=tokens, scheduled_cached_reqs=CachedRequestData.make_empty())


@pytest.mark.parametrize("link, ahead", [("nvlink", False), ("no-p2p", True), ("auto", True)])
def test_a_rank_runs_a_2k_prompt_ahead_only_where_tp2_is_slower(link, ahead):
    t = rank(2, link)
    step = t.plan(prompt_step(2048))
    assert bool(step) == ahead and step.not_ahead == (() if ahead else (("a", "tp_faster"),))
    assert t.counters.chunks_not_ahead == ({} if ahead else {"tp_faster": 1})
    # auto without an engine: nothing known, no-p2p (an engine resolves it from every rank's facts)
    assert t.link == {"auto": "no-p2p"}.get(link, link) and t.tp_cost.link.name == t.link


def test_min_tokens_still_decides_where_the_user_set_it():
    assert rank(2, "nvlink", min_tokens=0).plan(prompt_step(2048))
    step = rank(2, "no-p2p", min_tokens=4096).plan(prompt_step(2048))
    assert not step and step.not_ahead == (("a", "too_short"),)
