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
