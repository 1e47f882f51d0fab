"""The TP layout's issue order (``tp_order.step_order``) run for whole steps under NCCL's rules (pure).

The simulation (``simulate``): every rank's host program is its order with the layers' compute in
between (a layer's attention between its entry and exit ops, the rest of the layer after its exit ops).
- A stream runs its commands in issue order, each after the one before it has finished; an op's
  waits hold its stream until the named ops' events (a wait names an op issued before it).
- A NCCL batch (a single unbatched send or receive is a batch of one) runs on its communicator's
  stream, after the work issued before it on the stream that was current when it was issued; it starts
  as one and ends as one. A message completes once its batch and its peer's batch have both started,
  a transfer time later. Messages between two ranks on one communicator pair up in issue order.
- With ``queues``: the streams share that many hardware queues (``CUDA_DEVICE_MAX_CONNECTIONS``;
  round-robin in creation order); a queue starts its commands in issue order, so a command held at a
  queue's head (its stream busy, its waits unmet) holds every later command of that queue.
Times are in layer times. A deadlock is a command that never starts: a cycle of waits, whatever the
durations, so one timing shows whether a step completes; durations only measure how long ranks wait.
"""
from __future__ import annotations

import random
from collections import defaultdict
from dataclasses import dataclass

import pytest

from vllm_kvrunahead.core.partition import CostModel, Segment
from vllm_kvrunahead.core.plan import RunaheadReq, StepPlan
from vllm_kvrunahead.core.ring_order import POST_RECV, SEND, WAIT_RECV
from vllm_kvrunahead.core.ring_order import Role as ChainRole
from vllm_kvrunahead.core.ring_order import step_order as chain_order
from vllm_kvrunahead.core.tp_step import kv_heads_of, tp_step
from vllm_kvrunahead.core.tp_order import (
    BATCH, CHAIN, COMPUTE, FORK, GATHER, GATHER_GROUP, GATHER_STREAM, JOIN, LAND, RECV, SHARD_GROUP,
    SHARD_STREAM, SHARDS, STAGE, Op, P2P, Peers, Ref, TPStepOrder, Windows, comm_buffer_bytes, communicators,
    gather_stage_slots, pipeline_lag, step_lag, step_order, streams)


class Deadlock(AssertionError):
    pass


class Mispaired(AssertionError):
    """A message arrives in a receive posted for another one (NCCL: corrupt KV, or a hang on sizes)."""


# -- the simulator ----------------------------------------------------------------------------------

@dataclass(frozen=True)
class Timing:
    """Durations in layer times: a rank's layer (``layer``), the share of it its attention takes,
    a message's transfer per flow, and a copy (staging, landing, the chain's scatter)."""

    attn: float = 0.6
    layer: tuple[float, ...] | float = 1.0
    chain: tuple[float, ...] | float = 0.05   # per sender, or one for all
    shards: tuple[float, ...] | float = 0.02
    gather: tuple[float, ...] | float = 0.1
    copy: float = 0.01

    def of(self, rank: int) -> tuple[float, float]:
        layer = self.layer if isinstance(self.layer, float) else self.layer[rank]
        attn = self.attn if isinstance(self.attn, float) else self.attn[rank]
        return attn * layer, (1 - attn) * layer

    def xfer(self, flow: str, sender: int) -> float:
        x = getattr(self, flow)
        return x if isinstance(x, float) else x[sender]

    def hops(self, n: int) -> list[float]:
        """The chain's hop k -> k+1 in layers: the transfer, the scatter, then k+1's attention."""
        return [self.xfer(CHAIN, k) + self.copy + self.of(k + 1)[0] for k in range(n - 1)]


def new_comms(rank: int, flow: str, kind: str, peer: int):
    """tp_order's communicators: the chain's pair, one group per other flow."""
    if flow == CHAIN:
        return (CHAIN, min(rank, peer), max(rank, peer))
    return {SHARDS: (SHARD_GROUP,), GATHER: (GATHER_GROUP,)}[flow]


class Sim:
    def __init__(self):
        self.rank, self.stream, self.dur, self.deps, self.p2p, self.label = [], [], [], [], [], []
        self.host = defaultdict(list)       # rank -> its commands in issue order
        self.last = {}                      # (rank, stream) -> its last command so far
        self.streams = defaultdict(list)    # rank -> its streams in creation order

    def add(self, rank, stream, dur=0.0, deps=(), p2p=(), label=None) -> int:
        cid = len(self.rank)
        if stream not in self.streams[rank]:
            self.streams[rank].append(stream)
        self.rank.append(rank)
        self.stream.append(stream)
        self.dur.append(dur)
        self.deps.append([d for d in deps if d is not None])
        self.p2p.append(list(p2p))
        self.label.append(label)
        self.host[rank].append(cid)
        self.last[rank, stream] = cid
        return cid


class Use:
    """A buffer's life: written from the start of ``first``, read until the end of the last of ``last``."""

    def __init__(self, flow, kind, slot, first, nbytes):
        self.flow, self.kind, self.slot, self.first, self.last, self.bytes = flow, kind, slot, first, [], nbytes


@dataclass
class Result:
    start: dict
    done: dict
    sim: Sim
    computes: list    # per rank: [(attention cmd, rest cmd)] by layer
    uses: list        # per rank: its buffers' Uses

    def forward_end(self, rank: int) -> float:
        return self.done[self.computes[rank][-1][1]]

    def step_end(self) -> float:
        return max(self.done.values())

    def span(self, use: Use) -> tuple[float, float]:
        return self.start[use.first], max(self.done[c] for c in use.last)


def simulate(orders, *, timing=Timing(), comm_of=new_comms, queues=None, sizes=None) -> Result:
    """Run one step of every rank's order (``orders[rank]``: a TPStepOrder). ``sizes(rank, flow, p2p)``:
    a message's bytes, with kind STAGE: the staged tensor's (for the buffers' accounting). Raises
    Deadlock when some command never starts."""
    sim = Sim()
    computes, uses = [], []
    for rank, order in enumerate(orders):
        c, u = _host_program(sim, rank, order, timing, comm_of, sizes or (lambda *a: 0))
        computes.append(c), uses.append(u)
    start, done = _solve(sim, queues)
    return Result(start, done, sim, computes, uses)


