"""One step through ``TPLayoutRank`` without an engine (fast): the installed vLLM's own SchedulerOutput in;
vLLM's TP step (each runahead chunk cut to its last token) and each rank's guest step (its segment, its
scratch blocks, its traffic) out. The guest and its connector are fakes: ``tp_layout_for`` builds the real
ones from process groups and vLLM's runner, which need an engine."""
import dataclasses
from types import SimpleNamespace

import numpy as np
import pytest
from vllm.sampling_params import SamplingParams
from vllm.v1.core.sched.output import CachedRequestData, SchedulerOutput

from tests.test_step import BLOCKS, BS, new_req, step
from vllm_kvrunahead.config import KVRunaheadConfig
from vllm_kvrunahead.core.partition import CostModel
from vllm_kvrunahead.core.partitioner import SplitSetting
from vllm_kvrunahead.core.stats import RunaheadStats
from vllm_kvrunahead.core.tp_step import kv_heads_of
from vllm_kvrunahead.tp_layout.connector import TP_FORWARD, GuestMeta
from vllm_kvrunahead.tp_layout.rank import TPLayoutRank
from vllm_kvrunahead.vllm_side import seam

HEADS = 4          # KV heads of the model: one per rank at N=4, two at N=2
SCRATCH = 64       # the guest's scratch blocks
BLOCK_BYTES = 4000  # one scratch block of every layer, all KV heads


class FakeGuest:
    """What TPLayoutRank asks of its guest: the scratch's size, and a step to run (recorded)."""

    def __init__(self):
        self.kv_cache_config = SimpleNamespace(num_blocks=SCRATCH)
        self.steps: list[SchedulerOutput] = []

    def run(self, scheduler_output) -> None:
        self.steps.append(scheduler_output)


class FakeFlow:
    bytes_sent = bytes_received = 0


def rank(r: int, n: int) -> TPLayoutRank:
    kvr = KVRunaheadConfig(num_workers=n, min_tokens=0, partition="model", mode="tp_layout")
    connector = SimpleNamespace(comm=FakeFlow(), shards=FakeFlow(), gather=FakeFlow(), stats=RunaheadStats(n),
                                block_bytes=BLOCK_BYTES)
    t = TPLayoutRank(kvr, r, None, HEADS, BS, FakeGuest(), connector)
    t.split = SplitSetting(kvr, CostModel(), None, BS, "cpu")
    return t


