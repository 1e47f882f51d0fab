"""TP layout: what each rank does with a runahead chunk when vLLM runs plain TP=N (pure; no torch).

vLLM owns the decode model (TP=N, every rank holds its KV heads of every token) and every rank also
holds the full model, the guest (``vllm_side/guest.py``). A chunk [c, c + m) after c cached tokens runs ahead on
the guests and ends in vLLM's TP forward:

    every rank:   the KV of the cached prefix [0, c), all heads, per layer: its own heads from its paged
                  blocks, the others' from the ranks that hold them (the prefix gather)
    rank 0 guest  [c, e0)           --[c, e0) per layer-->  rank 1 guest [e0, e1)  --> ... rank N-1 [.., c+m-1)
    every rank:   its KV heads of [c, c+m-1) into its paged blocks (own + earlier segments from its scratch,
                  later segments' heads from the ranks that computed them, per layer)
    TP forward:   token c+m-1 (and the step's other work) on all N ranks, which samples

The guests' KV lives in a scratch (``Guest``), never in vLLM's paged cache: only head shards land
there, so the scheduler's blocks hold N x the tokens they hold in the chain-of-copies mode. The last
token stays with the TP forward so that the logits come from vLLM's own model, its sampler and its
step, exactly as a plain TP request's do.

Inner segment bounds are whole blocks (``Partitioner.split_step``), so a rank's segment is whole
blocks but for the first one's start (c) and the last one's end, and the shards are whole blocks too: a
block's bytes per head are the same in the guest's full-head cache and in a rank's head-shard cache.
The block holding an unaligned c is gathered with the prefix (its slots before c); rank 0's guest
writes its own tokens into that block before the layer's connector hook runs, so a layer's prefix
lands in the scratch at the previous layer's exit (the first layer's before the forward).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import numpy as np

from .partition import Segment
from .plan import ReqView, StepPlan

SCRATCH_FULL = "scratch_full"   # the guests' scratch holds no more chunks this step
OUTPUT_TOKENS = "output_tokens"  # a resumed request recomputing its output tokens too (guests read prompts only)
SEGMENT_EMPTY = "segment_empty"  # a rank's segment would be empty (the last one's once the tail is cut)
COMM_FULL = "comm_full"          # the step has MAX_CHUNKS runahead chunks already: its comm buffers hold no more
# Runahead chunks a step may have: each chunk's messages may start and end inside a block, so every rank's comm
# arena (tp_order.comm_buffer_bytes) holds 2 blocks per chunk and message beyond the step's tokens. Chunks
# past it go to the TP model (COMM_FULL); 8 costs 16 blocks a message at a 16k step budget (+1.6%).
MAX_CHUNKS = 8


def tp_view(v: ReqView) -> ReqView:
    """``v`` as TP layout sees it: the guests compute chunks of prompt tokens; any other prefill chunk
    is the TP model's (``not_ahead`` says why)."""
    if v.not_ahead:
        return v
    if v.num_computed + v.num_scheduled > v.prompt_len:
        return dataclasses.replace(v, not_ahead=OUTPUT_TOKENS)
    return v


def kv_heads_of(rank: int, n: int, total: int) -> tuple[int, int]:
    """KV heads [lo, hi) that TP rank ``rank`` of ``n`` holds, as vLLM shards them: an equal share when
    the heads divide among the ranks, one replicated head per n/total ranks otherwise
    (``QKVParallelLinear``: ``num_kv_head_replicas = tp_size // total_num_kv_heads``)."""
    if total >= n:
        if total % n:
            raise ValueError(f"{total} KV heads do not split over {n} TP ranks")
        per = total // n
        return rank * per, (rank + 1) * per
    if n % total:
        raise ValueError(f"{n} TP ranks do not replicate {total} KV heads evenly")
    h = rank // (n // total)
    return h, h + 1


