"""The TP layout's per-layer moves (``transport/tp_hooks.TPHooks``, what the guest's connector runs) without an
engine: a guest step's forward is played layer by layer over scratch regions and paged caches whose KV is a
known function of (layer, token, KV head), so every landed or sent block can be checked.

- One rank against recording fakes (no process group): it issues exactly ``tp_order.step_order``'s operations,
  its attention finds every KV head of [0, segment start) in the scratch at every layer, it ends with its KV heads
  of the chunk in its paged blocks, sends exactly the KV each peer needs, and aborts cleanly.
- Every rank on gloo with the real ``ChainComm``, ``RoundComm`` and ``CommArena`` (N = 2, 3, 4; KV heads split
  or replicated; cold chunks and chunks after cached tokens; lags zero, a layer a rank, mixed): each step
  completes and lands the same KV; each rank makes 2 process groups at any N (R3); a rank that fails or stalls
  mid-step ends its peers' step in a bounded error, never a hang (R2).
"""
from __future__ import annotations

import dataclasses
import random
import time
from types import SimpleNamespace

import pytest
import torch

from tests.dist_utils import run_ranks
from vllm_kvrunahead.core.partition import Segment
from vllm_kvrunahead.core.plan import RunaheadReq, StepPlan
from vllm_kvrunahead.core.ring_order import POST_RECV, SEND, WAIT_RECV
from vllm_kvrunahead.core.stats import RunaheadStats
from vllm_kvrunahead.core.tp_order import (BATCH, CHAIN, FORK, GATHER, JOIN, LAND, RECV, SHARDS, STAGE, Peers, Ref,
                                           Windows, comm_buffer_bytes, step_order)
from vllm_kvrunahead.core.tp_step import kv_heads_of, tp_step
from vllm_kvrunahead.transport.comm import CommArena, CommFull, PeerLost, PeerTimeout
from vllm_kvrunahead.transport.tp_hooks import TPHooks, tp_links

BS, LAYERS, D = 4, 3, 2          # tokens a block, attention layers, values per (token, KV head)
RING = 2                          # scratch regions: layer l uses region l % 2, as the guest's


def kv(layer: int, token, head) -> torch.Tensor:
    """The model's KV of (layer, token, KV head), D values: exact in fp32."""
    return torch.tensor([layer * 10000 + token * 10 + head + j / 2 for j in range(D)], dtype=torch.float32)


# -- a step ---------------------------------------------------------------------------------------------