@pytest.mark.parametrize("n", [2, 4])
@pytest.mark.parametrize("computed", [0, 48])  # cold; after 48 cached tokens (3 whole blocks)
def test_each_rank_runs_its_segment_ahead_and_vllm_the_last_token(n, computed):
    prompt = 300
    so = step([new_req("a", prompt, computed)], {"a": prompt - computed})
    ranks = [rank(r, n) for r in range(n)]
    steps = [t.rewrite(so) for t in ranks]
    plan = steps[0].plan
    assert all(s.plan == plan for s in steps)                         # every rank plans the same step
    (req,) = plan.requests
    segs = req.segments
    assert segs[0].start == computed and segs[-1].end == prompt - 1  # the last token is the TP model's
    assert all(a.end == b.start and a.end % BS == 0 for a, b in zip(segs, segs[1:]))

    for t, s in zip(ranks, steps):
        # vLLM's TP step: the request computed up to its last token, scheduled for that token alone
        (nr,) = s.scheduler_output.scheduled_new_reqs
        assert nr.num_computed_tokens == prompt - 1 and s.scheduler_output.num_scheduled_tokens == {"a": 1}
        assert s.scheduler_output.kv_connector_metadata is TP_FORWARD
        assert t._tails == {"a": prompt - 1}      # where vLLM's runner starts the request (V2: the patch)
        t.run_ahead(s)
        (g,) = t.guest.steps
        k = t.rank
        # the guest's step: its segment only, over scratch blocks [0, segment end), sampled greedily
        (gr,) = g.scheduled_new_reqs
        assert gr.num_computed_tokens == segs[k].start and g.num_scheduled_tokens == {"a": segs[k].length}
        assert gr.block_ids == (list(range(-(-segs[k].end // BS))),) and gr.sampling_params is seam.CHAIN_SAMPLING
        meta = g.kv_connector_metadata
        assert isinstance(meta, GuestMeta)
        first = computed // BS
        # the chain: [c, segment start) from rank k-1, [c, segment end) on to rank k+1, in scratch blocks
        np.testing.assert_array_equal(meta.recv, np.arange(first, segs[k].start // BS) if k else [])
        np.testing.assert_array_equal(meta.send, np.arange(first, segs[k].end // BS) if k < n - 1 else [])
        # its own KV heads of [c, segment end) go into vLLM's paged blocks of the same tokens
        np.testing.assert_array_equal(meta.keep_dst, np.asarray(BLOCKS)[meta.keep_src])
        # the later ranks' segments come back as its KV heads; it sends the earlier ranks theirs
        assert [src for src, _ in meta.shard_recv] == list(range(k + 1, n))
        assert [dst for dst, _ in meta.shard_send] == list(range(k))
        # a cached prefix: its own KV heads from its paged blocks, the others' from their owners
        assert len(meta.own_src) == first and [src for src, _ in meta.gather_recv] == (
            [r for r in range(n) if r != k] if computed else [])
        # every rank counts every rank's figures from the same plan
        c = t.counters
        assert c.segment_tokens == [g_.length for g_ in segs] and c.chunks_ahead == 1
        assert (c.chunks_ahead_cached, c.prefix_tokens_sent) == ((1, n * computed) if computed else (0, 0))
    assert len({tuple(t.counters.kv_bytes_sent) for t in ranks}) == 1
    sent, received = ranks[0].counters.kv_bytes_sent, ranks[0].counters.kv_bytes_received
    assert sum(sent) == sum(received) > 0


def test_shards_and_gather_carry_each_rank_its_own_kv_heads():
    n, computed = 2, 32
    so = step([new_req("a", 300, computed)], {"a": 300 - computed})
    t0, t1 = rank(0, n), rank(1, n)
    for t in (t0, t1):
        t.run_ahead(t.rewrite(so))
    m0, m1 = t0.guest.steps[0].kv_connector_metadata, t1.guest.steps[0].kv_connector_metadata
    # rank 1's segment, scratch blocks, sent to rank 0 as rank 0's KV heads; rank 0 lands them in its paged blocks
    (dst, sent), = m1.shard_send
    (src, into), = m0.shard_recv
    assert (dst, src) == (0, 1) and len(sent) == len(into)
    np.testing.assert_array_equal(np.asarray(BLOCKS)[sent], into)
    # the prefix: each rank sends the other its KV heads of [0, c) from its paged blocks, into scratch blocks
    (_, g_to), = m0.gather_send
    (_, g_from), = m1.gather_recv
    np.testing.assert_array_equal(g_to, np.asarray(BLOCKS)[g_from])
    assert kv_heads_of(0, n, HEADS) == (0, 2) and kv_heads_of(1, n, HEADS) == (2, 4)


def test_a_decode_and_a_prompt_with_logprobs_are_the_tp_models():
    t = rank(0, 2)
    prefill = step([new_req("a", 300, 0)], {"a": 300})
    t.run_ahead(t.rewrite(prefill))
    decode = step(scheduled={"a": 1}, cached=dataclasses.replace(
        CachedRequestData.make_empty(), req_ids=["a"], new_block_ids=[None], num_computed_tokens=[300],
        num_output_tokens=[1]))
    d = t.rewrite(decode)
    t.run_ahead(d)
    assert not d.plan and d.scheduler_output.num_scheduled_tokens == {"a": 1} and len(t.guest.steps) == 1
    assert t.counters.decode_tokens == 1
    lp = dataclasses.replace(new_req("b", 300, 0), sampling_params=SamplingParams(max_tokens=4, prompt_logprobs=1))
    s = t.rewrite(step([lp], {"b": 300}))
    assert not s.plan and s.plan.not_ahead == (("b", "prompt_logprobs"),)
    assert s.scheduler_output.num_scheduled_tokens == {"b": 300}      # vLLM's TP model prefills it whole
    assert t.counters.chunks_not_ahead == {"prompt_logprobs": 1}


def test_every_rank_times_its_rounds_by_the_same_lag_from_the_plan():
    """Each rank's guest step carries the step's lag (tp_order.step_lag of the plan's segments by the rank's
    cost model), the same on every rank: it times the rounds of the shards and the gather, so the gather's
    lead follows the pipeline. A cost model whose attention dominates makes later ranks trail rank 0."""
    from vllm_kvrunahead.core.tp_order import step_lag

    n = 4
    so = step([new_req("a", 300, 48)], {"a": 300 - 48})
    ranks = [rank(r, n) for r in range(n)]
    metas = []
    for t in ranks:
        t.cost = CostModel(linear=1e-9, attn=1e-6, xfer=1e-7)
        s = t.rewrite(so)
        t.run_ahead(s)
        metas.append(t.guest.steps[0].kv_connector_metadata)
    want = step_lag(ranks[0].cost, [r.segments for r in s.plan.requests])
    assert want[-1] > 0 and all(m.lag == want for m in metas)
