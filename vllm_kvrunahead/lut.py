"""The paper's run-time form of load balancing: context length -> segment fractions.

A table is JSON::

    {"format": "kvrunahead-lut/1", "n_workers": 2,
     "model": {...}, "device": "...", "vllm_version": "0.26.0",      # descriptive
     "entries": [{"tokens": 8192, "fractions": [0.58, 0.42]}, ...]}   # tokens ascending

Between two entries the fractions are interpolated linearly in the token count;
outside the range the nearest entry is used. ``tune.py`` fills tables from
measured TTFT; this module only loads, validates and reads them.
"""
from __future__ import annotations

import bisect
import json
from dataclasses import dataclass
from pathlib import Path

from .partition import Segment, from_fractions

FORMAT = "kvrunahead-lut/1"


class TableError(ValueError):
    """A lookup table that cannot be used; the message names the file and the field."""


@dataclass(frozen=True)
class PartitionTable:
    n_workers: int
    tokens: tuple[int, ...]
    fractions: tuple[tuple[float, ...], ...]
    meta: tuple[tuple[str, str], ...] = ()
    source: str = "<memory>"

    @classmethod
    def from_dict(cls, d: object, source: str = "<memory>") -> "PartitionTable":
        def bad(msg: str) -> TableError:
            return TableError(f"lookup table {source}: {msg}")

        if not isinstance(d, dict):
            raise bad("top level must be a JSON object")
        if d.get("format") != FORMAT:
            raise bad(f"'format' must be {FORMAT!r}, got {d.get('format')!r}")
        n = d.get("n_workers")
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise bad(f"'n_workers' must be an integer >= 1, got {n!r}")
        entries = d.get("entries")
        if not isinstance(entries, list) or not entries:
            raise bad("'entries' must be a non-empty list")
        toks, fracs = [], []
        for i, e in enumerate(entries):
            if not isinstance(e, dict):
                raise bad(f"entries[{i}] must be an object")
            t, f = e.get("tokens"), e.get("fractions")
            if isinstance(t, bool) or not isinstance(t, int) or t < 1:
                raise bad(f"entries[{i}].tokens must be an integer >= 1, got {t!r}")
            if toks and t <= toks[-1]:
                raise bad(f"entries[{i}].tokens={t} must be greater than the previous {toks[-1]}")
            if not isinstance(f, list) or len(f) != n:
                raise bad(f"entries[{i}].fractions must be a list of {n} numbers")
            if not all(isinstance(x, (int, float)) and not isinstance(x, bool) and x > 0 for x in f):
                raise bad(f"entries[{i}].fractions must all be > 0, got {f}")
            if abs(sum(f) - 1.0) > 1e-6:
                raise bad(f"entries[{i}].fractions must sum to 1, sum is {sum(f):.9f}")
            toks.append(t)
            fracs.append(tuple(float(x) for x in f))
        meta = tuple(sorted((k, json.dumps(v)) for k, v in d.items() if k not in ("entries",)))
        return cls(n, tuple(toks), tuple(fracs), meta, source)

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

    def fractions_for(self, n: int) -> tuple[float, ...]:
        i = bisect.bisect_left(self.tokens, n)
        if i == 0:
            return self.fractions[0]
        if i == len(self.tokens):
            return self.fractions[-1]
        t0, t1 = self.tokens[i - 1], self.tokens[i]
        w = (n - t0) / (t1 - t0)
        f = [a + w * (b - a) for a, b in zip(self.fractions[i - 1], self.fractions[i])]
        s = sum(f)
        return tuple(x / s for x in f)

    def segments_for(self, n: int) -> tuple[Segment, ...]:
        return from_fractions(n, self.fractions_for(n))
