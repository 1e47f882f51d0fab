"""Where one worker sits in the KV chain (pure; no torch.distributed).

N workers form a ring of chain positions 0 .. N-1; the last position is the head,
vLLM's output rank. Position k receives from k-1 and sends to k+1; the ring closes
through the head, which sends a cached prefix to position 0 when a chunk starts
after cached tokens.
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ChainTopology:
    n_workers: int
    head_rank: int  # global rank of the head (vLLM's output rank)
    rank: int       # this worker's global rank

    def rank_of(self, pos: int) -> int:
        return (self.head_rank + 1 + pos) % self.n_workers

    @property
    def pos(self) -> int:
        return (self.rank - self.head_rank - 1) % self.n_workers

    @property
    def is_head(self) -> bool:
        return self.rank == self.head_rank

    @property
    def prev_rank(self) -> int:
        return self.rank_of(self.pos - 1)

    @property
    def next_rank(self) -> int:
        return self.rank_of(self.pos + 1)
