"""KV-Runahead's figures on vLLM's own stats path: its periodic stats log line and `/metrics`.

The output rank's KV connector returns ``stats.RunaheadStats.report()`` from ``get_kv_connector_stats`` every
step; vLLM carries it from the output rank to the scheduler's stats and on to the front end, where
``KVRunaheadStats`` sums an interval for the log line and ``KVRunaheadPromMetrics`` records it with
vLLM's labels (``model_name``, ``engine``) plus the metric's own (``start``, ``reason``, ``position``).
vLLM finds these classes through the KV transfer config, which a KV-Runahead engine does not set
(that would turn on vLLM's KV-transfer machinery); the registered patch
``kv-connector-metrics-know-kvrunahead`` points its two metrics classes here instead.
"""
from __future__ import annotations

from typing import Any

from ..core.stats import MARK
from .seam import KVConnectorPromMetrics, KVConnectorStats

PREFIX = "vllm:kv_runahead_"
# seconds: the tiny CPU model's steps (~1 ms) up to a long prompt's on a GPU (~1 s at 64k)
TIME_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


def is_kvrunahead_data(data: dict | None) -> bool:
    return isinstance(data, dict) and MARK in data


def _add(a, b):
    if isinstance(a, dict):
        return {k: a.get(k, 0) + b.get(k, 0) for k in a.keys() | b.keys()}
    if isinstance(a, list) and a and isinstance(a[0], list):  # observations: per step, per position
        return a + b
    if isinstance(a, list):
        return [x + y for x, y in zip(a, b)]
    return a + b


class KVRunaheadStats(KVConnectorStats):
    """One interval's figures (``data``: ``RunaheadStats.report()``'s, summed)."""

    def reset(self) -> None:
        self.data = {}

    def is_empty(self) -> bool:
        return not any(k != MARK for k in self.data)

    def aggregate(self, other: KVConnectorStats) -> KVConnectorStats:
        for k, v in other.data.items():
            self.data[k] = v if k not in self.data or k == MARK else _add(self.data[k], v)
        return self

    def reduce(self) -> dict[str, Any]:
        d = self.data

        def per_pos(key, scale=1.0):
            return "/".join(f"{x * scale:.4g}" for x in d.get(key, ())) or "0"

        steps = d.get("step_seconds", [])
        return {
            "KV-Runahead chunks ahead cold/cached": f"{d.get('chunks_ahead_cold', 0)}/{d.get('chunks_ahead_cached', 0)}",
            "tokens ahead cold/cached": f"{d.get('tokens_ahead_cold', 0)}/{d.get('tokens_ahead_cached', 0)}",
            "chunks not ahead": ", ".join(f"{k} {v}" for k, v in sorted(d.get("chunks_not_ahead", {}).items())) or "0",
            "prefix tokens held/sent": f"{d.get('prefix_tokens_held', 0)}/{d.get('prefix_tokens_sent', 0)}",
            "KV MB sent per position": per_pos("kv_bytes_sent", 2 ** -20),
            "tokens per position": per_pos("segment_tokens"),
            **({"max step ms per position": "/".join(f"{max(s[p] for s in steps) * 1e3:.3g}"
                                                      for p in range(len(steps[0])))} if steps else {}),
        }


class KVRunaheadPromMetrics(KVConnectorPromMetrics):
    """`/metrics`: counters per interval's figures, histograms of per-position step and stall times."""

    def __init__(self, vllm_config, metric_types, labelnames: list[str], per_engine_labelvalues: dict[int, list]):
        super().__init__(vllm_config, metric_types, labelnames, per_engine_labelvalues)

        def counter(name, doc, extra=()):
            return self._counter_cls(name=PREFIX + name, documentation=doc, labelnames=[*labelnames, *extra])

        def histogram(name, doc):
            return self._histogram_cls(name=PREFIX + name, documentation=doc, buckets=list(TIME_BUCKETS),
                                       labelnames=[*labelnames, "position"])

        self.chunks_ahead = counter("chunks_ahead", "Prefill chunks that ran ahead (start: cold, or after "
                                    "cached tokens)", ["start"])
        self.tokens_ahead = counter("tokens_ahead", "Tokens of prefill chunks that ran ahead", ["start"])
        self.chunks_not_ahead = counter("chunks_not_ahead", "Prefill chunks vLLM's own model computed (the "
                                        "head, or the TP model), by reason", ["reason"])
        self.prefix_held = counter("prefix_tokens_held", "Cached-prefix tokens positions held from earlier "
                                   "steps and were not sent")
        self.prefix_sent = counter("prefix_tokens_sent", "Cached-prefix tokens positions received")
        self.bytes_sent = counter("kv_bytes_sent", "KV bytes a position sent", ["position"])
        self.bytes_received = counter("kv_bytes_received", "KV bytes a position received", ["position"])
        self.segment_tokens = counter("segment_tokens", "Tokens a position computed in runahead chunks "
                                      "(the split in use)", ["position"])
        self.step_seconds = histogram("step_seconds", "Runahead step time per chain position (profile on)")
        self.stall_seconds = histogram("recv_stall_seconds", "Time a chain position waited for KV in a "
                                       "runahead step (profile on)")

    def observe(self, transfer_stats_data: dict[str, Any], engine_idx: int = 0) -> None:
        d = transfer_stats_data
        if not is_kvrunahead_data(d):
            return
        labels = self.per_engine_labelvalues[engine_idx]

        def inc(metric, value, *extra):
            if value:
                metric.labels(*labels, *map(str, extra)).inc(value)

        for start in ("cold", "cached"):
            inc(self.chunks_ahead, d.get(f"chunks_ahead_{start}", 0), start)
            inc(self.tokens_ahead, d.get(f"tokens_ahead_{start}", 0), start)
        for reason, n in d.get("chunks_not_ahead", {}).items():
            inc(self.chunks_not_ahead, n, reason)
        inc(self.prefix_held, d.get("prefix_tokens_held", 0))
        inc(self.prefix_sent, d.get("prefix_tokens_sent", 0))
        for metric, key in ((self.bytes_sent, "kv_bytes_sent"), (self.bytes_received, "kv_bytes_received"),
                            (self.segment_tokens, "segment_tokens")):
            for pos, v in enumerate(d.get(key) or ()):
                inc(metric, v, pos)
        for metric, key in ((self.step_seconds, "step_seconds"), (self.stall_seconds, "stall_seconds")):
            for per_pos in d.get(key, ()):
                for pos, s in enumerate(per_pos):
                    metric.labels(*labels, str(pos)).observe(s)


class KVRunaheadMetrics:
    """What vLLM's metrics classes ask a KV connector class for (``KVRunaheadConnector`` says the same)."""

    @classmethod
    def build_kv_connector_stats(cls, data: dict[str, Any] | None = None) -> KVRunaheadStats | None:
        return KVRunaheadStats(data=dict(data)) if is_kvrunahead_data(data) else None

    @classmethod
    def build_prom_metrics(cls, vllm_config, metric_types, labelnames, per_engine_labelvalues):
        return KVRunaheadPromMetrics(vllm_config, metric_types, labelnames, per_engine_labelvalues)