def cut(c, m, n, rng):
    """N segments of [c, c + m), inner bounds on blocks, none empty, the last >= 2 tokens."""
    bounds = sorted(rng.sample(range(c // BS + 1, (c + m - 2) // BS + 1), n - 1))
    ends = [b * BS for b in bounds] + [c + m]
    return tuple(Segment(i, s, e) for i, (s, e) in enumerate(zip([c] + ends[:-1], ends)))


def make_step(n, chunks, seed=0):
    """A TP step of ``chunks`` ((c, m): m tokens after c cached); vLLM's paged blocks drawn at random."""
    rng = random.Random(seed)
    pool = rng.sample(range(200), 200)
    reqs = []
    for i, (c, m) in enumerate(chunks):
        need = -(-(c + m) // BS)
        blocks, pool = tuple(pool[:need]), pool[need:]
        reqs.append(RunaheadReq(f"r{i}", cut(c, m, n, rng), blocks))
    step = tp_step(StepPlan(n, tuple(reqs), BS), scratch_blocks=400)
    assert len(step.requests) == len(chunks), step.not_ahead
    return step


def _with_lag(step, k, total, lag):
    """Rank k's traffic with ``lag`` (TPLayoutRank puts the plan's step_lag there)."""
    return dataclasses.replace(step.traffic_for(k, total), lag=tuple(lag))


STEPS = {   # name: chunks (c, m) per N-independent shape
    "cold": lambda n: [(0, 6 * BS * n + 3)],
    "after cached": lambda n: [(9, 5 * BS * n + 2)],              # c inside a block
    "chunks": lambda n: [(2 * BS, 4 * BS * n + 1), (0, 3 * BS * n + 2), (13, 3 * BS * n)],
}


class Rank:
    """One rank's caches: scratch regions (every KV head) and vLLM's paged caches (its KV heads), the cached
    prefixes' KV in its paged blocks, everything else NaN."""

    def __init__(self, step, k, total):
        self.step, self.k, self.total, self.n = step, k, total, step.n
        self.heads = [kv_heads_of(r, self.n, total) for r in range(self.n)]
        self.lo, self.hi = self.heads[k]
        self.order = [f"layers.{i}.attn" for i in range(LAYERS)]
        regions = [torch.full((400, total, BS, D), float("nan")) for _ in range(RING)]
        self.scratch = {name: regions[i % RING] for i, name in enumerate(self.order)}
        self.paged = {name: torch.full((200, self.hi - self.lo, BS, D), float("nan")) for name in self.order}
        for layer, name in enumerate(self.order):
            for r in step.requests:
                for t in range(r.start):
                    self.paged[name][r.block_ids[t // BS], :, t % BS] = torch.stack(
                        [kv(layer, t, h) for h in range(self.lo, self.hi)])

    def forward(self, hooks: TPHooks, check=True) -> None:
        """The guest's forward: per layer the entry hook, attention (reads every KV head of [0, segment
        start), writes this rank's segment), the exit hook; then the step's end."""
        for layer, name in enumerate(self.order):
            hooks.enter(name)
            cache = self.scratch[name]
            for r in self.step.requests:
                seg = r.segments[self.k]
                if check:
                    for t in range(seg.start):
                        got = cache[r.scratch + t // BS, :, t % BS]
                        want = torch.stack([kv(layer, t, h) for h in range(self.total)])
                        assert torch.equal(got, want), (self.k, layer, r.req_id, t)
                for t in range(seg.start, seg.end):
                    cache[r.scratch + t // BS, :, t % BS] = torch.stack([kv(layer, t, h) for h in range(self.total)])
            hooks.exit(name, cache)
        hooks.finish()

    def check_paged(self) -> None:
        """Its KV heads of every token but each chunk's last (the TP forward's) in its paged blocks."""
        for layer, name in enumerate(self.order):
            for r in self.step.requests:
                for t in range(r.tail):
                    got = self.paged[name][r.block_ids[t // BS], :, t % BS]
                    want = torch.stack([kv(layer, t, h) for h in range(self.lo, self.hi)])
                    assert torch.equal(got, want), (self.k, layer, r.req_id, t)

    def arena(self, windows=Windows(), max_chunks=3, tokens=None) -> CommArena:
        """Its comm buffers for steps of at most ``tokens`` (default: this step's) in ``max_chunks`` chunks."""
        tokens = tokens or sum(r.tokens for r in self.step.requests)
        bound = comm_buffer_bytes(n=self.n, layers=LAYERS, kv_bytes_per_token_layer=self.total * D * 4,
                                  total_kv_heads=self.total, step_budget=tokens, max_model_len=400 * BS,
                                  block_size=BS, max_chunks=max_chunks, windows=windows)
        return CommArena(bound.slots)


def hooks_of(rank: Rank, comm, shards, gather, arena, windows=Windows()) -> TPHooks:
    h = TPHooks(comm, shards, gather, arena, RunaheadStats(rank.n), rank.k, rank.heads, 400, windows)
    h.register(rank.scratch, rank.order)
    h.register_paged(rank.paged)
    return h


def tokens_of(block_ids, step, scratch: bool):
    """Per block id: the chunk and the tokens it holds."""
    out = {}
    for r in step.requests:   # a chunk's scratch holds [0, tail); its paged blocks the whole chunk
        for b in range(-(-r.tail // BS) if scratch else len(r.block_ids)):
            out[r.scratch + b if scratch else r.block_ids[b]] = (r, range(b * BS, (b + 1) * BS))
    return [out[int(b)] for b in block_ids]


def reference(layer, blocks, heads, upto) -> torch.Tensor:
    """KV of whole blocks ((chunk, tokens) each), KV heads ``heads``, NaN at tokens >= upto(chunk)."""
    out = torch.full((len(blocks), len(heads), BS, D), float("nan"))
    for i, (r, toks) in enumerate(blocks):
        for j, t in enumerate(toks):
            if t < upto(r):
                out[i, :, j] = torch.stack([kv(layer, t, h) for h in heads])
    return out


def same_where_known(got: torch.Tensor, want: torch.Tensor) -> bool:
    known = ~torch.isnan(want)
    return bool(torch.equal(got[known], want[known]))


# -- one rank against recording fakes ----------------------------------------------------------------------

class FakeChain:
    """ChainComm's side that ChainHooks uses: receives answered from the reference, sends recorded."""

    def __init__(self, rank: Rank, traffic, log):
        self.rank, self.t, self.log = rank, traffic, log
        self.posted, self.sent, self.recvs = [], [], 0

    def post_recv(self, shape, dtype, device):
        layer, self.recvs = self.recvs, self.recvs + 1
        k = self.rank.k
        blocks = tokens_of(self.t.recv, self.rank.step, scratch=True)
        self.posted.append(reference(layer, blocks, range(self.rank.total), lambda r: r.segments[k].start))
        assert tuple(shape) == tuple(self.posted[-1].shape)
        self.log.append((CHAIN, POST_RECV))

    def wait_recv(self):
        self.log.append((CHAIN, WAIT_RECV))
        return self.posted.pop(0)

    def send_copy(self, cache, blocks):
        return cache.index_select(0, blocks)

    def post_send(self, tensor):
        self.sent.append(tensor.clone())
        self.log.append((CHAIN, SEND))

    def end_step(self):
        assert not self.posted
        self.log.append((CHAIN, "end"))

    def abort_step(self):
        self.posted = []
        self.log.append((CHAIN, "abort"))


class FakeBatch:
    def __init__(self, log, flow, index):
        self.log, self.flow, self.index = log, flow, index

    def wait(self):
        pass


class FakeRounds:
    """RoundComm: each batch must be the next of the order's BATCH ops of its flow (same peers, same
    directions); its receives are answered from the reference, its sends recorded with their layers."""

    def __init__(self, flow, rank: Rank, traffic, order, log, fail_at=None):
        self.flow, self.rank, self.t, self.log, self.fail_at = flow, rank, traffic, log, fail_at
        self.expected = [op for op in order.ops() if op.kind == BATCH and op.flow == flow]
        self.sent = []   # (peer, layer, tensor)
        self.aborted = False

    def batch(self, recvs, sends):
        if self.fail_at is not None and len(self.log) >= self.fail_at:
            raise torch.OutOfMemoryError("injected: the round's buffers could not be allocated")
        op = self.expected.pop(0)
        want_recv = [p for p in op.p2p if p.kind == RECV]
        want_send = [p for p in op.p2p if p.kind == SEND]
        assert [peer for peer, _ in recvs] == [p.peer for p in want_recv], op
        assert [peer for peer, _ in sends] == [p.peer for p in want_send], op
        rk, step = self.rank, self.rank.step
        for (peer, buf), p in zip(recvs, want_recv):
            if self.flow == SHARDS:   # my KV heads of peer's segment, KV heads first
                blocks = tokens_of(dict(self.t.shard_recv)[peer], step, scratch=False)
                ref = reference(p.layer, blocks, range(rk.lo, rk.hi), lambda r: r.tail).transpose(0, 1)
            else:                     # peer's KV heads of the prefix
                a, b = rk.heads[peer]
                ref = reference(p.layer, tokens_of(dict(self.t.gather_recv)[peer], step, scratch=True),
                                range(a, b), lambda r: r.start)
            assert buf.shape == ref.shape
            buf.copy_(ref)
        self.sent += [(peer, p.layer, t.clone()) for (peer, t), p in zip(sends, want_send)]
        self.log.append((BATCH, self.flow, op.index))
        return FakeBatch(self.log, self.flow, op.index)

    def end_step(self):
        self.log.append(("end", self.flow))

    def abort_step(self):
        self.aborted = True


class RecordingStreams:
    def __init__(self, log):
        self.log = log

    def on(self, name):
        import contextlib

        return contextlib.nullcontext()

    def fork(self, name):
        self.log.append((FORK, name))

    def record(self, ref):
        self.log.append(ref)

    @staticmethod
    def wait(done):
        if done is not None:
            done.wait()


def expected_log(order, peers: Peers):
    """What ``order`` issues, as the fakes log it."""
    out = []
    for op in order.ops():
        if op.flow == CHAIN:
            out.append((CHAIN, "end") if op.kind == JOIN else (CHAIN, op.kind))
        elif op.kind == FORK:
            out.append((FORK, op.stream))
        elif op.kind in (STAGE, LAND):
            out.append(Ref(op.flow, op.kind, op.index))
        elif op.kind == BATCH:
            out.append((BATCH, op.flow, op.index))
    out += [("end", SHARDS), ("end", GATHER)]
    if not peers.chain_send:
        out.append((CHAIN, "end"))   # no chain JOIN: its end comes last
    return out


def one_rank(n, total, name, k, lag, windows=Windows()):
    step = make_step(n, STEPS[name](n), seed=n * 7 + k)
    traffic = _with_lag(step, k, total, lag)
    rank = Rank(step, k, total)
    log = []
    order = step_order(k, Peers.of(traffic), LAYERS, lag, windows)
    chain = FakeChain(rank, traffic, log)
    shards, gather = (FakeRounds(f, rank, traffic, order, log) for f in (SHARDS, GATHER))
    hooks = hooks_of(rank, chain, shards, gather, rank.arena(windows), windows)
    hooks.streams = RecordingStreams(log)
    hooks.start(traffic)
    return SimpleNamespace(step=step, traffic=traffic, rank=rank, log=log, order=order, hooks=hooks, chain=chain,
                           shards=shards, gather=gather)


CASES = [(2, 2), (4, 4), (4, 8), (4, 2), (3, 3)]   # (N, KV heads): split, several a rank, replicated


@pytest.mark.parametrize("n, total", CASES)
@pytest.mark.parametrize("name", list(STEPS))
def test_a_rank_issues_the_order_and_lands_every_kv_head(n, total, name):
    """Every rank of the step, each with a lag of 0, a layer a rank, or a mixed one: the fakes see
    tp_order's operations in its order (chain ops, forks, stages, rounds with the order's peers, landings,
    joins); at every layer's attention the scratch holds every KV head of [0, segment start); after the
    step its paged blocks hold its KV heads of the chunk; what it sent each peer is that peer's KV."""
    for lag in ((0,) * n, tuple(range(n)), tuple(min(k, 1) for k in range(n))):
        for k in range(n):
            s = one_rank(n, total, name, k, lag)
            s.rank.forward(s.hooks)
            assert s.log == expected_log(s.order, Peers.of(s.traffic)), (lag, k)
            assert not s.shards.expected and not s.gather.expected
            s.rank.check_paged()
            _check_sends(s)
            stats = s.hooks.stats
            t = s.traffic
            assert stats.blocks_sent == LAYERS * (len(t.send) + sum(len(ids) for _, ids in t.shard_send)
                                                  + sum(len(ids) for _, ids in t.gather_send))
            assert stats.blocks_received == LAYERS * (len(t.recv) + sum(len(ids) for _, ids in t.shard_recv)
                                                      + sum(len(ids) for _, ids in t.gather_recv))


def _check_sends(s):
    rk, step, k = s.rank, s.step, s.rank.k
    for layer, sent in enumerate(s.chain.sent):   # [c, segment end), every KV head
        want = reference(layer, tokens_of(s.traffic.send, step, scratch=True), range(rk.total),
                         lambda r: r.segments[k].end)
        assert same_where_known(sent, want), layer
    assert len(s.chain.sent) == (LAYERS if len(s.traffic.send) else 0)
    shard_sends = {(peer, layer): t for peer, layer, t in s.shards.sent}
    for dst, ids in s.traffic.shard_send:   # dst's KV heads of my segment, KV heads first
        for layer in range(LAYERS):
            a, b = rk.heads[dst]
            want = reference(layer, tokens_of(ids, step, scratch=True), range(a, b), lambda r: r.segments[k].end)
            assert same_where_known(shard_sends.pop((dst, layer)), want.transpose(0, 1)), (dst, layer)
    assert not shard_sends
    gather_sends = {(peer, layer): t for peer, layer, t in s.gather.sent}
    for dst, ids in s.traffic.gather_send:   # my KV heads of the prefix
        for layer in range(LAYERS):
            want = reference(layer, tokens_of(ids, step, scratch=False), range(rk.lo, rk.hi), lambda r: r.start)
            assert same_where_known(gather_sends.pop((dst, layer)), want), (dst, layer)
    assert not gather_sends


def test_windows_of_one_slot_still_land_every_kv_head():
    """Every slot a single buffer (each refill waits for its last reader): the same KV lands."""
    w = Windows(1, 1, 1, 1, 1)
    for k in range(4):
        s = one_rank(4, 4, "chunks", k, (0, 1, 1, 2), windows=w)
        s.rank.forward(s.hooks)
        assert s.log == expected_log(s.order, Peers.of(s.traffic))
        s.rank.check_paged()


def test_a_round_that_fails_mid_step_aborts_every_flow():
    """A round's issue raises (its buffers, say, cannot be had): the exception leaves the layer's exit hook,
    the connector's wait_for_save aborts (every flow's traffic dropped, no wait on a peer), and the next
    step runs as if nothing happened."""
    s = one_rank(4, 4, "after cached", 1, (0, 1, 1, 2))
    s.shards.fail_at = len(s.log) + 1   # its first shard round, at a layer's exit (the gather's ran at the start)
    with pytest.raises(torch.OutOfMemoryError, match="injected"):
        s.rank.forward(s.hooks, check=False)
    s.hooks.abort()
    assert s.shards.aborted and s.gather.aborted and (CHAIN, "abort") in s.log
    assert s.hooks._order is None and not s.hooks._done and not s.hooks._staged
    again = one_rank(4, 4, "after cached", 1, (0, 1, 1, 2))
    again.rank.forward(again.hooks)
    again.rank.check_paged()


def test_a_step_that_skips_layers_is_refused_and_aborted():
    s = one_rank(2, 2, "after cached", 0, (0, 1))
    s.hooks.enter(s.rank.order[0])
    s.hooks.exit(s.rank.order[0], s.rank.scratch[s.rank.order[0]])
    with pytest.raises(RuntimeError, match="ran 1 of 3 attention layers"):
        s.hooks.finish()
    assert s.shards.aborted and s.gather.aborted


def test_a_message_larger_than_its_slot_raises_instead_of_allocating():
    arena = CommArena({"shard_recv": (2, 64)})
    assert arena.nbytes == 128
    assert arena.views("shard_recv", 1, [(2, 4), (2, 4)], torch.float32)[1].shape == (2, 4)
    with pytest.raises(CommFull):
        arena.views("shard_recv", 0, [(3, 4), (2, 4)], torch.float32)
    with pytest.raises(CommFull):
        arena.views("gather_recv", 0, [(1,)], torch.float32)


# -- every rank on gloo ---------------------------------------------------------------------------------

GLOO_CASES = [("cold", (0, 1, 1, 2)), ("after cached", (0, 1, 2, 3)), ("chunks", (0, 0, 0, 0)),
              ("after cached", (0, 0, 1, 1))]


def _gloo_steps(rank, world, total, timeout_s):
    import torch.distributed as dist

    made = []
    new_group = dist.new_group

    def counting(*args, **kwargs):
        made.append(args[0] if args else kwargs.get("ranks"))
        return new_group(*args, **kwargs)

    dist.new_group = counting
    try:
        steps = [make_step(world, STEPS[name](world), seed=11) for name, _ in GLOO_CASES]
        arena = Rank(steps[0], rank, total).arena(tokens=max(sum(r.tokens for r in s.requests) for s in steps))
        comm, shards, gather = tp_links(rank, world, dist.group.WORLD, None, timeout_s, arena)
        shards.warm_up(torch.device("cpu"))
        gather.warm_up(torch.device("cpu"))
        comm.warm_up_open(torch.device("cpu"))
    finally:
        dist.new_group = new_group
    out = []
    for step, (name, lag) in zip(steps, GLOO_CASES):
        r = Rank(step, rank, total)
        hooks = hooks_of(r, comm, shards, gather, arena)
        hooks.start(_with_lag(step, rank, total, lag[:world]))
        r.forward(hooks)
        r.check_paged()
        out.append((name, comm.bytes_sent + shards.bytes_sent + gather.bytes_sent))
    return {"groups": made, "steps": out, "arena": arena.nbytes}


@pytest.mark.parametrize("n, total", [(2, 2), (3, 3), (4, 4), (4, 2)])
def test_every_rank_on_gloo_lands_the_same_kv_with_two_groups_a_rank(n, total):
    """Real ChainComm, RoundComm and CommArena on gloo, every rank's forward at once: each step completes
    (host-blocking waits: the order's every wait points no later in the pipeline), every rank's attention
    finds every KV head of [0, segment start) and every rank ends with its KV heads of the chunk. Each rank
    makes 2 process groups (the shards' and the gather's, world-sized) whatever N: with the chain's 2
    neighbour pairs on vLLM's world group, 4 communicators a rank (today's: 3N - 1)."""
    results = run_ranks(_gloo_steps, n, total, 60.0, timeout=300)
    for res in results:
        assert res["groups"] == [list(range(n))] * 2
        assert [name for name, _ in res["steps"]] == [name for name, _ in GLOO_CASES]
    assert sum(res["steps"][-1][1] for res in results) > 0


def _failing_rank(rank, world, fault, timeout_s):
    """Rank 1 fails its first shard round (``raise``, after cached tokens) or stalls 8 s before its forward
    (``stall``, a cold chunk: rank 0 waits for its shards); every rank reports what ended its step and when."""
    import torch.distributed as dist

    step = make_step(world, STEPS["after cached" if fault == "raise" else "cold"](world), seed=3)
    r = Rank(step, rank, 2)
    arena = r.arena()
    comm, shards, gather = tp_links(rank, world, dist.group.WORLD, None, timeout_s, arena)
    for flow in (shards, gather):
        flow.warm_up(torch.device("cpu"))
    comm.warm_up_open(torch.device("cpu"))
    hooks = hooks_of(r, comm, shards, gather, arena)
    if rank == 1 and fault == "raise":
        def fail(recvs, sends):
            raise torch.OutOfMemoryError("injected: the round's buffers could not be allocated")
        shards.batch = fail
    if rank == 1 and fault == "stall":
        time.sleep(8)
    t0 = time.monotonic()
    try:
        hooks.start(_with_lag(step, rank, 2, (0, 1)))
        r.forward(hooks, check=False)
        return "completed", time.monotonic() - t0
    except Exception as e:  # noqa: BLE001 - the error is the result
        hooks.abort()   # as the connector's wait_for_save does; the worker then exits (fail-fast)
        return f"{type(e).__name__}: {e}", time.monotonic() - t0


def test_a_rank_whose_round_fails_ends_its_peers_step_at_once():
    """Rank 1's first shard round raises (out of memory) and its process leaves: rank 0, waiting for its
    KV heads of rank 1's segment, learns the connection closed at once, not after the 60 s timeout."""
    (msg0, t0), (msg1, _) = run_ranks(_failing_rank, 2, "raise", 60.0, timeout=300)
    assert msg1.startswith("OutOfMemoryError: injected"), msg1
    assert msg0.startswith(PeerLost.__name__) and "TP rank 1 closed the connection" in msg0, msg0
    assert t0 < 30, t0


def test_a_stalled_rank_ends_its_peers_step_within_the_timeout():
    """Rank 1 stalls before its forward: rank 0 gives up within the flows' 1 s timeout, long before the
    stall ends, with the error naming rank 1: on gloo a send completes only once its peer receives it, so
    with 3 layers its chain send of layer 0 (the send window's oldest, waited for before layer 2's) is what
    it waits for first; every send and round is waited for within the timeout."""
    (msg0, t0), _ = run_ranks(_failing_rank, 2, "stall", 1.0, timeout=300)
    assert msg0.startswith(PeerTimeout.__name__) and "no KV to chain rank 1 delivered within 1.0 s" in msg0, msg0
    assert t0 < 8, t0
