"""The seam's runner-facing pieces that the CPU engine (model runner V1) never exercises."""
from types import SimpleNamespace

from vllm_kvrunahead.vllm_side import seam


class _Staged:
    def __init__(self):
        self.gpu, self.staged = {}, []

    def stage_write_elem(self, idx, value):
        self.staged.append((idx, value))

    def apply_write(self):
        self.gpu.update(self.staged)
        self.staged.clear()


def _v2_runner(index):
    """Just what the installed V2 runner's update_requests touches, on CPU (its real buffers need CUDA)."""
    import numpy as np

    n = 8
    return SimpleNamespace(
        req_states=SimpleNamespace(num_computed_tokens=_Staged(), num_computed_tokens_np=np.zeros(n, np.int32),
                                   req_id_to_index=dict(index), prefill_len=SimpleNamespace(np=np.full(n, 9000)),
                                   num_computed_prefill_tokens=np.zeros(n, np.int32)),
        block_tables=SimpleNamespace(append_block_ids=lambda *a, **k: None), kv_block_zeroer=None)


def test_installed_v2_runner_starts_the_heads_chunk_at_its_segment():
    """The patch head-runner-starts-at-its-segment, applied to the installed vLLM's model runner V2:
    its own update_requests runs (it sets only the CPU mirror from the scheduler output, which is why
    the patch exists), then the head's runahead requests start at their segment on the device count.
    A runner the head did not mark (plain vLLM) is untouched."""
    import dataclasses
    import inspect

    from vllm.v1.core.sched.output import CachedRequestData, SchedulerOutput
    from vllm.v1.worker.gpu.model_runner import GPUModelRunner

    from vllm_kvrunahead.vllm_side.patches import apply_all

    apply_all()
    update = GPUModelRunner.update_requests
    assert update._kvrunahead
    src = inspect.getsource(update.__wrapped__)
    assert "num_computed_tokens_np[req_index] = num_computed_tokens" in src and "stage_write_elem" not in src
    so = dataclasses.replace(SchedulerOutput.make_empty(), scheduled_cached_reqs=dataclasses.replace(
        CachedRequestData.make_empty(), req_ids=["a"], new_block_ids=[None], num_computed_tokens=[5000]))
    head, plain = _v2_runner({"a": 3, "b": 5}), _v2_runner({"a": 3, "b": 5})
    starts = {}
    seam.follow_rewritten_starts(head, lambda: starts)
    starts.update(a=7000, gone=10)                       # a request the runner no longer holds is skipped
    update(head, so)
    assert head.req_states.num_computed_tokens_np[3] == 5000          # vLLM's own part ran
    assert head.req_states.num_computed_tokens.gpu == {3: 7000}       # ... then the segment start
    starts.clear()
    update(head, so)                                     # no runahead this step: nothing written
    assert head.req_states.num_computed_tokens.gpu == {3: 7000}
    update(plain, so)
    assert plain.req_states.num_computed_tokens.gpu == {} and plain.req_states.num_computed_tokens_np[3] == 5000


def test_installed_vllm_runs_start_load_kv_before_the_forward(monkeypatch):
    """The connector's start_load_kv posts the step's receives and the head's prefix sends that the
    per-layer hooks then wait on, so it must run before the forward. vLLM 0.26 always calls it there;
    0.32 calls it after the forward unless the step has_sync_kv_loads, which the seam sets on every
    step it rewrites. Driven through the installed vLLM's own connector lifecycle."""
    from vllm.distributed.kv_transfer import kv_transfer_state
    from vllm.v1.core.sched.output import SchedulerOutput
    from vllm.v1.worker import kv_connector_model_runner_mixin as mixin

    from vllm_kvrunahead.copies.connector import EMPTY_META
    from vllm_kvrunahead.core.plan import StepPlan

    calls = []

    class Recording(seam.KVConnectorBase_V1):
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
    for step in (seam.for_head(so, plan, EMPTY_META),
                 seam.for_chain_worker(so, plan, 0, set(), EMPTY_META, seam.RequestBook())):
        calls.clear()
        with mixin.KVConnectorModelRunnerMixin._get_kv_connector_output(step):
            calls.append("forward")
        assert calls == ["start_load_kv", "forward", "wait_for_save"], (seam.VLLM_VERSION, calls)


def test_rewritten_steps_differ_only_where_the_release_does():
    """The head's step is vLLM's own plus the connector metadata (no other field touched; 0.26); where
    vLLM's SchedulerOutput has has_sync_kv_loads (0.32), it also says the step loads KV synchronously
    (start_load_kv before the forward)."""
    import dataclasses

    from vllm.v1.core.sched.output import SchedulerOutput

    from vllm_kvrunahead.copies.connector import EMPTY_META
    from vllm_kvrunahead.core.plan import StepPlan

    so = SchedulerOutput.make_empty()
    head = seam.for_head(so, StepPlan(2, ()), EMPTY_META)
    if hasattr(so, "has_sync_kv_loads"):
        assert seam.STEP_FIELDS == {"has_sync_kv_loads": True}
        assert head == dataclasses.replace(so, kv_connector_metadata=EMPTY_META, has_sync_kv_loads=True)
    else:
        assert seam.STEP_FIELDS == {} and not hasattr(so, "has_sync_kv_loads")
        assert head == dataclasses.replace(so, kv_connector_metadata=EMPTY_META)


def test_installed_cpu_linear_keeps_its_weight_only_while_a_peer_guest_loads():
    """The patch cpu-linear-keeps-weight-for-peer-guest, through the installed vLLM's CPU linear method: loaded
    plainly, vLLM packs the weight and drops the parameter; inside keeping_linear_weights(True) the weight
    stays (the peer guest reads the rank's shard from it) and vLLM's packed product is the same."""
    import torch
    from vllm.model_executor.layers.linear import UnquantizedLinearMethod
    from vllm.model_executor.layers.utils import dispatch_unquantized_gemm

    from vllm_kvrunahead.vllm_side.patches import apply_all
    from vllm_kvrunahead.vllm_side.patches.cpu_linear_keeps_weight import keeping_linear_weights

    apply_all()
    torch.manual_seed(0)
    w, x = torch.randn(48, 64), torch.randn(5, 64)

    def loaded(keep):
        layer = torch.nn.Module()
        layer.weight = torch.nn.Parameter(w.clone(), requires_grad=False)
        with keeping_linear_weights(keep):
            UnquantizedLinearMethod().process_weights_after_loading(layer)
        return layer

    dropped, kept = loaded(False), loaded(True)
    assert dropped.weight.numel() == 0 and torch.equal(kept.weight, w)
    gemm = dispatch_unquantized_gemm()
    assert torch.equal(gemm(kept, x, kept.weight, None), gemm(dropped, x, dropped.weight, None))
    assert loaded(False).weight.numel() == 0   # the switch is off again after the block
