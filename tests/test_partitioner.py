"""Run-time choice of the split: shipped-table selection, fallbacks, overrides, refinement."""
import json

import pytest

from vllm_kvrunahead.core.lut import PartitionTable
from vllm_kvrunahead.core.partition import CostModel, ModelShape, balanced_split, even_split
from vllm_kvrunahead.core.partitioner import SHIPPED_TABLES, Partitioner, find_table
from vllm_kvrunahead.core.refine import Refiner

LLAMA3 = ModelShape(layers=32, hidden=4096, heads=32, kv_heads=8, intermediate=14336, head_dim=128)
LLAMA2 = ModelShape(layers=32, hidden=4096, heads=32, kv_heads=32, intermediate=11008, head_dim=128)
COST = CostModel()


def write(d, name, n=2, device="NVIDIA H200", shape=LLAMA3, fractions=(0.6, 0.4)):
    table = {"format": "kvrunahead-lut/1", "n_workers": n, "device": device,
             "model": dict(vars(shape), name="x"), "entries": [{"tokens": 1000, "fractions": list(fractions)}]}
    (d / name).write_text(json.dumps(table))
    return d / name


def test_auto_picks_the_table_for_this_shape_workers_and_device(tmp_path):
    write(tmp_path, "a.json", device="NVIDIA H100 80GB HBM3", fractions=(0.7, 0.3))
    write(tmp_path, "b.json", shape=LLAMA2, fractions=(0.8, 0.2))
    write(tmp_path, "c.json", n=3, fractions=(0.5, 0.3, 0.2))
    write(tmp_path, "d.json", fractions=(0.65, 0.35))  # the match
    p = Partitioner.build("auto", 2, COST, LLAMA3, "NVIDIA H200", tables_dir=tmp_path)
    assert p.table.source.endswith("d.json") and "d.json" in p.describe()
    assert p.fractions(1000) == (0.65, 0.35)
    # outside the table's lengths: the cost model, not the nearest entry
    assert p(5000) == balanced_split(5000, 2, COST) and p(500) == balanced_split(500, 2, COST)
    assert find_table(LLAMA2, 2, "NVIDIA H200", tmp_path).source.endswith("b.json")
    assert find_table(LLAMA3, 3, "NVIDIA H200", tmp_path).source.endswith("c.json")


def test_auto_falls_back_to_the_cost_model(tmp_path, kvr_log):
    write(tmp_path, "a.json", device="NVIDIA H100 80GB HBM3")
    (tmp_path / "broken.json").write_text("{not json")
    p = Partitioner.build("auto", 2, COST, LLAMA3, "NVIDIA H200", tables_dir=tmp_path)
    assert "broken.json" in kvr_log.text and "not valid JSON" in kvr_log.text  # skipped, loudly
    assert p.table is None and p.describe().startswith("auto: cost model")
    n = 30000
    assert p(n) == balanced_split(n, 2, COST)
    # an unusual model config (no shape) never matches a table
    assert Partitioner.build("auto", 2, COST, None, "NVIDIA H200", tables_dir=tmp_path).table is None


def test_methods():
    n = 30001
    assert Partitioner.build("even", 3, COST, LLAMA3, "cpu")(n) == even_split(n, 3)
    model = Partitioner.build("model", 3, COST, LLAMA3, "cpu")
    assert model(n) == balanced_split(n, 3, COST)
    assert model(n)[0].length > model(n)[-1].length
    with pytest.raises(ValueError, match="unknown partition 'fast'"):
        Partitioner("fast", 2, COST)


def test_explicit_table_used_even_when_tuned_elsewhere(tmp_path, kvr_log):
    path = write(tmp_path, "t.json", device="NVIDIA H100 80GB HBM3", shape=LLAMA2, fractions=(0.55, 0.45))
    p = Partitioner.build("table", 2, COST, LLAMA3, "NVIDIA H200", table_path=str(path))
    assert p.fractions(1000) == (0.55, 0.45)
    assert "tuned for device NVIDIA H100 80GB HBM3" in kvr_log.text and "tuned for model" in kvr_log.text
    with pytest.raises(ValueError, match="is for 2 workers, not 3"):
        Partitioner.build("table", 3, COST, LLAMA3, "cpu", table_path=str(path))


