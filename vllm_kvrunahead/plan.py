"""What each chain worker does in one engine step (pure; no torch.distributed).

Input: a plain view of the step (per request: tokens already computed, tokens
scheduled now, prompt length, block ids, whether runahead may apply). Output:
which requests run ahead, their segments, and for every chain position the
KV slots it receives from its predecessor and sends to its successor.

Runahead applies to a request's first prefill chunk with nothing cached
(computed == 0) and at least ``min_tokens`` (and >= N) tokens; anything else
(decodes, later chunks, prefix-cache hits, short prompts) runs on the head
alone, as in plain vLLM.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np

from .partition import Segment, align_segments


@dataclass(frozen=True)
class ReqView:
    req_id: str
    num_computed: int
    num_scheduled: int
    prompt_len: int
    block_ids: tuple[int, ...]  # KV cache group 0, covering [0, num_computed + num_scheduled)
    eligible: bool = True       # False: feature the chain does not carry (prompt logprobs, ...)


@dataclass(frozen=True)
class RunaheadReq:
    req_id: str
    segments: tuple[Segment, ...]
    block_ids: tuple[int, ...]


@dataclass(frozen=True)
class StepPlan:
    n_workers: int
    requests: tuple[RunaheadReq, ...]

    def __bool__(self) -> bool:
        return bool(self.requests)

    def recv_blocks(self, pos: int, block_size: int) -> np.ndarray:
        """KV blocks chain position ``pos`` receives: its whole prefix (message order)."""
        return _blocks([(r.block_ids, r.segments[pos].start) for r in self.requests], block_size)

    def send_blocks(self, pos: int, block_size: int) -> np.ndarray:
        """KV blocks chain position ``pos`` sends on: its prefix plus its own segment."""
        if pos == self.n_workers - 1:
            return np.zeros(0, dtype=np.int64)
        return _blocks([(r.block_ids, r.segments[pos].end) for r in self.requests], block_size)



def _blocks(prefixes, block_size: int) -> np.ndarray:
    """Block ids holding tokens [0, end) of each request; ``end`` is block aligned."""
    parts = []
    for block_ids, end in prefixes:
        assert end % block_size == 0, "segment boundaries are block aligned"
        parts.append(np.asarray(block_ids[: end // block_size], dtype=np.int64))
    return np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)


def make_plan(
    reqs: list[ReqView],
    n_workers: int,
    *,
    split: Callable[[int], tuple[Segment, ...]],
    min_tokens: int,
    block_size: int,
) -> StepPlan:
    """``split(m)``: the segments of an m-token prompt (e.g. a ``Partitioner``), aligned here."""
    out = []
    for r in reqs:
        m = r.num_scheduled
        # each non-last segment needs at least one whole KV block
        if not (r.eligible and n_workers > 1 and r.num_computed == 0
                and m >= max(min_tokens, (n_workers - 1) * block_size + 1) and m <= r.prompt_len):
            continue
        if len(r.block_ids) * block_size < m:
            raise ValueError(f"request {r.req_id}: {len(r.block_ids)} blocks cannot hold {m} tokens")
        segs = align_segments(split(m), block_size)
        out.append(RunaheadReq(r.req_id, segs, tuple(r.block_ids)))
    return StepPlan(n_workers, tuple(out))
