"""One step through ``Chain.rewrite`` without an engine (fast): the installed vLLM's own SchedulerOutput
in, each worker's share and ring traffic out, for the head and a chain position."""
import dataclasses
from types import SimpleNamespace

import numpy as np
import pytest
from vllm.sampling_params import SamplingParams
from vllm.v1.core.sched.output import CachedRequestData, NewRequestData, SchedulerOutput

from vllm_kvrunahead.config import KVRunaheadConfig
from vllm_kvrunahead.copies.rank import Chain
from vllm_kvrunahead.core.partition import CostModel
from vllm_kvrunahead.core.partitioner import SplitSetting
from vllm_kvrunahead.core.stats import RunaheadStats
from vllm_kvrunahead.core.topology import ChainTopology
from vllm_kvrunahead.runahead import NO_RUNAHEAD
from vllm_kvrunahead.transport.comm import ChainComm
from vllm_kvrunahead.vllm_side import seam

BS = 16
BLOCKS = list(range(40, 60))  # 20 blocks: 320 tokens


def chain(rank: int, n: int = 2) -> Chain:
    kvr = KVRunaheadConfig(num_workers=n, min_tokens=0, partition="model", mode="copies")
    c = Chain(kvr, ChainTopology(n, n - 1, rank), None, BS, 64, ChainComm(None, None),
              SimpleNamespace(stats=RunaheadStats(n)))
    c.split = SplitSetting(kvr, CostModel(), None, BS, "cpu")
    c.block_bytes = 1000  # one KV block of every layer
    return c


def new_req(rid: str, prompt: int, computed: int) -> NewRequestData:
    return NewRequestData(req_id=rid, prompt_token_ids=list(range(1, prompt + 1)), mm_features=[],
                          sampling_params=SamplingParams(temperature=0.7, seed=3, max_tokens=4), pooling_params=None,
                          block_ids=(list(BLOCKS[: -(-prompt // BS)]),), num_computed_tokens=computed, lora_request=None)


def step(new=(), scheduled=None, cached=None) -> SchedulerOutput:
    so = SchedulerOutput.make_empty()
    sched = dict(scheduled or {})
    return dataclasses.replace(so, scheduled_new_reqs=list(new), num_scheduled_tokens=sched,
                               total_num_scheduled_tokens=sum(sched.values()),
                               scheduled_cached_reqs=cached or CachedRequestData.make_empty())


@pytest.mark.parametrize("computed", [0, 40])  # cold; after a 40-token cached prefix (not block aligned)
def test_rewrite_gives_each_position_its_segment_and_ring_traffic(computed):
    prompt = 300
    so = step([new_req("a", prompt, computed)], {"a": prompt - computed})
    head_chain, first_chain = chain(1), chain(0)
    head, first = head_chain.rewrite(so), first_chain.rewrite(so)
    (req,) = head.plan.requests
    seg0, seg1 = req.segments
    assert seg0.start == computed and seg0.end % BS == 0 and seg1.end == prompt and seg0.end < seg1.end
    assert first.plan == head.plan                                  # every worker plans the same step

    # the head: vLLM's request, computed up to its segment, scheduled for its segment only
    (nr,) = head.scheduler_output.scheduled_new_reqs
    assert nr.num_computed_tokens == seg1.start and nr.sampling_params.seed == 3
    assert head.scheduler_output.num_scheduled_tokens == {"a": seg1.length}
    blocks = np.asarray(BLOCKS)
    hm = head.scheduler_output.kv_connector_metadata
    np.testing.assert_array_equal(hm.recv, blocks[computed // BS: seg1.start // BS])  # the chain's new KV
    np.testing.assert_array_equal(hm.send_prefix, blocks[: computed // BS])           # cached prefix -> pos 0
    np.testing.assert_array_equal(hm.upfront_send, blocks[computed // BS: computed // BS + 1] if computed % BS
                                  else blocks[:0])
    assert not len(hm.send) and not len(hm.upfront_recv)

    # position 0: its segment alone, sampled as plain greedy (the user's seed stays the head's)
    (cr,) = first.scheduler_output.scheduled_new_reqs
    assert cr.num_computed_tokens == computed and cr.block_ids == (list(BLOCKS[:19]),)
    assert cr.sampling_params is seam.CHAIN_SAMPLING
    assert first.scheduler_output.num_scheduled_tokens == {"a": seg0.length}
    fm = first.scheduler_output.kv_connector_metadata
    np.testing.assert_array_equal(fm.recv, hm.send_prefix)
    np.testing.assert_array_equal(fm.send, hm.recv)
    np.testing.assert_array_equal(fm.upfront_recv, hm.upfront_send)

    # every worker counts every position's traffic from the same plan: what one sends, the next receives
    for c in (head_chain, first_chain):
        s = c.counters
        assert s.kv_bytes_sent == [1000 * (len(fm.send) + len(fm.upfront_send)),
                                   1000 * (len(hm.send_prefix) + len(hm.upfront_send))]
        assert s.kv_bytes_received == [1000 * (len(fm.recv) + len(fm.upfront_recv)), 1000 * len(hm.recv)]
        assert s.segment_tokens == [seg0.length, seg1.length]
        assert (s.chunks_ahead_cached, s.prefix_tokens_sent) == ((1, computed) if computed else (0, 0))
    report = head_chain.counters.report()
    assert report["kv_bytes_sent"] == head_chain.counters.kv_bytes_sent and head_chain.counters.report() is None


def test_a_decode_step_runs_on_the_head_and_nothing_on_the_chain():
    head, first = chain(1), chain(0)
    prefill = step([new_req("a", 300, 0)], {"a": 300})
    head.rewrite(prefill), first.rewrite(prefill)
    decode = step(scheduled={"a": 1}, cached=dataclasses.replace(
        CachedRequestData.make_empty(), req_ids=["a"], new_block_ids=[None], num_computed_tokens=[300],
        num_output_tokens=[1]))
    h, f = head.rewrite(decode), first.rewrite(decode)
    assert not h.plan and not f.plan
    assert h.scheduler_output.num_scheduled_tokens == {"a": 1} and not h.scheduler_output.kv_connector_metadata
    assert f.scheduler_output is None                                 # a chain worker runs nothing
    assert head.counters.chunks_ahead == first.counters.chunks_ahead == 1
    assert head.counters.tokens_run + first.counters.tokens_run == 301  # every token once


def test_one_worker_has_no_chain():
    so = step([new_req("a", 300, 0)], {"a": 300})
    s = NO_RUNAHEAD.rewrite(so)
    assert s.scheduler_output is so and not s.plan and NO_RUNAHEAD.returns_output
    with pytest.raises(RuntimeError, match="no chain to split"):
        NO_RUNAHEAD.set_fractions([0.5, 0.5])