def _host_program(sim: Sim, rank, order: TPStepOrder, timing: Timing, comm_of, sizes):
    refs: dict = {}          # Ref -> its command (a BATCH's: its NCCL command)
    staged: dict = {}        # (flow, layer) -> the Use of its stage slot
    received: dict = {}      # a BATCH's NCCL command -> the Use of its receive slot
    chain_recv: dict = {}    # layer -> the Use of the chain's receive buffer
    uses: list = []
    attn, rest = timing.of(rank)
    computes = []

    def resolve(waits):
        for ref in waits:
            # CUDA waits for an event's latest record: a wait issued before the record waits for nothing
            assert ref in refs, f"rank {rank} waits for {ref} before issuing it"
        return [refs[ref] for ref in waits]

    def use(flow, kind, slot, first, nbytes):
        u = Use(flow, kind, slot, first, nbytes)
        uses.append(u)
        return u

    def issue(op: Op):
        if op.flow == CHAIN and op.kind in (POST_RECV, WAIT_RECV, SEND):
            return chain_op(op)
        if op.kind == FORK:
            refs[Ref(op.flow, FORK, -1)] = sim.add(rank, op.stream, deps=[sim.last.get((rank, COMPUTE))])
        elif op.kind in (STAGE, LAND):
            waits = resolve(op.waits)
            cid = refs[Ref(op.flow, op.kind, op.index)] = sim.add(rank, op.stream, timing.copy, waits,
                                                                   label=(op.kind, op.flow, op.index))
            if op.kind == STAGE and op.slot is not None:
                staged[op.flow, op.index] = use(op.flow, STAGE, op.slot, cid, 0)
            for batch in waits if op.kind == LAND else ():   # the receive slots it lands are read until it ends
                if batch in received:
                    received[batch].last.append(cid)
        elif op.kind == BATCH:
            marker = sim.add(rank, op.stream, deps=resolve(op.waits))
            comms = {comm_of(rank, op.flow, p.kind, p.peer) for p in op.p2p}
            assert len(comms) == 1, f"a batch spans communicators {comms}"
            comm = comms.pop()
            msgs = [(p.kind, comm, p.peer, (op.flow, p.layer), timing.xfer(op.flow, rank)) for p in op.p2p]
            cid = refs[Ref(op.flow, BATCH, op.index)] = sim.add(rank, f"nccl:{comm}", deps=[marker], p2p=msgs,
                                                                 label=(BATCH, op.flow, op.index))
            for p in op.p2p:
                if p.kind == SEND and (op.flow, p.layer) in staged:   # read until the batch ends
                    u = staged[op.flow, p.layer]
                    u.last.append(cid)
                    u.bytes = max(u.bytes, sizes(rank, op.flow, p._replace(kind=STAGE)))
            recvs = [p for p in op.p2p if p.kind == RECV]
            if recvs:
                received[cid] = use(op.flow, RECV, op.slot, cid, sum(sizes(rank, op.flow, p) for p in recvs))
        elif op.kind == JOIN:
            sim.add(rank, COMPUTE, deps=resolve(op.waits), label=(JOIN, op.flow))
        else:
            raise AssertionError(f"unknown op {op}")

    def chain_op(op: Op):
        layer = op.index
        if op.kind == POST_RECV:
            comm = comm_of(rank, CHAIN, RECV, rank - 1)
            cid = refs[Ref(CHAIN, POST_RECV, layer)] = sim.add(
                rank, f"nccl:{comm}", deps=[sim.last.get((rank, COMPUTE))],
                p2p=[(RECV, comm, rank - 1, (CHAIN, layer), 0.0)], label=(POST_RECV, layer))
            chain_recv[layer] = use(CHAIN, RECV, None, cid, sizes(rank, CHAIN, P2P(RECV, rank - 1, layer, 0)))
        elif op.kind == WAIT_RECV:
            cid = sim.add(rank, COMPUTE, timing.copy, [refs[Ref(CHAIN, POST_RECV, layer)]])
            chain_recv.pop(layer).last.append(cid)
        else:
            stage = sim.add(rank, COMPUTE, timing.copy, resolve(op.waits))
            comm = comm_of(rank, CHAIN, SEND, rank + 1)
            cid = refs[Ref(CHAIN, SEND, layer)] = sim.add(
                rank, f"nccl:{comm}", deps=[stage], p2p=[(SEND, comm, rank + 1, (CHAIN, layer), timing.xfer(CHAIN, rank))],
                label=(SEND, layer))
            use(CHAIN, SEND, None, stage, sizes(rank, CHAIN, P2P(SEND, rank + 1, layer, 0))).last.append(cid)

    for op in order.start:
        issue(op)
    for layer, (entry, exit_) in enumerate(zip(order.entry, order.exit)):
        for op in entry:
            issue(op)
        a = sim.add(rank, COMPUTE, attn, label=("attn", layer))
        for op in exit_:
            issue(op)
        computes.append((a, sim.add(rank, COMPUTE, rest, label=("rest", layer))))
    for op in order.end:
        issue(op)
    assert not chain_recv, f"rank {rank} ends its step with chain receives outstanding: {sorted(chain_recv)}"
    return computes, uses


