"""Size each scheduler step for KV-Runahead: vLLM's default, more only for the first prompt in line.

A fixed step budget of N x vLLM's default (step_budget.py) runs one long prompt in one step, but packs
several long prompts into one step when many arrive together, and all their first tokens wait for the
whole step (measured: ``budget.py``). ``budget.StepBudget`` decides per step; this patch sets it where
vLLM's scheduler reads it. Both modes, the chain of copies and the TP layout (the mode as the config hook
stored it, ``config.mode_of``).
"""
from __future__ import annotations

from ...config import ADDITIONAL_CONFIG_KEY, RUNAHEAD_MODES, mode_of
from ...core.budget import StepBudget
from . import Patch, wrap_method

_UNSET = object()


def step_budget_of(scheduler) -> StepBudget | None:
    """KV-Runahead's per-step budget for this scheduler, or None (plain vLLM, or a fixed budget)."""
    if mode_of(scheduler.vllm_config) not in RUNAHEAD_MODES:
        return None
    options = scheduler.vllm_config.additional_config[ADDITIONAL_CONFIG_KEY]
    if options.get("step_budget") is None:
        return None
    most = scheduler.max_num_scheduled_tokens
    return StepBudget(base=min(options["step_budget"], most), most=most)


def _apply() -> None:
    from vllm.v1.core.sched.scheduler import Scheduler

    from ..seam import scheduler_demand

    def make(orig):
        def schedule(self, *args, **kwargs):
            budget = self.__dict__.get("_kvr_step_budget", _UNSET)
            if budget is _UNSET:
                budget = self._kvr_step_budget = step_budget_of(self)
            if budget is not None:
                self.max_num_scheduled_tokens = budget.tokens(*scheduler_demand(self))
            return orig(self, *args, **kwargs)
        return schedule

    wrap_method(Scheduler, "schedule", make)


PATCH = Patch(
    name="step-budget-per-step",
    symbol="vllm.v1.core.sched.scheduler.Scheduler.schedule",
    why="With N x vLLM's default as a fixed budget, a step packs several long prompts and every one of their "
        "first tokens waits for the whole step; at vLLM's default, one long prompt alone is cut into chunks that "
        "each pay the chain's fill and drain (both measured: vllm_kvrunahead/core/budget.py; in the TP layout "
        "each chunk also pays a TP forward of its last token and a gather of the cached prefix). vLLM's V1 "
        "scheduler has one token budget for all steps and no limit on long prefills per step.",
    how="Wraps Scheduler.schedule: when kv_runahead.step_budget is set (by step-budget-scales-with-workers, or by "
        "the user) and the engine runs ahead (the chain of copies or the TP layout, config.mode_of), sets the "
        "scheduler's max_num_scheduled_tokens for this step to "
        "max(step_budget, min(max_num_batched_tokens, tokens the running requests want + the first waiting "
        "request's tokens, the latter only when no running request is still in its prompt)) "
        "(vllm_kvrunahead/core/budget.py), then schedules as vLLM does. Plain vLLM engines are untouched.",
    upstream="Not upstream. vLLM V0 had max_long_partial_prefills; a V1 per-step budget hook (or that limit) "
             "would make this unnecessary.",
    remove_when="vLLM's scheduler can cap long prefills per step, or takes a per-step budget policy.",
    apply=_apply,
)
