import pytest

from vllm_kvrunahead.core.partition import (
    CostModel, Segment, balanced_split, check_fractions, even_split, fractions_of, from_fractions, predicted_ttft,
    worker_costs
)

LENGTHS = [1, 2, 3, 7, 8, 100, 1023, 4096, 32_768, 131_071, 1_000_000]


def assert_cover(segs, n, k):
    assert len(segs) == k
    assert segs[0].start == 0 and segs[-1].end == n
    for i, s in enumerate(segs):
        assert s.index == i and s.length >= 1
    for a, b in zip(segs, segs[1:]):
        assert a.end == b.start  # contiguous, disjoint, ordered


SPLITS = {"even": even_split, "balanced": balanced_split}


@pytest.mark.parametrize("method", sorted(SPLITS))
@pytest.mark.parametrize("n_workers", range(1, 9))
@pytest.mark.parametrize("n", LENGTHS)
def test_segments_cover_prompt_exactly(method, n_workers, n):
    if n_workers > n:
        with pytest.raises(ValueError, match="at most"):
            SPLITS[method](n, n_workers)
    else:
        assert_cover(SPLITS[method](n, n_workers), n, n_workers)


def test_even_split_lengths_differ_by_at_most_one():
    segs = even_split(1003, 4)
    assert [s.length for s in segs] == [251, 251, 251, 250]


@pytest.mark.parametrize("n_workers", [2, 3, 4, 8])
@pytest.mark.parametrize("n", [4096, 32_768, 131_072, 1_000_000])
def test_balanced_earlier_segments_longer_and_costs_equal(n_workers, n):
    cost = CostModel()
    segs = balanced_split(n, n_workers, cost)
    lengths = [s.length for s in segs]
    assert lengths == sorted(lengths, reverse=True) and lengths[0] > lengths[-1]
    c = worker_costs(segs, cost)
    assert (max(c) - min(c)) / max(c) < 0.03, c
    even = even_split(n, n_workers)
    assert predicted_ttft(segs, cost) <= predicted_ttft(even, cost) * 1.01  # never worse beyond 1%


def test_balanced_follows_the_cost_model():
    # attention-free model: every token costs the same, so balanced == even.
    flat = CostModel(num_layers=4, linear=1.0, attn=0.0, xfer=0.0)
    assert [s.length for s in balanced_split(1000, 4, flat)] == [250, 250, 250, 250]
    # attention-heavy: the first segment is much longer than the last.
    heavy = CostModel(num_layers=4, linear=0.0, attn=1.0, xfer=0.0)
    segs = balanced_split(100_000, 2, heavy)
    assert segs[0].length / segs[1].length == pytest.approx(2.414, rel=0.01)  # 1 + sqrt(2)


def test_from_shape_of_llama3_8b_gives_the_default_cost_model():
    c = CostModel.from_shape(num_layers=32, hidden_size=4096, intermediate_size=14336,
                             num_heads=32, num_kv_heads=8, head_dim=128)
    assert c == CostModel()


def test_from_fractions_keeps_one_token_each():
    assert [s.length for s in from_fractions(10, [0.98, 0.01, 0.01])] == [8, 1, 1]
    assert_cover(from_fractions(12345, [0.5, 0.3, 0.2]), 12345, 3)


@pytest.mark.parametrize("split", sorted(SPLITS))
@pytest.mark.parametrize("n_workers", [0, -1, 1.5, True])
def test_bad_worker_count(split, n_workers):
    with pytest.raises(ValueError, match="number of workers must be an integer >= 1"):
        SPLITS[split](100, n_workers)


@pytest.mark.parametrize("split", sorted(SPLITS))
def test_bad_prompt_length(split):
    with pytest.raises(ValueError, match="prompt length must be an integer >= 1"):
        SPLITS[split](0, 2)


@pytest.mark.parametrize("split", sorted(SPLITS))
def test_more_workers_than_tokens(split):
    with pytest.raises(ValueError, match="cannot split 3 prompt tokens over 4 workers"):
        SPLITS[split](3, 4)


def test_cost_model_of_a_model_shape():
    from vllm_kvrunahead.core.partition import ModelShape

    llama3 = ModelShape(layers=32, hidden=4096, heads=32, kv_heads=8, intermediate=14336, head_dim=128)
    assert CostModel.for_shape(llama3) == CostModel.from_shape(
        num_layers=32, hidden_size=4096, intermediate_size=14336, num_heads=32, num_kv_heads=8, head_dim=128)
    assert CostModel.for_shape(None) == CostModel()


def test_fractions_of_segments_are_their_shares_of_what_they_cover():
    assert fractions_of(even_split(8, 2)) == (0.5, 0.5)
    assert fractions_of((Segment(0, 100, 103), Segment(1, 103, 104))) == (0.75, 0.25)


