"""Model runner V2 starts the head's requests at their segment, as the rewritten step says.

V1 (the CPU runner) takes a running request's computed-token count from the scheduler output.
V2 (GPUs) keeps the count on the device and advances it itself; the scheduler output only updates
its CPU mirror. The head runs the last segment of a runahead chunk, so its next step of that request
must start where its segment started plus what it computed, which only the rewritten output knows.
"""
from __future__ import annotations

from . import Patch, wrap_method


def _apply() -> None:
    from vllm.v1.worker.gpu.model_runner import GPUModelRunner

    from ..seam import SEGMENT_STARTS

    def make(orig):
        def update_requests(self, scheduler_output):
            orig(self, scheduler_output)
            starts = getattr(self, SEGMENT_STARTS, None)
            if starts is None:  # plain vLLM, a chain worker's runner
                return
            computed = self.req_states.num_computed_tokens
            for req_id, start in starts().items():
                idx = self.req_states.req_id_to_index.get(req_id)
                if idx is not None:
                    computed.stage_write_elem(idx, start)
            computed.apply_write()
        return update_requests

    wrap_method(GPUModelRunner, "update_requests", make)


PATCH = Patch(
    name="head-runner-starts-at-its-segment",
    symbol="vllm.v1.worker.gpu.model_runner.GPUModelRunner.update_requests",
    why="Model runner V2 keeps each request's computed-token count on the GPU and advances it itself "
        "(the scheduler output only updates its CPU mirror). The head computes only the last segment of "
        "a runahead chunk; without this its next chunk of the request starts where V2's count says, "
        "past the KV the chain delivers, and the step never consumes it.",
    how="Wraps update_requests: after vLLM's own, on the runner the head marked (seam."
        "follow_rewritten_starts), stages the segment start of this step's runahead requests into "
        "req_states.num_computed_tokens and applies the write. Other runners, and model runner V1 "
        "(the CPU runner), are untouched.",
    upstream="Not upstream: V2 has no hook for a worker that changes where a running request starts.",
    remove_when="V2 takes running requests' computed-token counts from the scheduler output, or offers "
                "a hook for them.",
    apply=_apply,
)
