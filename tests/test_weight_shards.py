"""Where each rank's TP shard lands in the full weight (core/weight_shards.py): the peer guest's map, against
vLLM's TP cuts reproduced here on plain lists (no torch)."""
import pytest

from vllm_kvrunahead.core.weight_shards import Piece, column_pieces, covers, row_pieces


def place(full_len, shards, pieces_by_rank):
    """The full weight's rows (or columns) rebuilt from every rank's shard by the pieces."""
    out = [None] * full_len
    for shard, pieces in zip(shards, pieces_by_rank, strict=True):
        for p in pieces:
            for i in range(p.length):
                assert out[p.dst + i] is None, "placed twice"
                out[p.dst + i] = shard[p.src + i]
    return out


def qkv_rows(heads, kv_heads, d, n, r):
    """Rows of the full QKV weight [q heads | k heads | v heads] (each head d rows) that vLLM's
    QKVParallelLinear gives rank r: its heads/n query heads and max(1, kv/n) KV heads (KV heads replicated
    when fewer than ranks)."""
    per_q, per_kv = heads // n, max(1, kv_heads // n)
    kv0 = r * kv_heads // n if kv_heads >= n else r // (n // kv_heads)
    k0, v0 = heads * d, (heads + kv_heads) * d
    return (list(range(r * per_q * d, (r + 1) * per_q * d)) + list(range(k0 + kv0 * d, k0 + (kv0 + per_kv) * d))
            + list(range(v0 + kv0 * d, v0 + (kv0 + per_kv) * d)))


def qkv_shards(heads, kv_heads, d, n):
    """The full QKV weight's rows as labels, every rank's shard of them, and the full and per-rank sizes."""
    full = ([("q", h, i) for h in range(heads) for i in range(d)] + [("k", h, i) for h in range(kv_heads) for i in range(d)]
            + [("v", h, i) for h in range(kv_heads) for i in range(d)])
    shards = [[full[i] for i in qkv_rows(heads, kv_heads, d, n, r)] for r in range(n)]
    per_q, per_kv = heads // n, max(1, kv_heads // n)
    return full, shards, [heads * d, kv_heads * d, kv_heads * d], [per_q * d, per_kv * d, per_kv * d]


@pytest.mark.parametrize("heads, kv_heads, n", [(4, 4, 4), (8, 2, 2), (8, 2, 4), (8, 1, 8), (9, 3, 3), (64, 8, 8)])
def test_qkv_shards_rebuild_the_full_weight(heads, kv_heads, n):
    full, shards, full_sizes, shard_sizes = qkv_shards(heads, kv_heads, 2, n)
    pieces = [column_pieces(full_sizes, shard_sizes, n, r) for r in range(n)]
    assert place(len(full), shards, pieces) == full and covers(pieces, len(full))
    if kv_heads < n:   # a replicated KV head is placed by its first holder only
        assert sum(len(p) for p in pieces) == n + 2 * kv_heads


@pytest.mark.parametrize("n", [1, 2, 3, 4, 8])
def test_merged_gate_up_and_row_parallel_rebuild_the_full_weight(n):
    inter = 24
    gate, up = [("g", i) for i in range(inter)], [("u", i) for i in range(inter)]
    per = inter // n
    shards = [gate[r * per:(r + 1) * per] + up[r * per:(r + 1) * per] for r in range(n)]
    pieces = [column_pieces([inter, inter], [per, per], n, r) for r in range(n)]
    assert place(2 * inter, shards, pieces) == gate + up
    cols = list(range(inter))
    rows = [row_pieces(inter, per, n, r) for r in range(n)]
    assert place(inter, [cols[r * per:(r + 1) * per] for r in range(n)], rows) == cols
    assert rows[1] == [Piece(src=0, dst=per, length=per)] if n > 1 else rows[0] == [Piece(0, 0, inter)]


def test_cuts_that_do_not_divide_are_refused():
    with pytest.raises(ValueError, match="cannot be cut"):
        column_pieces([10], [3], 3, 0)
    with pytest.raises(ValueError, match="cannot be cut"):
        row_pieces(10, 3, 3, 0)
    with pytest.raises(ValueError, match="outputs"):
        column_pieces([8, 8], [4], 2, 0)
    assert not covers([[Piece(0, 0, 4)], [Piece(0, 2, 4)]], 6)   # an overlap is no cover
