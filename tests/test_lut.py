import json

import pytest

from vllm_kvrunahead.lut import FORMAT, PartitionTable, TableError


def table(**kw):
    d = {"format": FORMAT, "n_workers": 2,
         "entries": [{"tokens": 1000, "fractions": [0.6, 0.4]},
                     {"tokens": 3000, "fractions": [0.7, 0.3]}]}
    d.update(kw)
    return d


def test_interpolates_between_entries_and_clamps_outside():
    t = PartitionTable.from_dict(table())
    assert t.fractions_for(2000) == pytest.approx((0.65, 0.35))
    assert t.fractions_for(1500) == pytest.approx((0.625, 0.375))
    assert t.fractions_for(10) == pytest.approx((0.6, 0.4))
    assert t.fractions_for(10**6) == pytest.approx((0.7, 0.3))
    segs = t.segments_for(2000)
    assert [s.length for s in segs] == [1300, 700]


def test_load_from_file(tmp_path):
    p = tmp_path / "t.json"
    p.write_text(json.dumps(table(device="H100")))
    t = PartitionTable.load(p)
    assert t.n_workers == 2 and t.tokens == (1000, 3000) and ("device", '"H100"') in t.meta


@pytest.mark.parametrize("change, message", [
    ({"format": "x"}, "'format' must be"),
    ({"n_workers": 0}, "'n_workers' must be an integer >= 1"),
    ({"entries": []}, "'entries' must be a non-empty list"),
    ({"entries": [{"tokens": 10, "fractions": [0.5]}]}, r"entries\[0\].fractions must be a list of 2"),
    ({"entries": [{"tokens": 10, "fractions": [0.5, 0.6]}]}, "must sum to 1"),
    ({"entries": [{"tokens": 10, "fractions": [1.0, 0.0]}]}, "must all be > 0"),
    ({"entries": [{"tokens": 0, "fractions": [0.5, 0.5]}]}, r"entries\[0\].tokens must be an integer >= 1"),
    ({"entries": [{"tokens": 10, "fractions": [0.5, 0.5]},
                  {"tokens": 10, "fractions": [0.5, 0.5]}]}, "must be greater than the previous"),
])
def test_malformed_tables_refused(change, message):
    with pytest.raises(TableError, match=message):
        PartitionTable.from_dict(table(**change))


def test_bad_files_refused(tmp_path):
    with pytest.raises(TableError, match="no such file"):
        PartitionTable.load(tmp_path / "missing.json")
    p = tmp_path / "bad.json"
    p.write_text("{not json")
    with pytest.raises(TableError, match="not valid JSON"):
        PartitionTable.load(p)
    p.write_text("[1, 2]")
    with pytest.raises(TableError, match="top level must be a JSON object"):
        PartitionTable.load(p)
