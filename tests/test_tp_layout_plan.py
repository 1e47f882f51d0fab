"""TP layout's step rule (vllm_kvrunahead/tp_layout.py, pure): which heads each rank holds, and that every
rank ends a runahead chunk with its heads of [c, c + m - 1) in its paged blocks, each block written once, and
every head of the cached prefix [0, c) in its scratch, while the chain, shard and gather messages pair up
sender with receiver."""
import random

import numpy as np
import pytest

from vllm_kvrunahead.core.partition import Segment
from vllm_kvrunahead.core.plan import RunaheadReq, StepPlan
from vllm_kvrunahead.core.tp_step import SCRATCH_FULL, SEGMENT_EMPTY, kv_heads_of, tp_step


def test_kv_heads_follow_vllms_tp_sharding():
    assert [kv_heads_of(r, 2, 2) for r in range(2)] == [(0, 1), (1, 2)]
    assert [kv_heads_of(r, 2, 8) for r in range(2)] == [(0, 4), (4, 8)]
    assert [kv_heads_of(r, 3, 3) for r in range(3)] == [(0, 1), (1, 2), (2, 3)]
    # fewer KV heads than ranks: each head on tp / heads consecutive ranks (QKVParallelLinear's replicas)
    assert [kv_heads_of(r, 4, 2) for r in range(4)] == [(0, 1), (0, 1), (1, 2), (1, 2)]
    for n, total in ((2, 3), (3, 2)):
        with pytest.raises(ValueError):
            kv_heads_of(0, n, total)