def _solve(sim: Sim, queues):
    """Start and end of every command (a max-plus system solved in topological order); Deadlock if some
    command can never start."""
    n_cmd = len(sim.rank)
    # start(c) >= done(stream predecessor), done(waits), start(queue predecessor)
    # done(c)  = start(c) + dur, or for a batch: max over its messages of max(start(c), start(peer)) + xfer
    preds = [[] for _ in range(2 * n_cmd)]   # node 2c: start of c, 2c+1: its end; entries (node, delay)
    for rank, cids in sim.host.items():
        prev_on, prev_q = {}, {}
        order = sim.streams[rank]
        q_of = {s: (order.index(s) % queues if queues else s) for s in order}
        for c in cids:
            s = sim.stream[c]
            if s in prev_on:
                preds[2 * c].append((2 * prev_on[s] + 1, 0.0))
            if q_of[s] in prev_q:
                preds[2 * c].append((2 * prev_q[q_of[s]], 0.0))
            prev_on[s], prev_q[q_of[s]] = c, c
            preds[2 * c] += [(2 * d + 1, 0.0) for d in sim.deps[c]]
            if not sim.p2p[c]:
                preds[2 * c + 1].append((2 * c, sim.dur[c]))
    # pair the messages: per communicator and (src, dst), in issue order
    sends, recvs = defaultdict(list), defaultdict(list)
    for rank, cids in sim.host.items():
        for c in cids:
            for kind, comm, peer, msg, xfer in sim.p2p[c]:
                if kind == SEND:
                    sends[comm, rank, peer].append((c, msg, xfer))
                else:
                    recvs[comm, peer, rank].append((c, msg, xfer))
    never = 2 * n_cmd   # a node that never resolves: a message nobody matches
    preds.append([(never, 0.0)])
    for key in set(sends) | set(recvs):
        s, r = sends.get(key, []), recvs.get(key, [])
        for i in range(max(len(s), len(r))):
            if i >= len(s) or i >= len(r):
                c = (s[i] if i < len(s) else r[i])[0]
                preds[2 * c + 1].append((never, 0.0))
                continue
            (cs, ms, xfer), (cr, mr, _) = s[i], r[i]
            if ms != mr:
                raise Mispaired(f"{key}: {ms} arrives in the receive of {mr}")
            for a, b in ((cs, cr), (cr, cs)):
                preds[2 * a + 1] += [(2 * a, xfer), (2 * b, xfer)]
    for c in range(n_cmd):
        if sim.p2p[c] and not preds[2 * c + 1]:
            preds[2 * c + 1].append((2 * c, 0.0))
    value = _longest_paths(preds, never)
    start = {c: value[2 * c] for c in range(n_cmd) if value[2 * c] is not None}
    done = {c: value[2 * c + 1] for c in range(n_cmd) if value[2 * c + 1] is not None}
    if len(done) < n_cmd:
        stuck = {}
        for rank, cids in sim.host.items():
            for c in cids:
                if c not in start and (rank, sim.stream[c]) not in stuck:
                    stuck[rank, sim.stream[c]] = sim.label[c]
        raise Deadlock(f"commands that never start (rank, stream: first such command): {stuck}")
    return start, done


def _longest_paths(preds, never):
    succ = defaultdict(list)
    missing = [len(p) for p in preds]
    for v, ps in enumerate(preds):
        for u, w in ps:
            succ[u].append((v, w))
    value = [None] * len(preds)
    ready = [v for v in range(len(preds)) if missing[v] == 0 and v != never]
    best = [0.0] * len(preds)
    while ready:
        u = ready.pop()
        value[u] = best[u]
        for v, w in succ[u]:
            best[v] = max(best[v], value[u] + w)
            missing[v] -= 1
            if missing[v] == 0:
                ready.append(v)
    return value


# -- steps ------------------------------------------------------------------------------------------