def heads_owner(rank: int, n: int, total: int) -> int:
    """The first rank holding ``rank``'s KV heads (itself unless vLLM replicates heads): the one that
    sends them in the prefix gather."""
    return rank if total >= n else rank - rank % (n // total)


def _blocks(lo: int, hi: int, bs: int) -> range:
    """Blocks holding tokens [lo, hi)."""
    return range(lo // bs, -(-hi // bs))


def _ids(parts) -> np.ndarray:
    parts = [np.asarray(p, dtype=np.int64) for p in parts]
    return np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)


@dataclass(frozen=True)
class GuestReq:
    """One chunk run ahead in TP layout. segments: the guests' N segments of [c, c+m-1); the TP forward
    computes [c+m-1, c+m). scratch: the first of the scratch blocks the chunk takes on every rank (for
    [0, c+m-1): the prefix's too)."""

    req_id: str
    segments: tuple[Segment, ...]
    block_ids: tuple[int, ...]     # vLLM's (paged) blocks of the request
    scratch: int

    @property
    def tail(self) -> int:
        return self.segments[-1].end

    @property
    def start(self) -> int:
        return self.segments[0].start

    @property
    def tokens(self) -> int:
        """The chunk's tokens: the guests' segments and the last one, which vLLM's TP forward computes."""
        return self.tail + 1 - self.start

    def scratch_ids(self, lo: int, hi: int, bs: int) -> list[int]:
        return [self.scratch + b for b in _blocks(lo, hi, bs)]

    def paged_ids(self, lo: int, hi: int, bs: int) -> list[int]:
        return [self.block_ids[b] for b in _blocks(lo, hi, bs)]


@dataclass(frozen=True)
class GuestTraffic:
    """What one rank moves in a TP-layout step (block ids; every message is per layer).

    recv / send: the chain, full heads, scratch blocks (from rank - 1 / to rank + 1) of [c, segment
    start) / [c, segment end), from the block holding c on.
    keep_src -> keep_dst: this rank's KV heads of [c, its segment's end), scratch -> paged.
    shard_send: (dst, scratch blocks of its own segment) for every earlier rank: dst's heads.
    shard_recv: (src, paged blocks of src's segment) for every later rank: this rank's heads.
    own_src -> own_dst: this rank's heads of the cached prefix [0, c), paged -> scratch.
    gather_send: (dst, paged blocks of [0, c)) for every rank lacking this rank's heads (their owner sends).
    gather_recv: (src, scratch blocks of [0, c)) from the owner of every other rank's heads.
    lag: every rank's lag in the step's pipeline (``tp_order.step_lag``; the same on every rank), by which
    each rank times its rounds of shards and gather; empty: none (every rank at 0).
    """

    recv: np.ndarray
    send: np.ndarray
    keep_src: np.ndarray
    keep_dst: np.ndarray
    shard_send: tuple[tuple[int, np.ndarray], ...]
    shard_recv: tuple[tuple[int, np.ndarray], ...]
    own_src: np.ndarray
    own_dst: np.ndarray
    gather_send: tuple[tuple[int, np.ndarray], ...]
    gather_recv: tuple[tuple[int, np.ndarray], ...]
    lag: tuple[int, ...] = ()

    def __bool__(self) -> bool:
        return bool(len(self.keep_src) or len(self.recv) or len(self.send))


@dataclass(frozen=True)
class TPStep:
    """A step's runahead chunks in TP layout, on every rank alike (all plan from the same output)."""

    n: int
    block_size: int
    requests: tuple[GuestReq, ...] = ()
    not_ahead: tuple[tuple[str, str], ...] = ()   # (req id, why) of the prefill chunks the TP model computes
    total_heads: int = 0   # the model's KV heads (0: not given; then every rank is taken to lack some)
    lag: tuple[int, ...] = ()  # layers each rank trails rank 0 (tp_order.step_lag; empty: none), in every GuestTraffic

    def __bool__(self) -> bool:
        return bool(self.requests)

    def tails(self) -> dict[str, Segment]:
        """What vLLM's TP forward computes of each runahead chunk: its last token."""
        return {r.req_id: Segment(self.n, r.tail, r.tail + 1) for r in self.requests}

    def guest_segments(self, rank: int) -> dict[str, tuple[Segment, list[int]]]:
        """Rank ``rank``'s guest work: per chunk its segment and the scratch blocks of [0, segment end)."""
        bs = self.block_size
        return {r.req_id: (r.segments[rank], r.scratch_ids(0, r.segments[rank].end, bs)) for r in self.requests}

    def prefix_received(self, r: GuestReq) -> tuple[int, ...]:
        """Tokens of ``r``'s cached prefix each rank receives (of the KV heads it lacks; with one KV
        head every rank holds it all)."""
        return (r.start,) * self.n if r.start and self.total_heads != 1 else ()

    def kv_bytes(self, block_bytes: int) -> tuple[list[int], list[int]]:
        """KV bytes each rank sends and receives in this step: the chain's blocks whole, the head shards
        and the prefix gather by the share of the KV heads they carry (``block_bytes``: one KV block of
        every layer, all heads)."""
        total = self.total_heads or self.n
        share = lambda k: (lambda lo, hi: (hi - lo) / total)(*kv_heads_of(k, self.n, total))  # noqa: E731
        sent, received = [], []
        for k in range(self.n):
            t = self.traffic_for(k, total)
            out = len(t.send) + sum(len(ids) * share(dst) for dst, ids in t.shard_send) \
                + sum(len(ids) * share(k) for _, ids in t.gather_send)
            into = len(t.recv) + sum(len(ids) * share(k) for _, ids in t.shard_recv) \
                + sum(len(ids) * share(src) for src, ids in t.gather_recv)
            sent.append(round(out * block_bytes))
            received.append(round(into * block_bytes))
        return sent, received

    def traffic_for(self, rank: int, total_heads: int) -> GuestTraffic:
        """The one rule of TP-layout traffic: every rank gathers the cached prefix's heads it lacks from
        their owners, keeps its heads of what it has of the chunk (what the chain brought and its own
        segment), and the ranks after it send its heads of the rest."""
        bs, reqs, n = self.block_size, self.requests, self.n
        seg = lambda r, k: r.segments[k]  # noqa: E731
        first = lambda r: r.start // bs * bs  # noqa: E731  (the chain moves whole blocks from c's on)
        recv = _ids(r.scratch_ids(first(r), seg(r, rank).start, bs) for r in reqs) if rank > 0 else _ids([])
        send = _ids(r.scratch_ids(first(r), seg(r, rank).end, bs) for r in reqs) if rank < n - 1 else _ids([])
        keep_src = _ids(r.scratch_ids(first(r), seg(r, rank).end, bs) for r in reqs)
        keep_dst = _ids(r.paged_ids(first(r), seg(r, rank).end, bs) for r in reqs)
        shard_send = tuple((dst, _ids(r.scratch_ids(seg(r, rank).start, seg(r, rank).end, bs) for r in reqs))
                           for dst in range(rank))
        shard_recv = tuple((src, _ids(r.paged_ids(seg(r, src).start, seg(r, src).end, bs) for r in reqs))
                           for src in range(rank + 1, n))
        mine = kv_heads_of(rank, n, total_heads)
        owners = [k for k in range(n) if heads_owner(k, n, total_heads) == k]
        prefix = [r for r in reqs if r.start > 0]
        gather_send = tuple((dst, _ids(r.paged_ids(0, r.start, bs) for r in prefix)) for dst in range(n)
                            if prefix and rank in owners and kv_heads_of(dst, n, total_heads) != mine)
        gather_recv = tuple((src, _ids(r.scratch_ids(0, r.start, bs) for r in prefix)) for src in owners
                            if prefix and kv_heads_of(src, n, total_heads) != mine)
        own_src = _ids(r.paged_ids(0, r.start, bs) for r in prefix)
        own_dst = _ids(r.scratch_ids(0, r.start, bs) for r in prefix)
        return GuestTraffic(recv, send, keep_src, keep_dst, shard_send, shard_recv, own_src, own_dst,
                            gather_send, gather_recv, self.lag)


def tp_step(plan: StepPlan, scratch_blocks: int, total_heads: int = 0, max_chunks: int = MAX_CHUNKS) -> TPStep:
    """The TP-layout step of ``plan`` (``make_plan``'s cut of the step's chunks, N segments each): the
    last segment gives up its last token to the TP forward, and each chunk takes scratch blocks for
    [0, c + m - 1) while they last, up to ``max_chunks`` chunks (a chunk that does not fit, one past
    ``max_chunks``, or one of whose segments would be empty, is prefilled by the TP model)."""
    bs, out, not_ahead, used = plan.block_size, [], list(plan.not_ahead), 0
    for r in plan.requests:
        last = r.segments[-1]
        need = -(-(last.end - 1) // bs)
        if last.length < 2 or any(g.length < 1 for g in r.segments[:-1]):
            not_ahead.append((r.req_id, SEGMENT_EMPTY))
        elif len(out) >= max_chunks:
            not_ahead.append((r.req_id, COMM_FULL))
        elif used + need > scratch_blocks:
            not_ahead.append((r.req_id, SCRATCH_FULL))
        else:
            segs = r.segments[:-1] + (dataclasses.replace(last, end=last.end - 1),)
            out.append(GuestReq(r.req_id, segs, r.block_ids, used))
            used += need
    return TPStep(plan.n_workers, bs, tuple(out), tuple(not_ahead), total_heads)
