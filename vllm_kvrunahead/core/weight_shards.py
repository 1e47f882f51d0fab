"""Where each rank's TP shard of a weight lands in the full (TP=1) weight (pure): the peer guest's map.

vLLM's tensor parallelism cuts a column-parallel weight (rows = outputs) into per-rank blocks of each of its
outputs (a merged QKV holds ``[q_r; k_r; v_r]``, a merged gate/up ``[gate_r; up_r]``) and a row-parallel
weight (columns = inputs) into one column block per rank. Where a part has fewer heads than ranks (KV heads
< N) each of its blocks is held by several ranks alike; the first of them places it. ``Piece``s are
(source offset in the shard, destination offset in the full weight, length) along the weight's cut
dimension; the guest copies them, so its layer is the TP=1 model's, byte for byte.
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Piece:
    src: int    # offset in the rank's shard along the cut dimension
    dst: int    # offset in the full weight along it
    length: int


def column_pieces(full_sizes: list[int], shard_sizes: list[int], n: int, rank: int) -> list[Piece]:
    """Rows of rank ``rank``'s shard of a column-parallel weight with outputs ``full_sizes`` (each cut into
    blocks of ``shard_sizes``, one per rank or, where a part has fewer blocks than ranks, replicated)."""
    if len(full_sizes) != len(shard_sizes):
        raise ValueError(f"{len(full_sizes)} outputs but {len(shard_sizes)} shard sizes")
    pieces, src, dst = [], 0, 0
    for full, shard in zip(full_sizes, shard_sizes, strict=True):
        if shard <= 0 or full % shard or (shard * n) % full:
            raise ValueError(f"an output of {full} rows cannot be cut into {n} shards of {shard}")
        blocks = full // shard
        holders = n // blocks           # ranks holding each block (1 unless the part is replicated)
        if rank % holders == 0:         # the first holder places it
            pieces.append(Piece(src=src, dst=dst + (rank // holders) * shard, length=shard))
        src, dst = src + shard, dst + full
    return pieces


def row_pieces(full_cols: int, shard_cols: int, n: int, rank: int) -> list[Piece]:
    """Columns of rank ``rank``'s shard of a row-parallel weight (``full_cols`` inputs cut into ``n`` blocks)."""
    if shard_cols * n != full_cols:
        raise ValueError(f"{full_cols} columns cannot be cut into {n} shards of {shard_cols}")
    return [Piece(src=0, dst=rank * shard_cols, length=shard_cols)]


def covers(pieces_by_rank: list[list[Piece]], full: int) -> bool:
    """Every row (column) of the full weight is placed exactly once."""
    spans = sorted((p.dst, p.dst + p.length) for ps in pieces_by_rank for p in ps)
    at = 0
    for lo, hi in spans:
        if lo != at:
            return False
        at = hi
    return at == full