def cut(c, m, n, bs, rng):
    """N segments of [c, c + m), inner bounds on blocks after c, none empty, the last >= 2 tokens (as
    Partitioner.split_step cuts them; the TP forward takes the last token)."""
    bounds = sorted(rng.sample(range(c // bs + 1, (c + m - 2) // bs + 1), n - 1))
    ends = [b * bs for b in bounds] + [c + m]
    return tuple(Segment(i, s, e) for i, (s, e) in enumerate(zip([c] + ends[:-1], ends)))


def make_step(n, chunks, bs=16, seed=0, scratch_blocks=10**6):
    """The TP step of ``chunks`` ((c, m): m tokens after c cached), each cut into N segments."""
    rng, reqs, free = random.Random(seed), [], 0
    for i, (c, m) in enumerate(chunks):
        need = -(-(c + m) // bs)
        reqs.append(RunaheadReq(f"r{i}", cut(c, m, n, bs, rng), tuple(range(free, free + need))))
        free += need
    step = tp_step(StepPlan(n, tuple(reqs), bs), scratch_blocks)
    assert len(step.requests) == len(chunks), step.not_ahead
    return step


def all_peers(step, total):
    return [Peers.of(step.traffic_for(k, total)) for k in range(step.n)]


def chain_only(peers):
    return [Peers(p.chain_recv, p.chain_send) for p in peers]


def orders_of(peers, layers, lag, windows=Windows()):
    return [step_order(k, p, layers, lag, windows) for k, p in enumerate(peers)]


def cold(n, total=8):
    return all_peers(make_step(n, [(0, 64 * n)]), total)


def cached(n, total=8):
    return all_peers(make_step(n, [(100, 64 * n), (0, 48 * n)]), total)


# -- the orders one might write instead -------------------------------------------------------------

def legacy_order(rank, peers: Peers, layers, ahead=2) -> TPStepOrder:
    """The order ``GuestConnector`` issues today, every message an unbatched isend/irecv from vLLM's
    stream: the chain as ``ring_order``; every shard receive of every layer posted when the step
    starts; a layer's shard sends at its exit; the gather sent and received ``ahead`` layers ahead,
    the next layer's posted when a layer lands (at the exit of the layer before it)."""
    L = layers
    start, end = [], []
    entry, exit_ = [[] for _ in range(L)], [[] for _ in range(L)]
    chain = chain_order(ChainRole(L, recv=peers.chain_recv, send=peers.chain_send))
    start += [Op(op.kind, CHAIN, op.layer) for op in chain.start]
    for layer in range(L):
        entry[layer] += [Op(op.kind, CHAIN, op.layer) for op in chain.entry[layer]]
        exit_[layer] += [Op(SEND, CHAIN, op.layer, waits=(Ref(CHAIN, SEND, op.layer - 2),) if op.layer >= 2 else ())
                         for op in chain.exit[layer]]

    def single(flow, kind, peer, layer):
        return Op(BATCH, flow, (kind, layer, peer), COMPUTE, p2p=(P2P(kind, peer, layer, None),))

    shard_recvs = [single(SHARDS, RECV, src, layer) for layer in range(L) for src in peers.shard_recv]
    start += shard_recvs
    sends = []
    for layer in range(L):
        for dst in peers.shard_send:
            exit_[layer] += [Op(STAGE, SHARDS, ("s", layer, dst)), single(SHARDS, SEND, dst, layer)]
            sends.append(Ref(SHARDS, BATCH, (SEND, layer, dst)))

    def post_gather(ops, layer):
        for dst in peers.gather_send:
            ops += [Op(STAGE, GATHER, ("s", layer, dst)), single(GATHER, SEND, dst, layer)]
        ops += [single(GATHER, RECV, src, layer) for src in peers.gather_recv]

    def land(ops, layer):
        ops.append(Op(LAND, GATHER, layer, waits=tuple(Ref(GATHER, BATCH, (RECV, layer, src))
                                                       for src in peers.gather_recv)))
        if layer + ahead < L:
            post_gather(ops, layer + ahead)

    if peers.prefix:
        for layer in range(min(ahead, L)):
            post_gather(start, layer)
        land(start, 0)
        for layer in range(1, L):
            land(exit_[layer - 1], layer)
    if shard_recvs:
        end.append(Op(LAND, SHARDS, -1, waits=tuple(Ref(SHARDS, BATCH, op.index) for op in shard_recvs)))
    gather_sends = [Ref(GATHER, BATCH, (SEND, layer, dst)) for layer in range(L) for dst in peers.gather_send]
    for flow, refs in ((SHARDS, sends), (GATHER, gather_sends)):
        if refs:
            end.append(Op(JOIN, flow, -1, waits=tuple(refs)))
    if peers.chain_send:
        end.append(Op(JOIN, CHAIN, -1, waits=tuple(Ref(CHAIN, SEND, x) for x in range(max(0, L - 2), L))))
    return TPStepOrder(tuple(start), tuple(map(tuple, entry)), tuple(map(tuple, exit_)), tuple(end))


def legacy_comms(directional=True):
    """Today's communicators: the chain's pairs; one group per pair for the shards; one per direction of
    a pair for the gather (``directional=False``: one per pair)."""
    def comm_of(rank, flow, kind, peer):
        if flow == GATHER and directional:   # (sender, receiver)
            return (GATHER, rank, peer) if kind == SEND else (GATHER, peer, rank)
        return (flow, min(rank, peer), max(rank, peer))
    return comm_of


def one_group(rank, flow, kind, peer):
    return ("world",)


def compute_idle(result: Result, rank: int) -> float:
    """Layer times rank's compute stream waited before its forward ended."""
    sim, end = result.sim, result.computes[rank][-1][1]
    busy = sum(sim.dur[c] for c in sim.host[rank] if sim.stream[c] == COMPUTE and c <= end)
    return result.done[end] - busy


LLAMA3_8B = CostModel()             # the cost model's defaults are a Llama-3-8B layer on an H200
KV_BYTES = 2 * 8 * 128 * 2          # Llama-3-8B: K and V, 8 KV heads of 128, bf16, per token and layer
NVLINK = 450e9                      # bytes/s into one H100 or H200 (NVLink 4)


def llama_timing(n, c, m, cost=LLAMA3_8B, bs=16):
    """A chunk of m tokens after c cached on Llama-3-8B, split as the partitioner balances it: every
    duration in layer times of rank 0, each rank's attention share, the chain's [c, e_k), the shards
    and the gather (every other rank's KV heads of [0, c) into one rank, over NVLink). Returns (step, timing)."""
    from vllm_kvrunahead.core.partition import Chunk, align_bounds, balanced_step_bounds

    chunk = Chunk(c, c + m, c + m)
    segs = align_bounds(chunk, balanced_step_bounds([chunk], n, cost)[0], bs)
    step = tp_step(StepPlan(n, (RunaheadReq("r", segs, tuple(range(-(-(c + m) // bs)))),), bs), 10**7)
    segs = step.requests[0].segments
    attn = [cost.attn * s.length * (s.start + s.length / 2) for s in segs]
    layer = [a + cost.linear * s.length for a, s in zip(attn, segs)]
    unit = layer[0]
    link = lambda tokens, share=1.0: tokens * KV_BYTES * share / NVLINK / unit  # noqa: E731
    timing = Timing(attn=tuple(a / t for a, t in zip(attn, layer)), layer=tuple(t / unit for t in layer),
                    chain=tuple(link(s.end - c) for s in segs), shards=tuple(link(s.length, 1 / n) for s in segs),
                    gather=link(c, (n - 1) / n), copy=link(c, 1 / n) * NVLINK / 3e12)
    return step, timing


def heads_cases(n):
    """KV head counts for N ranks: a share per rank, and fewer KV heads than ranks (vLLM replicates them)."""
    divisible = [2 * n] if n in (3, 5, 7) else [8 if 8 % n == 0 else 2 * n]
    replicated = [t for t in (4, 2, 3, 1) if t < n and n % t == 0][:1]
    return divisible + replicated


def steps_of(n, total):
    """Steps of one cold chunk, of several cold chunks, and of several chunks some after cached tokens."""
    return {"cold": all_peers(make_step(n, [(0, 40 * n)]), total),
            "cold chunks": all_peers(make_step(n, [(0, 40 * n), (0, 24 * n), (0, 32 * n)], seed=1), total),
            "after cached": all_peers(make_step(n, [(100, 40 * n), (0, 24 * n), (37, 32 * n)], seed=2), total)}


def staircase(n):
    return tuple(range(n))


# -- every step completes ---------------------------------------------------------------------------

@pytest.mark.parametrize("n", range(2, 9))
def test_every_step_completes(n):
    """N = 2..8; KV heads split over the ranks or replicated; one or several chunks, cold or after
    cached tokens; 1-5 layers (8 up to N = 4); the lag zero, derived from the pipeline, or one layer
    per rank; every window 1 or the defaults; every stream on a hardware queue of its own, or all of
    a rank's streams on one (CUDA_DEVICE_MAX_CONNECTIONS=1, the worst sharing): every rank's step
    completes, every layer's compute runs, and every receive is landed."""
    timing = Timing(attn=0.6)
    cases = [((0,) * n, Windows(), None), (pipeline_lag(timing.hops(n)), Windows(), None),
             (pipeline_lag(timing.hops(n)), Windows(), 1), (staircase(n), Windows(1, 1, 1, 1, 1), None),
             (pipeline_lag(timing.hops(n)), Windows(1, 1, 1, 1, 1), 1)]
    for total in heads_cases(n):
        for name, peers in steps_of(n, total).items():
            for layers in (1, 2, 3, 5) + ((8,) if n <= 4 else ()):
                for lag, windows, queues in cases:
                    result = simulate(orders_of(peers, layers, lag, windows), timing=timing, queues=queues)
                    assert len(result.done) == len(result.sim.rank), (total, name, layers, lag)
                    for rank, order in enumerate(orders_of(peers, layers, lag, windows)):
                        landed = {op.index for op in order.ops() if op.kind == LAND and op.flow == SHARDS}
                        rounds = {op.index for op in order.ops() if op.kind == BATCH and op.flow == SHARDS
                                  and any(p.kind == RECV for p in op.p2p)}
                        assert landed == rounds, (rank, name)
                        assert sum(op.kind == LAND and op.flow == GATHER for op in order.ops()) == \
                            (layers if peers[rank].prefix else 0)


def test_peers_follow_the_traffic_rule():
    """Every rank sends each earlier rank its KV heads of its segment; the gather runs only after cached
    tokens, from the owner of each KV head to the ranks lacking it."""
    peers = steps_of(4, 8)
    assert [p.shard_send for p in peers["cold"]] == [(), (0,), (0, 1), (0, 1, 2)]
    assert [p.shard_recv for p in peers["cold"]] == [(1, 2, 3), (2, 3), (3,), ()]
    assert not any(p.prefix or p.gather_send or p.gather_recv for p in peers["cold chunks"])
    assert [p.gather_send for p in peers["after cached"]] == [(1, 2, 3), (0, 2, 3), (0, 1, 3), (0, 1, 2)]
    replicated = steps_of(4, 2)["after cached"]   # KV head 0 on ranks 0-1, head 1 on ranks 2-3
    assert [p.gather_send for p in replicated] == [(2, 3), (), (0, 1), ()]
    assert [p.gather_recv for p in replicated] == [(2,), (2,), (0,), (0,)]
    assert [(p.chain_recv, p.chain_send) for p in replicated] == [(False, True), (True, True), (True, True),
                                                                  (True, False)]


def test_order_of_a_middle_rank():
    """Rank 1 of 4 after cached tokens, lag (0, 1, 1, 2), 5 layers: the chain as ring_order issues it;
    its shards staged at each exit and sent in round layer + 1, with rank 2's layer of that round
    (round l + 1) and rank 3's (round l + 2), each round's receives landed two rounds later; the
    gather's layer l landed at the exit of layer l-1, its round posted 3 of its layers ahead."""
    lag, peers = (0, 1, 1, 2), steps_of(4, 8)["after cached"][1]
    order = step_order(1, peers, 5, lag)
    kinds = lambda ops: [(op.kind, op.flow, op.index) for op in ops]  # noqa: E731
    assert kinds(order.entry[0]) == [("post_recv", CHAIN, 1), ("wait_recv", CHAIN, 0)]
    assert kinds(order.exit[0]) == [("send", CHAIN, 0), (STAGE, SHARDS, 0), (BATCH, SHARDS, 1), (LAND, GATHER, 1),
                                    (STAGE, GATHER, 4), (BATCH, GATHER, 4)]
    assert kinds(order.exit[2]) == [("send", CHAIN, 2), (STAGE, SHARDS, 2), (LAND, SHARDS, 1), (BATCH, SHARDS, 3),
                                    (LAND, GATHER, 3), (BATCH, GATHER, 6)]
    shards = order.exit[1][2]
    assert shards.stream == SHARD_STREAM and shards.waits == (Ref(SHARDS, STAGE, 1),)
    assert shards.p2p == (P2P(RECV, 2, 1, 0), P2P(RECV, 3, 0, 0), P2P(SEND, 0, 1, 1))
    assert order.exit[2][1].waits == (Ref(SHARDS, BATCH, 1),)      # stage slot 0 again: after round 1
    gather = order.exit[0][5]
    assert gather.stream == GATHER_STREAM and gather.waits == (Ref(GATHER, LAND, 1),)   # receive slot 1 again
    # layer 3 from every rank; my layer 4 to rank 0 (lag 0), 3 to rank 2 (lag 1), 2 to rank 3 (lag 2)
    assert [(p.kind, p.peer, p.layer) for p in gather.p2p] == [
        (RECV, 0, 3), (RECV, 2, 3), (RECV, 3, 3), (SEND, 0, 4), (SEND, 2, 3), (SEND, 3, 2)]
    assert gather_stage_slots(peers, lag) == 3   # a layer goes out in rounds l .. l + 2
    assert order.exit[0][4].waits == (Ref(GATHER, BATCH, 3),)       # layer 4 in layer 1's slot: after round 3
    assert kinds(order.end)[-3:] == [(JOIN, CHAIN, -1), (JOIN, SHARDS, -1), (JOIN, GATHER, -1)]


def test_lag_must_start_at_zero_and_grow_by_at_most_one_a_rank():
    peers = steps_of(4, 8)["after cached"][0]
    for lag in ((1, 1, 2, 2), (0, 2, 1, 2), (0, 2, 2, 2)):
        with pytest.raises(ValueError):
            step_order(0, peers, 3, lag)
    with pytest.raises(ValueError):
        pipeline_lag([1.5], max_hop=1.5)
    with pytest.raises(ValueError):
        Windows(gather_recv=0)


def test_pipeline_lag():
    assert pipeline_lag([]) == (0,)
    assert pipeline_lag([0.45] * 3) == (0, 0, 1, 1)       # 0.45, 0.9, 1.35 rounded
    assert pipeline_lag([0.8] * 7) == (0, 1, 2, 2, 3, 4, 5, 6)
    assert pipeline_lag([3.0, 0.1]) == (0, 1, 1)          # a hop adds a layer at most
    lags = [step_lag(LLAMA3_8B, [r.segments for r in llama_timing(8, c, 16384)[0].requests]) for c in (0, 16384, 114688)]
    assert lags[0] < lags[1] < lags[2] == (0, 1, 2, 2, 3, 4, 5, 6)   # longer prefixes: longer attention, more lag


# -- communicators and streams ----------------------------------------------------------------------

def used(result: Result, rank: int) -> set:
    return {s for s in result.sim.streams[rank] if s.startswith("nccl:")}


@pytest.mark.parametrize("n", [2, 4, 6, 8])
def test_every_round_is_one_group_across_the_ranks(n):
    """Each message is sent and received in the same round of its flow, on both sides: a round is one
    NCCL group across the ranks, so the order NCCL gives the operations inside a batch cannot matter,
    and a pair's messages on a group pair up in the order both sides post them."""
    for total in heads_cases(n):
        peers = steps_of(n, total)["after cached"]
        for lag in ((0,) * n, pipeline_lag(Timing(attn=0.7).hops(n)), staircase(n)):
            posted = {}
            for rank, order in enumerate(orders_of(peers, 5, lag)):
                for op in order.ops():
                    for p in op.p2p:
                        src, dst = (rank, p.peer) if p.kind == SEND else (p.peer, rank)
                        key = (op.flow, src, dst, p.layer)
                        posted.setdefault(key, {})[p.kind] = op.index
            assert posted and all(set(r) == {SEND, RECV} and r[SEND] == r[RECV] for r in posted.values())
            for flow, src, dst in {k[:3] for k in posted}:
                rounds = [posted[flow, src, dst, layer][SEND] for layer in range(5)]
                assert rounds == sorted(rounds)


@pytest.mark.parametrize("n", [2, 3, 4, 8])
def test_communicators_per_rank_are_constant_in_n(n):
    """Four communicators per rank at any N (the chain's two neighbours, the shards' group, the gather's),
    against 3N - 1 today (the chain's two, a group per pair for the shards, one per direction of a pair
    for the gather: 11 at N=4, 23 at N=8); and seven streams, within the 8 hardware queues CUDA gives
    by default."""
    total = 8 if 8 % n == 0 else 2 * n
    peers = steps_of(n, total)["after cached"]
    timing = Timing()
    new = simulate(orders_of(peers, 3, pipeline_lag(timing.hops(n))), timing=timing)
    old = simulate([legacy_order(k, p, 3) for k, p in enumerate(peers)], timing=timing, comm_of=legacy_comms())
    for rank in range(n):
        assert used(new, rank) == {f"nccl:{c}" for c in communicators(rank, n)}
        assert len(communicators(rank, n)) == 3 + (0 < rank < n - 1)   # the ends have one chain neighbour
        assert len(used(old, rank)) == (1 + (0 < rank < n - 1)) + (n - 1) + 2 * (n - 1)
        assert len(streams(rank, n)) <= 7
    assert max(len(communicators(r, 64)) for r in range(64)) == 4


# -- the orders one might write instead -------------------------------------------------------------

@pytest.mark.parametrize("n", [2, 4, 8])
def test_all_flows_on_one_group_without_batches_fails(n):
    """Today's order with every message on one group, unbatched: a cold chunk deadlocks (rank 0's
    receive of rank 1's shard of layer 0, posted when the step starts, holds its chain send of layer 0,
    for which rank 1 waits before computing that shard); after cached tokens messages of different
    flows pair up (a gather layer arrives in a receive posted for a shard), or it deadlocks."""
    with pytest.raises(Deadlock):
        simulate([legacy_order(k, p, 3) for k, p in enumerate(steps_of(n, 8)["cold"])], comm_of=one_group)
    with pytest.raises((Deadlock, Mispaired)):
        simulate([legacy_order(k, p, 3) for k, p in enumerate(steps_of(n, 8)["after cached"])], comm_of=one_group)


@pytest.mark.parametrize("n", [2, 4, 8])
def test_per_layer_sends_before_receives_on_one_pair_group_deadlock(n):
    """The gather on one group per pair (not one per direction), each layer's sends posted before its
    receives: both ranks of every pair wait in their first send for the other's receive, queued behind
    that one's send. tp_order's gather puts a pair's two messages of a round in one batch on one group:
    it completes."""
    peers = steps_of(n, 8)["after cached"]
    with pytest.raises(Deadlock):
        simulate([legacy_order(k, p, 3) for k, p in enumerate(peers)], comm_of=legacy_comms(directional=False))
    simulate([legacy_order(k, p, 3) for k, p in enumerate(peers)], comm_of=legacy_comms())
    simulate(orders_of(peers, 3, (0,) * n))


def test_todays_communicators_deadlock_when_their_streams_share_hardware_queues():
    """R3: today's 3N - 1 NCCL streams and vLLM's (12 per rank at N=4 after cached tokens) under the
    default 8 hardware queues: a receive held at a queue's head (its stream busy with an earlier one) holds a
    send another rank waits for; the step deadlocks. tp_order's streams complete under any sharing,
    down to one queue per rank (at some cost: the shards then keep rank 0 waiting a few tenths of a layer)."""
    peers = steps_of(4, 8)["after cached"]
    with pytest.raises(Deadlock):
        simulate([legacy_order(k, p, 5) for k, p in enumerate(peers)], comm_of=legacy_comms(), queues=8)
    lag = pipeline_lag(Timing().hops(4))
    for queues in range(1, 9):
        simulate(orders_of(peers, 5, lag), queues=queues)


LENGTHS = [(4, 114688), (8, 16384), (8, 49152), (8, 114688)]


@pytest.mark.parametrize("n, c", LENGTHS)
def test_gather_two_layers_ahead_stalls_rank_0_and_the_step(n, c):
    """A 16k chunk after c cached tokens on Llama-3-8B (32 layers; durations from the cost model, the
    partitioner's split, NVLink transfers), against the chain alone (no shards, no gather):

        N, c       today's order: rank 0 waits / step longer (x)   tp_order: step longer   no lag: step longer
        4, 112k    5.9 / 3.4 layer times (1.09x)                  0.22                    3.2
        8, 16k     14.6 / 14.5 (1.41x)                            0.11                    14.4
        8, 48k     29.0 / 26.3 (1.66x)                            0.21                    26.0
        8, 112k    39.7 / 35.0 (1.81x)                            0.28                    34.6

    Today rank j sends the prefix of layer l at its own exit of layer l-3 and rank 0 lands it at its exit
    of l-1, so rank 0 runs no more than 2 layers ahead of the last rank, while the chain's pipeline puts
    the last rank (N-1) x (an attention and a transfer) behind. tp_order posts each rank's receive
    rounds by its own lag: the step ends when the chain's does, plus the last layer's shards landing.
    Without the lag (every rank in every round at once) it is as slow as today's."""
    step, timing = llama_timing(n, c, 16384)
    peers = all_peers(step, 8)
    lag = step_lag(LLAMA3_8B, [r.segments for r in step.requests])
    base = simulate(orders_of(chain_only(peers), 32, lag), timing=timing)
    new = simulate(orders_of(peers, 32, lag), timing=timing)
    old = simulate([legacy_order(k, p, 32) for k, p in enumerate(peers)], timing=timing, comm_of=legacy_comms())
    waits = compute_idle(old, 0) - compute_idle(base, 0)
    longer = old.step_end() - base.step_end()
    want = {(4, 114688): 5.9, (8, 16384): 14.6, (8, 49152): 29.0, (8, 114688): 39.7}[n, c]
    assert waits == pytest.approx(want, abs=0.1)
    assert longer > 3
    assert new.step_end() - base.step_end() < 0.35


def test_the_lead_comes_from_the_lag():
    """N=8, every rank's layer alike, attention 0.8 of it: with no lag (every rank in step in every
    round) rank 0 waits for the last rank's landings, 42 layer times over 32 layers; with the
    pipeline's lag only the first layer's prefix transfer (0.1), and within 0.5 of that with the lag
    one layer off in either direction."""
    n, timing = 8, Timing(attn=0.8)
    peers = steps_of(n, 8)["after cached"]
    base = simulate(orders_of(chain_only(peers), 32, (0,) * n), timing=timing)
    lag = pipeline_lag(timing.hops(n))
    waited = lambda lag: compute_idle(simulate(orders_of(peers, 32, lag), timing=timing), 0) - compute_idle(base, 0)  # noqa: E731
    assert waited((0,) * n) > 40
    assert waited(lag) == pytest.approx(timing.gather + timing.copy, abs=0.01)
    assert lag == (0, 1, 2, 3, 3, 4, 5, 6)
    for wrong in ((0, 0, 1, 2, 2, 3, 4, 5), staircase(n)):   # a layer less or more for the later ranks
        assert waited(wrong) < 0.6


# -- the buffers ------------------------------------------------------------------------------------

def message_sizes(step, total, bs, head_bytes):
    """``sizes(rank, flow, p2p)`` of a step's messages from ``tp_layout``'s traffic (one layer's bytes;
    a STAGE p2p: the tensor the flow stages: the shards, a segment's KV heads of every earlier rank;
    the gather, the rank's own KV heads of the prefix)."""
    n = step.n
    traffic = [step.traffic_for(k, total) for k in range(n)]
    heads = [kv_heads_of(k, n, total) for k in range(n)]
    width = lambda k: heads[k][1] - heads[k][0]  # noqa: E731
    block = bs * head_bytes   # one block of one layer, one KV head

    def sizes(rank, flow, p):
        t = traffic[rank]
        if flow == CHAIN:
            return len(t.send if p.kind == SEND else t.recv) * block * total
        if flow == SHARDS:
            if p.kind == STAGE:   # one tensor for every earlier rank: KV heads [0, end of rank - 1's)
                return len(t.shard_send[0][1]) * block * heads[rank - 1][1]
            ids = dict(t.shard_send if p.kind == SEND else t.shard_recv)[p.peer]
            return len(ids) * block * width(p.peer if p.kind == SEND else rank)
        if p.kind == STAGE:
            return len(t.own_src) * block * width(rank)
        ids = dict(t.gather_send if p.kind == SEND else t.gather_recv)[p.peer]
        return len(ids) * block * width(rank if p.kind == SEND else p.peer)
    return sizes


def peak_bytes(result: Result, rank: int, flows=(CHAIN, SHARDS, GATHER)) -> int:
    events = []
    for u in result.uses[rank]:
        if u.flow in flows:
            a, b = result.span(u)
            events += [(a, 1, u.bytes), (b, 0, -u.bytes)]   # at one time, ends before starts
    live = peak = 0
    for _, _, d in sorted(events):
        live += d
        peak = max(peak, live)
    return peak


def random_step(n, rng, bs, budget, scratch_blocks):
    """1-3 chunks within the step budget, each cold, after a random prefix or after the longest prefix
    the guest's scratch leaves room for (tp_step's rule: a chunk takes the scratch of [0, c + m - 1))."""
    chunks, left, room = [], budget, scratch_blocks * bs
    for _ in range(rng.randint(1, 3)):
        m = rng.randint(n * bs + 2, max(n * bs + 2, budget // 2))
        if m > left or m + bs > room:
            break
        c = rng.choice([0, rng.randint(1, room - m - bs), room - m - bs])
        chunks.append((c, m))
        left, room = left - m, room - (-(-(c + m - 1) // bs)) * bs
    return make_step(n, chunks, bs, seed=rng.randint(0, 10**6), scratch_blocks=scratch_blocks)


@pytest.mark.parametrize("n", [2, 3, 4, 8])
def test_buffers_are_reused_in_turn_and_stay_within_the_bound(n):
    """Random steps (1-3 chunks within the step budget, cold or after up to max_model_len cached tokens,
    random nondecreasing lags, KV heads split or replicated): no stage or receive slot is refilled
    before its last reader has finished, and the comm buffers live at once on each rank, by flow and in
    all, never exceed ``comm_buffer_bytes``, which ``GuestHost.kv_bytes_left`` leaves out."""
    rng, bs, head_bytes, budget, max_model_len, layers = random.Random(n), 16, 2, 1024, 4096, 5
    scratch_blocks = -(-max(max_model_len, budget) // bs)
    for total in heads_cases(n):
        for trial in range(12):
            step = random_step(n, rng, bs, budget, scratch_blocks)
            lag = [0]
            for _ in range(n - 1):
                lag.append(min(len(lag), lag[-1] + rng.randint(0, 1)))   # at most one layer a hop
            windows = rng.choice([Windows(), Windows(1, 1, 1, 1, 1), Windows(2, 2, 3, 1, 2)])
            result = simulate(orders_of(all_peers(step, total), layers, tuple(lag), windows),
                              sizes=message_sizes(step, total, bs, head_bytes), queues=rng.choice([None, 1]))
            bound = comm_buffer_bytes(n=n, layers=layers, kv_bytes_per_token_layer=head_bytes * total,
                                      total_kv_heads=total, step_budget=budget, max_model_len=max_model_len,
                                      block_size=bs, max_chunks=3, windows=windows)
            for rank in range(n):
                slots = defaultdict(list)
                for u in result.uses[rank]:
                    if u.slot is not None:
                        slots[u.flow, u.kind, u.slot].append(result.span(u))
                for key, spans in slots.items():
                    spans.sort()
                    assert all(a[1] <= b[0] for a, b in zip(spans, spans[1:])), (rank, key, spans)
                assert peak_bytes(result, rank, (CHAIN,)) <= bound.chain
                assert peak_bytes(result, rank, (SHARDS,)) <= bound.shards
                assert peak_bytes(result, rank, (GATHER,)) <= bound.gather
                assert peak_bytes(result, rank) <= bound.total


@pytest.mark.parametrize("n", [2, 3, 4, 8])
def test_every_slot_the_order_names_is_one_of_the_arenas(n):
    """The executor takes each message's buffer from the arena by the order's slot number
    (``GuestConnector``): every STAGE's and BATCH's slot exists among ``comm_buffer_bytes``'s slots, for
    1 layer up, any lag, KV heads split or replicated. (A shard receive slot is a round's, layer + the
    sender's lag, so even a one-layer model uses every receive slot.)"""
    for total in heads_cases(n):
        for name, peers in steps_of(n, total).items():
            for layers in (1, 2, 3, 5):
                for lag in ((0,) * n, staircase(n), pipeline_lag(Timing().hops(n))):
                    for windows in (Windows(), Windows(1, 1, 1, 1, 1), Windows(2, 2, 3, 1, 2)):
                        slots = comm_buffer_bytes(n=n, layers=layers, kv_bytes_per_token_layer=4, total_kv_heads=total,
                                                  step_budget=256, max_model_len=256, block_size=16,
                                                  windows=windows).slots
                        for order in orders_of(peers, layers, lag, windows):
                            for op in order.ops():
                                if op.slot is None or op.kind not in (STAGE, BATCH):
                                    continue
                                name_ = {(SHARDS, STAGE): "shard_stage", (SHARDS, BATCH): "shard_recv",
                                         (GATHER, STAGE): "gather_stage", (GATHER, BATCH): "gather_recv"}[op.flow, op.kind]
                                assert 0 <= op.slot < slots[name_][0], (name, layers, lag, op)


def test_the_bound_is_reached_by_a_long_prefix():
    """The gather's share of the bound is what one chunk right before max_model_len fills: the bound is
    not loose where it counts."""
    n, total, bs, head_bytes, budget, max_model_len, layers = 8, 8, 16, 2, 1024, 4096, 8
    step = make_step(n, [(max_model_len - 256, 256)], bs, scratch_blocks=max_model_len // bs)
    result = simulate(orders_of(all_peers(step, total), layers, staircase(n)),
                      sizes=message_sizes(step, total, bs, head_bytes))
    bound = comm_buffer_bytes(n=n, layers=layers, kv_bytes_per_token_layer=head_bytes * total, total_kv_heads=total,
                              step_budget=budget, max_model_len=max_model_len, block_size=bs)
    assert max(peak_bytes(result, rank, (GATHER,)) for rank in range(n)) >= 0.9 * bound.gather


GIB = 2**30


def test_comm_buffer_bytes_of_llama3_8b():
    """Llama-3-8B (32 layers, 4 KiB of KV per token and layer, 8 KV heads), vLLM's 16k step budget,
    max_model_len 128k (a 112k prefix and its 16k chunk), blocks of 16, one chunk a step:

        GiB per rank   chain   shards   gather                 total
        N=4            0.25    0.125    1.25  (2 x 3/4 + 4 x 1/4)  1.63
        N=8            0.25    0.125    1.375 (2 x 7/8 + 8 x 1/8)  1.75

    in units of one layer of the scratch's 128k tokens (0.5 GiB): two receive slots of the KV heads a
    rank lacks, and stage slots of its own (one per layer of lag the last rank may have, plus one).
    Today's gather sends alone hold (N-1)/N of the prefix's KV, every layer: 10.5 GiB at N=4, 12.25 at
    N=8, with the shards' receives for every layer on top."""
    def bound(n, **kw):
        return comm_buffer_bytes(n=n, layers=32, kv_bytes_per_token_layer=KV_BYTES, total_kv_heads=8,
                                 step_budget=16384, max_model_len=131072, block_size=16, **kw)
    four, eight = bound(4), bound(8)
    assert four.chain == eight.chain == 4 * (16384 + 32) * KV_BYTES            # 2 receives + 2 sends
    assert four.shards / GIB == pytest.approx(0.125, abs=1e-3)
    assert four.gather / GIB == pytest.approx(1.25) and eight.gather / GIB == pytest.approx(1.375)
    assert four.total / GIB == pytest.approx(1.63, abs=0.01) and eight.total / GIB == pytest.approx(1.75, abs=0.01)
    assert bound(8, windows=Windows(gather_recv=1)).total / GIB == pytest.approx(1.31, abs=0.01)
    assert bound(2).gather / GIB == pytest.approx(1.0)
    assert eight.slots["gather_recv"] == (2, 7 * 2**26) and eight.slots["gather_stage"] == (8, 2**26)
    today = lambda n, c: (n - 1) / n * c * 32 * KV_BYTES / GIB  # noqa: E731
    assert today(4, 114688) == pytest.approx(10.5) and today(8, 114688) == pytest.approx(12.25)
