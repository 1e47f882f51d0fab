"""vLLM's KV-connector metrics find KV-Runahead's classes for a KV-Runahead engine.

vLLM's stats log line and `/metrics` show a KV connector's figures through the connector class that
``kv_transfer_config`` names. A KV-Runahead engine leaves that config unset: setting it would also
switch on vLLM's KV-transfer machinery (a scheduler-side connector, replies from every worker, an extra
reserved CPU core, connector-aware attention selection, a refusal of expandable_segments), none of
which the chain needs.
"""
from __future__ import annotations

from . import Patch, wrap_method


def _apply() -> None:
    from vllm.distributed.kv_transfer.kv_connector.v1 import metrics

    def make_observe(orig):
        def observe(self, transfer_stats_data):
            from ..metrics import KVRunaheadMetrics, is_kvrunahead_data

            if getattr(self, "connector_cls", None) is None and is_kvrunahead_data(transfer_stats_data):
                self.connector_cls = KVRunaheadMetrics
            return orig(self, transfer_stats_data)
        return observe

    def make_init(orig):
        def __init__(self, vllm_config, labelnames, per_engine_labelvalues):
            orig(self, vllm_config, labelnames, per_engine_labelvalues)
            from ...config import COPIES, TP_LAYOUT, mode_of
            from ..metrics import KVRunaheadMetrics

            if self.prom_metrics is None and mode_of(vllm_config) in (COPIES, TP_LAYOUT):
                types = {metrics.Gauge: self._gauge_cls, metrics.Counter: self._counter_cls,
                         metrics.Histogram: self._histogram_cls}
                self.prom_metrics = KVRunaheadMetrics.build_prom_metrics(vllm_config, types, labelnames,
                                                                         per_engine_labelvalues)
        return __init__

    wrap_method(metrics.KVConnectorLogging, "observe", make_observe)
    wrap_method(metrics.KVConnectorProm, "__init__", make_init)


PATCH = Patch(
    name="kv-connector-metrics-know-kvrunahead",
    symbol="vllm.distributed.kv_transfer.kv_connector.v1.metrics.KVConnectorLogging.observe, "
           "KVConnectorProm.__init__",
    why="vLLM logs and exports a KV connector's stats through the class its kv_transfer_config names. "
        "KV-Runahead's connector is installed by its workers without that config (setting it would switch "
        "on vLLM's KV-transfer machinery: a scheduler-side connector, replies from every worker, an extra "
        "reserved CPU core, a refusal of expandable_segments), so the front end would not know the class "
        "and its stats log would fail on the head's figures.",
    how="Wraps KVConnectorLogging.observe: when no connector class is configured and the figures are "
        "KV-Runahead's (their 'kv_runahead' key), uses KV-Runahead's stats class. Wraps KVConnectorProm."
        "__init__: for a KV-Runahead engine of N > 1 workers without a configured connector, registers "
        "KV-Runahead's Prometheus metrics with vLLM's labels. Plain vLLM and other connectors are untouched.",
    upstream="Not upstream: vLLM resolves connector metrics only from kv_transfer_config.",
    remove_when="vLLM lets a worker-installed connector declare its stats and metrics classes, or "
                "KV-Runahead's connector is configured through kv_transfer_config without side effects.",
    apply=_apply,
)
