"""Wall time of every engine a test starts (engine runner, server, fault run, tuner), for the summary
``conftest.py`` prints at the end of a run: what CI's time goes to. Timings are printed, never asserted."""
from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

from benchmarks.serve_load import start_server, stop_server


@dataclass
class Engine:
    name: str
    kind: str          # "engine" (tests/engine_runner.py), "server", "fault", "tuner"
    ranks: int         # worker processes
    model: str
    start_s: float | None   # until the engine could take requests (None: not measured)
    total_s: float


STARTED: list[Engine] = []


def record(name: str, kind: str, ranks: int, model: str, start_s: float | None, total_s: float) -> None:
    STARTED.append(Engine(name, kind, ranks, Path(model).name, start_s, total_s))


_servers: dict[int, tuple[str, int, str, float, float]] = {}


def server(name: str, model: str, workers: int, *args, **kw):
    """benchmarks.serve_load.start_server, timed; end it with ``stop``."""
    t = time.monotonic()
    proc, base, log = start_server(model, workers, *args, **kw)
    _servers[proc.pid] = (name, workers, model, t, time.monotonic() - t)
    return proc, base, log


def stop(proc) -> None:
    stop_server(proc)
    name, ranks, model, t, start_s = _servers.pop(proc.pid)
    record(name, "server", ranks, model, start_s, time.monotonic() - t)


def summary_lines(limit: int = 100) -> list[str]:
    if not STARTED:
        return []
    total = sum(e.total_s for e in STARTED)
    kinds = {}
    for e in STARTED:
        kinds[e.kind] = kinds.get(e.kind, 0) + 1
    out = [f"{len(STARTED)} engines started ({', '.join(f'{n} {k}' for k, n in sorted(kinds.items()))}), "
           f"{total:.0f} s in all; slowest first (start: until it took requests; total: start to end):",
           f"{'name':<30} {'kind':<7} {'ranks':>5} {'model':<32} {'start s':>8} {'total s':>8}"]
    for e in sorted(STARTED, key=lambda e: -e.total_s)[:limit]:
        start = "-" if e.start_s is None else f"{e.start_s:.0f}"
        out.append(f"{e.name:<30} {e.kind:<7} {e.ranks:>5} {e.model:<32} {start:>8} {e.total_s:>8.0f}")
    return out
