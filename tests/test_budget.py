"""The per-step budget (pure) and what the scheduler patch reads from vLLM's scheduler."""
from types import SimpleNamespace

from vllm_kvrunahead.core.budget import StepBudget
from vllm_kvrunahead.vllm_side.patches.step_schedule import step_budget_of
from vllm_kvrunahead.vllm_side.seam import scheduler_demand

B = StepBudget(base=16384, most=65536)


def test_one_long_prompt_gets_one_step_several_go_one_after_another():
    assert B.tokens(running=0, prefilling=False, first_waiting=65536) == 65536   # alone: one step
    assert B.tokens(running=0, prefilling=False, first_waiting=100_000) == 65536  # capped
    assert B.tokens(running=0, prefilling=False, first_waiting=16384) == 16384    # 16 x 16k: one per step
    assert B.tokens(running=12, prefilling=False, first_waiting=32768) == 32780   # decodes + the next prompt
    assert B.tokens(running=3, prefilling=False, first_waiting=500) == 16384      # short prompts: vLLM's default
    # a running prompt's remaining chunk is the step; nothing long is pulled in next to it
    assert B.tokens(running=40_000, prefilling=True, first_waiting=65536) == 40_000
    assert B.tokens(running=300, prefilling=True, first_waiting=65536) == 16384


class Queue(list):
    def peek_request(self):
        return self[0]


def req(prompt, computed, outputs=0, placeholders=0):
    return SimpleNamespace(num_prompt_tokens=prompt, num_computed_tokens=computed, num_tokens=prompt + outputs,
                           num_tokens_with_spec=prompt + outputs, num_output_placeholders=placeholders)


def scheduler(running=(), waiting=(), options=None, most=65536):
    return SimpleNamespace(running=list(running), waiting=Queue(waiting), skipped_waiting=Queue(),
                           max_num_scheduled_tokens=most,
                           vllm_config=SimpleNamespace(additional_config={"kv_runahead": options} if options else {}))


def test_scheduler_demand_reads_running_and_the_first_waiting_request():
    s = scheduler(running=[req(100, 100, outputs=1), req(9000, 4000)], waiting=[req(30000, 0), req(5, 0)])
    assert scheduler_demand(s) == (1 + 5000, True, 30000)
    assert scheduler_demand(scheduler(running=[req(100, 100, outputs=1, placeholders=1)])) == (2, False, 0)


def test_off_for_plain_vllm_and_for_a_fixed_budget():
    assert step_budget_of(scheduler()) is None
    assert step_budget_of(scheduler(options={"num_workers": 2, "mode": "copies", "step_budget": None})) is None
    assert step_budget_of(scheduler(options={"num_workers": 1, "mode": "off", "step_budget": 8192})) is None
    assert step_budget_of(scheduler(options={"num_workers": 4, "mode": "copies", "step_budget": 8192}, most=32768)) \
        == StepBudget(8192, 32768)


def test_the_tp_layout_takes_the_same_rule():
    assert step_budget_of(scheduler(options={"num_workers": 4, "mode": "tp_layout", "step_budget": 8192},
                                    most=32768)) == StepBudget(8192, 32768)
    assert step_budget_of(scheduler(options={"num_workers": 4, "mode": "tp_layout", "step_budget": None})) is None
