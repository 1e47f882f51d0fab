"""The order in which one TP-layout rank issues a step's point-to-point traffic (pure; no torch, no vLLM).

Three flows move KV per layer (``tp_layout.GuestTraffic``):
- the chain: rank k-1 -> k, [c, s_k) of the layer, waited for before the layer's attention;
- the shards: rank k -> every earlier rank j, j's KV heads of k's segment, needed only when the
  guest's forward ends;
- the prefix gather (chunks after c cached tokens): every owner of KV heads -> every rank lacking
  them, their KV of [0, c), needed in the scratch before the layer.

NCCL runs one communicator's operations in issue order on one stream per rank; a send completes
together with its receive; a batch (``batch_isend_irecv``, one NCCL group) starts as one and ends as
one; a stream's operation waits for the work issued on that stream before it, and a NCCL operation
also for the stream that was current when it was issued. So the issue order is part of the
protocol. ``step_order`` fixes it, with the communicators, the streams and the buffer slots, and
``tests/test_tp_order.py`` runs it for whole steps under those rules at N = 2..8 (and shows that the
orders one might write instead deadlock or stall rank 0).

Communicators: four per rank whatever N (``communicators``):
- the chain's two, as today: unbatched isend/irecv on vLLM's world group, for which torch makes one
  2-rank communicator per pair of neighbours (``ring_order``'s order, which its own test proves);
- SHARD_GROUP and GATHER_GROUP, one world-sized group each, driven by batches only (a batched
  operation uses the group's own communicator; an unbatched one would add a 2-rank communicator per
  pair, which is what this replaces).

Rounds. The shards and the gather each run as a sequence of rounds: round T of a flow is one batch
on every rank that has traffic in it, and every message of round T is sent and received in round T
on both sides (a round is one NCCL group across the ranks, so nothing depends on the order NCCL
gives the operations inside a group). A message of layer l belongs to round l + lag[r], where r is
the rank whose pace the message follows (the shards: the sender, whose KV is final at its exit of
layer l; the gather: the receiver, which lands layer l at its exit of layer l-1). ``lag[r]`` is the
layers by which rank r trails rank 0 in the chain's pipeline (``pipeline_lag``): with it every rank
reaches round T at about the same time, so no rank waits in a round for a rank that is behind it.

Streams: vLLM's (COMPUTE) and two side streams. A flow's batches are issued from its side stream
(SHARD_STREAM, GATHER_STREAM), which waits only for the events a batch needs (the staged KV, a free
receive slot), never for the compute issued so far. The shards land from SHARD_STREAM into the paged
blocks (read only after the step's JOIN); the gather lands on COMPUTE (it writes the scratch, which
the layers read), at the exit of the layer before, as today.

Buffers: fixed slots reused round after round (``Windows``); an op that refills a slot waits for the
one that last used it, so a rank's comm buffers are ``comm_buffer_bytes`` whatever the prompt length:
an arena allocated once, which the KV budget leaves out (nothing to allocate mid-step).
- shards: rank k stages, at its exit of layer l, its segment's KV heads of every earlier rank into
  stage slot l % shard_stage (COMPUTE; it waits for the round that sent the slot's previous layer),
  and receives into round slot T % shard_recv (landed before the slot's next round).
- gather: an owner stages its KV heads of [0, c) of layer l once (GATHER_STREAM: the paged prefix
  is final before the step) into stage slot l % stage_slots and sends that one tensor to every rank
  lacking them, each in its own round (``gather_stage_slots`` keeps it until the last); rank i
  receives layer l into slot l % gather_recv, posted gather_recv + 1 layers of its own ahead.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import NamedTuple, Sequence

from . import ring_order
from .ring_order import POST_RECV, SEND, WAIT_RECV, Role  # noqa: F401  (the chain's op kinds, for the executor)

CHAIN, SHARDS, GATHER = "chain", "shards", "gather"
COMPUTE, SHARD_STREAM, GATHER_STREAM = "compute", "shard_side", "gather_side"
SHARD_GROUP, GATHER_GROUP = "shard_group", "gather_group"

# Op kinds. The chain's are ring_order's (POST_RECV, WAIT_RECV, SEND; ChainComm executes them).
FORK = "fork"    # the side stream waits for COMPUTE (the step's start: the last step's writes are done)
STAGE = "stage"  # copy a message's KV into a send slot (then record the op's event)
BATCH = "batch"  # one batch_isend_irecv of the flow's group (its work is the op's event)
LAND = "land"    # copy received slots into their cache (then record the op's event)
JOIN = "join"    # COMPUTE waits for the flow's last work (the step's end)
RECV = "recv"    # a P2P's direction: SEND or RECV


class Ref(NamedTuple):
    """An earlier op of the same rank, by (flow, kind, index): a stream wait on it waits for its event
    (a BATCH's: its NCCL work; a chain SEND's or POST_RECV's: ChainComm's work of that layer)."""

    flow: str
    kind: str
    index: int


class P2P(NamedTuple):
    """One message of a batch: kind SEND or RECV, the peer rank, the layer, and the slot (a SEND's
    stage slot, a RECV's receive slot)."""

    kind: str
    peer: int
    layer: int
    slot: int


@dataclass(frozen=True)
class Op:
    """One operation. index: the layer (chain ops, STAGE, the gather's LAND) or the round (BATCH, the
    shards' LAND); -1 for FORK and JOIN. stream: the stream current when it is issued; waits: the
    events that stream waits for first."""

    kind: str
    flow: str
    index: int
    stream: str = COMPUTE
    slot: int | None = None
    p2p: tuple[P2P, ...] = ()
    waits: tuple[Ref, ...] = ()


@dataclass(frozen=True)
class TPStepOrder:
    """One rank's ops in issue order: at the step's start (``start_load_kv``), at each layer's attention
    entry (``wait_for_layer_load``), after each layer's attention (``save_kv_layer``) and at the step's
    end (``wait_for_save``)."""

    start: tuple[Op, ...]
    entry: tuple[tuple[Op, ...], ...]
    exit: tuple[tuple[Op, ...], ...]
    end: tuple[Op, ...]

    def ops(self):
        yield from self.start
        for entry, exit_ in zip(self.entry, self.exit):
            yield from entry
            yield from exit_
        yield from self.end


@dataclass(frozen=True)
class Windows:
    """Buffer slots per rank. The chain's are ChainComm's (``max_sends``, ``MAX_RECVS``)."""

    chain_sends: int = 2
    chain_recvs: int = 2
    shard_stage: int = 2   # layers of staged shards in flight: 2 lets a round complete a layer late
    shard_recv: int = 2    # rounds of shard receive slots: one being filled, one being landed
    gather_recv: int = 2   # layers of prefix receives posted ahead of their landing

    def __post_init__(self):
        for name in ("chain_sends", "chain_recvs", "shard_stage", "shard_recv", "gather_recv"):
            if getattr(self, name) < 1:
                raise ValueError(f"Windows.{name} must be >= 1, got {getattr(self, name)}")


@dataclass(frozen=True)
class Peers:
    """Whom one rank exchanges each flow's messages with in a step (every message is per layer)."""

    chain_recv: bool = False
    chain_send: bool = False
    shard_send: tuple[int, ...] = ()    # earlier ranks: their KV heads of my segment
    shard_recv: tuple[int, ...] = ()    # later ranks: my KV heads of their segments
    prefix: bool = False                # some chunk runs after cached tokens: the gather lands every layer
    gather_send: tuple[int, ...] = ()   # ranks lacking my KV heads of the prefix
    gather_recv: tuple[int, ...] = ()   # owners of the KV heads I lack

    @classmethod
    def of(cls, traffic) -> "Peers":
        """A ``tp_layout.GuestTraffic``'s non-empty messages (both sides of a message see the same)."""
        peers = lambda pairs: tuple(p for p, ids in pairs if len(ids))  # noqa: E731
        return cls(bool(len(traffic.recv)), bool(len(traffic.send)), peers(traffic.shard_send),
                   peers(traffic.shard_recv), bool(len(traffic.own_src)), peers(traffic.gather_send),
                   peers(traffic.gather_recv))


# -- the pipeline's lag ------------------------------------------------------------------------------

MAX_HOP = 1.0  # layers one chain hop may add to the lag: a hop is an attention and a transfer, < a layer


def pipeline_lag(hops: Sequence[float], max_hop: float = MAX_HOP) -> tuple[int, ...]:
    """Layers by which each rank trails rank 0 (rank 0: 0), from ``hops[k]``: how far, in layer times,
    rank k+1's layer trails rank k's (the chain's pipeline: rank k+1 waits for rank k's attention and
    the transfer, then runs its own attention). Rounded to whole layers, at most ``max_hop`` per hop
    (which bounds ``gather_stage_slots``), so growing by 0 or 1 a rank."""
    if not 0 < max_hop <= 1:
        raise ValueError(f"max_hop must be in (0, 1], got {max_hop}")
    lag, total = [0], 0.0
    for k, hop in enumerate(hops):
        total += min(max(hop, 0.0), max_hop)
        lag.append(min(math.floor(total + 0.5), math.floor((k + 1) * max_hop)))
    return tuple(lag)


def step_lag(cost, chunks: Sequence[Sequence], max_hop: float = MAX_HOP) -> tuple[int, ...]:
    """``pipeline_lag`` of a step from the cost model (``partition.CostModel``) and each chunk's N
    segments (``GuestReq.segments``). A rank's layer: linear x its tokens + attention over its prefix;
    hop k -> k+1: the transfer of [c, e_k) plus rank k+1's attention, in rank 0's layer times."""
    n = len(chunks[0]) if chunks else 1
    attn = [sum(cost.attn * ch[k].length * (ch[k].start + ch[k].length / 2) for ch in chunks) for k in range(n)]
    linear = [sum(cost.linear * ch[k].length for ch in chunks) for k in range(n)]
    xfer = [sum(cost.xfer * (ch[k].end - ch[0].start) for ch in chunks) for k in range(n)]
    layer = attn[0] + linear[0]
    if layer <= 0:
        return (0,) * n
    return pipeline_lag([(xfer[k] + attn[k + 1]) / layer for k in range(n - 1)], max_hop)


def _check_lag(lag: Sequence[int]) -> None:
    # Every wait then points to an op due no later in the pipeline (docs/tp-layout-transport.md): a
    # rank lagging less than the one before it would be asked in a gather round for a layer it
    # reaches only after that round; one lagging 2 layers more would post its chain receive of a layer
    # after its predecessor's send of it must have completed (ChainComm's 2 sends in flight).
    if not lag or lag[0] != 0 or any(not 0 <= b - a <= 1 for a, b in zip(lag, lag[1:])):
        raise ValueError(f"lag must start at 0 and grow by 0 or 1 a rank, got {tuple(lag)}")


# -- rounds ---------------------------------------------------------------------------------------

def shard_round(sender: int, layer: int, lag: Sequence[int]) -> int:
    return layer + lag[sender]


def gather_round(receiver: int, layer: int, lag: Sequence[int]) -> int:
    return layer + lag[receiver]


def gather_stage_slots(peers: Peers, lag: Sequence[int]) -> int:
    """Stage slots an owner needs: a staged layer goes out from its first round (the least-lagging
    receiver's) to its last (the most-lagging's), and its slot is refilled once that last round has
    completed, which stream order makes the round before the refill's."""
    if not peers.gather_send:
        return 0
    lags = [lag[d] for d in peers.gather_send]
    return max(lags) - min(lags) + 1


# -- the order --------------------------------------------------------------------------------------

class _Program:
    """A rank's ops by host position: < 0 the step's start, 0..L-1 the exit of that layer (entries
    are the chain's alone), >= L the step's end. Ops due after the last layer keep their positions'
    order across flows: a rank whose streams share a hardware queue starts them in issue order, and
    must not post a round that waits for other ranks before one those ranks are waiting for."""

    def __init__(self, layers: int):
        self.layers = layers
        self.start: list[Op] = []
        self.entry: list[list[Op]] = [[] for _ in range(layers)]
        self.exit: list[list[Op]] = [[] for _ in range(layers)]
        self.late: list[tuple[float, Op]] = []

    def at(self, pos: float, *ops: Op) -> None:
        if pos < 0:
            self.start += ops
        elif pos < self.layers:
            self.exit[int(pos)] += ops
        else:
            self.late += [(pos, op) for op in ops]

    def order(self) -> TPStepOrder:
        end = tuple(op for _, op in sorted(self.late, key=lambda x: x[0]))   # stable within a position
        return TPStepOrder(tuple(self.start), tuple(map(tuple, self.entry)), tuple(map(tuple, self.exit)), end)


LANDS, JOINS = 1e18, math.inf   # positions of the step's last landings, then its joins: after every round


def step_order(rank: int, peers: Peers, layers: int, lag: Sequence[int], windows: Windows = Windows()) -> TPStepOrder:
    """Rank ``rank``'s ops for one step of ``layers`` layers. ``lag``: every rank's (the same on every
    rank: all plan the same step), ``peers``: this rank's."""
    _check_lag(lag)
    n, L, w = len(lag), layers, windows
    if not 0 <= rank < n:
        raise ValueError(f"rank {rank} is not one of {n}")
    prog = _Program(L)
    # The chain: ring_order's order of an open chain; ChainComm's send window.
    chain = ring_order.step_order(Role(L, recv=peers.chain_recv, send=peers.chain_send))
    prog.start += [Op(op.kind, CHAIN, op.layer) for op in chain.start]
    for layer in range(L):
        prog.entry[layer] += [Op(op.kind, CHAIN, op.layer) for op in chain.entry[layer]]
        for op in chain.exit[layer]:
            back = op.layer - w.chain_sends   # ChainComm.post_send waits for the oldest send first
            prog.at(layer, Op(SEND, CHAIN, op.layer, waits=(Ref(CHAIN, SEND, back),) if back >= 0 else ()))
    if peers.chain_send:
        prog.at(JOINS, Op(JOIN, CHAIN, -1, waits=tuple(Ref(CHAIN, SEND, x)
                                                       for x in range(max(0, L - w.chain_sends), L))))
    if peers.shard_send or peers.shard_recv:
        _shards(prog, rank, peers, lag, w)
    if peers.prefix:
        _gather(prog, rank, peers, lag, w)
    return prog.order()


def _shards(prog: _Program, rank: int, peers: Peers, lag: Sequence[int], w: Windows) -> None:
    L = prog.layers
    rounds: dict[int, list[P2P]] = {}
    for layer in range(L):
        for src in peers.shard_recv:
            t = shard_round(src, layer, lag)
            rounds.setdefault(t, []).append(P2P(RECV, src, layer, t % w.shard_recv))
        for dst in peers.shard_send:
            rounds.setdefault(shard_round(rank, layer, lag), []).append(P2P(SEND, dst, layer, layer % w.shard_stage))
    prog.start.append(Op(FORK, SHARDS, -1, SHARD_STREAM))
    if peers.shard_send:
        for layer in range(L):   # at the layer's exit, after the chain's send: the layer's KV is final
            back = layer - w.shard_stage
            prog.at(layer, Op(STAGE, SHARDS, layer, COMPUTE, slot=layer % w.shard_stage,
                              waits=(Ref(SHARDS, BATCH, shard_round(rank, back, lag)),) if back >= 0 else ()))
    unlanded: list[int] = []
    last_batch = None
    for t in sorted(rounds):
        pos = t - lag[rank]   # a sender posts its round at the exit of the layer it sends; a receiver alike
        # a round's receive slot is free once the round that used it last has landed
        while unlanded and unlanded[0] <= t - w.shard_recv:
            prog.at(pos, _land_shards(unlanded.pop(0)))
        stage = (Ref(SHARDS, STAGE, pos),) if peers.shard_send and 0 <= pos < L else ()
        prog.at(pos, Op(BATCH, SHARDS, t, SHARD_STREAM, slot=t % w.shard_recv, p2p=_ordered(rounds[t]), waits=stage))
        last_batch = t
        if any(p.kind == RECV for p in rounds[t]):
            unlanded.append(t)
    prog.at(LANDS, *[_land_shards(t) for t in unlanded])
    last = [Ref(SHARDS, BATCH, last_batch)] + [Ref(SHARDS, LAND, t) for t in unlanded[-1:]]
    prog.at(JOINS, Op(JOIN, SHARDS, -1, waits=tuple(last)))


def _land_shards(t: int) -> Op:
    return Op(LAND, SHARDS, t, SHARD_STREAM, waits=(Ref(SHARDS, BATCH, t),))


def _gather(prog: _Program, rank: int, peers: Peers, lag: Sequence[int], w: Windows) -> None:
    L = prog.layers
    slots = gather_stage_slots(peers, lag)
    most = max((lag[d] for d in peers.gather_send), default=0)
    rounds: dict[int, list[P2P]] = {}
    for layer in range(L):
        for src in peers.gather_recv:
            t = gather_round(rank, layer, lag)
            rounds.setdefault(t, []).append(P2P(RECV, src, layer, layer % w.gather_recv))
        for dst in peers.gather_send:
            rounds.setdefault(gather_round(dst, layer, lag), []).append(P2P(SEND, dst, layer, layer % slots))
    prog.start.append(Op(FORK, GATHER, -1, GATHER_STREAM))
    # layer l lands at the exit of layer l-1; layer 0's at the start, after its round, before the
    # round that reuses its slot
    for layer in range(1, L):
        prog.at(layer - 1, _land_gather(rank, layer, peers, lag, w))
    staged: set[int] = set()
    last_batch, first_landed = None, False
    for t in sorted(rounds):
        recv_layer = t - lag[rank]
        # posted right after the landing that frees its receive slot: gather_recv + 1 layers ahead
        pos = recv_layer - w.gather_recv - 1
        if pos < 0 and recv_layer >= w.gather_recv and not first_landed:
            prog.at(pos, _land_gather(rank, 0, peers, lag, w))
            first_landed = True
        for p in rounds[t]:
            if p.kind == SEND and p.layer not in staged:
                staged.add(p.layer)
                back = p.layer - slots
                prog.at(pos, Op(STAGE, GATHER, p.layer, GATHER_STREAM, slot=p.slot,
                                waits=(Ref(GATHER, BATCH, back + most),) if back >= 0 else ()))
        free = recv_layer - w.gather_recv
        receives = peers.gather_recv and 0 <= recv_layer < L
        prog.at(pos, Op(BATCH, GATHER, t, GATHER_STREAM, slot=recv_layer % w.gather_recv if receives else None,
                        p2p=_ordered(rounds[t]), waits=(Ref(GATHER, LAND, free),) if receives and free >= 0 else ()))
        last_batch = t
    if not first_landed:
        prog.start.append(_land_gather(rank, 0, peers, lag, w))
    if last_batch is not None:
        prog.at(JOINS, Op(JOIN, GATHER, -1, waits=(Ref(GATHER, BATCH, last_batch),)))


def _land_gather(rank, layer, peers, lag, w) -> Op:
    """This rank's own KV heads of the prefix from its paged blocks, the others' from the receive slot."""
    waits = (Ref(GATHER, BATCH, gather_round(rank, layer, lag)),) if peers.gather_recv else ()
    return Op(LAND, GATHER, layer, COMPUTE, slot=layer % w.gather_recv if peers.gather_recv else None, waits=waits)


def _ordered(p2p: list[P2P]) -> tuple[P2P, ...]:
    # one order for every batch: receives, then sends, each by peer (a batch is one NCCL group: the
    # order inside it does not matter to NCCL, only that it is fixed)
    return tuple(sorted(p2p, key=lambda p: (p.kind != RECV, p.peer, p.layer)))


# -- communicators ----------------------------------------------------------------------------------

def communicators(rank: int, n: int, peers: Peers | None = None) -> tuple[tuple, ...]:
    """The NCCL communicators ``rank`` of ``n`` uses (without ``peers``: every flow it may have):
    ("chain", a, b) per neighbour pair (torch's 2-rank communicator of unbatched P2P on the world
    group), SHARD_GROUP's and GATHER_GROUP's own."""
    out = []
    if rank > 0 and (peers is None or peers.chain_recv):
        out.append((CHAIN, rank - 1, rank))
    if rank < n - 1 and (peers is None or peers.chain_send):
        out.append((CHAIN, rank, rank + 1))
    if n > 1 and (peers is None or peers.shard_send or peers.shard_recv):
        out.append((SHARD_GROUP,))
    if n > 1 and (peers is None or peers.gather_send or peers.gather_recv):
        out.append((GATHER_GROUP,))
    return tuple(out)


def streams(rank: int, n: int) -> tuple[str, ...]:
    """The CUDA streams a rank's step uses, in creation order (vLLM's, the side streams, then one per
    communicator, as NCCL makes them at warm-up)."""
    return (COMPUTE, SHARD_STREAM, GATHER_STREAM) + tuple(f"nccl:{c}" for c in communicators(rank, n))


# -- memory -----------------------------------------------------------------------------------------

@dataclass(frozen=True)
class CommBytes:
    """Bytes of a rank's comm buffers in flight at once, by flow (worst rank, worst step), and ``slots``:
    how many slots of how many bytes each (what a preallocated arena holds: ``slot_bytes``)."""

    chain: int
    shards: int
    gather: int
    slots: dict = field(default_factory=dict, compare=False)   # name -> (count, bytes of one)

    @property
    def total(self) -> int:
        return self.chain + self.shards + self.gather


def comm_buffer_bytes(*, n: int, layers: int, kv_bytes_per_token_layer: int, total_kv_heads: int,
                      step_budget: int, max_model_len: int, block_size: int, max_chunks: int = 1,
                      windows: Windows = Windows(), max_hop: float = MAX_HOP) -> CommBytes:
    """What ``GuestHost.kv_bytes_left`` must leave out for the step's comm buffers on every rank: an upper
    bound over ranks, partitions and chunk starts c of the slots ``step_order`` fills, for steps of at
    most ``step_budget`` tokens in at most ``max_chunks`` runahead chunks, each message in whole blocks.

    - chain: ``chain_recvs`` receives of [c, s_k) and ``chain_sends`` sends of [c, e_k), all KV heads;
      both within the step's tokens.
    - shards: rank k stages its segment with the KV heads of the ranks before it (all but its own, or
      all where its own are replicated there) in ``shard_stage`` slots, and receives its KV heads of the
      later segments in ``shard_recv`` slots; a step's segments add up to its tokens.
    - gather: ``gather_recv`` slots of the KV heads it lacks of [0, c), and one stage slot of its own per
      layer of lag the last rank may have (``pipeline_lag``: at most ``max_hop`` a hop) plus one; [0, c)
      fits the guest's scratch (max(max_model_len, step_budget) tokens), whatever c is.
    A message of a chunk may start and end inside a block: 2 blocks more per chunk and message.
    """
    bs = block_size
    block = bs * kv_bytes_per_token_layer         # one block of one layer, all KV heads
    h = 1.0 / min(n, total_kv_heads)              # a rank's share of the KV heads
    below = 1 - h if total_kv_heads >= n else 1.0  # the KV heads of the ranks before a rank
    step_blocks = step_budget // bs + 2 * max_chunks
    scratch_blocks = -(-max(max_model_len, step_budget) // bs)
    cap = lambda x: min(x, layers)                 # noqa: E731  (no window holds more layers than the model has)
    size = lambda blocks, share: math.ceil(blocks * share * block)  # noqa: E731
    slots = {} if n == 1 else {
        "chain_recv": (cap(windows.chain_recvs), size(step_blocks, 1.0)),
        "chain_send": (cap(windows.chain_sends), size(step_blocks, 1.0)),
        "shard_stage": (cap(windows.shard_stage), size(step_blocks, below)),
        # one buffer per later rank, each of its segment's blocks; not capped by the layers: a slot is
        # a round's (layer + the sender's lag), so even one layer's rounds use every slot
        "shard_recv": (windows.shard_recv, size(step_budget // bs + 2 * max_chunks * (n - 1), h)),
    }
    if n > 1 and h < 1:
        slots["gather_stage"] = (cap(math.floor((n - 1) * max_hop) + 1), size(scratch_blocks, h))
        slots["gather_recv"] = (cap(windows.gather_recv), size(scratch_blocks, 1 - h))
    flow = lambda *names: sum(c * b for name, (c, b) in slots.items() if name in names)  # noqa: E731
    return CommBytes(flow("chain_recv", "chain_send"), flow("shard_stage", "shard_recv"),
                     flow("gather_stage", "gather_recv"), slots)
