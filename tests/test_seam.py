"""The seam's runner-facing pieces that the CPU engine (model runner V1) never exercises."""
from types import SimpleNamespace

from vllm_kvrunahead import vllm_seam


class _Staged:
    def __init__(self):
        self.gpu, self.staged = {}, []

    def stage_write_elem(self, idx, value):
        self.staged.append((idx, value))

    def apply_write(self):
        self.gpu.update(self.staged)
        self.staged.clear()


def test_v2_runner_starts_the_heads_chunk_at_its_segment():
    """Model runner V2 keeps each request's computed count on the GPU; after it reads the step's
    requests, the head's runahead requests must start at their segment start."""
    computed = _Staged()
    calls = []
    runner = SimpleNamespace(req_states=SimpleNamespace(num_computed_tokens=computed,
                                                        req_id_to_index={"a": 3, "b": 5}))
    runner.update_requests = lambda so: calls.append(so)
    starts = {}
    vllm_seam.follow_rewritten_starts(runner, lambda: starts)
    starts.update(a=7000, gone=10)                       # a request the runner no longer holds is skipped
    runner.update_requests("step-1")
    assert calls == ["step-1"] and computed.gpu == {3: 7000}
    starts.clear()
    runner.update_requests("step-2")                     # no runahead: nothing written
    assert calls == ["step-1", "step-2"] and computed.gpu == {3: 7000}


def test_v1_runner_is_left_alone():
    runner = SimpleNamespace(update_requests=object())
    before = runner.update_requests
    vllm_seam.follow_rewritten_starts(runner, dict)
    assert runner.update_requests is before


def test_installed_vllm_runs_start_load_kv_before_the_forward(monkeypatch):
    """The connector's start_load_kv posts the step's receives and the head's prefix sends that the
    per-layer hooks then wait on, so it must run before the forward. vLLM 0.26 always calls it there;
    0.32 calls it after the forward unless the step has_sync_kv_loads, which the seam sets on every
    step it rewrites. Driven through the installed vLLM's own connector lifecycle."""
    from vllm.distributed.kv_transfer import kv_transfer_state
    from vllm.v1.core.sched.output import SchedulerOutput
    from vllm.v1.worker import kv_connector_model_runner_mixin as mixin

    from vllm_kvrunahead.connector import EMPTY_META
    from vllm_kvrunahead.plan import StepPlan

    calls = []

    class Recording(vllm_seam.KVConnectorBase_V1):
        def start_load_kv(self, forward_context, **kwargs):
            calls.append("start_load_kv")

        def wait_for_layer_load(self, layer_name):
            pass

        def save_kv_layer(self, layer_name, kv_layer, attn_metadata, **kwargs):
            pass

        def wait_for_save(self):
            calls.append("wait_for_save")

        def get_num_new_matched_tokens(self, request, num_computed_tokens):
            return 0, False

        def update_state_after_alloc(self, request, blocks, num_external_tokens):
            pass

        def build_connector_meta(self, scheduler_output):
            return EMPTY_META

    conn = object.__new__(Recording)  # no config: only the worker-side lifecycle runs
    conn._connector_metadata = None
    monkeypatch.setattr(kv_transfer_state, "_KV_CONNECTOR_AGENT", conn)
    monkeypatch.setattr(mixin, "get_forward_context", lambda: None)
    so, plan = SchedulerOutput.make_empty(), StepPlan(2, ())
    for step in (vllm_seam.for_head(so, plan, EMPTY_META),
                 vllm_seam.for_chain_worker(so, plan, 0, set(), EMPTY_META, vllm_seam.RequestBook())):
        calls.clear()
        with mixin.KVConnectorModelRunnerMixin._get_kv_connector_output(step):
            calls.append("forward")
        assert calls == ["start_load_kv", "forward", "wait_for_save"], (vllm_seam.VLLM_VERSION, calls)


def test_rewritten_steps_differ_only_where_the_release_does():
    """0.26: the head's step is vLLM's own plus the connector metadata (no other field touched);
    0.32: it also says the step loads KV synchronously (start_load_kv before the forward)."""
    import dataclasses

    from vllm.v1.core.sched.output import SchedulerOutput

    from vllm_kvrunahead.connector import EMPTY_META
    from vllm_kvrunahead.plan import StepPlan

    so = SchedulerOutput.make_empty()
    head = vllm_seam.for_head(so, StepPlan(2, ()), EMPTY_META)
    if vllm_seam.V032:
        assert head == dataclasses.replace(so, kv_connector_metadata=EMPTY_META, has_sync_kv_loads=True)
    else:
        assert vllm_seam.STEP_FIELDS == {} and not hasattr(so, "has_sync_kv_loads")
        assert head == dataclasses.replace(so, kv_connector_metadata=EMPTY_META)