@pytest.mark.parametrize("fractions, n_workers, message", [
    ([0.5], 2, "override must be a list of 2 numbers"), ("ab", None, "override must be a list of numbers"),
    ([0.5, True], None, "override must all be finite and > 0"), ([1.0, 0.0], 2, "must all be finite and > 0"),
    ([0.5, float("nan")], 2, "must all be finite"), ([0.5, 0.6], 2, "must sum to 1, sum is 1.100000000")])
def test_check_fractions_refuses_what_is_not_a_split(fractions, n_workers, message):
    with pytest.raises(ValueError, match=message):
        check_fractions(fractions, n_workers, "override")


def test_check_fractions_gives_floats_of_a_split():
    assert check_fractions((1,)) == (1.0,) and type(check_fractions((1,))[0]) is float
    assert check_fractions([0.25, 0.75 + 1e-7], 2) == (0.25, 0.75 + 1e-7)


def test_bad_cost_model():
    with pytest.raises(ValueError, match="CostModel.attn must be >= 0"):
        balanced_split(100, 2, CostModel(attn=-1.0))


@pytest.mark.parametrize("n_workers", [2, 3, 4, 8])
@pytest.mark.parametrize("n", [1025, 4096, 32_768, 100_003])
@pytest.mark.parametrize("align", [16, 128])
def test_aligned_boundaries_are_whole_blocks(n_workers, n, align):
    from vllm_kvrunahead.core.partition import Chunk, align_bounds

    bounds = [float(s.end) for s in balanced_split(n, n_workers)[:-1]]
    if n < (n_workers - 1) * align + 1:
        with pytest.raises(ValueError, match="cannot cut"):
            align_bounds(Chunk(0, n, n), bounds, align)
        return
    segs = align_bounds(Chunk(0, n, n), bounds, align)
    assert_cover(segs, n, n_workers)
    for s in segs[:-1]:
        assert s.end % align == 0 and s.length >= align
    for a, b in zip(segs, balanced_split(n, n_workers)):
        assert abs(a.end - b.end) <= align  # nearest block boundary: balance barely moves


def test_fit_recovers_measured_one_gpu_ttft():
    # one-GPU TTFT measured on H200 (Llama-3-8B shape, vLLM 0.26.0, bf16; benchmarks/results)
    measured = {4096: 0.1011, 8192: 0.2104, 16384: 0.4927, 32768: 1.201, 65536: 3.265}
    fitted = CostModel.fit(measured, num_layers=32)
    for n, t in measured.items():
        assert predicted_ttft(even_split(n, 1), fitted) == pytest.approx(t, rel=0.05)
    default = CostModel()  # the shipped defaults came from this fit
    assert default.linear == pytest.approx(fitted.linear, rel=0.15)
    assert default.attn == pytest.approx(fitted.attn, rel=0.15)
    with pytest.raises(ValueError, match=">= 3 prompt lengths"):
        CostModel.fit({1: 1.0, 2: 2.0}, num_layers=2)


def test_cost_model_of_a_tensor_parallel_stage():
    """S stages of T TP ranks: a stage computes at TP=T speed plus two all-reduces per layer and token,
    and each rank moves 1/T of the KV (its KV heads) to the next stage."""
    from vllm_kvrunahead.core.partition import ModelShape

    llama3 = ModelShape(layers=32, hidden=4096, heads=32, kv_heads=8, intermediate=14336, head_dim=128)
    one, tp2 = CostModel.for_shape(llama3), CostModel.for_shape(llama3, 2)
    assert CostModel.for_shape(llama3, 1) == one and one.tensor_parallel(1, 4096) is one
    allreduce = 2 * (2 * 1 / 2) * 4096 * 2 / 300e9
    assert tp2.linear == pytest.approx(one.linear / 2 + allreduce)
    assert tp2.attn == pytest.approx(one.attn / 2) and tp2.xfer == pytest.approx(one.xfer / 2)
    assert (tp2.num_layers, tp2.hop) == (one.num_layers, one.hop)
    # a 2-stage chain of TP=2 stages beats one of single GPUs; the split still puts more tokens first
    n = 32_768
    s1, s2 = balanced_split(n, 2, one), balanced_split(n, 2, tp2)
    assert predicted_ttft(s2, tp2) < predicted_ttft(s1, one)
    assert s2[0].length > s2[1].length
    # 8 KV heads over 16 TP ranks: each rank holds (and moves) a copy of one KV head, 1/8 of the KV
    assert CostModel.for_shape(llama3, 16).xfer == pytest.approx(one.xfer / 8)
    with pytest.raises(ValueError, match="tp_size must be >= 1"):
        one.tensor_parallel(0, 4096)
