"""On CPU, vLLM's linear layers keep their weight while a TP layout with a peer guest loads.

vLLM's CPU linear layers pack their weight into a oneDNN handle when the model is loaded and drop the
parameter (``dispatch_cpu_unquantized_gemm(layer, remove_weight=True)``, called by
``UnquantizedLinearMethod.process_weights_after_loading``). The peer guest gathers every decoder layer's
weights from the N ranks' TP shards, so each rank's shard must stay readable. GPUs keep it anyway.
"""
from __future__ import annotations

import contextlib

from . import Patch, wrap_method

_keep = [False]


@contextlib.contextmanager
def keeping_linear_weights(keep: bool):
    """vLLM's CPU linear layers loaded inside the block keep their weight (``keep``) as well as the packed copy."""
    saved, _keep[0] = _keep[0], keep
    try:
        yield
    finally:
        _keep[0] = saved


def _apply() -> None:
    from vllm.model_executor.layers import utils

    def make(orig):
        def dispatch_cpu_unquantized_gemm(layer, remove_weight: bool) -> None:
            return orig(layer, remove_weight=remove_weight and not _keep[0])
        return dispatch_cpu_unquantized_gemm

    wrap_method(utils, "dispatch_cpu_unquantized_gemm", make)


PATCH = Patch(
    name="cpu-linear-keeps-weight-for-peer-guest",
    symbol="vllm.model_executor.layers.utils.dispatch_cpu_unquantized_gemm",
    why="On CPU vLLM drops each linear layer's weight once it has packed it for oneDNN; the TP layout's peer "
        "guest gathers each decoder layer from every rank's TP shard of it, which must stay readable.",
    how="Wraps the module function (linear.py imports it from the module at call time): while the worker "
        "loads vLLM's model for a peer guest (keeping_linear_weights), it is called with remove_weight=False; "
        "vLLM's GEMM still runs the packed handle, so its numerics do not change. CPU memory holds the shard "
        "twice (weight and packed copy). Otherwise untouched.",
    upstream="Not upstream: the weight is dropped to save memory; no option keeps it.",
    remove_when="vLLM's CPU linear layers keep a readable weight (or expose the packed handle's source).",
    apply=_apply,
)
