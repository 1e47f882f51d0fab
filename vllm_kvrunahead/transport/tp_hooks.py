"""The TP layout's per-layer moves (torch only): a guest step's chain, KV head shards and prefix gather,
issued op by op in ``core/tp_order.step_order``'s order, as ``chain_hooks.ChainHooks`` issues
``ring_order``'s for the chain.

``tp_layout.connector.GuestConnector`` hands the guest's connector hooks to ``start`` (``start_load_kv``),
``enter`` (``wait_for_layer_load``), ``exit`` (``save_kv_layer``) and ``finish`` / ``abort``
(``wait_for_save``). Per step:

- the chain: ``ChainHooks`` over the guest's scratch (receive [c, segment start) before a layer's
  attention, send [c, segment end) after it), ``ChainComm`` on vLLM's world group; tp_order's chain ops
  are ring_order's, first in each phase, so ``ChainHooks`` issues them and this class the rest;
- keep: this rank's KV heads of [c, segment end), scratch -> paged, at each layer's exit;
- shards: at a layer's exit this rank stages its segment's KV heads of every earlier rank, KV heads first
  (each earlier rank's are then one contiguous slice), and each round (one ``RoundComm`` batch) sends
  them and receives its own KV heads of the later segments, landed into its paged blocks from the shards'
  side stream (vLLM's TP forward reads them after the step's joins);
- the gather (chunks after c cached tokens): an owner stages its KV heads of a layer's [0, c) once (on the
  gather's side stream: the paged prefix is final before the step) and sends them to every rank lacking
  them, each in that rank's round; a rank receives layer l ``gather_recv`` + 1 of its own layers ahead and
  lands it with its own KV heads from its paged blocks into the scratch at the exit of layer l - 1 (the
  first layer's before the forward): rank 0's guest writes its own tokens into the block holding an
  unaligned c before the layer's entry hook runs, and the prefix's slots of that block must be there first.

Every ordering the GPU needs is in the order's ``waits`` (``Streams``: CUDA events and stream waits, no host
sync); on CPU (gloo) every op runs on the host in issue order and a wait on a round is the host's, bounded
by the flows' timeout. Every message is a view into a ``CommArena`` slot numbered by the order: a step
allocates nothing for its traffic.
"""
from __future__ import annotations

import contextlib

import torch

from ..core.stats import RunaheadStats
from ..core.tp_order import (BATCH, CHAIN, COMPUTE, FORK, GATHER, GATHER_STREAM, JOIN, LAND, RECV, SEND,
                             SHARD_STREAM, SHARDS, STAGE, Op, Peers, Ref, TPStepOrder, Windows, step_order)
from . import kv_layout
from .chain_hooks import ChainHooks
from .comm import ChainComm, CommArena, RoundComm


class Streams:
    """vLLM's stream (COMPUTE: the current one when a hook runs) and the flows' side streams, on CUDA. On CPU
    every op runs on the host in issue order: no streams, no events."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self._side = {name: torch.cuda.Stream(device) for name in (SHARD_STREAM, GATHER_STREAM)} if self.cuda else {}

    def on(self, name: str):
        """The block's work goes to stream ``name``."""
        if not self.cuda or name == COMPUTE:
            return contextlib.nullcontext()
        return torch.cuda.stream(self._side[name])

    def fork(self, name: str) -> None:
        """Side stream ``name`` waits for the work issued so far on the current stream (the last step's writes)."""
        if self.cuda:
            self._side[name].wait_stream(torch.cuda.current_stream())

    def record(self, ref: Ref):
        """An event after the current stream's work so far, the end of op ``ref`` (None on CPU)."""
        if not self.cuda:
            return None
        event = torch.cuda.Event()
        event.record()
        return event

    @staticmethod
    def wait(done) -> None:
        """The current stream waits for ``done``: a round's ``Batch`` or an op's event (both have ``wait``:
        a stream wait on CUDA; a Batch on gloo: the host's, bounded)."""
        if done is not None:
            done.wait()


