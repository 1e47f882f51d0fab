"""What each chain worker does in one engine step (pure; no torch.distributed).

Input: a plain view of every request scheduled in the step (tokens whose KV is
already cached, tokens scheduled now, prompt length, block ids, whether runahead
may apply). Output: which requests run ahead, their segments, and for every
chain position the KV blocks it receives and sends.

Any prefill chunk may run ahead: a cold prompt, a later chunk of a long prompt,
a prefix-cache hit, a resumed request. A chunk [c, c + m) is cut into N segments
of its new tokens; the last one is the head's. The KV of [0, c) is only in the
head's paged blocks (from earlier steps), so the chain is a ring:

    head --[0,c)--> pos 0 --[0,e0)--> pos 1 --[0,e1)--> ... --[c,e_{N-2})--> head

The head sends [0, c) per layer ahead of its own compute (it has it before the
step starts), chain position k sends its prefix plus its own segment, and the
head receives only what it does not have. A position that still holds the
leading part of [0, c) from earlier steps (``holdings.ChainHoldings``: a
conversation's earlier turns, a prompt's earlier chunks) receives only the rest. Inner segment bounds are whole KV
blocks; c need not be, so the block holding c (head's tokens before c, pos 0's
after) goes to pos 0 once, for all layers, before the forward ("upfront"),
because the attention backend may write pos 0's own KV into that block before
the per-layer hook runs.

A chunk runs ahead only over a prefix that is final before the step (``prefix_final``):
vLLM caches a block's hash when it *schedules* the block, so a request admitted later in
the same step can hit blocks another request computes in this very step. The ring sends
[0, c) ahead of compute, and ordering that prefix after its producers would close a cycle
(the head's layer l waits for position N-2's, which would wait for the head's), so such a
chunk runs on the head, where each layer writes the whole batch's KV before attention reads it.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Protocol

import numpy as np

from .partition import Chunk, Segment, ring_receives


@dataclass(frozen=True)
class ReqView:
    req_id: str
    num_computed: int           # c: tokens whose KV is in the head's cache already
    num_scheduled: int          # m: tokens computed this step
    prompt_len: int             # chain workers compute prompt tokens only
    block_ids: tuple[int, ...]  # KV cache group 0, covering [0, num_computed + num_scheduled)
    not_ahead: str = ""         # why it cannot run ahead (DECODE, a feature such as "lora"); "": it may

    @property
    def chunk(self) -> Chunk:
        return Chunk(self.num_computed, self.num_computed + self.num_scheduled, self.prompt_len)


def _no_blocks() -> np.ndarray:
    return np.zeros(0, dtype=np.int64)


@dataclass(frozen=True)
class Traffic:
    """One ring position's KV messages in a step (scheduler block ids, in message order).

    recv: per layer, from the predecessor (position 0: the head's cached prefix).
    send: per layer, to the successor (chain positions: prefix + own segment).
    send_prefix: per layer, the head's cached prefix to position 0, ahead of its own compute.
    upfront_send / upfront_recv: once, all layers, before the forward: the block holding an unaligned
    chunk start (head -> position 0).
    """

    recv: np.ndarray = dataclasses.field(default_factory=_no_blocks)
    send: np.ndarray = dataclasses.field(default_factory=_no_blocks)
    send_prefix: np.ndarray = dataclasses.field(default_factory=_no_blocks)
    upfront_send: np.ndarray = dataclasses.field(default_factory=_no_blocks)
    upfront_recv: np.ndarray = dataclasses.field(default_factory=_no_blocks)

    def __bool__(self) -> bool:
        return any(len(getattr(self, f.name)) for f in dataclasses.fields(self))


NO_TRAFFIC = Traffic()


@dataclass(frozen=True)
class RunaheadReq:
    req_id: str
    segments: tuple[Segment, ...]  # absolute token positions; segments[0].start = c
    block_ids: tuple[int, ...]
    held: tuple[int, ...] = ()     # per chain position: tokens of [0, start) it holds already (whole blocks)

    @property
    def start(self) -> int:
        return self.segments[0].start

    @property
    def tokens(self) -> int:
        return self.segments[-1].end - self.start

    def received(self, pos: int, n_workers: int) -> tuple[int, int]:
        """Tokens [lo, hi) position ``pos`` receives per layer (``partition.ring_receives``)."""
        lo, hi = ring_receives(pos, n_workers, self.start, self.segments[pos].start, self.held)
        return int(lo), int(hi)


class Holdings(Protocol):
    """What each chain position holds from earlier steps (``holdings.ChainHoldings`` is one)."""

    def held(self, block_ids: tuple[int, ...], upto: int) -> tuple[int, ...]: ...


class StepSplitter(Protocol):
    """Decides which chunks run ahead and cuts them (``Partitioner``: the chain of copies;
    ``tp_cost.TPLayoutSplitter``: the TP layout)."""

    declined: str  # the reason a chunk that ``runs_ahead`` or ``choose`` turns down is recorded with

    def runs_ahead(self, chunk: Chunk) -> bool: ...

    def choose(self, chunks: list[Chunk], others: list[Chunk], decodes: int) -> list[bool]:
        """Of the chunks that run ahead each alone, those that run ahead in this step, given the step's
        other prefill chunks and decode tokens (the TP layout weighs the whole step against TP=N)."""
        ...

    def split_step(self, chunks: list[Chunk], head_only: list[Chunk]) -> list[tuple[Segment, ...]]: ...


@dataclass(frozen=True)
class StepPlan:
    n_workers: int
    requests: tuple[RunaheadReq, ...]
    block_size: int = 1
    not_ahead: tuple[tuple[str, str], ...] = ()  # (req id, why) of the prefill chunks the head computes alone

    def __bool__(self) -> bool:
        return bool(self.requests)

    def _blocks(self, ranges) -> np.ndarray:
        """Concatenated block ids [lo, hi) of each request (message order: request order)."""
        parts = [np.asarray(r.block_ids[lo:hi], dtype=np.int64) for r, (lo, hi) in zip(self.requests, ranges)]
        return np.concatenate(parts) if parts else _no_blocks()

    def recv_blocks(self, pos: int) -> np.ndarray:
        """Blocks chain position ``pos`` receives per layer from its predecessor: the whole blocks of
        what it receives (held prefixes are whole blocks; the block holding an unaligned c goes upfront)."""
        bs = self.block_size
        spans = (r.received(pos, self.n_workers) for r in self.requests)
        return self._blocks([(lo // bs, hi // bs) for lo, hi in spans])

    def send_blocks(self, pos: int) -> np.ndarray:
        """Blocks ``pos`` sends per layer to its successor (the head: the prefix, ahead of compute)."""
        return self.recv_blocks((pos + 1) % self.n_workers)

    def upfront_blocks(self) -> np.ndarray:
        """The block holding c where c is not block aligned: head -> pos 0, all layers, before the forward."""
        bs = self.block_size
        return self._blocks([(r.start // bs, r.start // bs + (r.start % bs > 0)) for r in self.requests])

    def prefix_received(self, r: RunaheadReq) -> tuple[int, ...]:
        """Tokens of ``r``'s cached prefix each chain position receives (the head holds it; the others
        only what they do not hold from earlier steps)."""
        return tuple(r.start - h for h in (r.held or (0,) * (self.n_workers - 1)))

    def kv_bytes(self, block_bytes: int) -> tuple[list[int], list[int]]:
        """KV bytes each position sends and receives in this step (``block_bytes``: one KV block of every
        layer, as it crosses a link)."""
        sent, received = [], []
        for pos in range(self.n_workers):
            t = self.traffic_for(pos)
            sent.append((len(t.send) + len(t.send_prefix) + len(t.upfront_send)) * block_bytes)
            received.append((len(t.recv) + len(t.upfront_recv)) * block_bytes)
        return sent, received

    def traffic_for(self, pos: int) -> Traffic:
        """Everything ring position ``pos`` receives and sends in this step."""
        if not self:
            return NO_TRAFFIC
        recv, send = self.recv_blocks(pos), self.send_blocks(pos)
        if pos == self.n_workers - 1:  # the head sends its cached prefix ahead of its own compute
            return Traffic(recv=recv, send_prefix=send, upfront_send=self.upfront_blocks())
        if pos == 0:
            return Traffic(recv=recv, send=send, upfront_recv=self.upfront_blocks())
        return Traffic(recv=recv, send=send)


def blocks_written(reqs: list[ReqView], block_size: int) -> set[int]:
    """The KV blocks this step writes: those of every scheduled token, on whichever worker."""
    out: set[int] = set()
    for r in reqs:
        if r.num_scheduled > 0:
            out.update(r.block_ids[r.num_computed // block_size: -(-(r.num_computed + r.num_scheduled) // block_size)])
    return out


def prefix_final(r: ReqView, written: set[int], block_size: int) -> bool:
    """Whether the whole blocks of ``r``'s cached prefix [0, c) hold their final KV before the step
    (no request writes them now). The block holding an unaligned c is ``r``'s own: its slots before
    c are from ``r``'s earlier steps (prefix-cache hits are whole blocks)."""
    return written.isdisjoint(r.block_ids[: r.num_computed // block_size])


DECODE = "decode"                        # no prompt token left: not a prefill chunk
TOO_SHORT = "too_short"                  # the chain would not finish it sooner (cost model or min_tokens)
PREFIX_NOT_FINAL = "prefix_not_final"    # its cached prefix is computed in this same step
TP_FASTER = "tp_faster"                  # TP layout: vLLM's TP=N is predicted to finish it (or the step) sooner


def head_only_reason(r: ReqView, n_workers: int, block_size: int, written: set[int]) -> str:
    """Why prefill chunk ``r`` cannot run ahead in this step ("": it can, if it gains from the chain)."""
    if r.not_ahead:
        return r.not_ahead
    if r.chunk.block_bounds(block_size) < n_workers - 1:  # no room for a bound per chain position
        return TOO_SHORT
    if not prefix_final(r, written, block_size):
        return PREFIX_NOT_FINAL
    return ""


def make_plan(reqs: list[ReqView], n_workers: int, *, splitter: StepSplitter, block_size: int,
              holdings: Holdings | None = None) -> StepPlan:
    """Chunks the splitter finds worth running ahead over a final prefix, each alone and then as a step
    (``StepSplitter.choose``), cut as one job with the head's other work (``holdings``: what chain
    positions keep from earlier steps; None: nothing)."""
    if n_workers < 2:
        return StepPlan(n_workers, (), block_size)
    written = blocks_written(reqs, block_size)
    chunks, not_ahead = {}, []
    for r in reqs:
        if r.num_scheduled <= 0 or r.not_ahead == DECODE:
            continue
        why = head_only_reason(r, n_workers, block_size, written)
        if not why:
            held = holdings.held(r.block_ids, r.num_computed) if holdings is not None else ()
            chunk = dataclasses.replace(r.chunk, held=held)
            if splitter.runs_ahead(chunk):
                chunks[r.req_id] = chunk
                continue
            why = splitter.declined
        not_ahead.append((r.req_id, why))
    if chunks:  # per-chunk answers do not add up: a chunk that wins alone can lose next to the step's rest
        others = [r.chunk for r in reqs if r.req_id not in chunks and r.num_scheduled > 0 and r.not_ahead != DECODE]
        decodes = sum(r.num_scheduled for r in reqs if r.not_ahead == DECODE)
        for rid, keep in zip(list(chunks), splitter.choose(list(chunks.values()), others, decodes), strict=True):
            if not keep:
                del chunks[rid]
                not_ahead.append((rid, splitter.declined))
    if not chunks:
        return StepPlan(n_workers, (), block_size, tuple(not_ahead))
    ahead = [r for r in reqs if r.req_id in chunks]
    head_only = [r.chunk for r in reqs if r.req_id not in chunks and r.num_scheduled > 0]
    out = []
    for r, segs in zip(ahead, splitter.split_step([chunks[r.req_id] for r in ahead], head_only)):
        if len(r.block_ids) * block_size < r.chunk.end:
            raise ValueError(f"request {r.req_id}: {len(r.block_ids)} blocks cannot hold {r.chunk.end} tokens")
        out.append(RunaheadReq(r.req_id, segs, tuple(r.block_ids), chunks[r.req_id].held))
    return StepPlan(n_workers, tuple(out), block_size, tuple(not_ahead))
