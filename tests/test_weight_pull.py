"""The peer guest's one-sided weight pulls (transport/weight_pull.py) on gloo processes: every rank publishes its
TP shards once and rebuilds the full weights of any layer from every rank's, with no peer taking part."""
import pytest
import torch

from tests.dist_utils import run_ranks

HEADS, KV, D, HIDDEN, LAYERS = 4, 2, 2, 8, 3


def _full(layer):
    """A layer's full (TP=1) QKV weight, rows [q heads | k heads | v heads], and its o weight."""
    g = torch.Generator().manual_seed(layer)
    return torch.randn((HEADS + 2 * KV) * D, HIDDEN, generator=g), torch.randn(HIDDEN, HEADS * D, generator=g)


def _shards(layer, n, rank):
    """vLLM's cut of rank ``rank``: its q heads and KV heads (replicated when KV < n); o's column block."""
    from tests.test_weight_shards import qkv_rows

    qkv, o = _full(layer)
    q_k_v = qkv[qkv_rows(HEADS, KV, D, n, rank)]
    cols = HEADS * D // n
    return q_k_v, o[:, rank * cols:(rank + 1) * cols].clone()


def _pull(rank, n, shm_free=None):
    import torch.distributed as dist

    from vllm_kvrunahead.core.weight_shards import column_pieces, row_pieces
    from vllm_kvrunahead.transport import weight_pull
    from vllm_kvrunahead.transport.weight_pull import SharedShards, ShardedWeight

    if shm_free is not None and rank == n - 1:   # one rank's /dev/shm is too small
        weight_pull._shm_free = lambda: shm_free
    per_kv = max(1, KV // n)
    params, layers = [], []
    for layer in range(LAYERS):
        qkv, o = (torch.nn.Parameter(t, requires_grad=False) for t in _shards(layer, n, rank))
        params.append((qkv, o))
        layers.append([
            ShardedWeight(qkv, [column_pieces([HEADS * D, KV * D, KV * D], [HEADS * D // n, per_kv * D, per_kv * D],
                                              n, k) for k in range(n)], 0),
            ShardedWeight(o, [row_pieces(HEADS * D, HEADS * D // n, n, k) for k in range(n)], 1)])
    before = [(p.data_ptr(), p.clone()) for pair in params for p in pair]
    shared = SharedShards(layers, rank, n, dist.group.WORLD)
    # vLLM's own tensors now live in the shared file (held once), with their values
    moved = all(p.data_ptr() != ptr and torch.equal(p, v) for (ptr, v), p in zip(before, [p for pr in params for p in pr]))
    one_storage = len({p.untyped_storage().data_ptr() for pair in params for p in pair}) == 1
    dest = [torch.full(((HEADS + 2 * KV) * D, HIDDEN), float("nan")), torch.full((HIDDEN, HEADS * D), float("nan"))]
    got = []
    for layer in (2, 0, 1, 2):   # any order, any number of times: nobody else takes part
        shared.take(layer, dest)
        got.append([t.clone() for t in dest])
    dist.barrier()
    return dict(got=got, moved=moved, one_storage=one_storage, pulled=shared.bytes_pulled, taken=shared.layers_taken)


@pytest.mark.parametrize("n", [4])   # each of the 2 KV heads held by 2 ranks, one q head a rank
def test_every_rank_rebuilds_every_layer_from_the_shards_alone(n):
    out = run_ranks(_pull, n)
    for rank, r in enumerate(out):
        assert r["moved"] and r["one_storage"] and r["taken"] == 4
        for layer, got in zip((2, 0, 1, 2), r["got"], strict=True):
            qkv, o = _full(layer)
            assert torch.equal(got[0], qkv) and torch.equal(got[1], o), (rank, layer)
        # bytes read from the other ranks: what they hold that this rank does not (a KV head held by several
        # ranks is read from its first holder, which may be this rank)
        assert r["pulled"] > 0


def test_a_shm_mount_too_small_for_the_shards_is_refused_by_every_rank():
    with pytest.raises(AssertionError) as e:
        run_ranks(_pull, 2, 1024)
    assert e.value.args[0].count("needs 0 MiB of /dev/shm on every rank for its weight shards; a rank has 0 MiB "
                                 "free. Enlarge it (a container's --shm-size)") == 2
