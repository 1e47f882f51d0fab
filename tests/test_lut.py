import json

import pytest

from vllm_kvrunahead.core.lut import FORMAT, PartitionTable, TableError


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
    ({"entries": [{"tokens": 10, "fractions": [1.0, 0.0]}]}, "must all be finite and > 0"),
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


# -- entries after cached tokens (offset) ---------------------------------------------------------

def offset_table(**kw):
    d = {"format": FORMAT, "n_workers": 2,
         "entries": [{"tokens": 1000, "fractions": [0.6, 0.4]},
                     {"tokens": 3000, "fractions": [0.7, 0.3]},
                     {"offset": 4000, "tokens": 1000, "fractions": [0.4, 0.6]},
                     {"offset": 4000, "tokens": 2000, "fractions": [0.5, 0.5]}]}
    d.update(kw)
    return d


def test_offset_rows_interpolate_in_tokens_then_offset():
    t = PartitionTable.from_dict(offset_table())
    assert t.offsets == (0, 4000) and t.tokens == (1000, 3000) and t.row(4000).tokens == (1000, 2000)
    # at a measured offset: that row only
    assert t.fractions_for(1500, 4000) == pytest.approx((0.45, 0.55))
    assert t.fractions_for(1000) == pytest.approx((0.6, 0.4))
    # between offsets: each row at 1500 tokens ((0.625, 0.375) and (0.45, 0.55)), then 1/4 of the way
    assert t.fractions_for(1500, 1000) == pytest.approx((0.58125, 0.41875))
    # beyond the last offset: the nearest row
    assert t.fractions_for(1000, 9000) == pytest.approx((0.4, 0.6))


def test_covers_only_what_was_measured():
    t = PartitionTable.from_dict(offset_table())
    assert t.covers(1000) and t.covers(3000) and not t.covers(999) and not t.covers(3001)
    assert t.covers(2000, 4000) and not t.covers(2500, 4000)
    # between offsets the token range both rows measured
    assert t.covers(1500, 2000) and not t.covers(2500, 2000)
    assert not t.covers(1500, 4001)
    cold = PartitionTable.from_dict(table())
    assert cold.covers(2000) and not cold.covers(2000, 128)      # a cold-only table: offsets are not its
    later = PartitionTable.from_dict(offset_table(entries=offset_table()["entries"][2:]))
    assert later.tokens == () and not later.covers(1000) and later.covers(1000, 4000)


def test_version_1_tables_still_load_and_refuse_offsets():
    t = PartitionTable.from_dict(table(format="kvrunahead-lut/1"))
    assert t.offsets == (0,) and t.fractions_for(2000) == pytest.approx((0.65, 0.35))
    with pytest.raises(TableError, match=r"entries\[2\].offset needs 'format' 'kvrunahead-lut/2'"):
        PartitionTable.from_dict(offset_table(format="kvrunahead-lut/1"))


@pytest.mark.parametrize("entries, message", [
    ([{"offset": -1, "tokens": 10, "fractions": [0.5, 0.5]}], r"entries\[0\].offset must be an integer >= 0, got -1"),
    ([{"offset": 1.5, "tokens": 10, "fractions": [0.5, 0.5]}], r"entries\[0\].offset must be an integer"),
    ([{"offset": True, "tokens": 10, "fractions": [0.5, 0.5]}], r"entries\[0\].offset must be an integer"),
    ([{"offset": "8", "tokens": 10, "fractions": [0.5, 0.5]}], r"entries\[0\].offset must be an integer"),
    ([{"offset": 8, "tokens": 10, "fractions": [0.5, 0.5]},
      {"offset": 8, "tokens": 10, "fractions": [0.6, 0.4]}], r"entries\[1\].tokens=10 must be greater than the "
                                                             r"previous 10 at offset 8"),
    ([{"offset": 8, "tokens": 10, "fractions": [0.5, 0.5]},
      {"tokens": 20, "fractions": [0.5, 0.5]}], r"entries\[1\].offset=0 must not be less than the previous 8"),
])
def test_malformed_offsets_refused(entries, message):
    with pytest.raises(TableError, match=message) as e:
        PartitionTable.from_dict(offset_table(entries=entries), "t.json")
    assert "lookup table t.json" in str(e.value)
