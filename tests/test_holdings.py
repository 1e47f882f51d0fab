"""What chain positions keep between steps (pure): every worker's KV contents simulated slot by
slot through random traffic (chunked prompts, multi-turn prefix-cache hits, decodes, requests
the chain does not carry, freed and reused blocks), checking that a position always attends over
the head's exact prefix although it receives only what the holdings say it lacks."""
import random

import numpy as np
import pytest

from vllm_kvrunahead.core.holdings import ChainHoldings
from vllm_kvrunahead.core.partition import CostModel
from vllm_kvrunahead.core.partitioner import Partitioner
from vllm_kvrunahead.core.plan import ReqView, make_plan

BS = 4
NUM_BLOCKS = 160


class Req:
    def __init__(self, rid, seq, prompt_len, computed, blocks, eligible, max_new):
        self.rid, self.seq, self.prompt_len, self.computed = rid, seq, prompt_len, computed
        self.blocks, self.eligible, self.left = blocks, eligible, max_new

    def kv(self, t):  # the KV of position t depends on the tokens up to it (what the prefix cache keys on)
        return hash(tuple(self.seq[: t + 1])) & 0x7FFFFFFF


class Sim:
    """A head and N-1 chain positions, each with NUM_BLOCKS x BS slots of "KV" (ints); vLLM's block
    pool and prefix cache as far as they decide block ids."""

    def __init__(self, n, seed):
        self.n, self.rng = n, random.Random(seed)
        self.head = np.zeros((NUM_BLOCKS, BS), np.int64)
        self.chain = np.zeros((n - 1, NUM_BLOCKS, BS), np.int64)
        self.holdings = ChainHoldings(n - 1, NUM_BLOCKS, BS)
        self.split = Partitioner("model", n, CostModel(), min_tokens=0, block_size=BS)
        self.free, self.refs, self.cache = list(range(1, NUM_BLOCKS)), {}, {}
        self.live, self.done, self.next_id = [], [], 0
        self.held_tokens = 0
        self.not_final = 0  # chunks kept on the head: their prefix was computed in the same step

    def alloc(self):
        b = self.free.pop(self.rng.randrange(len(self.free)))  # any freed block: stale contents everywhere
        self.cache = {h: x for h, x in self.cache.items() if x != b}
        self.refs[b] = 1
        return b

    def add(self):
        """Admit a new request into the step being scheduled (None: no room). Its prefix-cache hits
        may be blocks that requests scheduled before it compute in this same step."""
        rng = self.rng
        done = [s for s in self.done if len(s) < 100]
        if done and rng.random() < 0.6:  # the next turn of a finished conversation
            seq = rng.choice(done) + [rng.randrange(50) for _ in range(rng.randrange(8, 60))]
        elif self.live and rng.random() < 0.3:  # shares a live request's prefix (a system prompt, a document)
            other = rng.choice(self.live).seq
            seq = other[: rng.randrange(1, len(other) + 1)] + [rng.randrange(50) for _ in range(rng.randrange(8, 60))]
        else:
            seq = [rng.randrange(50) for _ in range(rng.randrange(8, 90))]
        blocks = []
        for i in range((len(seq) - 1) // BS):  # prefix-cache hits on whole blocks, at least one token to compute
            b = self.cache.get(hash(tuple(seq[: (i + 1) * BS])))
            if b is None:
                break
            if b in self.free:
                self.free.remove(b)
            self.refs[b] = self.refs.get(b, 0) + 1
            blocks.append(b)
        growth = sum(-(-(r.prompt_len + r.left) // BS) - len(r.blocks) for r in self.live)
        if len(self.free) < growth + -(-(len(seq) + 6) // BS):  # no preemption here: admit what fits
            for b in blocks:
                self.release(b)
            return None
        r = Req(f"r{self.next_id}", seq, len(seq), len(blocks) * BS, blocks,
                eligible=rng.random() < 0.85, max_new=rng.randrange(1, 6))
        self.live.append(r)
        self.next_id += 1
        return r

    def release(self, b):
        self.refs[b] -= 1
        if self.refs[b] == 0:
            self.free.append(b)

    def slot(self, r, t):
        return r.blocks[t // BS], t % BS

    def schedule(self, r):
        """This step's tokens of ``r``, its blocks, and (vLLM's rule) the hashes of the blocks they
        fill, cached now, when scheduled, not once computed."""
        if r.computed < r.prompt_len:
            m = min(r.prompt_len - r.computed, self.rng.choice([3, 9, 17, 40, 200]))
        else:
            r.seq.append(self.rng.randrange(50))
            m = 1
        while len(r.blocks) * BS < r.computed + m:
            r.blocks.append(self.alloc())
        for i in range((r.computed + m) // BS):
            self.cache.setdefault(hash(tuple(r.seq[: (i + 1) * BS])), r.blocks[i])
        return ReqView(r.rid, r.computed, m, r.prompt_len, tuple(r.blocks),
                       not_ahead="decode" if r.computed >= r.prompt_len else "" if r.eligible else "lora")

    def step(self):
        rng, n = self.rng, self.n
        sched = [r for r in self.live if rng.random() < 0.8]
        views = [self.schedule(r) for r in sched]
        while len(self.live) < 4 and (r := self.add()) is not None:  # admitted after the running ones
            sched.append(r)
            views.append(self.schedule(r))
        plan = make_plan(views, n, splitter=self.split, block_size=BS, holdings=self.holdings)
        self.holdings.record(plan, views)
        reqs = {r.rid: r for r in sched}
        ahead = {p.req_id: p for p in plan.requests}
        for b in plan.upfront_blocks():
            self.chain[0, b] = self.head[b]
        senders = [self.head] + [self.chain[k] for k in range(n - 1)]
        for pos in range(n - 1):
            self.chain[pos, plan.recv_blocks(pos)] = senders[pos][plan.recv_blocks(pos)]
            for p in plan.requests:  # what this position attends over is the head's exact prefix
                r, seg = reqs[p.req_id], p.segments[pos]
                for t in range(seg.start):
                    assert self.chain[pos][self.slot(r, t)] == r.kv(t), (pos, p.req_id, t, p.held)
                for t in range(seg.start, seg.end):
                    self.chain[pos][self.slot(r, t)] = r.kv(t)
        self.head[plan.recv_blocks(n - 1)] = self.chain[n - 2][plan.recv_blocks(n - 1)]
        for v in views:  # each layer writes the whole batch's KV before its attention reads any
            r = reqs[v.req_id]
            first = ahead[v.req_id].segments[-1].start if v.req_id in ahead else v.num_computed
            for t in range(first, v.num_computed + v.num_scheduled):
                self.head[self.slot(r, t)] = r.kv(t)
        for v in views:
            r = reqs[v.req_id]
            for t in range(v.num_computed + v.num_scheduled):  # the head ends with the whole KV
                assert self.head[self.slot(r, t)] == r.kv(t), (v.req_id, t)
            r.computed += v.num_scheduled
            if r.computed >= r.prompt_len and v.num_scheduled == 1:
                r.left -= 1
        self.check_held()
        self.held_tokens += sum(sum(p.held) for p in plan.requests)
        self.not_final += sum(why == "prefix_not_final" for _, why in plan.not_ahead)
        for r in [r for r in self.live if r.left == 0]:
            self.live.remove(r)
            self.done.append(r.seq)
            for b in reversed(r.blocks):
                self.release(b)
        return plan

    def check_held(self):
        """Every block the record says a position holds in full equals the head's, slot for slot."""
        for pos in range(self.n - 1):
            full = np.flatnonzero(self.holdings._valid[pos] == BS)
            bad = full[(self.chain[pos, full] != self.head[full]).any(axis=1)]
            assert not len(bad), (pos, bad[:8])


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("n", [2, 3, 4])
def test_positions_attend_over_the_heads_exact_prefix_receiving_only_what_they_lack(n, seed):
    sim = Sim(n, seed)
    ran_cached = 0
    for _ in range(400):
        plan = sim.step()
        ran_cached += sum(p.start > 0 for p in plan.requests)
    assert ran_cached > 20          # later chunks and cache hits did run ahead ...
    assert sim.held_tokens > 0      # ... and positions skipped prefix KV they held ...
    assert sim.not_final > 0        # ... and hits on blocks computed in the same step stayed on the head


def test_multi_turn_receives_only_the_part_of_history_a_position_lacks():
    n, h = 3, ChainHoldings(2, NUM_BLOCKS, BS)
    split = Partitioner("model", n, CostModel(), min_tokens=0, block_size=BS)
    turn1 = ReqView("t1", 0, 64, 64, tuple(range(1, 17)))
    p1 = make_plan([turn1], n, splitter=split, block_size=BS, holdings=h)
    h.record(p1, [turn1])
    e0, e1 = (s.end for s in p1.requests[0].segments[:2])
    for t in range(64, 68):  # the head decodes alone into the last block and a new one
        v = ReqView("t1", t, 1, 64, tuple(range(1, 18)), not_ahead="decode")
        h.record(make_plan([v], n, splitter=split, block_size=BS, holdings=h), [v])
    # turn 2 hits the cache for turn 1's 17 blocks minus the last partial one: 64 tokens, then 40 new
    new = tuple(range(40, 50))
    turn2 = ReqView("t2", 64, 40, 104, tuple(range(1, 17)) + new)
    p2 = make_plan([turn2], n, splitter=split, block_size=BS, holdings=h)
    (r,) = p2.requests
    assert r.held == (e0, e1)
    np.testing.assert_array_equal(p2.recv_blocks(0), np.arange(e0 // BS + 1, 17))   # blocks 1.. are ids 1..
    np.testing.assert_array_equal(p2.recv_blocks(1), np.concatenate(
        [np.arange(e1 // BS + 1, 17), new[: r.segments[1].start // BS - 16]]))


def test_work_the_head_does_alone_clears_what_positions_held_from_there_on():
    h = ChainHoldings(1, 8, BS)
    split = Partitioner("model", 2, CostModel(), min_tokens=0, block_size=BS)
    v = ReqView("a", 0, 24, 24, (1, 2, 3, 4, 5, 6))
    h.record(make_plan([v], 2, splitter=split, block_size=BS, holdings=h), [v])
    held = h.held((1, 2, 3, 4, 5, 6), 24)[0]
    assert 2 * BS <= held < 24
    # another request reuses block 2 (freed) and the head alone writes its slots 2..3
    w = ReqView("b", 6, 2, 30, (7, 2), not_ahead="lora")
    h.record(make_plan([w], 2, splitter=split, block_size=BS, holdings=h), [w])
    assert h.held((1, 2, 3, 4, 5, 6), 24) == (BS,)          # block 1 still held, block 2 no longer whole
    assert h.held((2,), 2 * BS) == (0,)
