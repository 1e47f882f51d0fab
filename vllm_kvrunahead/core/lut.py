"""The paper's run-time form of load balancing: (cached tokens, new tokens) -> segment fractions.

A table is JSON::

    {"format": "kvrunahead-lut/2", "n_workers": 2,
     "model": {...}, "device": "...", "vllm_version": "0.26.0",      # descriptive
     "entries": [{"tokens": 8192, "fractions": [0.58, 0.42]},          # a cold prompt
                 {"offset": 8192, "tokens": 4096, "fractions": [0.47, 0.53]}, ...]}

An entry is the split of a chunk of ``tokens`` new tokens after ``offset`` tokens whose KV is
cached already (a prefix-cache hit, a conversation's earlier turns; default 0: a cold prompt).
``fractions`` are of the new tokens, in chain order. Entries ascend by offset, then by tokens.

Format ``kvrunahead-lut/1`` (the shipped tables, and what ``tune`` writes when it measured cold
prompts only) is the same without ``offset``; it still loads. A table with offsets must say
``/2``, so a plugin that only knows ``/1`` refuses it instead of cutting cold prompts by an
offset row.

Lookup of (offset c, tokens m): within one offset row the fractions are interpolated linearly in
m, and between the two measured offsets around c linearly in c (outside: the nearest row, the
nearest entry). ``covers`` says whether (c, m) lies inside what was measured; outside it the
partitioner uses the cost model. ``tools/tune.py`` fills tables from measured TTFT; this module only
loads, validates and reads them.
"""
from __future__ import annotations

import bisect
import json
from dataclasses import dataclass
from pathlib import Path

from .partition import check_fractions

FORMAT = "kvrunahead-lut/2"
FORMAT_COLD = "kvrunahead-lut/1"   # entries without offsets only
FORMATS = (FORMAT_COLD, FORMAT)

Fractions = tuple[float, ...]


class TableError(ValueError):
    """A lookup table that cannot be used; the message names the file and the field."""


@dataclass(frozen=True)
class Row:
    """The entries measured at one offset, tokens ascending."""

    offset: int
    tokens: tuple[int, ...]
    fractions: tuple[Fractions, ...]

    def covers(self, m: int) -> bool:
        return self.tokens[0] <= m <= self.tokens[-1]

    def fractions_for(self, m: int) -> Fractions:
        i = bisect.bisect_left(self.tokens, m)
        if i == 0:
            return self.fractions[0]
        if i == len(self.tokens):
            return self.fractions[-1]
        t0, t1 = self.tokens[i - 1], self.tokens[i]
        return _mix(self.fractions[i - 1], self.fractions[i], (m - t0) / (t1 - t0))


def _mix(a: Fractions, b: Fractions, w: float) -> Fractions:
    f = [x + w * (y - x) for x, y in zip(a, b)]
    s = sum(f)
    return tuple(x / s for x in f)


@dataclass(frozen=True)
class PartitionTable:
    n_workers: int
    rows: tuple[Row, ...]   # offsets ascending
    meta: tuple[tuple[str, str], ...] = ()
    source: str = "<memory>"

    @classmethod
    def from_dict(cls, d: object, source: str = "<memory>") -> "PartitionTable":
        def bad(msg: str) -> TableError:
            return TableError(f"lookup table {source}: {msg}")

        def is_int(x) -> bool:
            return isinstance(x, int) and not isinstance(x, bool)

        if not isinstance(d, dict):
            raise bad("top level must be a JSON object")
        if d.get("format") not in FORMATS:
            raise bad(f"'format' must be {FORMAT!r} (or {FORMAT_COLD!r} without offsets), got {d.get('format')!r}")
        n = d.get("n_workers")
        if not is_int(n) or n < 1:
            raise bad(f"'n_workers' must be an integer >= 1, got {n!r}")
        entries = d.get("entries")
        if not isinstance(entries, list) or not entries:
            raise bad("'entries' must be a non-empty list")
        rows: dict[int, tuple[list, list]] = {}
        prev_offset = 0
        for i, e in enumerate(entries):
            if not isinstance(e, dict):
                raise bad(f"entries[{i}] must be an object")
            o, t, f = e.get("offset", 0), e.get("tokens"), e.get("fractions")
            if "offset" in e and d["format"] == FORMAT_COLD:
                raise bad(f"entries[{i}].offset needs 'format' {FORMAT!r}; {FORMAT_COLD!r} has cold entries only")
            if not is_int(o) or o < 0:
                raise bad(f"entries[{i}].offset must be an integer >= 0, got {o!r}")
            if o < prev_offset:
                raise bad(f"entries[{i}].offset={o} must not be less than the previous {prev_offset} "
                          "(entries ascend by offset, then tokens)")
            if not is_int(t) or t < 1:
                raise bad(f"entries[{i}].tokens must be an integer >= 1, got {t!r}")
            toks, fracs = rows.setdefault(o, ([], []))
            if toks and t <= toks[-1]:
                raise bad(f"entries[{i}].tokens={t} must be greater than the previous {toks[-1]} at offset {o}")
            try:
                fracs.append(check_fractions(f, n, f"entries[{i}].fractions"))
            except ValueError as e:
                raise bad(str(e)) from None
            toks.append(t)
            prev_offset = o
        meta = tuple(sorted((k, json.dumps(v)) for k, v in d.items() if k not in ("entries",)))
        return cls(n, tuple(Row(o, tuple(t), tuple(f)) for o, (t, f) in sorted(rows.items())), meta, source)

    @classmethod
    def load(cls, path: str | Path) -> "PartitionTable":
        path = Path(path)
        try:
            d = json.loads(path.read_text())
        except FileNotFoundError:
            raise TableError(f"lookup table {path}: no such file") from None
        except json.JSONDecodeError as e:
            raise TableError(f"lookup table {path}: not valid JSON ({e})") from None
        return cls.from_dict(d, str(path))

    def info(self, key: str):
        """A descriptive field of the JSON ("device", "model", ...), or None."""
        for k, v in self.meta:
            if k == key:
                return json.loads(v)
        return None

    @property
    def offsets(self) -> tuple[int, ...]:
        return tuple(r.offset for r in self.rows)

    def row(self, offset: int) -> Row | None:
        """The entries measured at exactly this offset, or None."""
        return next((r for r in self.rows if r.offset == offset), None)

    @property
    def tokens(self) -> tuple[int, ...]:
        """Token counts of the cold entries (offset 0); () when the table has none."""
        r = self.row(0)
        return r.tokens if r else ()

    def _around(self, offset: int) -> tuple[Row, Row]:
        """The measured rows at or next to ``offset`` on either side (the same row twice at or outside the ends)."""
        i = bisect.bisect_left(self.offsets, offset)
        if i < len(self.rows) and self.rows[i].offset == offset:
            return self.rows[i], self.rows[i]
        return self.rows[max(i - 1, 0)], self.rows[min(i, len(self.rows) - 1)]

    def covers(self, tokens: int, offset: int = 0) -> bool:
        """Whether (offset, tokens) lies inside what was measured: between two measured offsets (or at
        one), and within the token range of the row(s) it is interpolated from."""
        if not self.rows[0].offset <= offset <= self.rows[-1].offset:
            return False
        lo, hi = self._around(offset)
        return lo.covers(tokens) and hi.covers(tokens)

    def fractions_for(self, tokens: int, offset: int = 0) -> Fractions:
        lo, hi = self._around(offset)
        a = lo.fractions_for(tokens)
        if lo is hi:
            return a
        return _mix(a, hi.fractions_for(tokens), (offset - lo.offset) / (hi.offset - lo.offset))