class TPHooks:
    """One TP-layout rank's per-layer moves over its guest's scratch and vLLM's paged caches. ``heads``: every
    rank's KV heads [lo, hi); ``num_blocks``: the scratch's blocks; ``arena``: the comm buffers, sized for
    ``windows`` (``GuestHost``)."""

    def __init__(self, comm: ChainComm, shards: RoundComm, gather: RoundComm, arena: CommArena,
                 stats: RunaheadStats, rank: int, heads: list[tuple[int, int]], num_blocks: int,
                 windows: Windows = Windows()):
        self.chain = ChainHooks(comm, stats, num_blocks)  # over the scratch
        self.shards, self.gather, self.arena, self.stats = shards, gather, arena, stats
        self.rank, self.heads, self.windows = rank, heads, windows
        self.paged: dict[str, torch.Tensor] = {}
        self._reset()

    # -- set-up ---------------------------------------------------------
    def register(self, scratch: dict[str, torch.Tensor], order: list[str]) -> None:
        """The guest's scratch by layer name, ``order`` its layers in forward order."""
        self.chain.register(scratch, order)
        self.order, self.block_shape = self.chain.order, self.chain.block_shape
        self.dtype, self.device = self.chain.dtype, self.chain.device
        self.streams = Streams(self.device)

    def register_paged(self, paged: dict[str, torch.Tensor]) -> None:
        """vLLM's own (TP) KV caches by layer name: this rank's KV heads."""
        self.paged = dict(paged)

    # -- per step -------------------------------------------------------
    def _reset(self) -> None:
        self._order: TPStepOrder | None = None  # this step's ops (None: no runahead work here)
        self._keep: tuple[torch.Tensor, torch.Tensor] | None = None   # scratch -> paged, this rank's KV heads
        self._segment: torch.Tensor | None = None    # its segment's scratch blocks (the shards it sends)
        self._shard_recv: dict[int, torch.Tensor] = {}   # later rank -> paged blocks of its segment
        self._own: tuple[torch.Tensor, torch.Tensor] | None = None    # the prefix: paged -> scratch, own KV heads
        self._gather_recv: dict[int, torch.Tensor] = {}  # owner -> scratch blocks of the prefix
        self._done: dict[Ref, object] = {}        # an issued op's Batch or event, what later ops wait for
        self._staged: dict[tuple[str, int], torch.Tensor] = {}     # (flow, layer) -> its stage slot's tensor
        self._received: dict[tuple[str, int], list] = {}   # shards: (SHARDS, round); gather: (GATHER, layer)
        self._chain_open = False

    def start(self, traffic) -> None:
        """``traffic``: this rank's ``tp_step.GuestTraffic`` (None: a step with no runahead work here)."""
        self._reset()
        if traffic is None:
            self.chain.reset()
            return
        self.chain.start(traffic)   # ring_order's start ops: tp_order's chain ops of the step's start
        self._chain_open = True
        if not len(traffic.keep_src):
            return
        blocks = self.chain.device_blocks
        self._keep = (blocks(traffic.keep_src), blocks(traffic.keep_dst))
        sends = [ids for _, ids in traffic.shard_send if len(ids)]   # the same blocks for every earlier rank
        self._segment = blocks(sends[0]) if sends else None
        self._shard_recv = {src: blocks(ids) for src, ids in traffic.shard_recv if len(ids)}
        if len(traffic.own_src):
            self._own = (blocks(traffic.own_src), blocks(traffic.own_dst))
        self._gather_recv = {src: blocks(ids) for src, ids in traffic.gather_recv if len(ids)}
        lag = tuple(traffic.lag) or (0,) * len(self.heads)
        self._order = step_order(self.rank, Peers.of(traffic), len(self.order), lag, self.windows)
        self._issue(self._order.start)

    def enter(self, layer_name: str) -> None:
        self.chain.enter(layer_name)   # tp_order's entry ops are the chain's

    def exit(self, layer_name: str, kv_layer: torch.Tensor) -> None:
        """After the attention of layer ``layer_name``, whose scratch is ``kv_layer``."""
        self.chain.exit(kv_layer)   # the chain's send comes first in tp_order's exit
        if self._keep is None:
            return
        lo, hi = self.heads[self.rank]
        src, dst = self._keep
        kv_layout.scatter(self.paged[layer_name], dst, kv_layout.gather(kv_layer, src)[:, lo:hi])
        layer = self.chain.layer - 1
        if self._order is not None and 0 <= layer < len(self._order.exit):
            self._issue(self._order.exit[layer])

    def finish(self) -> None:
        """The step's end: late rounds, last landings, the joins; every flow's step ended (its sends and
        rounds waited for). Raises, with the step's traffic dropped, if it cannot end."""
        try:
            if self._order is not None:
                if self.chain.layer != len(self.order):
                    raise RuntimeError(f"KV-Runahead: the guest ran {self.chain.layer} of {len(self.order)} "
                                       "attention layers; its KV head shards and prefix were not all moved")
                self._issue(self._order.end)
                self.shards.end_step()
                self.gather.end_step()
            if self._chain_open:
                self._chain_open = False
                self.chain.finish(failed=False)
        except BaseException:
            self.abort()
            raise
        self._reset()

    def abort(self) -> None:
        """The step failed: every flow's traffic dropped without waiting (a peer may be gone)."""
        self.shards.abort_step()
        self.gather.abort_step()
        self.chain.finish(failed=True)
        self._reset()

    # -- one op -----------------------------------------------------------
    def _issue(self, ops: tuple[Op, ...]) -> None:
        for op in ops:
            if op.flow != CHAIN:
                self._run(op)
            elif op.kind == JOIN:   # the chain's other ops are ChainHooks' (start, enter, exit)
                self._chain_open = False
                self.chain.finish(failed=False)

    def _run(self, op: Op) -> None:
        if op.kind == FORK:
            self.streams.fork(op.stream)
            return
        with self.streams.on(op.stream):
            for ref in op.waits:
                self.streams.wait(self._done[ref])
            if op.kind == JOIN:
                return
            ref = Ref(op.flow, op.kind, op.index)
            if op.kind == BATCH:
                self._done[ref] = self._batch(op)
                return
            if op.kind == STAGE:
                (self._stage_shards if op.flow == SHARDS else self._stage_gather)(op)
            elif op.kind == LAND:
                (self._land_shards if op.flow == SHARDS else self._land_gather)(op)
            else:
                raise RuntimeError(f"KV-Runahead: unknown TP-layout op {op}")
            self._done[ref] = self.streams.record(ref)

    def _rest(self) -> tuple[int, ...]:
        return self.block_shape[1:]   # a block's shape after its KV heads

    def _stage_shards(self, op: Op) -> None:
        """This rank's segment, layer ``op.index``, KV heads [0, end of rank - 1's), KV heads first."""
        hi = self.heads[self.rank - 1][1]
        ids = self._segment
        out, = self.arena.views("shard_stage", op.slot, [(hi, len(ids), *self._rest())], self.dtype)
        kv = self.chain.kv_caches[self.order[op.index]]
        torch.index_select(kv[:, :hi], 0, ids, out=out.transpose(0, 1))
        self._staged[SHARDS, op.index] = out

    def _stage_gather(self, op: Op) -> None:
        """This rank's KV heads of the prefix [0, c), layer ``op.index``, from its paged blocks."""
        src = self._own[0]
        lo, hi = self.heads[self.rank]
        out, = self.arena.views("gather_stage", op.slot, [(len(src), hi - lo, *self._rest())], self.dtype)
        torch.index_select(self.paged[self.order[op.index]], 0, src, out=out)
        self._staged[GATHER, op.index] = out

    def _batch(self, op: Op):
        """One round: its receives into the round's receive slot, its sends from the stage slots."""
        rest, sends, recvs = self._rest(), [], [p for p in op.p2p if p.kind == RECV]
        for p in op.p2p:
            if p.kind != SEND:
                continue
            staged = self._staged[op.flow, p.layer]
            if op.flow == SHARDS:   # the receiver's KV heads: a contiguous slice of the KV-heads-first stage
                a, b = self.heads[p.peer]
                staged = staged[a:b]
            sends.append((p.peer, staged))
            self.stats.blocks_sent += len(self._segment) if op.flow == SHARDS else len(self._own[0])
        bufs = []
        if recvs and op.flow == SHARDS:
            lo, hi = self.heads[self.rank]
            shapes = [(hi - lo, len(self._shard_recv[p.peer]), *rest) for p in recvs]
            bufs = self.arena.views("shard_recv", op.slot, shapes, self.dtype)
            self._received[SHARDS, op.index] = [(p.peer, p.layer, buf) for p, buf in zip(recvs, bufs)]
        elif recvs:
            shapes = [(len(self._gather_recv[p.peer]), self.heads[p.peer][1] - self.heads[p.peer][0], *rest)
                      for p in recvs]
            bufs = self.arena.views("gather_recv", op.slot, shapes, self.dtype)
            self._received[GATHER, recvs[0].layer] = [(p.peer, buf) for p, buf in zip(recvs, bufs)]
        comm = self.shards if op.flow == SHARDS else self.gather
        return comm.batch([(p.peer, buf) for p, buf in zip(recvs, bufs)], sends)

    def _land_shards(self, op: Op) -> None:
        """Round ``op.index``'s KV heads of the later segments into this rank's paged blocks."""
        for src, layer, buf in self._received.pop((SHARDS, op.index), ()):
            ids = self._shard_recv[src]
            self.paged[self.order[layer]].index_copy_(0, ids, buf.transpose(0, 1))
            self.stats.blocks_received += len(ids)

    def _land_gather(self, op: Op) -> None:
        """Layer ``op.index``'s cached prefix, every KV head, into the scratch: this rank's own KV heads
        from its paged blocks, the others' from the round's receive slot."""
        name = self.order[op.index]
        scratch = self.chain.kv_caches[name]
        lo, hi = self.heads[self.rank]
        src, dst = self._own
        kv_layout.scatter(scratch[:, lo:hi], dst, kv_layout.gather(self.paged[name], src))
        for peer, buf in self._received.pop((GATHER, op.index), ()):
            a, b = self.heads[peer]
            ids = self._gather_recv[peer]
            kv_layout.scatter(scratch[:, a:b], ids, buf)
            self.stats.blocks_received += len(ids)


def tp_links(rank: int, n: int, group, cpu_group, timeout_s: float | None,
             arena: CommArena) -> tuple[ChainComm, RoundComm, RoundComm]:
    """A TP-layout rank's three flows (collective: every rank calls it at once). The chain on vLLM's world
    group (``group``; its unbatched operations get a 2-rank communicator per neighbour pair), its buffers the
    arena's chain slots; the shards and the gather on a world-sized group each. So 4 communicators per rank
    at any N (the end ranks 3), and 2 new groups."""
    sends = arena.buffers("chain_send")
    comm = ChainComm(rank - 1 if rank > 0 else None, rank + 1 if rank < n - 1 else None, group, timeout_s,
                     cpu_group, max_sends=len(sends) or 2, send_slots=sends, recv_slots=arena.buffers("chain_recv"))
    backend = torch.distributed.get_backend(group)
    return comm, RoundComm(rank, n, backend, timeout_s, SHARDS), RoundComm(rank, n, backend, timeout_s, GATHER)
