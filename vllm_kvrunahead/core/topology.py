"""Where one worker sits in the KV chain (pure; no torch.distributed).

S runahead stages, each a tensor-parallel group of T ranks (S x T ranks in all; T = 1 is
plain KV-Runahead, one rank per stage). The ranks follow vLLM's own layout for TP x PCP
(``parallel_state.initialize_model_parallel``: TP is the innermost dimension):

    global rank = stage * T + tp_rank

so vLLM's TP groups are the stages, [s*T .. s*T + T-1]. vLLM's output rank,
world_size - T, is TP rank 0 of the last stage: the last stage is the head stage.

The chain is T independent chains, one per TP rank r: (0, r) -> (1, r) -> ... ->
(S-1, r). Stage s's TP rank r holds only its KV heads and sends them to stage s+1's TP
rank r; no traffic crosses TP ranks, and no collective is added.

Each chain is a ring of chain positions 0 .. S-1 (stages after the head stage, in order);
the last position is the head stage. Position k receives from k-1 and sends to k+1; the
ring closes through the head, which sends a cached prefix to position 0 when a chunk
starts after cached tokens.
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ChainTopology:
    n_workers: int  # S: runahead stages, the chain's length (positions)
    head_rank: int  # global rank of the head (vLLM's output rank: TP rank 0 of the head stage)
    rank: int       # this worker's global rank
    tp_size: int = 1  # T: tensor-parallel ranks per stage (T independent chains)

    def __post_init__(self) -> None:
        if self.tp_size < 1 or self.n_workers < 1:
            raise ValueError(f"ChainTopology needs n_workers >= 1 and tp_size >= 1, got {self.n_workers}, {self.tp_size}")
        if self.head_rank % self.tp_size:
            raise ValueError(f"head rank {self.head_rank} is not TP rank 0 of a stage of {self.tp_size}")
        if not 0 <= self.rank < self.world_size or not 0 <= self.head_rank < self.world_size:
            raise ValueError(f"ranks {self.rank}, {self.head_rank} outside a world of {self.world_size}")

    @property
    def world_size(self) -> int:
        return self.n_workers * self.tp_size

    @property
    def stage(self) -> int:
        return self.rank // self.tp_size

    @property
    def tp_rank(self) -> int:
        return self.rank % self.tp_size

    @property
    def head_stage(self) -> int:
        return self.head_rank // self.tp_size

    def global_rank(self, stage: int, tp_rank: int) -> int:
        return stage * self.tp_size + tp_rank

    def stage_of(self, pos: int) -> int:
        return (self.head_stage + 1 + pos) % self.n_workers

    def rank_of(self, pos: int, tp_rank: int | None = None) -> int:
        """Global rank of chain position ``pos`` in the chain of ``tp_rank`` (default: this rank's)."""
        return self.global_rank(self.stage_of(pos), self.tp_rank if tp_rank is None else tp_rank)

    def chain(self, tp_rank: int | None = None) -> list[int]:
        """The global ranks of one TP rank's chain, position 0 first, the head stage's rank last."""
        return [self.rank_of(p, tp_rank) for p in range(self.n_workers)]

    def ring_links(self) -> list[tuple[int, int]]:
        """The closing link (head-stage rank, position-0 rank) of every TP rank's chain, in TP-rank
        order: the same list on every rank (each gets a process group of its own, made by all)."""
        return [(self.rank_of(self.n_workers - 1, r), self.rank_of(0, r)) for r in range(self.tp_size)]

    @property
    def pos(self) -> int:
        return (self.stage - self.head_stage - 1) % self.n_workers

    @property
    def is_head(self) -> bool:
        """This rank is in the head stage (every TP rank of it holds its shard of the whole KV)."""
        return self.stage == self.head_stage

    @property
    def prev_rank(self) -> int:
        return self.rank_of(self.pos - 1)

    @property
    def next_rank(self) -> int:
        return self.rank_of(self.pos + 1)


def stage_device(device: str, tp_size: int) -> str:
    """What a runahead stage runs on, as partition tables are keyed ("device"): the GPU's name, and
    for a stage of T > 1 TP ranks "<GPU> x T" (a table tuned on single GPUs does not fit it)."""
    return device if tp_size == 1 else f"{device} x {tp_size}"


def tp_layout_device(device: str) -> str:
    """What the TP layout's partition tables are keyed by ("device"): "<GPU> tp-layout". Its guests' split
    differs from the chain of copies' on the same GPUs (earlier ranks also receive their KV heads of the
    later segments, the last token is vLLM's TP forward's), so neither mode's table cuts the other's chunks."""
    return f"{device} tp-layout"
