"""Which KV the chain workers still hold from earlier steps (pure; no torch).

Every worker has the same paged block table as the head, and after a runahead step chain
position k holds the head's exact bytes for [0, e_k) of that chunk's request (received prefix,
predecessors' segments, its own segment). A later chunk of the same request, a prefix-cache hit
on those blocks (multi-turn chat) or a resumed request then needs from the ring only what
position k lacks, instead of the whole cached prefix through every hop. (4x H100, multi-turn
8 x 4 turns of +8k tokens: position 0 received 789k KV blocks x layers without this.)

Per chain position and KV block: how many leading slots equal the head's. A runahead step sets
them from its segments; work the head does alone (decodes, short chunks, requests the chain does
not carry) writes slots only the head has, which clears them from there on. Every worker sees the
same scheduler outputs and computes the same plans, so every worker keeps the same record and
the sender and receiver of every message agree on it without exchanging anything.
"""
from __future__ import annotations

import numpy as np

from .plan import ReqView, StepPlan


class ChainHoldings:
    def __init__(self, n_chain: int, num_blocks: int, block_size: int) -> None:
        self.block_size = block_size
        self._valid = np.zeros((n_chain, num_blocks), dtype=np.int32)  # leading slots equal to the head's

    def held(self, block_ids: tuple[int, ...], upto: int) -> tuple[int, ...]:
        """Per chain position: tokens of [0, upto) it holds as whole leading blocks of ``block_ids``."""
        nb = upto // self.block_size
        if nb == 0:
            return (0,) * len(self._valid)
        full = self._valid[:, np.asarray(block_ids[:nb], dtype=np.int64)] == self.block_size
        lead = np.where(full.all(axis=1), nb, np.argmin(full, axis=1))
        return tuple(int(b) * self.block_size for b in lead)

    def record(self, plan: StepPlan, views: list[ReqView]) -> None:
        """Apply one step's writes: ``plan`` (made from ``views``) is what ran on the chain."""
        bs = self.block_size
        ahead = {r.req_id: r for r in plan.requests}
        for v in views:
            if v.num_scheduled <= 0:
                continue
            end = v.num_computed + v.num_scheduled
            ids = np.asarray(v.block_ids[: -(-end // bs)], dtype=np.int64)
            r = ahead.get(v.req_id)
            if r is None:  # the head alone wrote [c, end)
                first = v.num_computed // bs
                self._valid[:, ids[first]] = np.minimum(self._valid[:, ids[first]], v.num_computed % bs)
                self._valid[:, ids[first + 1:]] = 0
                continue
            # position k holds [0, e_k) of the request now, and the head alone wrote [e_k, end)
            starts = np.arange(len(ids), dtype=np.int64) * bs
            for k, seg in enumerate(r.segments[:-1]):
                self._valid[k, ids] = np.clip(seg.end - starts, 0, bs)