def cut(c, m, n, bs, rng):
    """N segments of [c, c + m), inner bounds on blocks after c, none empty, the last >= 2 tokens (as
    Partitioner.split_step cuts them; the TP forward takes the last token)."""
    bounds = sorted(rng.sample(range(c // bs + 1, (c + m - 2) // bs + 1), n - 1))
    ends = [b * bs for b in bounds] + [c + m]
    return tuple(Segment(i, s, e) for i, (s, e) in enumerate(zip([c] + ends[:-1], ends)))


@pytest.mark.parametrize("n, total", [(2, 2), (3, 3), (4, 4), (2, 8), (4, 2)])
def test_every_rank_ends_with_its_heads_of_the_chunk_each_block_once(n, total):
    """Random steps of 1-3 chunks, cold or after c cached tokens (c on or off a block boundary): every rank
    writes its heads of [c, c + m - 1) into its paged blocks once, has every head of the cached prefix in its
    scratch (its own from its paged blocks, the others' from their owners), and each message has a sender
    and a receiver that agree on its length."""
    rng, bs = random.Random(n * 10 + total), 16
    for _ in range(50):
        reqs, free = [], rng.sample(range(1000), 1000)   # vLLM's block pool: no block in two requests
        for i in range(rng.randint(1, 3)):
            c = rng.choice([0, 0, 3 * bs, rng.randint(1, 5 * bs)])
            m = rng.randint(n * bs + 2, 12 * bs)
            need = -(-(c + m) // bs)
            blocks, free = tuple(free[:need]), free[need:]
            reqs.append(RunaheadReq(f"r{i}", cut(c, m, n, bs, rng), blocks))
        step = tp_step(StepPlan(n, tuple(reqs), bs), scratch_blocks=10_000)
        assert [r.req_id for r in step.requests] == [r.req_id for r in reqs]
        t = [step.traffic_for(k, total) for k in range(n)]
        for k in range(n):
            # paged blocks rank k writes: what it keeps, then what each later rank sends it
            written = list(t[k].keep_dst) + [b for _, ids in t[k].shard_recv for b in ids]
            want = [b for r in reqs for b in r.block_ids[r.start // bs: -(-(r.segments[-1].end - 1) // bs)]]
            assert sorted(written) == sorted(want), k
            assert len(set(written)) == len(written)   # each block once
            assert len(t[k].keep_src) == len(t[k].keep_dst)
            for src, ids in t[k].shard_recv:   # what src sends k is as long as what k expects from it
                assert len(dict(t[src].shard_send)[k]) == len(ids)
            # the cached prefix, every head, in rank k's scratch
            scratch_prefix = sorted(b for r in step.requests for b in r.scratch_ids(0, r.start, bs))
            for h in range(total):
                got = list(t[k].own_dst) if kv_heads_of(k, n, total)[0] <= h < kv_heads_of(k, n, total)[1] else \
                    [b for src, ids in t[k].gather_recv if kv_heads_of(src, n, total)[0] <= h < kv_heads_of(src, n, total)[1]
                     for b in ids]
                assert sorted(got) == scratch_prefix, (k, h)
            for src, ids in t[k].gather_recv:
                assert len(dict(t[src].gather_send)[k]) == len(ids)
            assert len(t[k].own_src) == len(t[k].own_dst)
            # the chain: k receives, per layer, exactly the blocks k-1 sends ([c, segment start), whole blocks)
            if k:
                assert np.array_equal(t[k].recv, t[k - 1].send)
        assert not len(t[0].recv) and not len(t[-1].send)
        # the TP forward computes each chunk's last token only
        assert step.tails() == {r.req_id: Segment(n, r.segments[-1].end - 1, r.segments[-1].end) for r in reqs}
        # chunks take disjoint scratch
        spans = sorted((g.scratch, g.scratch + -(-g.tail // bs)) for g in step.requests)
        assert all(a[1] <= b[0] for a, b in zip(spans, spans[1:]))


def test_chunks_the_guests_cannot_take_go_to_the_tp_model():
    bs = 16
    big = RunaheadReq("big", (Segment(0, 0, 64), Segment(1, 64, 100)), tuple(range(7)))
    small = RunaheadReq("small", (Segment(0, 0, 32), Segment(1, 32, 40)), tuple(range(7, 10)))
    tail_only = RunaheadReq("tail", (Segment(0, 0, 32), Segment(1, 32, 33)), tuple(range(10, 13)))
    step = tp_step(StepPlan(2, (big, small, tail_only), bs, (("d", "decode"),)), scratch_blocks=8)
    assert [r.req_id for r in step.requests] == ["big"]
    assert step.not_ahead == (("d", "decode"), ("small", SCRATCH_FULL), ("tail", SEGMENT_EMPTY))


def test_the_guests_take_chunks_of_prompt_tokens_only():
    from vllm_kvrunahead.core.plan import ReqView
    from vllm_kvrunahead.core.tp_step import OUTPUT_TOKENS, tp_view

    cold, after = ReqView("a", 0, 500, 800, tuple(range(4))), ReqView("b", 256, 500, 800, tuple(range(6)))
    assert tp_view(cold) is cold and tp_view(after) is after
    # a resumed request recomputing prompt + output tokens in one chunk: the guests have no output tokens
    assert tp_view(ReqView("c", 0, 900, 800, tuple(range(8)))).not_ahead == OUTPUT_TOKENS
    assert tp_view(ReqView("d", 0, 800, 800, tuple(range(7)), not_ahead="lora")).not_ahead == "lora"


def test_chunks_past_the_comm_arena_go_to_the_tp_model_with_their_reason():
    """The comm arena holds MAX_CHUNKS runahead chunks' messages a step (2 blocks per chunk and message
    beyond the step's tokens): chunks past it are the TP model's, as comm_full, never a bigger buffer."""
    from vllm_kvrunahead.core.tp_step import COMM_FULL, MAX_CHUNKS

    bs = 16
    reqs = tuple(RunaheadReq(f"r{i}", (Segment(0, 0, 32), Segment(1, 32, 40)), tuple(range(3 * i, 3 * i + 3)))
                 for i in range(MAX_CHUNKS + 2))
    step = tp_step(StepPlan(2, reqs, bs), scratch_blocks=1000)
    assert [r.req_id for r in step.requests] == [f"r{i}" for i in range(MAX_CHUNKS)]
    assert step.not_ahead == tuple((f"r{i}", COMM_FULL) for i in range(MAX_CHUNKS, MAX_CHUNKS + 2))
    assert len(tp_step(StepPlan(2, reqs, bs), scratch_blocks=1000, max_chunks=3).requests) == 3


def test_every_rank_traffic_carries_the_steps_lag():
    """The lag is the step's (every rank plans the same one): each rank's traffic carries all of it."""
    import dataclasses

    big = RunaheadReq("big", (Segment(0, 0, 64), Segment(1, 64, 100)), tuple(range(7)))
    step = tp_step(StepPlan(2, (big,), 16), scratch_blocks=100)
    assert step.traffic_for(0, 2).lag == ()   # none given: every rank at 0
    step = dataclasses.replace(step, lag=(0, 1))
    assert step.traffic_for(0, 2).lag == step.traffic_for(1, 2).lag == (0, 1)
