"""The step plan and the step split (pure): which chunks run ahead, where they are cut, and
which KV blocks every position of the ring receives and sends."""
import numpy as np
import pytest

from vllm_kvrunahead.core.partition import (
    Chunk, CostModel, align_bounds, balanced_split, balanced_step_bounds, runahead_gain
)
from vllm_kvrunahead.core.partitioner import Partitioner
from vllm_kvrunahead.core.plan import ReqView, make_plan
from vllm_kvrunahead.transport.kv_layout import kernel_blocks

BS = 16
COST = CostModel()


def view(rid, c, m, prompt_len=None, not_ahead=""):
    end = c + m
    return ReqView(rid, c, m, prompt_len or end, tuple(range(1000 * len(rid), 1000 * len(rid) + -(-end // BS))),
                   not_ahead)


def splitter(n, **kw):
    return Partitioner("model", n, COST, min_tokens=kw.pop("min_tokens", 0), block_size=BS, **kw)


@pytest.mark.parametrize("n", [2, 3, 4])
@pytest.mark.parametrize("c", [0, 100, 4096])
def test_ring_messages_match_and_cover_what_each_position_lacks(n, c):
    plan = make_plan([view("a", c, 3000)], n, splitter=splitter(n), block_size=BS)
    (r,) = plan.requests
    segs = r.segments
    assert segs[0].start == c and segs[-1].end == c + 3000
    assert all(s.end % BS == 0 for s in segs[:-1]) and all(s.length > 0 for s in segs)
    blocks = np.asarray(r.block_ids)
    for pos in range(n):  # every message is received as it was sent
        np.testing.assert_array_equal(plan.send_blocks(pos), plan.recv_blocks((pos + 1) % n))
    np.testing.assert_array_equal(plan.recv_blocks(0), blocks[: c // BS])             # the head's prefix
    for pos in range(1, n - 1):                                                        # prefix + earlier segments
        np.testing.assert_array_equal(plan.recv_blocks(pos), blocks[: segs[pos].start // BS])
    np.testing.assert_array_equal(plan.recv_blocks(n - 1), blocks[c // BS: segs[-1].start // BS])  # only new KV
    up = plan.upfront_blocks()                                                          # the block holding c
    np.testing.assert_array_equal(up, blocks[c // BS: c // BS + 1] if c % BS else blocks[:0])


def test_which_chunks_run_ahead():
    reqs = [view("cold", 0, 3000), view("later", 4096, 2000), view("decode", 5000, 1, prompt_len=100, not_ahead="decode"),
            view("tiny", 0, 20), view("logprobs", 0, 3000, not_ahead="prompt_logprobs")]
    plan = make_plan(reqs, 3, splitter=splitter(3), block_size=BS)
    assert [r.req_id for r in plan.requests] == ["cold", "later"]   # tiny: < 2 chain blocks; others on the head
    # every prefill chunk that stays on the head says why, once; a decode is not a prefill chunk
    assert plan.not_ahead == (("tiny", "too_short"), ("logprobs", "prompt_logprobs"))
    at_least_2500 = make_plan(reqs, 3, splitter=splitter(3, min_tokens=2500), block_size=BS)
    assert [r.req_id for r in at_least_2500.requests] == ["cold"]
    assert not make_plan(reqs, 1, splitter=splitter(3), block_size=BS)             # one worker: plain vLLM
    # chain workers compute prompt tokens only: a resumed request's output tokens stay on the head
    (r,) = make_plan([view("resumed", 0, 3000, prompt_len=2000)], 3, splitter=splitter(3), block_size=BS).requests
    assert r.segments[-1].start <= 2000


class Picky:
    """A splitter that runs chunks of >= 1000 tokens ahead alone, and of them only those of >= 2000 in a step."""

    declined = "tp_faster"

    def __init__(self):
        self.seen = None

    def runs_ahead(self, chunk):
        return chunk.length >= 1000

    def choose(self, chunks, others, decodes):
        self.seen = (chunks, others, decodes)
        return [c.length >= 2000 for c in chunks]

    def split_step(self, chunks, head_only):
        return Partitioner("even", 2, COST, block_size=BS).split_step(chunks, head_only)


def test_the_splitter_chooses_among_a_steps_chunks_given_the_rest_of_the_step():
    reqs = [view("a", 0, 3000), view("b", 0, 1500), view("c", 0, 100), view("lp", 0, 3000, not_ahead="prompt_logprobs"),
            view("d", 5000, 1, prompt_len=100, not_ahead="decode"), view("e", 6000, 1, prompt_len=100, not_ahead="decode")]
    picky = Picky()
    plan = make_plan(reqs, 2, splitter=picky, block_size=BS)
    assert [r.req_id for r in plan.requests] == ["a"]
    # every chunk the splitter turned down, alone or in the step, with its reason; features keep theirs
    assert plan.not_ahead == (("c", "tp_faster"), ("lp", "prompt_logprobs"), ("b", "tp_faster"))
    chunks, others, decodes = picky.seen
    assert chunks == [reqs[0].chunk, reqs[1].chunk] and others == [reqs[2].chunk, reqs[3].chunk] and decodes == 2
    # the chain of copies' splitter keeps every chunk that gains alone
    assert Partitioner("model", 2, COST, block_size=BS).choose(chunks, others, decodes) == [True, True]


@pytest.mark.parametrize("n", [2, 3])
def test_a_prefix_computed_in_the_same_step_keeps_its_chunk_on_the_head(n):
    """vLLM caches a block when it schedules it: B (A[:1600] + 300) is admitted in the step that
    computes A's [1024, 1700) and hits A's blocks of [1024, 1600) before they hold any KV. B runs
    on the head, where each layer writes the batch's KV before attention reads it; C, whose
    cached prefix was computed in an earlier step, runs ahead beside them."""
    bs = 64
    a_blocks = tuple(range(100, 127))                        # A: 1700 tokens, 27 blocks
    a = ReqView("A", 1024, 676, 1700, a_blocks)
    b = ReqView("B", 1600, 300, 1900, a_blocks[:25] + (200, 201, 202, 203, 204))
    c = ReqView("C", 1024, 400, 1424, a_blocks[:16] + (300, 301, 302, 303, 304, 305, 306))
    split = Partitioner("model", n, COST, min_tokens=0, block_size=bs)
    plan = make_plan([a, b, c], n, splitter=split, block_size=bs)
    assert [r.req_id for r in plan.requests] == ["A", "C"] and plan.not_ahead == (("B", "prefix_not_final"),)
    # the next step, A's blocks are final: B's next chunk may run ahead
    b2 = ReqView("B", 1900, 600, 2500, b.block_ids + tuple(range(205, 215)))
    later = make_plan([b2], n, splitter=split, block_size=bs)
    assert [r.req_id for r in later.requests] == ["B"] and later.not_ahead == ()


def test_cost_model_decides_by_gain():
    auto = Partitioner("model", 4, COST, block_size=BS)
    assert not auto.runs_ahead(Chunk(0, 1024, 1024))              # the chain's fixed cost outweighs it
    assert auto.runs_ahead(Chunk(0, 8192, 8192))
    assert runahead_gain(Chunk(0, 8192, 8192), 2, COST) < runahead_gain(Chunk(0, 8192, 8192), 4, COST)
    # a chunk after a long cached prefix gains more: its attention is heavier per token
    assert runahead_gain(Chunk(32768, 36864, 36864), 4, COST) > runahead_gain(Chunk(0, 4096, 4096), 4, COST)


def test_step_split_is_one_job():
    one = balanced_step_bounds([Chunk(0, 16384, 16384)], 4, COST)[0]
    assert [round(b) for b in one] == [s.end for s in balanced_split(16384, 4, COST)[:-1]]   # the single-prompt split
    busy = balanced_step_bounds([Chunk(0, 16384, 16384)], 4, COST, head_extra=2e-3)[0]
    assert busy[-1] > one[-1]                                     # a busy head gets a smaller share
    two = balanced_step_bounds([Chunk(0, 16384, 16384), Chunk(8192, 12288, 12288)], 4, COST)
    share = [(COST.layer_compute(0, b) / COST.layer_compute(0, 16384)) for b in two[0]]
    share2 = [(COST.layer_compute(8192, b) / COST.layer_compute(8192, 12288)) for b in two[1]]
    assert share == pytest.approx(share2)                          # the same share of every chunk's cost


def test_split_step_uses_the_configured_split_only_for_one_cold_prompt_alone():
    p = Partitioner("even", 2, COST, min_tokens=0, block_size=BS)
    assert p.split_step([Chunk(0, 3200, 3200)], [])[0][0].length == 1600                        # even
    assert p.split_step([Chunk(160, 3360, 3360)], [])[0][0].length == 1600                      # even, after c
    m = Partitioner("model", 2, COST, min_tokens=0, block_size=BS)
    alone = m.split_step([Chunk(0, 32000, 32000)], [])[0]
    busy = m.split_step([Chunk(0, 32000, 32000)], [Chunk(20000, 20001, 20001)] * 64)[0]      # 64 decodes
    assert busy[-1].length < alone[-1].length


@pytest.mark.parametrize("chunk, bounds", [
    (Chunk(100, 300, 300), [150.0]),              # unaligned start
    (Chunk(100, 140, 140), [120.0]),              # one block boundary in reach: 128
    (Chunk(0, 5000, 2000), [1500.0, 3000.0]),      # limit: chain segments end within the prompt
    (Chunk(4096, 4200, 4200), [4096.0, 4097.0]),   # bounds too low: moved up, one block apart
])
def test_align_bounds(chunk, bounds):
    segs = align_bounds(chunk, bounds, BS)
    assert segs[0].start == chunk.start and segs[-1].end == chunk.end and len(segs) == len(bounds) + 1
    assert all(s.end % BS == 0 and s.end <= chunk.limit for s in segs[:-1])
    assert all(s.length >= 1 for s in segs) and all(s.length >= BS for s in segs[1:-1])


def test_align_bounds_refuses_what_cannot_be_cut():
    with pytest.raises(ValueError, match="cannot cut tokens"):
        align_bounds(Chunk(100, 110, 110), [105.0], BS)   # no block boundary in (100, 109]


def test_kernel_blocks_split_scheduler_blocks_in_order():
    np.testing.assert_array_equal(kernel_blocks(np.array([3, 0, 7]), 1), [3, 0, 7])
    np.testing.assert_array_equal(kernel_blocks(np.array([3, 0, 7]), 2), [6, 7, 0, 1, 14, 15])