def test_override_and_refiner():
    p = Partitioner("model", 2, COST, refiner=Refiner(2))
    base = p.fractions(40000)
    p.set_override([0.5, 0.5])
    assert p.fractions(40000) == (0.5, 0.5)
    with pytest.raises(ValueError, match="sum to 1"):
        p.set_override([0.5, 0.6])
    p.set_override(None)
    assert p.fractions(40000) == base
    # the head (last) is slower: refinement moves tokens to the first worker, this bucket only
    assert p.refiner.observe(40000, base, [1.0, 1.3], p.base_fractions(40000))
    assert p.fractions(40000)[0] > base[0] and p.fractions(4000) == p.base_fractions(4000)


def test_shipped_tables_load_and_are_found_by_their_own_key():
    files = sorted(SHIPPED_TABLES.glob("*.json"))
    assert files, "no shipped tables"
    for f in files:
        t = PartitionTable.load(f)
        shape = ModelShape(**{k: v for k, v in t.info("model").items() if k != "name"})
        found = find_table(shape, t.n_workers, t.info("device"))
        assert found is not None and found.source == str(f), f
        assert t.info("vllm_version") and t.info("measured"), f  # says where its numbers come from


def test_lone_chunk_after_cached_tokens_uses_the_table_where_it_measured_that_offset():
    from vllm_kvrunahead.core.partition import Chunk, align_bounds, balanced_step_bounds
    table = PartitionTable.from_dict({
        "format": "kvrunahead-lut/2", "n_workers": 2,
        "entries": [{"tokens": 1000, "fractions": [0.6, 0.4]}, {"tokens": 4000, "fractions": [0.6, 0.4]},
                    {"offset": 8192, "tokens": 1000, "fractions": [0.3, 0.7]},
                    {"offset": 8192, "tokens": 4000, "fractions": [0.3, 0.7]}]}, "t.json")
    p = Partitioner("table", 2, COST, table, block_size=16)
    assert "t.json" in p.describe() and "after 8192 cached" in p.describe()

    def split(chunk, head_only=()):
        return p.split_step([chunk], list(head_only))[0]

    def model(chunk, head_only=()):
        extra = sum(COST.layer_compute(c.start, c.end) for c in head_only)
        return align_bounds(chunk, balanced_step_bounds([chunk], 2, COST, extra)[0], 16)

    at = Chunk(8192, 8192 + 2000, 8192 + 2000)
    assert [(s.start, s.end) for s in split(at)] == [(8192, 8192 + 608), (8192 + 608, 10192)]  # 0.3: 600, to a block
    between = Chunk(4096, 4096 + 2000, 6096)                                         # half way: 0.45
    assert split(between)[0].end == 4096 + 896
    assert split(Chunk(0, 2000, 2000))[0].end == 1200                                 # cold: unchanged
    # outside the measured offsets or lengths, with other work on the head: the cost model
    for chunk, head_only in [(Chunk(9000, 11000, 11000), ()), (Chunk(8192, 8192 + 6000, 14192), ()),
                             (at, [Chunk(50, 51, 100)])]:
        assert split(chunk, head_only) == model(chunk, head_only), chunk
        assert split(chunk, head_only)[0].length != 608
    # a cold-only table leaves offset chunks to the cost model, as before
    cold = Partitioner("table", 2, COST, PartitionTable.from_dict(
        {"format": "kvrunahead-lut/1", "n_workers": 2, "entries": [{"tokens": 1000, "fractions": [0.3, 0.7]},
                                                                  {"tokens": 4000, "fractions": [0.3, 0.7]}]}),
        block_size=16)
    assert cold.split_step([at], [])[0] == model(at) and cold.split_step([Chunk(0, 2000, 2000)], [])[0][0].end == 608


def test_override_cuts_a_lone_chunk_at_any_offset():
    from vllm_kvrunahead.core.partition import Chunk
    p = Partitioner("model", 2, COST, block_size=16)
    chunk = Chunk(8192, 8192 + 2000, 10192, held=(4096,))
    before = p.split_step([chunk], [])[0]
    p.set_override([0.8, 0.2])
    assert p.split_step([chunk], [])[0][0].end == 8192 + 1600 != before[0].end
    assert p.split_step([Chunk(0, 2000, 2000)], [])[0][0].end == 1600
    # not with other work in the step: that is balanced as one job
    assert p.split_step([chunk, Chunk(0, 2000, 2000)], [])[0][0].end != 8192 + 1600
    p.set_override(None)
    assert p.split_step([chunk], [])[0] == before
