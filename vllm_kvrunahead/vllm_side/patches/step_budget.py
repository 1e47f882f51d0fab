"""Give KV-Runahead a step budget that scales with its workers when the user sets none.

vLLM's default ``max_num_batched_tokens`` (16384 for ``LLM``, 8192 for ``vllm serve`` on
H100/H200-class GPUs) is sized for one GPU's step. KV-Runahead splits each prefill chunk
over N workers, so at that budget a 64k prompt is cut into 4 steps whose segments are a
quarter of what one GPU handles well, and each step pays the chain's fixed cost
(measured: ``budget.py``). With N x vLLM's default each worker's segment stays near vLLM's
per-GPU step size, as vLLM itself does for CPU workers (its CPU default is per-worker
budget x world size), and the interleaved decodes of other requests wait about as long
as with one GPU at vLLM's default.

Both modes: the chain of copies (N = --prefill-context-parallel-size) and the TP layout (N =
--tensor-parallel-size), whose chunks pay more per step than the chain's (vLLM's TP forward of the
last token, the prefix gather of a later chunk; est. 5-15% behind TP=4 for a 64k prompt in 4 chunks,
shared/reviews/tp-layout-review-2026-12-07.md section 2) and where vLLM's own TP=N prefill of a chunk
TP wins also runs faster at N x the budget (est. 2-6%, docs/tp-layout-cost.md).
"""
from __future__ import annotations

from ...config import ADDITIONAL_CONFIG_KEY, RUNAHEAD_MODES, flags_mode, flags_workers
from ...log import logger
from . import Patch, wrap_method


def _apply() -> None:
    from vllm.engine.arg_utils import EngineArgs

    def make(orig):
        def _set_default_max_num_seqs_and_batched_tokens_args(self, usage_context, model_config, parallel_config):
            user_set = self.max_num_batched_tokens is not None
            orig(self, usage_context, model_config, parallel_config)
            mode = flags_mode(self.worker_cls, self.prefill_context_parallel_size, self.tensor_parallel_size)
            if user_set or mode not in RUNAHEAD_MODES:
                return
            n = flags_workers(mode, self.prefill_context_parallel_size, self.tensor_parallel_size)
            default = self.max_num_batched_tokens
            self.max_num_batched_tokens = min(default * n, self.max_num_seqs * model_config.max_model_len)
            # Each step takes vLLM's default, and more only for the first prompt in line (budget.py).
            extra = dict(self.additional_config or {})
            options = extra.get(ADDITIONAL_CONFIG_KEY)
            if options is None or isinstance(options, dict):
                options = dict(options or {})
                options.setdefault("step_budget", min(default, self.max_num_batched_tokens))
                extra[ADDITIONAL_CONFIG_KEY] = options
                self.additional_config = extra
            logger.info("KV-Runahead: step budget max_num_batched_tokens=%d (vLLM's default %d x %d workers) for "
                        "the first prompt in line, %d for the rest of a step; --max-num-batched-tokens sets a "
                        "fixed one", self.max_num_batched_tokens, default, n,
                        options.get("step_budget") if isinstance(options, dict) else default)
        return _set_default_max_num_seqs_and_batched_tokens_args

    wrap_method(EngineArgs, "_set_default_max_num_seqs_and_batched_tokens_args", make)


PATCH = Patch(
    name="step-budget-scales-with-workers",
    symbol="vllm.engine.arg_utils.EngineArgs._set_default_max_num_seqs_and_batched_tokens_args",
    why="vLLM's default step budget is one GPU's; with KV-Runahead each chunk is split N ways, so a long "
        "prompt runs as many small chunks that each pay the chain's fill and drain (measured: "
        "vllm_kvrunahead/core/budget.py), and in the TP layout also a TP forward of its last token and, after "
        "the first, a gather of the cached prefix's KV heads. Only EngineArgs knows whether the user set "
        "--max-num-batched-tokens.",
    how="Wraps the method that fills vLLM's defaults: when the worker class is KV-Runahead's, N > 1 (the "
        "chain of copies: --prefill-context-parallel-size N; the TP layout: --tensor-parallel-size N alone; "
        "the mode from config.flags_mode) and the user set no --max-num-batched-tokens, multiplies vLLM's "
        "default by N (capped at max_num_seqs x max_model_len), records vLLM's default as "
        "kv_runahead.step_budget (unless the user gave one; see step-budget-per-step) and logs both. A user's "
        "--max-num-batched-tokens is never changed.",
    upstream="Not upstream. vLLM already scales its CPU default budget with the worker count; a "
             "per-worker-count default for GPUs (or for PCP) would make this unnecessary.",
    remove_when="vLLM sizes the default budget by the workers that share a prefill, or the plugin can "
                "declare a default through a supported hook.",
    apply=_apply,
)
