"""Let vLLM's executors start N workers whose PCP was set back to 1.

MultiprocExecutor (and RayExecutorV2, its subclass) assert
world_size == TP x PP x PCP. After ``config_hook`` the N KV-Runahead workers
(stages; with --tensor-parallel-size T, N x T workers) are world_size = N x T with
PCP = 1, so the check is answered with the KV-Runahead stage count in PCP's place
(TP x 1 x N = world_size). Nothing else reads these sizes.
"""
from __future__ import annotations

from ...config import COPIES, mode_of
from . import Patch, wrap_method


def _apply() -> None:
    from vllm.v1.executor.multiproc_executor import MultiprocExecutor

    def make(orig):
        def _get_parallel_sizes(self):
            tp, pp, pcp = orig(self)
            if mode_of(self.vllm_config) != COPIES:
                return tp, pp, pcp
            return tp, pp, self.vllm_config.additional_config["kv_runahead"]["num_workers"]
        return _get_parallel_sizes

    wrap_method(MultiprocExecutor, "_get_parallel_sizes", make)


PATCH = Patch(
    name="executor-counts-kvrunahead-workers",
    symbol="vllm.v1.executor.multiproc_executor.MultiprocExecutor._get_parallel_sizes",
    why="The mp and Ray (V2) executors assert world_size == TP x PP x PCP; KV-Runahead's N workers "
        "run with PCP=1 (see pcp-flag-starts-kvrunahead-workers).",
    how="Wraps _get_parallel_sizes to report the KV-Runahead worker count in PCP's place for the chain of "
        "copies (the engine's mode, config.mode_of); otherwise unchanged.",
    upstream="Not upstream; goes away with the config hook.",
    remove_when="Together with pcp-flag-starts-kvrunahead-workers.",
    apply=_apply,
)
