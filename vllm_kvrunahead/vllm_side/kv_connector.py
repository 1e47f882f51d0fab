"""The KV connector every KV-Runahead mode installs, as vLLM sees it: a worker-side connector (KV-Runahead
plans on the workers, so the scheduler side is unused) that carries the one stats record to vLLM's stats
path (``vllm_side/metrics.py``). The chain of copies' connector and the TP layout's guest connector build on it.
"""
from __future__ import annotations

from ..core.stats import RunaheadStats
from .metrics import KVRunaheadMetrics, KVRunaheadStats
from .seam import KVConnectorBase_V1, KVConnectorMetadata, KVConnectorRole


class WorkerConnector(KVConnectorBase_V1):
    """What every KV-Runahead connector is to vLLM: a worker-side connector (KV-Runahead plans on the
    workers, so the scheduler side is unused) that carries the one stats record to vLLM's stats path."""

    def __init__(self, vllm_config, kv_cache_config, stats: RunaheadStats):
        super().__init__(vllm_config, KVConnectorRole.WORKER, kv_cache_config)
        self.stats = stats

    # -- stats: vLLM reads the output rank's ---------------------------------
    def get_kv_connector_stats(self) -> KVRunaheadStats | None:
        data = self.stats.report()
        return KVRunaheadStats(data=data) if data else None

    @classmethod
    def build_kv_connector_stats(cls, data=None):
        return KVRunaheadMetrics.build_kv_connector_stats(data)

    @classmethod
    def build_prom_metrics(cls, vllm_config, metric_types, labelnames, per_engine_labelvalues):
        return KVRunaheadMetrics.build_prom_metrics(vllm_config, metric_types, labelnames, per_engine_labelvalues)

    # -- scheduler side: unused ---------------------------------------------
    def get_num_new_matched_tokens(self, request, num_computed_tokens):
        return 0, False

    def update_state_after_alloc(self, request, blocks, num_external_tokens):
        return None

    def build_connector_meta(self, scheduler_output):
        return KVConnectorMetadata()

    def request_finished_all_groups(self, request, block_ids):
        return False, None
